//! The translation, object by object: each test states the Kubernetes
//! objects as JSON (as the API sends them) and the state xlb derives.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use super::*;
use crate::model::{DEFAULT_AFFINITY_TIMEOUT_S, IpFamily, MAX_AFFINITY_TIMEOUT_S};
const NODE: &str = "node-a";

fn base() -> DesiredState {
    DesiredState {
        interfaces: vec![String::from("eth0")],
        ..DesiredState::default()
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        name: Some(NODE.to_owned()),
        addresses: Vec::new(),
    }
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    match serde_json::from_value(value) {
        Ok(object) => object,
        Err(error) => panic!("test object does not parse: {error}"),
    }
}

/// A Service `name` in `default` with `spec`.
fn service(name: &str, spec: Value) -> KubeService {
    from_json(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
}

/// An IPv4 EndpointSlice of `service` with `ports` and `endpoints`.
fn slice(name: &str, service: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    from_json(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
}

/// Service `svc`: NodePort 30080, port 80.
fn svc_node_port() -> KubeService {
    service(
        "svc",
        json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
    )
}

/// An EndpointSlice of `svc` on port 8080.
fn svc_slice(name: &str, endpoints: Value) -> EndpointSlice {
    slice(name, "svc", json!([{"port": 8080}]), endpoints)
}

fn endpoint(address: &str) -> Value {
    json!({"addresses": [address], "conditions": {"ready": true}, "nodeName": "node-b"})
}

fn snapshot(services: Vec<KubeService>, slices: Vec<EndpointSlice>) -> ClusterSnapshot {
    let mut snapshot = ClusterSnapshot::default();
    for service in services {
        snapshot.insert_service(service);
    }
    for slice in slices {
        snapshot.insert_endpoint_slice(slice);
    }
    snapshot
}

fn ip(text: &str) -> IpAddr {
    match text.parse() {
        Ok(ip) => ip,
        Err(error) => panic!("{text}: {error}"),
    }
}

/// The backends of `service` new flows may go to, as the reconciler picks
/// them from the conditions the translation carried: "address:port".
fn selectable(service: &Service) -> Vec<String> {
    crate::model::desired_backends(service)
        .into_iter()
        .filter(|backend| backend.selectable)
        .map(|backend| backend.address.to_string())
        .collect()
}

/// (name, protocol, nodePort, backends new flows may use as
/// "address:port") of each service.
fn summary(state: &DesiredState) -> Vec<(String, Protocol, u16, Vec<String>)> {
    state
        .services
        .iter()
        .map(|service| {
            let backends = selectable(service);
            (
                service.qualified_name(),
                service.protocol,
                service.node_port,
                backends,
            )
        })
        .collect()
}

fn tcp_echo() -> ClusterSnapshot {
    snapshot(
        vec![service(
            "tcp-echo",
            json!({"type": "NodePort", "ports": [{"port": 3333, "nodePort": 30999}]}),
        )],
        vec![slice(
            "tcp-echo-abc",
            "tcp-echo",
            json!([{"port": 3333, "protocol": "TCP"}]),
            json!([endpoint("198.18.2.2"), endpoint("198.18.1.2")]),
        )],
    )
}

#[test]
fn node_port_service_becomes_a_model_service() {
    let state = desired_state(&tcp_echo(), &node(), &base());
    assert_eq!(
        summary(&state),
        [(
            String::from("default/tcp-echo"),
            Protocol::Tcp,
            30999,
            vec![
                String::from("198.18.1.2:3333"),
                String::from("198.18.2.2:3333")
            ],
        )]
    );
    let backend = &state.services[0].backends[0];
    assert_eq!(backend.weight, 1);
    assert_eq!(backend.name, None);
}

#[test]
fn base_settings_are_kept_and_its_services_replaced() {
    let mut base = base();
    base.interfaces = vec![String::from("xlb-c"), String::from("xlb-b1")];
    base.table_size = 65_537;
    base.services = vec![Service {
        name: String::from("from-config"),
        namespace: String::from("default"),
        protocol: Protocol::Udp,
        node_port: 31000,
        ..Service::default()
    }];
    let state = desired_state(&tcp_echo(), &node(), &base);
    assert_eq!(state.interfaces, base.interfaces);
    assert_eq!(state.table_size, 65_537);
    assert_eq!(state.conntrack, base.conntrack);
    assert_eq!(state.masquerade_ports, base.masquerade_ports);
    assert_eq!(state.services.len(), 1);
    assert_eq!(state.services[0].name, "tcp-echo");
}

#[test]
fn empty_snapshot_has_no_services() {
    let state = desired_state(&ClusterSnapshot::default(), &node(), &base());
    assert_eq!(state.services, []);
    assert_eq!(state.interfaces, ["eth0"]);
}

#[test]
fn named_ports_resolve_per_slice() {
    // targetPort by name: each slice says which number the name has on its
    // pods (here the two slices' pods listen on different numbers).
    let snapshot = snapshot(
        vec![service(
            "web",
            json!({"type": "NodePort", "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053},
            ]}),
        )],
        vec![
            slice(
                "web-1",
                "web",
                json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
                json!([endpoint("10.0.0.1")]),
            ),
            slice(
                "web-2",
                "web",
                json!([{"name": "http", "port": 9090}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
                json!([endpoint("10.0.0.2")]),
            ),
        ],
    );
    let state = desired_state(&snapshot, &node(), &base());
    assert_eq!(
        summary(&state),
        [
            (
                String::from("default/web:http"),
                Protocol::Tcp,
                30080,
                vec![String::from("10.0.0.1:8080"), String::from("10.0.0.2:9090")],
            ),
            (
                String::from("default/web:dns"),
                Protocol::Udp,
                30053,
                vec![String::from("10.0.0.1:5353"), String::from("10.0.0.2:5353")],
            ),
        ]
    );
}

#[test]
fn slice_port_must_match_name_and_protocol() {
    let snapshot = snapshot(
        vec![service(
            "dns",
            json!({"type": "NodePort", "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]}),
        )],
        vec![slice(
            "dns-1",
            "dns",
            // Right name, wrong protocol; wrong name, right protocol.
            json!([{"name": "dns", "port": 53, "protocol": "TCP"}, {"name": "other", "port": 54, "protocol": "UDP"}]),
            json!([endpoint("10.0.0.1")]),
        )],
    );
    let state = desired_state(&snapshot, &node(), &base());
    assert_eq!(summary(&state)[0].3, Vec::<String>::new());
}

#[test]
fn slice_port_without_number_means_the_target_port() {
    // One endpoint, in a slice whose port has no number.
    let unnumbered = |service: KubeService| {
        snapshot(
            vec![service],
            vec![slice(
                "svc-1",
                "svc",
                json!([{}]),
                json!([endpoint("10.0.0.1")]),
            )],
        )
    };
    let numeric = unnumbered(service(
        "svc",
        json!({"type": "NodePort", "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]}),
    ));
    let state = desired_state(&numeric, &node(), &base());
    assert_eq!(summary(&state)[0].3, ["10.0.0.1:8080"]);

    let defaulted = unnumbered(svc_node_port());
    let state = desired_state(&defaulted, &node(), &base());
    assert_eq!(summary(&state)[0].3, ["10.0.0.1:80"]);

    let named = unnumbered(service(
        "svc",
        json!({"type": "NodePort", "ports": [{"port": 80, "targetPort": "http", "nodePort": 30080}]}),
    ));
    let translation = translate(&named, &node(), &base());
    assert_eq!(summary(&translation.state)[0].3, Vec::<String>::new());
    assert!(
        translation
            .notes
            .iter()
            .any(|note| note.level == NoteLevel::Warn && note.message.contains("\"http\"")),
        "{:?}",
        translation.notes
    );
}

#[test]
fn slices_without_ports_give_no_backends() {
    let snapshot = snapshot(
        vec![svc_node_port()],
        vec![slice(
            "svc-1",
            "svc",
            json!(null),
            json!([endpoint("10.0.0.1")]),
        )],
    );
    let state = desired_state(&snapshot, &node(), &base());
    assert_eq!(summary(&state)[0].3, Vec::<String>::new());
}

#[test]
fn skipped_services() {
    let proxied: KubeService = from_json(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "other-proxy",
            "namespace": "default",
            "labels": {"service.kubernetes.io/service-proxy-name": "cilium"},
        },
        "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30001}]},
    }));
    let snapshot = snapshot(
        vec![
            proxied,
            service("cluster-ip-pending", json!({"ports": [{"port": 80}]})),
            service(
                "headless",
                json!({"type": "NodePort", "clusterIP": "None", "ports": [{"port": 80, "nodePort": 30002}]}),
            ),
            service(
                "external-name",
                json!({"type": "ExternalName", "externalName": "example.org"}),
            ),
            service(
                "sctp",
                json!({"type": "NodePort", "ports": [{"port": 80, "protocol": "SCTP", "nodePort": 30003}]}),
            ),
        ],
        Vec::new(),
    );
    let translation = translate(&snapshot, &node(), &base());
    assert_eq!(translation.state.services, []);
    let mut messages: Vec<String> = translation.notes.iter().map(ToString::to_string).collect();
    messages.sort();
    assert_eq!(
        messages,
        [
            "Service default/cluster-ip-pending: is a ClusterIP service without a ClusterIP or external IPs; nothing to serve",
            "Service default/external-name: is an ExternalName service; skipped",
            "Service default/headless: is headless (clusterIP: None); skipped",
            "Service default/other-proxy: belongs to proxy \"cilium\" (service.kubernetes.io/service-proxy-name); skipped",
            "Service default/sctp: port 80 is SCTP; only TCP and UDP are served",
        ]
    );
    assert!(
        translation
            .notes
            .iter()
            .all(|note| note.level == NoteLevel::Debug)
    );
}

#[test]
fn cluster_ips_and_internal_traffic_policy_are_served() {
    let snapshot = snapshot(
        vec![service(
            "dns",
            json!({
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10", "fd00::a"],
                "ipFamilies": ["IPv4", "IPv6"],
                "internalTrafficPolicy": "Local",
                "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
            }),
        )],
        vec![slice(
            "dns-1",
            "dns",
            json!([{"name": "dns", "port": 5353, "protocol": "UDP"}]),
            json!([endpoint("198.18.1.2")]),
        )],
    );
    let translation = translate(&snapshot, &node(), &base());
    let services = &translation.state.services;
    assert_eq!(services.len(), 1, "{:?}", translation.notes);
    let dns = &services[0];
    assert_eq!(dns.node_port, 0);
    assert_eq!(dns.port, 53);
    assert_eq!(dns.cluster_ips, [ip("10.96.0.10"), ip("fd00::a")]);
    assert_eq!(dns.ip_families, [IpFamily::V4, IpFamily::V6]);
    assert_eq!(dns.internal_traffic_policy, TrafficPolicy::Local);
    assert_eq!(dns.backends.len(), 1);
}

#[test]
fn manifests_without_cluster_ip_are_not_headless() {
    let snapshot = snapshot(vec![svc_node_port()], Vec::new());
    assert_eq!(desired_state(&snapshot, &node(), &base()).services.len(), 1);
}

#[test]
fn load_balancer_services_serve_their_node_ports() {
    let mut lb = service(
        "lb",
        json!({
            "type": "LoadBalancer",
            "externalIPs": ["192.0.2.1", "2001:db8::1"],
            "ports": [{"port": 443, "nodePort": 30443}],
        }),
    );
    lb.status = Some(from_json(json!({"loadBalancer": {"ingress": [
        {"ip": "203.0.113.7"},
        {"ip": "203.0.113.8", "ipMode": "Proxy"},
        {"hostname": "lb.example.org"},
        {"ip": "192.0.2.1"},
    ]}})));
    let no_node_ports = service(
        "lb-direct",
        json!({
            "type": "LoadBalancer",
            "allocateLoadBalancerNodePorts": false,
            "ports": [{"port": 443}],
        }),
    );
    let snapshot = snapshot(vec![lb, no_node_ports], Vec::new());
    let (ports, _) = service_ports(&snapshot, &node());
    assert_eq!(ports.len(), 2);
    let lb = &ports[0];
    assert_eq!(lb.service, "lb");
    assert_eq!(lb.node_port, Some(30443));
    assert_eq!(lb.port, 443);
    assert_eq!(
        lb.external_addresses,
        [ip("192.0.2.1"), ip("2001:db8::1"), ip("203.0.113.7")]
    );
    assert_eq!(ports[1].node_port, None);

    let translation = translate(&snapshot, &node(), &base());
    assert_eq!(
        summary(&translation.state),
        [(String::from("default/lb"), Protocol::Tcp, 30443, Vec::new())],
        "lb-direct has nothing to answer on until its load balancer has an IP"
    );
    let service = &translation.state.services[0];
    assert_eq!(service.port, 443);
    assert_eq!(
        service.frontends,
        [ip("192.0.2.1"), ip("2001:db8::1"), ip("203.0.113.7")]
    );
    // Single-stack IPv4 (no ipFamilies): the IPv6 external IP is carried
    // but not served, as kube-proxy's IPv6 proxier skips such a service.
    assert_eq!(service.families(), [IpFamily::V4]);
}

#[test]
fn external_ips_of_cluster_ip_services_are_collected() {
    let snapshot = snapshot(
        vec![service(
            "ext",
            json!({"type": "ClusterIP", "externalIPs": ["192.0.2.9"], "ports": [{"port": 80}]}),
        )],
        Vec::new(),
    );
    let (ports, _) = service_ports(&snapshot, &node());
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].external_addresses, [ip("192.0.2.9")]);
    assert_eq!(ports[0].node_port, None);
    let state = desired_state(&snapshot, &node(), &base());
    assert_eq!(state.services.len(), 1);
    let service = &state.services[0];
    assert_eq!(
        (service.node_port, service.port),
        (0, 80),
        "no NodePort, only the frontend"
    );
    assert_eq!(service.frontends, [ip("192.0.2.9")]);
}

fn conditions(
    address: &str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> Value {
    json!({"addresses": [address], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn one_port(endpoints: Value, policy: &str) -> ClusterSnapshot {
    snapshot(
        vec![service(
            "svc",
            json!({"type": "NodePort", "externalTrafficPolicy": policy, "ports": [{"port": 80, "nodePort": 30080}]}),
        )],
        vec![slice("svc-1", "svc", json!([{"port": 8080}]), endpoints)],
    )
}

fn backends(snapshot: &ClusterSnapshot) -> Vec<String> {
    summary(&desired_state(snapshot, &node(), &base()))
        .into_iter()
        .next()
        .map(|service| service.3)
        .unwrap_or_default()
}

#[test]
fn endpoint_conditions() {
    // Unset conditions: ready (and serving), not terminating.
    let endpoints = json!([
        {"addresses": ["10.0.0.1"]},
        conditions("10.0.0.2", Some(false), Some(false), Some(false)),
        conditions("10.0.0.3", Some(true), Some(true), Some(false)),
        conditions("10.0.0.4", Some(false), Some(true), Some(true)),
    ]);
    assert_eq!(
        backends(&one_port(endpoints, "Cluster")),
        ["10.0.0.1:8080", "10.0.0.3:8080"]
    );
}

#[test]
fn terminating_endpoints_serve_only_when_nothing_is_ready() {
    let endpoints = json!([
        conditions("10.0.0.1", Some(false), Some(true), Some(true)),
        conditions("10.0.0.2", Some(false), Some(false), Some(true)),
        conditions("10.0.0.3", Some(false), Some(false), Some(false)),
    ]);
    let snapshot = one_port(endpoints, "Cluster");
    assert_eq!(backends(&snapshot), ["10.0.0.1:8080"]);
    let (ports, _) = service_ports(&snapshot, &node());
    let serving = &ports[0].endpoints[0];
    assert!(!serving.ready && serving.serving && serving.terminating);
}

fn on_node(address: &str, node: &str, ready: bool, terminating: bool) -> Value {
    json!({
        "addresses": [address],
        "nodeName": node,
        "conditions": {"ready": ready, "serving": true, "terminating": terminating},
    })
}

#[test]
fn local_traffic_policy_uses_local_endpoints_only() {
    let endpoints = json!([
        on_node("10.0.0.1", NODE, true, false),
        on_node("10.0.0.2", "node-b", true, false),
        on_node("10.0.0.3", NODE, false, true),
    ]);
    assert_eq!(
        backends(&one_port(endpoints.clone(), "Local")),
        ["10.0.0.1:8080"]
    );
    assert_eq!(
        backends(&one_port(endpoints, "Cluster")),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );

    // No local ready endpoint: a local terminating one still serves.
    let draining = json!([
        on_node("10.0.0.2", "node-b", true, false),
        on_node("10.0.0.3", NODE, false, true),
    ]);
    assert_eq!(backends(&one_port(draining, "Local")), ["10.0.0.3:8080"]);

    // Nothing local: no backend (kube-proxy drops such traffic).
    let remote = json!([on_node("10.0.0.2", "node-b", true, false)]);
    assert_eq!(backends(&one_port(remote, "Local")), Vec::<String>::new());

    // Without a node name nothing is local.
    let local = one_port(json!([on_node("10.0.0.1", NODE, true, false)]), "Local");
    let nameless = NodeInfo::default();
    let state = desired_state(&local, &nameless, &base());
    assert!(
        state.services[0]
            .backends
            .iter()
            .all(|backend| !backend.is_local)
    );
    assert_eq!(selectable(&state.services[0]), Vec::<String>::new());
}

#[test]
fn service_port_facts() {
    let snapshot = snapshot(
        vec![
            service(
                "sticky",
                json!({
                    "type": "NodePort",
                    "externalTrafficPolicy": "Local",
                    "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                    "ports": [{"port": 80, "nodePort": 30080}],
                }),
            ),
            service(
                "sticky-default",
                json!({"type": "NodePort", "sessionAffinity": "ClientIP", "ports": [{"port": 80, "nodePort": 30081}]}),
            ),
            service(
                "plain",
                json!({"type": "NodePort", "sessionAffinity": "None", "ports": [{"port": 80, "nodePort": 30082}]}),
            ),
        ],
        vec![slice(
            "sticky-1",
            "sticky",
            json!([{"port": 8080}]),
            json!([on_node("10.0.0.1", NODE, true, false), {
                "addresses": ["10.0.0.2"],
                "targetRef": {"kind": "Pod", "name": "sticky-7f9c"},
            }]),
        )],
    );
    let (ports, _) = service_ports(&snapshot, &node());
    let by_name = |name: &str| {
        ports
            .iter()
            .find(|port| port.service == name)
            .unwrap_or_else(|| panic!("no port for {name}"))
    };
    let sticky = by_name("sticky");
    assert_eq!(sticky.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(sticky.session_affinity_timeout, Some(60));
    assert_eq!(
        sticky.endpoints,
        [
            Endpoint {
                address: ip("10.0.0.1"),
                port: 8080,
                ready: true,
                serving: true,
                terminating: false,
                is_local: true,
                name: None,
            },
            Endpoint {
                address: ip("10.0.0.2"),
                port: 8080,
                ready: true,
                serving: true,
                terminating: false,
                is_local: false,
                name: Some(String::from("sticky-7f9c")),
            },
        ]
    );
    let sticky_default = by_name("sticky-default");
    assert_eq!(
        sticky_default.session_affinity_timeout,
        Some(DEFAULT_AFFINITY_TIMEOUT_S)
    );
    assert_eq!(
        sticky_default.external_traffic_policy,
        TrafficPolicy::Cluster
    );
    assert_eq!(by_name("plain").session_affinity_timeout, None);
}

#[test]
fn slices_are_matched_by_label_namespace_and_address_type() {
    let mut other_namespace = svc_slice("svc-x", json!([endpoint("10.0.0.9")]));
    other_namespace.metadata.namespace = Some(String::from("other"));
    let mut ipv6 = svc_slice("svc-6", json!([endpoint("fd00::1"), endpoint("10.0.0.6")]));
    ipv6.address_type = String::from("IPv6");
    let mut fqdn = svc_slice("svc-f", json!([endpoint("10.0.0.5")]));
    fqdn.address_type = String::from("FQDN");
    let mut unlabelled = svc_slice("svc-u", json!([endpoint("10.0.0.8")]));
    unlabelled.metadata.labels = None;
    let snapshot = snapshot(
        vec![svc_node_port()],
        vec![
            svc_slice("svc-1", json!([endpoint("10.0.0.1")])),
            slice(
                "other-1",
                "other",
                json!([{"port": 8080}]),
                json!([endpoint("10.0.0.7")]),
            ),
            other_namespace,
            ipv6,
            fqdn,
            unlabelled,
        ],
    );
    // IPv6 slices serve the service's IPv6 family; an address of the other
    // family in a slice is skipped, FQDN slices are not served.
    assert_eq!(backends(&snapshot), ["10.0.0.1:8080", "[fd00::1]:8080"]);
    let (_, notes) = service_ports(&snapshot, &node());
    assert!(
        notes.iter().any(|note| note.message
            == "endpoint address 10.0.0.6 is not of the slice's addressType IPv6; skipped"),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|note| note.message.contains("addressType FQDN")),
        "{notes:?}"
    );
}

#[test]
fn an_endpoint_in_two_slices_is_one_backend() {
    let snapshot = snapshot(
        vec![svc_node_port()],
        vec![
            svc_slice("svc-1", json!([endpoint("10.0.0.1")])),
            svc_slice(
                "svc-2",
                json!([
                    on_node("10.0.0.1", NODE, true, false),
                    endpoint("not-an-ip")
                ]),
            ),
        ],
    );
    let (ports, notes) = service_ports(&snapshot, &node());
    assert_eq!(ports[0].endpoints.len(), 1);
    assert!(ports[0].endpoints[0].is_local, "the local copy wins");
    assert!(notes.iter().any(|note| note.message.contains("not-an-ip")));
}

#[test]
fn node_addresses() {
    let node = |addresses: Value| -> Node {
        from_json(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE},
            "status": {"addresses": addresses},
        }))
    };
    let info = NodeInfo::new(
        Some(NODE.to_owned()),
        Some(&node(json!([
            {"type": "Hostname", "address": NODE},
            {"type": "InternalIP", "address": "198.18.0.1"},
            {"type": "InternalIP", "address": "fd00::1"},
            {"type": "ExternalIP", "address": "203.0.113.1"},
        ]))),
    );
    assert_eq!(
        info.addresses,
        [ip("198.18.0.1"), ip("fd00::1")],
        "InternalIPs of each family"
    );
    let external_only = NodeInfo::new(
        Some(NODE.to_owned()),
        Some(&node(
            json!([{"type": "ExternalIP", "address": "203.0.113.1"}]),
        )),
    );
    assert_eq!(
        external_only.addresses,
        [ip("203.0.113.1")],
        "else ExternalIPs"
    );

    // The Node's addresses, unless the config lists its own.
    let state = desired_state(&ClusterSnapshot::default(), &info, &base());
    assert_eq!(state.node_addresses, Some(info.addresses.clone()));
    let mut listed = base();
    listed.node_addresses = Some(vec![ip("198.18.0.5")]);
    let state = desired_state(&ClusterSnapshot::default(), &info, &listed);
    assert_eq!(state.node_addresses, Some(vec![ip("198.18.0.5")]));
    // No Node (or no IPv4 address on it): every local address.
    let missing = NodeInfo::new(Some(NODE.to_owned()), None);
    assert_eq!(
        desired_state(&ClusterSnapshot::default(), &missing, &base()).node_addresses,
        None
    );
}

#[test]
fn duplicate_node_ports_keep_the_first_service() {
    let snapshot = snapshot(
        vec![
            service(
                "a",
                json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
            service(
                "b",
                json!({"type": "NodePort", "ports": [{"port": 81, "nodePort": 30080}]}),
            ),
            service(
                "c",
                json!({"type": "NodePort", "ports": [{"port": 81, "protocol": "UDP", "nodePort": 30080}]}),
            ),
        ],
        Vec::new(),
    );
    let translation = translate(&snapshot, &node(), &base());
    let names: Vec<String> = translation
        .state
        .services
        .iter()
        .map(Service::qualified_name)
        .collect();
    assert_eq!(names, ["default/a", "default/c"]);
    assert!(
        translation
            .notes
            .iter()
            .any(|note| note.level == NoteLevel::Warn
                && note.object == "Service default/b"
                && note.message.contains("Service default/a"))
    );
}

#[test]
fn translation_is_deterministic() {
    let forwards = tcp_echo();
    let mut backwards = ClusterSnapshot::default();
    for (key, slice) in forwards.endpoint_slices.iter().rev() {
        Arc::make_mut(&mut backwards.endpoint_slices).insert(key.clone(), Arc::clone(slice));
    }
    for (key, service) in forwards.services.iter().rev() {
        Arc::make_mut(&mut backwards.services).insert(key.clone(), Arc::clone(service));
    }
    assert_eq!(
        desired_state(&forwards, &node(), &base()),
        desired_state(&backwards, &node(), &base())
    );
}

#[test]
fn new_notes_are_those_not_seen_before() {
    let note = |message: &str| Note {
        level: NoteLevel::Debug,
        object: String::from("Service default/a"),
        message: message.to_owned(),
    };
    let seen: BTreeSet<Note> = [note("old")].into_iter().collect();
    let notes = [note("old"), note("new")];
    assert_eq!(new_notes(&notes, &seen), [&notes[1]]);
}

#[test]
fn every_endpoint_is_a_backend_with_its_conditions() {
    let endpoints = json!([
        on_node("10.0.0.1", NODE, true, false),
        on_node("10.0.0.2", "node-b", true, false),
        conditions("10.0.0.3", Some(false), Some(true), Some(true)),
        conditions("10.0.0.4", Some(false), Some(false), Some(false)),
    ]);
    let state = desired_state(&one_port(endpoints, "Local"), &node(), &base());
    let service = &state.services[0];
    assert_eq!(service.external_traffic_policy, TrafficPolicy::Local);
    let backends: Vec<(String, u32, bool, bool, bool, bool)> = service
        .backends
        .iter()
        .map(|backend| {
            (
                backend.address.to_string(),
                backend.weight,
                backend.ready,
                backend.serving,
                backend.terminating,
                backend.is_local,
            )
        })
        .collect();
    assert_eq!(
        backends,
        [
            (String::from("10.0.0.1"), 1, true, true, false, true),
            (String::from("10.0.0.2"), 1, true, true, false, false),
            (String::from("10.0.0.3"), 1, false, true, true, false),
            (String::from("10.0.0.4"), 1, false, false, false, false),
        ]
    );
    assert_eq!(selectable(service), ["10.0.0.1:8080"]);
}

#[test]
fn load_balancer_extras() {
    let mut lb = service(
        "lb",
        json!({
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000,
            "loadBalancerSourceRanges": ["10.1.2.3/16", "192.0.2.0/24", "2001:db8::/32", "bogus"],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 100000}},
            "ports": [{"port": 443, "nodePort": 30443}],
        }),
    );
    lb.status = Some(from_json(
        json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}),
    ));
    let cluster_policy = service(
        "cluster",
        json!({"type": "NodePort", "healthCheckNodePort": 32001, "loadBalancerSourceRanges": ["10.0.0.0/8"],
               "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let state = desired_state(
        &snapshot(vec![lb, cluster_policy], Vec::new()),
        &node(),
        &base(),
    );
    let lb = &state.services[1];
    assert_eq!(lb.name, "lb");
    assert_eq!(
        lb.source_ranges,
        [
            (ip("10.1.0.0"), 16),
            (ip("192.0.2.0"), 24),
            (ip("2001:db8::"), 32)
        ]
    );
    assert_eq!(lb.health_check_node_port, Some(32000));
    assert_eq!(
        lb.session_affinity_timeout,
        Some(MAX_AFFINITY_TIMEOUT_S),
        "clamped to a day"
    );
    assert_eq!(lb.frontends, [ip("203.0.113.7")]);
    let plain = &state.services[0];
    assert_eq!(
        plain.source_ranges,
        [],
        "source ranges belong to load balancers"
    );
    assert_eq!(plain.health_check_node_port, None);
}

#[test]
fn duplicate_frontend_addresses_keep_the_first_service() {
    let external = |name: &str, node_port: u16| {
        service(
            name,
            json!({"type": "NodePort", "externalIPs": ["192.0.2.1"], "ports": [{"port": 80, "nodePort": node_port}]}),
        )
    };
    let translation = translate(
        &snapshot(vec![external("a", 30080), external("b", 30081)], Vec::new()),
        &node(),
        &base(),
    );
    assert_eq!(translation.state.services.len(), 1);
    assert!(
        translation
            .notes
            .iter()
            .any(|note| note.object == "Service default/b"
                && note.message.contains("TCP 192.0.2.1:80")),
        "{:?}",
        translation.notes
    );
}

/// A dual-stack NodePort Service on a Node with only an IPv4 InternalIP
/// answers IPv6 nowhere: the translation says so.
#[test]
fn a_family_the_node_has_no_address_of_is_noted() {
    let snapshot = snapshot(
        vec![service(
            "web",
            json!({
                "type": "NodePort",
                "ipFamilies": ["IPv4", "IPv6"],
                "ports": [{"port": 80, "nodePort": 30080}],
            }),
        )],
        Vec::new(),
    );
    let node = NodeInfo {
        name: Some(NODE.to_owned()),
        addresses: vec![ip("198.18.0.1")],
    };
    let translation = translate(&snapshot, &node, &base());
    let warned: Vec<String> = (translation.notes.iter())
        .filter(|note| note.level == NoteLevel::Warn)
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        warned,
        [
            "Service default/web: IPv6 clients cannot reach nodePort 30080: this node has no IPv6 \
          address to answer on (the Node's InternalIPs, or node.addresses)"
        ]
    );
    let node = NodeInfo {
        addresses: vec![ip("198.18.0.1"), ip("2001:db8::1")],
        ..node
    };
    let translation = translate(&snapshot, &node, &base());
    assert!(
        translation
            .notes
            .iter()
            .all(|note| note.level == NoteLevel::Debug)
    );
}
