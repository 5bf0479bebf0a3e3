//! The lab's error type: each variant says what failed and how to fix it.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "{var} is not set: run via `cargo xtask test` (it builds xlb and xlb-echo and points {var} at the binary)"
    )]
    MissingBin { var: &'static str },

    #[error("{var}={} is not a file: run `cargo xtask build` first", path.display())]
    BinNotFound { var: &'static str, path: PathBuf },

    #[error("the lab needs root (network namespaces, veths, XDP): run it as root")]
    NotRoot,

    #[error(
        "could not start `{command}`: {source} (is it installed? `cargo xtask setup` installs the lab's tools)"
    )]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed with {status}: {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },

    #[error("{what}\n----- {log_name} -----\n{log}\n----- end of {log_name} -----")]
    WithLog {
        what: String,
        log_name: String,
        log: String,
    },
}

impl LabError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> LabError {
        LabError::Io {
            what: what.into(),
            source,
        }
    }
}
