//! What a Service or an EndpointSlice says, checked as the API server and
//! kube-proxy would read it, and the checks that need every document
//! (slices whose Service or port is missing).

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::stream::{At, Checker, Owner};
use crate::model::{
    Claim, DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S, Protocol, TrafficPolicy,
};
use crate::source::cluster::SERVICE_NAME_LABEL;
use crate::source::problem::Problem;

impl Checker {
    pub fn service(&mut self, at: &At<'_>, service: Service) {
        let Some((at, _)) = self.named_object(at, "Service", &service.metadata) else {
            return;
        };
        let problems_before = self.problems.len();
        let Some(spec) = &service.spec else {
            self.problems
                .push(at.problem("spec", "has no spec", "add spec.type and spec.ports"));
            return;
        };
        self.service_spec(&at, spec);
        self.service_ports(&at, spec);
        if self.problems.len() == problems_before {
            self.snapshot.insert_service(service);
        }
    }

    /// The spec's fields besides its ports.
    fn service_spec(&mut self, at: &At<'_>, spec: &ServiceSpec) {
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if !matches!(
            service_type,
            "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
        ) {
            self.problems.push(at.problem(
                "spec.type",
                format!("\"{service_type}\" is not a Service type"),
                "use ClusterIP, NodePort, LoadBalancer or ExternalName",
            ));
        }
        if let Some(policy) = &spec.external_traffic_policy
            && TrafficPolicy::from_name(policy).is_none()
        {
            self.problems.push(at.problem(
                "spec.externalTrafficPolicy",
                format!("\"{policy}\" is not a traffic policy"),
                "use Cluster (the default) or Local",
            ));
        }
        self.affinity(at, spec);
        for (index, ip) in spec.external_ips.iter().flatten().enumerate() {
            if ip.parse::<IpAddr>().is_err() {
                self.problems.push(at.problem(
                    &format!("spec.externalIPs[{index}]"),
                    format!("\"{ip}\" is not an IP address"),
                    "write an IP address such as 192.0.2.10 or 2001:db8::10",
                ));
            }
        }
        let ranges = spec.load_balancer_source_ranges.iter().flatten();
        for (index, range) in ranges.enumerate() {
            if !is_cidr(range) {
                self.problems.push(at.problem(
                    &format!("spec.loadBalancerSourceRanges[{index}]"),
                    format!("\"{range}\" is not a CIDR"),
                    "write a network such as 203.0.113.0/24",
                ));
            }
        }
    }

    /// `sessionAffinity` and its timeout.
    fn affinity(&mut self, at: &At<'_>, spec: &ServiceSpec) {
        if let Some(affinity) = &spec.session_affinity
            && !matches!(affinity.as_str(), "None" | "ClientIP")
        {
            self.problems.push(at.problem(
                "spec.sessionAffinity",
                format!("\"{affinity}\" is not a session affinity"),
                "use None (the default) or ClientIP",
            ));
        }
        let timeout = (spec.session_affinity_config.as_ref())
            .and_then(|config| config.client_ip.as_ref())
            .and_then(|client_ip| client_ip.timeout_seconds);
        if let Some(timeout) = timeout
            && !u32::try_from(timeout).is_ok_and(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t))
        {
            self.problems.push(at.problem(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                format!("{timeout} is out of range"),
                format!(
                    "use 1-{MAX_AFFINITY_TIMEOUT_S} seconds (default {DEFAULT_AFFINITY_TIMEOUT_S})"
                ),
            ));
        }
    }

    /// `spec.ports`: named when there are several, each a protocol and a
    /// port, with a nodePort where nothing would allocate one.
    fn service_ports(&mut self, at: &At<'_>, spec: &ServiceSpec) {
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        let ports = spec.ports.as_deref().unwrap_or_default();
        if ports.is_empty() && service_type != "ExternalName" {
            self.problems.push(at.problem(
                "spec.ports",
                "the service has no ports",
                "add spec.ports",
            ));
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (index, port) in ports.iter().enumerate() {
            let field = format!("spec.ports[{index}]");
            let name = port.name.as_deref().unwrap_or_default();
            if name.is_empty() && ports.len() > 1 {
                self.problems.push(at.problem(
                    &format!("{field}.name"),
                    "a service with several ports must name each of them",
                    "add a name (e.g. name: http) that the EndpointSlice ports repeat",
                ));
            } else if let Some(first) = names.insert(name, index) {
                self.problems.push(at.problem(
                    &format!("{field}.name"),
                    format!("\"{name}\" is also the name of spec.ports[{first}]"),
                    "give each port its own name",
                ));
            }
            self.protocol(at, &field, port.protocol.as_deref());
            self.port(at, &format!("{field}.port"), port.port, "use 1-65535");
            if let Some(IntOrString::Int(number)) = &port.target_port {
                let fix = "use 1-65535, or the name of a container port";
                self.port(at, &format!("{field}.targetPort"), *number, fix);
            }
            self.node_port(at, &field, port, spec);
        }
    }

    /// `{field}.nodePort` of a port of `spec`: a port, held by no other
    /// Service port, and set where nothing would allocate one.
    fn node_port(&mut self, at: &At<'_>, field: &str, port: &ServicePort, spec: &ServiceSpec) {
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        let has_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
        let field = format!("{field}.nodePort");
        let Some(node_port) = port.node_port else {
            if has_node_ports && spec.allocate_load_balancer_node_ports != Some(false) {
                self.problems.push(at.problem(
                    &field,
                    format!("a {service_type} port needs a nodePort here: without a cluster nothing allocates one"),
                    "set nodePort (30000-32767 by default)",
                ));
            }
            return;
        };
        let fix = "use a port in the cluster's NodePort range (30000-32767 by default)";
        let Some(number) = self.port(at, &field, node_port, fix) else {
            return;
        };
        // SCTP ports are not served, so their NodePorts are nobody's here.
        let protocol = Protocol::from_name(port.protocol.as_deref().unwrap_or("TCP"));
        let (true, Some(protocol)) = (has_node_ports, protocol) else {
            return;
        };
        let owner = Owner {
            object: at.object.clone().unwrap_or_default(),
            problem: at.problem(&field, "", ""),
        };
        let claim = Claim::NodePort {
            protocol,
            port: number,
        };
        if let Err(first) = self.node_ports.take(claim, owner) {
            let message = format!(
                "{protocol} {number} is already the nodePort of {} ({}:{})",
                first.object, first.problem.origin, first.problem.line
            );
            let fix = "give each service port its own nodePort";
            self.problems.push(at.problem(&field, message, fix));
        }
    }

    /// A port number at `field`: 1-65535.
    fn port(&mut self, at: &At<'_>, field: &str, number: i32, fix: &str) -> Option<u16> {
        let port = u16::try_from(number).ok().filter(|port| *port != 0);
        if port.is_none() {
            (self.problems).push(at.problem(field, format!("{number} is not a port"), fix));
        }
        port
    }

    /// `{field}.protocol`: TCP (the default), UDP or SCTP.
    fn protocol(&mut self, at: &At<'_>, field: &str, protocol: Option<&str>) {
        let protocol = protocol.unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
            self.problems.push(at.problem(
                &format!("{field}.protocol"),
                format!("\"{protocol}\" is not a protocol"),
                "use TCP, UDP or SCTP (upper case)",
            ));
        }
    }

    pub fn endpoint_slice(&mut self, at: &At<'_>, slice: EndpointSlice) {
        let Some((at, key)) = self.named_object(at, "EndpointSlice", &slice.metadata) else {
            return;
        };
        let problems_before = self.problems.len();
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL));
        if service.is_none() {
            self.problems.push(at.problem(
                "metadata.labels",
                format!("has no {SERVICE_NAME_LABEL} label, so it belongs to no service"),
                format!("add the label {SERVICE_NAME_LABEL}: <the Service's name>"),
            ));
        }
        let address_type = slice.address_type.as_str();
        if !matches!(address_type, "IPv4" | "IPv6" | "FQDN") {
            self.problems.push(at.problem(
                "addressType",
                format!("\"{address_type}\" is not an address type"),
                "use IPv4 or IPv6",
            ));
        } else if address_type == "FQDN" {
            self.warnings.push(at.problem(
                "addressType",
                "FQDN slices are not served (IPv4 and IPv6 are)",
                "use addressType: IPv4 or IPv6 with the pods' addresses",
            ));
        }
        for (index, port) in slice.ports.iter().flatten().enumerate() {
            let field = format!("ports[{index}]");
            if let Some(number) = port.port {
                self.port(&at, &format!("{field}.port"), number, "use 1-65535");
            }
            self.protocol(&at, &field, port.protocol.as_deref());
        }
        if slice.ports.as_deref().unwrap_or_default().is_empty() && !slice.endpoints.is_empty() {
            self.warnings.push(at.problem(
                "ports",
                "the slice lists no ports, so its endpoints serve nothing",
                "add ports: [{name: <the Service port's name, or leave out for an unnamed port>, port: N, protocol: TCP}]",
            ));
        }
        for (index, endpoint) in slice.endpoints.iter().enumerate() {
            let field = format!("endpoints[{index}].addresses");
            if endpoint.addresses.is_empty() {
                self.problems.push(at.problem(
                    &field,
                    "the endpoint has no address",
                    "list the pod's address",
                ));
            }
            let wanted = match address_type {
                "IPv4" => IpAddr::is_ipv4,
                "IPv6" => IpAddr::is_ipv6,
                _ => continue,
            };
            for (position, address) in endpoint.addresses.iter().enumerate() {
                if !address
                    .parse::<IpAddr>()
                    .is_ok_and(|address| wanted(&address))
                {
                    self.problems.push(at.problem(
                        &format!("{field}[{position}]"),
                        format!("\"{address}\" is not an {address_type} address"),
                        format!(
                            "write the pod's {address_type} address, e.g. {}, or put it in a slice of its family",
                            if address_type == "IPv4" { "10.244.1.7" } else { "fd00:10:244::7" }
                        ),
                    ));
                }
            }
        }
        if self.problems.len() == problems_before {
            let here = at.problem("metadata.labels", "", "");
            self.slices.push((key, here));
            self.snapshot.insert_endpoint_slice(slice);
        }
    }

    /// Findings that need every document: slices whose service is missing
    /// or has no port of that name.
    pub fn cross_check(&mut self) {
        for (key, here) in &self.slices {
            let Some(slice) = self.snapshot.endpoint_slices.get(key) else {
                continue;
            };
            let Some(service_name) = &slice.service_name else {
                continue;
            };
            let service_key = (key.0.clone(), service_name.clone());
            let Some(service) = self.snapshot.services.get(&service_key) else {
                self.warnings.push(Problem {
                    message: format!(
                        "its Service {}/{service_name} is not in the manifests, so the slice is unused",
                        key.0
                    ),
                    fix: format!("add the Service, or correct the {SERVICE_NAME_LABEL} label"),
                    ..here.clone()
                });
                continue;
            };
            let service_ports: Vec<String> = service
                .spec
                .iter()
                .flat_map(|spec| &spec.ports)
                .map(|port| port.name.clone())
                .collect();
            for port in &slice.ports {
                let name = port.name.clone();
                if !service_ports.contains(&name) {
                    let shown: Vec<String> = service_ports
                        .iter()
                        .map(|name| format!("{name:?}"))
                        .collect();
                    self.warnings.push(Problem {
                        field: String::from("ports"),
                        message: format!(
                            "port name {name:?} matches no port of Service {}/{service_name} ({})",
                            key.0,
                            shown.join(", ")
                        ),
                        fix: String::from(
                            "use the Service port's name (empty for a single unnamed port)",
                        ),
                        ..here.clone()
                    });
                }
            }
        }
    }
}

/// `network/length`, IPv4 or IPv6, as Kubernetes accepts for
/// `loadBalancerSourceRanges`.
fn is_cidr(range: &str) -> bool {
    range.split_once('/').is_some_and(|(address, length)| {
        let length: Option<u8> = length.parse().ok();
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => length.is_some_and(|length| length <= 32),
            Ok(IpAddr::V6(_)) => length.is_some_and(|length| length <= 128),
            Err(_) => false,
        }
    })
}
