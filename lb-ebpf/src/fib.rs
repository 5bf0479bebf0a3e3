//! Forwarding: ask the kernel FIB for the next hop, then send the frame out
//! of the interface it names: XDP_TX / XDP_REDIRECT where the egress takes
//! XDP frames, otherwise a hand-off to the uplink's tc program (a pod's
//! veth without XDP, a bridge or a tunnel would drop a redirected frame).
//! A local pod the agent knows (`XLB_PEERS`) gets the hand-off for
//! `bpf_redirect_peer`: into its namespace directly, past the bridge, the
//! host stack and the backlog.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup, xdp_action,
    },
    cty::c_void,
    helpers::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    BackendHopOf, BackendOf, Reason,
    path::{HANDOFF_NEIGH, HANDOFF_PEER, Handoff},
};
use network_types::eth::EthHdr;

use crate::{
    family::Ip,
    maps::{Path, XLB_REDIRECT_OK},
};

/// Masquerade address for egress interfaces without one of their own (a
/// routed CNI's pod veths): `XLB_IFACE_ADDRS` under this key.
const IFACE_ADDR_DEFAULT: u32 = 0;

/// How long a cached next hop is trusted before the FIB is asked again.
pub const HOP_REFRESH_NS: u64 = 1_000_000_000;

/// Where a packet goes next.
#[derive(Clone, Copy, Default)]
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Whether XDP may redirect into `ifindex` (see `XLB_REDIRECT_OK`).
#[inline(always)]
pub fn redirect_ok(ifindex: u32) -> bool {
    matches!(XLB_REDIRECT_OK.get(ifindex), Some(&ok) if ok != 0)
}

/// Looks up the route to `dst_addr_be` as the kernel would forward a packet
/// arriving on `ingress_ifindex`. `ctx` is the hook's context (xdp_md or
/// __sk_buff); `tot_len` 0 lets the skb variant check the MTU itself (GSO
/// aware). An unresolved neighbour is fine when tc sends (`from_tc`, or a next
/// hop XDP hands to tc): `bpf_redirect_neigh` resolves it; XDP cannot.
#[inline(always)]
pub fn next_hop<F: Ip>(
    ctx: *mut c_void,
    ingress_ifindex: u32,
    src_addr_be: F::Addr,
    dst_addr_be: F::Addr,
    proto: u8,
    tot_len: u16,
    from_tc: bool,
) -> Result<NextHop, Reason> {
    // Zeroed by each lookup, not before.
    let mut params = core::mem::MaybeUninit::<bpf_fib_lookup>::uninit();
    let addrs = (src_addr_be, dst_addr_be);
    let at = params.as_mut_ptr();
    let mut ret = lookup::<F>(ctx, ingress_ifindex, at, addrs, proto, tot_len);
    if ret == BPF_FIB_LKUP_RET_FRAG_NEEDED && tot_len != 0 {
        // The route's MTU is smaller than the packet: find the hop anyway,
        // and let xlb's own check (mtu.rs) answer as a router does.
        ret = lookup::<F>(ctx, ingress_ifindex, at, addrs, proto, 0);
    }
    // SAFETY: `lookup` zeroed it, then the FIB filled it in.
    let params = unsafe { params.assume_init_ref() };
    match ret {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: params.ifindex,
            src_mac: params.smac,
            dst_mac: params.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH if from_tc || !redirect_ok(params.ifindex) => Ok(NextHop {
            ifindex: params.ifindex,
            src_mac: [0; 6],
            dst_mac: [0; 6],
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Reason::DropNoNeighbour),
        _ => Err(Reason::PassFibFailed),
    }
}

/// Zeroes the 64 bytes of `params` a word at a time: `mem::zeroed()` was a
/// call to the linker's byte-loop `memset` (64 iterations; bpf-linker's
/// in-order memcpy expansion leaves every memset to it). Volatile, or LLVM
/// merges the stores back into one memset.
///
/// # Safety
/// `params` is valid for writes.
#[inline(always)]
unsafe fn zero_params(params: *mut bpf_fib_lookup) {
    const WORDS: usize = core::mem::size_of::<bpf_fib_lookup>() / 4;
    const _: () = assert!(core::mem::size_of::<bpf_fib_lookup>() % 4 == 0);
    const _: () = assert!(core::mem::align_of::<bpf_fib_lookup>() >= 4);
    let words = params.cast::<u32>();
    for word in 0..WORDS {
        // SAFETY: inside the caller's struct, 4-byte aligned.
        unsafe { core::ptr::write_volatile(words.add(word), 0) };
    }
}

/// One FIB lookup into `params` (valid for writes, initialised or not: it
/// is zeroed first); `tot_len` 0 skips its MTU check.
#[inline(always)]
fn lookup<F: Ip>(
    ctx: *mut c_void,
    ingress_ifindex: u32,
    params: *mut bpf_fib_lookup,
    (src_addr_be, dst_addr_be): (F::Addr, F::Addr),
    proto: u8,
    tot_len: u16,
) -> u32 {
    // SAFETY: the caller's struct, zeroed whole (a plain C struct: all-zero
    // is a valid value); outputs of an earlier lookup (some share unions
    // with inputs) must not leak into this one.
    let params = unsafe {
        zero_params(params);
        &mut *params
    };
    F::fib_addrs(params, &src_addr_be, &dst_addr_be);
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ingress_ifindex;
    // SAFETY: the helper writes only into `params`, whose size we pass.
    let ret = unsafe {
        fib_lookup_helper(
            ctx,
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
/// routing is followed only at each re-check, not per client. For IPv6
/// (`Ip::OUTLINE`) a BPF function of its own.
#[inline(always)]
pub fn hop_to_backend<F: Ip>(
    ctx: &XdpContext,
    id: u32,
    backend: &BackendOf<F>,
    src_addr_be: F::Addr,
    proto: u8,
    tot_len: u16,
    now: u64,
) -> Result<(NextHop, F::Addr), Reason> {
    if !F::OUTLINE {
        return cached_hop_to_backend::<F>(ctx, id, backend, src_addr_be, proto, tot_len, now);
    }
    let query = HopQuery {
        id,
        backend,
        src_addr_be,
        proto,
        tot_len,
        now,
    };
    // Written by the outlined function when it finds a hop; left
    // uninitialised, not zeroed: a zeroed (NextHop, Addr6) was a call to
    // the linker's byte-loop `memset` for 32 bytes on every new flow.
    let mut found = core::mem::MaybeUninit::<(NextHop, F::Addr)>::uninit();
    match hop_to_backend_outlined(ctx, &query, found.as_mut_ptr()) {
        // SAFETY: HOP_FOUND means the function wrote `found`.
        HOP_FOUND => Ok(unsafe { found.assume_init() }),
        reason => Err(Reason::from_index(reason).unwrap_or(Reason::PassFibFailed)),
    }
}

/// `hop_to_backend`'s arguments, passed to its outlined form by reference
/// (a BPF function takes five registers).
struct HopQuery<'a, F: Ip> {
    id: u32,
    backend: &'a BackendOf<F>,
    src_addr_be: F::Addr,
    proto: u8,
    tot_len: u16,
    now: u64,
}

/// `hop_to_backend_outlined`'s answer when it wrote the hop.
const HOP_FOUND: u32 = u32::MAX;

/// The next hop into `found` (written only then), or the reason there is
/// none.
#[inline(never)]
fn hop_to_backend_outlined<F: Ip>(
    ctx: &XdpContext,
    query: &HopQuery<F>,
    found: *mut (NextHop, F::Addr),
) -> u32 {
    let q = query;
    match cached_hop_to_backend::<F>(
        ctx,
        q.id,
        q.backend,
        q.src_addr_be,
        q.proto,
        q.tot_len,
        q.now,
    ) {
        Ok(hop) => {
            // SAFETY: the caller's slot, valid for writes.
            unsafe { found.write(hop) };
            HOP_FOUND
        }
        Err(reason) => reason as u32,
    }
}

#[inline(always)]
fn cached_hop_to_backend<F: Ip>(
    ctx: &XdpContext,
    id: u32,
    backend: &BackendOf<F>,
    src_addr_be: F::Addr,
    proto: u8,
    tot_len: u16,
    now: u64,
) -> Result<(NextHop, F::Addr), Reason> {
    let cache = F::backend_hops().get_ptr_mut(id);
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
    let hop = next_hop::<F>(
        ctx.ctx.cast(),
        ctx.ingress_ifindex() as u32,
        src_addr_be,
        backend.addr_be,
        proto,
        tot_len,
        false,
    )?;
    let iface_addrs = F::iface_addrs();
    let masquerade_addr_be = match iface_addrs
        .get_ptr(hop.ifindex)
        .or_else(|| iface_addrs.get_ptr(IFACE_ADDR_DEFAULT))
    {
        // SAFETY: plain-integer map value.
        Some(addr) => unsafe { *addr },
        None => F::Addr::default(),
    };
    if let Some(cached) = cache {
        // SAFETY: as above; a racing writer on another CPU writes the same
        // kind of answer.
        unsafe {
            *cached = BackendHopOf {
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

/// Sends the rewritten frame, addressed to `dst_addr_be`: XDP_TX back out
/// of the interface it came in on, a redirect to another XDP interface (MACs
/// rewritten), or, for any other next hop, XDP_PASS with a hand-off for the
/// uplink's tc program (`lb_common::path::Handoff`): `bpf_redirect_peer`
/// when the destination is a local pod the agent knows and the FIB still
/// routes it there, else `bpf_redirect_neigh`.
#[inline(always)]
pub fn send<F: Ip>(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    hop: &NextHop,
    dst_addr_be: F::Addr,
) -> Result<(u32, Path), Reason> {
    let ingress = hop.ifindex == ctx.ingress_ifindex() as u32;
    if !ingress && !redirect_ok(hop.ifindex) {
        let (kind, ifindex, path) = match F::peers().get_ptr(dst_addr_be) {
            // SAFETY: map value pointer, valid for this run; plain integers.
            Some(peer) if unsafe { (*peer).route_ifindex } == hop.ifindex => {
                // SAFETY: as above.
                (HANDOFF_PEER, unsafe { (*peer).ifindex }, Path::Peer)
            }
            _ => (HANDOFF_NEIGH, hop.ifindex, Path::Tc),
        };
        handoff(eth, kind, ifindex);
        return Ok((xdp_action::XDP_PASS, path));
    }
    // SAFETY: the parser checked the Ethernet header is inside the packet.
    unsafe {
        (*eth).src_addr = hop.src_mac;
        (*eth).dst_addr = hop.dst_mac;
    }
    if ingress {
        return Ok((xdp_action::XDP_TX, Path::Xdp));
    }
    // SAFETY: plain helper call; it only records the target interface.
    let action = unsafe { bpf_redirect(hop.ifindex, 0) as u32 };
    Ok((action, Path::Xdp))
}

/// Writes a `Handoff` of `kind` for `ifindex` over the frame's Ethernet
/// addresses (tc writes real ones, or `bpf_redirect_neigh` does). The frame
/// itself is already rewritten; the uplink's tc program only sends it.
#[inline(always)]
fn handoff(eth: *mut EthHdr, kind: u8, ifindex: u32) {
    // SAFETY: the parser checked the Ethernet header (14 bytes) is inside the
    // packet; `Handoff` covers its first 8.
    unsafe {
        *(eth as *mut Handoff) = Handoff::new(kind, ifindex);
    }
}
