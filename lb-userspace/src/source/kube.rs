//! Kubernetes objects -> `DesiredState`, with kube-proxy's semantics.
//!
//! Services, EndpointSlices (discovery.k8s.io/v1) and this node's Node come
//! from the API (`watch`, `xlb run --kubernetes`) or from manifest files
//! (`super::manifests`, `xlb run --manifests`); either way they are collected
//! in a [`ClusterSnapshot`] and translated whole by [`desired_state`], a pure
//! function, in two steps:
//!
//! 1. [`service_ports`]: every proxied (service, port) as kube-proxy sees it
//!    ([`ServicePort`]: frontends, traffic policy, affinity, source ranges,
//!    every endpoint with its conditions and locality);
//! 2. [`to_model`]: the one place that knows `model::Service`'s fields, so a
//!    field the model gains is a change there, not a rewrite.

mod events;
mod node;
mod source;
mod watch;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{
    Backend, DesiredState, IpFamily, Owners, Protocol, Service, TrafficPolicy, network_of,
};

pub use super::cluster::{
    EndpointAddress, EndpointObject, ServiceObject, ServicePortSpec, ServiceSpec, SliceObject,
    SlicePort,
};
pub use events::{Finding, REPORTING_CONTROLLER, Why};
pub use node::NodeInfo;
pub use source::{Begun, ClusterSource, NODE_NAME_ENV, SourceError, SourceOptions, next_change};
pub use watch::{ClusterView, Watch, WatchError, client, connect};

pub use super::cluster::{
    ClusterSnapshot, ObjectKey, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, key_of,
};

/// One endpoint of a service port, as its EndpointSlice describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    /// `conditions.ready` (unset means ready).
    pub ready: bool,
    /// `conditions.serving` (unset means true, as kube-proxy reads it).
    pub serving: bool,
    /// `conditions.terminating` (unset means false).
    pub terminating: bool,
    /// `nodeName` is this node.
    pub is_local: bool,
    /// The pod (`targetRef.name`) or `hostname`, for logs.
    pub name: Option<String>,
}

/// One proxied port of one Service: everything kube-proxy would act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub service: String,
    /// `ports[].name`; empty for a service's single unnamed port.
    pub port_name: String,
    pub protocol: Protocol,
    /// `ports[].port`: what external IPs and load-balancer IPs answer on.
    pub port: u16,
    /// `ports[].nodePort` for NodePort and LoadBalancer services.
    pub node_port: Option<u16>,
    /// `spec.externalIPs` and the load balancer's ingress IPs, served on
    /// `port`.
    pub external_addresses: Vec<IpAddr>,
    /// `spec.clusterIPs` (or `spec.clusterIP`), served on `port`.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ipFamilies` (IPv4 when unset, as the API server defaults a
    /// single-stack cluster).
    pub ip_families: Vec<IpFamily>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    /// `sessionAffinity: ClientIP`'s timeout, in seconds.
    pub session_affinity_timeout: Option<u32>,
    /// `spec.loadBalancerSourceRanges` of a LoadBalancer service:
    /// (network address, prefix length).
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// `spec.healthCheckNodePort` of a Local LoadBalancer service.
    pub health_check_node_port: Option<u16>,
    /// Every endpoint for this port, sorted by (address, port), deduplicated.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// The model's service name: `service` or `service:port-name`, unique per
    /// namespace (a service's port names are unique).
    pub fn model_name(&self) -> String {
        if self.port_name.is_empty() {
            self.service.clone()
        } else {
            format!("{}:{}", self.service, self.port_name)
        }
    }
}

/// Why an object (or part of one) is not served; logged by the source.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Note {
    pub level: NoteLevel,
    /// `Service ns/name`, `EndpointSlice ns/name`, ...
    pub object: String,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NoteLevel {
    /// Expected and harmless (SCTP ports, headless services, ...).
    Debug,
    /// Probably a mistake, or something xlb cannot do yet.
    Warn,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// The translation and what it had to leave out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translation {
    pub state: DesiredState,
    pub notes: Vec<Note>,
}

/// The whole desired state of this node: `base` (interfaces, conntrack,
/// masquerade ports, ... from the config file and the command line) with
/// its services replaced by those of `snapshot`.
pub fn desired_state(
    snapshot: &ClusterSnapshot,
    node: &NodeInfo,
    base: &DesiredState,
) -> DesiredState {
    translate(snapshot, node, base).state
}

/// [`desired_state`], with notes on what was skipped and why.
pub fn translate(snapshot: &ClusterSnapshot, node: &NodeInfo, base: &DesiredState) -> Translation {
    let (ports, mut notes) = service_ports(snapshot, node);
    // Exactly as long as needed: doubling to fit 10,000 services would
    // hold 16,384 (and both copies while growing).
    let mut services = Vec::with_capacity(ports.len());
    // A NodePort and an external frontend belong to one service (the
    // model's rule); the API server guarantees the first, nothing
    // guarantees the second.
    let mut owners: Owners<String> = Owners::default();
    for port in &ports {
        let object = format!("Service {}/{}", port.namespace, port.service);
        let Some(service) = to_model(port, &mut notes) else {
            continue;
        };
        let claims = service.claims();
        if let Some((claim, owner)) = owners.first_taken(&claims) {
            notes.push(Note {
                level: NoteLevel::Warn,
                object,
                message: format!(
                    "{claim} is already used by {owner}; port {} skipped",
                    port.port
                ),
            });
            continue;
        }
        let owner = format!("{object} port {}", port.port);
        for claim in claims {
            // A service repeating an address of its own holds it already.
            let _ = owners.take(claim, owner.clone());
        }
        services.push(service);
    }
    // Node addresses: the config's list wins (kube-proxy's
    // --nodeport-addresses); otherwise the Node's primary addresses, as
    // kube-proxy's nftables mode does by default; otherwise (no Node, or one
    // without addresses) every local address.
    let node_addresses = base.node_addresses.clone().or_else(|| {
        if node.addresses.is_empty() {
            None
        } else {
            Some(node.addresses.clone())
        }
    });
    if let Some(listed) = &node_addresses {
        note_families_without_node_address(listed, &services, &mut notes);
    }
    Translation {
        state: DesiredState {
            node_addresses,
            services,
            ..base.clone()
        },
        notes,
    }
}

/// A Service with a NodePort in a family the node addresses (the config's
/// list, or the Node's InternalIPs) have none of: its clients of that
/// family reach the NodePort nowhere (the Node lacks an InternalIP of the
/// family, or `node.addresses` leaves it out).
fn note_families_without_node_address(
    listed: &[IpAddr],
    services: &[Service],
    notes: &mut Vec<Note>,
) {
    for service in services {
        for family in service.node_port_families_without(listed) {
            let name = service.name.split(':').next().unwrap_or(&service.name);
            notes.push(Note {
                level: NoteLevel::Warn,
                object: format!("Service {}/{name}", service.namespace),
                message: format!(
                    "{family} clients cannot reach nodePort {}: this node has no {family} \
                     address to answer on (the Node's InternalIPs, or node.addresses)",
                    service.node_port
                ),
            });
        }
    }
}

/// The model's service for `port`, or `None` (with a note) when it has
/// nothing to answer on. The only function that knows `model::Service`'s
/// fields.
///
/// Every endpoint becomes a backend with its conditions and locality, all
/// of weight 1 (Kubernetes has no weights): which of them take new flows
/// (ready ones, local ones under the Local policy, serving terminating ones
/// when nothing is ready) is decided in one place, the model
/// (`model::desired_backends`), which also keeps draining pods' flows.
pub fn to_model(port: &ServicePort, notes: &mut Vec<Note>) -> Option<Service> {
    if port.node_port.is_none() && port.external_addresses.is_empty() && port.cluster_ips.is_empty()
    {
        notes.push(Note {
            level: NoteLevel::Debug,
            object: format!("Service {}/{}", port.namespace, port.service),
            message: format!(
                "port {} has neither a nodePort, external addresses nor a ClusterIP; skipped",
                port.port
            ),
        });
        return None;
    }
    let backends = port
        .endpoints
        .iter()
        .map(|endpoint| Backend {
            address: endpoint.address,
            port: endpoint.port,
            weight: 1,
            name: endpoint.name.clone(),
            ready: endpoint.ready,
            serving: endpoint.serving,
            terminating: endpoint.terminating,
            is_local: endpoint.is_local,
        })
        .collect();
    Some(Service {
        name: port.model_name(),
        namespace: port.namespace.clone(),
        protocol: port.protocol,
        node_port: port.node_port.unwrap_or(0),
        port: port.port,
        frontends: port.external_addresses.clone(),
        cluster_ips: port.cluster_ips.clone(),
        ip_families: port.ip_families.clone(),
        external_traffic_policy: port.external_traffic_policy,
        internal_traffic_policy: port.internal_traffic_policy,
        session_affinity_timeout: port.session_affinity_timeout,
        source_ranges: port.source_ranges.clone(),
        health_check_node_port: port.health_check_node_port,
        backends,
    })
}

/// Every proxied service port of `snapshot`, in (namespace, name, port
/// order), with notes on what was skipped.
pub fn service_ports(snapshot: &ClusterSnapshot, node: &NodeInfo) -> (Vec<ServicePort>, Vec<Note>) {
    let mut notes = Vec::new();
    let mut slices_by_service: BTreeMap<ObjectKey, Vec<(&ObjectKey, &SliceObject)>> =
        BTreeMap::new();
    for (key, slice) in snapshot.endpoint_slices.iter() {
        let object = format!("EndpointSlice {}/{}", key.0, key.1);
        let Some(service) = &slice.service_name else {
            notes.push(Note {
                level: NoteLevel::Debug,
                object,
                message: format!("has no {SERVICE_NAME_LABEL} label; ignored"),
            });
            continue;
        };
        if IpFamily::from_name(&slice.address_type).is_none() {
            notes.push(Note {
                level: NoteLevel::Debug,
                object,
                message: format!(
                    "addressType {} is not served (IPv4 and IPv6 are); ignored",
                    slice.address_type
                ),
            });
            continue;
        }
        slices_by_service
            .entry((key.0.clone(), service.clone()))
            .or_default()
            .push((key, &**slice));
    }
    // Most services have one port.
    let mut ports = Vec::with_capacity(snapshot.services.len());
    for (key, service) in snapshot.services.iter() {
        let object = format!("Service {}/{}", key.0, key.1);
        let Some(spec) = &service.spec else {
            notes.push(Note {
                level: NoteLevel::Debug,
                object,
                message: String::from("has no spec; skipped"),
            });
            continue;
        };
        if let Some(proxy) = &service.proxy_name {
            notes.push(Note {
                level: NoteLevel::Debug,
                object,
                message: format!(
                    "belongs to proxy {proxy:?} ({SERVICE_PROXY_NAME_LABEL}); skipped"
                ),
            });
            continue;
        }
        let service_type = spec.service_type.as_str();
        if service_type == "ExternalName" {
            notes.push(Note {
                level: NoteLevel::Debug,
                object,
                message: String::from("is an ExternalName service; skipped"),
            });
            continue;
        }
        // An empty clusterIP is not headless: manifests carry none, the API
        // server allocates it.
        if spec.headless {
            notes.push(Note {
                level: NoteLevel::Debug,
                object,
                message: String::from("is headless (clusterIP: None); skipped"),
            });
            continue;
        }
        let node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
        let external_addresses = external_addresses(spec, &object, &mut notes);
        let cluster_ips = cluster_ips(spec, &object, &mut notes);
        let ip_families = ip_families(spec, &object, &mut notes);
        if !node_ports && external_addresses.is_empty() && cluster_ips.is_empty() {
            notes.push(Note {
                level: NoteLevel::Debug,
                object,
                message: format!(
                    "is a {service_type} service without a ClusterIP or external IPs; nothing to serve"
                ),
            });
            continue;
        }
        let external_traffic_policy = spec.external_traffic_policy;
        let internal_traffic_policy = spec.internal_traffic_policy;
        let session_affinity_timeout = spec.session_affinity_timeout;
        let source_ranges = if service_type == "LoadBalancer" {
            source_ranges(&spec.source_ranges, &object, &mut notes)
        } else {
            Vec::new()
        };
        let health_check_node_port = spec
            .health_check_node_port
            .filter(|_| {
                service_type == "LoadBalancer" && external_traffic_policy == TrafficPolicy::Local
            })
            .and_then(positive_port);
        let slices = slices_by_service
            .get(key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for kube_port in &spec.ports {
            let port_name = kube_port.name.clone();
            let protocol = match kube_port.protocol.as_str() {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => {
                    notes.push(Note {
                        level: NoteLevel::Debug,
                        object: object.clone(),
                        message: format!(
                            "port {} is {other}; only TCP and UDP are served",
                            kube_port.port
                        ),
                    });
                    continue;
                }
            };
            let Some(port) = positive_port(kube_port.port) else {
                notes.push(Note {
                    level: NoteLevel::Warn,
                    object: object.clone(),
                    message: format!("port {} is not a port number; skipped", kube_port.port),
                });
                continue;
            };
            let node_port = if node_ports {
                kube_port.node_port.and_then(positive_port)
            } else {
                None
            };
            let endpoints = endpoints(kube_port, &port_name, protocol, slices, node, &mut notes);
            ports.push(ServicePort {
                namespace: key.0.clone(),
                service: key.1.clone(),
                port_name,
                protocol,
                port,
                node_port,
                external_addresses: external_addresses.clone(),
                cluster_ips: cluster_ips.clone(),
                ip_families: ip_families.clone(),
                external_traffic_policy,
                internal_traffic_policy,
                session_affinity_timeout,
                source_ranges: source_ranges.clone(),
                health_check_node_port,
                endpoints,
            });
        }
    }
    (ports, notes)
}

/// `10.0.0.0/8`- or `2001:db8::/32`-style ranges, host bits cleared.
fn source_ranges(listed: &[String], object: &str, notes: &mut Vec<Note>) -> Vec<(IpAddr, u8)> {
    let mut ranges = Vec::new();
    for text in listed {
        let parsed = text.trim().split_once('/').and_then(|(address, length)| {
            let address: IpAddr = address.parse().ok()?;
            let bits = IpFamily::of(address).bits();
            let length: u8 = length.parse().ok().filter(|length| *length <= bits)?;
            Some((network_of(address, length), length))
        });
        match parsed {
            Some(range) if !ranges.contains(&range) => ranges.push(range),
            Some(_) => {}
            None => notes.push(Note {
                level: NoteLevel::Debug,
                object: object.to_owned(),
                message: format!("loadBalancerSourceRange {text} is not a CIDR; ignored"),
            }),
        }
    }
    ranges
}

fn positive_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

/// `spec.ipFamilies`: IPv4 when unset (an API server fills it in; objects
/// from elsewhere may lack it), unknown names left out with a note.
fn ip_families(spec: &ServiceSpec, object: &str, notes: &mut Vec<Note>) -> Vec<IpFamily> {
    let mut families = Vec::new();
    for name in &spec.ip_families {
        match IpFamily::from_name(name) {
            Some(family) if !families.contains(&family) => families.push(family),
            Some(_) => {}
            None => notes.push(Note {
                level: NoteLevel::Warn,
                object: object.to_owned(),
                message: format!("ipFamilies lists {name:?}, neither IPv4 nor IPv6; ignored"),
            }),
        }
    }
    if families.is_empty() {
        families.push(IpFamily::V4);
    }
    families
}

/// `spec.clusterIPs` (falling back to `spec.clusterIP`), without
/// duplicates.
fn cluster_ips(spec: &ServiceSpec, object: &str, notes: &mut Vec<Note>) -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    for text in &spec.cluster_ips {
        if text.is_empty() || text == "None" {
            continue;
        }
        match text.parse::<IpAddr>() {
            Ok(address) if !addresses.contains(&address) => addresses.push(address),
            Ok(_) => {}
            Err(_) => notes.push(Note {
                level: NoteLevel::Debug,
                object: object.to_owned(),
                message: format!("clusterIP {text} is not an IP address; not served"),
            }),
        }
    }
    addresses
}

/// `spec.externalIPs`, then the load balancer's ingress IPs (not those in
/// `ipMode: Proxy`, whose load balancer does not send traffic to the
/// service's IP), without duplicates.
fn external_addresses(spec: &ServiceSpec, object: &str, notes: &mut Vec<Note>) -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    let mut add = |text: &str, field: &str, notes: &mut Vec<Note>| match text.parse::<IpAddr>() {
        Ok(address) if !addresses.contains(&address) => addresses.push(address),
        Ok(_) => {}
        Err(_) => notes.push(Note {
            level: NoteLevel::Debug,
            object: object.to_owned(),
            message: format!("{field} {text} is not an IP address; not served"),
        }),
    };
    for ip in &spec.external_ips {
        add(ip, "externalIP", notes);
    }
    if spec.service_type == "LoadBalancer" {
        for ip in &spec.ingress_ips {
            add(ip, "load-balancer ingress IP", notes);
        }
    }
    addresses
}

/// The endpoints of one service port: for each slice, the slice port with
/// the service port's name and protocol gives the port number (the
/// EndpointSlice controller resolved a named targetPort per pod); a slice
/// port without a number means "the target port", usable only when the
/// service's targetPort is a number.
fn endpoints(
    kube_port: &ServicePortSpec,
    port_name: &str,
    protocol: Protocol,
    slices: &[(&ObjectKey, &SliceObject)],
    node: &NodeInfo,
    notes: &mut Vec<Note>,
) -> Vec<Endpoint> {
    let mut found: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    let protocol = protocol.to_string();
    for (key, slice) in slices {
        let object = format!("EndpointSlice {}/{}", key.0, key.1);
        let slice_port = slice
            .ports
            .iter()
            .find(|slice_port| slice_port.name == port_name && slice_port.protocol == protocol);
        let Some(slice_port) = slice_port else {
            continue;
        };
        let port = match slice_port.port {
            Some(number) => positive_port(number),
            None => match &kube_port.target_port {
                Some(IntOrString::Int(number)) => positive_port(*number),
                None => positive_port(kube_port.port),
                Some(IntOrString::String(name)) => {
                    notes.push(Note {
                        level: NoteLevel::Warn,
                        object: object.clone(),
                        message: format!(
                            "port {port_name:?} has no number and the service's targetPort is the name {name:?}; its endpoints are not used"
                        ),
                    });
                    continue;
                }
            },
        };
        let Some(port) = port else {
            notes.push(Note {
                level: NoteLevel::Warn,
                object: object.clone(),
                message: format!(
                    "port {port_name:?} is not a port number; its endpoints are not used"
                ),
            });
            continue;
        };
        for endpoint in &slice.endpoints {
            let address = match &endpoint.address {
                EndpointAddress::Ip(address)
                    if IpFamily::from_name(&slice.address_type) == Some(IpFamily::of(*address)) =>
                {
                    *address
                }
                EndpointAddress::Missing => continue,
                EndpointAddress::Ip(address) => {
                    notes.push(Note {
                        level: NoteLevel::Warn,
                        object: object.clone(),
                        message: format!(
                            "endpoint address {address} is not of the slice's addressType {}; skipped",
                            slice.address_type
                        ),
                    });
                    continue;
                }
                EndpointAddress::Other(text) => {
                    notes.push(Note {
                        level: NoteLevel::Warn,
                        object: object.clone(),
                        message: format!("endpoint address {text} is not an IP address; skipped"),
                    });
                    continue;
                }
            };
            let is_local = match (&endpoint.node_name, &node.name) {
                (Some(endpoint_node), Some(this_node)) => **endpoint_node == **this_node,
                _ => false,
            };
            let candidate = Endpoint {
                address,
                port,
                ready: endpoint.ready,
                serving: endpoint.serving,
                terminating: endpoint.terminating,
                is_local,
                name: endpoint.name.as_deref().map(String::from),
            };
            // The same endpoint in two slices (while one is being replaced):
            // keep the first, unless only the second knows it is local.
            match found.get(&(address, port)) {
                Some(existing) if existing.is_local || !is_local => {}
                _ => {
                    found.insert((address, port), candidate);
                }
            }
        }
    }
    found.into_values().collect()
}

/// Notes not in `previous`, for logging each finding once.
pub fn new_notes<'a>(notes: &'a [Note], previous: &BTreeSet<Note>) -> Vec<&'a Note> {
    notes
        .iter()
        .filter(|note| !previous.contains(note))
        .collect()
}
