//! The parts of Services and EndpointSlices the translation reads, kept in
//! compact structs of xlb's own. Each object from the API (or a manifest)
//! is converted as it arrives and the k8s-openapi object dropped at once:
//! a whole EndpointSlice endpoint is about 560 bytes (topology, hints,
//! zone, the target reference's uid and resourceVersion, ...), this one
//! 64 plus its names, and metadata (managedFields, annotations) is not
//! kept at all.
//!
//! Conversion keeps every value a note may quote as text (an address that
//! is not IPv4, an unknown protocol or type), so the translation's findings
//! are the same as on the full objects.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::{Endpoint as KubeEndpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};
use crate::model::{DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S, TrafficPolicy};

/// A Service, as far as load balancing goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceObject {
    /// `metadata.uid`: Events about the Service name it, so `kubectl
    /// describe service` lists them.
    pub uid: Option<Box<str>>,
    /// The `service.kubernetes.io/service-proxy-name` label: another proxy
    /// serves it.
    pub proxy_name: Option<String>,
    /// `None`: the object has no spec.
    pub spec: Option<ServiceSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `spec.type`, `ClusterIP` when unset.
    pub service_type: String,
    /// `spec.clusterIP` is `None`.
    pub headless: bool,
    /// `spec.clusterIPs`, or `spec.clusterIP` when that list is empty, as
    /// written.
    pub cluster_ips: Vec<String>,
    /// `spec.externalIPs`, as written.
    pub external_ips: Vec<String>,
    /// `spec.ipFamilies`, as written.
    pub ip_families: Vec<String>,
    /// `status.loadBalancer.ingress[].ip` of ingresses not in `ipMode:
    /// Proxy` (whose load balancer does not send traffic to the IP).
    pub ingress_ips: Vec<String>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    /// `sessionAffinity: ClientIP`'s timeout in seconds, defaulted and
    /// capped.
    pub session_affinity_timeout: Option<u32>,
    /// `spec.loadBalancerSourceRanges`, as written.
    pub source_ranges: Vec<String>,
    pub health_check_node_port: Option<i32>,
    pub ports: Vec<ServicePortSpec>,
}

/// One of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// Empty for a service's single unnamed port.
    pub name: String,
    /// `TCP` when unset.
    pub protocol: String,
    pub port: i32,
    pub node_port: Option<i32>,
    pub target_port: Option<IntOrString>,
}

/// An EndpointSlice, as far as load balancing goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceObject {
    /// The `kubernetes.io/service-name` label.
    pub service_name: Option<String>,
    pub address_type: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointObject>,
}

/// One of an EndpointSlice's `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Empty when unset.
    pub name: String,
    /// `TCP` when unset.
    pub protocol: String,
    /// `None`: "the service's target port".
    pub port: Option<i32>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointObject {
    /// The first of `addresses` (the others are the same pod's).
    pub address: EndpointAddress,
    /// `conditions.ready` (unset means ready).
    pub ready: bool,
    /// `conditions.serving` (unset means true, as kube-proxy reads it).
    pub serving: bool,
    /// `conditions.terminating` (unset means false).
    pub terminating: bool,
    pub node_name: Option<Box<str>>,
    /// The pod (`targetRef.name`) or `hostname`, for logs.
    pub name: Option<Box<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointAddress {
    /// `addresses` is empty.
    Missing,
    Ip(IpAddr),
    /// Not an IP address, as written (an FQDN slice's, or a mistake).
    Other(Box<str>),
}

impl From<KubeService> for ServiceObject {
    fn from(service: KubeService) -> Self {
        let uid = service.metadata.uid.map(String::into_boxed_str);
        let proxy_name = service
            .metadata
            .labels
            .and_then(|mut labels| labels.remove(SERVICE_PROXY_NAME_LABEL));
        let ingress_ips = service
            .status
            .as_ref()
            .and_then(|status| status.load_balancer.as_ref())
            .and_then(|load_balancer| load_balancer.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ingress| ingress.ip.clone())
            .collect();
        let spec = service.spec.map(|spec| {
            let headless = spec.cluster_ip.as_deref() == Some("None");
            let cluster_ips = match spec.cluster_ips {
                Some(ips) if !ips.is_empty() => ips,
                _ => spec.cluster_ip.into_iter().collect(),
            };
            let policy = |policy: Option<&str>| match policy {
                Some("Local") => TrafficPolicy::Local,
                _ => TrafficPolicy::Cluster,
            };
            let session_affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP"))
                .then(|| {
                    spec.session_affinity_config
                        .as_ref()
                        .and_then(|config| config.client_ip.as_ref())
                        .and_then(|client_ip| client_ip.timeout_seconds)
                        .and_then(|seconds| u32::try_from(seconds).ok())
                        .filter(|seconds| *seconds > 0)
                        .map_or(DEFAULT_AFFINITY_TIMEOUT_S, |seconds| {
                            seconds.min(MAX_AFFINITY_TIMEOUT_S)
                        })
                });
            ServiceSpec {
                service_type: spec.type_.unwrap_or_else(|| String::from("ClusterIP")),
                headless,
                cluster_ips,
                external_ips: spec.external_ips.unwrap_or_default(),
                ip_families: spec.ip_families.unwrap_or_default(),
                ingress_ips,
                external_traffic_policy: policy(spec.external_traffic_policy.as_deref()),
                internal_traffic_policy: policy(spec.internal_traffic_policy.as_deref()),
                session_affinity_timeout,
                source_ranges: spec.load_balancer_source_ranges.unwrap_or_default(),
                health_check_node_port: spec.health_check_node_port,
                ports: spec
                    .ports
                    .iter()
                    .flatten()
                    .map(|port| ServicePortSpec {
                        name: port.name.clone().unwrap_or_default(),
                        protocol: port.protocol.clone().unwrap_or_else(|| String::from("TCP")),
                        port: port.port,
                        node_port: port.node_port,
                        target_port: port.target_port.clone(),
                    })
                    .collect(),
            }
        });
        Self {
            uid,
            proxy_name,
            spec,
        }
    }
}

impl From<EndpointSlice> for SliceObject {
    fn from(slice: EndpointSlice) -> Self {
        let service_name = slice
            .metadata
            .labels
            .and_then(|mut labels| labels.remove(SERVICE_NAME_LABEL));
        let listed = slice.ports.unwrap_or_default();
        let mut ports = Vec::with_capacity(listed.len());
        ports.extend(listed.into_iter().map(|port| SlicePort {
            name: port.name.unwrap_or_default(),
            protocol: port.protocol.unwrap_or_else(|| String::from("TCP")),
            port: port.port,
        }));
        // A fresh vector: `collect` from the slice's own would reuse its
        // allocation, nine times too big, for as long as the slice is kept.
        let mut endpoints = Vec::with_capacity(slice.endpoints.len());
        endpoints.extend(slice.endpoints.into_iter().map(EndpointObject::from));
        Self {
            service_name,
            address_type: slice.address_type,
            ports,
            endpoints,
        }
    }
}

impl From<KubeEndpoint> for EndpointObject {
    fn from(endpoint: KubeEndpoint) -> Self {
        let address = match endpoint.addresses.into_iter().next() {
            None => EndpointAddress::Missing,
            Some(text) => match text.parse::<IpAddr>() {
                Ok(address) => EndpointAddress::Ip(address),
                Err(_) => EndpointAddress::Other(text.into_boxed_str()),
            },
        };
        let conditions = endpoint.conditions.unwrap_or_default();
        let name = endpoint
            .target_ref
            .and_then(|target| target.name)
            .or(endpoint.hostname);
        Self {
            address,
            ready: conditions.ready.unwrap_or(true),
            serving: conditions.serving.unwrap_or(true),
            terminating: conditions.terminating.unwrap_or(false),
            node_name: endpoint.node_name.map(String::into_boxed_str),
            name: name.map(String::into_boxed_str),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a big cluster costs per endpoint, besides its names.
    #[test]
    fn an_endpoint_is_small() {
        assert!(
            size_of::<EndpointObject>() <= 64,
            "{}",
            size_of::<EndpointObject>()
        );
    }
}
