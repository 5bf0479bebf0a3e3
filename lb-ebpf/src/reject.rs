//! Rejecting new flows to a service with no endpoints, as kube-proxy does:
//! ICMP (ICMPv6) port unreachable for UDP, TCP RST for a SYN. The answer is
//! built in the frame itself (headers from `answer` and `answer6`) and sent
//! back out of the interface it arrived on.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{IPPROTO_UDP, Reason, V6};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    answer::{self, ICMP_HEADERS, Sender, TCP_FRAME},
    answer6::{self, Sender6, TCP6_FRAME},
    family::Ip,
    parse::{ICMP_DEST_UNREACHABLE, Packet, ptr_at},
};

/// What port unreachable quotes: the datagram's IPv4 header (no options)
/// and the first 8 bytes after it, as 16-bit words for the checksum.
type Quote = [[u8; 2]; (Ipv4Hdr::LEN + 8) / 2];
const QUOTE_LEN: usize = core::mem::size_of::<Quote>();
/// ICMP destination unreachable, port unreachable.
const PORT_UNREACHABLE: [u8; 2] = [ICMP_DEST_UNREACHABLE, 3];

/// Answers `packet` (UDP, or a TCP SYN) with a rejection. Headers with IPv4
/// options are dropped instead: the quoted header would not fit the fixed
/// layout, and a silent drop is also a valid answer.
#[inline(always)]
pub fn reject(ctx: &XdpContext, packet: &Packet) -> Result<(u32, Reason), Reason> {
    if packet.ip.l4_offset != EthHdr::LEN + Ipv4Hdr::LEN {
        return Err(Reason::DropNoBackend);
    }
    if packet.ip.proto == IPPROTO_UDP {
        port_unreachable(ctx)
    } else {
        tcp_reset(ctx)
    }
}

/// ICMP destination unreachable, port unreachable (type 3, code 3), quoting
/// the datagram's IPv4 header and first 8 bytes.
#[inline(always)]
fn port_unreachable(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let sender = Sender::of(ctx)?;
    let quote: *const Quote = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked these bytes are inside the frame.
    let quote = unsafe { *quote };
    let quote_sum = quote
        .iter()
        .map(|word| u32::from(u16::from_ne_bytes(*word)))
        .sum();
    // The quote stays where it is; the new headers take the old Ethernet
    // header's place and the bytes grown in front of it.
    answer::grow_head(ctx, ICMP_HEADERS - EthHdr::LEN, Reason::DropNoBackend)?;
    answer::truncate(ctx, ICMP_HEADERS + QUOTE_LEN, Reason::DropNoBackend)?;
    let headers = sender.icmp_error(PORT_UNREACHABLE, [0; 4], QUOTE_LEN, quote_sum);
    answer::write(ctx, headers)?;
    Ok((xdp_action::XDP_TX, Reason::RejectPortUnreachable))
}

/// RST|ACK for a SYN (RFC 9293 3.10.7.1): seq 0, ack = SYN's seq + 1 + its
/// payload, options and payload dropped.
#[inline(always)]
fn tcp_reset(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let sender = Sender::of(ctx)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    let syn: *const TcpHdr = ptr_at(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    // SAFETY: ptr_at checked both headers are inside the frame; the parser
    // checked this is IPv4 without options and TCP.
    let (ip_total, data_offset, seq, sender_port, port) = unsafe {
        (
            u32::from(u16::from_be_bytes((*ip).tot_len)),
            u32::from((*syn).doff()) * 4,
            u32::from_be_bytes((*syn).seq),
            (*syn).source,
            (*syn).dest,
        )
    };
    let payload = ip_total.saturating_sub(Ipv4Hdr::LEN as u32 + data_offset);
    let ack = seq.wrapping_add(1).wrapping_add(payload);
    answer::truncate(ctx, TCP_FRAME, Reason::DropNoBackend)?;
    answer::write(ctx, sender.tcp_reset(port, sender_port, ack))?;
    Ok((xdp_action::XDP_TX, Reason::RejectTcpReset))
}

/// ICMPv6 destination unreachable, port unreachable (RFC 4443 3.1).
const PORT_UNREACHABLE6: [u8; 2] = [1, 4];

/// Answers an IPv6 `packet` (UDP, or a TCP SYN) with a rejection.
#[inline(always)]
pub fn reject6(ctx: &XdpContext, packet: &Packet<V6>) -> Result<(u32, Reason), Reason> {
    if packet.ip.proto == IPPROTO_UDP {
        port_unreachable6(ctx, V6::ip_len(&packet.ip))
    } else {
        tcp_reset6(ctx, packet)
    }
}

/// ICMPv6 port unreachable (type 1, code 4), quoting as much of the
/// invoking packet (`ip_len` bytes, its IPv6 header on) as keeps the error
/// within the minimum MTU.
#[inline(always)]
fn port_unreachable6(ctx: &XdpContext, ip_len: u16) -> Result<(u32, Reason), Reason> {
    let quote_len = usize::from(ip_len);
    answer6::icmp_error(
        ctx,
        PORT_UNREACHABLE6,
        [0; 4],
        quote_len,
        Reason::DropNoBackend,
    )?;
    Ok((xdp_action::XDP_TX, Reason::RejectPortUnreachable))
}

/// RST|ACK for an IPv6 SYN, as `tcp_reset`: the SYN's extension headers,
/// options and payload dropped.
#[inline(always)]
fn tcp_reset6(ctx: &XdpContext, packet: &Packet<V6>) -> Result<(u32, Reason), Reason> {
    let sender = Sender6::of(ctx)?;
    let syn: *const TcpHdr = ptr_at(ctx, packet.ip.l4_offset)?;
    // SAFETY: ptr_at checked the header is inside the frame; the parser
    // checked this is TCP.
    let (data_offset, seq, sender_port, port) = unsafe {
        (
            u32::from((*syn).doff()) * 4,
            u32::from_be_bytes((*syn).seq),
            (*syn).source,
            (*syn).dest,
        )
    };
    let payload = (packet.ip.l4_len as u32).saturating_sub(data_offset);
    let ack = seq.wrapping_add(1).wrapping_add(payload);
    answer::truncate(ctx, TCP6_FRAME, Reason::DropNoBackend)?;
    answer::write(ctx, sender.tcp_reset(port, sender_port, ack))?;
    Ok((xdp_action::XDP_TX, Reason::RejectTcpReset))
}

const _: () = assert!(TCP6_FRAME == EthHdr::LEN + Ipv6Hdr::LEN + TcpHdr::LEN);
