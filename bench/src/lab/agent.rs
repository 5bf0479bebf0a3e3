//! The real xlb agent in the node namespace (`xlb run --config FILE`), and
//! what the bench reads from outside it: how long a config takes to apply
//! (SIGHUP to the `applied config generation N` log line; the agent logs no
//! duration itself), its resident memory, and its datapath's counters
//! (read from the maps of the XDP program it attached).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use lb_common::Reason;
use xlb::observe::datapath::DatapathMaps;
use xlb_tests::{ChildGuard, XLB_BIN_ENV};

use super::topology::{BenchLab, NODE_GEN_IF};

/// How long the first start (load, verify, attach, first apply) may take.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(2);
/// If set, a directory the agent's log is copied to when it stops.
pub const LOGS_ENV: &str = "XLB_BENCH_LOGS";
/// If set, the agent's `RUST_LOG` (default `info`), e.g.
/// `info,xlb::timing=debug` for where each apply's time goes.
pub const LOG_FILTER_ENV: &str = "XLB_BENCH_RUST_LOG";

/// The agent binary: `$XLB_BIN` (set by `cargo xtask bench`), else `xlb`
/// next to this executable.
pub fn agent_bin() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os(XLB_BIN_ENV) {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("this executable has no directory"))?
            .join("xlb"),
    };
    anyhow::ensure!(
        path.is_file(),
        "the xlb agent {} does not exist: run via `cargo xtask bench`, or set {XLB_BIN_ENV}",
        path.display()
    );
    Ok(path)
}

pub struct Agent {
    child: ChildGuard,
    config: PathBuf,
    log: PathBuf,
    generation: u64,
}

/// What a config apply cost.
#[derive(Clone, Copy, Debug)]
pub struct Applied {
    pub seconds: f64,
    pub ops: u64,
}

impl Agent {
    /// Start the agent with `yaml` and wait until it has applied it.
    pub fn start(lab: &BenchLab, yaml: &str) -> anyhow::Result<Agent> {
        Agent::start_with(lab, yaml, &[], START_TIMEOUT)
    }

    /// [`Agent::start`] with more `xlb run` arguments and a time limit.
    pub fn start_with(
        lab: &BenchLab,
        yaml: &str,
        extra_args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Agent> {
        let bin = agent_bin()?;
        let config = lab.dir().join("xlb.yaml");
        write_atomically(&config, yaml)?;
        let log = lab.dir().join("xlb.log");
        let log_file = std::fs::File::create(&log)?;
        let mut command = lab.node.command(&bin);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .env(
                "RUST_LOG",
                std::env::var(LOG_FILTER_ENV).unwrap_or_else(|_| String::from("info")),
            );
        super::unblock_signals(&mut command);
        let child = ChildGuard::spawn(&mut command)?;
        let mut agent = Agent {
            child,
            config,
            log,
            generation: 0,
        };
        agent.wait_applied(1, timeout)?;
        Ok(agent)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Write `yaml` as the config, SIGHUP, and time until the agent logs
    /// that it applied the next generation.
    pub fn apply(&mut self, yaml: &str, timeout: Duration) -> anyhow::Result<Applied> {
        write_atomically(&self.config, yaml)?;
        let start = Instant::now();
        self.child.signal(libc::SIGHUP)?;
        let ops = self.wait_applied(self.generation + 1, timeout)?;
        Ok(Applied {
            seconds: start.elapsed().as_secs_f64(),
            ops,
        })
    }

    /// Wait for `applied config generation {generation} (N ops)`; returns N.
    fn wait_applied(&mut self, generation: u64, timeout: Duration) -> anyhow::Result<u64> {
        let needle = format!("applied config generation {generation} (");
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(rest) = log.split(&needle).nth(1) {
                self.generation = generation;
                let ops = rest
                    .split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                return Ok(ops);
            }
            for failure in ["config rejected", "only partly applied", "resync failed"] {
                if let Some(line) = log.lines().rev().find(|line| line.contains(failure)) {
                    bail!(
                        "the agent did not apply generation {generation}: {line}\n{}",
                        tail(&log)
                    );
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("the agent exited with {status}:\n{}", tail(&log));
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not log {needle:?} within {timeout:?}:\n{}",
                    tail(&log)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// VmRSS in MiB.
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        Ok(self.memory_mib()?.0)
    }

    /// (VmRSS, VmHWM: the peak) in MiB.
    pub fn memory_mib(&self) -> anyhow::Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| -> anyhow::Result<f64> {
            let kib: f64 = status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no {name} in /proc/PID/status"))?;
            Ok(kib / 1024.0)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// The maps of the datapath this agent attached to the node's
    /// generator link (unpinned: found through the program's kernel id).
    pub fn datapath(&self, lab: &BenchLab) -> anyhow::Result<DatapathMaps> {
        let id = xdp_program_id(lab)?;
        DatapathMaps::of_program(id)
            .with_context(|| format!("opening the maps of XDP program {id}"))
    }

    /// SIGTERM; returns the agent's `packet counters: ...` line.
    pub fn stop(mut self) -> String {
        let _ = self.child.stop(Duration::from_secs(10));
        if let Some(dir) = std::env::var_os(LOGS_ENV) {
            let name = format!("xlb-{}.log", self.child.id());
            let _ = std::fs::copy(&self.log, Path::new(&dir).join(name));
        }
        self.log()
            .lines()
            .find_map(|line| line.split("packet counters: ").nth(1))
            .unwrap_or("")
            .to_owned()
    }
}

/// Flows the datapath has created (`fwd_new_flow`, all CPUs) so far.
pub fn new_flows(datapath: &DatapathMaps) -> anyhow::Result<u64> {
    let verdicts = datapath.verdicts().context("reading XLB_STATS")?;
    Ok(verdicts
        .iter()
        .find(|(reason, _)| *reason == Reason::FwdNewFlow)
        .map_or(0, |(_, count)| *count))
}

/// The kernel id of the XDP program on the node's generator link, as
/// `ip -j link` reports it (`xdp.prog.id`, or the first of
/// `xdp.attached[].prog.id`).
fn xdp_program_id(lab: &BenchLab) -> anyhow::Result<u32> {
    let text = lab.node.ip(&["-j", "link", "show", "dev", NODE_GEN_IF])?;
    let links: serde_json::Value =
        serde_json::from_str(&text).context("parsing `ip -j link show`")?;
    let xdp = &links[0]["xdp"];
    let id = xdp["prog"]["id"]
        .as_u64()
        .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
        .ok_or_else(|| anyhow!("no XDP program on {NODE_GEN_IF}: {text}"))?;
    Ok(u32::try_from(id)?)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
        .with_context(|| format!("writing {}", path.display()))
}
