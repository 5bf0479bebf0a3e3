//! The kernel side of the agent: loading the XDP object, attaching it,
//! pinning both on a bpffs (and adopting what a previous agent pinned),
//! reading and writing its maps, and the host facts around it. The only
//! module with aya and `unsafe`.

pub mod conntrack;
pub mod host;
pub mod maps;
pub mod neigh;
pub mod pin;

use std::fmt;
use std::path::PathBuf;

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};

use crate::error_chain;

pub use conntrack::{FlowTable, GcPass};
pub use maps::{KernelMaps, MapIoError, OpenError, Stats};
pub use neigh::{NeighbourWorker, Neighbours};
pub use pin::{DEFAULT_BPFFS, PinDir, PinError};

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
    /// A pinned link from a previous agent now runs this program (swapped
    /// in atomically; the link keeps the mode it was created with).
    Adopted,
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
            Attached::Adopted => "pinned link adopted, program replaced in place",
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
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("cannot pin the XDP link of {interface} at {path}")]
    PinLink {
        interface: String,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How an attachment is held.
#[derive(Debug)]
enum Link {
    /// Owned by the program: detached when the program is dropped.
    Owned(XdpLinkId),
    /// Pinned at `path`: stays attached after the agent exits, until the
    /// pin is removed.
    Pinned { link: FdLink, path: PathBuf },
}

#[derive(Debug)]
struct Attachment {
    interface: String,
    link: Link,
    mode: Attached,
}

/// The loaded object and where its program is attached. Dropping it
/// detaches unpinned links; `detach_all` detaches everything with logging,
/// `release_all` leaves pinned links attached.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
    pins: Option<PinDir>,
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
    /// The configuration maps were pinned by a previous agent and are
    /// reused: `KernelMaps::read_applied` tells what they hold.
    pub adopted: bool,
}

impl Datapath {
    /// Loads the embedded object with the given map sizes and loads (verifies)
    /// its XDP program. Nothing is attached yet, nothing is pinned.
    pub fn load(sizes: MapSizes) -> Result<Loaded, KernelError> {
        Self::load_pinned(sizes, None)
    }

    /// As `load`, with every map pinned under `pins` (`DIR/maps/NAME`):
    /// a pinned map that fits is reused, with its content (the running
    /// datapath's conntrack and configuration); one that does not is
    /// recreated with a warning.
    pub fn load_pinned(sizes: MapSizes, pins: Option<&PinDir>) -> Result<Loaded, KernelError> {
        Self::load_with(sizes, pins, false)
    }

    /// As `load_pinned`. With `debug` (`--datapath-debug`) the datapath's
    /// aya-log statements are switched on (`XLB_DEBUG`) and
    /// `Loaded::logger` reads them; without, aya-log is not set up at all.
    pub fn load_with(
        sizes: MapSizes,
        pins: Option<&PinDir>,
        debug: bool,
    ) -> Result<Loaded, KernelError> {
        raise_memlock_limit();
        let debug_flag = u32::from(debug);
        let mut adopted = false;
        let map_paths: Vec<(&'static str, PathBuf)> = match pins {
            Some(pins) => {
                let check = pin::prepare_map_pins(pins, &sizes)?;
                for (name, why) in &check.recreated {
                    log::warn!(
                        "pinned map {name} does not fit this datapath ({why}): recreated{}",
                        consequence(name)
                    );
                }
                adopted = check.adopted;
                pin::map_specs(&sizes)
                    .iter()
                    .map(|spec| (spec.name, pins.map(spec.name)))
                    .collect()
            }
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader
            .override_global("XLB_DEBUG", &debug_flag, false)
            .map_max_entries(lb_common::maps::FLOWS, sizes.flows)
            .map_max_entries(lb_common::maps::BACKENDS, sizes.backends)
            .map_max_entries(lb_common::maps::SELECT, sizes.select_slots);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|source| KernelError::Load { source })?;
        let logger = if debug {
            aya_log::EbpfLogger::init(&mut ebpf)
                .inspect_err(|error| {
                    log::warn!("--datapath-debug: cannot read the datapath's logs: {error}");
                })
                .ok()
        } else {
            None
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
                pins: pins.cloned(),
            },
            maps,
            flows,
            stats,
            logger,
            adopted,
        })
    }

    /// Where links and maps are pinned, if they are.
    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    fn program(&mut self) -> Result<&mut Xdp, KernelError> {
        let name = lb_common::maps::PROGRAM;
        self.ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram { name })?
            .try_into()
            .map_err(|source| KernelError::NotXdp { name, source })
    }

    /// Attaches the program to `interface`. With pins, a link a previous
    /// agent pinned for it is adopted: this program replaces the old one in
    /// it atomically, so no packet is missed and conntrack carries on.
    /// Otherwise a new link (pinned, when pinning); in `Auto` mode a driver
    /// without native XDP gets generic XDP, with a warning.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<Attached, KernelError> {
        let pin_path = self.pins.as_ref().map(|pins| pins.link(interface));
        if let Some(path) = &pin_path
            && path.exists()
        {
            match self.adopt_link(path) {
                Ok(link) => {
                    self.attached.push(Attachment {
                        interface: interface.to_owned(),
                        link: Link::Pinned {
                            link,
                            path: path.clone(),
                        },
                        mode: Attached::Adopted,
                    });
                    return Ok(Attached::Adopted);
                }
                Err(error) => {
                    log::warn!(
                        "{interface}: cannot reuse the pinned XDP link {} ({}); attaching anew",
                        path.display(),
                        error_chain(error.as_ref())
                    );
                    pin::remove_pin(path)?;
                }
            }
        }
        let (id, attached) = self.attach_new(interface, mode)?;
        let link = match pin_path {
            None => Link::Owned(id),
            Some(path) => {
                let failed =
                    |source: Box<dyn std::error::Error + Send + Sync>| KernelError::PinLink {
                        interface: interface.to_owned(),
                        path: path.display().to_string(),
                        source,
                    };
                let link = self
                    .program()?
                    .take_link(id)
                    .map_err(|e| failed(Box::new(e)))?;
                let link = FdLink::try_from(link).map_err(|e| failed(Box::new(e)))?;
                let pinned = link.pin(&path).map_err(|e| failed(Box::new(e)))?;
                Link::Pinned {
                    link: pinned.into(),
                    path,
                }
            }
        };
        self.attached.push(Attachment {
            interface: interface.to_owned(),
            link,
            mode: attached,
        });
        Ok(attached)
    }

    /// Swaps this program into the XDP link pinned at `path`.
    fn adopt_link(
        &mut self,
        path: &std::path::Path,
    ) -> Result<FdLink, Box<dyn std::error::Error + Send + Sync>> {
        let pinned = PinnedLink::from_pin(path)?;
        let link = XdpLink::try_from(FdLink::from(pinned))?;
        let program = self.program()?;
        let id = program.attach_to_link(link)?;
        let link = program.take_link(id)?;
        let link: Result<FdLink, LinkError> = FdLink::try_from(link);
        Ok(link?)
    }

    fn attach_new(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(XdpLinkId, Attached), KernelError> {
        let program = self.program()?;
        match mode {
            AttachMode::Native | AttachMode::Auto => {
                match program.attach(interface, XdpMode::Driver) {
                    Ok(link) => Ok((link, Attached::Native)),
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
                        Ok((link, Attached::Generic))
                    }
                    Err(source) => Err(KernelError::Attach {
                        interface: interface.to_owned(),
                        mode: "native",
                        source,
                    }),
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
                Ok((link, Attached::Generic))
            }
        }
    }

    /// Interfaces the program is attached to, in attach order.
    pub fn interfaces(&self) -> Vec<String> {
        self.attached.iter().map(|a| a.interface.clone()).collect()
    }

    /// Detaches the program from `interface`, if attached there (removing
    /// its pin).
    pub fn detach(&mut self, interface: &str) -> Result<(), KernelError> {
        let Some(index) = self.attached.iter().position(|a| a.interface == interface) else {
            return Ok(());
        };
        let attachment = self.attached.remove(index);
        self.detach_one(attachment.link)
            .map_err(|source| KernelError::Detach {
                interface: interface.to_owned(),
                source,
            })
    }

    fn detach_one(&mut self, link: Link) -> Result<(), ProgramError> {
        match link {
            Link::Owned(id) => self
                .program()
                .map_err(|_| ProgramError::NotLoaded)?
                .detach(id),
            Link::Pinned { link, path } => {
                // The kernel detaches when the last reference goes: the pin
                // and our fd.
                let removed = std::fs::remove_file(&path);
                drop(link);
                match removed {
                    Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                        Err(ProgramError::IOError(error))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Links pinned for interfaces the agent does not serve (left by a
    /// previous agent with another config): unpinned, so they detach.
    /// Returns the interfaces.
    pub fn unpin_stale_links(&mut self) -> Result<Vec<String>, KernelError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let mut stale = Vec::new();
        for interface in pins.pinned_links()? {
            if self.attached.iter().any(|a| a.interface == interface) {
                continue;
            }
            pin::remove_pin(&pins.link(&interface))?;
            stale.push(interface);
        }
        Ok(stale)
    }

    /// Detaches the program from every interface (pinned links too); returns
    /// the interfaces detached and a message for each failure.
    pub fn detach_all(&mut self) -> (Vec<String>, Vec<String>) {
        let attachments = std::mem::take(&mut self.attached);
        let mut detached = Vec::new();
        let mut failures = Vec::new();
        for attachment in attachments {
            let mode = attachment.mode;
            match self.detach_one(attachment.link) {
                Ok(()) => detached.push(format!("{} ({mode})", attachment.interface)),
                Err(error) => failures.push(format!(
                    "{}: cannot detach XDP: {}",
                    attachment.interface,
                    error_chain(&error)
                )),
            }
        }
        (detached, failures)
    }

    /// Leaves pinned links attached (the program keeps forwarding with the
    /// pinned maps while no agent runs); unpinned ones are detached, as
    /// they cannot outlive the agent. Returns the interfaces left attached
    /// and those detached.
    pub fn release_all(&mut self) -> (Vec<String>, Vec<String>) {
        let attachments = std::mem::take(&mut self.attached);
        let mut kept = Vec::new();
        let mut detached = Vec::new();
        for attachment in attachments {
            match attachment.link {
                Link::Pinned { link, .. } => {
                    drop(link);
                    kept.push(attachment.interface);
                }
                Link::Owned(id) => {
                    if let Ok(program) = self.program() {
                        let _ = program.detach(id);
                    }
                    detached.push(attachment.interface);
                }
            }
        }
        (kept, detached)
    }
}

/// What recreating a pinned map costs, for the warning.
fn consequence(name: &str) -> &'static str {
    match name {
        lb_common::maps::FLOWS => "; existing flows are forgotten",
        lb_common::maps::STATS
        | lb_common::maps::SERVICE_STATS
        | lb_common::maps::BACKEND_STATS => "; its counters restart from zero",
        _ => "; the configuration is written anew and flows are re-balanced",
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
