//! IPv6: the fixed header, then a bounded walk of the extension headers a
//! TCP or UDP packet may carry before its L4 header (hop-by-hop options,
//! routing, destination options, fragment), as far as `EXT_HEADERS_MAX` of
//! them. A first fragment's L4 header must follow its fragment header (it
//! is balanced and its ports remembered; another extension header there is
//! `pass_ipv6_ext_headers`); a later fragment's walk ends at its fragment
//! header (`PassFragment`: it has no L4 header, `xlb6_frag` follows it);
//! an atomic fragment (offset 0, no more) is a whole datagram. The fragment
//! header's identification and next header are left in `XLB_SCRATCH6`
//! (`SCRATCH_FRAGMENT`) rather than carried through the walk and `xlb6`'s
//! frame, which has no byte to spare. A routing header with segments left
//! (the destination address is not the packet's final one), and a chain
//! out of RFC 8200's order (hop-by-hop options other than first, a second
//! routing header, destination options twice on one side of the routing
//! header, a second fragment header or one after the routing header's
//! destination options): the kernel, which takes any order, gets those.

use super::{Frame, IpHeader, ptr_at};
use lb_common::{Addr6, IPPROTO_TCP, IPPROTO_UDP, Reason};
use network_types::ip::Ipv6Hdr;

use super::wide;
use crate::maps::{SCRATCH_FRAGMENT, scratch};

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (`pass_ipv6_ext_headers`):
/// RFC 8200's recommended order has at most hop-by-hop, destination
/// options, routing, fragment and destination options again.
pub const EXT_HEADERS_MAX: usize = 6;
/// Bytes of an extension header read to walk past it: next header, length
/// in 8-byte units beyond the first 8, and for a routing header its type
/// and segments left.
const EXT_PEEK: usize = 4;
/// A fragment header's whole length.
const FRAGMENT_LEN: usize = 8;
/// The furthest an L4 header can be: the fixed header and
/// `EXT_HEADERS_MAX` extension headers of at most 2048 bytes.
const L4_OFFSET_MAX: usize = 0x4000;

pub struct Ipv6 {
    pub hdr: *mut Ipv6Hdr,
    /// Offset of the L4 header from the start of the frame.
    pub l4_offset: usize,
    /// Bytes of L4 header and payload the payload length declares, after
    /// the extension headers.
    pub l4_len: usize,
    pub proto: u8,
    /// 1 for the first fragment of a fragmented datagram (its
    /// identification: [`fragment`]). Not a `bool`: its niche would hold
    /// `Result<Packet, _>`'s tag, a union member at an offset the kernel's
    /// BTF check refuses.
    pub first_fragment: u8,
}

/// `seen_bit`'s bit of a fragment header.
const FRAGMENT: u8 = 1 << 4;
/// Set in `seen` beside `FRAGMENT` for a first fragment (more follow).
const FIRST_FRAGMENT: u8 = 1 << 5;
/// Destination options after the routing header (`seen_bit`).
const DEST_LAST: u8 = 1 << 3;

/// The source and destination address of the IPv6 header at `hdr`, copied
/// as they are (an `Addr6` holds the bytes in wire order), unaligned:
/// converting byte by byte spills every byte to the stack.
///
/// # Safety
/// `hdr` points to a whole IPv6 header inside the packet.
#[inline(always)]
pub unsafe fn addrs6(hdr: *const Ipv6Hdr) -> (Addr6, Addr6) {
    // SAFETY: the caller's header holds both 16-byte addresses.
    unsafe {
        (
            wide::load128(core::ptr::addr_of!((*hdr).src_addr).cast()),
            wide::load128(core::ptr::addr_of!((*hdr).dst_addr).cast()),
        )
    }
}

/// The fragment header the last walk on this CPU met: (identification in
/// memory order, next header). Only meaningful after a walk that found one
/// (a first fragment, or `PassFragment`).
#[inline(always)]
pub fn fragment() -> Option<(u32, u8)> {
    let slot = scratch::<u64>(SCRATCH_FRAGMENT)?;
    // SAFETY: this CPU's scratch word; nothing else runs on it meanwhile.
    let note = unsafe { core::ptr::read_volatile(slot) };
    Some((note as u32, (note >> 32) as u8))
}

/// Leaves a fragment header's identification and next header for
/// [`fragment`].
#[inline(always)]
fn note_fragment(id_be: u32, next: u8) {
    if let Some(slot) = scratch::<u64>(SCRATCH_FRAGMENT) {
        // SAFETY: as in `fragment`.
        unsafe { core::ptr::write_volatile(slot, u64::from(next) << 32 | u64::from(id_be)) };
    }
}

impl IpHeader for Ipv6 {
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
        self.first_fragment != 0
    }
}

/// The bit of `seen` an extension header `next` takes: destination options
/// before and after the routing header are counted apart.
#[inline(always)]
fn seen_bit(next: u8, seen: u8) -> u8 {
    const ROUTING: u8 = 1 << 1;
    match next {
        NEXTHDR_ROUTING => ROUTING,
        NEXTHDR_DEST if seen & ROUTING != 0 => DEST_LAST,
        NEXTHDR_DEST => 1 << 2,
        NEXTHDR_FRAGMENT => FRAGMENT,
        _ => 1 << 0,
    }
}

/// A TCP or UDP packet's IPv6 header and extension headers. `forget`
/// hides the L4 offset from the verifier but for its bounds (see
/// `XLB_SCRATCH6`), so every way through the walk leaves the same state.
#[inline(always)]
pub fn parse_ipv6<C: Frame>(
    ctx: &C,
    offset: usize,
    forget: fn(u64) -> u64,
) -> Result<Ipv6, Reason> {
    let hdr: *mut Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: ptr_at checked that the fixed 40-byte header is inside the packet.
    let (version, payload_len, mut next) = unsafe {
        (
            (*hdr).vcf[0] >> 4,
            usize::from(u16::from_be_bytes((*hdr).payload_len)),
            (*hdr).next_hdr,
        )
    };
    let end = offset + Ipv6Hdr::LEN + payload_len;
    if version != 6 || end > ctx.packet_len() {
        return Err(Reason::PassMalformed);
    }
    let mut at = offset + Ipv6Hdr::LEN;
    let mut seen = 0u8;
    for index in 0..EXT_HEADERS_MAX {
        if next == NEXTHDR_FRAGMENT {
            let header: *const [u8; FRAGMENT_LEN] = ptr_at(ctx, at)?;
            // SAFETY: ptr_at checked the 8 bytes are inside the packet.
            let header = unsafe { *header };
            if seen & (FRAGMENT | DEST_LAST) != 0 {
                return Err(Reason::PassIpv6ExtHeaders);
            }
            let offset = u16::from_be_bytes([header[2], header[3]]) >> 3;
            let more = header[3] & 1 != 0;
            let id_be = u32::from_ne_bytes([header[4], header[5], header[6], header[7]]);
            next = header[0];
            if offset != 0 || more {
                note_fragment(id_be, next);
            }
            if offset != 0 {
                // Payload only, no L4 header: `xlb6_frag`'s, if TCP or UDP.
                return Err(match next {
                    IPPROTO_TCP | IPPROTO_UDP => Reason::PassFragment,
                    _ => Reason::PassNotTcpUdp,
                });
            }
            seen |= if more {
                FRAGMENT | FIRST_FRAGMENT
            } else {
                FRAGMENT
            };
            at += FRAGMENT_LEN;
            // The L4 header next, or the kernel's: the walk ends here as it
            // does at any L4 header, rather than going on with the
            // fragmentable part's own headers (rare), each way of which
            // the verifier would walk the pipeline from.
            break;
        }
        if next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST {
            break;
        }
        let ext: *const [u8; EXT_PEEK] = ptr_at(ctx, at)?;
        // SAFETY: ptr_at checked the 4 bytes are inside the packet.
        let ext = unsafe { *ext };
        let kind = seen_bit(next, seen);
        if (next == NEXTHDR_HOP && index != 0)
            || seen & kind != 0
            || (next == NEXTHDR_ROUTING && ext[3] != 0)
        {
            return Err(Reason::PassIpv6ExtHeaders);
        }
        seen |= kind;
        next = ext[0];
        at += (usize::from(ext[1]) + 1) * 8;
    }
    let at = forget(at as u64) as usize;
    if at > L4_OFFSET_MAX || at > end {
        return Err(Reason::PassMalformed);
    }
    match next {
        IPPROTO_TCP | IPPROTO_UDP => Ok(Ipv6 {
            hdr,
            l4_offset: at,
            l4_len: end - at,
            proto: next,
            first_fragment: u8::from(seen & FIRST_FRAGMENT != 0),
        }),
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT => {
            Err(Reason::PassIpv6ExtHeaders)
        }
        _ => Err(Reason::PassNotTcpUdp),
    }
}
