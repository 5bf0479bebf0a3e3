//! `xlb status | services | flows | stats | explain`: what a running agent and its
//! datapath are doing, read from the pinned maps (`--bpffs`) and the run
//! directory (`--run-dir`). Read-only, so safe next to a running agent.
//! Tables for people by default, `--json` for scripts.

pub mod explain;
mod flows;
mod services;
mod stats;
mod status;
pub mod table;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use crate::error_chain;
use crate::kernel::DEFAULT_BPFFS;
use crate::observe::catalog::Catalog;
use crate::observe::datapath::{DatapathError, DatapathMaps};
use crate::observe::rundir::{
    self, CATALOG_FILE, DEFAULT_RUN_DIR, RunDirError, STATUS_FILE, Status,
};

/// Which agent to look at, and how to print.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// Where the agent pins its maps and links [default: the --bpffs the
    /// agent's status.json names, else /sys/fs/bpf/xlb].
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// The agent's run directory (status.json, catalog.json).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The read-only subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// The agent and datapath: interfaces and XDP mode, program id, config
    /// source and generation, map fill levels, uptime.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Each service's frontends and backends with weight, state and
    /// forwarded packets and bytes.
    Services {
        #[command(flatten)]
        target: Target,
    },
    /// Conntrack: each flow's original and translated addresses, backend,
    /// age and state.
    Flows {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        filter: flows::Filter,
        /// Show at most N flows (0: all).
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
        /// Print again every SECONDS (default 2) until interrupted; with
        /// --json, one JSON document per line.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// Packets the datapath handled, by reason (summed over CPUs).
    Stats {
        #[command(flatten)]
        target: Target,
    },
    /// What the datapath would do with one packet, and why: service,
    /// existing flow, backend and Maglev slot, affinity, masquerade
    /// address and port, next hop, verdict. Runs the datapath's own program
    /// on a built packet against the live configuration; writes no live
    /// map and sends nothing. Needs root (CAP_BPF, CAP_PERFMON), in the
    /// agent's network namespace.
    Explain {
        #[command(flatten)]
        target: Target,
        /// tcp (a SYN, or an ACK when the tuple has a flow) or udp.
        #[arg(value_enum)]
        protocol: explain::Protocol,
        /// The client: ADDRESS:PORT (an IPv6 one in brackets,
        /// `[2001:db8::2]:40000`).
        #[arg(value_name = "SRC:PORT")]
        source: std::net::SocketAddr,
        /// The frontend: ADDRESS:PORT, of the client's family.
        #[arg(value_name = "DST:PORT")]
        destination: std::net::SocketAddr,
        /// The interface the packet arrives on [default: the one this node
        /// routes SRC through].
        #[arg(long, value_name = "IF")]
        iface: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "no xlb agent is running with --bpffs {bpffs}{detail}: start one with `xlb run --config FILE`, or pass the --bpffs and --run-dir it runs with"
    )]
    NotRunning { bpffs: String, detail: String },
    #[error("the xlb agent (pid {pid}) is running but has pinned no maps in {bpffs}/maps{detail}")]
    NotPinned {
        pid: u32,
        bpffs: String,
        detail: String,
    },
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Explain(#[from] crate::kernel::explain::ExplainError),
    #[error("no service {name:?} in {catalog}; `xlb services` lists them")]
    UnknownService { name: String, catalog: String },
    #[error("cannot write the output")]
    Output {
        #[source]
        source: std::io::Error,
    },
}

/// Runs a subcommand and prints its report (or the error) the way the
/// user asked. Exit status 1 on error.
pub fn run(command: &Command) -> ExitCode {
    let result = match command {
        Command::Status { target } => print(target, status::report),
        Command::Services { target } => print(target, services::report),
        Command::Flows {
            target,
            filter,
            limit,
            watch: None,
        } => print(target, |session| flows::report(session, filter, *limit)),
        Command::Flows {
            target,
            filter,
            limit,
            watch: Some(seconds),
        } => watch(target, *seconds, |session| {
            flows::report(session, filter, *limit)
        }),
        Command::Stats { target } => print(target, stats::report),
        Command::Explain {
            target,
            protocol,
            source,
            destination,
            iface,
        } => print(target, |session| {
            let question = explain::Question {
                protocol: *protocol,
                source: *source,
                destination: *destination,
            };
            explain::report(session, &question, iface.as_deref())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xlb: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// `--watch`: the report again every `seconds` (the screen cleared first
/// for people; one compact JSON document per line with --json) until
/// interrupted or an error.
fn watch<R: Report>(
    target: &Target,
    seconds: f64,
    report: impl Fn(&Session) -> Result<R, CliError>,
) -> Result<(), CliError> {
    let interval = std::time::Duration::from_secs_f64(seconds.clamp(0.1, 3600.0));
    loop {
        let session = Session::open(target)?;
        let report = report(&session)?;
        let text = if target.json {
            let mut text = serde_json::to_string(&report).map_err(|source| CliError::Output {
                source: std::io::Error::other(source),
            })?;
            text.push('\n');
            text
        } else {
            // Clear the screen and home the cursor, as watch(1) does.
            format!(
                "\x1b[2J\x1b[H{} every {seconds}s\n\n{}",
                chrono_now(),
                report.render()
            )
        };
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|source| CliError::Output { source })?;
        drop(stdout);
        std::thread::sleep(interval);
    }
}

/// The wall-clock time of day (UTC), for --watch's header.
fn chrono_now() -> String {
    let seconds = rundir::unix_now() % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// A report the CLI prints: JSON, or the human rendering.
pub trait Report: Serialize {
    fn render(&self) -> String;
}

fn print<R: Report>(
    target: &Target,
    report: impl FnOnce(&Session) -> Result<R, CliError>,
) -> Result<(), CliError> {
    let session = Session::open(target)?;
    for warning in &session.warnings {
        eprintln!("xlb: warning: {warning}");
    }
    let report = report(&session)?;
    let text = if target.json {
        let mut text =
            serde_json::to_string_pretty(&report).map_err(|source| CliError::Output {
                source: std::io::Error::other(source),
            })?;
        text.push('\n');
        text
    } else {
        report.render()
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|source| CliError::Output { source })
}

/// What one CLI invocation reads: the agent's files and its pinned maps.
pub struct Session {
    pub bpffs: PathBuf,
    pub run_dir: PathBuf,
    /// status.json, if there is one.
    pub status: Option<Status>,
    /// The process that wrote `status` still runs.
    pub alive: bool,
    /// catalog.json (empty if missing: ids then print as numbers).
    pub catalog: Catalog,
    pub has_catalog: bool,
    pub maps: DatapathMaps,
    /// Things the user should know, printed to stderr.
    pub warnings: Vec<String>,
}

impl Session {
    pub fn open(target: &Target) -> Result<Session, CliError> {
        let status: Option<Status> = rundir::read_json(&target.run_dir, STATUS_FILE)?;
        let alive = status.as_ref().is_some_and(rundir::is_alive);
        let bpffs = match (&target.bpffs, &status) {
            (Some(bpffs), _) => bpffs.clone(),
            (None, Some(status)) if !status.bpffs.is_empty() => PathBuf::from(&status.bpffs),
            (None, _) => PathBuf::from(DEFAULT_BPFFS),
        };
        let mut warnings = Vec::new();
        let maps = match DatapathMaps::from_pins(&bpffs) {
            Ok(maps) => maps,
            Err(DatapathError::NotPinned { .. }) => {
                // An agent that runs without pins: its maps are reachable
                // through its program while it runs.
                let program = status.as_ref().filter(|_| alive).and_then(|s| s.program_id);
                match program {
                    Some(id) => DatapathMaps::of_program(id)?,
                    None => {
                        return Err(not_pinned(&bpffs, &target.run_dir, status.as_ref(), alive));
                    }
                }
            }
            Err(error) => return Err(error.into()),
        };
        match &status {
            Some(status) if !alive => warnings.push(format!(
                "no xlb agent is running: pid {} (which wrote {}) has exited; showing what its pinned maps in {} hold now",
                status.pid,
                target.run_dir.join(STATUS_FILE).display(),
                bpffs.display()
            )),
            Some(status) if !same_dir(&bpffs, Path::new(&status.bpffs)) => warnings.push(format!(
                "the agent in {} pins its maps in {}, not in {}: names and states may not match these counters",
                target.run_dir.display(),
                status.bpffs,
                bpffs.display()
            )),
            Some(_) => {}
            None => warnings.push(format!(
                "no {} in {}: showing the maps pinned in {} without service names; pass the --run-dir the agent runs with",
                STATUS_FILE,
                target.run_dir.display(),
                bpffs.display()
            )),
        }
        let catalog: Option<Catalog> = rundir::read_json(&target.run_dir, CATALOG_FILE)?;
        Ok(Session {
            bpffs,
            run_dir: target.run_dir.clone(),
            has_catalog: catalog.is_some(),
            catalog: catalog.unwrap_or_default(),
            status,
            alive,
            maps,
            warnings,
        })
    }

    pub fn catalog_path(&self) -> String {
        self.run_dir.join(CATALOG_FILE).display().to_string()
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The error for "nothing pinned where we looked", saying as much as the
/// run directory tells.
fn not_pinned(bpffs: &Path, run_dir: &Path, status: Option<&Status>, alive: bool) -> CliError {
    let shown = bpffs.display().to_string();
    match status {
        Some(status) if alive => {
            let detail = if !same_dir(bpffs, Path::new(&status.bpffs)) {
                format!(
                    "; it pins them in {} (pass --bpffs {})",
                    status.bpffs, status.bpffs
                )
            } else if !status.ready {
                String::from(" yet; it is still starting, try again in a moment")
            } else {
                String::from("; is it an xlb without map pinning?")
            };
            CliError::NotPinned {
                pid: status.pid,
                bpffs: shown,
                detail,
            }
        }
        Some(status) => CliError::NotRunning {
            bpffs: shown,
            detail: format!(
                " (the last one, pid {}, started {} ago, has exited)",
                status.pid,
                table::duration(rundir::unix_now().saturating_sub(status.started_at))
            ),
        },
        None => CliError::NotRunning {
            bpffs: shown,
            detail: format!(
                " (no maps pinned there, no {} in {})",
                STATUS_FILE,
                run_dir.display()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path) -> Target {
        Target {
            bpffs: Some(dir.join("bpffs")),
            run_dir: dir.join("run"),
            json: false,
        }
    }

    fn error_text(target: &Target) -> String {
        match Session::open(target) {
            Ok(_) => panic!("opened a session on nothing"),
            Err(error) => error_chain(&error),
        }
    }

    #[test]
    fn says_clearly_when_no_agent_runs() {
        let dir = std::env::temp_dir().join(format!("xlb-cli-test-{}", std::process::id()));
        let target = target(&dir);
        let bpffs = dir.join("bpffs").display().to_string();
        assert_eq!(
            error_text(&target),
            format!(
                "no xlb agent is running with --bpffs {bpffs} (no maps pinned there, no status.json in {}): start one with `xlb run --config FILE`, or pass the --bpffs and --run-dir it runs with",
                target.run_dir.display()
            )
        );

        // A status.json whose process is gone.
        rundir::create(&target.run_dir).unwrap();
        let stale = Status {
            pid: u32::MAX,
            started_at: rundir::unix_now() - 65,
            bpffs: bpffs.clone(),
            ..Status::default()
        };
        rundir::write_json(&target.run_dir, STATUS_FILE, &stale).unwrap();
        let text = error_text(&target);
        assert!(
            text.starts_with(&format!(
                "no xlb agent is running with --bpffs {bpffs} (the last one, pid {}, started 1m 0",
                u32::MAX
            )),
            "{text}"
        );

        // A live agent (this process) that pins elsewhere.
        let (pid, process_start_ticks) = rundir::this_process();
        let live = Status {
            pid,
            process_start_ticks,
            bpffs: String::from("/sys/fs/bpf/elsewhere"),
            ready: true,
            ..Status::default()
        };
        rundir::write_json(&target.run_dir, STATUS_FILE, &live).unwrap();
        assert_eq!(
            error_text(&target),
            format!(
                "the xlb agent (pid {pid}) is running but has pinned no maps in {bpffs}/maps; it pins them in /sys/fs/bpf/elsewhere (pass --bpffs /sys/fs/bpf/elsewhere)"
            )
        );
        // Without --bpffs, the CLI looks where status.json says.
        let defaulted = Target {
            bpffs: None,
            ..target.clone()
        };
        assert!(
            error_text(&defaulted).contains("pinned no maps in /sys/fs/bpf/elsewhere/maps"),
            "{}",
            error_text(&defaulted)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
