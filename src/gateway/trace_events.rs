//! Writes the gateway's `request.start` and `request.end` events from what the request
//! context recorded; emitted after the response, so tracing adds nothing to latency.
//!
//! The events are written as JSON straight from pingora's request header into one buffer
//! ([`json`]): the request object is written once and shared by both events, and no header
//! is copied into a `String` first. This runs on the proxy threads for every request, so it
//! is the part of tracing that costs gateway throughput. The documents are exactly the
//! [`TraceEvent`](crate::trace::TraceEvent) schema; the tests read them back as such.

use std::time::{Instant, SystemTime};

use pingora::http::RequestHeader;
use uuid::Uuid;

use super::json::{self, Object};
use super::record::RequestRecord;
use crate::trace::framing::EncodedEvents;
use crate::trace::{rfc3339, BodyCapture, BodyKind, Redactor, REDACTED};

/// Who emits: the gateway's node identity and project label.
pub struct GatewayTracer {
    pub node_id: String,
    pub project_name: String,
    pub redactor: Redactor,
}

impl GatewayTracer {
    /// Events [`GatewayTracer::write`] writes per request.
    pub const EVENTS_PER_REQUEST: usize = 2;

    /// The request's two events, as a unit of their own (tests and benchmarks; the proxy
    /// writes them into the trace queue with [`GatewayTracer::write`]).
    pub fn encode(
        &self,
        header: &RequestHeader,
        client_ip: &str,
        body: &BodyCapture,
        record: &RequestRecord,
        status: u16,
    ) -> EncodedEvents {
        let mut events = EncodedEvents::default();
        events.append_with(Self::EVENTS_PER_REQUEST, |lines| {
            self.write(lines, header, client_ip, body, record, status)
        });
        events
    }

    /// Appends the request's two events to `lines`, as two NDJSON lines.
    pub fn write(
        &self,
        lines: &mut Vec<u8>,
        header: &RequestHeader,
        client_ip: &str,
        body: &BodyCapture,
        record: &RequestRecord,
        status: u16,
    ) {
        let request = self.request_json(header, client_ip, body);
        let received_at = rfc3339(record.received_at);

        let mut start = self.begin_event(lines, "request.start", &received_at, record);
        start.raw("request", &request);
        let mut trace = Object::begin(start.key("trace"));
        let mut timing = Object::begin(trace.key("timing"));
        timing.plain_str("startedAt", &received_at);
        timing.end();
        trace.end();
        end_event(start, record);

        let ended_at = rfc3339(SystemTime::now());
        let mut end = self.begin_event(lines, "request.end", &ended_at, record);
        end.raw("request", &request);
        write_end_timing(&mut end, record, &received_at);
        end.millis("durationMs", record.elapsed());
        end.uint("status", u64::from(status));
        if let Some(served_by) = record.attempts.last() {
            end.str("upstream", &served_by.upstream);
            end.uint("attempt", record.attempts.len() as u64);
        }
        end_event(end, record);
    }

    /// Opens an event and writes the members every gateway event has.
    fn begin_event<'a>(
        &self,
        lines: &'a mut Vec<u8>,
        kind: &str,
        time: &str,
        record: &RequestRecord,
    ) -> Object<'a> {
        let mut event_id = Uuid::encode_buffer();
        let mut event = Object::begin(lines);
        event
            .plain_str(
                "eventId",
                Uuid::new_v4().hyphenated().encode_lower(&mut event_id),
            )
            // Kept from the client only when it has no character that needs escaping.
            .plain_str("requestId", &record.request_id)
            .plain_str("event", kind)
            .plain_str("time", time)
            .plain_str("serviceName", crate::gateway::GATEWAY_SERVICE)
            .str("serviceId", &self.node_id)
            .str("projectName", &self.project_name);
        event
    }

    /// `request{method,url,urlParam,clientIp,headers,body,bodyTruncated}`, written once.
    fn request_json(&self, header: &RequestHeader, client_ip: &str, body: &BodyCapture) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        let mut request = Object::begin(&mut out);
        request
            .str("method", header.method.as_str())
            .str("url", header.uri.path());
        match header.uri.query() {
            Some(query) => request.str("urlParam", &format!("?{query}")),
            None => request.str("urlParam", ""),
        };
        request.str("clientIp", client_ip);
        self.write_headers(request.key("headers"), header);
        let content_type = header
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        write_body(request.key("body"), BodyKind::of(content_type), body);
        request.raw(
            "bodyTruncated",
            if body.truncated { b"true" } else { b"false" },
        );
        request.end();
        out
    }

    /// Header names are lowercase (as `http` stores them); repeated headers are joined with
    /// `, `; secrets are replaced by `[REDACTED]`. `HeaderMap::iter` yields a name's values one
    /// after another, so repeated headers are joined without looking any name up again.
    fn write_headers(&self, out: &mut Vec<u8>, header: &RequestHeader) {
        let mut headers = Object::begin(out);
        let mut entries = header.headers.iter().peekable();
        while let Some((name, first)) = entries.next() {
            let mut joined: Option<Vec<u8>> = None;
            while let Some((_, more)) = entries.next_if(|(next, _)| *next == name) {
                let joined = joined.get_or_insert_with(|| first.as_bytes().to_vec());
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(more.as_bytes());
            }
            let shown = if self.redactor.is_redacted(name.as_str()) {
                REDACTED.as_bytes()
            } else {
                joined.as_deref().unwrap_or(first.as_bytes())
            };
            json::write_lossy_str(headers.key(name.as_str()), shown);
        }
        headers.end();
    }
}

/// JSON and url-encoded form bodies are decoded; a cut body of those types is kept as text;
/// anything else is left out (`null`). The same rules as [`Redactor::body`].
fn write_body(out: &mut Vec<u8>, kind: BodyKind, body: &BodyCapture) {
    if body.bytes.is_empty() || kind == BodyKind::Other {
        out.extend_from_slice(b"null");
    } else if body.truncated {
        json::write_lossy_str(out, &body.bytes);
    } else if kind == BodyKind::Json {
        if !json::write_compact(out, &body.bytes) {
            json::write_lossy_str(out, &body.bytes);
        }
    } else {
        let mut form = Object::begin(out);
        for (name, value) in url::form_urlencoded::parse(&body.bytes) {
            json::write_str(form.escaped_key(&name), &value);
        }
        form.end();
    }
}

/// `trace.timing` of `request.end`: when the request arrived and each try at a replica.
fn write_end_timing(end: &mut Object<'_>, record: &RequestRecord, received_at: &str) {
    let mut trace = Object::begin(end.key("trace"));
    let mut timing = Object::begin(trace.key("timing"));
    timing.plain_str("startedAt", received_at);
    if !record.attempts.is_empty() {
        let out = timing.key("attempts");
        out.push(b'[');
        for (index, attempt) in record.attempts.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            let finished = attempt.finished.unwrap_or_else(Instant::now);
            let mut item = Object::begin(out);
            item.str("node", &attempt.node_id)
                .str("upstream", &attempt.upstream)
                .millis("durationMs", finished.duration_since(attempt.started));
            if let Some(status) = attempt.status {
                item.uint("status", u64::from(status));
            }
            if let Some(error) = &attempt.error {
                item.str("error", error);
            }
            item.end();
        }
        out.push(b']');
    }
    timing.end();
    trace.end();
}

/// Writes the W3C ids every event ends with, closes the event and its line.
fn end_event(mut event: Object<'_>, record: &RequestRecord) {
    event
        .plain_str("traceId", &record.trace.trace_id)
        .plain_str("spanId", &record.trace.span_id);
    if let Some(parent) = &record.trace.parent_span_id {
        event.plain_str("parentSpanId", parent);
    }
    let lines = event.end();
    lines.push(b'\n');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::gateway::record::Attempt;
    use crate::trace::framing;
    use crate::trace::{EventKind, TraceContext, TraceEvent};

    fn tracer() -> GatewayTracer {
        GatewayTracer {
            node_id: "10.0.0.2:8080".into(),
            project_name: "shop".into(),
            redactor: Redactor::new(&["X-Api-Token".into()], 64),
        }
    }

    fn request(content_type: &str) -> RequestHeader {
        let mut header = RequestHeader::build("POST", b"/api/user/login?a=1&b=3", None).unwrap();
        header.append_header("content-type", content_type).unwrap();
        header.append_header("authorization", "Bearer t").unwrap();
        header.append_header("call-service-key", "k").unwrap();
        header.append_header("X-Api-Token", "t").unwrap();
        header.append_header("accept", "text/html").unwrap();
        header.append_header("accept", "*/*").unwrap();
        header.append_header("x-quote", "say \"hi\"\t").unwrap();
        header
    }

    fn record() -> RequestRecord {
        let trace = TraceContext::continue_or_start(Some(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        let mut record = RequestRecord::new("req-1".into(), trace);
        for (upstream, status, error) in [
            ("127.0.0.1:9001", None, Some("connect refused".to_string())),
            ("127.0.0.1:9002", Some(201), None),
        ] {
            record.attempts.push(Attempt {
                node_id: Arc::from(upstream),
                upstream: Arc::from(upstream),
                started: Instant::now(),
                finished: Some(Instant::now()),
                status,
                error,
            });
        }
        record
    }

    fn body(bytes: &[u8], truncated: bool) -> BodyCapture {
        BodyCapture {
            bytes: bytes.to_vec(),
            truncated,
        }
    }

    /// A login POST with a pretty-printed JSON body, answered with `status` on the 2nd try.
    fn pretty_json_login(status: u16) -> EncodedEvents {
        tracer().encode(
            &request("application/json"),
            "10.0.0.7",
            &body(b"{\n  \"user\": \"ada\"\n}", false),
            &record(),
            status,
        )
    }

    fn decoded(encoded: &EncodedEvents) -> Vec<TraceEvent> {
        let data = encoded.as_bytes();
        framing::lines(data)
            .map(|line| serde_json::from_slice(&data[line]).expect("an event per line"))
            .collect()
    }

    #[test]
    fn both_events_read_back_as_the_trace_event_schema() {
        let encoded = pretty_json_login(201);
        assert_eq!(encoded.count(), 2);
        let [start, end]: [TraceEvent; 2] = decoded(&encoded).try_into().unwrap();

        assert_eq!(start.event, EventKind::RequestStart);
        assert_eq!(end.event, EventKind::RequestEnd);
        assert_ne!(start.event_id, end.event_id);
        for event in [&start, &end] {
            assert_eq!(event.request_id, "req-1");
            assert_eq!(event.service_name, crate::gateway::GATEWAY_SERVICE);
            assert_eq!(event.service_id, "10.0.0.2:8080");
            assert_eq!(event.project_name, "shop");
            assert_eq!(event.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(event.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
            assert_eq!(event.trace.timing.started_at, start.time);
        }
        assert_eq!(start.request, end.request);
        assert_eq!(
            (start.status, start.duration_ms, start.attempt),
            (None, None, None)
        );
        assert!(start.trace.timing.attempts.is_empty());

        assert_eq!(end.status, Some(201));
        assert!(end.duration_ms.is_some_and(|ms| ms >= 0.0));
        assert_eq!(end.upstream.as_deref(), Some("127.0.0.1:9002"));
        assert_eq!(end.attempt, Some(2));
        let attempts = &end.trace.timing.attempts;
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].error.as_deref(), Some("connect refused"));
        assert_eq!((attempts[0].status, attempts[1].status), (None, Some(201)));
    }

    #[test]
    fn the_request_keeps_its_fields_and_secrets_are_redacted() {
        let encoded = pretty_json_login(200);
        let request = decoded(&encoded)[0].request.clone();
        assert_eq!(request.method, "POST");
        assert_eq!(request.url, "/api/user/login");
        assert_eq!(request.url_param, "?a=1&b=3");
        assert_eq!(request.client_ip, "10.0.0.7");
        assert_eq!(request.body, serde_json::json!({"user": "ada"}));
        assert!(!request.body_truncated);
        let headers = &request.headers;
        for secret in ["authorization", "call-service-key", "x-api-token"] {
            assert_eq!(headers[secret], REDACTED, "{secret}");
        }
        assert_eq!(headers["accept"], "text/html, */*");
        assert_eq!(headers["x-quote"], "say \"hi\"\t");
    }

    #[test]
    fn bodies_follow_the_redactor_s_rules() {
        let cases: [(&str, &[u8], bool, serde_json::Value); 5] = [
            (
                "application/x-www-form-urlencoded",
                b"a=1&b=x+y",
                false,
                serde_json::json!({"a": "1", "b": "x y"}),
            ),
            (
                "application/json",
                b"{\"a\":",
                true,
                serde_json::json!("{\"a\":"),
            ),
            (
                "application/json",
                b"not json",
                false,
                serde_json::json!("not json"),
            ),
            ("image/png", b"\x89PNG", false, serde_json::Value::Null),
            ("application/json", b"", false, serde_json::Value::Null),
        ];
        for (content_type, bytes, truncated, expected) in cases {
            let captured = body(bytes, truncated);
            let encoded = tracer().encode(&request(content_type), "", &captured, &record(), 200);
            let event = &decoded(&encoded)[0];
            assert_eq!(event.request.body, expected, "{content_type} {bytes:?}");
            assert_eq!(event.request.body_truncated, truncated);
            let by_redactor = tracer().redactor.body(content_type, bytes, truncated);
            assert_eq!(
                event.request.body, by_redactor,
                "same rules as Redactor::body"
            );
        }
    }

    #[test]
    fn a_request_that_never_reached_a_replica_has_no_upstream() {
        let mut record = record();
        record.attempts.clear();
        let encoded = tracer().encode(&request("text/plain"), "", &body(b"", false), &record, 502);
        let end = &decoded(&encoded)[1];
        assert_eq!(
            (end.status, end.upstream.as_deref(), end.attempt),
            (Some(502), None, None)
        );
    }
}
