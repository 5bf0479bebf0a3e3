//! The catalog as the running agent keeps it for `/metrics` and writes it
//! as `catalog.json`: the facts of [`Catalog`], in flat rows sorted by id,
//! with each service's frontends and backends and each backend's services
//! in shared arrays. At 10,000 services and 100,000 backends that is 5 MB
//! where the `Catalog` maps, with an allocation per backend and a `String`
//! per protocol, kind and policy, took 16 MB. Serialized, it is exactly the
//! `Catalog` the CLI reads back.

use std::net::IpAddr;
use std::ops::Range;

use serde::ser::{Serialize, Serializer};

use super::{BackendState, Catalog, ServiceBackend, backend_state};
use crate::model::{self, BackendAddr, DesiredState, IpFamily, Protocol, TrafficPolicy};
use crate::reconcile::Applied;

/// What the datapath's ids mean, for the agent's own use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogRows {
    pub generation: u64,
    pub node_addresses: Vec<IpAddr>,
    /// By id.
    services: Vec<ServiceRow>,
    /// Each service's, in the order of `services`.
    frontends: Vec<FrontendRow>,
    /// Each service's, in the order of `services`.
    service_backends: Vec<ServiceBackend>,
    /// By id.
    backends: Vec<BackendRow>,
    /// The ids of each backend's services, in the order of `backends`.
    backend_services: Vec<u32>,
}

/// A service; its frontends and backends end where the next one's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRow {
    pub id: u32,
    pub namespace: Box<str>,
    pub name: Box<str>,
    pub protocol: Protocol,
    pub external_traffic_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
    frontends_end: u32,
    backends_end: u32,
}

/// Where a service answers: its own address, or every node address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrontendRow {
    /// `None`: a NodePort (on the node's addresses of `family`).
    address: Option<IpAddr>,
    family: IpFamily,
    protocol: Protocol,
    port: u16,
}

/// A backend, as `BackendInfo` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRow {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    pub local: bool,
    services_end: u32,
}

impl BackendRow {
    /// `address:port`.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }
}

/// The entries `ends[index - 1]..ends[index]` of a shared array.
fn span(index: usize, end: impl Fn(usize) -> u32) -> Range<usize> {
    let start = index.checked_sub(1).map_or(0, &end);
    start as usize..end(index) as usize
}

impl CatalogRows {
    /// What `applied` holds for `state` at `generation` (each field as
    /// `Catalog` describes it).
    pub fn build(generation: u64, state: &DesiredState, applied: &Applied) -> CatalogRows {
        let mut backend_ids: Vec<(BackendAddr, u32)> = applied
            .backends
            .iter()
            .map(|(&id, backend)| (backend.address, id))
            .collect();
        backend_ids.sort_unstable();
        let id_of = |backend: &model::Backend| {
            let address = BackendAddr::from(backend);
            let at = backend_ids
                .binary_search_by_key(&address, |&(a, _)| a)
                .ok()?;
            Some(backend_ids[at].1)
        };
        let claimed = claimed_frontends(state, applied);

        let mut rows = CatalogRows {
            generation,
            node_addresses: applied.node_addresses.iter().copied().collect(),
            ..CatalogRows::default()
        };
        // (backend id, service id, the backend as that service has it).
        let mut uses: Vec<(u32, u32, &model::Backend)> = Vec::new();
        for (index, &(id, frontend, service, name)) in claimed.iter().enumerate() {
            rows.frontends.push(frontend);
            if claimed.get(index + 1).is_some_and(|&(next, ..)| next == id) {
                continue; // More frontends of this service follow.
            }
            // A dual-stack service's halves each have the backends of their
            // family.
            let family = frontend.family;
            let of_family =
                (service.backends.iter()).filter(|backend| IpFamily::of(backend.address) == family);
            for backend in of_family {
                let Some(backend_id) = id_of(backend) else {
                    continue;
                };
                rows.service_backends.push(ServiceBackend {
                    id: backend_id,
                    weight: backend.weight,
                    state: backend_state(backend),
                });
                uses.push((backend_id, id, backend));
            }
            rows.services.push(ServiceRow {
                id,
                namespace: service.namespace.as_str().into(),
                name: name.into(),
                protocol: service.protocol,
                external_traffic_policy: service.external_traffic_policy,
                health_check_node_port: service.health_check_node_port,
                frontends_end: u32::try_from(rows.frontends.len()).unwrap_or(u32::MAX),
                backends_end: u32::try_from(rows.service_backends.len()).unwrap_or(u32::MAX),
            });
        }
        drop(claimed);
        rows.add_backends(uses);
        rows.shrink();
        rows
    }

    /// The backend rows, from each (backend id, service id, the backend as
    /// that service has it) in service id order.
    fn add_backends(&mut self, mut uses: Vec<(u32, u32, &model::Backend)>) {
        let rows = self;
        // By backend; within one, by service id (a stable sort keeps them
        // in the order they were visited).
        uses.sort_by_key(|&(backend_id, ..)| backend_id);
        for (index, &(backend_id, service_id, backend)) in uses.iter().enumerate() {
            let first = index == 0 || uses[index - 1].0 != backend_id;
            if first {
                rows.backends.push(BackendRow {
                    id: backend_id,
                    address: backend.address,
                    port: backend.port,
                    weight: backend.weight,
                    state: backend_state(backend),
                    local: backend.is_local,
                    services_end: 0,
                });
            }
            let Some(row) = rows.backends.last_mut() else {
                continue;
            };
            // The most usable state any service gives it.
            row.state = row.state.min(backend_state(backend));
            if first || uses[index - 1].1 != service_id {
                rows.backend_services.push(service_id);
            }
            row.services_end = u32::try_from(rows.backend_services.len()).unwrap_or(u32::MAX);
        }
    }

    /// Exactly as long as the rows (the build pushes without knowing how
    /// many come).
    fn shrink(&mut self) {
        self.services.shrink_to_fit();
        self.frontends.shrink_to_fit();
        self.service_backends.shrink_to_fit();
        self.backends.shrink_to_fit();
        self.backend_services.shrink_to_fit();
    }

    /// Services, by id.
    pub fn services(&self) -> &[ServiceRow] {
        &self.services
    }

    /// Backends, by id.
    pub fn backends(&self) -> &[BackendRow] {
        &self.backends
    }

    /// Service `id`.
    pub fn service(&self, id: u32) -> Option<&ServiceRow> {
        let at = self.services.binary_search_by_key(&id, |s| s.id).ok()?;
        self.services.get(at)
    }

    fn service_index(&self, service: &ServiceRow) -> usize {
        self.services
            .binary_search_by_key(&service.id, |s| s.id)
            .unwrap_or(0)
    }

    /// How `service` uses each of its backends.
    pub fn backends_of(&self, service: &ServiceRow) -> &[ServiceBackend] {
        let index = self.service_index(service);
        &self.service_backends[span(index, |i| self.services[i].backends_end)]
    }

    /// The node addresses of `family` (IPv4 sort before IPv6).
    fn node_addresses_of(&self, family: IpFamily) -> &[IpAddr] {
        let first_v6 = self.node_addresses.partition_point(IpAddr::is_ipv4);
        match family {
            IpFamily::V4 => &self.node_addresses[..first_v6],
            IpFamily::V6 => &self.node_addresses[first_v6..],
        }
    }

    fn frontends_of(&self, service: &ServiceRow) -> &[FrontendRow] {
        let index = self.service_index(service);
        &self.frontends[span(index, |i| self.services[i].frontends_end)]
    }

    /// Ids of the services that use `backend`.
    pub fn services_of(&self, backend: &BackendRow) -> &[u32] {
        let index = self
            .backends
            .binary_search_by_key(&backend.id, |b| b.id)
            .unwrap_or(0);
        &self.backend_services[span(index, |i| self.backends[i].services_end)]
    }

    /// The `Catalog` these rows stand for (what `catalog.json` holds).
    pub fn to_catalog(&self) -> Catalog {
        // The serialized rows are a `Catalog` by construction; this is the
        // one place both shapes must agree, and the tests check it.
        serde_json::to_value(self)
            .and_then(serde_json::from_value)
            .unwrap_or_default()
    }
}

/// Each frontend `applied` holds with the desired service that has it, by
/// service id (in `applied` order within one id, as the catalog lists
/// them). Entries no desired service names (written by an older config,
/// about to be removed) are left out.
///
/// Each comes with the name the entry has: the service's, or with the
/// suffix of a table of its own (` (cluster IP)`, ` (IPv6)`).
fn claimed_frontends<'a>(
    state: &'a DesiredState,
    applied: &'a Applied,
) -> Vec<(u32, FrontendRow, &'a model::Service, &'a str)> {
    let mut by_name: Vec<(&str, &str, &model::Service)> = state
        .services
        .iter()
        .map(|service| (service.namespace.as_str(), service.name.as_str(), service))
        .collect();
    by_name.sort_unstable_by_key(|&(namespace, name, _)| (namespace, name));
    let service_named = |qualified: &'a str| {
        let (namespace, shown) = qualified.split_once('/')?;
        let name = shown.strip_suffix(" (IPv6)").unwrap_or(shown);
        let name = name.strip_suffix(" (cluster IP)").unwrap_or(name);
        let at = by_name
            .binary_search_by_key(&(namespace, name), |&(n, m, _)| (n, m))
            .ok()?;
        Some((by_name[at].2, shown))
    };
    // Each frontend with its service, by service id (frontends in
    // `applied` order within one id, as the catalog lists them).
    let mut claimed: Vec<(u32, FrontendRow, &model::Service, &str)> = applied
        .services
        .iter()
        .filter_map(|(frontend, entry)| {
            // Unnamed: written by an older config, about to be removed.
            let (service, shown) = service_named(&entry.name)?;
            let row = FrontendRow {
                address: frontend.address,
                family: frontend.family,
                protocol: frontend.protocol,
                port: frontend.port,
            };
            Some((entry.entry.id, row, service, shown))
        })
        .collect();
    claimed.sort_by_key(|&(id, ..)| id);
    claimed
}

/// Serializes a value as its `Display` text (protocols, policies).
struct Text<T>(T);

impl<T: std::fmt::Display> Serialize for Text<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// `FrontendInfo`, borrowed.
#[derive(serde::Serialize)]
struct FrontendView<'a> {
    kind: &'static str,
    protocol: Text<Protocol>,
    port: u16,
    addresses: &'a [IpAddr],
}

/// `ServiceInfo`, borrowed.
#[derive(serde::Serialize)]
struct ServiceView<'a> {
    namespace: &'a str,
    name: &'a str,
    protocol: Text<Protocol>,
    frontends: Vec<FrontendView<'a>>,
    external_traffic_policy: Text<TrafficPolicy>,
    health_check_node_port: Option<u16>,
    backends: &'a [ServiceBackend],
}

/// `BackendInfo`, borrowed.
#[derive(serde::Serialize)]
struct BackendView<'a> {
    address: IpAddr,
    port: u16,
    weight: u32,
    state: BackendState,
    local: bool,
    services: &'a [u32],
}

/// The services map of `Catalog`, from the rows.
struct Services<'a>(&'a CatalogRows);

impl Serialize for Services<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let rows = self.0;
        serializer.collect_map(rows.services.iter().map(|service| {
            let frontends = rows
                .frontends_of(service)
                .iter()
                .map(|frontend| FrontendView {
                    kind: if frontend.address.is_some() {
                        "External"
                    } else {
                        "NodePort"
                    },
                    protocol: Text(frontend.protocol),
                    port: frontend.port,
                    addresses: match &frontend.address {
                        Some(address) => std::slice::from_ref(address),
                        None => rows.node_addresses_of(frontend.family),
                    },
                })
                .collect();
            let view = ServiceView {
                namespace: &service.namespace,
                name: &service.name,
                protocol: Text(service.protocol),
                frontends,
                external_traffic_policy: Text(service.external_traffic_policy),
                health_check_node_port: service.health_check_node_port,
                backends: rows.backends_of(service),
            };
            (service.id, view)
        }))
    }
}

/// The backends map of `Catalog`, from the rows.
struct Backends<'a>(&'a CatalogRows);

impl Serialize for Backends<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let rows = self.0;
        serializer.collect_map(rows.backends.iter().map(|backend| {
            let view = BackendView {
                address: backend.address,
                port: backend.port,
                weight: backend.weight,
                state: backend.state,
                local: backend.local,
                services: rows.services_of(backend),
            };
            (backend.id, view)
        }))
    }
}

/// `Catalog`'s fields, in its order.
#[derive(serde::Serialize)]
struct CatalogView<'a> {
    generation: u64,
    node_addresses: &'a [IpAddr],
    services: Services<'a>,
    backends: Backends<'a>,
}

impl Serialize for CatalogRows {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        CatalogView {
            generation: self.generation,
            node_addresses: &self.node_addresses,
            services: Services(self),
            backends: Backends(self),
        }
        .serialize(serializer)
    }
}
