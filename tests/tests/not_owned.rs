//! Traffic xlb does not own passes through to the node's kernel untouched:
//! the node's own servers, ICMP, and routed traffic to a pod's address.

use std::net::SocketAddr;

use xlb_tests::client::{tcp_who_echo, udp_socket, udp_who};
use xlb_tests::lab::{CLIENT_ADDR, ECHO_TCP_PORT, NODE_ADDR, tcp_echo_service};
use xlb_tests::{Agent, Lab, demo_config};

#[test]
fn node_servers_ping_and_routing_still_work() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let node_tcp = SocketAddr::from((NODE_ADDR, 8080));
    let node_udp = SocketAddr::from((NODE_ADDR, 8081));
    let _node_server = lab.start_echo(&lab.node, "node", &[node_tcp], &[node_udp])?;
    let _agent = Agent::start(&lab, &demo_config())?;

    lab.client.ping(NODE_ADDR)?;

    let backend = &lab.backends[0];
    let direct = SocketAddr::from((backend.addr, ECHO_TCP_PORT));
    lab.client.run(|| -> anyhow::Result<()> {
        // A TCP server on the node's own address and a port xlb does not own.
        let who = tcp_who_echo(node_tcp, &[7u8; 100_000])?;
        assert_eq!(who.name, "node");
        assert_eq!(who.local, node_tcp);
        assert_eq!(who.peer.ip(), CLIENT_ADDR, "not masqueraded");

        let (who, from) = udp_who(&udp_socket()?, node_udp)?;
        assert_eq!(from, node_udp);
        assert_eq!(who.name, "node");
        assert_eq!(who.peer.ip(), CLIENT_ADDR);

        // A pod's own address, routed by the node's kernel without NAT.
        let who = tcp_who_echo(direct, b"routed, not balanced")?;
        assert_eq!(who.name, "backend-1");
        assert_eq!(who.peer.ip(), CLIENT_ADDR);

        // And the NodePort still balances alongside all that.
        tcp_who_echo(tcp_echo_service(), b"balanced")?;
        Ok(())
    })??;
    Ok(())
}
