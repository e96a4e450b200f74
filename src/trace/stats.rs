//! What the trace pipeline did with events, counted for `/metrics`
//! (`goms_trace_events_*_total`): the request path, the queue's journal, the spool, adoption
//! and the publisher all count here, so it sits below them all but the buffer pool, whose
//! budget it reports (`goms_trace_buffer_bytes`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::buffer_pool::BufferBudget;

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
    /// Events queued without a copy in the journal (every slot in use, or a unit larger
    /// than a slot): a SIGKILL before they are confirmed or spooled loses them.
    pub unjournaled: AtomicU64,
    /// Events a previous run of this node held in memory when it died, found in the journal
    /// and spooled for replay.
    pub recovered: AtomicU64,
    /// Events moved into this node's spool from the folders of nodes that are gone.
    pub adopted: AtomicU64,
    /// Folders of nodes that are gone, adopted whole and removed.
    pub folders_adopted: AtomicU64,
    /// The queue's buffers in use and their bound (`trace.bufferMaxBytes`).
    pub buffers: Arc<BufferBudget>,
}

impl PublisherStats {
    /// Counters starting at 0, with the queue's buffer budget.
    pub fn with_buffers(buffers: Arc<BufferBudget>) -> Self {
        PublisherStats {
            buffers,
            ..PublisherStats::default()
        }
    }
}

impl PublisherStats {
    /// Appends `goms_trace_events_*_total` in Prometheus' text format: what the publisher
    /// did with events.
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let counters = [
            (
                "emitted",
                "Trace events produced on the request path.",
                &self.emitted,
            ),
            (
                "published",
                "Trace events confirmed by the broker.",
                &self.published,
            ),
            (
                "spooled",
                "Trace events written to the disk spool.",
                &self.spooled,
            ),
            (
                "overflowed",
                "Of the spooled events, those the request path wrote itself because the in-process queue was full.",
                &self.overflowed,
            ),
            (
                "dropped",
                "Trace events lost because the spool was full or unwritable.",
                &self.dropped,
            ),
            (
                "unjournaled",
                "Trace events queued without a copy in the journal, which a SIGKILL would lose.",
                &self.unjournaled,
            ),
            (
                "recovered",
                "Trace events a previous run of this node held in memory when it died, found in the journal and spooled.",
                &self.recovered,
            ),
            (
                "adopted",
                "Trace events taken over from the spool folders of nodes that are gone, replayed with this node's.",
                &self.adopted,
            ),
        ];
        for (name, help, counter) in counters {
            let name = format!("goms_trace_events_{name}_total");
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "# HELP goms_trace_spool_folders_adopted_total Spool folders of nodes that are gone, adopted whole and removed.");
        let _ = writeln!(out, "# TYPE goms_trace_spool_folders_adopted_total counter");
        let _ = writeln!(
            out,
            "goms_trace_spool_folders_adopted_total {}",
            self.folders_adopted.load(Ordering::Relaxed)
        );
        self.render_buffers(out);
    }

    /// `goms_trace_buffer_bytes` and its limit: the memory the queue's units hold, queued or
    /// in flight. Spare buffers kept for reuse are not counted.
    fn render_buffers(&self, out: &mut String) {
        use std::fmt::Write;
        let (in_use, limit) = self.buffers.bytes();
        let _ = writeln!(out, "# HELP goms_trace_buffer_bytes Memory held by trace event buffers: events queued, or sent and awaiting the broker's confirms.");
        let _ = writeln!(out, "# TYPE goms_trace_buffer_bytes gauge");
        let _ = writeln!(out, "goms_trace_buffer_bytes {in_use}");
        if let Some(limit) = limit {
            let _ = writeln!(out, "# HELP goms_trace_buffer_limit_bytes trace.bufferMaxBytes, in whole buffers; past it events go to the spool.");
            let _ = writeln!(out, "# TYPE goms_trace_buffer_limit_bytes gauge");
            let _ = writeln!(out, "goms_trace_buffer_limit_bytes {limit}");
        }
    }
}
