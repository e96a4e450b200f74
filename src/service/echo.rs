//! The stock `goms service`: answers every path with the Go original's echo body.
//!
//! `data.body` holds the decoded request body (JSON, url-encoded form, or multipart form;
//! anything else as text), `data.headers` the request headers in canonical case (the
//! service key removed), `data.method` and `data.urlParam` (`?a=1&b=3`, or empty).

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::auth::CALL_SERVICE_KEY_HEADER;

/// Bodies larger than this are refused with 413.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// A router that echoes every request.
pub fn echo_router() -> Router {
    Router::new().fallback(echo)
}

async fn echo(request: Request) -> Response {
    let method = request.method().to_string();
    let url_param = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let headers = canonical_headers(request.headers());
    let body = match decode_body(request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    Json(json!({
        "code": 0,
        "data": {
            "body": body,
            "headers": headers,
            "method": method,
            "urlParam": url_param,
        },
        "msg": "success",
        "status": true,
    }))
    .into_response()
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

async fn decode_body(request: Request) -> Result<Value, Response> {
    let kind = content_type(request.headers());
    if kind.starts_with("multipart/form-data") {
        let multipart = Multipart::from_request(request, &())
            .await
            .map_err(IntoResponse::into_response)?;
        return decode_multipart(multipart).await;
    }
    let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| bad_body(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))?;
    if bytes.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    if kind.starts_with("application/json") {
        return serde_json::from_slice(&bytes).map_err(|error| {
            bad_body(
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON body: {error}"),
            )
        });
    }
    if kind.starts_with("application/x-www-form-urlencoded") {
        let form: Map<String, Value> = url::form_urlencoded::parse(&bytes)
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        return Ok(Value::Object(form));
    }
    Ok(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
}

async fn decode_multipart(mut multipart: Multipart) -> Result<Value, Response> {
    let mut fields = Map::new();
    loop {
        let field = multipart.next_field().await.map_err(|error| {
            bad_body(
                StatusCode::BAD_REQUEST,
                &format!("invalid multipart body: {error}"),
            )
        })?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        let file_name = field.file_name().map(str::to_string);
        let data = field.bytes().await.map_err(|error| {
            bad_body(
                StatusCode::BAD_REQUEST,
                &format!("invalid multipart body: {error}"),
            )
        })?;
        let value = match file_name {
            Some(file_name) => json!({"filename": file_name, "size": data.len()}),
            None => Value::String(String::from_utf8_lossy(&data).into_owned()),
        };
        fields.insert(name, value);
    }
    Ok(Value::Object(fields))
}

fn bad_body(status: StatusCode, message: &str) -> Response {
    let body = json!({"code": status.as_u16(), "msg": message, "status": false});
    (status, Json(body)).into_response()
}

/// `content-type` -> `Content-Type`, as goms printed them; the service key is left out.
fn canonical_headers(headers: &HeaderMap) -> Map<String, Value> {
    headers
        .iter()
        .filter(|(name, _)| name.as_str() != CALL_SERVICE_KEY_HEADER)
        .map(|(name, value)| {
            (
                canonical_name(name.as_str()),
                Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            )
        })
        .collect()
}

fn canonical_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    #[test]
    fn canonical_header_names() {
        assert_eq!(canonical_name("content-type"), "Content-Type");
        assert_eq!(canonical_name("x-request-id"), "X-Request-Id");
    }
}
