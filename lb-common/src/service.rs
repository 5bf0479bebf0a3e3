//! Frontend, backend and global-settings map types (written by the agent's
//! reconciler only, read by the datapath per packet).

use crate::{
    assert_size,
    family::{Family, V4, V6},
};

/// `ServiceKey::addr_be` for a NodePort: it answers on every node address
/// (`XLB_NODE_ADDRS`) rather than on one address.
pub const ADDR_ANY_NODE: u32 = 0;

/// A frontend: (address, port, protocol). A NodePort's address is all
/// zeros in either family (`ADDR_ANY_NODE` for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKeyOf<F: Family> {
    pub addr_be: F::Addr,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
/// `XLB_SERVICES`' key.
pub type ServiceKey = ServiceKeyOf<V4>;
/// `XLB_SERVICES6`' key.
pub type ServiceKey6 = ServiceKeyOf<V6>;
assert_size!(ServiceKey, 8);
assert_size!(ServiceKey6, 20);

/// New flows go through masquerade (externalTrafficPolicy=Cluster).
pub const SERVICE_F_MASQUERADE: u32 = 1 << 0;
/// sessionAffinity=ClientIP: a client's new flows go to the backend its last
/// flow went to, within `Service::affinity_timeout_s`.
pub const SERVICE_F_AFFINITY: u32 = 1 << 1;
/// With no backend, drop silently (externalTrafficPolicy=Local on a node
/// with no local endpoint, as kube-proxy) instead of rejecting.
pub const SERVICE_F_DROP_IF_EMPTY: u32 = 1 << 2;
/// Only sources in `XLB_SOURCE_RANGES` for this service may open flows
/// (loadBalancerSourceRanges).
pub const SERVICE_F_SOURCE_RANGES: u32 = 1 << 3;

/// A service as the datapath sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Agent-assigned id, stable while the service exists.
    pub id: u32,
    /// Index of this service's table in `XLB_SELECT`.
    pub table_id: u32,
    /// Slots in the table; 0 means "no backends".
    pub table_size: u32,
    /// `SERVICE_F_*`.
    pub flags: u32,
    /// sessionAffinity timeout, seconds (with `SERVICE_F_AFFINITY`).
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}
assert_size!(Service, 24);

/// The backend slot is in use (set last when written, cleared first when
/// removed). Flows to an inactive backend are re-balanced.
pub const BACKEND_F_ACTIVE: u32 = 1 << 0;
/// The endpoint is terminating: it keeps its flows but session affinity no
/// longer sends new flows to it.
pub const BACKEND_F_TERMINATING: u32 = 1 << 1;

/// A backend (pod IP and target port), indexed by id in `XLB_BACKENDS`
/// (`XLB_BACKENDS6` for an IPv6 service's: one id space, so a selection
/// table and the per-backend counters serve both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendOf<F: Family> {
    pub addr_be: F::Addr,
    pub port_be: u16,
    pub _pad: u16,
    /// `BACKEND_F_*`.
    pub flags: u32,
}
pub type Backend = BackendOf<V4>;
pub type Backend6 = BackendOf<V6>;
assert_size!(Backend, 12);
assert_size!(Backend6, 24);

/// `XLB_BACKEND_HOPS[backend id]`: the datapath's own cache of how a backend
/// is reached, so new flows to a warm backend skip the FIB lookup. Valid
/// while `addr_be` matches the backend and for about a second after
/// `checked_ns`; the agent never writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendHopOf<F: Family> {
    pub addr_be: F::Addr,
    /// 0: nothing cached.
    pub ifindex: u32,
    /// The egress interface's address (`XLB_IFACE_ADDRS`), 0 if it has none.
    pub masquerade_addr_be: F::Addr,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// `bpf_ktime_get_coarse_ns()` of the FIB lookup.
    pub checked_ns: u64,
}
pub type BackendHop = BackendHopOf<V4>;
pub type BackendHop6 = BackendHopOf<V6>;
assert_size!(BackendHop, 32);
assert_size!(BackendHop6, 56);

/// `XLB_AFFINITY` (`XLB_AFFINITY6`) key: one client of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKeyOf<F: Family> {
    pub service_id: u32,
    pub client_addr_be: F::Addr,
}
pub type AffinityKey = AffinityKeyOf<V4>;
pub type AffinityKey6 = AffinityKeyOf<V6>;
assert_size!(AffinityKey, 8);
assert_size!(AffinityKey6, 20);

/// `XLB_AFFINITY` (`XLB_AFFINITY6`) value: where the client's last new
/// flow went. The backend's address and port are kept too: a record is
/// followed only while `XLB_BACKENDS[backend_id]` is still that endpoint,
/// never a pod that got the id later.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityOf<F: Family> {
    pub backend_id: u32,
    pub backend_addr_be: F::Addr,
    /// Nothing for IPv4 (its layout is the one the pinned map always had).
    pub _pad_addr: F::Pad8,
    /// `bpf_ktime_get_coarse_ns()` of the client's last new flow.
    pub last_seen_ns: u64,
    pub backend_port_be: u16,
    pub _pad: [u8; 6],
}
pub type Affinity = AffinityOf<V4>;
pub type Affinity6 = AffinityOf<V6>;
assert_size!(Affinity, 24);
assert_size!(Affinity6, 40);

/// `XLB_SOURCE_RANGES` key data (after the LPM prefix length): the service
/// id, matched in full, then the source address prefix. An LPM prefix length
/// of `32 + n` means "this service, sources in addr/n".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeOf<F: Family> {
    pub service_id: u32,
    pub addr_be: F::Addr,
}
pub type SourceRange = SourceRangeOf<V4>;
/// `XLB_SOURCE_RANGES6`: an LPM prefix length of `32 + n` means "this
/// service, sources in addr/n" as for IPv4.
pub type SourceRange6 = SourceRangeOf<V6>;
assert_size!(SourceRange, 8);
assert_size!(SourceRange6, 20);

/// Value of `XLB_NODE_ADDRS` (reserved for per-address flags).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeAddr {
    pub flags: u32,
}
assert_size!(NodeAddr, 4);

/// Settings that apply to every packet. `XLB_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Masquerade source ports are taken from `snat_port_min..=snat_port_max`
    /// (host order). Keep this range out of `net.ipv4.ip_local_port_range`.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Low half of the flow hash's 64-bit secret (backend choice and
    /// masquerade port); the high half is `hash_seed_hi`.
    pub hash_seed: u32,
    /// Idle timeouts, seconds.
    pub tcp_syn_timeout_s: u32,
    pub tcp_established_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub udp_timeout_s: u32,
    /// `CONFIG_F_*`.
    pub flags: u32,
    /// High half of the flow hash's secret.
    pub hash_seed_hi: u32,
    /// Idle timeout of a UDP flow whose client has sent one datagram so far
    /// (`FLOW_S_ASSURED`), seconds; at most `udp_timeout_s`.
    pub udp_unassured_timeout_s: u32,
}
assert_size!(GlobalConfig, 36);

/// Set by the agent once the whole config is written; until then the
/// datapath passes everything.
pub const CONFIG_F_READY: u32 = 1 << 0;

impl GlobalConfig {
    pub const DEFAULT: Self = Self {
        snat_port_min: 1_024,
        snat_port_max: 29_999,
        hash_seed: 0x5eed_0001,
        tcp_syn_timeout_s: 60,
        tcp_established_timeout_s: 86_400,
        tcp_closing_timeout_s: 10,
        udp_timeout_s: 60,
        flags: 0,
        hash_seed_hi: 0,
        udp_unassured_timeout_s: 10,
    };
}

impl GlobalConfig {
    /// The flow hash's secret.
    #[inline(always)]
    pub const fn hash_key(&self) -> crate::hash::HashKey {
        crate::hash::HashKey::new(self.hash_seed, self.hash_seed_hi)
    }
}

impl Default for GlobalConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these are #[repr(C)], Copy, made only of integers, and have no
    // implicit padding (sizes asserted above), so every bit pattern is valid.
    unsafe impl<F: crate::Family> aya::Pod for super::ServiceKeyOf<F> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Service {}
    // SAFETY: as above, for both families (sizes asserted for each).
    unsafe impl<F: crate::Family> aya::Pod for super::BackendOf<F> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeAddr {}
    // SAFETY: as above.
    unsafe impl<F: crate::Family> aya::Pod for super::BackendHopOf<F> {}
    // SAFETY: as above.
    unsafe impl<F: crate::Family> aya::Pod for super::AffinityKeyOf<F> {}
    // SAFETY: as above, for both families (sizes asserted for each).
    unsafe impl<F: crate::Family> aya::Pod for super::AffinityOf<F> {}
    // SAFETY: as above.
    unsafe impl<F: crate::Family> aya::Pod for super::SourceRangeOf<F> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GlobalConfig {}
}
