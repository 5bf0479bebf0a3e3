//! ICMP errors about balanced flows (destination unreachable of every code,
//! fragmentation needed among them, and time exceeded), and ICMPv6 ones
//! (destination unreachable, packet too big, time exceeded, parameter
//! problem), translated the way kube-proxy's conntrack does for "related"
//! packets.
//!
//! An error quotes a packet the node sent: to a backend (client -> backend
//! direction, rewritten) or to a client (a reply, reverse-NATed). Swapping
//! the quoted tuple gives the key of the flow entry for the *opposite*
//! direction (Katran's `handle_icmp`, Cilium's
//! `snat_v4_rev_nat_handle_icmp_error`); that entry's rewrite is exactly
//! what the error needs: its outer header goes where that entry sends
//! packets, from the address that entry writes, and the quote becomes the
//! packet as the far end sent it.
//!
//! IPv6's errors are translated by a program of their own, `xlb6_icmp`,
//! which `xlb6` tail-calls for ICMPv6 (`XLB_PROGS6[PROGS6_ICMP]`): `xlb6`'s
//! stack has no room left for it. Errors are translated, never generated
//! here, so they need no rate limit.

use aya_ebpf::{macros::xdp, programs::XdpContext};
use aya_log_ebpf::debug;
use lb_common::{
    FlowKeyOf, FlowOf, GlobalConfig, IPPROTO_ICMP, IPPROTO_ICMPV6, Reason, V4, V6,
    flow::FLOW_DIR_REPLY,
};
use network_types::eth::EthHdr;

use crate::{
    conntrack,
    family::Ip,
    fib,
    maps::{count, count_path, count_traffic},
    nat,
    parse::{self, IcmpError, IcmpError6},
    prog::{clock, config, debug_logs, pack, unpack},
    related,
};

/// ICMPv6's program (`XLB_PROGS6[PROGS6_ICMP]`): errors about flows
/// translated and forwarded; NDP, echo and anything else ICMPv6 pass to
/// the kernel untouched, as before xlb looked at ICMPv6.
#[xdp]
pub fn xlb6_icmp(ctx: XdpContext) -> u32 {
    let (action, reason) = unpack(pack(
        config().and_then(|cfg| translate::<V6>(&ctx, cfg, clock())),
    ));
    count(reason);
    if debug_logs() {
        debug!(&ctx, "icmpv6 verdict {} action {}", reason as u32, action);
    }
    action
}

/// What translating needs of an ICMP error of a family.
pub trait IcmpFamily: Ip {
    type Error;
    /// The error's own protocol, for the FIB lookup.
    const PROTO: u8;
    fn parse(ctx: &XdpContext) -> Result<Self::Error, Reason>;
    /// The key of the entry for packets going opposite to the quoted one.
    fn quoted_peer_key(error: &Self::Error) -> FlowKeyOf<Self>;
    /// The error's TTL (hop limit) and IP length.
    fn outer(error: &Self::Error) -> (u8, u16);
    fn eth(error: &Self::Error) -> *mut EthHdr;
    /// Rewrites the outer header, the quote and the checksums as `flow`
    /// says. The caller checked the TTL is above 1.
    fn rewrite(error: &Self::Error, flow: &FlowOf<Self>);
}

/// Translates and forwards an ICMP error about a flow; anything else is
/// left to the kernel with its reason.
#[inline(always)]
pub fn translate<F: IcmpFamily>(
    ctx: &XdpContext,
    cfg: &GlobalConfig,
    now: u64,
) -> Result<(u32, Reason), Reason> {
    let error = F::parse(ctx)?;
    let key = F::quoted_peer_key(&error);
    let entry = conntrack::lookup(&key, cfg, now).ok_or(Reason::PassIcmpNoFlow)?;
    // SAFETY: valid map value pointer for this run.
    let flow = unsafe { &*entry };
    let (ttl, ip_len) = F::outer(&error);
    related::ttl_allows_forwarding(ttl)?;
    let hop = related::hop_for::<F>(ctx, entry, flow, F::PROTO, ip_len)?;
    F::rewrite(&error, flow);
    let to_client = flow.direction == FLOW_DIR_REPLY;
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    count_traffic(flow.service_id, flow.backend_id, to_client, frame_len);
    let reason = if to_client {
        Reason::FwdIcmpToClient
    } else {
        Reason::FwdIcmpToBackend
    };
    let (action, path) = fib::send::<F>(ctx, F::eth(&error), &hop, flow.new_dst_addr_be)?;
    count_path(flow.backend_id, to_client, path);
    Ok((action, reason))
}

impl IcmpFamily for V4 {
    type Error = IcmpError;
    const PROTO: u8 = IPPROTO_ICMP;

    #[inline(always)]
    fn parse(ctx: &XdpContext) -> Result<IcmpError, Reason> {
        parse::parse_icmp_error(ctx)
    }

    #[inline(always)]
    fn quoted_peer_key(error: &IcmpError) -> FlowKeyOf<V4> {
        // SAFETY: the parser checked the quoted IPv4 header and ports are
        // inside the packet.
        let (src, dst, ports) = unsafe {
            (
                (*error.inner).src_addr,
                (*error.inner).dst_addr,
                *error.inner_ports,
            )
        };
        conntrack::key(
            (u32::from_ne_bytes(dst), u16::from_ne_bytes(ports[1])),
            (u32::from_ne_bytes(src), u16::from_ne_bytes(ports[0])),
            error.inner_proto,
        )
    }

    #[inline(always)]
    fn outer(error: &IcmpError) -> (u8, u16) {
        (V4::hop_limit(&error.ip), V4::ip_len(&error.ip))
    }

    #[inline(always)]
    fn eth(error: &IcmpError) -> *mut EthHdr {
        error.eth
    }

    #[inline(always)]
    fn rewrite(error: &IcmpError, flow: &FlowOf<V4>) {
        nat::rewrite_quoted(error, flow);
        // ICMP's checksum does not cover the IPv4 header.
        nat::rewrite_ip(error.ip.hdr, flow.new_src_addr_be, flow.new_dst_addr_be);
    }
}

impl IcmpFamily for V6 {
    type Error = IcmpError6;
    const PROTO: u8 = IPPROTO_ICMPV6;

    #[inline(always)]
    fn parse(ctx: &XdpContext) -> Result<IcmpError6, Reason> {
        parse::parse_icmp6_error(ctx)
    }

    #[inline(always)]
    fn quoted_peer_key(error: &IcmpError6) -> FlowKeyOf<V6> {
        // SAFETY: the parser checked the quoted IPv6 header and ports are
        // inside the packet.
        let ((src, dst), ports) = unsafe { (parse::addrs6(error.inner), *error.inner_ports) };
        conntrack::key(
            (dst, u16::from_ne_bytes(ports[1])),
            (src, u16::from_ne_bytes(ports[0])),
            error.inner_proto,
        )
    }

    #[inline(always)]
    fn outer(error: &IcmpError6) -> (u8, u16) {
        // SAFETY: the parser checked the IPv6 header is inside the packet.
        let (hop_limit, payload_len) = unsafe { ((*error.ip).hop_limit, (*error.ip).payload_len) };
        let len = u16::from_be_bytes(payload_len);
        (
            hop_limit,
            len.saturating_add(network_types::ip::Ipv6Hdr::LEN as u16),
        )
    }

    #[inline(always)]
    fn eth(error: &IcmpError6) -> *mut EthHdr {
        error.eth
    }

    #[inline(always)]
    fn rewrite(error: &IcmpError6, flow: &FlowOf<V6>) {
        nat::rewrite_icmp6_error(error, flow);
    }
}
