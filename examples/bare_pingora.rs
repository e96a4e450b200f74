//! A bare pingora round-robin proxy, for `bench/compare.sh --bare-pingora`: the floor the goms
//! gateway is built on, measured in the same run. It does what the nginx and HAProxy front ends
//! of the benchmark do and nothing more: strips `/api/bench` from the path, sets
//! `Call-Service-Key` and `X-Forwarded-For`, and balances round robin over keep-alive
//! connections. No routes, registry, retries, metrics or tracing.
//!
//! With `--handoff`, a `ServerApp` of its own takes each connection and reads a request's
//! first bytes itself before it hands the connection to pingora-proxy, with those bytes as the
//! session's pipelined prefix. That is the path a request takes under issue 35's option (a)
//! when goms's own HTTP/1 path passes it on (chunked, an upgrade, a `transform` route), so
//! `bench/compare.sh --own-app-floor` measures what the hand-off adds to pingora-proxy.
//!
//! `cargo run --release --example bare_pingora -- [--handoff] LISTEN_ADDR THREADS UPSTREAM...`

use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;
use tokio::io::AsyncReadExt;

struct BareProxy {
    upstreams: Arc<LoadBalancer<RoundRobin>>,
}

#[async_trait]
impl ProxyHttp for BareProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        let upstream = self
            .upstreams
            .select(b"", 256)
            .expect("the benchmark's upstreams are static");
        Ok(Box::new(HttpPeer::new(upstream, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        _ctx: &mut (),
    ) -> pingora::Result<()> {
        let path = upstream_request.uri.path();
        let stripped = path.strip_prefix("/api/bench").unwrap_or(path).to_string();
        upstream_request.set_uri(stripped.parse().expect("a path stays a valid URI"));
        upstream_request.insert_header("call-service-key", "bench")?;
        if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
            upstream_request.insert_header("x-forwarded-for", client.ip().to_string())?;
        }
        Ok(())
    }
}

/// `--handoff`: pingora-proxy behind a `ServerApp` that reads each request's first bytes.
struct Handoff(Arc<HttpProxy<BareProxy>>);

#[async_trait]
impl ServerApp for Handoff {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut kept: Option<HttpPersistentSettings> = None;
        loop {
            // An owned path would parse these bytes and serve most requests itself; this one
            // passes every request on. Pipelining is off (pingora's default), so pingora-proxy
            // does not reuse a connection it read past, and its settings carry no prefix that
            // this one would replace.
            let mut first = BytesMut::with_capacity(4096);
            if stream.read_buf(&mut first).await.ok()? == 0 {
                return None;
            }
            let mut session = ServerSession::new_http1(stream);
            match kept.take() {
                Some(settings) => settings.apply_to_session(&mut session),
                None => session.set_keepalive(Some(60)),
            }
            if let ServerSession::H1(h1) = &mut session {
                h1.set_pipelined_prefix(first);
            }
            let (next, settings) = self.0.process_new_http(session, shutdown).await?.consume();
            stream = next;
            kept = settings;
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let usage = "usage: bare_pingora [--handoff] LISTEN_ADDR THREADS UPSTREAM...";
    let handoff = args.next_if(|arg| arg == "--handoff").is_some();
    let listen = args.next().expect(usage);
    let threads: usize = args.next().and_then(|t| t.parse().ok()).expect(usage);
    let upstreams: Vec<String> = args.collect();
    assert!(!upstreams.is_empty(), "{usage}");

    let mut server = Server::new_with_opt_and_conf(
        None,
        ServerConf {
            threads,
            // The same pool size as the gateway's default (`gateway.upstreamKeepalive`).
            upstream_keepalive_pool_size: 1024,
            grace_period_seconds: Some(1),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        },
    );
    server.bootstrap();
    let upstreams = LoadBalancer::try_from_iter(upstreams).expect("upstreams are host:port");
    let bare = BareProxy {
        upstreams: Arc::new(upstreams),
    };
    if handoff {
        let proxy = pingora::proxy::http_proxy(&server.configuration, bare);
        let mut service = Service::new("handoff".into(), Handoff(Arc::new(proxy)));
        service.add_tcp(&listen);
        server.add_service(service);
    } else {
        let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, bare);
        proxy.add_tcp(&listen);
        server.add_service(proxy);
    }
    server.run_forever();
}
