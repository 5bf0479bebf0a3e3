//! Which hook carried a backend's packets (`XLB_BACKEND_PATHS`), so an
//! operator (and `cargo xtask demo`) can see whether a backend is reached by
//! XDP redirect or through tc.

use crate::assert_size;

/// Packets per path, per backend (per CPU in the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paths {
    /// Client-to-backend packets sent by XDP: XDP_TX or XDP_REDIRECT.
    pub to_backend_xdp: u64,
    /// Client-to-backend packets rewritten in XDP and sent on by the uplink's
    /// tc program (next hop a veth without XDP, a bridge or a tunnel).
    pub to_backend_tc: u64,
    /// Replies sent by XDP (the reply crossed an XDP interface).
    pub to_client_xdp: u64,
    /// Replies reverse-NATed by tc on a pod's veth or a tunnel device.
    pub to_client_tc: u64,
}
assert_size!(Paths, 32);

impl Paths {
    /// Sum of per-CPU values.
    pub fn add(&mut self, other: &Paths) {
        self.to_backend_xdp += other.to_backend_xdp;
        self.to_backend_tc += other.to_backend_tc;
        self.to_client_xdp += other.to_client_xdp;
        self.to_client_tc += other.to_client_tc;
    }
}

/// First four bytes of [`Handoff`]: a locally administered unicast MAC
/// prefix ("\x02xlb"), so tc never acts on a frame xlb's XDP did not mark.
/// XDP drops frames that arrive from the wire with it (`drop_tc_handoff`).
pub const HANDOFF_MAGIC: [u8; 4] = [0x02, b'x', b'l', b'b'];

/// The hand-off from XDP to the uplink's tc program, written over the
/// frame's Ethernet destination and the start of its source address: XDP
/// rewrote the frame but cannot deliver it, passes it up, and tc redirects it
/// to `ifindex` with `bpf_redirect_neigh`, which writes both MACs anew.
/// It travels in the frame itself rather than in XDP metadata because not
/// every kernel gives XDP programs `bpf_xdp_adjust_meta`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handoff {
    pub magic: [u8; 4],
    /// Native byte order.
    pub ifindex: u32,
}
assert_size!(Handoff, 8);

impl Handoff {
    /// Whether an Ethernet destination address starts with the hand-off's
    /// magic.
    #[inline(always)]
    pub fn is_marked(dst_mac: &[u8; 6]) -> bool {
        dst_mac[0] == HANDOFF_MAGIC[0]
            && dst_mac[1] == HANDOFF_MAGIC[1]
            && dst_mac[2] == HANDOFF_MAGIC[2]
            && dst_mac[3] == HANDOFF_MAGIC[3]
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (asserted).
    unsafe impl aya::Pod for super::Paths {}
}
