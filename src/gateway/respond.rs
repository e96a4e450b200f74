//! Responses the gateway writes itself: the Go original's JSON envelope for errors (a gRPC
//! status for a gRPC call), and JSON documents.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde::Serialize;

use super::grpc;
use crate::trace::REQUEST_ID_HEADER;

/// The Go original's error body: `{"code":N,"msg":"...","status":false,"requestId":"..."}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorEnvelope<'a> {
    pub code: u16,
    pub msg: &'a str,
    pub status: bool,
    pub request_id: &'a str,
}

/// Writes an error envelope with `status` as both the HTTP status and `code`.
pub async fn write_error(
    session: &mut Session,
    status: u16,
    message: &str,
    request_id: &str,
) -> pingora::Result<()> {
    write_error_with(session, status, message, request_id, &[]).await
}

/// [`write_error`] with extra headers, such as `Retry-After`. A gRPC call gets the status
/// gRPC has for `status` instead, and no body.
pub async fn write_error_with(
    session: &mut Session,
    status: u16,
    message: &str,
    request_id: &str,
    extra: &[(http::header::HeaderName, http::HeaderValue)],
) -> pingora::Result<()> {
    if grpc::is_grpc(session.req_header()) {
        let code = grpc::Code::of_http(status);
        return grpc::write_status(session, code, message, request_id).await;
    }
    let envelope = ErrorEnvelope {
        code: status,
        msg: message,
        status: false,
        request_id,
    };
    let body = serde_json::to_vec(&envelope).expect("envelope serialises");
    write_response(
        session,
        status,
        "application/json",
        body,
        Some(request_id),
        extra,
    )
    .await
}

/// The `Strict-Transport-Security` value for this request's answers, set in the request's
/// extensions when it came over HTTPS and `gateway.tls.hsts` is set: the answers the gateway
/// writes itself carry it as the replicas' answers do.
#[derive(Clone)]
pub struct Hsts(pub http::HeaderValue);

/// Writes a complete JSON response.
pub async fn write_json(
    session: &mut Session,
    status: u16,
    body: Vec<u8>,
    request_id: Option<&str>,
) -> pingora::Result<()> {
    write_body(session, status, "application/json", body, request_id).await
}

/// Writes a complete response.
pub async fn write_body(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Vec<u8>,
    request_id: Option<&str>,
) -> pingora::Result<()> {
    write_response(session, status, content_type, body, request_id, &[]).await
}

async fn write_response(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Vec<u8>,
    request_id: Option<&str>,
    extra: &[(http::header::HeaderName, http::HeaderValue)],
) -> pingora::Result<()> {
    let mut header = ResponseHeader::build(status, Some(4 + extra.len()))?;
    header.insert_header(http::header::CONTENT_TYPE, content_type)?;
    for (name, value) in extra {
        header.insert_header(name.clone(), value.clone())?;
    }
    header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    if let Some(request_id) = request_id {
        header.insert_header(REQUEST_ID_HEADER, request_id)?;
    }
    if let Some(Hsts(hsts)) = session.req_header().extensions.get::<Hsts>() {
        header.insert_header(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone())?;
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}
