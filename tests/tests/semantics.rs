//! kube-proxy's service semantics, end to end through the netns lab with
//! real sockets: weighted Maglev, session affinity, endpoint conditions,
//! externalTrafficPolicy, services without endpoints, source ranges, and
//! flows of a removed backend re-balanced without loss. Each case runs in
//! both families: over IPv4, and over IPv6 on the dual-stack lab (the
//! `...6` tests; the pods' IPv6 addresses, the node's 2001:db8::1).
//!
//! Measured figures are printed (`cargo xtask test -- --nocapture`).

#[path = "semantics/stream.rs"]
mod stream;

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::ensure;
use xlb_tests::Family::{self, V4, V6};
use xlb_tests::client::{IO_TIMEOUT, Who, tcp_who_echo, udp_socket_for, udp_who};
use xlb_tests::flows::{names, tcp_flows, udp_flows};
use xlb_tests::lab::{CLIENT_ADDR, CLIENT_ADDR6, POD_IF, PREFIX6};
use xlb_tests::{Agent, Lab};

use stream::{SocketDrops, Stream, counter};

/// `- address: ...` of pod N in `family`, plus `keys` (each `key: value`).
fn backend(family: Family, index: u8, keys: &[&str]) -> String {
    let mut item = format!("      - address: {}\n", family.backend_addr(index));
    for key in keys {
        item.push_str(&format!("        {key}\n"));
    }
    item
}

/// A source range holding only the client.
fn client_range(family: Family) -> String {
    match family {
        V4 => format!("{CLIENT_ADDR}/32"),
        V6 => format!("{CLIENT_ADDR6}/128"),
    }
}

/// `family`'s config with `services` plus other top-level sections.
fn config_with(family: Family, lab: &Lab, services: &str, extra: &str) -> String {
    format!("{}\n{extra}", family.config(lab, services))
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

#[test]
fn weights_three_to_one_split_new_flows_75_25() -> anyhow::Result<()> {
    weights_three_to_one(V4)
}

#[test]
fn weights6_three_to_one_split_new_flows_75_25() -> anyhow::Result<()> {
    weights_three_to_one(V6)
}

fn weights_three_to_one(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let services = service(
        "weighted",
        "UDP",
        30970,
        "",
        &(backend(family, 1, &["weight: 3"]) + &backend(family, 2, &["weight: 1"])),
    );
    let config = lab.write_file("xlb.yaml", &family.config(&lab, &services))?;
    let _agent = Agent::start(&lab, &config)?;

    let flows = 2000;
    let counts = udp_flows(&lab, family.node_port(30970), flows)?;
    let heavy = counts.get("backend-1").copied().unwrap_or(0) as f64 / flows as f64;
    println!(
        "weighted Maglev 3:1{}: {flows} new UDP flows -> {counts:?} ({:.1}% / {:.1}%)",
        family.over(),
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
    removing_one_of_four(V4)
}

#[test]
fn removing_one_of_four_ipv6_backends_moves_about_a_quarter_of_flows() -> anyhow::Result<()> {
    removing_one_of_four(V6)
}

fn removing_one_of_four(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(4)?;
    let all: String = (1..=4).map(|index| backend(family, index, &[])).collect();
    let three: String = (1..=3).map(|index| backend(family, index, &[])).collect();
    // Flows expire a second after their last packet, so the same 5-tuples
    // come back as new flows and show where the table sends them.
    let conntrack = "conntrack:\n  udpTimeoutSeconds: 1\n";
    let config = lab.write_file(
        "xlb.yaml",
        &config_with(
            family,
            &lab,
            &service("maglev", "UDP", 30971, "", &all),
            conntrack,
        ),
    )?;
    let mut agent = Agent::start(&lab, &config)?;

    let target = family.node_port(30971);
    let ports: Vec<u16> = (20_000..20_600).collect();
    let round = |lab: &Lab| -> anyhow::Result<Vec<String>> {
        lab.client.run(|| -> anyhow::Result<Vec<String>> {
            ports
                .iter()
                .map(|&port| {
                    let socket = UdpSocket::bind((family.unspecified(), port))?;
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
            family,
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
        "Maglev removal 4 -> 3 backends{}: {} flows, {on_removed} were on the removed backend, \
         {moved} moved ({:.1}%; ideal 25%), {needless} of {} others moved needlessly",
        family.over(),
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
    client_ip_affinity(V4)
}

#[test]
fn client_ip_affinity6_sends_every_flow_of_a_client_to_one_backend() -> anyhow::Result<()> {
    client_ip_affinity(V6)
}

fn client_ip_affinity(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(3)?;
    let all: String = (1..=3).map(|index| backend(family, index, &[])).collect();
    let affinity = "    sessionAffinity: ClientIP\n    sessionAffinityConfig:\n      clientIP:\n        timeoutSeconds: 60\n";
    let services = service("sticky-udp", "UDP", 30972, affinity, &all)
        + &service("sticky-tcp", "TCP", 30973, affinity, &all)
        + &service("loose-udp", "UDP", 30974, "", &all);
    let config = lab.write_file("xlb.yaml", &family.config(&lab, &services))?;
    let _agent = Agent::start(&lab, &config)?;

    let udp = udp_flows(&lab, family.node_port(30972), 60)?;
    let tcp = tcp_flows(&lab, family.node_port(30973), 20)?;
    let loose = udp_flows(&lab, family.node_port(30974), 60)?;
    println!(
        "ClientIP affinity{}: UDP {udp:?}, TCP {tcp:?}; without affinity: {loose:?}",
        family.over()
    );
    assert_eq!(udp.len(), 1, "60 UDP flows of one client: {udp:?}");
    assert_eq!(tcp.len(), 1, "20 TCP connections of one client: {tcp:?}");
    assert!(loose.len() > 1, "the control service spreads: {loose:?}");
    Ok(())
}

#[test]
fn terminating_endpoints_keep_their_flows_and_get_no_new_ones() -> anyhow::Result<()> {
    terminating_endpoints(V4)
}

#[test]
fn terminating_endpoints6_keep_their_flows_and_no_endpoints_are_refused() -> anyhow::Result<()> {
    terminating_endpoints(V6)
}

fn terminating_endpoints(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(3)?;
    let ready = |index| backend(family, index, &[]);
    let terminating = |index| {
        backend(
            family,
            index,
            &["ready: false", "serving: true", "terminating: true"],
        )
    };
    let gone = |index| {
        backend(
            family,
            index,
            &["ready: false", "serving: false", "terminating: true"],
        )
    };
    let write = |backends: &str| -> anyhow::Result<std::path::PathBuf> {
        let services = service("web", "TCP", 30975, "", backends)
            + &service("dns", "UDP", 30976, "", backends);
        Ok(lab.write_file("xlb.yaml", &family.config(&lab, &services))?)
    };
    let config = write(&(ready(1) + &ready(2) + &ready(3)))?;
    let mut agent = Agent::start(&lab, &config)?;
    let (tcp, udp) = (family.node_port(30975), family.node_port(30976));

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
        "backend-3 terminating{}: new UDP flows {new_udp:?}, new TCP {new_tcp:?}; its connection still echoes",
        family.over()
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
        let socket = UdpSocket::bind((family.unspecified(), 0))?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.connect(udp)?;
        socket.send(b"anyone?")?;
        let udp_result = socket.recv(&mut [0u8; 64]).map(drop);
        Ok((tcp_result, took, udp_result))
    })??;
    println!(
        "no endpoints{}: TCP {tcp_result:?} after {tcp_took:?}, UDP {udp_result:?}",
        family.over()
    );
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
    local_traffic_policy(V4)
}

#[test]
fn local_traffic_policy6_keeps_the_client_address() -> anyhow::Result<()> {
    local_traffic_policy(V6)
}

fn local_traffic_policy(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let policy = "    externalTrafficPolicy: Local\n";
    let backends = backend(family, 1, &["local: true"]) + &backend(family, 2, &["local: false"]);
    let services = service("local-udp", "UDP", 30977, policy, &backends)
        + &service("local-tcp", "TCP", 30978, policy, &backends)
        + &service(
            "remote-only",
            "UDP",
            30979,
            policy,
            &backend(family, 2, &[]),
        );
    let config = lab.write_file("xlb.yaml", &family.config(&lab, &services))?;
    let agent = Agent::start(&lab, &config)?;

    let (udp_peers, tcp_peer, silent) = lab.client.run(|| -> anyhow::Result<_> {
        let mut peers = BTreeMap::new();
        for _ in 0..32 {
            let target = family.node_port(30977);
            let (who, from) = udp_who(&udp_socket_for(target)?, target)?;
            ensure!(from == family.node_port(30977), "reply from {from}");
            *peers.entry((who.name, who.peer.ip())).or_insert(0) += 1;
        }
        let tcp = tcp_who_echo(family.node_port(30978), b"local")?;
        let socket = UdpSocket::bind((family.unspecified(), 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        socket.connect(family.node_port(30979))?;
        socket.send(b"WHO\n")?;
        let silent = socket.recv(&mut [0u8; 256]).map(drop);
        Ok((peers, (tcp.name, tcp.peer.ip()), silent))
    })??;
    println!(
        "externalTrafficPolicy Local{}: UDP (backend, peer seen) {udp_peers:?}; TCP {tcp_peer:?}; \
         no local backend: {silent:?}",
        family.over()
    );
    let client = family.client();
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
    source_ranges(V4)
}

#[test]
fn source_ranges6_drop_clients_outside_them() -> anyhow::Result<()> {
    source_ranges(V6)
}

fn source_ranges(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    // A second client address, outside the allowed range (an IPv6 one
    // deprecated, so only sockets bound to it use it).
    let (outsider, frontend): (IpAddr, IpAddr) = match family {
        V4 => {
            let outsider = Ipv4Addr::new(198, 18, 0, 3);
            lab.client
                .ip(&["addr", "add", &format!("{outsider}/24"), "dev", POD_IF])?;
            (outsider.into(), Ipv4Addr::new(198, 18, 200, 10).into())
        }
        V6 => {
            let outsider = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);
            let cidr = format!("{outsider}/{PREFIX6}");
            let add = ["-6", "addr", "add", &cidr, "dev", POD_IF];
            let deprecated = ["nodad", "preferred_lft", "0"];
            lab.client.ip(&[&add[..], &deprecated[..]].concat())?;
            let frontend = Ipv6Addr::new(0x2001, 0xdb8, 200, 0, 0, 0, 0, 10);
            (outsider.into(), frontend.into())
        }
    };
    let range = client_range(family);
    let fields = format!(
        "    port: 4444\n    frontends: [{frontend}]\n    loadBalancerSourceRanges: [{range}]\n"
    );
    // A service with only a NodePort: there the ranges guard the NodePort.
    let node_port_only = format!("    loadBalancerSourceRanges: [{range}]\n");
    let services = service("guarded", "UDP", 30980, &fields, &backend(family, 1, &[]))
        + &service(
            "guarded-np",
            "UDP",
            30982,
            &node_port_only,
            &backend(family, 1, &[]),
        );
    let config = lab.write_file("xlb.yaml", &family.config(&lab, &services))?;
    let agent = Agent::start(&lab, &config)?;
    let load_balancer = SocketAddr::from((frontend, 4444));
    // The node learns the outsider's MAC (for NodePort replies below).
    let (from, to) = (outsider.to_string(), family.node_port(0).ip().to_string());
    let ping = ["-n", "-q", "-c", "1", "-w", "3", "-I", &from, &to];
    lab.client.exec("ping", &ping)?;

    let seen = lab.client.run(|| -> anyhow::Result<_> {
        let name = |result: anyhow::Result<(Who, SocketAddr)>| {
            result.map(|(who, _)| who.name).map_err(|e| e.to_string())
        };
        let allowed = udp_who(&udp_socket_for(load_balancer)?, load_balancer)?;
        let socket = UdpSocket::bind((outsider, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok((
            allowed,
            name(udp_who(&socket, load_balancer)),
            // As kube-proxy: the ranges guard the load-balancer address only.
            name(udp_who(&socket, family.node_port(30980))),
            name(udp_who(
                &udp_socket_for(load_balancer)?,
                family.node_port(30982),
            )),
            name(udp_who(&socket, family.node_port(30982))),
        ))
    })??;
    let (allowed, outside, outside_node_port, inside_np, outside_np) = seen;
    println!(
        "loadBalancerSourceRanges [{range}]: {client} -> {} (reply from {}); \
         {outsider} -> {outside:?}; {outsider} via the NodePort -> {outside_node_port:?}; on a \
         NodePort-only service: {client} -> {inside_np:?}, {outsider} -> {outside_np:?}",
        allowed.0.name,
        allowed.1,
        client = family.client(),
    );
    assert_eq!(
        allowed.1, load_balancer,
        "the reply comes from the load-balancer address"
    );
    let (_, masquerade) = family.pod_and_node(&lab.backends[0]);
    assert_eq!(allowed.0.peer.ip(), masquerade);
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
    flows_of_a_removed_backend(V4)
}

#[test]
fn flows6_of_a_removed_backend_move_on_their_next_packet() -> anyhow::Result<()> {
    flows_of_a_removed_backend(V6)
}

fn flows_of_a_removed_backend(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let write = |backends: &str| {
        lab.write_file(
            "xlb.yaml",
            &family.config(&lab, &service("stream", "UDP", 30981, "", backends)),
        )
    };
    let config = write(&(backend(family, 1, &[]) + &backend(family, 2, &[])))?;
    let mut agent = Agent::start(&lab, &config)?;

    let drops = SocketDrops::start(&[&lab.client, &lab.backends[0].netns, &lab.backends[1].netns]);
    let stream = Stream::start(&lab.client, family.node_port(30981))?;
    std::thread::sleep(Duration::from_secs(1));
    let first = stream.who()?;
    let staying = if first.name == "backend-1" { 2 } else { 1 };
    write(&backend(family, staying, &[]))?;
    agent.reload_and_wait()?;
    std::thread::sleep(Duration::from_secs(1));
    let second = stream.who()?;
    let report = stream.finish()?;
    let drops = drops.since_start();
    println!(
        "backend removal{} under a {}/s UDP stream: {} -> {}: {report}; socket buffer drops {drops}",
        family.over(),
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
