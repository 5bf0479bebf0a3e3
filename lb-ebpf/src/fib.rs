//! Forwarding: ask the kernel FIB for the next hop, then send the frame out
//! of the interface it names.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup, xdp_action,
    },
    helpers::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{Backend, BackendHop, Reason};
use network_types::eth::EthHdr;

use crate::maps::{XLB_BACKEND_HOPS, XLB_IFACE_ADDRS};

const AF_INET: u8 = 2;
/// How long a cached next hop is trusted before the FIB is asked again.
pub const HOP_REFRESH_NS: u64 = 1_000_000_000;

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
    // SAFETY: bpf_fib_lookup is a plain C struct; all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    let mut ret = lookup(ctx, &mut params, src_addr_be, dst_addr_be, proto, tot_len);
    if ret == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // The route's MTU is smaller than the packet: find the hop anyway,
        // and let xlb's own check (mtu.rs) answer as a router does.
        ret = lookup(ctx, &mut params, src_addr_be, dst_addr_be, proto, 0);
    }
    match ret {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: params.ifindex,
            src_mac: params.smac,
            dst_mac: params.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Reason::DropNoNeighbour),
        _ => Err(Reason::PassFibFailed),
    }
}

/// One FIB lookup; `tot_len` 0 skips its MTU check.
#[inline(always)]
fn lookup(
    ctx: &XdpContext,
    params: &mut bpf_fib_lookup,
    src_addr_be: u32,
    dst_addr_be: u32,
    proto: u8,
    tot_len: u16,
) -> u32 {
    // SAFETY: as above; outputs of an earlier lookup (some share unions
    // with inputs) must not leak into this one.
    *params = unsafe { core::mem::zeroed() };
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
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    ret as u32
}

/// The next hop to backend `id` and the masquerade address to use there
/// (0 if the egress interface has no address), from the per-backend cache
/// when it is fresh, else from the FIB (and cached). Source-based policy
/// routing is followed only at each re-check, not per client.
#[inline(always)]
pub fn hop_to_backend(
    ctx: &XdpContext,
    id: u32,
    backend: &Backend,
    src_addr_be: u32,
    proto: u8,
    tot_len: u16,
    now: u64,
) -> Result<(NextHop, u32), Reason> {
    let cache = XLB_BACKEND_HOPS.get_ptr_mut(id);
    if let Some(cached) = cache {
        // SAFETY: array slot pointer, valid for this run; plain integers.
        let cached = unsafe { &*cached };
        if cached.ifindex != 0
            && cached.addr_be == backend.addr_be
            && now.saturating_sub(cached.checked_ns) < HOP_REFRESH_NS
        {
            let hop = NextHop {
                ifindex: cached.ifindex,
                src_mac: cached.src_mac,
                dst_mac: cached.dst_mac,
            };
            return Ok((hop, cached.masquerade_addr_be));
        }
    }
    let hop = next_hop(ctx, src_addr_be, backend.addr_be, proto, tot_len)?;
    let masquerade_addr_be = match XLB_IFACE_ADDRS.get_ptr(hop.ifindex) {
        // SAFETY: plain-integer map value.
        Some(addr) => unsafe { *addr },
        None => 0,
    };
    if let Some(cached) = cache {
        // SAFETY: as above; a racing writer on another CPU writes the same
        // kind of answer.
        unsafe {
            *cached = BackendHop {
                addr_be: backend.addr_be,
                ifindex: hop.ifindex,
                masquerade_addr_be,
                src_mac: hop.src_mac,
                dst_mac: hop.dst_mac,
                checked_ns: now,
            };
        }
    }
    Ok((hop, masquerade_addr_be))
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
