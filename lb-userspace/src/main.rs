//! `xlb`: command line and runtime wiring only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use xlb::agent::{self, RunOptions};
use xlb::error_chain;
use xlb::kernel::AttachMode;
use xlb::source::yaml::Overrides;

/// Kernel-accelerated L4 load balancer for Kubernetes nodes (XDP).
#[derive(Debug, Parser)]
#[command(name = "xlb", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the datapath, attach it, and keep its maps equal to the config
    /// (reloaded on SIGHUP and when the file changes) until SIGINT/SIGTERM.
    Run {
        /// The YAML config (see config/example.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Attach to this interface instead of node.interfaces (repeatable).
        #[arg(long = "iface", value_name = "IF")]
        interfaces: Vec<String>,
        /// XDP mode: native (driver), generic (skb), or auto (native, falling
        /// back to generic).
        #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
        xdp_mode: XdpMode,
        /// Write "ready generation=N" here once serving config generation N.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Validate a config without touching the kernel: prints
    /// "FILE: ok (N services, M backends)" or the located errors (exit 2).
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// As for `run`: interfaces that replace node.interfaces.
        #[arg(long = "iface", value_name = "IF")]
        interfaces: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum XdpMode {
    Auto,
    Native,
    Generic,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Check { config, interfaces } => {
            match agent::check(&config, &Overrides { interfaces }) {
                Ok((summary, warnings)) => {
                    for warning in warnings {
                        eprintln!("warning: {warning}");
                    }
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("{error}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run {
            config,
            interfaces,
            xdp_mode,
            ready_file,
        } => {
            let options = RunOptions {
                config,
                interfaces,
                attach_mode: match xdp_mode {
                    XdpMode::Auto => AttachMode::Auto,
                    XdpMode::Native => AttachMode::Native,
                    XdpMode::Generic => AttachMode::Generic,
                },
                ready_file,
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("xlb: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(options)) {
                Ok(()) => ExitCode::SUCCESS,
                // Located config errors go to stderr as they are, one per
                // line, so editors and scripts can parse them.
                Err(agent::AgentError::Config(error)) => {
                    eprintln!("{error}");
                    ExitCode::from(2)
                }
                Err(error) => {
                    log::error!("{}", error_chain(&error));
                    ExitCode::from(error.exit_code())
                }
            }
        }
    }
}
