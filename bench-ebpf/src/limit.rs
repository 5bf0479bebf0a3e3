//! The lab benchmark's ceiling (`cargo xtask bench`): the least an XDP load
//! balancer must do on this path. UDP to the benchmark port gets new MACs and
//! is redirected to one of the backend links, chosen by source port; no NAT,
//! no lookups, no state; in both families. Everything else is passed.
//!
//! Two yardsticks between the ceiling and xlb give each cost a name:
//! `xlb_limit_nat` adds the stateless NAT rewrite (addresses, port,
//! checksums), `xlb_limit_lru` adds one LRU insert per packet.
//!
//! The map layouts are the library's (lib.rs), shared with the bench.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::{bpf_ktime_get_coarse_ns, bpf_redirect},
        macros::{map, xdp},
        maps::{Array, LruHashMap},
        programs::XdpContext,
    };

    use xlb_bench_ebpf::{
        LIMIT_CFG_PORT, LIMIT_CFG_TARGETS, LIMIT_LRU_ENTRIES, LIMIT_TARGETS_MAX, LimitNat,
        LimitTarget, fold,
    };

    #[map]
    static LIMIT_TARGETS: Array<LimitTarget> = Array::with_max_entries(LIMIT_TARGETS_MAX, 0);
    /// `[LIMIT_CFG_TARGETS]`: targets in use; `[LIMIT_CFG_PORT]`: the UDP
    /// destination port (host order) that is forwarded.
    #[map]
    static LIMIT_CONFIG: Array<u32> = Array::with_max_entries(2, 0);

    /// `[i]`: what `xlb_limit_nat` writes for target `i`.
    #[map]
    static LIMIT_NAT: Array<LimitNat> = Array::with_max_entries(LIMIT_TARGETS_MAX, 0);

    /// `xlb_limit_lru`'s table: one insert per packet, keyed by the tuple.
    #[map]
    static LIMIT_LRU: LruHashMap<[u32; 4], u64> =
        LruHashMap::with_max_entries(LIMIT_LRU_ENTRIES, 0);

    /// The limit's part of every program: a UDP frame to the benchmark port
    /// gets its target's MACs; returns the frame and the target's index,
    /// or `None` for anything else (passed). With `ipv6`, an IPv6 frame
    /// without extension headers too (the family part's ceiling); the
    /// yardsticks rewrite IPv4 headers and take IPv4 only.
    #[inline(always)]
    fn forward(ctx: &XdpContext, ipv6: bool) -> Option<(*mut u8, u32)> {
        let start = ctx.data();
        if start + 42 > ctx.data_end() {
            return None;
        }
        let frame = start as *mut u8;
        // SAFETY: the 42 bytes read below are inside the frame.
        let (ether_type, version_ihl, proto) = unsafe {
            (
                (frame.add(12) as *const [u8; 2]).read_unaligned(),
                *frame.add(14),
                *frame.add(23),
            )
        };
        // Where the UDP ports are: after the 20-byte IPv4 header, or after
        // the 40-byte IPv6 one (next header at byte 20).
        let ports_at = if ether_type == [0x08, 0x00] && version_ihl == 0x45 && proto == 17 {
            34
        } else if ipv6
            && ether_type == [0x86, 0xdd]
            && start + 58 <= ctx.data_end()
            // SAFETY: byte 20 is inside the 42 checked above.
            && unsafe { *frame.add(20) } == 17
        {
            54
        } else {
            return None;
        };
        if start + ports_at + 4 > ctx.data_end() {
            return None;
        }
        // SAFETY: the 4 bytes of ports are inside the frame (checked above).
        let (src_port, dst_port) = unsafe {
            (
                u16::from_be_bytes((frame.add(ports_at) as *const [u8; 2]).read_unaligned()),
                u16::from_be_bytes((frame.add(ports_at + 2) as *const [u8; 2]).read_unaligned()),
            )
        };
        let targets = LIMIT_CONFIG.get(LIMIT_CFG_TARGETS)?;
        let port = LIMIT_CONFIG.get(LIMIT_CFG_PORT)?;
        if *targets == 0 || *port != u32::from(dst_port) {
            return None;
        }
        let index = u32::from(src_port) % *targets;
        let target = LIMIT_TARGETS.get(index)?;
        // SAFETY: the 12 MAC bytes are inside the frame (checked above).
        unsafe {
            (frame as *mut [u8; 6]).write_unaligned(target.dst_mac);
            (frame.add(6) as *mut [u8; 6]).write_unaligned(target.src_mac);
        }
        Some((frame, index))
    }

    #[inline(always)]
    fn redirect(index: u32) -> u32 {
        match LIMIT_TARGETS.get(index) {
            // SAFETY: plain helper call; it only records the target interface.
            Some(target) => unsafe { bpf_redirect(target.ifindex, 0) as u32 },
            None => xdp_action::XDP_PASS,
        }
    }

    /// The ceiling: new MACs and a redirect, nothing else (IPv4 and IPv6).
    #[xdp]
    pub fn xlb_limit(ctx: XdpContext) -> u32 {
        match forward(&ctx, true) {
            Some((_, index)) => redirect(index),
            None => xdp_action::XDP_PASS,
        }
    }

    /// A yardstick: the limit plus stateless NAT as xlb's masquerade path
    /// rewrites a frame (destination address and port, source address, IP
    /// and UDP checksums updated incrementally), with no lookup and no
    /// state.
    #[xdp]
    pub fn xlb_limit_nat(ctx: XdpContext) -> u32 {
        let Some((frame, index)) = forward(&ctx, false) else {
            return xdp_action::XDP_PASS;
        };
        let Some(nat) = LIMIT_NAT.get(index) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: every offset written is inside the 42 bytes `forward`
        // checked.
        unsafe { rewrite(frame, nat) };
        redirect(index)
    }

    /// A yardstick: the limit plus one LRU insert per packet (the tuple as
    /// key, BPF_ANY), the write a conntrack does for a new flow.
    #[xdp]
    pub fn xlb_limit_lru(ctx: XdpContext) -> u32 {
        let Some((frame, index)) = forward(&ctx, false) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: bytes 26..38 (addresses and ports) are inside the frame.
        let key = unsafe {
            [
                (frame.add(26) as *const u32).read_unaligned(),
                (frame.add(30) as *const u32).read_unaligned(),
                (frame.add(34) as *const u32).read_unaligned(),
                17,
            ]
        };
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let _ = LIMIT_LRU.insert(&key, &now, 0);
        redirect(index)
    }

    /// Big-endian 16-bit word at `at`.
    #[inline(always)]
    unsafe fn word(frame: *mut u8, at: usize) -> u32 {
        // SAFETY: the caller keeps `at + 2` inside the frame.
        u32::from(u16::from_be_bytes(unsafe {
            (frame.add(at) as *const [u8; 2]).read_unaligned()
        }))
    }

    #[inline(always)]
    unsafe fn set_word(frame: *mut u8, at: usize, value: u16) {
        // SAFETY: as for `word`.
        unsafe { (frame.add(at) as *mut [u8; 2]).write_unaligned(value.to_be_bytes()) }
    }

    /// Writes `nat`'s addresses and port into the frame and updates both
    /// checksums (RFC 1624: add the complement of each old word, then the
    /// new word).
    #[inline(always)]
    unsafe fn rewrite(frame: *mut u8, nat: &LimitNat) {
        let src = u32::from_be(nat.node_addr_be);
        let dst = u32::from_be(nat.backend_addr_be);
        let port = u16::from_be(nat.backend_port_be);
        // SAFETY: offsets 24..42 are inside the frame (the caller checked).
        unsafe {
            let mut delta = 0u32;
            for (at, new) in [
                (26, (src >> 16) as u16),
                (28, src as u16),
                (30, (dst >> 16) as u16),
                (32, dst as u16),
            ] {
                delta += (!word(frame, at) & 0xffff) + u32::from(new);
                set_word(frame, at, new);
            }
            let ip_check = !fold((!word(frame, 24) & 0xffff) + delta);
            set_word(frame, 24, ip_check);
            delta += (!word(frame, 36) & 0xffff) + u32::from(port);
            set_word(frame, 36, port);
            let udp_check = word(frame, 40);
            if udp_check != 0 {
                let check = !fold((!udp_check & 0xffff) + delta);
                set_word(frame, 40, if check == 0 { 0xffff } else { check });
            }
        }
    }

    xlb_bench_ebpf::program_boilerplate!();
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
