//! The RabbitMQ side shared by publisher and consumer: which broker to link to ([`Brokers`],
//! [`Failover`]), connecting, and declaring the durable trace queue with its dead-letter
//! queue. Both sides declare the same topology, so either may start first.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

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

/// The brokers of `amqpAddr`: one URL, or several separated by `,` (the nodes of a RabbitMQ
/// cluster, or brokers that stand in for each other). A client links to one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers(Arc<[String]>);

impl Brokers {
    pub fn parse(text: &str) -> Brokers {
        let urls: Vec<String> = text
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(String::from)
            .collect();
        Brokers(urls.into())
    }

    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

/// Which broker a client tries next. It keeps to the broker it reached; when that one is lost
/// or cannot be reached, it moves to the next at once. Only once every broker of the list has
/// failed does it wait: 500 ms, doubling each time the whole list fails again, up to 3 s.
#[derive(Debug, Default)]
pub struct Failover {
    turn: usize,
    /// Failed attempts since the last link.
    failures: u32,
}

impl Failover {
    /// The URL to try now; `None` only when `brokers` is empty.
    pub fn current<'b>(&self, brokers: &'b Brokers) -> Option<&'b str> {
        let urls = brokers.urls();
        (!urls.is_empty()).then(|| urls[self.turn % urls.len()].as_str())
    }

    /// Failed attempts since the last link.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A link is up: its broker stays the one tried first.
    pub fn reached(&mut self) {
        self.failures = 0;
    }

    /// The current broker failed (or a link to it was lost): moves to the next one, and says
    /// how long to wait before trying it.
    pub fn failed(&mut self, brokers: &Brokers) -> Duration {
        let count = brokers.urls().len().max(1);
        self.turn = (self.turn + 1) % count;
        self.failures += 1;
        let rounds = (self.failures as usize).div_ceil(count) as u32;
        if self.failures as usize % count != 0 {
            // Another broker of this round is still untried.
            return Duration::ZERO;
        }
        Duration::from_millis((250u64 << rounds.min(4)).min(3_000))
    }
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

/// What goes to the dead-letter queue: the lines (or a whole message as it came), and why.
pub struct DeadLetter<'a> {
    pub payload: &'a [u8],
    /// One line, in the `x-goms-reason` header.
    pub reason: &'a str,
    /// The original message's encoding when it goes there as it came.
    pub content_encoding: Option<&'a str>,
}

/// Header of a dead-lettered message that says why it could not be indexed.
pub const REASON_HEADER: &str = "x-goms-reason";

/// Puts a letter on the dead-letter queue of `queue` and waits for the broker's confirm.
/// Rare, so it opens a confirm channel for each call instead of keeping one.
pub async fn dead_letter(link: &Link, queue: &str, letter: DeadLetter<'_>) -> Result<(), String> {
    let text = |e: lapin::Error| e.to_string();
    let channel = link.connection.create_channel().await.map_err(text)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(text)?;
    let mut headers = FieldTable::default();
    headers.insert(
        REASON_HEADER.into(),
        AMQPValue::LongString(letter.reason.into()),
    );
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(super::framing::CONTENT_TYPE.into())
        .with_headers(headers);
    if let Some(encoding) = letter.content_encoding {
        properties = properties.with_content_encoding(encoding.into());
    }
    let confirmation = channel
        .basic_publish(
            "".into(),
            dead_letter_queue(queue).as_str().into(),
            BasicPublishOptions::default(),
            letter.payload,
            properties,
        )
        .await
        .map_err(text)?
        .await
        .map_err(text)?;
    let _ = channel.close(200, "dead-lettered".into()).await;
    if confirmation.is_nack() {
        return Err("the broker refused (nack) a dead-letter message".into());
    }
    Ok(())
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
    use super::*;

    #[test]
    fn failover_moves_to_the_next_broker_at_once_and_waits_after_a_round() {
        let brokers = Brokers::parse("amqp://a, amqp://b,,amqp://c");
        assert_eq!(brokers.urls(), ["amqp://a", "amqp://b", "amqp://c"]);
        let mut failover = Failover::default();
        assert_eq!(failover.current(&brokers), Some("amqp://a"));
        assert_eq!(failover.failed(&brokers), Duration::ZERO);
        assert_eq!(failover.current(&brokers), Some("amqp://b"));
        assert_eq!(failover.failed(&brokers), Duration::ZERO);
        assert_eq!(failover.current(&brokers), Some("amqp://c"));
        // A whole round failed: wait before the next.
        assert_eq!(failover.failed(&brokers), Duration::from_millis(500));
        assert_eq!(failover.current(&brokers), Some("amqp://a"));
        failover.failed(&brokers);
        failover.failed(&brokers);
        assert_eq!(failover.failed(&brokers), Duration::from_millis(1_000));
        // A link to b: b is kept, and losing it moves on to c at once.
        failover.failed(&brokers);
        failover.reached();
        assert_eq!(failover.current(&brokers), Some("amqp://b"));
        assert_eq!(failover.failed(&brokers), Duration::ZERO);
        assert_eq!(failover.current(&brokers), Some("amqp://c"));
    }

    #[test]
    fn one_broker_waits_after_each_failure_up_to_three_seconds() {
        let brokers = Brokers::parse("amqp://only");
        let mut failover = Failover::default();
        let millis: Vec<u128> = (0..6)
            .map(|_| failover.failed(&brokers).as_millis())
            .collect();
        assert_eq!(millis, [500, 1_000, 2_000, 3_000, 3_000, 3_000]);
        assert_eq!(failover.current(&brokers), Some("amqp://only"));
    }

    #[test]
    fn password_is_hidden() {
        assert_eq!(
            redact_url("amqp://guest:secret@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(redact_url("amqp://rabbit:5672"), "amqp://rabbit:5672");
    }
}
