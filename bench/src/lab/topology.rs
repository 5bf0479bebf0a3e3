//! The benchmark lab: a generator, a node and two backend "pods", each in a
//! network namespace of its own, built fresh for every scenario so no
//! conntrack entry, rule or XDP program of one scenario can touch the next.
//!
//! ```text
//!  gen ns              node ns (ip_forward=1)            bN ns (N = 1, 2)
//!  eth0 198.18.0.2 --- xb-g  198.18.0.1
//!                      xb-bN 198.18.N.1 ---------------- eth0 198.18.N.2-6
//! ```
//!
//! Routes on the node: 198.18.128.0/17 (the generator's new-flow sources)
//! via the generator, and 198.19.0.0/16 (pod IPs of the sweep's filler
//! services, "on other nodes") via 198.18.1.2. Every address is in
//! 198.18.0.0/15 and lives only in these namespaces.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context as _;
use xlb_tests::{Netns, ScratchDir, netns::unique_stem};

/// The node's address on the generator link: NodePorts answer here.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The generator's (client's) address.
pub const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Source addresses of the generator's new-flow mode: 198.18.128.0/17.
pub const NEW_FLOW_SOURCES: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 0);
/// Node interface towards the generator.
pub const NODE_GEN_IF: &str = "xb-g";
/// Interface name inside the generator and backend namespaces.
pub const POD_IF: &str = "eth0";
/// Backend namespaces, and addresses (pods) per backend namespace.
pub const BACKEND_NAMESPACES: u8 = 2;
pub const PODS_PER_BACKEND: u8 = 5;

pub const NODE_GEN_MAC: [u8; 6] = [0x02, 0x62, 0, 0, 0, 0x01];
pub const GEN_MAC: [u8; 6] = [0x02, 0x62, 0, 0, 0, 0x02];

/// The node's MAC towards backend namespace `index` (1-based).
pub fn node_backend_mac(index: u8) -> [u8; 6] {
    [0x02, 0x62, 0, 0, index, 0x01]
}

/// Backend namespace `index`'s MAC.
pub fn backend_mac(index: u8) -> [u8; 6] {
    [0x02, 0x62, 0, 0, index, 0x02]
}

/// Node interface towards backend namespace `index`.
pub fn node_backend_if(index: u8) -> String {
    format!("xb-b{index}")
}

/// Every real pod address: 198.18.N.2 ..= 198.18.N.6 for N = 1, 2.
pub fn pod_addrs() -> Vec<Ipv4Addr> {
    (1..=BACKEND_NAMESPACES)
        .flat_map(|ns| (0..PODS_PER_BACKEND).map(move |pod| Ipv4Addr::new(198, 18, ns, 2 + pod)))
        .collect()
}

pub use xlb_tests::netns::mac_str;

/// A built lab; dropping it kills what runs inside and removes it.
pub struct BenchLab {
    // Drop order is field order: namespaces, then the scratch directory.
    pub gen_ns: Netns,
    pub node: Netns,
    pub backends: Vec<Netns>,
    /// The real-node lab's second node and pods (bench/src/lab/nodes.rs);
    /// empty on this lab.
    pub real_node: Vec<Netns>,
    pub(super) dir: ScratchDir,
}

impl BenchLab {
    pub fn build() -> anyhow::Result<BenchLab> {
        let stem = unique_stem();
        let dir = ScratchDir::create(&stem)?;
        let node = Netns::create(format!("{stem}-node"))?;
        let gen_ns = Netns::create(format!("{stem}-gen"))?;
        let mut backends = Vec::new();
        for index in 1..=BACKEND_NAMESPACES {
            backends.push(Netns::create(format!("{stem}-b{index}"))?);
        }
        let lab = BenchLab {
            gen_ns,
            node,
            backends,
            real_node: Vec::new(),
            dir,
        };
        lab.wire().context("wiring the benchmark lab")?;
        Ok(lab)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn wire(&self) -> anyhow::Result<()> {
        let node = &self.node;
        for key in ["net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding"] {
            node.sysctl(key, "1")?;
        }
        // New-flow sources are routed back through the generator link, but
        // the stack must not second-guess them.
        for key in [
            "net/ipv4/conf/all/rp_filter",
            "net/ipv4/conf/default/rp_filter",
        ] {
            node.sysctl(key, "0")?;
        }
        veth(
            node,
            NODE_GEN_IF,
            NODE_GEN_MAC,
            &[NODE_ADDR],
            &self.gen_ns,
            GEN_MAC,
            &[GEN_ADDR],
        )?;
        // The generator's clients use the widest port range: the TCP test
        // opens tens of thousands of connections.
        self.gen_ns
            .sysctl("net/ipv4/ip_local_port_range", "1024 65000")?;
        node.ip(&[
            "route",
            "add",
            &format!("{NEW_FLOW_SOURCES}/17"),
            "via",
            &GEN_ADDR.to_string(),
        ])?;
        neighbour(node, GEN_ADDR, GEN_MAC, NODE_GEN_IF)?;
        for (slot, backend) in self.backends.iter().enumerate() {
            let index = slot as u8 + 1;
            let node_if = node_backend_if(index);
            let pods: Vec<Ipv4Addr> = (0..PODS_PER_BACKEND)
                .map(|pod| Ipv4Addr::new(198, 18, index, 2 + pod))
                .collect();
            veth(
                node,
                &node_if,
                node_backend_mac(index),
                &[Ipv4Addr::new(198, 18, index, 1)],
                backend,
                backend_mac(index),
                &pods,
            )?;
            for pod in &pods {
                neighbour(node, *pod, backend_mac(index), &node_if)?;
            }
            // The TCP test accepts tens of thousands of short connections.
            backend.sysctl("net/ipv4/tcp_tw_reuse", "1")?;
            backend.sysctl("net/core/somaxconn", "8192")?;
            backend.sysctl("net/ipv4/tcp_max_syn_backlog", "8192")?;
        }
        node.ip(&["route", "add", "198.19.0.0/16", "via", "198.18.1.2"])?;
        generator_ingress(node)
    }
}

/// A veth pair `a_if` (in `a`) <-> `eth0` (in `b`) with fixed MACs and
/// addresses; `b` routes everything via `a`'s first address. The pod end
/// gets GRO (so redirected frames land even before its XDP sink is
/// attached) and no TX checksum offload (so what it sends is complete).
pub(super) fn veth(
    a: &Netns,
    a_if: &str,
    a_mac: [u8; 6],
    a_addrs: &[Ipv4Addr],
    b: &Netns,
    b_mac: [u8; 6],
    b_addrs: &[Ipv4Addr],
) -> anyhow::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "address",
        &mac_str(a_mac),
        "type",
        "veth",
        "peer",
        "name",
        POD_IF,
        "address",
        &mac_str(b_mac),
        "netns",
        b.name(),
    ])?;
    for addr in a_addrs {
        a.ip(&["addr", "add", &format!("{addr}/24"), "dev", a_if])?;
    }
    for addr in b_addrs {
        b.ip(&["addr", "add", &format!("{addr}/24"), "dev", POD_IF])?;
    }
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", POD_IF, "up"])?;
    b.ip(&["route", "add", "default", "via", &a_addrs[0].to_string()])?;
    b.exec("ethtool", &["-K", POD_IF, "gro", "on", "tx", "off"])?;
    Ok(())
}

/// LAB-NOTES 4 and 5: GRO gives the node's ingress veth NAPI, so XDP_TX
/// frames from the generator are delivered even with no XDP program on the
/// node, and threaded NAPI moves the node's work off the generator's CPU.
pub(super) fn generator_ingress(node: &Netns) -> anyhow::Result<()> {
    node.exec("ethtool", &["-K", NODE_GEN_IF, "gro", "on"])?;
    node.exec(
        "sh",
        &[
            "-c",
            &format!("echo 1 > /sys/class/net/{NODE_GEN_IF}/threaded"),
        ],
    )?;
    Ok(())
}

pub(super) fn neighbour(ns: &Netns, addr: Ipv4Addr, mac: [u8; 6], dev: &str) -> anyhow::Result<()> {
    ns.neighbour(addr, mac, dev)?;
    Ok(())
}

/// The ifindex of `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name)?;
    // SAFETY: `c_name` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    anyhow::ensure!(index != 0, "no interface {name} in this namespace");
    Ok(index)
}

/// Spawn a thread that first enters network namespace `ns` (by name), so
/// sockets it makes live there; for long-running servers and clients
/// (`Netns::run` joins before returning).
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
    let path = Path::new(xlb_tests::netns::NETNS_DIR).join(ns);
    let handle = std::fs::File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    let ns = ns.to_owned();
    Ok(std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            enter(&handle, &ns)?;
            Ok(f())
        })?)
}

/// `setns(CLONE_NEWNET)` for the calling thread.
pub fn enter(handle: &std::fs::File, ns: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setns on an open namespace fd changes only this thread.
    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering network namespace {ns}"));
    }
    Ok(())
}

/// Open namespace `ns`'s handle (for [`enter`] from a scoped thread).
pub fn open_ns(ns: &str) -> anyhow::Result<std::fs::File> {
    let path = Path::new(xlb_tests::netns::NETNS_DIR).join(ns);
    std::fs::File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))
}
