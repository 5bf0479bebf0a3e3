//! The agent's life: validate, load (adopting what a previous agent pinned),
//! fill, attach, then keep the maps equal to the config file (SIGHUP, file
//! changes, node address changes) until SIGINT/SIGTERM, then report the
//! datapath's counters and detach, or leave the pinned datapath running
//! (`--keep-attached`).

use std::collections::BTreeSet;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{MissedTickBehavior, interval};

use crate::error_chain;
use crate::kernel::maps::{MapIoError, format_paths, format_stats, global_config};
use crate::kernel::{
    self, AttachMode, DEFAULT_BPFFS, Datapath, FlowTable, KernelError, KernelMaps, LinkKind,
    Loaded, MapSizes, NeighbourWorker, PinDir, TcRole, host,
    linkwatch::LinkWatch,
    uplinks::{self, Uplink},
};
use crate::model::{DesiredState, Protocol};
use crate::observe::{self, Observe, ObserveError, Steps};
use crate::reconcile::{self, Applied, ApplyError, Capacity, Desired, PlanError, RefusedFrontend};
use crate::source::kube::{ClusterSource, SourceError, SourceOptions, next_change};
use crate::source::yaml::{self, ConfigError, LoadedConfig, Overrides};

/// How often the config file is checked for changes.
const POLL: Duration = Duration::from_secs(1);
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

/// `xlb check`: validates only. Returns the line to print on success.
pub fn check(path: &Path, overrides: &Overrides) -> Result<(String, Vec<String>), ConfigError> {
    let config = yaml::load(path, overrides)?;
    let warnings = warnings(&config);
    let state = &config.state;
    let summary = format!(
        "{}: ok ({} services, {} backends)",
        config.origin(),
        state.services.len(),
        state.backend_count()
    );
    Ok((summary, warnings))
}

/// The pin directory for `--bpffs`. Given explicitly, it must be on a
/// bpffs (the error names the fix); the default falls back to running
/// unpinned, with a warning, where there is none (e.g. inside
/// `ip netns exec`, which remounts /sys).
fn pin_dir(explicit: Option<&Path>) -> Result<Option<PinDir>, AgentError> {
    let dir = explicit.unwrap_or_else(|| Path::new(DEFAULT_BPFFS));
    match PinDir::open(dir) {
        Ok(pins) => Ok(Some(pins)),
        Err(error) if explicit.is_some() => Err(KernelError::Pin(error).into()),
        Err(error) => {
            warn!(
                "running unpinned: the datapath detaches when xlb stops and a restart forgets \
                 conntrack ({})",
                error_chain(&error)
            );
            Ok(None)
        }
    }
}

fn bpffs_display(pins: Option<&PinDir>) -> String {
    pins.map_or_else(
        || String::from("(nowhere)"),
        |pins| pins.root().display().to_string(),
    )
}

/// `xlb detach`: unpins the XDP links (the kernel then detaches them) and
/// the maps a `--keep-attached` agent left in `dir`. Returns what it did.
pub fn detach(dir: Option<&Path>) -> Result<String, KernelError> {
    let dir = dir.unwrap_or_else(|| Path::new(DEFAULT_BPFFS));
    let (links, hooks, maps) = PinDir::at(dir).remove_all()?;
    if links.is_empty() && hooks.is_empty() && maps == 0 {
        return Ok(format!("nothing pinned in {}", dir.display()));
    }
    let interfaces = if links.is_empty() {
        String::from("no interface")
    } else {
        links.join(", ")
    };
    let hooks = if hooks.is_empty() {
        String::new()
    } else {
        format!("; socket hooks {} detached", hooks.join(", "))
    };
    Ok(format!(
        "{}: XDP detached from {interfaces}{hooks}; {maps} maps unpinned",
        dir.display()
    ))
}

/// The config's own warnings plus those that depend on this host.
fn warnings(config: &LoadedConfig) -> Vec<String> {
    let mut warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    if let Some(ephemeral) = host::ephemeral_ports()
        && let Some(overlap) = yaml::ephemeral_overlap(config, &ephemeral)
    {
        warnings.push(overlap.to_string());
    }
    warnings.extend(select_memory_warning(config));
    warnings
}

/// `XLB_SELECT` above this many bytes deserves a word.
const SELECT_WARN_BYTES: u64 = 256 << 20;

/// A warning when the selection tables need a lot of memory: every
/// service's table twice (double buffering) at `selection.tableSize`.
fn select_memory_warning(config: &LoadedConfig) -> Option<String> {
    let state = &config.state;
    let bytes = u64::from(map_sizes(state).select_slots) * 4;
    if bytes <= SELECT_WARN_BYTES {
        return None;
    }
    let problem = config.problem(
        "selection.tableSize",
        format!(
            "{} services at {} slots, double-buffered, make XLB_SELECT {} MiB",
            state.services.len(),
            state.table_size,
            bytes >> 20
        ),
        String::from("a smaller prime (4093 or 1021) saves memory at the cost of coarser weights"),
    );
    Some(problem.to_string())
}

/// Every interface the config names must exist here.
fn check_interfaces(config: &LoadedConfig) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    for (index, name) in config.state.interfaces.iter().enumerate() {
        if host::ifindex(name).is_some() {
            continue;
        }
        let message = format!("no interface \"{name}\" on this node");
        let fix = String::from("check `ip link`, or the network namespace xlb runs in");
        let field = config.interface_field(index);
        if field == "--iface" {
            return Err(ConfigError::Flag {
                flag: "--iface",
                value: name.clone(),
                message,
                fix,
            });
        }
        problems.push(config.problem(&field, message, fix));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid { problems })
    }
}

/// Listed node addresses that this node does not have (NodePort traffic to
/// them only arrives if something routes it here).
fn foreign_node_addresses(config: &LoadedConfig, local: &BTreeSet<Ipv4Addr>) -> Vec<String> {
    let Some(listed) = &config.state.node_addresses else {
        return Vec::new();
    };
    listed
        .iter()
        .enumerate()
        .filter(|(_, address)| !local.contains(address))
        .map(|(index, address)| {
            config
                .problem(
                    &LoadedConfig::node_address_field(index),
                    format!("{address} is not an address of this node"),
                    String::from("NodePorts answer on it only if traffic to it is routed here"),
                )
                .to_string()
        })
        .collect()
}

/// Load-time map sizes for a config: room for every service's table twice
/// (double buffering) plus slack, never below the defaults.
fn map_sizes(state: &DesiredState) -> MapSizes {
    let defaults = MapSizes::default();
    let services = u64::try_from(state.services.len()).unwrap_or(u64::MAX);
    let wanted = u64::from(state.table_size).saturating_mul(services.saturating_mul(2) + 2);
    MapSizes {
        flows: state.conntrack.max_flows,
        select_slots: u32::try_from(wanted)
            .unwrap_or(u32::MAX)
            .max(defaults.select_slots),
        ..defaults
    }
}

/// `XLB_IFACE_ADDRS` key of the masquerade address for egress interfaces
/// without an address of their own (the datapath's fallback).
const DEFAULT_MASQUERADE_IFINDEX: u32 = 0;

/// The node's primary address, used to masquerade towards pods behind
/// address-less interfaces (a routed CNI's veths, as Calico makes them):
/// the first listed node address this node has, else the first address of
/// the first uplink.
fn default_masquerade_address(
    state: &DesiredState,
    uplinks: &[Uplink],
    facts: &crate::reconcile::NodeFacts,
) -> Option<Ipv4Addr> {
    if let Some(listed) = &state.node_addresses
        && let Some(address) = listed
            .iter()
            .find(|address| facts.local_addresses.contains(address))
    {
        return Some(*address);
    }
    uplinks
        .iter()
        .filter_map(|uplink| host::ifindex(&uplink.name))
        .find_map(|ifindex| facts.interface_addresses.get(&ifindex).copied())
}

/// The uplinks for `state`: the configured interfaces (`--iface` or
/// `node.interfaces`), else those [`uplinks::detect`] finds from the node's
/// addresses (the config's `node.addresses`, or the Node's InternalIP) and
/// default routes.
fn choose_uplinks(state: &DesiredState, from_flag: bool) -> Result<Vec<Uplink>, AgentError> {
    if !state.interfaces.is_empty() {
        let why = if from_flag {
            uplinks::WHY_FLAG
        } else {
            uplinks::WHY_CONFIG
        };
        return Ok(state
            .interfaces
            .iter()
            .map(|name| Uplink {
                name: name.clone(),
                why: why.to_owned(),
            })
            .collect());
    }
    let addresses = host::ipv4_addresses().map_err(|source| AgentError::Host { source })?;
    let default_routes = uplinks::default_route_devices().unwrap_or_else(|error| {
        warn!("cannot read the default routes (/proc/net/route): {error}");
        Vec::new()
    });
    let node_addresses = state.node_addresses.as_deref().unwrap_or_default();
    let found = uplinks::detect(node_addresses, &addresses, &default_routes);
    if found.is_empty() {
        let addresses = if node_addresses.is_empty() {
            String::from("none given")
        } else {
            node_addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(AgentError::NoUplink { addresses });
    }
    Ok(found)
}

/// The next link event, or never (no watch, or one that failed: the
/// periodic scan goes on).
async fn next_link_event(watch: Option<&LinkWatch>) {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    if let Err(error) = watch.changed().await {
        warn!(
            "link watch failed: {error}; devices are listed every {} s",
            LINK_SCAN.as_secs()
        );
        std::future::pending::<()>().await;
    }
}

/// Where one apply's time went, step by step; logged at debug level under
/// target `xlb::timing` (`RUST_LOG=info,xlb::timing=debug`) with the
/// "applied" line.
#[derive(Default)]
struct Laps {
    parts: Vec<(&'static str, Duration)>,
    last: Option<Instant>,
}

impl Laps {
    /// Starts timing a new apply.
    fn start(&mut self) {
        self.parts.clear();
        self.last = Some(Instant::now());
    }

    /// The time since the last lap (or the start) went to `step`.
    fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        if let Some(last) = self.last {
            self.parts.push((step, now.duration_since(last)));
        }
        self.last = Some(now);
    }

    /// Logs and forgets the laps so far.
    fn log(&mut self, generation: u64) {
        if self.parts.is_empty() {
            return;
        }
        let total: Duration = self.parts.iter().map(|(_, took)| *took).sum();
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|(step, took)| format!("{step} {:.1}", took.as_secs_f64() * 1e3))
            .collect();
        debug!(
            target: "xlb::timing",
            "generation {generation}: {:.1} ms: {} (ms)",
            total.as_secs_f64() * 1e3,
            parts.join(", ")
        );
        self.parts.clear();
        self.last = None;
    }
}

/// What the running agent tracks about the config file between polls.
#[derive(Default)]
struct FileWatch {
    /// (mtime, length) at the last read.
    stamp: Option<(SystemTime, u64)>,
    /// Content last acted on (applied or rejected).
    handled: Option<String>,
    /// Content seen once that differs from `handled`; acted on when the
    /// next poll sees it unchanged, so a half-written file is not loaded.
    candidate: Option<String>,
}

struct Agent {
    options: RunOptions,
    overrides: Overrides,
    /// The config the maps are (being) made equal to.
    config: LoadedConfig,
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
    watch: FileWatch,
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

/// `xlb run`. Returns when told to stop; an error means nothing is left
/// attached.
pub async fn run(options: RunOptions) -> Result<(), AgentError> {
    let overrides = Overrides {
        interfaces: options.interfaces.clone(),
    };
    let text = std::fs::read_to_string(&options.config).map_err(|source| ConfigError::Read {
        origin: options.config.display().to_string(),
        source,
    })?;
    let mut config = yaml::parse(&options.config.display().to_string(), &text, &overrides)?;
    check_interfaces(&config)?;
    let mut services = match options.services.clone() {
        Some(source) => Some(ClusterSource::start(source).await?),
        None => None,
    };
    if let Some(source) = &mut services {
        source.apply_to(&mut config);
    }
    for warning in warnings(&config) {
        warn!("{warning}");
    }
    let hash_seed = kernel::seed::load(options.hash_seed_file.as_deref())?;
    let pins = pin_dir(options.bpffs.as_deref())?;
    let bpffs = pins.as_ref().map_or_else(
        || {
            options
                .bpffs
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS))
        },
        |pins| pins.root().to_owned(),
    );
    let mut observe = Observe::start(&options.observe.options(
        bpffs,
        services.as_ref().map_or_else(
            || format!("file {}", options.config.display()),
            |source| source.description().to_owned(),
        ),
    ))?;
    let sizes = map_sizes(&config.state);
    let Loaded {
        datapath,
        maps,
        flows,
        logger,
        adopted,
        observed,
    } = Datapath::load_with(sizes, pins.as_ref(), options.observe.datapath_debug)?;
    if let Some(logger) = logger {
        kernel::spawn_log_reader(logger);
    }
    let applied = if adopted {
        let applied = maps
            .read_applied()
            .map_err(|source| AgentError::Adopt { source })?;
        info!(
            "adopted the datapath pinned in {}: {} frontends, {} backends, conntrack kept",
            bpffs_display(pins.as_ref()),
            applied.services.len(),
            applied.backends.len()
        );
        applied
    } else {
        Applied::default()
    };
    let hash_seed = choose_hash_seed(
        hash_seed,
        applied.settings.as_ref().map(|settings| settings.hash_seed),
    );
    observe.datapath_loaded(sizes.flows, observed);
    let capacity = maps.capacity();
    debug!("map capacity: {capacity:?}");
    let mut agent = Agent {
        options,
        overrides,
        config,
        generation: 1,
        pending: true,
        applied,
        maps,
        capacity,
        sizes,
        neighbours: {
            let steps = observe.steps();
            NeighbourWorker::start(move |busy| steps.set("neighbour resolution", busy))
        },
        steps: observe.steps(),
        refused: Vec::new(),
        skipped: Vec::new(),
        datapath,
        uplinks: Vec::new(),
        flows,
        watch: FileWatch::default(),
        observe,
        services,
        hash_seed,
        laps: Laps::default(),
    };
    agent.watch.stamp = agent.stamp();
    agent.watch.handled = Some(text);

    let mut outcome = agent.start().await;
    if outcome.is_ok() {
        outcome = agent.serve().await;
    }
    agent.shut_down();
    outcome
}

impl Agent {
    /// First apply, attach, ready file.
    async fn start(&mut self) -> Result<(), AgentError> {
        let local = host::node_facts()
            .map_err(|source| AgentError::Host { source })?
            .local_addresses;
        for warning in foreign_node_addresses(&self.config, &local) {
            warn!("{warning}");
        }
        self.laps.start();
        self.uplinks = choose_uplinks(&self.config.state, !self.overrides.interfaces.is_empty())?;
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

    /// With `--cgroup`, the socket hooks; without, a previous agent's
    /// pinned ones are removed.
    fn attach_sockets(&mut self) -> Result<(), AgentError> {
        match self.options.cgroup.clone() {
            Some(cgroup) => {
                let hooks = self.datapath.attach_sockets(&cgroup)?;
                self.observe.sockets_attached(&cgroup, &hooks);
                info!(
                    "socket hooks {} attached to the cgroup {}: clients in it reach services \
                     without per-packet NAT",
                    hooks.join(", "),
                    cgroup.display()
                );
            }
            None => {
                for hook in self.datapath.unpin_stale_sockets()? {
                    info!("socket hook {hook} detached (pinned by a previous agent; no --cgroup)");
                }
                info!(
                    "socket-level balancing off (no --cgroup): processes on this node cannot \
                     reach NodePorts or ClusterIPs (XDP sees only packets from a wire)"
                );
            }
        }
        Ok(())
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
                    info!("SIGHUP: reloading {}", self.options.config.display());
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

    /// Reports the datapath's counters, then detaches everything and
    /// removes the pins, or with `--keep-attached` leaves the pinned links
    /// and maps to the next agent.
    fn shut_down(&mut self) {
        self.observe.stopping();
        self.log_counters();
        if self.options.keep_attached {
            self.release();
        } else {
            self.detach();
        }
        if let Some(path) = &self.options.ready_file
            && let Err(error) = std::fs::remove_file(path)
            && error.kind() != io::ErrorKind::NotFound
        {
            warn!("cannot remove the ready file {}: {error}", path.display());
        }
    }

    /// The datapath's verdict counters and each backend's paths, for the
    /// exit log (`cargo xtask demo` reads it).
    fn log_counters(&self) {
        let Some(reader) = self.observe.datapath_maps() else {
            warn!("cannot read packet counters: the datapath's maps could not be opened");
            return;
        };
        match reader.verdicts() {
            Ok(mut counts) => {
                counts.retain(|(_, count)| *count > 0);
                info!("packet counters: {}", format_stats(&counts));
            }
            Err(error) => warn!("cannot read packet counters: {}", error_chain(&error)),
        }
        for (id, backend) in &self.applied.backends {
            match reader.backend_paths(*id) {
                Ok(paths) if paths != lb_common::Paths::default() => info!(
                    "backend {}:{} paths: {}",
                    backend.address.address,
                    backend.address.port,
                    format_paths(&paths)
                ),
                Ok(_) => {}
                Err(error) => warn!("cannot read backend paths: {}", error_chain(&error)),
            }
        }
    }

    /// `--keep-attached`: pinned links stay attached, maps stay pinned.
    fn release(&mut self) {
        let hooks = self.datapath.release_sockets();
        if !hooks.is_empty() {
            info!(
                "socket hooks {} left attached (--keep-attached)",
                hooks.join(", ")
            );
        }
        let (kept, detached) = self.datapath.release_all();
        let dir = bpffs_display(self.datapath.pins());
        if !kept.is_empty() {
            info!(
                "XDP and tc left attached to {} with the maps pinned in {dir} (--keep-attached); the \
                 next `xlb run --bpffs {dir}` adopts them, `xlb detach --bpffs {dir}` removes them",
                kept.join(", "),
            );
        }
        if !detached.is_empty() {
            warn!(
                "XDP detached from {} despite --keep-attached: nothing is pinned ({dir} is not \
                 on a bpffs)",
                detached.join(", ")
            );
        }
    }

    fn detach(&mut self) {
        let (hooks, failures) = self.datapath.detach_sockets();
        for failure in failures {
            error!("{failure}");
        }
        if !hooks.is_empty() {
            info!("socket hooks {} detached", hooks.join(", "));
        }
        let (detached, failures) = self.datapath.detach_all();
        for failure in failures {
            error!("{failure}");
        }
        if !detached.is_empty() {
            info!("XDP detached from {}", detached.join(", "));
        }
        if let Some(pins) = self.datapath.pins() {
            match pins.remove_all() {
                Ok((_, _, maps)) => {
                    info!("removed {maps} pinned maps from {}", pins.root().display())
                }
                Err(error) => error!("{}", error_chain(&error)),
            }
        }
    }

    /// Plans and applies the current config against the node as it is now.
    /// Returns the number of ops written.
    fn reconcile(&mut self) -> Result<usize, AgentError> {
        let started = Instant::now();
        let steps = self.steps.clone();
        let result = steps.run("reconcile", || self.plan_and_apply());
        self.laps.lap("write");
        self.observe.reconciled(
            self.generation,
            result.as_ref().ok().copied(),
            started.elapsed(),
            &self.config.state,
            &self.applied,
        );
        self.laps.lap("status");
        result
    }

    fn plan_and_apply(&mut self) -> Result<usize, AgentError> {
        let mut facts = host::node_facts().map_err(|source| AgentError::Host { source })?;
        if let Some(address) = default_masquerade_address(&self.config.state, &self.uplinks, &facts)
        {
            facts
                .interface_addresses
                .insert(DEFAULT_MASQUERADE_IFINDEX, address);
        }
        let mut desired = Desired::new(&self.config.state, &facts);
        desired.settings.hash_seed = self.hash_seed;
        if desired.refused != self.refused {
            for refused in desired.refused.iter().filter(|r| !self.refused.contains(r)) {
                warn!("{refused}");
            }
            self.refused.clone_from(&desired.refused);
        }
        // Entries adopted from pinned maps carry no names yet.
        self.applied.adopt_names(&desired);
        self.laps.lap("desired");
        // A file config that does not fit is the operator's to fix: it is
        // rejected whole. A cluster's Services are not: those that fit are
        // applied, the others skipped and reported.
        let ops = if self.services.is_some() {
            let fitted = reconcile::diff_fitting(&self.applied, &desired, &self.capacity)
                .map_err(|source| AgentError::Plan { source })?;
            self.report_skipped(fitted.skipped, fitted.why.as_ref());
            fitted.ops
        } else {
            reconcile::diff(&self.applied, &desired, &self.capacity)
                .map_err(|source| AgentError::Plan { source })?
        };
        self.laps.lap("plan");
        // Next hops are made managed neighbours on the neighbour thread
        // (only new or failed backends cost iproute2 work); the kernel
        // resolves them in the background either way, so nothing here waits.
        let backends: BTreeSet<Ipv4Addr> = self
            .config
            .state
            .services
            .iter()
            .flat_map(|service| service.backends.iter().map(|backend| backend.address))
            .collect();
        self.neighbours.ensure(backends);
        self.laps.lap("neighbours");
        if ops.is_empty() {
            return Ok(0);
        }
        for op in &ops {
            debug!("map op: {op}");
        }
        reconcile::apply(&mut self.maps, &mut self.applied, &ops).map_err(|source| {
            AgentError::Apply {
                source: Box::new(source),
            }
        })?;
        self.move_socket_clients();
        Ok(ops.len())
    }

    /// Connected UDP sockets the socket hooks balanced to a backend that is
    /// gone are destroyed (their next send or receive fails; a reconnect is
    /// balanced again), as Cilium's socket-LB does. Unconnected ones need
    /// nothing: sendmsg4 balances each datagram.
    fn move_socket_clients(&mut self) {
        let applied = &self.applied;
        let stale = self
            .datapath
            .take_stale_socket_records(|service_id, backend| {
                applied.socket_keeps_backend(service_id, backend)
                    || applied.service_protocol(service_id) == Some(Protocol::Tcp)
            });
        let stale = match stale {
            Ok(stale) if stale.is_empty() => return,
            Ok(stale) => stale,
            Err(error) => {
                warn!(
                    "cannot read the socket hooks' records: {}",
                    error_chain(&error)
                );
                return;
            }
        };
        let pass = crate::kernel::sock_destroy::destroy_connected_udp(&stale);
        info!(
            "{} connected UDP socket(s) of removed backends destroyed ({} balanced socket(s) \
             had a removed backend; {} network namespace(s) visited)",
            pass.destroyed,
            stale.len(),
            pass.namespaces
        );
        for failure in pass.failures {
            warn!("destroying sockets of removed backends: {failure}");
        }
    }

    /// Logs the services that changed from fitting to skipped, and counts
    /// the skipped ones for /metrics and `xlb status`.
    fn report_skipped(&mut self, skipped: Vec<String>, why: Option<&PlanError>) {
        if skipped == self.skipped {
            return;
        }
        for name in skipped.iter().filter(|name| !self.skipped.contains(name)) {
            let why = why.map_or_else(String::new, |why| format!(": {why}"));
            warn!("service {name} skipped: it does not fit the datapath's maps{why}");
        }
        self.observe.services_skipped(&skipped);
        self.skipped = skipped;
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let metadata = std::fs::metadata(&self.options.config).ok()?;
        Some((metadata.modified().ok()?, metadata.len()))
    }

    /// Reloads the config file: always on SIGHUP (`forced`), otherwise when
    /// its content changed and has stayed the same for one poll.
    fn reload_file(&mut self, forced: bool) {
        let origin = self.options.config.display().to_string();
        let stamp = self.stamp();
        if !forced && stamp == self.watch.stamp && self.watch.candidate.is_none() {
            return;
        }
        self.watch.stamp = stamp;
        let text = match std::fs::read_to_string(&self.options.config) {
            Ok(text) => text,
            Err(source) => {
                if forced || self.watch.handled.is_some() {
                    let error = ConfigError::Read { origin, source };
                    error!("{error}; keeping config generation {}", self.generation);
                }
                self.watch.handled = None;
                self.watch.candidate = None;
                return;
            }
        };
        if !forced {
            if self.watch.handled.as_ref() == Some(&text) {
                self.watch.candidate = None;
                return;
            }
            if self.watch.candidate.as_ref() != Some(&text) {
                // Act when the next poll sees the same content.
                self.watch.candidate = Some(text);
                return;
            }
            info!("{origin} changed: reloading");
        }
        self.watch.candidate = None;
        self.watch.handled = Some(text.clone());
        self.reload(&origin, &text);
    }

    fn reload(&mut self, origin: &str, text: &str) {
        self.laps.start();
        let parsed = yaml::parse(origin, text, &self.overrides);
        self.laps.lap("parse");
        let mut config = match parsed.and_then(|config| check_interfaces(&config).map(|()| config))
        {
            Ok(config) => config,
            Err(error) => {
                error!(
                    "config rejected, keeping generation {}:\n{error}",
                    self.generation
                );
                self.observe
                    .reload_failed(self.generation, &error, Some("file"));
                return;
            }
        };
        if let Some(source) = &mut self.services {
            source.apply_to(&mut config);
            self.laps.lap("translate");
        }
        for warning in warnings(&config) {
            warn!("{warning}");
        }
        if let Ok(facts) = host::node_facts() {
            for warning in foreign_node_addresses(&config, &facts.local_addresses) {
                warn!("{warning}");
            }
        }
        if config.state.conntrack.max_flows != self.sizes.flows {
            warn!(
                "conntrack.maxFlows changed to {}; the flow table keeps {} entries until xlb restarts",
                config.state.conntrack.max_flows, self.sizes.flows
            );
        }
        if !self.adopt(config)
            && let Some(source) = &mut self.services
        {
            source.rejected();
        }
    }

    /// The cluster changed: the same node settings with its new services.
    fn reload_services(&mut self) {
        let Some(source) = &mut self.services else {
            return;
        };
        self.laps.start();
        let state = source.current();
        if state == self.config.state {
            return;
        }
        self.laps.lap("translate");
        let mut config = self.config.clone();
        config.state = state;
        self.adopt(config);
    }

    /// Makes `config` the next generation and applies it (keeping the
    /// previous one if it does not fit the maps: then returns false).
    fn adopt(&mut self, config: LoadedConfig) -> bool {
        self.laps.lap("checks");
        let previous = std::mem::replace(&mut self.config, config);
        self.generation += 1;
        self.pending = true;
        match self.reconcile() {
            Ok(ops) => {
                self.pending = false;
                self.sync_interfaces();
                self.laps.lap("attach");
                info!("applied config generation {} ({ops} ops)", self.generation);
                if let Err(error) = self.write_ready_file() {
                    error!("{}", error_chain(&error));
                }
                self.laps.lap("ready file");
                self.laps.log(self.generation);
                true
            }
            Err(error @ AgentError::Plan { .. }) => {
                // Nothing was written: stay on the previous config.
                self.config = previous;
                self.generation -= 1;
                self.pending = false;
                error!(
                    "config rejected, keeping generation {}: {}",
                    self.generation,
                    error_chain(&error)
                );
                self.observe.reload_failed(self.generation, &error, None);
                false
            }
            Err(error) => {
                error!(
                    "config generation {} is only partly applied ({}); retrying every {} s",
                    self.generation,
                    error_chain(&error),
                    RESYNC.as_secs()
                );
                self.observe.reload_failed(self.generation, &error, None);
                true
            }
        }
    }

    fn uplink_names(&self) -> Vec<String> {
        self.uplinks
            .iter()
            .map(|uplink| uplink.name.clone())
            .collect()
    }

    /// Chooses the uplinks again (the config's, or those the node's
    /// addresses and default routes give); attaches to new ones and
    /// detaches from those that are no longer uplinks.
    fn sync_interfaces(&mut self) {
        match choose_uplinks(&self.config.state, !self.overrides.interfaces.is_empty()) {
            Ok(uplinks) => self.uplinks = uplinks,
            // Keep the last uplinks (an address moving between devices).
            Err(error) => warn!("{}; keeping {:?}", error_chain(&error), self.uplink_names()),
        }
        self.observe.uplinks(&self.uplink_names());
        let wanted = self.uplink_names();
        for interface in self.datapath.interfaces() {
            if !wanted.contains(&interface) {
                match self.datapath.detach(&interface) {
                    Ok(()) => {
                        self.observe.detached(&interface);
                        info!("{interface}: XDP detached (no longer an uplink)");
                    }
                    Err(error) => error!("{}", error_chain(&error)),
                }
            }
        }
        let attached = self.datapath.interfaces();
        for uplink in self.uplinks.clone() {
            if attached.contains(&uplink.name) {
                // Already attached: the reason may have changed.
                if let Some(mode) = self.datapath.attached_mode(&uplink.name) {
                    self.observe.attached(&uplink.name, mode, &uplink.why);
                }
                continue;
            }
            match self.datapath.attach(&uplink.name, self.options.attach_mode) {
                Ok(mode) => {
                    self.observe.attached(&uplink.name, mode, &uplink.why);
                    info!(
                        "{}: XDP attached ({mode}; uplink: {})",
                        uplink.name, uplink.why
                    );
                }
                Err(error) => error!("{}", error_chain(&error)),
            }
        }
    }

    /// Follows node address changes (the uplinks too, when found rather than
    /// configured) and finishes an interrupted apply.
    fn resync(&mut self) {
        // Untimed: only reloads log their steps.
        self.laps = Laps::default();
        if self.config.state.interfaces.is_empty()
            && choose_uplinks(&self.config.state, false).is_ok_and(|found| found != self.uplinks)
        {
            self.sync_interfaces();
        }
        match self.reconcile() {
            Ok(0) => {}
            Ok(ops) if self.pending => {
                self.pending = false;
                self.sync_interfaces();
                info!("applied config generation {} ({ops} ops)", self.generation);
                if let Err(error) = self.write_ready_file() {
                    error!("{}", error_chain(&error));
                }
            }
            Ok(ops) => info!("node addresses changed ({ops} ops)"),
            Err(error) => error!("resync failed: {}", error_chain(&error)),
        }
        self.laps = Laps::default();
    }

    /// Puts the pod/tunnel tc program on every veth and tunnel device that
    /// is not an uplink (XDP runs there), and forgets devices that are gone
    /// or were made again under the same name. Runs at every link event
    /// (rtnetlink), so a pod's veth has its program milliseconds after it
    /// is made, before the pod can answer anything; listing the devices
    /// costs one `ip` run.
    fn sync_pod_hooks(&mut self) {
        let links = match host::links() {
            Ok(links) => links,
            Err(error) => {
                warn!("cannot list network devices: {error}");
                return;
            }
        };
        let uplinks = self.datapath.interfaces();
        let wanted: Vec<&host::Link> = links
            .iter()
            .filter(|link| link.kind != LinkKind::Other && !uplinks.contains(&link.name))
            .collect();
        for (name, ifindex) in self.datapath.tc_pod_interfaces() {
            let current = wanted
                .iter()
                .any(|link| link.name == name && link.ifindex == ifindex);
            if !current {
                self.datapath.detach_tc(&name, TcRole::Pod);
                self.observe.detached(&name);
                info!("{name}: gone; its tc program went with it");
            }
        }
        let attached = self.datapath.tc_pod_interfaces();
        for link in wanted {
            if attached.iter().any(|(name, _)| name == &link.name) {
                continue;
            }
            let why = match &link.kind {
                LinkKind::Tunnel(kind) => {
                    format!("{kind} (replies of remote pods; no XDP redirect into tunnels)")
                }
                _ => String::from("pod veth (replies reverse-NATed here; no XDP peer)"),
            };
            match self.datapath.attach_tc(&link.name, TcRole::Pod) {
                Ok(hook) => {
                    let mode = format!("{hook} ingress");
                    info!("{}: {mode} ({why})", link.name);
                    self.observe.hooked(&link.name, link.ifindex, mode, why);
                }
                Err(error) => warn!("{}", error_chain(&error)),
            }
        }
    }

    fn collect_garbage(&mut self) {
        let Some(settings) = self.applied.settings else {
            return;
        };
        let config = global_config(&settings);
        let flows = &mut self.flows;
        let sweep = self.steps.run("conntrack sweep", || {
            flows.collect_garbage(&config, host::monotonic_ns(), GC_BUDGET)
        });
        match sweep {
            Ok(pass) if pass.deleted > 0 => debug!(
                "conntrack: {} idle entries deleted ({} visited)",
                pass.deleted, pass.scanned
            ),
            Ok(_) => {}
            Err(error) => warn!("conntrack sweep failed: {}", error_chain(&error)),
        }
    }

    fn write_ready_file(&self) -> Result<(), AgentError> {
        let Some(path) = &self.options.ready_file else {
            return Ok(());
        };
        let failed = |source| AgentError::ReadyFile {
            path: path.display().to_string(),
            source,
        };
        // Write then rename, so a reader never sees a partial file.
        let mut temporary = path.clone().into_os_string();
        temporary.push(".tmp");
        std::fs::write(
            &temporary,
            format!("ready generation={}\n", self.generation),
        )
        .map_err(failed)?;
        std::fs::rename(&temporary, path).map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> LoadedConfig {
        match yaml::parse("t.yaml", text, &Overrides::default()) {
            Ok(config) => config,
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn missing_interface_is_a_located_config_error() {
        let loaded = config("node:\n  interfaces: [lo, xlb-nope0]\n");
        let error = check_interfaces(&loaded).map_err(|e| e.to_string());
        assert_eq!(
            error,
            Err(String::from(
                "t.yaml:2:20: node.interfaces[1]: no interface \"xlb-nope0\" on this node; check \
                 `ip link`, or the network namespace xlb runs in"
            ))
        );
        let overrides = Overrides {
            interfaces: vec![String::from("xlb-nope0")],
        };
        let loaded = yaml::parse("t.yaml", "node:\n  interfaces: [lo]\n", &overrides);
        let error = loaded
            .map_err(|e| e.to_string())
            .and_then(|c| check_interfaces(&c).map_err(|e| e.to_string()));
        assert_eq!(
            error,
            Err(String::from(
                "--iface xlb-nope0: no interface \"xlb-nope0\" on this node; check `ip link`, or \
                 the network namespace xlb runs in"
            ))
        );
    }

    #[test]
    fn foreign_node_address_warning() {
        let loaded = config("node:\n  interfaces: [lo]\n  addresses: [198.18.0.1, 198.18.0.2]\n");
        let local: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(198, 18, 0, 1)].into_iter().collect();
        assert_eq!(
            foreign_node_addresses(&loaded, &local),
            [
                "t.yaml:3:27: node.addresses[1]: 198.18.0.2 is not an address of this node; \
              NodePorts answer on it only if traffic to it is routed here"
            ]
        );
    }

    #[test]
    fn select_map_grows_with_services() {
        let mut state = config("node:\n  interfaces: [lo]\n").state;
        assert_eq!(map_sizes(&state), MapSizes::default());
        state.table_size = 65_537;
        state.services = (0..40)
            .map(|index| crate::model::Service {
                name: format!("s{index}"),
                namespace: String::from("default"),
                protocol: crate::model::Protocol::Tcp,
                node_port: 30_000 + index,
                ..crate::model::Service::default()
            })
            .collect();
        assert_eq!(map_sizes(&state).select_slots, 65_537 * 82);
    }

    #[test]
    fn big_selection_tables_are_a_located_warning() {
        let services: String = (0..300)
            .map(|index| {
                format!(
                    "  - name: s{index}\n    nodePort: {}\n    backends: []\n",
                    30_000 + index
                )
            })
            .collect();
        let loaded = config(&format!("node:\n  interfaces: [lo]\nservices:\n{services}"));
        // 300 services: 2 x 300 + 2 tables of 16381 slots, 37 MiB: fine.
        assert_eq!(select_memory_warning(&loaded), None);
        let big: String = (0..3000)
            .map(|index| {
                format!(
                    "  - name: s{index}\n    nodePort: {}\n    backends: []\n",
                    30_000 + index
                )
            })
            .collect();
        let loaded = config(&format!("node:\n  interfaces: [lo]\nservices:\n{big}"));
        let warning = select_memory_warning(&loaded).unwrap_or_default();
        assert!(
            warning.starts_with(
                "t.yaml:1:1: selection.tableSize: 3000 services at 16381 slots, double-buffered, \
                 make XLB_SELECT 375 MiB; a smaller prime (4093 or 1021)"
            ),
            "{warning}"
        );
        let small = config(&format!(
            "node:\n  interfaces: [lo]\nselection:\n  tableSize: 1021\nservices:\n{big}"
        ));
        assert_eq!(select_memory_warning(&small), None);
    }

    #[test]
    fn explicit_bpffs_must_be_one_and_detach_of_nothing_is_fine() {
        let dir = std::env::temp_dir().join(format!("xlb-agent-test-{}", std::process::id()));
        let error = pin_dir(Some(&dir)).map(|_| ()).map_err(|e| error_chain(&e));
        let Err(message) = error else {
            panic!("{} is a bpffs?", dir.display())
        };
        assert!(
            message.contains(&format!("mount -t bpf bpf {}", dir.display())),
            "{message}"
        );
        assert_eq!(
            detach(Some(Path::new("/nonexistent/xlb"))).map_err(|e| e.to_string()),
            Ok(String::from("nothing pinned in /nonexistent/xlb"))
        );
    }

    #[test]
    fn check_summarises() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo.yaml");
        let result = check(&path, &Overrides::default()).map_err(|e| e.to_string());
        let Ok((summary, _)) = result else {
            panic!("{result:?}");
        };
        assert!(
            summary.ends_with("demo.yaml: ok (2 services, 4 backends)"),
            "{summary}"
        );
    }
}
