//! The config's value checks: each reads one field as written and returns
//! the model's value, or records a located `Problem` (or a warning) and
//! returns `None`. They know the file's field names and the fixes to
//! suggest; building the `DesiredState` from their answers is `build`'s.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use super::raw::{Int, RawAffinityConfig, RawBackend, RawConntrack};
use super::{Locations, Problem, SERVICES};
use crate::model::{
    Conntrack, DEFAULT_AFFINITY_TIMEOUT_S, DEFAULT_TABLE_SIZE, MAX_AFFINITY_TIMEOUT_S,
    MAX_TABLE_SIZE, Protocol, TrafficPolicy, is_prime, network_of,
};

/// Most weight one backend may have.
pub const MAX_WEIGHT: i128 = 1000;
/// Bounds of `conntrack.*TimeoutSeconds` (one second to a year).
const TIMEOUT_RANGE: RangeInclusive<i128> = 1..=31_536_000;
/// Bounds of `conntrack.maxFlows`.
const MAX_FLOWS_RANGE: RangeInclusive<i128> = 1024..=(1 << 26);

/// Positions for the checks' findings: the node's settings indexed up
/// front, the services' only when a finding is about one of them (most of
/// a big file is services, and indexing them costs more than reading it).
pub struct Located<'a> {
    pub text: &'a str,
    /// Everything but what is inside `services`.
    pub outside: &'a Locations,
    pub services: OnceCell<Locations>,
}

impl Located<'_> {
    fn locations_for(&self, field: &str) -> &Locations {
        let inside = field
            .strip_prefix(SERVICES)
            .is_some_and(|rest| rest.starts_with(['[', '.']));
        if inside {
            self.services.get_or_init(|| Locations::index(self.text))
        } else {
            self.outside
        }
    }
}

/// Records the located findings of the checks, in document order.
pub struct Checker<'a> {
    pub origin: &'a str,
    pub locations: &'a Located<'a>,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// The names a field may hold, as Kubernetes spells them.
struct Names<T> {
    /// What it means when left out.
    default: &'static str,
    parse: fn(&str) -> Option<T>,
    /// `"{text}" is not {what}`.
    what: &'static str,
    fix: &'static str,
}

/// What an address stands for, in messages, and whether it may be a
/// loopback address.
struct Role {
    name: &'static str,
    loopback_ok: bool,
    fix: &'static str,
}

impl Checker<'_> {
    pub fn fail(&mut self, field: &str, message: impl Into<String>, fix: impl Into<String>) {
        let locations = self.locations.locations_for(field);
        let problem = Problem::located(self.origin, locations, field, message, fix);
        self.problems.push(problem);
    }

    pub fn warn(&mut self, field: &str, message: impl Into<String>, fix: impl Into<String>) {
        let locations = self.locations.locations_for(field);
        let problem = Problem::located(self.origin, locations, field, message, fix);
        self.warnings.push(problem);
    }

    /// An IPv4 or IPv6 address. An IPv4-mapped IPv6 address
    /// (`::ffff:198.18.1.2`) is refused: it would be an IPv6 address to the
    /// datapath, which no IPv4 packet carries.
    pub fn ip(&mut self, field: &str, text: &str) -> Option<IpAddr> {
        match text.trim().parse::<IpAddr>() {
            Ok(IpAddr::V6(address)) if address.to_ipv4_mapped().is_some() => {
                let v4 = address.to_ipv4_mapped().map(|v4| v4.to_string());
                self.fail(
                    field,
                    format!("\"{text}\" is an IPv4-mapped IPv6 address"),
                    format!("write the IPv4 address itself: {}", v4.unwrap_or_default()),
                );
                None
            }
            Ok(address) => Some(address),
            Err(_) => {
                self.fail(
                    field,
                    format!("\"{text}\" is not an IP address"),
                    "write an IPv4 address such as 198.18.1.2 or an IPv6 address such as 2001:db8::2",
                );
                None
            }
        }
    }

    /// Whether `address` at `field` is a unicast address usable in `role`
    /// (`... cannot be a {role}` otherwise). IPv6 link-local addresses mean
    /// nothing past their link, so they are never usable.
    fn unicast(&mut self, field: &str, address: IpAddr, role: &Role) -> bool {
        let special = match address {
            IpAddr::V4(address) => address.is_broadcast(),
            IpAddr::V6(address) => address.segments()[0] & 0xffc0 == 0xfe80,
        };
        let usable = !(address.is_unspecified()
            || special
            || address.is_multicast()
            || (address.is_loopback() && !role.loopback_ok));
        if !usable {
            let name = role.name;
            self.fail(field, format!("{address} cannot be a {name}"), role.fix);
        }
        usable
    }

    /// The interface names of `node.interfaces`: each a name the kernel
    /// could have, each once.
    pub fn interface_names(&mut self, listed: &[String]) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (index, name) in listed.iter().enumerate() {
            let field = format!("node.interfaces[{index}]");
            if !is_interface_name(name) {
                self.fail(
                    &field,
                    format!("\"{name}\" is not an interface name"),
                    "use the name `ip link` shows (1-15 characters, no '/', ':' or spaces)",
                );
            } else if let Some(first) = seen.insert(name, index) {
                self.fail(
                    &field,
                    format!("\"{name}\" is listed twice (also node.interfaces[{first}])"),
                    "list each interface once",
                );
            }
        }
    }

    /// `node.addresses`: unicast addresses, each once.
    pub fn node_addresses(&mut self, listed: &[String]) -> Vec<IpAddr> {
        if listed.is_empty() {
            self.fail(
                "node.addresses",
                "the list is empty, so NodePorts would answer on no address",
                "list the node's addresses, or leave node.addresses out to answer on every address of the node",
            );
        }
        let role = Role {
            name: "node address",
            loopback_ok: true,
            fix: "use a unicast address assigned to this node",
        };
        let addresses = self.distinct_addresses("node.addresses", listed, &role);
        addresses.into_iter().map(|(_, address)| address).collect()
    }

    /// `{at}.frontends`: unicast addresses, each once; with their index.
    pub fn frontends(&mut self, at: &str, listed: &[String]) -> Vec<(usize, IpAddr)> {
        let role = Role {
            name: "frontend",
            loopback_ok: false,
            fix: "use the load balancer's or the external unicast address",
        };
        self.distinct_addresses(&format!("{at}.frontends"), listed, &role)
    }

    /// The addresses of the list at `list`, each usable in `role`, each
    /// once; with their index.
    fn distinct_addresses(
        &mut self,
        list: &str,
        listed: &[String],
        role: &Role,
    ) -> Vec<(usize, IpAddr)> {
        let mut addresses = Vec::new();
        let mut seen = HashMap::new();
        for (index, text) in listed.iter().enumerate() {
            let field = format!("{list}[{index}]");
            let Some(address) = self.ip(&field, text) else {
                continue;
            };
            if !self.unicast(&field, address, role) {
                continue;
            }
            if let Some(first) = seen.insert(address, index) {
                self.fail(
                    &field,
                    format!("{address} is listed twice (also {list}[{first}])"),
                    "list each address once",
                );
            } else {
                addresses.push((index, address));
            }
        }
        addresses
    }

    /// `{at}.clusterIP`: a unicast address that is not also a frontend.
    pub fn cluster_ip(
        &mut self,
        at: &str,
        text: &str,
        frontends: &[(usize, IpAddr)],
    ) -> Option<IpAddr> {
        let field = format!("{at}.clusterIP");
        let address = self.ip(&field, text)?;
        let role = Role {
            name: "ClusterIP",
            loopback_ok: false,
            fix: "use the Service's unicast clusterIP (from the cluster's service CIDR)",
        };
        if !self.unicast(&field, address, &role) {
            return None;
        }
        if let Some((position, _)) = frontends.iter().find(|(_, a)| *a == address) {
            self.fail(
                &field,
                format!("{address} is also {at}.frontends[{position}]"),
                "list the address once: as clusterIP or as a frontend",
            );
            return None;
        }
        Some(address)
    }

    /// A backend's address: a unicast address. A special one is
    /// reported but still returned, so that duplicates are found too.
    pub fn backend_address(&mut self, field: &str, text: &str) -> Option<IpAddr> {
        let address = self.ip(field, text)?;
        let role = Role {
            name: "backend",
            loopback_ok: false,
            fix: "use the pod's unicast address",
        };
        self.unicast(field, address, &role);
        Some(address)
    }

    pub fn port(&mut self, field: &str, Int(value): Int, hint: &str) -> Option<u16> {
        match u16::try_from(value) {
            Ok(port) if port != 0 => Some(port),
            _ => {
                self.fail(
                    field,
                    format!("{value} is not a port"),
                    format!("use 1-65535{hint}"),
                );
                None
            }
        }
    }

    pub fn port_range(&mut self, field: &str, text: &str) -> Option<RangeInclusive<u16>> {
        const FIX: &str = "write two ports 1-65535, lower first, e.g. \"61000-65535\"";
        let Some((low, high)) = text.split_once('-') else {
            self.fail(field, format!("\"{text}\" is not a port range"), FIX);
            return None;
        };
        let (Ok(low), Ok(high)) = (low.trim().parse::<u32>(), high.trim().parse::<u32>()) else {
            self.fail(field, format!("\"{text}\" is not a port range"), FIX);
            return None;
        };
        let valid = |port: u32| (1..=65_535).contains(&port);
        if !valid(low) || !valid(high) {
            self.fail(field, format!("\"{text}\" has a port outside 1-65535"), FIX);
            return None;
        }
        if low > high {
            self.fail(
                field,
                format!("\"{text}\" is inverted"),
                format!("write the lower port first: \"{high}-{low}\""),
            );
            return None;
        }
        let low = u16::try_from(low).ok()?;
        let high = u16::try_from(high).ok()?;
        if high - low < 1023 {
            self.warn(
                field,
                format!(
                    "only {} ports: a backend can then serve at most that many masqueraded flows from one client address",
                    high - low + 1
                ),
                "widen the range",
            );
        }
        Some(low..=high)
    }

    pub fn conntrack(&mut self, raw: RawConntrack) -> Conntrack {
        let defaults = Conntrack::default();
        let tcp_timeout_s = self.timeout(
            "tcpTimeoutSeconds",
            raw.tcp_timeout_seconds,
            defaults.tcp_timeout_s,
        );
        let tcp_syn_timeout_s = self.timeout(
            "tcpSynTimeoutSeconds",
            raw.tcp_syn_timeout_seconds,
            defaults.tcp_syn_timeout_s,
        );
        let tcp_closing_timeout_s = self.timeout(
            "tcpClosingTimeoutSeconds",
            raw.tcp_closing_timeout_seconds,
            defaults.tcp_closing_timeout_s,
        );
        let udp_timeout_s = self.timeout(
            "udpTimeoutSeconds",
            raw.udp_timeout_seconds,
            defaults.udp_timeout_s,
        );
        let udp_unassured_timeout_s = self.timeout(
            "udpUnassuredTimeoutSeconds",
            raw.udp_unassured_timeout_seconds,
            defaults.udp_unassured_timeout_s,
        );
        let max_flows = match raw.max_flows {
            None => defaults.max_flows,
            Some(Int(flows)) if MAX_FLOWS_RANGE.contains(&flows) => {
                u32::try_from(flows).unwrap_or(defaults.max_flows)
            }
            Some(Int(flows)) => {
                self.fail(
                    "conntrack.maxFlows",
                    format!("{flows} is not a usable flow table size"),
                    format!(
                        "use {}-{}, or leave it out for the default of {}",
                        MAX_FLOWS_RANGE.start(),
                        MAX_FLOWS_RANGE.end(),
                        defaults.max_flows
                    ),
                );
                defaults.max_flows
            }
        };
        Conntrack {
            tcp_timeout_s,
            tcp_syn_timeout_s,
            tcp_closing_timeout_s,
            udp_timeout_s,
            udp_unassured_timeout_s,
            max_flows,
        }
    }

    /// `conntrack.{name}`, or `default` when it is left out.
    fn timeout(&mut self, name: &str, value: Option<Int>, default: u32) -> u32 {
        let Some(Int(seconds)) = value else {
            return default;
        };
        if TIMEOUT_RANGE.contains(&seconds) {
            return u32::try_from(seconds).unwrap_or(default);
        }
        self.fail(
            &format!("conntrack.{name}"),
            format!("{seconds} is not a usable timeout"),
            format!(
                "use 1-{} seconds, or leave it out for the default of {default}",
                TIMEOUT_RANGE.end()
            ),
        );
        default
    }

    pub fn table_size(&mut self, raw: Option<Int>) -> Option<u32> {
        let Some(Int(size)) = raw else {
            return Some(DEFAULT_TABLE_SIZE);
        };
        let fix = "use a prime such as 1021, 4093, 16381 or 65537";
        match u32::try_from(size) {
            Ok(size) if size <= MAX_TABLE_SIZE && is_prime(size) => Some(size),
            Ok(size) if size <= MAX_TABLE_SIZE => {
                self.fail("selection.tableSize", format!("{size} is not prime"), fix);
                None
            }
            _ => {
                self.fail(
                    "selection.tableSize",
                    format!("{size} is not a usable table size"),
                    format!("{fix} (at most {MAX_TABLE_SIZE})"),
                );
                None
            }
        }
    }

    /// A Kubernetes object name: an RFC 1123 DNS label.
    pub fn dns_label(&mut self, field: &str, text: &str) -> bool {
        let valid = !text.is_empty()
            && text.len() <= 63
            && text
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !text.starts_with('-')
            && !text.ends_with('-');
        if !valid {
            self.fail(
                field,
                format!("\"{text}\" is not a valid name"),
                "use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit (a DNS label, as in Kubernetes)",
            );
        }
        valid
    }

    /// `protocol` (`field`): TCP (the default) or UDP.
    pub fn protocol(&mut self, field: &str, text: Option<&str>) -> Option<Protocol> {
        let names = Names {
            default: "TCP",
            parse: Protocol::from_name,
            what: "a supported protocol",
            fix: "use TCP or UDP (upper case, as in a Kubernetes Service)",
        };
        self.one_of(field, text, &names)
    }

    /// `externalTrafficPolicy` or `internalTrafficPolicy` (`field`).
    pub fn traffic_policy(&mut self, field: &str, text: Option<&str>) -> Option<TrafficPolicy> {
        let names = Names {
            default: "Cluster",
            parse: TrafficPolicy::from_name,
            what: "a traffic policy",
            fix: "use Cluster (the default: any backend, client masqueraded) or Local (only \
                  local: true backends, client address kept)",
        };
        self.one_of(field, text, &names)
    }

    /// The value `names` reads from `text` at `field`, or a finding.
    fn one_of<T>(&mut self, field: &str, text: Option<&str>, names: &Names<T>) -> Option<T> {
        let text = text.unwrap_or(names.default);
        let value = (names.parse)(text);
        if value.is_none() {
            let what = names.what;
            self.fail(field, format!("\"{text}\" is not {what}"), names.fix);
        }
        value
    }

    /// `sessionAffinity` and its timeout: `Some(None)` for no affinity,
    /// `None` after a problem.
    pub fn affinity(
        &mut self,
        at: &str,
        affinity: Option<&str>,
        config: Option<&RawAffinityConfig>,
    ) -> Option<Option<u32>> {
        let timeout = config.and_then(|config| config.client_ip.as_ref()?.timeout_seconds);
        let timeout_field = format!("{at}.sessionAffinityConfig.clientIP.timeoutSeconds");
        match (affinity.unwrap_or("None"), timeout) {
            ("None", None) => Some(None),
            ("None", Some(_)) => {
                self.fail(
                    &timeout_field,
                    "is set but sessionAffinity is None",
                    "set sessionAffinity: ClientIP, or remove sessionAffinityConfig",
                );
                None
            }
            ("ClientIP", None) => Some(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
            ("ClientIP", Some(Int(seconds))) => match u32::try_from(seconds) {
                Ok(seconds) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&seconds) => {
                    Some(Some(seconds))
                }
                _ => {
                    self.fail(
                        &timeout_field,
                        format!("{seconds} is not a usable affinity timeout"),
                        format!(
                            "use 1-{MAX_AFFINITY_TIMEOUT_S} seconds, or leave it out for the \
                             default of {DEFAULT_AFFINITY_TIMEOUT_S}"
                        ),
                    );
                    None
                }
            },
            (other, _) => {
                self.fail(
                    &format!("{at}.sessionAffinity"),
                    format!("\"{other}\" is not a session affinity"),
                    "use None (the default) or ClientIP, as in a Kubernetes Service",
                );
                None
            }
        }
    }

    /// `loadBalancerSourceRanges`: IPv4 or IPv6 CIDRs. Host bits are
    /// cleared, with a warning (as Kubernetes, which parses them the same
    /// way).
    pub fn source_ranges(&mut self, at: &str, listed: &[String]) -> Vec<(IpAddr, u8)> {
        const FIX: &str = "write a network and its prefix length, e.g. 198.18.0.0/24 \
                           or 2001:db8::/64 (198.18.0.7/32 for one address)";
        let mut ranges = Vec::new();
        for (index, text) in listed.iter().enumerate() {
            let field = format!("{at}.loadBalancerSourceRanges[{index}]");
            let parsed = text.trim().split_once('/').and_then(|(address, len)| {
                let address = address.parse::<IpAddr>().ok()?;
                let bits = if address.is_ipv4() { 32 } else { 128 };
                let len = len.parse::<u8>().ok().filter(|len| *len <= bits)?;
                Some((address, len))
            });
            let Some((address, len)) = parsed else {
                self.fail(&field, format!("\"{text}\" is not a CIDR"), FIX);
                continue;
            };
            let network = network_of(address, len);
            if network != address {
                self.warn(
                    &field,
                    format!("{text} has host bits set; it means {network}/{len}"),
                    format!("write {network}/{len}"),
                );
            }
            ranges.push((network, len));
        }
        ranges
    }

    /// A backend's `weight` (`field`): 0-`MAX_WEIGHT`, 1 when left out.
    pub fn weight(&mut self, field: &str, weight: Option<Int>) -> Option<u32> {
        match weight {
            None => Some(1),
            Some(Int(weight)) if (0..=MAX_WEIGHT).contains(&weight) => u32::try_from(weight).ok(),
            Some(Int(weight)) => {
                self.fail(
                    field,
                    format!("{weight} is not a usable weight"),
                    format!("use 0-{MAX_WEIGHT} (0 sends it no new flows; default 1)"),
                );
                None
            }
        }
    }

    /// An endpoint's conditions as in an EndpointSlice: `ready` (default
    /// true), `serving` (default: as ready), `terminating` (default false).
    /// Returns `(ready, serving, terminating)`, or `None` after a problem.
    pub fn conditions(&mut self, field: &str, raw: &RawBackend) -> Option<(bool, bool, bool)> {
        let ready = raw.ready.unwrap_or(true);
        let serving = raw.serving.unwrap_or(ready);
        let terminating = raw.terminating.unwrap_or(false);
        if ready && terminating {
            self.fail(
                &format!("{field}.ready"),
                "a terminating backend is not ready",
                "set ready: false (and serving: true while it still answers)",
            );
            return None;
        }
        if serving && !ready && !terminating {
            self.fail(
                &format!("{field}.serving"),
                "a backend that serves but is not ready must be terminating",
                "set ready: true, or terminating: true if it is shutting down",
            );
            return None;
        }
        Some((ready, serving, terminating))
    }
}

fn is_interface_name(name: &str) -> bool {
    // IFNAMSIZ is 16 including the NUL.
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}
