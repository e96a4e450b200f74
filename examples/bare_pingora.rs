//! A bare pingora round-robin proxy, for `bench/compare.sh --bare-pingora`: the floor the goms
//! gateway is built on, measured in the same run. It does what the nginx and HAProxy front ends
//! of the benchmark do and nothing more: strips `/api/bench` from the path, sets
//! `Call-Service-Key` and `X-Forwarded-For`, and balances round robin over keep-alive
//! connections. No routes, registry, retries, metrics or tracing.
//!
//! `cargo run --release --example bare_pingora -- LISTEN_ADDR THREADS UPSTREAM...`

use std::sync::Arc;

use async_trait::async_trait;
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;

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

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_pingora LISTEN_ADDR THREADS UPSTREAM...";
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
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        BareProxy {
            upstreams: Arc::new(upstreams),
        },
    );
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
