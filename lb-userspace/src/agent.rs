//! The agent's life: validate, load, fill, attach, then keep the maps equal
//! to the config file (SIGHUP, file changes, node address changes) until
//! SIGINT/SIGTERM, then detach and report the datapath's counters.

use std::collections::BTreeSet;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use log::{debug, error, info, warn};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{MissedTickBehavior, interval};

use crate::error_chain;
use crate::kernel::maps::{MapIoError, format_stats, global_config};
use crate::kernel::{
    self, AttachMode, Datapath, FlowTable, KernelError, KernelMaps, Loaded, MapSizes, Neighbours,
    Stats, host,
};
use crate::model::DesiredState;
use crate::reconcile::{self, Applied, ApplyError, Capacity, Desired, PlanError};
use crate::source::yaml::{self, ConfigError, LoadedConfig, Overrides};

/// How often the config file is checked for changes.
const POLL: Duration = Duration::from_secs(1);
/// How often node addresses are re-read and an unfinished apply retried.
const RESYNC: Duration = Duration::from_secs(10);
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
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
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
    #[error("cannot write the ready file {path}")]
    ReadyFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen for signals")]
    Signal {
        #[source]
        source: io::Error,
    },
}

impl AgentError {
    /// 2 for a config that cannot be used, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) | AgentError::Plan { .. } => 2,
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

/// The config's own warnings plus those that depend on this host.
fn warnings(config: &LoadedConfig) -> Vec<String> {
    let mut warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    if let Some(ephemeral) = host::ephemeral_ports()
        && let Some(overlap) = yaml::ephemeral_overlap(config, &ephemeral)
    {
        warnings.push(overlap.to_string());
    }
    warnings
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
    neighbours: Neighbours,
    datapath: Datapath,
    flows: FlowTable,
    stats: Stats,
    watch: FileWatch,
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
    let config = yaml::parse(&options.config.display().to_string(), &text, &overrides)?;
    check_interfaces(&config)?;
    for warning in warnings(&config) {
        warn!("{warning}");
    }
    let sizes = map_sizes(&config.state);
    let Loaded {
        datapath,
        maps,
        flows,
        stats,
        logger,
    } = Datapath::load(sizes)?;
    if let Some(logger) = logger {
        kernel::spawn_log_reader(logger);
    }
    let capacity = maps.capacity();
    debug!("map capacity: {capacity:?}");
    let mut agent = Agent {
        options,
        overrides,
        config,
        generation: 1,
        pending: true,
        applied: Applied::default(),
        maps,
        capacity,
        sizes,
        neighbours: Neighbours::default(),
        datapath,
        flows,
        stats,
        watch: FileWatch::default(),
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
        let ops = self.reconcile()?;
        self.pending = false;
        for interface in self.config.state.interfaces.clone() {
            let mode = self.datapath.attach(&interface, self.options.attach_mode)?;
            info!("{interface}: XDP attached ({mode})");
        }
        info!("applied config generation {} ({ops} ops)", self.generation);
        self.write_ready_file()
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
        for timer in [&mut poll, &mut resync, &mut gc] {
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
            }
        }
    }

    /// Detaches everything and reports the datapath's counters.
    fn shut_down(&mut self) {
        match self.stats.read() {
            Ok(counts) => info!("packet counters: {}", format_stats(&counts)),
            Err(error) => warn!("cannot read packet counters: {}", error_chain(&error)),
        }
        let (detached, failures) = self.datapath.detach_all();
        for failure in failures {
            error!("{failure}");
        }
        if !detached.is_empty() {
            info!("XDP detached from {}", detached.join(", "));
        }
        if let Some(path) = &self.options.ready_file
            && let Err(error) = std::fs::remove_file(path)
            && error.kind() != io::ErrorKind::NotFound
        {
            warn!("cannot remove the ready file {}: {error}", path.display());
        }
    }

    /// Plans and applies the current config against the node as it is now.
    /// Returns the number of ops written.
    fn reconcile(&mut self) -> Result<usize, AgentError> {
        let facts = host::node_facts().map_err(|source| AgentError::Host { source })?;
        let desired = Desired::new(&self.config.state, &facts);
        let ops = reconcile::diff(&self.applied, &desired, &self.capacity)
            .map_err(|source| AgentError::Plan { source })?;
        // Next hops first: a service entry must not lead to a backend whose
        // MAC the FIB lookup cannot find. Only new (or failed) backends cost
        // an iproute2 call.
        let backends: BTreeSet<Ipv4Addr> = self
            .config
            .state
            .services
            .iter()
            .flat_map(|service| service.backends.iter().map(|backend| backend.address))
            .collect();
        for warning in self.neighbours.ensure(&backends) {
            warn!("{warning}");
        }
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
        Ok(ops.len())
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
        let config = match yaml::parse(origin, text, &self.overrides)
            .and_then(|config| check_interfaces(&config).map(|()| config))
        {
            Ok(config) => config,
            Err(error) => {
                error!(
                    "config rejected, keeping generation {}:\n{error}",
                    self.generation
                );
                return;
            }
        };
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
        let previous = std::mem::replace(&mut self.config, config);
        self.generation += 1;
        self.pending = true;
        match self.reconcile() {
            Ok(ops) => {
                self.pending = false;
                self.sync_interfaces();
                info!("applied config generation {} ({ops} ops)", self.generation);
                if let Err(error) = self.write_ready_file() {
                    error!("{}", error_chain(&error));
                }
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
            }
            Err(error) => error!(
                "config generation {} is only partly applied ({}); retrying every {} s",
                self.generation,
                error_chain(&error),
                RESYNC.as_secs()
            ),
        }
    }

    /// Attaches to interfaces the config gained and detaches from those it
    /// lost.
    fn sync_interfaces(&mut self) {
        let wanted = self.config.state.interfaces.clone();
        for interface in self.datapath.interfaces() {
            if !wanted.contains(&interface) {
                match self.datapath.detach(&interface) {
                    Ok(()) => info!("{interface}: XDP detached (no longer configured)"),
                    Err(error) => error!("{}", error_chain(&error)),
                }
            }
        }
        let attached = self.datapath.interfaces();
        for interface in wanted {
            if attached.contains(&interface) {
                continue;
            }
            match self.datapath.attach(&interface, self.options.attach_mode) {
                Ok(mode) => info!("{interface}: XDP attached ({mode})"),
                Err(error) => error!("{}", error_chain(&error)),
            }
        }
    }

    /// Follows node address changes and finishes an interrupted apply.
    fn resync(&mut self) {
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
    }

    fn collect_garbage(&mut self) {
        let Some(settings) = self.applied.settings else {
            return;
        };
        let config = global_config(&settings);
        match self
            .flows
            .collect_garbage(&config, host::monotonic_ns(), GC_BUDGET)
        {
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
                backends: Vec::new(),
            })
            .collect();
        assert_eq!(map_sizes(&state).select_slots, 65_537 * 82);
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
