//! Socket-level balancing for clients on this node (host processes and
//! pods): cgroup v2 hooks rewrite a connect() or sendmsg() to a service
//! frontend into one of its backends before any packet exists, and show the
//! frontend again to recvmsg() and getpeername(). The service lookup and the
//! backend choice (Maglev slots, session affinity) are the XDP path's own.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_set_retval,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use lb_common::{
    FlowKey, Reason, Service, SockRevNat, SockRevNatKey, V4,
    hash::flow_hash,
    service::{CONFIG_F_READY, SERVICE_F_SOURCE_RANGES},
    sock::{AFFINITY_SOCKET_CLIENT, netns_client},
};

use crate::{
    lookup,
    maps::{XLB_CONFIG, XLB_SOCK_REVNAT, count},
    parse::sock_addr::{ipv4_address, set_ipv4_address},
    select,
};

/// Hook return values: go on with the call, or fail it.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn xlb_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn xlb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn xlb_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx);
    // The kernel accepts nothing else from a recvmsg hook.
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn xlb_getpeer4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx);
    ALLOW
}

/// connect() and sendmsg(): a service frontend becomes a backend; a service
/// with no backend fails the call with ECONNREFUSED, as the XDP path's RST
/// or port unreachable would.
#[inline(always)]
fn to_backend(ctx: &SockAddrContext) -> i32 {
    match translate(ctx) {
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

/// Whether the address was a service frontend (and is now a backend).
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> Result<bool, Reason> {
    let hash_key = match XLB_CONFIG.get(0) {
        Some(cfg) if cfg.flags & CONFIG_F_READY != 0 => cfg.hash_key(),
        _ => return Ok(false),
    };
    let Some((proto, dst_addr_be, dst_port_be)) = ipv4_address(ctx) else {
        return Ok(false);
    };
    // A pod's loopback is its own: 127.0.0.1:nodePort is never a NodePort
    // here (as kube-proxy's nftables mode; see the README).
    if u32::from_be(dst_addr_be) >> 24 == 127 {
        return Ok(false);
    }
    let Some(service) = lookup::service_for::<V4>(dst_addr_be, dst_port_be, proto) else {
        return Ok(false);
    };
    // loadBalancerSourceRanges need the client's address, which connect()
    // and an unbound sendmsg() do not have yet (the kernel picks it after
    // this hook): such frontends are left to the per-packet paths, which
    // check the packet's source (see the README).
    if service.flags & SERVICE_F_SOURCE_RANGES != 0 {
        return Ok(false);
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
    // table keeps it.
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
        select::backend_for_client::<V4>(&socket_client, &netns_client(netns_cookie), hash, now)
            .ok_or(Reason::RejectSocketNoBackend)?;
    let reverse = SockRevNatKey {
        socket_cookie,
        backend_addr_be: backend.addr_be,
        backend_port_be: backend.port_be,
        _pad: 0,
    };
    let frontend = SockRevNat {
        service_addr_be: dst_addr_be,
        service_port_be: dst_port_be,
        _pad: 0,
        service_id: service.id,
    };
    // Without the record, replies would show the backend's address: fail
    // the call rather than confuse a connected UDP client.
    XLB_SOCK_REVNAT
        .insert(&reverse, &frontend, u64::from(BPF_ANY))
        .map_err(|_| Reason::DropFlowInsert)?;
    set_ipv4_address(ctx, backend.addr_be, backend.port_be);
    Ok(true)
}

/// recvmsg() and getpeername(): a backend this socket reached through a
/// frontend is shown as that frontend.
#[inline(always)]
fn to_frontend(ctx: &SockAddrContext) {
    let Some((_, backend_addr_be, backend_port_be)) = ipv4_address(ctx) else {
        return;
    };
    let key = SockRevNatKey {
        // SAFETY: only reads the socket behind the context.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend_addr_be,
        backend_port_be,
        _pad: 0,
    };
    // SAFETY: plain integers; a torn read is a record of one socket anyway.
    if let Some(frontend) = unsafe { XLB_SOCK_REVNAT.get(&key) } {
        set_ipv4_address(ctx, frontend.service_addr_be, frontend.service_port_be);
    }
}
