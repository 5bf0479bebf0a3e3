//! The xlb agent running in a lab's node namespace:
//! `ip netns exec NODE xlb run --config FILE --ready-file F`, with its log in
//! the lab's scratch directory so a failure can show it.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use crate::{ChildGuard, Lab, LabError, Netns, XLB_BIN_ENV, bin_from_env, poll_until};

/// A lab the agent can run in: its node namespace and a scratch directory
/// for the agent's files.
pub trait AgentLab {
    fn node_netns(&self) -> &Netns;
    fn scratch_dir(&self) -> &Path;
}

impl AgentLab for Lab {
    fn node_netns(&self) -> &Netns {
        &self.node
    }
    fn scratch_dir(&self) -> &Path {
        self.dir()
    }
}

impl AgentLab for crate::node_lab::NodeLab {
    fn node_netns(&self) -> &Netns {
        &self.node
    }
    fn scratch_dir(&self) -> &Path {
        self.dir()
    }
}

/// How long the agent may take to load the datapath and write its maps.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a reload may take to be applied.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the agent gets to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running agent; killed on drop. Borrowing the lab keeps the lab alive
/// (and its namespaces in place) for as long as the agent runs.
#[derive(Debug)]
pub struct Agent<'lab, L: AgentLab = Lab> {
    child: ChildGuard,
    lab: &'lab L,
    config: PathBuf,
    log: PathBuf,
    ready_file: PathBuf,
}

/// How the agent ended, and everything it logged.
#[derive(Debug)]
pub struct AgentExit {
    pub status: ExitStatus,
    pub log: String,
}

impl<'lab, L: AgentLab> Agent<'lab, L> {
    /// Start the agent named by `XLB_BIN` (set by `cargo xtask test`) with
    /// `config` and wait until it is ready.
    pub fn start(lab: &'lab L, config: &Path) -> Result<Agent<'lab, L>, LabError> {
        Agent::start_with(&bin_from_env(XLB_BIN_ENV)?, lab, config, &[])
    }

    /// As [`Agent::start`], with an explicit binary and extra `run` arguments.
    pub fn start_with(
        bin: &Path,
        lab: &'lab L,
        config: &Path,
        extra_args: &[&str],
    ) -> Result<Agent<'lab, L>, LabError> {
        let config = std::path::absolute(config)
            .map_err(|source| LabError::io(format!("resolving {}", config.display()), source))?;
        // Unique per start, so a restarted agent's readiness is its own.
        let run_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default();
        let ready_file = lab.scratch_dir().join(format!("agent-{run_id}.ready"));
        let log = lab.scratch_dir().join(format!("agent-{run_id}.log"));
        let log_file = std::fs::File::create(&log)
            .map_err(|source| LabError::io(format!("creating {}", log.display()), source))?;

        let mut command = lab.node_netns().command(bin);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .map_err(|source| LabError::io("duplicating the agent log fd", source))?,
            )
            .stderr(log_file);
        if !extra_args.contains(&"--run-dir") {
            // Not the host's /run/xlb: parallel agents each keep their own
            // status files, removed with the lab.
            command
                .arg("--run-dir")
                .arg(lab.scratch_dir().join(format!("agent-{run_id}.run")));
        }
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = ChildGuard::spawn(&mut command)?;
        let mut agent = Agent {
            child,
            lab,
            config,
            log,
            ready_file,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> Result<(), LabError> {
        let mut exited = None;
        let child = &mut self.child;
        let ready_file = &self.ready_file;
        let waited = poll_until("the agent's --ready-file", READY_TIMEOUT, || {
            if ready_file.exists() {
                return Some(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return Some(());
            }
            None
        });
        match (waited, exited) {
            (Ok(()), None) => Ok(()),
            (Ok(()), Some(status)) => Err(self.failure(format!(
                "the agent exited with {status} before it was ready"
            ))),
            (Err(error), _) => Err(self.failure(error.to_string())),
        }
    }

    /// An error that carries the agent's log.
    pub fn failure(&self, what: impl Into<String>) -> LabError {
        LabError::WithLog {
            what: format!("{} (`{}`)", what.into(), self.child.command()),
            log_name: "xlb agent log".to_owned(),
            log: self.log(),
        }
    }

    /// The config file the agent was started with.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The lab the agent runs in.
    pub fn lab(&self) -> &'lab L {
        self.lab
    }

    /// Everything the agent has logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the agent logs a line containing `needle` after byte
    /// offset `since` (take `agent.log().len()` before triggering it).
    pub fn wait_for_log(
        &self,
        since: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, LabError> {
        poll_until(&format!("the agent to log {needle:?}"), timeout, || {
            let log = self.log();
            let new = log.get(since..)?;
            new.lines()
                .find(|line| line.contains(needle))
                .map(str::to_owned)
        })
        .map_err(|error| self.failure(error.to_string()))
    }

    /// Ask the agent to re-read its config (SIGHUP).
    pub fn reload(&mut self) -> Result<(), LabError> {
        self.child.signal(libc::SIGHUP)
    }

    /// The config generation the agent serves, from its ready file
    /// (`ready generation=N`, rewritten after every applied reload).
    pub fn generation(&self) -> Option<u64> {
        let text = std::fs::read_to_string(&self.ready_file).ok()?;
        text.trim().strip_prefix("ready generation=")?.parse().ok()
    }

    /// SIGHUP, then wait until the agent serves a newer generation than
    /// before; returns it. Write the new config (atomically) first.
    pub fn reload_and_wait(&mut self) -> Result<u64, LabError> {
        let before = self.generation().unwrap_or(0);
        self.reload()?;
        poll_until(
            &format!("the agent to apply a config generation after {before}"),
            RELOAD_TIMEOUT,
            || self.generation().filter(|&now| now > before),
        )
        .map_err(|error| self.failure(error.to_string()))
    }

    /// True while the agent process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, wait for the agent to exit (it prints its counters), and
    /// return its status and log. Killed after `STOP_TIMEOUT`.
    pub fn stop(mut self) -> Result<AgentExit, LabError> {
        let status = self.child.stop(STOP_TIMEOUT)?;
        Ok(AgentExit {
            status,
            log: self.log(),
        })
    }

    /// [`stop`](Self::stop), and an error carrying the log unless the
    /// agent exited cleanly.
    pub fn stop_cleanly(self) -> Result<AgentExit, LabError> {
        let exit = self.stop()?;
        if exit.status.success() {
            return Ok(exit);
        }
        Err(LabError::WithLog {
            what: format!("the agent exited with {}", exit.status),
            log_name: "xlb agent log".to_owned(),
            log: exit.log,
        })
    }
}
