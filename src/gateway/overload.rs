//! The memory guard, after Envoy's overload manager: past `gateway.memoryLimit` of anonymous
//! resident memory, new requests get a 503 at once and the gateway gives back what it can
//! (the trace queue goes to the spool, the allocator returns its free pages), instead of
//! growing until the kernel's OOM killer ends it with every request in flight. Below
//! [`RECOVER_BELOW`] of the limit it lets requests in again by itself.
//!
//! The guard reads `RssAnon` from `/proc/self/status`: what the process itself holds. File
//! pages (the trace journal's mapping, the binary) are page cache, which the kernel takes back
//! under pressure before it kills anyone, so they do not count.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

/// How often the guard reads the process's memory: often enough to stop a burst before it
/// doubles, cheap enough to forget (one read of a /proc file).
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The share of the limit below which requests are let in again: a gap, so that the guard
/// does not switch on and off with every sample while memory hovers at the limit.
const RECOVER_BELOW: f64 = 0.9;

pub struct MemoryGuard {
    limit: u64,
    over: AtomicBool,
    /// The last reading of the process's anonymous resident memory, in bytes.
    pub resident_anon: AtomicU64,
    /// Requests answered 503 because the gateway was over its limit.
    pub refused: AtomicU64,
    /// Times the gateway went over its limit.
    pub trips: AtomicU64,
}

/// What a reading changed.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    None,
    WentOver,
    CameBack,
}

impl MemoryGuard {
    /// A guard at `limit` bytes, or `None` without one.
    pub fn new(limit: Option<u64>) -> Option<Arc<MemoryGuard>> {
        limit.map(|limit| {
            Arc::new(MemoryGuard {
                limit,
                over: AtomicBool::new(false),
                resident_anon: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                trips: AtomicU64::new(0),
            })
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether new requests are refused now.
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Reads the process's memory every [`SAMPLE_EVERY`] until `stopped` flips; while over the
    /// limit, calls `relieve` at each reading.
    pub async fn watch(self: Arc<Self>, relieve: impl Fn(), mut stopped: watch::Receiver<bool>) {
        loop {
            if let Some(anon) = resident_anon_bytes() {
                match self.observe(anon) {
                    Change::WentOver => warn!(
                        message = "Over gateway.memoryLimit: new requests get 503 until memory is back below 90% of it.",
                        resident_anon_bytes = anon,
                        limit_bytes = self.limit,
                    ),
                    Change::CameBack => info!(
                        message = "Back below gateway.memoryLimit: requests are let in again.",
                        resident_anon_bytes = anon,
                        limit_bytes = self.limit,
                        refused_total = self.refused.load(Ordering::Relaxed),
                    ),
                    Change::None => {}
                }
                if self.is_over() {
                    relieve();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                _ = stopped.changed() => return,
            }
        }
    }

    fn observe(&self, anon: u64) -> Change {
        self.resident_anon.store(anon, Ordering::Relaxed);
        let over = self.is_over();
        if !over && anon > self.limit {
            self.over.store(true, Ordering::Relaxed);
            self.trips.fetch_add(1, Ordering::Relaxed);
            Change::WentOver
        } else if over && (anon as f64) < self.limit as f64 * RECOVER_BELOW {
            self.over.store(false, Ordering::Relaxed);
            Change::CameBack
        } else {
            Change::None
        }
    }
}

/// The process's anonymous resident memory, from `/proc/self/status`; `None` off Linux.
pub fn resident_anon_bytes() -> Option<u64> {
    status_bytes(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "RssAnon:",
    )
}

/// A `/proc/PID/status` field given in kB, in bytes.
fn status_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The process's memory on `/metrics`: anonymous and file-backed resident memory apart (the
/// trace journal's mapped pages are the second kind), the allocator's committed and reserved
/// memory, and the guard's state when there is one.
pub fn render_prometheus(out: &mut String, guard: Option<&MemoryGuard>) {
    use std::fmt::Write;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let (committed, peak) = crate::allocator::committed();
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        );
    };
    for (field, name, help) in [
        (
            "RssAnon:",
            "goms_process_resident_anon_bytes",
            "Anonymous resident memory (RssAnon): what the memory guard judges.",
        ),
        (
            "RssFile:",
            "goms_process_resident_file_bytes",
            "File-backed resident memory (RssFile): page cache the kernel can take back.",
        ),
    ] {
        if let Some(bytes) = status_bytes(&status, field) {
            gauge(name, help, bytes);
        }
    }
    gauge(
        "goms_process_allocator_committed_bytes",
        "Memory the allocator (mimalloc) has committed.",
        committed,
    );
    gauge(
        "goms_process_allocator_committed_peak_bytes",
        "The most memory the allocator has had committed.",
        peak,
    );
    if let Some(reserved) = crate::allocator::reserved() {
        gauge(
            "goms_process_allocator_reserved_bytes",
            "Address space the allocator (mimalloc) has reserved: committed, and ready to commit.",
            reserved,
        );
    }
    let Some(guard) = guard else { return };
    gauge(
        "goms_gateway_memory_limit_bytes",
        "gateway.memoryLimit.",
        guard.limit,
    );
    gauge(
        "goms_gateway_memory_over_limit",
        "1 while new requests get 503 for gateway.memoryLimit.",
        u64::from(guard.is_over()),
    );
    for (name, help, value) in [
        (
            "goms_gateway_memory_refused_total",
            "Requests answered 503 because the gateway was over gateway.memoryLimit.",
            &guard.refused,
        ),
        (
            "goms_gateway_memory_trips_total",
            "Times the gateway went over gateway.memoryLimit.",
            &guard.trips,
        ),
    ] {
        let value = value.load(Ordering::Relaxed);
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_anon_is_read_in_bytes() {
        let status =
            "Name:\tgoms\nVmRSS:\t  51200 kB\nRssAnon:\t   30720 kB\nRssFile:\t   20480 kB\n";
        assert_eq!(status_bytes(status, "RssAnon:"), Some(30 * 1024 * 1024));
        assert_eq!(status_bytes(status, "RssFile:"), Some(20 * 1024 * 1024));
        assert_eq!(status_bytes("Name:\tgoms\n", "RssAnon:"), None);
        assert!(resident_anon_bytes().is_some_and(|bytes| bytes > 0));
    }

    #[test]
    fn the_guard_trips_past_the_limit_and_recovers_only_below_nine_tenths() {
        let guard = MemoryGuard::new(Some(100)).unwrap();
        assert_eq!(guard.observe(100), Change::None);
        assert_eq!(guard.observe(101), Change::WentOver);
        assert!(guard.is_over());
        assert_eq!(guard.observe(95), Change::None, "still within the gap");
        assert!(guard.is_over());
        assert_eq!(guard.observe(89), Change::CameBack);
        assert!(!guard.is_over());
        assert_eq!(guard.trips.load(Ordering::Relaxed), 1);
    }
}
