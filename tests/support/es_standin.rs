//! A STAND-IN for Elasticsearch, not Elasticsearch: a local HTTP server that answers the
//! endpoints the trace consumer uses (`PUT /_index_template/{name}`, `POST /_bulk` with
//! create semantics and per-item results, `POST /{index}/_search` with a `term` query) and
//! records every request. No Elasticsearch image exists on this machine; the same tests run
//! against a real one in `tests/trace.rs::real_elasticsearch_*` where an image exists.
//!
//! Failures can be injected: whole bulk requests answered 503 or 429, items answered 429,
//! or a bulk that is applied but answered 500 (so the consumer retries and meets 409s).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde_json::{json, Value};

/// What the stand-in will do to the next bulk requests.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// The next N bulk requests are answered with this status and change nothing.
    pub reject_requests: usize,
    pub reject_status: u16,
    /// In the next N bulk requests, every `item_429_every`-th item is answered 429.
    pub flaky_requests: usize,
    pub item_429_every: usize,
    /// The next N bulk requests are applied, then answered 500 (the client cannot tell).
    pub apply_then_fail: usize,
}

#[derive(Default)]
pub struct Store {
    /// `(index, _id) -> document`
    pub documents: BTreeMap<(String, String), Value>,
    pub templates: HashMap<String, Value>,
    /// `METHOD path` of every request, in order.
    pub requests: Vec<String>,
    /// Successful creates per `_id` (must never exceed 1).
    pub creates: HashMap<String, usize>,
    pub faults: Faults,
    pub bulk_requests: usize,
    pub conflicts: usize,
}

#[derive(Clone)]
pub struct EsStandIn {
    pub port: u16,
    pub store: Arc<Mutex<Store>>,
}

impl EsStandIn {
    pub async fn start() -> EsStandIn {
        let store = Arc::new(Mutex::new(Store::default()));
        let app = Router::new()
            .route("/", get(root))
            .route("/_index_template/{name}", put(put_template))
            .route("/_bulk", post(bulk))
            .route("/{index}/_search", post(search).get(search))
            .with_state(store.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        EsStandIn { port, store }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn inject(&self, faults: Faults) {
        self.store.lock().unwrap().faults = faults;
    }

    pub fn document_count(&self) -> usize {
        self.store.lock().unwrap().documents.len()
    }

    /// Documents whose `requestId` is `request_id`, across all indices.
    pub fn by_request(&self, request_id: &str) -> Vec<(String, String, Value)> {
        let store = self.store.lock().unwrap();
        store
            .documents
            .iter()
            .filter(|(_, doc)| doc["requestId"] == request_id)
            .map(|((index, id), doc)| (index.clone(), id.clone(), doc.clone()))
            .collect()
    }
}

fn elastic(status: StatusCode, body: Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    // Real Elasticsearch marks every answer; clients may check it.
    response.headers_mut().insert(
        "x-elastic-product",
        HeaderValue::from_static("Elasticsearch"),
    );
    response
}

async fn root(State(store): State<Arc<Mutex<Store>>>) -> Response {
    store.lock().unwrap().requests.push("GET /".into());
    elastic(
        StatusCode::OK,
        json!({"version": {"number": "9.1.0"}, "tagline": "You Know, for Search"}),
    )
}

async fn put_template(
    State(store): State<Arc<Mutex<Store>>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let mut store = store.lock().unwrap();
    store.requests.push(format!("PUT /_index_template/{name}"));
    match serde_json::from_slice::<Value>(&body) {
        Ok(template) => {
            store.templates.insert(name, template);
            elastic(StatusCode::OK, json!({"acknowledged": true}))
        }
        Err(error) => elastic(StatusCode::BAD_REQUEST, json!({"error": error.to_string()})),
    }
}

async fn bulk(
    State(store): State<Arc<Mutex<Store>>>,
    _headers: HeaderMap,
    body: Bytes,
) -> Response {
    let item_429_every = {
        let mut store = store.lock().unwrap();
        store.requests.push("POST /_bulk".into());
        store.bulk_requests += 1;
        if store.faults.reject_requests > 0 {
            store.faults.reject_requests -= 1;
            let status = StatusCode::from_u16(store.faults.reject_status)
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return elastic(
                status,
                json!({"error": "injected failure", "status": status.as_u16()}),
            );
        }
        if store.faults.flaky_requests > 0 {
            store.faults.flaky_requests -= 1;
            store.faults.item_429_every
        } else {
            0
        }
    };
    // Parsed outside the lock, as Elasticsearch parses concurrent bulks in parallel: under
    // the lock, one consumer's bulk held up the others and blocked a runtime thread.
    let lines = match parse_bulk(&body) {
        Ok(lines) => lines,
        Err(error) => return elastic(StatusCode::BAD_REQUEST, json!({"error": error})),
    };
    let (items, fail_after_apply) = {
        let mut store = store.lock().unwrap();
        let items: Vec<Value> = lines
            .into_iter()
            .enumerate()
            .map(|(at, line)| {
                let rejected = item_429_every > 0 && (at + 1) % item_429_every == 0;
                apply(&mut store, line, rejected)
            })
            .collect();
        let fail = store.faults.apply_then_fail > 0;
        if fail {
            store.faults.apply_then_fail -= 1;
        }
        (items, fail)
    };
    if fail_after_apply {
        return elastic(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "injected failure after apply"}),
        );
    }
    let errors = items
        .iter()
        .any(|i| i["create"]["status"].as_u64() != Some(201));
    elastic(
        StatusCode::OK,
        json!({"took": 1, "errors": errors, "items": items}),
    )
}

/// One `create` of a bulk request: where, which `_id`, and the document if it parsed.
struct BulkCreate {
    index: String,
    id: String,
    document: Option<Value>,
}

/// Reads action/source line pairs; a malformed action line fails the whole request.
fn parse_bulk(body: &[u8]) -> Result<Vec<BulkCreate>, String> {
    let text = String::from_utf8_lossy(body);
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let mut creates = Vec::new();
    while let (Some(action), Some(source)) = (lines.next(), lines.next()) {
        let action: Value = serde_json::from_str(action).map_err(|e| e.to_string())?;
        let meta = &action["create"];
        creates.push(BulkCreate {
            index: meta["_index"].as_str().unwrap_or_default().to_string(),
            id: meta["_id"].as_str().unwrap_or_default().to_string(),
            document: serde_json::from_str::<Value>(source).ok(),
        });
    }
    Ok(creates)
}

/// Applies one create with Elasticsearch's answers: 429 when injected, 400 for a document
/// that is not JSON, 409 for an `_id` already in the index, else 201.
fn apply(store: &mut Store, create: BulkCreate, rejected: bool) -> Value {
    let BulkCreate {
        index,
        id,
        document,
    } = create;
    if rejected {
        return json!({"create": {"_index": index, "_id": id, "status": 429,
            "error": {"type": "es_rejected_execution_exception"}}});
    }
    let Some(document) = document else {
        return json!({"create": {"_index": index, "_id": id, "status": 400,
            "error": {"type": "document_parsing_exception"}}});
    };
    let key = (index.clone(), id.clone());
    if store.documents.contains_key(&key) {
        store.conflicts += 1;
        return json!({"create": {"_index": index, "_id": id, "status": 409,
            "error": {"type": "version_conflict_engine_exception"}}});
    }
    store.documents.insert(key, document);
    *store.creates.entry(id.clone()).or_default() += 1;
    json!({"create": {"_index": index, "_id": id, "status": 201, "result": "created"}})
}

/// `{"query": {"term": {"field": "value"}}}` or `match_all`, over indices matching the
/// path's pattern (`trace_logs*`).
async fn search(
    State(store): State<Arc<Mutex<Store>>>,
    Path(pattern): Path<String>,
    body: Bytes,
) -> Response {
    let mut store = store.lock().unwrap();
    store.requests.push(format!("POST /{pattern}/_search"));
    let query: Value = serde_json::from_slice(&body).unwrap_or(json!({"query": {"match_all": {}}}));
    let term = query["query"]["term"]
        .as_object()
        .and_then(|t| t.iter().next());
    let prefix = pattern.trim_end_matches('*');
    let hits: Vec<Value> = store
        .documents
        .iter()
        .filter(|((index, _), _)| index.starts_with(prefix))
        .filter(|(_, doc)| match term {
            Some((field, wanted)) => {
                let wanted = wanted.get("value").unwrap_or(wanted);
                &doc[field.as_str()] == wanted
            }
            None => true,
        })
        .map(|((index, id), doc)| json!({"_index": index, "_id": id, "_source": doc}))
        .collect();
    elastic(
        StatusCode::OK,
        json!({"hits": {"total": {"value": hits.len(), "relation": "eq"}, "hits": hits}}),
    )
}
