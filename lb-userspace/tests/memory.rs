//! What the agent's structures weigh at 10,000 Services with 100,000
//! backends: a counting allocator around each step of an apply (parse,
//! plan, record, catalog), without a kernel. Run with
//! `cargo test --release -p lb-userspace --test memory -- --ignored --nocapture`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use xlb::observe::catalog::CatalogRows;
use xlb::reconcile::{self, Applied, Capacity, Desired, NodeFacts};
use xlb::source::yaml::{self, Overrides};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let live = if new_size >= layout.size() {
            LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size()
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed) - (layout.size() - new_size)
        };
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: as GlobalAlloc::realloc requires, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// Prints the live heap and the peak since the last step.
fn step(name: &str) {
    let live = LIVE.load(Ordering::Relaxed);
    let peak = PEAK.swap(live, Ordering::Relaxed);
    println!(
        "{name:<28} live {:>7.1} MB  peak {:>7.1} MB",
        mb(live),
        mb(peak)
    );
}

/// The scale bench's config: 10 backends a service, 65,536 pod addresses.
fn big_yaml(services: usize) -> String {
    let mut out = String::from(
        "node:\n  interfaces: [lo]\n  addresses: [198.18.0.1]\nmasquerade:\n  portRange: \"1024-65535\"\nselection:\n  tableSize: 251\nservices:\n",
    );
    for index in 0..services {
        let _ = write!(
            out,
            "  - name: svc-{index}\n    namespace: bench\n    protocol: UDP\n    nodePort: {}\n    backends:\n",
            20_000 + index
        );
        for backend in 0..10 {
            let n = index * 10 + backend;
            let address = u32::from_be_bytes([198, 19, 0, 0]) + (n % 65_536) as u32;
            let _ = writeln!(
                out,
                "      - {{address: {}, port: {}}}",
                std::net::Ipv4Addr::from(address),
                8_000 + n / 65_536
            );
        }
    }
    out
}

#[test]
#[ignore = "a measurement: run it by name with --nocapture"]
fn heap_of_a_big_apply() {
    let text = big_yaml(10_000);
    step("config text");
    let config = yaml::parse("big.yaml", &text, &Overrides::default()).expect("valid");
    drop(text);
    step("parsed (text dropped)");
    let desired = Desired::new(&config.state, &NodeFacts::default());
    step("desired");
    let capacity = Capacity::default();
    let mut applied = Applied::default();
    let ops = reconcile::diff(&applied, &desired, &capacity).expect("fits");
    step("planned");
    for op in &ops {
        applied.record(op);
    }
    drop(ops);
    drop(desired);
    step("recorded (ops dropped)");
    let catalog = CatalogRows::build(2, &config.state, &applied);
    step("catalog");
    drop(catalog);
    step("catalog dropped");
    drop(applied);
    step("applied dropped");
    drop(config);
    step("config dropped");
}

/// The scale bench's cluster: a NodePort Service and an EndpointSlice of
/// 10 ready endpoints each.
fn big_cluster(services: usize) -> xlb::source::kube::ClusterSnapshot {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: Some(String::from("bench")),
        ..ObjectMeta::default()
    };
    let mut snapshot = xlb::source::kube::ClusterSnapshot::default();
    for index in 0..services {
        let name = format!("svc-{index}");
        let port = 8_000 + (index * 10 / 65_536) as i32;
        snapshot.insert_service(Service {
            metadata: meta(name.clone()),
            spec: Some(ServiceSpec {
                type_: Some(String::from("NodePort")),
                ports: Some(vec![ServicePort {
                    protocol: Some(String::from("UDP")),
                    port: 80,
                    target_port: Some(IntOrString::Int(port)),
                    node_port: Some(20_000 + index as i32),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        });
        let mut metadata = meta(format!("{name}-{index}"));
        metadata.labels = Some(BTreeMap::from([(
            String::from("kubernetes.io/service-name"),
            name,
        )]));
        let endpoints = (0..10)
            .map(|backend| {
                let n = index * 10 + backend;
                let address = u32::from_be_bytes([198, 19, 0, 0]) + (n % 65_536) as u32;
                Endpoint {
                    addresses: vec![std::net::Ipv4Addr::from(address).to_string()],
                    ..Endpoint::default()
                }
            })
            .collect();
        snapshot.insert_endpoint_slice(EndpointSlice {
            metadata,
            address_type: String::from("IPv4"),
            endpoints,
            ports: Some(vec![EndpointPort {
                name: Some(String::new()),
                port: Some(port),
                protocol: Some(String::from("UDP")),
                ..EndpointPort::default()
            }]),
        });
    }
    snapshot
}

#[test]
#[ignore = "a measurement: run it by name with --nocapture"]
fn heap_of_a_big_cluster() {
    step("start");
    let snapshot = big_cluster(10_000);
    step("cluster objects");
    let base = yaml::parse(
        "node.yaml",
        "node:\n  interfaces: [lo]\n  addresses: [198.18.0.1]\nselection:\n  tableSize: 251\n",
        &Overrides::default(),
    )
    .expect("valid")
    .state;
    let node = xlb::source::kube::NodeInfo::new(Some(String::from("bench-node")), None);
    let state = xlb::source::kube::desired_state(&snapshot, &node, &base);
    step("translated");
    let desired = Desired::new(&state, &NodeFacts::default());
    let capacity = Capacity::default();
    let mut applied = Applied::default();
    let ops = reconcile::diff(&applied, &desired, &capacity).expect("fits");
    for op in &ops {
        applied.record(op);
    }
    drop(ops);
    drop(desired);
    step("recorded (ops dropped)");
    let catalog = CatalogRows::build(2, &state, &applied);
    step("catalog");
    drop((catalog, applied));
    step("catalog, applied dropped");
    drop(state);
    step("state dropped");
    drop(snapshot);
    step("objects dropped");
}
