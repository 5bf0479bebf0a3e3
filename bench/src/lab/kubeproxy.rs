//! The rules kube-proxy would write on this node for the bench's Services,
//! in its iptables mode (`iptables-restore` input) and its nftables mode
//! (an `nft -f` script). Pure functions of the config, so they are tested
//! for structure without a kernel.
//!
//! Shapes follow kube-proxy (pkg/proxy/iptables and pkg/proxy/nftables,
//! v1.31) for NodePort Services with externalTrafficPolicy=Cluster: the
//! ClusterIP rules every NodePort Service also has, the NodePort rules,
//! per-endpoint chains with masquerade marking, and POSTROUTING masquerade.
//! Only the hash in chain names differs (FNV here, SHA-256 in kube-proxy:
//! same length, same cost to the kernel).

use std::fmt::Write as _;

use super::services::{BenchConfig, SERVICE_CIDR, Service};

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";

/// 16 base32 characters from a hash of `parts`, like kube-proxy's
/// `portProtoHash` (base32(sha256(...))[:16]).
fn hash16(parts: &[&str]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x84222325_cbf29ce4;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            a = (a ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            b = (b ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3 ^ 0x2_0000_0000);
        }
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits = (u128::from(a) << 64) | u128::from(b);
    (0..16)
        .map(|index| ALPHABET[((bits >> (123 - 5 * index)) & 31) as usize] as char)
        .collect()
}

fn svc_chain(service: &Service) -> String {
    format!(
        "KUBE-SVC-{}",
        hash16(&[&service.port_name_string(), service.protocol.lower()])
    )
}

fn ext_chain(service: &Service) -> String {
    format!(
        "KUBE-EXT-{}",
        hash16(&[&service.port_name_string(), service.protocol.lower()])
    )
}

fn sep_chain(service: &Service, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&[
            &service.port_name_string(),
            service.protocol.lower(),
            endpoint
        ])
    )
}

/// The `iptables-restore` input kube-proxy's iptables proxier writes (its
/// full sync), plus the jumps from the built-in chains it installs itself.
pub fn iptables_restore(config: &BenchConfig) -> String {
    iptables_restore_for_cluster(config, SERVICE_CIDR)
}

/// [`iptables_restore`] with `cluster_cidr` as kube-proxy's
/// `--cluster-cidr`: ClusterIP traffic from outside it is masqueraded.
pub fn iptables_restore_for_cluster(config: &BenchConfig, cluster_cidr: &str) -> String {
    let mut rules = NatRules::default();
    for service in &config.services {
        service_rules(&mut rules, service, cluster_cidr);
    }
    filter_table() + &nat_table(&rules)
}

/// The filter table: the built-in chains' jumps and kube-proxy's fixed
/// chains (no per-service rule in this bench: no firewall, no health
/// check).
fn filter_table() -> String {
    filter_table_of(false)
}

/// [`filter_table`] as kube-proxy's IPv6 proxier writes it for
/// `ip6tables-restore`: the same chains, without the IPv4 localnet rule.
pub(super) fn filter_table6() -> String {
    filter_table_of(true)
}

fn filter_table_of(ipv6: bool) -> String {
    let mut filter = String::from("*filter\n");
    for chain in ["INPUT", "FORWARD", "OUTPUT"] {
        let _ = writeln!(filter, ":{chain} ACCEPT [0:0]");
    }
    for chain in [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SERVICES",
    ] {
        let _ = writeln!(filter, ":{chain} - [0:0]");
    }
    filter += concat!(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A INPUT -j KUBE-FIREWALL\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -j KUBE-FIREWALL\n",
    );
    if !ipv6 {
        filter += "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n";
    }
    filter += concat!(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n",
    );
    filter
}

/// The nat table's per-service parts, in the order the table lists them.
#[derive(Default)]
struct NatRules {
    chains: String,
    nodeport_rules: String,
    services_rules: String,
    rules: String,
}

/// One Service's chains and rules: its KUBE-SVC and KUBE-EXT chains, the
/// jumps to them, and a KUBE-SEP chain per endpoint.
fn service_rules(nat: &mut NatRules, service: &Service, cluster_cidr: &str) {
    let name = service.port_name_string();
    let proto = service.protocol.lower();
    let svc = svc_chain(service);
    let ext = ext_chain(service);
    let _ = writeln!(nat.chains, ":{svc} - [0:0]\n:{ext} - [0:0]");
    let _ = writeln!(
        nat.services_rules,
        "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} -j {svc}",
        service.cluster_ip, service.port
    );
    let _ = writeln!(
        nat.nodeport_rules,
        "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {} -j {ext}",
        service.node_port
    );
    let _ = writeln!(
        nat.rules,
        "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {svc}"
    );
    let _ = writeln!(
        nat.rules,
        "-A {svc} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
        service.cluster_ip, service.port
    );
    let count = service.backends.len();
    for (index, backend) in service.backends.iter().enumerate() {
        let endpoint = backend.to_string();
        let sep = sep_chain(service, &endpoint);
        let _ = writeln!(nat.chains, ":{sep} - [0:0]");
        // kube-proxy: endpoint i of n is taken with probability
        // 1/(n-i), the last one unconditionally.
        let remaining = count - index;
        if remaining > 1 {
            let _ = writeln!(
                nat.rules,
                "-A {svc} -m comment --comment \"{name} -> {endpoint}\" -m statistic --mode random --probability {:.11} -j {sep}",
                1.0 / remaining as f64
            );
        } else {
            let _ = writeln!(
                nat.rules,
                "-A {svc} -m comment --comment \"{name} -> {endpoint}\" -j {sep}"
            );
        }
        let _ = writeln!(
            nat.rules,
            "-A {sep} -m comment --comment {name} -s {}/32 -j KUBE-MARK-MASQ\n-A {sep} -m comment --comment {name} -m {proto} -p {proto} -j DNAT --to-destination {endpoint}",
            backend.ip()
        );
    }
}

/// The nat table around `rules`.
fn nat_table(rules: &NatRules) -> String {
    let mut nat = String::from("*nat\n");
    for chain in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(nat, ":{chain} ACCEPT [0:0]");
    }
    nat += ":KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SERVICES - [0:0]\n";
    nat += &rules.chains;
    nat += concat!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    let _ = writeln!(
        nat,
        "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    nat += &rules.nodeport_rules;
    nat += &rules.services_rules;
    nat += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    nat += &rules.rules;
    nat += "COMMIT\n";
    nat
}

/// kube-proxy's nftables chain-name hash: 8 base32 characters.
fn hash8(parts: &[&str]) -> String {
    hash16(parts)[..8].to_owned()
}

/// `ns/name/proto/portname`, the readable part of nftables chain names.
fn nft_service_id(service: &Service) -> String {
    format!(
        "{}/{}/{}/{}",
        service.namespace,
        service.name,
        service.protocol.lower(),
        service.port_name
    )
}

/// The `nft -f` script kube-proxy's nftables proxier writes (table `ip
/// kube-proxy`: base chains, verdict maps, per-service and per-endpoint
/// chains).
pub fn nft_script(config: &BenchConfig) -> String {
    let mut out = String::from(
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\nflush table ip kube-proxy\n",
    );
    out += NFT_BASE;
    let _ = writeln!(
        out,
        "add rule ip kube-proxy cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\"\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
         add element ip kube-proxy nodeport-ips {{ {} }}",
        config.node_addr
    );
    for service in &config.services {
        nft_service(&mut out, service);
    }
    out
}

/// One Service's chains, its endpoints' chains and its map elements.
fn nft_service(out: &mut String, service: &Service) {
    let id = nft_service_id(service);
    let proto = service.protocol.lower();
    let hash = hash8(&[&service.port_name_string(), proto]);
    let svc = format!("service-{hash}-{id}");
    let ext = format!("external-{hash}-{id}");
    let _ = writeln!(
        out,
        "add chain ip kube-proxy {svc}\n\
         add rule ip kube-proxy {svc} ip daddr {ip} {proto} dport {port} ip saddr != {SERVICE_CIDR} jump mark-for-masquerade",
        ip = service.cluster_ip,
        port = service.port
    );
    let mut vmap = Vec::with_capacity(service.backends.len());
    for (index, backend) in service.backends.iter().enumerate() {
        let endpoint = format!("{}/{}", backend.ip(), backend.port());
        let ep_hash = hash8(&[&service.port_name_string(), proto, &endpoint]);
        let chain = format!("endpoint-{ep_hash}-{id}__{endpoint}");
        let _ = writeln!(
            out,
            "add chain ip kube-proxy {chain}\n\
             add rule ip kube-proxy {chain} ip saddr {} jump mark-for-masquerade\n\
             add rule ip kube-proxy {chain} meta l4proto {proto} dnat to {backend}",
            backend.ip()
        );
        vmap.push(format!("{index} : goto {chain}"));
    }
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
        service.backends.len(),
        vmap.join(" , ")
    );
    let _ = writeln!(
        out,
        "add chain ip kube-proxy {ext}\n\
         add rule ip kube-proxy {ext} jump mark-for-masquerade\n\
         add rule ip kube-proxy {ext} goto {svc}\n\
         add element ip kube-proxy cluster-ips {{ {ip} }}\n\
         add element ip kube-proxy service-ips {{ {ip} . {proto} . {port} : goto {svc} }}\n\
         add element ip kube-proxy service-nodeports {{ {proto} . {node_port} : goto {ext} }}",
        ip = service.cluster_ip,
        port = service.port,
        node_port = service.node_port
    );
}

/// The base chains, sets and verdict maps of kube-proxy's table.
const NFT_BASE: &str = concat!(
    "add chain ip kube-proxy mark-for-masquerade\n",
    "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n",
    "add chain ip kube-proxy masquerading\n",
    "add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n",
    "add rule ip kube-proxy masquerading mark set mark xor 0x4000\n",
    "add rule ip kube-proxy masquerading masquerade fully-random\n",
    "add chain ip kube-proxy services\n",
    "add chain ip kube-proxy service-endpoints-check\n",
    "add chain ip kube-proxy nodeport-endpoints-check\n",
    "add chain ip kube-proxy firewall-check\n",
    "add chain ip kube-proxy cluster-ips-check\n",
    "add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }\n",
    "add rule ip kube-proxy filter-prerouting ct state new jump firewall-check\n",
    "add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n",
    "add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check\n",
    "add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check\n",
    "add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }\n",
    "add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check\n",
    "add rule ip kube-proxy filter-input ct state new jump service-endpoints-check\n",
    "add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }\n",
    "add rule ip kube-proxy filter-output ct state new jump service-endpoints-check\n",
    "add rule ip kube-proxy filter-output ct state new jump firewall-check\n",
    "add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }\n",
    "add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check\n",
    "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n",
    "add rule ip kube-proxy nat-output jump services\n",
    "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n",
    "add rule ip kube-proxy nat-postrouting jump masquerading\n",
    "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n",
    "add rule ip kube-proxy nat-prerouting jump services\n",
    "add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n",
    "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }\n",
    "add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }\n",
    "add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }\n",
    "add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }\n",
    "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n",
    "add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n",
    "add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n",
    "add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n",
    "add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n",
    "add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n",
);

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_starting<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|line| line.starts_with(prefix))
            .collect()
    }

    #[test]
    fn iptables_rules_have_kube_proxy_structure() {
        let config = BenchConfig::sweep(3, None);
        let text = iptables_restore(&config);
        assert_eq!(text.matches("COMMIT\n").count(), 2);
        assert!(text.starts_with("*filter\n"));
        let nodeports = lines_starting(&text, "-A KUBE-NODEPORTS ");
        assert_eq!(nodeports.len(), 3);
        assert!(
            nodeports[2].contains("-m udp -p udp --dport 31000 -j KUBE-EXT-"),
            "the measured service is the last NodePort rule: {}",
            nodeports[2]
        );
        let services = lines_starting(&text, "-A KUBE-SERVICES ");
        assert_eq!(services.len(), 4, "3 ClusterIPs, then the NodePorts jump");
        assert!(services[3].contains("--dst-type LOCAL -j KUBE-NODEPORTS"));
        // Every jump target is declared exactly once, in its table.
        for table in text.split("COMMIT\n").filter(|t| !t.is_empty()) {
            let declared: Vec<&str> = table
                .lines()
                .filter_map(|line| line.strip_prefix(':'))
                .map(|line| line.split(' ').next().expect("name"))
                .collect();
            let mut unique = declared.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), declared.len(), "chains declared twice");
            for line in table.lines().filter(|line| line.starts_with("-A ")) {
                let target = line.rsplit(" -j ").next().expect("target");
                let target = target.split(' ').next().expect("target");
                let builtin = ["ACCEPT", "DROP", "RETURN", "MARK", "DNAT", "MASQUERADE"];
                assert!(
                    builtin.contains(&target) || declared.contains(&target),
                    "undeclared target in {line}"
                );
            }
        }
        // Endpoint selection: n-1 statistic rules with 1/(n-i), then the last.
        let svc = svc_chain(config.services.last().expect("services"));
        let picks: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with(&format!("-A {svc} ")) && line.contains(" -> "))
            .collect();
        assert_eq!(picks.len(), 10);
        assert!(picks[0].contains("--probability 0.10000000000"));
        assert!(picks[8].contains("--probability 0.50000000000"));
        assert!(!picks[9].contains("statistic"));
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 30);
        assert!(text.contains("-j MASQUERADE --random-fully"));
    }

    #[test]
    fn nft_script_uses_verdict_maps() {
        let config = BenchConfig::sweep(3, None);
        let text = nft_script(&config);
        assert!(text.starts_with("add table ip kube-proxy"));
        assert_eq!(
            lines_starting(&text, "add element ip kube-proxy service-nodeports ").len(),
            3
        );
        assert!(text.contains(
            "add element ip kube-proxy service-nodeports { udp . 31000 : goto external-"
        ));
        assert_eq!(text.matches("numgen random mod 10 vmap {").count(), 3);
        assert_eq!(text.matches(" dnat to ").count(), 30);
        assert!(text.contains("masquerade fully-random"));
        // Every chain a rule jumps or goes to is added.
        let chains: Vec<&str> = lines_starting(&text, "add chain ip kube-proxy ")
            .iter()
            .map(|line| line.split(' ').nth(4).expect("chain"))
            .collect();
        for word in text.split(['{', '}', ',', '\n']) {
            for verb in ["goto ", "jump "] {
                if let Some(target) = word.split(verb).nth(1) {
                    let target = target.split(' ').next().expect("target");
                    assert!(chains.contains(&target), "unknown chain {target}");
                }
            }
        }
    }

    #[test]
    fn names_are_stable_and_distinct() {
        assert_eq!(hash16(&["a", "b"]), hash16(&["a", "b"]));
        assert_ne!(hash16(&["a", "b"]), hash16(&["ab"]));
        assert_eq!(hash16(&["x"]).len(), 16);
        let config = BenchConfig::sweep(2_000, None);
        let mut names: Vec<String> = config.services.iter().map(svc_chain).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 2_000);
    }
}

/// The generated rules against the real tools, in a namespace of their own:
/// `iptables-restore --test` and `nft -c -f` parse and check them with the
/// kernel's nf_tables without changing anything.
#[cfg(test)]
mod load_tests {
    use super::*;
    use xlb_tests::{Netns, netns::unique_stem};

    fn check(file_name: &str, text: &str, program: &str, args: &[&str]) {
        if xlb_tests::require_root().is_err() {
            eprintln!("skipped: loading rules needs root");
            return;
        }
        let ns = Netns::create(format!("{}-rules", unique_stem())).expect("namespace");
        let dir = xlb_tests::ScratchDir::new().expect("scratch dir");
        let path = dir.write(file_name, text).expect("rules file");
        let mut args: Vec<&str> = args.to_vec();
        let path = path.to_string_lossy().into_owned();
        args.push(&path);
        if let Err(error) = ns.exec(program, &args) {
            panic!("{program} rejected the generated rules: {error}");
        }
    }

    #[test]
    fn iptables_rules_load() {
        let text = iptables_restore(&BenchConfig::sweep(50, None));
        check("rules", &text, "iptables-restore", &["--test"]);
    }

    #[test]
    fn ip6tables_rules_load() {
        let text = super::super::ipv6::ip6tables_restore();
        check("rules6", &text, "ip6tables-restore", &["--test"]);
    }

    #[test]
    fn nft_script_loads() {
        let text = nft_script(&BenchConfig::sweep(50, None));
        check("rules.nft", &text, "nft", &["-c", "-f"]);
    }
}
