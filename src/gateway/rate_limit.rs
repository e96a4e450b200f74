//! Rate limits: a token bucket per key (client address, a header's value, or the whole route)
//! for each route with a `rateLimit`. A request past its bucket gets a 429 envelope with
//! `Retry-After`, and every answer of a limited route carries the IETF draft's
//! `RateLimit-Policy` and `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers).
//!
//! Each gateway limits on its own. The buckets outlive route reloads that leave a route's limit
//! as it was ([`RateLimits::follow`]); a changed limit starts with full buckets.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use pingora::http::RequestHeader;

use super::upstreams::ejection::Ticks;
use crate::config::{RateLimitKey, RateLimitPolicy, RouteTable};

/// Buckets kept per route before idle (full) ones are dropped; a full bucket is the same as
/// none, so dropping it changes no answer. Past it even with every bucket busy, the oldest
/// are dropped: a client that sends a new key per request gets no more than a fresh bucket.
const MAX_KEYS_PER_ROUTE: usize = 100_000;
const SHARDS: usize = 16;

/// A token bucket in thousandths of a request, so refills need no floating point.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli_tokens: u64,
    last: Ticks,
}

/// What a request got from its bucket, for the answer's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Whole requests left in the bucket.
    pub remaining: u64,
    /// Seconds until the bucket is full again (the draft's `t`).
    pub reset_secs: u64,
    /// Seconds until one more request is allowed (`Retry-After`), at least 1 when refused.
    pub retry_after_secs: u64,
}

/// One route's limit and its buckets.
pub struct RouteLimiter {
    pub policy: RateLimitPolicy,
    shards: [Mutex<HashMap<BucketKey, Bucket>>; SHARDS],
    hasher: std::collections::hash_map::RandomState,
    /// Requests refused, for `/metrics`.
    pub refused: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BucketKey {
    Ip(IpAddr),
    Header(Box<[u8]>),
    Route,
}

impl RouteLimiter {
    pub fn new(policy: RateLimitPolicy) -> Self {
        RouteLimiter {
            policy,
            shards: Default::default(),
            hasher: Default::default(),
            refused: AtomicU64::new(0),
        }
    }

    /// Takes one request out of the bucket of the request's key.
    pub fn check(&self, request: &RequestHeader, client: Option<IpAddr>, now: Ticks) -> Decision {
        let key = self.key_of(request, client);
        let shard = &self.shards[self.hasher.hash_one(&key) as usize % SHARDS];
        let mut buckets = shard.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_KEYS_PER_ROUTE / SHARDS && !buckets.contains_key(&key) {
            self.make_room(&mut buckets, now);
        }
        let capacity = u64::from(self.policy.burst) * 1000;
        let bucket = buckets.entry(key).or_insert(Bucket {
            milli_tokens: capacity,
            last: now,
        });
        let decision = take(bucket, &self.policy, now);
        if !decision.allowed {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        decision
    }

    fn key_of(&self, request: &RequestHeader, client: Option<IpAddr>) -> BucketKey {
        let by_ip = || client.map_or(BucketKey::Route, BucketKey::Ip);
        match &self.policy.key {
            RateLimitKey::Route => BucketKey::Route,
            RateLimitKey::Ip => by_ip(),
            RateLimitKey::Header(name) => match request.headers.get(name.as_str()) {
                Some(value) => BucketKey::Header(value.as_bytes().into()),
                None => by_ip(),
            },
        }
    }

    /// Drops the buckets that have refilled (they are as good as new), then, if that freed
    /// nothing, the half that were used longest ago.
    fn make_room(&self, buckets: &mut HashMap<BucketKey, Bucket>, now: Ticks) {
        let capacity = u64::from(self.policy.burst) * 1000;
        buckets.retain(|_, bucket| refilled(bucket, &self.policy, now).milli_tokens < capacity);
        if buckets.len() >= MAX_KEYS_PER_ROUTE / SHARDS {
            let mut ages: Vec<u64> = buckets.values().map(|b| b.last.0).collect();
            let middle = ages.len() / 2;
            let (_, median, _) = ages.select_nth_unstable(middle);
            let median = *median;
            buckets.retain(|_, bucket| bucket.last.0 > median);
        }
    }
}

/// `bucket` refilled up to `now` at `requests` per `per`. The clock moves on only by the time
/// the refill used, so the remainder of a thousandth is not lost when requests come faster
/// than a thousandth refills (a slow limit under a fast client would never refill).
fn refilled(bucket: &Bucket, policy: &RateLimitPolicy, now: Ticks) -> Bucket {
    let capacity = u64::from(policy.burst) * 1000;
    let elapsed_ms = now.0.saturating_sub(bucket.last.0);
    let per_ms = (policy.per.as_millis() as u64).max(1);
    let rate = u64::from(policy.requests) * 1000;
    let refill = elapsed_ms.saturating_mul(rate) / per_ms;
    let tokens = bucket.milli_tokens.saturating_add(refill);
    if tokens >= capacity {
        return Bucket {
            milli_tokens: capacity,
            last: now,
        };
    }
    Bucket {
        milli_tokens: tokens,
        last: Ticks(bucket.last.0 + refill * per_ms / rate),
    }
}

fn take(bucket: &mut Bucket, policy: &RateLimitPolicy, now: Ticks) -> Decision {
    let capacity = u64::from(policy.burst) * 1000;
    *bucket = refilled(bucket, policy, now);
    let allowed = bucket.milli_tokens >= 1000;
    if allowed {
        bucket.milli_tokens -= 1000;
    }
    let tokens = bucket.milli_tokens;
    let per_ms = (policy.per.as_millis() as u64).max(1);
    let per_request_ms = per_ms.div_ceil(u64::from(policy.requests));
    let ms_for = |milli: u64| (milli * per_request_ms).div_ceil(1000);
    Decision {
        allowed,
        remaining: tokens / 1000,
        reset_secs: ms_for(capacity - tokens).div_ceil(1000),
        retry_after_secs: ms_for(1000u64.saturating_sub(tokens))
            .div_ceil(1000)
            .max(u64::from(!allowed)),
    }
}

/// The limiters of every limited route, by route key, swapped when the route table changes.
#[derive(Default)]
pub struct RateLimits {
    routes: ArcSwap<HashMap<Arc<str>, Arc<RouteLimiter>>>,
}

impl RateLimits {
    pub fn get(&self, route: &str) -> Option<Arc<RouteLimiter>> {
        self.routes.load().get(route).cloned()
    }

    /// Brings the limiters in line with `table`: a route whose limit is unchanged keeps its
    /// buckets.
    pub fn follow(&self, table: &RouteTable) {
        let current = self.routes.load_full();
        let next = table
            .all()
            .into_iter()
            .filter_map(|route| {
                let policy = route.rate_limit.clone()?;
                let limiter = match current.get(&route.key) {
                    Some(existing) if existing.policy == policy => existing.clone(),
                    _ => Arc::new(RouteLimiter::new(policy)),
                };
                Some((route.key.clone(), limiter))
            })
            .collect();
        self.routes.store(Arc::new(next));
    }

    /// Every limited route with its refusals, for `/metrics`.
    pub fn all(&self) -> Vec<(Arc<str>, Arc<RouteLimiter>)> {
        let mut all: Vec<_> = self
            .routes
            .load()
            .iter()
            .map(|(key, limiter)| (key.clone(), limiter.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// `RateLimit-Policy` and `RateLimit` for an answer, and `Retry-After` too for a refusal.
pub fn headers(
    policy: &RateLimitPolicy,
    decision: &Decision,
) -> Vec<(http::header::HeaderName, http::HeaderValue)> {
    let value = |text: String| {
        http::HeaderValue::try_from(text).expect("digits, quotes and separators are a valid value")
    };
    let mut headers = vec![
        (
            http::header::HeaderName::from_static("ratelimit-policy"),
            value(policy_header(policy)),
        ),
        (
            http::header::HeaderName::from_static("ratelimit"),
            value(state_header(decision)),
        ),
    ];
    if !decision.allowed {
        headers.push((
            http::header::RETRY_AFTER,
            value(decision.retry_after_secs.to_string()),
        ));
    }
    headers
}

/// `RateLimit-Policy` for `policy`: `"route";q=REQUESTS;w=SECONDS` (burst as the quota).
pub fn policy_header(policy: &RateLimitPolicy) -> String {
    let window = policy.per.as_secs().max(1);
    format!("\"route\";q={};w={window}", policy.burst)
}

/// `RateLimit` for `decision`: `"route";r=REMAINING;t=SECONDS`.
pub fn state_header(decision: &Decision) -> String {
    format!(
        "\"route\";r={};t={}",
        decision.remaining, decision.reset_secs
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limiter(requests: u32, per: Duration, burst: u32, key: RateLimitKey) -> RouteLimiter {
        RouteLimiter::new(RateLimitPolicy {
            requests,
            per,
            burst,
            key,
        })
    }

    fn request(header: Option<&str>) -> RequestHeader {
        let mut request = RequestHeader::build("GET", b"/api/user/login", None).unwrap();
        if let Some(value) = header {
            request.insert_header("x-api-key", value).unwrap();
        }
        request
    }

    #[test]
    fn at_twice_the_limit_the_share_served_is_the_limit_and_another_key_is_untouched() {
        let limiter = limiter(10, Duration::from_secs(1), 10, RateLimitKey::Ip);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut served = 0;
        // 20 requests a second for 60 s of the test's clock, evenly spaced.
        for n in 0..1_200u64 {
            let now = Ticks(1 + n * 50);
            if limiter.check(&request(None), Some(a), now).allowed {
                served += 1;
            }
            if n % 20 == 0 {
                assert!(
                    limiter.check(&request(None), Some(b), now).allowed,
                    "one request a second from another client is never refused"
                );
            }
        }
        // 10 a second for 60 s, plus the first burst of 10.
        assert!((600..=611).contains(&served), "{served}");
        assert_eq!(limiter.refused.load(Ordering::Relaxed), 1_200 - served);
    }

    #[test]
    fn a_burst_is_served_at_once_and_the_answer_says_when_to_come_back() {
        let limiter = limiter(2, Duration::from_secs(10), 3, RateLimitKey::Route);
        let now = Ticks(1_000);
        let decisions: Vec<Decision> = (0..4)
            .map(|_| limiter.check(&request(None), None, now))
            .collect();
        assert_eq!(
            decisions.iter().map(|d| d.allowed).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(decisions[0].remaining, 2);
        // One request every 5 s: the refused one may come back in 5 s, the bucket is full in 15.
        assert_eq!(decisions[3].retry_after_secs, 5);
        assert_eq!(decisions[3].reset_secs, 15);
        let later = limiter.check(&request(None), None, Ticks(6_000));
        assert!(later.allowed);
        assert_eq!(policy_header(&limiter.policy), "\"route\";q=3;w=10");
        assert_eq!(state_header(&later), "\"route\";r=0;t=15");
    }

    #[test]
    fn a_slow_limit_refills_under_a_client_faster_than_its_refill() {
        let limiter = limiter(1, Duration::from_secs(60), 1, RateLimitKey::Route);
        // A request every millisecond for three minutes: each refills 1/60,000 of a request.
        let served = (0..180_000u64)
            .filter(|n| limiter.check(&request(None), None, Ticks(1 + n)).allowed)
            .count();
        assert_eq!(served, 3, "one at once, then one a minute");
    }

    #[test]
    fn a_header_key_counts_each_value_apart_and_a_request_without_it_by_address() {
        let limiter = limiter(
            1,
            Duration::from_secs(60),
            1,
            RateLimitKey::Header("x-api-key".into()),
        );
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Ticks(1);
        assert!(
            limiter
                .check(&request(Some("alpha")), Some(ip), now)
                .allowed
        );
        assert!(
            !limiter
                .check(&request(Some("alpha")), Some(ip), now)
                .allowed
        );
        assert!(limiter.check(&request(Some("beta")), Some(ip), now).allowed);
        assert!(limiter.check(&request(None), Some(ip), now).allowed);
        assert!(!limiter.check(&request(None), Some(ip), now).allowed);
    }

    #[test]
    fn a_client_that_sends_a_new_key_every_time_cannot_grow_the_table_without_bound() {
        let limiter = limiter(
            1,
            Duration::from_secs(60),
            1,
            RateLimitKey::Header("x-api-key".into()),
        );
        for n in 0..(MAX_KEYS_PER_ROUTE as u64 * 2) {
            limiter.check(&request(Some(&n.to_string())), None, Ticks(1 + n / 1000));
        }
        let kept: usize = limiter.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(kept <= MAX_KEYS_PER_ROUTE, "{kept}");
    }
}
