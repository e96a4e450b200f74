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

pub mod json;

use super::record::RequestRecord;
use crate::trace::{rfc3339, BodyCapture, BodyKind, Redactor, REDACTED};
use json::Object;

/// Who emits: the gateway's node identity and project label.
pub struct GatewayTracer {
    pub node_id: String,
    pub project_name: String,
    pub redactor: Redactor,
}

impl GatewayTracer {
    /// Events [`GatewayTracer::write`] writes per request.
    pub const EVENTS_PER_REQUEST: usize = 2;

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
        if let Some(call) = &record.grpc {
            let mut grpc = Object::begin(end.key("grpc"));
            grpc.str("method", &call.method);
            if let Some(code) = call.status {
                grpc.uint("status", u64::from(code));
            }
            grpc.end();
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
                connected: None,
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

    /// The request's two events as NDJSON lines, as the proxy writes them into the queue.
    fn encode(
        tracer: &GatewayTracer,
        header: &RequestHeader,
        client_ip: &str,
        body: &BodyCapture,
        record: &RequestRecord,
        status: u16,
    ) -> Vec<u8> {
        let mut lines = Vec::new();
        tracer.write(&mut lines, header, client_ip, body, record, status);
        lines
    }

    /// A login POST with a pretty-printed JSON body, answered with `status` on the 2nd try.
    fn pretty_json_login(status: u16) -> Vec<u8> {
        encode(
            &tracer(),
            &request("application/json"),
            "10.0.0.7",
            &body(b"{\n  \"user\": \"ada\"\n}", false),
            &record(),
            status,
        )
    }

    fn decoded(lines: &[u8]) -> Vec<TraceEvent> {
        lines
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).expect("an event per line"))
            .collect()
    }

    #[test]
    fn both_events_read_back_as_the_trace_event_schema() {
        let encoded = pretty_json_login(201);
        assert_eq!(encoded.iter().filter(|&&b| b == b'\n').count(), 2);
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
            let encoded = encode(
                &tracer(),
                &request(content_type),
                "",
                &captured,
                &record(),
                200,
            );
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
        let encoded = encode(
            &tracer(),
            &request("text/plain"),
            "",
            &body(b"", false),
            &record,
            502,
        );
        let end = &decoded(&encoded)[1];
        assert_eq!(
            (end.status, end.upstream.as_deref(), end.attempt),
            (Some(502), None, None)
        );
    }
}

/// The gateway's hand-written events and the serde [`TraceEvent`] are two writers of one
/// schema. These tests build random requests, write each with both, and compare the parsed
/// documents; a field added to [`TraceEvent`] fails them until the gateway writes it too.
#[cfg(test)]
mod same_schema_as_trace_event {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;
    use crate::gateway::record::Attempt;
    use crate::trace::{
        millis, AttemptTiming, EventKind, RequestInfo, Timing, TraceContext, TraceEvent,
        TraceTiming,
    };

    /// Everything the gateway's writer reads, in a form proptest can generate.
    #[derive(Debug, Clone)]
    struct Input {
        method: &'static str,
        path: String,
        query: Option<String>,
        headers: Vec<(String, Vec<u8>)>,
        content_type: Option<&'static str>,
        body: Vec<u8>,
        truncated: bool,
        client_ip: String,
        request_id: String,
        traceparent: bool,
        attempts: Vec<(Option<u16>, Option<String>, u64)>,
        status: u16,
    }

    fn input() -> impl Strategy<Value = Input> {
        let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]);
        let path = "(/[a-zA-Z0-9._~%-]{0,8}){1,4}";
        let query = prop::option::of("[a-zA-Z0-9=&%+._-]{0,24}");
        let name = prop_oneof![
            "[a-z][a-z0-9-]{0,11}",
            prop::sample::select(vec![
                "authorization".to_string(),
                "cookie".to_string(),
                "call-service-key".to_string(),
                "x-api-token".to_string(),
                "accept".to_string(),
            ]),
        ];
        // Visible ASCII, space, tab and obs-text: every byte an HTTP header value may hold.
        let value =
            prop::collection::vec(prop_oneof![0x20u8..0x7f, Just(b'\t'), 0x80u8..=0xff], 0..24);
        let headers = prop::collection::vec((name, value), 0..8);
        let content_type = prop::option::of(prop::sample::select(vec![
            "application/json",
            "application/vnd.api+json; charset=utf-8",
            "application/x-www-form-urlencoded",
            "text/plain",
            "image/png",
        ]));
        let body = prop_oneof![
            Just(Vec::new()),
            any::<Vec<u8>>(),
            json_text(),
            "([a-z%+]{0,6}=[a-zA-Z0-9%+ ]{0,8}&){0,4}".prop_map(String::into_bytes),
        ];
        let attempts = prop::collection::vec(
            (
                prop::option::of(200u16..600),
                prop::option::of("[ -~\t\n\"\\\\]{0,20}"),
                0u64..5_000_000,
            ),
            0..4,
        );
        (
            (method, path, query, headers, content_type, body),
            (
                any::<bool>(),
                "[0-9a-f.:]{0,15}",
                "[A-Za-z0-9-]{1,36}",
                any::<bool>(),
                attempts,
                100u16..600,
            ),
        )
            .prop_map(
                |(
                    (method, path, query, headers, content_type, body),
                    (truncated, client_ip, request_id, traceparent, attempts, status),
                )| Input {
                    method,
                    path,
                    query,
                    headers,
                    content_type,
                    body,
                    truncated,
                    client_ip,
                    request_id,
                    traceparent,
                    attempts,
                    status,
                },
            )
    }

    /// JSON bodies, pretty-printed or compact, with strings that need escaping.
    fn json_text() -> impl Strategy<Value = Vec<u8>> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            "[ -~\t\n\u{e9}\u{1F600}\"\\\\]{0,12}".prop_map(Value::String),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z\"]{0,4}", inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        });
        (value, any::<bool>()).prop_map(|(value, pretty)| {
            if pretty {
                serde_json::to_vec_pretty(&value).unwrap()
            } else {
                serde_json::to_vec(&value).unwrap()
            }
        })
    }

    fn tracer() -> GatewayTracer {
        GatewayTracer {
            node_id: "10.0.0.2:8080".into(),
            project_name: "shop \"east\"".into(),
            redactor: Redactor::new(&["X-Api-Token".into()], 64),
        }
    }

    fn header_of(input: &Input) -> RequestHeader {
        let uri = match &input.query {
            Some(query) => format!("{}?{query}", input.path),
            None => input.path.clone(),
        };
        let mut header = RequestHeader::build(input.method, uri.as_bytes(), None).unwrap();
        if let Some(content_type) = input.content_type {
            header.append_header("content-type", content_type).unwrap();
        }
        for (name, value) in &input.headers {
            let value = http::HeaderValue::from_bytes(value).unwrap();
            header.append_header(name.clone(), value).unwrap();
        }
        header
    }

    fn record_of(input: &Input) -> RequestRecord {
        let traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace =
            TraceContext::continue_or_start(input.traceparent.then_some(traceparent.as_slice()));
        let mut record = RequestRecord::new(input.request_id.clone(), trace);
        for (index, (status, error, micros)) in input.attempts.iter().enumerate() {
            let started = Instant::now();
            let node: Arc<str> = Arc::from(format!("127.0.0.{}:9000", index + 1));
            record.attempts.push(Attempt {
                node_id: node.clone(),
                upstream: node,
                started,
                finished: Some(started + Duration::from_micros(*micros)),
                connected: None,
                status: *status,
                error: error.clone(),
            });
        }
        record
    }

    /// The two events as the serde schema writes them from the same request. `written` (the
    /// gateway's documents) gives what depends on the clock or randomness: event ids, the
    /// end's time and its duration.
    fn reference_events(
        tracer: &GatewayTracer,
        input: &Input,
        header: &RequestHeader,
        record: &RequestRecord,
        written: &[Value],
    ) -> [TraceEvent; 2] {
        let redactor = &tracer.redactor;
        let headers = redactor.headers(
            header
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        );
        let request = Arc::new(RequestInfo {
            method: input.method.to_string(),
            url: header.uri.path().to_string(),
            url_param: header
                .uri
                .query()
                .map(|query| format!("?{query}"))
                .unwrap_or_default(),
            client_ip: input.client_ip.clone(),
            headers,
            body: redactor.body(
                input.content_type.unwrap_or_default(),
                &input.body,
                input.truncated,
            ),
            body_truncated: input.truncated,
        });
        let received_at = rfc3339(record.received_at);
        let attempts = record
            .attempts
            .iter()
            .map(|attempt| AttemptTiming {
                node: attempt.node_id.to_string(),
                upstream: attempt.upstream.to_string(),
                duration_ms: millis(attempt.finished.unwrap() - attempt.started),
                status: attempt.status,
                error: attempt.error.clone(),
            })
            .collect();
        let text = |event: &Value, key: &str| event[key].as_str().unwrap().to_string();
        let event = |kind, written: &Value, attempts| TraceEvent {
            event_id: text(written, "eventId"),
            request_id: record.request_id.clone(),
            event: kind,
            time: text(written, "time"),
            service_name: crate::gateway::GATEWAY_SERVICE.to_string(),
            service_id: tracer.node_id.clone(),
            project_name: tracer.project_name.clone(),
            request: request.clone(),
            trace: TraceTiming {
                timing: Timing {
                    started_at: received_at.clone(),
                    attempts,
                },
            },
            duration_ms: None,
            status: None,
            upstream: None,
            attempt: None,
            trace_id: record.trace.trace_id.clone(),
            span_id: record.trace.span_id.clone(),
            parent_span_id: record.trace.parent_span_id.clone(),
        };
        let start = event(EventKind::RequestStart, &written[0], Vec::new());
        let mut end = event(EventKind::RequestEnd, &written[1], attempts);
        end.duration_ms = written[1]["durationMs"].as_f64();
        end.status = Some(input.status);
        end.upstream = record.attempts.last().map(|last| last.upstream.to_string());
        end.attempt = (!record.attempts.is_empty()).then_some(record.attempts.len() as u32);
        [start, end]
    }

    fn parsed(lines: &[u8]) -> Vec<Value> {
        lines
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).expect("each line is one JSON document"))
            .collect()
    }

    /// Numbers as floats: the gateway writes a whole number of milliseconds as `795`, serde
    /// as `795.0`, and both are the same `durationMs` to every reader.
    fn numbers_as_floats(value: Value) -> Value {
        match value {
            Value::Number(number) => Value::from(number.as_f64().expect("finite")),
            Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_floats).collect()),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(key, inner)| (key, numbers_as_floats(inner)))
                    .collect(),
            ),
            other => other,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn both_writers_give_the_same_documents(input in input()) {
            let tracer = tracer();
            let header = header_of(&input);
            let record = record_of(&input);
            let body = BodyCapture { bytes: input.body.clone(), truncated: input.truncated };
            let mut lines = Vec::new();
            tracer.write(&mut lines, &header, &input.client_ip, &body, &record, input.status);
            prop_assert_eq!(lines.iter().filter(|&&b| b == b'\n').count(), 2);
            let written = parsed(&lines);

            let expected = reference_events(&tracer, &input, &header, &record, &written);
            for (written, expected) in written.iter().zip(&expected) {
                let written = &numbers_as_floats(written.clone());
                let expected = numbers_as_floats(serde_json::to_value(expected).unwrap());
                for key in expected.as_object().unwrap().keys() {
                    prop_assert_eq!(&written[key], &expected[key], "field {}", key);
                }
                prop_assert_eq!(written, &expected);
            }
        }
    }

    /// Every key a [`TraceEvent`] can hold, at every level, with every option set.
    fn all_keys(value: &Value, prefix: &str, keys: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    let path = format!("{prefix}{key}");
                    keys.insert(path.clone());
                    // Header names and body fields are data, not schema.
                    if key != "headers" && key != "body" {
                        all_keys(inner, &format!("{path}."), keys);
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    all_keys(item, &format!("{prefix}[]."), keys);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_gateway_writes_every_field_of_the_schema() {
        let full = TraceEvent {
            event_id: "e".into(),
            request_id: "r".into(),
            event: EventKind::RequestEnd,
            time: "t".into(),
            service_name: "gateway".into(),
            service_id: "s".into(),
            project_name: "p".into(),
            request: Arc::new(RequestInfo {
                method: "GET".into(),
                url: "/".into(),
                url_param: String::new(),
                client_ip: String::new(),
                headers: Default::default(),
                body: Value::Null,
                body_truncated: false,
            }),
            trace: TraceTiming {
                timing: Timing {
                    started_at: "t".into(),
                    attempts: vec![AttemptTiming {
                        node: "n".into(),
                        upstream: "u".into(),
                        duration_ms: 1.0,
                        status: Some(200),
                        error: Some("e".into()),
                    }],
                },
            },
            duration_ms: Some(1.0),
            status: Some(200),
            upstream: Some("u".into()),
            attempt: Some(1),
            trace_id: "t".into(),
            span_id: "s".into(),
            parent_span_id: Some("p".into()),
        };
        let mut schema = BTreeSet::new();
        all_keys(&serde_json::to_value(&full).unwrap(), "", &mut schema);

        let input = Input {
            method: "POST",
            path: "/api/user/login".into(),
            query: None,
            headers: Vec::new(),
            content_type: None,
            body: Vec::new(),
            truncated: false,
            client_ip: "10.0.0.7".into(),
            request_id: "r".into(),
            traceparent: true,
            attempts: vec![(Some(200), Some("reset".into()), 10)],
            status: 200,
        };
        let mut lines = Vec::new();
        tracer().write(
            &mut lines,
            &header_of(&input),
            &input.client_ip,
            &BodyCapture::default(),
            &record_of(&input),
            input.status,
        );
        let mut written = BTreeSet::new();
        all_keys(&parsed(&lines)[1], "", &mut written);
        assert_eq!(written, schema, "request.end against the TraceEvent schema");
    }
}
