//! The RabbitMQ side shared by publisher and consumer: connecting and declaring the durable
//! trace queue with its dead-letter queue. Both sides declare the same topology, so either
//! may start first.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::config::QueueType;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("RabbitMQ at {url}: {source}")]
    Broker {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("RabbitMQ at {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// How long connecting and declaring may take before the broker counts as away.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The dead-letter queue of `queue`: messages the consumer can never index.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// An open connection and channel with the trace topology declared.
pub struct Link {
    pub connection: Connection,
    pub channel: Channel,
}

/// Hides the password of an AMQP URL for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

pub async fn connect(url: &str, queue: &str, queue_type: QueueType) -> Result<Link, AmqpError> {
    let shown = redact_url(url);
    let broker = |source| AmqpError::Broker {
        url: shown.clone(),
        source,
    };
    let attempt = async {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(broker)?;
        let channel = connection.create_channel().await.map_err(broker)?;
        declare_topology(&channel, queue, queue_type)
            .await
            .map_err(broker)?;
        Ok(Link {
            connection,
            channel,
        })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| AmqpError::Timeout {
            url: shown.clone(),
            timeout: CONNECT_TIMEOUT,
        })?
}

async fn declare_topology(
    channel: &Channel,
    queue: &str,
    queue_type: QueueType,
) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let typed = || {
        let mut arguments = FieldTable::default();
        if queue_type == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        arguments
    };
    let dead = dead_letter_queue(queue);
    channel
        .queue_declare(dead.as_str().into(), durable, typed())
        .await?;
    let mut arguments = typed();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead.as_str().into()),
    );
    channel
        .queue_declare(queue.into(), durable, arguments)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn password_is_hidden() {
        assert_eq!(
            super::redact_url("amqp://guest:secret@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(
            super::redact_url("amqp://rabbit:5672"),
            "amqp://rabbit:5672"
        );
    }
}
