//! What the pipeline needs to know of an address family: its maps, how to
//! read and rewrite its IP header, its fragments, its packet-too-big
//! answer. Parsing, lookup,
//! selection, conntrack, NAT and next hops are written once, generic over
//! [`Ip`], and compiled once per family.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    maps::{Array, HashMap, LpmTrie, LruHashMap},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use lb_common::{
    AffinityKeyOf, AffinityOf, BackendHopOf, BackendOf, FlowKeyOf, FlowOf, NodeAddr, Peer, Reason,
    Service, ServiceKeyOf, SourceRangeOf, V4, V6,
    family::{Family, octets6},
};
use lb_ebpf::csum::CsumDelta;

use crate::{
    fib::NextHop,
    maps::*,
    mtu,
    nat::{self, L4Check},
    parse::{IpHeader, Ipv4, Ipv6, Packet},
    reject,
};

/// What the caller returns instead of forwarding.
pub type Verdict = Result<(u32, Reason), Reason>;

pub trait Ip: Family {
    /// The parsed IP header.
    type Header: IpHeader;
    /// Whether the long paths (forwarding, recording a new flow) run as BPF
    /// functions of their own: IPv6's keys and entries are too big for one
    /// 512-byte frame holding them all. IPv4's stay inline, as they were.
    const OUTLINE: bool;

    fn flows() -> &'static LruHashMap<FlowKeyOf<Self>, FlowOf<Self>>;
    fn flows_new() -> &'static LruHashMap<FlowKeyOf<Self>, FlowOf<Self>>;
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, Service>;
    fn node_addrs() -> &'static HashMap<Self::Addr, NodeAddr>;
    fn backends() -> &'static Array<BackendOf<Self>>;
    fn backend_hops() -> &'static Array<BackendHopOf<Self>>;
    fn iface_addrs() -> &'static HashMap<u32, Self::Addr>;
    fn source_ranges() -> &'static LpmTrie<SourceRangeOf<Self>, u32>;
    fn peers() -> &'static HashMap<Self::Addr, Peer>;
    fn affinity() -> &'static LruHashMap<AffinityKeyOf<Self>, AffinityOf<Self>>;

    /// (source, destination) address of the packet.
    fn addrs(ip: &Self::Header) -> (Self::Addr, Self::Addr);
    /// Zeroes `addr` in place with plain stores: built as a zero value,
    /// an IPv6 address was a call to the linker's byte-loop `memset`
    /// (bpf-linker's in-order memcpy expansion leaves every memset to it);
    /// volatile, or LLVM merges the four stores back into one memset.
    fn clear_addr(addr: &mut Self::Addr);
    /// TTL or hop limit.
    fn hop_limit(ip: &Self::Header) -> u8;
    /// The IP packet's length (header included), as the FIB's MTU check
    /// wants it.
    fn ip_len(ip: &Self::Header) -> u16;
    /// Rewrites the addresses and decrements the TTL (hop limit), with
    /// the IPv4 header checksum; returns the address change as a delta for
    /// the L4 pseudo-header. The caller checked the TTL is above 1.
    fn rewrite_ip(ip: &Self::Header, src: Self::Addr, dst: Self::Addr) -> CsumDelta;
    /// `rewrite_ip` for an skb at tc (`nat::rewrite_skb`): through the
    /// kernel's checksum helpers, the pseudo-header's in `check`.
    fn rewrite_ip_skb(
        ctx: &TcContext,
        ip: &Self::Header,
        check: L4Check,
        src: &Self::Addr,
        dst: &Self::Addr,
    ) -> Result<(), Reason>;
    /// Sets the family and addresses of a FIB lookup.
    fn fib_addrs(params: &mut bpf_fib_lookup, src: &Self::Addr, dst: &Self::Addr);

    /// `Err` with what to do when the packet does not fit `hop`'s device.
    fn check_mtu(ctx: &XdpContext, packet: &Packet<Self>, hop: &NextHop) -> Result<(), Verdict>;
    /// A service with no backend: the answer to its packet.
    fn reject(ctx: &XdpContext, packet: &Packet<Self>) -> Verdict;
    /// Records a first fragment's ports for the datagram's later ones.
    fn remember_fragment(packet: &Packet<Self>, key: &FlowKeyOf<Self>, now: u64);
    /// `--datapath-debug`'s line about a new flow.
    fn log_new_flow(ctx: &XdpContext, key: &FlowKeyOf<Self>, id: u32, backend: &BackendOf<Self>);
}

impl Ip for V4 {
    type Header = Ipv4;
    const OUTLINE: bool = false;

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKeyOf<Self>, FlowOf<Self>> {
        &XLB_FLOWS
    }
    #[inline(always)]
    fn flows_new() -> &'static LruHashMap<FlowKeyOf<Self>, FlowOf<Self>> {
        &XLB_FLOWS_NEW
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, Service> {
        &XLB_SERVICES
    }
    #[inline(always)]
    fn node_addrs() -> &'static HashMap<u32, NodeAddr> {
        &XLB_NODE_ADDRS
    }
    #[inline(always)]
    fn backends() -> &'static Array<BackendOf<Self>> {
        &XLB_BACKENDS
    }
    #[inline(always)]
    fn backend_hops() -> &'static Array<BackendHopOf<Self>> {
        &XLB_BACKEND_HOPS
    }
    #[inline(always)]
    fn iface_addrs() -> &'static HashMap<u32, u32> {
        &XLB_IFACE_ADDRS
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRangeOf<Self>, u32> {
        &XLB_SOURCE_RANGES
    }
    #[inline(always)]
    fn peers() -> &'static HashMap<u32, Peer> {
        &XLB_PEERS
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKeyOf<Self>, AffinityOf<Self>> {
        &XLB_AFFINITY
    }

    #[inline(always)]
    fn clear_addr(addr: &mut u32) {
        *addr = 0;
    }
    #[inline(always)]
    fn addrs(ip: &Ipv4) -> (u32, u32) {
        // SAFETY: the parser checked the IPv4 header is inside the packet.
        let (src, dst) = unsafe { ((*ip.hdr).src_addr, (*ip.hdr).dst_addr) };
        (u32::from_ne_bytes(src), u32::from_ne_bytes(dst))
    }
    #[inline(always)]
    fn hop_limit(ip: &Ipv4) -> u8 {
        // SAFETY: the parser checked the IPv4 header is inside the packet.
        unsafe { (*ip.hdr).ttl }
    }
    #[inline(always)]
    fn ip_len(ip: &Ipv4) -> u16 {
        // SAFETY: the parser checked the IPv4 header is inside the packet.
        u16::from_be_bytes(unsafe { (*ip.hdr).tot_len })
    }
    #[inline(always)]
    fn rewrite_ip(ip: &Ipv4, src: u32, dst: u32) -> CsumDelta {
        nat::rewrite_ip(ip.hdr, src, dst)
    }
    #[inline(always)]
    fn rewrite_ip_skb(
        ctx: &TcContext,
        ip: &Ipv4,
        check: L4Check,
        src: &u32,
        dst: &u32,
    ) -> Result<(), Reason> {
        nat::rewrite_ipv4_skb(ctx, ip, check, *src, *dst)
    }
    #[inline(always)]
    fn fib_addrs(params: &mut bpf_fib_lookup, src: &u32, dst: &u32) {
        params.family = Self::AF;
        params.__bindgen_anon_3.ipv4_src = *src;
        params.__bindgen_anon_4.ipv4_dst = *dst;
    }

    #[inline(always)]
    fn check_mtu(ctx: &XdpContext, packet: &Packet<Self>, hop: &NextHop) -> Result<(), Verdict> {
        mtu::check(ctx, packet, hop)
    }
    #[inline(always)]
    fn reject(ctx: &XdpContext, packet: &Packet<Self>) -> Verdict {
        reject::reject(ctx, packet)
    }
    #[inline(always)]
    fn remember_fragment(packet: &Packet<Self>, key: &FlowKeyOf<Self>, now: u64) {
        crate::frag::remember(packet, key, now);
    }
    #[inline(always)]
    fn log_new_flow(ctx: &XdpContext, key: &FlowKeyOf<Self>, id: u32, backend: &BackendOf<Self>) {
        debug!(
            ctx,
            "new flow proto {} {:i}:{} -> {:i}:{} to backend {} {:i}:{}",
            key.proto,
            u32::from_be(key.src_addr_be),
            u16::from_be(key.src_port_be),
            u32::from_be(key.dst_addr_be),
            u16::from_be(key.dst_port_be),
            id,
            u32::from_be(backend.addr_be),
            u16::from_be(backend.port_be)
        );
    }
}

impl Ip for V6 {
    type Header = Ipv6;
    const OUTLINE: bool = true;

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKeyOf<Self>, FlowOf<Self>> {
        &XLB_FLOWS6
    }
    #[inline(always)]
    fn flows_new() -> &'static LruHashMap<FlowKeyOf<Self>, FlowOf<Self>> {
        &XLB_FLOWS_NEW6
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, Service> {
        &XLB_SERVICES6
    }
    #[inline(always)]
    fn node_addrs() -> &'static HashMap<Self::Addr, NodeAddr> {
        &XLB_NODE_ADDRS6
    }
    #[inline(always)]
    fn backends() -> &'static Array<BackendOf<Self>> {
        &XLB_BACKENDS6
    }
    #[inline(always)]
    fn backend_hops() -> &'static Array<BackendHopOf<Self>> {
        &XLB_HOPS6
    }
    #[inline(always)]
    fn iface_addrs() -> &'static HashMap<u32, Self::Addr> {
        &XLB_IFADDRS6
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRangeOf<Self>, u32> {
        &XLB_RANGES6
    }
    #[inline(always)]
    fn peers() -> &'static HashMap<Self::Addr, Peer> {
        &XLB_PEERS6
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKeyOf<Self>, AffinityOf<Self>> {
        &XLB_AFFINITY6
    }

    #[inline(always)]
    fn clear_addr(addr: &mut Self::Addr) {
        for word in addr.iter_mut() {
            // SAFETY: a valid, aligned reference.
            unsafe { core::ptr::write_volatile(word, 0) };
        }
    }
    #[inline(always)]
    fn addrs(ip: &Ipv6) -> (Self::Addr, Self::Addr) {
        // SAFETY: the parser checked the IPv6 header is inside the packet.
        unsafe { crate::parse::addrs6(ip.hdr) }
    }
    #[inline(always)]
    fn hop_limit(ip: &Ipv6) -> u8 {
        // SAFETY: as above.
        unsafe { (*ip.hdr).hop_limit }
    }
    #[inline(always)]
    fn ip_len(ip: &Ipv6) -> u16 {
        // SAFETY: as above.
        let payload = u16::from_be_bytes(unsafe { (*ip.hdr).payload_len });
        payload.saturating_add(network_types::ip::Ipv6Hdr::LEN as u16)
    }
    #[inline(always)]
    fn rewrite_ip(ip: &Ipv6, src: Self::Addr, dst: Self::Addr) -> CsumDelta {
        nat::rewrite_ipv6(ip.hdr, &src, &dst)
    }
    #[inline(always)]
    fn rewrite_ip_skb(
        ctx: &TcContext,
        ip: &Ipv6,
        check: L4Check,
        src: &Self::Addr,
        dst: &Self::Addr,
    ) -> Result<(), Reason> {
        nat::rewrite_ipv6_skb(ctx, ip, check, src, dst)
    }
    #[inline(always)]
    fn fib_addrs(params: &mut bpf_fib_lookup, src: &Self::Addr, dst: &Self::Addr) {
        params.family = Self::AF;
        params.__bindgen_anon_3.ipv6_src = *src;
        params.__bindgen_anon_4.ipv6_dst = *dst;
    }

    #[inline(always)]
    fn check_mtu(ctx: &XdpContext, packet: &Packet<Self>, hop: &NextHop) -> Result<(), Verdict> {
        mtu::check6(ctx, Self::ip_len(&packet.ip), hop)
    }
    #[inline(always)]
    fn reject(ctx: &XdpContext, packet: &Packet<Self>) -> Verdict {
        reject::reject6(ctx, packet)
    }
    #[inline(always)]
    fn remember_fragment(_packet: &Packet<Self>, key: &FlowKeyOf<Self>, now: u64) {
        crate::frag::remember6(key, now);
    }
    #[inline(always)]
    fn log_new_flow(ctx: &XdpContext, key: &FlowKeyOf<Self>, id: u32, backend: &BackendOf<Self>) {
        debug!(
            ctx,
            "new flow proto {} [{:i}]:{} -> [{:i}]:{} to backend {} [{:i}]:{}",
            key.proto,
            octets6(key.src_addr_be),
            u16::from_be(key.src_port_be),
            octets6(key.dst_addr_be),
            u16::from_be(key.dst_port_be),
            id,
            octets6(backend.addr_be),
            u16::from_be(backend.port_be)
        );
    }
}
