//! `goms sidecar`: a Python app that knows nothing of goms (examples/order/app.py) joins the
//! cluster behind a real sidecar, with real etcd, a real gateway and, for the trace test,
//! real RabbitMQ and the Elasticsearch STAND-IN (support::es_standin).

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::es_standin::EsStandIn;
use support::{
    eventually, free_port, http, metric, read_until_closed, route_file, text_of, wait_for_nodes,
    Etcd, Goms, RabbitMq,
};

const ROUTES: &str =
    "services:\n  user:\n    login: /login\n  order:\n    submit: /order/submit\n    slow: /slow\n";

/// The Python app, killed with the test.
struct App {
    child: Child,
    port: u16,
    replica: String,
}

impl App {
    fn start(replica: &str, port: u16) -> App {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/order/app.py");
        let child = Command::new("python3")
            .args([script, "--port", &port.to_string(), "--replica", replica])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs examples/order/app.py");
        App {
            child,
            port,
            replica: replica.to_string(),
        }
    }

    /// What the app received: `(request count, header names)`.
    async fn seen(&self) -> (u64, HashSet<String>) {
        let document: serde_json::Value = http()
            .get(format!("http://127.0.0.1:{}/_seen", self.port))
            .send()
            .await
            .expect("the app answers /_seen")
            .json()
            .await
            .unwrap();
        let names = document["headerNames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|name| name.as_str().unwrap().to_string())
            .collect();
        (document["requests"].as_u64().unwrap(), names)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An app and its sidecar; the sidecar's port is the one it logged.
struct Replica {
    app: App,
    sidecar: Goms,
    port: u16,
}

async fn replica(etcd: &Etcd, replica: &str, env: &[(&str, &str)]) -> Replica {
    let app = App::start(replica, free_port());
    let app_addr = format!("127.0.0.1:{}", app.port);
    let sidecar = Goms::spawn(
        &format!("sidecar:{replica}"),
        &[
            "sidecar",
            "--name",
            "order",
            "--app",
            &app_addr,
            "--http-port",
            "0",
            "--admin-addr",
            "127.0.0.1:0",
            "--health",
            "/healthz",
            "--health-interval",
            "300ms",
            "--lease-ttl",
            "3",
            "--etcd-addr",
            &etcd.endpoint(),
        ],
        env,
    );
    sidecar
        .wait_for_line("sidecar on port", Duration::from_secs(20))
        .await;
    let port = logged_port(&sidecar.output());
    Replica { app, sidecar, port }
}

fn logged_port(output: &str) -> u16 {
    let line = output
        .lines()
        .find(|line| line.contains("sidecar on port"))
        .expect("the sidecar logs its port");
    let after = line.split("sidecar on port ").nth(1).unwrap();
    after.split(' ').next().unwrap().parse().expect("a port")
}

async fn gateway(etcd: &Etcd, env: &[(&str, &str)]) -> (Goms, u16, tempfile::TempDir) {
    let (folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway_with(&etcd.endpoint(), &routes, &[], env).await;
    let port = gateway.port();
    (gateway, port, folder)
}

async fn submit(gateway_port: u16, item: &str) -> (u16, String, serde_json::Value) {
    let response = http()
        .post(format!("http://127.0.0.1:{gateway_port}/api/order/submit"))
        .form(&[("item", item)])
        .send()
        .await
        .expect("the gateway answers");
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get("x-served-by")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, served_by, response.json().await.unwrap())
}

#[tokio::test]
async fn a_python_app_behind_sidecars_is_routed_round_robin_and_never_sees_the_key() {
    let etcd = Etcd::start().await;
    let _users = [
        Goms::service(&etcd, free_port(), &[]),
        Goms::service(&etcd, free_port(), &[]),
    ];
    let first = replica(&etcd, "order-a", &[]).await;
    let second = replica(&etcd, "order-b", &[]).await;
    let (_gateway, port, _routes) = gateway(&etcd, &[]).await;
    wait_for_nodes(port, "order", 2).await;
    wait_for_nodes(port, "user", 2).await;

    let mut replicas = Vec::new();
    let mut served_by = Vec::new();
    for n in 0..6 {
        let (status, by, body) = submit(port, &n.to_string()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["item"], n.to_string());
        replicas.push(body["data"]["replica"].as_str().unwrap().to_string());
        served_by.push(by);
    }
    for pair in replicas.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "round robin across both sidecars: {replicas:?}"
        );
    }
    let sidecars: HashSet<String> = served_by.iter().cloned().collect();
    let expected: HashSet<String> = [first.port, second.port]
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    assert_eq!(sidecars, expected, "X-Served-By names the sidecar nodes");

    let login = http()
        .post(format!("http://127.0.0.1:{port}/api/user/login"))
        .form(&[("username", "ada")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200, "the user replicas still answer");

    for replica in [&first, &second] {
        let (requests, names) = replica.app.seen().await;
        assert_eq!(requests, 3, "{} got its share", replica.app.replica);
        assert!(
            !names.contains("call-service-key"),
            "the app saw the key: {names:?}"
        );
        assert!(names.contains("x-request-id"), "{names:?}");
    }

    // Straight to a sidecar without the key: 401 in the envelope, and the app sees nothing.
    let (before, _) = first.app.seen().await;
    let refused = http()
        .post(format!("http://127.0.0.1:{}/order/submit", first.port))
        .header("X-Request-Id", "no-key-1")
        .form(&[("item", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], 401);
    assert_eq!(body["status"], false);
    assert_eq!(body["requestId"], "no-key-1");
    let wrong = http()
        .get(format!("http://127.0.0.1:{}/order/submit", first.port))
        .header("Call-Service-Key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        first.app.seen().await.0,
        before,
        "refused calls never reach the app"
    );
}

#[tokio::test]
async fn a_request_through_gateway_and_sidecar_leaves_all_four_events() {
    let etcd = Etcd::start().await;
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let amqp = broker.url();
    let env = [("GOMS__AMQP_ADDR", amqp.as_str())];
    let _order = replica(&etcd, "order-traced", &env).await;
    let (_gateway, port, _routes) = gateway(&etcd, &env).await;
    wait_for_nodes(port, "order", 1).await;
    let es_url = es.url();
    let _consumer = Goms::spawn(
        "consumer",
        &["trace-consumer"],
        &[
            ("GOMS__AMQP_ADDR", amqp.as_str()),
            ("GOMS__ES_ADDR", es_url.as_str()),
            ("GOMS__TRACE_CONSUMER__BATCH_WAIT", "50ms"),
        ],
    );

    let response = http()
        .post(format!("http://127.0.0.1:{port}/api/order/submit"))
        .header("X-Request-Id", "sidecar-trace-1")
        .header("Authorization", "Bearer secret")
        .form(&[("item", "42")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    eventually(
        "four events for sidecar-trace-1",
        Duration::from_secs(30),
        || {
            let es = es.clone();
            async move { es.by_request("sidecar-trace-1").len() == 4 }
        },
    )
    .await;
    let events: HashMap<String, serde_json::Value> = es
        .by_request("sidecar-trace-1")
        .into_iter()
        .map(|(_, _, doc)| (doc["event"].as_str().unwrap().to_string(), doc))
        .collect();
    for kind in [
        "request.start",
        "service.start",
        "service.end",
        "request.end",
    ] {
        assert!(events.contains_key(kind), "{kind} missing: {events:?}");
    }
    let end = &events["service.end"];
    assert_eq!(end["serviceName"], "order");
    assert_eq!(end["status"], 200, "service.end carries the app's status");
    assert!(end["durationMs"].as_f64().is_some_and(|ms| ms >= 0.0));
    let headers = &events["service.start"]["request"]["headers"];
    assert_eq!(headers["authorization"], "[REDACTED]");
    assert_eq!(headers["call-service-key"], "[REDACTED]");
    assert_eq!(
        events["service.start"]["traceId"], events["request.start"]["traceId"],
        "one trace across gateway and sidecar"
    );
}

#[tokio::test]
async fn a_dead_app_leaves_the_registry_and_joins_again_when_it_recovers() {
    let etcd = Etcd::start().await;
    let mut flaky = replica(&etcd, "order-flaky", &[]).await;
    let _steady = replica(&etcd, "order-steady", &[]).await;
    let (_gateway, port, _routes) = gateway(&etcd, &[]).await;
    wait_for_nodes(port, "order", 2).await;

    // A steady GET client for the whole test; retries and the other replica cover the kill.
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (failures, sent, stop) = (failures.clone(), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let client = http();
            while !stop.load(Ordering::Relaxed) {
                let url = format!("http://127.0.0.1:{port}/api/order/submit?item=steady");
                let failure = match client.get(url).send().await {
                    Ok(answer) if answer.status() == 200 => None,
                    Ok(answer) => Some(format!(
                        "{} {}",
                        answer.status(),
                        answer.text().await.unwrap_or_default()
                    )),
                    Err(error) => Some(format!("{error:?}")),
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if let Some(failure) = failure {
                    failures.lock().unwrap().push(failure);
                }
            }
        })
    };

    let app_port = flaky.app.port;
    flaky.app.kill();
    flaky
        .sidecar
        .wait_for_line(
            "leaving the registry until it recovers",
            Duration::from_secs(10),
        )
        .await;
    wait_for_nodes(port, "order", 1).await;

    flaky.app = App::start("order-flaky-again", app_port);
    wait_for_nodes(port, "order", 2).await;
    eventually(
        "the recovered replica takes traffic",
        Duration::from_secs(10),
        || async move {
            let (_, _, body) = submit(port, "back").await;
            body["data"]["replica"] == "order-flaky-again"
        },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 20, "the client kept sending ({sent} requests)");
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {sent} GETs failed while an app died and came back: {failures:#?}",
        failures.len()
    );
}

#[tokio::test]
async fn sigterm_leaves_the_registry_first_then_finishes_the_slow_request() {
    let etcd = Etcd::start().await;
    let mut order = replica(&etcd, "order-draining", &[]).await;
    let (_gateway, port, _routes) = gateway(&etcd, &[]).await;
    wait_for_nodes(port, "order", 1).await;
    let key = format!("/goms/services/order/127.0.0.1:{}", order.port);
    let mut etcd_client = etcd.client().await;
    assert_eq!(
        etcd_client
            .get(key.as_str(), None)
            .await
            .unwrap()
            .kvs()
            .len(),
        1
    );

    let slow = tokio::spawn(async move {
        http()
            .get(format!("http://127.0.0.1:{port}/api/order/slow?ms=3000"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    eventually(
        "the slow request reached the app",
        Duration::from_secs(5),
        || {
            let app = &order.app;
            async move { app.seen().await.0 == 1 }
        },
    )
    .await;

    unsafe {
        libc::kill(order.sidecar.pid(), libc::SIGTERM);
    }
    eventually("the lease is revoked", Duration::from_secs(2), || {
        let (mut client, key) = (etcd_client.clone(), key.clone());
        async move {
            client
                .get(key.as_str(), None)
                .await
                .unwrap()
                .kvs()
                .is_empty()
        }
    })
    .await;
    assert!(
        !slow.is_finished(),
        "the lease went before the request finished"
    );
    assert_eq!(slow.await.unwrap().expect("an answer"), 200);
    let status = order.sidecar.terminate(Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn an_idle_sidecar_exits_promptly_on_sigterm() {
    let etcd = Etcd::start().await;
    let mut order = replica(&etcd, "order-idle", &[]).await;
    order
        .sidecar
        .wait_for_line("is healthy; registering", Duration::from_secs(10))
        .await;
    let started = Instant::now();
    let status = order.sidecar.terminate(Duration::from_secs(3)).await;
    let took = started.elapsed();
    eprintln!("idle sidecar exited {took:?} after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        order.sidecar.has_line("leaving the registry"),
        "{}",
        order.sidecar.output()
    );
}

#[tokio::test]
async fn the_sidecar_port_has_the_gateways_header_timeout_idle_timeout_and_connection_cap() {
    use tokio::io::AsyncWriteExt;
    let etcd = Etcd::start().await;
    let limits = [
        ("GOMS__GATEWAY__LIMITS__HEADER_TIMEOUT", "1s"),
        ("GOMS__GATEWAY__LIMITS__IDLE_TIMEOUT", "2s"),
        ("GOMS__GATEWAY__LIMITS__MAX_CONNECTIONS", "2"),
    ];
    let order = replica(&etcd, "order-limits", &limits).await;
    let admin = order
        .sidecar
        .output()
        .lines()
        .find_map(|line| {
            line.split("(admin ")
                .nth(1)
                .map(|rest| rest.trim_end_matches(')').to_string())
        })
        .expect("the sidecar logs its admin address");
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", order.port));

    // A header that never ends gets 408 after the header timeout, and the connection closes.
    let mut slow = connect().await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: order\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    drop(slow);

    // A keep-alive connection left idle is closed after the idle timeout.
    let mut idle = connect().await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: order\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(answer.starts_with(b"HTTP/1.1 "), "{answer:?}");
    drop(idle);

    // Two connections held: a third is closed at accept and counted.
    let metrics_url = format!("http://{admin}/metrics");
    eventually(
        "the closed connections released",
        Duration::from_secs(10),
        || {
            let request = http().get(&metrics_url);
            async move {
                let text = text_of(request).await;
                text.lines().any(|l| l == "goms_sidecar_connections_open 0")
            }
        },
    )
    .await;
    let held = [connect().await.unwrap(), connect().await.unwrap()];
    eventually("two connections open", Duration::from_secs(10), || {
        let request = http().get(&metrics_url);
        async move {
            text_of(request)
                .await
                .lines()
                .any(|l| l == "goms_sidecar_connections_open 2")
        }
    })
    .await;
    // A rise, not an exact figure: a stray knock on a reused ephemeral port counts too.
    let refused_before = metric(
        &text_of(http().get(&metrics_url)).await,
        "goms_sidecar_connections_refused_total",
    );
    let mut refused = connect().await.unwrap();
    let _ = refused
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: order\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut refused, Duration::from_secs(5)).await;
    assert!(
        answer.is_empty(),
        "a third connection was served: {answer:?}"
    );
    let metrics = text_of(http().get(&metrics_url)).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "goms_sidecar_header_timeouts_total 1"),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "goms_sidecar_connections_refused_total") > refused_before,
        "refused before: {refused_before}\n{metrics}"
    );
    drop(held);
}
