//! The agent's end: the datapath's counters in the exit log, then detach
//! everything and remove the pins, or leave the pinned datapath to the
//! next agent (`--keep-attached`); and `xlb detach`, which removes what
//! such an agent left.

use std::path::Path;

use log::{error, info, warn};

use super::{Agent, AgentError};
use crate::error_chain;
use crate::kernel::maps::{format_paths, format_stats};
use crate::kernel::{DEFAULT_BPFFS, KernelError, PinDir};

/// The pin directory for `--bpffs`. Given explicitly, it must be on a
/// bpffs (the error names the fix); the default falls back to running
/// unpinned, with a warning, where there is none (e.g. inside
/// `ip netns exec`, which remounts /sys).
pub(super) fn pin_dir(explicit: Option<&Path>) -> Result<Option<PinDir>, AgentError> {
    let dir = explicit.unwrap_or_else(|| Path::new(DEFAULT_BPFFS));
    match PinDir::open(dir) {
        Ok(pins) => Ok(Some(pins)),
        Err(error) if explicit.is_some() => Err(KernelError::Pin(error).into()),
        Err(error) => {
            warn!(
                "running unpinned: the datapath detaches when xlb stops and a restart forgets \
                 conntrack ({})",
                error_chain(&error)
            );
            Ok(None)
        }
    }
}

pub(super) fn bpffs_display(pins: Option<&PinDir>) -> String {
    pins.map_or_else(
        || String::from("(nowhere)"),
        |pins| pins.root().display().to_string(),
    )
}

/// `xlb detach`: unpins the XDP links (the kernel then detaches them) and
/// the maps a `--keep-attached` agent left in `dir`. Returns what it did.
pub fn detach(dir: Option<&Path>) -> Result<String, KernelError> {
    let dir = dir.unwrap_or_else(|| Path::new(DEFAULT_BPFFS));
    let (links, hooks, maps) = PinDir::at(dir).remove_all()?;
    if links.is_empty() && hooks.is_empty() && maps == 0 {
        return Ok(format!("nothing pinned in {}", dir.display()));
    }
    let interfaces = if links.is_empty() {
        String::from("no interface")
    } else {
        links.join(", ")
    };
    let hooks = if hooks.is_empty() {
        String::new()
    } else {
        format!("; socket hooks {} detached", hooks.join(", "))
    };
    Ok(format!(
        "{}: XDP detached from {interfaces}{hooks}; {maps} maps unpinned",
        dir.display()
    ))
}

impl Agent {
    /// Reports the datapath's counters, then detaches everything and
    /// removes the pins, or with `--keep-attached` leaves the pinned links
    /// and maps to the next agent.
    pub(super) fn shut_down(&mut self) {
        self.observe.stopping();
        self.log_counters();
        if self.options.keep_attached {
            self.release();
        } else {
            self.detach();
        }
        self.remove_ready_file();
    }

    /// The datapath's verdict counters and each backend's paths, for the
    /// exit log (`cargo xtask demo` reads it).
    fn log_counters(&self) {
        let Some(reader) = self.observe.datapath_maps() else {
            warn!("cannot read packet counters: the datapath's maps could not be opened");
            return;
        };
        match reader.verdicts() {
            Ok(mut counts) => {
                counts.retain(|(_, count)| *count > 0);
                info!("packet counters: {}", format_stats(&counts));
            }
            Err(error) => warn!("cannot read packet counters: {}", error_chain(&error)),
        }
        for (id, backend) in &self.applied.backends {
            match reader.backend_paths(*id) {
                Ok(paths) if paths != lb_common::Paths::default() => info!(
                    "backend {}:{} paths: {}",
                    backend.address.address,
                    backend.address.port,
                    format_paths(&paths)
                ),
                Ok(_) => {}
                Err(error) => warn!("cannot read backend paths: {}", error_chain(&error)),
            }
        }
    }

    /// `--keep-attached`: pinned links stay attached, maps stay pinned.
    fn release(&mut self) {
        let hooks = self.datapath.release_sockets();
        if !hooks.is_empty() {
            info!(
                "socket hooks {} left attached (--keep-attached)",
                hooks.join(", ")
            );
        }
        let (kept, detached) = self.datapath.release_all();
        let dir = bpffs_display(self.datapath.pins());
        if !kept.is_empty() {
            info!(
                "XDP and tc left attached to {} with the maps pinned in {dir} (--keep-attached); the \
                 next `xlb run --bpffs {dir}` adopts them, `xlb detach --bpffs {dir}` removes them",
                kept.join(", "),
            );
        }
        if !detached.is_empty() {
            warn!(
                "XDP detached from {} despite --keep-attached: nothing is pinned ({dir} is not \
                 on a bpffs)",
                detached.join(", ")
            );
        }
    }

    fn detach(&mut self) {
        let (hooks, failures) = self.datapath.detach_sockets();
        for failure in failures {
            error!("{failure}");
        }
        if !hooks.is_empty() {
            info!("socket hooks {} detached", hooks.join(", "));
        }
        let (detached, failures) = self.datapath.detach_all();
        for failure in failures {
            error!("{failure}");
        }
        if !detached.is_empty() {
            info!("XDP detached from {}", detached.join(", "));
        }
        if let Some(pins) = self.datapath.pins() {
            match pins.remove_all() {
                Ok((_, _, maps)) => {
                    info!("removed {maps} pinned maps from {}", pins.root().display())
                }
                Err(error) => error!("{}", error_chain(&error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_bpffs_must_be_one_and_detach_of_nothing_is_fine() {
        let dir = std::env::temp_dir().join(format!("xlb-agent-test-{}", std::process::id()));
        let error = pin_dir(Some(&dir)).map(|_| ()).map_err(|e| error_chain(&e));
        let Err(message) = error else {
            panic!("{} is a bpffs?", dir.display())
        };
        assert!(
            message.contains(&format!("mount -t bpf bpf {}", dir.display())),
            "{message}"
        );
        assert_eq!(
            detach(Some(Path::new("/nonexistent/xlb"))).map_err(|e| e.to_string()),
            Ok(String::from("nothing pinned in /nonexistent/xlb"))
        );
    }
}
