//! Builds the gateway's `request.start` and `request.end` events from what the request
//! context recorded; emitted after the response, so tracing adds nothing to latency.

use std::time::SystemTime;

use pingora::http::RequestHeader;

use crate::trace::event::{AttemptTiming, BodyCapture, RequestInfo, Timing, TraceTiming};
use crate::trace::{millis, rfc3339, EventKind, Redactor, RequestRecord, TraceEvent};

/// Who emits: the gateway's node identity and project label.
pub struct GatewayTracer {
    pub node_id: String,
    pub project_name: String,
    pub redactor: Redactor,
}

impl GatewayTracer {
    pub fn events(
        &self,
        header: &RequestHeader,
        client_ip: String,
        body: &BodyCapture,
        record: &RequestRecord,
        status: u16,
    ) -> [TraceEvent; 2] {
        let content_type = header
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let request = RequestInfo {
            method: header.method.to_string(),
            url: header.uri.path().to_string(),
            url_param: header
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default(),
            client_ip,
            headers: self.redactor.headers(
                header
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_bytes())),
            ),
            body: self
                .redactor
                .body(content_type, &body.bytes, body.truncated),
            body_truncated: body.truncated,
        }
        .into();
        let attempts: Vec<AttemptTiming> = record
            .attempts
            .iter()
            .map(|attempt| AttemptTiming {
                node: attempt.node_id.to_string(),
                upstream: attempt.upstream.to_string(),
                duration_ms: millis(
                    attempt
                        .finished
                        .unwrap_or_else(std::time::Instant::now)
                        .duration_since(attempt.started),
                ),
                status: attempt.status,
                error: attempt.error.clone(),
            })
            .collect();
        let received_at = rfc3339(record.received_at);
        let timing = TraceTiming {
            timing: Timing {
                started_at: received_at.clone(),
                attempts,
            },
        };
        let served_by = record.attempts.last();
        let start = TraceEvent {
            event_id: crate::trace::event::new_event_id(),
            request_id: record.request_id.clone(),
            event: EventKind::RequestStart,
            time: received_at,
            service_name: crate::gateway::GATEWAY_SERVICE.to_string(),
            service_id: self.node_id.clone(),
            project_name: self.project_name.clone(),
            request,
            trace: TraceTiming::default(),
            duration_ms: None,
            status: None,
            upstream: None,
            attempt: None,
            trace_id: record.trace.trace_id.clone(),
            span_id: record.trace.span_id.clone(),
            parent_span_id: record.trace.parent_span_id.clone(),
        };
        let end = TraceEvent {
            event_id: crate::trace::event::new_event_id(),
            event: EventKind::RequestEnd,
            time: rfc3339(SystemTime::now()),
            trace: timing,
            duration_ms: Some(millis(record.elapsed())),
            status: Some(status),
            upstream: served_by.map(|a| a.upstream.to_string()),
            attempt: (!record.attempts.is_empty()).then_some(record.attempts.len() as u32),
            ..start.clone()
        };
        [start, end]
    }
}
