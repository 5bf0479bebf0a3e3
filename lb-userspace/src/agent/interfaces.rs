//! Where the datapath is attached: XDP and the tc hand-off on the uplinks
//! (configured, or found from the node's addresses and default routes),
//! the pod/tunnel tc program on every veth and tunnel, the socket hooks on
//! a cgroup; and the node's primary address for masquerading.

use std::net::IpAddr;

use log::{error, info, warn};

use super::{Agent, AgentError, LINK_SCAN};
use crate::error_chain;
use crate::kernel::{
    LinkKind, TcRole, host,
    linkwatch::LinkWatch,
    uplinks::{self, Uplink},
};
use crate::model::{DesiredState, IpFamily};
use crate::reconcile::NodeFacts;

/// `XLB_IFACE_ADDRS` key of the masquerade address for egress interfaces
/// without an address of their own (the datapath's fallback).
pub(super) const DEFAULT_MASQUERADE_IFINDEX: u32 = 0;

/// The node's primary address of `family`, used to masquerade towards pods
/// behind address-less interfaces (a routed CNI's veths, as Calico makes
/// them): the first listed node address of the family this node has, else
/// the first address of the family of the first uplink that has one.
pub(super) fn default_masquerade_address(
    state: &DesiredState,
    uplinks: &[Uplink],
    facts: &NodeFacts,
    family: IpFamily,
) -> Option<IpAddr> {
    if let Some(listed) = &state.node_addresses
        && let Some(address) = listed.iter().find(|address| {
            IpFamily::of(**address) == family && facts.local_addresses.contains(address)
        })
    {
        return Some(*address);
    }
    uplinks
        .iter()
        .filter_map(|uplink| host::ifindex(&uplink.name))
        .find_map(|ifindex| facts.interface_addresses.get(&(ifindex, family)).copied())
}

/// The uplinks for `state`: the configured interfaces (`--iface` or
/// `node.interfaces`), else those [`uplinks::detect`] finds from the node's
/// addresses (the config's `node.addresses`, or the Node's InternalIP) and
/// default routes.
pub(super) fn choose_uplinks(
    state: &DesiredState,
    from_flag: bool,
) -> Result<Vec<Uplink>, AgentError> {
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
    let addresses = host::addresses().map_err(|source| AgentError::Host { source })?;
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
pub(super) async fn next_link_event(watch: Option<&LinkWatch>) {
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

impl Agent {
    /// With `--cgroup`, the socket hooks; without, a previous agent's
    /// pinned ones are removed.
    pub(super) fn attach_sockets(&mut self) -> Result<(), AgentError> {
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

    pub(super) fn uplink_names(&self) -> Vec<String> {
        self.uplinks
            .iter()
            .map(|uplink| uplink.name.clone())
            .collect()
    }

    /// Chooses the uplinks again (the config's, or those the node's
    /// addresses and default routes give); attaches to new ones and
    /// detaches from those that are no longer uplinks.
    pub(super) fn sync_interfaces(&mut self) {
        match choose_uplinks(
            &self.config.state,
            !self.file.overrides().interfaces.is_empty(),
        ) {
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

    /// Puts the pod/tunnel tc program on every veth and tunnel device that
    /// is not an uplink (XDP runs there), and forgets devices that are gone
    /// or were made again under the same name. Runs at every link event
    /// (rtnetlink), so a pod's veth has its program milliseconds after it
    /// is made, before the pod can answer anything; listing the devices
    /// costs one `ip` run.
    pub(super) fn sync_pod_hooks(&mut self) {
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
}
