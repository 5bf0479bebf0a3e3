//! Header rewrites: addresses, ports and TTL, each paired with its checksum
//! update through `csum`.

use lb_common::{Flow, IPPROTO_UDP};
use lb_ebpf::csum::CsumDelta;
use network_types::ip::Ipv4Hdr;

use crate::parse::{IcmpError, Packet};

/// Rewrites the packet to `flow`'s tuple and decrements the TTL, updating the
/// IPv4 and L4 checksums incrementally. The caller checked TTL > 1.
#[inline(always)]
pub fn rewrite(packet: &Packet, flow: &Flow) {
    let ip = packet.ip.hdr;
    let l4 = &packet.l4;
    // SAFETY: the parser checked that the IPv4 header and the L4 ports and
    // checksum lie inside the packet; all fields are byte arrays (align 1).
    unsafe {
        let old_src = u32::from_ne_bytes((*ip).src_addr);
        let old_dst = u32::from_ne_bytes((*ip).dst_addr);
        let ttl_proto = ip.cast::<u8>().add(8).cast::<[u8; 2]>();
        let old_ttl_proto = u16::from_ne_bytes(*ttl_proto);
        (*ip).ttl -= 1;
        let new_ttl_proto = u16::from_ne_bytes(*ttl_proto);

        (*ip).src_addr = flow.new_src_addr_be.to_ne_bytes();
        (*ip).dst_addr = flow.new_dst_addr_be.to_ne_bytes();
        let addrs = CsumDelta::new()
            .replace32(old_src, flow.new_src_addr_be)
            .replace32(old_dst, flow.new_dst_addr_be);
        let ip_check = addrs
            .replace16(old_ttl_proto, new_ttl_proto)
            .apply(u16::from_ne_bytes((*ip).check));
        (*ip).check = ip_check.to_ne_bytes();

        let (old_sport, old_dport) = l4.ports_be();
        *l4.ports = [
            flow.new_src_port_be.to_ne_bytes(),
            flow.new_dst_port_be.to_ne_bytes(),
        ];
        // The L4 checksum covers the pseudo-header's addresses and the ports.
        let l4_delta = addrs
            .replace16(old_sport, flow.new_src_port_be)
            .replace16(old_dport, flow.new_dst_port_be);
        let old_check = u16::from_ne_bytes(*l4.check);
        let new_check = if packet.ip.proto == IPPROTO_UDP {
            l4_delta.apply_udp(old_check)
        } else {
            l4_delta.apply(old_check)
        };
        *l4.check = new_check.to_ne_bytes();
    }
}

/// Rewrites only the IPv4 header to (`src_be`, `dst_be`) and decrements the
/// TTL: for a later fragment (no L4 header) and an ICMP error's outer
/// header (ICMP's checksum does not cover the IPv4 header). The caller
/// checked TTL > 1.
#[inline(always)]
pub fn rewrite_ip(ip: *mut Ipv4Hdr, src_be: u32, dst_be: u32) {
    // SAFETY: the parser checked that the IPv4 header lies inside the
    // packet; all fields are byte arrays (align 1).
    unsafe {
        let old_src = u32::from_ne_bytes((*ip).src_addr);
        let old_dst = u32::from_ne_bytes((*ip).dst_addr);
        let ttl_proto = ip.cast::<u8>().add(8).cast::<[u8; 2]>();
        let old_ttl_proto = u16::from_ne_bytes(*ttl_proto);
        (*ip).ttl -= 1;
        let new_ttl_proto = u16::from_ne_bytes(*ttl_proto);
        (*ip).src_addr = src_be.to_ne_bytes();
        (*ip).dst_addr = dst_be.to_ne_bytes();
        let check = CsumDelta::new()
            .replace32(old_src, src_be)
            .replace32(old_dst, dst_be)
            .replace16(old_ttl_proto, new_ttl_proto)
            .apply(u16::from_ne_bytes((*ip).check));
        (*ip).check = check.to_ne_bytes();
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
            let new_check = if error.inner_proto == IPPROTO_UDP {
                l4.apply_udp(old_check)
            } else {
                l4.apply(old_check)
            };
            *check = new_check.to_ne_bytes();
            icmp = icmp.replace16(old_check, new_check);
        }
        let icmp_check = error.icmp.cast::<u8>().add(2).cast::<[u8; 2]>();
        *icmp_check = icmp.apply(u16::from_ne_bytes(*icmp_check)).to_ne_bytes();
    }
}
