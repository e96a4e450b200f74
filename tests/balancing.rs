//! `balance: least_request` and `balance: {hash: ...}` through a real gateway, real etcd and
//! replicas written here: a replica that turns slow loses its share, equal ones share evenly,
//! and a hashed key keeps its replica while replicas come and go.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    eventually, http, json_of, node_detail, register_replica, route_file, wait_for_nodes, Etcd,
    Goms,
};

/// A replica that answers its name after `delay_ms`, and counts what it got.
struct Replica {
    id: String,
    addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
}

async fn replica(etcd: &Etcd, id: &str) -> Replica {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let delay_ms = Arc::new(AtomicU64::new(0));
    let (counted, delay, name) = (hits.clone(), delay_ms.clone(), id.to_string());
    let app = axum::Router::new().fallback(move || {
        let (counted, delay, name) = (counted.clone(), delay.clone(), name.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            let delay = delay.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            name
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    register_replica(etcd, "user", id, addr, "").await;
    Replica {
        id: id.to_string(),
        addr,
        hits,
        delay_ms,
    }
}

/// Sends requests from `concurrency` clients for `duration`; returns how many each replica
/// answered, by name. Every request must succeed.
async fn load(url: &str, concurrency: usize, duration: Duration) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + duration;
    spread(
        url,
        concurrency,
        Arc::new(move || Instant::now() < deadline),
    )
    .await
}

/// Sends `count` requests from `concurrency` clients; how many each replica answered.
async fn requests(url: &str, concurrency: usize, count: usize) -> BTreeMap<String, usize> {
    let left = AtomicUsize::new(count);
    let take_one = move || {
        left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    };
    spread(url, concurrency, Arc::new(take_one)).await
}

/// Sends requests from `concurrency` clients while `more()` says so; how many each replica
/// answered, by name. Every request must succeed.
async fn spread(
    url: &str,
    concurrency: usize,
    more: Arc<dyn Fn() -> bool + Send + Sync>,
) -> BTreeMap<String, usize> {
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, more) = (http(), url.to_string(), more.clone());
        clients.spawn(async move {
            let mut answered: BTreeMap<String, usize> = BTreeMap::new();
            while more() {
                let response = client.get(&url).send().await.expect("an answer");
                assert_eq!(response.status(), 200);
                *answered.entry(response.text().await.unwrap()).or_default() += 1;
            }
            answered
        });
    }
    let mut total = BTreeMap::new();
    while let Some(answered) = clients.join_next().await {
        for (name, count) in answered.unwrap() {
            *total.entry(name).or_default() += count;
        }
    }
    total
}

fn share(counts: &BTreeMap<String, usize>, name: &str) -> f64 {
    let all: usize = counts.values().sum();
    counts.get(name).copied().unwrap_or(0) as f64 / all as f64
}

async fn latency_ewma_ms(port: u16, id: &str) -> Option<f64> {
    node_detail(port, "user", id).await["latencyEwmaMs"].as_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_shares_evenly_and_a_replica_that_turns_slow_gets_under_a_tenth_within_5s() {
    let etcd = Etcd::start().await;
    let replicas = [
        replica(&etcd, "r1").await,
        replica(&etcd, "r2").await,
        replica(&etcd, "r3").await,
    ];
    let routes_text = "services:\n  user:\n    login: /login\n    balance: least_request\n";
    let (_folder, routes) = route_file(routes_text);
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 3).await;
    let url = format!("http://127.0.0.1:{port}/api/user/login");

    let even = requests(&url, 8, 1000).await;
    println!("1,000 requests over three equal replicas: {even:?}");
    let mean = 1000.0 / 3.0;
    for replica in &replicas {
        let got = even.get(&replica.id).copied().unwrap_or(0) as f64;
        assert!(
            (got - mean).abs() <= 0.15 * mean,
            "equal replicas within ±15% of each other's mean: {even:?}"
        );
    }

    let slow = &replicas[2];
    slow.delay_ms.store(200, Ordering::SeqCst);
    let first_5s = load(&url, 8, Duration::from_secs(5)).await;
    println!("the 5 s after r3 turned 200 ms slower: {first_5s:?}");
    assert!(
        share(&first_5s, &slow.id) <= 0.10,
        "the slow replica's share within 5 s: {first_5s:?}"
    );

    // The latency average lives with the replica, not the route table: a reload keeps it.
    std::fs::write(&routes, format!("{routes_text}    register: /register\n")).unwrap();
    let register = format!("http://127.0.0.1:{port}/api/user/register");
    eventually(
        "the edited route file serves",
        Duration::from_secs(10),
        || {
            let (client, register) = (http(), register.clone());
            async move {
                client
                    .get(&register)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        },
    )
    .await;
    let average = latency_ewma_ms(port, &slow.id).await.unwrap_or_default();
    assert!(
        average > 20.0,
        "r3's latency average after a reload: {average} ms"
    );
    let after_reload = load(&url, 8, Duration::from_secs(2)).await;
    assert!(
        share(&after_reload, &slow.id) <= 0.10,
        "after a reload: {after_reload:?}"
    );
    let fast_average = latency_ewma_ms(port, &replicas[0].id).await.unwrap();
    assert!(
        fast_average < average,
        "{fast_average} ms against {average} ms"
    );
}

/// Which replica answers each of `users` on `url`, asked twice: the same both times.
async fn placement(url: &str, users: &[String]) -> BTreeMap<String, String> {
    let client = http();
    let mut placed = BTreeMap::new();
    for user in users {
        let mut answers = Vec::new();
        for _ in 0..2 {
            let response = client.get(url).header("X-User", user).send().await.unwrap();
            assert_eq!(response.status(), 200);
            answers.push(response.text().await.unwrap());
        }
        assert_eq!(answers[0], answers[1], "{user} kept its replica");
        placed.insert(user.clone(), answers.remove(0));
    }
    placed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hashed_key_keeps_its_replica_and_only_the_keys_of_a_replica_that_leaves_move() {
    let etcd = Etcd::start().await;
    let replicas = [
        replica(&etcd, "r1").await,
        replica(&etcd, "r2").await,
        replica(&etcd, "r3").await,
        replica(&etcd, "r4").await,
    ];
    let (_folder, routes) = route_file(
        "services:\n  user:\n    login: /login\n    balance: {hash: \"header:X-User\"}\n    cart:\n      path: /cart\n      balance: {hash: \"cookie:session\"}\n    mine:\n      path: /mine\n      balance: {hash: ip}\n",
    );
    let gateway = Goms::gateway(&etcd, &routes, &[]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 4).await;
    let login = format!("http://127.0.0.1:{port}/api/user/login");
    let cluster = json_of(http().get(format!("http://127.0.0.1:{port}/cluster"))).await;
    let settings = &cluster["services"]["user"]["Settings"];
    assert_eq!(settings["balance"], "hash header:x-user", "{settings}");
    assert_eq!(settings["routes"]["cart"]["balance"], "hash cookie:session");
    assert_eq!(settings["routes"]["mine"]["balance"], "hash ip");
    assert_eq!(settings["maxInFlight"], serde_json::Value::Null);
    assert_eq!(settings["ejection"]["consecutiveFailures"], 5);
    let users: Vec<String> = (0..200).map(|n| format!("user-{n}")).collect();

    let before = placement(&login, &users).await;
    for replica in &replicas {
        let keys = before.values().filter(|r| **r == replica.id).count();
        assert!(keys >= 20, "{} holds {keys} of 200 keys", replica.id);
    }

    // A cookie hashes as the header does: the same key lands on the same replica.
    let client = http();
    for user in users.iter().take(20) {
        let response = client
            .get(format!("http://127.0.0.1:{port}/api/user/cart"))
            .header("Cookie", format!("theme=dark; session={user}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.text().await.unwrap(), before[user], "{user}");
    }
    // Every request of this test comes from 127.0.0.1: by address, all go to one replica.
    let mine = requests(&format!("http://127.0.0.1:{port}/api/user/mine"), 4, 40).await;
    assert_eq!(mine.len(), 1, "{mine:?}");

    let leaver = &replicas[2];
    etcd.client()
        .await
        .delete(format!("/goms/services/user/{}", leaver.id), None)
        .await
        .unwrap();
    wait_for_nodes(port, "user", 3).await;
    let after_leave = placement(&login, &users).await;
    let moved: Vec<&String> = users
        .iter()
        .filter(|u| before[*u] != after_leave[*u])
        .collect();
    assert!(
        moved.iter().all(|u| before[*u] == leaver.id),
        "only the leaver's keys move"
    );
    println!(
        "one replica of 4 left: {} of 200 keys moved ({:.0}%)",
        moved.len(),
        moved.len() as f64 / 2.0
    );
    assert_eq!(
        moved.len(),
        before.values().filter(|r| **r == leaver.id).count()
    );

    register_replica(&etcd, "user", &leaver.id, leaver.addr, "").await;
    wait_for_nodes(port, "user", 4).await;
    let after_return = placement(&login, &users).await;
    assert_eq!(
        after_return, before,
        "the keys come back to the returning replica"
    );
    assert!(leaver.hits.load(Ordering::SeqCst) > 0);
}
