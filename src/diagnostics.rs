//! How failures read in the logs: one line with the root cause, and a failure that repeats
//! (etcd away, a broker down, Elasticsearch refusing) logged once and then at most once a
//! minute with how many times it happened meanwhile, instead of a line per retry.

use std::time::{Duration, Instant};

/// The innermost error of a chain, in one line.
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// The I/O error at the bottom of a chain, if there is one.
pub fn io_root<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut current = Some(error);
    let mut found = None;
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            found = Some(io);
        }
        current = error.source();
    }
    found
}

/// How often a repeating failure is logged again after its first line.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(60);

/// Decides which occurrences of one repeating failure get a log line: the first, then one
/// per [`REPEAT_INTERVAL`] carrying the count of those not logged.
#[derive(Debug)]
pub struct Repeats {
    interval: Duration,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Default for Repeats {
    fn default() -> Self {
        Repeats::every(REPEAT_INTERVAL)
    }
}

impl Repeats {
    pub fn every(interval: Duration) -> Self {
        Repeats {
            interval,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// Records one occurrence; `Some(n)` when this one should be logged, `n` being how many
    /// occurred since the last line (0 for the first).
    pub fn occurred(&mut self) -> Option<u64> {
        let now = Instant::now();
        let due = self
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= self.interval);
        if !due {
            self.unlogged += 1;
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// Whether anything failed since the last [`Repeats::reset`]: the caller logs a recovery.
    pub fn active(&self) -> bool {
        self.last_logged.is_some()
    }

    /// The failure is over; the next one is logged at once.
    pub fn reset(&mut self) {
        self.last_logged = None;
        self.unlogged = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_one_per_interval_with_the_count() {
        let mut repeats = Repeats::every(Duration::from_millis(40));
        assert_eq!(repeats.occurred(), Some(0));
        assert_eq!(repeats.occurred(), None);
        assert_eq!(repeats.occurred(), None);
        let deadline = Instant::now() + Duration::from_secs(5);
        let logged = loop {
            if let Some(skipped) = repeats.occurred() {
                break skipped;
            }
            assert!(Instant::now() < deadline, "never logged again");
            std::thread::yield_now();
        };
        assert!(logged >= 2, "{logged}");
        assert!(repeats.active());
        repeats.reset();
        assert!(!repeats.active());
        assert_eq!(repeats.occurred(), Some(0));
    }
}
