//! Building the workspace and finding what it built.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};

use anyhow::{Context as _, bail};

/// The repository root (xtask lives in `ROOT/xtask`).
pub fn root() -> &'static Path {
    xlb_tests::repo_root()
}

/// The cargo that runs us (`$CARGO`), in the repository root.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

/// Run `command` and fail, naming it, if it fails; its output goes to ours.
pub fn check_status(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("could not start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); see its output above");
    }
    Ok(())
}

/// `cargo build` of the default members: agent (with the XDP object),
/// xlb-echo, tests' library and xtask.
pub fn build() -> anyhow::Result<()> {
    println!("xtask: cargo build");
    check_status(cargo().arg("build"), "cargo build")
}

/// The workspace's target directory, as cargo sees it (honours
/// CARGO_TARGET_DIR and .cargo/config.toml).
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("could not run cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("cargo metadata printed invalid JSON")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// Absolute path of a binary `cargo build` made.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = target_dir()?.join("debug").join(name);
    if !path.is_file() {
        bail!(
            "{} does not exist: `cargo xtask build` should have built it",
            path.display()
        );
    }
    Ok(path)
}

/// Our exit code for a child's status (128 + signal when it was killed).
pub fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}
