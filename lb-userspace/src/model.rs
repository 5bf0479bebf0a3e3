//! What the operator wants the node to do, in the problem's words: the
//! `DesiredState` every config source produces whole. Plain std types; the
//! kernel layer turns it into lb-common map entries.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

/// Default number of slots in a service's selection table (a prime, so that
/// issue 4's Maglev permutation covers every slot).
pub const DEFAULT_TABLE_SIZE: u32 = 1021;

/// Default masquerade source ports: above Linux's default ephemeral range
/// (32768-60999), so masqueraded flows never collide with local sockets.
pub const DEFAULT_MASQUERADE_PORTS: RangeInclusive<u16> = 61_000..=65_535;

/// The whole configuration of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredState {
    /// Interfaces to attach the XDP program to.
    pub interfaces: Vec<String>,
    /// Addresses NodePorts answer on; `None` means every IPv4 address of the
    /// node except loopback (resolved by the agent on each reconcile).
    pub node_addresses: Option<Vec<Ipv4Addr>>,
    /// Source ports used when masquerading new flows.
    pub masquerade_ports: RangeInclusive<u16>,
    pub conntrack: Conntrack,
    /// Slots per service in the selection table.
    pub table_size: u32,
    pub services: Vec<Service>,
}

impl DesiredState {
    /// Number of distinct backends (address, port) over all services.
    pub fn backend_count(&self) -> usize {
        let mut all: Vec<(Ipv4Addr, u16)> = self
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
            max_flows: lb_common::maps::FLOWS_MAX,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
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

/// A NodePort service: a frontend on every node address and its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub protocol: Protocol,
    pub node_port: u16,
    pub backends: Vec<Backend>,
}

impl Service {
    /// `namespace/name`: the identity that keeps a service's id across reloads.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One backend (pod) of a service, with its resolved port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: Ipv4Addr,
    pub port: u16,
    /// Share of new flows relative to the service's other backends; 0 drains.
    pub weight: u32,
    pub name: Option<String>,
}
