//! Prometheus counters of the gateway, rendered by hand at `/metrics`.
//!
//! Counters are plain atomics updated on the request path; rendering walks them only when
//! scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::route_store::RouteStore;
use super::upstreams::Upstreams;
use crate::trace::publisher::PublisherStats;

/// Status codes tracked one by one; anything else is counted as `other`.
const TRACKED_STATUS: [u16; 11] = [200, 201, 204, 400, 401, 404, 405, 500, 502, 503, 504];

#[derive(Default)]
pub struct GatewayMetrics {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    /// Requests whose client went away before the answer was complete.
    pub client_aborts: AtomicU64,
    by_status: [AtomicU64; TRACKED_STATUS.len()],
    other_status: AtomicU64,
}

impl GatewayMetrics {
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
        render_trace(&mut out, trace);
        let _ = writeln!(
            out,
            "# HELP goms_gateway_requests_total Requests received on /api/."
        );
        let _ = writeln!(out, "# TYPE goms_gateway_requests_total counter");
        let _ = writeln!(
            out,
            "goms_gateway_requests_total {}",
            self.requests.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP goms_gateway_client_aborts_total Requests whose client closed the connection before the answer was complete."
        );
        let _ = writeln!(out, "# TYPE goms_gateway_client_aborts_total counter");
        let _ = writeln!(
            out,
            "goms_gateway_client_aborts_total {}",
            self.client_aborts.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP goms_gateway_retries_total Attempts moved to another replica."
        );
        let _ = writeln!(out, "# TYPE goms_gateway_retries_total counter");
        let _ = writeln!(
            out,
            "goms_gateway_retries_total {}",
            self.retries.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP goms_gateway_responses_total Responses sent, by status."
        );
        let _ = writeln!(out, "# TYPE goms_gateway_responses_total counter");
        for (status, count) in TRACKED_STATUS.iter().zip(&self.by_status) {
            let _ = writeln!(
                out,
                "goms_gateway_responses_total{{code=\"{status}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "goms_gateway_responses_total{{code=\"other\"}} {}",
            self.other_status.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP goms_gateway_routes Routes in the table in force."
        );
        let _ = writeln!(out, "# TYPE goms_gateway_routes gauge");
        let _ = writeln!(
            out,
            "goms_gateway_routes {}",
            routes.current().route_count()
        );
        let _ = writeln!(
            out,
            "# HELP goms_upstream_requests_total Attempts sent to a replica."
        );
        let _ = writeln!(out, "# TYPE goms_upstream_requests_total counter");
        let _ = writeln!(
            out,
            "# HELP goms_upstream_failures_total Attempts that failed at a replica."
        );
        let _ = writeln!(out, "# TYPE goms_upstream_failures_total counter");
        let _ = writeln!(
            out,
            "# HELP goms_upstream_in_flight Attempts in progress at a replica."
        );
        let _ = writeln!(out, "# TYPE goms_upstream_in_flight gauge");
        let _ = writeln!(
            out,
            "# HELP goms_upstream_healthy Last TCP health check of a replica (1 healthy)."
        );
        let _ = writeln!(out, "# TYPE goms_upstream_healthy gauge");
        for upstream in upstreams.all() {
            for node in upstream.nodes() {
                let labels = format!("service=\"{}\",node=\"{}\"", upstream.name, node.info.id);
                let _ = writeln!(
                    out,
                    "goms_upstream_requests_total{{{labels}}} {}",
                    node.requests.load(Ordering::Relaxed)
                );
                let _ = writeln!(
                    out,
                    "goms_upstream_failures_total{{{labels}}} {}",
                    node.failures.load(Ordering::Relaxed)
                );
                let _ = writeln!(
                    out,
                    "goms_upstream_in_flight{{{labels}}} {}",
                    node.in_flight.load(Ordering::Relaxed)
                );
                let _ = writeln!(
                    out,
                    "goms_upstream_healthy{{{labels}}} {}",
                    u8::from(upstream.is_healthy(&node))
                );
            }
        }
        out
    }
}

/// `goms_trace_events_*_total`: what the trace publisher did with events.
pub fn render_trace(out: &mut String, trace: &PublisherStats) {
    let counters = [
        (
            "emitted",
            "Trace events produced on the request path.",
            &trace.emitted,
        ),
        (
            "published",
            "Trace events confirmed by the broker.",
            &trace.published,
        ),
        (
            "spooled",
            "Trace events written to the disk spool.",
            &trace.spooled,
        ),
        (
            "dropped",
            "Trace events lost because the spool was full or unwritable.",
            &trace.dropped,
        ),
    ];
    for (name, help, counter) in counters {
        let _ = writeln!(out, "# HELP goms_trace_events_{name}_total {help}");
        let _ = writeln!(out, "# TYPE goms_trace_events_{name}_total counter");
        let _ = writeln!(
            out,
            "goms_trace_events_{name}_total {}",
            counter.load(Ordering::Relaxed)
        );
    }
}
