//! Bad configs are refused by `xlb check` and `xlb run` with exit code 2 and
//! a message naming the file, the line and the field.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use xlb_tests::{ChildGuard, Netns, ScratchDir, XLB_BIN_ENV, bin_from_env, demo_config};

/// The demo config with one edit, and where the error must point.
struct Case {
    name: &'static str,
    /// Replace this text of config/demo.yaml...
    find: &'static str,
    /// ...with this one.
    replace: &'static str,
    /// The error names this field (path)...
    field: &'static str,
    /// ...and the line holding this text (its `occurrence`-th, from 0).
    line_of: &'static str,
    occurrence: usize,
}

const CASES: &[Case] = &[
    Case {
        name: "unsupported protocol",
        find: "protocol: UDP",
        replace: "protocol: SCTP",
        field: "services[1].protocol",
        line_of: "SCTP",
        occurrence: 0,
    },
    Case {
        name: "nodePort out of range",
        find: "nodePort: 30999",
        replace: "nodePort: 70000",
        field: "services[0].nodePort",
        line_of: "70000",
        occurrence: 0,
    },
    Case {
        name: "backend address not IPv4",
        find: "- address: 198.18.2.2\n        weight: 1",
        replace: "- address: 198.18.2.300\n        weight: 1",
        field: "services[0].backends[1].address",
        line_of: "198.18.2.300",
        occurrence: 0,
    },
    Case {
        name: "misspelt key",
        find: "targetPort: 4444",
        replace: "targetPorts: 4444",
        field: "targetPorts",
        line_of: "targetPorts",
        occurrence: 0,
    },
    Case {
        name: "duplicate nodePort",
        find: "nodePort: 30998\n    targetPort: 4444",
        replace: "nodePort: 30998\n    targetPort: 4444\n\n  - name: udp-again\n    protocol: UDP\n    nodePort: 30998\n    targetPort: 4445",
        field: "services[2].nodePort",
        line_of: "nodePort: 30998",
        occurrence: 1,
    },
];

/// Write each case's config into `dir`; (case, path, 1-based line).
fn write_cases(
    dir: &ScratchDir,
) -> anyhow::Result<Vec<(&'static Case, std::path::PathBuf, usize)>> {
    let demo = std::fs::read_to_string(demo_config())?;
    let mut written = Vec::new();
    for (index, case) in CASES.iter().enumerate() {
        assert!(
            demo.contains(case.find),
            "{}: config/demo.yaml changed: no {:?}",
            case.name,
            case.find
        );
        let text = demo.replacen(case.find, case.replace, 1);
        let line = text
            .lines()
            .enumerate()
            .filter(|(_, line)| line.contains(case.line_of))
            .nth(case.occurrence)
            .map(|(index, _)| index + 1)
            .unwrap_or_else(|| panic!("{}: no {:?} in the config", case.name, case.line_of));
        let path = dir.write(&format!("bad-{index}.yaml"), &text)?;
        written.push((case, path, line));
    }
    Ok(written)
}

fn check_message(case: &Case, path: &Path, line: usize, code: Option<i32>, stderr: &str) {
    let path = path.display().to_string();
    assert_eq!(code, Some(2), "{}: exit code, stderr:\n{stderr}", case.name);
    assert!(
        stderr.contains(&path),
        "{}: names the file {path}:\n{stderr}",
        case.name
    );
    assert!(
        stderr.contains(&format!("{path}:{line}:")) || stderr.contains(&format!("line {line}")),
        "{}: names line {line}:\n{stderr}",
        case.name
    );
    assert!(
        stderr.contains(case.field),
        "{}: names the field {}:\n{stderr}",
        case.name,
        case.field
    );
}

fn output_of(command: &mut Command) -> anyhow::Result<Output> {
    Ok(command.stdin(Stdio::null()).output()?)
}

#[test]
fn check_accepts_the_demo_config() -> anyhow::Result<()> {
    let xlb = bin_from_env(XLB_BIN_ENV)?;
    let output = output_of(
        Command::new(&xlb)
            .arg("check")
            .arg("--config")
            .arg(demo_config()),
    )?;
    assert!(
        output.status.success(),
        "xlb check config/demo.yaml: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn check_rejects_bad_configs_naming_file_line_and_field() -> anyhow::Result<()> {
    let xlb = bin_from_env(XLB_BIN_ENV)?;
    let dir = ScratchDir::new()?;
    for (case, path, line) in write_cases(&dir)? {
        let output = output_of(Command::new(&xlb).arg("check").arg("--config").arg(&path))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        check_message(case, &path, line, output.status.code(), &stderr);
    }
    Ok(())
}

#[test]
fn run_refuses_bad_configs_before_touching_the_node() -> anyhow::Result<()> {
    let xlb = bin_from_env(XLB_BIN_ENV)?;
    let dir = ScratchDir::new()?;
    // In a namespace of its own, so a wrongly started agent attaches nowhere
    // that matters.
    let netns = Netns::create(format!(
        "{}-run",
        dir.path().file_name().unwrap().to_string_lossy()
    ))?;
    for (case, path, line) in write_cases(&dir)? {
        let ready = dir.path().join("ready");
        let log = dir
            .path()
            .join(format!("{}.log", case.name.replace(' ', "-")));
        let mut agent = ChildGuard::spawn(
            netns
                .command(&xlb)
                .arg("run")
                .arg("--config")
                .arg(&path)
                .arg("--ready-file")
                .arg(&ready)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?),
        )?;
        let status = agent.wait_timeout(Duration::from_secs(20))?;
        let stderr = std::fs::read_to_string(&log)?;
        let Some(status) = status else {
            panic!(
                "{}: xlb run did not exit on a bad config:\n{stderr}",
                case.name
            );
        };
        assert!(
            !ready.exists(),
            "{}: xlb run wrote its ready file",
            case.name
        );
        check_message(case, &path, line, status.code(), &stderr);
    }
    Ok(())
}
