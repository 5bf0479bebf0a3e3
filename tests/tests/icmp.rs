//! ICMP errors, path MTU and fragments of balanced flows (issue 12), end
//! to end with real sockets and real kernels on both sides; the refused
//! client and the fragments in both families (the IPv6 path MTU test, with
//! its own routed backend, is in ipv6.rs).
//!
//! ```text
//!  client ns ---- node ns (xlb) ---- r1 ns ==MTU 1400== r2 ns ---- backend ns
//!  198.18.0.2     198.18.0.1         198.18.10.2         198.18.11.2  198.18.12.2
//!                 198.18.10.1        198.18.11.1         198.18.12.1
//! ```

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use xlb_tests::Family::{self, V4, V6};
use xlb_tests::client::{IO_TIMEOUT, pattern, tcp_who_echo_timeout, udp_exchange, udp_socket};
use xlb_tests::lab::{ECHO_TCP_PORT, ECHO_UDP_PORT, NODE_ADDR, NODE_CLIENT_IF, POD_IF, nic_like};
use xlb_tests::netns::unique_stem;
use xlb_tests::{Agent, ChildGuard, Lab, Netns, XdpPass};

const ROUTED_TCP: u16 = 30_980;
const ROUTED_UDP: u16 = 30_981;
/// The node's interface towards the first router.
const NODE_ROUTER_IF: &str = "xlb-r";
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 12, 2);
const NARROW_MTU: u32 = 1400;

/// Two routers between the node and a backend; the link between the
/// routers is the narrow hop. Dropped in order: echo server, namespaces.
struct RoutedBackend {
    _echo: ChildGuard,
    _r1_port: XdpPass,
    backend: Netns,
    _r2: Netns,
    _r1: Netns,
}

fn veth(a: &Netns, a_if: &str, a_cidr: &str, b: &Netns, b_if: &str, b_cidr: &str) {
    let b_name = b.name();
    a.ip_line(&format!(
        "link add {a_if} type veth peer name {b_if} netns {b_name}"
    ))
    .expect("veth");
    a.ip_line(&format!("addr add {a_cidr} dev {a_if}"))
        .expect("address");
    b.ip_line(&format!("addr add {b_cidr} dev {b_if}"))
        .expect("address");
    a.ip_line(&format!("link set {a_if} up")).expect("up");
    b.ip_line(&format!("link set {b_if} up")).expect("up");
}

fn routed_backend(lab: &Lab) -> RoutedBackend {
    let stem = unique_stem();
    let r1 = Netns::create(format!("{stem}-r1")).expect("r1");
    let r2 = Netns::create(format!("{stem}-r2")).expect("r2");
    let backend = Netns::create(format!("{stem}-rb")).expect("backend");
    let node = &lab.node;
    veth(
        node,
        NODE_ROUTER_IF,
        "198.18.10.1/24",
        &r1,
        "eth0",
        "198.18.10.2/24",
    );
    veth(&r1, "eth1", "198.18.11.1/24", &r2, "eth0", "198.18.11.2/24");
    veth(
        &r2,
        "eth1",
        "198.18.12.1/24",
        &backend,
        POD_IF,
        "198.18.12.2/24",
    );
    // The narrow hop: both ends of the link between the routers.
    r1.ip_line(&format!("link set eth1 mtu {NARROW_MTU}"))
        .expect("mtu");
    r2.ip_line(&format!("link set eth0 mtu {NARROW_MTU}"))
        .expect("mtu");
    for router in [&r1, &r2] {
        router
            .sysctl("net/ipv4/ip_forward", "1")
            .expect("forwarding");
    }
    node.ip_line("route add 198.18.12.0/24 via 198.18.10.2")
        .expect("route");
    r1.ip_line("route add 198.18.12.0/24 via 198.18.11.2")
        .expect("route");
    r1.ip_line("route add default via 198.18.10.1")
        .expect("route");
    r2.ip_line("route add default via 198.18.11.1")
        .expect("route");
    backend
        .ip_line("route add default via 198.18.12.1")
        .expect("route");
    // r1's port faces the node's XDP program like a switch port would.
    let r1_port = nic_like(&r1, "eth0").expect("r1 port");
    let echo = lab
        .start_echo(
            &backend,
            "backend-routed",
            &[SocketAddr::from(([0, 0, 0, 0], ECHO_TCP_PORT))],
            &[SocketAddr::from(([0, 0, 0, 0], ECHO_UDP_PORT))],
        )
        .expect("echo server behind the routers");
    RoutedBackend {
        _echo: echo,
        _r1_port: r1_port,
        backend,
        _r2: r2,
        _r1: r1,
    }
}

fn routed_config(lab: &Lab) -> std::path::PathBuf {
    let yaml = format!(
        "node:\n  interfaces: [{NODE_CLIENT_IF}, {NODE_ROUTER_IF}]\n  addresses: [{NODE_ADDR}]\n\n\
         services:\n\
         \x20 - name: tcp-routed\n    protocol: TCP\n    nodePort: {ROUTED_TCP}\n    targetPort: {ECHO_TCP_PORT}\n    backends:\n      - address: {BACKEND}\n\
         \x20 - name: udp-routed\n    protocol: UDP\n    nodePort: {ROUTED_UDP}\n    targetPort: {ECHO_UDP_PORT}\n    backends:\n      - address: {BACKEND}\n"
    );
    lab.write_file("routed.yaml", &yaml).expect("config")
}

/// The counter `name=N` in the agent's exit log, 0 when absent.
fn counter(log: &str, name: &str) -> u64 {
    log.split_whitespace()
        .filter_map(|field| field.strip_prefix(&format!("{name}=")))
        .filter_map(|n| n.parse().ok())
        .next_back()
        .unwrap_or(0)
}

#[test]
fn tcp_through_a_narrower_hop_learns_the_path_mtu() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let routed = routed_backend(&lab);
    let config = routed_config(&lab);
    let agent = Agent::start(&lab, &config)?;
    let service = SocketAddr::from((NODE_ADDR, ROUTED_TCP));

    // 4 MiB up, echoed back: the upload needs the router's "fragmentation
    // needed" translated to the client; the download needs nothing from
    // xlb (r2 tells the backend directly), and is checked all the same.
    let payload = pattern(4 << 20, 12);
    let started = std::time::Instant::now();
    let who = lab
        .client
        .run(|| tcp_who_echo_timeout(service, &payload, Duration::from_secs(30)))??;
    let elapsed = started.elapsed();
    assert_eq!(who.local, SocketAddr::from((BACKEND, ECHO_TCP_PORT)));
    let route = lab
        .client
        .exec("ip", &["route", "get", &NODE_ADDR.to_string()])?;
    let backend_route = routed
        .backend
        .exec("ip", &["route", "get", "198.18.10.1"])?;
    let exit = agent.stop()?;
    println!(
        "4 MiB each way in {elapsed:?}; fwd_icmp_to_client={}\nclient: {route}backend: {backend_route}",
        counter(&exit.log, "fwd_icmp_to_client")
    );
    assert!(
        route.contains(&format!("mtu {NARROW_MTU}")),
        "the client's route cache has no PMTU of {NARROW_MTU}: {route}\n{}",
        exit.log
    );
    assert!(
        counter(&exit.log, "fwd_icmp_to_client") >= 1,
        "no translated ICMP error counted:\n{}",
        exit.log
    );
    Ok(())
}

#[test]
fn closed_backend_port_refuses_the_client_through_the_node_port() -> anyhow::Result<()> {
    closed_backend_port_refuses_the_client(V4)
}

/// The backend's ICMPv6 port unreachable, translated by `xlb6_icmp`.
#[test]
fn closed_backend_port_refuses_an_ipv6_client_through_the_node_port() -> anyhow::Result<()> {
    closed_backend_port_refuses_the_client(V6)
}

fn closed_backend_port_refuses_the_client(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let closed_port = ECHO_UDP_PORT + 1;
    let (pod, _) = family.pod_and_node(&lab.backends[0]);
    let services = format!(
        "  - name: udp-closed\n    protocol: UDP\n    nodePort: {ROUTED_UDP}\n    targetPort: {closed_port}\n    backends:\n      - address: {pod}\n"
    );
    let config = lab.write_file("closed.yaml", &family.config(&lab, &services))?;
    let agent = Agent::start(&lab, &config)?;

    let result = lab.client.run(|| -> anyhow::Result<_> {
        // A connected socket accepts only errors quoting its own tuple:
        // ECONNREFUSED proves the quote says client -> NODE:nodePort.
        let socket = family.udp_socket()?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.connect(family.node_port(ROUTED_UDP))?;
        socket.send(b"anyone?")?;
        Ok(socket.recv(&mut [0u8; 64]).map(drop))
    })??;
    let exit = agent.stop()?;
    assert!(
        matches!(&result, Err(error) if error.kind() == ErrorKind::ConnectionRefused),
        "{result:?}, expected connection refused\n{}",
        exit.log
    );
    assert_eq!(
        counter(&exit.log, "fwd_icmp_to_client"),
        1,
        "the backend's port unreachable went through xlb once:\n{}",
        exit.log
    );
    Ok(())
}

#[test]
fn fragmented_udp_datagrams_arrive_whole_both_ways() -> anyhow::Result<()> {
    fragmented_udp_datagrams(V4, 200)
}

/// Over IPv6 the senders' stacks fragment too (a fragment carries 1448
/// bytes of the datagram); later fragments follow in `xlb6_frag`.
#[test]
fn fragmented_udp6_datagrams_arrive_whole_both_ways() -> anyhow::Result<()> {
    fragmented_udp_datagrams(V6, 100)
}

/// `flows` flows of a 3000- and a 9000-byte datagram each way, echoed
/// byte for byte.
fn fragmented_udp_datagrams(family: Family, flows: usize) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let agent = Agent::start(&lab, &family.demo_config())?;
    let service = family.udp_echo_service();

    let served = lab.client.run(|| -> anyhow::Result<Vec<String>> {
        let mut served = Vec::new();
        for flow in 0..flows {
            let socket = family.udp_socket()?;
            for len in [3000usize, 9000] {
                // Plain echoes, checked byte for byte; WHO (below) says
                // which backend the flow went to.
                let payload = pattern(len, (flow * 2 + len) as u32);
                let (reply, from) = udp_exchange(&socket, service, &payload)?;
                anyhow::ensure!(from == service, "reply from {from}");
                anyhow::ensure!(
                    reply == payload,
                    "flow {flow}: {len}-byte datagram came back as {} bytes",
                    reply.len()
                );
            }
            let (who, _) = xlb_tests::client::udp_who(&socket, service)?;
            served.push(who.name);
        }
        Ok(served)
    })??;
    let exit = agent.stop()?;
    let per_backend: Vec<usize> = lab
        .backends
        .iter()
        .map(|backend| served.iter().filter(|name| **name == backend.name).count())
        .collect();
    println!(
        "{flows} flows{}, 3000 + 9000 bytes each way: per backend {per_backend:?}; fwd_fragment={} pass_fragment_unknown={}",
        family.over(),
        counter(&exit.log, "fwd_fragment"),
        counter(&exit.log, "pass_fragment_unknown")
    );
    assert!(
        per_backend.iter().all(|&n| n > 0),
        "both backends serve: {per_backend:?}"
    );
    // 3000 bytes: 3 fragments, 9000: 7; both ways; all but the first follow.
    let later = (flows * ((3 - 1) + (7 - 1)) * 2) as u64;
    assert!(
        counter(&exit.log, "fwd_fragment") >= later,
        "expected at least {later} later fragments followed:\n{}",
        exit.log
    );
    Ok(())
}

#[test]
fn df_datagram_too_big_for_the_backend_link_gets_frag_needed_from_the_node() -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;

    let lab = Lab::new(1)?;
    let backend = &lab.backends[0];
    // Both ends of the node's link to the backend are narrower than the
    // client's: the node itself is the router that must say so.
    lab.node
        .ip_line(&format!("link set {} mtu {NARROW_MTU}", backend.node_if))?;
    backend
        .netns
        .ip_line(&format!("link set {POD_IF} mtu {NARROW_MTU}"))?;
    let agent = Agent::start(&lab, &demo_config_for(&lab)?)?;
    let service = xlb_tests::lab::udp_echo_service();

    let (first, second, small) = lab.client.run(|| -> anyhow::Result<_> {
        let socket = udp_socket()?;
        let on: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt reads `on` (an int, its size passed) during
        // the call; the fd is the socket's own.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "IP_MTU_DISCOVER: {}",
            std::io::Error::last_os_error()
        );
        socket.connect(service)?;
        // 1472 bytes fill the client's 1500-byte MTU with DF set: the node
        // answers "fragmentation needed, MTU 1400" instead of forwarding.
        let big = pattern(1472, 1);
        socket.send(&big)?;
        let first = socket.recv(&mut [0u8; 2048]).map(drop);
        // The client's stack has learned the MTU: the same size is refused
        // locally now, and one that fits goes through.
        let second = socket.send(&big).map(drop);
        let fits = pattern(NARROW_MTU as usize - 28, 2);
        socket.send(&fits)?;
        let mut buf = vec![0u8; 2048];
        let len = socket.recv(&mut buf)?;
        Ok((first, second, buf[..len] == fits[..]))
    })??;
    let route = lab
        .client
        .exec("ip", &["route", "get", &NODE_ADDR.to_string()])?;
    let exit = agent.stop()?;
    println!(
        "first send: {first:?}; second: {second:?}; reject_frag_needed={}\nclient: {route}",
        counter(&exit.log, "reject_frag_needed")
    );
    // Linux reports the ICMP on a connected socket as EMSGSIZE.
    assert!(
        matches!(&first, Err(error) if error.raw_os_error() == Some(libc::EMSGSIZE)),
        "{first:?}, expected EMSGSIZE from the node's frag needed\n{}",
        exit.log
    );
    assert!(
        matches!(&second, Err(error) if error.raw_os_error() == Some(libc::EMSGSIZE)),
        "{second:?}: the client did not learn the path MTU"
    );
    assert!(small, "a datagram that fits came back different");
    assert!(route.contains(&format!("mtu {NARROW_MTU}")), "{route}");
    assert_eq!(counter(&exit.log, "reject_frag_needed"), 1, "{}", exit.log);
    Ok(())
}

/// config/demo.yaml's services for a lab with only backend 1.
fn demo_config_for(lab: &Lab) -> anyhow::Result<std::path::PathBuf> {
    let backend = lab.backends[0].addr;
    let services = format!(
        "  - name: udp-echo\n    protocol: UDP\n    nodePort: {}\n    targetPort: {ECHO_UDP_PORT}\n    backends:\n      - address: {backend}\n",
        xlb_tests::lab::UDP_ECHO_NODE_PORT
    );
    Ok(lab.write_file("mtu.yaml", &lab.config_yaml(&services))?)
}
