//! The datapath's maps: one `static` per row of lb-common's declaration
//! (`lb_common::maps`), named as declared and sized from `decl`, so the agent
//! opens exactly these (a kernel test checks the object against it).

use aya_ebpf::{
    btf_maps::{self, ArrayOfMaps},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    Addr6, Affinity, Affinity6, AffinityKey, AffinityKey6, Backend, Backend6, BackendHop,
    BackendHop6, Flow, Flow6, FlowKey, FlowKey6, FragKey, FragKey6, FragPorts, GlobalConfig,
    IcmpLimit, NodeAddr, Paths, Peer, Service, ServiceKey, ServiceKey6, SockRevNat, SockRevNat6,
    SockRevNatKey, SockRevNatKey6, SourceRange, SourceRange6, Traffic,
    maps::{SELECT_TABLE_FLAGS, decl},
};

#[map]
pub static XLB_SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(decl::SERVICES.max_entries, decl::SERVICES.flags);

/// A selection table: `XLB_SELECT`'s inner-map template. Its size is a
/// placeholder (`BPF_F_INNER_MAP`: every table has its own).
pub type SelectTable = btf_maps::Array<u32, 1, { SELECT_TABLE_FLAGS as usize }>;

/// Per-service selection tables (aya declares maps of maps only as BTF
/// maps; the agent opens it by name like the others).
#[btf_map]
pub static XLB_SELECT: ArrayOfMaps<SelectTable, { decl::SELECT.max_entries as usize }> =
    ArrayOfMaps::new();

#[map]
pub static XLB_BACKENDS: Array<Backend> =
    Array::with_max_entries(decl::BACKENDS.max_entries, decl::BACKENDS.flags);

#[map]
pub static XLB_BACKEND_HOPS: Array<BackendHop> =
    Array::with_max_entries(decl::BACKEND_HOPS.max_entries, decl::BACKEND_HOPS.flags);

#[map]
pub static XLB_FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(decl::FLOWS.max_entries, decl::FLOWS.flags);

#[map]
pub static XLB_FLOWS_NEW: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(decl::FLOWS_NEW.max_entries, decl::FLOWS_NEW.flags);

#[map]
pub static XLB_NODE_ADDRS: HashMap<u32, NodeAddr> =
    HashMap::with_max_entries(decl::NODE_ADDRS.max_entries, decl::NODE_ADDRS.flags);

#[map]
pub static XLB_IFACE_ADDRS: HashMap<u32, u32> =
    HashMap::with_max_entries(decl::IFACE_ADDRS.max_entries, decl::IFACE_ADDRS.flags);

#[map]
pub static XLB_AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::with_max_entries(decl::AFFINITY.max_entries, decl::AFFINITY.flags);

#[map]
pub static XLB_SOURCE_RANGES: LpmTrie<SourceRange, u32> =
    LpmTrie::with_max_entries(decl::SOURCE_RANGES.max_entries, decl::SOURCE_RANGES.flags);

#[map]
pub static XLB_CONFIG: Array<GlobalConfig> =
    Array::with_max_entries(decl::CONFIG.max_entries, decl::CONFIG.flags);

#[map]
pub static XLB_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(decl::STATS.max_entries, decl::STATS.flags);

#[map]
pub static XLB_SERVICE_STATS: PerCpuArray<Traffic> =
    PerCpuArray::with_max_entries(decl::SERVICE_STATS.max_entries, decl::SERVICE_STATS.flags);

#[map]
pub static XLB_BACKEND_STATS: PerCpuArray<Traffic> =
    PerCpuArray::with_max_entries(decl::BACKEND_STATS.max_entries, decl::BACKEND_STATS.flags);

#[map]
pub static XLB_FRAGS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(decl::FRAGS.max_entries, decl::FRAGS.flags);

#[map]
pub static XLB_ICMP_LIMIT: LruHashMap<u32, IcmpLimit> =
    LruHashMap::with_max_entries(decl::ICMP_LIMIT.max_entries, decl::ICMP_LIMIT.flags);

#[map]
pub static XLB_REDIRECT_OK: Array<u32> =
    Array::with_max_entries(decl::REDIRECT_OK.max_entries, decl::REDIRECT_OK.flags);

#[map]
pub static XLB_BACKEND_PATHS: PerCpuArray<Paths> =
    PerCpuArray::with_max_entries(decl::BACKEND_PATHS.max_entries, decl::BACKEND_PATHS.flags);

#[map]
pub static XLB_PEERS: HashMap<u32, Peer> =
    HashMap::with_max_entries(decl::PEERS.max_entries, decl::PEERS.flags);

#[map]
pub static XLB_PORTS: Array<u64> =
    Array::with_max_entries(decl::PORTS.max_entries, decl::PORTS.flags);

#[map]
pub static XLB_SERVICES6: HashMap<ServiceKey6, Service> =
    HashMap::with_max_entries(decl::SERVICES6.max_entries, decl::SERVICES6.flags);

#[map]
pub static XLB_BACKENDS6: Array<Backend6> =
    Array::with_max_entries(decl::BACKENDS6.max_entries, decl::BACKENDS6.flags);

#[map]
pub static XLB_HOPS6: Array<BackendHop6> =
    Array::with_max_entries(decl::BACKEND_HOPS6.max_entries, decl::BACKEND_HOPS6.flags);

#[map]
pub static XLB_FLOWS6: LruHashMap<FlowKey6, Flow6> =
    LruHashMap::with_max_entries(decl::FLOWS6.max_entries, decl::FLOWS6.flags);

#[map]
pub static XLB_FLOWS_NEW6: LruHashMap<FlowKey6, Flow6> =
    LruHashMap::with_max_entries(decl::FLOWS_NEW6.max_entries, decl::FLOWS_NEW6.flags);

#[map]
pub static XLB_NODE_ADDRS6: HashMap<Addr6, NodeAddr> =
    HashMap::with_max_entries(decl::NODE_ADDRS6.max_entries, decl::NODE_ADDRS6.flags);

#[map]
pub static XLB_IFADDRS6: HashMap<u32, Addr6> =
    HashMap::with_max_entries(decl::IFACE_ADDRS6.max_entries, decl::IFACE_ADDRS6.flags);

#[map]
pub static XLB_ICMP_LIMIT6: LruHashMap<Addr6, IcmpLimit> =
    LruHashMap::with_max_entries(decl::ICMP_LIMIT6.max_entries, decl::ICMP_LIMIT6.flags);

#[map]
pub static XLB_AFFINITY6: LruHashMap<AffinityKey6, Affinity6> =
    LruHashMap::with_max_entries(decl::AFFINITY6.max_entries, decl::AFFINITY6.flags);

#[map]
pub static XLB_RANGES6: LpmTrie<SourceRange6, u32> =
    LpmTrie::with_max_entries(decl::SOURCE_RANGES6.max_entries, decl::SOURCE_RANGES6.flags);

#[map]
pub static XLB_FRAGS6: LruHashMap<FragKey6, FragPorts> =
    LruHashMap::with_max_entries(decl::FRAGS6.max_entries, decl::FRAGS6.flags);

#[map]
pub static XLB_PEERS6: HashMap<Addr6, Peer> =
    HashMap::with_max_entries(decl::PEERS6.max_entries, decl::PEERS6.flags);

/// The IPv6 socket hooks' reverse translation (see `sock.rs`).
#[map]
pub static XLB_SOCK_REV6: LruHashMap<SockRevNatKey6, SockRevNat6> =
    LruHashMap::with_max_entries(decl::SOCK_REVNAT6.max_entries, decl::SOCK_REVNAT6.flags);

#[map]
pub static XLB_SCRATCH6: PerCpuArray<[u64; 32]> =
    PerCpuArray::with_max_entries(decl::SCRATCH6.max_entries, decl::SCRATCH6.flags);

/// `value` as the verifier will know it afterwards: only by the bounds the
/// caller checks (`XLB_SCRATCH6` word 0). `u64::MAX` if the slot is missing.
#[inline(always)]
pub fn forget(value: u64) -> u64 {
    match XLB_SCRATCH6.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run;
        // volatile so the compiler does not reuse the value it stored.
        Some(slot) => unsafe {
            let word = slot.cast::<u64>();
            core::ptr::write_volatile(word, value);
            core::ptr::read_volatile(word)
        },
        None => u64::MAX,
    }
}

/// `XLB_SCRATCH6` words 1..16: a new flow between its stages.
pub const SCRATCH_NEW_FLOW: usize = 1;
/// Words 16..21: the packet's flow key.
pub const SCRATCH_KEY: usize = 16;
/// Words 21..26: the key of an entry's peer, while it is looked up.
pub const SCRATCH_PEER_KEY: usize = 21;
/// Words 21..26 again: a new flow's service and backend between its
/// stages (a new flow's stages look no peer up).
pub const SCRATCH_CHOSEN: usize = 21;
/// Word 26: the MTU a packet did not fit, for the packet-too-big stage.
pub const SCRATCH_MTU: usize = 26;
/// Word 27: the fragment header the last IPv6 walk met (`parse::ipv6`).
pub const SCRATCH_FRAGMENT: usize = 27;

/// This CPU's scratch space for a `T` from `XLB_SCRATCH6` word `word`
/// (one of the `SCRATCH_*`): at most 40 bytes from word 16 on (up to
/// word 27), 120 from word 1, 8-aligned.
#[inline(always)]
pub fn scratch<T>(word: usize) -> Option<*mut T> {
    const { assert!(core::mem::size_of::<T>() <= 120 && core::mem::align_of::<T>() <= 8) };
    if word >= SCRATCH_KEY && core::mem::size_of::<T>() > 40 {
        return None;
    }
    let slot = XLB_SCRATCH6.get_ptr_mut(0)?;
    // SAFETY: checked above: the `T` ends inside the 256-byte slot.
    Some(unsafe { slot.cast::<u64>().add(word.min(SCRATCH_FRAGMENT)).cast() })
}

#[map]
pub static XLB_PROGS6: ProgramArray =
    ProgramArray::with_max_entries(decl::PROGS6.max_entries, decl::PROGS6.flags);

/// Which hook carried a forwarded packet, for `XLB_BACKEND_PATHS`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Xdp,
    /// Handed to tc, sent with `bpf_redirect_neigh` (or reverse-NATed at tc).
    Tc,
    /// Handed to tc, sent into a local pod with `bpf_redirect_peer`.
    Peer,
}

/// Counts a forwarded packet of backend `backend_id` under the path it took.
#[inline(always)]
pub fn count_path(backend_id: u32, to_client: bool, path: Path) {
    let Some(paths) = XLB_BACKEND_PATHS.get_ptr_mut(backend_id) else {
        return;
    };
    // SAFETY: per-CPU slot, no other writer on this CPU while we run.
    let paths = unsafe { &mut *paths };
    match (to_client, path) {
        (false, Path::Xdp) => paths.to_backend_xdp += 1,
        (false, Path::Tc) => paths.to_backend_tc += 1,
        (true, Path::Xdp) => paths.to_client_xdp += 1,
        (false, Path::Peer) => paths.to_backend_peer += 1,
        // A reply to a client that is a local pod: tc sent it either way.
        (true, Path::Tc | Path::Peer) => paths.to_client_tc += 1,
    }
}

/// Counts a forwarded frame of `bytes` for its service and backend.
#[inline(always)]
pub fn count_traffic(service_id: u32, backend_id: u32, to_client: bool, bytes: u64) {
    add_traffic(XLB_SERVICE_STATS.get_ptr_mut(service_id), to_client, bytes);
    add_traffic(XLB_BACKEND_STATS.get_ptr_mut(backend_id), to_client, bytes);
}

#[inline(always)]
fn add_traffic(counters: Option<*mut Traffic>, to_client: bool, bytes: u64) {
    let Some(counters) = counters else {
        return;
    };
    // SAFETY: per-CPU slot, no other writer on this CPU while we run.
    let counters = unsafe { &mut *counters };
    if to_client {
        counters.to_client_packets += 1;
        counters.to_client_bytes += bytes;
    } else {
        counters.to_backend_packets += 1;
        counters.to_backend_bytes += bytes;
    }
}

/// Counts one packet under `reason`.
#[inline(always)]
pub fn count(reason: lb_common::Reason) {
    if let Some(counter) = XLB_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
}

/// Socket-level balancing's reverse translation (see `sock.rs`).
#[map]
pub static XLB_SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNat> =
    LruHashMap::with_max_entries(decl::SOCK_REVNAT.max_entries, decl::SOCK_REVNAT.flags);
