//! IPv6 beside IPv4 (`xlb-bench lab`'s family part): the UDP flood through
//! xlb, through kube-proxy's rules (iptables for IPv4, ip6tables for
//! IPv6) and through the stateless limit, each system on one dual-stack
//! lab, both families measured on it in turn: 1 flow, 60k flows and new
//! flows, so IPv6's cost over IPv4 is a ratio of figures taken seconds
//! apart on the same lab. IPv6 frames are 4 bytes longer on the wire and
//! the generator and the veths move them too, so each family is also
//! measured against the limit in its own family.
//!
//! ```text
//!  gen ns                  node ns                       bN ns
//!  eth0 2001:db8::2 ------ xb-g  2001:db8::1/64
//!                          xb-bN 2001:db8:N::1/64 ------ eth0 2001:db8:N::2-6
//! ```
//!
//! New-flow sources are 2001:db8:ff::/96 (routed back via the generator).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv6Addr;

use anyhow::Context as _;
use xlb_bench_ebpf::GenConfig;
use xlb_bench_ebpf::template::{Sources, Template6};

use super::progs::{Flows, Generator, Sink, Window, gen_config};
use super::report::Figure;
use super::services::{BenchConfig, FLOOD_NODE_PORT, FLOOD_TARGET_PORT};
use super::topology::{
    self, BACKEND_NAMESPACES, BenchLab, GEN_MAC, NODE_GEN_IF, NODE_GEN_MAC, POD_IF,
    PODS_PER_BACKEND,
};
use super::{Plan, Running, System, agent, configure, kernel_udp_timeout, runtime};

mod table;
pub use table::table;

/// The node's IPv6 address on the generator link: the flood's NodePort.
pub const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The generator's IPv6 address (`::2`: the 60k flows' source).
pub const GEN_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// The first 96 bits of the new-flow sources, 2001:db8:ff::/96.
const NEW_FLOW_PREFIX6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0);
/// Flows in the "60k flows" test, as the headline's.
const MANY_FLOWS: u32 = 60_000;

/// Backend namespace `index`'s pod `pod` (0-based): 2001:db8:N::(2 + pod).
fn pod_addr6(index: u8, pod: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        u16::from(index),
        0,
        0,
        0,
        0,
        2 + u16::from(pod),
    )
}

/// The measured families' tests, in order.
pub(crate) const TESTS: [(&str, Flows); 3] = [
    ("udp_pps_1_flow", Flows::Cycle(1)),
    ("udp_pps_60k_flows", Flows::Cycle(MANY_FLOWS)),
    ("new_flows_per_s", Flows::New),
];

/// One system's figures by family.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FamilyFigures {
    pub system: String,
    /// test -> IPv4 packets/s delivered.
    pub ipv4: BTreeMap<String, Figure>,
    /// test -> IPv6 packets/s delivered.
    pub ipv6: BTreeMap<String, Figure>,
    /// test -> the system's BPF ns per delivered packet (IPv4, IPv6):
    /// medians of the repeats, where it has programs.
    pub bpf_ns: BTreeMap<String, (f64, f64)>,
    /// test -> packets/s the generator offered (IPv4, IPv6): medians.
    pub offered: BTreeMap<String, (f64, f64)>,
    pub error: Option<String>,
    pub notes: Vec<String>,
}

/// The generator's IPv6 frames to `dst_port`: one flow from GEN_ADDR6, or a
/// new tuple every frame from 2001:db8:ff::/96.
fn gen_config6(dst_port: u16, flows: Flows) -> GenConfig {
    let (prefix, addr_base, flows) = match flows {
        Flows::Cycle(count) => (GEN_ADDR6, last_32(GEN_ADDR6), count),
        Flows::New => (NEW_FLOW_PREFIX6, 0, 0),
    };
    let mut src_prefix = [0u8; 12];
    src_prefix.copy_from_slice(&prefix.octets()[..12]);
    let template = Template6 {
        dst_mac: NODE_GEN_MAC,
        src_mac: GEN_MAC,
        src_prefix,
        dst_addr: NODE_ADDR6.octets(),
        dst_port,
    };
    template.config(Sources {
        addr_base,
        flows,
        port_base: 1024,
        port_span: 64_000,
    })
}

fn last_32(address: Ipv6Addr) -> u32 {
    let octets = address.octets();
    u32::from_be_bytes([octets[12], octets[13], octets[14], octets[15]])
}

/// IPv6 on the bench lab's links: addresses, forwarding, permanent
/// neighbours (as IPv4's), the new-flow sources' route.
fn wire6(lab: &BenchLab) -> anyhow::Result<()> {
    let node = &lab.node;
    node.sysctl("net/ipv6/conf/all/forwarding", "1")?;
    xlb_tests::lab::enable_ipv6(node, NODE_GEN_IF, NODE_ADDR6, 64)?;
    xlb_tests::lab::enable_ipv6(&lab.gen_ns, POD_IF, GEN_ADDR6, 64)?;
    lab.gen_ns
        .ip_line(&format!("-6 route add default via {NODE_ADDR6}"))?;
    neighbour6(node, GEN_ADDR6, GEN_MAC, NODE_GEN_IF)?;
    neighbour6(&lab.gen_ns, NODE_ADDR6, NODE_GEN_MAC, POD_IF)?;
    node.ip_line(&format!(
        "-6 route add {NEW_FLOW_PREFIX6}/96 via {GEN_ADDR6} dev {NODE_GEN_IF}"
    ))?;
    for (slot, backend) in lab.backends.iter().enumerate() {
        let index = slot as u8 + 1;
        let node_if = topology::node_backend_if(index);
        let gateway = Ipv6Addr::new(0x2001, 0xdb8, u16::from(index), 0, 0, 0, 0, 1);
        xlb_tests::lab::enable_ipv6(node, &node_if, gateway, 64)?;
        xlb_tests::lab::enable_ipv6(backend, POD_IF, pod_addr6(index, 0), 64)?;
        for pod in 1..PODS_PER_BACKEND {
            let address = pod_addr6(index, pod);
            backend.ip_line(&format!("-6 addr add {address}/64 dev {POD_IF} nodad"))?;
        }
        backend.ip_line(&format!("-6 route add default via {gateway}"))?;
        neighbour6(backend, gateway, topology::node_backend_mac(index), POD_IF)?;
        for pod in 0..PODS_PER_BACKEND {
            let mac = topology::backend_mac(index);
            neighbour6(node, pod_addr6(index, pod), mac, &node_if)?;
        }
    }
    Ok(())
}

fn neighbour6(
    ns: &xlb_tests::Netns,
    address: Ipv6Addr,
    mac: [u8; 6],
    dev: &str,
) -> anyhow::Result<()> {
    let mac = topology::mac_str(mac);
    ns.ip_line(&format!(
        "-6 neigh replace {address} lladdr {mac} dev {dev} nud permanent"
    ))?;
    Ok(())
}

/// The flood service's pods, each by its IPv6 address too (`::2 + k` for
/// 198.18.N.(2 + k)), on the target port.
fn flood_pods6() -> Vec<Ipv6Addr> {
    (1..=BACKEND_NAMESPACES)
        .flat_map(|index| (0..PODS_PER_BACKEND).map(move |pod| pod_addr6(index, pod)))
        .collect()
}

/// xlb's config: the headline's services, the flood service dual-stack
/// (its pods by both addresses), NodePorts on both node addresses.
fn xlb_yaml(config: &BenchConfig) -> String {
    let yaml = config.xlb_yaml().replacen(
        &format!("  addresses: [{}]\n", config.node_addr),
        &format!("  addresses: [{}, {NODE_ADDR6}]\n", config.node_addr),
        1,
    );
    let flood = format!("    nodePort: {FLOOD_NODE_PORT}\n    backends:\n");
    let mut pods = flood.clone();
    for pod in flood_pods6() {
        let _ = writeln!(
            pods,
            "      - {{address: {pod}, port: {FLOOD_TARGET_PORT}}}"
        );
    }
    yaml.replacen(&flood, &pods, 1)
}

/// kube-proxy's ip6tables rules for the flood service, as its IPv6
/// proxier writes them: the filter table's fixed chains (as IPv4's), and
/// the nat chains (NodePort -> masquerade mark -> one endpoint chain per
/// pod, picked at random -> DNAT), as `ip6tables-restore` reads them.
pub(super) fn ip6tables_restore() -> String {
    let pods = flood_pods6();
    let svc = "KUBE-SVC-BENCHFLOOD6";
    let ext = "KUBE-EXT-BENCHFLOOD6";
    let mut chains = format!(":{svc} - [0:0]\n:{ext} - [0:0]\n");
    let mut rules = format!(
        "-A KUBE-NODEPORTS -m comment --comment default/flood -m udp -p udp --dport {FLOOD_NODE_PORT} -j {ext}\n\
         -A {ext} -m comment --comment \"masquerade traffic for default/flood external destinations\" -j KUBE-MARK-MASQ\n\
         -A {ext} -j {svc}\n"
    );
    for (index, pod) in pods.iter().enumerate() {
        let sep = format!("KUBE-SEP-BENCHFLOOD6{index:02}");
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let remaining = pods.len() - index;
        if remaining > 1 {
            let _ = writeln!(
                rules,
                "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}",
                1.0 / remaining as f64
            );
        } else {
            let _ = writeln!(rules, "-A {svc} -j {sep}");
        }
        let _ = writeln!(
            rules,
            "-A {sep} -s {pod}/128 -j KUBE-MARK-MASQ\n-A {sep} -m udp -p udp -j DNAT --to-destination [{pod}]:{FLOOD_TARGET_PORT}"
        );
    }
    let filter = super::kubeproxy::filter_table6();
    format!(
        "{filter}*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SERVICES - [0:0]\n\
         {chains}\
         -A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n\
         -A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         {rules}COMMIT\n"
    )
}

/// A system on its dual-stack lab.
struct DualBench {
    system: System,
    // Drop order: the system, the generator and sink, then the lab.
    running: Running,
    generator: Generator,
    sink: Sink,
    /// The system's BPF programs, for their run time per window.
    programs: runtime::Programs,
    lab: BenchLab,
}

impl DualBench {
    fn new(system: System, config: &BenchConfig) -> anyhow::Result<DualBench> {
        let lab = BenchLab::build()?;
        wire6(&lab).context("wiring IPv6")?;
        let sink = Sink::attach(&lab, [FLOOD_TARGET_PORT, FLOOD_NODE_PORT])?;
        let generator = Generator::load(&lab)?;
        let newest = runtime::newest_id()?;
        let running = match system {
            System::Xlb => Running::Xlb(agent::Agent::start(&lab, &xlb_yaml(config))?),
            // The limit forwards both families' frames alike.
            System::Limit => configure(System::Limit, &lab, config)?.0,
            System::Iptables => {
                let (running, _) = configure(System::Iptables, &lab, config)?;
                let path = lab.dir().join("ip6tables.rules");
                std::fs::write(&path, ip6tables_restore())?;
                lab.node
                    .exec("ip6tables-restore", &[&path.to_string_lossy()])
                    .context("loading the kube-proxy ip6tables rules")?;
                kernel_udp_timeout(&lab, config)?;
                running
            }
            other => anyhow::bail!("{} has no IPv6 part", other.name()),
        };
        let programs = runtime::Programs::loaded_since(newest, runtime::programs_of(system))?;
        Ok(DualBench {
            system,
            running,
            generator,
            sink,
            programs,
            lab,
        })
    }

    /// One window of `flows` in one family: delivered packets/s, for xlb
    /// the flows it created (an established window should create none),
    /// the BPF run time.
    fn udp(&mut self, ipv6: bool, flows: Flows, plan: Plan) -> anyhow::Result<Window> {
        let cfg = if ipv6 {
            gen_config6(FLOOD_NODE_PORT, flows)
        } else {
            gen_config(FLOOD_NODE_PORT, flows)
        };
        let datapath = match &self.running {
            Running::Xlb(agent) => Some(agent.datapath(&self.lab)?),
            _ => None,
        };
        let new_flows = datapath
            .as_ref()
            .map(|datapath| move || agent::new_flows(datapath));
        let sink = &self.sink;
        let programs = &self.programs;
        let bpf = (!programs.is_empty()).then_some(move || programs.snapshot());
        self.generator.measure_frames(
            cfg,
            flows,
            (plan.warmup, plan.window),
            &|| sink.count(),
            new_flows
                .as_ref()
                .map(|count| count as &dyn Fn() -> anyhow::Result<u64>),
            bpf.as_ref()
                .map(|snapshot| snapshot as &dyn Fn() -> anyhow::Result<(u64, u64)>),
        )
    }
}

/// The IPv6 part: xlb, iptables/ip6tables and the limit (those of
/// `systems`), each on
/// a dual-stack lab, every test in both families, the order of systems and
/// families rotating with each repeat. Whether a measurement failed.
pub(super) fn run(
    systems: &[System],
    plan: Plan,
    udp_timeout_s: Option<u32>,
) -> (Vec<FamilyFigures>, bool) {
    let config = BenchConfig {
        udp_timeout_s,
        ..BenchConfig::headline()
    };
    let mut failed = false;
    let mut benches = Vec::new();
    let mut figures = Vec::new();
    for &system in systems
        .iter()
        .filter(|system| matches!(system, System::Xlb | System::Iptables | System::Limit))
    {
        eprintln!(
            "xlb-bench: setting up {} on a dual-stack lab ...",
            system.name()
        );
        let mut entry = FamilyFigures {
            system: family_name(system).to_owned(),
            ..FamilyFigures::default()
        };
        match DualBench::new(system, &config) {
            Ok(bench) => benches.push(Some(bench)),
            Err(error) => {
                failed = true;
                eprintln!(
                    "xlb-bench: {} (dual-stack) failed: {error:#}",
                    system.name()
                );
                entry.error = Some(format!("{error:#}"));
                benches.push(None);
            }
        }
        figures.push(entry);
    }
    super::process::pin_node_napi_threads();
    let (samples, created) = measure_all(&mut benches, &mut figures, plan, &mut failed);
    for ((entry, samples), created) in figures.iter_mut().zip(samples).zip(created) {
        for ((ipv6, test), windows) in &samples {
            let map = if *ipv6 {
                &mut entry.ipv6
            } else {
                &mut entry.ipv4
            };
            let delivered = windows.iter().map(|window| window.delivered_pps);
            map.insert((*test).to_owned(), Figure::of(delivered.collect()));
        }
        for (test, _) in TESTS {
            let both = |of: &dyn Fn(&Window) -> Option<f64>| {
                let median = |ipv6: bool| {
                    let values: Vec<f64> =
                        samples.get(&(ipv6, test))?.iter().filter_map(of).collect();
                    (!values.is_empty()).then(|| Figure::of(values).median)
                };
                median(false).zip(median(true))
            };
            if let Some(pair) = both(&|window| window.bpf.map(|bpf| bpf.ns_per_delivered)) {
                entry.bpf_ns.insert(test.to_owned(), pair);
            }
            if let Some(pair) = both(&|window| Some(window.offered_pps)) {
                entry.offered.insert(test.to_owned(), pair);
            }
        }
        failed |= !created.is_empty();
        entry.notes.extend(created);
    }
    for bench in benches.into_iter().flatten() {
        if let Running::Xlb(agent) = bench.running {
            let counters = agent.stop();
            if let Some(entry) = figures.iter_mut().find(|entry| entry.system == "xlb") {
                entry.notes.push(format!("agent counters: {counters}"));
            }
        }
    }
    (figures, failed)
}

/// What each bench's repeats measured, by (IPv6, test).
type Samples = BTreeMap<(bool, &'static str), Vec<Window>>;

/// Every test in both families on every bench, `plan.repeats` times in a
/// row, the order of systems and of families rotating; a bench that fails leaves
/// (its error in `figures`). Also each bench's established windows that
/// created flows.
fn measure_all(
    benches: &mut [Option<DualBench>],
    figures: &mut [FamilyFigures],
    plan: Plan,
    failed: &mut bool,
) -> (Vec<Samples>, Vec<Vec<String>>) {
    let mut samples: Vec<Samples> = vec![BTreeMap::new(); benches.len()];
    let mut created: Vec<Vec<String>> = vec![Vec::new(); benches.len()];
    // Every repeat of a test before the next, the flood last (as the
    // headline's, see `headline::HEADLINE`): after a flood, 60k-flow
    // windows ran at 0.4-0.7x a first repeat's, in either family.
    for (test, flows) in TESTS {
        if flows == Flows::New {
            fill_tables(benches, figures, plan, failed);
        }
        for repeat in 0..plan.repeats as usize {
            for turn in 0..benches.len() {
                let slot = (turn + repeat) % benches.len();
                let Some(bench) = benches[slot].as_mut() else {
                    continue;
                };
                let order = if (repeat + turn).is_multiple_of(2) {
                    [false, true]
                } else {
                    [true, false]
                };
                for ipv6 in order {
                    let family = if ipv6 { "IPv6" } else { "IPv4" };
                    eprintln!(
                        "xlb-bench: {} {family} {test} (repeat {}/{}) ...",
                        bench.system.name(),
                        repeat + 1,
                        plan.repeats
                    );
                    match bench.udp(ipv6, flows, plan) {
                        Ok(window) => {
                            samples[slot].entry((ipv6, test)).or_default().push(window);
                            if let (Flows::Cycle(count), Some(new)) = (flows, window.new_flows)
                                && new > u64::from(count) / 100
                            {
                                created[slot].push(format!(
                                    "{family} {test}: {new} flows created in an established window"
                                ));
                            }
                        }
                        Err(error) => {
                            *failed = true;
                            eprintln!("xlb-bench: {} failed: {error:#}", bench.system.name());
                            figures[slot].error = Some(format!("{error:#}"));
                            benches[slot] = None;
                            break;
                        }
                    }
                }
            }
        }
    }
    (samples, created)
}

/// A new-flow flood window per system and family, not measured, before
/// the first measured one: every measured window is then a flood into
/// full tables (see `headline::fill_tables`).
fn fill_tables(
    benches: &mut [Option<DualBench>],
    figures: &mut [FamilyFigures],
    plan: Plan,
    failed: &mut bool,
) {
    for (slot, entry) in benches.iter_mut().enumerate() {
        for ipv6 in [false, true] {
            let Some(bench) = entry.as_mut() else {
                continue;
            };
            eprintln!(
                "xlb-bench: {} {} new-flow flood to fill its tables (not measured) ...",
                bench.system.name(),
                if ipv6 { "IPv6" } else { "IPv4" }
            );
            if let Err(error) = bench.udp(ipv6, Flows::New, plan) {
                *failed = true;
                eprintln!("xlb-bench: {} failed: {error:#}", bench.system.name());
                figures[slot].error = Some(format!("{error:#}"));
                *entry = None;
            }
        }
    }
}

/// The row's name: the kube-proxy system is iptables for IPv4 and
/// ip6tables for IPv6.
fn family_name(system: System) -> &'static str {
    match system {
        System::Iptables => "ip(6)tables",
        other => other.name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    /// What the generator writes for frame `seq` of `cfg`, on the host, as
    /// `xlb_trafficgen` writes it (the library's offsets and fields).
    fn frame6(cfg: &GenConfig, seq: u64) -> Vec<u8> {
        use xlb_bench_ebpf::{FRAME6_LEN, SRC_ADDR6_AT, SRC_PORT6_AT, UDP_CSUM6_AT};
        let fields = cfg.fields(seq);
        let mut frame: Vec<u8> = cfg.frame.iter().flat_map(|w| w.to_ne_bytes()).collect();
        frame.truncate(FRAME6_LEN);
        frame[SRC_ADDR6_AT..SRC_ADDR6_AT + 4].copy_from_slice(&fields.src_addr.to_be_bytes());
        frame[SRC_PORT6_AT..SRC_PORT6_AT + 2].copy_from_slice(&fields.src_port.to_be_bytes());
        frame[UDP_CSUM6_AT..UDP_CSUM6_AT + 2].copy_from_slice(&fields.udp_csum.to_be_bytes());
        frame
    }

    /// The generated IPv6 frames parse, carry a correct UDP checksum, and
    /// walk the sources as `Flows` says.
    #[test]
    fn ipv6_frames_are_valid_udp_with_the_right_sources() {
        for (flows, seqs) in [
            (Flows::Cycle(1), vec![0, 1, 7]),
            (Flows::Cycle(MANY_FLOWS), vec![0, 1, 63_999, 64_000, 59_999]),
            (Flows::New, vec![0, 1, 64_000, 1 << 20]),
        ] {
            let cfg = gen_config6(FLOOD_NODE_PORT, flows);
            for seq in seqs {
                let frame = frame6(&cfg, seq);
                let packet = SlicedPacket::from_ethernet(&frame).expect("parses");
                let Some(NetSlice::Ipv6(ip)) = &packet.net else {
                    panic!("not IPv6: {packet:?}");
                };
                let Some(TransportSlice::Udp(udp)) = &packet.transport else {
                    panic!("not UDP: {packet:?}");
                };
                let header = ip.header();
                assert_eq!(header.destination_addr(), NODE_ADDR6);
                assert_eq!(udp.destination_port(), FLOOD_NODE_PORT);
                let source = header.source_addr();
                let fields = cfg.fields(seq);
                assert_eq!(last_32(source), fields.src_addr);
                assert_eq!(udp.source_port(), fields.src_port);
                let wanted = udp
                    .to_header()
                    .calc_checksum_ipv6(&header.to_header(), udp.payload())
                    .expect("checksum");
                assert_eq!(udp.checksum(), wanted, "seq {seq} of {flows:?}");
                match flows {
                    Flows::New => {
                        assert_eq!(source.octets()[..12], NEW_FLOW_PREFIX6.octets()[..12])
                    }
                    Flows::Cycle(_) => assert_eq!(source, GEN_ADDR6),
                }
            }
        }
    }

    /// Each lap of a cycle sends every flow once, and no two laps of the
    /// first thousand start at the same flow (a run of drops at one place
    /// of the cycle falls on other flows each lap).
    #[test]
    fn every_lap_sends_every_flow_once_from_another_start() {
        use xlb_bench_ebpf::lap_flow;
        for flows in [1u64, 2, 7, 60_000] {
            for lap in [0u64, 1, 2, 999] {
                let mut seen: Vec<u64> = (0..flows)
                    .map(|i| lap_flow(lap * flows + i, flows))
                    .collect();
                seen.sort_unstable();
                assert_eq!(
                    seen,
                    (0..flows).collect::<Vec<_>>(),
                    "{flows} flows, lap {lap}"
                );
            }
        }
        let starts: std::collections::BTreeSet<u64> = (0..1_000)
            .map(|lap| lap_flow(lap * 60_000, 60_000))
            .collect();
        assert_eq!(starts.len(), 1_000);
    }

    #[test]
    fn the_dual_stack_config_lists_the_flood_pods_by_both_addresses() {
        let config = BenchConfig::headline();
        let yaml = xlb_yaml(&config);
        assert!(yaml.contains(&format!("addresses: [{}, 2001:db8::1]", config.node_addr)));
        assert!(
            yaml.contains("{address: 2001:db8:1::2, port: 9000}"),
            "{yaml}"
        );
        assert!(
            yaml.contains("{address: 2001:db8:2::6, port: 9000}"),
            "{yaml}"
        );
        let rules = ip6tables_restore();
        assert!(
            rules.contains("--to-destination [2001:db8:2::6]:9000"),
            "{rules}"
        );
        assert_eq!(rules.matches("-j DNAT").count(), flood_pods6().len());
    }
}
