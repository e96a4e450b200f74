//! The gateway as a public port: its admin surface stays private, and SIGTERM drains and
//! exits as soon as nothing is left. Real etcd, real processes.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, http, route_file, wait_for_nodes, Etcd, Goms};

const ROUTES: &str = "services:\n  order:\n    slow: /slow\n";

/// The address a process logged after `marker`, e.g. `admin (/cluster, /metrics) on `.
fn logged_addr(process: &Goms, marker: &str) -> String {
    let output = process.output();
    let line = output
        .lines()
        .find(|line| line.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{output}"));
    let after = line.split(marker).nth(1).unwrap();
    after.split_whitespace().next().unwrap().to_string()
}

async fn gateway(etcd: &Etcd, env: &[(&str, &str)]) -> (Goms, u16, String, tempfile::TempDir) {
    let (folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway_with(&etcd.endpoint(), &routes, &[], env).await;
    let port = gateway.port();
    let marker = "admin (/cluster, /metrics) on ";
    gateway.wait_for_line(marker, Duration::from_secs(20)).await;
    let admin = logged_addr(&gateway, marker);
    (gateway, port, admin, folder)
}

#[tokio::test]
async fn cluster_and_metrics_are_private_to_the_admin_listener_and_allowed_clients() {
    let etcd = Etcd::start().await;
    // The test's client is on loopback; an allow list without loopback makes it an outsider.
    let (_gateway, port, admin, _routes) =
        gateway(&etcd, &[("GOMS__GATEWAY__ADMIN_ALLOW", "10.0.0.0/8")]).await;
    let client = http();

    for path in ["/cluster", "/metrics"] {
        let refused = client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{path} on the public port");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], 403);
        assert!(
            body["msg"].as_str().unwrap().contains("gateway.adminAddr"),
            "{body}"
        );

        let served = client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(served.status(), 200, "{path} on the admin listener");
    }
    let cluster: serde_json::Value = client
        .get(format!("http://{admin}/cluster"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cluster["status"], true);
    let metrics = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("goms_gateway_responses_total{code=\"403\"} 2"),
        "{metrics}"
    );

    for base in [format!("127.0.0.1:{port}"), admin.clone()] {
        let health = client
            .get(format!("http://{base}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200, "/healthz answers everyone on {base}");
    }
    let elsewhere = client
        .get(format!("http://{admin}/api/order/slow"))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 404, "the admin listener routes nothing");
}

#[tokio::test]
async fn loopback_clients_read_cluster_on_the_public_port_by_default() {
    let etcd = Etcd::start().await;
    let (_gateway, port, _admin, _routes) = gateway(&etcd, &[]).await;
    let response = http()
        .get(format!("http://127.0.0.1:{port}/cluster"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the Go original's tour: curl :8082/cluster"
    );
}

#[tokio::test]
async fn an_idle_gateway_exits_promptly_on_sigterm() {
    let etcd = Etcd::start().await;
    let (mut gateway, port, _admin, _routes) =
        gateway(&etcd, &[("GOMS__GATEWAY__DRAIN_TIMEOUT", "10s")]).await;
    wait_for_nodes(port, "gateway", 1).await;
    let started = Instant::now();
    let status = gateway.terminate(Duration::from_secs(5)).await;
    eprintln!("idle gateway exited {:?} after SIGTERM", started.elapsed());
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an idle gateway does not wait out its 10 s drain timeout"
    );
}

/// A slow app behind a sidecar: something that takes seconds to answer.
struct SlowReplica {
    _app: KillOnDrop,
    _sidecar: Goms,
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn slow_replica(etcd: &Etcd) -> SlowReplica {
    let app_port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/order/app.py");
    let app = Command::new("python3")
        .args([script, "--port", &app_port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("python3 runs the order app");
    let sidecar = Goms::spawn(
        "sidecar",
        &[
            "sidecar",
            "--name",
            "order",
            "--app",
            &format!("127.0.0.1:{app_port}"),
            "--http-port",
            "0",
            "--admin-addr",
            "127.0.0.1:0",
            "--health-interval",
            "200ms",
            "--etcd-addr",
            &etcd.endpoint(),
        ],
        &[],
    );
    SlowReplica {
        _app: KillOnDrop(app),
        _sidecar: sidecar,
    }
}

#[tokio::test]
async fn a_draining_gateway_finishes_the_request_in_flight_then_exits() {
    let etcd = Etcd::start().await;
    let _slow = slow_replica(&etcd);
    let (mut gateway, port, _admin, _routes) =
        gateway(&etcd, &[("GOMS__GATEWAY__DRAIN_TIMEOUT", "10s")]).await;
    wait_for_nodes(port, "order", 1).await;

    let started = Instant::now();
    let request = tokio::spawn(async move {
        http()
            .get(format!("http://127.0.0.1:{port}/api/order/slow?ms=2000"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // Let the request reach the replica before the signal: poll the gateway's counter.
    support::eventually(
        "the slow request is in flight",
        Duration::from_secs(5),
        || async move {
            let metrics = http()
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metrics.lines().any(|line| {
                line.starts_with("goms_upstream_in_flight{service=\"order\"")
                    && line.ends_with(" 1")
            })
        },
    )
    .await;
    let status = gateway.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        request.await.unwrap().expect("the request got an answer"),
        200,
        "the request in flight completed"
    );
    let took = started.elapsed();
    eprintln!("gateway with a 2 s request in flight exited after {took:?}");
    assert!(took >= Duration::from_secs(2), "it waited for the request");
}
