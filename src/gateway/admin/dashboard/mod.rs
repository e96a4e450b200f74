//! The dashboard on the admin listener: `/ui`, one page of plain HTML, CSS and JavaScript
//! embedded in the binary, and the JSON it reads under `/ui/api/` (documented in
//! `docs/dashboard.md`, for scripts too). Only admin-listener clients reach it.
//!
//! It reads what the request path records ([`RequestLog`]): the last 1,000 requests for the
//! list and the timelines, and requests/s, error rate and p50/p99 per route and replica over
//! a minute. It never writes there.
//!
//! The service side of a timeline comes from Elasticsearch (`esAddr`, `trace_logs*` by
//! `requestId`); when Elasticsearch cannot be reached, the answer says so and holds the
//! gateway's part.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::gateway::request_log::recent::{self, RequestFilter};
use crate::gateway::request_log::traffic::TrafficSummary;
use crate::gateway::request_log::{Failure, RequestLog};
use crate::gateway::route_store::RouteStore;
use crate::gateway::upstreams::Upstreams;
use crate::registry::Members;
use crate::trace::rfc3339;
use crate::trace::search::TraceIndex;

const PAGE: &str = include_str!("page.html");
/// The service that gateways register as.
const GATEWAYS: &str = "gateway";

/// What the dashboard keeps, and where it looks for the services' events.
pub struct Dashboard {
    log: Arc<RequestLog>,
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
    pub fn new(
        log: Arc<RequestLog>,
        es_addr: &str,
        index_prefix: &str,
        kibana_url: Option<String>,
    ) -> Dashboard {
        Dashboard {
            log,
            index: TraceIndex::new(es_addr, index_prefix).ok(),
            es_addr: es_addr.to_string(),
            kibana_url: kibana_url.map(|url| url.trim_end_matches('/').to_string()),
        }
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
        let last_failure = self.log.last_failures();
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
                    let failure = last_failure.get(info.id.as_str());
                    json!({
                        "id": info.id,
                        "address": info.http,
                        "version": info.version,
                        "zone": info.zone,
                        "weight": info.weight,
                        "health": match (healthy, state.is_some_and(|s| s.outlier.is_ejected())) {
                            (_, true) => "ejected",
                            (true, false) => "healthy",
                            (false, false) => "failing",
                        },
                        "lastError": failure.map(Failure::why),
                        "lastErrorAt": failure.map(|failure| rfc3339(failure.at)),
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
        let (routes, replicas) = self.log.traffic().summaries();
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
        let requests = self.log.requests(&filter);
        json!({"kept": recent::KEPT, "requests": requests})
    }

    /// A request's timeline: the gateway's part from the ring, the services' events from
    /// Elasticsearch.
    pub async fn trace_document(&self, request_id: &str) -> Value {
        let by_id = RequestFilter {
            request_id: Some(request_id.to_string()),
            ..RequestFilter::default()
        };
        let gateway = self.log.requests(&by_id).into_iter().next();
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
