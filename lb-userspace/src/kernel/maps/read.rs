//! Reading the control-plane maps back: a snapshot for tests and
//! debugging, and the applied record of maps a previous agent pinned.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use aya::Pod;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, MapData};
use lb_common::maps as names;
use lb_common::service::CONFIG_F_READY;
use lb_common::sock::AFFINITY_SOCKET_CLIENT;
use lb_common::{Backend, BackendOf, GlobalConfig, Service, ServiceKeyOf, SourceRangeOf, Traffic};

use super::convert::{MapFamily, active_backend, frontend_of, settings_of, source_range_of};
use super::{KernelMaps, MapIoError, io};
use crate::model::IpFamily;
use crate::reconcile::{Applied, AppliedService, Frontend, ServiceEntry, SourceRangeKey};

/// What the control-plane maps hold, read back from the kernel (for tests
/// and debugging), both families'.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// By frontend.
    pub services: BTreeMap<Frontend, Service>,
    /// IPv4 backends whose flags are not zero, by id.
    pub backends: BTreeMap<u32, Backend>,
    /// Active backends of either family, by id.
    pub active_backends: BTreeMap<u32, crate::reconcile::ActiveBackend>,
    pub node_addresses: BTreeSet<IpAddr>,
    pub interface_addresses: BTreeMap<(u32, IpFamily), IpAddr>,
    pub source_ranges: BTreeSet<SourceRangeKey>,
    pub config: Option<GlobalConfig>,
}

/// One family's address-keyed maps, read alike.
struct FamilyMaps<'a, F: MapFamily>
where
    F::Addr: Pod,
{
    services: (&'static str, &'a HashMap<MapData, ServiceKeyOf<F>, Service>),
    backends: (&'static str, &'a Array<MapData, BackendOf<F>>),
    node_addresses: (
        &'static str,
        &'a HashMap<MapData, F::Addr, lb_common::NodeAddr>,
    ),
    interface_addresses: (&'static str, &'a HashMap<MapData, u32, F::Addr>),
    source_ranges: (&'static str, &'a LpmTrie<MapData, SourceRangeOf<F>, u32>),
}

impl<F: MapFamily> FamilyMaps<'_, F>
where
    F::Addr: Pod,
{
    fn services(&self, out: &mut BTreeMap<Frontend, Service>) -> Result<(), MapIoError> {
        let (name, map) = self.services;
        for entry in map.iter() {
            let (key, value) = entry.map_err(io(name))?;
            if let Some(frontend) = frontend_of(&key) {
                out.insert(frontend, value);
            }
        }
        Ok(())
    }

    fn backends(
        &self,
        out: &mut BTreeMap<u32, crate::reconcile::ActiveBackend>,
    ) -> Result<(), MapIoError> {
        let (name, map) = self.backends;
        for (id, backend) in map.iter().enumerate() {
            if let Some(active) = active_backend(&backend.map_err(io(name))?) {
                out.insert(u32::try_from(id).unwrap_or(u32::MAX), active);
            }
        }
        Ok(())
    }

    fn addresses(&self, applied: &mut Applied) -> Result<(), MapIoError> {
        let (name, map) = self.node_addresses;
        for key in map.keys() {
            applied
                .node_addresses
                .insert(F::from_map(&key.map_err(io(name))?));
        }
        let (name, map) = self.interface_addresses;
        for entry in map.iter() {
            let (ifindex, address) = entry.map_err(io(name))?;
            applied
                .interface_addresses
                .insert((ifindex, F::FAMILY), F::from_map(&address));
        }
        let (name, map) = self.source_ranges;
        for key in map.keys() {
            applied
                .source_ranges
                .insert(source_range_of(&key.map_err(io(name))?));
        }
        Ok(())
    }
}

impl KernelMaps {
    fn v4(&self) -> FamilyMaps<'_, lb_common::V4> {
        FamilyMaps {
            services: (names::SERVICES, &self.services),
            backends: (names::BACKENDS, &self.backends),
            node_addresses: (names::NODE_ADDRS, &self.node_addresses),
            interface_addresses: (names::IFACE_ADDRS, &self.interface_addresses),
            source_ranges: (names::SOURCE_RANGES, &self.source_ranges),
        }
    }

    fn v6(&self) -> FamilyMaps<'_, lb_common::V6> {
        FamilyMaps {
            services: (names::SERVICES6, &self.services6),
            backends: (names::BACKENDS6, &self.backends6),
            node_addresses: (names::NODE_ADDRS6, &self.node_addresses6),
            interface_addresses: (names::IFACE_ADDRS6, &self.interface_addresses6),
            source_ranges: (names::SOURCE_RANGES6, &self.source_ranges6),
        }
    }

    pub fn snapshot(&self) -> Result<Snapshot, MapIoError> {
        let mut snapshot = Snapshot::default();
        self.v4().services(&mut snapshot.services)?;
        self.v6().services(&mut snapshot.services)?;
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend.map_err(io(names::BACKENDS))?;
            if backend.flags != 0 {
                snapshot
                    .backends
                    .insert(u32::try_from(id).unwrap_or(u32::MAX), backend);
            }
        }
        self.v4().backends(&mut snapshot.active_backends)?;
        self.v6().backends(&mut snapshot.active_backends)?;
        let mut addresses = Applied::default();
        self.v4().addresses(&mut addresses)?;
        self.v6().addresses(&mut addresses)?;
        snapshot.node_addresses = addresses.node_addresses;
        snapshot.interface_addresses = addresses.interface_addresses;
        snapshot.source_ranges = addresses.source_ranges;
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
        let mut services = BTreeMap::new();
        self.v4().services(&mut services)?;
        self.v6().services(&mut services)?;
        for (frontend, value) in services {
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
        self.v4().backends(&mut applied.backends)?;
        self.v6().backends(&mut applied.backends)?;
        self.v4().addresses(&mut applied)?;
        self.v6().addresses(&mut applied)?;
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
    /// in session affinity records (of both families) and in the
    /// per-service counters. New services get ids from here, so that a
    /// service removed before a restart cannot lend its affinity records
    /// (which name backends) or its counters to a new one. A socket-level
    /// client's record carries `AFFINITY_SOCKET_CLIENT` on its service's
    /// id, which is not part of the id.
    pub(super) fn first_unused_service_id(&self) -> Result<u32, MapIoError> {
        let service = |id: u32| (id & !AFFINITY_SOCKET_CLIENT).saturating_add(1);
        let mut next = 0u32;
        for key in self.affinity.keys() {
            let key = key.map_err(io(names::AFFINITY))?;
            next = next.max(service(key.service_id));
        }
        for key in self.affinity6.keys() {
            let key = key.map_err(io(names::AFFINITY6))?;
            next = next.max(service(key.service_id));
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
