//! Map I/O: the reconciler's `MapOp`s written into the datapath's BPF maps,
//! and the model -> lb-common conversions (byte order lives here).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use aya::Ebpf;
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::maps as names;
use lb_common::service::{ADDR_ANY_NODE, BACKEND_F_ACTIVE, CONFIG_F_READY, SERVICE_F_MASQUERADE};
use lb_common::{Backend, GlobalConfig, NodeAddr, Reason, Service, ServiceKey};

use crate::reconcile::{BackendAddr, Capacity, Frontend, MapOp, MapWriter, ServiceEntry, Settings};

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
    config: Array<MapData, GlobalConfig>,
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
            config: typed(ebpf, names::CONFIG)?,
        })
    }

    /// How much the maps can hold, as the kernel created them.
    pub fn capacity(&self) -> Capacity {
        let defaults = Capacity::default();
        let max_entries =
            |map: &MapData, default: u32| map.info().map_or(default, |info| info.max_entries());
        use aya::maps::IterableMap as _;
        Capacity {
            services: max_entries(self.services.map(), defaults.services),
            backends: self.backends.len(),
            select_slots: self.select.len(),
            node_addresses: max_entries(self.node_addresses.map(), defaults.node_addresses),
            interface_addresses: max_entries(
                self.interface_addresses.map(),
                defaults.interface_addresses,
            ),
        }
    }
}

/// What the control-plane maps hold, read back from the kernel (for tests
/// and debugging).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// By (protocol number, node port).
    pub services: BTreeMap<(u8, u16), Service>,
    /// Backends whose flags are not zero, by id.
    pub backends: BTreeMap<u32, Backend>,
    pub node_addresses: BTreeSet<Ipv4Addr>,
    pub interface_addresses: BTreeMap<u32, Ipv4Addr>,
    pub config: Option<GlobalConfig>,
}

impl KernelMaps {
    pub fn snapshot(&self) -> Result<Snapshot, MapIoError> {
        let mut snapshot = Snapshot::default();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(io(names::SERVICES))?;
            snapshot
                .services
                .insert((key.proto, u16::from_be(key.port_be)), value);
        }
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend.map_err(io(names::BACKENDS))?;
            if backend.flags != 0 {
                snapshot
                    .backends
                    .insert(u32::try_from(id).unwrap_or(u32::MAX), backend);
            }
        }
        for key in self.node_addresses.keys() {
            let key = key.map_err(io(names::NODE_ADDRS))?;
            snapshot
                .node_addresses
                .insert(Ipv4Addr::from(key.to_ne_bytes()));
        }
        for entry in self.interface_addresses.iter() {
            let (ifindex, address) = entry.map_err(io(names::IFACE_ADDRS))?;
            snapshot
                .interface_addresses
                .insert(ifindex, Ipv4Addr::from(address.to_ne_bytes()));
        }
        let config = self.config.get(&0, 0).map_err(io(names::CONFIG))?;
        snapshot.config = (config.flags != 0).then_some(config);
        Ok(snapshot)
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

impl MapWriter for KernelMaps {
    type Error = MapIoError;

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
            MapOp::ClearBackend { id } => self
                .backends
                .set(*id, Backend::default(), 0)
                .map_err(io(names::BACKENDS)),
            MapOp::WriteTable {
                offset,
                backend_ids,
            } => {
                for (slot, id) in (*offset..).zip(backend_ids) {
                    self.select.set(slot, id, 0).map_err(io(names::SELECT))?;
                }
                Ok(())
            }
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
        addr_be: ADDR_ANY_NODE,
        port_be: frontend.node_port.to_be(),
        proto: frontend.protocol.number(),
        _pad: 0,
    }
}

pub fn service_value(entry: &ServiceEntry) -> Service {
    Service {
        id: entry.id,
        table_offset: entry.table_offset,
        table_size: entry.table_size,
        // NodePorts default to externalTrafficPolicy=Cluster.
        flags: SERVICE_F_MASQUERADE,
        // Later fields (session affinity, ...) stay off.
        ..Service::default()
    }
}

pub fn backend_value(backend: &BackendAddr) -> Backend {
    Backend {
        addr_be: addr_be(backend.address),
        port_be: backend.port.to_be(),
        flags: BACKEND_F_ACTIVE,
        ..Backend::default()
    }
}

pub fn global_config(settings: &Settings) -> GlobalConfig {
    GlobalConfig {
        snat_port_min: settings.masquerade_port_min,
        snat_port_max: settings.masquerade_port_max,
        hash_seed: settings.hash_seed,
        tcp_syn_timeout_s: settings.tcp_syn_timeout_s,
        tcp_established_timeout_s: settings.tcp_timeout_s,
        tcp_closing_timeout_s: settings.tcp_closing_timeout_s,
        udp_timeout_s: settings.udp_timeout_s,
        flags: CONFIG_F_READY,
        ..GlobalConfig::DEFAULT
    }
}

/// `XLB_STATS`: packets per verdict reason.
pub struct Stats {
    counters: PerCpuArray<MapData, u64>,
}

impl Stats {
    pub fn open(ebpf: &mut Ebpf) -> Result<Self, OpenError> {
        Ok(Self {
            counters: typed(ebpf, names::STATS)?,
        })
    }

    /// Every reason with a non-zero count, summed over CPUs, in counter order.
    pub fn read(&self) -> Result<Vec<(Reason, u64)>, MapIoError> {
        let mut counts = Vec::new();
        for &reason in Reason::ALL {
            if reason as u32 >= self.counters.len() {
                break;
            }
            let per_cpu = self
                .counters
                .get(&(reason as u32), 0)
                .map_err(io(names::STATS))?;
            let total = per_cpu.iter().fold(0u64, |sum, n| sum.wrapping_add(*n));
            if total > 0 {
                counts.push((reason, total));
            }
        }
        Ok(counts)
    }
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
        let key = service_key(&Frontend {
            protocol: Protocol::Udp,
            node_port: 30998,
        });
        assert_eq!(key.port_be.to_ne_bytes(), 30998u16.to_be_bytes());
        assert_eq!(key.proto, 17);
        assert_eq!(key.addr_be, ADDR_ANY_NODE);
        let backend = backend_value(&BackendAddr {
            address: Ipv4Addr::new(198, 18, 1, 2),
            port: 3333,
        });
        assert_eq!(backend.addr_be.to_ne_bytes(), [198, 18, 1, 2]);
        assert_eq!(backend.port_be.to_ne_bytes(), 3333u16.to_be_bytes());
        assert_eq!(backend.flags, BACKEND_F_ACTIVE);
    }

    #[test]
    fn settings_become_a_ready_global_config() {
        let settings = Settings {
            masquerade_port_min: 61000,
            masquerade_port_max: 65535,
            hash_seed: 7,
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
    }

    #[test]
    fn service_entries_masquerade() {
        let value = service_value(&ServiceEntry {
            id: 3,
            table_offset: 1021,
            table_size: 1021,
        });
        assert_eq!(value.flags, SERVICE_F_MASQUERADE);
        assert_eq!(
            (value.id, value.table_offset, value.table_size),
            (3, 1021, 1021)
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
