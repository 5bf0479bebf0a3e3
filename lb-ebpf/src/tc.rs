//! xlb's tc programs, for where XDP cannot be right (see README "Hooks"):
//!
//! - `xlb_tc_uplink` (tc ingress on each uplink, after XDP): sends on the
//!   frames the XDP program rewrote but could not deliver itself because
//!   their next hop takes no XDP frames (a pod's veth, a bridge, a tunnel).
//!   XDP writes a `Handoff` over the frame's MACs; this program only
//!   redirects (`bpf_redirect_neigh`). Passing such a frame to the stack
//!   instead would get it dropped as a martian (its source is the node's).
//! - `xlb_tc_pod` (tc ingress on pods' host-side veths and tunnel devices):
//!   reverse NAT for backend replies that never cross an XDP interface.
//!   These are skbs, often CHECKSUM_PARTIAL, so the rewrite uses the kernel's
//!   checksum helpers (`nat::rewrite_skb`). Parse, conntrack and FIB are the
//!   XDP program's own.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_coarse_ns, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    Reason,
    flow::FLOW_DIR_REPLY,
    path::{HANDOFF_MAGIC, Handoff},
    reason::Verdict,
    service::CONFIG_F_READY,
};

use crate::{
    conntrack, fib,
    maps::{Path, XLB_CONFIG, count, count_path, count_traffic},
    nat,
    parse::{self, Packet},
    prog::{check_ttl, flow_key},
};

/// Bytes pulled into the skb's linear area when the headers are not there:
/// Ethernet, IPv4 and TCP with options at their longest.
const HEADERS_MAX: u32 = 14 + 60 + 60;

#[classifier]
pub fn xlb_tc_uplink(ctx: TcContext) -> i32 {
    let Ok(eth) = parse::ptr_at::<Handoff, _>(&ctx, 0) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: ptr_at checked that a whole `Handoff` lies inside the packet.
    let handoff = unsafe { *eth };
    if handoff.magic != HANDOFF_MAGIC {
        return TC_ACT_OK as i32;
    }
    // SAFETY: plain helper call; a null `params` makes the kernel look up the
    // route and neighbour itself (and write both MACs).
    unsafe { bpf_redirect_neigh(handoff.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

#[classifier]
pub fn xlb_tc_pod(ctx: TcContext) -> i32 {
    match try_tc_pod(&ctx) {
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

/// Parses the skb's headers, first pulling them into its linear area if
/// they are not all there yet.
#[inline(always)]
fn parse_skb(ctx: &TcContext) -> Result<Packet, Reason> {
    if let Ok(packet) = parse::parse(ctx) {
        return Ok(packet);
    }
    let len = ctx.len().min(HEADERS_MAX);
    ctx.pull_data(len).map_err(|_| Reason::PassMalformed)?;
    parse::parse(ctx)
}

#[inline(always)]
fn try_tc_pod(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = match XLB_CONFIG.get(0) {
        Some(cfg) if cfg.flags & CONFIG_F_READY != 0 => cfg,
        _ => return Err(Reason::PassNotReady),
    };
    let packet = parse_skb(ctx)?;
    let key = flow_key(&packet);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let entry = conntrack::lookup(&key, cfg, now).ok_or(Reason::PassNotService)?;
    // SAFETY: valid map value pointer for this run; used in place, not
    // copied (a reply never moves its flow between tables).
    let flow = unsafe { &*entry };
    if flow.direction != FLOW_DIR_REPLY {
        return Err(Reason::PassNotService);
    }
    check_ttl(&packet)?;
    // The route first: a reply that cannot be sent on must reach the stack
    // as it came, not half translated.
    // SAFETY: `skb` is this run's context.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let hop = fib::next_hop(
        ctx.skb.skb.cast(),
        ingress,
        flow.new_src_addr_be,
        flow.new_dst_addr_be,
        key.proto,
        0,
        true,
    )?;
    let segment = conntrack::Segment::of(ctx, &packet);
    let tracked = conntrack::track(entry, &key, &segment, cfg, now);
    nat::rewrite_skb(ctx, &packet, flow)?;
    count(if tracked.rst_ignored {
        Reason::FwdRstOutsideWindow
    } else {
        Reason::FwdReply
    });
    count_traffic(flow.service_id, flow.backend_id, true, u64::from(ctx.len()));
    count_path(flow.backend_id, true, Path::Tc);
    // SAFETY: plain helper call; the kernel resolves the neighbour.
    Ok(unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) as i32 })
}
