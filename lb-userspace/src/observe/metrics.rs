//! `/metrics`: the agent's state and the datapath's counters in the
//! Prometheus text exposition format 0.0.4. Families are written in full
//! (HELP, TYPE, samples) one after the other; names follow Prometheus
//! conventions (`_total` counters, `_seconds`, `_bytes`, base units).

mod exposition;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lb_common::Traffic;
use lb_common::reason::Verdict;

use super::catalog::CatalogRows;
use super::datapath::{DatapathError, DatapathMaps};
use exposition::{Exposition, Samples};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest a scrape spends counting conntrack entries.
pub const COUNT_BUDGET: Duration = Duration::from_secs(2);

/// Upper bounds of `xlb_reconcile_duration_seconds`.
const RECONCILE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative), plus one for +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// For `xlb_reconcile_duration_seconds`.
    pub fn reconcile() -> Self {
        Self::new(&RECONCILE_BUCKETS)
    }

    pub fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// The verdict's label value.
pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Forward => "forward",
        Verdict::Pass => "pass",
        Verdict::Drop => "drop",
        Verdict::Reject => "reject",
    }
}

/// What the agent knows about itself, copied out for one scrape.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    pub version: &'static str,
    pub started_at: u64,
    pub ready: bool,
    pub generation: u64,
    /// (successful, unix seconds) of the last load or reload.
    pub last_reload: Option<(bool, u64)>,
    pub reloads: Outcomes,
    pub reconciles: Outcomes,
    pub reconcile_ops: u64,
    pub reconcile_seconds: Histogram,
    /// Errors by config source (`file`, `kubernetes`, ...).
    pub source_errors: BTreeMap<String, u64>,
    /// (interface, mode, why) of every attachment.
    pub interfaces: Vec<(String, String, String)>,
    /// (hook, cgroup) of every socket hook attached.
    pub socket_hooks: Vec<(String, String)>,
    /// Interfaces the applied config names that XDP is not attached to.
    pub detached: Vec<String>,
    pub conntrack_capacity: u32,
    /// Cluster services left out because they do not fit the maps.
    pub services_skipped: usize,
}

/// Successes and failures of something the agent does repeatedly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub success: u64,
    pub failure: u64,
}

impl Outcomes {
    pub fn record(&mut self, ok: bool) {
        if ok {
            self.success += 1;
        } else {
            self.failure += 1;
        }
    }
}

/// One scrape's text.
pub fn render(
    agent: &AgentMetrics,
    catalog: &CatalogRows,
    maps: Option<&DatapathMaps>,
) -> Result<String, DatapathError> {
    let mut out = Exposition::default();
    render_agent(&mut out, agent);
    render_attachments(&mut out, agent);
    render_limits(&mut out, agent);
    out.gauge(
        "xlb_datapath_readable",
        "Whether this scrape could read the datapath's maps (1) or not (0).",
        &[(vec![], f64::from(u8::from(maps.is_some())))],
    );
    if let Some(maps) = maps {
        render_datapath(&mut out, catalog, maps)?;
    }
    Ok(out.into_text())
}

fn render_agent(out: &mut Exposition, agent: &AgentMetrics) {
    out.gauge(
        "xlb_build_info",
        "The running xlb's version (always 1).",
        &[(vec![("version", agent.version.to_owned())], 1.0)],
    );
    out.gauge(
        "xlb_start_time_seconds",
        "When the agent started, in Unix seconds.",
        &[(vec![], agent.started_at as f64)],
    );
    out.gauge(
        "xlb_ready",
        "1 once XDP is attached and the first config is applied (as /readyz).",
        &[(vec![], f64::from(u8::from(agent.ready)))],
    );
    out.gauge(
        "xlb_config_generation",
        "The config generation the datapath's maps hold.",
        &[(vec![], agent.generation as f64)],
    );
    let (last_ok, last_at) = agent.last_reload.unwrap_or((false, 0));
    out.gauge(
        "xlb_config_last_reload_successful",
        "Whether the last config load or reload was applied (1) or rejected or only partly applied (0).",
        &[(vec![], f64::from(u8::from(last_ok)))],
    );
    out.gauge(
        "xlb_config_last_reload_timestamp_seconds",
        "When the last config load or reload finished, in Unix seconds.",
        &[(vec![], last_at as f64)],
    );
    out.counter(
        "xlb_config_reloads_total",
        "Config loads and reloads, by result.",
        &outcome_samples(agent.reloads),
    );
    let source_errors: Vec<Samples> = agent
        .source_errors
        .iter()
        .map(|(source, count)| (vec![("source", source.clone())], *count as f64))
        .collect();
    out.counter(
        "xlb_source_errors_total",
        "Errors reading or validating the config, by source.",
        &source_errors,
    );
    out.counter(
        "xlb_reconciles_total",
        "Reconcile passes (plan and apply), by result.",
        &outcome_samples(agent.reconciles),
    );
    out.counter(
        "xlb_reconcile_operations_total",
        "Map operations written by reconcile passes.",
        &[(vec![], agent.reconcile_ops as f64)],
    );
    out.histogram(
        "xlb_reconcile_duration_seconds",
        "How long reconcile passes took.",
        &agent.reconcile_seconds,
    );
}

/// What did not fit: the conntrack table's capacity, services skipped.
fn render_limits(out: &mut Exposition, agent: &AgentMetrics) {
    out.gauge(
        "xlb_conntrack_entries_limit",
        "Capacity of the conntrack table (entries; a flow takes two).",
        &[(vec![], f64::from(agent.conntrack_capacity))],
    );
    out.gauge(
        "xlb_services_skipped",
        "Cluster services left out because they do not fit the datapath's maps (the log names them).",
        &[(vec![], agent.services_skipped as f64)],
    );
}

/// Where the datapath is attached: uplinks (XDP), pods' veths and tunnels
/// (tc), cgroups (socket hooks).
fn render_attachments(out: &mut Exposition, agent: &AgentMetrics) {
    // tc attach points (pods' veths, tunnels) say so in their mode.
    let is_tc = |mode: &str| mode.starts_with("tcx") || mode.starts_with("clsact");
    let tc_hooks: Vec<Samples> = agent
        .interfaces
        .iter()
        .filter(|(_, mode, _)| is_tc(mode))
        .map(|(interface, mode, why)| {
            let hook = mode.split(' ').next().unwrap_or_default();
            (
                vec![
                    ("interface", interface.clone()),
                    ("hook", hook.to_owned()),
                    ("why", why.clone()),
                ],
                1.0,
            )
        })
        .collect();
    let interfaces: Vec<Samples> = agent
        .interfaces
        .iter()
        .filter(|(_, mode, _)| !is_tc(mode))
        .map(|(interface, mode, why)| {
            (
                vec![
                    ("interface", interface.clone()),
                    ("mode", mode.clone()),
                    ("why", why.clone()),
                ],
                1.0,
            )
        })
        .chain(agent.detached.iter().map(|interface| {
            (
                vec![
                    ("interface", interface.clone()),
                    ("mode", String::new()),
                    ("why", String::new()),
                ],
                0.0,
            )
        }))
        .collect();
    out.gauge(
        "xlb_interface_xdp_attached",
        "1 for each uplink the XDP program is attached to, with the mode (native or generic) and why it is an uplink (config node.interfaces, --iface, holds node address A, default route); 0 for an uplink that has none.",
        &interfaces,
    );
    let socket_hooks: Vec<Samples> = agent
        .socket_hooks
        .iter()
        .map(|(hook, cgroup)| {
            (
                vec![("hook", hook.clone()), ("cgroup", cgroup.clone())],
                1.0,
            )
        })
        .collect();
    out.gauge(
        "xlb_socket_hook_attached",
        "Socket hooks (connect4, sendmsg4, recvmsg4, getpeername4 and the IPv6 connect6, sendmsg6, \
         recvmsg6, getpeername6) attached, with their cgroup.",
        &socket_hooks,
    );
    out.gauge(
        "xlb_interface_tc_attached",
        "Interfaces with xlb's tc ingress program (pods' veths, tunnels), with the hook (tcx or \
         clsact) and why XDP is not used there.",
        &tc_hooks,
    );
}

fn outcome_samples(outcomes: Outcomes) -> Vec<Samples> {
    vec![
        (
            vec![("result", String::from("success"))],
            outcomes.success as f64,
        ),
        (
            vec![("result", String::from("failure"))],
            outcomes.failure as f64,
        ),
    ]
}

fn render_datapath(
    out: &mut Exposition,
    catalog: &CatalogRows,
    maps: &DatapathMaps,
) -> Result<(), DatapathError> {
    let verdicts: Vec<Samples> = maps
        .verdicts()?
        .into_iter()
        .map(|(reason, count)| {
            (
                vec![
                    ("reason", reason.name().to_owned()),
                    ("verdict", verdict_name(reason.verdict()).to_owned()),
                ],
                count as f64,
            )
        })
        .collect();
    out.counter(
        "xlb_datapath_packets_total",
        "Packets the XDP program handled, and calls the socket hooks balanced (fwd_socket, reject_sock_no_backend), by reason (see `xlb stats`) and verdict.",
        &verdicts,
    );
    render_services(out, catalog, maps)?;
    render_backends(out, catalog, maps)?;
    out.gauge(
        "xlb_services",
        "Services in the applied config.",
        &[(vec![], catalog.services().len() as f64)],
    );
    out.gauge(
        "xlb_backends",
        "Distinct backends (address:port) in the applied config.",
        &[(vec![], catalog.backends().len() as f64)],
    );
    render_conntrack(out, maps);
    Ok(())
}

/// Traffic per service.
fn render_services(
    out: &mut Exposition,
    catalog: &CatalogRows,
    maps: &DatapathMaps,
) -> Result<(), DatapathError> {
    let mut traffic = TrafficSamples::default();
    for service in catalog.services() {
        let labels = vec![
            ("namespace", service.namespace.to_string()),
            ("service", service.name.to_string()),
            ("protocol", service.protocol.to_string()),
        ];
        traffic.push(&labels, &maps.service_traffic(service.id)?);
    }
    out.counter(
        "xlb_service_packets_total",
        "Packets forwarded for a service, by direction (to_backend, to_client).",
        &traffic.packets,
    );
    out.counter(
        "xlb_service_bytes_total",
        "Bytes (whole frames) forwarded for a service, by direction.",
        &traffic.bytes,
    );
    Ok(())
}

/// Traffic per backend, and each backend's state and weight per service.
fn render_backends(
    out: &mut Exposition,
    catalog: &CatalogRows,
    maps: &DatapathMaps,
) -> Result<(), DatapathError> {
    let mut traffic = TrafficSamples::default();
    let mut info = Vec::new();
    let mut weights = Vec::new();
    for backend in catalog.backends() {
        let id = backend.id;
        let endpoint = backend.endpoint();
        traffic.push(&[("backend", endpoint.clone())], &maps.backend_traffic(id)?);
        for &service_id in catalog.services_of(backend) {
            let Some(service) = catalog.service(service_id) else {
                continue;
            };
            let Some(usage) = catalog.backends_of(service).iter().find(|b| b.id == id) else {
                continue;
            };
            let service_labels = vec![
                ("backend", endpoint.clone()),
                ("namespace", service.namespace.to_string()),
                ("service", service.name.to_string()),
            ];
            let mut with_state = service_labels.clone();
            with_state.push(("state", usage.state.to_string()));
            info.push((with_state, 1.0));
            weights.push((service_labels, f64::from(usage.weight)));
        }
    }
    out.counter(
        "xlb_backend_packets_total",
        "Packets forwarded to or from a backend (address:port), by direction.",
        &traffic.packets,
    );
    out.counter(
        "xlb_backend_bytes_total",
        "Bytes (whole frames) forwarded to or from a backend, by direction.",
        &traffic.bytes,
    );
    out.gauge(
        "xlb_backend_info",
        "A backend of a service, with its state (ready, serving, terminating); always 1.",
        &info,
    );
    out.gauge(
        "xlb_backend_weight",
        "A backend's share of its service's new flows, relative to the others.",
        &weights,
    );
    Ok(())
}

/// Conntrack occupancy (counted within `COUNT_BUDGET`).
fn render_conntrack(out: &mut Exposition, maps: &DatapathMaps) {
    let count = maps.count_flows(Instant::now() + COUNT_BUDGET);
    out.gauge(
        "xlb_conntrack_entries",
        "Entries in the conntrack table (a flow takes two; a lower bound if counting ran out of time).",
        &[(vec![], count.entries as f64)],
    );
    let half_open = maps.count_half_open(Instant::now() + COUNT_BUDGET);
    out.gauge(
        "xlb_conntrack_half_open_entries",
        "Entries in the half-open TCP table XLB_FLOWS_NEW (SYN seen, the client's ACK of the SYN-ACK not yet; a flow takes two; a SYN flood shows here).",
        &[(vec![], half_open.entries as f64)],
    );
    if let Some((established, half_open)) = maps.count_flows6(Instant::now() + COUNT_BUDGET) {
        out.gauge(
            "xlb_conntrack6_entries",
            "Entries in the IPv6 conntrack table XLB_FLOWS6 (a flow takes two; a lower bound if counting ran out of time).",
            &[(vec![], established.entries as f64)],
        );
        out.gauge(
            "xlb_conntrack6_half_open_entries",
            "Entries in the IPv6 half-open TCP table XLB_FLOWS_NEW6.",
            &[(vec![], half_open.entries as f64)],
        );
    }
}

/// Packets and bytes by direction, one sample each per labelled thing.
#[derive(Default)]
struct TrafficSamples {
    packets: Vec<Samples>,
    bytes: Vec<Samples>,
}

impl TrafficSamples {
    fn push(&mut self, labels: &[(&'static str, String)], traffic: &Traffic) {
        for (direction, packet_count, byte_count) in [
            (
                "to_backend",
                traffic.to_backend_packets,
                traffic.to_backend_bytes,
            ),
            (
                "to_client",
                traffic.to_client_packets,
                traffic.to_client_bytes,
            ),
        ] {
            let mut labels = labels.to_vec();
            labels.push(("direction", direction.to_owned()));
            self.packets.push((labels.clone(), packet_count as f64));
            self.bytes.push((labels, byte_count as f64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentMetrics {
        let mut seconds = Histogram::reconcile();
        seconds.observe(0.0007);
        seconds.observe(0.003);
        seconds.observe(100.0);
        AgentMetrics {
            version: "0.1.0",
            started_at: 1_700_000_000,
            ready: true,
            generation: 3,
            last_reload: Some((true, 1_700_000_100)),
            reloads: Outcomes {
                success: 3,
                failure: 1,
            },
            reconciles: Outcomes {
                success: 5,
                failure: 0,
            },
            reconcile_ops: 42,
            reconcile_seconds: seconds,
            source_errors: [(String::from("file"), 1)].into_iter().collect(),
            interfaces: vec![
                (
                    String::from("xlb-c"),
                    String::from("native"),
                    String::from("holds node address 198.18.0.1"),
                ),
                (
                    String::from("xlb-vb1"),
                    String::from("tcx ingress"),
                    String::from("pod veth (replies reverse-NATed here; no XDP peer)"),
                ),
            ],
            socket_hooks: vec![(String::from("connect4"), String::from("/sys/fs/cgroup"))],
            detached: vec![String::from("xlb-d")],
            conntrack_capacity: 1 << 20,
            services_skipped: 0,
        }
    }

    /// Every line is a comment or `name{labels} value`; every sample's
    /// family was declared just before; no series appears twice.
    fn check_exposition(text: &str) {
        let mut declared: Option<(String, String)> = None;
        let mut series = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                declared = Some((name.to_owned(), kind.to_owned()));
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series_text, value) = line.rsplit_once(' ').unwrap();
            assert!(
                value == "+Inf" || value.parse::<f64>().is_ok(),
                "bad value in {line:?}"
            );
            let name = series_text.split('{').next().unwrap();
            let (family, kind) = declared.clone().expect("sample before TYPE");
            let allowed = match kind.as_str() {
                "histogram" => [
                    format!("{family}_bucket"),
                    format!("{family}_sum"),
                    format!("{family}_count"),
                ]
                .contains(&name.to_owned()),
                _ => name == family,
            };
            assert!(allowed, "{name} under family {family} ({kind})");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name}");
            }
            assert!(series.insert(series_text.to_owned()), "duplicate {line}");
        }
    }

    #[test]
    fn agent_families_are_well_formed() {
        let text = render(&agent(), &CatalogRows::default(), None).unwrap();
        check_exposition(&text);
        for expected in [
            "xlb_build_info{version=\"0.1.0\"} 1\n",
            "xlb_ready 1\n",
            "xlb_config_generation 3\n",
            "xlb_config_reloads_total{result=\"failure\"} 1\n",
            "xlb_source_errors_total{source=\"file\"} 1\n",
            "xlb_reconcile_duration_seconds_bucket{le=\"0.0005\"} 0\n",
            "xlb_reconcile_duration_seconds_bucket{le=\"0.001\"} 1\n",
            "xlb_reconcile_duration_seconds_bucket{le=\"0.005\"} 2\n",
            "xlb_reconcile_duration_seconds_bucket{le=\"5\"} 2\n",
            "xlb_reconcile_duration_seconds_bucket{le=\"+Inf\"} 3\n",
            "xlb_reconcile_duration_seconds_count 3\n",
            "xlb_interface_xdp_attached{interface=\"xlb-c\",mode=\"native\",why=\"holds node address 198.18.0.1\"} 1\n",
            "xlb_interface_xdp_attached{interface=\"xlb-d\",mode=\"\",why=\"\"} 0\n",
            "xlb_interface_tc_attached{interface=\"xlb-vb1\",hook=\"tcx\",why=\"pod veth (replies reverse-NATed here; no XDP peer)\"} 1\n",
            "xlb_socket_hook_attached{hook=\"connect4\",cgroup=\"/sys/fs/cgroup\"} 1\n",
            "xlb_conntrack_entries_limit 1048576\n",
            "xlb_datapath_readable 0\n",
            "# TYPE xlb_reconcile_duration_seconds histogram\n",
        ] {
            assert!(text.contains(expected), "no {expected:?} in\n{text}");
        }
    }
}
