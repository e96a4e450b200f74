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
//!
//! # Layout
//! - `sink`: [`TraceSink`], the request path's end, and the spool writer both ends share.
//! - `connection`: the link to the broker, the attempt to open one, and its blocked state.
//! - `in_flight`: batches sent whose confirms are awaited.
//! - `replay`: the spool's replay, a segment at a time.
//! - `broker`: opening a confirmed link, publishing a batch and awaiting its confirms.
//! - this file: the settings, the counters, and the loop that ties them together.

mod broker;
mod connection;
mod in_flight;
mod replay;
mod sink;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::adoption;
use super::buffer_pool::BufferBudget;
use super::framing::{BodyEncoder, EncodedEvents, TraceCompression, MESSAGE_BUFFER_BYTES};
use super::journal::Journal;
use super::queue::EventQueue;
use super::spool::FolderLock;
use super::spool::{Spool, SpoolError, SET_ASIDE_FOR};
pub use super::stats::PublisherStats;
use crate::config::QueueType;
use crate::trace::amqp::Brokers;
use connection::Connection;
use in_flight::{InFlight, SentBatch, Settled};
use replay::{Replay, ReplayError};
use sink::SpoolWriter;
pub use sink::TraceSink;

#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// `amqpAddr`: the broker, or brokers to fail over between.
    pub brokers: Brokers,
    pub queue: String,
    pub queue_type: QueueType,
    pub queue_capacity: usize,
    /// The most memory the queue's event buffers may hold, queued or in flight
    /// (`trace.bufferMaxBytes`), in whole buffers of [`MESSAGE_BUFFER_BYTES`]: past it,
    /// events go to the spool. The journal has a slot for each.
    pub buffer_max_bytes: u64,
    /// How long events gather before they are sent and confirmed, unless the queue is
    /// already half full (`trace.publishInterval`). The broker's cost is per confirmed batch (it writes and
    /// syncs the messages before it confirms them), so fewer, larger batches cost it less CPU
    /// per event (docs/benchmarks-archive.md has the figures). The publisher polls the queue: only
    /// the request that fills it halfway wakes the publisher's thread.
    pub publish_interval: Duration,
    /// How message bodies are compressed (`trace.compression`; see [`framing`](super::framing)).
    pub compression: TraceCompression,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// Keep a copy of the queue in `spool_dir`'s journal, so that a SIGKILLed node's next
    /// start replays what it held in memory (`trace.journal`; see `trace::journal`).
    pub journal: bool,
    /// Adopt the folders of `spool_dir`'s parent whose node is gone, at the start and then
    /// every minute (see `trace::adoption`); set by
    /// [`for_node`](PublisherSettings::for_node), which makes `spool_dir` a node's folder.
    pub adopt_orphans: bool,
}

impl PublisherSettings {
    /// `buffer_max_bytes` in whole message buffers, at least one.
    pub fn buffer_count(&self) -> usize {
        let buffers = self.buffer_max_bytes / MESSAGE_BUFFER_BYTES as u64;
        usize::try_from(buffers).unwrap_or(usize::MAX).max(1)
    }
}

/// The publisher loop, prepared but not yet running: [`Publisher::run`] drives it inside
/// whichever runtime the caller owns (pingora gives each service its own).
pub struct Publisher {
    settings: PublisherSettings,
    queue: Arc<EventQueue>,
    spool: SpoolWriter,
    journal: Option<Arc<Journal>>,
    /// Held while the publisher lives: the node's folder is not up for adoption.
    folder_lock: FolderLock,
}

/// Opens the node's journal and spools what a previous run left in it. A journal that
/// cannot be opened costs only the copy: the node runs without one, and says so.
fn open_journal(
    settings: &PublisherSettings,
    spool: &SpoolWriter,
    stats: Arc<PublisherStats>,
) -> Option<Arc<Journal>> {
    match Journal::open(&settings.spool_dir, settings.buffer_count(), stats) {
        Ok((journal, recovered)) => {
            let events = event_count(&recovered.units);
            if events > 0 {
                spool.write(&recovered.units);
                spool.stats().recovered.fetch_add(events, Ordering::Relaxed);
                warn!(
                    message = "Found trace events that this node's previous run held in memory when it stopped; they are spooled for replay.",
                    events,
                    dir = %settings.spool_dir.display()
                );
            }
            Some(journal)
        }
        Err(error) => {
            warn!(message = "Trace journal unusable; events held in memory die with the process.", %error);
            None
        }
    }
}

impl Publisher {
    /// Opens the spool and the in-process queue; fails only if the spool folder is unusable.
    pub fn prepare(settings: PublisherSettings) -> Result<(TraceSink, Publisher), SpoolError> {
        let folder_lock = FolderLock::take_own(&settings.spool_dir)?;
        let spool = Spool::open(&settings.spool_dir, settings.spool_max_bytes)?;
        let budget = BufferBudget::new(settings.buffer_count(), MESSAGE_BUFFER_BYTES);
        let stats = Arc::new(PublisherStats::with_buffers(budget.clone()));
        let spool = SpoolWriter::new(spool, stats.clone());
        let journal = if settings.journal {
            open_journal(&settings, &spool, stats)
        } else {
            None
        };
        let queue = EventQueue::new(settings.queue_capacity, journal.clone()).bounded_by(budget);
        let queue = Arc::new(queue);
        let sink = TraceSink::new(queue.clone(), spool.clone());
        let publisher = Publisher {
            settings,
            queue,
            spool,
            journal,
            folder_lock,
        };
        Ok((sink, publisher))
    }

    /// The node's spool folder; see [`remove_spool_if_empty`].
    pub fn spool_dir(&self) -> PathBuf {
        self.settings.spool_dir.clone()
    }

    /// Publishes until `stopped` flips, then publishes or spools whatever is still queued.
    pub async fn run(self, stopped: watch::Receiver<bool>) {
        let Publisher {
            settings,
            queue,
            spool,
            journal,
            folder_lock,
        } = self;
        let adoption = settings.adopt_orphans.then(|| {
            let own = settings.spool_dir.clone();
            let root = own.parent().map(Path::to_path_buf).unwrap_or_default();
            tokio::spawn(adoption::run(
                root,
                own,
                spool.shared(),
                spool.stats_handle(),
                stopped.clone(),
            ))
        });
        PublisherLoop::new(settings, queue, spool)
            .run(stopped)
            .await;
        if let Some(adoption) = adoption {
            adoption.abort();
        }
        if let Some(journal) = journal {
            journal.remove_if_clear();
        }
        folder_lock.release();
        info!("Trace publisher stopped.");
    }
}

/// Runs a prepared publisher on the current runtime; stop it with the returned handle.
pub struct RunningPublisher {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    spool_dir: PathBuf,
}

impl RunningPublisher {
    pub fn spawn(publisher: Publisher) -> Self {
        let (stop, stopped) = watch::channel(false);
        let spool_dir = publisher.spool_dir();
        let task = tokio::spawn(publisher.run(stopped));
        RunningPublisher {
            stop,
            task,
            spool_dir,
        }
    }

    /// Stops and waits (at most `timeout`) until queued events are published or spooled;
    /// call it once nothing emits any more, as it removes an empty spool folder.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            warn!(
                message = "Trace publisher did not finish in time; queued events may be lost.",
                ?timeout
            );
        }
        remove_spool_if_empty(&self.spool_dir);
    }
}

/// Removes a node's spool folder on a clean exit when it holds nothing to replay, so that
/// folders of nodes that come and go (every container's address is a new name) do not pile
/// up. Call it only once nothing can emit any more: a later emit that overflows would find
/// no folder. A folder that still holds segments stays for the next run to replay.
pub fn remove_spool_if_empty(dir: &std::path::Path) {
    // remove_dir refuses a folder that is not empty, which is the check itself.
    if std::fs::remove_dir(dir).is_ok() {
        info!(message = "Removed the empty trace spool folder.", dir = %dir.display());
    }
}

fn event_count(units: &[EncodedEvents]) -> u64 {
    units.iter().map(|unit| unit.count() as u64).sum()
}

/// The publisher's state while it runs: where events wait (the queue), where they go (the
/// broker, or the spool), and what is under way (batches in flight, a replay step).
struct PublisherLoop {
    settings: PublisherSettings,
    queue: Arc<EventQueue>,
    spool: SpoolWriter,
    connection: Connection,
    in_flight: InFlight,
    replay: Replay,
    /// Woken by the tasks that publish batches and replay the spool, when one ends.
    progress: Arc<Notify>,
}

impl PublisherLoop {
    fn new(settings: PublisherSettings, queue: Arc<EventQueue>, spool: SpoolWriter) -> Self {
        let progress = Arc::new(Notify::new());
        let encoder = Arc::new(BodyEncoder::new(settings.compression));
        let in_flight = InFlight::new(
            settings.queue.clone(),
            progress.clone(),
            queue.clone(),
            encoder.clone(),
        );
        let replay = Replay::new(
            settings.queue.clone(),
            spool.clone(),
            progress.clone(),
            encoder,
        );
        PublisherLoop {
            connection: Connection::new(settings.brokers.clone()),
            settings,
            queue,
            spool,
            in_flight,
            replay,
            progress,
        }
    }

    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let interval = self.settings.publish_interval;
        let mut next_take = Instant::now() + interval;
        loop {
            self.settle_finished().await;
            self.connection.ensure(&self.settings).await;
            self.advance_replay().await;
            // Events wait in memory while a connection attempt runs or while the most batches
            // allowed await confirms, both over within seconds; once the queue is half full
            // (or the memory guard asks) the publisher spools them, so that the request path
            // never has to. A broker that
            // blocks publishers may do so for minutes, and events held that long would die
            // with the process, so then they go to the spool at each interval, as when it is
            // away.
            let waiting_for_broker = self.connection.is_connecting()
                || (self.in_flight.is_full() && self.connection.publishable().is_some());
            let must_take = self.queue.must_be_taken();
            let hold = waiting_for_broker && !must_take;
            let due = must_take || Instant::now() >= next_take;
            if hold || !due {
                let look_again = if due {
                    Instant::now() + interval
                } else {
                    next_take
                };
                let tasks_running = self.in_flight.is_full() || self.replay.is_running();
                tokio::select! {
                    _ = tokio::time::sleep_until(look_again.into()) => {}
                    _ = self.progress.notified(), if tasks_running => {}
                    _ = self.queue.half_full() => {}
                    _ = stopped.changed() => break,
                }
                continue;
            }
            next_take = Instant::now() + interval;
            let batch = self.queue.take_all();
            if !batch.is_empty() {
                self.send_or_spool(batch);
            }
            // A queue that stays full skips the wait above; the tasks sending batches and
            // attempting connections share this runtime and must still get their turn.
            tokio::task::yield_now().await;
        }
        self.finish().await;
    }

    /// Shutting down: whatever is still queued is published if possible, else spooled.
    async fn finish(mut self) {
        self.connection.abort_attempt();
        // A segment cut off mid-replay stays in the spool and is replayed by the next run.
        self.replay.abort();
        // From here on the request path spools what it emits.
        let rest = self.queue.close();
        if !rest.is_empty() {
            if self.in_flight.is_full() {
                if let Some(oldest) = self.in_flight.pop_oldest() {
                    self.settle(oldest).await;
                }
            }
            self.send_or_spool(rest);
        }
        while let Some(sent) = self.in_flight.pop_oldest() {
            self.settle(sent).await;
        }
    }

    /// Hands the batch to the broker if it takes publishes and there is room in flight;
    /// otherwise spools it.
    fn send_or_spool(&mut self, batch: Vec<EncodedEvents>) {
        match self.connection.publishable() {
            Some(link) if !self.in_flight.is_full() => self.in_flight.send(link, batch),
            _ => self.spool.write(&batch),
        }
    }

    /// Counts or spools every batch whose confirms are in, without waiting for the others.
    async fn settle_finished(&mut self) {
        while let Some(sent) = self.in_flight.pop_finished() {
            self.settle(sent).await;
        }
    }

    /// Waits for one batch's confirms: counts it as published, or spools it.
    async fn settle(&mut self, sent: SentBatch) {
        match sent.settle().await {
            Settled::Confirmed { events } => {
                self.spool
                    .stats()
                    .published
                    .fetch_add(events, Ordering::Relaxed);
            }
            Settled::Unconfirmed {
                generation,
                error,
                batch,
            } => {
                self.connection.failed_on(generation, &error);
                self.spool.write(&batch);
            }
            Settled::Lost { events, error } => self.spool.count_lost(events, &error),
        }
    }

    /// Takes up a finished replay step, then starts the next one if the spool holds events
    /// and the broker takes publishes; never waits for the broker.
    async fn advance_replay(&mut self) {
        match self.replay.take_finished().await {
            Some((generation, Err(ReplayError::Broker(error)))) => {
                self.connection.failed_on(generation, &error);
                return;
            }
            Some((_, Err(ReplayError::Spool(error)))) => {
                error!(
                    message = "Trace spool segment unreadable; set aside, replay goes on with the next one.",
                    %error,
                    retry_in = ?SET_ASIDE_FOR
                );
            }
            Some((_, Ok(()))) | None => {}
        }
        if !self.replay.has_work() {
            return;
        }
        if let Some(link) = self.connection.publishable() {
            self.replay.start(link);
        }
    }
}
