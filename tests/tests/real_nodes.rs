//! NodePorts on a real node (tests/src/node_lab.rs): pods as CNIs leave them
//! (GRO off, TX checksum offload on, no XDP), on a bridge CNI, a routed CNI,
//! and on a second node reached routed and over VXLAN; a switch between the
//! client and the nodes that finishes checksums as a wire does.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use xlb_tests::client::{
    pattern, tcp_who_echo, udp_exchange, udp_socket, udp_socket_for, udp_socket6, udp_who,
};
use xlb_tests::lab::{ECHO_TCP_PORT, ECHO_UDP_PORT};
use xlb_tests::node_lab::{
    CLIENT_ADDR, CLIENT_ADDR6, NODE_ADDR, NODE_ADDR6, NodeLab, Pod, PodKind, UPLINK_IF, VXLAN_IF,
    csum_errors, tcp_service, tcp_service6, udp_service, udp_service6,
};

use xlb_tests::{Agent, Bpffs, Who, XLB_BIN_ENV, bin_from_env};

fn masquerade_addr(pod: &Pod) -> IpAddr {
    IpAddr::from(pod.masquerade_addr())
}

fn start<'lab>(
    lab: &'lab NodeLab,
    pods: &[&Pod],
    etp_local: bool,
) -> anyhow::Result<Agent<'lab, NodeLab>> {
    start_in(lab, pods, etp_local, Family::V4)
}

/// As `start`, the services of `family` (see `Family::config_yaml`).
fn start_in<'lab>(
    lab: &'lab NodeLab,
    pods: &[&Pod],
    etp_local: bool,
    family: Family,
) -> anyhow::Result<Agent<'lab, NodeLab>> {
    let services = match family {
        Family::V4 => lab.echo_services(pods, etp_local),
        Family::V6 => lab.dual_stack_echo_services(pods, etp_local),
    };
    let config = lab.write_file("xlb.yaml", &family.config_yaml(lab, &services))?;
    let agent = Agent::start(lab, &config)?;
    // The pods' veths and the tunnel get their tc program within a second.
    for pod in pods.iter().filter(|pod| pod.kind.is_local()) {
        agent.wait_for_log(0, &format!("{}: tcx ingress", pod.host_if), WAIT)?;
    }
    agent.wait_for_log(0, "xlb-vx: tcx ingress", WAIT)?;
    Ok(agent)
}

const WAIT: Duration = Duration::from_secs(10);

/// One UDP flow and one TCP connection to `pod` through the NodePorts,
/// checked end to end.
fn exchange_with(lab: &NodeLab, pod: &Pod) -> anyhow::Result<()> {
    exchange_in(lab, pod, Family::V4)
}

/// Which of a pod's addresses a check is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
            Family::V4 => masquerade_addr(pod),
            Family::V6 => pod.masquerade_addr6().into(),
        }
    }

    /// The node's address the NodePorts of this family answer on.
    fn node_addr(self) -> IpAddr {
        match self {
            Family::V4 => NODE_ADDR.into(),
            Family::V6 => NODE_ADDR6.into(),
        }
    }

    /// `v4` or `v6`, parsed.
    fn pick(self, v4: &str, v6: &str) -> IpAddr {
        match self {
            Family::V4 => v4,
            Family::V6 => v6,
        }
        .parse()
        .expect("an IP address")
    }

    /// The echo services with `pods` as backends: IPv4 only, or dual-stack
    /// for V6 (each pod by both its addresses).
    fn echo_services(self, lab: &NodeLab, pods: &[&Pod]) -> String {
        match self {
            Family::V4 => lab.echo_services(pods, false),
            Family::V6 => lab.dual_stack_echo_services(pods, false),
        }
    }

    /// A config for `services`: NodePorts on the node's IPv4 address, or
    /// on both of its addresses for V6.
    fn config_yaml(self, lab: &NodeLab, services: &str) -> String {
        match self {
            Family::V4 => lab.config_yaml(services),
            Family::V6 => lab.dual_stack_config_yaml(services),
        }
    }
}

/// `exchange_with` through the NodePorts of `family` (the pod by its
/// address of that family).
fn exchange_in(lab: &NodeLab, pod: &Pod, family: Family) -> anyhow::Result<()> {
    let (udp, tcp) = family.services();
    let (pod_addr, masquerade) = (family.addr(pod), family.masquerade_addr(pod));
    lab.client.run(|| -> anyhow::Result<()> {
        let socket = udp_socket_for(udp)?;
        let (who, from) = udp_who(&socket, udp).context(format!("UDP WHO via {}", pod.name))?;
        ensure!(from == udp, "UDP reply from {from}, not the NodePort {udp}");
        ensure!(
            who.name == pod.name,
            "UDP reached {who:?}, not {}",
            pod.name
        );
        ensure!(who.local == SocketAddr::new(pod_addr, ECHO_UDP_PORT));
        ensure!(
            who.peer.ip() == masquerade,
            "{}: masqueraded as {}, expected {masquerade}",
            pod.name,
            who.peer.ip(),
        );
        // Sizes that fit every path (the overlay's MTU is 1450).
        for (seed, len) in [1usize, 100, 1000, 1400].into_iter().enumerate() {
            let payload = pattern(len, seed as u32);
            let (reply, from) = udp_exchange(&socket, udp, &payload)
                .context(format!("UDP {len} bytes via {}", pod.name))?;
            ensure!(from == udp, "UDP reply from {from}");
            ensure!(reply == payload, "UDP echo of {len} bytes differs");
        }
        for (seed, len) in [10usize, 300 * 1024].into_iter().enumerate() {
            let who = tcp_who_echo(tcp, &pattern(len, seed as u32))
                .context(format!("TCP {len} bytes via {}", pod.name))?;
            ensure!(
                who.name == pod.name,
                "TCP reached {who:?}, not {}",
                pod.name
            );
            ensure!(who.local == SocketAddr::new(pod_addr, ECHO_TCP_PORT));
            ensure!(who.peer.ip() == masquerade);
        }
        Ok(())
    })?
}

/// The `paths:` line the agent logs at exit for `pod`'s backend.
fn paths_line<'a>(log: &'a str, pod: &Pod, port: u16) -> Option<&'a str> {
    paths_line_of(log, pod.addr.into(), port)
}

/// The `paths:` line the agent logs at exit for the backend `addr`:`port`.
fn paths_line_of(log: &str, addr: IpAddr, port: u16) -> Option<&str> {
    let needle = format!("backend {addr}:{port} paths: ");
    log.lines()
        .find_map(|line| line.split_once(&needle).map(|(_, rest)| rest))
}

/// `name=N` in a paths line, after `section` (`to-backend` / `to-client`).
fn path_count(line: &str, section: &str, hook: &str) -> u64 {
    let rest = line.split_once(section).map_or("", |(_, rest)| rest);
    rest.split_whitespace()
        .find_map(|field| field.strip_prefix(&format!("{hook}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `result`, its error followed by the agent's log.
fn with_log<T>(agent: &Agent<'_, NodeLab>, result: anyhow::Result<T>) -> anyhow::Result<T> {
    result.map_err(|error| anyhow::anyhow!("{error:#}\n--- agent log ---\n{}", agent.log()))
}

/// The pod counted no TCP, UDP or UDP/IPv6 checksum error.
fn ensure_no_csum_errors(pod: &Pod) -> anyhow::Result<()> {
    let errors = csum_errors(&pod.netns)?;
    let udp6_errors = udp6_csum_errors(&pod.netns)?;
    ensure!(
        errors == (0, 0) && udp6_errors == 0,
        "{} saw checksum errors: {errors:?}, Udp6InCsumErrors={udp6_errors}",
        pod.name
    );
    Ok(())
}

/// The client counted no TCP, UDP or UDP/IPv6 checksum error.
fn ensure_client_no_csum_errors(lab: &NodeLab) -> anyhow::Result<()> {
    let (tcp_errors, udp_errors) = lab.client_csum_errors()?;
    let udp6_errors = udp6_csum_errors(&lab.client)?;
    ensure!(
        (tcp_errors, udp_errors, udp6_errors) == (0, 0, 0),
        "the client saw checksum errors: TcpInCsumErrors={tcp_errors} \
         UdpInCsumErrors={udp_errors} Udp6InCsumErrors={udp6_errors}"
    );
    Ok(())
}

/// Waits until the agent logs that it reaches `pod` with bpf_redirect_peer.
fn wait_peer(agent: &Agent<'_, NodeLab>, since: usize, pod: &Pod) -> anyhow::Result<()> {
    wait_peer_at(agent, since, pod, pod.addr.into())
}

/// As `wait_peer`, for the pod's address `addr` (of either family).
fn wait_peer_at(
    agent: &Agent<'_, NodeLab>,
    since: usize,
    pod: &Pod,
    addr: IpAddr,
) -> anyhow::Result<()> {
    let known = format!("local pod {addr}: bpf_redirect_peer via {}", pod.host_if);
    agent.wait_for_log(since, &known, WAIT)?;
    Ok(())
}

/// The first datagram from the client to the new `pod` behind `target`,
/// no retry.
fn first_datagram(
    lab: &NodeLab,
    target: SocketAddr,
    pod: &Pod,
) -> anyhow::Result<(Who, SocketAddr)> {
    lab.client
        .run(|| udp_who(&udp_socket_for(target)?, target))?
        .with_context(|| format!("the first datagram to the new pod {}", pod.name))
}

/// A stream of UDP datagrams from the client to a UDP NodePort, every
/// 5 ms until `stop`, counted as answered or lost; a new socket (a new
/// flow) each time when `fresh_flows`.
struct Stream {
    target: SocketAddr,
    stop: AtomicBool,
    answered: AtomicU64,
    lost: AtomicU64,
}

impl Stream {
    /// A stream to `target`.
    fn to(target: SocketAddr) -> Stream {
        Stream {
            target,
            stop: AtomicBool::new(false),
            answered: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    fn run(&self, lab: &NodeLab, fresh_flows: bool) -> anyhow::Result<()> {
        lab.client.run(|| -> anyhow::Result<()> {
            let mut socket = udp_socket_for(self.target)?;
            let mut seq = 0u32;
            while !self.stop.load(Ordering::Relaxed) {
                if fresh_flows {
                    socket = udp_socket_for(self.target)?;
                }
                socket.set_read_timeout(Some(Duration::from_millis(500)))?;
                seq += 1;
                let payload = pattern(64, seq);
                match udp_exchange(&socket, self.target, &payload) {
                    Ok((reply, _)) if reply == payload => &self.answered,
                    _ => &self.lost,
                }
                .fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })?
    }

    /// Every datagram was answered (`to` names the stream's pods).
    fn ensure_lossless(self, to: &str) -> anyhow::Result<()> {
        let (answered, lost) = (self.answered.into_inner(), self.lost.into_inner());
        ensure!(
            answered > 0 && lost == 0,
            "stream to {to}: {answered} answered, {lost} lost"
        );
        Ok(())
    }
}

#[test]
fn node_port_reaches_every_kind_of_pod_with_good_checksums() -> anyhow::Result<()> {
    let lab = NodeLab::new()?;
    for kind in PodKind::ALL {
        let pod = lab.pod(kind);
        let agent = start(&lab, &[pod], false)?;
        with_log(&agent, exchange_with(&lab, pod))?;
        if kind.is_local() {
            // Once the agent knows the pod, through bpf_redirect_peer.
            wait_peer(&agent, 0, pod)?;
            with_log(&agent, exchange_with(&lab, pod))?;
        }
        let exit = agent.stop_cleanly()?;
        // Which hooks carried the packets: XDP where the next hop takes XDP
        // frames (node2 through the switch), tc's bpf_redirect_peer into
        // local pods (once the agent knows the pod's MAC and port), tc
        // everywhere else.
        for port in [ECHO_UDP_PORT, ECHO_TCP_PORT] {
            let line = paths_line(&exit.log, pod, port)
                .with_context(|| format!("no paths line for {}\n{}", pod.name, exit.log))?;
            let (to_backend, to_client) = match kind {
                PodKind::Node2Routed => ("xdp", "xdp"),
                PodKind::Bridge | PodKind::Routed => ("peer", "tc"),
                PodKind::Node2Vxlan => ("tc", "tc"),
            };
            ensure!(
                path_count(line, "to-backend", to_backend) > 0
                    && path_count(line, "to-client", to_client) > 0,
                "{}: expected to-backend via {to_backend}, to-client via {to_client}: {line}",
                pod.name
            );
        }
    }
    let (tcp_errors, udp_errors) = lab.client_csum_errors()?;
    ensure!(
        (tcp_errors, udp_errors) == (0, 0),
        "the client saw checksum errors: TcpInCsumErrors={tcp_errors} \
         UdpInCsumErrors={udp_errors}"
    );
    for pod in &lab.pods {
        ensure_no_csum_errors(pod)?;
    }
    Ok(())
}

/// `node_port_reaches_every_kind_of_pod_with_good_checksums` for IPv6
/// clients of dual-stack services (each pod listed by both addresses, the
/// node's IPv4 and IPv6 uplink addresses listed): DNAT to the pod's IPv6
/// address, masquerade as the node's IPv6 address towards it, replies from
/// [NODE6]:NodePort through the same hooks as IPv4's (pods' replies are
/// CHECKSUM_PARTIAL skbs reverse-NATed by tc), and no checksum error
/// anywhere. IPv4 clients are served beside them.
#[test]
fn ipv6_node_port_reaches_every_kind_of_pod_with_good_checksums() -> anyhow::Result<()> {
    let lab = NodeLab::new()?;
    for kind in PodKind::ALL {
        let pod = lab.pod(kind);
        let config = lab.write_file(
            "xlb.yaml",
            &lab.dual_stack_config_yaml(&lab.dual_stack_echo_services(&[pod], false)),
        )?;
        let agent = Agent::start(&lab, &config)?;
        if kind.is_local() {
            agent.wait_for_log(0, &format!("{}: tcx ingress", pod.host_if), WAIT)?;
        }
        agent.wait_for_log(0, "xlb-vx: tcx ingress", WAIT)?;
        with_log(&agent, exchange_in(&lab, pod, Family::V6))?;
        if kind.is_local() {
            // Once the agent knows the pod's IPv6 address
            // (`XLB_PEERS6`), through bpf_redirect_peer.
            wait_peer_at(&agent, 0, pod, pod.addr6.into())?;
            with_log(&agent, exchange_in(&lab, pod, Family::V6))?;
        }
        with_log(&agent, exchange_in(&lab, pod, Family::V4))?;
        let exit = agent.stop_cleanly()?;
        for port in [ECHO_UDP_PORT, ECHO_TCP_PORT] {
            let line = paths_line_of(&exit.log, pod.addr6.into(), port)
                .with_context(|| format!("no IPv6 paths line for {}\n{}", pod.name, exit.log))?;
            let (to_backend, to_client) = match kind {
                PodKind::Node2Routed => ("xdp", "xdp"),
                PodKind::Bridge | PodKind::Routed => ("peer", "tc"),
                PodKind::Node2Vxlan => ("tc", "tc"),
            };
            ensure!(
                path_count(line, "to-backend", to_backend) > 0
                    && path_count(line, "to-client", to_client) > 0,
                "{} over IPv6: expected to-backend via {to_backend}, to-client via \
                 {to_client}: {line}",
                pod.name
            );
            eprintln!("{} [{}]:{port} paths: {line}", pod.name, pod.addr6);
        }
    }
    let (tcp_errors, udp_errors) = lab.client_csum_errors()?;
    let udp6_errors = udp6_csum_errors(&lab.client)?;
    ensure!(
        (tcp_errors, udp_errors, udp6_errors) == (0, 0, 0),
        "the client saw checksum errors: TcpInCsumErrors={tcp_errors} \
         UdpInCsumErrors={udp_errors} Udp6InCsumErrors={udp6_errors}"
    );
    for pod in &lab.pods {
        ensure_no_csum_errors(pod)?;
        let errors = udp6_csum_errors(&pod.netns)?;
        ensure!(
            errors == 0,
            "{} saw {errors} UDP/IPv6 checksum errors",
            pod.name
        );
    }
    Ok(())
}

/// A namespace's `Udp6InCsumErrors` (`nstat`; TCP's counter covers both
/// families).
fn udp6_csum_errors(netns: &xlb_tests::Netns) -> anyhow::Result<u64> {
    let out = netns.exec("nstat", &["-a", "-s", "-z", "Udp6InCsumErrors"])?;
    Ok(out
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some("Udp6InCsumErrors")).then(|| fields.next()?.parse().ok())?
        })
        .unwrap_or(0))
}

/// No `node.interfaces`, no `--iface`: the agent finds the uplink (the
/// device holding the node address, which also has the default route), and
/// only it: cni0 and the VXLAN device hold addresses too, but not the
/// node's. Traffic goes through, and status.json and /metrics say why each
/// attach point was chosen.
#[test]
fn agent_finds_its_uplink_without_interfaces() -> anyhow::Result<()> {
    let lab = NodeLab::new()?;
    let pods = [lab.pod(PodKind::Bridge)];
    let config = lab.write_file(
        "xlb.yaml",
        &format!(
            "node:\n  addresses: [{NODE_ADDR}]\n\nservices:\n{}",
            lab.echo_services(&pods, false)
        ),
    )?;
    let run_dir = lab.dir().join("auto-run");
    let run_dir_arg = run_dir.display().to_string();
    let agent = Agent::start_with(
        &bin_from_env(XLB_BIN_ENV)?,
        &lab,
        &config,
        &["--run-dir", &run_dir_arg],
    )?;
    let why = format!("holds node address {NODE_ADDR}, default route");
    agent.wait_for_log(0, &format!("{UPLINK_IF}: XDP attached"), WAIT)?;
    agent.wait_for_log(0, &format!("{}: tcx ingress", pods[0].host_if), WAIT)?;
    agent.wait_for_log(0, &format!("{VXLAN_IF}: tcx ingress"), WAIT)?;
    let log = agent.log();
    ensure!(log.contains(&format!("uplink: {why})")), "{log}");
    ensure!(
        log.matches("XDP attached").count() == 1,
        "XDP on more than the uplink:\n{log}"
    );
    for pod in pods {
        exchange_with(&lab, pod)
            .map_err(|error| anyhow::anyhow!("{error:#}\n--- agent log ---\n{log}"))?;
    }

    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("status.json"))?)?;
    let why_of = |name: &str| {
        status["interfaces"]
            .as_array()
            .and_then(|list| list.iter().find(|i| i["name"] == name))
            .and_then(|i| i["why"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    ensure!(why_of(UPLINK_IF) == why, "{status:#}");
    ensure!(
        why_of(&pods[0].host_if).starts_with("pod veth"),
        "{status:#}"
    );
    ensure!(why_of(VXLAN_IF).starts_with("vxlan"), "{status:#}");
    ensure!(
        why_of("cni0").is_empty(),
        "cni0 is no attach point: {status:#}"
    );

    let address = SocketAddr::from(([127, 0, 0, 1], 9090));
    let (code, metrics) = lab
        .node
        .run(move || xlb::observe::http::get(address, "/metrics"))??;
    ensure!(code == 200, "{metrics}");
    let series = format!("interface=\"{UPLINK_IF}\",mode=\"native\",why=\"{why}\"}} 1");
    ensure!(
        metrics
            .lines()
            .any(|line| line.starts_with("xlb_interface_xdp_attached{") && line.ends_with(&series)),
        "no {series} in\n{metrics}"
    );
    ensure!(
        metrics.lines().any(|line| line.starts_with(&format!(
            "xlb_interface_tc_attached{{interface=\"{}\",hook=\"tcx\",why=\"pod veth",
            pods[0].host_if
        ))),
        "no tc line for {} in\n{metrics}",
        pods[0].host_if
    );
    agent.stop()?;
    Ok(())
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address() -> anyhow::Result<()> {
    let lab = NodeLab::new()?;
    let pods: Vec<&Pod> = lab.pods.iter().collect();
    let agent = start(&lab, &pods, true)?;
    let (udp, tcp) = (udp_service(), tcp_service());
    let reached = lab
        .client
        .run(|| -> anyhow::Result<BTreeMap<String, usize>> {
            let mut reached = BTreeMap::new();
            for _ in 0..40 {
                let socket = udp_socket()?;
                let (who, from) = udp_who(&socket, udp)?;
                ensure!(from == udp, "UDP reply from {from}");
                ensure!(who.peer.ip() == IpAddr::from(CLIENT_ADDR), "UDP {who:?}");
                *reached.entry(who.name).or_insert(0) += 1;
            }
            for connection in 0..20u32 {
                let who = tcp_who_echo(tcp, &pattern(5000, connection))?;
                ensure!(who.peer.ip() == IpAddr::from(CLIENT_ADDR), "TCP {who:?}");
                *reached.entry(who.name).or_insert(0) += 1;
            }
            Ok(reached)
        })?;
    let reached = with_log(&agent, reached)?;
    for name in reached.keys() {
        let pod = lab.pod_named(name).context("unknown pod")?;
        ensure!(pod.kind.is_local(), "ETP Local reached {name}: {reached:?}");
    }
    ensure!(reached.len() == 2, "both local pods serve: {reached:?}");
    let (tcp_errors, udp_errors) = lab.client_csum_errors()?;
    ensure!((tcp_errors, udp_errors) == (0, 0), "checksum errors");
    Ok(())
}

/// `external_traffic_policy_local_keeps_the_client_address` for IPv6
/// clients of dual-stack services: only this node's pods serve, and they
/// see the client's own IPv6 address.
#[test]
fn ipv6_external_traffic_policy_local_keeps_the_client_address() -> anyhow::Result<()> {
    let lab = NodeLab::new()?;
    let pods: Vec<&Pod> = lab.pods.iter().collect();
    let config = lab.write_file(
        "xlb.yaml",
        &lab.dual_stack_config_yaml(&lab.dual_stack_echo_services(&pods, true)),
    )?;
    let agent = Agent::start(&lab, &config)?;
    for pod in pods.iter().filter(|pod| pod.kind.is_local()) {
        agent.wait_for_log(0, &format!("{}: tcx ingress", pod.host_if), WAIT)?;
    }
    let (udp, tcp) = Family::V6.services();
    let client = IpAddr::from(CLIENT_ADDR6);
    let reached = lab
        .client
        .run(|| -> anyhow::Result<BTreeMap<String, usize>> {
            let mut reached = BTreeMap::new();
            for _ in 0..40 {
                let socket = udp_socket6()?;
                let (who, from) = udp_who(&socket, udp)?;
                ensure!(from == udp, "UDP reply from {from}");
                ensure!(who.peer.ip() == client, "UDP {who:?}");
                *reached.entry(who.name).or_insert(0) += 1;
            }
            for connection in 0..20u32 {
                let who = tcp_who_echo(tcp, &pattern(5000, connection))?;
                ensure!(who.peer.ip() == client, "TCP {who:?}");
                *reached.entry(who.name).or_insert(0) += 1;
            }
            Ok(reached)
        })?;
    let reached = with_log(&agent, reached)?;
    for name in reached.keys() {
        let pod = lab.pod_named(name).context("unknown pod")?;
        ensure!(pod.kind.is_local(), "ETP Local reached {name}: {reached:?}");
    }
    ensure!(reached.len() == 2, "both local pods serve: {reached:?}");
    let (tcp_errors, _) = lab.client_csum_errors()?;
    let udp6_errors = udp6_csum_errors(&lab.client)?;
    ensure!((tcp_errors, udp6_errors) == (0, 0), "checksum errors");
    Ok(())
}

#[test]
fn thousand_flows_over_bridge_and_vxlan_while_pods_come_and_go() -> anyhow::Result<()> {
    thousand_flows_while_pods_come_and_go(Family::V4)
}

/// The same over IPv6, to dual-stack services: the pods that come and go
/// have IPv6 addresses too, and the flows to the pods that stay are not
/// disturbed.
#[test]
fn ipv6_thousand_flows_over_bridge_and_vxlan_while_pods_come_and_go() -> anyhow::Result<()> {
    thousand_flows_while_pods_come_and_go(Family::V6)
}

/// 1000 UDP flows and 1000 TCP connections (4 threads) through the
/// NodePorts of `family` to a bridge pod and a VXLAN pod, while a pod
/// appears and goes on each CNI of this node: every request answered, both
/// pods serve, no checksum error.
fn thousand_flows_while_pods_come_and_go(family: Family) -> anyhow::Result<()> {
    const FLOWS: usize = 1000;
    const THREADS: usize = 4;
    let lab = NodeLab::new()?;
    let pods = [lab.pod(PodKind::Bridge), lab.pod(PodKind::Node2Vxlan)];
    let agent = start_in(&lab, &pods, false, family)?;
    let (udp, tcp) = family.services();

    let outcome = std::thread::scope(|scope| -> anyhow::Result<BTreeMap<String, usize>> {
        let traffic = scope.spawn(|| {
            lab.client
                .run(|| -> anyhow::Result<BTreeMap<String, usize>> {
                    let mut reached = BTreeMap::new();
                    std::thread::scope(|inner| -> anyhow::Result<()> {
                        let workers: Vec<_> = (0..THREADS)
                            .map(|worker| {
                                inner.spawn(move || -> anyhow::Result<Vec<String>> {
                                    let mut names = Vec::new();
                                    for flow in (worker..FLOWS).step_by(THREADS) {
                                        let socket = udp_socket_for(udp)?;
                                        let (who, from) = udp_who(&socket, udp)
                                            .context(format!("UDP flow {flow}"))?;
                                        ensure!(from == udp);
                                        names.push(who.name);
                                        let who = tcp_who_echo(tcp, &pattern(2000, flow as u32))
                                            .context(format!("TCP connection {flow}"))?;
                                        names.push(who.name);
                                    }
                                    Ok(names)
                                })
                            })
                            .collect();
                        for worker in workers {
                            for name in worker.join().expect("worker panicked")? {
                                *reached.entry(name).or_insert(0) += 1;
                            }
                        }
                        Ok(())
                    })?;
                    Ok(reached)
                })
        });
        // Meanwhile a pod appears on each CNI of this node, and goes again.
        let churn = (|| -> anyhow::Result<()> {
            for (kind, index) in [(PodKind::Bridge, 2), (PodKind::Routed, 2)] {
                let since = agent.log().len();
                let pod = lab.add_pod(kind, index)?;
                agent.wait_for_log(since, &format!("{}: tcx ingress", pod.host_if), WAIT)?;
                let since = agent.log().len();
                let host_if = pod.host_if.clone();
                drop(pod);
                agent.wait_for_log(since, &format!("{host_if}: gone"), WAIT)?;
            }
            Ok(())
        })();
        let reached = traffic.join().expect("traffic thread panicked")??;
        churn?;
        Ok(reached)
    });
    let reached = with_log(&agent, outcome)?;
    let total: usize = reached.values().sum();
    ensure!(total == 2 * FLOWS, "answers: {reached:?}");
    for pod in pods {
        ensure!(
            reached.get(&pod.name).copied().unwrap_or(0) > FLOWS / 4,
            "{} barely served: {reached:?}",
            pod.name
        );
    }
    ensure_client_no_csum_errors(&lab)?;
    // The agent noticed the churn in its status too.
    ensure!(agent.log().contains("xlb-vb2: gone"));
    Ok(())
}

/// Local pods are reached with `bpf_redirect_peer` once the agent has found
/// them in the host's tables (`XLB_PEERS`), on both CNIs. A pod made while
/// traffic runs is answered from its first datagram (through
/// `bpf_redirect_neigh` until it is known), then through the peer path;
/// when it goes, its entry goes with it, and the stream to the pods that
/// stay loses nothing. Checksums are right on both ends.
#[test]
fn local_pods_are_reached_through_bpf_redirect_peer() -> anyhow::Result<()> {
    local_pods_through_bpf_redirect_peer(Family::V4)
}

/// The same over IPv6, to dual-stack services: the agent finds the pods'
/// IPv6 neighbours (`XLB_PEERS6`), new pods are served from their first
/// datagram, and their entries go with them.
#[test]
fn ipv6_local_pods_are_reached_through_bpf_redirect_peer() -> anyhow::Result<()> {
    local_pods_through_bpf_redirect_peer(Family::V6)
}

/// `local_pods_are_reached_through_bpf_redirect_peer` through the NodePorts
/// of `family`, the pods by their addresses of that family.
fn local_pods_through_bpf_redirect_peer(family: Family) -> anyhow::Result<()> {
    let lab = NodeLab::new()?;
    let pods = [lab.pod(PodKind::Bridge), lab.pod(PodKind::Routed)];
    // (kind, index, its address as the lab will give it, its UDP NodePort;
    // TCP's is 10 below)
    let new_pods = [
        (
            PodKind::Bridge,
            2,
            family.pick("198.18.10.3", "2001:db8:10::3"),
            30990,
        ),
        (
            PodKind::Routed,
            2,
            family.pick("198.18.11.3", "2001:db8:11::3"),
            30991,
        ),
    ];
    let mut services = family.echo_services(&lab, &pods);
    for (kind, index, addr, node_port) in new_pods {
        for (protocol, offset, target) in [("UDP", 0, ECHO_UDP_PORT), ("TCP", 10, ECHO_TCP_PORT)] {
            services.push_str(&format!(
                "  - name: new-{}-{index}-{}\n    protocol: {protocol}\n    \
                 nodePort: {}\n    targetPort: {target}\n    backends:\n      - address: {addr}\n",
                kind.label(),
                protocol.to_lowercase(),
                node_port - offset,
            ));
        }
    }
    let config = lab.write_file("xlb.yaml", &family.config_yaml(&lab, &services))?;
    let agent = Agent::start(&lab, &config)?;
    for pod in pods {
        agent.wait_for_log(0, &format!("{}: tcx ingress", pod.host_if), WAIT)?;
        wait_peer_at(&agent, 0, pod, family.addr(pod))?;
    }
    let (udp, tcp) = family.services();
    let names: Vec<&str> = pods.iter().map(|pod| pod.name.as_str()).collect();
    with_log(
        &agent,
        lab.client.run(|| -> anyhow::Result<()> {
            for flow in 0..20u32 {
                let (who, from) = udp_who(&udp_socket_for(udp)?, udp)?;
                ensure!(from == udp && names.contains(&who.name.as_str()));
                let who = tcp_who_echo(tcp, &pattern(30_000, flow))?;
                ensure!(names.contains(&who.name.as_str()), "{who:?}");
            }
            Ok(())
        })?,
    )?;

    let stream = Stream::to(udp);
    let outcome = std::thread::scope(|scope| -> anyhow::Result<()> {
        // A new flow each time: both pods, both paths' choices.
        let streaming = scope.spawn(|| stream.run(&lab, true));
        let churn = (|| -> anyhow::Result<()> {
            for (kind, index, addr, node_port) in new_pods {
                let since = agent.log().len();
                let pod = lab.add_pod(kind, index)?;
                ensure!(family.addr(&pod) == addr, "{pod:?}");
                let udp = SocketAddr::new(family.node_addr(), node_port);
                let tcp = SocketAddr::new(family.node_addr(), node_port - 10);
                let first = first_datagram(&lab, udp, &pod)?;
                ensure!(first.0.name == pod.name, "{first:?}");
                wait_peer_at(&agent, since, &pod, addr)?;
                for round in 0..5u32 {
                    lab.client.run(|| -> anyhow::Result<()> {
                        let (who, _) = udp_who(&udp_socket_for(udp)?, udp)?;
                        ensure!(who.name == pod.name, "{who:?}");
                        let who = tcp_who_echo(tcp, &pattern(20_000, round))?;
                        ensure!(who.name == pod.name, "{who:?}");
                        Ok(())
                    })??;
                }
                ensure_no_csum_errors(&pod)?;
                let since = agent.log().len();
                drop(pod);
                agent.wait_for_log(since, &format!("local pod {addr}: gone"), WAIT)?;
            }
            Ok(())
        })();
        stream.stop.store(true, Ordering::Relaxed);
        streaming.join().expect("stream thread panicked")?;
        churn
    });
    with_log(&agent, outcome)?;
    stream.ensure_lossless("the pods that stay")?;
    let exit = agent.stop_cleanly()?;
    for pod in pods {
        for port in [ECHO_UDP_PORT, ECHO_TCP_PORT] {
            let line = paths_line_of(&exit.log, family.addr(pod), port)
                .with_context(|| format!("no paths line for {}\n{}", pod.name, exit.log))?;
            ensure!(
                path_count(line, "to-backend", "peer") > 0,
                "{}: no packet through bpf_redirect_peer: {line}\n--- agent log ---\n{}",
                pod.name,
                exit.log
            );
        }
        ensure_no_csum_errors(pod)?;
    }
    ensure_client_no_csum_errors(&lab)
}

/// A pod made while traffic runs is served at once: the rtnetlink link
/// watch puts tc on its veth as the veth appears, so the very first reply
/// the new pod sends (tens of milliseconds after its veth exists, long
/// before a periodic scan would come) is reverse-NATed. Each new pod gets
/// one datagram, no retry. A stream to the pod that was there all along
/// loses nothing meanwhile.
#[test]
fn a_new_pod_is_served_at_once() -> anyhow::Result<()> {
    a_new_pod_is_served_at_once_in(Family::V4)
}

/// The same over IPv6, to dual-stack services: the new pods' first IPv6
/// replies are reverse-NATed too.
#[test]
fn ipv6_a_new_pod_is_served_at_once() -> anyhow::Result<()> {
    a_new_pod_is_served_at_once_in(Family::V6)
}

/// `a_new_pod_is_served_at_once` through the NodePorts of `family`, the new
/// pods by their addresses of that family.
fn a_new_pod_is_served_at_once_in(family: Family) -> anyhow::Result<()> {
    let lab = NodeLab::new()?;
    let first = lab.pod(PodKind::Bridge);
    // (kind, index, its address as the lab will give it, its NodePort)
    let new_pods = [
        (
            PodKind::Bridge,
            2,
            family.pick("198.18.10.3", "2001:db8:10::3"),
            30990,
        ),
        (
            PodKind::Routed,
            2,
            family.pick("198.18.11.3", "2001:db8:11::3"),
            30991,
        ),
        (
            PodKind::Bridge,
            3,
            family.pick("198.18.10.4", "2001:db8:10::4"),
            30992,
        ),
        (
            PodKind::Routed,
            3,
            family.pick("198.18.11.4", "2001:db8:11::4"),
            30993,
        ),
    ];
    let mut services = family.echo_services(&lab, &[first]);
    for (kind, index, addr, node_port) in new_pods {
        services.push_str(&format!(
            "  - name: new-{}-{index}\n    protocol: UDP\n    nodePort: {node_port}\n    \
             targetPort: {ECHO_UDP_PORT}\n    backends:\n      - address: {addr}\n",
            kind.label(),
        ));
    }
    let config = lab.write_file("xlb.yaml", &family.config_yaml(&lab, &services))?;
    let agent = Agent::start(&lab, &config)?;
    agent.wait_for_log(0, &format!("{}: tcx ingress", first.host_if), WAIT)?;

    let stream = Stream::to(family.services().0);
    let outcome = std::thread::scope(|scope| -> anyhow::Result<Vec<Pod>> {
        let streaming = scope.spawn(|| stream.run(&lab, false));
        let made = (|| -> anyhow::Result<Vec<Pod>> {
            let mut made = Vec::new();
            for (kind, index, addr, node_port) in new_pods {
                let pod = lab.add_pod(kind, index)?;
                ensure!(family.addr(&pod) == addr, "{pod:?}");
                let target = SocketAddr::new(family.node_addr(), node_port);
                let (who, from) = first_datagram(&lab, target, &pod)?;
                ensure!(from == target, "reply from {from}, not {target}");
                ensure!(who.name == pod.name, "{who:?} answered for {}", pod.name);
                made.push(pod);
            }
            Ok(made)
        })();
        stream.stop.store(true, Ordering::Relaxed);
        streaming.join().expect("stream thread panicked")?;
        made
    });
    let made = with_log(&agent, outcome)?;
    stream.ensure_lossless(&first.name)?;
    drop(made);
    ensure_client_no_csum_errors(&lab)
}

/// `--keep-attached` keeps pods behind tc served while no agent runs: the
/// uplink's tc hand-off and the pods' tc links are pinned next to the XDP
/// links, the next agent adopts them, and a plain stop removes them.
#[test]
fn pods_behind_tc_are_served_across_an_agent_restart() -> anyhow::Result<()> {
    pods_behind_tc_across_an_agent_restart(Family::V4)
}

/// The same over IPv6, to dual-stack services: the pinned datapath keeps
/// IPv6 flows and serves new ones while no agent runs.
#[test]
fn ipv6_pods_behind_tc_are_served_across_an_agent_restart() -> anyhow::Result<()> {
    pods_behind_tc_across_an_agent_restart(Family::V6)
}

/// `pods_behind_tc_are_served_across_an_agent_restart` through the
/// NodePorts of `family`.
fn pods_behind_tc_across_an_agent_restart(family: Family) -> anyhow::Result<()> {
    let lab = NodeLab::new()?;
    let bpffs = Bpffs::mount(&lab)?;
    let dir = bpffs.arg();
    let pod = lab.pod(PodKind::Bridge);
    let services = family.echo_services(&lab, &[pod]);
    let config = lab.write_file("xlb.yaml", &family.config_yaml(&lab, &services))?;
    let bin = bin_from_env(XLB_BIN_ENV)?;
    let run_dir = lab.dir().join("restart-run").display().to_string();
    let agent = Agent::start_with(
        &bin,
        &lab,
        &config,
        &["--bpffs", &dir, "--keep-attached", "--run-dir", &run_dir],
    )?;
    agent.wait_for_log(0, &format!("{}: tcx ingress", pod.host_if), WAIT)?;
    agent.wait_for_log(0, &format!("{VXLAN_IF}: tcx ingress"), WAIT)?;
    // `xlb status` says the pod's tc link is pinned.
    let output = lab
        .node
        .command(&bin)
        .args(["status", "--json", "--bpffs", &dir, "--run-dir", &run_dir])
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| String::from_utf8_lossy(&output.stderr).into_owned())?;
    let pod_row = status["interfaces"]
        .as_array()
        .and_then(|list| list.iter().find(|i| i["name"] == pod.host_if.as_str()))
        .cloned()
        .unwrap_or_default();
    ensure!(pod_row["link_pinned"] == true, "{status:#}");
    let tc_pins = bpffs.pins("tc");
    for expected in [
        format!("uplink-{UPLINK_IF}"),
        format!("pod-{}", pod.host_if),
        format!("pod-{VXLAN_IF}"),
    ] {
        ensure!(
            tc_pins.contains(&expected),
            "no tc pin {expected}: {tc_pins:?}"
        );
    }
    let (udp, tcp) = family.services();
    let (flow, who) = lab.client.run(|| -> anyhow::Result<_> {
        let socket = udp_socket_for(udp)?;
        let (who, _) = udp_who(&socket, udp)?;
        Ok((socket, who))
    })??;
    ensure!(who.name == pod.name, "{who:?}");
    let exit = agent.stop()?;
    ensure!(exit.status.success(), "{}", exit.log);
    ensure!(
        bpffs.pins("tc") == tc_pins,
        "{:?}\n{}",
        bpffs.pins("tc"),
        exit.log
    );

    // No agent: the flow goes on, a new one is served, TCP too.
    let alone = |when: &str| -> anyhow::Result<()> {
        lab.client
            .run(|| -> anyhow::Result<()> {
                let (who, from) = udp_who(&flow, udp).context("the flow")?;
                ensure!(from == udp && who.name == pod.name, "{who:?} from {from}");
                let (who, _) = udp_who(&udp_socket_for(udp)?, udp).context("a new UDP flow")?;
                ensure!(who.name == pod.name, "{who:?}");
                let who = tcp_who_echo(tcp, &pattern(20_000, 7)).context("TCP")?;
                ensure!(who.name == pod.name, "{who:?}");
                Ok(())
            })?
            .with_context(|| format!("{when}\n--- first agent's log ---\n{}", exit.log))
    };
    alone("while no agent runs")?;

    let second = Agent::start_with(&bin, &lab, &config, &["--bpffs", &dir])?;
    second.wait_for_log(0, &format!("{}: tcx ingress", pod.host_if), WAIT)?;
    alone("after the restart")?;
    let exit = second.stop()?;
    ensure!(exit.status.success(), "{}", exit.log);
    ensure!(
        exit.log.contains("adopted the datapath pinned in"),
        "{}",
        exit.log
    );
    ensure!(
        bpffs.pins("tc").is_empty() && bpffs.pins("links").is_empty(),
        "a plain stop leaves {:?} {:?}",
        bpffs.pins("tc"),
        bpffs.pins("links")
    );
    ensure_client_no_csum_errors(&lab)
}

#[test]
fn node_lab_pods_are_at_kernel_defaults() -> anyhow::Result<()> {
    let lab = NodeLab::new()?;
    for pod in &lab.pods {
        let features = pod.netns.exec("ethtool", &["-k", "eth0"])?;
        for expected in ["tx-checksumming: on", "generic-receive-offload: off"] {
            ensure!(
                features.contains(expected),
                "{}: eth0 not at defaults ({expected} missing)",
                pod.name
            );
        }
        let link = pod.netns.ip(&["-d", "link", "show", "eth0"])?;
        ensure!(!link.contains("xdp"), "{}: eth0 has XDP: {link}", pod.name);
    }
    Ok(())
}

#[test]
fn node_reaches_every_kind_of_pod_over_ipv6() -> anyhow::Result<()> {
    // The kernel alone, no agent: the dual-stack plumbing of every CNI
    // (bridge, routed with fe80::1, node2 routed and over VXLAN) carries
    // IPv6 both ways, and the client reaches the node's IPv6 address.
    let lab = NodeLab::new()?;
    lab.client.ping(NODE_ADDR6)?;
    for pod in &lab.pods {
        let tcp = SocketAddr::from((pod.addr6, ECHO_TCP_PORT));
        let who = lab
            .node
            .run(|| tcp_who_echo(tcp, &pattern(20_000, 6)))?
            .with_context(|| format!("TCP to {}", pod.name))?;
        ensure!(who.name == pod.name && who.local == tcp, "{who:?}");
        let udp = SocketAddr::from((pod.addr6, ECHO_UDP_PORT));
        let (who, from) = lab
            .node
            .run(|| udp_who(&udp_socket6()?, udp))?
            .with_context(|| format!("UDP to {}", pod.name))?;
        ensure!(
            from == udp && who.name == pod.name && who.local == udp,
            "{who:?}"
        );
    }
    Ok(())
}
