//! The lab topology of `config/demo.yaml`: a client, a node (where the agent
//! attaches XDP) and N backend pods, each in its own network namespace and
//! joined to the node by a veth pair. Every link is dual-stack (the IPv6
//! addresses below; tests/config/demo-dual-stack.yaml uses them).
//!
//! ```text
//!  client ns              node ns (xlb, IPv4 and IPv6 forwarding)   backend-N ns
//!  eth0 198.18.0.2 ------ xlb-c  198.18.0.1
//!       2001:db8::2/64           2001:db8::1/64
//!                         xlb-bN 198.18.N.1 ----------------------- eth0 198.18.N.2
//!                                2001:db8:N::1/64                        2001:db8:N::2/64
//!                                                                   xlb-echo :3333/tcp :4444/udp
//!                                                                   (on 0.0.0.0 and [::])
//! ```
//!
//! IPv6 is on only on these links, with no link-local addresses (so no
//! router solicitations or DAD): the only IPv6 frames the node's XDP sees
//! besides a test's own are neighbour discovery and the MLD reports of
//! the addresses' solicited-node groups at setup.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::netns::unique_stem;
use crate::xdp_pass::{self, XdpPass};
use crate::{ChildGuard, LabError, Netns, ScratchDir, XLB_ECHO_BIN_ENV, bin_from_env, poll_until};

/// The node's address towards the client; NodePorts answer here.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The node's IPv6 address towards the client, 2001:db8::1; IPv6 NodePorts
/// answer here.
pub const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The client's IPv6 address, 2001:db8::2.
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Prefix length of every IPv6 link in the lab.
pub const PREFIX6: u8 = 64;
/// The node's interface towards the client.
pub const NODE_CLIENT_IF: &str = "xlb-c";
/// Interface name inside the client and backend namespaces.
pub const POD_IF: &str = "eth0";

/// `tcp-echo` in config/demo.yaml.
pub const TCP_ECHO_NODE_PORT: u16 = 30999;
/// `udp-echo` in config/demo.yaml.
pub const UDP_ECHO_NODE_PORT: u16 = 30998;
/// Where every backend's xlb-echo listens.
pub const ECHO_TCP_PORT: u16 = 3333;
pub const ECHO_UDP_PORT: u16 = 4444;

/// How long a backend's echo server may take to start listening.
const ECHO_START_TIMEOUT: Duration = Duration::from_secs(10);

/// `198.18.0.1:30999`, the TCP echo NodePort.
pub fn tcp_echo_service() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, TCP_ECHO_NODE_PORT))
}

/// `198.18.0.1:30998`, the UDP echo NodePort.
pub fn udp_echo_service() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, UDP_ECHO_NODE_PORT))
}

/// `[2001:db8::1]:30999`, the TCP echo NodePort over IPv6.
pub fn tcp_echo_service6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(NODE_ADDR6, TCP_ECHO_NODE_PORT, 0, 0))
}

/// `[2001:db8::1]:30998`, the UDP echo NodePort over IPv6.
pub fn udp_echo_service6() -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(NODE_ADDR6, UDP_ECHO_NODE_PORT, 0, 0))
}

/// The pod address of backend `index` in the lab: 2001:db8:N::2.
pub fn backend_addr6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, u16::from(index), 0, 0, 0, 0, 2)
}

/// The node's address on backend `index`'s link: 2001:db8:N::1.
pub fn backend_node_addr6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, u16::from(index), 0, 0, 0, 0, 1)
}

/// A backend pod: its namespace and the echo server running in it.
#[derive(Debug)]
pub struct Backend {
    // Field order is drop order: stop the server, then remove the namespace.
    echo: ChildGuard,
    _xdp_pass: XdpPass,
    pub netns: Netns,
    /// 1-based, as in `backend-N`, `xlb-bN` and 198.18.N.0/24.
    pub index: u8,
    /// The name its echo server reports: `backend-N`.
    pub name: String,
    /// The pod's address, 198.18.N.2.
    pub addr: Ipv4Addr,
    /// The node's address on this backend's link, 198.18.N.1: what the
    /// backend sees as the peer of masqueraded traffic.
    pub node_addr: Ipv4Addr,
    /// The pod's IPv6 address, 2001:db8:N::2.
    pub addr6: Ipv6Addr,
    /// The node's IPv6 address on this backend's link, 2001:db8:N::1: the
    /// peer of masqueraded IPv6 traffic.
    pub node_addr6: Ipv6Addr,
    /// The node's interface towards this backend, `xlb-bN`.
    pub node_if: String,
}

impl Backend {
    /// The echo server's process id.
    pub fn echo_pid(&self) -> u32 {
        self.echo.id()
    }
}

/// A built lab; dropping it stops its processes and removes its namespaces
/// and scratch directory.
#[derive(Debug)]
pub struct Lab {
    // Drop order: backends (their servers), client, node, then files.
    pub backends: Vec<Backend>,
    _client_xdp_pass: XdpPass,
    pub client: Netns,
    pub node: Netns,
    dir: ScratchDir,
    echo_bin: PathBuf,
}

impl Lab {
    /// Build the lab with `backends` backend pods, running the echo server
    /// named by `XLB_ECHO_BIN` (set by `cargo xtask test`).
    pub fn new(backends: usize) -> Result<Lab, LabError> {
        Lab::with_echo_bin(backends, &bin_from_env(XLB_ECHO_BIN_ENV)?)
    }

    /// As [`Lab::new`], with an explicit path to `xlb-echo`.
    pub fn with_echo_bin(backends: usize, echo_bin: &Path) -> Result<Lab, LabError> {
        assert!(
            (1..=250).contains(&backends),
            "a lab has 1..=250 backends, asked for {backends}"
        );
        let stem = unique_stem();
        let dir = ScratchDir::create(&stem)?;
        let node = Netns::create(format!("{stem}-node"))?;
        let client = Netns::create(format!("{stem}-client"))?;
        node.sysctl("net/ipv4/ip_forward", "1")?;
        // Also the default of the links made next (bpf_fib_lookup asks
        // the ingress device).
        node.sysctl("net/ipv6/conf/all/forwarding", "1")?;

        let addrs = LinkAddrs {
            a: NODE_ADDR,
            a6: NODE_ADDR6,
            b: CLIENT_ADDR,
            b6: CLIENT_ADDR6,
        };
        let client_xdp_pass = link(&node, NODE_CLIENT_IF, &client, addrs, 0)?;

        let mut lab = Lab {
            backends: Vec::with_capacity(backends),
            _client_xdp_pass: client_xdp_pass,
            client,
            node,
            dir,
            echo_bin: echo_bin.to_owned(),
        };
        for index in 1..=backends as u8 {
            let backend = lab.add_backend(index)?;
            lab.backends.push(backend);
        }
        Ok(lab)
    }

    fn add_backend(&self, index: u8) -> Result<Backend, LabError> {
        let stem = self
            .node
            .name()
            .strip_suffix("-node")
            .expect("node namespace name ends in -node");
        let netns = Netns::create(format!("{stem}-b{index}"))?;
        let node_addr = Ipv4Addr::new(198, 18, index, 1);
        let addr = Ipv4Addr::new(198, 18, index, 2);
        let (node_addr6, addr6) = (backend_node_addr6(index), backend_addr6(index));
        let node_if = format!("xlb-b{index}");
        let addrs = LinkAddrs {
            a: node_addr,
            a6: node_addr6,
            b: addr,
            b6: addr6,
        };
        let xdp_pass = link(&self.node, &node_if, &netns, addrs, index)?;

        let name = format!("backend-{index}");
        let (tcp, udp) = (both_families(ECHO_TCP_PORT), both_families(ECHO_UDP_PORT));
        let echo = self.start_echo(&netns, &name, &tcp, &udp)?;
        Ok(Backend {
            echo,
            _xdp_pass: xdp_pass,
            netns,
            index,
            name,
            addr,
            node_addr,
            addr6,
            node_addr6,
            node_if,
        })
    }

    /// Start `xlb-echo --name NAME --tcp ... --udp ...` inside `netns` (e.g.
    /// a server on the node's own address) and wait until it listens.
    pub fn start_echo(
        &self,
        netns: &Netns,
        name: &str,
        tcp: &[SocketAddr],
        udp: &[SocketAddr],
    ) -> Result<ChildGuard, LabError> {
        start_echo(&self.dir, &self.echo_bin, netns, name, tcp, udp)
    }

    /// The backend whose echo server reports `name`.
    pub fn backend_named(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|backend| backend.name == name)
    }

    /// The lab's scratch directory (configs, logs); removed with the lab.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Write `contents` to `name` in the scratch directory, atomically (an
    /// agent watching the file never reads half of it).
    pub fn write_file(&self, name: &str, contents: &str) -> Result<PathBuf, LabError> {
        self.dir.write(name, contents)
    }

    /// A config like config/demo.yaml for this lab, with the given
    /// `services:` YAML block (indented by two spaces per level).
    pub fn config_yaml(&self, services: &str) -> String {
        self.config_yaml_with_addresses(&NODE_ADDR.to_string(), services)
    }

    /// As [`Lab::config_yaml`], with NodePorts on both of the node's
    /// addresses towards the client: 198.18.0.1 and 2001:db8::1.
    pub fn dual_stack_config_yaml(&self, services: &str) -> String {
        self.config_yaml_with_addresses(&format!("{NODE_ADDR}, {NODE_ADDR6}"), services)
    }

    /// As [`Lab::config_yaml`], with NodePorts only on 2001:db8::1.
    pub fn ipv6_config_yaml(&self, services: &str) -> String {
        self.config_yaml_with_addresses(&NODE_ADDR6.to_string(), services)
    }

    /// The lab's config with `addresses` (a YAML flow list's items) as
    /// `node.addresses`.
    fn config_yaml_with_addresses(&self, addresses: &str, services: &str) -> String {
        let interfaces: Vec<&str> = std::iter::once(NODE_CLIENT_IF)
            .chain(self.backends.iter().map(|backend| backend.node_if.as_str()))
            .collect();
        format!(
            "node:\n  interfaces: [{}]\n  addresses: [{addresses}]\n\nservices:\n{services}",
            interfaces.join(", ")
        )
    }
}

/// `0.0.0.0:port` and `[::]:port`: where a pod's echo server listens.
pub(crate) fn both_families(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ]
}

/// Start `xlb-echo --name NAME --tcp ... --udp ...` inside `netns`, its output
/// in `dir`, and wait until it listens.
pub(crate) fn start_echo(
    dir: &ScratchDir,
    echo_bin: &Path,
    netns: &Netns,
    name: &str,
    tcp: &[SocketAddr],
    udp: &[SocketAddr],
) -> Result<ChildGuard, LabError> {
    let stdout_path = dir.path().join(format!("{name}.out"));
    let stderr_path = dir.path().join(format!("{name}.err"));
    let stdout = dir.create_file(&format!("{name}.out"))?;
    let stderr = dir.create_file(&format!("{name}.err"))?;
    let mut command = netns.command(echo_bin);
    command.args(["--name", name]);
    for addr in tcp {
        command.arg("--tcp").arg(addr.to_string());
    }
    for addr in udp {
        command.arg("--udp").arg(addr.to_string());
    }
    let mut echo = ChildGuard::spawn(command.stdin(Stdio::null()).stdout(stdout).stderr(stderr))?;

    // xlb-echo prints "listening" once every socket is bound.
    let mut exited = None;
    let waited = poll_until(
        &format!("{name} (xlb-echo) to listen"),
        ECHO_START_TIMEOUT,
        || {
            if let Ok(Some(status)) = echo.try_wait() {
                exited = Some(status);
                return Some(());
            }
            let out = std::fs::read_to_string(&stdout_path).unwrap_or_default();
            out.contains("listening").then_some(())
        },
    );
    let failure = match (waited, exited) {
        (Ok(()), None) => return Ok(echo),
        (Ok(()), Some(status)) => format!("`{}` exited with {status}", echo.command()),
        (Err(error), _) => error.to_string(),
    };
    Err(LabError::WithLog {
        what: failure,
        log_name: format!("{name} stderr"),
        log: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    })
}

/// The addresses of a link's two ends: `a` the node's, `b` the pod's.
#[derive(Clone, Copy)]
struct LinkAddrs {
    a: Ipv4Addr,
    a6: Ipv6Addr,
    b: Ipv4Addr,
    b6: Ipv6Addr,
}

/// A veth pair `a_if` (in `a`) <-> `eth0` (in `b`), created directly inside
/// the namespaces so host names never collide, with addresses of both
/// families, static MACs, the node's static neighbour entries, the pod's
/// default routes via the node, and the pod end set up to behave like
/// a real NIC towards the node's XDP program: GRO on and an `XDP_PASS`
/// program (so frames the node sends with XDP_REDIRECT or XDP_TX are
/// delivered), TX checksum offload off (so the pod sends complete
/// checksums, as frames from a real network have).
fn link(
    a: &Netns,
    a_if: &str,
    b: &Netns,
    addrs: LinkAddrs,
    index: u8,
) -> Result<XdpPass, LabError> {
    let LinkAddrs {
        a: a_addr,
        a6,
        b: b_addr,
        b6,
    } = addrs;
    let a_mac = format!("02:78:6c:00:{index:02x}:01");
    let b_mac = format!("02:78:6c:00:{index:02x}:02");
    let b_name = b.name();
    a.ip_line(&format!(
        "link add {a_if} address {a_mac} type veth peer name {POD_IF} address {b_mac} netns {b_name}"
    ))?;
    a.ip_line(&format!("addr add {a_addr}/24 dev {a_if}"))?;
    b.ip_line(&format!("addr add {b_addr}/24 dev {POD_IF}"))?;
    enable_ipv6(a, a_if, a6, PREFIX6)?;
    enable_ipv6(b, POD_IF, b6, PREFIX6)?;
    a.ip_line(&format!("link set {a_if} up"))?;
    b.ip_line(&format!("link set {POD_IF} up"))?;
    b.ip_line(&format!("route add default via {a_addr}"))?;
    b.ip_line(&format!("-6 route add default via {a6} dev {POD_IF}"))?;
    a.ip_line(&format!(
        "neigh replace {b_addr} lladdr {b_mac} dev {a_if} nud permanent"
    ))?;
    a.ip_line(&format!(
        "-6 neigh replace {b6} lladdr {b_mac} dev {a_if} nud permanent"
    ))?;
    b.exec("ethtool", &["-K", POD_IF, "gro", "on", "tx", "off"])?;
    b.run(|| xdp_pass::attach(POD_IF))?
}

/// IPv6 on `ifname` (a namespace starts with it off, see [`Netns::create`]),
/// without a generated link-local address, and `addr/prefix` on it without
/// duplicate address detection (so it is usable at once). Without a
/// link-local address the kernel sends no neighbour solicitation for
/// traffic it forwards out of `ifname`: the lab's node has static entries.
pub fn enable_ipv6(
    netns: &Netns,
    ifname: &str,
    addr: Ipv6Addr,
    prefix: u8,
) -> Result<(), LabError> {
    netns.ip_line(&format!("link set {ifname} addrgenmode none"))?;
    add_ipv6(netns, ifname, addr, prefix)
}

/// As [`enable_ipv6`], with the kernel's link-local address as on a real
/// node (no duplicate address detection for it either).
pub(crate) fn enable_ipv6_with_link_local(
    netns: &Netns,
    ifname: &str,
    addr: Ipv6Addr,
    prefix: u8,
) -> Result<(), LabError> {
    netns.sysctl(&format!("net/ipv6/conf/{ifname}/accept_dad"), "0")?;
    add_ipv6(netns, ifname, addr, prefix)
}

fn add_ipv6(netns: &Netns, ifname: &str, addr: Ipv6Addr, prefix: u8) -> Result<(), LabError> {
    netns.sysctl(&format!("net/ipv6/conf/{ifname}/disable_ipv6"), "0")?;
    netns.ip_line(&format!("-6 addr add {addr}/{prefix} dev {ifname} nodad"))?;
    Ok(())
}

/// Sets up `ifname` in `netns` like a NIC or a router's port facing a node
/// that runs XDP (GRO on, an `XDP_PASS` program so redirected frames are
/// delivered, TX checksum offload off so checksums are finished on the way
/// out). Only for devices that stand for hardware, never a pod's end
/// (see LAB-NOTES). Keep the returned program for the link's lifetime.
pub fn nic_like(netns: &Netns, ifname: &str) -> Result<XdpPass, LabError> {
    netns.exec("ethtool", &["-K", ifname, "gro", "on", "tx", "off"])?;
    netns.run(|| xdp_pass::attach(ifname))?
}
