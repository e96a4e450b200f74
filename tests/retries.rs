//! Retry rules against a replica that answers 503 or hangs: idempotent requests move on
//! to the next replica, a POST that reached a replica is never sent twice. Also how the
//! gateway keeps its connections to a replica: reused, not reopened.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use support::{free_port, http, register_replica, route_file, wait_for_nodes, Etcd, Goms, ROUTES};

/// A replica written in the test: registers itself like any service in any language would
/// (a JSON value under `/goms/services/user/{id}` with a lease), and answers with `behaviour`.
struct FakeReplica {
    id: String,
    hits: Arc<AtomicUsize>,
    posts: Arc<AtomicUsize>,
    /// TCP connections the replica accepted.
    connections: Arc<AtomicUsize>,
}

#[derive(Clone, Copy)]
enum Behaviour {
    Unavailable,
    Hang,
    Answer,
}

/// A listener that counts the connections it accepts.
struct CountingListener {
    inner: tokio::net::TcpListener,
    accepted: Arc<AtomicUsize>,
}

impl axum::serve::Listener for CountingListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let accepted = self.inner.accept().await;
        self.accepted.fetch_add(1, Ordering::SeqCst);
        accepted.expect("accept on loopback")
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

async fn fake_replica(etcd: &Etcd, behaviour: Behaviour) -> FakeReplica {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let posts = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (h, p) = (hits.clone(), posts.clone());
    let app = axum::Router::new().fallback(move |method: axum::http::Method| {
        let (h, p) = (h.clone(), p.clone());
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            if method == axum::http::Method::POST {
                p.fetch_add(1, Ordering::SeqCst);
            }
            match behaviour {
                Behaviour::Answer => return (StatusCode::OK, "fake replica answers"),
                Behaviour::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
                Behaviour::Unavailable => {}
            }
            (StatusCode::SERVICE_UNAVAILABLE, "fake replica unavailable")
        }
    });
    let counting = CountingListener {
        inner: listener,
        accepted: connections.clone(),
    };
    tokio::spawn(async move { axum::serve(counting, app).await.unwrap() });
    let id = format!("fake-{}", addr.port());
    register_replica(etcd, "user", &id, addr, "").await;
    FakeReplica {
        id,
        hits,
        posts,
        connections,
    }
}

#[tokio::test]
async fn connections_to_a_replica_are_reused_not_reopened() {
    let etcd = Etcd::start().await;
    let fake = fake_replica(&etcd, Behaviour::Answer).await;
    let (_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway(&etcd, &routes, &["--threads", "2"]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;
    let client = http();
    let url = format!("http://127.0.0.1:{port}/api/user/login");

    let (clients, each) = (8, 250);
    // The gateway's TCP health check opens a connection every 500 ms (the suites' interval);
    // those are not request connections, so the count starts now and allows for them.
    let before = fake.connections.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                for _ in 0..each {
                    let response = client.get(&url).send().await.unwrap();
                    assert_eq!(response.status(), 200);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(fake.hits.load(Ordering::SeqCst), clients * each);
    // At most one connection per request in flight on each of the two proxy threads. A
    // gateway that loses idle connections opens more: pingora's shared pool lost about one
    // connection in a hundred requests to a race between its two threads.
    let health_checks = (started.elapsed().as_millis() / 500) as usize + 1;
    let accepted = fake.connections.load(Ordering::SeqCst) - before;
    let opened = accepted.saturating_sub(health_checks);
    assert!(
        opened <= 2 * clients,
        "{} requests from {clients} clients opened {opened} connections to {}",
        clients * each,
        fake.id
    );
}

#[tokio::test]
async fn post_is_not_retried_after_a_503_but_get_is() {
    let etcd = Etcd::start().await;
    let _healthy = Goms::service(&etcd, free_port(), &[]);
    let fake = fake_replica(&etcd, Behaviour::Unavailable).await;
    // Without ejection: five 503s in a row would take the fake replica out before any POST
    // could reach it (tests/guards.rs covers ejection).
    let (_folder, routes) =
        route_file("services:\n  user:\n    login: /login\n    ejection: false\n");
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 2).await;
    let client = http();
    let url = format!("http://127.0.0.1:{port}/api/user/login");

    for _ in 0..6 {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "GET must move on to the healthy replica"
        );
    }
    let get_hits = fake.hits.load(Ordering::SeqCst);
    assert!(get_hits >= 1, "round robin never reached {}", fake.id);

    let mut unavailable = 0;
    for _ in 0..6 {
        let response = client.post(&url).body("a=1").send().await.unwrap();
        match response.status().as_u16() {
            200 => {}
            503 => unavailable += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    let posts = fake.posts.load(Ordering::SeqCst);
    assert!(posts >= 1, "round robin never sent a POST to {}", fake.id);
    assert_eq!(
        unavailable, posts,
        "every POST the fake replica saw must reach the client as its 503, never be replayed"
    );
}

#[tokio::test]
async fn a_hanging_replica_times_out_with_504_for_post_and_is_skipped_for_get() {
    let etcd = Etcd::start().await;
    let _healthy = Goms::service(&etcd, free_port(), &[]);
    let fake = fake_replica(&etcd, Behaviour::Hang).await;
    let (_folder, routes) =
        route_file("services:\n  user:\n    login:\n      path: /login\n      timeout: 300ms\n");
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 2).await;
    let client = http();
    let url = format!("http://127.0.0.1:{port}/api/user/login");

    for _ in 0..4 {
        assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    }
    assert!(fake.hits.load(Ordering::SeqCst) >= 1);

    let mut timed_out = 0;
    for _ in 0..4 {
        let response = client.post(&url).send().await.unwrap();
        if response.status() == 504 {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["code"], 504);
            timed_out += 1;
        } else {
            assert_eq!(response.status(), 200);
        }
    }
    assert_eq!(timed_out, fake.posts.load(Ordering::SeqCst));
    assert!(timed_out >= 1);
}

/// Registers a node whose port nothing listens on.
async fn dead_node(etcd: &Etcd, id: &str) {
    let port = free_port();
    let mut client = etcd.client().await;
    let value =
        serde_json::json!({"id": id, "service": "user", "http": format!("127.0.0.1:{port}")});
    client
        .put(format!("/goms/services/user/{id}"), value.to_string(), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn attempts_are_bounded_by_the_routes_retries() {
    let etcd = Etcd::start().await;
    let fakes = [
        fake_replica(&etcd, Behaviour::Unavailable).await,
        fake_replica(&etcd, Behaviour::Unavailable).await,
        fake_replica(&etcd, Behaviour::Unavailable).await,
    ];
    let (_folder, routes) = route_file(
        "services:\n  user:\n    once:\n      path: /once\n      retries: 1\n    default: /default\n",
    );
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 3).await;
    let client = http();
    let hits = |fakes: &[FakeReplica]| {
        fakes
            .iter()
            .map(|f| f.hits.load(Ordering::SeqCst))
            .sum::<usize>()
    };

    let response = client
        .get(format!("http://127.0.0.1:{port}/api/user/once"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        503,
        "the last replica's answer is passed on"
    );
    assert_eq!(hits(&fakes), 2, "retries: 1 means two attempts");

    let response = client
        .get(format!("http://127.0.0.1:{port}/api/user/default"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        hits(&fakes),
        2 + 3,
        "the default of 2 retries means three attempts"
    );
}

#[tokio::test]
async fn unreachable_replicas_answer_502_in_the_goms_envelope() {
    let etcd = Etcd::start().await;
    dead_node(&etcd, "dead-1").await;
    let (_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    let client = http();
    let url = format!("http://127.0.0.1:{port}/api/user/login");
    support::eventually(
        "gateway knows the dead node",
        Duration::from_secs(20),
        || {
            let client = client.clone();
            let url = url.clone();
            async move { matches!(client.get(&url).send().await, Ok(r) if r.status() != 503) }
        },
    )
    .await;
    let response = client.post(&url).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], 502);
    assert_eq!(body["status"], false);
    assert!(body["requestId"].as_str().is_some_and(|id| !id.is_empty()));
}

#[tokio::test]
async fn a_client_that_goes_away_is_counted_and_not_logged_as_an_error() {
    use tokio::io::AsyncWriteExt;
    let etcd = Etcd::start().await;
    let fake = fake_replica(&etcd, Behaviour::Hang).await;
    let (_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;

    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    client
        .write_all(b"GET /api/user/login HTTP/1.1\r\nHost: goms\r\n\r\n")
        .await
        .unwrap();
    support::eventually(
        "the replica got the request",
        Duration::from_secs(10),
        || {
            let hits = fake.hits.clone();
            async move { hits.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    drop(client);

    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    support::eventually(
        "goms_gateway_client_aborts_total 1",
        Duration::from_secs(10),
        || {
            let url = metrics_url.clone();
            async move {
                let text = http().get(&url).send().await.unwrap().text().await.unwrap();
                text.lines()
                    .any(|l| l == "goms_gateway_client_aborts_total 1")
            }
        },
    )
    .await;
    assert!(
        !gateway.has_line("Fail to proxy"),
        "a client going away is not an error:\n{}",
        gateway.output()
    );
}

#[tokio::test]
async fn a_replica_that_answers_requests_is_not_health_checked_and_an_idle_one_is() {
    let etcd = Etcd::start().await;
    let fake = fake_replica(&etcd, Behaviour::Answer).await;
    let (_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway(&etcd, &routes, &["--threads", "1"]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;
    let client = http();
    let url = format!("http://127.0.0.1:{port}/api/user/login");

    // Requests every 100 ms for 3 s, six health-check intervals of the suites' 500 ms: each
    // interval sees a success, so the TCP check opens nothing; the requests reuse one
    // connection.
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    let before = fake.connections.load(Ordering::SeqCst);
    for _ in 0..30 {
        assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let while_busy = fake.connections.load(Ordering::SeqCst) - before;
    assert!(
        while_busy <= 1,
        "{while_busy} connections opened while requests proved the replica up"
    );

    // Idle, it is checked again: a connection each interval.
    let idle_since = fake.connections.load(Ordering::SeqCst);
    support::eventually("health checks resume", Duration::from_secs(10), || async {
        fake.connections.load(Ordering::SeqCst) >= idle_since + 2
    })
    .await;
}
