//! `xlb run --manifests`: Service and EndpointSlice manifests (files,
//! directories, multi-document streams) -> the same `DesiredState` the
//! Kubernetes API would give, and located errors for bad ones.

use std::net::Ipv4Addr;

use xlb::model::desired_backends;
use xlb::model::{DesiredState, Protocol};
use xlb::source::kube::{NodeInfo, desired_state};
use xlb::source::manifests::{self, ManifestError, Manifests};
use xlb::source::problem::Problem;
use xlb_tests::ScratchDir;

/// (name, protocol, nodePort, backends new flows may use) of a service.
type Summary = (String, Protocol, u16, Vec<(Ipv4Addr, u16)>);

fn base() -> DesiredState {
    DesiredState {
        interfaces: vec![String::from("eth0")],
        ..DesiredState::default()
    }
}

fn parse(text: &str) -> Manifests {
    match manifests::parse("app.yaml", text) {
        Ok(loaded) => loaded,
        Err(error) => panic!("{error}"),
    }
}

fn problems(text: &str) -> Vec<Problem> {
    match manifests::parse("app.yaml", text) {
        Ok(loaded) => panic!("accepted: {loaded:#?}"),
        Err(ManifestError::Invalid { problems }) => problems,
        Err(error) => panic!("not a located error: {error}"),
    }
}

/// A NodePort Service `web` (document 1, from line 1) whose `ports:` list
/// is `$ports`, from line 8.
macro_rules! web_node_port {
    ($ports:literal) => {
        concat!(
            "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  ports:
",
            $ports
        )
    };
}

/// The problems as `xlb run` prints them.
fn messages(text: &str) -> Vec<String> {
    problems(text).iter().map(ToString::to_string).collect()
}

/// What `kubectl kustomize examples/apps/.../overlays/development` gives,
/// plus hand-written slices (the EndpointSlice controller's job in a
/// cluster) and kinds xlb skips.
const APP: &str = "\
# Rendered by kubectl kustomize
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  a: b
---
apiVersion: v1
kind: Service
metadata:
  name: tcp-echo
  namespace: echo
  labels:
    app: tcp-echo
spec:
  type: NodePort
  selector:
    app: tcp-echo
  ports:
    - name: echo
      protocol: TCP
      port: 3333
      targetPort: echo
      nodePort: 30999
---
apiVersion: v1
kind: Service
metadata:
  name: udp-echo
  namespace: echo
spec:
  type: NodePort
  ports:
    - protocol: UDP
      port: 4444
      targetPort: 4444
      nodePort: 30998
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: tcp-echo-1
  namespace: echo
  labels:
    kubernetes.io/service-name: tcp-echo
addressType: IPv4
ports:
  - name: echo
    protocol: TCP
    port: 3333
endpoints:
  - addresses: [198.18.1.2]
    conditions: {ready: true}
  - addresses: [198.18.2.2]
    conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: udp-echo-1
  namespace: echo
  labels:
    kubernetes.io/service-name: udp-echo
addressType: IPv4
ports:
  - protocol: UDP
    port: 4444
endpoints:
  - addresses: [198.18.1.2]
  - addresses: [198.18.2.2]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: tcp-echo
spec: {}
...
";

#[test]
fn a_kustomize_stream_becomes_services() {
    let loaded = parse(APP);
    assert_eq!(loaded.warnings, []);
    assert_eq!(loaded.snapshot.services.len(), 2);
    assert_eq!(loaded.snapshot.endpoint_slices.len(), 2);
    let skipped: Vec<(&str, usize)> = loaded
        .skipped
        .iter()
        .map(|(kind, count)| (kind.as_str(), *count))
        .collect();
    assert_eq!(skipped, [("apps/v1/Deployment", 1), ("v1/ConfigMap", 1)]);

    let state = desired_state(&loaded.snapshot, &NodeInfo::default(), &base());
    let summary: Vec<Summary> = state
        .services
        .iter()
        .map(|service| {
            (
                service.qualified_name(),
                service.protocol,
                service.node_port,
                desired_backends(service)
                    .into_iter()
                    .filter(|backend| backend.selectable)
                    .map(|backend| (ipv4(backend.address.address), backend.address.port))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                String::from("echo/tcp-echo:echo"),
                Protocol::Tcp,
                30999,
                vec![(Ipv4Addr::new(198, 18, 1, 2), 3333)],
            ),
            (
                String::from("echo/udp-echo"),
                Protocol::Udp,
                30998,
                vec![
                    (Ipv4Addr::new(198, 18, 1, 2), 4444),
                    (Ipv4Addr::new(198, 18, 2, 2), 4444),
                ],
            ),
        ]
    );
    assert_eq!(state.interfaces, ["eth0"]);
}

#[test]
fn json_and_lists_are_read_too() {
    let json = r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}}
    ]}"#;
    let loaded = parse(json);
    assert_eq!(loaded.snapshot.services.len(), 1);
    let key = (String::from("default"), String::from("web"));
    assert!(
        loaded.snapshot.services.contains_key(&key),
        "namespace defaults to default"
    );
}

#[test]
fn empty_streams_have_no_services() {
    let loaded = parse("# nothing here\n---\n---\n");
    assert_eq!(loaded.snapshot.services.len(), 0);
}

#[test]
fn syntax_errors_name_file_document_and_line() {
    let text = "\
apiVersion: v1
kind: ConfigMap
metadata: {name: a}
---
apiVersion: v1
kind: Service
metadata:
  name: web
 spec: {}
";
    let found = problems(text);
    assert_eq!(found.len(), 1);
    let problem = &found[0];
    assert_eq!(problem.origin, "app.yaml");
    assert_eq!(problem.document, Some(2));
    assert!((8..=9).contains(&problem.line), "{problem}");
    assert!(problem.fix.contains("YAML syntax"), "{problem}");
}

#[test]
fn unknown_fields_are_errors() {
    let text = web_node_port!("    - port: 80\n      nodeport: 30080\n");
    assert_eq!(
        messages(text),
        [
            "app.yaml:9:17: document 1 (Service default/web): spec.ports[0].nodeport: unknown field \"nodeport\"; remove it \
             or correct its spelling (kubectl explain service.spec.ports)",
            // nodePort is then missing, too.
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    );
}

#[test]
fn type_errors_are_located() {
    let text = web_node_port!("    - port: eighty\n      nodePort: 30080\n");
    let found = problems(text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].field, "spec.ports[0].port");
    assert_eq!((found[0].line, found[0].column), (8, 13));
    assert!(
        found[0]
            .fix
            .contains("kubectl explain service.spec.ports.port"),
        "{}",
        found[0]
    );
}

#[test]
fn semantic_errors_name_object_field_and_fix() {
    let text = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: NodePort
  ports:
    - name: http
      port: 80
    - name: dns
      port: 53
      protocol: UDP
      nodePort: 30053
    - name: dns-tcp
      port: 53
      protocol: tcp
      nodePort: 30054
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  type: NodePort
  ports:
    - port: 8080
      nodePort: 30053
      protocol: UDP
";
    assert_eq!(
        messages(text),
        [
            "app.yaml:9:7: document 1 (Service shop/web): spec.ports[0].nodePort: a NodePort port \
             needs a nodePort here: without a cluster nothing allocates one; set nodePort \
             (30000-32767 by default)",
            "app.yaml:17:17: document 1 (Service shop/web): spec.ports[2].protocol: \"tcp\" is not \
             a protocol; use TCP, UDP or SCTP (upper case)",
            "app.yaml:29:17: document 2 (Service shop/api): spec.ports[0].nodePort: UDP 30053 is \
             already the nodePort of Service shop/web (app.yaml:14); give each service port its \
             own nodePort",
        ]
    );
}

#[test]
fn endpoint_slice_errors_and_warnings() {
    let unlabelled = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
addressType: IPv4
ports: [{port: 80}]
endpoints:
  - addresses: [10.0.0.300]
";
    assert_eq!(
        messages(unlabelled),
        [
            "app.yaml:4:3: document 1 (EndpointSlice default/web-1): metadata.labels: has no \
             kubernetes.io/service-name label, so it belongs to no service; add the label \
             kubernetes.io/service-name: <the Service's name>",
            "app.yaml:8:17: document 1 (EndpointSlice default/web-1): endpoints[0].addresses[0]: \
             \"10.0.0.300\" is not an IPv4 address; write the pod's IPv4 address, e.g. 10.244.1.7, \
             or put it in a slice of its family",
        ]
    );

    // An IPv6 slice takes IPv6 addresses only.
    let ipv6 = unlabelled
        .replace("addressType: IPv4", "addressType: IPv6")
        .replace("[10.0.0.300]", "['fd00::3', 10.0.0.3]");
    assert_eq!(
        messages(&ipv6)[1..],
        [
            "app.yaml:8:28: document 1 (EndpointSlice default/web-1): endpoints[0].addresses[1]: \
             \"10.0.0.3\" is not an IPv6 address; write the pod's IPv6 address, e.g. \
             fd00:10:244::7, or put it in a slice of its family"
        ]
    );

    let orphan = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 80}]
endpoints:
  - addresses: [10.0.0.3]
";
    let loaded = parse(orphan);
    let warnings: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "app.yaml:5:11: document 1 (EndpointSlice default/web-1): metadata.labels: its Service \
          default/web is not in the manifests, so the slice is unused; add the Service, or correct \
          the kubernetes.io/service-name label"
        ]
    );
}

#[test]
fn wrong_api_versions_and_duplicates() {
    let text = "\
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: a}
---
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {ports: [{port: 81}]}
---
kind: Service
";
    let found = messages(text);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].starts_with("app.yaml:1:13: document 1: apiVersion: EndpointSlice discovery.k8s.io/v1beta1 is not supported; use apiVersion: discovery.k8s.io/v1"), "{}", found[0]);
    assert!(found[1].starts_with("app.yaml:12:"), "{}", found[1]);
    assert!(
        found[1].contains("Service default/a is also defined at app.yaml:7 (document 2)"),
        "{}",
        found[1]
    );
    assert!(
        found[2].starts_with("app.yaml:15:1: document 4: apiVersion: has no apiVersion"),
        "{}",
        found[2]
    );
}

#[test]
fn directories_are_read_in_name_order() -> anyhow::Result<()> {
    let dir = ScratchDir::new()?;
    dir.write(
        "b-slice.yml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}]\n",
    )?;
    dir.write(
        "a-service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}\n",
    )?;
    dir.write("notes.txt", "not a manifest")?;
    let files = manifests::files(dir.path())?;
    let names: Vec<String> = files
        .iter()
        .filter_map(|file| file.file_name()?.to_str().map(str::to_owned))
        .collect();
    assert_eq!(names, ["a-service.yaml", "b-slice.yml"]);
    let loaded = manifests::load(dir.path())?;
    let state = desired_state(&loaded.snapshot, &NodeInfo::default(), &base());
    assert_eq!(state.services.len(), 1);
    assert_eq!(state.services[0].backends.len(), 1);

    // A problem names the file it is in.
    dir.write(
        "c-bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 81}]}\n",
    )?;
    let error = manifests::load(dir.path())
        .map(|_| ())
        .map_err(|error| error.to_string());
    let Err(text) = error else {
        anyhow::bail!("a duplicate service was accepted");
    };
    assert!(text.contains("c-bad.yaml:3:"), "{text}");
    assert!(text.contains("a-service.yaml:3"), "{text}");

    let empty = ScratchDir::new()?;
    let error = manifests::load(empty.path())
        .map(|_| ())
        .map_err(|error| error.to_string());
    assert!(
        matches!(&error, Err(text) if text.contains("no manifest files")),
        "{error:?}"
    );
    Ok(())
}

/// `address`, which these IPv4 clusters' backends all are.
fn ipv4(address: std::net::IpAddr) -> Ipv4Addr {
    match address {
        std::net::IpAddr::V4(address) => address,
        std::net::IpAddr::V6(address) => panic!("an IPv6 backend {address} in an IPv4 cluster"),
    }
}
