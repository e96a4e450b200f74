//! `/metrics`: the gateway's counters ([`GatewayMetrics`]), the balancers' per-replica
//! figures, the route table and the trace pipeline's counters, in Prometheus' text format,
//! rendered by hand when scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::gateway::metrics::{GatewayMetrics, TRACKED_STATUS};
use crate::gateway::route_store::RouteStore;
use crate::gateway::upstreams::Upstreams;
use crate::trace::PublisherStats;

impl GatewayMetrics {
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
        family(
            &mut out,
            "goms_route_rate_limited_total",
            "counter",
            "Requests answered 429 by a route's rateLimit, by route.",
        );
        for (route, limiter) in routes.rate_limits.all() {
            let _ = writeln!(
                out,
                "goms_route_rate_limited_total{{route=\"{route}\"}} {}",
                limiter.refused.load(Ordering::Relaxed)
            );
        }
        render_upstreams(&mut out, upstreams);
        render_services(&mut out, upstreams);
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

/// Per-service guards: `goms_service_*{service}`.
fn render_services(out: &mut String, upstreams: &Upstreams) {
    let families = [
        (
            "in_flight",
            "gauge",
            "Requests to a service in progress at this gateway.",
        ),
        (
            "refused_over_max_in_flight_total",
            "counter",
            "Requests answered 503 at once because the service's maxInFlight were in progress.",
        ),
        (
            "retries_over_budget_total",
            "counter",
            "Retries not made because the service's retry budget was spent.",
        ),
    ];
    for (name, kind, help) in families {
        family(out, &format!("goms_service_{name}"), kind, help);
    }
    for upstream in upstreams.all() {
        let samples = [
            ("in_flight", u64::from(upstream.in_flight())),
            (
                "refused_over_max_in_flight_total",
                upstream.refused_over_cap.load(Ordering::Relaxed),
            ),
            (
                "retries_over_budget_total",
                upstream.retry_budget.refused.load(Ordering::Relaxed),
            ),
        ];
        for (name, value) in samples {
            let _ = writeln!(
                out,
                "goms_service_{name}{{service=\"{}\"}} {value}",
                upstream.name
            );
        }
    }
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
        (
            "ejected",
            "gauge",
            "Whether outlier ejection keeps a replica out (1 ejected).",
        ),
        (
            "ejections_total",
            "counter",
            "Times a replica was ejected for failing.",
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
                ("ejected", i64::from(node.outlier.is_ejected())),
                (
                    "ejections_total",
                    node.outlier.ejections_total.load(Ordering::Relaxed) as i64,
                ),
            ];
            for (name, value) in samples {
                let _ = writeln!(out, "goms_upstream_{name}{{{labels}}} {value}");
            }
        }
    }
    family(
        out,
        "goms_upstream_latency_ewma_seconds",
        "gauge",
        "Decaying average of a replica's latency, as balance: least_request weighs it.",
    );
    for upstream in upstreams.all() {
        for node in upstream.nodes() {
            if let Some(average) = node.latency.average() {
                let _ = writeln!(
                    out,
                    "goms_upstream_latency_ewma_seconds{{service=\"{}\",node=\"{}\"}} {:.6}",
                    upstream.name,
                    node.info.id,
                    average.as_secs_f64()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::sync::Arc;

    use pingora::services::listening::ConnectionLimit;

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
