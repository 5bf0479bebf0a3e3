//! IPv6 end to end through the dual-stack lab: the IPv6 twins of udp.rs,
//! tcp.rs and of semantics.rs, reload.rs and restart.rs where the IPv6
//! datapath does the same, and dual-stack services (one service, each pod
//! listed by both its addresses) serving clients of both families at once.
//! A service without endpoints is refused as for IPv4, by xlb itself
//! (ICMPv6 port unreachable, TCP RST).
//!
//! NodePorts answer on 2001:db8::1; masquerade is the node's IPv6 address
//! on the backend's link (2001:db8:N::1), as 198.18.N.1 is for IPv4.
//! Measured figures are printed (`cargo xtask test -- --nocapture`).

#[path = "semantics/stream.rs"]
mod stream;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use xlb_tests::client::{
    IO_TIMEOUT, Who, pattern, tcp_who_echo, udp_exchange, udp_socket_for, udp_socket6, udp_who,
};
use xlb_tests::lab::{
    CLIENT_ADDR6, ECHO_TCP_PORT, ECHO_UDP_PORT, NODE_ADDR, NODE_ADDR6, POD_IF, PREFIX6,
    backend_addr6, tcp_echo_service, tcp_echo_service6, udp_echo_service, udp_echo_service6,
};
use xlb_tests::node_lab::{self, NodeLab, PodKind};
use xlb_tests::{Agent, Bpffs, Lab, XLB_BIN_ENV, bin_from_env, dual_stack_config, ipv6_config};

use stream::{Connection, SocketDrops, Stream, counter};

/// A service block for the lab's configs: `fields` are extra service keys
/// (each line indented by four spaces), `backends` the backend list items.
fn service(name: &str, protocol: &str, node_port: u16, fields: &str, backends: &str) -> String {
    let target = if protocol == "UDP" {
        ECHO_UDP_PORT
    } else {
        ECHO_TCP_PORT
    };
    format!(
        "  - name: {name}\n    protocol: {protocol}\n    nodePort: {node_port}\n    targetPort: {target}\n{fields}    backends:\n{backends}"
    )
}

/// `- address: 2001:db8:N::2` plus `keys` (each `key: value`).
fn backend6(index: u8, keys: &[&str]) -> String {
    item(&backend_addr6(index).to_string(), keys)
}

/// `- address: 198.18.N.2` plus `keys`.
fn backend4(index: u8, keys: &[&str]) -> String {
    item(&format!("198.18.{index}.2"), keys)
}

fn item(address: &str, keys: &[&str]) -> String {
    let mut item = format!("      - address: {address}\n");
    for key in keys {
        item.push_str(&format!("        {key}\n"));
    }
    item
}

fn node_port6(port: u16) -> SocketAddr {
    SocketAddr::from((NODE_ADDR6, port))
}

/// The dual-stack lab config with `services` plus other top-level sections.
fn config_with(lab: &Lab, services: &str, extra: &str) -> String {
    format!("{}\n{extra}", lab.dual_stack_config_yaml(services))
}

/// Checks a WHO answer reached through a NodePort of `service`'s family:
/// DNAT to the backend's address of that family and `target_port`,
/// masquerade from the node's address of that family on the backend's link.
fn assert_nat(lab: &Lab, who: &Who, service: SocketAddr, target_port: u16) {
    let backend = lab
        .backend_named(&who.name)
        .unwrap_or_else(|| panic!("unknown backend in {who:?}"));
    let (local, node): (IpAddr, IpAddr) = if service.is_ipv6() {
        (backend.addr6.into(), backend.node_addr6.into())
    } else {
        (backend.addr.into(), backend.node_addr.into())
    };
    assert_eq!(
        who.local,
        SocketAddr::new(local, target_port),
        "DNAT to the backend's address of the client's family and targetPort"
    );
    assert_eq!(
        who.peer.ip(),
        node,
        "masquerade: the backend sees the node's address of the client's family on its link"
    );
}

/// New UDP flows (a fresh socket each) to `target`: backends by name.
fn udp_flows(
    lab: &Lab,
    target: SocketAddr,
    flows: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    count_flows(lab, flows, |_| {
        let (who, from) = udp_who(&udp_socket_for(target)?, target)?;
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

/// One UDP `WHO` to `target` from a fresh socket that waits `wait`: the
/// answering backend's name, or why there was none.
fn udp_answer(target: SocketAddr, wait: Duration) -> Result<String, String> {
    let socket = udp_socket_for(target).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    udp_who(&socket, target)
        .map(|(who, _)| who.name)
        .map_err(|e| format!("{e:#}"))
}

// ---- udp.rs twins ----

#[test]
fn udp6_round_trip_with_dnat_and_masquerade() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let agent = Agent::start(&lab, &dual_stack_config())?;
    let service = udp_echo_service6();

    lab.client.run(|| -> anyhow::Result<()> {
        let socket = udp_socket6()?;
        let (who, from) = udp_who(&socket, service)?;
        assert_eq!(
            from, service,
            "the reply must come from the NodePort itself"
        );
        assert_nat(&lab, &who, service, ECHO_UDP_PORT);

        // Payloads of several sizes (up to what fits one 1500-byte frame
        // under a 40-byte IPv6 header) come back intact, from the NodePort.
        for (seed, len) in [1usize, 64, 512, 1400, 1452].into_iter().enumerate() {
            let payload = pattern(len, seed as u32);
            let (reply, from) = udp_exchange(&socket, service, &payload)?;
            assert_eq!(from, service);
            assert_eq!(reply, payload, "echo of {len} bytes");
        }
        Ok(())
    })??;

    let exit = agent.stop_cleanly()?;
    for counter in ["fwd_new_flow=", "fwd_reply="] {
        assert!(
            exit.log.contains(counter),
            "no {counter} in the agent's exit log:\n{}",
            exit.log
        );
    }
    Ok(())
}

#[test]
fn udp6_flow_sticks_to_one_backend() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &dual_stack_config())?;
    let service = udp_echo_service6();

    lab.client.run(|| -> anyhow::Result<()> {
        let socket = udp_socket6()?;
        let (first, _) = udp_who(&socket, service)?;
        for round in 0..100 {
            let (who, from) = udp_who(&socket, service)?;
            assert_eq!(from, service);
            assert_eq!(
                who, first,
                "datagram {round} of one 5-tuple went elsewhere (backend or masquerade port changed)"
            );
        }
        Ok(())
    })??;
    Ok(())
}

#[test]
fn udp6_flows_of_many_clients_all_answered_from_node_port() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &dual_stack_config())?;
    let service = udp_echo_service6();

    lab.client.run(|| -> anyhow::Result<()> {
        let sockets = (0..32)
            .map(|_| udp_socket6())
            .collect::<anyhow::Result<Vec<_>>>()?;
        for round in 0..3 {
            for socket in &sockets {
                let payload = format!("round {round} from {}", socket.local_addr()?);
                let (reply, from) = udp_exchange(socket, service, payload.as_bytes())?;
                assert_eq!(from, service);
                assert_eq!(reply, payload.as_bytes());
            }
        }
        Ok(())
    })??;
    Ok(())
}

// ---- tcp.rs twins ----

/// The twin of icmp.rs's fragments test: datagrams larger than the
/// links' 1500-byte MTU, which the client's and the backends' stacks
/// fragment (an IPv6 fragment carries 1448 bytes of the datagram), reach
/// the backend whole and come back whole: each first fragment is balanced,
/// the later ones follow it (`xlb6_frag`) both ways.
#[test]
fn fragmented_udp6_datagrams_arrive_whole_both_ways() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let agent = Agent::start(&lab, &dual_stack_config())?;
    let service = udp_echo_service6();
    const FLOWS: usize = 100;

    let served = lab.client.run(|| -> anyhow::Result<Vec<String>> {
        let mut served = Vec::new();
        for flow in 0..FLOWS {
            let socket = udp_socket6()?;
            for len in [3000usize, 9000] {
                let payload = pattern(len, (flow * 2 + len) as u32);
                let (reply, from) = udp_exchange(&socket, service, &payload)?;
                ensure!(from == service, "reply from {from}");
                ensure!(
                    reply == payload,
                    "flow {flow}: {len}-byte datagram came back as {} bytes",
                    reply.len()
                );
            }
            let (who, _) = udp_who(&socket, service)?;
            served.push(who.name);
        }
        Ok(served)
    })??;
    let exit = agent.stop_cleanly()?;
    let per_backend: Vec<usize> = lab
        .backends
        .iter()
        .map(|backend| served.iter().filter(|name| **name == backend.name).count())
        .collect();
    println!(
        "{FLOWS} IPv6 flows, 3000 + 9000 bytes each way: per backend {per_backend:?}; \
         fwd_fragment={} pass_fragment_unknown={}",
        counter(&exit.log, "fwd_fragment"),
        counter(&exit.log, "pass_fragment_unknown")
    );
    assert!(
        per_backend.iter().all(|&n| n > 0),
        "both backends serve: {per_backend:?}"
    );
    // 3000 bytes (3008 with the UDP header): 3 fragments, 9000: 7; both
    // ways; all but the first follow.
    let later = (FLOWS * ((3 - 1) + (7 - 1)) * 2) as u64;
    assert!(
        counter(&exit.log, "fwd_fragment") >= later,
        "expected at least {later} later fragments followed:\n{}",
        exit.log
    );
    Ok(())
}

#[test]
fn tcp6_round_trips_many_connections() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &dual_stack_config())?;
    let service = tcp_echo_service6();

    lab.client.run(|| -> anyhow::Result<()> {
        for connection in 0..50u32 {
            // Every fifth connection moves more than 64 KiB each way.
            let len = if connection % 5 == 0 {
                200 * 1024 + connection as usize
            } else {
                1 + 97 * connection as usize
            };
            let who = tcp_who_echo(service, &pattern(len, connection))
                .map_err(|error| error.context(format!("connection {connection} ({len} bytes)")))?;
            assert_nat(&lab, &who, service, ECHO_TCP_PORT);
        }
        Ok(())
    })??;
    Ok(())
}

#[test]
fn tcp6_concurrent_connections_and_half_close() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &dual_stack_config())?;
    let service = tcp_echo_service6();

    lab.client.run(|| -> anyhow::Result<()> {
        let mut streams = Vec::new();
        for _ in 0..16 {
            let stream = TcpStream::connect_timeout(&service, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            streams.push(stream);
        }
        for round in 0..4 {
            for (index, stream) in streams.iter_mut().enumerate() {
                let chunk = format!("[{index}:{round}]");
                stream.write_all(chunk.as_bytes())?;
                let mut echoed = vec![0u8; chunk.len()];
                stream.read_exact(&mut echoed)?;
                assert_eq!(echoed, chunk.as_bytes());
            }
        }
        for stream in &mut streams {
            stream.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest)?;
            assert!(rest.is_empty(), "data after half-close: {rest:?}");
        }
        Ok(())
    })??;
    Ok(())
}

// ---- dual-stack services ----

#[test]
fn dual_stack_service_serves_both_families_at_once_from_the_same_backends() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let agent = Agent::start(&lab, &dual_stack_config())?;
    let (tcp4, tcp6) = (tcp_echo_service(), tcp_echo_service6());
    let (udp4, udp6) = (udp_echo_service(), udp_echo_service6());

    // TCP connections of both families open side by side, written in turns.
    let mut connections = Vec::new();
    for _ in 0..12 {
        for target in [tcp4, tcp6] {
            let connection = Connection::open(&lab.client, target)?;
            assert_nat(&lab, &connection.who, target, ECHO_TCP_PORT);
            connections.push((target, connection));
        }
    }
    // UDP flows of both families interleaved, with their sockets kept.
    let (udp_whos, udp_sockets) = lab.client.run(|| -> anyhow::Result<_> {
        let mut whos = Vec::new();
        let mut sockets = Vec::new();
        for _ in 0..24 {
            for target in [udp4, udp6] {
                let socket = udp_socket_for(target)?;
                let (who, from) = udp_who(&socket, target)?;
                ensure!(from == target, "reply from {from}, expected {target}");
                whos.push((target, who));
                sockets.push((target, socket));
            }
        }
        Ok((whos, sockets))
    })??;
    for (target, who) in &udp_whos {
        assert_nat(&lab, who, *target, ECHO_UDP_PORT);
    }
    for round in 0..3 {
        for (target, connection) in &mut connections {
            connection
                .exchange()
                .with_context(|| format!("round {round}: TCP to {target}"))?;
        }
        for (target, socket) in &udp_sockets {
            let payload = format!("round {round} to {target}");
            let (reply, from) = udp_exchange(socket, *target, payload.as_bytes())?;
            ensure!(from == *target && reply == payload.as_bytes(), "{target}");
        }
    }

    let mut served: BTreeMap<(&str, bool), BTreeSet<&str>> = BTreeMap::new();
    let tcp = connections.iter().map(|(t, c)| ("TCP", t, &c.who));
    let udp = udp_whos.iter().map(|(t, who)| ("UDP", t, who));
    for (protocol, target, who) in tcp.chain(udp) {
        served
            .entry((protocol, target.is_ipv6()))
            .or_default()
            .insert(who.name.as_str());
    }
    println!("dual-stack tcp-echo and udp-echo: (protocol, IPv6?) -> backends {served:?}");
    let both = BTreeSet::from(["backend-1", "backend-2"]);
    for protocol in ["TCP", "UDP"] {
        for ipv6 in [false, true] {
            assert_eq!(
                served.get(&(protocol, ipv6)),
                Some(&both),
                "{protocol} IPv6={ipv6}"
            );
        }
    }
    drop(connections);
    let exit = agent.stop()?;
    // 24 TCP connections and 48 UDP flows.
    assert!(counter(&exit.log, "fwd_new_flow") >= 72, "{}", exit.log);
    Ok(())
}

#[test]
fn ipv6_only_services_answer_only_on_the_ipv6_node_port() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &ipv6_config())?;

    let udp = udp_flows(&lab, udp_echo_service6(), 32)?;
    let tcp = tcp_flows(&lab, tcp_echo_service6(), 16)?;
    assert_eq!(names(&udp), ["backend-1", "backend-2"]);
    assert_eq!(names(&tcp), ["backend-1", "backend-2"]);
    let (ipv4_udp, ipv4_tcp) = lab.client.run(|| {
        (
            udp_answer(udp_echo_service(), Duration::from_secs(1)),
            TcpStream::connect_timeout(&tcp_echo_service(), Duration::from_secs(2)).map(drop),
        )
    })?;
    println!(
        "IPv6-only config: UDP {udp:?}, TCP {tcp:?}; IPv4 NodePort: UDP {ipv4_udp:?}, TCP {ipv4_tcp:?}"
    );
    assert!(
        ipv4_udp.is_err(),
        "198.18.0.1 is no NodePort address here: {ipv4_udp:?}"
    );
    assert!(
        ipv4_tcp.is_err(),
        "198.18.0.1 is no NodePort address here: {ipv4_tcp:?}"
    );
    Ok(())
}

// ---- reload.rs twins ----

#[test]
fn reload_makes_a_service_dual_stack_and_back() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let write = |backends: &str| {
        lab.write_file(
            "xlb.yaml",
            &lab.dual_stack_config_yaml(&service("echo", "UDP", 30990, "", backends)),
        )
    };
    let (v4, v6) = (SocketAddr::from((NODE_ADDR, 30990)), node_port6(30990));
    let wait = Duration::from_secs(1);
    let config = write(&(backend4(1, &[]) + &backend4(2, &[])))?;
    let mut agent = Agent::start(&lab, &config)?;
    let single = lab
        .client
        .run(|| (udp_answer(v4, wait), udp_answer(v6, wait)))?;

    write(&(backend4(1, &[]) + &backend6(1, &[]) + &backend4(2, &[]) + &backend6(2, &[])))?;
    agent.reload_and_wait()?;
    let dual = (udp_flows(&lab, v4, 32)?, udp_flows(&lab, v6, 32)?);

    write(&(backend6(1, &[]) + &backend6(2, &[])))?;
    agent.reload_and_wait()?;
    let v6_only = lab
        .client
        .run(|| (udp_answer(v4, wait), udp_answer(v6, wait)))?;
    println!(
        "IPv4 backends only: {single:?}; both families: {dual:?}; IPv6 backends only: {v6_only:?}"
    );
    assert!(single.0.is_ok(), "{single:?}");
    assert!(
        single.1.is_err(),
        "no IPv6 backend, yet an answer: {single:?}"
    );
    assert_eq!(names(&dual.0), ["backend-1", "backend-2"]);
    assert_eq!(names(&dual.1), ["backend-1", "backend-2"]);
    assert!(
        v6_only.0.is_err(),
        "no IPv4 backend, yet an answer: {v6_only:?}"
    );
    assert!(v6_only.1.is_ok(), "{v6_only:?}");
    assert!(agent.is_running());
    Ok(())
}

#[test]
fn reload6_adds_a_service_and_changes_backends() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let write = |udp: &str, tcp: &str, extra: &str| {
        let services = service("udp-echo", "UDP", 30998, "", udp)
            + &service("tcp-echo", "TCP", 30999, "", tcp)
            + extra;
        lab.write_file("xlb.yaml", &lab.ipv6_config_yaml(&services))
    };
    let (one, two) = (backend6(1, &[]), backend6(2, &[]));
    let both = one.clone() + &two;
    let config = write(&one, &one, "")?;
    let mut agent = Agent::start(&lab, &config)?;
    assert_eq!(
        names(&udp_flows(&lab, udp_echo_service6(), 32)?),
        ["backend-1"]
    );
    assert_eq!(
        names(&tcp_flows(&lab, tcp_echo_service6(), 16)?),
        ["backend-1"]
    );

    // A new service on 30997 served only by backend-2; both echo
    // services get both backends.
    let extra = service("udp-extra", "UDP", 30997, "", &two);
    write(&both, &both, &extra)?;
    agent.reload_and_wait()?;
    assert_eq!(
        names(&udp_flows(&lab, node_port6(30997), 16)?),
        ["backend-2"]
    );
    let pair = ["backend-1", "backend-2"];
    assert_eq!(names(&udp_flows(&lab, udp_echo_service6(), 64)?), pair);
    assert_eq!(names(&tcp_flows(&lab, tcp_echo_service6(), 48)?), pair);

    // backend-1 leaves udp-echo: new flows go only to backend-2.
    write(&two, &both, &extra)?;
    agent.reload_and_wait()?;
    assert_eq!(
        names(&udp_flows(&lab, udp_echo_service6(), 32)?),
        ["backend-2"]
    );
    assert!(agent.is_running());
    Ok(())
}

// ---- semantics.rs twins ----

#[test]
fn weights6_three_to_one_split_new_flows_75_25() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let backends = backend6(1, &["weight: 3"]) + &backend6(2, &["weight: 1"]);
    let services = service("weighted", "UDP", 30970, "", &backends);
    let config = lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services))?;
    let _agent = Agent::start(&lab, &config)?;

    let flows = 2000;
    let counts = udp_flows(&lab, node_port6(30970), flows)?;
    let heavy = counts.get("backend-1").copied().unwrap_or(0) as f64 / flows as f64;
    println!(
        "weighted Maglev 3:1 over IPv6: {flows} new UDP flows -> {counts:?} ({:.1}% / {:.1}%)",
        heavy * 100.0,
        (1.0 - heavy) * 100.0
    );
    assert!(
        (0.70..=0.80).contains(&heavy),
        "backend-1 got {heavy:.3} of new flows: {counts:?}"
    );
    Ok(())
}

#[test]
fn removing_one_of_four_ipv6_backends_moves_about_a_quarter_of_flows() -> anyhow::Result<()> {
    let lab = Lab::new(4)?;
    let all: String = (1..=4).map(|index| backend6(index, &[])).collect();
    let three: String = (1..=3).map(|index| backend6(index, &[])).collect();
    // Flows expire a second after their last packet, so the same 5-tuples
    // come back as new flows and show where the table sends them.
    let conntrack = "conntrack:\n  udpTimeoutSeconds: 1\n";
    let maglev = |backends: &str| service("maglev", "UDP", 30971, "", backends);
    let config = lab.write_file("xlb.yaml", &config_with(&lab, &maglev(&all), conntrack))?;
    let mut agent = Agent::start(&lab, &config)?;

    let target = node_port6(30971);
    let ports: Vec<u16> = (20_000..20_600).collect();
    let round = |lab: &Lab| -> anyhow::Result<Vec<String>> {
        lab.client.run(|| -> anyhow::Result<Vec<String>> {
            ports
                .iter()
                .map(|&port| {
                    let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))?;
                    socket.set_read_timeout(Some(IO_TIMEOUT))?;
                    Ok(udp_who(&socket, target)?.0.name)
                })
                .collect()
        })?
    };
    let before = round(&lab)?;
    lab.write_file("xlb.yaml", &config_with(&lab, &maglev(&three), conntrack))?;
    agent.reload_and_wait()?;
    std::thread::sleep(Duration::from_millis(2500));
    let after = round(&lab)?;

    let on_removed = before.iter().filter(|name| *name == "backend-4").count();
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let needless = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| *b != "backend-4" && b != a)
        .count();
    println!(
        "IPv6 Maglev removal 4 -> 3 backends: {} flows, {on_removed} on the removed backend, \
         {moved} moved, {needless} of {} others moved needlessly",
        ports.len(),
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
fn client_ip_affinity6_sends_every_flow_of_a_client_to_one_backend() -> anyhow::Result<()> {
    let lab = Lab::new(3)?;
    let all: String = (1..=3).map(|index| backend6(index, &[])).collect();
    let affinity = "    sessionAffinity: ClientIP\n    sessionAffinityConfig:\n      clientIP:\n        timeoutSeconds: 60\n";
    let services = service("sticky-udp", "UDP", 30972, affinity, &all)
        + &service("sticky-tcp", "TCP", 30973, affinity, &all)
        + &service("loose-udp", "UDP", 30974, "", &all);
    let config = lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services))?;
    let _agent = Agent::start(&lab, &config)?;

    let udp = udp_flows(&lab, node_port6(30972), 60)?;
    let tcp = tcp_flows(&lab, node_port6(30973), 20)?;
    let loose = udp_flows(&lab, node_port6(30974), 60)?;
    println!("ClientIP affinity over IPv6: UDP {udp:?}, TCP {tcp:?}; without: {loose:?}");
    assert_eq!(udp.len(), 1, "60 UDP flows of one client: {udp:?}");
    assert_eq!(tcp.len(), 1, "20 TCP connections of one client: {tcp:?}");
    assert!(loose.len() > 1, "the control service spreads: {loose:?}");
    Ok(())
}

#[test]
fn terminating_endpoints6_keep_their_flows_and_no_endpoints_are_refused() -> anyhow::Result<()> {
    let lab = Lab::new(3)?;
    let ready = |index| backend6(index, &[]);
    let terminating = |index| {
        backend6(
            index,
            &["ready: false", "serving: true", "terminating: true"],
        )
    };
    let gone = |index| {
        backend6(
            index,
            &["ready: false", "serving: false", "terminating: true"],
        )
    };
    let write = |backends: &str| {
        let services = service("web", "TCP", 30975, "", backends)
            + &service("dns", "UDP", 30976, "", backends);
        lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services))
    };
    let config = write(&(ready(1) + &ready(2) + &ready(3)))?;
    let mut agent = Agent::start(&lab, &config)?;
    let (tcp, udp) = (node_port6(30975), node_port6(30976));

    let mut kept = None;
    for _ in 0..64 {
        let connection = Connection::open(&lab.client, tcp)?;
        if connection.who.name == "backend-3" {
            kept = Some(connection);
            break;
        }
    }
    let Some(mut kept) = kept else {
        anyhow::bail!("no connection landed on backend-3 in 64 tries");
    };
    kept.exchange()?;

    write(&(ready(1) + &ready(2) + &terminating(3)))?;
    agent.reload_and_wait()?;
    let new_udp = udp_flows(&lab, udp, 48)?;
    let new_tcp = tcp_flows(&lab, tcp, 24)?;
    kept.exchange()?;
    assert_eq!(names(&new_udp), ["backend-1", "backend-2"]);
    assert_eq!(names(&new_tcp), ["backend-1", "backend-2"]);

    write(&(gone(1) + &gone(2) + &terminating(3)))?;
    agent.reload_and_wait()?;
    let new_udp = udp_flows(&lab, udp, 16)?;
    kept.exchange()?;
    assert_eq!(names(&new_udp), ["backend-3"]);

    // No endpoint at all: new flows are refused at once, by xlb.
    write(&(gone(1) + &gone(2) + &gone(3)))?;
    agent.reload_and_wait()?;
    let (tcp_result, tcp_took, udp_result) = lab.client.run(|| -> anyhow::Result<_> {
        let started = Instant::now();
        let tcp_result = TcpStream::connect_timeout(&tcp, IO_TIMEOUT).map(drop);
        let took = started.elapsed();
        let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.connect(udp)?;
        socket.send(b"anyone?")?;
        let udp_result = socket.recv(&mut [0u8; 64]).map(drop);
        Ok((tcp_result, took, udp_result))
    })??;
    println!("IPv6, no endpoints: TCP {tcp_result:?} after {tcp_took:?}, UDP {udp_result:?}");
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
        assert!(counter(&exit.log, name) >= 1, "{name}: {}", exit.log);
    }
    assert_eq!(
        counter(&exit.log, "pass_ipv6_no_backend"),
        0,
        "{}",
        exit.log
    );
    Ok(())
}

#[test]
fn local_traffic_policy6_keeps_the_client_address() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let policy = "    externalTrafficPolicy: Local\n";
    let backends = backend6(1, &["local: true"]) + &backend6(2, &["local: false"]);
    let services = service("local-udp", "UDP", 30977, policy, &backends)
        + &service("local-tcp", "TCP", 30978, policy, &backends)
        + &service("remote-only", "UDP", 30979, policy, &backend6(2, &[]));
    let config = lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services))?;
    let agent = Agent::start(&lab, &config)?;

    let (udp_peers, tcp_peer, silent) = lab.client.run(|| -> anyhow::Result<_> {
        let mut peers = BTreeMap::new();
        for _ in 0..32 {
            let (who, from) = udp_who(&udp_socket6()?, node_port6(30977))?;
            ensure!(from == node_port6(30977), "reply from {from}");
            *peers.entry((who.name, who.peer.ip())).or_insert(0) += 1;
        }
        let tcp = tcp_who_echo(node_port6(30978), b"local")?;
        let silent = udp_answer(node_port6(30979), Duration::from_secs(1));
        Ok((peers, (tcp.name, tcp.peer.ip()), silent))
    })??;
    println!(
        "externalTrafficPolicy Local over IPv6: UDP (backend, peer seen) {udp_peers:?}; TCP \
         {tcp_peer:?}; no local backend: {silent:?}"
    );
    let client = IpAddr::V6(CLIENT_ADDR6);
    assert_eq!(
        udp_peers.keys().cloned().collect::<Vec<_>>(),
        [(String::from("backend-1"), client)],
        "only the local backend, and it sees the client's own address"
    );
    assert_eq!(tcp_peer, (String::from("backend-1"), client));
    assert!(silent.is_err(), "no local backend: dropped: {silent:?}");
    let exit = agent.stop()?;
    assert!(counter(&exit.log, "drop_no_backend") >= 1, "{}", exit.log);
    assert_eq!(
        counter(&exit.log, "pass_ipv6_no_backend"),
        0,
        "dropped, not left to the kernel to refuse: {}",
        exit.log
    );
    Ok(())
}

#[test]
fn source_ranges6_drop_clients_outside_them() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    // A second client address, outside the allowed range; deprecated, so
    // only sockets bound to it use it.
    let outsider = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);
    let cidr = format!("{outsider}/{PREFIX6}");
    lab.client.ip(&[
        "-6",
        "addr",
        "add",
        &cidr,
        "dev",
        POD_IF,
        "nodad",
        "preferred_lft",
        "0",
    ])?;
    let frontend = Ipv6Addr::new(0x2001, 0xdb8, 200, 0, 0, 0, 0, 10);
    let fields = format!(
        "    port: 4444\n    frontends: [{frontend}]\n    loadBalancerSourceRanges: [{CLIENT_ADDR6}/128]\n"
    );
    let node_port_only = format!("    loadBalancerSourceRanges: [{CLIENT_ADDR6}/128]\n");
    let services = service("guarded", "UDP", 30980, &fields, &backend6(1, &[]))
        + &service(
            "guarded-np",
            "UDP",
            30982,
            &node_port_only,
            &backend6(1, &[]),
        );
    let config = lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services))?;
    let agent = Agent::start(&lab, &config)?;
    let load_balancer = SocketAddr::from((frontend, 4444));
    // The node learns the outsider's MAC (for NodePort replies below).
    let (from, to) = (outsider.to_string(), NODE_ADDR6.to_string());
    let ping = ["-n", "-q", "-c", "1", "-w", "3", "-I", &from, &to];
    lab.client.exec("ping", &ping)?;

    let seen = lab.client.run(|| -> anyhow::Result<_> {
        let name = |result: anyhow::Result<(Who, SocketAddr)>| {
            result.map(|(who, _)| who.name).map_err(|e| e.to_string())
        };
        let allowed = udp_who(&udp_socket6()?, load_balancer)?;
        let socket = UdpSocket::bind((outsider, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok((
            allowed,
            name(udp_who(&socket, load_balancer)),
            // As kube-proxy: the ranges guard the load-balancer address only.
            name(udp_who(&socket, node_port6(30980))),
            name(udp_who(&udp_socket6()?, node_port6(30982))),
            name(udp_who(&socket, node_port6(30982))),
        ))
    })??;
    let (allowed, outside, outside_node_port, inside_np, outside_np) = seen;
    println!(
        "loadBalancerSourceRanges [{CLIENT_ADDR6}/128]: -> {} (reply from {}); {outsider} -> \
         {outside:?}; via the NodePort -> {outside_node_port:?}; NodePort-only service: \
         {inside_np:?}, {outsider} -> {outside_np:?}",
        allowed.0.name, allowed.1
    );
    assert_eq!(
        allowed.1, load_balancer,
        "the reply comes from the load-balancer address"
    );
    assert_eq!(allowed.0.peer.ip(), lab.backends[0].node_addr6);
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
fn flows6_of_a_removed_backend_move_on_their_next_packet() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let write = |backends: &str| {
        lab.write_file(
            "xlb.yaml",
            &lab.dual_stack_config_yaml(&service("stream", "UDP", 30981, "", backends)),
        )
    };
    let config = write(&(backend6(1, &[]) + &backend6(2, &[])))?;
    let mut agent = Agent::start(&lab, &config)?;

    let drops = SocketDrops::start(&[&lab.client, &lab.backends[0].netns, &lab.backends[1].netns]);
    let stream = Stream::start(&lab.client, node_port6(30981))?;
    std::thread::sleep(Duration::from_secs(1));
    let first = stream.who()?;
    let staying = if first.name == "backend-1" { 2 } else { 1 };
    write(&backend6(staying, &[]))?;
    agent.reload_and_wait()?;
    std::thread::sleep(Duration::from_secs(1));
    let second = stream.who()?;
    let report = stream.finish()?;
    let drops = drops.since_start();
    println!(
        "IPv6 backend removal under a {}/s UDP stream: {} -> {}: {report}; socket buffer drops {drops}",
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

// ---- restart.rs twin ----

#[test]
fn dual_stack_flows_survive_reloads_of_another_service() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let both = backend4(1, &[]) + &backend6(1, &[]) + &backend4(2, &[]) + &backend6(2, &[]);
    let services = |round: usize| {
        let other = match round % 3 {
            0 => backend6(1, &[]),
            1 => backend6(2, &["weight: 2"]) + &backend4(1, &[]),
            _ => backend6(2, &[]) + &backend4(2, &[]),
        };
        service("udp-echo", "UDP", 30960, "", &both)
            + &service("tcp-echo", "TCP", 30961, "", &both)
            + &service("other", "UDP", 30962, "", &other)
    };
    let config = lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services(0)))?;
    let mut agent = Agent::start(&lab, &config)?;

    let v4 = |port| SocketAddr::from((NODE_ADDR, port));
    let mut connections = [v4(30961), node_port6(30961), v4(30961), node_port6(30961)]
        .into_iter()
        .map(|target| Connection::open(&lab.client, target))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let drops = SocketDrops::start(&[&lab.client, &lab.backends[0].netns, &lab.backends[1].netns]);
    let stream = Stream::start(&lab.client, node_port6(30960))?;
    std::thread::sleep(Duration::from_millis(200));
    let first = stream.who()?;
    for round in 1..=30 {
        lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services(round)))?;
        agent.reload_and_wait()?;
        for connection in &mut connections {
            connection
                .exchange()
                .with_context(|| format!("after reload {round}: {:?}", connection.who))?;
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let last = stream.who()?;
    let report = stream.finish()?;
    let drops = drops.since_start();
    println!(
        "30 reloads (another dual-stack service changing) under a {}/s IPv6 UDP stream: \
         {report}; socket buffer drops {drops}",
        stream::RATE
    );
    assert_eq!(first, last, "the stream's flow changed backend");
    assert_eq!(
        report.lost_beyond(drops),
        0,
        "{report}; {drops} socket drops"
    );
    assert!(agent.is_running());
    Ok(())
}

#[test]
fn dual_stack_flows_survive_an_agent_restart() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let bpffs = Bpffs::mount(&lab)?;
    let dir = bpffs.arg();
    let config = dual_stack_config();
    let xlb = bin_from_env(XLB_BIN_ENV)?;
    let pinned = ["--bpffs", dir.as_str(), "--keep-attached"];
    let agent = Agent::start_with(&xlb, &lab, &config, &pinned)?;

    let mut connections = [tcp_echo_service(), tcp_echo_service6()]
        .into_iter()
        .cycle()
        .take(8)
        .map(|target| Connection::open(&lab.client, target))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let exchange_all = |connections: &mut [Connection], when: &str| -> anyhow::Result<()> {
        for connection in connections {
            let who = connection.who.clone();
            connection
                .exchange()
                .with_context(|| format!("{when}: connection to {who:?}"))?;
        }
        Ok(())
    };
    exchange_all(&mut connections, "after connecting")?;

    // The agent stops with --keep-attached: the datapath goes on alone.
    let drops = SocketDrops::start(&[&lab.client, &lab.backends[0].netns, &lab.backends[1].netns]);
    let stream = Stream::start(&lab.client, udp_echo_service6())?;
    std::thread::sleep(Duration::from_millis(300));
    agent.stop_cleanly()?;
    std::thread::sleep(Duration::from_millis(300));
    exchange_all(&mut connections, "while no agent runs")?;

    // A new agent adopts the pinned maps and links.
    let second = Agent::start_with(&xlb, &lab, &config, &["--bpffs", dir.as_str()])?;
    let adopted = second.log();
    std::thread::sleep(Duration::from_millis(300));
    let report = stream.finish()?;
    let drops = drops.since_start();
    exchange_all(&mut connections, "after the restart")?;
    let mut fresh = Connection::open(&lab.client, tcp_echo_service6())?;
    fresh.exchange()?;
    println!(
        "agent restart under a {}/s IPv6 UDP stream, 4 + 4 TCP connections of both families: \
         {report}; socket buffer drops {drops}",
        stream::RATE
    );
    assert!(
        adopted.contains("adopted the datapath pinned in"),
        "the second agent did not adopt the maps:\n{adopted}"
    );
    assert_eq!(
        report.lost_beyond(drops),
        0,
        "{report}; {drops} socket drops"
    );
    drop(connections);
    second.stop_cleanly()?;
    Ok(())
}

// ---- not_owned.rs and no_endpoints.rs twins ----

#[test]
fn ipv6_node_servers_ping_and_routing_still_work() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let node_tcp = SocketAddr::from((NODE_ADDR6, 8080));
    let node_udp = SocketAddr::from((NODE_ADDR6, 8081));
    let _node_server = lab.start_echo(&lab.node, "node", &[node_tcp], &[node_udp])?;
    let _agent = Agent::start(&lab, &dual_stack_config())?;

    lab.client.ping(NODE_ADDR6)?;
    let backend = &lab.backends[0];
    let direct = SocketAddr::from((backend.addr6, ECHO_TCP_PORT));
    lab.client.run(|| -> anyhow::Result<()> {
        // A TCP server on the node's own IPv6 address, a port xlb does not own.
        let who = tcp_who_echo(node_tcp, &[7u8; 100_000])?;
        assert_eq!(who.name, "node");
        assert_eq!(who.local, node_tcp);
        assert_eq!(who.peer.ip(), CLIENT_ADDR6, "not masqueraded");

        let (who, from) = udp_who(&udp_socket6()?, node_udp)?;
        assert_eq!(from, node_udp);
        assert_eq!(who.name, "node");
        assert_eq!(who.peer.ip(), CLIENT_ADDR6);

        // A pod's own IPv6 address, routed by the node's kernel without NAT.
        let who = tcp_who_echo(direct, b"routed, not balanced")?;
        assert_eq!(who.name, "backend-1");
        assert_eq!(who.peer.ip(), CLIENT_ADDR6);

        // And the NodePort still balances alongside all that.
        let who = tcp_who_echo(tcp_echo_service6(), b"balanced")?;
        assert_nat(&lab, &who, tcp_echo_service6(), ECHO_TCP_PORT);
        Ok(())
    })??;
    Ok(())
}

#[test]
fn ipv6_clients_of_a_service_without_endpoints_are_refused() -> anyhow::Result<()> {
    // Whichever family the agent gives a service with no backends, an IPv6
    // client is refused at once: by the node's kernel where the service is
    // IPv4 only (a service with no addresses), by xlb where it is served
    // over IPv6 too (`ipFamilies`): a RST, and an ICMPv6 port unreachable
    // the client's kernel takes (checksum and quote right), also for a
    // datagram whose quote is cut at 1280 bytes.
    let lab = Lab::new(1)?;
    let empty = |name: &str, protocol: &str, port: u16, families: &str| {
        format!(
            "  - name: {name}\n    protocol: {protocol}\n    nodePort: {port}\n    \
             targetPort: 3333\n{families}    backends: []\n"
        )
    };
    let dual = "    ipFamilies: [IPv4, IPv6]\n";
    let services = empty("tcp-empty", "TCP", 30990, dual)
        + &empty("udp-empty", "UDP", 30991, dual)
        + &empty("tcp-empty4", "TCP", 30992, "");
    let config = lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services))?;
    let agent = Agent::start(&lab, &config)?;

    let (tcp, udp, large, tcp4) = lab.client.run(|| -> anyhow::Result<_> {
        let tcp = TcpStream::connect_timeout(&node_port6(30990), IO_TIMEOUT).map(drop);
        let tcp4 = TcpStream::connect_timeout(&node_port6(30992), IO_TIMEOUT).map(drop);
        let refused = |payload: &[u8]| -> anyhow::Result<std::io::Result<()>> {
            let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(IO_TIMEOUT))?;
            socket.connect(node_port6(30991))?;
            socket.send(payload)?;
            Ok(socket.recv(&mut [0u8; 64]).map(drop))
        };
        Ok((tcp, refused(b"anyone?")?, refused(&[7u8; 1400])?, tcp4))
    })??;
    let results = [
        ("TCP", tcp),
        ("UDP", udp),
        ("UDP, 1400 bytes", large),
        ("TCP to an IPv4-only service", tcp4),
    ];
    for (what, result) in results {
        assert!(
            matches!(&result, Err(error) if error.kind() == ErrorKind::ConnectionRefused),
            "{what}: {result:?}, expected connection refused"
        );
    }
    let exit = agent.stop()?;
    assert_eq!(counter(&exit.log, "reject_tcp_reset"), 1, "{}", exit.log);
    assert_eq!(
        counter(&exit.log, "reject_port_unreachable"),
        2,
        "{}",
        exit.log
    );
    Ok(())
}

// ---- the real-node lab (tests/src/node_lab.rs) ----

#[test]
fn ipv6_node_port_reaches_every_kind_of_pod_of_a_dual_stack_service() -> anyhow::Result<()> {
    // Each pod listed by both its addresses. IPv6 clients reach each kind
    // of pod on its IPv6 address, masqueraded as the node's IPv6 address
    // towards it: cni0's, the overlay's, or the uplink's where the egress
    // device has link-local addresses only (the routed CNI's veth, node2
    // reached through the uplink). IPv4 goes on beside it.
    let lab = NodeLab::new()?;
    for kind in PodKind::ALL {
        let pod = lab.pod(kind);
        let services = lab.dual_stack_echo_services(&[pod], false);
        let config = lab.write_file("xlb.yaml", &lab.dual_stack_config_yaml(&services))?;
        let agent = Agent::start(&lab, &config)?;
        let checks = [
            (
                node_lab::udp_service6(),
                node_lab::tcp_service6(),
                IpAddr::from(pod.addr6),
            ),
            (
                node_lab::udp_service(),
                node_lab::tcp_service(),
                IpAddr::from(pod.addr),
            ),
        ];
        for (udp, tcp, pod_addr) in checks {
            let masquerade = if pod_addr.is_ipv6() {
                IpAddr::from(pod.masquerade_addr6())
            } else {
                IpAddr::from(pod.masquerade_addr())
            };
            let (udp_who_line, tcp_who_line) = lab.client.run(|| -> anyhow::Result<_> {
                let socket = udp_socket_for(udp)?;
                let (who, from) = udp_who(&socket, udp)?;
                ensure!(from == udp, "UDP reply from {from}, not the NodePort {udp}");
                // Sizes that fit every path (the overlay's MTU is 1450).
                for (seed, len) in [1usize, 100, 1000, 1400].into_iter().enumerate() {
                    let payload = pattern(len, seed as u32);
                    let (reply, from) = udp_exchange(&socket, udp, &payload)?;
                    ensure!(from == udp && reply == payload, "UDP echo of {len} bytes");
                }
                Ok((who, tcp_who_echo(tcp, &pattern(300 * 1024, 1))?))
            })??;
            for (who, port) in [(udp_who_line, ECHO_UDP_PORT), (tcp_who_line, ECHO_TCP_PORT)] {
                ensure!(
                    who.name == pod.name
                        && who.local == SocketAddr::new(pod_addr, port)
                        && who.peer.ip() == masquerade,
                    "{}: {who:?}, expected local {pod_addr}:{port}, peer {masquerade}\n{}",
                    pod.name,
                    agent.log()
                );
            }
        }
        agent.stop_cleanly()?;
    }
    let counters = lab.client.exec(
        "nstat",
        &["-a", "-s", "-z", "TcpInCsumErrors", "Udp6InCsumErrors"],
    )?;
    ensure!(
        counters
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .all(|count| count == "0"),
        "the client saw checksum errors:\n{counters}"
    );
    Ok(())
}
