//! The report as text for stdout: the headline table, ratios, the sweep,
//! ClusterIP, the real-node paths and the design goals.

use std::fmt::Write as _;

use super::{Figure, METRICS, Report};

impl Report {
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
        self.ratio_table(&mut out);
        self.bpf_table(&mut out);
        for figures in &self.systems {
            for note in &figures.notes {
                let _ = writeln!(out, "  {}: {note}", figures.system);
            }
        }
        self.sweep_table(&mut out);
        if let Some(cluster_ip) = &self.cluster_ip {
            out += "\n";
            out += &crate::lab::cluster_ip::table(cluster_ip);
        }
        self.node_path_table(&mut out);
        if !self.ipv6.is_empty() {
            out += &crate::lab::ipv6::table(&self.ipv6);
        }
        self.goal_table(&mut out);
        out
    }

    fn ratio_table(&self, out: &mut String) {
        if !self.ratios.is_empty() {
            *out += "\nratios (xlb / other; > 1 is better for rates, < 1 is better for RTT)\n";
            let _ = write!(out, "{:<14}", "");
            for (_, title, unit, _) in METRICS {
                let _ = write!(out, " {:>16}", format!("{title} {unit}"));
            }
            *out += "\n";
            for (pair, ratios) in &self.ratios {
                let _ = write!(out, "{pair:<14}");
                for (key, ..) in METRICS {
                    let cell = ratios
                        .get(*key)
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
                    let _ = write!(out, " {cell:>16}");
                }
                *out += "\n";
            }
        }
    }

    /// BPF nanoseconds per delivered packet, and xlb's over the limit's.
    fn bpf_table(&self, out: &mut String) {
        const UDP: [(&str, &str); 3] = [
            ("udp_pps_1_flow", "UDP 1 flow"),
            ("udp_pps_60k_flows", "UDP 60k flows"),
            ("new_flows_per_s", "new flows"),
        ];
        let with_bpf: Vec<_> = self
            .systems
            .iter()
            .filter(|figures| !figures.bpf_ns_per_packet.is_empty())
            .collect();
        if with_bpf.is_empty() {
            return;
        }
        *out += "\nBPF run time, ns per delivered packet (per program run in brackets; \
                 BPF_ENABLE_STATS over each window)\n";
        let _ = write!(out, "{:<14}", "");
        for (_, title) in UDP {
            let _ = write!(out, " {title:>20}");
        }
        *out += "\n";
        let median = |map: &std::collections::BTreeMap<String, Figure>, key: &str| {
            map.get(key).map(|figure| figure.median)
        };
        for figures in &with_bpf {
            let _ = write!(out, "{:<14}", figures.system);
            for (key, _) in UDP {
                let cell = match (
                    median(&figures.bpf_ns_per_packet, key),
                    median(&figures.bpf_ns_per_run, key),
                ) {
                    (Some(packet), Some(run)) => format!("{packet:.0} ({run:.0})"),
                    _ => "-".to_owned(),
                };
                let _ = write!(out, " {cell:>20}");
            }
            *out += "\n";
        }
        let find = |name: &str| with_bpf.iter().find(|figures| figures.system == name);
        if let (Some(xlb), Some(limit)) = (find("xlb"), find("limit")) {
            let _ = write!(out, "{:<14}", "xlb - limit");
            for (key, _) in UDP {
                let cell = median(&xlb.bpf_ns_per_packet, key)
                    .zip(median(&limit.bpf_ns_per_packet, key))
                    .map_or_else(|| "-".to_owned(), |(x, l)| format!("{:+.0}", x - l));
                let _ = write!(out, " {cell:>20}");
            }
            *out += "\n";
        }
    }

    fn sweep_table(&self, out: &mut String) {
        if !self.sweep.is_empty() {
            *out += "\nscale sweep: the measured Service is the last of N (10 backends each)\n";
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
            *out += "  apply s: xlb = SIGHUP to \"applied config generation N\"; iptables/nftables = iptables-restore / nft -f\n";
        }
    }

    fn node_path_table(&self, out: &mut String) {
        if !self.node_paths.is_empty() {
            *out += "\nreal-node paths: UDP 1 flow to one pod, counted at tc ingress of the pod's eth0 (pod ends at kernel defaults)\n";
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
            *out += "  at node2 x/i: xlb / iptables pps counted by an XDP sink on node2's uplink instead (remote pods: the node's cost, without node2 forwarding to its pod on the same 2 CPUs)\n";
            for note in &self.node_path_notes {
                let _ = writeln!(out, "  {note}");
            }
        }
    }

    fn goal_table(&self, out: &mut String) {
        *out += "\ndesign goals\n";
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
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
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
