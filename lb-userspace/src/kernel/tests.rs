//! Map I/O against the real datapath object. These load BPF, so they need
//! root; elsewhere they return early with a note.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use lb_common::service::{BACKEND_F_ACTIVE, CONFIG_F_READY, SERVICE_F_MASQUERADE};

use super::*;
use crate::reconcile::{self, Applied, Desired, MapOp, NodeFacts};
use crate::source::yaml::{self, Overrides};

fn load() -> Option<Loaded> {
    if !is_root() {
        eprintln!("skipped: loading BPF needs root");
        return None;
    }
    match Datapath::load(TEST_SIZES) {
        Ok(loaded) => Some(loaded),
        Err(error) => panic!("{}", error_chain(&error)),
    }
}

fn desired(text: &str) -> Desired {
    let config = match yaml::parse("test.yaml", text, &Overrides::default()) {
        Ok(config) => config,
        Err(error) => panic!("{error}"),
    };
    let facts = NodeFacts {
        local_addresses: BTreeSet::new(),
        interface_addresses: [(1, Ipv4Addr::new(198, 18, 0, 1))].into_iter().collect(),
    };
    Desired::new(&config.state, &facts)
}

const CONFIG: &str = "
node:
  interfaces: [lo]
  addresses: [198.18.0.1]
conntrack:
  udpTimeoutSeconds: 33
services:
  - name: web
    nodePort: 30080
    targetPort: 8080
    backends:
      - address: 198.18.1.2
        weight: 3
      - address: 198.18.1.3
  - name: dns
    protocol: UDP
    nodePort: 30053
    targetPort: 53
    backends:
      - address: 198.18.1.2
";

fn reconcile(maps: &mut KernelMaps, applied: &mut Applied, desired: &Desired) -> Vec<MapOp> {
    let ops = match reconcile::diff(applied, desired, &maps.capacity()) {
        Ok(ops) => ops,
        Err(error) => panic!("{error}"),
    };
    if let Err(error) = reconcile::apply(maps, applied, &ops) {
        panic!("{}", error_chain(&error));
    }
    ops
}

/// Everything the reconciler wrote reads back from the kernel as the
/// datapath will read it.
#[test]
fn maps_read_back_as_written() {
    let Some(mut loaded) = load() else { return };
    let maps = &mut loaded.maps;
    let capacity = maps.capacity();
    assert_eq!(capacity.backends, TEST_SIZES.backends);
    assert_eq!(capacity.select_slots, TEST_SIZES.select_slots);
    let snapshot = maps.snapshot().map_err(|e| error_chain(&e));
    assert_eq!(
        snapshot,
        Ok(Default::default()),
        "fresh maps are empty and not ready"
    );

    let mut applied = Applied::default();
    reconcile(maps, &mut applied, &desired(CONFIG));
    let Ok(snapshot) = maps.snapshot() else {
        panic!("snapshot")
    };

    let config = snapshot
        .config
        .unwrap_or_else(|| panic!("config not written"));
    assert_eq!(config.flags & CONFIG_F_READY, CONFIG_F_READY);
    assert_eq!(config.udp_timeout_s, 33);
    assert_eq!(
        snapshot.node_addresses.into_iter().collect::<Vec<_>>(),
        [Ipv4Addr::new(198, 18, 0, 1)]
    );
    assert_eq!(
        snapshot.interface_addresses.into_iter().collect::<Vec<_>>(),
        [(1, Ipv4Addr::new(198, 18, 0, 1))]
    );

    // Backends: wire byte order, active, ids as in the mirror.
    assert_eq!(snapshot.backends.len(), 3);
    for (id, backend) in &applied.backends {
        let written = snapshot.backends[id];
        assert_eq!(written.addr_be.to_ne_bytes(), backend.address.octets());
        assert_eq!(u16::from_be(written.port_be), backend.port);
        assert_eq!(written.flags, BACKEND_F_ACTIVE);
    }

    // Services: keyed by (proto, port), pointing at fully written tables.
    let web = snapshot.services[&(6, 30080)];
    let dns = snapshot.services[&(17, 30053)];
    assert_eq!(web.flags & SERVICE_F_MASQUERADE, SERVICE_F_MASQUERADE);
    assert_ne!(web.id, dns.id);
    let slots = maps
        .select_slots(web.table_offset, web.table_size)
        .unwrap_or_default();
    assert_eq!(slots.len(), 1021);
    assert_eq!(Some(&slots), applied.tables.get(&web.table_offset));
    let heavy = slots.iter().filter(|&&id| id == slots[0]).count();
    assert!(heavy == 766 || heavy == 255, "3:1 weights: {heavy}");

    // A change flips to a new region and clears the dropped backend.
    let ops = reconcile(
        maps,
        &mut applied,
        &desired(&CONFIG.replace("      - address: 198.18.1.3\n", "")),
    );
    assert!(
        ops.iter()
            .any(|op| matches!(op, MapOp::ClearBackend { .. }))
    );
    let Ok(after) = maps.snapshot() else {
        panic!("snapshot")
    };
    assert_eq!(after.backends.len(), 2);
    let web_after = after.services[&(6, 30080)];
    assert_eq!(web_after.id, web.id);
    assert_ne!(web_after.table_offset, web.table_offset);
    let slots = maps
        .select_slots(web_after.table_offset, web_after.table_size)
        .unwrap_or_default();
    assert!(slots.iter().all(|id| after.backends.contains_key(id)));

    // Removing everything empties the maps again (config stays ready).
    reconcile(
        maps,
        &mut applied,
        &desired("node:\n  interfaces: [lo]\n  addresses: [198.18.0.2]\n"),
    );
    let Ok(empty) = maps.snapshot() else {
        panic!("snapshot")
    };
    assert!(empty.services.is_empty() && empty.backends.is_empty());
    assert_eq!(
        empty.node_addresses.into_iter().collect::<Vec<_>>(),
        [Ipv4Addr::new(198, 18, 0, 2)]
    );
}

#[test]
fn deleting_what_is_already_gone_is_fine() {
    let Some(mut loaded) = load() else { return };
    let maps = &mut loaded.maps;
    let frontend = reconcile::Frontend {
        protocol: crate::model::Protocol::Tcp,
        node_port: 1,
    };
    for op in [
        MapOp::RemoveService { frontend },
        MapOp::RemoveNodeAddress(Ipv4Addr::new(198, 18, 0, 1)),
        MapOp::RemoveInterfaceAddress { ifindex: 77 },
        MapOp::ClearBackend { id: 5 },
    ] {
        let result = reconcile::MapWriter::apply(maps, &op).map_err(|e| error_chain(&e));
        assert_eq!(result, Ok(()), "{op}");
    }
    // Out of range is an error, not a silent success.
    let op = MapOp::WriteBackend {
        id: TEST_SIZES.backends,
        backend: reconcile::BackendAddr {
            address: Ipv4Addr::new(198, 18, 1, 1),
            port: 1,
        },
    };
    assert!(reconcile::MapWriter::apply(maps, &op).is_err());
}

#[test]
fn stats_start_at_zero() {
    let Some(loaded) = load() else { return };
    let counts = loaded.stats.read().map_err(|e| error_chain(&e));
    assert_eq!(counts, Ok(Vec::new()));
}
