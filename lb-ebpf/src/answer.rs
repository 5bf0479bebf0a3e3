//! The frames xlb writes itself (TCP RST, ICMP port unreachable, ICMP
//! fragmentation needed): their headers are built here as values, field by
//! field with their checksums, and written over the frame in one piece.
//! Every answer goes back to the frame's sender from the address it wrote
//! to, with a fresh IPv4 header (DF, TTL 64, no options).

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{IPPROTO_ICMP, IPPROTO_TCP, Reason};
use lb_ebpf::csum::{checksum, pseudo_header};
use network_types::{
    bitfield::BitfieldU16, eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr,
};

use crate::parse::{IP_DF, TCP_ACK, TCP_RST, ptr_at};

/// An ICMP error's headers, in front of the packet it quotes.
#[repr(C)]
pub struct IcmpAnswer {
    eth: EthHdr,
    ip: Ipv4Hdr,
    icmp: Icmpv4Hdr,
}
pub const ICMP_HEADERS: usize = core::mem::size_of::<IcmpAnswer>();
const _: () = assert!(ICMP_HEADERS == EthHdr::LEN + Ipv4Hdr::LEN + Icmpv4Hdr::LEN);

/// A TCP reset, the whole frame: no options, no payload.
#[repr(C)]
pub struct TcpAnswer {
    eth: EthHdr,
    ip: Ipv4Hdr,
    tcp: TcpHdr,
}
pub const TCP_FRAME: usize = core::mem::size_of::<TcpAnswer>();
const _: () = assert!(TCP_FRAME == EthHdr::LEN + Ipv4Hdr::LEN + TcpHdr::LEN);

/// The Ethernet and IPv4 headers of the frame being answered.
#[repr(C)]
struct Received {
    eth: EthHdr,
    ip: Ipv4Hdr,
}

/// Who sent the frame being answered (where the answer goes) and where it
/// was sent to (where the answer comes from).
#[derive(Clone, Copy)]
pub struct Sender {
    mac: [u8; 6],
    addr: [u8; 4],
    node_mac: [u8; 6],
    node_addr: [u8; 4],
    ether_type: u16,
}

impl Sender {
    /// Reads the frame's headers, before an answer overwrites them.
    #[inline(always)]
    pub fn of(ctx: &XdpContext) -> Result<Self, Reason> {
        let received: *const Received = ptr_at(ctx, 0)?;
        // SAFETY: ptr_at checked the headers are inside the frame; read
        // unaligned, as the frame gives no alignment.
        let received = unsafe { received.read_unaligned() };
        Ok(Self {
            mac: received.eth.src_addr,
            addr: received.ip.src_addr,
            node_mac: received.eth.dst_addr,
            node_addr: received.ip.dst_addr,
            ether_type: received.eth.ether_type,
        })
    }

    #[inline(always)]
    fn eth(&self) -> EthHdr {
        EthHdr {
            dst_addr: self.mac,
            src_addr: self.node_mac,
            ether_type: self.ether_type,
        }
    }

    /// The IPv4 header in front of `l4_len` bytes of `proto`.
    #[inline(always)]
    fn ipv4(&self, proto: u8, l4_len: usize) -> Ipv4Hdr {
        let mut ip = Ipv4Hdr {
            vihl: 0x45,
            tos: 0,
            tot_len: ((Ipv4Hdr::LEN + l4_len) as u16).to_be_bytes(),
            id: [0, 0],
            frags: IP_DF.to_be_bytes(),
            ttl: 64,
            proto,
            check: [0, 0],
            src_addr: self.node_addr,
            dst_addr: self.addr,
        };
        let (src, dst) = (ip.src_addr, ip.dst_addr);
        let words = [
            [ip.vihl, ip.tos],
            ip.tot_len,
            ip.id,
            ip.frags,
            [ip.ttl, ip.proto],
            [src[0], src[1]],
            [src[2], src[3]],
            [dst[0], dst[1]],
            [dst[2], dst[3]],
        ];
        ip.check = checksum(words.as_flattened(), 0).to_ne_bytes();
        ip
    }

    /// ICMP error `kind` (type, code) with its 4 bytes of `rest`, quoting
    /// `quote_len` bytes whose one's-complement sum is `quote_sum`.
    #[inline(always)]
    pub fn icmp_error(
        &self,
        kind: [u8; 2],
        rest: [u8; 4],
        quote_len: usize,
        quote_sum: u32,
    ) -> IcmpAnswer {
        let mut icmp = Icmpv4Hdr {
            type_: kind[0],
            code: kind[1],
            check: [0, 0],
            data: rest,
        };
        let words = [kind, [rest[0], rest[1]], [rest[2], rest[3]]];
        icmp.check = checksum(words.as_flattened(), quote_sum).to_ne_bytes();
        IcmpAnswer {
            eth: self.eth(),
            ip: self.ipv4(IPPROTO_ICMP, Icmpv4Hdr::LEN + quote_len),
            icmp,
        }
    }

    /// RST|ACK from `port` to the sender's `sender_port`, acknowledging up
    /// to `ack`; sequence number 0, no window.
    #[inline(always)]
    pub fn tcp_reset(&self, port: [u8; 2], sender_port: [u8; 2], ack: u32) -> TcpAnswer {
        /// Data offset 5 words (no options), then the flags byte.
        const OFFSET_AND_FLAGS: [u8; 2] = [5 << 4, TCP_RST | TCP_ACK];
        let ack = ack.to_be_bytes();
        let words = [
            port,
            sender_port,
            [ack[0], ack[1]],
            [ack[2], ack[3]],
            OFFSET_AND_FLAGS,
        ];
        let seed = pseudo_header(
            u32::from_ne_bytes(self.node_addr),
            u32::from_ne_bytes(self.addr),
            IPPROTO_TCP,
            TcpHdr::LEN as u16,
        );
        let tcp = TcpHdr {
            source: port,
            dest: sender_port,
            seq: [0; 4],
            ack_seq: ack,
            _bitfield_align_1: [],
            _bitfield_1: BitfieldU16::new(OFFSET_AND_FLAGS),
            window: [0, 0],
            check: checksum(words.as_flattened(), seed).to_ne_bytes(),
            urg_ptr: [0, 0],
        };
        TcpAnswer {
            eth: self.eth(),
            ip: self.ipv4(IPPROTO_TCP, TcpHdr::LEN),
            tcp,
        }
    }
}

/// Writes `headers` at the start of the frame.
#[inline(always)]
pub fn write<T>(ctx: &XdpContext, headers: T) -> Result<(), Reason> {
    let out: *mut T = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the whole `T` is inside the frame; written
    // unaligned, as the frame gives no alignment.
    unsafe { out.write_unaligned(headers) };
    Ok(())
}

/// Makes room for `bytes` more in front of the frame; `Err(failed)` if the
/// helper refuses. Pointers into the frame must be re-derived afterwards.
#[inline(always)]
pub fn grow_head(ctx: &XdpContext, bytes: usize, failed: Reason) -> Result<(), Reason> {
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(bytes as i32)) } != 0 {
        return Err(failed);
    }
    Ok(())
}

/// Shrinks the frame to `len` bytes if it is longer; `Err(failed)` if the
/// helper refuses. Pointers into the frame must be re-derived afterwards.
#[inline(always)]
pub fn truncate(ctx: &XdpContext, len: usize, failed: Reason) -> Result<(), Reason> {
    let delta = len as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: plain helper call on our own context; a negative delta only
    // shortens the frame.
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(failed);
    }
    Ok(())
}
