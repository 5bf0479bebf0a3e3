//! The planner: the ops that take the maps from the applied record to the
//! desired state, in safe order, or why they cannot (a map is full); and
//! the largest part that fits, for a cluster's services.

use std::collections::{BTreeMap, BTreeSet};

use super::applied::{Applied, TableSummary};
use super::desired::{Desired, DesiredService};
use super::maglev::{MaglevBackend, TableRecipe, identity};
use super::ops::{ActiveBackend, Frontend, MapOp, ServiceEntry, SourceRangeKey};
use crate::model::{BackendAddr, IpFamily, auto_table_size};

/// Sizes of the maps the plan must fit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    /// Indexes of `XLB_SELECT`: tables at once.
    pub tables: u32,
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
            tables: maps::TABLES_MAX,
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
    super::ports::grow(applied, desired, &mut ops);
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
    for (&key, &address) in &desired.interface_addresses {
        if applied.interface_addresses.get(&key) != Some(&address) {
            let (ifindex, _) = key;
            ops.push(MapOp::SetInterfaceAddress { ifindex, address });
        }
    }
    for &(ifindex, family) in applied.interface_addresses.keys() {
        if !desired.interface_addresses.contains_key(&(ifindex, family)) {
            ops.push(MapOp::RemoveInterfaceAddress { ifindex, family });
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
    let mut free = FreeIds::new(applied, capacity.backends);
    for (address, &terminating) in &wanted {
        if ids.contains_key(address) {
            continue;
        }
        let id = match applied.kept.backends.get(address) {
            Some(&id) if free.take_kept(id) => id,
            _ => free.take()?,
        };
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
            let family = IpFamily::of(active.address.address);
            ops.push(MapOp::ClearBackend { id, family });
        }
    }
    Ok(ids)
}

/// `XLB_BACKENDS` ids for new backends, in the order [`backends`] says.
struct FreeIds<'a> {
    taken: BTreeSet<u32>,
    /// Kept ids given out (see `KeptIds`).
    kept_used: BTreeSet<u32>,
    capacity: u32,
    /// The next id never used before.
    fresh: u32,
    freed: std::collections::vec_deque::Iter<'a, u32>,
    /// Where the search for any free id goes on.
    lowest: u32,
}

impl<'a> FreeIds<'a> {
    fn new(applied: &'a Applied, capacity: u32) -> Self {
        // Kept ids are not given to other backends.
        let kept = applied.kept.backends.values();
        Self {
            taken: applied.backends.keys().chain(kept).copied().collect(),
            kept_used: BTreeSet::new(),
            capacity,
            fresh: applied.next_backend_id.max(1),
            freed: applied.freed_backend_ids.iter(),
            lowest: 1,
        }
    }

    /// Whether kept id `id` (reserved in `taken`) may be used: it is in
    /// range and no other backend took it.
    fn take_kept(&mut self, id: u32) -> bool {
        id != 0 && id < self.capacity && self.kept_used.insert(id)
    }

    fn take(&mut self) -> Result<u32, PlanError> {
        while self.fresh < self.capacity && self.taken.contains(&self.fresh) {
            self.fresh += 1;
        }
        let id = if self.fresh < self.capacity {
            self.fresh += 1;
            Some(self.fresh - 1)
        } else {
            let (taken, capacity) = (&self.taken, self.capacity);
            self.freed
                .by_ref()
                .copied()
                .find(|id| !taken.contains(id) && *id < capacity)
        };
        let id = match id {
            Some(id) => id,
            None => {
                while self.taken.contains(&self.lowest) {
                    self.lowest += 1;
                }
                self.lowest
            }
        };
        if id >= self.capacity || self.taken.contains(&id) {
            return Err(PlanError::Full {
                map: lb_common::maps::BACKENDS,
                needed: self.taken.len() + 2,
                capacity: self.capacity,
            });
        }
        self.taken.insert(id);
        Ok(id)
    }
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
    let sizing = TableSizing {
        size: desired.table_size,
        auto: desired.table_size_auto,
    };
    let mut planner = ServicePlanner::new(applied, capacity, backend_ids, sizing);
    for service in &desired.services {
        planner.plan(service, ops)?;
    }
    planner.tables.remove_unkept(ops);
    let wanted_ranges = planner.wanted_ranges;
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

/// What [`services`] carries from one desired service to the next.
struct ServicePlanner<'a> {
    applied: &'a Applied,
    backend_ids: &'a BTreeMap<BackendAddr, u32>,
    table_sizing: TableSizing,
    ids_by_name: BTreeMap<&'a str, u32>,
    /// Kept service ids given out (see `KeptIds`).
    kept_used: BTreeSet<u32>,
    /// Every entry written under each name, in frontend order.
    entries_by_name: BTreeMap<&'a str, Vec<ServiceEntry>>,
    next_id: u32,
    tables: TableIds,
    wanted_ranges: BTreeSet<SourceRangeKey>,
    /// A frontend two services claim (sources validate this; a bug must not
    /// make every plan rewrite it) belongs to the first.
    claimed: BTreeSet<Frontend>,
}

impl<'a> ServicePlanner<'a> {
    fn new(
        applied: &'a Applied,
        capacity: &'a Capacity,
        backend_ids: &'a BTreeMap<BackendAddr, u32>,
        table_sizing: TableSizing,
    ) -> Self {
        let ids_by_name = applied
            .services
            .values()
            .filter(|service| !service.name.is_empty())
            .map(|service| (service.name.as_str(), service.entry.id))
            .collect();
        let mut entries_by_name: BTreeMap<&str, Vec<ServiceEntry>> = BTreeMap::new();
        for current in applied.services.values() {
            entries_by_name
                .entry(current.name.as_str())
                .or_default()
                .push(current.entry);
        }
        Self {
            applied,
            backend_ids,
            table_sizing,
            ids_by_name,
            kept_used: BTreeSet::new(),
            entries_by_name,
            next_id: applied.next_service_id.max(1),
            tables: TableIds::new(applied, capacity.tables),
            wanted_ranges: BTreeSet::new(),
            claimed: BTreeSet::new(),
        }
    }

    /// The ops for `service`'s table and entries; its source ranges go to
    /// `wanted_ranges`.
    fn plan(&mut self, service: &DesiredService, ops: &mut Vec<MapOp>) -> Result<(), PlanError> {
        let frontends: Vec<(Frontend, u32)> = service
            .frontends
            .iter()
            .copied()
            .filter(|(frontend, _)| self.claimed.insert(*frontend))
            .collect();
        if frontends.is_empty() {
            // Nothing can reach it: no table, no id.
            return Ok(());
        }
        let kept = frontends
            .iter()
            .find_map(|(frontend, _)| self.applied.kept.services.get(frontend))
            .filter(|&&id| self.kept_used.insert(id));
        let id = match (self.ids_by_name.get(service.name.as_str()), kept) {
            (Some(&id), _) | (None, Some(&id)) => id,
            (None, None) => {
                let id = self.next_id;
                self.next_id += 1;
                id
            }
        };
        let (table_id, table_size) = self.table(service, ops)?;
        for (frontend, flags) in frontends {
            let entry = ServiceEntry {
                id,
                table_id,
                table_size,
                flags,
                affinity_timeout_s: service.affinity_timeout_s,
            };
            let current = self.applied.services.get(&frontend);
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
        self.wanted_ranges
            .extend(
                service
                    .source_ranges
                    .iter()
                    .map(|&(network, prefix_len)| SourceRangeKey {
                        service_id: id,
                        network,
                        prefix_len,
                    }),
            );
        Ok(())
    }

    /// `(table_id, table_size)` of `service`'s table: the one it already
    /// has if that holds exactly the new table; else a new table swapped
    /// into the same index when the size is the same (entries need not
    /// change), or into a free index when it differs (the entries move to
    /// it, so no packet pairs a table with another table's size).
    fn table(
        &mut self,
        service: &DesiredService,
        ops: &mut Vec<MapOp>,
    ) -> Result<(u32, u32), PlanError> {
        let recipe = table_for(service, self.backend_ids, self.table_sizing);
        let current: Vec<ServiceEntry> = self
            .entries_by_name
            .get(service.name.as_str())
            .into_iter()
            .flatten()
            .copied()
            .filter(|entry| entry.table_size > 0)
            .collect();
        if recipe.is_empty() {
            return Ok((0, 0));
        }
        let table_size = recipe.size;
        let summary = TableSummary::of(&recipe);
        let reusable = current
            .iter()
            .find(|entry| self.applied.table_of(entry) == Some(&summary));
        if let Some(entry) = reusable {
            self.tables.keep(entry.table_id);
            return Ok((entry.table_id, entry.table_size));
        }
        let same_size = current.iter().find(|entry| entry.table_size == table_size);
        let table_id = match same_size {
            Some(entry) => entry.table_id,
            None => self.tables.take()?,
        };
        self.tables.keep(table_id);
        ops.push(MapOp::WriteTable {
            table: table_id,
            recipe,
        });
        Ok((table_id, table_size))
    }
}

/// Indexes of `XLB_SELECT` for [`ServicePlanner::table`]: a new table goes
/// to the lowest index nothing in the applied record uses (so never to one
/// an entry still points at until a later op moves it), and the tables no
/// planned entry keeps are removed after the entries stop pointing at them.
struct TableIds {
    /// Indexes holding a table or named by an applied entry (adopted
    /// entries' tables are not in the mirror).
    applied: BTreeSet<u32>,
    /// `applied` and the indexes given out by this plan.
    taken: BTreeSet<u32>,
    /// Indexes the planned entries point at.
    kept: BTreeSet<u32>,
    capacity: u32,
    /// Where the search for a free index goes on.
    lowest: u32,
}

impl TableIds {
    fn new(applied: &Applied, capacity: u32) -> Self {
        let referenced = applied
            .services
            .values()
            .filter(|service| service.entry.table_size > 0)
            .map(|service| service.entry.table_id);
        let applied: BTreeSet<u32> = applied.tables.keys().copied().chain(referenced).collect();
        Self {
            taken: applied.clone(),
            applied,
            kept: BTreeSet::new(),
            capacity,
            lowest: 0,
        }
    }

    fn keep(&mut self, table_id: u32) {
        self.kept.insert(table_id);
    }

    fn take(&mut self) -> Result<u32, PlanError> {
        while self.taken.contains(&self.lowest) {
            self.lowest += 1;
        }
        if self.lowest >= self.capacity {
            return Err(PlanError::Full {
                map: lb_common::maps::SELECT,
                needed: self.taken.len() + 1,
                capacity: self.capacity,
            });
        }
        self.taken.insert(self.lowest);
        Ok(self.lowest)
    }

    /// `RemoveTable` for every applied table no planned entry keeps.
    fn remove_unkept(&self, ops: &mut Vec<MapOp>) {
        for &table in self.applied.difference(&self.kept) {
            ops.push(MapOp::RemoveTable { table });
        }
    }
}

/// How big a service's table is: `size` slots, or with `auto` sized by
/// its backends up to `size` (`model::auto_table_size`).
#[derive(Clone, Copy, Debug)]
struct TableSizing {
    size: u32,
    auto: bool,
}

/// The recipe of the Maglev table of a service's selectable backends.
fn table_for(
    service: &DesiredService,
    backend_ids: &BTreeMap<BackendAddr, u32>,
    sizing: TableSizing,
) -> TableRecipe {
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
    let size = if sizing.auto {
        let weights = weighted
            .iter()
            .map(|backend| u64::from(backend.weight))
            .sum();
        auto_table_size(weighted.len(), weights, sizing.size)
    } else {
        sizing.size
    };
    TableRecipe::new(size, weighted)
}
