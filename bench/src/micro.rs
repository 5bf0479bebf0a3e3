//! Per-packet cost of each datapath path, measured with BPF_PROG_TEST_RUN in
//! the same namespace and run as two yardsticks: `baseline_swap_macs` (the
//! least a forwarding XDP program does) and `baseline_pass` (the harness
//! floor: what the test-run timer itself costs per packet).
//!
//! Each packet is one test run (repeat 1): the kernel does not restore the
//! frame between repeats, so a repeated NAT would measure the rewritten
//! frame's path, not the one named. The floor is printed for reference; no
//! ratio is taken with it subtracted (that divides by the difference of two
//! noisy figures). Each path's spread over rounds (interquartile range of
//! the per-round means) says how far its median can be trusted.

mod ipv6;

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, anyhow};
use aya::{EbpfLoader, programs::Xdp};
use serde::Serialize;
use xlb_tests::{
    packets::{ACK, L4, PSH, SYN, Spec, tuple_of},
    testrun::{
        Datapath, NODE_B, NODE_B_MAC, UDP_NODE_PORT, XDP_REDIRECT, test_run, with_namespace,
    },
};

/// A datapath path: how to make its frames, and the design goal for it.
struct PathSpec {
    name: &'static str,
    what: &'static str,
    /// Goal for (path ns) / (baseline ns), from the issue; not an assertion.
    goal: Option<f64>,
}

const PATHS: &[PathSpec] = &[
    PathSpec {
        name: "new_udp_flow",
        what: "first datagram of a flow: service lookup, backend choice, next hop (cached per backend), masquerade port, 2 conntrack inserts, rewrite",
        goal: Some(3.0),
    },
    PathSpec {
        name: "established_udp",
        what: "datagram of a known flow: conntrack hit, backend check, next hop cached in the flow, rewrite, counters",
        goal: Some(1.3),
    },
    PathSpec {
        name: "established_udp_30k",
        what: "established_udp over a working set of 30k live flows (60k entries), each packet another flow's: conntrack entries out of cache, as in the lab's 60k-flow test",
        goal: None,
    },
    PathSpec {
        name: "new_tcp_syn",
        what: "SYN of a new connection",
        goal: Some(3.0),
    },
    PathSpec {
        name: "established_tcp",
        what: "segment of a known connection",
        goal: Some(1.3),
    },
    PathSpec {
        name: "reply_reverse_nat",
        what: "backend's reply: conntrack hit, reverse NAT to node-ip:NodePort",
        goal: Some(1.3),
    },
    PathSpec {
        name: "not_ours_pass",
        what: "UDP to a port that is no service: passed untouched",
        goal: Some(1.1),
    },
    PathSpec {
        name: "new_udp_flow6",
        what: "new_udp_flow in IPv6: xlb's tail call to xlb6, the flat pipeline's stages",
        goal: Some(3.0),
    },
    PathSpec {
        name: "established_udp6",
        what: "established_udp in IPv6 (through xlb and its tail call, as frames arrive)",
        goal: Some(1.3),
    },
    PathSpec {
        name: "established_udp6_30k",
        what: "established_udp_30k in IPv6",
        goal: None,
    },
    PathSpec {
        name: "established_udp6_xlb6",
        what: "established_udp6 run on xlb6 itself: without the tail call",
        goal: None,
    },
    PathSpec {
        name: "reply_reverse_nat6",
        what: "reply_reverse_nat in IPv6",
        goal: Some(1.3),
    },
];

#[derive(Serialize)]
pub struct Figure {
    pub name: &'static str,
    pub what: &'static str,
    /// Median over rounds of the mean ns per packet.
    pub ns_per_packet: f64,
    /// ns_per_packet / baseline ns_per_packet.
    pub ratio_to_baseline: f64,
    /// Interquartile range of the per-round means, ns.
    pub iqr_ns: f64,
    pub goal_ratio: Option<f64>,
    pub meets_goal: Option<bool>,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: String,
    pub rounds: u32,
    pub packets_per_round: u32,
    /// `baseline_pass`: the cost of one test run of a program that does nothing.
    pub floor_ns: f64,
    /// `baseline_swap_macs`: swap MACs, XDP_TX.
    pub baseline_ns: f64,
    pub baseline_iqr_ns: f64,
    pub paths: Vec<Figure>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = format!(
            "xlb datapath, ns per packet (BPF_PROG_TEST_RUN, median of {} rounds x {} packets)\nmachine: {}\n\n",
            self.rounds, self.packets_per_round, self.machine
        );
        out += &format!(
            "{:<20} {:>9} {:>10} {:>12} {:>6}  \n",
            "path", "ns/pkt", "x baseline", "IQR ns", "goal"
        );
        out += &format!(
            "{:<20} {:>9.1} {:>10} {:>12} {:>6}\n",
            "floor (XDP_PASS)", self.floor_ns, "", "", ""
        );
        out += &format!(
            "{:<20} {:>9.1} {:>10.2} {:>12.1} {:>6}\n",
            "baseline (swap+TX)", self.baseline_ns, 1.0, self.baseline_iqr_ns, ""
        );
        for figure in &self.paths {
            let goal = match (figure.goal_ratio, figure.meets_goal) {
                (Some(goal), Some(true)) => format!("<={goal} ok"),
                (Some(goal), _) => format!("<={goal} MISSED"),
                _ => String::new(),
            };
            out += &format!(
                "{:<20} {:>9.1} {:>10.2} {:>12.1} {:>6}\n",
                figure.name, figure.ns_per_packet, figure.ratio_to_baseline, figure.iqr_ns, goal
            );
        }
        out
    }
}

pub fn run(
    object: &'static [u8],
    rounds: u32,
    packets: u32,
    only: &[String],
) -> anyhow::Result<Report> {
    if rounds == 0 || packets == 0 {
        return Err(anyhow!("--rounds and --packets must be at least 1"));
    }
    if let Some(unknown) = only
        .iter()
        .find(|name| !PATHS.iter().any(|p| p.name == *name))
    {
        let known: Vec<&str> = PATHS.iter().map(|p| p.name).collect();
        return Err(anyhow!(
            "--path {unknown}: no such path; the paths are {}",
            known.join(", ")
        ));
    }
    let paths: Vec<&'static PathSpec> = PATHS
        .iter()
        .filter(|p| only.is_empty() || only.iter().any(|name| name == p.name))
        .collect();
    with_namespace(move || measure(object, rounds, packets, &paths))
}

/// The datapath as the micro bench measures it: sized as on a dual-stack
/// node (the IPv6 working set fits its flow table), the base state, the whole
/// port space for masquerade (so the new-flow paths measure allocation, not
/// exhaustion of the default 4.5k-port range), and the port filter on, as
/// the agent writes it (an older object without it is measured as it is).
fn prepared_datapath(object: &'static [u8]) -> Datapath {
    let mut dp = Datapath::load_dual_stack(object);
    dp.write_base_state();
    dp.set_config(lb_common::GlobalConfig {
        snat_port_min: 1024,
        snat_port_max: 65_535,
        ..Datapath::base_config()
    });
    dp.filter_ports(Some(&xlb_tests::testrun::BASE_PORTS));
    dp
}

fn measure(
    object: &'static [u8],
    rounds: u32,
    packets: u32,
    paths: &[&'static PathSpec],
) -> anyhow::Result<Report> {
    let mut dp = prepared_datapath(object);
    let mut yardsticks = EbpfLoader::new()
        .load(crate::BASELINE_OBJECT)
        .context("loading the baseline object")?;
    for name in ["baseline_swap_macs", "baseline_pass"] {
        let program: &mut Xdp = yardsticks
            .program_mut(name)
            .ok_or_else(|| anyhow!("{name} missing from the baseline object"))?
            .try_into()?;
        program.load()?;
    }
    let plain = Spec::from_client(40_000, 5353, L4::Udp).build();
    let client_if = dp.client_ifindex;

    let mut floor = Vec::new();
    let mut baseline = Vec::new();
    let mut per_path: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..rounds {
        for (name, samples) in [
            ("baseline_pass", &mut floor),
            ("baseline_swap_macs", &mut baseline),
        ] {
            let program: &mut Xdp = yardsticks
                .program_mut(name)
                .ok_or_else(|| anyhow!("{name}"))?
                .try_into()?;
            let total: Duration = (0..packets)
                .map(|_| test_run(program, &plain, client_if, 1).1)
                .sum();
            samples.push(mean_ns(total, packets));
        }
        for (index, path) in paths.iter().enumerate() {
            // Each path starts from an empty flow table.
            dp.clear_flows();
            let ns = measure_path(&mut dp, path.name, round, packets)?;
            per_path[index].push(ns);
        }
    }
    Ok(report(
        paths,
        rounds,
        packets,
        &mut floor,
        &mut baseline,
        &mut per_path,
    ))
}

/// The figures of a run: medians and spreads of the rounds' samples.
fn report(
    paths: &[&'static PathSpec],
    rounds: u32,
    packets: u32,
    floor: &mut [f64],
    baseline: &mut [f64],
    per_path: &mut [Vec<f64>],
) -> Report {
    let floor_ns = median(floor);
    let baseline_ns = median(baseline);
    let baseline_iqr_ns = iqr(baseline);
    let paths = paths
        .iter()
        .zip(per_path.iter_mut())
        .map(|(path, samples)| {
            let ns = median(samples);
            let iqr_ns = iqr(samples);
            let ratio = ns / baseline_ns;
            Figure {
                name: path.name,
                what: path.what,
                ns_per_packet: ns,
                ratio_to_baseline: ratio,
                iqr_ns,
                goal_ratio: path.goal,
                meets_goal: path.goal.map(|goal| ratio <= goal),
            }
        })
        .collect();
    Report {
        machine: crate::machine::describe(),
        rounds,
        packets_per_round: packets,
        floor_ns,
        baseline_ns,
        baseline_iqr_ns,
        paths,
    }
}

/// A distinct client tuple per (round, index), so "new flow" frames really
/// are new: source ports 1024-65023, then the next client address.
fn client(round: u32, index: u32, packets: u32) -> (Ipv4Addr, u16) {
    let n = round * packets + index;
    let host = 2 + n / 64_000;
    let addr = Ipv4Addr::new(198, 18, (host / 250) as u8 + 64, (host % 250) as u8 + 2);
    (addr, 1024 + (n % 64_000) as u16)
}

fn measure_path(dp: &mut Datapath, name: &str, round: u32, packets: u32) -> anyhow::Result<f64> {
    let client_if = dp.client_ifindex;
    let frames: Vec<(Vec<u8>, u32)> = match name {
        "new_udp_flow" | "new_tcp_syn" => (0..packets)
            .map(|index| {
                let (addr, sport) = client(round, index, packets);
                let l4 = if name == "new_udp_flow" {
                    L4::Udp
                } else {
                    L4::Tcp(SYN)
                };
                let mut spec = Spec::from_client(sport, port_for(l4), l4);
                spec.src = addr;
                (spec.build(), client_if)
            })
            .collect(),
        "established_udp" | "established_tcp" => {
            let (first, next) = if name == "established_udp" {
                (L4::Udp, L4::Udp)
            } else {
                (L4::Tcp(SYN), L4::Tcp(ACK | PSH))
            };
            let sport = 30_000 + round as u16;
            forward(dp, &Spec::from_client(sport, port_for(first), first))?;
            let frame = Spec::from_client(sport, port_for(next), next).build();
            vec![(frame, client_if)]
        }
        "reply_reverse_nat" => {
            let sport = 31_000 + round as u16;
            let at_backend = forward(dp, &Spec::from_client(sport, UDP_NODE_PORT, L4::Udp))?;
            let (src, sport, dst, dport) =
                tuple_of(&at_backend).ok_or_else(|| anyhow!("forwarded frame does not parse"))?;
            let mut reply = Spec::from_client(dport, sport, L4::Udp);
            reply.eth_src = at_backend[0..6].try_into()?;
            reply.eth_dst = NODE_B_MAC;
            reply.src = dst;
            reply.dst = src;
            debug_assert_eq!(src, NODE_B);
            vec![(reply.build(), dp.backend_ifindex)]
        }
        "established_udp_30k" => {
            let frames = (0..WORKING_SET)
                .map(|index| {
                    let (addr, sport) = client(round, index, WORKING_SET);
                    let mut spec = Spec::from_client(sport, UDP_NODE_PORT, L4::Udp);
                    spec.src = addr;
                    spec
                })
                // Two datagrams each: the second assures the flow (and
                // writes its reply entry), which the measured packets, as
                // the lab's, find done.
                .map(|spec| {
                    forward(dp, &spec)?;
                    forward(dp, &spec).map(|_| (spec.build(), client_if))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            spread(frames)
        }
        "not_ours_pass" => vec![(Spec::from_client(40_000, 5353, L4::Udp).build(), client_if)],
        "established_udp6_xlb6" => {
            let frame = ipv6::established_udp(dp, round)?;
            return Ok(ipv6::direct_ns(dp, &frame, packets));
        }
        other => ipv6::frames(dp, other, round, packets)?,
    };
    let mut total = Duration::ZERO;
    for index in 0..packets as usize {
        let (frame, ifindex) = &frames[index % frames.len()];
        total += dp.run_repeat(frame, *ifindex, 1).1;
    }
    Ok(mean_ns(total, packets))
}

/// Live flows of the `_30k` paths (60k entries, each flow has two); at
/// most half the masquerade ports of the one backend, so none runs out.
pub(crate) const WORKING_SET: u32 = 30_000;

/// A working set's frames in an order that strides through it (any
/// `packets` of them touch flows all over the table, not the first made).
fn spread(frames: Vec<(Vec<u8>, u32)>) -> Vec<(Vec<u8>, u32)> {
    let n = frames.len();
    // 7919 is a prime that does not divide WORKING_SET: each frame once.
    (0..n).map(|i| frames[i * 7919 % n].clone()).collect()
}

fn port_for(l4: L4) -> u16 {
    match l4 {
        L4::Udp => UDP_NODE_PORT,
        L4::Tcp(_) => xlb_tests::testrun::TCP_NODE_PORT,
    }
}

/// Sends `spec` once and returns the frame as forwarded.
fn forward(dp: &mut Datapath, spec: &Spec) -> anyhow::Result<Vec<u8>> {
    let (verdict, out) = dp.run(&spec.build(), dp.client_ifindex);
    if verdict != XDP_REDIRECT {
        return Err(anyhow!("setup frame not forwarded (verdict {verdict})"));
    }
    Ok(out)
}

fn mean_ns(total: Duration, packets: u32) -> f64 {
    total.as_nanos() as f64 / f64::from(packets)
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Third quartile minus first (nearest rank); 0 for one sample.
fn iqr(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    let last = samples.len() - 1;
    samples[last * 3 / 4] - samples[last / 4]
}
