//! What the trace and indexer tests share: a consumer process, synthetic events, raw
//! publishing with goms's topology, and reading the dead-letter queue.

use std::time::Duration;

use goms::trace::{EventKind, RequestInfo, TraceEvent, TraceTiming};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::BasicProperties;

use super::es_standin::EsStandIn;
use super::{eventually, Goms, RabbitMq};

pub fn consumer(name: &str, broker: &RabbitMq, es_url: &str, extra_env: &[(&str, &str)]) -> Goms {
    let amqp = broker.url();
    let mut env = vec![
        ("GOMS__AMQP_ADDR", amqp.as_str()),
        ("GOMS__ES_ADDR", es_url),
        ("GOMS__TRACE_CONSUMER__BATCH_WAIT", "50ms"),
        ("GOMS__TRACE_CONSUMER__MAX_BACKOFF", "500ms"),
    ];
    env.extend_from_slice(extra_env);
    Goms::spawn(name, &["trace-consumer"], &env)
}

/// Waits until `total` events are in the index, then checks that there are no more: none
/// twice, no strays.
pub async fn indexed_exactly(es: &EsStandIn, total: usize) {
    eventually(
        &format!("{total} events indexed"),
        Duration::from_secs(60),
        || {
            let es = es.clone();
            async move { es.document_count() >= total }
        },
    )
    .await;
    assert_eq!(
        es.document_count(),
        total,
        "duplicates or strays in the index"
    );
}

pub fn synthetic_event(id: usize) -> TraceEvent {
    TraceEvent {
        event_id: format!("synthetic-{id:05}"),
        request_id: format!("request-{}", id / 4),
        event: EventKind::RequestEnd,
        time: goms::config::now_rfc3339(),
        service_name: "gateway".into(),
        service_id: "test".into(),
        project_name: "goms".into(),
        request: RequestInfo::default().into(),
        trace: TraceTiming::default(),
        duration_ms: Some(1.5),
        status: Some(200),
        upstream: None,
        attempt: Some(1),
        trace_id: "0".repeat(32),
        span_id: "1".repeat(16),
        parent_span_id: None,
    }
}

/// Publishes raw payloads with goms's topology (persistent, confirmed), with the given
/// `content-encoding` if any.
pub async fn publish_encoded(
    broker: &RabbitMq,
    encoding: Option<&str>,
    payloads: impl IntoIterator<Item = Vec<u8>>,
) {
    let link = goms::trace::amqp::connect(&broker.url(), "goms.trace", Default::default())
        .await
        .unwrap();
    link.channel
        .confirm_select(Default::default())
        .await
        .unwrap();
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(encoding) = encoding {
        properties = properties.with_content_encoding(encoding.into());
    }
    for payload in payloads {
        link.channel
            .basic_publish(
                "".into(),
                "goms.trace".into(),
                BasicPublishOptions::default(),
                &payload,
                properties.clone(),
            )
            .await
            .unwrap();
    }
    assert!(link.channel.wait_for_confirms().await.unwrap().is_empty());
}

pub async fn publish(broker: &RabbitMq, payloads: impl IntoIterator<Item = Vec<u8>>) {
    publish_encoded(broker, None, payloads).await;
}

/// A message taken from a dead-letter queue: its body and the reason goms gave.
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub reason: String,
    pub content_encoding: Option<String>,
}

/// Takes every message now in `queue` (acknowledging them).
pub async fn take_all(broker: &RabbitMq, queue: &str) -> Vec<DeadLetter> {
    let (_connection, channel) = broker.channel().await;
    let mut letters = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let properties = &message.delivery.properties;
        let reason = properties
            .headers()
            .as_ref()
            .and_then(|headers| {
                headers
                    .inner()
                    .get(goms::trace::amqp::REASON_HEADER)
                    .cloned()
            })
            .and_then(|value| match value {
                lapin::types::AMQPValue::LongString(text) => Some(text.to_string()),
                _ => None,
            })
            .unwrap_or_default();
        letters.push(DeadLetter {
            body: message.delivery.data.clone(),
            reason,
            content_encoding: properties
                .content_encoding()
                .as_ref()
                .map(|e| e.to_string()),
        });
    }
    letters
}
