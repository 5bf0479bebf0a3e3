//! `cargo xtask <command>`: everything a developer or CI runs, from a fresh
//! machine to a green test run.

mod bench;
mod build;
mod demo;
mod image;
mod setup;
mod signals;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for xlb")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need (nightly rust-src, LLVM 22,
    /// bpf-linker, lab tools); fast and quiet when all is there.
    Setup,
    /// `cargo build` of the workspace (the agent's build.rs builds the XDP
    /// object; run `setup` first on a new machine).
    Build,
    /// Setup, build, then run `target/debug/xlb ARGS`.
    Run {
        /// Arguments for xlb, e.g. `-- check --config config/demo.yaml`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the lab of config/demo.yaml, run the agent, send UDP and TCP
    /// through both NodePorts and show where it went.
    Demo,
    /// Setup, build, fmt and clippy, then the unit and end-to-end tests.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Passed to the test binaries: a test-name filter, `--nocapture`, ...
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Lab benchmark: xlb vs an XDP ceiling, kube-proxy (iptables and
    /// nftables) and nginx, plus a Service-count sweep (`--micro`: the
    /// per-packet datapath benchmark).
    Bench(bench::BenchArgs),
    /// Build the agent image offline with podman (FROM scratch: xlb,
    /// xlb-echo, `ip` and the shared libraries they load), tagged as the
    /// development overlay names it.
    Image(image::ImageArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Command::Build => build::build().map(|()| ExitCode::SUCCESS),
        Command::Run { args } => run(&args),
        Command::Demo => demo::run(),
        Command::Test { no_lint, args } => test::run(no_lint, &args),
        Command::Bench(args) => bench::run(&args),
        Command::Image(args) => image::run(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Like the aya book's xtask: build, then run the agent with `args`.
fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    setup::run()?;
    build::build()?;
    let xlb = build::bin("xlb")?;
    let status = std::process::Command::new(&xlb)
        .args(args)
        .status()
        .map_err(|error| anyhow::anyhow!("could not start {}: {error}", xlb.display()))?;
    Ok(build::exit_code(status))
}
