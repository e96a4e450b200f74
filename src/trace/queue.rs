//! The bounded in-process queue between the request path and the publisher: events wait here,
//! already serialised, until the publisher takes them at its next interval.
//!
//! Each thread that emits has a shard of its own (picked once per thread) and writes its
//! events straight into the buffer that becomes a message body: a shard holds units filled up
//! to a message's limits ([`EncodedEvents::has_room_for`]), which [`framing::encode`] sends
//! without copying. Emitting costs an uncontended lock and a shared counter; no allocation,
//! no channel, and no free on the publisher's thread: the request path's share of tracing is
//! writing the JSON (`docs/benchmarks.md` has the phases of a request's cost).
//!
//! Each unit also writes its lines into a slot of the node's [`journal`](super::journal),
//! a memory-mapped file that outlives the process, until its events are confirmed or
//! spooled: a SIGKILLed node's next start replays what it held here.
//!
//! Buffers go round: the publisher hands a confirmed batch's buffers back
//! ([`EventQueue::recycle`]) and shards fill them again, so their memory stays mapped instead
//! of being faulted in again, 4 KiB at a time, for every message.
//!
//! Two bounds hold. One counts entries (one [`EventQueue::push`]: a gateway request's two
//! events, or one event) across all shards. The other counts buffers ([`BufferBudget`],
//! `trace.bufferMaxBytes`): a unit holds its buffer from the push that opens it until its
//! events are confirmed or spooled, so it also bounds the batches in flight, and the journal
//! has a slot for each. A push past either is refused and the caller spools the events. The
//! push that fills the queue halfway wakes the publisher ([`EventQueue::half_full`]), which
//! otherwise looks only at its interval: at full load the default queue fills in little more
//! than the default interval, so without the wake requests would spool events themselves
//! whenever the publisher's thread ran late.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use super::buffer_pool::{BufferBudget, BufferPool};
use super::framing::{self, EncodedEvents};
use super::journal::Journal;
use crate::per_thread::PerThread;

/// Buffers kept for reuse; past this a returned buffer is freed. Enough for every shard a
/// busy gateway fills plus the batches in flight, without holding on to a burst's worth.
const SPARE_BUFFERS: usize = 24;

pub struct EventQueue {
    /// The publisher locks each shard once per interval.
    shards: PerThread<Shard>,
    /// Entries in all shards.
    queued: AtomicUsize,
    capacity: usize,
    /// Entries at which the publisher is woken: half the capacity, at least one.
    half: usize,
    /// Set once the publisher drains for good; pushes are refused from then on.
    closed: AtomicBool,
    spare_buffers: BufferPool,
    /// Buffers in use by units queued or in flight, and the most that may be.
    budget: Arc<BufferBudget>,
    /// Signalled by the push that brings the queue to half its capacity, and by
    /// [`EventQueue::request_spill`].
    filled_halfway: Notify,
    /// Set by [`EventQueue::request_spill`] until the publisher takes the queue.
    spill_wanted: AtomicBool,
    /// Where units keep a copy that outlives the process; `None` with `trace.journal` off.
    journal: Option<Arc<Journal>>,
}

/// One thread's events, in the order emitted; only the last unit still takes more.
#[derive(Default)]
struct Shard {
    units: Vec<EncodedEvents>,
    entries: usize,
}

impl EventQueue {
    /// A queue of `capacity` entries with no bound on its buffers; see
    /// [`EventQueue::bounded_by`].
    pub fn new(capacity: usize, journal: Option<Arc<Journal>>) -> Self {
        EventQueue {
            shards: PerThread::default(),
            queued: AtomicUsize::new(0),
            capacity,
            half: (capacity / 2).max(1),
            closed: AtomicBool::new(false),
            spare_buffers: BufferPool::new(SPARE_BUFFERS, framing::MESSAGE_BUFFER_BYTES),
            budget: BufferBudget::unlimited(),
            filled_halfway: Notify::new(),
            spill_wanted: AtomicBool::new(false),
            journal,
        }
    }

    /// Holds the units' buffers, queued and in flight, to `budget`'s limit; spare buffers are
    /// kept only up to that many too.
    pub fn bounded_by(mut self, budget: Arc<BufferBudget>) -> Self {
        let spares = SPARE_BUFFERS.min(budget.limit());
        self.spare_buffers = BufferPool::new(spares, framing::MESSAGE_BUFFER_BYTES);
        self.budget = budget;
        self
    }

    /// Appends `count` events that `write` puts down as complete lines, unless the queue is
    /// full or closed: then `write` comes back, for the caller to spool the events.
    pub fn push<W: FnOnce(&mut Vec<u8>)>(&self, count: usize, write: W) -> Result<(), W> {
        let before = self.queued.fetch_add(1, Ordering::Relaxed);
        if before >= self.capacity {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(write);
        }
        let mut shard = self.shards.local();
        // Checked under the shard's lock, which `close` takes after setting the flag: a push
        // either lands before the final drain of its shard or sees the flag.
        if self.closed.load(Ordering::Acquire) {
            drop(shard);
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(write);
        }
        if !shard
            .units
            .last()
            .is_some_and(|open| open.has_room_for(count))
        {
            let Some(unit) = self.new_unit() else {
                drop(shard);
                self.queued.fetch_sub(1, Ordering::Relaxed);
                return Err(write);
            };
            shard.units.push(unit);
        }
        let open = shard.units.last_mut().expect("a unit is open");
        open.append_with(count, write);
        if let Some(journal) = &self.journal {
            if !open.has_copy() {
                journal.count_unjournaled(count);
            }
        }
        shard.entries += 1;
        drop(shard);
        if before + 1 == self.half {
            self.filled_halfway.notify_one();
        }
        Ok(())
    }

    /// A unit in a spare buffer, with a slot in the journal when one is free; `None` when the
    /// budget's buffers are all in use.
    fn new_unit(&self) -> Option<EncodedEvents> {
        let permit = self.budget.try_take()?;
        let mut unit = EncodedEvents::reusing(self.spare_buffers.take());
        unit.hold(permit);
        if let Some(slot) = self.journal.as_ref().and_then(Journal::acquire) {
            unit.keep_copy_in(Box::new(slot));
        }
        Some(unit)
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_half_full(&self) -> bool {
        self.len() >= self.half
    }

    /// Asks the publisher to take what waits now, as if the queue were half full, and frees
    /// the spare buffers: the gateway is short of memory (`gateway.memoryLimit`), and events
    /// held for a broker that is away go to the spool on disk instead.
    pub fn request_spill(&self) {
        self.spare_buffers.release_spares();
        self.spill_wanted.store(true, Ordering::Relaxed);
        self.filled_halfway.notify_one();
    }

    /// Whether the publisher should take the queue now: it is half full, or a spill was
    /// asked for (which this answers).
    pub fn must_be_taken(&self) -> bool {
        self.spill_wanted.swap(false, Ordering::Relaxed) || self.is_half_full()
    }

    /// Completes once a push brings the queue to half its capacity (at once if one did since
    /// the last wait).
    pub async fn half_full(&self) {
        self.filled_halfway.notified().await
    }

    /// Takes everything waiting, shard by shard, oldest first within each.
    pub fn take_all(&self) -> Vec<EncodedEvents> {
        let (mut units, mut entries) = (Vec::new(), 0);
        self.shards.each(|shard| {
            if shard.entries > 0 {
                units.append(&mut shard.units);
                entries += std::mem::take(&mut shard.entries);
            }
        });
        self.queued.fetch_sub(entries, Ordering::Relaxed);
        units
    }

    /// Refuses pushes from now on and takes what is left.
    pub fn close(&self) -> Vec<EncodedEvents> {
        self.closed.store(true, Ordering::Release);
        self.take_all()
    }

    /// Gives the buffers of events that left the process back for the shards to fill.
    pub fn recycle(&self, units: Vec<EncodedEvents>) {
        self.spare_buffers
            .give_back(units.into_iter().map(EncodedEvents::into_buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> impl FnOnce(&mut Vec<u8>) {
        move |out: &mut Vec<u8>| {
            out.extend_from_slice(format!("{{\"eventId\":\"e{n}\"}}\n").as_bytes())
        }
    }

    fn ids(units: &[EncodedEvents]) -> Vec<String> {
        units
            .iter()
            .flat_map(|unit| {
                let data = unit.as_bytes();
                framing::lines(data)
                    .map(|range| String::from_utf8(data[range].to_vec()).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn events_come_out_in_order_in_units_a_message_long() {
        let queue = EventQueue::new(10_000, None);
        let total = framing::MAX_EVENTS_PER_MESSAGE + 10;
        for n in 0..total {
            assert!(queue.push(1, event(n)).is_ok());
        }
        assert_eq!(queue.len(), total);
        let taken = queue.take_all();
        assert!(queue.is_empty());
        let counts: Vec<usize> = taken.iter().map(EncodedEvents::count).collect();
        assert_eq!(counts, [framing::MAX_EVENTS_PER_MESSAGE, 10]);
        let expected: Vec<String> = (0..total)
            .map(|n| format!("{{\"eventId\":\"e{n}\"}}"))
            .collect();
        assert_eq!(ids(&taken), expected);
        assert!(queue.take_all().is_empty());
    }

    #[test]
    fn a_full_queue_hands_the_events_back() {
        let queue = EventQueue::new(2, None);
        assert!(queue.push(1, event(0)).is_ok());
        assert!(queue.push(1, event(1)).is_ok());
        let refused = queue.push(1, event(2)).expect_err("full");
        let mut spilled = Vec::new();
        refused(&mut spilled);
        assert_eq!(spilled, b"{\"eventId\":\"e2\"}\n");
        assert_eq!(ids(&queue.take_all()).len(), 2);
        assert!(queue.is_empty());
        assert!(queue.push(1, event(3)).is_ok(), "room again once taken");
    }

    #[test]
    fn units_past_the_buffer_budget_hand_their_events_back_until_a_unit_leaves() {
        let queue = EventQueue::new(10_000, None).bounded_by(BufferBudget::new(1, 1));
        let full = framing::MAX_EVENTS_PER_MESSAGE;
        for n in 0..full {
            assert!(queue.push(1, event(n)).is_ok());
        }
        assert!(
            queue.push(1, event(full)).is_err(),
            "a second unit is past the budget"
        );
        assert_eq!(queue.len(), full, "the refused push is not counted");
        let taken = queue.take_all();
        assert!(
            queue.push(1, event(full)).is_err(),
            "taken units still hold their buffer"
        );
        queue.recycle(taken);
        assert!(
            queue.push(1, event(full)).is_ok(),
            "room once the unit left"
        );
    }

    #[tokio::test]
    async fn the_push_that_fills_half_the_queue_wakes_the_publisher() {
        let queue = EventQueue::new(10, None);
        for n in 0..4 {
            assert!(queue.push(1, event(n)).is_ok());
        }
        assert!(!queue.is_half_full());
        let woken = tokio::time::timeout(std::time::Duration::from_millis(50), queue.half_full());
        assert!(woken.await.is_err(), "woken before half full");
        assert!(queue.push(1, event(4)).is_ok());
        assert!(queue.is_half_full());
        tokio::time::timeout(std::time::Duration::from_secs(5), queue.half_full())
            .await
            .expect("the fifth push wakes the publisher");
    }

    #[test]
    fn a_closed_queue_refuses_pushes_and_returns_what_waited() {
        let queue = EventQueue::new(10, None);
        assert!(queue.push(1, event(0)).is_ok());
        assert_eq!(ids(&queue.close()).len(), 1);
        assert!(queue.push(1, event(1)).is_err());
        assert!(queue.is_empty());
    }

    #[test]
    fn threads_write_to_shards_of_their_own_and_nothing_is_lost() {
        let queue = Arc::new(EventQueue::new(100_000, None));
        let writers: Vec<_> = (0..4)
            .map(|thread| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    for n in 0..5_000 {
                        assert!(queue.push(1, event(thread * 10_000 + n)).is_ok());
                    }
                })
            })
            .collect();
        let mut seen = Vec::new();
        while !writers.iter().all(|w| w.is_finished()) {
            seen.extend(ids(&queue.take_all()));
        }
        seen.extend(ids(&queue.take_all()));
        assert_eq!(seen.len(), 20_000);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 20_000, "every event once");
    }

    #[test]
    fn recycled_buffers_are_filled_again() {
        let queue = EventQueue::new(10, None);
        assert!(queue.push(1, event(0)).is_ok());
        let taken = queue.take_all();
        let address = taken[0].as_bytes().as_ptr();
        queue.recycle(taken);
        assert!(queue.push(1, event(1)).is_ok());
        let again = queue.take_all();
        assert_eq!(again[0].as_bytes().as_ptr(), address);
        assert_eq!(ids(&again), ["{\"eventId\":\"e1\"}"]);
    }
}
