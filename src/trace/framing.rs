//! How trace events travel in AMQP messages: several events per message, one JSON document
//! per line (NDJSON, `application/x-ndjson`).
//!
//! Most of the broker's cost for small messages is per message: with one event per message
//! the broker could not keep up with a gateway at full load. A message of up to
//! [`MAX_EVENTS_PER_MESSAGE`] events (and [`MAX_MESSAGE_BYTES`])
//! cuts that cost by the batch size while keeping each event a complete document with its
//! own `eventId`, so the consumer still indexes, retries and dead-letters event by event. A
//! message that holds a single JSON object (one line) is a valid message too.
//!
//! Why 1,024: larger messages cost RabbitMQ less CPU per traced request than 128-event ones
//! (`docs/benchmarks-archive.md` has the rounds that measured both). A consumer's prefetch counts messages, so it is low (32) to match:
//! otherwise one consumer holds a whole backlog and the others idle.
//!
//! A message body may be compressed, as its AMQP `content-encoding` says ([`compress`],
//! [`decode`]). Publishers compress with LZ4 by default: past the per-message cost, the
//! broker's cost follows the bytes it receives, stores and delivers, and trace events
//! compress well for a fraction of that cost (figures in `docs/benchmarks-archive.md`). Consumers read both kinds, so
//! messages from older publishers and hand-made ones stay valid.

use std::borrow::Cow;

use super::buffer_pool::{BufferPermit, BufferPool};
use super::event::TraceEvent;
pub use crate::config::TraceCompression;

/// MIME type of a trace message.
pub const CONTENT_TYPE: &str = "application/x-ndjson";
/// `content-encoding` of an LZ4-compressed message.
pub const LZ4_ENCODING: &str = "lz4";
/// Most events in one message.
pub const MAX_EVENTS_PER_MESSAGE: usize = 1024;
/// A message is closed once it reaches this size, whatever its event count.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024;
/// What a buffer for a message's lines is sized for: a unit is closed only once it holds
/// [`MAX_MESSAGE_BYTES`], so a full one is a request's events larger. Buffers of exactly
/// that size would have to grow for nearly every full message.
pub const MESSAGE_BUFFER_BYTES: usize = MAX_MESSAGE_BYTES + 64 * 1024;
/// Largest message body a consumer will decompress. A publisher's messages are closed at
/// [`MAX_MESSAGE_BYTES`], but one oversized request travels whole, so the cap is generous;
/// it exists because an LZ4 body states its own decoded size, which must not be trusted.
pub const MAX_DECODED_BYTES: usize = 64 * 1024 * 1024;

/// The `content-encoding` a message body carries, if any.
pub fn content_encoding(compression: TraceCompression) -> Option<&'static str> {
    match compression {
        TraceCompression::Lz4 => Some(LZ4_ENCODING),
        TraceCompression::None => None,
    }
}

/// One message body, compressed as configured, in a buffer of its own (a hand-made
/// message); the publisher makes its bodies with [`BodyEncoder`], in reused buffers.
pub fn compress(compression: TraceCompression, lines: Cow<'_, [u8]>) -> Cow<'_, [u8]> {
    match compression {
        TraceCompression::Lz4 => {
            let mut body = Vec::new();
            let len = compress_lz4_into(&lines, &mut body);
            body.truncate(len);
            Cow::Owned(body)
        }
        TraceCompression::None => lines,
    }
}

/// Makes the publisher's message bodies as configured. LZ4 bodies are written into buffers
/// kept for reuse: [`BodyEncoder::recycle`] takes them back once the bodies are sent. A
/// batch's messages are all compressed before any is sent, because the broker spends more
/// CPU per event on messages that arrive one by one (`docs/benchmarks-archive.md`), so
/// each needs a buffer of its own.
pub struct BodyEncoder {
    compression: TraceCompression,
    buffers: BufferPool,
}

/// A message body from [`BodyEncoder::encode`].
pub enum Body<'a> {
    /// The NDJSON lines themselves (no compression).
    Plain(Cow<'a, [u8]>),
    /// The first `len` bytes of a pooled buffer.
    Compressed { buffer: Vec<u8>, len: usize },
}

impl Body<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Body::Plain(lines) => lines,
            Body::Compressed { buffer, len } => &buffer[..*len],
        }
    }
}

/// Compressed bodies' buffers kept: enough for the messages of a batch at full load; batches
/// in flight hold buffers only until they are sent, not until they are confirmed.
const SPARE_BODY_BUFFERS: usize = 24;

impl BodyEncoder {
    pub fn new(compression: TraceCompression) -> Self {
        let largest_body = 4 + lz4_flex::block::get_maximum_output_size(MESSAGE_BUFFER_BYTES);
        BodyEncoder {
            compression,
            buffers: BufferPool::new(SPARE_BODY_BUFFERS, largest_body),
        }
    }

    /// The `content-encoding` the bodies carry, if any.
    pub fn content_encoding(&self) -> Option<&'static str> {
        content_encoding(self.compression)
    }

    /// The body for a message's lines, compressed into a pooled buffer if so configured.
    pub fn encode<'a>(&self, lines: Cow<'a, [u8]>) -> Body<'a> {
        match self.compression {
            TraceCompression::None => Body::Plain(lines),
            TraceCompression::Lz4 => {
                let mut buffer = self.buffers.take();
                let len = compress_lz4_into(&lines, &mut buffer);
                Body::Compressed { buffer, len }
            }
        }
    }

    /// Takes back the buffers of bodies that were sent.
    pub fn recycle<'a>(&self, bodies: impl IntoIterator<Item = Body<'a>>) {
        self.buffers
            .give_back(bodies.into_iter().filter_map(|body| match body {
                Body::Compressed { buffer, .. } => Some(buffer),
                Body::Plain(_) => None,
            }));
    }
}

/// Writes the LZ4 body of `lines` to the start of `buffer` and returns its length: the LZ4
/// block format preceded by the decoded size as a 4-byte little-endian integer (what Python's
/// `lz4.block.compress` writes too). A reused `buffer` keeps its length between uses, so only
/// memory it never held is zeroed.
fn compress_lz4_into(lines: &[u8], buffer: &mut Vec<u8>) -> usize {
    let largest = 4 + lz4_flex::block::get_maximum_output_size(lines.len());
    if buffer.len() < largest {
        buffer.resize(largest, 0);
    }
    let decoded_size = u32::try_from(lines.len()).expect("messages are far below 4 GiB");
    buffer[..4].copy_from_slice(&decoded_size.to_le_bytes());
    let written = lz4_flex::block::compress_into(lines, &mut buffer[4..])
        .expect("the buffer holds LZ4's worst case");
    4 + written
}

/// Why a message body could not be turned back into NDJSON lines.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("unknown content-encoding `{0}` (goms writes `lz4` or none)")]
    UnknownEncoding(String),
    #[error("LZ4 body of {0} bytes is too short to hold its decoded size")]
    Truncated(usize),
    #[error("LZ4 body claims {claimed} decoded bytes, more than the {MAX_DECODED_BYTES} allowed")]
    TooLarge { claimed: usize },
    #[error("LZ4 body is corrupt: {0}")]
    Corrupt(String),
}

/// A message body as NDJSON lines, decompressed if its `content-encoding` says so. Plain
/// bodies are borrowed, not copied.
pub fn decode<'a>(
    content_encoding: Option<&str>,
    body: &'a [u8],
) -> Result<Cow<'a, [u8]>, DecodeError> {
    match content_encoding.map(str::trim) {
        None | Some("") | Some("identity") => Ok(Cow::Borrowed(body)),
        Some(encoding) if encoding.eq_ignore_ascii_case(LZ4_ENCODING) => decode_lz4(body),
        Some(other) => Err(DecodeError::UnknownEncoding(other.to_string())),
    }
}

fn decode_lz4(body: &[u8]) -> Result<Cow<'_, [u8]>, DecodeError> {
    let (size, compressed) = body
        .split_first_chunk::<4>()
        .ok_or(DecodeError::Truncated(body.len()))?;
    let claimed = u32::from_le_bytes(*size) as usize;
    if claimed > MAX_DECODED_BYTES {
        return Err(DecodeError::TooLarge { claimed });
    }
    let lines = lz4_flex::block::decompress(compressed, claimed)
        .map_err(|error| DecodeError::Corrupt(error.to_string()))?;
    if lines.len() != claimed {
        return Err(DecodeError::Corrupt(format!(
            "decoded {} bytes, the header says {claimed}",
            lines.len()
        )));
    }
    Ok(Cow::Owned(lines))
}

/// Events already serialised: one JSON document per line, every line ending in `\n`. The
/// unit the request path queues, the spool stores and messages are cut from; a gateway
/// request's two events travel as one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedEvents {
    lines: Vec<u8>,
    count: usize,
    /// What the queue holds for these events until they are confirmed or spooled.
    held: Held,
}

/// Somewhere a unit keeps a copy of its lines for as long as it lives: the queue's slot in
/// the journal. Framing sees only this trait, so that it does not depend on the journal,
/// which depends on framing.
pub trait KeepsCopy: Send + Sync + std::fmt::Debug {
    /// Copies `lines`, appended to the unit that now holds `count` events in all.
    fn copy(&mut self, lines: &[u8], appended: usize, count: usize);
}

/// What a queued unit holds while it lives: its copy in the journal, if it has one (see
/// `trace::journal`), and its place in the queue's [`BufferBudget`]. A clone holds neither
/// (only the queued unit counts), and two units compare by their events alone.
#[derive(Debug, Default)]
struct Held {
    // Fields drop in order: the slot is free before the permit is, and the journal has a slot
    // per permit, so a unit that got a permit always finds a slot.
    copy: Option<Box<dyn KeepsCopy>>,
    permit: Option<BufferPermit>,
}

impl Clone for Held {
    fn clone(&self) -> Self {
        Held::default()
    }
}

impl PartialEq for Held {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Held {}

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

    /// Takes lines written by hand (the gateway's JSON writer, `gateway::trace_events::json`). The
    /// caller guarantees that each of the `count` lines is one complete JSON document.
    pub fn from_lines(lines: Vec<u8>, count: usize) -> Self {
        let mut encoded = EncodedEvents::default();
        encoded.append_with(count, |out| *out = lines);
        encoded
    }

    /// An empty unit that writes into `buffer`'s allocation (see [`EncodedEvents::into_buffer`]).
    pub fn reusing(mut buffer: Vec<u8>) -> Self {
        buffer.clear();
        EncodedEvents {
            lines: buffer,
            count: 0,
            held: Held::default(),
        }
    }

    /// Counts these events' buffer in the queue's budget until they are dropped.
    pub(super) fn hold(&mut self, permit: BufferPermit) {
        self.held.permit = Some(permit);
    }

    /// Copies these events, and every later append, into `slot` until they are dropped.
    pub(super) fn keep_copy_in(&mut self, mut slot: Box<dyn KeepsCopy>) {
        if !self.lines.is_empty() {
            slot.copy(&self.lines, self.count, self.count);
        }
        self.held.copy = Some(slot);
    }

    pub(super) fn has_copy(&self) -> bool {
        self.held.copy.is_some()
    }

    /// The allocation, for [`EncodedEvents::reusing`].
    pub fn into_buffer(self) -> Vec<u8> {
        // The journal's slot and the budget's permit, if any, are freed here: the events
        // left the process.
        self.lines
    }

    /// Appends `count` events that `write` puts down after what is there, each a complete
    /// JSON document on a line of its own.
    pub fn append_with(&mut self, count: usize, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.lines.len();
        write(&mut self.lines);
        debug_assert_eq!(event_count(&self.lines[start..]), count);
        debug_assert!(self.lines.ends_with(b"\n"));
        self.count += count;
        if let Some(slot) = &mut self.held.copy {
            slot.copy(&self.lines[start..], count, self.count);
        }
    }

    /// Whether `count` more events may join these: not past [`MAX_EVENTS_PER_MESSAGE`]
    /// events, and not once they hold [`MAX_MESSAGE_BYTES`]. A unit filled until this says
    /// no is always a message of its own in [`encode`], sent without a copy.
    pub fn has_room_for(&self, count: usize) -> bool {
        self.count + count <= MAX_EVENTS_PER_MESSAGE && self.lines.len() < MAX_MESSAGE_BYTES
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.lines
    }
}

/// Packs encoded events into as few messages as the limits allow, in order. A message is
/// cut between the units, never inside one. A unit that makes a message alone (the
/// publisher's queue fills units up to the limits) is borrowed, not copied.
pub fn encode(units: &[EncodedEvents]) -> Vec<Cow<'_, [u8]>> {
    let mut messages = Vec::new();
    let mut rest = units;
    while !rest.is_empty() {
        let (fits, bytes) = message_extent(rest);
        if fits == 1 {
            messages.push(Cow::Borrowed(rest[0].as_bytes()));
        } else {
            // Sized once: growing a buffer of hundreds of kilobytes step by step copied each
            // message about twice more.
            let mut message = Vec::with_capacity(bytes);
            for unit in &rest[..fits] {
                message.extend_from_slice(&unit.lines);
            }
            messages.push(Cow::Owned(message));
        }
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

    fn ids(messages: &[Cow<'_, [u8]>]) -> Vec<String> {
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
    fn a_unit_filled_to_the_limits_is_a_message_of_its_own_and_not_copied() {
        let mut full = EncodedEvents::default();
        let mut n = 0;
        while full.has_room_for(1) {
            full.append_with(1, |out| out.extend_from_slice(small(n).as_bytes()));
            n += 1;
        }
        assert_eq!(full.count(), MAX_EVENTS_PER_MESSAGE);
        let units = [full, small(n), small(n + 1)];
        let messages = encode(&units);
        assert_eq!(messages.len(), 2);
        assert!(
            matches!(&messages[0], Cow::Borrowed(m) if m.as_ptr() == units[0].as_bytes().as_ptr())
        );
        assert_eq!(event_count(&messages[1]), 2);
        assert_eq!(ids(&messages).len(), n + 2);
    }

    #[test]
    fn lz4_messages_decode_to_their_lines_and_plain_ones_are_borrowed() {
        let units: Vec<_> = (0..300).map(small).collect();
        let plain = encode(&units).remove(0);
        let body = compress(TraceCompression::Lz4, plain.clone());
        assert!(body.len() * 3 < plain.len(), "similar events compress well");
        let encoding = content_encoding(TraceCompression::Lz4);
        assert_eq!(encoding, Some("lz4"));
        assert_eq!(decode(encoding, &body).unwrap().as_ref(), &plain[..]);
        assert_eq!(decode(Some(" LZ4 "), &body).unwrap().as_ref(), &plain[..]);

        assert_eq!(content_encoding(TraceCompression::None), None);
        let same = compress(TraceCompression::None, plain.clone());
        assert_eq!(same, plain);
        for encoding in [None, Some(""), Some("identity")] {
            assert!(matches!(decode(encoding, &same).unwrap(), Cow::Borrowed(_)));
        }
    }

    #[test]
    fn pooled_bodies_are_lz4_blocks_with_their_size_in_front() {
        let (many, one): (Vec<_>, _) = ((0..600).map(small).collect(), [small(7)]);
        let (large, short) = (encode(&many).remove(0), encode(&one).remove(0));
        let encoder = BodyEncoder::new(TraceCompression::Lz4);
        assert_eq!(encoder.content_encoding(), Some(LZ4_ENCODING));
        let mut first_buffer = None;
        // The short body follows the large one in the same buffer, whose tail still holds
        // the large body's bytes.
        for plain in [&large, &short, &large] {
            let body = encoder.encode(plain.clone());
            // lz4_flex's own writer of that format, as a reference.
            let reference = lz4_flex::block::compress_prepend_size(plain);
            assert_eq!(body.as_bytes(), reference);
            assert_eq!(compress(TraceCompression::Lz4, plain.clone()), reference);
            assert_eq!(
                decode(Some(LZ4_ENCODING), body.as_bytes())
                    .unwrap()
                    .as_ref(),
                &plain[..]
            );
            let address = body.as_bytes().as_ptr();
            assert_eq!(*first_buffer.get_or_insert(address), address, "reused");
            encoder.recycle([body]);
        }

        let plain_encoder = BodyEncoder::new(TraceCompression::None);
        assert_eq!(plain_encoder.content_encoding(), None);
        let body = plain_encoder.encode(Cow::Borrowed(&short[..]));
        assert_eq!(body.as_bytes().as_ptr(), short.as_ptr(), "not copied");
    }

    #[test]
    fn bodies_that_cannot_be_decoded_say_why() {
        assert_eq!(
            decode(Some("gzip"), b"x"),
            Err(DecodeError::UnknownEncoding("gzip".into()))
        );
        assert_eq!(
            decode(Some("lz4"), b"\x01\0"),
            Err(DecodeError::Truncated(2))
        );
        // The decoded size comes from the message: a huge claim is refused before allocating.
        let claim = (MAX_DECODED_BYTES as u32 + 1).to_le_bytes();
        assert_eq!(
            decode(Some("lz4"), &claim),
            Err(DecodeError::TooLarge {
                claimed: MAX_DECODED_BYTES + 1
            })
        );
        let mut body = compress(TraceCompression::Lz4, small(1).as_bytes().into()).into_owned();
        body.truncate(body.len() - 3);
        assert!(matches!(
            decode(Some("lz4"), &body),
            Err(DecodeError::Corrupt(_))
        ));
        // A header that overstates the size is caught too.
        let mut body = compress(TraceCompression::Lz4, small(1).as_bytes().into()).into_owned();
        body[0] += 10;
        assert!(matches!(
            decode(Some("lz4"), &body),
            Err(DecodeError::Corrupt(_))
        ));
    }

    #[test]
    fn a_single_object_without_newline_is_one_event_and_blank_lines_are_skipped() {
        assert_eq!(lines(br#"{"a":1}"#).collect::<Vec<_>>(), vec![0..7]);
        assert_eq!(lines(b"x\n\n  \ny\n").collect::<Vec<_>>(), [0..1, 6..7]);
        assert_eq!(event_count(b""), 0);
    }
}
