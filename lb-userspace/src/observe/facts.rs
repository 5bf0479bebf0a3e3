//! What the agent has reported so far, shared between its hooks and the
//! /metrics listener: readiness and the agent's own metrics follow from it.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::catalog::CatalogRows;
use super::datapath::DatapathMaps;
use super::metrics::{AgentMetrics, Histogram, Outcomes};
use super::rundir::Status;
use super::steps::Steps;

/// Everything the agent reported, guarded by one lock.
pub(super) struct Facts {
    pub(super) status: Status,
    pub(super) catalog: Arc<CatalogRows>,
    pub(super) reloads: Outcomes,
    pub(super) reconciles: Outcomes,
    pub(super) reconcile_ops: u64,
    pub(super) reconcile_seconds: Histogram,
    pub(super) source_errors: BTreeMap<String, u64>,
    /// Interfaces the applied config names.
    pub(super) wanted_interfaces: Vec<String>,
    pub(super) applied_once: bool,
}

impl Facts {
    /// The uplinks the config names that XDP is not attached to.
    fn detached(&self) -> impl Iterator<Item = &String> {
        self.wanted_interfaces
            .iter()
            .filter(|wanted| !self.status.interfaces.iter().any(|a| &a.name == *wanted))
    }

    pub(super) fn is_ready(&self) -> bool {
        self.applied_once && !self.wanted_interfaces.is_empty() && self.detached().next().is_none()
    }

    /// Why /readyz says no.
    pub(super) fn not_ready_reason(&self) -> String {
        if !self.applied_once {
            return String::from("the first config is not applied yet");
        }
        let missing: Vec<&str> = self.detached().map(String::as_str).collect();
        if missing.is_empty() {
            String::from("no interface to attach to")
        } else {
            format!("XDP is not attached to {}", missing.join(", "))
        }
    }

    pub(super) fn agent_metrics(&self) -> AgentMetrics {
        AgentMetrics {
            version: env!("CARGO_PKG_VERSION"),
            started_at: self.status.started_at,
            ready: self.status.ready,
            generation: self.status.generation,
            last_reload: self.status.last_reload.as_ref().map(|r| (r.ok, r.at)),
            reloads: self.reloads,
            reconciles: self.reconciles,
            reconcile_ops: self.reconcile_ops,
            reconcile_seconds: self.reconcile_seconds.clone(),
            source_errors: self.source_errors.clone(),
            interfaces: self
                .status
                .interfaces
                .iter()
                .map(|i| (i.name.clone(), i.mode.clone(), i.why.clone()))
                .collect(),
            socket_hooks: self
                .status
                .socket_hooks
                .iter()
                .flat_map(|attached| {
                    attached
                        .hooks
                        .iter()
                        .map(|hook| (hook.clone(), attached.cgroup.clone()))
                })
                .collect(),
            detached: self.detached().cloned().collect(),
            conntrack_capacity: self.status.conntrack_capacity,
            services_skipped: self.status.skipped_services.len(),
        }
    }
}

pub(super) struct Shared {
    pub(super) facts: Mutex<Facts>,
    /// The agent's own map descriptors, handed over once loaded.
    pub(super) maps: Mutex<Option<Arc<DatapathMaps>>>,
    /// /readyz and healthCheckNodePorts' `serviceProxyHealthy`.
    pub(super) ready: Arc<AtomicBool>,
    /// What the agent is busy with, for /readyz.
    pub(super) steps: Steps,
}

impl Shared {
    /// Nothing applied yet: `status` as the agent starts, the error count
    /// of the config source in use at zero so its series exists from the
    /// start (`file`, `kubernetes`, ...).
    pub(super) fn new(status: Status, config_source: &str, ready: Arc<AtomicBool>) -> Shared {
        Shared {
            facts: Mutex::new(Facts {
                status,
                catalog: Arc::new(CatalogRows::default()),
                reloads: Outcomes::default(),
                reconciles: Outcomes::default(),
                reconcile_ops: 0,
                reconcile_seconds: Histogram::reconcile(),
                source_errors: config_source
                    .split_whitespace()
                    .next()
                    .map(|kind| (kind.to_owned(), 0))
                    .into_iter()
                    .collect(),
                wanted_interfaces: Vec::new(),
                applied_once: false,
            }),
            maps: Mutex::new(None),
            ready,
            steps: Steps::default(),
        }
    }

    pub(super) fn facts(&self) -> MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The datapath's maps, once loaded.
    pub(super) fn maps(&self) -> Option<Arc<DatapathMaps>> {
        self.maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
