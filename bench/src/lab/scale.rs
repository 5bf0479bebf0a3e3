//! `xlb-bench scale` (`cargo xtask bench --scale`): the agent itself under a
//! big config. 10,000 Services with 100,000 backends are applied to a live
//! agent, once by SIGHUP (config file) and once from an empty start through
//! the Kubernetes source (the in-process API server, real list/watch wire
//! format); a thread asks `/healthz` every 20 ms throughout. Reported: time
//! to "applied", the slowest and 99th-percentile probe, failed probes, and
//! the agent's resident memory, each next to its goal.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use xlb_tests::apiserver::ApiServer;
use xlb_tests::apiserver::objects::{EndpointState, endpoint_slice, node, node_port_service};
use xlb_tests::client::healthz;

use super::agent::Agent;
use super::services::{BenchConfig, FILLER_POD_IPS};
use super::topology::{self, BenchLab};

/// Goals (issue "Hold under load"): apply, probe latency, memory.
const GOAL_APPLY_S: f64 = 2.0;
const GOAL_PROBE_MS: f64 = 100.0;
const GOAL_RSS_MIB: f64 = 64.0;
/// The agent's default --metrics-addr, inside the node namespace.
const METRICS: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);
const PROBE_EVERY: Duration = Duration::from_millis(20);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const NODE_NAME: &str = "bench-node";

/// `xlb-bench scale` options.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Services to apply (10 backends each).
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    /// `selection.tableSize` (0, the default: left out, so each Service's
    /// table is sized by its backends as xlb does by default: 1021 slots
    /// for the bench's 10 backends).
    #[arg(long, default_value_t = 0)]
    pub table_size: u32,
    /// Seconds an apply may take before the run fails.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Skip the Kubernetes-source half.
    #[arg(long)]
    pub no_kubernetes: bool,
    /// Also write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl Options {
    /// `selection.tableSize` to write, if any.
    fn table(&self) -> Option<u32> {
        (self.table_size > 0).then_some(self.table_size)
    }
}

/// One measured apply.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figures {
    pub source: &'static str,
    pub services: usize,
    pub backends: usize,
    pub apply_seconds: f64,
    pub probes: usize,
    pub probes_failed: usize,
    pub probe_max_ms: f64,
    pub probe_p99_ms: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

impl Figures {
    /// The figures of applying `big` from `source`: the prober's (probes,
    /// failed, p99 ms, max ms) and the agent's memory; stops the agent.
    fn measured(
        source: &'static str,
        big: &BenchConfig,
        apply_seconds: f64,
        probed: (usize, usize, f64, f64),
        agent: Agent,
    ) -> anyhow::Result<Figures> {
        let (probes, probes_failed, probe_p99_ms, probe_max_ms) = probed;
        let (rss_mib, peak_rss_mib) = agent.memory_mib()?;
        agent.stop();
        Ok(Figures {
            source,
            services: big.services.len(),
            backends: big.backend_count(),
            apply_seconds,
            probes,
            probes_failed,
            probe_max_ms,
            probe_p99_ms,
            rss_mib,
            peak_rss_mib,
        })
    }

    fn row(&self) -> String {
        let mark = |ok: bool| if ok { "ok" } else { "MISSED" };
        format!(
            "{:<11} {:>6} {:>8} {:>9.2} s {:<6} {:>7} {:>6} {:>8.1} ms {:>8.1} ms {:<6} {:>7.1} MiB {:<6} {:>7.1} MiB {}",
            self.source,
            self.services,
            self.backends,
            self.apply_seconds,
            mark(self.apply_seconds < GOAL_APPLY_S),
            self.probes,
            self.probes_failed,
            self.probe_p99_ms,
            self.probe_max_ms,
            mark(self.probes_failed == 0 && self.probe_max_ms < GOAL_PROBE_MS),
            self.rss_mib,
            mark(self.rss_mib < GOAL_RSS_MIB),
            self.peak_rss_mib,
            mark(self.peak_rss_mib < GOAL_RSS_MIB),
        )
    }
}

/// /healthz every `PROBE_EVERY` from a thread in the node namespace.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<Result<Duration, String>>>>,
}

impl Prober {
    fn start(lab: &BenchLab) -> anyhow::Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = topology::spawn_in(lab.node.name(), "healthz-prober", move || {
            let mut outcomes = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                outcomes.push(healthz(METRICS, PROBE_TIMEOUT));
                std::thread::sleep(PROBE_EVERY);
            }
            outcomes
        })?;
        Ok(Prober { stop, thread })
    }

    /// (probes, failed, p99 ms, max ms)
    fn stop(self) -> anyhow::Result<(usize, usize, f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        let outcomes = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the prober panicked"))??;
        // Before the agent's listener is up, connecting fails: count from
        // the first answer on.
        let first = outcomes
            .iter()
            .position(Result::is_ok)
            .unwrap_or(outcomes.len());
        let outcomes = &outcomes[first..];
        let failed = outcomes.iter().filter(|o| o.is_err()).count();
        let mut ms: Vec<f64> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        ms.sort_by(f64::total_cmp);
        let max = ms.last().copied().unwrap_or(f64::NAN);
        let p99 = ms
            .get((ms.len() * 99 / 100).min(ms.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN);
        Ok((outcomes.len(), failed, p99, max))
    }
}

/// The sweep's node settings with no service (the Kubernetes source gives
/// them).
fn node_only_yaml(table_size: Option<u32>) -> String {
    let yaml = BenchConfig::sweep_with_pod_ips(1, table_size, FILLER_POD_IPS).xlb_yaml();
    let head = yaml.split("services:\n").next().unwrap_or_default();
    format!("{head}services: []\n")
}

/// Config file: a one-Service agent, then the big config by SIGHUP.
fn by_sighup(options: &Options) -> anyhow::Result<Figures> {
    let lab = BenchLab::build()?;
    let table = options.table();
    let small = BenchConfig::sweep_with_pod_ips(1, table, FILLER_POD_IPS);
    let big = BenchConfig::sweep_with_pod_ips(options.services, table, FILLER_POD_IPS);
    let mut agent = Agent::start(&lab, &small.xlb_yaml())?;
    let prober = Prober::start(&lab)?;
    let applied = agent.apply(&big.xlb_yaml(), Duration::from_secs(options.timeout));
    // Probe on a while after "applied": neighbours resolve in the background.
    std::thread::sleep(Duration::from_secs(3));
    let probed = prober.stop()?;
    let applied = applied?;
    Figures::measured("file+SIGHUP", &big, applied.seconds, probed, agent)
}

/// Kubernetes: the API server already holds every Service and
/// EndpointSlice; the agent starts empty and lists them.
fn from_kubernetes(options: &Options) -> anyhow::Result<Figures> {
    let lab = BenchLab::build()?;
    let big = BenchConfig::sweep_with_pod_ips(options.services, None, FILLER_POD_IPS);
    let server = topology::spawn_in(lab.node.name(), "apiserver", ApiServer::start)?
        .join()
        .map_err(|_| anyhow::anyhow!("starting the API server panicked"))??
        .context("starting the test API server")?;
    server.apply_quietly(&node(NODE_NAME, big.node_addr));
    for (index, service) in big.services.iter().enumerate() {
        let protocol = service.protocol.upper();
        let port = service.backends.first().map_or(80, |b| b.port());
        server.apply_quietly(&node_port_service(
            &service.namespace,
            &service.name,
            protocol,
            service.port,
            port,
            service.node_port,
        ));
        let endpoints: Vec<EndpointState> = service
            .backends
            .iter()
            .map(|backend| EndpointState::ready(*backend.ip()))
            .collect();
        server.apply_quietly(&endpoint_slice(
            &service.namespace,
            &format!("{}-{index}", service.name),
            &service.name,
            protocol,
            port,
            &endpoints,
        ));
    }
    let kubeconfig = lab.dir().join("kubeconfig");
    server
        .write_kubeconfig(&kubeconfig)
        .context("writing the kubeconfig")?;
    let kubeconfig = kubeconfig.display().to_string();
    let prober = Prober::start(&lab)?;
    let started = Instant::now();
    let agent = Agent::start_with(
        &lab,
        &node_only_yaml(options.table()),
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            NODE_NAME,
        ],
        Duration::from_secs(options.timeout),
    );
    // The listener comes up before the first apply: probing from the start
    // shows whether the apply starves it.
    let apply_seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    let agent = agent?;
    let probed = prober.stop()?;
    let figures = Figures::measured("kubernetes", &big, apply_seconds, probed, agent);
    drop(server);
    figures
}

pub fn main(options: &Options) -> anyhow::Result<std::process::ExitCode> {
    xlb_tests::require_root().context("the scale bench builds network namespaces")?;
    let mut figures = vec![by_sighup(options)?];
    if !options.no_kubernetes {
        figures.push(from_kubernetes(options)?);
    }
    println!(
        "goals: apply < {GOAL_APPLY_S} s, every /healthz < {GOAL_PROBE_MS} ms, RSS < {GOAL_RSS_MIB} MiB \
         (resident 3 s after \"applied\", and the peak: VmRSS, VmHWM)"
    );
    println!(
        "{:<11} {:>6} {:>8} {:>11} {:<6} {:>7} {:>6} {:>11} {:>11} {:<6} {:>11} {:<6} {:>11}",
        "SOURCE",
        "SVCS",
        "BACKENDS",
        "APPLY",
        "",
        "PROBES",
        "FAILED",
        "P99",
        "MAX",
        "",
        "RSS",
        "",
        "PEAK RSS"
    );
    for figure in &figures {
        println!("{}", figure.row());
    }
    if let Some(path) = &options.json {
        let text = serde_json::to_string_pretty(&figures)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
