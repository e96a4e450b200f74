//! Request identity: the Go original's `X-Request-Id` and the W3C trace context.

use uuid::Uuid;

/// Header carrying the Go original's request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Longest client-supplied request id that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Keeps a client's request id when it is well formed (1-128 visible ASCII characters from
/// a conservative set), otherwise makes a UUID.
pub fn request_id_or_new(client_value: Option<&[u8]>) -> String {
    match client_value {
        Some(value) if is_well_formed_request_id(value) => {
            String::from_utf8_lossy(value).into_owned()
        }
        _ => Uuid::new_v4().to_string(),
    }
}

fn is_well_formed_request_id(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_REQUEST_ID_LEN
        && value.iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'=')
        })
}

/// A W3C trace context: which trace this request belongs to and which span is ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// This hop's span, 16 hex digits.
    pub span_id: String,
    /// The caller's span, when the client sent a `traceparent`.
    pub parent_span_id: Option<String>,
    pub sampled: bool,
}

impl TraceContext {
    /// Continues the client's trace when its `traceparent` is valid, else starts one.
    pub fn continue_or_start(traceparent: Option<&[u8]>) -> Self {
        let span_id = new_span_id();
        match traceparent.and_then(parse_traceparent) {
            Some((trace_id, parent, sampled)) => TraceContext {
                trace_id,
                span_id,
                parent_span_id: Some(parent),
                sampled,
            },
            None => TraceContext {
                trace_id: Uuid::new_v4().simple().to_string(),
                span_id,
                parent_span_id: None,
                sampled: true,
            },
        }
    }

    /// The `traceparent` to send upstream: our span becomes the upstream's parent.
    pub fn traceparent(&self) -> String {
        // Built by hand: it is set on every proxied request, and `format!` costs several
        // times as much as these five appends.
        let mut value = String::with_capacity(3 + self.trace_id.len() + 1 + self.span_id.len() + 3);
        value.push_str("00-");
        value.push_str(&self.trace_id);
        value.push('-');
        value.push_str(&self.span_id);
        value.push_str(if self.sampled { "-01" } else { "-00" });
        value
    }
}

fn new_span_id() -> String {
    let mut hex = [0u8; uuid::fmt::Simple::LENGTH];
    Uuid::new_v4().simple().encode_lower(&mut hex)[..16].to_string()
}

/// Parses `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids are invalid per the spec.
fn parse_traceparent(value: &[u8]) -> Option<(String, String, bool)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut parts = text.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    if !valid {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace_id.to_string(), parent.to_string(), sampled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_well_formed_request_id() {
        assert_eq!(request_id_or_new(Some(b"abc-123")), "abc-123");
    }

    #[test]
    fn replaces_malformed_request_id() {
        for bad in [&b""[..], b"has space", b"new\nline", &[b'a'; 200][..]] {
            let id = request_id_or_new(Some(bad));
            assert!(Uuid::parse_str(&id).is_ok(), "{bad:?} -> {id}");
        }
    }

    #[test]
    fn continues_client_trace() {
        let parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::continue_or_start(Some(parent));
        assert_eq!(context.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(context.span_id, "00f067aa0ba902b7");
        assert!(context
            .traceparent()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    }

    #[test]
    fn traceparent_names_our_span_and_keeps_the_sampled_flag() {
        for (flags, sampled) in [("01", true), ("00", false)] {
            let parent = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
            let context = TraceContext::continue_or_start(Some(parent.as_bytes()));
            assert_eq!(context.sampled, sampled);
            assert_eq!(context.span_id.len(), 16);
            assert!(context
                .span_id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert_eq!(
                context.traceparent(),
                format!(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-{flags}",
                    context.span_id
                )
            );
        }
    }

    #[test]
    fn starts_trace_on_invalid_parent() {
        let zero = b"00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let context = TraceContext::continue_or_start(Some(zero));
        assert!(context.parent_span_id.is_none());
        assert_eq!(context.trace_id.len(), 32);
    }
}
