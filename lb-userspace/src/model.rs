//! What the operator wants the node to do, in the problem's words: the
//! `DesiredState` every config source produces whole. Plain std types; the
//! kernel layer turns it into lb-common map entries.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

mod rules;

pub use rules::{
    BackendAddr, Claim, DEFAULT_TABLE_SIZE, DesiredBackend, IpFamily, MAX_TABLE_SIZE,
    MIN_TABLE_SIZE, Owners, auto_table_size, backends_for, desired_backends, is_prime, network_of,
};

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours, as
/// Kubernetes).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Largest affinity timeout Kubernetes accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// Default masquerade source ports: below the NodePort range (30000-32767)
/// and Linux's default ephemeral range (32768-60999), so masqueraded flows
/// never collide with the node's own outgoing connections (kubelet probes
/// to pods use ephemeral ports). 28,976 ports give each backend endpoint
/// about as many concurrent masqueraded flows as kube-proxy's MASQUERADE.
pub const DEFAULT_MASQUERADE_PORTS: RangeInclusive<u16> = 1_024..=29_999;

/// The whole configuration of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredState {
    /// Interfaces to attach the XDP program to.
    pub interfaces: Vec<String>,
    /// Addresses NodePorts answer on, of either family; `None` means every
    /// address of the node except loopback and IPv6 link-local ones
    /// (resolved by the agent on each reconcile).
    pub node_addresses: Option<Vec<IpAddr>>,
    /// Source ports used when masquerading new flows.
    pub masquerade_ports: RangeInclusive<u16>,
    pub conntrack: Conntrack,
    /// Slots per service in the selection table: exactly this many when
    /// `table_size_auto` is false (`selection.tableSize` given), else at
    /// most this many (`rules::auto_table_size`).
    pub table_size: u32,
    /// Size each service's table by its backends (the default).
    pub table_size_auto: bool,
    /// Node addresses that services may use as load-balancer IPs or
    /// externalIPs (`node.allowedFrontendAddresses`). A frontend on any
    /// other address of the node is refused: it would take over the node's
    /// own ports on that address (the CVE-2020-8554 class of hijack).
    pub allowed_frontend_addresses: Vec<IpAddr>,
    pub services: Vec<Service>,
}

impl Default for DesiredState {
    /// No interfaces and no services; every setting at its default.
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            node_addresses: None,
            masquerade_ports: DEFAULT_MASQUERADE_PORTS,
            conntrack: Conntrack::default(),
            table_size: DEFAULT_TABLE_SIZE,
            table_size_auto: true,
            allowed_frontend_addresses: Vec::new(),
            services: Vec::new(),
        }
    }
}

impl DesiredState {
    /// Number of distinct backends (address, port) over all services.
    pub fn backend_count(&self) -> usize {
        let mut all: Vec<(IpAddr, u16)> = self
            .services
            .iter()
            .flat_map(|service| service.backends.iter().map(|b| (b.address, b.port)))
            .collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    }
}

/// Conntrack idle timeouts and capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conntrack {
    pub tcp_timeout_s: u32,
    pub tcp_syn_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub udp_timeout_s: u32,
    /// A UDP flow whose client has sent one datagram so far (see
    /// `lb_common::flow::FLOW_S_ASSURED`); `udp_timeout_s` if that is shorter.
    pub udp_unassured_timeout_s: u32,
    /// Capacity of the flow table (two entries per flow); load-time only.
    pub max_flows: u32,
}

impl Default for Conntrack {
    fn default() -> Self {
        let defaults = lb_common::GlobalConfig::DEFAULT;
        Self {
            tcp_timeout_s: defaults.tcp_established_timeout_s,
            tcp_syn_timeout_s: defaults.tcp_syn_timeout_s,
            tcp_closing_timeout_s: defaults.tcp_closing_timeout_s,
            udp_timeout_s: defaults.udp_timeout_s,
            udp_unassured_timeout_s: defaults.udp_unassured_timeout_s,
            max_flows: lb_common::maps::FLOWS_MAX,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// `TCP` or `UDP`, spelt as in a Kubernetes Service.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// `externalTrafficPolicy` (NodePorts, load-balancer and external IPs) and
/// `internalTrafficPolicy` (ClusterIPs): where new flows may go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficPolicy {
    /// Any ready backend; the client's address is masqueraded so that
    /// replies come back through this node.
    #[default]
    Cluster,
    /// Only backends on this node (`Backend::is_local`), without masquerade:
    /// the backend sees the client's real address. With no local backend,
    /// packets are dropped (as kube-proxy does), not rejected.
    Local,
}

impl TrafficPolicy {
    /// `Cluster` or `Local`, spelt as in a Kubernetes Service.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "Cluster" => Some(TrafficPolicy::Cluster),
            "Local" => Some(TrafficPolicy::Local),
            _ => None,
        }
    }
}

impl fmt::Display for TrafficPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        })
    }
}

/// A service: a NodePort on every node address and/or frontends on
/// dedicated addresses, and its backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub protocol: Protocol,
    /// Answered on every node address; 0 means the service has no NodePort
    /// (only `frontends`).
    pub node_port: u16,
    /// The service port: what `frontends` answer on.
    pub port: u16,
    /// `ipFamilies`: the families the service is served in (see
    /// [`Service::families`]). Its NodePort answers on the node's
    /// addresses of each; each family's clients go to that family's
    /// backends.
    pub ip_families: Vec<IpFamily>,
    /// Load-balancer ingress IPs and external IPs, answered on `port` (an
    /// exact frontend wins over a NodePort on the same address and port).
    pub frontends: Vec<IpAddr>,
    /// `clusterIP`/`clusterIPs`, answered on `port`: by the socket hooks
    /// for clients on this node (IPv4), and by XDP for packets that arrive
    /// addressed to them (masqueraded, as kube-proxy does for sources
    /// outside the cluster).
    pub cluster_ips: Vec<IpAddr>,
    pub external_traffic_policy: TrafficPolicy,
    /// `internalTrafficPolicy`: which backends the ClusterIPs use (Local:
    /// only this node's; with none, new flows are refused).
    pub internal_traffic_policy: TrafficPolicy,
    /// `sessionAffinity: ClientIP` with this timeout in seconds (1-86400);
    /// `None` for `sessionAffinity: None`.
    pub session_affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges: (network address, prefix length). Empty
    /// means every source. They restrict the `frontends`; a service without
    /// frontends has them applied to its NodePort instead.
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// For externalTrafficPolicy=Local load balancers: the port a health
    /// checker asks whether this node has local backends. Carried for the
    /// health server; the datapath does not use it.
    pub health_check_node_port: Option<u16>,
    pub backends: Vec<Backend>,
}

impl Service {
    /// `namespace/name`: the identity that keeps a service's id across reloads.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The families the service is served in: `ip_families` when given,
    /// else those of its backends, frontends and ClusterIPs, IPv4 when it
    /// has no address at all. Sorted, IPv4 first.
    pub fn families(&self) -> Vec<IpFamily> {
        let mut families: Vec<IpFamily> = if self.ip_families.is_empty() {
            let addresses = self.backends.iter().map(|backend| backend.address);
            addresses
                .chain(self.frontends.iter().copied())
                .chain(self.cluster_ips.iter().copied())
                .map(IpFamily::of)
                .collect()
        } else {
            self.ip_families.clone()
        };
        if families.is_empty() {
            families.push(IpFamily::V4);
        }
        families.sort_unstable();
        families.dedup();
        families
    }
}

/// One backend (endpoint) of a service, with its resolved port and its
/// EndpointSlice conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    /// Share of new flows relative to the service's other backends; 0 drains.
    pub weight: u32,
    pub name: Option<String>,
    /// May take new flows.
    pub ready: bool,
    /// Can serve (kept for existing flows, and for new ones when no backend
    /// of the service is ready); Kubernetes sets it true for a terminating
    /// endpoint that still answers.
    pub serving: bool,
    /// Being deleted: gets no new flows while another backend is ready.
    pub terminating: bool,
    /// Runs on this node (matters for externalTrafficPolicy=Local).
    pub is_local: bool,
}

impl Default for Backend {
    /// `0.0.0.0:0`, weight 1, ready and serving, not terminating, not local.
    fn default() -> Self {
        Self {
            address: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 0,
            weight: 1,
            name: None,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
        }
    }
}
