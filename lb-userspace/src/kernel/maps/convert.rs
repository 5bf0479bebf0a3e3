//! The model -> lb-common conversions (byte order lives here), per-CPU
//! sums, and the exit log's counter lines.

use std::borrow::Borrow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::Pod;
use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{MapData, MapError, PerCpuArray};
use lb_common::service::{ADDR_ANY_NODE, BACKEND_F_ACTIVE, BACKEND_F_TERMINATING, CONFIG_F_READY};
use lb_common::{
    BackendOf, Family, GlobalConfig, IPPROTO_TCP, IPPROTO_UDP, Paths, Reason, Service,
    ServiceKeyOf, SourceRangeOf, V4, V6,
};

use crate::model::{BackendAddr, IpFamily, Protocol};
use crate::reconcile::{ActiveBackend, Frontend, ServiceEntry, Settings, SourceRangeKey};

/// An address as the datapath stores it: the wire's bytes in a u32.
pub fn addr_be(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

/// A family's addresses as its maps hold them.
pub trait MapFamily: Family
where
    Self::Addr: Pod,
{
    const FAMILY: IpFamily;
    /// `address` as the maps hold it; `None` if it is of the other family.
    fn to_map(address: IpAddr) -> Option<Self::Addr>;
    fn from_map(address: &Self::Addr) -> IpAddr;
}

impl MapFamily for V4 {
    const FAMILY: IpFamily = IpFamily::V4;
    fn to_map(address: IpAddr) -> Option<u32> {
        match address {
            IpAddr::V4(address) => Some(addr_be(address)),
            IpAddr::V6(_) => None,
        }
    }
    fn from_map(address: &u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(address.to_ne_bytes()))
    }
}

impl MapFamily for V6 {
    const FAMILY: IpFamily = IpFamily::V6;
    fn to_map(address: IpAddr) -> Option<lb_common::Addr6> {
        match address {
            IpAddr::V6(address) => Some(lb_common::family::addr6(address.octets())),
            IpAddr::V4(_) => None,
        }
    }
    fn from_map(address: &lb_common::Addr6) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(lb_common::family::octets6(*address)))
    }
}

// A NodePort's key holds the zero address in both families.
const _: () = assert!(ADDR_ANY_NODE == 0);

/// `frontend`'s key in its family's services map; `None` if `frontend`
/// is of the other family.
pub fn service_key<F: MapFamily>(frontend: &Frontend) -> Option<ServiceKeyOf<F>>
where
    F::Addr: Pod,
{
    if frontend.family != F::FAMILY {
        return None;
    }
    let addr_be = match frontend.address {
        None => F::Addr::default(),
        Some(address) => F::to_map(address)?,
    };
    Some(ServiceKeyOf {
        addr_be,
        port_be: frontend.port.to_be(),
        proto: frontend.protocol.number(),
        _pad: 0,
    })
}

/// The frontend of a services map key, if its protocol is one xlb
/// balances.
pub fn frontend_of<F: MapFamily>(key: &ServiceKeyOf<F>) -> Option<Frontend>
where
    F::Addr: Pod,
{
    let protocol = match key.proto {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    let port = u16::from_be(key.port_be);
    Some(if key.addr_be == F::Addr::default() {
        Frontend::node_port_in(F::FAMILY, protocol, port)
    } else {
        Frontend::exact(protocol, F::from_map(&key.addr_be), port)
    })
}

pub fn service_value(entry: &ServiceEntry) -> Service {
    Service {
        id: entry.id,
        table_id: entry.table_id,
        table_size: entry.table_size,
        flags: entry.flags,
        affinity_timeout_s: entry.affinity_timeout_s,
        ..Service::default()
    }
}

/// `backend`'s entry in its family's backends array; `None` if it is of
/// the other family.
pub fn backend_value<F: MapFamily>(backend: &ActiveBackend) -> Option<BackendOf<F>>
where
    F::Addr: Pod,
{
    let terminating = if backend.terminating {
        BACKEND_F_TERMINATING
    } else {
        0
    };
    Some(BackendOf {
        addr_be: F::to_map(backend.address.address)?,
        port_be: backend.address.port.to_be(),
        _pad: 0,
        flags: BACKEND_F_ACTIVE | terminating,
    })
}

/// The active backend a backends array entry holds, if it is active.
pub fn active_backend<F: MapFamily>(backend: &BackendOf<F>) -> Option<ActiveBackend>
where
    F::Addr: Pod,
{
    (backend.flags & BACKEND_F_ACTIVE != 0).then(|| ActiveBackend {
        address: BackendAddr {
            address: F::from_map(&backend.addr_be),
            port: u16::from_be(backend.port_be),
        },
        terminating: backend.flags & BACKEND_F_TERMINATING != 0,
    })
}

/// A source ranges trie key: LPM prefix length 32 (the service id, in
/// full) plus the source prefix; `None` if the range is of the other
/// family.
pub fn source_range_key<F: MapFamily>(range: &SourceRangeKey) -> Option<LpmKey<SourceRangeOf<F>>>
where
    F::Addr: Pod,
{
    Some(LpmKey::new(
        32 + u32::from(range.prefix_len),
        SourceRangeOf {
            service_id: range.service_id,
            addr_be: F::to_map(range.network)?,
        },
    ))
}

pub(super) fn source_range_of<F: MapFamily>(key: &LpmKey<SourceRangeOf<F>>) -> SourceRangeKey
where
    F::Addr: Pod,
{
    let data = key.data();
    SourceRangeKey {
        service_id: data.service_id,
        network: F::from_map(&data.addr_be),
        prefix_len: u8::try_from(key.prefix_len().saturating_sub(32))
            .unwrap_or(F::FAMILY.bits())
            .min(F::FAMILY.bits()),
    }
}

/// The settings a ready `XLB_CONFIG[0]` holds.
pub fn settings_of(config: &GlobalConfig) -> Settings {
    Settings {
        masquerade_port_min: config.snat_port_min,
        masquerade_port_max: config.snat_port_max,
        hash_seed: u64::from(config.hash_seed_hi) << 32 | u64::from(config.hash_seed),
        tcp_syn_timeout_s: config.tcp_syn_timeout_s,
        tcp_timeout_s: config.tcp_established_timeout_s,
        tcp_closing_timeout_s: config.tcp_closing_timeout_s,
        udp_timeout_s: config.udp_timeout_s,
        udp_unassured_timeout_s: config.udp_unassured_timeout_s,
    }
}

pub fn global_config(settings: &Settings) -> GlobalConfig {
    GlobalConfig {
        snat_port_min: settings.masquerade_port_min,
        snat_port_max: settings.masquerade_port_max,
        hash_seed: settings.hash_seed as u32,
        hash_seed_hi: (settings.hash_seed >> 32) as u32,
        tcp_syn_timeout_s: settings.tcp_syn_timeout_s,
        tcp_established_timeout_s: settings.tcp_timeout_s,
        tcp_closing_timeout_s: settings.tcp_closing_timeout_s,
        udp_timeout_s: settings.udp_timeout_s,
        udp_unassured_timeout_s: settings.udp_unassured_timeout_s,
        flags: CONFIG_F_READY,
    }
}

/// Entry `index` of a per-CPU counter array, summed over CPUs with `add`:
/// the one place per-CPU counters are summed (`observe::datapath`'s reader
/// and explain's simulation use it). Zero past the array's end.
pub fn per_cpu_sum<M: Borrow<MapData>, T: Pod + Default>(
    map: &PerCpuArray<M, T>,
    index: u32,
    add: impl Fn(&mut T, &T),
) -> Result<T, MapError> {
    let mut total = T::default();
    if index >= map.len() {
        return Ok(total);
    }
    for value in map.get(&index, 0)?.iter() {
        add(&mut total, value);
    }
    Ok(total)
}

/// `per_cpu_sum`'s `add` for plain counters (`XLB_STATS`).
pub fn add_count(total: &mut u64, count: &u64) {
    *total = total.wrapping_add(*count);
}

/// One backend's paths for the exit log (`cargo xtask demo` reads it):
/// `to-backend xdp=N tc=N peer=N to-client xdp=N tc=N`.
pub fn format_paths(paths: &Paths) -> String {
    format!(
        "to-backend xdp={} tc={} peer={} to-client xdp={} tc={}",
        paths.to_backend_xdp,
        paths.to_backend_tc,
        paths.to_backend_peer,
        paths.to_client_xdp,
        paths.to_client_tc
    )
}

/// `name=count name=count ...`, or `none` when nothing was counted.
pub fn format_stats(counts: &[(Reason, u64)]) -> String {
    if counts.is_empty() {
        return String::from("none");
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(reason, count)| format!("{}={count}", reason.name()))
        .collect();
    parts.join(" ")
}
