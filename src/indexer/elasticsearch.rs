//! The Elasticsearch side of the trace consumer: the index template and `_bulk` indexing
//! with create semantics, reported per item so only failed items are retried. The client
//! and how Elasticsearch's failures read are the trace's ([`crate::trace::search`]).

use elasticsearch::indices::IndicesPutIndexTemplateParts;
use elasticsearch::BulkParts;
use serde_json::{json, Value};

use crate::trace::search::error_summary;
pub use crate::trace::search::{EsError, TraceIndex};

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

impl TraceIndex {
    /// Creates or updates the index template for `<prefix>-*`.
    pub async fn ensure_template(&self) -> Result<(), EsError> {
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

    /// Indexes `items` with `create` (so a redelivered event is a 409, not a duplicate) and
    /// reports each item's outcome in order.
    pub async fn bulk(&self, items: &[BulkItem<'_>]) -> Result<Vec<ItemOutcome>, EsError> {
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
                    "grpc": {"properties": {
                        "method": keyword, "status": {"type": "integer"}
                    }},
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
}
