//! `cargo xtask setup`: install what building and testing xlb need on a fresh
//! Debian machine. Each item is checked first, so a second run is fast and
//! installs nothing; one line per item says `ok` or `installed`.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::build::check_status;

/// Debian packages: LLVM for bpf-linker (and the libraries llvm-config asks
/// for), the lab's tools (ip, ethtool, ping, sysctl, socat), iptables /
/// nftables, whose parsers check the bench's kube-proxy rules in the tests,
/// podman with runc (`cargo xtask image` and the container test; runc
/// because crun refuses this machine's hybrid cgroups) and prometheus for
/// `promtool`, which checks deploy/monitoring's alert rules.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "ethtool",
    "iputils-ping",
    "procps",
    "socat",
    "iptables",
    "nftables",
    "podman",
    "runc",
    "prometheus",
];

/// What the benchmark lab adds: nginx stream, the userspace proxy it
/// measures xlb against.
pub const BENCH_APT_PACKAGES: &[&str] = &["nginx-light", "libnginx-mod-stream"];

/// Where Debian's llvm-22 lives; bpf-linker's build finds it through this.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    require_root()?;
    nightly_rust_src()?;
    lint_components()?;
    apt_packages(APT_PACKAGES)?;
    bpf_linker()?;
    Ok(())
}

fn report(item: &str, installed: bool) {
    println!(
        "setup: {item:<32} {}",
        if installed { "installed" } else { "ok" }
    );
}

fn require_root() -> anyhow::Result<()> {
    xlb_tests::require_root()
        .context("setup installs Debian packages and the tests create network namespaces")
}

/// True if `program args` runs and exits 0 (output discarded).
fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn stdout_of(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not run `{program} {}`", args.join(" ")))?;
    if !output.status.success() {
        bail!("`{program} {}` failed ({})", args.join(" "), output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The eBPF crate builds with nightly's `-Z build-std`, which needs rust-src.
fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = stdout_of("rustup", &["toolchain", "list"])
        .context("rustup is needed to install the nightly toolchain the XDP object builds with")?;
    let mut installed = false;
    if !toolchains.lines().any(|line| line.starts_with("nightly-")) {
        check_status(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
            "rustup toolchain install nightly",
        )?;
        installed = true;
    }
    let components = stdout_of(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        check_status(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src --toolchain nightly",
        )?;
        installed = true;
    }
    report("rust nightly + rust-src", installed);
    Ok(())
}

/// `cargo xtask test` runs rustfmt and clippy on the default toolchain.
fn lint_components() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut missing = Vec::new();
    if !succeeds(&cargo, &["fmt", "--version"]) {
        missing.push("rustfmt");
    }
    if !succeeds(&cargo, &["clippy", "--version"]) {
        missing.push("clippy");
    }
    if !missing.is_empty() {
        check_status(
            Command::new("rustup")
                .args(["component", "add"])
                .args(&missing),
            "rustup component add rustfmt clippy",
        )?;
    }
    report("rustfmt + clippy", !missing.is_empty());
    Ok(())
}

/// Installs the packages in `packages` that are missing (`apt-get update`
/// only then).
pub fn apt_packages(packages: &[&str]) -> anyhow::Result<()> {
    // dpkg-query prints nothing (and complains on stderr) for packages it
    // has never heard of, so anything not listed as installed is missing.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Status}\\n"])
        .args(packages)
        .stderr(Stdio::null())
        .output()
        .context("could not run dpkg-query: setup expects a Debian machine")?;
    let listed = String::from_utf8_lossy(&output.stdout);
    let is_installed = |package: &str| {
        listed.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next().unwrap_or_default();
            // Multi-arch packages are listed as name:arch.
            name.split(':').next() == Some(package) && fields.next() == Some("installed")
        })
    };
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if !missing.is_empty() {
        println!("setup: apt-get install {}", missing.join(" "));
        check_status(
            Command::new("apt-get").args(["update", "-q"]),
            "apt-get update",
        )?;
        check_status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
        )?;
    }
    for package in packages {
        report(package, missing.contains(package));
    }
    Ok(())
}

/// bpf-linker built against Debian's LLVM 22 (a plain `cargo install
/// bpf-linker` wants an LLVM this machine does not have).
fn bpf_linker() -> anyhow::Result<()> {
    let present = succeeds("bpf-linker", &["--version"]);
    if !present {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        check_status(
            Command::new(cargo)
                .args([
                    "install",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
            "cargo install bpf-linker (with LLVM_PREFIX=/usr/lib/llvm-22)",
        )?;
        if !succeeds("bpf-linker", &["--version"]) {
            bail!(
                "bpf-linker was installed but `bpf-linker --version` still fails: \
                 is ~/.cargo/bin on PATH?"
            );
        }
    }
    report("bpf-linker", !present);
    Ok(())
}
