//! What keeps one bad or busy service from costing everyone: outlier ejection of a replica
//! that keeps failing, the retry budget, `maxInFlight` and rate limits (the route file's
//! per-service settings, on `/cluster` and `/metrics`), and the gateway's own memory guard
//! (`gateway.memoryLimit`). Real etcd, real gateway, replicas written here.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use support::{
    eventually, http, metric, node_detail, register_replica, route_file, wait_for_nodes, Etcd, Goms,
};

/// A replica written in the test that answers every request with `status`, after waiting for
/// `gate` when one is given; it counts what it got.
struct Replica {
    id: String,
    hits: Arc<AtomicUsize>,
}

async fn replica(
    etcd: &Etcd,
    name: &str,
    status: StatusCode,
    gate: Option<Arc<tokio::sync::Semaphore>>,
) -> Replica {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let answer = format!("{name} answers {status}");
    let app = axum::Router::new().fallback(move || {
        let (counted, gate, answer) = (counted.clone(), gate.clone(), answer.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = gate {
                let _pass = gate.acquire().await.expect("the gate stays open");
            }
            (status, answer)
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    register_replica(etcd, "user", name, addr, "").await;
    Replica {
        id: name.to_string(),
        hits,
    }
}

async fn metrics(port: u16) -> String {
    http()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_replica_that_keeps_failing_is_ejected_until_its_time_is_up_then_gets_one_trial() {
    let etcd = Etcd::start().await;
    let good = [
        replica(&etcd, "good-1", StatusCode::OK, None).await,
        replica(&etcd, "good-2", StatusCode::OK, None).await,
    ];
    let bad = replica(&etcd, "bad", StatusCode::INTERNAL_SERVER_ERROR, None).await;
    let (_folder, routes) = route_file(
        "services:\n  user:\n    login: /login\n    ejection:\n      consecutiveFailures: 5\n      baseTime: 3s\n",
    );
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 3).await;
    let client = http();
    let url = format!("http://127.0.0.1:{port}/api/user/login");
    let get = || async { client.get(&url).send().await.unwrap().status().as_u16() };

    // A 500 is not retried (the replica may have acted on the request): the client sees each
    // of the first five, and then no more.
    let mut answers = Vec::new();
    while bad.hits.load(Ordering::SeqCst) < 5 {
        answers.push(get().await);
        assert!(
            answers.len() < 100,
            "the bad replica got under 5 of 100 requests"
        );
    }
    assert_eq!(answers.iter().filter(|s| **s == 500).count(), 5);
    let ejected = node_detail(port, "user", "bad").await;
    assert_eq!(ejected["state"], "ejected", "{ejected}");
    let reason = ejected["ejection"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("5 failures in a row") && reason.contains("500"),
        "{ejected}"
    );
    assert!(
        ejected["ejection"]["timeLeftMs"].as_u64() > Some(0),
        "{ejected}"
    );
    let exposition = metrics(port).await;
    assert_eq!(
        metric(
            &exposition,
            "goms_upstream_ejected{service=\"user\",node=\"bad\"}"
        ),
        1.0
    );

    for _ in 0..30 {
        assert_eq!(get().await, 200, "an ejected replica gets no request");
    }
    assert_eq!(bad.hits.load(Ordering::SeqCst), 5);
    assert!(
        good.iter().all(|r| r.hits.load(Ordering::SeqCst) >= 15),
        "the load is shared"
    );

    // Its time is up: one request, and only one, is sent to it as a trial. It fails, so the
    // replica is out again, for twice as long.
    eventually("the ejection ends", Duration::from_secs(20), || async {
        node_detail(port, "user", "bad").await["ejection"]["timeLeftMs"] == 0
    })
    .await;
    let answers: Vec<u16> = {
        let mut answers = Vec::new();
        for _ in 0..20 {
            answers.push(get().await);
        }
        answers
    };
    assert_eq!(
        bad.hits.load(Ordering::SeqCst),
        6,
        "exactly one trial request"
    );
    assert_eq!(
        answers.iter().filter(|s| **s == 500).count(),
        1,
        "{answers:?}"
    );
    let again = node_detail(port, "user", "bad").await;
    assert_eq!(again["state"], "ejected", "{again}");
    assert_eq!(again["ejection"]["ejectionsInARow"], 2, "{again}");
    assert!(
        again["ejection"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("trial")),
        "{again}"
    );
    let exposition = metrics(port).await;
    assert_eq!(
        metric(
            &exposition,
            "goms_upstream_ejections_total{service=\"user\",node=\"bad\"}"
        ),
        2.0
    );
    assert_eq!(
        node_detail(port, "user", &good[0].id).await["state"],
        "serving"
    );
}

#[tokio::test]
async fn with_every_replica_failing_the_retry_budget_holds_upstream_load_to_its_share() {
    let etcd = Etcd::start().await;
    let replicas = [
        replica(&etcd, "down-1", StatusCode::SERVICE_UNAVAILABLE, None).await,
        replica(&etcd, "down-2", StatusCode::SERVICE_UNAVAILABLE, None).await,
        replica(&etcd, "down-3", StatusCode::SERVICE_UNAVAILABLE, None).await,
    ];
    // No floor, and no ejection, so that the budget alone decides: 20% of the requests.
    let (_folder, routes) = route_file(
        "services:\n  user:\n    login:\n      path: /login\n      retries: 2\n    ejection: false\n    retryBudget:\n      percent: 20\n      minPerSecond: 0\n",
    );
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 3).await;
    let client = http();
    let url = format!("http://127.0.0.1:{port}/api/user/login");

    let requests = 200;
    for _ in 0..requests {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 503, "the replicas' answer is passed on");
    }
    let attempts: usize = replicas.iter().map(|r| r.hits.load(Ordering::SeqCst)).sum();
    // Without the budget, each request would make three attempts (600).
    assert!(
        (requests * 115 / 100..=requests * 120 / 100).contains(&attempts),
        "{requests} requests made {attempts} attempts; the budget allows 1.2 times"
    );
    let over_budget = metric(
        &metrics(port).await,
        "goms_service_retries_over_budget_total{service=\"user\"}",
    );
    assert!(
        over_budget >= (requests - (attempts - requests)) as f64,
        "{over_budget}"
    );
}

#[tokio::test]
async fn past_max_in_flight_a_service_answers_503_at_once_with_retry_after() {
    let etcd = Etcd::start().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = replica(&etcd, "slow", StatusCode::OK, Some(gate.clone())).await;
    let (_folder, routes) =
        route_file("services:\n  user:\n    login: /login\n    maxInFlight: 2\n");
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;
    let client = http();
    let url = format!("http://127.0.0.1:{port}/api/user/login");

    // A live edit to an invalid cap is refused with its line; the cap of 2 stays in force.
    std::fs::write(
        &routes,
        "services:\n  user:\n    login: /login\n    maxInFlight: 0\n",
    )
    .unwrap();
    gateway
        .wait_for_line("services.yml:4:", Duration::from_secs(10))
        .await;
    assert!(
        gateway.has_line("`maxInFlight` must be a whole number from 1"),
        "{}",
        gateway.output()
    );

    let in_progress: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client.get(&url).send()))
        .collect();
    eventually(
        "two requests reach the replica",
        Duration::from_secs(10),
        || async { held.hits.load(Ordering::SeqCst) == 2 },
    )
    .await;
    let refused = client.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], 503);
    assert!(
        body["msg"]
            .as_str()
            .is_some_and(|m| m.contains("maxInFlight")),
        "{body}"
    );
    assert_eq!(
        held.hits.load(Ordering::SeqCst),
        2,
        "the refused request never reached it"
    );

    gate.add_permits(1_000);
    for request in in_progress {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    let exposition = metrics(port).await;
    assert_eq!(
        metric(
            &exposition,
            "goms_service_refused_over_max_in_flight_total{service=\"user\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&exposition, "goms_service_in_flight{service=\"user\"}"),
        0.0
    );
}

#[tokio::test]
async fn past_its_rate_limit_a_client_gets_429_with_the_drafts_headers_and_another_client_does_not()
{
    let etcd = Etcd::start().await;
    let _replica = replica(&etcd, "r", StatusCode::OK, None).await;
    // Per minute, so that the bucket does not refill during the test.
    let (_folder, routes) = route_file(
        "services:\n  user:\n    login: /login\n    open:\n      path: /login\n      rateLimit: false\n    rateLimit: {requests: 5, per: 1m, key: \"header:x-api-key\"}\n",
    );
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;
    let client = http();
    let send = |route: &'static str, key: &'static str| {
        client
            .get(format!("http://127.0.0.1:{port}/api/user/{route}"))
            .header("x-api-key", key)
            .send()
    };

    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(send("login", "alpha").await.unwrap());
    }
    let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429, 429, 429]);
    let served = &answers[0];
    assert_eq!(served.headers()["ratelimit-policy"], "\"route\";q=5;w=60");
    assert_eq!(served.headers()["ratelimit"], "\"route\";r=4;t=12");
    let refused = answers.pop().unwrap();
    assert_eq!(
        refused.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .split(';')
            .nth(1),
        Some("r=0")
    );
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=12).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], 429);

    assert_eq!(
        send("login", "beta").await.unwrap().status(),
        200,
        "another key has its own bucket"
    );
    for _ in 0..10 {
        let open = send("open", "alpha").await.unwrap();
        assert_eq!(
            open.status(),
            200,
            "a route with rateLimit: false is never limited"
        );
        assert!(open.headers().get("ratelimit").is_none());
    }
    let exposition = metrics(port).await;
    assert_eq!(
        metric(
            &exposition,
            "goms_route_rate_limited_total{route=\"user/login\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(&exposition, "goms_gateway_responses_total{code=\"429\"}"),
        5.0
    );
}

/// A replica that reads the whole body and answers its length.
async fn body_reader(etcd: &Etcd, name: &str) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(|body: axum::body::Bytes| async move { body.len().to_string() });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    register_replica(etcd, "user", name, addr, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_memory_limit_a_gateway_sheds_new_requests_spills_its_trace_queue_and_recovers() {
    let etcd = Etcd::start().await;
    body_reader(&etcd, "r1").await;
    let (_folder, routes) = route_file("services:\n  user:\n    upload: /upload\n");
    // The broker is away (nothing listens at the default test amqpAddr), and events wait in
    // memory for a minute between publishes: each request's two events hold its 64 KiB JSON
    // body twice, so memory climbs with traffic until the guard acts. The trace buffers'
    // own bound (`trace.bufferMaxBytes`) is set past the limit, so that the guard is what acts.
    let limit = 128u64 << 20;
    let gateway = Goms::gateway_with(
        &etcd.endpoint(),
        &routes,
        &[],
        &[
            ("GOMS__GATEWAY__MEMORY_LIMIT", "128MiB"),
            ("GOMS__TRACE__PUBLISH_INTERVAL", "60s"),
            ("GOMS__TRACE__QUEUE_CAPACITY", "1000000"),
            ("GOMS__TRACE__BUFFER_MAX_BYTES", "1GiB"),
            ("GOMS__TRACE__BODY_MAX_BYTES", "65536"),
        ],
    )
    .await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;
    let url = format!("http://127.0.0.1:{port}/api/user/upload");
    let before = metric(&metrics(port).await, "goms_process_resident_anon_bytes");

    let refused = Arc::new(tokio::sync::Mutex::new(None));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url, refused) = (http(), url.clone(), refused.clone());
        clients.spawn(async move {
            for _ in 0..2000 {
                if refused.lock().await.is_some() {
                    return;
                }
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(format!("{{\"data\":\"{}\"}}", "a".repeat(65_000)))
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    200 => {}
                    503 => {
                        let retry_after = response.headers().get("retry-after").cloned();
                        let body = response.text().await.unwrap();
                        *refused.lock().await = Some((retry_after, body));
                        return;
                    }
                    other => panic!("a request got {other}"),
                }
            }
        });
    }
    while let Some(client) = clients.join_next().await {
        client.unwrap();
    }
    let taken = refused.lock().await.take();
    let Some((retry_after, body)) = taken else {
        panic!(
            "16,000 requests of 64 KiB never took the gateway over 128 MiB:\n{}",
            metrics(port).await
        );
    };
    assert_eq!(retry_after.unwrap(), "1");
    assert!(body.contains("gateway.memoryLimit"), "{body}");
    let at_trip = metrics(port).await;
    assert!(metric(&at_trip, "goms_gateway_memory_trips_total") >= 1.0);
    assert!(metric(&at_trip, "goms_gateway_memory_refused_total") >= 1.0);
    assert_eq!(
        metric(&at_trip, "goms_gateway_memory_limit_bytes"),
        limit as f64
    );
    let health = http()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "liveness answers while shedding");

    // The guard spilled the waiting events to the spool and memory went back under 90% of
    // the limit: requests are let in again, and no event was dropped.
    let client = http();
    eventually("requests are let in again", Duration::from_secs(30), || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let response = client.post(&url).body("small").send().await.unwrap();
            response.status() == 200
        }
    })
    .await;
    let after = metrics(port).await;
    println!(
        "RssAnon: {:.0} MiB at start, {:.0} MiB when requests are let in again (limit 128 MiB)",
        before / 1048576.0,
        metric(&after, "goms_process_resident_anon_bytes") / 1048576.0
    );
    assert_eq!(metric(&after, "goms_gateway_memory_over_limit"), 0.0);
    assert!(metric(&after, "goms_process_resident_anon_bytes") < limit as f64 * 0.9);
    assert!(
        metric(&after, "goms_trace_events_spooled_total") > 0.0,
        "{after}"
    );
    assert_eq!(metric(&after, "goms_trace_events_dropped_total"), 0.0);
    assert!(gateway.has_line("Over gateway.memoryLimit"));
    assert!(gateway.has_line("Back below gateway.memoryLimit"));
}
