//! The fixture table, in the style of Katran's tester: each row names the
//! state it needs, the frame that goes in, the verdict and counter expected,
//! and the frame expected out.

use lb_common::{
    Flow, FlowKey, Peer, Reason,
    flow::{
        FLOW_DIR_ORIGINAL, FLOW_DIR_REPLY, FLOW_S_CONFIRMED, FLOW_S_FIN_ORIGINAL, FLOW_S_FIN_REPLY,
        FLOW_S_RST, FLOW_S_SEEN_REPLY,
    },
    path::{HANDOFF_NEIGH, HANDOFF_PEER, Handoff},
};

use xlb_tests::{packets::*, testrun::*};

/// Builds the expected frame after the program ran.
pub type BuildFrame = Box<dyn FnOnce(&mut Datapath) -> Vec<u8>>;
/// Checks the maps after the program ran.
pub type AfterCheck = Box<dyn FnOnce(&mut Datapath)>;

pub enum Expect {
    /// XDP_PASS with the frame byte-identical.
    Unchanged,
    /// XDP_DROP; the output is not looked at.
    Dropped,
    /// Forwarded; the closure builds the expected frame once the program
    /// has run (new flows need the masquerade port from conntrack).
    Frame(BuildFrame),
}

pub struct Case {
    pub input: Vec<u8>,
    pub ifindex: u32,
    pub expect: Expect,
    /// Extra checks on the maps after the run.
    pub after: Option<AfterCheck>,
}

pub struct Row {
    pub name: &'static str,
    pub verdict: u32,
    pub reason: Reason,
    /// Sets up the state (may send earlier frames) and returns the case.
    pub case: fn(&mut Datapath) -> Case,
}

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

fn dropped(dp: &Datapath, frame: Vec<u8>) -> Case {
    Case {
        input: frame,
        ifindex: dp.client_ifindex,
        expect: Expect::Dropped,
        after: None,
    }
}

fn backend_mac(addr: std::net::Ipv4Addr) -> [u8; 6] {
    match addr {
        BACKEND_1 => BACKEND_1_MAC,
        BACKEND_2 => BACKEND_2_MAC,
        other => panic!("{other} is not a backend of the base state"),
    }
}

fn target_port(spec: &Spec) -> u16 {
    match spec.l4 {
        L4::Udp => UDP_TARGET_PORT,
        L4::Tcp(_) => TCP_TARGET_PORT,
    }
}

/// The frame `spec` becomes on its way to the backend conntrack recorded for
/// it: masqueraded to the backend-side node address and a port in range.
fn to_backend(dp: &mut Datapath, spec: &Spec) -> Vec<u8> {
    let flow = dp
        .flow(&spec.key())
        .expect("conntrack has the client's flow");
    let backend = std::net::Ipv4Addr::from(flow.new_dst_addr_be.to_ne_bytes());
    let snat_port = u16::from_be(flow.new_src_port_be);
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&snat_port),
        "masquerade port {snat_port} outside {SNAT_MIN}-{SNAT_MAX}"
    );
    spec.forwarded(
        NODE_B_MAC,
        backend_mac(backend),
        NODE_B,
        snat_port,
        backend,
        target_port(spec),
    )
    .build()
}

/// What a new flow to a backend behind an interface XDP does not run on
/// leaves as: rewritten like `to_backend`, with the hand-off (mark, kind
/// neigh, then the egress ifindex in host order) written over its first 8
/// bytes, the Ethernet destination and the start of the source (tc's
/// `bpf_redirect_neigh` writes real MACs).
fn handed_to_tc(dp: &mut Datapath, spec: &Spec) -> Vec<u8> {
    let hand_off = Handoff::new(HANDOFF_NEIGH, dp.backend_ifindex);
    handed_over(dp, spec, hand_off)
}

/// A local pod's veth in `XLB_PEERS` rows (any index: tc is not run).
const PEER_VETH: u32 = 4242;
const POD_MAC: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 0x42];
const GATEWAY_MAC: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 0x01];

/// Both backends as local pods behind `PEER_VETH`, routed through `route`.
fn backends_are_peers(dp: &mut Datapath, route: u32) {
    for backend in [BACKEND_1, BACKEND_2] {
        let peer = Peer {
            ifindex: PEER_VETH,
            route_ifindex: route,
            dst_mac: POD_MAC,
            src_mac: GATEWAY_MAC,
        };
        dp.set_peer(backend, peer);
    }
}

/// As `handed_to_tc`, for a local pod: the hand-off to tc's
/// `bpf_redirect_peer` into `PEER_VETH`'s peer (tc writes the pod's MACs).
fn handed_to_peer(dp: &mut Datapath, spec: &Spec) -> Vec<u8> {
    handed_over(dp, spec, Handoff::new(HANDOFF_PEER, PEER_VETH))
}

fn handed_over(dp: &mut Datapath, spec: &Spec, hand_off: Handoff) -> Vec<u8> {
    let flow = dp
        .flow(&spec.key())
        .expect("conntrack has the client's flow");
    let backend = std::net::Ipv4Addr::from(flow.new_dst_addr_be.to_ne_bytes());
    let mut out = spec
        .forwarded(
            spec.eth_src,
            spec.eth_dst,
            NODE_B,
            u16::from_be(flow.new_src_port_be),
            backend,
            target_port(spec),
        )
        .build();
    out[..3].copy_from_slice(&hand_off.mark);
    out[3] = hand_off.kind;
    out[4..8].copy_from_slice(&hand_off.ifindex.to_ne_bytes());
    out
}

fn expect_to_backend(spec: Spec) -> Expect {
    Expect::Frame(Box::new(move |dp| to_backend(dp, &spec)))
}

fn forward_case(dp: &Datapath, spec: Spec) -> Case {
    Case {
        input: spec.build(),
        ifindex: dp.client_ifindex,
        expect: expect_to_backend(spec),
        after: None,
    }
}

/// Sends `spec` from the client and returns the frame as the backend got it.
pub fn send_from_client(dp: &mut Datapath, spec: &Spec) -> Spec {
    let (verdict, out) = dp.run(&spec.build(), dp.client_ifindex);
    assert_eq!(
        verdict, XDP_REDIRECT,
        "setup frame {spec:?} was not forwarded"
    );
    let (src, sport, dst, dport) = tuple_of(&out).expect("forwarded frame parses");
    Spec {
        eth_src: NODE_B_MAC,
        eth_dst: backend_mac(dst),
        src,
        sport,
        dst,
        dport,
        ttl: spec.ttl - 1,
        ..spec.clone()
    }
}

/// The backend's reply to `at_backend`, and the case expecting it to reach
/// the client from node-ip:NodePort.
fn reply_case(dp: &mut Datapath, client: &Spec, at_backend: &Spec, l4: L4) -> Case {
    let reply = at_backend.reply(l4, b"echo");
    let client_port = client.sport;
    let node_port = client.dport;
    let to_client = reply.forwarded(NODE_MAC, CLIENT_MAC, NODE, node_port, CLIENT, client_port);
    Case {
        input: reply.build(),
        ifindex: dp.backend_ifindex,
        expect: Expect::Frame(Box::new(move |_| to_client.build())),
        after: None,
    }
}

fn state_has(bits: u8, spec: Spec) -> Option<AfterCheck> {
    Some(Box::new(move |dp: &mut Datapath| {
        let flow = dp.flow(&spec.key()).expect("flow");
        assert_eq!(flow.state & bits, bits, "flow state {:#x}", flow.state);
        let peer = lb_common::FlowKey::peer_of(&flow, spec.proto());
        let reply = dp.flow(&peer).expect("reply entry");
        assert_eq!(
            reply.state & bits,
            bits,
            "reply entry state {:#x}",
            reply.state
        );
    }))
}

/// The backend's initial sequence number in `handshake`.
const SYNACK_SEQ: u32 = 5_000;

/// SYN (seq 1000) from the client and the backend's SYN-ACK (seq
/// `SYNACK_SEQ`, ack 1001), both forwarded; returns the client's SYN.
fn handshake(dp: &mut Datapath, sport: u16) -> Spec {
    let mut client = tcp(sport, SYN);
    client.payload.clear();
    let at_backend = send_from_client(dp, &client);
    let mut synack = at_backend.reply(L4::Tcp(SYN | ACK), b"");
    (synack.tcp_seq, synack.tcp_ack) = (SYNACK_SEQ, 1_001);
    let (verdict, _) = dp.run(&synack.build(), dp.backend_ifindex);
    assert_eq!(verdict, XDP_REDIRECT, "SYN-ACK not forwarded");
    client
}

/// `handshake` and the client's ACK (seq 1001, 9 bytes: it has sent up to
/// 1010): an established flow in XLB_FLOWS.
fn established(dp: &mut Datapath, sport: u16) -> Spec {
    let client = handshake(dp, sport);
    let mut ack = tcp(sport, ACK);
    (ack.tcp_seq, ack.tcp_ack) = (1_001, SYNACK_SEQ + 1);
    send_from_client(dp, &ack);
    assert!(dp.flows().get(&client.key(), 0).is_ok(), "not established");
    client
}

/// Sets the creation and last-packet times of both entries of `key`'s flow.
fn age_flow(dp: &mut Datapath, key: &FlowKey, created_ns: u64, last_seen_ns: u64) {
    let flow = dp.flow(key).expect("flow");
    let peer = FlowKey::peer_of(&flow, key.proto);
    for name in [lb_common::maps::FLOWS, lb_common::maps::FLOWS_NEW] {
        for entry_key in [*key, peer] {
            let mut table = if name == lb_common::maps::FLOWS {
                dp.flows()
            } else {
                dp.new_flows()
            };
            if let Ok(mut entry) = table.get(&entry_key, 0) {
                entry.created_ns = created_ns;
                entry.last_seen_ns = last_seen_ns;
                table.insert(entry_key, entry, 0).expect("rewrite entry");
            }
        }
    }
}

/// The masquerade port conntrack tries first for `spec` (the contract's
/// flow hash under the base config's secret).
fn first_masquerade_port(spec: &Spec) -> u16 {
    let cfg = Datapath::base_config();
    let span = u32::from(SNAT_MAX - SNAT_MIN) + 1;
    let hash = lb_common::hash::flow_hash(&spec.key(), cfg.hash_key().derived(0x9e37_79b9));
    // Try 0's position (lb-ebpf/src/conntrack.rs take_port).
    let mixed = hash.wrapping_mul(0x85eb_ca6b);
    SNAT_MIN + ((mixed ^ (mixed >> 15)) % span) as u16
}

/// A live UDP flow of another client (198.18.0.77, port 900 + the
/// backend's last octet) masqueraded to NODE_B:`port` towards `backend`:
/// (ORIGINAL key and entry, REPLY key and entry).
fn foreign_pair(backend: std::net::Ipv4Addr, port: u16) -> ((FlowKey, Flow), (FlowKey, Flow)) {
    let other = std::net::Ipv4Addr::new(198, 18, 0, 77);
    let now = monotonic_ns();
    let key = lb_common::FlowKey {
        src_addr_be: be(other),
        dst_addr_be: be(NODE),
        src_port_be: (900 + u16::from(backend.octets()[3])).to_be(),
        dst_port_be: UDP_NODE_PORT.to_be(),
        proto: IPPROTO_UDP,
        _pad: [0; 3],
    };
    let original = Flow {
        new_src_addr_be: be(NODE_B),
        new_dst_addr_be: be(backend),
        new_src_port_be: port.to_be(),
        new_dst_port_be: UDP_TARGET_PORT.to_be(),
        backend_id: 11,
        service_id: 2,
        direction: FLOW_DIR_ORIGINAL,
        state: FLOW_S_CONFIRMED | FLOW_S_SEEN_REPLY,
        last_seen_ns: now,
        created_ns: now,
        ..Flow::default()
    };
    let reply = Flow {
        new_src_addr_be: key.dst_addr_be,
        new_dst_addr_be: key.src_addr_be,
        new_src_port_be: key.dst_port_be,
        new_dst_port_be: key.src_port_be,
        direction: FLOW_DIR_REPLY,
        ..original
    };
    let reply_key = FlowKey::peer_of(&original, IPPROTO_UDP);
    ((key, original), (reply_key, reply))
}

fn udp(sport: u16) -> Spec {
    Spec::from_client(sport, UDP_NODE_PORT, L4::Udp)
}

fn tcp(sport: u16, flags: u8) -> Spec {
    Spec::from_client(sport, TCP_NODE_PORT, L4::Tcp(flags))
}

pub fn rows() -> Vec<Row> {
    vec![
        Row {
            name: "UDP new flow: backend chosen, DNAT + masquerade + port rewrite",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| forward_case(dp, udp(40_001)),
        },
        Row {
            name: "new flow to a local pod (XLB_PEERS, FIB agrees): rewritten, addressed to \
                   the pod, handed to tc for bpf_redirect_peer, XDP_PASS",
            verdict: XDP_PASS,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                dp.forbid_redirect(dp.backend_ifindex);
                backends_are_peers(dp, dp.backend_ifindex);
                let spec = udp(40_051);
                Case {
                    input: spec.build(),
                    ifindex: dp.client_ifindex,
                    expect: Expect::Frame(Box::new(move |dp| handed_to_peer(dp, &spec))),
                    after: None,
                }
            },
        },
        Row {
            name: "new flow to a local pod the FIB routes elsewhere: the neigh hand-off, \
                   as for any pod not in XLB_PEERS",
            verdict: XDP_PASS,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                dp.forbid_redirect(dp.backend_ifindex);
                backends_are_peers(dp, dp.backend_ifindex + 100);
                let spec = udp(40_052);
                Case {
                    input: spec.build(),
                    ifindex: dp.client_ifindex,
                    expect: Expect::Frame(Box::new(move |dp| handed_to_tc(dp, &spec))),
                    after: None,
                }
            },
        },
        Row {
            name: "a local pod in XLB_PEERS behind an XDP interface: XDP_REDIRECT, as before",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                backends_are_peers(dp, dp.backend_ifindex);
                forward_case(dp, udp(40_053))
            },
        },
        Row {
            name: "new flow to a backend behind an interface XDP does not run on: rewritten, \
                   handed to tc over its MACs, XDP_PASS",
            verdict: XDP_PASS,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                dp.forbid_redirect(dp.backend_ifindex);
                let spec = udp(40_050);
                Case {
                    input: spec.build(),
                    ifindex: dp.client_ifindex,
                    expect: Expect::Frame(Box::new(move |dp| handed_to_tc(dp, &spec))),
                    after: None,
                }
            },
        },
        Row {
            name: "TCP SYN new flow: DNAT + masquerade + port rewrite",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| forward_case(dp, tcp(40_002, SYN)),
        },
        Row {
            name: "UDP established flow follows conntrack",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                send_from_client(dp, &udp(40_003));
                let mut second = udp(40_003);
                second.payload = b"second datagram, longer than the first".to_vec();
                forward_case(dp, second)
            },
        },
        Row {
            name: "TCP established segment follows conntrack",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                send_from_client(dp, &tcp(40_004, SYN));
                forward_case(dp, tcp(40_004, ACK | PSH))
            },
        },
        Row {
            name: "UDP reply reverse-NATed to node-ip:NodePort",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdReply,
            case: |dp| {
                let client = udp(40_005);
                let at_backend = send_from_client(dp, &client);
                reply_case(dp, &client, &at_backend, L4::Udp)
            },
        },
        Row {
            name: "service and backend counters count forwarded frames both ways",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdReply,
            case: |dp| {
                let client = udp(40_060);
                let before = dp.traffic(lb_common::maps::SERVICE_STATS, 2);
                let at_backend = send_from_client(dp, &client);
                let mut case = reply_case(dp, &client, &at_backend, L4::Udp);
                let (request_len, reply_len) =
                    (client.build().len() as u64, case.input.len() as u64);
                let backend_id = if at_backend.dst == BACKEND_1 {
                    BACKEND_1_ID
                } else {
                    BACKEND_2_ID
                } + 10;
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let after = dp.traffic(lb_common::maps::SERVICE_STATS, 2);
                    assert_eq!(after.to_backend_packets - before.to_backend_packets, 1);
                    assert_eq!(
                        after.to_backend_bytes - before.to_backend_bytes,
                        request_len
                    );
                    assert_eq!(after.to_client_packets - before.to_client_packets, 1);
                    assert_eq!(after.to_client_bytes - before.to_client_bytes, reply_len);
                    let backend = dp.traffic(lb_common::maps::BACKEND_STATS, backend_id);
                    assert!(backend.to_backend_packets >= 1 && backend.to_client_packets >= 1);
                }));
                case
            },
        },
        Row {
            name: "TCP SYN-ACK reverse-NATed to node-ip:NodePort",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdReply,
            case: |dp| {
                let client = tcp(40_006, SYN);
                let at_backend = send_from_client(dp, &client);
                reply_case(dp, &client, &at_backend, L4::Tcp(SYN | ACK))
            },
        },
        Row {
            name: "TCP FIN from the client is forwarded and recorded in both entries",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                send_from_client(dp, &tcp(40_007, SYN));
                let mut case = forward_case(dp, tcp(40_007, FIN | ACK));
                case.after = state_has(FLOW_S_FIN_ORIGINAL, tcp(40_007, SYN));
                case
            },
        },
        Row {
            name: "TCP FIN both ways: the flow ages out on the closing timeout",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdReply,
            case: |dp| {
                let client = tcp(40_008, SYN);
                let at_backend = send_from_client(dp, &client);
                send_from_client(dp, &tcp(40_008, FIN | ACK));
                let mut case = reply_case(dp, &client, &at_backend, L4::Tcp(FIN | ACK));
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow(&client.key()).expect("flow");
                    assert_eq!(flow.state & FLOW_S_FIN_REPLY, FLOW_S_FIN_REPLY);
                    let cfg = Datapath::base_config();
                    assert_eq!(flow.timeout_s(IPPROTO_TCP, &cfg), cfg.tcp_closing_timeout_s);
                }));
                case
            },
        },
        Row {
            name: "TCP RST is forwarded and closes the flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                send_from_client(dp, &tcp(40_009, SYN));
                let mut case = forward_case(dp, tcp(40_009, RST));
                case.after = state_has(FLOW_S_RST, tcp(40_009, SYN));
                case
            },
        },
        Row {
            name: "SYN on a closed flow's tuple starts a new flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                send_from_client(dp, &tcp(40_010, SYN));
                send_from_client(dp, &tcp(40_010, RST));
                forward_case(dp, tcp(40_010, SYN))
            },
        },
        Row {
            name: "removed backend: the flow's next datagram goes to a live backend",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let first = send_from_client(dp, &udp(40_011));
                let (gone, survivor) = if first.dst == BACKEND_1 {
                    (BACKEND_1_ID + 10, BACKEND_2_ID + 10)
                } else {
                    (BACKEND_2_ID + 10, BACKEND_1_ID + 10)
                };
                dp.remove_backend(gone, survivor);
                let spec = udp(40_011);
                let mut case = forward_case(dp, spec.clone());
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow(&spec.key()).expect("flow");
                    assert_ne!(
                        flow.new_dst_addr_be,
                        be(first.dst),
                        "still the removed backend"
                    );
                }));
                case
            },
        },
        Row {
            name: "IPv4 options (IHL 6) are kept and the flow balanced",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let mut spec = udp(40_012);
                spec.ip_options = vec![1, 1, 1, 0];
                forward_case(dp, spec)
            },
        },
        Row {
            name: "UDP checksum 0 (none) stays 0",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let mut spec = udp(40_013);
                spec.udp_no_checksum = true;
                forward_case(dp, spec)
            },
        },
        Row {
            name: "TTL 2 leaves with TTL 1",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let mut spec = udp(40_014);
                spec.ttl = 2;
                forward_case(dp, spec)
            },
        },
        Row {
            name: "TTL 1 is dropped, not forwarded with TTL 0",
            verdict: XDP_DROP,
            reason: Reason::DropTtlExpired,
            case: |dp| {
                let mut spec = udp(40_015);
                spec.ttl = 1;
                dropped(dp, spec.build())
            },
        },
        Row {
            name: "UDP to a service with no endpoints: ICMP port unreachable sent back",
            verdict: XDP_TX,
            reason: Reason::RejectPortUnreachable,
            case: |dp| {
                let spec = Spec::from_client(40_016, EMPTY_NODE_PORT, L4::Udp);
                let want = port_unreachable_for(&spec);
                exact(dp, spec.build(), want)
            },
        },
        Row {
            name: "SYN to a service with no endpoints: RST sent back",
            verdict: XDP_TX,
            reason: Reason::RejectTcpReset,
            case: |dp| {
                let spec = Spec::from_client(40_030, EMPTY_TCP_NODE_PORT, L4::Tcp(SYN));
                let want = reset_for(&spec);
                exact(dp, spec.build(), want)
            },
        },
        Row {
            name: "externalTrafficPolicy=Local with no local endpoint drops silently",
            verdict: XDP_DROP,
            reason: Reason::DropNoBackend,
            case: |dp| {
                let spec = Spec::from_client(40_031, LOCAL_EMPTY_NODE_PORT, L4::Udp);
                dropped(dp, spec.build())
            },
        },
        Row {
            name: "externalTrafficPolicy=Local: client address kept (no masquerade)",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let spec = Spec::from_client(40_032, LOCAL_NODE_PORT, L4::Udp);
                let expect = spec.clone();
                Case {
                    input: spec.build(),
                    ifindex: dp.client_ifindex,
                    expect: Expect::Frame(Box::new(move |dp: &mut Datapath| {
                        let flow = dp.flow(&expect.key()).expect("flow");
                        let backend = std::net::Ipv4Addr::from(flow.new_dst_addr_be.to_ne_bytes());
                        expect
                            .forwarded(
                                NODE_B_MAC,
                                backend_mac(backend),
                                CLIENT,
                                40_032,
                                backend,
                                UDP_TARGET_PORT,
                            )
                            .build()
                    })),
                    after: None,
                }
            },
        },
        Row {
            name: "externalTrafficPolicy=Local: the pod's reply to the client is reverse-NATed",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdReply,
            case: |dp| {
                let client = Spec::from_client(40_033, LOCAL_NODE_PORT, L4::Udp);
                let (verdict, out) = dp.run(&client.build(), dp.client_ifindex);
                assert_eq!(verdict, XDP_REDIRECT);
                let (_, _, backend, backend_port) = tuple_of(&out).expect("parses");
                let mut reply = Spec::from_client(backend_port, 40_033, L4::Udp);
                reply.eth_src = backend_mac(backend);
                reply.eth_dst = NODE_B_MAC;
                reply.src = backend;
                reply.dst = CLIENT;
                reply.payload = b"echo".to_vec();
                let to_client =
                    reply.forwarded(NODE_MAC, CLIENT_MAC, NODE, LOCAL_NODE_PORT, CLIENT, 40_033);
                Case {
                    input: reply.build(),
                    ifindex: dp.backend_ifindex,
                    expect: Expect::Frame(Box::new(move |_| to_client.build())),
                    after: None,
                }
            },
        },
        Row {
            name: "loadBalancerSourceRanges: a source inside the range is balanced",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| forward_case(dp, Spec::from_client(40_034, RANGED_NODE_PORT, L4::Udp)),
        },
        Row {
            name: "loadBalancerSourceRanges: a source outside the range is dropped",
            verdict: XDP_DROP,
            reason: Reason::DropSourceRange,
            case: |dp| {
                let mut spec = Spec::from_client(40_035, RANGED_NODE_PORT, L4::Udp);
                spec.src = std::net::Ipv4Addr::new(198, 19, 7, 7);
                dropped(dp, spec.build())
            },
        },
        Row {
            name: "sessionAffinity ClientIP: a client's new flows all go to one backend",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let first =
                    send_from_client(dp, &Spec::from_client(40_040, AFFINITY_NODE_PORT, L4::Udp));
                for sport in 40_041..40_048 {
                    let next = send_from_client(
                        dp,
                        &Spec::from_client(sport, AFFINITY_NODE_PORT, L4::Udp),
                    );
                    assert_eq!(
                        next.dst, first.dst,
                        "flow from port {sport} left the affine backend"
                    );
                }
                forward_case(dp, Spec::from_client(40_048, AFFINITY_NODE_PORT, L4::Udp))
            },
        },
        Row {
            name: "sessionAffinity: a terminating backend keeps its flow but gets no new one",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                let first_spec = Spec::from_client(40_050, AFFINITY_NODE_PORT, L4::Udp);
                let first = send_from_client(dp, &first_spec);
                let (gone, survivor) = if first.dst == BACKEND_1 {
                    (BACKEND_1_ID + 10, BACKEND_2_ID + 10)
                } else {
                    (BACKEND_2_ID + 10, BACKEND_1_ID + 10)
                };
                // The agent takes a terminating endpoint out of the table
                // and flags it; it stays active for its flows.
                dp.remove_backend(gone, survivor);
                let mut table = dp.backends();
                let mut entry = table.get(&gone, 0).expect("backend");
                entry.flags |= lb_common::service::BACKEND_F_ACTIVE;
                table.set(gone, entry, 0).expect("backend");
                dp.set_terminating(gone);
                let fresh =
                    send_from_client(dp, &Spec::from_client(40_051, AFFINITY_NODE_PORT, L4::Udp));
                assert_ne!(
                    fresh.dst, first.dst,
                    "new flow went to the terminating backend"
                );
                forward_case(dp, first_spec)
            },
        },
        Row {
            name: "unresolved next hop drops (agent keeps neighbours managed)",
            verdict: XDP_DROP,
            reason: Reason::DropNoNeighbour,
            case: |dp| {
                let spec = Spec::from_client(40_017, UNRESOLVED_NODE_PORT, L4::Tcp(SYN));
                dropped(dp, spec.build())
            },
        },
        Row {
            name: "non-service port passes untouched",
            verdict: XDP_PASS,
            reason: Reason::PassNotService,
            case: |dp| unchanged(dp, Spec::from_client(40_018, 5353, L4::Udp).build()),
        },
        Row {
            name: "backend's target port on the node address, from outside, passes",
            verdict: XDP_PASS,
            reason: Reason::PassNotService,
            case: |dp| {
                unchanged(
                    dp,
                    Spec::from_client(40_019, UDP_TARGET_PORT, L4::Udp).build(),
                )
            },
        },
        Row {
            name: "packet to a backend address (routed through the node) passes",
            verdict: XDP_PASS,
            reason: Reason::PassNotService,
            case: |dp| {
                let mut spec = Spec::from_client(40_020, UDP_TARGET_PORT, L4::Udp);
                spec.dst = BACKEND_1;
                unchanged(dp, spec.build())
            },
        },
        Row {
            name: "TCP segment with no flow passes (the kernel answers RST)",
            verdict: XDP_PASS,
            reason: Reason::PassTcpNoFlow,
            case: |dp| unchanged(dp, tcp(40_021, ACK).build()),
        },
        Row {
            name: "reply-like packet with no flow passes",
            verdict: XDP_PASS,
            reason: Reason::PassNotService,
            case: |dp| {
                let mut spec = Spec::from_client(UDP_TARGET_PORT, 61_000, L4::Udp);
                spec.src = BACKEND_1;
                spec.dst = NODE_B;
                Case {
                    input: spec.build(),
                    ifindex: dp.backend_ifindex,
                    expect: Expect::Unchanged,
                    after: None,
                }
            },
        },
        Row {
            name: "ICMP echo passes",
            verdict: XDP_PASS,
            reason: Reason::PassNotTcpUdp,
            case: |dp| unchanged(dp, icmp_echo()),
        },
        Row {
            name: "ARP passes",
            verdict: XDP_PASS,
            reason: Reason::PassNotIpv4,
            case: |dp| unchanged(dp, arp_request()),
        },
        Row {
            name: "a frame from the wire carrying the tc hand-off marker is dropped",
            verdict: XDP_DROP,
            reason: Reason::DropTcHandoff,
            case: |dp| {
                let mut spec = udp(40_025);
                spec.eth_dst = [0x02, b'x', b'l', b'b', 0x01, 0x00];
                dropped(dp, spec.build())
            },
        },
        Row {
            name: "VLAN-tagged frame passes",
            verdict: XDP_PASS,
            reason: Reason::PassNotIpv4,
            case: |dp| unchanged(dp, vlan_udp()),
        },
        Row {
            name: "IHL below 5 passes as malformed",
            verdict: XDP_PASS,
            reason: Reason::PassMalformed,
            case: |dp| {
                let mut frame = udp(40_024).build();
                frame[14] = 0x44;
                unchanged(dp, frame)
            },
        },
        Row {
            name: "IPv4 total length beyond the frame passes as malformed",
            verdict: XDP_PASS,
            reason: Reason::PassMalformed,
            case: |dp| {
                let mut frame = udp(40_025).build();
                frame[16..18].copy_from_slice(&1400u16.to_be_bytes());
                unchanged(dp, frame)
            },
        },
        Row {
            name: "TCP data offset below 5 passes as malformed",
            verdict: XDP_PASS,
            reason: Reason::PassMalformed,
            case: |dp| {
                let mut frame = tcp(40_026, SYN).build();
                frame[14 + 20 + 12] = 0x40;
                unchanged(dp, frame)
            },
        },
        Row {
            name: "before the agent marks the config ready, everything passes",
            verdict: XDP_PASS,
            reason: Reason::PassNotReady,
            case: |dp| {
                let mut cfg = Datapath::base_config();
                cfg.flags = 0;
                dp.set_config(cfg);
                unchanged(dp, udp(40_027).build())
            },
        },
        Row {
            name: "ICMP frag needed from a router behind the node reaches the client, quote translated",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| icmp_to_client_case(dp, udp(40_200), frag_needed(1400), Some(8)),
        },
        Row {
            name: "ICMP frag needed quoting a whole TCP segment: quoted TCP checksum kept consistent",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| icmp_to_client_case(dp, tcp(40_201, SYN), frag_needed(1400), None),
        },
        Row {
            name: "ICMP frag needed quoting 8 bytes of TCP (no checksum in the quote)",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| icmp_to_client_case(dp, tcp(40_202, SYN), frag_needed(1400), Some(8)),
        },
        Row {
            name: "backend's port unreachable reaches the client from node-ip:NodePort",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| icmp_to_client_case(dp, udp(40_203), port_unreachable(), Some(8)),
        },
        Row {
            name: "time exceeded behind the node reaches the client",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| icmp_to_client_case(dp, udp(40_204), ttl_exceeded(), Some(8)),
        },
        Row {
            name: "ICMP error quoting a packet with IPv4 options is translated, options kept",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToClient,
            case: |dp| {
                let mut spec = udp(40_205);
                spec.ip_options = vec![1, 1, 1, 0];
                icmp_to_client_case(dp, spec, frag_needed(1400), Some(8))
            },
        },
        Row {
            name: "client's port unreachable about a reply reaches the backend, quote translated",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToBackend,
            case: |dp| icmp_to_backend_case(dp, udp(40_206), port_unreachable(), Some(8)),
        },
        Row {
            name: "frag needed on the client side about a reply reaches the backend",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdIcmpToBackend,
            case: |dp| icmp_to_backend_case(dp, tcp(40_207, SYN), frag_needed(1280), None),
        },
        Row {
            name: "ICMP error with TTL 1 is dropped, not forwarded with TTL 0",
            verdict: XDP_DROP,
            reason: Reason::DropTtlExpired,
            case: |dp| {
                let mut case = icmp_to_client_case(dp, udp(40_208), frag_needed(1400), Some(8));
                case.input[14 + 8] = 1;
                let check = ipv4_checksum(&case.input[14..34]);
                case.input[24..26].copy_from_slice(&check.to_be_bytes());
                case.expect = Expect::Dropped;
                case
            },
        },
        Row {
            name: "truncated ICMP error (quote shorter than IPv4 header + 8) passes as malformed",
            verdict: XDP_PASS,
            reason: Reason::PassMalformed,
            case: |dp| {
                let client = udp(40_209);
                let at_backend = send_from_client(dp, &client);
                let quoted = quote(&at_backend.build(), Some(4));
                let input = router_error(&at_backend, frag_needed(1400), &quoted);
                Case {
                    input,
                    ifindex: dp.backend_ifindex,
                    expect: Expect::Unchanged,
                    after: None,
                }
            },
        },
        Row {
            name: "ICMP error quoting no flow passes to the kernel",
            verdict: XDP_PASS,
            reason: Reason::PassIcmpNoFlow,
            case: |dp| {
                let mut stray = Spec::from_client(61_000, UDP_TARGET_PORT, L4::Udp);
                stray.src = NODE_B;
                stray.dst = BACKEND_1;
                let input =
                    router_error(&stray, port_unreachable(), &quote(&stray.build(), Some(8)));
                Case {
                    input,
                    ifindex: dp.backend_ifindex,
                    expect: Expect::Unchanged,
                    after: None,
                }
            },
        },
        Row {
            name: "ICMP error quoting an ICMP packet (ICMP in ICMP) passes to the kernel",
            verdict: XDP_PASS,
            reason: Reason::PassIcmpNoFlow,
            case: |dp| {
                let echo = icmp_echo();
                let input = icmp_error(
                    NODE_MAC,
                    CLIENT_MAC,
                    CLIENT,
                    NODE,
                    64,
                    port_unreachable(),
                    &quote(&echo, Some(8)),
                );
                unchanged(dp, input)
            },
        },
        Row {
            name: "first fragment of a UDP datagram is balanced like the datagram",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| fragment_case(dp, 40_220, 0),
        },
        Row {
            name: "middle fragment follows its first fragment's flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdFragment,
            case: |dp| fragment_case(dp, 40_221, 1),
        },
        Row {
            name: "last fragment follows its first fragment's flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdFragment,
            case: |dp| fragment_case(dp, 40_222, 2),
        },
        Row {
            name: "fragment of an unknown datagram (or before its first) passes",
            verdict: XDP_PASS,
            reason: Reason::PassFragmentUnknown,
            case: |dp| {
                let pieces = fragments(&big_udp(40_223), &FRAGMENT_CUTS);
                unchanged(dp, pieces[1].clone())
            },
        },
        Row {
            name: "a backend's fragmented reply follows the flow back to the client",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdFragment,
            case: |dp| {
                let client = udp(40_224);
                let at_backend = send_from_client(dp, &client);
                let mut reply = at_backend.reply(L4::Udp, &[7u8; 64]);
                reply.ident = 0x4321;
                let pieces = fragments(&reply, &FRAGMENT_CUTS);
                let (verdict, _) = dp.run(&pieces[0], dp.backend_ifindex);
                assert_eq!(verdict, XDP_REDIRECT, "first fragment of the reply");
                let to_client = reply.forwarded(
                    NODE_MAC,
                    CLIENT_MAC,
                    NODE,
                    client.dport,
                    CLIENT,
                    client.sport,
                );
                let want = fragments(&to_client, &FRAGMENT_CUTS)[2].clone();
                Case {
                    input: pieces[2].clone(),
                    ifindex: dp.backend_ifindex,
                    expect: Expect::Frame(Box::new(move |_| want)),
                    after: None,
                }
            },
        },
        Row {
            name: "DF datagram larger than the backend link's MTU: frag needed with that MTU sent back",
            verdict: XDP_TX,
            reason: Reason::RejectFragNeeded,
            case: |dp| {
                let mut spec = udp(40_230);
                spec.payload = vec![9; 1400];
                too_big_case(dp, spec)
            },
        },
        Row {
            name: "DF segment of an established flow (cached hop) too big: frag needed",
            verdict: XDP_TX,
            reason: Reason::RejectFragNeeded,
            case: |dp| {
                send_from_client(dp, &tcp(40_231, SYN));
                let mut spec = tcp(40_231, ACK | PSH);
                spec.payload = vec![9; 1400];
                too_big_case(dp, spec)
            },
        },
        Row {
            name: "datagram without DF larger than the MTU is dropped (XDP cannot fragment)",
            verdict: XDP_DROP,
            reason: Reason::DropTooBig,
            case: |dp| {
                let mut spec = udp(40_232);
                spec.payload = vec![9; 1400];
                let mut case = too_big_case(dp, spec);
                case.input[20] &= !0x40;
                let check = ipv4_checksum(&case.input[14..34]);
                case.input[24..26].copy_from_slice(&check.to_be_bytes());
                case.expect = Expect::Dropped;
                case
            },
        },
        Row {
            name: "frag needed answers are rate-limited per client",
            verdict: XDP_DROP,
            reason: Reason::DropIcmpRateLimited,
            case: |dp| {
                let mut spec = udp(40_233);
                spec.payload = vec![9; 1400];
                let mut case = too_big_case(dp, spec);
                for _ in 0..lb_common::frag::ICMP_LIMIT_BURST {
                    let (verdict, _) = dp.run(&case.input, dp.client_ifindex);
                    assert_eq!(verdict, XDP_TX, "an answer within the burst");
                }
                case.expect = Expect::Dropped;
                case
            },
        },
        Row {
            name: "TCP SYN-ACK alone leaves the flow half-open in XLB_FLOWS_NEW",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdReply,
            case: |dp| {
                let client = tcp(40_300, SYN);
                let at_backend = send_from_client(dp, &client);
                let mut case = reply_case(dp, &client, &at_backend, L4::Tcp(SYN | ACK));
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    assert!(dp.flows().get(&client.key(), 0).is_err(), "in XLB_FLOWS");
                    let flow = dp.new_flows().get(&client.key(), 0).expect("half-open");
                    assert_eq!(flow.state & FLOW_S_CONFIRMED, 0);
                }));
                case
            },
        },
        Row {
            name: "the client's ACK of the SYN-ACK moves the flow to XLB_FLOWS",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                let client = handshake(dp, 40_301);
                let mut ack = tcp(40_301, ACK);
                (ack.tcp_seq, ack.tcp_ack) = (1_001, SYNACK_SEQ + 1);
                let mut case = forward_case(dp, ack);
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flows().get(&client.key(), 0).expect("established");
                    assert_eq!(flow.state & FLOW_S_CONFIRMED, FLOW_S_CONFIRMED);
                    let peer = lb_common::FlowKey::peer_of(&flow, IPPROTO_TCP);
                    assert!(dp.flows().get(&peer, 0).is_ok(), "reply entry moved too");
                    assert!(dp.new_flows().get(&client.key(), 0).is_err());
                    assert!(dp.new_flows().get(&peer, 0).is_err());
                }));
                case
            },
        },
        Row {
            name: "an ACK that does not acknowledge the SYN-ACK leaves the flow half-open",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                let client = handshake(dp, 40_302);
                let mut blind = tcp(40_302, ACK);
                (blind.tcp_seq, blind.tcp_ack) = (1_001, 777);
                let mut case = forward_case(dp, blind);
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    assert!(dp.flows().get(&client.key(), 0).is_err());
                    assert!(dp.new_flows().get(&client.key(), 0).is_ok());
                }));
                case
            },
        },
        Row {
            name: "a half-open flow expires tcp_syn_timeout after its SYN despite SYN-ACK retransmits",
            verdict: XDP_PASS,
            reason: Reason::PassTcpNoFlow,
            case: |dp| {
                let client = handshake(dp, 40_303);
                let cfg = Datapath::base_config();
                let now = monotonic_ns();
                let born = now - (u64::from(cfg.tcp_syn_timeout_s) + 1) * 1_000_000_000;
                age_flow(dp, &client.key(), born, now);
                let mut ack = tcp(40_303, ACK);
                (ack.tcp_seq, ack.tcp_ack) = (1_001, SYNACK_SEQ + 1);
                unchanged(dp, ack.build())
            },
        },
        Row {
            name: "RST inside the window closes an established flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdEstablished,
            case: |dp| {
                let client = established(dp, 40_304);
                let mut rst = tcp(40_304, RST);
                rst.payload.clear();
                // Between what the backend acknowledged (1001) and what the
                // client has sent (up to 1010).
                rst.tcp_seq = 1_005;
                let mut case = forward_case(dp, rst);
                case.after = state_has(FLOW_S_RST, client);
                case
            },
        },
        Row {
            name: "RST outside the window is forwarded but does not close the flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdRstOutsideWindow,
            case: |dp| {
                let client = established(dp, 40_305);
                let mut rst = tcp(40_305, RST);
                rst.payload.clear();
                rst.tcp_seq = 900_000;
                let mut case = forward_case(dp, rst);
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow(&client.key()).expect("flow");
                    assert_eq!(flow.state & FLOW_S_RST, 0, "closed by a blind RST");
                    let cfg = Datapath::base_config();
                    assert_eq!(
                        flow.timeout_s(IPPROTO_TCP, &cfg),
                        cfg.tcp_established_timeout_s
                    );
                }));
                case
            },
        },
        Row {
            name: "RST from the backend outside the window does not close the flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdRstOutsideWindow,
            case: |dp| {
                let client = established(dp, 40_306);
                let at_backend = send_from_client(dp, &tcp(40_306, ACK));
                let mut case = reply_case(dp, &client, &at_backend, L4::Tcp(RST));
                let mut rst = at_backend.reply(L4::Tcp(RST), b"");
                rst.payload.clear();
                rst.tcp_seq = SYNACK_SEQ + 100_000;
                let to_client =
                    rst.forwarded(NODE_MAC, CLIENT_MAC, NODE, TCP_NODE_PORT, CLIENT, 40_306);
                case.input = rst.build();
                case.expect = Expect::Frame(Box::new(move |_| to_client.build()));
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow(&client.key()).expect("flow");
                    assert_eq!(flow.state & FLOW_S_RST, 0, "closed by a blind RST");
                }));
                case
            },
        },
        Row {
            name: "a masquerade port held by half a flow (its peer evicted) is taken over",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let spec = udp(40_307);
                let port = first_masquerade_port(&spec);
                for backend in [BACKEND_1, BACKEND_2] {
                    let (reply_key, mut reply) = foreign_pair(backend, port).1;
                    // Idle past a refresh period: a reply entry younger than
                    // that may belong to a flow another CPU is creating.
                    reply.last_seen_ns -= 2_000_000_000;
                    dp.flows()
                        .insert(reply_key, reply, 0)
                        .expect("stale reply entry");
                }
                let mut case = forward_case(dp, spec.clone());
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow(&spec.key()).expect("flow");
                    assert_eq!(u16::from_be(flow.new_src_port_be), port);
                }));
                case
            },
        },
        Row {
            name: "a masquerade port whose reply entry is fresh but unpaired (a flow another CPU is creating) is not taken",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let spec = udp(40_313);
                let port = first_masquerade_port(&spec);
                for backend in [BACKEND_1, BACKEND_2] {
                    let (reply_key, reply) = foreign_pair(backend, port).1;
                    dp.flows()
                        .insert(reply_key, reply, 0)
                        .expect("fresh reply entry");
                }
                let mut case = forward_case(dp, spec.clone());
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow(&spec.key()).expect("flow");
                    assert_ne!(
                        u16::from_be(flow.new_src_port_be),
                        port,
                        "took the port of a flow being created"
                    );
                    let backend = std::net::Ipv4Addr::from(flow.new_dst_addr_be.to_ne_bytes());
                    let (reply_key, _) = foreign_pair(backend, port).1;
                    assert!(
                        dp.flow(&reply_key).is_some(),
                        "the other flow's reply entry was deleted"
                    );
                }));
                case
            },
        },
        Row {
            name: "a masquerade port a live flow holds is never handed out twice",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let spec = udp(40_308);
                let port = first_masquerade_port(&spec);
                for backend in [BACKEND_1, BACKEND_2] {
                    let ((key, original), (reply_key, reply)) = foreign_pair(backend, port);
                    dp.flows().insert(key, original, 0).expect("original");
                    dp.flows().insert(reply_key, reply, 0).expect("reply");
                }
                let mut case = forward_case(dp, spec.clone());
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow(&spec.key()).expect("flow");
                    assert_ne!(u16::from_be(flow.new_src_port_be), port);
                    let backend = std::net::Ipv4Addr::from(flow.new_dst_addr_be.to_ne_bytes());
                    let ((key, _), (reply_key, reply)) = foreign_pair(backend, port);
                    assert!(dp.flow(&key).is_some(), "the other flow lost its entry");
                    let held = dp.flow(&reply_key).expect("the other flow's reply entry");
                    assert_eq!(
                        (held.new_dst_addr_be, held.new_dst_port_be),
                        (reply.new_dst_addr_be, reply.new_dst_port_be),
                        "the reply tuple now leads to another client"
                    );
                }));
                case
            },
        },
        Row {
            name: "a flow whose reply entry was evicted is gone: its next datagram is a new flow",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let spec = udp(40_309);
                send_from_client(dp, &spec);
                let flow = dp.flow(&spec.key()).expect("flow");
                let peer = lb_common::FlowKey::peer_of(&flow, IPPROTO_UDP);
                dp.flows().remove(&peer).expect("evict the reply entry");
                let now = monotonic_ns();
                age_flow(dp, &spec.key(), now - 2_000_000_000, now - 2_000_000_000);
                forward_case(dp, spec)
            },
        },
        Row {
            name: "sessionAffinity: a record whose backend id now names another endpoint is not followed",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                let first =
                    send_from_client(dp, &Spec::from_client(40_311, AFFINITY_NODE_PORT, L4::Udp));
                let (gone, survivor) = if first.dst == BACKEND_1 {
                    (BACKEND_1_ID + 10, BACKEND_2_ID + 10)
                } else {
                    (BACKEND_2_ID + 10, BACKEND_1_ID + 10)
                };
                // The agent removes the pod, then gives its id to another
                // Service's endpoint (same pod address, another port).
                dp.remove_backend(gone, survivor);
                let mut table = dp.backends();
                let mut reused = table.get(&gone, 0).expect("backend");
                reused.port_be = 5_555u16.to_be();
                reused.flags |= lb_common::service::BACKEND_F_ACTIVE;
                table.set(gone, reused, 0).expect("backend");
                let spec = Spec::from_client(40_312, AFFINITY_NODE_PORT, L4::Udp);
                let mut case = forward_case(dp, spec.clone());
                case.after = Some(Box::new(move |dp: &mut Datapath| {
                    let flow = dp.flow(&spec.key()).expect("flow");
                    assert_eq!(u16::from_be(flow.new_dst_port_be), UDP_TARGET_PORT);
                    assert_ne!(
                        flow.new_dst_addr_be,
                        be(first.dst),
                        "followed a stale record"
                    );
                }));
                case
            },
        },
        Row {
            name: "port filter on: UDP to a port nobody listed passes before any lookup",
            verdict: XDP_PASS,
            reason: Reason::PassNotService,
            case: |dp| {
                assert!(dp.filter_ports(Some(&BASE_PORTS)));
                unchanged(dp, Spec::from_client(40_401, 5353, L4::Udp).build())
            },
        },
        Row {
            name: "port filter on: a flow whose ports are both unlisted is not even looked up",
            verdict: XDP_PASS,
            reason: Reason::PassNotService,
            case: |dp| {
                send_from_client(dp, &udp(40_402));
                let tcp_only: Vec<u16> = BASE_PORTS
                    .into_iter()
                    .filter(|&port| port != UDP_NODE_PORT && port != UDP_TARGET_PORT)
                    .collect();
                assert!(dp.filter_ports(Some(&tcp_only)));
                unchanged(dp, udp(40_402).build())
            },
        },
        Row {
            name: "port filter on: a service port is balanced as before",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdNewFlow,
            case: |dp| {
                assert!(dp.filter_ports(Some(&BASE_PORTS)));
                forward_case(dp, udp(40_403))
            },
        },
        Row {
            name: "port filter on: a reply to an unlisted masquerade port is still reverse-NATed \
                   (its source, the backend's port, is listed)",
            verdict: XDP_REDIRECT,
            reason: Reason::FwdReply,
            case: |dp| {
                assert!(dp.filter_ports(Some(&BASE_PORTS)));
                let client = udp(40_404);
                let at_backend = send_from_client(dp, &client);
                reply_case(dp, &client, &at_backend, L4::Udp)
            },
        },
    ]
}

/// Sets the MTU of the fixture's backend-side link (restored to 1500 by
/// the case's `after`, and by `reset_mtu` for the next row).
pub(crate) fn set_backend_mtu(mtu: u32) {
    let status = std::process::Command::new("ip")
        .args(["link", "set", "xb", "mtu", &mtu.to_string()])
        .status()
        .expect("ip link set mtu");
    assert!(status.success(), "ip link set xb mtu {mtu}");
}

/// `spec` from the client, with the backend link at MTU 1400: the node
/// must answer "fragmentation needed, MTU 1400" quoting the packet.
fn too_big_case(dp: &mut Datapath, spec: Spec) -> Case {
    set_backend_mtu(1400);
    let input = spec.build();
    let want = icmp_error(
        NODE_MAC,
        CLIENT_MAC,
        spec.dst,
        spec.src,
        64,
        frag_needed(1400),
        &quote(&input, Some(8)),
    );
    Case {
        input,
        ifindex: dp.client_ifindex,
        expect: Expect::Frame(Box::new(move |_| want)),
        after: Some(Box::new(|_| set_backend_mtu(1500))),
    }
}

/// IPv4 header checksum of `header` with its checksum field taken as 0.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum = 0u32;
    for (index, pair) in header.chunks(2).enumerate() {
        if index != 5 {
            sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A router on the backend link (198.18.1.254) answering `packet` (as it
/// left the node) with `kind`, sent to the node's masquerade address.
fn router_error(packet: &Spec, kind: etherparse::Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let router = std::net::Ipv4Addr::new(198, 18, 1, 254);
    icmp_error(
        BACKEND_1_MAC,
        NODE_B_MAC,
        router,
        packet.src,
        64,
        kind,
        quoted,
    )
}

/// `client`'s flow is set up; a router behind the node answers the
/// forwarded packet with `kind` quoting `l4_bytes` of it. The client must
/// get it from the node, quoting its own packet as it sent it (with the
/// TTL it had when the router saw it).
fn icmp_to_client_case(
    dp: &mut Datapath,
    client: Spec,
    kind: etherparse::Icmpv4Type,
    l4_bytes: Option<usize>,
) -> Case {
    let at_backend = send_from_client(dp, &client);
    let input = router_error(
        &at_backend,
        kind.clone(),
        &quote(&at_backend.build(), l4_bytes),
    );
    let as_client_sent = Spec {
        src: client.src,
        sport: client.sport,
        dst: client.dst,
        dport: client.dport,
        ..at_backend.clone()
    };
    let want = icmp_error(
        NODE_MAC,
        CLIENT_MAC,
        client.dst,
        client.src,
        63,
        kind,
        &quote(&as_client_sent.build(), l4_bytes),
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
fn icmp_to_backend_case(
    dp: &mut Datapath,
    client: Spec,
    kind: etherparse::Icmpv4Type,
    l4_bytes: Option<usize>,
) -> Case {
    let at_backend = send_from_client(dp, &client);
    let reply_l4 = match client.l4 {
        L4::Udp => L4::Udp,
        L4::Tcp(_) => L4::Tcp(SYN | ACK),
    };
    let reply = at_backend.reply(reply_l4, b"echo");
    let at_client = reply.forwarded(
        NODE_MAC,
        CLIENT_MAC,
        NODE,
        client.dport,
        CLIENT,
        client.sport,
    );
    let input = icmp_error(
        CLIENT_MAC,
        NODE_MAC,
        CLIENT,
        NODE,
        64,
        kind.clone(),
        &quote(&at_client.build(), l4_bytes),
    );
    let as_backend_sent = Spec {
        src: reply.src,
        sport: reply.sport,
        dst: reply.dst,
        dport: reply.dport,
        ..at_client.clone()
    };
    let want = icmp_error(
        NODE_B_MAC,
        backend_mac(reply.src),
        reply.dst,
        reply.src,
        63,
        kind,
        &quote(&as_backend_sent.build(), l4_bytes),
    );
    Case {
        input,
        ifindex: dp.client_ifindex,
        expect: Expect::Frame(Box::new(move |_| want)),
        after: None,
    }
}

/// Where the fixture cuts a 64-byte UDP datagram: 8-byte header + 16
/// bytes, 24 bytes, 24 bytes.
const FRAGMENT_CUTS: [usize; 2] = [24, 48];

fn big_udp(sport: u16) -> Spec {
    let mut spec = udp(sport);
    spec.payload = (0..64).collect();
    spec.ident = 0x2a2a;
    spec
}

/// The datagram's fragments before `index` are sent first; fragment
/// `index` must leave rewritten exactly as the whole datagram would be.
fn fragment_case(dp: &mut Datapath, sport: u16, index: usize) -> Case {
    let spec = big_udp(sport);
    let pieces = fragments(&spec, &FRAGMENT_CUTS);
    for piece in &pieces[..index] {
        let (verdict, _) = dp.run(piece, dp.client_ifindex);
        assert_eq!(
            verdict, XDP_REDIRECT,
            "an earlier fragment was not forwarded"
        );
    }
    let expect = spec.clone();
    Case {
        input: pieces[index].clone(),
        ifindex: dp.client_ifindex,
        expect: Expect::Frame(Box::new(move |dp: &mut Datapath| {
            let flow = dp
                .flow(&expect.key())
                .expect("conntrack has the datagram's flow");
            let backend = std::net::Ipv4Addr::from(flow.new_dst_addr_be.to_ne_bytes());
            let forwarded = expect.forwarded(
                NODE_B_MAC,
                backend_mac(backend),
                NODE_B,
                u16::from_be(flow.new_src_port_be),
                backend,
                UDP_TARGET_PORT,
            );
            fragments(&forwarded, &FRAGMENT_CUTS)[index].clone()
        })),
        after: None,
    }
}

/// Every prefix of a valid UDP and TCP frame that cuts a header or the
/// payload short (from the Ethernet header on: the kernel refuses shorter
/// test frames, and no NIC delivers them).
pub fn truncations() -> Vec<(String, Vec<u8>)> {
    let mut frames = Vec::new();
    for (what, frame) in [
        ("UDP", udp(40_100).build()),
        ("TCP SYN", tcp(40_101, SYN).build()),
    ] {
        for len in 14..frame.len() {
            frames.push((format!("{what} cut to {len} bytes"), frame[..len].to_vec()));
        }
    }
    frames
}
