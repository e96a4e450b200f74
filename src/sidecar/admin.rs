//! The sidecar's own endpoints, on a listener of their own so that they never shadow the
//! app's paths: `/healthz` (the process runs), `/readyz` (registered: the app is healthy and
//! gateways route to it) and `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tracing::warn;

use super::node::NodeState;
use super::proxy::ProxyCounters;
use crate::trace::TraceSink;

/// Serves the admin endpoints until shutdown.
pub struct AdminService {
    pub listener: Mutex<Option<std::net::TcpListener>>,
    pub node: Arc<NodeState>,
    pub counters: Arc<ProxyCounters>,
    pub trace: TraceSink,
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(listener) = self.listener.lock().expect("listener slot").take() else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                warn!(message = "Admin listener unusable; /healthz and /metrics are off.", %error);
                return;
            }
        };
        let (node, counters, trace) =
            (self.node.clone(), self.counters.clone(), self.trace.clone());
        let ready_node = node.clone();
        let router = Router::new()
            .route("/healthz", get(|| async { r#"{"status":true}"# }))
            .route(
                "/readyz",
                get(move || async move {
                    if ready_node.registered.load(Ordering::Relaxed) {
                        (StatusCode::OK, r#"{"ready":true}"#)
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, r#"{"ready":false}"#)
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || async move { render(&node, &counters, &trace) }),
            );
        let stop = async move {
            let _ = shutdown.changed().await;
        };
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
        {
            warn!(message = "Admin listener failed.", %error);
        }
    }
}

fn render(node: &NodeState, counters: &ProxyCounters, trace: &TraceSink) -> String {
    let mut out = String::new();
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let flag = |value: &std::sync::atomic::AtomicBool| u64::from(value.load(Ordering::Relaxed));
    let samples = [
        (
            "goms_sidecar_requests_total",
            "counter",
            "Requests received.",
            load(&counters.requests),
        ),
        (
            "goms_sidecar_refused_total",
            "counter",
            "Requests refused for a missing or wrong Call-Service-Key.",
            load(&counters.refused),
        ),
        (
            "goms_sidecar_app_failures_total",
            "counter",
            "Requests answered 502 or 504 because the app failed or timed out.",
            load(&counters.app_failures),
        ),
        (
            "goms_sidecar_header_timeouts_total",
            "counter",
            "Connections answered 408: the request header took longer than gateway.limits.headerTimeout.",
            load(&counters.header_timeouts),
        ),
        (
            "goms_sidecar_connections_open",
            "gauge",
            "Connections served now on the sidecar's port.",
            counters.connections.open() as u64,
        ),
        (
            "goms_sidecar_connections_refused_total",
            "counter",
            "Connections closed at accept: gateway.limits.maxConnections were open.",
            counters.connections.refused(),
        ),
        (
            "goms_sidecar_failed_health_checks_total",
            "counter",
            "Health checks of the app that failed.",
            load(&node.failed_checks),
        ),
        (
            "goms_sidecar_app_healthy",
            "gauge",
            "Last health check of the app (1 healthy).",
            flag(&node.app_healthy),
        ),
        (
            "goms_sidecar_registered",
            "gauge",
            "Whether the node is in the registry (1 registered).",
            flag(&node.registered),
        ),
    ];
    for (name, kind, help, value) in samples {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    }
    trace.stats().render_prometheus(&mut out);
    out
}
