//! Conntrack: find a packet's flow, record new flows (choosing the
//! masquerade port), and follow TCP state so closed flows age out fast.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    Backend, Flow, FlowKey, GlobalConfig, IPPROTO_TCP, Reason,
    flow::{
        FLOW_DIR_ORIGINAL, FLOW_DIR_REPLY, FLOW_S_FIN_ORIGINAL, FLOW_S_FIN_REPLY, FLOW_S_RST,
        FLOW_S_SEEN_REPLY, FLOW_S_SYN,
    },
    hash::flow_hash,
};

use crate::{
    fib::NextHop,
    maps::XLB_FLOWS,
    parse::{TCP_FIN, TCP_RST},
};

/// Masquerade ports tried per new flow before giving up: with the range
/// half full, 16 tries fail once in 65,536 new flows.
const SNAT_PORT_TRIES: u32 = 16;
/// Step between tries; prime, so tries spread over the whole range.
const SNAT_PORT_STEP: u32 = 7_919;
/// `last_seen_ns` is rewritten at most this often per flow, to keep the
/// established path from dirtying a shared cache line on every packet.
const REFRESH_NS: u64 = 1_000_000_000;

/// The live flow for `key`, if any: present and not idle past its timeout.
#[inline(always)]
pub fn lookup(key: &FlowKey, cfg: &GlobalConfig, now: u64) -> Option<*mut Flow> {
    let flow = XLB_FLOWS.get_ptr_mut(key)?;
    // SAFETY: LRU values are plain integers; a concurrent update at worst
    // gives a stale timestamp.
    if unsafe { (*flow).expired(key.proto, cfg, now) } {
        return None;
    }
    Some(flow)
}

/// Whether a TCP flow has finished (RST, or FIN both ways), so a new SYN on
/// the same tuple starts a new flow instead of following the old one.
#[inline(always)]
pub fn is_closed(flow: &Flow) -> bool {
    let both_fins = FLOW_S_FIN_ORIGINAL | FLOW_S_FIN_REPLY;
    flow.state & FLOW_S_RST != 0 || flow.state & both_fins == both_fins
}

/// Records what `tcp_flags` (0 for UDP) says about the flow, in this entry and
/// its peer, and refreshes both timestamps when due. Returns whether the
/// entry's cached next hop is due for a re-check too.
#[inline(always)]
pub fn track(flow: *mut Flow, proto: u8, tcp_flags: u8, now: u64) -> bool {
    // SAFETY: `flow` came from a map lookup and stays valid during this run.
    let entry = unsafe { &mut *flow };
    let reply = entry.direction == FLOW_DIR_REPLY;
    let mut add = if reply { FLOW_S_SEEN_REPLY } else { 0 };
    if proto == IPPROTO_TCP {
        if tcp_flags & TCP_FIN != 0 {
            add |= if reply {
                FLOW_S_FIN_REPLY
            } else {
                FLOW_S_FIN_ORIGINAL
            };
        }
        if tcp_flags & TCP_RST != 0 {
            add |= FLOW_S_RST;
        }
    }
    let changed = add & !entry.state != 0;
    let due = now.saturating_sub(entry.last_seen_ns) >= REFRESH_NS;
    if !changed && !due {
        return entry.hop_ifindex == 0;
    }
    entry.state |= add;
    entry.last_seen_ns = now;
    if let Some(peer) = XLB_FLOWS.get_ptr_mut(FlowKey::peer_of(entry, proto)) {
        // SAFETY: as above.
        let peer = unsafe { &mut *peer };
        peer.state |= add;
        peer.last_seen_ns = now;
    }
    due || entry.hop_ifindex == 0
}

/// Caches the FIB's answer in the entry `flow` points to.
#[inline(always)]
pub fn remember_hop(flow: *mut Flow, hop: &NextHop) {
    // SAFETY: `flow` came from a map lookup and stays valid during this run.
    let entry = unsafe { &mut *flow };
    entry.hop_ifindex = hop.ifindex;
    entry.hop_src_mac = hop.src_mac;
    entry.hop_dst_mac = hop.dst_mac;
}

/// The entry's cached next hop, if it has one.
#[inline(always)]
pub fn cached_hop(flow: &Flow) -> Option<NextHop> {
    if flow.hop_ifindex == 0 {
        return None;
    }
    Some(NextHop {
        ifindex: flow.hop_ifindex,
        src_mac: flow.hop_src_mac,
        dst_mac: flow.hop_dst_mac,
    })
}

/// What a new flow needs besides the packet's own tuple.
pub struct NewFlow {
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: Backend,
    /// Masquerade source address, or `None` to keep the client's address
    /// (externalTrafficPolicy=Local).
    pub masquerade_addr_be: Option<u32>,
    pub syn: bool,
    /// Where the FIB sends the client's packets (cached in the entry).
    pub hop: NextHop,
}

/// Records a new flow (both entries) and returns the ORIGINAL entry.
#[inline(always)]
pub fn create(key: &FlowKey, new: &NewFlow, cfg: &GlobalConfig, now: u64) -> Result<Flow, Reason> {
    let (src_addr_be, src_port_be) = match new.masquerade_addr_be {
        Some(addr) => (addr, masquerade_port(key, addr, &new.backend, cfg, now)?),
        None => (key.src_addr_be, key.src_port_be),
    };
    let state = if new.syn { FLOW_S_SYN } else { 0 };
    let original = Flow {
        new_src_addr_be: src_addr_be,
        new_dst_addr_be: new.backend.addr_be,
        new_src_port_be: src_port_be,
        new_dst_port_be: new.backend.port_be,
        backend_id: new.backend_id,
        service_id: new.service_id,
        direction: FLOW_DIR_ORIGINAL,
        state,
        _pad: [0; 2],
        last_seen_ns: now,
        created_ns: now,
        hop_ifindex: new.hop.ifindex,
        hop_src_mac: new.hop.src_mac,
        hop_dst_mac: new.hop.dst_mac,
    };
    let reply = Flow {
        new_src_addr_be: key.dst_addr_be,
        new_dst_addr_be: key.src_addr_be,
        new_src_port_be: key.dst_port_be,
        new_dst_port_be: key.src_port_be,
        direction: FLOW_DIR_REPLY,
        hop_ifindex: 0,
        ..original
    };
    // The reply entry first: a reply can only follow the forwarded packet,
    // which leaves after both entries exist.
    XLB_FLOWS
        .insert(
            FlowKey::peer_of(&original, key.proto),
            reply,
            u64::from(BPF_ANY),
        )
        .map_err(|_| Reason::DropFlowInsert)?;
    XLB_FLOWS
        .insert(key, original, u64::from(BPF_ANY))
        .map_err(|_| Reason::DropFlowInsert)?;
    Ok(original)
}

/// A masquerade source port whose reply tuple (backend -> addr:port) is free,
/// or already belongs to this very client tuple.
#[inline(always)]
fn masquerade_port(
    key: &FlowKey,
    addr_be: u32,
    backend: &Backend,
    cfg: &GlobalConfig,
    now: u64,
) -> Result<u16, Reason> {
    let (min, max) = (u32::from(cfg.snat_port_min), u32::from(cfg.snat_port_max));
    let span = if max >= min { max - min + 1 } else { 1 };
    let start = flow_hash(key, cfg.hash_seed ^ 0x9e37_79b9);
    let mut reply_key = FlowKey {
        src_addr_be: backend.addr_be,
        dst_addr_be: addr_be,
        src_port_be: backend.port_be,
        dst_port_be: 0,
        proto: key.proto,
        _pad: [0; 3],
    };
    for attempt in 0..SNAT_PORT_TRIES {
        let offset = start.wrapping_add(attempt.wrapping_mul(SNAT_PORT_STEP)) % span;
        let port_be = ((min + offset) as u16).to_be();
        reply_key.dst_port_be = port_be;
        let Some(taken) = XLB_FLOWS.get_ptr(reply_key) else {
            return Ok(port_be);
        };
        // SAFETY: plain-integer map value.
        let taken = unsafe { &*taken };
        let ours = taken.new_dst_addr_be == key.src_addr_be
            && taken.new_dst_port_be == key.src_port_be
            && taken.new_src_addr_be == key.dst_addr_be
            && taken.new_src_port_be == key.dst_port_be;
        if ours || taken.expired(key.proto, cfg, now) {
            return Ok(port_be);
        }
    }
    Err(Reason::DropSnatExhausted)
}
