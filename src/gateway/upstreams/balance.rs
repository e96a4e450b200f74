//! What `balance: least_request` and `balance: {hash: ...}` need beyond the round robin: each
//! replica's decaying average of latency ([`LatencyEwma`]), the power-of-two-choices pick
//! ([`choose_less_loaded`]), the consistent-hash ring ([`Ring`]) and the request's hash key
//! ([`hash_key`]).
//!
//! The latency average lives in the replica's `NodeState`, and the ring in the service's
//! replica snapshot, so both outlive route reloads; a membership change keeps the average of
//! every replica that stays and rebuilds the ring, which moves only the keys of the replicas
//! that came or went.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pingora_ketama::{Bucket, Continuum};

use crate::config::HashOn;

use super::NodeState;

/// How fast the latency average forgets: a sample this old weighs 1/e of a new one
/// (go-zero's and Linkerd's choice).
const DECAY_NANOS: f64 = 10e9;

/// A replica not picked for this long is picked when drawn, even if it is the more loaded of
/// the two: otherwise a replica that was slow once would never be measured again.
const FORCE_PICK_NANOS: u64 = 1_000_000_000;

/// `instant` in nanoseconds on a clock that starts when first read.
pub fn nanos_of(instant: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| Instant::now().min(instant));
    instant.saturating_duration_since(start).as_nanos() as u64 + 1
}

/// A replica's latency, averaged so that each sample weighs by the time since the one before:
/// the average forgets at the same pace whatever the request rate (go-zero's p2c_ewma).
/// Samples race without a lock: one lost among thousands moves nothing.
#[derive(Debug, Default)]
pub struct LatencyEwma {
    /// The average in nanoseconds, as `f64` bits; 0 before the first sample.
    average: AtomicU64,
    /// When the last sample was taken, on [`nanos_of`]'s clock.
    sampled_at: AtomicU64,
    /// When `least_request` last picked the replica, on [`nanos_of`]'s clock.
    picked_at: AtomicU64,
}

impl LatencyEwma {
    /// The average, `None` before the first sample.
    pub fn average(&self) -> Option<Duration> {
        let nanos = f64::from_bits(self.average.load(Ordering::Relaxed));
        (nanos > 0.0).then(|| Duration::from_nanos(nanos as u64))
    }

    /// Adds an attempt that was answered after `latency`.
    pub fn observe(&self, latency: Duration, at: u64) {
        let before = f64::from_bits(self.average.load(Ordering::Relaxed));
        let since = at.saturating_sub(self.sampled_at.swap(at, Ordering::Relaxed));
        let weight_of_before = if before > 0.0 {
            (-(since as f64) / DECAY_NANOS).exp()
        } else {
            0.0
        };
        let sample = latency.as_nanos() as f64;
        let after = before * weight_of_before + sample * (1.0 - weight_of_before);
        self.average.store(after.to_bits(), Ordering::Relaxed);
    }

    /// Adds an attempt that failed after `latency`. A failure never makes a replica look
    /// faster: one that refuses connections at once would otherwise draw more traffic, until
    /// outlier ejection takes it out.
    pub fn observe_failure(&self, latency: Duration, at: u64) {
        let current = self.average().unwrap_or_default();
        self.observe(latency.max(current), at);
    }
}

/// Latencies count from this floor up. Below it, differences between equal replicas are
/// mostly the host's noise (seen here: averages of 1 to 6 ms for three identical replicas), and
/// the replica that happened to measure fastest would draw most requests; requests in flight
/// still tell a replica that slows down within the floor.
const LATENCY_FLOOR_NANOS: f64 = 10e6;

/// A replica's load for the power of two choices: requests in flight (plus one, so that an
/// idle replica's latency still counts) times the square root of its latency average (from
/// [`LATENCY_FLOOR_NANOS`]), over its weight. The square root keeps latency from outweighing
/// in-flight counts: a replica four times slower counts as twice as loaded.
fn load(node: &NodeState) -> f64 {
    let average = f64::from_bits(node.latency.average.load(Ordering::Relaxed));
    let in_flight = node.in_flight.load(Ordering::Relaxed).max(0) as f64;
    (average + LATENCY_FLOOR_NANOS).sqrt() * (in_flight + 1.0) / f64::from(node.info.weight.max(1))
}

/// How much less loaded the challenger must be to be chosen over the round robin's replica:
/// at most two thirds of its load. Equal replicas differ by noise: if any difference decided,
/// the one that happened to measure fastest would take most of the traffic (seen: 280 against
/// 387 of 1,000 requests; with a margin of a quarter, 283 against 421 on a loaded machine).
/// A replica with twice the requests in flight of the other, or one that turned slow, still
/// loses.
const CLEARLY_LESS: f64 = 1.5;

/// Of two replicas, `b` if it is clearly less loaded than `a` ([`CLEARLY_LESS`]), else `a`;
/// but the other one, once, if it has not been picked for [`FORCE_PICK_NANOS`], so that its
/// average follows a recovery. Returns the chosen replica first.
pub fn choose_less_loaded<'a>(
    a: &'a Arc<NodeState>,
    b: &'a Arc<NodeState>,
    now: u64,
) -> (&'a Arc<NodeState>, &'a Arc<NodeState>) {
    let (less, more) = if load(b) * CLEARLY_LESS < load(a) {
        (b, a)
    } else {
        (a, b)
    };
    let picked = more.latency.picked_at.load(Ordering::Relaxed);
    if now.saturating_sub(picked) > FORCE_PICK_NANOS
        && more
            .latency
            .picked_at
            .compare_exchange(picked, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        return (more, less);
    }
    less.latency.picked_at.store(now, Ordering::Relaxed);
    (less, more)
}

/// `next` with another index below `count` (at least 2), drawn at random.
pub fn next_and_another(next: usize, count: usize) -> (usize, usize) {
    let other = fastrand::usize(..count - 1);
    (next, if other >= next { other + 1 } else { other })
}

/// A service's Ketama ring (nginx's and pingora's point layout, 160 points per unit of
/// weight), so every gateway maps a key to the same replica.
pub struct Ring {
    continuum: Continuum,
    replicas: usize,
    points: usize,
}

impl Ring {
    pub fn of<'a>(nodes: impl Iterator<Item = &'a NodeState>) -> Ring {
        let buckets: Vec<Bucket> = nodes
            .map(|node| Bucket::new(node.addr, node.info.weight.max(1)))
            .collect();
        let continuum = Continuum::new(&buckets);
        // The ring's length is not public: count it once by walking it (duplicate points
        // are dropped while it is built).
        let mut index = 0;
        let mut points = 0;
        while continuum.get_addr(&mut index).is_some() {
            points += 1;
            if index == 0 {
                break;
            }
        }
        Ring {
            continuum,
            replicas: buckets.len(),
            points,
        }
    }

    /// The replicas in the order a key tries them: its own first, then the next ones round
    /// the ring, each once.
    pub fn order<'a>(&'a self, key: &[u8]) -> impl Iterator<Item = SocketAddr> + Clone + 'a {
        let mut index = self.continuum.node_idx(key);
        let mut seen: Vec<SocketAddr> = Vec::new();
        std::iter::from_fn(move || self.continuum.get_addr(&mut index).copied())
            .take(self.points)
            .filter(move |addr| {
                let new = !seen.contains(addr);
                if new {
                    seen.push(*addr);
                }
                new
            })
            .take(self.replicas)
    }
}

/// The bytes a `hash` balance hashes for a request: the header's or cookie's value, or the
/// client's address. A request without the header or cookie hashes on its client's address
/// (as APISIX does), so it still keeps one replica while it has no session.
pub fn hash_key(on: &HashOn, headers: &http::HeaderMap, client: Option<IpAddr>) -> Option<Vec<u8>> {
    let by_ip = || client.map(|ip| ip.to_string().into_bytes());
    match on {
        HashOn::Ip => by_ip(),
        HashOn::Header(name) => headers
            .get(name.as_str())
            .map(|value| value.as_bytes().to_vec())
            .or_else(by_ip),
        HashOn::Cookie(name) => cookie(headers, name).map(<[u8]>::to_vec).or_else(by_ip),
    }
}

/// The value of cookie `name` among the request's `Cookie` headers (RFC 6265 5.4: pairs
/// joined by `; `).
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let (key, value) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
            (key == name.as_bytes()).then_some(&value[1..])
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_forgets_at_the_decay_pace_whatever_the_rate() {
        let ewma = LatencyEwma::default();
        ewma.observe(Duration::from_millis(1), 1);
        assert_eq!(ewma.average(), Some(Duration::from_millis(1)));
        // A thousand samples of 201 ms over one second move the average as far as one sample
        // taken after a second would: about 1 - e^-0.1 of the way.
        for step in 1..=1000u64 {
            ewma.observe(Duration::from_millis(201), 1 + step * 1_000_000);
        }
        let moved = ewma.average().unwrap().as_secs_f64() * 1e3 - 1.0;
        let expected = 200.0 * (1.0 - (-0.1f64).exp());
        assert!(
            (moved - expected).abs() < 0.5,
            "moved {moved} ms, not {expected}"
        );
        let single = LatencyEwma::default();
        single.observe(Duration::from_millis(1), 1);
        single.observe(Duration::from_millis(201), 1 + 1_000_000_000);
        let moved_once = single.average().unwrap().as_secs_f64() * 1e3 - 1.0;
        assert!((moved_once - expected).abs() < 0.5);
    }

    #[test]
    fn a_failure_never_lowers_the_average() {
        let ewma = LatencyEwma::default();
        ewma.observe(Duration::from_millis(50), 1);
        ewma.observe_failure(Duration::from_micros(10), 2_000_000_000);
        assert_eq!(ewma.average(), Some(Duration::from_millis(50)));
    }

    #[test]
    fn cookies_and_headers_are_found_and_a_request_without_them_hashes_by_address() {
        let mut headers = http::HeaderMap::new();
        headers.append("cookie", "theme=dark; session=abc".parse().unwrap());
        headers.append("cookie", "other=1".parse().unwrap());
        headers.insert("x-user", "u42".parse().unwrap());
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let key = |on: HashOn| hash_key(&on, &headers, Some(ip));
        assert_eq!(key(HashOn::Cookie("session".into())), Some(b"abc".to_vec()));
        assert_eq!(key(HashOn::Cookie("other".into())), Some(b"1".to_vec()));
        assert_eq!(key(HashOn::Header("x-user".into())), Some(b"u42".to_vec()));
        assert_eq!(
            key(HashOn::Cookie("sess".into())),
            Some(b"10.0.0.7".to_vec())
        );
        assert_eq!(
            key(HashOn::Header("x-none".into())),
            Some(b"10.0.0.7".to_vec())
        );
        assert_eq!(key(HashOn::Ip), Some(b"10.0.0.7".to_vec()));
        assert_eq!(hash_key(&HashOn::Ip, &headers, None), None);
    }
}
