//! The applied record: a mirror of what xlb has written into the maps,
//! updated op by op, read back from pinned maps after a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::desired::Desired;
use super::ops::{ActiveBackend, Frontend, MapOp, ServiceEntry, Settings, SourceRangeKey};
use super::ports::PortSet;
use super::slots::TableSlots;
use crate::model::{BackendAddr, Protocol};

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
    pub tables: BTreeMap<u32, TableSlots>,
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
    /// `XLB_PORTS`' bitmap as written.
    pub ports: PortSet,
    /// `XLB_PORTS[PORTS_ON]` is set.
    pub port_filter: bool,
}

impl Applied {
    /// [`Applied::record`], taking a written selection table's slots from
    /// `op` rather than copying them (10,000 tables of 251 slots are 10 MB,
    /// freed as the mirror records them): `op` keeps an empty table.
    pub fn record_taking(&mut self, op: &mut MapOp) {
        match op {
            MapOp::WriteTable {
                offset,
                backend_ids,
            } => self.record_table(*offset, &std::mem::take(backend_ids)),
            op => self.record(op),
        }
    }

    fn record_table(&mut self, offset: u32, backend_ids: &[u32]) {
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
        self.tables.insert(offset, TableSlots::new(backend_ids));
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
            } => self.record_table(*offset, backend_ids),
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
            MapOp::WritePorts { word, bits } => self.ports.set_word(usize::from(*word), *bits),
            MapOp::PortFilterOn => self.port_filter = true,
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
                .flat_map(TableSlots::backend_ids)
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

    /// The table a service entry currently points at (`None` for an
    /// entry without one, or whose table is not what it says).
    fn table_of(&self, entry: &ServiceEntry) -> Option<&TableSlots> {
        self.tables
            .get(&entry.table_offset)
            .filter(|table| entry.table_size > 0 && table.len() == entry.table_size as usize)
    }

    /// Whether a service entry points at a table holding exactly
    /// `backend_ids` (an entry without a table holds none).
    pub(super) fn table_holds(&self, entry: &ServiceEntry, backend_ids: &[u32]) -> bool {
        if entry.table_size == 0 {
            return backend_ids.is_empty();
        }
        self.table_of(entry)
            .is_some_and(|table| table.holds(backend_ids))
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
