//! A real-node lab: the node's pods as CNIs leave them, a second node with
//! its own pods, and a switch between them and the client (LAB-NOTES 12).
//!
//! ```text
//!  client ns               switch ns                 node ns (xlb, ip_forward=1)
//!  eth0 198.18.0.2 ------- sw-c  [sw0]  sw-n1 ------ xlb-up 198.18.0.1 (XDP + tc)
//!                                       sw-n2 --+    default via 198.18.0.254 (nobody)
//!                                               |    cni0 198.18.10.1/24 (bridge CNI)
//!                                               |      xlb-vbN --- pod eth0 198.18.10.N+1/24
//!                                               |    xlb-vrN (routed CNI, no address, proxy-ARP)
//!                                               |      --- pod eth0 198.18.11.N+1/32, gw 169.254.1.1
//!                                               |    xlb-vx 198.18.30.1/24 (VXLAN 42, MTU 1450)
//!                                               |    198.18.20.0/24 via 198.18.0.3
//!                                               |    198.18.21.0/24 via 198.18.30.3 dev xlb-vx
//!                                               +--- node2 ns: eth0 198.18.0.3
//!                                                      br20 198.18.20.1/24: pods reached routed
//!                                                      br21 198.18.21.1/24: pods reached over VXLAN
//!                                                      xlb-vx 198.18.30.3/24 (VXLAN 42)
//! ```
//!
//! Every network is dual-stack: 198.18.X.Y is also 2001:db8:X::Y (the
//! uplink network 198.18.0.0/24 is 2001:db8::/64), as /64s where the IPv4
//! network is a /24; a routed pod has a /128 and `default via fe80::1`, the
//! host side's own link-local address. IPv6 is on only where there is an
//! address, with link-local addresses as a node has (without DAD).
//!
//! Only the switch ports and the nodes' uplinks stand for NICs: the switch
//! ports have TX checksum offload off (checksums are finished in software on
//! the way out, as on a wire, so the client drops what a real one would) and
//! an `XDP_PASS` program (they take the frames the node sends with XDP_TX).
//! Every pod end, both sides of every pod veth, the bridges and the VXLAN
//! devices keep the kernel's defaults: GRO off, TX checksum offload on, no
//! XDP. Pods send CHECKSUM_PARTIAL skbs, as on a real node.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};

// Every addressed interface of a real node has its link-local address too.
use crate::lab::enable_ipv6_with_link_local as enable_ipv6;
use crate::lab::{ECHO_TCP_PORT, ECHO_UDP_PORT, PREFIX6, both_families, start_echo};
use crate::netns::unique_stem;
use crate::xdp_pass::{self, XdpPass};
use crate::{ChildGuard, LabError, Netns, ScratchDir, XLB_ECHO_BIN_ENV, bin_from_env};

/// The node's uplink address; NodePorts answer here.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The second node's uplink address.
pub const NODE2_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The node's IPv6 uplink address; IPv6 NodePorts answer here.
pub const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
pub const NODE2_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);
/// The node's IPv6 address on the VXLAN overlay.
pub const NODE_VXLAN_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x30, 0, 0, 0, 0, 1);
const NODE2_VXLAN_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x30, 0, 0, 0, 0, 3);
/// A routed pod's IPv6 gateway: the host side's link-local address.
pub const ROUTED_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The node's uplink (where the agent attaches XDP).
pub const UPLINK_IF: &str = "xlb-up";
/// The bridge CNI's bridge in the node.
pub const CNI_BRIDGE: &str = "cni0";
/// The node's VXLAN device.
pub const VXLAN_IF: &str = "xlb-vx";
/// The node's address on the VXLAN overlay.
pub const NODE_VXLAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 1);
const NODE2_VXLAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 3);
/// Overlay MTU (flannel's for a 1500-byte uplink).
pub const VXLAN_MTU: u32 = 1450;
/// The TCP and UDP NodePorts of [`NodeLab::config_yaml`]'s services.
pub const TCP_NODE_PORT: u16 = 30999;
pub const UDP_NODE_PORT: u16 = 30998;
/// Interface name inside pods and the client.
const POD_IF: &str = "eth0";

/// How a pod is reached from the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PodKind {
    /// On this node, on the bridge CNI (cni0).
    Bridge,
    /// On this node, on the routed CNI (veth + /32 route, proxy-ARP).
    Routed,
    /// On node2, routed over the uplink network.
    Node2Routed,
    /// On node2, over the VXLAN overlay.
    Node2Vxlan,
}

impl PodKind {
    pub const ALL: [PodKind; 4] = [
        PodKind::Bridge,
        PodKind::Routed,
        PodKind::Node2Routed,
        PodKind::Node2Vxlan,
    ];

    /// Short name, used in pod names: `bridge-1`, `node2-vxlan-1`, ...
    pub fn label(self) -> &'static str {
        match self {
            PodKind::Bridge => "bridge",
            PodKind::Routed => "routed",
            PodKind::Node2Routed => "node2-routed",
            PodKind::Node2Vxlan => "node2-vxlan",
        }
    }

    /// Whether the pod runs on the node xlb serves.
    pub fn is_local(self) -> bool {
        matches!(self, PodKind::Bridge | PodKind::Routed)
    }

    fn third_octet(self) -> u8 {
        match self {
            PodKind::Bridge => 10,
            PodKind::Routed => 11,
            PodKind::Node2Routed => 20,
            PodKind::Node2Vxlan => 21,
        }
    }

    /// Host `host` of the kind's IPv6 network, 2001:db8:P::host, P the
    /// IPv4 network's third octet in hex digits (10 -> 2001:db8:10::/64).
    fn net6(self, host: u16) -> Ipv6Addr {
        let prefix = match self {
            PodKind::Bridge => 0x10,
            PodKind::Routed => 0x11,
            PodKind::Node2Routed => 0x20,
            PodKind::Node2Vxlan => 0x21,
        };
        Ipv6Addr::new(0x2001, 0xdb8, prefix, 0, 0, 0, 0, host)
    }

    fn host_if(self, index: u8) -> String {
        match self {
            PodKind::Bridge => format!("xlb-vb{index}"),
            PodKind::Routed => format!("xlb-vr{index}"),
            PodKind::Node2Routed => format!("n2-r{index}"),
            PodKind::Node2Vxlan => format!("n2-v{index}"),
        }
    }
}

/// A pod: its namespace and the echo server in it.
#[derive(Debug)]
pub struct Pod {
    // Drop order: the server, then the namespace (which takes its veth).
    _echo: ChildGuard,
    pub netns: Netns,
    /// `KIND-N`, what its echo server reports.
    pub name: String,
    pub kind: PodKind,
    pub index: u8,
    pub addr: Ipv4Addr,
    /// Its IPv6 address, 2001:db8:P::N+1 (P as in `PodKind::net6`).
    pub addr6: Ipv6Addr,
    /// Its veth's host side (in the node, or in node2).
    pub host_if: String,
}

impl Pod {
    /// The client address the pod sees on a masqueraded flow: the node's
    /// address on the way to it (the egress interface's: cni0's, the
    /// overlay's; or the node's primary one where the interface has none,
    /// as a routed CNI's veth).
    pub fn masquerade_addr(&self) -> Ipv4Addr {
        match self.kind {
            PodKind::Bridge => Ipv4Addr::new(198, 18, 10, 1),
            PodKind::Routed | PodKind::Node2Routed => NODE_ADDR,
            PodKind::Node2Vxlan => NODE_VXLAN_ADDR,
        }
    }

    /// [`Pod::masquerade_addr`] for IPv6: cni0's, the overlay's, or the
    /// node's uplink address (a routed CNI's veth has link-local ones only).
    pub fn masquerade_addr6(&self) -> Ipv6Addr {
        match self.kind {
            PodKind::Bridge => gateway6(PodKind::Bridge),
            PodKind::Routed | PodKind::Node2Routed => NODE_ADDR6,
            PodKind::Node2Vxlan => NODE_VXLAN_ADDR6,
        }
    }

    /// How the pod is reached, in words, for the demo.
    pub fn reached(&self) -> &'static str {
        match self.kind {
            PodKind::Bridge => "this node, bridge CNI (cni0)",
            PodKind::Routed => "this node, routed CNI (veth + /32)",
            PodKind::Node2Routed => "node2, routed via 198.18.0.3",
            PodKind::Node2Vxlan => "node2, over VXLAN (xlb-vx)",
        }
    }
}

/// A built real-node lab; dropping it removes everything.
#[derive(Debug)]
pub struct NodeLab {
    pub pods: Vec<Pod>,
    _switch_ports: Vec<XdpPass>,
    pub client: Netns,
    pub node: Netns,
    pub node2: Netns,
    pub switch: Netns,
    dir: ScratchDir,
    echo_bin: PathBuf,
    stem: String,
}

impl NodeLab {
    /// The wire, both nodes, and one pod of each kind (`bridge-1`,
    /// `routed-1`, `node2-routed-1`, `node2-vxlan-1`), with the echo server
    /// named by `XLB_ECHO_BIN`.
    pub fn new() -> Result<NodeLab, LabError> {
        NodeLab::with_echo_bin(&bin_from_env(XLB_ECHO_BIN_ENV)?)
    }

    pub fn with_echo_bin(echo_bin: &Path) -> Result<NodeLab, LabError> {
        let mut lab = NodeLab::empty(echo_bin)?;
        for kind in PodKind::ALL {
            let pod = lab.add_pod(kind, 1)?;
            lab.pods.push(pod);
        }
        Ok(lab)
    }

    /// The wire and both nodes, no pods yet.
    pub fn empty(echo_bin: &Path) -> Result<NodeLab, LabError> {
        let stem = unique_stem();
        let dir = ScratchDir::create(&stem)?;
        let switch = Netns::create(format!("{stem}-sw"))?;
        let node = Netns::create(format!("{stem}-node"))?;
        let node2 = Netns::create(format!("{stem}-node2"))?;
        let client = Netns::create(format!("{stem}-client"))?;
        let mut lab = NodeLab {
            pods: Vec::new(),
            _switch_ports: Vec::new(),
            client,
            node,
            node2,
            switch,
            dir,
            echo_bin: echo_bin.to_owned(),
            stem,
        };
        lab.wire()?;
        lab.node_cni()?;
        lab.node2_cni()?;
        lab.overlay()?;
        Ok(lab)
    }

    /// The switch and the three stations on it.
    fn wire(&mut self) -> Result<(), LabError> {
        let sw = &self.switch;
        sw.ip_line("link add sw0 type bridge")?;
        sw.ip_line("link set sw0 up")?;
        let stations = [
            ("sw-c", &self.client, POD_IF, CLIENT_ADDR, CLIENT_ADDR6),
            ("sw-n1", &self.node, UPLINK_IF, NODE_ADDR, NODE_ADDR6),
            ("sw-n2", &self.node2, POD_IF, NODE2_ADDR, NODE2_ADDR6),
        ];
        for (port, station, station_if, addr, addr6) in stations {
            sw.ip_line(&format!(
                "link add {port} type veth peer name {station_if} netns {}",
                station.name()
            ))?;
            sw.ip_line(&format!("link set {port} master sw0"))?;
            sw.ip_line(&format!("link set {port} up"))?;
            // A switch port: finishes checksums on the way out, takes
            // XDP_TX'd frames from the station.
            sw.exec("ethtool", &["-K", port, "tx", "off"])?;
            let pass = sw.run(|| xdp_pass::attach(port))??;
            self._switch_ports.push(pass);
            station.ip_line(&format!("addr add {addr}/24 dev {station_if}"))?;
            enable_ipv6(station, station_if, addr6, PREFIX6)?;
            station.ip_line(&format!("link set {station_if} up"))?;
        }
        for node in [&self.node, &self.node2] {
            node.sysctl("net/ipv4/ip_forward", "1")?;
            node.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        // A node has a default route; nothing answers at .254, and the
        // switch ends at this lab's namespaces.
        self.node.ip_line(&format!(
            "route add default via 198.18.0.254 dev {UPLINK_IF}"
        ))?;
        self.node.ip_line(&format!(
            "-6 route add default via 2001:db8::fe dev {UPLINK_IF}"
        ))?;
        Ok(())
    }

    /// The node's CNIs: the bridge (pods attach as they are added; a fixed
    /// MAC, which a new pod's port cannot change) and node2's pod route.
    fn node_cni(&self) -> Result<(), LabError> {
        let (node, mac) = (&self.node, "02:c0:00:00:0a:01");
        node.ip_line(&format!("link add {CNI_BRIDGE} address {mac} type bridge"))?;
        node.ip_line(&format!("addr add 198.18.10.1/24 dev {CNI_BRIDGE}"))?;
        let gateway6 = gateway6(PodKind::Bridge);
        enable_ipv6(node, CNI_BRIDGE, gateway6, PREFIX6)?;
        node.ip_line(&format!("link set {CNI_BRIDGE} up"))?;
        node.ip_line(&format!(
            "route add 198.18.20.0/24 via {NODE2_ADDR} dev {UPLINK_IF}"
        ))?;
        node.ip_line(&format!(
            "-6 route add 2001:db8:20::/64 via {NODE2_ADDR6} dev {UPLINK_IF}"
        ))?;
        Ok(())
    }

    fn node2_cni(&self) -> Result<(), LabError> {
        let node2 = &self.node2;
        for (bridge, gateway, kind) in [
            ("br20", "198.18.20.1/24", PodKind::Node2Routed),
            ("br21", "198.18.21.1/24", PodKind::Node2Vxlan),
        ] {
            node2.ip_line(&format!("link add {bridge} type bridge"))?;
            node2.ip_line(&format!("addr add {gateway} dev {bridge}"))?;
            enable_ipv6(node2, bridge, gateway6(kind), PREFIX6)?;
            node2.ip_line(&format!("link set {bridge} up"))?;
        }
        node2.ip_line(&format!("link set br21 mtu {VXLAN_MTU}"))?;
        Ok(())
    }

    /// A flannel-like VXLAN overlay between the nodes: node2's second pod
    /// network is reached through it.
    fn overlay(&self) -> Result<(), LabError> {
        for (netns, local, remote, addr, addr6) in [
            (
                &self.node,
                NODE_ADDR,
                NODE2_ADDR,
                NODE_VXLAN_ADDR,
                NODE_VXLAN_ADDR6,
            ),
            (
                &self.node2,
                NODE2_ADDR,
                NODE_ADDR,
                NODE2_VXLAN_ADDR,
                NODE2_VXLAN_ADDR6,
            ),
        ] {
            let uplink = if netns.name() == self.node.name() {
                UPLINK_IF
            } else {
                POD_IF
            };
            netns.ip_line(&format!(
                "link add {VXLAN_IF} type vxlan id 42 local {local} dev {uplink} dstport 4789"
            ))?;
            netns.ip_line(&format!("link set {VXLAN_IF} mtu {VXLAN_MTU}"))?;
            netns.ip_line(&format!("addr add {addr}/24 dev {VXLAN_IF}"))?;
            enable_ipv6(netns, VXLAN_IF, addr6, PREFIX6)?;
            netns.ip_line(&format!("link set {VXLAN_IF} up"))?;
            run_bridge(
                netns,
                &format!("fdb append 00:00:00:00:00:00 dev {VXLAN_IF} dst {remote}"),
            )?;
        }
        self.node.ip_line(&format!(
            "route add 198.18.21.0/24 via {NODE2_VXLAN_ADDR} dev {VXLAN_IF}"
        ))?;
        self.node.ip_line(&format!(
            "-6 route add 2001:db8:21::/64 via {NODE2_VXLAN_ADDR6} dev {VXLAN_IF}"
        ))?;
        Ok(())
    }

    /// Makes pod `KIND-index` (not yet in `pods`): a namespace, its veth as
    /// the CNI makes it, and an echo server (TCP 3333, UDP 4444).
    pub fn add_pod(&self, kind: PodKind, index: u8) -> Result<Pod, LabError> {
        assert!((1..=250).contains(&index), "pod index 1..=250");
        let name = format!("{}-{index}", kind.label());
        let netns = Netns::create(format!("{}-{name}", self.stem))?;
        let addr = Ipv4Addr::new(198, 18, kind.third_octet(), index + 1);
        let addr6 = kind.net6(u16::from(index) + 1);
        let host_if = kind.host_if(index);
        let host = if kind.is_local() {
            &self.node
        } else {
            &self.node2
        };
        host.ip_line(&format!(
            "link add {host_if} type veth peer name {POD_IF} netns {}",
            netns.name()
        ))?;
        plumb(kind, host, &host_if, &netns, addr, addr6)?;
        let echo = start_echo(
            &self.dir,
            &self.echo_bin,
            &netns,
            &name,
            &both_families(ECHO_TCP_PORT),
            &both_families(ECHO_UDP_PORT),
        )?;
        Ok(Pod {
            _echo: echo,
            netns,
            name,
            kind,
            index,
            addr,
            addr6,
            host_if,
        })
    }

    /// The pod whose echo server reports `name`.
    pub fn pod_named(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|pod| pod.name == name)
    }

    /// The pod of `kind` with index 1.
    pub fn pod(&self, kind: PodKind) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.kind == kind && pod.index == 1)
            .expect("every lab has pod 1 of each kind")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn write_file(&self, name: &str, contents: &str) -> Result<PathBuf, LabError> {
        self.dir.write(name, contents)
    }

    /// A config for this node: XDP on the uplink, NodePort answering on its
    /// address, and `services` (YAML, indented two spaces per level).
    pub fn config_yaml(&self, services: &str) -> String {
        format!(
            "node:\n  interfaces: [{UPLINK_IF}]\n  addresses: [{NODE_ADDR}]\n\nservices:\n{services}"
        )
    }

    /// As [`NodeLab::config_yaml`], NodePorts on both uplink addresses.
    pub fn dual_stack_config_yaml(&self, services: &str) -> String {
        format!(
            "node:\n  interfaces: [{UPLINK_IF}]\n  addresses: [{NODE_ADDR}, {NODE_ADDR6}]\n\nservices:\n{services}"
        )
    }

    /// `tcp-echo` (NodePort 30999 -> :3333) and `udp-echo` (30998 -> :4444)
    /// with `pods` as backends; `local: true` marks this node's pods when
    /// `etp_local` (externalTrafficPolicy Local).
    pub fn echo_services(&self, pods: &[&Pod], etp_local: bool) -> String {
        echo_services(pods, etp_local, |pod| vec![pod.addr.into()])
    }

    /// As [`NodeLab::echo_services`], each pod listed by both its addresses
    /// (dual-stack services).
    pub fn dual_stack_echo_services(&self, pods: &[&Pod], etp_local: bool) -> String {
        echo_services(pods, etp_local, |pod| {
            vec![pod.addr.into(), pod.addr6.into()]
        })
    }

    /// The client's TCP and UDP checksum error counters (`nstat`):
    /// (TcpInCsumErrors, UdpInCsumErrors).
    pub fn client_csum_errors(&self) -> Result<(u64, u64), LabError> {
        csum_errors(&self.client)
    }
}

/// `tcp-echo` and `udp-echo` with `pods` as backends at `addresses(pod)`.
fn echo_services(
    pods: &[&Pod],
    etp_local: bool,
    addresses: impl Fn(&Pod) -> Vec<IpAddr>,
) -> String {
    let mut out = String::new();
    for (name, protocol, node_port, target) in [
        ("tcp-echo", "TCP", TCP_NODE_PORT, ECHO_TCP_PORT),
        ("udp-echo", "UDP", UDP_NODE_PORT, ECHO_UDP_PORT),
    ] {
        out.push_str(&format!(
            "  - name: {name}\n    protocol: {protocol}\n    nodePort: {node_port}\n    \
             targetPort: {target}\n"
        ));
        if etp_local {
            out.push_str("    externalTrafficPolicy: Local\n");
        }
        out.push_str("    backends:\n");
        for pod in pods {
            for address in addresses(pod) {
                out.push_str(&format!("      - address: {address}\n"));
                if etp_local && pod.kind.is_local() {
                    out.push_str("        local: true\n");
                }
            }
        }
    }
    out
}

/// The veth `host_if` (in `host`) <-> `eth0` (in `pod`) as `kind`'s CNI
/// leaves it: addresses of both families, routes, bridge and MTU.
fn plumb(
    kind: PodKind,
    host: &Netns,
    host_if: &str,
    pod: &Netns,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
) -> Result<(), LabError> {
    match kind {
        PodKind::Routed => {
            // Calico's way: no address on the host side, a /32 route to
            // the pod, and the host answers ARP for the pod's
            // link-local gateway.
            host.sysctl(&format!("net/ipv4/conf/{host_if}/proxy_arp"), "1")?;
            host.sysctl(&format!("net/ipv4/neigh/{host_if}/proxy_delay"), "0")?;
            // IPv6: the gateway is the host side's link-local fe80::1.
            enable_ipv6(host, host_if, ROUTED_GATEWAY6, PREFIX6)?;
            host.ip_line(&format!("link set {host_if} up"))?;
            host.ip_line(&format!("route add {addr}/32 dev {host_if}"))?;
            host.ip_line(&format!("-6 route add {addr6}/128 dev {host_if}"))?;
            pod.ip_line(&format!("addr add {addr}/32 dev {POD_IF}"))?;
            enable_ipv6(pod, POD_IF, addr6, 128)?;
            pod.ip_line(&format!("link set {POD_IF} up"))?;
            pod.ip_line(&format!("route add 169.254.1.1 dev {POD_IF} scope link"))?;
            pod.ip_line(&format!("route add default via 169.254.1.1 dev {POD_IF}"))?;
            pod.ip_line(&format!(
                "-6 route add default via {ROUTED_GATEWAY6} dev {POD_IF}"
            ))?;
        }
        _ => {
            let bridge = match kind {
                PodKind::Bridge => CNI_BRIDGE,
                PodKind::Node2Routed => "br20",
                _ => "br21",
            };
            if kind == PodKind::Node2Vxlan {
                host.ip_line(&format!("link set {host_if} mtu {VXLAN_MTU}"))?;
                pod.ip_line(&format!("link set {POD_IF} mtu {VXLAN_MTU}"))?;
            }
            host.ip_line(&format!("link set {host_if} master {bridge}"))?;
            host.ip_line(&format!("link set {host_if} up"))?;
            pod.ip_line(&format!("addr add {addr}/24 dev {POD_IF}"))?;
            enable_ipv6(pod, POD_IF, addr6, PREFIX6)?;
            pod.ip_line(&format!("link set {POD_IF} up"))?;
            let gateway = Ipv4Addr::new(198, 18, kind.third_octet(), 1);
            pod.ip_line(&format!("route add default via {gateway}"))?;
            pod.ip_line(&format!("-6 route add default via {}", gateway6(kind)))?;
        }
    }
    Ok(())
}

/// The gateway of a bridged pod network of `kind`: 2001:db8:P::1.
fn gateway6(kind: PodKind) -> Ipv6Addr {
    kind.net6(1)
}

/// The TCP and UDP checksum error counters (`nstat`) of a namespace (the
/// client's, a pod's): (TcpInCsumErrors, UdpInCsumErrors).
pub fn csum_errors(netns: &Netns) -> Result<(u64, u64), LabError> {
    let out = netns.exec(
        "nstat",
        &["-a", "-s", "-z", "TcpInCsumErrors", "UdpInCsumErrors"],
    )?;
    let value = |name: &str| {
        out.lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(name)).then(|| fields.next()?.parse().ok())?
            })
            .unwrap_or(0)
    };
    Ok((value("TcpInCsumErrors"), value("UdpInCsumErrors")))
}

/// `ip netns exec NS bridge ARGS`.
fn run_bridge(netns: &Netns, args: &str) -> Result<(), LabError> {
    netns
        .exec("bridge", &args.split_whitespace().collect::<Vec<_>>())
        .map(drop)
}

/// `NODE:30999`, the TCP NodePort.
pub fn tcp_service() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, TCP_NODE_PORT))
}

/// `NODE:30998`, the UDP NodePort.
pub fn udp_service() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, UDP_NODE_PORT))
}

/// `[NODE6]:30999`, the TCP NodePort over IPv6.
pub fn tcp_service6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(NODE_ADDR6, TCP_NODE_PORT, 0, 0))
}

/// `[NODE6]:30998`, the UDP NodePort over IPv6.
pub fn udp_service6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(NODE_ADDR6, UDP_NODE_PORT, 0, 0))
}
