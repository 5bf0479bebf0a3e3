//! Log setup: tracing with levels and an env filter (`RUST_LOG`, e.g.
//! `info`, `xlb=debug`, `xlb::reconcile=trace`). Records from the `log`
//! crate (most of the agent, and aya-log's datapath records with
//! `--datapath-debug`) are bridged into it.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// The filter when `RUST_LOG` is unset or invalid.
///
/// kube_client logs an ERROR for every failed request while the API server
/// is away; the Kubernetes source reports the outage once itself.
pub const DEFAULT_FILTER: &str = "info,kube_client=off";

/// Where aya-log's records from the datapath (lb-ebpf) log to.
pub const DATAPATH_TARGET: &str = "lb_ebpf";

/// Installs the global subscriber (logs go to stderr). With
/// `datapath_debug`, the datapath's debug records are shown whatever the
/// filter says about other targets. A second call, or a subscriber
/// installed by someone else, is left alone.
pub fn init(datapath_debug: bool) {
    let (mut filter, invalid) = match std::env::var("RUST_LOG") {
        Ok(text) if !text.trim().is_empty() => match EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new(DEFAULT_FILTER), Some((text, error))),
        },
        _ => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    if datapath_debug && let Ok(directive) = format!("{DATAPATH_TARGET}=debug").parse() {
        filter = filter.add_directive(directive);
    }
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    if installed.is_ok()
        && let Some((text, error)) = invalid
    {
        tracing::warn!(
            "RUST_LOG={text:?} is not a valid filter ({error}); logging at {DEFAULT_FILTER}"
        );
    }
}
