//! The conntrack walk `xlb flows` reads: both families' tables, each flow
//! once by its ORIGINAL entry, in the family-free shape the CLI prints.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Instant;

use aya::Pod;
use aya::maps::{HashMap, MapData};
use lb_common::flow::FLOW_DIR_ORIGINAL;
use lb_common::maps as names;
use lb_common::{Flow, FlowKeyOf, FlowOf};

use super::DatapathMaps;
use crate::kernel::maps::MapFamily;

/// One flow (its ORIGINAL entry, the client's direction), of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub proto: u8,
    /// As the client sent it: client -> frontend.
    pub original: (SocketAddr, SocketAddr),
    /// As the backend sees it: masquerade address -> backend.
    pub translated: (SocketAddr, SocketAddr),
    pub service_id: u32,
    pub backend_id: u32,
    /// `FLOW_S_*`.
    pub state: u8,
    pub created_ns: u64,
    /// Last packet in either direction (the REPLY entry's, if later); while
    /// the walk's filter runs, the ORIGINAL entry's own.
    pub last_seen_ns: u64,
}

impl FlowEntry {
    fn of<F: MapFamily>(key: &FlowKeyOf<F>, flow: &FlowOf<F>) -> Self
    where
        F::Addr: Pod,
    {
        let address = |addr: &F::Addr, port_be: u16| {
            SocketAddr::new(F::from_map(addr), u16::from_be(port_be))
        };
        FlowEntry {
            proto: key.proto,
            original: (
                address(&key.src_addr_be, key.src_port_be),
                address(&key.dst_addr_be, key.dst_port_be),
            ),
            translated: (
                address(&flow.new_src_addr_be, flow.new_src_port_be),
                address(&flow.new_dst_addr_be, flow.new_dst_port_be),
            ),
            service_id: flow.service_id,
            backend_id: flow.backend_id,
            state: flow.state,
            created_ns: flow.created_ns,
            last_seen_ns: flow.last_seen_ns,
        }
    }

    /// Whether the flow is past its timeout at `now_ns` (the timeouts
    /// depend on the protocol and state only, so an IPv4 entry of the same
    /// state and times answers for either family).
    pub fn expired(&self, config: &lb_common::GlobalConfig, now_ns: u64) -> bool {
        let timing = Flow {
            state: self.state,
            created_ns: self.created_ns,
            last_seen_ns: self.last_seen_ns,
            ..Flow::default()
        };
        timing.expired(self.proto, config, now_ns)
    }
}

/// What one conntrack walk found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowWalk {
    /// Flows kept by the filter, up to the limit, in walk order.
    pub flows: Vec<FlowEntry>,
    /// Flows the filter kept, including those past the limit.
    pub matched: u64,
    /// Entries visited (two per flow).
    pub entries: u64,
    pub complete: bool,
}

impl DatapathMaps {
    /// Walks conntrack (IPv4's tables, then IPv6's) until `deadline`,
    /// keeping up to `limit` flows for which `keep` holds. Each flow is
    /// reported once, by its ORIGINAL entry, with the later of its two
    /// entries' last-seen times.
    pub fn flows(
        &self,
        limit: usize,
        deadline: Instant,
        mut keep: impl FnMut(&FlowEntry) -> bool,
    ) -> FlowWalk {
        let mut walk = FlowWalk {
            complete: true,
            ..FlowWalk::default()
        };
        let mut walker = Walker {
            limit,
            deadline,
            keep: &mut keep,
        };
        walker.table(self, Some(&self.flows), names::FLOWS, &mut walk);
        walker.table(self, self.half_open.as_ref(), names::FLOWS_NEW, &mut walk);
        walker.table(self, self.flows6.as_ref(), names::FLOWS6, &mut walk);
        walker.table(self, self.half_open6.as_ref(), names::FLOWS_NEW6, &mut walk);
        walk
    }
}

/// One walk's limits and filter.
struct Walker<'a, K: FnMut(&FlowEntry) -> bool> {
    limit: usize,
    deadline: Instant,
    keep: &'a mut K,
}

impl<K: FnMut(&FlowEntry) -> bool> Walker<'_, K> {
    /// Walks one table into `walk`.
    fn table<F: MapFamily>(
        &mut self,
        maps: &DatapathMaps,
        table: Option<&HashMap<MapData, FlowKeyOf<F>, FlowOf<F>>>,
        name: &'static str,
        walk: &mut FlowWalk,
    ) where
        F::Addr: Pod,
    {
        let Some(table) = table else { return };
        let cap = u64::from(maps.capacity(name));
        // A deleted cursor key restarts the kernel's walk from the first key:
        // remember what was seen so no flow is reported twice.
        let mut seen: HashSet<FlowKeyOf<F>> = HashSet::new();
        for (visited, key) in (0u64..).zip(table.keys()) {
            if Instant::now() >= self.deadline || visited >= cap.saturating_mul(2) {
                walk.complete = false;
                break;
            }
            let Ok(key) = key else { break };
            walk.entries += 1;
            if !seen.insert(key) {
                continue;
            }
            let Ok(flow) = table.get(&key, 0) else {
                continue; // Closed, evicted or confirmed meanwhile.
            };
            if flow.direction != FLOW_DIR_ORIGINAL {
                continue;
            }
            let mut entry = FlowEntry::of(&key, &flow);
            if !(self.keep)(&entry) {
                continue;
            }
            walk.matched += 1;
            if walk.flows.len() >= self.limit {
                continue;
            }
            let peer = FlowKeyOf::peer_of(&flow, key.proto);
            let reply_seen = table.get(&peer, 0).map_or(0, |reply| reply.last_seen_ns);
            entry.last_seen_ns = flow.last_seen_ns.max(reply_seen);
            walk.flows.push(entry);
        }
    }
}
