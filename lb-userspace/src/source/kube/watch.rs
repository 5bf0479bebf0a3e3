//! The Kubernetes API side of the source: a client, and one task that
//! lists and watches Services, EndpointSlices and this node's Node, and
//! publishes a complete [`ClusterView`] after every change once all three
//! have been listed.
//!
//! kube-runtime's watcher lists, then watches from the list's
//! resourceVersion, resumes a dropped watch from the last version it saw,
//! and relists on 410 Gone. Failed requests are retried with its default
//! backoff (0.8 s doubling to 30 s, reset by any success). A relist
//! replaces a kind's objects atomically (at `InitDone`), and nothing is
//! forgotten while the API is unreachable: the last view keeps serving.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::serde::de::DeserializeOwned;
use kube::config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config, Resource};
use log::{debug, info, warn};
use tokio::sync::watch as channel;
use tokio::task::JoinHandle;

use super::{ClusterSnapshot, NodeInfo, ObjectKey, ServiceObject, SliceObject, key_of};

/// Why the API cannot be reached at all (bad configuration, not a network
/// blip: those are retried).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot load the kubeconfig {path}; check the path given to --kubeconfig")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error(
        "cannot load the in-cluster API configuration (is xlb running in a pod with a service \
         account?); outside a cluster pass --kubeconfig FILE"
    )]
    InCluster {
        #[source]
        source: InClusterError,
    },
    #[error("cannot build a Kubernetes client for {url}")]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
}

/// A client from `kubeconfig` (its current context), or the in-cluster
/// configuration (service account token, `KUBERNETES_SERVICE_HOST`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, WatchError> {
    connect(kubeconfig).await.map(|(client, _)| client)
}

/// [`client`], and the API server's URL (for logs).
pub async fn connect(kubeconfig: Option<&Path>) -> Result<(Client, String), WatchError> {
    let config = match kubeconfig {
        Some(path) => {
            let failed = |source| WatchError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(failed)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(failed)?
        }
        None => Config::incluster().map_err(|source| WatchError::InCluster { source })?,
    };
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|source| WatchError::Client {
        url: url.clone(),
        source,
    })?;
    Ok((client, url))
}

/// Everything the translation needs from the API, complete as of one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    pub snapshot: ClusterSnapshot,
    pub node: NodeInfo,
}

/// The watching task; stopped on drop.
#[derive(Debug)]
pub struct Watch {
    views: channel::Receiver<Option<Arc<ClusterView>>>,
    task: JoinHandle<()>,
}

impl Watch {
    /// Starts watching on the current tokio runtime. `node_name` selects the
    /// Node (by `metadata.name`) and marks endpoints local.
    pub fn start(client: Client, node_name: String) -> Watch {
        let (publish, views) = channel::channel(None);
        let task = tokio::spawn(run(client, node_name, publish));
        Watch { views, task }
    }

    /// The latest complete view (`None` until every kind has been listed).
    pub fn current(&self) -> Option<Arc<ClusterView>> {
        self.views.borrow().clone()
    }

    /// Waits for a complete view newer than the last one returned (the
    /// first call returns the first complete view, however old).
    pub async fn next(&mut self) -> Arc<ClusterView> {
        loop {
            if let Some(view) = self.views.borrow_and_update().clone() {
                return view;
            }
            if self.views.changed().await.is_err() {
                // The task ended (it only does when aborted): nothing new
                // will ever come.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until a view newer than the last one returned is published.
    pub async fn changed(&mut self) -> Arc<ClusterView> {
        loop {
            if self.views.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if let Some(view) = self.views.borrow_and_update().clone() {
                return view;
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    client: Client,
    node_name: String,
    publish: channel::Sender<Option<Arc<ClusterView>>>,
) {
    let mut services = Watched::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let mut slices = Watched::new(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    );
    let mut nodes = Watched::new(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    );
    loop {
        let changed = tokio::select! {
            event = services.next() => services.handle(event),
            event = slices.next() => slices.handle(event),
            event = nodes.next() => nodes.handle(event),
        };
        if !(changed && services.synced && slices.synced && nodes.synced) {
            continue;
        }
        let view = ClusterView {
            snapshot: ClusterSnapshot {
                services: Arc::clone(&services.objects),
                endpoint_slices: Arc::clone(&slices.objects),
            },
            node: NodeInfo::new(
                Some(node_name.clone()),
                nodes.objects.values().next().map(|node| &**node),
            ),
        };
        let unchanged = publish
            .borrow()
            .as_deref()
            .is_some_and(|current| *current == view);
        if !unchanged {
            publish.send_replace(Some(Arc::new(view)));
        }
    }
}

type Events<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

/// A kind the watch follows, and what it keeps of each object: the
/// translation's fields only, converted as each object arrives, so a list
/// page's full objects are dropped as soon as they are read.
trait Kept: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static {
    type Object: Debug;
    fn keep(self) -> Self::Object;
}

impl Kept for Service {
    type Object = ServiceObject;
    fn keep(self) -> ServiceObject {
        self.into()
    }
}

impl Kept for EndpointSlice {
    type Object = SliceObject;
    fn keep(self) -> SliceObject {
        self.into()
    }
}

/// One object, read whole ([`NodeInfo::new`]).
impl Kept for Node {
    type Object = Node;
    fn keep(self) -> Node {
        self
    }
}

/// One kind's watcher and the objects it has seen.
struct Watched<K: Kept> {
    api: Api<K>,
    config: watcher::Config,
    events: Events<K>,
    /// The objects as of the last complete list plus later events, shared
    /// with the views published (copied on the first change after one is).
    objects: Arc<BTreeMap<ObjectKey, Arc<K::Object>>>,
    /// A relist in progress; replaces `objects` when complete.
    listing: Option<BTreeMap<ObjectKey, Arc<K::Object>>>,
    /// Listed completely at least once.
    synced: bool,
    /// The last request failed (errors are logged once per outage).
    failing: bool,
}

impl<K: Kept> Watched<K> {
    fn new(api: Api<K>, config: watcher::Config) -> Self {
        let events = Self::events(&api, &config);
        Self {
            api,
            config,
            events,
            objects: Arc::default(),
            listing: None,
            synced: false,
            failing: false,
        }
    }

    fn events(api: &Api<K>, config: &watcher::Config) -> Events<K> {
        watcher::watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed()
    }

    fn kind() -> String {
        K::plural(&()).into_owned()
    }

    async fn next(&mut self) -> Result<Event<K>, watcher::Error> {
        match self.events.next().await {
            Some(event) => event,
            // The backoff never gives up, so the stream does not end; if it
            // did, starting over is the right thing anyway.
            None => {
                self.events = Self::events(&self.api, &self.config);
                Ok(Event::Init)
            }
        }
    }

    /// Applies one event; true if `objects` changed.
    fn handle(&mut self, event: Result<Event<K>, watcher::Error>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                self.failed(&error);
                return false;
            }
        };
        if self.failing {
            self.failing = false;
            info!("Kubernetes API: {} watch recovered", Self::kind());
        }
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let key = key_of(object.meta());
                self.listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, Arc::new(object.keep()));
                false
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                if self.synced {
                    debug!(
                        "Kubernetes API: {} relisted ({} objects)",
                        Self::kind(),
                        listed.len()
                    );
                } else {
                    info!(
                        "Kubernetes API: {} listed ({} objects)",
                        Self::kind(),
                        listed.len()
                    );
                }
                self.synced = true;
                self.objects = Arc::new(listed);
                true
            }
            Event::Apply(object) => {
                let key = key_of(object.meta());
                Arc::make_mut(&mut self.objects).insert(key, Arc::new(object.keep()));
                true
            }
            Event::Delete(object) => {
                let key = key_of(object.meta());
                // Not a copy of the map for an object it does not have.
                self.objects.contains_key(&key)
                    && Arc::make_mut(&mut self.objects).remove(&key).is_some()
            }
        }
    }

    fn failed(&mut self, error: &watcher::Error) {
        let kind = Self::kind();
        // A watch refused with HTTP 410 (rather than a 410 event in the
        // stream, which the watcher handles) would be retried from the same
        // stale resourceVersion forever: start over with a fresh list.
        let gone = matches!(
            error,
            watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410
        );
        if gone {
            debug!("Kubernetes API: {kind} watch is too old (410 Gone): relisting");
            self.events = Self::events(&self.api, &self.config);
            return;
        }
        let gone_event = matches!(error, watcher::Error::WatchError(status) if status.code == 410);
        if gone_event {
            debug!("Kubernetes API: {kind} watch expired (410 Gone): relisting");
            return;
        }
        let what = if self.synced {
            "keeping the last state"
        } else {
            "waiting for a first complete list"
        };
        if self.failing {
            debug!("Kubernetes API: {kind}: {}", crate::error_chain(error));
        } else {
            self.failing = true;
            warn!(
                "Kubernetes API: {kind}: {}; retrying with backoff, {what}",
                crate::error_chain(error)
            );
        }
    }
}
