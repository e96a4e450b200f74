//! Requests/s, error rate and latency percentiles over the last minute, per route and per
//! replica: a ring of per-second counts and of 10-second latency histograms for each.
//! `/metrics` keeps its own counters; these exist for the dashboard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::trace::millis;

const WINDOW_SECONDS: u64 = 60;
const SLOT_SECONDS: u64 = 10;
const SLOTS: usize = (WINDOW_SECONDS / SLOT_SECONDS) as usize;
/// Latency buckets: four per doubling, from 1 µs to about 4.5 minutes.
const PER_OCTAVE: f64 = 4.0;
const BUCKETS: usize = 112;

/// The traffic of every route and replica seen in the last minute.
#[derive(Default)]
pub struct TrafficWindow {
    series: Mutex<Keys>,
}

#[derive(Default)]
struct Keys {
    routes: HashMap<Arc<str>, Series>,
    replicas: HashMap<Arc<str>, Series>,
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

    fn summary(&self, now: u64) -> TrafficSummary {
        let recent = |second: u64| second + WINDOW_SECONDS > now && second <= now;
        let (requests, errors) = self
            .seconds
            .iter()
            .filter(|(second, ..)| recent(*second))
            .fold((0u64, 0u64), |(r, e), (_, requests, errors)| {
                (r + u64::from(*requests), e + u64::from(*errors))
            });
        let mut merged = [0u64; BUCKETS];
        for (slot, histogram) in &self.latency {
            if recent(slot * SLOT_SECONDS) || recent(slot * SLOT_SECONDS + SLOT_SECONDS - 1) {
                for (total, count) in merged.iter_mut().zip(histogram.iter()) {
                    *total += u64::from(*count);
                }
            }
        }
        TrafficSummary {
            requests,
            requests_per_second: requests as f64 / WINDOW_SECONDS as f64,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p50_ms: percentile(&merged, 0.50),
            p99_ms: percentile(&merged, 0.99),
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

fn second_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TrafficWindow {
    /// Counts one request under its route and its replica, where it had them.
    pub fn record(
        &self,
        route: Option<&Arc<str>>,
        replica: Option<&Arc<str>>,
        error: bool,
        duration: Duration,
    ) {
        let second = second_now();
        let mut keys = super::lock(&self.series);
        let keys = &mut *keys;
        for (map, key) in [(&mut keys.routes, route), (&mut keys.replicas, replica)] {
            if let Some(key) = key {
                map.entry(key.clone())
                    .or_insert_with(Series::new)
                    .record(second, error, duration);
            }
        }
    }

    /// The last minute of every route and every replica that had traffic in it, by name.
    pub fn summaries(&self) -> (Named, Named) {
        let now = second_now();
        let mut keys = super::lock(&self.series);
        let keys = &mut *keys;
        let summaries = |map: &mut HashMap<Arc<str>, Series>| {
            // Keys quiet for a whole minute are forgotten, so replicas that left do not pile up.
            map.retain(|_, s| s.summary(now).requests > 0);
            let mut all: Vec<_> = map
                .iter()
                .map(|(k, s)| (k.clone(), s.summary(now)))
                .collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            all
        };
        (summaries(&mut keys.routes), summaries(&mut keys.replicas))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_of_requests_gives_their_rate_errors_and_percentiles() {
        let window = TrafficWindow::default();
        let (route, replica): (Arc<str>, Arc<str>) = ("user/login".into(), "a".into());
        for n in 0..100u64 {
            let duration = Duration::from_millis(if n < 98 { 2 } else { 400 });
            window.record(Some(&route), Some(&replica), n % 10 == 0, duration);
        }
        let (routes, replicas) = window.summaries();
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
    }

    #[test]
    fn buckets_cover_microseconds_to_a_minute() {
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert!(bucket_of(Duration::from_secs(60)) < BUCKETS - 1);
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
    }
}
