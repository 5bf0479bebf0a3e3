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

/// Magic of [`Handoff`], so tc never acts on metadata it did not get from xlb.
pub const HANDOFF_MAGIC: u32 = 0x786c_6231;

/// XDP metadata in front of a frame XDP rewrote and passes to the uplink's
/// tc program, which redirects it to `ifindex` with `bpf_redirect_neigh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handoff {
    pub magic: u32,
    pub ifindex: u32,
}
assert_size!(Handoff, 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (asserted).
    unsafe impl aya::Pod for super::Paths {}
}
