//! Gets trace events from the request path to RabbitMQ without blocking a request or losing
//! an event.
//!
//! Path: [`TraceSink::emit`] (non-blocking) -> bounded in-process [`EventQueue`] ->
//! publisher loop -> persistent messages of up to 1,024 events each ([`framing`]) with
//! publisher confirms.
//! The loop never waits for the broker: connection attempts, and each batch's publish and
//! confirms, run as tasks of their own, several batches in flight. While the broker is away
//! or blocks publishers, the loop writes events to the disk [`Spool`]; while a connection
//! attempt runs or too many batches await confirms, events wait in the queue until it is half
//! full, then go there too. The loop replays the spool when the broker takes publishes again
//! and deletes a segment only after every event in it was confirmed. Only a full spool drops
//! events, and every drop is counted and logged.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, PublisherConfirm};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::amqp::{self, Link};
use super::event::TraceEvent;
use super::framing::{self, BodyEncoder, EncodedEvents, TraceCompression};
use super::lock;
use super::queue::EventQueue;
use super::spool::{Spool, SpoolError, SpooledSegment, SET_ASIDE_FOR};
use crate::config::QueueType;

/// Most spooled events replayed as one batch: messages of up to 1,024 events whose confirms
/// are awaited together. The broker confirms persistent messages after writing them to disk,
/// some milliseconds; batches of 256 capped the publisher near 9,000 events/s.
const REPLAY_BATCH: usize = 2048;
/// Longest wait for one batch's confirms before the broker counts as away.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PublisherSettings {
    pub amqp_url: String,
    pub queue: String,
    pub queue_type: QueueType,
    pub queue_capacity: usize,
    /// How long events gather before a confirm round trip, unless the queue is already half
    /// full (`trace.publishInterval`). The broker's cost was per round trip (it writes and
    /// syncs the messages before it confirms them): publishing as soon as anything was queued
    /// meant ~500 rounds/s and about half a core of broker CPU at 13,000 requests/s. Going
    /// from 50 to 200 ms (the default) cut RabbitMQ's CPU per traced request from 7.1 to
    /// 5.1 µs uncompressed and from 4.1 to 2.0 µs with LZ4. The publisher polls the queue:
    /// only the request that fills it halfway wakes the publisher's thread.
    pub publish_interval: Duration,
    /// How message bodies are compressed (`trace.compression`; see [`framing`]).
    pub compression: TraceCompression,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
}

/// Counters exported at `/metrics` (`goms_trace_events_*_total`).
#[derive(Debug, Default)]
pub struct PublisherStats {
    pub emitted: AtomicU64,
    pub published: AtomicU64,
    pub spooled: AtomicU64,
    /// Of `spooled`: events the request path wrote to the spool itself because the
    /// in-process queue was full. The publisher keeps the queue drained even while the broker
    /// is away, so this stays 0 unless the publisher falls behind.
    pub overflowed: AtomicU64,
    pub dropped: AtomicU64,
}

/// The request path's handle: cheap to clone, never blocks on the broker.
#[derive(Clone)]
pub struct TraceSink {
    queue: Option<Arc<EventQueue>>,
    spool: Option<Arc<Mutex<Spool>>>,
    stats: Arc<PublisherStats>,
}

impl TraceSink {
    /// A sink that records nothing (tracing switched off).
    pub fn disabled() -> Self {
        TraceSink {
            queue: None,
            spool: None,
            stats: Arc::default(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.queue.is_some()
    }

    pub fn stats(&self) -> &PublisherStats {
        &self.stats
    }

    /// Hands an event to the publisher; see [`TraceSink::emit_with`].
    pub fn emit(&self, event: TraceEvent) {
        self.emit_with(1, |out| {
            serde_json::to_writer(&mut *out, &event).expect("trace events serialise");
            out.push(b'\n');
        });
    }

    /// Hands `count` events to the publisher, which `write` serialises as one JSON document
    /// per line, straight into the queue; they stay together up to Elasticsearch's `_bulk`.
    /// If the in-process queue is full, they go to the disk spool; only a full spool drops
    /// them.
    pub fn emit_with(&self, count: usize, write: impl FnOnce(&mut Vec<u8>)) {
        let Some(queue) = &self.queue else { return };
        self.stats
            .emitted
            .fetch_add(count as u64, Ordering::Relaxed);
        let Err(write) = queue.push(count, write) else {
            return;
        };
        if let Some(spool) = &self.spool {
            let mut events = EncodedEvents::default();
            events.append_with(count, write);
            self.stats
                .overflowed
                .fetch_add(count as u64, Ordering::Relaxed);
            spool_events(spool, &self.stats, &[events]);
        }
    }
}

/// The publisher loop, prepared but not yet running: [`Publisher::run`] drives it inside
/// whichever runtime the caller owns (pingora gives each service its own).
pub struct Publisher {
    settings: PublisherSettings,
    queue: Arc<EventQueue>,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<PublisherStats>,
}

impl Publisher {
    /// Opens the spool and the in-process queue; fails only if the spool folder is unusable.
    pub fn prepare(settings: PublisherSettings) -> Result<(TraceSink, Publisher), SpoolError> {
        let spool = Arc::new(Mutex::new(Spool::open(
            &settings.spool_dir,
            settings.spool_max_bytes,
        )?));
        let queue = Arc::new(EventQueue::new(settings.queue_capacity));
        let stats = Arc::new(PublisherStats::default());
        let sink = TraceSink {
            queue: Some(queue.clone()),
            spool: Some(spool.clone()),
            stats: stats.clone(),
        };
        let publisher = Publisher {
            settings,
            queue,
            spool,
            stats,
        };
        Ok((sink, publisher))
    }

    /// Publishes until `stopped` flips, then publishes or spools whatever is still queued.
    pub async fn run(self, stopped: watch::Receiver<bool>) {
        run(self.settings, self.queue, self.spool, self.stats, stopped).await;
        info!("Trace publisher stopped.");
    }
}

/// Runs a prepared publisher on the current runtime; stop it with the returned handle.
pub struct RunningPublisher {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningPublisher {
    pub fn spawn(publisher: Publisher) -> Self {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(publisher.run(stopped));
        RunningPublisher { stop, task }
    }

    /// Stops and waits (at most `timeout`) until queued events are published or spooled.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            warn!(
                message = "Trace publisher did not finish in time; queued events may be lost.",
                ?timeout
            );
        }
    }
}

fn spool_events(spool: &Mutex<Spool>, stats: &PublisherStats, events: &[EncodedEvents]) {
    let mut spool = lock(spool);
    match spool.append(events) {
        Ok(outcome) => {
            stats
                .spooled
                .fetch_add(outcome.written as u64, Ordering::Relaxed);
            if outcome.dropped > 0 {
                let total = stats
                    .dropped
                    .fetch_add(outcome.dropped as u64, Ordering::Relaxed)
                    + outcome.dropped as u64;
                error!(
                    message = "Trace spool full; events dropped.",
                    dropped = outcome.dropped,
                    dropped_total = total,
                    spool_bytes = spool.bytes()
                );
            }
        }
        Err(spool_error) => {
            let lost = event_count(events);
            let total = stats.dropped.fetch_add(lost, Ordering::Relaxed) + lost;
            error!(message = "Trace spool write failed; events dropped.", error = %spool_error, dropped = lost, dropped_total = total);
        }
    }
}

struct Connection {
    link: Option<Link>,
    /// A connection attempt, run as its own task: a broker that does not answer (packets
    /// dropped by a partition, a host gone) holds an attempt for up to
    /// [`amqp::CONNECT_TIMEOUT`], and meanwhile the publisher must keep draining the
    /// in-process queue, or the request path would find it full and write the spool itself.
    attempt: Option<JoinHandle<Result<Link, String>>>,
    /// Counts the links opened, so that a late failure of a batch sent on an earlier link
    /// does not tear down the current one ([`Connection::failed_on`]).
    generation: u64,
    next_attempt: Instant,
    failures: u32,
    /// Whether the broker said it blocks publishers on this link (`connection.blocked`: a
    /// memory or disk alarm), as last logged.
    blocked: bool,
}

impl Connection {
    fn new() -> Self {
        Connection {
            link: None,
            attempt: None,
            generation: 0,
            next_attempt: Instant::now(),
            failures: 0,
            blocked: false,
        }
    }

    /// Takes up a finished connection attempt, or starts one when it is due; never waits for
    /// the broker.
    async fn ensure(&mut self, settings: &PublisherSettings) {
        if self.link.is_some() {
            return;
        }
        match self.attempt.take() {
            Some(attempt) if attempt.is_finished() => match attempt.await {
                Ok(Ok(link)) => self.connected(link),
                Ok(Err(error)) => self.lost(&error),
                Err(join_error) => self.lost(&join_error.to_string()),
            },
            Some(attempt) => self.attempt = Some(attempt),
            None if Instant::now() >= self.next_attempt => {
                self.attempt = Some(tokio::spawn(open_confirmed_link(settings.clone())));
            }
            None => {}
        }
    }

    fn is_connecting(&self) -> bool {
        self.attempt.is_some()
    }

    /// The link, unless there is none or the broker blocks publishers. lapin writes nothing
    /// to a blocked connection, so a publish there would wait for the alarm to clear.
    fn publishable(&mut self) -> Option<&Link> {
        let blocked = self
            .link
            .as_ref()
            .is_some_and(|link| link.connection.status().blocked());
        if blocked != self.blocked {
            self.blocked = blocked;
            if blocked {
                warn!("Trace broker blocks publishers (resource alarm); spooling events to disk.");
            } else {
                info!("Trace broker accepts publishers again.");
            }
        }
        self.link.as_ref().filter(|_| !blocked)
    }

    fn connected(&mut self, link: Link) {
        if self.failures > 0 {
            info!(
                message = "Trace broker reachable again.",
                attempts = self.failures
            );
        }
        self.failures = 0;
        self.link = Some(link);
        self.generation += 1;
    }

    /// A publish on link `generation` failed: the broker counts as lost if that is still the
    /// current link, while a late failure on an earlier link leaves the current one alone.
    fn failed_on(&mut self, generation: u64, error: &str) {
        if self.link.is_some() && self.generation == generation {
            self.lost(error);
        }
    }

    fn lost(&mut self, error: &str) {
        self.link = None;
        // The next link starts unblocked; the broker says so again if its alarm still holds.
        self.blocked = false;
        self.failures += 1;
        if self.failures == 1 || self.failures % 30 == 0 {
            warn!(message = "Trace broker unavailable; spooling events to disk.", %error, attempts = self.failures);
        }
        let delay = Duration::from_millis((250u64 << self.failures.min(4)).min(3_000));
        self.next_attempt = Instant::now() + delay;
    }
}

/// Connects, declares the topology and switches the channel to publisher confirms.
async fn open_confirmed_link(settings: PublisherSettings) -> Result<Link, String> {
    let link = amqp::connect(&settings.amqp_url, &settings.queue, settings.queue_type)
        .await
        .map_err(|e| e.to_string())?;
    link.channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(link)
}

async fn run(
    settings: PublisherSettings,
    queue: Arc<EventQueue>,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<PublisherStats>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connection = Connection::new();
    // Woken by the tasks that publish batches and replay the spool, when one ends.
    let progress = Arc::new(Notify::new());
    let encoder = Arc::new(BodyEncoder::new(settings.compression));
    let mut in_flight = InFlight::new(progress.clone(), queue.clone(), encoder.clone());
    let mut replay = Replay::new(progress.clone(), encoder);
    let mut next_take = Instant::now() + settings.publish_interval;
    loop {
        in_flight
            .settle_finished(&mut connection, &spool, &stats)
            .await;
        connection.ensure(&settings).await;
        replay
            .advance(&mut connection, &settings, &spool, &stats)
            .await;
        // Events wait in memory while a connection attempt runs or while the most batches
        // allowed await confirms, both over within seconds; once the queue is half full the
        // publisher spools them, so that the request path never has to. A broker that blocks
        // publishers may do so for minutes, and events held that long would die with the
        // process, so then they go to the spool at each interval, as when it is away.
        let waiting_for_broker = connection.is_connecting()
            || (in_flight.is_full() && connection.publishable().is_some());
        let half_full = queue.is_half_full();
        let hold = waiting_for_broker && !half_full;
        let due = half_full || Instant::now() >= next_take;
        if hold || !due {
            let look_again = if due {
                Instant::now() + settings.publish_interval
            } else {
                next_take
            };
            tokio::select! {
                _ = tokio::time::sleep_until(look_again.into()) => {}
                _ = progress.notified(), if in_flight.is_full() || replay.is_running() => {}
                _ = queue.half_full() => {}
                _ = stopped.changed() => break,
            }
            continue;
        }
        next_take = Instant::now() + settings.publish_interval;
        let batch = queue.take_all();
        if !batch.is_empty() {
            send_or_spool(
                &mut in_flight,
                &mut connection,
                &settings,
                &spool,
                &stats,
                batch,
            );
        }
        // A queue that stays full skips the wait above; the tasks sending batches and
        // attempting connections share this runtime and must still get their turn.
        tokio::task::yield_now().await;
    }
    // Shutting down: whatever is still queued is published if possible, else spooled.
    if let Some(attempt) = connection.attempt.take() {
        attempt.abort();
    }
    // A segment cut off mid-replay stays in the spool and is replayed by the next run.
    replay.abort();
    // From here on the request path spools what it emits.
    let rest = queue.close();
    if !rest.is_empty() {
        if in_flight.is_full() {
            in_flight
                .settle_oldest(&mut connection, &spool, &stats)
                .await;
        }
        send_or_spool(
            &mut in_flight,
            &mut connection,
            &settings,
            &spool,
            &stats,
            rest,
        );
    }
    in_flight.settle_all(&mut connection, &spool, &stats).await;
}

/// Hands the batch to the broker if it takes publishes and there is room in flight;
/// otherwise the publisher spools it.
fn send_or_spool(
    in_flight: &mut InFlight,
    connection: &mut Connection,
    settings: &PublisherSettings,
    spool: &Mutex<Spool>,
    stats: &PublisherStats,
    batch: Vec<EncodedEvents>,
) {
    let generation = connection.generation;
    match connection.publishable() {
        Some(link) if !in_flight.is_full() => {
            in_flight.send(link.channel.clone(), generation, settings, batch);
        }
        _ => spool_events(spool, stats, &batch),
    }
}

fn event_count(units: &[EncodedEvents]) -> u64 {
    units.iter().map(|unit| unit.count() as u64).sum()
}

/// Most batches sent and not yet confirmed. The broker's confirms usually take 10-20 ms but
/// now and then over half a second (measured here: up to 725 ms at 11,000 requests/s, with
/// gigabytes of events waiting in the queue). Waiting for each batch's confirms before
/// sending the next let the in-process queue fill in that time and pushed events into the
/// spool, which writes to disk on the request path.
const MAX_IN_FLIGHT: usize = 8;

/// Batches handed to the broker whose confirms are still awaited, oldest first. Each is sent
/// and confirmed by a task of its own, so the publisher loop never waits for the broker: a
/// broker that stops reading (a resource alarm) holds those tasks, not the loop. A batch
/// counts as published only once confirmed; a batch whose publish or confirms fail or time
/// out is spooled whole (some of its messages may have reached the queue: the consumer's
/// create semantics make a replayed event a no-op).
struct InFlight {
    batches: std::collections::VecDeque<SentBatch>,
    /// Signalled by each batch's task when it ends, to wake a loop waiting for room.
    progress: Arc<Notify>,
    /// Takes back a confirmed batch's buffers ([`EventQueue::recycle`]).
    buffers: Arc<EventQueue>,
    /// Makes the messages' bodies, in buffers it reuses.
    encoder: Arc<BodyEncoder>,
}

/// A batch's event count, the link it went out on, and the task sending it and awaiting its
/// confirms.
struct SentBatch {
    events: u64,
    generation: u64,
    confirms: JoinHandle<Result<(), Unconfirmed>>,
}

/// A batch the broker did not confirm, handed back for the spool.
struct Unconfirmed {
    error: String,
    batch: Vec<EncodedEvents>,
}

impl InFlight {
    fn new(progress: Arc<Notify>, buffers: Arc<EventQueue>, encoder: Arc<BodyEncoder>) -> Self {
        InFlight {
            batches: Default::default(),
            progress,
            buffers,
            encoder,
        }
    }

    fn is_full(&self) -> bool {
        self.batches.len() >= MAX_IN_FLIGHT
    }

    /// Leaves sending the batch on `channel` and awaiting its confirms to a task.
    fn send(
        &mut self,
        channel: Channel,
        generation: u64,
        settings: &PublisherSettings,
        batch: Vec<EncodedEvents>,
    ) {
        let queue = settings.queue.clone();
        let (progress, buffers, encoder) = (
            self.progress.clone(),
            self.buffers.clone(),
            self.encoder.clone(),
        );
        self.batches.push_back(SentBatch {
            events: event_count(&batch),
            generation,
            confirms: tokio::spawn(async move {
                let outcome = publish_confirmed(&channel, &queue, &encoder, &batch).await;
                progress.notify_one();
                match outcome {
                    Ok(()) => {
                        buffers.recycle(batch);
                        Ok(())
                    }
                    Err(error) => Err(Unconfirmed { error, batch }),
                }
            }),
        });
    }

    /// Counts or spools every batch whose confirms are in, without waiting for the others.
    async fn settle_finished(
        &mut self,
        connection: &mut Connection,
        spool: &Mutex<Spool>,
        stats: &PublisherStats,
    ) {
        while self
            .batches
            .front()
            .is_some_and(|sent| sent.confirms.is_finished())
        {
            self.settle_oldest(connection, spool, stats).await;
        }
    }

    /// Waits for the oldest batch's confirms (shutdown, or no room left).
    async fn settle_oldest(
        &mut self,
        connection: &mut Connection,
        spool: &Mutex<Spool>,
        stats: &PublisherStats,
    ) {
        if let Some(oldest) = self.batches.pop_front() {
            settle(oldest, connection, spool, stats).await;
        }
    }

    /// Waits for every batch in flight (shutdown).
    async fn settle_all(
        &mut self,
        connection: &mut Connection,
        spool: &Mutex<Spool>,
        stats: &PublisherStats,
    ) {
        while !self.batches.is_empty() {
            self.settle_oldest(connection, spool, stats).await;
        }
    }
}

/// The spool's replay, one segment at a time, each step a task of its own: a broker that
/// stops answering or blocks publishers mid-replay holds that task, not the publisher loop.
struct Replay {
    /// The link generation the step publishes on, and the step.
    running: Option<(u64, JoinHandle<Result<(), ReplayError>>)>,
    /// Signalled when a step ends, so that the next starts at once.
    progress: Arc<Notify>,
    /// The same encoder as the batches in flight use, so replay reuses their buffers.
    encoder: Arc<BodyEncoder>,
}

/// Why a replay step ended before its segment was confirmed and removed.
enum ReplayError {
    /// The broker did not take or confirm the events: it counts as lost on that link.
    Broker(String),
    /// The disk failed (a segment that cannot be read or removed): the broker is fine and
    /// new events keep going to it; the spool sets the segment aside for [`SET_ASIDE_FOR`]
    /// and replay goes on with the next one.
    Spool(SpoolError),
}

impl Replay {
    fn new(progress: Arc<Notify>, encoder: Arc<BodyEncoder>) -> Self {
        Replay {
            running: None,
            progress,
            encoder,
        }
    }

    fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Takes up a finished step, then starts the next one if the spool holds events and the
    /// broker takes publishes; never waits for the broker.
    async fn advance(
        &mut self,
        connection: &mut Connection,
        settings: &PublisherSettings,
        spool: &Arc<Mutex<Spool>>,
        stats: &Arc<PublisherStats>,
    ) {
        match self.running.take() {
            Some(step) if !step.1.is_finished() => {
                self.running = Some(step);
                return;
            }
            Some((generation, step)) => {
                let outcome = step
                    .await
                    .unwrap_or_else(|join_error| Err(ReplayError::Broker(join_error.to_string())));
                match outcome {
                    Ok(()) => {}
                    Err(ReplayError::Broker(error)) => {
                        connection.failed_on(generation, &error);
                        return;
                    }
                    Err(ReplayError::Spool(error)) => {
                        error!(
                            message = "Trace spool segment unreadable; set aside, replay goes on with the next one.",
                            %error,
                            retry_in = ?SET_ASIDE_FOR
                        );
                    }
                }
            }
            None => {}
        }
        if !lock(spool).has_replayable() {
            return;
        }
        let generation = connection.generation;
        let Some(link) = connection.publishable() else {
            return;
        };
        let channel = link.channel.clone();
        let queue = settings.queue.clone();
        let (spool, stats) = (spool.clone(), stats.clone());
        let (progress, encoder) = (self.progress.clone(), self.encoder.clone());
        let step = tokio::spawn(async move {
            let outcome = replay_one_segment(&channel, &queue, &encoder, &spool, &stats).await;
            progress.notify_one();
            outcome
        });
        self.running = Some((generation, step));
    }

    fn abort(&mut self) {
        if let Some((_, step)) = self.running.take() {
            step.abort();
        }
    }
}

/// Waits for one batch's confirms: counts it as published, or spools it.
async fn settle(
    sent: SentBatch,
    connection: &mut Connection,
    spool: &Mutex<Spool>,
    stats: &PublisherStats,
) {
    match sent.confirms.await {
        Ok(Ok(())) => {
            stats.published.fetch_add(sent.events, Ordering::Relaxed);
        }
        Ok(Err(Unconfirmed { error, batch })) => {
            connection.failed_on(sent.generation, &error);
            spool_events(spool, stats, &batch);
        }
        // Only a panic in lapin, or a runtime shutting down under the publisher, ends the
        // task early; the batch went with it.
        Err(join_error) => {
            let total = stats.dropped.fetch_add(sent.events, Ordering::Relaxed) + sent.events;
            error!(
                message = "Trace confirm task failed; its events are lost.",
                error = %join_error,
                dropped = sent.events,
                dropped_total = total
            );
        }
    }
}

/// Publishes the oldest spooled segment, if any, and deletes it once every event in it was
/// confirmed.
async fn replay_one_segment(
    channel: &Channel,
    queue: &str,
    encoder: &BodyEncoder,
    spool: &Mutex<Spool>,
    stats: &PublisherStats,
) -> Result<(), ReplayError> {
    let oldest = lock(spool).oldest().map_err(ReplayError::Spool)?;
    let Some(SpooledSegment {
        path,
        events,
        unreadable,
    }) = oldest
    else {
        return Ok(());
    };
    for chunk in events.chunks(REPLAY_BATCH) {
        publish_confirmed(channel, queue, encoder, chunk)
            .await
            .map_err(ReplayError::Broker)?;
    }
    let mut spool = lock(spool);
    spool.remove(&path).map_err(ReplayError::Spool)?;
    // Counted once the segment is gone: one replayed again (the broker lost midway, or the
    // delete failed) would otherwise count its events twice.
    stats
        .published
        .fetch_add(event_count(&events), Ordering::Relaxed);
    if unreadable > 0 {
        stats
            .dropped
            .fetch_add(unreadable as u64, Ordering::Relaxed);
    }
    info!(
        message = "Replayed spooled trace events.",
        events = events.len(),
        spool_bytes = spool.bytes()
    );
    Ok(())
}

/// Sends the events as persistent messages of several events each ([`framing`]) and waits
/// until the broker confirmed every message.
async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    encoder: &BodyEncoder,
    events: &[EncodedEvents],
) -> Result<(), String> {
    await_confirms(publish(channel, queue, encoder, events).await?).await
}

/// Sends the events as persistent messages of several events each, compressed as configured
/// ([`framing`]), and returns the broker's confirms, to be awaited together: one round trip
/// per batch, not per message.
async fn publish(
    channel: &Channel,
    queue: &str,
    encoder: &BodyEncoder,
    events: &[EncodedEvents],
) -> Result<Vec<PublisherConfirm>, String> {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(framing::CONTENT_TYPE.into());
    if let Some(encoding) = encoder.content_encoding() {
        properties = properties.with_content_encoding(encoding.into());
    }
    let mut bodies = Vec::new();
    for lines in framing::encode(events) {
        // Between messages the publisher's thread lets a proxy thread waiting for this core
        // run first. Compressing a round's messages in one go kept a core for up to 5 ms
        // every interval, and a proxy thread woken on it waited that long. At 16 connections
        // the publisher held the core for 14-33% of the time proxy threads spent in waits
        // over 1 ms, and 4-17% with the yield (bench/sched-delays.py; docs/benchmarks.md,
        // eleventh round). The yield returns at once when nothing else waits.
        if !bodies.is_empty() {
            std::thread::yield_now();
        }
        bodies.push(encoder.encode(lines));
    }
    // lapin copies a body into its frames before the publish resolves, so the buffers are
    // free again once every publish has (or the wait is given up).
    let publishes = bodies.iter().map(|body| {
        channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            properties.clone(),
        )
    });
    let sent =
        tokio::time::timeout(CONFIRM_TIMEOUT, futures::future::try_join_all(publishes)).await;
    encoder.recycle(bodies);
    sent.map_err(|_| format!("publishing took longer than {CONFIRM_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())
}

async fn await_confirms(confirms: Vec<PublisherConfirm>) -> Result<(), String> {
    let confirmations =
        tokio::time::timeout(CONFIRM_TIMEOUT, futures::future::try_join_all(confirms))
            .await
            .map_err(|_| format!("no publisher confirm within {CONFIRM_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
    if confirmations.iter().any(|c| !c.is_ack()) {
        return Err("broker refused (nack) a trace message".to_string());
    }
    Ok(())
}
