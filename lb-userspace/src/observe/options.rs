//! `xlb run`'s observability flags: the run directory, where /metrics
//! answers, and the datapath's debug logs.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::rundir;

/// `--metrics-addr`'s default: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9090";

/// `xlb run`'s flags for this module.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct Flags {
    /// Where to keep status.json and catalog.json, which `xlb status`,
    /// `xlb services` and `xlb flows` read.
    #[arg(long, value_name = "DIR", default_value = rundir::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Where /metrics, /healthz and /readyz answer over HTTP, or `off`.
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: MetricsAddr,
    /// Turn on the datapath's debug logs (a line per packet through
    /// aya-log, at debug level: RUST_LOG=debug). For debugging only.
    #[arg(long)]
    pub datapath_debug: bool,
}

impl Default for Flags {
    fn default() -> Self {
        Self {
            run_dir: PathBuf::from(rundir::DEFAULT_RUN_DIR),
            metrics_addr: MetricsAddr(parse_metrics_addr(DEFAULT_METRICS_ADDR).ok().flatten()),
            datapath_debug: false,
        }
    }
}

impl Flags {
    /// The options for `Observe::start`.
    pub fn options(&self, bpffs: PathBuf, config_source: String) -> Options {
        Options {
            run_dir: self.run_dir.clone(),
            bpffs,
            metrics_addr: self.metrics_addr.0,
            datapath_debug: self.datapath_debug,
            config_source,
        }
    }
}

/// `--metrics-addr`: an address and port, or `off` (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_metrics_addr(text).map(MetricsAddr)
    }
}

/// What `xlb run` was told about observability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// `--run-dir`.
    pub run_dir: PathBuf,
    /// `--bpffs` (recorded in status.json so the CLI finds the pins).
    pub bpffs: PathBuf,
    /// `--metrics-addr`; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// `--datapath-debug`.
    pub datapath_debug: bool,
    /// Where the config comes from, for status (`file config/demo.yaml`).
    pub config_source: String,
}

/// Parses `--metrics-addr`: an address and port, or `off`.
pub fn parse_metrics_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        format!("{text:?} is not ADDRESS:PORT (e.g. {DEFAULT_METRICS_ADDR}) or \"off\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_flag() {
        assert_eq!(
            parse_metrics_addr("127.0.0.1:9090"),
            Ok(Some(SocketAddr::from(([127, 0, 0, 1], 9090))))
        );
        assert_eq!(parse_metrics_addr("off"), Ok(None));
        assert!(parse_metrics_addr("9090").is_err());
    }
}
