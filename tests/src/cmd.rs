//! Running the lab's helper tools (`ip`, `ethtool`, ...) and reporting their
//! failures with the full command line and stderr.

use std::process::Command;

use crate::LabError;

/// The command line as a person would type it.
pub(crate) fn describe(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Run `command` to completion; stdout on success, a `Command` error with
/// stderr otherwise.
pub(crate) fn run(command: &mut Command) -> Result<String, LabError> {
    let output = command.output().map_err(|source| LabError::Spawn {
        command: describe(command),
        source,
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: describe(command),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// `program args...`.
pub(crate) fn run_args(program: &str, args: &[&str]) -> Result<String, LabError> {
    run(Command::new(program).args(args))
}
