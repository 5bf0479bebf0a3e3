//! `cargo xtask bench` runs this. `micro`: nanoseconds per packet for each
//! datapath path next to a trivial forwarding program, in one run. `lab`:
//! NodePort traffic through xlb, kube-proxy (iptables, nftables), nginx and
//! an XDP ceiling on a netns lab, with a scale sweep.

mod lab;
mod machine;
mod micro;

use xlb_bench::{BASELINE_OBJECT, LIMIT_OBJECT, TRAFFICGEN_OBJECT};

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xlb-bench", about = "xlb benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-packet cost of each datapath path with BPF_PROG_TEST_RUN, next to
    /// a program that only swaps MACs and returns XDP_TX.
    Micro {
        /// Also write the figures as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Measurement rounds; each path's figure is the median of rounds.
        #[arg(long, default_value_t = 7)]
        rounds: u32,
        /// Packets per path per round.
        #[arg(long, default_value_t = 20_000)]
        packets: u32,
        /// Measure this datapath object instead of the one built into the
        /// agent (to compare a change side by side).
        #[arg(long, value_name = "FILE")]
        object: Option<PathBuf>,
        /// Measure only this path (repeatable; default: every path), e.g.
        /// `--path established_udp6` under `perf record`.
        #[arg(long = "path", value_name = "NAME")]
        paths: Vec<String>,
    },
    /// Packets/s, new flows/s, TCP connections/s and latency through xlb,
    /// kube-proxy (iptables and nftables modes), nginx stream and a trivial
    /// XDP redirect, on a netns lab; then a sweep over the number of
    /// Services. Needs root.
    Lab(lab::Options),
    /// The agent under 10,000 Services / 100,000 backends: apply time by
    /// SIGHUP and from the Kubernetes source, /healthz latency throughout,
    /// resident memory. Needs root.
    Scale(lab::scale::Options),
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    match Cli::parse().command {
        Command::Lab(options) => lab::main(&options),
        Command::Scale(options) => lab::scale::main(&options),
        Command::Micro {
            json,
            rounds,
            packets,
            object,
            paths,
        } => {
            let object: &'static [u8] = match object {
                Some(path) => std::fs::read(&path)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?
                    .leak(),
                None => xlb::DATAPATH_OBJECT,
            };
            let report = micro::run(object, rounds, packets, &paths)?;
            print!("{}", report.table());
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&report)?;
                std::fs::write(&path, text + "\n").map_err(|e| {
                    anyhow::anyhow!("writing the JSON report to {}: {e}", path.display())
                })?;
                println!("wrote {}", path.display());
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
