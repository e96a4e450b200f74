//! Throughput of the trace pipeline: publisher -> RabbitMQ -> trace consumer(s) -> the
//! Elasticsearch STAND-IN (tests/support/es_standin.rs; no Elasticsearch exists here).
//! Prints figures; asserts nothing. Run through `bench/trace-pipeline.sh`, which starts
//! RabbitMQ and sets GOMS_BENCH_AMQP.

#[path = "../tests/support/es_standin.rs"]
mod es_standin;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use goms::indexer::{self, ConsumerSettings, ConsumerStats};
use goms::trace::{
    EventKind, Publisher, PublisherSettings, RequestInfo, RunningPublisher, TraceEvent, TraceTiming,
};

fn event(n: usize) -> TraceEvent {
    TraceEvent {
        event_id: format!("bench-{n:08}-{}", uuid::Uuid::new_v4().simple()),
        request_id: format!("request-{}", n / 4),
        event: EventKind::RequestEnd,
        time: goms::config::now_rfc3339(),
        service_name: "gateway".into(),
        service_id: "127.0.0.1:8080".into(),
        project_name: "goms".into(),
        request: RequestInfo {
            method: "GET".into(),
            url: "/api/user/login".into(),
            url_param: "?a=1&b=3".into(),
            client_ip: "127.0.0.1".into(),
            headers: [("accept".to_string(), "*/*".to_string())].into(),
            body: serde_json::Value::Null,
            body_truncated: false,
        }
        .into(),
        trace: TraceTiming::default(),
        duration_ms: Some(1.25),
        status: Some(200),
        upstream: Some("127.0.0.1:9080".into()),
        attempt: Some(1),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        span_id: "00f067aa0ba902b7".into(),
        parent_span_id: None,
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

async fn publish(amqp: &str, queue: &str, events: usize, offset: usize) -> f64 {
    let spool = tempfile::tempdir().unwrap();
    let defaults = goms::config::TraceConfig::default();
    let (sink, publisher) = Publisher::prepare(PublisherSettings {
        brokers: goms::trace::amqp::Brokers::parse(amqp),
        queue: queue.to_string(),
        queue_type: Default::default(),
        queue_capacity: events,
        buffer_max_bytes: 64 * 1024 * 1024,
        publish_interval: defaults.publish_interval,
        compression: defaults.compression,
        spool_dir: spool.path().to_path_buf(),
        spool_max_bytes: 1 << 30,
        journal: true,
        adopt_orphans: false,
    })
    .unwrap();
    let running = RunningPublisher::spawn(publisher);
    let started = Instant::now();
    for n in 0..events {
        sink.emit(event(offset + n));
    }
    let stats = sink.stats();
    wait_until("events confirmed", Duration::from_secs(300), || {
        stats.published.load(Ordering::Relaxed) as usize >= events
    })
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        stats.spooled.load(Ordering::Relaxed),
        0,
        "the broker should have taken everything"
    );
    running.shutdown(Duration::from_secs(10)).await;
    events as f64 / elapsed.as_secs_f64()
}

async fn consume(
    amqp: &str,
    queue: &str,
    es: &es_standin::EsStandIn,
    consumers: usize,
    expected: usize,
) -> f64 {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let settings = ConsumerSettings {
            brokers: goms::trace::amqp::Brokers::parse(amqp),
            queue: queue.to_string(),
            queue_type: Default::default(),
            es_addr: es.url(),
            index_prefix: "trace_logs".into(),
            batch_size: 500,
            batch_wait: Duration::from_millis(50),
            prefetch: goms::config::TraceConsumerConfig::default().prefetch,
            max_backoff: Duration::from_secs(1),
        };
        let stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let stats = ConsumerStats::default();
            indexer::run(settings, &stats, stopped).await.unwrap();
        }));
    }
    wait_until("events indexed", Duration::from_secs(300), || {
        es.document_count() >= expected
    })
    .await;
    let elapsed = started.elapsed();
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    es.document_count() as f64 / elapsed.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let amqp = std::env::var("GOMS_BENCH_AMQP")
        .expect("set GOMS_BENCH_AMQP (bench/trace-pipeline.sh does)");
    let events: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    println!("trace pipeline, {events} events per run (Elasticsearch = in-process stand-in)");
    println!("{:<44} {:>12}", "stage", "events/s");
    let mut offset = 0;
    for consumers in [1usize, 3] {
        let queue = format!("goms.bench.{}", uuid::Uuid::new_v4().simple());
        let es = es_standin::EsStandIn::start().await;
        let published = publish(&amqp, &queue, events, offset).await;
        offset += events;
        println!(
            "{:<44} {:>12.0}",
            format!("publisher -> RabbitMQ (confirmed, run {consumers})"),
            published
        );
        let consumed = consume(&amqp, &queue, &es, consumers, events).await;
        println!(
            "{:<44} {:>12.0}",
            format!("RabbitMQ -> {consumers} consumer(s) -> stand-in"),
            consumed
        );
    }
}
