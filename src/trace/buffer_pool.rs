//! Large buffers kept for reuse, for memory that is filled and let go many times a second:
//! the queue's message buffers and the publisher's compressed bodies.
//!
//! A fresh buffer of half a megabyte is not free even with a fast allocator: mimalloc hands
//! such sizes out from pages the kernel has to fault in and zero as they are first written,
//! a large share of the publisher thread's time (`docs/benchmarks-archive.md`). A buffer that is
//! reused stays mapped.
//!
//! [`BufferBudget`] bounds how many message buffers are in use at once (`trace.bufferMaxBytes`):
//! held by events that wait in the queue or were sent and await the broker's confirms.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;

pub struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
    /// Most buffers kept; past this a returned buffer is freed, so that a burst's worth of
    /// memory is not held for good.
    keep: usize,
    /// A new buffer's capacity; smaller ones are not kept.
    capacity: usize,
}

impl BufferPool {
    pub fn new(keep: usize, capacity: usize) -> Self {
        BufferPool {
            spare: Mutex::default(),
            keep,
            capacity,
        }
    }

    /// A buffer of at least the pool's capacity. A reused one keeps its length and contents:
    /// callers that append clear it, and callers that write into a slice find it already
    /// initialised.
    pub fn take(&self) -> Vec<u8> {
        lock(&self.spare)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// Frees every spare buffer (memory pressure: they are made again when needed).
    pub fn release_spares(&self) {
        let spares = std::mem::take(&mut *lock(&self.spare));
        drop(spares);
    }

    /// Keeps the buffers there is room for and frees the rest.
    pub fn give_back(&self, buffers: impl IntoIterator<Item = Vec<u8>>) {
        let mut buffers = buffers
            .into_iter()
            .filter(|buffer| buffer.capacity() >= self.capacity);
        let mut spare = lock(&self.spare);
        let room = self.keep.saturating_sub(spare.len());
        spare.extend(buffers.by_ref().take(room));
        drop(spare);
        // The rest are freed after the lock is released: freeing half a megabyte can hand
        // memory back to the OS, and a thread that needs a buffer meanwhile would wait on it.
        drop(buffers);
    }
}

/// How many message buffers may be in use at once, and how many are. A unit of events takes
/// a [`BufferPermit`] when it opens and gives it back when it drops: once its events are
/// confirmed by the broker or written to the spool.
#[derive(Debug)]
pub struct BufferBudget {
    in_use: AtomicUsize,
    limit: usize,
    /// What one buffer takes, for the byte figures.
    buffer_bytes: usize,
}

impl BufferBudget {
    pub fn new(limit: usize, buffer_bytes: usize) -> Arc<Self> {
        Arc::new(BufferBudget {
            in_use: AtomicUsize::new(0),
            limit,
            buffer_bytes,
        })
    }

    /// No bound: for a queue that is not the publisher's (benchmarks, tests).
    pub fn unlimited() -> Arc<Self> {
        Arc::default()
    }

    /// A permit for one more buffer, or `None` when all are in use.
    pub fn try_take(self: &Arc<Self>) -> Option<BufferPermit> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |in_use| {
                (in_use < self.limit).then_some(in_use + 1)
            })
            .ok()
            .map(|_| BufferPermit(self.clone()))
    }

    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn is_limited(&self) -> bool {
        self.limit != usize::MAX
    }

    /// The bytes the buffers in use take, and the most they may take (`None` unbounded).
    pub fn bytes(&self) -> (usize, Option<usize>) {
        let limit = self.is_limited().then(|| self.limit * self.buffer_bytes);
        (self.in_use() * self.buffer_bytes, limit)
    }
}

impl Default for BufferBudget {
    fn default() -> Self {
        BufferBudget {
            in_use: AtomicUsize::new(0),
            limit: usize::MAX,
            buffer_bytes: 0,
        }
    }
}

/// One buffer of a [`BufferBudget`] in use, until this drops.
#[derive(Debug)]
pub struct BufferPermit(Arc<BufferBudget>);

impl Drop for BufferPermit {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_hands_out_its_limit_and_takes_permits_back_as_they_drop() {
        let budget = BufferBudget::new(2, 100);
        let first = budget.try_take().expect("one");
        let _second = budget.try_take().expect("two");
        assert!(budget.try_take().is_none(), "past the limit");
        assert_eq!(budget.bytes(), (200, Some(200)));
        drop(first);
        assert_eq!(budget.in_use(), 1);
        assert!(budget.try_take().is_some(), "room again");
    }

    #[test]
    fn returned_buffers_are_handed_out_again_up_to_the_number_kept() {
        let pool = BufferPool::new(2, 64);
        assert!(pool.take().capacity() >= 64);
        let buffers: Vec<Vec<u8>> = (0..3).map(|_| Vec::with_capacity(64)).collect();
        let mut kept: Vec<_> = buffers[..2].iter().map(|buffer| buffer.as_ptr()).collect();
        pool.give_back(buffers);
        assert_eq!(lock(&pool.spare).len(), 2, "the third was freed");
        let mut reused: Vec<_> = [pool.take(), pool.take()]
            .iter()
            .map(|buffer| buffer.as_ptr())
            .collect();
        reused.sort();
        kept.sort();
        assert_eq!(reused, kept);
    }

    #[test]
    fn small_buffers_are_not_kept() {
        let pool = BufferPool::new(4, 1024);
        let small = Vec::with_capacity(16);
        pool.give_back([small]);
        assert!(pool.take().capacity() >= 1024);
    }

    #[test]
    fn a_reused_buffer_keeps_its_contents() {
        let pool = BufferPool::new(1, 8);
        let mut buffer = pool.take();
        buffer.extend_from_slice(b"abcdefgh");
        pool.give_back([buffer]);
        assert_eq!(pool.take(), b"abcdefgh");
    }
}
