//! What the maps should hold: the desired state with the node's facts
//! resolved, one `DesiredService` per table (a service whose traffic
//! policies differ has two), frontends refused where they would take over
//! the node's own ports. Which backends take new flows is the model's
//! rule (`model::backends_for`); the flags here say it to the datapath.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use lb_common::service::{
    SERVICE_F_AFFINITY, SERVICE_F_DROP_IF_EMPTY, SERVICE_F_MASQUERADE, SERVICE_F_SOURCE_RANGES,
};

use super::ops::{Frontend, Settings};
use crate::model::{
    DesiredBackend, DesiredState, IpFamily, Service, TrafficPolicy, backends_for, desired_backends,
    network_of,
};

/// Facts about the node that the config does not say, read on each
/// reconcile by the kernel layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Every address of the node but loopback and IPv6 link-local ones
    /// (used when the config lists none).
    pub local_addresses: BTreeSet<IpAddr>,
    /// Each interface's first address of each family (IPv6: global
    /// scope), by (ifindex, family).
    pub interface_addresses: BTreeMap<(u32, IpFamily), IpAddr>,
}

/// What the datapath should see: the config plus the node facts it refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub services: Vec<DesiredService>,
    pub node_addresses: BTreeSet<IpAddr>,
    pub interface_addresses: BTreeMap<(u32, IpFamily), IpAddr>,
    pub settings: Settings,
    /// Slots of each table, or at most this many when `table_size_auto`.
    pub table_size: u32,
    pub table_size_auto: bool,
    /// Frontends left out because they are addresses of this node.
    pub refused: Vec<RefusedFrontend>,
}

/// A load-balancer IP or externalIP that is an address of this node and
/// not in `node.allowedFrontendAddresses`: it is not written, so the
/// service cannot take over the node's own ports there.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RefusedFrontend {
    pub service: String,
    pub address: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for RefusedFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "service {}: frontend {} refused: {} is an address of this node, and a service \
             there would take over the node's own port {}; list it in \
             node.allowedFrontendAddresses if that is intended",
            self.service,
            std::net::SocketAddr::new(self.address, self.port),
            self.address,
            self.port
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name`.
    pub name: String,
    /// Every frontend with the `SERVICE_F_*` flags of its entry.
    pub frontends: Vec<(Frontend, u32)>,
    pub affinity_timeout_s: u32,
    /// Backends to keep active, sorted by address so reordering the config
    /// changes nothing.
    pub backends: Vec<DesiredBackend>,
    /// loadBalancerSourceRanges of the service's family, host bits
    /// cleared, sorted, unique.
    pub source_ranges: Vec<(IpAddr, u8)>,
}

impl DesiredService {
    /// The service's entries: its NodePort and exact frontends, and its
    /// ClusterIPs with them when both traffic policies choose the same
    /// backends. Otherwise the ClusterIPs get their own table (and id),
    /// under `namespace/name (cluster IP)`.
    /// `hijacks(address)`: whether a load-balancer IP or externalIP on
    /// `address` would take over the node's own ports (such frontends go to
    /// `refused` instead).
    ///
    /// A service of both families has this for each: the IPv6 entries'
    /// tables hold its IPv6 backends, under `namespace/name (IPv6)`.
    fn for_service(
        service: &Service,
        hijacks: &impl Fn(IpAddr) -> bool,
        refused: &mut Vec<RefusedFrontend>,
    ) -> Vec<Self> {
        let families = service.families();
        let dual = families.len() > 1;
        let mut all = Vec::with_capacity(families.len());
        for family in families {
            let view = service.of_family(family);
            let mut services = Self::for_family(&view, family, service, hijacks, refused);
            if dual && family == IpFamily::V6 {
                for desired in &mut services {
                    desired.name.push_str(" (IPv6)");
                }
            }
            all.extend(services);
        }
        all
    }

    /// [`Self::for_service`] for one family: `service` is the family's
    /// view of `whole`.
    fn for_family(
        service: &Service,
        family: IpFamily,
        whole: &Service,
        hijacks: &impl Fn(IpAddr) -> bool,
        refused: &mut Vec<RefusedFrontend>,
    ) -> Vec<Self> {
        let mut external = Self::external(service, family, whole, hijacks, refused);
        let cluster: Vec<(Frontend, u32)> = service
            .cluster_ips
            .iter()
            .map(|&address| {
                let frontend = Frontend::exact(service.protocol, address, service.port);
                (frontend, cluster_ip_flags(service))
            })
            .collect();
        if cluster.is_empty() {
            return vec![external];
        }
        if service.internal_traffic_policy == service.external_traffic_policy {
            external.frontends.extend(cluster);
            external.frontends.sort_unstable();
            external.frontends.dedup_by_key(|(frontend, _)| *frontend);
            return vec![external];
        }
        let mut frontends = cluster;
        frontends.sort_unstable();
        frontends.dedup_by_key(|(frontend, _)| *frontend);
        let name = if external.frontends.is_empty() {
            service.qualified_name()
        } else {
            format!("{} (cluster IP)", service.qualified_name())
        };
        let internal = Self {
            name,
            frontends,
            affinity_timeout_s: external.affinity_timeout_s,
            backends: backends_for(service, service.internal_traffic_policy),
            source_ranges: Vec::new(),
        };
        if external.frontends.is_empty() {
            vec![internal]
        } else {
            vec![external, internal]
        }
    }

    /// `whole`'s source ranges guard every family's frontends: a family
    /// none of them is of gets no source at all, never every source.
    fn external(
        service: &Service,
        family: IpFamily,
        whole: &Service,
        hijacks: &impl Fn(IpAddr) -> bool,
        refused: &mut Vec<RefusedFrontend>,
    ) -> Self {
        let protocol = service.protocol;
        let local = service.external_traffic_policy == TrafficPolicy::Local;
        let mut flags = if local {
            SERVICE_F_DROP_IF_EMPTY
        } else {
            SERVICE_F_MASQUERADE
        };
        if service.session_affinity_timeout.is_some() {
            flags |= SERVICE_F_AFFINITY;
        }
        let mut source_ranges: Vec<(IpAddr, u8)> = service
            .source_ranges
            .iter()
            .map(|&(address, len)| (network_of(address, len), len.min(family.bits())))
            .collect();
        source_ranges.sort_unstable();
        source_ranges.dedup();
        // As kube-proxy, ranges guard the load-balancer addresses and leave
        // the NodePort open; a service with nothing but a NodePort is
        // guarded there, or its ranges would mean nothing.
        let mut exact: Vec<Frontend> = Vec::with_capacity(service.frontends.len());
        for &address in &service.frontends {
            if hijacks(address) {
                refused.push(RefusedFrontend {
                    service: service.qualified_name(),
                    address,
                    port: service.port,
                });
            } else {
                exact.push(Frontend::exact(protocol, address, service.port));
            }
        }
        let ranged = if whole.source_ranges.is_empty() {
            0
        } else {
            SERVICE_F_SOURCE_RANGES
        };
        let mut frontends = Vec::with_capacity(exact.len() + 1);
        if service.node_port != 0 {
            let guard = if exact.is_empty() { ranged } else { 0 };
            frontends.push((
                Frontend::node_port_in(family, protocol, service.node_port),
                flags | guard,
            ));
        }
        frontends.extend(exact.into_iter().map(|frontend| (frontend, flags | ranged)));
        frontends.sort_unstable();
        frontends.dedup_by_key(|(frontend, _)| *frontend);
        Self {
            name: service.qualified_name(),
            frontends,
            affinity_timeout_s: service.session_affinity_timeout.unwrap_or(0),
            backends: desired_backends(service),
            source_ranges,
        }
    }
}

/// Flags of a ClusterIP's entry. A ClusterIP is reached through the socket
/// hooks by clients on this node; packets that still arrive addressed to
/// it (from outside the node) are masqueraded, as kube-proxy does for
/// sources outside the cluster. Source ranges never apply.
fn cluster_ip_flags(service: &Service) -> u32 {
    let mut flags = SERVICE_F_MASQUERADE;
    if service.internal_traffic_policy == TrafficPolicy::Local {
        flags |= SERVICE_F_DROP_IF_EMPTY;
    }
    if service.session_affinity_timeout.is_some() {
        flags |= SERVICE_F_AFFINITY;
    }
    flags
}

impl Desired {
    /// The same node settings with no service.
    pub(super) fn clone_without_services(&self) -> Self {
        Self {
            services: Vec::new(),
            node_addresses: self.node_addresses.clone(),
            interface_addresses: self.interface_addresses.clone(),
            settings: self.settings,
            table_size: self.table_size,
            table_size_auto: self.table_size_auto,
            refused: Vec::new(),
        }
    }

    pub fn new(state: &DesiredState, node: &NodeFacts) -> Self {
        let node_addresses = match &state.node_addresses {
            Some(listed) => listed.iter().copied().collect(),
            None => node.local_addresses.clone(),
        };
        let hijacks = |address: IpAddr| {
            (address.is_loopback() || node.local_addresses.contains(&address))
                && !state.allowed_frontend_addresses.contains(&address)
        };
        let mut refused = Vec::new();
        let services = state
            .services
            .iter()
            .flat_map(|service| DesiredService::for_service(service, &hijacks, &mut refused))
            .collect();
        Self {
            services,
            node_addresses,
            interface_addresses: node.interface_addresses.clone(),
            settings: Settings::from_state(state),
            table_size: state.table_size,
            table_size_auto: state.table_size_auto,
            refused,
        }
    }
}
