//! The reconciler: turns "what the maps hold" and "what they should hold"
//! into an ordered list of map operations. Pure; the kernel layer executes
//! the operations and `Applied::record` keeps the mirror in step.
//!
//! Safe order (a packet never sees a service whose table or backends are not
//! written yet): node addresses, backends, selection tables (always into a
//! free region: double buffering), service entries, then deletions in
//! reverse (services, backends, addresses), and the global settings with the
//! ready flag last.

mod regions;
pub mod table;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

pub use table::build_table;

use crate::model::{Backend, DesiredState, Protocol};
use regions::Regions;

/// A frontend: the key of `XLB_SERVICES` (NodePorts answer on every node
/// address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub protocol: Protocol,
    pub node_port: u16,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.protocol, self.node_port)
    }
}

/// The value of a service's `XLB_SERVICES` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub id: u32,
    /// First slot of the service's region in `XLB_SELECT`.
    pub table_offset: u32,
    /// Slots in the region; 0 means the service has no backend.
    pub table_size: u32,
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

/// Node-wide datapath settings (`XLB_CONFIG[0]`). Writing them also marks
/// the configuration ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub masquerade_port_min: u16,
    pub masquerade_port_max: u16,
    pub hash_seed: u32,
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
            hash_seed: lb_common::GlobalConfig::DEFAULT.hash_seed,
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
    /// `XLB_BACKENDS[id]`, marked active.
    WriteBackend {
        id: u32,
        backend: BackendAddr,
    },
    /// `XLB_BACKENDS[id]` zeroed (inactive); arrays cannot delete.
    ClearBackend {
        id: u32,
    },
    /// `XLB_SELECT[offset..offset + backend_ids.len()]`.
    WriteTable {
        offset: u32,
        backend_ids: Vec<u32>,
    },
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
            MapOp::WriteTable { .. } => 2,
            MapOp::WriteService { .. } => 3,
            MapOp::RemoveService { .. } => 4,
            MapOp::ClearBackend { .. } => 5,
            MapOp::RemoveNodeAddress(_) | MapOp::RemoveInterfaceAddress { .. } => 6,
            MapOp::WriteSettings(_) => 7,
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
            MapOp::WriteBackend { id, backend } => write!(f, "backend {id} = {backend}"),
            MapOp::ClearBackend { id } => write!(f, "backend {id} cleared"),
            MapOp::WriteTable {
                offset,
                backend_ids,
            } => write!(
                f,
                "selection table at {offset}..{}",
                *offset as usize + backend_ids.len()
            ),
            MapOp::WriteService {
                frontend,
                name,
                entry,
            } => write!(
                f,
                "service {name} ({frontend}) id {} -> table {}+{}",
                entry.id, entry.table_offset, entry.table_size
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
        "XLB_SELECT has no free region of {slots} slots for {service} (capacity {capacity}); restart xlb to size it for the new config"
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub frontend: Frontend,
    /// `namespace/name`.
    pub name: String,
    /// Sorted by address, so reordering the config changes nothing.
    pub backends: Vec<(BackendAddr, u32)>,
}

impl Desired {
    pub fn new(state: &DesiredState, node: &NodeFacts) -> Self {
        let services = state
            .services
            .iter()
            .map(|service| {
                let mut backends: Vec<(BackendAddr, u32)> = service
                    .backends
                    .iter()
                    .map(|backend| (BackendAddr::from(backend), backend.weight))
                    .collect();
                backends.sort();
                DesiredService {
                    frontend: Frontend {
                        protocol: service.protocol,
                        node_port: service.node_port,
                    },
                    name: service.qualified_name(),
                    backends,
                }
            })
            .collect();
        let node_addresses = match &state.node_addresses {
            Some(listed) => listed.iter().copied().collect(),
            None => node.local_addresses.clone(),
        };
        Self {
            services,
            node_addresses,
            interface_addresses: node.interface_addresses.clone(),
            settings: Settings::from_state(state),
            table_size: state.table_size,
        }
    }
}

/// A service entry as last written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedService {
    pub name: String,
    pub entry: ServiceEntry,
}

/// Mirror of what xlb has written into the maps, updated op by op, so that a
/// failed apply leaves it exactly as true as the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: BTreeMap<Frontend, AppliedService>,
    /// Active backends by id.
    pub backends: BTreeMap<u32, BackendAddr>,
    /// Written selection regions by offset (some may be unreferenced).
    pub tables: BTreeMap<u32, Vec<u32>>,
    pub node_addresses: BTreeSet<Ipv4Addr>,
    pub interface_addresses: BTreeMap<u32, Ipv4Addr>,
    pub settings: Option<Settings>,
    /// Service ids are never reused within one agent's life, so a flow's
    /// `service_id` cannot come to mean another service.
    pub next_service_id: u32,
}

impl Applied {
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
            }
            MapOp::ClearBackend { id } => {
                self.backends.remove(id);
            }
            MapOp::WriteTable {
                offset,
                backend_ids,
            } => {
                let end = u64::from(*offset) + backend_ids.len() as u64;
                self.tables.retain(|&start, table| {
                    u64::from(start) >= end
                        || u64::from(start) + table.len() as u64 <= u64::from(*offset)
                });
                self.tables.insert(*offset, backend_ids.clone());
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
}

/// Executes map operations; the kernel layer writes BPF maps, tests use a
/// fake that checks the ordering invariants.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn apply(&mut self, op: &MapOp) -> Result<(), Self::Error>;
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
/// the first failure.
pub fn apply<W: MapWriter>(
    writer: &mut W,
    applied: &mut Applied,
    ops: &[MapOp],
) -> Result<(), ApplyError<W::Error>> {
    for (index, op) in ops.iter().enumerate() {
        writer.apply(op).map_err(|source| ApplyError {
            op: op.clone(),
            index: index + 1,
            total: ops.len(),
            source,
        })?;
        applied.record(op);
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

/// Ids for every desired backend: kept for those already written, the lowest
/// free ones (from 1; id 0 is never used) for new ones.
fn backends(
    applied: &Applied,
    desired: &Desired,
    capacity: &Capacity,
    ops: &mut Vec<MapOp>,
) -> Result<BTreeMap<BackendAddr, u32>, PlanError> {
    let wanted: BTreeSet<BackendAddr> = desired
        .services
        .iter()
        .flat_map(|service| service.backends.iter().map(|(backend, _)| *backend))
        .collect();
    let mut ids: BTreeMap<BackendAddr, u32> = applied
        .backends
        .iter()
        .filter(|(_, backend)| wanted.contains(backend))
        .map(|(&id, &backend)| (backend, id))
        .collect();
    let mut taken: BTreeSet<u32> = applied.backends.keys().copied().collect();
    let mut next_free = 1u32;
    for backend in &wanted {
        if ids.contains_key(backend) {
            continue;
        }
        while taken.contains(&next_free) {
            next_free += 1;
        }
        if next_free >= capacity.backends {
            return Err(PlanError::Full {
                map: lb_common::maps::BACKENDS,
                needed: taken.len() + 2,
                capacity: capacity.backends,
            });
        }
        taken.insert(next_free);
        ids.insert(*backend, next_free);
        ops.push(MapOp::WriteBackend {
            id: next_free,
            backend: *backend,
        });
    }
    for (&id, backend) in &applied.backends {
        if !wanted.contains(backend) {
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
        desired.services.len(),
        capacity.services,
    )?;
    let ids_by_name: BTreeMap<&str, u32> = applied
        .services
        .values()
        .map(|service| (service.name.as_str(), service.entry.id))
        .collect();
    let mut next_id = applied.next_service_id.max(1);
    let mut regions = Regions::new(
        capacity.select_slots,
        applied
            .services
            .values()
            .map(|service| (service.entry.table_offset, service.entry.table_size)),
    );
    for service in &desired.services {
        let id = match ids_by_name.get(service.name.as_str()) {
            Some(&id) => id,
            None => {
                let id = next_id;
                next_id += 1;
                id
            }
        };
        let weighted: Vec<(u32, u32)> = service
            .backends
            .iter()
            .filter_map(|(backend, weight)| backend_ids.get(backend).map(|&id| (id, *weight)))
            .collect();
        let table = build_table(&weighted, desired.table_size);
        // The region this service (under any frontend) already has, if its
        // content is exactly the new table.
        let reusable = applied
            .services
            .values()
            .filter(|current| current.name == service.name)
            .map(|current| current.entry)
            .find(|entry| applied.table_of(entry) == Some(table.as_slice()));
        let entry = match reusable {
            Some(entry) => ServiceEntry { id, ..entry },
            None if table.is_empty() => ServiceEntry {
                id,
                table_offset: 0,
                table_size: 0,
            },
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
                ServiceEntry {
                    id,
                    table_offset: offset,
                    table_size,
                }
            }
        };
        let current = applied.services.get(&service.frontend);
        let unchanged =
            current.is_some_and(|current| current.name == service.name && current.entry == entry);
        if !unchanged {
            ops.push(MapOp::WriteService {
                frontend: service.frontend,
                name: service.name.clone(),
                entry,
            });
        }
    }
    let frontends: BTreeSet<Frontend> = desired.services.iter().map(|s| s.frontend).collect();
    for frontend in applied.services.keys() {
        if !frontends.contains(frontend) {
            ops.push(MapOp::RemoveService {
                frontend: *frontend,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
