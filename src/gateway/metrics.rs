//! The gateway's counters: plain atomics the request path updates. The admin listener renders
//! them at `/metrics` ([`admin::metrics`](super::admin::metrics)), walking them only when
//! scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pingora::services::listening::ConnectionLimit;

use super::limits::RefusalCounts;

/// Status codes tracked one by one; anything else is counted as `other`.
pub(crate) const TRACKED_STATUS: [u16; 17] = [
    200, 201, 204, 400, 401, 403, 404, 405, 408, 413, 414, 429, 431, 500, 502, 503, 504,
];

pub struct GatewayMetrics {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    /// Requests whose client went away before the answer was complete.
    pub client_aborts: AtomicU64,
    pub(crate) by_status: [AtomicU64; TRACKED_STATUS.len()],
    pub(crate) other_status: AtomicU64,
    /// Requests refused by `gateway.limits` or the framing rules, by reason.
    pub refused: RefusalCounts,
    /// Client connections open and refused at `gateway.limits.maxConnections`.
    pub(crate) connections: Arc<ConnectionLimit>,
}

impl GatewayMetrics {
    /// Counters at zero, reading open and refused connections from the public listener's cap.
    pub fn new(connections: Arc<ConnectionLimit>) -> Self {
        GatewayMetrics {
            requests: AtomicU64::default(),
            retries: AtomicU64::default(),
            client_aborts: AtomicU64::default(),
            by_status: Default::default(),
            other_status: AtomicU64::default(),
            refused: RefusalCounts::default(),
            connections,
        }
    }

    pub fn count_status(&self, status: u16) {
        match TRACKED_STATUS.iter().position(|s| *s == status) {
            Some(index) => self.by_status[index].fetch_add(1, Ordering::Relaxed),
            None => self.other_status.fetch_add(1, Ordering::Relaxed),
        };
    }
}
