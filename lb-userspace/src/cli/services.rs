//! `xlb services`: every service's frontends and backends, with weight,
//! state and the packets and bytes the datapath forwarded for each.

use std::fmt::Write as _;
use std::net::IpAddr;

use lb_common::Traffic;
use serde::Serialize;

use super::table::{self, Align, Table};
use super::{CliError, Report, Session};
use crate::observe::catalog::{BackendState, Catalog};
use crate::observe::datapath::DatapathError;

#[derive(Debug, Serialize)]
pub struct ServicesReport {
    /// The config generation the catalog describes.
    pub generation: u64,
    pub services: Vec<ServiceReport>,
}

#[derive(Debug, Serialize)]
pub struct ServiceReport {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub protocol: String,
    pub frontends: Vec<FrontendReport>,
    pub external_traffic_policy: String,
    pub health_check_node_port: Option<u16>,
    /// Everything forwarded for the service.
    pub traffic: TrafficReport,
    pub backends: Vec<BackendReport>,
}

#[derive(Debug, Serialize)]
pub struct FrontendReport {
    pub address: IpAddr,
    pub protocol: String,
    pub port: u16,
    /// `NodePort`.
    pub kind: String,
}

#[derive(Debug, Serialize)]
pub struct BackendReport {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    /// Forwarded to and from this backend, for every service that uses it.
    pub traffic: TrafficReport,
}

/// Forwarded packets and bytes (whole frames), per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrafficReport {
    pub to_backend_packets: u64,
    pub to_backend_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

impl From<Traffic> for TrafficReport {
    fn from(traffic: Traffic) -> Self {
        Self {
            to_backend_packets: traffic.to_backend_packets,
            to_backend_bytes: traffic.to_backend_bytes,
            to_client_packets: traffic.to_client_packets,
            to_client_bytes: traffic.to_client_bytes,
        }
    }
}

pub fn report(session: &Session) -> Result<ServicesReport, CliError> {
    build(
        &session.catalog,
        |id| session.maps.service_traffic(id),
        |id| session.maps.backend_traffic(id),
    )
}

fn build(
    catalog: &Catalog,
    service_traffic: impl Fn(u32) -> Result<Traffic, DatapathError>,
    backend_traffic: impl Fn(u32) -> Result<Traffic, DatapathError>,
) -> Result<ServicesReport, CliError> {
    let mut services = Vec::with_capacity(catalog.services.len());
    for (&id, service) in &catalog.services {
        let frontends = service
            .frontends
            .iter()
            .flat_map(|frontend| {
                frontend.addresses.iter().map(|&address| FrontendReport {
                    address,
                    protocol: frontend.protocol.clone(),
                    port: frontend.port,
                    kind: frontend.kind.clone(),
                })
            })
            .collect();
        let mut backends = Vec::with_capacity(service.backends.len());
        for usage in &service.backends {
            let Some(backend) = catalog.backends.get(&usage.id) else {
                continue;
            };
            backends.push(BackendReport {
                id: usage.id,
                address: backend.address,
                port: backend.port,
                weight: usage.weight,
                state: usage.state,
                traffic: backend_traffic(usage.id)?.into(),
            });
        }
        services.push(ServiceReport {
            id,
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            protocol: service.protocol.clone(),
            frontends,
            external_traffic_policy: service.external_traffic_policy.clone(),
            health_check_node_port: service.health_check_node_port,
            traffic: service_traffic(id)?.into(),
            backends,
        });
    }
    Ok(ServicesReport {
        generation: catalog.generation,
        services,
    })
}

impl Report for ServicesReport {
    fn render(&self) -> String {
        let mut out = String::new();
        if self.services.is_empty() {
            out.push_str(
                "no services (the config has none, or the agent has not applied it yet)\n",
            );
        }
        for (index, service) in self.services.iter().enumerate() {
            if index > 0 {
                out.push('\n');
            }
            let frontends: Vec<String> = service
                .frontends
                .iter()
                .map(|f| format!("{}:{}/{}", f.address, f.port, f.protocol))
                .collect();
            let frontends = if frontends.is_empty() {
                String::from("(no node address)")
            } else {
                frontends.join(", ")
            };
            let kind = service
                .frontends
                .first()
                .map_or("NodePort", |f| f.kind.as_str());
            let mut header = format!(
                "{}/{}  {frontends}  {kind}",
                service.namespace, service.name
            );
            if service.external_traffic_policy != "Cluster" {
                let _ = write!(
                    header,
                    ", externalTrafficPolicy={}",
                    service.external_traffic_policy
                );
            }
            if let Some(port) = service.health_check_node_port {
                let _ = write!(header, ", healthCheckNodePort {port}");
            }
            let _ = writeln!(out, "{header}");
            let mut table = Table::new(&[
                ("BACKEND", Align::Left),
                ("WEIGHT", Align::Right),
                ("STATE", Align::Left),
                ("PKTS TO BACKEND", Align::Right),
                ("BYTES", Align::Right),
                ("PKTS TO CLIENT", Align::Right),
                ("BYTES", Align::Right),
            ])
            .indented(2);
            for backend in &service.backends {
                table.row(traffic_row(
                    format!("{}:{}", backend.address, backend.port),
                    backend.weight.to_string(),
                    backend.state.to_string(),
                    &backend.traffic,
                ));
            }
            table.row(traffic_row(
                String::from("(service total)"),
                String::new(),
                String::new(),
                &service.traffic,
            ));
            out.push_str(&table.render());
            if service.backends.is_empty() {
                out.push_str("  no backends: new flows are rejected\n");
            }
        }
        out
    }
}

fn traffic_row(
    name: String,
    weight: String,
    state: String,
    traffic: &TrafficReport,
) -> Vec<String> {
    vec![
        name,
        weight,
        state,
        traffic.to_backend_packets.to_string(),
        table::bytes(traffic.to_backend_bytes),
        traffic.to_client_packets.to_string(),
        table::bytes(traffic.to_client_bytes),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::observe::catalog::{BackendInfo, FrontendInfo, ServiceBackend, ServiceInfo};

    fn catalog() -> Catalog {
        let node = IpAddr::from([198, 18, 0, 1]);
        let backend = |last: u8| BackendInfo {
            address: IpAddr::from([198, 18, last, 2]),
            port: 3333,
            weight: 1,
            state: BackendState::Ready,
            local: false,
            services: vec![1],
        };
        Catalog {
            generation: 2,
            node_addresses: vec![node],
            services: BTreeMap::from([(
                1,
                ServiceInfo {
                    namespace: String::from("default"),
                    name: String::from("tcp-echo"),
                    protocol: String::from("TCP"),
                    frontends: vec![FrontendInfo {
                        kind: String::from("NodePort"),
                        protocol: String::from("TCP"),
                        port: 30999,
                        addresses: vec![node],
                    }],
                    external_traffic_policy: String::from("Cluster"),
                    health_check_node_port: None,
                    backends: vec![
                        ServiceBackend {
                            id: 1,
                            weight: 1,
                            state: BackendState::Ready,
                        },
                        ServiceBackend {
                            id: 2,
                            weight: 3,
                            state: BackendState::Terminating,
                        },
                    ],
                },
            )]),
            backends: BTreeMap::from([(1, backend(1)), (2, backend(2))]),
        }
    }

    fn traffic(packets: u64) -> Traffic {
        Traffic {
            to_backend_packets: packets,
            to_backend_bytes: packets * 100,
            to_client_packets: packets / 2,
            to_client_bytes: packets * 50,
        }
    }

    #[test]
    fn backends_under_their_frontends_with_counters() {
        let report = build(
            &catalog(),
            |_| Ok(traffic(30)),
            |id| Ok(traffic(u64::from(id) * 10)),
        );
        let report = report.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            report.render(),
            "default/tcp-echo  198.18.0.1:30999/TCP  NodePort\n\
             \x20 BACKEND          WEIGHT  STATE        PKTS TO BACKEND    BYTES  PKTS TO CLIENT    BYTES\n\
             \x20 198.18.1.2:3333       1  ready                     10   1000 B               5    500 B\n\
             \x20 198.18.2.2:3333       3  terminating               20  2.0 KiB              10   1000 B\n\
             \x20 (service total)                                    30  2.9 KiB              15  1.5 KiB\n"
        );
        let json = serde_json::to_value(&report).unwrap();
        let backend = &json["services"][0]["backends"][1];
        assert_eq!(backend["state"], "terminating");
        assert_eq!(backend["weight"], 3);
        assert_eq!(backend["traffic"]["to_backend_packets"], 20);
        assert_eq!(json["services"][0]["frontends"][0]["port"], 30999);
    }
}
