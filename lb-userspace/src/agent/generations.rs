//! Generations: each accepted config is the next generation, planned and
//! written against the maps as they are; one that does not fit is
//! rolled back (the previous generation stays), one written only in part
//! is retried by the resync until it is complete.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

use log::{debug, error, info, warn};

use super::config::{check_interfaces, node_address_warnings, warnings};
use super::grow;
use super::interfaces::{DEFAULT_MASQUERADE_IFINDEX, choose_uplinks, default_masquerade_address};
use super::laps::Laps;
use super::{Agent, AgentError, RESYNC};
use crate::error_chain;
use crate::kernel::{self, host, sys};
use crate::model::IpFamily;
use crate::reconcile::{self, Desired, PlanError, RefusedFrontend};
use crate::source::kube::{Finding, Why};
use crate::source::yaml::LoadedConfig;

/// Returns the heap an apply freed to the kernel (`sys::release_free_heap`:
/// without it the agent stays as large as its biggest apply's peak).
pub(super) fn release_free_heap() {
    let started = Instant::now();
    let released = sys::release_free_heap();
    debug!(
        target: "xlb::timing",
        "free heap returned to the kernel ({released}) in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
}

/// Why a cluster's service was skipped, for the log and its Event.
fn does_not_fit(why: Option<&PlanError>) -> String {
    match why {
        Some(why) => format!("it does not fit the datapath's maps: {why}"),
        None => String::from("it does not fit the datapath's maps"),
    }
}

impl Agent {
    /// Plans and applies the current config against the node as it is now.
    /// Returns the number of ops written.
    pub(super) fn reconcile(&mut self) -> Result<usize, AgentError> {
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
        for family in [IpFamily::V4, IpFamily::V6] {
            let state = &self.config.state;
            if let Some(address) = default_masquerade_address(state, &self.uplinks, &facts, family)
            {
                (facts.interface_addresses).insert((DEFAULT_MASQUERADE_IFINDEX, family), address);
            }
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
        // Either way, full maps grow when they can (the agent starts
        // again in place, see `grow`).
        let ops = if self.services.is_some() {
            let fitted = reconcile::diff_fitting(&self.applied, &desired, &self.capacity)
                .map_err(|source| AgentError::Plan { source })?;
            if let Some(why) = &fitted.why {
                self.grow_if_full(why, &desired)?;
            }
            self.tell_owners(&desired.refused, &fitted.skipped, fitted.why.as_ref());
            self.report_skipped(fitted.skipped, fitted.why.as_ref());
            fitted.ops
        } else {
            match reconcile::diff(&self.applied, &desired, &self.capacity) {
                Ok(ops) => ops,
                Err(source) => {
                    self.grow_if_full(&source, &desired)?;
                    return Err(AgentError::Plan { source });
                }
            }
        };
        self.laps.lap("plan");
        // Next hops are made managed neighbours on the neighbour thread
        // (only new or failed backends cost iproute2 work); the kernel
        // resolves them in the background either way, so nothing here waits.
        let backends: BTreeSet<IpAddr> = self
            .config
            .state
            .services
            .iter()
            .flat_map(|service| service.backends.iter())
            .map(|backend| backend.address)
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
        // Ids kept from maps made smaller are given where they go by now.
        if self.applied.kept != reconcile::KeptIds::default() {
            self.applied.kept = reconcile::KeptIds::default();
            kernel::kept::remove_file(self.observe.run_dir());
        }
        self.move_socket_clients();
        Ok(ops.len())
    }

    /// When `why` says a map is full and the maps can grow, starts the
    /// agent again with larger ones; returns only if that fails.
    fn grow_if_full(&self, why: &PlanError, desired: &Desired) -> Result<(), AgentError> {
        let pins = self.datapath.pins();
        let Some(capacity) = grow::growth(why, &self.sizes, pins.is_some(), &self.applied, desired)
        else {
            return Ok(());
        };
        let kept = grow::ids_in_use(&self.applied, self.hash_seed);
        if let Err(source) = kernel::kept::write_file(self.observe.run_dir(), &kept) {
            return Err(AgentError::Grow { source });
        }
        Err(AgentError::Grow {
            source: grow::restart_with(capacity, &self.sizes),
        })
    }

    /// Logs the services that changed from fitting to skipped, and counts
    /// the skipped ones for /metrics and `xlb status`.
    fn report_skipped(&mut self, skipped: Vec<String>, why: Option<&PlanError>) {
        if skipped == self.skipped {
            return;
        }
        let reason = does_not_fit(why);
        for name in skipped.iter().filter(|name| !self.skipped.contains(name)) {
            warn!("service {name} skipped: {reason}");
        }
        self.observe.services_skipped(&skipped);
        self.skipped = skipped;
    }

    /// Posts Kubernetes Events about the Services this generation does not
    /// serve in full (see `source::kube::Finding`).
    fn tell_owners(
        &mut self,
        refused: &[RefusedFrontend],
        skipped: &[String],
        why: Option<&PlanError>,
    ) {
        let Some(source) = &mut self.services else {
            return;
        };
        let refused = refused.iter().filter_map(|refused| {
            Finding::for_service(&refused.service, Why::FrontendRefused, refused.to_string())
        });
        let message = format!("not served on this node: {}", does_not_fit(why));
        let skipped = skipped
            .iter()
            .filter_map(|name| Finding::for_service(name, Why::DoesNotFit, message.clone()));
        source.publish_findings(refused.chain(skipped));
    }

    /// Reloads the config file: always on SIGHUP (`forced`), otherwise when
    /// its content changed and has stayed the same for one poll.
    pub(super) fn reload_file(&mut self, forced: bool) {
        match self.file.poll(forced) {
            None => {}
            Some(Err(error)) => error!("{error}; keeping config generation {}", self.generation),
            Some(Ok(text)) => {
                self.reload(&text);
                drop(text);
                release_free_heap();
            }
        }
    }

    fn reload(&mut self, text: &str) {
        self.laps.start();
        let parsed = self.file.parse(text);
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
        let mut base = None;
        if let Some(source) = &mut self.services {
            base = Some(config.state.clone());
            source.apply_to(&mut config);
            self.laps.lap("translate");
        }
        self.warn_about(&config);
        // The file's state becomes the base of later cluster views only
        // once a generation of it is accepted.
        if self.adopt(config)
            && let Some(base) = base
        {
            self.base = base;
        }
    }

    /// Logs the warnings a new config deserves on this node.
    fn warn_about(&self, config: &LoadedConfig) {
        for warning in warnings(config) {
            warn!("{warning}");
        }
        if let Ok(facts) = host::node_facts() {
            for warning in node_address_warnings(config, &facts.local_addresses) {
                warn!("{warning}");
            }
        }
        if config.state.conntrack.max_flows != self.sizes.flows {
            warn!(
                "conntrack.maxFlows changed to {}; the flow table keeps {} entries until xlb restarts",
                config.state.conntrack.max_flows, self.sizes.flows
            );
        }
    }

    /// The cluster changed: the same node settings with its new services.
    pub(super) fn reload_services(&mut self) {
        let Some(source) = &mut self.services else {
            return;
        };
        self.laps.start();
        let state = source.desired(&self.base);
        if state == self.config.state {
            return;
        }
        self.laps.lap("translate");
        // The node settings and file positions, not the old services: a
        // copy of those would be dropped at once.
        let services = std::mem::take(&mut self.config.state.services);
        let mut config = self.config.clone();
        self.config.state.services = services;
        config.state = state;
        self.adopt(config);
        release_free_heap();
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
                self.completed(ops);
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

    /// Generation `self.generation` is written completely: the uplinks it
    /// gives are attached, and the log and the ready file say so.
    fn completed(&mut self, ops: usize) {
        self.pending = false;
        self.sync_interfaces();
        self.laps.lap("attach");
        info!("applied config generation {} ({ops} ops)", self.generation);
        if let Err(error) = self.write_ready_file() {
            error!("{}", error_chain(&error));
        }
        self.laps.lap("ready file");
    }

    /// Follows node address changes (the uplinks too, when found rather than
    /// configured) and finishes an interrupted apply.
    pub(super) fn resync(&mut self) {
        // Untimed: only reloads log their steps.
        self.laps = Laps::default();
        if self.config.state.interfaces.is_empty()
            && choose_uplinks(&self.config.state, false).is_ok_and(|found| found != self.uplinks)
        {
            self.sync_interfaces();
        }
        match self.reconcile() {
            Ok(0) => {}
            Ok(ops) if self.pending => self.completed(ops),
            Ok(ops) => info!("node addresses changed ({ops} ops)"),
            Err(error) => error!("resync failed: {}", error_chain(&error)),
        }
        self.laps = Laps::default();
    }
}
