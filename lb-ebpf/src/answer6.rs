//! The frames xlb writes itself to IPv6 clients (TCP RST, ICMPv6 port
//! unreachable): `answer`'s builders for IPv6, whose headers are values
//! built field by field with their checksums (over the IPv6 pseudo-header)
//! and written over the frame in one piece. Every answer goes back to the
//! frame's sender from the address it wrote to, hop limit 64.

use aya_ebpf::{helpers::bpf_csum_diff, programs::XdpContext};
use lb_common::{IPPROTO_ICMPV6, IPPROTO_TCP, Reason};
use lb_ebpf::csum::{add, checksum, pseudo_header6};
use network_types::{
    bitfield::BitfieldU16, eth::EthHdr, icmp::Icmpv6Hdr, ip::Ipv6Hdr, tcp::TcpHdr,
};

use crate::{
    answer,
    maps::forget,
    parse::{TCP_ACK, TCP_RST, ptr_at},
};

/// The most of the invoking packet an ICMPv6 error quotes: what keeps the
/// error within the minimum IPv6 MTU, 1280 bytes (RFC 4443 2.4 (c)).
pub const QUOTE6_MAX: usize = 1280 - Ipv6Hdr::LEN - Icmpv6Hdr::LEN;

/// An ICMPv6 error's headers, in front of the packet it quotes.
#[repr(C)]
pub struct IcmpAnswer6 {
    eth: EthHdr,
    ip: Ipv6Hdr,
    icmp: Icmpv6Hdr,
}
const ICMP6_HEADERS: usize = core::mem::size_of::<IcmpAnswer6>();
const _: () = assert!(ICMP6_HEADERS == EthHdr::LEN + Ipv6Hdr::LEN + Icmpv6Hdr::LEN);

/// A TCP reset to an IPv6 client, the whole frame: no extension headers,
/// no options, no payload.
#[repr(C)]
pub struct TcpAnswer6 {
    eth: EthHdr,
    ip: Ipv6Hdr,
    tcp: TcpHdr,
}
pub const TCP6_FRAME: usize = core::mem::size_of::<TcpAnswer6>();
const _: () = assert!(TCP6_FRAME == EthHdr::LEN + Ipv6Hdr::LEN + TcpHdr::LEN);

/// The Ethernet and IPv6 headers of the frame being answered.
#[repr(C)]
struct Received6 {
    eth: EthHdr,
    ip: Ipv6Hdr,
}

/// Who sent the IPv6 frame being answered (where the answer goes) and
/// where it was sent to (where the answer comes from).
#[derive(Clone, Copy)]
pub struct Sender6 {
    mac: [u8; 6],
    addr: [u8; 16],
    node_mac: [u8; 6],
    node_addr: [u8; 16],
    ether_type: u16,
}

impl Sender6 {
    /// Reads the frame's headers, before an answer overwrites them.
    #[inline(always)]
    pub fn of(ctx: &XdpContext) -> Result<Self, Reason> {
        let received: *const Received6 = ptr_at(ctx, 0)?;
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

    /// The IPv6 header in front of `l4_len` bytes of `proto`.
    #[inline(always)]
    fn ipv6(&self, proto: u8, l4_len: usize) -> Ipv6Hdr {
        Ipv6Hdr {
            vcf: [0x60, 0, 0, 0],
            payload_len: (l4_len as u16).to_be_bytes(),
            next_hdr: proto,
            hop_limit: 64,
            src_addr: self.node_addr,
            dst_addr: self.addr,
        }
    }

    /// ICMPv6 error `kind` (type, code) with its 4 bytes of `rest`, quoting
    /// `quote_len` bytes whose one's-complement sum is `quote_sum`.
    #[inline(always)]
    fn icmp_error(
        &self,
        kind: [u8; 2],
        rest: [u8; 4],
        quote_len: usize,
        quote_sum: u32,
    ) -> IcmpAnswer6 {
        let len = Icmpv6Hdr::LEN + quote_len;
        let pseudo = pseudo_header6(&self.node_addr, &self.addr, IPPROTO_ICMPV6, len as u16);
        let words = [kind, [rest[0], rest[1]], [rest[2], rest[3]]];
        let check = checksum(words.as_flattened(), add(pseudo, quote_sum));
        IcmpAnswer6 {
            eth: self.eth(),
            ip: self.ipv6(IPPROTO_ICMPV6, len),
            icmp: Icmpv6Hdr {
                type_: kind[0],
                code: kind[1],
                check: check.to_ne_bytes(),
                data: rest,
            },
        }
    }

    /// RST|ACK from `port` to the sender's `sender_port`, acknowledging up
    /// to `ack`; sequence number 0, no window.
    #[inline(always)]
    pub fn tcp_reset(&self, port: [u8; 2], sender_port: [u8; 2], ack: u32) -> TcpAnswer6 {
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
        let len = TcpHdr::LEN as u16;
        let seed = pseudo_header6(&self.node_addr, &self.addr, IPPROTO_TCP, len);
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
        TcpAnswer6 {
            eth: self.eth(),
            ip: self.ipv6(IPPROTO_TCP, TcpHdr::LEN),
            tcp,
        }
    }
}

/// Turns the IPv6 frame into ICMPv6 error `kind` (type, code) with its 4
/// bytes of `rest`, back to its sender from the address it wrote to,
/// quoting its first `quote_len` bytes from the IPv6 header on (at most
/// [`QUOTE6_MAX`]: the error stays within 1280 bytes). The quote stays
/// where it is; the new headers take the old Ethernet header's place and
/// the bytes grown in front of it. `failed` if a helper refuses.
#[inline(always)]
pub fn icmp_error(
    ctx: &XdpContext,
    kind: [u8; 2],
    rest: [u8; 4],
    quote_len: usize,
    failed: Reason,
) -> Result<(), Reason> {
    let quote_len = quote_len.min(QUOTE6_MAX);
    let sender = Sender6::of(ctx)?;
    let quote_sum = sum_frame(ctx, EthHdr::LEN, quote_len)?;
    answer::grow_head(ctx, ICMP6_HEADERS - EthHdr::LEN, failed)?;
    answer::truncate(ctx, ICMP6_HEADERS + quote_len, failed)?;
    answer::write(ctx, sender.icmp_error(kind, rest, quote_len, quote_sum))
}

/// One's-complement sum of the `len` bytes (at most [`QUOTE6_MAX`]) at
/// `offset` in the frame: what an ICMPv6 error's checksum adds for its
/// quote. Summed by `bpf_csum_diff` in blocks of constant size (the
/// binary digits of `len`), each checked to be inside the frame.
#[inline(always)]
fn sum_frame(ctx: &XdpContext, offset: usize, len: usize) -> Result<u32, Reason> {
    let mut at = Block {
        offset,
        left: len.min(QUOTE6_MAX),
        sum: 0,
    };
    at.add::<512>(ctx)?;
    at.add::<512>(ctx)?;
    at.add::<256>(ctx)?;
    at.add::<128>(ctx)?;
    at.add::<64>(ctx)?;
    at.add::<32>(ctx)?;
    at.add::<16>(ctx)?;
    at.add::<8>(ctx)?;
    at.add::<4>(ctx)?;
    if at.left >= 2 {
        let word: *const [u8; 2] = ptr_at(ctx, at.offset)?;
        // SAFETY: ptr_at checked the bytes are inside the frame.
        at.sum = add(at.sum, u32::from(u16::from_ne_bytes(unsafe { *word })));
        at.offset += 2;
        at.left -= 2;
    }
    at.settle()?;
    if at.left == 1 {
        // Read with the byte before it: a one-byte check compiles to a
        // comparison the verifier learns no range from.
        let last: *const [u8; 2] = ptr_at(ctx, at.offset.saturating_sub(1))?;
        // SAFETY: as above; an odd last byte is summed padded with zero.
        let byte = unsafe { (*last)[1] };
        at.sum = add(at.sum, u32::from(u16::from_ne_bytes([byte, 0])));
    }
    Ok(at.sum)
}

/// `sum_frame`'s progress.
struct Block {
    offset: usize,
    left: usize,
    sum: u32,
}

impl Block {
    /// Adds the next `N` bytes (a multiple of 4, at most 512: what the
    /// helper takes) if that many are left. Then the verifier knows the
    /// progress only by its bounds (`forget`): both ways through here end
    /// in the same state, so it walks on once, not once per way (twice per
    /// block, 512 times in all).
    #[inline(always)]
    fn add<const N: usize>(&mut self, ctx: &XdpContext) -> Result<(), Reason> {
        if self.left >= N {
            let block: *mut [u8; N] = ptr_at(ctx, self.offset)?;
            // SAFETY: ptr_at checked the `N` bytes are inside the frame;
            // the helper only reads them (nothing to subtract: no `from`).
            let sum = unsafe {
                bpf_csum_diff(core::ptr::null_mut(), 0, block.cast(), N as u32, self.sum)
            };
            if sum < 0 {
                return Err(Reason::DropNoBackend);
            }
            self.sum = sum as u32;
            self.offset += N;
            self.left -= N;
        }
        self.settle()
    }

    /// Makes the verifier know the progress only by its bounds.
    #[inline(always)]
    fn settle(&mut self) -> Result<(), Reason> {
        let (offset, left) = (forget(self.offset as u64), forget(self.left as u64));
        if offset > FRAME_MAX || left > QUOTE6_MAX as u64 {
            return Err(Reason::DropNoBackend);
        }
        (self.offset, self.left) = (offset as usize, left as usize);
        self.sum = forget(u64::from(self.sum)) as u32;
        Ok(())
    }
}

/// Bound of a quoted byte's offset in the frame, for the verifier.
const FRAME_MAX: u64 = 4_096;
