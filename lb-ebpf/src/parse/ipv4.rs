//! IPv4: header length (options allowed), total length, fragments, protocol.

use super::Frame;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Reason};
use network_types::ip::Ipv4Hdr;

use super::ptr_at;

/// More-fragments flag and fragment offset bits of `Ipv4Hdr::frags`.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
/// Fragment offset bits alone.
const IP_OFFSET_MASK: u16 = 0x1fff;
/// Don't-fragment flag.
pub const IP_DF: u16 = 0x4000;

pub struct Ipv4 {
    pub hdr: *mut Ipv4Hdr,
    /// Offset of the L4 header from the start of the frame.
    pub l4_offset: usize,
    /// Bytes of L4 header and payload the IPv4 total length declares.
    pub l4_len: usize,
    pub proto: u8,
    /// Flags and fragment offset, host order.
    pub frags: u16,
}

impl Ipv4 {
    /// A fragment other than the first: it carries no L4 header.
    #[inline(always)]
    pub fn later_fragment(&self) -> bool {
        self.frags & IP_OFFSET_MASK != 0
    }

    /// The first fragment of a fragmented datagram: L4 header, more follows.
    #[inline(always)]
    pub fn first_fragment(&self) -> bool {
        self.frags & IP_MF_OFFSET_MASK != 0 && !self.later_fragment()
    }
}

/// A TCP or UDP packet's IPv4 header. Later fragments are refused with
/// `PassFragment` (the caller follows them through `XLB_FRAGS`); first
/// fragments are accepted, see `Ipv4::first_fragment`.
#[inline(always)]
pub fn parse_ipv4<C: Frame>(ctx: &C, offset: usize) -> Result<Ipv4, Reason> {
    let ip = parse_ipv4_header(ctx, offset)?;
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    if ip.later_fragment() {
        return Err(Reason::PassFragment);
    }
    Ok(ip)
}

/// Any IPv4 header whose length fields are consistent with the frame.
#[inline(always)]
pub fn parse_ipv4_header<C: Frame>(ctx: &C, offset: usize) -> Result<Ipv4, Reason> {
    let hdr: *mut Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: ptr_at checked that the fixed 20-byte header is inside the packet.
    let (vihl, tot_len, frags, proto) = unsafe {
        (
            (*hdr).vihl,
            u16::from_be_bytes((*hdr).tot_len),
            u16::from_be_bytes((*hdr).frags),
            (*hdr).proto,
        )
    };
    let header_len = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || usize::from(tot_len) < header_len {
        return Err(Reason::PassMalformed);
    }
    if offset + usize::from(tot_len) > ctx.packet_len() {
        return Err(Reason::PassMalformed);
    }
    Ok(Ipv4 {
        hdr,
        l4_offset: offset + header_len,
        l4_len: usize::from(tot_len) - header_len,
        proto,
        frags,
    })
}
