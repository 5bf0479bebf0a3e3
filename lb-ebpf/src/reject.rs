//! Rejecting new flows to a service with no endpoints, as kube-proxy does:
//! ICMP port unreachable for UDP, TCP RST for a SYN. The answer is built in
//! the frame itself and sent back out of the interface it arrived on.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{IPPROTO_UDP, Reason};
use lb_ebpf::csum::{checksum, pseudo_header};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::parse::{Packet, ptr_at};

const ETH: usize = EthHdr::LEN;
const IP: usize = Ipv4Hdr::LEN;
/// ICMP header, then the offending IPv4 header and 8 bytes of its payload.
const ICMP_LEN: usize = 8 + IP + 8;
const ICMP_FRAME: usize = ETH + IP + ICMP_LEN;
const TCP_LEN: usize = 20;
const RST_FRAME: usize = ETH + IP + TCP_LEN;
const IPPROTO_ICMP: u8 = 1;
/// Offsets inside a frame of the fields written here.
const IP_SRC: usize = ETH + 12;
const IP_DST: usize = ETH + 16;
const L4: usize = ETH + IP;

/// Answers `packet` (UDP, or a TCP SYN) with a rejection. Headers with IPv4
/// options are dropped instead: the quoted header would not fit the fixed
/// layout, and a silent drop is also a valid answer.
#[inline(always)]
pub fn reject(ctx: &XdpContext, packet: &Packet) -> Result<(u32, Reason), Reason> {
    if packet.ip.l4_offset != ETH + IP {
        return Err(Reason::DropNoBackend);
    }
    if packet.ip.proto == IPPROTO_UDP {
        port_unreachable(ctx)
    } else {
        tcp_reset(ctx)
    }
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Shrinks the frame to `len` bytes.
#[inline(always)]
fn truncate(ctx: &XdpContext, len: usize) -> Result<(), Reason> {
    let delta = len as i32 - frame_len(ctx) as i32;
    // SAFETY: plain helper call on our own context; a negative delta only
    // shortens the frame, and pointers are re-derived afterwards.
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(Reason::DropNoBackend);
    }
    Ok(())
}

/// Writes the IPv4 header of an answer to the frame's sender: the sender's
/// addresses swapped, fresh TTL, checksum computed from scratch.
#[inline(always)]
fn answer_ip_header(frame: &mut [u8], total_len: usize, proto: u8, src: [u8; 4], dst: [u8; 4]) {
    let len = (total_len as u16).to_be_bytes();
    let header = [
        0x45, 0, len[0], len[1], 0, 0, 0x40, 0, 64, proto, 0, 0, src[0], src[1], src[2], src[3],
        dst[0], dst[1], dst[2], dst[3],
    ];
    frame[ETH..ETH + IP].copy_from_slice(&header);
    let check = checksum(&frame[ETH..ETH + IP], 0);
    frame[ETH + 10..ETH + 12].copy_from_slice(&check.to_ne_bytes());
}

#[inline(always)]
fn swap_macs(frame: &mut [u8]) {
    for at in 0..6 {
        frame.swap(at, at + 6);
    }
}

/// ICMP destination unreachable, port unreachable (type 3, code 3), quoting
/// the datagram's IPv4 header and first 8 bytes.
#[inline(always)]
fn port_unreachable(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let original: *const [u8; ETH + IP + 8] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked these bytes are inside the frame.
    let original = unsafe { *original };
    // Room for the new Ethernet + IPv4 + ICMP headers in front of the quoted
    // IPv4 header: the old Ethernet header's 14 bytes plus 28 more.
    // SAFETY: plain helper call; pointers are re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((IP + 8) as i32)) } != 0 {
        return Err(Reason::DropNoBackend);
    }
    truncate(ctx, ICMP_FRAME)?;
    let frame: *mut [u8; ICMP_FRAME] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the whole answer is inside the frame.
    let frame = unsafe { &mut *frame };
    frame[0..6].copy_from_slice(&original[6..12]);
    frame[6..12].copy_from_slice(&original[0..6]);
    frame[12..14].copy_from_slice(&original[12..14]);
    let (mut src, mut dst) = ([0u8; 4], [0u8; 4]);
    src.copy_from_slice(&original[IP_DST..IP_DST + 4]);
    dst.copy_from_slice(&original[IP_SRC..IP_SRC + 4]);
    answer_ip_header(frame, IP + ICMP_LEN, IPPROTO_ICMP, src, dst);
    frame[L4..L4 + 8].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    let check = checksum(&frame[L4..], 0);
    frame[L4 + 2..L4 + 4].copy_from_slice(&check.to_ne_bytes());
    Ok((xdp_action::XDP_TX, Reason::RejectPortUnreachable))
}

/// RST|ACK for a SYN (RFC 9293 3.10.7.1): seq 0, ack = SYN's seq + 1 + its
/// payload, options and payload dropped.
#[inline(always)]
fn tcp_reset(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let frame: *mut [u8; RST_FRAME] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the bytes are inside the frame; the parser
    // checked this is IPv4 without options and TCP.
    let (ip_total, data_offset, seq) = unsafe {
        let frame = &*frame;
        (
            u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]) as u32,
            (frame[L4 + 12] >> 4) as u32 * 4,
            u32::from_be_bytes([frame[L4 + 4], frame[L4 + 5], frame[L4 + 6], frame[L4 + 7]]),
        )
    };
    let payload = ip_total.saturating_sub(IP as u32 + data_offset);
    truncate(ctx, RST_FRAME)?;
    let frame: *mut [u8; RST_FRAME] = ptr_at(ctx, 0)?;
    // SAFETY: as above, re-derived after the tail moved.
    let frame = unsafe { &mut *frame };
    swap_macs(frame);
    let (mut src, mut dst) = ([0u8; 4], [0u8; 4]);
    src.copy_from_slice(&frame[IP_DST..IP_DST + 4]);
    dst.copy_from_slice(&frame[IP_SRC..IP_SRC + 4]);
    answer_ip_header(frame, IP + TCP_LEN, lb_common::IPPROTO_TCP, src, dst);
    let (sport, dport) = ([frame[L4], frame[L4 + 1]], [frame[L4 + 2], frame[L4 + 3]]);
    let ack = seq.wrapping_add(1).wrapping_add(payload).to_be_bytes();
    let tcp = [
        dport[0], dport[1], sport[0], sport[1], 0, 0, 0, 0, ack[0], ack[1], ack[2], ack[3], 0x50,
        0x14, 0, 0, 0, 0, 0, 0,
    ];
    frame[L4..].copy_from_slice(&tcp);
    let seed = pseudo_header(
        u32::from_ne_bytes(src),
        u32::from_ne_bytes(dst),
        lb_common::IPPROTO_TCP,
        TCP_LEN as u16,
    );
    let check = checksum(&frame[L4..], seed);
    frame[L4 + 16..L4 + 18].copy_from_slice(&check.to_ne_bytes());
    Ok((xdp_action::XDP_TX, Reason::RejectTcpReset))
}
