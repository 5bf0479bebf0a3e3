//! `cargo xtask demo`: the real-node lab (tests/src/node_lab.rs) with the
//! agent running: pods as CNIs leave them on a bridge CNI and a routed CNI,
//! and on a second node reached routed and over VXLAN. UDP and TCP are sent
//! from the client through both NodePorts; the demo tallies which pod
//! answered, whether every reply looked right, and which path each pod's
//! packets took (XDP redirect, or tc where XDP cannot deliver). The services
//! are dual-stack: the same rounds then go to the node's IPv6 address.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use lb_common::Reason;
use xlb_tests::client::{pattern, tcp_who_echo_timeout, udp_socket_for, udp_who};
use xlb_tests::lab::{ECHO_TCP_PORT, ECHO_UDP_PORT};
use xlb_tests::netns::Netns;
use xlb_tests::node_lab::{
    CLIENT_ADDR6, NODE_ADDR6, NodeLab, Pod, UPLINK_IF, tcp_service, tcp_service6, udp_service,
    udp_service6,
};
use xlb_tests::{Agent, Who};

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

    let lab = NodeLab::with_echo_bin(&echo)?;
    print_lab(&lab);
    let pods: Vec<_> = lab.pods.iter().collect();
    // Dual-stack: every pod by both its addresses, the NodePorts on both of
    // the node's.
    let config = lab.write_file(
        "xlb.yaml",
        &lab.dual_stack_config_yaml(&lab.dual_stack_echo_services(&pods, false)),
    )?;

    let agent = start_agent(&lab, &xlb, &config)?;

    // (Each round stops early once interrupted; the agent and the lab are
    // then still stopped and removed below.)
    let v4 = send_family(&lab, Family::V4)?;
    let v6 = send_family(&lab, Family::V6)?;
    let checksums = Checksums::read(&lab)?;

    let exit = agent.stop()?;
    print_counters(&exit.log);
    print_paths(&lab, &exit.log, Family::V4);
    checksums.print_v4();
    print_paths(&lab, &exit.log, Family::V6);
    checksums.print_v6();
    if !exit.status.success() {
        println!(
            "demo: note: the agent exited with {} on SIGTERM",
            exit.status
        );
    }
    let pod_count = lab.pods.len();
    drop(lab);
    println!("demo: lab removed");
    if signals::interrupted() {
        println!("demo: interrupted");
        return Ok(ExitCode::from(130));
    }

    Ok(verdict(&[v4, v6], &checksums, pod_count))
}

/// Which of the node's addresses a round goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The UDP and TCP NodePorts of this family.
    fn services(self) -> (SocketAddr, SocketAddr) {
        match self {
            Family::V4 => (udp_service(), tcp_service()),
            Family::V6 => (udp_service6(), tcp_service6()),
        }
    }

    /// The pod's address of this family.
    fn addr(self, pod: &Pod) -> IpAddr {
        match self {
            Family::V4 => pod.addr.into(),
            Family::V6 => pod.addr6.into(),
        }
    }

    /// The address the pod sees a masqueraded client as.
    fn masquerade_addr(self, pod: &Pod) -> IpAddr {
        match self {
            Family::V4 => pod.masquerade_addr().into(),
            Family::V6 => pod.masquerade_addr6().into(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The UDP and TCP rounds to one family's NodePorts, each printed as it ends.
fn send_family(lab: &NodeLab, family: Family) -> anyhow::Result<[Tally; 2]> {
    let (udp_target, tcp_target) = family.services();
    let udp = send_udp(lab, family)?;
    udp.print(&format!(
        "UDP {udp_target}: {UDP_FLOWS} WHO datagrams, each from its own source port"
    ));
    let tcp = send_tcp(lab, family)?;
    tcp.print(&format!(
        "TCP {tcp_target}: {TCP_CONNECTIONS} connections, WHO + {} KiB echoed each",
        TCP_PAYLOAD / 1024
    ));
    Ok([udp, tcp])
}

/// The checksum error counters (`nstat`) of the client and of all pods.
struct Checksums {
    /// The client's (TcpInCsumErrors, UdpInCsumErrors).
    client_v4: (u64, u64),
    /// The client's IPv6-only counters (TCP's counts both families).
    client_v6: Vec<(&'static str, u64)>,
    /// Every counter, summed over the pods.
    pods: Vec<(&'static str, u64)>,
}

/// The IPv6 checksum counters besides TcpInCsumErrors (which counts both
/// families).
const CSUM6_COUNTERS: [&str; 2] = ["Udp6InCsumErrors", "Icmp6InCsumErrors"];

impl Checksums {
    fn read(lab: &NodeLab) -> anyhow::Result<Checksums> {
        let client_v4 = lab.client_csum_errors()?;
        let client_v6 = nstat(&lab.client, &CSUM6_COUNTERS)?;
        let names = ["TcpInCsumErrors", "UdpInCsumErrors", "Udp6InCsumErrors"];
        let mut pods: Vec<(&'static str, u64)> = names.iter().map(|name| (*name, 0)).collect();
        for pod in &lab.pods {
            for (sum, (_, count)) in pods.iter_mut().zip(nstat(&pod.netns, &names)?) {
                sum.1 += count;
            }
        }
        Ok(Checksums {
            client_v4,
            client_v6,
            pods,
        })
    }

    fn print_v4(&self) {
        println!(
            "demo: client checksum errors (nstat): TcpInCsumErrors={} UdpInCsumErrors={}",
            self.client_v4.0, self.client_v4.1
        );
    }

    fn print_v6(&self) {
        println!(
            "demo: client checksum errors over IPv6 (nstat; TcpInCsumErrors above counts both families): {}",
            counters(&self.client_v6)
        );
        println!(
            "demo: pods' checksum errors (nstat, all pods): {}",
            counters(&self.pods)
        );
    }

    fn all_zero(&self) -> bool {
        self.client_v4 == (0, 0)
            && self
                .client_v6
                .iter()
                .chain(&self.pods)
                .all(|(_, count)| *count == 0)
    }
}

/// `name=N name=N ...`.
fn counters(counters: &[(&str, u64)]) -> String {
    counters
        .iter()
        .map(|(name, count)| format!("{name}={count}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `nstat`'s absolute values of `names` in `netns` (0 where it has none).
fn nstat(netns: &Netns, names: &[&'static str]) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let mut args = vec!["-a", "-s", "-z"];
    args.extend_from_slice(names);
    let out = netns.exec("nstat", &args)?;
    Ok(names
        .iter()
        .map(|name| {
            let count = out
                .lines()
                .find_map(|line| {
                    let mut fields = line.split_whitespace();
                    (fields.next() == Some(*name)).then(|| fields.next()?.parse().ok())?
                })
                .unwrap_or(0);
            (*name, count)
        })
        .collect())
}

/// Runs the agent on the lab's node and waits for its tc programs; prints
/// its attach points.
fn start_agent<'lab>(
    lab: &'lab NodeLab,
    xlb: &Path,
    config: &Path,
) -> anyhow::Result<Agent<'lab, NodeLab>> {
    println!(
        "demo: starting `xlb run --config {}` in {}",
        config.display(),
        lab.node.name()
    );
    let agent = Agent::start_with(xlb, lab, config, &[])?;
    // The pods' veths and the tunnel get their tc program within a second.
    for name in ["xlb-vb1", "xlb-vr1", "xlb-vx"] {
        agent.wait_for_log(0, &format!("{name}: tcx ingress"), Duration::from_secs(10))?;
    }
    println!("demo: agent ready; its attach points:");
    for line in agent.log().lines() {
        // The agent's records, from `xlb::agent` or one of its modules.
        let what = line
            .split_once("xlb::agent")
            .and_then(|(_, rest)| rest.split_once(": "))
            .map(|(_, what)| what);
        if let Some(what) = what
            && (what.contains("XDP attached") || what.contains(" ingress ("))
        {
            println!("  {what}");
        }
    }
    Ok(agent)
}

/// OK when every request was answered, every pod served both protocols in
/// both families and nobody counted a checksum error; else what went wrong.
fn verdict(rounds: &[[Tally; 2]; 2], checksums: &Checksums, pod_count: usize) -> ExitCode {
    let mut problems = Vec::new();
    for (family, [udp, tcp]) in [Family::V4, Family::V6].into_iter().zip(rounds) {
        for (protocol, tally) in [("UDP", udp), ("TCP", tcp)] {
            let round = format!("{protocol} over {}", family.name());
            if !tally.failures.is_empty() {
                problems.push(format!(
                    "{round}: {} of {} requests failed",
                    tally.failures.len(),
                    tally.sent
                ));
            }
            let used = tally.per_backend.len();
            if used < pod_count {
                problems.push(format!("{round}: only {used} of {pod_count} pods answered"));
            }
        }
    }
    if !checksums.all_zero() {
        problems.push(String::from("checksum errors were counted"));
    }
    if problems.is_empty() {
        println!(
            "demo: OK: every pod served UDP and TCP over IPv4 and IPv6, every reply came from the NodePort with a good checksum, and every pod saw the node"
        );
        ExitCode::SUCCESS
    } else {
        println!("demo: FAILED: {}", problems.join("; "));
        ExitCode::FAILURE
    }
}

fn print_lab(lab: &NodeLab) {
    println!(
        "demo: lab up (switch {}, node {}, node2 {})",
        lab.switch.name(),
        lab.node.name(),
        lab.node2.name()
    );
    println!(
        "  client          {:<30} eth0 198.18.0.2/24 --- switch --- {UPLINK_IF} 198.18.0.1/24 (node uplink, XDP)",
        lab.client.name()
    );
    for pod in &lab.pods {
        println!(
            "  {:<15} {:<30} eth0 {:<12} {} via {}  (xlb-echo :{ECHO_TCP_PORT}/tcp :{ECHO_UDP_PORT}/udp)",
            pod.name,
            pod.netns.name(),
            pod.addr,
            pod.reached(),
            pod.host_if,
        );
    }
    let pods6: Vec<String> = lab
        .pods
        .iter()
        .map(|pod| format!("{} {}", pod.name, pod.addr6))
        .collect();
    println!(
        "  and IPv6 on every network: client {CLIENT_ADDR6}/64, node {NODE_ADDR6}/64 ({UPLINK_IF}), pods {}",
        pods6.join(", ")
    );
}

/// Per pod, the paths its packets took to and from its address of `family`,
/// from the agent's exit log
/// (`backend ADDR:PORT paths: to-backend xdp=N tc=N peer=N to-client xdp=N tc=N`).
fn print_paths(lab: &NodeLab, log: &str, family: Family) {
    if family == Family::V4 {
        println!(
            "demo: path per backend (packets; xdp = XDP_TX/XDP_REDIRECT, tc = rewritten in XDP and sent by tc's bpf_redirect_neigh, or reverse-NATed at tc, peer = rewritten in XDP and sent into the local pod by tc's bpf_redirect_peer):"
        );
    } else {
        println!("demo: path per backend over IPv6 (packets, as above):");
    }
    for pod in &lab.pods {
        for (protocol, port) in [("UDP", ECHO_UDP_PORT), ("TCP", ECHO_TCP_PORT)] {
            let needle = format!("backend {}:{port} paths: ", family.addr(pod));
            let paths = log
                .lines()
                .find_map(|line| line.split_once(&needle).map(|(_, rest)| rest.to_owned()))
                .unwrap_or_else(|| String::from("(no packets)"));
            println!("  {:<15} {protocol}  {paths}", pod.name);
        }
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
    fn record(&mut self, lab: &NodeLab, family: Family, who: &Who, source_ok: bool, port: u16) {
        self.failed_in_a_row = 0;
        *self.per_backend.entry(who.name.clone()).or_default() += 1;
        if source_ok {
            self.right_source += 1;
        }
        let natted = lab.pod_named(&who.name).is_some_and(|pod| {
            who.peer.ip() == family.masquerade_addr(pod)
                && who.local == SocketAddr::new(family.addr(pod), port)
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
            println!("  {name:<15} {count:>4}");
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

fn send_udp(lab: &NodeLab, family: Family) -> anyhow::Result<Tally> {
    let (service, _) = family.services();
    send_round(lab, family, UDP_FLOWS, ECHO_UDP_PORT, |_| {
        // A source port of its own (never reused): a new flow each.
        let socket = udp_socket_for(service)?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        let (who, from) = udp_who(&socket, service)?;
        Ok((who, from == service))
    })
}

fn send_tcp(lab: &NodeLab, family: Family) -> anyhow::Result<Tally> {
    let (_, service) = family.services();
    send_round(lab, family, TCP_CONNECTIONS, ECHO_TCP_PORT, |connection| {
        let payload = pattern(TCP_PAYLOAD, connection as u32);
        let who = tcp_who_echo_timeout(service, &payload, TIMEOUT)?;
        // A TCP reply from any other address would not have completed the
        // handshake: the connection is the proof.
        Ok((who, true))
    })
}

/// Sends `count` requests from the client, each answering who served it and
/// whether the reply came from the right source; stops early when
/// interrupted or after GIVE_UP_AFTER failures in a row.
fn send_round(
    lab: &NodeLab,
    family: Family,
    count: usize,
    target_port: u16,
    request: impl Fn(usize) -> anyhow::Result<(Who, bool)> + Sync,
) -> anyhow::Result<Tally> {
    let tally = lab.client.run(|| {
        let mut tally = Tally::default();
        for attempt in 0..count {
            if signals::interrupted() {
                break;
            }
            tally.sent += 1;
            match request(attempt) {
                Ok((who, source_ok)) => tally.record(lab, family, &who, source_ok, target_port),
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
