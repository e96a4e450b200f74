//! `goms trace-consumer`: moves trace events from the durable queue into daily Elasticsearch
//! indices. Run as many as you like; they share the queue as competing consumers.
//!
//! A message carries one or more events (see [`framing`]). It is acknowledged only after
//! Elasticsearch accepted every one of its documents (created, or already there from an
//! earlier delivery). Events that failed are retried with backoff while their messages stay
//! unacknowledged, so an Elasticsearch outage parks events in RabbitMQ instead of losing
//! them. A line that is not a trace event, or that Elasticsearch refuses, goes to the
//! dead-letter queue with the reason in its `x-goms-reason` header, and so does a message
//! whose body cannot be decompressed.
//!
//! How each answer of Elasticsearch is taken:
//! - an item refused (400 `document_parsing_exception`, a bad index name): that event is
//!   dead-lettered, the rest of its message acked;
//! - the whole request refused for what it holds (400, 413): the events are sent again in
//!   halves, down to single events, and an event refused alone is dead-lettered, so no
//!   body is ever retried unchanged;
//! - busy or away (429, 5xx, no answer): the same events again after a backoff;
//! - the index template refused: logged, installed again in the background with backoff,
//!   while events keep flowing.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use super::elasticsearch::{BulkItem, EsError, ItemOutcome, TraceIndex};
use super::settings::ConsumerSettings;
use crate::diagnostics::Repeats;
use crate::trace::amqp::Failover;
use crate::trace::framing::{self, DecodeError};
use crate::trace::{amqp, daily_index};

#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub indexed: AtomicU64,
    pub already_indexed: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Bulk requests refused whole and sent again in halves.
    pub split: AtomicU64,
}

impl ConsumerStats {
    pub fn summary(&self) -> String {
        format!(
            "indexed={} already_indexed={} retried={} dead_lettered={} split={}",
            self.indexed.load(Ordering::Relaxed),
            self.already_indexed.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.dead_lettered.load(Ordering::Relaxed),
            self.split.load(Ordering::Relaxed)
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
    dead: Vec<DeadLine>,
}

/// A line that will never be indexed, and why.
struct DeadLine {
    line: std::ops::Range<usize>,
    reason: String,
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
) -> Result<(), EsError> {
    let index = TraceIndex::new(&settings.es_addr, &settings.index_prefix)?;
    let (go_ahead, may_consume) = oneshot::channel();
    tokio::spawn(install_template(
        index.clone(),
        settings.max_backoff,
        shutdown.clone(),
        go_ahead,
    ));
    // The install task drops its end without a word when shutdown comes first.
    if may_consume.await.is_err() {
        return Ok(());
    }
    let mut failover = Failover::default();
    let mut broker_away = Repeats::default();
    loop {
        let Some(url) = failover.current(&settings.brokers).map(str::to_string) else {
            return Ok(());
        };
        let link = match amqp::connect(&url, &settings.queue, settings.queue_type).await {
            Ok(link) => link,
            Err(error) => {
                let wait = failover.failed(&settings.brokers);
                if let Some(repeats) = broker_away.occurred() {
                    warn!(message = "Trace broker unavailable; retrying.", %error, attempts = failover.failures(), repeats);
                }
                if sleep_or_stop(wait, &mut shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        if failover.failures() > 0 {
            info!(message = "Trace broker reachable again.", broker = %amqp::redact_url(&url), attempts = failover.failures());
        }
        failover.reached();
        broker_away.reset();
        match consume(&link, &index, &settings, stats, &mut shutdown).await {
            SessionEnd::Stopped => {
                let _ = link.connection.close(200, "shutting down".into()).await;
                return Ok(());
            }
            SessionEnd::BrokerLost(reason) => {
                warn!(message = "Trace broker connection lost; reconnecting.", broker = %amqp::redact_url(&url), %reason);
                // The next broker of `amqpAddr` is tried at once.
                failover.failed(&settings.brokers);
            }
        }
    }
}

/// Installs the index template, retrying with backoff until it is in or shutdown comes.
/// `may_consume` fires once consuming may start: when the template is in, so that the day's
/// index gets its mappings; or when Elasticsearch refuses it, since waiting would stop the
/// trace pipeline for a mapping (events are indexed without it meanwhile, and the install
/// goes on in the background). While Elasticsearch cannot be reached, it does not fire.
async fn install_template(
    index: TraceIndex,
    max_backoff: Duration,
    mut shutdown: watch::Receiver<bool>,
    may_consume: oneshot::Sender<()>,
) {
    let mut may_consume = Some(may_consume);
    let (mut away, mut refused) = (Repeats::default(), Repeats::default());
    for attempt in 1.. {
        match index.ensure_template().await {
            Ok(()) => {
                if may_consume.is_some() {
                    info!(message = "Index template installed.", template = %index.template_name(), attempts = attempt);
                } else {
                    info!(message = "Index template installed after being refused.", template = %index.template_name(), attempts = attempt);
                }
                if let Some(go) = may_consume.take() {
                    let _ = go.send(());
                }
                return;
            }
            Err(error) if error.is_refusal() => {
                if let Some(repeats) = refused.occurred() {
                    error!(message = "Elasticsearch refused the trace index template; events are indexed without it meanwhile, and it is installed again with backoff.", template = %index.template_name(), %error, attempts = attempt, repeats);
                }
                if let Some(go) = may_consume.take() {
                    let _ = go.send(());
                }
            }
            Err(error) => {
                if let Some(repeats) = away.occurred() {
                    warn!(message = "Cannot install the trace index template yet; retrying.", %error, attempts = attempt, repeats);
                }
            }
        }
        if sleep_or_stop(backoff(attempt, max_backoff), &mut shutdown).await {
            return;
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
    let mut away = Repeats::default();
    loop {
        pending = send(pending, index, &mut messages, stats, &mut away).await;
        finish_settled(&mut messages, link, &settings.queue)
            .await
            .map_err(SessionEnd::BrokerLost)?;
        if pending.is_empty() {
            if away.active() {
                info!(message = "Elasticsearch indexes again; the held events are in.");
            }
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

/// Sends `events` in one `_bulk`. A request refused whole for what it holds is sent again in
/// halves, down to single events; an event refused alone is dead-lettered. Returns the
/// events to send again after a backoff (Elasticsearch busy or away).
async fn send(
    events: Vec<Pending>,
    index: &TraceIndex,
    messages: &mut [Option<Message>],
    stats: &ConsumerStats,
    away: &mut Repeats,
) -> Vec<Pending> {
    let mut chunks = vec![events];
    let mut retry = Vec::new();
    while let Some(mut chunk) = chunks.pop() {
        if chunk.is_empty() {
            continue;
        }
        let answer = {
            let items = bulk_items(&chunk, messages);
            index.bulk(&items).await
        };
        match answer {
            Ok(outcomes) => retry.extend(record_outcomes(chunk, outcomes, messages, stats)),
            Err(error) if error.refuses_whole_request() && chunk.len() > 1 => {
                stats.split.fetch_add(1, Ordering::Relaxed);
                let second = chunk.split_off(chunk.len() / 2);
                chunks.push(second);
                chunks.push(chunk);
            }
            Err(error) if error.refuses_whole_request() => {
                let event = chunk.pop().expect("one event");
                let reason = error.to_string();
                dead_letter_event(event, reason, messages, stats);
            }
            Err(error) => {
                let held = chunk.len() + chunks.iter().map(Vec::len).sum::<usize>();
                if let Some(repeats) = away.occurred() {
                    warn!(message = "Elasticsearch unavailable; events stay unacknowledged in the queue.", %error, events = held, repeats);
                }
                retry.extend(chunk);
                retry.extend(chunks.drain(..).flatten());
            }
        }
    }
    retry
}

fn bulk_items<'a>(events: &'a [Pending], messages: &'a [Option<Message>]) -> Vec<BulkItem<'a>> {
    events
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
        .collect()
}

fn dead_letter_event(
    event: Pending,
    reason: String,
    messages: &mut [Option<Message>],
    stats: &ConsumerStats,
) {
    warn!(message = "Elasticsearch refused a trace event; dead-lettered.", event_id = %event.event_id, %reason);
    stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    let message = messages[event.message].as_mut().expect("unsettled");
    message.unsettled -= 1;
    message.dead.push(DeadLine {
        line: event.line,
        reason,
    });
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
                warn!(message = "Trace message cannot be decoded; dead-lettered as it came.", %reason, bytes = received.delivery.data.len());
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
    dead: Vec<DeadLine>,
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
                lines.dead.push(DeadLine {
                    line,
                    reason: format!("not a trace event: {reason}"),
                });
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
        let settled = match outcome {
            ItemOutcome::Created => &stats.indexed,
            ItemOutcome::AlreadyIndexed => &stats.already_indexed,
            ItemOutcome::Retry(_) => {
                retry.push(item);
                continue;
            }
            ItemOutcome::Rejected(reason) => {
                let reason = format!("Elasticsearch refused it: {reason}");
                dead_letter_event(item, reason, messages, stats);
                continue;
            }
        };
        settled.fetch_add(1, Ordering::Relaxed);
        messages[item.message]
            .as_mut()
            .expect("unsettled")
            .unsettled -= 1;
    }
    retry
}

/// Acks every message whose events are all settled, after its dead lines are on the
/// dead-letter queue (confirmed), one message per reason. A message of which nothing could
/// be indexed goes there whole, as it came (compressed bodies stay compressed).
async fn finish_settled(
    messages: &mut [Option<Message>],
    link: &amqp::Link,
    queue: &str,
) -> Result<(), String> {
    for slot in messages.iter_mut() {
        if slot.as_ref().is_none_or(|m| m.unsettled > 0) {
            continue;
        }
        let message = slot.take().expect("checked above");
        if message.dead.len() == message.events {
            let delivery = &message.received.delivery;
            let encoding = delivery.properties.content_encoding().as_ref();
            let letter = amqp::DeadLetter {
                payload: &delivery.data,
                reason: &message.whole_reason(),
                content_encoding: encoding.map(|e| e.as_str()),
            };
            amqp::dead_letter(link, queue, letter).await?;
        } else {
            for (reason, lines) in message.dead_by_reason() {
                let letter = amqp::DeadLetter {
                    payload: &lines,
                    reason,
                    content_encoding: None,
                };
                amqp::dead_letter(link, queue, letter).await?;
            }
        }
        message
            .received
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl Message {
    /// Why nothing of this message could be indexed.
    fn whole_reason(&self) -> String {
        if let Body::Undecodable(error) = &self.received.body {
            return format!("cannot decode the message: {error}");
        }
        if self.events == 0 {
            return "empty message".into();
        }
        let mut reasons: Vec<&str> = self.dead.iter().map(|d| d.reason.as_str()).collect();
        reasons.sort_unstable();
        reasons.dedup();
        reasons.join("; ")
    }

    /// The dead lines as NDJSON, grouped by reason.
    fn dead_by_reason(&self) -> std::collections::BTreeMap<&str, Vec<u8>> {
        let mut groups = std::collections::BTreeMap::<&str, Vec<u8>>::new();
        for dead in &self.dead {
            let lines = groups.entry(dead.reason.as_str()).or_default();
            lines.extend_from_slice(&self.received.lines()[dead.line.clone()]);
            lines.push(b'\n');
        }
        groups
    }
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
    if !starts_with_a_date(time) {
        // The day names the index; Elasticsearch refuses a name made of anything else.
        return Err(format!(
            "time `{time}` does not start with a YYYY-MM-DD date"
        ));
    }
    Ok((event_id.to_string(), daily_index(prefix, time)))
}

fn starts_with_a_date(time: &str) -> bool {
    let bytes = time.as_bytes();
    bytes.len() >= 10
        && bytes[..10].iter().enumerate().all(|(at, byte)| match at {
            4 | 7 => *byte == b'-',
            _ => byte.is_ascii_digit(),
        })
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
        let bad_day = br#"{"eventId":"e1","time":"Tuesday, 27 Nov"}"#;
        assert!(identify(bad_day, "trace_logs")
            .unwrap_err()
            .contains("YYYY-MM-DD"));
    }
}
