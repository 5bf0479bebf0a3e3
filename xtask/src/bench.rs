//! `cargo xtask bench`: build the agent and the bench, then run the lab
//! benchmark (`xlb-bench lab`: xlb vs an XDP ceiling, kube-proxy iptables
//! and nftables, nginx stream, ClusterIP from a pod through the socket
//! hooks vs iptables vs direct; the real-node paths, uplink to a local
//! bridge pod and to remote pods, for xlb and iptables; and a scale sweep),
//! or with `--micro` the
//! per-packet datapath benchmark (`xlb-bench micro`).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context as _;
use xlb_tests::{XLB_BIN_ENV, XLB_ECHO_BIN_ENV};

use crate::build::{self, cargo, check_status};
use crate::setup;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Per-packet cost of each datapath path (BPF_PROG_TEST_RUN) instead of
    /// the lab benchmark.
    #[arg(long)]
    micro: bool,
    /// The agent under 10,000 Services / 100,000 backends (apply time by
    /// SIGHUP and from the Kubernetes source, /healthz latency, memory)
    /// instead of the lab benchmark.
    #[arg(long, conflicts_with = "micro")]
    scale: bool,
    /// CI smoke run of the lab benchmark (well under 3 minutes once built).
    #[arg(long)]
    quick: bool,
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where the sweep chart goes (default: target/xlb-bench/sweep.svg).
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Build and measure release binaries (the default for a full run; the
    /// agent's apply time and RSS mean little in a debug build).
    #[arg(long, conflicts_with = "debug")]
    release: bool,
    /// Build and measure debug binaries (the default with --quick/--micro).
    #[arg(long)]
    debug: bool,
    /// More arguments for `xlb-bench lab` (see `xlb-bench lab --help`),
    /// e.g. `-- --systems xlb,iptables --sweep 1,1000 --repeats 5`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    setup::run()?;
    if !(args.micro || args.scale) {
        setup::apt_packages(setup::BENCH_APT_PACKAGES)?;
    }
    let release = args.release || !(args.debug || args.quick || args.micro);
    let profile = if release { "release" } else { "debug" };
    println!("xtask: cargo build ({profile}) of the agent and the bench");
    let mut command = cargo();
    // xlb-echo: the pods' servers of the ClusterIP part of the lab bench.
    command.args([
        "build",
        "-p",
        "lb-userspace",
        "-p",
        "xlb-bench",
        "-p",
        "xlb-echo",
    ]);
    if release {
        command.arg("--release");
    }
    check_status(&mut command, "cargo build")?;
    let dir = build::target_dir()?.join(profile);
    let bench = dir.join("xlb-bench");
    let xlb = dir.join("xlb");
    let echo = dir.join("xlb-echo");
    for path in [&bench, &xlb, &echo] {
        anyhow::ensure!(path.is_file(), "{} was not built", path.display());
    }

    let mut command = Command::new(&bench);
    if args.micro || args.scale {
        command.arg(if args.micro { "micro" } else { "scale" });
        if let Some(json) = &args.json {
            command.arg("--json").arg(json);
        }
    } else {
        let svg = match &args.svg {
            Some(svg) => svg.clone(),
            None => build::target_dir()?.join("xlb-bench").join("sweep.svg"),
        };
        command.arg("lab").arg("--svg").arg(svg);
        if args.quick {
            command.arg("--quick");
        }
        if let Some(json) = &args.json {
            command.arg("--json").arg(json);
        }
    }
    command
        .args(&args.args)
        .env(XLB_BIN_ENV, &xlb)
        .env(XLB_ECHO_BIN_ENV, &echo);
    println!(
        "xtask: {} ({XLB_BIN_ENV}={})",
        bench.display(),
        xlb.display()
    );
    let status = command
        .status()
        .with_context(|| format!("could not start {}", bench.display()))?;
    Ok(build::exit_code(status))
}
