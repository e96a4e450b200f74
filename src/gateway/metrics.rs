//! Prometheus counters of the gateway, rendered by hand at `/metrics`.
//!
//! Counters are plain atomics updated on the request path; rendering walks them only when
//! scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pingora::services::listening::ConnectionLimit;

use super::limits::RefusalCounts;
use super::route_store::RouteStore;
use super::upstreams::Upstreams;
use crate::trace::PublisherStats;

/// Status codes tracked one by one; anything else is counted as `other`.
const TRACKED_STATUS: [u16; 16] = [
    200, 201, 204, 400, 401, 403, 404, 405, 408, 413, 414, 431, 500, 502, 503, 504,
];

pub struct GatewayMetrics {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    /// Requests whose client went away before the answer was complete.
    pub client_aborts: AtomicU64,
    by_status: [AtomicU64; TRACKED_STATUS.len()],
    other_status: AtomicU64,
    /// Requests refused by `gateway.limits` or the framing rules, by reason.
    pub refused: RefusalCounts,
    /// Client connections open and refused at `gateway.limits.maxConnections`.
    connections: Arc<ConnectionLimit>,
}

impl GatewayMetrics {
    /// Counters at zero, reading open and refused connections from the public listener's cap.
    pub fn new(connections: Arc<ConnectionLimit>) -> Self {
        GatewayMetrics {
            requests: AtomicU64::default(),
            retries: AtomicU64::default(),
            client_aborts: AtomicU64::default(),
            by_status: Default::default(),
            other_status: AtomicU64::default(),
            refused: RefusalCounts::default(),
            connections,
        }
    }

    pub fn count_status(&self, status: u16) {
        match TRACKED_STATUS.iter().position(|s| *s == status) {
            Some(index) => self.by_status[index].fetch_add(1, Ordering::Relaxed),
            None => self.other_status.fetch_add(1, Ordering::Relaxed),
        };
    }

    pub fn render(
        &self,
        upstreams: &Upstreams,
        routes: &RouteStore,
        trace: &PublisherStats,
    ) -> String {
        let mut out = String::new();
        trace.render_prometheus(&mut out);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        single(
            &mut out,
            "goms_gateway_requests_total",
            "counter",
            "Requests received on /api/.",
            load(&self.requests),
        );
        single(
            &mut out,
            "goms_gateway_client_aborts_total",
            "counter",
            "Requests whose client closed the connection before the answer was complete.",
            load(&self.client_aborts),
        );
        single(
            &mut out,
            "goms_gateway_retries_total",
            "counter",
            "Attempts moved to another replica.",
            load(&self.retries),
        );
        family(
            &mut out,
            "goms_gateway_responses_total",
            "counter",
            "Responses sent, by status.",
        );
        for (status, count) in TRACKED_STATUS.iter().zip(&self.by_status) {
            let _ = writeln!(
                out,
                "goms_gateway_responses_total{{code=\"{status}\"}} {}",
                load(count)
            );
        }
        let _ = writeln!(
            out,
            "goms_gateway_responses_total{{code=\"other\"}} {}",
            load(&self.other_status)
        );
        family(
            &mut out,
            "goms_gateway_refused_total",
            "counter",
            "Requests refused before routing (gateway.limits, ambiguous framing), by reason.",
        );
        for (reason, count) in self.refused.all() {
            let _ = writeln!(
                out,
                "goms_gateway_refused_total{{reason=\"{reason}\"}} {count}"
            );
        }
        single(
            &mut out,
            "goms_gateway_connections_open",
            "gauge",
            "Client connections served now on the public port.",
            self.connections.open(),
        );
        single(
            &mut out,
            "goms_gateway_connections_refused_total",
            "counter",
            "Client connections closed at accept because gateway.limits.maxConnections were open.",
            self.connections.refused(),
        );
        single(
            &mut out,
            "goms_gateway_routes",
            "gauge",
            "Routes in the table in force.",
            routes.current().route_count(),
        );
        render_upstreams(&mut out, upstreams);
        out
    }
}

/// `# HELP` and `# TYPE` of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A metric with one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// Per-replica counters: `goms_upstream_*{service,node}`.
fn render_upstreams(out: &mut String, upstreams: &Upstreams) {
    let families = [
        ("requests_total", "counter", "Attempts sent to a replica."),
        (
            "failures_total",
            "counter",
            "Attempts that failed at a replica.",
        ),
        ("in_flight", "gauge", "Attempts in progress at a replica."),
        (
            "healthy",
            "gauge",
            "Last TCP health check of a replica (1 healthy).",
        ),
    ];
    for (name, kind, help) in families {
        family(out, &format!("goms_upstream_{name}"), kind, help);
    }
    for upstream in upstreams.all() {
        for node in upstream.nodes() {
            let labels = format!("service=\"{}\",node=\"{}\"", upstream.name, node.info.id);
            let samples = [
                (
                    "requests_total",
                    node.requests.load(Ordering::Relaxed) as i64,
                ),
                (
                    "failures_total",
                    node.failures.load(Ordering::Relaxed) as i64,
                ),
                ("in_flight", node.in_flight.load(Ordering::Relaxed)),
                ("healthy", i64::from(upstream.is_healthy(&node))),
            ];
            for (name, value) in samples {
                let _ = writeln!(out, "goms_upstream_{name}{{{labels}}} {value}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{RouteDefaults, ServiceRoutes};
    use crate::gateway::route_store::RouteSource;

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let metrics = GatewayMetrics::new(Arc::new(ConnectionLimit::new(10)));
        metrics.requests.fetch_add(3, Ordering::Relaxed);
        metrics.count_status(200);
        let routes = RouteStore::load(
            RouteSource::Inline(ServiceRoutes::default()),
            RouteDefaults {
                max_body_bytes: 1 << 20,
                timeout: Duration::from_secs(1),
                retries: 0,
            },
        )
        .unwrap();
        let text = metrics.render(&Upstreams::default(), &routes, &PublisherStats::default());
        let gateway: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("goms_gateway_requests_total"))
            .take(9)
            .collect();
        assert_eq!(
            gateway,
            [
                "# HELP goms_gateway_requests_total Requests received on /api/.",
                "# TYPE goms_gateway_requests_total counter",
                "goms_gateway_requests_total 3",
                "# HELP goms_gateway_client_aborts_total Requests whose client closed the connection before the answer was complete.",
                "# TYPE goms_gateway_client_aborts_total counter",
                "goms_gateway_client_aborts_total 0",
                "# HELP goms_gateway_retries_total Attempts moved to another replica.",
                "# TYPE goms_gateway_retries_total counter",
                "goms_gateway_retries_total 0",
            ]
        );
        assert!(text.contains("goms_gateway_responses_total{code=\"200\"} 1\n"));
        assert!(text.contains("# TYPE goms_gateway_routes gauge\ngoms_gateway_routes 0\n"));
        assert!(text.contains(
            "# TYPE goms_trace_events_dropped_total counter\ngoms_trace_events_dropped_total 0\n"
        ));
        for family in ["requests_total", "failures_total", "in_flight", "healthy"] {
            assert!(
                text.contains(&format!("# TYPE goms_upstream_{family} ")),
                "{family}"
            );
        }
    }
}
