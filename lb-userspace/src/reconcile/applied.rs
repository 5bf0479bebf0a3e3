//! The applied record: a mirror of what xlb has written into the maps,
//! updated op by op, read back from pinned maps after a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::desired::Desired;
use super::maglev::TableRecipe;
use super::ops::{ActiveBackend, Frontend, MapOp, ServiceEntry, Settings, SourceRangeKey};
use super::ports::PortSet;
use crate::model::{BackendAddr, IpFamily, Protocol};

/// A service entry as last written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedService {
    /// `namespace/name`; empty for an entry adopted from pinned maps that no
    /// desired service has claimed yet (see `Applied::adopt_names`).
    pub name: String,
    pub entry: ServiceEntry,
}

/// What the mirror keeps of a written selection table: enough to tell
/// whether a planned table is the same and which backends it names, not
/// its slots (10,000 tables of 16381 slots would be 655 MB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSummary {
    pub slots: u32,
    /// [`TableRecipe::digest`] of what built it.
    pub digest: u64,
    /// The backends it was built from (each has weight; one whose weight is
    /// tiny beside the others' may have got no slot in a fixed-size table).
    pub backend_ids: BTreeSet<u32>,
}

impl TableSummary {
    pub fn of(recipe: &TableRecipe) -> Self {
        Self {
            slots: recipe.size,
            digest: recipe.digest(),
            backend_ids: recipe.backends.iter().map(|backend| backend.id).collect(),
        }
    }
}

/// Ids a previous agent gave backends and frontends in configuration maps
/// that this agent could not adopt because it made them at other sizes
/// (the maps grew): the plan gives the same backends and services the same
/// ids again, so flows (which name their backend by id and check its
/// address) and session affinity records keep working, and the same
/// recipes build the same tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeptIds {
    pub backends: BTreeMap<BackendAddr, u32>,
    /// By frontend: service names are not in the maps.
    pub services: BTreeMap<Frontend, u32>,
}

impl KeptIds {
    /// An empty mirror (of maps just made) whose plans reuse `self`'s ids.
    pub fn into_applied(self) -> Applied {
        let next_backend_id = self.backends.values().max().map_or(1, |id| id + 1);
        let next_service_id = self.services.values().max().map_or(1, |id| id + 1);
        Applied {
            next_backend_id,
            next_service_id,
            kept: self,
            ..Applied::default()
        }
    }
}

/// Mirror of what xlb has written into the maps, updated op by op, so that a
/// failed apply leaves it exactly as true as the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: BTreeMap<Frontend, AppliedService>,
    /// Active backends by id.
    pub backends: BTreeMap<u32, ActiveBackend>,
    /// Written selection tables by index in `XLB_SELECT` (after a failed
    /// apply, some may be unreferenced: the next plan removes them). Empty
    /// after adopting pinned maps (their tables are not read back): the
    /// first plan rewrites each in place.
    pub tables: BTreeMap<u32, TableSummary>,
    pub source_ranges: BTreeSet<SourceRangeKey>,
    pub node_addresses: BTreeSet<IpAddr>,
    /// Masquerade addresses by (ifindex, family).
    pub interface_addresses: BTreeMap<(u32, IpFamily), IpAddr>,
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
    /// Ids to give backends and services the mirror does not have yet (see
    /// [`KeptIds`]); emptied once a plan has been applied in full.
    pub kept: KeptIds,
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
                (self.interface_addresses).insert((*ifindex, IpFamily::of(*address)), *address);
            }
            MapOp::RemoveInterfaceAddress { ifindex, family } => {
                self.interface_addresses.remove(&(*ifindex, *family));
            }
            MapOp::WriteBackend { id, backend } => {
                self.backends.insert(*id, *backend);
                self.next_backend_id = self.next_backend_id.max(id.saturating_add(1));
            }
            MapOp::ClearBackend { id, .. } => {
                if self.backends.remove(id).is_some() {
                    self.freed_backend_ids.push_back(*id);
                }
            }
            MapOp::WriteTable { table, recipe } => {
                self.tables.insert(*table, TableSummary::of(recipe));
            }
            MapOp::RemoveTable { table } => {
                self.tables.remove(table);
            }
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
                self.services.insert(
                    *frontend,
                    AppliedService {
                        name: name.clone(),
                        entry: *entry,
                    },
                );
                self.next_service_id = self.next_service_id.max(entry.id.saturating_add(1));
            }
            MapOp::RemoveService { frontend } => {
                self.services.remove(frontend);
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
        let in_table = |table: &TableSummary| {
            table.backend_ids.iter().any(|id| {
                self.backends
                    .get(id)
                    .is_some_and(|active| active.address == backend)
            })
        };
        terminating
            || self
                .services
                .values()
                .filter(|service| service.entry.id == service_id)
                // A table adopted and not yet rewritten: nothing is known
                // to be gone.
                .filter(|service| service.entry.table_size > 0)
                .any(|service| self.table_of(&service.entry).is_none_or(in_table))
    }

    /// The protocol of service `service_id`, while it exists.
    pub fn service_protocol(&self, service_id: u32) -> Option<Protocol> {
        self.services
            .iter()
            .find(|(_, service)| service.entry.id == service_id)
            .map(|(frontend, _)| frontend.protocol)
    }

    /// The table a service entry with a table (`table_size` > 0) currently
    /// points at, as far as the mirror knows it.
    pub(super) fn table_of(&self, entry: &ServiceEntry) -> Option<&TableSummary> {
        self.tables
            .get(&entry.table_id)
            .filter(|table| table.slots == entry.table_size)
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
