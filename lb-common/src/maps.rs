//! Names and default capacities of every BPF map, defined once for both sides.
//!
//! The datapath declares each map as a `static` with exactly this name; the
//! agent opens them by these names and may resize the ones marked "load-time"
//! with `EbpfLoader::set_max_entries` before loading.

/// `HashMap<ServiceKey, Service>`: frontends. NodePorts use `addr_be == 0`.
pub const SERVICES: &str = "XLB_SERVICES";
/// `Array<u32>`: backend selection slots (backend ids), one region per service
/// at `Service::table_offset .. + table_size`. Load-time sized.
pub const SELECT: &str = "XLB_SELECT";
/// `Array<Backend>`: backends by id. Id 0 is never used. Load-time sized.
pub const BACKENDS: &str = "XLB_BACKENDS";
/// `Array<BackendHop>`: the datapath's next-hop cache per backend id.
pub const BACKEND_HOPS: &str = "XLB_BACKEND_HOPS";
/// `LruHashMap<FlowKey, Flow>`: conntrack, two entries per flow. Load-time sized.
pub const FLOWS: &str = "XLB_FLOWS";
/// `LruHashMap<FlowKey, Flow>`: half-open TCP flows (SYN seen, client's ACK
/// of the SYN-ACK not yet), two entries per flow. Kept apart from
/// `XLB_FLOWS` so a SYN flood evicts only its own kind. Load-time sized.
pub const FLOWS_NEW: &str = "XLB_FLOWS_NEW";
/// `HashMap<u32 /* addr_be */, NodeAddr>`: addresses that NodePorts answer on.
pub const NODE_ADDRS: &str = "XLB_NODE_ADDRS";
/// `HashMap<u32 /* ifindex */, u32 /* addr_be */>`: masquerade source address
/// per egress interface.
pub const IFACE_ADDRS: &str = "XLB_IFACE_ADDRS";
/// `LruHashMap<AffinityKey, Affinity>`: sessionAffinity=ClientIP state.
pub const AFFINITY: &str = "XLB_AFFINITY";
/// `LpmTrie<SourceRange, u32>`: loadBalancerSourceRanges allowlists.
pub const SOURCE_RANGES: &str = "XLB_SOURCE_RANGES";
/// `Array<GlobalConfig>` with one element.
pub const CONFIG: &str = "XLB_CONFIG";
/// `PerCpuArray<u64>` indexed by `Reason as u32`: packets per verdict reason.
pub const STATS: &str = "XLB_STATS";
/// `PerCpuArray<Traffic>` indexed by `Service::id`: forwarded traffic.
pub const SERVICE_STATS: &str = "XLB_SERVICE_STATS";
/// `PerCpuArray<Traffic>` indexed by backend id: forwarded traffic.
pub const BACKEND_STATS: &str = "XLB_BACKEND_STATS";

/// `LruHashMap<FragKey, FragPorts>`: first fragments' ports, for the
/// datagram's later fragments.
pub const FRAGS: &str = "XLB_FRAGS";
/// `LruHashMap<u32 /* client addr_be */, IcmpLimit>`: rate limit of the
/// "fragmentation needed" answers xlb sends.
pub const ICMP_LIMIT: &str = "XLB_ICMP_LIMIT";
/// `HashMap<u32 /* ifindex */, u32 /* flags, 0 */>`: egress interfaces XDP
/// may redirect into (those xlb's XDP program runs on: NICs, whose peer takes
/// XDP frames). Frames for any other next hop (a pod's veth, a bridge, a
/// tunnel) are handed to the tc program instead.
pub const REDIRECT_OK: &str = "XLB_REDIRECT_OK";
/// `PerCpuArray<Paths>` indexed by backend id: which hook carried its packets.
pub const BACKEND_PATHS: &str = "XLB_BACKEND_PATHS";
/// `LruHashMap<SockRevNatKey, SockRevNat>`: for socket-level balancing, the
/// service address a socket asked for, by (socket cookie, backend), so
/// recvmsg() and getpeername() show the service rather than the backend.
pub const SOCK_REVNAT: &str = "XLB_SOCK_REVNAT";

/// Name of the XDP program in the object file.
pub const PROGRAM: &str = "xlb";
/// tc ingress program for uplinks: sends on the frames XDP rewrote but could
/// not deliver itself (metadata hand-off).
pub const PROGRAM_TC_UPLINK: &str = "xlb_tc_uplink";
/// tc ingress program for pods' host-side veths and tunnel devices: reverse
/// NAT for backend replies that never cross an XDP interface.
pub const PROGRAM_TC_POD: &str = "xlb_tc_pod";

/// The cgroup v2 socket hooks in the object file (`cgroup/<hook>` sections),
/// as (program name, hook). Kernel program names keep 15 characters.
pub const SOCK_PROGRAMS: [(&str, &str); 4] = [
    ("xlb_connect4", "connect4"),
    ("xlb_sendmsg4", "sendmsg4"),
    ("xlb_recvmsg4", "recvmsg4"),
    ("xlb_getpeer4", "getpeername4"),
];

pub const SERVICES_MAX: u32 = 65_536;
/// Service ids are below this (the per-service counters are an array).
pub const SERVICE_IDS_MAX: u32 = 65_536;
pub const SELECT_MAX: u32 = 1 << 22;
pub const BACKENDS_MAX: u32 = 131_072;
pub const FLOWS_MAX: u32 = 1 << 20;
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
pub const REDIRECT_OK_MAX: u32 = 256;
pub const SOCK_REVNAT_MAX: u32 = 1 << 18;
