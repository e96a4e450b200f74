//! Who the client is, and the forwarding headers a replica gets: `X-Forwarded-For`,
//! `X-Forwarded-Proto` and `X-Forwarded-Host`.
//!
//! A client can write any `X-Forwarded-*` it likes, so the gateway believes them only from the
//! proxies in front of it that `gateway.trustedProxies` names (a load balancer, a CDN), as
//! nginx's `set_real_ip_from` and Envoy's trusted hops do. From anyone else they are replaced:
//! `X-Forwarded-For` by the peer's address, the others by what the gateway itself saw. The
//! trace's `clientIp` is the same client.

use std::net::IpAddr;

use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;

use crate::config::AllowList;

// `HeaderName`s rather than strings: pingora-http then inserts them without parsing the name
// again (vendor/README.md, pingora-http's change 1).
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client of a request as the gateway believes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's address: the peer's, or, when the peer is a trusted proxy, the nearest
    /// address in `X-Forwarded-For` that is not one.
    pub ip: IpAddr,
    /// Whether the peer is a trusted proxy, whose `X-Forwarded-*` are passed on.
    pub via_trusted_proxy: bool,
}

impl Client {
    /// Reads the client of `request`, which came from `peer`.
    pub fn of(peer: IpAddr, request: &RequestHeader, trusted: &AllowList) -> Client {
        if !trusted.allows(peer) {
            return Client {
                ip: peer,
                via_trusted_proxy: false,
            };
        }
        let ip = request
            .headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .map_while(|hop| hop.parse::<IpAddr>().ok())
            .find(|hop| !trusted.allows(*hop))
            .unwrap_or(peer);
        Client {
            ip,
            via_trusted_proxy: true,
        }
    }
}

/// Sets the forwarding headers on the request to a replica. `peer_text` is the peer's address
/// as text, `https` whether the client reached the gateway over TLS.
pub fn set_headers(
    upstream_request: &mut RequestHeader,
    client: &Client,
    peer_text: HeaderValue,
    https: bool,
) -> Result<(), Box<pingora::Error>> {
    let chain = match upstream_request.headers.get(X_FORWARDED_FOR) {
        Some(previous) if client.via_trusted_proxy => {
            let chain = format!(
                "{}, {}",
                previous.to_str().unwrap_or(""),
                text_of(&peer_text)
            );
            HeaderValue::try_from(chain).unwrap_or(peer_text)
        }
        _ => peer_text,
    };
    upstream_request.insert_header(X_FORWARDED_FOR, chain)?;
    let keep = |request: &RequestHeader, name: &HeaderName| {
        client.via_trusted_proxy && request.headers.contains_key(name)
    };
    if !keep(upstream_request, &X_FORWARDED_PROTO) {
        let proto = if https { "https" } else { "http" };
        upstream_request.insert_header(X_FORWARDED_PROTO, proto)?;
    }
    if !keep(upstream_request, &X_FORWARDED_HOST) {
        match host_of(upstream_request) {
            Some(host) => upstream_request.insert_header(X_FORWARDED_HOST, host)?,
            None => {
                upstream_request.remove_header(&X_FORWARDED_HOST);
            }
        }
    }
    Ok(())
}

fn text_of(value: &HeaderValue) -> &str {
    value.to_str().unwrap_or("")
}

/// The host the client asked for: its `Host` field, or the authority of an absolute target.
fn host_of(request: &RequestHeader) -> Option<HeaderValue> {
    request
        .headers
        .get(http::header::HOST)
        .cloned()
        .or_else(|| {
            let authority = request.uri.authority()?;
            HeaderValue::try_from(authority.as_str()).ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("GET", b"/api/user/login", None).unwrap();
        for (name, value) in fields {
            request.append_header(name.to_string(), *value).unwrap();
        }
        request
    }

    fn trusted() -> AllowList {
        AllowList(vec![crate::config::Cidr::parse("10.0.0.0/8").unwrap()])
    }

    fn forwarded(peer: &str, fields: &[(&str, &str)], https: bool) -> (Client, RequestHeader) {
        let peer: IpAddr = peer.parse().unwrap();
        let mut request = request(fields);
        let client = Client::of(peer, &request, &trusted());
        let text = HeaderValue::try_from(peer.to_string()).unwrap();
        set_headers(&mut request, &client, text, https).unwrap();
        (client, request)
    }

    fn field(request: &RequestHeader, name: HeaderName) -> &str {
        request.headers.get(name).unwrap().to_str().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_wrote() {
        let fields = [
            ("host", "shop.example"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "bank.example"),
        ];
        let (client, request) = forwarded("203.0.113.9", &fields, false);
        assert_eq!(client.ip, "203.0.113.9".parse::<IpAddr>().unwrap());
        assert_eq!(field(&request, X_FORWARDED_FOR), "203.0.113.9");
        assert_eq!(field(&request, X_FORWARDED_PROTO), "http");
        assert_eq!(field(&request, X_FORWARDED_HOST), "shop.example");
    }

    #[test]
    fn a_trusted_proxy_passes_its_headers_and_names_the_client() {
        let fields = [
            ("host", "internal:8080"),
            ("x-forwarded-for", "198.51.100.7, 10.1.1.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
        ];
        let (client, request) = forwarded("10.9.9.9", &fields, false);
        // The nearest untrusted hop, read from the right: 10.1.1.1 is another trusted proxy.
        assert_eq!(client.ip, "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            field(&request, X_FORWARDED_FOR),
            "198.51.100.7, 10.1.1.1, 10.9.9.9"
        );
        assert_eq!(field(&request, X_FORWARDED_PROTO), "https");
        assert_eq!(field(&request, X_FORWARDED_HOST), "shop.example");
    }

    #[test]
    fn a_trusted_proxy_without_headers_gets_what_the_gateway_saw() {
        let (client, request) = forwarded("10.9.9.9", &[("host", "shop.example")], true);
        assert_eq!(client.ip, "10.9.9.9".parse::<IpAddr>().unwrap());
        assert_eq!(field(&request, X_FORWARDED_FOR), "10.9.9.9");
        assert_eq!(field(&request, X_FORWARDED_PROTO), "https");
        assert_eq!(field(&request, X_FORWARDED_HOST), "shop.example");
    }

    #[test]
    fn a_forged_hop_behind_a_trusted_proxy_stops_the_walk() {
        let fields = [("x-forwarded-for", "not-an-address, 198.51.100.7")];
        let (client, _) = forwarded("10.9.9.9", &fields, false);
        assert_eq!(client.ip, "198.51.100.7".parse::<IpAddr>().unwrap());
    }
}
