//! The model -> lb-common conversions (byte order lives here), per-CPU
//! sums, and the exit log's counter lines.

use std::borrow::Borrow;
use std::net::Ipv4Addr;

use aya::Pod;
use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{MapData, MapError, PerCpuArray};
use lb_common::service::{ADDR_ANY_NODE, BACKEND_F_ACTIVE, BACKEND_F_TERMINATING, CONFIG_F_READY};
use lb_common::{
    Backend, GlobalConfig, IPPROTO_TCP, IPPROTO_UDP, Paths, Reason, Service, ServiceKey,
    SourceRange,
};

use crate::model::Protocol;
use crate::reconcile::{ActiveBackend, Frontend, ServiceEntry, Settings, SourceRangeKey};

/// An address as the datapath stores it: the wire's bytes in a u32.
pub fn addr_be(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

pub fn service_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey {
        addr_be: frontend.address.map_or(ADDR_ANY_NODE, addr_be),
        port_be: frontend.port.to_be(),
        proto: frontend.protocol.number(),
        _pad: 0,
    }
}

/// The frontend of an `XLB_SERVICES` key, if its protocol is one xlb
/// balances.
pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    let protocol = match key.proto {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    let port = u16::from_be(key.port_be);
    Some(if key.addr_be == ADDR_ANY_NODE {
        Frontend::node_port(protocol, port)
    } else {
        Frontend::exact(protocol, Ipv4Addr::from(key.addr_be.to_ne_bytes()), port)
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

pub fn backend_value(backend: &ActiveBackend) -> Backend {
    let terminating = if backend.terminating {
        BACKEND_F_TERMINATING
    } else {
        0
    };
    Backend {
        addr_be: addr_be(backend.address.address),
        port_be: backend.address.port.to_be(),
        flags: BACKEND_F_ACTIVE | terminating,
        ..Backend::default()
    }
}

/// An `XLB_SOURCE_RANGES` key: LPM prefix length 32 (the service id, in
/// full) plus the source prefix.
pub fn source_range_key(range: &SourceRangeKey) -> LpmKey<SourceRange> {
    LpmKey::new(
        32 + u32::from(range.prefix_len),
        SourceRange {
            service_id: range.service_id,
            addr_be: addr_be(range.network),
        },
    )
}

pub(super) fn source_range_of(key: &LpmKey<SourceRange>) -> SourceRangeKey {
    let data = key.data();
    SourceRangeKey {
        service_id: data.service_id,
        network: Ipv4Addr::from(data.addr_be.to_ne_bytes()),
        prefix_len: u8::try_from(key.prefix_len().saturating_sub(32)).unwrap_or(32),
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
