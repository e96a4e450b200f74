//! Reading a request's trace events back from Elasticsearch (`trace_logs*` by `requestId`),
//! for the dashboard's timeline and `goms trace`, and the client and errors that the trace
//! consumer's indexing (`indexer`) shares: one connection set-up, and Elasticsearch's
//! failures read the same way everywhere (one line: what was refused, the error type and
//! reason, or the root cause of no answer).

use std::time::Duration;

use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::Elasticsearch;
use serde_json::{json, Value};
use url::Url;

/// Timeout of one request to Elasticsearch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EsError {
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

impl EsError {
    /// Elasticsearch refused the request as a whole for what it holds (a body it cannot
    /// parse, 400; one too large, 413): sending it again unchanged would be refused again.
    pub fn refuses_whole_request(&self) -> bool {
        matches!(
            self,
            EsError::Status {
                status: 400 | 413,
                ..
            }
        )
    }

    /// An answer that refuses the request for good (4xx other than 408 and 429), as opposed to
    /// an Elasticsearch that is away or busy.
    pub fn is_refusal(&self) -> bool {
        matches!(self, EsError::Status { status, .. }
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
pub(crate) fn error_summary(error: &Value) -> String {
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

/// The trace indices of one Elasticsearch: `<prefix>*`, a daily index each.
#[derive(Clone)]
pub struct TraceIndex {
    pub(crate) client: Elasticsearch,
    pub(crate) address: String,
    pub(crate) prefix: String,
}

impl TraceIndex {
    pub fn new(address: &str, prefix: &str) -> Result<Self, EsError> {
        let url = Url::parse(address).map_err(|_| EsError::Address(address.to_string()))?;
        let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .timeout(REQUEST_TIMEOUT)
            .build()?;
        Ok(TraceIndex {
            client: Elasticsearch::new(transport),
            address: address.trim_end_matches('/').to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// Every event of one request, across the daily indices (`<prefix>*`), oldest first: what
    /// the dashboard's timeline and `goms trace` show of the services.
    pub async fn events_of(&self, request_id: &str) -> Result<Vec<Value>, EsError> {
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

    pub(crate) fn unreachable(&self, source: elasticsearch::Error) -> EsError {
        EsError::Unreachable {
            address: self.address.clone(),
            source,
        }
    }

    /// The response if it is a success, else the refusal it carries.
    pub(crate) async fn refused(
        &self,
        response: elasticsearch::http::response::Response,
    ) -> Result<elasticsearch::http::response::Response, EsError> {
        let status = response.status_code().as_u16();
        if status < 300 {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(EsError::Status {
            address: self.address.clone(),
            status,
            reason: body_summary(&body),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
