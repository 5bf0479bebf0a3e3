//! What the agent holds when services come from Kubernetes objects rather
//! than the config file: the API (`xlb run --kubernetes`) or manifest files
//! (`xlb run --manifests PATH|-`). The config file still gives the node's
//! settings (interfaces, conntrack, ...): [`ClusterSource::desired`] is that
//! base with the services of the latest complete cluster view. The agent
//! keeps the base (the last file config it accepted); the source keeps
//! only its view.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use log::{debug, error, info, warn};

use super::events::{Finding, ServiceEvents};
use super::watch::{ClusterView, Watch, WatchError, connect};
use super::{ClusterSnapshot, NodeInfo, Note, NoteLevel, new_notes, translate};
use crate::model::DesiredState;
use crate::source::manifests::{self, ManifestError, Manifests};
use crate::source::yaml::LoadedConfig;

/// Environment variable naming this node when `--node-name` is not given
/// (a DaemonSet sets it from `spec.nodeName`).
pub const NODE_NAME_ENV: &str = "NODE_NAME";
/// How often manifest files are checked for changes.
const MANIFEST_POLL: Duration = Duration::from_secs(1);

/// Where cluster objects come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceOptions {
    /// `--kubernetes [--kubeconfig FILE]`.
    Kubernetes {
        /// `None`: the in-cluster configuration.
        kubeconfig: Option<PathBuf>,
        /// `--node-name`, else `$NODE_NAME`.
        node_name: Option<String>,
    },
    /// `--manifests PATH|-`: a file, a directory of `*.yaml`/`*.yml`/`*.json`
    /// files, or `-` for standard input (read once).
    Manifests {
        path: PathBuf,
        node_name: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "--kubernetes needs this node's name: pass --node-name NAME or set {NODE_NAME_ENV} \
         (in a DaemonSet, from the downward API: fieldRef spec.nodeName)"
    )]
    NodeName,
    #[error(transparent)]
    Api(#[from] WatchError),
    #[error(transparent)]
    Manifests(#[from] ManifestError),
}

impl SourceError {
    /// 2 for input that cannot be used (bad manifests, a missing node
    /// name), 1 for everything else, as the agent's other errors.
    pub fn exit_code(&self) -> u8 {
        match self {
            SourceError::NodeName | SourceError::Manifests(_) => 2,
            SourceError::Api(_) => 1,
        }
    }
}

/// A running source of cluster views.
#[derive(Debug)]
pub struct ClusterSource {
    feed: Feed,
    view: Arc<ClusterView>,
    /// Notes already logged (each finding is logged once while it lasts).
    logged: BTreeSet<Note>,
    /// The latest translation's findings about Services, for Events.
    found: BTreeSet<Finding>,
    /// `None` for manifests: there is no API to post Events to.
    events: Option<ServiceEvents>,
    description: String,
}

#[derive(Debug)]
enum Feed {
    Api(Watch),
    /// Re-read when the files change; `None` for standard input.
    Manifests(Option<ManifestWatch>),
}

/// A source that is connected (or has read its manifests) but may not have
/// its first complete view yet: [`Begun::complete`] waits for it. The agent
/// loads the datapath meanwhile.
#[derive(Debug)]
pub struct Begun {
    first: First,
}

#[derive(Debug)]
enum First {
    Api {
        watch: Watch,
        description: String,
        events: ServiceEvents,
    },
    Ready(ClusterSource),
}

impl Begun {
    /// Where the services come from, for logs.
    pub fn description(&self) -> &str {
        match &self.first {
            First::Api { description, .. } => description,
            First::Ready(source) => source.description(),
        }
    }

    /// Waits for the first complete view.
    pub async fn complete(self) -> ClusterSource {
        match self.first {
            First::Api {
                mut watch,
                description,
                events,
            } => {
                let view = watch.next().await;
                ClusterSource {
                    feed: Feed::Api(watch),
                    view,
                    logged: BTreeSet::new(),
                    found: BTreeSet::new(),
                    events: Some(events),
                    description,
                }
            }
            First::Ready(source) => source,
        }
    }
}

impl ClusterSource {
    /// Connects (or reads the manifests) and waits for the first complete
    /// view: until then the agent has nothing to serve.
    pub async fn start(options: SourceOptions) -> Result<ClusterSource, SourceError> {
        Ok(Self::begin(options).await?.complete().await)
    }

    /// Connects and starts the watch (or reads the manifests), without
    /// waiting for the first complete view.
    pub async fn begin(options: SourceOptions) -> Result<Begun, SourceError> {
        match options {
            SourceOptions::Kubernetes {
                kubeconfig,
                node_name,
            } => {
                let node_name = node_name
                    .or_else(|| std::env::var(NODE_NAME_ENV).ok())
                    .filter(|name| !name.is_empty())
                    .ok_or(SourceError::NodeName)?;
                let (client, url) = connect(kubeconfig.as_deref()).await?;
                let url = url.trim_end_matches('/');
                let description = match &kubeconfig {
                    Some(path) => format!(
                        "the Kubernetes API at {url} (kubeconfig {})",
                        path.display()
                    ),
                    None => format!("the Kubernetes API at {url} (in-cluster)"),
                };
                info!(
                    "node {node_name}: waiting for a complete list of Services, EndpointSlices and \
                     this Node from {description}"
                );
                let events = ServiceEvents::new(client.clone(), &node_name);
                let watch = Watch::start(client, node_name);
                Ok(Begun {
                    first: First::Api {
                        watch,
                        description,
                        events,
                    },
                })
            }
            SourceOptions::Manifests { path, node_name } => {
                let node = NodeInfo::new(
                    node_name
                        .or_else(|| std::env::var(NODE_NAME_ENV).ok())
                        .filter(|name| !name.is_empty()),
                    None,
                );
                let (loaded, watch) = if path.as_os_str() == "-" {
                    (manifests::read_stdin()?, None)
                } else {
                    let mut watch = ManifestWatch::new(path);
                    let loaded = manifests::load(&watch.path)?;
                    watch.handled = watch.stamp();
                    (loaded, Some(watch))
                };
                let snapshot = accept(loaded);
                let description = match &watch {
                    Some(watch) => format!("manifests {}", watch.path.display()),
                    None => String::from("manifests from standard input"),
                };
                Ok(Begun {
                    first: First::Ready(ClusterSource {
                        feed: Feed::Manifests(watch),
                        view: Arc::new(ClusterView { snapshot, node }),
                        logged: BTreeSet::new(),
                        found: BTreeSet::new(),
                        events: None,
                        description,
                    }),
                })
            }
        }
    }

    /// Where the services come from, for logs.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Puts this source's services into a config loaded from the file (see
    /// [`ClusterSource::desired`]), and drops the file's own "no services
    /// are configured" warning: they come from here.
    pub fn apply_to(&mut self, config: &mut LoadedConfig) {
        config.state = self.desired(&config.state);
        config
            .warnings
            .retain(|warning| warning.field != "services");
    }

    /// `base` (the config file's state) with the services of the latest
    /// view: what to apply, also after [`ClusterSource::changed`]. Logs each
    /// note the first time it appears.
    pub fn desired(&mut self, base: &DesiredState) -> DesiredState {
        if !base.services.is_empty() {
            let note = Note {
                level: NoteLevel::Warn,
                object: String::from("config"),
                message: format!(
                    "services: the config file's services are ignored; services come from {}",
                    self.description
                ),
            };
            if self.logged.insert(note.clone()) {
                warn!("{note}");
            }
        }
        let translation = translate(&self.view.snapshot, &self.view.node, base);
        for note in new_notes(&translation.notes, &self.logged) {
            match note.level {
                NoteLevel::Debug => debug!("{note}"),
                NoteLevel::Warn => warn!("{note}"),
            }
        }
        self.found = translation
            .notes
            .iter()
            .filter_map(Finding::from_note)
            .collect();
        let keep_config_note = |note: &Note| note.object == "config";
        self.logged.retain(keep_config_note);
        self.logged.extend(translation.notes);
        translation.state
    }

    /// Tells Services' owners, with Kubernetes Events, what this node does
    /// not serve of them: the latest translation's findings and the
    /// agent's (`more`: refused frontends, Services that did not fit). Call
    /// it after each generation; a finding is posted once while it lasts.
    pub fn publish_findings(&mut self, more: impl IntoIterator<Item = Finding>) {
        let Some(events) = &mut self.events else {
            return;
        };
        let findings = self.found.iter().cloned().chain(more).collect();
        events.publish(findings, &self.view.snapshot.services);
    }

    /// Waits for a newer view (forever, for manifests read from standard
    /// input). Cancel-safe: use it in `tokio::select!`.
    pub async fn changed(&mut self) {
        match &mut self.feed {
            Feed::Api(watch) => self.view = watch.changed().await,
            Feed::Manifests(None) => std::future::pending().await,
            Feed::Manifests(Some(watch)) => {
                let snapshot = watch.changed().await;
                self.view = Arc::new(ClusterView {
                    snapshot,
                    node: self.view.node.clone(),
                });
            }
        }
    }
}

/// [`ClusterSource::changed`] of `source`, or never when there is none: one
/// `tokio::select!` branch serves agents with and without a cluster source.
pub async fn next_change(source: &mut Option<ClusterSource>) {
    match source {
        Some(source) => source.changed().await,
        None => std::future::pending().await,
    }
}

/// Logs what loaded manifests say besides their objects.
fn accept(loaded: Manifests) -> ClusterSnapshot {
    for warning in &loaded.warnings {
        warn!("{warning}");
    }
    for (kind, count) in &loaded.skipped {
        debug!(
            "manifests: {count} {kind} object(s) skipped (xlb reads Services and EndpointSlices)"
        );
    }
    info!(
        "manifests: {} Service(s), {} EndpointSlice(s)",
        loaded.snapshot.services.len(),
        loaded.snapshot.endpoint_slices.len()
    );
    loaded.snapshot
}

/// Polls manifest files; a change is acted on once it has stayed the same
/// for one poll, so a half-written file is not loaded.
#[derive(Debug)]
struct ManifestWatch {
    path: PathBuf,
    /// Stamp of the content last loaded or rejected.
    handled: Option<Stamp>,
    /// A new stamp seen once.
    candidate: Option<Stamp>,
    poll: tokio::time::Interval,
}

/// (path, mtime, length) of every manifest file.
type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

impl ManifestWatch {
    /// Needs a tokio runtime (the poll timer).
    fn new(path: PathBuf) -> Self {
        let mut poll = tokio::time::interval(MANIFEST_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            path,
            handled: None,
            candidate: None,
            poll,
        }
    }

    fn stamp(&self) -> Option<Stamp> {
        let files = manifests::files(&self.path).ok()?;
        Some(
            files
                .into_iter()
                .map(|file| {
                    let metadata = std::fs::metadata(&file).ok();
                    let modified = metadata.as_ref().and_then(|m| m.modified().ok());
                    let len = metadata.map_or(0, |m| m.len());
                    (file, modified, len)
                })
                .collect(),
        )
    }

    async fn changed(&mut self) -> ClusterSnapshot {
        loop {
            self.poll.tick().await;
            let stamp = self.stamp();
            if stamp == self.handled {
                self.candidate = None;
                continue;
            }
            if stamp != self.candidate {
                self.candidate = stamp;
                continue;
            }
            self.handled = self.candidate.take();
            info!("{} changed: reloading", self.path.display());
            match manifests::load(&self.path) {
                Ok(loaded) => return accept(loaded),
                Err(error) => error!("manifests rejected, keeping the previous ones:\n{error}"),
            }
        }
    }
}
