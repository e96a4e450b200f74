//! CPU cost of tracing one gateway request, without sockets or a broker: writing its
//! `request.start` and `request.end` events as JSON into the trace queue (done on the proxy
//! thread, in `logging`), cutting the queue into messages and compressing those with LZ4
//! (done by the publisher task).
//! Prints nanoseconds per request; asserts nothing. Run with `cargo run --release --example trace_event_cost [N]`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use goms::gateway::record::{Attempt, RequestRecord};
use goms::gateway::trace_events::GatewayTracer;
use goms::trace::framing::{self, TraceCompression};
use goms::trace::testing::{EventQueue, Journal};
use goms::trace::{request_id_or_new, BodyCapture, Redactor, TraceContext};
use pingora::http::RequestHeader;

/// A request like the benchmark's, with the headers a browser or SDK adds.
fn request() -> RequestHeader {
    let mut header = RequestHeader::build("POST", b"/api/user/login?a=1&b=3", None).unwrap();
    for (name, value) in [
        ("host", "gateway.example:8080"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) goms-bench"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("content-length", "27"),
        ("authorization", "Bearer secret-token"),
        ("x-request-id", "5b1d6f0e-3c1a-4f7e-9a55-0f5b2d8f7e11"),
    ] {
        header.insert_header(name, value).unwrap();
    }
    header
}

/// A request's record with fresh ids, as each request has.
fn fresh_record() -> RequestRecord {
    let trace = TraceContext::continue_or_start(None);
    let mut record = RequestRecord::new(request_id_or_new(None), trace);
    record.attempts.push(Attempt {
        node_id: Arc::from("127.0.0.1:9080"),
        upstream: Arc::from("127.0.0.1:9080"),
        started: Instant::now(),
        finished: Some(Instant::now()),
        connected: None,
        status: Some(200),
        error: None,
    });
    record
}

fn per_request(elapsed: Duration, n: usize) -> f64 {
    elapsed.as_nanos() as f64 / n as f64
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let tracer = GatewayTracer {
        node_id: "127.0.0.1:8080".into(),
        project_name: "goms".into(),
        redactor: Redactor::new(&[], 4096),
    };
    let header = request();
    let record = fresh_record();
    let body = BodyCapture {
        bytes: br#"{"user":"ada","pass":"x"}"#.to_vec(),
        truncated: false,
    };

    // The proxy thread writes both events into the trace queue; the publisher takes what
    // gathered at each interval (here every 256 requests, what a 200 ms poll collects at
    // about 1,300 req/s) and hands the buffers back once the broker confirmed them. Measured
    // without and with the journal's copy (`trace.journal`, in a temporary folder).
    const BATCH: usize = 256;
    let fill = |queue: &EventQueue| {
        let started = Instant::now();
        for sent in 1..=n {
            let written = queue.push(GatewayTracer::EVENTS_PER_REQUEST, |lines| {
                tracer.write(lines, &header, "10.0.0.7", &body, &record, 200)
            });
            black_box(written.is_ok());
            if sent % BATCH == 0 {
                queue.recycle(queue.take_all());
            }
        }
        per_request(started.elapsed(), n)
    };
    let journal_dir = tempfile::tempdir().expect("a temporary folder");
    let (journal, _) = Journal::open(journal_dir.path(), 128, Arc::default())
        .expect("a journal in a temporary folder");
    let with_journal = fill(&EventQueue::new(usize::MAX, Some(journal)));
    let queue = EventQueue::new(usize::MAX, None);
    let build = fill(&queue);

    // Each request of the batch has its own ids, as in life: LZ4 finds fewer repeats in
    // them than in one request written again and again (here 1.4 times the time and twice
    // the compressed bytes).
    queue.recycle(queue.take_all());
    for _ in 0..BATCH {
        let fresh = fresh_record();
        let _ = queue.push(GatewayTracer::EVENTS_PER_REQUEST, |lines| {
            tracer.write(lines, &header, "10.0.0.7", &body, &fresh, 200)
        });
    }
    let batch = queue.take_all();
    let rounds = (n / BATCH).max(1);
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..rounds {
        bytes = black_box(framing::encode(&batch))
            .iter()
            .map(|message| message.len())
            .sum();
    }
    let serialise = per_request(started.elapsed(), rounds * BATCH);

    let messages = framing::encode(&batch);
    let encoder = framing::BodyEncoder::new(TraceCompression::Lz4);
    let started = Instant::now();
    let mut compressed = 0;
    for _ in 0..rounds {
        let bodies: Vec<_> = messages
            .iter()
            .map(|message| black_box(encoder.encode(message.clone())))
            .collect();
        compressed = bodies.iter().map(|body| body.as_bytes().len()).sum();
        encoder.recycle(bodies);
    }
    let compress = per_request(started.elapsed(), rounds * BATCH);

    println!("trace cost per gateway request ({n} requests, release build, one thread)");
    println!(
        "  write request.start + request.end into the queue   {build:>8.0} ns  (proxy thread)"
    );
    println!(
        "  the same, with the journal's copy                  {with_journal:>8.0} ns  (proxy thread)"
    );
    println!("  cut the queue's units into messages                {serialise:>8.0} ns  (publisher task)");
    println!(
        "  compress the messages with LZ4                     {compress:>8.0} ns  (publisher task)"
    );
    println!(
        "  bytes per request, plain / LZ4                     {:>8} / {}",
        bytes / BATCH,
        compressed / BATCH
    );
}
