//! deploy/monitoring: the Grafana dashboard parses, the component renders
//! (through the production overlay, which uses it), every PromQL expression
//! of the dashboard and the alert rules names only metrics a running agent
//! exports (read from its /metrics, not from a list kept here), reason
//! labels name real reasons, and `promtool check rules` accepts the rules.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use serde_yaml::Value;
use xlb_tests::{Agent, Lab, repo_root};

/// The agent's default --metrics-addr, inside the node namespace.
const METRICS: &str = "127.0.0.1:9090";

fn render(overlay: &str) -> anyhow::Result<Vec<Value>> {
    xlb_tests::kustomize::render(&repo_root().join(overlay))
}

fn kind_named<'a>(objects: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .with_context(|| format!("no {kind} {name} rendered"))
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(value: &serde_json::Value, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", serde_json::Value::String(expr)) => found.push(expr.clone()),
                        _ => walk(value, found),
                    }
                }
            }
            serde_json::Value::Array(values) => values.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(dashboard, &mut found);
    found
}

/// Identifiers in a PromQL expression that name xlb metrics.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("xlb_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        // Not part of a longer identifier or a quoted string value.
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Values an expression matches the `reason` label against
/// (`reason="a"`, `reason=~"a|b"`).
fn reason_values(expr: &str) -> Vec<String> {
    let mut values = Vec::new();
    for (at, _) in expr.match_indices("reason") {
        let tail = &expr[at + "reason".len()..];
        let Some(quoted) = tail
            .strip_prefix("=~\"")
            .or_else(|| tail.strip_prefix("=\""))
        else {
            continue;
        };
        let value = &quoted[..quoted.find('"').unwrap_or(quoted.len())];
        values.extend(value.split('|').map(str::to_owned));
    }
    values
}

/// Metric names a running agent exposes (from `# TYPE` lines; a histogram
/// brings its `_bucket`, `_sum` and `_count` series), and its reasons.
fn exported() -> anyhow::Result<(BTreeSet<String>, BTreeSet<String>, String)> {
    let lab = Lab::new(1)?;
    let services = "  - name: udp-echo\n    protocol: UDP\n    nodePort: 30975\n    targetPort: 4444\n    backends:\n      - address: 198.18.1.2\n";
    let config = lab.write_file("xlb.yaml", &lab.config_yaml(services))?;
    let _agent = Agent::start(&lab, &config)?;
    let address: SocketAddr = METRICS.parse()?;
    let (code, text) = lab
        .node
        .run(move || xlb::observe::http::get(address, "/metrics"))??;
    ensure!(code == 200, "/metrics answered {code}:\n{text}");
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (Some(name), Some(kind)) = (fields.next(), fields.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        if kind == "histogram" || kind == "summary" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    let reasons: BTreeSet<String> = text
        .lines()
        .filter(|line| line.starts_with("xlb_datapath_packets_total{"))
        .flat_map(reason_values)
        .collect();
    ensure!(
        names.contains("xlb_datapath_packets_total") && !reasons.is_empty(),
        "the agent exported no datapath counters:\n{text}"
    );
    Ok((names, reasons, text))
}

#[test]
fn dashboards_and_alerts_use_only_what_the_agent_exports() -> anyhow::Result<()> {
    let dashboard_path = repo_root().join("deploy/monitoring/dashboards/xlb.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&dashboard_path)
            .with_context(|| format!("reading {}", dashboard_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", dashboard_path.display()))?;
    ensure!(dashboard["uid"].is_string() && dashboard["panels"].is_array());

    // The component renders, through the overlay that uses it, and the
    // dashboard ConfigMap holds the same JSON.
    let objects = render("deploy/overlays/production")?;
    let map = kind_named(&objects, "ConfigMap", "xlb-grafana-dashboard")?;
    let shipped: serde_json::Value = serde_json::from_str(
        map["data"]["xlb.json"]
            .as_str()
            .context("the dashboard ConfigMap has no xlb.json")?,
    )?;
    assert_eq!(shipped, dashboard);
    let rule = kind_named(&objects, "PrometheusRule", "xlb")?;
    kind_named(&objects, "PodMonitor", "xlb")?;
    let mut alerts = Vec::new();
    for group in rule["spec"]["groups"].as_sequence().context("no groups")? {
        for rule in group["rules"].as_sequence().context("no rules")? {
            let name = rule["alert"].as_str().context("a rule without alert")?;
            let expr = rule["expr"].as_str().context("a rule without expr")?;
            alerts.push((name.to_owned(), expr.to_owned()));
        }
    }
    let alert_names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "XlbConntrackNearlyFull",
        "XlbMasqueradePortsExhausted",
        "XlbReloadFailing",
        "XlbAgentNotReady",
        "XlbXdpDetached",
    ] {
        ensure!(alert_names.contains(wanted), "no alert {wanted}");
    }

    let (exported, reasons, text) = exported()?;
    let mut exprs: Vec<(String, String)> = dashboard_exprs(&dashboard)
        .into_iter()
        .map(|expr| (String::from("dashboard"), expr))
        .collect();
    exprs.extend(
        alerts
            .iter()
            .map(|(name, expr)| (format!("alert {name}"), expr.clone())),
    );
    let mut used = BTreeSet::new();
    for (origin, expr) in &exprs {
        let names = metric_names(expr);
        ensure!(!names.is_empty(), "{origin}: `{expr}` names no xlb metric");
        for name in names {
            ensure!(
                exported.contains(&name),
                "{origin}: `{expr}` uses {name}, which the agent does not export; it exports {exported:?}"
            );
            used.insert(name);
        }
        for reason in reason_values(expr) {
            ensure!(
                reasons.contains(&reason),
                "{origin}: `{expr}` matches reason {reason:?}, which is none of {reasons:?}"
            );
        }
    }
    println!(
        "{} expressions ({} alerts) use {} of the {} metrics a running agent exports",
        exprs.len(),
        alerts.len(),
        used.len(),
        exported.len()
    );
    let _ = text;

    // promtool (Debian's prometheus package) on the rule groups.
    let rules_file = std::env::temp_dir().join(format!("xlb-rules-{}.yaml", std::process::id()));
    std::fs::write(&rules_file, serde_yaml::to_string(&rule["spec"])?)?;
    let output = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules_file)
        .output();
    let _ = std::fs::remove_file(&rules_file);
    match output {
        Ok(output) => {
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            ensure!(output.status.success(), "promtool check rules:\n{said}");
            println!("promtool check rules: {}", said.trim().replace('\n', "; "));
        }
        Err(error) => bail!(
            "cannot run promtool ({error}); `cargo xtask setup` installs it (Debian package prometheus)"
        ),
    }
    Ok(())
}

#[test]
fn metric_names_and_reasons_are_found_in_expressions() {
    assert_eq!(
        metric_names("sum by (le) (rate(xlb_a_bucket{node=~\"$node\"}[5m])) / xlb_b"),
        BTreeSet::from([String::from("xlb_a_bucket"), String::from("xlb_b")])
    );
    assert!(metric_names("up{job=\"xlb_not_a_metric\"}").is_empty());
    assert_eq!(
        reason_values("x{reason=~\"a|b\",verdict=\"drop\"} + y{reason=\"c\"}"),
        ["a", "b", "c"]
    );
}
