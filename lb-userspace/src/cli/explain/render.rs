//! `xlb explain`'s text: one labelled line per stage the packet goes
//! through, then the notes.

use super::Explanation;
use crate::cli::Report;

impl Report for Explanation {
    fn render(&self) -> String {
        let mut lines = Lines::default();
        self.arrival(&mut lines);
        self.outcome(&mut lines);
        let width = lines
            .0
            .iter()
            .map(|(label, _)| label.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (label, text) in &lines.0 {
            out.push_str(&format!("{label:<width$}  {text}\n"));
        }
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }
}

/// (label, text) lines, aligned when rendered.
#[derive(Default)]
struct Lines(Vec<(String, String)>);

impl Lines {
    fn line(&mut self, label: &str, text: String) {
        self.0.push((label.to_owned(), text));
    }
}

impl Explanation {
    /// The packet, the service it matches, its flow and affinity.
    fn arrival(&self, lines: &mut Lines) {
        let mut line = |label: &str, text: String| lines.line(label, text);
        line(
            "packet",
            format!(
                "{} {} -> {}{} arriving on {} (ifindex {})",
                self.protocol,
                self.source,
                self.destination,
                self.tcp_flags.map(|f| format!(" {f}")).unwrap_or_default(),
                self.interface,
                self.ifindex
            ),
        );
        line(
            "service",
            match &self.service {
                Some(service) => format!(
                    "{} (id {}){}",
                    service.name.clone().unwrap_or_else(|| String::from("?")),
                    service.id,
                    service
                        .affinity_timeout_seconds
                        .map(|t| format!(", sessionAffinity ClientIP for {t}s"))
                        .unwrap_or_default()
                ),
                None => String::from("none on this address and port"),
            },
        );
        line(
            "flow",
            match &self.existing_flow {
                Some(flow) => format!(
                    "existing ({} direction): {} -> {}, backend id {}",
                    flow.direction,
                    flow.translated.source,
                    flow.translated.destination,
                    flow.backend_id
                ),
                None => String::from("none in conntrack"),
            },
        );
        if let Some(affinity) = &self.affinity {
            line(
                "affinity",
                match (affinity.record_backend_id, affinity.used) {
                    (Some(id), true) => format!("the client's record names backend id {id}: used"),
                    (Some(id), false) => format!(
                        "the client's record names backend id {id}: not used (expired, gone or not taking new flows)"
                    ),
                    (None, _) => {
                        String::from("no record for this client: Maglev chooses, and is remembered")
                    }
                },
            );
        }
    }

    /// The backend, how it was chosen, the rewrite, the hop and the verdict.
    fn outcome(&self, lines: &mut Lines) {
        let mut line = |label: &str, text: String| lines.line(label, text);
        if let Some(backend) = &self.backend {
            line(
                "backend",
                format!("{} (id {}), by {}", backend.address, backend.id, backend.by),
            );
        }
        if let Some(maglev) = &self.maglev {
            line(
                "maglev",
                format!(
                    "hash {:#010x}: slot {} of {} (XLB_SELECT[{}][{}])",
                    maglev.hash, maglev.slot, maglev.table_size, maglev.table_id, maglev.slot
                ),
            );
        }
        if let Some(masquerade) = &self.masquerade {
            line("masquerade", format!("as {masquerade}"));
        }
        if let Some(hop) = &self.next_hop {
            line(
                "next hop",
                format!(
                    "{} (ifindex {}) {} -> {}",
                    hop.interface.clone().unwrap_or_else(|| String::from("?")),
                    hop.ifindex,
                    hop.source_mac,
                    hop.destination_mac
                ),
            );
        }
        line(
            "verdict",
            format!(
                "{} ({}, {}): {}",
                self.verdict.reason,
                self.verdict.verdict,
                self.verdict.action,
                self.verdict.description
            ),
        );
        if let Some(output) = &self.output {
            line(
                "leaves as",
                format!("{} -> {}", output.source, output.destination),
            );
        }
    }
}
