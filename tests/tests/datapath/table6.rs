//! The fixture table's IPv6 rows: new flows, established flows and replies
//! over UDP and TCP through the IPv6 NodePorts, each extension header xlb
//! walks, the ones it leaves to the kernel, truncated and inconsistent
//! headers, NDP. Expected frames are built from scratch with etherparse
//! (`packets6`), never with datapath code.

use etherparse::Icmpv6Type;
use lb_common::{
    FlowKey6, Peer, Reason,
    flow::FLOW_S_CONFIRMED,
    path::{HANDOFF_NEIGH, HANDOFF_PEER, Handoff},
};
use std::net::Ipv6Addr;

use xlb_tests::{
    packets::{ACK, L4, PSH, RST, SYN},
    packets6::*,
    testrun::*,
    testrun6::*,
};

use crate::table::{Case, Expect, Row};

fn unchanged(dp: &Datapath, frame: Vec<u8>) -> Case {
    Case {
        input: frame,
        ifindex: dp.client_ifindex,
        expect: Expect::Unchanged,
        after: None,
    }
}

fn exact(dp: &Datapath, frame: Vec<u8>, want: Vec<u8>) -> Case {
    Case {
        input: frame,
        ifindex: dp.client_ifindex,
        expect: Expect::Frame(Box::new(move |_| want)),
        after: None,
    }
}

fn udp6(sport: u16) -> Spec6 {
    Spec6::from_client(sport, UDP_NODE_PORT, L4::Udp)
}

fn tcp6(sport: u16, flags: u8) -> Spec6 {
    Spec6::from_client(sport, TCP_NODE_PORT, L4::Tcp(flags))
}

fn backend6_mac(addr: Ipv6Addr) -> [u8; 6] {
    match addr {
        BACKEND6_1 => BACKEND_1_MAC,
        BACKEND6_2 => BACKEND_2_MAC,
        other => panic!("{other} is not an IPv6 backend of the base state"),
    }
}

fn target_port(spec: &Spec6) -> u16 {
    match spec.l4 {
        L4::Udp => UDP_TARGET_PORT,
        L4::Tcp(_) => TCP_TARGET_PORT,
    }
}

/// The frame `spec` becomes on its way to the backend conntrack recorded
/// for it: from `masquerade` (the backend-side node address and a port in
/// range, or with `None` the client's own address and port).
fn to_backend6(dp: &mut Datapath, spec: &Spec6, masquerade: bool) -> Vec<u8> {
    let flow = dp
        .flow6(&spec.key())
        .expect("conntrack has the client's flow");
    let backend = Ipv6Addr::from(lb_common::family::octets6(flow.new_dst_addr_be));
    let sport = u16::from_be(flow.new_src_port_be);
    let src = if masquerade {
        assert!(
            (SNAT_MIN..=SNAT_MAX).contains(&sport),
            "masquerade port {sport} outside {SNAT_MIN}-{SNAT_MAX}"
        );
        (NODE6_B, sport)
    } else {
        assert_eq!(sport, spec.sport, "no masquerade keeps the client's port");
        (spec.src, spec.sport)
    };
    let eth = (NODE_B_MAC, backend6_mac(backend));
    spec.forwarded(eth, src, (backend, target_port(spec)))
        .build()
}

fn forward_case(dp: &Datapath, spec: Spec6, masquerade: bool) -> Case {
    Case {
        input: spec.build(),
        ifindex: dp.client_ifindex,
        expect: Expect::Frame(Box::new(move |dp| to_backend6(dp, &spec, masquerade))),
        after: None,
    }
}

/// Sends `spec` from the client; returns the frame as the backend got it.
pub fn send_from_client6(dp: &mut Datapath, spec: &Spec6) -> Spec6 {
    let (verdict, out) = dp.run(&spec.build(), dp.client_ifindex);
    assert_eq!(
        verdict, XDP_REDIRECT,
        "setup frame {spec:?} was not forwarded"
    );
    let (src, sport, dst, dport) = tuple_of6(&out).expect("forwarded frame parses");
    Spec6 {
        eth_src: NODE_B_MAC,
        eth_dst: backend6_mac(dst),
        src,
        sport,
        dst,
        dport,
        hop_limit: spec.hop_limit - 1,
        exts: Vec::new(),
        ..spec.clone()
    }
}

/// The backend's reply to `at_backend`, expected to reach the client from
/// `NODE6`:NodePort.
fn reply_case(dp: &mut Datapath, client: &Spec6, at_backend: &Spec6, l4: L4) -> Case {
    let reply = at_backend.reply(l4, b"echo6");
    let to_client = reply.forwarded(
        (NODE_MAC, CLIENT_MAC),
        (NODE6, client.dport),
        (CLIENT6, client.sport),
    );
    Case {
        input: reply.build(),
        ifindex: dp.backend_ifindex,
        expect: Expect::Frame(Box::new(move |_| to_client.build())),
        after: None,
    }
}

/// What a new flow to a backend reached through tc leaves as: rewritten
/// like `to_backend6`, MACs as they came, the hand-off over its first 8
/// bytes (tc writes real MACs).
fn handed_over6(dp: &mut Datapath, spec: &Spec6, hand_off: Handoff) -> Vec<u8> {
    let mut out = to_backend6(dp, spec, true);
    out[..12].copy_from_slice(&spec.build()[..12]);
    out[..3].copy_from_slice(&hand_off.mark);
    out[3] = hand_off.kind;
    out[4..8].copy_from_slice(&hand_off.ifindex.to_ne_bytes());
    out
}

/// A local pod's veth in the `XLB_PEERS6` row (any index: tc is not run).
const PEER_VETH: u32 = 4243;

fn with_exts(mut spec: Spec6, exts: Vec<Ext>) -> Spec6 {
    spec.exts = exts;
    spec
}

/// Both entries of `key`'s flow are confirmed (in `XLB_FLOWS6`).
fn confirmed(key: FlowKey6) -> Option<crate::table::AfterCheck> {
    Some(Box::new(move |dp: &mut Datapath| {
        let flow = dp.flows6().get(&key, 0).expect("established entry");
        assert_ne!(flow.state & FLOW_S_CONFIRMED, 0);
        let peer = FlowKey6::peer_of(&flow, key.proto);
        assert!(dp.flows6().get(&peer, 0).is_ok(), "reply entry confirmed");
    }))
}

pub fn rows() -> Vec<Row> {
    let mut rows = flow_rows();
    rows.extend(affinity_rows());
    rows.extend(too_big_rows());
    rows.extend(header_rows());
    rows.extend(icmp_rows());
    rows.extend(fragment_rows());
    rows
}

fn affine6(sport: u16) -> Spec6 {
    Spec6::from_client(sport, AFFINITY_NODE_PORT, L4::Udp)
}

/// The UDP backend id at `addr` and the other one's.
fn udp_ids6(addr: Ipv6Addr) -> (u32, u32) {
    if addr == BACKEND6_1 {
        (BACKEND6_1_ID + 10, BACKEND6_2_ID + 10)
    } else {
        (BACKEND6_2_ID + 10, BACKEND6_1_ID + 10)
    }
}

/// `spec` (1400 bytes of payload) from the client, with the backend link
/// at MTU 1400: packet too big with that MTU goes back.
fn too_big_case6(dp: &mut Datapath, spec: Spec6) -> Case {
    crate::table::set_backend_mtu(1400);
    let want = packet_too_big6_for(&spec, 1400);
    assert_eq!(want.len(), 14 + 1_280, "the error is 1280 bytes");
    Case {
        input: spec.build(),
        ifindex: dp.client_ifindex,
        expect: Expect::Frame(Box::new(move |_| want)),
        after: Some(Box::new(|_| crate::table::set_backend_mtu(1500))),
    }
}

fn too_big_rows() -> Vec<Row> {
    vec![
        Row {
            name: "IPv6 datagram larger than the backend link's MTU: packet too big with that MTU",
            verdict: XDP_TX,
            reason: Reason::RejectFragNeeded,
            case: |dp| {
                let mut spec = udp6(41_700);
                spec.payload = (0..1_400).map(|byte| (byte % 253) as u8).collect();
                too_big_case6(dp, spec)
            },
        },
        Row {
            name: "IPv6 segment of an established flow too big: packet too big",
            verdict: XDP_TX,
            reason: Reason::RejectFragNeeded,
            case: |dp| {
                send_from_client6(dp, &tcp6(41_701, SYN));
                let mut spec = tcp6(41_701, ACK | PSH);
                spec.payload = vec![9; 1_400];
                too_big_case6(dp, spec)
            },
        },
        Row {
            name: "IPv6 packet too big answers are rate-limited per client",
            verdict: XDP_DROP,
            reason: Reason::DropIcmpRateLimited,
            case: |dp| {
                let mut spec = udp6(41_702);
                spec.payload = vec![9; 1_400];
                let mut case = too_big_case6(dp, spec);
                for _ in 0..lb_common::frag::ICMP_LIMIT_BURST {
                    let (verdict, _) = dp.run(&case.input, dp.client_ifindex);
                    assert_eq!(verdict, XDP_TX, "an answer within the burst");
                }
                case.expect = Expect::Dropped;
                case
            },
        },
    ]
}

fn affinity_rows() -> Vec<Row> {
    vec![
        Row {
            name: "IPv6 sessionAffinity ClientIP: a client's new flows all go to one backend",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let first = send_from_client6(dp, &affine6(41_600));
                for sport in 41_601..41_608 {
                    let next = send_from_client6(dp, &affine6(sport));
                    assert_eq!(
                        next.dst, first.dst,
                        "flow from port {sport} left the affine backend"
                    );
                }
                let key = lb_common::AffinityKey6 {
                    service_id: AFFINITY6_SERVICE_ID,
                    client_addr_be: be6(CLIENT6),
                };
                let record = dp.affinity6().get(&key, 0).expect("affinity record");
                assert_eq!(record.backend_addr_be, be6(first.dst));
                assert_eq!(u16::from_be(record.backend_port_be), UDP_TARGET_PORT);
                forward_case(dp, affine6(41_608), true)
            },
        },
        Row {
            name: "IPv6 sessionAffinity: an expired record is not followed",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let first = send_from_client6(dp, &affine6(41_610));
                let (affine, other) = udp_ids6(first.dst);
                // The affine backend leaves the table but stays active: a
                // live record still leads to it...
                dp.retable6(affine, other);
                let again = send_from_client6(dp, &affine6(41_611));
                assert_eq!(again.dst, first.dst, "a live record was not followed");
                // ...one older than the timeout does not.
                let key = lb_common::AffinityKey6 {
                    service_id: AFFINITY6_SERVICE_ID,
                    client_addr_be: be6(CLIENT6),
                };
                let mut record = dp.affinity6().get(&key, 0).expect("affinity record");
                let timeout_ns = u64::from(AFFINITY6_TIMEOUT_S + 1) * 1_000_000_000;
                record.last_seen_ns = monotonic_ns() - timeout_ns;
                dp.affinity6().insert(key, record, 0).expect("aged record");
                let spec = affine6(41_612);
                let flow_key = spec.key();
                let mut case = forward_case(dp, spec, true);
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow6(&flow_key).expect("flow");
                    assert_ne!(
                        flow.new_dst_addr_be,
                        be6(first.dst),
                        "followed an expired record"
                    );
                    let record = dp.affinity6().get(&key, 0).expect("new record");
                    assert_eq!(record.backend_addr_be, flow.new_dst_addr_be);
                }));
                case
            },
        },
        Row {
            name: "IPv6 sessionAffinity: a terminating backend keeps its flow but gets no new one",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                let first_spec = affine6(41_620);
                let first = send_from_client6(dp, &first_spec);
                let (gone, survivor) = udp_ids6(first.dst);
                // The agent takes a terminating endpoint out of the table
                // and flags it; it stays active for its flows.
                dp.retable6(gone, survivor);
                dp.set_terminating6(gone);
                let fresh = send_from_client6(dp, &affine6(41_621));
                assert_ne!(
                    fresh.dst, first.dst,
                    "new flow went to the terminating backend"
                );
                forward_case(dp, first_spec, true)
            },
        },
    ]
}

fn flow_rows() -> Vec<Row> {
    vec![
        Row {
            name: "IPv6 UDP new flow to the NodePort: DNAT + masquerade",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| forward_case(dp, udp6(41_000), true),
        },
        Row {
            name: "IPv6 TCP SYN opens a half-open flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let spec = tcp6(41_001, SYN);
                let key = spec.key();
                Case {
                    after: Some(Box::new(move |dp: &mut Datapath| {
                        assert!(dp.new_flows6().get(&key, 0).is_ok(), "half-open");
                        assert!(dp.flows6().get(&key, 0).is_err(), "not established");
                    })),
                    ..forward_case(dp, spec, true)
                }
            },
        },
        Row {
            name: "IPv6 UDP established: same backend and port",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                let spec = udp6(41_002);
                send_from_client6(dp, &spec);
                forward_case(dp, spec, true)
            },
        },
        Row {
            name: "IPv6 removed backend: the flow's next datagram goes to a live backend",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let first = send_from_client6(dp, &udp6(41_020));
                let (gone, survivor) = if first.dst == BACKEND6_1 {
                    (BACKEND6_1_ID + 10, BACKEND6_2_ID + 10)
                } else {
                    (BACKEND6_2_ID + 10, BACKEND6_1_ID + 10)
                };
                dp.remove_backend6(gone, survivor);
                let spec = udp6(41_020);
                let key = spec.key();
                let mut case = forward_case(dp, spec, true);
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow6(&key).expect("flow");
                    assert_ne!(
                        flow.new_dst_addr_be,
                        be6(first.dst),
                        "still the removed backend"
                    );
                }));
                case
            },
        },
        Row {
            name: "IPv6 SYN on a closed flow's tuple starts a new flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                send_from_client6(dp, &tcp6(41_021, SYN));
                send_from_client6(dp, &tcp6(41_021, RST));
                forward_case(dp, tcp6(41_021, SYN), true)
            },
        },
        Row {
            name: "IPv6 UDP reply: reverse NAT to NODE6:NodePort",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdReply,
            case: |dp| {
                let client = udp6(41_003);
                let at_backend = send_from_client6(dp, &client);
                reply_case(dp, &client, &at_backend, L4::Udp)
            },
        },
        Row {
            name: "IPv6 TCP SYN-ACK from the backend goes back to the client",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdReply,
            case: |dp| {
                let mut client = tcp6(41_004, SYN);
                client.payload.clear();
                let at_backend = send_from_client6(dp, &client);
                reply_case(dp, &client, &at_backend, L4::Tcp(SYN | ACK))
            },
        },
        Row {
            name: "IPv6 TCP client ACK of the SYN-ACK confirms the flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                let mut client = tcp6(41_005, SYN);
                client.payload.clear();
                let at_backend = send_from_client6(dp, &client);
                let mut synack = at_backend.reply(L4::Tcp(SYN | ACK), b"");
                (synack.tcp_seq, synack.tcp_ack) = (5_000, 1_001);
                let (verdict, _) = dp.run(&synack.build(), dp.backend_ifindex);
                assert_eq!(verdict, XDP_REDIRECT, "SYN-ACK not forwarded");
                let mut ack = tcp6(41_005, ACK);
                (ack.tcp_seq, ack.tcp_ack) = (1_001, 5_001);
                let key = ack.key();
                Case {
                    after: confirmed(key),
                    ..forward_case(dp, ack, true)
                }
            },
        },
        Row {
            name: "IPv6 new flow to a backend behind an interface XDP does not run on: \
                   handed to tc (neigh)",
            verdict: XDP_PASS,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                dp.forbid_redirect(dp.backend_ifindex);
                let spec = udp6(41_020);
                let hand_off = Handoff::new(HANDOFF_NEIGH, dp.backend_ifindex);
                Case {
                    expect: Expect::Frame(Box::new(move |dp| handed_over6(dp, &spec, hand_off))),
                    ..forward_case(dp, udp6(41_020), true)
                }
            },
        },
        Row {
            name: "IPv6 new flow to a local pod (XLB_PEERS6, FIB agrees): handed to tc \
                   for bpf_redirect_peer",
            verdict: XDP_PASS,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                dp.forbid_redirect(dp.backend_ifindex);
                for backend in [BACKEND6_1, BACKEND6_2] {
                    let peer = Peer {
                        ifindex: PEER_VETH,
                        route_ifindex: dp.backend_ifindex,
                        dst_mac: [0x0a, 0x58, 0, 0, 0, 0x42],
                        src_mac: [0x0a, 0x58, 0, 0, 0, 0x01],
                    };
                    dp.set_peer6(backend, peer);
                }
                let spec = tcp6(41_021, SYN);
                let hand_off = Handoff::new(HANDOFF_PEER, PEER_VETH);
                Case {
                    expect: Expect::Frame(Box::new(move |dp| handed_over6(dp, &spec, hand_off))),
                    ..forward_case(dp, tcp6(41_021, SYN), true)
                }
            },
        },
        Row {
            name: "IPv6 TCP segment without SYN and no flow passes",
            verdict: XDP_PASS,
            reason: Reason::PassTcpNoFlow,
            case: |dp| unchanged(dp, tcp6(41_006, ACK).build()),
        },
        Row {
            name: "IPv6 UDP without masquerade keeps the client's address",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let spec = Spec6::from_client(41_007, LOCAL_NODE_PORT, L4::Udp);
                forward_case(dp, spec, false)
            },
        },
        Row {
            name: "IPv6 to a port with no service passes",
            verdict: XDP_PASS,
            reason: Reason::PassNotService,
            case: |dp| unchanged(dp, Spec6::from_client(41_008, 30_000, L4::Udp).build()),
        },
        Row {
            name: "IPv6 to another address passes",
            verdict: XDP_PASS,
            reason: Reason::PassNotService,
            case: |dp| {
                let mut spec = udp6(41_009);
                spec.dst = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 9);
                unchanged(dp, spec.build())
            },
        },
        Row {
            name: "IPv6 UDP to a service with no endpoints: ICMPv6 port unreachable sent back",
            verdict: XDP_TX,
            reason: Reason::RejectPortUnreachable,
            case: |dp| {
                let spec = Spec6::from_client(41_010, EMPTY_NODE_PORT, L4::Udp);
                exact(dp, spec.build(), port_unreachable6_for(&spec))
            },
        },
        Row {
            name: "IPv6 port unreachable for a 1400-byte datagram quotes what fits 1280 bytes",
            verdict: XDP_TX,
            reason: Reason::RejectPortUnreachable,
            case: |dp| {
                let mut spec = Spec6::from_client(41_013, EMPTY_NODE_PORT, L4::Udp);
                spec.payload = (0..1_400).map(|byte| (byte % 251) as u8).collect();
                let want = port_unreachable6_for(&spec);
                assert_eq!(want.len(), 14 + 1_280, "the error is 1280 bytes");
                exact(dp, spec.build(), want)
            },
        },
        Row {
            name: "IPv6 port unreachable quotes an odd-length datagram and its extension headers",
            verdict: XDP_TX,
            reason: Reason::RejectPortUnreachable,
            case: |dp| {
                let mut spec = Spec6::from_client(41_014, EMPTY_NODE_PORT, L4::Udp);
                spec.exts = vec![Ext::HopByHop(1), Ext::DestOpts(0)];
                spec.payload = b"odd length!".to_vec();
                exact(dp, spec.build(), port_unreachable6_for(&spec))
            },
        },
        Row {
            name: "IPv6 SYN to a service with no endpoints: RST sent back",
            verdict: XDP_TX,
            reason: Reason::RejectTcpReset,
            case: |dp| {
                let spec = Spec6::from_client(41_011, EMPTY_TCP_NODE_PORT, L4::Tcp(SYN));
                exact(dp, spec.build(), reset6_for(&spec))
            },
        },
        Row {
            name: "IPv6 SYN behind destination options to a service with no endpoints: RST \
                   without them",
            verdict: XDP_TX,
            reason: Reason::RejectTcpReset,
            case: |dp| {
                let mut spec = Spec6::from_client(41_015, EMPTY_TCP_NODE_PORT, L4::Tcp(SYN));
                spec.exts = vec![Ext::DestOpts(1)];
                spec.payload.clear();
                exact(dp, spec.build(), reset6_for(&spec))
            },
        },
        Row {
            name: "IPv6 externalTrafficPolicy=Local with no local backend drops",
            verdict: XDP_DROP,
            reason: Reason::DropNoBackend,
            case: |dp| {
                let spec = Spec6::from_client(41_012, LOCAL_EMPTY_NODE_PORT, L4::Udp);
                Case {
                    expect: Expect::Dropped,
                    ..unchanged(dp, spec.build())
                }
            },
        },
        Row {
            name: "IPv6 hop limit 1 is dropped, not forwarded",
            verdict: XDP_DROP,
            reason: Reason::DropTtlExpired,
            case: |dp| {
                let mut spec = udp6(41_013);
                spec.hop_limit = 1;
                Case {
                    expect: Expect::Dropped,
                    ..unchanged(dp, spec.build())
                }
            },
        },
    ]
}

fn header_rows() -> Vec<Row> {
    vec![
        Row {
            name: "IPv6 hop-by-hop options are walked; the frame keeps them",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| forward_case(dp, with_exts(udp6(41_100), vec![Ext::HopByHop(0)]), true),
        },
        Row {
            name: "IPv6 destination options (16 bytes) are walked",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                forward_case(
                    dp,
                    with_exts(tcp6(41_101, SYN), vec![Ext::DestOpts(1)]),
                    true,
                )
            },
        },
        Row {
            name: "IPv6 routing header with no segments left is walked",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| forward_case(dp, with_exts(udp6(41_102), vec![Ext::Routing(0)]), true),
        },
        Row {
            name: "IPv6 hop-by-hop, destination options, routing, destination options",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let exts = vec![
                    Ext::HopByHop(0),
                    Ext::DestOpts(0),
                    Ext::Routing(0),
                    Ext::DestOpts(2),
                ];
                forward_case(dp, with_exts(udp6(41_103), exts), true)
            },
        },
        Row {
            name: "IPv6 routing header with segments left passes (not the final destination)",
            verdict: XDP_PASS,
            reason: Reason::PassIpv6ExtHeaders,
            case: |dp| unchanged(dp, with_exts(udp6(41_104), vec![Ext::Routing(1)]).build()),
        },
        Row {
            name: "IPv6 a second routing header passes (out of order)",
            verdict: XDP_PASS,
            reason: Reason::PassIpv6ExtHeaders,
            case: |dp| {
                let exts = vec![Ext::Routing(0), Ext::Routing(0)];
                unchanged(dp, with_exts(udp6(41_105), exts).build())
            },
        },
        Row {
            name: "IPv6 hop-by-hop options other than first pass (out of order)",
            verdict: XDP_PASS,
            reason: Reason::PassIpv6ExtHeaders,
            case: |dp| {
                let exts = vec![Ext::DestOpts(0), Ext::HopByHop(0)];
                unchanged(dp, with_exts(udp6(41_111), exts).build())
            },
        },
        Row {
            name: "IPv6 destination options twice before the L4 header pass (out of order)",
            verdict: XDP_PASS,
            reason: Reason::PassIpv6ExtHeaders,
            case: |dp| {
                let exts = vec![Ext::DestOpts(0), Ext::DestOpts(0)];
                unchanged(dp, with_exts(udp6(41_112), exts).build())
            },
        },
        Row {
            name: "IPv6 two fragment headers pass (out of order)",
            verdict: XDP_PASS,
            reason: Reason::PassIpv6ExtHeaders,
            case: |dp| {
                let exts = vec![
                    Ext::Fragment(0, true, 0x1234_5678),
                    Ext::Fragment(0, true, 0x1234_5679),
                ];
                unchanged(dp, with_exts(udp6(41_113), exts).build())
            },
        },
        Row {
            name: "IPv6 first fragment with an extension header after its fragment header passes",
            verdict: XDP_PASS,
            reason: Reason::PassIpv6ExtHeaders,
            case: |dp| {
                let exts = vec![Ext::Fragment(0, true, 0x1234_5678), Ext::DestOpts(0)];
                unchanged(dp, with_exts(udp6(41_115), exts).build())
            },
        },
        Row {
            name: "IPv6 truncated fragment header passes as malformed",
            verdict: XDP_PASS,
            reason: Reason::PassMalformed,
            case: |dp| {
                let exts = vec![Ext::Fragment(4, true, 0x1234_5678)];
                let mut frame = with_exts(udp6(41_114), exts).build();
                // The fixed header and half the fragment header; the
                // payload length says as much.
                frame.truncate(14 + 40 + 4);
                frame[18..20].copy_from_slice(&4u16.to_be_bytes());
                unchanged(dp, frame)
            },
        },
        Row {
            name: "IPv6 NDP neighbour solicitation passes untouched",
            verdict: XDP_PASS,
            reason: Reason::PassNotTcpUdp,
            case: |dp| unchanged(dp, neighbour_solicitation()),
        },
        Row {
            name: "IPv6 payload length beyond the frame passes as malformed",
            verdict: XDP_PASS,
            reason: Reason::PassMalformed,
            case: |dp| {
                let mut frame = udp6(41_108).build();
                frame[18..20].copy_from_slice(&2000u16.to_be_bytes());
                unchanged(dp, frame)
            },
        },
        Row {
            name: "IPv6 extension header longer than the payload passes as malformed",
            verdict: XDP_PASS,
            reason: Reason::PassMalformed,
            case: |dp| {
                let mut frame = with_exts(udp6(41_109), vec![Ext::DestOpts(0)]).build();
                // The header claims 8 + 8 * 200 bytes.
                frame[54 + 1] = 200;
                unchanged(dp, frame)
            },
        },
        Row {
            name: "IPv6 version field other than 6 passes as malformed",
            verdict: XDP_PASS,
            reason: Reason::PassMalformed,
            case: |dp| {
                let mut frame = udp6(41_110).build();
                frame[14] = 0x40;
                unchanged(dp, frame)
            },
        },
    ]
}

/// Every prefix of valid IPv6 UDP and TCP frames, with and without
/// extension headers, that cuts a header or the payload short.
pub fn truncations() -> Vec<(String, Vec<u8>)> {
    let mut frames = Vec::new();
    for (what, frame) in [
        ("IPv6 UDP", udp6(41_200).build()),
        ("IPv6 TCP SYN", tcp6(41_201, SYN).build()),
        (
            "IPv6 UDP behind hop-by-hop and routing",
            with_exts(udp6(41_202), vec![Ext::HopByHop(1), Ext::Routing(0)]).build(),
        ),
        (
            "IPv6 UDP first fragment",
            with_exts(udp6(41_203), vec![Ext::Fragment(0, true, 7)]).build(),
        ),
        (
            "ICMPv6 port unreachable quoting a datagram",
            icmp6_error(
                (CLIENT_MAC, NODE_MAC),
                (CLIENT6, NODE6),
                64,
                port_unreachable6(),
                &quote6(&udp6(41_204).build(), None),
            ),
        ),
    ] {
        for len in 14..frame.len() {
            frames.push((format!("{what} cut to {len} bytes"), frame[..len].to_vec()));
        }
    }
    frames
}

/// A router on the backend link (2001:db8:1::fe).
const ROUTER6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xfe);

/// `from` (a router on the backend link, or the backend itself) answering
/// `packet` (as it left the node) with `kind`, sent to the node's
/// masquerade address.
fn backend_side_error(from: Ipv6Addr, packet: &Spec6, kind: Icmpv6Type, quoted: &[u8]) -> Vec<u8> {
    icmp6_error(
        (packet.eth_dst, NODE_B_MAC),
        (from, packet.src),
        64,
        kind,
        quoted,
    )
}

/// `client`'s flow is set up; `from` on the backend side answers the
/// forwarded packet with `kind` quoting `l4_bytes` of it. The client must
/// get it from `NODE6`, quoting its own packet as it sent it (with the hop
/// limit it had when `from` saw it), ICMPv6 checksum over the new
/// addresses.
fn icmp6_to_client_case(
    dp: &mut Datapath,
    from: Option<Ipv6Addr>,
    client: Spec6,
    kind: Icmpv6Type,
    l4_bytes: Option<usize>,
) -> Case {
    let at_backend = send_from_client6(dp, &client);
    let from = from.unwrap_or(at_backend.dst);
    let quoted = quote6(&at_backend.build(), l4_bytes);
    let input = backend_side_error(from, &at_backend, kind, &quoted);
    let as_client_sent = Spec6 {
        src: client.src,
        sport: client.sport,
        dst: client.dst,
        dport: client.dport,
        ..at_backend.clone()
    };
    let want = icmp6_error(
        (NODE_MAC, CLIENT_MAC),
        (client.dst, client.src),
        63,
        kind,
        &quote6(&as_client_sent.build(), l4_bytes),
    );
    Case {
        input,
        ifindex: dp.backend_ifindex,
        expect: Expect::Frame(Box::new(move |_| want)),
        after: None,
    }
}

/// `client`'s flow is set up and the backend's reply reached the client,
/// which answers it with `kind`. The backend must get it from the node's
/// masquerade address, quoting its reply as it sent it.
fn icmp6_to_backend_case(
    dp: &mut Datapath,
    client: Spec6,
    kind: Icmpv6Type,
    l4_bytes: Option<usize>,
) -> Case {
    let at_backend = send_from_client6(dp, &client);
    let reply_l4 = match client.l4 {
        L4::Udp => L4::Udp,
        L4::Tcp(_) => L4::Tcp(SYN | ACK),
    };
    let reply = at_backend.reply(reply_l4, b"echo6");
    let at_client = reply.forwarded(
        (NODE_MAC, CLIENT_MAC),
        (NODE6, client.dport),
        (CLIENT6, client.sport),
    );
    let input = icmp6_error(
        (CLIENT_MAC, NODE_MAC),
        (CLIENT6, NODE6),
        64,
        kind,
        &quote6(&at_client.build(), l4_bytes),
    );
    let as_backend_sent = Spec6 {
        src: reply.src,
        sport: reply.sport,
        dst: reply.dst,
        dport: reply.dport,
        ..at_client.clone()
    };
    let want = icmp6_error(
        (NODE_B_MAC, backend6_mac(reply.src)),
        (reply.dst, reply.src),
        63,
        kind,
        &quote6(&as_backend_sent.build(), l4_bytes),
    );
    Case {
        input,
        ifindex: dp.client_ifindex,
        expect: Expect::Frame(Box::new(move |_| want)),
        after: None,
    }
}

/// An ICMPv6 error from the backend side that must pass untouched.
fn backend_side_unchanged(dp: &Datapath, input: Vec<u8>) -> Case {
    Case {
        input,
        ifindex: dp.backend_ifindex,
        expect: Expect::Unchanged,
        after: None,
    }
}

fn icmp_rows() -> Vec<Row> {
    let mut rows = icmp_to_client_rows();
    rows.extend(icmp_other_rows());
    rows
}

fn icmp_to_client_rows() -> Vec<Row> {
    vec![
        Row {
            name: "IPv6 backend's port unreachable reaches the client from NODE6:NodePort",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| icmp6_to_client_case(dp, None, udp6(41_300), port_unreachable6(), None),
        },
        Row {
            name: "IPv6 packet too big from a router behind the node about a client's \
                   datagram reaches the client, quote as the client sent it",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| {
                let mut client = udp6(41_301);
                client.payload = vec![7; 1_300];
                let from = Some(ROUTER6_B);
                icmp6_to_client_case(dp, from, client, too_big6(1_280), Some(1_184))
            },
        },
        Row {
            name: "IPv6 packet too big quoting a whole TCP segment: quoted TCP checksum kept \
                   consistent",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| {
                let mut client = tcp6(41_302, SYN);
                client.payload.clear();
                let segment = tcp6(41_302, ACK | PSH);
                send_from_client6(dp, &client);
                icmp6_to_client_case(dp, Some(ROUTER6_B), segment, too_big6(1_400), None)
            },
        },
        Row {
            name: "IPv6 packet too big quoting 8 bytes of TCP (no checksum in the quote)",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| {
                let client = tcp6(41_303, SYN);
                icmp6_to_client_case(dp, Some(ROUTER6_B), client, too_big6(1_400), Some(8))
            },
        },
        Row {
            name: "IPv6 time exceeded behind the node reaches the client",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| {
                let client = udp6(41_304);
                icmp6_to_client_case(dp, Some(ROUTER6_B), client, hop_limit_exceeded6(), None)
            },
        },
        Row {
            name: "IPv6 parameter problem from the backend reaches the client",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| icmp6_to_client_case(dp, None, udp6(41_305), parameter_problem6(6), None),
        },
    ]
}

fn icmp_other_rows() -> Vec<Row> {
    vec![
        Row {
            name: "IPv6 client's port unreachable about a reply reaches the backend, quote \
                   translated",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToBackend,
            case: |dp| icmp6_to_backend_case(dp, udp6(41_310), port_unreachable6(), None),
        },
        Row {
            name: "IPv6 packet too big on the client side about a reply reaches the backend",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToBackend,
            case: |dp| icmp6_to_backend_case(dp, tcp6(41_311, SYN), too_big6(1_280), None),
        },
        Row {
            name: "IPv6 ICMPv6 error with hop limit 1 is dropped, not forwarded with 0",
            verdict: XDP_DROP,
            reason: Reason::DropTtlExpired,
            case: |dp| {
                let client = udp6(41_312);
                let mut case =
                    icmp6_to_client_case(dp, Some(ROUTER6_B), client, too_big6(1_280), None);
                case.input[14 + 7] = 1;
                case.expect = Expect::Dropped;
                case
            },
        },
        Row {
            name: "IPv6 truncated ICMPv6 error (quote shorter than IPv6 header + 8) passes as \
                   malformed",
            verdict: XDP_PASS,
            reason: Reason::PassMalformed,
            case: |dp| {
                let at_backend = send_from_client6(dp, &udp6(41_313));
                let quoted = quote6(&at_backend.build(), Some(4));
                let input = backend_side_error(ROUTER6_B, &at_backend, too_big6(1_280), &quoted);
                backend_side_unchanged(dp, input)
            },
        },
        Row {
            name: "IPv6 ICMPv6 error quoting no flow passes to the kernel",
            verdict: XDP_PASS,
            reason: Reason::PassIcmpNoFlow,
            case: |dp| {
                let mut stray = Spec6::from_client(61_000, UDP_TARGET_PORT, L4::Udp);
                stray.src = NODE6_B;
                stray.dst = BACKEND6_1;
                stray.eth_dst = BACKEND_1_MAC;
                let quoted = quote6(&stray.build(), None);
                let input = backend_side_error(BACKEND6_1, &stray, port_unreachable6(), &quoted);
                backend_side_unchanged(dp, input)
            },
        },
        Row {
            name: "IPv6 ICMPv6 error quoting an ICMPv6 packet passes to the kernel",
            verdict: XDP_PASS,
            reason: Reason::PassIcmpNoFlow,
            case: |dp| {
                let quoted = quote6(&echo_request6(), None);
                let input = icmp6_error(
                    (CLIENT_MAC, NODE_MAC),
                    (CLIENT6, NODE6),
                    64,
                    port_unreachable6(),
                    &quoted,
                );
                unchanged(dp, input)
            },
        },
        Row {
            name: "IPv6 ICMPv6 echo request passes untouched",
            verdict: XDP_PASS,
            reason: Reason::PassNotTcpUdp,
            case: |dp| unchanged(dp, echo_request6()),
        },
    ]
}

/// Where the fragment rows cut their datagram's UDP header and payload:
/// three fragments (offsets are 8-byte multiples).
const FRAGMENT6_CUTS: [usize; 2] = [24, 48];

/// A UDP datagram to the IPv6 NodePort long enough for `FRAGMENT6_CUTS`.
fn big_udp6(sport: u16) -> Spec6 {
    let mut spec = udp6(sport);
    spec.payload = (0..64).collect();
    spec
}

/// The fragment header's identification of the rows' datagrams.
const FRAG_ID: u32 = 0x5eed_f00d;

/// Fragment `index` of `spec` from the client, its earlier fragments sent
/// first: it must leave as the same fragment of the datagram as the
/// backend gets it whole (DNAT and masquerade; the IPv6 header rewritten,
/// the extension and fragment headers kept, the L4 checksum the first
/// fragment's of the whole).
fn fragment6_case(dp: &mut Datapath, spec: Spec6, index: usize) -> Case {
    let pieces = fragments6(&spec, &FRAGMENT6_CUTS, FRAG_ID);
    for piece in &pieces[..index] {
        let (verdict, _) = dp.run(piece, dp.client_ifindex);
        assert_eq!(
            verdict, XDP_REDIRECT,
            "an earlier fragment was not forwarded"
        );
    }
    let key = spec.key();
    let after: Option<crate::table::AfterCheck> = Some(Box::new(move |dp: &mut Datapath| {
        let ports = dp.frag6_ports(CLIENT6, NODE6, FRAG_ID, key.proto);
        assert_eq!(
            ports,
            Some((u16::from_be(key.src_port_be), UDP_NODE_PORT)),
            "the first fragment's ports are remembered"
        );
    }));
    Case {
        input: pieces[index].clone(),
        ifindex: dp.client_ifindex,
        expect: Expect::Frame(Box::new(move |dp: &mut Datapath| {
            let flow = dp
                .flow6(&spec.key())
                .expect("conntrack has the datagram's flow");
            let backend = Ipv6Addr::from(lb_common::family::octets6(flow.new_dst_addr_be));
            let sport = u16::from_be(flow.new_src_port_be);
            let eth = (NODE_B_MAC, backend6_mac(backend));
            let forwarded = spec.forwarded(eth, (NODE6_B, sport), (backend, UDP_TARGET_PORT));
            fragments6(&forwarded, &FRAGMENT6_CUTS, FRAG_ID)[index].clone()
        })),
        after,
    }
}

fn fragment_rows() -> Vec<Row> {
    vec![
        Row {
            name: "IPv6 first fragment of a UDP datagram is balanced like the datagram, its ports remembered",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| fragment6_case(dp, big_udp6(41_200), 0),
        },
        Row {
            name: "IPv6 middle fragment follows its first fragment's flow (DNAT, masquerade, fragment header kept)",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdFragment,
            case: |dp| fragment6_case(dp, big_udp6(41_201), 1),
        },
        Row {
            name: "IPv6 last fragment follows its first fragment's flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdFragment,
            case: |dp| fragment6_case(dp, big_udp6(41_202), 2),
        },
        Row {
            name: "IPv6 later fragment behind hop-by-hop options follows its first fragment's flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdFragment,
            case: |dp| {
                let spec = with_exts(big_udp6(41_203), vec![Ext::HopByHop(0)]);
                fragment6_case(dp, spec, 2)
            },
        },
        Row {
            name: "IPv6 later fragment of an unknown datagram (or before its first) passes",
            verdict: XDP_PASS,
            reason: Reason::PassFragmentUnknown,
            case: |dp| {
                let pieces = fragments6(&big_udp6(41_204), &FRAGMENT6_CUTS, 0x0bad_f00d);
                unchanged(dp, pieces[1].clone())
            },
        },
        Row {
            name: "IPv6 later fragment behind hop-by-hop options of an unknown datagram passes",
            verdict: XDP_PASS,
            reason: Reason::PassFragmentUnknown,
            case: |dp| {
                let spec = with_exts(big_udp6(41_205), vec![Ext::HopByHop(0)]);
                let pieces = fragments6(&spec, &FRAGMENT6_CUTS, 0x0bad_f00e);
                unchanged(dp, pieces[2].clone())
            },
        },
        Row {
            name: "IPv6 atomic fragment (offset 0, no more) is balanced as a whole datagram",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let spec = with_exts(udp6(41_206), vec![Ext::Fragment(0, false, 0x0a70_0001)]);
                let case = forward_case(dp, spec.clone(), true);
                Case {
                    after: Some(Box::new(move |dp: &mut Datapath| {
                        let ports = dp.frag6_ports(CLIENT6, NODE6, 0x0a70_0001, spec.proto());
                        assert_eq!(ports, None, "an atomic fragment is no datagram's first");
                    })),
                    ..case
                }
            },
        },
        Row {
            name: "IPv6 later fragment of a backend's reply follows the flow back to the client",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdFragment,
            case: |dp| {
                let client = udp6(41_207);
                let at_backend = send_from_client6(dp, &client);
                let reply = at_backend.reply(L4::Udp, &[7u8; 64]);
                let pieces = fragments6(&reply, &FRAGMENT6_CUTS, FRAG_ID);
                let (verdict, _) = dp.run(&pieces[0], dp.backend_ifindex);
                assert_eq!(verdict, XDP_REDIRECT, "first fragment of the reply");
                let to_client = reply.forwarded(
                    (NODE_MAC, CLIENT_MAC),
                    (NODE6, client.dport),
                    (CLIENT6, client.sport),
                );
                let want = fragments6(&to_client, &FRAGMENT6_CUTS, FRAG_ID)[2].clone();
                Case {
                    input: pieces[2].clone(),
                    ifindex: dp.backend_ifindex,
                    expect: Expect::Frame(Box::new(move |_| want)),
                    after: None,
                }
            },
        },
        Row {
            name: "IPv6 later fragment of an ICMPv6 message passes untouched",
            verdict: XDP_PASS,
            reason: Reason::PassNotTcpUdp,
            case: |dp| {
                let mut frame = fragments6(&big_udp6(41_208), &FRAGMENT6_CUTS, FRAG_ID)[1].clone();
                // The fragment header's next header: ICMPv6.
                frame[14 + 40] = 58;
                unchanged(dp, frame)
            },
        },
    ]
}
