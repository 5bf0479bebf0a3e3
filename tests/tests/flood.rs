//! A SYN flood at the TCP NodePort (issue 10): 100,000 spoofed SYNs from
//! silent sources, sent by the bench's generator (a tc program cloning a
//! test skb out of the wire, `xlb_bench::send_generated`) from a
//! namespace of its own as fast as one core goes, while an established TCP
//! stream and a UDP stream run. Half-open flows live in `XLB_FLOWS_NEW`, so
//! the flood can neither evict those flows nor keep masquerade ports.
//!
//! ```text
//!  gen ns  eth0 ---- xlb-g  node ns (xlb on xlb-g, xlb-c, xlb-bN)
//!  client ns eth0 -- xlb-c
//! ```

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::SchedClassifier,
};
use lb_common::{Flow, FlowKey, Reason};
use xlb_bench_ebpf::{
    GenConfig,
    template::{Segment, Sources, Template},
};
use xlb_tests::client::{IO_TIMEOUT, pattern, tcp_who_echo, udp_socket};
use xlb_tests::lab::{NODE_ADDR, TCP_ECHO_NODE_PORT, tcp_echo_service, udp_echo_service};
use xlb_tests::netns::{mac_str, unique_stem};
use xlb_tests::{Agent, Bpffs, Lab, Netns, poll_until};

/// SYNs in the flood.
const FLOOD: u32 = 100_000;
/// Spoofed sources: 198.18.0.200 and .201 (two addresses: one has only 64k
/// ports), on the client subnet but with no neighbour entry, so the node
/// never delivers the backends' SYN-ACKs: nobody ever answers them.
const SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
const SPOOFED_PORTS: u16 = 50_000;
/// The documented default is 60 s; the test uses a short one.
const SYN_TIMEOUT_S: u64 = 3;
/// The agent's conntrack sweep period (lb-userspace/src/agent.rs GC_PERIOD).
const GC_PERIOD_S: u64 = 5;
const GEN_MAC: [u8; 6] = [0x02, 0x78, 0x6c, 0xee, 0, 2];
const NODE_GEN_MAC: [u8; 6] = [0x02, 0x78, 0x6c, 0xee, 0, 1];
/// A SYN template to NODE_ADDR:30999 (source address and port filled in per
/// frame by the generator).
fn syn_flood_config() -> GenConfig {
    let template = Template {
        dst_mac: NODE_GEN_MAC,
        src_mac: GEN_MAC,
        dst_addr: NODE_ADDR.octets(),
        dst_port: TCP_ECHO_NODE_PORT,
        segment: Segment::TcpSyn {
            seq: 0x1234_5678,
            window: 64_240,
        },
    };
    template.config(Sources {
        addr_base: u32::from(SPOOFED),
        flows: 0,
        port_base: 1024,
        port_span: SPOOFED_PORTS,
    })
}

/// The generator's namespace and its link to the node.
fn generator_namespace(lab: &Lab) -> anyhow::Result<Netns> {
    let gen_ns = Netns::create(format!("{}-gen", unique_stem()))?;
    lab.node.ip_line(&format!(
        "link add xlb-g address {} type veth peer name eth0 address {} netns {}",
        mac_str(NODE_GEN_MAC),
        mac_str(GEN_MAC),
        gen_ns.name()
    ))?;
    lab.node.ip_line("addr add 198.18.250.1/24 dev xlb-g")?;
    lab.node.ip_line("link set xlb-g up")?;
    gen_ns.ip_line("addr add 198.18.250.2/24 dev eth0")?;
    gen_ns.ip_line("link set eth0 up")?;
    Ok(gen_ns)
}

/// Rounds of the generator at most: a veth drops what its peer's ring
/// cannot take, so a fast generator may need a second round to put `FLOOD`
/// SYNs through the node's XDP program.
const FLOOD_ROUNDS: u32 = 5;

/// Sends SYNs with the bench's generator from `gen_ns`, on one core as
/// fast as it goes, until the node's datapath has seen `FLOOD` of them
/// (`reached` says how many so far; every frame is a new tuple); returns how
/// long that took and how many frames were sent.
fn flood(
    gen_ns: &Netns,
    reached: impl Fn() -> anyhow::Result<u64> + Send + Sync,
) -> anyhow::Result<(Duration, u64)> {
    gen_ns.run(|| -> anyhow::Result<(Duration, u64)> {
        let mut ebpf = xlb_bench::load_trafficgen()?;
        let mut config: Array<_, GenConfig> = Array::try_from(
            ebpf.map_mut("GEN_CONFIG")
                .ok_or_else(|| anyhow!("GEN_CONFIG missing"))?,
        )?;
        config.set(
            0,
            GenConfig {
                ifindex: nix_ifindex("eth0")?,
                ..syn_flood_config()
            },
            0,
        )?;
        let program: &SchedClassifier = ebpf
            .program("xlb_trafficgen")
            .ok_or_else(|| anyhow!("xlb_trafficgen missing"))?
            .try_into()?;
        let started = Instant::now();
        let mut requested = 0u64;
        for _ in 0..FLOOD_ROUNDS {
            let missing = u64::from(FLOOD).saturating_sub(reached()?);
            if missing == 0 {
                break;
            }
            xlb_bench::send_generated(program, u32::try_from(missing)?)?;
            requested += missing;
        }
        let elapsed = started.elapsed();
        let sent: Array<_, u64> =
            Array::try_from(ebpf.map("GEN_SENT").ok_or_else(|| anyhow!("GEN_SENT"))?)?;
        let sent = sent.get(&0, 0)?;
        ensure!(sent == requested, "generator short: {sent} of {requested}");
        Ok((elapsed, sent))
    })?
}

fn nix_ifindex(name: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "no interface {name:?}");
    Ok(index)
}

/// Per-reason packet counters from the agent's pinned `XLB_STATS`.
fn stats(bpffs: &Bpffs) -> anyhow::Result<Vec<u64>> {
    let data = MapData::from_pin(bpffs.path().join("maps/XLB_STATS"))?;
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::from_map_data(data)?)?;
    Reason::ALL
        .iter()
        .map(|reason| Ok(map.get(&(*reason as u32), 0)?.iter().sum()))
        .collect()
}

/// Entries in the agent's pinned conntrack table `name`.
fn entries(bpffs: &Bpffs, name: &str) -> anyhow::Result<Vec<(FlowKey, Flow)>> {
    let data = MapData::from_pin(bpffs.path().join("maps").join(name))?;
    let map: HashMap<_, FlowKey, Flow> = HashMap::try_from(Map::from_map_data(data)?)?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

fn from_spoofed(key: &FlowKey) -> bool {
    let first = u32::from(SPOOFED);
    let src = u32::from_be(key.src_addr_be);
    (first..first + 2).contains(&src)
}

/// The half-open table shows in /metrics (`xlb_conntrack_half_open_entries`)
/// and in `xlb flows` (state `syn_received`), as the README says.
fn half_open_is_visible(lab: &Lab, bpffs: &Bpffs, entries: usize) -> anyhow::Result<()> {
    let metrics_address = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, 9090));
    let metrics = lab
        .node
        .run(move || xlb::observe::http::get(metrics_address, "/metrics"))??
        .1;
    let gauge: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("xlb_conntrack_half_open_entries "))
        .context("no xlb_conntrack_half_open_entries in /metrics")?
        .parse()?;
    // The agent's sweep and the datapath may have changed it since.
    ensure!(
        gauge >= (entries / 2) as f64,
        "xlb_conntrack_half_open_entries {gauge}, {entries} entries read"
    );
    let xlb = xlb_tests::bin_from_env(xlb_tests::XLB_BIN_ENV)?;
    let output = lab
        .node
        .command(&xlb)
        .args([
            "flows",
            "--state",
            "syn_received",
            "--limit",
            "1",
            "--json",
            "--bpffs",
        ])
        .arg(bpffs.path())
        .output()?;
    ensure!(output.status.success(), "xlb flows: {output:?}");
    let flows: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let matched = flows["matched"].as_u64().context("matched")?;
    ensure!(matched > 0, "xlb flows shows no syn_received flow: {flows}");
    println!(
        "visible: xlb_conntrack_half_open_entries {gauge}, xlb flows: {matched} syn_received flows"
    );
    Ok(())
}

#[test]
fn syn_flood_spares_established_flows_and_new_clients() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let gen_ns = generator_namespace(&lab)?;
    let config = format!(
        "node:\n  interfaces: [xlb-c, xlb-g, xlb-b1, xlb-b2]\n  addresses: [{NODE_ADDR}]\n\
         services:\n\
         \x20 - {{name: tcp-echo, protocol: TCP, nodePort: 30999, targetPort: 3333,\n\
         \x20     backends: [{{address: 198.18.1.2}}, {{address: 198.18.2.2}}]}}\n\
         \x20 - {{name: udp-echo, protocol: UDP, nodePort: 30998, targetPort: 4444,\n\
         \x20     backends: [{{address: 198.18.1.2}}, {{address: 198.18.2.2}}]}}\n\
         conntrack:\n  tcpSynTimeoutSeconds: {SYN_TIMEOUT_S}\n"
    );
    let config = lab.write_file("flood.yaml", &config)?;
    let bpffs = Bpffs::mount(&lab)?;
    let bpffs_arg = bpffs.arg();
    let agent = Agent::start_with(
        &xlb_tests::bin_from_env(xlb_tests::XLB_BIN_ENV)?,
        &lab,
        &config,
        &["--bpffs", bpffs_arg.as_str()],
    )?;

    // The established TCP stream and the UDP stream, opened before the flood.
    let (mut stream, udp) = lab.client.run(|| -> anyhow::Result<_> {
        let stream = TcpStream::connect_timeout(&tcp_echo_service(), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok((stream, udp_socket()?))
    })??;
    let stop = AtomicBool::new(false);
    let before = stats(&bpffs)?;
    let (tcp_rounds, udp_result, flood_time) = std::thread::scope(|scope| {
        let tcp = scope.spawn(|| -> anyhow::Result<u64> {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) || rounds < 10 {
                let chunk = pattern(1_000, rounds as u32);
                stream.write_all(&chunk).context("TCP stream write")?;
                let mut echoed = vec![0u8; chunk.len()];
                stream
                    .read_exact(&mut echoed)
                    .with_context(|| format!("TCP stream read, round {rounds}"))?;
                ensure!(echoed == chunk, "TCP stream corrupted at round {rounds}");
                rounds += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(rounds)
        });
        let udp = scope.spawn(|| -> anyhow::Result<(u64, u64)> {
            let (mut sent, mut echoed) = (0u64, 0u64);
            let mut buf = [0u8; 64];
            udp.set_read_timeout(Some(Duration::from_secs(2)))?;
            while !stop.load(Ordering::Relaxed) || sent < 10 {
                let payload = format!("datagram {sent}");
                udp.send_to(payload.as_bytes(), udp_echo_service())?;
                sent += 1;
                if let Ok((len, _)) = udp.recv_from(&mut buf)
                    && buf[..len] == *payload.as_bytes()
                {
                    echoed += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok((sent, echoed))
        });
        std::thread::sleep(Duration::from_millis(300));
        let new_flows = || -> anyhow::Result<u64> {
            let now = stats(&bpffs)?;
            let new_flow = Reason::FwdNewFlow as usize;
            Ok(now[new_flow] - before[new_flow])
        };
        let flood_time = flood(&gen_ns, new_flows);
        let flood_ended = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let tcp = tcp.join().map_err(|_| anyhow!("TCP stream panicked"));
        let udp = udp.join().map_err(|_| anyhow!("UDP stream panicked"));
        (tcp, udp, flood_time.map(|time| (time, flood_ended)))
    });
    let ((flood_time, flood_frames), flood_ended) = flood_time?;
    let tcp_rounds = tcp_rounds??;
    let (udp_sent, udp_echoed) = udp_result??;
    let during = stats(&bpffs)?;
    let grew = |reason: Reason| during[reason as usize] - before[reason as usize];
    println!(
        "flood: {flood_frames} SYNs sent in {flood_time:?} ({:.0}/s); new flows {}, SYN-ACKs to silent \
         sources dropped {}, masquerade exhausted {}, flow insert failed {}; TCP stream {tcp_rounds} round trips; \
         UDP {udp_echoed}/{udp_sent} echoed",
        flood_frames as f64 / flood_time.as_secs_f64(),
        grew(Reason::FwdNewFlow),
        grew(Reason::DropNoNeighbour),
        grew(Reason::DropSnatExhausted),
        grew(Reason::DropFlowInsert),
    );
    ensure!(
        grew(Reason::FwdNewFlow) >= u64::from(FLOOD) * 9 / 10,
        "the flood did not reach the datapath: {} new flows",
        grew(Reason::FwdNewFlow)
    );
    // 16,384 half-open flows hold at most about a third of each backend's
    // 28,976 ports, so 16 independent port tries almost never all fail.
    ensure!(
        grew(Reason::DropSnatExhausted) <= u64::from(FLOOD) / 10_000,
        "{} new flows found no masquerade port during the flood",
        grew(Reason::DropSnatExhausted)
    );
    ensure!(
        udp_echoed == udp_sent,
        "the UDP stream lost {} of {udp_sent} datagrams during the flood",
        udp_sent - udp_echoed
    );
    let half_open = entries(&bpffs, lb_common::maps::FLOWS_NEW)?;
    let established = entries(&bpffs, lb_common::maps::FLOWS)?;
    let keys: std::collections::HashSet<FlowKey> = half_open.iter().map(|(key, _)| *key).collect();
    let replies = half_open
        .iter()
        .filter(|(_, flow)| flow.direction == lb_common::flow::FLOW_DIR_REPLY)
        .count();
    let unpaired = half_open
        .iter()
        .filter(|(key, flow)| !keys.contains(&FlowKey::peer_of(flow, key.proto)))
        .count();
    println!(
        "after the flood: {} half-open entries ({replies} reply entries, {unpaired} without their peer), \
         {} in XLB_FLOWS ({} of them from spoofed sources)",
        half_open.len(),
        established.len(),
        established
            .iter()
            .filter(|(key, _)| from_spoofed(key))
            .count()
    );
    ensure!(
        !established.iter().any(|(key, _)| from_spoofed(key)),
        "a spoofed SYN became an established flow"
    );
    half_open_is_visible(&lab, &bpffs, half_open.len())?;

    // 60 legitimate new connections, right after the flood.
    let failures = lab.client.run(|| {
        (0..60u32)
            .filter_map(|index| {
                tcp_who_echo(tcp_echo_service(), &pattern(100, index))
                    .err()
                    .map(|error| format!("connection {index}: {error:#}"))
            })
            .collect::<Vec<_>>()
    })?;
    let after = stats(&bpffs)?;
    ensure!(
        failures.is_empty(),
        "{} of 60 new connections failed after the flood (drop_snat_exhausted grew by {}): {failures:#?}",
        failures.len(),
        after[Reason::DropSnatExhausted as usize] - during[Reason::DropSnatExhausted as usize]
    );

    // The half-open flows go after the (short) SYN timeout plus a sweep.
    let deadline = Duration::from_secs(SYN_TIMEOUT_S + 2 * GC_PERIOD_S + 5);
    let started = flood_ended;
    let gone = poll_until("half-open flood flows to go", deadline, || {
        let left = entries(&bpffs, lb_common::maps::FLOWS_NEW).ok()?;
        (!left.iter().any(|(key, _)| from_spoofed(key))).then_some(())
    });
    if let Err(error) = gone {
        let left = entries(&bpffs, lb_common::maps::FLOWS_NEW)?;
        bail!(
            "{error}: {} half-open entries left {:?} after the flood{}",
            left.len(),
            started.elapsed(),
            agent.log()
        );
    }
    println!(
        "half-open flood flows gone {:?} after the flood (SYN timeout {SYN_TIMEOUT_S} s, sweep every {GC_PERIOD_S} s)",
        started.elapsed()
    );
    drop(agent);
    drop(gen_ns);
    Ok(())
}
