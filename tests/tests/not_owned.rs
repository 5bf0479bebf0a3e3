//! Traffic xlb does not own passes through to the node's kernel untouched:
//! the node's own servers, ICMP, and routed traffic to a pod's address; in
//! both families (`ipv6_...` on the dual-stack lab).

use std::net::SocketAddr;

use xlb_tests::Family::{self, V4, V6};
use xlb_tests::client::{tcp_who_echo, udp_who};
use xlb_tests::lab::ECHO_TCP_PORT;
use xlb_tests::{Agent, Lab};

#[test]
fn node_servers_ping_and_routing_still_work() -> anyhow::Result<()> {
    node_servers_ping_and_routing(V4)
}

#[test]
fn ipv6_node_servers_ping_and_routing_still_work() -> anyhow::Result<()> {
    node_servers_ping_and_routing(V6)
}

fn node_servers_ping_and_routing(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let node_tcp = family.node_port(8080);
    let node_udp = family.node_port(8081);
    let _node_server = lab.start_echo(&lab.node, "node", &[node_tcp], &[node_udp])?;
    let _agent = Agent::start(&lab, &family.demo_config())?;

    lab.client.ping(node_tcp.ip())?;

    let (pod, _) = family.pod_and_node(&lab.backends[0]);
    let direct = SocketAddr::new(pod, ECHO_TCP_PORT);
    let client = family.client();
    lab.client.run(|| -> anyhow::Result<()> {
        // A TCP server on the node's own address and a port xlb does not own.
        let who = tcp_who_echo(node_tcp, &[7u8; 100_000])?;
        assert_eq!(who.name, "node");
        assert_eq!(who.local, node_tcp);
        assert_eq!(who.peer.ip(), client, "not masqueraded");

        let (who, from) = udp_who(&family.udp_socket()?, node_udp)?;
        assert_eq!(from, node_udp);
        assert_eq!(who.name, "node");
        assert_eq!(who.peer.ip(), client);

        // A pod's own address, routed by the node's kernel without NAT.
        let who = tcp_who_echo(direct, b"routed, not balanced")?;
        assert_eq!(who.name, "backend-1");
        assert_eq!(who.peer.ip(), client);

        // And the NodePort still balances alongside all that, with NAT.
        let who = tcp_who_echo(family.tcp_echo_service(), b"balanced")?;
        let backend = lab
            .backend_named(&who.name)
            .unwrap_or_else(|| panic!("unknown backend in {who:?}"));
        let (pod, node) = family.pod_and_node(backend);
        assert_eq!(who.local, SocketAddr::new(pod, ECHO_TCP_PORT));
        assert_eq!(who.peer.ip(), node, "masqueraded");
        Ok(())
    })??;
    Ok(())
}
