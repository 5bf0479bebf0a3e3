use std::collections::HashMap;

use super::*;
use crate::model::{Backend, Conntrack, DEFAULT_MASQUERADE_PORTS, Service};

const TABLE: u32 = 11;

fn backend(last: u8, weight: u32) -> Backend {
    Backend {
        address: Ipv4Addr::new(198, 18, 1, last),
        port: 8080,
        weight,
        name: None,
    }
}

fn service(name: &str, node_port: u16, backends: Vec<Backend>) -> Service {
    Service {
        name: name.to_owned(),
        namespace: String::from("default"),
        protocol: Protocol::Tcp,
        node_port,
        backends,
    }
}

fn state(services: Vec<Service>) -> DesiredState {
    DesiredState {
        interfaces: vec![String::from("eth0")],
        node_addresses: Some(vec![Ipv4Addr::new(198, 18, 0, 1)]),
        masquerade_ports: DEFAULT_MASQUERADE_PORTS,
        conntrack: Conntrack::default(),
        table_size: TABLE,
        services,
    }
}

fn node() -> NodeFacts {
    NodeFacts {
        local_addresses: [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 9)]
            .into_iter()
            .collect(),
        interface_addresses: [
            (1, Ipv4Addr::new(127, 0, 0, 1)),
            (2, Ipv4Addr::new(198, 18, 0, 1)),
        ]
        .into_iter()
        .collect(),
    }
}

fn capacity() -> Capacity {
    Capacity {
        select_slots: TABLE * 8,
        backends: 64,
        ..Capacity::default()
    }
}

#[derive(Debug, thiserror::Error)]
enum FakeError {
    #[error("injected failure")]
    Injected,
    #[error("invariant broken by {op}: {why}")]
    Invariant { op: String, why: String },
}

/// The maps as the datapath would see them, checking after every op that a
/// packet could not observe a half-written state.
struct FakeMaps {
    services: HashMap<Frontend, ServiceEntry>,
    select: Vec<u32>,
    backends: HashMap<u32, BackendAddr>,
    node_addresses: BTreeSet<Ipv4Addr>,
    interface_addresses: BTreeMap<u32, Ipv4Addr>,
    settings: Option<Settings>,
    /// Fail the op with this 0-based index (counted over the fake's life).
    fail_at: Option<usize>,
    ops_seen: usize,
}

impl FakeMaps {
    fn new() -> Self {
        Self {
            services: HashMap::new(),
            select: vec![0; capacity().select_slots as usize],
            backends: HashMap::new(),
            node_addresses: BTreeSet::new(),
            interface_addresses: BTreeMap::new(),
            settings: None,
            fail_at: None,
            ops_seen: 0,
        }
    }

    fn region(&self, entry: &ServiceEntry) -> &[u32] {
        let start = entry.table_offset as usize;
        &self.select[start..start + entry.table_size as usize]
    }

    /// What a packet may rely on: every service's region holds only active
    /// backends.
    fn check(&self) -> Result<(), String> {
        for (frontend, entry) in &self.services {
            for &id in self.region(entry) {
                if !self.backends.contains_key(&id) {
                    return Err(format!("{frontend} selects inactive backend {id}"));
                }
            }
        }
        Ok(())
    }

    /// Slots each backend address holds in `frontend`'s table.
    fn shares(&self, frontend: Frontend) -> BTreeMap<BackendAddr, usize> {
        let mut shares = BTreeMap::new();
        for id in self.region(&self.services[&frontend]) {
            *shares.entry(self.backends[id]).or_insert(0) += 1;
        }
        shares
    }
}

impl MapWriter for FakeMaps {
    type Error = FakeError;

    fn apply(&mut self, op: &MapOp) -> Result<(), FakeError> {
        let index = self.ops_seen;
        self.ops_seen += 1;
        if self.fail_at == Some(index) {
            return Err(FakeError::Injected);
        }
        let broken = |why: String| FakeError::Invariant {
            op: op.to_string(),
            why,
        };
        match op {
            MapOp::AddNodeAddress(address) => {
                self.node_addresses.insert(*address);
            }
            MapOp::RemoveNodeAddress(address) => {
                self.node_addresses.remove(address);
            }
            MapOp::SetInterfaceAddress { ifindex, address } => {
                self.interface_addresses.insert(*ifindex, *address);
            }
            MapOp::RemoveInterfaceAddress { ifindex } => {
                self.interface_addresses.remove(ifindex);
            }
            MapOp::WriteBackend { id, backend } => {
                if *id == 0 {
                    return Err(broken(String::from("backend id 0 is reserved")));
                }
                self.backends.insert(*id, *backend);
            }
            MapOp::ClearBackend { id } => {
                self.backends.remove(id);
            }
            MapOp::WriteTable {
                offset,
                backend_ids,
            } => {
                let start = *offset as usize;
                let end = start + backend_ids.len();
                for (frontend, entry) in &self.services {
                    let live = entry.table_offset as usize
                        ..(entry.table_offset + entry.table_size) as usize;
                    if live.start < end && start < live.end {
                        return Err(broken(format!("overwrites the live table of {frontend}")));
                    }
                }
                self.select[start..end].copy_from_slice(backend_ids);
            }
            MapOp::WriteService {
                frontend, entry, ..
            } => {
                self.services.insert(*frontend, *entry);
            }
            MapOp::RemoveService { frontend } => {
                self.services.remove(frontend);
            }
            MapOp::WriteSettings(settings) => self.settings = Some(*settings),
        }
        self.check().map_err(broken)
    }
}

struct Harness {
    maps: FakeMaps,
    applied: Applied,
}

impl Harness {
    fn new() -> Self {
        Self {
            maps: FakeMaps::new(),
            applied: Applied::default(),
        }
    }

    fn plan(&self, state: &DesiredState) -> Vec<MapOp> {
        match diff(&self.applied, &Desired::new(state, &node()), &capacity()) {
            Ok(ops) => ops,
            Err(error) => panic!("{error}"),
        }
    }

    /// Plans and applies `state`; returns the ops.
    fn reconcile(&mut self, state: &DesiredState) -> Vec<MapOp> {
        let ops = self.plan(state);
        if let Err(error) = apply(&mut self.maps, &mut self.applied, &ops) {
            panic!("{error}: {}", error.source);
        }
        assert_eq!(self.plan(state), [], "applying the plan converges");
        ops
    }

    fn id_of(&self, name: &str) -> u32 {
        let found = self
            .applied
            .services
            .values()
            .find(|service| service.name == format!("default/{name}"));
        match found {
            Some(service) => service.entry.id,
            None => panic!("no service {name}"),
        }
    }

    fn backend_id(&self, last: u8) -> Option<u32> {
        let wanted = BackendAddr::from(&backend(last, 1));
        self.applied
            .backends
            .iter()
            .find(|(_, backend)| **backend == wanted)
            .map(|(id, _)| *id)
    }
}

fn tcp(node_port: u16) -> Frontend {
    Frontend {
        protocol: Protocol::Tcp,
        node_port,
    }
}

fn phases(ops: &[MapOp]) -> Vec<u8> {
    ops.iter().map(MapOp::phase).collect()
}

#[test]
fn first_apply_writes_everything_in_safe_order_and_ready_last() {
    let mut lab = Harness::new();
    let ops = lab.reconcile(&state(vec![service(
        "web",
        30080,
        vec![backend(2, 1), backend(3, 1)],
    )]));
    let kinds: Vec<String> = ops
        .iter()
        .map(|op| {
            op.to_string()
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "add",
            "masquerade",
            "masquerade",
            "backend",
            "backend",
            "selection",
            "service",
            "global"
        ]
    );
    assert!(matches!(ops.last(), Some(MapOp::WriteSettings(_))));
    assert_eq!(lab.maps.node_addresses.len(), 1);
    assert_eq!(lab.maps.interface_addresses.len(), 2);
    assert_eq!(lab.maps.services[&tcp(30080)].table_size, TABLE);
    assert!(lab.maps.settings.is_some());
}

#[test]
fn unchanged_config_means_zero_ops() {
    let mut lab = Harness::new();
    let desired = state(vec![
        service("web", 30080, vec![backend(2, 1), backend(3, 2)]),
        service("empty", 30081, vec![]),
    ]);
    lab.reconcile(&desired);
    assert_eq!(lab.plan(&desired), []);
    // Listing the same backends in another order changes nothing either.
    let reordered = state(vec![
        service("web", 30080, vec![backend(3, 2), backend(2, 1)]),
        service("empty", 30081, vec![]),
    ]);
    assert_eq!(lab.plan(&reordered), []);
}

#[test]
fn adding_a_backend_double_buffers_the_table() {
    let mut lab = Harness::new();
    lab.reconcile(&state(vec![service("web", 30080, vec![backend(2, 1)])]));
    let id = lab.id_of("web");
    let kept = lab.backend_id(2);
    let old = lab.maps.services[&tcp(30080)];

    let ops = lab.reconcile(&state(vec![service(
        "web",
        30080,
        vec![backend(2, 1), backend(3, 1)],
    )]));
    assert_eq!(phases(&ops), [1, 2, 3], "{ops:#?}");
    let MapOp::WriteTable { offset, .. } = &ops[1] else {
        panic!("{ops:#?}");
    };
    assert_ne!(
        *offset, old.table_offset,
        "the new table goes to a free region"
    );
    let new = lab.maps.services[&tcp(30080)];
    assert_eq!((new.id, new.table_offset), (id, *offset));
    assert_eq!(lab.backend_id(2), kept, "the staying backend keeps its id");
    assert!(
        !lab.applied.tables.contains_key(&old.table_offset),
        "the old region is free after the flip"
    );
}

#[test]
fn removing_a_backend_clears_it_after_the_flip() {
    let mut lab = Harness::new();
    lab.reconcile(&state(vec![service(
        "web",
        30080,
        vec![backend(2, 1), backend(3, 1)],
    )]));
    let gone = lab.backend_id(3);
    let kept = lab.backend_id(2);
    let ops = lab.reconcile(&state(vec![service("web", 30080, vec![backend(2, 1)])]));
    assert_eq!(phases(&ops), [2, 3, 5], "{ops:#?}");
    assert_eq!(
        ops.last(),
        gone.map(|id| MapOp::ClearBackend { id }).as_ref()
    );
    assert_eq!(lab.backend_id(2), kept);
    assert_eq!(lab.backend_id(3), None);
}

#[test]
fn removing_a_service_deletes_entry_then_its_own_backends() {
    let mut lab = Harness::new();
    let shared = backend(2, 1);
    lab.reconcile(&state(vec![
        service("web", 30080, vec![shared.clone(), backend(3, 1)]),
        service("api", 30081, vec![shared.clone()]),
    ]));
    let only_web = lab.backend_id(3);
    let ops = lab.reconcile(&state(vec![service("api", 30081, vec![shared])]));
    assert_eq!(
        ops,
        [
            MapOp::RemoveService {
                frontend: tcp(30080)
            },
            MapOp::ClearBackend {
                id: only_web.unwrap_or_default()
            },
        ]
    );
    assert!(
        lab.backend_id(2).is_some(),
        "a backend another service uses stays"
    );
    assert_eq!(lab.maps.services.len(), 1);
}

#[test]
fn service_ids_are_stable_and_never_reused() {
    let mut lab = Harness::new();
    lab.reconcile(&state(vec![
        service("a", 30001, vec![backend(2, 1)]),
        service("b", 30002, vec![backend(3, 1)]),
    ]));
    let (a, b) = (lab.id_of("a"), lab.id_of("b"));
    assert_ne!(a, b);
    lab.reconcile(&state(vec![service("b", 30002, vec![backend(4, 1)])]));
    assert_eq!(lab.id_of("b"), b);
    lab.reconcile(&state(vec![
        service("b", 30002, vec![backend(4, 1)]),
        service("c", 30003, vec![backend(4, 1)]),
    ]));
    let c = lab.id_of("c");
    assert!(c != a && c != b, "a's id {a} is not handed to c");
}

#[test]
fn node_port_change_keeps_id_and_table() {
    let mut lab = Harness::new();
    lab.reconcile(&state(vec![service("web", 30080, vec![backend(2, 1)])]));
    let before = lab.maps.services[&tcp(30080)];
    let ops = lab.reconcile(&state(vec![service("web", 30090, vec![backend(2, 1)])]));
    assert_eq!(phases(&ops), [3, 4], "{ops:#?}");
    assert_eq!(lab.maps.services[&tcp(30090)], before);
    assert!(!lab.maps.services.contains_key(&tcp(30080)));
}

#[test]
fn weights_three_to_one_share_slots_75_25() {
    let mut lab = Harness::new();
    let desired = DesiredState {
        table_size: 1021,
        ..state(vec![service(
            "web",
            30080,
            vec![backend(2, 3), backend(3, 1)],
        )])
    };
    let ops = diff(
        &Applied::default(),
        &Desired::new(&desired, &node()),
        &Capacity::default(),
    );
    let Ok(ops) = ops else { panic!("{ops:?}") };
    lab.maps.select = vec![0; 1021 * 2];
    if let Err(error) = apply(&mut lab.maps, &mut lab.applied, &ops) {
        panic!("{error}");
    }
    let shares: Vec<usize> = lab.maps.shares(tcp(30080)).into_values().collect();
    assert_eq!(shares, [766, 255]);
}

#[test]
fn zero_weight_backend_is_written_but_never_selected() {
    let mut lab = Harness::new();
    lab.reconcile(&state(vec![service(
        "web",
        30080,
        vec![backend(2, 1), backend(3, 0)],
    )]));
    assert!(lab.backend_id(3).is_some());
    let shares = lab.maps.shares(tcp(30080));
    assert_eq!(shares.len(), 1);
    assert_eq!(shares.values().sum::<usize>(), TABLE as usize);
}

#[test]
fn service_without_backends_has_an_empty_table() {
    let mut lab = Harness::new();
    lab.reconcile(&state(vec![service("web", 30080, vec![])]));
    let entry = lab.maps.services[&tcp(30080)];
    assert_eq!(entry.table_size, 0);
    // And gaining backends later flips it to a real table.
    lab.reconcile(&state(vec![service("web", 30080, vec![backend(2, 1)])]));
    assert_eq!(lab.maps.services[&tcp(30080)].table_size, TABLE);
    lab.reconcile(&state(vec![service("web", 30080, vec![])]));
    assert_eq!(lab.maps.services[&tcp(30080)].table_size, 0);
    assert!(lab.applied.backends.is_empty());
}

#[test]
fn node_addresses_follow_config_or_node() {
    let mut lab = Harness::new();
    let mut desired = state(vec![]);
    lab.reconcile(&desired);
    assert_eq!(lab.maps.node_addresses.len(), 1);
    desired.node_addresses = None;
    let ops = lab.reconcile(&desired);
    assert_eq!(ops, [MapOp::AddNodeAddress(Ipv4Addr::new(198, 18, 0, 9))]);
    desired.node_addresses = Some(vec![Ipv4Addr::new(198, 18, 0, 9)]);
    let ops = lab.reconcile(&desired);
    assert_eq!(
        ops,
        [MapOp::RemoveNodeAddress(Ipv4Addr::new(198, 18, 0, 1))]
    );
}

#[test]
fn interface_address_changes() {
    let mut lab = Harness::new();
    let desired = state(vec![]);
    lab.reconcile(&desired);
    let mut facts = node();
    facts
        .interface_addresses
        .insert(2, Ipv4Addr::new(198, 18, 0, 7));
    facts.interface_addresses.remove(&1);
    facts
        .interface_addresses
        .insert(5, Ipv4Addr::new(198, 18, 5, 1));
    let ops = diff(&lab.applied, &Desired::new(&desired, &facts), &capacity());
    assert_eq!(
        ops,
        Ok(vec![
            MapOp::SetInterfaceAddress {
                ifindex: 2,
                address: Ipv4Addr::new(198, 18, 0, 7)
            },
            MapOp::SetInterfaceAddress {
                ifindex: 5,
                address: Ipv4Addr::new(198, 18, 5, 1)
            },
            MapOp::RemoveInterfaceAddress { ifindex: 1 },
        ])
    );
}

#[test]
fn settings_change_is_one_op() {
    let mut lab = Harness::new();
    let mut desired = state(vec![service("web", 30080, vec![backend(2, 1)])]);
    lab.reconcile(&desired);
    desired.conntrack.udp_timeout_s = 5;
    let ops = lab.reconcile(&desired);
    assert!(matches!(
        ops[..],
        [MapOp::WriteSettings(Settings {
            udp_timeout_s: 5,
            ..
        })]
    ));
}

#[test]
fn two_regions_are_enough_to_double_buffer_one_service() {
    let mut lab = Harness::new();
    let capacity = Capacity {
        select_slots: TABLE * 2,
        ..capacity()
    };
    let mut offsets = Vec::new();
    for round in 0..4u8 {
        let desired = state(vec![service(
            "web",
            30080,
            vec![backend(2, 1), backend(3 + round, 1)],
        )]);
        let ops = diff(&lab.applied, &Desired::new(&desired, &node()), &capacity);
        let Ok(ops) = ops else { panic!("{ops:?}") };
        if let Err(error) = apply(&mut lab.maps, &mut lab.applied, &ops) {
            panic!("{error}");
        }
        offsets.push(lab.maps.services[&tcp(30080)].table_offset);
    }
    assert_eq!(offsets, [0, TABLE, 0, TABLE]);
}

#[test]
fn plans_that_do_not_fit_are_refused() {
    let applied = Applied::default();
    let desired = state(vec![
        service("a", 30001, vec![backend(2, 1)]),
        service("b", 30002, vec![backend(2, 1)]),
    ]);
    let small = Capacity {
        select_slots: TABLE,
        ..capacity()
    };
    assert_eq!(
        diff(&applied, &Desired::new(&desired, &node()), &small),
        Err(PlanError::NoRegion {
            service: String::from("default/b"),
            slots: TABLE as usize,
            capacity: TABLE
        })
    );
    let few_backends = Capacity {
        backends: 2,
        ..capacity()
    };
    let desired = state(vec![service(
        "a",
        30001,
        vec![backend(2, 1), backend(3, 1)],
    )]);
    assert!(matches!(
        diff(&applied, &Desired::new(&desired, &node()), &few_backends),
        Err(PlanError::Full {
            map: "XLB_BACKENDS",
            ..
        })
    ));
}

#[test]
fn failed_apply_leaves_a_true_mirror_and_the_next_plan_recovers() {
    let configs = [
        state(vec![service(
            "web",
            30080,
            vec![backend(2, 1), backend(3, 1)],
        )]),
        state(vec![
            service("web", 30080, vec![backend(4, 1)]),
            service("api", 30081, vec![backend(2, 1), backend(5, 2)]),
        ]),
        state(vec![service("api", 30082, vec![backend(5, 1)])]),
    ];
    for fail_at in 0..12 {
        let mut lab = Harness::new();
        lab.reconcile(&configs[0]);
        for desired in &configs[1..] {
            let ops = lab.plan(desired);
            lab.maps.fail_at = Some(lab.maps.ops_seen + fail_at);
            match apply(&mut lab.maps, &mut lab.applied, &ops) {
                Ok(()) => {}
                Err(ApplyError {
                    source: FakeError::Injected,
                    ..
                }) => {}
                Err(error) => panic!("{error}: {}", error.source),
            }
            lab.maps.fail_at = None;
            lab.reconcile(desired);
        }
        assert_eq!(lab.maps.services.len(), 1);
        assert_eq!(lab.maps.backends.len(), 1);
    }
}

/// Many random configs in a row: every step keeps the packet-visible
/// invariants (checked by the fake), converges, and leaves no stray backend.
#[test]
fn random_walk_of_configs() {
    let mut seed = 0x1234_5678_u32;
    let mut random = move |bound: u32| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed % bound
    };
    let mut lab = Harness::new();
    for _ in 0..200 {
        let mut services = Vec::new();
        for index in 0..random(4) {
            let backends = (0..random(4))
                .map(|b| backend(u8::try_from(10 + index * 4 + b).unwrap_or(0), random(3) + 1))
                .collect();
            services.push(service(
                &format!("s{index}"),
                30_000 + random(3) as u16 * 10 + index as u16,
                backends,
            ));
        }
        let desired = state(services);
        lab.reconcile(&desired);
        let wanted: BTreeSet<BackendAddr> = desired
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(BackendAddr::from))
            .collect();
        let active: BTreeSet<BackendAddr> = lab.maps.backends.values().copied().collect();
        assert_eq!(active, wanted);
        assert_eq!(lab.maps.services.len(), desired.services.len());
    }
}
