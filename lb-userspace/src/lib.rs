//! The xlb agent as a library, so tests and xtask can drive its parts:
//! config sources -> `model::DesiredState` -> `reconcile` -> `kernel` maps.

pub mod agent;
pub mod cli;
pub mod kernel;
pub mod model;
pub mod observe;
pub mod reconcile;
pub mod source;

/// An error and its causes, `outer: inner: innermost` (causes already
/// quoted by their parent are skipped).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The XDP object (lb-ebpf) the agent loads; tests load this very object.
pub use kernel::OBJECT as DATAPATH_OBJECT;
