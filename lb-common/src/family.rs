//! Address families. Every map type keyed or valued by an address is one
//! shape generic over [`Family`] (`FlowKeyOf<F>`, `BackendOf<F>`, ...), with
//! two instances: [`V4`] (a `u32`, exactly the layout the IPv4 maps always
//! had; the plain names `FlowKey`, `Backend`, ... are its aliases) and
//! [`V6`] (the `...6` aliases). Each family has maps of its own
//! (`XLB_FLOWS6`, ...), as Cilium keeps them; backend ids, selection
//! tables and counters are one space for both.

use core::{fmt::Debug, hash::Hash};

/// An IPv6 address as four 32-bit words, each holding four bytes of the
/// address as they are on the wire (read in memory order, like every
/// `_be` field).
pub type Addr6 = [u32; 4];

/// IPv4 or IPv6: the address type the shared shapes are built of.
pub trait Family: Copy + Clone + Default + Debug + PartialEq + Eq + Hash + 'static {
    /// An address, in memory order (network byte order).
    type Addr: Copy + Clone + Default + Debug + PartialEq + Eq + Hash + 'static;
    /// 32-bit words in an address.
    const WORDS: usize;
    /// `AF_INET` or `AF_INET6`.
    const AF: u8;
    /// Explicit padding that brings a `u32` followed by an address to a
    /// multiple of 8 bytes (none for IPv4, 4 bytes for IPv6), so a shape
    /// with a `u64` after them has no hidden padding in either family.
    type Pad8: Copy + Clone + Default + Debug + PartialEq + Eq + Hash + 'static;
    /// Word `index` (below `WORDS`) of `addr`, in memory order.
    fn word(addr: &Self::Addr, index: usize) -> u32;
}

/// IPv4: addresses are one `u32` in network byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V4;

/// IPv6: addresses are [`Addr6`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    const WORDS: usize = 1;
    const AF: u8 = 2;
    type Pad8 = [u32; 0];
    #[inline(always)]
    fn word(addr: &u32, _index: usize) -> u32 {
        *addr
    }
}

impl Family for V6 {
    type Addr = Addr6;
    const WORDS: usize = 4;
    const AF: u8 = 10;
    type Pad8 = [u32; 1];
    #[inline(always)]
    fn word(addr: &Addr6, index: usize) -> u32 {
        addr[index]
    }
}

/// An IPv6 address as the maps hold it, from its 16 bytes.
#[inline(always)]
pub const fn addr6(octets: [u8; 16]) -> Addr6 {
    let o = octets;
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The 16 bytes of an address the maps hold.
#[inline(always)]
pub const fn octets6(addr: Addr6) -> [u8; 16] {
    let [a, b, c, d] = [
        addr[0].to_ne_bytes(),
        addr[1].to_ne_bytes(),
        addr[2].to_ne_bytes(),
        addr[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_keep_wire_order() {
        let octets = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let addr = addr6(octets);
        assert_eq!(addr[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(octets6(addr), octets);
        assert_eq!(V6::word(&addr, 3), u32::from_ne_bytes([0, 0, 0, 1]));
    }
}
