//! What the running agent tells operators: `status.json` and `catalog.json`
//! in the run directory, the /metrics /healthz /readyz listener, the
//! healthCheckNodePort servers, and log setup. The agent calls the hooks of
//! [`Observe`] as things happen; nothing here changes what the agent does.
//! The CLI (`crate::cli`) reads the same files and the pinned maps.

pub mod catalog;
pub mod datapath;
mod facts;
pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
mod options;
pub mod rundir;
mod server;
pub mod steps;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::error_chain;
use crate::kernel::Attached;
use crate::kernel::host;
use crate::model::DesiredState;
use crate::reconcile::Applied;
use catalog::CatalogRows;
use datapath::DatapathMaps;
use facts::Shared;
use health::HealthServers;
pub use options::{DEFAULT_METRICS_ADDR, Flags, MetricsAddr, Options, parse_metrics_addr};
use rundir::{
    CATALOG_FILE, Interface, PortRange, Reload, RunDirError, STATUS_FILE, SocketHooks, Status,
};
pub use steps::Steps;

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(
        "cannot listen on {address} for /metrics, /healthz and /readyz; pass another --metrics-addr, or --metrics-addr off"
    )]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's reporting side. Needs a tokio runtime; dropping it stops the
/// servers.
pub struct Observe {
    shared: Arc<Shared>,
    run_dir: PathBuf,
    health: HealthServers,
    /// Some healthCheckNodePort could not be opened: retried every pass.
    health_failed: bool,
    server: Option<JoinHandle<()>>,
}

impl Drop for Observe {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl Observe {
    /// Creates the run directory, writes a first status.json and starts the
    /// /metrics listener. Call inside the tokio runtime.
    pub fn start(options: &Options) -> Result<Observe, ObserveError> {
        rundir::create(&options.run_dir)?;
        let (pid, process_start_ticks) = rundir::this_process();
        let status = Status {
            pid,
            process_start_ticks,
            started_at: rundir::unix_now(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            bpffs: options.bpffs.display().to_string(),
            config_source: options.config_source.clone(),
            metrics_addr: options.metrics_addr.map(|a| a.to_string()),
            datapath_debug: options.datapath_debug,
            ..Status::default()
        };
        let ready = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::new(
            status,
            &options.config_source,
            Arc::clone(&ready),
        ));
        let server = match options.metrics_addr {
            Some(address) => {
                let (server, bound) = server::start(address, Arc::clone(&shared))?;
                shared.facts().status.metrics_addr = Some(bound.to_string());
                Some(server)
            }
            None => None,
        };
        let observe = Observe {
            shared,
            run_dir: options.run_dir.clone(),
            health: HealthServers::new(ready),
            health_failed: false,
            server,
        };
        // Stale files of an earlier agent must not describe this one.
        let _ = std::fs::remove_file(observe.run_dir.join(CATALOG_FILE));
        observe.write_status()?;
        Ok(observe)
    }

    /// The datapath's reader, once loaded (the one /metrics uses).
    pub fn datapath_maps(&self) -> Option<Arc<DatapathMaps>> {
        self.shared.maps()
    }

    /// The agent's steps, which it marks as it runs them.
    pub fn steps(&self) -> Steps {
        self.shared.steps.clone()
    }

    /// The datapath is loaded: record its conntrack capacity and program,
    /// and keep `maps` (second descriptors of its maps, see
    /// `datapath::OBSERVED`) for /metrics.
    pub fn datapath_loaded(
        &mut self,
        conntrack_capacity: u32,
        maps: BTreeMap<&'static str, aya::maps::MapData>,
    ) {
        match DatapathMaps::from_maps(maps) {
            Ok(maps) => {
                *self
                    .shared
                    .maps
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(maps));
            }
            Err(error) => tracing::warn!(
                "/metrics will not report the datapath's counters: {}",
                error_chain(&error)
            ),
        }
        {
            let mut facts = self.shared.facts();
            facts.status.conntrack_capacity = conntrack_capacity;
            facts.status.program_id = datapath::own_xdp_program_id();
            let stats_pin = Path::new(&facts.status.bpffs)
                .join(datapath::MAPS_DIR)
                .join(lb_common::maps::STATS);
            facts.status.pinned = stats_pin.exists();
        }
        self.write_status_or_warn();
    }

    /// A tc program is attached to `interface` (a pod's veth or a tunnel);
    /// `mode` says which hook and why, for `xlb status` and /metrics.
    pub fn hooked(&mut self, interface: &str, ifindex: u32, mode: String, why: String) {
        {
            let mut facts = self.shared.facts();
            facts.status.interfaces.retain(|i| i.name != interface);
            facts.status.interfaces.push(Interface {
                name: interface.to_owned(),
                ifindex,
                mode,
                why,
            });
        }
        self.write_status_or_warn();
    }

    /// The uplinks XDP must be attached to for /readyz.
    pub fn uplinks(&mut self, names: &[String]) {
        self.shared.facts().wanted_interfaces = names.to_vec();
        self.update_ready();
    }

    /// XDP is attached to `interface` in `mode`, for `why`.
    pub fn attached(&mut self, interface: &str, mode: Attached, why: &str) {
        {
            let mut facts = self.shared.facts();
            facts.status.interfaces.retain(|i| i.name != interface);
            facts.status.interfaces.push(Interface {
                name: interface.to_owned(),
                ifindex: host::ifindex(interface).unwrap_or(0),
                mode: mode.to_string(),
                why: why.to_owned(),
            });
            if facts.status.program_id.is_none() {
                facts.status.program_id = datapath::own_xdp_program_id();
            }
        }
        self.update_ready();
        self.write_status_or_warn();
    }

    /// The socket hooks are attached to `cgroup`.
    pub fn sockets_attached(&mut self, cgroup: &Path, hooks: &[&str]) {
        self.shared.facts().status.socket_hooks = Some(SocketHooks {
            cgroup: cgroup.display().to_string(),
            hooks: hooks.iter().map(|hook| (*hook).to_owned()).collect(),
        });
        self.write_status_or_warn();
    }

    /// XDP is no longer attached to `interface`.
    pub fn detached(&mut self, interface: &str) {
        self.shared
            .facts()
            .status
            .interfaces
            .retain(|i| i.name != interface);
        self.update_ready();
        self.write_status_or_warn();
    }

    /// The run directory (`--run-dir`).
    pub fn run_dir(&self) -> &std::path::Path {
        &self.run_dir
    }

    /// A reconcile pass for config `generation` ended after `duration`:
    /// `ops` map operations written, or `None` if it failed. After a pass
    /// that changed something (or completed a new generation), the catalog
    /// and status are rewritten and the health check servers follow.
    pub fn reconciled(
        &mut self,
        generation: u64,
        ops: Option<usize>,
        duration: Duration,
        state: &DesiredState,
        applied: &Applied,
    ) {
        let known = {
            let mut facts = self.shared.facts();
            facts.reconciles.record(ops.is_some());
            facts.reconcile_ops += ops.unwrap_or(0) as u64;
            facts.reconcile_seconds.observe(duration.as_secs_f64());
            facts.applied_once && facts.status.generation == generation
        };
        match ops {
            Some(ops) if ops > 0 || !known => self.applied(generation, state, applied),
            Some(_) if self.health_failed => self.follow_health_checks(state),
            _ => {}
        }
    }

    /// Config `generation` is completely written (first apply, reload,
    /// resync): rewrite the catalog and status, follow health checks.
    fn applied(&mut self, generation: u64, state: &DesiredState, applied: &Applied) {
        let catalog = Arc::new(CatalogRows::build(generation, state, applied));
        {
            let mut facts = self.shared.facts();
            if !facts.applied_once || facts.status.generation != generation {
                facts.reloads.record(true);
                facts.status.last_reload = Some(Reload {
                    ok: true,
                    generation,
                    at: rundir::unix_now(),
                    error: None,
                });
            }
            facts.applied_once = true;
            facts.status.generation = generation;
            facts.status.masquerade_ports = PortRange {
                first: *state.masquerade_ports.start(),
                last: *state.masquerade_ports.end(),
            };
            facts.status.masquerade_addresses.clear();
            facts.status.masquerade_addresses6.clear();
            for (&(ifindex, _), &address) in &applied.interface_addresses {
                match address {
                    std::net::IpAddr::V4(address) => {
                        facts.status.masquerade_addresses.insert(ifindex, address);
                    }
                    std::net::IpAddr::V6(address) => {
                        facts.status.masquerade_addresses6.insert(ifindex, address);
                    }
                }
            }
            facts.catalog = Arc::clone(&catalog);
        }
        self.update_ready();
        self.follow_health_checks(state);
        if let Err(error) = rundir::write_json(&self.run_dir, CATALOG_FILE, &*catalog) {
            tracing::warn!("{}", error_chain(&error));
        }
        self.write_status_or_warn();
    }

    fn follow_health_checks(&mut self, state: &DesiredState) {
        let failures = self.health.update(health::wanted(state));
        // Warn once per problem, not at every retry.
        if !self.health_failed {
            for failure in &failures {
                tracing::warn!("{failure}; retrying every reconcile pass");
            }
        }
        self.health_failed = !failures.is_empty();
    }

    /// A config load or reload was rejected or only partly applied; the
    /// maps keep (or are still being moved to) `kept_generation`. `source`
    /// names the config source when the config itself was at fault.
    pub fn reload_failed(
        &mut self,
        kept_generation: u64,
        error: &dyn std::error::Error,
        source: Option<&str>,
    ) {
        {
            let mut facts = self.shared.facts();
            facts.reloads.record(false);
            facts.status.last_reload = Some(Reload {
                ok: false,
                generation: kept_generation,
                at: rundir::unix_now(),
                error: Some(error_chain(error)),
            });
            if let Some(source) = source {
                *facts.source_errors.entry(source.to_owned()).or_default() += 1;
            }
        }
        self.write_status_or_warn();
    }

    /// A config source failed (e.g. a watch broke); counted by source.
    pub fn source_error(&mut self, source: &str) {
        *self
            .shared
            .facts()
            .source_errors
            .entry(source.to_owned())
            .or_default() += 1;
    }

    /// Cluster services that do not fit the maps (all of them, each time
    /// the list changes).
    pub fn services_skipped(&mut self, names: &[String]) {
        self.shared.facts().status.skipped_services = names.to_vec();
        self.write_status_or_warn();
    }

    /// The agent is stopping: not ready any more, health checks stop.
    pub fn stopping(&mut self) {
        self.shared.facts().applied_once = false;
        self.update_ready();
        self.health.update(Vec::new());
        self.write_status_or_warn();
    }

    fn update_ready(&self) {
        let mut facts = self.shared.facts();
        let ready = facts.is_ready();
        facts.status.ready = ready;
        self.shared.ready.store(ready, Ordering::Relaxed);
    }

    fn write_status(&self) -> Result<(), RunDirError> {
        let mut status = self.shared.facts().status.clone();
        status.updated_at = rundir::unix_now();
        rundir::write_json(&self.run_dir, STATUS_FILE, &status)
    }

    fn write_status_or_warn(&self) {
        if let Err(error) = self.write_status() {
            tracing::warn!("{}", error_chain(&error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Outcomes;

    #[test]
    fn status_files_and_probes_follow_the_agent() {
        let run_dir = std::env::temp_dir().join(format!("xlb-observe-test-{}", std::process::id()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let options = Options {
                run_dir: run_dir.clone(),
                bpffs: PathBuf::from("/sys/fs/bpf/xlb-test"),
                metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                datapath_debug: false,
                config_source: String::from("file t.yaml"),
            };
            let mut observe = Observe::start(&options).unwrap();
            let status: Status = rundir::read_json(&run_dir, STATUS_FILE).unwrap().unwrap();
            assert_eq!(status.pid, std::process::id());
            assert!(!status.ready);
            assert_eq!(status.config_source, "file t.yaml");

            let config = crate::source::yaml::parse(
                "t.yaml",
                "node:\n  interfaces: [lo]\n",
                &Default::default(),
            )
            .unwrap();
            let applied = Applied::default();
            observe.uplinks(&[String::from("lo")]);
            observe.reconciled(
                1,
                Some(3),
                Duration::from_millis(2),
                &config.state,
                &applied,
            );
            assert!(
                !observe.shared.ready.load(Ordering::Relaxed),
                "not attached yet"
            );
            let reason = observe.shared.facts().not_ready_reason();
            assert_eq!(reason, "XDP is not attached to lo");
            observe.attached("lo", Attached::Generic, "config node.interfaces");
            assert!(observe.shared.ready.load(Ordering::Relaxed));
            let status: Status = rundir::read_json(&run_dir, STATUS_FILE).unwrap().unwrap();
            assert!(status.ready);
            assert_eq!(status.generation, 1);
            assert_eq!(status.interfaces[0].mode, "generic");
            assert_eq!(status.interfaces[0].why, "config node.interfaces");
            assert_eq!(status.interfaces[0].ifindex, 1);
            assert!(status.last_reload.as_ref().is_some_and(|r| r.ok));
            let catalog: catalog::Catalog =
                rundir::read_json(&run_dir, CATALOG_FILE).unwrap().unwrap();
            assert_eq!(catalog.generation, 1);

            let error = std::io::Error::other("bad field");
            observe.reload_failed(1, &error, Some("file"));
            let status: Status = rundir::read_json(&run_dir, STATUS_FILE).unwrap().unwrap();
            let last = status.last_reload.unwrap();
            assert_eq!((last.ok, last.error.as_deref()), (false, Some("bad field")));

            let metrics = observe.shared.facts().agent_metrics();
            assert_eq!(
                metrics.reloads,
                Outcomes {
                    success: 1,
                    failure: 1
                }
            );
            assert_eq!(metrics.source_errors.get("file"), Some(&1));
            assert_eq!(metrics.reconcile_ops, 3);

            observe.stopping();
            assert!(!observe.shared.ready.load(Ordering::Relaxed));
        });
        std::fs::remove_dir_all(&run_dir).unwrap();
    }
}
