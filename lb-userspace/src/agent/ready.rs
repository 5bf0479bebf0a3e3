//! The ready file (`--ready-file`): `ready generation=N` once generation N
//! is served, removed when the agent stops.

use std::io;

use log::warn;

use super::{Agent, AgentError};

impl Agent {
    pub(super) fn write_ready_file(&self) -> Result<(), AgentError> {
        let Some(path) = &self.options.ready_file else {
            return Ok(());
        };
        let failed = |source| AgentError::ReadyFile {
            path: path.display().to_string(),
            source,
        };
        // Write then rename, so a reader never sees a partial file.
        let mut temporary = path.clone().into_os_string();
        temporary.push(".tmp");
        std::fs::write(
            &temporary,
            format!("ready generation={}\n", self.generation),
        )
        .map_err(failed)?;
        std::fs::rename(&temporary, path).map_err(failed)
    }

    pub(super) fn remove_ready_file(&self) {
        if let Some(path) = &self.options.ready_file
            && let Err(error) = std::fs::remove_file(path)
            && error.kind() != io::ErrorKind::NotFound
        {
            warn!("cannot remove the ready file {}: {error}", path.display());
        }
    }
}
