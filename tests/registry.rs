//! etcd failures: restart, total data loss, lost leases. Nodes re-register, watchers resume,
//! and routing comes back without restarting any goms process.

mod support;

use std::time::Duration;

use support::{free_port, http, route_file, wait_for_nodes, Etcd, Goms, ROUTES};

async fn get_ok(url: &str) -> bool {
    matches!(http().get(url).send().await, Ok(r) if r.status() == 200)
}

#[tokio::test]
async fn etcd_restart_keeps_routing_and_the_watch_resumes() {
    let etcd = Etcd::start().await;
    let _first = Goms::service(&etcd, free_port(), &["--lease-ttl", "5"]);
    let (_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway(&etcd, &routes, &["--lease-ttl", "5"]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;
    let url = format!("http://127.0.0.1:{port}/api/user/login");

    etcd.pause().await;
    // With etcd away the gateway keeps routing on what it knew.
    for _ in 0..5 {
        assert!(get_ok(&url).await, "routing stopped while etcd was down");
    }
    etcd.resume().await;

    // A replica started after the restart is seen: the watch came back.
    let late_port = free_port();
    let _late = Goms::service(&etcd, late_port, &["--lease-ttl", "5"]);
    gateway
        .wait_for_line(
            &format!("[user] node [127.0.0.1:{late_port}] join"),
            Duration::from_secs(20),
        )
        .await;
    wait_for_nodes(port, "user", 2).await;
    for _ in 0..4 {
        assert!(get_ok(&url).await);
    }
}

#[tokio::test]
async fn an_empty_etcd_gets_every_node_registered_again() {
    let mut etcd = Etcd::start().await;
    let service_port = free_port();
    let service = Goms::service(&etcd, service_port, &["--lease-ttl", "3"]);
    let (_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway(&etcd, &routes, &["--lease-ttl", "3"]).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;

    // Same address, no data: all leases and keys are gone, as after losing etcd's disk.
    etcd.replace_with_empty().await;
    service
        .wait_for_line("registering again", Duration::from_secs(20))
        .await;
    gateway
        .wait_for_line("registering again", Duration::from_secs(20))
        .await;
    let mut client = etcd.client().await;
    support::eventually("both nodes back in etcd", Duration::from_secs(20), || {
        let mut client = client.clone();
        async move {
            let listed = client
                .get(
                    "/goms/services/",
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            listed.kvs().len() == 2
        }
    })
    .await;
    wait_for_nodes(port, "user", 1).await;
    assert!(get_ok(&format!("http://127.0.0.1:{port}/api/user/login")).await);
    // Registered again means under a live lease of the new etcd, not just a key.
    let listed = client
        .get(
            "/goms/services/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    for kv in listed.kvs() {
        let key = kv.key_str().unwrap().to_string();
        let ttl = client
            .lease_time_to_live(kv.lease(), None)
            .await
            .unwrap()
            .ttl();
        assert!(ttl > 0, "{key} is under a live lease (ttl {ttl})");
    }
}

#[tokio::test]
async fn a_revoked_lease_is_granted_again_and_the_key_put_back() {
    let etcd = Etcd::start().await;
    let service_port = free_port();
    let service = Goms::service(&etcd, service_port, &["--lease-ttl", "3"]);
    service
        .wait_for_line("registered at", Duration::from_secs(20))
        .await;
    let mut client = etcd.client().await;
    let leases = client.leases().await.unwrap();
    assert_eq!(leases.leases().len(), 1);
    assert!(!service.has_line("lost; registering again"));
    client.lease_revoke(leases.leases()[0].id()).await.unwrap();
    // A line that only the revocation makes: "lease" alone matched the first registration.
    service
        .wait_for_line("lost; registering again", Duration::from_secs(10))
        .await;
    let key = format!("/goms/services/user/127.0.0.1:{service_port}");
    support::eventually(
        "key put back under a new lease",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            let key = key.clone();
            async move {
                let found = client.get(key, None).await.unwrap();
                found.kvs().first().is_some_and(|kv| kv.lease() != 0)
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_watcher_cut_off_across_a_compaction_lists_again_and_misses_nothing() {
    let etcd = Etcd::start().await;
    let proxy = support::TcpCut::start(etcd.port).await;
    // The gateway reaches etcd only through the cuttable proxy.
    let (_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway_with(&format!("127.0.0.1:{}", proxy.port), &routes, &[], &[]).await;
    let port = gateway.port();
    let first = Goms::service(&etcd, free_port(), &["--lease-ttl", "3"]);
    wait_for_nodes(port, "user", 1).await;

    proxy.cut();
    // While the gateway is cut off: a replica joins, a replica leaves, history is compacted.
    let late_port = free_port();
    let _late = Goms::service(&etcd, late_port, &["--lease-ttl", "3"]);
    _late
        .wait_for_line("registered at", Duration::from_secs(10))
        .await;
    let first_id = first.name.replace("user:", "127.0.0.1:");
    drop(first);
    let mut client = etcd.client().await;
    support::eventually(
        "first replica's key expired",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            let key = format!("/goms/services/user/{first_id}");
            async move { client.get(key, None).await.unwrap().kvs().is_empty() }
        },
    )
    .await;
    let revision = client
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(revision, None).await.unwrap();
    proxy.restore();

    gateway
        .wait_for_line(
            &format!("[user] node [127.0.0.1:{late_port}] join"),
            Duration::from_secs(20),
        )
        .await;
    gateway
        .wait_for_line(
            &format!("[user] node [{first_id}] leave"),
            Duration::from_secs(20),
        )
        .await;
    wait_for_nodes(port, "user", 1).await;
    let response = http()
        .get(format!("http://127.0.0.1:{port}/api/user/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-served-by"],
        format!("127.0.0.1:{late_port}").as_str()
    );
}
