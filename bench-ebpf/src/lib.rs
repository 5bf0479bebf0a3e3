//! The benchmark's own eBPF programs (`cargo xtask bench`), not part of the
//! datapath: `xlb_trafficgen` and `xlb_bench_sink` (trafficgen.rs), the
//! `xlb_limit` ceiling (limit.rs) and the micro benchmark's yardsticks
//! (baseline.rs). This library is their contract with the bench: the map
//! layouts and the generated frame's arithmetic, written once for the
//! programs (bpf target) and the bench (host, `user` feature: aya::Pod).
#![no_std]

pub mod template;

/// Bytes of every generated IPv4 frame: Ethernet + IPv4 + UDP + 18 bytes
/// payload, or Ethernet + IPv4 + TCP + 6 bytes of Ethernet padding.
pub const FRAME_LEN: usize = 60;
/// Bytes of every generated IPv6 frame: Ethernet + IPv6 + UDP + 2 bytes
/// payload (the whole template).
pub const FRAME6_LEN: usize = 64;

/// `GEN_CONFIG[0]`: what to send. Host order unless named `_be`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GenConfig {
    /// The frame with source address and port 0 and both checksums 0, as
    /// 8-byte words in memory order; the first `FRAME_LEN` bytes are used.
    pub frame: [u64; 8],
    /// Source address of flow 0.
    pub src_addr_base: u32,
    /// Distinct flows to cycle through; 0: every frame is a new flow.
    pub flows: u32,
    /// One's-complement sum (unfolded) of the IPv4 header words with the
    /// source address and checksum 0.
    pub ip_csum_base: u32,
    /// The same for the UDP pseudo-header, header and payload with the
    /// source address, source port and checksum 0.
    pub udp_csum_base: u32,
    /// Source port of flow 0.
    pub src_port_base: u16,
    /// Source ports per source address before the address moves on.
    pub port_span: u16,
    /// 0: the template is UDP (checksum at `UDP_CSUM_AT`). 1: TCP, e.g. a
    /// SYN flood (checksum at `TCP_CSUM_AT`; `udp_csum_base` then sums the
    /// TCP pseudo-header and header).
    pub tcp: u32,
    /// The generator's wire (in its own namespace): each frame is cloned
    /// out of this interface.
    pub ifindex: u32,
    /// 0: an IPv4 frame (`FRAME_LEN`, the offsets below); 1: an IPv6 UDP
    /// frame (`FRAME6_LEN`, the `..6_AT` offsets; the low 32 bits of the
    /// source address vary, there is no IP checksum).
    pub ipv6: u32,
}
const _: () = assert!(core::mem::size_of::<GenConfig>() == 96);

/// What changes from one generated frame to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenFields {
    /// Source address, host order.
    pub src_addr: u32,
    pub src_port: u16,
    pub ip_csum: u16,
    pub udp_csum: u16,
}

/// Byte offsets in the generated frame of what `GenFields` holds.
pub const IP_CSUM_AT: usize = 24;
pub const SRC_ADDR_AT: usize = 26;
pub const SRC_PORT_AT: usize = 34;
pub const UDP_CSUM_AT: usize = 40;
pub const TCP_CSUM_AT: usize = 50;
/// The IPv6 frame's: the source address's last four bytes, the source
/// port, the UDP checksum.
pub const SRC_ADDR6_AT: usize = 34;
pub const SRC_PORT6_AT: usize = 54;
pub const UDP_CSUM6_AT: usize = 60;

impl GenConfig {
    /// Where the template's L4 checksum is.
    #[inline(always)]
    pub fn l4_csum_at(&self) -> usize {
        if self.ipv6 != 0 {
            UDP_CSUM6_AT
        } else if self.tcp != 0 {
            TCP_CSUM_AT
        } else {
            UDP_CSUM_AT
        }
    }

    /// Where the varying part of the source address and the source port
    /// are, and the frame's length.
    #[inline(always)]
    pub fn layout(&self) -> (usize, usize, usize) {
        if self.ipv6 != 0 {
            (SRC_ADDR6_AT, SRC_PORT6_AT, FRAME6_LEN)
        } else {
            (SRC_ADDR_AT, SRC_PORT_AT, FRAME_LEN)
        }
    }

    /// The fields of frame number `seq`: the flow is picked from the
    /// sequence number, the checksums finished from the template's bases.
    #[inline(always)]
    pub fn fields(&self, seq: u64) -> GenFields {
        let flow = if self.flows == 0 {
            seq
        } else {
            lap_flow(seq, u64::from(self.flows))
        };
        let span = u64::from(self.port_span.max(1));
        let src_port = self.src_port_base.wrapping_add((flow % span) as u16);
        let src_addr = self.src_addr_base.wrapping_add((flow / span) as u32);
        let addr_words = (src_addr >> 16) + (src_addr & 0xffff);
        let ip_csum = !fold(self.ip_csum_base + addr_words);
        let udp_csum = match !fold(self.udp_csum_base + addr_words + u32::from(src_port)) {
            0 => 0xffff,
            sum => sum,
        };
        GenFields {
            src_addr,
            src_port,
            ip_csum,
            udp_csum,
        }
    }
}

/// The flow of frame `seq` when cycling through `flows`: every lap of
/// `flows` frames sends each flow once, and each lap starts a golden-ratio
/// step further on. The system under test drops what it cannot take in
/// runs of consecutive frames; with every lap in the same order, a lap
/// length close to a multiple of that pattern starves the same flows lap
/// after lap, long enough for them to time out (an "established" window
/// then creates flows: 869 in IPv6's 60k-flow window, seen at 777k
/// delivered of 60,000 flows with a 1 s timeout). Shifted laps spread each
/// run of drops over other flows every lap.
#[inline(always)]
pub fn lap_flow(seq: u64, flows: u64) -> u64 {
    if flows == 0 {
        return seq;
    }
    let step = (flows * 40_503) >> 16;
    let (lap, at) = (seq / flows, seq % flows);
    (at + (lap % flows) * step) % flows
}

/// A one's-complement sum folded to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Whether a frame's first bytes are a benchmark datagram's headers: an
/// untagged IPv4 frame without options or an IPv6 frame without extension
/// headers, carrying UDP; its destination port if so. `head` holds at
/// least the first 58 bytes (an IPv4 frame's first 38 are enough).
#[inline(always)]
pub fn udp_dst_port(head: &[u8; 58]) -> Option<u16> {
    match [head[12], head[13]] {
        [0x08, 0x00] if head[14] == 0x45 && head[23] == 17 => {
            Some(u16::from_be_bytes([head[36], head[37]]))
        }
        [0x86, 0xdd] if head[14] >> 4 == 6 && head[20] == 17 => {
            Some(u16::from_be_bytes([head[56], head[57]]))
        }
        _ => None,
    }
}

/// `SINK_CONFIG[i]`: UDP destination ports (host order) the sink counts and
/// drops; 0 is unused.
pub const SINK_PORTS: u32 = 2;

/// `LIMIT_TARGETS[i]`: one backend link as seen from the node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LimitTarget {
    /// The node's interface towards the backend (node namespace index).
    pub ifindex: u32,
    /// That interface's MAC.
    pub src_mac: [u8; 6],
    /// The backend's MAC.
    pub dst_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<LimitTarget>() == 16);

pub const LIMIT_TARGETS_MAX: u32 = 8;

/// `LIMIT_NAT[i]`: the addresses `xlb_limit_nat` writes for target `i`, as
/// xlb's NodePort path with masquerade would: the backend's address and
/// port, the node's address on the backend link as the source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LimitNat {
    pub backend_addr_be: u32,
    pub node_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<LimitNat>() == 12);

/// Entries of `xlb_limit_lru`'s table: room for the 60k-flow test's tuples
/// and a new-flow flood's last second at the lab's rates.
pub const LIMIT_LRU_ENTRIES: u32 = 1 << 20;

/// `LIMIT_CONFIG` indices.
pub const LIMIT_CFG_TARGETS: u32 = 0;
pub const LIMIT_CFG_PORT: u32 = 1;

/// What every program object of this crate needs besides its programs: a
/// panic handler (BPF code cannot unwind) and the GPL license the kernel
/// asks of programs that call GPL-only helpers.
#[macro_export]
macro_rules! program_boilerplate {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 4] = *b"GPL\0";
    };
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (sizes
    // asserted above).
    unsafe impl aya::Pod for super::GenConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LimitTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LimitNat {}
}
