//! Map I/O: the reconciler's `MapOp`s written into the datapath's BPF maps,
//! and the model -> lb-common conversions (byte order lives here).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray};
use aya::{Ebpf, Pod};
use lb_common::maps as names;
use lb_common::service::{ADDR_ANY_NODE, BACKEND_F_ACTIVE, BACKEND_F_TERMINATING, CONFIG_F_READY};
use lb_common::{
    Affinity, AffinityKey, Backend, GlobalConfig, IPPROTO_TCP, IPPROTO_UDP, NodeAddr, Paths,
    Reason, Service, ServiceKey, SourceRange, Traffic,
};

use crate::kernel::sys;
use crate::model::Protocol;
use crate::reconcile::{
    ActiveBackend, Applied, AppliedService, BackendAddr, Capacity, Frontend, MapOp, MapWriter,
    RunKind, ServiceEntry, Settings, SourceRangeKey,
};

/// A map the agent needs is missing from the object or is of another kind.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the datapath object has no map {name}; was lb-ebpf built from this tree? (cargo build rebuilds it)"
    )]
    Missing { name: &'static str },
    #[error("map {name} is not what the agent expects")]
    Kind {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// A map operation the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("{map}: {source}")]
pub struct MapIoError {
    pub map: &'static str,
    #[source]
    pub source: MapError,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, OpenError> {
    ebpf.take_map(name).ok_or(OpenError::Missing { name })
}

fn typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, OpenError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(take(ebpf, name)?).map_err(|source| OpenError::Kind { name, source })
}

/// The control-plane maps, written only through `MapWriter::apply`.
pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, Service>,
    select: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    node_addresses: HashMap<MapData, u32, NodeAddr>,
    interface_addresses: HashMap<MapData, u32, u32>,
    source_ranges: LpmTrie<MapData, SourceRange, u32>,
    config: Array<MapData, GlobalConfig>,
    /// Read only, when adopting: the service ids still in use there.
    affinity: HashMap<MapData, AffinityKey, Affinity>,
    service_stats: PerCpuArray<MapData, Traffic>,
    /// Zeroed when a backend id is freed, so the next backend given that id
    /// does not inherit its counters.
    backend_stats: PerCpuArray<MapData, Traffic>,
    /// `XLB_SELECT` can be written through a mapping (see `write_mapped`);
    /// false after the first failure.
    pub(super) select_mappable: bool,
}

impl KernelMaps {
    /// Takes the maps out of the loaded object.
    pub fn open(ebpf: &mut Ebpf) -> Result<Self, OpenError> {
        Ok(Self {
            services: typed(ebpf, names::SERVICES)?,
            select: typed(ebpf, names::SELECT)?,
            backends: typed(ebpf, names::BACKENDS)?,
            node_addresses: typed(ebpf, names::NODE_ADDRS)?,
            interface_addresses: typed(ebpf, names::IFACE_ADDRS)?,
            source_ranges: typed(ebpf, names::SOURCE_RANGES)?,
            config: typed(ebpf, names::CONFIG)?,
            affinity: typed(ebpf, names::AFFINITY)?,
            service_stats: typed(ebpf, names::SERVICE_STATS)?,
            backend_stats: typed(ebpf, names::BACKEND_STATS)?,
            select_mappable: true,
        })
    }

    /// Zeroes `XLB_BACKEND_STATS[id]` on every CPU.
    fn zero_backend_counters(&mut self, id: u32) -> Result<(), MapIoError> {
        let failed = |call: &'static str, io_error: std::io::Error| MapIoError {
            map: names::BACKEND_STATS,
            source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, error)| failed("nr_cpus", error))?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![Traffic::default(); cpus])
            .map_err(|error| failed("per-CPU values", error))?;
        self.backend_stats
            .set(id, zeros, 0)
            .map_err(io(names::BACKEND_STATS))
    }

    /// How much the maps can hold, as the kernel created them.
    pub fn capacity(&self) -> Capacity {
        let defaults = Capacity::default();
        let max_entries =
            |map: &MapData, default: u32| map.info().map_or(default, |info| info.max_entries());
        Capacity {
            services: max_entries(self.services.map(), defaults.services),
            backends: self.backends.len(),
            select_slots: self.select.len(),
            node_addresses: max_entries(self.node_addresses.map(), defaults.node_addresses),
            interface_addresses: max_entries(
                self.interface_addresses.map(),
                defaults.interface_addresses,
            ),
            source_ranges: max_entries(self.source_ranges.map(), defaults.source_ranges),
        }
    }
}

/// What the control-plane maps hold, read back from the kernel (for tests
/// and debugging).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// By (address, protocol number, port); address 0.0.0.0 for NodePorts.
    pub services: BTreeMap<(Ipv4Addr, u8, u16), Service>,
    /// Backends whose flags are not zero, by id.
    pub backends: BTreeMap<u32, Backend>,
    pub node_addresses: BTreeSet<Ipv4Addr>,
    pub interface_addresses: BTreeMap<u32, Ipv4Addr>,
    /// `(service id, network, prefix length)`.
    pub source_ranges: BTreeSet<(u32, Ipv4Addr, u8)>,
    pub config: Option<GlobalConfig>,
}

impl KernelMaps {
    fn read_node_addresses(&self) -> Result<BTreeSet<Ipv4Addr>, MapIoError> {
        self.node_addresses
            .keys()
            .map(|key| {
                let key = key.map_err(io(names::NODE_ADDRS))?;
                Ok(Ipv4Addr::from(key.to_ne_bytes()))
            })
            .collect()
    }

    fn read_interface_addresses(&self) -> Result<BTreeMap<u32, Ipv4Addr>, MapIoError> {
        self.interface_addresses
            .iter()
            .map(|entry| {
                let (ifindex, address) = entry.map_err(io(names::IFACE_ADDRS))?;
                Ok((ifindex, Ipv4Addr::from(address.to_ne_bytes())))
            })
            .collect()
    }

    pub fn snapshot(&self) -> Result<Snapshot, MapIoError> {
        let mut snapshot = Snapshot::default();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(io(names::SERVICES))?;
            snapshot.services.insert(
                (
                    Ipv4Addr::from(key.addr_be.to_ne_bytes()),
                    key.proto,
                    u16::from_be(key.port_be),
                ),
                value,
            );
        }
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend.map_err(io(names::BACKENDS))?;
            if backend.flags != 0 {
                snapshot
                    .backends
                    .insert(u32::try_from(id).unwrap_or(u32::MAX), backend);
            }
        }
        snapshot.node_addresses = self.read_node_addresses()?;
        snapshot.interface_addresses = self.read_interface_addresses()?;
        for key in self.source_ranges.keys() {
            let range = source_range_of(&key.map_err(io(names::SOURCE_RANGES))?);
            snapshot
                .source_ranges
                .insert((range.service_id, range.network, range.prefix_len));
        }
        let config = self.config.get(&0, 0).map_err(io(names::CONFIG))?;
        snapshot.config = (config.flags != 0).then_some(config);
        Ok(snapshot)
    }

    /// What the maps hold, as the reconciler's mirror: how an agent adopts
    /// maps a previous agent pinned, so that its first plan changes only
    /// what differs (service names are not in the maps: see
    /// `Applied::adopt_names`).
    pub fn read_applied(&self) -> Result<Applied, MapIoError> {
        let mut applied = Applied::default();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(io(names::SERVICES))?;
            let Some(frontend) = frontend_of(&key) else {
                continue;
            };
            let entry = ServiceEntry {
                id: value.id,
                table_offset: value.table_offset,
                table_size: value.table_size,
                flags: value.flags,
                affinity_timeout_s: value.affinity_timeout_s,
            };
            applied.next_service_id = applied.next_service_id.max(value.id.saturating_add(1));
            applied.services.insert(
                frontend,
                AppliedService {
                    name: String::new(),
                    entry,
                },
            );
        }
        let regions: BTreeSet<(u32, u32)> = applied
            .services
            .values()
            .filter(|service| service.entry.table_size > 0)
            .map(|service| (service.entry.table_offset, service.entry.table_size))
            .collect();
        for (offset, size) in regions {
            applied
                .tables
                .insert(offset, self.select_slots(offset, size)?);
        }
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend.map_err(io(names::BACKENDS))?;
            if backend.flags & BACKEND_F_ACTIVE == 0 {
                continue;
            }
            applied.backends.insert(
                u32::try_from(id).unwrap_or(u32::MAX),
                ActiveBackend {
                    address: BackendAddr {
                        address: Ipv4Addr::from(backend.addr_be.to_ne_bytes()),
                        port: u16::from_be(backend.port_be),
                    },
                    terminating: backend.flags & BACKEND_F_TERMINATING != 0,
                },
            );
        }
        for key in self.source_ranges.keys() {
            let key = key.map_err(io(names::SOURCE_RANGES))?;
            applied.source_ranges.insert(source_range_of(&key));
        }
        applied.node_addresses = self.read_node_addresses()?;
        applied.interface_addresses = self.read_interface_addresses()?;
        let config = self.config.get(&0, 0).map_err(io(names::CONFIG))?;
        applied.settings = (config.flags & CONFIG_F_READY != 0).then(|| settings_of(&config));
        applied.next_service_id = applied.next_service_id.max(self.first_unused_service_id()?);
        applied.next_backend_id = applied.backends.keys().max().map_or(1, |id| id + 1);
        Ok(applied)
    }

    /// The lowest service id above every id the datapath still remembers:
    /// in session affinity records and in the per-service counters. New
    /// services get ids from here, so that a service removed before a
    /// restart cannot lend its affinity records (which name backends) or
    /// its counters to a new one.
    fn first_unused_service_id(&self) -> Result<u32, MapIoError> {
        let mut next = 0u32;
        for key in self.affinity.keys() {
            let key = key.map_err(io(names::AFFINITY))?;
            next = next.max(key.service_id.saturating_add(1));
        }
        for id in (next..self.service_stats.len()).rev() {
            let per_cpu = self
                .service_stats
                .get(&id, 0)
                .map_err(io(names::SERVICE_STATS))?;
            if per_cpu.iter().any(|traffic| *traffic != Traffic::default()) {
                next = next.max(id.saturating_add(1));
                break;
            }
        }
        Ok(next)
    }

    /// `XLB_SELECT[offset..offset + len]`.
    pub fn select_slots(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapIoError> {
        (offset..offset.saturating_add(len))
            .map(|slot| self.select.get(&slot, 0).map_err(io(names::SELECT)))
            .collect()
    }
}

fn io(map: &'static str) -> impl FnOnce(MapError) -> MapIoError {
    move |source| MapIoError { map, source }
}

/// Deleting a key that is already gone is success: the goal is its absence.
fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

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
        }
    }
}

/// An address as the datapath stores it: the wire's bytes in a u32.
pub fn addr_be(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

pub fn service_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey {
        addr_be: frontend.address.map_or(ADDR_ANY_NODE, addr_be),
        port_be: frontend.port.to_be(),
        proto: frontend.protocol.number(),
        _pad: 0,
    }
}

/// The frontend of an `XLB_SERVICES` key, if its protocol is one xlb
/// balances.
pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    let protocol = match key.proto {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    let port = u16::from_be(key.port_be);
    Some(if key.addr_be == ADDR_ANY_NODE {
        Frontend::node_port(protocol, port)
    } else {
        Frontend::exact(protocol, Ipv4Addr::from(key.addr_be.to_ne_bytes()), port)
    })
}

pub fn service_value(entry: &ServiceEntry) -> Service {
    Service {
        id: entry.id,
        table_offset: entry.table_offset,
        table_size: entry.table_size,
        flags: entry.flags,
        affinity_timeout_s: entry.affinity_timeout_s,
        ..Service::default()
    }
}

pub fn backend_value(backend: &ActiveBackend) -> Backend {
    let terminating = if backend.terminating {
        BACKEND_F_TERMINATING
    } else {
        0
    };
    Backend {
        addr_be: addr_be(backend.address.address),
        port_be: backend.address.port.to_be(),
        flags: BACKEND_F_ACTIVE | terminating,
        ..Backend::default()
    }
}

/// An `XLB_SOURCE_RANGES` key: LPM prefix length 32 (the service id, in
/// full) plus the source prefix.
pub fn source_range_key(range: &SourceRangeKey) -> LpmKey<SourceRange> {
    LpmKey::new(
        32 + u32::from(range.prefix_len),
        SourceRange {
            service_id: range.service_id,
            addr_be: addr_be(range.network),
        },
    )
}

fn source_range_of(key: &LpmKey<SourceRange>) -> SourceRangeKey {
    let data = key.data();
    SourceRangeKey {
        service_id: data.service_id,
        network: Ipv4Addr::from(data.addr_be.to_ne_bytes()),
        prefix_len: u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(32),
    }
}

/// The settings a ready `XLB_CONFIG[0]` holds.
pub fn settings_of(config: &GlobalConfig) -> Settings {
    Settings {
        masquerade_port_min: config.snat_port_min,
        masquerade_port_max: config.snat_port_max,
        hash_seed: u64::from(config.hash_seed_hi) << 32 | u64::from(config.hash_seed),
        tcp_syn_timeout_s: config.tcp_syn_timeout_s,
        tcp_timeout_s: config.tcp_established_timeout_s,
        tcp_closing_timeout_s: config.tcp_closing_timeout_s,
        udp_timeout_s: config.udp_timeout_s,
    }
}

pub fn global_config(settings: &Settings) -> GlobalConfig {
    GlobalConfig {
        snat_port_min: settings.masquerade_port_min,
        snat_port_max: settings.masquerade_port_max,
        hash_seed: settings.hash_seed as u32,
        hash_seed_hi: (settings.hash_seed >> 32) as u32,
        tcp_syn_timeout_s: settings.tcp_syn_timeout_s,
        tcp_established_timeout_s: settings.tcp_timeout_s,
        tcp_closing_timeout_s: settings.tcp_closing_timeout_s,
        udp_timeout_s: settings.udp_timeout_s,
        flags: CONFIG_F_READY,
    }
}

/// Entry `index` of a per-CPU counter array, summed over CPUs with `add`:
/// the one place per-CPU counters are summed (`observe::datapath`'s reader
/// and explain's simulation use it). Zero past the array's end.
pub fn per_cpu_sum<M: Borrow<MapData>, T: Pod + Default>(
    map: &PerCpuArray<M, T>,
    index: u32,
    add: impl Fn(&mut T, &T),
) -> Result<T, MapError> {
    let mut total = T::default();
    if index >= map.len() {
        return Ok(total);
    }
    for value in map.get(&index, 0)?.iter() {
        add(&mut total, value);
    }
    Ok(total)
}

/// `per_cpu_sum`'s `add` for plain counters (`XLB_STATS`).
pub fn add_count(total: &mut u64, count: &u64) {
    *total = total.wrapping_add(*count);
}

/// One backend's paths for the exit log (`cargo xtask demo` reads it):
/// `to-backend xdp=N tc=N peer=N to-client xdp=N tc=N`.
pub fn format_paths(paths: &Paths) -> String {
    format!(
        "to-backend xdp={} tc={} peer={} to-client xdp={} tc={}",
        paths.to_backend_xdp,
        paths.to_backend_tc,
        paths.to_backend_peer,
        paths.to_client_xdp,
        paths.to_client_tc
    )
}

/// `name=count name=count ...`, or `none` when nothing was counted.
pub fn format_stats(counts: &[(Reason, u64)]) -> String {
    if counts.is_empty() {
        return String::from("none");
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(reason, count)| format!("{}={count}", reason.name()))
        .collect();
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn addresses_and_ports_keep_wire_byte_order() {
        let key = service_key(&Frontend::node_port(Protocol::Udp, 30998));
        assert_eq!(key.port_be.to_ne_bytes(), 30998u16.to_be_bytes());
        assert_eq!(key.proto, 17);
        assert_eq!(key.addr_be, ADDR_ANY_NODE);
        assert_eq!(
            frontend_of(&key),
            Some(Frontend::node_port(Protocol::Udp, 30998))
        );
        let exact = Frontend::exact(Protocol::Tcp, Ipv4Addr::new(198, 18, 200, 10), 80);
        let key = service_key(&exact);
        assert_eq!(key.addr_be.to_ne_bytes(), [198, 18, 200, 10]);
        assert_eq!(frontend_of(&key), Some(exact));
        let mut backend = ActiveBackend {
            address: BackendAddr {
                address: Ipv4Addr::new(198, 18, 1, 2),
                port: 3333,
            },
            terminating: false,
        };
        let value = backend_value(&backend);
        assert_eq!(value.addr_be.to_ne_bytes(), [198, 18, 1, 2]);
        assert_eq!(value.port_be.to_ne_bytes(), 3333u16.to_be_bytes());
        assert_eq!(value.flags, BACKEND_F_ACTIVE);
        backend.terminating = true;
        assert_eq!(
            backend_value(&backend).flags,
            BACKEND_F_ACTIVE | BACKEND_F_TERMINATING
        );
    }

    #[test]
    fn source_range_keys_match_the_datapath_lookup() {
        let range = SourceRangeKey {
            service_id: 7,
            network: Ipv4Addr::new(198, 18, 0, 0),
            prefix_len: 24,
        };
        let key = source_range_key(&range);
        // The datapath looks up (64, {id, source}): 32 bits of id + 24 of prefix.
        assert_eq!(key.prefix_len(), 56);
        assert_eq!(key.data().service_id, 7);
        assert_eq!(key.data().addr_be.to_ne_bytes(), [198, 18, 0, 0]);
        assert_eq!(source_range_of(&key), range);
    }

    #[test]
    fn settings_become_a_ready_global_config_and_back() {
        let settings = Settings {
            masquerade_port_min: 61000,
            masquerade_port_max: 65535,
            hash_seed: 0x0123_4567_89ab_cdef,
            tcp_syn_timeout_s: 1,
            tcp_timeout_s: 2,
            tcp_closing_timeout_s: 3,
            udp_timeout_s: 4,
        };
        let config = global_config(&settings);
        assert_eq!(config.flags & CONFIG_F_READY, CONFIG_F_READY);
        assert_eq!(
            (
                config.tcp_syn_timeout_s,
                config.tcp_established_timeout_s,
                config.tcp_closing_timeout_s,
                config.udp_timeout_s
            ),
            (1, 2, 3, 4)
        );
        assert_eq!((config.snat_port_min, config.snat_port_max), (61000, 65535));
        assert_eq!(settings_of(&config), settings);
    }

    #[test]
    fn service_entries_carry_flags_and_affinity() {
        use lb_common::service::{SERVICE_F_AFFINITY, SERVICE_F_MASQUERADE};
        let value = service_value(&ServiceEntry {
            id: 3,
            table_offset: 1021,
            table_size: 1021,
            flags: SERVICE_F_MASQUERADE | SERVICE_F_AFFINITY,
            affinity_timeout_s: 600,
        });
        assert_eq!(value.flags, SERVICE_F_MASQUERADE | SERVICE_F_AFFINITY);
        assert_eq!(
            (
                value.id,
                value.table_offset,
                value.table_size,
                value.affinity_timeout_s
            ),
            (3, 1021, 1021, 600)
        );
    }

    /// A freed backend id starts from zero counters, so the next backend
    /// given that id does not report its predecessor's traffic.
    #[test]
    fn clearing_a_backend_zeroes_its_counters() {
        use crate::kernel::{Datapath, TEST_SIZES, is_root};
        use crate::reconcile::{MapOp, MapWriter as _};
        if !is_root() {
            eprintln!("skipped: loading BPF needs root");
            return;
        }
        let mut maps = match Datapath::load(TEST_SIZES) {
            Ok(loaded) => loaded.maps,
            Err(error) => panic!("{}", crate::error_chain(&error)),
        };
        let cpus = aya::util::nr_cpus().map_or(1, |cpus| cpus);
        let mut counted = vec![Traffic::default(); cpus];
        counted[0].to_backend_packets = 7;
        counted[cpus - 1].to_client_bytes = 900;
        let Ok(values) = aya::maps::PerCpuValues::try_from(counted) else {
            panic!("per-CPU values")
        };
        assert!(maps.backend_stats.set(5, values, 0).is_ok());
        assert!(maps.apply(&MapOp::ClearBackend { id: 5 }).is_ok());
        let Ok(after) = maps.backend_stats.get(&5, 0) else {
            panic!("read counters")
        };
        assert!(after.iter().all(|traffic| *traffic == Traffic::default()));
    }

    /// After a restart, new services get ids above those the datapath
    /// still remembers in affinity records and counters.
    #[test]
    fn adopted_ids_stay_above_remembered_ones() {
        use crate::kernel::{Datapath, TEST_SIZES, is_root};
        if !is_root() {
            eprintln!("skipped: loading BPF needs root");
            return;
        }
        let mut maps = match Datapath::load(TEST_SIZES) {
            Ok(loaded) => loaded.maps,
            Err(error) => panic!("{}", crate::error_chain(&error)),
        };
        assert_eq!(maps.first_unused_service_id().ok(), Some(0));
        let key = AffinityKey {
            service_id: 40,
            client_addr_be: 1,
        };
        assert!(maps.affinity.insert(key, Affinity::default(), 0).is_ok());
        assert_eq!(maps.first_unused_service_id().ok(), Some(41));
        let cpus = aya::util::nr_cpus().map_or(1, |cpus| cpus);
        let mut counted = vec![Traffic::default(); cpus];
        counted[0].to_backend_packets = 1;
        let values = aya::maps::PerCpuValues::try_from(counted);
        let Ok(values) = values else {
            panic!("per-CPU values")
        };
        assert!(maps.service_stats.set(50, values, 0).is_ok());
        assert_eq!(maps.first_unused_service_id().ok(), Some(51));
        assert_eq!(
            maps.read_applied().map(|a| a.next_service_id).ok(),
            Some(51)
        );
    }

    #[test]
    fn stats_line() {
        assert_eq!(format_stats(&[]), "none");
        assert_eq!(
            format_stats(&[(Reason::FwdNewFlow, 3), (Reason::DropNoNeighbour, 1)]),
            "fwd_new_flow=3 drop_no_neighbour=1"
        );
    }
}
