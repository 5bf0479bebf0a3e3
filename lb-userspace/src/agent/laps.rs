//! Where one apply's time went, for `RUST_LOG=xlb::timing=debug`.

use std::time::{Duration, Instant};

use log::debug;

/// Where one apply's time went, step by step; logged at debug level under
/// target `xlb::timing` (`RUST_LOG=info,xlb::timing=debug`) with the
/// "applied" line.
#[derive(Default)]
pub(super) struct Laps {
    parts: Vec<(&'static str, Duration)>,
    last: Option<Instant>,
}

impl Laps {
    /// Starts timing a new apply.
    pub(super) fn start(&mut self) {
        self.parts.clear();
        self.last = Some(Instant::now());
    }

    /// The time since the last lap (or the start) went to `step`.
    pub(super) fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        if let Some(last) = self.last {
            self.parts.push((step, now.duration_since(last)));
        }
        self.last = Some(now);
    }

    /// Logs and forgets the laps so far.
    pub(super) fn log(&mut self, generation: u64) {
        if self.parts.is_empty() {
            return;
        }
        let total: Duration = self.parts.iter().map(|(_, took)| *took).sum();
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|(step, took)| format!("{step} {:.1}", took.as_secs_f64() * 1e3))
            .collect();
        debug!(
            target: "xlb::timing",
            "generation {generation}: {:.1} ms: {} (ms)",
            total.as_secs_f64() * 1e3,
            parts.join(", ")
        );
        self.parts.clear();
        self.last = None;
    }
}
