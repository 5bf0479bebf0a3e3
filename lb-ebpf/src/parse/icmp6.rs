//! ICMPv6 errors (RFC 4443 3.1-3.4): the outer IPv6 + ICMPv6 header and the
//! packet they quote (its IPv6 header and the first 8 bytes of its TCP/UDP
//! header). Extension headers are not walked on either side: a router's
//! error has none, and a quote with some is left to the kernel.

use aya_ebpf::programs::XdpContext;
use lb_common::{IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Reason};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv6Hdr,
};

use super::icmp::{ICMP_HDR_LEN, QUOTED_L4_LEN};
use super::l4::{TCP_CHECK_OFFSET, UDP_CHECK_OFFSET};
use super::{Frame, ptr_at};

/// ICMPv6 error types: destination unreachable, packet too big, time
/// exceeded, parameter problem. Informational messages (echo, NDP) are 128
/// and above.
const ICMP6_ERROR_FIRST: u8 = 1;
const ICMP6_ERROR_LAST: u8 = 4;

/// An ICMPv6 error quoting a TCP or UDP packet.
pub struct IcmpError6 {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv6Hdr,
    /// The ICMPv6 header (checksum at bytes 2..4).
    pub icmp: *mut [u8; ICMP_HDR_LEN],
    /// The quoted packet's IPv6 header.
    pub inner: *mut Ipv6Hdr,
    pub inner_proto: u8,
    /// The quoted source and destination port.
    pub inner_ports: *mut [[u8; 2]; 2],
    /// The quoted TCP/UDP checksum, when the quote reaches it (UDP always;
    /// TCP only when 18 or more bytes of its header are quoted), else null
    /// (an `Option` here is spilled half a pointer at a time, which the
    /// verifier refuses).
    pub inner_check: *mut [u8; 2],
}

/// Parses an ICMPv6 error. Not IPv6: `PassNotIpv4`; not ICMPv6 right after
/// the IPv6 header, or not an error (echo, NDP): `PassNotTcpUdp`, as before
/// xlb looked at ICMPv6; cut short: `PassMalformed`; quoting something no
/// flow can match (ICMPv6, extension headers): `PassIcmpNoFlow`.
#[inline(always)]
pub fn parse_icmp6_error(ctx: &XdpContext) -> Result<IcmpError6, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the whole header is inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv6 as u16 {
        return Err(Reason::PassNotIpv4);
    }
    let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked the fixed 40-byte header is inside the packet.
    let (version, payload_len, next) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            usize::from(u16::from_be_bytes((*ip).payload_len)),
            (*ip).next_hdr,
        )
    };
    if next != IPPROTO_ICMPV6 {
        return Err(Reason::PassNotTcpUdp);
    }
    // Every pointer is checked against the frame before the lengths are
    // compared (see `parse_icmp_error`).
    let icmp_offset = EthHdr::LEN + Ipv6Hdr::LEN;
    let icmp: *mut [u8; ICMP_HDR_LEN] = ptr_at(ctx, icmp_offset)?;
    if version != 6 || payload_len < ICMP_HDR_LEN || icmp_offset + payload_len > ctx.packet_len() {
        return Err(Reason::PassMalformed);
    }
    // SAFETY: ptr_at checked the 8-byte header is inside the packet.
    let kind = unsafe { (*icmp)[0] };
    if !(ICMP6_ERROR_FIRST..=ICMP6_ERROR_LAST).contains(&kind) {
        return Err(Reason::PassNotTcpUdp);
    }
    let inner_offset = icmp_offset + ICMP_HDR_LEN;
    let quoted_len = payload_len - ICMP_HDR_LEN;
    let inner: *mut Ipv6Hdr = ptr_at(ctx, inner_offset)?;
    let l4_offset = inner_offset + Ipv6Hdr::LEN;
    let ports: *mut [u8; QUOTED_L4_LEN] = ptr_at(ctx, l4_offset)?;
    let tcp_check: *mut [u8; 2] =
        ptr_at(ctx, l4_offset + TCP_CHECK_OFFSET).unwrap_or(core::ptr::null_mut());
    // SAFETY: ptr_at checked the quoted fixed header is inside the packet.
    let (inner_version, inner_proto) = unsafe { ((*inner).vcf[0] >> 4, (*inner).next_hdr) };
    if inner_version != 6 || Ipv6Hdr::LEN + QUOTED_L4_LEN > quoted_len {
        return Err(Reason::PassMalformed);
    }
    if inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP {
        return Err(Reason::PassIcmpNoFlow);
    }
    let quoted_l4 = quoted_len - Ipv6Hdr::LEN;
    let inner_check = if inner_proto == IPPROTO_UDP {
        // SAFETY: inside the 8 bytes checked above.
        unsafe { ports.cast::<u8>().add(UDP_CHECK_OFFSET).cast() }
    } else if quoted_l4 >= TCP_CHECK_OFFSET + 2 {
        tcp_check
    } else {
        core::ptr::null_mut()
    };
    Ok(IcmpError6 {
        eth,
        ip,
        icmp,
        inner,
        inner_proto,
        inner_ports: ports.cast(),
        inner_check,
    })
}
