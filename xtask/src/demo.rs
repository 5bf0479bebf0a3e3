//! `cargo xtask demo`: the lab of config/demo.yaml with the agent running,
//! UDP and TCP sent from the client through both NodePorts, and a tally of
//! which backend answered and whether every reply looked right.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use lb_common::Reason;
use xlb_tests::client::{pattern, tcp_who_echo_timeout, udp_socket, udp_who};
use xlb_tests::lab::{
    ECHO_TCP_PORT, ECHO_UDP_PORT, NODE_CLIENT_IF, tcp_echo_service, udp_echo_service,
};
use xlb_tests::{Agent, Lab, Who};

use crate::{build, setup, signals};

const UDP_FLOWS: usize = 200;
const TCP_CONNECTIONS: usize = 100;
const TCP_PAYLOAD: usize = 16 * 1024;
/// Per request; the lab answers in well under a millisecond.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Stop sending after this many failures in a row: the datapath is not
/// forwarding, and waiting out every timeout only delays saying so.
const GIVE_UP_AFTER: usize = 5;

pub fn run() -> anyhow::Result<ExitCode> {
    signals::teardown_on_interrupt()?;
    setup::run()?;
    build::build()?;
    let xlb = build::bin("xlb")?;
    let echo = build::bin("xlb-echo")?;
    let config = xlb_tests::demo_config();

    let lab = Lab::with_echo_bin(2, &echo)?;
    print_lab(&lab);

    println!(
        "demo: starting `xlb run --config {}` in {}",
        config.display(),
        lab.node.name()
    );
    let agent = Agent::start_with(&xlb, &lab, &config, &[])?;
    println!("demo: agent ready");

    let udp = send_udp(&lab)?;
    // (Each round stops early once interrupted; the agent and the lab are
    // then still stopped and removed below.)
    udp.print(&format!(
        "UDP {}: {UDP_FLOWS} WHO datagrams, each from its own source port",
        udp_echo_service()
    ));
    let tcp = send_tcp(&lab)?;
    tcp.print(&format!(
        "TCP {}: {TCP_CONNECTIONS} connections, WHO + {} KiB echoed each",
        tcp_echo_service(),
        TCP_PAYLOAD / 1024
    ));

    let exit = agent.stop()?;
    print_counters(&exit.log);
    if !exit.status.success() {
        println!(
            "demo: note: the agent exited with {} on SIGTERM",
            exit.status
        );
    }
    drop(lab);
    println!("demo: lab removed");
    if signals::interrupted() {
        println!("demo: interrupted");
        return Ok(ExitCode::from(130));
    }

    let mut problems = Vec::new();
    for (protocol, tally) in [("UDP", &udp), ("TCP", &tcp)] {
        if !tally.failures.is_empty() {
            problems.push(format!(
                "{protocol}: {} of {} requests failed",
                tally.failures.len(),
                tally.sent
            ));
        }
        let used = tally.per_backend.len();
        if used < 2 {
            problems.push(format!("{protocol}: only {used} of 2 backends answered"));
        }
    }
    if problems.is_empty() {
        println!(
            "demo: OK: both backends served UDP and TCP, every reply came from the NodePort and every backend saw the node"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("demo: FAILED: {}", problems.join("; "));
        Ok(ExitCode::FAILURE)
    }
}

fn print_lab(lab: &Lab) {
    println!("demo: lab up");
    println!(
        "  client    {:<24} eth0 198.18.0.2/24 --- {NODE_CLIENT_IF} 198.18.0.1/24  node {}",
        lab.client.name(),
        lab.node.name()
    );
    for backend in &lab.backends {
        println!(
            "  {:<9} {:<24} eth0 {}/24 --- {} {}/24  (xlb-echo :{ECHO_TCP_PORT}/tcp :{ECHO_UDP_PORT}/udp)",
            backend.name,
            backend.netns.name(),
            backend.addr,
            backend.node_if,
            backend.node_addr
        );
    }
}

/// What one protocol's round of requests showed.
#[derive(Default)]
struct Tally {
    sent: usize,
    per_backend: BTreeMap<String, usize>,
    /// Replies from the NodePort's own address and port.
    right_source: usize,
    /// Backends that saw the node's address as the peer (masquerade) and
    /// were reached at their own address and target port (DNAT).
    natted: usize,
    failures: Vec<String>,
    /// Failures since the last answer; the sender gives up at GIVE_UP_AFTER.
    failed_in_a_row: usize,
}

impl Tally {
    /// Count `who` (answered via `from`) against what the lab expects.
    fn record(&mut self, lab: &Lab, who: &Who, source_ok: bool, target_port: u16) {
        self.failed_in_a_row = 0;
        *self.per_backend.entry(who.name.clone()).or_default() += 1;
        if source_ok {
            self.right_source += 1;
        }
        let natted = lab.backend_named(&who.name).is_some_and(|backend| {
            who.peer.ip() == backend.node_addr
                && who.local == SocketAddr::from((backend.addr, target_port))
        });
        if natted {
            self.natted += 1;
        } else {
            self.failures
                .push(format!("{who:?} is not DNAT + masquerade"));
        }
        if !source_ok {
            self.failures
                .push(format!("{who:?}: reply from the wrong address"));
        }
    }

    /// Counts a failure; true when the sender should give up.
    fn fail(&mut self, error: anyhow::Error) -> bool {
        self.failures.push(format!("{error:#}"));
        self.failed_in_a_row += 1;
        let give_up = self.failed_in_a_row >= GIVE_UP_AFTER;
        if give_up {
            self.failures
                .push(format!("gave up after {GIVE_UP_AFTER} failures in a row"));
        }
        give_up
    }

    fn print(&self, title: &str) {
        println!("demo: {title}");
        for (name, count) in &self.per_backend {
            println!("  {name:<10} {count:>4}");
        }
        let answered: usize = self.per_backend.values().sum();
        println!(
            "  answered {answered}/{}; reply from the NodePort {}/{answered}; backend saw the node (masquerade) {}/{answered}",
            self.sent, self.right_source, self.natted
        );
        for failure in self.failures.iter().take(5) {
            println!("  failed: {failure}");
        }
        if self.failures.len() > 5 {
            println!("  ... and {} more failures", self.failures.len() - 5);
        }
    }
}

fn send_udp(lab: &Lab) -> anyhow::Result<Tally> {
    let service = udp_echo_service();
    let tally = lab.client.run(|| {
        let mut tally = Tally::default();
        for _ in 0..UDP_FLOWS {
            if signals::interrupted() {
                break;
            }
            tally.sent += 1;
            // A source port of its own (never reused): a new flow each.
            let result = udp_socket().and_then(|socket| {
                socket.set_read_timeout(Some(TIMEOUT))?;
                udp_who(&socket, service)
            });
            match result {
                Ok((who, from)) => {
                    tally.record(lab, &who, from == service, ECHO_UDP_PORT);
                }
                Err(error) => {
                    if tally.fail(error) {
                        break;
                    }
                }
            }
        }
        tally
    })?;
    Ok(tally)
}

fn send_tcp(lab: &Lab) -> anyhow::Result<Tally> {
    let service = tcp_echo_service();
    let tally = lab.client.run(|| {
        let mut tally = Tally::default();
        for connection in 0..TCP_CONNECTIONS {
            if signals::interrupted() {
                break;
            }
            tally.sent += 1;
            let payload = pattern(TCP_PAYLOAD, connection as u32);
            match tcp_who_echo_timeout(service, &payload, TIMEOUT) {
                Ok(who) => {
                    // A TCP reply from any other address would not have
                    // completed the handshake: the connection is the proof.
                    tally.record(lab, &who, true, ECHO_TCP_PORT);
                }
                Err(error) => {
                    if tally.fail(error) {
                        break;
                    }
                }
            }
        }
        tally
    })?;
    Ok(tally)
}

/// The verdict counters from the agent's exit log (`name=count` pairs named
/// after lb-common's reasons), one per line with what each means; the end of
/// the log if it has none.
fn print_counters(log: &str) {
    let counters: Vec<(Reason, &str)> = log
        .lines()
        .rev()
        .find(|line| {
            Reason::ALL
                .iter()
                .any(|reason| line.contains(reason.name()))
        })
        .map(|line| {
            line.split_whitespace()
                .filter_map(|word| {
                    let (name, count) = word.trim_end_matches(',').split_once('=')?;
                    let reason = Reason::ALL.iter().find(|reason| reason.name() == name)?;
                    Some((*reason, count))
                })
                .collect()
        })
        .unwrap_or_default();
    if counters.is_empty() {
        println!("demo: the agent printed no verdict counters; the end of its log:");
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[lines.len().saturating_sub(20)..] {
            println!("  {line}");
        }
        return;
    }
    println!("demo: datapath verdicts (from the agent's exit log):");
    for (reason, count) in counters {
        println!(
            "  {:<24} {count:>8}  {}",
            reason.name(),
            reason.description()
        );
    }
}
