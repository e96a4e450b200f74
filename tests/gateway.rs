//! End-to-end: real etcd (container), real `goms service` replicas, real `goms gateway`.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::{
    eventually, free_port, http, json_of, route_file, wait_for_nodes, Etcd, Goms, KEY, ROUTES,
};

struct Stack {
    etcd: Etcd,
    services: Vec<Goms>,
    gateway: Goms,
    gateway_port: u16,
    _routes: tempfile::TempDir,
    routes_path: std::path::PathBuf,
}

async fn stack(replicas: usize) -> Stack {
    let etcd = Etcd::start().await;
    let services = (0..replicas)
        .map(|_| Goms::service(&etcd, free_port(), &["--lease-ttl", "3"]))
        .collect();
    let (folder, routes_path) = route_file(ROUTES);
    let gateway = Goms::gateway(&etcd, &routes_path, &["--lease-ttl", "3"]).await;
    let gateway_port = gateway.port();
    wait_for_nodes(gateway_port, "user", replicas).await;
    Stack {
        etcd,
        services,
        gateway,
        gateway_port,
        _routes: folder,
        routes_path,
    }
}

impl Stack {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.gateway_port)
    }
}

async fn status(client: &reqwest::Client, url: String) -> u16 {
    client.get(url).send().await.unwrap().status().as_u16()
}

fn served_by(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn round_robin_counts_are_exact_across_three_replicas() {
    let stack = stack(3).await;
    let client = http();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let response = client
            .get(stack.url("/api/user/login"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        *counts.entry(served_by(&response)).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|count| *count == 10), "{counts:?}");
}

#[tokio::test]
async fn forwards_method_query_body_and_headers_as_goms_echo() {
    let stack = stack(1).await;
    let response = http()
        .post(stack.url("/api/user/login?a=1&b=3"))
        .header("X-Request-Id", "client-chosen-id-1")
        .header("Call-Service-Key", "forged-by-client")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .form(&[("username", "test"), ("password", "test")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "client-chosen-id-1");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], 0);
    assert_eq!(body["status"], true);
    assert_eq!(body["msg"], "success");
    let data = &body["data"];
    assert_eq!(data["method"], "POST");
    assert_eq!(data["urlParam"], "?a=1&b=3");
    assert_eq!(data["body"]["username"], "test");
    assert_eq!(data["headers"]["X-Request-Id"], "client-chosen-id-1");
    assert!(
        data["headers"].get("Call-Service-Key").is_none(),
        "key echoed: {data}"
    );
    let traceparent = data["headers"]["Traceparent"].as_str().unwrap();
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "span not replaced: {traceparent}"
    );

    // A malformed request id is replaced by a UUID, returned to the client and sent upstream.
    let response = http()
        .get(stack.url("/api/user/login"))
        .header("X-Request-Id", "has spaces in it")
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["data"]["headers"]["X-Request-Id"], id.as_str());
}

/// Hop-by-hop fields (RFC 9110 section 7.6.1) are the client connection's own: the replica gets
/// none of them, and every other field as sent.
#[tokio::test]
async fn hop_by_hop_headers_end_at_the_gateway() {
    let stack = stack(1).await;
    let hop_by_hop = [
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic Z29tczpnb21z"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
    ];
    let mut request = http()
        .get(stack.url("/api/user/login"))
        .header("X-Kept", "end to end");
    for (name, value) in hop_by_hop {
        request = request.header(name, value);
    }
    let body = json_of(request).await;
    let headers = &body["data"]["headers"];
    assert_eq!(headers["X-Kept"], "end to end", "{headers}");
    for (name, _) in hop_by_hop {
        let echoed = headers
            .as_object()
            .unwrap()
            .keys()
            .find(|echoed| echoed.eq_ignore_ascii_case(name));
        assert!(echoed.is_none(), "{name} reached the replica: {headers}");
    }
}

#[tokio::test]
async fn json_and_multipart_bodies_are_decoded() {
    let stack = stack(1).await;
    let body = json_of(
        http()
            .post(stack.url("/api/user/register"))
            .json(&serde_json::json!({"username": "ann", "age": 3})),
    )
    .await;
    assert_eq!(
        body["data"]["body"],
        serde_json::json!({"username": "ann", "age": 3})
    );

    let form = reqwest::multipart::Form::new()
        .text("username", "bob")
        .part(
            "avatar",
            reqwest::multipart::Part::bytes(vec![1u8; 10]).file_name("a.png"),
        );
    let body = json_of(http().post(stack.url("/api/user/register")).multipart(form)).await;
    assert_eq!(body["data"]["body"]["username"], "bob");
    assert_eq!(body["data"]["body"]["avatar"]["size"], 10);
}

#[tokio::test]
async fn gateway_errors_use_the_goms_envelope() {
    let stack = stack(1).await;
    let client = http();

    let response = client
        .get(stack.url("/api/user/unknown"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], 404);
    assert_eq!(body["status"], false);
    assert_eq!(body["requestId"], request_id.as_str());
    assert_eq!(
        body["msg"],
        "no route `unknown` for service `user` in the route file"
    );
    let body = json_of(client.get(stack.url("/api/nobody/login"))).await;
    assert_eq!(body["msg"], "no service `nobody` in the route file");

    // `order` has a route but no replica.
    let response = client
        .get(stack.url("/api/order/submit"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], 503);
    assert_eq!(body["status"], false);
}

#[tokio::test]
async fn services_refuse_a_missing_or_wrong_key() {
    let etcd = Etcd::start().await;
    let port = free_port();
    let service = Goms::service(&etcd, port, &[]);
    service
        .wait_for_line("registered at", Duration::from_secs(20))
        .await;
    let url = format!("http://127.0.0.1:{port}/login");
    let client = http();

    for key in [None, Some("wrong"), Some(&KEY[..KEY.len() - 1])] {
        let mut request = client.get(&url);
        if let Some(key) = key {
            request = request.header("Call-Service-Key", key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "key {key:?}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], 401);
        assert_eq!(body["status"], false);
    }
    let response = client
        .get(&url)
        .header("Call-Service-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A gateway configured with another key is refused by the service.
    let (_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway_with(
        &etcd.endpoint(),
        &routes,
        &[],
        &[("GOMS__CALL_SERVICE_KEY", "not-the-shared-key")],
    )
    .await;
    let gateway_port = gateway.port();
    wait_for_nodes(gateway_port, "user", 1).await;
    let response = client
        .get(format!("http://127.0.0.1:{gateway_port}/api/user/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

/// A gateway takes connections as soon as it listens, before it has read the registry; the
/// soak found its first requests answered 503 ("no replica") for about 100 ms after a restart.
#[tokio::test]
async fn a_gateway_just_started_holds_requests_until_it_knows_the_replicas() {
    let etcd = Etcd::start().await;
    let _service = Goms::service(&etcd, free_port(), &[]);
    let etcd_client = etcd.client().await;
    eventually("the replica registered", Duration::from_secs(20), || {
        let mut etcd_client = etcd_client.clone();
        async move {
            let prefix = etcd_client::GetOptions::new().with_prefix();
            etcd_client
                .get("/goms/services/user/", Some(prefix))
                .await
                .is_ok_and(|r| !r.kvs().is_empty())
        }
    })
    .await;
    let (_folder, routes) = route_file(ROUTES);
    // Clients already knock while the gateway starts (a restart under traffic): their
    // connections wait in the listen backlog and are the first it serves.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/api/user/login");
    let client = http();
    let knocking: Vec<_> = (0..8)
        .map(|_| tokio::spawn(first_answer(client.clone(), url.clone())))
        .collect();
    let _gateway = Goms::spawn(
        "gateway",
        &[
            "gateway",
            "--http-port",
            &port.to_string(),
            "--etcd-addr",
            &etcd.endpoint(),
            "--routes",
            &routes.display().to_string(),
        ],
        &[],
    );
    let mut statuses = Vec::new();
    for request in knocking {
        statuses.push(request.await.unwrap());
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "the first answers of a gateway that just started: {statuses:?}"
    );
}

/// Retries until the gateway takes the connection, and returns the status of its answer.
async fn first_answer(client: reqwest::Client, url: String) -> u16 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match client.get(&url).send().await {
            Ok(response) => return response.status().as_u16(),
            Err(error) if error.is_connect() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => panic!("no answer from a starting gateway: {error}"),
        }
    }
}

#[tokio::test]
async fn a_replica_killed_under_sequential_load_loses_no_request() {
    let mut stack = stack(3).await;
    let client = http();
    let mut failures = Vec::new();
    let mut served_after_kill: HashMap<String, usize> = HashMap::new();
    let victim = stack.services[1].name.clone();
    for i in 0..300 {
        if i == 100 {
            stack.services[1].kill();
        }
        let request = if i % 2 == 0 {
            client.get(stack.url("/api/user/login"))
        } else {
            client.post(stack.url("/api/user/login")).body("x=1")
        };
        match request.send().await {
            Ok(response) if response.status() == 200 => {
                if i > 100 {
                    *served_after_kill.entry(served_by(&response)).or_default() += 1;
                }
            }
            Ok(response) => failures.push(format!("request {i}: status {}", response.status())),
            Err(error) => failures.push(format!("request {i}: {error}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let victim_port = victim.trim_start_matches("user:");
    assert!(
        served_after_kill
            .keys()
            .all(|node| !node.ends_with(victim_port)),
        "{served_after_kill:?}"
    );
    assert_eq!(served_after_kill.len(), 2, "{served_after_kill:?}");
}

#[tokio::test]
async fn join_and_leave_are_seen_by_other_nodes_and_new_replicas_get_traffic() {
    let stack = stack(1).await;
    let first = &stack.services[0];
    let port = free_port();
    let mut second = Goms::service(&stack.etcd, port, &["--lease-ttl", "3"]);
    let id = format!("127.0.0.1:{port}");
    first
        .wait_for_line(&format!("[user] node [{id}] join"), Duration::from_secs(10))
        .await;
    stack
        .gateway
        .wait_for_line(&format!("[user] node [{id}] join"), Duration::from_secs(10))
        .await;
    // The gateway routes to the new replica without a restart.
    wait_for_nodes(stack.gateway_port, "user", 2).await;
    let client = http();
    let mut served = Vec::new();
    for _ in 0..4 {
        let response = client
            .get(stack.url("/api/user/login"))
            .send()
            .await
            .unwrap();
        served.push(served_by(&response));
    }
    assert!(served.contains(&id), "{served:?}");

    // SIGKILL: no deregistration, the lease (TTL 3 s) expires and everyone sees the leave.
    second.kill();
    first
        .wait_for_line(&format!("[user] node [{id}] leave"), Duration::from_secs(8))
        .await;
    stack
        .gateway
        .wait_for_line(&format!("[user] node [{id}] leave"), Duration::from_secs(8))
        .await;
}

#[tokio::test]
async fn sigterm_revokes_the_lease_before_draining() {
    let mut stack = stack(2).await;
    let id = stack.services[1].name.replace("user:", "127.0.0.1:");
    let status = stack.services[1].terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
    let output = stack.services[1].output();
    let revoked = output
        .find("deregistered (lease revoked)")
        .expect("lease revoked");
    let stopped = output.find("[user] stopped").expect("stopped");
    assert!(revoked < stopped, "{output}");
    // Seen at once, far sooner than the 3 s TTL would allow after a silent death.
    stack
        .gateway
        .wait_for_line(&format!("[user] node [{id}] leave"), Duration::from_secs(2))
        .await;

    let gateway_id = format!("127.0.0.1:{}", stack.gateway_port);
    let status = stack.gateway.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    stack.services[0]
        .wait_for_line(
            &format!("[gateway] node [{gateway_id}] leave"),
            Duration::from_secs(2),
        )
        .await;
}

#[tokio::test]
async fn cluster_document_lists_every_service_with_goms_keys() {
    let stack = stack(2).await;
    let _second = Goms::gateway(&stack.etcd, &stack.routes_path, &[]).await;
    let client = http();
    client
        .get(stack.url("/api/user/login"))
        .send()
        .await
        .unwrap();
    let url = stack.url("/cluster");
    // The request is counted as finished just after its answer went out.
    let what = "two gateways and one finished request in /cluster";
    eventually(what, Duration::from_secs(10), || {
        let client = client.clone();
        let url = url.clone();
        async move {
            let document: serde_json::Value = json_of(client.get(&url)).await;
            let gateways = document["services"]["gateway"]["Nodes"]
                .as_array()
                .map(Vec::len);
            gateways == Some(2) && document["services"]["user"]["RequestFinish"] == 1
        }
    })
    .await;
    let document: serde_json::Value = json_of(client.get(&url)).await;
    assert_eq!(document["status"], true);
    let user = &document["services"]["user"];
    assert_eq!(user["Nodes"].as_array().unwrap().len(), 2);
    assert_eq!(user["RequestFinish"], 1);
    assert_eq!(user["PollNext"], 1);
    let detail = user["NodeDetail"].as_array().unwrap();
    assert_eq!(detail.len(), 2);
    for node in detail {
        assert_eq!(node["healthy"], true);
        assert_eq!(node["inFlight"], 0);
        assert_eq!(node["failures"], 0);
    }
    // The CLI prints the same document, from the gateway or straight from etcd.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_goms"))
        .args([
            "--config",
            "/nonexistent",
            "cluster",
            "--etcd-addr",
            &stack.etcd.endpoint(),
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let from_etcd: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(from_etcd["services"]["user"]["Nodes"], user["Nodes"]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_goms"))
        .args([
            "--config",
            "/nonexistent",
            "cluster",
            "--gateway",
            &format!("127.0.0.1:{}", stack.gateway_port),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let from_gateway: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(from_gateway["services"]["user"]["RequestFinish"], 1);
}

#[tokio::test]
async fn route_file_edits_apply_live_and_invalid_edits_change_nothing() {
    let stack = stack(1).await;
    let client = http();
    assert_eq!(status(&client, stack.url("/api/user/profile")).await, 404);

    let edited = "services:\n  user:\n    register: \"/register\"\n    login: \"/login\"\n    profile: \"/profile\"\n";
    std::fs::write(&stack.routes_path, edited).unwrap();
    let url = stack.url("/api/user/profile");
    eventually("new route answers", Duration::from_secs(10), || {
        let client = client.clone();
        let url = url.clone();
        async move { client.get(&url).send().await.unwrap().status() == 200 }
    })
    .await;

    std::fs::write(
        &stack.routes_path,
        "services:\n  user:\n    login: \"/login\"\n    broken: \"no-slash\"\n",
    )
    .unwrap();
    stack
        .gateway
        .wait_for_line("services.yml:4:", Duration::from_secs(10))
        .await;
    assert!(
        stack.gateway.has_line("must start with `/`"),
        "{}",
        stack.gateway.output()
    );
    // The previous table keeps serving, including the route added live.
    assert_eq!(status(&client, stack.url("/api/user/profile")).await, 200);
    assert_eq!(status(&client, stack.url("/api/user/register")).await, 200);
}

#[tokio::test]
async fn transform_json_reencodes_form_bodies() {
    let etcd = Etcd::start().await;
    let _service = Goms::service(&etcd, free_port(), &[]);
    let (_folder, routes) = route_file(
        "services:\n  user:\n    login:\n      path: /login\n      transform: json\n    raw: /raw\n",
    );
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;
    let client = http();
    for (route, expected_type) in [
        ("login", "application/json"),
        ("raw", "application/x-www-form-urlencoded"),
    ] {
        let body = json_of(
            client
                .post(format!("http://127.0.0.1:{port}/api/user/{route}"))
                .form(&[("username", "test"), ("password", "p&w=")]),
        )
        .await;
        assert_eq!(
            body["data"]["headers"]["Content-Type"], expected_type,
            "{body}"
        );
        assert_eq!(body["data"]["body"]["password"], "p&w=", "{body}");
    }
}

/// A public port `p` for which `p`, `p + 1` and their default admin ports are all free now.
/// A public port P with P, P + 1 and their admin ports (+ 1821) free, all below the
/// ephemeral range (32768 and up here): a port in it can be taken at any moment as the
/// local end of some process's outgoing connection, between this check and the bind.
fn two_free_public_ports() -> u16 {
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()) as usize
        + std::process::id() as usize;
    (0..500)
        .map(|n| 20_000 + ((seed + n * 7_919) % 10_000) as u16)
        .find(|&p| [p, p + 1, p + 1821, p + 1822].into_iter().all(free))
        .expect("four free ports below the ephemeral range")
}

#[tokio::test]
async fn two_gateways_on_one_host_each_get_an_admin_port_that_follows_the_public_port() {
    let etcd = Etcd::start().await;
    let (_folder, routes) = route_file(ROUTES);
    let routes = routes.display().to_string();
    let first = two_free_public_ports();
    let gateway = |port: u16, admin: Option<String>| {
        let port = port.to_string();
        let mut args = vec!["gateway", "--http-port", &port, "--etcd-addr"];
        let endpoint = etcd.endpoint();
        args.push(&endpoint);
        args.extend(["--routes", &routes]);
        if let Some(admin) = admin.as_deref() {
            args.extend(["--admin-addr", admin]);
        }
        let unset = ["GOMS__GATEWAY__ADMIN_ADDR"];
        Goms::spawn_unsetting(&format!("gateway:{port}"), &args, &[], &unset)
    };
    let one = gateway(first, None);
    let two = gateway(first + 1, None);
    let marker = "admin (/cluster, /metrics) on ";
    for (node, public) in [(&one, first), (&two, first + 1)] {
        node.wait_for_line(marker, Duration::from_secs(20)).await;
        assert_eq!(
            node.logged_addr(marker),
            format!("127.0.0.1:{}", public + 1821)
        );
    }

    // An explicit admin address still wins; one already taken names the cause once and
    // says how to give each gateway its own.
    let taken = format!("127.0.0.1:{}", first + 1821);
    let mut third = gateway(free_port(), Some(taken.clone()));
    let status = third.exit_status(Duration::from_secs(20)).await;
    assert!(!status.success());
    third.wait_for_line("goms: ", Duration::from_secs(5)).await;
    let output = third.output();
    let error = output.lines().find(|line| line.contains("goms: ")).unwrap();
    assert!(
        error.contains(&taken) && error.contains("--admin-addr"),
        "{error}"
    );
    assert_eq!(
        error.matches("Address already in use").count(),
        1,
        "{error}"
    );
}

#[tokio::test]
async fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let stack = stack(1).await;
    let forged = |request: reqwest::RequestBuilder| {
        request
            .header("X-Forwarded-For", "198.51.100.7")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "shop.example")
    };
    let echoed = |body: &serde_json::Value, name: &str| {
        body["data"]["headers"][name]
            .as_str()
            .unwrap_or("")
            .to_string()
    };

    // The test client is no trusted proxy: what it wrote is replaced by what the gateway saw.
    let body = json_of(forged(http().get(stack.url("/api/user/login")))).await;
    assert_eq!(echoed(&body, "X-Forwarded-For"), "127.0.0.1");
    assert_eq!(echoed(&body, "X-Forwarded-Proto"), "http");
    assert_eq!(
        echoed(&body, "X-Forwarded-Host"),
        format!("127.0.0.1:{}", stack.gateway_port)
    );

    // Behind a trusted proxy, its headers pass and the chain grows by the proxy's address.
    let trusting = Goms::gateway_with(
        &stack.etcd.endpoint(),
        &stack.routes_path,
        &[],
        &[("GOMS__GATEWAY__TRUSTED_PROXIES", "127.0.0.0/8")],
    )
    .await;
    wait_for_nodes(trusting.port(), "user", 1).await;
    let url = format!("http://127.0.0.1:{}/api/user/login", trusting.port());
    let body = json_of(forged(http().get(url))).await;
    assert_eq!(echoed(&body, "X-Forwarded-For"), "198.51.100.7, 127.0.0.1");
    assert_eq!(echoed(&body, "X-Forwarded-Proto"), "https");
    assert_eq!(echoed(&body, "X-Forwarded-Host"), "shop.example");
}

/// `gateway.http2Cleartext` (h2c): HTTP/2 with prior knowledge on the plain port, beside HTTP/1; off by
/// default, where such a client gets no HTTP/2 answer.
#[tokio::test]
async fn h2c_on_the_plain_port_is_served_only_when_switched_on() {
    let etcd = Etcd::start().await;
    let _service = Goms::service(&etcd, free_port(), &[]);
    let (_folder, routes) = route_file(ROUTES);
    let on = Goms::gateway_with(
        &etcd.endpoint(),
        &routes,
        &[],
        &[("GOMS__GATEWAY__HTTP2_CLEARTEXT", "true")],
    )
    .await;
    let off = Goms::gateway(&etcd, &routes, &[]).await;
    let h2c = |port: u16, extra: &[&str]| {
        let output = std::process::Command::new("curl")
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_version} %{http_code}"])
            .args(extra)
            .arg(format!("http://127.0.0.1:{port}/api/user/login"))
            .output()
            .expect("curl runs");
        let answer = String::from_utf8_lossy(&output.stdout).to_string();
        let error = String::from_utf8_lossy(&output.stderr).trim().to_string();
        (answer, error)
    };
    wait_for_nodes(on.port(), "user", 1).await;
    assert_eq!(h2c(on.port(), &[]).0, "2 200");
    // A header list past gateway.limits.headerBytes (60 KiB) never reaches a replica (curl,
    // still sending it when the 431 comes, says "Connection died"; the h2 client in the next
    // test reads the 431). The next connection is served.
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let oversized = h2c(on.port(), &["-H", &big]);
    assert!(!oversized.0.ends_with(" 200"), "served: {oversized:?}");
    assert_eq!(h2c(on.port(), &[]).0, "2 200");
    wait_for_nodes(off.port(), "user", 1).await;
    let (refused, _) = h2c(off.port(), &[]);
    assert!(
        !refused.starts_with("2 2"),
        "h2c was served while off: {refused}"
    );
    let http1 = http()
        .get(format!("http://127.0.0.1:{}/api/user/login", on.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(http1.status(), 200, "HTTP/1 still served beside h2c");
}

/// An HTTP/2 connection with prior knowledge to a gateway's plain port.
async fn h2c_connection(
    port: u16,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
    (sender, tokio::spawn(connection))
}

fn h2_get(port: u16, path: &str, headers: &[(&str, String)]) -> http::Request<()> {
    let mut request = http::Request::get(format!("http://127.0.0.1:{port}{path}"));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.body(()).unwrap()
}

/// HTTP/2's own limits (issue 33): a header list past `gateway.limits.headerBytes` is answered
/// 431 on its stream, and the connection goes on; a client that opens and cancels streams in
/// a loop (rapid reset, CVE-2023-44487) gets a GOAWAY with ENHANCE_YOUR_CALM, while another
/// client's requests meanwhile are all served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_answers_an_oversized_header_list_431_and_cuts_off_a_rapid_reset_client_alone() {
    let etcd = Etcd::start().await;
    let _service = Goms::service(&etcd, free_port(), &[]);
    let (_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway_with(
        &etcd.endpoint(),
        &routes,
        &[],
        &[("GOMS__GATEWAY__HTTP2_CLEARTEXT", "true")],
    )
    .await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;

    let (sender, _connection) = h2c_connection(port).await;
    let big = ("x-big", "a".repeat(70 * 1024));
    let mut sender = sender.ready().await.unwrap();
    let (answer, _) = sender
        .send_request(h2_get(port, "/api/user/login", &[big]), true)
        .unwrap();
    assert_eq!(answer.await.unwrap().status(), 431);
    let mut sender = sender.ready().await.unwrap();
    let (answer, _) = sender
        .send_request(h2_get(port, "/api/user/login", &[]), true)
        .unwrap();
    assert_eq!(
        answer.await.unwrap().status(),
        200,
        "the connection goes on after a 431"
    );

    // Another client sends requests the whole time.
    let bystander = tokio::spawn(async move {
        let client = http();
        let url = format!("http://127.0.0.1:{port}/api/user/login");
        let mut statuses = Vec::new();
        for _ in 0..100 {
            statuses.push(client.get(&url).send().await.unwrap().status().as_u16());
        }
        statuses
    });

    let (mut attacker, connection) = h2c_connection(port).await;
    let mut opened = 0;
    while opened < 10_000 {
        let Ok(ready) = attacker.clone().ready().await else {
            break;
        };
        attacker = ready;
        let Ok((_, mut stream)) =
            attacker.send_request(h2_get(port, "/api/user/login", &[]), false)
        else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        opened += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the attacker's connection ends")
        .unwrap();
    let error = ended.expect_err("the attacker's connection ends in an error");
    println!("rapid reset: cut off after {opened} streams opened and cancelled ({error})");
    // The gateway's GOAWAY, or (when the client was still writing as the gateway closed the
    // connection after it) a broken pipe.
    let go_away = error.is_go_away()
        && error.is_remote()
        && error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
    assert!(go_away || error.is_io(), "{error}");
    assert!(opened < 10_000);

    let statuses = bystander.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "another client meanwhile: {statuses:?}"
    );
}
