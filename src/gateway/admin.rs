//! The gateway's own endpoints: `/cluster`, `/metrics` and `/healthz`. The admin listener
//! (`gateway.adminAddr`, loopback by default) serves them to whoever reaches it; on the public
//! port `/healthz` answers everyone, for load balancers, while `/cluster` (node addresses) and
//! `/metrics` answer only clients in `gateway.adminAllow`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use tokio::sync::watch;

use super::cluster::cluster_document;
use super::dashboard::{Dashboard, Sources};
use super::metrics::GatewayMetrics;
use super::respond::ErrorEnvelope;
use super::route_store::RouteStore;
use super::upstreams::Upstreams;
use crate::config::AllowList;
use crate::registry::{Members, RegistryStatus};
use crate::trace::TraceSink;

/// What the admin endpoints read; shared by the proxy and the admin listener.
pub struct AdminEndpoints {
    pub members: watch::Receiver<Arc<Members>>,
    pub upstreams: Arc<Upstreams>,
    pub routes: Arc<RouteStore>,
    pub metrics: Arc<GatewayMetrics>,
    /// The HTTPS listener's certificates, whose expiry `/metrics` shows.
    pub certificates: Option<Arc<super::tls::CertStore>>,
    /// For the trace publisher's counters.
    pub trace: TraceSink,
    pub allow: AllowList,
    /// Set once the gateway has listed the registry: until then it knows no replica, and
    /// a 503 says why.
    pub registry_loaded: Arc<AtomicBool>,
    /// Whether the registry view is current: routing goes on with the last one through an
    /// etcd outage, and answers say so.
    pub registry_status: Arc<RegistryStatus>,
    /// etcd's endpoints, for the messages that blame it.
    pub etcd: String,
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
                let members = self.members.borrow().clone();
                let document = cluster_document(&members, Some(&self.upstreams));
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

    pub fn registry_loaded(&self) -> bool {
        self.registry_loaded.load(Ordering::Acquire)
    }

    /// Holds a request that came before the first membership listing until it is in, for at
    /// most `limit`: a gateway that has just started would otherwise answer 503 for its first
    /// milliseconds, as if no replica were registered. Envoy holds its listeners back until
    /// its clusters are initialised in the same way (`initial_fetch_timeout`).
    pub async fn first_listing(&self, limit: std::time::Duration) {
        if self.registry_loaded() {
            return;
        }
        let mut members = self.members.clone();
        let _ = tokio::time::timeout(limit, members.wait_for(|_| self.registry_loaded())).await;
    }

    /// Why the gateway cannot route yet, or `None` once it can.
    pub fn not_ready_because(&self) -> Option<String> {
        (!self.registry_loaded()).then(|| {
            format!(
                "the gateway has not read the registry yet: etcd at {} has not answered",
                self.etcd
            )
        })
    }

    /// Why the registry view may be out of date (etcd unreachable since a load), or `None`
    /// while it is current.
    pub fn stale_because(&self) -> Option<String> {
        let (length, error) = self.registry_status.unreachable()?;
        Some(format!(
            "the registry view is {}s old: {error}",
            length.as_secs()
        ))
    }

    /// The 503 of a route whose service has no replica: before the first listing and
    /// through an outage it names etcd, since the registry may well hold replicas.
    pub fn no_replica_because(&self, service: &str) -> String {
        if let Some(reason) = self.not_ready_because() {
            return reason;
        }
        match self.stale_because() {
            Some(stale) => format!(
                "no replica of service `{service}` was registered when etcd last answered; {stale}"
            ),
            None => format!("no replica of service `{service}` is registered"),
        }
    }

    /// `/readyz`: 200 once the gateway has a view of the registry, 503 with the reason
    /// before; `/healthz` only says that the process runs. A view that went stale in an
    /// etcd outage stays ready (routing on the last known replicas beats routing on none,
    /// and every gateway would go unready at once), and the answer says it is stale.
    fn readiness(&self) -> Answer {
        let (status, document) = match (self.not_ready_because(), self.stale_because()) {
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
            let members = self.0.members.borrow().clone();
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
