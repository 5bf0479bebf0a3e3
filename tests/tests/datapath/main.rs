//! Datapath proof with BPF_PROG_TEST_RUN: the fixture table, every
//! truncation of valid frames, and a seeded malformed-packet sweep.
//! Needs root (loads BPF, creates a network namespace).

mod sweep;
mod sweep6;
mod table;
mod table6;
mod tc;

use lb_common::Reason;
use table::{Case, Expect};
use xlb_tests::{packets, testrun::*};

/// Runs one case and returns what was wrong with it, if anything.
fn check(dp: &mut Datapath, verdict: u32, reason: Reason, case: Case) -> Result<(), String> {
    let before = dp.stats();
    let (got, output) = dp.run(&case.input, case.ifindex);
    let after = dp.stats();
    let mut problems = Vec::new();
    if got != verdict {
        problems.push(format!("verdict {got}, expected {verdict}"));
    }
    for (index, (b, a)) in before.iter().zip(&after).enumerate() {
        let expected = u64::from(index == reason as usize);
        if a - b != expected {
            let name = Reason::ALL[index].name();
            problems.push(format!(
                "counter {name} grew by {}, expected {expected}",
                a - b
            ));
        }
    }
    match case.expect {
        Expect::Unchanged if output != case.input => {
            problems.push("frame was modified on XDP_PASS".into());
        }
        Expect::Frame(build) if got == verdict => {
            let want = build(dp);
            if output != want {
                problems.push(format!(
                    "output differs\n      got:  {}\n      want: {}",
                    hex(&output),
                    hex(&want)
                ));
            }
            if let Err(e) = packets::check_checksums(&output) {
                problems.push(e);
            }
        }
        _ => {}
    }
    if problems.is_empty() {
        if let Some(after) = case.after {
            after(dp);
        }
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

fn reset(dp: &mut Datapath) {
    dp.clear_flows();
    dp.clear_peers();
    dp.filter_ports(None);
    dp.write_base_state();
}

#[test]
fn fixture_table() {
    run_table(false);
}

/// Every row again with the port filter on, listing what the agent would
/// (`BASE_PORTS`): the filter must not change any verdict, counter or frame.
#[test]
fn fixture_table_with_port_filter() {
    run_table(true);
}

fn run_table(filter: bool) {
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        let mut failures = Vec::new();
        for row in table::rows().into_iter().chain(table6::rows()) {
            reset(dp);
            if filter {
                assert!(
                    dp.filter_ports(Some(&BASE_PORTS)),
                    "the object has no XLB_PORTS"
                );
            }
            let case = (row.case)(dp);
            match check(dp, row.verdict, row.reason, case) {
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

#[test]
fn truncated_frames_pass_untouched() {
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        let mut failures = Vec::new();
        for (name, frame) in table::truncations()
            .into_iter()
            .chain(table6::truncations())
        {
            reset(dp);
            let case = Case {
                input: frame,
                ifindex: dp.client_ifindex,
                expect: Expect::Unchanged,
                after: None,
            };
            if let Err(e) = check(dp, XDP_PASS, Reason::PassMalformed, case) {
                failures.push(format!("{name}: {e}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    });
}

#[test]
fn malformed_packet_sweep() {
    let seed = std::env::var("XLB_SWEEP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let count = std::env::var("XLB_SWEEP_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        if let Err(e) = sweep::sweep(dp, seed, count) {
            panic!("{e}\nreproduce with XLB_SWEEP_SEED={seed}");
        }
        println!("sweep: {count} frames, seed {seed}: all invariants held");
        let counted: Vec<String> = Reason::ALL
            .iter()
            .zip(dp.stats())
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| format!("{}={n}", reason.name()))
            .collect();
        println!("sweep counters: {}", counted.join(" "));
    });
}

/// A UDP flow under a 1 s timeout with a packet every 300 ms lives on for
/// 3 s: every packet finds its entry due for a refresh (a quarter of the
/// timeout) before it could look idle, so no packet is a new flow, and the
/// reply entry, refreshed with it, still answers. Once the client falls
/// silent for longer than the timeout, the flow is gone. With the refresh
/// at a fixed second, the fourth packet found the flow expired and made a
/// new one, about once a second. Real sleeps: BPF_PROG_TEST_RUN runs the
/// program on the real (coarse monotonic) clock.
#[test]
fn short_timeout_flow_with_steady_packets_lives_on() {
    use packets::{L4, Spec};
    use std::time::{Duration, Instant};

    const GAP: Duration = Duration::from_millis(300);
    const LIVE: Duration = Duration::from_secs(3);
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        let mut cfg = Datapath::base_config();
        cfg.udp_timeout_s = 1;
        dp.set_config(cfg);
        let client = Spec::from_client(40_400, UDP_NODE_PORT, L4::Udp);
        let frame = client.build();
        let counted = |dp: &mut Datapath, reason: Reason| dp.stats()[reason as usize];
        let at_backend = table::send_from_client(dp, &client);
        let created_ns = dp.flow(&client.key()).expect("flow").created_ns;
        let new_before = counted(dp, Reason::FwdNewFlow);
        let established_before = counted(dp, Reason::FwdEstablished);
        let start = Instant::now();
        let mut packets = 0;
        while start.elapsed() < LIVE {
            std::thread::sleep(GAP);
            let (verdict, _) = dp.run(&frame, dp.client_ifindex);
            assert_eq!(verdict, XDP_REDIRECT, "packet {packets} not forwarded");
            packets += 1;
        }
        let new_flows = counted(dp, Reason::FwdNewFlow) - new_before;
        assert_eq!(
            new_flows, 0,
            "{new_flows} of {packets} packets 300 ms apart re-created a flow with a 1 s timeout"
        );
        assert_eq!(
            counted(dp, Reason::FwdEstablished) - established_before,
            packets
        );
        let flow = dp.flow(&client.key()).expect("flow");
        assert_eq!(flow.created_ns, created_ns, "the flow was re-created");
        let reply = at_backend.reply(L4::Udp, b"echo").build();
        let replies_before = counted(dp, Reason::FwdReply);
        let (verdict, _) = dp.run(&reply, dp.backend_ifindex);
        assert_eq!(
            verdict, XDP_REDIRECT,
            "the backend's reply was not forwarded"
        );
        assert_eq!(counted(dp, Reason::FwdReply) - replies_before, 1);
        // Silent for longer than the timeout: the next packet is a new flow.
        std::thread::sleep(Duration::from_millis(1_300));
        let (verdict, _) = dp.run(&frame, dp.client_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(
            counted(dp, Reason::FwdNewFlow) - new_before,
            1,
            "an idle flow lived on"
        );
        println!(
            "{packets} packets {GAP:?} apart under a 1 s timeout: one flow; after 1.3 s of \
             silence, a new one"
        );
    });
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data set up by CPU_ZERO/CPU_SET before use;
    // sched_setaffinity(0, ..) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Many clients, one CPU each thread, all at once, for a masquerade range
/// of 64 ports per backend: no two clients may end up with the same reply
/// tuple (the port is taken with BPF_NOEXIST), and every reply entry leads
/// back to the one client that owns it.
#[test]
fn masquerade_ports_are_taken_atomically_across_cpus() {
    use lb_common::{FlowKey, flow::FLOW_DIR_ORIGINAL};
    use packets::{L4, SYN, Spec};
    use std::collections::HashMap;

    const CLIENTS_PER_CPU: u16 = 80;
    const ROUNDS: u16 = 10;
    // SAFETY: sysconf has no preconditions.
    let cpus = (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).clamp(1, 4) as usize;
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        let mut cfg = Datapath::base_config();
        cfg.snat_port_min = 61_000;
        cfg.snat_port_max = 61_063;
        dp.set_config(cfg);
        let mut taken = 0;
        for round in 0..ROUNDS {
            dp.clear_flows();
            let client_ifindex = dp.client_ifindex;
            let program = dp.program();
            std::thread::scope(|scope| {
                for cpu in 0..cpus {
                    scope.spawn(move || {
                        pin_to_cpu(cpu);
                        for index in 0..CLIENTS_PER_CPU {
                            let sport = 20_000 + (cpu as u16) * 1_000 + index;
                            for l4 in [L4::Udp, L4::Tcp(SYN)] {
                                let dport = if l4 == L4::Udp {
                                    UDP_NODE_PORT
                                } else {
                                    TCP_NODE_PORT
                                };
                                let mut spec = Spec::from_client(sport, dport, l4);
                                spec.ident = round;
                                test_run(program, &spec.build(), client_ifindex, 1);
                            }
                        }
                    });
                }
            });
            // Every client entry, from both tables, by the reply tuple it
            // was given.
            let mut owners: HashMap<FlowKey, Vec<FlowKey>> = HashMap::new();
            let mut entries: Vec<(FlowKey, lb_common::Flow)> = Vec::new();
            entries.extend(dp.flows().iter().filter_map(Result::ok));
            entries.extend(dp.new_flows().iter().filter_map(Result::ok));
            for (key, flow) in &entries {
                if flow.direction == FLOW_DIR_ORIGINAL {
                    let reply_key = FlowKey::peer_of(flow, key.proto);
                    owners.entry(reply_key).or_default().push(*key);
                }
            }
            for (reply_key, clients) in &owners {
                assert_eq!(
                    clients.len(),
                    1,
                    "round {round}: clients {clients:?} share the reply tuple {reply_key:?}"
                );
                let reply = entries
                    .iter()
                    .find(|(key, _)| key == reply_key)
                    .map(|(_, flow)| *flow)
                    .unwrap_or_else(|| panic!("round {round}: no reply entry {reply_key:?}"));
                assert_eq!(FlowKey::peer_of(&reply, reply_key.proto), clients[0]);
            }
            taken += owners.len();
        }
        let per_round = 2 * 2 * 64;
        println!(
            "{cpus} CPUs x {CLIENTS_PER_CPU} clients x TCP+UDP, {ROUNDS} rounds: {taken} ports \
             taken (at most {per_round} per round), no reply tuple shared"
        );
        assert!(taken > 0);
    });
}

/// Two CPUs open a flow each at the same instant, round after round, with
/// one masquerade port: when both clients go to the same backend they want
/// the same reply tuple. Taking it with BPF_NOEXIST lets exactly one have
/// it (the other is told `drop_snat_exhausted`); a probe followed by an
/// insert with BPF_ANY lets both see it free now and then, and the second
/// insert silently takes the first client's reply tuple.
#[test]
fn one_masquerade_port_two_cpus_at_once() {
    use lb_common::{Flow, FlowKey, flow::FLOW_DIR_ORIGINAL};
    use packets::{L4, Spec};
    use std::sync::Barrier;

    const ROUNDS: u16 = 2_000;
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if cpus < 2 {
        println!("one CPU: nothing can race");
        return;
    }
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        let mut cfg = Datapath::base_config();
        cfg.snat_port_min = 61_000;
        cfg.snat_port_max = 61_000;
        dp.set_config(cfg);
        let client_ifindex = dp.client_ifindex;
        let (mut contended, mut one_won) = (0, 0);
        for round in 0..ROUNDS {
            dp.clear_flows();
            let start = Barrier::new(2);
            let program = dp.program();
            std::thread::scope(|scope| {
                for cpu in 0..2u16 {
                    let start = &start;
                    scope.spawn(move || {
                        pin_to_cpu(usize::from(cpu));
                        let sport = 20_000 + cpu * 20_000 + round;
                        let frame = Spec::from_client(sport, UDP_NODE_PORT, L4::Udp).build();
                        start.wait();
                        test_run(program, &frame, client_ifindex, 1);
                    });
                }
            });
            let entries: Vec<(FlowKey, Flow)> = dp.flows().iter().filter_map(Result::ok).collect();
            let originals: Vec<&(FlowKey, Flow)> = entries
                .iter()
                .filter(|(_, flow)| flow.direction == FLOW_DIR_ORIGINAL)
                .collect();
            let reply_keys: Vec<FlowKey> = originals
                .iter()
                .map(|(key, flow)| FlowKey::peer_of(flow, key.proto))
                .collect();
            if let [a, b] = reply_keys[..] {
                assert_ne!(
                    a, b,
                    "round {round}: two clients share the reply tuple {a:?}"
                );
            }
            for (reply_key, (key, _)) in reply_keys.iter().zip(&originals) {
                let reply = entries
                    .iter()
                    .find(|(entry_key, _)| entry_key == reply_key)
                    .map(|(_, flow)| *flow)
                    .unwrap_or_else(|| panic!("round {round}: no reply entry {reply_key:?}"));
                assert_eq!(
                    FlowKey::peer_of(&reply, reply_key.proto),
                    *key,
                    "round {round}: a client's reply tuple leads to another client"
                );
            }
            if originals.len() == 1 {
                one_won += 1;
            }
            if originals.len() == 1
                || reply_keys.first().map(|k| k.src_addr_be)
                    == reply_keys.get(1).map(|k| k.src_addr_be)
            {
                contended += 1;
            }
        }
        println!(
            "{ROUNDS} rounds of two clients at once on two CPUs, one port: {contended} \
             contended the same backend's tuple, {one_won} had exactly one winner, none shared"
        );
    });
}

/// A UDP flow of one datagram (a spoofed source's, or a query answered long
/// ago) is not assured: once idle for a second, a new flow that needs its
/// masquerade port takes it over. A flow whose client sent a second
/// datagram is assured and keeps its port until its timeout. One port per
/// backend makes the two clients want the same reply tuple.
#[test]
fn an_unassured_udp_flow_yields_its_masquerade_port() {
    use lb_common::{FlowKey, flow::FLOW_S_ASSURED};
    use packets::{L4, Spec};

    const AGE_NS: u64 = 2_000_000_000;
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        let mut cfg = Datapath::base_config();
        cfg.snat_port_min = 61_000;
        cfg.snat_port_max = 61_000;
        dp.set_config(cfg);
        let first = Spec::from_client(40_500, UDP_NODE_PORT, L4::Udp);
        let counted = |dp: &mut Datapath, reason: Reason| dp.stats()[reason as usize];
        // Opens `first`'s flow (sent `datagrams` times), ages both of its
        // entries by `age_ns`, then sends one datagram of `second`; returns
        // the reason it was counted under.
        let race = |dp: &mut Datapath, datagrams: u32, age_ns: u64, second: &Spec| -> Reason {
            dp.clear_flows();
            for _ in 0..datagrams {
                let (verdict, _) = dp.run(&first.build(), dp.client_ifindex);
                assert_eq!(verdict, XDP_REDIRECT);
            }
            let entries: Vec<(FlowKey, lb_common::Flow)> =
                dp.flows().iter().filter_map(Result::ok).collect();
            assert_eq!(entries.len(), 2, "the first flow's two entries");
            let assured = entries[0].1.state & FLOW_S_ASSURED != 0;
            assert_eq!(
                assured,
                datagrams > 1,
                "assured after {datagrams} datagram(s)"
            );
            for (key, mut flow) in entries {
                flow.last_seen_ns -= age_ns;
                flow.created_ns -= age_ns;
                dp.flows().insert(key, flow, 0).expect("age the entry");
            }
            let before = dp.stats();
            let _ = dp.run(&second.build(), dp.client_ifindex);
            let after = dp.stats();
            let grew: Vec<Reason> = Reason::ALL
                .iter()
                .copied()
                .filter(|reason| after[*reason as usize] > before[*reason as usize])
                .collect();
            assert_eq!(grew.len(), 1, "one reason per packet: {grew:?}");
            grew[0]
        };
        // A second client that hashes to the first one's backend: while the
        // first flow is fresh, it finds the only port taken.
        let second = (41_000..41_200)
            .map(|port| Spec::from_client(port, UDP_NODE_PORT, L4::Udp))
            .find(|second| race(dp, 1, 0, second) == Reason::DropSnatExhausted)
            .expect("a client port that selects the first client's backend");

        assert_eq!(
            race(dp, 1, AGE_NS, &second),
            Reason::FwdNewFlow,
            "an idle one-datagram flow kept its masquerade port"
        );
        let first_entry = dp
            .flow(&first.key())
            .expect("the first flow's own entry stays");
        let reply_key = FlowKey::peer_of(&first_entry, first.key().proto);
        let reply = dp.flow(&reply_key).expect("the reply tuple's entry");
        assert_eq!(
            FlowKey::peer_of(&reply, reply_key.proto),
            second.key(),
            "the reply tuple now leads to the second client"
        );

        assert_eq!(
            race(dp, 2, AGE_NS, &second),
            Reason::DropSnatExhausted,
            "an assured flow gave up its port"
        );
        let before = counted(dp, Reason::FwdEstablished);
        let (verdict, _) = dp.run(&first.build(), dp.client_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(counted(dp, Reason::FwdEstablished) - before, 1);
        println!("one port: an idle unassured flow yields it, an assured one keeps it");
    });
}

/// Prints the size of the loaded `xlb` program (IPv4, and the hand-off of
/// IPv6 frames), of `xlb6`, `xlb6_frag` and `xlb6_icmp` as the verifier left them (xlated) and as
/// JITed, for comparing builds.
#[test]
fn program_size() {
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        for name in [
            lb_common::maps::PROGRAM,
            lb_common::maps::PROGRAM6,
            lb_common::maps::PROGRAM6_FRAG,
            lb_common::maps::PROGRAM6_ICMP,
        ] {
            let info = dp.program_named(name).info().expect("program info");
            let xlated = info.size_translated().unwrap_or(0) / 8;
            println!(
                "{name}: {xlated} xlated instructions, {} bytes JITed, {} instructions \
                 processed by the verifier",
                info.size_jitted(),
                info.verified_instruction_count().unwrap_or(0)
            );
            assert!(xlated > 0);
        }
        for name in [
            lb_common::maps::FLOWS,
            lb_common::maps::FLOWS6,
            lb_common::maps::FLOWS_NEW,
            lb_common::maps::FLOWS_NEW6,
        ] {
            let decl = lb_common::maps::MAPS.iter().find(|map| map.name == name);
            let entries = decl.map_or(0, |map| u64::from(map.max_entries));
            let memlock = dp.map_memlock(name).unwrap_or(0);
            println!(
                "{name}: {entries} entries, {memlock} bytes, {} bytes an entry",
                memlock / entries.max(1)
            );
        }
    });
}

/// The programs as `--datapath-debug` loads them (the logging branches
/// kept) stay within the verifier's million instructions; prints how many
/// it processed.
#[test]
fn datapath_debug_variant_loads() {
    let mut bpf = aya::EbpfLoader::new()
        .override_global("XLB_DEBUG", &1u32, true)
        .load(xlb::DATAPATH_OBJECT)
        .expect("load the object");
    for name in [
        lb_common::maps::PROGRAM,
        lb_common::maps::PROGRAM6,
        lb_common::maps::PROGRAM6_FRAG,
        lb_common::maps::PROGRAM6_ICMP,
    ] {
        let program: &mut aya::programs::Xdp = bpf
            .program_mut(name)
            .expect("program")
            .try_into()
            .expect("an XDP program");
        if let Err(error) = program.load() {
            let log = format!("{error:?}");
            panic!(
                "{name} with debug logs: {}",
                &log[log.len().saturating_sub(600)..]
            );
        }
        let info = program.info().expect("program info");
        println!(
            "{name} with debug logs: {} instructions processed by the verifier",
            info.verified_instruction_count().unwrap_or(0)
        );
    }
}
