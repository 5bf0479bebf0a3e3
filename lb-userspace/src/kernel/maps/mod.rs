//! Map I/O: the reconciler's `MapOp`s written into the datapath's BPF maps,
//! and the model -> lb-common conversions (byte order lives here).//!
//! `write.rs` writes ops, `read.rs` reads the maps back, `convert.rs`
//! holds the conversions both use.

mod convert;
mod read;
mod write;

use aya::Ebpf;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{
    Array, ArrayOfMaps, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray,
};
use lb_common::maps as names;
use lb_common::{
    Addr6, Affinity, Affinity6, AffinityKey, AffinityKey6, Backend, Backend6, GlobalConfig,
    NodeAddr, Service, ServiceKey, ServiceKey6, SourceRange, SourceRange6, Traffic,
};

use crate::reconcile::Capacity;

pub use convert::{
    MapFamily, active_backend, add_count, addr_be, backend_value, format_paths, format_stats,
    frontend_of, global_config, per_cpu_sum, service_key, service_value, settings_of,
    source_range_key,
};
pub use read::Snapshot;

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
    /// `XLB_SELECT`, an `ArrayOfMaps` (aya types it per use: see
    /// `select_tables`).
    select: Map,
    backends: Array<MapData, Backend>,
    node_addresses: HashMap<MapData, u32, NodeAddr>,
    interface_addresses: HashMap<MapData, u32, u32>,
    source_ranges: LpmTrie<MapData, SourceRange, u32>,
    config: Array<MapData, GlobalConfig>,
    /// Read only, when adopting: the service ids still in use there.
    affinity: HashMap<MapData, AffinityKey, Affinity>,
    /// As `affinity`, IPv6 clients' records.
    affinity6: HashMap<MapData, AffinityKey6, Affinity6>,
    service_stats: PerCpuArray<MapData, Traffic>,
    /// Zeroed when a backend id is freed, so the next backend given that id
    /// does not inherit its counters.
    backend_stats: PerCpuArray<MapData, Traffic>,
    /// The port filter's bitmap, then its flag (`PORTS_ON`).
    ports: Array<MapData, u64>,
    /// The IPv6 twins of the address-keyed maps above.
    services6: HashMap<MapData, ServiceKey6, Service>,
    backends6: Array<MapData, Backend6>,
    node_addresses6: HashMap<MapData, Addr6, NodeAddr>,
    interface_addresses6: HashMap<MapData, u32, Addr6>,
    source_ranges6: LpmTrie<MapData, SourceRange6, u32>,
}

impl KernelMaps {
    /// Takes the maps out of the loaded object.
    pub fn open(ebpf: &mut Ebpf) -> Result<Self, OpenError> {
        Ok(Self {
            services: typed(ebpf, names::SERVICES)?,
            select: select_map(ebpf)?,
            backends: typed(ebpf, names::BACKENDS)?,
            node_addresses: typed(ebpf, names::NODE_ADDRS)?,
            interface_addresses: typed(ebpf, names::IFACE_ADDRS)?,
            source_ranges: typed(ebpf, names::SOURCE_RANGES)?,
            config: typed(ebpf, names::CONFIG)?,
            affinity: typed(ebpf, names::AFFINITY)?,
            affinity6: typed(ebpf, names::AFFINITY6)?,
            service_stats: typed(ebpf, names::SERVICE_STATS)?,
            backend_stats: typed(ebpf, names::BACKEND_STATS)?,
            ports: typed(ebpf, names::PORTS)?,
            services6: typed(ebpf, names::SERVICES6)?,
            backends6: typed(ebpf, names::BACKENDS6)?,
            node_addresses6: typed(ebpf, names::NODE_ADDRS6)?,
            interface_addresses6: typed(ebpf, names::IFACE_ADDRS6)?,
            source_ranges6: typed(ebpf, names::SOURCE_RANGES6)?,
        })
    }

    /// `XLB_SELECT` as aya's `ArrayOfMaps` of selection tables.
    pub(super) fn select_tables(&self) -> ArrayOfMaps<&MapData, Array<MapData, u32>> {
        match ArrayOfMaps::try_from(&self.select) {
            Ok(tables) => tables,
            Err(_) => unreachable!("select_map checked the kind"),
        }
    }

    /// [`Self::select_tables`], to update.
    pub(super) fn select_tables_mut(&mut self) -> ArrayOfMaps<&mut MapData, Array<MapData, u32>> {
        match ArrayOfMaps::try_from(&mut self.select) {
            Ok(tables) => tables,
            Err(_) => unreachable!("select_map checked the kind"),
        }
    }

    /// `XLB_SELECT`'s own map (for its fd).
    pub(super) fn select_data(&self) -> &MapData {
        match &self.select {
            Map::ArrayOfMaps(data) => data,
            _ => unreachable!("select_map checked the kind"),
        }
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
            tables: self.select_tables().len(),
            node_addresses: max_entries(self.node_addresses.map(), defaults.node_addresses),
            interface_addresses: max_entries(
                self.interface_addresses.map(),
                defaults.interface_addresses,
            ),
            source_ranges: max_entries(self.source_ranges.map(), defaults.source_ranges),
        }
    }
}

/// `XLB_SELECT`, checked to be an `ArrayOfMaps` of `u32` arrays.
fn select_map(ebpf: &mut Ebpf) -> Result<Map, OpenError> {
    let name = names::SELECT;
    let map = take(ebpf, name)?;
    ArrayOfMaps::<&MapData, Array<MapData, u32>>::try_from(&map)
        .map_err(|source| OpenError::Kind { name, source })?;
    Ok(map)
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

#[cfg(test)]
mod tests;
