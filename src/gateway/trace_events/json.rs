//! A small JSON writer for the gateway's request path: writes a trace event straight from
//! the request into one buffer, where building a [`TraceEvent`](crate::trace::TraceEvent) first
//! would copy every header into a map of `String`s and serialise it again.
//!
//! Owns string escaping and the compaction of a JSON body, so that every event stays one
//! line of an NDJSON message whatever the client sent.

use serde::de::IgnoredAny;

/// Writes `value` as a quoted JSON string.
pub fn write_str(out: &mut Vec<u8>, value: &str) {
    out.reserve(value.len() + 2);
    out.push(b'"');
    let bytes = value.as_bytes();
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        at += plain_prefix_len(&bytes[at..]);
        let Some(&byte) = bytes.get(at) else { break };
        out.extend_from_slice(&bytes[copied..at]);
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(byte >> 4) as usize]);
                out.push(HEX[(byte & 0xf) as usize]);
            }
        }
        at += 1;
        copied = at;
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
}

/// How many leading bytes need no escaping: not a control character, `"` or `\`. Looks at
/// eight bytes at a time, since nearly every header and id has nothing to escape and this
/// loop is most of the cost of writing an event.
fn plain_prefix_len(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
        // A byte below 0x20 is one whose top three bits are zero.
        let special = has_zero(word & u64::from_ne_bytes([0xe0; 8]))
            | has_zero(word ^ u64::from_ne_bytes([b'"'; 8]))
            | has_zero(word ^ u64::from_ne_bytes([b'\\'; 8]));
        if special != 0 {
            break;
        }
        at += 8;
    }
    at + bytes[at..]
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
        .unwrap_or(bytes.len() - at)
}

/// Writes an unsigned integer in decimal.
pub fn write_uint(out: &mut Vec<u8>, value: u64) {
    let digits = value.checked_ilog10().map_or(1, |log| log as usize + 1);
    let start = out.len();
    out.resize(start + digits, b'0');
    put_digits(&mut out[start..], value);
}

/// Fills `slots` with the last `slots.len()` decimal digits of `value`, zero-padded; the
/// float and integer formatters cost more than the rest of an event's numbers together.
fn put_digits(slots: &mut [u8], mut value: u64) {
    for slot in slots.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Writes bytes as a JSON string; bytes that are not UTF-8 become U+FFFD.
pub fn write_lossy_str(out: &mut Vec<u8>, value: &[u8]) {
    write_str(out, &String::from_utf8_lossy(value));
}

/// Writes `text` without its insignificant whitespace if it is one valid JSON value, and
/// returns false (writing nothing) if it is not. A pretty-printed body must not break the
/// one-event-per-line framing.
pub fn write_compact(out: &mut Vec<u8>, text: &[u8]) -> bool {
    if serde_json::from_slice::<IgnoredAny>(text).is_err() {
        return false;
    }
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text {
        if in_string {
            out.push(byte);
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = byte == b'"';
            out.push(byte);
        }
    }
    true
}

/// Writes the members of one JSON object; [`Object::end`] closes it.
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    pub fn begin(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, empty: true }
    }

    /// Writes `"name":` and hands back the buffer for the value. `name` is written as it is:
    /// it must need no escaping, which holds for the schema's own field names and for HTTP
    /// header names (tokens). A name from a request body goes through [`Object::escaped_key`].
    pub fn key(&mut self, name: &str) -> &mut Vec<u8> {
        debug_assert_eq!(plain_prefix_len(name.as_bytes()), name.len(), "{name:?}");
        self.out.reserve(name.len() + 4);
        self.separate();
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    /// Like [`Object::key`], for a name that may need escaping.
    pub fn escaped_key(&mut self, name: &str) -> &mut Vec<u8> {
        self.separate();
        write_str(self.out, name);
        self.out.push(b':');
        self.out
    }

    /// A string member; the value is escaped.
    pub fn str(&mut self, name: &str, value: &str) -> &mut Self {
        write_str(self.key(name), value);
        self
    }

    /// A string member whose value needs no escaping by construction: a UUID, a hex id, an
    /// RFC 3339 time, a validated request id. Skips the scan that [`Object::str`] makes.
    pub fn plain_str(&mut self, name: &str, value: &str) -> &mut Self {
        debug_assert_eq!(plain_prefix_len(value.as_bytes()), value.len(), "{value:?}");
        let out = self.key(name);
        out.reserve(value.len() + 2);
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
        self
    }

    /// A value that is already JSON text (a number, `true`, a nested document).
    pub fn raw(&mut self, name: &str, json: &[u8]) -> &mut Self {
        self.key(name).extend_from_slice(json);
        self
    }

    pub fn uint(&mut self, name: &str, value: u64) -> &mut Self {
        write_uint(self.key(name), value);
        self
    }

    /// A duration in milliseconds with up to three decimals (microsecond precision): the
    /// same text as formatting `micros / 1000.0` as an `f64`, without the float formatter.
    pub fn millis(&mut self, name: &str, duration: std::time::Duration) -> &mut Self {
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        let out = self.key(name);
        write_uint(out, micros / 1000);
        if micros % 1000 != 0 {
            let mut fraction = *b".000";
            put_digits(&mut fraction[1..], micros % 1000);
            let end = fraction
                .iter()
                .rposition(|&b| b != b'0')
                .map_or(0, |last| last + 1);
            out.extend_from_slice(&fraction[..end]);
        }
        self
    }

    /// The comma before every member but the first.
    fn separate(&mut self) {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
    }

    /// Closes the object and hands back the buffer it was written into.
    pub fn end(self) -> &'a mut Vec<u8> {
        self.out.push(b'}');
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn written(write: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        write(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_round_trip_through_a_json_parser_with_controls_quotes_and_unicode() {
        let tricky = "a\"b\\c\nd\re\tf\u{1}g\u{7f}h é 漢 \u{1F600}";
        let json = written(|out| write_str(out, tricky));
        assert!(!json.contains('\n'));
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), tricky);
    }

    #[test]
    fn every_byte_position_of_a_long_string_is_checked() {
        for special in ['"', '\\', '\n', '\u{1f}', '\u{0}'] {
            for at in 0..40 {
                let mut text: String = "abcdefghijklmnopqrstuvwxyz0123456789ABCD".into();
                text.replace_range(at..at + 1, &special.to_string());
                let json = written(|out| write_str(out, &text));
                assert_eq!(
                    serde_json::from_str::<String>(&json).unwrap(),
                    text,
                    "{special:?} at {at}"
                );
            }
        }
    }

    #[test]
    fn millis_write_the_same_text_as_the_float_formatter() {
        for micros in [
            0,
            1,
            7,
            10,
            50,
            999,
            1000,
            1001,
            1230,
            1234,
            60_000_000,
            123_456_789,
        ] {
            let duration = std::time::Duration::from_micros(micros);
            let json = written(|out| {
                let mut object = Object::begin(out);
                object.millis("d", duration);
                object.end();
            });
            let expected = format!("{{\"d\":{}}}", micros as f64 / 1000.0);
            assert_eq!(json, expected, "{micros} µs");
        }
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for value in [0, 7, 10, 404, 65_535, u64::MAX] {
            assert_eq!(written(|out| write_uint(out, value)), value.to_string());
        }
    }

    #[test]
    fn names_from_a_request_are_escaped_and_known_names_are_not() {
        let json = written(|out| {
            let mut object = Object::begin(out);
            object.escaped_key("a\"b").extend_from_slice(b"1");
            object.plain_str("id", "4bf92f35").uint("n", 3);
            object.end();
        });
        assert_eq!(json, r#"{"a\"b":1,"id":"4bf92f35","n":3}"#);
        assert!(serde_json::from_str::<Value>(&json).is_ok());
    }

    #[test]
    fn bytes_that_are_not_utf8_become_replacement_characters() {
        let json = written(|out| write_lossy_str(out, b"ok\xffok"));
        assert_eq!(
            serde_json::from_str::<String>(&json).unwrap(),
            "ok\u{FFFD}ok"
        );
    }

    #[test]
    fn a_pretty_body_is_compacted_to_one_line_and_strings_keep_their_spaces() {
        let pretty = b"{\n  \"a b\": [1, 2],\n  \"q\": \"x \\\" y\\\\\",\n  \"n\": null\n}\n";
        let json = written(|out| assert!(write_compact(out, pretty)));
        assert_eq!(json, r#"{"a b":[1,2],"q":"x \" y\\","n":null}"#);
        assert_eq!(
            serde_json::from_str::<Value>(&json).unwrap(),
            serde_json::from_slice::<Value>(pretty).unwrap()
        );
    }

    #[test]
    fn invalid_json_is_refused_and_nothing_is_written() {
        let mut out = b"x".to_vec();
        assert!(!write_compact(&mut out, b"{\"a\":"));
        assert!(!write_compact(&mut out, b"{} {}"));
        assert_eq!(out, b"x");
    }

    #[test]
    fn objects_separate_members_and_nest() {
        let json = written(|out| {
            let mut object = Object::begin(out);
            object
                .str("s", "v")
                .millis("n", std::time::Duration::from_micros(1500))
                .raw("t", b"true");
            let mut inner = Object::begin(object.key("o"));
            inner.uint("i", 7);
            inner.end();
            object.end();
        });
        assert_eq!(json, r#"{"s":"v","n":1.5,"t":true,"o":{"i":7}}"#);
    }
}
