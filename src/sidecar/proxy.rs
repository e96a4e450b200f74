//! The sidecar's request path: a pingora proxy with one upstream, the app. It checks and
//! strips `Call-Service-Key`, forwards everything else as it came, stamps `X-Served-By`, and
//! wraps each request in `service.start`/`service.end`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::services::listening::ConnectionLimit;
use pingora::{Error, ErrorSource, ErrorType};

use crate::registry::drain::InFlight;
use crate::registry::Drain;
use crate::service::auth::{
    envelope, refusal, AcceptedKeys, CALL_SERVICE_KEY_HEADER, SERVED_BY_HEADER,
};
use crate::service::tracing_layer::{ServiceSpan, ServiceTracer};
use crate::trace::{request_id_or_new, REQUEST_ID_HEADER};

/// Everything the filters share; one per sidecar.
pub struct SidecarProxy {
    pub app: std::net::SocketAddr,
    /// `callServiceKey` and `previousCallServiceKeys`.
    pub keys: AcceptedKeys,
    pub node_id: http::HeaderValue,
    pub tracer: ServiceTracer,
    pub app_connect_timeout: Duration,
    pub app_timeout: Duration,
    pub drain: Arc<Drain>,
    pub counters: Arc<ProxyCounters>,
}

/// What `/metrics` reports of the request path.
#[derive(Debug)]
pub struct ProxyCounters {
    pub requests: AtomicU64,
    /// Refused for a missing or wrong key; the app never saw them.
    pub refused: AtomicU64,
    /// Answered 502 or 504 because the app could not be reached or did not answer in time.
    pub app_failures: AtomicU64,
    /// Connections answered 408 for a request header slower than `gateway.limits.headerTimeout`.
    pub header_timeouts: AtomicU64,
    /// Connections open and refused at `gateway.limits.maxConnections`.
    pub connections: Arc<ConnectionLimit>,
}

impl ProxyCounters {
    pub fn new(connections: Arc<ConnectionLimit>) -> Self {
        ProxyCounters {
            requests: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            app_failures: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            connections,
        }
    }
}

/// Per-request state.
#[derive(Default)]
pub struct SidecarCtx {
    _in_flight: Option<InFlight>,
    request_id: String,
    span: Option<ServiceSpan>,
    /// The status the caller got, for `service.end`.
    status: u16,
}

#[async_trait]
impl ProxyHttp for SidecarProxy {
    type CTX = SidecarCtx;

    fn new_ctx(&self) -> SidecarCtx {
        SidecarCtx {
            _in_flight: Some(self.drain.request()),
            ..SidecarCtx::default()
        }
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut SidecarCtx,
    ) -> pingora::Result<bool> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let header = session.req_header();
        ctx.request_id =
            request_id_or_new(header.headers.get(REQUEST_ID_HEADER).map(|v| v.as_bytes()));
        let presented = header
            .headers
            .get(CALL_SERVICE_KEY_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !self.keys.accept(presented) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            let body = refusal(&ctx.request_id);
            // Its body, if any, was not read: the connection cannot carry another request.
            session.set_keepalive(None);
            self.write_json(session, 401, &body, &ctx.request_id)
                .await?;
            return Ok(true);
        }
        ctx.span = self
            .tracer
            .begin(&header.method, &header.uri, &header.headers);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut SidecarCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.app, false, String::new());
        peer.options.connection_timeout = Some(self.app_connect_timeout);
        peer.options.read_timeout = Some(self.app_timeout);
        peer.options.write_timeout = Some(self.app_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    /// The app never sees the shared key; it gets the request id the events carry.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut SidecarCtx,
    ) -> pingora::Result<()> {
        upstream.remove_header(CALL_SERVICE_KEY_HEADER);
        if upstream.headers.get(REQUEST_ID_HEADER).is_none() {
            upstream.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut SidecarCtx,
    ) -> pingora::Result<()> {
        ctx.status = response.status.as_u16();
        response.insert_header(SERVED_BY_HEADER, self.node_id.clone())?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut SidecarCtx,
    ) -> FailToProxy {
        let code = match error.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
            _ if error.esource() == &ErrorSource::Downstream => 0,
            _ => 502,
        };
        if code > 0 {
            ctx.status = code;
            self.counters.app_failures.fetch_add(1, Ordering::Relaxed);
            let message = if code == 504 {
                "the app did not answer in time"
            } else {
                "the app could not be reached"
            };
            let body = envelope(code, message, &ctx.request_id);
            session.set_keepalive(None);
            let _ = self.write_json(session, code, &body, &ctx.request_id).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, _session: &mut Session, _error: Option<&Error>, ctx: &mut SidecarCtx) {
        if let Some(span) = ctx.span.take() {
            span.end(ctx.status);
        }
    }
}

impl SidecarProxy {
    /// Writes a JSON answer of the sidecar's own (a refusal, an app failure).
    async fn write_json(
        &self,
        session: &mut Session,
        status: u16,
        body: &serde_json::Value,
        request_id: &str,
    ) -> pingora::Result<()> {
        let body = serde_json::to_vec(body).expect("JSON value serialises");
        let mut header = ResponseHeader::build(status, Some(4))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        header.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        header.insert_header(REQUEST_ID_HEADER, request_id)?;
        header.insert_header(SERVED_BY_HEADER, self.node_id.clone())?;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await
    }
}
