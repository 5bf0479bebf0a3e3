//! The lab report: medians, ratios to xlb, the design goals, the stdout
//! table, the JSON shape and the sweep chart (hand-written SVG).

use std::collections::BTreeMap;
use std::fmt::Write as _;
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
    /// Seconds to configure the system (rules load, agent start).
    pub setup_s: Option<f64>,
    pub rss_mib: Option<f64>,
    /// xlb, established tests (metric key -> per repeat): flows its
    /// datapath created during the measured window (`fwd_new_flow`); about
    /// 0 when every tuple is a live flow.
    pub new_flows_per_window: BTreeMap<String, Vec<u64>>,
    pub notes: Vec<String>,
    pub error: Option<String>,
}

impl SystemFigures {
    pub fn new(system: &str) -> SystemFigures {
        SystemFigures {
            system: system.to_owned(),
            metrics: BTreeMap::new(),
            offered_pps: None,
            setup_s: None,
            rss_mib: None,
            new_flows_per_window: BTreeMap::new(),
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
    pub sweep_table_size: u32,
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
        sweep_table_size: u32,
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
            node_path_notes: Vec::new(),
            goals: Vec::new(),
            notes: vec![
                "60-byte UDP frames from an XDP live-frames generator; delivered = counted by an XDP sink on the backends' veths".into(),
                "every system runs on a fresh netns lab; figures are medians of the repeats".into(),
                "absolute figures on a shared 2-core machine are noisy: read the ratios".into(),
                match udp_timeout_s {
                    Some(s) => format!("unanswered UDP flows time out after {s} s in xlb and in the kernel's conntrack (nginx: proxy_timeout 2 s), so new-flow floods reach a steady state below table capacity"),
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
            self.notes.push(format!(
                "sweep: xlb runs with selection.tableSize {} at every point (10,000 Services x the default 1021 slots, double-buffered, would need 20.4M slots in XLB_SELECT); each Service has 10 backends, the measured one is last",
                self.sweep_table_size
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

    fn evaluate_goals(&self) -> Vec<Goal> {
        let at_least = |goal: String, value: Option<f64>, min: f64| Goal {
            goal,
            value,
            met: value.map(|v| v >= min),
        };
        let mut goals = Vec::new();
        for metric in ["udp_pps_1_flow", "udp_pps_60k_flows", "new_flows_per_s"] {
            goals.push(at_least(
                format!("xlb >= 0.85x limit ({metric})"),
                self.ratio("xlb/limit", metric),
                0.85,
            ));
        }
        for metric in ["udp_pps_1_flow", "udp_pps_60k_flows", "new_flows_per_s"] {
            goals.push(at_least(
                format!("xlb >= 6x iptables ({metric})"),
                self.ratio("xlb/iptables", metric),
                6.0,
            ));
        }
        if let Some(local) = self.node_path("local_bridge_pod") {
            goals.push(at_least(
                format!("xlb >= 2x iptables ({}, UDP 1 flow)", local.description),
                local.ratio,
                2.0,
            ));
        }
        if let Some(remote) = self.node_path("remote_pod_routed") {
            let today = self
                .system("xlb")
                .and_then(|xlb| xlb.metric("udp_pps_1_flow"));
            goals.push(at_least(
                format!(
                    "xlb {} (at node2) >= 0.85x xlb's UDP 1 flow on the bench lab (today's XDP figure)",
                    remote.description
                ),
                remote
                    .at_node2("xlb")
                    .zip(today)
                    .filter(|(_, today)| *today > 0.0)
                    .map(|(ours, today)| ours / today),
                0.85,
            ));
        }
        let xlb_points: Vec<(usize, &SweepSystem)> = self
            .sweep
            .iter()
            .filter_map(|point| Some((point.services, point.systems.get("xlb")?)))
            .filter(|(_, figures)| figures.error.is_none())
            .collect();
        for (metric, pick) in [
            (
                "udp_pps_1_flow",
                (|f: &SweepSystem| f.udp_pps_1_flow.as_ref().map(|x| x.median)) as Pick,
            ),
            ("new_flows_per_s", |f: &SweepSystem| {
                f.new_flows_per_s.as_ref().map(|x| x.median)
            }),
        ] {
            let first = xlb_points.first().and_then(|(_, f)| pick(f));
            let worst = xlb_points
                .iter()
                .filter_map(|(_, f)| pick(f))
                .map(|value| first.map(|base| (value - base).abs() / base * 100.0))
                .fold(None, |acc: Option<f64>, change| match (acc, change) {
                    (Some(a), Some(c)) => Some(a.max(c)),
                    (None, c) => c,
                    (a, None) => a,
                });
            let span = match (xlb_points.first(), xlb_points.last()) {
                (Some((a, _)), Some((b, _))) => format!("{a} to {b} Services"),
                _ => "no sweep".into(),
            };
            goals.push(Goal {
                goal: format!("xlb flat (< 5% change) over {span} ({metric}), % worst change"),
                value: worst,
                met: (xlb_points.len() > 1).then(|| worst.is_some_and(|w| w < 5.0)),
            });
        }
        if let Some(cluster_ip) = &self.cluster_ip {
            let ratio = cluster_ip.ratio("xlb/direct", "rr_p50_us");
            goals.push(Goal {
                goal: "ClusterIP RR p50 via xlb <= 1.05x direct to the pod (ratio)".into(),
                value: ratio,
                met: ratio.map(|r| r <= 1.05),
            });
        }
        let biggest = xlb_points.iter().max_by_key(|(services, _)| *services);
        goals.push(Goal {
            goal: format!(
                "{} Services applied in < 1 s (s)",
                biggest.map_or(0, |(services, _)| *services)
            ),
            value: biggest.and_then(|(_, f)| f.apply_s),
            met: biggest.and_then(|(_, f)| f.apply_s).map(|s| s < 1.0),
        });
        let rss = xlb_points
            .iter()
            .filter_map(|(_, f)| f.rss_mib)
            .chain(self.system("xlb").and_then(|f| f.rss_mib))
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            });
        goals.push(Goal {
            goal: "agent RSS < 64 MiB (MiB, largest seen)".into(),
            value: rss,
            met: rss.map(|r| r < 64.0),
        });
        goals
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "xlb lab benchmark ({}): NodePort traffic through the node, median of {} x {:.1} s\n\
             machine: {}\nload average: {} at start, {} at end; took {:.0} s\n\n",
            if self.quick { "quick" } else { "full" },
            self.repeats,
            self.window_s,
            self.machine,
            self.load_average_start,
            self.load_average_end,
            self.duration_s
        );
        let _ = write!(out, "{:<10}", "system");
        for (_, title, unit, _) in METRICS {
            let _ = write!(out, " {:>16}", format!("{title} {unit}"));
        }
        out += "\n";
        for figures in &self.systems {
            let _ = write!(out, "{:<10}", figures.system);
            if let Some(error) = &figures.error {
                let _ = writeln!(out, " FAILED: {}", first_line(error));
                continue;
            }
            for (key, _, unit, _) in METRICS {
                let cell = figures
                    .metric(key)
                    .map_or_else(|| "-".to_owned(), |v| human(v, unit));
                let _ = write!(out, " {cell:>16}");
            }
            out += "\n";
        }
        if !self.ratios.is_empty() {
            out += "\nratios (xlb / other; > 1 is better for rates, < 1 is better for RTT)\n";
            let _ = write!(out, "{:<14}", "");
            for (_, title, unit, _) in METRICS {
                let _ = write!(out, " {:>16}", format!("{title} {unit}"));
            }
            out += "\n";
            for (pair, ratios) in &self.ratios {
                let _ = write!(out, "{pair:<14}");
                for (key, ..) in METRICS {
                    let cell = ratios
                        .get(*key)
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
                    let _ = write!(out, " {cell:>16}");
                }
                out += "\n";
            }
        }
        for figures in &self.systems {
            for note in &figures.notes {
                let _ = writeln!(out, "  {}: {note}", figures.system);
            }
        }
        if !self.sweep.is_empty() {
            out += "\nscale sweep: the measured Service is the last of N (10 backends each)\n";
            let _ = writeln!(
                out,
                "{:>8} {:>9} {:<9} {:>12} {:>12} {:>11} {:>9} {:>9}",
                "services",
                "backends",
                "system",
                "UDP pps",
                "new flows/s",
                "apply s",
                "ops",
                "RSS MiB"
            );
            for point in &self.sweep {
                for (system, figures) in &point.systems {
                    let _ = write!(
                        out,
                        "{:>8} {:>9} {system:<9}",
                        point.services, point.backends
                    );
                    if let Some(error) = &figures.error {
                        let _ = writeln!(out, " FAILED: {}", first_line(error));
                        continue;
                    }
                    let cell = |f: &Option<Figure>| {
                        f.as_ref()
                            .map_or_else(|| "-".to_owned(), |f| human(f.median, "/s"))
                    };
                    let _ = writeln!(
                        out,
                        " {:>12} {:>12} {:>11} {:>9} {:>9}",
                        cell(&figures.udp_pps_1_flow),
                        cell(&figures.new_flows_per_s),
                        figures
                            .apply_s
                            .map_or_else(|| "-".to_owned(), |s| format!("{s:.3}")),
                        figures
                            .ops
                            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                        figures
                            .rss_mib
                            .map_or_else(|| "-".to_owned(), |m| format!("{m:.1}")),
                    );
                }
            }
            out += "  apply s: xlb = SIGHUP to \"applied config generation N\"; iptables/nftables = iptables-restore / nft -f\n";
        }
        if let Some(cluster_ip) = &self.cluster_ip {
            out += "\n";
            out += &super::cluster_ip::table(cluster_ip);
        }
        if !self.node_paths.is_empty() {
            out += "\nreal-node paths: UDP 1 flow to one pod, counted at tc ingress of the pod's eth0 (pod ends at kernel defaults)\n";
            let _ = writeln!(
                out,
                "{:<36} {:>12} {:>13} {:>13} {:>14}  xlb sends it by",
                "path", "xlb pps", "iptables pps", "xlb/iptables", "at node2 x/i"
            );
            for row in &self.node_paths {
                let cell = |system: &str| {
                    if row.errors.contains_key(system) {
                        "FAILED".to_owned()
                    } else {
                        row.median(system)
                            .map_or_else(|| "-".to_owned(), |v| human(v, "pps"))
                    }
                };
                let at_node2 = match (row.at_node2("xlb"), row.at_node2("iptables")) {
                    (Some(ours), Some(theirs)) => {
                        format!("{}/{}", human(ours, "pps"), human(theirs, "pps"))
                    }
                    (Some(ours), None) => human(ours, "pps"),
                    _ => "-".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "{:<36} {:>12} {:>13} {:>13} {:>14}  {}",
                    row.description,
                    cell("xlb"),
                    cell("iptables"),
                    row.ratio
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
                    at_node2,
                    row.xlb_hook
                );
            }
            out += "  at node2 x/i: xlb / iptables pps counted by an XDP sink on node2's uplink instead (remote pods: the node's cost, without node2 forwarding to its pod on the same 2 CPUs)\n";
            for note in &self.node_path_notes {
                let _ = writeln!(out, "  {note}");
            }
        }
        out += "\ndesign goals\n";
        for goal in &self.goals {
            let verdict = match goal.met {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let value = goal
                .value
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
            let _ = writeln!(out, "  {verdict:<6} {:>10}  {}", value, goal.goal);
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }

    /// Two panels (UDP pps, new flows/s) over the sweep, log-log.
    pub fn svg(&self) -> String {
        const W: f64 = 920.0;
        const H: f64 = 380.0;
        let series = [
            ("xlb", "#d62728"),
            ("iptables", "#1f77b4"),
            ("nftables", "#2ca02c"),
        ];
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">xlb lab sweep: NodePort Services on the node (10 backends each), measured Service last</text>\n",
            W / 2.0
        );
        let panels: [(&str, Pick); 2] = [
            ("UDP packets/s delivered (1 flow)", |f| {
                f.udp_pps_1_flow.as_ref().map(|x| x.median)
            }),
            ("new flows/s", |f| {
                f.new_flows_per_s.as_ref().map(|x| x.median)
            }),
        ];
        let xs: Vec<usize> = self.sweep.iter().map(|p| p.services).collect();
        for (panel, (title, pick)) in panels.iter().enumerate() {
            let (left, top, width, height) = (70.0 + panel as f64 * 450.0, 50.0, 360.0, 270.0);
            let values: Vec<f64> = self
                .sweep
                .iter()
                .flat_map(|p| p.systems.values().filter_map(pick))
                .filter(|v| *v > 0.0)
                .collect();
            let (lo, hi) = values
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            let (lo, hi) = if values.is_empty() {
                (1.0, 10.0)
            } else {
                (
                    10f64.powf(lo.log10().floor()),
                    10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
                )
            };
            let x_of = |services: usize| {
                let (a, b) = (
                    (*xs.first().unwrap_or(&1) as f64).max(1.0).log10(),
                    (*xs.last().unwrap_or(&10) as f64).max(1.0).log10(),
                );
                let span = if b > a { b - a } else { 1.0 };
                left + ((services as f64).max(1.0).log10() - a) / span * width
            };
            let y_of = |v: f64| {
                top + height - (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) * height
            };
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{title}</text>\n\
                 <rect x=\"{left}\" y=\"{top}\" width=\"{width}\" height=\"{height}\" fill=\"none\" stroke=\"#999\"/>",
                left + width / 2.0,
                top - 8.0
            );
            let mut decade = lo;
            while decade <= hi * 1.0001 {
                let y = y_of(decade);
                let _ = writeln!(
                    out,
                    "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                    left + width,
                    left - 4.0,
                    y + 4.0,
                    axis_label(decade)
                );
                decade *= 10.0;
            }
            for services in &xs {
                let x = x_of(*services);
                let _ = writeln!(
                    out,
                    "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{services}</text>",
                    top + height + 16.0
                );
            }
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">Services</text>",
                left + width / 2.0,
                top + height + 34.0
            );
            for (index, (name, color)) in series.iter().enumerate() {
                let points: Vec<(f64, f64)> = self
                    .sweep
                    .iter()
                    .filter_map(|p| {
                        let v = pick(p.systems.get(*name)?)?;
                        (v > 0.0).then(|| (x_of(p.services), y_of(v)))
                    })
                    .collect();
                let path: Vec<String> = points
                    .iter()
                    .map(|(x, y)| format!("{x:.1},{y:.1}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
                    path.join(" ")
                );
                for (x, y) in &points {
                    let _ = writeln!(
                        out,
                        "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{color}\"/>"
                    );
                }
                let _ = writeln!(
                    out,
                    "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>",
                    left + 8.0,
                    top + 16.0 + 14.0 * index as f64
                );
            }
        }
        let _ = writeln!(
            out,
            "<text x=\"10\" y=\"{}\" font-size=\"10\" fill=\"#666\">{}; load average {} .. {}</text>\n</svg>",
            H - 8.0,
            xml_escape(&self.machine),
            self.load_average_start,
            self.load_average_end
        );
        out
    }
}

/// 1e6 -> "1M", 1e4 -> "10k" (chart axes: powers of ten).
fn axis_label(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("{}M", v / 1e6),
        v if v >= 1e3 => format!("{}k", v / 1e3),
        v => format!("{v}"),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// 1234567 -> "1.23M" (rates), microseconds with one decimal.
fn human(value: f64, unit: &str) -> String {
    if unit == "us" {
        return format!("{value:.1}");
    }
    match value {
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(Figure::of(vec![3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Figure::of(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
        let mut report = Report::new(true, 1, Duration::from_secs(1), 251, Some(1));
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
