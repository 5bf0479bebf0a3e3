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
    /// tc program with `bpf_redirect_neigh` (next hop a veth without XDP, a
    /// bridge or a tunnel).
    pub to_backend_tc: u64,
    /// Replies sent by XDP (the reply crossed an XDP interface).
    pub to_client_xdp: u64,
    /// Replies reverse-NATed by tc on a pod's veth or a tunnel device.
    pub to_client_tc: u64,
    /// Packets rewritten in XDP for a local pod (`XLB_PEERS`) and put into
    /// the pod's namespace by the uplink's tc program with
    /// `bpf_redirect_peer`: no bridge, no host stack, no backlog.
    pub to_backend_peer: u64,
}
assert_size!(Paths, 40);

impl Paths {
    /// Sum of per-CPU values.
    pub fn add(&mut self, other: &Paths) {
        self.to_backend_xdp += other.to_backend_xdp;
        self.to_backend_tc += other.to_backend_tc;
        self.to_client_xdp += other.to_client_xdp;
        self.to_client_tc += other.to_client_tc;
        self.to_backend_peer += other.to_backend_peer;
    }
}

/// First three bytes of [`Handoff`]: a locally administered unicast MAC
/// prefix ("\x02xl"); with the kind after it, tc never acts on a frame
/// xlb's XDP did not mark. XDP drops frames that arrive from the wire
/// marked (`drop_tc_handoff`).
pub const HANDOFF_MARK: [u8; 3] = [0x02, b'x', b'l'];
/// tc sends the frame with `bpf_redirect_neigh` to the ifindex.
pub const HANDOFF_NEIGH: u8 = b'b';
/// tc writes the pod's MACs (`XLB_PEERS`) and sends the frame with
/// `bpf_redirect_peer` into the namespace of the ifindex's peer (a local
/// pod): past the bridge, the host stack and the backlog.
pub const HANDOFF_PEER: u8 = b'p';

/// The hand-off from XDP to the uplink's tc program, written over the
/// frame's Ethernet destination and the start of its source address: XDP
/// rewrote the frame but cannot deliver it, passes it up, and tc sends it on
/// (and writes real MACs, or `bpf_redirect_neigh` does). It travels in the
/// frame itself rather than in XDP metadata because not every kernel gives
/// XDP programs `bpf_xdp_adjust_meta` (this lab's 6.18 build refuses it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handoff {
    pub mark: [u8; 3],
    /// `HANDOFF_NEIGH` or `HANDOFF_PEER`.
    pub kind: u8,
    /// Native byte order.
    pub ifindex: u32,
}
assert_size!(Handoff, 8);

impl Handoff {
    #[inline(always)]
    pub const fn new(kind: u8, ifindex: u32) -> Self {
        Self {
            mark: HANDOFF_MARK,
            kind,
            ifindex,
        }
    }

    /// Whether an Ethernet destination address is a hand-off's: the mark
    /// and a known kind (02:78:6c:62 or 02:78:6c:70; other addresses under
    /// the mark, such as the test lab's 02:78:6c:00:.., are not).
    #[inline(always)]
    pub fn is_marked(dst_mac: &[u8; 6]) -> bool {
        dst_mac[0] == HANDOFF_MARK[0]
            && dst_mac[1] == HANDOFF_MARK[1]
            && dst_mac[2] == HANDOFF_MARK[2]
            && (dst_mac[3] == HANDOFF_NEIGH || dst_mac[3] == HANDOFF_PEER)
    }
}

/// `XLB_PEERS` value: a local pod, by its address (the key), as the agent
/// found it (kernel/peers.rs): the host side of its veth and the MACs of
/// the frame it should receive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The pod veth's host-side end: `bpf_redirect_peer` target.
    pub ifindex: u32,
    /// Where the node's FIB sends the pod's address: the veth itself (a
    /// routed CNI) or the bridge it is a port of (a bridge CNI). The peer
    /// path is taken only while the FIB still agrees.
    pub route_ifindex: u32,
    /// The pod's MAC (its `eth0`).
    pub dst_mac: [u8; 6],
    /// The MAC of `route_ifindex` (the pod's gateway as it sees it).
    pub src_mac: [u8; 6],
}
assert_size!(Peer, 20);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (asserted).
    unsafe impl aya::Pod for super::Paths {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Peer {}
}
