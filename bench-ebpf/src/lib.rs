//! The benchmark's own eBPF programs (`cargo xtask bench`), not part of the
//! datapath: `xlb_trafficgen` and `xlb_bench_sink` (trafficgen.rs), the
//! `xlb_limit` ceiling (limit.rs) and the micro benchmark's yardsticks
//! (baseline.rs). This library is their contract with the bench: the map
//! layouts and the generated frame's arithmetic, written once for the
//! programs (bpf target) and the bench (host, `user` feature: aya::Pod).
#![no_std]

pub mod template;

/// Bytes of every generated frame: Ethernet + IPv4 + UDP + 18 bytes payload,
/// or Ethernet + IPv4 + TCP + 6 bytes of Ethernet padding.
pub const FRAME_LEN: usize = 60;

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
    pub _pad: u32,
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

impl GenConfig {
    /// Where the template's L4 checksum is.
    #[inline(always)]
    pub fn l4_csum_at(&self) -> usize {
        if self.tcp != 0 {
            TCP_CSUM_AT
        } else {
            UDP_CSUM_AT
        }
    }

    /// The fields of frame number `seq`: the flow is picked from the
    /// sequence number, the checksums finished from the template's bases.
    #[inline(always)]
    pub fn fields(&self, seq: u64) -> GenFields {
        let flow = if self.flows == 0 {
            seq
        } else {
            seq % u64::from(self.flows)
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

/// A one's-complement sum folded to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
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
