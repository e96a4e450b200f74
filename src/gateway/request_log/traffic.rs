//! Requests/s, error rate and latency percentiles over the last minute, per route and per
//! replica: a ring of per-second counts and of 10-second latency histograms for each, kept
//! by each request thread ([`ThreadTraffic`]) and added up when the dashboard reads
//! ([`TrafficTotals`]). `/metrics` keeps its own counters; these exist for the dashboard.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::trace::millis;

const WINDOW_SECONDS: u64 = 60;
const SLOT_SECONDS: u64 = 10;
const SLOTS: usize = (WINDOW_SECONDS / SLOT_SECONDS) as usize;
/// Latency buckets: four per doubling, from 1 µs to about 4.5 minutes.
const PER_OCTAVE: f64 = 4.0;
const BUCKETS: usize = 112;

/// One thread's traffic of every route and replica it served in the last minute.
#[derive(Default)]
pub struct ThreadTraffic {
    routes: HashMap<Arc<str>, Series>,
    replicas: HashMap<Arc<str>, Series>,
}

/// Every thread's last minute, added up by route and by replica.
#[derive(Default)]
pub struct TrafficTotals {
    routes: BTreeMap<Arc<str>, Totals>,
    replicas: BTreeMap<Arc<str>, Totals>,
}

struct Totals {
    requests: u64,
    errors: u64,
    latency: Box<[u64; BUCKETS]>,
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            requests: 0,
            errors: 0,
            latency: Box::new([0; BUCKETS]),
        }
    }
}

/// Summaries by route or replica name, sorted by name.
pub type Named = Vec<(Arc<str>, TrafficSummary)>;

/// What the dashboard shows of one route or replica.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSummary {
    pub requests: u64,
    pub requests_per_second: f64,
    /// Answers of 500 and above, and requests that got no answer.
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

struct Series {
    /// `(second, requests, errors)`, indexed by second modulo the window.
    seconds: [(u64, u32, u32); WINDOW_SECONDS as usize],
    /// `(slot number, histogram)`, indexed by slot modulo [`SLOTS`].
    latency: [(u64, Box<[u32; BUCKETS]>); SLOTS],
}

impl Series {
    fn new() -> Series {
        Series {
            seconds: [(0, 0, 0); WINDOW_SECONDS as usize],
            latency: std::array::from_fn(|_| (0, Box::new([0; BUCKETS]))),
        }
    }

    fn record(&mut self, second: u64, error: bool, duration: Duration) {
        let at = &mut self.seconds[(second % WINDOW_SECONDS) as usize];
        if at.0 != second {
            *at = (second, 0, 0);
        }
        at.1 += 1;
        at.2 += u32::from(error);
        let slot = second / SLOT_SECONDS;
        let histogram = &mut self.latency[(slot % SLOTS as u64) as usize];
        if histogram.0 != slot {
            histogram.0 = slot;
            histogram.1.fill(0);
        }
        histogram.1[bucket_of(duration)] += 1;
    }

    /// Adds the last minute before `now` into `totals`; `false` if it had no request.
    fn add_to(&self, now: u64, totals: &mut Totals) -> bool {
        let recent = |second: u64| second + WINDOW_SECONDS > now && second <= now;
        let mut any = false;
        for (_, requests, errors) in self.seconds.iter().filter(|(second, ..)| recent(*second)) {
            totals.requests += u64::from(*requests);
            totals.errors += u64::from(*errors);
            any |= *requests > 0;
        }
        for (slot, histogram) in &self.latency {
            if recent(slot * SLOT_SECONDS) || recent(slot * SLOT_SECONDS + SLOT_SECONDS - 1) {
                for (total, count) in totals.latency.iter_mut().zip(histogram.iter()) {
                    *total += u64::from(*count);
                }
            }
        }
        any
    }
}

impl Totals {
    fn summary(&self) -> TrafficSummary {
        let (requests, errors) = (self.requests, self.errors);
        TrafficSummary {
            requests,
            requests_per_second: requests as f64 / WINDOW_SECONDS as f64,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p50_ms: percentile(&self.latency, 0.50),
            p99_ms: percentile(&self.latency, 0.99),
        }
    }
}

fn bucket_of(duration: Duration) -> usize {
    let micros = duration.as_micros().max(1) as f64;
    ((micros.log2() * PER_OCTAVE) as usize).min(BUCKETS - 1)
}

/// The upper edge of the bucket that holds the `q` quantile, in milliseconds: within a
/// fifth of the true value.
fn percentile(histogram: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return None;
    }
    let wanted = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (bucket, count) in histogram.iter().enumerate() {
        seen += count;
        if seen >= wanted {
            let micros = 2f64.powf((bucket as f64 + 1.0) / PER_OCTAVE);
            return Some(millis(Duration::from_secs_f64(micros / 1e6)));
        }
    }
    None
}

/// The whole second of `time` since the epoch: the traffic's clock.
pub fn second_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn second_now() -> u64 {
    second_of(SystemTime::now())
}

impl ThreadTraffic {
    /// Counts one request, ended in `second`, under its route and its replica, where it had
    /// them.
    pub fn record(
        &mut self,
        second: u64,
        route: Option<&Arc<str>>,
        replica: Option<&Arc<str>>,
        error: bool,
        duration: Duration,
    ) {
        for (map, key) in [(&mut self.routes, route), (&mut self.replicas, replica)] {
            if let Some(key) = key {
                // Looked up by reference first: the key is cloned only for a new entry.
                match map.get_mut(key) {
                    Some(series) => series.record(second, error, duration),
                    None => {
                        let mut series = Series::new();
                        series.record(second, error, duration);
                        map.insert(key.clone(), series);
                    }
                }
            }
        }
    }

    /// Adds this thread's last minute into `totals`. Keys quiet for a whole minute are
    /// forgotten, so replicas that left do not pile up.
    pub fn add_to(&mut self, now: u64, totals: &mut TrafficTotals) {
        for (map, sums) in [
            (&mut self.routes, &mut totals.routes),
            (&mut self.replicas, &mut totals.replicas),
        ] {
            map.retain(|key, series| {
                let mut added = Totals::default();
                let active = series.add_to(now, &mut added);
                if active {
                    let sum = sums.entry(key.clone()).or_default();
                    sum.requests += added.requests;
                    sum.errors += added.errors;
                    for (total, count) in sum.latency.iter_mut().zip(added.latency.iter()) {
                        *total += count;
                    }
                }
                active
            });
        }
    }
}

impl TrafficTotals {
    /// The summaries of every route and every replica, by name.
    pub fn summaries(&self) -> (Named, Named) {
        let named = |sums: &BTreeMap<Arc<str>, Totals>| {
            sums.iter()
                .map(|(key, totals)| (key.clone(), totals.summary()))
                .collect()
        };
        (named(&self.routes), named(&self.replicas))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_of_requests_on_two_threads_gives_their_rate_errors_and_percentiles() {
        let mut threads = [ThreadTraffic::default(), ThreadTraffic::default()];
        let (route, replica): (Arc<str>, Arc<str>) = ("user/login".into(), "a".into());
        let now = second_now();
        for n in 0..100u64 {
            let duration = Duration::from_millis(if n < 98 { 2 } else { 400 });
            let second = now - n % 50;
            threads[n as usize % 2].record(
                second,
                Some(&route),
                Some(&replica),
                n % 10 == 0,
                duration,
            );
        }
        let mut totals = TrafficTotals::default();
        for thread in &mut threads {
            thread.add_to(now, &mut totals);
        }
        let (routes, replicas) = totals.summaries();
        assert_eq!((routes.len(), replicas.len()), (1, 1));
        let (key, route) = &routes[0];
        assert_eq!(&**key, "user/login");
        assert_eq!(route.requests, 100);
        assert_eq!(route.errors, 10);
        assert!((route.error_rate - 0.1).abs() < 1e-9);
        let p50 = route.p50_ms.unwrap();
        assert!((2.0..2.5).contains(&p50), "{p50}");
        let p99 = route.p99_ms.unwrap();
        assert!((400.0..480.0).contains(&p99), "{p99}");
        assert_eq!(replicas[0].1, *route);

        let mut later = TrafficTotals::default();
        for thread in &mut threads {
            thread.add_to(now + 61, &mut later);
        }
        assert_eq!(
            later.summaries(),
            (vec![], vec![]),
            "a quiet minute forgets its keys"
        );
    }

    #[test]
    fn buckets_cover_microseconds_to_a_minute() {
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert!(bucket_of(Duration::from_secs(60)) < BUCKETS - 1);
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
    }
}
