//! The config as written -> `DesiredState`: asks `check` for every value,
//! the model (`Owners`) for what belongs to which service, and assembles
//! the state. The state is `None` when any check found a problem.

use std::collections::HashMap;
use std::net::IpAddr;

use super::EXAMPLE;
use super::check::Checker;
use super::raw::{RawBackend, RawConfig, RawService};
use crate::model::{
    Backend, Claim, DEFAULT_MASQUERADE_PORTS, DEFAULT_TABLE_SIZE, DesiredState, IpFamily, Owners,
    Protocol, Service, TrafficPolicy,
};
use crate::source::yaml::Overrides;

/// Builds the state while the checks record what is wrong with it.
pub struct Builder<'a> {
    pub check: Checker<'a>,
    /// Each service's (namespace, name), by index, for duplicate names.
    names: HashMap<(String, String), usize>,
    /// Which service (by index) holds each NodePort and frontend.
    owners: Owners<usize>,
}

impl<'a> Builder<'a> {
    pub fn new(check: Checker<'a>) -> Self {
        Self {
            check,
            names: HashMap::new(),
            owners: Owners::default(),
        }
    }

    /// The whole document, and the field path of each interface (see
    /// `LoadedConfig::interface_field`).
    pub fn config(
        &mut self,
        raw: RawConfig,
        overrides: &Overrides,
    ) -> (Option<DesiredState>, Vec<Option<String>>) {
        let (interfaces, interface_fields) = self.interfaces(&raw.node.interfaces, overrides);
        let check = &mut self.check;
        let node_addresses = raw
            .node
            .addresses
            .as_deref()
            .map(|a| check.node_addresses(a));
        let allowed_frontend_addresses = raw
            .node
            .allowed_frontend_addresses
            .iter()
            .enumerate()
            .filter_map(|(index, text)| {
                check.ip(&format!("node.allowedFrontendAddresses[{index}]"), text)
            })
            .collect();
        let masquerade_ports = match raw.masquerade.and_then(|m| m.port_range) {
            Some(text) => check.port_range("masquerade.portRange", &text),
            None => Some(DEFAULT_MASQUERADE_PORTS),
        };
        let conntrack = check.conntrack(raw.conntrack.unwrap_or_default());
        let raw_table_size = raw.selection.and_then(|s| s.table_size);
        let table_size_auto = raw_table_size.is_none();
        let table_size = check.table_size(raw_table_size);
        let services = self.services(raw.services, table_size.unwrap_or(DEFAULT_TABLE_SIZE));
        if let Some(listed) = &node_addresses {
            self.warn_families_without_node_address(listed, &services);
        }
        if services.is_empty() && self.check.problems.is_empty() {
            self.check.warn(
                "services",
                "no services are configured, so xlb passes every packet to the kernel",
                format!("add services (see {EXAMPLE})"),
            );
        }
        let state = match (masquerade_ports, table_size) {
            (Some(masquerade_ports), Some(table_size)) => Some(DesiredState {
                interfaces,
                node_addresses,
                masquerade_ports,
                conntrack,
                table_size,
                table_size_auto,
                allowed_frontend_addresses,
                services,
            }),
            _ => None,
        };
        (state, interface_fields)
    }

    /// A service with a NodePort served in a family `node.addresses` lists
    /// no address of: its clients of that family reach it nowhere.
    fn warn_families_without_node_address(&mut self, listed: &[IpAddr], services: &[Service]) {
        for (index, service) in services.iter().enumerate() {
            for family in service.node_port_families_without(listed) {
                self.check.warn(
                    &format!("services[{index}].nodePort"),
                    format!(
                        "{family} clients cannot reach nodePort {}: node.addresses lists no {family} address",
                        service.node_port
                    ),
                    format!("add the node's {family} address to node.addresses"),
                );
            }
        }
    }

    fn interfaces(
        &mut self,
        listed: &[String],
        overrides: &Overrides,
    ) -> (Vec<String>, Vec<Option<String>>) {
        self.check.interface_names(listed);
        if !overrides.interfaces.is_empty() {
            let mut names: Vec<String> = Vec::new();
            for name in &overrides.interfaces {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
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

    fn services(&mut self, raw: Vec<RawService>, table_size: u32) -> Vec<Service> {
        raw.into_iter()
            .enumerate()
            .filter_map(|(index, raw)| self.service(index, raw, table_size))
            .collect()
    }

    /// `services[index]`, in the order its fields' findings are reported.
    fn service(&mut self, index: usize, raw: RawService, table_size: u32) -> Option<Service> {
        let at = format!("services[{index}]");
        let namespace = self.name(index, &at, &raw);
        let protocol = (self.check).protocol(&format!("{at}.protocol"), raw.protocol.as_deref());
        let node_port = self.node_port(&at, &raw);
        if let (Some(protocol), Some(port)) = (protocol, node_port.filter(|port| *port != 0)) {
            self.claim_node_port(index, &at, protocol, port);
        }
        let port = self.port(&at, &raw);
        let frontends = self.check.frontends(&at, &raw.frontends);
        let cluster_ip = (raw.cluster_ip.as_deref())
            .and_then(|text| self.check.cluster_ip(&at, text, &frontends));
        if let (Some(protocol), Some(port)) = (protocol, port) {
            let addresses: Vec<(String, IpAddr)> = (frontends.iter())
                .map(|(position, address)| (format!("{at}.frontends[{position}]"), *address))
                .chain(cluster_ip.map(|address| (format!("{at}.clusterIP"), address)))
                .collect();
            self.claim_addresses(index, protocol, port, addresses);
        }
        let check = &mut self.check;
        let policy = check.traffic_policy(
            &format!("{at}.externalTrafficPolicy"),
            raw.external_traffic_policy.as_deref(),
        );
        let internal_policy = check.traffic_policy(
            &format!("{at}.internalTrafficPolicy"),
            raw.internal_traffic_policy.as_deref(),
        );
        let affinity = check.affinity(
            &at,
            raw.session_affinity.as_deref(),
            raw.session_affinity_config.as_ref(),
        );
        let source_ranges = check.source_ranges(&at, &raw.load_balancer_source_ranges);
        let health_check_node_port = self.health_check_node_port(&at, &raw, policy);
        let backends = self.backends(&at, &raw, table_size);
        self.warn_if_nothing_local(&at, policy, &backends);
        let listed = (frontends
            .iter()
            .map(|(position, address)| (format!("{at}.frontends[{position}]"), *address)))
        .chain(cluster_ip.map(|address| (format!("{at}.clusterIP"), address)))
        .chain(
            source_ranges
                .iter()
                .enumerate()
                .map(|(index, (address, _))| {
                    (format!("{at}.loadBalancerSourceRanges[{index}]"), *address)
                }),
        );
        let ip_families = self.ip_families(&at, raw.ip_families.as_deref(), listed, &backends);
        Some(Service {
            name: raw.name,
            namespace,
            protocol: protocol?,
            node_port: node_port?,
            port: port?,
            frontends: frontends.into_iter().map(|(_, a)| a).collect(),
            cluster_ips: cluster_ip.into_iter().collect(),
            ip_families: ip_families?,
            external_traffic_policy: policy?,
            internal_traffic_policy: internal_policy?,
            session_affinity_timeout: affinity?,
            source_ranges,
            health_check_node_port,
            backends,
        })
    }

    /// The service's namespace (`default` when left out), after checking
    /// its name and namespace and that no other service has both.
    fn name(&mut self, index: usize, at: &str, raw: &RawService) -> String {
        let name_ok = self.check.dns_label(&format!("{at}.name"), &raw.name);
        let namespace = raw
            .namespace
            .clone()
            .unwrap_or_else(|| String::from("default"));
        let namespace_ok = self.check.dns_label(&format!("{at}.namespace"), &namespace);
        if name_ok
            && namespace_ok
            && let Some(first) = (self.names).insert((namespace.clone(), raw.name.clone()), index)
        {
            self.check.fail(
                &format!("{at}.name"),
                format!(
                    "\"{}\" is already the name of services[{first}] in namespace \"{namespace}\"",
                    raw.name
                ),
                "give each service a unique name",
            );
        }
        namespace
    }

    /// `nodePort`: 0 for none, which needs frontends or a clusterIP.
    fn node_port(&mut self, at: &str, raw: &RawService) -> Option<u16> {
        match raw.node_port {
            Some(port) => {
                let hint = " (NodePorts are usually 30000-32767)";
                self.check.port(&format!("{at}.nodePort"), port, hint)
            }
            None if raw.frontends.is_empty() && raw.cluster_ip.is_none() => {
                self.check.fail(
                    at,
                    "has neither a nodePort, frontends nor a clusterIP, so nothing would reach it",
                    "add nodePort (usually 30000-32767), or port with frontends or clusterIP",
                );
                None
            }
            None => Some(0),
        }
    }

    /// `port`, which frontends and a clusterIP need; 0 without them.
    fn port(&mut self, at: &str, raw: &RawService) -> Option<u16> {
        match raw.port {
            Some(port) => self.check.port(&format!("{at}.port"), port, ""),
            None if !raw.frontends.is_empty() || raw.cluster_ip.is_some() => {
                self.check.fail(
                    &format!("{at}.port"),
                    "is missing: frontends and the clusterIP answer on the service port",
                    "add port (the Service's port, e.g. 80)",
                );
                None
            }
            None => Some(0),
        }
    }

    /// Claims the service's NodePort (the model's rule: it belongs to one
    /// service); a finding when it is taken.
    fn claim_node_port(&mut self, index: usize, at: &str, protocol: Protocol, port: u16) {
        if let Err(first) = self.owners.take(Claim::NodePort { protocol, port }, index) {
            self.check.fail(
                &format!("{at}.nodePort"),
                format!("{protocol} {port} is already the nodePort of services[{first}]"),
                "give each service its own nodePort (TCP and UDP may share one)",
            );
        }
    }

    /// Claims the service's frontends and clusterIP (`(field, address)`) on
    /// its port; a finding for each that another service holds.
    fn claim_addresses(
        &mut self,
        index: usize,
        protocol: Protocol,
        port: u16,
        addresses: Vec<(String, IpAddr)>,
    ) {
        for (field, address) in addresses {
            let claim = Claim::Address {
                protocol,
                address,
                port,
            };
            if let Err(&first) = self.owners.take(claim, index)
                && first != index
            {
                self.check.fail(
                    &field,
                    format!(
                        "{protocol} {address}:{port} is already a frontend of services[{first}]"
                    ),
                    "give each service its own address or port",
                );
            }
        }
    }

    fn health_check_node_port(
        &mut self,
        at: &str,
        raw: &RawService,
        policy: Option<TrafficPolicy>,
    ) -> Option<u16> {
        let field = format!("{at}.healthCheckNodePort");
        let port = (self.check).port(
            &field,
            raw.health_check_node_port?,
            " (usually 30000-32767)",
        )?;
        if policy == Some(TrafficPolicy::Cluster) {
            self.check.fail(
                &field,
                "only a service with externalTrafficPolicy Local has a health check node port",
                "remove it, or set externalTrafficPolicy: Local",
            );
        }
        Some(port)
    }

    /// `{at}.ipFamilies`: each of `IPv4` and `IPv6` at most once; every
    /// address in `listed` (field, address) of a listed family. Backends of
    /// another family are only warned about: they get no traffic. Empty
    /// when left out (the service's addresses say).
    fn ip_families(
        &mut self,
        at: &str,
        names: Option<&[String]>,
        listed: impl Iterator<Item = (String, IpAddr)>,
        backends: &[Backend],
    ) -> Option<Vec<IpFamily>> {
        let Some(names) = names else {
            return Some(Vec::new());
        };
        let field = format!("{at}.ipFamilies");
        let check = &mut self.check;
        if names.is_empty() {
            let fix = "list IPv4, IPv6 or both, or leave ipFamilies out";
            check.fail(&field, "the list is empty", fix);
            return None;
        }
        let mut families = Vec::new();
        for (index, name) in names.iter().enumerate() {
            match IpFamily::from_name(name) {
                Some(family) if families.contains(&family) => {
                    let fix = "list each family once";
                    check.fail(
                        &format!("{field}[{index}]"),
                        format!("{name} is listed twice"),
                        fix,
                    );
                }
                Some(family) => families.push(family),
                None => {
                    let message = format!("\"{name}\" is not an IP family");
                    check.fail(&format!("{field}[{index}]"), message, "use IPv4 or IPv6");
                }
            }
        }
        if families.len() != names.len() {
            return None;
        }
        let mut ok = true;
        for (field, address) in listed {
            let family = IpFamily::of(address);
            if !families.contains(&family) {
                let message = format!("{address} is {family}, which {at}.ipFamilies does not list");
                check.fail(&field, message, format!("add {family} to {at}.ipFamilies"));
                ok = false;
            }
        }
        for (index, backend) in backends.iter().enumerate() {
            let family = IpFamily::of(backend.address);
            if !families.contains(&family) {
                check.warn(
                    &format!("{at}.backends[{index}].address"),
                    format!(
                        "{} is {family}, which ipFamilies does not list: it gets no traffic",
                        backend.address
                    ),
                    format!("add {family} to {at}.ipFamilies, or remove the backend"),
                );
            }
        }
        ok.then_some(families)
    }

    fn warn_if_nothing_local(
        &mut self,
        at: &str,
        policy: Option<TrafficPolicy>,
        backends: &[Backend],
    ) {
        if policy == Some(TrafficPolicy::Local)
            && !backends.is_empty()
            && !backends.iter().any(|backend| backend.is_local)
        {
            self.check.warn(
                &format!("{at}.externalTrafficPolicy"),
                "is Local but no backend is local, so this node drops every packet to the service",
                "mark the backends that run on this node with local: true",
            );
        }
    }

    /// The service's backends (after its `targetPort`), each once, and
    /// whether they can take new flows at all.
    fn backends(&mut self, at: &str, service: &RawService, table_size: u32) -> Vec<Backend> {
        let target_port = (service.target_port)
            .and_then(|port| self.check.port(&format!("{at}.targetPort"), port, ""));
        let target_port_ok = service.target_port.is_none() || target_port.is_some();
        let mut backends = Vec::new();
        let mut seen: HashMap<(IpAddr, u16), usize> = HashMap::new();
        let count = service.backends.len();
        for (index, raw) in service.backends.iter().enumerate() {
            let target = Target {
                at,
                port: target_port,
                port_ok: target_port_ok,
            };
            if let Some(backend) = self.backend(&target, index, raw, &mut seen) {
                backends.push(backend);
            }
        }
        if backends.len() == count && count > 0 && backends.iter().all(|b| b.weight == 0) {
            self.check.fail(
                &format!("{at}.backends"),
                "every backend has weight 0, so new flows could go nowhere",
                "give at least one backend a weight of 1 or more",
            );
        }
        let weighted = backends.iter().filter(|b| b.weight > 0).count();
        if u32::try_from(weighted).map_or(true, |weighted| weighted > table_size) {
            self.check.fail(
                &format!("{at}.backends"),
                format!("{weighted} weighted backends do not fit a selection table of {table_size} slots"),
                "raise selection.tableSize to a prime above the number of backends",
            );
        }
        backends
    }

    /// `{at}.backends[index]`, unless it has a problem or is listed again
    /// (`seen`: the index of each (address, port) so far).
    fn backend(
        &mut self,
        target: &Target<'_>,
        index: usize,
        raw: &RawBackend,
        seen: &mut HashMap<(IpAddr, u16), usize>,
    ) -> Option<Backend> {
        let at = target.at;
        let field = format!("{at}.backends[{index}]");
        let check = &mut self.check;
        let address = check.backend_address(&format!("{field}.address"), &raw.address);
        let port = match raw.port {
            Some(port) => check.port(&format!("{field}.port"), port, ""),
            None if target.port.is_some() => target.port,
            None => {
                if target.port_ok {
                    let fix = format!("set {at}.targetPort, or port on this backend");
                    check.fail(&field, "has no port", fix);
                }
                None
            }
        };
        let weight = check.weight(&format!("{field}.weight"), raw.weight);
        let (ready, serving, terminating) = check.conditions(&field, raw)?;
        let (address, port, weight) = (address?, port?, weight?);
        if let Some(first) = seen.insert((address, port), index) {
            check.fail(
                &format!("{field}.address"),
                format!("{address}:{port} is listed twice (also {at}.backends[{first}])"),
                "list each backend once; use weight to give it a larger share",
            );
            return None;
        }
        Some(Backend {
            address,
            port,
            weight,
            name: raw.name.clone(),
            ready,
            serving,
            terminating,
            is_local: raw.local.unwrap_or(false),
        })
    }
}

/// Where a service's backends are and the port they default to.
struct Target<'a> {
    at: &'a str,
    /// `targetPort`, when set and valid.
    port: Option<u16>,
    /// Whether `targetPort` is left out or valid (a backend without a port
    /// is then a finding of its own).
    port_ok: bool,
}
