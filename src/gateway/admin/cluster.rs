//! The `/cluster` document: the Go original's shape
//! (`services.{name}.PollNext|Nodes|RequestFinish`, `status`), plus per-node detail under
//! `NodeDetail`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{RateLimitKey, RateLimitPolicy, Route, RouteTable};
use crate::gateway::upstreams::ejection::Ticks;
use crate::gateway::upstreams::Upstreams;
use crate::registry::Members;

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterDocument {
    pub services: BTreeMap<String, ServiceEntry>,
    pub status: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// Index of the node the next request goes to (round robin).
    #[serde(rename = "PollNext")]
    pub poll_next: u64,
    /// Node ids, as registered.
    #[serde(rename = "Nodes")]
    pub nodes: Vec<String>,
    /// Requests this gateway has had answered by the service.
    #[serde(rename = "RequestFinish")]
    pub request_finish: u64,
    #[serde(rename = "NodeDetail")]
    pub node_detail: Vec<NodeDetail>,
    /// Requests to the service in progress at this gateway.
    #[serde(rename = "InFlight", default)]
    pub in_flight: u32,
    /// Requests answered 503 at once because the service's `maxInFlight` were in progress.
    #[serde(rename = "RefusedOverMaxInFlight", default)]
    pub refused_over_max_in_flight: u64,
    /// Retries not made because the service's retry budget was spent.
    #[serde(rename = "RetriesOverBudget", default)]
    pub retries_over_budget: u64,
    /// The service's settings from the route file as in force, and each route's balance and
    /// rate limit; absent where this document came straight from etcd, or for a service the
    /// route file does not name.
    #[serde(rename = "Settings", default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDetail {
    pub id: String,
    pub http: String,
    pub version: String,
    pub zone: String,
    pub weight: u32,
    pub started_at: String,
    /// Last TCP health check result; `None` where this document came straight from etcd.
    pub healthy: Option<bool>,
    pub in_flight: i64,
    pub requests: u64,
    pub failures: u64,
    /// `serving`, or `ejected` while outlier ejection keeps the replica out (its trial request
    /// included); absent where this document came straight from etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Why and for how long the replica is ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejection: Option<EjectionDetail>,
    /// The decaying average of the replica's latency that `balance: least_request` weighs,
    /// in milliseconds; absent before its first answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ewma_ms: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EjectionDetail {
    pub reason: String,
    /// 0 once the ejection is over and the replica waits for, or is serving, its trial request.
    pub time_left_ms: u64,
    /// Ejections since the replica last passed a trial; each lasts twice the one before.
    pub ejections_in_a_row: u32,
}

/// Builds the document from etcd membership and, in a gateway, its live counters and route
/// table.
pub fn cluster_document(
    members: &Members,
    upstreams: Option<&Upstreams>,
    routes: Option<&RouteTable>,
) -> ClusterDocument {
    let mut services = BTreeMap::new();
    let now = Ticks::now();
    for (name, nodes) in &members.services {
        let upstream = upstreams.and_then(|u| u.get(name));
        let states = upstream.as_ref().map(|u| u.nodes()).unwrap_or_default();
        let node_detail = nodes
            .values()
            .map(|info| {
                let state = states.iter().find(|s| s.info.id == info.id);
                NodeDetail {
                    id: info.id.clone(),
                    http: info.http.clone(),
                    version: info.version.clone(),
                    zone: info.zone.clone(),
                    weight: info.weight,
                    started_at: info.started_at.clone(),
                    healthy: match (&upstream, state) {
                        (Some(upstream), Some(state)) => Some(upstream.is_healthy(state)),
                        _ => None,
                    },
                    in_flight: state.map_or(0, |s| s.in_flight.load(Ordering::Relaxed)),
                    requests: state.map_or(0, |s| s.requests.load(Ordering::Relaxed)),
                    failures: state.map_or(0, |s| s.failures.load(Ordering::Relaxed)),
                    state: state.map(|s| {
                        if s.outlier.is_ejected() {
                            "ejected"
                        } else {
                            "serving"
                        }
                        .to_string()
                    }),
                    ejection: state
                        .and_then(|s| s.outlier.view(now))
                        .map(|view| EjectionDetail {
                            reason: view.reason,
                            time_left_ms: view.time_left.as_millis() as u64,
                            ejections_in_a_row: view.ejections_in_a_row,
                        }),
                    latency_ewma_ms: state
                        .and_then(|s| s.latency.average())
                        .map(|average| (average.as_secs_f64() * 1e6).round() / 1e3),
                }
            })
            .collect();
        services.insert(
            name.clone(),
            ServiceEntry {
                poll_next: upstream.as_ref().map_or(0, |u| u.poll_next()),
                nodes: nodes.keys().cloned().collect(),
                request_finish: upstream
                    .as_ref()
                    .map_or(0, |u| u.finished.load(Ordering::Relaxed)),
                node_detail,
                in_flight: upstream.as_ref().map_or(0, |u| u.in_flight()),
                refused_over_max_in_flight: upstream
                    .as_ref()
                    .map_or(0, |u| u.refused_over_cap.load(Ordering::Relaxed)),
                retries_over_budget: upstream
                    .as_ref()
                    .map_or(0, |u| u.retry_budget.refused.load(Ordering::Relaxed)),
                settings: routes.and_then(|table| settings_of(&table.routes_of(name))),
            },
        );
    }
    ClusterDocument {
        services,
        status: true,
    }
}

/// A service's settings as `/cluster` shows them, from its routes (which share its policy).
fn settings_of(routes: &[&Arc<Route>]) -> Option<serde_json::Value> {
    let policy = &routes.first()?.policy;
    let ejection = policy.ejection.map_or(json!(false), |e| {
        json!({
            "consecutiveFailures": e.consecutive_failures,
            "baseTimeMs": e.base_time.as_millis() as u64,
            "maxTimeMs": e.max_time.as_millis() as u64,
            "maxPercent": e.max_percent,
        })
    });
    let budget = &policy.retry_budget;
    let by_route: serde_json::Map<String, serde_json::Value> = routes
        .iter()
        .map(|route| {
            let rate_limit = route
                .rate_limit
                .as_ref()
                .map_or(json!(false), rate_limit_json);
            (
                route.name.clone(),
                json!({"balance": route.balance.to_string(), "rateLimit": rate_limit}),
            )
        })
        .collect();
    Some(json!({
        "balance": policy.balance.to_string(),
        "maxInFlight": policy.max_in_flight,
        "ejection": ejection,
        "retryBudget": {
            "percent": budget.percent,
            "minPerSecond": budget.min_per_second,
            "windowMs": budget.window.as_millis() as u64,
        },
        "routes": by_route,
    }))
}

fn rate_limit_json(limit: &RateLimitPolicy) -> serde_json::Value {
    let key = match &limit.key {
        RateLimitKey::Ip => "ip".to_string(),
        RateLimitKey::Route => "route".to_string(),
        RateLimitKey::Header(name) => format!("header:{name}"),
    };
    json!({
        "requests": limit.requests,
        "perMs": limit.per.as_millis() as u64,
        "burst": limit.burst,
        "key": key,
    })
}
