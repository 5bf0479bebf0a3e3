//! Header rewrites: addresses, ports and TTL, each paired with its checksum
//! update through `csum`.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{Addr6, Flow, Flow6, FlowOf, IPPROTO_UDP, Reason};
use lb_ebpf::csum::CsumDelta;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    family::Ip,
    parse::{
        IcmpError, IcmpError6, IpHeader, Ipv4, Ipv6, Packet, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET,
        addrs6, wide,
    },
};

/// Offsets in an IPv4 header of the fields rewritten here.
const IP_TTL: usize = 8;
const IP_CHECK: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
/// Offsets in an IPv6 header of the fields rewritten here.
const IP6_HOP_LIMIT: usize = 7;
const IP6_SRC: usize = 8;
const IP6_DST: usize = 24;

/// Rewrites the packet to `flow`'s tuple and decrements the TTL (hop
/// limit), updating the IPv4 and L4 checksums incrementally. The caller
/// checked TTL > 1.
#[inline(always)]
pub fn rewrite<F: Ip>(packet: &Packet<F>, flow: &FlowOf<F>) {
    let addrs = F::rewrite_ip(&packet.ip, flow.new_src_addr_be, flow.new_dst_addr_be);
    let l4 = &packet.l4;
    // SAFETY: the parser checked that the L4 ports and checksum lie inside
    // the packet; each is read and written whole.
    unsafe {
        let ports_at = l4.ports.cast::<u8>();
        let old_ports = wide::load32(ports_at);
        let new_ports = wide::pair(flow.new_src_port_be, flow.new_dst_port_be);
        wide::store32(ports_at, new_ports);
        // The L4 checksum covers the pseudo-header's addresses and the ports.
        let l4_delta = addrs.replace32(old_ports, new_ports);
        let check_at = l4.check.cast::<u8>();
        let old_check = wide::load16(check_at);
        let new_check = l4_check(l4_delta, old_check, packet.ip.proto());
        wide::store16(check_at, new_check);
    }
}

/// A TCP or UDP checksum `check` after the change `delta`: UDP's as
/// `CsumDelta::apply_udp` (0, no checksum, stays 0), others' as `apply`.
#[inline(always)]
fn l4_check(delta: CsumDelta, check: u16, proto: u8) -> u16 {
    if proto == IPPROTO_UDP {
        delta.apply_udp(check)
    } else {
        delta.apply(check)
    }
}

/// Where a tc rewrite updates the L4 checksum: its offset, and
/// `BPF_F_MARK_MANGLED_0` for UDP (a zero UDP checksum stays zero).
#[derive(Clone, Copy)]
pub struct L4Check {
    pub offset: usize,
    pub mangled: u64,
}

/// `rewrite` for an skb at tc. The skb may be CHECKSUM_PARTIAL (every packet
/// a pod sends: only the pseudo-header sum is in the L4 checksum field, the
/// NIC or the stack finishes it), CHECKSUM_COMPLETE or already verified, and
/// only the kernel's checksum helpers know how to update each state: address
/// changes go through `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` (which
/// for a partial checksum updates only the pseudo-header seed), port changes
/// without it (a no-op on a partial checksum, whose payload sum is not there
/// yet). Fields are then written with `bpf_skb_store_bytes` by offset: the
/// helpers invalidate packet pointers. The caller checked TTL > 1.
#[inline(always)]
pub fn rewrite_skb<F: Ip>(
    ctx: &TcContext,
    packet: &Packet<F>,
    flow: &FlowOf<F>,
) -> Result<(), Reason> {
    // Read before any helper runs: they invalidate packet pointers.
    let (old_sport, old_dport) = packet.l4.ports_be();
    let l4_offset = packet.ip.l4_offset();
    let check = if packet.ip.proto() == IPPROTO_UDP {
        L4Check {
            offset: l4_offset + UDP_CHECK_OFFSET,
            mangled: u64::from(BPF_F_MARK_MANGLED_0),
        }
    } else {
        L4Check {
            offset: l4_offset + TCP_CHECK_OFFSET,
            mangled: 0,
        }
    };
    F::rewrite_ip_skb(
        ctx,
        &packet.ip,
        check,
        &flow.new_src_addr_be,
        &flow.new_dst_addr_be,
    )?;
    let (new_sport, new_dport) = (flow.new_src_port_be, flow.new_dst_port_be);
    let failed = |_| Reason::DropTcRewrite;
    let port = check.mangled | 2;
    ctx.l4_csum_replace(check.offset, old_sport.into(), new_sport.into(), port)
        .map_err(failed)?;
    ctx.l4_csum_replace(check.offset, old_dport.into(), new_dport.into(), port)
        .map_err(failed)?;
    let ports = [new_sport.to_ne_bytes(), new_dport.to_ne_bytes()];
    ctx.store(l4_offset, &ports, 0).map_err(failed)?;
    Ok(())
}

/// `rewrite_skb`'s IPv4 header: addresses (in the L4 pseudo-header sum
/// too), TTL, header checksum.
#[inline(always)]
pub fn rewrite_ipv4_skb(
    ctx: &TcContext,
    ip: &Ipv4,
    check: L4Check,
    new_src: u32,
    new_dst: u32,
) -> Result<(), Reason> {
    let ip_at = EthHdr::LEN;
    // SAFETY: the parser checked that the IPv4 header lies inside the
    // packet; nothing has moved it yet.
    let (old_src, old_dst, ttl, proto) = unsafe {
        let hdr = ip.hdr;
        (
            u32::from_ne_bytes((*hdr).src_addr),
            u32::from_ne_bytes((*hdr).dst_addr),
            (*hdr).ttl,
            (*hdr).proto,
        )
    };
    let old_ttl_proto = u16::from_ne_bytes([ttl, proto]);
    let new_ttl_proto = u16::from_ne_bytes([ttl - 1, proto]);
    let failed = |_| Reason::DropTcRewrite;
    let ip_check = ip_at + IP_CHECK;
    let addr = u64::from(BPF_F_PSEUDO_HDR) | check.mangled | 4;
    ctx.l4_csum_replace(check.offset, old_src.into(), new_src.into(), addr)
        .map_err(failed)?;
    ctx.l4_csum_replace(check.offset, old_dst.into(), new_dst.into(), addr)
        .map_err(failed)?;
    ctx.l3_csum_replace(ip_check, old_src.into(), new_src.into(), 4)
        .map_err(failed)?;
    ctx.l3_csum_replace(ip_check, old_dst.into(), new_dst.into(), 4)
        .map_err(failed)?;
    ctx.l3_csum_replace(ip_check, old_ttl_proto.into(), new_ttl_proto.into(), 2)
        .map_err(failed)?;
    ctx.store(ip_at + IP_TTL, &(ttl - 1), 0).map_err(failed)?;
    ctx.store(ip_at + IP_SRC, &new_src.to_ne_bytes(), 0)
        .map_err(failed)?;
    ctx.store(ip_at + IP_DST, &new_dst.to_ne_bytes(), 0)
        .map_err(failed)?;
    Ok(())
}

/// `rewrite_skb`'s IPv6 header: addresses (in the L4 pseudo-header sum,
/// a 32-bit word at a time) and hop limit; IPv6 has no header checksum.
#[inline(always)]
pub fn rewrite_ipv6_skb(
    ctx: &TcContext,
    ip: &Ipv6,
    check: L4Check,
    new_src: &Addr6,
    new_dst: &Addr6,
) -> Result<(), Reason> {
    let ip_at = EthHdr::LEN;
    // SAFETY: the parser checked that the IPv6 header lies inside the
    // packet; nothing has moved it yet.
    let ((old_src, old_dst), hop_limit) = unsafe { (addrs6(ip.hdr), (*ip.hdr).hop_limit) };
    let failed = |_| Reason::DropTcRewrite;
    let addr = u64::from(BPF_F_PSEUDO_HDR) | check.mangled | 4;
    for word in 0..4 {
        ctx.l4_csum_replace(
            check.offset,
            old_src[word].into(),
            new_src[word].into(),
            addr,
        )
        .map_err(failed)?;
        ctx.l4_csum_replace(
            check.offset,
            old_dst[word].into(),
            new_dst[word].into(),
            addr,
        )
        .map_err(failed)?;
    }
    ctx.store(ip_at + IP6_HOP_LIMIT, &(hop_limit - 1), 0)
        .map_err(failed)?;
    ctx.store(ip_at + IP6_SRC, new_src, 0).map_err(failed)?;
    ctx.store(ip_at + IP6_DST, new_dst, 0).map_err(failed)?;
    Ok(())
}

/// Rewrites only the IPv4 header to (`src_be`, `dst_be`) and decrements the
/// TTL: for a whole packet (`rewrite` goes on with L4), a later fragment (no
/// L4 header) and an ICMP error's outer header (ICMP's checksum does not
/// cover the IPv4 header). Returns the address change as a checksum delta,
/// for a pseudo-header. The caller checked TTL > 1.
#[inline(always)]
pub fn rewrite_ip(ip: *mut Ipv4Hdr, src_be: u32, dst_be: u32) -> CsumDelta {
    // SAFETY: the parser checked that the IPv4 header lies inside the
    // packet; each field is read and written whole.
    unsafe {
        let at = ip.cast::<u8>();
        let (src_at, dst_at, check_at) = (at.add(IP_SRC), at.add(IP_DST), at.add(IP_CHECK));
        let old_src = wide::load32(src_at);
        let old_dst = wide::load32(dst_at);
        // TTL and protocol make one 16-bit word of the header checksum.
        let ttl_proto = wide::load16(at.add(IP_TTL));
        let [ttl, proto] = ttl_proto.to_ne_bytes();
        let new_ttl_proto = u16::from_ne_bytes([ttl - 1, proto]);
        wide::store16(at.add(IP_TTL), new_ttl_proto);
        wide::store32(src_at, src_be);
        wide::store32(dst_at, dst_be);
        let addrs = CsumDelta::new()
            .replace32(old_src, src_be)
            .replace32(old_dst, dst_be);
        let check = addrs
            .replace16(ttl_proto, new_ttl_proto)
            .apply(wide::load16(check_at));
        wide::store16(check_at, check);
        addrs
    }
}

/// Rewrites only the IPv6 header to (`src`, `dst`) and decrements the hop
/// limit (IPv6 has no header checksum). Returns the address change as a
/// checksum delta, for the L4 pseudo-header. The caller checked the hop
/// limit is above 1. A BPF function of its own: its 32 bytes of address
/// words would not fit the forwarding path's frame.
#[inline(never)]
pub fn rewrite_ipv6(ip: *mut Ipv6Hdr, src: &Addr6, dst: &Addr6) -> CsumDelta {
    // SAFETY: the parser checked that the IPv6 header lies inside the
    // packet; the addresses are read and written a word at a time in
    // memory order.
    unsafe {
        (*ip).hop_limit -= 1;
        let src_at = (*ip).src_addr.as_mut_ptr();
        let dst_at = (*ip).dst_addr.as_mut_ptr();
        let mut addrs = CsumDelta::new();
        for word in 0..4 {
            let at = src_at.add(word * 4);
            addrs = addrs.replace32(wide::load32(at), src[word]);
            wide::store32(at, src[word]);
            let at = dst_at.add(word * 4);
            addrs = addrs.replace32(wide::load32(at), dst[word]);
            wide::store32(at, dst[word]);
        }
        addrs
    }
}

/// Rewrites the packet an ICMP error quotes as `flow` says its peer's
/// packets look (the quoted packet went the other way), and the ICMP
/// checksum by every 16-bit word changed: addresses, ports, the quoted IPv4
/// checksum and, when quoted, the TCP/UDP checksum (updated as for the real
/// packet, so the quote stays the rewritten packet's own first bytes).
#[inline(always)]
pub fn rewrite_quoted(error: &IcmpError, flow: &Flow) {
    let inner = error.inner;
    // SAFETY: parse_icmp_error checked that the ICMP header, the quoted
    // IPv4 header, its ports and (when set) its L4 checksum are inside the
    // packet; all are byte arrays (align 1).
    unsafe {
        let old_src = u32::from_ne_bytes((*inner).src_addr);
        let old_dst = u32::from_ne_bytes((*inner).dst_addr);
        let ports = *error.inner_ports;
        let (old_sport, old_dport) = (u16::from_ne_bytes(ports[0]), u16::from_ne_bytes(ports[1]));
        // The quoted packet travelled opposite to `flow`'s packets.
        let (src, sport) = (flow.new_dst_addr_be, flow.new_dst_port_be);
        let (dst, dport) = (flow.new_src_addr_be, flow.new_src_port_be);

        let addrs = CsumDelta::new()
            .replace32(old_src, src)
            .replace32(old_dst, dst);
        (*inner).src_addr = src.to_ne_bytes();
        (*inner).dst_addr = dst.to_ne_bytes();
        let old_ip_check = u16::from_ne_bytes((*inner).check);
        let new_ip_check = addrs.apply(old_ip_check);
        (*inner).check = new_ip_check.to_ne_bytes();
        *error.inner_ports = [sport.to_ne_bytes(), dport.to_ne_bytes()];

        let mut icmp = addrs
            .replace16(old_sport, sport)
            .replace16(old_dport, dport)
            .replace16(old_ip_check, new_ip_check);
        if let Some(check) = error.inner_check {
            let old_check = u16::from_ne_bytes(*check);
            let l4 = addrs
                .replace16(old_sport, sport)
                .replace16(old_dport, dport);
            let new_check = l4_check(l4, old_check, error.inner_proto);
            *check = new_check.to_ne_bytes();
            icmp = icmp.replace16(old_check, new_check);
        }
        let icmp_check = error.icmp.cast::<u8>().add(2).cast::<[u8; 2]>();
        *icmp_check = icmp.apply(u16::from_ne_bytes(*icmp_check)).to_ne_bytes();
    }
}

/// Rewrites an ICMPv6 error as `flow` says: its outer IPv6 header (as
/// `rewrite_ipv6`), the quoted packet (as `rewrite_quoted`; IPv6 has no
/// header checksum) and the ICMPv6 checksum, which covers both: the quote's
/// changed words, and the outer addresses through its pseudo-header.
#[inline(always)]
pub fn rewrite_icmp6_error(error: &IcmpError6, flow: &Flow6) {
    let outer = rewrite_ipv6(error.ip, &flow.new_src_addr_be, &flow.new_dst_addr_be);
    let inner = error.inner;
    // SAFETY: parse_icmp6_error checked that the ICMPv6 header, the quoted
    // IPv6 header, its ports and (when set) its L4 checksum are inside the
    // packet; all are byte arrays (align 1).
    unsafe {
        let ports = *error.inner_ports;
        let (old_sport, old_dport) = (u16::from_ne_bytes(ports[0]), u16::from_ne_bytes(ports[1]));
        // The quoted packet travelled opposite to `flow`'s packets.
        let (sport, dport) = (flow.new_dst_port_be, flow.new_src_port_be);
        let src = core::ptr::addr_of_mut!((*inner).src_addr);
        let dst = core::ptr::addr_of_mut!((*inner).dst_addr);
        let addrs = replace_addr6(src, &flow.new_dst_addr_be, CsumDelta::new());
        let addrs = replace_addr6(dst, &flow.new_src_addr_be, addrs);
        *error.inner_ports = [sport.to_ne_bytes(), dport.to_ne_bytes()];
        let l4 = addrs
            .replace16(old_sport, sport)
            .replace16(old_dport, dport);
        let mut icmp = l4;
        let check = error.inner_check;
        if !check.is_null() {
            let old_check = u16::from_ne_bytes(*check);
            let new_check = l4_check(l4, old_check, error.inner_proto);
            *check = new_check.to_ne_bytes();
            icmp = icmp.replace16(old_check, new_check);
        }
        let icmp_check = error.icmp.cast::<u8>().add(2).cast::<[u8; 2]>();
        let new_icmp_check = icmp.and(outer).apply(u16::from_ne_bytes(*icmp_check));
        *icmp_check = new_icmp_check.to_ne_bytes();
    }
}

/// Writes `new` over the IPv6 address at `addr` a word at a time (as
/// `rewrite_ipv6` does); returns `delta` with the change added. A BPF
/// function of its own: inline, its words spill over the caller's frame.
///
/// # Safety
/// `addr` points to 16 bytes inside the packet.
#[inline(never)]
unsafe fn replace_addr6(addr: *mut [u8; 16], new: &Addr6, delta: CsumDelta) -> CsumDelta {
    let at = addr.cast::<u8>();
    let mut delta = delta;
    for (word, new) in new.iter().enumerate() {
        // SAFETY: the caller's 16 bytes hold four words.
        unsafe {
            let word_at = at.add(word * 4);
            delta = delta.replace32(wide::load32(word_at), *new);
            wide::store32(word_at, *new);
        }
    }
    delta
}
