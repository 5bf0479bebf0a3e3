use std::net::Ipv4Addr;

use lb_common::Reason;
use lb_common::service::{ADDR_ANY_NODE, BACKEND_F_ACTIVE, BACKEND_F_TERMINATING, CONFIG_F_READY};

use super::convert::source_range_of;
use super::*;
use lb_common::{V4, V6};

use crate::model::{BackendAddr, IpFamily, Protocol};
use crate::reconcile::{ActiveBackend, Frontend, ServiceEntry, Settings, SourceRangeKey};

fn ip(text: &str) -> std::net::IpAddr {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn addresses_and_ports_keep_wire_byte_order() {
    let node_port = Frontend::node_port(Protocol::Udp, 30998);
    let key = service_key::<V4>(&node_port).unwrap_or_else(|| panic!("an IPv4 key"));
    assert_eq!(key.port_be.to_ne_bytes(), 30998u16.to_be_bytes());
    assert_eq!(key.proto, 17);
    assert_eq!(key.addr_be, ADDR_ANY_NODE);
    assert_eq!(frontend_of(&key), Some(node_port));
    assert_eq!(service_key::<V6>(&node_port), None, "not an IPv6 key");
    let exact = Frontend::exact(Protocol::Tcp, Ipv4Addr::new(198, 18, 200, 10), 80);
    let key = service_key::<V4>(&exact).unwrap_or_else(|| panic!("an IPv4 key"));
    assert_eq!(key.addr_be.to_ne_bytes(), [198, 18, 200, 10]);
    assert_eq!(frontend_of(&key), Some(exact));
    let mut backend = ActiveBackend {
        address: BackendAddr {
            address: ip("198.18.1.2"),
            port: 3333,
        },
        terminating: false,
    };
    let value = backend_value::<V4>(&backend).unwrap_or_else(|| panic!("an IPv4 backend"));
    assert_eq!(value.addr_be.to_ne_bytes(), [198, 18, 1, 2]);
    assert_eq!(value.port_be.to_ne_bytes(), 3333u16.to_be_bytes());
    assert_eq!(value.flags, BACKEND_F_ACTIVE);
    assert_eq!(active_backend(&value), Some(backend));
    backend.terminating = true;
    let value = backend_value::<V4>(&backend).map(|value| value.flags);
    assert_eq!(value, Some(BACKEND_F_ACTIVE | BACKEND_F_TERMINATING));
    assert_eq!(backend_value::<V6>(&backend), None);
}

#[test]
fn ipv6_keys_hold_the_address_in_wire_order() {
    let node_port = Frontend::node_port_in(IpFamily::V6, Protocol::Tcp, 30999);
    let key = service_key::<V6>(&node_port).unwrap_or_else(|| panic!("an IPv6 key"));
    assert_eq!(key.addr_be, [0; 4], "NodePorts are keyed by ::");
    assert_eq!(key.port_be.to_ne_bytes(), 30999u16.to_be_bytes());
    assert_eq!(frontend_of(&key), Some(node_port));
    assert_eq!(service_key::<V4>(&node_port), None);
    let exact = Frontend::exact(Protocol::Udp, ip("2001:db8::a"), 53);
    let key = service_key::<V6>(&exact).unwrap_or_else(|| panic!("an IPv6 key"));
    let octets = lb_common::family::octets6(key.addr_be);
    assert_eq!(octets, ip_octets("2001:db8::a"));
    assert_eq!(frontend_of(&key), Some(exact));
    let backend = ActiveBackend {
        address: BackendAddr {
            address: ip("2001:db8:1::2"),
            port: 3333,
        },
        terminating: false,
    };
    let value = backend_value::<V6>(&backend).unwrap_or_else(|| panic!("an IPv6 backend"));
    assert_eq!(
        lb_common::family::octets6(value.addr_be),
        ip_octets("2001:db8:1::2")
    );
    assert_eq!(active_backend(&value), Some(backend));
    let range = SourceRangeKey {
        service_id: 9,
        network: ip("2001:db8:77::"),
        prefix_len: 48,
    };
    let key = source_range_key::<V6>(&range).unwrap_or_else(|| panic!("an IPv6 range"));
    assert_eq!(key.prefix_len(), 32 + 48);
    assert_eq!(source_range_of(&key), range);
    assert!(source_range_key::<V4>(&range).is_none());
}

fn ip_octets(text: &str) -> [u8; 16] {
    match ip(text) {
        std::net::IpAddr::V6(address) => address.octets(),
        std::net::IpAddr::V4(_) => panic!("{text} is not IPv6"),
    }
}

#[test]
fn source_range_keys_match_the_datapath_lookup() {
    let range = SourceRangeKey {
        service_id: 7,
        network: ip("198.18.0.0"),
        prefix_len: 24,
    };
    let key = source_range_key::<V4>(&range).unwrap_or_else(|| panic!("an IPv4 range"));
    // The datapath looks up (64, {id, source}): 32 bits of id + 24 of prefix.
    assert_eq!(key.prefix_len(), 56);
    assert_eq!(key.data().service_id, 7);
    assert_eq!(key.data().addr_be.to_ne_bytes(), [198, 18, 0, 0]);
    assert_eq!(source_range_of(&key), range);
}

#[test]
fn settings_become_a_ready_global_config_and_back() {
    let settings = Settings {
        masquerade_port_min: 61000,
        masquerade_port_max: 65535,
        hash_seed: 0x0123_4567_89ab_cdef,
        tcp_syn_timeout_s: 1,
        tcp_timeout_s: 2,
        tcp_closing_timeout_s: 3,
        udp_timeout_s: 4,
        udp_unassured_timeout_s: 5,
    };
    let config = global_config(&settings);
    assert_eq!(config.flags & CONFIG_F_READY, CONFIG_F_READY);
    assert_eq!(
        (
            config.tcp_syn_timeout_s,
            config.tcp_established_timeout_s,
            config.tcp_closing_timeout_s,
            config.udp_timeout_s,
            config.udp_unassured_timeout_s
        ),
        (1, 2, 3, 4, 5)
    );
    assert_eq!((config.snat_port_min, config.snat_port_max), (61000, 65535));
    assert_eq!(settings_of(&config), settings);
}

#[test]
fn service_entries_carry_flags_and_affinity() {
    use lb_common::service::{SERVICE_F_AFFINITY, SERVICE_F_MASQUERADE};
    let value = service_value(&ServiceEntry {
        id: 3,
        table_id: 1021,
        table_size: 1021,
        flags: SERVICE_F_MASQUERADE | SERVICE_F_AFFINITY,
        affinity_timeout_s: 600,
    });
    assert_eq!(value.flags, SERVICE_F_MASQUERADE | SERVICE_F_AFFINITY);
    assert_eq!(
        (
            value.id,
            value.table_id,
            value.table_size,
            value.affinity_timeout_s
        ),
        (3, 1021, 1021, 600)
    );
}

/// The real object's maps, or `None` (with a note) without root.
fn load() -> Option<KernelMaps> {
    use crate::kernel::{Datapath, TEST_SIZES, is_root};
    if !is_root() {
        eprintln!("skipped: loading BPF needs root");
        return None;
    }
    match Datapath::load(TEST_SIZES) {
        Ok(loaded) => Some(loaded.maps),
        Err(error) => panic!("{}", crate::error_chain(&error)),
    }
}

/// A freed backend id starts from zero counters, so the next backend
/// given that id does not report its predecessor's traffic.
#[test]
fn clearing_a_backend_zeroes_its_counters() {
    use crate::reconcile::{MapOp, MapWriter as _};
    let Some(mut maps) = load() else { return };
    let cpus = aya::util::nr_cpus().map_or(1, |cpus| cpus);
    let mut counted = vec![Traffic::default(); cpus];
    counted[0].to_backend_packets = 7;
    counted[cpus - 1].to_client_bytes = 900;
    let Ok(values) = aya::maps::PerCpuValues::try_from(counted) else {
        panic!("per-CPU values")
    };
    assert!(maps.backend_stats.set(5, values, 0).is_ok());
    assert!(
        maps.apply(&MapOp::ClearBackend {
            id: 5,
            family: IpFamily::V4,
        })
        .is_ok()
    );
    let Ok(after) = maps.backend_stats.get(&5, 0) else {
        panic!("read counters")
    };
    assert!(after.iter().all(|traffic| *traffic == Traffic::default()));
}

/// After a restart, new services get ids above those the datapath
/// still remembers in affinity records and counters.
#[test]
fn adopted_ids_stay_above_remembered_ones() {
    let Some(mut maps) = load() else { return };
    assert_eq!(maps.first_unused_service_id().ok(), Some(0));
    let key = AffinityKey {
        service_id: 40,
        client_addr_be: 1,
    };
    assert!(maps.affinity.insert(key, Affinity::default(), 0).is_ok());
    assert_eq!(maps.first_unused_service_id().ok(), Some(41));
    let key6 = lb_common::AffinityKey6 {
        service_id: 45,
        client_addr_be: [1, 0, 0, 1],
    };
    let record6 = lb_common::Affinity6::default();
    assert!(maps.affinity6.insert(key6, record6, 0).is_ok());
    assert_eq!(maps.first_unused_service_id().ok(), Some(46));
    // A socket-level client's record of service 47, of either family.
    let socket_client = lb_common::sock::AFFINITY_SOCKET_CLIENT | 47;
    let socket6 = lb_common::AffinityKey6 {
        service_id: socket_client,
        ..key6
    };
    assert!(maps.affinity6.insert(socket6, record6, 0).is_ok());
    assert_eq!(maps.first_unused_service_id().ok(), Some(48));
    let socket4 = AffinityKey {
        service_id: socket_client + 1,
        ..key
    };
    assert!(
        maps.affinity
            .insert(socket4, Affinity::default(), 0)
            .is_ok()
    );
    assert_eq!(maps.first_unused_service_id().ok(), Some(49));
    let cpus = aya::util::nr_cpus().map_or(1, |cpus| cpus);
    let mut counted = vec![Traffic::default(); cpus];
    counted[0].to_backend_packets = 1;
    let values = aya::maps::PerCpuValues::try_from(counted);
    let Ok(values) = values else {
        panic!("per-CPU values")
    };
    assert!(maps.service_stats.set(50, values, 0).is_ok());
    assert_eq!(maps.first_unused_service_id().ok(), Some(51));
    assert_eq!(
        maps.read_applied().map(|a| a.next_service_id).ok(),
        Some(51)
    );
}

#[test]
fn stats_line() {
    assert_eq!(format_stats(&[]), "none");
    assert_eq!(
        format_stats(&[(Reason::FwdNewFlow, 3), (Reason::DropNoNeighbour, 1)]),
        "fwd_new_flow=3 drop_no_neighbour=1"
    );
}
