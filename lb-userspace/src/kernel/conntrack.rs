//! Conntrack garbage collection: walks `XLB_FLOWS` a bounded number of
//! entries per pass, resuming where the last pass stopped, and deletes flows
//! idle past their timeout. The LRU map would evict them eventually; GC keeps
//! masquerade ports and memory free before it has to.

use std::os::fd::AsFd as _;

use aya::Ebpf;
use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use lb_common::{Flow, FlowKey, GlobalConfig};

use super::maps::{MapIoError, OpenError};
use super::sys;

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcPass {
    pub scanned: usize,
    /// Entries deleted (a flow has two).
    pub deleted: usize,
    /// The pass reached the end of the table (the next one starts over).
    pub wrapped: bool,
}

pub struct FlowTable {
    flows: HashMap<MapData, FlowKey, Flow>,
    /// Last key visited; the next pass continues after it.
    cursor: Option<FlowKey>,
}

impl FlowTable {
    pub fn open(ebpf: &mut Ebpf) -> Result<Self, OpenError> {
        let name = lb_common::maps::FLOWS;
        let map = ebpf.take_map(name).ok_or(OpenError::Missing { name })?;
        let flows = HashMap::try_from(map).map_err(|source| OpenError::Kind { name, source })?;
        Ok(Self {
            flows,
            cursor: None,
        })
    }

    /// The key after `key` (or the first key), via the raw syscall: aya's
    /// iterator cannot start from a given key, and restarting from the first
    /// key every pass would never reach the tail of a large table.
    fn next_key(&self, key: Option<&FlowKey>) -> Result<Option<FlowKey>, MapIoError> {
        sys::bpf_map_get_next_key(self.flows.map().fd().as_fd(), key).map_err(|io_error| {
            MapIoError {
                map: lb_common::maps::FLOWS,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_get_next_key",
                    io_error,
                }),
            }
        })
    }

    /// Visits up to `budget` entries after the cursor, deleting flows idle
    /// past their timeout at `now_ns` under `config`.
    pub fn collect_garbage(
        &mut self,
        config: &GlobalConfig,
        now_ns: u64,
        budget: usize,
    ) -> Result<GcPass, MapIoError> {
        let mut pass = GcPass::default();
        let mut expired: Vec<FlowKey> = Vec::new();
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
            let peer = FlowKey::peer_of(&flow, key.proto);
            match self.flows.get(&peer, 0) {
                Ok(peer_flow) if !peer_flow.expired(peer.proto, config, now_ns) => {
                    resume = Some(key);
                    continue;
                }
                Ok(_) => expired.push(peer),
                Err(_) => {}
            }
            expired.push(key);
        }
        // Delete after walking so the walk's cursor stays a live key.
        expired.sort_unstable_by_key(|key| {
            (
                key.src_addr_be,
                key.dst_addr_be,
                key.src_port_be,
                key.dst_port_be,
                key.proto,
            )
        });
        expired.dedup();
        for key in &expired {
            match self.flows.remove(key) {
                Ok(()) => pass.deleted += 1,
                Err(MapError::SyscallError(error))
                    if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(MapIoError {
                        map: lb_common::maps::FLOWS,
                        source,
                    });
                }
            }
        }
        self.cursor = resume.filter(|key| !expired.contains(key));
        Ok(pass)
    }
}

#[cfg(test)]
mod tests {
    use lb_common::flow::{FLOW_DIR_ORIGINAL, FLOW_DIR_REPLY, FLOW_S_SEEN_REPLY};

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
        let inserted = table.flows.insert(key, original, 0);
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
            let inserted = table.flows.insert(peer, reply, 0);
            assert!(inserted.is_ok(), "{inserted:?}");
        }
    }

    fn count(table: &FlowTable) -> usize {
        table.flows.keys().filter(Result::is_ok).count()
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
}
