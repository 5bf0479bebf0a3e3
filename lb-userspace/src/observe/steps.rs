//! The agent's long-running steps (reconcile, neighbour resolution,
//! conntrack sweep) and since when each runs, so that a step stuck on the
//! agent's own thread shows in `/readyz`, which answers from another one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A step running longer than this makes `/readyz` answer 503 with its name.
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

/// Shared between the agent (which marks steps) and the HTTP thread (which
/// asks). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Steps(Arc<Mutex<BTreeMap<&'static str, Instant>>>);

impl Steps {
    fn running(&self) -> MutexGuard<'_, BTreeMap<&'static str, Instant>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `name` running (from now) or done.
    pub fn set(&self, name: &'static str, running: bool) {
        if running {
            self.running().insert(name, Instant::now());
        } else {
            self.running().remove(name);
        }
    }

    /// Runs `work` as step `name`.
    pub fn run<T>(&self, name: &'static str, work: impl FnOnce() -> T) -> T {
        self.set(name, true);
        let outcome = work();
        self.set(name, false);
        outcome
    }

    /// The step that has run longest, if longer than `after`.
    pub fn stuck(&self, after: Duration) -> Option<(&'static str, Duration)> {
        self.running()
            .iter()
            .map(|(name, since)| (*name, since.elapsed()))
            .filter(|(_, running)| *running > after)
            .max_by_key(|(_, running)| *running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_stuck_only_while_it_runs_too_long() {
        let steps = Steps::default();
        assert_eq!(steps.stuck(Duration::ZERO), None);
        steps.set("neighbours", true);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(steps.stuck(Duration::from_secs(60)), None);
        assert_eq!(
            steps.stuck(Duration::from_millis(10)).map(|(name, _)| name),
            Some("neighbours")
        );
        steps.set("neighbours", false);
        assert_eq!(steps.stuck(Duration::ZERO), None);
        assert_eq!(steps.run("reconcile", || 7), 7);
        assert_eq!(steps.stuck(Duration::ZERO), None);
    }
}
