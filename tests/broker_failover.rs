//! `amqpAddr` with several brokers: publishers and the consumer link to the first, and when
//! it stops they move to the next, and no trace event is lost. Two separate brokers, then a
//! three-node RabbitMQ cluster with quorum queues. Real etcd, real RabbitMQ containers, real
//! processes; Elasticsearch is the recording stand-in.

mod support;

use support::es_standin::EsStandIn;
use support::trace_fixtures::{consumer, indexed_exactly};
use support::{
    free_port, http, metric, route_file, text_of, wait_for_nodes, Etcd, Goms, RabbitMq, ROUTES,
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
    let brokers = nodes
        .iter()
        .map(RabbitMq::url)
        .collect::<Vec<_>>()
        .join(",");
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
