//! Distributed trace logs, from the request path to RabbitMQ: request identity, the event
//! document, and the publisher that carries events to the broker without blocking a request
//! or losing an event.
//!
//! # Layout
//! Imports point one way, down this list: a module uses only those above it.
//! - [`context`](TraceContext): `X-Request-Id` and the W3C trace context.
//! - `event`: the trace event document ([`TraceEvent`]), header redaction and body capping.
//! - `buffer_pool`: large buffers the queue and the publisher reuse, and the budget that
//!   bounds the queue's (`trace.bufferMaxBytes`).
//! - `stats`: what the pipeline did with events ([`PublisherStats`]), counted by all below.
//! - [`framing`]: several events per AMQP message, one JSON document per line; the format
//!   the publisher writes and the [`indexer`](crate::indexer) reads.
//! - `journal`: the queue's copy in a memory-mapped file, which outlives a SIGKILLed process.
//! - `spool`: segments on disk while the broker is away, and the lock that says whose a
//!   node's spool folder is.
//! - `queue`: the bounded in-process queue the request path writes events into.
//! - `adoption`: the spool folders of nodes that are gone, taken over by a live node.
//! - `publisher`: queue -> RabbitMQ (confirms), with the spool while the broker is away;
//!   [`TraceSink`] is the request path's end of it.
//! - [`amqp`]: connection and queue topology shared by the publisher and the indexer.
//! - [`search`]: a request's events read back from Elasticsearch, and the client the indexer
//!   shares.
//!
//! Tracing never blocks or fails a request: the request path only calls
//! [`TraceSink::emit`] or [`TraceSink::emit_with`], which never wait.

mod adoption;
pub mod amqp;
mod buffer_pool;
mod context;
mod event;
pub mod framing;
mod journal;
mod publisher;
mod queue;
pub mod search;
mod spool;
mod stats;

pub use buffer_pool::BufferBudget;
pub use context::{request_id_or_new, TraceContext, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
pub use event::{
    daily_index, new_event_id, AttemptTiming, BodyCapture, BodyKind, EventKind, Redactor,
    RequestInfo, Timing, TraceEvent, TraceTiming, ALWAYS_REDACTED, REDACTED,
};
pub use publisher::{
    remove_spool_if_empty, Publisher, PublisherSettings, RunningPublisher, TraceSink,
};
pub use spool::SpoolError;
pub use stats::PublisherStats;

pub use crate::config::rfc3339;
use crate::config::GomsConfig;

/// Header the gateway sets on each upstream attempt (1, 2, ...), read by the service SDK.
pub const ATTEMPT_HEADER: &str = "x-goms-attempt";

/// Parts of the pipeline that the crate's integration tests and benchmarks drive directly
/// (writing a spool segment as a crashed node would leave it, timing the queue). Not API.
#[doc(hidden)]
pub mod testing {
    pub use super::journal::Journal;
    pub use super::queue::EventQueue;
    pub use super::spool::Spool;
}

/// Publisher settings from the process config; see [`PublisherSettings::for_node`].
pub fn publisher_settings(config: &GomsConfig) -> PublisherSettings {
    PublisherSettings {
        brokers: amqp::Brokers::parse(&config.amqp_addr),
        queue: config.trace.queue.clone(),
        queue_type: config.trace.queue_type,
        queue_capacity: config.trace.queue_capacity,
        buffer_max_bytes: config.trace.buffer_max_bytes,
        publish_interval: config.trace.publish_interval,
        compression: config.trace.compression,
        spool_dir: config.trace.spool_dir.clone(),
        spool_max_bytes: config.trace.spool_max_bytes,
        journal: config.trace.journal,
        adopt_orphans: false,
    }
}

impl PublisherSettings {
    /// Gives the node its own spool subfolder, and has it adopt the sibling folders of nodes
    /// that are gone (see `trace::adoption`).
    pub fn for_node(mut self, node_label: &str) -> Self {
        let folder: String = node_label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.spool_dir = self.spool_dir.join(folder);
        self.adopt_orphans = true;
        self
    }
}

/// Locks a mutex of the trace pipeline, taking over a poisoned one. The request path and the
/// publisher share the queue's shards and the spool; a panic while one of them held the lock
/// (a bug) leaves at worst part of a line, which the consumer dead-letters, and stopping
/// tracing for good over it would lose every later event.
use crate::per_thread::lock;

/// Milliseconds as a float with microsecond precision, for `durationMs`.
pub fn millis(duration: std::time::Duration) -> f64 {
    (duration.as_micros() as f64) / 1000.0
}
