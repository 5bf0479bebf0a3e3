//! The socket hooks (cgroup v2 connect4, sendmsg4, recvmsg4, getpeername4
//! and their IPv6 twins connect6, sendmsg6, recvmsg6, getpeername6):
//! loading them from the datapath object, attaching them to a cgroup v2
//! directory (`--cgroup`), pinning their links next to the XDP links, and
//! detaching them.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId;
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError};
use lb_common::maps::SOCK_PROGRAMS;

use super::pin::{self, PinDir};

/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum SocketHookError {
    #[error(
        "cannot open the cgroup {path} given to --cgroup; pass a cgroup v2 directory (where \
         `mount -t cgroup2` is mounted, e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified)"
    )]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} (--cgroup) is not a cgroup v2 directory; pass one where cgroup2 is mounted (see \
         `findmnt -t cgroup2`), e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified"
    )]
    NotCgroup2 { path: String },
    #[error("the datapath object has no socket hook program \"{name}\"")]
    Missing { name: &'static str },
    #[error("the kernel rejected the {hook} socket hook")]
    Verify {
        hook: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot attach the {hook} socket hook to the cgroup {cgroup}")]
    Attach {
        hook: &'static str,
        cgroup: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot pin the {hook} socket hook's link at {path}")]
    Pin {
        hook: &'static str,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How one hook's attachment is held.
#[derive(Debug)]
enum HookLink {
    /// Detached when the program is dropped.
    Owned {
        program: &'static str,
        id: CgroupSockAddrLinkId,
    },
    /// Pinned at `path`: stays attached until the pin is removed.
    Pinned { link: FdLink, path: PathBuf },
}

#[derive(Debug)]
struct Hook {
    hook: &'static str,
    link: HookLink,
}

/// The socket hooks attached to one cgroup.
#[derive(Debug)]
pub struct SocketHooks {
    cgroup: PathBuf,
    hooks: Vec<Hook>,
}

impl SocketHooks {
    /// Loads (verifies) every socket hook program of `ebpf` and attaches it
    /// to `cgroup`. With `pins`, each link is pinned at `DIR/cgroup/<hook>`,
    /// replacing a previous agent's pin: its link is detached once the new
    /// one runs (while both run, the second sees a backend, not a service,
    /// and leaves it alone).
    pub fn attach(
        ebpf: &mut Ebpf,
        cgroup: &Path,
        pins: Option<&PinDir>,
    ) -> Result<SocketHooks, SocketHookError> {
        let dir = File::open(cgroup).map_err(|source| SocketHookError::Open {
            path: cgroup.display().to_string(),
            source,
        })?;
        if !is_cgroup2(cgroup) {
            return Err(SocketHookError::NotCgroup2 {
                path: cgroup.display().to_string(),
            });
        }
        let mut attached = SocketHooks {
            cgroup: cgroup.to_owned(),
            hooks: Vec::new(),
        };
        for (name, hook) in SOCK_PROGRAMS {
            let program = program(ebpf, name)?;
            if program.fd().is_err() {
                program.load().map_err(|source| SocketHookError::Verify {
                    hook,
                    source: Box::new(source),
                })?;
            }
            let id = program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| SocketHookError::Attach {
                    hook,
                    cgroup: cgroup.display().to_string(),
                    source: Box::new(source),
                })?;
            let link = match pins {
                None => HookLink::Owned { program: name, id },
                Some(pins) => {
                    let path = pins.cgroup_link(hook);
                    let link =
                        pin_link(program, id, &path).map_err(|source| SocketHookError::Pin {
                            hook,
                            path: path.display().to_string(),
                            source,
                        })?;
                    HookLink::Pinned { link, path }
                }
            };
            attached.hooks.push(Hook { hook, link });
        }
        Ok(attached)
    }

    /// The cgroup the hooks are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The hooks attached, in attach order (`connect4`, ...).
    pub fn hooks(&self) -> Vec<&'static str> {
        self.hooks.iter().map(|hook| hook.hook).collect()
    }

    /// Detaches every hook (removing pins); returns the hooks detached and a
    /// message per failure.
    pub fn detach(self, ebpf: &mut Ebpf) -> (Vec<&'static str>, Vec<String>) {
        let mut detached = Vec::new();
        let mut failures = Vec::new();
        for hook in self.hooks {
            let result = match hook.link {
                HookLink::Owned { program: name, id } => {
                    program(ebpf, name).map_or(Ok(()), |program| {
                        program
                            .detach(id)
                            .map_err(|error| crate::error_chain(&error))
                    })
                }
                HookLink::Pinned { link, path } => {
                    let removed = pin::remove_pin(&path);
                    drop(link);
                    removed.map_err(|error| crate::error_chain(&error))
                }
            };
            match result {
                Ok(()) => detached.push(hook.hook),
                Err(error) => failures.push(format!(
                    "{}: cannot detach the socket hook: {error}",
                    hook.hook
                )),
            }
        }
        (detached, failures)
    }

    /// Leaves pinned hooks attached; unpinned ones are detached with the
    /// program. Returns the hooks left attached.
    pub fn release(self) -> Vec<&'static str> {
        self.hooks
            .into_iter()
            .filter(|hook| matches!(hook.link, HookLink::Pinned { .. }))
            .map(|hook| hook.hook)
            .collect()
    }
}

/// Pinned cgroup links of a previous agent that this one does not attach
/// (it runs without --cgroup): unpinned, so they detach. Returns the hooks.
pub fn unpin_stale(pins: &PinDir) -> Result<Vec<String>, pin::PinError> {
    let hooks = pins.pinned_cgroup_links()?;
    for hook in &hooks {
        pin::remove_pin(&pins.cgroup_link(hook))?;
    }
    Ok(hooks)
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, SocketHookError> {
    ebpf.program_mut(name)
        .and_then(|program| program.try_into().ok())
        .ok_or(SocketHookError::Missing { name })
}

/// Pins the link `id` at `path`, atomically replacing what was pinned
/// there.
fn pin_link(
    program: &mut CgroupSockAddr,
    id: CgroupSockAddrLinkId,
    path: &Path,
) -> Result<FdLink, Box<dyn std::error::Error + Send + Sync>> {
    let link = FdLink::try_from(program.take_link(id)?)?;
    // bpffs refuses names with a dot.
    let mut staging = path.as_os_str().to_owned();
    staging.push("_new");
    let staging = PathBuf::from(staging);
    pin::remove_pin(&staging)?;
    let pinned = link.pin(&staging)?;
    std::fs::rename(&staging, path)?;
    Ok(pinned.into())
}

fn is_cgroup2(path: &Path) -> bool {
    super::sys::fs_magic(path).is_ok_and(|magic| magic == CGROUP2_SUPER_MAGIC)
}
