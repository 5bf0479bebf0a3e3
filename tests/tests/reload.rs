//! SIGHUP re-reads the config: traffic follows the new one; a broken one is
//! reported and the agent keeps serving the last good one.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use xlb_tests::agent::RELOAD_TIMEOUT;
use xlb_tests::client::{tcp_who_echo, udp_socket, udp_who};
use xlb_tests::lab::{NODE_ADDR, tcp_echo_service, udp_echo_service};
use xlb_tests::{Agent, Lab};

/// `udp-echo` and `tcp-echo` on the demo NodePorts, with the given backends,
/// plus optional extra service YAML.
fn services(udp_backends: &[&str], tcp_backends: &[&str], extra: &str) -> String {
    let list = |addresses: &[&str]| -> String {
        addresses
            .iter()
            .map(|address| format!("      - address: {address}\n"))
            .collect()
    };
    format!(
        "  - name: tcp-echo\n    protocol: TCP\n    nodePort: 30999\n    targetPort: 3333\n    backends:\n{}\
         \n  - name: udp-echo\n    protocol: UDP\n    nodePort: 30998\n    targetPort: 4444\n    backends:\n{}\
         {extra}",
        list(tcp_backends),
        list(udp_backends)
    )
}

/// Backends that answer `flows` new UDP flows to `service`.
fn udp_backends_seen(
    lab: &Lab,
    service: SocketAddr,
    flows: usize,
) -> anyhow::Result<BTreeSet<String>> {
    lab.client.run(|| -> anyhow::Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        for _ in 0..flows {
            let (who, from) = udp_who(&udp_socket()?, service)?;
            anyhow::ensure!(from == service, "reply from {from}, expected {service}");
            seen.insert(who.name);
        }
        Ok(seen)
    })?
}

fn tcp_backends_seen(lab: &Lab, flows: usize) -> anyhow::Result<BTreeSet<String>> {
    lab.client.run(|| -> anyhow::Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        for flow in 0..flows {
            seen.insert(tcp_who_echo(tcp_echo_service(), format!("flow {flow}").as_bytes())?.name);
        }
        Ok(seen)
    })?
}

/// New UDP flows (64) and TCP connections (48) to the echo services reach
/// both backends.
fn assert_both_backends_serve(lab: &Lab) -> anyhow::Result<()> {
    let both = set(&["backend-1", "backend-2"]);
    assert_eq!(udp_backends_seen(lab, udp_echo_service(), 64)?, both);
    assert_eq!(tcp_backends_seen(lab, 48)?, both);
    Ok(())
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

#[test]
fn reload_adds_a_service_and_changes_backends() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let config = lab.write_file(
        "xlb.yaml",
        &lab.config_yaml(&services(&["198.18.1.2"], &["198.18.1.2"], "")),
    )?;
    let mut agent = Agent::start(&lab, &config)?;

    assert_eq!(
        udp_backends_seen(&lab, udp_echo_service(), 32)?,
        set(&["backend-1"])
    );
    assert_eq!(tcp_backends_seen(&lab, 16)?, set(&["backend-1"]));

    // New service on 30997 served only by backend-2; both services get
    // both backends.
    let extra = "\n  - name: udp-extra\n    protocol: UDP\n    nodePort: 30997\n    targetPort: 4444\n    backends:\n      - address: 198.18.2.2\n";
    let both = ["198.18.1.2", "198.18.2.2"];
    lab.write_file("xlb.yaml", &lab.config_yaml(&services(&both, &both, extra)))?;
    agent.reload_and_wait()?;

    let extra_service = SocketAddr::from((NODE_ADDR, 30997));
    assert_eq!(
        udp_backends_seen(&lab, extra_service, 16)?,
        set(&["backend-2"])
    );
    assert_both_backends_serve(&lab)?;

    // Remove backend-1 from udp-echo: new flows go only to backend-2.
    lab.write_file(
        "xlb.yaml",
        &lab.config_yaml(&services(&["198.18.2.2"], &both, extra)),
    )?;
    agent.reload_and_wait()?;
    assert_eq!(
        udp_backends_seen(&lab, udp_echo_service(), 32)?,
        set(&["backend-2"])
    );
    assert!(agent.is_running());
    Ok(())
}

#[test]
fn broken_reload_keeps_serving_the_last_good_config() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let both = ["198.18.1.2", "198.18.2.2"];
    let good = lab.config_yaml(&services(&both, &both, ""));
    let config = lab.write_file("xlb.yaml", &good)?;
    let mut agent = Agent::start(&lab, &config)?;
    let generation = agent.generation();
    assert_eq!(
        udp_backends_seen(&lab, udp_echo_service(), 64)?,
        set(&["backend-1", "backend-2"])
    );

    let broken = good.replace("protocol: UDP", "protocol: SCTP");
    assert_ne!(broken, good);
    let since = agent.log().len();
    lab.write_file("xlb.yaml", &broken)?;
    agent.reload()?;
    // The agent says what is wrong, naming the file and the field...
    let complaint = agent.wait_for_log(since, "protocol", RELOAD_TIMEOUT)?;
    assert!(
        complaint.contains(&config.display().to_string()),
        "the reload error should name {}: {complaint}",
        config.display()
    );
    // ...and goes on serving the last good config.
    assert!(
        agent.is_running(),
        "a broken config must not stop the agent"
    );
    assert_eq!(
        agent.generation(),
        generation,
        "a broken config was applied"
    );
    assert_both_backends_serve(&lab)?;

    // A fixed config is picked up again.
    lab.write_file(
        "xlb.yaml",
        &lab.config_yaml(&services(&["198.18.1.2"], &both, "")),
    )?;
    agent.reload_and_wait()?;
    assert_eq!(
        udp_backends_seen(&lab, udp_echo_service(), 32)?,
        set(&["backend-1"])
    );
    Ok(())
}
