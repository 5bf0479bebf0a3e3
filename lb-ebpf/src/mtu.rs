//! xlb's own MTU check, as a router's: a packet of a flow that does not fit
//! the egress device of its next hop is answered with ICMP "fragmentation
//! needed" carrying that MTU when it has DF set (ICMPv6 "packet too big"
//! for any IPv6 packet; rate-limited per client address), and dropped and
//! counted when it has not: XDP cannot fragment,
//! and the kernel refuses to forward a packet whose source is one of its
//! own addresses (masquerade, reverse NAT), so handing it over would only
//! get it delivered locally to a NodePort nobody listens on.

use aya_ebpf::{
    bindings::{BPF_ANY, bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED, xdp_action},
    helpers::{bpf_check_mtu, bpf_ktime_get_coarse_ns},
    maps::LruHashMap,
    programs::XdpContext,
};
use lb_common::{
    IcmpLimit, Reason,
    family::addr6,
    frag::{ICMP_LIMIT_BURST, ICMP_LIMIT_INTERVAL_NS},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    answer::{self, ICMP_HEADERS, Sender},
    answer6::{self, QUOTE6_MAX},
    fib::NextHop,
    maps::{SCRATCH_MTU, XLB_ICMP_LIMIT, XLB_ICMP_LIMIT6, scratch},
    parse::{ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED, IP_DF, Packet, ptr_at},
};

/// ICMP destination unreachable, fragmentation needed.
const FRAG_NEEDED: [u8; 2] = [ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED];
/// What the answer quotes: the packet's IPv4 header (options included) and
/// the first 8 bytes after it, all RFC 792 asks for.
const QUOTE_MAX: usize = 60 + 8;
/// Packets up to this IPv4 length skip the check (it costs a device
/// lookup, ~30 ns): every IPv4 host takes 576-byte datagrams (RFC 791) and
/// Linux never lowers a path MTU below 552, so no real link is narrower.
const ALWAYS_FITS: u16 = 576;
/// Bytes added in front: the new IPv4 and ICMP headers (the old Ethernet
/// header's place takes the new one).
const GROW: usize = ICMP_HEADERS - EthHdr::LEN;

/// `Err` with what to do when `packet` does not fit `hop`'s device. Small
/// packets are let through inline; the check itself runs in a function of
/// its own (a BPF-to-BPF call has its own stack frame, so its locals do not
/// add to the main path's 512 bytes).
#[inline(always)]
pub fn check(ctx: &XdpContext, packet: &Packet, hop: &NextHop) -> Result<(), Verdict> {
    // SAFETY: the parser checked the IPv4 header is inside the packet.
    let tot_len = u16::from_be_bytes(unsafe { (*packet.ip.hdr).tot_len });
    if tot_len <= ALWAYS_FITS {
        return Ok(());
    }
    unpack(check_outlined(ctx, hop.ifindex))
}

/// `check_outlined`'s answer for a packet that fits.
const FITS: u64 = 0;
/// Set in a packed answer for `Ok((action, reason))`, else `Err(reason)`.
const PACKED_OK: u64 = 1 << 63;
const PACKED_ERR: u64 = 1 << 62;

/// BPF functions return one register: `FITS`, or the verdict packed.
#[inline(never)]
fn check_outlined(ctx: &XdpContext, ifindex: u32) -> u64 {
    match check_frame(ctx, ifindex) {
        Ok(()) => FITS,
        Err(Ok((action, reason))) => PACKED_OK | u64::from(action) << 32 | reason as u64,
        Err(Err(reason)) => PACKED_ERR | reason as u64,
    }
}

#[inline(always)]
fn unpack(packed: u64) -> Result<(), Verdict> {
    if packed == FITS {
        return Ok(());
    }
    let reason = Reason::from_index(packed as u32).unwrap_or(Reason::PassMalformed);
    if packed & PACKED_OK != 0 {
        return Err(Ok(((packed >> 32) as u32 & 0x3fff_ffff, reason)));
    }
    Err(Err(reason))
}

/// The check on the frame as it is (an IPv4 packet the parser accepted),
/// reading the IPv4 header again itself: only the context crosses the call.
#[inline(always)]
fn check_frame(ctx: &XdpContext, ifindex: u32) -> Result<(), Verdict> {
    let mut mtu: u32 = 0;
    // SAFETY: plain helper call; it reads the frame length and writes `mtu`.
    let ret = unsafe { bpf_check_mtu(ctx.ctx.cast(), ifindex, &mut mtu, 0, 0) };
    if ret != i64::from(BPF_MTU_CHK_RET_FRAG_NEEDED) {
        return Ok(());
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).map_err(Err)?;
    // SAFETY: ptr_at checked the header is inside the packet.
    let (vihl, frags, client) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            u32::from_ne_bytes((*ip).src_addr),
        )
    };
    if frags & IP_DF == 0 {
        return Err(Err(Reason::DropTooBig));
    }
    // SAFETY: no preconditions (only packets that do not fit get here).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if !answer_allowed(&XLB_ICMP_LIMIT, &client, now) {
        return Err(Err(Reason::DropIcmpRateLimited));
    }
    let l4_offset = EthHdr::LEN + usize::from(vihl & 0x0f) * 4;
    Err(frag_needed(ctx, l4_offset, mtu as u16))
}

/// What the caller returns instead of forwarding.
pub type Verdict = Result<(u32, Reason), Reason>;

/// Every IPv6 link carries 1280-byte packets (RFC 8200).
const IPV6_ALWAYS_FITS: u16 = 1280;

/// `check` for an IPv6 packet of `ip_len` bytes: one that does not fit
/// (IPv6 routers never fragment) is owed ICMPv6 packet too big, which the
/// flat pipeline sends in a stage of its own (`too_big6`): `Err` with
/// `Err(RejectFragNeeded)` says so, the MTU left in the scratch space.
#[inline(always)]
pub fn check6(ctx: &XdpContext, ip_len: u16, hop: &NextHop) -> Result<(), Verdict> {
    if ip_len <= IPV6_ALWAYS_FITS {
        return Ok(());
    }
    let mut mtu: u32 = 0;
    // SAFETY: plain helper call; it reads the frame length and writes `mtu`.
    let ret = unsafe { bpf_check_mtu(ctx.ctx.cast(), hop.ifindex, &mut mtu, 0, 0) };
    if ret != i64::from(BPF_MTU_CHK_RET_FRAG_NEEDED) {
        return Ok(());
    }
    let Some(slot) = scratch::<u64>(SCRATCH_MTU) else {
        return Err(Err(Reason::DropTooBig));
    };
    // SAFETY: this CPU's scratch word, read back by `too_big6` in this run.
    unsafe { *slot = u64::from(mtu) };
    Err(Err(Reason::RejectFragNeeded))
}

/// ICMPv6 packet too big (type 2, code 0; RFC 4443 3.2).
const PACKET_TOO_BIG: [u8; 2] = [2, 0];

/// Turns the IPv6 frame `check6` found too big into ICMPv6 packet too big
/// with the MTU it left, from the address the sender wrote to, quoting the
/// packet as far as the error stays within 1280 bytes (the packet is
/// longer, so that is `QUOTE6_MAX` bytes), rate-limited per sender as
/// IPv4's answers are.
#[inline(always)]
pub fn too_big6(ctx: &XdpContext) -> Verdict {
    let mtu = match scratch::<u64>(SCRATCH_MTU) {
        // SAFETY: this CPU's scratch word, written by `check6` in this run.
        Some(slot) => (unsafe { *slot }) as u32,
        None => return Err(Reason::DropTooBig),
    };
    let ip: *const Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked the header is inside the frame; unaligned.
    let client: [u8; 16] = unsafe { core::ptr::addr_of!((*ip).src_addr).read_unaligned() };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if !answer_allowed(&XLB_ICMP_LIMIT6, &addr6(client), now) {
        return Err(Reason::DropIcmpRateLimited);
    }
    let rest = mtu.to_be_bytes();
    answer6::icmp_error(ctx, PACKET_TOO_BIG, rest, QUOTE6_MAX, Reason::DropTooBig)?;
    Ok((xdp_action::XDP_TX, Reason::RejectFragNeeded))
}

/// Token bucket per client address in `limits`: `ICMP_LIMIT_BURST`
/// answers per `ICMP_LIMIT_INTERVAL_NS`.
#[inline(always)]
fn answer_allowed<K>(limits: &LruHashMap<K, IcmpLimit>, client: &K, now: u64) -> bool {
    if let Some(limit) = limits.get_ptr_mut(client) {
        // SAFETY: valid LRU value pointer for this run; plain integers (a
        // racing CPU at worst lets one answer more through).
        let limit = unsafe { &mut *limit };
        if now.saturating_sub(limit.refilled_ns) < ICMP_LIMIT_INTERVAL_NS {
            if limit.tokens == 0 {
                return false;
            }
            limit.tokens -= 1;
            return true;
        }
    }
    let fresh = IcmpLimit {
        tokens: ICMP_LIMIT_BURST - 1,
        _pad: 0,
        refilled_ns: now,
    };
    let _ = limits.insert(client, &fresh, u64::from(BPF_ANY));
    true
}

/// Turns the frame into ICMP fragmentation needed (type 3, code 4) with
/// `mtu`, from the address the client wrote to, quoting the packet, and
/// sends it back out of the interface it came in on.
#[inline(always)]
fn frag_needed(ctx: &XdpContext, l4_offset: usize, mtu: u16) -> Verdict {
    let quote_len = l4_offset - EthHdr::LEN + 8;
    if quote_len > QUOTE_MAX {
        return Err(Reason::DropTooBig);
    }
    let sender = Sender::of(ctx)?;
    answer::grow_head(ctx, GROW, Reason::DropTooBig)?;
    // The quote now starts right after the new headers. Sum it while the
    // frame is still long (the packet was larger than an MTU, so at least
    // QUOTE_MAX bytes follow), then cut the frame after it.
    let quoted: *const [[u8; 2]; QUOTE_MAX / 2] = ptr_at(ctx, ICMP_HEADERS)?;
    let mut quote_sum = 0u32;
    for word in 0..QUOTE_MAX / 2 {
        if word * 2 < quote_len {
            // SAFETY: ptr_at checked all QUOTE_MAX bytes are in the frame.
            quote_sum += u32::from(u16::from_ne_bytes(unsafe { (*quoted)[word] }));
        }
    }
    answer::truncate(ctx, ICMP_HEADERS + quote_len, Reason::DropTooBig)?;
    let mtu_be = mtu.to_be_bytes();
    let rest = [0, 0, mtu_be[0], mtu_be[1]];
    answer::write(
        ctx,
        sender.icmp_error(FRAG_NEEDED, rest, quote_len, quote_sum),
    )?;
    Ok((xdp_action::XDP_TX, Reason::RejectFragNeeded))
}
