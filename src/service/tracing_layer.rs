//! The SDK's trace events: `service.start` when a request arrives at the replica and
//! `service.end` when its response is ready, sharing the gateway's request id and trace.
//! [`ServiceTracer::begin`] serves both the axum middleware here and `goms sidecar`.

use std::time::{Instant, SystemTime};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderMap, Method, Uri};

use crate::trace::{
    millis, new_event_id, request_id_or_new, rfc3339, EventKind, Redactor, RequestInfo, Timing,
    TraceContext, TraceEvent, TraceSink, TraceTiming, ATTEMPT_HEADER, REQUEST_ID_HEADER,
    TRACEPARENT_HEADER,
};

#[derive(Clone)]
pub struct ServiceTracer {
    pub sink: TraceSink,
    pub redactor: std::sync::Arc<Redactor>,
    pub service: String,
    pub node_id: String,
    pub project_name: String,
}

/// A request that arrived and whose `service.start` was emitted; [`ServiceSpan::end`]
/// emits its `service.end`.
pub struct ServiceSpan {
    start: TraceEvent,
    started: Instant,
    sink: TraceSink,
}

impl ServiceSpan {
    /// Emits `service.end` with the status the service answered.
    pub fn end(self, status: u16) {
        let ServiceSpan {
            start,
            started,
            sink,
        } = self;
        sink.emit(TraceEvent {
            event_id: new_event_id(),
            event: EventKind::ServiceEnd,
            time: rfc3339(SystemTime::now()),
            duration_ms: Some(millis(started.elapsed())),
            status: Some(status),
            ..start
        });
    }

    /// The request id the events carry: the caller's `X-Request-Id`, or a new one.
    pub fn request_id(&self) -> &str {
        &self.start.request_id
    }
}

impl ServiceTracer {
    /// Emits `service.start` for a request that just arrived; `None` when tracing is off.
    /// The body is not read (the gateway's `request.start` carries it), so handlers still
    /// stream their input.
    pub fn begin(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<ServiceSpan> {
        if !self.sink.is_enabled() {
            return None;
        }
        let received_at = rfc3339(SystemTime::now());
        let started = Instant::now();
        let header = |name: &str| headers.get(name).map(|v| v.as_bytes());
        let request_id = request_id_or_new(header(REQUEST_ID_HEADER));
        let trace = TraceContext::continue_or_start(header(TRACEPARENT_HEADER));
        let attempt = header(ATTEMPT_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok());
        let client_ip = header("x-forwarded-for")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.split(',').next_back())
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        let info = RequestInfo {
            method: method.to_string(),
            url: uri.path().to_string(),
            url_param: uri.query().map(|q| format!("?{q}")).unwrap_or_default(),
            client_ip,
            headers: self
                .redactor
                .headers(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()))),
            body: serde_json::Value::Null,
            body_truncated: false,
        }
        .into();
        let start = TraceEvent {
            event_id: new_event_id(),
            request_id,
            event: EventKind::ServiceStart,
            time: received_at.clone(),
            service_name: self.service.clone(),
            service_id: self.node_id.clone(),
            project_name: self.project_name.clone(),
            request: info,
            trace: TraceTiming {
                timing: Timing {
                    started_at: received_at,
                    attempts: Vec::new(),
                },
            },
            duration_ms: None,
            status: None,
            upstream: None,
            attempt,
            trace_id: trace.trace_id.clone(),
            span_id: trace.span_id.clone(),
            parent_span_id: trace.parent_span_id.clone(),
        };
        self.sink.emit(start.clone());
        Some(ServiceSpan {
            start,
            started,
            sink: self.sink.clone(),
        })
    }
}

/// Emits `service.start` and `service.end` around the handler.
pub async fn trace_request(
    State(tracer): State<ServiceTracer>,
    request: Request,
    next: Next,
) -> Response {
    let span = tracer.begin(request.method(), request.uri(), request.headers());
    let response = next.run(request).await;
    if let Some(span) = span {
        span.end(response.status().as_u16());
    }
    response
}
