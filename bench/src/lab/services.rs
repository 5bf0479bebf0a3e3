//! The Services every scenario is configured with, as one plain list that
//! the xlb config, the kube-proxy rule generators and the nginx config are
//! all rendered from, so every system balances exactly the same thing.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use super::topology::{self, NODE_ADDR, NODE_GEN_IF};

/// The flood's NodePort (UDP), its target port (counted by the sink), and
/// the other measured services.
pub const FLOOD_NODE_PORT: u16 = 31_000;
pub const FLOOD_TARGET_PORT: u16 = 9_000;
pub const TCP_NODE_PORT: u16 = 31_001;
pub const TCP_TARGET_PORT: u16 = 8_080;
pub const ECHO_NODE_PORT: u16 = 31_002;
pub const ECHO_TARGET_PORT: u16 = 7_000;
/// Filler services' NodePorts start here (20000 + index).
const FILLER_NODE_PORT_BASE: u16 = 20_000;
/// Backends per service (10 x 10,000 services = 100,000 backends).
pub const BACKENDS_PER_SERVICE: usize = 10;
/// The Service CIDR ClusterIPs come from: 198.18.64.0/18 (16,384).
pub const SERVICE_CIDR: &str = "198.18.64.0/18";
const CLUSTER_IP_BASE: u32 = u32::from_be_bytes([198, 18, 64, 0]);
/// Filler pods: 198.19.0.0/16, routed via a backend "node".
const FILLER_POD_BASE: u32 = u32::from_be_bytes([198, 19, 0, 0]);
/// Distinct filler pod addresses (the whole /16).
pub const FILLER_POD_IPS: u32 = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `tcp` / `udp`, as iptables, nft and kube-proxy's names spell it.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn upper(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// A NodePort Service (it has a ClusterIP too, as every NodePort Service
/// in Kubernetes does).
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// The Service port's name (kube-proxy's chain names include it).
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    /// The ClusterIP port.
    pub port: u16,
    pub node_port: u16,
    pub backends: Vec<SocketAddrV4>,
}

impl Service {
    /// `namespace/name:port-name`, kube-proxy's ServicePortName.
    pub fn port_name_string(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// The node every system is configured for.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub services: Vec<Service>,
    /// `selection.tableSize` for xlb (None: left out, xlb's default: each
    /// table sized by its backends).
    pub table_size: Option<u32>,
    /// Idle timeout of unanswered UDP flows, in xlb's conntrack and the
    /// kernel's (None: each system's default, 60 s and 30 s). In xlb it is
    /// the timeout of flows of one datagram (`udpUnassuredTimeoutSeconds`):
    /// a new-flow flood's. A flow's second datagram assures it, and the
    /// cycling tests' flows keep xlb's default then.
    pub udp_timeout_s: Option<u32>,
    pub node_addr: Ipv4Addr,
    /// xlb's `node.interfaces` (the node's uplinks).
    pub interfaces: Vec<String>,
}

/// The bench lab's node interfaces: the generator's link and the backends'.
fn bench_interfaces() -> Vec<String> {
    let mut interfaces = vec![NODE_GEN_IF.to_owned()];
    interfaces.extend((1..=topology::BACKEND_NAMESPACES).map(topology::node_backend_if));
    interfaces
}

fn real_backends(port: u16) -> Vec<SocketAddrV4> {
    topology::pod_addrs()
        .into_iter()
        .map(|addr| SocketAddrV4::new(addr, port))
        .collect()
}

pub(super) fn measured_service(
    index: usize,
    name: &str,
    protocol: Protocol,
    node_port: u16,
    target: u16,
) -> Service {
    Service {
        namespace: "bench".into(),
        name: name.into(),
        port_name: "p".into(),
        protocol,
        cluster_ip: cluster_ip(index),
        port: 80,
        node_port,
        backends: real_backends(target),
    }
}

fn cluster_ip(index: usize) -> Ipv4Addr {
    assert!(index < 16_384, "the Service CIDR holds 16,384 ClusterIPs");
    Ipv4Addr::from(CLUSTER_IP_BASE + index as u32)
}

impl BenchConfig {
    /// The headline scenarios' Services: the UDP flood, TCP connect/close
    /// and UDP echo (latency), each over the 10 real pods.
    pub fn headline() -> BenchConfig {
        BenchConfig {
            services: vec![
                measured_service(
                    0,
                    "udp-flood",
                    Protocol::Udp,
                    FLOOD_NODE_PORT,
                    FLOOD_TARGET_PORT,
                ),
                measured_service(1, "tcp-conn", Protocol::Tcp, TCP_NODE_PORT, TCP_TARGET_PORT),
                measured_service(
                    2,
                    "udp-echo",
                    Protocol::Udp,
                    ECHO_NODE_PORT,
                    ECHO_TARGET_PORT,
                ),
            ],
            table_size: None,
            udp_timeout_s: None,
            node_addr: NODE_ADDR,
            interfaces: bench_interfaces(),
        }
    }

    /// `services` Services for the scale sweep: `services - 1` UDP fillers
    /// with 10 backends each on filler pod IPs, then the measured UDP flood
    /// service *last* (where iptables walks farthest).
    #[cfg(test)]
    pub fn sweep(services: usize, table_size: Option<u32>) -> BenchConfig {
        BenchConfig::sweep_with_pod_ips(services, table_size, FILLER_POD_IPS)
    }

    /// As [`BenchConfig::sweep`], with the fillers' backends spread over
    /// only `pod_ips` distinct addresses (ports tell them apart): separates
    /// per-address costs in the agent from per-backend ones.
    pub fn sweep_with_pod_ips(
        services: usize,
        table_size: Option<u32>,
        pod_ips: u32,
    ) -> BenchConfig {
        assert!(services >= 1);
        let pod_ips = pod_ips.clamp(1, FILLER_POD_IPS);
        let mut list = Vec::with_capacity(services);
        for index in 0..services - 1 {
            let backends = (0..BACKENDS_PER_SERVICE)
                .map(|slot| {
                    // Distinct (address, port) per backend: pod IPs cycle
                    // through the /16, the port says which lap it is.
                    let global = (index * BACKENDS_PER_SERVICE + slot) as u32;
                    SocketAddrV4::new(
                        Ipv4Addr::from(FILLER_POD_BASE + global % pod_ips),
                        FLOOD_TARGET_PORT + (global / pod_ips) as u16,
                    )
                })
                .collect();
            list.push(Service {
                namespace: "fill".into(),
                name: format!("svc-{index}"),
                port_name: "p".into(),
                protocol: Protocol::Udp,
                cluster_ip: cluster_ip(index + 1),
                port: 80,
                node_port: FILLER_NODE_PORT_BASE + index as u16,
                backends,
            });
        }
        list.push(measured_service(
            0,
            "udp-flood",
            Protocol::Udp,
            FLOOD_NODE_PORT,
            FLOOD_TARGET_PORT,
        ));
        BenchConfig {
            services: list,
            table_size,
            udp_timeout_s: None,
            node_addr: NODE_ADDR,
            interfaces: bench_interfaces(),
        }
    }

    pub fn backend_count(&self) -> usize {
        self.services.iter().map(|s| s.backends.len()).sum()
    }

    /// The xlb agent's YAML config (config/example.yaml's format).
    pub fn xlb_yaml(&self) -> String {
        let mut out = format!(
            "# Written by xlb-bench.\nnode:\n  interfaces: [{}]\n  addresses: [{}]\n",
            self.interfaces.join(", "),
            self.node_addr
        );
        // 60,000 flows from one client to 10 backends need more masquerade
        // ports than the default range's 4,536 per backend.
        out += "masquerade:\n  portRange: \"1024-65535\"\n";
        // Only flows of one datagram time out this fast: with every UDP
        // flow at 1 s, a 60k-flow cycle's flows die whenever the generator
        // offers so much more than xlb takes that one goes 3/4 s without a
        // packet getting through (at 777k of ~2M pps, hundreds per window),
        // and an "established" window becomes partly a new-flow one.
        if let Some(seconds) = self.udp_timeout_s {
            let _ = write!(out, "conntrack:\n  udpUnassuredTimeoutSeconds: {seconds}\n");
        }
        if let Some(size) = self.table_size {
            let _ = write!(out, "selection:\n  tableSize: {size}\n");
        }
        out += "services:\n";
        for service in &self.services {
            let _ = write!(
                out,
                "  - name: {}\n    namespace: {}\n    protocol: {}\n    nodePort: {}\n    backends:\n",
                service.name,
                service.namespace,
                service.protocol.upper(),
                service.node_port
            );
            for backend in &service.backends {
                let _ = writeln!(
                    out,
                    "      - {{address: {}, port: {}}}",
                    backend.ip(),
                    backend.port()
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_puts_the_measured_service_last_with_100k_backends_at_10k() {
        let config = BenchConfig::sweep(10_000, Some(251));
        assert_eq!(config.services.len(), 10_000);
        assert_eq!(config.backend_count(), 100_000);
        let last = config.services.last().expect("services");
        assert_eq!(last.node_port, FLOOD_NODE_PORT);
        let mut ports: Vec<u16> = config.services.iter().map(|s| s.node_port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 10_000, "NodePorts are unique");
        let mut backends: Vec<SocketAddrV4> = config
            .services
            .iter()
            .flat_map(|s| s.backends.iter().copied())
            .collect();
        backends.sort_unstable();
        backends.dedup();
        assert_eq!(backends.len(), 100_000, "backends are distinct");
    }

    #[test]
    fn xlb_yaml_is_complete() {
        let yaml = BenchConfig::headline().xlb_yaml();
        assert!(yaml.contains("interfaces: [xb-g, xb-b1, xb-b2]"), "{yaml}");
        assert!(yaml.contains("nodePort: 31000"));
        assert_eq!(yaml.matches("- {address:").count(), 30);
        let short = BenchConfig {
            udp_timeout_s: Some(1),
            ..BenchConfig::headline()
        };
        let yaml = short.xlb_yaml();
        assert!(
            yaml.contains("conntrack:\n  udpUnassuredTimeoutSeconds: 1\n"),
            "{yaml}"
        );
        assert!(!yaml.contains("udpTimeoutSeconds"), "{yaml}");
    }
}
