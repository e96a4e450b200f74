//! A STAND-IN for Elasticsearch, not Elasticsearch: a local HTTP server that answers the
//! endpoints the trace consumer uses (`PUT /_index_template/{name}`, `POST /_bulk` with
//! create semantics and per-item results, `POST /{index}/_search` with a `term` query) and
//! records every request. No Elasticsearch image exists on this machine; the same tests run
//! against a real one in `tests/trace.rs::real_elasticsearch_*` where an image exists.
//!
//! It refuses what Elasticsearch 8 refuses, as Elasticsearch answers it: a document whose
//! `status` is not a number (item 400 `document_parsing_exception`, as the template maps
//! it `integer`) and an index name Elasticsearch does not allow (item 400
//! `invalid_index_name_exception`).
//!
//! Failures can be injected: whole bulk requests answered 503 or 429, items answered 429,
//! a bulk that is applied but answered 500 (so the consumer retries and meets 409s), bulks
//! over a size answered 413, a body holding a marker refused whole with 400, the index
//! template refused, and an outage in which every request is answered 503.

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
    /// Bulks of more than N documents are answered 413 with no body, as Elasticsearch's
    /// HTTP layer answers a body over `http.max_content_length`.
    pub largest_bulk: Option<usize>,
    /// A bulk whose body holds this text is refused whole: 400 `x_content_parse_exception`.
    pub poison: Option<String>,
    /// The next N template installs are refused: 400 `illegal_argument_exception`.
    pub refuse_template: usize,
    /// Every request is answered 503 `cluster_block_exception`, as a recovering cluster does.
    pub outage: bool,
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
    /// Bodies of bulk requests refused whole (400, 413), to check none is sent twice.
    pub refused_bodies: Vec<Bytes>,
    /// Requests answered 503 during an injected outage.
    pub outage_answers: usize,
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

    /// Changes some faults and keeps the others.
    pub fn change(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.store.lock().unwrap().faults);
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

/// The answer of a cluster that is not serving, while an outage is injected.
fn outage(store: &mut Store) -> Option<Response> {
    if !store.faults.outage {
        return None;
    }
    store.outage_answers += 1;
    Some(elastic(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": {"type": "cluster_block_exception",
            "reason": "blocked by: [SERVICE_UNAVAILABLE/1/state not recovered / initialized];"},
            "status": 503}),
    ))
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
    if let Some(answer) = outage(&mut store) {
        return answer;
    }
    if store.faults.refuse_template > 0 {
        store.faults.refuse_template -= 1;
        return elastic(
            StatusCode::BAD_REQUEST,
            json!({"error": {"type": "illegal_argument_exception",
                "reason": "index template [trace_logs] has index patterns [trace_logs-*] matching patterns from existing older templates with patterns (older [legacy])"},
                "status": 400}),
        );
    }
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
        if let Some(answer) = outage(&mut store) {
            return answer;
        }
        if let Some(refusal) = refuse_whole(&mut store, &body) {
            return refusal;
        }
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

/// A bulk refused as a whole: too many documents (413, no body) or a body holding the
/// poison marker (400).
fn refuse_whole(store: &mut Store, body: &Bytes) -> Option<Response> {
    let documents = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count()
        / 2;
    let too_large = store
        .faults
        .largest_bulk
        .is_some_and(|most| documents > most);
    let poisoned = store.faults.poison.as_ref().is_some_and(|marker| {
        body.windows(marker.len())
            .any(|window| window == marker.as_bytes())
    });
    let answer = if too_large {
        (StatusCode::PAYLOAD_TOO_LARGE, String::new()).into_response()
    } else if poisoned {
        elastic(
            StatusCode::BAD_REQUEST,
            json!({"error": {"type": "x_content_parse_exception",
                "reason": "[1:27] Unexpected character: was expecting comma to separate Object entries"},
                "status": 400}),
        )
    } else {
        return None;
    };
    store.refused_bodies.push(body.clone());
    Some(answer)
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
    if let Some(reason) = invalid_index_name(&index) {
        return json!({"create": {"_index": index, "_id": id, "status": 400,
            "error": {"type": "invalid_index_name_exception",
                "reason": format!("Invalid index name [{index}], {reason}")}}});
    }
    let Some(document) = document else {
        return json!({"create": {"_index": index, "_id": id, "status": 400,
            "error": {"type": "document_parsing_exception",
                "reason": "[1:1] failed to parse: not JSON"}}});
    };
    if let Some(status) = document
        .get("status")
        .filter(|s| !s.is_number() && !s.is_null())
    {
        return json!({"create": {"_index": index, "_id": id, "status": 400,
            "error": {"type": "document_parsing_exception",
                "reason": format!("[1:2] failed to parse field [status] of type [integer] in document with id '{id}'. Preview of field's value: '{}'", status.as_str().unwrap_or_default())}}});
    }
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

/// Elasticsearch's rules for index names, the ones a trace index could break.
fn invalid_index_name(index: &str) -> Option<&'static str> {
    if index.is_empty() {
        return Some("must not be empty");
    }
    if index.chars().any(|c| c.is_uppercase()) {
        return Some("must be lowercase");
    }
    if index.chars().any(|c| "\\/*?\"<>| ,#:".contains(c)) {
        return Some(
            "must not contain the following characters [ , \", *, \\, <, |, ,, >, /, ?, #, :]",
        );
    }
    if index.starts_with(['-', '_', '+']) {
        return Some("must not start with '_', '-', or '+'");
    }
    None
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
    if let Some(answer) = outage(&mut store) {
        return answer;
    }
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
