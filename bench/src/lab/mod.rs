//! `xlb-bench lab` (`cargo xtask bench`): the same NodePort traffic through
//! five systems on a veth/netns lab, measured in one run.
//!
//! - **limit**: a trivial XDP program that rewrites MACs and redirects (the
//!   ceiling for any XDP forwarder on this path),
//! - **xlb**: the real agent (`xlb run --config`) with its maps and conntrack,
//! - **iptables** / **nftables**: the rules kube-proxy writes in either mode,
//! - **nginx**: a userspace L4 proxy (nginx stream).
//!
//! Figures: UDP packets/s delivered to the backends (1 flow, 60k flows),
//! new flows/s (every packet a new tuple), TCP connect/close per second and
//! UDP round-trip latency; then ClusterIP connect rate and TCP
//! request/response from a pod, directly, through xlb's socket hooks and
//! through kube-proxy's iptables rules (`cluster_ip`); then the real-node
//! paths (uplink to pods as CNIs leave them: a local bridge pod, a remote
//! pod routed and over VXLAN) for xlb and iptables (`nodes`); then a scale
//! sweep over the number of Services for xlb, iptables and nftables. Each
//! point is the median of repeats.

mod agent;
mod cluster_ip;
mod kubeproxy;
mod nginx;
mod nodes;
mod progs;
mod report;
pub mod scale;
mod services;
mod topology;
mod traffic;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use progs::{Flows, Generator, Limit, Sink};
use report::{Figure, Report, SweepPoint, SweepSystem, SystemFigures};
use services::{BenchConfig, ECHO_NODE_PORT, FLOOD_NODE_PORT, FLOOD_TARGET_PORT, TCP_NODE_PORT};
use topology::BenchLab;

/// The systems under test, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum System {
    Limit,
    Xlb,
    Iptables,
    Nftables,
    Nginx,
}

impl System {
    pub const ALL: [System; 5] = [
        System::Limit,
        System::Xlb,
        System::Iptables,
        System::Nftables,
        System::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Limit => "limit",
            System::Xlb => "xlb",
            System::Iptables => "iptables",
            System::Nftables => "nftables",
            System::Nginx => "nginx",
        }
    }
}

/// `xlb-bench lab` options.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// CI smoke run: one repeat, short windows, sweep 1 and 100 Services.
    #[arg(long)]
    pub quick: bool,
    /// Also write every figure, sample and ratio as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the sweep chart (SVG) to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Repeats of every point (default 3; 1 with --quick). Figures are medians.
    #[arg(long)]
    pub repeats: Option<u32>,
    /// Seconds per measured window (default 2; 1 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Systems for the headline table (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub systems: Vec<System>,
    /// Systems for the sweep (default: xlb, iptables, nftables).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub sweep_systems: Vec<System>,
    /// Service counts for the sweep (default 1,100,1000,10000; 1,100 with
    /// --quick); `--sweep 0` skips it.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<usize>,
    /// `selection.tableSize` for xlb in the sweep (a prime). 10,000
    /// Services x the default 1021 slots do not fit the selection array, so
    /// the sweep uses a smaller table at every point.
    #[arg(long, default_value_t = 251)]
    pub sweep_table_size: u32,
    /// Distinct pod addresses the sweep's filler backends use (at most
    /// 65536, the default; ports tell backends apart). A small number shows
    /// which part of the agent's apply time is per address.
    #[arg(long, default_value_t = services::FILLER_POD_IPS)]
    pub filler_pod_ips: u32,
    /// Idle timeout (s) of unanswered UDP flows in xlb and in the kernel's
    /// conntrack. Short, so a new-flow flood reaches a steady state below
    /// every flow table's capacity and repeats see the same table; 0 keeps
    /// each system's default (60 s / 30 s: tables fill within seconds and
    /// the new-flow rate then depends on how full they are).
    #[arg(long, default_value_t = 1)]
    pub udp_timeout: u32,
    /// Skip the ClusterIP part (connect rate and TCP request/response from
    /// a pod: direct, xlb's socket hooks, kube-proxy's iptables rules).
    #[arg(long)]
    pub no_cluster_ip: bool,
    /// Rounds of the ClusterIP part (default 5; 2 with --quick).
    #[arg(long)]
    pub cluster_ip_rounds: Option<u32>,
    /// Skip the real-node paths (uplink -> local bridge pod, -> remote pod
    /// routed and over VXLAN, for xlb and iptables).
    #[arg(long)]
    pub no_node_paths: bool,
    /// Seconds the agent may take to apply a sweep config.
    #[arg(long, default_value_t = 900)]
    pub apply_timeout: u64,
}

/// Timing of one run, from the options.
#[derive(Clone, Copy, Debug)]
struct Plan {
    repeats: u32,
    warmup: Duration,
    window: Duration,
}

/// Client threads of the TCP connect/close test.
const TCP_CLIENTS: usize = 4;
/// Requests per second of the latency test (moderate: far below capacity).
const LATENCY_RATE: u32 = 1_000;
/// Flows in the "60k flows" test.
const MANY_FLOWS: u32 = 60_000;

pub fn run(options: &Options) -> anyhow::Result<(Report, bool)> {
    xlb_tests::require_root()?;
    let started = Instant::now();
    let plan = Plan {
        repeats: options
            .repeats
            .unwrap_or(if options.quick { 1 } else { 3 })
            .max(1),
        warmup: Duration::from_millis(if options.quick { 300 } else { 500 }),
        window: Duration::from_secs_f64(
            options
                .seconds
                .unwrap_or(if options.quick { 1.0 } else { 2.0 })
                .max(0.1),
        ),
    };
    let systems = if options.systems.is_empty() {
        System::ALL.to_vec()
    } else {
        options.systems.clone()
    };
    let sweep: Vec<usize> = match options.sweep.as_slice() {
        [] if options.quick => vec![1, 100],
        [] => vec![1, 100, 1_000, 10_000],
        [0] => Vec::new(),
        list => list.to_vec(),
    };
    check_tools(&systems)?;
    let udp_timeout_s = (options.udp_timeout > 0).then_some(options.udp_timeout);
    let mut report = Report::new(
        options.quick,
        plan.repeats,
        plan.window,
        options.sweep_table_size,
        udp_timeout_s,
    );
    let mut failed = false;
    let (figures, headline_failed) = headline(&systems, plan, udp_timeout_s);
    report.systems = figures;
    failed |= headline_failed;
    if systems.contains(&System::Xlb) && !options.no_cluster_ip {
        let mut cluster_plan = cluster_ip::Plan::new(options.quick);
        if let Some(rounds) = options.cluster_ip_rounds {
            cluster_plan.rounds = rounds.max(1);
        }
        let figures = cluster_ip::run(cluster_plan, systems.contains(&System::Iptables));
        if let Some(error) = &figures.error {
            eprintln!("xlb-bench: ClusterIP part failed: {error}");
            failed = true;
        }
        report.cluster_ip = Some(figures);
    }
    let path_systems = nodes::systems(&systems);
    if !options.no_node_paths && !path_systems.is_empty() {
        let (rows, notes, paths_failed) = nodes::run(&path_systems, plan, udp_timeout_s);
        report.node_paths = rows;
        report.node_path_notes = notes;
        failed |= paths_failed;
    }
    for &services in &sweep {
        let config = BenchConfig {
            udp_timeout_s,
            ..BenchConfig::sweep_with_pod_ips(
                services,
                Some(options.sweep_table_size),
                options.filler_pod_ips,
            )
        };
        let (point, point_failed) = sweep_point(&config, plan, options);
        report.sweep.push(point);
        failed |= point_failed;
    }
    report.finish(started.elapsed());
    Ok((report, failed))
}

/// Everything the lab needs from the machine, checked before the first
/// namespace is made, with the Debian package that provides it.
fn check_tools(systems: &[System]) -> anyhow::Result<()> {
    let mut needed = vec![("ip", "iproute2"), ("ethtool", "ethtool")];
    for system in systems {
        match system {
            System::Iptables => needed.push(("iptables-restore", "iptables")),
            System::Nftables => needed.push(("nft", "nftables")),
            System::Nginx => needed.push(("nginx", "nginx-light libnginx-mod-stream")),
            System::Limit | System::Xlb => {}
        }
    }
    needed.push(("iptables-restore", "iptables"));
    needed.push(("nft", "nftables"));
    let missing: Vec<String> = needed
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|(tool, package)| format!("{tool} (apt-get install {package})"))
        .collect();
    anyhow::ensure!(missing.is_empty(), "missing tools: {}", missing.join(", "));
    if systems.contains(&System::Nginx) {
        anyhow::ensure!(
            std::path::Path::new(nginx::STREAM_MODULE).exists(),
            "{} is missing (apt-get install libnginx-mod-stream)",
            nginx::STREAM_MODULE
        );
    }
    if systems.contains(&System::Xlb) {
        agent::agent_bin()?;
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// A system configured on a lab, kept alive while it is measured.
enum Running {
    Limit(#[allow(dead_code)] Limit),
    Xlb(agent::Agent),
    Rules,
    Nginx(#[allow(dead_code)] nginx::Nginx),
}

/// Configure `system` on `lab` for `config`; returns it and the seconds its
/// configuration took (rules load, agent start).
fn configure(
    system: System,
    lab: &BenchLab,
    config: &BenchConfig,
) -> anyhow::Result<(Running, f64)> {
    let start = Instant::now();
    let running = match system {
        System::Limit => Running::Limit(Limit::attach(lab, FLOOD_NODE_PORT)?),
        System::Xlb => Running::Xlb(agent::Agent::start(lab, &config.xlb_yaml())?),
        System::Iptables => {
            let path = lab.dir().join("iptables.rules");
            std::fs::write(&path, kubeproxy::iptables_restore(config))?;
            lab.node
                .exec("iptables-restore", &[&path.to_string_lossy()])
                .context("loading the kube-proxy iptables rules")?;
            kernel_udp_timeout(lab, config)?;
            Running::Rules
        }
        System::Nftables => {
            let path = lab.dir().join("kube-proxy.nft");
            std::fs::write(&path, kubeproxy::nft_script(config))?;
            lab.node
                .exec("nft", &["-f", &path.to_string_lossy()])
                .context("loading the kube-proxy nftables rules")?;
            kernel_udp_timeout(lab, config)?;
            Running::Rules
        }
        System::Nginx => {
            let nginx = nginx::Nginx::start(lab, config)?;
            traffic::wait_serving(lab, TCP_NODE_PORT, Duration::from_secs(10))
                .context("waiting for nginx")?;
            Running::Nginx(nginx)
        }
    };
    Ok((running, start.elapsed().as_secs_f64()))
}

/// The kernel conntrack's UDP timeout in the node namespace, as xlb's
/// (nf_conntrack is loaded once rules that use it are).
fn kernel_udp_timeout(lab: &BenchLab, config: &BenchConfig) -> anyhow::Result<()> {
    if let Some(seconds) = config.udp_timeout_s {
        lab.node
            .sysctl(
                "net/netfilter/nf_conntrack_udp_timeout",
                &seconds.to_string(),
            )
            .context("setting the kernel's UDP conntrack timeout")?;
    }
    Ok(())
}

/// One system on its own lab, configured and ready to measure.
struct Bench {
    system: System,
    // Drop order: the system, then the lab's programs and servers, then
    // the lab itself.
    running: Running,
    generator: Generator,
    sink: Sink,
    _servers: Option<traffic::Servers>,
    lab: BenchLab,
}

impl Bench {
    /// Build a lab, start its servers (with `servers`), the sink and the
    /// generator, and configure `system` for `config`.
    fn new(system: System, config: &BenchConfig, servers: bool) -> anyhow::Result<(Bench, f64)> {
        let lab = BenchLab::build()?;
        let servers = servers.then(|| traffic::Servers::start(&lab)).transpose()?;
        let sink = Sink::attach(&lab, [FLOOD_TARGET_PORT, FLOOD_NODE_PORT])?;
        let generator = Generator::load(&lab)?;
        let (running, setup_s) = configure(system, &lab, config)?;
        Ok((
            Bench {
                system,
                running,
                generator,
                sink,
                _servers: servers,
                lab,
            },
            setup_s,
        ))
    }

    /// Delivered UDP packets/s to the flood service with `flows` (and, for
    /// xlb, the flows its datapath created meanwhile).
    fn udp(&mut self, flows: Flows, plan: Plan) -> anyhow::Result<progs::Window> {
        let sink = &self.sink;
        let datapath = match &self.running {
            Running::Xlb(agent) => Some(agent.datapath(&self.lab)?),
            _ => None,
        };
        let new_flows = datapath
            .as_ref()
            .map(|datapath| move || agent::new_flows(datapath));
        self.generator.measure(
            FLOOD_NODE_PORT,
            flows,
            plan.warmup,
            plan.window,
            &|| sink.count(),
            new_flows
                .as_ref()
                .map(|count| count as &dyn Fn() -> anyhow::Result<u64>),
        )
    }

    /// Stop the agent, if this is xlb: its RSS and packet counters.
    fn finish(self) -> (Option<f64>, Option<String>) {
        match self.running {
            Running::Xlb(agent) => {
                let rss = agent.rss_mib().ok();
                let counters = agent.stop();
                (rss, (!counters.is_empty()).then_some(counters))
            }
            _ => (None, None),
        }
    }
}

/// What one headline repeat of one system measured.
#[derive(Default)]
struct Samples {
    metrics: BTreeMap<&'static str, Vec<f64>>,
    offered: Vec<f64>,
    /// Established tests (metric -> per repeat): flows the system created
    /// during the window, where it says.
    new_flows: BTreeMap<&'static str, Vec<u64>>,
    lost: u64,
    tcp_failed: u64,
}

/// The headline measurements, in the order they are taken.
#[derive(Clone, Copy, Debug)]
enum Measurement {
    Udp(&'static str, Flows),
    Tcp,
    Latency,
}

/// Most flows an established test's window may see created: 1% of its
/// flows (none for 1 flow). Every tuple is then a live flow, so its packets
/// measure the established path, not new flows.
fn new_flow_allowance(flows: u32) -> u64 {
    u64::from(flows) / 100
}

const HEADLINE: [Measurement; 5] = [
    Measurement::Udp("udp_pps_1_flow", Flows::Cycle(1)),
    Measurement::Udp("udp_pps_60k_flows", Flows::Cycle(MANY_FLOWS)),
    Measurement::Udp("new_flows_per_s", Flows::New),
    Measurement::Tcp,
    Measurement::Latency,
];

fn measure_headline(
    bench: &mut Bench,
    measurement: Measurement,
    plan: Plan,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    match measurement {
        Measurement::Udp(metric, flows) => {
            let window = bench.udp(flows, plan)?;
            samples
                .metrics
                .entry(metric)
                .or_default()
                .push(window.delivered_pps);
            samples.offered.push(window.offered_pps);
            if let (Flows::Cycle(_), Some(created)) = (flows, window.new_flows) {
                samples.new_flows.entry(metric).or_default().push(created);
            }
        }
        // No NAT, no state: the ceiling only forwards the flood.
        Measurement::Tcp | Measurement::Latency if bench.system == System::Limit => {}
        Measurement::Tcp => {
            let (rate, failed) = traffic::tcp_connect_rate(
                &bench.lab,
                TCP_NODE_PORT,
                TCP_CLIENTS,
                plan.warmup,
                plan.window,
            )?;
            samples
                .metrics
                .entry("tcp_conn_per_s")
                .or_default()
                .push(rate);
            samples.tcp_failed += failed;
        }
        Measurement::Latency => {
            let requests = (plan.window.as_secs_f64() * f64::from(LATENCY_RATE)) as u32;
            let latency = traffic::udp_latency(&bench.lab, ECHO_NODE_PORT, LATENCY_RATE, requests)?;
            samples
                .metrics
                .entry("latency_p50_us")
                .or_default()
                .push(latency.p50_us);
            samples
                .metrics
                .entry("latency_p99_us")
                .or_default()
                .push(latency.p99_us);
            samples.lost += latency.lost;
        }
    }
    Ok(())
}

/// The headline table: every system on its own lab, all configured first,
/// then measured in turn, so a burst of load elsewhere on the machine hits
/// every system rather than one.
fn headline(
    systems: &[System],
    plan: Plan,
    udp_timeout_s: Option<u32>,
) -> (Vec<SystemFigures>, bool) {
    let config = BenchConfig {
        udp_timeout_s,
        ..BenchConfig::headline()
    };
    let mut failed = false;
    let mut figures: Vec<SystemFigures> = Vec::new();
    let mut benches: Vec<Option<(Bench, Samples)>> = Vec::new();
    for system in systems {
        eprintln!("xlb-bench: setting up {} ...", system.name());
        let mut entry = SystemFigures::new(system.name());
        match Bench::new(*system, &config, true) {
            Ok((bench, setup_s)) => {
                entry.setup_s = Some(setup_s);
                benches.push(Some((bench, Samples::default())));
            }
            Err(error) => {
                failed = true;
                eprintln!("xlb-bench: {} failed: {error:#}", system.name());
                entry.error = Some(format!("{error:#}"));
                benches.push(None);
            }
        }
        figures.push(entry);
    }
    pin_node_napi_threads();
    // Measurement by measurement, system by system: a ratio compares
    // figures taken seconds apart, whatever else the machine is doing.
    for repeat in 0..plan.repeats {
        for measurement in HEADLINE {
            for (slot, entry) in benches.iter_mut().enumerate() {
                let Some((bench, samples)) = entry else {
                    continue;
                };
                eprintln!(
                    "xlb-bench: {} {measurement:?} (repeat {}/{}) ...",
                    bench.system.name(),
                    repeat + 1,
                    plan.repeats
                );
                if let Err(error) = measure_headline(bench, measurement, plan, samples) {
                    failed = true;
                    eprintln!("xlb-bench: {} failed: {error:#}", bench.system.name());
                    figures[slot].error = Some(format!("{error:#}"));
                    *entry = None;
                }
            }
        }
    }
    for (entry, figures) in benches.into_iter().zip(figures.iter_mut()) {
        let Some((bench, samples)) = entry else {
            continue;
        };
        let system = bench.system;
        failed |= check_new_flows(&samples.new_flows, &samples.metrics, figures);
        for (metric, values) in samples.metrics {
            figures
                .metrics
                .insert(metric.to_owned(), Figure::of(values));
        }
        figures.offered_pps = Some(Figure::of(samples.offered));
        if system == System::Limit {
            figures
                .notes
                .push("no NAT and no state: TCP and latency do not apply".into());
        }
        if samples.tcp_failed > 0 {
            figures.notes.push(format!(
                "{} TCP connections failed or timed out",
                samples.tcp_failed
            ));
        }
        if samples.lost > 0 {
            figures.notes.push(format!(
                "{} latency requests got no answer in 200 ms",
                samples.lost
            ));
        }
        let (rss, counters) = bench.finish();
        figures.rss_mib = rss;
        if let Some(counters) = counters {
            figures.notes.push(format!("agent counters: {counters}"));
        }
    }
    (figures, failed)
}

/// Records the flows created during established windows in `figures` and
/// says whether any window saw more than [`new_flow_allowance`]: its
/// packets then partly measured new flows (a flow table too small, or
/// entries expiring under traffic), and its pps is not an established
/// figure.
fn check_new_flows(
    new_flows: &BTreeMap<&'static str, Vec<u64>>,
    pps: &BTreeMap<&'static str, Vec<f64>>,
    figures: &mut SystemFigures,
) -> bool {
    let mut failed = false;
    for (&metric, created) in new_flows {
        let Some(flows) = HEADLINE.iter().find_map(|measurement| match measurement {
            Measurement::Udp(key, Flows::Cycle(flows)) if *key == metric => Some(*flows),
            _ => None,
        }) else {
            continue;
        };
        let allowed = new_flow_allowance(flows);
        let list: Vec<String> = created.iter().map(u64::to_string).collect();
        let worst = created.iter().copied().max().unwrap_or(0);
        let verdict = if worst > allowed {
            failed = true;
            // A flow's packets come this far apart on average (more with
            // bursts of loss): against the UDP timeout, whether the rate
            // was too low to keep every flow alive.
            let slowest = pps
                .get(metric)
                .and_then(|rates| rates.iter().copied().reduce(f64::min))
                .filter(|rate| *rate > 0.0)
                .map_or_else(String::new, |rate| {
                    format!(
                        "; at {rate:.0} pps a flow sees a packet every {:.0} ms",
                        f64::from(flows) * 1_000.0 / rate
                    )
                });
            format!(
                "MORE than {allowed} ({:.1}% of {flows} flows): not an established test{slowest}",
                worst as f64 * 100.0 / f64::from(flows)
            )
        } else {
            format!("ok: at most {allowed} allowed")
        };
        eprintln!(
            "xlb-bench: {} {metric}: new flows per window {}: {verdict}",
            figures.system,
            list.join(", ")
        );
        figures.notes.push(format!(
            "{metric}: new flows per window {} ({verdict})",
            list.join(", ")
        ));
        figures
            .new_flows_per_window
            .insert(metric.to_owned(), created.clone());
    }
    failed
}

/// Configure one system at one sweep point. xlb starts on an empty config,
/// then the whole config is written and applied (SIGHUP), and timed.
fn sweep_setup(
    system: System,
    config: &BenchConfig,
    options: &Options,
) -> anyhow::Result<(Bench, SweepSystem)> {
    let mut figures = SweepSystem::default();
    if system != System::Xlb {
        let (bench, seconds) = Bench::new(system, config, false)?;
        figures.apply_s = Some(seconds);
        return Ok((bench, figures));
    }
    let empty = BenchConfig {
        services: Vec::new(),
        ..config.clone()
    };
    let (mut bench, _) = Bench::new(system, &empty, false)?;
    let Running::Xlb(agent) = &mut bench.running else {
        unreachable!("an xlb bench runs the agent");
    };
    let applied = agent.apply(
        &config.xlb_yaml(),
        Duration::from_secs(options.apply_timeout),
    )?;
    figures.apply_s = Some(applied.seconds);
    figures.ops = Some(applied.ops);
    figures.rss_mib = agent.rss_mib().ok();
    Ok((bench, figures))
}

/// One sweep point: xlb, iptables and nftables configured for `config`,
/// then pps (1 flow) and new flows/s to the measured Service (last),
/// interleaved by repeat.
fn sweep_point(config: &BenchConfig, plan: Plan, options: &Options) -> (SweepPoint, bool) {
    let mut failed = false;
    let mut point = SweepPoint {
        services: config.services.len(),
        backends: config.backend_count(),
        systems: BTreeMap::new(),
    };
    let mut benches = Vec::new();
    let systems = if options.sweep_systems.is_empty() {
        vec![System::Xlb, System::Iptables, System::Nftables]
    } else {
        options.sweep_systems.clone()
    };
    for system in systems {
        eprintln!(
            "xlb-bench: sweep {} services: setting up {} ...",
            point.services,
            system.name()
        );
        match sweep_setup(system, config, options) {
            Ok((bench, figures)) => {
                point.systems.insert(system.name().to_owned(), figures);
                benches.push(Some((bench, Vec::new(), Vec::new())));
            }
            Err(error) => {
                failed = true;
                eprintln!(
                    "xlb-bench: sweep {} services, {} failed: {error:#}",
                    point.services,
                    system.name()
                );
                point.systems.insert(
                    system.name().to_owned(),
                    SweepSystem {
                        error: Some(format!("{error:#}")),
                        ..SweepSystem::default()
                    },
                );
            }
        }
    }
    pin_node_napi_threads();
    for _ in 0..plan.repeats {
        for flows in [Flows::Cycle(1), Flows::New] {
            for entry in &mut benches {
                let Some((bench, pps, new_flows)) = entry else {
                    continue;
                };
                let name = bench.system.name();
                eprintln!(
                    "xlb-bench: sweep {} services, {name} {flows:?} ...",
                    point.services
                );
                match bench.udp(flows, plan) {
                    Ok(window) if flows == Flows::New => new_flows.push(window.delivered_pps),
                    Ok(window) => pps.push(window.delivered_pps),
                    Err(error) => {
                        failed = true;
                        eprintln!(
                            "xlb-bench: sweep {}, {name} failed: {error:#}",
                            point.services
                        );
                        if let Some(figures) = point.systems.get_mut(name) {
                            figures.error = Some(format!("{error:#}"));
                        }
                        *entry = None;
                    }
                }
            }
        }
    }
    for (bench, pps, new_flows) in benches.into_iter().flatten() {
        let name = bench.system.name();
        let (rss, counters) = bench.finish();
        let Some(figures) = point.systems.get_mut(name) else {
            continue;
        };
        figures.udp_pps_1_flow = Some(Figure::of(pps));
        figures.new_flows_per_s = Some(Figure::of(new_flows));
        if let Some(rss) = rss {
            figures.rss_mib = Some(figures.rss_mib.unwrap_or(0.0).max(rss));
        }
        if let Some(counters) = counters {
            figures.notes.push(format!("agent counters: {counters}"));
        }
    }
    (point, failed)
}

/// Move the node namespaces' ingress NAPI threads (`napi/xb-g-*`, threaded
/// by the lab) to CPU 1, away from the generator on CPU 0, so every system
/// gets the same split of the two cores. Best effort.
fn pin_node_napi_threads() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(&format!("napi/{}-", topology::NODE_GEN_IF)) {
            continue;
        }
        // SAFETY: cpu_set_t is plain data set up by CPU_ZERO/CPU_SET; the
        // call only changes the affinity of the named thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(1, &mut set);
            libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// `xlb-bench lab`: run, print, write the files.
pub fn main(options: &Options) -> anyhow::Result<std::process::ExitCode> {
    teardown_on_interrupt()?;
    let (report, failed) = run(options)?;
    print!("{}", report.table());
    if let Some(path) = &options.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing the JSON report to {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &options.svg {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, report.svg())
            .with_context(|| format!("writing the chart to {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(if failed {
        eprintln!("xlb-bench: some measurements failed (see above and the report)");
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

/// Children inherit the signal mask (std's spawn keeps it), and this
/// process blocks SIGINT/SIGTERM for [`teardown_on_interrupt`]: clear the
/// mask in `command`'s child so the agent and nginx still stop on SIGTERM.
pub fn unblock_signals(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec and only calls
    // sigemptyset and sigprocmask, which are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Ctrl-C / SIGTERM: remove this process's namespaces (which kills the
/// agent and nginx inside them) and exit, rather than leave the lab behind.
/// Signals are blocked in every thread and taken by one of its own, so this
/// must run before any other thread starts.
fn teardown_on_interrupt() -> anyhow::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t and the signal numbers are valid;
    // pthread_sigmask only reads it.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    anyhow::ensure!(rc == 0, "could not block SIGINT/SIGTERM");
    std::thread::Builder::new()
        .name("teardown".to_owned())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` and `signal` are valid for the call.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                return;
            }
            eprintln!("\nxlb-bench: interrupted (signal {signal}): removing the lab");
            xlb_tests::netns::remove_owned_by(std::process::id());
            std::process::exit(128 + signal);
        })?;
    Ok(())
}
