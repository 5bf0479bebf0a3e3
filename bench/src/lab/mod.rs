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
mod headline;
mod ipv6;
mod kubeproxy;
mod nginx;
mod nodes;
mod process;
mod progs;
mod report;
mod runtime;
pub mod scale;
mod services;
mod sweep;
mod topology;
mod traffic;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub use process::unblock_signals;
use progs::{Flows, Generator, Limit, LimitKind, Sink};
use report::Report;
use services::{BenchConfig, FLOOD_NODE_PORT, FLOOD_TARGET_PORT, TCP_NODE_PORT};
use topology::BenchLab;

/// The systems under test, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum System {
    Limit,
    /// The limit plus stateless NAT (a yardstick: named `limit-nat`).
    LimitNat,
    /// The limit plus one LRU insert per packet (`limit-lru`).
    LimitLru,
    Xlb,
    Iptables,
    Nftables,
    Nginx,
}

impl System {
    pub const ALL: [System; 7] = [
        System::Limit,
        System::LimitNat,
        System::LimitLru,
        System::Xlb,
        System::Iptables,
        System::Nftables,
        System::Nginx,
    ];

    /// The limit and its yardsticks: UDP forwarding only (no TCP service,
    /// no replies).
    pub fn is_yardstick(self) -> bool {
        matches!(self, System::Limit | System::LimitNat | System::LimitLru)
    }

    pub fn name(self) -> &'static str {
        match self {
            System::Limit => "limit",
            System::LimitNat => "limit-nat",
            System::LimitLru => "limit-lru",
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
    /// `selection.tableSize` for xlb in the sweep (a prime; default: xlb's
    /// own, 16381 slots). Each Service has its own table, so 10,000 of the
    /// default size fit (1.3 GB of kernel memory at 8 bytes a slot).
    #[arg(long)]
    pub sweep_table_size: Option<u32>,
    /// Distinct pod addresses the sweep's filler backends use (at most
    /// 65536, the default; ports tell backends apart). A small number shows
    /// which part of the agent's apply time is per address.
    #[arg(long, default_value_t = services::FILLER_POD_IPS)]
    pub filler_pod_ips: u32,
    /// Idle timeout (s) of unanswered UDP flows in the kernel's conntrack,
    /// and of flows of one datagram in xlb (its flows with a second one
    /// keep its default, so a cycling test's flows outlive the gaps an
    /// overdriven lab leaves between their packets). Short, so a new-flow flood reaches a steady state below
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
    /// Skip the IPv6 part (the flood in both families on dual-stack labs,
    /// xlb and ip(6)tables).
    #[arg(long)]
    pub no_ipv6: bool,
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

pub fn run(options: &Options) -> anyhow::Result<(Report, bool)> {
    xlb_tests::require_root()?;
    let started = Instant::now();
    // Held for the run: the kernel counts BPF run time while it is open.
    let _stats = runtime::RunTimeStats::enable()
        .map_err(|error| eprintln!("xlb-bench: no BPF run time figures: {error:#}"))
        .ok();
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
    let (figures, headline_failed) = headline::run(&systems, plan, udp_timeout_s);
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
    if !options.no_ipv6 && systems.contains(&System::Xlb) {
        let (rows, ipv6_failed) = ipv6::run(&systems, plan, udp_timeout_s);
        report.ipv6 = rows;
        failed |= ipv6_failed;
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
                options.sweep_table_size,
                options.filler_pod_ips,
            )
        };
        let (point, point_failed) = sweep::point(&config, plan, options);
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
            System::Iptables => {
                needed.push(("iptables-restore", "iptables"));
                needed.push(("ip6tables-restore", "iptables"));
            }
            System::Nftables => needed.push(("nft", "nftables")),
            System::Nginx => needed.push(("nginx", "nginx-light libnginx-mod-stream")),
            System::Limit | System::LimitNat | System::LimitLru | System::Xlb => {}
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
        System::Limit => Running::Limit(Limit::attach(lab, FLOOD_NODE_PORT, LimitKind::Redirect)?),
        System::LimitNat => Running::Limit(Limit::attach(
            lab,
            FLOOD_NODE_PORT,
            LimitKind::Nat {
                target_port: FLOOD_TARGET_PORT,
            },
        )?),
        System::LimitLru => Running::Limit(Limit::attach(lab, FLOOD_NODE_PORT, LimitKind::Lru)?),
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
    /// The system's BPF programs, for their run time per window.
    programs: runtime::Programs,
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
        let newest = runtime::newest_id()?;
        let (running, setup_s) = configure(system, &lab, config)?;
        let programs = runtime::Programs::loaded_since(newest, runtime::programs_of(system))?;
        Ok((
            Bench {
                system,
                running,
                generator,
                sink,
                _servers: servers,
                programs,
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
        let programs = &self.programs;
        let bpf = (!programs.is_empty()).then_some(move || programs.snapshot());
        self.generator.measure(
            FLOOD_NODE_PORT,
            flows,
            plan.warmup,
            plan.window,
            &|| sink.count(),
            new_flows
                .as_ref()
                .map(|count| count as &dyn Fn() -> anyhow::Result<u64>),
            bpf.as_ref()
                .map(|snapshot| snapshot as &dyn Fn() -> anyhow::Result<(u64, u64)>),
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

/// `xlb-bench lab`: run, print, write the files.
pub fn main(options: &Options) -> anyhow::Result<std::process::ExitCode> {
    process::teardown_on_interrupt()?;
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
