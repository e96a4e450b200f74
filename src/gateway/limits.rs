//! What a client may send: header size and count, target length, body size, and message
//! framing that a strict proxy refuses. Checked before a request is routed, so a refused
//! request never reaches a replica.

use std::sync::atomic::{AtomicU64, Ordering};

use pingora::http::RequestHeader;

use crate::config::LimitsConfig;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    HeaderBytes,
    HeaderCount,
    UriBytes,
    BodyBytes,
    /// `Content-Length` and `Transfer-Encoding` together: the framing that request smuggling
    /// exploits, which RFC 9112 section 6.1 lets a proxy refuse. pingora's HTTP/1 reader
    /// refuses it first (vendor patch 8); this stays for any other way a request arrives.
    AmbiguousFraming,
    /// The header did not arrive within `headerTimeout` (slowloris).
    HeaderTimeout,
    /// A header line ended by LF alone. RFC 9112 section 2.2 lets a recipient accept it,
    /// and pingora does; but a server behind another proxy may split lines differently,
    /// which is what smuggling needs, so a strict proxy refuses it (as Envoy does).
    BareLineFeed,
}

impl Refusal {
    const ALL: [Refusal; 7] = [
        Refusal::HeaderBytes,
        Refusal::HeaderCount,
        Refusal::UriBytes,
        Refusal::BodyBytes,
        Refusal::AmbiguousFraming,
        Refusal::HeaderTimeout,
        Refusal::BareLineFeed,
    ];

    pub fn status(self) -> u16 {
        match self {
            Refusal::HeaderBytes | Refusal::HeaderCount => 431,
            Refusal::UriBytes => 414,
            Refusal::BodyBytes => 413,
            Refusal::AmbiguousFraming | Refusal::BareLineFeed => 400,
            Refusal::HeaderTimeout => 408,
        }
    }

    /// The `reason` label of `goms_gateway_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::HeaderBytes => "header_bytes",
            Refusal::HeaderCount => "header_count",
            Refusal::UriBytes => "uri_bytes",
            Refusal::BodyBytes => "body_bytes",
            Refusal::AmbiguousFraming => "ambiguous_framing",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::BareLineFeed => "bare_lf",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::HeaderBytes => "request header fields too large (gateway.limits.headerBytes)",
            Refusal::HeaderCount => "too many request header fields (gateway.limits.headerCount)",
            Refusal::UriBytes => "request target too long (gateway.limits.uriBytes)",
            Refusal::BodyBytes => "request body too large (the route's maxBodyBytes)",
            Refusal::AmbiguousFraming => {
                "Content-Length and Transfer-Encoding together are refused"
            }
            Refusal::HeaderTimeout => {
                "the request header did not arrive in time (gateway.limits.headerTimeout)"
            }
            Refusal::BareLineFeed => "a request header line must end with CRLF, not LF alone",
        }
    }
}

/// The bytes pingora writes when a request header runs out of time: a complete 408 in the
/// envelope, with a request id of its own, and `Connection: close`.
pub fn header_timeout_answer() -> bytes::Bytes {
    let request_id = crate::trace::request_id_or_new(None);
    let envelope = serde_json::json!({
        "code": 408,
        "msg": Refusal::HeaderTimeout.message(),
        "status": false,
        "requestId": request_id,
    })
    .to_string();
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}: {request_id}\r\nconnection: close\r\n\r\n{envelope}",
        envelope.len(),
        crate::trace::REQUEST_ID_HEADER,
    )
    .into()
}

/// Refusals counted by reason, for `/metrics`.
#[derive(Debug, Default)]
pub struct RefusalCounts([AtomicU64; Refusal::ALL.len()]);

impl RefusalCounts {
    pub fn count(&self, refusal: Refusal) {
        let index = Refusal::ALL
            .iter()
            .position(|r| *r == refusal)
            .expect("listed");
        self.0[index].fetch_add(1, Ordering::Relaxed);
    }

    /// `(label, count)` for every reason.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL
            .iter()
            .zip(&self.0)
            .map(|(refusal, count)| (refusal.label(), count.load(Ordering::Relaxed)))
    }
}

/// Raises this process's soft open-files limit to its hard limit, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do, so that `maxConnections`, not EMFILE at accept, is what refuses
/// a connection. Each client connection may hold an upstream one, so the cap needs twice its
/// count; a hard limit below that is only warned about, since raising it needs privileges the
/// container may not have (compose's `ulimits` fails to start where Docker's own is lower).
pub fn raise_open_files_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256);
    if !raised {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-files limit");
    } else if limit.rlim_cur < needed {
        tracing::warn!(
            open_files = limit.rlim_cur,
            needed,
            "the open-files limit is below what gateway.limits.maxConnections needs; past it, accept fails instead of the cap refusing"
        );
    }
}

/// Checks a request header against the limits and the framing rules.
/// The idle and header timeouts of `limits` as pingora's server options; `on_header_timeout`
/// runs (to count it) each time a client is answered 408. The gateway's public listener and the
/// sidecar's share them.
pub fn server_options(
    limits: &LimitsConfig,
    on_header_timeout: impl Fn() + Send + Sync + 'static,
) -> pingora::apps::HttpServerOptions {
    let answer = move || {
        on_header_timeout();
        header_timeout_answer()
    };
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h1_idle_timeout = Some(limits.idle_timeout.as_secs().max(1));
    options.h1_header_timeout = Some((
        limits.header_timeout,
        pingora::protocols::http::v1::server::HeaderTimeoutAnswer(std::sync::Arc::new(answer)),
    ));
    options
}

pub fn check_header(limits: &LimitsConfig, header: &RequestHeader) -> Result<(), Refusal> {
    if header.raw_path().len() > limits.uri_bytes {
        return Err(Refusal::UriBytes);
    }
    if header.headers.len() > limits.header_count {
        return Err(Refusal::HeaderCount);
    }
    // As on the wire: `name: value` and CRLF.
    let bytes: usize = header
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > limits.header_bytes {
        return Err(Refusal::HeaderBytes);
    }
    let has = |name| header.headers.contains_key(name);
    if has(http::header::CONTENT_LENGTH) && has(http::header::TRANSFER_ENCODING) {
        return Err(Refusal::AmbiguousFraming);
    }
    Ok(())
}

/// Checks that every line of the raw request header (request line and fields, as read
/// off the wire) ends with CRLF.
pub fn check_line_endings(raw_header: &[u8]) -> Result<(), Refusal> {
    let mut rest = raw_header;
    let mut offset = 0;
    while let Some(at) = rest.iter().position(|b| *b == b'\n') {
        let end = offset + at;
        if end == 0 || raw_header[end - 1] != b'\r' {
            return Err(Refusal::BareLineFeed);
        }
        offset = end + 1;
        rest = &raw_header[offset..];
    }
    Ok(())
}

/// The body size `Content-Length` declares, if it declares one.
pub fn declared_body(header: &RequestHeader) -> Option<u64> {
    header
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The HTTP/2 server's limits: streams at once per connection, and the header list a client
/// may send (`gateway.limits.headerBytes`, as for HTTP/1). The `h2` crate's own bound on
/// streams reset before they were taken up (rapid reset, CVE-2023-44487) stays at its
/// default.
pub fn h2_options(limits: &LimitsConfig) -> pingora::protocols::http::v2::server::H2Options {
    let mut options = pingora::protocols::http::v2::server::H2Options::new();
    options
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.header_bytes).unwrap_or(u32::MAX));
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitsConfig {
        LimitsConfig {
            header_bytes: 200,
            header_count: 4,
            uri_bytes: 32,
            body_bytes: 10,
            ..LimitsConfig::default()
        }
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut header = RequestHeader::build("POST", uri.as_bytes(), None).unwrap();
        for (name, value) in headers {
            header.append_header(name.to_string(), *value).unwrap();
        }
        header
    }

    #[test]
    fn each_limit_refuses_with_its_status() {
        let limits = limits();
        assert_eq!(
            check_header(&limits, &request("/api/a/b", &[("host", "x")])),
            Ok(())
        );
        let long = format!("/api/a/b?{}", "q".repeat(40));
        assert_eq!(
            check_header(&limits, &request(&long, &[])).map_err(Refusal::status),
            Err(414)
        );
        let many = [("a", "1"), ("b", "1"), ("c", "1"), ("d", "1"), ("e", "1")];
        assert_eq!(
            check_header(&limits, &request("/", &many)),
            Err(Refusal::HeaderCount)
        );
        let big = "v".repeat(300);
        assert_eq!(
            check_header(&limits, &request("/", &[("x-big", &big)])).map_err(Refusal::status),
            Err(431)
        );
    }

    #[test]
    fn header_lines_must_end_with_crlf() {
        let good = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(check_line_endings(good), Ok(()));
        for bad in [
            &b"GET / HTTP/1.1\nHost: x\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\n",
            b"\n",
        ] {
            assert_eq!(
                check_line_endings(bad),
                Err(Refusal::BareLineFeed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused() {
        let both = request(
            "/",
            &[("content-length", "4"), ("transfer-encoding", "chunked")],
        );
        assert_eq!(
            check_header(&limits(), &both),
            Err(Refusal::AmbiguousFraming)
        );
        assert_eq!(
            declared_body(&request("/", &[("content-length", " 12 ")])),
            Some(12)
        );
    }
}
