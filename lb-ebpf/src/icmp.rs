//! ICMP errors about balanced flows (destination unreachable of every code,
//! fragmentation needed among them, and time exceeded), translated the way
//! kube-proxy's conntrack does for "related" packets.
//!
//! An error quotes a packet the node sent: to a backend (client -> backend
//! direction, rewritten) or to a client (a reply, reverse-NATed). Swapping
//! the quoted tuple gives the key of the flow entry for the *opposite*
//! direction (Katran's `handle_icmp`, Cilium's
//! `snat_v4_rev_nat_handle_icmp_error`); that entry's rewrite is exactly
//! what the error needs: its outer header goes where that entry sends
//! packets, from the address that entry writes, and the quote becomes the
//! packet as the far end sent it.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, GlobalConfig, IPPROTO_ICMP, Reason, V4, flow::FLOW_DIR_REPLY};

use crate::{
    conntrack, fib,
    maps::{count_path, count_traffic},
    nat,
    parse::{self, IcmpError},
    related,
};

/// Translates and forwards an ICMP error about a flow; anything else is
/// left to the kernel with its reason.
#[inline(always)]
pub fn translate(ctx: &XdpContext, cfg: &GlobalConfig, now: u64) -> Result<(u32, Reason), Reason> {
    let error = parse::parse_icmp_error(ctx)?;
    let key = quoted_peer_key(&error);
    let entry = conntrack::lookup(&key, cfg, now).ok_or(Reason::PassIcmpNoFlow)?;
    // SAFETY: valid map value pointer for this run.
    let flow = unsafe { *entry };
    // SAFETY: the parser checked the IPv4 header is inside the packet.
    let (ttl, tot_len) = unsafe {
        (
            (*error.ip.hdr).ttl,
            u16::from_be_bytes((*error.ip.hdr).tot_len),
        )
    };
    related::ttl_allows_forwarding(ttl)?;
    let hop = related::hop_for(ctx, entry, &flow, IPPROTO_ICMP, tot_len)?;
    nat::rewrite_quoted(&error, &flow);
    nat::rewrite_ip(error.ip.hdr, flow.new_src_addr_be, flow.new_dst_addr_be);
    let to_client = flow.direction == FLOW_DIR_REPLY;
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    count_traffic(flow.service_id, flow.backend_id, to_client, frame_len);
    let reason = if to_client {
        Reason::FwdIcmpToClient
    } else {
        Reason::FwdIcmpToBackend
    };
    let (action, path) = fib::send::<V4>(ctx, error.eth, &hop, flow.new_dst_addr_be)?;
    count_path(flow.backend_id, to_client, path);
    Ok((action, reason))
}

/// The key of the entry for packets going opposite to the quoted one.
#[inline(always)]
fn quoted_peer_key(error: &IcmpError) -> FlowKey {
    // SAFETY: the parser checked the quoted IPv4 header and ports are
    // inside the packet.
    let (src, dst, ports) = unsafe {
        (
            (*error.inner).src_addr,
            (*error.inner).dst_addr,
            *error.inner_ports,
        )
    };
    FlowKey {
        src_addr_be: u32::from_ne_bytes(dst),
        dst_addr_be: u32::from_ne_bytes(src),
        src_port_be: u16::from_ne_bytes(ports[1]),
        dst_port_be: u16::from_ne_bytes(ports[0]),
        proto: error.inner_proto,
        _pad: [0; 3],
    }
}
