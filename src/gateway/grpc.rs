//! gRPC at the gateway's edge: which requests are gRPC calls, the status a call gets when
//! the gateway answers it itself (gRPC clients read `grpc-status`, not a JSON envelope), and
//! the call's deadline (`grpc-timeout`).
//!
//! Routing is the route table's ([`crate::config::RouteTable::resolve_grpc`]); forwarding is
//! the proxy's, over h2c to the replica's `rpc` address.

use std::time::Duration;

use pingora::http::RequestHeader;
use pingora::http::ResponseHeader;
use pingora::protocols::http::HttpTask;
use pingora::proxy::Session;

use crate::trace::REQUEST_ID_HEADER;

pub const GRPC_STATUS: &str = "grpc-status";
pub const GRPC_MESSAGE: &str = "grpc-message";
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// How much later than the gateway's the replica's deadline falls. The replica still stops
/// working on an expired call, but the gateway's timer fires first, so the client reads the
/// gateway's `DEADLINE_EXCEEDED`: a tonic server answers its own expired deadline with
/// `CANCELLED`.
pub const REPLICA_DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

/// The gRPC status codes the gateway answers with
/// (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Unknown = 2,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    /// The status of a call the gateway refused or failed with HTTP `status`: gRPC's own
    /// mapping of HTTP statuses, except that the gateway's 504 is a deadline (the replica
    /// did not answer in time) and its 413, 414 and 431 are limits.
    pub fn of_http(status: u16) -> Code {
        match status {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 | 405 => Code::Unimplemented,
            408 | 504 => Code::DeadlineExceeded,
            413 | 414 | 431 => Code::ResourceExhausted,
            429 | 502 | 503 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }
}

/// Whether `request` is a gRPC call: `content-type: application/grpc`, bare or with a
/// subtype (`+proto`, `+json`). gRPC-Web is not: browsers cannot read gRPC's trailers, and
/// the gateway does not translate it.
pub fn is_grpc(request: &RequestHeader) -> bool {
    let Some(content_type) = request.headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let content_type = content_type.as_bytes();
    let Some(rest) = strip_prefix_ignore_case(content_type, b"application/grpc") else {
        return false;
    };
    matches!(rest.first(), None | Some(b'+' | b';'))
}

fn strip_prefix_ignore_case<'a>(text: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &text[prefix.len()..])
}

/// Answers a call with `code` and `message` and nothing else (gRPC's "trailers-only"
/// response): HTTP 200, the status in the header block, the stream ended.
pub async fn write_status(
    session: &mut Session,
    code: Code,
    message: &str,
    request_id: &str,
) -> pingora::Result<()> {
    let mut header = ResponseHeader::build(200, Some(4))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    header.insert_header(GRPC_STATUS, (code as u8).to_string())?;
    header.insert_header(GRPC_MESSAGE, percent_encode(message))?;
    if !request_id.is_empty() {
        header.insert_header(REQUEST_ID_HEADER, request_id)?;
    }
    // As a task: `write_response_header` drops its end-of-stream flag on HTTP/2, and the
    // empty DATA frame that then ends the stream makes gRPC's C core fail the call
    // ("Stream removed") where it should read the status.
    let header_alone = HttpTask::Header(Box::new(header), true);
    session.write_response_tasks(vec![header_alone]).await?;
    Ok(())
}

/// Ends a call whose answer has begun with `code` in its trailers: a replica that went away
/// mid-stream reaches the client as a status, not as a reset stream.
pub async fn write_status_trailers(
    session: &mut Session,
    code: Code,
    message: &str,
) -> pingora::Result<()> {
    let mut trailers = http::HeaderMap::with_capacity(2);
    trailers.insert(GRPC_STATUS, http::HeaderValue::from(code as u16));
    if let Ok(message) = http::HeaderValue::from_str(&percent_encode(message)) {
        trailers.insert(GRPC_MESSAGE, message);
    }
    session.write_response_trailers(trailers).await
}

/// `grpc-message` is percent-encoded UTF-8: anything outside printable ASCII, and `%`.
fn percent_encode(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The deadline a call asked for in `grpc-timeout`: at most 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`). `None` when absent or malformed, which gRPC reads as no deadline.
pub fn requested_timeout(request: &RequestHeader) -> Option<Duration> {
    let text = request.headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    parse_timeout(text)
}

fn parse_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// `timeout` as a `grpc-timeout` value, in the finest unit that keeps it within 8 digits,
/// rounded up so that the replica never gets less time than the gateway gives it.
pub fn timeout_text(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    for (unit, per) in [
        ("n", 1u128),
        ("u", 1_000),
        ("m", 1_000_000),
        ("S", 1_000_000_000),
        ("M", 60_000_000_000),
    ] {
        let amount = nanos.div_ceil(per);
        if amount <= MAX {
            return format!("{amount}{unit}");
        }
    }
    format!("{}H", nanos.div_ceil(3_600_000_000_000).min(MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(content_type: &str) -> RequestHeader {
        let mut request = RequestHeader::build("POST", b"/goms.echo.v1.Echo/Unary", None).unwrap();
        request
            .insert_header(http::header::CONTENT_TYPE, content_type)
            .unwrap();
        request
    }

    #[test]
    fn grpc_is_told_by_its_content_type_and_grpc_web_is_not_grpc() {
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC",
        ] {
            assert!(is_grpc(&request(grpc)), "{grpc}");
        }
        for other in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/json",
            "application/grpcx",
        ] {
            assert!(!is_grpc(&request(other)), "{other}");
        }
    }

    #[test]
    fn grpc_timeout_reads_every_unit_and_refuses_the_malformed() {
        assert_eq!(parse_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_timeout("9n"), Some(Duration::from_nanos(9)));
        for malformed in ["", "m", "100", "123456789m", "-1S", "1.5S", "10x"] {
            assert_eq!(parse_timeout(malformed), None, "{malformed:?}");
        }
    }

    #[test]
    fn a_timeout_written_back_reads_as_at_least_itself() {
        for timeout in [
            Duration::from_nanos(1),
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_secs(86_400 * 400),
        ] {
            let text = timeout_text(timeout);
            assert!(text.len() <= 9, "{text}");
            assert!(parse_timeout(&text).unwrap() >= timeout, "{text}");
        }
        assert_eq!(timeout_text(Duration::from_millis(25)), "25000000n");
        assert_eq!(timeout_text(Duration::from_millis(250)), "250000u");
        assert_eq!(timeout_text(Duration::from_secs(30)), "30000000u");
    }

    #[test]
    fn the_gateways_own_answers_map_to_grpc_statuses() {
        assert_eq!(Code::of_http(404), Code::Unimplemented);
        assert_eq!(Code::of_http(503), Code::Unavailable);
        assert_eq!(Code::of_http(504), Code::DeadlineExceeded);
        assert_eq!(Code::of_http(401), Code::Unauthenticated);
        assert_eq!(Code::of_http(413), Code::ResourceExhausted);
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("no route: 100%"), "no route: 100%25");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
