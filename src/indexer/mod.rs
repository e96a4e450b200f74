//! The indexer: `goms trace-consumer`, which moves trace events from RabbitMQ into daily
//! Elasticsearch indices. It reads the messages the [`trace`](crate::trace) publisher writes
//! ([`framing`](crate::trace::framing)) and uses only `trace` and `config`.
//!
//! # Layout
//! - [`settings`]: the consumer's settings from `goms.yml`.
//! - [`consumer`]: the consume loop: batches, acks only after Elasticsearch accepted,
//!   retries with backoff, dead-letters what can never be indexed.
//! - [`elasticsearch`]: the index template and `_bulk` requests, and how their answers read.

pub mod consumer;
pub mod elasticsearch;
pub mod settings;

pub use consumer::{run, ConsumerStats};
pub use elasticsearch::TraceIndex;
pub use settings::ConsumerSettings;
