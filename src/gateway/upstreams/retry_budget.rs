//! The retry budget of one service, Linkerd's model: over a sliding window, retries may add
//! `retryBudget.percent` of the service's requests, plus `minPerSecond` retries a second that
//! are always allowed. When every replica fails, retries then add a bounded share of load
//! instead of multiplying it by the route's attempts.
//!
//! The window is ten slots of a tenth of it each, counted with atomics: a request costs one
//! increment, and a slot that comes round again is reset by whoever reaches it first (an
//! increment racing that reset may be lost, which only makes the budget a little looser).

use std::sync::atomic::{AtomicU64, Ordering};

use super::ejection::Ticks;
use crate::config::RetryBudgetPolicy;

const SLOTS: u64 = 10;

#[derive(Debug, Default)]
struct Slot {
    /// Which slot of time (`ticks / slot length + 1`) the counts are for; 0 for none yet.
    stamp: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

#[derive(Debug, Default)]
pub struct RetryBudget {
    slots: [Slot; SLOTS as usize],
    /// Retries not made because the budget was spent, for `/metrics`.
    pub refused: AtomicU64,
}

impl RetryBudget {
    /// Counts a request to the service (its first attempt).
    pub fn deposit(&self, now: Ticks, policy: &RetryBudgetPolicy) {
        self.current(now, policy)
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry out of the budget if it has one left; counts the refusal if not.
    pub fn try_withdraw(&self, now: Ticks, policy: &RetryBudgetPolicy) -> bool {
        let stamp = stamp_of(now, policy);
        let (mut requests, mut retries) = (0, 0);
        for slot in &self.slots {
            let slot_stamp = slot.stamp.load(Ordering::Acquire);
            if slot_stamp + SLOTS > stamp && slot_stamp <= stamp {
                requests += slot.requests.load(Ordering::Relaxed);
                retries += slot.retries.load(Ordering::Relaxed);
            }
        }
        // In hundredths of a retry: `percent` of the requests, plus the floor over the window.
        let window_ms = policy.window.as_millis() as u64;
        let allowance = requests * u64::from(policy.percent)
            + u64::from(policy.min_per_second) * window_ms / 10;
        if (retries + 1) * 100 > allowance {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.current(now, policy)
            .retries
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The slot for `now`, emptied first if it last counted an older stretch of time.
    fn current(&self, now: Ticks, policy: &RetryBudgetPolicy) -> &Slot {
        let stamp = stamp_of(now, policy);
        let slot = &self.slots[(stamp % SLOTS) as usize];
        let seen = slot.stamp.load(Ordering::Acquire);
        if seen != stamp
            && slot
                .stamp
                .compare_exchange(seen, stamp, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }
}

fn stamp_of(now: Ticks, policy: &RetryBudgetPolicy) -> u64 {
    let slot_ms = (policy.window.as_millis() as u64 / SLOTS).max(1);
    now.0 / slot_ms + 1
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy(percent: u32, min_per_second: u32) -> RetryBudgetPolicy {
        RetryBudgetPolicy {
            percent,
            min_per_second,
            window: Duration::from_secs(10),
        }
    }

    /// Sends `requests` evenly over `seconds` of the test's clock, each retried up to `retries`
    /// times while the budget allows (every attempt fails); returns the attempts made.
    fn failing_load(
        budget: &RetryBudget,
        policy: &RetryBudgetPolicy,
        start: Ticks,
        requests: u64,
        seconds: u64,
        retries: u32,
    ) -> u64 {
        let mut attempts = 0;
        for n in 0..requests {
            let now = Ticks(start.0 + n * seconds * 1000 / requests);
            budget.deposit(now, policy);
            attempts += 1;
            for _ in 0..retries {
                if !budget.try_withdraw(now, policy) {
                    break;
                }
                attempts += 1;
            }
        }
        attempts
    }

    #[test]
    fn with_every_replica_failing_retries_add_the_budgets_share_of_the_load_and_no_more() {
        let policy = policy(20, 0);
        let budget = RetryBudget::default();
        let attempts = failing_load(&budget, &policy, Ticks(1), 6_000, 60, 2);
        assert!(
            (7_150..=7_200).contains(&attempts),
            "6,000 requests made {attempts} attempts; the budget allows 1.2 times"
        );
        // Every request that did not get both its retries had one refused.
        assert!(budget.refused.load(Ordering::Relaxed) >= 6_000 - 1_200);
    }

    #[test]
    fn the_floor_lets_a_quiet_service_retry() {
        let policy = policy(20, 10);
        let budget = RetryBudget::default();
        // One request a second for 30 s: 20% of it is nothing, the floor is 10 a second.
        let attempts = failing_load(&budget, &policy, Ticks(1), 30, 30, 2);
        assert_eq!(attempts, 90, "every request made its two retries");
    }

    #[test]
    fn the_window_forgets_an_outage_that_ended() {
        let policy = policy(20, 0);
        let budget = RetryBudget::default();
        failing_load(&budget, &policy, Ticks(1), 1_000, 10, 2);
        // Eleven seconds later nothing of the outage is left: a lone request has no budget
        // from the old requests, and none was spent on its behalf either.
        let later = Ticks(21_001);
        budget.deposit(later, &policy);
        assert!(!budget.try_withdraw(later, &policy));
        for _ in 0..4 {
            budget.deposit(later, &policy);
        }
        assert!(
            budget.try_withdraw(later, &policy),
            "5 requests earn one retry"
        );
    }
}
