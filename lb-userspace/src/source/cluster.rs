//! The Kubernetes objects a node's load balancing depends on, as the API
//! (`kube`) or manifest files (`manifests`) give them: what both readers
//! fill and the Kubernetes source translates.

mod objects;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use objects::{
    EndpointAddress, EndpointObject, ServiceObject, ServicePortSpec, ServiceSpec, SliceObject,
    SlicePort,
};

/// Label that binds an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label that hands a Service (and its slices) to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// `(namespace, name)` of a namespaced object.
pub type ObjectKey = (String, String);

/// The Kubernetes objects a node's load balancing depends on, as far as it
/// depends on them ([`ServiceObject`], [`SliceObject`]: converted on
/// arrival, the full objects are not kept). Objects and the maps of them
/// are shared (`Arc`): the watch keeps them and the view it publishes holds
/// the same maps (the watch copies a map only when it changes one the view
/// still holds), so a big cluster is in memory once, not once per copy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterSnapshot {
    pub services: Arc<BTreeMap<ObjectKey, Arc<ServiceObject>>>,
    pub endpoint_slices: Arc<BTreeMap<ObjectKey, Arc<SliceObject>>>,
}

impl ClusterSnapshot {
    /// Adds or replaces a Service (an object without a namespace is in
    /// `default`, as kubectl would put it).
    pub fn insert_service(&mut self, service: Service) {
        let key = key_of(&service.metadata);
        Arc::make_mut(&mut self.services).insert(key, Arc::new(service.into()));
    }

    pub fn insert_endpoint_slice(&mut self, slice: EndpointSlice) {
        let key = key_of(&slice.metadata);
        Arc::make_mut(&mut self.endpoint_slices).insert(key, Arc::new(slice.into()));
    }
}

/// `(namespace, name)` of an object's metadata (`default` namespace when
/// unset).
pub fn key_of(metadata: &ObjectMeta) -> ObjectKey {
    (
        metadata
            .namespace
            .clone()
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or_else(|| String::from("default")),
        metadata.name.clone().unwrap_or_default(),
    )
}
