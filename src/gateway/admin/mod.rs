//! The gateway's admin surface: `/cluster`, `/metrics`, `/healthz`, `/readyz` and the
//! dashboard (`/ui`). The admin listener (`gateway.adminAddr`, loopback by default) serves
//! them to whoever reaches it; on the public port `/healthz` and `/readyz` answer everyone,
//! for load balancers, while `/cluster` (node addresses) and `/metrics` answer only clients
//! in `gateway.adminAllow`, and `/ui` is not served.
//!
//! It reads what the request path records (the counters of [`GatewayMetrics`], the
//! [`RequestLog`](super::request_log::RequestLog), the registry view and the balancers); the
//! request path never reaches into it, and only hands it the requests for these paths.
//!
//! - [`cluster`]: the Go original's `/cluster` document.
//! - [`dashboard`]: `/ui` and its JSON.
//! - [`metrics`] renders `/metrics`.
//! - this file: the endpoints, who may read them, and the listener's HTTP app.

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
pub mod cluster;
pub mod dashboard;
pub mod metrics;

use super::metrics::GatewayMetrics;
use super::registry_view::RegistryView;
use super::respond::ErrorEnvelope;
use super::route_store::RouteStore;
use super::upstreams::Upstreams;
use crate::config::AllowList;
use crate::trace::TraceSink;
use cluster::cluster_document;
use dashboard::{Dashboard, Sources};

/// What the admin endpoints read; shared by the proxy and the admin listener.
pub struct AdminEndpoints {
    pub registry: Arc<RegistryView>,
    pub upstreams: Arc<Upstreams>,
    pub routes: Arc<RouteStore>,
    pub metrics: Arc<GatewayMetrics>,
    /// The HTTPS listener's certificates, whose expiry `/metrics` shows.
    pub certificates: Option<Arc<super::tls::CertStore>>,
    /// The memory guard (`gateway.memoryLimit`), whose state `/metrics` shows.
    pub memory_guard: Option<Arc<super::overload::MemoryGuard>>,
    /// For the trace publisher's counters.
    pub trace: TraceSink,
    pub allow: AllowList,
    /// `/ui` and what it shows; served on the admin listener only.
    /// `None` with `gateway.dashboard: false`.
    pub dashboard: Option<Arc<Dashboard>>,
}

/// A complete answer of an admin endpoint.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl AdminEndpoints {
    /// The answer for `path`, or `None` when it is no admin endpoint.
    pub fn answer(&self, path: &str) -> Option<Answer> {
        let json = |body| Answer {
            status: 200,
            content_type: "application/json",
            body,
        };
        match path {
            "/healthz" => Some(json(br#"{"status":true}"#.to_vec())),
            "/readyz" => Some(self.readiness()),
            "/cluster" => {
                let members = self.registry.members.borrow().clone();
                let routes = self.routes.current();
                let document = cluster_document(&members, Some(&self.upstreams), Some(&routes));
                Some(json(
                    serde_json::to_vec_pretty(&document).expect("cluster document serialises"),
                ))
            }
            "/metrics" => {
                let mut text =
                    self.metrics
                        .render(&self.upstreams, &self.routes, self.trace.stats());
                if let Some(certificates) = &self.certificates {
                    certificates.render_prometheus(&mut text);
                }
                super::overload::render_prometheus(&mut text, self.memory_guard.as_deref());
                Some(Answer {
                    status: 200,
                    content_type: "text/plain; version=0.0.4",
                    body: text.into_bytes(),
                })
            }
            _ => None,
        }
    }

    /// Whether a client on the public port may read `path`: `/healthz` and `/readyz` are for
    /// everyone (load balancers), the rest only for `gateway.adminAllow`.
    pub fn public_may_read(&self, path: &str, client: Option<IpAddr>) -> bool {
        matches!(path, "/healthz" | "/readyz") || client.is_some_and(|ip| self.allow.allows(ip))
    }

    /// `/readyz`: 200 once the gateway has a view of the registry, 503 with the reason
    /// before; `/healthz` only says that the process runs. A view that went stale in an
    /// etcd outage stays ready (routing on the last known replicas beats routing on none,
    /// and every gateway would go unready at once), and the answer says it is stale.
    fn readiness(&self) -> Answer {
        let registry = &self.registry;
        let (status, document) = match (registry.not_ready_because(), registry.stale_because()) {
            (Some(reason), _) => (503, serde_json::json!({"ready": false, "reason": reason})),
            (None, Some(stale)) => (
                200,
                serde_json::json!({"ready": true, "registry": "stale", "reason": stale}),
            ),
            (None, None) => (
                200,
                serde_json::json!({"ready": true, "registry": "current"}),
            ),
        };
        Answer {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(&document).expect("readiness serialises"),
        }
    }
}

/// The admin listener's HTTP app.
pub struct AdminApp(pub Arc<AdminEndpoints>);

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().map(str::to_string);
        let dashboard = self.0.dashboard.as_ref();
        if let Some(dashboard) = dashboard.filter(|_| path == "/ui" || path.starts_with("/ui/")) {
            let members = self.0.registry.members.borrow().clone();
            let sources = Sources {
                members: &members,
                upstreams: &self.0.upstreams,
                routes: &self.0.routes,
            };
            if let Some(page) = dashboard.answer(&path, query.as_deref(), sources).await {
                return respond(page.status, page.content_type, page.body);
            }
        }
        let answer = self.0.answer(&path).unwrap_or_else(|| {
            let msg = if dashboard.is_none() && path.starts_with("/ui") {
                "the dashboard is off on this gateway (gateway.dashboard: false)"
            } else {
                "the admin listener serves /ui, /cluster, /metrics, /healthz and /readyz"
            };
            let envelope = ErrorEnvelope {
                code: 404,
                msg,
                status: false,
                request_id: "",
            };
            Answer {
                status: 404,
                content_type: "application/json",
                body: serde_json::to_vec(&envelope).expect("envelope serialises"),
            }
        });
        respond(answer.status, answer.content_type, answer.body)
    }
}

fn respond(status: u16, content_type: &'static str, body: Vec<u8>) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        // The page polls; an answer a second old is already stale.
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("a valid response")
}
