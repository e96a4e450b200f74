//! The Elasticsearch side of the trace consumer: the index template and `_bulk` indexing
//! with create semantics, reported per item so only failed items are retried, and how
//! Elasticsearch's refusals read (one line: what was refused, the error type and reason).

use std::time::Duration;

use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::indices::IndicesPutIndexTemplateParts;
use elasticsearch::{BulkParts, Elasticsearch};
use serde_json::{json, Value};
use url::Url;

/// Timeout of one request to Elasticsearch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Elasticsearch address `{0}` is not a URL")]
    Address(String),
    #[error("Elasticsearch client: {0}")]
    Build(#[from] elasticsearch::http::transport::BuildError),
    /// No answer: shows the root cause only ("no such host", "connection refused"), not the
    /// client's nested error.
    #[error("Elasticsearch {address}: {}", unreachable_because(source))]
    Unreachable {
        address: String,
        #[source]
        source: elasticsearch::Error,
    },
    #[error("Elasticsearch {address} answered {status}: {reason}")]
    Status {
        address: String,
        status: u16,
        reason: String,
    },
}

impl SinkError {
    /// Elasticsearch refused the request as a whole for what it holds (a body it cannot
    /// parse, 400; one too large, 413): sending it again unchanged would be refused again.
    pub fn refuses_whole_request(&self) -> bool {
        matches!(
            self,
            SinkError::Status {
                status: 400 | 413,
                ..
            }
        )
    }

    /// An answer that refuses the request for good (4xx other than 408 and 429), as opposed to
    /// an Elasticsearch that is away or busy.
    pub fn is_refusal(&self) -> bool {
        matches!(self, SinkError::Status { status, .. }
            if (400..500).contains(status) && *status != 408 && *status != 429)
    }
}

fn unreachable_because(error: &elasticsearch::Error) -> String {
    use crate::diagnostics::{io_root, root_cause};
    let cause = root_cause(error);
    if let Some(io) = io_root(error) {
        match io.kind() {
            std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
            std::io::ErrorKind::TimedOut => return format!("no answer within {REQUEST_TIMEOUT:?}"),
            _ => {}
        }
    }
    if cause.contains("failed to lookup address") || cause.contains("dns error") {
        return format!("no such host ({cause})");
    }
    if error.to_string().contains("timed out") || cause.contains("timed out") {
        return format!("no answer within {REQUEST_TIMEOUT:?}");
    }
    cause
}

/// An Elasticsearch error answer in one line: `type: reason` of its `error` object, else
/// the start of the body.
fn error_summary(error: &Value) -> String {
    match (error["type"].as_str(), error["reason"].as_str()) {
        (Some(kind), Some(reason)) => format!("{kind}: {reason}"),
        (Some(kind), None) => kind.to_string(),
        _ => match error {
            Value::Null => "no error detail".into(),
            Value::String(text) => text.clone(),
            other => other.to_string(),
        },
    }
}

fn body_summary(body: &str) -> String {
    if body.trim().is_empty() {
        return "no body".into();
    }
    match serde_json::from_str::<Value>(body) {
        Ok(document) if document.get("error").is_some() => error_summary(&document["error"]),
        _ => {
            let line = body.lines().next().unwrap_or_default().trim();
            line.chars().take(200).collect()
        }
    }
}

/// What became of one document in a bulk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Indexed now.
    Created,
    /// Already indexed earlier (409): a redelivery, which counts as success.
    AlreadyIndexed,
    /// Elasticsearch was busy or failing (429, 5xx): try this item again.
    Retry(String),
    /// Elasticsearch will never take it (mapping error, say): dead-letter it.
    Rejected(String),
}

/// One document to index.
pub struct BulkItem<'a> {
    pub index: &'a str,
    pub id: &'a str,
    pub source: &'a [u8],
}

#[derive(Clone)]
pub struct TraceIndex {
    client: Elasticsearch,
    address: String,
    prefix: String,
}

impl TraceIndex {
    pub fn new(address: &str, prefix: &str) -> Result<Self, SinkError> {
        let url = Url::parse(address).map_err(|_| SinkError::Address(address.to_string()))?;
        let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        Ok(TraceIndex {
            client: Elasticsearch::new(transport),
            address: address.trim_end_matches('/').to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// Creates or updates the index template for `<prefix>-*`.
    pub async fn ensure_template(&self) -> Result<(), SinkError> {
        let response = self
            .client
            .indices()
            .put_index_template(IndicesPutIndexTemplateParts::Name(&self.prefix))
            .body(index_template(&self.prefix))
            .send()
            .await
            .map_err(|source| self.unreachable(source))?;
        self.refused(response).await.map(drop)
    }

    /// Every event of one request, across the daily indices (`<prefix>*`), oldest first: what
    /// the dashboard's timeline and `goms trace` show of the services.
    pub async fn events_of(&self, request_id: &str) -> Result<Vec<Value>, SinkError> {
        let pattern = format!("{}*", self.prefix);
        let response = self
            .client
            .search(elasticsearch::SearchParts::Index(&[&pattern]))
            .body(json!({
                "query": {"term": {"requestId": request_id}},
                "size": 1000,
                "sort": [{"time": "asc"}],
            }))
            .send()
            .await
            .map_err(|source| self.unreachable(source))?;
        let response = self.refused(response).await?;
        let document: Value = response
            .json()
            .await
            .map_err(|source| self.unreachable(source))?;
        let mut events: Vec<Value> = document["hits"]["hits"]
            .as_array()
            .map(|hits| hits.iter().map(|hit| hit["_source"].clone()).collect())
            .unwrap_or_default();
        events.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
        Ok(events)
    }

    pub fn template_name(&self) -> &str {
        &self.prefix
    }

    fn unreachable(&self, source: elasticsearch::Error) -> SinkError {
        SinkError::Unreachable {
            address: self.address.clone(),
            source,
        }
    }

    /// The response if it is a success, else the refusal it carries.
    async fn refused(
        &self,
        response: elasticsearch::http::response::Response,
    ) -> Result<elasticsearch::http::response::Response, SinkError> {
        let status = response.status_code().as_u16();
        if status < 300 {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(SinkError::Status {
            address: self.address.clone(),
            status,
            reason: body_summary(&body),
        })
    }

    /// Indexes `items` with `create` (so a redelivered event is a 409, not a duplicate) and
    /// reports each item's outcome in order.
    pub async fn bulk(&self, items: &[BulkItem<'_>]) -> Result<Vec<ItemOutcome>, SinkError> {
        let mut lines = Vec::with_capacity(items.len() * 2);
        for item in items {
            lines.push(json!({"create": {"_index": item.index, "_id": item.id}}).to_string());
            lines.push(String::from_utf8_lossy(item.source).into_owned());
        }
        let response = self
            .client
            .bulk(BulkParts::None)
            .body(lines)
            .send()
            .await
            .map_err(|source| self.unreachable(source))?;
        let response = self.refused(response).await?;
        let body: Value = response
            .json()
            .await
            .map_err(|source| self.unreachable(source))?;
        Ok(item_outcomes(&body, items.len()))
    }
}

/// Reads per-item results; an item missing from the answer is retried.
fn item_outcomes(body: &Value, expected: usize) -> Vec<ItemOutcome> {
    let items = body["items"].as_array().cloned().unwrap_or_default();
    (0..expected)
        .map(|index| {
            let Some(item) = items.get(index) else {
                return ItemOutcome::Retry("missing from the bulk answer".into());
            };
            let result = item
                .get("create")
                .or_else(|| item.get("index"))
                .unwrap_or(item);
            let status = result["status"].as_u64().unwrap_or(0);
            let reason = || error_summary(&result["error"]);
            match status {
                200 | 201 => ItemOutcome::Created,
                409 => ItemOutcome::AlreadyIndexed,
                429 | 500..=599 | 0 => ItemOutcome::Retry(format!("{status}: {}", reason())),
                _ => ItemOutcome::Rejected(format!("{status}: {}", reason())),
            }
        })
        .collect()
}

/// Mappings for trace events: ids as keywords, `time` as a date, `durationMs` numeric;
/// headers `flattened` and bodies kept but not indexed, so arbitrary client data can never
/// cause a mapping conflict.
pub fn index_template(prefix: &str) -> Value {
    let keyword = json!({"type": "keyword"});
    json!({
        "index_patterns": [format!("{prefix}-*")],
        "template": {
            "settings": {"number_of_shards": 1},
            "mappings": {
                "dynamic": false,
                "properties": {
                    "eventId": keyword, "requestId": keyword, "event": keyword,
                    "time": {"type": "date"},
                    "serviceName": keyword, "serviceId": keyword, "projectName": keyword,
                    "durationMs": {"type": "double"},
                    "status": {"type": "integer"},
                    "upstream": keyword,
                    "attempt": {"type": "integer"},
                    "traceId": keyword, "spanId": keyword, "parentSpanId": keyword,
                    "request": {"properties": {
                        "method": keyword, "url": keyword, "urlParam": keyword, "clientIp": keyword,
                        "headers": {"type": "flattened"},
                        "body": {"type": "object", "enabled": false},
                        "bodyTruncated": {"type": "boolean"}
                    }},
                    "trace": {"type": "object", "enabled": false}
                }
            }
        },
        "priority": 100
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_item_outcomes() {
        let body = json!({"errors": true, "items": [
            {"create": {"_id": "a", "status": 201}},
            {"create": {"_id": "b", "status": 409, "error": {"type": "version_conflict_engine_exception"}}},
            {"create": {"_id": "c", "status": 429, "error": {"type": "es_rejected_execution_exception"}}},
            {"create": {"_id": "d", "status": 400, "error": {"type": "mapper_parsing_exception"}}}
        ]});
        let outcomes = item_outcomes(&body, 5);
        assert_eq!(outcomes[0], ItemOutcome::Created);
        assert_eq!(outcomes[1], ItemOutcome::AlreadyIndexed);
        assert!(matches!(outcomes[2], ItemOutcome::Retry(_)));
        assert!(matches!(outcomes[3], ItemOutcome::Rejected(_)));
        assert!(matches!(outcomes[4], ItemOutcome::Retry(_)));
    }

    #[test]
    fn refusals_read_as_one_line() {
        let body = r#"{"error":{"root_cause":[{"type":"x_content_parse_exception","reason":"[1:2] bad"}],"type":"x_content_parse_exception","reason":"[1:2] bad"},"status":400}"#;
        assert_eq!(body_summary(body), "x_content_parse_exception: [1:2] bad");
        assert_eq!(body_summary(""), "no body");
        assert_eq!(body_summary("<html>\n<h1>413</h1>"), "<html>");
        let item = json!({"type": "document_parsing_exception", "reason": "[1:9] failed to parse field [status]"});
        assert_eq!(
            error_summary(&item),
            "document_parsing_exception: [1:9] failed to parse field [status]"
        );
    }
}
