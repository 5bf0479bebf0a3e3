//! Header rewrites: addresses, ports and TTL, each paired with its checksum
//! update through `csum`.

use lb_common::{Flow, IPPROTO_UDP};
use lb_ebpf::csum::CsumDelta;

use crate::parse::Packet;

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
