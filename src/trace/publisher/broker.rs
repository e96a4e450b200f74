//! Talking to RabbitMQ: opening a link in confirm mode, and sending events as persistent
//! messages whose confirms are awaited together.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, PublisherConfirm};

use super::PublisherSettings;
use crate::trace::amqp::{self, AmqpError, Link};
use crate::trace::framing::{self, BodyEncoder, EncodedEvents};

/// Longest wait for one batch's publishes, and again for its confirms, before the broker
/// counts as away.
pub(super) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the broker did not take a batch.
#[derive(Debug, thiserror::Error)]
pub(super) enum BrokerError {
    #[error(transparent)]
    Connect(#[from] AmqpError),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("publishing took longer than {CONFIRM_TIMEOUT:?}")]
    PublishTimeout,
    #[error("no publisher confirm within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout,
    #[error("broker refused (nack) a trace message")]
    Nacked,
    /// The task that talked to the broker ended early: a panic in lapin, or the runtime
    /// shutting down under it.
    #[error("publisher task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Connects to the broker at `url`, declares the topology and switches the channel to
/// publisher confirms.
pub(super) async fn open_confirmed_link(
    settings: PublisherSettings,
    url: String,
) -> Result<Link, BrokerError> {
    let link = amqp::connect(&url, &settings.queue, settings.queue_type).await?;
    link.channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(link)
}

/// Sends the events as persistent messages of several events each ([`framing`]) and waits
/// until the broker confirmed every message.
pub(super) async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    encoder: &BodyEncoder,
    events: &[EncodedEvents],
) -> Result<(), BrokerError> {
    await_confirms(publish(channel, queue, encoder, events).await?).await
}

/// Sends the events as persistent messages of several events each, compressed as configured
/// ([`framing`]), and returns the broker's confirms, to be awaited together: one confirm exchange
/// per batch, not per message.
async fn publish(
    channel: &Channel,
    queue: &str,
    encoder: &BodyEncoder,
    events: &[EncodedEvents],
) -> Result<Vec<PublisherConfirm>, BrokerError> {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(framing::CONTENT_TYPE.into());
    if let Some(encoding) = encoder.content_encoding() {
        properties = properties.with_content_encoding(encoding.into());
    }
    let mut bodies = Vec::new();
    for lines in framing::encode(events) {
        if !bodies.is_empty() {
            // The operating system's yield, not tokio's: compressing a batch's messages keeps
            // this core busy for milliseconds, and the one waiting for it is a proxy thread,
            // another OS thread, which tokio's yield_now would not let run. It returns at once
            // when nothing else waits for the core.
            std::thread::yield_now();
        }
        bodies.push(encoder.encode(lines));
    }
    // lapin copies a body into its frames before the publish resolves, so the buffers are
    // free again once every publish has (or the wait is given up).
    let publishes = bodies.iter().map(|body| {
        channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            properties.clone(),
        )
    });
    let sent =
        tokio::time::timeout(CONFIRM_TIMEOUT, futures::future::try_join_all(publishes)).await;
    encoder.recycle(bodies);
    Ok(sent.map_err(|_| BrokerError::PublishTimeout)??)
}

async fn await_confirms(confirms: Vec<PublisherConfirm>) -> Result<(), BrokerError> {
    let confirmations =
        tokio::time::timeout(CONFIRM_TIMEOUT, futures::future::try_join_all(confirms))
            .await
            .map_err(|_| BrokerError::ConfirmTimeout)??;
    if confirmations.iter().any(|c| !c.is_ack()) {
        return Err(BrokerError::Nacked);
    }
    Ok(())
}
