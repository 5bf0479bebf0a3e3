//! The wire side of the test API server: routes, list and watch responses
//! (chunked JSON lines), selectors, and connections that can be cut.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::store::{KINDS, Kind, Request, Store, status};
use super::write;

/// What open connections and watches react to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signal {
    /// The store's revision: watches wake up to send new events.
    pub revision: u64,
    /// Bumped to close every open connection.
    pub drop_epoch: u64,
    /// Bumped to end every open watch with a 410 ERROR event.
    pub gone_epoch: u64,
}

/// State shared by the test's handle and the server's tasks.
#[derive(Debug)]
pub struct Shared {
    pub store: Mutex<Store>,
    pub signal: watch::Sender<Signal>,
    /// How often open watches that asked for bookmarks get one.
    pub bookmark_interval: Mutex<Duration>,
    /// Open connections by the drop epoch they were accepted in.
    pub connections: Mutex<BTreeMap<u64, usize>>,
}

impl Shared {
    /// Closes every open connection and waits until they are closed (up
    /// to `timeout`); with `away`, also refuses new ones.
    pub fn drop_connections(&self, away: bool, timeout: Duration) {
        let epoch = {
            let mut store = self.store();
            if away {
                store.away = true;
            }
            self.signal.send_modify(|signal| signal.drop_epoch += 1);
            self.signal.borrow().drop_epoch
        };
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            let older = self
                .connections()
                .range(..epoch)
                .map(|(_, count)| *count)
                .sum::<usize>();
            if older == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn connections(&self) -> MutexGuard<'_, BTreeMap<u64, usize>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The store, even if a panicking test thread poisoned its lock.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub(super) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Checked and registered under the store's lock, which
        // `drop_connections` takes to change them: a connection is either
        // refused or counted in the epoch it will be dropped with.
        let open = {
            let store = shared.store();
            if store.away {
                None
            } else {
                let epoch = shared.signal.borrow().drop_epoch;
                *shared.connections().entry(epoch).or_default() += 1;
                Some(Open {
                    shared: Arc::clone(&shared),
                    epoch,
                })
            }
        };
        let Some(open) = open else {
            drop(stream);
            continue;
        };
        tokio::spawn(async move {
            let mut signals = open.shared.signal.subscribe();
            let service_shared = Arc::clone(&open.shared);
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let shared = Arc::clone(&service_shared);
                    async move {
                        let (parts, body) = request.into_parts();
                        // Only writes (Events) carry a body worth reading.
                        let body = if parts.method == Method::GET {
                            Bytes::new()
                        } else {
                            body.collect()
                                .await
                                .map(|collected| collected.to_bytes())
                                .unwrap_or_default()
                        };
                        Ok::<_, Infallible>(handle(&shared, &parts, &body))
                    }
                },
            );
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let dropped = async {
                loop {
                    if signals.borrow_and_update().drop_epoch != open.epoch {
                        return;
                    }
                    if signals.changed().await.is_err() {
                        return;
                    }
                }
            };
            // Dropping the connection future closes the socket; dropping
            // `open` then uncounts it.
            tokio::select! {
                _ = connection => {}
                () = dropped => {}
            }
            drop(open);
        });
    }
}

/// One counted open connection; uncounted on drop (also when the runtime
/// shuts down).
struct Open {
    shared: Arc<Shared>,
    epoch: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut connections = self.shared.connections();
        if let Some(count) = connections.get_mut(&self.epoch) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                connections.remove(&self.epoch);
            }
        }
    }
}

/// The query parameters the server understands.
#[derive(Debug, Default)]
struct Query {
    watch: bool,
    resource_version: Option<String>,
    bookmarks: bool,
    timeout: Option<Duration>,
    send_initial_events: bool,
    field_selector: Vec<(String, bool, String)>,
    label_selector: Vec<LabelRequirement>,
    /// `limit`: the most objects one list page holds.
    limit: Option<usize>,
    /// `continue`: the token of the page before.
    continue_token: Option<String>,
}

#[derive(Debug)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Missing(String),
}

fn parse_query(text: &str) -> Result<Query, String> {
    let mut query = Query::default();
    for (key, value) in form_urlencoded::parse(text.as_bytes()) {
        match key.as_ref() {
            "watch" => query.watch = value == "true" || value == "1",
            "resourceVersion" => query.resource_version = Some(value.into_owned()),
            "allowWatchBookmarks" => query.bookmarks = value == "true",
            "sendInitialEvents" => query.send_initial_events = value == "true",
            "timeoutSeconds" => {
                let seconds: u64 = value
                    .parse()
                    .map_err(|_| format!("timeoutSeconds {value} is not a number"))?;
                query.timeout = Some(Duration::from_secs(seconds));
            }
            "fieldSelector" => {
                for requirement in value.split(',').filter(|part| !part.is_empty()) {
                    let (field, negated, wanted) = if let Some((field, wanted)) =
                        requirement.split_once("!=")
                    {
                        (field, true, wanted)
                    } else if let Some((field, wanted)) = requirement.split_once("==") {
                        (field, false, wanted)
                    } else if let Some((field, wanted)) = requirement.split_once('=') {
                        (field, false, wanted)
                    } else {
                        return Err(format!("field selector {requirement:?} is not field=value"));
                    };
                    if !matches!(field, "metadata.name" | "metadata.namespace") {
                        return Err(format!("field selector on {field} is not supported"));
                    }
                    query
                        .field_selector
                        .push((field.to_owned(), negated, wanted.to_owned()));
                }
            }
            "labelSelector" => {
                for requirement in value.split(',').filter(|part| !part.is_empty()) {
                    let parsed = if let Some(key) = requirement.strip_prefix('!') {
                        LabelRequirement::Missing(key.to_owned())
                    } else if let Some((key, wanted)) = requirement.split_once("!=") {
                        LabelRequirement::NotEquals(key.to_owned(), wanted.to_owned())
                    } else if let Some((key, wanted)) = requirement.split_once("==") {
                        LabelRequirement::Equals(key.to_owned(), wanted.to_owned())
                    } else if let Some((key, wanted)) = requirement.split_once('=') {
                        LabelRequirement::Equals(key.to_owned(), wanted.to_owned())
                    } else if requirement.contains([' ', '(']) {
                        return Err(format!("label selector {requirement:?} is not supported"));
                    } else {
                        LabelRequirement::Exists(requirement.to_owned())
                    };
                    query.label_selector.push(parsed);
                }
            }
            "limit" => {
                let limit: usize = value
                    .parse()
                    .map_err(|_| format!("limit {value} is not a number"))?;
                // kube-apiserver treats limit=0 as no limit.
                query.limit = Some(limit).filter(|limit| *limit > 0);
            }
            "continue" => query.continue_token = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok(query)
}

impl Query {
    fn matches(&self, object: &Value) -> bool {
        let text = |pointer: &str| {
            object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        let fields_match = self.field_selector.iter().all(|(field, negated, wanted)| {
            let value = match field.as_str() {
                "metadata.name" => text("/metadata/name"),
                _ => text("/metadata/namespace"),
            };
            (value == wanted) != *negated
        });
        let label = |key: &str| {
            object
                .get("metadata")
                .and_then(|metadata| metadata.get("labels"))
                .and_then(|labels| labels.get(key))
                .and_then(Value::as_str)
        };
        let labels_match = self
            .label_selector
            .iter()
            .all(|requirement| match requirement {
                LabelRequirement::Equals(key, wanted) => label(key) == Some(wanted.as_str()),
                LabelRequirement::NotEquals(key, wanted) => label(key) != Some(wanted.as_str()),
                LabelRequirement::Exists(key) => label(key).is_some(),
                LabelRequirement::Missing(key) => label(key).is_none(),
            });
        fields_match && labels_match
    }
}

/// `(kind, namespace)` for a collection path, e.g.
/// `/apis/discovery.k8s.io/v1/namespaces/web/endpointslices`.
pub(super) fn route(path: &str) -> Option<(Kind, Option<String>)> {
    for kind in KINDS {
        let Some(rest) = path.strip_prefix(&kind.group_prefix()) else {
            continue;
        };
        if rest == format!("/{}", kind.plural) {
            return Some((kind, None));
        }
        if kind.namespaced {
            let Some(rest) = rest.strip_prefix("/namespaces/") else {
                continue;
            };
            if let Some((namespace, plural)) = rest.split_once('/')
                && plural == kind.plural
                && !namespace.is_empty()
            {
                return Some((kind, Some(namespace.to_owned())));
            }
        }
    }
    None
}

pub(super) fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed_unsync());
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

pub(super) fn error_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code.as_u16(), reason, message))
}

fn handle(shared: &Arc<Shared>, request: &Parts, body: &Bytes) -> Response<Body> {
    let path = request.uri.path().to_owned();
    let query_text = request.uri.query().unwrap_or_default().to_owned();
    let routed = route(&path);
    let query = parse_query(&query_text);
    let response = if request.method == Method::GET {
        respond(shared, &path, routed.clone(), query)
    } else {
        write::respond(shared, &request.method, &path, body)
    };
    let watch = form_urlencoded::parse(query_text.as_bytes())
        .any(|(key, value)| key == "watch" && (value == "true" || value == "1"));
    shared.store().requests.push(Request {
        path,
        query: query_text,
        plural: routed.map(|(kind, _)| kind.plural),
        watch,
        status: response.status().as_u16(),
    });
    response
}

/// A GET: a list or a watch.
fn respond(
    shared: &Arc<Shared>,
    path: &str,
    routed: Option<(Kind, Option<String>)>,
    query: Result<Query, String>,
) -> Response<Body> {
    if path == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-xlb-test", "platform": "linux/amd64"}),
        );
    }
    let Some((kind, namespace)) = routed else {
        return error_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    let query = match query {
        Ok(query) => query,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    if query.watch {
        watch_response(shared, kind, namespace, query)
    } else {
        list_response(shared, kind, namespace.as_deref(), &query)
    }
}

/// A list, paged as kube-apiserver pages it: with `limit`, at most that
/// many items and a `continue` token when more follow; every page of one
/// list carries the first page's resourceVersion, and a token from before
/// [`Store::compact`] gets 410 Expired (the client starts a new list).
///
/// kube-apiserver serves later pages from the first page's etcd snapshot;
/// this server keeps no old versions and serves the objects as they are
/// now. A client that watches from the list's resourceVersion then
/// replays every change since, so it ends at the same state.
fn list_response(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<&str>,
    query: &Query,
) -> Response<Body> {
    let store = shared.store();
    let (revision, after) = match &query.continue_token {
        None => (store.revision, None),
        Some(token) => {
            if query
                .resource_version
                .as_deref()
                .is_some_and(|version| !version.is_empty())
            {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "specifying resource version is not allowed when using continue",
                );
            }
            let Some((revision, after)) = parse_continue(token) else {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("continue key is not valid: {token:?}"),
                );
            };
            if revision < store.compacted {
                return error_response(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                );
            }
            (revision, Some(after))
        }
    };
    let page = store.page(kind, namespace, after.as_ref(), query.limit, |object| {
        query.matches(object)
    });
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if let Some(last) = &page.last {
        metadata["continue"] = json!(continue_token(revision, last));
        // kube-apiserver counts the rest only when no selector filters it.
        if query.field_selector.is_empty() && query.label_selector.is_empty() {
            metadata["remainingItemCount"] = json!(page.remaining);
        }
    }
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": kind.api_version,
            "kind": kind.list_kind(),
            "metadata": metadata,
            "items": page.items,
        }),
    )
}

/// The token of the page after `last`, opaque to clients:
/// `REVISION/NAMESPACE/NAME` (names cannot hold a `/`).
fn continue_token(revision: u64, (namespace, name): &(String, String)) -> String {
    format!("{revision}/{namespace}/{name}")
}

fn parse_continue(token: &str) -> Option<(u64, (String, String))> {
    let (revision, rest) = token.split_once('/')?;
    let (namespace, name) = rest.split_once('/')?;
    Some((
        revision.parse().ok()?,
        (namespace.to_owned(), name.to_owned()),
    ))
}

/// One watch request, as its producer needs it.
struct Watch {
    kind: Kind,
    namespace: Option<String>,
    query: Query,
    start: Start,
    gone_epoch: u64,
}

/// Where a watch starts.
enum Start {
    /// Replay the current objects as ADDED, then follow.
    Now,
    /// Follow from this revision.
    From(u64),
}

fn watch_response(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<String>,
    query: Query,
) -> Response<Body> {
    let start = match query.resource_version.as_deref() {
        None | Some("" | "0") => Start::Now,
        Some(text) => match text.parse() {
            Ok(revision) => Start::From(revision),
            Err(_) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("resourceVersion {text:?} is not a number"),
                );
            }
        },
    };
    {
        let store = shared.store();
        if let Start::From(revision) = start
            && revision < store.compacted
            && store.gone_as_http
        {
            return error_response(
                StatusCode::GONE,
                "Expired",
                &format!("too old resource version: {revision} ({})", store.compacted),
            );
        }
    }
    // The epoch this watch started in, taken now: an expire_watches() after
    // the response is logged must reach this watch.
    let gone_epoch = shared.signal.borrow().gone_epoch;
    let (sender, receiver) = mpsc::channel::<Bytes>(64);
    let watch = Watch {
        kind,
        namespace,
        query,
        start,
        gone_epoch,
    };
    tokio::spawn(produce(Arc::clone(shared), watch, sender));
    let frames = futures::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), receiver))
    });
    let mut response = Response::new(StreamBody::new(frames.boxed()).boxed_unsync());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn line(event_type: &str, object: &Value) -> Bytes {
    let mut text = json!({"type": event_type, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

/// Writes one watch's events into its response until the client goes, the
/// watch times out, or a 410 ends it.
async fn produce(shared: Arc<Shared>, watch: Watch, sender: mpsc::Sender<Bytes>) {
    let mut signals = shared.signal.subscribe();
    if signals.borrow_and_update().gone_epoch != watch.gone_epoch {
        send_gone(&sender).await;
        return;
    }
    let mut position = match watch.start {
        Start::From(revision) => revision,
        Start::Now => match watch.send_initial(&shared, &sender).await {
            Some(revision) => revision,
            None => return,
        },
    };
    let query = &watch.query;
    let deadline = tokio::time::sleep(query.timeout.unwrap_or(Duration::from_secs(1800)));
    tokio::pin!(deadline);
    let bookmark_every = *shared
        .bookmark_interval
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut bookmarks = tokio::time::interval(bookmark_every);
    bookmarks.reset();
    loop {
        match watch.send_since(&shared, &sender, position).await {
            Some(drained_to) => position = drained_to,
            None => return,
        }
        tokio::select! {
            changed = signals.changed() => {
                if changed.is_err() {
                    return;
                }
                if signals.borrow_and_update().gone_epoch != watch.gone_epoch {
                    send_gone(&sender).await;
                    return;
                }
            }
            _ = bookmarks.tick(), if query.bookmarks => {
                let bookmark = bookmark(watch.kind, position, false);
                if sender.send(line("BOOKMARK", &bookmark)).await.is_err() {
                    return;
                }
            }
            () = &mut deadline => return,
            () = sender.closed() => return,
        }
    }
}

/// Ends a watch the test expired with a 410 ERROR event.
async fn send_gone(sender: &mpsc::Sender<Bytes>) {
    let message = "the watch expired (the test server was told to send 410 Gone)";
    let _ = sender
        .send(line("ERROR", &status(410, "Expired", message)))
        .await;
}

impl Watch {
    /// Whether `object` is in the watch's namespace and matches its query.
    fn visible(&self, object: &Value) -> bool {
        let in_namespace = self.namespace.as_deref().is_none_or(|namespace| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(namespace)
        });
        in_namespace && self.query.matches(object)
    }

    /// Sends the current objects as ADDED (and the initial-events bookmark
    /// when asked for); the revision they are at, or None when the client
    /// has gone.
    async fn send_initial(&self, shared: &Shared, sender: &mpsc::Sender<Bytes>) -> Option<u64> {
        let (objects, revision) = {
            let store = shared.store();
            (
                store.list(self.kind, self.namespace.as_deref()),
                store.revision,
            )
        };
        for object in objects.iter().filter(|object| self.visible(object)) {
            sender.send(line("ADDED", object)).await.ok()?;
        }
        if self.query.send_initial_events && self.query.bookmarks {
            let bookmark = bookmark(self.kind, revision, true);
            sender.send(line("BOOKMARK", &bookmark)).await.ok()?;
        }
        Some(revision)
    }

    /// Sends the events after `position`; the revision sent up to, or None
    /// when the watch ended (the client went, or `position` was compacted
    /// away: a 410 ERROR event).
    async fn send_since(
        &self,
        shared: &Shared,
        sender: &mpsc::Sender<Bytes>,
        position: u64,
    ) -> Option<u64> {
        let (events, drained_to, expired) = {
            let store = shared.store();
            if position < store.compacted {
                (Vec::new(), store.revision, Some(store.compacted))
            } else {
                let events: Vec<(&'static str, Value)> = store
                    .history
                    .iter()
                    .filter(|event| event.revision > position && event.plural == self.kind.plural)
                    .filter(|event| self.visible(&event.object))
                    .map(|event| (event.change.name(), event.object.clone()))
                    .collect();
                (events, store.revision, None)
            }
        };
        if let Some(compacted) = expired {
            let message = format!("too old resource version: {position} ({compacted})");
            let _ = sender
                .send(line("ERROR", &status(410, "Expired", &message)))
                .await;
            return None;
        }
        for (change, object) in events {
            sender.send(line(change, &object)).await.ok()?;
        }
        Some(drained_to)
    }
}

fn bookmark(kind: Kind, revision: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"apiVersion": kind.api_version, "kind": kind.kind, "metadata": metadata})
}
