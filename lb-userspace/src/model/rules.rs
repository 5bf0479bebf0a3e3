//! kube-proxy's rules, once for every source and the reconciler: which
//! backends take new flows, which address and port belongs to which service,
//! and the value rules (prime table sizes, networks of CIDRs) the sources
//! check and the reconciler relies on.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Backend, Protocol, Service, TrafficPolicy};

/// Smallest and default number of slots in a service's selection table.
/// Sizes must be prime so every Maglev permutation covers every slot; the
/// default is about 100 times the backends of a large service, so weights
/// are honoured to within about 1%.
pub const MIN_TABLE_SIZE: u32 = 7;
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
/// Largest accepted table size: a prime just under 2^20 slots (8 MiB of
/// kernel memory for each service's table).
pub const MAX_TABLE_SIZE: u32 = 1_048_573;

/// Slots an automatically sized table gives each selectable backend, at
/// least: Maglev spreads flows to within about 1% of the weights with 100.
pub const SLOTS_PER_BACKEND: u64 = 100;
/// The sizes an automatically sized table takes: primes, each about twice
/// the last, so a service's table changes size only when its backends
/// double or halve.
pub const AUTO_TABLE_SIZES: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// The slots of an automatically sized table (`selection.tableSize` left
/// out) for `backends` selectable backends whose weights sum to `weights`:
/// the smallest of [`AUTO_TABLE_SIZES`] with `SLOTS_PER_BACKEND` slots per
/// backend and one per unit of weight, never more than `max` (the default
/// size). Every node computes it from the same backends, so all agree.
pub fn auto_table_size(backends: usize, weights: u64, max: u32) -> u32 {
    let backends = u64::try_from(backends).unwrap_or(u64::MAX);
    let wanted = backends.saturating_mul(SLOTS_PER_BACKEND).max(weights);
    AUTO_TABLE_SIZES
        .iter()
        .copied()
        .find(|&size| u64::from(size) >= wanted && size <= max)
        .unwrap_or(max)
}

/// Whether `n` is prime (table sizes are small enough for trial division).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut divisor = 2u32;
    while u64::from(divisor) * u64::from(divisor) <= u64::from(n) {
        if n.is_multiple_of(divisor) {
            return false;
        }
        divisor += 1;
    }
    true
}

/// An address family: `ipFamilies`' `IPv4` and `IPv6`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    #[default]
    V4,
    V6,
}

impl IpFamily {
    pub const fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// `IPv4` or `IPv6`, spelt as in a Service's `ipFamilies`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }

    /// Bits in an address of the family.
    pub const fn bits(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// `address/prefix_len` with the host bits cleared (a length past the
/// family's bits means the whole address).
pub fn network_of(address: IpAddr, prefix_len: u8) -> IpAddr {
    match address {
        IpAddr::V4(address) => {
            let mask = match prefix_len {
                0 => 0,
                len => u32::MAX << (32 - u32::from(len.min(32))),
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(address) & mask))
        }
        IpAddr::V6(address) => {
            let mask = match prefix_len {
                0 => 0,
                len => u128::MAX << (128 - u32::from(len.min(128))),
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(address) & mask))
        }
    }
}

/// A backend's identity, as `XLB_BACKENDS` keys it: where to send, not how
/// much.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub address: IpAddr,
    pub port: u16,
}

impl From<&Backend> for BackendAddr {
    fn from(backend: &Backend) -> Self {
        Self {
            address: backend.address,
            port: backend.port,
        }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.address, self.port))
    }
}

/// A backend the datapath keeps active for a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DesiredBackend {
    pub address: BackendAddr,
    pub weight: u32,
    pub terminating: bool,
    /// New flows may be sent to it (it has slots in the selection table).
    pub selectable: bool,
}

/// kube-proxy's endpoint rules for the service's external frontends
/// (`externalTrafficPolicy`); see `backends_for`.
pub fn desired_backends(service: &Service) -> Vec<DesiredBackend> {
    backends_for(service, service.external_traffic_policy)
}

/// kube-proxy's endpoint rules under `policy`. Kept active: every backend that is ready
/// or serving (a terminating one keeps its flows). Selectable for new
/// flows: the ready ones (with externalTrafficPolicy=Local, the local ready
/// ones); when there is none, the serving terminating ones. Weight 0 takes
/// no new flow.
pub fn backends_for(service: &Service, policy: TrafficPolicy) -> Vec<DesiredBackend> {
    let eligible = |backend: &Backend| {
        backend.weight > 0 && (policy == TrafficPolicy::Cluster || backend.is_local)
    };
    let any_ready = service.backends.iter().any(|b| b.ready && eligible(b));
    let selectable = |backend: &Backend| {
        eligible(backend)
            && if any_ready {
                backend.ready
            } else {
                backend.serving && backend.terminating
            }
    };
    let mut backends: Vec<DesiredBackend> = Vec::with_capacity(service.backends.len());
    let mut seen = BTreeSet::new();
    for backend in &service.backends {
        let address = BackendAddr::from(backend);
        if !(backend.ready || backend.serving) || !seen.insert(address) {
            continue;
        }
        backends.push(DesiredBackend {
            address,
            weight: backend.weight,
            terminating: backend.terminating,
            selectable: selectable(backend),
        });
    }
    backends.sort_unstable();
    backends
}

/// What a service answers on, which no other service may answer on too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Claim {
    /// A NodePort: the port on every node address (TCP and UDP are
    /// separate ports, so two services may share a number across them).
    NodePort { protocol: Protocol, port: u16 },
    /// A load-balancer IP, an external IP or a ClusterIP on the service port.
    Address {
        protocol: Protocol,
        address: IpAddr,
        port: u16,
    },
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::NodePort { protocol, port } => write!(f, "nodePort {protocol} {port}"),
            Claim::Address {
                protocol,
                address,
                port,
            } => write!(
                f,
                "{protocol} {}",
                std::net::SocketAddr::new(*address, *port)
            ),
        }
    }
}

impl Service {
    /// The service as one family sees it: its backends, frontends,
    /// ClusterIPs and source ranges of `family` only (borrowed when it has
    /// no address of another family).
    pub fn of_family(&self, family: IpFamily) -> std::borrow::Cow<'_, Service> {
        let mine = |address: &IpAddr| IpFamily::of(*address) == family;
        let single = self.backends.iter().all(|backend| mine(&backend.address))
            && self.frontends.iter().all(mine)
            && self.cluster_ips.iter().all(mine)
            && self.source_ranges.iter().all(|(address, _)| mine(address));
        if single {
            return std::borrow::Cow::Borrowed(self);
        }
        let backends = self
            .backends
            .iter()
            .filter(|backend| mine(&backend.address))
            .cloned()
            .collect();
        let view = Service {
            backends: Vec::new(),
            frontends: self.frontends.iter().copied().filter(mine).collect(),
            cluster_ips: self.cluster_ips.iter().copied().filter(mine).collect(),
            source_ranges: (self.source_ranges.iter())
                .filter(|(address, _)| mine(address))
                .copied()
                .collect(),
            ip_families: vec![family],
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            ..*self
        };
        std::borrow::Cow::Owned(Service { backends, ..view })
    }

    /// The families this service's NodePort is served in that none of
    /// `node_addresses` is of: its clients of those reach it nowhere. Empty
    /// for a service without a NodePort.
    pub fn node_port_families_without(&self, node_addresses: &[IpAddr]) -> Vec<IpFamily> {
        if self.node_port == 0 {
            return Vec::new();
        }
        let has = |family: IpFamily| {
            (node_addresses.iter()).any(|address| IpFamily::of(*address) == family)
        };
        self.families()
            .into_iter()
            .filter(|family| !has(*family))
            .collect()
    }

    /// Everything this service answers on: its NodePort, then its frontends
    /// and ClusterIPs on the service port.
    pub fn claims(&self) -> Vec<Claim> {
        let node_port = (self.node_port != 0).then_some(Claim::NodePort {
            protocol: self.protocol,
            port: self.node_port,
        });
        let addresses = self.frontends.iter().chain(&self.cluster_ips);
        node_port
            .into_iter()
            .chain(addresses.map(|&address| Claim::Address {
                protocol: self.protocol,
                address,
                port: self.port,
            }))
            .collect()
    }
}

/// Who holds each claim: the first service to make it. Every source asks
/// this one table, whatever it calls an owner (an index, an object name).
#[derive(Clone, Debug)]
pub struct Owners<T> {
    owners: HashMap<Claim, T>,
}

impl<T> Default for Owners<T> {
    fn default() -> Self {
        Self {
            owners: HashMap::new(),
        }
    }
}

impl<T> Owners<T> {
    /// Who holds `claim`, if anyone does.
    pub fn owner(&self, claim: &Claim) -> Option<&T> {
        self.owners.get(claim)
    }

    /// Gives `claim` to `owner`, or says who holds it already (and keeps it).
    pub fn take(&mut self, claim: Claim, owner: T) -> Result<(), &T> {
        match self.owners.entry(claim) {
            std::collections::hash_map::Entry::Occupied(first) => Err(first.into_mut()),
            std::collections::hash_map::Entry::Vacant(free) => {
                free.insert(owner);
                Ok(())
            }
        }
    }

    /// The first of `claims` someone already holds, and who.
    pub fn first_taken<'a>(&self, claims: &'a [Claim]) -> Option<(&'a Claim, &T)> {
        claims
            .iter()
            .find_map(|claim| self.owner(claim).map(|owner| (claim, owner)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert!(is_prime(7) && is_prime(1021) && is_prime(16_381) && is_prime(65_521));
        assert!(!is_prime(1) && !is_prime(1024) && !is_prime(16_383) && !is_prime(0));
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(MAX_TABLE_SIZE));
        assert!(is_prime(MIN_TABLE_SIZE));
        assert!(AUTO_TABLE_SIZES.iter().all(|&size| is_prime(size)));
        assert!(AUTO_TABLE_SIZES.contains(&DEFAULT_TABLE_SIZE));
    }

    #[test]
    fn automatic_tables_give_each_backend_about_a_hundred_slots() {
        let max = DEFAULT_TABLE_SIZE;
        assert_eq!(auto_table_size(0, 0, max), 251);
        assert_eq!(auto_table_size(1, 1, max), 251);
        assert_eq!(auto_table_size(3, 3, max), 509);
        assert_eq!(auto_table_size(10, 10, max), 1021);
        assert_eq!(auto_table_size(11, 11, max), 2039);
        assert_eq!(auto_table_size(100, 100, max), 16_381);
        // Never past the most a table may have.
        assert_eq!(auto_table_size(1_000, 1_000, max), max);
        // Each unit of weight gets a slot at least.
        assert_eq!(auto_table_size(2, 3_000, max), 4093);
    }

    #[test]
    fn networks_clear_host_bits() {
        let ip = |text: &str| -> IpAddr { text.parse().unwrap_or_else(|e| panic!("{e}")) };
        let address = ip("198.18.7.9");
        assert_eq!(network_of(address, 24), ip("198.18.7.0"));
        assert_eq!(network_of(address, 0), ip("0.0.0.0"));
        assert_eq!(network_of(address, 32), address);
        let address = ip("2001:db8:7:9::1");
        assert_eq!(network_of(address, 64), ip("2001:db8:7:9::"));
        assert_eq!(network_of(address, 36), ip("2001:db8::"));
        assert_eq!(network_of(address, 0), ip("::"));
        assert_eq!(network_of(address, 128), address);
        assert_eq!(network_of(address, 200), address);
    }

    #[test]
    fn a_claim_belongs_to_its_first_owner() {
        let web = Service {
            node_port: 30080,
            port: 80,
            frontends: vec![IpAddr::from([198, 18, 0, 10])],
            ..Service::default()
        };
        let claims = web.claims();
        assert_eq!(claims.len(), 2);
        assert_eq!(claims[0].to_string(), "nodePort TCP 30080");
        assert_eq!(claims[1].to_string(), "TCP 198.18.0.10:80");
        let mut owners = Owners::default();
        assert_eq!(owners.take(claims[0], "web"), Ok(()));
        assert_eq!(owners.take(claims[0], "api"), Err(&"web"));
        let udp = Claim::NodePort {
            protocol: Protocol::Udp,
            port: 30080,
        };
        assert_eq!(owners.take(udp, "dns"), Ok(()));
        assert_eq!(owners.first_taken(&claims), Some((&claims[0], &"web")));
    }
}
