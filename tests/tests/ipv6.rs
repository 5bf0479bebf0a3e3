//! IPv6 end to end through the dual-stack lab: the IPv6 twins of udp.rs,
//! tcp.rs, reload.rs and restart.rs where the IPv6 datapath does the same
//! (semantics.rs runs each of its cases in both families), and dual-stack services (one service, each pod
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
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use xlb_tests::client::{
    IO_TIMEOUT, Who, pattern, tcp_who_echo, udp_exchange, udp_socket_for, udp_who,
};
use xlb_tests::flows::{names, tcp_flows, udp_flows};
use xlb_tests::lab::{
    ECHO_TCP_PORT, ECHO_UDP_PORT, NODE_ADDR, NODE_ADDR6, POD_IF, backend_addr6, tcp_echo_service,
    tcp_echo_service6, udp_echo_service, udp_echo_service6,
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

// ---- reloads between families (reload.rs runs its cases in both) ----

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

// ---- no_endpoints.rs twin ----

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

// ---- icmp.rs twins: ICMPv6 errors about flows, translated ----

/// The IPv6 twin of icmp.rs's routed backend: two routers between the node
/// and a backend, the link between them the narrow hop.
///
/// ```text
///  client ns ---- node ns (xlb) ---- r1 ns ==MTU 1400== r2 ns ---- backend ns
///                 2001:db8:10::1     2001:db8:10::2      2001:db8:12::1  2001:db8:12::2
///                                    2001:db8:11::1      2001:db8:11::2
/// ```
struct RoutedBackend6 {
    _echo: xlb_tests::ChildGuard,
    _r1_port: xlb_tests::XdpPass,
    backend: xlb_tests::Netns,
    _r2: xlb_tests::Netns,
    _r1: xlb_tests::Netns,
}

const NODE_ROUTER_IF: &str = "xlb-r";
const ROUTED_BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x12, 0, 0, 0, 0, 2);
const NARROW_MTU: u32 = 1400;

/// A veth pair from `a` to `b` with an IPv6 address on each end and the
/// kernel's link-local addresses (the routers resolve each other by NDP).
fn veth6(
    (a, a_if, a_addr): (&xlb_tests::Netns, &str, &str),
    (b, b_if, b_addr): (&xlb_tests::Netns, &str, &str),
) {
    a.ip_line(&format!(
        "link add {a_if} type veth peer name {b_if} netns {}",
        b.name()
    ))
    .expect("veth");
    for (netns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        for (key, value) in [("accept_dad", "0"), ("disable_ipv6", "0")] {
            netns
                .sysctl(&format!("net/ipv6/conf/{ifname}/{key}"), value)
                .expect("sysctl");
        }
        netns
            .ip_line(&format!("-6 addr add {addr}/64 dev {ifname} nodad"))
            .expect("address");
        netns.ip_line(&format!("link set {ifname} up")).expect("up");
    }
}

fn routed_backend6(lab: &Lab) -> RoutedBackend6 {
    use xlb_tests::Netns;
    let stem = xlb_tests::netns::unique_stem();
    let r1 = Netns::create(format!("{stem}-r1")).expect("r1");
    let r2 = Netns::create(format!("{stem}-r2")).expect("r2");
    let backend = Netns::create(format!("{stem}-rb")).expect("backend");
    let node = &lab.node;
    veth6(
        (node, NODE_ROUTER_IF, "2001:db8:10::1"),
        (&r1, "eth0", "2001:db8:10::2"),
    );
    veth6(
        (&r1, "eth1", "2001:db8:11::1"),
        (&r2, "eth0", "2001:db8:11::2"),
    );
    veth6(
        (&r2, "eth1", "2001:db8:12::1"),
        (&backend, POD_IF, "2001:db8:12::2"),
    );
    r1.ip_line(&format!("link set eth1 mtu {NARROW_MTU}"))
        .expect("mtu");
    r2.ip_line(&format!("link set eth0 mtu {NARROW_MTU}"))
        .expect("mtu");
    for router in [&r1, &r2] {
        router
            .sysctl("net/ipv6/conf/all/forwarding", "1")
            .expect("forwarding");
    }
    for (netns, route) in [
        (node, "2001:db8:12::/64 via 2001:db8:10::2"),
        (&r1, "2001:db8:12::/64 via 2001:db8:11::2"),
        (&r1, "default via 2001:db8:10::1"),
        (&r2, "default via 2001:db8:11::1"),
        (&backend, "default via 2001:db8:12::1"),
    ] {
        netns
            .ip_line(&format!("-6 route add {route}"))
            .expect("route");
    }
    let r1_port = xlb_tests::lab::nic_like(&r1, "eth0").expect("r1 port");
    let echo = lab
        .start_echo(
            &backend,
            "backend-routed6",
            &[SocketAddr::from((Ipv6Addr::UNSPECIFIED, ECHO_TCP_PORT))],
            &[SocketAddr::from((Ipv6Addr::UNSPECIFIED, ECHO_UDP_PORT))],
        )
        .expect("echo server behind the routers");
    RoutedBackend6 {
        _echo: echo,
        _r1_port: r1_port,
        backend,
        _r2: r2,
        _r1: r1,
    }
}

/// 4 MiB up and echoed back through a hop of MTU 1400 behind the node: the
/// upload needs r1's packet too big (sent to the node's masquerade
/// address) translated to the client, whose route cache must then hold
/// the path MTU; the download needs nothing from xlb (r2 tells the backend
/// directly), and is checked all the same.
#[test]
fn tcp6_through_a_narrower_hop_learns_the_path_mtu() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let routed = routed_backend6(&lab);
    let yaml = format!(
        "node:\n  interfaces: [{}, {NODE_ROUTER_IF}]\n  addresses: [{NODE_ADDR6}]\n\n\
         services:\n{}",
        xlb_tests::lab::NODE_CLIENT_IF,
        service(
            "tcp-routed6",
            "TCP",
            30980,
            "",
            &item(&ROUTED_BACKEND6.to_string(), &[])
        )
    );
    let config = lab.write_file("routed6.yaml", &yaml)?;
    let agent = Agent::start(&lab, &config)?;

    let payload = pattern(4 << 20, 12);
    let started = Instant::now();
    let who = lab.client.run(|| {
        xlb_tests::client::tcp_who_echo_timeout(
            node_port6(30980),
            &payload,
            Duration::from_secs(30),
        )
    })??;
    let elapsed = started.elapsed();
    assert_eq!(
        who.local,
        SocketAddr::from((ROUTED_BACKEND6, ECHO_TCP_PORT))
    );
    let route = lab
        .client
        .exec("ip", &["-6", "route", "get", &NODE_ADDR6.to_string()])?;
    let backend_route = routed
        .backend
        .exec("ip", &["-6", "route", "get", "2001:db8:10::1"])?;
    let exit = agent.stop()?;
    println!(
        "IPv6: 4 MiB each way in {elapsed:?}; fwd_icmp_to_client={}\nclient: {route}backend: \
         {backend_route}",
        counter(&exit.log, "fwd_icmp_to_client")
    );
    assert!(
        route.contains(&format!("mtu {NARROW_MTU}")),
        "the client's route cache has no PMTU of {NARROW_MTU}: {route}\n{}",
        exit.log
    );
    assert!(
        counter(&exit.log, "fwd_icmp_to_client") >= 1,
        "no translated ICMPv6 error counted:\n{}",
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
