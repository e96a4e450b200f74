//! Distributed trace logs: request identity, the event document, and the pipeline that
//! carries events from the request path to Elasticsearch.
//!
//! # Layout
//! - [`context`]: `X-Request-Id` and the W3C trace context.
//! - [`record`]: what the gateway learns about a request while it passes.
//! - [`event`]: the trace event document, header redaction and body capping.
//! - [`queue`]: the bounded in-process queue the request path writes events into.
//! - [`publisher`]: queue -> RabbitMQ (confirms), with [`spool`]
//!   on disk while the broker is away.
//! - [`framing`]: several events per AMQP message, one JSON document per line.
//! - [`buffer_pool`]: large buffers the queue and the publisher reuse.
//! - [`amqp`]: connection and queue topology shared by both ends.
//! - [`consumer`] and [`elasticsearch`]: RabbitMQ -> `_bulk` into daily indices.
//!
//! Tracing never blocks or fails a request: the request path only calls
//! [`TraceSink::emit`], which never waits.

pub mod amqp;
pub mod buffer_pool;
pub mod consumer;
pub mod context;
pub mod elasticsearch;
pub mod event;
pub mod framing;
pub mod json;
pub mod publisher;
pub mod queue;
pub mod record;
pub mod spool;

pub use context::{request_id_or_new, TraceContext, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
pub use event::{EventKind, Redactor, TraceEvent};
pub use publisher::{Publisher, PublisherSettings, RunningPublisher, TraceSink};
pub use record::{Attempt, RequestRecord};

pub use crate::config::rfc3339;
use crate::config::GomsConfig;

/// Header the gateway sets on each upstream attempt (1, 2, ...), read by the service SDK.
pub const ATTEMPT_HEADER: &str = "x-goms-attempt";

/// Publisher settings from the process config; see [`PublisherSettings::for_node`].
pub fn publisher_settings(config: &GomsConfig) -> PublisherSettings {
    PublisherSettings {
        amqp_url: config.amqp_addr.clone(),
        queue: config.trace.queue.clone(),
        queue_type: config.trace.queue_type,
        queue_capacity: config.trace.queue_capacity,
        publish_interval: config.trace.publish_interval,
        compression: config.trace.compression,
        spool_dir: config.trace.spool_dir.clone(),
        spool_max_bytes: config.trace.spool_max_bytes,
    }
}

impl PublisherSettings {
    /// Gives the node its own spool subfolder, so nodes sharing a disk never replay each
    /// other's events.
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
        self
    }
}

/// Consumer settings from the process config.
pub fn consumer_settings(config: &GomsConfig) -> consumer::ConsumerSettings {
    let consumer = &config.trace_consumer;
    consumer::ConsumerSettings {
        amqp_url: config.amqp_addr.clone(),
        queue: config.trace.queue.clone(),
        queue_type: config.trace.queue_type,
        es_addr: config.es_addr.clone(),
        index_prefix: consumer.index_prefix.clone(),
        batch_size: consumer.batch_size,
        batch_wait: consumer.batch_wait,
        prefetch: consumer.prefetch,
        max_backoff: consumer.max_backoff,
    }
}

/// Locks a mutex of the trace pipeline, taking over a poisoned one. The request path and the
/// publisher share the queue's shards and the spool; a panic while one of them held the lock
/// (a bug) leaves at worst part of a line, which the consumer dead-letters, and stopping
/// tracing for good over it would lose every later event.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds as a float with microsecond precision, for `durationMs`.
pub fn millis(duration: std::time::Duration) -> f64 {
    (duration.as_micros() as f64) / 1000.0
}
