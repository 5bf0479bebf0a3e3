//! The reconciler's map vocabulary: the keys and values of the control
//! maps in the model's words (byte order and `#[repr(C)]` are the kernel
//! layer's), and `MapOp`, one write or delete in one map, with its rank in
//! the safe order.

use std::fmt;
use std::net::IpAddr;

use super::maglev::TableRecipe;
use crate::model::{BackendAddr, DesiredState, IpFamily, Protocol};

/// A frontend: the key of `XLB_SERVICES` (IPv4) or `XLB_SERVICES6`
/// (IPv6). A NodePort (`address: None`) answers on every node address of
/// its family; an exact frontend (load-balancer or external IP) on its own
/// address only, and wins over a NodePort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub protocol: Protocol,
    /// `address`'s family, or the NodePort's.
    pub family: IpFamily,
    pub address: Option<IpAddr>,
    pub port: u16,
}

impl Frontend {
    /// An IPv4 NodePort.
    pub const fn node_port(protocol: Protocol, port: u16) -> Self {
        Self::node_port_in(IpFamily::V4, protocol, port)
    }

    /// A NodePort on the node's addresses of `family`.
    pub const fn node_port_in(family: IpFamily, protocol: Protocol, port: u16) -> Self {
        Self {
            protocol,
            family,
            address: None,
            port,
        }
    }

    pub fn exact(protocol: Protocol, address: impl Into<IpAddr>, port: u16) -> Self {
        let address = address.into();
        Self {
            protocol,
            family: IpFamily::of(address),
            address: Some(address),
            port,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.address, self.family) {
            (None, IpFamily::V4) => write!(f, "{} {}", self.protocol, self.port),
            (None, IpFamily::V6) => write!(f, "{} {} (IPv6)", self.protocol, self.port),
            (Some(address), _) => write!(
                f,
                "{} {}",
                self.protocol,
                std::net::SocketAddr::new(address, self.port)
            ),
        }
    }
}

/// The value of a service's `XLB_SERVICES` entry (one per frontend; a
/// service's frontends share its id and table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub id: u32,
    /// Index of the service's table in `XLB_SELECT` (meaningless while
    /// `table_size` is 0).
    pub table_id: u32,
    /// Slots in the table; 0 means the service has no backend for new flows.
    pub table_size: u32,
    /// `lb_common::service::SERVICE_F_*`.
    pub flags: u32,
    /// sessionAffinity timeout (with `SERVICE_F_AFFINITY`), else 0.
    pub affinity_timeout_s: u32,
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
    pub network: IpAddr,
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
    pub udp_unassured_timeout_s: u32,
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
            udp_unassured_timeout_s: state
                .conntrack
                .udp_unassured_timeout_s
                .min(state.conntrack.udp_timeout_s),
        }
    }
}

/// One write or delete in one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// `XLB_NODE_ADDRS` (or `XLB_NODE_ADDRS6`): NodePorts answer on `0`.
    AddNodeAddress(IpAddr),
    RemoveNodeAddress(IpAddr),
    /// `XLB_IFACE_ADDRS` (or `XLB_IFADDRS6`): masquerade with `address`
    /// when leaving `ifindex` towards an address of its family.
    SetInterfaceAddress {
        ifindex: u32,
        address: IpAddr,
    },
    RemoveInterfaceAddress {
        ifindex: u32,
        family: IpFamily,
    },
    /// `XLB_BACKENDS[id]` (`XLB_BACKENDS6[id]` for an IPv6 backend),
    /// marked active (and terminating, if it is).
    WriteBackend {
        id: u32,
        backend: ActiveBackend,
    },
    /// The backend's entry zeroed (inactive) in its family's array; arrays
    /// cannot delete. The datapath re-balances the backend's flows on their
    /// next packet.
    ClearBackend {
        id: u32,
        family: IpFamily,
    },
    /// `XLB_SELECT[table]` = a new table built from `recipe`, swapped in
    /// whole: packets see the old table or the new one, never a mix.
    WriteTable {
        table: u32,
        recipe: TableRecipe,
    },
    /// `XLB_SELECT[table]` emptied (its table freed), once no service entry
    /// points at it.
    RemoveTable {
        table: u32,
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
    /// `XLB_PORTS[word]`: ports `64 * word ..` listed in the port filter.
    WritePorts {
        word: u16,
        bits: u64,
    },
    /// `XLB_PORTS[PORTS_ON]`: the bitmap is written, the datapath filters.
    PortFilterOn,
}

impl MapOp {
    /// Rank in the safe order; `diff` emits ops sorted by it.
    pub(super) const fn phase(&self) -> u8 {
        match self {
            MapOp::AddNodeAddress(_)
            | MapOp::SetInterfaceAddress { .. }
            | MapOp::WritePorts { .. }
            | MapOp::PortFilterOn => 0,
            MapOp::WriteBackend { .. } => 1,
            MapOp::WriteTable { .. } | MapOp::AddSourceRange(_) => 2,
            MapOp::WriteService { .. } => 3,
            MapOp::RemoveService { .. } => 4,
            MapOp::ClearBackend { .. }
            | MapOp::RemoveSourceRange(_)
            | MapOp::RemoveTable { .. } => 5,
            MapOp::RemoveNodeAddress(_) | MapOp::RemoveInterfaceAddress { .. } => 6,
            MapOp::WriteSettings(_) => 7,
        }
    }
}

/// Ops the kernel layer may write together (see `MapWriter::apply_run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    Backends,
    /// Each table is a map of its own, made and filled alone; they are
    /// swapped into `XLB_SELECT` together.
    Tables,
    /// Emptied together.
    TableRemovals,
    Services,
}

impl MapOp {
    /// The run this op can be part of, if any.
    pub const fn run_kind(&self) -> Option<RunKind> {
        match self {
            MapOp::WriteBackend { .. } => Some(RunKind::Backends),
            MapOp::WriteTable { .. } => Some(RunKind::Tables),
            MapOp::RemoveTable { .. } => Some(RunKind::TableRemovals),
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
            MapOp::RemoveInterfaceAddress { ifindex, family } => {
                write!(f, "forget the {family} address of ifindex {ifindex}")
            }
            MapOp::WriteBackend { id, backend } => {
                write!(f, "backend {id} = {}", backend.address)?;
                if backend.terminating {
                    f.write_str(" (terminating)")?;
                }
                Ok(())
            }
            MapOp::ClearBackend { id, family } => write!(f, "{family} backend {id} cleared"),
            MapOp::WriteTable { table, recipe } => {
                write!(f, "selection table {table} ({} slots)", recipe.size)
            }
            MapOp::RemoveTable { table } => write!(f, "selection table {table} removed"),
            MapOp::AddSourceRange(range) => write!(f, "allow {range}"),
            MapOp::RemoveSourceRange(range) => write!(f, "disallow {range}"),
            MapOp::WriteService {
                frontend,
                name,
                entry,
            } => write!(
                f,
                "service {name} ({frontend}) id {} -> table {} ({} slots) flags {:#x}",
                entry.id, entry.table_id, entry.table_size, entry.flags
            ),
            MapOp::RemoveService { frontend } => write!(f, "remove service {frontend}"),
            MapOp::WriteSettings(_) => write!(f, "global settings (ready)"),
            MapOp::WritePorts { word, bits } => write!(
                f,
                "port filter: {} port(s) of {}..{} listed",
                bits.count_ones(),
                u32::from(*word) * 64,
                u32::from(*word) * 64 + 63
            ),
            MapOp::PortFilterOn => write!(f, "port filter on"),
        }
    }
}
