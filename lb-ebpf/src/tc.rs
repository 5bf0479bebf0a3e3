//! xlb's tc programs, for where XDP cannot be right (see README "Hooks"):
//!
//! - `xlb_tc_uplink` (tc ingress on each uplink, after XDP): sends on the
//!   frames the XDP program rewrote but could not deliver itself because
//!   their next hop takes no XDP frames (a pod's veth, a bridge, a tunnel).
//!   XDP writes a `Handoff` over the frame's MACs; this program only
//!   redirects: `bpf_redirect_neigh` (`HANDOFF_NEIGH`), or for a local pod
//!   `bpf_redirect_peer` into the pod's namespace (`HANDOFF_PEER`: skips
//!   the bridge, the host's IP stack and the per-CPU backlog; the frame's
//!   checksums are complete, as XDP wrote them). Passing such a frame to
//!   the stack instead would get it dropped as a martian (its source is the
//!   node's).
//! - `xlb_tc_pod` (tc ingress on pods' host-side veths and tunnel devices):
//!   reverse NAT for backend replies that never cross an XDP interface,
//!   IPv4 and IPv6 (one generic path, compiled per family).
//!   These are skbs, often CHECKSUM_PARTIAL, so the rewrite uses the kernel's
//!   checksum helpers (`nat::rewrite_skb`). Parse, conntrack and FIB are the
//!   XDP program's own.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect_neigh, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    Addr6, FlowKeyOf, FlowOf, Reason, V4, V6,
    flow::FLOW_DIR_REPLY,
    path::{HANDOFF_NEIGH, HANDOFF_PEER, Handoff},
    reason::Verdict,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    conntrack,
    family::Ip,
    fib,
    maps::{
        Path, SCRATCH_KEY, XLB_PEERS, XLB_PEERS6, count, count_path, count_traffic, forget, scratch,
    },
    nat,
    parse::{self, IpHeader, Packet},
    prog::{check_ttl, clock, config, flow_key},
};

/// Bytes pulled into the skb's linear area when the headers are not there:
/// Ethernet, IPv4 and TCP with options at their longest (more than
/// Ethernet, IPv6's fixed header and TCP's longest).
const HEADERS_MAX: u32 = 14 + 60 + 60;

#[classifier]
pub fn xlb_tc_uplink(ctx: TcContext) -> i32 {
    // Ethernet (14) and the IPv4 header up to its destination (20).
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 34 > end {
        return TC_ACT_OK as i32;
    }
    let eth = start as *mut EthHdr;
    // SAFETY: checked above: the Ethernet header, which `Handoff` overlays
    // (8 of 14 bytes), is inside the packet.
    let handoff = unsafe { *(eth as *const Handoff) };
    // SAFETY: as above.
    if !Handoff::is_marked(unsafe { &(*eth).dst_addr }) {
        return TC_ACT_OK as i32;
    }
    let ifindex = handoff.ifindex;
    match handoff.kind {
        HANDOFF_NEIGH => {
            // SAFETY: plain helper call; a null `params` makes the kernel
            // look up the route and neighbour itself (and write both MACs).
            unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
        }
        // SAFETY: checked above: the Ethernet header is in the packet.
        HANDOFF_PEER if unsafe { (*eth).ether_type } == EtherType::Ipv6 as u16 => {
            peer6(&ctx, ifindex)
        }
        HANDOFF_PEER => {
            // SAFETY: checked above: the IPv4 header's addresses are in the
            // packet.
            let (src, dst, proto) = unsafe {
                let ip = (start + EthHdr::LEN) as *const Ipv4Hdr;
                ((*ip).src_addr, (*ip).dst_addr, (*ip).proto as u8)
            };
            let (src, dst) = (u32::from_ne_bytes(src), u32::from_ne_bytes(dst));
            // SAFETY: plain-integer map value, read at once.
            let peer = match unsafe { XLB_PEERS.get(dst) }.copied() {
                Some(peer) if peer.ifindex == ifindex => peer,
                // The pod left the table since XDP looked: the way every
                // other frame goes.
                _ => return redirect_by_fib(&ctx, src, dst, proto),
            };
            // SAFETY: as above. The pod's stack takes the frame as it is
            // (no neighbour step after a peer redirect): it must be
            // addressed to the pod, from its gateway.
            unsafe {
                (*eth).dst_addr = peer.dst_mac;
                (*eth).src_addr = peer.src_mac;
            }
            // SAFETY: plain helper call; the kernel checks the target is a
            // veth whose peer is up in another namespace (else the frame is
            // dropped: the agent removes a pod's entry as its veth goes).
            unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
        }
        _ => TC_ACT_OK as i32,
    }
}

/// `HANDOFF_PEER` for an IPv6 frame: into the pod `XLB_PEERS6` names for
/// its destination, or (the pod left the table) to the FIB's next hop.
#[inline(never)]
fn peer6(ctx: &TcContext, ifindex: u32) -> i32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + EthHdr::LEN + Ipv6Hdr::LEN > end {
        return TC_ACT_SHOT as i32;
    }
    let eth = start as *mut EthHdr;
    let ip = (start + EthHdr::LEN) as *const Ipv6Hdr;
    // SAFETY: checked above: the IPv6 header is in the packet.
    let ((src, dst), next): ((Addr6, Addr6), u8) = unsafe { (parse::addrs6(ip), (*ip).next_hdr) };
    // SAFETY: plain-integer map value, read at once.
    let peer = match unsafe { XLB_PEERS6.get(&dst) }.copied() {
        Some(peer) if peer.ifindex == ifindex => peer,
        _ => {
            // SAFETY: `skb` is this run's context.
            let ingress = unsafe { (*ctx.skb.skb).ifindex };
            let skb = ctx.skb.skb.cast();
            return match fib::next_hop::<V6>(skb, ingress, src, dst, next, 0, true) {
                // SAFETY: plain helper call; the kernel resolves the neighbour.
                Ok(hop) => unsafe {
                    bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) as i32
                },
                Err(_) => TC_ACT_SHOT as i32,
            };
        }
    };
    // SAFETY: as above; addressed to the pod, from its gateway.
    unsafe {
        (*eth).dst_addr = peer.dst_mac;
        (*eth).src_addr = peer.src_mac;
    }
    // SAFETY: plain helper call, as for IPv4.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}

/// Sends a rewritten frame to the FIB's next hop for `dst`, as
/// `bpf_redirect_neigh` does for any hand-off.
#[inline(never)]
fn redirect_by_fib(ctx: &TcContext, src: u32, dst: u32, proto: u8) -> i32 {
    // SAFETY: `skb` is this run's context.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    match fib::next_hop::<V4>(ctx.skb.skb.cast(), ingress, src, dst, proto, 0, true) {
        // SAFETY: plain helper call; the kernel resolves the neighbour.
        Ok(hop) => unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) as i32 },
        Err(_) => TC_ACT_SHOT as i32,
    }
}

#[classifier]
pub fn xlb_tc_pod(ctx: TcContext) -> i32 {
    let result = match parse_skb(&ctx, parse::parse) {
        Ok(packet) => reverse_nat::<V4>(&ctx, &packet),
        Err(Reason::PassNotIpv4) => return tc_pod6(&ctx),
        Err(reason) => Err(reason),
    };
    action_for(result)
}

/// `xlb_tc_pod` for an IPv6 packet: a BPF function of its own, so that
/// IPv6's keys and headers are not on the IPv4 path's frame.
#[inline(never)]
fn tc_pod6(ctx: &TcContext) -> i32 {
    let result = parse_skb(ctx, |ctx| parse::parse6(ctx, forget))
        .and_then(|packet| reverse_nat::<V6>(ctx, &packet));
    action_for(result)
}

/// The tc action for a packet's outcome; drops are counted.
#[inline(always)]
fn action_for(result: Result<i32, Reason>) -> i32 {
    match result {
        Ok(action) => action,
        Err(reason) if reason.verdict() == Verdict::Drop => {
            count(reason);
            TC_ACT_SHOT as i32
        }
        // Not a reply of an xlb flow: the packet is the kernel's business,
        // and not counted (the reason counters describe XDP's packets).
        Err(_) => TC_ACT_OK as i32,
    }
}

/// Parses the skb's headers with `parse`, first pulling them into its
/// linear area if they are not all there yet.
#[inline(always)]
fn parse_skb<F: Ip>(
    ctx: &TcContext,
    parse: impl Fn(&TcContext) -> Result<Packet<F>, Reason>,
) -> Result<Packet<F>, Reason> {
    match parse(ctx) {
        Ok(packet) => return Ok(packet),
        // Headers in the linear area, and not a packet for xlb.
        Err(Reason::PassNotIpv4) => return Err(Reason::PassNotIpv4),
        Err(_) => {}
    }
    let len = ctx.len().min(HEADERS_MAX);
    ctx.pull_data(len).map_err(|_| Reason::PassMalformed)?;
    parse(ctx)
}

/// Reverse NAT of a backend's reply (the flow's `FLOW_DIR_REPLY` entry),
/// sent on to the FIB's next hop towards the client. Each stage is a BPF
/// function of its own and the flow key waits in scratch space, as in
/// `flat.rs`: IPv6's keys, entries and FIB query do not fit one 512-byte
/// frame together. The lookup and track stages each read the clock: a
/// `now` kept across the stages takes the 8 bytes the call chain lacks.
#[inline(always)]
fn reverse_nat<F: Ip>(ctx: &TcContext, packet: &Packet<F>) -> Result<i32, Reason> {
    let entry = lookup_stage(packet);
    if entry.is_null() {
        return Err(Reason::PassNotService);
    }
    check_ttl(packet)?;
    // SAFETY: valid map value pointer for this run; used in place, not
    // copied (a reply never moves its flow between tables).
    let flow = unsafe { &*entry };
    // The route first: a reply that cannot be sent on must reach the stack
    // as it came, not half translated.
    let ifindex = hop_stage(ctx, flow, packet.ip.proto());
    if ifindex == 0 {
        return Err(Reason::PassFibFailed);
    }
    let tracked = track_stage(ctx, packet, entry);
    if !rewrite_stage(ctx, packet, flow) {
        return Err(Reason::DropTcRewrite);
    }
    count(if tracked {
        Reason::FwdRstOutsideWindow
    } else {
        Reason::FwdReply
    });
    count_traffic(flow.service_id, flow.backend_id, true, u64::from(ctx.len()));
    count_path(flow.backend_id, true, Path::Tc);
    // SAFETY: plain helper call; the kernel resolves the neighbour.
    Ok(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 })
}

/// The packet's live reply entry (its key left in scratch space for
/// `track_stage`), or null: no flow, or not a reply.
#[inline(never)]
fn lookup_stage<F: Ip>(packet: &Packet<F>) -> *mut FlowOf<F> {
    let (Ok(cfg), Some(key)) = (config(), scratch::<FlowKeyOf<F>>(SCRATCH_KEY)) else {
        return core::ptr::null_mut();
    };
    // SAFETY: this CPU's scratch slot, sized for a key.
    let key = unsafe {
        *key = flow_key(packet);
        &*key
    };
    match conntrack::lookup(key, cfg, clock()) {
        // SAFETY: valid map value pointer for this run.
        Some(entry) if unsafe { (*entry).direction } == FLOW_DIR_REPLY => entry,
        _ => core::ptr::null_mut(),
    }
}

/// The interface of the FIB's next hop towards `flow`'s client, or 0.
#[inline(never)]
fn hop_stage<F: Ip>(ctx: &TcContext, flow: &FlowOf<F>, proto: u8) -> u32 {
    // SAFETY: `skb` is this run's context.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let hop = fib::next_hop::<F>(
        ctx.skb.skb.cast(),
        ingress,
        flow.new_src_addr_be,
        flow.new_dst_addr_be,
        proto,
        0,
        true,
    );
    hop.map_or(0, |hop| hop.ifindex)
}

/// What the reply does to its flow (`conntrack::track`, the key from
/// `lookup_stage`): whether it is a RST outside the window.
#[inline(never)]
fn track_stage<F: Ip>(ctx: &TcContext, packet: &Packet<F>, entry: *mut FlowOf<F>) -> bool {
    let (Ok(cfg), Some(key)) = (config(), scratch::<FlowKeyOf<F>>(SCRATCH_KEY)) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot, written by `lookup_stage` in this run.
    let key = unsafe { &*key };
    let segment = conntrack::Segment::of(ctx, packet);
    conntrack::track(entry, key, &segment, cfg, clock()).rst_ignored
}

/// `nat::rewrite_skb`: whether it succeeded.
#[inline(never)]
fn rewrite_stage<F: Ip>(ctx: &TcContext, packet: &Packet<F>, flow: &FlowOf<F>) -> bool {
    nat::rewrite_skb(ctx, packet, flow).is_ok()
}
