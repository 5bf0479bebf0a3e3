//! Packets that belong to a flow without being its TCP/UDP packets (ICMP
//! errors quoting it, later fragments of its datagrams) go where the flow's
//! packets go: the entry's cached next hop, or the FIB's answer.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowOf, Reason};

use crate::{
    conntrack,
    family::Ip,
    fib::{self, NextHop},
};

/// The next hop for packets rewritten by `flow` (the entry `entry` points
/// to), caching the FIB's answer in the entry when it had none.
#[inline(always)]
pub fn hop_for<F: Ip>(
    ctx: &XdpContext,
    entry: *mut FlowOf<F>,
    flow: &FlowOf<F>,
    proto: u8,
    tot_len: u16,
) -> Result<NextHop, Reason> {
    if let Some(hop) = conntrack::cached_hop(flow) {
        return Ok(hop);
    }
    let hop = fib::next_hop::<F>(
        ctx.ctx.cast(),
        ctx.ingress_ifindex() as u32,
        flow.new_src_addr_be,
        flow.new_dst_addr_be,
        proto,
        tot_len,
        false,
    )?;
    conntrack::remember_hop(entry, &hop);
    Ok(hop)
}

/// The TTL the packet arrived with: like a router, xlb drops what would
/// leave with TTL 0.
#[inline(always)]
pub fn ttl_allows_forwarding(ttl: u8) -> Result<(), Reason> {
    if ttl <= 1 {
        return Err(Reason::DropTtlExpired);
    }
    Ok(())
}
