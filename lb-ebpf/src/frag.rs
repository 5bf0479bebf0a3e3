//! Fragments of balanced datagrams. The first fragment (it has the ports)
//! goes through the normal path and its ports are remembered here; later
//! fragments find them by (source, destination, IP id, protocol) and follow
//! the same flow entry, rewriting only their IPv4 header (the L4 checksum,
//! in the first fragment, already accounts for the new addresses and ports).
//!
//! IPv6's are the same with the fragment header's 32-bit identification
//! (`XLB_FRAGS6`): `xlb6` remembers a first fragment's ports, `xlb6_frag`
//! (tail-called, on a stack of its own) follows the later ones, rewriting
//! the addresses and hop limit only (IPv6 has no header checksum).
//!
//! A later fragment that arrives before its first one cannot be held (XDP
//! cannot queue a frame): it is passed to the kernel and counted
//! (`pass_fragment_unknown`); see the README.

use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use lb_common::{
    Addr6, FlowKey, FlowKey6, FragKey, FragKey6, FragPorts, GlobalConfig, Reason, V4, V6,
    flow::FLOW_DIR_REPLY, frag::FRAG_TIMEOUT_NS,
};
use network_types::{eth::EthHdr, ip::Ipv6Hdr};

use crate::{
    conntrack, fib,
    maps::{XLB_FRAGS, XLB_FRAGS6, count_path, count_traffic, forget},
    nat,
    parse::{self, Packet},
    related,
};

/// Records the ports of a first fragment for the datagram's later ones.
#[inline(always)]
pub fn remember(packet: &Packet, key: &FlowKey, now: u64) {
    // SAFETY: the parser checked the IPv4 header is inside the packet.
    let id = unsafe { (*packet.ip.hdr).id };
    let datagram = FragKey {
        src_addr_be: key.src_addr_be,
        dst_addr_be: key.dst_addr_be,
        id_be: u16::from_ne_bytes(id),
        proto: key.proto,
        _pad: 0,
    };
    let ports = FragPorts {
        src_port_be: key.src_port_be,
        dst_port_be: key.dst_port_be,
        _pad: 0,
        seen_ns: now,
    };
    // Losing the record costs the datagram (its later fragments pass).
    let _ = XLB_FRAGS.insert(&datagram, &ports, u64::from(BPF_ANY));
}

/// Forwards a later fragment after its first one, rewritten as its flow's
/// packets are.
#[inline(always)]
pub fn follow(ctx: &XdpContext, cfg: &GlobalConfig, now: u64) -> Result<(u32, Reason), Reason> {
    let eth = parse::parse_eth(ctx)?;
    let ip = parse::parse_ipv4_header(ctx, EthHdr::LEN)?;
    // SAFETY: the parser checked the IPv4 header is inside the packet.
    let (src, dst, id, ttl, tot_len) = unsafe {
        let hdr = &*ip.hdr;
        (
            u32::from_ne_bytes(hdr.src_addr),
            u32::from_ne_bytes(hdr.dst_addr),
            u16::from_ne_bytes(hdr.id),
            hdr.ttl,
            u16::from_be_bytes(hdr.tot_len),
        )
    };
    let datagram = FragKey {
        src_addr_be: src,
        dst_addr_be: dst,
        id_be: id,
        proto: ip.proto,
        _pad: 0,
    };
    // SAFETY: plain-integer LRU value; a racing update gives another
    // datagram's valid ports at worst.
    let ports = match XLB_FRAGS.get_ptr(&datagram) {
        Some(ports) => unsafe { *ports },
        None => return Err(Reason::PassFragmentUnknown),
    };
    if now.saturating_sub(ports.seen_ns) > FRAG_TIMEOUT_NS {
        return Err(Reason::PassFragmentUnknown);
    }
    let key: FlowKey = conntrack::key((src, ports.src_port_be), (dst, ports.dst_port_be), ip.proto);
    let entry = conntrack::lookup(&key, cfg, now).ok_or(Reason::PassFragmentUnknown)?;
    // SAFETY: valid map value pointer for this run.
    let flow = unsafe { *entry };
    related::ttl_allows_forwarding(ttl)?;
    let hop = related::hop_for::<V4>(ctx, entry, &flow, ip.proto, tot_len)?;
    nat::rewrite_ip(ip.hdr, flow.new_src_addr_be, flow.new_dst_addr_be);
    let to_client = flow.direction == FLOW_DIR_REPLY;
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    count_traffic(flow.service_id, flow.backend_id, to_client, frame_len);
    let (action, path) = fib::send::<V4>(ctx, eth, &hop, flow.new_dst_addr_be)?;
    count_path(flow.backend_id, to_client, path);
    Ok((action, Reason::FwdFragment))
}

/// Records the ports of an IPv6 first fragment (`key` its flow's) under
/// the identification the walk left (`parse::ipv6_fragment`).
#[inline(always)]
pub fn remember6(key: &FlowKey6, now: u64) {
    let Some((id_be, _)) = parse::ipv6_fragment() else {
        return;
    };
    let datagram = datagram6(key.src_addr_be, key.dst_addr_be, id_be, key.proto);
    let ports = FragPorts {
        src_port_be: key.src_port_be,
        dst_port_be: key.dst_port_be,
        _pad: 0,
        seen_ns: now,
    };
    // Losing the record costs the datagram (its later fragments pass).
    let _ = XLB_FRAGS6.insert(&datagram, &ports, u64::from(BPF_ANY));
}

/// `XLB_FRAGS6`' key of an IPv6 datagram, written as `conntrack::key`
/// writes flow keys: the protocol and its padding as one aligned word, not
/// `_pad: [0; 3]` (a call to the linker's byte-loop `memset`, once per
/// later fragment).
#[inline(always)]
fn datagram6(src_addr_be: Addr6, dst_addr_be: Addr6, id_be: u32, proto: u8) -> FragKey6 {
    const _: () = assert!(core::mem::offset_of!(FragKey6, proto) % 4 == 0);
    const _: () = assert!(core::mem::align_of::<FragKey6>() >= 4);
    let mut key = core::mem::MaybeUninit::<FragKey6>::uninit();
    let at = key.as_mut_ptr();
    // SAFETY: every field is written; the protocol's word is aligned
    // (asserted above).
    unsafe {
        (&raw mut (*at).src_addr_be).write(src_addr_be);
        (&raw mut (*at).dst_addr_be).write(dst_addr_be);
        (&raw mut (*at).id_be).write(id_be);
        let word = u32::from_ne_bytes([proto, 0, 0, 0]);
        (&raw mut (*at).proto).cast::<u32>().write(word);
        key.assume_init()
    }
}

/// Forwards an IPv6 later fragment after its first one, rewritten as its
/// flow's packets are: addresses and hop limit (the L4 checksum, in the
/// first fragment, already accounts for the new addresses and ports); the
/// fragment header stays.
#[inline(always)]
pub fn follow6(ctx: &XdpContext, cfg: &GlobalConfig, now: u64) -> Result<(u32, Reason), Reason> {
    // The walk again, from `xlb6_frag`'s own frame: `PassFragment` is the
    // only way here with a later fragment's identification noted.
    match parse::parse6(ctx, forget) {
        Err(Reason::PassFragment) => {}
        Err(reason) => return Err(reason),
        Ok(_) => return Err(Reason::PassMalformed),
    }
    let (id_be, proto) = parse::ipv6_fragment().ok_or(Reason::PassNotReady)?;
    let eth: *mut EthHdr = parse::ptr_at(ctx, 0)?;
    let hdr: *mut Ipv6Hdr = parse::ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked the fixed header is inside the packet.
    let ((src, dst), hop_limit, payload_len) = unsafe {
        (
            parse::addrs6(hdr),
            (*hdr).hop_limit,
            u16::from_be_bytes((*hdr).payload_len),
        )
    };
    let datagram = datagram6(src, dst, id_be, proto);
    // SAFETY: plain-integer LRU value; a racing update gives another
    // datagram's valid ports at worst.
    let ports = match XLB_FRAGS6.get_ptr(&datagram) {
        Some(ports) => unsafe { *ports },
        None => return Err(Reason::PassFragmentUnknown),
    };
    if now.saturating_sub(ports.seen_ns) > FRAG_TIMEOUT_NS {
        return Err(Reason::PassFragmentUnknown);
    }
    let key: FlowKey6 = conntrack::key((src, ports.src_port_be), (dst, ports.dst_port_be), proto);
    let entry = conntrack::lookup(&key, cfg, now).ok_or(Reason::PassFragmentUnknown)?;
    // SAFETY: valid map value pointer for this run.
    let flow = unsafe { &*entry };
    related::ttl_allows_forwarding(hop_limit)?;
    let ip_len = payload_len.saturating_add(Ipv6Hdr::LEN as u16);
    let hop = related::hop_for::<V6>(ctx, entry, flow, proto, ip_len)?;
    let _ = nat::rewrite_ipv6(hdr, &flow.new_src_addr_be, &flow.new_dst_addr_be);
    let to_client = flow.direction == FLOW_DIR_REPLY;
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    count_traffic(flow.service_id, flow.backend_id, to_client, frame_len);
    let (action, path) = fib::send::<V6>(ctx, eth, &hop, flow.new_dst_addr_be)?;
    count_path(flow.backend_id, to_client, path);
    Ok((action, Reason::FwdFragment))
}
