//! healthCheckNodePort servers, as kube-proxy runs them: for every service
//! with externalTrafficPolicy=Local and a health check node port, an HTTP
//! server on that port of every node address. It answers 200 while this
//! node has ready local endpoints for the service and xlb is healthy, 503
//! otherwise, so an external load balancer sends traffic only to nodes that
//! can serve it without leaving the node. Servers start and stop as the
//! applied config changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::JoinHandle;

use super::http::{self, Request, Response};
use crate::model::{DesiredState, TrafficPolicy};

/// What one health check server reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Distinct addresses of this node's ready endpoints (kube-proxy counts
    /// addresses, not address:port pairs, and not terminating endpoints).
    pub local_endpoints: usize,
}

impl HealthCheck {
    /// Status, headers and JSON fields as kube-proxy answers.
    fn answer(&self, proxy_healthy: bool) -> Response {
        let body = serde_json::json!({
            "service": {"namespace": self.namespace, "name": self.name},
            "localEndpoints": self.local_endpoints,
            "serviceProxyHealthy": proxy_healthy,
        });
        let status = if self.local_endpoints > 0 && proxy_healthy {
            200
        } else {
            503
        };
        let mut response = Response::json(status, &body);
        response.headers.push((
            "X-Load-Balancing-Endpoint-Weight",
            self.local_endpoints.to_string(),
        ));
        response
    }
}

/// The health checks a config asks for, by port (the first service to
/// claim a port gets it).
pub fn wanted(state: &DesiredState) -> Vec<HealthCheck> {
    let mut by_port: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    for service in &state.services {
        if service.external_traffic_policy != TrafficPolicy::Local {
            continue;
        }
        let Some(port) = service.health_check_node_port.filter(|&port| port != 0) else {
            continue;
        };
        let local: BTreeSet<std::net::IpAddr> = service
            .backends
            .iter()
            .filter(|backend| backend.is_local && backend.ready)
            .map(|backend| backend.address)
            .collect();
        by_port.entry(port).or_insert_with(|| HealthCheck {
            port,
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            local_endpoints: local.len(),
        });
    }
    by_port.into_values().collect()
}

struct Running {
    check: Arc<Mutex<HealthCheck>>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The running servers. Needs a tokio runtime.
pub struct HealthServers {
    running: BTreeMap<u16, Running>,
    /// `serviceProxyHealthy`: the agent is ready.
    proxy_healthy: Arc<AtomicBool>,
    bind_address: Ipv4Addr,
}

impl HealthServers {
    /// Servers on every address (0.0.0.0), as kube-proxy's.
    pub fn new(proxy_healthy: Arc<AtomicBool>) -> Self {
        Self::bound_to(Ipv4Addr::UNSPECIFIED, proxy_healthy)
    }

    pub fn bound_to(bind_address: Ipv4Addr, proxy_healthy: Arc<AtomicBool>) -> Self {
        Self {
            running: BTreeMap::new(),
            proxy_healthy,
            bind_address,
        }
    }

    /// Ports served now.
    pub fn ports(&self) -> Vec<u16> {
        self.running.keys().copied().collect()
    }

    /// Makes the running servers those of `wanted`: stops the others,
    /// updates the counts of those that stay, starts the new ones. Returns a
    /// message for each port that could not be opened (tried again at the
    /// next update).
    pub fn update(&mut self, wanted: Vec<HealthCheck>) -> Vec<String> {
        let ports: BTreeSet<u16> = wanted.iter().map(|check| check.port).collect();
        self.running.retain(|port, _| ports.contains(port));
        let mut failures = Vec::new();
        for check in wanted {
            if let Some(running) = self.running.get(&check.port) {
                *running.check.lock().unwrap_or_else(PoisonError::into_inner) = check;
                continue;
            }
            let port = check.port;
            match self.start(check) {
                Ok(running) => {
                    self.running.insert(port, running);
                }
                Err(message) => failures.push(message),
            }
        }
        failures
    }

    fn start(&self, check: HealthCheck) -> Result<Running, String> {
        let address = SocketAddr::from((self.bind_address, check.port));
        let describe = |error: std::io::Error| {
            format!(
                "healthCheckNodePort {} of {}/{}: cannot listen on {address}: {error}; \
                 is another process (kube-proxy?) using the port?",
                check.port, check.namespace, check.name
            )
        };
        let listener = std::net::TcpListener::bind(address).map_err(describe)?;
        listener.set_nonblocking(true).map_err(describe)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(describe)?;
        let check = Arc::new(Mutex::new(check));
        let shared = Arc::clone(&check);
        let healthy = Arc::clone(&self.proxy_healthy);
        let task = tokio::spawn(http::serve(listener, move |_request: Request| {
            let check = Arc::clone(&shared);
            let healthy = Arc::clone(&healthy);
            async move {
                let check = check.lock().unwrap_or_else(PoisonError::into_inner).clone();
                check.answer(healthy.load(Ordering::Relaxed))
            }
        }));
        Ok(Running { check, task })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(port: u16, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            port,
            namespace: String::from("default"),
            name: String::from("web"),
            local_endpoints,
        }
    }

    #[test]
    fn answers_like_kube_proxy() {
        let answer = check(1, 2).answer(true);
        assert_eq!(answer.status, 200);
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "service": {"namespace": "default", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true
            })
        );
        assert!(
            answer
                .headers
                .contains(&("X-Load-Balancing-Endpoint-Weight", String::from("2")))
        );
        assert_eq!(check(1, 0).answer(true).status, 503);
        assert_eq!(check(1, 2).answer(false).status, 503);
    }

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[test]
    fn servers_follow_updates() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let healthy = Arc::new(AtomicBool::new(true));
            let mut servers = HealthServers::bound_to(Ipv4Addr::LOCALHOST, Arc::clone(&healthy));
            let (first, second) = (free_port(), free_port());
            let get = |port: u16| {
                tokio::task::spawn_blocking(move || {
                    http::get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "/")
                        .map(|(status, _)| status)
                        .map_err(|error| error.kind())
                })
            };
            assert!(servers.update(vec![check(first, 1)]).is_empty());
            assert_eq!(get(first).await.unwrap(), Ok(200));
            // The count changes in place; a second service gets a server.
            let failures = servers.update(vec![check(first, 0), check(second, 3)]);
            assert!(failures.is_empty(), "{failures:?}");
            assert_eq!(get(first).await.unwrap(), Ok(503));
            assert_eq!(get(second).await.unwrap(), Ok(200));
            healthy.store(false, Ordering::Relaxed);
            assert_eq!(get(second).await.unwrap(), Ok(503));
            // Removed from the config: the port closes.
            servers.update(vec![check(second, 3)]);
            tokio::task::yield_now().await;
            assert_eq!(servers.ports(), [second]);
            assert_eq!(
                get(first).await.unwrap(),
                Err(std::io::ErrorKind::ConnectionRefused)
            );
            // A port in use is reported, not fatal.
            let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let taken_port = taken.local_addr().unwrap().port();
            let failures = servers.update(vec![check(taken_port, 1)]);
            assert_eq!(failures.len(), 1);
            assert!(failures[0].contains("cannot listen"), "{failures:?}");
        });
    }
}
