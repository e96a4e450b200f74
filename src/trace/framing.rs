//! How trace events travel in AMQP messages: several events per message, one JSON document
//! per line (NDJSON, `application/x-ndjson`).
//!
//! The broker's cost is per message, not per byte: one event per message held the broker
//! to about 16,000 events/s on a core, less than two events per gateway request at full
//! load. A message of up to [`MAX_EVENTS_PER_MESSAGE`] events (and [`MAX_MESSAGE_BYTES`])
//! cuts that cost by the batch size while keeping each event a complete document with its
//! own `eventId`, so the consumer still indexes, retries and dead-letters event by event. A
//! message that holds a single JSON object (one line) is a valid message too.
//!
//! Why 1,024: against 128 it cut RabbitMQ's CPU per traced request by about a fifth (7.3 to
//! 5.8 µs in `bench/compare.sh --tracing`). A consumer's prefetch counts messages, so it was
//! lowered with it (200 to 32): otherwise one consumer holds a whole backlog and the others
//! idle.

use super::event::TraceEvent;

/// MIME type of a trace message.
pub const CONTENT_TYPE: &str = "application/x-ndjson";
/// Most events in one message.
pub const MAX_EVENTS_PER_MESSAGE: usize = 1024;
/// A message is closed once it reaches this size, whatever its event count.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024;

/// Events already serialised: one JSON document per line, every line ending in `\n`. The
/// unit the request path queues, the spool stores and messages are cut from; a gateway
/// request's two events travel as one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedEvents {
    lines: Vec<u8>,
    count: usize,
}

impl EncodedEvents {
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a TraceEvent>) -> Self {
        let mut encoded = EncodedEvents::default();
        for event in events {
            serde_json::to_writer(&mut encoded.lines, event).expect("trace events serialise");
            encoded.lines.push(b'\n');
            encoded.count += 1;
        }
        encoded
    }

    /// Takes lines written by hand (the gateway's [`json`](super::json) writer). The
    /// caller guarantees that each of the `count` lines is one complete JSON document.
    pub fn from_lines(lines: Vec<u8>, count: usize) -> Self {
        debug_assert_eq!(event_count(&lines), count);
        debug_assert!(lines.ends_with(b"\n"));
        EncodedEvents { lines, count }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.lines
    }
}

/// Packs encoded events into as few messages as the limits allow, in order. A message is
/// cut between the units, never inside one.
pub fn encode(units: &[EncodedEvents]) -> Vec<Vec<u8>> {
    let mut messages = Vec::new();
    let mut rest = units;
    while !rest.is_empty() {
        let (fits, bytes) = message_extent(rest);
        // Sized once: growing a buffer of hundreds of kilobytes step by step copied each
        // message about twice more.
        let mut message = Vec::with_capacity(bytes);
        for unit in &rest[..fits] {
            message.extend_from_slice(&unit.lines);
        }
        messages.push(message);
        rest = &rest[fits..];
    }
    messages
}

/// How many leading units go into the next message, and their size in bytes: as many as the
/// limits allow, and at least one, so that an oversized unit still travels.
fn message_extent(units: &[EncodedEvents]) -> (usize, usize) {
    let (mut fits, mut events, mut bytes) = (0, 0, 0);
    for unit in units {
        let over = events + unit.count > MAX_EVENTS_PER_MESSAGE
            || bytes + unit.lines.len() > MAX_MESSAGE_BYTES;
        if fits > 0 && over {
            break;
        }
        fits += 1;
        events += unit.count;
        bytes += unit.lines.len();
    }
    (fits, bytes)
}

/// The events of a message, as byte ranges of its non-blank lines.
pub fn lines(data: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        while start < data.len() {
            let end = data[start..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(data.len(), |offset| start + offset);
            let range = start..end;
            start = end + 1;
            if !data[range.clone()].iter().all(u8::is_ascii_whitespace) {
                return Some(range);
            }
        }
        None
    })
}

/// How many events a message carries, without parsing them.
pub fn event_count(data: &[u8]) -> usize {
    lines(data).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-line unit: a small JSON document with an id, about 20 bytes.
    fn small(n: usize) -> EncodedEvents {
        EncodedEvents::from_lines(format!("{{\"eventId\":\"e{n}\"}}\n").into_bytes(), 1)
    }

    fn ids(messages: &[Vec<u8>]) -> Vec<String> {
        messages
            .iter()
            .flat_map(|m| {
                lines(m)
                    .map(|r| {
                        serde_json::from_slice::<serde_json::Value>(&m[r]).unwrap()["eventId"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn splits_into_messages_of_at_most_the_batch_size() {
        let total = 2 * MAX_EVENTS_PER_MESSAGE + 44;
        let units: Vec<_> = (0..total).map(small).collect();
        let messages = encode(&units);
        let counts: Vec<usize> = messages.iter().map(|m| event_count(m)).collect();
        assert_eq!(counts, [MAX_EVENTS_PER_MESSAGE, MAX_EVENTS_PER_MESSAGE, 44]);
        assert_eq!(
            ids(&messages),
            (0..total).map(|i| format!("e{i}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_message_is_closed_at_the_byte_limit_between_events() {
        // 8 KiB events: the byte limit closes a message long before the event limit does.
        let padding = "x".repeat(8192);
        let units: Vec<_> = (0..200)
            .map(|n| {
                let line = format!("{{\"eventId\":\"e{n}\",\"pad\":\"{padding}\"}}\n");
                EncodedEvents::from_lines(line.into_bytes(), 1)
            })
            .collect();
        let messages = encode(&units);
        assert!(messages.len() > 1);
        let line_bytes = units[0].as_bytes().len();
        for (index, message) in messages.iter().enumerate() {
            assert!(message.len() <= MAX_MESSAGE_BYTES);
            assert!(event_count(message) < MAX_EVENTS_PER_MESSAGE);
            if index + 1 < messages.len() {
                assert!(
                    message.len() + line_bytes > MAX_MESSAGE_BYTES,
                    "closed too early"
                );
            }
        }
        assert_eq!(
            ids(&messages),
            (0..200).map(|i| format!("e{i}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_request_s_two_events_stay_in_one_message() {
        let pairs = MAX_EVENTS_PER_MESSAGE / 2 + 36;
        let units: Vec<_> = (0..pairs)
            .map(|n| {
                let mut lines = small(2 * n).as_bytes().to_vec();
                lines.extend_from_slice(small(2 * n + 1).as_bytes());
                EncodedEvents::from_lines(lines, 2)
            })
            .collect();
        assert!(units.iter().all(|unit| unit.count() == 2));
        let counts: Vec<usize> = encode(&units).iter().map(|m| event_count(m)).collect();
        assert_eq!(counts, [MAX_EVENTS_PER_MESSAGE, 72]);
    }

    #[test]
    fn a_single_object_without_newline_is_one_event_and_blank_lines_are_skipped() {
        assert_eq!(lines(br#"{"a":1}"#).collect::<Vec<_>>(), vec![0..7]);
        assert_eq!(lines(b"x\n\n  \ny\n").collect::<Vec<_>>(), [0..1, 6..7]);
        assert_eq!(event_count(b""), 0);
    }
}
