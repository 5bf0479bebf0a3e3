//! New flows spread over every backend of a service.

use std::collections::BTreeMap;

use xlb_tests::client::{tcp_who_echo, udp_socket, udp_who};
use xlb_tests::lab::{tcp_echo_service, udp_echo_service};
use xlb_tests::{Agent, Lab, demo_config};

#[test]
fn udp_flows_use_both_backends() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &demo_config())?;
    let service = udp_echo_service();

    let counts = lab
        .client
        .run(|| -> anyhow::Result<BTreeMap<String, usize>> {
            let mut counts = BTreeMap::new();
            // 64 source ports: all on one of two equal backends has odds 2^-63.
            for _ in 0..64 {
                let (who, from) = udp_who(&udp_socket()?, service)?;
                assert_eq!(from, service);
                *counts.entry(who.name).or_default() += 1;
            }
            Ok(counts)
        })??;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2"],
        "UDP flows per backend: {counts:?}"
    );
    Ok(())
}

#[test]
fn tcp_connections_use_both_backends() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let _agent = Agent::start(&lab, &demo_config())?;
    let service = tcp_echo_service();

    let counts = lab
        .client
        .run(|| -> anyhow::Result<BTreeMap<String, usize>> {
            let mut counts = BTreeMap::new();
            for connection in 0..48 {
                let who = tcp_who_echo(service, format!("connection {connection}").as_bytes())?;
                *counts.entry(who.name).or_default() += 1;
            }
            Ok(counts)
        })??;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2"],
        "TCP connections per backend: {counts:?}"
    );
    Ok(())
}
