//! The dashboard on the gateway's admin listener: its JSON (`/ui/api/...`) and the page
//! itself, loaded in headless Chromium (Debian's `chromium`, which scripts/install-deps.sh
//! installs) from a real gateway with real etcd, RabbitMQ, replicas and a consumer. The
//! services' events come from the Elasticsearch stand-in.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;
use support::es_standin::EsStandIn;
use support::trace_fixtures::consumer;
use support::{
    eventually, free_port, http, json_of, register_replica, route_file, wait_for_nodes, Etcd, Goms,
    RabbitMq, ROUTES,
};

/// A replica that registers itself as `user` and answers every request 503, so that a GET
/// it gets first is retried on the next replica: a request with two attempts.
async fn unavailable_replica(etcd: &Etcd) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(|| async { (StatusCode::SERVICE_UNAVAILABLE, "unavailable on purpose") });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let id = format!("unavailable-{}", addr.port());
    register_replica(etcd, "user", &id, addr, "zone-b").await;
    id
}

/// Loads `url` in headless Chromium, lets its scripts run, and returns the DOM; with
/// `screenshot`, also saves a PNG of the page there.
async fn chromium(url: &str, screenshot: Option<&Path>) -> String {
    // Async: the Elasticsearch stand-in runs on this test's runtime and must answer the
    // gateway while the page loads.
    let mut command = tokio::process::Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1400,1000",
        // Lets the page's fetches and rendering finish before the DOM is taken.
        "--virtual-time-budget=4000",
    ]);
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let output = command
        .arg(url)
        .output()
        .await
        .expect("chromium runs (scripts/install-deps.sh installs Debian's chromium)");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `goms <args>` (no config file) and returns its standard output; it must succeed.
async fn goms_output(args: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_goms"))
        .args(["--config", "/nonexistent/goms.yml"])
        .args(args)
        .output()
        .await
        .expect("run goms");
    assert!(
        output.status.success(),
        "goms {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Where the test keeps its screenshots: the build folder, and `docs/img/` as well when
/// `GOMS_SAVE_SCREENSHOTS=1` (how README's picture is made).
fn screenshot_paths(name: &str) -> Vec<PathBuf> {
    let mut paths = vec![Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)];
    if std::env::var_os("GOMS_SAVE_SCREENSHOTS").is_some() {
        paths.push(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("docs/img")
                .join(name),
        );
    }
    for path in &paths {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    }
    paths
}

#[tokio::test]
async fn the_dashboard_shows_the_cluster_its_traffic_and_a_request_timeline() {
    let etcd = Etcd::start().await;
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let _consumer = consumer("consumer", &broker, &es.url(), &[]);
    let amqp = broker.url();
    let service_port = free_port();
    let mut service = Goms::spawn(
        "user",
        &[
            "service",
            "--http-port",
            &service_port.to_string(),
            "--etcd-addr",
            &etcd.endpoint(),
            "--lease-ttl",
            "3",
        ],
        &[
            ("GOMS__AMQP_ADDR", &amqp),
            ("GOMS__SERVICE__ZONE", "zone-a"),
        ],
    );
    let unavailable = unavailable_replica(&etcd).await;
    let (_routes_folder, routes) = route_file(ROUTES);
    let es_url = es.url();
    let gateway = Goms::gateway_with(
        &etcd.endpoint(),
        &routes,
        &[],
        &[
            ("GOMS__AMQP_ADDR", &amqp),
            ("GOMS__ES_ADDR", &es_url),
            ("GOMS__GATEWAY__KIBANA_URL", "http://kibana.example:5601"),
        ],
    )
    .await;
    let port = gateway.port();
    let marker = "admin (/cluster, /metrics) on ";
    gateway.wait_for_line(marker, Duration::from_secs(20)).await;
    let admin = format!("http://{}", gateway.logged_addr(marker));
    wait_for_nodes(port, "user", 2).await;
    let real = format!("127.0.0.1:{service_port}");

    let client = http();
    for n in 0..6 {
        let response = client
            .get(format!("http://127.0.0.1:{port}/api/user/login"))
            .header("X-Request-Id", format!("ui-{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "the 503 replica's GETs are retried");
    }

    // The list: newest first, filterable. A request is recorded just after its answer went
    // out, so the last one may not be listed yet when its answer arrives.
    let requests_url = format!("{admin}/ui/api/requests?status=2xx&service=user");
    let listed_ids = |listed: &serde_json::Value| -> Vec<String> {
        listed["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["requestId"].as_str().unwrap().to_string())
            .collect()
    };
    eventually("all six requests recorded", Duration::from_secs(10), || {
        let request = client.get(&requests_url);
        async move { listed_ids(&json_of(request).await).len() >= 6 }
    })
    .await;
    let listed = json_of(client.get(&requests_url)).await;
    let requests = listed["requests"].as_array().unwrap();
    assert_eq!(
        listed_ids(&listed),
        ["ui-5", "ui-4", "ui-3", "ui-2", "ui-1", "ui-0"]
    );
    let one = json_of(client.get(format!("{admin}/ui/api/requests?requestId=ui-2"))).await;
    assert_eq!(one["requests"].as_array().unwrap().len(), 1);
    let none = json_of(client.get(format!("{admin}/ui/api/requests?status=5xx"))).await;
    assert!(none["requests"].as_array().unwrap().is_empty());
    let retried = requests
        .iter()
        .find(|r| r["attempts"].as_array().unwrap().len() == 2)
        .expect("round robin sent one GET to the 503 replica first");
    let retried_id = retried["requestId"].as_str().unwrap().to_string();
    assert_eq!(retried["attempts"][0]["replica"], unavailable.as_str());
    assert_eq!(retried["attempts"][0]["status"], 503);
    assert_eq!(retried["attempts"][1]["replica"], real.as_str());
    assert_eq!(retried["replica"], real.as_str());
    for attempt in retried["attempts"].as_array().unwrap() {
        assert!(attempt["connectMs"].as_f64().is_some(), "{attempt}");
        assert!(attempt["reusedConnection"].is_boolean(), "{attempt}");
    }

    // Topology and traffic.
    let topology = json_of(client.get(format!("{admin}/ui/api/topology"))).await;
    let user = &topology["services"]["user"];
    let urls: Vec<&str> = user["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["url"].as_str().unwrap())
        .collect();
    assert_eq!(urls, ["/api/user/login", "/api/user/register"]);
    let replica = |id: &str| {
        user["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no replica {id} in {user}"))
    };
    assert_eq!(replica(&real)["health"], "healthy");
    assert_eq!(replica(&real)["zone"], "zone-a");
    assert_eq!(replica(&unavailable)["lastError"], "answered 503");
    assert_eq!(topology["gateways"].as_array().unwrap().len(), 1);
    let traffic = json_of(client.get(format!("{admin}/ui/api/traffic"))).await;
    assert_eq!(traffic["routes"]["user/login"]["requests"], 6);
    assert_eq!(traffic["replicas"][&real]["requests"], 6);
    assert!(traffic["routes"]["user/login"]["p99Ms"].as_f64().unwrap() > 0.0);

    // The timeline joins the gateway's part with the services' events from Elasticsearch.
    let trace_url = format!("{admin}/ui/api/trace/{retried_id}");
    eventually(
        "the service's events indexed",
        Duration::from_secs(30),
        || {
            let request = client.get(&trace_url);
            async move {
                let trace = json_of(request).await;
                trace["events"].as_array().is_some_and(|events| {
                    events.iter().any(|e| e["event"] == "service.end")
                        && events.iter().any(|e| e["event"] == "request.end")
                })
            }
        },
    )
    .await;
    let trace = json_of(client.get(&trace_url)).await;
    assert_eq!(trace["elasticsearch"]["reachable"], true);
    assert_eq!(trace["gateway"]["attempts"].as_array().unwrap().len(), 2);
    assert!(trace["kibana"]
        .as_str()
        .unwrap()
        .starts_with("http://kibana.example:5601/app/discover"));

    // The same timeline in the terminal, from Elasticsearch alone and from the gateway.
    for source in [
        ["--es", es_url.as_str()],
        ["--gateway", admin.trim_start_matches("http://")],
    ] {
        let text = goms_output(&["trace", &retried_id, source[0], source[1]]).await;
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with(&format!(
                "request {retried_id}: GET /api/user/login -> 200 in "
            )),
            "{text}"
        );
        assert!(lines[0].ends_with("2 attempt(s)"), "{text}");
        let line_of = |needle: &str| {
            lines
                .iter()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in:\n{text}"))
                .to_string()
        };
        assert!(
            line_of(&format!("attempt 1 -> {unavailable}")).ends_with("status 503"),
            "{text}"
        );
        assert!(
            line_of(&format!("attempt 2 -> {real}")).ends_with("status 200"),
            "{text}"
        );
        assert!(
            line_of(&format!("user {real} (service)")).ends_with("status 200"),
            "{text}"
        );
        assert!(line_of("request.end").ends_with("status 200"), "{text}");
        assert!(
            !text.contains('\x1b'),
            "no colour when stdout is not a terminal"
        );
    }

    // `goms cluster --watch` redraws the summary with the route's rate and the replicas.
    let watch = Goms::spawn(
        "cluster --watch",
        &[
            "cluster",
            "--watch",
            "--gateway",
            admin.trim_start_matches("http://"),
        ],
        &[],
    );
    watch
        .wait_for_line("route   /api/user/login", Duration::from_secs(10))
        .await;
    watch
        .wait_for_line(&format!("replica {real}"), Duration::from_secs(10))
        .await;
    drop(watch);

    // Only the admin listener serves the dashboard.
    let public = client
        .get(format!("http://127.0.0.1:{port}/ui"))
        .send()
        .await
        .unwrap();
    assert_ne!(public.status(), 200);

    // The page, as a browser renders it.
    let dom = chromium(&format!("{admin}/ui"), None).await;
    assert!(dom.contains(r#"data-service="user""#), "{dom}");
    assert!(
        dom.contains(&format!(
            r#"class="replica" data-id="{real}" data-health="healthy""#
        )),
        "{dom}"
    );
    assert!(dom.contains(r#"data-request-id="ui-5""#), "{dom}");
    assert!(dom.contains(r#"data-key="route user/login""#), "{dom}");
    for path in screenshot_paths("dashboard.png") {
        chromium(&format!("{admin}/ui"), Some(&path)).await;
        assert!(
            std::fs::metadata(&path).unwrap().len() > 10_000,
            "{}",
            path.display()
        );
    }
    let timeline = chromium(&format!("{admin}/ui/trace/{retried_id}"), None).await;
    assert_eq!(
        timeline.matches(r#"data-kind="attempt""#).count(),
        2,
        "{timeline}"
    );
    assert!(timeline.contains(r#"data-kind="service""#), "{timeline}");
    for path in screenshot_paths("timeline.png") {
        chromium(&format!("{admin}/ui/trace/{retried_id}"), Some(&path)).await;
    }

    // A replica killed: the page shows it failing, then gone once its lease expires.
    service.kill();
    let page = format!("{admin}/ui");
    let failing = format!(r#"data-id="{real}" data-health="failing""#);
    eventually(
        "the killed replica shown failing",
        Duration::from_secs(10),
        || async { chromium(&page, None).await.contains(&failing) },
    )
    .await;
    let listed = format!(r#"data-id="{real}""#);
    eventually(
        "the killed replica gone from the page",
        Duration::from_secs(20),
        || async {
            let dom = chromium(&page, None).await;
            dom.contains(r#"data-service="user""#) && !dom.contains(&listed)
        },
    )
    .await;
}

/// A gateway in front of one replica with `esAddr` set to `es`, and the admin URL.
struct EsLess {
    _etcd: Etcd,
    _service: Goms,
    _routes: tempfile::TempDir,
    gateway: Goms,
    admin: String,
}

impl EsLess {
    async fn start(es: &str) -> EsLess {
        let etcd = Etcd::start().await;
        let service = Goms::service(&etcd, free_port(), &[]);
        let (routes_folder, routes) = route_file(ROUTES);
        let env = [("GOMS__ES_ADDR", es)];
        let gateway = Goms::gateway_with(&etcd.endpoint(), &routes, &[], &env).await;
        let marker = "admin (/cluster, /metrics) on ";
        gateway.wait_for_line(marker, Duration::from_secs(20)).await;
        let admin = format!("http://{}", gateway.logged_addr(marker));
        wait_for_nodes(gateway.port(), "user", 1).await;
        EsLess {
            _etcd: etcd,
            _service: service,
            _routes: routes_folder,
            gateway,
            admin,
        }
    }

    /// Sends a login with `request_id` and returns its timeline document once the gateway
    /// has recorded it (just after its answer went out).
    async fn timeline_of(&self, request_id: &str) -> Value {
        let client = http();
        let url = format!("http://127.0.0.1:{}/api/user/login", self.gateway.port());
        let response = client.get(url).header("X-Request-Id", request_id).send();
        assert_eq!(response.await.unwrap().status(), 200);
        let trace_url = format!("{}/ui/api/trace/{request_id}", self.admin);
        eventually(
            "the request in the gateway's ring",
            Duration::from_secs(20),
            || {
                let request = client.get(&trace_url);
                async move { !json_of(request).await["gateway"].is_null() }
            },
        )
        .await;
        json_of(client.get(&trace_url)).await
    }
}

/// Elasticsearch away: the timeline says so and still shows the gateway's part.
#[tokio::test]
async fn a_timeline_without_elasticsearch_says_so_and_shows_the_gateways_part() {
    let stage = EsLess::start("http://127.0.0.1:1").await;
    let trace = stage.timeline_of("no-es-1").await;
    assert_eq!(trace["elasticsearch"]["reachable"], false);
    assert!(
        trace["elasticsearch"]["error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1"),
        "{trace}"
    );
    assert_eq!(trace["gateway"]["status"], 200);
    let timeline = chromium(&format!("{}/ui/trace/no-es-1", stage.admin), None).await;
    assert!(
        timeline.contains("Elasticsearch cannot be reached"),
        "{timeline}"
    );
    assert_eq!(
        timeline.matches(r#"data-kind="attempt""#).count(),
        1,
        "{timeline}"
    );
}

#[tokio::test]
async fn a_timeline_answers_within_seconds_when_elasticsearch_black_holes() {
    // Accepts connections and never answers, as a host that drops packets would.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let es = format!("http://{}", black_hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = black_hole.accept().await {
            held.push(stream);
        }
    });
    let stage = EsLess::start(&es).await;
    // support::http() gives up after 10 s: each read of the timeline must come well before.
    let trace = stage.timeline_of("black-hole-1").await;
    assert_eq!(trace["elasticsearch"]["reachable"], false);
    let error = trace["elasticsearch"]["error"].as_str().unwrap();
    assert!(error.contains("did not answer within 2 s"), "{trace}");
    assert_eq!(trace["gateway"]["status"], 200);
}

/// `gateway.dashboard: false` turns the page and its recording off; the rest of the admin
/// listener stays.
#[tokio::test]
async fn a_gateway_with_the_dashboard_off_says_so_at_ui() {
    let etcd = Etcd::start().await;
    let (_routes_folder, routes) = route_file(ROUTES);
    let env = [("GOMS__GATEWAY__DASHBOARD", "false")];
    let gateway = Goms::gateway_with(&etcd.endpoint(), &routes, &[], &env).await;
    let marker = "admin (/cluster, /metrics) on ";
    gateway.wait_for_line(marker, Duration::from_secs(20)).await;
    let admin = format!("http://{}", gateway.logged_addr(marker));
    let client = http();
    let ui = client.get(format!("{admin}/ui")).send().await.unwrap();
    assert_eq!(ui.status(), 404);
    let body = ui.text().await.unwrap();
    assert!(body.contains("gateway.dashboard: false"), "{body}");
    let cluster = client.get(format!("{admin}/cluster")).send().await.unwrap();
    assert_eq!(cluster.status(), 200);
}
