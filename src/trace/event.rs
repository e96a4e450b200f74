//! The trace event document: the Go original's fields (`requestId`, `event`, `time`, `serviceName`,
//! `serviceId`, `projectName`, `request{...}`, `trace{timing}`) plus `eventId` (the
//! Elasticsearch `_id`), `durationMs`, `status`, `upstream`, `attempt` and the W3C ids.
//!
//! Also owns what may enter an event: headers are redacted by name, bodies are capped and
//! only JSON and url-encoded form bodies are decoded.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Which moment of a request the event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "request.start")]
    RequestStart,
    #[serde(rename = "service.start")]
    ServiceStart,
    #[serde(rename = "service.end")]
    ServiceEnd,
    #[serde(rename = "request.end")]
    RequestEnd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceEvent {
    /// Unique per event; the Elasticsearch `_id`, so a redelivered message never duplicates.
    pub event_id: String,
    pub request_id: String,
    pub event: EventKind,
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    pub service_name: String,
    pub service_id: String,
    pub project_name: String,
    /// Shared by a request's start and end events, which carry the same request.
    pub request: Arc<RequestInfo>,
    pub trace: TraceTiming,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The replica (`host:port`) that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// 1 for the first try; higher when the gateway moved on to another replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    pub trace_id: String,
    pub span_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestInfo {
    pub method: String,
    pub url: String,
    /// `?a=1&b=3`, or empty.
    pub url_param: String,
    pub client_ip: String,
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    #[serde(default)]
    pub body_truncated: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceTiming {
    pub timing: Timing,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timing {
    /// When the request arrived at this hop.
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptTiming>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptTiming {
    pub node: String,
    pub upstream: String,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn new_event_id() -> String {
    Uuid::new_v4().to_string()
}

/// Headers that never enter a trace, whatever the configuration says.
pub const ALWAYS_REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "call-service-key",
];

pub const REDACTED: &str = "[REDACTED]";

/// Decides what of a request may be written into an event.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// Lowercase header names whose values are replaced.
    names: Vec<String>,
    /// Bodies longer than this are cut (and not decoded).
    pub body_max_bytes: usize,
}

impl Redactor {
    pub fn new(extra_names: &[String], body_max_bytes: usize) -> Self {
        let mut names: Vec<String> = ALWAYS_REDACTED.iter().map(|s| s.to_string()).collect();
        names.extend(extra_names.iter().map(|n| n.to_ascii_lowercase()));
        Redactor {
            names,
            body_max_bytes,
        }
    }

    /// Whether a header's value never enters an event; `lower_name` is lowercase.
    pub fn is_redacted(&self, lower_name: &str) -> bool {
        self.names.iter().any(|name| name == lower_name)
    }

    /// Copies headers, replacing secret values; multiple values are joined with `, `.
    pub fn headers<'a>(
        &self,
        headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> BTreeMap<String, String> {
        let mut copied: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers {
            let lower = name.to_ascii_lowercase();
            let value = if self.is_redacted(&lower) {
                REDACTED.to_string()
            } else {
                String::from_utf8_lossy(value).into_owned()
            };
            copied
                .entry(lower)
                .and_modify(|existing| {
                    if existing != REDACTED {
                        existing.push_str(", ");
                        existing.push_str(&value);
                    }
                })
                .or_insert(value);
        }
        copied
    }

    /// Decodes a captured body: JSON and url-encoded forms become JSON values; a cut body
    /// of those types is kept as text; anything else is left out (null).
    pub fn body(&self, content_type: &str, captured: &[u8], truncated: bool) -> Value {
        if captured.is_empty() {
            return Value::Null;
        }
        let kind = BodyKind::of(content_type);
        if kind == BodyKind::Other {
            return Value::Null;
        }
        if truncated {
            return Value::String(String::from_utf8_lossy(captured).into_owned());
        }
        if kind == BodyKind::Json {
            return serde_json::from_slice(captured)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(captured).into_owned()));
        }
        Value::Object(
            url::form_urlencoded::parse(captured)
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect(),
        )
    }
}

/// Which bodies are decoded into an event, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
    Other,
}

impl BodyKind {
    pub fn of(content_type: &str) -> Self {
        let kind = content_type.trim_start();
        let starts = |prefix: &str| {
            kind.get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        };
        let suffix_json = kind
            .as_bytes()
            .windows(5)
            .any(|w| w.eq_ignore_ascii_case(b"+json"));
        if starts("application/json") || suffix_json {
            BodyKind::Json
        } else if starts("application/x-www-form-urlencoded") {
            BodyKind::Form
        } else {
            BodyKind::Other
        }
    }
}

/// Collects at most `limit` bytes of a body arriving in chunks.
#[derive(Debug, Default)]
pub struct BodyCapture {
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

impl BodyCapture {
    pub fn push(&mut self, chunk: &[u8], limit: usize) {
        let room = limit.saturating_sub(self.bytes.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.bytes
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

/// `trace_logs-YYYY.MM.DD` for an event time `YYYY-MM-DDT...`.
pub fn daily_index(prefix: &str, time: &str) -> String {
    let date = time.get(..10).unwrap_or("1970-01-01").replace('-', ".");
    format!("{prefix}-{date}")
}

/// A minimal event for unit tests of the modules that carry events.
#[cfg(test)]
pub(crate) fn test_event(n: usize) -> TraceEvent {
    TraceEvent {
        event_id: format!("e{n}"),
        request_id: "r".into(),
        event: EventKind::RequestStart,
        time: "2026-11-27T00:00:00.000Z".into(),
        service_name: "gateway".into(),
        service_id: "g".into(),
        project_name: "goms".into(),
        request: RequestInfo::default().into(),
        trace: TraceTiming::default(),
        duration_ms: None,
        status: None,
        upstream: None,
        attempt: None,
        trace_id: "0".repeat(32),
        span_id: "1".repeat(16),
        parent_span_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_names_lowercased() {
        let redactor = Redactor::new(&["X-Api-Token".into()], 4096);
        let headers = redactor.headers(
            [
                ("Authorization", &b"Bearer t"[..]),
                ("Call-Service-Key", b"k"),
                ("x-api-token", b"t"),
                ("Accept", b"*/*"),
            ]
            .into_iter(),
        );
        assert_eq!(headers["authorization"], "[REDACTED]");
        assert_eq!(headers["call-service-key"], "[REDACTED]");
        assert_eq!(headers["x-api-token"], "[REDACTED]");
        assert_eq!(headers["accept"], "*/*");
    }

    #[test]
    fn bodies_are_capped_and_only_json_or_form_decoded() {
        let redactor = Redactor::new(&[], 8);
        let mut capture = BodyCapture::default();
        capture.push(b"{\"a\":", 8);
        capture.push(b"12345}", 8);
        assert!(capture.truncated);
        assert_eq!(capture.bytes.len(), 8);
        assert_eq!(
            redactor.body("application/json", &capture.bytes, true),
            Value::String("{\"a\":123".into())
        );
        assert_eq!(
            redactor.body("application/json", b"{\"a\":1}", false),
            serde_json::json!({"a": 1})
        );
        assert_eq!(
            redactor.body("application/x-www-form-urlencoded", b"a=1&b=x", false),
            serde_json::json!({"a": "1", "b": "x"})
        );
        assert_eq!(redactor.body("image/png", b"\x89PNG", false), Value::Null);
    }

    #[test]
    fn event_kinds_keep_goms_names() {
        assert_eq!(
            serde_json::to_string(&EventKind::RequestStart).unwrap(),
            "\"request.start\""
        );
        assert_eq!(
            serde_json::to_string(&EventKind::ServiceEnd).unwrap(),
            "\"service.end\""
        );
    }

    #[test]
    fn index_is_daily() {
        assert_eq!(
            daily_index("trace_logs", "2026-11-27T20:00:00.000Z"),
            "trace_logs-2026.11.27"
        );
    }
}
