//! The kernel side of the agent: loading the XDP object, attaching it,
//! pinning both on a bpffs (and adopting what a previous agent pinned),
//! reading and writing its maps, and the host facts around it. The only
//! module with aya; its raw system calls, the agent's only `unsafe`, are in
//! `sys.rs`.

pub mod conntrack;
pub mod explain;
pub mod host;
pub mod linkwatch;
pub mod maps;
pub mod neigh;
pub mod peers;
pub mod pin;
pub mod seed;
pub mod sock;
pub mod sock_destroy;
pub mod sys;
pub mod uplinks;

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, SchedClassifierLinkId};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};
use lb_common::maps::{MapDecl, Sizing};

use crate::error_chain;

pub use conntrack::{FlowTable, GcPass};
pub use host::LinkKind;
pub use maps::{KernelMaps, MapIoError, OpenError};
pub use neigh::{NeighbourWorker, Neighbours};
pub use pin::{DEFAULT_BPFFS, PinDir, PinError};
pub use sock::{SocketHookError, SocketHooks};

/// The datapath object built by lb-userspace/build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Load-time map sizes (the maps whose `Sizing` is not `Fixed` in
/// `lb_common::maps::MAPS`).
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

impl MapSizes {
    /// The capacity the loader gives `map`.
    pub fn max_entries(&self, map: &MapDecl) -> u32 {
        match map.sizing {
            Sizing::Fixed => map.max_entries,
            Sizing::Flows => self.flows,
            Sizing::Backends => self.backends,
            Sizing::SelectSlots => self.select_slots,
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
    #[error(
        "cannot load the XDP object (are you root, or do you have CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON? In a container, its seccomp profile must also allow bpf(): README, Permissions)"
    )]
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
    #[error("program \"{name}\" is not a tc (SchedClassifier) program")]
    NotTc {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the kernel rejected the tc program \"{name}\"")]
    VerifyTc {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach the tc program \"{name}\" to {interface} (ingress)")]
    AttachTc {
        name: &'static str,
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot write {map} for {interface}")]
    RedirectMap {
        map: &'static str,
        interface: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    SocketHook(#[from] SocketHookError),
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

/// Which tc program an interface gets (see lb-ebpf/src/tc.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcRole {
    /// An uplink, next to XDP: sends on the frames XDP hands off.
    Uplink,
    /// A pod's host-side veth or a tunnel device: reverse NAT of replies.
    Pod,
}

impl TcRole {
    fn program(self) -> &'static str {
        match self {
            TcRole::Uplink => lb_common::maps::PROGRAM_TC_UPLINK,
            TcRole::Pod => lb_common::maps::PROGRAM_TC_POD,
        }
    }

    /// The role's part of its pin name (`tc/<role>-<interface>`).
    fn pin_name(self) -> &'static str {
        match self {
            TcRole::Uplink => "uplink",
            TcRole::Pod => "pod",
        }
    }
}

/// A tc attachment's link.
#[derive(Debug)]
enum TcLink {
    /// Owned by the program (a clsact filter, or unpinned): detached when
    /// the program is dropped.
    Owned(SchedClassifierLinkId),
    /// A tcx link pinned at `path`: stays attached after the agent exits
    /// (`--keep-attached`), until the pin is removed.
    Pinned { link: FdLink, path: PathBuf },
}

/// How a tc program got attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    /// A tcx link (kernel 6.6+): no qdisc, ordered with other programs.
    Tcx,
    /// The clsact qdisc's ingress filter (older kernels).
    Clsact,
}

impl fmt::Display for TcHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcHook::Tcx => "tcx",
            TcHook::Clsact => "clsact",
        })
    }
}

#[derive(Debug)]
struct TcAttachment {
    interface: String,
    /// The interface's index when attached: a pod's veth deleted and made
    /// again under the same name is a new device that needs a new link.
    ifindex: u32,
    role: TcRole,
    link: TcLink,
}

/// The loaded object and where its program is attached. Dropping it
/// detaches unpinned links; `detach_all` detaches everything with logging,
/// `release_all` leaves pinned links attached.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
    /// tc programs; tcx links are pinned when the maps are.
    tc: Vec<TcAttachment>,
    /// `XLB_REDIRECT_OK`: the interfaces XDP runs on.
    redirect_ok: BpfHashMap<MapData, u32, u32>,
    pins: Option<PinDir>,
    /// The socket hooks, when attached to a cgroup (`--cgroup`).
    sockets: Option<SocketHooks>,
}

/// Everything `Datapath::load` hands out: the maps are taken out of the
/// object so each part of the agent owns the ones it writes.
pub struct Loaded {
    pub datapath: Datapath,
    pub maps: KernelMaps,
    pub flows: FlowTable,
    /// aya-log's reader, when the program logs.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The configuration maps were pinned by a previous agent and are
    /// reused: `KernelMaps::read_applied` tells what they hold.
    pub adopted: bool,
    /// Duplicates of the maps the reader (`observe::datapath::OBSERVED`)
    /// needs, by name: for /metrics and the exit log.
    pub observed: BTreeMap<&'static str, MapData>,
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
        loader.override_global("XLB_DEBUG", &debug_flag, false);
        for map in lb_common::maps::MAPS {
            if map.sizing != Sizing::Fixed {
                loader.map_max_entries(map.name, sizes.max_entries(map));
            }
        }
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
        for role in [TcRole::Uplink, TcRole::Pod] {
            let name = role.program();
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram { name })?
                .try_into()
                .map_err(|source| KernelError::NotTc { name, source })?;
            program
                .load()
                .map_err(|source| KernelError::VerifyTc { name, source })?;
        }
        let observed = duplicate_maps(&ebpf, &crate::observe::datapath::OBSERVED);
        let redirect_ok = ebpf
            .take_map(lb_common::maps::REDIRECT_OK)
            .ok_or(OpenError::Missing {
                name: lb_common::maps::REDIRECT_OK,
            })
            .and_then(|map| {
                BpfHashMap::try_from(map).map_err(|source| OpenError::Kind {
                    name: lb_common::maps::REDIRECT_OK,
                    source,
                })
            })?;
        let maps = KernelMaps::open(&mut ebpf)?;
        let flows = FlowTable::open(&mut ebpf)?;
        Ok(Loaded {
            datapath: Datapath {
                ebpf,
                attached: Vec::new(),
                tc: Vec::new(),
                redirect_ok,
                pins: pins.cloned(),
                sockets: None,
            },
            maps,
            flows,
            logger,
            adopted,
            observed,
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
    ///
    /// Before XDP runs there: the interface goes into `XLB_REDIRECT_OK` and
    /// gets the uplink's tc program, so the program never hands a frame to
    /// a tc program that is not there yet (an adopted link runs the new
    /// program from the moment it is swapped in).
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<Attached, KernelError> {
        self.allow_redirect(&[interface.to_owned()])?;
        self.attach_tc(interface, TcRole::Uplink)?;
        self.attach_xdp(interface, mode)
    }

    /// Lets XDP redirect into `interfaces` (`XLB_REDIRECT_OK`). The agent
    /// calls it for every uplink before attaching to any, so that a link
    /// adopted from a previous agent never sees a map without the others.
    pub fn allow_redirect(&mut self, interfaces: &[String]) -> Result<(), KernelError> {
        for interface in interfaces {
            let Some(ifindex) = host::ifindex(interface) else {
                continue;
            };
            self.redirect_ok
                .insert(ifindex, 0, 0)
                .map_err(|source| KernelError::RedirectMap {
                    map: lb_common::maps::REDIRECT_OK,
                    interface: interface.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    fn attach_xdp(&mut self, interface: &str, mode: AttachMode) -> Result<Attached, KernelError> {
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

    /// Loads the socket hooks and attaches them to the cgroup v2 directory
    /// `cgroup` (pinned, when pinning), so that connect() and sendmsg() to a
    /// service from any process in it are balanced before a packet exists.
    /// Returns the hooks attached.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<Vec<&'static str>, KernelError> {
        if let Some(current) = &self.sockets
            && current.cgroup() == cgroup
        {
            return Ok(current.hooks());
        }
        let hooks = SocketHooks::attach(&mut self.ebpf, cgroup, self.pins.as_ref())?;
        let attached = hooks.hooks();
        if let Some(old) = self.sockets.replace(hooks) {
            // Another cgroup: the new pins replaced the old ones already.
            let _ = old.release();
        }
        Ok(attached)
    }

    /// Socket hooks a previous agent pinned that this one does not attach
    /// (no `--cgroup`): unpinned, so they detach. Returns the hooks.
    pub fn unpin_stale_sockets(&mut self) -> Result<Vec<String>, KernelError> {
        match (&self.pins, &self.sockets) {
            (Some(pins), None) => Ok(sock::unpin_stale(pins)?),
            _ => Ok(Vec::new()),
        }
    }

    /// The cgroup the socket hooks are attached to, and the hooks.
    pub fn socket_hooks(&self) -> Option<(&Path, Vec<&'static str>)> {
        self.sockets
            .as_ref()
            .map(|sockets| (sockets.cgroup(), sockets.hooks()))
    }

    /// Detaches the socket hooks (removing their pins); returns the hooks
    /// detached and a message per failure.
    pub fn detach_sockets(&mut self) -> (Vec<&'static str>, Vec<String>) {
        match self.sockets.take() {
            Some(sockets) => sockets.detach(&mut self.ebpf),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// The sockets the socket hooks balanced whose backend `keeps` says is
    /// gone (`keeps(service_id, backend)`), from `XLB_SOCK_REVNAT`: their
    /// records are deleted, and they are returned (cookie -> backend) for
    /// `sock_destroy`. Empty without socket hooks.
    pub fn take_stale_socket_records(
        &mut self,
        keeps: impl Fn(u32, crate::reconcile::BackendAddr) -> bool,
    ) -> Result<sock_destroy::Stale, KernelError> {
        use lb_common::{SockRevNat, SockRevNatKey};
        if self.sockets.is_none() {
            return Ok(sock_destroy::Stale::new());
        }
        let name = lb_common::maps::SOCK_REVNAT;
        let map = self.ebpf.map_mut(name).ok_or(OpenError::Missing { name })?;
        let mut records: BpfHashMap<&mut MapData, SockRevNatKey, SockRevNat> =
            BpfHashMap::try_from(map).map_err(|source| OpenError::Kind { name, source })?;
        let stale: Vec<SockRevNatKey> = records
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, record)| {
                let backend = crate::reconcile::BackendAddr {
                    address: std::net::Ipv4Addr::from(u32::from_be(key.backend_addr_be)),
                    port: u16::from_be(key.backend_port_be),
                };
                !keeps(record.service_id, backend)
            })
            .map(|(key, _)| key)
            .collect();
        let mut taken = sock_destroy::Stale::new();
        for key in stale {
            // Gone meanwhile (the LRU evicted it): nothing to do.
            let _ = records.remove(&key);
            taken.insert(
                key.socket_cookie,
                std::net::SocketAddrV4::new(
                    std::net::Ipv4Addr::from(u32::from_be(key.backend_addr_be)),
                    u16::from_be(key.backend_port_be),
                ),
            );
        }
        Ok(taken)
    }

    /// Leaves pinned socket hooks attached; returns them.
    pub fn release_sockets(&mut self) -> Vec<&'static str> {
        self.sockets
            .take()
            .map(SocketHooks::release)
            .unwrap_or_default()
    }

    /// Interfaces the program is attached to, in attach order.
    pub fn interfaces(&self) -> Vec<String> {
        self.attached.iter().map(|a| a.interface.clone()).collect()
    }

    /// How XDP is attached to `interface`, if it is.
    pub fn attached_mode(&self, interface: &str) -> Option<Attached> {
        self.attached
            .iter()
            .find(|a| a.interface == interface)
            .map(|a| a.mode)
    }

    fn tc_program(&mut self, role: TcRole) -> Result<&mut SchedClassifier, KernelError> {
        let name = role.program();
        self.ebpf
            .program_mut(name)
            .ok_or(KernelError::MissingProgram { name })?
            .try_into()
            .map_err(|source| KernelError::NotTc { name, source })
    }

    /// Attaches `role`'s tc program at `interface`'s ingress: a tcx link
    /// where the kernel has tcx (pinned at `tc/<role>-<interface>` when the
    /// maps are pinned, so it outlives the agent with `--keep-attached`;
    /// one a previous agent pinned there is adopted: this program is
    /// swapped into it, with no gap), else a filter on a clsact qdisc
    /// (added if missing). Replaces an attachment of an older device of
    /// that name.
    pub fn attach_tc(&mut self, interface: &str, role: TcRole) -> Result<TcHook, KernelError> {
        self.detach_tc(interface, role);
        let ifindex = host::ifindex(interface).unwrap_or(0);
        let pin_path = self
            .pins
            .as_ref()
            .map(|pins| pins.tc_link(role.pin_name(), interface));
        if let Some(path) = &pin_path
            && path.exists()
        {
            match self.adopt_tc_link(role, path) {
                Ok(link) => {
                    self.tc.push(TcAttachment {
                        interface: interface.to_owned(),
                        ifindex,
                        role,
                        link: TcLink::Pinned {
                            link,
                            path: path.clone(),
                        },
                    });
                    return Ok(TcHook::Tcx);
                }
                Err(error) => {
                    // The device it was made for is gone (a pod's veth made
                    // again under the same name): attach anew.
                    log::debug!(
                        "{interface}: not reusing the pinned tc link {} ({})",
                        path.display(),
                        error_chain(error.as_ref())
                    );
                    pin::remove_pin(path)?;
                }
            }
        }
        let (id, hook) = self.attach_tc_new(interface, role)?;
        let link = match (hook, pin_path) {
            (TcHook::Tcx, Some(path)) => {
                let failed =
                    |source: Box<dyn std::error::Error + Send + Sync>| KernelError::PinLink {
                        interface: interface.to_owned(),
                        path: path.display().to_string(),
                        source,
                    };
                let link = self
                    .tc_program(role)?
                    .take_link(id)
                    .map_err(|e| failed(Box::new(e)))?;
                let link = FdLink::try_from(link).map_err(|e| failed(Box::new(e)))?;
                let pinned = link.pin(&path).map_err(|e| failed(Box::new(e)))?;
                TcLink::Pinned {
                    link: pinned.into(),
                    path,
                }
            }
            _ => TcLink::Owned(id),
        };
        self.tc.push(TcAttachment {
            interface: interface.to_owned(),
            ifindex,
            role,
            link,
        });
        Ok(hook)
    }

    /// Swaps `role`'s program into the tcx link pinned at `path`.
    fn adopt_tc_link(
        &mut self,
        role: TcRole,
        path: &Path,
    ) -> Result<FdLink, Box<dyn std::error::Error + Send + Sync>> {
        let pinned = PinnedLink::from_pin(path)?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
        let program = self.tc_program(role)?;
        let id = program.attach_to_link(link)?;
        let link = program.take_link(id)?;
        Ok(FdLink::try_from(link)?)
    }

    fn attach_tc_new(
        &mut self,
        interface: &str,
        role: TcRole,
    ) -> Result<(SchedClassifierLinkId, TcHook), KernelError> {
        let name = role.program();
        let program = self.tc_program(role)?;
        let (id, hook) = match program.attach(interface, TcAttachType::Ingress) {
            Ok(id) => (id, hook_kind()),
            Err(first) => {
                // Before tcx: the clsact qdisc must exist first.
                let _ = aya::programs::tc::qdisc_add_clsact(interface);
                let id = program
                    .attach_with_options(
                        interface,
                        TcAttachType::Ingress,
                        aya::programs::tc::TcAttachOptions::Netlink(Default::default()),
                    )
                    .map_err(|_| KernelError::AttachTc {
                        name,
                        interface: interface.to_owned(),
                        source: Box::new(first),
                    })?;
                (id, TcHook::Clsact)
            }
        };
        Ok((id, hook))
    }

    /// Detaches `role`'s tc program from `interface`, if attached there. A
    /// device that is gone took its attachment with it; that is no error.
    pub fn detach_tc(&mut self, interface: &str, role: TcRole) {
        let Some(index) = self
            .tc
            .iter()
            .position(|a| a.interface == interface && a.role == role)
        else {
            return;
        };
        let attachment = self.tc.remove(index);
        match attachment.link {
            TcLink::Owned(id) => {
                if let Ok(program) = self.tc_program(role)
                    && let Err(error) = program.detach(id)
                {
                    log::debug!(
                        "{interface}: detaching tc: {} (the device may be gone)",
                        error_chain(&error)
                    );
                }
            }
            // The kernel detaches when the last reference goes: the pin
            // and our fd.
            TcLink::Pinned { link, path } => {
                if let Err(error) = pin::remove_pin(&path) {
                    log::warn!("{interface}: {}", error_chain(&error));
                }
                drop(link);
            }
        }
    }

    /// tc links pinned for devices this agent did not attach to (a pod
    /// deleted while no agent ran, an uplink no longer chosen): unpinned,
    /// so they detach. Returns their pin names.
    pub fn unpin_stale_tc_links(&mut self) -> Result<Vec<String>, KernelError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let mut stale = Vec::new();
        for name in pins.pinned_tc_links()? {
            let path = pins.tc_links_dir().join(&name);
            let current = self
                .tc
                .iter()
                .any(|a| matches!(&a.link, TcLink::Pinned { path: p, .. } if *p == path));
            if !current {
                pin::remove_pin(&path)?;
                stale.push(name);
            }
        }
        Ok(stale)
    }

    /// Interfaces with the pod/tunnel tc program, with the ifindex each had
    /// when attached.
    pub fn tc_pod_interfaces(&self) -> Vec<(String, u32)> {
        self.tc
            .iter()
            .filter(|a| a.role == TcRole::Pod)
            .map(|a| (a.interface.clone(), a.ifindex))
            .collect()
    }

    fn detach_all_tc(&mut self) -> Vec<String> {
        let attachments: Vec<(String, TcRole)> = self
            .tc
            .iter()
            .map(|a| (a.interface.clone(), a.role))
            .collect();
        let mut detached = Vec::new();
        for (interface, role) in attachments {
            self.detach_tc(&interface, role);
            if role == TcRole::Pod {
                detached.push(format!("{interface} (tc)"));
            }
        }
        detached
    }

    /// Detaches the program from `interface`, if attached there (removing
    /// its pin).
    pub fn detach(&mut self, interface: &str) -> Result<(), KernelError> {
        let Some(index) = self.attached.iter().position(|a| a.interface == interface) else {
            return Ok(());
        };
        if let Some(ifindex) = host::ifindex(interface) {
            let _ = self.redirect_ok.remove(&ifindex);
        }
        self.detach_tc(interface, TcRole::Uplink);
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
        let mut detached = self.detach_all_tc();
        let attachments = std::mem::take(&mut self.attached);
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
        // Pinned tc links stay (pods' replies and the uplinks' hand-off keep
        // working); owned ones (clsact filters) go with the agent.
        let mut kept = Vec::new();
        let mut detached = Vec::new();
        for attachment in std::mem::take(&mut self.tc) {
            let label = format!(
                "{} (tc {})",
                attachment.interface,
                attachment.role.pin_name()
            );
            match attachment.link {
                TcLink::Pinned { link, .. } => {
                    drop(link);
                    kept.push(label);
                }
                TcLink::Owned(id) => {
                    if let Ok(program) = self.tc_program(attachment.role) {
                        let _ = program.detach(id);
                    }
                    detached.push(label);
                }
            }
        }
        let attachments = std::mem::take(&mut self.attached);
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
        lb_common::maps::FLOWS | lb_common::maps::FLOWS_NEW => "; existing flows are forgotten",
        lb_common::maps::STATS
        | lb_common::maps::SERVICE_STATS
        | lb_common::maps::BACKEND_STATS => "; its counters restart from zero",
        _ => "; the configuration is written anew and flows are re-balanced",
    }
}

/// What `SchedClassifier::attach` uses on this kernel.
fn hook_kind() -> TcHook {
    use aya::util::KernelVersion;
    if KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(6, 6, 0)) {
        TcHook::Tcx
    } else {
        TcHook::Clsact
    }
}

fn is_unknown_interface(error: &ProgramError) -> bool {
    matches!(error, ProgramError::UnknownInterface { .. })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large
/// flow tables load there too. Failure is harmless on newer kernels.
fn raise_memlock_limit() {
    if let Err(error) = sys::remove_memlock_limit() {
        log::debug!("cannot remove the memlock limit: {error}");
    }
}

/// Forwards the datapath's aya-log records to the agent's log as they come.
/// Needs a tokio runtime.
pub fn spawn_log_reader(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut fd = match sys::async_readable(logger) {
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
    sys::is_root()
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

/// Second descriptors for the maps `names` of a loaded object, for readers
/// that must not take them from their owners (the agent's /metrics). Taken
/// from this process's own descriptors because opening a map by id
/// (`BPF_MAP_GET_FD_BY_ID`) needs CAP_SYS_ADMIN, which the agent is not
/// given. A map that cannot be duplicated is left out (and logged).
fn duplicate_maps(ebpf: &Ebpf, names: &[&'static str]) -> BTreeMap<&'static str, MapData> {
    let mut found = BTreeMap::new();
    for &name in names {
        let Some(data) = ebpf.map(name).and_then(map_data) else {
            log::warn!("the datapath has no map {name}: /metrics will not report it");
            continue;
        };
        let duplicate = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|error| error.to_string())
            .and_then(|fd| MapData::from_fd(fd).map_err(|error| error_chain(&error)));
        match duplicate {
            Ok(data) => {
                found.insert(name, data);
            }
            Err(error) => log::warn!("cannot duplicate map {name} for /metrics: {error}"),
        }
    }
    found
}

/// The map behind any kind of `Map` xlb's object declares.
fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::LpmTrie(data)
        | Map::DevMap(data)
        | Map::DevMapHash(data)
        | Map::ArrayOfMaps(data)
        | Map::HashOfMaps(data)
        | Map::RingBuf(data)
        | Map::PerfEventArray(data) => Some(data),
        _ => None,
    }
}
