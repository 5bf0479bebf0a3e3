//! xlb's network-namespace lab: the client / node / backend namespaces that
//! `cargo xtask demo` and the end-to-end tests build, the processes that run
//! in them, and small socket helpers to talk to the echo backends.
//!
//! `packets` and `testrun` serve the datapath tests (tests/tests/datapath):
//! frames built with etherparse, run through the XDP object with
//! BPF_PROG_TEST_RUN.
//!
//! Everything here cleans up after itself on drop (also when a test panics),
//! and the first lab a process builds removes leftovers of dead processes.
//! All addresses come from 198.18.0.0/15 and 2001:db8::/32 and live only
//! inside namespaces the lab created.

pub mod agent;
#[cfg(feature = "apiserver")]
pub mod apiserver;
pub mod bpffs;
pub mod cgroup;
pub mod client;
mod cmd;
mod error;
pub mod family;
pub mod flows;
pub mod image;
#[cfg(feature = "apiserver")]
pub mod kustomize;
pub mod lab;
pub mod netns;
pub mod node_lab;
#[cfg(feature = "datapath")]
pub mod packets;
#[cfg(feature = "datapath")]
pub mod packets6;
pub mod process;
mod scratch;
#[cfg(feature = "datapath")]
pub mod testrun;
#[cfg(feature = "datapath")]
pub mod testrun6;
pub mod wait;
mod xdp_pass;

use std::path::{Path, PathBuf};

pub use agent::{Agent, AgentExit};
pub use bpffs::Bpffs;
pub use cgroup::TestCgroup;
pub use client::Who;
pub use error::LabError;
pub use family::Family;
pub use lab::{Backend, Lab};
pub use netns::{Netns, in_netns};
pub use process::ChildGuard;
pub use scratch::ScratchDir;
pub use wait::poll_until;
pub use xdp_pass::XdpPass;

/// Environment variable holding the absolute path of the agent binary.
pub const XLB_BIN_ENV: &str = "XLB_BIN";
/// Environment variable holding the absolute path of the echo backend binary.
pub const XLB_ECHO_BIN_ENV: &str = "XLB_ECHO_BIN";

/// Path of a binary named by `var`, which `cargo xtask test` sets.
pub fn bin_from_env(var: &'static str) -> Result<PathBuf, LabError> {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .ok_or(LabError::MissingBin { var })?;
    if !path.is_file() {
        return Err(LabError::BinNotFound { var, path });
    }
    Ok(path)
}

/// The repository's root directory (where `config/` lives).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the repository")
}

/// `config/demo.yaml`, whose topology `Lab::new(2)` builds.
pub fn demo_config() -> PathBuf {
    repo_root().join("config").join("demo.yaml")
}

/// tests/config/demo-dual-stack.yaml: `demo_config()` for the dual-stack
/// lab, NodePorts on 198.18.0.1 and 2001:db8::1, each pod listed by both
/// its addresses.
pub fn dual_stack_config() -> PathBuf {
    repo_root()
        .join("tests")
        .join("config")
        .join("demo-dual-stack.yaml")
}

/// tests/config/demo-ipv6.yaml: `demo_config()` with IPv6 addresses only.
pub fn ipv6_config() -> PathBuf {
    repo_root()
        .join("tests")
        .join("config")
        .join("demo-ipv6.yaml")
}

/// Network namespaces, veths and XDP need root; say so instead of failing
/// with a confusing "Operation not permitted" from `ip`.
pub fn require_root() -> Result<(), LabError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(LabError::NotRoot)
    }
}
