//! Map I/O against the real datapath object. These load BPF, so they need
//! root; elsewhere they return early with a note.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use lb_common::Reason;
use lb_common::service::{BACKEND_F_ACTIVE, CONFIG_F_READY, SERVICE_F_MASQUERADE};

use aya::EbpfLoader;

use super::load::map_data;
use super::*;
use crate::error_chain;
use crate::model::{IpFamily, Protocol};
use crate::reconcile::maglev::{MaglevBackend, TableRecipe};
use crate::reconcile::{self, Applied, Desired, Frontend, MapOp, NodeFacts};
use crate::source::yaml::{self, Overrides};

fn load() -> Option<Loaded> {
    if !is_root() {
        eprintln!("skipped: loading BPF needs root");
        return None;
    }
    // With the reader's second descriptors, as the agent loads it.
    let observed = &crate::observe::datapath::OBSERVED;
    match Datapath::load_with(TEST_SIZES, None, false, observed) {
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
        interface_addresses: [((1, IpFamily::V4), IpAddr::from([198, 18, 0, 1]))]
            .into_iter()
            .collect(),
    };
    Desired::new(&config.state, &facts)
}

const CONFIG: &str = "
node:
  interfaces: [lo]
  addresses: [198.18.0.1]
conntrack:
  udpTimeoutSeconds: 33
selection:
  tableSize: 1021
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

/// The recipes of the tables `ops` write, by index.
fn recipes(ops: &[MapOp]) -> BTreeMap<u32, TableRecipe> {
    ops.iter()
        .filter_map(|op| match op {
            MapOp::WriteTable { table, recipe } => Some((*table, recipe.clone())),
            _ => None,
        })
        .collect()
}

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
    assert_eq!(capacity.tables, TEST_SIZES.services);
    assert_eq!(capacity.services, TEST_SIZES.services);
    let snapshot = maps.snapshot().map_err(|e| error_chain(&e));
    assert_eq!(
        snapshot,
        Ok(Default::default()),
        "fresh maps are empty and not ready"
    );

    let mut applied = Applied::default();
    let recipes = recipes(&reconcile(maps, &mut applied, &desired(CONFIG)));
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
        [IpAddr::from([198, 18, 0, 1])]
    );
    assert_eq!(
        snapshot.interface_addresses.into_iter().collect::<Vec<_>>(),
        [((1, IpFamily::V4), IpAddr::from([198, 18, 0, 1]))]
    );

    // Backends: wire byte order, active, ids as in the mirror.
    assert_eq!(snapshot.backends.len(), 3);
    for (id, backend) in &applied.backends {
        let written = snapshot.backends[id];
        assert_eq!(
            IpAddr::from(written.addr_be.to_ne_bytes()),
            backend.address.address
        );
        assert_eq!(u16::from_be(written.port_be), backend.address.port);
        assert_eq!(written.flags, BACKEND_F_ACTIVE);
    }

    // Services: keyed by (proto, port), pointing at fully written tables.
    let web = snapshot.services[&Frontend::node_port(Protocol::Tcp, 30080)];
    let dns = snapshot.services[&Frontend::node_port(Protocol::Udp, 30053)];
    assert_eq!(web.flags & SERVICE_F_MASQUERADE, SERVICE_F_MASQUERADE);
    assert_ne!(web.id, dns.id);
    let slots = maps
        .select_slots(web.table_id)
        .ok()
        .flatten()
        .unwrap_or_default();
    assert_eq!(slots.len(), 1021);
    let recipe = &recipes[&web.table_id];
    assert_eq!(slots, recipe.build(), "the slots its recipe builds");
    assert_eq!(
        Some(&reconcile::TableSummary::of(recipe)),
        applied.tables.get(&web.table_id)
    );
    let heavy = slots.iter().filter(|&&id| id == slots[0]).count();
    assert!(
        (746..=786).contains(&heavy) || (235..=275).contains(&heavy),
        "3:1 weights: {heavy}"
    );

    // What the maps hold reads back as the mirror that wrote them (how a
    // restarted agent adopts pinned maps), once names are matched, but for
    // the tables (opened by id: not read back).
    let adopted = maps.read_applied().map_err(|e| error_chain(&e));
    let Ok(mut adopted) = adopted else {
        panic!("{adopted:?}")
    };
    adopted.adopt_names(&desired(CONFIG));
    assert_eq!(
        adopted,
        Applied {
            tables: Default::default(),
            ..applied.clone()
        }
    );

    // A change swaps a new table of the same size into the same index (the
    // entry is not rewritten) and clears the dropped backend.
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
    let web_after = after.services[&Frontend::node_port(Protocol::Tcp, 30080)];
    assert_eq!(web_after.id, web.id);
    assert_eq!(web_after, web);
    let slots = maps
        .select_slots(web_after.table_id)
        .ok()
        .flatten()
        .unwrap_or_default();
    assert_eq!(slots.len(), 1021);
    assert!(slots.iter().all(|id| after.backends.contains_key(id)));

    // Removing everything empties the maps again (config stays ready).
    reconcile(
        maps,
        &mut applied,
        &desired(
            "node:\n  interfaces: [lo]\n  addresses: [198.18.0.2]\nselection:\n  tableSize: 1021\n",
        ),
    );
    let Ok(empty) = maps.snapshot() else {
        panic!("snapshot")
    };
    assert!(empty.services.is_empty() && empty.backends.is_empty());
    for table in [web.table_id, dns.table_id] {
        let slots = maps.select_slots(table).map_err(|e| error_chain(&e));
        assert_eq!(
            slots,
            Ok(Some(vec![0])),
            "table {table} is freed (a shared one-slot placeholder)"
        );
    }
    assert_eq!(
        empty.node_addresses.into_iter().collect::<Vec<_>>(),
        [Ipv4Addr::new(198, 18, 0, 2)]
    );
}

const DUAL_STACK: &str = "
node:
  interfaces: [lo]
  addresses: [198.18.0.1, 2001:db8::1]
selection:
  tableSize: 251
services:
  - name: web
    nodePort: 30080
    port: 80
    targetPort: 8080
    frontends: [2001:db8:ff::10]
    loadBalancerSourceRanges: [2001:db8:77::/48, 198.18.77.0/24]
    backends:
      - address: 198.18.1.2
      - address: 2001:db8:1::2
      - address: 2001:db8:2::2
";

/// A dual-stack service's IPv6 half lands in the IPv6 maps (frontends,
/// backends, node addresses, source ranges) and reads back into the same
/// mirror, so an agent that adopts the pins plans nothing.
#[test]
fn ipv6_entries_go_to_the_ipv6_maps_and_read_back() {
    let Some(mut loaded) = load() else { return };
    let maps = &mut loaded.maps;
    let mut applied = Applied::default();
    let mut dual = desired(DUAL_STACK);
    let ip = |text: &str| -> IpAddr { text.parse().unwrap_or_else(|e| panic!("{e}")) };
    (dual.interface_addresses).insert((1, IpFamily::V6), ip("2001:db8::1"));
    reconcile(maps, &mut applied, &dual);
    let snapshot = maps
        .snapshot()
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let v4_port = snapshot.services[&Frontend::node_port(Protocol::Tcp, 30080)];
    let v6_port = snapshot.services[&Frontend::node_port_in(IpFamily::V6, Protocol::Tcp, 30080)];
    let v6_exact = snapshot.services[&Frontend::exact(Protocol::Tcp, ip("2001:db8:ff::10"), 80)];
    assert_ne!(v4_port.id, v6_port.id, "each family has its own table");
    assert_eq!(v6_port.table_id, v6_exact.table_id);
    let ids = |table: u32| -> BTreeSet<u32> {
        let slots = maps.select_slots(table).ok().flatten();
        slots.unwrap_or_default().into_iter().collect()
    };
    let v6_backends: BTreeSet<IpAddr> = ids(v6_port.table_id)
        .iter()
        .map(|id| snapshot.active_backends[id].address.address)
        .collect();
    assert_eq!(
        v6_backends,
        [ip("2001:db8:1::2"), ip("2001:db8:2::2")]
            .into_iter()
            .collect()
    );
    let v4_backends: Vec<IpAddr> = ids(v4_port.table_id)
        .iter()
        .map(|id| snapshot.active_backends[id].address.address)
        .collect();
    assert_eq!(v4_backends, [IpAddr::from([198, 18, 1, 2])]);
    assert_eq!(snapshot.backends.len(), 1, "only one IPv4 entry");
    assert!(snapshot.node_addresses.contains(&ip("2001:db8::1")));
    assert_eq!(
        snapshot.interface_addresses.get(&(1, IpFamily::V6)),
        Some(&ip("2001:db8::1"))
    );
    let ranges: BTreeSet<(u32, IpAddr, u8)> = (snapshot.source_ranges.iter())
        .map(|range| (range.service_id, range.network, range.prefix_len))
        .collect();
    assert!(
        ranges.contains(&(v6_exact.id, ip("2001:db8:77::"), 48)),
        "{ranges:?}"
    );
    // The IPv4 half has no frontend of its own, so its NodePort is guarded.
    assert!(
        ranges.contains(&(v4_port.id, ip("198.18.77.0"), 24)),
        "{ranges:?}"
    );

    // Adoption reads both families back into the same mirror.
    let mut read = maps
        .read_applied()
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    read.adopt_names(&dual);
    assert_eq!(read.backends, applied.backends);
    assert_eq!(read.node_addresses, applied.node_addresses);
    assert_eq!(read.interface_addresses, applied.interface_addresses);
    assert_eq!(read.source_ranges, applied.source_ranges);
    assert_eq!(
        read.services.keys().collect::<Vec<_>>(),
        applied.services.keys().collect::<Vec<_>>()
    );

    // Leaving IPv6 out clears the IPv6 half only.
    let ipv4_only = DUAL_STACK
        .replace(", 2001:db8::1]", "]")
        .replace("    frontends: [2001:db8:ff::10]\n", "")
        .replace("2001:db8:77::/48, ", "")
        .replace(
            "      - address: 2001:db8:1::2\n      - address: 2001:db8:2::2\n",
            "",
        );
    let ops = reconcile(maps, &mut applied, &desired(&ipv4_only));
    assert!(
        ops.iter().any(|op| matches!(
            op,
            MapOp::ClearBackend {
                family: IpFamily::V6,
                ..
            }
        )),
        "{ops:?}"
    );
    let after = maps
        .snapshot()
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert!(
        after
            .services
            .keys()
            .all(|frontend| frontend.family == IpFamily::V4)
    );
    assert!(
        after
            .active_backends
            .values()
            .all(|b| b.address.address.is_ipv4())
    );
    assert!(after.node_addresses.iter().all(IpAddr::is_ipv4));
    assert!(
        after
            .source_ranges
            .iter()
            .all(|range| range.network.is_ipv4())
    );
}

#[test]
fn deleting_what_is_already_gone_is_fine() {
    let Some(mut loaded) = load() else { return };
    let maps = &mut loaded.maps;
    let frontend = reconcile::Frontend::node_port(crate::model::Protocol::Tcp, 1);
    for op in [
        MapOp::RemoveService { frontend },
        MapOp::RemoveNodeAddress(IpAddr::from([198, 18, 0, 1])),
        MapOp::RemoveInterfaceAddress {
            ifindex: 77,
            family: IpFamily::V4,
        },
        MapOp::ClearBackend {
            id: 5,
            family: IpFamily::V4,
        },
    ] {
        let result = reconcile::MapWriter::apply(maps, &op).map_err(|e| error_chain(&e));
        assert_eq!(result, Ok(()), "{op}");
    }
    // Out of range is an error, not a silent success.
    let op = MapOp::WriteBackend {
        id: TEST_SIZES.backends,
        backend: reconcile::ActiveBackend {
            address: crate::model::BackendAddr {
                address: IpAddr::from([198, 18, 1, 1]),
                port: 1,
            },
            terminating: false,
        },
    };
    assert!(reconcile::MapWriter::apply(maps, &op).is_err());
}

/// Runs of one kind are written together (backends and services with
/// batch calls; tables one by one, each through a mapping) and read back
/// as written; a run that fails part way reports the ops written before.
#[test]
fn runs_are_written_whole_and_fail_where_they_fail() {
    use crate::model::BackendAddr;
    use reconcile::{ActiveBackend, Frontend, MapWriter as _, ServiceEntry};
    let Some(mut loaded) = load() else { return };
    let maps = &mut loaded.maps;
    let backend = |id: u32| MapOp::WriteBackend {
        id,
        backend: ActiveBackend {
            address: BackendAddr {
                address: IpAddr::from([198, 18, 1, u8::try_from(id).unwrap_or(0)]),
                port: 80,
            },
            terminating: id == 2,
        },
    };
    let table = |table: u32, size: u32| MapOp::WriteTable {
        table,
        recipe: TableRecipe::new(
            size,
            (1..=3)
                .map(|id| MaglevBackend {
                    id,
                    weight: id,
                    identity: u64::from(table << 8 | id),
                })
                .collect(),
        ),
    };
    let service = |port: u16, table: u32| MapOp::WriteService {
        frontend: Frontend::node_port(crate::model::Protocol::Tcp, port),
        name: format!("svc-{port}"),
        entry: ServiceEntry {
            id: u32::from(port),
            table_id: table,
            table_size: 1021,
            flags: SERVICE_F_MASQUERADE,
            affinity_timeout_s: 0,
        },
    };
    let mut ops = vec![backend(1), backend(2), backend(3)];
    ops.extend((0..8).map(|index| table(index, 1021)));
    ops.extend((0..8).map(|index| service(30000 + index as u16, index)));
    let mut applied = Applied::default();
    let applied_result = reconcile::apply(maps, &mut applied, &ops).map_err(|e| error_chain(&e));
    assert_eq!(applied_result, Ok(()));
    for index in 0..8 {
        let Ok(Some(slots)) = maps.select_slots(index) else {
            panic!("read XLB_SELECT[{index}]")
        };
        let MapOp::WriteTable { recipe, .. } = table(index, 1021) else {
            unreachable!()
        };
        assert_eq!(slots, recipe.build(), "table {index}");
        assert_eq!(
            applied.tables.get(&index),
            Some(&reconcile::TableSummary::of(&recipe))
        );
    }
    let snapshot = match maps.snapshot() {
        Ok(snapshot) => snapshot,
        Err(error) => panic!("{}", error_chain(&error)),
    };
    assert_eq!(snapshot.backends.len(), 3);
    assert_eq!(snapshot.services.len(), 8);
    assert_eq!(applied.backends.len(), 3);
    assert_eq!(applied.services.len(), 8);

    // The third backend is out of range: two are written and recorded.
    let ops = [
        backend(4),
        backend(5),
        backend(TEST_SIZES.backends),
        backend(6),
    ];
    let Err(error) = reconcile::apply(maps, &mut applied, &ops) else {
        panic!("an out-of-range backend was written")
    };
    assert_eq!(error.index, 3);
    assert_eq!(applied.backends.len(), 5);
    // A table past the end: the first is written, the second is not.
    let ops = [table(0, 11), table(lb_common::maps::TABLES_MAX, 11)];
    let Err(error) = maps.apply_run(&ops) else {
        panic!("a table past the end was written")
    };
    assert_eq!(error.0, 1);
}

/// The kernel takes a run of tables into `XLB_SELECT` with one batch
/// update (it waits for an RCU grace period once per call on a map of
/// maps, not once per table), and each reads back as written.
#[test]
fn tables_are_swapped_in_by_one_batch_call() {
    let Some(mut loaded) = load() else { return };
    let maps = &mut loaded.maps;
    let tables: Vec<(u32, Vec<u32>)> = (0..40)
        .map(|table| {
            (
                table * 3,
                (0..251).map(|slot| 1 + (table + slot) % 7).collect(),
            )
        })
        .collect();
    let swapped = maps
        .swap_tables_in_one_call(&tables)
        .map_err(|e| error_chain(&e));
    assert_eq!(swapped, Ok(()));
    for (table, ids) in &tables {
        let read = maps.select_slots(*table).map_err(|e| error_chain(&e));
        assert_eq!(read, Ok(Some(ids.clone())), "table {table}");
    }
    // A run of removals frees them (pointing each index at one shared
    // one-slot table).
    let removals: Vec<MapOp> = tables
        .iter()
        .map(|(table, _)| MapOp::RemoveTable { table: *table })
        .collect();
    let removed =
        reconcile::MapWriter::apply_run(maps, &removals).map_err(|(_, e)| error_chain(&e));
    assert_eq!(removed, Ok(()));
    for (table, _) in &tables {
        let read = maps.select_slots(*table).map_err(|e| error_chain(&e));
        assert_eq!(read, Ok(Some(vec![0])), "table {table}");
    }
}

#[test]
fn stats_start_at_zero() {
    let Some(loaded) = load() else { return };
    let reader = crate::observe::datapath::DatapathMaps::from_maps(loaded.observed);
    let counts = reader
        .and_then(|maps| maps.verdicts())
        .map_err(|e| error_chain(&e));
    let zeros: Vec<(Reason, u64)> = Reason::ALL.iter().map(|&reason| (reason, 0)).collect();
    assert_eq!(counts, Ok(zeros));
}

/// A bpffs mounted in a fresh temporary directory, unmounted on drop.
struct TempBpffs {
    path: std::path::PathBuf,
}

impl TempBpffs {
    fn mount(tag: &str) -> Option<Self> {
        if !is_root() {
            eprintln!("skipped: mounting a bpffs needs root");
            return None;
        }
        let path = std::env::temp_dir().join(format!("xlb-kernel-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .is_ok_and(|status| status.success());
        if !mounted {
            eprintln!("skipped: cannot mount a bpffs at {}", path.display());
            let _ = std::fs::remove_dir(&path);
            return None;
        }
        Some(Self { path })
    }
}

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The specs `prepare_map_pins` checks pins against are exactly the maps
/// the loader creates: a second load adopts every one of them. A pin that
/// no longer fits is recreated; the configuration maps go together.
#[test]
fn pinned_maps_are_adopted_and_misfits_recreated() {
    let Some(bpffs) = TempBpffs::mount("pins") else {
        return;
    };
    let pins = match PinDir::open(&bpffs.path.join("xlb")) {
        Ok(pins) => pins,
        Err(error) => panic!("{}", error_chain(&error)),
    };
    let first = match Datapath::load_pinned(TEST_SIZES, Some(&pins)) {
        Ok(loaded) => loaded,
        Err(error) => panic!("{}", error_chain(&error)),
    };
    assert!(!first.adopted, "nothing was pinned yet");
    let mut first = first;
    let mut applied = Applied::default();
    reconcile(&mut first.maps, &mut applied, &desired(CONFIG));
    let first_slots: BTreeMap<u32, Option<Vec<u32>>> = applied
        .tables
        .keys()
        .map(|&table| (table, first.maps.select_slots(table).ok().flatten()))
        .collect();
    drop(first);

    let check = pin::prepare_map_pins(&pins, &TEST_SIZES).map_err(|e| e.to_string());
    assert_eq!(
        check,
        Ok(pin::PinCheck {
            adopted: true,
            recreated: vec![]
        }),
        "every pin fits the datapath that made it"
    );
    let second = match Datapath::load_pinned(TEST_SIZES, Some(&pins)) {
        Ok(loaded) => loaded,
        Err(error) => panic!("{}", error_chain(&error)),
    };
    assert!(second.adopted);
    let adopted = second.maps.read_applied().map_err(|e| error_chain(&e));
    let Ok(mut adopted) = adopted else {
        panic!("{adopted:?}")
    };
    adopted.adopt_names(&desired(CONFIG));
    assert_eq!(
        adopted,
        Applied {
            tables: Default::default(),
            ..applied.clone()
        },
        "the second agent sees what the first wrote (tables aside)"
    );
    // Its first plan swaps each table in place with the same slots and
    // rewrites no entry: new flows choose as before the restart.
    let mut second = second;
    let ops = reconcile(&mut second.maps, &mut adopted, &desired(CONFIG));
    assert!(
        ops.iter().all(|op| matches!(op, MapOp::WriteTable { .. })),
        "{ops:#?}"
    );
    assert_eq!(adopted, applied);
    for (table, slots) in &first_slots {
        assert!(slots.is_some(), "table {table} was written");
        let read = second
            .maps
            .select_slots(*table)
            .map_err(|e| error_chain(&e));
        assert_eq!(read.as_ref(), Ok(slots), "table {table}");
    }
    drop(second);

    // Another flow table size is recreated alone; another backend table
    // size takes the configuration maps with it.
    let other_flows = MapSizes {
        flows: TEST_SIZES.flows * 2,
        ..TEST_SIZES
    };
    let Ok(check) = pin::prepare_map_pins(&pins, &other_flows) else {
        panic!("prepare_map_pins failed");
    };
    assert!(check.adopted);
    let recreated: Vec<&str> = check
        .recreated
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(recreated, ["XLB_FLOWS"], "XLB_FLOWS6 has a size of its own");
    assert!(!pins.map("XLB_FLOWS").exists());
    assert!(pins.map("XLB_FLOWS6").exists());
    let larger = MapSizes {
        backends: TEST_SIZES.backends * 2,
        ..TEST_SIZES
    };
    // Before the maps are made anew at the larger size, the ids they gave
    // are read for the first plan to keep (the maps grew).
    assert!(kept::resized(&pins, &larger));
    assert!(!kept::resized(&pins, &TEST_SIZES));
    assert_eq!(
        kept::pinned_capacity(&pins),
        Some((TEST_SIZES.services, TEST_SIZES.backends))
    );
    let kept = kept::pinned_ids(&pins).unwrap_or_default();
    let backends: BTreeMap<_, _> = applied
        .backends
        .iter()
        .map(|(&id, active)| (active.address, id))
        .collect();
    let services: BTreeMap<_, _> = applied
        .services
        .iter()
        .map(|(&frontend, service)| (frontend, service.entry.id))
        .collect();
    assert_eq!(kept.ids.backends, backends);
    assert_eq!(kept.ids.services, services);
    assert_eq!(
        kept.hash_seed,
        applied.settings.map(|settings| settings.hash_seed)
    );
    let Ok(check) = pin::prepare_map_pins(&pins, &larger) else {
        panic!("prepare_map_pins failed");
    };
    assert!(!check.adopted);
    // 9 configuration maps for IPv4 and the shared ones, 6 for IPv6, and
    // the per-backend counters (sized like XLB_BACKENDS).
    assert_eq!(check.recreated.len(), 17, "{:?}", check.recreated);
    assert!(
        check
            .recreated
            .iter()
            .any(|(name, why)| name == "XLB_BACKENDS" && why.contains("expected")),
        "{:?}",
        check.recreated
    );
    assert!(!pins.map("XLB_SERVICES").exists());
    assert!(pins.map("XLB_STATS").exists(), "counters are kept");
    assert_eq!(
        pins.remove_all().map_err(|e| e.to_string()),
        Ok((vec![], vec![], 12)),
        "the counter maps of reasons and services, XLB_FRAGS(6), XLB_ICMP_LIMIT(6), XLB_FLOWS_NEW, XLB_FLOWS6 and XLB_FLOWS_NEW6 (conntrack is kept), the socket reverse maps (both families) and XLB_PROGS6 were left (the per-backend counters are sized like XLB_BACKENDS)"
    );
}

/// The maps aya adds to an object beside the datapath's own: global data
/// sections (`.rodata` for `XLB_DEBUG`, ...) and aya-log's ring buffer.
fn is_loader_map(name: &str) -> bool {
    name.starts_with('.') || name == "AYA_LOGS"
}

/// The object's maps and programs are exactly `lb_common::maps::MAPS` and
/// `PROGRAMS`, with the declared kind, key/value sizes, capacity and flags.
#[test]
fn the_object_is_what_lb_common_declares() {
    use aya::programs::Program;
    use lb_common::maps::{Hook, MAPS, PROGRAMS};

    if !is_root() {
        eprintln!("skipped: loading BPF needs root");
        return;
    }
    let mut loader = EbpfLoader::new();
    for map in MAPS {
        if map.sizing != Sizing::Fixed {
            loader.map_max_entries(map.name, TEST_SIZES.max_entries(map));
        }
    }
    let ebpf = loader
        .load(OBJECT)
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let mut seen = BTreeSet::new();
    for (name, map) in ebpf.maps() {
        if is_loader_map(name) {
            continue;
        }
        let declared = MAPS.iter().find(|map| map.name == name);
        let Some(declared) = declared else {
            panic!("the object's map {name} is not declared in lb_common::maps");
        };
        let info = map_data(map)
            .and_then(|data| data.info().ok())
            .unwrap_or_else(|| panic!("{name}: no map info"));
        let found = (
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        let expected = (
            Some(pin::map_type(declared.kind)),
            declared.key_size,
            declared.value_size,
            TEST_SIZES.max_entries(declared),
            declared.flags,
        );
        assert_eq!(
            found, expected,
            "{name}: (kind, key, value, max_entries, flags)"
        );
        seen.insert(name.to_owned());
    }
    for map in MAPS {
        assert!(
            seen.contains(map.name),
            "{} is declared but not in the object",
            map.name
        );
    }
    let mut programs = 0;
    for (name, program) in ebpf.programs() {
        let declared = PROGRAMS.iter().find(|program| program.name == name);
        let Some(declared) = declared else {
            panic!("the object's program {name} is not declared in lb_common::maps");
        };
        let kind_fits = match declared.hook {
            Hook::Xdp | Hook::XdpTail => matches!(program, Program::Xdp(_)),
            Hook::TcIngress => matches!(program, Program::SchedClassifier(_)),
            Hook::CgroupSockAddr(_) => matches!(program, Program::CgroupSockAddr(_)),
        };
        assert!(
            kind_fits,
            "{name} is a {:?}, declared {:?}",
            program.prog_type(),
            declared.hook
        );
        programs += 1;
    }
    assert_eq!(
        programs,
        PROGRAMS.len(),
        "a declared program is missing from the object"
    );
}
