//! The design goals, judged from the figures once everything is measured.

use super::{Goal, Pick, Report, SweepSystem};

/// `Goal` met when `value` is at least `min`.
fn at_least(goal: String, value: Option<f64>, min: f64) -> Goal {
    Goal {
        goal,
        value,
        met: value.map(|v| v >= min),
    }
}

impl Report {
    pub(super) fn evaluate_goals(&self) -> Vec<Goal> {
        let mut goals = self.ratio_goals();
        goals.extend(self.node_path_goals());
        let xlb_points: Vec<(usize, &SweepSystem)> = self
            .sweep
            .iter()
            .filter_map(|point| Some((point.services, point.systems.get("xlb")?)))
            .filter(|(_, figures)| figures.error.is_none())
            .collect();
        goals.extend(flat_goals(&xlb_points));
        if let Some(cluster_ip) = &self.cluster_ip {
            let ratio = cluster_ip.ratio("xlb/direct", "rr_p50_us");
            goals.push(Goal {
                goal: "ClusterIP RR p50 via xlb <= 1.05x direct to the pod (ratio)".into(),
                value: ratio,
                met: ratio.map(|r| r <= 1.05),
            });
        }
        goals.extend(self.cost_goals(&xlb_points));
        goals.extend(self.ipv6_goals());
        goals
    }

    /// xlb's IPv6 within 10% of its IPv4 on the same lab (issue 14).
    fn ipv6_goals(&self) -> Vec<Goal> {
        let Some(xlb) = self.ipv6.iter().find(|row| row.system == "xlb") else {
            return Vec::new();
        };
        ["udp_pps_1_flow", "udp_pps_60k_flows", "new_flows_per_s"]
            .into_iter()
            .map(|metric| {
                let v4 = xlb.ipv4.get(metric).map(|figure| figure.median);
                let v6 = xlb.ipv6.get(metric).map(|figure| figure.median);
                let ratio = v4
                    .zip(v6)
                    .filter(|(v4, _)| *v4 > 0.0)
                    .map(|(v4, v6)| v6 / v4);
                at_least(format!("xlb IPv6 >= 0.9x its IPv4 ({metric})"), ratio, 0.9)
            })
            .collect()
    }

    /// xlb against the ceiling and against kube-proxy's iptables.
    fn ratio_goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        for (pair, name, min) in [
            ("xlb/limit", "limit", 0.85),
            ("xlb/iptables", "iptables", 6.0),
        ] {
            for metric in ["udp_pps_1_flow", "udp_pps_60k_flows", "new_flows_per_s"] {
                goals.push(at_least(
                    format!("xlb >= {min}x {name} ({metric})"),
                    self.ratio(pair, metric),
                    min,
                ));
            }
        }
        goals
    }

    /// The real-node paths: a local pod against iptables, a remote pod
    /// against the bench lab's XDP figure.
    fn node_path_goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
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
        goals
    }

    /// Applying the largest sweep config, and the agent's memory.
    fn cost_goals(&self, xlb_points: &[(usize, &SweepSystem)]) -> Vec<Goal> {
        let biggest = xlb_points.iter().max_by_key(|(services, _)| *services);
        let rss = xlb_points
            .iter()
            .filter_map(|(_, f)| f.rss_mib)
            .chain(self.system("xlb").and_then(|f| f.rss_mib))
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            });
        vec![
            Goal {
                goal: format!(
                    "{} Services applied in < 1 s (s)",
                    biggest.map_or(0, |(services, _)| *services)
                ),
                value: biggest.and_then(|(_, f)| f.apply_s),
                met: biggest.and_then(|(_, f)| f.apply_s).map(|s| s < 1.0),
            },
            Goal {
                goal: "agent RSS < 64 MiB (MiB, largest seen)".into(),
                value: rss,
                met: rss.map(|r| r < 64.0),
            },
        ]
    }
}

/// xlb's pps and new flows/s stay flat over the sweep's Service counts.
fn flat_goals(xlb_points: &[(usize, &SweepSystem)]) -> Vec<Goal> {
    let mut goals = Vec::new();
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
    goals
}
