//! kube-proxy's endpoint rules, asked by everyone who needs them: which of
//! a service's backends keep their flows and which take new ones, under a
//! traffic policy.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::{Backend, Service, TrafficPolicy};

/// A backend as kube-proxy's rules see it under one traffic policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint<'a> {
    pub backend: &'a Backend,
    /// New flows may be sent to it.
    pub selectable: bool,
}

impl Service {
    /// kube-proxy's endpoint rules under `policy`, one endpoint per backend
    /// address and port (the first listed wins). Kept: every backend that
    /// is ready or serving (a terminating one keeps its flows). Selectable
    /// for new flows: the ready ones (with policy Local, the local ready
    /// ones); when there is none, the serving terminating ones. Weight 0
    /// takes no new flow.
    pub fn endpoints(&self, policy: TrafficPolicy) -> Vec<Endpoint<'_>> {
        let eligible = |backend: &Backend| {
            backend.weight > 0 && (policy == TrafficPolicy::Cluster || backend.is_local)
        };
        let any_ready = self.backends.iter().any(|b| b.ready && eligible(b));
        let selectable = |backend: &Backend| {
            eligible(backend)
                && if any_ready {
                    backend.ready
                } else {
                    backend.serving && backend.terminating
                }
        };
        let mut seen: BTreeSet<(Ipv4Addr, u16)> = BTreeSet::new();
        self.backends
            .iter()
            .filter(|backend| {
                (backend.ready || backend.serving) && seen.insert((backend.address, backend.port))
            })
            .map(|backend| Endpoint {
                backend,
                selectable: selectable(backend),
            })
            .collect()
    }
}
