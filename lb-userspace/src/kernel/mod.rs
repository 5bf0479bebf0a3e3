//! The kernel side of the agent: loading the XDP object, attaching it,
//! pinning both on a bpffs (and adopting what a previous agent pinned),
//! reading and writing its maps, and the host facts around it. The only
//! module with aya; its raw system calls, the agent's only `unsafe`, are in
//! `sys.rs`.
//!
//! `load.rs` loads the object, `xdp.rs`, `tc.rs` and `sockets.rs` attach
//! its programs (`links.rs`: pinned links, adopted or new, for both), and
//! `maps/` writes and reads the maps.

pub mod conntrack;
pub mod explain;
pub mod host;
pub mod kept;
mod links;
pub mod linkwatch;
mod load;
pub mod maps;
pub mod neigh;
pub mod peers;
pub mod pin;
pub mod seed;
pub mod sock;
pub mod sock_destroy;
mod sockets;
pub mod sys;
mod tc;
pub mod uplinks;
mod xdp;

use std::collections::BTreeMap;
use std::fmt;

use aya::maps::{Array, MapData};
use aya::programs::ProgramError;
use aya::{Ebpf, EbpfError};
use lb_common::maps::{MapDecl, Sizing};

pub use conntrack::{FlowTable, GcPass};
pub use host::LinkKind;
pub use load::spawn_log_reader;
pub use maps::{KernelMaps, MapIoError, OpenError};
pub use neigh::{NeighbourWorker, Neighbours};
pub use pin::{DEFAULT_BPFFS, PinDir, PinError};
pub use sock::{SocketHookError, SocketHooks};
pub use tc::{TcHook, TcRole};

/// The datapath object built by lb-userspace/build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Load-time map sizes (the maps whose `Sizing` is not `Fixed` in
/// `lb_common::maps::MAPS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub flows: u32,
    /// `XLB_FLOWS6` (`Sizing::Flows6`).
    pub flows6: u32,
    /// Backend ids (`XLB_BACKENDS` and the arrays indexed like it).
    pub backends: u32,
    /// Frontends (`XLB_SERVICES`) and selection tables (`XLB_SELECT`).
    pub services: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            flows: lb_common::maps::FLOWS_MAX,
            flows6: lb_common::maps::FLOWS6_MAX,
            backends: lb_common::maps::BACKENDS_MAX,
            services: lb_common::maps::SERVICES_MAX,
        }
    }
}

impl MapSizes {
    /// The capacity the loader gives `map`.
    pub fn max_entries(&self, map: &MapDecl) -> u32 {
        match map.sizing {
            Sizing::Fixed => map.max_entries,
            Sizing::Flows => self.flows,
            Sizing::Flows6 => self.flows6,
            Sizing::Backends => self.backends,
            Sizing::Services => self.services,
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

/// The loaded object and where its program is attached. Dropping it
/// detaches unpinned links; `detach_all` detaches everything with logging,
/// `release_all` leaves pinned links attached.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<xdp::Attachment>,
    /// tc programs; tcx links are pinned when the maps are.
    tc: Vec<tc::TcAttachment>,
    /// `XLB_REDIRECT_OK`: the interfaces XDP runs on.
    redirect_ok: Array<MapData, u32>,
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
    /// The configuration maps were pinned at other sizes and recreated:
    /// the ids they gave, for the first plan to keep.
    pub kept: Option<kept::Kept>,
    /// Duplicates of the maps `Datapath::load_with` was asked for (the
    /// reader's, for /metrics and the exit log), by name.
    pub observed: BTreeMap<&'static str, MapData>,
}

/// The object's program `name`, of the kind `P` (`not_kind` says what
/// else it is).
fn program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    not_kind: fn(&'static str, ProgramError) -> KernelError,
) -> Result<&'a mut P, KernelError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::MissingProgram { name })?
        .try_into()
        .map_err(|source| not_kind(name, source))
}

impl Datapath {
    /// Where links and maps are pinned, if they are.
    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }
}

/// Whether this process may load BPF programs (kernel tests skip otherwise).
pub fn is_root() -> bool {
    sys::is_root()
}

/// Small maps for tests that load the real object.
#[cfg(test)]
pub(crate) const TEST_SIZES: MapSizes = MapSizes {
    flows: 4096,
    flows6: 1024,
    backends: 64,
    services: 128,
};

#[cfg(test)]
mod tests;
