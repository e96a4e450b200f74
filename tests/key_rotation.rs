//! Rotating `callServiceKey` under steady traffic, in the order docs/operations.md gives:
//! services first (new key, old one still accepted), then gateways (they send the new key),
//! then the old key goes. No request fails at any step. Real etcd, gateways and services.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{free_port, http, wait_for_nodes, Etcd, Goms, ROUTES};

const OLD: &str = "the-old-call-service-key";
const NEW: &str = "the-new-call-service-key";

fn service(etcd: &Etcd, port: u16, key: &str, previous: &str) -> Goms {
    let port = port.to_string();
    let endpoint = etcd.endpoint();
    let args = [
        "service",
        "--name",
        "user",
        "--http-port",
        &port,
        "--etcd-addr",
        &endpoint,
    ];
    let env = [
        ("GOMS__CALL_SERVICE_KEY", key),
        ("GOMS__PREVIOUS_CALL_SERVICE_KEYS", previous),
    ];
    Goms::spawn(&format!("user:{port}:{key}"), &args, &env)
}

/// GETs in a loop through whichever gateways `targets` lists, counting what failed.
struct SteadyClient {
    targets: Arc<Mutex<Vec<u16>>>,
    answered: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SteadyClient {
    fn start(first_gateway: u16) -> SteadyClient {
        let targets = Arc::new(Mutex::new(vec![first_gateway]));
        let answered = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, a, f, s) = (
            targets.clone(),
            answered.clone(),
            failures.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            let client = http();
            let mut turn = 0;
            while !s.load(Ordering::SeqCst) {
                let port = {
                    let targets = t.lock().unwrap();
                    turn += 1;
                    targets[turn % targets.len()]
                };
                let url = format!("http://127.0.0.1:{port}/api/user/login");
                match client.get(&url).send().await {
                    Ok(response) if response.status() == 200 => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(response) => {
                        let status = response.status();
                        let body = response.text().await.unwrap_or_default();
                        f.lock().unwrap().push(format!("{port}: {status} {body}"));
                    }
                    Err(error) => f.lock().unwrap().push(format!("{port}: {error}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        SteadyClient {
            targets,
            answered,
            failures,
            stop,
            task,
        }
    }

    /// Waits until at least `more` further requests were answered.
    async fn answers(&self, more: usize) {
        let from = self.answered.load(Ordering::SeqCst);
        support::eventually(
            "the steady client is answered",
            Duration::from_secs(20),
            || async { self.answered.load(Ordering::SeqCst) >= from + more },
        )
        .await;
    }
}

#[tokio::test]
async fn a_key_rotation_in_the_documented_order_fails_no_request() {
    let etcd = Etcd::start().await;
    let (_folder, routes) = support::route_file(ROUTES);
    let mut old_service = service(&etcd, free_port(), OLD, "");
    let mut old_gateway = Goms::gateway_with(
        &etcd.endpoint(),
        &routes,
        &[],
        &[("GOMS__CALL_SERVICE_KEY", OLD)],
    )
    .await;
    wait_for_nodes(old_gateway.port(), "user", 1).await;
    let client = SteadyClient::start(old_gateway.port());
    client.answers(20).await;

    // 1. Services roll with the new key, still accepting the old one that gateways send.
    let rolled_port = free_port();
    let mut rolled_service = service(&etcd, rolled_port, NEW, OLD);
    wait_for_nodes(old_gateway.port(), "user", 2).await;
    old_service.terminate(Duration::from_secs(10)).await;
    wait_for_nodes(old_gateway.port(), "user", 1).await;
    client.answers(20).await;

    // 2. Gateways roll: they send the new key.
    let new_gateway = Goms::gateway_with(
        &etcd.endpoint(),
        &routes,
        &[],
        &[("GOMS__CALL_SERVICE_KEY", NEW)],
    )
    .await;
    wait_for_nodes(new_gateway.port(), "user", 1).await;
    client.targets.lock().unwrap().push(new_gateway.port());
    client.answers(20).await;
    client
        .targets
        .lock()
        .unwrap()
        .retain(|p| *p == new_gateway.port());
    client.answers(5).await;
    old_gateway.terminate(Duration::from_secs(10)).await;
    client.answers(20).await;

    // 3. The old key goes: services roll once more, with the new key alone.
    let final_port = free_port();
    let _final_service = service(&etcd, final_port, NEW, "");
    wait_for_nodes(new_gateway.port(), "user", 2).await;
    rolled_service.terminate(Duration::from_secs(10)).await;
    wait_for_nodes(new_gateway.port(), "user", 1).await;
    client.answers(20).await;

    client.stop.store(true, Ordering::SeqCst);
    client.task.await.unwrap();
    let failures = client.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rotation: {failures:#?}",
        failures.len(),
        failures.len() + client.answered.load(Ordering::SeqCst)
    );
    // The old key is refused now, and the new one accepted, by the service itself.
    let direct = format!("http://127.0.0.1:{final_port}/login");
    let with_key = |key: &'static str| http().get(&direct).header("call-service-key", key).send();
    assert_eq!(with_key(OLD).await.unwrap().status(), 401);
    assert_eq!(with_key(NEW).await.unwrap().status(), 200);
}
