//! Zero-loss updates: a UDP stream to an unchanged service across 100
//! reloads; established TCP connections across reloads, backend changes of
//! other services and an agent restart (maps and XDP links pinned on a
//! bpffs of the test's own, adopted by the next agent); `--keep-attached`,
//! `xlb detach` and the clean detach without it.
//!
//! Measured figures are printed (`cargo xtask test -- --nocapture`).

#[path = "semantics/stream.rs"]
mod stream;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use xlb_tests::agent::RELOAD_TIMEOUT;
use xlb_tests::lab::{NODE_ADDR, NODE_CLIENT_IF};
use xlb_tests::{Agent, Bpffs, Lab, XLB_BIN_ENV, bin_from_env};

use stream::{Connection, SocketDrops, Stream, counter};

const UDP_PORT: u16 = 30960;
const TCP_PORT: u16 = 30961;
const OTHER_PORT: u16 = 30962;

/// udp-echo and tcp-echo with both backends, plus an `other` service whose
/// backends change with `round`.
fn services(round: usize) -> String {
    let both = "      - address: 198.18.1.2\n      - address: 198.18.2.2\n";
    let other = match round % 3 {
        0 => "      - address: 198.18.1.2\n",
        1 => "      - address: 198.18.2.2\n        weight: 2\n      - address: 198.18.1.2\n",
        _ => "      - address: 198.18.2.2\n",
    };
    format!(
        "  - name: udp-echo\n    protocol: UDP\n    nodePort: {UDP_PORT}\n    targetPort: 4444\n    backends:\n{both}\
         \n  - name: tcp-echo\n    protocol: TCP\n    nodePort: {TCP_PORT}\n    targetPort: 3333\n    backends:\n{both}\
         \n  - name: other\n    protocol: UDP\n    nodePort: {OTHER_PORT}\n    targetPort: 4444\n    backends:\n{other}"
    )
}

fn node_port(port: u16) -> SocketAddr {
    SocketAddr::from((NODE_ADDR, port))
}

fn start<'lab>(lab: &'lab Lab, config: &Path, args: &[&str]) -> anyhow::Result<Agent<'lab>> {
    Ok(Agent::start_with(
        &bin_from_env(XLB_BIN_ENV)?,
        lab,
        config,
        args,
    )?)
}

fn xdp_attached(lab: &Lab) -> anyhow::Result<bool> {
    let link = lab.node.ip(&["link", "show", NODE_CLIENT_IF])?;
    Ok(link.contains("prog/xdp"))
}

fn exchange_all(connections: &mut [Connection], when: &str) -> anyhow::Result<()> {
    for connection in connections {
        let backend = connection.who.name.clone();
        connection
            .exchange()
            .with_context(|| format!("{when}: connection to {backend}"))?;
    }
    Ok(())
}

#[test]
fn udp_stream_loses_nothing_across_100_reloads() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services(0)))?;
    let mut agent = Agent::start(&lab, &config)?;

    let drops = SocketDrops::start(&[&lab.client, &lab.backends[0].netns, &lab.backends[1].netns]);
    let stream = Stream::start(&lab.client, node_port(UDP_PORT))?;
    std::thread::sleep(Duration::from_millis(200));
    let first = stream.who()?;
    let reloads = 100;
    for round in 1..=reloads {
        lab.write_file("xlb.yaml", &lab.config_yaml(&services(round)))?;
        agent.reload_and_wait()?;
    }
    std::thread::sleep(Duration::from_millis(200));
    let last = stream.who()?;
    let report = stream.finish()?;
    let drops = drops.since_start();
    let exit = agent.stop()?;
    println!(
        "{reloads} reloads (another service's backends changing each time) under a {}/s UDP \
         stream to an unchanged service: {report}; socket buffer drops {drops}; datapath: {}",
        stream::RATE,
        exit.log
            .lines()
            .filter(|l| l.contains("packet counters"))
            .collect::<String>()
    );
    assert_eq!(first.name, last.name, "the stream's flow changed backend");
    // Every datagram comes back, but for any a starved receiver's socket
    // buffer dropped on a busy machine (not the path through xlb).
    assert_eq!(
        report.lost_beyond(drops),
        0,
        "{report}; {drops} socket drops"
    );
    Ok(())
}

#[test]
fn tcp_connections_survive_reloads_and_an_agent_restart() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let bpffs = Bpffs::mount(&lab)?;
    let dir = bpffs.arg();
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services(0)))?;
    let pinned = ["--bpffs", dir.as_str(), "--keep-attached"];
    let mut agent = start(&lab, &config, &pinned)?;
    assert_eq!(bpffs.pins("links"), ["xlb-b1", "xlb-b2", NODE_CLIENT_IF]);
    assert_eq!(bpffs.pins("maps").len(), 30, "{:?}", bpffs.pins("maps"));

    let mut connections = (0..8)
        .map(|_| Connection::open(&lab.client, node_port(TCP_PORT)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut backends: Vec<&str> = connections.iter().map(|c| c.who.name.as_str()).collect();
    backends.sort_unstable();
    backends.dedup();
    println!("8 TCP connections to backends {backends:?}");
    exchange_all(&mut connections, "after connecting")?;

    // Reloads that change another service's backends.
    for round in 1..=20 {
        lab.write_file("xlb.yaml", &lab.config_yaml(&services(round)))?;
        agent.reload_and_wait()?;
        exchange_all(&mut connections, &format!("after reload {round}"))?;
    }

    // The agent stops with --keep-attached: the datapath goes on alone.
    let drops = SocketDrops::start(&[&lab.client, &lab.backends[0].netns, &lab.backends[1].netns]);
    let stream = Stream::start(&lab.client, node_port(UDP_PORT))?;
    std::thread::sleep(Duration::from_millis(300));
    let exit = agent.stop_cleanly()?;
    assert!(xdp_attached(&lab)?, "XDP must stay attached:\n{}", exit.log);
    std::thread::sleep(Duration::from_millis(300));
    exchange_all(&mut connections, "while no agent runs")?;
    let alone = Connection::open(&lab.client, node_port(TCP_PORT))?;
    println!(
        "with no agent running: 8 connections still echo, a new one reached {}",
        alone.who.name
    );

    // A new agent adopts the pinned maps and links.
    let second = start(&lab, &config, &["--bpffs", dir.as_str()])?;
    let adopted = second.log();
    std::thread::sleep(Duration::from_millis(300));
    let report = stream.finish()?;
    let drops = drops.since_start();
    exchange_all(&mut connections, "after the restart")?;
    let mut fresh = Connection::open(&lab.client, node_port(TCP_PORT))?;
    fresh.exchange()?;
    println!(
        "agent restart (stop with --keep-attached, start adopting the pins) under a {}/s UDP \
         stream: {report}; socket buffer drops {drops}",
        stream::RATE
    );
    assert!(
        adopted.contains("adopted the datapath pinned in"),
        "the second agent did not adopt the maps:\n{adopted}"
    );
    assert!(adopted.contains("pinned link adopted"), "{adopted}");
    // Adoption is exact: the same config writes only the three services'
    // selection tables, each swapped in place with the same slots (tables
    // are not read back: the outer map gives map ids, and opening a map by
    // id needs CAP_SYS_ADMIN), and no entry.
    assert!(
        adopted.contains("applied config generation 1 (3 ops)"),
        "{adopted}"
    );
    assert_eq!(
        report.lost_beyond(drops),
        0,
        "{report}; {drops} socket drops"
    );

    // Without --keep-attached, stopping detaches and removes the pins.
    drop(connections);
    let exit = second.stop_cleanly()?;
    assert!(
        !xdp_attached(&lab)?,
        "still attached after a plain stop:\n{}",
        exit.log
    );
    assert!(bpffs.pins("maps").is_empty(), "{:?}", bpffs.pins("maps"));
    assert!(bpffs.pins("links").is_empty(), "{:?}", bpffs.pins("links"));
    // The stats map was adopted too: the counters cover both agents.
    assert!(counter(&exit.log, "fwd_established") > 0, "{}", exit.log);
    Ok(())
}

#[test]
fn detach_removes_what_keep_attached_left() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let bpffs = Bpffs::mount(&lab)?;
    let dir = bpffs.arg();
    let services = "  - name: udp-echo\n    protocol: UDP\n    nodePort: 30963\n    targetPort: 4444\n    backends:\n      - address: 198.18.1.2\n";
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(services))?;
    let agent = start(&lab, &config, &["--bpffs", dir.as_str(), "--keep-attached"])?;
    agent.stop()?;
    assert!(xdp_attached(&lab)?);
    assert_eq!(bpffs.pins("links"), ["xlb-b1", NODE_CLIENT_IF]);

    let output = lab
        .node
        .command(bin_from_env(XLB_BIN_ENV)?)
        .args(["detach", "--bpffs", dir.as_str()])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("xlb detach: {}", stdout.trim());
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("XDP detached from xlb-b1, xlb-c; 30 maps unpinned"),
        "{stdout}"
    );
    assert!(!xdp_attached(&lab)?);
    assert!(bpffs.pins("maps").is_empty() && bpffs.pins("links").is_empty());
    Ok(())
}

#[test]
fn bpffs_given_explicitly_must_be_a_bpffs() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let services = "  - name: udp-echo\n    protocol: UDP\n    nodePort: 30964\n    targetPort: 4444\n    backends:\n      - address: 198.18.1.2\n";
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(services))?;
    let not_bpffs = lab.dir().join("plain");
    let output = lab
        .node
        .command(bin_from_env(XLB_BIN_ENV)?)
        .args(["run", "--config"])
        .arg(&config)
        .arg("--bpffs")
        .arg(&not_bpffs)
        .env("RUST_LOG", "info")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("xlb run --bpffs {}: {}", not_bpffs.display(), stderr.trim());
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("mount -t bpf bpf {}", not_bpffs.display())),
        "{stderr}"
    );
    assert!(!xdp_attached(&lab)?);

    // The default directory falls back to running unpinned, with a warning
    // (inside `ip netns exec` /sys/fs/bpf is no bpffs).
    let agent = Agent::start(&lab, &config)?;
    assert!(agent.log().contains("running unpinned"), "{}", agent.log());
    Ok(())
}

/// `services(0)` and `extra` more UDP services, each with a weight-0
/// backend of its own (written, given an id, never chosen).
fn grown_services(extra: u16) -> String {
    let mut text = services(0);
    for index in 0..extra {
        let port = OTHER_PORT + 1 + index;
        let idle = 20 + index;
        text.push_str(&format!(
            "\n  - name: more-{index}\n    protocol: UDP\n    nodePort: {port}\n    targetPort: 4444\n    backends:\n\
             \x20     - address: 198.18.1.2\n      - address: 198.18.2.2\n\
             \x20     - address: 198.18.1.{idle}\n        weight: 0\n"
        ));
    }
    text
}

/// A config that needs more frontends and backend ids than the maps have:
/// the agent starts itself again in place with larger maps (same pid), the
/// pinned datapath forwards meanwhile, the new maps give every backend and
/// service the id the old ones did, and established connections keep
/// their backends.
#[test]
fn full_maps_grow_in_place_and_flows_keep_their_backends() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let bpffs = Bpffs::mount(&lab)?;
    let dir = bpffs.arg();
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services(0)))?;
    // 3 frontends and 4 backends (ids 1-4): full.
    let args = ["--bpffs", dir.as_str(), "--map-capacity", "4,5"];
    let mut agent = start(&lab, &config, &args)?;
    let mut connections = (0..8)
        .map(|_| Connection::open(&lab.client, node_port(TCP_PORT)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    exchange_all(&mut connections, "after connecting")?;
    let drops = SocketDrops::start(&[&lab.client, &lab.backends[0].netns, &lab.backends[1].netns]);
    let stream = Stream::start(&lab.client, node_port(UDP_PORT))?;
    std::thread::sleep(Duration::from_millis(300));

    // 7 frontends and 8 backends.
    lab.write_file("xlb.yaml", &lab.config_yaml(&grown_services(4)))?;
    let since = agent.log().len();
    agent.reload()?;
    let grew = agent.wait_for_log(since, "growing the maps from 4,5 to", RELOAD_TIMEOUT)?;
    let applied = agent.wait_for_log(since, "applied config generation 1 (", RELOAD_TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(300));
    let report = stream.finish()?;
    let drops = drops.since_start();
    let log = agent.log();
    let after = log.get(since..).unwrap_or_default();
    println!("{grew}\n{applied}\nUDP stream across the growth: {report}; socket drops {drops}");
    ensure!(agent.is_running(), "the agent exited:\n{after}");
    ensure!(grew.contains("to 8,16"), "{grew}");
    ensure!(
        after.contains(
            "configuration maps recreated at 8 frontends and 16 backend ids: the first plan \
             keeps the ids of 4 backends and 3 frontends"
        ),
        "{after}"
    );
    ensure!(
        !after.contains("does not fit the datapath's maps"),
        "{after}"
    );
    exchange_all(&mut connections, "after the maps grew")?;
    ensure!(
        report.lost_beyond(drops) == 0,
        "{report}; {drops} socket drops"
    );
    // Every new service answers, from a live backend.
    for index in 0..4 {
        let target = node_port(OTHER_PORT + 1 + index);
        let (who, _) = lab.client.run(|| {
            let socket = xlb_tests::client::udp_socket()?;
            xlb_tests::client::udp_who(&socket, target)
        })??;
        ensure!(who.name.starts_with("backend-"), "{target}: {}", who.name);
    }
    let exit = agent.stop_cleanly()?;
    ensure!(!exit.log.contains("panicked"), "{}", exit.log);
    Ok(())
}
