//! Packet parsing: the only module that turns packet offsets into pointers.
//! Each layer is checked against `data_end` before it is read, and malformed
//! input becomes a `Reason`, never a guess.

mod eth;
mod icmp;
mod icmp6;
mod ipv4;
mod ipv6;
mod l4;
pub mod sock_addr;
pub mod wide;

pub use eth::parse_eth;
pub use icmp::{ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED, IcmpError, parse_icmp_error};
pub use icmp6::{IcmpError6, parse_icmp6_error};
pub use ipv4::{IP_DF, Ipv4, parse_ipv4, parse_ipv4_header};
pub use ipv6::{Ipv6, addrs6, fragment as ipv6_fragment, parse_ipv6};
pub use l4::{
    L4, TCP_ACK, TCP_CHECK_OFFSET, TCP_FIN, TCP_RST, TCP_SYN, UDP_CHECK_OFFSET, parse_l4,
    tcp_numbers,
};

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{Reason, V4, V6};
use network_types::eth::{EthHdr, EtherType};

use crate::family::Ip;

/// What the parser needs of a hook's context: the directly accessible bytes
/// (`data .. data_end`) and the packet's whole length, which for an skb may
/// extend into pages the program cannot read directly.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Bytes in the packet from the start of `data`.
    fn packet_len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn packet_len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len() as usize
    }
}

/// Pointer to a `T` at `offset` bytes into the packet, if the whole `T` is
/// inside the packet.
#[inline(always)]
pub fn ptr_at<T, C: Frame>(ctx: &C, offset: usize) -> Result<*mut T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Reason::PassMalformed);
    }
    Ok((start + offset) as *mut T)
}

/// What the L4 parser and conntrack need of an IP header, either family.
pub trait IpHeader {
    /// Offset of the L4 header from the start of the frame.
    fn l4_offset(&self) -> usize;
    /// Bytes of L4 header and payload the IP header declares.
    fn l4_len(&self) -> usize;
    fn proto(&self) -> u8;
    /// The first fragment of a fragmented datagram (L4 header, more follows).
    fn first_fragment(&self) -> bool;
}

impl IpHeader for Ipv4 {
    #[inline(always)]
    fn l4_offset(&self) -> usize {
        self.l4_offset
    }
    #[inline(always)]
    fn l4_len(&self) -> usize {
        self.l4_len
    }
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
    #[inline(always)]
    fn first_fragment(&self) -> bool {
        Ipv4::first_fragment(self)
    }
}

/// The headers xlb rewrites, located and validated, of either family.
pub struct Packet<F: Ip = V4> {
    pub eth: *mut EthHdr,
    pub ip: F::Header,
    pub l4: L4,
}

/// Parses Ethernet, IPv4 and the TCP/UDP header of a frame (XDP or skb).
#[inline(always)]
pub fn parse<C: Frame>(ctx: &C) -> Result<Packet, Reason> {
    let eth = parse_eth(ctx)?;
    let ip = parse_ipv4(ctx, EthHdr::LEN)?;
    let l4 = parse_l4(ctx, &ip)?;
    Ok(Packet { eth, ip, l4 })
}

/// Parses Ethernet, IPv6 (extension headers walked) and the TCP/UDP header
/// of a frame; anything but an untagged IPv6 frame is `pass_not_ipv4`, a
/// later fragment of a TCP/UDP datagram `PassFragment`.
/// `forget`: see `parse_ipv6`.
#[inline(always)]
pub fn parse6<C: Frame>(ctx: &C, forget: fn(u64) -> u64) -> Result<Packet<V6>, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the whole header is inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv6 as u16 {
        return Err(Reason::PassNotIpv4);
    }
    let ip = parse_ipv6(ctx, EthHdr::LEN, forget)?;
    let l4 = parse_l4(ctx, &ip)?;
    Ok(Packet { eth, ip, l4 })
}
