//! Losing a part of the cluster under traffic. `amqpAddr` with several brokers: publishers
//! and the consumer link to the first, and when it stops they move to the next, and no trace
//! event is lost (two separate brokers, then a three-node RabbitMQ cluster with quorum
//! queues). Then an etcd member and a broker node at once, from three of each. Real etcd and
//! RabbitMQ containers, real processes; Elasticsearch is the recording stand-in.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::es_standin::EsStandIn;
use support::trace_fixtures::{consumer, indexed_exactly};
use support::{
    eventually, free_port, http, metric, route_file, text_of, wait_for_nodes, Etcd, Goms, RabbitMq,
    ROUTES,
};

/// Sends `count` GETs with the ids `{label}-{n}` through the gateway; each must be answered.
async fn send(gateway_port: u16, label: &str, count: usize) {
    let client = http();
    for n in 0..count {
        let response = client
            .get(format!("http://127.0.0.1:{gateway_port}/api/user/login"))
            .header("X-Request-Id", format!("{label}-{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{label}-{n}");
    }
}

/// A traced `user` service and a gateway, both given `env` (the brokers).
async fn traced_stack(etcd: &Etcd, env: &[(&str, &str)]) -> (Goms, Goms, tempfile::TempDir) {
    let service_port = free_port().to_string();
    let service = Goms::spawn(
        "user",
        &[
            "service",
            "--http-port",
            &service_port,
            "--etcd-addr",
            &etcd.endpoint(),
        ],
        env,
    );
    let (routes_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway_with(&etcd.endpoint(), &routes, &[], env).await;
    wait_for_nodes(gateway.port(), "user", 1).await;
    (service, gateway, routes_folder)
}

/// Every request id `{label}-{n}` has its four events in the index (the gateway's two and
/// the service's two), and the gateway dropped none.
async fn every_event_indexed_once(es: &EsStandIn, gateway: &Goms, labels: &[(&str, usize)]) {
    let total: usize = labels.iter().map(|(_, count)| count).sum();
    indexed_exactly(es, 4 * total).await;
    for (label, count) in labels {
        for n in 0..*count {
            let id = format!("{label}-{n}");
            assert_eq!(es.by_request(&id).len(), 4, "{id}");
        }
    }
    let metrics = text_of(http().get(format!("http://127.0.0.1:{}/metrics", gateway.port()))).await;
    assert_eq!(metric(&metrics, "goms_trace_events_dropped_total"), 0.0);
}

/// Two separate brokers: what was queued on the first is indexed before it stops.
#[tokio::test]
async fn publishers_and_the_consumer_fail_over_to_the_next_broker_and_lose_nothing() {
    let etcd = Etcd::start().await;
    let (first, second) = tokio::join!(RabbitMq::start(), RabbitMq::start());
    let es = EsStandIn::start().await;
    let brokers = format!("{},{}", first.url(), second.url());
    let env = [("GOMS__AMQP_ADDR", brokers.as_str())];
    let consumer = consumer("consumer", &first, &es.url(), &env);
    let (_service, gateway, _routes) = traced_stack(&etcd, &env).await;

    let requests = 50;
    send(gateway.port(), "before", requests).await;
    indexed_exactly(&es, 4 * requests).await;
    first.pause().await;
    send(gateway.port(), "after", requests).await;
    every_event_indexed_once(&es, &gateway, &[("before", requests), ("after", requests)]).await;

    let second_port = second.port.to_string();
    for (process, output) in [
        ("gateway", gateway.output()),
        ("consumer", consumer.output()),
    ] {
        assert!(
            output
                .lines()
                .any(|line| line.contains("Trace broker reachable again")
                    && line.contains(&second_port)),
            "the {process} never said it reached the second broker:\n{output}"
        );
    }
}

/// A three-node RabbitMQ cluster with quorum queues, every node in `amqpAddr`: the node that
/// every process is linked to, and that leads the queue, stops while events are still
/// queued. Every request is answered, and every event is indexed once.
#[tokio::test]
async fn a_cluster_node_lost_under_traffic_loses_no_event_with_quorum_queues() {
    let etcd = Etcd::start().await;
    let nodes = RabbitMq::start_cluster(3).await;
    let es = EsStandIn::start().await;
    let brokers = RabbitMq::urls(&nodes);
    let env = [
        ("GOMS__AMQP_ADDR", brokers.as_str()),
        ("GOMS__TRACE__QUEUE_TYPE", "quorum"),
    ];
    let consumer = consumer("consumer", &nodes[0], &es.url(), &env);
    let (_service, gateway, _routes) = traced_stack(&etcd, &env).await;

    let requests = 100;
    send(gateway.port(), "before", requests).await;
    assert_eq!(
        nodes[1].queue_type_and_running_nodes("goms.trace").await,
        ("quorum".to_string(), 3),
        "goms.trace is a quorum queue on a cluster of three"
    );
    nodes[0].pause().await;
    send(gateway.port(), "after", requests).await;
    every_event_indexed_once(&es, &gateway, &[("before", requests), ("after", requests)]).await;
    assert_eq!(
        nodes[1].queue_type_and_running_nodes("goms.trace").await.1,
        2,
        "the first node is down"
    );
    let others = [nodes[1].port.to_string(), nodes[2].port.to_string()];
    let output = consumer.output();
    assert!(
        output
            .lines()
            .any(|line| line.contains("Trace broker reachable again")
                && others.iter().any(|port| line.contains(port.as_str()))),
        "the consumer never said it reached another node:\n{output}"
    );
}

/// GETs `/api/user/login` one after another, with the ids `steady-{n}`, until `stop` is set;
/// counts them in `sent`. Returns how many were sent and the failures.
async fn steady_traffic(
    gateway_port: u16,
    sent: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> (usize, Vec<String>) {
    let client = http();
    let mut failures = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let answer = client
            .get(format!("http://127.0.0.1:{gateway_port}/api/user/login"))
            .header("X-Request-Id", format!("steady-{n}"))
            .send()
            .await;
        match answer {
            Ok(response) if response.status() == 200 => {}
            Ok(response) => failures.push(format!("steady-{n}: {}", response.status())),
            Err(error) => failures.push(format!("steady-{n}: {error}")),
        }
        n += 1;
        sent.store(n, Ordering::Relaxed);
    }
    (n, failures)
}

/// Three etcd members and a three-node RabbitMQ cluster with quorum queues, each process
/// given every member and every node: one etcd member and the broker node that every process
/// is linked to stop under steady traffic. No request fails and every event is indexed once.
/// Then a replica dies without leaving the registry: it leaves when its lease expires.
#[tokio::test]
async fn an_etcd_member_and_a_broker_node_lost_under_traffic_fail_no_request() {
    let (members, nodes, es) = tokio::join!(
        Etcd::start_cluster(3),
        RabbitMq::start_cluster(3),
        EsStandIn::start()
    );
    let etcd_addr = Etcd::endpoints(&members);
    let brokers = RabbitMq::urls(&nodes);
    let env = [
        ("GOMS__AMQP_ADDR", brokers.as_str()),
        ("GOMS__TRACE__QUEUE_TYPE", "quorum"),
        ("GOMS__REGISTRY__LEASE_TTL", "3"),
    ];
    let _consumer = consumer("consumer", &nodes[0], &es.url(), &env);
    let mut replicas: Vec<Goms> = (0..2)
        .map(|_| {
            let port = free_port().to_string();
            let args = ["service", "--http-port", &port, "--etcd-addr", &etcd_addr];
            Goms::spawn(&format!("user:{port}"), &args, &env)
        })
        .collect();
    let (_routes_folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway_with(&etcd_addr, &routes, &[], &env).await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 2).await;

    let (sent, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let traffic = tokio::spawn(steady_traffic(port, sent.clone(), stop.clone()));
    let at_least = |count: usize| {
        let sent = sent.clone();
        move || {
            let sent = sent.clone();
            async move { sent.load(Ordering::Relaxed) >= count }
        }
    };
    eventually("steady traffic", Duration::from_secs(30), at_least(50)).await;
    tokio::join!(members[0].pause(), nodes[0].pause());
    let after_the_loss = sent.load(Ordering::Relaxed) + 200;
    eventually(
        "200 more requests after the loss",
        Duration::from_secs(60),
        at_least(after_the_loss),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (count, failures) = traffic.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {count} failed: {failures:?}",
        failures.len()
    );
    every_event_indexed_once(&es, &gateway, &[("steady", count)]).await;

    // A replica that dies without revoking its lease leaves when the lease expires (3 s),
    // while the registry has one member fewer.
    let registered = || async {
        let mut client = members[1].client().await;
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        let listing = client.get("/goms/services/user/", Some(options)).await;
        listing.map_or(usize::MAX, |listing| listing.count() as usize)
    };
    replicas[1].kill();
    let killed = std::time::Instant::now();
    assert_eq!(registered().await, 2, "a SIGKILL revokes nothing");
    eventually(
        "the dead replica's key leaves etcd when its lease expires",
        Duration::from_secs(20),
        || async { registered().await == 1 },
    )
    .await;
    eprintln!(
        "the dead replica's key left etcd {:?} after the kill",
        killed.elapsed()
    );
    wait_for_nodes(port, "user", 1).await;
    send(port, "after-the-death", 20).await;
}
