//! `Call-Service-Key` verification: every request must carry the shared key.
//!
//! The comparison is constant time, so response timing does not leak how much of a guessed
//! key was right. The key is never logged.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use subtle::ConstantTimeEq;

use crate::config::Secret;

pub const CALL_SERVICE_KEY_HEADER: &str = "call-service-key";
pub const SERVED_BY_HEADER: &str = "x-served-by";
const REQUEST_ID_HEADER: &str = "x-request-id";

/// What the middleware needs: the keys it accepts and this node's id for `X-Served-By`.
#[derive(Clone)]
pub struct Guard {
    pub keys: AcceptedKeys,
    pub node_id: HeaderValue,
}

/// The keys a service accepts: `callServiceKey`, and the `previousCallServiceKeys` that
/// gateways may still send while a new key rolls out.
#[derive(Debug, Clone)]
pub struct AcceptedKeys {
    keys: Vec<Secret>,
}

impl AcceptedKeys {
    pub fn new(current: Secret, previous: &[Secret]) -> Self {
        let mut keys = vec![current];
        keys.extend(previous.iter().filter(|k| !k.expose().is_empty()).cloned());
        AcceptedKeys { keys }
    }

    /// Whether `presented` is one of the keys. Every key is compared, in constant time, so
    /// the answer's timing says neither which key nor how much of one matched.
    pub fn accept(&self, presented: &[u8]) -> bool {
        self.keys.iter().fold(false, |matched, key| {
            matched | keys_match(presented, key.expose().as_bytes())
        })
    }
}

/// Refuses requests without the right key (401 JSON); stamps `X-Served-By` on every answer.
pub async fn require_key(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(CALL_SERVICE_KEY_HEADER)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let mut response = if guard.keys.accept(presented) {
        next.run(request).await
    } else {
        let request_id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        (StatusCode::UNAUTHORIZED, Json(refusal(request_id))).into_response()
    };
    response
        .headers_mut()
        .insert(SERVED_BY_HEADER, guard.node_id.clone());
    response
}

/// The 401 body, in the Go original's envelope.
pub fn refusal(request_id: &str) -> serde_json::Value {
    envelope(401, "Call-Service-Key is missing or wrong", request_id)
}

/// An error body in the Go original's envelope: `{"code","msg","status":false,"requestId"}`.
pub fn envelope(code: u16, msg: &str, request_id: &str) -> serde_json::Value {
    serde_json::json!({
        "code": code,
        "msg": msg,
        "status": false,
        "requestId": request_id,
    })
}

/// Whether the presented key is the expected one, in constant time.
pub fn keys_match(presented: &[u8], expected: &[u8]) -> bool {
    // ct_eq on slices of different lengths returns false without comparing contents; the
    // length of the key is not the secret.
    !expected.is_empty() && bool::from(presented.ct_eq(expected))
}

#[cfg(test)]
mod tests {
    use super::{keys_match, AcceptedKeys};
    use crate::config::Secret;

    #[test]
    fn the_current_key_and_every_previous_one_are_accepted_and_nothing_else() {
        let keys = AcceptedKeys::new(
            Secret::new("new"),
            &[Secret::new("old"), Secret::new(""), Secret::new("older")],
        );
        for accepted in ["new", "old", "older"] {
            assert!(keys.accept(accepted.as_bytes()), "{accepted}");
        }
        for refused in ["", "ne", "newer", "OLD"] {
            assert!(!keys.accept(refused.as_bytes()), "{refused}");
        }
    }

    #[test]
    fn only_the_exact_key_matches() {
        assert!(keys_match(b"secret", b"secret"));
        assert!(!keys_match(b"secreT", b"secret"));
        assert!(!keys_match(b"secret-longer", b"secret"));
        assert!(!keys_match(b"", b"secret"));
        assert!(!keys_match(b"", b""));
    }
}
