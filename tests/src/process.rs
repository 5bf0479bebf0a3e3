//! Child processes that die with their guard: a test that panics must not
//! leave an agent or an echo server running.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::LabError;
use crate::cmd::describe;
use crate::wait::POLL_INTERVAL;

/// How long a child gets between SIGTERM and SIGKILL when its guard drops.
const DROP_GRACE: Duration = Duration::from_secs(3);

/// A running child process, killed (SIGTERM, then SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    command: String,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn spawn(command: &mut Command) -> Result<ChildGuard, LabError> {
        let line = describe(command);
        let child = command.spawn().map_err(|source| LabError::Spawn {
            command: line.clone(),
            source,
        })?;
        Ok(ChildGuard {
            child,
            command: line,
            status: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line the child was started with.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Send `signal` (e.g. `libc::SIGHUP`) unless the child has exited.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<(), LabError> {
        if self.try_wait()?.is_some() {
            return Err(LabError::io(
                format!("signalling `{}`", self.command),
                std::io::Error::new(std::io::ErrorKind::NotFound, "the process has exited"),
            ));
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory preconditions; the pid is our unreaped
        // child, so it cannot have been reused by another process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(LabError::io(
                format!("sending signal {signal} to `{}`", self.command),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// The exit status if the child has exited (reaping it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, LabError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| {
                LabError::io(format!("waiting for `{}`", self.command), source)
            })?;
        }
        Ok(self.status)
    }

    /// Wait up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, LabError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // Ignore a failed SIGTERM: the child may have exited in between.
        let _ = self.signal(libc::SIGTERM);
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.kill()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus, LabError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_err(|source| LabError::io(format!("reaping `{}`", self.command), source))?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(error) = self.stop(DROP_GRACE) {
            eprintln!("xlb lab: could not stop `{}`: {error}", self.command);
        }
    }
}
