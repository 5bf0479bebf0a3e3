//! The lab report: medians, ratios to xlb, the design goals, the stdout
//! table, the JSON shape and the sweep chart (hand-written SVG).

mod goals;
mod svg;
mod table;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// A figure: the median of its samples.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub median: f64,
    pub samples: Vec<f64>,
}

impl Figure {
    pub fn of(mut samples: Vec<f64>) -> Figure {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        samples.shrink_to_fit();
        Figure { median, samples }
    }
}

/// Headline metrics: (key, column title, unit, higher is better).
pub const METRICS: &[(&str, &str, &str, bool)] = &[
    ("udp_pps_1_flow", "UDP 1 flow", "pps", true),
    ("udp_pps_60k_flows", "UDP 60k flows", "pps", true),
    ("new_flows_per_s", "new flows", "/s", true),
    ("tcp_conn_per_s", "TCP conn", "/s", true),
    ("latency_p50_us", "RTT p50", "us", false),
    ("latency_p99_us", "RTT p99", "us", false),
];

#[derive(Clone, Debug, Serialize)]
pub struct SystemFigures {
    pub system: String,
    /// Metric key (see `METRICS`) -> figure.
    pub metrics: BTreeMap<String, Figure>,
    /// Frames/s the generator offered (all UDP windows).
    pub offered_pps: Option<Figure>,
    /// The same per UDP test (metric key -> figure).
    pub offered_pps_by_test: BTreeMap<String, Figure>,
    /// Seconds to configure the system (rules load, agent start).
    pub setup_s: Option<f64>,
    pub rss_mib: Option<f64>,
    /// xlb, established tests (metric key -> per repeat): flows its
    /// datapath created during the measured window (`fwd_new_flow`); about
    /// 0 when every tuple is a live flow.
    pub new_flows_per_window: BTreeMap<String, Vec<u64>>,
    /// UDP tests (metric key -> figure): nanoseconds of the system's BPF
    /// programs per delivered packet (`BPF_ENABLE_STATS` run time over the
    /// window; none for systems without BPF).
    pub bpf_ns_per_packet: BTreeMap<String, Figure>,
    /// The same per program run (each packet runs XDP once; hand-offs and
    /// replies run a tc program too).
    pub bpf_ns_per_run: BTreeMap<String, Figure>,
    pub notes: Vec<String>,
    pub error: Option<String>,
}

impl SystemFigures {
    pub fn new(system: &str) -> SystemFigures {
        SystemFigures {
            system: system.to_owned(),
            metrics: BTreeMap::new(),
            offered_pps: None,
            offered_pps_by_test: BTreeMap::new(),
            setup_s: None,
            rss_mib: None,
            new_flows_per_window: BTreeMap::new(),
            bpf_ns_per_packet: BTreeMap::new(),
            bpf_ns_per_run: BTreeMap::new(),
            notes: Vec::new(),
            error: None,
        }
    }

    fn metric(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).map(|figure| figure.median)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SweepSystem {
    pub udp_pps_1_flow: Option<Figure>,
    pub new_flows_per_s: Option<Figure>,
    /// xlb: SIGHUP to "applied config generation N"; iptables/nftables:
    /// iptables-restore / nft -f wall time.
    pub apply_s: Option<f64>,
    /// Map operations the agent reported for the apply.
    pub ops: Option<u64>,
    pub rss_mib: Option<f64>,
    pub notes: Vec<String>,
    pub error: Option<String>,
}

/// Picks one figure out of a sweep point's system.
type Pick = fn(&SweepSystem) -> Option<f64>;

#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    pub services: usize,
    pub backends: usize,
    /// "xlb" / "iptables" / "nftables" -> figures.
    pub systems: BTreeMap<String, SweepSystem>,
}

/// One real-node path (bench/src/lab/nodes.rs): delivered pps per system.
#[derive(Clone, Debug, Serialize)]
pub struct NodePath {
    pub path: String,
    pub description: String,
    /// How xlb's datapath sends this path's packets.
    pub xlb_hook: String,
    /// "xlb" / "iptables" -> UDP packets/s (1 flow) delivered to the pod.
    pub pps: BTreeMap<String, Figure>,
    /// Remote pods: the flood counted (and dropped) by an XDP sink as it
    /// arrives at node2's uplink, as the bench lab's backends count it: the
    /// node's cost without node2's forwarding on the same two CPUs.
    pub at_node2_pps: BTreeMap<String, Figure>,
    /// xlb / iptables.
    pub ratio: Option<f64>,
    pub errors: BTreeMap<String, String>,
}

impl NodePath {
    pub fn new(path: &str, description: &str, xlb_hook: &str) -> NodePath {
        NodePath {
            path: path.to_owned(),
            description: description.to_owned(),
            xlb_hook: xlb_hook.to_owned(),
            pps: BTreeMap::new(),
            at_node2_pps: BTreeMap::new(),
            ratio: None,
            errors: BTreeMap::new(),
        }
    }

    fn median(&self, system: &str) -> Option<f64> {
        self.pps
            .get(system)
            .map(|figure| figure.median)
            .filter(|v| v.is_finite())
    }

    fn at_node2(&self, system: &str) -> Option<f64> {
        self.at_node2_pps
            .get(system)
            .map(|figure| figure.median)
            .filter(|v| v.is_finite())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub value: Option<f64>,
    pub met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub load_average_start: String,
    pub load_average_end: String,
    pub quick: bool,
    pub repeats: u32,
    pub window_s: f64,
    pub duration_s: f64,
    pub agent_binary: String,
    /// `selection.tableSize` of xlb in the sweep (None: xlb's default).
    pub sweep_table_size: Option<u32>,
    /// Idle timeout of unanswered UDP flows in every system (None: defaults).
    pub udp_timeout_s: Option<u32>,
    pub systems: Vec<SystemFigures>,
    /// "xlb/limit" etc. -> metric -> xlb figure / other figure.
    pub ratios: BTreeMap<String, BTreeMap<String, f64>>,
    pub sweep: Vec<SweepPoint>,
    /// ClusterIP from a pod: direct, xlb's socket hooks, kube-proxy iptables.
    pub cluster_ip: Option<super::cluster_ip::ClusterIpFigures>,
    /// Uplink to pods as CNIs leave them, xlb and iptables side by side.
    pub node_paths: Vec<NodePath>,
    pub node_path_notes: Vec<String>,
    /// The flood in both families on dual-stack labs (xlb, ip(6)tables).
    pub ipv6: Vec<super::ipv6::FamilyFigures>,
    pub goals: Vec<Goal>,
    pub notes: Vec<String>,
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

impl Report {
    pub fn new(
        quick: bool,
        repeats: u32,
        window: Duration,
        sweep_table_size: Option<u32>,
        udp_timeout_s: Option<u32>,
    ) -> Report {
        Report {
            machine: crate::machine::describe(),
            load_average_start: load_average(),
            load_average_end: String::new(),
            quick,
            repeats,
            window_s: window.as_secs_f64(),
            duration_s: 0.0,
            agent_binary: super::agent::agent_bin()
                .map(|path| path.display().to_string())
                .unwrap_or_default(),
            sweep_table_size,
            udp_timeout_s,
            systems: Vec::new(),
            ratios: BTreeMap::new(),
            sweep: Vec::new(),
            cluster_ip: None,
            node_paths: Vec::new(),
            ipv6: Vec::new(),
            node_path_notes: Vec::new(),
            goals: Vec::new(),
            notes: vec![
                "60-byte UDP frames cloned out of the generator's wire by a tc program (bpf_clone_redirect); delivered = counted by an XDP sink on the backends' veths".into(),
                "every system runs on a fresh netns lab; figures are medians of the repeats".into(),
                "absolute figures on a shared 2-core machine are noisy: read the ratios".into(),
                match udp_timeout_s {
                    Some(s) => format!("unanswered UDP flows time out after {s} s in the kernel's conntrack and flows of one datagram in xlb (nginx: proxy_timeout 2 s), so new-flow floods reach a steady state below table capacity"),
                    None => "UDP flow timeouts are each system's default: flow tables fill during new-flow floods".into(),
                },
            ],
        }
    }

    fn system(&self, name: &str) -> Option<&SystemFigures> {
        self.systems
            .iter()
            .find(|figures| figures.system == name && figures.error.is_none())
    }

    /// Ratios and goals, once everything is measured.
    pub fn finish(&mut self, elapsed: Duration) {
        self.duration_s = elapsed.as_secs_f64();
        self.load_average_end = load_average();
        if self.sweep.iter().any(|point| point.services > 1) {
            let size = self
                .sweep_table_size
                .map_or_else(|| String::from("its default"), |size| size.to_string());
            self.notes.push(format!(
                "sweep: xlb runs with selection.tableSize {size} at every point (one table per Service); each Service has 10 backends, the measured one is last"
            ));
        }
        if let Some(xlb) = self.system("xlb").cloned() {
            for other in ["limit", "iptables", "nftables", "nginx"] {
                let Some(theirs) = self.system(other) else {
                    continue;
                };
                let ratios: BTreeMap<String, f64> = METRICS
                    .iter()
                    .filter_map(|(key, ..)| {
                        let ours = xlb.metric(key)?;
                        let theirs = theirs.metric(key)?;
                        (theirs > 0.0).then(|| ((*key).to_owned(), ours / theirs))
                    })
                    .collect();
                if !ratios.is_empty() {
                    self.ratios.insert(format!("xlb/{other}"), ratios);
                }
            }
        }
        for row in &mut self.node_paths {
            row.ratio = match (row.median("xlb"), row.median("iptables")) {
                (Some(ours), Some(theirs)) if theirs > 0.0 => Some(ours / theirs),
                _ => None,
            };
        }
        self.goals = self.evaluate_goals();
    }

    fn node_path(&self, key: &str) -> Option<&NodePath> {
        self.node_paths.iter().find(|row| row.path == key)
    }

    fn ratio(&self, pair: &str, metric: &str) -> Option<f64> {
        self.ratios.get(pair)?.get(metric).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(Figure::of(vec![3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Figure::of(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
        let mut report = Report::new(true, 1, Duration::from_secs(1), Some(251), Some(1));
        for (name, pps) in [("xlb", 2.0e6), ("limit", 2.5e6), ("iptables", 0.25e6)] {
            let mut figures = SystemFigures::new(name);
            figures
                .metrics
                .insert("udp_pps_1_flow".into(), Figure::of(vec![pps]));
            report.systems.push(figures);
        }
        report.finish(Duration::from_secs(1));
        assert_eq!(report.ratios["xlb/limit"]["udp_pps_1_flow"], 0.8);
        assert_eq!(report.ratios["xlb/iptables"]["udp_pps_1_flow"], 8.0);
        let table = report.table();
        assert!(table.contains("0.80x"), "{table}");
        assert!(table.contains("MISSED"), "{table}");
        assert!(report.svg().starts_with("<svg"));
    }
}
