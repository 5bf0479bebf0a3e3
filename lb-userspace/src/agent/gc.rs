//! What the agent cleans up behind the datapath: idle conntrack entries
//! (swept in bounded passes) and connected UDP sockets still talking to a
//! removed backend.

use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::{Agent, GC_BUDGET};
use crate::error_chain;
use crate::kernel::host;
use crate::kernel::maps::global_config;
use crate::model::Protocol;
use crate::reconcile;

/// How often, at most, the conntrack keys are walked to unlist ports.
const PORT_SCAN_PERIOD: Duration = Duration::from_secs(30);

impl Agent {
    pub(super) fn collect_garbage(&mut self) {
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
        self.unlist_unused_ports();
    }

    /// Ports listed in the port filter for services or backends that are
    /// gone are unlisted once no flow uses them: a full walk of the
    /// conntrack keys, at most once per `PORT_SCAN_PERIOD` and only while
    /// such ports exist. No reconcile runs meanwhile (one task), so a flow
    /// created during the walk is on a port the maps still need.
    fn unlist_unused_ports(&mut self) {
        if self.pending || !reconcile::ports_lingering(&self.applied) {
            return;
        }
        if self
            .ports_scanned
            .is_some_and(|last| last.elapsed() < PORT_SCAN_PERIOD)
        {
            return;
        }
        self.ports_scanned = Some(Instant::now());
        let in_use = match self.flows.ports_in_use() {
            Ok(Some(in_use)) => in_use,
            Ok(None) => return,
            Err(error) => {
                warn!("conntrack port scan failed: {}", error_chain(&error));
                return;
            }
        };
        let ops = reconcile::prune_ports(&self.applied, &in_use);
        if ops.is_empty() {
            return;
        }
        match reconcile::apply(&mut self.maps, &mut self.applied, &ops) {
            Ok(()) => info!(
                "port filter: ports of removed services unlisted, no flow uses them ({} word(s) \
                 rewritten)",
                ops.len()
            ),
            Err(error) => warn!("port filter: {}", error_chain(&error)),
        }
    }

    /// Connected UDP sockets the socket hooks balanced to a backend that is
    /// gone are destroyed (their next send or receive fails; a reconnect is
    /// balanced again), as Cilium's socket-LB does. Unconnected ones need
    /// nothing: sendmsg4 and sendmsg6 balance each datagram.
    pub(super) fn move_socket_clients(&mut self) {
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
}
