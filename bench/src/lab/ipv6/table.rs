//! The IPv6 part as text: each system's figures by family, then each
//! system over the others in both families.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{FamilyFigures, TESTS};
use crate::lab::report::Figure;

/// The part as text: each system's figures by family and IPv6/IPv4 (with
/// the generator's offered rate and the BPF run time per delivered packet
/// where there are any), then xlb over the limit and over ip(6)tables in
/// each family: a family's cost in xlb is its ratio to the limit of the
/// same family, and IPv6/IPv4 of the limit is what the lab itself gives
/// IPv6's frames.
pub fn table(figures: &[FamilyFigures]) -> String {
    let mut out = String::from(
        "\nIPv6 beside IPv4 (UDP to the flood NodePort, delivered packets/s; each system on one \
         dual-stack lab, families measured in turn; offered: the generator's rate; BPF: ns per \
         delivered packet)\n",
    );
    let _ = writeln!(
        out,
        "{:<12} {:<18} {:>10} {:>10} {:>10} {:>17} {:>11}",
        "system", "test", "IPv4", "IPv6", "IPv6/IPv4", "offered v4/v6", "BPF v4/v6"
    );
    for entry in figures {
        if let Some(error) = &entry.error {
            let line = error.lines().next().unwrap_or_default();
            let _ = writeln!(out, "{:<12} FAILED: {line}", entry.system);
            continue;
        }
        for (test, _) in TESTS {
            let v4 = entry.ipv4.get(test).map(|figure| figure.median);
            let v6 = entry.ipv6.get(test).map(|figure| figure.median);
            let cell = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), mpps);
            let ratio = v4
                .zip(v6)
                .filter(|(v4, _)| *v4 > 0.0)
                .map_or_else(|| "-".to_owned(), |(v4, v6)| format!("{:.2}x", v6 / v4));
            let offered = entry.offered.get(test).map_or_else(
                || "-".to_owned(),
                |(v4, v6)| format!("{}/{}", mpps(*v4), mpps(*v6)),
            );
            let bpf = entry
                .bpf_ns
                .get(test)
                .map_or_else(|| "-".to_owned(), |(v4, v6)| format!("{v4:.0}/{v6:.0}"));
            let _ = writeln!(
                out,
                "{:<12} {:<18} {:>10} {:>10} {:>10} {:>17} {:>11}",
                entry.system,
                test,
                cell(v4),
                cell(v6),
                ratio,
                offered,
                bpf
            );
        }
    }
    let xlb = figures.iter().find(|entry| entry.system == "xlb");
    for other in ["limit", "ip(6)tables"] {
        let theirs = figures.iter().find(|entry| entry.system == other);
        let (Some(xlb), Some(theirs)) = (xlb, theirs) else {
            continue;
        };
        for (test, _) in TESTS {
            let _ = writeln!(
                out,
                "xlb / {other} {test}: IPv4 {}, IPv6 {}",
                ratio(test, &xlb.ipv4, &theirs.ipv4),
                ratio(test, &xlb.ipv6, &theirs.ipv6)
            );
        }
    }
    for entry in figures {
        for note in &entry.notes {
            let _ = writeln!(out, "  {}: {note}", entry.system);
        }
    }
    out
}

fn ratio(test: &str, ours: &BTreeMap<String, Figure>, theirs: &BTreeMap<String, Figure>) -> String {
    ours.get(test)
        .zip(theirs.get(test))
        .filter(|(_, theirs)| theirs.median > 0.0)
        .map_or_else(
            || "-".to_owned(),
            |(ours, theirs)| format!("{:.2}x", ours.median / theirs.median),
        )
}

fn mpps(pps: f64) -> String {
    if pps >= 1e6 {
        format!("{:.2}M", pps / 1e6)
    } else {
        format!("{:.0}k", pps / 1e3)
    }
}
