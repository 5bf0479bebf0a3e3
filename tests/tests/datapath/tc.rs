//! `xlb_tc_pod`'s rows: a backend's reply arriving as an skb on a pod's
//! veth (or a tunnel), reverse-NATed to the client and sent on with
//! `bpf_redirect_neigh` (TC_ACT_REDIRECT: the MACs are left for the
//! neighbour step), for both families; packets of no flow are left to the
//! kernel untouched and uncounted. Expected frames are built from scratch
//! with etherparse (`packets`, `packets6`). A test run's skb has a complete
//! L4 checksum (it cannot be CHECKSUM_PARTIAL, which the real-node lab
//! covers end to end): it must be right after the rewrite.

use lb_common::Reason;
use xlb_tests::{
    packets::{ACK, L4, SYN, Spec},
    packets6::{Ext, Spec6},
    testrun::*,
    testrun6::*,
};

use crate::{hex, table::send_from_client};

/// `bpf_redirect_neigh`'s answer to tc.
const TC_ACT_REDIRECT: i32 = 7;
/// The kernel's own business.
const TC_ACT_OK: i32 = 0;

/// The frame a pod sends and the frame tc leaves (`None`: unchanged).
type Frames = (Vec<u8>, Option<Vec<u8>>);

/// A tc row: the frames, the action and the counter it adds (if any).
struct TcRow {
    name: &'static str,
    action: i32,
    reason: Option<Reason>,
    case: fn(&mut Datapath) -> Frames,
}

/// The IPv4 client `sport` sends `l4` through the NodePort (XDP); the
/// backend answers it with `answer`: (its reply, the reply as the client
/// must get it, MACs as they came).
fn reply4(dp: &mut Datapath, sport: u16, l4: L4, answer: L4) -> Frames {
    let node_port = match l4 {
        L4::Udp => UDP_NODE_PORT,
        L4::Tcp(_) => TCP_NODE_PORT,
    };
    let mut client = Spec::from_client(sport, node_port, l4);
    if matches!(l4, L4::Tcp(_)) {
        client.payload.clear();
    }
    let at_backend = send_from_client(dp, &client);
    let reply = at_backend.reply(answer, b"echo from the pod");
    let to_client = reply.forwarded(reply.eth_src, reply.eth_dst, NODE, node_port, CLIENT, sport);
    (reply.build(), Some(to_client.build()))
}

/// As `reply4`, for an IPv6 client; `exts` are the reply's extension
/// headers (tc finds the L4 header after them).
fn reply6(dp: &mut Datapath, sport: u16, l4: L4, answer: L4, exts: Vec<Ext>) -> Frames {
    let node_port = match l4 {
        L4::Udp => UDP_NODE_PORT,
        L4::Tcp(_) => TCP_NODE_PORT,
    };
    let mut client = Spec6::from_client(sport, node_port, l4);
    if matches!(l4, L4::Tcp(_)) {
        client.payload.clear();
    }
    let at_backend = crate::table6::send_from_client6(dp, &client);
    let mut reply = at_backend.reply(answer, b"echo from the pod, over IPv6");
    reply.exts = exts;
    let to_client = reply.forwarded(
        (reply.eth_src, reply.eth_dst),
        (NODE6, node_port),
        (CLIENT6, sport),
    );
    (reply.build(), Some(to_client.build()))
}

fn rows() -> Vec<TcRow> {
    vec![
        TcRow {
            name: "tc: IPv4 UDP reply from a pod, reverse NAT to NODE:NodePort",
            action: TC_ACT_REDIRECT,
            reason: Some(Reason::FwdReply),
            case: |dp| reply4(dp, 42_000, L4::Udp, L4::Udp),
        },
        TcRow {
            name: "tc: IPv4 TCP SYN-ACK from a pod, reverse NAT to NODE:NodePort",
            action: TC_ACT_REDIRECT,
            reason: Some(Reason::FwdReply),
            case: |dp| reply4(dp, 42_001, L4::Tcp(SYN), L4::Tcp(SYN | ACK)),
        },
        TcRow {
            name: "tc: IPv6 UDP reply from a pod, reverse NAT to NODE6:NodePort",
            action: TC_ACT_REDIRECT,
            reason: Some(Reason::FwdReply),
            case: |dp| reply6(dp, 42_002, L4::Udp, L4::Udp, Vec::new()),
        },
        TcRow {
            name: "tc: IPv6 TCP SYN-ACK from a pod, reverse NAT to NODE6:NodePort",
            action: TC_ACT_REDIRECT,
            reason: Some(Reason::FwdReply),
            case: |dp| reply6(dp, 42_003, L4::Tcp(SYN), L4::Tcp(SYN | ACK), Vec::new()),
        },
        TcRow {
            name: "tc: IPv6 UDP reply with destination options: the L4 header after them",
            action: TC_ACT_REDIRECT,
            reason: Some(Reason::FwdReply),
            case: |dp| reply6(dp, 42_004, L4::Udp, L4::Udp, vec![Ext::DestOpts(1)]),
        },
        TcRow {
            name: "tc: an IPv4 packet of no flow is the kernel's, untouched",
            action: TC_ACT_OK,
            reason: None,
            case: |_| {
                let spec = Spec::from_client(42_010, UDP_NODE_PORT, L4::Udp);
                (spec.reply(L4::Udp, b"not ours").build(), None)
            },
        },
        TcRow {
            name: "tc: an IPv6 packet of no flow is the kernel's, untouched",
            action: TC_ACT_OK,
            reason: None,
            case: |_| {
                let spec = Spec6::from_client(42_011, UDP_NODE_PORT, L4::Udp);
                (spec.reply(L4::Udp, b"not ours").build(), None)
            },
        },
    ]
}

/// What was wrong with `row`, if anything.
fn check(dp: &mut Datapath, row: &TcRow) -> Result<(), String> {
    let (input, want) = (row.case)(dp);
    let before = dp.stats();
    let (action, output) = dp.run_tc_pod(&input, dp.backend_ifindex);
    let after = dp.stats();
    let mut problems = Vec::new();
    if action != row.action {
        problems.push(format!("action {action}, expected {}", row.action));
    }
    for (index, (b, a)) in before.iter().zip(&after).enumerate() {
        let expected = u64::from(Some(index) == row.reason.map(|r| r as usize));
        if a - b != expected {
            let name = Reason::ALL[index].name();
            problems.push(format!(
                "counter {name} grew by {}, expected {expected}",
                a - b
            ));
        }
    }
    let want = want.unwrap_or_else(|| input.clone());
    if output != want {
        problems.push(format!(
            "output differs\n      got:  {}\n      want: {}",
            hex(&output),
            hex(&want)
        ));
    }
    if let Err(error) = xlb_tests::packets::check_checksums(&output) {
        problems.push(error);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[test]
fn tc_pod_fixture_table() {
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        let mut failures = Vec::new();
        for row in rows() {
            crate::reset(dp);
            match check(dp, &row) {
                Ok(()) => println!("ok   {}", row.name),
                Err(e) => {
                    println!("FAIL {}: {e}", row.name);
                    failures.push(row.name);
                }
            }
        }
        assert!(failures.is_empty(), "failing rows: {failures:#?}");
    });
}
