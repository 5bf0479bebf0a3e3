//! The YAML config file -> `DesiredState`, with every error located
//! (`file:line:column: field.path: problem; fix`).
//!
//! Two passes: serde_yaml deserializes into permissive `Raw*` types (wide
//! integers, strings for addresses) and locates syntax, type and unknown-field
//! errors; then `Validator` checks meaning and locates its findings with the
//! field-path index from `locate`.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::locate::{Locations, Position};
pub use super::problem::Problem;
use super::problem::{SYNTAX_FIX, display_problems, error_position};
use crate::model::{
    Backend, Conntrack, DEFAULT_AFFINITY_TIMEOUT_S, DEFAULT_MASQUERADE_PORTS, DEFAULT_TABLE_SIZE,
    DesiredState, MAX_AFFINITY_TIMEOUT_S, MAX_TABLE_SIZE, Protocol, Service, TrafficPolicy,
    is_prime, network_of,
};

/// Most weight one backend may have.
pub const MAX_WEIGHT: i128 = 1000;
/// Bounds of `conntrack.*TimeoutSeconds` (one second to a year).
const TIMEOUT_RANGE: RangeInclusive<i128> = 1..=31_536_000;
/// Bounds of `conntrack.maxFlows`.
const MAX_FLOWS_RANGE: RangeInclusive<i128> = 1024..=(1 << 26);
const EXAMPLE: &str = "config/example.yaml";

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read the config: {source}; check the path given to --config")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// A command-line value that does not fit this node.
    #[error("{flag} {value}: {message}; {fix}")]
    Flag {
        flag: &'static str,
        value: String,
        message: String,
        fix: String,
    },
    /// Every problem found, in document order (one per line when displayed).
    #[error("{}", display_problems(problems))]
    Invalid { problems: Vec<Problem> },
}

/// Settings that come from the command line rather than the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--iface`: replaces `node.interfaces` when not empty.
    pub interfaces: Vec<String>,
}

/// A validated config, with what is needed to locate later findings
/// (interfaces missing on this node, ...) in the same file.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub state: DesiredState,
    /// Non-fatal findings, already formatted and located.
    pub warnings: Vec<Problem>,
    origin: String,
    locations: Locations,
    /// Field path of each entry of `state.interfaces` in the file, if it came
    /// from the file rather than `--iface`.
    interface_fields: Vec<Option<String>>,
}

impl LoadedConfig {
    /// A finding about `field`, located in this config's file.
    pub fn problem(&self, field: &str, message: String, fix: String) -> Problem {
        Problem::located(&self.origin, &self.locations, field, message, fix)
    }

    /// Field path that named `state.interfaces[index]`, or `--iface`.
    pub fn interface_field(&self, index: usize) -> String {
        self.interface_fields
            .get(index)
            .cloned()
            .flatten()
            .unwrap_or_else(|| String::from("--iface"))
    }

    /// Field path of `state.node_addresses[index]`.
    pub fn node_address_field(index: usize) -> String {
        format!("node.addresses[{index}]")
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// Reads and validates the config at `path`.
pub fn load(path: &Path, overrides: &Overrides) -> Result<LoadedConfig, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        origin: origin.clone(),
        source,
    })?;
    parse(&origin, &text, overrides)
}

/// Validates config `text`; `origin` names it in messages.
pub fn parse(origin: &str, text: &str, overrides: &Overrides) -> Result<LoadedConfig, ConfigError> {
    if !has_content(text) {
        return Err(ConfigError::Invalid {
            problems: vec![Problem::new(
                origin,
                Position { line: 1, column: 1 },
                "",
                "the config is empty",
                format!("describe the node and its services; start from {EXAMPLE}"),
            )],
        });
    }
    let mut locations = Locations::index_skipping(text, Some(SERVICES));
    if let Some(position) = locations.first_alias() {
        return Err(ConfigError::Invalid {
            problems: vec![Problem::alias(origin, position)],
        });
    }
    let raw: RawConfig = serde_yaml::from_str(text).map_err(|error| ConfigError::Invalid {
        problems: vec![serde_problem(origin, &error)],
    })?;
    let located = Located {
        text,
        outside: &locations,
        services: std::cell::OnceCell::new(),
    };
    let mut validator = Validator {
        origin,
        locations: &located,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let (state, interface_fields) = validator.config(raw, overrides);
    let Validator {
        problems, warnings, ..
    } = validator;
    match state {
        Some(state) if problems.is_empty() => Ok(LoadedConfig {
            locations: {
                // Later findings are about the node's settings; the services'
                // positions (most of a big file) are not kept.
                locations.retain(|path| !path.starts_with(SERVICES));
                locations
            },
            state,
            warnings,
            origin: origin.to_owned(),
            interface_fields,
        }),
        _ => Err(ConfigError::Invalid { problems }),
    }
}

/// Whether `text` has anything but blank lines, comments and `---`.
fn has_content(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim();
        !(line.is_empty() || line.starts_with('#') || line == "---" || line == "...")
    })
}

/// A serde_yaml error as a `Problem`: its path, its message without the
/// position (which moves into the prefix), and a fix chosen by its kind.
fn serde_problem(origin: &str, error: &serde_yaml::Error) -> Problem {
    let position = error_position(error);
    let Position { line, column } = position;
    let mut message = error.to_string();
    let suffix = format!(" at line {line} column {column}");
    if let Some(at) = message.find(&suffix) {
        message.replace_range(at..at + suffix.len(), "");
    }
    let mut field = String::new();
    if let Some((head, rest)) = message.split_once(": ") {
        let is_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_' | '-'));
        if is_path {
            field = head.to_owned();
            message = rest.to_owned();
        }
    }
    let fix = if message.contains("is not a number") {
        String::from("write a plain number (named ports are not supported)")
    } else if message.starts_with("unknown field") {
        format!("remove it or correct its spelling; keys are camelCase as in {EXAMPLE}")
    } else if message.starts_with("missing field") {
        format!("add it (see {EXAMPLE})")
    } else if message.starts_with("duplicate field") {
        String::from("keep only one of them")
    } else if message.starts_with("invalid type") || message.starts_with("invalid value") {
        format!("write the value as {EXAMPLE} does")
    } else {
        String::from(SYNTAX_FIX)
    };
    Problem::new(origin, position, field, message, fix)
}

// ---------------------------------------------------------------------------
// The file as written. Wide types so that range checks happen in `Validator`
// with a helpful message, not in serde with a generic one.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    masquerade: Option<RawMasquerade>,
    conntrack: Option<RawConntrack>,
    selection: Option<RawSelection>,
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNode {
    #[serde(default)]
    interfaces: Vec<String>,
    addresses: Option<Vec<String>>,
    #[serde(default)]
    allowed_frontend_addresses: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMasquerade {
    port_range: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConntrack {
    tcp_timeout_seconds: Option<Int>,
    tcp_syn_timeout_seconds: Option<Int>,
    tcp_closing_timeout_seconds: Option<Int>,
    udp_timeout_seconds: Option<Int>,
    max_flows: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelection {
    table_size: Option<Int>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    name: String,
    namespace: Option<String>,
    protocol: Option<String>,
    node_port: Option<Int>,
    port: Option<Int>,
    #[serde(default)]
    frontends: Vec<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    target_port: Option<Int>,
    external_traffic_policy: Option<String>,
    internal_traffic_policy: Option<String>,
    session_affinity: Option<String>,
    session_affinity_config: Option<RawAffinityConfig>,
    #[serde(default)]
    load_balancer_source_ranges: Vec<String>,
    health_check_node_port: Option<Int>,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

/// `sessionAffinityConfig`, shaped as in a Kubernetes Service.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAffinityConfig {
    #[serde(rename = "clientIP")]
    client_ip: Option<RawClientIp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawClientIp {
    timeout_seconds: Option<Int>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBackend {
    address: String,
    port: Option<Int>,
    weight: Option<Int>,
    name: Option<String>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    local: Option<bool>,
}

/// Any YAML integer, kept wide so that `70000` reaches the range check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Int(i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Int, E> {
                Ok(Int(value.into()))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Int, E> {
                Ok(Int(value.into()))
            }
            fn visit_i128<E: de::Error>(self, value: i128) -> Result<Int, E> {
                Ok(Int(value))
            }
            fn visit_u128<E: de::Error>(self, value: u128) -> Result<Int, E> {
                Ok(Int(i128::try_from(value).unwrap_or(i128::MAX)))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Int, E> {
                Err(E::custom(format_args!("\"{value}\" is not a number")))
            }
        }
        deserializer.deserialize_any(IntVisitor)
    }
}

// ---------------------------------------------------------------------------

/// The top-level field with the services.
const SERVICES: &str = "services";

/// Positions for the validator's findings: the node's settings indexed up
/// front, the services' only when a finding is about one of them (most of
/// a big file is services, and indexing them costs more than reading it).
struct Located<'a> {
    text: &'a str,
    /// Everything but what is inside `services`.
    outside: &'a Locations,
    services: std::cell::OnceCell<Locations>,
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

struct Validator<'a> {
    origin: &'a str,
    locations: &'a Located<'a>,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Validator<'_> {
    fn fail(&mut self, field: &str, message: impl Into<String>, fix: impl Into<String>) {
        let problem = Problem::located(
            self.origin,
            self.locations.locations_for(field),
            field,
            message,
            fix,
        );
        self.problems.push(problem);
    }

    fn warn(&mut self, field: &str, message: impl Into<String>, fix: impl Into<String>) {
        let problem = Problem::located(
            self.origin,
            self.locations.locations_for(field),
            field,
            message,
            fix,
        );
        self.warnings.push(problem);
    }

    /// Checks the whole document. Returns `None` for the state when a
    /// problem was found (the problems say why).
    fn config(
        &mut self,
        raw: RawConfig,
        overrides: &Overrides,
    ) -> (Option<DesiredState>, Vec<Option<String>>) {
        let (interfaces, interface_fields) = self.interfaces(&raw.node.interfaces, overrides);
        let node_addresses = raw
            .node
            .addresses
            .as_deref()
            .map(|addresses| self.node_addresses(addresses));
        let allowed_frontend_addresses = raw
            .node
            .allowed_frontend_addresses
            .iter()
            .enumerate()
            .filter_map(|(index, text)| {
                self.ipv4(&format!("node.allowedFrontendAddresses[{index}]"), text)
            })
            .collect();
        let masquerade_ports = match raw.masquerade.and_then(|m| m.port_range) {
            Some(text) => self.port_range("masquerade.portRange", &text),
            None => Some(DEFAULT_MASQUERADE_PORTS),
        };
        let conntrack = self.conntrack(raw.conntrack.unwrap_or_default());
        let table_size = self.table_size(raw.selection.and_then(|s| s.table_size));
        let services = self.services(raw.services, table_size.unwrap_or(DEFAULT_TABLE_SIZE));
        if services.is_empty() && self.problems.is_empty() {
            self.warn(
                "services",
                "no services are configured, so xlb passes every packet to the kernel",
                format!("add services (see {EXAMPLE})"),
            );
        }
        let state = match (masquerade_ports, table_size, node_addresses) {
            (Some(masquerade_ports), Some(table_size), node_addresses) => Some(DesiredState {
                interfaces,
                node_addresses,
                masquerade_ports,
                conntrack,
                table_size,
                allowed_frontend_addresses,
                services,
            }),
            _ => None,
        };
        (state, interface_fields)
    }

    fn interfaces(
        &mut self,
        listed: &[String],
        overrides: &Overrides,
    ) -> (Vec<String>, Vec<Option<String>>) {
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
        if !overrides.interfaces.is_empty() {
            let names = dedup(&overrides.interfaces);
            let fields = vec![None; names.len()];
            return (names, fields);
        }
        // None listed: the agent finds the uplinks itself (the devices
        // holding the node's addresses, the default route's device).
        let fields = (0..listed.len())
            .map(|index| Some(format!("node.interfaces[{index}]")))
            .collect();
        (listed.to_vec(), fields)
    }

    fn node_addresses(&mut self, listed: &[String]) -> Vec<Ipv4Addr> {
        if listed.is_empty() {
            self.fail(
                "node.addresses",
                "the list is empty, so NodePorts would answer on no address",
                "list the node's addresses, or leave node.addresses out to answer on every IPv4 address of the node",
            );
        }
        let mut addresses = Vec::new();
        let mut seen = HashMap::new();
        for (index, text) in listed.iter().enumerate() {
            let field = LoadedConfig::node_address_field(index);
            let Some(address) = self.ipv4(&field, text) else {
                continue;
            };
            if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
                self.fail(
                    &field,
                    format!("{address} cannot be a node address"),
                    "use a unicast address assigned to this node",
                );
            } else if let Some(first) = seen.insert(address, index) {
                self.fail(
                    &field,
                    format!("{address} is listed twice (also node.addresses[{first}])"),
                    "list each address once",
                );
            } else {
                addresses.push(address);
            }
        }
        addresses
    }

    fn ipv4(&mut self, field: &str, text: &str) -> Option<Ipv4Addr> {
        match text.trim().parse::<Ipv4Addr>() {
            Ok(address) => Some(address),
            Err(_) => {
                self.fail(
                    field,
                    format!("\"{text}\" is not an IPv4 address"),
                    "write it as four numbers 0-255, e.g. 198.18.1.2 (IPv6 is not supported yet)",
                );
                None
            }
        }
    }

    fn port_range(&mut self, field: &str, text: &str) -> Option<RangeInclusive<u16>> {
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

    fn conntrack(&mut self, raw: RawConntrack) -> Conntrack {
        let defaults = Conntrack::default();
        let mut timeout = |name: &str, value: Option<Int>, default: u32| -> u32 {
            let Some(Int(seconds)) = value else {
                return default;
            };
            if TIMEOUT_RANGE.contains(&seconds) {
                u32::try_from(seconds).unwrap_or(default)
            } else {
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
        };
        let tcp_timeout_s = timeout(
            "tcpTimeoutSeconds",
            raw.tcp_timeout_seconds,
            defaults.tcp_timeout_s,
        );
        let tcp_syn_timeout_s = timeout(
            "tcpSynTimeoutSeconds",
            raw.tcp_syn_timeout_seconds,
            defaults.tcp_syn_timeout_s,
        );
        let tcp_closing_timeout_s = timeout(
            "tcpClosingTimeoutSeconds",
            raw.tcp_closing_timeout_seconds,
            defaults.tcp_closing_timeout_s,
        );
        let udp_timeout_s = timeout(
            "udpTimeoutSeconds",
            raw.udp_timeout_seconds,
            defaults.udp_timeout_s,
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
            max_flows,
        }
    }

    fn table_size(&mut self, raw: Option<Int>) -> Option<u32> {
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

    fn port(&mut self, field: &str, Int(value): Int, hint: &str) -> Option<u16> {
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

    fn services(&mut self, raw: Vec<RawService>, table_size: u32) -> Vec<Service> {
        let mut services = Vec::new();
        let mut names: HashMap<(String, String), usize> = HashMap::new();
        let mut node_ports: HashMap<(Protocol, u16), usize> = HashMap::new();
        let mut frontends: HashMap<(Protocol, Ipv4Addr, u16), usize> = HashMap::new();
        for (index, raw) in raw.into_iter().enumerate() {
            let at = format!("services[{index}]");
            let name_ok = self.dns_label(&format!("{at}.name"), &raw.name);
            let namespace = raw.namespace.unwrap_or_else(|| String::from("default"));
            let namespace_ok = self.dns_label(&format!("{at}.namespace"), &namespace);
            if name_ok
                && namespace_ok
                && let Some(first) = names.insert((namespace.clone(), raw.name.clone()), index)
            {
                self.fail(
                    &format!("{at}.name"),
                    format!(
                        "\"{}\" is already the name of services[{first}] in namespace \"{namespace}\"",
                        raw.name
                    ),
                    "give each service a unique name",
                );
            }
            let protocol = match raw.protocol.as_deref() {
                None | Some("TCP") => Some(Protocol::Tcp),
                Some("UDP") => Some(Protocol::Udp),
                Some(other) => {
                    self.fail(
                        &format!("{at}.protocol"),
                        format!("\"{other}\" is not a supported protocol"),
                        "use TCP or UDP (upper case, as in a Kubernetes Service)",
                    );
                    None
                }
            };
            let node_port = match raw.node_port {
                Some(port) => self.port(
                    &format!("{at}.nodePort"),
                    port,
                    " (NodePorts are usually 30000-32767)",
                ),
                None if raw.frontends.is_empty() && raw.cluster_ip.is_none() => {
                    self.fail(
                        &at,
                        "has neither a nodePort, frontends nor a clusterIP, so nothing would reach it",
                        "add nodePort (usually 30000-32767), or port with frontends or clusterIP",
                    );
                    None
                }
                None => Some(0),
            };
            if let (Some(protocol), Some(node_port)) = (protocol, node_port)
                && node_port != 0
                && let Some(first) = node_ports.insert((protocol, node_port), index)
            {
                self.fail(
                    &format!("{at}.nodePort"),
                    format!("{protocol} {node_port} is already the nodePort of services[{first}]"),
                    "give each service its own nodePort (TCP and UDP may share one)",
                );
            }
            let port = match raw.port {
                Some(port) => self.port(&format!("{at}.port"), port, ""),
                None if !raw.frontends.is_empty() || raw.cluster_ip.is_some() => {
                    self.fail(
                        &format!("{at}.port"),
                        "is missing: frontends and the clusterIP answer on the service port",
                        "add port (the Service's port, e.g. 80)",
                    );
                    None
                }
                None => Some(0),
            };
            let service_frontends = self.frontends(&at, &raw.frontends);
            let cluster_ip = raw
                .cluster_ip
                .as_deref()
                .and_then(|text| self.cluster_ip(&at, text, &service_frontends));
            if let (Some(protocol), Some(port)) = (protocol, port) {
                let fields = service_frontends
                    .iter()
                    .map(|(position, address)| (format!("{at}.frontends[{position}]"), *address))
                    .chain(cluster_ip.map(|address| (format!("{at}.clusterIP"), address)));
                for (field, address) in fields {
                    if let Some(first) = frontends.insert((protocol, address, port), index)
                        && first != index
                    {
                        self.fail(
                            &field,
                            format!(
                                "{protocol} {address}:{port} is already a frontend of services[{first}]"
                            ),
                            "give each service its own address or port",
                        );
                    }
                }
            }
            let policy = self.traffic_policy(
                &format!("{at}.externalTrafficPolicy"),
                raw.external_traffic_policy.as_deref(),
            );
            let internal_policy = self.traffic_policy(
                &format!("{at}.internalTrafficPolicy"),
                raw.internal_traffic_policy.as_deref(),
            );
            let affinity = self.affinity(
                &at,
                raw.session_affinity.as_deref(),
                raw.session_affinity_config,
            );
            let source_ranges = self.source_ranges(&at, &raw.load_balancer_source_ranges);
            let health_check_node_port = raw.health_check_node_port.and_then(|port| {
                let field = format!("{at}.healthCheckNodePort");
                let port = self.port(&field, port, " (usually 30000-32767)")?;
                if policy == Some(TrafficPolicy::Cluster) {
                    self.fail(
                        &field,
                        "only a service with externalTrafficPolicy Local has a health check node port",
                        "remove it, or set externalTrafficPolicy: Local",
                    );
                }
                Some(port)
            });
            let target_port = raw
                .target_port
                .and_then(|port| self.port(&format!("{at}.targetPort"), port, ""));
            let target_port_ok = raw.target_port.is_none() || target_port.is_some();
            let backends =
                self.backends(&at, raw.backends, target_port, target_port_ok, table_size);
            if policy == Some(TrafficPolicy::Local)
                && !backends.is_empty()
                && !backends.iter().any(|backend| backend.is_local)
            {
                self.warn(
                    &format!("{at}.externalTrafficPolicy"),
                    "is Local but no backend is local, so this node drops every packet to the service",
                    "mark the backends that run on this node with local: true",
                );
            }
            if let (
                Some(protocol),
                Some(node_port),
                Some(port),
                Some(policy),
                Some(internal_policy),
                Some(affinity),
            ) = (protocol, node_port, port, policy, internal_policy, affinity)
            {
                services.push(Service {
                    name: raw.name,
                    namespace,
                    protocol,
                    node_port,
                    port,
                    frontends: service_frontends.into_iter().map(|(_, a)| a).collect(),
                    cluster_ips: cluster_ip.into_iter().collect(),
                    external_traffic_policy: policy,
                    internal_traffic_policy: internal_policy,
                    session_affinity_timeout: affinity,
                    source_ranges,
                    health_check_node_port,
                    backends,
                });
            }
        }
        services
    }

    /// `frontends`: unicast IPv4 addresses, each once; with their index.
    fn frontends(&mut self, at: &str, listed: &[String]) -> Vec<(usize, Ipv4Addr)> {
        let mut frontends = Vec::new();
        let mut seen = HashMap::new();
        for (index, text) in listed.iter().enumerate() {
            let field = format!("{at}.frontends[{index}]");
            let Some(address) = self.ipv4(&field, text) else {
                continue;
            };
            if address.is_unspecified()
                || address.is_broadcast()
                || address.is_multicast()
                || address.is_loopback()
            {
                self.fail(
                    &field,
                    format!("{address} cannot be a frontend"),
                    "use the load balancer's or the external unicast IPv4 address",
                );
            } else if let Some(first) = seen.insert(address, index) {
                self.fail(
                    &field,
                    format!("{address} is listed twice (also {at}.frontends[{first}])"),
                    "list each address once",
                );
            } else {
                frontends.push((index, address));
            }
        }
        frontends
    }

    /// `clusterIP`: a unicast IPv4 address that is not also a frontend.
    fn cluster_ip(
        &mut self,
        at: &str,
        text: &str,
        frontends: &[(usize, Ipv4Addr)],
    ) -> Option<Ipv4Addr> {
        let field = format!("{at}.clusterIP");
        let address = self.ipv4(&field, text)?;
        if address.is_unspecified()
            || address.is_broadcast()
            || address.is_multicast()
            || address.is_loopback()
        {
            self.fail(
                &field,
                format!("{address} cannot be a ClusterIP"),
                "use the Service's unicast IPv4 clusterIP (from the cluster's service CIDR)",
            );
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

    /// `externalTrafficPolicy` or `internalTrafficPolicy` (`field`).
    fn traffic_policy(&mut self, field: &str, text: Option<&str>) -> Option<TrafficPolicy> {
        match text {
            None | Some("Cluster") => Some(TrafficPolicy::Cluster),
            Some("Local") => Some(TrafficPolicy::Local),
            Some(other) => {
                self.fail(
                    field,
                    format!("\"{other}\" is not a traffic policy"),
                    "use Cluster (the default: any backend, client masqueraded) or Local (only \
                     local: true backends, client address kept)",
                );
                None
            }
        }
    }

    /// `sessionAffinity` and its timeout: `Some(None)` for no affinity,
    /// `None` after a problem.
    fn affinity(
        &mut self,
        at: &str,
        affinity: Option<&str>,
        config: Option<RawAffinityConfig>,
    ) -> Option<Option<u32>> {
        let timeout = config.and_then(|config| config.client_ip?.timeout_seconds);
        let timeout_field = format!("{at}.sessionAffinityConfig.clientIP.timeoutSeconds");
        match affinity {
            None | Some("None") => {
                if timeout.is_some() {
                    self.fail(
                        &timeout_field,
                        "is set but sessionAffinity is None",
                        "set sessionAffinity: ClientIP, or remove sessionAffinityConfig",
                    );
                    return None;
                }
                Some(None)
            }
            Some("ClientIP") => match timeout {
                None => Some(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
                Some(Int(seconds)) => match u32::try_from(seconds) {
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
            },
            Some(other) => {
                self.fail(
                    &format!("{at}.sessionAffinity"),
                    format!("\"{other}\" is not a session affinity"),
                    "use None (the default) or ClientIP, as in a Kubernetes Service",
                );
                None
            }
        }
    }

    /// `loadBalancerSourceRanges`: IPv4 CIDRs. Host bits are cleared, with
    /// a warning (as Kubernetes, which parses them the same way).
    fn source_ranges(&mut self, at: &str, listed: &[String]) -> Vec<(Ipv4Addr, u8)> {
        const FIX: &str = "write an IPv4 network and its prefix length, e.g. 198.18.0.0/24 \
                           (or 198.18.0.7/32 for one address)";
        let mut ranges = Vec::new();
        for (index, text) in listed.iter().enumerate() {
            let field = format!("{at}.loadBalancerSourceRanges[{index}]");
            let parsed = text.trim().split_once('/').and_then(|(address, len)| {
                let address = address.parse::<Ipv4Addr>().ok()?;
                let len = len.parse::<u8>().ok().filter(|len| *len <= 32)?;
                Some((address, len))
            });
            let Some((address, len)) = parsed else {
                self.fail(&field, format!("\"{text}\" is not an IPv4 CIDR"), FIX);
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

    fn backends(
        &mut self,
        at: &str,
        raw: Vec<RawBackend>,
        target_port: Option<u16>,
        target_port_ok: bool,
        table_size: u32,
    ) -> Vec<Backend> {
        let mut backends = Vec::new();
        let mut seen: HashMap<(Ipv4Addr, u16), usize> = HashMap::new();
        let count = raw.len();
        for (index, raw) in raw.into_iter().enumerate() {
            let field = format!("{at}.backends[{index}]");
            let address = self.ipv4(&format!("{field}.address"), &raw.address);
            if let Some(address) = address
                && (address.is_unspecified()
                    || address.is_broadcast()
                    || address.is_multicast()
                    || address.is_loopback())
            {
                self.fail(
                    &format!("{field}.address"),
                    format!("{address} cannot be a backend"),
                    "use the pod's unicast IPv4 address",
                );
            }
            let port = match raw.port {
                Some(port) => self.port(&format!("{field}.port"), port, ""),
                None if target_port.is_some() => target_port,
                None => {
                    if target_port_ok {
                        self.fail(
                            &field,
                            "has no port",
                            format!("set {at}.targetPort, or port on this backend"),
                        );
                    }
                    None
                }
            };
            let weight = match raw.weight {
                None => Some(1),
                Some(Int(weight)) if (0..=MAX_WEIGHT).contains(&weight) => {
                    u32::try_from(weight).ok()
                }
                Some(Int(weight)) => {
                    self.fail(
                        &format!("{field}.weight"),
                        format!("{weight} is not a usable weight"),
                        format!("use 0-{MAX_WEIGHT} (0 sends it no new flows; default 1)"),
                    );
                    None
                }
            };
            let conditions = self.conditions(&field, &raw);
            let (Some(address), Some(port), Some(weight), Some((ready, serving, terminating))) =
                (address, port, weight, conditions)
            else {
                continue;
            };
            if let Some(first) = seen.insert((address, port), index) {
                self.fail(
                    &format!("{field}.address"),
                    format!("{address}:{port} is listed twice (also {at}.backends[{first}])"),
                    "list each backend once; use weight to give it a larger share",
                );
                continue;
            }
            backends.push(Backend {
                address,
                port,
                weight,
                name: raw.name,
                ready,
                serving,
                terminating,
                is_local: raw.local.unwrap_or(false),
            });
        }
        if backends.len() == count && count > 0 && backends.iter().all(|b| b.weight == 0) {
            self.fail(
                &format!("{at}.backends"),
                "every backend has weight 0, so new flows could go nowhere",
                "give at least one backend a weight of 1 or more",
            );
        }
        let weighted = backends.iter().filter(|b| b.weight > 0).count();
        if u32::try_from(weighted).map_or(true, |weighted| weighted > table_size) {
            self.fail(
                &format!("{at}.backends"),
                format!("{weighted} weighted backends do not fit a selection table of {table_size} slots"),
                "raise selection.tableSize to a prime above the number of backends",
            );
        }
        backends
    }

    /// An endpoint's conditions as in an EndpointSlice: `ready` (default
    /// true), `serving` (default: as ready), `terminating` (default false).
    /// Returns `(ready, serving, terminating)`, or `None` after a problem.
    fn conditions(&mut self, field: &str, raw: &RawBackend) -> Option<(bool, bool, bool)> {
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

    /// A Kubernetes object name: an RFC 1123 DNS label.
    fn dns_label(&mut self, field: &str, text: &str) -> bool {
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
}

fn dedup(names: &[String]) -> Vec<String> {
    let mut unique: Vec<String> = Vec::new();
    for name in names {
        if !unique.contains(name) {
            unique.push(name.clone());
        }
    }
    unique
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

/// A warning when the masquerade port range overlaps the kernel's ephemeral
/// port range (`net.ipv4.ip_local_port_range`): a local socket and a
/// masqueraded flow could then pick the same source port.
pub fn ephemeral_overlap(
    config: &LoadedConfig,
    ephemeral: &RangeInclusive<u16>,
) -> Option<Problem> {
    let ports = &config.state.masquerade_ports;
    if ports.end() < ephemeral.start() || ephemeral.end() < ports.start() {
        return None;
    }
    let field = "masquerade.portRange";
    let default = if config.locations.contains(field) {
        ""
    } else {
        " (the default)"
    };
    Some(config.problem(
        field,
        format!(
            "{}-{}{default} overlaps the kernel's ephemeral ports {}-{} (net.ipv4.ip_local_port_range)",
            ports.start(),
            ports.end(),
            ephemeral.start(),
            ephemeral.end()
        ),
        String::from(
            "move one of them so they do not overlap, e.g. sysctl net.ipv4.ip_local_port_range=\"32768 60999\"",
        ),
    ))
}

#[cfg(test)]
mod tests;
