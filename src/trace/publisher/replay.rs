//! Replaying the spool into the broker once it takes publishes again.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::info;

use super::broker::{publish_confirmed, BrokerError};
use super::connection::Publishable;
use super::event_count;
use super::sink::SpoolWriter;
use crate::trace::framing::BodyEncoder;
use crate::trace::lock;
use crate::trace::spool::{SpoolError, SpooledSegment};

/// Most spooled events replayed as one batch: messages of up to 1,024 events whose confirms
/// are awaited together. The broker confirms persistent messages only after writing them to
/// disk, so small batches cap replay at the rate of the broker's disk writes.
const REPLAY_BATCH: usize = 2048;

/// The spool's replay, one segment at a time, each step a task of its own: a broker that
/// stops answering or blocks publishers mid-replay holds that task, not the publisher loop.
pub(super) struct Replay {
    /// The link generation the step publishes on, and the step.
    running: Option<(u64, JoinHandle<Result<(), ReplayError>>)>,
    queue: String,
    spool: SpoolWriter,
    /// Signalled when a step ends, so that the next starts at once.
    progress: Arc<Notify>,
    /// The same encoder as the batches in flight use, so replay reuses their buffers.
    encoder: Arc<BodyEncoder>,
}

/// Why a replay step ended before its segment was confirmed and removed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReplayError {
    /// The broker did not take or confirm the events: it counts as lost on that link.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The disk failed (a segment that cannot be read or removed): the broker is fine and
    /// new events keep going to it; the spool sets the segment aside for a while and replay
    /// goes on with the next one.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl Replay {
    pub(super) fn new(
        queue: String,
        spool: SpoolWriter,
        progress: Arc<Notify>,
        encoder: Arc<BodyEncoder>,
    ) -> Self {
        Replay {
            running: None,
            queue,
            spool,
            progress,
            encoder,
        }
    }

    pub(super) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether the spool holds a segment to replay now.
    pub(super) fn has_work(&self) -> bool {
        !self.is_running() && lock(self.spool.spool()).has_replayable()
    }

    /// The step that ended, with the link generation it published on; never waits.
    pub(super) async fn take_finished(&mut self) -> Option<(u64, Result<(), ReplayError>)> {
        if !self.running.as_ref()?.1.is_finished() {
            return None;
        }
        let (generation, step) = self.running.take()?;
        let outcome = step
            .await
            .unwrap_or_else(|join_error| Err(BrokerError::Task(join_error).into()));
        Some((generation, outcome))
    }

    /// Starts replaying the oldest segment on `link`.
    pub(super) fn start(&mut self, link: Publishable) {
        let queue = self.queue.clone();
        let spool = self.spool.clone();
        let (progress, encoder) = (self.progress.clone(), self.encoder.clone());
        let channel = link.channel;
        let step = tokio::spawn(async move {
            let outcome = replay_one_segment(&channel, &queue, &encoder, &spool).await;
            progress.notify_one();
            outcome
        });
        self.running = Some((link.generation, step));
    }

    pub(super) fn abort(&mut self) {
        if let Some((_, step)) = self.running.take() {
            step.abort();
        }
    }
}

/// Publishes the oldest spooled segment, if any, and deletes it once every event in it was
/// confirmed.
async fn replay_one_segment(
    channel: &lapin::Channel,
    queue: &str,
    encoder: &BodyEncoder,
    writer: &SpoolWriter,
) -> Result<(), ReplayError> {
    let Some(SpooledSegment {
        path,
        events,
        unreadable,
    }) = lock(writer.spool()).oldest()?
    else {
        return Ok(());
    };
    for chunk in events.chunks(REPLAY_BATCH) {
        publish_confirmed(channel, queue, encoder, chunk).await?;
    }
    let mut spool = lock(writer.spool());
    spool.remove(&path)?;
    // Counted once the segment is gone: one replayed again (the broker lost midway, or the
    // delete failed) would otherwise count its events twice.
    let stats = writer.stats();
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
    if spool.bytes() == 0 {
        // The outage is over: what its queue, its segments and their replay took is free
        // again, and mimalloc would otherwise keep it committed for the next burst.
        drop(spool);
        crate::allocator::return_free_memory();
    }
    Ok(())
}
