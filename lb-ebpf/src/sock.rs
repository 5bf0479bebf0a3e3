//! Socket-level balancing for clients on this node (host processes and
//! pods): cgroup v2 hooks of both families rewrite a connect() or sendmsg()
//! to a service frontend into one of its backends before any packet exists,
//! and show the frontend again to recvmsg() and getpeername(). The service
//! lookup and the backend choice (Maglev slots, session affinity) are the
//! XDP path's own; the hooks are written once over the family
//! ([`SockFamily`]). An AF_INET6 socket's IPv4-mapped peer (`::ffff:a.b.c.d`)
//! is balanced as IPv4, in the IPv4 maps.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_set_retval,
    },
    macros::cgroup_sock_addr,
    maps::LruHashMap,
    programs::SockAddrContext,
};
use lb_common::{
    Addr6, FlowKey, Reason, Service, SockRevNatKeyOf, SockRevNatOf, V4, V6,
    hash::flow_hash,
    service::{CONFIG_F_READY, SERVICE_F_SOURCE_RANGES},
    sock::{AFFINITY_SOCKET_CLIENT, map_v4, netns_client, netns_client6, v4_mapped},
};

use crate::{
    family::Ip,
    lookup,
    maps::{XLB_CONFIG, XLB_SOCK_REV6, XLB_SOCK_REVNAT, count},
    parse::sock_addr::{ipv4_address, ipv6_address, set_ipv4_address, set_ipv6_address},
    select,
};

/// What the socket hooks need of a family beside [`Ip`]'s maps.
pub trait SockFamily: Ip {
    /// The reverse translation records (`XLB_SOCK_REVNAT`, `XLB_SOCK_REV6`).
    fn revnat() -> &'static LruHashMap<SockRevNatKeyOf<Self>, SockRevNatOf<Self>>;
    /// A pod's loopback is its own: 127.0.0.1:nodePort or [::1]:nodePort
    /// is never a NodePort here (as kube-proxy's nftables mode; see the
    /// README).
    fn is_loopback(addr: &Self::Addr) -> bool;
    /// The session affinity client of a network namespace cookie.
    fn socket_client(netns_cookie: u64) -> Self::Addr;
}

impl SockFamily for V4 {
    #[inline(always)]
    fn revnat() -> &'static LruHashMap<SockRevNatKeyOf<Self>, SockRevNatOf<Self>> {
        &XLB_SOCK_REVNAT
    }
    #[inline(always)]
    fn is_loopback(addr: &u32) -> bool {
        u32::from_be(*addr) >> 24 == 127
    }
    #[inline(always)]
    fn socket_client(netns_cookie: u64) -> u32 {
        netns_client(netns_cookie)
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn revnat() -> &'static LruHashMap<SockRevNatKeyOf<Self>, SockRevNatOf<Self>> {
        &XLB_SOCK_REV6
    }
    #[inline(always)]
    fn is_loopback(addr: &Addr6) -> bool {
        *addr == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    }
    #[inline(always)]
    fn socket_client(netns_cookie: u64) -> Addr6 {
        netns_client6(netns_cookie)
    }
}

/// Hook return values: go on with the call, or fail it.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn xlb_connect4(ctx: SockAddrContext) -> i32 {
    to_backend4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn xlb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn xlb_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend4(&ctx);
    // The kernel accepts nothing else from a recvmsg hook.
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn xlb_getpeer4(ctx: SockAddrContext) -> i32 {
    to_frontend4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn xlb_connect6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx)
}

/// A dual-stack socket's datagram to an IPv4-mapped address is handed to
/// UDP over IPv4 before this hook runs, and balanced by sendmsg4.
#[cgroup_sock_addr(sendmsg6)]
pub fn xlb_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn xlb_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_frontend6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn xlb_getpeer6(ctx: SockAddrContext) -> i32 {
    to_frontend6(&ctx);
    ALLOW
}

#[inline(always)]
fn to_backend4(ctx: &SockAddrContext) -> i32 {
    let Some((proto, addr_be, port_be)) = ipv4_address(ctx) else {
        return ALLOW;
    };
    verdict(
        translate::<V4>(ctx, proto, addr_be, port_be).map(|backend| {
            backend
                .map(|(addr_be, port_be)| set_ipv4_address(ctx, addr_be, port_be))
                .is_some()
        }),
    )
}

/// An IPv4-mapped address is a dual-stack socket's IPv4 peer, and connect6
/// is the only hook its connect() meets: balanced as IPv4 (Cilium does the
/// same), the backend written back IPv4-mapped.
#[inline(always)]
fn to_backend6(ctx: &SockAddrContext) -> i32 {
    let Some((proto, addr_be, port_be)) = ipv6_address(ctx) else {
        return ALLOW;
    };
    let translated = match v4_mapped(&addr_be) {
        Some(addr4_be) => translate::<V4>(ctx, proto, addr4_be, port_be).map(|backend| {
            backend
                .map(|(addr_be, port_be)| set_ipv6_address(ctx, &map_v4(addr_be), port_be))
                .is_some()
        }),
        None => translate::<V6>(ctx, proto, addr_be, port_be).map(|backend| {
            backend
                .map(|(addr_be, port_be)| set_ipv6_address(ctx, &addr_be, port_be))
                .is_some()
        }),
    };
    verdict(translated)
}

/// connect() and sendmsg(): a service frontend became a backend; a service
/// with no backend fails the call with ECONNREFUSED, as the XDP path's RST
/// or port unreachable would.
#[inline(always)]
fn verdict(translated: Result<bool, Reason>) -> i32 {
    match translated {
        Ok(false) => ALLOW,
        Ok(true) => {
            count(Reason::FwdSocket);
            ALLOW
        }
        Err(reason) => {
            count(reason);
            // SAFETY: no preconditions; sets the errno the caller sees.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REFUSE
        }
    }
}

/// The backend for a call to (`proto`, `dst_addr_be`, `dst_port_be`) if
/// that is a service frontend, recorded for the way back; `None` for any
/// other address.
#[inline(always)]
fn translate<F: SockFamily>(
    ctx: &SockAddrContext,
    proto: u8,
    dst_addr_be: F::Addr,
    dst_port_be: u16,
) -> Result<Option<(F::Addr, u16)>, Reason> {
    let hash_key = match XLB_CONFIG.get(0) {
        Some(cfg) if cfg.flags & CONFIG_F_READY != 0 => cfg.hash_key(),
        _ => return Ok(None),
    };
    if F::is_loopback(&dst_addr_be) {
        return Ok(None);
    }
    let Some(service) = lookup::service_for::<F>(dst_addr_be, dst_port_be, proto) else {
        return Ok(None);
    };
    // loadBalancerSourceRanges need the client's address, which connect()
    // and an unbound sendmsg() do not have yet (the kernel picks it after
    // this hook): such frontends are left to the per-packet paths, which
    // check the packet's source (see the README).
    if service.flags & SERVICE_F_SOURCE_RANGES != 0 {
        return Ok(None);
    }
    // SAFETY: both helpers only read the socket behind the context.
    let (socket_cookie, netns_cookie) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // One socket always hashes to the same slot, so an unconnected UDP
    // socket keeps its backend from datagram to datagram while the service's
    // table keeps it. The key holds no address, so it is IPv4's shape for
    // both families.
    let key = FlowKey {
        src_addr_be: socket_cookie as u32,
        dst_addr_be: (socket_cookie >> 32) as u32,
        src_port_be: 0,
        dst_port_be,
        proto,
        _pad: [0; 3],
    };
    let hash = flow_hash(&key, hash_key);
    // Affinity is per client network namespace (a pod, or the node), keyed
    // apart from the XDP path's client addresses.
    let socket_client = Service {
        id: service.id | AFFINITY_SOCKET_CLIENT,
        ..service
    };
    let (_, backend) =
        select::backend_for_client::<F>(&socket_client, &F::socket_client(netns_cookie), hash, now)
            .ok_or(Reason::RejectSocketNoBackend)?;
    let reverse = SockRevNatKeyOf::<F> {
        socket_cookie,
        backend_addr_be: backend.addr_be,
        backend_port_be: backend.port_be,
        _pad: 0,
        _pad_addr: Default::default(),
    };
    let frontend = SockRevNatOf::<F> {
        service_addr_be: dst_addr_be,
        service_port_be: dst_port_be,
        _pad: 0,
        service_id: service.id,
    };
    // Without the record, replies would show the backend's address: fail
    // the call rather than confuse a connected UDP client.
    F::revnat()
        .insert(&reverse, &frontend, u64::from(BPF_ANY))
        .map_err(|_| Reason::DropFlowInsert)?;
    Ok(Some((backend.addr_be, backend.port_be)))
}

/// recvmsg() and getpeername(): a backend this socket reached through a
/// frontend is shown as that frontend.
#[inline(always)]
fn to_frontend4(ctx: &SockAddrContext) {
    let Some((_, addr_be, port_be)) = ipv4_address(ctx) else {
        return;
    };
    if let Some((addr_be, port_be)) = frontend_of::<V4>(ctx, addr_be, port_be) {
        set_ipv4_address(ctx, addr_be, port_be);
    }
}

/// As `to_frontend4`; an IPv4-mapped backend is looked up as IPv4 (a
/// dual-stack socket's replies from it, and its peer, are shown mapped).
#[inline(always)]
fn to_frontend6(ctx: &SockAddrContext) {
    let Some((_, addr_be, port_be)) = ipv6_address(ctx) else {
        return;
    };
    match v4_mapped(&addr_be) {
        Some(addr4_be) => {
            if let Some((addr_be, port_be)) = frontend_of::<V4>(ctx, addr4_be, port_be) {
                set_ipv6_address(ctx, &map_v4(addr_be), port_be);
            }
        }
        None => {
            if let Some((addr_be, port_be)) = frontend_of::<V6>(ctx, addr_be, port_be) {
                set_ipv6_address(ctx, &addr_be, port_be);
            }
        }
    }
}

/// The frontend this socket asked for when it was given the backend
/// (`backend_addr_be`, `backend_port_be`), if it was.
#[inline(always)]
fn frontend_of<F: SockFamily>(
    ctx: &SockAddrContext,
    backend_addr_be: F::Addr,
    backend_port_be: u16,
) -> Option<(F::Addr, u16)> {
    let key = SockRevNatKeyOf::<F> {
        // SAFETY: only reads the socket behind the context.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend_addr_be,
        backend_port_be,
        _pad: 0,
        _pad_addr: Default::default(),
    };
    // SAFETY: plain integers; a torn read is a record of one socket anyway.
    let frontend = unsafe { F::revnat().get(&key) }?;
    Some((frontend.service_addr_be, frontend.service_port_be))
}
