//! The real-node paths of `cargo xtask bench`: NodePort traffic from the
//! uplink to pods as CNIs leave them (README "The real-node lab"), through
//! xlb and through kube-proxy's iptables rules, side by side.
//!
//! ```text
//!  gen ns              node ns (ip_forward=1)                      pods (kernel defaults)
//!  eth0 198.18.0.2 --- xb-g 198.18.0.1 (uplink)
//!                      cni0 198.18.10.1/24 -- xb-p1 -------------- local: eth0 198.18.10.2
//!                      xb-n2 198.18.2.1/24 (uplink to node2) ----- node2 ns: eth0 198.18.2.2
//!                      xb-vx 198.18.30.1/24 (VXLAN 42 over xb-n2)    br20 198.18.20.1/24 -- routed: eth0 198.18.20.2
//!                      198.18.20.0/24 via 198.18.2.2                 br21 198.18.21.1/24 -- vxlan: eth0 198.18.21.2
//!                      198.18.21.0/24 via 198.18.30.3 dev xb-vx      xb-vx 198.18.30.3/24 (VXLAN 42)
//! ```
//!
//! The generator and node2 each have a link of their own to the node (the
//! bench's veths are point to point, so node2 sits behind a second uplink
//! rather than on the client's switch). Both uplinks are NIC stand-ins
//! (GRO on, LAB-NOTES 4); every pod end, both sides of every pod veth, the
//! bridges and the VXLAN devices keep the kernel's defaults. Datagrams are
//! counted where the pod's stack would take them: `xlb_bench_tc_sink` at
//! tc ingress of the pod's `eth0` (no XDP in the pod).
//!
//! What each path exercises in xlb: the local pod, XDP rewrite + tc
//! hand-off (`bpf_redirect_peer` into the pod); the remote routed pod, XDP
//! rewrite + `XDP_REDIRECT` to the second uplink (today's XDP path); the
//! remote VXLAN pod, XDP rewrite + tc hand-off into the VXLAN device.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use xlb_tests::{Netns, ScratchDir, netns::unique_stem};

use super::progs::{Flows, Generator, set_sink_ports, sink_count};
use super::report::{Figure, NodePath};
use super::services::{BenchConfig, FLOOD_TARGET_PORT, Protocol, Service, measured_service};
use super::topology::{
    self, BenchLab, GEN_ADDR, GEN_MAC, NODE_ADDR, NODE_GEN_IF, NODE_GEN_MAC, POD_IF,
};
use super::{Plan, Running, System, configure};

/// The node's second uplink, towards node2.
const NODE2_IF: &str = "xb-n2";
const NODE_NODE2_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const NODE2_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const VXLAN_IF: &str = "xb-vx";
const NODE_VXLAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 1);
const NODE2_VXLAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 30, 3);
/// Overlay MTU (flannel's for a 1500-byte uplink).
const VXLAN_MTU: u32 = 1450;

/// Where the pod behind a NodePort is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPath {
    /// On this node, on the bridge CNI (cni0).
    LocalBridge,
    /// On node2, routed via node2's uplink address.
    RemoteRouted,
    /// On node2, over the VXLAN overlay.
    RemoteVxlan,
}

impl PodPath {
    pub const ALL: [PodPath; 3] = [
        PodPath::LocalBridge,
        PodPath::RemoteRouted,
        PodPath::RemoteVxlan,
    ];

    /// The JSON key.
    pub fn key(self) -> &'static str {
        match self {
            PodPath::LocalBridge => "local_bridge_pod",
            PodPath::RemoteRouted => "remote_pod_routed",
            PodPath::RemoteVxlan => "remote_pod_vxlan",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            PodPath::LocalBridge => "uplink -> local pod (bridge CNI)",
            PodPath::RemoteRouted => "uplink -> remote pod (routed)",
            PodPath::RemoteVxlan => "uplink -> remote pod (VXLAN)",
        }
    }

    /// How xlb's datapath sends this path's packets.
    pub fn xlb_hook(self) -> &'static str {
        match self {
            PodPath::LocalBridge => "XDP + tc hand-off (bpf_redirect_peer into the pod)",
            PodPath::RemoteRouted => "XDP_REDIRECT to the uplink",
            PodPath::RemoteVxlan => "XDP + tc hand-off (bpf_redirect_neigh to the VXLAN device)",
        }
    }

    fn index(self) -> usize {
        match self {
            PodPath::LocalBridge => 0,
            PodPath::RemoteRouted => 1,
            PodPath::RemoteVxlan => 2,
        }
    }

    fn node_port(self) -> u16 {
        31_010 + self.index() as u16
    }

    fn pod_addr(self) -> Ipv4Addr {
        match self {
            PodPath::LocalBridge => Ipv4Addr::new(198, 18, 10, 2),
            PodPath::RemoteRouted => Ipv4Addr::new(198, 18, 20, 2),
            PodPath::RemoteVxlan => Ipv4Addr::new(198, 18, 21, 2),
        }
    }
}

/// One NodePort Service per path, each with its one pod as backend; xlb's
/// uplinks are the generator's link and node2's.
pub fn config(udp_timeout_s: Option<u32>) -> BenchConfig {
    let services: Vec<Service> = PodPath::ALL
        .iter()
        .map(|path| Service {
            backends: vec![SocketAddrV4::new(path.pod_addr(), FLOOD_TARGET_PORT)],
            ..measured_service(
                10 + path.index(),
                &path.key().replace('_', "-"),
                Protocol::Udp,
                path.node_port(),
                FLOOD_TARGET_PORT,
            )
        })
        .collect();
    BenchConfig {
        services,
        table_size: None,
        udp_timeout_s,
        node_addr: NODE_ADDR,
        interfaces: vec![NODE_GEN_IF.to_owned(), NODE2_IF.to_owned()],
    }
}

/// Builds the lab above. `real_node` holds node2, then the pods in
/// [`PodPath::ALL`] order.
fn build() -> anyhow::Result<BenchLab> {
    let stem = unique_stem();
    let dir = ScratchDir::create(&stem)?;
    let node = Netns::create(format!("{stem}-node"))?;
    let gen_ns = Netns::create(format!("{stem}-gen"))?;
    let mut real_node = vec![Netns::create(format!("{stem}-node2"))?];
    for path in PodPath::ALL {
        real_node.push(Netns::create(format!("{stem}-pod{}", path.index()))?);
    }
    let lab = BenchLab {
        gen_ns,
        node,
        backends: Vec::new(),
        real_node,
        dir,
    };
    wire(&lab).context("wiring the real-node bench lab")?;
    Ok(lab)
}

fn pod_ns(lab: &BenchLab, path: PodPath) -> &Netns {
    &lab.real_node[1 + path.index()]
}

fn wire(lab: &BenchLab) -> anyhow::Result<()> {
    wire_uplinks(lab)?;
    wire_pods(lab)?;
    wire_overlay(lab)
}

/// Forwarding on, and the uplinks: NIC stand-ins, set up as the bench
/// lab's.
fn wire_uplinks(lab: &BenchLab) -> anyhow::Result<()> {
    let node = &lab.node;
    let node2 = &lab.real_node[0];
    for netns in [node, node2] {
        for key in [
            "net/ipv4/ip_forward",
            "net/ipv4/conf/all/rp_filter",
            "net/ipv4/conf/default/rp_filter",
        ] {
            netns.sysctl(key, if key.ends_with("forward") { "1" } else { "0" })?;
        }
    }
    topology::veth(
        node,
        NODE_GEN_IF,
        NODE_GEN_MAC,
        &[NODE_ADDR],
        &lab.gen_ns,
        GEN_MAC,
        &[GEN_ADDR],
    )?;
    topology::neighbour(node, GEN_ADDR, GEN_MAC, NODE_GEN_IF)?;
    topology::veth(
        node,
        NODE2_IF,
        topology::node_backend_mac(2),
        &[NODE_NODE2_ADDR],
        node2,
        topology::backend_mac(2),
        &[NODE2_ADDR],
    )?;
    topology::neighbour(node, NODE2_ADDR, topology::backend_mac(2), NODE2_IF)?;
    topology::generator_ingress(node)
}

/// The node's bridge CNI and its pod; node2's pod networks, one reached
/// routed, one over the overlay.
fn wire_pods(lab: &BenchLab) -> anyhow::Result<()> {
    let node = &lab.node;
    let node2 = &lab.real_node[0];
    node.ip_line("link add cni0 type bridge")?;
    node.ip_line("addr add 198.18.10.1/24 dev cni0")?;
    node.ip_line("link set cni0 up")?;
    pod(lab, PodPath::LocalBridge, node, "xb-p1", "cni0", None)?;

    for (bridge, gateway, mtu) in [
        ("br20", "198.18.20.1/24", None),
        ("br21", "198.18.21.1/24", Some(VXLAN_MTU)),
    ] {
        node2.ip_line(&format!("link add {bridge} type bridge"))?;
        node2.ip_line(&format!("addr add {gateway} dev {bridge}"))?;
        if let Some(mtu) = mtu {
            node2.ip_line(&format!("link set {bridge} mtu {mtu}"))?;
        }
        node2.ip_line(&format!("link set {bridge} up"))?;
    }
    pod(lab, PodPath::RemoteRouted, node2, "n2-p1", "br20", None)?;
    pod(
        lab,
        PodPath::RemoteVxlan,
        node2,
        "n2-p2",
        "br21",
        Some(VXLAN_MTU),
    )?;
    node.ip_line(&format!(
        "route add 198.18.20.0/24 via {NODE2_ADDR} dev {NODE2_IF}"
    ))?;
    Ok(())
}

/// A flannel-like overlay over the second uplink.
fn wire_overlay(lab: &BenchLab) -> anyhow::Result<()> {
    let node = &lab.node;
    let node2 = &lab.real_node[0];
    for (netns, local, remote, dev, addr) in [
        (node, NODE_NODE2_ADDR, NODE2_ADDR, NODE2_IF, NODE_VXLAN_ADDR),
        (node2, NODE2_ADDR, NODE_NODE2_ADDR, POD_IF, NODE2_VXLAN_ADDR),
    ] {
        netns.ip_line(&format!(
            "link add {VXLAN_IF} type vxlan id 42 local {local} dev {dev} dstport 4789"
        ))?;
        netns.ip_line(&format!("link set {VXLAN_IF} mtu {VXLAN_MTU}"))?;
        netns.ip_line(&format!("addr add {addr}/24 dev {VXLAN_IF}"))?;
        netns.ip_line(&format!("link set {VXLAN_IF} up"))?;
        netns.exec(
            "bridge",
            &[
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                VXLAN_IF,
                "dst",
                &remote.to_string(),
            ],
        )?;
    }
    node.ip_line(&format!(
        "route add 198.18.21.0/24 via {NODE2_VXLAN_ADDR} dev {VXLAN_IF}"
    ))?;
    Ok(())
}

/// A pod as a bridge CNI makes it: a veth whose host side `host_if` is on
/// `bridge` in `host`, the pod's end at the kernel's defaults.
fn pod(
    lab: &BenchLab,
    path: PodPath,
    host: &Netns,
    host_if: &str,
    bridge: &str,
    mtu: Option<u32>,
) -> anyhow::Result<()> {
    let pod = pod_ns(lab, path);
    host.ip_line(&format!(
        "link add {host_if} type veth peer name {POD_IF} netns {}",
        pod.name()
    ))?;
    if let Some(mtu) = mtu {
        host.ip_line(&format!("link set {host_if} mtu {mtu}"))?;
        pod.ip_line(&format!("link set {POD_IF} mtu {mtu}"))?;
    }
    host.ip_line(&format!("link set {host_if} master {bridge}"))?;
    host.ip_line(&format!("link set {host_if} up"))?;
    let addr = path.pod_addr();
    pod.ip_line(&format!("addr add {addr}/24 dev {POD_IF}"))?;
    pod.ip_line(&format!("link set {POD_IF} up"))?;
    let octets = addr.octets();
    pod.ip_line(&format!(
        "route add default via {}.{}.{}.1",
        octets[0], octets[1], octets[2]
    ))?;
    Ok(())
}

/// `xlb_bench_tc_sink` at tc ingress of one pod's `eth0`: counts and drops
/// the flood's datagrams where the pod's stack would take them.
struct TcSink {
    ebpf: Ebpf,
}

impl TcSink {
    fn attach(pod: &Netns) -> anyhow::Result<TcSink> {
        let mut ebpf = load_sink_object([FLOOD_TARGET_PORT, 0])?;
        let program: &mut SchedClassifier = ebpf
            .program_mut("xlb_bench_tc_sink")
            .ok_or_else(|| anyhow!("xlb_bench_tc_sink missing from its object"))?
            .try_into()?;
        program
            .load()
            .context("the verifier rejected xlb_bench_tc_sink")?;
        pod.run(|| -> anyhow::Result<()> {
            if let Err(tcx) = program.attach(POD_IF, TcAttachType::Ingress) {
                // Before tcx (6.6): a clsact qdisc's filter.
                let _ = aya::programs::tc::qdisc_add_clsact(POD_IF);
                program
                    .attach_with_options(
                        POD_IF,
                        TcAttachType::Ingress,
                        aya::programs::tc::TcAttachOptions::Netlink(Default::default()),
                    )
                    .map_err(|_| tcx)?;
            }
            Ok(())
        })?
        .with_context(|| format!("attaching the tc sink in {}", pod.name()))?;
        Ok(TcSink { ebpf })
    }

    fn count(&self) -> anyhow::Result<u64> {
        sink_count(&self.ebpf)
    }
}

/// VXLAN's UDP port: the overlay's datagrams arriving at node2.
const VXLAN_PORT: u16 = 4789;

/// `xlb_bench_sink` (XDP) on node2's uplink, a NIC stand-in: disarmed it
/// passes everything on to node2's pods; armed it counts and drops the
/// flood (routed, or inside VXLAN) as it arrives at node2, where the bench
/// lab's backends count it: the node's own cost, without node2 forwarding
/// to its pods on the same two CPUs.
struct Node2Sink {
    ebpf: Ebpf,
}

impl Node2Sink {
    fn attach(node2: &Netns) -> anyhow::Result<Node2Sink> {
        let mut ebpf = load_sink_object([0, 0])?;
        let program: &mut Xdp = ebpf
            .program_mut("xlb_bench_sink")
            .ok_or_else(|| anyhow!("xlb_bench_sink missing from its object"))?
            .try_into()?;
        program
            .load()
            .context("the verifier rejected xlb_bench_sink")?;
        node2
            .run(|| program.attach(POD_IF, XdpMode::Driver).map(drop))?
            .context("attaching the XDP sink on node2's uplink")?;
        Ok(Node2Sink { ebpf })
    }

    fn arm(&mut self, armed: bool) -> anyhow::Result<()> {
        let ports = if armed {
            [FLOOD_TARGET_PORT, VXLAN_PORT]
        } else {
            [0, 0]
        };
        set_sink_ports(&mut self.ebpf, ports)
    }

    fn count(&self) -> anyhow::Result<u64> {
        sink_count(&self.ebpf)
    }
}

fn load_sink_object(ports: [u16; 2]) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .load(crate::TRAFFICGEN_OBJECT)
        .context("loading the trafficgen object")?;
    set_sink_ports(&mut ebpf, ports)?;
    Ok(ebpf)
}

/// Where a window counts the flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CountAt {
    /// At the pod (tc ingress of its eth0).
    Pod,
    /// As it arrives at node2 (remote pods only).
    Node2,
}

/// One system on a real-node lab of its own.
struct PathBench {
    system: System,
    // Drop order: the system, the programs, then the lab.
    running: Running,
    generator: Generator,
    sinks: Vec<TcSink>,
    at_node2: Node2Sink,
    lab: BenchLab,
}

impl PathBench {
    fn new(system: System, config: &BenchConfig) -> anyhow::Result<PathBench> {
        let lab = build()?;
        let sinks = PodPath::ALL
            .iter()
            .map(|path| TcSink::attach(pod_ns(&lab, *path)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let at_node2 = Node2Sink::attach(&lab.real_node[0])?;
        let generator = Generator::load(&lab)?;
        let (running, _) = configure(system, &lab, config)?;
        Ok(PathBench {
            system,
            running,
            generator,
            sinks,
            at_node2,
            lab,
        })
    }

    fn measure(&mut self, path: PodPath, at: CountAt, plan: Plan) -> anyhow::Result<f64> {
        self.at_node2.arm(at == CountAt::Node2)?;
        let (sink, at_node2) = (&self.sinks[path.index()], &self.at_node2);
        let window = self.generator.measure(
            path.node_port(),
            Flows::Cycle(1),
            plan.warmup,
            plan.window,
            &|| match at {
                CountAt::Pod => sink.count(),
                CountAt::Node2 => at_node2.count(),
            },
            None,
            None,
        );
        self.at_node2.arm(false)?;
        let window = window?;
        // Whether the generator or the path is the bound.
        eprintln!(
            "xlb-bench:   offered {:.1}k pps, delivered {:.1}k pps",
            window.offered_pps / 1e3,
            window.delivered_pps / 1e3
        );
        Ok(window.delivered_pps)
    }

    /// Stops the agent (if xlb): its packet counters.
    fn finish(self) -> Option<String> {
        let PathBench { running, lab, .. } = self;
        let counters = match running {
            Running::Xlb(agent) => Some(agent.stop()).filter(|c| !c.is_empty()),
            _ => None,
        };
        drop(lab);
        counters
    }
}

/// The systems the real-node paths are measured for: xlb and kube-proxy's
/// iptables rules, where the run measures them at all.
pub fn systems(requested: &[System]) -> Vec<System> {
    [System::Xlb, System::Iptables]
        .into_iter()
        .filter(|system| requested.contains(system))
        .collect()
}

/// Every path for every system, each system on a fresh lab, measured path
/// by path and system by system (as the headline), one flow each.
/// Per bench: (path, where counted) -> samples.
type Samples = Vec<((PodPath, CountAt), Vec<f64>)>;

pub fn run(
    systems: &[System],
    plan: Plan,
    udp_timeout_s: Option<u32>,
) -> (Vec<NodePath>, Vec<String>, bool) {
    let config = config(udp_timeout_s);
    let mut failed = false;
    let mut rows: Vec<NodePath> = PodPath::ALL
        .iter()
        .map(|path| NodePath::new(path.key(), path.describe(), path.xlb_hook()))
        .collect();
    let mut notes = Vec::new();
    let windows: Vec<(PodPath, CountAt)> = PodPath::ALL
        .iter()
        .map(|path| (*path, CountAt::Pod))
        .chain(
            PodPath::ALL
                .iter()
                .filter(|path| **path != PodPath::LocalBridge)
                .map(|path| (*path, CountAt::Node2)),
        )
        .collect();
    let mut benches: Vec<Option<(PathBench, Samples)>> = Vec::new();
    for &system in systems {
        eprintln!(
            "xlb-bench: real-node paths: setting up {} ...",
            system.name()
        );
        match PathBench::new(system, &config) {
            Ok(bench) => benches.push(Some((
                bench,
                windows.iter().map(|window| (*window, Vec::new())).collect(),
            ))),
            Err(error) => {
                failed = true;
                eprintln!(
                    "xlb-bench: real-node paths, {} failed: {error:#}",
                    system.name()
                );
                for row in &mut rows {
                    row.errors
                        .insert(system.name().to_owned(), format!("{error:#}"));
                }
                benches.push(None);
            }
        }
    }
    super::process::pin_node_napi_threads();
    failed |= measure_all(&mut benches, &windows, &mut rows, plan);
    for (bench, samples) in benches.into_iter().flatten() {
        let name = bench.system.name();
        for ((path, at), values) in samples {
            let row = &mut rows[path.index()];
            let figures = match at {
                CountAt::Pod => &mut row.pps,
                CountAt::Node2 => &mut row.at_node2_pps,
            };
            figures.insert(name.to_owned(), Figure::of(values));
        }
        if let Some(counters) = bench.finish() {
            notes.push(format!("{name}: agent counters: {counters}"));
        }
    }
    (rows, notes, failed)
}

/// Window by window, system by system; a system that fails leaves the run
/// (its error on every row).
fn measure_all(
    benches: &mut [Option<(PathBench, Samples)>],
    windows: &[(PodPath, CountAt)],
    rows: &mut [NodePath],
    plan: Plan,
) -> bool {
    let mut failed = false;
    for _ in 0..plan.repeats {
        for (slot, &(path, at)) in windows.iter().enumerate() {
            for entry in benches.iter_mut() {
                let Some((bench, samples)) = entry else {
                    continue;
                };
                let name = bench.system.name();
                eprintln!(
                    "xlb-bench: real-node paths, {name} {}, counted at {at:?} ...",
                    path.describe()
                );
                match bench.measure(path, at, plan) {
                    Ok(pps) => samples[slot].1.push(pps),
                    Err(error) => {
                        failed = true;
                        eprintln!("xlb-bench: real-node paths, {name} failed: {error:#}");
                        for row in rows.iter_mut() {
                            row.errors.insert(name.to_owned(), format!("{error:#}"));
                        }
                        *entry = None;
                    }
                }
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_service_per_path_with_its_pod() {
        let config = config(Some(1));
        assert_eq!(config.services.len(), PodPath::ALL.len());
        for (service, path) in config.services.iter().zip(PodPath::ALL) {
            assert_eq!(service.node_port, path.node_port());
            assert_eq!(
                service.backends,
                vec![SocketAddrV4::new(path.pod_addr(), FLOOD_TARGET_PORT)]
            );
        }
        let yaml = config.xlb_yaml();
        assert!(yaml.contains("interfaces: [xb-g, xb-n2]"), "{yaml}");
    }
}
