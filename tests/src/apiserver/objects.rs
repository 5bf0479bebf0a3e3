//! Small builders for the objects tests put into the test API server.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeStatus, ObjectReference, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        ..ObjectMeta::default()
    }
}

/// A `NodePort` Service with one unnamed port: `protocol` ("TCP"/"UDP")
/// `port` -> `target_port`, on `node_port`.
pub fn node_port_service(
    namespace: &str,
    name: &str,
    protocol: &str,
    port: u16,
    target_port: u16,
    node_port: u16,
) -> Service {
    Service {
        metadata: meta(Some(namespace), name),
        spec: Some(ServiceSpec {
            type_: Some(String::from("NodePort")),
            selector: Some(BTreeMap::from([(String::from("app"), name.to_owned())])),
            ports: Some(vec![ServicePort {
                protocol: Some(protocol.to_owned()),
                port: i32::from(port),
                target_port: Some(IntOrString::Int(i32::from(target_port))),
                node_port: Some(i32::from(node_port)),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// An endpoint's conditions and where it runs.
#[derive(Clone, Debug)]
pub struct EndpointState {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// The pod's name (`targetRef`).
    pub pod: Option<String>,
}

impl EndpointState {
    /// A ready, serving endpoint.
    pub fn ready(address: impl Into<IpAddr>) -> Self {
        Self {
            address: address.into(),
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            pod: None,
        }
    }

    /// A pod shutting down that still serves: not ready, serving,
    /// terminating.
    pub fn terminating(address: impl Into<IpAddr>) -> Self {
        Self {
            ready: false,
            terminating: true,
            ..Self::ready(address)
        }
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.node_name = Some(node.to_owned());
        self
    }

    pub fn pod(mut self, pod: &str) -> Self {
        self.pod = Some(pod.to_owned());
        self
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            addresses: vec![self.address.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(self.ready),
                serving: Some(self.serving),
                terminating: Some(self.terminating),
            }),
            node_name: self.node_name.clone(),
            target_ref: self.pod.as_ref().map(|pod| ObjectReference {
                kind: Some(String::from("Pod")),
                name: Some(pod.clone()),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        }
    }
}

/// An EndpointSlice of `service` with one unnamed port, of the address
/// type of its first endpoint (IPv4 when it has none).
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    protocol: &str,
    port: u16,
    endpoints: &[EndpointState],
) -> EndpointSlice {
    let mut metadata = meta(Some(namespace), name);
    metadata.labels = Some(BTreeMap::from([
        (
            String::from("kubernetes.io/service-name"),
            service.to_owned(),
        ),
        (
            String::from("endpointslice.kubernetes.io/managed-by"),
            String::from("xlb-tests"),
        ),
    ]));
    EndpointSlice {
        metadata,
        address_type: String::from(match endpoints.first() {
            Some(endpoint) if endpoint.address.is_ipv6() => "IPv6",
            _ => "IPv4",
        }),
        endpoints: endpoints.iter().map(EndpointState::endpoint).collect(),
        ports: Some(vec![EndpointPort {
            name: Some(String::new()),
            port: Some(i32::from(port)),
            protocol: Some(protocol.to_owned()),
            ..EndpointPort::default()
        }]),
    }
}

/// A Node with one InternalIP.
pub fn node(name: &str, internal_ip: impl Into<IpAddr>) -> Node {
    dual_stack_node(name, &[internal_ip.into()])
}

/// A Node with an InternalIP of each of `internal_ips`.
pub fn dual_stack_node(name: &str, internal_ips: &[IpAddr]) -> Node {
    let internal = internal_ips.iter().map(|address| NodeAddress {
        type_: String::from("InternalIP"),
        address: address.to_string(),
    });
    let hostname = NodeAddress {
        type_: String::from("Hostname"),
        address: name.to_owned(),
    };
    Node {
        metadata: meta(None, name),
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(internal.chain([hostname]).collect()),
            ..NodeStatus::default()
        }),
    }
}

/// `service` made dual-stack (`ipFamilies: [IPv4, IPv6]`, `ipFamilyPolicy:
/// RequireDualStack`), as the API server leaves it.
pub fn dual_stack(mut service: Service) -> Service {
    if let Some(spec) = service.spec.as_mut() {
        spec.ip_families = Some(vec![String::from("IPv4"), String::from("IPv6")]);
        spec.ip_family_policy = Some(String::from("RequireDualStack"));
    }
    service
}
