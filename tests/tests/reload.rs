//! SIGHUP re-reads the config: traffic follows the new one (in both
//! families: `reload6_` over IPv6 on the dual-stack lab); a broken one is
//! reported and the agent keeps serving the last good one.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use xlb_tests::Family::{self, V4, V6};
use xlb_tests::agent::RELOAD_TIMEOUT;
use xlb_tests::client::{tcp_who_echo, udp_socket_for, udp_who};
use xlb_tests::lab::{tcp_echo_service, udp_echo_service};
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
            let (who, from) = udp_who(&udp_socket_for(service)?, service)?;
            anyhow::ensure!(from == service, "reply from {from}, expected {service}");
            seen.insert(who.name);
        }
        Ok(seen)
    })?
}

/// Backends that answer `flows` new TCP connections to `service`.
fn tcp_backends_seen(
    lab: &Lab,
    service: SocketAddr,
    flows: usize,
) -> anyhow::Result<BTreeSet<String>> {
    lab.client.run(|| -> anyhow::Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        for flow in 0..flows {
            seen.insert(tcp_who_echo(service, format!("flow {flow}").as_bytes())?.name);
        }
        Ok(seen)
    })?
}

/// New UDP flows (64) and TCP connections (48) to the echo services of
/// `family` reach both backends.
fn assert_both_backends_serve(lab: &Lab, family: Family) -> anyhow::Result<()> {
    let both = set(&["backend-1", "backend-2"]);
    assert_eq!(udp_backends_seen(lab, family.udp_echo_service(), 64)?, both);
    assert_eq!(tcp_backends_seen(lab, family.tcp_echo_service(), 48)?, both);
    Ok(())
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

#[test]
fn reload_adds_a_service_and_changes_backends() -> anyhow::Result<()> {
    adds_a_service_and_changes_backends(V4)
}

#[test]
fn reload6_adds_a_service_and_changes_backends() -> anyhow::Result<()> {
    adds_a_service_and_changes_backends(V6)
}

fn adds_a_service_and_changes_backends(family: Family) -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let (one, two) = (
        family.backend_addr(1).to_string(),
        family.backend_addr(2).to_string(),
    );
    let config = lab.write_file(
        "xlb.yaml",
        &family.config(&lab, &services(&[&one], &[&one], "")),
    )?;
    let mut agent = Agent::start(&lab, &config)?;
    let (udp, tcp) = (family.udp_echo_service(), family.tcp_echo_service());

    assert_eq!(udp_backends_seen(&lab, udp, 32)?, set(&["backend-1"]));
    assert_eq!(tcp_backends_seen(&lab, tcp, 16)?, set(&["backend-1"]));

    // New service on 30997 served only by backend-2; both services get
    // both backends.
    let extra = format!(
        "\n  - name: udp-extra\n    protocol: UDP\n    nodePort: 30997\n    targetPort: 4444\n    backends:\n      - address: {two}\n"
    );
    let both = [one.as_str(), two.as_str()];
    lab.write_file(
        "xlb.yaml",
        &family.config(&lab, &services(&both, &both, &extra)),
    )?;
    agent.reload_and_wait()?;

    assert_eq!(
        udp_backends_seen(&lab, family.node_port(30997), 16)?,
        set(&["backend-2"])
    );
    assert_both_backends_serve(&lab, family)?;

    // Remove backend-1 from udp-echo: new flows go only to backend-2.
    lab.write_file(
        "xlb.yaml",
        &family.config(&lab, &services(&[&two], &both, &extra)),
    )?;
    agent.reload_and_wait()?;
    assert_eq!(udp_backends_seen(&lab, udp, 32)?, set(&["backend-2"]));
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
    assert_both_backends_serve(&lab, V4)?;

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

/// Sends `line` on `stream` and reads its echo.
fn echo_line(stream: &mut TcpStream, line: &str) -> anyhow::Result<()> {
    stream.write_all(line.as_bytes())?;
    let mut echoed = vec![0u8; line.len()];
    stream.read_exact(&mut echoed)?;
    anyhow::ensure!(echoed == line.as_bytes(), "echo {echoed:?} for {line:?}");
    Ok(())
}

/// A TCP stream whose service is removed while it runs goes on as it did
/// before the port filter: its backend still serves another service, so
/// its segments still find their flow, also after the agent's conntrack
/// walk (which must keep the removed NodePort listed while the flow lives).
/// A new connection to the removed NodePort is not balanced.
#[test]
fn a_stream_of_a_removed_service_runs_on_while_its_backend_serves() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let twin = "\n  - name: tcp-twin\n    protocol: TCP\n    nodePort: 30997\n    targetPort: 3333\n    backends:\n      - address: 198.18.1.2\n";
    let one = ["198.18.1.2"];
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(&services(&one, &one, twin)))?;
    let mut agent = Agent::start(&lab, &config)?;
    let mut stream = lab.client.run(|| -> anyhow::Result<TcpStream> {
        let mut stream = TcpStream::connect_timeout(&tcp_echo_service(), RELOAD_TIMEOUT)?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"WHO\n")?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut who = String::new();
        reader.read_line(&mut who)?;
        anyhow::ensure!(who.contains("backend-1"), "{who}");
        Ok(stream)
    })??;
    echo_line(&mut stream, "before the removal\n")?;

    // Only udp-echo and the twin are left: tcp-echo's NodePort is gone.
    let without = format!(
        "  - name: udp-echo\n    protocol: UDP\n    nodePort: 30998\n    targetPort: 4444\n    backends:\n      - address: 198.18.1.2\n{twin}"
    );
    lab.write_file("xlb.yaml", &lab.config_yaml(&without))?;
    agent.reload_and_wait()?;
    // Past two GC periods (5 s): the agent walked the conntrack keys.
    let until = Instant::now() + Duration::from_secs(12);
    let mut sent = 0;
    while Instant::now() < until {
        echo_line(&mut stream, &format!("after the removal, line {sent}\n"))?;
        sent += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let fresh = lab.client.run(|| {
        xlb_tests::client::tcp_who_echo_timeout(tcp_echo_service(), b"new", Duration::from_secs(2))
    })?;
    anyhow::ensure!(
        fresh.is_err(),
        "a new connection to the removed NodePort was served"
    );
    assert!(agent.is_running());
    Ok(())
}
