//! The agent's life: validate, load (adopting what a previous agent pinned),
//! fill, attach, then keep the maps equal to the config file (SIGHUP, file
//! changes, node address changes) until SIGINT/SIGTERM, then report the
//! datapath's counters and detach, or leave the pinned datapath running
//! (`--keep-attached`).
//!
//! One file per concern: `config` (host checks on a config), `early`
//! (loading the datapath while a cluster source lists), `generations`
//! (each config a generation: plan, write, roll back, resync),
//! `interfaces` (where the datapath is attached), `gc` (conntrack sweep,
//! sockets of removed backends), `ready` (the ready file), `shutdown` (exit
//! report, detach or release, `xlb detach`), `laps` (apply timing). The
//! config file's watcher is the file source's (`source::file`).

mod config;
mod early;
mod gc;
mod generations;
mod grow;
mod interfaces;
mod laps;
mod ready;
mod shutdown;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use log::{debug, info, warn};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{MissedTickBehavior, interval};

use crate::kernel::maps::MapIoError;
use crate::kernel::{
    self, AttachMode, DEFAULT_BPFFS, Datapath, FlowTable, KernelError, KernelMaps, Loaded,
    MapSizes, NeighbourWorker, PinDir, host, linkwatch::LinkWatch, uplinks::Uplink,
};
use crate::model::DesiredState;
use crate::observe::{self, Observe, ObserveError, Steps};
use crate::reconcile::{Applied, ApplyError, Capacity, PlanError, RefusedFrontend};
use crate::source::file::{ConfigFile, POLL};
use crate::source::kube::{Begun, ClusterSource, SourceError, SourceOptions, next_change};
use crate::source::yaml::{ConfigError, LoadedConfig, Overrides};
use config::{check_interfaces, node_address_warnings, warnings};
use interfaces::{choose_uplinks, next_link_event};
use laps::Laps;
use shutdown::{bpffs_display, pin_dir};

pub use config::check;
pub use grow::MapCapacity;
pub use shutdown::detach;

/// How often node addresses are re-read and an unfinished apply retried.
const RESYNC: Duration = Duration::from_secs(10);
/// How often the node's devices are listed, to attach tc to pods' veths
/// and tunnels as they appear (and forget those that went): a safety net
/// behind the rtnetlink link watch, which lists them at every link event;
/// each second if the watch cannot be opened.
const LINK_SCAN: Duration = Duration::from_secs(10);
const LINK_SCAN_UNWATCHED: Duration = Duration::from_secs(1);
/// How often conntrack is swept, and how many entries one sweep visits.
const GC_PERIOD: Duration = Duration::from_secs(5);
const GC_BUDGET: usize = 100_000;

/// `xlb run`'s options.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    /// `--iface`: replaces `node.interfaces`.
    pub interfaces: Vec<String>,
    pub attach_mode: AttachMode,
    /// Written with `ready generation=N` once serving generation N.
    pub ready_file: Option<PathBuf>,
    /// Run directory, /metrics address, datapath debug logs.
    pub observe: observe::Flags,
    /// `--bpffs`: where maps and XDP links are pinned. `None` means the
    /// default, `kernel::DEFAULT_BPFFS`, which may fall back to running
    /// unpinned; a directory given explicitly must be on a bpffs.
    pub bpffs: Option<PathBuf>,
    /// `--keep-attached`: on SIGTERM/SIGINT leave the pinned XDP links and
    /// maps in place, so the datapath keeps forwarding (with its conntrack)
    /// until the next agent adopts them.
    pub keep_attached: bool,
    /// `--kubernetes` / `--manifests`: services come from Kubernetes objects
    /// (the config file then gives only the node's settings).
    pub services: Option<SourceOptions>,
    /// `--cgroup`: the cgroup v2 directory the socket hooks attach to
    /// (clients on this node reach services through them); `None` leaves
    /// socket-level balancing off.
    pub cgroup: Option<PathBuf>,
    /// `--hash-seed-file`: the flow hash's secret, shared by every node
    /// (created if missing); `None`: random for this run.
    pub hash_seed_file: Option<PathBuf>,
    /// `--map-capacity`: frontends and backend ids the maps start with
    /// (they grow when a config needs more; see `grow`).
    pub map_capacity: MapCapacity,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot read the node's IPv4 addresses")]
    Host {
        #[source]
        source: io::Error,
    },
    #[error("cannot start xlb again with larger maps")]
    Grow {
        #[source]
        source: io::Error,
    },
    #[error("the config does not fit the datapath's maps")]
    Plan {
        #[source]
        source: PlanError,
    },
    #[error("cannot write the datapath's maps")]
    Apply {
        #[source]
        source: Box<ApplyError<MapIoError>>,
    },
    #[error("cannot adopt the pinned maps")]
    Adopt {
        #[source]
        source: MapIoError,
    },
    #[error("cannot write the ready file {path}")]
    ReadyFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Seed(#[from] kernel::seed::SeedError),
    #[error("cannot listen for signals")]
    Signal {
        #[source]
        source: io::Error,
    },
    #[error(
        "no uplink found: no device holds a node address ({addresses}) and there is no default \
         route; list node.interfaces in the config or pass --iface"
    )]
    NoUplink { addresses: String },
}

impl AgentError {
    /// 2 for a config that cannot be used, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_)
            | AgentError::Plan { .. }
            | AgentError::Seed(kernel::seed::SeedError::Malformed { .. }) => 2,
            AgentError::Source(error) => error.exit_code(),
            _ => 1,
        }
    }
}

struct Agent {
    options: RunOptions,
    /// The config file, watched for changes.
    file: ConfigFile,
    /// The config the maps are (being) made equal to: the last good
    /// composed state (the file's, with a cluster source's services).
    config: LoadedConfig,
    /// With a cluster source: the file's own state in `config`, which the
    /// source's next views are composed over (a file config that was
    /// rejected never becomes it).
    base: DesiredState,
    generation: u64,
    /// `config` is not completely written yet (an apply failed part way).
    pending: bool,
    applied: Applied,
    maps: KernelMaps,
    capacity: Capacity,
    sizes: MapSizes,
    neighbours: NeighbourWorker,
    /// What the agent is busy with, for /readyz.
    steps: Steps,
    /// Frontends refused for being node addresses, as last reported.
    refused: Vec<RefusedFrontend>,
    /// Cluster services that did not fit the maps, as last reported.
    skipped: Vec<String>,
    datapath: Datapath,
    /// Where XDP and the tc hand-off are attached, and why.
    uplinks: Vec<Uplink>,
    flows: FlowTable,
    /// When the conntrack keys were last walked for the port filter.
    ports_scanned: Option<std::time::Instant>,
    observe: Observe,
    /// Where services come from when not from the config file.
    services: Option<ClusterSource>,
    /// The flow hash's secret (`Settings::hash_seed`).
    hash_seed: u64,
    /// The current apply's steps (`xlb::timing`).
    laps: Laps,
}

/// The flow hash's secret, with a line in the log saying where it came
/// from. Without a file, an adopted datapath's secret is kept, so new flows
/// hash as before the restart (and adoption writes nothing).
fn choose_hash_seed((value, origin): (u64, kernel::seed::SeedOrigin), adopted: Option<u64>) -> u64 {
    use kernel::seed::SeedOrigin;
    if let (SeedOrigin::Random { .. }, Some(adopted)) = (&origin, adopted) {
        info!("flow hash secret kept from the adopted datapath");
        return adopted;
    }
    match origin {
        SeedOrigin::Read(path) => info!("flow hash secret read from {}", path.display()),
        SeedOrigin::Created(path) => info!(
            "flow hash secret created in {} (mode 0600); give every node the same file",
            path.display()
        ),
        SeedOrigin::Random { why } => warn!(
            "flow hash secret is random for this run ({why}): nodes choose backends independently; use --hash-seed-file with one file for all nodes"
        ),
    }
    value
}

/// The config the agent starts with: the file's, with the cluster source's
/// services when there is one (the source has its first complete view).
struct Start {
    file: ConfigFile,
    config: LoadedConfig,
    base: DesiredState,
    services: Option<ClusterSource>,
}

/// The config file read and the cluster source begun (connected, its
/// first list under way).
struct Opening {
    file: ConfigFile,
    config: LoadedConfig,
    services: Option<Begun>,
}

impl Opening {
    async fn read(options: &RunOptions) -> Result<Self, AgentError> {
        let overrides = Overrides {
            interfaces: options.interfaces.clone(),
        };
        let (file, config) = ConfigFile::open(&options.config, overrides)?;
        check_interfaces(&config)?;
        let services = match options.services.clone() {
            Some(source) => Some(ClusterSource::begin(source).await?),
            None => None,
        };
        Ok(Self {
            file,
            config,
            services,
        })
    }

    /// Waits for the cluster source's first complete view.
    async fn complete(self) -> Start {
        let Opening {
            file,
            mut config,
            services,
        } = self;
        let mut services = match services {
            Some(begun) => Some(begun.complete().await),
            None => None,
        };
        let mut base = DesiredState::default();
        if let Some(source) = &mut services {
            base = config.state.clone();
            source.apply_to(&mut config);
        }
        for warning in warnings(&config) {
            warn!("{warning}");
        }
        Start {
            file,
            config,
            base,
            services,
        }
    }
}

/// The loaded (or adopted) datapath and what the agent knows of it.
struct Load {
    loaded: Loaded,
    applied: Applied,
    hash_seed: u64,
}

impl Load {
    /// Loads the datapath with `sizes`, adopting what a previous
    /// agent pinned under `--bpffs`.
    fn datapath(
        options: &RunOptions,
        sizes: MapSizes,
        pins: Option<&PinDir>,
        hash_seed: (u64, kernel::seed::SeedOrigin),
        observe: &mut Observe,
    ) -> Result<Self, AgentError> {
        let loaded = Datapath::load_with(
            sizes,
            pins,
            options.observe.datapath_debug,
            &observe::datapath::OBSERVED,
        )?;
        Self::loaded(loaded, sizes, pins, hash_seed, observe)
    }

    /// What the agent makes of a datapath loaded with `sizes`.
    fn loaded(
        mut loaded: Loaded,
        sizes: MapSizes,
        pins: Option<&PinDir>,
        hash_seed: (u64, kernel::seed::SeedOrigin),
        observe: &mut Observe,
    ) -> Result<Self, AgentError> {
        if let Some(logger) = loaded.logger.take() {
            kernel::spawn_log_reader(logger);
        }
        let (applied, kept_seed) = if loaded.adopted {
            let applied = loaded
                .maps
                .read_applied()
                .map_err(|source| AgentError::Adopt { source })?;
            info!(
                "adopted the datapath pinned in {}: {} frontends, {} backends, conntrack kept",
                bpffs_display(pins),
                applied.services.len(),
                applied.backends.len()
            );
            // Ids a growing agent left are for maps made anew, not these.
            kernel::kept::remove_file(observe.run_dir());
            (applied, None)
        } else if let Some(kept) = kernel::kept::read_file(observe.run_dir())
            .filter(|_| loaded.kept.is_some())
            .or_else(|| loaded.kept.take())
        {
            // An agent that grew the maps left the ids its datapath runs
            // with (see `kernel::kept`); else the recreated maps held them.
            info!(
                "configuration maps recreated at {} frontends and {} backend ids: the first plan \
                 keeps the ids of {} backends and {} frontends, conntrack kept",
                sizes.services,
                sizes.backends,
                kept.ids.backends.len(),
                kept.ids.services.len()
            );
            (kept.ids.into_applied(), kept.hash_seed)
        } else {
            (Applied::default(), None)
        };
        let hash_seed = choose_hash_seed(
            hash_seed,
            applied
                .settings
                .as_ref()
                .map(|settings| settings.hash_seed)
                .or(kept_seed),
        );
        observe.datapath_loaded(sizes.flows, std::mem::take(&mut loaded.observed));
        Ok(Self {
            loaded,
            applied,
            hash_seed,
        })
    }
}

/// Starts `/metrics` and the run directory, which say where the datapath
/// is pinned and where services come from.
fn start_observe(
    options: &RunOptions,
    pins: Option<&PinDir>,
    services: Option<&Begun>,
) -> Result<Observe, AgentError> {
    let bpffs = pins.map_or_else(
        || {
            options
                .bpffs
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS))
        },
        |pins| pins.root().to_owned(),
    );
    let source = services.map_or_else(
        || format!("file {}", options.config.display()),
        |source| source.description().to_owned(),
    );
    Ok(Observe::start(&options.observe.options(bpffs, source))?)
}

/// `xlb run`. Returns when told to stop; an error means nothing is left
/// attached.
pub async fn run(mut options: RunOptions) -> Result<(), AgentError> {
    let opening = Opening::read(&options).await?;
    let hash_seed = kernel::seed::load(options.hash_seed_file.as_deref())?;
    let pins = pin_dir(options.bpffs.as_deref())?;
    options.map_capacity = options.map_capacity.at_least_grown(pins.as_ref());
    let mut observe = start_observe(&options, pins.as_ref(), opening.services.as_ref())?;
    let (start, sizes, load) =
        early::open_and_load(&options, opening, pins.as_ref(), hash_seed, &mut observe).await?;
    let mut agent = Agent::new(options, start, load, sizes, observe);
    let mut outcome = agent.start().await;
    generations::release_free_heap();
    if outcome.is_ok() {
        outcome = agent.serve().await;
    }
    agent.shut_down();
    outcome
}

impl Agent {
    fn new(
        options: RunOptions,
        start: Start,
        load: Load,
        sizes: MapSizes,
        observe: Observe,
    ) -> Self {
        let Loaded {
            datapath,
            maps,
            flows,
            ..
        } = load.loaded;
        let capacity = maps.capacity();
        debug!("map capacity: {capacity:?}");
        let steps = observe.steps();
        Agent {
            options,
            file: start.file,
            config: start.config,
            base: start.base,
            generation: 1,
            pending: true,
            applied: load.applied,
            maps,
            capacity,
            sizes,
            neighbours: NeighbourWorker::start(move |busy| steps.set("neighbour resolution", busy)),
            steps: observe.steps(),
            refused: Vec::new(),
            skipped: Vec::new(),
            datapath,
            uplinks: Vec::new(),
            flows,
            ports_scanned: None,
            observe,
            services: start.services,
            hash_seed: load.hash_seed,
            laps: Laps::default(),
        }
    }

    /// First apply, attach, ready file.
    async fn start(&mut self) -> Result<(), AgentError> {
        let local = host::node_facts()
            .map_err(|source| AgentError::Host { source })?
            .local_addresses;
        for warning in node_address_warnings(&self.config, &local) {
            warn!("{warning}");
        }
        self.laps.start();
        self.uplinks = choose_uplinks(
            &self.config.state,
            !self.file.overrides().interfaces.is_empty(),
        )?;
        self.observe.uplinks(&self.uplink_names());
        let ops = self.reconcile()?;
        self.pending = false;
        self.datapath.allow_redirect(&self.uplink_names())?;
        for uplink in self.uplinks.clone() {
            let mode = self
                .datapath
                .attach(&uplink.name, self.options.attach_mode)?;
            self.observe.attached(&uplink.name, mode, &uplink.why);
            info!(
                "{}: XDP attached ({mode}; uplink: {})",
                uplink.name, uplink.why
            );
        }
        for interface in self.datapath.unpin_stale_links()? {
            info!("{interface}: XDP detached (pinned by a previous agent, no longer configured)");
        }
        self.sync_pod_hooks();
        for name in self.datapath.unpin_stale_tc_links()? {
            info!("tc link {name} detached (pinned by a previous agent, its device is gone)");
        }
        self.attach_sockets()?;
        self.laps.lap("attach");
        info!("applied config generation {} ({ops} ops)", self.generation);
        let ready = self.write_ready_file();
        self.laps.lap("ready file");
        self.laps.log(self.generation);
        ready
    }

    /// The main loop, until SIGINT or SIGTERM.
    async fn serve(&mut self) -> Result<(), AgentError> {
        let listen = |kind| signal(kind).map_err(|source| AgentError::Signal { source });
        let mut hangup = listen(SignalKind::hangup())?;
        let mut interrupt = listen(SignalKind::interrupt())?;
        let mut terminate = listen(SignalKind::terminate())?;
        let mut poll = interval(POLL);
        let mut resync = interval(RESYNC);
        let mut gc = interval(GC_PERIOD);
        let watch = match LinkWatch::open() {
            Ok(watch) => Some(watch),
            Err(error) => {
                warn!(
                    "cannot watch link events (rtnetlink): {error}; listing devices every {} s \
                     instead",
                    LINK_SCAN_UNWATCHED.as_secs()
                );
                None
            }
        };
        let mut links = interval(if watch.is_some() {
            LINK_SCAN
        } else {
            LINK_SCAN_UNWATCHED
        });
        let mut peers = kernel::peers::PeerWatch::open();
        for timer in [&mut poll, &mut resync, &mut gc, &mut links] {
            timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
            timer.reset();
        }
        loop {
            tokio::select! {
                _ = interrupt.recv() => { info!("SIGINT: stopping"); return Ok(()); }
                _ = terminate.recv() => { info!("SIGTERM: stopping"); return Ok(()); }
                _ = hangup.recv() => {
                    info!("SIGHUP: reloading {}", self.file.path().display());
                    self.neighbours.forget();
                    self.reload_file(true);
                }
                _ = poll.tick() => self.reload_file(false),
                _ = resync.tick() => self.resync(),
                _ = gc.tick() => self.collect_garbage(),
                _ = links.tick() => self.sync_pod_hooks(),
                () = next_link_event(watch.as_ref()) => self.sync_pod_hooks(),
                () = peers.due() => peers.sync(&mut self.datapath),
                () = next_change(&mut self.services) => self.reload_services(),
            }
        }
    }
}
