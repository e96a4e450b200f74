//! Native registration (docs/services.md, the third way in): a Python service that uses only
//! etcd's HTTP/JSON gateway and the standard library (examples/native_registration.py) is
//! routed by a real gateway, refuses calls without the key, and leaves the registry when its
//! keep-alives stop or it is told to stop. Real etcd, real processes.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{eventually, free_port, http, route_file, wait_for_nodes, Etcd, Goms, KEY};

struct Native {
    child: Child,
    port: u16,
}

impl Native {
    fn start(etcd: &Etcd) -> Native {
        let port = free_port();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/native_registration.py"
        );
        let child = Command::new("python3")
            .args([script, "--name", "stock", "--port", &port.to_string()])
            .args([
                "--etcd",
                &format!("http://{}", etcd.endpoint()),
                "--ttl",
                "3",
            ])
            .env("GOMS__CALL_SERVICE_KEY", KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 runs examples/native_registration.py");
        Native { child, port }
    }

    fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn stock_nodes(admin_port: u16) -> usize {
    let Ok(response) = http()
        .get(format!("http://127.0.0.1:{admin_port}/cluster"))
        .send()
        .await
    else {
        return usize::MAX;
    };
    let document: serde_json::Value = response.json().await.unwrap_or_default();
    document["services"]["stock"]["Nodes"]
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test]
async fn a_natively_registered_python_service_is_routed_and_leaves_with_its_lease() {
    let etcd = Etcd::start().await;
    let native = Native::start(&etcd);
    let (_folder, routes) = route_file("services:\n  stock:\n    level: /stock/level\n");
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "stock", 1).await;

    // The contract's key and value.
    let node = format!("127.0.0.1:{}", native.port);
    let mut client = etcd.client().await;
    let found = client
        .get(format!("/goms/services/stock/{node}"), None)
        .await
        .unwrap();
    let kv = found.kvs().first().expect("the node's key");
    assert_ne!(kv.lease(), 0, "under a lease");
    let value: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
    for field in [
        "id",
        "service",
        "http",
        "version",
        "weight",
        "zone",
        "started_at",
    ] {
        assert!(value.get(field).is_some(), "{field} missing from {value}");
    }
    assert_eq!(value["http"], node);

    // Routed through the gateway, with the key the gateway adds.
    let routed = http()
        .get(format!("http://127.0.0.1:{port}/api/stock/level?item=7"))
        .header("X-Request-Id", "native-1")
        .send()
        .await
        .unwrap();
    assert_eq!(routed.status(), 200);
    assert_eq!(routed.headers()["x-served-by"], node.as_str());
    let body: serde_json::Value = routed.json().await.unwrap();
    assert_eq!(body["data"]["path"], "/stock/level?item=7");
    assert_eq!(body["data"]["requestId"], "native-1");

    // Without the key, straight to the service: 401 in the envelope.
    let refused = http()
        .get(format!("http://{node}/stock/level"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], 401);

    // Keep-alives stop: the lease (TTL 3 s) expires and the node leaves /cluster.
    let admin = gateway
        .output()
        .lines()
        .find_map(|line| {
            line.split("admin (/cluster, /metrics) on 127.0.0.1:")
                .nth(1)
        })
        .and_then(|port| port.trim().parse::<u16>().ok())
        .expect("the gateway logs its admin address");
    native.signal(libc::SIGUSR1);
    eventually(
        "the node leaves /cluster",
        Duration::from_secs(15),
        || async move { stock_nodes(admin).await == 0 },
    )
    .await;
}

#[tokio::test]
async fn sigterm_revokes_the_native_lease_at_once() {
    let etcd = Etcd::start().await;
    let native = Native::start(&etcd);
    let key = format!("/goms/services/stock/127.0.0.1:{}", native.port);
    let mut client = etcd.client().await;
    eventually("registered", Duration::from_secs(10), || {
        let (mut client, key) = (client.clone(), key.clone());
        async move { !client.get(key, None).await.unwrap().kvs().is_empty() }
    })
    .await;
    let started = Instant::now();
    native.signal(libc::SIGTERM);
    eventually("the key is gone", Duration::from_secs(2), || {
        let (mut client, key) = (client.clone(), key.clone());
        async move { client.get(key, None).await.unwrap().kvs().is_empty() }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "revoked, not expired: the lease's TTL is 3 s"
    );
    assert!(client
        .get(key.as_str(), None)
        .await
        .unwrap()
        .kvs()
        .is_empty());
}

/// `examples/sdk_service.rs`, built as `cargo test` builds examples (or here, when only this
/// suite was asked for).
fn sdk_example() -> std::path::PathBuf {
    let binary =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/examples/sdk_service");
    if !binary.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--locked", "--example", "sdk_service"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build --example sdk_service failed");
    }
    binary
}

#[tokio::test]
async fn the_sdk_example_registers_and_is_routed_with_the_key() {
    let etcd = Etcd::start().await;
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let _example = KillOnDrop(
        Command::new(sdk_example())
            .current_dir(spool.path())
            .env("GOMS__CALL_SERVICE_KEY", KEY)
            .env("GOMS__ETCD_ADDR", etcd.endpoint())
            .env("GOMS__SERVICE__HTTP_PORT", port.to_string())
            .env("GOMS__AMQP_ADDR", "amqp://guest:guest@127.0.0.1:1/%2f")
            .env("GOMS__TRACE__SPOOL_DIR", spool.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("the example runs"),
    );
    let (_folder, routes) = route_file("services:\n  inventory:\n    stock: /stock\n");
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    wait_for_nodes(gateway.port(), "inventory", 1).await;

    let body: serde_json::Value = http()
        .get(format!(
            "http://127.0.0.1:{}/api/inventory/stock?item=7",
            gateway.port()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["data"]["item"], "7", "{body}");
    let refused = http()
        .get(format!("http://127.0.0.1:{port}/stock?item=7"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "the SDK checks the key");
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
