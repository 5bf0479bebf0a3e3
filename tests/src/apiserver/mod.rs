//! An in-process Kubernetes API server for tests: plain HTTP on loopback,
//! serving list and watch for Services, EndpointSlices
//! (discovery.k8s.io/v1) and Nodes the way kube-apiserver does on the wire,
//! so that the real kube client (and xlb's Kubernetes source on top of it)
//! can be tested without a cluster.
//!
//! - lists carry `metadata.resourceVersion` (one global counter);
//! - `?watch=true&resourceVersion=N` streams chunked JSON lines (`ADDED`,
//!   `MODIFIED`, `DELETED`, `BOOKMARK` when `allowWatchBookmarks=true`),
//!   replaying history after N; `resourceVersion=0` (or none) starts with
//!   the current objects;
//! - a watch from before [`ApiServer::compact`] gets an `ERROR` event with a
//!   410 `Status` (as kube-apiserver does), or HTTP 410 after
//!   [`ApiServer::set_gone_as_http`]; [`ApiServer::expire_watches`] sends 410
//!   to every open watch;
//! - [`ApiServer::drop_connections`] cuts every connection mid-stream;
//!   [`ApiServer::go_away`] also refuses new ones until
//!   [`ApiServer::come_back`];
//! - `fieldSelector` on `metadata.name`/`metadata.namespace` and simple
//!   `labelSelector`s are honoured;
//! - lists are paged (`limit`, `continue`, `remainingItemCount`); a
//!   `continue` token from before [`ApiServer::compact`] gets 410 Expired;
//!
//! Tests drive it synchronously: [`ApiServer::apply`] and
//! [`ApiServer::delete`] take k8s-openapi objects. The server runs on its
//! own thread and stops when the handle is dropped.

mod http;
pub mod objects;
mod store;
mod write;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use k8s_openapi::Metadata;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::{oneshot, watch};

pub use store::Request;
use store::{Kind, Store, kind_named};

use http::{Shared, Signal};

/// Default interval of watch bookmarks (kube-apiserver sends one about
/// every minute; tests want them sooner).
pub const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);

/// Longest [`ApiServer::drop_connections`] waits for connections to close.
const DROP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("test API server: {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ApiServerError {
    let what = what.into();
    move |source| ApiServerError::Io { what, source }
}

/// A running test API server; stopped (every connection closed) on drop.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on 127.0.0.1, any free port, in the calling thread's network
    /// namespace.
    pub fn start() -> Result<ApiServer, ApiServerError> {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_error("binding 127.0.0.1:0"))?;
        ApiServer::start_on(listener)
    }

    /// Serves on `listener`, e.g. one bound inside a lab namespace
    /// (`lab.node.run(|| TcpListener::bind("127.0.0.1:0"))`): a socket
    /// stays in the namespace it was made in, whichever thread serves it.
    pub fn start_on(listener: TcpListener) -> Result<ApiServer, ApiServerError> {
        let addr = listener
            .local_addr()
            .map_err(io_error("reading the listener's address"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_error("making the listener non-blocking"))?;
        let (signal, _) = watch::channel(Signal::default());
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            signal,
            bookmark_interval: Mutex::new(BOOKMARK_INTERVAL),
            connections: Mutex::new(std::collections::BTreeMap::new()),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_error("starting a tokio runtime"))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server_shared = Arc::clone(&shared);
        let (started, ready) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("apiserver-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let _ = started.send(Ok(()));
                            listener
                        }
                        Err(error) => {
                            let _ = started.send(Err(error));
                            return;
                        }
                    };
                    tokio::select! {
                        () = http::serve(listener, server_shared) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime cancels every connection task.
            })
            .map_err(io_error("spawning the server thread"))?;
        let outcome = ready.recv().unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the server thread ended before it started",
            ))
        });
        let server = ApiServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        };
        outcome.map_err(io_error("registering the listener with tokio"))?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig whose current context is this server, without auth.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n  - name: xlb-test\n    cluster:\n      server: {}\n\
             contexts:\n  - name: xlb-test\n    context:\n      cluster: xlb-test\n      user: xlb-test\n\
             current-context: xlb-test\nusers:\n  - name: xlb-test\n    user: {{}}\n",
            self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ApiServerError> {
        std::fs::write(path, self.kubeconfig())
            .map_err(io_error(format!("writing {}", path.display())))
    }

    fn kind<K: k8s_openapi::Resource>() -> Kind {
        kind_named(K::KIND).unwrap_or_else(|| {
            panic!(
                "the test API server serves Service, EndpointSlice and Node, not {}",
                K::KIND
            )
        })
    }

    fn changed(&self) {
        let revision = self.shared.store().revision;
        self.shared
            .signal
            .send_modify(|signal| signal.revision = revision);
    }

    fn store_object<K>(&self, object: &K, quietly: bool) -> String
    where
        K: k8s_openapi::Resource + k8s_openapi::serde::Serialize,
    {
        let value = serde_json::to_value(object)
            .unwrap_or_else(|error| panic!("{} does not serialize: {error}", K::KIND));
        let revision = self.shared.store().apply(Self::kind::<K>(), value, quietly);
        self.changed();
        revision.to_string()
    }

    /// Creates or replaces `object` (a watch sees ADDED or MODIFIED).
    /// Returns its new resourceVersion.
    pub fn apply<K>(&self, object: &K) -> String
    where
        K: k8s_openapi::Resource + Metadata<Ty = ObjectMeta> + k8s_openapi::serde::Serialize,
    {
        self.store_object(object, false)
    }

    /// Changes `object` with no watch event, as if the event had been lost:
    /// only a relist shows it.
    pub fn apply_quietly<K>(&self, object: &K) -> String
    where
        K: k8s_openapi::Resource + Metadata<Ty = ObjectMeta> + k8s_openapi::serde::Serialize,
    {
        self.store_object(object, true)
    }

    /// Deletes the `K` named `name` (in `namespace`; ignored for
    /// cluster-scoped kinds). False if there was none.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) -> bool {
        let deleted = self
            .shared
            .store()
            .delete(Self::kind::<K>(), namespace, name, false);
        self.changed();
        deleted
    }

    /// Forgets the event history: a watch resuming from an older
    /// resourceVersion gets 410 Gone. Open watches that are up to date go on.
    pub fn compact(&self) {
        self.shared.store().compact();
        self.changed();
    }

    /// Ends every open watch with an ERROR event carrying a 410 Status.
    pub fn expire_watches(&self) {
        self.shared
            .signal
            .send_modify(|signal| signal.gone_epoch += 1);
    }

    /// Answer watches from a compacted resourceVersion with HTTP 410 rather
    /// than a 410 ERROR event.
    pub fn set_gone_as_http(&self, gone_as_http: bool) {
        self.shared.store().gone_as_http = gone_as_http;
    }

    /// How often watches that allow bookmarks get one (for watches started
    /// from now on).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = interval;
    }

    /// Closes every open connection (watches end mid-stream); returns once
    /// they are closed, so nothing sent afterwards reaches them.
    pub fn drop_connections(&self) {
        self.shared.drop_connections(false, DROP_TIMEOUT);
    }

    /// Closes every connection and refuses new ones (accepts and closes them
    /// at once) until [`ApiServer::come_back`]. Returns once they are closed.
    pub fn go_away(&self) {
        self.shared.drop_connections(true, DROP_TIMEOUT);
    }

    pub fn come_back(&self) {
        self.shared.store().away = false;
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.store().requests.clone()
    }

    /// How many lists (`watch: false`) or watches of `plural` were
    /// answered with `200 OK`.
    pub fn count(&self, plural: &str, watch: bool) -> usize {
        self.shared
            .store()
            .requests
            .iter()
            .filter(|request| {
                request.plural == Some(plural) && request.watch == watch && request.status == 200
            })
            .count()
    }

    /// The Events clients posted (`events.k8s.io/v1`), as stored.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let store = self.shared.store();
        store::KINDS
            .iter()
            .find(|kind| kind.plural == "events")
            .map(|kind| store.list(*kind, None))
            .unwrap_or_default()
    }

    /// The current resourceVersion.
    pub fn revision(&self) -> u64 {
        self.shared.store().revision
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
