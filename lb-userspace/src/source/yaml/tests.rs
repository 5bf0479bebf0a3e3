use std::net::IpAddr;

use super::*;
use crate::model::{
    Backend, Conntrack, DEFAULT_MASQUERADE_PORTS, DEFAULT_TABLE_SIZE, IpFamily, MAX_TABLE_SIZE,
    Protocol, TrafficPolicy, is_prime,
};

const ORIGIN: &str = "config/x.yaml";

const GOOD: &str = "\
node:
  interfaces: [eth0]
services:
  - name: web
    protocol: TCP
    nodePort: 30080
    targetPort: 8080
    backends:
      - address: 198.18.1.2
      - address: 198.18.2.2
        port: 9090
        weight: 3
        name: pod-b
";

fn parse_ok(text: &str) -> LoadedConfig {
    match parse(ORIGIN, text, &Overrides::default()) {
        Ok(config) => config,
        Err(error) => panic!("expected a valid config, got:\n{error}"),
    }
}

/// Every line of the error for `text`.
fn errors(text: &str) -> Vec<String> {
    errors_with(text, &Overrides::default())
}

fn errors_with(text: &str, overrides: &Overrides) -> Vec<String> {
    match parse(ORIGIN, text, overrides) {
        Ok(config) => panic!("expected an error, got {:?}", config.state),
        Err(error) => error.to_string().lines().map(str::to_owned).collect(),
    }
}

/// The single error for `text`.
fn error(text: &str) -> String {
    let mut all = errors(text);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

/// The one error line for `text` contains `wanted`.
fn assert_error_contains(text: &str, wanted: &str) {
    let message = error(text);
    assert!(message.contains(wanted), "{message}");
}

/// The one error line for `text` starts with `wanted`.
fn assert_error_starts(text: &str, wanted: &str) {
    let message = error(text);
    assert!(message.starts_with(wanted), "{message}");
}

/// `config` has one warning, and it starts with `wanted`.
fn assert_one_warning_starts(config: &LoadedConfig, wanted: &str) {
    assert_eq!(config.warnings.len(), 1);
    let warning = config.warnings[0].to_string();
    assert!(warning.starts_with(wanted), "{warning}");
}

#[test]
fn good_config_becomes_desired_state() {
    let config = parse_ok(GOOD);
    let state = &config.state;
    assert_eq!(state.interfaces, ["eth0"]);
    assert_eq!(state.node_addresses, None);
    assert_eq!(state.masquerade_ports, DEFAULT_MASQUERADE_PORTS);
    assert_eq!(state.table_size, DEFAULT_TABLE_SIZE);
    assert!(
        state.table_size_auto,
        "no selection.tableSize: tables sized by backends"
    );
    assert_eq!(state.conntrack, Conntrack::default());
    assert_eq!(state.services.len(), 1);
    let web = &state.services[0];
    assert_eq!(
        (web.name.as_str(), web.namespace.as_str()),
        ("web", "default")
    );
    assert_eq!((web.protocol, web.node_port), (Protocol::Tcp, 30080));
    assert_eq!(
        web.backends,
        [
            Backend {
                address: IpAddr::from([198, 18, 1, 2]),
                port: 8080,
                weight: 1,
                name: None,
                ..Backend::default()
            },
            Backend {
                address: IpAddr::from([198, 18, 2, 2]),
                port: 9090,
                weight: 3,
                name: Some(String::from("pod-b")),
                ..Backend::default()
            },
        ]
    );
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert_eq!(state.backend_count(), 2);
}

#[test]
fn every_optional_field() {
    let config = parse_ok(
        "\
node:
  interfaces: [eth0, eth1]
  addresses: [198.18.0.1, 198.18.0.2]
masquerade:
  portRange: \"62000-63000\"
conntrack:
  tcpTimeoutSeconds: 3600
  tcpSynTimeoutSeconds: 30
  tcpClosingTimeoutSeconds: 5
  udpTimeoutSeconds: 20
  maxFlows: 4096
selection:
  tableSize: 4093
services:
  - name: dns
    namespace: kube-system
    protocol: UDP
    nodePort: 30053
    targetPort: 53
    backends:
      - address: 198.18.3.3
        weight: 0
      - address: 198.18.3.4
",
    );
    let state = config.state;
    assert_eq!(
        state.node_addresses,
        Some(vec![
            IpAddr::from([198, 18, 0, 1]),
            IpAddr::from([198, 18, 0, 2])
        ])
    );
    assert_eq!(state.masquerade_ports, 62_000..=63_000);
    assert_eq!(
        state.conntrack,
        Conntrack {
            tcp_timeout_s: 3600,
            tcp_syn_timeout_s: 30,
            tcp_closing_timeout_s: 5,
            udp_timeout_s: 20,
            udp_unassured_timeout_s: 10,
            max_flows: 4096,
        }
    );
    assert_eq!(state.table_size, 4093);
    assert!(
        !state.table_size_auto,
        "selection.tableSize given: every table that size"
    );
    assert_eq!(state.services[0].namespace, "kube-system");
    assert_eq!(state.services[0].protocol, Protocol::Udp);
    assert_eq!(state.services[0].backends[0].weight, 0);
}

#[test]
fn demo_and_example_configs_are_valid() {
    for name in ["demo.yaml", "example.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config")
            .join(name);
        let config = match load(&path, &Overrides::default()) {
            Ok(config) => config,
            Err(error) => panic!("{error}"),
        };
        assert!(!config.state.services.is_empty(), "{name}");
    }
}

#[test]
fn node_port_out_of_range() {
    let text = GOOD.replace("nodePort: 30080", "nodePort: 70000");
    assert_eq!(
        error(&text),
        "config/x.yaml:6:15: services[0].nodePort: 70000 is not a port; \
         use 1-65535 (NodePorts are usually 30000-32767)"
    );
}

#[test]
fn error_in_second_service_names_its_index_and_line() {
    let text = format!(
        "{GOOD}{}",
        r"  - name: api
    nodePort: 30081
    targetPort: 80
    backends:
      - address: 198.18.1.2
      - address: 198.18.1.300
"
    );
    assert_eq!(
        error(&text),
        "config/x.yaml:19:18: services[1].backends[1].address: \"198.18.1.300\" is not an IP \
         address; write an IPv4 address such as 198.18.1.2 or an IPv6 address such as 2001:db8::2"
    );
}

#[test]
fn target_port_and_backend_port_ranges() {
    let text = GOOD
        .replace("targetPort: 8080", "targetPort: 0")
        .replace("port: 9090", "port: -1");
    assert_eq!(
        errors(&text),
        [
            "config/x.yaml:7:17: services[0].targetPort: 0 is not a port; use 1-65535",
            "config/x.yaml:11:15: services[0].backends[1].port: -1 is not a port; use 1-65535",
        ]
    );
}

#[test]
fn backend_without_any_port() {
    let text = GOOD.replace("    targetPort: 8080\n", "");
    assert_eq!(
        error(&text),
        "config/x.yaml:8:9: services[0].backends[0]: has no port; \
         set services[0].targetPort, or port on this backend"
    );
}

#[test]
fn named_target_port() {
    let text = GOOD.replace("targetPort: 8080", "targetPort: http");
    assert_eq!(
        error(&text),
        "config/x.yaml:7:17: services[0].targetPort: \"http\" is not a number; write a plain \
         number (named ports are not supported)"
    );
}

#[test]
fn duplicate_node_port_and_name() {
    let text = format!(
        "{GOOD}{}",
        r"  - name: web
    nodePort: 30080
    targetPort: 80
"
    );
    assert_eq!(
        errors(&text),
        [
            "config/x.yaml:14:11: services[1].name: \"web\" is already the name of services[0] \
             in namespace \"default\"; give each service a unique name",
            "config/x.yaml:15:15: services[1].nodePort: TCP 30080 is already the nodePort of \
             services[0]; give each service its own nodePort (TCP and UDP may share one)",
        ]
    );
}

#[test]
fn same_node_port_for_tcp_and_udp_is_fine() {
    let text = format!(
        "{GOOD}{}",
        r"  - name: web-udp
    protocol: UDP
    nodePort: 30080
    targetPort: 80
"
    );
    assert_eq!(parse_ok(&text).state.services.len(), 2);
}

#[test]
fn same_name_in_two_namespaces_is_fine() {
    let text = format!(
        "{GOOD}{}",
        r"  - name: web
    namespace: other
    nodePort: 30081
    targetPort: 80
"
    );
    assert_eq!(parse_ok(&text).state.services.len(), 2);
}

#[test]
fn bad_protocol() {
    let text = GOOD.replace("protocol: TCP", "protocol: tcp");
    assert_eq!(
        error(&text),
        "config/x.yaml:5:15: services[0].protocol: \"tcp\" is not a supported protocol; \
         use TCP or UDP (upper case, as in a Kubernetes Service)"
    );
}

#[test]
fn bad_names() {
    let text = GOOD.replace("name: web", "name: Web_1");
    assert!(
        error(&text).starts_with(
            "config/x.yaml:4:11: services[0].name: \"Web_1\" is not a valid name; use 1-63"
        ),
        "{}",
        error(&text)
    );
}

#[test]
fn weights() {
    let text = GOOD.replace("weight: 3", "weight: 1001");
    assert_eq!(
        error(&text),
        "config/x.yaml:12:17: services[0].backends[1].weight: 1001 is not a usable weight; \
         use 0-1000 (0 sends it no new flows; default 1)"
    );
    let text = GOOD.replace("weight: 3", "weight: 0").replace(
        "      - address: 198.18.1.2\n",
        "      - address: 198.18.1.2\n        weight: 0\n",
    );
    assert_eq!(
        error(&text),
        "config/x.yaml:9:7: services[0].backends: every backend has weight 0, so new flows \
         could go nowhere; give at least one backend a weight of 1 or more"
    );
}

#[test]
fn duplicate_backend() {
    let text = GOOD
        .replace("198.18.2.2", "198.18.1.2")
        .replace("port: 9090", "port: 8080");
    assert_eq!(
        error(&text),
        "config/x.yaml:10:18: services[0].backends[1].address: 198.18.1.2:8080 is listed twice \
         (also services[0].backends[0]); list each backend once; use weight to give it a larger \
         share"
    );
}

#[test]
fn special_backend_addresses() {
    let special = ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255"];
    let special6 = ["'::'", "'::1'", "ff02::1", "fe80::2"];
    for address in special.into_iter().chain(special6) {
        let text = GOOD.replace("198.18.2.2", address);
        assert_eq!(
            error(&text),
            format!(
                "config/x.yaml:10:18: services[0].backends[1].address: {} cannot be a \
                 backend; use the pod's unicast address",
                address.trim_matches('\'')
            )
        );
    }
    let text = GOOD.replace("198.18.2.2", "'::ffff:198.18.2.2'");
    assert_eq!(
        error(&text),
        "config/x.yaml:10:18: services[0].backends[1].address: \"::ffff:198.18.2.2\" is an \
         IPv4-mapped IPv6 address; write the IPv4 address itself: 198.18.2.2"
    );
}

#[test]
fn dual_stack_services_take_both_families() {
    let text = GOOD
        .replace(
            "  interfaces: [eth0]\n",
            "  interfaces: [eth0]\n  addresses: [198.18.0.1, 2001:db8::1]\n",
        )
        .replace(
            "      - address: 198.18.2.2\n",
            "      - address: 2001:db8:2::2\n        port: 9090\n      - address: 198.18.2.2\n",
        )
        .replace(
            "    targetPort: 8080\n",
            "    targetPort: 8080\n    frontends: [2001:db8:ff::1]\n    \
             loadBalancerSourceRanges: [2001:db8:77::/48, 198.18.77.0/24]\n    port: 80\n",
        );
    let config = parse_ok(&text);
    let ip = |text: &str| -> std::net::IpAddr { text.parse().unwrap_or_else(|e| panic!("{e}")) };
    assert_eq!(
        config.state.node_addresses,
        Some(vec![ip("198.18.0.1"), ip("2001:db8::1")])
    );
    let web = &config.state.services[0];
    assert_eq!(web.frontends, [ip("2001:db8:ff::1")]);
    assert_eq!(
        web.source_ranges,
        [(ip("2001:db8:77::"), 48), (ip("198.18.77.0"), 24)]
    );
    assert!(web.ip_families.is_empty(), "left out: the addresses say");
    assert_eq!(web.families(), [IpFamily::V4, IpFamily::V6]);
    let addresses: Vec<_> = web.backends.iter().map(|b| b.address).collect();
    assert_eq!(
        addresses,
        [ip("198.18.1.2"), ip("2001:db8:2::2"), ip("198.18.2.2")]
    );

    // ipFamilies says which families; an address of another is an error,
    // a backend of another a warning.
    let listed = text.replace("    port: 80\n", "    port: 80\n    ipFamilies: [IPv4]\n");
    assert_eq!(
        errors(&listed),
        [
            "config/x.yaml:9:17: services[0].frontends[0]: 2001:db8:ff::1 is IPv6, which \
             services[0].ipFamilies does not list; add IPv6 to services[0].ipFamilies",
            "config/x.yaml:10:32: services[0].loadBalancerSourceRanges[0]: 2001:db8:77:: is \
             IPv6, which services[0].ipFamilies does not list; add IPv6 to \
             services[0].ipFamilies",
        ]
    );
    let listed = listed
        .replace("frontends: [2001:db8:ff::1]", "frontends: [198.18.200.1]")
        .replace("2001:db8:77::/48, ", "");
    let config = parse_ok(&listed);
    assert_eq!(config.state.services[0].families(), [IpFamily::V4]);
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "config/x.yaml:15:18: services[0].backends[1].address: 2001:db8:2::2 is IPv6, which \
          ipFamilies does not list: it gets no traffic; add IPv6 to services[0].ipFamilies, or \
          remove the backend"
        ]
    );
    let v4_node = parse_ok(&text.replace(", 2001:db8::1]", "]"));
    let warnings: Vec<String> = v4_node.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "config/x.yaml:7:15: services[0].nodePort: IPv6 clients cannot reach nodePort 30080: \
          node.addresses lists no IPv6 address; add the node's IPv6 address to node.addresses"
        ]
    );
    for (families, wanted) in [
        (
            "[]",
            "config/x.yaml:12:17: services[0].ipFamilies: the list is empty; list IPv4, IPv6 or \
             both, or leave ipFamilies out",
        ),
        (
            "[IPv4, IPv4]",
            "config/x.yaml:12:24: services[0].ipFamilies[1]: IPv4 is listed twice; list each \
             family once",
        ),
        (
            "[IPv5]",
            "config/x.yaml:12:18: services[0].ipFamilies[0]: \"IPv5\" is not an IP family; use \
             IPv4 or IPv6",
        ),
    ] {
        let text = listed.replace("ipFamilies: [IPv4]", &format!("ipFamilies: {families}"));
        assert_eq!(error(&text), wanted);
    }
}

#[test]
fn unknown_field_is_located_by_serde() {
    let text = GOOD.replace("nodePort: 30080", "nodeport: 30080");
    let message = error(&text);
    assert!(
        message.starts_with(
            "config/x.yaml:6:5: services[0]: unknown field `nodeport`, expected one of"
        ),
        "{message}"
    );
    assert!(
        message.ends_with(
            "; remove it or correct its spelling; keys are camelCase as in config/example.yaml"
        ),
        "{message}"
    );
}

#[test]
fn unknown_top_level_field() {
    let text = format!("{GOOD}extra: 1\n");
    assert_error_starts(&text, "config/x.yaml:14:1: unknown field `extra`");
}

#[test]
fn missing_required_field() {
    let text = GOOD.replace("  - name: web\n    protocol", "  - protocol");
    assert_error_starts(
        &text,
        "config/x.yaml:4:5: services[0]: missing field `name`; add it",
    );
    let text = GOOD.replace("    nodePort: 30080\n", "");
    assert_eq!(
        error(&text),
        "config/x.yaml:4:5: services[0]: has neither a nodePort, frontends nor a clusterIP, so \
         nothing would reach it; add nodePort (usually 30000-32767), or port with frontends or \
         clusterIP"
    );
}

#[test]
fn wrong_type() {
    let text = GOOD.replace("interfaces: [eth0]", "interfaces: eth0");
    assert_error_starts(
        &text,
        "config/x.yaml:2:15: node.interfaces: invalid type: string \"eth0\", expected a sequence",
    );
}

#[test]
fn yaml_syntax_error() {
    let text = GOOD.replace("nodePort: 30080", "nodePort 30080");
    assert_eq!(
        error(&text),
        "config/x.yaml:7:5: could not find expected ':', while scanning a simple key at line 6 \
         column 5; fix the YAML syntax (indentation, a missing ':' or space after it, an \
         unclosed quote or bracket)"
    );
}

#[test]
fn empty_config() {
    assert_eq!(
        error("# nothing here\n\n"),
        "config/x.yaml:1:1: the config is empty; describe the node and its services; start from \
         config/example.yaml"
    );
}

#[test]
fn interfaces() {
    // None listed: the agent finds the uplinks (kernel::uplinks).
    let text = GOOD.replace("interfaces: [eth0]", "interfaces: []");
    let config = parse(ORIGIN, &text, &Overrides::default()).map_err(|e| e.to_string());
    assert_eq!(config.map(|c| c.state.interfaces), Ok(Vec::new()));
    let text = GOOD.replace("  interfaces: [eth0]\n", "");
    let config = parse(ORIGIN, &text, &Overrides::default()).map_err(|e| e.to_string());
    assert_eq!(config.map(|c| c.state.interfaces), Ok(Vec::new()));
    let text = GOOD.replace("interfaces: [eth0]", "interfaces: []");
    let overrides = Overrides {
        interfaces: vec![String::from("veth9"), String::from("veth9")],
    };
    let config = parse(ORIGIN, &text, &overrides).map_err(|e| e.to_string());
    let config = config.as_ref().map(|c| &c.state.interfaces);
    assert_eq!(config, Ok(&vec![String::from("veth9")]));

    let text = GOOD.replace("interfaces: [eth0]", "interfaces: [eth0, eth0, \"a/b\"]");
    assert_eq!(
        errors(&text),
        [
            "config/x.yaml:2:22: node.interfaces[1]: \"eth0\" is listed twice (also \
             node.interfaces[0]); list each interface once",
            "config/x.yaml:2:28: node.interfaces[2]: \"a/b\" is not an interface name; use the \
             name `ip link` shows (1-15 characters, no '/', ':' or spaces)",
        ]
    );
}

#[test]
fn iface_override_replaces_config_list() {
    let overrides = Overrides {
        interfaces: vec![String::from("veth0")],
    };
    let config = parse(ORIGIN, GOOD, &overrides).map_err(|e| e.to_string());
    let Ok(config) = config else {
        panic!("{config:?}");
    };
    assert_eq!(config.state.interfaces, ["veth0"]);
    assert_eq!(config.interface_field(0), "--iface");
    let config = parse_ok(GOOD);
    assert_eq!(config.interface_field(0), "node.interfaces[0]");
}

#[test]
fn node_addresses() {
    let text = GOOD.replace(
        "  interfaces: [eth0]\n",
        "  interfaces: [eth0]\n  addresses:\n    - 198.18.0.1\n    - 198.18.0.1\n    - fe80::1\n",
    );
    assert_eq!(
        errors(&text),
        [
            "config/x.yaml:5:7: node.addresses[1]: 198.18.0.1 is listed twice (also \
             node.addresses[0]); list each address once",
            "config/x.yaml:6:7: node.addresses[2]: fe80::1 cannot be a node address; use a \
             unicast address assigned to this node",
        ]
    );
    let text = GOOD.replace(
        "  interfaces: [eth0]\n",
        "  interfaces: [eth0]\n  addresses: []\n",
    );
    assert!(error(&text).starts_with("config/x.yaml:3:14: node.addresses: the list is empty"));
}

#[test]
fn masquerade_port_range() {
    let with = |range: &str| format!("{GOOD}masquerade:\n  portRange: \"{range}\"\n");
    assert_eq!(
        error(&with("65535-61000")),
        "config/x.yaml:15:14: masquerade.portRange: \"65535-61000\" is inverted; write the lower \
         port first: \"61000-65535\""
    );
    assert_eq!(
        error(&with("61000-70000")),
        "config/x.yaml:15:14: masquerade.portRange: \"61000-70000\" has a port outside 1-65535; \
         write two ports 1-65535, lower first, e.g. \"61000-65535\""
    );
    assert!(error(&with("61000")).contains("\"61000\" is not a port range"));
    let narrow = parse_ok(&with("61000-61009"));
    assert_one_warning_starts(
        &narrow,
        "config/x.yaml:15:14: masquerade.portRange: only 10 ports",
    );
}

#[test]
fn ephemeral_overlap_is_a_located_warning() {
    let config = parse_ok(&format!("{GOOD}masquerade:\n  portRange: 50000-65535\n"));
    assert_eq!(
        ephemeral_overlap(&config, &(32_768..=60_999)).map(|w| w.to_string()),
        Some(String::from(
            "config/x.yaml:15:14: masquerade.portRange: 50000-65535 overlaps the kernel's \
             ephemeral ports 32768-60999 (net.ipv4.ip_local_port_range); move one of them so \
             they do not overlap, e.g. sysctl net.ipv4.ip_local_port_range=\"32768 60999\""
        ))
    );
    let config = parse_ok(GOOD);
    assert_eq!(ephemeral_overlap(&config, &(32_768..=60_999)), None);
    let warning = ephemeral_overlap(&config, &(1024..=65_535)).map(|w| w.to_string());
    assert!(
        warning
            .as_deref()
            .is_some_and(|w| w.contains("1024-29999 (the default) overlaps")),
        "{warning:?}"
    );
}

#[test]
fn conntrack_and_selection() {
    let text = format!(
        "{GOOD}conntrack:\n  udpTimeoutSeconds: 0\n  maxFlows: 10\nselection:\n  tableSize: 1000\n"
    );
    assert_eq!(
        errors(&text),
        [
            "config/x.yaml:15:22: conntrack.udpTimeoutSeconds: 0 is not a usable timeout; use \
             1-31536000 seconds, or leave it out for the default of 60",
            "config/x.yaml:16:13: conntrack.maxFlows: 10 is not a usable flow table size; use \
             1024-67108864, or leave it out for the default of 1048576",
            "config/x.yaml:18:14: selection.tableSize: 1000 is not prime; use a prime such as \
             1021, 4093, 16381 or 65537",
        ]
    );
}

#[test]
fn more_backends_than_slots() {
    let text = format!("{GOOD}selection:\n  tableSize: 2\n")
        .replace("weight: 3", "weight: 3\n      - address: 198.18.9.9");
    assert_error_starts(
        &text,
        "config/x.yaml:9:7: services[0].backends: 3 weighted backends do not fit a selection \
         table of 2 slots",
    );
}

#[test]
fn no_services_is_a_warning() {
    let config = parse_ok("node:\n  interfaces: [eth0]\n");
    assert_one_warning_starts(
        &config,
        "config/x.yaml:1:1: services: no services are configured",
    );
}

#[test]
fn problems_are_reported_in_document_order_and_all_at_once() {
    let text = GOOD
        .replace("nodePort: 30080", "nodePort: 0")
        .replace("198.18.1.2", "x")
        .replace("weight: 3", "weight: -3");
    assert_eq!(errors(&text).len(), 3);
}

#[test]
fn read_error_names_the_file() {
    let message = load(Path::new("/nonexistent/xlb.yaml"), &Overrides::default())
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert_eq!(
        message,
        Err(String::from(
            "/nonexistent/xlb.yaml: cannot read the config: No such file or directory (os error \
             2); check the path given to --config"
        ))
    );
}

#[test]
fn primes() {
    let primes: Vec<u32> = (0..30).filter(|n| is_prime(*n)).collect();
    assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    assert!(is_prime(DEFAULT_TABLE_SIZE));
    assert!(is_prime(65_537));
    assert!(is_prime(MAX_TABLE_SIZE));
}

const ISSUE4: &str = "\
node:
  interfaces: [eth0]
services:
  - name: web
    protocol: TCP
    nodePort: 30080
    port: 80
    frontends: [198.18.200.10, 198.18.200.11]
    targetPort: 8080
    externalTrafficPolicy: Local
    sessionAffinity: ClientIP
    sessionAffinityConfig:
      clientIP:
        timeoutSeconds: 600
    loadBalancerSourceRanges: [198.18.0.0/24, 198.19.7.7/32]
    healthCheckNodePort: 32000
    backends:
      - address: 198.18.1.2
        local: true
      - address: 198.18.2.2
        ready: false
        serving: true
        terminating: true
      - address: 198.18.3.2
        ready: false
";

#[test]
fn kubernetes_service_fields() {
    let config = parse_ok(ISSUE4);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let web = &config.state.services[0];
    assert_eq!((web.node_port, web.port), (30080, 80));
    assert_eq!(
        web.frontends,
        [
            IpAddr::from([198, 18, 200, 10]),
            IpAddr::from([198, 18, 200, 11])
        ]
    );
    assert_eq!(web.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(web.session_affinity_timeout, Some(600));
    assert_eq!(
        web.source_ranges,
        [
            (IpAddr::from([198, 18, 0, 0]), 24),
            (IpAddr::from([198, 19, 7, 7]), 32)
        ]
    );
    assert_eq!(web.health_check_node_port, Some(32000));
    let conditions: Vec<(bool, bool, bool, bool)> = web
        .backends
        .iter()
        .map(|b| (b.ready, b.serving, b.terminating, b.is_local))
        .collect();
    assert_eq!(
        conditions,
        [
            (true, true, false, true),
            (false, true, true, false),
            (false, false, false, false)
        ]
    );
}

#[test]
fn kubernetes_service_defaults() {
    let web = &parse_ok(GOOD).state.services[0];
    assert_eq!(web.port, 0);
    assert!(web.frontends.is_empty());
    assert_eq!(web.external_traffic_policy, TrafficPolicy::Cluster);
    assert_eq!(web.session_affinity_timeout, None);
    assert!(web.source_ranges.is_empty());
    assert_eq!(web.health_check_node_port, None);
    assert!(
        web.backends
            .iter()
            .all(|b| b.ready && b.serving && !b.terminating && !b.is_local)
    );
    // ClientIP without a timeout gets Kubernetes' 3 hours.
    let text = GOOD.replace(
        "    protocol: TCP\n",
        "    protocol: TCP\n    sessionAffinity: ClientIP\n",
    );
    assert_eq!(
        parse_ok(&text).state.services[0].session_affinity_timeout,
        Some(10_800)
    );
}

#[test]
fn frontends_without_node_port_need_a_port() {
    let text = GOOD.replace("    nodePort: 30080\n", "    frontends: [198.18.200.10]\n");
    assert_eq!(
        error(&text),
        "config/x.yaml:4:5: services[0].port: is missing: frontends and the clusterIP answer on \
         the service port; add port (the Service's port, e.g. 80)"
    );
    let text = text.replace("    frontends:", "    port: 80\n    frontends:");
    let web = &parse_ok(&text).state.services[0];
    assert_eq!((web.node_port, web.port), (0, 80));
}

#[test]
fn bad_frontends() {
    let text = ISSUE4.replace("198.18.200.11]", "198.18.200.10, 224.0.0.9, nope]");
    assert_eq!(
        errors(&text),
        [
            "config/x.yaml:8:32: services[0].frontends[1]: 198.18.200.10 is listed twice (also \
             services[0].frontends[0]); list each address once",
            "config/x.yaml:8:47: services[0].frontends[2]: 224.0.0.9 cannot be a frontend; use \
             the load balancer's or the external unicast address",
            "config/x.yaml:8:58: services[0].frontends[3]: \"nope\" is not an IP address; write \
             an IPv4 address such as 198.18.1.2 or an IPv6 address such as 2001:db8::2",
        ]
    );
    // The same address and port in two services.
    let second = "  - name: api\n    port: 80\n    frontends: [198.18.200.11]\n    backends: []\n";
    let text = format!("{ISSUE4}{second}");
    assert_eq!(
        error(&text),
        "config/x.yaml:28:17: services[1].frontends[0]: TCP 198.18.200.11:80 is already a \
         frontend of services[0]; give each service its own address or port"
    );
    // Another port or protocol is another frontend.
    parse_ok(&format!(
        "{ISSUE4}{}",
        second.replace("port: 80", "port: 81")
    ));
    parse_ok(&format!(
        "{ISSUE4}{}",
        second.replace("  - name: api\n", "  - name: api\n    protocol: UDP\n")
    ));
}

#[test]
fn traffic_policy_and_health_check_port() {
    let text = ISSUE4.replace("Local", "Nearby");
    assert_eq!(
        error(&text),
        "config/x.yaml:10:28: services[0].externalTrafficPolicy: \"Nearby\" is not a traffic \
         policy; use Cluster (the default: any backend, client masqueraded) or Local (only \
         local: true backends, client address kept)"
    );
    let text = ISSUE4.replace("Local", "Cluster");
    assert_eq!(
        error(&text),
        "config/x.yaml:16:26: services[0].healthCheckNodePort: only a service with \
         externalTrafficPolicy Local has a health check node port; remove it, or set \
         externalTrafficPolicy: Local"
    );
    let text = ISSUE4.replace("32000", "0");
    assert_eq!(
        error(&text),
        "config/x.yaml:16:26: services[0].healthCheckNodePort: 0 is not a port; use 1-65535 \
         (usually 30000-32767)"
    );
}

#[test]
fn local_policy_without_local_backends_is_a_warning() {
    let config = parse_ok(&ISSUE4.replace("        local: true\n", ""));
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "config/x.yaml:10:28: services[0].externalTrafficPolicy: is Local but no backend is \
          local, so this node drops every packet to the service; mark the backends that run on \
          this node with local: true"
        ]
    );
}

#[test]
fn session_affinity() {
    let text = ISSUE4.replace("timeoutSeconds: 600", "timeoutSeconds: 86401");
    assert_eq!(
        error(&text),
        "config/x.yaml:14:25: services[0].sessionAffinityConfig.clientIP.timeoutSeconds: 86401 \
         is not a usable affinity timeout; use 1-86400 seconds, or leave it out for the default \
         of 10800"
    );
    let text = ISSUE4.replace("timeoutSeconds: 600", "timeoutSeconds: 0");
    assert!(error(&text).contains("0 is not a usable affinity timeout"));
    let text = ISSUE4.replace("ClientIP\n", "None\n");
    assert_eq!(
        error(&text),
        "config/x.yaml:14:25: services[0].sessionAffinityConfig.clientIP.timeoutSeconds: is set \
         but sessionAffinity is None; set sessionAffinity: ClientIP, or remove \
         sessionAffinityConfig"
    );
    let text = ISSUE4.replace("ClientIP\n", "clientip\n");
    assert_eq!(
        error(&text),
        "config/x.yaml:11:22: services[0].sessionAffinity: \"clientip\" is not a session \
         affinity; use None (the default) or ClientIP, as in a Kubernetes Service"
    );
    let text = ISSUE4.replace("      clientIP:", "      clientIp:");
    assert_error_contains(&text, "unknown field `clientIp`, expected `clientIP`");
}

#[test]
fn source_ranges() {
    let text = ISSUE4.replace("198.19.7.7/32]", "198.19.7.7/33, 198.19.7.7, 10.0.0.0/x]");
    assert_eq!(
        errors(&text),
        [
            "config/x.yaml:15:47: services[0].loadBalancerSourceRanges[1]: \"198.19.7.7/33\" is \
             not a CIDR; write a network and its prefix length, e.g. 198.18.0.0/24 or \
             2001:db8::/64 (198.18.0.7/32 for one address)",
            "config/x.yaml:15:62: services[0].loadBalancerSourceRanges[2]: \"198.19.7.7\" is not \
             a CIDR; write a network and its prefix length, e.g. 198.18.0.0/24 or 2001:db8::/64 \
             (198.18.0.7/32 for one address)",
            "config/x.yaml:15:74: services[0].loadBalancerSourceRanges[3]: \"10.0.0.0/x\" is not \
             a CIDR; write a network and its prefix length, e.g. 198.18.0.0/24 or 2001:db8::/64 \
             (198.18.0.7/32 for one address)",
        ]
    );
    let config = parse_ok(&ISSUE4.replace("198.18.0.0/24", "198.18.0.9/24"));
    assert_eq!(
        config.state.services[0].source_ranges[0],
        (IpAddr::from([198, 18, 0, 0]), 24)
    );
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "config/x.yaml:15:32: services[0].loadBalancerSourceRanges[0]: 198.18.0.9/24 has host \
          bits set; it means 198.18.0.0/24; write 198.18.0.0/24"
        ]
    );
}

#[test]
fn endpoint_conditions() {
    let text = ISSUE4.replace(
        "        ready: false\n        serving: true\n        terminating: true\n",
        "        terminating: true\n",
    );
    assert_eq!(
        error(&text),
        "config/x.yaml:20:9: services[0].backends[1].ready: a terminating backend is not ready; \
         set ready: false (and serving: true while it still answers)"
    );
    let text = ISSUE4.replace("        terminating: true\n", "");
    assert_eq!(
        error(&text),
        "config/x.yaml:22:18: services[0].backends[1].serving: a backend that serves but is not \
         ready must be terminating; set ready: true, or terminating: true if it is shutting down"
    );
    let text = ISSUE4.replace("        local: true\n", "        local: yes please\n");
    assert_error_contains(&text, "backends[0].local: invalid type");
}

#[test]
fn weight_zero_everywhere_with_conditions() {
    let text = "node:\n  interfaces: [eth0]\nservices:\n  - name: web\n    nodePort: 30080\n    \
                targetPort: 80\n    backends:\n      - address: 198.18.1.2\n        weight: 0\n      \
                - address: 198.18.2.2\n        weight: 0\n        ready: false\n";
    assert_eq!(
        error(text),
        "config/x.yaml:8:7: services[0].backends: every backend has weight 0, so new flows \
         could go nowhere; give at least one backend a weight of 1 or more"
    );
}

#[test]
fn default_table_size_is_prime_and_smaller_ones_are_allowed() {
    assert_eq!(DEFAULT_TABLE_SIZE, 16_381);
    assert!(is_prime(DEFAULT_TABLE_SIZE));
    let config = parse_ok(&format!("{GOOD}selection:\n  tableSize: 1021\n"));
    assert_eq!(config.state.table_size, 1021);
    let text = format!("{GOOD}selection:\n  tableSize: 16383\n");
    assert_eq!(
        error(&text),
        "config/x.yaml:15:14: selection.tableSize: 16383 is not prime; use a prime such as 1021, \
         4093, 16381 or 65537"
    );
}

/// A billion-laughs config (a few KB that expand to millions of backends)
/// is refused at its first alias, at once, with the place and the fix.
#[test]
fn alias_bombs_are_refused_quickly() {
    let mut text = String::from(
        "node:\n  interfaces: [eth0]\nanchors:\n  b0: &b0 [{address: 198.18.1.2}, {address: 198.18.1.3}]\n",
    );
    for level in 1..12 {
        let list = vec![format!("*b{}", level - 1); 8].join(", ");
        text.push_str(&format!("  b{level}: &b{level} [{list}]\n"));
    }
    text.push_str(
        "services:\n  - name: web\n    nodePort: 30080\n    targetPort: 80\n    backends: *b11\n",
    );
    let started = std::time::Instant::now();
    let message = error(&text);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(100),
        "took {:?}",
        started.elapsed()
    );
    assert!(message.starts_with("config/x.yaml:5:12: "), "{message}");
    assert!(message.contains("aliases"), "{message}");
    assert!(message.contains("write the value out in full"), "{message}");
}

#[test]
fn cluster_ip_and_internal_traffic_policy() {
    let text = GOOD.replace(
        "    nodePort: 30080\n",
        "    port: 80\n    clusterIP: 198.19.0.10\n    internalTrafficPolicy: Local\n",
    );
    let config = parse_ok(&text);
    let web = &config.state.services[0];
    assert_eq!(web.node_port, 0, "a ClusterIP alone is enough");
    assert_eq!(web.port, 80);
    assert_eq!(web.cluster_ips, [IpAddr::from([198, 19, 0, 10])]);
    assert_eq!(web.internal_traffic_policy, TrafficPolicy::Local);
    assert_eq!(web.external_traffic_policy, TrafficPolicy::Cluster);
}

#[test]
fn cluster_ip_needs_a_port_and_a_unicast_address() {
    let text = GOOD.replace("    nodePort: 30080\n", "    clusterIP: 198.19.0.10\n");
    assert_error_contains(&text, "services[0].port: is missing");
    let text = GOOD.replace(
        "    nodePort: 30080\n",
        "    port: 80\n    clusterIP: 127.0.0.1\n",
    );
    assert_error_contains(
        &text,
        "services[0].clusterIP: 127.0.0.1 cannot be a ClusterIP",
    );
    let text = GOOD.replace(
        "    nodePort: 30080\n",
        "    port: 80\n    internalTrafficPolicy: Sometimes\n    clusterIP: 198.19.0.1\n",
    );
    assert_error_contains(&text, "services[0].internalTrafficPolicy: \"Sometimes\"");
}

#[test]
fn a_cluster_ip_belongs_to_one_service() {
    let text = format!(
        "{GOOD}  - name: api\n    port: 80\n    clusterIP: 198.19.0.1\n    backends: []\n\
         \x20 - name: db\n    port: 80\n    frontends: [198.19.0.1]\n    backends: []\n"
    );
    let text = text.replace(
        "    nodePort: 30080\n",
        "    nodePort: 30080\n    port: 80\n    clusterIP: 198.19.0.1\n",
    );
    let all = errors(&text);
    assert_eq!(all.len(), 2, "{all:#?}");
    assert!(
        all[0].contains(
            "services[1].clusterIP: TCP 198.19.0.1:80 is already a frontend of services[0]"
        ),
        "{all:#?}"
    );
    assert!(
        all[1].contains("services[2].frontends[0]: TCP 198.19.0.1:80"),
        "{all:#?}"
    );
}

/// serde-saphyr reads a config (`streamed`) only where it reads it as
/// serde_yaml does; anything else falls back to serde_yaml.
#[test]
fn streamed_reading_agrees_with_serde_yaml() {
    let examples = ["../config/example.yaml", "../config/demo.yaml"].map(|path| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        std::fs::read_to_string(path).unwrap_or_default()
    });
    let scalars = [
        "ready: yes",
        "ready: True",
        "ready: ~",
        "port: 0x50",
        "port: 0o120",
        "port: 0120",
        "port: 80.0",
        "port: 1_000",
        "port: \"80\"",
        "port: !!str 80",
        "address: 10",
        "address: 1e3",
        "address: true",
        "address: null",
        "address: '198.18.1.2'",
        "name: pod-b\n        name: pod-c",
        "weight: -1",
        "weight: 99999999999999999999999",
        "local: false",
    ];
    let mut texts: Vec<String> = examples.to_vec();
    texts.push(GOOD.to_owned());
    for scalar in scalars {
        texts.push(GOOD.replace("weight: 3", scalar));
    }
    texts.push(format!("---\n{GOOD}"));
    texts.push(format!("{GOOD}---\nnode: {{}}\n"));
    texts.push(String::from("node: {interfaces: [eth0]}\nservices: [{name: a, nodePort: 30000, backends: [{address: 198.18.1.2}]}]\n"));
    texts.push(String::from("node:\n\tinterfaces: [eth0]\n"));
    for text in &texts {
        let Some(streamed) = streamed(text) else {
            continue;
        };
        let classic = serde_yaml::from_str::<RawConfig>(text).map(|raw| format!("{raw:?}"));
        assert_eq!(
            Ok(format!("{streamed:?}")),
            classic.map_err(|e| e.to_string()),
            "{text}"
        );
    }
    assert!(
        streamed(&texts[0]).is_some(),
        "the example is read streamed"
    );
}
