//! The lab itself, without the agent. If these fail, the other end-to-end
//! tests' failures say nothing about xlb: fix the lab (or the machine) first.

use std::net::SocketAddr;
use std::path::Path;

use xlb_tests::client::{pattern, tcp_who_echo, udp_socket, udp_socket6, udp_who};
use xlb_tests::lab::{
    CLIENT_ADDR, CLIENT_ADDR6, ECHO_TCP_PORT, ECHO_UDP_PORT, NODE_ADDR, NODE_ADDR6, backend_addr6,
};
use xlb_tests::{Lab, netns};

#[test]
fn client_reaches_node_and_node_reaches_backends() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;

    lab.client.ping(NODE_ADDR)?;

    for backend in &lab.backends {
        let tcp = SocketAddr::from((backend.addr, ECHO_TCP_PORT));
        let payload = pattern(100_000, u32::from(backend.index));
        let who = lab.node.run(|| tcp_who_echo(tcp, &payload))??;
        assert_eq!(who.name, backend.name);
        assert_eq!(who.local, tcp);
        assert_eq!(who.peer.ip(), backend.node_addr);

        let udp = SocketAddr::from((backend.addr, ECHO_UDP_PORT));
        let (who, from) = lab.node.run(|| udp_who(&udp_socket()?, udp))??;
        assert_eq!(from, udp);
        assert_eq!(who.name, backend.name);
        assert_eq!(who.local, udp);
        assert_eq!(who.peer.ip(), backend.node_addr);
    }
    Ok(())
}

#[test]
fn pod_ends_are_set_up_like_real_nics() -> anyhow::Result<()> {
    // Without GRO or an XDP program a veth drops frames redirected into it,
    // and without an XDP program it never flushes frames its peer sent back
    // with XDP_TX; with TX checksum offload the pods would send partial
    // checksums no real network delivers.
    let lab = Lab::new(1)?;
    for netns in [&lab.client, &lab.backends[0].netns] {
        let link = netns.ip(&["link", "show", "eth0"])?;
        assert!(
            link.contains("prog/xdp"),
            "{}: no XDP program:\n{link}",
            netns.name()
        );
        let features = netns.exec("ethtool", &["-k", "eth0"])?;
        for expected in ["generic-receive-offload: on", "tx-checksumming: off"] {
            assert!(
                features.lines().any(|line| line.trim() == expected),
                "{}: no {expected:?} in ethtool -k eth0:\n{features}",
                netns.name()
            );
        }
    }
    Ok(())
}

#[test]
fn node_forwards_between_client_and_backends() -> anyhow::Result<()> {
    // Plain IP forwarding through the node, no NAT: the backend sees the
    // client's own address.
    let lab = Lab::new(1)?;
    let backend = &lab.backends[0];
    let tcp = SocketAddr::from((backend.addr, ECHO_TCP_PORT));
    let who = lab
        .client
        .run(|| tcp_who_echo(tcp, b"through the node"))??;
    assert_eq!(who.name, backend.name);
    assert_eq!(who.peer.ip(), CLIENT_ADDR);
    backend.netns.ping(CLIENT_ADDR)?;
    Ok(())
}

#[test]
fn labs_are_separate_and_removed_on_drop() -> anyhow::Result<()> {
    let first = Lab::new(1)?;
    let second = Lab::new(1)?;
    assert_ne!(first.node.name(), second.node.name());

    let names: Vec<String> = [&first.node, &first.client, &first.backends[0].netns]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    let echo_pid = first.backends[0].echo_pid();
    let dir = first.dir().to_owned();
    drop(first);

    for name in &names {
        let path = Path::new(netns::NETNS_DIR).join(name);
        assert!(!path.exists(), "{} still exists", path.display());
    }
    assert!(
        !Path::new("/proc").join(echo_pid.to_string()).exists(),
        "echo server {echo_pid} still runs"
    );
    assert!(!dir.exists(), "{} still exists", dir.display());

    // The other lab is untouched.
    second.client.ping(NODE_ADDR)?;
    Ok(())
}

#[test]
fn client_reaches_backends_over_ipv6_through_the_node() -> anyhow::Result<()> {
    // The kernel alone routes IPv6 client -> node -> backend (no NAT): the
    // backend's echo answers on its IPv6 address over TCP and UDP and sees
    // the client's own IPv6 address.
    let lab = Lab::new(2)?;
    lab.client.ping(NODE_ADDR6)?;
    for backend in &lab.backends {
        assert_eq!(backend.addr6, backend_addr6(backend.index));
        lab.client.ping(backend.addr6)?;
        backend.netns.ping(CLIENT_ADDR6)?;
        lab.node.ping(backend.addr6)?;

        let tcp = SocketAddr::from((backend.addr6, ECHO_TCP_PORT));
        let payload = pattern(100_000, u32::from(backend.index));
        let who = lab.client.run(|| tcp_who_echo(tcp, &payload))??;
        assert_eq!(who.name, backend.name);
        assert_eq!(who.local, tcp);
        assert_eq!(who.peer.ip(), CLIENT_ADDR6);

        let udp = SocketAddr::from((backend.addr6, ECHO_UDP_PORT));
        let (who, from) = lab.client.run(|| udp_who(&udp_socket6()?, udp))??;
        assert_eq!(from, udp);
        assert_eq!(who.name, backend.name);
        assert_eq!(who.local, udp);
        assert_eq!(who.peer.ip(), CLIENT_ADDR6);
    }

    // IPv4 to the same servers still reports IPv4 addresses (the IPv6
    // listeners are IPv6-only, so nothing arrives as ::ffff:a.b.c.d).
    let backend = &lab.backends[0];
    let tcp = SocketAddr::from((backend.addr, ECHO_TCP_PORT));
    let who = lab.client.run(|| tcp_who_echo(tcp, b"v4"))??;
    assert_eq!(who.peer.ip(), CLIENT_ADDR);
    Ok(())
}

#[test]
fn node_forwards_ipv6_and_has_no_link_local_chatter() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let forwarding = lab.node.run(|| {
        std::fs::read_to_string(format!(
            "/proc/sys/net/ipv6/conf/{}/forwarding",
            lab.backends[0].node_if
        ))
    })??;
    assert_eq!(forwarding.trim(), "1");
    for netns in [&lab.node, &lab.client, &lab.backends[0].netns] {
        let addrs = netns.ip(&["-6", "addr", "show"])?;
        assert!(
            !addrs.contains("fe80:"),
            "{}: a link-local address:\n{addrs}",
            netns.name()
        );
        assert!(!addrs.contains("tentative"), "{}:\n{addrs}", netns.name());
    }
    Ok(())
}
