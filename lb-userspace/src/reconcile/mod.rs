//! The reconciler: turns "what the maps hold" and "what they should hold"
//! into an ordered list of map operations. Pure; the kernel layer executes
//! the operations and `Applied::record` keeps the mirror in step. Also the
//! service semantics the datapath leaves to the agent (which backends new
//! flows may use, service flags) and the Maglev table builder.
//!
//! Safe order (a packet never sees a service whose table or backends are not
//! written yet): node addresses, backends, selection tables (always into a
//! free region: double buffering) and newly allowed source ranges, service
//! entries, then deletions in reverse (services, then backends, which the
//! datapath re-balances flows away from on their next packet, and source
//! ranges no entry checks any more, then addresses), and the global settings
//! with the ready flag last.

pub mod maglev;
mod regions;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use lb_common::service::{
    SERVICE_F_AFFINITY, SERVICE_F_DROP_IF_EMPTY, SERVICE_F_MASQUERADE, SERVICE_F_SOURCE_RANGES,
};

use crate::model::{Backend, DesiredState, Protocol, Service, TrafficPolicy};
use maglev::{MaglevBackend, identity, maglev_table};
use regions::Regions;

/// A frontend: the key of `XLB_SERVICES`. A NodePort (`address: None`)
/// answers on every node address; an exact frontend (load-balancer or
/// external IP) on its own address only, and wins over a NodePort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub protocol: Protocol,
    pub address: Option<Ipv4Addr>,
    pub port: u16,
}

impl Frontend {
    pub const fn node_port(protocol: Protocol, port: u16) -> Self {
        Self {
            protocol,
            address: None,
            port,
        }
    }

    pub const fn exact(protocol: Protocol, address: Ipv4Addr, port: u16) -> Self {
        Self {
            protocol,
            address: Some(address),
            port,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            None => write!(f, "{} {}", self.protocol, self.port),
            Some(address) => write!(f, "{} {address}:{}", self.protocol, self.port),
        }
    }
}

/// The value of a service's `XLB_SERVICES` entry (one per frontend; a
/// service's frontends share its id and table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub id: u32,
    /// First slot of the service's region in `XLB_SELECT`.
    pub table_offset: u32,
    /// Slots in the region; 0 means the service has no backend for new flows.
    pub table_size: u32,
    /// `lb_common::service::SERVICE_F_*`.
    pub flags: u32,
    /// sessionAffinity timeout (with `SERVICE_F_AFFINITY`), else 0.
    pub affinity_timeout_s: u32,
}

/// A backend as `XLB_BACKENDS` knows it: where to send, not how much.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub address: Ipv4Addr,
    pub port: u16,
}

impl From<&Backend> for BackendAddr {
    fn from(backend: &Backend) -> Self {
        Self {
            address: backend.address,
            port: backend.port,
        }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.address, self.port)
    }
}

/// A written (active) `XLB_BACKENDS` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ActiveBackend {
    pub address: BackendAddr,
    /// `BACKEND_F_TERMINATING`: keeps its flows, but session affinity sends
    /// no new flow to it.
    pub terminating: bool,
}

/// One `XLB_SOURCE_RANGES` entry: sources in `network/prefix_len` may open
/// flows to service `service_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRangeKey {
    pub service_id: u32,
    /// Host bits are zero.
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl fmt::Display for SourceRangeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service {} source {}/{}",
            self.service_id, self.network, self.prefix_len
        )
    }
}

/// `address/prefix_len` with the host bits cleared.
pub fn network_of(address: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let mask = match prefix_len {
        0 => 0,
        len => u32::MAX << (32 - u32::from(len.min(32))),
    };
    Ipv4Addr::from(u32::from(address) & mask)
}

/// Node-wide datapath settings (`XLB_CONFIG[0]`). Writing them also marks
/// the configuration ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub masquerade_port_min: u16,
    pub masquerade_port_max: u16,
    /// The flow hash's 64-bit secret. Not part of the config: the agent
    /// sets it (from `--hash-seed-file`, or random) after `Desired::new`.
    pub hash_seed: u64,
    pub tcp_syn_timeout_s: u32,
    pub tcp_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub udp_timeout_s: u32,
}

impl Settings {
    pub fn from_state(state: &DesiredState) -> Self {
        Self {
            masquerade_port_min: *state.masquerade_ports.start(),
            masquerade_port_max: *state.masquerade_ports.end(),
            hash_seed: u64::from(lb_common::GlobalConfig::DEFAULT.hash_seed),
            tcp_syn_timeout_s: state.conntrack.tcp_syn_timeout_s,
            tcp_timeout_s: state.conntrack.tcp_timeout_s,
            tcp_closing_timeout_s: state.conntrack.tcp_closing_timeout_s,
            udp_timeout_s: state.conntrack.udp_timeout_s,
        }
    }
}

/// One write or delete in one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// `XLB_NODE_ADDRS`: NodePorts answer on `0`.
    AddNodeAddress(Ipv4Addr),
    RemoveNodeAddress(Ipv4Addr),
    /// `XLB_IFACE_ADDRS`: masquerade with `address` when leaving `ifindex`.
    SetInterfaceAddress {
        ifindex: u32,
        address: Ipv4Addr,
    },
    RemoveInterfaceAddress {
        ifindex: u32,
    },
    /// `XLB_BACKENDS[id]`, marked active (and terminating, if it is).
    WriteBackend {
        id: u32,
        backend: ActiveBackend,
    },
    /// `XLB_BACKENDS[id]` zeroed (inactive); arrays cannot delete. The
    /// datapath re-balances the backend's flows on their next packet.
    ClearBackend {
        id: u32,
    },
    /// `XLB_SELECT[offset..offset + backend_ids.len()]`.
    WriteTable {
        offset: u32,
        backend_ids: Vec<u32>,
    },
    /// `XLB_SOURCE_RANGES`: allow a prefix (written before the service entry
    /// that turns the check on).
    AddSourceRange(SourceRangeKey),
    /// Removed after the service entry stopped needing it.
    RemoveSourceRange(SourceRangeKey),
    /// `XLB_SERVICES[frontend]`; `name` is for the mirror and logs only.
    WriteService {
        frontend: Frontend,
        name: String,
        entry: ServiceEntry,
    },
    RemoveService {
        frontend: Frontend,
    },
    /// `XLB_CONFIG[0]`, with the ready flag set.
    WriteSettings(Settings),
}

impl MapOp {
    /// Rank in the safe order; `diff` emits ops sorted by it.
    const fn phase(&self) -> u8 {
        match self {
            MapOp::AddNodeAddress(_) | MapOp::SetInterfaceAddress { .. } => 0,
            MapOp::WriteBackend { .. } => 1,
            MapOp::WriteTable { .. } | MapOp::AddSourceRange(_) => 2,
            MapOp::WriteService { .. } => 3,
            MapOp::RemoveService { .. } => 4,
            MapOp::ClearBackend { .. } | MapOp::RemoveSourceRange(_) => 5,
            MapOp::RemoveNodeAddress(_) | MapOp::RemoveInterfaceAddress { .. } => 6,
            MapOp::WriteSettings(_) => 7,
        }
    }
}

/// Ops the kernel layer may write together (see `MapWriter::apply_run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    Backends,
    Tables,
    Services,
}

impl MapOp {
    /// The run this op can be part of, if any.
    pub const fn run_kind(&self) -> Option<RunKind> {
        match self {
            MapOp::WriteBackend { .. } => Some(RunKind::Backends),
            MapOp::WriteTable { .. } => Some(RunKind::Tables),
            MapOp::WriteService { .. } => Some(RunKind::Services),
            _ => None,
        }
    }
}

impl fmt::Display for MapOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapOp::AddNodeAddress(address) => write!(f, "add node address {address}"),
            MapOp::RemoveNodeAddress(address) => write!(f, "remove node address {address}"),
            MapOp::SetInterfaceAddress { ifindex, address } => {
                write!(f, "masquerade as {address} on ifindex {ifindex}")
            }
            MapOp::RemoveInterfaceAddress { ifindex } => {
                write!(f, "forget the address of ifindex {ifindex}")
            }
            MapOp::WriteBackend { id, backend } => {
                write!(f, "backend {id} = {}", backend.address)?;
                if backend.terminating {
                    f.write_str(" (terminating)")?;
                }
                Ok(())
            }
            MapOp::ClearBackend { id } => write!(f, "backend {id} cleared"),
            MapOp::WriteTable {
                offset,
                backend_ids,
            } => write!(
                f,
                "selection table at {offset}..{}",
                *offset as usize + backend_ids.len()
            ),
            MapOp::AddSourceRange(range) => write!(f, "allow {range}"),
            MapOp::RemoveSourceRange(range) => write!(f, "disallow {range}"),
            MapOp::WriteService {
                frontend,
                name,
                entry,
            } => write!(
                f,
                "service {name} ({frontend}) id {} -> table {}+{} flags {:#x}",
                entry.id, entry.table_offset, entry.table_size, entry.flags
            ),
            MapOp::RemoveService { frontend } => write!(f, "remove service {frontend}"),
            MapOp::WriteSettings(_) => write!(f, "global settings (ready)"),
        }
    }
}

/// Facts about the node that the config does not say, read on each
/// reconcile by the kernel layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Every non-loopback IPv4 address of the node (used when the config
    /// lists none).
    pub local_addresses: BTreeSet<Ipv4Addr>,
    /// Each interface's first IPv4 address, by ifindex.
    pub interface_addresses: BTreeMap<u32, Ipv4Addr>,
}

/// Sizes of the maps the plan must fit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    pub select_slots: u32,
    pub node_addresses: u32,
    pub interface_addresses: u32,
    pub source_ranges: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        use lb_common::maps;
        Self {
            services: maps::SERVICES_MAX,
            backends: maps::BACKENDS_MAX,
            select_slots: maps::SELECT_MAX,
            node_addresses: maps::NODE_ADDRS_MAX,
            interface_addresses: maps::IFACE_ADDRS_MAX,
            source_ranges: maps::SOURCE_RANGES_MAX,
        }
    }
}

/// Why a desired state cannot be written into maps of this size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "{map} is full: {needed} entries needed, room for {capacity}; reduce the config or restart xlb with larger maps"
    )]
    Full {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error(
        "XLB_SELECT has no free region of {slots} slots for {service} (capacity {capacity}); lower selection.tableSize, or restart xlb to size the map for the new config"
    )]
    NoRegion {
        service: String,
        slots: usize,
        capacity: u32,
    },
}

/// What the datapath should see: the config plus the node facts it refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub services: Vec<DesiredService>,
    pub node_addresses: BTreeSet<Ipv4Addr>,
    pub interface_addresses: BTreeMap<u32, Ipv4Addr>,
    pub settings: Settings,
    pub table_size: u32,
    /// Frontends left out because they are addresses of this node.
    pub refused: Vec<RefusedFrontend>,
}

/// A load-balancer IP or externalIP that is an address of this node and
/// not in `node.allowedFrontendAddresses`: it is not written, so the
/// service cannot take over the node's own ports there.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RefusedFrontend {
    pub service: String,
    pub address: Ipv4Addr,
    pub port: u16,
}

impl std::fmt::Display for RefusedFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "service {}: frontend {}:{} refused: {} is an address of this node, and a service \
             there would take over the node's own port {}; list it in \
             node.allowedFrontendAddresses if that is intended",
            self.service, self.address, self.port, self.address, self.port
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
    /// loadBalancerSourceRanges, host bits cleared, sorted, unique.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
}

/// A backend the datapath keeps active for a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DesiredBackend {
    pub address: BackendAddr,
    pub weight: u32,
    pub terminating: bool,
    /// New flows may be sent to it (it has slots in the selection table).
    pub selectable: bool,
}

impl DesiredService {
    /// The service's entries: its NodePort and exact frontends, and its
    /// ClusterIPs with them when both traffic policies choose the same
    /// backends. Otherwise the ClusterIPs get their own table (and id),
    /// under `namespace/name (cluster IP)`.
    /// `hijacks(address)`: whether a load-balancer IP or externalIP on
    /// `address` would take over the node's own ports (such frontends go to
    /// `refused` instead).
    fn for_service(
        service: &Service,
        hijacks: impl Fn(Ipv4Addr) -> bool,
        refused: &mut Vec<RefusedFrontend>,
    ) -> Vec<Self> {
        let mut external = Self::external(service, hijacks, refused);
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

    fn external(
        service: &Service,
        hijacks: impl Fn(Ipv4Addr) -> bool,
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
        let mut source_ranges: Vec<(Ipv4Addr, u8)> = service
            .source_ranges
            .iter()
            .map(|&(address, len)| (network_of(address, len), len.min(32)))
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
        let ranged = if source_ranges.is_empty() {
            0
        } else {
            SERVICE_F_SOURCE_RANGES
        };
        let mut frontends = Vec::with_capacity(exact.len() + 1);
        if service.node_port != 0 {
            let guard = if exact.is_empty() { ranged } else { 0 };
            frontends.push((
                Frontend::node_port(protocol, service.node_port),
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

/// kube-proxy's endpoint rules for the service's external frontends
/// (`externalTrafficPolicy`); see `backends_for`.
pub fn desired_backends(service: &Service) -> Vec<DesiredBackend> {
    backends_for(service, service.external_traffic_policy)
}

/// kube-proxy's endpoint rules under `policy`. Kept active: every backend that is ready
/// or serving (a terminating one keeps its flows). Selectable for new
/// flows: the ready ones (with externalTrafficPolicy=Local, the local ready
/// ones); when there is none, the serving terminating ones. Weight 0 takes
/// no new flow.
fn backends_for(service: &Service, policy: TrafficPolicy) -> Vec<DesiredBackend> {
    let eligible = |backend: &Backend| {
        backend.weight > 0 && (policy == TrafficPolicy::Cluster || backend.is_local)
    };
    let any_ready = service.backends.iter().any(|b| b.ready && eligible(b));
    let selectable = |backend: &Backend| {
        eligible(backend)
            && if any_ready {
                backend.ready
            } else {
                backend.serving && backend.terminating
            }
    };
    let mut backends: Vec<DesiredBackend> = Vec::with_capacity(service.backends.len());
    let mut seen = BTreeSet::new();
    for backend in &service.backends {
        let address = BackendAddr::from(backend);
        if !(backend.ready || backend.serving) || !seen.insert(address) {
            continue;
        }
        backends.push(DesiredBackend {
            address,
            weight: backend.weight,
            terminating: backend.terminating,
            selectable: selectable(backend),
        });
    }
    backends.sort_unstable();
    backends
}

impl Desired {
    /// The same node settings with no service.
    fn clone_without_services(&self) -> Self {
        Self {
            services: Vec::new(),
            node_addresses: self.node_addresses.clone(),
            interface_addresses: self.interface_addresses.clone(),
            settings: self.settings,
            table_size: self.table_size,
            refused: Vec::new(),
        }
    }

    pub fn new(state: &DesiredState, node: &NodeFacts) -> Self {
        let node_addresses = match &state.node_addresses {
            Some(listed) => listed.iter().copied().collect(),
            None => node.local_addresses.clone(),
        };
        let hijacks = |address: Ipv4Addr| {
            (address.is_loopback() || node.local_addresses.contains(&address))
                && !state.allowed_frontend_addresses.contains(&address)
        };
        let mut refused = Vec::new();
        let services = state
            .services
            .iter()
            .flat_map(|service| DesiredService::for_service(service, hijacks, &mut refused))
            .collect();
        Self {
            services,
            node_addresses,
            interface_addresses: node.interface_addresses.clone(),
            settings: Settings::from_state(state),
            table_size: state.table_size,
            refused,
        }
    }
}

/// A service entry as last written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedService {
    /// `namespace/name`; empty for an entry adopted from pinned maps that no
    /// desired service has claimed yet (see `Applied::adopt_names`).
    pub name: String,
    pub entry: ServiceEntry,
}

/// Mirror of what xlb has written into the maps, updated op by op, so that a
/// failed apply leaves it exactly as true as the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: BTreeMap<Frontend, AppliedService>,
    /// Active backends by id.
    pub backends: BTreeMap<u32, ActiveBackend>,
    /// Written selection regions by offset (some may be unreferenced).
    pub tables: BTreeMap<u32, Vec<u32>>,
    pub source_ranges: BTreeSet<SourceRangeKey>,
    pub node_addresses: BTreeSet<Ipv4Addr>,
    pub interface_addresses: BTreeMap<u32, Ipv4Addr>,
    pub settings: Option<Settings>,
    /// Service ids are never reused within one agent's life, so a flow's
    /// `service_id` cannot come to mean another service.
    pub next_service_id: u32,
    /// Backend ids never used yet start here. New backends take these
    /// first; freed ids are reused only once they run out, oldest first, so
    /// an id that flows or affinity records may still name comes back as
    /// late as possible (and those check the address and port anyway).
    pub next_backend_id: u32,
    /// Cleared backend ids, in the order they were freed.
    pub freed_backend_ids: std::collections::VecDeque<u32>,
}

impl Applied {
    /// [`Applied::record`], moving a written selection table's slots from
    /// `op` into the mirror rather than copying them (10,000 tables of 251
    /// slots are 10 MB): `op` keeps an empty table.
    pub fn record_taking(&mut self, op: &mut MapOp) {
        match op {
            MapOp::WriteTable {
                offset,
                backend_ids,
            } => self.record_table(*offset, std::mem::take(backend_ids)),
            op => self.record(op),
        }
    }

    fn record_table(&mut self, offset: u32, backend_ids: Vec<u32>) {
        // Written regions never overlap: those the new one covers are the
        // last one starting before it and the ones starting inside it.
        let start = u64::from(offset);
        let end = start + backend_ids.len() as u64;
        let covered: Vec<u32> = self
            .tables
            .range(..=u32::try_from(end.saturating_sub(1)).unwrap_or(u32::MAX))
            .rev()
            .take_while(|&(&other, table)| u64::from(other) + table.len() as u64 > start)
            .filter(|&(&other, _)| u64::from(other) < end)
            .map(|(&other, _)| other)
            .collect();
        for other in covered {
            self.tables.remove(&other);
        }
        self.tables.insert(offset, backend_ids);
    }

    /// Updates the mirror after `op` succeeded in the kernel.
    pub fn record(&mut self, op: &MapOp) {
        match op {
            MapOp::AddNodeAddress(address) => {
                self.node_addresses.insert(*address);
            }
            MapOp::RemoveNodeAddress(address) => {
                self.node_addresses.remove(address);
            }
            MapOp::SetInterfaceAddress { ifindex, address } => {
                self.interface_addresses.insert(*ifindex, *address);
            }
            MapOp::RemoveInterfaceAddress { ifindex } => {
                self.interface_addresses.remove(ifindex);
            }
            MapOp::WriteBackend { id, backend } => {
                self.backends.insert(*id, *backend);
                self.next_backend_id = self.next_backend_id.max(id.saturating_add(1));
            }
            MapOp::ClearBackend { id } => {
                if self.backends.remove(id).is_some() {
                    self.freed_backend_ids.push_back(*id);
                }
            }
            MapOp::WriteTable {
                offset,
                backend_ids,
            } => self.record_table(*offset, backend_ids.clone()),
            MapOp::AddSourceRange(range) => {
                self.source_ranges.insert(*range);
            }
            MapOp::RemoveSourceRange(range) => {
                self.source_ranges.remove(range);
            }
            MapOp::WriteService {
                frontend,
                name,
                entry,
            } => {
                let old = self.services.insert(
                    *frontend,
                    AppliedService {
                        name: name.clone(),
                        entry: *entry,
                    },
                );
                self.next_service_id = self.next_service_id.max(entry.id.saturating_add(1));
                if let Some(old) = old {
                    self.forget_unreferenced(old.entry.table_offset);
                }
            }
            MapOp::RemoveService { frontend } => {
                if let Some(old) = self.services.remove(frontend) {
                    self.forget_unreferenced(old.entry.table_offset);
                }
            }
            MapOp::WriteSettings(settings) => self.settings = Some(*settings),
        }
    }

    /// Whether a socket the socket hooks balanced to `backend` through
    /// service `service_id` may keep talking to it: the backend still has
    /// slots in one of the service's tables, or is terminating (it keeps its
    /// flows). A service that is gone keeps nothing.
    pub fn socket_keeps_backend(&self, service_id: u32, backend: BackendAddr) -> bool {
        let terminating = self
            .backends
            .values()
            .any(|active| active.address == backend && active.terminating);
        terminating
            || self
                .services
                .values()
                .filter(|service| service.entry.id == service_id)
                .filter_map(|service| self.table_of(&service.entry))
                .flatten()
                .any(|id| {
                    self.backends
                        .get(id)
                        .is_some_and(|active| active.address == backend)
                })
    }

    /// The protocol of service `service_id`, while it exists.
    pub fn service_protocol(&self, service_id: u32) -> Option<Protocol> {
        self.services
            .iter()
            .find(|(_, service)| service.entry.id == service_id)
            .map(|(frontend, _)| frontend.protocol)
    }

    fn forget_unreferenced(&mut self, offset: u32) {
        let referenced = self
            .services
            .values()
            .any(|service| service.entry.table_size > 0 && service.entry.table_offset == offset);
        if !referenced {
            self.tables.remove(&offset);
        }
    }

    /// The table a service entry currently points at.
    fn table_of(&self, entry: &ServiceEntry) -> Option<&[u32]> {
        if entry.table_size == 0 {
            return Some(&[]);
        }
        self.tables
            .get(&entry.table_offset)
            .filter(|table| table.len() == entry.table_size as usize)
            .map(Vec::as_slice)
    }

    /// After adopting maps a previous agent wrote (which hold no names),
    /// gives each unnamed entry the name of the desired service that has
    /// its frontend, so the service keeps its id, its table and therefore
    /// its flows. Entries no desired service claims stay unnamed and are
    /// removed by the next `diff`.
    pub fn adopt_names(&mut self, desired: &Desired) {
        let owners: BTreeMap<Frontend, &str> = desired
            .services
            .iter()
            .flat_map(|service| {
                service
                    .frontends
                    .iter()
                    .map(|(frontend, _)| (*frontend, service.name.as_str()))
            })
            .collect();
        // An id belongs to one name: the first frontend that claims it wins.
        let mut names_by_id: BTreeMap<u32, String> = BTreeMap::new();
        for (frontend, service) in &self.services {
            if service.name.is_empty()
                && let Some(owner) = owners.get(frontend)
            {
                names_by_id
                    .entry(service.entry.id)
                    .or_insert_with(|| (*owner).to_owned());
            }
        }
        for (frontend, service) in &mut self.services {
            if !service.name.is_empty() {
                continue;
            }
            if let Some(name) = names_by_id.get(&service.entry.id)
                && owners.get(frontend).is_some_and(|owner| owner == name)
            {
                service.name.clone_from(name);
            }
        }
    }
}

/// Executes map operations; the kernel layer writes BPF maps, tests use a
/// fake that checks the ordering invariants.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn apply(&mut self, op: &MapOp) -> Result<(), Self::Error>;

    /// Applies a run of ops of one [`MapOp::run_kind`] (one map, one
    /// phase), in order, as if by `apply` one after the other: the kernel
    /// layer writes a run with one batch call where it can. On failure,
    /// returns how many ops of the run were completely written first.
    fn apply_run(&mut self, ops: &[MapOp]) -> Result<(), (usize, Self::Error)> {
        for (index, op) in ops.iter().enumerate() {
            self.apply(op).map_err(|error| (index, error))?;
        }
        Ok(())
    }
}

/// An op the kernel refused; everything before it is written and recorded.
#[derive(Debug, thiserror::Error)]
#[error("applying \"{op}\" failed (op {index} of {total})")]
pub struct ApplyError<E: std::error::Error + 'static> {
    pub op: MapOp,
    pub index: usize,
    pub total: usize,
    #[source]
    pub source: E,
}

/// Applies `ops` in order, recording each success in `applied`; stops at
/// the first failure. Consecutive ops of one kind go to the writer as one
/// run (`MapWriter::apply_run`): they are of one phase and one map, so
/// writing them together keeps the safe order.
pub fn apply<W: MapWriter>(
    writer: &mut W,
    applied: &mut Applied,
    ops: &[MapOp],
) -> Result<(), ApplyError<W::Error>> {
    apply_taking(writer, applied, &mut ops.to_vec())
}

/// [`apply`], moving written selection tables into `applied` (see
/// [`Applied::record_taking`]): ops that were applied keep empty tables.
pub fn apply_taking<W: MapWriter>(
    writer: &mut W,
    applied: &mut Applied,
    ops: &mut [MapOp],
) -> Result<(), ApplyError<W::Error>> {
    let mut start = 0;
    while start < ops.len() {
        let kind = ops[start].run_kind();
        let len = match kind {
            Some(kind) => ops[start..]
                .iter()
                .take_while(|op| op.run_kind() == Some(kind))
                .count(),
            None => 1,
        };
        let run = &ops[start..start + len];
        let outcome = if len == 1 {
            writer.apply(&run[0]).map_err(|error| (0, error))
        } else {
            writer.apply_run(run)
        };
        let written = match &outcome {
            Ok(()) => len,
            Err((written, _)) => (*written).min(len),
        };
        for op in &mut ops[start..start + written] {
            applied.record_taking(op);
        }
        if let Err((_, source)) = outcome {
            let index = start + written;
            return Err(ApplyError {
                op: ops[index.min(ops.len() - 1)].clone(),
                index: index + 1,
                total: ops.len(),
                source,
            });
        }
        start += len;
    }
    Ok(())
}

/// The ops that take the maps from `applied` to `desired`, in safe order.
/// Empty when nothing changed.
pub fn diff(
    applied: &Applied,
    desired: &Desired,
    capacity: &Capacity,
) -> Result<Vec<MapOp>, PlanError> {
    let mut ops = Vec::new();
    addresses(applied, desired, capacity, &mut ops)?;
    let backend_ids = backends(applied, desired, capacity, &mut ops)?;
    services(applied, desired, capacity, &backend_ids, &mut ops)?;
    if applied.settings != Some(desired.settings) {
        ops.push(MapOp::WriteSettings(desired.settings));
    }
    // Each helper emits in the right order within its maps; a stable sort by
    // phase interleaves them safely.
    ops.sort_by_key(MapOp::phase);
    Ok(ops)
}

/// What [`diff_fitting`] planned.
#[derive(Debug)]
pub struct Fitted {
    pub ops: Vec<MapOp>,
    /// Services left out (`namespace/name`), and why the whole did not fit.
    pub skipped: Vec<String>,
    pub why: Option<PlanError>,
}

/// [`diff`] for as much of `desired` as fits: when the whole does not, its
/// services are taken in order (those already written first, so a new
/// service cannot push out one that serves, then by name) and the longest
/// run that fits is planned. An error only if not even the node's settings
/// alone fit.
pub fn diff_fitting(
    applied: &Applied,
    desired: &Desired,
    capacity: &Capacity,
) -> Result<Fitted, PlanError> {
    let why = match diff(applied, desired, capacity) {
        Ok(ops) => {
            return Ok(Fitted {
                ops,
                skipped: Vec::new(),
                why: None,
            });
        }
        Err(error) => error,
    };
    let written: BTreeSet<&str> = applied
        .services
        .values()
        .map(|service| service.name.as_str())
        .collect();
    let mut order: Vec<&DesiredService> = desired.services.iter().collect();
    order.sort_by_key(|service| (!written.contains(service.name.as_str()), &service.name));
    let part = |count: usize| Desired {
        services: order[..count]
            .iter()
            .map(|&service| service.clone())
            .collect(),
        ..desired.clone_without_services()
    };
    // Fewer services never need more room: find the largest count that fits.
    let (mut fits, mut fails) = (0, order.len());
    let mut ops = diff(applied, &part(0), capacity)?;
    while fails - fits > 1 {
        let middle = fits + (fails - fits) / 2;
        match diff(applied, &part(middle), capacity) {
            Ok(planned) => (fits, ops) = (middle, planned),
            Err(_) => fails = middle,
        }
    }
    Ok(Fitted {
        ops,
        skipped: order[fits..]
            .iter()
            .map(|service| service.name.clone())
            .collect(),
        why: Some(why),
    })
}

fn addresses(
    applied: &Applied,
    desired: &Desired,
    capacity: &Capacity,
    ops: &mut Vec<MapOp>,
) -> Result<(), PlanError> {
    check_fits(
        lb_common::maps::NODE_ADDRS,
        desired.node_addresses.len(),
        capacity.node_addresses,
    )?;
    check_fits(
        lb_common::maps::IFACE_ADDRS,
        desired.interface_addresses.len(),
        capacity.interface_addresses,
    )?;
    for address in desired.node_addresses.difference(&applied.node_addresses) {
        ops.push(MapOp::AddNodeAddress(*address));
    }
    for address in applied.node_addresses.difference(&desired.node_addresses) {
        ops.push(MapOp::RemoveNodeAddress(*address));
    }
    for (&ifindex, &address) in &desired.interface_addresses {
        if applied.interface_addresses.get(&ifindex) != Some(&address) {
            ops.push(MapOp::SetInterfaceAddress { ifindex, address });
        }
    }
    for ifindex in applied.interface_addresses.keys() {
        if !desired.interface_addresses.contains_key(ifindex) {
            ops.push(MapOp::RemoveInterfaceAddress { ifindex: *ifindex });
        }
    }
    Ok(())
}

fn check_fits(map: &'static str, needed: usize, capacity: u32) -> Result<(), PlanError> {
    if needed > capacity as usize {
        return Err(PlanError::Full {
            map,
            needed,
            capacity,
        });
    }
    Ok(())
}

/// Ids for every desired backend: kept for those already written; for new
/// ones, ids never used before (from 1; id 0 is never used), then freed ids
/// oldest first, then any free one. A backend several
/// services share is terminating only if every one of them says so (its
/// flag only stops session affinity from choosing it).
fn backends(
    applied: &Applied,
    desired: &Desired,
    capacity: &Capacity,
    ops: &mut Vec<MapOp>,
) -> Result<BTreeMap<BackendAddr, u32>, PlanError> {
    let mut wanted: BTreeMap<BackendAddr, bool> = BTreeMap::new();
    for backend in desired.services.iter().flat_map(|s| &s.backends) {
        let terminating = wanted.entry(backend.address).or_insert(true);
        *terminating &= backend.terminating;
    }
    let mut ids: BTreeMap<BackendAddr, u32> = BTreeMap::new();
    for (&id, active) in &applied.backends {
        let Some(&terminating) = wanted.get(&active.address) else {
            continue;
        };
        ids.insert(active.address, id);
        if active.terminating != terminating {
            ops.push(MapOp::WriteBackend {
                id,
                backend: ActiveBackend {
                    address: active.address,
                    terminating,
                },
            });
        }
    }
    let mut taken: BTreeSet<u32> = applied.backends.keys().copied().collect();
    let mut fresh = applied.next_backend_id.max(1);
    let mut freed = applied.freed_backend_ids.iter().copied();
    let mut lowest = 1u32;
    for (address, &terminating) in &wanted {
        if ids.contains_key(address) {
            continue;
        }
        while fresh < capacity.backends && taken.contains(&fresh) {
            fresh += 1;
        }
        let id = if fresh < capacity.backends {
            fresh += 1;
            Some(fresh - 1)
        } else {
            freed
                .by_ref()
                .find(|id| !taken.contains(id) && *id < capacity.backends)
        };
        let id = match id {
            Some(id) => id,
            None => {
                while taken.contains(&lowest) {
                    lowest += 1;
                }
                lowest
            }
        };
        if id >= capacity.backends || taken.contains(&id) {
            return Err(PlanError::Full {
                map: lb_common::maps::BACKENDS,
                needed: taken.len() + 2,
                capacity: capacity.backends,
            });
        }
        taken.insert(id);
        ids.insert(*address, id);
        ops.push(MapOp::WriteBackend {
            id,
            backend: ActiveBackend {
                address: *address,
                terminating,
            },
        });
    }
    for (&id, active) in &applied.backends {
        if !wanted.contains_key(&active.address) {
            ops.push(MapOp::ClearBackend { id });
        }
    }
    Ok(ids)
}

fn services(
    applied: &Applied,
    desired: &Desired,
    capacity: &Capacity,
    backend_ids: &BTreeMap<BackendAddr, u32>,
    ops: &mut Vec<MapOp>,
) -> Result<(), PlanError> {
    check_fits(
        lb_common::maps::SERVICES,
        desired.services.iter().map(|s| s.frontends.len()).sum(),
        capacity.services,
    )?;
    let ids_by_name: BTreeMap<&str, u32> = applied
        .services
        .values()
        .filter(|service| !service.name.is_empty())
        .map(|service| (service.name.as_str(), service.entry.id))
        .collect();
    // Every entry written under each name, in frontend order.
    let mut entries_by_name: BTreeMap<&str, Vec<ServiceEntry>> = BTreeMap::new();
    for current in applied.services.values() {
        entries_by_name
            .entry(current.name.as_str())
            .or_default()
            .push(current.entry);
    }
    let mut next_id = applied.next_service_id.max(1);
    let mut regions = Regions::new(
        capacity.select_slots,
        applied
            .services
            .values()
            .map(|service| (service.entry.table_offset, service.entry.table_size)),
    );
    let mut wanted_ranges: BTreeSet<SourceRangeKey> = BTreeSet::new();
    // A frontend two services claim (sources validate this; a bug must not
    // make every plan rewrite it) belongs to the first.
    let mut claimed: BTreeSet<Frontend> = BTreeSet::new();
    for service in &desired.services {
        let frontends: Vec<(Frontend, u32)> = service
            .frontends
            .iter()
            .copied()
            .filter(|(frontend, _)| claimed.insert(*frontend))
            .collect();
        if frontends.is_empty() {
            // Nothing can reach it: no table, no id.
            continue;
        }
        let id = match ids_by_name.get(service.name.as_str()) {
            Some(&id) => id,
            None => {
                let id = next_id;
                next_id += 1;
                id
            }
        };
        let table = table_for(service, backend_ids, desired.table_size);
        // The region this service (under any frontend) already has, if its
        // content is exactly the new table.
        let reusable = entries_by_name
            .get(service.name.as_str())
            .into_iter()
            .flatten()
            .copied()
            .find(|entry| applied.table_of(entry) == Some(table.as_slice()));
        let (table_offset, table_size) = match reusable {
            Some(entry) => (entry.table_offset, entry.table_size),
            None if table.is_empty() => (0, 0),
            None => {
                let Some(offset) = regions.allocate(table.len() as u32) else {
                    return Err(PlanError::NoRegion {
                        service: service.name.clone(),
                        slots: table.len(),
                        capacity: capacity.select_slots,
                    });
                };
                let table_size = table.len() as u32;
                ops.push(MapOp::WriteTable {
                    offset,
                    backend_ids: table,
                });
                (offset, table_size)
            }
        };
        for (frontend, flags) in frontends {
            let entry = ServiceEntry {
                id,
                table_offset,
                table_size,
                flags,
                affinity_timeout_s: service.affinity_timeout_s,
            };
            let current = applied.services.get(&frontend);
            let unchanged = current
                .is_some_and(|current| current.name == service.name && current.entry == entry);
            if !unchanged {
                ops.push(MapOp::WriteService {
                    frontend,
                    name: service.name.clone(),
                    entry,
                });
            }
        }
        wanted_ranges.extend(service.source_ranges.iter().map(|&(network, prefix_len)| {
            SourceRangeKey {
                service_id: id,
                network,
                prefix_len,
            }
        }));
    }
    check_fits(
        lb_common::maps::SOURCE_RANGES,
        wanted_ranges.len(),
        capacity.source_ranges,
    )?;
    let frontends: BTreeSet<Frontend> = desired
        .services
        .iter()
        .flat_map(|s| s.frontends.iter().map(|(frontend, _)| *frontend))
        .collect();
    for frontend in applied.services.keys() {
        if !frontends.contains(frontend) {
            ops.push(MapOp::RemoveService {
                frontend: *frontend,
            });
        }
    }
    // Ranges a service gains are written before the entry that checks them,
    // and ranges it loses go after: for a moment the union is allowed,
    // never less than either config allows.
    for range in wanted_ranges.difference(&applied.source_ranges) {
        ops.push(MapOp::AddSourceRange(*range));
    }
    for range in applied.source_ranges.difference(&wanted_ranges) {
        ops.push(MapOp::RemoveSourceRange(*range));
    }
    Ok(())
}

/// The Maglev table of a service's selectable backends.
fn table_for(
    service: &DesiredService,
    backend_ids: &BTreeMap<BackendAddr, u32>,
    size: u32,
) -> Vec<u32> {
    let weighted: Vec<MaglevBackend> = service
        .backends
        .iter()
        .filter(|backend| backend.selectable)
        .filter_map(|backend| {
            backend_ids.get(&backend.address).map(|&id| MaglevBackend {
                id,
                weight: backend.weight,
                identity: identity(backend.address.address, backend.address.port),
            })
        })
        .collect();
    maglev_table(&weighted, size)
}

#[cfg(test)]
mod tests;
