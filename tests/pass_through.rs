//! The contract of what a client sends and gets back through the gateway: each case is a real
//! replica behind a route, reached through a real gateway, and checks the bytes that arrive on
//! the other side. Framing is read off raw sockets where the framing itself is under test.
//!
//! Whatever implements the request path must keep this suite green.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use support::{eventually, http, metric, register_replica, route_file, wait_for_nodes, Etcd, Goms};

const MIB: usize = 1024 * 1024;
/// The upload route allows this much; `gateway.limits.bodyBytes` (10 MiB) would refuse it.
const UPLOAD_LIMIT: usize = 200 * MIB;

const ROUTES: &str = "services:
  user:
    echo: /echo
    stream: /stream
    nocontent: /nocontent
    notmodified: /notmodified
    fixed: /fixed
    cookies: /cookies
    target: /target
    close: /close
    upload:
      path: /sink
      maxBodyBytes: 209715200
  early:
    refuse: /refuse
  chat:
    ws: /ws
";

/// How long any one exchange may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// FNV-1a, so both ends can compare what they sent and what arrived without keeping it.
#[derive(Clone, Copy)]
struct Hash(u64);

impl Hash {
    fn new() -> Hash {
        Hash(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn of(bytes: &[u8]) -> String {
        let mut hash = Hash::new();
        hash.update(bytes);
        hash.text()
    }

    fn text(self) -> String {
        format!("{:016x}", self.0)
    }
}

#[derive(serde::Deserialize)]
struct Size {
    kib: usize,
}

/// Echoes the body, and says in headers what arrived: its length and hash, whether the
/// request came with `Expect`, how its body was framed, and the size of `x-big`.
async fn echo(headers: HeaderMap, body: axum::body::Bytes) -> impl IntoResponse {
    let said = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string()
    };
    let big = headers.get("x-big").map_or(0, |v| v.len());
    (
        [
            ("x-saw-expect", said("expect")),
            ("x-saw-transfer-encoding", said("transfer-encoding")),
            ("x-body-hash", Hash::of(&body)),
            ("x-body-len", body.len().to_string()),
            ("x-big-len", big.to_string()),
        ],
        body,
    )
}

/// Reads a body of any size as it streams and answers `length hash`, keeping none of it.
async fn sink(body: Body) -> String {
    let mut stream = body.into_data_stream();
    let (mut length, mut hash) = (0usize, Hash::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("the body arrives whole");
        length += chunk.len();
        hash.update(&chunk);
    }
    format!("{length} {}", hash.text())
}

/// `kib` KiB of a repeating pattern in 64 KiB chunks, with no length known up front: the
/// answer goes out chunked.
async fn stream(Query(size): Query<Size>) -> impl IntoResponse {
    const CHUNK: usize = 64 * 1024;
    let total = size.kib * 1024;
    let chunks = futures::stream::iter((0..total).step_by(CHUNK).map(move |start| {
        let len = CHUNK.min(total - start);
        Ok::<_, std::io::Error>(bytes::Bytes::from(pattern(start, len)))
    }));
    Body::from_stream(chunks)
}

/// The bytes `stream` sends from `start`, so a client can check what arrived.
fn pattern(start: usize, len: usize) -> Vec<u8> {
    (start..start + len).map(|i| (i % 251) as u8).collect()
}

async fn cookies() -> impl IntoResponse {
    (
        axum::response::AppendHeaders([
            ("set-cookie", "first=1; Path=/"),
            ("set-cookie", "second=2; HttpOnly"),
            ("set-cookie", "third=3; Max-Age=60"),
        ]),
        "cookies",
    )
}

/// The request target as the replica got it.
async fn target(uri: Uri) -> String {
    uri.path_and_query()
        .map_or(String::new(), |p| p.to_string())
}

async fn replica_app() -> SocketAddr {
    let app = axum::Router::new()
        .route("/echo", axum::routing::any(echo))
        .route("/sink", axum::routing::any(sink))
        .route("/stream", axum::routing::get(stream))
        .route(
            "/nocontent",
            axum::routing::any(|| async { StatusCode::NO_CONTENT }),
        )
        .route(
            "/notmodified",
            axum::routing::get(|| async { (StatusCode::NOT_MODIFIED, [("etag", "\"v1\"")]) }),
        )
        .route("/fixed", axum::routing::any(|| async { "hello" }))
        .route("/cookies", axum::routing::get(cookies))
        .route("/target", axum::routing::get(target))
        .route(
            "/close",
            axum::routing::get(|| async { ([("connection", "close")], "bye") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A replica that answers 413 as soon as it has a request's header, without reading the
/// body, and closes: what a server does with an upload it will not take.
async fn refusing_replica() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut chunk = [0u8; 4096];
                while find(&seen, b"\r\n\r\n").is_none() {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!";
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A WebSocket server that sends back every text and binary message it gets (and, as any
/// WebSocket server does, answers pings and the close handshake).
async fn websocket_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary())
                        && socket.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A gateway in front of one `user` replica, one `early` replica that refuses uploads, and
/// one `chat` WebSocket replica.
struct Stage {
    _etcd: Etcd,
    _folder: tempfile::TempDir,
    gateway: Goms,
}

impl Stage {
    async fn start() -> Stage {
        let etcd = Etcd::start().await;
        for (service, addr) in [
            ("user", replica_app().await),
            ("early", refusing_replica().await),
            ("chat", websocket_echo().await),
        ] {
            let id = format!("{service}-{}", addr.port());
            register_replica(&etcd, service, &id, addr, "").await;
        }
        let (folder, routes) = route_file(ROUTES);
        let gateway = Goms::gateway(&etcd, &routes, &[]).await;
        for service in ["user", "early", "chat"] {
            wait_for_nodes(gateway.port(), service, 1).await;
        }
        Stage {
            _etcd: etcd,
            _folder: folder,
            gateway,
        }
    }

    async fn connect(&self) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", self.gateway.port()))
            .await
            .unwrap();
        Client {
            stream,
            buffered: Vec::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.gateway.port())
    }

    /// The gateway's resident memory now.
    fn resident_bytes(&self) -> usize {
        let pid = self.gateway.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: usize = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/pid/status");
        kib * 1024
    }
}

/// One answer as it came off the wire.
struct Answer {
    /// The status line and header fields, lower-cased.
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {:?}", self.head))
    }

    fn header<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.headers(name).next()
    }

    fn headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.head.lines().filter_map(move |line| {
            let (field, value) = line.split_once(':')?;
            (field == name).then(|| value.trim())
        })
    }
}

/// How the body of an answer ends, which only the request can tell for HEAD.
#[derive(PartialEq)]
enum Framing {
    Normal,
    NoBody,
}

/// A client on a raw socket that parses answers itself, so the test sees the framing.
struct Client {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes; `false` at end of stream.
    async fn fill(&mut self) -> bool {
        self.buffered.reserve(64 * 1024);
        let read = tokio::time::timeout(DEADLINE, self.stream.read_buf(&mut self.buffered))
            .await
            .expect("the gateway answers within the deadline")
            .unwrap_or(0);
        read > 0
    }

    async fn head(&mut self) -> String {
        loop {
            if let Some(end) = find(&self.buffered, b"\r\n\r\n") {
                let head: Vec<u8> = self.buffered.drain(..end + 4).collect();
                return String::from_utf8(head).unwrap().to_ascii_lowercase();
            }
            assert!(
                self.fill().await,
                "closed before a whole header: {:?}",
                String::from_utf8_lossy(&self.buffered)
            );
        }
    }

    async fn exactly(&mut self, len: usize) -> Vec<u8> {
        while self.buffered.len() < len {
            assert!(
                self.fill().await,
                "closed {} bytes short",
                len - self.buffered.len()
            );
        }
        self.buffered.drain(..len).collect()
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = find(&self.buffered, b"\r\n") {
                let line: Vec<u8> = self.buffered.drain(..end + 2).collect();
                return String::from_utf8(line).unwrap().trim_end().to_string();
            }
            assert!(self.fill().await, "closed inside a chunk");
        }
    }

    async fn chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let size = self.line().await;
            let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
            if size == 0 {
                assert_eq!(self.line().await, "", "no trailers expected");
                return body;
            }
            body.extend(self.exactly(size).await);
            assert_eq!(self.line().await, "", "a chunk ends in CRLF");
        }
    }

    async fn until_closed(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buffered)
    }

    /// Reads one whole answer (a `100 Continue` is an answer here).
    async fn answer(&mut self, framing: Framing) -> Answer {
        let head = self.head().await;
        let mut answer = Answer {
            head,
            body: Vec::new(),
        };
        let status = answer.status();
        if framing == Framing::NoBody || matches!(status, 100..=199 | 204 | 304) {
            return answer;
        }
        answer.body = if answer.header("transfer-encoding") == Some("chunked") {
            self.chunked().await
        } else if let Some(len) = answer.header("content-length") {
            self.exactly(len.parse().unwrap()).await
        } else {
            self.until_closed().await
        };
        answer
    }

    /// Whether the gateway closed the connection (with nothing more sent).
    async fn is_closed(&mut self) -> bool {
        !self.fill().await && self.buffered.is_empty()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

const GET_FIXED: &[u8] = b"GET /api/user/fixed HTTP/1.1\r\nHost: goms\r\n\r\n";

/// The connection still carries a request after whatever came before it.
async fn still_serves(client: &mut Client) {
    client.send(GET_FIXED).await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(answer.body, b"hello");
}

#[tokio::test]
async fn pipelined_requests_are_each_answered_in_order() {
    let stage = Stage::start().await;
    let mut client = stage.connect().await;
    let body = "a body sent behind four other requests";
    let pipelined = format!(
        "GET /api/user/fixed HTTP/1.1\r\nHost: goms\r\n\r\n\
         HEAD /api/user/fixed HTTP/1.1\r\nHost: goms\r\n\r\n\
         DELETE /api/user/nocontent HTTP/1.1\r\nHost: goms\r\n\r\n\
         GET /api/user/notmodified HTTP/1.1\r\nHost: goms\r\nIf-None-Match: \"v1\"\r\n\r\n\
         POST /api/user/echo HTTP/1.1\r\nHost: goms\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client.send(pipelined.as_bytes()).await;

    let get = client.answer(Framing::Normal).await;
    assert_eq!(
        (get.status(), &get.body[..]),
        (200, &b"hello"[..]),
        "{}",
        get.head
    );
    assert_eq!(get.header("connection"), Some("keep-alive"), "{}", get.head);
    // The idle timeout is announced, so a client can close an idle connection first.
    assert_eq!(get.header("keep-alive"), Some("timeout=60"), "{}", get.head);
    let head = client.answer(Framing::NoBody).await;
    assert_eq!(head.status(), 200, "{}", head.head);
    assert_eq!(head.header("content-length"), Some("5"), "{}", head.head);
    let no_content = client.answer(Framing::Normal).await;
    assert_eq!(no_content.status(), 204, "{}", no_content.head);
    let not_modified = client.answer(Framing::Normal).await;
    assert_eq!(not_modified.status(), 304, "{}", not_modified.head);
    let post = client.answer(Framing::Normal).await;
    assert_eq!(post.status(), 200, "{}", post.head);
    assert_eq!(post.body, body.as_bytes());

    still_serves(&mut client).await;
}

#[tokio::test]
async fn a_refused_pipelined_request_says_close_and_nothing_after_it_is_answered_silently() {
    let stage = Stage::start().await;
    let mut client = stage.connect().await;
    // The second request has both framings: refused, and what follows it cannot be trusted.
    client
        .send(
            b"GET /api/user/fixed HTTP/1.1\r\nHost: goms\r\n\r\n\
              POST /api/user/echo HTTP/1.1\r\nHost: goms\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
              GET /api/user/fixed HTTP/1.1\r\nHost: goms\r\n\r\n",
        )
        .await;
    let first = client.answer(Framing::Normal).await;
    assert_eq!(first.status(), 200, "{}", first.head);
    let refused = client.answer(Framing::Normal).await;
    assert_eq!(refused.status(), 400, "{}", refused.head);
    assert_eq!(
        refused.header("connection"),
        Some("close"),
        "{}",
        refused.head
    );
    assert!(
        client.is_closed().await,
        "the gateway closes after a refusal"
    );
}

#[tokio::test]
async fn chunked_bodies_pass_both_ways_and_arrive_whole() {
    let stage = Stage::start().await;
    let mut client = stage.connect().await;

    let chunks: Vec<Vec<u8>> = (0..40).map(|i| pattern(i * 1000, 1000 + i * 37)).collect();
    let mut request =
        b"POST /api/user/echo HTTP/1.1\r\nHost: goms\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    let mut sent = Vec::new();
    for chunk in &chunks {
        request.extend(format!("{:x}\r\n", chunk.len()).bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
        sent.extend(chunk);
    }
    request.extend(b"0\r\n\r\n");
    client.send(&request).await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(answer.header("x-saw-transfer-encoding"), Some("chunked"));
    assert_eq!(
        answer.header("x-body-len"),
        Some(sent.len().to_string().as_str())
    );
    assert_eq!(answer.header("x-body-hash"), Some(Hash::of(&sent).as_str()));
    assert_eq!(Hash::of(&answer.body), Hash::of(&sent));

    client
        .send(b"GET /api/user/stream?kib=300 HTTP/1.1\r\nHost: goms\r\n\r\n")
        .await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(
        answer.header("transfer-encoding"),
        Some("chunked"),
        "{}",
        answer.head
    );
    assert_eq!(Hash::of(&answer.body), Hash::of(&pattern(0, 300 * 1024)));

    still_serves(&mut client).await;
}

#[tokio::test]
async fn a_100_mb_download_streams_through_in_bounded_memory() {
    let stage = Stage::start().await;
    let url = stage.url(&format!("/api/user/stream?kib={}", 100 * 1024));
    // Idle, but warmed up: the first request sets up what every request uses.
    assert_eq!(text_of_fixed(&stage).await, "hello");
    let idle = stage.resident_bytes();

    let mut answer = http().get(&url).timeout(DEADLINE * 4).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let (mut received, mut peak) = (0usize, idle);
    let mut hash = Hash::new();
    while let Some(chunk) = answer.chunk().await.unwrap() {
        hash.update(&chunk);
        received += chunk.len();
        peak = peak.max(stage.resident_bytes());
    }
    assert_eq!(received, 100 * MIB);
    let mut expected = Hash::new();
    for start in (0..100 * MIB).step_by(MIB) {
        expected.update(&pattern(start, MIB));
    }
    assert_eq!(hash.text(), expected.text(), "the bytes arrived as sent");
    let growth = peak.saturating_sub(idle);
    assert!(
        growth < 20 * MIB,
        "the gateway's RSS grew by {} MiB while 100 MiB passed through",
        growth / MIB
    );
}

async fn text_of_fixed(stage: &Stage) -> String {
    let answer = http()
        .get(stage.url("/api/user/fixed"))
        .send()
        .await
        .unwrap();
    answer.text().await.unwrap()
}

/// Sends `total` bytes of the pattern as a body in 256 KiB writes, watching the gateway's
/// memory; returns the highest RSS seen and the body's hash.
async fn send_pattern(client: &mut Client, stage: &Stage, total: usize) -> (usize, String) {
    const WRITE: usize = 256 * 1024;
    let (mut peak, mut hash) = (0usize, Hash::new());
    for start in (0..total).step_by(WRITE) {
        let chunk = pattern(start, WRITE.min(total - start));
        hash.update(&chunk);
        client.send(&chunk).await;
        if start % (4 * MIB) == 0 {
            peak = peak.max(stage.resident_bytes());
        }
    }
    (peak, hash.text())
}

#[tokio::test]
async fn a_100_mb_upload_arrives_whole_on_a_route_that_allows_it_in_bounded_memory() {
    let stage = Stage::start().await;
    assert_eq!(text_of_fixed(&stage).await, "hello");
    let idle = stage.resident_bytes();
    let mut client = stage.connect().await;
    let total = 100 * MIB;
    client
        .send(
            format!(
                "POST /api/user/upload HTTP/1.1\r\nHost: goms\r\nContent-Length: {total}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    let (peak, sent) = send_pattern(&mut client, &stage, total).await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        format!("{total} {sent}")
    );
    let growth = peak.max(stage.resident_bytes()).saturating_sub(idle);
    assert!(
        growth < 20 * MIB,
        "the gateway's RSS grew by {} MiB while a 100 MiB upload passed through",
        growth / MIB
    );
    assert!(UPLOAD_LIMIT > total);
    still_serves(&mut client).await;
}

#[tokio::test]
async fn expect_100_continue_gets_the_upload_through_whole() {
    let stage = Stage::start().await;
    let mut client = stage.connect().await;
    let total = 3 * MIB;
    client
        .send(format!("POST /api/user/upload HTTP/1.1\r\nHost: goms\r\nContent-Length: {total}\r\nExpect: 100-continue\r\n\r\n").as_bytes())
        .await;
    let interim = client.answer(Framing::Normal).await;
    assert_eq!(interim.status(), 100, "{}", interim.head);
    let (_, sent) = send_pattern(&mut client, &stage, total).await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        format!("{total} {sent}")
    );

    // The gateway asked for the body itself; the replica gets it plainly.
    client
        .send(b"POST /api/user/echo HTTP/1.1\r\nHost: goms\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert_eq!(client.answer(Framing::Normal).await.status(), 100);
    client.send(b"hello").await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.body, b"hello", "{}", answer.head);
    assert_eq!(
        answer.header("x-saw-expect"),
        Some("none"),
        "{}",
        answer.head
    );
    still_serves(&mut client).await;
}

#[tokio::test]
async fn http_1_0_clients_and_connection_close_from_either_side() {
    let stage = Stage::start().await;

    // HTTP/1.0 without keep-alive: the answer can be read without chunks, then it ends.
    let mut client = stage.connect().await;
    client
        .send(b"GET /api/user/stream?kib=200 HTTP/1.0\r\nHost: goms\r\n\r\n")
        .await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(answer.header("transfer-encoding"), None, "{}", answer.head);
    assert_eq!(Hash::of(&answer.body), Hash::of(&pattern(0, 200 * 1024)));

    let mut client = stage.connect().await;
    client
        .send(b"GET /api/user/fixed HTTP/1.0\r\nHost: goms\r\n\r\n")
        .await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.body, b"hello");
    assert!(
        client.is_closed().await,
        "an HTTP/1.0 connection without keep-alive ends"
    );

    // HTTP/1.0 with keep-alive: the connection carries a second request.
    let mut client = stage.connect().await;
    let keep_alive =
        b"GET /api/user/fixed HTTP/1.0\r\nHost: goms\r\nConnection: keep-alive\r\n\r\n";
    client.send(keep_alive).await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.body, b"hello", "{}", answer.head);
    assert_eq!(
        answer.header("connection"),
        Some("keep-alive"),
        "{}",
        answer.head
    );
    client.send(keep_alive).await;
    assert_eq!(client.answer(Framing::Normal).await.body, b"hello");

    // `Connection: close` from the client.
    let mut client = stage.connect().await;
    client
        .send(b"GET /api/user/fixed HTTP/1.1\r\nHost: goms\r\nConnection: close\r\n\r\n")
        .await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.body, b"hello");
    assert_eq!(
        answer.header("connection"),
        Some("close"),
        "{}",
        answer.head
    );
    assert!(
        client.is_closed().await,
        "the gateway closes after the answer"
    );

    // `Connection: close` from the replica ends the replica's connection, not the client's.
    let mut client = stage.connect().await;
    for _ in 0..3 {
        client
            .send(b"GET /api/user/close HTTP/1.1\r\nHost: goms\r\n\r\n")
            .await;
        let answer = client.answer(Framing::Normal).await;
        assert_eq!(
            (answer.status(), &answer.body[..]),
            (200, &b"bye"[..]),
            "{}",
            answer.head
        );
    }
    still_serves(&mut client).await;
}

#[tokio::test]
async fn head_204_and_304_answers_carry_no_body() {
    let stage = Stage::start().await;
    let mut client = stage.connect().await;
    client
        .send(b"HEAD /api/user/fixed HTTP/1.1\r\nHost: goms\r\n\r\n")
        .await;
    let answer = client.answer(Framing::NoBody).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(
        answer.header("content-length"),
        Some("5"),
        "{}",
        answer.head
    );
    // A body after the HEAD answer would be read here as the next answer's start.
    still_serves(&mut client).await;

    client
        .send(b"DELETE /api/user/nocontent HTTP/1.1\r\nHost: goms\r\n\r\n")
        .await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 204, "{}", answer.head);
    assert_eq!(answer.header("transfer-encoding"), None, "{}", answer.head);
    still_serves(&mut client).await;

    client
        .send(b"GET /api/user/notmodified HTTP/1.1\r\nHost: goms\r\nIf-None-Match: \"v1\"\r\n\r\n")
        .await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 304, "{}", answer.head);
    assert_eq!(answer.header("etag"), Some("\"v1\""), "{}", answer.head);
    assert_eq!(answer.header("transfer-encoding"), None, "{}", answer.head);
    still_serves(&mut client).await;
}

#[tokio::test]
async fn headers_and_query_bytes_pass_unchanged() {
    let stage = Stage::start().await;
    let mut client = stage.connect().await;

    client
        .send(b"GET /api/user/cookies HTTP/1.1\r\nHost: goms\r\n\r\n")
        .await;
    let answer = client.answer(Framing::Normal).await;
    let cookies: Vec<&str> = answer.headers("set-cookie").collect();
    assert_eq!(
        cookies,
        [
            "first=1; path=/",
            "second=2; httponly",
            "third=3; max-age=60"
        ],
        "{}",
        answer.head
    );

    let query = "q=%20%2F%zz&a+b=c%2Bd&euro=%E2%82%AC&empty=&flag&odd=!$'()*,;:@~";
    client
        .send(format!("GET /api/user/target?{query} HTTP/1.1\r\nHost: goms\r\n\r\n").as_bytes())
        .await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 200, "{}", answer.head);
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        format!("/target?{query}")
    );

    // Just under gateway.limits.headerBytes (60 KiB, counted as `name: value` and CRLF).
    let others = "host: goms\r\n".len() + "content-length: 0\r\n".len();
    let big = "b".repeat(60 * 1024 - others - "x-big: \r\n".len() - 16);
    client
        .send(format!("POST /api/user/echo HTTP/1.1\r\nHost: goms\r\nContent-Length: 0\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(
        answer.status(),
        200,
        "{}",
        &answer.head[..200.min(answer.head.len())]
    );
    assert_eq!(
        answer.header("x-big-len"),
        Some(big.len().to_string().as_str())
    );
    still_serves(&mut client).await;
}

/// The gateway's count of trace events it produced.
async fn events_emitted(stage: &Stage) -> f64 {
    let metrics = http().get(stage.url("/metrics")).send().await.unwrap();
    metric(
        &metrics.text().await.unwrap(),
        "goms_trace_events_emitted_total",
    )
}

async fn next_message(
    socket: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
) -> Option<Message> {
    tokio::time::timeout(DEADLINE, socket.next())
        .await
        .expect("the next message arrives in time")
        .map(|message| message.expect("a well-formed frame"))
}

#[tokio::test]
async fn a_websocket_passes_both_ways_through_a_route_and_is_traced() {
    let stage = Stage::start().await;
    let before = events_emitted(&stage).await;
    let stream = TcpStream::connect(("127.0.0.1", stage.gateway.port()))
        .await
        .unwrap();
    let url = format!("ws://127.0.0.1:{}/api/chat/ws", stage.gateway.port());
    let (mut socket, handshake) =
        tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url, stream))
            .await
            .expect("the upgrade is answered in time")
            .expect("the gateway passes the upgrade to the replica");
    assert_eq!(handshake.status(), 101);
    assert!(handshake.headers().contains_key("x-request-id"));

    for round in 0..10 {
        let text = format!("message {round}");
        socket.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next_message(&mut socket).await, Some(Message::text(text)));
        let binary = pattern(round, 10 + round);
        socket.send(Message::binary(binary.clone())).await.unwrap();
        assert_eq!(
            next_message(&mut socket).await,
            Some(Message::binary(binary))
        );
    }
    let large = pattern(0, 100 * 1000);
    socket.send(Message::binary(large.clone())).await.unwrap();
    assert_eq!(
        next_message(&mut socket).await,
        Some(Message::binary(large))
    );

    socket
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut socket).await,
        Some(Message::Pong(b"are you there".to_vec().into()))
    );

    let goodbye = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    socket.close(Some(goodbye.clone())).await.unwrap();
    assert_eq!(
        next_message(&mut socket).await,
        Some(Message::Close(Some(goodbye))),
        "the replica answers the close handshake through the gateway"
    );
    assert_eq!(
        next_message(&mut socket).await,
        None,
        "then the stream ends"
    );

    // The upgraded request still gets its two trace events, once the tunnel closed.
    eventually(
        "the WebSocket request's trace events",
        Duration::from_secs(10),
        || async { events_emitted(&stage).await >= before + 2.0 },
    )
    .await;
}

#[tokio::test]
async fn a_replica_that_refuses_an_upload_early_is_relayed_and_the_connection_ends_cleanly() {
    let stage = Stage::start().await;
    let mut client = stage.connect().await;
    client
        .send(b"POST /api/early/refuse HTTP/1.1\r\nHost: goms\r\nContent-Length: 1048576\r\nExpect: 100-continue\r\n\r\n")
        .await;
    // The gateway asks for the body itself, as nginx does; the replica never sees `Expect`.
    let interim = client.answer(Framing::Normal).await;
    assert_eq!(interim.status(), 100, "{}", interim.head);
    // The replica answers before the body arrives; the gateway may stop reading it.
    let _ = client.stream.write_all(&pattern(0, MIB)).await;
    let answer = client.answer(Framing::Normal).await;
    assert_eq!(answer.status(), 413, "{}", answer.head);
    assert_eq!(answer.body, b"too big!");
    // Either the gateway had read the whole body by the time the answer went out, and the
    // connection goes on; or it had not, and what follows cannot be told apart from the unread
    // rest of the body, so it says close and closes.
    match answer.header("connection") {
        Some("keep-alive") => still_serves(&mut client).await,
        Some("close") => assert!(client.is_closed().await, "the gateway closes after close"),
        other => panic!("Connection: {other:?} in {}", answer.head),
    }
}
