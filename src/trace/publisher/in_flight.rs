//! Batches handed to the broker whose confirms are still awaited.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::broker::{publish_confirmed, BrokerError};
use super::connection::Publishable;
use super::event_count;
use crate::trace::framing::{BodyEncoder, EncodedEvents};
use crate::trace::queue::EventQueue;

/// Most batches sent and not yet confirmed. The broker's confirms are usually quick but now
/// and then take hundreds of times longer under load (docs/benchmarks-archive.md).
/// Waiting for each batch's confirms before sending the next would let the in-process queue
/// fill meanwhile and push events into the spool, which writes to disk on the request path.
const MAX_IN_FLIGHT: usize = 8;

/// Batches handed to the broker whose confirms are still awaited, oldest first. Each is sent
/// and confirmed by a task of its own, so the publisher loop never waits for the broker: a
/// broker that stops reading (a resource alarm) holds those tasks, not the loop. A batch
/// counts as published only once confirmed; a batch whose publish or confirms fail or time
/// out is spooled whole (some of its messages may have reached the queue: the consumer's
/// create semantics make a replayed event a no-op).
pub(super) struct InFlight {
    batches: VecDeque<SentBatch>,
    queue: String,
    /// Signalled by each batch's task when it ends, to wake a loop waiting for room.
    progress: Arc<Notify>,
    /// Takes back a confirmed batch's buffers ([`EventQueue::recycle`]).
    buffers: Arc<EventQueue>,
    /// Makes the messages' bodies, in buffers it reuses.
    encoder: Arc<BodyEncoder>,
}

/// A batch's event count, the link it went out on, and the task sending it and awaiting its
/// confirms.
pub(super) struct SentBatch {
    events: u64,
    generation: u64,
    confirms: JoinHandle<Result<(), Unconfirmed>>,
}

/// A batch the broker did not confirm, handed back for the spool.
struct Unconfirmed {
    error: BrokerError,
    batch: Vec<EncodedEvents>,
}

/// How a sent batch ended.
pub(super) enum Settled {
    Confirmed {
        events: u64,
    },
    /// Not confirmed on link `generation`: the batch goes to the spool.
    Unconfirmed {
        generation: u64,
        error: BrokerError,
        batch: Vec<EncodedEvents>,
    },
    /// The task ended early and the batch went with it.
    Lost {
        events: u64,
        error: BrokerError,
    },
}

impl SentBatch {
    /// Waits for the batch's confirms.
    pub(super) async fn settle(self) -> Settled {
        match self.confirms.await {
            Ok(Ok(())) => Settled::Confirmed {
                events: self.events,
            },
            Ok(Err(Unconfirmed { error, batch })) => Settled::Unconfirmed {
                generation: self.generation,
                error,
                batch,
            },
            Err(join_error) => Settled::Lost {
                events: self.events,
                error: BrokerError::Task(join_error),
            },
        }
    }
}

impl InFlight {
    pub(super) fn new(
        queue: String,
        progress: Arc<Notify>,
        buffers: Arc<EventQueue>,
        encoder: Arc<BodyEncoder>,
    ) -> Self {
        InFlight {
            batches: VecDeque::new(),
            queue,
            progress,
            buffers,
            encoder,
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.batches.len() >= MAX_IN_FLIGHT
    }

    /// Leaves sending the batch on `link` and awaiting its confirms to a task.
    pub(super) fn send(&mut self, link: Publishable, batch: Vec<EncodedEvents>) {
        let queue = self.queue.clone();
        let (progress, buffers, encoder) = (
            self.progress.clone(),
            self.buffers.clone(),
            self.encoder.clone(),
        );
        let channel = link.channel;
        self.batches.push_back(SentBatch {
            events: event_count(&batch),
            generation: link.generation,
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

    /// The oldest batch, if its confirms are in; never waits.
    pub(super) fn pop_finished(&mut self) -> Option<SentBatch> {
        let finished = self
            .batches
            .front()
            .is_some_and(|sent| sent.confirms.is_finished());
        finished.then(|| self.batches.pop_front()).flatten()
    }

    /// The oldest batch, finished or not (shutdown, or no room left).
    pub(super) fn pop_oldest(&mut self) -> Option<SentBatch> {
        self.batches.pop_front()
    }
}
