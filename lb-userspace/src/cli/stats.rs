//! `xlb stats`: what the datapath did with every packet it saw, by reason
//! (the names of `lb_common::Reason`, as in /metrics), summed over CPUs.

use std::collections::BTreeMap;

use lb_common::Reason;
use serde::Serialize;

use super::table::{Align, Table};
use super::{CliError, Report, Session};
use crate::observe::metrics::verdict_name;

#[derive(Debug, Serialize)]
pub struct StatsReport {
    /// Every reason, in counter order.
    pub reasons: Vec<ReasonCount>,
    /// Packets per verdict (`forward`, `pass`, `drop`, `reject`).
    pub verdicts: BTreeMap<&'static str, u64>,
    pub total: u64,
}

#[derive(Debug, Serialize)]
pub struct ReasonCount {
    pub reason: &'static str,
    pub verdict: &'static str,
    pub packets: u64,
    pub description: &'static str,
}

pub fn report(session: &Session) -> Result<StatsReport, CliError> {
    Ok(from_counts(&session.maps.verdicts()?))
}

fn from_counts(counts: &[(Reason, u64)]) -> StatsReport {
    let mut verdicts = BTreeMap::new();
    let mut total = 0u64;
    let reasons = counts
        .iter()
        .map(|&(reason, packets)| {
            let verdict = verdict_name(reason.verdict());
            *verdicts.entry(verdict).or_insert(0u64) += packets;
            total += packets;
            ReasonCount {
                reason: reason.name(),
                verdict,
                packets,
                description: reason.description(),
            }
        })
        .collect();
    StatsReport {
        reasons,
        verdicts,
        total,
    }
}

impl Report for StatsReport {
    fn render(&self) -> String {
        let mut table = Table::new(&[
            ("REASON", Align::Left),
            ("VERDICT", Align::Left),
            ("PACKETS", Align::Right),
            ("MEANING", Align::Left),
        ]);
        for reason in &self.reasons {
            table.row(vec![
                reason.reason.to_owned(),
                reason.verdict.to_owned(),
                reason.packets.to_string(),
                reason.description.to_owned(),
            ]);
        }
        let verdicts: Vec<String> = ["forward", "pass", "drop", "reject"]
            .iter()
            .map(|verdict| {
                format!(
                    "{verdict} {}",
                    self.verdicts.get(verdict).copied().unwrap_or(0)
                )
            })
            .collect();
        format!(
            "{}\ntotal {} packets: {}\n",
            table.render(),
            self.total,
            verdicts.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_by_verdict_and_keeps_every_reason() {
        let counts: Vec<(Reason, u64)> = Reason::ALL
            .iter()
            .map(|&reason| {
                let packets = match reason {
                    Reason::FwdNewFlow => 11,
                    Reason::FwdEstablished => 89,
                    Reason::FwdReply => 100,
                    Reason::PassNotIpv4 => 2,
                    _ => 0,
                };
                (reason, packets)
            })
            .collect();
        let report = from_counts(&counts);
        assert_eq!(report.reasons.len(), Reason::ALL.len());
        assert_eq!(report.total, 202);
        assert_eq!(report.verdicts.get("forward"), Some(&200));
        assert_eq!(report.verdicts.get("drop"), Some(&0));
        let text = report.render();
        assert!(
            text.starts_with("REASON                   VERDICT  PACKETS  MEANING\n"),
            "{text}"
        );
        assert!(
            text.contains("\nfwd_new_flow             forward       11  first packet of a flow"),
            "{text}"
        );
        assert!(
            text.ends_with("\ntotal 202 packets: forward 200, pass 2, drop 0, reject 0\n"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["reasons"][0]["reason"], "fwd_new_flow");
        assert_eq!(json["reasons"][0]["packets"], 11);
    }
}
