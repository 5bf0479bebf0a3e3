//! Polling with a deadline: the lab never sleeps for a fixed time, it checks
//! a condition until it holds or the timeout says something is wrong.

use std::time::{Duration, Instant};

use crate::LabError;

/// How often `poll_until` checks by default.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Call `check` every `POLL_INTERVAL` until it returns `Some`, or fail with a
/// `Timeout` naming `what` after `timeout`.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout {
                what: what.to_owned(),
                after: timeout,
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
