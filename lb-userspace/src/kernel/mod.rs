//! The kernel side of the agent: loading the XDP object, attaching it,
//! reading and writing its maps, and the host facts around it. The only
//! module with aya and `unsafe`.

pub mod conntrack;
pub mod host;
pub mod maps;
pub mod neigh;

use std::fmt;

use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};

use crate::error_chain;

pub use conntrack::{FlowTable, GcPass};
pub use maps::{KernelMaps, MapIoError, OpenError, Stats};
pub use neigh::Neighbours;

/// The datapath object built by lb-userspace/build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Load-time map sizes (the maps marked "load-time" in `lb_common::maps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub flows: u32,
    pub backends: u32,
    pub select_slots: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            flows: lb_common::maps::FLOWS_MAX,
            backends: lb_common::maps::BACKENDS_MAX,
            select_slots: lb_common::maps::SELECT_MAX,
        }
    }
}

/// `--xdp-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native, falling back to generic where the driver lacks XDP.
    Auto,
    Native,
    Generic,
}

/// The mode an interface actually got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot load the XDP object (are you root, or do you have CAP_BPF and CAP_NET_ADMIN?)")]
    Load {
        #[source]
        source: EbpfError,
    },
    #[error("the XDP object has no program \"{name}\"")]
    MissingProgram { name: &'static str },
    #[error("program \"{name}\" is not an XDP program")]
    NotXdp {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the kernel rejected the XDP program")]
    Verify {
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot detach XDP from {interface}")]
    Detach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach XDP to {interface} in {mode} mode")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
}

#[derive(Debug)]
struct Attachment {
    interface: String,
    link: aya::programs::xdp::XdpLinkId,
    mode: Attached,
}

/// The loaded object and where its program is attached. Dropping it
/// detaches everything too; `detach_all` does it with logging.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
}

/// Everything `Datapath::load` hands out: the maps are taken out of the
/// object so each part of the agent owns the ones it writes.
pub struct Loaded {
    pub datapath: Datapath,
    pub maps: KernelMaps,
    pub flows: FlowTable,
    pub stats: Stats,
    /// aya-log's reader, when the program logs.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Datapath {
    /// Loads the embedded object with the given map sizes and loads (verifies)
    /// its XDP program. Nothing is attached yet.
    pub fn load(sizes: MapSizes) -> Result<Loaded, KernelError> {
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(lb_common::maps::FLOWS, sizes.flows)
            .map_max_entries(lb_common::maps::BACKENDS, sizes.backends)
            .map_max_entries(lb_common::maps::SELECT, sizes.select_slots)
            .load(OBJECT)
            .map_err(|source| KernelError::Load { source })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(error) => {
                // The program may simply not log.
                log::debug!("datapath logging not enabled: {error}");
                None
            }
        };
        let name = lb_common::maps::PROGRAM;
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram { name })?
            .try_into()
            .map_err(|source| KernelError::NotXdp { name, source })?;
        program
            .load()
            .map_err(|source| KernelError::Verify { source })?;
        let maps = KernelMaps::open(&mut ebpf)?;
        let flows = FlowTable::open(&mut ebpf)?;
        let stats = Stats::open(&mut ebpf)?;
        Ok(Loaded {
            datapath: Datapath {
                ebpf,
                attached: Vec::new(),
            },
            maps,
            flows,
            stats,
            logger,
        })
    }

    fn program(&mut self) -> Result<&mut Xdp, KernelError> {
        let name = lb_common::maps::PROGRAM;
        self.ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram { name })?
            .try_into()
            .map_err(|source| KernelError::NotXdp { name, source })
    }

    /// Attaches the program to `interface`. In `Auto` mode a driver without
    /// native XDP gets generic XDP, with a warning.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<Attached, KernelError> {
        let program = self.program()?;
        let (link, attached) = match mode {
            AttachMode::Native | AttachMode::Auto => {
                match program.attach(interface, XdpMode::Driver) {
                    Ok(link) => (link, Attached::Native),
                    Err(native) if mode == AttachMode::Auto && !is_unknown_interface(&native) => {
                        let link = program.attach(interface, XdpMode::Skb).map_err(|source| {
                            KernelError::Attach {
                                interface: interface.to_owned(),
                                mode: "generic",
                                source,
                            }
                        })?;
                        log::warn!(
                            "{interface}: native XDP unavailable ({}); using generic XDP, which is slower",
                            error_chain(&native)
                        );
                        (link, Attached::Generic)
                    }
                    Err(source) => {
                        return Err(KernelError::Attach {
                            interface: interface.to_owned(),
                            mode: "native",
                            source,
                        });
                    }
                }
            }
            AttachMode::Generic => {
                let link = program.attach(interface, XdpMode::Skb).map_err(|source| {
                    KernelError::Attach {
                        interface: interface.to_owned(),
                        mode: "generic",
                        source,
                    }
                })?;
                (link, Attached::Generic)
            }
        };
        self.attached.push(Attachment {
            interface: interface.to_owned(),
            link,
            mode: attached,
        });
        Ok(attached)
    }

    /// Interfaces the program is attached to, in attach order.
    pub fn interfaces(&self) -> Vec<String> {
        self.attached.iter().map(|a| a.interface.clone()).collect()
    }

    /// Detaches the program from `interface`, if attached there.
    pub fn detach(&mut self, interface: &str) -> Result<(), KernelError> {
        let Some(index) = self.attached.iter().position(|a| a.interface == interface) else {
            return Ok(());
        };
        let attachment = self.attached.remove(index);
        self.program()?
            .detach(attachment.link)
            .map_err(|source| KernelError::Detach {
                interface: interface.to_owned(),
                source,
            })
    }

    /// Detaches the program from every interface; returns the interfaces
    /// detached and a message for each failure.
    pub fn detach_all(&mut self) -> (Vec<String>, Vec<String>) {
        let attachments = std::mem::take(&mut self.attached);
        let mut detached = Vec::new();
        let mut failures = Vec::new();
        let program = match self.program() {
            Ok(program) => program,
            Err(error) => {
                failures.push(error_chain(&error));
                return (detached, failures);
            }
        };
        for attachment in attachments {
            match program.detach(attachment.link) {
                Ok(()) => detached.push(format!("{} ({})", attachment.interface, attachment.mode)),
                Err(error) => failures.push(format!(
                    "{}: cannot detach XDP: {}",
                    attachment.interface,
                    error_chain(&error)
                )),
            }
        }
        (detached, failures)
    }
}

fn is_unknown_interface(error: &ProgramError) -> bool {
    matches!(error, ProgramError::UnknownInterface { .. })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large
/// flow tables load there too. Failure is harmless on newer kernels.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct that outlives the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc != 0 {
        log::debug!(
            "cannot remove the memlock limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Forwards the datapath's aya-log records to the agent's log as they come.
/// Needs a tokio runtime.
pub fn spawn_log_reader(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd; it stays open and the same
    // for as long as the AsyncFd owns the logger, and nothing else closes it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(error) => {
            log::warn!("cannot read the datapath's log: {error}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Whether this process may load BPF programs (kernel tests skip otherwise).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Small maps for tests that load the real object.
#[cfg(test)]
pub(crate) const TEST_SIZES: MapSizes = MapSizes {
    flows: 4096,
    backends: 64,
    select_slots: 1021 * 8,
};

#[cfg(test)]
mod tests;
