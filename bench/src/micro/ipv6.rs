//! The micro bench's IPv6 paths: the same frames as IPv4's rows in
//! `Spec6`, so each family's cost sits beside the other's in one run.

use std::net::Ipv6Addr;
use std::time::Duration;

use anyhow::anyhow;
use xlb_tests::{
    packets::L4,
    packets6::{Spec6, tuple_of6},
    testrun::{Datapath, NODE_B_MAC, UDP_NODE_PORT, XDP_REDIRECT, test_run},
    testrun6::NODE6_B,
};

/// Frames of IPv6 path `name`, with the interface each arrives on.
pub(super) fn frames(
    dp: &mut Datapath,
    name: &str,
    round: u32,
    packets: u32,
) -> anyhow::Result<Vec<(Vec<u8>, u32)>> {
    let client_if = dp.client_ifindex;
    Ok(match name {
        "new_udp_flow6" => (0..packets)
            .map(|index| {
                let (src, sport) = client(round, index, packets);
                let mut spec = Spec6::from_client(sport, UDP_NODE_PORT, L4::Udp);
                spec.src = src;
                (spec.build(), client_if)
            })
            .collect(),
        "established_udp6" => vec![(established_udp(dp, round)?, client_if)],
        "established_udp6_30k" => {
            let frames = (0..super::WORKING_SET)
                .map(|index| {
                    let (src, sport) = client(round, index, super::WORKING_SET);
                    let mut spec = Spec6::from_client(sport, UDP_NODE_PORT, L4::Udp);
                    spec.src = src;
                    // Assured, as IPv4's working set (`spread`'s caller).
                    forward(dp, &spec)?;
                    forward(dp, &spec).map(|_| (spec.build(), client_if))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            super::spread(frames)
        }
        "reply_reverse_nat6" => {
            let sport = 31_000 + round as u16;
            let at_backend = forward(dp, &Spec6::from_client(sport, UDP_NODE_PORT, L4::Udp))?;
            let (src, sport, dst, dport) =
                tuple_of6(&at_backend).ok_or_else(|| anyhow!("forwarded frame does not parse"))?;
            debug_assert_eq!(src, NODE6_B);
            let mut reply = Spec6::from_client(dport, sport, L4::Udp);
            reply.eth_src = at_backend[0..6].try_into()?;
            reply.eth_dst = NODE_B_MAC;
            reply.src = dst;
            reply.dst = src;
            vec![(reply.build(), dp.backend_ifindex)]
        }
        other => return Err(anyhow!("unknown path {other}")),
    })
}

/// A datagram of a UDP flow made by the one before it.
pub(super) fn established_udp(dp: &mut Datapath, round: u32) -> anyhow::Result<Vec<u8>> {
    let spec = Spec6::from_client(30_000 + round as u16, UDP_NODE_PORT, L4::Udp);
    forward(dp, &spec)?;
    Ok(spec.build())
}

/// Mean ns per run of `frame` on `xlb6` itself, as `xlb`'s tail call
/// would run it.
pub(super) fn direct_ns(dp: &Datapath, frame: &[u8], packets: u32) -> f64 {
    let program = dp.program_named("xlb6");
    let total: Duration = (0..packets)
        .map(|_| test_run(program, frame, dp.client_ifindex, 1).1)
        .sum();
    super::mean_ns(total, packets)
}

/// A distinct client per (round, index), as IPv4's `client`: source ports
/// 1024-65023, then the next address of 2001:db8:ff::/96.
fn client(round: u32, index: u32, packets: u32) -> (Ipv6Addr, u16) {
    let n = round * packets + index;
    let host = 2 + n / 64_000;
    let addr = Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0)) | u128::from(host),
    );
    (addr, 1024 + (n % 64_000) as u16)
}

fn forward(dp: &mut Datapath, spec: &Spec6) -> anyhow::Result<Vec<u8>> {
    let (verdict, out) = dp.run(&spec.build(), dp.client_ifindex);
    if verdict != XDP_REDIRECT {
        return Err(anyhow!("setup frame not forwarded (verdict {verdict})"));
    }
    Ok(out)
}
