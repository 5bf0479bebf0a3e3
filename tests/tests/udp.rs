//! UDP through the `udp-echo` NodePort (198.18.0.1:30998 -> backends:4444),
//! and over IPv6 on the dual-stack lab ([2001:db8::1]:30998, the `udp6_`
//! tests).

use std::net::SocketAddr;

use xlb_tests::Family::{self, V4, V6};
use xlb_tests::client::{pattern, udp_exchange, udp_who};
use xlb_tests::lab::ECHO_UDP_PORT;
use xlb_tests::{Agent, Lab};

#[test]
fn udp_round_trip_with_dnat_and_masquerade() -> anyhow::Result<()> {
    round_trip(V4)
}

#[test]
fn udp6_round_trip_with_dnat_and_masquerade() -> anyhow::Result<()> {
    round_trip(V6)
}

fn round_trip(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let agent = Agent::start(&lab, &family.demo_config())?;
    let service = family.udp_echo_service();

    lab.client.run(|| -> anyhow::Result<()> {
        let socket = family.udp_socket()?;
        let (who, from) = udp_who(&socket, service)?;
        assert_eq!(
            from, service,
            "the reply must come from the NodePort itself"
        );
        let backend = lab
            .backend_named(&who.name)
            .unwrap_or_else(|| panic!("unknown backend in {who:?}"));
        let (pod, node) = family.pod_and_node(backend);
        assert_eq!(
            who.local,
            SocketAddr::new(pod, ECHO_UDP_PORT),
            "DNAT to the backend's address of the client's family and targetPort"
        );
        assert_eq!(
            who.peer.ip(),
            node,
            "masquerade: the backend sees the node's address on its link"
        );

        // Payloads of several sizes (up to what fits one 1500-byte frame)
        // come back intact, from the NodePort.
        let sizes = [1usize, 64, 512, 1400, family.max_udp_payload()];
        for (seed, len) in sizes.into_iter().enumerate() {
            let payload = pattern(len, seed as u32);
            let (reply, from) = udp_exchange(&socket, service, &payload)?;
            assert_eq!(from, service);
            assert_eq!(reply, payload, "echo of {len} bytes");
        }
        Ok(())
    })??;

    // On SIGTERM the agent exits cleanly and reports what the datapath did.
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
fn udp_flow_sticks_to_one_backend() -> anyhow::Result<()> {
    flow_sticks(V4)
}

#[test]
fn udp6_flow_sticks_to_one_backend() -> anyhow::Result<()> {
    flow_sticks(V6)
}

fn flow_sticks(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &family.demo_config())?;
    let service = family.udp_echo_service();

    lab.client.run(|| -> anyhow::Result<()> {
        let socket = family.udp_socket()?;
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
fn udp_flows_of_many_clients_all_answered_from_node_port() -> anyhow::Result<()> {
    many_clients(V4)
}

#[test]
fn udp6_flows_of_many_clients_all_answered_from_node_port() -> anyhow::Result<()> {
    many_clients(V6)
}

fn many_clients(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &family.demo_config())?;
    let service = family.udp_echo_service();

    lab.client.run(|| -> anyhow::Result<()> {
        // Many sockets open at once: distinct flows interleaved.
        let sockets = (0..32)
            .map(|_| family.udp_socket())
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
