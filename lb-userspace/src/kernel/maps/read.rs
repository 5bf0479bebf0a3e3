//! Reading the control-plane maps back: a snapshot for tests and
//! debugging, and the applied record of maps a previous agent pinned.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::maps as names;
use lb_common::service::{BACKEND_F_ACTIVE, BACKEND_F_TERMINATING, CONFIG_F_READY};
use lb_common::{Backend, GlobalConfig, Service, Traffic};

use super::convert::{frontend_of, settings_of, source_range_of};
use super::{KernelMaps, MapIoError, io};
use crate::model::BackendAddr;
use crate::reconcile::{ActiveBackend, Applied, AppliedService, ServiceEntry};

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
                table_id: value.table_id,
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
        // The tables themselves are not read back: `XLB_SELECT` gives map
        // ids, and opening a map by id needs CAP_SYS_ADMIN, which the agent
        // does without. The first plan swaps each table in place (same
        // index, same size, so no entry changes; the same backends give
        // the same slots), which established flows never look at.
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
        self.read_ports(&mut applied)?;
        Ok(applied)
    }

    /// The port filter as a previous agent left it (a fresh map: all zero,
    /// off).
    fn read_ports(&self, applied: &mut Applied) -> Result<(), MapIoError> {
        for index in 0..names::PORTS_ON {
            let bits = self.ports.get(&index, 0).map_err(io(names::PORTS))?;
            applied.ports.set_word(index as usize, bits);
        }
        let on = self
            .ports
            .get(&names::PORTS_ON, 0)
            .map_err(io(names::PORTS))?;
        applied.port_filter = on != 0;
        Ok(())
    }

    /// The lowest service id above every id the datapath still remembers:
    /// in session affinity records and in the per-service counters. New
    /// services get ids from here, so that a service removed before a
    /// restart cannot lend its affinity records (which name backends) or
    /// its counters to a new one.
    pub(super) fn first_unused_service_id(&self) -> Result<u32, MapIoError> {
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

    /// The slots of the table at `XLB_SELECT[table]`, if there is one
    /// (for tests and debugging: it opens the table by id, which needs
    /// CAP_SYS_ADMIN).
    pub fn select_slots(&self, table: u32) -> Result<Option<Vec<u32>>, MapIoError> {
        let slots = match self.select_tables().get(&table, 0) {
            Ok(slots) => slots,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(error) => {
                return Err(MapIoError {
                    map: names::SELECT,
                    source: error,
                });
            }
        };
        slots
            .iter()
            .map(|slot| slot.map_err(io(names::SELECT)))
            .collect::<Result<Vec<u32>, _>>()
            .map(Some)
    }
}
