//! `cargo xtask test`: setup, build, lint, then every test in the workspace
//! with the end-to-end tests pointed at the binaries just built.

use std::process::ExitCode;

use xlb_tests::{XLB_BIN_ENV, XLB_ECHO_BIN_ENV};

use crate::build::{self, cargo, check_status};
use crate::setup;

pub fn run(no_lint: bool, test_args: &[String]) -> anyhow::Result<ExitCode> {
    setup::run()?;
    build::build()?;
    if !no_lint {
        println!("xtask: cargo fmt --all -- --check");
        check_status(
            cargo().args(["fmt", "--all", "--", "--check"]),
            "cargo fmt --check (run `cargo fmt --all` to fix)",
        )?;
        println!("xtask: cargo clippy --workspace --all-targets -- -D warnings");
        check_status(
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            "cargo clippy",
        )?;
    }
    let xlb = build::bin("xlb")?;
    let echo = build::bin("xlb-echo")?;
    println!(
        "xtask: cargo test --workspace --no-fail-fast ({XLB_BIN_ENV}={}, {XLB_ECHO_BIN_ENV}={})",
        xlb.display(),
        echo.display()
    );
    // --no-fail-fast: one crate's failure must not hide the others' results.
    let status = cargo()
        .args(["test", "--workspace", "--no-fail-fast", "--"])
        .args(test_args)
        .env(XLB_BIN_ENV, &xlb)
        .env(XLB_ECHO_BIN_ENV, &echo)
        .status()?;
    if !status.success() {
        eprintln!("xtask: cargo test failed ({status})");
    }
    Ok(build::exit_code(status))
}
