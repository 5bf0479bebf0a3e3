//! Forwarding: ask the kernel FIB for the next hop, then send the frame out
//! of the interface it names.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect},
    programs::XdpContext,
};
use lb_common::Reason;
use network_types::eth::EthHdr;

const AF_INET: u8 = 2;

/// Where a packet goes next.
#[derive(Clone, Copy)]
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Looks up the route to `dst_addr_be` as the kernel would forward a packet
/// arriving on the current interface.
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    src_addr_be: u32,
    dst_addr_be: u32,
    proto: u8,
    tot_len: u16,
) -> Result<NextHop, Reason> {
    // SAFETY: bpf_fib_lookup is a plain C struct; all-zero is a valid start.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_3.ipv4_src = src_addr_be;
    params.__bindgen_anon_4.ipv4_dst = dst_addr_be;
    params.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the helper writes only into `params`, whose size we pass.
    let ret = unsafe {
        fib_lookup_helper(
            ctx.ctx.cast(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: params.ifindex,
            src_mac: params.smac,
            dst_mac: params.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Reason::DropNoNeighbour),
        _ => Err(Reason::PassFibFailed),
    }
}

/// Rewrites the MACs and sends the frame: XDP_TX back out of the interface
/// it came in on, or a redirect to another one.
#[inline(always)]
pub fn send(ctx: &XdpContext, eth: *mut EthHdr, hop: &NextHop) -> u32 {
    // SAFETY: the parser checked the Ethernet header is inside the packet.
    unsafe {
        (*eth).src_addr = hop.src_mac;
        (*eth).dst_addr = hop.dst_mac;
    }
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call; it only records the target interface.
    unsafe { bpf_redirect(hop.ifindex, 0) as u32 }
}
