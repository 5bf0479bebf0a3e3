//! Writing the reconciler's `MapOp`s: one op at a time, or a run of one
//! kind with one batch call; selection tables made whole, filled through a
//! shared mapping and swapped into `XLB_SELECT`.

use aya::Pod;
use aya::maps::{Array, IterableMap as _, MapData, MapError};
use lb_common::maps as names;
use lb_common::{Backend, Backend6, NodeAddr, V4, V6};

use super::convert::{
    MapFamily, backend_value, global_config, service_key, service_value, source_range_key,
};
use super::{KernelMaps, MapIoError, absent_ok, io};
use crate::kernel::sys;
use crate::model::IpFamily;
use crate::reconcile::maglev::TableRecipe;
use crate::reconcile::{Frontend, MapOp, MapWriter, RunKind, SourceRangeKey};

/// Writes `keys[i] = values[i]` in order with one `BPF_MAP_UPDATE_BATCH`
/// call (BPF_ANY). On failure, returns how many pairs were written first.
///
/// `K` and `V` must have the map's key and value sizes: callers pass an aya
/// map typed with exactly `K` and `V` (aya checked the sizes when the map
/// was typed).
fn update_batch<K: Pod, V: Pod>(
    map: &MapData,
    name: &'static str,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, MapIoError)> {
    use std::os::fd::AsFd as _;
    sys::bpf_map_update_batch(map.fd().as_fd(), keys, values).map_err(|(written, io_error)| {
        (
            written,
            MapIoError {
                map: name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error,
                }),
            },
        )
    })
}

/// Tables swapped into `XLB_SELECT` by one batch call, at most. The kernel
/// waits for an RCU grace period (about 12 ms here) after each update of a
/// map of maps, so that no program still runs with the old table when the
/// call returns; since Linux 6.7 once per batch call rather than per
/// element: 10,000 tables one by one took 145 s, by 256 a call 0.49 s.
/// Bounded by the descriptors held open meanwhile (one per new table, see
/// [`tables_per_batch`]) and the memory of the tables made but not yet
/// swapped in.
const TABLES_PER_BATCH_MAX: usize = 4096;

/// Slot bytes of the tables of one batch, at most: the new tables of a
/// batch live beside the ones they replace until the swap.
const BATCH_SLOT_BYTES_MAX: usize = 64 << 20;

/// Descriptors left for everything but the tables of one batch (maps,
/// programs, sockets, the API client's connections).
const DESCRIPTORS_KEPT: u64 = 512;

/// How many tables one batch call swaps in: as many as RLIMIT_NOFILE
/// leaves room for (raised to its hard limit once), up to
/// [`TABLES_PER_BATCH_MAX`]; 64 at least.
fn tables_per_batch() -> usize {
    static BATCH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BATCH.get_or_init(|| {
        let room = sys::raise_open_files_limit().saturating_sub(DESCRIPTORS_KEPT);
        usize::try_from(room)
            .unwrap_or(usize::MAX)
            .clamp(64, TABLES_PER_BATCH_MAX)
    })
}

/// A table's slots are `u32`s stored 8 bytes apart (array maps round
/// values up to 8 bytes), from the start of the mapping.
const SLOT_BYTES: usize = 8;

/// A new selection table holding `ids` (`SELECT_TABLE_FLAGS`: it is not
/// in `XLB_SELECT` yet, so no packet reads it while it is filled). Filled
/// through a shared mapping, no syscall per slot; with one batch update if
/// it cannot be mapped.
fn new_table(ids: &[u32]) -> Result<Array<MapData, u32>, MapIoError> {
    use std::os::fd::AsFd as _;
    let len = u32::try_from(ids.len()).unwrap_or(u32::MAX);
    let table =
        Array::<MapData, u32>::create(len, names::SELECT_TABLE_FLAGS).map_err(io(names::SELECT))?;
    let length = (ids.len() * SLOT_BYTES).div_ceil(sys::page_size()) * sys::page_size();
    match sys::SharedMapping::new(table.map().fd().as_fd(), 0, length) {
        Ok(mapping) => {
            for (slot, &id) in ids.iter().enumerate() {
                mapping.store_u32(slot * SLOT_BYTES, id);
            }
        }
        Err(_) => {
            let slots: Vec<u32> = (0..len).collect();
            update_batch(table.map(), names::SELECT, &slots, ids).map_err(|(_, error)| error)?;
        }
    }
    Ok(table)
}

/// A run of `WriteTable`s cut into batches: [`tables_per_batch`] tables
/// and [`BATCH_SLOT_BYTES_MAX`] bytes of slots each, at most (one table
/// at least).
struct TableBatches<'a> {
    ops: &'a [MapOp],
    tables: usize,
}

impl<'a> TableBatches<'a> {
    fn new(ops: &'a [MapOp]) -> Self {
        Self {
            ops,
            tables: tables_per_batch(),
        }
    }
}

impl<'a> Iterator for TableBatches<'a> {
    type Item = &'a [MapOp];

    fn next(&mut self) -> Option<&'a [MapOp]> {
        if self.ops.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut len = 0;
        for op in self.ops.iter().take(self.tables) {
            let slots = match op {
                MapOp::WriteTable { recipe, .. } => recipe.size as usize,
                _ => 0,
            };
            bytes += slots * SLOT_BYTES;
            if len > 0 && bytes > BATCH_SLOT_BYTES_MAX {
                break;
            }
            len += 1;
        }
        let (batch, rest) = self.ops.split_at(len);
        self.ops = rest;
        Some(batch)
    }
}

/// A new selection table built from `recipe`, its slots built in
/// `scratch` (whose allocation is reused) and stored as by [`new_table`].
fn built_table(
    recipe: &TableRecipe,
    scratch: &mut Vec<u32>,
) -> Result<Array<MapData, u32>, MapIoError> {
    recipe.build_into(scratch);
    new_table(scratch)
}

/// A selection table made and filled, and the index it goes to.
type MadeTable = (u32, Array<MapData, u32>);

/// The tables of a batch of `WriteTable`s, in order, each built and made.
/// One thread: two built 10,000 tables no faster (522-541 ms against
/// 534-583 ms for the whole write), the kernel's work per table (making
/// the map, mapping and unmapping it) being most of it.
fn built_tables(ops: &[MapOp]) -> Result<Vec<MadeTable>, MapIoError> {
    let mut scratch = Vec::new();
    ops.iter()
        .filter_map(|op| match op {
            MapOp::WriteTable { table, recipe } => Some((*table, recipe)),
            _ => None,
        })
        .map(|(table, recipe)| Ok((table, built_table(recipe, &mut scratch)?)))
        .collect()
}

/// The (key, value) pairs of a run's ops for family `F`'s map, in order,
/// and where each sits in the run (to report how far a failed batch got).
type FamilyRun<K, V> = (Vec<K>, Vec<V>, Vec<usize>);

fn family_run<K, V>(ops: &[MapOp], pair: impl Fn(&MapOp) -> Option<(K, V)>) -> FamilyRun<K, V> {
    let mut run = (Vec::new(), Vec::new(), Vec::new());
    for (index, op) in ops.iter().enumerate() {
        if let Some((key, value)) = pair(op) {
            run.0.push(key);
            run.1.push(value);
            run.2.push(index);
        }
    }
    run
}

/// Writes one family's share of a run with one batch call; a failure
/// reports the ops of the run before the first pair not written (ops of
/// the other family among them may not be written yet, so the caller
/// writes the IPv4 share, then the IPv6 one, and reports the lower).
fn update_family_batch<K: Pod, V: Pod>(
    map: &MapData,
    name: &'static str,
    (keys, values, at): &FamilyRun<K, V>,
) -> Result<(), (usize, MapIoError)> {
    if keys.is_empty() {
        return Ok(());
    }
    update_batch(map, name, keys, values).map_err(|(written, error)| (at[written], error))
}

impl KernelMaps {
    /// A run of `WriteBackend`s as one batch per family.
    fn write_backends(&mut self, ops: &[MapOp]) -> Result<(), (usize, MapIoError)> {
        let pair = |op: &MapOp| match op {
            MapOp::WriteBackend { id, backend } => Some((*id, *backend)),
            _ => None,
        };
        let v4 = family_run(ops, |op| {
            pair(op).and_then(|(id, backend)| Some((id, backend_value::<V4>(&backend)?)))
        });
        let v6 = family_run(ops, |op| {
            pair(op).and_then(|(id, backend)| Some((id, backend_value::<V6>(&backend)?)))
        });
        update_family_batch(self.backends.map(), names::BACKENDS, &v4)?;
        update_family_batch(self.backends6.map(), names::BACKENDS6, &v6)
            .map_err(|(at, error)| (at.min(v4.2.len()), error))
    }

    /// A run of `WriteService`s as one batch per family.
    fn write_services(&mut self, ops: &[MapOp]) -> Result<(), (usize, MapIoError)> {
        let pair = |op: &MapOp| match op {
            MapOp::WriteService {
                frontend, entry, ..
            } => Some((*frontend, service_value(entry))),
            _ => None,
        };
        let v4 = family_run(ops, |op| {
            pair(op).and_then(|(frontend, value)| Some((service_key::<V4>(&frontend)?, value)))
        });
        let v6 = family_run(ops, |op| {
            pair(op).and_then(|(frontend, value)| Some((service_key::<V6>(&frontend)?, value)))
        });
        update_family_batch(self.services.map(), names::SERVICES, &v4)?;
        update_family_batch(self.services6.map(), names::SERVICES6, &v6)
            .map_err(|(at, error)| (at.min(v4.2.len()), error))
    }

    /// `XLB_SELECT[table] = ids`: a new table, filled, then swapped in
    /// with one update (the kernel swaps the pointer: a packet's lookup
    /// finds the old table or the new one). The old table is freed when the
    /// last program run that found it ends.
    fn write_table(&mut self, table: u32, recipe: &TableRecipe) -> Result<(), MapIoError> {
        let new = built_table(recipe, &mut Vec::new())?;
        // Its slots were stored through the mapping; the swap publishes them.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.select_tables_mut()
            .set(table, &new, 0)
            .map_err(io(names::SELECT))
    }

    /// A run of `WriteTable`s: each made and filled, then swapped in
    /// [`tables_per_batch`] at a time with one batch update (one by one
    /// where the kernel has no batch update for maps of maps). On failure,
    /// the tables swapped in before are counted.
    fn write_tables(&mut self, ops: &[MapOp]) -> Result<(), (usize, MapIoError)> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let mut written = 0;
        for chunk in TableBatches::new(ops) {
            let (keys, tables): (Vec<u32>, Vec<_>) = built_tables(chunk)
                .map_err(|error| (written, error))?
                .into_iter()
                .unzip();
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            let fds: Vec<u32> = tables
                .iter()
                .map(|table| u32::try_from(table.map().fd().as_fd().as_raw_fd()).unwrap_or(0))
                .collect();
            match update_batch(self.select_data(), names::SELECT, &keys, &fds) {
                Ok(()) => {}
                Err((0, _)) => {
                    for (index, (&key, table)) in keys.iter().zip(&tables).enumerate() {
                        self.select_tables_mut()
                            .set(key, table, 0)
                            .map_err(|error| {
                                (
                                    written + index,
                                    MapIoError {
                                        map: names::SELECT,
                                        source: error,
                                    },
                                )
                            })?;
                    }
                }
                Err((done, error)) => return Err((written + done, error)),
            }
            written += chunk.len();
        }
        Ok(())
    }
}

impl KernelMaps {
    /// `XLB_SELECT[table]` emptied; already empty is fine.
    fn remove_table(&mut self, table: u32) -> Result<(), MapIoError> {
        use std::os::fd::AsFd as _;
        let removed = sys::bpf_map_delete_elem(self.select_data().fd().as_fd(), &table);
        absent_ok(removed.map_err(|io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error,
            })
        }))
        .map_err(io(names::SELECT))
    }

    /// A run of `RemoveTable`s. Maps of maps have no batch delete (6.18:
    /// ENOTSUPP), and each single delete waits for an RCU grace period, so
    /// the indexes are instead pointed at one shared one-slot table with
    /// one batch update: their tables are freed all the same, and no entry
    /// points at those indexes. One by one where that fails.
    fn remove_tables(&mut self, ops: &[MapOp]) -> Result<(), (usize, MapIoError)> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let keys: Vec<u32> = ops
            .iter()
            .filter_map(|op| match op {
                MapOp::RemoveTable { table } => Some(*table),
                _ => None,
            })
            .collect();
        let placeholder = new_table(&[0]).map_err(|error| (0, error))?;
        let fd = u32::try_from(placeholder.map().fd().as_fd().as_raw_fd()).unwrap_or(0);
        let fds = vec![fd; keys.len()];
        match update_batch(self.select_data(), names::SELECT, &keys, &fds) {
            Ok(()) => Ok(()),
            Err((0, _)) => {
                for (index, &table) in keys.iter().enumerate() {
                    self.remove_table(table).map_err(|error| (index, error))?;
                }
                Ok(())
            }
            Err(failed) => Err(failed),
        }
    }
}

impl MapWriter for KernelMaps {
    type Error = MapIoError;

    fn apply_run(&mut self, ops: &[MapOp]) -> Result<(), (usize, MapIoError)> {
        let kind = ops.first().and_then(MapOp::run_kind);
        let one_kind = ops.iter().all(|op| op.run_kind() == kind);
        match kind {
            Some(RunKind::Backends) if one_kind => self.write_backends(ops),
            Some(RunKind::Services) if one_kind => self.write_services(ops),
            Some(RunKind::Tables) if one_kind => self.write_tables(ops),
            Some(RunKind::TableRemovals) if one_kind => self.remove_tables(ops),
            _ => {
                for (index, op) in ops.iter().enumerate() {
                    self.apply(op).map_err(|error| (index, error))?;
                }
                Ok(())
            }
        }
    }

    fn apply(&mut self, op: &MapOp) -> Result<(), MapIoError> {
        match op {
            MapOp::AddNodeAddress(address) => self.add_node_address(*address),
            MapOp::RemoveNodeAddress(address) => self.remove_node_address(*address),
            MapOp::SetInterfaceAddress { ifindex, address } => {
                self.set_interface_address(*ifindex, *address)
            }
            MapOp::RemoveInterfaceAddress { ifindex, family } => match family {
                IpFamily::V4 => absent_ok(self.interface_addresses.remove(ifindex))
                    .map_err(io(names::IFACE_ADDRS)),
                IpFamily::V6 => absent_ok(self.interface_addresses6.remove(ifindex))
                    .map_err(io(names::IFACE_ADDRS6)),
            },
            MapOp::WriteBackend { .. } | MapOp::WriteService { .. } => self
                .apply_run(std::slice::from_ref(op))
                .map_err(|(_, error)| error),
            MapOp::AddSourceRange(range) => self.add_source_range(range),
            MapOp::RemoveSourceRange(range) => self.remove_source_range(range),
            MapOp::ClearBackend { id, family } => {
                match family {
                    IpFamily::V4 => self
                        .backends
                        .set(*id, Backend::default(), 0)
                        .map_err(io(names::BACKENDS))?,
                    IpFamily::V6 => self
                        .backends6
                        .set(*id, Backend6::default(), 0)
                        .map_err(io(names::BACKENDS6))?,
                }
                self.zero_backend_counters(*id)
            }
            MapOp::WriteTable { table, recipe } => self.write_table(*table, recipe),
            MapOp::RemoveTable { table } => self.remove_table(*table),
            MapOp::RemoveService { frontend } => self.remove_service(frontend),
            MapOp::WriteSettings(settings) => self
                .config
                .set(0, global_config(settings), 0)
                .map_err(io(names::CONFIG)),
            MapOp::WritePorts { word, bits } => self
                .ports
                .set(u32::from(*word), *bits, 0)
                .map_err(io(names::PORTS)),
            MapOp::PortFilterOn => self
                .ports
                .set(names::PORTS_ON, 1, 0)
                .map_err(io(names::PORTS)),
        }
    }
}

/// The writes of one entry that go to the IPv4 or the IPv6 map by the
/// address's family.
impl KernelMaps {
    fn add_node_address(&mut self, address: std::net::IpAddr) -> Result<(), MapIoError> {
        let flags = NodeAddr { flags: 0 };
        if let Some(key) = V4::to_map(address) {
            return (self.node_addresses.insert(key, flags, 0)).map_err(io(names::NODE_ADDRS));
        }
        let key = V6::to_map(address).unwrap_or_default();
        (self.node_addresses6.insert(key, flags, 0)).map_err(io(names::NODE_ADDRS6))
    }

    fn remove_node_address(&mut self, address: std::net::IpAddr) -> Result<(), MapIoError> {
        if let Some(key) = V4::to_map(address) {
            return absent_ok(self.node_addresses.remove(&key)).map_err(io(names::NODE_ADDRS));
        }
        let key = V6::to_map(address).unwrap_or_default();
        absent_ok(self.node_addresses6.remove(&key)).map_err(io(names::NODE_ADDRS6))
    }

    fn set_interface_address(
        &mut self,
        ifindex: u32,
        address: std::net::IpAddr,
    ) -> Result<(), MapIoError> {
        if let Some(value) = V4::to_map(address) {
            return (self.interface_addresses.insert(ifindex, value, 0))
                .map_err(io(names::IFACE_ADDRS));
        }
        let value = V6::to_map(address).unwrap_or_default();
        (self.interface_addresses6.insert(ifindex, value, 0)).map_err(io(names::IFACE_ADDRS6))
    }

    fn add_source_range(&mut self, range: &SourceRangeKey) -> Result<(), MapIoError> {
        if let Some(key) = source_range_key::<V4>(range) {
            return (self.source_ranges.insert(&key, 1, 0)).map_err(io(names::SOURCE_RANGES));
        }
        match source_range_key::<V6>(range) {
            Some(key) => {
                (self.source_ranges6.insert(&key, 1, 0)).map_err(io(names::SOURCE_RANGES6))
            }
            None => Ok(()),
        }
    }

    fn remove_source_range(&mut self, range: &SourceRangeKey) -> Result<(), MapIoError> {
        if let Some(key) = source_range_key::<V4>(range) {
            return absent_ok(self.source_ranges.remove(&key)).map_err(io(names::SOURCE_RANGES));
        }
        match source_range_key::<V6>(range) {
            Some(key) => {
                absent_ok(self.source_ranges6.remove(&key)).map_err(io(names::SOURCE_RANGES6))
            }
            None => Ok(()),
        }
    }

    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), MapIoError> {
        if let Some(key) = service_key::<V4>(frontend) {
            return absent_ok(self.services.remove(&key)).map_err(io(names::SERVICES));
        }
        match service_key::<V6>(frontend) {
            Some(key) => absent_ok(self.services6.remove(&key)).map_err(io(names::SERVICES6)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
impl KernelMaps {
    /// Swaps `tables` into `XLB_SELECT` with one batch update, with no
    /// fallback (kernel tests check the kernel takes it).
    pub(crate) fn swap_tables_in_one_call(
        &mut self,
        tables: &[(u32, Vec<u32>)],
    ) -> Result<(), MapIoError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let keys: Vec<u32> = tables.iter().map(|(table, _)| *table).collect();
        let new: Vec<Array<MapData, u32>> = tables
            .iter()
            .map(|(_, ids)| new_table(ids))
            .collect::<Result<_, _>>()?;
        let fds: Vec<u32> = new
            .iter()
            .map(|table| u32::try_from(table.map().fd().as_fd().as_raw_fd()).unwrap_or(0))
            .collect();
        update_batch(self.select_data(), names::SELECT, &keys, &fds).map_err(|(_, error)| error)
    }
}
