//! kube-proxy's service semantics, end to end through the netns lab with
//! real sockets: weighted Maglev, session affinity, endpoint conditions,
//! externalTrafficPolicy, services without endpoints, source ranges, and
//! flows of a removed backend re-balanced without loss.
//!
//! Measured figures are printed (`cargo xtask test -- --nocapture`).

#[path = "semantics/stream.rs"]
mod stream;

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::ensure;
use xlb_tests::client::{IO_TIMEOUT, Who, tcp_who_echo, udp_socket, udp_who};
use xlb_tests::lab::{CLIENT_ADDR, NODE_ADDR, POD_IF};
use xlb_tests::{Agent, Lab};

use stream::{SocketDrops, Stream, counter};

/// The lab's config with `services` plus other top-level sections.
fn config_with(lab: &Lab, services: &str, extra: &str) -> String {
    format!("{}\n{extra}", lab.config_yaml(services))
}

/// A service block for `Lab::config_yaml`: `fields` are extra service keys
/// (each line indented by four spaces), `backends` the backend list items
/// (each `- address: ...` with its keys, indented by six and eight).
fn service(name: &str, protocol: &str, node_port: u16, fields: &str, backends: &str) -> String {
    let target = if protocol == "UDP" { 4444 } else { 3333 };
    format!(
        "  - name: {name}\n    protocol: {protocol}\n    nodePort: {node_port}\n    targetPort: {target}\n{fields}    backends:\n{backends}"
    )
}

/// `- address: 198.18.N.2` plus `keys` (each `key: value`).
fn backend(index: u8, keys: &[&str]) -> String {
    let mut item = format!("      - address: 198.18.{index}.2\n");
    for key in keys {
        item.push_str(&format!("        {key}\n"));
    }
    item
}

fn node_port(port: u16) -> SocketAddr {
    SocketAddr::from((NODE_ADDR, port))
}

/// New UDP flows (a fresh socket each) to `target`: backends by name.
fn udp_flows(
    lab: &Lab,
    target: SocketAddr,
    flows: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    count_flows(lab, flows, |_| {
        let (who, from) = udp_who(&udp_socket()?, target)?;
        ensure!(from == target, "reply from {from}, expected {target}");
        Ok(who)
    })
}

fn tcp_flows(
    lab: &Lab,
    target: SocketAddr,
    flows: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    count_flows(lab, flows, |flow| {
        tcp_who_echo(target, format!("flow {flow}").as_bytes())
    })
}

/// `flows` flows from the client, each made by `flow`: backends by name.
fn count_flows(
    lab: &Lab,
    flows: usize,
    flow: impl Fn(usize) -> anyhow::Result<Who> + Send,
) -> anyhow::Result<BTreeMap<String, usize>> {
    lab.client.run(move || {
        let mut counts = BTreeMap::new();
        for index in 0..flows {
            *counts.entry(flow(index)?.name).or_default() += 1;
        }
        Ok(counts)
    })?
}

fn names(counts: &BTreeMap<String, usize>) -> Vec<&str> {
    counts.keys().map(String::as_str).collect()
}

#[test]
fn weights_three_to_one_split_new_flows_75_25() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let services = service(
        "weighted",
        "UDP",
        30970,
        "",
        &(backend(1, &["weight: 3"]) + &backend(2, &["weight: 1"])),
    );
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services))?;
    let _agent = Agent::start(&lab, &config)?;

    let flows = 2000;
    let counts = udp_flows(&lab, node_port(30970), flows)?;
    let heavy = counts.get("backend-1").copied().unwrap_or(0) as f64 / flows as f64;
    println!(
        "weighted Maglev 3:1: {flows} new UDP flows -> {counts:?} ({:.1}% / {:.1}%)",
        heavy * 100.0,
        (1.0 - heavy) * 100.0
    );
    // The table gives 75.0% +- 0.1%; 2000 flows add a sampling spread of
    // about 1% (one standard deviation).
    assert!(
        (0.70..=0.80).contains(&heavy),
        "backend-1 got {heavy:.3} of new flows: {counts:?}"
    );
    Ok(())
}

#[test]
fn removing_one_of_four_backends_moves_about_a_quarter_of_flows() -> anyhow::Result<()> {
    let lab = Lab::new(4)?;
    let all: String = (1..=4).map(|index| backend(index, &[])).collect();
    let three: String = (1..=3).map(|index| backend(index, &[])).collect();
    // Flows expire a second after their last packet, so the same 5-tuples
    // come back as new flows and show where the table sends them.
    let conntrack = "conntrack:\n  udpTimeoutSeconds: 1\n";
    let config = lab.write_file(
        "xlb.yaml",
        &config_with(&lab, &service("maglev", "UDP", 30971, "", &all), conntrack),
    )?;
    let mut agent = Agent::start(&lab, &config)?;

    let target = node_port(30971);
    let ports: Vec<u16> = (20_000..20_600).collect();
    let round = |lab: &Lab| -> anyhow::Result<Vec<String>> {
        lab.client.run(|| -> anyhow::Result<Vec<String>> {
            ports
                .iter()
                .map(|&port| {
                    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                    socket.set_read_timeout(Some(IO_TIMEOUT))?;
                    let (who, _) = udp_who(&socket, target)?;
                    Ok(who.name)
                })
                .collect()
        })?
    };
    let before = round(&lab)?;
    lab.write_file(
        "xlb.yaml",
        &config_with(
            &lab,
            &service("maglev", "UDP", 30971, "", &three),
            conntrack,
        ),
    )?;
    agent.reload_and_wait()?;
    std::thread::sleep(Duration::from_millis(2500));
    let after = round(&lab)?;

    let on_removed = before.iter().filter(|name| *name == "backend-4").count();
    let moved: usize = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let needless = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| *b != "backend-4" && b != a)
        .count();
    println!(
        "Maglev removal 4 -> 3 backends: {} flows, {on_removed} were on the removed backend, \
         {moved} moved ({:.1}%; ideal 25%), {needless} of {} others moved needlessly",
        ports.len(),
        moved as f64 * 100.0 / ports.len() as f64,
        ports.len() - on_removed
    );
    assert!(after.iter().all(|name| name != "backend-4"));
    let others = (ports.len() - on_removed) as f64;
    assert!(
        (needless as f64) <= others * 0.08,
        "{needless} of {others} flows left a backend that stayed"
    );
    assert!(
        moved as f64 <= ports.len() as f64 * 0.35,
        "{moved} of {} flows moved",
        ports.len()
    );
    Ok(())
}

#[test]
fn client_ip_affinity_sends_every_flow_of_a_client_to_one_backend() -> anyhow::Result<()> {
    let lab = Lab::new(3)?;
    let all: String = (1..=3).map(|index| backend(index, &[])).collect();
    let affinity = "    sessionAffinity: ClientIP\n    sessionAffinityConfig:\n      clientIP:\n        timeoutSeconds: 60\n";
    let services = service("sticky-udp", "UDP", 30972, affinity, &all)
        + &service("sticky-tcp", "TCP", 30973, affinity, &all)
        + &service("loose-udp", "UDP", 30974, "", &all);
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services))?;
    let _agent = Agent::start(&lab, &config)?;

    let udp = udp_flows(&lab, node_port(30972), 60)?;
    let tcp = tcp_flows(&lab, node_port(30973), 20)?;
    let loose = udp_flows(&lab, node_port(30974), 60)?;
    println!("ClientIP affinity: UDP {udp:?}, TCP {tcp:?}; without affinity: {loose:?}");
    assert_eq!(udp.len(), 1, "60 UDP flows of one client: {udp:?}");
    assert_eq!(tcp.len(), 1, "20 TCP connections of one client: {tcp:?}");
    assert!(loose.len() > 1, "the control service spreads: {loose:?}");
    Ok(())
}

#[test]
fn terminating_endpoints_keep_their_flows_and_get_no_new_ones() -> anyhow::Result<()> {
    let lab = Lab::new(3)?;
    let ready = |index| backend(index, &[]);
    let terminating = |index| {
        backend(
            index,
            &["ready: false", "serving: true", "terminating: true"],
        )
    };
    let gone = |index| {
        backend(
            index,
            &["ready: false", "serving: false", "terminating: true"],
        )
    };
    let write = |backends: &str| -> anyhow::Result<std::path::PathBuf> {
        let services = service("web", "TCP", 30975, "", backends)
            + &service("dns", "UDP", 30976, "", backends);
        Ok(lab.write_file("xlb.yaml", &lab.config_yaml(&services))?)
    };
    let config = write(&(ready(1) + &ready(2) + &ready(3)))?;
    let mut agent = Agent::start(&lab, &config)?;
    let (tcp, udp) = (node_port(30975), node_port(30976));

    // A connection to backend-3, kept open throughout.
    let mut kept = None;
    for _ in 0..64 {
        let connection = stream::Connection::open(&lab.client, tcp)?;
        if connection.who.name == "backend-3" {
            kept = Some(connection);
            break;
        }
    }
    let Some(mut kept) = kept else {
        anyhow::bail!("no connection landed on backend-3 in 64 tries");
    };
    kept.exchange()?;

    // backend-3 terminating but serving: its connection goes on, new
    // flows go to the ready ones only.
    write(&(ready(1) + &ready(2) + &terminating(3)))?;
    agent.reload_and_wait()?;
    let new_udp = udp_flows(&lab, udp, 48)?;
    let new_tcp = tcp_flows(&lab, tcp, 24)?;
    kept.exchange()?;
    println!(
        "backend-3 terminating: new UDP flows {new_udp:?}, new TCP {new_tcp:?}; its connection still echoes"
    );
    assert_eq!(names(&new_udp), ["backend-1", "backend-2"]);
    assert_eq!(names(&new_tcp), ["backend-1", "backend-2"]);

    // No ready endpoint left: the serving terminating one takes new flows.
    write(&(gone(1) + &gone(2) + &terminating(3)))?;
    agent.reload_and_wait()?;
    let new_udp = udp_flows(&lab, udp, 16)?;
    kept.exchange()?;
    println!("only terminating endpoints: new UDP flows {new_udp:?}");
    assert_eq!(names(&new_udp), ["backend-3"]);

    // Not serving either: no endpoint at all, new flows are refused at once.
    write(&(gone(1) + &gone(2) + &gone(3)))?;
    agent.reload_and_wait()?;
    let (tcp_result, tcp_took, udp_result) = lab.client.run(|| -> anyhow::Result<_> {
        let started = Instant::now();
        let tcp_result = TcpStream::connect_timeout(&tcp, IO_TIMEOUT).map(drop);
        let took = started.elapsed();
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.connect(udp)?;
        socket.send(b"anyone?")?;
        let udp_result = socket.recv(&mut [0u8; 64]).map(drop);
        Ok((tcp_result, took, udp_result))
    })??;
    println!("no endpoints: TCP {tcp_result:?} after {tcp_took:?}, UDP {udp_result:?}");
    assert!(
        matches!(&tcp_result, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "{tcp_result:?}"
    );
    assert!(
        tcp_took < Duration::from_secs(1),
        "refused after {tcp_took:?}"
    );
    assert!(
        matches!(&udp_result, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "{udp_result:?}"
    );
    let exit = agent.stop()?;
    for name in ["reject_tcp_reset", "reject_port_unreachable"] {
        assert!(counter(&exit.log, name) >= 1, "no {name} in:\n{}", exit.log);
    }
    Ok(())
}

#[test]
fn local_traffic_policy_keeps_the_client_address() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let policy = "    externalTrafficPolicy: Local\n";
    let backends = backend(1, &["local: true"]) + &backend(2, &["local: false"]);
    let services = service("local-udp", "UDP", 30977, policy, &backends)
        + &service("local-tcp", "TCP", 30978, policy, &backends)
        + &service("remote-only", "UDP", 30979, policy, &backend(2, &[]));
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services))?;
    let agent = Agent::start(&lab, &config)?;

    let (udp_peers, tcp_peer, silent) = lab.client.run(|| -> anyhow::Result<_> {
        let mut peers = BTreeMap::new();
        for _ in 0..32 {
            let (who, from) = udp_who(&udp_socket()?, node_port(30977))?;
            ensure!(from == node_port(30977), "reply from {from}");
            *peers.entry((who.name, who.peer.ip())).or_insert(0) += 1;
        }
        let tcp = tcp_who_echo(node_port(30978), b"local")?;
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        socket.connect(node_port(30979))?;
        socket.send(b"WHO\n")?;
        let silent = socket.recv(&mut [0u8; 256]).map(drop);
        Ok((peers, (tcp.name, tcp.peer.ip()), silent))
    })??;
    println!(
        "externalTrafficPolicy Local: UDP (backend, peer seen) {udp_peers:?}; TCP {tcp_peer:?}; \
         no local backend: {silent:?}"
    );
    let client = std::net::IpAddr::V4(CLIENT_ADDR);
    assert_eq!(
        udp_peers.keys().cloned().collect::<Vec<_>>(),
        [(String::from("backend-1"), client)],
        "only the local backend, and it sees the client's own address"
    );
    assert_eq!(tcp_peer, (String::from("backend-1"), client));
    assert!(
        matches!(&silent, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "no local backend: dropped, not refused: {silent:?}"
    );
    let exit = agent.stop()?;
    assert!(counter(&exit.log, "drop_no_backend") >= 1, "{}", exit.log);
    assert_eq!(
        counter(&exit.log, "reject_port_unreachable"),
        0,
        "{}",
        exit.log
    );
    Ok(())
}

#[test]
fn source_ranges_drop_clients_outside_them() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    // A second client address, outside the allowed range.
    let outsider = Ipv4Addr::new(198, 18, 0, 3);
    lab.client
        .ip(&["addr", "add", &format!("{outsider}/24"), "dev", POD_IF])?;
    let frontend = Ipv4Addr::new(198, 18, 200, 10);
    let fields = format!(
        "    port: 4444\n    frontends: [{frontend}]\n    loadBalancerSourceRanges: [{CLIENT_ADDR}/32]\n"
    );
    // A service with only a NodePort: there the ranges guard the NodePort.
    let node_port_only = format!("    loadBalancerSourceRanges: [{CLIENT_ADDR}/32]\n");
    let services = service("guarded", "UDP", 30980, &fields, &backend(1, &[]))
        + &service(
            "guarded-np",
            "UDP",
            30982,
            &node_port_only,
            &backend(1, &[]),
        );
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services))?;
    let agent = Agent::start(&lab, &config)?;
    let load_balancer = SocketAddr::from((frontend, 4444));
    // The node learns the outsider's MAC (for NodePort replies below).
    let (from, to) = (outsider.to_string(), NODE_ADDR.to_string());
    let ping = ["-n", "-q", "-c", "1", "-w", "3", "-I", &from, &to];
    lab.client.exec("ping", &ping)?;

    let seen = lab.client.run(|| -> anyhow::Result<_> {
        let name = |result: anyhow::Result<(xlb_tests::Who, SocketAddr)>| {
            result.map(|(who, _)| who.name).map_err(|e| e.to_string())
        };
        let allowed = udp_who(&udp_socket()?, load_balancer)?;
        let socket = UdpSocket::bind((outsider, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok((
            allowed,
            name(udp_who(&socket, load_balancer)),
            // As kube-proxy: the ranges guard the load-balancer address only.
            name(udp_who(&socket, node_port(30980))),
            name(udp_who(&udp_socket()?, node_port(30982))),
            name(udp_who(&socket, node_port(30982))),
        ))
    })??;
    let (allowed, outside, outside_node_port, inside_np, outside_np) = seen;
    println!(
        "loadBalancerSourceRanges [{CLIENT_ADDR}/32]: {CLIENT_ADDR} -> {} (reply from {}); \
         {outsider} -> {outside:?}; {outsider} via the NodePort -> {outside_node_port:?}; on a \
         NodePort-only service: {CLIENT_ADDR} -> {inside_np:?}, {outsider} -> {outside_np:?}",
        allowed.0.name, allowed.1
    );
    assert_eq!(
        allowed.1, load_balancer,
        "the reply comes from the load-balancer address"
    );
    assert!(outside.is_err(), "the outsider got an answer: {outside:?}");
    assert!(outside_node_port.is_ok(), "{outside_node_port:?}");
    assert!(inside_np.is_ok(), "{inside_np:?}");
    assert!(
        outside_np.is_err(),
        "the outsider got an answer: {outside_np:?}"
    );
    let exit = agent.stop()?;
    assert!(counter(&exit.log, "drop_source_range") >= 2, "{}", exit.log);
    Ok(())
}

#[test]
fn flows_of_a_removed_backend_move_on_their_next_packet() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let write = |backends: &str| {
        lab.write_file(
            "xlb.yaml",
            &lab.config_yaml(&service("stream", "UDP", 30981, "", backends)),
        )
    };
    let config = write(&(backend(1, &[]) + &backend(2, &[])))?;
    let mut agent = Agent::start(&lab, &config)?;

    let drops = SocketDrops::start(&[&lab.client, &lab.backends[0].netns, &lab.backends[1].netns]);
    let stream = Stream::start(&lab.client, node_port(30981))?;
    std::thread::sleep(Duration::from_secs(1));
    let first = stream.who()?;
    let staying = if first.name == "backend-1" { 2 } else { 1 };
    write(&backend(staying, &[]))?;
    agent.reload_and_wait()?;
    std::thread::sleep(Duration::from_secs(1));
    let second = stream.who()?;
    let report = stream.finish()?;
    let drops = drops.since_start();
    println!(
        "backend removal under a {}/s UDP stream: {} -> {}: {report}; socket buffer drops {drops}",
        stream::RATE,
        first.name,
        second.name
    );
    assert_eq!(second.name, format!("backend-{staying}"));
    assert!(
        report.lost_beyond(drops) <= 10,
        "{report}; {drops} socket drops"
    );
    Ok(())
}
