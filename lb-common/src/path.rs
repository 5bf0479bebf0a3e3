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

/// How XDP hands a rewritten frame to the uplink's tc program: in the frame
/// itself, as its Ethernet source address, which nothing downstream of tc
/// reads before tc or the neighbour layer replaces it. (XDP metadata
/// (`bpf_xdp_adjust_meta`) would be the natural channel, but kernels such
/// as this lab's 6.18 refuse that helper to XDP programs.) The address is
/// locally administered and unicast: `HANDOFF_MAC_TAG`, the hand-off's kind,
/// then the egress ifindex XORed with a per-node secret (the high half of
/// the hash seed), so a frame from the wire cannot pass for one.
pub const HANDOFF_MAC_TAG: u8 = 0x7a;
/// tc sends the frame with `bpf_redirect_neigh` to the ifindex.
pub const HANDOFF_NEIGH: u8 = 1;
/// tc sends the frame with `bpf_redirect_peer` into the namespace of the
/// ifindex's peer (a local pod), after writing `Peer::src_mac`.
pub const HANDOFF_PEER: u8 = 2;

/// The Ethernet source address that hands a frame to tc.
#[inline(always)]
pub const fn handoff_mac(kind: u8, ifindex: u32, secret: u32) -> [u8; 6] {
    let id = (ifindex ^ secret).to_be_bytes();
    [HANDOFF_MAC_TAG, kind, id[0], id[1], id[2], id[3]]
}

/// The (kind, ifindex) a source address hands over, if it is a hand-off.
#[inline(always)]
pub const fn handoff_of(mac: [u8; 6], secret: u32) -> Option<(u8, u32)> {
    if mac[0] != HANDOFF_MAC_TAG {
        return None;
    }
    let id = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]);
    Some((mac[1], id ^ secret))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handoff_address_round_trips_and_is_unicast() {
        let mac = handoff_mac(HANDOFF_PEER, 7, 0xdead_beef);
        assert_eq!(mac[0] & 1, 0, "unicast");
        assert_eq!(mac[0] & 2, 2, "locally administered");
        assert_eq!(handoff_of(mac, 0xdead_beef), Some((HANDOFF_PEER, 7)));
        assert_ne!(handoff_of(mac, 0), Some((HANDOFF_PEER, 7)));
        assert_eq!(handoff_of([2, 0, 0, 0, 0, 1], 0), None);
    }
}
