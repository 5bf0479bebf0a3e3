//! What the agent checks about a config on this host, beyond what the
//! source validated: that its interfaces exist, its node addresses are
//! this node's, its tables fit in memory; and the map sizes it loads with.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use super::grow::MapCapacity;
use crate::kernel::{MapSizes, host};
use crate::model::{DesiredState, auto_table_size};
use crate::source::yaml::{self, ConfigError, LoadedConfig, Overrides};

/// `xlb check`: validates only. Returns the line to print on success.
pub fn check(path: &Path, overrides: &Overrides) -> Result<(String, Vec<String>), ConfigError> {
    let config = yaml::load(path, overrides)?;
    let warnings = warnings(&config);
    let state = &config.state;
    let summary = format!(
        "{}: ok ({} services, {} backends)",
        config.origin(),
        state.services.len(),
        state.backend_count()
    );
    Ok((summary, warnings))
}

/// The config's own warnings plus those that depend on this host.
pub(super) fn warnings(config: &LoadedConfig) -> Vec<String> {
    let mut warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    if let Some(ephemeral) = host::ephemeral_ports()
        && let Some(overlap) = yaml::ephemeral_overlap(config, &ephemeral)
    {
        warnings.push(overlap.to_string());
    }
    warnings.extend(select_memory_warning(config));
    warnings
}

/// Selection tables above this many bytes in all deserve a word.
const SELECT_WARN_BYTES: u64 = 256 << 20;

/// Kernel memory of one selection slot: array maps store each value in 8
/// bytes, a `u32` too.
const SELECT_SLOT_BYTES: u64 = 8;

/// A warning when the selection tables need a lot of memory: one table per
/// service (`XLB_SELECT`) of `selection.tableSize` slots, or of the size its
/// backends give it when that is left out.
fn select_memory_warning(config: &LoadedConfig) -> Option<String> {
    let state = &config.state;
    let slots: u64 = state
        .services
        .iter()
        .map(|service| {
            if !state.table_size_auto {
                return u64::from(state.table_size);
            }
            let selectable = service.backends.iter().filter(|b| b.weight > 0);
            let weights = selectable.clone().map(|b| u64::from(b.weight)).sum();
            u64::from(auto_table_size(
                selectable.count(),
                weights,
                state.table_size,
            ))
        })
        .sum();
    let bytes = slots.saturating_mul(SELECT_SLOT_BYTES);
    if bytes <= SELECT_WARN_BYTES {
        return None;
    }
    let problem = config.problem(
        "selection.tableSize",
        format!(
            "{} services' selection tables ({slots} slots) take {} MiB of kernel memory",
            state.services.len(),
            bytes >> 20
        ),
        String::from(
            "leave selection.tableSize out (each table sized by its backends), or a smaller \
             prime (4093 or 1021) at the cost of coarser weights",
        ),
    );
    Some(problem.to_string())
}

/// Every interface the config names must exist here.
pub(super) fn check_interfaces(config: &LoadedConfig) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    for (index, name) in config.state.interfaces.iter().enumerate() {
        if host::ifindex(name).is_some() {
            continue;
        }
        let message = format!("no interface \"{name}\" on this node");
        let fix = String::from("check `ip link`, or the network namespace xlb runs in");
        let field = config.interface_field(index);
        if field == "--iface" {
            return Err(ConfigError::Flag {
                flag: "--iface",
                value: name.clone(),
                message,
                fix,
            });
        }
        problems.push(config.problem(&field, message, fix));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid { problems })
    }
}

/// Listed node addresses that this node does not have (NodePort traffic to
/// them only arrives if something routes it here).
pub(super) fn foreign_node_addresses(
    config: &LoadedConfig,
    local: &BTreeSet<IpAddr>,
) -> Vec<String> {
    let Some(listed) = &config.state.node_addresses else {
        return Vec::new();
    };
    listed
        .iter()
        .enumerate()
        .filter(|(_, address)| !local.contains(address))
        .map(|(index, address)| {
            config
                .problem(
                    &LoadedConfig::node_address_field(index),
                    format!("{address} is not an address of this node"),
                    String::from("NodePorts answer on it only if traffic to it is routed here"),
                )
                .to_string()
        })
        .collect()
}

/// What `config` deserves on a node with `local` addresses: listed node
/// addresses it does not have, families without a node address.
pub(super) fn node_address_warnings(
    config: &LoadedConfig,
    local: &BTreeSet<IpAddr>,
) -> Vec<String> {
    let mut warnings = foreign_node_addresses(config, local);
    warnings.extend(families_without_node_address(config, local));
    warnings
}

/// Families a service with a NodePort is served in that the node has no
/// address of, when `node.addresses` is left out (the file's check warns
/// about a list without the family): its clients of that family reach the
/// NodePort nowhere.
pub(super) fn families_without_node_address(
    config: &LoadedConfig,
    local: &BTreeSet<IpAddr>,
) -> Vec<String> {
    if config.state.node_addresses.is_some() {
        return Vec::new();
    }
    let local: Vec<IpAddr> = local.iter().copied().collect();
    let mut warnings = Vec::new();
    for service in &config.state.services {
        for family in service.node_port_families_without(&local) {
            warnings.push(format!(
                "{}: service {}: {family} clients cannot reach nodePort {}: the node has no \
                 {family} address; give the node one, or list its addresses in node.addresses",
                config.origin(),
                service.qualified_name(),
                service.node_port
            ));
        }
    }
    warnings
}

/// Load-time map sizes for a config (the selection tables need none: each
/// service's table is made at its size when written).
pub(super) fn map_sizes(state: &DesiredState, capacity: MapCapacity) -> MapSizes {
    let flows6 = if serves_ipv6(state) {
        state.conntrack.max_flows
    } else {
        lb_common::maps::FLOWS6_MAX.min(state.conntrack.max_flows)
    };
    MapSizes {
        flows: state.conntrack.max_flows,
        flows6,
        backends: capacity.backends,
        services: capacity.frontends,
    }
}

/// Whether the node may serve IPv6: `node.addresses` lists an IPv6
/// address, or, listing none, the node has one (loopback and link-local
/// aside). Its IPv6 flow table is as large as the IPv4 one then.
fn serves_ipv6(state: &DesiredState) -> bool {
    match &state.node_addresses {
        Some(listed) => listed.iter().any(IpAddr::is_ipv6),
        None => crate::kernel::host::addresses().is_ok_and(|addresses| {
            (addresses.iter()).any(|entry| entry.address.is_ipv6() && !entry.address.is_loopback())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> LoadedConfig {
        match yaml::parse("t.yaml", text, &Overrides::default()) {
            Ok(config) => config,
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn missing_interface_is_a_located_config_error() {
        let loaded = config("node:\n  interfaces: [lo, xlb-nope0]\n");
        let error = check_interfaces(&loaded).map_err(|e| e.to_string());
        assert_eq!(
            error,
            Err(String::from(
                "t.yaml:2:20: node.interfaces[1]: no interface \"xlb-nope0\" on this node; check \
                 `ip link`, or the network namespace xlb runs in"
            ))
        );
        let overrides = Overrides {
            interfaces: vec![String::from("xlb-nope0")],
        };
        let loaded = yaml::parse("t.yaml", "node:\n  interfaces: [lo]\n", &overrides);
        let error = loaded
            .map_err(|e| e.to_string())
            .and_then(|c| check_interfaces(&c).map_err(|e| e.to_string()));
        assert_eq!(
            error,
            Err(String::from(
                "--iface xlb-nope0: no interface \"xlb-nope0\" on this node; check `ip link`, or \
                 the network namespace xlb runs in"
            ))
        );
    }

    #[test]
    fn a_family_without_node_address_is_warned_about() {
        let text = "node:\n  interfaces: [lo]\nservices:\n  - name: web\n    nodePort: 30080\n    targetPort: 80\n    backends:\n      - address: 198.18.1.2\n      - address: 2001:db8:1::2\n";
        let loaded = config(text);
        let local: BTreeSet<IpAddr> = [IpAddr::from([198, 18, 0, 1])].into_iter().collect();
        assert_eq!(
            node_address_warnings(&loaded, &local),
            [
                "t.yaml: service default/web: IPv6 clients cannot reach nodePort 30080: the node \
              has no IPv6 address; give the node one, or list its addresses in node.addresses"
            ]
        );
        let v6 = "2001:db8::1".parse().ok();
        let local6 = local.iter().copied().chain(v6);
        assert_eq!(
            node_address_warnings(&loaded, &local6.collect()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn foreign_node_address_warning() {
        let loaded = config("node:\n  interfaces: [lo]\n  addresses: [198.18.0.1, 198.18.0.2]\n");
        let local: BTreeSet<IpAddr> = [IpAddr::from([198, 18, 0, 1])].into_iter().collect();
        assert_eq!(
            foreign_node_addresses(&loaded, &local),
            [
                "t.yaml:3:27: node.addresses[1]: 198.18.0.2 is not an address of this node; \
              NodePorts answer on it only if traffic to it is routed here"
            ]
        );
    }

    #[test]
    fn map_sizes_do_not_grow_with_services() {
        let mut state = config("node:\n  interfaces: [lo]\n  addresses: [198.18.0.1]\n").state;
        assert_eq!(
            map_sizes(&state, MapCapacity::default()),
            MapSizes::default()
        );
        state.table_size = 65_537;
        state.services = (0..40)
            .map(|index| crate::model::Service {
                name: format!("s{index}"),
                namespace: String::from("default"),
                protocol: crate::model::Protocol::Tcp,
                node_port: 30_000 + index,
                ..crate::model::Service::default()
            })
            .collect();
        assert_eq!(
            map_sizes(&state, MapCapacity::default()),
            MapSizes::default()
        );
    }

    #[test]
    fn the_ipv6_flow_table_is_full_size_where_the_node_serves_ipv6() {
        let mut state = config("node:\n  interfaces: [lo]\n  addresses: [198.18.0.1]\n").state;
        let small = map_sizes(&state, MapCapacity::default());
        assert_eq!(small.flows6, lb_common::maps::FLOWS6_MAX);
        state.node_addresses = Some(vec![IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])]);
        let full = map_sizes(&state, MapCapacity::default());
        assert_eq!(full.flows6, state.conntrack.max_flows);
        state.conntrack.max_flows = 1000;
        assert_eq!(map_sizes(&state, MapCapacity::default()).flows6, 1000);
    }

    #[test]
    fn big_selection_tables_are_a_located_warning() {
        let services: String = (0..300)
            .map(|index| {
                format!(
                    "  - name: s{index}\n    nodePort: {}\n    backends: []\n",
                    30_000 + index
                )
            })
            .collect();
        let fixed = "selection:\n  tableSize: 16381\n";
        let loaded = config(&format!(
            "node:\n  interfaces: [lo]\n{fixed}services:\n{services}"
        ));
        // 300 services: 300 tables of 16381 slots of 8 bytes, 37 MiB: fine.
        assert_eq!(select_memory_warning(&loaded), None);
        let big: String = (0..3000)
            .map(|index| {
                format!(
                    "  - name: s{index}\n    nodePort: {}\n    backends: []\n",
                    30_000 + index
                )
            })
            .collect();
        let auto = config(&format!("node:\n  interfaces: [lo]\nservices:\n{big}"));
        // Sized by their backends (none): 3000 tables of 251 slots, 6 MiB.
        assert_eq!(select_memory_warning(&auto), None);
        let loaded = config(&format!(
            "node:\n  interfaces: [lo]\n{fixed}services:\n{big}"
        ));
        let warning = select_memory_warning(&loaded).unwrap_or_default();
        assert!(
            warning.starts_with(
                "t.yaml:4:14: selection.tableSize: 3000 services' selection tables (49143000 \
                 slots) take 374 MiB of kernel memory; leave selection.tableSize out"
            ),
            "{warning}"
        );
        let small = config(&format!(
            "node:\n  interfaces: [lo]\nselection:\n  tableSize: 1021\nservices:\n{big}"
        ));
        assert_eq!(select_memory_warning(&small), None);
    }

    #[test]
    fn check_summarises() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo.yaml");
        let result = check(&path, &Overrides::default()).map_err(|e| e.to_string());
        let Ok((summary, _)) = result else {
            panic!("{result:?}");
        };
        assert!(
            summary.ends_with("demo.yaml: ok (2 services, 4 backends)"),
            "{summary}"
        );
    }
}
