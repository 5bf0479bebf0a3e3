//! The contract between the xlb datapath (`lb-ebpf`) and the agent (`xlb`):
//! map names and sizes, `#[repr(C)]` keys and values, and the verdict reasons
//! both sides count and print.
//!
//! Byte order: every field whose name ends in `_be` holds the value exactly as
//! it is on the wire (network byte order), so the datapath can compare and copy
//! it without swapping. Everything else is host order.
#![no_std]

pub mod family;
pub mod flow;
pub mod frag;
pub mod hash;
pub mod maps;
pub mod path;
pub mod reason;
pub mod service;
pub mod sock;

pub use family::{Addr6, Family, V4, V6};
pub use flow::{Flow, Flow6, FlowKey, FlowKey6, FlowKeyOf, FlowOf, Traffic};
pub use frag::{FragKey, FragKey6, FragPorts, IcmpLimit};
pub use path::{Handoff, Paths, Peer};
pub use reason::Reason;
pub use service::{
    Affinity, Affinity6, AffinityKey, AffinityKey6, AffinityKeyOf, AffinityOf, Backend, Backend6,
    BackendHop, BackendHop6, BackendHopOf, BackendOf, GlobalConfig, NodeAddr, Service, ServiceKey,
    ServiceKey6, ServiceKeyOf, SourceRange, SourceRange6, SourceRangeOf,
};
pub use sock::{
    SockRevNat, SockRevNat6, SockRevNatKey, SockRevNatKey6, SockRevNatKeyOf, SockRevNatOf,
};

/// IP protocol numbers xlb balances.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Compile-time size check for a shared type: the datapath and the agent must
/// agree on every byte, and hidden padding is a bug on one of the two sides.
#[macro_export]
macro_rules! assert_size {
    ($ty:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
    };
}
