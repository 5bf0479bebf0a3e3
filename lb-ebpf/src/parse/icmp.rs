//! ICMP errors: the outer IPv4 + ICMP header and the packet they quote (its
//! IPv4 header, options included, and the first 8 bytes of its TCP/UDP
//! header, all a router must send back).

use aya_ebpf::programs::XdpContext;
use lb_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Reason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use super::l4::{TCP_CHECK_OFFSET, UDP_CHECK_OFFSET};
use super::{Ipv4, parse_eth, parse_ipv4_header, ptr_at};

pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Destination unreachable, code 4: fragmentation needed and DF set.
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// The ICMP header: type, code, checksum and 4 bytes (unused, or the
/// next-hop MTU for fragmentation needed).
pub const ICMP_HDR_LEN: usize = 8;
/// The part of the quoted L4 header every error carries: both ports, and
/// for UDP its checksum (ICMPv6's errors quote the same).
pub(super) const QUOTED_L4_LEN: usize = 8;

/// An ICMP destination-unreachable or time-exceeded message quoting a TCP
/// or UDP packet.
pub struct IcmpError {
    pub eth: *mut EthHdr,
    pub ip: Ipv4,
    /// The ICMP header (checksum at bytes 2..4).
    pub icmp: *mut [u8; ICMP_HDR_LEN],
    /// The quoted packet's IPv4 header.
    pub inner: *mut Ipv4Hdr,
    pub inner_proto: u8,
    /// The quoted source and destination port.
    pub inner_ports: *mut [[u8; 2]; 2],
    /// The quoted TCP/UDP checksum, when the quote reaches it (UDP always;
    /// TCP only when 18 or more bytes of its header are quoted).
    pub inner_check: Option<*mut [u8; 2]>,
}

/// Parses an ICMP error. Not an ICMP error: `PassNotTcpUdp` (as before xlb
/// looked at ICMP); a fragment: `PassFragment`; cut short: `PassMalformed`; quoting something no flow
/// can match (ICMP, a later fragment): `PassIcmpNoFlow`.
#[inline(always)]
pub fn parse_icmp_error(ctx: &XdpContext) -> Result<IcmpError, Reason> {
    let eth = parse_eth(ctx)?;
    let ip = parse_ipv4_header(ctx, EthHdr::LEN)?;
    if ip.proto != IPPROTO_ICMP {
        return Err(Reason::PassNotTcpUdp);
    }
    if ip.frags & 0x3fff != 0 {
        return Err(Reason::PassFragment);
    }
    // Every pointer is checked against the frame before the lengths are
    // compared: once the lengths are known to fit, the compiler drops the
    // frame check the verifier needs.
    let icmp: *mut [u8; ICMP_HDR_LEN] = ptr_at(ctx, ip.l4_offset)?;
    if ip.l4_len < ICMP_HDR_LEN {
        return Err(Reason::PassMalformed);
    }
    // SAFETY: ptr_at checked the 8-byte header is inside the packet.
    let kind = unsafe { (*icmp)[0] };
    if kind != ICMP_DEST_UNREACHABLE && kind != ICMP_TIME_EXCEEDED {
        return Err(Reason::PassNotTcpUdp);
    }
    let inner_offset = ip.l4_offset + ICMP_HDR_LEN;
    let quoted_len = ip.l4_len - ICMP_HDR_LEN;
    let inner: *mut Ipv4Hdr = ptr_at(ctx, inner_offset)?;
    // SAFETY: ptr_at checked the fixed 20-byte header is inside the packet.
    let (vihl, frags, inner_proto) = unsafe {
        (
            (*inner).vihl,
            u16::from_be_bytes((*inner).frags),
            (*inner).proto,
        )
    };
    let inner_len = usize::from(vihl & 0x0f) * 4;
    let l4_offset = inner_offset + inner_len;
    let ports: *mut [u8; QUOTED_L4_LEN] = ptr_at(ctx, l4_offset)?;
    let tcp_check: Option<*mut [u8; 2]> = ptr_at(ctx, l4_offset + TCP_CHECK_OFFSET).ok();
    if vihl >> 4 != 4 || inner_len < Ipv4Hdr::LEN || inner_len + QUOTED_L4_LEN > quoted_len {
        return Err(Reason::PassMalformed);
    }
    if inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP || frags & 0x1fff != 0 {
        return Err(Reason::PassIcmpNoFlow);
    }
    let quoted_l4 = quoted_len - inner_len;
    let inner_check = if inner_proto == IPPROTO_UDP {
        // SAFETY: inside the 8 bytes checked above.
        Some(unsafe { ports.cast::<u8>().add(UDP_CHECK_OFFSET).cast() })
    } else if quoted_l4 >= TCP_CHECK_OFFSET + 2 {
        tcp_check
    } else {
        None
    };
    Ok(IcmpError {
        eth,
        ip,
        icmp,
        inner,
        inner_proto,
        inner_ports: ports.cast(),
        inner_check,
    })
}
