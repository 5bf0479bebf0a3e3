//! Why the datapath did what it did with a packet. One enum for both sides:
//! the datapath counts each packet under exactly one reason in `XLB_STATS`,
//! and the agent prints the same names.

/// The XDP action a reason implies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewritten and sent on (XDP_REDIRECT or XDP_TX).
    Forward,
    /// Handed to the kernel stack untouched (XDP_PASS).
    Pass,
    /// Dropped (XDP_DROP).
    Drop,
    /// Answered in place with an ICMP error or TCP RST and sent back (XDP_TX).
    Reject,
}

macro_rules! reasons {
    ($($variant:ident = $value:literal, $name:literal, $verdict:ident, $doc:literal;)*) => {
        /// One counter per reason; the value is the index in `XLB_STATS`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $(#[doc = $doc] $variant = $value,)*
        }

        impl Reason {
            /// Every reason, in counter order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The name operators see (CLI, metrics labels).
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$variant => $name,)* }
            }

            pub const fn verdict(self) -> Verdict {
                match self { $(Reason::$variant => Verdict::$verdict,)* }
            }

            /// What the reason means, for help text.
            pub const fn description(self) -> &'static str {
                match self { $(Reason::$variant => $doc,)* }
            }

            pub const fn from_index(index: u32) -> Option<Reason> {
                match index { $($value => Some(Reason::$variant),)* _ => None }
            }
        }
    };
}

reasons! {
    FwdNewFlow = 0, "fwd_new_flow", Forward, "first packet of a flow: backend chosen, flow recorded, rewritten";
    FwdEstablished = 1, "fwd_established", Forward, "client-to-backend packet of a known flow";
    FwdReply = 2, "fwd_reply", Forward, "backend-to-client packet of a known flow, reverse NAT applied";
    PassNotReady = 3, "pass_not_ready", Pass, "the agent has not finished writing the configuration yet";
    PassNotIpv4 = 4, "pass_not_ipv4", Pass, "neither an untagged IPv4 nor IPv6 frame (ARP, VLAN, ...)";
    PassMalformed = 5, "pass_malformed", Pass, "truncated or inconsistent headers; left for the kernel to judge";
    PassFragment = 6, "pass_fragment", Pass, "fragment of an ICMP message; xlb does not reassemble";
    PassNotTcpUdp = 7, "pass_not_tcp_udp", Pass, "neither TCP nor UDP (ICMP, ICMPv6 NDP and echo, ...)";
    PassNotService = 8, "pass_not_service", Pass, "no service on this address and port, and no flow";
    PassTcpNoFlow = 9, "pass_tcp_no_flow", Pass, "TCP segment other than SYN for a service with no flow; the kernel resets it";
    PassFibFailed = 10, "pass_fib_failed", Pass, "the kernel FIB has no usable route to the destination";
    DropNoBackend = 11, "drop_no_backend", Drop, "the service has no backends";
    DropNoNeighbour = 12, "drop_no_neighbour", Drop, "the next hop's MAC address is not resolved yet";
    DropSnatExhausted = 13, "drop_snat_exhausted", Drop, "no free masquerade port for this backend";
    DropTtlExpired = 14, "drop_ttl_expired", Drop, "TTL would reach zero when forwarded";
    DropFlowInsert = 15, "drop_flow_insert", Drop, "the conntrack entry could not be written";
    RejectPortUnreachable = 16, "reject_port_unreachable", Reject, "UDP to a service with no endpoints: ICMP (ICMPv6) port unreachable sent back";
    RejectTcpReset = 17, "reject_tcp_reset", Reject, "SYN to a service with no endpoints: TCP RST sent back";
    DropSourceRange = 18, "drop_source_range", Drop, "source address outside the service's loadBalancerSourceRanges";
    FwdIcmpToClient = 19, "fwd_icmp_to_client", Forward, "ICMP error (unreachable, frag needed, time exceeded) or ICMPv6 error (unreachable, packet too big, time exceeded, parameter problem) about a packet sent to a backend: translated and sent to the client";
    FwdIcmpToBackend = 20, "fwd_icmp_to_backend", Forward, "ICMP (ICMPv6) error about a packet sent to a client: translated and sent to the backend";
    PassIcmpNoFlow = 21, "pass_icmp_no_flow", Pass, "ICMP (ICMPv6) error quoting no flow of xlb's (or not TCP/UDP, or a later fragment, or IPv6 extension headers): left to the kernel";
    FwdFragment = 22, "fwd_fragment", Forward, "later fragment of a balanced datagram: follows its first fragment's flow";
    PassFragmentUnknown = 23, "pass_fragment_unknown", Pass, "later fragment whose first fragment was not seen (out of order, or not a flow's): left to the kernel";
    RejectFragNeeded = 24, "reject_frag_needed", Reject, "DF packet (any IPv6 packet) larger than the next hop's MTU: ICMP fragmentation needed (ICMPv6 packet too big) sent to its sender";
    DropIcmpRateLimited = 25, "drop_icmp_rate_limited", Drop, "DF packet larger than the next hop's MTU; this source's ICMP answers are rate-limited";
    DropTooBig = 26, "drop_too_big", Drop, "packet without DF larger than the next hop's MTU (XDP cannot fragment)";
    FwdSocket = 27, "fwd_socket", Forward, "connect() or sendmsg() to a service rewritten to a backend by the socket hooks (counts calls, not packets)";
    RejectSocketNoBackend = 28, "reject_sock_no_backend", Reject, "connect() or sendmsg() to a service with no endpoints refused with ECONNREFUSED by the socket hooks";
    DropTcHandoff = 29, "drop_tc_handoff", Drop, "a frame from the wire whose destination MAC carries the marker xlb's XDP uses to hand frames to its tc program (02:78:6c:62:..): forged, dropped";
    DropTcRewrite = 30, "drop_tc_rewrite", Drop, "a kernel checksum or store helper failed part-way through a rewrite at tc; the packet is dropped rather than sent half-rewritten";
    FwdRstOutsideWindow = 31, "fwd_rst_outside_window", Forward, "TCP RST whose sequence number is outside the flow's window: forwarded for the endpoint to judge, the flow stays open";
    PassIpv6Fragment = 32, "pass_ipv6_fragment", Pass, "IPv6 later fragment while XLB_PROGS6 holds no fragment program (xlb explain): left to the kernel";
    PassIpv6ExtHeaders = 33, "pass_ipv6_ext_headers", Pass, "IPv6 packet whose extension headers xlb does not walk (more than 6, a routing header with segments left): left to the kernel";
    PassIpv6NoBackend = 34, "pass_ipv6_no_backend", Pass, "IPv6 packet to a service with no endpoints left to the kernel to answer, by datapaths before xlb answered IPv6 itself (reject_port_unreachable, reject_tcp_reset); no longer counted, kept so the counters keep their numbers";
}

/// Number of counters in `XLB_STATS`.
pub const REASON_COUNT: u32 = Reason::ALL.len() as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_names_unique() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index);
            assert_eq!(Reason::from_index(index as u32), Some(*reason));
            for other in &Reason::ALL[index + 1..] {
                assert_ne!(reason.name(), other.name());
            }
        }
        assert_eq!(Reason::from_index(REASON_COUNT), None);
    }

    #[test]
    fn name_prefix_matches_verdict() {
        for reason in Reason::ALL {
            let prefix = match reason.verdict() {
                Verdict::Forward => "fwd_",
                Verdict::Pass => "pass_",
                Verdict::Drop => "drop_",
                Verdict::Reject => "reject_",
            };
            assert!(reason.name().starts_with(prefix), "{}", reason.name());
        }
    }
}
