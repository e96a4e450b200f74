//! What a trace consumer needs to know: the queue it drains and the Elasticsearch it fills.

use std::time::Duration;

use crate::config::{GomsConfig, QueueType};
use crate::trace::amqp::Brokers;

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// `amqpAddr`: the broker, or brokers to fail over between.
    pub brokers: Brokers,
    pub queue: String,
    pub queue_type: QueueType,
    pub es_addr: String,
    pub index_prefix: String,
    pub batch_size: usize,
    pub batch_wait: Duration,
    pub prefetch: u16,
    pub max_backoff: Duration,
}

impl ConsumerSettings {
    /// The consumer's settings from the process config (`amqpAddr`, `esAddr`, `trace.queue`
    /// and the `traceConsumer` section).
    pub fn from_config(config: &GomsConfig) -> Self {
        let consumer = &config.trace_consumer;
        ConsumerSettings {
            brokers: Brokers::parse(&config.amqp_addr),
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
}
