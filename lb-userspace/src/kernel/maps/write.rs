//! Writing the reconciler's `MapOp`s: one op at a time, or a run of one
//! kind with one batch call (`XLB_SELECT` through a shared mapping).

use aya::Pod;
use aya::maps::{Array, IterableMap as _, MapData, MapError};
use lb_common::maps as names;
use lb_common::{Backend, NodeAddr, Service, ServiceKey};

use super::convert::{
    addr_be, backend_value, global_config, service_key, service_value, source_range_key,
};
use super::{KernelMaps, MapIoError, absent_ok, io};
use crate::kernel::sys;
use crate::reconcile::{MapOp, MapWriter, RunKind};

/// Slots of one `XLB_SELECT` batch call: bounds the buffers (8 bytes a
/// slot) while keeping calls few (a 10,000-Service config has millions of
/// slots).
const SELECT_BATCH_SLOTS: usize = 64 * 1024;

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

/// `XLB_SELECT`'s slots are `u32`s stored 8 bytes apart (array maps round
/// values up to 8 bytes), from the start of the mapping.
const SELECT_SLOT_BYTES: usize = 8;
/// The most of `XLB_SELECT` mapped at once: pages of the mapping count in
/// the agent's resident memory while it is mapped.
const SELECT_WINDOW_BYTES: usize = 4 << 20;

/// Writes `XLB_SELECT[slots[i]] = ids[i]` through a temporary shared
/// mapping of the pages they fall in (the map is `BPF_F_MMAPABLE`): no
/// syscall per slot. `Some(false)`, having written nothing, if a slot is
/// out of range or the slots span more than `SELECT_WINDOW_BYTES`; `None`
/// if the map cannot be mapped (a pinned map made without the flag).
fn write_mapped(select: &Array<MapData, u32>, slots: &[u32], ids: &[u32]) -> Option<bool> {
    use std::os::fd::AsFd as _;
    use std::sync::atomic::{Ordering, fence};
    let (Some(&first), Some(&last)) = (slots.iter().min(), slots.iter().max()) else {
        return Some(true);
    };
    if last >= select.len() || slots.len() != ids.len() {
        return Some(false);
    }
    let page = sys::page_size();
    let start = first as usize * SELECT_SLOT_BYTES / page * page;
    let end = (last as usize + 1) * SELECT_SLOT_BYTES;
    let map_end = (select.len() as usize * SELECT_SLOT_BYTES).div_ceil(page) * page;
    let length = (end.div_ceil(page) * page).min(map_end) - start;
    if length > SELECT_WINDOW_BYTES {
        return Some(false);
    }
    let mapping = sys::SharedMapping::new(select.map().fd().as_fd(), start, length).ok()?;
    for (&slot, &id) in slots.iter().zip(ids) {
        mapping.store_u32(slot as usize * SELECT_SLOT_BYTES - start, id);
    }
    // The service entries that point at these slots are written after.
    fence(Ordering::Release);
    Some(true)
}

impl KernelMaps {
    /// A run of `WriteBackend`s as one batch.
    fn write_backends(&mut self, ops: &[MapOp]) -> Result<(), (usize, MapIoError)> {
        let (ids, values): (Vec<u32>, Vec<Backend>) = ops
            .iter()
            .filter_map(|op| match op {
                MapOp::WriteBackend { id, backend } => Some((*id, backend_value(backend))),
                _ => None,
            })
            .unzip();
        update_batch(self.backends.map(), names::BACKENDS, &ids, &values)
    }

    /// A run of `WriteService`s as one batch.
    fn write_services(&mut self, ops: &[MapOp]) -> Result<(), (usize, MapIoError)> {
        let (keys, values): (Vec<ServiceKey>, Vec<Service>) = ops
            .iter()
            .filter_map(|op| match op {
                MapOp::WriteService {
                    frontend, entry, ..
                } => Some((service_key(frontend), service_value(entry))),
                _ => None,
            })
            .unzip();
        update_batch(self.services.map(), names::SERVICES, &keys, &values)
    }

    /// A run of `WriteTable`s, in batches of about `SELECT_BATCH_SLOTS`
    /// slots. On failure, the tables written completely are counted.
    fn write_tables(&mut self, ops: &[MapOp]) -> Result<(), (usize, MapIoError)> {
        let mut slots: Vec<u32> = Vec::with_capacity(SELECT_BATCH_SLOTS);
        let mut ids: Vec<u32> = Vec::with_capacity(SELECT_BATCH_SLOTS);
        // Ops before `first` are written; `ends[i]` is where op `first + i`
        // ends in the pending buffers.
        let mut first = 0;
        let mut ends: Vec<usize> = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            if let MapOp::WriteTable {
                offset,
                backend_ids,
            } = op
            {
                slots.extend((*offset..).take(backend_ids.len()));
                ids.extend_from_slice(backend_ids);
            }
            ends.push(slots.len());
            if slots.len() >= SELECT_BATCH_SLOTS || index + 1 == ops.len() {
                let mapped = self.select_mappable
                    && match write_mapped(&self.select, &slots, &ids) {
                        Some(written) => written,
                        None => {
                            // Pinned by an agent that made it without
                            // BPF_F_MMAPABLE: batch calls from now on.
                            self.select_mappable = false;
                            false
                        }
                    };
                let written = if mapped {
                    Ok(())
                } else {
                    update_batch(self.select.map(), names::SELECT, &slots, &ids)
                };
                if let Err((written, error)) = written {
                    let complete = ends.iter().take_while(|&&end| end <= written).count();
                    return Err((first + complete, error));
                }
                first = index + 1;
                slots.clear();
                ids.clear();
                ends.clear();
            }
        }
        Ok(())
    }
}

impl MapWriter for KernelMaps {
    type Error = MapIoError;

    fn apply_run(&mut self, ops: &[MapOp]) -> Result<(), (usize, MapIoError)> {
        let kind = ops.first().and_then(MapOp::run_kind);
        let one_kind = ops.iter().all(|op| op.run_kind() == kind);
        match kind {
            Some(RunKind::Backends) if one_kind => self.write_backends(ops),
            Some(RunKind::Tables) if one_kind => self.write_tables(ops),
            Some(RunKind::Services) if one_kind => self.write_services(ops),
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
            MapOp::AddNodeAddress(address) => self
                .node_addresses
                .insert(addr_be(*address), NodeAddr { flags: 0 }, 0)
                .map_err(io(names::NODE_ADDRS)),
            MapOp::RemoveNodeAddress(address) => {
                absent_ok(self.node_addresses.remove(&addr_be(*address)))
                    .map_err(io(names::NODE_ADDRS))
            }
            MapOp::SetInterfaceAddress { ifindex, address } => self
                .interface_addresses
                .insert(*ifindex, addr_be(*address), 0)
                .map_err(io(names::IFACE_ADDRS)),
            MapOp::RemoveInterfaceAddress { ifindex } => {
                absent_ok(self.interface_addresses.remove(ifindex)).map_err(io(names::IFACE_ADDRS))
            }
            MapOp::WriteBackend { id, backend } => self
                .backends
                .set(*id, backend_value(backend), 0)
                .map_err(io(names::BACKENDS)),
            MapOp::AddSourceRange(range) => self
                .source_ranges
                .insert(&source_range_key(range), 1, 0)
                .map_err(io(names::SOURCE_RANGES)),
            MapOp::RemoveSourceRange(range) => {
                absent_ok(self.source_ranges.remove(&source_range_key(range)))
                    .map_err(io(names::SOURCE_RANGES))
            }
            MapOp::ClearBackend { id } => {
                self.backends
                    .set(*id, Backend::default(), 0)
                    .map_err(io(names::BACKENDS))?;
                self.zero_backend_counters(*id)
            }
            MapOp::WriteTable { .. } => self
                .write_tables(std::slice::from_ref(op))
                .map_err(|(_, error)| error),
            MapOp::WriteService {
                frontend, entry, ..
            } => self
                .services
                .insert(service_key(frontend), service_value(entry), 0)
                .map_err(io(names::SERVICES)),
            MapOp::RemoveService { frontend } => {
                absent_ok(self.services.remove(&service_key(frontend))).map_err(io(names::SERVICES))
            }
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
