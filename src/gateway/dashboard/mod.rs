//! The dashboard on the admin listener: `/ui`, one page of plain HTML, CSS and JavaScript
//! embedded in the binary, and the JSON it reads under `/ui/api/` (documented in
//! `docs/dashboard.md`, for scripts too). Only admin-listener clients reach it.
//!
//! - `recent`: the last 1,000 requests this gateway handled, for the list and the timelines.
//! - `traffic`: requests/s, error rate and p50/p99 per route and per replica over a minute.
//! - this file: what the request path records, and the endpoints.
//!
//! The service side of a timeline comes from Elasticsearch (`esAddr`, `trace_logs*` by
//! `requestId`); when Elasticsearch cannot be reached, the answer says so and holds the
//! gateway's part.

mod recent;
mod traffic;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

pub use recent::{RecentRequests, RequestFilter, SeenAttempt, SeenRequest};
pub use traffic::{TrafficSummary, TrafficWindow};

use super::route_store::RouteStore;
use super::upstreams::Upstreams;
use crate::indexer::TraceIndex;
use crate::registry::Members;
use crate::trace::rfc3339;

const PAGE: &str = include_str!("page.html");
/// The service that gateways register as.
const GATEWAYS: &str = "gateway";

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the dashboard keeps, and where it looks for the services' events.
pub struct Dashboard {
    recent: RecentRequests,
    traffic: TrafficWindow,
    /// The last failed attempt at each replica: when, and why.
    last_failure: Mutex<HashMap<String, (String, String)>>,
    index: Option<TraceIndex>,
    es_addr: String,
    kibana_url: Option<String>,
}

/// One answer of the dashboard.
pub struct Page {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Page {
    fn json(status: u16, document: &Value) -> Page {
        Page {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(document).expect("JSON serialises"),
        }
    }
}

/// What the topology is read from.
pub struct Sources<'a> {
    pub members: &'a Members,
    pub upstreams: &'a Upstreams,
    pub routes: &'a RouteStore,
}

impl Dashboard {
    pub fn new(es_addr: &str, index_prefix: &str, kibana_url: Option<String>) -> Dashboard {
        Dashboard {
            recent: RecentRequests::default(),
            traffic: TrafficWindow::default(),
            last_failure: Mutex::default(),
            index: TraceIndex::new(es_addr, index_prefix).ok(),
            es_addr: es_addr.to_string(),
            kibana_url: kibana_url.map(|url| url.trim_end_matches('/').to_string()),
        }
    }

    /// Records a request that ended: into the ring, the traffic of its route and replica,
    /// and the replicas' last failures.
    pub fn record(&self, seen: SeenRequest, route: Option<&Arc<str>>) {
        let error = seen.status == 0 || seen.status >= 500;
        let duration = Duration::from_secs_f64(seen.duration_ms / 1000.0);
        self.traffic
            .record(route, seen.replica.as_ref(), error, duration);
        let failed: Vec<&SeenAttempt> = seen
            .attempts
            .iter()
            .filter(|a| a.error.is_some() || a.status.is_some_and(|s| s >= 500))
            .collect();
        if !failed.is_empty() {
            let mut last_failure = lock(&self.last_failure);
            for attempt in failed {
                // A status says it in a word; pingora's error text for it is a dump.
                let why = match (attempt.status, &attempt.error) {
                    (Some(status), _) => format!("answered {status}"),
                    (None, Some(error)) => error.trim().to_string(),
                    (None, None) => "failed".into(),
                };
                last_failure.insert(attempt.replica.to_string(), (seen.time.clone(), why));
            }
        }
        self.recent.push(seen);
    }

    /// The answer for a `/ui` path (with its query), or `None` when it is none of the
    /// dashboard's.
    pub async fn answer(
        &self,
        path: &str,
        query: Option<&str>,
        sources: Sources<'_>,
    ) -> Option<Page> {
        let page = || Page {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: PAGE.as_bytes().to_vec(),
        };
        match path {
            "/ui" | "/ui/" => Some(page()),
            _ if path.starts_with("/ui/trace/") => Some(page()),
            "/ui/api/topology" => Some(Page::json(200, &self.topology(&sources))),
            "/ui/api/traffic" => Some(Page::json(200, &self.traffic_document())),
            "/ui/api/requests" => Some(Page::json(200, &self.requests_document(query))),
            _ => {
                let id = path.strip_prefix("/ui/api/trace/")?;
                let id = percent_decode(id);
                Some(Page::json(200, &self.trace_document(&id).await))
            }
        }
    }

    /// Services with their routes and replicas (health, last failure, time since join),
    /// and the gateways.
    pub fn topology(&self, sources: &Sources<'_>) -> Value {
        let routes = sources.routes.current();
        let mut services: BTreeMap<String, Value> = BTreeMap::new();
        for route in routes.all() {
            let entry = services
                .entry(route.service.to_string())
                .or_insert_with(|| json!({"routes": [], "replicas": []}));
            entry["routes"].as_array_mut().expect("an array").push(json!({
                "name": route.name,
                "path": route.path,
                "url": format!("/api/{}/{}", route.service, route.name),
                "methods": route.methods.as_ref().map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>()),
                "timeoutMs": route.timeout.as_millis() as u64,
                "retries": route.retries,
            }));
        }
        let last_failure = lock(&self.last_failure);
        let now = SystemTime::now();
        for (name, nodes) in &sources.members.services {
            if name == GATEWAYS {
                continue;
            }
            let upstream = sources.upstreams.get(name);
            let states = upstream.as_ref().map(|u| u.nodes()).unwrap_or_default();
            let replicas: Vec<Value> = nodes
                .values()
                .map(|info| {
                    let state = states.iter().find(|s| s.info.id == info.id);
                    let healthy = match (&upstream, state) {
                        (Some(upstream), Some(state)) => upstream.is_healthy(state),
                        _ => false,
                    };
                    let failure = last_failure.get(&info.id);
                    json!({
                        "id": info.id,
                        "address": info.http,
                        "version": info.version,
                        "zone": info.zone,
                        "weight": info.weight,
                        "health": if healthy { "healthy" } else { "failing" },
                        "lastError": failure.map(|(_, why)| why),
                        "lastErrorAt": failure.map(|(at, _)| at),
                        "joinedAt": info.started_at,
                        "upForSeconds": seconds_since(&info.started_at, now),
                        "requests": state.map(|s| s.requests.load(std::sync::atomic::Ordering::Relaxed)),
                    })
                })
                .collect();
            let entry = services
                .entry(name.clone())
                .or_insert_with(|| json!({"routes": [], "replicas": []}));
            entry["replicas"] = Value::Array(replicas);
        }
        let gateways: Vec<Value> = sources
            .members
            .services
            .get(GATEWAYS)
            .map(|nodes| {
                nodes
                    .values()
                    .map(|info| {
                        json!({
                            "id": info.id,
                            "address": info.http,
                            "version": info.version,
                            "joinedAt": info.started_at,
                            "upForSeconds": seconds_since(&info.started_at, now),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        json!({"services": services, "gateways": gateways, "time": rfc3339(now)})
    }

    pub fn traffic_document(&self) -> Value {
        let (routes, replicas) = self.traffic.summaries();
        let as_map =
            |summaries: Vec<(Arc<str>, TrafficSummary)>| -> BTreeMap<String, TrafficSummary> {
                summaries
                    .into_iter()
                    .map(|(k, s)| (k.to_string(), s))
                    .collect()
            };
        json!({"windowSeconds": 60, "routes": as_map(routes), "replicas": as_map(replicas)})
    }

    /// `?status=5xx&service=user&requestId=...`, each optional.
    pub fn requests_document(&self, query: Option<&str>) -> Value {
        let mut filter = RequestFilter::default();
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let value = Some(value.into_owned()).filter(|v| !v.is_empty());
            match key.as_ref() {
                "status" => filter.status_class = value,
                "service" => filter.service = value,
                "requestId" => filter.request_id = value,
                _ => {}
            }
        }
        let requests = self.recent.list(&filter);
        json!({"kept": recent::KEPT, "requests": requests})
    }

    /// A request's timeline: the gateway's part from the ring, the services' events from
    /// Elasticsearch.
    pub async fn trace_document(&self, request_id: &str) -> Value {
        let gateway = self.recent.find(request_id);
        let (events, elasticsearch) = match &self.index {
            None => (
                Vec::new(),
                json!({"reachable": false, "error": format!("esAddr {} is not a URL", self.es_addr)}),
            ),
            Some(index) => {
                match tokio::time::timeout(ELASTICSEARCH_WAIT, index.events_of(request_id)).await {
                    Ok(Ok(events)) => (events, json!({"reachable": true})),
                    Ok(Err(error)) => (
                        Vec::new(),
                        json!({"reachable": false, "error": error.to_string()}),
                    ),
                    Err(_) => (
                        Vec::new(),
                        json!({"reachable": false, "error": format!(
                            "Elasticsearch did not answer within {} s; the services' part is \
                             left out", ELASTICSEARCH_WAIT.as_secs())}),
                    ),
                }
            }
        };
        let kibana = self.kibana_url.as_ref().map(|base| {
            format!(
                "{base}/app/discover#/?_a=(query:(language:kuery,query:'requestId:\"{}\"'))",
                request_id.replace(['\'', '"'], "")
            )
        });
        json!({
            "requestId": request_id,
            "gateway": gateway,
            "events": events,
            "elasticsearch": elasticsearch,
            "kibana": kibana,
        })
    }
}

/// How long a request's timeline waits for the services' events: an Elasticsearch that
/// black-holes must not hold the page, which still has the gateway's part to show.
const ELASTICSEARCH_WAIT: Duration = Duration::from_secs(2);

/// Seconds from an RFC 3339 time (as nodes register it) to `now`.
fn seconds_since(rfc3339_time: &str, now: SystemTime) -> Option<u64> {
    let then = crate::config::parse_rfc3339(rfc3339_time)?;
    now.duration_since(then).ok().map(|d| d.as_secs())
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}
