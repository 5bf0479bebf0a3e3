//! Every BPF map and program of the datapath, declared once for both sides:
//! name, kind, key/value sizes, capacity, pin group, how `xlb explain` treats
//! it, and each program's hook.
//!
//! The datapath (lb-ebpf/src/maps.rs) defines a `static` of exactly each
//! name, sized from [`decl`]; the agent derives from [`MAPS`] what it pins,
//! adopts, resizes at load and shares with `xlb explain`; a kernel test loads
//! the real object and checks it against [`MAPS`] and [`PROGRAMS`] both ways.
//!
//! **Adding a map** is one line in the `declare_maps!` table below (plus its
//! `static` in lb-ebpf/src/maps.rs): pinning, adoption and explain follow
//! from the row.

use core::mem::size_of;

use crate::reason::REASON_COUNT;
use crate::{
    Addr6, Affinity, Affinity6, AffinityKey, AffinityKey6, Backend, Backend6, BackendHop,
    BackendHop6, Flow, Flow6, FlowKey, FlowKey6, FragKey, FragKey6, FragPorts, GlobalConfig,
    IcmpLimit, NodeAddr, Paths, Peer, Service, ServiceKey, ServiceKey6, SockRevNat, SockRevNat6,
    SockRevNatKey, SockRevNatKey6, SourceRange, SourceRange6, Traffic,
};

/// How the kernel stores a map: `enum bpf_map_type`'s value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    /// Programs, for tail calls.
    ProgArray = 3,
    PerCpuArray = 6,
    LruHash = 9,
    LpmTrie = 11,
    /// Values are other maps (file descriptors in, map ids out).
    ArrayOfMaps = 12,
}

/// `BPF_F_NO_PREALLOC`: the kernel requires it of LPM tries.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`: an array the agent may mmap (`XLB_SELECT`'s tables).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_INNER_MAP`: an inner map's size is not part of its outer map's
/// template (kernel >= 5.10), so each service's table has its own size.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `map_flags` of every table in `XLB_SELECT` (and of its template, which
/// the kernel compares them with): any size, written through a mapping.
pub const SELECT_TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

impl MapKind {
    /// The map's `map_flags`, which follow from its kind.
    pub const fn flags(self) -> u32 {
        match self {
            MapKind::LpmTrie => BPF_F_NO_PREALLOC,
            _ => 0,
        }
    }

    /// The key size the kernel sees for a key type of `size` bytes (an LPM
    /// trie's key starts with the 4-byte prefix length).
    pub const fn key_size(self, size: usize) -> u32 {
        let size = size as u32;
        match self {
            MapKind::LpmTrie => size + 4,
            _ => size,
        }
    }
}

/// Who decides a map's capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    /// Compiled in: `MapDecl::max_entries`.
    Fixed,
    /// Set at load time from `conntrack.maxFlows` (default `max_entries`).
    Flows,
    /// `conntrack.maxFlows` when the node serves IPv6 (it lists or has an
    /// IPv6 address), else `max_entries`.
    Flows6,
    /// Set at load time to the backend ids the agent allows.
    Backends,
    /// Set at load time to the frontends (and selection tables) the agent
    /// allows.
    Services,
}

/// How the map's pin on a bpffs (`DIR/maps/NAME`) is treated across agent
/// restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// Part of the configuration. Its entries refer to the other
    /// configuration maps' (service entries to their tables, slots and
    /// affinity records to backend ids), so the group is adopted whole or
    /// recreated whole: never a fresh `XLB_SELECT` under adopted services.
    Config,
    /// Pinned and adopted alone; recreated alone when it does not fit.
    Alone,
    /// Not pinned: every load makes it anew.
    No,
}

/// How `xlb explain`'s simulation (kernel/explain.rs), which loads the
/// datapath a second time, gets the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Explain {
    /// The live pinned map: the datapath only reads it (a test checks
    /// lb-ebpf never writes one).
    Shared,
    /// A fresh private copy: the datapath writes it.
    Private,
    /// A small private copy seeded with the live entries of the packet's
    /// tuple (or client) before each run. Which entries is map-specific:
    /// a map marked `Seeded` needs its seeding in kernel/explain.rs.
    Seeded,
}

/// One map of the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDecl {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    /// The compiled-in capacity (the default of a load-time sized map).
    pub max_entries: u32,
    /// `map_flags`.
    pub flags: u32,
    pub sizing: Sizing,
    pub pin: Pin,
    pub explain: Explain,
}

/// Declares the maps: for each row, the name constant (`maps::FLOWS`, the
/// string both sides open it by), its [`MapDecl`] (`maps::decl::FLOWS`) and
/// its place in [`MAPS`].
macro_rules! declare_maps {
    ($(
        $(#[$doc:meta])*
        $id:ident = $name:literal: $kind:ident<$key:ty, $value:ty>,
            $max:expr, $sizing:ident, $pin:ident, $explain:ident $(, flags: $flags:expr)?;
    )*) => {
        $( $(#[$doc])* pub const $id: &str = $name; )*

        /// Each map's declaration, by the name of its constant in `maps`.
        pub mod decl {
            use super::*;
            $(
                pub const $id: MapDecl = MapDecl {
                    name: super::$id,
                    kind: MapKind::$kind,
                    key_size: MapKind::$kind.key_size(size_of::<$key>()),
                    value_size: size_of::<$value>() as u32,
                    max_entries: $max,
                    flags: MapKind::$kind.flags() $(| $flags)?,
                    sizing: Sizing::$sizing,
                    pin: Pin::$pin,
                    explain: Explain::$explain,
                };
            )*
        }

        /// Every map of the datapath, in declaration order.
        pub const MAPS: &[MapDecl] = &[$(decl::$id),*];
    };
}

declare_maps! {
    /// `HashMap<ServiceKey, Service>`: frontends. NodePorts use `addr_be == 0`.
    ///
    /// Row: `CONST = "NAME": Kind<Key, Value>, max entries, sizing, pin,
    /// explain[, flags: extra map_flags]`.
    SERVICES = "XLB_SERVICES": Hash<ServiceKey, Service>, SERVICES_MAX, Services, Config, Shared;
    /// `ArrayOfMaps` indexed by `Service::table_id`: each service's Maglev
    /// table, an `Array<u32>` of `Service::table_size` backend ids
    /// ([`SELECT_TABLE_FLAGS`]). The agent replaces a table by creating
    /// and filling a new one, then swapping it into its index with one
    /// update, which packets see atomically (as Cilium's per-service
    /// Maglev maps): no double buffering, no regions of one big array.
    /// Pinned with the configuration; the tables live as long as it
    /// points at them.
    SELECT = "XLB_SELECT": ArrayOfMaps<u32, u32>, TABLES_MAX, Services, Config, Shared;
    /// `Array<Backend>`: backends by id. Id 0 is never used.
    BACKENDS = "XLB_BACKENDS": Array<u32, Backend>, BACKENDS_MAX, Backends, Config, Shared;
    /// `Array<BackendHop>`: the datapath's next-hop cache per backend id. Not
    /// pinned: a new datapath refills it with one FIB lookup per backend.
    BACKEND_HOPS = "XLB_BACKEND_HOPS": Array<u32, BackendHop>, BACKENDS_MAX, Backends, No, Private;
    /// `LruHashMap<FlowKey, Flow>`: conntrack, two entries per flow.
    FLOWS = "XLB_FLOWS": LruHash<FlowKey, Flow>, FLOWS_MAX, Flows, Alone, Seeded;
    /// `LruHashMap<FlowKey, Flow>`: half-open TCP flows (SYN seen, client's ACK
    /// of the SYN-ACK not yet), two entries per flow. Kept apart from
    /// `XLB_FLOWS` so a SYN flood evicts only its own kind.
    FLOWS_NEW = "XLB_FLOWS_NEW": LruHash<FlowKey, Flow>, FLOWS_NEW_MAX, Fixed, Alone, Seeded;
    /// `HashMap<u32 /* addr_be */, NodeAddr>`: addresses that NodePorts answer on.
    NODE_ADDRS = "XLB_NODE_ADDRS": Hash<u32, NodeAddr>, NODE_ADDRS_MAX, Fixed, Config, Shared;
    /// `HashMap<u32 /* ifindex */, u32 /* addr_be */>`: masquerade source address
    /// per egress interface.
    IFACE_ADDRS = "XLB_IFACE_ADDRS": Hash<u32, u32>, IFACE_ADDRS_MAX, Fixed, Config, Shared;
    /// `LruHashMap<AffinityKey, Affinity>`: sessionAffinity=ClientIP state.
    AFFINITY = "XLB_AFFINITY": LruHash<AffinityKey, Affinity>, AFFINITY_MAX, Fixed, Config, Seeded;
    /// `LpmTrie<SourceRange, u32>`: loadBalancerSourceRanges allowlists.
    SOURCE_RANGES = "XLB_SOURCE_RANGES": LpmTrie<SourceRange, u32>, SOURCE_RANGES_MAX, Fixed, Config, Shared;
    /// `Array<GlobalConfig>` with one element.
    CONFIG = "XLB_CONFIG": Array<u32, GlobalConfig>, 1, Fixed, Config, Shared;
    /// `PerCpuArray<u64>` indexed by `Reason as u32`: packets per verdict reason.
    STATS = "XLB_STATS": PerCpuArray<u32, u64>, REASON_COUNT, Fixed, Alone, Private;
    /// `PerCpuArray<Traffic>` indexed by `Service::id`: forwarded traffic.
    SERVICE_STATS = "XLB_SERVICE_STATS": PerCpuArray<u32, Traffic>, SERVICE_IDS_MAX, Fixed, Alone, Private;
    /// `PerCpuArray<Traffic>` indexed by backend id: forwarded traffic.
    BACKEND_STATS = "XLB_BACKEND_STATS": PerCpuArray<u32, Traffic>, BACKENDS_MAX, Backends, Alone, Private;
    /// `LruHashMap<FragKey, FragPorts>`: first fragments' ports, for the
    /// datagram's later fragments.
    FRAGS = "XLB_FRAGS": LruHash<FragKey, FragPorts>, FRAGS_MAX, Fixed, Alone, Private;
    /// `LruHashMap<u32 /* client addr_be */, IcmpLimit>`: rate limit of the
    /// "fragmentation needed" answers xlb sends.
    ICMP_LIMIT = "XLB_ICMP_LIMIT": LruHash<u32, IcmpLimit>, ICMP_LIMIT_MAX, Fixed, Alone, Private;
    /// `Array<u32>` by ifindex, non-zero where XDP may redirect into the
    /// interface (those xlb's XDP program runs on: NICs, whose peer takes
    /// XDP frames). Frames for any other next hop (a pod's veth, a bridge, a
    /// tunnel) are handed to the tc program instead. An array, not a hash:
    /// every forwarded packet asks, and the verifier inlines an array
    /// lookup (a hash lookup cost ~10 ns a packet). An interface whose
    /// ifindex is past its end is never redirected into (its frames take
    /// the tc hand-off). Not pinned: each agent fills it with the interfaces
    /// it attaches to, so none is left from a previous configuration.
    REDIRECT_OK = "XLB_REDIRECT_OK": Array<u32, u32>, REDIRECT_OK_MAX, Fixed, No, Private;
    /// `PerCpuArray<Paths>` indexed by backend id: which hook carried its packets.
    BACKEND_PATHS = "XLB_BACKEND_PATHS": PerCpuArray<u32, Paths>, BACKENDS_MAX, Backends, Alone, Private;
    /// `LruHashMap<SockRevNatKey, SockRevNat>`: for socket-level balancing, the
    /// service address a socket asked for, by (socket cookie, backend), so
    /// recvmsg() and getpeername() show the service rather than the backend.
    SOCK_REVNAT = "XLB_SOCK_REVNAT": LruHash<SockRevNatKey, SockRevNat>, SOCK_REVNAT_MAX, Fixed, Alone, Private;
    /// `HashMap<u32 /* pod addr_be */, Peer>`: local pods (their host-side
    /// veth and MACs), so XDP can hand their frames to tc for
    /// `bpf_redirect_peer`. Not pinned: each agent fills it from the host
    /// (kernel/peers.rs) and keeps it current; a pod not in it is reached
    /// through `bpf_redirect_neigh` as before.
    PEERS = "XLB_PEERS": Hash<u32, Peer>, PEERS_MAX, Fixed, No, Private;
    /// Ports the datapath may have business with (frontend ports, backend
    /// target ports, ports of live flows): a TCP/UDP packet with neither
    /// port listed passes before any hash lookup. Part of the configuration
    /// group (its bits cover the services and backends written there) and
    /// shared with `xlb explain`, so its simulation filters as the datapath
    /// does.
    PORTS = "XLB_PORTS": Array<u32, u64>, PORTS_WORDS, Fixed, Config, Shared;

    // IPv6: the address-keyed maps again, one shape for both families
    // (`lb_common::family`). Backend ids, `XLB_SELECT`, the counters and
    // `XLB_PORTS` are shared: an IPv6 service's table holds ids of
    // `XLB_BACKENDS6`. Kernel names keep 15 characters, hence the short
    // ones.

    /// `HashMap<ServiceKey6, Service>`: IPv6 frontends (NodePorts: address ::).
    SERVICES6 = "XLB_SERVICES6": Hash<ServiceKey6, Service>, SERVICES_MAX, Services, Config, Shared;
    /// `Array<Backend6>`: IPv6 backends by id (the ids IPv6 services' tables
    /// hold; the same id is unused in `XLB_BACKENDS`).
    BACKENDS6 = "XLB_BACKENDS6": Array<u32, Backend6>, BACKENDS_MAX, Backends, Config, Shared;
    /// `Array<BackendHop6>`: `XLB_BACKEND_HOPS` for IPv6 backends.
    BACKEND_HOPS6 = "XLB_HOPS6": Array<u32, BackendHop6>, BACKENDS_MAX, Backends, No, Private;
    /// `LruHashMap<FlowKey6, Flow6>`: IPv6 conntrack, two entries per flow.
    /// As large as `XLB_FLOWS` on a node with IPv6 addresses,
    /// [`FLOWS6_MAX`] entries on one without (a preallocated table sized
    /// with `XLB_FLOWS` would cost every IPv4-only node 192 MiB). Seeded in
    /// `xlb explain` with nothing yet (its simulation is IPv4's): only made
    /// small there.
    FLOWS6 = "XLB_FLOWS6": LruHash<FlowKey6, Flow6>, FLOWS6_MAX, Flows6, Alone, Seeded;
    /// `LruHashMap<FlowKey6, Flow6>`: half-open IPv6 TCP flows.
    FLOWS_NEW6 = "XLB_FLOWS_NEW6": LruHash<FlowKey6, Flow6>, FLOWS_NEW_MAX, Fixed, Alone, Seeded;
    /// `HashMap<Addr6, NodeAddr>`: IPv6 addresses that NodePorts answer on.
    NODE_ADDRS6 = "XLB_NODE_ADDRS6": Hash<Addr6, NodeAddr>, NODE_ADDRS_MAX, Fixed, Config, Shared;
    /// `HashMap<u32 /* ifindex */, Addr6>`: IPv6 masquerade source address
    /// per egress interface (key 0: the default).
    IFACE_ADDRS6 = "XLB_IFADDRS6": Hash<u32, Addr6>, IFACE_ADDRS_MAX, Fixed, Config, Shared;
    /// `LruHashMap<Addr6 /* client */, IcmpLimit>`: rate limit of the
    /// ICMPv6 "packet too big" answers xlb sends (as `XLB_ICMP_LIMIT`).
    ICMP_LIMIT6 = "XLB_ICMP_LIMIT6": LruHash<Addr6, IcmpLimit>, ICMP_LIMIT_MAX, Fixed, Alone, Private;
    /// `LruHashMap<AffinityKey6, Affinity6>`: sessionAffinity=ClientIP state
    /// of IPv6 clients.
    AFFINITY6 = "XLB_AFFINITY6": LruHash<AffinityKey6, Affinity6>, AFFINITY_MAX, Fixed, Config, Seeded;
    /// `LpmTrie<SourceRange6, u32>`: loadBalancerSourceRanges of IPv6 sources.
    SOURCE_RANGES6 = "XLB_RANGES6": LpmTrie<SourceRange6, u32>, SOURCE_RANGES_MAX, Fixed, Config, Shared;
    /// `LruHashMap<FragKey6, FragPorts>`: IPv6 first fragments' ports, for
    /// the datagram's later fragments (as `XLB_FRAGS`).
    FRAGS6 = "XLB_FRAGS6": LruHash<FragKey6, FragPorts>, FRAGS_MAX, Fixed, Alone, Private;
    /// `HashMap<Addr6, Peer>`: local pods by IPv6 address (as `XLB_PEERS`).
    PEERS6 = "XLB_PEERS6": Hash<Addr6, Peer>, PEERS_MAX, Fixed, No, Private;
    /// `LruHashMap<SockRevNatKey6, SockRevNat6>`: `XLB_SOCK_REVNAT` for the
    /// IPv6 socket hooks (connect6, sendmsg6, recvmsg6, getpeername6). An
    /// IPv4 service reached through an IPv4-mapped address (`::ffff:a.b.c.d`)
    /// is recorded in `XLB_SOCK_REVNAT`, as the IPv4 hooks record it.
    SOCK_REVNAT6 = "XLB_SOCK_REV6": LruHash<SockRevNatKey6, SockRevNat6>, SOCK_REVNAT_MAX, Fixed, Alone, Private;
    /// `ProgramArray`: `[PROGS6_IPV6]` is `xlb6`, which `xlb` tail-calls for
    /// IPv6 frames, so each family's pipeline is verified on its own budget
    /// (one program holding both exceeds the verifier's million
    /// instructions); `xlb6` tail-calls `[PROGS6_FRAG]`, `xlb6_frag`, for
    /// later fragments and `[PROGS6_ICMP]`, `xlb6_icmp`, for ICMPv6 (its
    /// stack has no room for either beside the new-flow stages). The agent
    /// fills it as it loads. Pinned: the kernel
    /// empties a program array when user space lets go of it, and the
    /// datapath goes on without an agent (`--keep-attached`, a restart)
    /// with IPv6 too; while it is empty IPv6 frames pass as
    /// `pass_not_ipv4`.
    PROGS6 = "XLB_PROGS6": ProgArray<u32, u32>, 3, Fixed, Alone, Private;
    /// `PerCpuArray<[u64; 32]>` of one: `xlb6`'s scratch space. Word 0:
    /// the offset of the L4 header after the extension headers, put there
    /// and read back so the verifier knows it only by its bounds (else each
    /// way through the walk leaves it a different range, and the verifier
    /// walks the whole pipeline again for each). Words 1..16: a new flow
    /// between its stages, 16..32: its entry as it is built (too big for
    /// the 512-byte stack beside them).
    SCRATCH6 = "XLB_SCRATCH6": PerCpuArray<u32, [u64; 32]>, 1, Fixed, No, Private;
}

/// `XLB_PROGS6` index of `xlb6`.
pub const PROGS6_IPV6: u32 = 0;
/// `XLB_PROGS6` index of `xlb6_icmp`: ICMPv6, errors about flows
/// translated.
pub const PROGS6_ICMP: u32 = 2;
/// `XLB_PROGS6` index of `xlb6_frag`: IPv6 later fragments (no L4 header)
/// on a stack of their own, as `xlb6`'s new-flow stages leave no room.
pub const PROGS6_FRAG: u32 = 1;

/// Where a program of the object runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// XDP on the uplinks.
    Xdp,
    /// An XDP program `xlb` tail-calls (`XLB_PROGS6`): loaded, never attached.
    XdpTail,
    /// tc ingress (a tcx link, or a clsact filter on older kernels).
    TcIngress,
    /// A cgroup v2 socket hook (`cgroup/<hook>` section), by its hook name.
    CgroupSockAddr(&'static str),
}

/// One program of the datapath. Kernel program names keep 15 characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramDecl {
    pub name: &'static str,
    pub hook: Hook,
}

/// Every program of the datapath.
pub const PROGRAMS: [ProgramDecl; 14] = [
    ProgramDecl {
        name: "xlb",
        hook: Hook::Xdp,
    },
    // Sends on the frames XDP rewrote but could not deliver itself
    // (metadata hand-off).
    ProgramDecl {
        name: "xlb_tc_uplink",
        hook: Hook::TcIngress,
    },
    // On pods' host-side veths and tunnel devices: reverse NAT for backend
    // replies that never cross an XDP interface.
    ProgramDecl {
        name: "xlb_tc_pod",
        hook: Hook::TcIngress,
    },
    ProgramDecl {
        name: "xlb_connect4",
        hook: Hook::CgroupSockAddr("connect4"),
    },
    ProgramDecl {
        name: "xlb_sendmsg4",
        hook: Hook::CgroupSockAddr("sendmsg4"),
    },
    ProgramDecl {
        name: "xlb_recvmsg4",
        hook: Hook::CgroupSockAddr("recvmsg4"),
    },
    ProgramDecl {
        name: "xlb_getpeer4",
        hook: Hook::CgroupSockAddr("getpeername4"),
    },
    // IPv6 frames, tail-called from `xlb` through `XLB_PROGS6`.
    ProgramDecl {
        name: "xlb6",
        hook: Hook::XdpTail,
    },
    ProgramDecl {
        name: "xlb_connect6",
        hook: Hook::CgroupSockAddr("connect6"),
    },
    ProgramDecl {
        name: "xlb_sendmsg6",
        hook: Hook::CgroupSockAddr("sendmsg6"),
    },
    ProgramDecl {
        name: "xlb_recvmsg6",
        hook: Hook::CgroupSockAddr("recvmsg6"),
    },
    ProgramDecl {
        name: "xlb_getpeer6",
        hook: Hook::CgroupSockAddr("getpeername6"),
    },
    // ICMPv6, tail-called from `xlb6` through `XLB_PROGS6`.
    ProgramDecl {
        name: "xlb6_icmp",
        hook: Hook::XdpTail,
    },
    // IPv6 later fragments, tail-called from `xlb6` (`PROGS6_FRAG`).
    ProgramDecl {
        name: "xlb6_frag",
        hook: Hook::XdpTail,
    },
];

/// Name of the XDP program in the object file.
pub const PROGRAM: &str = PROGRAMS[0].name;
/// tc ingress program for uplinks.
pub const PROGRAM_TC_UPLINK: &str = PROGRAMS[1].name;
/// tc ingress program for pods' host-side veths and tunnel devices.
pub const PROGRAM_TC_POD: &str = PROGRAMS[2].name;
/// The IPv6 XDP program (`XLB_PROGS6`).
pub const PROGRAM6: &str = PROGRAMS[7].name;
/// The ICMPv6 XDP program (`XLB_PROGS6`).
pub const PROGRAM6_ICMP: &str = PROGRAMS[12].name;
/// The IPv6 later fragments' XDP program (`XLB_PROGS6[PROGS6_FRAG]`).
pub const PROGRAM6_FRAG: &str = PROGRAMS[13].name;

/// The cgroup socket hooks, as (program name, hook), in attach order: the
/// IPv4 ones, then the IPv6 ones.
pub const SOCK_PROGRAMS: [(&str, &str); 8] = [
    socket_hook(PROGRAMS[3]),
    socket_hook(PROGRAMS[4]),
    socket_hook(PROGRAMS[5]),
    socket_hook(PROGRAMS[6]),
    socket_hook(PROGRAMS[8]),
    socket_hook(PROGRAMS[9]),
    socket_hook(PROGRAMS[10]),
    socket_hook(PROGRAMS[11]),
];

const fn socket_hook(program: ProgramDecl) -> (&'static str, &'static str) {
    match program.hook {
        Hook::CgroupSockAddr(hook) => (program.name, hook),
        _ => panic!("not a socket hook"),
    }
}

/// `BPF_OBJ_NAME_LEN - 1`: the kernel keeps this much of a map's or
/// program's name.
pub const KERNEL_NAME_LEN: usize = 15;

/// The name the kernel keeps for a map or program called `name`.
pub fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(KERNEL_NAME_LEN)]
}

/// Frontends (and selection tables) at load, unless `--map-capacity` or
/// a growth says more (`Sizing::Services`).
pub const SERVICES_MAX: u32 = 65_536;
/// Service ids are below this (the per-service counters are an array).
pub const SERVICE_IDS_MAX: u32 = 65_536;
/// Selection tables: at most one per service entry, so never more than
/// `SERVICES_MAX` live at once (a table's index is reused once no entry
/// points at it).
pub const TABLES_MAX: u32 = SERVICES_MAX;
/// Backend ids at load, unless `--map-capacity` or a growth says more
/// (`Sizing::Backends`).
pub const BACKENDS_MAX: u32 = 131_072;
pub const FLOWS_MAX: u32 = 1 << 20;
/// `XLB_FLOWS6` on a node without IPv6 addresses (3 MiB).
pub const FLOWS6_MAX: u32 = 1 << 14;
/// 16,384 half-open flows: at most about half of one backend's default
/// masquerade port range (28,976 ports), so even a flood aimed at a
/// one-backend service leaves 32 port probes a free port (0.57^32 < 1e-7).
pub const FLOWS_NEW_MAX: u32 = 1 << 15;
pub const NODE_ADDRS_MAX: u32 = 256;
pub const IFACE_ADDRS_MAX: u32 = 256;
pub const AFFINITY_MAX: u32 = 1 << 18;
pub const SOURCE_RANGES_MAX: u32 = 16_384;
pub const FRAGS_MAX: u32 = 16_384;
pub const ICMP_LIMIT_MAX: u32 = 16_384;
pub const REDIRECT_OK_MAX: u32 = 65_536;
pub const SOCK_REVNAT_MAX: u32 = 1 << 18;
/// Pods on one node (Kubernetes' default limit is 110).
pub const PEERS_MAX: u32 = 4_096;
/// `XLB_PORTS`: one bit per port (1024 words), then `PORTS_ON`.
pub const PORTS_WORDS: u32 = 1024 + 1;
/// `XLB_PORTS[PORTS_ON]` is non-zero once the agent has written the whole
/// bitmap: until then (a fresh map, an agent that predates it) the
/// datapath does not filter. It lives in the bitmap's own map, not in
/// `XLB_CONFIG`, so a recreated bitmap can never be vouched for by an
/// adopted config.
pub const PORTS_ON: u32 = 1024;

/// The `XLB_PORTS` word holding `port`'s bit, and the bit.
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1 << (port & 63))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_distinct_as_the_kernel_keeps_them() {
        for (index, map) in MAPS.iter().enumerate() {
            for other in &MAPS[index + 1..] {
                assert_ne!(kernel_name(map.name), kernel_name(other.name));
            }
        }
        for (index, program) in PROGRAMS.iter().enumerate() {
            assert!(program.name.len() <= KERNEL_NAME_LEN, "{}", program.name);
            for other in &PROGRAMS[index + 1..] {
                assert_ne!(program.name, other.name);
            }
        }
    }

    #[test]
    fn the_table_declares_what_the_rows_say() {
        assert_eq!(
            decl::SOURCE_RANGES.key_size,
            4 + size_of::<SourceRange>() as u32
        );
        assert_eq!(decl::SOURCE_RANGES.flags, BPF_F_NO_PREALLOC);
        assert_eq!(decl::FLOWS.name, FLOWS);
        assert_eq!(decl::STATS.max_entries, REASON_COUNT);
        assert!(MAPS.contains(&decl::SOCK_REVNAT));
        assert_eq!(decl::SOCK_REVNAT6.key_size, 32);
    }

    #[test]
    fn every_socket_hook_is_attached_once() {
        for hook in [
            "connect4",
            "sendmsg4",
            "recvmsg4",
            "getpeername4",
            "connect6",
            "sendmsg6",
            "recvmsg6",
            "getpeername6",
        ] {
            let attached = SOCK_PROGRAMS.iter().filter(|(_, h)| *h == hook).count();
            assert_eq!(attached, 1, "{hook}");
        }
        for program in PROGRAMS {
            if let Hook::CgroupSockAddr(hook) = program.hook {
                assert!(SOCK_PROGRAMS.contains(&(program.name, hook)), "{hook}");
            }
        }
    }

    #[test]
    fn only_configuration_is_shared_with_explain() {
        for map in MAPS {
            if map.explain == Explain::Shared {
                assert_eq!(map.pin, Pin::Config, "{}", map.name);
            }
            if map.explain == Explain::Seeded {
                assert_ne!(map.pin, Pin::No, "{} is seeded from its pin", map.name);
            }
        }
    }
}
