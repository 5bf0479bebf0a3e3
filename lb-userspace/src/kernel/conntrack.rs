//! Conntrack garbage collection: walks `XLB_FLOWS` and `XLB_FLOWS_NEW`, and
//! their IPv6 twins `XLB_FLOWS6` and `XLB_FLOWS_NEW6`, a bounded number of
//! entries per pass, resuming where the last pass stopped,
//! and deletes flows past their timeout. The LRU maps would evict them
//! eventually; GC keeps masquerade ports and memory free before it has to.
//!
//! The syscalls offer no compare-and-delete, so just before deleting an
//! entry GC reads it again and keeps it if it changed since the walk (a
//! packet refreshed it, or the datapath re-created the flow on that tuple).
//! That leaves a window of one syscall instead of a whole pass.

use std::os::fd::AsFd as _;

use aya::Ebpf;
use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use lb_common::{Family, FlowKeyOf, FlowOf, GlobalConfig, V4, V6};

use super::maps::{MapIoError, OpenError};
use super::sys;
use crate::reconcile::PortSet;

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcPass {
    pub scanned: usize,
    /// Entries deleted (a flow has two).
    pub deleted: usize,
    /// The pass reached the end of the table (the next one starts over).
    pub wrapped: bool,
}

/// The conntrack tables of both families.
pub struct FlowTable {
    established: Table<V4>,
    half_open: Table<V4>,
    established6: Table<V6>,
    half_open6: Table<V6>,
}

impl FlowTable {
    pub fn open(ebpf: &mut Ebpf) -> Result<Self, OpenError> {
        use lb_common::maps::{FLOWS, FLOWS_NEW, FLOWS_NEW6, FLOWS6};
        Ok(Self {
            established: Table::open(ebpf, FLOWS)?,
            half_open: Table::open(ebpf, FLOWS_NEW)?,
            established6: Table::open(ebpf, FLOWS6)?,
            half_open6: Table::open(ebpf, FLOWS_NEW6)?,
        })
    }

    /// One bounded pass over each table (`budget` entries each).
    pub fn collect_garbage(
        &mut self,
        config: &GlobalConfig,
        now_ns: u64,
        budget: usize,
    ) -> Result<GcPass, MapIoError> {
        let passes = [
            self.established.collect_garbage(config, now_ns, budget)?,
            self.half_open.collect_garbage(config, now_ns, budget)?,
            self.established6.collect_garbage(config, now_ns, budget)?,
            self.half_open6.collect_garbage(config, now_ns, budget)?,
        ];
        Ok(GcPass {
            scanned: passes.iter().map(|pass| pass.scanned).sum(),
            deleted: passes.iter().map(|pass| pass.deleted).sum(),
            wrapped: passes.iter().all(|pass| pass.wrapped),
        })
    }
}

impl FlowTable {
    /// Every port of every key in every table (`None` if a walk kept being
    /// restarted by deletions and did not finish): what the port filter
    /// must keep listed. Keys only, one syscall each.
    pub fn ports_in_use(&self) -> Result<Option<PortSet>, MapIoError> {
        let mut ports = PortSet::default();
        let finished = self.established.add_ports(&mut ports)?
            && self.half_open.add_ports(&mut ports)?
            && self.established6.add_ports(&mut ports)?
            && self.half_open6.add_ports(&mut ports)?;
        Ok(finished.then_some(ports))
    }
}

/// One conntrack map and where its walk stands.
struct Table<F: Family> {
    name: &'static str,
    flows: HashMap<MapData, FlowKeyOf<F>, FlowOf<F>>,
    /// Last key visited; the next pass continues after it.
    cursor: Option<FlowKeyOf<F>>,
}

/// Entries a walk found expired, as it saw them.
type Expired<F> = Vec<(FlowKeyOf<F>, FlowOf<F>)>;

/// What one pass's walk saw, the expired entries, and where the next pass
/// resumes.
type Walked<F> = (GcPass, Expired<F>, Option<FlowKeyOf<F>>);

impl<F: Family> Table<F> {
    fn open(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, OpenError> {
        let map = ebpf.take_map(name).ok_or(OpenError::Missing { name })?;
        let flows = HashMap::try_from(map).map_err(|source| OpenError::Kind { name, source })?;
        Ok(Self {
            name,
            flows,
            cursor: None,
        })
    }

    /// The key after `key` (or the first key), via the raw syscall: aya's
    /// iterator cannot start from a given key, and restarting from the first
    /// key every pass would never reach the tail of a large table.
    fn next_key(&self, key: Option<&FlowKeyOf<F>>) -> Result<Option<FlowKeyOf<F>>, MapIoError> {
        sys::bpf_map_get_next_key(self.flows.map().fd().as_fd(), key).map_err(|io_error| {
            MapIoError {
                map: self.name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_get_next_key",
                    io_error,
                }),
            }
        })
    }

    /// Visits up to `budget` entries after the cursor, deleting flows idle
    /// past their timeout at `now_ns` under `config`.
    fn collect_garbage(
        &mut self,
        config: &GlobalConfig,
        now_ns: u64,
        budget: usize,
    ) -> Result<GcPass, MapIoError> {
        let (mut pass, expired, resume) = self.walk(config, now_ns, budget)?;
        pass.deleted = self.delete(&expired)?;
        self.cursor = resume.filter(|key| !expired.iter().any(|(gone, _)| gone == key));
        Ok(pass)
    }

    /// The walk of one pass: what it saw, the expired entries as it saw
    /// them (each once), and where the next pass resumes.
    fn walk(
        &mut self,
        config: &GlobalConfig,
        now_ns: u64,
        budget: usize,
    ) -> Result<Walked<F>, MapIoError> {
        let mut pass = GcPass::default();
        // Each key with the entry as the walk saw it.
        let mut expired: Expired<F> = Vec::new();
        let mut cursor = self.cursor;
        // Where the next pass resumes: the last key visited that survives.
        let mut resume = self.cursor;
        while pass.scanned < budget {
            // If the cursor's entry was deleted meanwhile, the kernel restarts
            // from the first key: at worst some entries are visited twice.
            let Some(key) = self.next_key(cursor.as_ref())? else {
                pass.wrapped = true;
                resume = None;
                break;
            };
            pass.scanned += 1;
            cursor = Some(key);
            let Ok(flow) = self.flows.get(&key, 0) else {
                continue; // Evicted or closed by the datapath meanwhile.
            };
            if !flow.expired(key.proto, config, now_ns) {
                resume = Some(key);
                continue;
            }
            // A flow is idle only if both directions are: replies alone keep
            // a one-way-from-backend flow alive and vice versa.
            let peer = FlowKeyOf::peer_of(&flow, key.proto);
            match self.flows.get(&peer, 0) {
                Ok(peer_flow) if !peer_flow.expired(peer.proto, config, now_ns) => {
                    resume = Some(key);
                    continue;
                }
                Ok(peer_flow) => expired.push((peer, peer_flow)),
                Err(_) => {}
            }
            expired.push((key, flow));
        }
        // Delete after walking so the walk's cursor stays a live key; a
        // flow's two entries may both have been seen.
        let mut seen = std::collections::HashSet::with_capacity(expired.len());
        expired.retain(|(key, _)| seen.insert(*key));
        Ok((pass, expired, resume))
    }

    /// Adds the ports of every key to `ports`; false if the walk did not
    /// reach the end within a few times the table's size (a deleted cursor
    /// restarts it from the first key).
    fn add_ports(&self, ports: &mut PortSet) -> Result<bool, MapIoError> {
        let size = self
            .flows
            .map()
            .info()
            .map_or(1 << 20, |info| info.max_entries());
        let mut cursor = None;
        for _ in 0..4 * u64::from(size) {
            let Some(key) = self.next_key(cursor.as_ref())? else {
                return Ok(true);
            };
            ports.insert(u16::from_be(key.src_port_be));
            ports.insert(u16::from_be(key.dst_port_be));
            cursor = Some(key);
        }
        Ok(false)
    }

    /// Deletes `expired` entries that are still as the walk saw them;
    /// returns how many went.
    fn delete(&mut self, expired: &[(FlowKeyOf<F>, FlowOf<F>)]) -> Result<usize, MapIoError> {
        let mut deleted = 0;
        for (key, seen) in expired {
            // Re-read just before deleting: a flow refreshed or re-created
            // since the walk decided is no longer this one.
            match self.flows.get(key, 0) {
                Ok(now)
                    if now.last_seen_ns == seen.last_seen_ns
                        && now.created_ns == seen.created_ns => {}
                _ => continue,
            }
            match self.flows.remove(key) {
                Ok(()) => deleted += 1,
                Err(MapError::SyscallError(error))
                    if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(MapIoError {
                        map: self.name,
                        source,
                    });
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use lb_common::flow::{FLOW_DIR_ORIGINAL, FLOW_DIR_REPLY, FLOW_S_SEEN_REPLY};
    use lb_common::{Flow, Flow6, FlowKey, FlowKey6};

    use super::*;
    use crate::error_chain;
    use crate::kernel::{Datapath, TEST_SIZES, is_root};

    const SECOND: u64 = 1_000_000_000;
    const NOW: u64 = 10_000 * SECOND;

    fn table() -> Option<FlowTable> {
        if !is_root() {
            eprintln!("skipped: loading BPF needs root");
            return None;
        }
        match Datapath::load(TEST_SIZES) {
            Ok(loaded) => Some(loaded.flows),
            Err(error) => panic!("{}", error_chain(&error)),
        }
    }

    /// Inserts both entries of a UDP flow from client port `port`; each
    /// entry last seen at the given time.
    fn insert_flow(table: &mut FlowTable, port: u16, original_seen: u64, reply_seen: Option<u64>) {
        let key = FlowKey {
            src_addr_be: u32::from_ne_bytes([198, 18, 9, 1]),
            dst_addr_be: u32::from_ne_bytes([198, 18, 0, 1]),
            src_port_be: port.to_be(),
            dst_port_be: 30053u16.to_be(),
            proto: lb_common::IPPROTO_UDP,
            _pad: [0; 3],
        };
        let original = Flow {
            new_src_addr_be: u32::from_ne_bytes([198, 18, 0, 1]),
            new_dst_addr_be: u32::from_ne_bytes([198, 18, 1, 2]),
            new_src_port_be: (61_000 + port).to_be(),
            new_dst_port_be: 53u16.to_be(),
            backend_id: 1,
            service_id: 1,
            direction: FLOW_DIR_ORIGINAL,
            state: FLOW_S_SEEN_REPLY,
            last_seen_ns: original_seen,
            ..Flow::default()
        };
        let inserted = table.established.flows.insert(key, original, 0);
        assert!(inserted.is_ok(), "{inserted:?}");
        if let Some(reply_seen) = reply_seen {
            let reply = Flow {
                new_src_addr_be: key.dst_addr_be,
                new_dst_addr_be: key.src_addr_be,
                new_src_port_be: key.dst_port_be,
                new_dst_port_be: key.src_port_be,
                direction: FLOW_DIR_REPLY,
                last_seen_ns: reply_seen,
                ..original
            };
            let peer = FlowKey::peer_of(&original, key.proto);
            let inserted = table.established.flows.insert(peer, reply, 0);
            assert!(inserted.is_ok(), "{inserted:?}");
        }
    }

    fn count(table: &FlowTable) -> usize {
        table.established.flows.keys().filter(Result::is_ok).count()
    }

    #[test]
    fn idle_flows_go_and_live_ones_stay() {
        let Some(mut table) = table() else { return };
        let config = GlobalConfig {
            udp_timeout_s: 60,
            ..GlobalConfig::DEFAULT
        };
        let old = NOW - 61 * SECOND;
        insert_flow(&mut table, 1, old, Some(old)); // idle both ways: goes
        insert_flow(&mut table, 2, NOW, Some(NOW)); // live: stays
        insert_flow(&mut table, 3, old, Some(NOW)); // replies still flowing: stays
        insert_flow(&mut table, 4, old, None); // idle, peer already gone: goes
        assert_eq!(count(&table), 7);
        let pass = table.collect_garbage(&config, NOW, 1000);
        let pass = pass.map_err(|e| error_chain(&e));
        assert_eq!(
            pass,
            Ok(GcPass {
                scanned: 7,
                deleted: 3,
                wrapped: true
            })
        );
        assert_eq!(count(&table), 4);
    }

    #[test]
    fn bounded_passes_resume_and_cover_the_table() {
        let Some(mut table) = table() else { return };
        let config = GlobalConfig::DEFAULT;
        for port in 0..10 {
            insert_flow(&mut table, 100 + port, NOW, None);
        }
        for port in 0..10 {
            insert_flow(&mut table, 200 + port, 0, None);
        }
        let mut passes = 0;
        let mut deleted = 0;
        loop {
            passes += 1;
            let pass = table.collect_garbage(&config, NOW, 3);
            let Ok(pass) = pass else { panic!("{pass:?}") };
            assert!(pass.scanned <= 3);
            deleted += pass.deleted;
            if pass.wrapped || passes > 40 {
                break;
            }
        }
        assert_eq!(deleted, 10, "after {passes} passes");
        assert_eq!(count(&table), 10);
    }

    #[test]
    fn a_flow_recreated_after_the_walk_survives() {
        let Some(mut table) = table() else { return };
        let config = GlobalConfig::DEFAULT;
        insert_flow(&mut table, 300, 0, Some(0)); // expired both ways
        insert_flow(&mut table, 301, 0, Some(0));
        let walked = table.established.walk(&config, NOW, 1000);
        let Ok((_, expired, _)) = walked else {
            panic!("{walked:?}")
        };
        assert_eq!(expired.len(), 4);
        // The datapath re-creates the flow from port 300 before the delete.
        insert_flow(&mut table, 300, NOW, Some(NOW));
        let deleted = table.established.delete(&expired);
        assert_eq!(deleted.map_err(|e| error_chain(&e)), Ok(2));
        assert_eq!(count(&table), 2, "the re-created flow is still there");
    }

    #[test]
    fn the_port_walk_sees_every_port_of_every_key() {
        let Some(mut table) = table() else {
            return;
        };
        assert_eq!(
            table.ports_in_use().ok().flatten(),
            Some(PortSet::default())
        );
        insert_flow(&mut table, 1_000, NOW, Some(NOW));
        let Ok(Some(ports)) = table.ports_in_use() else {
            panic!("the walk did not finish");
        };
        // The original key's ports, then the reply key's: backend port 53
        // and the masquerade port.
        let seen: Vec<u16> = ports.iter().collect();
        assert_eq!(seen, [53, 1_000, 30053, 62_000]);
    }

    /// IPv6 flows are collected and their ports kept listed, as IPv4's.
    #[test]
    fn ipv6_flows_are_collected_and_their_ports_counted() {
        let Some(mut table) = table() else { return };
        let config = GlobalConfig {
            udp_timeout_s: 60,
            ..GlobalConfig::DEFAULT
        };
        let addr = |last: u16| -> lb_common::Addr6 {
            let address = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last);
            lb_common::family::addr6(address.octets())
        };
        let old = NOW - 61 * SECOND;
        for (port, seen) in [(40_001u16, old), (40_002, NOW)] {
            let key = FlowKey6 {
                src_addr_be: addr(2),
                dst_addr_be: addr(1),
                src_port_be: port.to_be(),
                dst_port_be: 30053u16.to_be(),
                proto: lb_common::IPPROTO_UDP,
                _pad: [0; 3],
            };
            let flow = Flow6 {
                new_src_addr_be: addr(1),
                new_dst_addr_be: addr(0x12),
                new_src_port_be: port.to_be(),
                new_dst_port_be: 53u16.to_be(),
                direction: FLOW_DIR_ORIGINAL,
                last_seen_ns: seen,
                ..Flow6::default()
            };
            let inserted = table.established6.flows.insert(key, flow, 0);
            assert!(inserted.is_ok(), "{inserted:?}");
        }
        let ports = table.ports_in_use().map_err(|e| error_chain(&e));
        let ports = ports.ok().flatten().unwrap_or_else(|| panic!("no ports"));
        assert!(ports.contains(40_001) && ports.contains(40_002) && ports.contains(30053));
        let pass = table.collect_garbage(&config, NOW, 100);
        assert_eq!(pass.map(|pass| pass.deleted).ok(), Some(1), "the idle one");
        let left: Vec<u16> = (table.established6.flows.keys())
            .filter_map(Result::ok)
            .map(|key| u16::from_be(key.src_port_be))
            .collect();
        assert_eq!(left, [40_002]);
    }
}
