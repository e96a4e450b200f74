//! The request path's end of the publisher, and the spool writer both ends share.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tracing::error;

use crate::trace::event::TraceEvent;
use crate::trace::framing::EncodedEvents;
use crate::trace::lock;
use crate::trace::queue::EventQueue;
use crate::trace::spool::Spool;
use crate::trace::stats::PublisherStats;

/// The request path's handle: cheap to clone, never blocks on the broker.
#[derive(Clone)]
pub struct TraceSink {
    queue: Option<Arc<EventQueue>>,
    spool: Option<SpoolWriter>,
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

    pub(super) fn new(queue: Arc<EventQueue>, spool: SpoolWriter) -> Self {
        TraceSink {
            queue: Some(queue),
            stats: spool.stats.clone(),
            spool: Some(spool),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.queue.is_some()
    }

    pub fn stats(&self) -> &PublisherStats {
        &self.stats
    }

    /// Short of memory: events waiting for the broker go to the spool at the publisher's next
    /// turn, and spare buffers are freed.
    pub fn spill(&self) {
        if let Some(queue) = &self.queue {
            queue.request_spill();
        }
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
            spool.write(&[events]);
        }
    }
}

/// The disk spool and the counters its writes move; shared by the request path (a full
/// queue) and the publisher (a broker away).
#[derive(Clone)]
pub(super) struct SpoolWriter {
    spool: Arc<Mutex<Spool>>,
    stats: Arc<PublisherStats>,
}

impl SpoolWriter {
    pub(super) fn new(spool: Spool, stats: Arc<PublisherStats>) -> Self {
        SpoolWriter {
            spool: Arc::new(Mutex::new(spool)),
            stats,
        }
    }

    pub(super) fn stats(&self) -> &PublisherStats {
        &self.stats
    }

    pub(super) fn spool(&self) -> &Mutex<Spool> {
        &self.spool
    }

    /// The spool itself, for adoption, which runs on a blocking thread of its own.
    pub(super) fn shared(&self) -> Arc<Mutex<Spool>> {
        self.spool.clone()
    }

    pub(super) fn stats_handle(&self) -> Arc<PublisherStats> {
        self.stats.clone()
    }

    /// Appends events to the spool; counts them as spooled, or as dropped (and logs it) when
    /// the spool is full or the disk fails.
    pub(super) fn write(&self, events: &[EncodedEvents]) {
        let mut spool = lock(&self.spool);
        let stats = &self.stats;
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
                let lost = super::event_count(events);
                let total = stats.dropped.fetch_add(lost, Ordering::Relaxed) + lost;
                error!(message = "Trace spool write failed; events dropped.", error = %spool_error, dropped = lost, dropped_total = total);
            }
        }
    }

    /// Counts events that were lost outside the spool (a confirm task that died), and logs it.
    pub(super) fn count_lost(&self, events: u64, why: &dyn std::fmt::Display) {
        let total = self.stats.dropped.fetch_add(events, Ordering::Relaxed) + events;
        error!(
            message = "Trace confirm task failed; its events are lost.",
            error = %why,
            dropped = events,
            dropped_total = total
        );
    }
}
