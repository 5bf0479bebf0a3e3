//! ClusterIP from a pod, side by side in one run: short TCP connections per
//! second (connect, `WHO`, answer, close) and 1-byte request/response round
//! trips on one connection, from a pod to one backend pod on the same node,
//! over three paths:
//!
//! - **direct**: to the pod's own address (the yardstick: no NAT at all),
//! - **xlb**: a ClusterIP balanced by xlb's socket hooks (`--cgroup`): the
//!   address is rewritten once, at connect(), and no packet is translated,
//! - **iptables**: a ClusterIP DNATed by the rules kube-proxy's iptables mode
//!   writes for it (`kubeproxy::iptables_restore`, the pods' network as its
//!   cluster CIDR, so pod clients are not masqueraded), per packet through
//!   conntrack.
//!
//! Rounds interleave the paths, so load from other processes on a shared
//! machine falls on all of them alike. Runs on the end-to-end tests' lab
//! (`xlb_tests::Lab`: a node namespace, pods behind veths, `xlb-echo` in
//! each) with the bench process in a child cgroup of its own, where the
//! agent attaches the socket hooks.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use serde::Serialize;
use xlb_tests::lab::{ECHO_TCP_PORT, TCP_ECHO_NODE_PORT};
use xlb_tests::{Agent, Lab, TestCgroup, XLB_ECHO_BIN_ENV};

use super::kubeproxy;
use super::report::Figure;
use super::services::{BenchConfig, Protocol, Service};

/// ClusterIPs (routed nowhere: only the socket hooks or the DNAT answer).
const XLB_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const IPTABLES_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 30);
const SERVICE_PORT: u16 = 80;
/// The lab's pods are 198.18.N.2: kube-proxy's `--cluster-cidr`.
const POD_CIDR: &str = "198.18.0.0/16";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The paths, in table order: (key, description).
pub const PATHS: [(&str, &str); 3] = [
    ("direct", "direct to the pod"),
    ("xlb", "ClusterIP, xlb socket hooks"),
    ("iptables", "ClusterIP, kube-proxy iptables"),
];

/// How much to measure.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Plan {
    pub rounds: u32,
    pub connections: u32,
    pub round_trips: u32,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 2,
                connections: 200,
                round_trips: 2_000,
            }
        } else {
            Plan {
                rounds: 5,
                connections: 400,
                round_trips: 4_000,
            }
        }
    }
}

/// One path's figures: medians over rounds.
#[derive(Clone, Debug, Serialize)]
pub struct PathFigures {
    pub path: String,
    pub description: String,
    pub connections_per_s: Figure,
    pub rr_p50_us: Figure,
    pub rr_p90_us: Figure,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterIpFigures {
    pub plan: Plan,
    pub paths: Vec<PathFigures>,
    /// "xlb/direct", "iptables/direct", "xlb/iptables" -> metric -> ratio.
    pub ratios: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
    pub error: Option<String>,
}

impl ClusterIpFigures {
    pub fn path(&self, key: &str) -> Option<&PathFigures> {
        self.paths.iter().find(|figures| figures.path == key)
    }

    /// `ours / theirs` of one metric.
    pub fn ratio(&self, pair: &str, metric: &str) -> Option<f64> {
        self.ratios.get(pair)?.get(metric).copied()
    }

    fn compute_ratios(&mut self) {
        for (ours, theirs) in [
            ("xlb", "direct"),
            ("iptables", "direct"),
            ("xlb", "iptables"),
        ] {
            let (Some(a), Some(b)) = (self.path(ours), self.path(theirs)) else {
                continue;
            };
            let mut ratios = std::collections::BTreeMap::new();
            for (metric, x, y) in [
                (
                    "connections_per_s",
                    a.connections_per_s.median,
                    b.connections_per_s.median,
                ),
                ("rr_p50_us", a.rr_p50_us.median, b.rr_p50_us.median),
                ("rr_p90_us", a.rr_p90_us.median, b.rr_p90_us.median),
            ] {
                if y > 0.0 {
                    ratios.insert(metric.to_owned(), x / y);
                }
            }
            self.ratios.insert(format!("{ours}/{theirs}"), ratios);
        }
    }
}

/// `xlb-echo`: `$XLB_ECHO_BIN` (set by `cargo xtask bench`), else next to
/// this executable.
fn echo_bin() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os(XLB_ECHO_BIN_ENV) {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("this executable has no directory"))?
            .join("xlb-echo"),
    };
    anyhow::ensure!(
        path.is_file(),
        "the echo server {} does not exist: run via `cargo xtask bench`, or set \
         {XLB_ECHO_BIN_ENV}",
        path.display()
    );
    Ok(path)
}

/// Measures `paths` (keys of [`PATHS`]; `direct` always) with `plan`.
pub fn run(plan: Plan, with_iptables: bool) -> ClusterIpFigures {
    let mut figures = ClusterIpFigures {
        plan,
        paths: Vec::new(),
        ratios: std::collections::BTreeMap::new(),
        error: None,
    };
    // The lab's children (the agent, the echo servers) inherit the
    // spawning thread's signal mask: on a thread of its own, SIGTERM is
    // unblocked again so they stop when the lab is dropped (SIGINT stays
    // with the bench's teardown thread).
    let measured = std::thread::spawn(move || {
        unblock_sigterm();
        measure(plan, with_iptables)
    })
    .join()
    .unwrap_or_else(|_| Err(anyhow!("the ClusterIP measurement panicked")));
    match measured {
        Ok(paths) => figures.paths = paths,
        Err(error) => figures.error = Some(format!("{error:#}")),
    }
    figures.compute_ratios();
    figures
}

fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(0, |cpus| cpus.get() - 1)
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
fn pin_thread(tid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data, initialised by CPU_ZERO; the kernel
    // only reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    anyhow::ensure!(
        rc == 0,
        "sched_setaffinity({tid}, cpu {cpu}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Pins every thread of this process's `xlb-echo --name NAME` child to
/// `cpu`.
fn pin_echo_server(name: &str, cpu: usize) -> anyhow::Result<()> {
    let wanted = format!("\0--name\0{name}\0");
    let mut pinned = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let program = cmdline.split('\0').next().unwrap_or_default();
        if !(program.ends_with("xlb-echo") && cmdline.contains(&wanted)) {
            continue;
        }
        // Only this bench's own child (other labs may run one by that name).
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if parent != Some(std::process::id()) {
            continue;
        }
        for task in std::fs::read_dir(entry.path().join("task"))?.flatten() {
            if let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() {
                pin_thread(tid, cpu)?;
                pinned += 1;
            }
        }
    }
    anyhow::ensure!(pinned > 0, "no xlb-echo process named {name} to pin");
    Ok(())
}

fn unblock_sigterm() {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; the mask
    // change is this thread's only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

fn xlb_config(lab: &Lab, backend: Ipv4Addr) -> String {
    lab.config_yaml(&format!(
        "  - name: tcp-bench\n    protocol: TCP\n    nodePort: {TCP_ECHO_NODE_PORT}\n    \
         port: {SERVICE_PORT}\n    clusterIP: {XLB_CLUSTER_IP}\n    backends:\n      \
         - {{address: {backend}, port: {ECHO_TCP_PORT}}}\n"
    ))
}

/// The rules kube-proxy's iptables mode writes for a ClusterIP Service with
/// one endpoint.
fn iptables_rules(backend: Ipv4Addr) -> String {
    let config = BenchConfig {
        services: vec![Service {
            namespace: "bench".into(),
            name: "tcp-cluster-ip".into(),
            port_name: "p".into(),
            protocol: Protocol::Tcp,
            cluster_ip: IPTABLES_CLUSTER_IP,
            port: SERVICE_PORT,
            node_port: TCP_ECHO_NODE_PORT + 1,
            backends: vec![SocketAddrV4::new(backend, ECHO_TCP_PORT)],
        }],
        table_size: None,
        udp_timeout_s: None,
        node_addr: xlb_tests::lab::NODE_ADDR,
        // Only the iptables rules are written from this config.
        interfaces: Vec::new(),
    };
    kubeproxy::iptables_restore_for_cluster(&config, POD_CIDR)
}

fn measure(plan: Plan, with_iptables: bool) -> anyhow::Result<Vec<PathFigures>> {
    xlb_tests::require_root()?;
    let cgroup = TestCgroup::enter()?;
    let lab = Lab::with_echo_bin(2, &echo_bin()?)?;
    let backend = lab.backends[1].addr;
    let config = lab.write_file("xlb.yaml", &xlb_config(&lab, backend))?;
    let cgroup_arg = cgroup.arg();
    let agent = Agent::start_with(
        &super::agent::agent_bin()?,
        &lab,
        &config,
        &["--cgroup", cgroup_arg.as_str()],
    )?;
    let mut targets = vec![
        (PATHS[0], SocketAddr::from((backend, ECHO_TCP_PORT))),
        (PATHS[1], SocketAddr::from((XLB_CLUSTER_IP, SERVICE_PORT))),
    ];
    if with_iptables {
        let rules = lab.write_file("iptables.rules", &iptables_rules(backend))?;
        lab.node
            .exec("iptables-restore", &[&rules.to_string_lossy()])
            .context("loading kube-proxy's iptables rules for the ClusterIP")?;
        targets.push((
            PATHS[2],
            SocketAddr::from((IPTABLES_CLUSTER_IP, SERVICE_PORT)),
        ));
    }
    // Client and server share one CPU: on a 2-core machine a round trip
    // otherwise costs ~23 us or ~78 us depending on where the scheduler
    // puts the two ends, which swamps any difference between the paths.
    let cpu = last_cpu();
    pin_echo_server(&lab.backends[1].name, cpu)?;
    let measured = lab.backends[0].netns.run(|| {
        pin_thread(0, cpu)?;
        measure_paths(plan, &targets)
    })?;
    let measured = measured.map_err(|error| agent.failure(format!("{error:#}")))?;
    drop(agent);
    drop(lab);
    drop(cgroup);
    Ok(measured)
}

fn measure_paths(
    plan: Plan,
    targets: &[((&str, &str), SocketAddr)],
) -> anyhow::Result<Vec<PathFigures>> {
    let mut connect_rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut p50s: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut p90s: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for (_, target) in targets {
        // Warm up (neighbours, conntrack, page cache).
        connect_once(*target)?;
    }
    for round in 0..plan.rounds as usize {
        // Each round starts with the next path, so none is always first.
        for offset in 0..targets.len() {
            let index = (round + offset) % targets.len();
            let ((key, _), target) = &targets[index];
            let started = Instant::now();
            for _ in 0..plan.connections {
                connect_once(*target).with_context(|| format!("{key}: a short connection"))?;
            }
            connect_rates[index]
                .push(f64::from(plan.connections) / started.elapsed().as_secs_f64());
            let mut samples = round_trips(*target, plan.round_trips)
                .with_context(|| format!("{key}: round trips"))?;
            samples.sort_by(f64::total_cmp);
            p50s[index].push(samples[samples.len() / 2]);
            p90s[index].push(samples[samples.len() * 9 / 10]);
        }
    }
    Ok(targets
        .iter()
        .enumerate()
        .map(|(index, ((key, description), _))| PathFigures {
            path: (*key).to_owned(),
            description: (*description).to_owned(),
            connections_per_s: Figure::of(connect_rates[index].clone()),
            rr_p50_us: Figure::of(p50s[index].clone()),
            rr_p90_us: Figure::of(p90s[index].clone()),
        })
        .collect())
}

/// connect, `WHO`, read the answer line, close.
fn connect_once(target: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(b"WHO\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    anyhow::ensure!(line.starts_with("name="), "answer {line:?}");
    Ok(())
}

/// `count` 1-byte request/response round trips on one connection, in us.
fn round_trips(target: SocketAddr, count: u32) -> anyhow::Result<Vec<f64>> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(b"WHO\n")?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut byte = [0u8; 1];
    let mut samples = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let sent = Instant::now();
        stream.write_all(b"x")?;
        reader.read_exact(&mut byte)?;
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    Ok(samples)
}

/// The stdout table.
pub fn table(figures: &ClusterIpFigures) -> String {
    use std::fmt::Write as _;
    let plan = figures.plan;
    let mut out = format!(
        "ClusterIP from a pod to one backend pod on the node: median of {} rounds \
         ({} short connections, {} 1-byte round trips per path per round)\n",
        plan.rounds, plan.connections, plan.round_trips
    );
    if let Some(error) = &figures.error {
        let _ = writeln!(out, "  failed: {error}");
        return out;
    }
    let _ = writeln!(
        out,
        "  {:<32} {:>10} {:>10} {:>10}",
        "path", "conn/s", "RR p50 us", "RR p90 us"
    );
    for path in &figures.paths {
        let _ = writeln!(
            out,
            "  {:<32} {:>10.0} {:>10.1} {:>10.1}",
            path.description,
            path.connections_per_s.median,
            path.rr_p50_us.median,
            path.rr_p90_us.median
        );
    }
    for (pair, ratios) in &figures.ratios {
        let shown: Vec<String> = ratios
            .iter()
            .map(|(metric, ratio)| format!("{metric} {ratio:.3}x"))
            .collect();
        let _ = writeln!(out, "  {pair}: {}", shown.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_rules_dnat_the_cluster_ip_without_masquerading_pods() {
        let backend = Ipv4Addr::new(198, 18, 2, 2);
        let rules = iptables_rules(backend);
        assert!(rules.contains(&format!(
            "-d {IPTABLES_CLUSTER_IP}/32 --dport {SERVICE_PORT}"
        )));
        assert!(rules.contains(&format!("! -s {POD_CIDR} -j KUBE-MARK-MASQ")));
        assert!(rules.contains(&format!("--to-destination {backend}:{ECHO_TCP_PORT}")));
    }
}
