//! Trace events: gateway and service -> RabbitMQ (real container) -> `goms trace-consumer`
//! -> Elasticsearch. Elasticsearch is the stand-in of `support::es_standin` (named as such
//! everywhere); `real_elasticsearch_end_to_end` runs against a real image where one exists.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use goms::trace::framing::{self, EncodedEvents, TraceCompression};
use goms::trace::testing::Spool;
use goms::trace::{Publisher, PublisherSettings, PublisherStats, RunningPublisher, TraceSink};
use support::es_standin::{EsStandIn, Faults};
use support::trace_fixtures::{
    consumer, indexed_exactly, publish, publish_encoded, synthetic_event,
};
use support::{
    eventually, free_port, http, metric, route_file, text_of, wait_for_nodes, Etcd, Goms, RabbitMq,
    ROUTES,
};

/// A gateway and one `user` replica that publish trace events to `broker`.
async fn traced_stack(etcd: &Etcd, broker: &RabbitMq) -> (Goms, Goms, u16, tempfile::TempDir) {
    let amqp = broker.url();
    let service_port = free_port();
    let service = Goms::spawn(
        "user",
        &[
            "service",
            "--http-port",
            &service_port.to_string(),
            "--etcd-addr",
            &etcd.endpoint(),
        ],
        &[
            ("GOMS__AMQP_ADDR", &amqp),
            ("GOMS__TRACE__REDACT_HEADERS", "x-api-token"),
        ],
    );
    let (folder, routes) = route_file(ROUTES);
    let gateway = Goms::gateway_with(
        &etcd.endpoint(),
        &routes,
        &[],
        &[
            ("GOMS__AMQP_ADDR", &amqp),
            ("GOMS__TRACE__REDACT_HEADERS", "x-api-token"),
        ],
    )
    .await;
    let port = gateway.port();
    wait_for_nodes(port, "user", 1).await;
    (gateway, service, port, folder)
}

#[tokio::test]
async fn every_request_leaves_four_events_in_the_index() {
    let etcd = Etcd::start().await;
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let (_gateway, _service, port, _routes) = traced_stack(&etcd, &broker).await;
    let _consumer = consumer("consumer", &broker, &es.url(), &[]);

    let response = http()
        .post(format!("http://127.0.0.1:{port}/api/user/login?a=1&b=3"))
        .header("X-Request-Id", "trace-e2e-1")
        .header("Authorization", "Bearer very-secret")
        .header("Cookie", "session=also-secret")
        .header("X-Api-Token", "configured-secret")
        // Forged: the test client is no trusted proxy (gateway.trustedProxies is empty).
        .header("X-Forwarded-For", "6.6.6.6")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&serde_json::json!({"username": "test", "password": "pw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    eventually(
        "four events for trace-e2e-1 in the index",
        Duration::from_secs(30),
        || {
            let es = es.clone();
            async move { es.by_request("trace-e2e-1").len() == 4 }
        },
    )
    .await;
    let documents = es.by_request("trace-e2e-1");
    let by_kind: HashMap<String, serde_json::Value> = documents
        .iter()
        .map(|(_, _, doc)| (doc["event"].as_str().unwrap().to_string(), doc.clone()))
        .collect();
    for kind in [
        "request.start",
        "service.start",
        "service.end",
        "request.end",
    ] {
        assert!(by_kind.contains_key(kind), "missing {kind}: {documents:#?}");
    }
    for (index, id, doc) in &documents {
        assert_eq!(doc["eventId"].as_str().unwrap(), id, "_id is eventId");
        let date = doc["time"].as_str().unwrap()[..10].replace('-', ".");
        assert_eq!(index, &format!("trace_logs-{date}"));
        assert_eq!(doc["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(doc["projectName"], "goms");
        let text = doc.to_string();
        for secret in [
            "very-secret",
            "also-secret",
            "configured-secret",
            support::KEY,
        ] {
            assert!(!text.contains(secret), "{secret} leaked into {text}");
        }
    }
    let start = &by_kind["request.start"];
    assert_eq!(start["serviceName"], "gateway");
    assert_eq!(start["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(start["request"]["method"], "POST");
    assert_eq!(start["request"]["url"], "/api/user/login");
    assert_eq!(start["request"]["urlParam"], "?a=1&b=3");
    assert_eq!(start["request"]["body"]["username"], "test");
    assert_eq!(start["request"]["headers"]["authorization"], "[REDACTED]");
    assert_eq!(start["request"]["clientIp"], "127.0.0.1");
    let end = &by_kind["request.end"];
    assert!(end["durationMs"].is_number(), "{end}");
    assert_eq!(end["status"], 200);
    assert_eq!(end["attempt"], 1);
    let service_end = &by_kind["service.end"];
    assert_eq!(service_end["serviceName"], "user");
    assert_eq!(service_end["status"], 200);
    assert!(service_end["durationMs"].is_number());
    assert_eq!(
        end["upstream"], service_end["serviceId"],
        "the replica that served it"
    );
    // The service's span is a child of the gateway's span.
    assert_eq!(by_kind["service.start"]["parentSpanId"], start["spanId"]);

    let store = es.store.lock().unwrap();
    let template = &store.templates["trace_logs"];
    assert_eq!(template["index_patterns"][0], "trace_logs-*");
    let properties = &template["template"]["mappings"]["properties"];
    assert_eq!(properties["time"]["type"], "date");
    assert_eq!(properties["durationMs"]["type"], "double");
    assert_eq!(properties["requestId"]["type"], "keyword");
}

/// Events wait in memory for the publish interval; a gateway and a replica SIGKILLed
/// meanwhile used to lose them. Their next start finds them in the journal.
#[tokio::test]
async fn events_held_by_sigkilled_nodes_are_replayed_by_their_next_start() {
    let etcd = Etcd::start().await;
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let _consumer = consumer("consumer", &broker, &es.url(), &[]);
    let spool = tempfile::tempdir().unwrap();
    let (_routes_folder, routes) = route_file(ROUTES);
    let (service_port, gateway_port) = (free_port(), free_port());
    let amqp = broker.url();
    // A spool root each: the first to start again would otherwise adopt the other's folder
    // (another test covers that), and this one is about a node's own next start.
    let [service_spool, gateway_spool] =
        ["service", "gateway"].map(|node| spool.path().join(node).display().to_string());
    // A minute's interval: nothing leaves the queue before the kill.
    let env_with_spool = |spool_dir| {
        [
            ("GOMS__AMQP_ADDR", amqp.as_str()),
            ("GOMS__TRACE__SPOOL_DIR", spool_dir),
            ("GOMS__TRACE__PUBLISH_INTERVAL", "60s"),
        ]
    };
    let (service_env, gateway_env) = (
        env_with_spool(service_spool.as_str()),
        env_with_spool(gateway_spool.as_str()),
    );
    let service_args = [
        "service",
        "--http-port",
        &service_port.to_string(),
        "--etcd-addr",
        &etcd.endpoint(),
    ]
    .map(String::from);
    let gateway_args = [
        "gateway",
        "--http-port",
        &gateway_port.to_string(),
        "--etcd-addr",
        &etcd.endpoint(),
        "--routes",
        &routes.display().to_string(),
    ]
    .map(String::from);
    let start = |args: &[String], env: &[(&str, &str)]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Goms::spawn(args[0], &args, env)
    };
    let mut service = start(&service_args, &service_env);
    let mut gateway = start(&gateway_args, &gateway_env);
    wait_for_nodes(gateway_port, "user", 1).await;

    let client = http();
    let ids: Vec<String> = (0..20).map(|n| format!("held-{n}")).collect();
    for id in &ids {
        let response = client
            .get(format!("http://127.0.0.1:{gateway_port}/api/user/login"))
            .header("X-Request-Id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // The gateway writes a request's events just after its answer went out.
    let metrics_url = format!("http://127.0.0.1:{gateway_port}/metrics");
    eventually("the gateway emitted 40 events", Duration::from_secs(10), || {
        let request = client.get(&metrics_url);
        async move { metric(&text_of(request).await, "goms_trace_events_emitted_total") == 40.0 }
    })
    .await;
    gateway.kill();
    service.kill();
    assert_eq!(
        es.document_count(),
        0,
        "nothing was published before the kill"
    );

    // Started again as the same nodes, with the default interval.
    let _service = start(&service_args, &service_env[..2]);
    let gateway = start(&gateway_args, &gateway_env[..2]);
    indexed_exactly(&es, ids.len() * 4).await;
    for id in &ids {
        assert_eq!(es.by_request(id).len(), 4, "{id}");
    }
    let metrics = text_of(client.get(&metrics_url)).await;
    assert_eq!(metric(&metrics, "goms_trace_events_recovered_total"), 40.0);
    assert!(
        gateway.has_line("previous run held in memory"),
        "{}",
        gateway.output()
    );
}

/// Node ids follow addresses, so a gateway scaled away or recreated elsewhere never comes
/// back to its spool folder. Here one gateway spooled with the broker away and was stopped
/// for good (SIGTERM: its events in segments), and one was SIGKILLed while its events were
/// still queued (they are in its journal). A third gateway on another port, with the same
/// spool root, adopts both folders at its start: every event is indexed once.
#[tokio::test]
async fn the_spool_folders_of_gateways_that_never_return_are_adopted_by_another() {
    let etcd = Etcd::start().await;
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let _consumer = consumer("consumer", &broker, &es.url(), &[]);
    let amqp = broker.url();
    let service_port = free_port().to_string();
    let _service = Goms::spawn(
        "user",
        &[
            "service",
            "--http-port",
            &service_port,
            "--etcd-addr",
            &etcd.endpoint(),
        ],
        &[("GOMS__AMQP_ADDR", &amqp)],
    );
    let (_routes_folder, routes) = route_file(ROUTES);
    let spool = tempfile::tempdir().unwrap();
    let spool_root = spool.path().display().to_string();
    // The test processes' broker address is a closed port unless one is given: away.
    let broker_away = [("GOMS__TRACE__SPOOL_DIR", spool_root.as_str())];
    let held_in_memory = [
        ("GOMS__TRACE__SPOOL_DIR", spool_root.as_str()),
        ("GOMS__TRACE__PUBLISH_INTERVAL", "60s"),
    ];
    let mut stopped = Goms::gateway_with(&etcd.endpoint(), &routes, &[], &broker_away).await;
    let mut killed = Goms::gateway_with(&etcd.endpoint(), &routes, &[], &held_in_memory).await;
    let requests = 50;
    for (gateway, label) in [(&stopped, "stopped"), (&killed, "killed")] {
        send_traced_gets(gateway.port(), label, requests).await;
    }
    killed.kill();
    assert!(stopped.terminate(Duration::from_secs(15)).await.success());
    assert_eq!(
        node_folders(spool.path()).len(),
        2,
        "each gone gateway left its folder"
    );

    let adopter = Goms::gateway_with(
        &etcd.endpoint(),
        &routes,
        &[],
        &[
            ("GOMS__TRACE__SPOOL_DIR", spool_root.as_str()),
            ("GOMS__AMQP_ADDR", amqp.as_str()),
        ],
    )
    .await;
    let gateway_events = 2 * 2 * requests;
    indexed_exactly(&es, 2 * gateway_events).await;
    for label in ["stopped", "killed"] {
        for n in 0..requests {
            let id = format!("{label}-{n}");
            assert_eq!(es.by_request(&id).len(), 4, "{id}");
        }
    }
    let metrics = text_of(http().get(format!("http://127.0.0.1:{}/metrics", adopter.port()))).await;
    assert_eq!(
        metric(&metrics, "goms_trace_spool_folders_adopted_total"),
        2.0
    );
    assert_eq!(
        metric(&metrics, "goms_trace_events_adopted_total"),
        gateway_events as f64
    );
    assert_eq!(metric(&metrics, "goms_trace_events_dropped_total"), 0.0);
    assert_eq!(
        node_folders(spool.path()).len(),
        1,
        "the adopted folders are removed; the adopter's own is left"
    );
}

/// Sends `count` GETs with the ids `{label}-{n}` and waits until the gateway has emitted
/// their events (it writes them just after each answer went out).
async fn send_traced_gets(gateway_port: u16, label: &str, count: usize) {
    wait_for_nodes(gateway_port, "user", 1).await;
    let client = http();
    for n in 0..count {
        let response = client
            .get(format!("http://127.0.0.1:{gateway_port}/api/user/login"))
            .header("X-Request-Id", format!("{label}-{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let metrics_url = format!("http://127.0.0.1:{gateway_port}/metrics");
    let emitted = (2 * count) as f64;
    eventually("the gateway emitted its events", Duration::from_secs(10), || {
        let request = client.get(&metrics_url);
        async move { metric(&text_of(request).await, "goms_trace_events_emitted_total") == emitted }
    })
    .await;
}

/// The node folders under a spool root.
fn node_folders(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .collect()
}

#[tokio::test]
async fn a_broker_outage_under_load_fails_no_request_and_loses_no_event() {
    let etcd = Etcd::start().await;
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let (gateway, _service, port, _routes) = traced_stack(&etcd, &broker).await;
    let _consumer = consumer("consumer", &broker, &es.url(), &[]);
    let client = http();
    let url = format!("http://127.0.0.1:{port}/api/user/login");

    // Sequential load before, during (at least 15 s, bounded) and after the outage.
    let mut latencies: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut requests = 0;
    let mut outage_started = None;
    while requests < 5000 {
        if requests == 50 {
            broker.pause().await;
            outage_started = Some(Instant::now());
        }
        let during = outage_started.is_some_and(|t| t.elapsed() < Duration::from_secs(15));
        if requests >= 50 && !during {
            break;
        }
        let started = Instant::now();
        let response = client
            .get(&url)
            .header("X-Request-Id", format!("outage-{requests}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "request {requests}");
        latencies[usize::from(during)].push(started.elapsed());
        requests += 1;
    }
    for (label, mut sample) in ["broker up", "broker down"].into_iter().zip(latencies) {
        sample.sort();
        let at = |q: f64| sample[((sample.len() - 1) as f64 * q) as usize];
        eprintln!(
            "{label}: {} requests, p50 {:?}, p99 {:?}",
            sample.len(),
            at(0.5),
            at(0.99)
        );
    }
    let metrics = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let spooled = metric(&metrics, "goms_trace_events_spooled_total");
    assert!(
        spooled > 0.0,
        "nothing was spooled while the broker was down:\n{metrics}"
    );
    broker.resume().await;

    let expected = requests * 4;
    indexed_exactly(&es, expected).await;
    for i in 0..requests {
        assert_eq!(
            es.by_request(&format!("outage-{i}")).len(),
            4,
            "request outage-{i}"
        );
    }
    let metrics = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric(&metrics, "goms_trace_events_dropped_total"), 0.0);
    // The publisher, not a request, wrote every spooled event.
    assert_eq!(metric(&metrics, "goms_trace_events_overflowed_total"), 0.0);
    assert!(
        gateway.has_line("Replayed spooled trace events"),
        "{}",
        gateway.output()
    );
}

/// An AMQP URL whose listener accepts connections and never answers, and the task that holds
/// them (abort it to let them go).
async fn silent_broker() -> (String, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    (format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), held)
}

/// A broker that accepts connections and never answers (as behind a partition) holds each
/// connection attempt for the full connect timeout. The publisher must keep draining its
/// in-memory queue meanwhile: the request path must never find it full and write the spool.
#[tokio::test]
async fn a_broker_that_never_answers_leaves_spool_writes_to_the_publisher() {
    let (url, held) = silent_broker().await;
    let spool = tempfile::tempdir().unwrap();
    let (sink, running) = start_small_queue_publisher(url, &spool);

    // Inside one 5 s connection attempt.
    let total = 1000u64;
    emit_paced(&sink, 0..total as usize).await;
    let stats = sink.stats();
    eventually("every event spooled", Duration::from_secs(20), || async {
        stats.spooled.load(Ordering::Relaxed) == total
    })
    .await;
    assert_eq!(stats.overflowed.load(Ordering::Relaxed), 0);
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    assert_eq!(stats.published.load(Ordering::Relaxed), 0);
    running.shutdown(Duration::from_secs(10)).await;
    held.abort();
}

/// `trace.bufferMaxBytes` bounds what events hold in memory, queued or in flight. With room
/// for one buffer, and a broker that never answers (so events wait in memory through the
/// connection attempt), the events that would need a second buffer go to the spool from the
/// request path, counted as overflowed; the buffer in use never passes the bound, and every
/// event reaches the spool.
#[tokio::test]
async fn events_past_the_buffer_bound_go_to_the_spool_and_none_is_lost() {
    let (url, held) = silent_broker().await;
    let spool = tempfile::tempdir().unwrap();
    let (sink, running) = start_publisher(PublisherSettings {
        queue_capacity: 10_000,
        buffer_max_bytes: framing::MESSAGE_BUFFER_BYTES as u64,
        ..small_queue_settings(url, &spool)
    });
    let stats = sink.stats();

    // 2 KiB each: a buffer holds some 250 before a unit closes.
    let total = 1000u64;
    let pad = "x".repeat(2048);
    for id in 0..total {
        sink.emit_with(1, |out| {
            out.extend_from_slice(
                format!("{{\"eventId\":\"big-{id}\",\"pad\":\"{pad}\"}}\n").as_bytes(),
            )
        });
        assert!(stats.buffers.in_use() <= 1, "past the bound at event {id}");
    }
    assert!(
        stats.overflowed.load(Ordering::Relaxed) > 0,
        "no event found the buffer bound"
    );
    eventually("every event spooled", Duration::from_secs(20), || async {
        stats.spooled.load(Ordering::Relaxed) == total
    })
    .await;
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    running.shutdown(Duration::from_secs(10)).await;
    held.abort();
}

/// The publisher takes its queue at each interval, or as soon as the queue is half full: a
/// busy gateway must not wait out the interval while the queue fills (at 40,000 requests/s the
/// default 10,000 entries last 250 ms against a 200 ms interval) and leave requests to spool
/// their events themselves. With no broker the events go to the spool, long before the
/// one-minute interval here.
#[tokio::test]
async fn a_half_full_queue_is_taken_before_the_interval_is_up() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spool = tempfile::tempdir().unwrap();
    let url = format!("amqp://guest:guest@127.0.0.1:{closed_port}/%2f");
    let (sink, running) = start_publisher(PublisherSettings {
        publish_interval: Duration::from_secs(60),
        ..small_queue_settings(url, &spool)
    });
    // The test's runtime has one thread: yielding lets the publisher run its first round and
    // go to sleep until its interval, so the events below arrive while it sleeps.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let half = 50;
    for id in 0..half {
        sink.emit(synthetic_event(id));
    }
    let stats = sink.stats();
    eventually(
        "the half-full queue spooled by the publisher",
        Duration::from_secs(10),
        || async { stats.spooled.load(Ordering::Relaxed) == half as u64 },
    )
    .await;
    assert_eq!(stats.overflowed.load(Ordering::Relaxed), 0);
    running.shutdown(Duration::from_secs(10)).await;
}

/// The blocked-broker tests' setting: a broker, the Elasticsearch stand-in and a consumer
/// between them.
async fn broker_and_consumer() -> (RabbitMq, EsStandIn, Goms) {
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let consumer = consumer("consumer", &broker, &es.url(), &[]);
    (broker, es, consumer)
}

/// A broker that blocks publishers (its memory or disk alarm) stops reading from their
/// connections, so a publish there waits until the alarm clears. The publisher must keep
/// draining its queue into the spool meanwhile, and once the alarm clears every event must
/// reach the index exactly once.
#[tokio::test]
async fn a_broker_that_blocks_publishers_loses_nothing_and_leaves_spool_writes_to_the_publisher() {
    let (broker, es, _consumer) = broker_and_consumer().await;
    let spool = tempfile::tempdir().unwrap();
    let (sink, running) = start_small_queue_publisher(broker.url(), &spool);
    let stats = sink.stats();

    let before = 100;
    for id in 0..before {
        sink.emit(synthetic_event(id));
    }
    eventually(
        "events published before the alarm",
        Duration::from_secs(30),
        || async { stats.published.load(Ordering::Relaxed) == before as u64 },
    )
    .await;

    broker.block_publishers().await;
    let during = before + 1000;
    emit_paced(&sink, before..during).await;
    assert!(
        stats.published.load(Ordering::Relaxed) < during as u64,
        "the broker took every event despite its alarm; the test proves nothing"
    );
    // An alarm may last minutes: events must not wait in memory for it (they would die with
    // the process), even when they are too few to fill the queue.
    let spooled = stats.spooled.load(Ordering::Relaxed);
    let total = during + 10;
    for id in during..total {
        sink.emit(synthetic_event(id));
    }
    eventually(
        "the last 10 events spooled during the alarm",
        Duration::from_secs(5),
        || async { stats.spooled.load(Ordering::Relaxed) >= spooled + 10 },
    )
    .await;
    broker.unblock_publishers().await;

    assert!(
        stats.spooled.load(Ordering::Relaxed) > 0,
        "nothing was spooled during the alarm"
    );
    every_event_indexed_once_none_spooled_by_a_request(&es, stats, total).await;
    running.shutdown(Duration::from_secs(10)).await;
}

/// While a spool is being replayed the broker may start blocking publishers too (a backlog
/// is when memory runs short). The replay must hold only itself: new events still reach the
/// spool by the publisher's hand, and every event arrives once the alarm clears. Spooled
/// segments outlive the process, so the spool is filled before the publisher starts, and the
/// alarm is raised before it connects: its first publish is the replay's.
#[tokio::test]
async fn a_broker_that_blocks_a_replay_loses_nothing_and_leaves_spool_writes_to_the_publisher() {
    let (broker, es, _consumer) = broker_and_consumer().await;
    let spool = tempfile::tempdir().unwrap();
    let spooled_earlier = 3000;
    spool_synthetic(spool.path(), 0..spooled_earlier);

    broker.block_publishers().await;
    let (sink, running) = start_small_queue_publisher(broker.url(), &spool);
    let total = spooled_earlier + 1000;
    emit_paced(&sink, spooled_earlier..total).await;
    let stats = sink.stats();
    assert!(
        stats.published.load(Ordering::Relaxed) < total as u64,
        "the broker took every event despite its alarm; the test proves nothing"
    );
    broker.unblock_publishers().await;

    every_event_indexed_once_none_spooled_by_a_request(&es, stats, total).await;
    running.shutdown(Duration::from_secs(10)).await;
}

/// A spool segment that cannot be read (here a directory where the oldest segment file should
/// be; in life a failing disk or wrong permissions) is the disk's fault, not the broker's: the
/// publisher keeps publishing new events, replays the segments spooled after the bad one, and
/// leaves the bad one for the operator.
#[tokio::test]
async fn an_unreadable_spool_segment_holds_back_neither_new_nor_later_spooled_events() {
    let broker = RabbitMq::start().await;
    let spool = tempfile::tempdir().unwrap();
    let unreadable = spool.path().join("segment-0000000000000000.jsonl");
    std::fs::create_dir(&unreadable).unwrap();
    std::fs::write(unreadable.join("not-events"), [b'x'; 4096]).unwrap();
    let spooled_after_it = 100;
    spool_synthetic(spool.path(), 0..spooled_after_it);

    // A queue that holds every new event while the link is being set up: what this test
    // counts is publishing, not the spooling the publisher rightly does when the broker is
    // slow to accept a connection (the other tests cover that).
    let settings = PublisherSettings {
        queue_capacity: 1_000,
        ..small_queue_settings(broker.url(), &spool)
    };
    let (sink, running) = start_publisher(settings);
    let stats = sink.stats();
    eventually(
        "the events spooled after the unreadable segment replayed",
        Duration::from_secs(60),
        || async { stats.published.load(Ordering::Relaxed) == spooled_after_it as u64 },
    )
    .await;
    let total = spooled_after_it + 300;
    emit_paced(&sink, spooled_after_it..total).await;
    eventually(
        "every new event published",
        Duration::from_secs(20),
        || async { stats.published.load(Ordering::Relaxed) == total as u64 },
    )
    .await;
    assert_eq!(
        stats.spooled.load(Ordering::Relaxed),
        0,
        "new events were spooled: the publisher took the disk error for a lost broker"
    );
    assert_eq!(
        spool_files(spool.path()),
        [unreadable],
        "only the bad segment is left, for the operator"
    );
    running.shutdown(Duration::from_secs(10)).await;
}

/// A segment whose events the broker confirmed but which cannot be deleted (a failing disk;
/// here its directory refuses deletes) is set aside and replayed again later. Its events
/// count as published once, when the segment is gone, not at each replay: the counter must
/// never run past what was spooled.
#[tokio::test]
async fn a_segment_replayed_twice_counts_its_events_once() {
    let broker = RabbitMq::start().await;
    // In the build folder, not /tmp: tmpfs (a common /tmp) has no immutable flag.
    let spool = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let spooled = 100;
    spool_synthetic(spool.path(), 0..spooled);
    let (sink, publisher) = Publisher::prepare(small_queue_settings(broker.url(), &spool)).unwrap();
    let deletes_refused = DeletesRefused::in_dir(spool.path());
    let running = RunningPublisher::spawn(publisher);
    let stats = sink.stats();

    // A second copy of the segment's one message means the first delete was tried and
    // failed: replay goes one segment at a time, and deletes after the broker confirmed.
    eventually(
        "the segment sent again after its delete failed",
        Duration::from_secs(90),
        || async { broker.depth("goms.trace").await.is_some_and(|n| n >= 2) },
    )
    .await;
    assert_eq!(
        stats.published.load(Ordering::Relaxed),
        0,
        "counted as published while the segment is still in the spool"
    );
    drop(deletes_refused);
    eventually(
        "the segment deleted and its events counted",
        Duration::from_secs(90),
        || async {
            spool_files(spool.path()).is_empty()
                && stats.published.load(Ordering::Relaxed) >= spooled as u64
        },
    )
    .await;
    assert_eq!(
        stats.published.load(Ordering::Relaxed),
        spooled as u64,
        "events replayed more than once were counted more than once"
    );
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    running.shutdown(Duration::from_secs(10)).await;
}

/// The spool's files in `dir`, without the journal and the lock the publisher keeps beside them.
fn spool_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| !path.ends_with("queue.journal") && !path.ends_with("owner.lock"))
        .collect()
}

/// Writes synthetic events into the spool folder `dir`, as a publisher that found the broker
/// away would have; they outlive it, and the next publisher replays them.
fn spool_synthetic(dir: &std::path::Path, ids: std::ops::Range<usize>) {
    let events: Vec<_> = ids.map(synthetic_event).collect();
    Spool::open(dir, 1 << 30)
        .unwrap()
        .append(&[EncodedEvents::from_events(&events)])
        .unwrap();
}

/// Makes a directory refuse deletes until dropped: the immutable flag for root, who may
/// delete from a read-only directory, and a read-only mode for anyone else.
struct DeletesRefused<'a> {
    dir: &'a std::path::Path,
    as_root: bool,
}

impl<'a> DeletesRefused<'a> {
    fn in_dir(dir: &'a std::path::Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let as_root = std::fs::metadata(dir).unwrap().uid() == 0;
        let refusing = DeletesRefused { dir, as_root };
        refusing.set(true);
        refusing
    }

    fn set(&self, refuse: bool) {
        if self.as_root {
            let flag = if refuse { "+i" } else { "-i" };
            let status = std::process::Command::new("chattr")
                .arg(flag)
                .arg(self.dir)
                .status()
                .expect("chattr (Debian package e2fsprogs) runs");
            assert!(status.success(), "chattr {flag} {:?} failed", self.dir);
        } else {
            use std::os::unix::fs::PermissionsExt;
            let mode = if refuse { 0o555 } else { 0o755 };
            std::fs::set_permissions(self.dir, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
}

impl Drop for DeletesRefused<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Waits until `total` events are in the index, then checks that none is there twice, that
/// the publisher (not a request) wrote whatever was spooled, and that nothing was dropped.
async fn every_event_indexed_once_none_spooled_by_a_request(
    es: &EsStandIn,
    stats: &PublisherStats,
    total: usize,
) {
    indexed_exactly(es, total).await;
    assert_eq!(
        stats.overflowed.load(Ordering::Relaxed),
        0,
        "the request path wrote the spool"
    );
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
}

/// Starts a publisher whose in-memory queue holds 100 entries, so that [`emit_paced`]
/// overflows it tenfold unless the publisher keeps draining it.
fn start_small_queue_publisher(
    amqp_url: String,
    spool: &tempfile::TempDir,
) -> (TraceSink, RunningPublisher) {
    start_publisher(small_queue_settings(amqp_url, spool))
}

fn small_queue_settings(amqp_url: String, spool: &tempfile::TempDir) -> PublisherSettings {
    PublisherSettings {
        brokers: goms::trace::amqp::Brokers::parse(&amqp_url),
        queue: "goms.trace".into(),
        queue_type: Default::default(),
        queue_capacity: 100,
        buffer_max_bytes: 8 * 1024 * 1024,
        publish_interval: Duration::from_millis(20),
        compression: TraceCompression::Lz4,
        spool_dir: spool.path().to_path_buf(),
        spool_max_bytes: 1 << 30,
        journal: true,
        adopt_orphans: false,
    }
}

fn start_publisher(settings: PublisherSettings) -> (TraceSink, RunningPublisher) {
    let (sink, publisher) = Publisher::prepare(settings).unwrap();
    (sink, RunningPublisher::spawn(publisher))
}

/// Emits synthetic events at a gateway's pace, 20 every 60 ms (1,000 take about 3 s): the
/// publisher gets many chances to fall behind, and every emit is a request path's.
async fn emit_paced(sink: &TraceSink, ids: std::ops::Range<usize>) {
    for id in ids {
        sink.emit(synthetic_event(id));
        if id % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
}

/// One event per message, as any JSON publisher would send them.
async fn publish_synthetic(broker: &RabbitMq, count: usize) {
    publish(
        broker,
        (0..count).map(|i| serde_json::to_vec(&synthetic_event(i)).unwrap()),
    )
    .await;
}

/// Several events per message, as goms's publisher sends them, compressed or not.
async fn publish_synthetic_batched(
    broker: &RabbitMq,
    compression: TraceCompression,
    ids: std::ops::Range<usize>,
) {
    let units: Vec<EncodedEvents> = ids
        .map(|id| EncodedEvents::from_events([&synthetic_event(id)]))
        .collect();
    let messages = framing::encode(&units)
        .into_iter()
        .map(|lines| framing::compress(compression, lines).into_owned());
    publish_encoded(broker, framing::content_encoding(compression), messages).await;
}

#[tokio::test]
async fn a_failing_sink_gets_every_event_exactly_once_and_garbage_is_dead_lettered() {
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let total = 1202;
    publish_synthetic_batched(&broker, TraceCompression::None, 0..600).await;
    publish_synthetic_batched(&broker, TraceCompression::Lz4, 600..1200).await;
    // Two whole bad messages, and one whose bad middle line must not hold back its two events.
    let mut mixed = serde_json::to_vec(&synthetic_event(1200)).unwrap();
    mixed.extend_from_slice(b"\n{\"no\":\"eventId\"}\n");
    mixed.extend_from_slice(&serde_json::to_vec(&synthetic_event(1201)).unwrap());
    publish(
        &broker,
        [
            b"not json at all".to_vec(),
            br#"{"no":"eventId"}"#.to_vec(),
            mixed,
        ],
    )
    .await;
    // Bodies that cannot be decoded are dead-lettered whole, as they came.
    publish_encoded(&broker, Some("lz4"), [b"\x20\0\0\0not lz4 at all".to_vec()]).await;
    publish_encoded(
        &broker,
        Some("br"),
        [serde_json::to_vec(&synthetic_event(9999)).unwrap()],
    )
    .await;
    es.inject(Faults {
        reject_requests: 3,
        reject_status: 503,
        flaky_requests: 4,
        item_429_every: 7,
        apply_then_fail: 1,
        ..Faults::default()
    });
    let mut consumer = consumer(
        "consumer",
        &broker,
        &es.url(),
        &[("GOMS__TRACE_CONSUMER__BATCH_SIZE", "200")],
    );

    indexed_exactly(&es, total).await;
    eventually("queue drained", Duration::from_secs(20), || async {
        broker.depth("goms.trace").await == Some(0)
    })
    .await;
    {
        let store = es.store.lock().unwrap();
        assert_eq!(store.documents.len(), total);
        assert!(
            store.creates.values().all(|count| *count == 1),
            "an event was created twice"
        );
        let ids: HashSet<&String> = store.documents.keys().map(|(_, id)| id).collect();
        assert_eq!(ids.len(), total);
        assert!(
            store.conflicts > 0,
            "the apply-then-fail bulk should have been retried into 409s"
        );
    }
    eventually(
        "the garbage and undecodable messages and the mixed message's bad line dead-lettered",
        Duration::from_secs(20),
        || async { broker.depth("goms.trace.dead").await == Some(5) },
    )
    .await;
    consumer.terminate(Duration::from_secs(10)).await;
    let output = consumer.output();
    assert!(output.contains("dead_lettered=5"), "{output}");
    assert!(output.contains("unknown content-encoding `br`"), "{output}");
    assert!(!output.contains("retried=0 "), "{output}");
}

#[tokio::test]
async fn three_consumers_share_the_queue() {
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let total = 3000;
    publish_synthetic(&broker, total).await;
    let small_batches = [
        ("GOMS__TRACE_CONSUMER__BATCH_SIZE", "50"),
        ("GOMS__TRACE_CONSUMER__PREFETCH", "100"),
    ];
    let mut consumers: Vec<Goms> = (0..3)
        .map(|n| consumer(&format!("consumer-{n}"), &broker, &es.url(), &small_batches))
        .collect();
    indexed_exactly(&es, total).await;
    let mut shares = Vec::new();
    for consumer in &mut consumers {
        consumer.terminate(Duration::from_secs(10)).await;
        let output = consumer.output();
        let indexed: usize = output
            .split("indexed=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no summary in {output}"));
        shares.push(indexed);
    }
    assert_eq!(shares.iter().sum::<usize>(), total, "{shares:?}");
    assert!(
        shares.iter().all(|share| *share > 0),
        "a consumer got nothing: {shares:?}"
    );
}

/// The same end-to-end path against a real Elasticsearch, where an image exists;
/// `scripts/test.sh` runs it when `GOMS_ES_IMAGE` names a local image.
#[tokio::test]
#[ignore = "needs GOMS_ES_IMAGE, an Elasticsearch image"]
async fn real_elasticsearch_end_to_end() {
    let image = std::env::var("GOMS_ES_IMAGE").expect(
        "GOMS_ES_IMAGE must name an Elasticsearch image, e.g. \
         docker.elastic.co/elasticsearch/elasticsearch:8.15.3",
    );
    let local = std::process::Command::new("docker")
        .args(["image", "inspect", &image])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        local,
        "GOMS_ES_IMAGE={image} is not an image on this machine"
    );
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{GenericImage, ImageExt};
    let (name, tag) = support::split_image(&image);
    let container = GenericImage::new(name, tag)
        .with_wait_for(WaitFor::message_on_stdout("started"))
        .with_exposed_port(9200.tcp())
        .with_env_var("discovery.type", "single-node")
        .with_env_var("xpack.security.enabled", "false")
        .with_env_var("ES_JAVA_OPTS", "-Xms512m -Xmx512m")
        .with_startup_timeout(Duration::from_secs(180))
        .start()
        .await
        .expect("Elasticsearch container");
    let es_url = format!(
        "http://127.0.0.1:{}",
        container.get_host_port_ipv4(9200).await.unwrap()
    );
    let etcd = Etcd::start().await;
    let broker = RabbitMq::start().await;
    let (_gateway, _service, port, _routes) = traced_stack(&etcd, &broker).await;
    let _consumer = consumer("consumer", &broker, &es_url, &[]);
    let response = http()
        .get(format!("http://127.0.0.1:{port}/api/user/login"))
        .header("X-Request-Id", "real-es-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let client = http();
    eventually(
        "four events in real Elasticsearch",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let url = format!("{es_url}/trace_logs*/_search");
            async move {
                let Ok(response) = client
                    .post(&url)
                    .json(&serde_json::json!({"query": {"term": {"requestId": "real-es-1"}}}))
                    .send()
                    .await
                else {
                    return false;
                };
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                body["hits"]["total"]["value"] == 4
            }
        },
    )
    .await;
}

#[test]
fn consumer_help_names_its_flags() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_goms"))
        .args(["trace-consumer", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("--amqp-addr") && text.contains("--es-addr"),
        "{text}"
    );
}

#[test]
fn kibana_saved_objects_are_importable_ndjson() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/kibana/trace_logs.ndjson"
    ))
    .unwrap();
    let objects: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["index-pattern", "search", "visualization"]);
    assert_eq!(objects[0]["attributes"]["title"], "trace_logs*");
    assert_eq!(objects[0]["attributes"]["timeFieldName"], "time");
    for object in &objects[1..] {
        let source = object["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"]
            .as_str()
            .unwrap();
        serde_json::from_str::<serde_json::Value>(source).unwrap();
        assert_eq!(object["references"][0]["id"], "goms-trace-logs");
    }
}

#[tokio::test]
async fn quorum_queues_can_be_chosen() {
    use goms::config::QueueType;
    let broker = RabbitMq::start().await;
    goms::trace::amqp::connect(&broker.url(), "quorum.trace", QueueType::Quorum)
        .await
        .expect("declare quorum queues");
    // The broker now holds a quorum queue: declaring it as classic is refused.
    assert!(
        goms::trace::amqp::connect(&broker.url(), "quorum.trace", QueueType::Classic)
            .await
            .is_err()
    );
}
