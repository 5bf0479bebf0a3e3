//! TCP and UDP: the ports and checksum xlb rewrites, and TCP flags.

use super::Frame;
use lb_common::{IPPROTO_TCP, Reason};
use network_types::{tcp::TcpHdr, udp::UdpHdr};

use super::{IpHeader, ptr_at, wide};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offset of the flags byte in a TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
/// Offsets of the checksum field in the TCP and UDP headers.
pub const TCP_CHECK_OFFSET: usize = 16;
pub const UDP_CHECK_OFFSET: usize = 6;

pub struct L4 {
    /// Source and destination port, as on the wire (both headers start so).
    pub ports: *mut [[u8; 2]; 2],
    /// The TCP or UDP checksum field.
    pub check: *mut [u8; 2],
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
}

impl L4 {
    /// (source, destination) port in memory order.
    #[inline(always)]
    pub fn ports_be(&self) -> (u16, u16) {
        // SAFETY: parse_l4 checked the header is inside the packet.
        wide::halves(unsafe { wide::load32(self.ports.cast()) })
    }
}

#[inline(always)]
pub fn parse_l4<C: Frame, H: IpHeader>(ctx: &C, ip: &H) -> Result<L4, Reason> {
    let offset = ip.l4_offset();
    let l4_len = ip.l4_len();
    // A header in the frame's trailing bytes but past the IPv4 total length
    // is not part of this packet.
    if ip.proto() == IPPROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, offset)?;
        // SAFETY: ptr_at checked the 20-byte header is inside the packet.
        let (doff_flags, flags) = unsafe {
            let raw = tcp.cast::<u8>();
            (*raw.add(12), *raw.add(TCP_FLAGS_OFFSET))
        };
        let header_len = usize::from(doff_flags >> 4) * 4;
        if header_len < TcpHdr::LEN || header_len > l4_len {
            return Err(Reason::PassMalformed);
        }
        Ok(L4 {
            ports: tcp.cast(),
            // SAFETY: inside the header checked above.
            check: unsafe { tcp.cast::<u8>().add(TCP_CHECK_OFFSET).cast() },
            tcp_flags: flags,
        })
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, offset)?;
        // SAFETY: ptr_at checked the 8-byte header is inside the packet.
        let len = unsafe { u16::from_be_bytes((*udp).len) };
        // A first fragment carries the whole datagram's length.
        let whole = ip.first_fragment() || usize::from(len) <= l4_len;
        if usize::from(len) < UdpHdr::LEN || l4_len < UdpHdr::LEN || !whole {
            return Err(Reason::PassMalformed);
        }
        Ok(L4 {
            ports: udp.cast(),
            // SAFETY: inside the header checked above.
            check: unsafe { udp.cast::<u8>().add(UDP_CHECK_OFFSET).cast() },
            tcp_flags: 0,
        })
    }
}

/// A TCP segment's sequence and acknowledgement numbers (host order) and
/// its payload length, read again from the header `parse_l4` checked (so
/// the parsed `Packet` stays small on the entry's stack); all 0 for UDP.
#[inline(always)]
pub fn tcp_numbers<C: Frame, H: IpHeader>(ctx: &C, ip: &H) -> (u32, u32, u32) {
    if ip.proto() != IPPROTO_TCP {
        return (0, 0, 0);
    }
    let Ok(tcp) = ptr_at::<[u8; 13], C>(ctx, ip.l4_offset()) else {
        return (0, 0, 0);
    };
    // SAFETY: ptr_at checked the 13 bytes are inside the packet.
    let raw = unsafe { *tcp };
    let seq = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    let ack = u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let header_len = usize::from(raw[12] >> 4) * 4;
    (seq, ack, ip.l4_len().saturating_sub(header_len) as u32)
}
