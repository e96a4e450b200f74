//! The per-service settings of the route file: what a service's replicas may cost the gateway
//! and its clients. They sit in a service's map beside its routes, under names no route may
//! take ([`SETTING_KEYS`]):
//!
//! ```yaml
//! services:
//!   user:
//!     login: /login
//!     maxInFlight: 200
//!     ejection: {consecutiveFailures: 5, baseTime: 30s, maxTime: 5m, maxPercent: 50}
//!     retryBudget: {percent: 20, minPerSecond: 10, window: 10s}
//!     balance: least_request          # or round_robin (default), or {hash: "cookie:session"}
//!     grpc: [goms.echo.v1.Echo]       # gRPC services (or packages) served on its `rpc` port
//! ```
//!
//! Every value is checked while it is read, so a refusal names its `file:line`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::routes::DurationText;

/// Keys of a service's map that are settings, not routes.
pub const SETTING_KEYS: &[&str] = &[
    "ejection",
    "retryBudget",
    "maxInFlight",
    "rateLimit",
    "balance",
    "grpc",
];

/// One service's settings, with defaults for what the file leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    /// Passive health: replicas that keep failing are taken out for a while. `None` with
    /// `ejection: false`.
    pub ejection: Option<EjectionPolicy>,
    /// How many retries the service's requests may add.
    pub retry_budget: RetryBudgetPolicy,
    /// Requests to the service in progress at once; `None` for no cap.
    pub max_in_flight: Option<u32>,
    /// The rate limit of each of the service's routes that sets none of its own.
    pub rate_limit: Option<RateLimitPolicy>,
    /// How each of the service's routes that sets none of its own picks a replica.
    pub balance: Balance,
    /// The gRPC services (`goms.echo.v1.Echo`) and packages (`goms.echo`, covering every
    /// service under it) the service's replicas serve on their `rpc` port.
    pub grpc: Vec<String>,
}

impl Default for ServicePolicy {
    fn default() -> Self {
        ServicePolicy {
            ejection: Some(EjectionPolicy::default()),
            retry_budget: RetryBudgetPolicy::default(),
            max_in_flight: None,
            rate_limit: None,
            balance: Balance::RoundRobin,
            grpc: Vec::new(),
        }
    }
}

impl ServicePolicy {
    /// Applies the value of setting `key` (one of [`SETTING_KEYS`]) read from `deserializer`.
    pub(crate) fn set<'de, D: Deserializer<'de>>(
        &mut self,
        key: &str,
        deserializer: D,
    ) -> Result<(), D::Error> {
        match key {
            "ejection" => self.ejection = EjectionSetting::deserialize(deserializer)?.0,
            "retryBudget" => self.retry_budget = RetryBudgetPolicy::deserialize(deserializer)?,
            "maxInFlight" => {
                self.max_in_flight = Some(at_least_one("maxInFlight", deserializer)?);
            }
            "rateLimit" => self.rate_limit = RateLimitSetting::deserialize(deserializer)?.0,
            "balance" => self.balance = Balance::deserialize(deserializer)?,
            "grpc" => self.grpc = grpc_names(deserializer)?,
            other => unreachable!("`{other}` is not in SETTING_KEYS"),
        }
        Ok(())
    }
}

/// Outlier ejection, Envoy's `consecutive_5xx`: failures are 5xx answers, connect errors and
/// timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// Failures in a row that eject a replica.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; each one after it lasts twice the one before.
    pub base_time: Duration,
    /// The longest an ejection lasts.
    pub max_time: Duration,
    /// The largest share of a service's replicas ejected at once, in percent.
    pub max_percent: u32,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        EjectionPolicy {
            consecutive_failures: 5,
            base_time: Duration::from_secs(30),
            max_time: Duration::from_secs(300),
            max_percent: 50,
        }
    }
}

impl EjectionPolicy {
    /// How long ejection number `count` (1 for the first) lasts.
    pub fn ejection_time(&self, count: u32) -> Duration {
        let factor = 1u32
            .checked_shl(count.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_time
            .checked_mul(factor)
            .unwrap_or(self.max_time)
            .min(self.max_time)
    }
}

/// `ejection: false`, or the map of [`EjectionPolicy`] fields.
struct EjectionSetting(Option<EjectionPolicy>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EjectionFields {
    #[serde(default, deserialize_with = "optional_at_least_one")]
    consecutive_failures: Option<u32>,
    #[serde(default)]
    base_time: Option<DurationText>,
    #[serde(default)]
    max_time: Option<DurationText>,
    #[serde(default)]
    max_percent: Option<u32>,
}

impl<'de> Deserialize<'de> for EjectionSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(EjectionVisitor)
    }
}

struct EjectionVisitor;

impl<'de> de::Visitor<'de> for EjectionVisitor {
    type Value = EjectionSetting;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`false`, `true` or a map {consecutiveFailures, baseTime, maxTime, maxPercent}")
    }

    fn visit_bool<E: de::Error>(self, on: bool) -> Result<EjectionSetting, E> {
        Ok(EjectionSetting(on.then(EjectionPolicy::default)))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<EjectionSetting, A::Error> {
        let fields = EjectionFields::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let defaults = EjectionPolicy::default();
        let policy = EjectionPolicy {
            consecutive_failures: fields
                .consecutive_failures
                .unwrap_or(defaults.consecutive_failures),
            base_time: fields.base_time.map_or(defaults.base_time, |t| t.0),
            max_time: fields.max_time.as_ref().map_or(defaults.max_time, |t| t.0),
            max_percent: fields.max_percent.unwrap_or(defaults.max_percent),
        };
        check_ejection(&policy, fields.max_time.is_some()).map_err(de::Error::custom)?;
        Ok(EjectionSetting(Some(policy)))
    }
}

fn check_ejection(policy: &EjectionPolicy, max_time_given: bool) -> Result<(), String> {
    if policy.base_time.is_zero() {
        return Err("`ejection.baseTime` must be longer than 0".into());
    }
    if !(1..=100).contains(&policy.max_percent) {
        return Err(format!(
            "`ejection.maxPercent` must be between 1 and 100 (got {})",
            policy.max_percent
        ));
    }
    if policy.max_time < policy.base_time {
        return Err(if max_time_given {
            format!(
                "`ejection.maxTime` ({:?}) is shorter than `baseTime` ({:?})",
                policy.max_time, policy.base_time
            )
        } else {
            format!(
                "`ejection.baseTime` ({:?}) is longer than the default `maxTime` ({:?}); set `maxTime` too",
                policy.base_time, policy.max_time
            )
        });
    }
    Ok(())
}

/// Linkerd's retry budget: retries may add `percent` of a service's requests over a sliding
/// `window`, and `minPerSecond` retries a second are always allowed, so a service with little
/// traffic can still retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudgetPolicy {
    pub percent: u32,
    pub min_per_second: u32,
    pub window: Duration,
}

impl Default for RetryBudgetPolicy {
    fn default() -> Self {
        RetryBudgetPolicy {
            percent: 20,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// The window's bounds: below a second the budget follows single bursts; past a minute it
/// remembers an outage long after it ended.
const BUDGET_WINDOW: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

impl<'de> Deserialize<'de> for RetryBudgetPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Checked inside the visitor, where the YAML reader still knows the map's position.
        deserializer.deserialize_map(RetryBudgetVisitor)
    }
}

struct RetryBudgetVisitor;

impl<'de> de::Visitor<'de> for RetryBudgetVisitor {
    type Value = RetryBudgetPolicy;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map {percent, minPerSecond, window}")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RetryBudgetPolicy, A::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        struct Fields {
            #[serde(default)]
            percent: Option<u32>,
            #[serde(default)]
            min_per_second: Option<u32>,
            #[serde(default)]
            window: Option<DurationText>,
        }
        let fields = Fields::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let defaults = RetryBudgetPolicy::default();
        let policy = RetryBudgetPolicy {
            percent: fields.percent.unwrap_or(defaults.percent),
            min_per_second: fields.min_per_second.unwrap_or(defaults.min_per_second),
            window: fields.window.map_or(defaults.window, |w| w.0),
        };
        if !(1..=1000).contains(&policy.percent) {
            return Err(de::Error::custom(format!(
                "`retryBudget.percent` must be between 1 and 1000 (got {}); to stop retries, set a route's `retries: 0`",
                policy.percent
            )));
        }
        if policy.window < BUDGET_WINDOW.0 || policy.window > BUDGET_WINDOW.1 {
            return Err(de::Error::custom(format!(
                "`retryBudget.window` must be between 1s and 60s (got {:?})",
                policy.window
            )));
        }
        Ok(policy)
    }
}

/// How a request's replica is picked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each replica in turn, `weight` times (the default).
    #[default]
    RoundRobin,
    /// Power of two choices: of two replicas drawn at random, the one with less load, where
    /// load is requests in flight weighted by a decaying average of latency (go-zero's
    /// p2c_ewma), divided by weight.
    LeastRequest,
    /// Consistent hashing (Ketama) on a key of the request, so the same key keeps its
    /// replica while the replicas stay.
    Hash(HashOn),
}

/// The request's part that [`Balance::Hash`] hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header's value (lowercase name).
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The client's address, after `gateway.trustedProxies`.
    Ip,
}

impl fmt::Display for Balance {
    /// As written in the route file: `round_robin`, `least_request`, `hash header:x-user`.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Balance::RoundRobin => f.write_str("round_robin"),
            Balance::LeastRequest => f.write_str("least_request"),
            Balance::Hash(HashOn::Header(name)) => write!(f, "hash header:{name}"),
            Balance::Hash(HashOn::Cookie(name)) => write!(f, "hash cookie:{name}"),
            Balance::Hash(HashOn::Ip) => f.write_str("hash ip"),
        }
    }
}

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(BalanceVisitor)
    }
}

struct BalanceVisitor;

impl<'de> de::Visitor<'de> for BalanceVisitor {
    type Value = Balance;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`round_robin`, `least_request` or {hash: header:NAME | cookie:NAME | ip}")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Balance, E> {
        match text {
            "round_robin" => Ok(Balance::RoundRobin),
            "least_request" => Ok(Balance::LeastRequest),
            "hash" => Err(E::custom(
                "`balance: hash` needs what to hash: write {hash: header:NAME}, {hash: cookie:NAME} or {hash: ip}",
            )),
            other => Err(E::custom(format!(
                "`balance` must be `round_robin`, `least_request` or {{hash: ...}} (got `{other}`)"
            ))),
        }
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Balance, A::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            hash: String,
        }
        let fields = Fields::deserialize(de::value::MapAccessDeserializer::new(map))?;
        parse_hash_on(&fields.hash)
            .map(Balance::Hash)
            .map_err(de::Error::custom)
    }
}

fn parse_hash_on(text: &str) -> Result<HashOn, String> {
    let valid_header = |name: &str| http::HeaderName::from_bytes(name.as_bytes()).is_ok();
    let valid_cookie = |name: &str| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
    };
    match text.split_once(':') {
        None if text == "ip" => Ok(HashOn::Ip),
        Some(("header", name)) if valid_header(name) => {
            Ok(HashOn::Header(name.to_ascii_lowercase()))
        }
        Some(("cookie", name)) if valid_cookie(name) => Ok(HashOn::Cookie(name.to_string())),
        _ => Err(format!(
            "`balance.hash` must be `header:NAME`, `cookie:NAME` or `ip` (got `{text}`)"
        )),
    }
}

/// A token bucket per key: `requests` every `per`, with room for `burst` at once (default
/// `requests`). Past it, a 429 with `Retry-After` and the IETF draft's `RateLimit` headers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimitPolicy {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
    pub key: RateLimitKey,
}

/// Whose requests share a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateLimitKey {
    /// The client's address, after `gateway.trustedProxies`.
    Ip,
    /// The value of a request header (lowercase name); a request without it counts by address.
    Header(String),
    /// Every request of the route: one bucket.
    Route,
}

/// `rateLimit: false` (on a route: none, whatever its service sets), or the map.
pub(crate) struct RateLimitSetting(pub Option<RateLimitPolicy>);

impl<'de> Deserialize<'de> for RateLimitSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RateLimitVisitor)
    }
}

struct RateLimitVisitor;

impl<'de> de::Visitor<'de> for RateLimitVisitor {
    type Value = RateLimitSetting;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`false` or a map {requests, per, burst, key}")
    }

    fn visit_bool<E: de::Error>(self, on: bool) -> Result<RateLimitSetting, E> {
        if on {
            return Err(E::custom(
                "`rateLimit: true` says no limit: write {requests: N, per: 1s}",
            ));
        }
        Ok(RateLimitSetting(None))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RateLimitSetting, A::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            #[serde(deserialize_with = "requests_at_least_one")]
            requests: u32,
            #[serde(default)]
            per: Option<DurationText>,
            #[serde(default)]
            burst: Option<u32>,
            #[serde(default)]
            key: Option<String>,
        }
        let fields = Fields::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let per = fields.per.map_or(Duration::from_secs(1), |p| p.0);
        if per < Duration::from_millis(1) || per > Duration::from_secs(86_400) {
            return Err(de::Error::custom(format!(
                "`rateLimit.per` must be between 1ms and 24h (got {per:?})"
            )));
        }
        let burst = fields.burst.unwrap_or(fields.requests);
        if burst == 0 {
            return Err(de::Error::custom("`rateLimit.burst` must be at least 1"));
        }
        let key = parse_rate_limit_key(fields.key.as_deref().unwrap_or("ip"))
            .map_err(de::Error::custom)?;
        Ok(RateLimitSetting(Some(RateLimitPolicy {
            requests: fields.requests,
            per,
            burst,
            key,
        })))
    }
}

fn parse_rate_limit_key(text: &str) -> Result<RateLimitKey, String> {
    match text.split_once(':') {
        None if text == "ip" => Ok(RateLimitKey::Ip),
        None if text == "route" => Ok(RateLimitKey::Route),
        Some(("header", name)) if http::HeaderName::from_bytes(name.as_bytes()).is_ok() => {
            Ok(RateLimitKey::Header(name.to_ascii_lowercase()))
        }
        _ => Err(format!(
            "`rateLimit.key` must be `ip`, `route` or `header:NAME` (got `{text}`)"
        )),
    }
}

fn requests_at_least_one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    at_least_one("rateLimit.requests", deserializer)
}

/// A count that must be at least one, read as a signed number so that `-1` gets this message
/// rather than serde's "expected u32", and refused inside the visitor so that the message
/// carries the number's line.
/// `grpc:`, a list of gRPC service or package names, each a dotted name as in a `.proto`.
/// Each name is checked as it is read, so that a refusal points at its own line.
fn grpc_names<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    deserializer.deserialize_seq(GrpcNamesVisitor)
}

struct GrpcNamesVisitor;

impl<'de> de::Visitor<'de> for GrpcNamesVisitor {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of gRPC service or package names, such as [goms.echo.v1.Echo]")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut names = Vec::new();
        while let Some(GrpcName(name)) = seq.next_element()? {
            names.push(name);
        }
        if names.is_empty() {
            return Err(de::Error::custom(
                "grpc lists no names: give a gRPC service such as `goms.echo.v1.Echo`, or a \
                 package",
            ));
        }
        Ok(names)
    }
}

/// One name of `grpc:`: dotted words of letters, digits and `_`.
struct GrpcName(String);

impl<'de> Deserialize<'de> for GrpcName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        let well_formed = name.split('.').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if !well_formed {
            return Err(de::Error::custom(format!(
                "grpc name `{name}` is not a gRPC service or package name (dotted words such as \
                 `goms.echo.v1.Echo`)"
            )));
        }
        Ok(GrpcName(name))
    }
}

fn at_least_one<'de, D: Deserializer<'de>>(
    name: &'static str,
    deserializer: D,
) -> Result<u32, D::Error> {
    deserializer.deserialize_i64(AtLeastOne(name))
}

fn optional_at_least_one<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    at_least_one("ejection.consecutiveFailures", deserializer).map(Some)
}

struct AtLeastOne(&'static str);

impl AtLeastOne {
    fn refuse<E: de::Error>(&self, got: impl fmt::Display) -> E {
        E::custom(format!(
            "`{}` must be a whole number from 1 to {} (got {got})",
            self.0,
            u32::MAX
        ))
    }
}

impl de::Visitor<'_> for AtLeastOne {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a whole number of at least 1 for `{}`", self.0)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u32, E> {
        u32::try_from(value)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| self.refuse(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u32, E> {
        u32::try_from(value)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| self.refuse(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ejection_lasts_twice_the_one_before_up_to_the_maximum() {
        let policy = EjectionPolicy {
            base_time: Duration::from_secs(30),
            max_time: Duration::from_secs(300),
            ..EjectionPolicy::default()
        };
        let times: Vec<u64> = (1..=6).map(|n| policy.ejection_time(n).as_secs()).collect();
        assert_eq!(times, [30, 60, 120, 240, 300, 300]);
        assert_eq!(policy.ejection_time(200), Duration::from_secs(300));
    }
}
