//! `goms trace-consumer`: moves trace events from the durable queue into daily Elasticsearch
//! indices. Run as many as you like; they share the queue as competing consumers.
//!
//! A message carries one or more events (see [`framing`]). It is acknowledged only after
//! Elasticsearch accepted every one of its documents (created, or already there from an
//! earlier delivery). Events that failed are retried with backoff while their messages stay
//! unacknowledged, so an Elasticsearch outage parks events in RabbitMQ instead of losing
//! them. A line that is not a trace event, or that Elasticsearch refuses, goes to the
//! dead-letter queue, and so does a message whose body cannot be decompressed.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::watch;
use tracing::{info, warn};

use super::elasticsearch::{BulkItem, ItemOutcome, SinkError, TraceIndex};
use super::settings::ConsumerSettings;
use crate::trace::framing::{self, DecodeError};
use crate::trace::{amqp, daily_index};

#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub indexed: AtomicU64,
    pub already_indexed: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl ConsumerStats {
    pub fn summary(&self) -> String {
        format!(
            "indexed={} already_indexed={} retried={} dead_lettered={}",
            self.indexed.load(Ordering::Relaxed),
            self.already_indexed.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.dead_lettered.load(Ordering::Relaxed)
        )
    }
}

/// Why a consume session ended.
enum SessionEnd {
    Stopped,
    BrokerLost(String),
}

/// A delivery and its body as NDJSON lines.
struct Received {
    delivery: Delivery,
    body: Body,
}

enum Body {
    /// Plain NDJSON, read in place.
    Plain,
    /// The lines of a compressed body.
    Decompressed(Vec<u8>),
    /// Why the body could not be decoded: such a message is dead-lettered whole, as it came.
    Undecodable(DecodeError),
}

impl Received {
    fn new(delivery: Delivery) -> Self {
        let encoding = delivery.properties.content_encoding().as_ref();
        let body = match framing::decode(encoding.map(|e| e.as_str()), &delivery.data) {
            Ok(Cow::Borrowed(_)) => Body::Plain,
            Ok(Cow::Owned(lines)) => Body::Decompressed(lines),
            Err(error) => Body::Undecodable(error),
        };
        Received { delivery, body }
    }

    /// The body's NDJSON lines; none for an undecodable body.
    fn lines(&self) -> &[u8] {
        match &self.body {
            Body::Plain => &self.delivery.data,
            Body::Decompressed(lines) => lines,
            Body::Undecodable(_) => &[],
        }
    }

    fn event_count(&self) -> usize {
        framing::event_count(self.lines())
    }
}

/// A delivered message and what became of its events so far.
struct Message {
    received: Received,
    /// Events not yet settled (indexed, already there, or refused).
    unsettled: usize,
    /// Events it carried, for telling "all refused" from "some refused".
    events: usize,
    /// Lines that are not trace events or that Elasticsearch refused.
    dead: Vec<std::ops::Range<usize>>,
}

/// One event waiting for Elasticsearch: a line of `messages[message]`.
struct Pending {
    message: usize,
    line: std::ops::Range<usize>,
    event_id: String,
    index: String,
}

fn backoff(attempt: u32, max: Duration) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(10))).min(max)
}

/// Runs until `shutdown` flips; reconnects to RabbitMQ and waits for Elasticsearch as needed.
pub async fn run(
    settings: ConsumerSettings,
    stats: &ConsumerStats,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SinkError> {
    let index = TraceIndex::new(&settings.es_addr, &settings.index_prefix)?;
    let mut attempt = 0;
    while let Err(error) = index.ensure_template().await {
        attempt += 1;
        warn!(message = "Cannot install the trace index template yet; retrying.", %error, attempts = attempt);
        if sleep_or_stop(backoff(attempt, settings.max_backoff), &mut shutdown).await {
            return Ok(());
        }
    }
    info!(message = "Index template installed.", template = %settings.index_prefix);
    let mut failures = 0;
    loop {
        let link = match amqp::connect(&settings.amqp_url, &settings.queue, settings.queue_type)
            .await
        {
            Ok(link) => link,
            Err(error) => {
                failures += 1;
                if failures == 1 || failures % 30 == 0 {
                    warn!(message = "Trace broker unavailable; retrying.", %error, attempts = failures);
                }
                if sleep_or_stop(backoff(failures, Duration::from_secs(3)), &mut shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        failures = 0;
        match consume(&link, &index, &settings, stats, &mut shutdown).await {
            SessionEnd::Stopped => {
                let _ = link.connection.close(200, "shutting down".into()).await;
                return Ok(());
            }
            SessionEnd::BrokerLost(reason) => {
                warn!(message = "Trace broker connection lost; reconnecting.", %reason);
            }
        }
    }
}

async fn consume(
    link: &amqp::Link,
    index: &TraceIndex,
    settings: &ConsumerSettings,
    stats: &ConsumerStats,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let lost = |e: lapin::Error| SessionEnd::BrokerLost(e.to_string());
    if let Err(error) = link
        .channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await
    {
        return lost(error);
    }
    let tag = format!("goms-trace-consumer-{}", uuid::Uuid::new_v4().simple());
    let mut deliveries = match link
        .channel
        .basic_consume(
            settings.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Ok(consumer) => consumer,
        Err(error) => return lost(error),
    };
    info!(
        "[amqp] trace consumer is running (queue {})",
        settings.queue
    );
    loop {
        let batch = match next_batch(&mut deliveries, settings, shutdown).await {
            Ok(Some(batch)) => batch,
            Ok(None) => return SessionEnd::Stopped,
            Err(reason) => return SessionEnd::BrokerLost(reason),
        };
        if let Err(end) = index_batch(batch, link, index, settings, stats, shutdown).await {
            return end;
        }
    }
}

/// Waits for a first message, then collects messages until they hold `batch_size` events or
/// `batch_wait` passed.
async fn next_batch(
    deliveries: &mut lapin::Consumer,
    settings: &ConsumerSettings,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Vec<Received>>, String> {
    let first = tokio::select! {
        next = deliveries.next() => next,
        _ = shutdown.changed() => return Ok(None),
    };
    let mut batch = match first {
        Some(Ok(delivery)) => vec![Received::new(delivery)],
        Some(Err(error)) => return Err(error.to_string()),
        None => return Err("consumer stream ended".into()),
    };
    let mut events = batch[0].event_count();
    let deadline = Instant::now() + settings.batch_wait;
    // With `prefetch` messages unacknowledged the broker sends no more: waiting would only stall.
    while events < settings.batch_size && batch.len() < usize::from(settings.prefetch) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, deliveries.next()).await {
            Ok(Some(Ok(delivery))) => {
                let received = Received::new(delivery);
                events += received.event_count();
                batch.push(received);
            }
            Ok(Some(Err(error))) => return Err(error.to_string()),
            Ok(None) => return Err("consumer stream ended".into()),
            Err(_) => break,
        }
    }
    Ok(Some(batch))
}

/// Indexes a batch, retrying failed events until every message is acked or dead-lettered.
async fn index_batch(
    batch: Vec<Received>,
    link: &amqp::Link,
    index: &TraceIndex,
    settings: &ConsumerSettings,
    stats: &ConsumerStats,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionEnd> {
    let broker = |e: lapin::Error| SessionEnd::BrokerLost(e.to_string());
    let (mut messages, mut pending) = split_events(batch, &settings.index_prefix, stats);
    let mut attempt = 0;
    loop {
        if !pending.is_empty() {
            let items: Vec<BulkItem> = pending
                .iter()
                .map(|p| BulkItem {
                    index: &p.index,
                    id: &p.event_id,
                    source: &messages[p.message]
                        .as_ref()
                        .expect("unsettled")
                        .received
                        .lines()[p.line.clone()],
                })
                .collect();
            match index.bulk(&items).await {
                Ok(outcomes) => pending = record_outcomes(pending, outcomes, &mut messages, stats),
                Err(error) => {
                    if attempt == 0 || attempt % 10 == 0 {
                        warn!(message = "Elasticsearch unavailable; events stay unacknowledged in the queue.", %error, events = pending.len());
                    }
                }
            }
        }
        finish_settled(&mut messages, link, &settings.queue)
            .await
            .map_err(SessionEnd::BrokerLost)?;
        if pending.is_empty() {
            return Ok(());
        }
        attempt += 1;
        stats
            .retried
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        if sleep_or_stop(backoff(attempt, settings.max_backoff), shutdown).await {
            for message in messages.into_iter().flatten() {
                let requeue = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                message
                    .received
                    .delivery
                    .nack(requeue)
                    .await
                    .map_err(broker)?;
            }
            return Err(SessionEnd::Stopped);
        }
    }
}

/// Splits every message into its events; lines that are not trace events are marked dead.
fn split_events(
    batch: Vec<Received>,
    prefix: &str,
    stats: &ConsumerStats,
) -> (Vec<Option<Message>>, Vec<Pending>) {
    let mut messages = Vec::with_capacity(batch.len());
    let mut pending = Vec::new();
    for received in batch {
        let number = messages.len();
        let lines = match &received.body {
            Body::Undecodable(reason) => {
                warn!(message = "Trace message cannot be decoded; dead-lettered.", %reason, bytes = received.delivery.data.len());
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                Lines::default()
            }
            _ => {
                let lines = split_lines(received.lines(), number, prefix, stats, &mut pending);
                if lines.events == 0 {
                    warn!(message = "Empty trace message; dead-lettered.");
                    stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                lines
            }
        };
        messages.push(Some(Message {
            received,
            unsettled: lines.events - lines.dead.len(),
            events: lines.events,
            dead: lines.dead,
        }));
    }
    (messages, pending)
}

/// What [`split_lines`] found in one message's body.
#[derive(Default)]
struct Lines {
    events: usize,
    dead: Vec<std::ops::Range<usize>>,
}

/// Queues the trace events of message `number` in `pending`; returns how many lines it had
/// and which were not trace events.
fn split_lines(
    body: &[u8],
    number: usize,
    prefix: &str,
    stats: &ConsumerStats,
    pending: &mut Vec<Pending>,
) -> Lines {
    let mut lines = Lines::default();
    for line in framing::lines(body) {
        lines.events += 1;
        match identify(&body[line.clone()], prefix) {
            Ok((event_id, index)) => pending.push(Pending {
                message: number,
                line,
                event_id,
                index,
            }),
            Err(reason) => {
                warn!(message = "Not a trace event; dead-lettered.", %reason, bytes = line.len());
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                lines.dead.push(line);
            }
        }
    }
    lines
}

/// Books each outcome against its message; returns the events to retry.
fn record_outcomes(
    pending: Vec<Pending>,
    outcomes: Vec<ItemOutcome>,
    messages: &mut [Option<Message>],
    stats: &ConsumerStats,
) -> Vec<Pending> {
    let mut retry = Vec::new();
    for (item, outcome) in pending.into_iter().zip(outcomes) {
        let message = messages[item.message].as_mut().expect("unsettled");
        match outcome {
            ItemOutcome::Created => {
                stats.indexed.fetch_add(1, Ordering::Relaxed);
                message.unsettled -= 1;
            }
            ItemOutcome::AlreadyIndexed => {
                stats.already_indexed.fetch_add(1, Ordering::Relaxed);
                message.unsettled -= 1;
            }
            ItemOutcome::Retry(_) => retry.push(item),
            ItemOutcome::Rejected(reason) => {
                warn!(message = "Elasticsearch refused a trace event; dead-lettered.", event_id = %item.event_id, %reason);
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                message.unsettled -= 1;
                message.dead.push(item.line);
            }
        }
    }
    retry
}

/// Acks every message whose events are all settled. A message whose every event is dead is
/// rejected whole, so the dead-letter queue keeps it as it came; otherwise its dead lines
/// are published there (confirmed) before the message is acked.
async fn finish_settled(
    messages: &mut [Option<Message>],
    link: &amqp::Link,
    queue: &str,
) -> Result<(), String> {
    let text = |e: lapin::Error| e.to_string();
    for slot in messages.iter_mut() {
        if slot.as_ref().is_none_or(|m| m.unsettled > 0) {
            continue;
        }
        let message = slot.take().expect("checked above");
        if message.dead.len() == message.events {
            message
                .received
                .delivery
                .reject(BasicRejectOptions { requeue: false })
                .await
                .map_err(text)?;
            continue;
        }
        if !message.dead.is_empty() {
            let mut lines = Vec::new();
            for line in &message.dead {
                lines.extend_from_slice(&message.received.lines()[line.clone()]);
                lines.push(b'\n');
            }
            amqp::dead_letter(link, queue, &lines).await?;
        }
        message
            .received
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(text)?;
    }
    Ok(())
}

/// The `eventId` and daily index of a message, or why it is not a trace event.
fn identify(data: &[u8], prefix: &str) -> Result<(String, String), String> {
    let value: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| format!("not JSON: {e}"))?;
    let event_id = value["eventId"]
        .as_str()
        .filter(|id| !id.is_empty())
        .ok_or("no eventId")?;
    let time = value["time"].as_str().ok_or("no time")?;
    if time.len() < 10 {
        return Err(format!("time `{time}` is not a date"));
    }
    Ok((event_id.to_string(), daily_index(prefix, time)))
}

async fn sleep_or_stop(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::identify;

    #[test]
    fn identifies_trace_events_only() {
        let (id, index) = identify(
            br#"{"eventId":"e1","time":"2026-11-27T01:02:03.000Z"}"#,
            "trace_logs",
        )
        .unwrap();
        assert_eq!(
            (id.as_str(), index.as_str()),
            ("e1", "trace_logs-2026.11.27")
        );
        assert!(identify(b"garbage", "trace_logs").is_err());
        assert!(identify(br#"{"time":"2026-11-27T01:02:03.000Z"}"#, "trace_logs").is_err());
    }
}
