//! Conntrack: find a packet's flow, record new flows (taking the masquerade
//! port atomically), and follow TCP state: half-open flows live in
//! `XLB_FLOWS_NEW` until the client acknowledges the backend's SYN-ACK, then
//! move to `XLB_FLOWS`; closed flows age out fast; a RST is believed only
//! inside the flow's window. A UDP flow is assured by its client's second
//! datagram; until then it ages out fast and yields its masquerade port
//! once idle (`FLOW_S_ASSURED`).

use aya_ebpf::{bindings::BPF_ANY, maps::LruHashMap};
use lb_common::{
    BackendOf, FlowKeyOf, FlowOf, GlobalConfig, IPPROTO_TCP, Reason,
    flow::{
        FLOW_DIR_ORIGINAL, FLOW_DIR_REPLY, FLOW_S_ASSURED, FLOW_S_CONFIRMED, FLOW_S_FIN_ORIGINAL,
        FLOW_S_FIN_REPLY, FLOW_S_RST, FLOW_S_SEEN_REPLY, FLOW_S_SYN, REFRESH_NS,
    },
};

use crate::{
    family::Ip,
    fib::NextHop,
    maps::{SCRATCH_PEER_KEY, scratch},
    parse::{Frame, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, tcp_numbers},
    snat,
};

/// A conntrack table of family `F`.
type Table<F> = LruHashMap<FlowKeyOf<F>, FlowOf<F>>;

/// What conntrack needs from a packet's TCP header (all 0 for UDP).
#[derive(Clone, Copy)]
pub struct Segment {
    flags: u8,
    seq: u32,
    ack: u32,
    /// Sequence space the segment uses: payload, plus one each for SYN, FIN.
    len: u32,
}

impl Segment {
    #[inline(always)]
    pub fn of<C: Frame, F: Ip>(ctx: &C, packet: &Packet<F>) -> Self {
        let flags = packet.l4.tcp_flags;
        let (seq, ack, payload) = tcp_numbers(ctx, &packet.ip);
        let len = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        Self {
            flags,
            seq,
            ack,
            len,
        }
    }
}

/// The table an entry lives in (see `FLOW_S_CONFIRMED`).
#[inline(always)]
fn table_of<F: Ip>(flow: &FlowOf<F>) -> &'static Table<F> {
    if flow.state & FLOW_S_CONFIRMED != 0 {
        F::flows()
    } else {
        F::flows_new()
    }
}

/// The key of (`src`, `dst`) (address and port each, in memory order) for
/// `proto`. Its fields are written one by one, the protocol and its three
/// bytes of padding as one aligned word: written as `_pad: [0; 3]`, the
/// padding was a call to the linker's byte-loop `memset` (bpf-linker's
/// in-order memcpy expansion leaves every memset to it), on every packet.
#[inline(always)]
pub fn key<F: Ip>(
    (src_addr_be, src_port_be): (F::Addr, u16),
    (dst_addr_be, dst_port_be): (F::Addr, u16),
    proto: u8,
) -> FlowKeyOf<F> {
    let mut key = core::mem::MaybeUninit::<FlowKeyOf<F>>::uninit();
    let at = key.as_mut_ptr();
    // SAFETY: every field is written below; the protocol's word is
    // aligned (checked after this function).
    unsafe {
        (&raw mut (*at).src_addr_be).write(src_addr_be);
        (&raw mut (*at).dst_addr_be).write(dst_addr_be);
        (&raw mut (*at).src_port_be).write(src_port_be);
        (&raw mut (*at).dst_port_be).write(dst_port_be);
        let word = u32::from_ne_bytes([proto, 0, 0, 0]);
        (&raw mut (*at).proto).cast::<u32>().write(word);
        key.assume_init()
    }
}

// `key`'s protocol word: 4-byte aligned in both families.
const _: () = {
    assert!(core::mem::offset_of!(lb_common::FlowKey, proto) % 4 == 0);
    assert!(core::mem::offset_of!(lb_common::FlowKey6, proto) % 4 == 0);
    assert!(core::mem::align_of::<lb_common::FlowKey>() >= 4);
    assert!(core::mem::align_of::<lb_common::FlowKey6>() >= 4);
};

/// The key of the opposite direction's entry, given `entry`'s rewrite
/// (`FlowKeyOf::peer_of`, written as `key` writes keys).
#[inline(always)]
pub fn peer_key<F: Ip>(entry: &FlowOf<F>, proto: u8) -> FlowKeyOf<F> {
    key(
        (entry.new_dst_addr_be, entry.new_dst_port_be),
        (entry.new_src_addr_be, entry.new_src_port_be),
        proto,
    )
}

/// `a` is later than `b` in sequence space.
#[inline(always)]
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The live flow for `key`, if any: present, not past its timeout, and (checked
/// once per refresh period) still paired with its peer. A stale entry is
/// deleted on sight.
#[inline(always)]
pub fn lookup<F: Ip>(key: &FlowKeyOf<F>, cfg: &GlobalConfig, now: u64) -> Option<*mut FlowOf<F>> {
    if let Some(flow) = live(F::flows(), key, cfg, now) {
        return Some(flow);
    }
    if key.proto != IPPROTO_TCP {
        return None;
    }
    live(F::flows_new(), key, cfg, now)
}

#[inline(always)]
fn live<F: Ip>(
    table: &Table<F>,
    key: &FlowKeyOf<F>,
    cfg: &GlobalConfig,
    now: u64,
) -> Option<*mut FlowOf<F>> {
    let flow = table.get_ptr_mut(key)?;
    // SAFETY: LRU values are plain integers; a concurrent update at worst
    // gives a stale timestamp.
    let entry = unsafe { &*flow };
    // An entry whose peer was evicted is gone: its masquerade port looks
    // free to new flows, so it must not keep using it.
    let due = entry.refresh_due(key.proto, cfg, now);
    if entry.expired(key.proto, cfg, now) || (due && !paired(table, key, entry)) {
        let _ = table.remove(key);
        return None;
    }
    Some(flow)
}

/// Whether `entry` (under `key`) still has its peer in `table`, pointing back.
#[inline(always)]
fn paired<F: Ip>(table: &Table<F>, key: &FlowKeyOf<F>, entry: &FlowOf<F>) -> bool {
    if F::OUTLINE {
        // IPv6: the peer's key in scratch space, off the frame at the end
        // of the longest call chain.
        let Some(peer_key) = scratch::<FlowKeyOf<F>>(SCRATCH_PEER_KEY) else {
            return false;
        };
        // SAFETY: this CPU's scratch slot, sized for a key.
        let peer = unsafe {
            *peer_key = self::peer_key(entry, key.proto);
            table.get_ptr(&*peer_key)
        };
        // SAFETY: plain-integer map value.
        return peer.is_some_and(|peer| FlowOf::is_peer(unsafe { &*peer }, key));
    }
    match table.get_ptr(peer_key(entry, key.proto)) {
        // SAFETY: plain-integer map value.
        Some(peer) => FlowOf::is_peer(unsafe { &*peer }, key),
        None => false,
    }
}

/// Whether a TCP flow has finished (RST, or FIN both ways), so a new SYN on
/// the same tuple starts a new flow instead of following the old one.
#[inline(always)]
pub fn is_closed<F: Ip>(flow: &FlowOf<F>) -> bool {
    flow.closed()
}

/// What `track` did.
pub struct Tracked<F: Ip> {
    /// The entry to use from now on (a confirmed flow moved tables).
    pub entry: *mut FlowOf<F>,
    /// The entry's cached next hop is due for a re-check.
    pub recheck: bool,
    /// A RST outside the flow's window: forwarded, but the flow stays open.
    pub rst_ignored: bool,
}

/// Records what `segment` says about the flow, in this entry and its peer,
/// refreshes both timestamps when due (`Flow::refresh_due`: judged before
/// this packet's state change, as `lookup` judged expiry), and moves a TCP
/// flow whose client just acknowledged the backend's SYN-ACK to `XLB_FLOWS`.
#[inline(always)]
pub fn track<F: Ip>(
    flow: *mut FlowOf<F>,
    key: &FlowKeyOf<F>,
    segment: &Segment,
    cfg: &GlobalConfig,
    now: u64,
) -> Tracked<F> {
    // SAFETY: `flow` came from a map lookup and stays valid during this run.
    let entry = unsafe { &mut *flow };
    let reply = entry.direction == FLOW_DIR_REPLY;
    let confirmed = entry.state & FLOW_S_CONFIRMED != 0;
    let due = entry.refresh_due(key.proto, cfg, now);
    let table = table_of(entry);
    let peer_key = peer_key(entry, key.proto);
    let mut add = if reply { FLOW_S_SEEN_REPLY } else { 0 };
    let mut rst_ignored = false;
    let mut confirm = false;
    if key.proto == IPPROTO_TCP {
        let flags = segment.flags;
        if flags & TCP_RST != 0 {
            // Nothing of an unproven RST is recorded.
            if confirmed && !rst_in_window(table, &peer_key, entry, segment.seq) {
                rst_ignored = true;
            } else {
                add |= FLOW_S_RST;
            }
        } else {
            remember_numbers(entry, segment, confirmed);
            if flags & TCP_FIN != 0 {
                add |= if reply {
                    FLOW_S_FIN_REPLY
                } else {
                    FLOW_S_FIN_ORIGINAL
                };
            }
            confirm = !confirmed
                && !reply
                && flags & (TCP_ACK | TCP_SYN) == TCP_ACK
                && entry.state & FLOW_S_SEEN_REPLY != 0;
        }
    } else if !reply {
        // The flow's first datagram created it; this one is its second.
        add |= FLOW_S_ASSURED;
    }
    let changed = add & !entry.state != 0;
    if !changed && !due && !confirm {
        return Tracked {
            entry: flow,
            recheck: entry.hop_ifindex == 0,
            rst_ignored,
        };
    }
    entry.state |= add;
    entry.last_seen_ns = now;
    let mut current = flow;
    if let Some(peer) = table.get_ptr_mut(peer_key) {
        // SAFETY: as above.
        let peer = unsafe { &mut *peer };
        peer.state |= add;
        peer.last_seen_ns = now;
        // The client's ACK must acknowledge the SYN-ACK the backend sent
        // (a blind ACK from a spoofed source cannot).
        if confirm && segment.ack == peer.seq_end {
            if let Some(moved) = promote(key, entry, &peer_key, peer) {
                current = moved;
            }
        }
    }
    Tracked {
        entry: current,
        recheck: due || entry.hop_ifindex == 0,
        rst_ignored,
    }
}

/// Keeps the highest sequence end and acknowledgement each direction has
/// sent (any value while the handshake is under way: retransmissions carry
/// the same numbers).
#[inline(always)]
fn remember_numbers<F: Ip>(entry: &mut FlowOf<F>, segment: &Segment, confirmed: bool) {
    let end = segment.seq.wrapping_add(segment.len);
    if !confirmed || seq_after(end, entry.seq_end) {
        entry.seq_end = end;
    }
    if segment.flags & TCP_ACK != 0 && (!confirmed || seq_after(segment.ack, entry.ack)) {
        entry.ack = segment.ack;
    }
}

/// Whether a RST with sequence number `seq`, sent in `entry`'s direction,
/// lies between what the receiver has acknowledged and what the sender has
/// sent: exactly where a real endpoint's RST falls (its next sequence
/// number, or the acknowledgement it answers), and where a blind guess
/// almost never does.
#[inline(always)]
fn rst_in_window<F: Ip>(
    table: &Table<F>,
    peer_key: &FlowKeyOf<F>,
    entry: &FlowOf<F>,
    seq: u32,
) -> bool {
    let Some(peer) = table.get_ptr(peer_key) else {
        return true; // Half a flow is gone anyway.
    };
    // SAFETY: plain-integer map value.
    let received = unsafe { (*peer).ack };
    seq.wrapping_sub(received) <= entry.seq_end.wrapping_sub(received)
}

/// Moves a just-confirmed flow (`entry` under `key`, `peer` under
/// `peer_key`) from `XLB_FLOWS_NEW` to `XLB_FLOWS`; returns the new entry.
/// The values are inserted straight from the old map entries (no copy on
/// the stack); the old pointers must not be used afterwards (deleted
/// elements are recycled).
#[inline(always)]
fn promote<F: Ip>(
    key: &FlowKeyOf<F>,
    entry: &mut FlowOf<F>,
    peer_key: &FlowKeyOf<F>,
    peer: &mut FlowOf<F>,
) -> Option<*mut FlowOf<F>> {
    entry.state |= FLOW_S_CONFIRMED;
    peer.state |= FLOW_S_CONFIRMED;
    let flows = F::flows();
    let mut moved = flows.insert(peer_key, &*peer, u64::from(BPF_ANY)).is_ok();
    if moved && flows.insert(key, &*entry, u64::from(BPF_ANY)).is_err() {
        let _ = flows.remove(peer_key);
        moved = false;
    }
    if !moved {
        // Still half-open, in XLB_FLOWS_NEW.
        entry.state &= !FLOW_S_CONFIRMED;
        peer.state &= !FLOW_S_CONFIRMED;
        return None;
    }
    let _ = F::flows_new().remove(key);
    let _ = F::flows_new().remove(peer_key);
    flows.get_ptr_mut(key)
}

/// Caches the FIB's answer in the entry `flow` points to.
#[inline(always)]
pub fn remember_hop<F: Ip>(flow: *mut FlowOf<F>, hop: &NextHop) {
    // SAFETY: `flow` came from a map lookup and stays valid during this run.
    let entry = unsafe { &mut *flow };
    entry.hop_ifindex = hop.ifindex;
    entry.hop_src_mac = hop.src_mac;
    entry.hop_dst_mac = hop.dst_mac;
}

/// The entry's cached next hop, if it has one.
#[inline(always)]
pub fn cached_hop<F: Ip>(flow: &FlowOf<F>) -> Option<NextHop> {
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
pub struct NewFlow<F: Ip> {
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: BackendOf<F>,
    /// Masquerade source address, or all zeros to keep the client's
    /// address (externalTrafficPolicy=Local). Not an `Option`: a `None`'s
    /// payload is undefined, and copying it (IPv6 keeps a `NewFlow` in
    /// scratch space) reads registers the verifier knows were never set.
    pub masquerade_addr_be: F::Addr,
    pub syn: bool,
    /// Where the FIB sends the client's packets (cached in the entry).
    pub hop: NextHop,
}

impl<F: Ip> NewFlow<F> {
    /// Whether the flow's source is the masquerade address.
    #[inline(always)]
    pub fn masquerades(&self) -> bool {
        self.masquerade_addr_be != F::Addr::default()
    }
}

/// Records a new flow (both entries); `segment` is its first packet's.
/// TCP flows start half-open in `XLB_FLOWS_NEW`; UDP flows go to
/// `XLB_FLOWS`. `created` finds the ORIGINAL entry afterwards.
#[inline(always)]
pub fn create<F: Ip>(
    key: &FlowKeyOf<F>,
    new: &NewFlow<F>,
    segment: &Segment,
    cfg: &GlobalConfig,
    now: u64,
) -> Result<(), Reason> {
    let tcp = key.proto == IPPROTO_TCP;
    let table = if tcp { F::flows_new() } else { F::flows() };
    let (src_addr_be, src_port_be) = if new.masquerades() {
        (new.masquerade_addr_be, 0)
    } else {
        (key.src_addr_be, key.src_port_be)
    };
    // The tuple the backend's replies carry (with masquerade, its port is
    // chosen below).
    let mut reply_key = self::key::<F>(
        (new.backend.addr_be, new.backend.port_be),
        (src_addr_be, src_port_be),
        key.proto,
    );
    // One entry on the stack: the REPLY entry, then rewritten in place into
    // the ORIGINAL one.
    let mut entry = reply_entry(key, new, now);
    insert_reply(table, key, &mut reply_key, &entry, new, cfg, now)?;
    into_original(&mut entry, new, src_addr_be, &reply_key, segment);
    if tcp {
        // A closed or expired flow on this tuple must not shadow the new one.
        let _ = F::flows().remove(key);
    }
    if table.insert(key, &entry, u64::from(BPF_ANY)).is_err() {
        let _ = table.remove(&reply_key);
        return Err(Reason::DropFlowInsert);
    }
    Ok(())
}

/// The REPLY entry of a new flow on `key`: the backend's replies are
/// rewritten back to the client's tuple. TCP starts unconfirmed.
#[inline(always)]
fn reply_entry<F: Ip>(key: &FlowKeyOf<F>, new: &NewFlow<F>, now: u64) -> FlowOf<F> {
    let mut state = if new.syn { FLOW_S_SYN } else { 0 };
    if key.proto != IPPROTO_TCP {
        state |= FLOW_S_CONFIRMED;
    }
    FlowOf {
        new_src_addr_be: key.dst_addr_be,
        new_dst_addr_be: key.src_addr_be,
        new_src_port_be: key.dst_port_be,
        new_dst_port_be: key.src_port_be,
        backend_id: new.backend_id,
        service_id: new.service_id,
        direction: FLOW_DIR_REPLY,
        state,
        _pad: [0; 2],
        last_seen_ns: now,
        created_ns: now,
        hop_ifindex: 0,
        hop_src_mac: new.hop.src_mac,
        hop_dst_mac: new.hop.dst_mac,
        seq_end: 0,
        ack: 0,
    }
}

/// Inserts the reply entry first, only if its tuple is free: that is what
/// takes the masquerade port. A reply can only follow the forwarded
/// packet, which leaves after both entries exist.
#[inline(always)]
fn insert_reply<F: Ip>(
    table: &Table<F>,
    key: &FlowKeyOf<F>,
    reply_key: &mut FlowKeyOf<F>,
    reply: &FlowOf<F>,
    new: &NewFlow<F>,
    cfg: &GlobalConfig,
    now: u64,
) -> Result<(), Reason> {
    if new.masquerades() {
        return snat::take_port(key, reply_key, reply, cfg, now);
    }
    if !free_or_reclaimed(table, reply_key, key, cfg, now) {
        return Err(Reason::DropFlowInsert);
    }
    table
        .insert(reply_key, reply, u64::from(BPF_ANY))
        .map_err(|_| Reason::DropFlowInsert)
}

/// Rewrites the reply entry in place into the ORIGINAL one: the client's
/// packets go to the backend from `src_addr_be` and the reply tuple's port.
#[inline(always)]
fn into_original<F: Ip>(
    entry: &mut FlowOf<F>,
    new: &NewFlow<F>,
    src_addr_be: F::Addr,
    reply_key: &FlowKeyOf<F>,
    segment: &Segment,
) {
    entry.new_src_addr_be = src_addr_be;
    entry.new_dst_addr_be = new.backend.addr_be;
    entry.new_src_port_be = reply_key.dst_port_be;
    entry.new_dst_port_be = new.backend.port_be;
    entry.direction = FLOW_DIR_ORIGINAL;
    entry.hop_ifindex = new.hop.ifindex;
    entry.seq_end = segment.seq.wrapping_add(segment.len);
    entry.ack = if segment.flags & TCP_ACK != 0 {
        segment.ack
    } else {
        0
    };
}

/// The ORIGINAL entry `create` just recorded for `key` (gone only if the
/// LRU evicted it already).
#[inline(always)]
pub fn created<F: Ip>(key: &FlowKeyOf<F>) -> Option<*mut FlowOf<F>> {
    if key.proto == IPPROTO_TCP {
        F::flows_new().get_ptr_mut(key)
    } else {
        F::flows().get_ptr_mut(key)
    }
}

/// Whether the reply tuple `reply_key` can be taken for the client `key`:
/// nobody has it, or its holder is this very client tuple, past its timeout,
/// or (idle for a refresh period at least) half a flow whose other half was
/// evicted or a UDP flow not assured. Such a holder is deleted.
// Not inlined: a subprogram of its own keeps the port loop within the
// 512-byte stack.
#[inline(never)]
pub(crate) fn free_or_reclaimed<F: Ip>(
    table: &Table<F>,
    reply_key: &FlowKeyOf<F>,
    key: &FlowKeyOf<F>,
    cfg: &GlobalConfig,
    now: u64,
) -> bool {
    let Some(taken) = table.get_ptr(reply_key) else {
        return true;
    };
    // SAFETY: plain-integer map value.
    let taken = unsafe { &*taken };
    // Unpaired only counts once the entry has settled: a flow being created
    // on another CPU has its reply entry in before its original one, and
    // taking that over would give two clients one reply tuple (seen in
    // one_masquerade_port_two_cpus_at_once).
    let settled = now.saturating_sub(taken.last_seen_ns) >= REFRESH_NS;
    // A UDP flow of one datagram, idle since: a spoofed source's, or a
    // query answered long ago. Its port serves a new flow better.
    let unassured = key.proto != IPPROTO_TCP && taken.state & FLOW_S_ASSURED == 0;
    let reclaim = FlowOf::is_peer(taken, key)
        || taken.expired(key.proto, cfg, now)
        || (settled && (unassured || !paired(table, reply_key, taken)));
    if reclaim {
        let _ = table.remove(reply_key);
    }
    reclaim
}
