//! The request path through the gateway, as pingora [`ProxyHttp`] filters.
//!
//! `request_filter` answers the gateway's own endpoints and matches `/api/{service}/{route}`;
//! `upstream_peer` picks the next untried replica round robin; `upstream_request_filter`
//! rewrites the path and sets `X-Request-Id`, `traceparent` and `Call-Service-Key`.
//! Retries follow one rule: a failed connect (nothing sent) always moves on to the next
//! replica; a failure after sending, or a 502/503/504 answer, moves on only for idempotent
//! methods, so the gateway never executes a POST twice.
//!
//! A gRPC call (`content-type: application/grpc`) is routed by its gRPC service instead, keeps
//! its path, goes over h2c to the replica's `rpc` address within its `grpc-timeout`, and is
//! retried only when nothing reached a replica; see [`super::grpc`].

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};
use tracing::debug;

use super::admin::AdminEndpoints;
use super::forwarded::{self, Client};
use super::grpc;
use super::limits::{self, Refusal};
use super::metrics::GatewayMetrics;
use super::overload::MemoryGuard;
use super::rate_limit;
use super::record::{Attempt, GrpcCall, RequestRecord};
use super::registry_view::RegistryView;
use super::request_log::{FinishedRequest, RequestLog};
use super::respond::{write_body, write_error, write_error_with, Hsts};
use super::route_store::RouteStore;
use super::trace_events::GatewayTracer;
use super::upstreams::balance::{hash_key, nanos_of};
use super::upstreams::ejection::{Ticks, Verdict};
use super::upstreams::{Pick, Selection, ServiceSlot, ServiceUpstream, Upstreams};
use crate::config::{AllowList, Balance, LimitsConfig, Route, Transform};
use crate::registry::drain::InFlight;
use crate::registry::Drain;
use crate::trace::{
    request_id_or_new, BodyCapture, TraceContext, TraceSink, REQUEST_ID_HEADER, TRACEPARENT_HEADER,
};

/// Header carrying the shared service key.
pub const CALL_SERVICE_KEY_HEADER: &str = "call-service-key";

/// The names the gateway sets on every upstream request (and the response's request id), as
/// `HeaderName`s: pingora-http inserts these without parsing the name again, where a string
/// costs a parse and, for these non-standard names, an allocation each time
/// (vendor/README.md, pingora-http's change 1).
mod set_header {
    use http::HeaderName;

    pub const CALL_SERVICE_KEY: HeaderName =
        HeaderName::from_static(super::CALL_SERVICE_KEY_HEADER);
    pub const ATTEMPT: HeaderName = HeaderName::from_static(crate::trace::ATTEMPT_HEADER);
    pub const REQUEST_ID: HeaderName = HeaderName::from_static(crate::trace::REQUEST_ID_HEADER);
    pub const TRACEPARENT: HeaderName = HeaderName::from_static(crate::trace::TRACEPARENT_HEADER);
}

/// How long a request that came before the gateway's first membership listing waits for it
/// before it is answered 503 (naming etcd).
const FIRST_LISTING_WAIT: Duration = Duration::from_secs(5);

/// Everything the filters share; one per gateway process.
pub struct GatewayProxy {
    pub routes: Arc<RouteStore>,
    pub upstreams: Arc<Upstreams>,
    /// `/cluster`, `/metrics` and `/healthz`, as the public port serves them.
    pub admin: Arc<AdminEndpoints>,
    /// Whether the registry was listed yet and is current, for holds and 503s.
    pub registry: Arc<RegistryView>,
    /// Where each request that ends is recorded for the dashboard; `None` with
    /// `gateway.dashboard: false`.
    pub request_log: Option<Arc<RequestLog>>,
    /// The shared key, parsed once; marked sensitive so HTTP/2 never indexes it.
    pub call_service_key: http::HeaderValue,
    pub connect_timeout: Duration,
    /// What a client may send (`gateway.limits`).
    pub limits: LimitsConfig,
    /// Whose `X-Forwarded-*` headers are believed (`gateway.trustedProxies`).
    pub trusted_proxies: AllowList,
    /// The HTTPS listener, when `gateway.tls` is set.
    pub https: Option<HttpsFront>,
    pub metrics: Arc<GatewayMetrics>,
    pub trace: TraceSink,
    pub tracer: GatewayTracer,
    /// Counts requests in flight, so that a draining gateway exits once none is left.
    pub drain: Arc<Drain>,
    /// `gateway.memoryLimit`: over it, new requests get a 503 at once.
    pub memory_guard: Option<Arc<MemoryGuard>>,
}

/// What the request path knows of the HTTPS listener.
pub struct HttpsFront {
    /// The port it serves, for redirects.
    pub port: u16,
    /// Whether requests on the plain port get a 308 to HTTPS.
    pub redirect: bool,
    /// `Strict-Transport-Security` for answers over HTTPS.
    pub hsts: Option<http::HeaderValue>,
}

impl HttpsFront {
    /// Where a plain request for `header` belongs on HTTPS: the same host, path and query.
    /// `None` without a `Host`, which HTTP/1.1 requires anyway.
    fn redirect_target(&self, header: &RequestHeader) -> Option<String> {
        let host = header.headers.get(http::header::HOST)?.to_str().ok()?;
        // The port is the plain one: drop it (an IPv6 literal keeps its brackets).
        let host = match host.rsplit_once(':') {
            Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                name
            }
            _ => host,
        };
        let target = header.uri.path_and_query().map_or("/", |p| p.as_str());
        Some(match self.port {
            443 => format!("https://{host}{target}"),
            port => format!("https://{host}:{port}{target}"),
        })
    }
}

/// Whether the client reached the gateway over TLS.
fn is_https(session: &Session) -> bool {
    session
        .digest()
        .is_some_and(|digest| digest.ssl_digest.is_some())
}

/// Per-request state.
#[derive(Default)]
pub struct RequestCtx {
    /// Held while the request is in flight.
    _in_flight: Option<InFlight>,
    /// The request's place under its service's `maxInFlight`.
    _service_slot: Option<ServiceSlot>,
    record: Option<RequestRecord>,
    route: Option<Arc<Route>>,
    upstream: Option<Arc<ServiceUpstream>>,
    tried: Vec<SocketAddr>,
    current: Option<Pick>,
    /// Set when the replica answered and the answer went to the client.
    answered: bool,
    /// Form body collected for `transform: json`; `None` when the body passes untouched.
    form_to_json: Option<Vec<u8>>,
    /// The first bytes of the request body, for the trace event.
    body: BodyCapture,
    /// Request body bytes received so far, against the route's `maxBodyBytes`.
    body_bytes: u64,
    /// Who sent the request, under `gateway.trustedProxies`.
    client: Option<Client>,
    /// `RateLimit-Policy` and `RateLimit` for the answer, on a rate-limited route.
    rate_limit_headers: Option<Vec<(http::header::HeaderName, http::HeaderValue)>>,
    /// What a `balance: {hash: ...}` route hashes, taken once so a retry walks the same ring.
    hash_key: Option<Vec<u8>>,
    /// When a gRPC call's time is up: its `grpc-timeout` from its arrival, capped by the
    /// route's timeout. `None` for HTTP, and for a call that set no deadline.
    grpc_deadline: Option<Instant>,
}

impl RequestCtx {
    fn request_id(&self) -> &str {
        self.record.as_ref().map_or("", |r| r.request_id.as_str())
    }

    fn attempts_left(&self) -> bool {
        let retries = self.route.as_ref().map_or(0, |r| r.retries) as usize;
        self.tried.len() <= retries
    }

    /// Whether another attempt may follow: the route allows one, a replica not tried yet may
    /// take it, and the service's retry budget has one left (taken out here).
    fn may_retry(&self) -> bool {
        let (Some(route), Some(upstream)) = (self.route.as_ref(), self.upstream.as_ref()) else {
            return false;
        };
        let now = Ticks::now();
        self.attempts_left()
            && upstream.has_untried(route.grpc, &self.tried, &route.policy, now)
            && upstream
                .retry_budget
                .try_withdraw(now, &route.policy.retry_budget)
    }

    /// Ends the current attempt: releases the in-flight slot, tells the replica's passive
    /// health how it went, and stamps the record.
    fn finish_attempt(&mut self, status: Option<u16>, error: Option<String>) {
        let finished = Instant::now();
        if let Some(pick) = self.current.take() {
            pick.node.in_flight.fetch_sub(1, Ordering::Relaxed);
            let answered: String;
            let verdict = match (status, error.as_deref()) {
                (Some(code @ 500..), _) => {
                    answered = format!("answered {code}");
                    Verdict::Failed(&answered)
                }
                (Some(_), None) => Verdict::Succeeded,
                // The gateway's own refusal mid-request (a body past maxBodyBytes).
                (Some(_), Some(_)) => Verdict::Unknown,
                (None, Some(error)) => Verdict::Failed(error),
                (None, None) => Verdict::Unknown,
            };
            let latency = finished.saturating_duration_since(pick.started);
            let finished_ticks = Ticks::of(finished);
            match verdict {
                Verdict::Failed(_) => {
                    pick.node.failures.fetch_add(1, Ordering::Relaxed);
                    pick.node
                        .latency
                        .observe_failure(latency, nanos_of(finished));
                }
                Verdict::Succeeded => {
                    pick.node.latency.observe(latency, nanos_of(finished));
                    pick.node
                        .last_success
                        .store(finished_ticks.0, Ordering::Relaxed);
                }
                Verdict::Unknown => {}
            }
            if let (Some(upstream), Some(route)) = (self.upstream.as_ref(), self.route.as_ref()) {
                upstream.record_verdict(&pick, verdict, &route.policy, finished_ticks);
            }
        }
        if let Some(attempt) = self.record.as_mut().and_then(|r| r.attempts.last_mut()) {
            if attempt.finished.is_none() {
                attempt.finished = Some(finished);
                attempt.status = status;
                attempt.error = error;
            }
        }
    }
}

/// Gives each proxy thread its own pool of idle upstream connections (pingora keeps connections
/// with different `group_key`s apart), as nginx's workers each keep their own. With one
/// shared pool, a connection released by one thread is mostly picked up by the other, and
/// each such reuse wakes the other thread twice (pingora's idle watcher of the connection
/// lives there).
fn this_thread_pool_key() -> u64 {
    static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    thread_local! {
        static KEY: u64 = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    }
    KEY.with(|key| *key)
}

/// A request the client sent malformed, found while reading it (pingora parses the body as
/// it streams, after the filters that see the header).
fn is_malformed_by_client(error: &Error) -> bool {
    error.esource() == &ErrorSource::Downstream
        && matches!(error.etype().as_str(), "InvalidChunk" | "InvalidHTTPHeader")
}

fn is_idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::OPTIONS
    )
}

/// `X-Goms-Attempt` values without formatting a number per request.
fn attempt_value(attempt: usize) -> http::HeaderValue {
    const VALUES: [&str; 12] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"];
    match VALUES.get(attempt) {
        Some(value) => http::HeaderValue::from_static(value),
        None => http::HeaderValue::from(attempt),
    }
}

/// An address as text, for `X-Forwarded-For` and the trace events' `clientIp`.
/// Formatting an address costs more than the rest of either job, and a gateway sees the same
/// few addresses again and again (its load balancer's, or one client's keep-alive
/// connection), so each proxy thread keeps the last one it formatted.
fn client_ip_text(ip: IpAddr) -> http::HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(IpAddr, http::HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((cached, value)) if *cached == ip => value.clone(),
        _ => {
            let value = http::HeaderValue::try_from(ip.to_string())
                .expect("an IP address in text is a valid header value");
            *last = Some((ip, value.clone()));
            value
        }
    })
}

/// `Expect: 100-continue` from an HTTP/1.1 client (RFC 9110 10.1.1: an HTTP/1.0 client's is
/// ignored).
fn expects_continue(request: &RequestHeader) -> bool {
    request.version >= http::Version::HTTP_11
        && request
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

fn is_form(request: &RequestHeader) -> bool {
    request
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
}

/// goms sent form posts to services as JSON objects; repeated keys keep the last value.
fn form_as_json(form: &[u8]) -> Vec<u8> {
    let object: serde_json::Map<String, serde_json::Value> = url::form_urlencoded::parse(form)
        .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
        .collect();
    serde_json::to_vec(&object).expect("a JSON object serialises")
}

/// An HTTP/1.0 client cannot read chunked framing (RFC 9112 6.1): an answer of unknown length
/// goes to it as the bytes themselves, ended by closing the connection, as nginx does.
fn unchunk_for_http_1_0(session: &mut Session, response: &mut ResponseHeader) {
    if response
        .remove_header(&http::header::TRANSFER_ENCODING)
        .is_some()
    {
        session.set_keepalive(None);
    }
}

/// Calls one h2c connection to a replica's `rpc` port carries at once; past it, pingora
/// opens another.
const GRPC_STREAMS_PER_CONNECTION: usize = 100;

fn gateway_error(status: u16, why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), why)
}

impl GatewayProxy {
    /// Answers a refused request in the envelope and closes the connection: what follows the
    /// header on it cannot be trusted to be the next request.
    async fn refuse(
        &self,
        session: &mut Session,
        refusal: Refusal,
        request_id: &str,
    ) -> pingora::Result<()> {
        self.metrics.refused.count(refusal);
        self.metrics.count_status(refusal.status());
        session.set_keepalive(None);
        write_error(session, refusal.status(), refusal.message(), request_id).await
    }

    /// Answers at once when the route's service has `maxInFlight` requests in progress: a
    /// 503 with `Retry-After`, so that clients back off instead of queueing at the gateway.
    async fn refuse_over_cap(
        &self,
        session: &mut Session,
        route: &Route,
        request_id: &str,
    ) -> pingora::Result<()> {
        let message = format!(
            "service `{}` has its maxInFlight of {} requests in progress; retry later",
            route.service,
            route.policy.max_in_flight.unwrap_or_default()
        );
        self.refuse_with_retry_after(session, &message, request_id)
            .await
    }

    /// A 503 envelope with `Retry-After: 1`: the gateway sheds this request to protect the
    /// others, and the client may try again shortly.
    async fn refuse_with_retry_after(
        &self,
        session: &mut Session,
        message: &str,
        request_id: &str,
    ) -> pingora::Result<()> {
        self.metrics.count_status(503);
        write_error_with(
            session,
            503,
            message,
            request_id,
            &[(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            )],
        )
        .await
    }

    /// Takes the request out of its route's rate limit, if the route has one. A request past
    /// it is answered 429 here (true); one within it keeps the bucket's state for its answer's
    /// headers.
    async fn rate_limited(
        &self,
        session: &mut Session,
        route: &Route,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        if route.rate_limit.is_none() {
            return Ok(false);
        }
        let Some(limiter) = self.routes.rate_limits.get(&route.key) else {
            return Ok(false);
        };
        let client = ctx.client.as_ref().map(|c| c.ip);
        let decision = limiter.check(session.req_header(), client, Ticks::now());
        let headers = rate_limit::headers(&limiter.policy, &decision);
        if decision.allowed {
            ctx.rate_limit_headers = Some(headers);
            return Ok(false);
        }
        self.metrics.count_status(429);
        let message = format!(
            "route `{}` allows {} requests per {:?} to each client; retry in {} s",
            route.key, limiter.policy.requests, limiter.policy.per, decision.retry_after_secs
        );
        write_error_with(session, 429, &message, ctx.request_id(), &headers).await?;
        Ok(true)
    }

    /// With `gateway.tls.redirect`, sends a plain request to HTTPS with a 308 (which keeps the
    /// method and body, unlike a 301); health checks stay on plain HTTP for load balancers.
    async fn redirects(&self, session: &mut Session) -> pingora::Result<bool> {
        let Some(https) = self.https.as_ref().filter(|h| h.redirect) else {
            return Ok(false);
        };
        let path = session.req_header().uri.path();
        if is_https(session) || matches!(path, "/healthz" | "/readyz") {
            return Ok(false);
        }
        let Some(location) = https.redirect_target(session.req_header()) else {
            return Ok(false);
        };
        self.metrics.count_status(308);
        let mut answer = ResponseHeader::build(308, Some(3))?;
        answer.insert_header(http::header::LOCATION, location)?;
        answer.insert_header(http::header::CONTENT_LENGTH, "0")?;
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(answer), true)
            .await?;
        Ok(true)
    }

    /// Answers the gateway's own endpoints on the public port; see [`AdminEndpoints`].
    async fn serve_own_endpoint(&self, session: &mut Session, path: &str) -> pingora::Result<bool> {
        let Some(answer) = self.admin.answer(path) else {
            return Ok(false);
        };
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if !self.admin.public_may_read(path, client) {
            self.metrics.count_status(403);
            let message = "this endpoint answers only gateway.adminAllow clients on the public \
                           port; use the admin listener (gateway.adminAddr)";
            write_error(session, 403, message, "").await?;
            return Ok(true);
        }
        write_body(
            session,
            answer.status,
            answer.content_type,
            answer.body,
            None,
        )
        .await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_flight: Some(self.drain.request()),
            ..RequestCtx::default()
        }
    }

    /// No downstream modules. pingora's default adds a response-compression module, disabled,
    /// which still allocates its context and runs its filters on every request; the gateway
    /// passes bodies through as the replica encoded them.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        // HTTP/1.1 lets a client send its next requests before the first is answered; pingora
        // then carries the bytes read past this request over to the next (RFC 9112 9.3.2).
        // Off (pingora's default), those requests are dropped when this one's answer goes out.
        session.as_downstream_mut().set_pipelining_enabled(true);
        if let Some(hsts) = self.https.as_ref().and_then(|h| h.hsts.clone()) {
            if is_https(session) {
                session.req_header_mut().extensions_mut().insert(Hsts(hsts));
            }
        }
        if let Err(refusal) = limits::check_header(&self.limits, session.req_header()) {
            self.refuse(session, refusal, "").await?;
            return Ok(true);
        }
        // HTTP/2 has no line endings; its pseudo-header would be built just for this.
        if !session.as_downstream().is_http2() {
            let raw = session.as_downstream().to_h1_raw();
            if let Err(refusal) = limits::check_line_endings(&raw) {
                self.refuse(session, refusal, "").await?;
                return Ok(true);
            }
        }
        if self.redirects(session).await? {
            return Ok(true);
        }
        if !session.req_header().uri.path().starts_with("/api/") {
            let path = session.req_header().uri.path().to_string();
            if self.serve_own_endpoint(session, &path).await? {
                return Ok(true);
            }
        }
        let header = session.req_header();
        let request_id =
            request_id_or_new(header.headers.get(REQUEST_ID_HEADER).map(|v| v.as_bytes()));
        let trace = TraceContext::continue_or_start(
            header.headers.get(TRACEPARENT_HEADER).map(|v| v.as_bytes()),
        );
        ctx.record = Some(RequestRecord::new(request_id, trace));
        ctx.client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|peer| Client::of(peer.ip(), session.req_header(), &self.trusted_proxies));
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(guard) = self.memory_guard.as_ref().filter(|g| g.is_over()) {
            guard.refused.fetch_add(1, Ordering::Relaxed);
            self.refuse_with_retry_after(
                session,
                "the gateway is over its gateway.memoryLimit; retry later",
                ctx.request_id(),
            )
            .await?;
            return Ok(true);
        }

        let is_grpc = grpc::is_grpc(session.req_header());
        let route = {
            let routes = self.routes.current();
            let path = session.req_header().uri.path();
            if is_grpc {
                routes.resolve_grpc(path).cloned()
            } else {
                routes
                    .resolve(path)
                    .cloned()
                    .ok_or_else(|| routes.explain_miss(path))
            }
        };
        if is_grpc {
            let path = session.req_header().uri.path();
            if let Some(record) = ctx.record.as_mut() {
                record.grpc = Some(GrpcCall::new(path));
            }
        }
        let route = match route {
            Ok(route) => route,
            Err(message) => {
                self.metrics.count_status(404);
                write_error(session, 404, &message, ctx.request_id()).await?;
                return Ok(true);
            }
        };
        if limits::declared_body(session.req_header()).is_some_and(|n| n > route.max_body_bytes) {
            let request_id = ctx.request_id().to_string();
            self.refuse(session, Refusal::BodyBytes, &request_id)
                .await?;
            return Ok(true);
        }
        if self.rate_limited(session, &route, ctx).await? {
            return Ok(true);
        }
        if !route.allows(&session.req_header().method) {
            self.metrics.count_status(405);
            write_error(
                session,
                405,
                "method not allowed on this route",
                ctx.request_id(),
            )
            .await?;
            return Ok(true);
        }
        self.registry.first_listing(FIRST_LISTING_WAIT).await;
        let upstream = self.upstreams.get(&route.service).filter(|u| !u.is_empty());
        let Some(upstream) = upstream else {
            self.metrics.count_status(503);
            let message = self.registry.no_replica_because(&route.service);
            write_error(session, 503, &message, ctx.request_id()).await?;
            return Ok(true);
        };
        let Some(slot) = upstream.admit(route.policy.max_in_flight) else {
            self.refuse_over_cap(session, &route, ctx.request_id())
                .await?;
            return Ok(true);
        };
        ctx._service_slot = Some(slot);
        upstream
            .retry_budget
            .deposit(Ticks::now(), &route.policy.retry_budget);
        // As nginx does, the gateway asks for the body itself once it will forward it: the
        // replica gets the body without `Expect`, so an answer it gives early (a 413) comes
        // while the body is on its way, not while the client waits for a `100 Continue`.
        if expects_continue(session.req_header()) {
            session
                .as_downstream_mut()
                .write_continue_response()
                .await?;
        }
        // Keeps the request body so an idempotent request can be replayed on another replica.
        session.enable_retry_buffering();
        if let Balance::Hash(on) = &route.balance {
            let client = ctx.client.as_ref().map(|c| c.ip);
            ctx.hash_key = hash_key(on, &session.req_header().headers, client);
        }
        if route.grpc {
            ctx.grpc_deadline = grpc::requested_timeout(session.req_header())
                .map(|asked| asked.min(route.timeout))
                .and_then(|timeout| ctx.record.as_ref().map(|r| r.started + timeout));
        }
        ctx.route = Some(route);
        ctx.upstream = Some(upstream);
        Ok(false)
    }

    /// Notes when the attempt's connection was ready and whether it came from the pool, for
    /// the dashboard's timeline.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let connected = Instant::now();
        if let Some(attempt) = ctx.record.as_mut().and_then(|r| r.attempts.last_mut()) {
            attempt.connected = Some((connected, reused));
        }
        // The replica's latency counts from here: a new connection's handshake says how far
        // away the replica is, not how fast it answers, and would weigh on the first sample.
        if let Some(pick) = ctx.current.as_mut() {
            pick.started = connected;
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let (Some(route), Some(upstream)) = (ctx.route.clone(), ctx.upstream.clone()) else {
            return Err(gateway_error(503, "no replica"));
        };
        let how = match (&route.balance, ctx.hash_key.as_deref()) {
            (Balance::LeastRequest, _) => Selection::LeastRequest,
            (Balance::Hash(_), Some(key)) => Selection::Hash(key),
            _ => Selection::RoundRobin,
        };
        let pick = upstream
            .select(how, route.grpc, &ctx.tried, &route.policy, Ticks::now())
            .ok_or_else(|| gateway_error(503, "no healthy replica left"))?;
        // A gRPC call's attempt may take what is left of its deadline, and no more.
        let timeout = match ctx.grpc_deadline {
            Some(deadline) => deadline
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
                .ok_or_else(|| gateway_error(504, "the call's deadline passed"))?,
            None => route.timeout,
        };
        let node = pick.node.clone();
        if !ctx.tried.is_empty() {
            self.metrics.retries.fetch_add(1, Ordering::Relaxed);
        }
        ctx.tried.push(node.addr);
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        node.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(record) = ctx.record.as_mut() {
            record.attempts.push(Attempt {
                node_id: node.id.clone(),
                upstream: node.addr_text.clone(),
                started: Instant::now(),
                finished: None,
                connected: None,
                status: None,
                error: None,
            });
        }
        let address = match (route.grpc, node.rpc_addr) {
            (true, Some(rpc)) => rpc,
            _ => node.addr,
        };
        let mut peer = HttpPeer::new(address, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(timeout);
        peer.options.write_timeout = Some(timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        if route.grpc {
            // h2c with prior knowledge: gRPC needs HTTP/2, and the `rpc` port has no TLS.
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = GRPC_STREAMS_PER_CONNECTION;
        }
        peer.group_key = this_thread_pool_key();
        ctx.current = Some(pick);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let route = ctx.route.as_ref().expect("routed requests have a route");
        if route.grpc {
            if let Some(deadline) = ctx.grpc_deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                let replicas_share = left + grpc::REPLICA_DEADLINE_MARGIN;
                upstream_request
                    .insert_header(grpc::GRPC_TIMEOUT, grpc::timeout_text(replicas_share))?;
            }
        } else {
            let uri = match upstream_request.uri.query() {
                None => route.target.clone(),
                Some(query) => format!("{}?{query}", route.path).parse().ok(),
            }
            .ok_or_else(|| gateway_error(400, "request target cannot be rewritten"))?;
            upstream_request.set_uri(uri);
        }
        ctx.form_to_json = None;
        if route.transform == Transform::Json && is_form(upstream_request) {
            // The JSON body has another length: without Content-Length pingora sends it chunked.
            upstream_request.remove_header(&http::header::CONTENT_LENGTH);
            upstream_request.insert_header(http::header::CONTENT_TYPE, "application/json")?;
            ctx.form_to_json = Some(Vec::new());
        }
        upstream_request.remove_header(&http::header::EXPECT);
        // An insert replaces every value the client sent under the name.
        upstream_request
            .insert_header(set_header::CALL_SERVICE_KEY, self.call_service_key.clone())?;
        upstream_request.insert_header(set_header::ATTEMPT, attempt_value(ctx.tried.len()))?;
        if let Some(record) = ctx.record.as_ref() {
            upstream_request.insert_header(set_header::REQUEST_ID, record.request_id.as_str())?;
            upstream_request.insert_header(set_header::TRACEPARENT, record.trace.traceparent())?;
        }
        let peer = session.client_addr().and_then(|a| a.as_inet());
        if let (Some(peer), Some(client)) = (peer, ctx.client.as_ref()) {
            let https = is_https(session);
            forwarded::set_headers(upstream_request, client, client_ip_text(peer.ip()), https)?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // Counted on the first attempt only: a retry replays the same bytes. The bound also
        // holds the body `transform: json` buffers.
        let first_attempt = ctx.tried.len() <= 1;
        if let (Some(chunk), Some(route), true) = (body.as_ref(), ctx.route.as_ref(), first_attempt)
        {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > route.max_body_bytes {
                self.metrics.refused.count(Refusal::BodyBytes);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    Refusal::BodyBytes.message(),
                ));
            }
        }
        // Only the first attempt's body is captured: a retry replays the same bytes.
        if self.trace.is_enabled() && ctx.tried.len() <= 1 {
            if let Some(chunk) = body.as_ref() {
                ctx.body.push(chunk, self.tracer.redactor.body_max_bytes);
            }
        }
        let Some(collected) = ctx.form_to_json.as_mut() else {
            return Ok(());
        };
        if let Some(chunk) = body.take() {
            collected.extend_from_slice(&chunk);
        }
        if end_of_stream {
            *body = Some(bytes::Bytes::from(form_as_json(collected)));
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let status = upstream_response.status.as_u16();
        let unavailable = matches!(status, 502..=504);
        if unavailable && is_idempotent(&session.req_header().method) && ctx.may_retry() {
            // Turned into a retryable error so pingora asks `upstream_peer` for the next replica.
            let mut error = Error::explain(
                ErrorType::HTTPStatus(status),
                "replica answered unavailable",
            );
            error.set_retry(true);
            return Err(error);
        }
        ctx.answered = true;
        ctx.finish_attempt(Some(status), None);
        // A call the replica answered with a status alone ("trailers-only") has it here.
        if let Some(call) = ctx.record.as_mut().and_then(|r| r.grpc.as_mut()) {
            call.note_status(&upstream_response.headers);
        }
        Ok(())
    }

    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<bytes::Bytes>> {
        if let Some(call) = ctx.record.as_mut().and_then(|r| r.grpc.as_mut()) {
            call.note_status(trailers);
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(record) = ctx.record.as_ref() {
            response.insert_header(set_header::REQUEST_ID, record.request_id.as_str())?;
        }
        if session.req_header().version == http::Version::HTTP_10 {
            unchunk_for_http_1_0(session, response);
        }
        if let Some(Hsts(hsts)) = session.req_header().extensions.get::<Hsts>() {
            response.insert_header(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone())?;
        }
        for (name, value) in ctx.rate_limit_headers.take().into_iter().flatten() {
            response.insert_header(name, value)?;
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut error: Box<Error>,
    ) -> Box<Error> {
        ctx.finish_attempt(None, Some(error.to_string()));
        // Nothing reached the replica: moving on is safe for every method.
        error.set_retry(ctx.may_retry());
        error
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        error: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut error = error.more_context(format!("replica {peer}"));
        // A client that went away is not a replica failure: nothing to retry, nothing to blame.
        if error.esource() == &ErrorSource::Downstream {
            ctx.finish_attempt(None, None);
            error.set_retry(false);
            return error;
        }
        let status = match error.etype() {
            ErrorType::HTTPStatus(code) => Some(*code),
            _ => None,
        };
        ctx.finish_attempt(status, Some(error.to_string()));
        // A status error was raised by a filter here, which already decided whether to retry
        // (and took that retry out of the budget): deciding again would take a second one.
        if status.is_some() {
            return error;
        }
        let replayable = is_idempotent(&session.req_header().method)
            && !session.as_ref().retry_buffer_truncated();
        error.set_retry(replayable && ctx.may_retry());
        error
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        ctx.finish_attempt(None, Some(error.to_string()));
        let code = match error.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
            // A body the client framed wrongly (a bad chunk size) is its fault, and it hears so.
            _ if is_malformed_by_client(error) => 400,
            _ if error.esource() == &ErrorSource::Downstream => 0,
            _ => 502,
        };
        if code > 0 {
            self.metrics.count_status(code);
            let message = match code {
                503 => "no healthy replica could take the request",
                413 => Refusal::BodyBytes.message(),
                400 => "the request body is malformed",
                504 => "the replica did not answer in time",
                _ => "the replica failed to answer",
            };
            let request_id = ctx.request_id().to_string();
            // pingora will not reuse this connection; `Connection: close` tells the client
            // so, instead of letting it send its next request into a closing socket.
            session.set_keepalive(None);
            let grpc_code = grpc::Code::of_http(code);
            match ctx.record.as_mut().and_then(|r| r.grpc.as_mut()) {
                // A call whose answer began (a stream whose replica went away) ends with the
                // status in its trailers; the client sees the status, not a reset.
                Some(call) if session.response_written().is_some() => {
                    call.status = Some(grpc_code as u32);
                    let _ = grpc::write_status_trailers(session, grpc_code, message).await;
                }
                Some(call) => {
                    call.status = Some(grpc_code as u32);
                    let _ = write_error(session, code, message, &request_id).await;
                }
                None => {
                    let _ = write_error(session, code, message, &request_id).await;
                }
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A client that closed its connection mid-request is routine (a browser tab closed, a
    /// load generator stopping): counted and logged at debug level, not as an error.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        if error.esource() != &ErrorSource::Downstream {
            return false;
        }
        self.metrics.client_aborts.fetch_add(1, Ordering::Relaxed);
        debug!(request_id = %ctx.request_id(), %error, "client went away");
        true
    }

    /// The end of every request: one record feeds the metrics, the trace and the dashboard.
    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        // A client that went away says nothing about the replica.
        let error = error.filter(|e| e.esource() != &ErrorSource::Downstream);
        ctx.finish_attempt(None, error.map(|e| e.to_string()));
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        if ctx.answered {
            if let Some(upstream) = ctx.upstream.as_ref() {
                upstream.finished.fetch_add(1, Ordering::Relaxed);
            }
            self.metrics.count_status(status);
        }
        let Some(mut record) = ctx.record.take() else {
            return;
        };
        if let (Some(call), Some(answer)) = (record.grpc.as_mut(), session.response_written()) {
            if call.status.is_none() {
                call.note_status(&answer.headers);
            }
        }
        let header = session.req_header();
        if self.trace.is_enabled() {
            let client_ip = ctx.client.as_ref().map(|client| client_ip_text(client.ip));
            let client_ip = client_ip.as_ref().map_or("", |ip| {
                ip.to_str().expect("an IP address in text is ASCII")
            });
            self.trace
                .emit_with(GatewayTracer::EVENTS_PER_REQUEST, |lines| {
                    self.tracer
                        .write(lines, header, client_ip, &ctx.body, &record, status)
                });
        }
        let duration = record.elapsed();
        debug!(
            request_id = %record.request_id,
            attempts = record.attempts.len(),
            elapsed_ms = duration.as_millis() as u64,
            "request finished"
        );
        let Some(request_log) = self.request_log.as_ref() else {
            return;
        };
        let route = ctx.route.as_ref();
        request_log.record(FinishedRequest {
            method: header.method.clone(),
            uri: header.uri.clone(),
            service: route.map(|r| r.service.clone()),
            route: route.map(|r| r.key.clone()),
            status,
            duration,
            record,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_text_follows_the_client_address_whatever_was_cached() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        for ip in [v4, v4, v6, v4, v6, v6] {
            assert_eq!(client_ip_text(ip), ip.to_string().as_str());
        }
    }
}
