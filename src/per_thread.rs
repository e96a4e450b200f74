//! State written by every request thread and read rarely: a shard per thread, each behind a
//! lock of its own on cache lines of its own.
//!
//! A thread takes its shard's lock for each write, which no other thread wants unless a
//! reader is merging the shards at that moment: the request path shares no lock and no
//! cache line with the other threads. Readers ([`PerThread::each`]) visit every shard.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// More shards than request threads, so that threads rarely share one.
pub const SHARDS: usize = 32;

pub struct PerThread<T> {
    shards: Box<[CacheLine<Mutex<T>>]>,
}

/// Keeps each shard's lock on cache lines of its own: neighbouring shards belong to different
/// threads, which would otherwise take the line from each other at every write.
#[repr(align(128))]
#[derive(Default)]
struct CacheLine<T>(T);

impl<T: Default> Default for PerThread<T> {
    fn default() -> Self {
        PerThread {
            shards: (0..SHARDS).map(|_| CacheLine::default()).collect(),
        }
    }
}

impl<T> PerThread<T> {
    /// This thread's shard, locked.
    pub fn local(&self) -> MutexGuard<'_, T> {
        lock(&self.shards[shard_of_this_thread()].0)
    }

    /// Every shard, each locked in turn while `visit` runs.
    pub fn each(&self, mut visit: impl FnMut(&mut T)) {
        for shard in self.shards.iter() {
            visit(&mut lock(&shard.0));
        }
    }

    /// Every shard's lock, for callers that decide themselves how long to hold each.
    pub fn shards(&self) -> impl Iterator<Item = &Mutex<T>> {
        self.shards.iter().map(|shard| &shard.0)
    }
}

/// Locks a shard, taking over a poisoned one: a panic while a shard was held leaves at worst
/// one entry half written, which must not stop every later write.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The shard of the calling thread, picked once per thread.
pub fn shard_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_write_to_shards_of_their_own_and_readers_see_all() {
        let counts = std::sync::Arc::new(PerThread::<u64>::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counts = counts.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        *counts.local() += 1;
                    }
                    shard_of_this_thread()
                })
            })
            .collect();
        let mut used: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        used.sort();
        used.dedup();
        assert_eq!(used.len(), 4, "four threads, four shards");
        let mut total = 0;
        counts.each(|count| total += *count);
        assert_eq!(total, 4000);
    }
}
