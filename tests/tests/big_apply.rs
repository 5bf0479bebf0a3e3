//! A big apply by SIGHUP completes, and the agent's probes answer while it
//! runs. 5,000 backends used to hang the agent for good: it wrote all of
//! `ip -batch`'s route lookups before reading any answer, both pipes filled
//! and both processes waited on each other, with /healthz served on the
//! same (blocked) thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use xlb_tests::client::{healthz, udp_socket, udp_who};
use xlb_tests::lab::udp_echo_service;
use xlb_tests::{Agent, Lab};

/// The agent's default --metrics-addr, inside the lab's node namespace.
const METRICS: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);
/// One probe may take this long before it counts as failed (the kubelet's
/// default probe timeout is 1 s).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// `services` UDP services of `backends` backends each on 198.19.0.0/16,
/// plus the lab's own udp-echo.
fn services(services: usize, backends: usize) -> String {
    let mut yaml = String::from(
        "  - name: udp-echo\n    protocol: UDP\n    nodePort: 30998\n    targetPort: 4444\n    backends:\n      - address: 198.18.1.2\n      - address: 198.18.2.2\n",
    );
    for service in 0..services {
        yaml.push_str(&format!(
            "  - name: big-{service}\n    protocol: UDP\n    nodePort: {}\n    targetPort: 9000\n    backends:\n",
            31_000 + service
        ));
        for backend in 0..backends {
            let index = (service * backends + backend) as u32;
            let address = std::net::Ipv4Addr::from(u32::from_be_bytes([198, 19, 0, 0]) + index);
            yaml.push_str(&format!("      - address: {address}\n"));
        }
    }
    yaml
}

#[test]
fn five_thousand_backends_by_sighup_while_probes_answer() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    // The big services' pods are routed through backend-1, so every route
    // lookup answers and every next hop is the same gateway.
    lab.node.ip_line("route add 198.19.0.0/16 via 198.18.1.2")?;
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services(0, 0)))?;
    let mut agent = Agent::start(&lab, &config)?;

    let big = lab.config_yaml(&services(50, 100));
    let stop = AtomicBool::new(false);
    let (generation, probes) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            lab.node.run(|| {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    outcomes.push(healthz(METRICS, PROBE_TIMEOUT));
                    std::thread::sleep(Duration::from_millis(20));
                }
                outcomes
            })
        });
        let written = std::fs::write(config.with_extension("tmp"), &big)
            .and_then(|()| std::fs::rename(config.with_extension("tmp"), &config));
        let generation = written
            .map_err(anyhow::Error::from)
            .and_then(|()| agent.reload_and_wait().map_err(anyhow::Error::from));
        // Keep probing a little after the apply: the neighbour thread may
        // still be working through its batches.
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let probes = prober.join().expect("the prober panicked");
        (generation, probes)
    });
    let generation = generation?;
    let probes = probes?;
    assert!(generation >= 2, "generation {generation}");
    let failures: Vec<&String> = probes.iter().filter_map(|p| p.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} /healthz probes failed during the apply: {failures:?}\n{}",
        failures.len(),
        probes.len(),
        agent.log()
    );
    assert!(probes.len() > 20, "only {} probes ran", probes.len());

    // The new generation serves, and the neighbour thread did its work
    // (5,000 route lookups) without a failure.
    let service = udp_echo_service();
    let (_, from) = lab.client.run(|| udp_who(&udp_socket()?, service))??;
    assert_eq!(from, service);
    let log = agent.log();
    assert!(
        !log.contains("cannot keep its next hop resolved"),
        "neighbour work failed:\n{log}"
    );
    let exit = agent.stop()?;
    assert!(exit.status.success(), "{}", exit.log);
    Ok(())
}
