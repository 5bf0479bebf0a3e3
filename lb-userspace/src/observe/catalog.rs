//! `catalog.json`: what the datapath's numeric ids mean. The counters and
//! conntrack entries carry service and backend ids; this says which
//! namespace/name, frontends, address, weight and state each id stands for.
//! Built from the applied config and the reconciler's mirror of the maps
//! (`rows`: the compact form the agent keeps and writes).

mod rows;

pub use rows::{BackendRow, CatalogRows, ServiceRow};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// The config generation this describes.
    pub generation: u64,
    /// Addresses NodePorts answer on.
    pub node_addresses: Vec<IpAddr>,
    /// By service id (`Flow::service_id`, index in `XLB_SERVICE_STATS`).
    pub services: BTreeMap<u32, ServiceInfo>,
    /// By backend id (`Flow::backend_id`, index in `XLB_BACKEND_STATS`).
    pub backends: BTreeMap<u32, BackendInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    pub frontends: Vec<FrontendInfo>,
    /// `Cluster` or `Local`.
    pub external_traffic_policy: String,
    pub health_check_node_port: Option<u16>,
    pub backends: Vec<ServiceBackend>,
}

impl ServiceInfo {
    /// `namespace/name`.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `query` (`name` or `namespace/name`) names this service: a
    /// Service's name names its tables of its own too (`name (IPv6)`,
    /// `name (cluster IP)`), unless the query names one of those.
    pub fn matches(&self, query: &str) -> bool {
        let (namespace, name) = match query.split_once('/') {
            Some((namespace, name)) => (Some(namespace), name),
            None => (None, query),
        };
        let own = self.name == name
            || (self.name.strip_prefix(name))
                .is_some_and(|rest| rest == " (IPv6)" || rest.starts_with(" (cluster IP)"));
        own && namespace.is_none_or(|namespace| namespace == self.namespace)
    }
}

/// Where a service answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendInfo {
    /// `NodePort` (on every node address), or `External` (a load-balancer
    /// ingress or external IP of the service, on its own address).
    pub kind: String,
    pub protocol: String,
    pub port: u16,
    /// The addresses it answers on (for a NodePort: every node address).
    pub addresses: Vec<IpAddr>,
}

/// One of a service's backends, as that service uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBackend {
    pub id: u32,
    pub weight: u32,
    pub state: BackendState,
}

/// A backend (address and port) and the services that send to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub address: IpAddr,
    pub port: u16,
    /// As its first service weighs it (see `ServiceBackend` for each).
    pub weight: u32,
    pub state: BackendState,
    /// Whether it runs on this node (externalTrafficPolicy=Local).
    pub local: bool,
    /// Ids of the services that use it.
    pub services: Vec<u32>,
}

impl BackendInfo {
    /// `address:port`.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }
}

/// An endpoint's condition, as Kubernetes EndpointSlices report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Ready: gets new flows.
    Ready,
    /// Terminating but still serving: gets new flows only while the service
    /// has no ready backend.
    Serving,
    /// Terminating and not serving: keeps its flows, gets no new ones.
    Terminating,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Ready => "ready",
            BackendState::Serving => "serving",
            BackendState::Terminating => "terminating",
        })
    }
}

/// The state a model backend is in.
pub fn backend_state(backend: &model::Backend) -> BackendState {
    if backend.ready {
        BackendState::Ready
    } else if backend.serving {
        BackendState::Serving
    } else {
        BackendState::Terminating
    }
}

impl Catalog {
    /// Ids of the services `query` (`name` or `namespace/name`) names.
    pub fn services_matching(&self, query: &str) -> BTreeSet<u32> {
        self.services
            .iter()
            .filter(|(_, service)| service.matches(query))
            .map(|(&id, _)| id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{BackendAddr, DesiredState};
    use crate::reconcile::{self, Applied, Capacity, Desired, NodeFacts};
    use crate::source::yaml::{self, Overrides};

    /// A service's entry, before its frontends are added.
    fn service_info(
        service: &model::Service,
        backend_ids: &BTreeMap<BackendAddr, u32>,
    ) -> ServiceInfo {
        ServiceInfo {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            protocol: service.protocol.to_string(),
            frontends: Vec::new(),
            external_traffic_policy: service.external_traffic_policy.to_string(),
            health_check_node_port: service.health_check_node_port,
            backends: service
                .backends
                .iter()
                .filter_map(|backend| {
                    Some(ServiceBackend {
                        id: *backend_ids.get(&BackendAddr::from(backend))?,
                        weight: backend.weight,
                        state: backend_state(backend),
                    })
                })
                .collect(),
        }
    }

    /// The catalog of what `applied` holds for `state` at `generation`,
    /// built straight into the maps (as the agent did before it kept
    /// rows): what `CatalogRows` must serialize to.
    fn reference(generation: u64, state: &DesiredState, applied: &Applied) -> Catalog {
        let node_addresses: Vec<IpAddr> = applied.node_addresses.iter().copied().collect();
        let backend_ids: BTreeMap<BackendAddr, u32> = applied
            .backends
            .iter()
            .map(|(&id, backend)| (backend.address, id))
            .collect();
        let by_name: BTreeMap<String, &model::Service> = state
            .services
            .iter()
            .map(|service| (service.qualified_name(), service))
            .collect();

        let mut services: BTreeMap<u32, ServiceInfo> = BTreeMap::new();
        for (frontend, entry) in &applied.services {
            let Some(service) = by_name.get(&entry.name) else {
                continue; // Written by an older config, about to be removed.
            };
            let info = services
                .entry(entry.entry.id)
                .or_insert_with(|| service_info(service, &backend_ids));
            let (kind, addresses) = match frontend.address {
                None => ("NodePort", node_addresses.clone()),
                Some(address) => ("External", vec![address]),
            };
            // Most services have one or two: growing by doubling would
            // hold four (80 bytes each) for every one of 10,000s.
            info.frontends.reserve_exact(1);
            info.frontends.push(FrontendInfo {
                kind: kind.to_owned(),
                protocol: frontend.protocol.to_string(),
                port: frontend.port,
                addresses,
            });
        }

        let mut backends: BTreeMap<u32, BackendInfo> = BTreeMap::new();
        for (&service_id, info) in &services {
            let Some(service) = by_name.get(&info.qualified_name()) else {
                continue;
            };
            for backend in &service.backends {
                let Some(&id) = backend_ids.get(&BackendAddr::from(backend)) else {
                    continue;
                };
                let entry = backends.entry(id).or_insert_with(|| BackendInfo {
                    address: backend.address,
                    port: backend.port,
                    weight: backend.weight,
                    state: backend_state(backend),
                    local: backend.is_local,
                    services: Vec::new(),
                });
                // The most usable state any service gives it.
                entry.state = entry.state.min(backend_state(backend));
                if !entry.services.contains(&service_id) {
                    entry.services.push(service_id);
                }
            }
        }
        Catalog {
            generation,
            node_addresses,
            services,
            backends,
        }
    }

    const CONFIG: &str = r#"
node:
  interfaces: [lo]
  addresses: [198.18.0.1]
services:
  - name: tcp-echo
    protocol: TCP
    nodePort: 30999
    targetPort: 3333
    backends:
      - address: 198.18.1.2
        weight: 2
      - address: 198.18.2.2
  - name: dns
    namespace: kube-system
    protocol: UDP
    nodePort: 30053
    targetPort: 3333
    backends:
      - address: 198.18.1.2
  - name: web
    protocol: TCP
    port: 80
    frontends: [198.18.200.10, 198.18.200.11]
    targetPort: 8080
    externalTrafficPolicy: Local
    backends:
      - address: 198.18.3.2
      - address: 198.18.1.2
        port: 3333
        weight: 3
"#;

    fn applied_demo() -> (DesiredState, Applied) {
        let config = yaml::parse("t.yaml", CONFIG, &Overrides::default());
        let config = config.unwrap_or_else(|error| panic!("{error}"));
        let desired = Desired::new(&config.state, &NodeFacts::default());
        let mut applied = Applied::default();
        let ops = reconcile::diff(&applied, &desired, &Capacity::default());
        for op in &ops.unwrap_or_else(|error| panic!("{error}")) {
            applied.record(op);
        }
        (config.state, applied)
    }

    #[test]
    fn ids_resolve_to_names_frontends_and_backends() {
        let (state, applied) = applied_demo();
        let catalog = CatalogRows::build(4, &state, &applied).to_catalog();
        assert_eq!(catalog, reference(4, &state, &applied));
        assert_eq!(catalog.generation, 4);
        assert_eq!(catalog.node_addresses, [IpAddr::from([198, 18, 0, 1])]);
        assert_eq!(catalog.services.len(), 3);
        let tcp = catalog.services_matching("default/tcp-echo");
        let &tcp_id = tcp.iter().next().unwrap();
        let tcp = &catalog.services[&tcp_id];
        assert_eq!(
            (
                tcp.protocol.as_str(),
                tcp.frontends[0].port,
                tcp.backends.len()
            ),
            ("TCP", 30999, 2)
        );
        assert_eq!(tcp.frontends[0].addresses, catalog.node_addresses);
        let heavy = tcp.backends.iter().find(|b| b.weight == 2).unwrap();
        assert_eq!(
            catalog.backends[&heavy.id].address,
            IpAddr::from([198, 18, 1, 2])
        );
        // The same address and port in two services is one backend id.
        let dns = catalog.services_matching("dns");
        assert_eq!(dns, catalog.services_matching("kube-system/dns"));
        let dns = &catalog.services[dns.iter().next().unwrap()];
        assert_eq!(dns.backends[0].id, heavy.id);
        assert_eq!(catalog.backends[&heavy.id].services.len(), 3);
        let web = &catalog.services[catalog.services_matching("web").iter().next().unwrap()];
        assert_eq!(
            (web.frontends.len(), web.frontends[1].kind.as_str()),
            (2, "External")
        );
        assert!(catalog.services_matching("other/dns").is_empty());

        let json = serde_json::to_string(&catalog).unwrap();
        let back: Catalog = serde_json::from_str(&json).unwrap();
        assert_eq!(back, catalog);
        assert!(json.contains("\"state\":\"ready\""), "{json}");
    }

    #[test]
    fn a_services_name_matches_its_own_tables_too() {
        let named = |name: &str| ServiceInfo {
            namespace: String::from("default"),
            name: name.to_owned(),
            protocol: String::from("UDP"),
            frontends: Vec::new(),
            external_traffic_policy: String::from("Cluster"),
            health_check_node_port: None,
            backends: Vec::new(),
        };
        for name in [
            "dns",
            "dns (IPv6)",
            "dns (cluster IP)",
            "dns (cluster IP) (IPv6)",
        ] {
            assert!(named(name).matches("dns"), "{name}");
            assert!(named(name).matches("default/dns"), "{name}");
            assert!(!named(name).matches("kube-system/dns"), "{name}");
        }
        assert!(named("dns (IPv6)").matches("dns (IPv6)"));
        assert!(!named("dns").matches("dns (IPv6)"));
        assert!(!named("dns-cache").matches("dns"));
    }
}
