//! Socket-level balancing (issue 13): processes on the node and pods reach
//! NodePorts on the node's address and ClusterIPs through the cgroup v2
//! socket hooks, with real sockets: connect()/sendto() go to a backend,
//! getpeername() and UDP replies show the service address, session
//! affinity holds, a removed backend's UDP clients move on their next
//! datagram, and hairpin (a pod balanced to itself or a neighbour) works.
//! The same for IPv6 (connect6, ...), and for dual-stack AF_INET6 sockets
//! reaching IPv4 services through IPv4-mapped addresses.
//!
//! The test process moves itself into a child cgroup of its own under
//! /sys/fs/cgroup/unified, where the agent attaches the hooks
//! (`--cgroup`); the guard moves it back and removes the cgroup. "Pods" are
//! the backend namespaces (their sockets are this process's threads, as
//! `in_netns` runs them); a backend in the client namespace stands for a
//! pod on another node, reached through the node's uplink.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use xlb_tests::Family::{self, V4, V6};
use xlb_tests::client::{
    IO_TIMEOUT, Who, pattern, tcp_who_echo, udp_socket, udp_socket_for, udp_who,
};
use xlb_tests::lab::{
    CLIENT_ADDR, CLIENT_ADDR6, ECHO_TCP_PORT, ECHO_UDP_PORT, NODE_ADDR, NODE_ADDR6,
    TCP_ECHO_NODE_PORT, UDP_ECHO_NODE_PORT,
};
use xlb_tests::{Agent, Bpffs, ChildGuard, Lab, Netns, TestCgroup, XLB_BIN_ENV, bin_from_env};

/// ClusterIPs (198.18.0.0/15, routed nowhere: only the hooks answer them).
const TCP_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const UDP_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const STICKY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
/// A service with loadBalancerSourceRanges: its ClusterIP, and its
/// load-balancer IP (routed from the client namespace to the node).
const GUARDED_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 13);
const GUARDED_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 40);
const SERVICE_PORT: u16 = 80;
const DNS_PORT: u16 = 53;
/// IPv6 ClusterIPs (2001:db8:ffff::/64, routed nowhere either).
const TCP_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
const UDP_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x11);
const STICKY_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x12);
/// Services without endpoints, of each family.
const EMPTY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 14);
const EMPTY_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x14);
/// internalTrafficPolicy Local, a ready and a terminating local backend.
const LOCAL_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x15);
/// The NodePort of an IPv4-only service; on the node's IPv6 address, a
/// server of the node's own listens on it.
const IPV4_ONLY_NODE_PORT: u16 = 30997;
const NODE_ITSELF: &str = "node-itself";
/// The echo server in the client namespace: a pod on another node.
const REMOTE: &str = "remote";
const REMOTE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const REMOTE_ADDR6: Ipv6Addr = CLIENT_ADDR6;
/// Connections or sockets per spread check: with 4 equal backends, one is
/// missed with probability 4 * (3/4)^64, about 4e-8.
const TRIES: usize = 64;

fn tcp_cluster_ip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(TCP_CLUSTER_IP, SERVICE_PORT))
}

fn udp_cluster_ip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(UDP_CLUSTER_IP, DNS_PORT))
}

fn tcp_node_port() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, TCP_ECHO_NODE_PORT))
}

fn udp_node_port() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, UDP_ECHO_NODE_PORT))
}

fn tcp_cluster_ip6() -> SocketAddr {
    SocketAddr::from((TCP_CLUSTER_IP6, SERVICE_PORT))
}

fn udp_cluster_ip6() -> SocketAddr {
    SocketAddr::from((UDP_CLUSTER_IP6, DNS_PORT))
}

fn tcp_node_port6() -> SocketAddr {
    SocketAddr::from((NODE_ADDR6, TCP_ECHO_NODE_PORT))
}

fn udp_node_port6() -> SocketAddr {
    SocketAddr::from((NODE_ADDR6, UDP_ECHO_NODE_PORT))
}

/// The test services' frontends in one family.
struct Frontends {
    tcp_node_port: SocketAddr,
    udp_node_port: SocketAddr,
    tcp_cluster_ip: SocketAddr,
    udp_cluster_ip: SocketAddr,
    /// The ClusterIP of the service with session affinity.
    sticky: SocketAddr,
}

impl Frontends {
    fn of(family: Family) -> Self {
        match family {
            V4 => Self {
                tcp_node_port: tcp_node_port(),
                udp_node_port: udp_node_port(),
                tcp_cluster_ip: tcp_cluster_ip(),
                udp_cluster_ip: udp_cluster_ip(),
                sticky: SocketAddr::from((STICKY_CLUSTER_IP, SERVICE_PORT)),
            },
            V6 => Self {
                tcp_node_port: tcp_node_port6(),
                udp_node_port: udp_node_port6(),
                tcp_cluster_ip: tcp_cluster_ip6(),
                udp_cluster_ip: udp_cluster_ip6(),
                sticky: SocketAddr::from((STICKY_CLUSTER_IP6, SERVICE_PORT)),
            },
        }
    }
}

/// `target` as a dual-stack AF_INET6 socket names it: `[::ffff:a.b.c.d]`.
fn v4_mapped(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        v6 => v6,
    }
}

/// The lab's three pods and the remote one, for services on `port`, by
/// their addresses of both families (dual-stack services).
fn backends_yaml(lab: &Lab, port: u16, without: Option<&str>) -> String {
    let mut yaml = backends_of(lab, port, without, false);
    yaml.push_str(&backends_of(lab, port, without, true));
    yaml
}

/// The backends of one family (IPv6 when `ipv6`).
fn backends_of(lab: &Lab, port: u16, without: Option<&str>, ipv6: bool) -> String {
    lab.backends
        .iter()
        .map(|backend| {
            let address = match ipv6 {
                false => IpAddr::from(backend.addr),
                true => IpAddr::from(backend.addr6),
            };
            (backend.name.as_str(), address)
        })
        .chain([(
            REMOTE,
            match ipv6 {
                false => IpAddr::from(REMOTE_ADDR),
                true => IpAddr::from(REMOTE_ADDR6),
            },
        )])
        .filter(|(name, _)| Some(*name) != without)
        .map(|(name, address)| {
            format!("      - {{address: \"{address}\", port: {port}, name: {name}}}\n")
        })
        .collect()
}

fn config(lab: &Lab, udp_without: Option<&str>) -> String {
    let tcp = backends_yaml(lab, ECHO_TCP_PORT, None);
    let udp = backends_yaml(lab, ECHO_UDP_PORT, udp_without);
    let tcp4 = backends_of(lab, ECHO_TCP_PORT, None, false);
    let tcp6 = backends_of(lab, ECHO_TCP_PORT, None, true);
    let udp6 = backends_of(lab, ECHO_UDP_PORT, udp_without, true);
    // tcp-local6: backend-1 local and ready, backend-2 local and
    // terminating, the others elsewhere.
    let local6: String = lab
        .backends
        .iter()
        .map(|backend| (backend.name.as_str(), backend.addr6))
        .chain([(REMOTE, REMOTE_ADDR6)])
        .enumerate()
        .map(|(index, (name, address))| {
            let conditions = match index {
                0 => ", local: true",
                1 => ", local: true, ready: false, serving: true, terminating: true",
                _ => "",
            };
            format!(
                "      - {{address: \"{address}\", port: {ECHO_TCP_PORT}, name: {name}{conditions}}}\n"
            )
        })
        .collect();
    lab.dual_stack_config_yaml(&format!(
        "  - name: tcp-echo\n    protocol: TCP\n    nodePort: {TCP_ECHO_NODE_PORT}\n    \
         port: {SERVICE_PORT}\n    clusterIP: {TCP_CLUSTER_IP}\n    backends:\n{tcp}\
         \n  - name: udp-echo\n    protocol: UDP\n    nodePort: {UDP_ECHO_NODE_PORT}\n    \
         port: {DNS_PORT}\n    clusterIP: {UDP_CLUSTER_IP}\n    backends:\n{udp}\
         \n  - name: tcp-sticky\n    protocol: TCP\n    port: {SERVICE_PORT}\n    \
         clusterIP: {STICKY_CLUSTER_IP}\n    sessionAffinity: ClientIP\n    backends:\n{tcp}\
         \n  - name: tcp-guarded\n    protocol: TCP\n    port: {SERVICE_PORT}\n    \
         clusterIP: {GUARDED_CLUSTER_IP}\n    frontends: [{GUARDED_LB_IP}]\n    \
         loadBalancerSourceRanges: [{CLIENT_ADDR}/32]\n    backends:\n{tcp}\
         \n  - name: tcp-echo6\n    protocol: TCP\n    port: {SERVICE_PORT}\n    \
         clusterIP: \"{TCP_CLUSTER_IP6}\"\n    backends:\n{tcp6}\
         \n  - name: udp-echo6\n    protocol: UDP\n    port: {DNS_PORT}\n    \
         clusterIP: \"{UDP_CLUSTER_IP6}\"\n    backends:\n{udp6}\
         \n  - name: tcp-sticky6\n    protocol: TCP\n    port: {SERVICE_PORT}\n    \
         clusterIP: \"{STICKY_CLUSTER_IP6}\"\n    sessionAffinity: ClientIP\n    \
         backends:\n{tcp6}\
         \n  - name: tcp-local6\n    protocol: TCP\n    port: {SERVICE_PORT}\n    \
         clusterIP: \"{LOCAL_CLUSTER_IP6}\"\n    internalTrafficPolicy: Local\n    \
         backends:\n{local6}\
         \n  - name: tcp-empty\n    protocol: TCP\n    port: {SERVICE_PORT}\n    \
         clusterIP: {EMPTY_CLUSTER_IP}\n    backends: []\
         \n  - name: udp-empty6\n    protocol: UDP\n    port: {DNS_PORT}\n    \
         clusterIP: \"{EMPTY_CLUSTER_IP6}\"\n    backends: []\
         \n  - name: tcp-empty6\n    protocol: TCP\n    port: {SERVICE_PORT}\n    \
         clusterIP: \"{EMPTY_CLUSTER_IP6}\"\n    backends: []\
         \n  - name: tcp-ipv4-only\n    protocol: TCP\n    nodePort: {IPV4_ONLY_NODE_PORT}\n    \
         backends:\n{tcp4}"
    ))
}

/// A lab with 3 pods and a remote backend, the test process in its own
/// cgroup, and an agent attaching the socket hooks there. Fields drop in
/// order: agent, remote echo, lab, then the cgroup.
struct SockLab {
    _remote: ChildGuard,
    lab: Lab,
    cgroup: TestCgroup,
}

impl SockLab {
    fn new() -> anyhow::Result<SockLab> {
        xlb_tests::require_root()?;
        let cgroup = TestCgroup::enter()?;
        let lab = Lab::new(3)?;
        // The lab keeps IPv6 off but on its links; a namespace reaching its
        // own IPv6 addresses (hairpin to self, the node's own port) needs
        // it on loopback, which sends no frame anywhere.
        for netns in [&lab.node, &lab.client]
            .into_iter()
            .chain(lab.backends.iter().map(|backend| &backend.netns))
        {
            netns.sysctl("net/ipv6/conf/lo/disable_ipv6", "0")?;
        }
        let remote = lab.start_echo(
            &lab.client,
            REMOTE,
            &[
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, ECHO_TCP_PORT)),
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, ECHO_TCP_PORT)),
            ],
            &[
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, ECHO_UDP_PORT)),
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, ECHO_UDP_PORT)),
            ],
        )?;
        Ok(SockLab {
            _remote: remote,
            lab,
            cgroup,
        })
    }

    fn start_agent(&self, extra: &[&str]) -> anyhow::Result<Agent<'_>> {
        let config = self.lab.write_file("xlb.yaml", &config(&self.lab, None))?;
        let cgroup = self.cgroup.arg();
        let mut args = vec!["--cgroup", cgroup.as_str()];
        args.extend_from_slice(extra);
        Ok(Agent::start_with(
            &bin_from_env(XLB_BIN_ENV)?,
            &self.lab,
            &config,
            &args,
        )?)
    }

    fn pod(&self, index: usize) -> &Netns {
        &self.lab.backends[index].netns
    }
}

/// Backend name -> how many answers it gave.
type Spread = BTreeMap<String, usize>;

fn count(spread: &mut Spread, who: &Who) {
    *spread.entry(who.name.clone()).or_default() += 1;
}

fn all_backends(lab: &Lab) -> Vec<String> {
    let mut names: Vec<String> = lab.backends.iter().map(|b| b.name.clone()).collect();
    names.push(String::from(REMOTE));
    names.sort();
    names
}

fn ensure_every_backend(lab: &Lab, spread: &Spread, what: &str) -> anyhow::Result<()> {
    println!("{what}: {spread:?}");
    let reached: Vec<String> = spread.keys().cloned().collect();
    ensure!(
        reached == all_backends(lab),
        "{what}: {TRIES} tries reached {spread:?}, expected every one of {:?}",
        all_backends(lab)
    );
    Ok(())
}

/// `TRIES` TCP connections to `target` (each checks getpeername() is the
/// target and the echo is whole); the backends' answers, and the client
/// addresses they saw.
fn tcp_spread(target: SocketAddr) -> anyhow::Result<(Spread, Vec<IpAddr>)> {
    let mut spread = Spread::new();
    let mut peers = Vec::new();
    for index in 0..TRIES {
        let who = tcp_who_echo(target, &pattern(2_000, index as u32))?;
        count(&mut spread, &who);
        peers.push(who.peer.ip());
    }
    Ok((spread, peers))
}

/// `TRIES` unconnected UDP sockets of `target`'s family, one WHO each
/// (sendto / recvfrom): every reply must come from `target`.
fn udp_spread(target: SocketAddr) -> anyhow::Result<(Spread, Vec<IpAddr>)> {
    let mut spread = Spread::new();
    let mut peers = Vec::new();
    for _ in 0..TRIES {
        let socket = udp_socket_for(target)?;
        let (who, from) = udp_who(&socket, target)?;
        ensure!(
            from == target,
            "the reply of {} came from {from}, not from {target}",
            who.name
        );
        count(&mut spread, &who);
        peers.push(who.peer.ip());
    }
    Ok((spread, peers))
}

/// WHO on a connected UDP socket, answered through plain recv() (no
/// address asked for).
fn connected_who(socket: &UdpSocket) -> anyhow::Result<Who> {
    socket.send(b"WHO\n")?;
    let mut buf = [0u8; 512];
    let len = socket.recv(&mut buf)?;
    std::str::from_utf8(&buf[..len])?.parse()
}

/// A connected UDP socket to `target`: its peer is `target`, replies are
/// accepted and shown as coming from `target`.
fn udp_connected(target: SocketAddr) -> anyhow::Result<Who> {
    let socket = udp_socket_for(target)?;
    socket.connect(target)?;
    ensure!(
        socket.peer_addr()? == target,
        "getpeername() of a UDP socket connected to {target} says {}",
        socket.peer_addr()?
    );
    socket.send(b"WHO\n")?;
    let mut buf = [0u8; 512];
    let (len, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no reply on a UDP socket connected to {target}"))?;
    ensure!(
        from == target,
        "connected reply came from {from}, not {target}"
    );
    let who: Who = std::str::from_utf8(&buf[..len])?.parse()?;
    // A second exchange with plain recv() (no address asked for).
    let again = connected_who(&socket)?;
    ensure!(again.name == who.name, "a connected socket changed backend");
    Ok(who)
}

/// Runs `check` in `netns`; its error carries the agent's log.
fn check_in<T: Send>(
    agent: &Agent<'_>,
    netns: &Netns,
    check: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    Ok(netns
        .run(check)?
        .map_err(|error| agent.failure(format!("{error:#}")))?)
}

/// 16 UDP sockets of pod 2 to `target`, each opened by `open`, with the
/// backend its first WHO reached.
fn pod_udp_sockets(
    lab: &SockLab,
    open: impl Fn() -> anyhow::Result<(UdpSocket, Who)> + Send,
) -> anyhow::Result<Vec<(UdpSocket, String)>> {
    lab.pod(2).run(move || {
        (0..16)
            .map(|_| open().map(|(socket, first)| (socket, first.name)))
            .collect()
    })?
}

#[test]
fn host_processes_reach_node_ports_on_the_node_address() -> anyhow::Result<()> {
    host_processes_reach_node_ports_and_cluster_ips(V4)
}

#[test]
fn host_processes_reach_ipv6_node_ports_and_cluster_ips() -> anyhow::Result<()> {
    host_processes_reach_node_ports_and_cluster_ips(V6)
}

fn host_processes_reach_node_ports_and_cluster_ips(family: Family) -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let agent = lab.start_agent(&[])?;
    let service = Frontends::of(family);
    check_in(&agent, &lab.lab.node, || {
        for (target, what) in [
            (service.tcp_node_port, "TCP from the node to NODE:nodePort"),
            (service.tcp_cluster_ip, "TCP from the node to a ClusterIP"),
        ] {
            let (spread, _) = tcp_spread(target)?;
            ensure_every_backend(&lab.lab, &spread, &format!("{what}{}", family.over()))?;
        }
        for (target, what) in [
            (service.udp_node_port, "UDP from the node to NODE:nodePort"),
            (service.udp_cluster_ip, "UDP from the node to a ClusterIP"),
        ] {
            let (spread, _) = udp_spread(target)?;
            ensure_every_backend(&lab.lab, &spread, &format!("{what}{}", family.over()))?;
        }
        udp_connected(service.udp_node_port)?;
        udp_connected(service.udp_cluster_ip)?;
        // 127.0.0.1:nodePort and [::1]:nodePort are not NodePorts (see the
        // README).
        let loopback = match family {
            V4 => IpAddr::from(Ipv4Addr::LOCALHOST),
            V6 => IpAddr::from(Ipv6Addr::LOCALHOST),
        };
        let local = SocketAddr::new(loopback, TCP_ECHO_NODE_PORT);
        ensure!(
            TcpStream::connect_timeout(&local, IO_TIMEOUT).is_err(),
            "{local} answered"
        );
        Ok(())
    })
}

#[test]
fn pods_reach_cluster_ips_and_node_ports_including_hairpin() -> anyhow::Result<()> {
    pods_reach_cluster_ips_and_node_ports(V4)
}

#[test]
fn pods_reach_ipv6_cluster_ips_and_node_ports_including_hairpin() -> anyhow::Result<()> {
    pods_reach_cluster_ips_and_node_ports(V6)
}

fn pods_reach_cluster_ips_and_node_ports(family: Family) -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let agent = lab.start_agent(&[])?;
    let pod = &lab.lab.backends[0];
    let (pod_addr, _) = family.pod_and_node(pod);
    let service = Frontends::of(family);
    check_in(&agent, &pod.netns, || {
        // Every backend: this pod itself (hairpin to self), its neighbours
        // on this node, and the pod on another node.
        for (target, what) in [
            (service.tcp_cluster_ip, "TCP from a pod to a ClusterIP"),
            (service.tcp_node_port, "TCP from a pod to NODE:nodePort"),
        ] {
            let (spread, peers) = tcp_spread(target)?;
            ensure_every_backend(&lab.lab, &spread, what)?;
            ensure!(
                peers.iter().all(|peer| *peer == pod_addr),
                "{what}: backends saw clients {peers:?}, expected the pod's own {pod_addr} \
                 (no NAT on the socket path)"
            );
        }
        for (target, what) in [
            (service.udp_cluster_ip, "UDP from a pod to a ClusterIP"),
            (service.udp_node_port, "UDP from a pod to NODE:nodePort"),
        ] {
            let (spread, peers) = udp_spread(target)?;
            ensure_every_backend(&lab.lab, &spread, what)?;
            ensure!(
                peers.iter().all(|peer| *peer == pod_addr),
                "{what}: backends saw clients {peers:?}, expected {pod_addr}"
            );
        }
        udp_connected(service.udp_cluster_ip)?;
        Ok(())
    })
}

#[test]
fn session_affinity_holds_per_client() -> anyhow::Result<()> {
    session_affinity(V4)
}

#[test]
fn ipv6_session_affinity_holds_per_client() -> anyhow::Result<()> {
    session_affinity(V6)
}

fn session_affinity(family: Family) -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let agent = lab.start_agent(&[])?;
    let sticky = Frontends::of(family).sticky;
    for netns in [lab.pod(1), &lab.lab.node] {
        check_in(&agent, netns, || {
            let (spread, _) = tcp_spread(sticky)?;
            ensure!(
                spread.len() == 1,
                "sessionAffinity ClientIP{}: {} spread over {spread:?}",
                family.over(),
                netns.name()
            );
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
fn a_removed_backend_moves_udp_clients_on_their_next_datagram() -> anyhow::Result<()> {
    a_removed_backend_moves_udp_clients(V4)
}

#[test]
fn a_removed_ipv6_backend_moves_udp_clients_on_their_next_datagram() -> anyhow::Result<()> {
    a_removed_backend_moves_udp_clients(V6)
}

fn a_removed_backend_moves_udp_clients(family: Family) -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let mut agent = lab.start_agent(&[])?;
    let target = Frontends::of(family).udp_cluster_ip;
    // Sockets of a pod, each on its backend for several datagrams.
    let sockets = pod_udp_sockets(&lab, || {
        let socket = family.udp_socket()?;
        let (first, _) = udp_who(&socket, target)?;
        for _ in 0..3 {
            let (again, from) = udp_who(&socket, target)?;
            ensure!(from == target, "reply from {from}");
            ensure!(
                again.name == first.name,
                "an unconnected socket moved from {} to {} with no change",
                first.name,
                again.name
            );
        }
        Ok((socket, first))
    })?;
    let removed = sockets[0].1.clone();
    let config = config(&lab.lab, Some(&removed));
    lab.lab.write_file("xlb.yaml", &config)?;
    agent.reload_and_wait()?;
    check_in(&agent, lab.pod(2), || {
        for (socket, before) in &sockets {
            let (now, from) = udp_who(socket, target)?;
            ensure!(from == target, "reply from {from}");
            if *before == removed {
                ensure!(
                    now.name != removed,
                    "a socket on the removed {removed} still reaches it"
                );
            }
        }
        Ok(())
    })
}

/// loadBalancerSourceRanges need the client's address, which connect()
/// does not have yet: the hooks leave such a load-balancer IP alone (no
/// bypass of the ranges from the node), the per-packet path checks them for
/// clients on the wire, and the service's ClusterIP (no ranges) is
/// balanced as usual.
#[test]
fn source_ranged_load_balancer_ips_are_not_balanced_by_the_hooks() -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let agent = lab.start_agent(&[])?;
    let load_balancer = SocketAddr::from((GUARDED_LB_IP, SERVICE_PORT));
    let cluster_ip = SocketAddr::from((GUARDED_CLUSTER_IP, SERVICE_PORT));
    for netns in [lab.pod(0), &lab.lab.node] {
        check_in(&agent, netns, || {
            let who = tcp_who_echo(cluster_ip, b"ranged")?;
            ensure!(all_backends(&lab.lab).contains(&who.name));
            let connected = TcpStream::connect_timeout(&load_balancer, Duration::from_secs(2));
            ensure!(
                connected.is_err(),
                "{}: {load_balancer} (loadBalancerSourceRanges [{CLIENT_ADDR}/32]) was \
                 balanced by the socket hooks",
                netns.name()
            );
            Ok(())
        })?;
    }
    // The wire client inside the ranges: XDP balances it.
    let who = lab
        .lab
        .client
        .run(|| tcp_who_echo(load_balancer, b"in range"))?
        .map_err(|error| agent.failure(format!("{error:#}")))?;
    ensure!(all_backends(&lab.lab).contains(&who.name));
    Ok(())
}

/// What a connected UDP client saw, datagram by datagram.
#[derive(Debug)]
enum Seen {
    Reply(String),
    /// The errno of a failed send() or recv().
    Error(i32),
    /// No answer within the read timeout.
    Lost,
}

/// A connected UDP client that sends WHO every 5 ms until `stop`, and
/// reconnects when its socket is no longer connected (as an application
/// handling the documented errors would).
fn connected_client(
    socket: &UdpSocket,
    target: SocketAddr,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Vec<Seen>> {
    use std::sync::atomic::Ordering;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(5));
        if socket.peer_addr().is_err() {
            socket.connect(target)?;
        }
        if let Err(error) = socket.send(b"WHO\n") {
            seen.push(Seen::Error(error.raw_os_error().unwrap_or(0)));
            continue;
        }
        match socket.recv(&mut buf) {
            Ok(len) => {
                let who: Who = std::str::from_utf8(&buf[..len])?.parse()?;
                seen.push(Seen::Reply(who.name));
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => seen.push(Seen::Lost),
            Err(error) => seen.push(Seen::Error(error.raw_os_error().unwrap_or(0))),
        }
    }
    Ok(seen)
}

#[test]
fn a_removed_backend_destroys_its_connected_udp_clients() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let lab = SockLab::new()?;
    let mut agent = lab.start_agent(&[])?;
    let target = udp_cluster_ip();
    // Connected sockets of a pod, each on its backend.
    let sockets = pod_udp_sockets(&lab, || {
        let socket = udp_socket()?;
        socket.connect(target)?;
        let first = connected_who(&socket)?;
        Ok((socket, first))
    })?;
    let removed = sockets[0].1.clone();
    let stop = AtomicBool::new(false);
    // The sockets are the pod's whichever thread uses them.
    let seen = std::thread::scope(|scope| -> anyhow::Result<Vec<Seen>> {
        let client = scope.spawn(|| connected_client(&sockets[0].0, target, &stop));
        std::thread::sleep(Duration::from_millis(300));
        lab.lab
            .write_file("xlb.yaml", &config(&lab.lab, Some(&removed)))?;
        let reloaded = agent.reload_and_wait();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let seen = client
            .join()
            .map_err(|_| anyhow::anyhow!("the client panicked"))?;
        reloaded?;
        seen
    })?;
    let checked = (|| -> anyhow::Result<()> {
        let first_error = seen
            .iter()
            .position(|seen| matches!(seen, Seen::Error(_)))
            .with_context(|| format!("the client on {removed} saw no error: {seen:?}"))?;
        let (before, after) = seen.split_at(first_error);
        ensure!(
            before
                .iter()
                .all(|seen| matches!(seen, Seen::Reply(name) if *name == removed)),
            "before the removal every datagram reached {removed}: {before:?}"
        );
        let errors: Vec<i32> = after
            .iter()
            .filter_map(|seen| match seen {
                Seen::Error(errno) => Some(*errno),
                _ => None,
            })
            .collect();
        ensure!(
            errors
                .iter()
                .all(|errno| [libc::EDESTADDRREQ, libc::ECONNABORTED].contains(errno)),
            "errors after the destroy: {errors:?} (expected EDESTADDRREQ or ECONNABORTED)"
        );
        let mut replies: Vec<&String> = after
            .iter()
            .filter_map(|seen| match seen {
                Seen::Reply(name) => Some(name),
                _ => None,
            })
            .collect();
        // A reply the removed backend sent before the destroy may still be
        // on its way when the client reconnects: the recvmsg4 hook shows it
        // as the service's, so the reconnected socket takes it (seen once,
        // on a loaded VM). Only that first one may come from the old backend.
        if replies.first().is_some_and(|name| **name == removed) {
            replies.remove(0);
        }
        ensure!(
            replies.len() >= 20 && replies.iter().all(|name| **name != removed),
            "after the destroy and a reconnect, datagrams reached {replies:?} (not {removed}?)"
        );
        ensure!(
            !seen.iter().any(|seen| matches!(seen, Seen::Lost)),
            "datagrams were lost: {seen:?}"
        );
        println!(
            "client on {removed}: {} replies before, errors {errors:?}, then {} replies from {:?}",
            before.len(),
            replies.len(),
            replies.iter().collect::<std::collections::BTreeSet<_>>()
        );
        // The other sockets: those on the removed backend were destroyed
        // too; the others keep their backend, still connected.
        for (socket, backend) in &sockets[1..] {
            if *backend == removed {
                let sent = socket.send(b"WHO\n").map_err(|e| e.raw_os_error());
                ensure!(
                    sent == Err(Some(libc::EDESTADDRREQ)),
                    "a socket on {removed} after the removal: send() gave {sent:?}"
                );
            } else {
                let who = connected_who(socket)?;
                ensure!(
                    who.name == *backend,
                    "a socket on the kept {backend} moved to {}",
                    who.name
                );
            }
        }
        Ok(())
    })();
    checked.map_err(|error| agent.failure(format!("{error:#}")))?;
    Ok(())
}

#[test]
fn status_metrics_keep_attached_and_detach() -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let bpffs = Bpffs::mount(&lab.lab)?;
    let run_dir = lab.lab.dir().join("run");
    let run_dir_arg = run_dir.display().to_string();
    let dir = bpffs.arg();
    let agent = lab.start_agent(&[
        "--bpffs",
        dir.as_str(),
        "--keep-attached",
        "--run-dir",
        run_dir_arg.as_str(),
        "--metrics-addr",
        "127.0.0.1:9090",
    ])?;
    let xlb = bin_from_env(XLB_BIN_ENV)?;
    let status = lab
        .lab
        .node
        .command(&xlb)
        .args([
            "status",
            "--json",
            "--bpffs",
            &dir,
            "--run-dir",
            &run_dir_arg,
        ])
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&status.stdout)
        .with_context(|| String::from_utf8_lossy(&status.stderr).into_owned())?;
    let hooks = &status["socket_hooks"];
    ensure!(
        hooks["cgroup"] == lab.cgroup.arg().as_str()
            && hooks["hooks"]
                == serde_json::json!([
                    "connect4",
                    "sendmsg4",
                    "recvmsg4",
                    "getpeername4",
                    "connect6",
                    "sendmsg6",
                    "recvmsg6",
                    "getpeername6"
                ])
            && hooks["pinned"].as_array().map(Vec::len) == Some(8),
        "xlb status --json socket_hooks: {hooks}"
    );
    // Balance one connection first, so the socket counter has counted.
    lab.lab
        .node
        .run(|| tcp_who_echo(tcp_cluster_ip(), b"counted"))??;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], 9090));
    let (code, metrics) = lab
        .lab
        .node
        .run(|| xlb::observe::http::get(metrics_addr, "/metrics"))??;
    ensure!(code == 200, "/metrics answered {code}");
    ensure!(
        metrics.contains(&format!(
            "xlb_socket_hook_attached{{hook=\"connect4\",cgroup=\"{}\"}} 1",
            lab.cgroup.arg()
        )),
        "/metrics has no xlb_socket_hook_attached for connect4"
    );
    let counted = metrics
        .lines()
        .find(|line| {
            line.starts_with("xlb_datapath_packets_total") && line.contains("\"fwd_socket\"")
        })
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok());
    ensure!(
        counted.is_some_and(|count| count >= 1.0),
        "/metrics counts no fwd_socket: {counted:?}"
    );

    // --keep-attached: the pinned hooks keep balancing without an agent.
    let exit = agent.stop()?;
    ensure!(exit.status.success(), "agent: {}", exit.log);
    for target in [tcp_node_port(), tcp_node_port6()] {
        let who = lab
            .lab
            .node
            .run(|| tcp_who_echo(target, b"still there"))??;
        ensure!(all_backends(&lab.lab).contains(&who.name), "{target}");
    }

    // `xlb detach` removes them: NODE:nodePort is then nobody's port.
    let detach = lab
        .lab
        .node
        .command(&xlb)
        .args(["detach", "--bpffs", &dir])
        .output()?;
    let said = String::from_utf8_lossy(&detach.stdout).into_owned();
    ensure!(
        detach.status.success()
            && said.contains(
                "socket hooks connect4, connect6, getpeername4, getpeername6, recvmsg4, \
                 recvmsg6, sendmsg4, sendmsg6 detached"
            ),
        "xlb detach said {said:?} {}",
        String::from_utf8_lossy(&detach.stderr)
    );
    for target in [tcp_node_port(), tcp_node_port6()] {
        let refused = lab
            .lab
            .node
            .run(|| TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_err())?;
        ensure!(refused, "{target} still answers after xlb detach");
    }
    drop(bpffs);
    Ok(())
}

/// internalTrafficPolicy Local: only this node's ready endpoint takes new
/// connections, never the terminating one nor those elsewhere.
#[test]
fn ipv6_internal_traffic_policy_local_skips_terminating_backends() -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let agent = lab.start_agent(&[])?;
    let local = SocketAddr::from((LOCAL_CLUSTER_IP6, SERVICE_PORT));
    let ready = lab.lab.backends[0].name.clone();
    check_in(&agent, &lab.lab.node, || {
        let (spread, _) = tcp_spread(local)?;
        ensure!(
            spread.keys().eq([&ready]),
            "internalTrafficPolicy Local over IPv6 reached {spread:?}, expected only {ready}"
        );
        Ok(())
    })
}

/// connect() and sendto() to a service without endpoints fail at once
/// with ECONNREFUSED, over both families.
#[test]
fn services_without_endpoints_refuse_the_call() -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let agent = lab.start_agent(&[])?;
    let errno = |result: &std::io::Result<()>| {
        result
            .as_ref()
            .map(|_| ())
            .map_err(std::io::Error::raw_os_error)
    };
    for netns in [lab.pod(0), &lab.lab.node] {
        check_in(&agent, netns, || {
            for address in [
                IpAddr::from(EMPTY_CLUSTER_IP),
                IpAddr::from(EMPTY_CLUSTER_IP6),
            ] {
                let tcp = SocketAddr::from((address, SERVICE_PORT));
                let started = std::time::Instant::now();
                let connected = TcpStream::connect_timeout(&tcp, IO_TIMEOUT).map(drop);
                ensure!(
                    errno(&connected) == Err(Some(libc::ECONNREFUSED))
                        && started.elapsed() < Duration::from_secs(1),
                    "connect() to {tcp} without endpoints: not refused at once"
                );
            }
            let udp = SocketAddr::from((EMPTY_CLUSTER_IP6, DNS_PORT));
            let socket = udp_socket_for(udp)?;
            let sent = socket.send_to(b"anyone?", udp).map(drop);
            ensure!(
                errno(&sent) == Err(Some(libc::ECONNREFUSED)),
                "sendto() {udp} without endpoints: {sent:?}"
            );
            let connected = socket.connect(udp);
            ensure!(
                errno(&connected) == Err(Some(libc::ECONNREFUSED)),
                "connect() a UDP socket to {udp} without endpoints: {connected:?}"
            );
            Ok(())
        })?;
    }
    Ok(())
}

/// The IPv6 hooks look up IPv6 services only: the node's IPv6 address on
/// the NodePort of an IPv4-only service is the node's own port.
#[test]
fn ipv6_hooks_leave_ipv4_only_services_alone() -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let _node_itself = lab.lab.start_echo(
        &lab.lab.node,
        NODE_ITSELF,
        &[SocketAddr::from((
            Ipv6Addr::UNSPECIFIED,
            IPV4_ONLY_NODE_PORT,
        ))],
        &[],
    )?;
    let agent = lab.start_agent(&[])?;
    check_in(&agent, &lab.lab.node, || {
        let node_port = SocketAddr::from((NODE_ADDR, IPV4_ONLY_NODE_PORT));
        let who = tcp_who_echo(node_port, b"balanced")?;
        ensure!(
            all_backends(&lab.lab).contains(&who.name),
            "{node_port}: {}",
            who.name
        );
        let node_port6 = SocketAddr::from((NODE_ADDR6, IPV4_ONLY_NODE_PORT));
        let who = tcp_who_echo(node_port6, b"the node's own")?;
        ensure!(
            who.name == NODE_ITSELF,
            "{node_port6} (an IPv4-only service's NodePort) reached {}",
            who.name
        );
        Ok(())
    })
}

/// A dual-stack AF_INET6 socket reaches IPv4 services through IPv4-mapped
/// addresses: connect() meets connect6, which balances it as IPv4; an
/// unconnected sendto() is IPv4's (sendmsg4); getpeername() and
/// recvfrom() show the mapped service address (getpeername6, recvmsg6).
#[test]
fn dual_stack_sockets_reach_ipv4_services_through_mapped_addresses() -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let agent = lab.start_agent(&[])?;
    let pod = &lab.lab.backends[2];
    let pod_addr = IpAddr::from(pod.addr);
    check_in(&agent, &pod.netns, || {
        for (target, what) in [
            (tcp_cluster_ip(), "TCP to [::ffff:ClusterIP]"),
            (tcp_node_port(), "TCP to [::ffff:NODE]:nodePort"),
        ] {
            let (spread, peers) = tcp_spread(v4_mapped(target))?;
            ensure_every_backend(&lab.lab, &spread, what)?;
            ensure!(
                peers.iter().all(|peer| *peer == pod_addr),
                "{what}: backends saw clients {peers:?}, expected the pod's IPv4 {pod_addr}"
            );
        }
        for (target, what) in [
            (udp_cluster_ip(), "UDP to [::ffff:ClusterIP]"),
            (udp_node_port(), "UDP to [::ffff:NODE]:nodePort"),
        ] {
            let (spread, _) = udp_spread(v4_mapped(target))?;
            ensure_every_backend(&lab.lab, &spread, what)?;
        }
        udp_connected(v4_mapped(udp_cluster_ip()))?;
        let sticky = v4_mapped(SocketAddr::from((STICKY_CLUSTER_IP, SERVICE_PORT)));
        let (spread, _) = tcp_spread(sticky)?;
        ensure!(spread.len() == 1, "affinity through {sticky}: {spread:?}");
        Ok(())
    })
}

/// Connected UDP sockets whose backend was removed are destroyed over IPv6
/// too, and so are dual-stack sockets connected to an IPv4 service through
/// an IPv4-mapped address (recorded as IPv4); the others keep their
/// backends.
#[test]
fn a_removed_backend_destroys_connected_ipv6_and_mapped_udp_clients() -> anyhow::Result<()> {
    let lab = SockLab::new()?;
    let mut agent = lab.start_agent(&[])?;
    let targets = [udp_cluster_ip6(), v4_mapped(udp_cluster_ip())];
    let mut sockets = Vec::new();
    for target in targets {
        for _ in 0..2 {
            let opened = pod_udp_sockets(&lab, || {
                let socket = udp_socket_for(target)?;
                socket.connect(target)?;
                let first = connected_who(&socket)?;
                Ok((socket, first))
            })?;
            sockets.extend(
                opened
                    .into_iter()
                    .map(|(socket, name)| (target, socket, name)),
            );
        }
    }
    let removed = sockets[0].2.clone();
    lab.lab
        .write_file("xlb.yaml", &config(&lab.lab, Some(&removed)))?;
    agent.reload_and_wait()?;
    let checked = (|| -> anyhow::Result<()> {
        for target in targets {
            let on_removed = sockets
                .iter()
                .filter(|(to, _, backend)| *to == target && *backend == removed)
                .count();
            ensure!(on_removed > 0, "no socket to {target} was on {removed}");
        }
        for (target, socket, backend) in &sockets {
            if *backend == removed {
                let sent = socket.send(b"WHO\n").map_err(|e| e.raw_os_error());
                ensure!(
                    sent == Err(Some(libc::EDESTADDRREQ)),
                    "a socket connected to {target} on {removed} after the removal: send() \
                     gave {sent:?}"
                );
            } else {
                let who = connected_who(socket)?;
                ensure!(
                    who.name == *backend,
                    "a socket connected to {target} on the kept {backend} moved to {}",
                    who.name
                );
            }
        }
        Ok(())
    })();
    checked.map_err(|error| agent.failure(format!("{error:#}")))?;
    Ok(())
}
