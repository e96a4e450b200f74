//! Floors for issue 35's next step, for `bench/compare.sh --own-app-floor`: what a proxy that
//! owns its forwarding path costs before any goms feature is added to it. It does what the
//! `bare_pingora` example does (strips `/api/bench`, sets `Call-Service-Key` and
//! `X-Forwarded-For`, balances round robin over keep-alive upstream connections) in one of two
//! ways, both served by pingora's `Server` with the same threads and listener:
//!
//! - `sessions`: an `HttpServerApp` on pingora-core's HTTP/1 sessions. pingora-core reads and
//!   writes both sides (its server session and its client session); the app replaces
//!   pingora-proxy's state machine, its connector and its pool with a straight sequence and a
//!   per-thread list of idle connections.
//! - `raw`: a `ServerApp` that owns the connection's bytes. It parses with httparse, writes the
//!   upstream request from the client's header bytes and copies the answer back. Only
//!   `Content-Length` bodies are handled: enough for the benchmark, not for real traffic.
//!
//! Neither checks anything a real proxy must (limits, smuggling, timeouts, closing idle upstream
//! connections); a failed reused upstream connection is retried once on a new one. The figures
//! it gives are floors: what goms's own forwarding path could cost at best on each footing.
//!
//! `cargo run --release --example own_app_floor -- MODE LISTEN_ADDR THREADS UPSTREAM...`

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use pingora::apps::{HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// The gateway's allocator, so that the floors compare with goms and not with glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The upstreams, and on each proxy thread its idle connections to each.
struct Upstreams {
    addrs: Vec<SocketAddr>,
}

thread_local! {
    static NEXT: Cell<usize> = const { Cell::new(0) };
    static IDLE: RefCell<Vec<Vec<Stream>>> = const { RefCell::new(Vec::new()) };
}

impl Upstreams {
    fn pick(&self) -> usize {
        NEXT.with(|next| {
            let index = next.get() % self.addrs.len();
            next.set(index + 1);
            index
        })
    }

    fn take_idle(&self, index: usize) -> Option<Stream> {
        IDLE.with(|idle| idle.borrow_mut().get_mut(index).and_then(Vec::pop))
    }

    fn put_idle(&self, index: usize, stream: Stream) {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            if idle.len() < self.addrs.len() {
                idle.resize_with(self.addrs.len(), Vec::new);
            }
            idle[index].push(stream);
        })
    }

    async fn connect(&self, index: usize) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(self.addrs[index]).await?;
        tcp.set_nodelay(true)?;
        Ok(Box::new(L4Stream::from(tcp)))
    }
}

fn client_ip(stream: &Stream) -> String {
    stream
        .get_socket_digest()
        .and_then(|digest| digest.peer_addr().cloned())
        .and_then(|addr| addr.as_inet().map(|inet| inet.ip().to_string()))
        .unwrap_or_default()
}

// ---- `sessions`: pingora-core's HTTP/1 sessions on both sides ----

struct SessionsFloor(Upstreams);

impl SessionsFloor {
    /// One exchange with an upstream; `Err` leaves the client untouched, so it can be retried.
    async fn exchange(
        &self,
        stream: Stream,
        client: &mut ServerSession,
    ) -> pingora::Result<UpstreamSession> {
        let mut request = client.req_header().clone();
        let path = request.uri.path();
        let stripped = path.strip_prefix("/api/bench").unwrap_or(path).to_string();
        request.set_uri(stripped.parse().expect("a path stays a valid URI"));
        request.insert_header("call-service-key", "bench")?;
        let ip = client
            .as_http1()
            .and_then(|http1| http1.client_addr())
            .and_then(|addr| addr.as_inet().map(|inet| inet.ip().to_string()))
            .unwrap_or_default();
        request.insert_header("x-forwarded-for", ip)?;
        let mut upstream = UpstreamSession::new(stream);
        upstream.write_request_header(Box::new(request)).await?;
        while let Some(chunk) = client.read_request_body().await? {
            upstream.write_body(&chunk).await?;
        }
        upstream.finish_body().await?;
        upstream.read_response().await?;
        Ok(upstream)
    }
}

#[async_trait]
impl HttpServerApp for SessionsFloor {
    async fn process_new_http(
        self: &Arc<Self>,
        mut client: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !client.read_request().await.ok()? {
            return None;
        }
        let index = self.0.pick();
        let mut upstream = match self.0.take_idle(index) {
            Some(idle) => match self.exchange(idle, &mut client).await {
                Ok(upstream) => upstream,
                Err(_) => {
                    let fresh = self.0.connect(index).await.ok()?;
                    self.exchange(fresh, &mut client).await.ok()?
                }
            },
            None => {
                let fresh = self.0.connect(index).await.ok()?;
                self.exchange(fresh, &mut client).await.ok()?
            }
        };
        let answer = upstream.resp_header()?.clone();
        client.write_response_header(Box::new(answer)).await.ok()?;
        while let Some(body) = upstream.read_body_bytes().await.ok()? {
            client.write_response_body(body, false).await.ok()?;
        }
        client.finish_body().await.ok()?;
        // As pingora's connector does on release: keep-alive as the answer allows.
        upstream.respect_keepalive();
        if let Some(stream) = upstream.reuse().await {
            self.0.put_idle(index, stream);
        }
        let settings = pingora::apps::HttpPersistentSettings::for_session(&client);
        let reusable = client.finish().await.ok()??;
        Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
    }
}

// ---- `raw`: httparse on the connection's bytes ----

struct RawFloor(Upstreams);

/// A parsed message head: its length in the buffer and the body's `Content-Length`.
struct Head {
    len: usize,
    body_len: usize,
}

const MAX_HEADERS: usize = 64;

fn content_length(headers: &[httparse::Header<'_>]) -> usize {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads until `buf` holds a whole head and body; `None` at a clean end of the connection.
async fn read_message(
    stream: &mut Stream,
    buf: &mut BytesMut,
    parse: impl Fn(&[u8]) -> Option<Head>,
) -> Option<Head> {
    loop {
        if let Some(head) = parse(buf) {
            while buf.len() < head.len + head.body_len {
                if stream.read_buf(buf).await.ok()? == 0 {
                    return None;
                }
            }
            return Some(head);
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

fn parse_request(bytes: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = request.parse(bytes).ok()?;
    head_of(parsed, request.headers)
}

fn parse_response(bytes: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let parsed = response.parse(bytes).ok()?;
    head_of(parsed, response.headers)
}

/// The head's length and its body's, once httparse has the whole head.
fn head_of(parsed: httparse::Status<usize>, headers: &[httparse::Header<'_>]) -> Option<Head> {
    match parsed {
        httparse::Status::Complete(len) => Some(Head {
            len,
            body_len: content_length(headers),
        }),
        httparse::Status::Partial => None,
    }
}

/// The upstream request: the client's request line with the path stripped, its headers as
/// they came, the two added headers, and the body.
fn upstream_request(client_bytes: &[u8], head: &Head, ip: &str, out: &mut BytesMut) {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let _ = request.parse(&client_bytes[..head.len]);
    let path = request.path.unwrap_or("/");
    let path = path.strip_prefix("/api/bench").unwrap_or(path);
    out.put_slice(request.method.unwrap_or("GET").as_bytes());
    out.put_u8(b' ');
    out.put_slice(path.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for header in request.headers.iter() {
        out.put_slice(header.name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(header.value);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"call-service-key: bench\r\nx-forwarded-for: ");
    out.put_slice(ip.as_bytes());
    out.put_slice(b"\r\n\r\n");
    out.put_slice(&client_bytes[head.len..head.len + head.body_len]);
}

impl RawFloor {
    /// Sends `request` and reads the whole answer into `answer`; `None` if the stream failed.
    async fn exchange(
        &self,
        mut stream: Stream,
        request: &[u8],
        answer: &mut BytesMut,
    ) -> Option<(Stream, Head)> {
        stream.write_all(request).await.ok()?;
        // pingora's stream buffers writes until flushed.
        stream.flush().await.ok()?;
        let head = read_message(&mut stream, answer, parse_response).await?;
        Some((stream, head))
    }
}

#[async_trait]
impl ServerApp for RawFloor {
    async fn process_new(
        self: &Arc<Self>,
        mut client: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let ip = client_ip(&client);
        let mut from_client = BytesMut::with_capacity(4096);
        let mut to_upstream = BytesMut::with_capacity(4096);
        let mut from_upstream = BytesMut::with_capacity(4096);
        loop {
            let head = read_message(&mut client, &mut from_client, parse_request).await?;
            to_upstream.clear();
            upstream_request(&from_client, &head, &ip, &mut to_upstream);
            let _ = from_client.split_to(head.len + head.body_len);

            let index = self.0.pick();
            from_upstream.clear();
            let reused = match self.0.take_idle(index) {
                Some(idle) => self.exchange(idle, &to_upstream, &mut from_upstream).await,
                None => None,
            };
            let (stream, answer) = match reused {
                Some(done) => done,
                None => {
                    from_upstream.clear();
                    let fresh = self.0.connect(index).await.ok()?;
                    self.exchange(fresh, &to_upstream, &mut from_upstream)
                        .await?
                }
            };
            self.0.put_idle(index, stream);
            client
                .write_all(&from_upstream[..answer.len + answer.body_len])
                .await
                .ok()?;
            client.flush().await.ok()?;
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: own_app_floor sessions|raw LISTEN_ADDR THREADS UPSTREAM...";
    let mode = args.next().expect(usage);
    let listen = args.next().expect(usage);
    let threads: usize = args.next().and_then(|t| t.parse().ok()).expect(usage);
    let addrs: Vec<SocketAddr> = args
        .map(|a| a.parse().expect("upstreams are ip:port"))
        .collect();
    assert!(!addrs.is_empty(), "{usage}");

    let mut server = Server::new_with_opt_and_conf(
        None,
        ServerConf {
            threads,
            grace_period_seconds: Some(1),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        },
    );
    server.bootstrap();
    let upstreams = Upstreams { addrs };
    match mode.as_str() {
        "sessions" => {
            let mut service = Service::new("floor".into(), SessionsFloor(upstreams));
            service.add_tcp(&listen);
            server.add_service(service);
        }
        "raw" => {
            let mut service = Service::new("floor".into(), RawFloor(upstreams));
            service.add_tcp(&listen);
            server.add_service(service);
        }
        _ => panic!("{usage}"),
    }
    server.run_forever();
}
