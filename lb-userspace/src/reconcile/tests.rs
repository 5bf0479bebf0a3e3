use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::model::{
    Backend, BackendAddr, Conntrack, DEFAULT_MASQUERADE_PORTS, DesiredState, IpFamily, Protocol,
    Service, TrafficPolicy, desired_backends,
};
use lb_common::service::{
    SERVICE_F_AFFINITY, SERVICE_F_DROP_IF_EMPTY, SERVICE_F_MASQUERADE, SERVICE_F_SOURCE_RANGES,
};

const TABLE: u32 = 11;

fn backend(last: u8, weight: u32) -> Backend {
    Backend {
        address: IpAddr::from([198, 18, 1, last]),
        port: 8080,
        weight,
        ..Backend::default()
    }
}

fn service(name: &str, node_port: u16, backends: Vec<Backend>) -> Service {
    Service {
        name: name.to_owned(),
        namespace: String::from("default"),
        protocol: Protocol::Tcp,
        node_port,
        backends,
        ..Service::default()
    }
}

fn state(services: Vec<Service>) -> DesiredState {
    DesiredState {
        interfaces: vec![String::from("eth0")],
        node_addresses: Some(vec![IpAddr::from([198, 18, 0, 1])]),
        masquerade_ports: DEFAULT_MASQUERADE_PORTS,
        conntrack: Conntrack::default(),
        table_size: TABLE,
        table_size_auto: false,
        services,
        ..DesiredState::default()
    }
}

fn node() -> NodeFacts {
    NodeFacts {
        local_addresses: [IpAddr::from([198, 18, 0, 1]), IpAddr::from([198, 18, 0, 9])]
            .into_iter()
            .collect(),
        interface_addresses: [
            ((1, IpFamily::V4), IpAddr::from([127, 0, 0, 1])),
            ((2, IpFamily::V4), IpAddr::from([198, 18, 0, 1])),
        ]
        .into_iter()
        .collect(),
    }
}

fn capacity() -> Capacity {
    Capacity {
        tables: 8,
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
    /// `XLB_SELECT`: tables by index.
    select: BTreeMap<u32, Vec<u32>>,
    backends: HashMap<u32, ActiveBackend>,
    source_ranges: BTreeSet<SourceRangeKey>,
    node_addresses: BTreeSet<IpAddr>,
    interface_addresses: BTreeMap<(u32, IpFamily), IpAddr>,
    settings: Option<Settings>,
    ports: PortSet,
    port_filter: bool,
    /// Fail the op with this 0-based index (counted over the fake's life).
    fail_at: Option<usize>,
    ops_seen: usize,
    /// Frontends the desired state guards with no range of their family
    /// (a dual-stack service's ranges are all of the other): they check
    /// sources and allow none.
    rangeless: BTreeSet<Frontend>,
}

impl FakeMaps {
    fn new() -> Self {
        Self {
            services: HashMap::new(),
            select: BTreeMap::new(),
            backends: HashMap::new(),
            source_ranges: BTreeSet::new(),
            node_addresses: BTreeSet::new(),
            interface_addresses: BTreeMap::new(),
            settings: None,
            ports: PortSet::default(),
            port_filter: false,
            fail_at: None,
            ops_seen: 0,
            rangeless: BTreeSet::new(),
        }
    }

    fn region(&self, entry: &ServiceEntry) -> &[u32] {
        if entry.table_size == 0 {
            return &[];
        }
        self.select.get(&entry.table_id).map_or(&[], Vec::as_slice)
    }

    /// What a packet may rely on: every service's table is there, of the
    /// size its entry says (so no slot lookup misses), and holds only
    /// active backends; a service that checks sources has its ranges
    /// written.
    fn check(&self) -> Result<(), String> {
        for (frontend, entry) in &self.services {
            let size = self.region(entry).len();
            if size != entry.table_size as usize {
                return Err(format!(
                    "{frontend} expects {} slots in table {}, which has {size}",
                    entry.table_size, entry.table_id
                ));
            }
            for &id in self.region(entry) {
                if !self.backends.contains_key(&id) {
                    return Err(format!("{frontend} selects inactive backend {id}"));
                }
            }
            let ranged = entry.flags & SERVICE_F_SOURCE_RANGES != 0;
            if ranged
                && !self.rangeless.contains(frontend)
                && !self.source_ranges.iter().any(|r| r.service_id == entry.id)
            {
                return Err(format!("{frontend} checks sources but has no range"));
            }
            if self.port_filter && !self.ports.contains(frontend.port) {
                return Err(format!("{frontend} is not listed in the port filter"));
            }
        }
        for backend in self.backends.values() {
            if self.port_filter && !self.ports.contains(backend.address.port) {
                return Err(format!(
                    "backend {} is not listed in the port filter",
                    backend.address
                ));
            }
        }
        Ok(())
    }

    /// Slots each backend address holds in `frontend`'s table.
    fn shares(&self, frontend: Frontend) -> BTreeMap<BackendAddr, usize> {
        let mut shares = BTreeMap::new();
        for id in self.region(&self.services[&frontend]) {
            *shares.entry(self.backends[id].address).or_insert(0) += 1;
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
                (self.interface_addresses).insert((*ifindex, IpFamily::of(*address)), *address);
            }
            MapOp::RemoveInterfaceAddress { ifindex, family } => {
                self.interface_addresses.remove(&(*ifindex, *family));
            }
            MapOp::WriteBackend { id, backend } => {
                if *id == 0 {
                    return Err(broken(String::from("backend id 0 is reserved")));
                }
                self.backends.insert(*id, *backend);
            }
            MapOp::ClearBackend { id, .. } => {
                self.backends.remove(id);
            }
            MapOp::WriteTable { table, recipe } => {
                // Swapped in whole: `check` says whether live entries can
                // take it.
                self.select.insert(*table, recipe.build());
            }
            MapOp::RemoveTable { table } => {
                self.select.remove(table);
            }
            MapOp::AddSourceRange(range) => {
                self.source_ranges.insert(*range);
            }
            MapOp::RemoveSourceRange(range) => {
                self.source_ranges.remove(range);
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
            MapOp::WritePorts { word, bits } => self.ports.set_word(usize::from(*word), *bits),
            MapOp::PortFilterOn => self.port_filter = true,
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
        let desired = Desired::new(state, &node());
        self.maps.rangeless = (desired.services.iter())
            .filter(|service| service.source_ranges.is_empty())
            .flat_map(|service| service.frontends.iter())
            .filter(|(_, flags)| flags & SERVICE_F_SOURCE_RANGES != 0)
            .map(|(frontend, _)| *frontend)
            .collect();
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
            .find(|(_, backend)| backend.address == wanted)
            .map(|(id, _)| *id)
    }
}

fn tcp(node_port: u16) -> Frontend {
    Frontend::node_port(Protocol::Tcp, node_port)
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
            // The port filter: the frontend's and the backends' words, then on.
            "port",
            "port",
            "port",
            "backend",
            "backend",
            "selection",
            "service",
            "global"
        ]
    );
    assert!(matches!(ops[5], MapOp::PortFilterOn));
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
fn adding_a_backend_swaps_the_table_in_place() {
    let mut lab = Harness::new();
    lab.reconcile(&state(vec![service("web", 30080, vec![backend(2, 1)])]));
    let kept = lab.backend_id(2);
    let old = lab.maps.services[&tcp(30080)];

    let ops = lab.reconcile(&state(vec![service(
        "web",
        30080,
        vec![backend(2, 1), backend(3, 1)],
    )]));
    assert_eq!(phases(&ops), [1, 2], "{ops:#?}");
    let MapOp::WriteTable { table, .. } = &ops[1] else {
        panic!("{ops:#?}");
    };
    assert_eq!(*table, old.table_id, "same size: swapped into its index");
    assert_eq!(
        lab.maps.services[&tcp(30080)],
        old,
        "the entry is not rewritten"
    );
    assert_eq!(lab.backend_id(2), kept, "the staying backend keeps its id");
    assert_eq!(lab.applied.tables.len(), 1);
}

#[test]
fn a_new_table_size_moves_to_a_free_index_and_frees_the_old() {
    let mut lab = Harness::new();
    let web = || service("web", 30080, vec![backend(2, 1), backend(3, 1)]);
    lab.reconcile(&state(vec![
        web(),
        service("api", 30081, vec![backend(4, 1)]),
    ]));
    let old = lab.maps.services[&tcp(30080)];
    let resized = DesiredState {
        table_size: 7,
        ..state(vec![web()])
    };
    let ops = lab.reconcile(&resized);
    let new = lab.maps.services[&tcp(30080)];
    assert_eq!((new.id, new.table_size), (old.id, 7));
    assert_ne!(new.table_id, old.table_id, "{ops:#?}");
    assert!(
        ops.contains(&MapOp::RemoveTable {
            table: old.table_id
        }),
        "{ops:#?}"
    );
    let kept: Vec<u32> = lab.maps.select.keys().copied().collect();
    assert_eq!(kept, [new.table_id], "api's table is freed too");
    // The lowest freed index (web's first, 0) is taken by the next new table.
    lab.reconcile(&DesiredState {
        table_size: 7,
        ..state(vec![web(), service("api", 30081, vec![backend(4, 1)])])
    });
    assert_eq!(old.table_id, 0);
    assert_eq!(lab.maps.services[&tcp(30081)].table_id, 0);
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
    assert_eq!(phases(&ops), [2, 5], "{ops:#?}");
    assert_eq!(
        ops.last(),
        gone.map(|id| MapOp::ClearBackend {
            id,
            family: IpFamily::V4
        })
        .as_ref()
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
                id: only_web.unwrap_or_default(),
                family: IpFamily::V4,
            },
            MapOp::RemoveTable { table: 0 },
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
    // The new port is listed first; the old one stays listed (a scan of
    // the conntrack tables unlists it).
    assert_eq!(phases(&ops), [0, 3, 4], "{ops:#?}");
    assert!(lab.maps.ports.contains(30080) && lab.maps.ports.contains(30090));
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
    if let Err(error) = apply(&mut lab.maps, &mut lab.applied, &ops) {
        panic!("{error}");
    }
    let shares: Vec<usize> = lab.maps.shares(tcp(30080)).into_values().collect();
    assert_eq!(shares.iter().sum::<usize>(), 1021);
    assert!((756..=776).contains(&shares[0]), "{shares:?}");
}

/// Without `selection.tableSize` each table is sized by its backends: a
/// service of 2 gets 251 slots, one of 20 gets 2039; the entries say so.
#[test]
fn automatic_table_sizes_follow_each_services_backends() {
    let mut lab = Harness::new();
    let desired = DesiredState {
        table_size: crate::model::DEFAULT_TABLE_SIZE,
        table_size_auto: true,
        ..state(vec![
            service(
                "small",
                30080,
                (2..4).map(|last| backend(last, 1)).collect(),
            ),
            service(
                "wide",
                30081,
                (10..30).map(|last| backend(last, 1)).collect(),
            ),
        ])
    };
    lab.reconcile(&desired);
    assert_eq!(lab.maps.services[&tcp(30080)].table_size, 251);
    assert_eq!(lab.maps.services[&tcp(30081)].table_size, 2039);
    let shares: Vec<usize> = lab.maps.shares(tcp(30081)).into_values().collect();
    assert_eq!(shares.len(), 20);
    assert!(
        shares.iter().all(|share| (97..=107).contains(share)),
        "{shares:?}"
    );
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
    assert_eq!(ops, [MapOp::AddNodeAddress(IpAddr::from([198, 18, 0, 9]))]);
    desired.node_addresses = Some(vec![IpAddr::from([198, 18, 0, 9])]);
    let ops = lab.reconcile(&desired);
    assert_eq!(
        ops,
        [MapOp::RemoveNodeAddress(IpAddr::from([198, 18, 0, 1]))]
    );
}

#[test]
fn interface_address_changes() {
    let mut lab = Harness::new();
    let desired = state(vec![]);
    lab.reconcile(&desired);
    let mut facts = node();
    let v4 = IpFamily::V4;
    facts
        .interface_addresses
        .insert((2, v4), IpAddr::from([198, 18, 0, 7]));
    facts.interface_addresses.remove(&(1, v4));
    facts
        .interface_addresses
        .insert((5, v4), IpAddr::from([198, 18, 5, 1]));
    let ops = diff(&lab.applied, &Desired::new(&desired, &facts), &capacity());
    assert_eq!(
        ops,
        Ok(vec![
            MapOp::SetInterfaceAddress {
                ifindex: 2,
                address: IpAddr::from([198, 18, 0, 7])
            },
            MapOp::SetInterfaceAddress {
                ifindex: 5,
                address: IpAddr::from([198, 18, 5, 1])
            },
            MapOp::RemoveInterfaceAddress {
                ifindex: 1,
                family: v4
            },
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
            udp_unassured_timeout_s: 5,
            ..
        })]
    ));
    // The unassured timeout (default 10 s) never outlasts the UDP timeout.
    desired.conntrack.udp_timeout_s = 30;
    desired.conntrack.udp_unassured_timeout_s = 3;
    let ops = lab.reconcile(&desired);
    assert!(matches!(
        ops[..],
        [MapOp::WriteSettings(Settings {
            udp_timeout_s: 30,
            udp_unassured_timeout_s: 3,
            ..
        })]
    ));
}

#[test]
fn one_index_is_enough_for_one_service() {
    let mut lab = Harness::new();
    let capacity = Capacity {
        tables: 1,
        ..capacity()
    };
    let mut tables = Vec::new();
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
        tables.push(lab.maps.services[&tcp(30080)].table_id);
    }
    assert_eq!(tables, [0, 0, 0, 0]);
}

#[test]
fn plans_that_do_not_fit_are_refused() {
    let applied = Applied::default();
    let desired = state(vec![
        service("a", 30001, vec![backend(2, 1)]),
        service("b", 30002, vec![backend(2, 1)]),
    ]);
    let small = Capacity {
        tables: 1,
        ..capacity()
    };
    assert_eq!(
        diff(&applied, &Desired::new(&desired, &node()), &small),
        Err(PlanError::Full {
            map: "XLB_SELECT",
            needed: 2,
            capacity: 1
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
        let active: BTreeSet<BackendAddr> = lab.maps.backends.values().map(|b| b.address).collect();
        assert_eq!(active, wanted);
        assert_eq!(lab.maps.services.len(), desired.services.len());
    }
}

fn slots_of(lab: &Harness, frontend: Frontend, last: u8) -> usize {
    let wanted = BackendAddr::from(&backend(last, 1));
    lab.maps.shares(frontend).get(&wanted).copied().unwrap_or(0)
}

fn entry(lab: &Harness, frontend: Frontend) -> ServiceEntry {
    match lab.maps.services.get(&frontend) {
        Some(entry) => *entry,
        None => panic!("no entry for {frontend}"),
    }
}

#[test]
fn tables_are_maglev_and_removal_keeps_other_slots() {
    let mut lab = Harness::new();
    let five: Vec<Backend> = (2..7).map(|last| backend(last, 1)).collect();
    let desired = DesiredState {
        table_size: 1021,
        ..state(vec![service("web", 30080, five.clone())])
    };
    let capacity = capacity();
    let plan = |lab: &Harness, desired: &DesiredState| match diff(
        &lab.applied,
        &Desired::new(desired, &node()),
        &capacity,
    ) {
        Ok(ops) => ops,
        Err(error) => panic!("{error}"),
    };
    let ops = plan(&lab, &desired);
    if let Err(error) = apply(&mut lab.maps, &mut lab.applied, &ops) {
        panic!("{error}");
    }
    let before = lab.maps.region(&entry(&lab, tcp(30080))).to_vec();
    let removed = lab.backend_id(6);
    let fewer = DesiredState {
        services: vec![service("web", 30080, five[..4].to_vec())],
        ..desired
    };
    let ops = plan(&lab, &fewer);
    if let Err(error) = apply(&mut lab.maps, &mut lab.applied, &ops) {
        panic!("{error}");
    }
    let after = lab.maps.region(&entry(&lab, tcp(30080))).to_vec();
    let moved_elsewhere = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| Some(**b) != removed && b != a)
        .count();
    // The builder is Maglev (unit-tested in maglev.rs): slots of staying
    // backends mostly stay, which the old proportional builder did not do.
    assert!(
        moved_elsewhere <= 1021 / 20,
        "{moved_elsewhere} of 1021 slots moved needlessly"
    );
}

#[test]
fn traffic_policy_and_affinity_set_service_flags() {
    let mut lab = Harness::new();
    let mut local = service("local", 30081, vec![backend(2, 1), backend(3, 1)]);
    local.external_traffic_policy = TrafficPolicy::Local;
    local.backends[0].is_local = true;
    let mut sticky = service("sticky", 30082, vec![backend(4, 1)]);
    sticky.session_affinity_timeout = Some(600);
    lab.reconcile(&state(vec![
        service("cluster", 30080, vec![backend(5, 1)]),
        local.clone(),
        sticky,
    ]));
    assert_eq!(entry(&lab, tcp(30080)).flags, SERVICE_F_MASQUERADE);
    let local_entry = entry(&lab, tcp(30081));
    assert_eq!(local_entry.flags, SERVICE_F_DROP_IF_EMPTY);
    // Only the local backend takes new flows; the other stays active (its
    // flows from before a policy change keep working).
    assert_eq!(slots_of(&lab, tcp(30081), 2), TABLE as usize);
    assert!(lab.backend_id(3).is_some());
    let sticky_entry = entry(&lab, tcp(30082));
    assert_eq!(
        sticky_entry.flags,
        SERVICE_F_MASQUERADE | SERVICE_F_AFFINITY
    );
    assert_eq!(sticky_entry.affinity_timeout_s, 600);
    assert_eq!(entry(&lab, tcp(30080)).affinity_timeout_s, 0);

    // No local backend: an empty table that drops rather than rejects.
    local.backends[0].is_local = false;
    lab.reconcile(&state(vec![local]));
    let local_entry = entry(&lab, tcp(30081));
    assert_eq!(
        (local_entry.table_size, local_entry.flags),
        (0, SERVICE_F_DROP_IF_EMPTY)
    );
}

fn with_conditions(last: u8, ready: bool, serving: bool, terminating: bool) -> Backend {
    Backend {
        ready,
        serving,
        terminating,
        ..backend(last, 1)
    }
}

#[test]
fn endpoint_conditions_as_kube_proxy() {
    let mut lab = Harness::new();
    // 2 ready, 3 terminating but serving, 4 neither ready nor serving.
    let backends = vec![
        with_conditions(2, true, true, false),
        with_conditions(3, false, true, true),
        with_conditions(4, false, false, true),
    ];
    lab.reconcile(&state(vec![service("web", 30080, backends)]));
    assert_eq!(slots_of(&lab, tcp(30080), 2), TABLE as usize);
    let terminating = lab.backend_id(3).map(|id| lab.maps.backends[&id]);
    assert_eq!(
        terminating.map(|b| b.terminating),
        Some(true),
        "kept active for its flows, flagged, and out of the table"
    );
    assert_eq!(
        lab.backend_id(4),
        None,
        "not serving and not ready: removed"
    );

    // The ready one goes: the table is built from the serving terminating one.
    let ops = lab.reconcile(&state(vec![service(
        "web",
        30080,
        vec![
            with_conditions(2, false, false, true),
            with_conditions(3, false, true, true),
        ],
    )]));
    assert_eq!(slots_of(&lab, tcp(30080), 3), TABLE as usize);
    assert_eq!(lab.backend_id(2), None);
    assert!(
        matches!(ops.last(), Some(MapOp::ClearBackend { .. })),
        "the backend is cleared after the table flip: {ops:#?}"
    );

    // Ready again: the flag is cleared before the table that uses it.
    let ops = lab.reconcile(&state(vec![service(
        "web",
        30080,
        vec![with_conditions(3, true, true, false)],
    )]));
    assert!(matches!(
        ops[0],
        MapOp::WriteBackend {
            backend: ActiveBackend {
                terminating: false,
                ..
            },
            ..
        }
    ));
    let id = lab.backend_id(3).unwrap_or_default();
    assert!(!lab.maps.backends[&id].terminating);

    // Nothing serving: no table, so new flows are rejected.
    lab.reconcile(&state(vec![service(
        "web",
        30080,
        vec![with_conditions(3, false, false, true)],
    )]));
    assert_eq!(entry(&lab, tcp(30080)).table_size, 0);
    assert!(lab.maps.backends.is_empty());
}

#[test]
fn local_policy_falls_back_to_local_terminating_backends() {
    let mut web = service(
        "web",
        30080,
        vec![
            with_conditions(2, true, true, false), // remote, ready
            with_conditions(3, false, true, true), // local, terminating
        ],
    );
    web.external_traffic_policy = TrafficPolicy::Local;
    web.backends[1].is_local = true;
    let backends = desired_backends(&web);
    let selectable: Vec<bool> = backends.iter().map(|b| b.selectable).collect();
    assert_eq!(selectable, [false, true]);
}

#[test]
fn shared_backend_is_terminating_only_if_every_service_says_so() {
    let mut lab = Harness::new();
    lab.reconcile(&state(vec![
        service(
            "a",
            30001,
            vec![with_conditions(2, false, true, true), backend(3, 1)],
        ),
        service("b", 30002, vec![backend(2, 1)]),
    ]));
    let id = lab.backend_id(2).unwrap_or_default();
    assert!(!lab.maps.backends[&id].terminating);
    lab.reconcile(&state(vec![service(
        "a",
        30001,
        vec![with_conditions(2, false, true, true), backend(3, 1)],
    )]));
    assert!(lab.maps.backends[&id].terminating);
}

fn frontend_ip(last: u8) -> IpAddr {
    IpAddr::from([198, 18, 200, last])
}

fn exact(last: u8) -> Frontend {
    Frontend::exact(Protocol::Tcp, frontend_ip(last), 80)
}

#[test]
fn frontends_share_the_service_entry() {
    let mut lab = Harness::new();
    let mut web = service("web", 30080, vec![backend(2, 1)]);
    web.port = 80;
    web.frontends = vec![frontend_ip(10), frontend_ip(11)];
    lab.reconcile(&state(vec![web.clone()]));
    let node_port = entry(&lab, tcp(30080));
    assert_eq!(entry(&lab, exact(10)), node_port);
    assert_eq!(entry(&lab, exact(11)), node_port);

    // Dropping a frontend removes only its entry.
    web.frontends = vec![frontend_ip(11)];
    let ops = lab.reconcile(&state(vec![web.clone()]));
    assert_eq!(
        ops,
        [MapOp::RemoveService {
            frontend: exact(10)
        }]
    );

    // A service with frontends only.
    web.node_port = 0;
    let ops = lab.reconcile(&state(vec![web]));
    assert_eq!(
        ops,
        [MapOp::RemoveService {
            frontend: tcp(30080)
        }]
    );
    assert_eq!(lab.maps.services.len(), 1);
}

#[test]
fn source_ranges_guard_frontends_and_are_written_first() {
    let mut lab = Harness::new();
    let mut web = service("web", 30080, vec![backend(2, 1)]);
    web.port = 80;
    web.frontends = vec![frontend_ip(10)];
    web.source_ranges = vec![(IpAddr::from([198, 18, 0, 9]), 24)];
    let ops = lab.reconcile(&state(vec![web.clone()]));
    let id = lab.id_of("web");
    let range = |network: [u8; 4], prefix_len| SourceRangeKey {
        service_id: id,
        network: IpAddr::from(network),
        prefix_len,
    };
    assert_eq!(
        lab.applied
            .source_ranges
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        [range([198, 18, 0, 0], 24)],
        "host bits cleared"
    );
    let add = ops
        .iter()
        .position(|op| matches!(op, MapOp::AddSourceRange(_)));
    let guarded = ops.iter().position(
        |op| matches!(op, MapOp::WriteService { entry, .. } if entry.flags & SERVICE_F_SOURCE_RANGES != 0),
    );
    assert!(add < guarded && guarded.is_some(), "{ops:#?}");
    // As kube-proxy: the load-balancer address is guarded, the NodePort not.
    assert_eq!(
        entry(&lab, exact(10)).flags & SERVICE_F_SOURCE_RANGES,
        SERVICE_F_SOURCE_RANGES
    );
    assert_eq!(entry(&lab, tcp(30080)).flags & SERVICE_F_SOURCE_RANGES, 0);

    // Changing the ranges: the new one is added before, the old one removed
    // after (the fake checks a guarded entry never lacks ranges).
    web.source_ranges = vec![(IpAddr::from([198, 19, 0, 0]), 16)];
    let ops = lab.reconcile(&state(vec![web.clone()]));
    assert_eq!(
        ops,
        [
            MapOp::AddSourceRange(range([198, 19, 0, 0], 16)),
            MapOp::RemoveSourceRange(range([198, 18, 0, 0], 24)),
        ]
    );

    // Without frontends the NodePort is what the ranges guard.
    web.frontends.clear();
    lab.reconcile(&state(vec![web.clone()]));
    assert_eq!(
        entry(&lab, tcp(30080)).flags & SERVICE_F_SOURCE_RANGES,
        SERVICE_F_SOURCE_RANGES
    );

    // No ranges: the flag goes first, then the ranges.
    web.source_ranges.clear();
    let ops = lab.reconcile(&state(vec![web.clone()]));
    assert_eq!(phases(&ops), [3, 5], "{ops:#?}");
    assert!(lab.maps.source_ranges.is_empty());

    // A removed service's ranges go after its entry.
    web.source_ranges = vec![(IpAddr::from([198, 19, 0, 0]), 16)];
    lab.reconcile(&state(vec![web]));
    let ops = lab.reconcile(&state(vec![]));
    assert_eq!(phases(&ops), [4, 5, 5, 5], "{ops:#?}");
    assert!(lab.applied.source_ranges.is_empty());
}

#[test]
fn source_ranges_must_fit() {
    let mut web = service("web", 30080, vec![backend(2, 1)]);
    web.source_ranges = (0..3)
        .map(|i| (IpAddr::from([198, 18, i, 0]), 24))
        .collect();
    let small = Capacity {
        source_ranges: 2,
        ..capacity()
    };
    let result = diff(
        &Applied::default(),
        &Desired::new(&state(vec![web]), &node()),
        &small,
    );
    assert_eq!(
        result,
        Err(PlanError::Full {
            map: "XLB_SOURCE_RANGES",
            needed: 3,
            capacity: 2
        })
    );
}

/// An agent restarted on pinned maps adopts them: what it reads back (no
/// tables: those are opened by id) plus the names of the services that own
/// the frontends plans only each table anew, in place, with the same slots.
#[test]
fn adopted_maps_keep_ids_and_tables_and_rewrite_tables_in_place() {
    let mut lab = Harness::new();
    let mut web = service("web", 30080, vec![backend(2, 1), backend(3, 2)]);
    web.port = 80;
    web.frontends = vec![frontend_ip(10)];
    web.source_ranges = vec![(IpAddr::from([198, 18, 0, 0]), 24)];
    let desired = state(vec![web, service("api", 30081, vec![backend(2, 1)])]);
    lab.reconcile(&desired);

    let mut adopted = lab.applied.clone();
    for service in adopted.services.values_mut() {
        service.name.clear();
    }
    adopted.tables.clear();
    // A frontend no desired service claims stays unnamed and goes.
    adopted.services.insert(
        tcp(30999),
        AppliedService {
            name: String::new(),
            entry: entry(&lab, tcp(30081)),
        },
    );
    adopted.adopt_names(&Desired::new(&desired, &node()));
    let ops = diff(&adopted, &Desired::new(&desired, &node()), &capacity());
    let Ok(ops) = ops else { panic!("{ops:?}") };
    let mut rewritten = BTreeMap::new();
    for op in &ops[..2] {
        let MapOp::WriteTable { table, recipe } = op else {
            panic!("{ops:#?}")
        };
        rewritten.insert(*table, recipe.build());
    }
    assert_eq!(rewritten, lab.maps.select, "same indexes, same slots");
    assert_eq!(
        ops[2..],
        [MapOp::RemoveService {
            frontend: tcp(30999)
        }]
    );
    assert_eq!(adopted.services[&exact(10)].name, "default/web");
    // Before that plan is applied, no socket's backend counts as gone.
    let kept = BackendAddr::from(&backend(3, 1));
    assert!(adopted.socket_keeps_backend(entry(&lab, tcp(30080)).id, kept));
    // An adopted service that goes takes its (unread) table with it.
    let ops = diff(
        &adopted,
        &Desired::new(&state(vec![]), &node()),
        &capacity(),
    );
    let Ok(ops) = ops else { panic!("{ops:?}") };
    let removed: BTreeSet<u32> = ops
        .iter()
        .filter_map(|op| match op {
            MapOp::RemoveTable { table } => Some(*table),
            _ => None,
        })
        .collect();
    let tables: BTreeSet<u32> = lab.maps.select.keys().copied().collect();
    assert_eq!(removed, tables);
}

#[test]
fn a_frontend_claimed_twice_belongs_to_the_first_service_and_converges() {
    let mut lab = Harness::new();
    // `reconcile` asserts that a second plan is empty.
    lab.reconcile(&state(vec![
        service("first", 30080, vec![backend(2, 1)]),
        service("second", 30080, vec![backend(3, 1)]),
    ]));
    assert_eq!(lab.maps.services.len(), 1);
    assert_eq!(entry(&lab, tcp(30080)).id, lab.id_of("first"));
}

/// A load-balancer IP or externalIP that is an address of the node would
/// take over the node's own port there: it is left out and reported,
/// unless the config allows that address.
#[test]
fn frontends_on_node_addresses_are_refused_unless_allowed() {
    let node_ip = IpAddr::from([198, 18, 0, 1]);
    let outside = IpAddr::from([198, 18, 9, 9]);
    let mut web = service("web", 30080, vec![backend(2, 1)]);
    web.port = 22;
    web.frontends = vec![node_ip, outside, IpAddr::from(Ipv4Addr::LOCALHOST)];
    let mut node = node();
    node.local_addresses.insert(node_ip);
    let desired = Desired::new(&state(vec![web.clone()]), &node);
    let written: Vec<Frontend> = desired.services[0]
        .frontends
        .iter()
        .map(|(frontend, _)| *frontend)
        .collect();
    assert!(written.contains(&Frontend::exact(Protocol::Tcp, outside, 22)));
    assert!(!written.contains(&Frontend::exact(Protocol::Tcp, node_ip, 22)));
    assert_eq!(
        desired
            .refused
            .iter()
            .map(|refused| refused.address)
            .collect::<Vec<_>>(),
        [node_ip, IpAddr::from(Ipv4Addr::LOCALHOST)]
    );
    let message = desired.refused[0].to_string();
    assert!(message.contains("default/web"), "{message}");
    assert!(
        message.contains("node.allowedFrontendAddresses"),
        "{message}"
    );

    let allowed = DesiredState {
        allowed_frontend_addresses: vec![node_ip],
        ..state(vec![web])
    };
    let desired = Desired::new(&allowed, &node);
    assert!(
        desired.services[0]
            .frontends
            .iter()
            .any(|(frontend, _)| *frontend == Frontend::exact(Protocol::Tcp, node_ip, 22))
    );
    assert_eq!(desired.refused.len(), 1, "loopback stays refused");
}

/// In Kubernetes mode one Service too many must not stop every later
/// update: the services that fit are planned, those already serving first,
/// and the rest are named as skipped.
#[test]
fn what_does_not_fit_is_skipped_not_everything() {
    let mut lab = Harness::new();
    // "zz-old" serves already; with the name order alone it would go last.
    let old = service("zz-old", 30100, vec![backend(2, 1)]);
    lab.reconcile(&state(vec![old.clone()]));
    let mut services = vec![old];
    services.extend((0..20u16).map(|index| {
        service(
            &format!("new-{index:02}"),
            30000 + index,
            vec![backend(3, 1)],
        )
    }));
    let desired = Desired::new(&state(services), &node());
    assert!(
        diff(&lab.applied, &desired, &capacity()).is_err(),
        "the whole does not fit"
    );
    let Fitted { ops, skipped, why } = match diff_fitting(&lab.applied, &desired, &capacity()) {
        Ok(planned) => planned,
        Err(error) => panic!("{error}"),
    };
    assert!(why.is_some());
    assert!(!skipped.is_empty() && skipped.len() < 20, "{skipped:?}");
    assert!(!skipped.contains(&String::from("default/zz-old")));
    // Those that fit are the first by name; the skipped ones the last.
    assert_eq!(skipped.last().map(String::as_str), Some("default/new-19"));
    if let Err(error) = apply(&mut lab.maps, &mut lab.applied, &ops) {
        panic!("{error}");
    }
    let names: BTreeSet<&str> = lab
        .applied
        .services
        .values()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names.len(), 21 - skipped.len());
    assert!(names.contains("default/zz-old") && names.contains("default/new-00"));
}

#[test]
fn cluster_ips_share_the_table_when_both_policies_agree() {
    let mut web = service("web", 30080, vec![backend(1, 1), backend(2, 1)]);
    web.port = 80;
    web.cluster_ips = vec![IpAddr::from([198, 19, 0, 10])];
    web.session_affinity_timeout = Some(60);
    let desired = Desired::new(&state(vec![web]), &node());
    assert_eq!(desired.services.len(), 1);
    let frontends = &desired.services[0].frontends;
    let cluster = Frontend::exact(Protocol::Tcp, IpAddr::from([198, 19, 0, 10]), 80);
    assert_eq!(
        frontends,
        &[
            (
                Frontend::node_port(Protocol::Tcp, 30080),
                SERVICE_F_MASQUERADE | SERVICE_F_AFFINITY
            ),
            (cluster, SERVICE_F_MASQUERADE | SERVICE_F_AFFINITY),
        ]
    );
}

#[test]
fn internal_traffic_policy_local_gives_cluster_ips_their_own_table() {
    let mut local = backend(1, 1);
    local.is_local = true;
    let mut web = service("web", 30080, vec![local, backend(2, 1)]);
    web.port = 80;
    web.cluster_ips = vec![IpAddr::from([198, 19, 0, 10])];
    web.internal_traffic_policy = TrafficPolicy::Local;
    let desired = Desired::new(&state(vec![web.clone()]), &node());
    let names: Vec<&str> = desired.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/web", "default/web (cluster IP)"]);
    let internal = &desired.services[1];
    assert_eq!(
        internal.frontends,
        [(
            Frontend::exact(Protocol::Tcp, IpAddr::from([198, 19, 0, 10]), 80),
            SERVICE_F_MASQUERADE | SERVICE_F_DROP_IF_EMPTY
        )]
    );
    let selectable: Vec<IpAddr> = internal
        .backends
        .iter()
        .filter(|b| b.selectable)
        .map(|b| b.address.address)
        .collect();
    assert_eq!(selectable, [IpAddr::from([198, 18, 1, 1])]);
    let ops = diff(&Applied::default(), &desired, &capacity()).expect("fits");
    let ids: BTreeSet<u32> = ops
        .iter()
        .filter_map(|op| match op {
            MapOp::WriteService { entry, .. } => Some(entry.id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2, "two tables, two ids: {ops:#?}");

    // A ClusterIP-only service keeps its plain name.
    web.node_port = 0;
    let desired = Desired::new(&state(vec![web]), &node());
    let names: Vec<&str> = desired.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/web"]);
}

#[test]
fn sockets_keep_selectable_and_terminating_backends_only() {
    let mut lab = Harness::new();
    let web = |backends| state(vec![service("web", 30080, backends)]);
    lab.reconcile(&web(vec![backend(2, 1), backend(3, 1), backend(4, 1)]));
    let id = lab.id_of("web");
    let keeps = |lab: &Harness, last: u8| {
        lab.applied
            .socket_keeps_backend(id, BackendAddr::from(&backend(last, 1)))
    };
    assert!(keeps(&lab, 2) && keeps(&lab, 3) && keeps(&lab, 4));
    assert_eq!(lab.applied.service_protocol(id), Some(Protocol::Tcp));
    // 3 removed, 4 terminating but serving: only 3's sockets must move.
    lab.reconcile(&web(vec![
        backend(2, 1),
        with_conditions(4, false, true, true),
    ]));
    assert!(keeps(&lab, 2) && !keeps(&lab, 3) && keeps(&lab, 4));
    // A removed service keeps nothing.
    lab.reconcile(&state(Vec::new()));
    assert!(!keeps(&lab, 2));
    assert_eq!(lab.applied.service_protocol(id), None);
}

/// A freed backend id is not handed to the next new backend while ids never
/// used remain (flows and affinity records may still name it); once they run
/// out, freed ids come back oldest first.
#[test]
fn freed_backend_ids_are_reused_last_and_oldest_first() {
    let mut lab = Harness::new();
    lab.reconcile(&state(vec![service("web", 30080, vec![backend(2, 1)])]));
    let first = lab.backend_id(2).expect("id");
    // The pod goes and another comes: the new one does not get its id.
    lab.reconcile(&state(vec![service("web", 30080, vec![backend(3, 1)])]));
    let second = lab.backend_id(3).expect("id");
    assert_ne!(second, first, "a freed id was reused at once");
    assert!(second > first);
    // Churn through every id the capacity (64) allows: 3 ... 62.
    for last in 4..=63u8 {
        lab.reconcile(&state(vec![service("web", 30080, vec![backend(last, 1)])]));
    }
    assert_eq!(lab.applied.next_backend_id, 63);
    lab.reconcile(&state(vec![service("web", 30080, vec![backend(64, 1)])]));
    assert_eq!(lab.backend_id(64), Some(63), "the last id never used");
    // Ids are now used up: the oldest freed one (the first pod's) comes back.
    lab.reconcile(&state(vec![service("web", 30080, vec![backend(65, 1)])]));
    assert_eq!(lab.backend_id(65), Some(first));
    lab.reconcile(&state(vec![service("web", 30080, vec![backend(66, 1)])]));
    assert_eq!(lab.backend_id(66), Some(second));
}

#[test]
fn a_removed_port_stays_listed_until_no_flow_uses_it() {
    let mut lab = Harness::new();
    let both = state(vec![
        service("a", 30001, vec![backend(2, 1)]),
        service("b", 30002, vec![backend(3, 1)]),
    ]);
    lab.reconcile(&both);
    let only_b = state(vec![service("b", 30002, vec![backend(3, 1)])]);
    lab.reconcile(&only_b);
    assert!(lab.maps.ports.contains(30001), "a reconcile never unlists");
    assert!(ports_lingering(&lab.applied));
    let in_use: PortSet = [30001].into_iter().collect();
    assert_eq!(prune_ports(&lab.applied, &in_use), []);
    let ops = prune_ports(&lab.applied, &PortSet::default());
    if let Err(error) = apply(&mut lab.maps, &mut lab.applied, &ops) {
        panic!("{error}");
    }
    assert!(!lab.maps.ports.contains(30001));
    assert!(
        lab.maps.ports.contains(30002),
        "a port in use by a service is never unlisted"
    );
    assert!(!ports_lingering(&lab.applied));
    assert_eq!(lab.plan(&only_b), []);
}

/// Maps made anew at other sizes (they grew) give each backend and service
/// the id the old maps gave it: flows name their backend by id, and the
/// same recipes build the same tables.
#[test]
fn kept_ids_go_to_the_same_backends_and_services() {
    let config = state(vec![
        service("a", 30001, vec![backend(2, 1), backend(3, 1)]),
        service("b", 30002, vec![backend(4, 1)]),
    ]);
    let mut old = Harness::new();
    // A service and a backend that came and went: the ids are not those
    // a fresh plan would give.
    old.reconcile(&state(vec![service("x", 30009, vec![backend(9, 1)])]));
    old.reconcile(&config);
    let kept = KeptIds {
        backends: old
            .applied
            .backends
            .iter()
            .map(|(&id, active)| (active.address, id))
            .collect(),
        services: old
            .applied
            .services
            .iter()
            .map(|(&frontend, service)| (frontend, service.entry.id))
            .collect(),
    };
    let mut new = Harness {
        maps: FakeMaps::new(),
        applied: kept.clone().into_applied(),
    };
    new.reconcile(&config);
    assert_eq!(new.applied.backends, old.applied.backends);
    for (name, port) in [("a", 30001), ("b", 30002)] {
        assert_eq!(new.id_of(name), old.id_of(name), "{name}");
        let table =
            |lab: &Harness| lab.maps.select[&lab.maps.services[&tcp(port)].table_id].clone();
        assert_eq!(table(&new), table(&old), "{name}'s slots");
    }
    // What is new gets ids no kept entry has.
    let mut grown = config.clone();
    grown
        .services
        .push(service("c", 30003, vec![backend(5, 1)]));
    new.reconcile(&grown);
    let c = new.id_of("c");
    assert!(kept.services.values().all(|&id| id != c), "service id {c}");
    let five = new.backend_id(5).unwrap_or_default();
    assert!(
        five != 0 && kept.backends.values().all(|&id| id != five),
        "backend id {five}"
    );
}

#[test]
fn a_dual_stack_service_has_a_table_per_family() {
    let ip = |text: &str| -> IpAddr { text.parse().unwrap_or_else(|e| panic!("{e}")) };
    let mut web = service("web", 30080, vec![backend(2, 1)]);
    web.backends.push(Backend {
        address: ip("2001:db8:1::2"),
        port: 8080,
        ..Backend::default()
    });
    web.port = 80;
    web.frontends = vec![ip("2001:db8:ff::1")];
    web.source_ranges = vec![(ip("198.18.77.0"), 24)];
    let mut desired_state = state(vec![web]);
    desired_state.node_addresses = Some(vec![ip("198.18.0.1"), ip("2001:db8::1")]);
    let desired = Desired::new(&desired_state, &node());
    let names: Vec<&str> = desired.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/web", "default/web (IPv6)"]);
    let (v4, v6) = (&desired.services[0], &desired.services[1]);
    let tcp = Protocol::Tcp;
    assert_eq!(
        v4.frontends,
        [(
            Frontend::node_port(tcp, 30080),
            SERVICE_F_MASQUERADE | SERVICE_F_SOURCE_RANGES
        )]
    );
    // The ranges are all IPv4: IPv6 sources may open no flow at all, never
    // every source.
    assert_eq!(
        v6.frontends,
        [
            (
                Frontend::node_port_in(IpFamily::V6, tcp, 30080),
                SERVICE_F_MASQUERADE
            ),
            (
                Frontend::exact(tcp, ip("2001:db8:ff::1"), 80),
                SERVICE_F_MASQUERADE | SERVICE_F_SOURCE_RANGES
            ),
        ]
    );
    assert!(v6.source_ranges.is_empty());
    let addresses = |s: &DesiredService| -> Vec<IpAddr> {
        s.backends.iter().map(|b| b.address.address).collect()
    };
    assert_eq!(addresses(v4), [ip("198.18.1.2")]);
    assert_eq!(addresses(v6), [ip("2001:db8:1::2")]);

    let mut lab = Harness::new();
    let ops = lab.reconcile(&desired_state);
    assert!(
        ops.contains(&MapOp::AddNodeAddress(ip("2001:db8::1"))),
        "{ops:?}"
    );
    let v6_backend = ops.iter().find_map(|op| match op {
        MapOp::WriteBackend { id, backend } if backend.address.address.is_ipv6() => Some(*id),
        _ => None,
    });
    let v6_entry = lab
        .applied
        .services
        .get(&Frontend::node_port_in(IpFamily::V6, tcp, 30080))
        .map(|service| service.entry);
    let v4_entry = lab.applied.services[&Frontend::node_port(tcp, 30080)].entry;
    let v6_entry = v6_entry.unwrap_or_else(|| panic!("no IPv6 NodePort in {ops:?}"));
    assert_ne!(v6_entry.id, v4_entry.id);
    assert_ne!(v6_entry.table_id, v4_entry.table_id);
    assert!(v6_backend.is_some());
}

#[test]
fn removing_an_ipv6_backend_rewrites_its_table_and_clears_it() {
    let ip = |text: &str| -> IpAddr { text.parse().unwrap_or_else(|e| panic!("{e}")) };
    let v6 = |address: &str| Backend {
        address: ip(address),
        port: 4444,
        ..Backend::default()
    };
    let mut lab = Harness::new();
    let both = vec![v6("2001:db8:1::2"), v6("2001:db8:2::2")];
    lab.reconcile(&state(vec![service("stream", 30981, both)]));
    let one = vec![v6("2001:db8:1::2")];
    let ops = lab.reconcile(&state(vec![service("stream", 30981, one)]));
    assert!(
        ops.iter().any(|op| matches!(op, MapOp::WriteTable { .. })),
        "{ops:?}"
    );
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
}
