//! Fragment tracking (`XLB_FRAGS`, `XLB_FRAGS6`) and the per-source limit on the ICMP
//! "fragmentation needed" answers xlb sends itself (`XLB_ICMP_LIMIT`).
//!
//! Only a datagram's first fragment carries its ports. The datapath balances
//! it like a whole datagram and records its ports under (source, destination,
//! IP id, protocol); later fragments find them there and follow the same
//! flow, as Cilium's `ipv4_frag_datagrams` does. IPv6's identification is
//! the fragment header's, 32 bits wide: its datagrams have a key of their
//! own ([`FragKey6`]) rather than a generic one.

use crate::assert_size;

/// One IPv4 datagram in flight, as its fragments carry it on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    /// IPv4 identification.
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(FragKey, 12);

/// One IPv6 datagram in flight: addresses, the fragment header's
/// identification and next header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub src_addr_be: crate::Addr6,
    pub dst_addr_be: crate::Addr6,
    /// The fragment header's identification, in memory order.
    pub id_be: u32,
    /// The upper-layer protocol (the fragment header's next header).
    pub proto: u8,
    pub _pad: [u8; 3],
}
assert_size!(FragKey6, 40);

/// The ports a datagram's first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` when the first fragment passed.
    pub seen_ns: u64,
}
assert_size!(FragPorts, 16);

/// How long after its first fragment a datagram's later fragments are
/// followed: the kernel's own reassembly timeout (`ipfrag_time`, 30 s).
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// Per client address: when xlb last sent it "fragmentation needed".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpLimit {
    /// Answers still allowed in the current interval.
    pub tokens: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` when the bucket was last refilled.
    pub refilled_ns: u64,
}
assert_size!(IcmpLimit, 16);

/// At most this many "fragmentation needed" per client address per
/// `ICMP_LIMIT_INTERVAL_NS` (Linux's `icmp_ratelimit` is 1 s with a burst
/// of 50 across all destinations).
pub const ICMP_LIMIT_BURST: u32 = 10;
pub const ICMP_LIMIT_INTERVAL_NS: u64 = 1_000_000_000;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (asserted).
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragKey6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragPorts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IcmpLimit {}
}
