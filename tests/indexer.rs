//! The indexer (`goms trace-consumer`) against what Elasticsearch 8 refuses, and against an
//! Elasticsearch that is busy or away. RabbitMQ is a real container; Elasticsearch is the
//! stand-in of `support::es_standin`, which answers these cases as Elasticsearch does.

mod support;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use goms::trace::{Publisher, PublisherSettings, RunningPublisher, TraceSink};
use serde_json::Value;
use support::es_standin::{EsStandIn, Faults};
use support::trace_fixtures::{
    consumer, indexed_exactly, publish, synthetic_event, take_all, DeadLetter,
};
use support::{eventually, RabbitMq};

const DEAD: &str = "goms.trace.dead";

fn event_line(id: usize, change: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut event = serde_json::to_value(synthetic_event(id)).unwrap();
    change(&mut event);
    serde_json::to_vec(&event).unwrap()
}

/// One message holding `lines` as NDJSON, as goms's publisher batches events.
fn message(lines: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
    lines.into_iter().collect::<Vec<_>>().join(&b'\n')
}

fn good(ids: std::ops::Range<usize>) -> impl Iterator<Item = Vec<u8>> {
    ids.map(|id| event_line(id, |_| {}))
}

fn event_ids(letter: &DeadLetter) -> Vec<String> {
    letter
        .body
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let event: Value = serde_json::from_slice(line).unwrap();
            event["eventId"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test]
async fn refused_events_are_dead_lettered_with_their_reason_and_the_rest_indexed() {
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    // Bulks of more than 8 documents are too large, so every batch is split; one event
    // makes any bulk holding it unparseable, one has a field Elasticsearch cannot map, and
    // one has a `time` that names no index.
    es.inject(Faults {
        largest_bulk: Some(8),
        poison: Some("__poison__".into()),
        ..Faults::default()
    });
    let unmappable = event_line(900, |e| e["status"] = "two hundred".into());
    let poisoned = event_line(901, |e| e["request"]["url"] = "/api/user/__poison__".into());
    let undated = event_line(902, |e| e["time"] = "Tuesday, 27 Nov".into());
    let mut messages = vec![
        message(good(0..10).chain([unmappable]).chain(good(10..20))),
        message(good(20..30).chain([poisoned]).chain(good(30..40))),
        message([undated].into_iter().chain(good(40..45))),
    ];
    messages.extend((0..6).map(|m| message(good(100 + m * 10..110 + m * 10))));
    publish(&broker, messages).await;
    let mut consumer = consumer(
        "consumer",
        &broker,
        &es.url(),
        &[("GOMS__TRACE_CONSUMER__BATCH_SIZE", "200")],
    );

    indexed_exactly(&es, 105).await;
    eventually(
        "queue drained, three dead letters",
        Duration::from_secs(20),
        || async {
            broker.depth("goms.trace").await == Some(0) && broker.depth(DEAD).await == Some(3)
        },
    )
    .await;
    let mut letters = take_all(&broker, DEAD).await;
    letters.sort_by_key(event_ids);
    let found: Vec<(Vec<String>, &str)> = letters
        .iter()
        .map(|l| (event_ids(l), l.reason.as_str()))
        .collect();
    assert_eq!(found[0].0, ["synthetic-00900"], "{found:?}");
    assert!(
        found[0].1.contains("document_parsing_exception")
            && found[0].1.contains("failed to parse field [status]"),
        "{found:?}"
    );
    assert_eq!(found[1].0, ["synthetic-00901"], "{found:?}");
    assert!(
        found[1]
            .1
            .contains("answered 400: x_content_parse_exception"),
        "{found:?}"
    );
    assert_eq!(found[2].0, ["synthetic-00902"], "{found:?}");
    assert!(found[2].1.contains("YYYY-MM-DD"), "{found:?}");
    {
        let store = es.store.lock().unwrap();
        let refused: HashSet<_> = store.refused_bodies.iter().collect();
        assert_eq!(
            refused.len(),
            store.refused_bodies.len(),
            "a refused body was sent again unchanged"
        );
        assert!(store.creates.values().all(|count| *count == 1));
    }
    consumer.terminate(Duration::from_secs(10)).await;
    let output = consumer.output();
    assert!(output.contains("dead_lettered=3"), "{output}");
    assert!(!output.contains(" split=0"), "{output}");
}

#[tokio::test]
async fn a_refused_template_and_a_busy_elasticsearch_stop_no_event() {
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    es.inject(Faults {
        refuse_template: usize::MAX,
        reject_requests: 4,
        reject_status: 429,
        ..Faults::default()
    });
    publish(&broker, (0..50).map(|id| event_line(id, |_| {}))).await;
    let mut consumer = consumer("consumer", &broker, &es.url(), &[]);

    indexed_exactly(&es, 50).await;
    assert!(es.store.lock().unwrap().templates.is_empty());
    consumer
        .wait_for_line(
            "Elasticsearch refused the trace index template",
            Duration::from_secs(5),
        )
        .await;
    assert!(
        consumer.has_line("illegal_argument_exception: index template [trace_logs]"),
        "{}",
        consumer.output()
    );

    es.change(|faults| {
        faults.refuse_template = 0;
        faults.reject_requests = 3;
        faults.reject_status = 503;
    });
    publish(&broker, (50..100).map(|id| event_line(id, |_| {}))).await;
    indexed_exactly(&es, 100).await;
    consumer
        .wait_for_line(
            "Index template installed after being refused",
            Duration::from_secs(10),
        )
        .await;
    assert!(es
        .store
        .lock()
        .unwrap()
        .templates
        .contains_key("trace_logs"));
    consumer.terminate(Duration::from_secs(10)).await;
    let output = consumer.output();
    assert!(output.contains("dead_lettered=0"), "{output}");
    assert!(!output.contains("retried=0 "), "{output}");
}

/// `GOMS_ES_OUTAGE_SECS` (default 300, the five minutes the hardening issue names) sets the
/// outage's length.
#[tokio::test]
async fn a_long_elasticsearch_outage_under_steady_traffic_loses_nothing() {
    let outage = Duration::from_secs(
        std::env::var("GOMS_ES_OUTAGE_SECS")
            .ok()
            .and_then(|secs| secs.parse().ok())
            .unwrap_or(300),
    );
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let spool = tempfile::tempdir().unwrap();
    let (sink, publisher) = start_publisher(broker.url(), &spool);
    let mut consumer = consumer("consumer", &broker, &es.url(), &[]);

    let mut next = 0;
    emit_for(&sink, &mut next, Duration::from_secs(3)).await;
    indexed_exactly(&es, next).await;
    es.change(|faults| faults.outage = true);
    emit_for(&sink, &mut next, outage).await;
    let held = next - es.document_count();
    es.change(|faults| faults.outage = false);
    emit_for(&sink, &mut next, Duration::from_secs(3)).await;

    indexed_exactly(&es, next).await;
    assert_eq!(sink.stats().dropped.load(Ordering::Relaxed), 0);
    publisher.shutdown(Duration::from_secs(10)).await;
    assert!(es.store.lock().unwrap().creates.values().all(|n| *n == 1));
    assert!(held > 0, "the outage held back no event");
    consumer.terminate(Duration::from_secs(10)).await;
    let output = consumer.output();
    assert!(output.contains("dead_lettered=0"), "{output}");
    // A repeating failure is logged once, then once a minute with its count.
    let warnings = output.matches("Elasticsearch unavailable").count() as u64;
    assert!(
        warnings >= 1 && warnings <= outage.as_secs() / 60 + 2,
        "{warnings} warnings over {outage:?}:\n{output}"
    );
    assert!(
        output.contains("cluster_block_exception"),
        "the warning names Elasticsearch's reason:\n{output}"
    );
}

fn start_publisher(amqp_url: String, spool: &tempfile::TempDir) -> (TraceSink, RunningPublisher) {
    let settings = PublisherSettings {
        brokers: goms::trace::amqp::Brokers::parse(&amqp_url),
        queue: "goms.trace".into(),
        queue_type: Default::default(),
        queue_capacity: 10_000,
        buffer_max_bytes: 64 * 1024 * 1024,
        publish_interval: Duration::from_millis(50),
        compression: Default::default(),
        spool_dir: spool.path().to_path_buf(),
        spool_max_bytes: 1 << 30,
        journal: true,
        adopt_orphans: false,
    };
    let (sink, publisher) = Publisher::prepare(settings).unwrap();
    (sink, RunningPublisher::spawn(publisher))
}

/// Emits 20 events a second for `length`, numbering them from `next`.
async fn emit_for(sink: &TraceSink, next: &mut usize, length: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let end = tokio::time::Instant::now() + length;
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        sink.emit(synthetic_event(*next));
        *next += 1;
    }
}

#[tokio::test]
async fn an_unreachable_elasticsearch_reads_as_one_line() {
    let cases = [
        (
            "http://no-such-host.invalid:9200",
            "Elasticsearch http://no-such-host.invalid:9200: no such host",
        ),
        (
            "http://127.0.0.1:1",
            "Elasticsearch http://127.0.0.1:1: connection refused",
        ),
    ];
    for (address, expected) in cases {
        let mut consumer = support::Goms::spawn(
            "consumer",
            &["trace-consumer"],
            &[
                ("GOMS__ES_ADDR", address),
                ("GOMS__AMQP_ADDR", "amqp://127.0.0.1:1/%2f"),
            ],
        );
        consumer
            .wait_for_line(expected, Duration::from_secs(20))
            .await;
        let output = consumer.output();
        let line = output.lines().find(|l| l.contains(expected)).unwrap();
        assert!(line.len() < 400, "not one short line: {line}");
        assert!(!line.contains("error sending request"), "{line}");
        consumer.terminate(Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn a_consumer_exits_promptly_on_sigterm_and_leaves_held_events_in_the_queue() {
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    es.inject(Faults {
        outage: true,
        ..Faults::default()
    });
    publish(&broker, (0..20).map(|id| event_line(id, |_| {}))).await;
    let mut holding = consumer("consumer", &broker, &es.url(), &[]);
    eventually(
        "the consumer holds a batch it cannot index",
        Duration::from_secs(20),
        || async { es.store.lock().unwrap().outage_answers > 0 },
    )
    .await;
    let started = std::time::Instant::now();
    let status = holding.terminate(Duration::from_secs(5)).await;
    eprintln!(
        "consumer holding a batch exited {:?} after SIGTERM",
        started.elapsed()
    );
    assert!(status.success(), "{status:?}");
    eventually(
        "the held events are back in the queue",
        Duration::from_secs(10),
        || async { broker.depth("goms.trace").await == Some(20) },
    )
    .await;

    es.change(|faults| faults.outage = false);
    let mut idle = consumer("consumer", &broker, &es.url(), &[]);
    indexed_exactly(&es, 20).await;
    let started = std::time::Instant::now();
    let status = idle.terminate(Duration::from_secs(5)).await;
    eprintln!("idle consumer exited {:?} after SIGTERM", started.elapsed());
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
