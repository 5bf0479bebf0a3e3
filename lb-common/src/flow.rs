//! Conntrack entries (`XLB_FLOWS`, `XLB_FLOWS_NEW`). A flow has two entries:
//! one keyed by the client's tuple (ORIGINAL) and one keyed by the tuple the
//! backend's replies carry (REPLY). Each entry holds the complete rewrite for
//! packets matching its key, so both directions cost one lookup.
//!
//! A TCP flow lives in `XLB_FLOWS_NEW` until the client acknowledges the
//! backend's SYN-ACK, then moves to `XLB_FLOWS`: a flood of new flows (spoofed
//! SYNs never get that far) can only evict other unconfirmed flows, never an
//! established one. UDP flows go straight to `XLB_FLOWS`.

use crate::{
    assert_size,
    family::{Family, V4, V6},
};

/// A 5-tuple exactly as it appears in a packet, of either family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyOf<F: Family> {
    pub src_addr_be: F::Addr,
    pub dst_addr_be: F::Addr,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
/// `XLB_FLOWS`' key.
pub type FlowKey = FlowKeyOf<V4>;
/// `XLB_FLOWS6`' key.
pub type FlowKey6 = FlowKeyOf<V6>;
assert_size!(FlowKey, 16);
assert_size!(FlowKey6, 40);

impl<F: Family> FlowKeyOf<F> {
    /// The key of the opposite direction's entry, given this entry's rewrite.
    /// Packets matching `self` leave as `flow.new_*`; the peer sees them
    /// reversed.
    #[inline(always)]
    pub const fn peer_of(flow: &FlowOf<F>, proto: u8) -> Self {
        Self {
            src_addr_be: flow.new_dst_addr_be,
            dst_addr_be: flow.new_src_addr_be,
            src_port_be: flow.new_dst_port_be,
            dst_port_be: flow.new_src_port_be,
            proto,
            _pad: [0; 3],
        }
    }
}

/// `Flow::direction`: client -> backend.
pub const FLOW_DIR_ORIGINAL: u8 = 0;
/// `Flow::direction`: backend -> client.
pub const FLOW_DIR_REPLY: u8 = 1;

/// `Flow::state` bits (TCP; UDP flows use only `SEEN_REPLY`, `CONFIRMED`
/// and `ASSURED`).
pub const FLOW_S_SYN: u8 = 1 << 0;
/// A packet has been seen in the reply direction.
pub const FLOW_S_SEEN_REPLY: u8 = 1 << 1;
pub const FLOW_S_FIN_ORIGINAL: u8 = 1 << 2;
pub const FLOW_S_FIN_REPLY: u8 = 1 << 3;
pub const FLOW_S_RST: u8 = 1 << 4;
/// The entry is in `XLB_FLOWS` (UDP always; TCP once the client acknowledged
/// the backend's SYN-ACK). Without it a TCP flow is half-open, lives in
/// `XLB_FLOWS_NEW` and expires `tcp_syn_timeout_s` after it was created.
pub const FLOW_S_CONFIRMED: u8 = 1 << 5;
/// UDP: the client has sent a packet after the flow's first, which a
/// spoofed source sending one datagram per tuple never does (a backend's
/// answer proves nothing: it answers a spoofed datagram too). Until then
/// the flow expires after `udp_unassured_timeout_s` idle, and its
/// masquerade port may be taken over once it has been idle for
/// `REFRESH_NS`, so a flood of one-datagram flows cannot hold a backend's
/// ports. Conntrack's `[ASSURED]` asks for replies instead, which a flood
/// at a service that answers gets.
pub const FLOW_S_ASSURED: u8 = 1 << 6;

/// The longest a flow's `last_seen_ns` goes unrewritten while packets
/// arrive: the established path writes the entry (a shared cache line) at
/// most this often, not on every packet.
pub const REFRESH_NS: u64 = 1_000_000_000;

/// One conntrack entry: what to rewrite packets matching its key to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowOf<F: Family> {
    pub new_src_addr_be: F::Addr,
    pub new_dst_addr_be: F::Addr,
    pub new_src_port_be: u16,
    pub new_dst_port_be: u16,
    /// Backend the flow was sent to (id in `XLB_BACKENDS`).
    pub backend_id: u32,
    /// Service the flow belongs to (`Service::id`).
    pub service_id: u32,
    /// `FLOW_DIR_*`.
    pub direction: u8,
    /// `FLOW_S_*`, kept identical in both entries of a flow.
    pub state: u8,
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) of the last
    /// packet, rewritten only once it is `refresh_ns` old (at most a second,
    /// a quarter of the timeout for timeouts under 4 s).
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_coarse_ns()` when the flow was created.
    pub created_ns: u64,
    /// Next hop for this entry's packets as the FIB last said (egress
    /// interface, MACs), re-checked with each timestamp refresh so a route
    /// or neighbour change is followed within a second. 0: not known.
    pub hop_ifindex: u32,
    pub hop_src_mac: [u8; 6],
    pub hop_dst_mac: [u8; 6],
    /// TCP, host order: the highest sequence number this entry's direction
    /// has used (end of its furthest segment, SYN and FIN counting one).
    pub seq_end: u32,
    /// TCP, host order: the highest acknowledgement number this entry's
    /// direction has sent. A RST is believed only if its sequence number lies
    /// between the receiver's `ack` and the sender's `seq_end`.
    pub ack: u32,
}
/// `XLB_FLOWS`' value.
pub type Flow = FlowOf<V4>;
/// `XLB_FLOWS6`' value.
pub type Flow6 = FlowOf<V6>;
assert_size!(Flow, 64);
assert_size!(Flow6, 88);

impl<F: Family> FlowOf<F> {
    /// Idle timeout of this entry, in seconds, under `cfg`.
    #[inline(always)]
    pub const fn timeout_s(&self, proto: u8, cfg: &crate::GlobalConfig) -> u32 {
        if proto != crate::IPPROTO_TCP {
            return if self.state & FLOW_S_ASSURED != 0 {
                cfg.udp_timeout_s
            } else {
                cfg.udp_unassured_timeout_s
            };
        }
        if self.closed() {
            cfg.tcp_closing_timeout_s
        } else if self.state & FLOW_S_CONFIRMED == 0 {
            cfg.tcp_syn_timeout_s
        } else {
            cfg.tcp_established_timeout_s
        }
    }

    /// How old `last_seen_ns` may get before a packet rewrites it, for an
    /// entry whose timeout is `timeout_s`: `REFRESH_NS`, or a quarter of the
    /// timeout if that is shorter. Expiry is judged on the stored value, so
    /// the refresh must come well inside the timeout: with a 1 s timeout
    /// and a 1 s refresh, a flow with a packet every 300 ms looked idle at
    /// its fourth packet and was created anew about once a second. With a
    /// quarter, a flow lives as long as its gaps stay under 3/4 of the
    /// timeout, and ends at most a whole timeout after its last packet.
    #[inline(always)]
    pub const fn refresh_ns(timeout_s: u32) -> u64 {
        let quarter = timeout_s as u64 * 250_000_000;
        if quarter < REFRESH_NS {
            quarter
        } else {
            REFRESH_NS
        }
    }

    /// Whether a packet at `now_ns` should rewrite `last_seen_ns` (and, in
    /// the datapath, re-check the entry's peer and next hop).
    #[inline(always)]
    pub const fn refresh_due(&self, proto: u8, cfg: &crate::GlobalConfig, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) >= Self::refresh_ns(self.timeout_s(proto, cfg))
    }

    /// TCP: RST seen, or FIN both ways.
    #[inline(always)]
    pub const fn closed(&self) -> bool {
        let both_fins = FLOW_S_FIN_ORIGINAL | FLOW_S_FIN_REPLY;
        self.state & FLOW_S_RST != 0 || self.state & both_fins == both_fins
    }

    /// Whether the entry is past its timeout at `now_ns`. A half-open TCP
    /// flow (not confirmed, not closed) counts from its creation, so a
    /// backend retransmitting its SYN-ACK to a silent client cannot keep
    /// it alive; everything else counts from its last packet.
    #[inline(always)]
    pub const fn expired(&self, proto: u8, cfg: &crate::GlobalConfig, now_ns: u64) -> bool {
        let timeout_ns = self.timeout_s(proto, cfg) as u64 * 1_000_000_000;
        let half_open =
            proto == crate::IPPROTO_TCP && self.state & FLOW_S_CONFIRMED == 0 && !self.closed();
        let since = if half_open {
            self.created_ns
        } else {
            self.last_seen_ns
        };
        now_ns.saturating_sub(since) > timeout_ns
    }

    /// Whether `other` is this entry's peer: the entry the opposite
    /// direction's packets find, pointing back at `key` (this entry's key).
    #[inline(always)]
    pub fn is_peer(other: &FlowOf<F>, key: &FlowKeyOf<F>) -> bool {
        other.new_src_addr_be == key.dst_addr_be
            && other.new_dst_addr_be == key.src_addr_be
            && other.new_src_port_be == key.dst_port_be
            && other.new_dst_port_be == key.src_port_be
    }
}

/// Forwarded traffic of one service or backend (per CPU in the maps):
/// `to_backend_*` counts client-to-backend packets, `to_client_*` replies.
/// Bytes are frame lengths as forwarded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub to_backend_packets: u64,
    pub to_backend_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}
assert_size!(Traffic, 32);

impl Traffic {
    /// Sum of per-CPU values.
    pub fn add(&mut self, other: &Traffic) {
        self.to_backend_packets += other.to_backend_packets;
        self.to_backend_bytes += other.to_backend_bytes;
        self.to_client_packets += other.to_client_packets;
        self.to_client_bytes += other.to_client_bytes;
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (asserted).
    unsafe impl aya::Pod for super::Traffic {}
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (asserted).
    unsafe impl<F: crate::Family> aya::Pod for super::FlowKeyOf<F> {}
    // SAFETY: as above, for both families (sizes asserted for each).
    unsafe impl<F: crate::Family> aya::Pod for super::FlowOf<F> {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GlobalConfig;

    #[test]
    fn peer_key_reverses_rewrite() {
        let flow = Flow {
            new_src_addr_be: 1,
            new_dst_addr_be: 2,
            new_src_port_be: 3,
            new_dst_port_be: 4,
            ..Flow::default()
        };
        let peer = FlowKey::peer_of(&flow, crate::IPPROTO_UDP);
        assert_eq!((peer.src_addr_be, peer.dst_addr_be), (2, 1));
        assert_eq!((peer.src_port_be, peer.dst_port_be), (4, 3));
    }

    #[test]
    fn tcp_timeouts_follow_state() {
        let cfg = GlobalConfig::DEFAULT;
        let mut flow = Flow::default();
        assert_eq!(
            flow.timeout_s(crate::IPPROTO_TCP, &cfg),
            cfg.tcp_syn_timeout_s
        );
        flow.state |= FLOW_S_SEEN_REPLY;
        assert_eq!(
            flow.timeout_s(crate::IPPROTO_TCP, &cfg),
            cfg.tcp_syn_timeout_s,
            "a SYN-ACK alone does not make a flow established"
        );
        flow.state |= FLOW_S_CONFIRMED;
        assert_eq!(
            flow.timeout_s(crate::IPPROTO_TCP, &cfg),
            cfg.tcp_established_timeout_s
        );
        flow.state |= FLOW_S_FIN_ORIGINAL;
        assert_eq!(
            flow.timeout_s(crate::IPPROTO_TCP, &cfg),
            cfg.tcp_established_timeout_s,
            "a half-close keeps the flow open"
        );
        flow.state |= FLOW_S_FIN_REPLY;
        assert_eq!(
            flow.timeout_s(crate::IPPROTO_TCP, &cfg),
            cfg.tcp_closing_timeout_s
        );
        flow.state = 0;
        assert_eq!(
            flow.timeout_s(crate::IPPROTO_UDP, &cfg),
            cfg.udp_unassured_timeout_s,
            "a UDP flow's client has sent one datagram"
        );
        flow.state = FLOW_S_ASSURED;
        assert_eq!(flow.timeout_s(crate::IPPROTO_UDP, &cfg), cfg.udp_timeout_s);
    }

    #[test]
    fn expiry_uses_last_seen() {
        let cfg = GlobalConfig::DEFAULT;
        let flow = Flow {
            last_seen_ns: 1_000_000_000,
            state: FLOW_S_ASSURED,
            ..Flow::default()
        };
        let limit = 1_000_000_000 + u64::from(cfg.udp_timeout_s) * 1_000_000_000;
        assert!(!flow.expired(crate::IPPROTO_UDP, &cfg, limit));
        assert!(flow.expired(crate::IPPROTO_UDP, &cfg, limit + 1));
    }

    #[test]
    fn refresh_comes_well_inside_short_timeouts() {
        let second = 1_000_000_000;
        assert_eq!(Flow::refresh_ns(1), second / 4);
        assert_eq!(Flow::refresh_ns(2), second / 2);
        assert_eq!(Flow::refresh_ns(4), REFRESH_NS);
        assert_eq!(Flow::refresh_ns(86_400), REFRESH_NS);
        // A flow with a packet every 300 ms under a 1 s timeout: every
        // packet finds its entry due, so none finds it expired.
        let cfg = GlobalConfig {
            udp_timeout_s: 1,
            ..GlobalConfig::DEFAULT
        };
        let udp = crate::IPPROTO_UDP;
        let mut flow = Flow {
            state: FLOW_S_ASSURED,
            ..Flow::default()
        };
        for packet in 1..=10u64 {
            let now = packet * 300_000_000;
            assert!(!flow.expired(udp, &cfg, now), "expired at packet {packet}");
            assert!(flow.refresh_due(udp, &cfg, now));
            flow.last_seen_ns = now;
        }
        assert!(!flow.refresh_due(udp, &cfg, 3 * second + second / 5));
    }

    #[test]
    fn half_open_tcp_expires_from_creation() {
        let cfg = GlobalConfig::DEFAULT;
        let second = 1_000_000_000;
        let syn_timeout = u64::from(cfg.tcp_syn_timeout_s) * second;
        let mut flow = Flow {
            created_ns: second,
            // SYN-ACK retransmissions keep refreshing last_seen.
            last_seen_ns: syn_timeout,
            state: FLOW_S_SYN | FLOW_S_SEEN_REPLY,
            ..Flow::default()
        };
        let tcp = crate::IPPROTO_TCP;
        assert!(!flow.expired(tcp, &cfg, second + syn_timeout));
        assert!(flow.expired(tcp, &cfg, second + syn_timeout + 1));
        flow.state |= FLOW_S_CONFIRMED;
        assert!(!flow.expired(tcp, &cfg, second + syn_timeout + 1));
    }
}
