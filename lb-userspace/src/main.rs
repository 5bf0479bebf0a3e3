//! `xlb`: command line and runtime wiring only; the work is in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use xlb::agent::{self, RunOptions};
use xlb::kernel::AttachMode;
use xlb::source::kube::SourceOptions;
use xlb::source::yaml::Overrides;
use xlb::{cli, error_chain, observe};

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
        /// Pin maps (DIR/maps/NAME) and XDP links (DIR/links/IF) here, on a
        /// bpffs; a restarted agent adopts them without losing a flow
        /// [default: /sys/fs/bpf/xlb, or unpinned where that is no bpffs].
        #[arg(long, value_name = "DIR")]
        bpffs: Option<PathBuf>,
        /// On SIGTERM/SIGINT leave the pinned XDP links and maps in place:
        /// the datapath keeps forwarding until the next agent adopts them.
        #[arg(long)]
        keep_attached: bool,
        /// Take services from the Kubernetes API (Services, EndpointSlices,
        /// this Node) instead of the config file, which then gives only the
        /// node's settings. Uses the in-cluster service account unless
        /// --kubeconfig is given.
        #[arg(long, conflicts_with = "manifests")]
        kubernetes: bool,
        /// The kubeconfig for --kubernetes (its current context).
        #[arg(long, value_name = "FILE", requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// This node's name, for --kubernetes and --manifests: selects its
        /// Node and marks its endpoints local [default: $NODE_NAME].
        #[arg(long, value_name = "NAME")]
        node_name: Option<String>,
        /// Take services from Service and EndpointSlice manifests: a file, a
        /// directory of *.yaml/*.yml/*.json, or - for standard input.
        #[arg(long, value_name = "PATH|-")]
        manifests: Option<PathBuf>,
        /// Attach the socket hooks (connect4, sendmsg4, recvmsg4,
        /// getpeername4 and their IPv6 twins connect6, ...) to this cgroup
        /// v2 directory: processes in it (the
        /// node's, pods') reach NodePorts, load-balancer, external and
        /// ClusterIPs, balanced at connect()/sendmsg(). On a node, the
        /// cgroup2 mount (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
        /// hybrid hosts) [default: off].
        #[arg(long, value_name = "DIR")]
        cgroup: Option<PathBuf>,
        /// The flow hash's 64-bit secret (16+ hex digits), the same file on
        /// every node (in Kubernetes, a mounted Secret); created with a
        /// random secret (mode 0600) if missing [default: random per run].
        #[arg(long, value_name = "FILE")]
        hash_seed_file: Option<PathBuf>,
        /// Frontends and backend ids the service maps start with. With
        /// pinned maps (a bpffs) they grow when the services need more:
        /// xlb starts itself again in place, keeping flows [default:
        /// 65536,131072].
        #[arg(long, value_name = "FRONTENDS,BACKENDS")]
        map_capacity: Option<xlb::agent::MapCapacity>,
        #[command(flatten)]
        observe: observe::Flags,
    },
    /// Detach the XDP links and remove the maps an agent run with
    /// --keep-attached left pinned.
    Detach {
        /// The --bpffs the agent ran with [default: /sys/fs/bpf/xlb].
        #[arg(long, value_name = "DIR")]
        bpffs: Option<PathBuf>,
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
    #[command(flatten)]
    Inspect(cli::Command),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum XdpMode {
    Auto,
    Native,
    Generic,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let datapath_debug =
        matches!(&cli.command, Command::Run { observe, .. } if observe.datapath_debug);
    observe::logging::init(datapath_debug);
    match cli.command {
        Command::Inspect(command) => cli::run(&command),
        Command::Detach { bpffs } => detach(bpffs.as_deref()),
        Command::Check { config, interfaces } => check(&config, interfaces),
        Command::Run {
            config,
            interfaces,
            xdp_mode,
            ready_file,
            bpffs,
            keep_attached,
            kubernetes,
            kubeconfig,
            node_name,
            manifests,
            cgroup,
            hash_seed_file,
            map_capacity,
            observe,
        } => {
            let options = RunOptions {
                config,
                interfaces,
                attach_mode: xdp_mode.into(),
                ready_file,
                observe,
                bpffs,
                keep_attached,
                cgroup,
                hash_seed_file,
                map_capacity: map_capacity.unwrap_or_default(),
                services: if kubernetes {
                    Some(SourceOptions::Kubernetes {
                        kubeconfig,
                        node_name,
                    })
                } else {
                    manifests.map(|path| SourceOptions::Manifests { path, node_name })
                },
            };
            serve(options)
        }
    }
}

impl From<XdpMode> for AttachMode {
    fn from(mode: XdpMode) -> Self {
        match mode {
            XdpMode::Auto => AttachMode::Auto,
            XdpMode::Native => AttachMode::Native,
            XdpMode::Generic => AttachMode::Generic,
        }
    }
}

/// `xlb detach`: prints what it removed.
fn detach(bpffs: Option<&Path>) -> ExitCode {
    match agent::detach(bpffs) {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("xlb: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// `xlb check`: the summary, or the located errors and exit 2.
fn check(config: &Path, interfaces: Vec<String>) -> ExitCode {
    match agent::check(config, &Overrides { interfaces }) {
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

/// `xlb run`: the agent until SIGINT/SIGTERM.
fn serve(options: RunOptions) -> ExitCode {
    // The agent's loop runs on this thread and does blocking work
    // (map writes, conntrack sweeps); /healthz, /readyz, /metrics
    // and the health-check ports are tasks on the worker thread, so
    // they answer while it does.
    xlb::kernel::sys::one_heap_arena();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("xlb-serve")
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
