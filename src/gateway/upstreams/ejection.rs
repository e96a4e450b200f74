//! Outlier ejection (passive health): a replica whose attempts keep failing is taken out of
//! selection for a while, as Envoy's `consecutive_5xx` does. Failures are 5xx answers,
//! connect errors and timeouts; `ejection.consecutiveFailures` of them in a row eject.
//!
//! When an ejection's time is up the replica gets exactly one trial request. If it succeeds
//! the replica serves again; if it fails, the replica is ejected again for twice as long, up
//! to `ejection.maxTime`. The state is atomics on the replica's [`NodeState`](super::NodeState),
//! so it lives as long as the replica's membership does, whatever the route file does.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::EjectionPolicy;

/// Milliseconds on the gateway's monotonic clock; tests make their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticks(pub u64);

impl Ticks {
    /// Now, on a clock that starts (at 1, so that 0 can mean "never") when first read.
    pub fn now() -> Ticks {
        Ticks::of(Instant::now())
    }

    /// `instant` on the same clock, for a time a caller has read already.
    pub fn of(instant: Instant) -> Ticks {
        static START: OnceLock<Instant> = OnceLock::new();
        let start = *START.get_or_init(|| Instant::now().min(instant));
        Ticks(instant.saturating_duration_since(start).as_millis() as u64 + 1)
    }

    pub fn after(self, duration: Duration) -> Ticks {
        Ticks(self.0.saturating_add(duration.as_millis() as u64))
    }
}

/// One replica's passive-health state.
#[derive(Debug, Default)]
pub struct Outlier {
    /// Failed attempts since the last one that succeeded.
    consecutive_failures: AtomicU32,
    /// When the current ejection ends, in [`Ticks`]; 0 while the replica serves. It stays set
    /// after the time is up until the trial request has succeeded.
    ejected_until: AtomicU64,
    /// Whether the trial request of an ended ejection is under way.
    trial_running: AtomicBool,
    /// Ejections since the replica last passed a trial: sets how long the next one lasts.
    ejections_in_a_row: AtomicU32,
    /// Ejections ever, for `/metrics`.
    pub ejections_total: AtomicU64,
    /// Why the replica was last ejected, for `/cluster`.
    reason: Mutex<String>,
}

/// Whether a replica may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Serving,
    /// Ejected, for this long yet.
    Ejected(Duration),
    /// Its ejection is over and its trial request may be sent.
    TrialDue,
    /// Its ejection is over and its trial request is under way.
    TrialRunning,
}

/// How an attempt at a replica ended, for its passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    Succeeded,
    /// A 5xx answer, a connect error or a timeout, with what it was.
    Failed(&'a str),
    /// Neither: the client went away first.
    Unknown,
}

/// What an ejected replica shows on `/cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EjectionView {
    pub reason: String,
    /// Time left; zero once the trial request is due or under way.
    pub time_left: Duration,
    pub ejections_in_a_row: u32,
}

impl Outlier {
    pub fn availability(&self, now: Ticks) -> Availability {
        match self.ejected_until.load(Ordering::Acquire) {
            0 => Availability::Serving,
            until if now.0 < until => Availability::Ejected(Duration::from_millis(until - now.0)),
            _ if self.trial_running.load(Ordering::Acquire) => Availability::TrialRunning,
            _ => Availability::TrialDue,
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// Claims the trial request of an ejection that is over; only one caller wins it.
    pub fn claim_trial(&self) -> bool {
        self.trial_running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Applies an attempt's verdict. `trial` says whether the attempt was the replica's trial
    /// request; `may_eject` whether the service can spare one more ejected replica, asked only
    /// when this failure would eject. Returns whether the replica was ejected by it.
    pub fn record(
        &self,
        verdict: Verdict,
        trial: bool,
        now: Ticks,
        policy: &EjectionPolicy,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        match verdict {
            Verdict::Succeeded => {
                if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
                if trial {
                    self.ejections_in_a_row.store(0, Ordering::Relaxed);
                    self.ejected_until.store(0, Ordering::Release);
                    self.trial_running.store(false, Ordering::Release);
                }
                false
            }
            Verdict::Unknown => {
                if trial {
                    self.trial_running.store(false, Ordering::Release);
                }
                false
            }
            Verdict::Failed(what) if trial => {
                self.eject(now, policy, format!("its trial request failed: {what}"));
                true
            }
            Verdict::Failed(what) => {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                // Attempts sent before the ejection can still fail after it; they change nothing.
                if failures < policy.consecutive_failures || self.is_ejected() || !may_eject() {
                    return false;
                }
                let reason = format!("{failures} failures in a row, the last: {what}");
                self.eject(now, policy, reason);
                true
            }
        }
    }

    fn eject(&self, now: Ticks, policy: &EjectionPolicy, reason: String) {
        let count = self.ejections_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        let until = now.after(policy.ejection_time(count));
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        self.ejected_until.store(until.0, Ordering::Release);
        self.trial_running.store(false, Ordering::Release);
    }

    pub fn view(&self, now: Ticks) -> Option<EjectionView> {
        let time_left = match self.availability(now) {
            Availability::Serving => return None,
            Availability::Ejected(left) => left,
            Availability::TrialDue | Availability::TrialRunning => Duration::ZERO,
        };
        Some(EjectionView {
            reason: self
                .reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            time_left,
            ejections_in_a_row: self.ejections_in_a_row.load(Ordering::Relaxed),
        })
    }
}

/// Whether one more of `replicas` may be ejected when `ejected` already are: at most
/// `max_percent` of them, and never the last one serving.
pub fn may_eject_one_more(ejected: usize, replicas: usize, max_percent: u32) -> bool {
    let after = ejected + 1;
    after < replicas && after * 100 <= replicas * max_percent as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> EjectionPolicy {
        EjectionPolicy {
            consecutive_failures: 3,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(25),
            max_percent: 50,
        }
    }

    fn fail(outlier: &Outlier, trial: bool, now: Ticks) -> bool {
        outlier.record(Verdict::Failed("500"), trial, now, &policy(), || true)
    }

    #[test]
    fn failures_in_a_row_eject_and_a_success_in_between_starts_the_count_again() {
        let outlier = Outlier::default();
        let now = Ticks(1_000);
        assert!(!fail(&outlier, false, now));
        assert!(!fail(&outlier, false, now));
        outlier.record(Verdict::Succeeded, false, now, &policy(), || true);
        assert!(!fail(&outlier, false, now));
        assert!(!fail(&outlier, false, now));
        assert_eq!(outlier.availability(now), Availability::Serving);
        assert!(fail(&outlier, false, now));
        assert_eq!(
            outlier.availability(now),
            Availability::Ejected(Duration::from_secs(10))
        );
        let view = outlier.view(now.after(Duration::from_secs(4))).unwrap();
        assert_eq!(view.time_left, Duration::from_secs(6));
        assert_eq!(view.reason, "3 failures in a row, the last: 500");
    }

    #[test]
    fn an_ended_ejection_lets_one_trial_through_and_a_failed_trial_ejects_for_twice_as_long() {
        let outlier = Outlier::default();
        let start = Ticks(1_000);
        for _ in 0..3 {
            fail(&outlier, false, start);
        }
        let over = start.after(Duration::from_secs(10));
        assert_eq!(outlier.availability(over), Availability::TrialDue);
        assert!(outlier.claim_trial());
        assert!(!outlier.claim_trial(), "only one trial at a time");
        assert_eq!(outlier.availability(over), Availability::TrialRunning);

        assert!(fail(&outlier, true, over));
        assert_eq!(
            outlier.availability(over),
            Availability::Ejected(Duration::from_secs(20))
        );
        // The third ejection would last 40 s; maxTime holds it at 25 s.
        let later = over.after(Duration::from_secs(20));
        assert!(outlier.claim_trial());
        assert!(fail(&outlier, true, later));
        assert_eq!(
            outlier.availability(later),
            Availability::Ejected(Duration::from_secs(25))
        );
    }

    #[test]
    fn a_trial_that_succeeds_brings_the_replica_back_and_resets_the_doubling() {
        let outlier = Outlier::default();
        let start = Ticks(1_000);
        for _ in 0..3 {
            fail(&outlier, false, start);
        }
        let over = start.after(Duration::from_secs(10));
        assert!(outlier.claim_trial());
        outlier.record(Verdict::Unknown, true, over, &policy(), || true);
        assert_eq!(
            outlier.availability(over),
            Availability::TrialDue,
            "a trial whose client went away is due again"
        );
        assert!(outlier.claim_trial());
        outlier.record(Verdict::Succeeded, true, over, &policy(), || true);
        assert_eq!(outlier.availability(over), Availability::Serving);
        for _ in 0..3 {
            fail(&outlier, false, over);
        }
        assert_eq!(
            outlier.availability(over),
            Availability::Ejected(Duration::from_secs(10))
        );
    }

    #[test]
    fn a_straggler_that_fails_after_the_ejection_changes_nothing() {
        let outlier = Outlier::default();
        let start = Ticks(1_000);
        for _ in 0..3 {
            fail(&outlier, false, start);
        }
        for _ in 0..5 {
            assert!(!fail(&outlier, false, start.after(Duration::from_secs(1))));
        }
        assert_eq!(
            outlier.availability(start),
            Availability::Ejected(Duration::from_secs(10))
        );
    }

    #[test]
    fn a_service_that_cannot_spare_a_replica_keeps_it() {
        let outlier = Outlier::default();
        for _ in 0..10 {
            outlier.record(Verdict::Failed("500"), false, Ticks(1), &policy(), || false);
        }
        assert_eq!(outlier.availability(Ticks(1)), Availability::Serving);
    }

    #[test]
    fn at_most_the_share_is_ejected_and_never_the_last_replica() {
        assert!(!may_eject_one_more(0, 1, 100), "the only replica stays");
        assert!(may_eject_one_more(0, 2, 50));
        assert!(!may_eject_one_more(1, 2, 100), "one of two always serves");
        assert!(may_eject_one_more(0, 3, 50));
        assert!(!may_eject_one_more(1, 3, 50), "two of three is past 50%");
        assert!(may_eject_one_more(4, 10, 50));
        assert!(!may_eject_one_more(5, 10, 50));
        assert!(!may_eject_one_more(0, 10, 5), "5% of 10 is less than one");
    }
}
