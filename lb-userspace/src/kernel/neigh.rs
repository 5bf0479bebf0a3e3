//! Managed neighbours: the kernel keeps the next hop of every backend
//! resolved, so the datapath's FIB lookup finds a MAC address instead of
//! dropping with `drop_no_neighbour`. Done with iproute2 (`ip route get`,
//! `ip neigh replace ... managed`), which every node has.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("cannot run `{command}`: {source}; is iproute2 installed?")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("cannot read the output of `{command}`: {reason}")]
    Output { command: String, reason: String },
}

/// Where packets to a backend go next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub address: Ipv4Addr,
    pub device: String,
}

/// Remembers which backends already have a managed neighbour so that a
/// reconcile runs iproute2 only for new ones.
#[derive(Debug, Default)]
pub struct Neighbours {
    done: BTreeSet<Ipv4Addr>,
    /// Backends whose failure was already reported (retried quietly).
    failed: BTreeSet<Ipv4Addr>,
}

impl Neighbours {
    /// Makes the next hop of every backend in `backends` a managed
    /// neighbour. Failures come back as warnings, and are retried next time.
    pub fn ensure(&mut self, backends: &BTreeSet<Ipv4Addr>) -> Vec<String> {
        let mut warnings = Vec::new();
        for &backend in backends.difference(&self.done.clone()) {
            match ensure_one(backend) {
                Ok(Some(hop)) => {
                    log::debug!(
                        "backend {backend}: next hop {} on {} is a managed neighbour",
                        hop.address,
                        hop.device
                    );
                    self.done.insert(backend);
                    self.failed.remove(&backend);
                }
                Ok(None) => {
                    log::debug!("backend {backend} is local; no neighbour to manage");
                    self.done.insert(backend);
                    self.failed.remove(&backend);
                }
                Err(error) => {
                    let message = format!(
                        "backend {backend}: cannot keep its next hop resolved ({error}); \
                         packets to it may be dropped as drop_no_neighbour until the kernel \
                         resolves it"
                    );
                    if self.failed.insert(backend) {
                        warnings.push(message);
                    } else {
                        log::debug!("{message}");
                    }
                }
            }
        }
        // Backends that left are forgotten, so they are redone if they return.
        self.done.retain(|address| backends.contains(address));
        self.failed.retain(|address| backends.contains(address));
        warnings
    }

    /// Redo every backend on the next `ensure` (routes may have moved).
    pub fn forget(&mut self) {
        self.done.clear();
        self.failed.clear();
    }
}

fn ensure_one(backend: Ipv4Addr) -> Result<Option<NextHop>, NeighbourError> {
    let route = run("ip", &["-j", "route", "get", &backend.to_string()])?;
    let Some(hop) = next_hop(backend, &route)? else {
        return Ok(None);
    };
    run(
        "ip",
        &[
            "neigh",
            "replace",
            &hop.address.to_string(),
            "dev",
            &hop.device,
            "managed",
        ],
    )?;
    Ok(Some(hop))
}

fn run(program: &str, args: &[&str]) -> Result<String, NeighbourError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NeighbourError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(NeighbourError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[derive(Deserialize)]
struct RouteJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    dev: Option<String>,
    gateway: Option<String>,
}

/// Parses `ip -j route get BACKEND`: the gateway if there is one, else the
/// backend itself on the route's device; `None` for local addresses.
fn next_hop(backend: Ipv4Addr, json: &str) -> Result<Option<NextHop>, NeighbourError> {
    let failed = |reason: String| NeighbourError::Output {
        command: format!("ip -j route get {backend}"),
        reason,
    };
    let routes: Vec<RouteJson> = serde_json::from_str(json).map_err(|e| failed(e.to_string()))?;
    let Some(route) = routes.into_iter().next() else {
        return Err(failed(String::from("no route")));
    };
    if matches!(
        route.kind.as_deref(),
        Some("local" | "blackhole" | "unreachable" | "prohibit")
    ) {
        return Ok(None);
    }
    let Some(device) = route.dev.filter(|dev| dev != "lo") else {
        return Ok(None);
    };
    let address = match route.gateway {
        Some(gateway) => gateway
            .parse()
            .map_err(|_| failed(format!("gateway {gateway} is not IPv4")))?,
        None => backend,
    };
    Ok(Some(NextHop { address, device }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

    fn hop(json: &str) -> Option<NextHop> {
        match next_hop(BACKEND, json) {
            Ok(hop) => hop,
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn directly_connected_backend_is_its_own_next_hop() {
        let json = r#"[{"dst":"198.18.1.2","dev":"xlb-b1","prefsrc":"198.18.1.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(
            hop(json),
            Some(NextHop {
                address: BACKEND,
                device: String::from("xlb-b1")
            })
        );
    }

    #[test]
    fn routed_backend_uses_the_gateway() {
        let json = r#"[{"dst":"198.18.1.2","gateway":"198.18.0.254","dev":"eth0","prefsrc":"198.18.0.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(
            hop(json),
            Some(NextHop {
                address: Ipv4Addr::new(198, 18, 0, 254),
                device: String::from("eth0")
            })
        );
    }

    #[test]
    fn local_backend_has_no_neighbour() {
        let json = r#"[{"type":"local","dst":"198.18.1.2","dev":"lo","prefsrc":"198.18.1.2","flags":[],"uid":0,"cache":["local"]}]"#;
        assert_eq!(hop(json), None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(next_hop(BACKEND, "[]").is_err());
        assert!(next_hop(BACKEND, "not json").is_err());
    }
}
