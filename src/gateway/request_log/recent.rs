//! The last requests this gateway handled, in a bounded ring per request thread: what the
//! dashboard lists and what a request's timeline is drawn from (the gateway's part of it).
//!
//! The request path hands over the [`RequestRecord`] the trace was written from, as it is:
//! nothing is formatted until an admin client asks ([`SeenRequest`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::gateway::record::RequestRecord;
use crate::trace::{millis, rfc3339};

/// Requests kept, newest across all threads; the oldest goes when a new one comes.
pub const KEPT: usize = 1_000;

/// A request that ended, as the request path leaves it.
#[derive(Debug)]
pub struct FinishedRequest {
    pub record: RequestRecord,
    pub method: http::Method,
    pub uri: http::Uri,
    /// The route's service and key (`service/route`), for a request that matched one.
    pub service: Option<Arc<str>>,
    pub route: Option<Arc<str>>,
    /// 0 when no answer went out.
    pub status: u16,
    pub duration: Duration,
}

impl FinishedRequest {
    /// The replica that answered (the last attempt's).
    pub fn replica(&self) -> Option<&Arc<str>> {
        self.record.attempts.last().map(|attempt| &attempt.node_id)
    }

    /// An answer of 500 and above, or none at all.
    pub fn is_error(&self) -> bool {
        self.status == 0 || self.status >= 500
    }
}

/// One request as the gateway saw it, in the dashboard's JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SeenRequest {
    pub request_id: String,
    /// When the request arrived, RFC 3339.
    pub time: String,
    pub method: String,
    pub path: String,
    pub service: Option<Arc<str>>,
    /// 0 when no answer went out.
    pub status: u16,
    pub duration_ms: f64,
    /// The replica that answered (the last attempt's).
    pub replica: Option<Arc<str>>,
    pub attempts: Vec<SeenAttempt>,
}

/// One try at a replica, timed from the request's arrival.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SeenAttempt {
    pub replica: Arc<str>,
    pub upstream: Arc<str>,
    pub offset_ms: f64,
    /// Time to a ready connection; 0 for one taken from the pool.
    pub connect_ms: Option<f64>,
    pub reused_connection: Option<bool>,
    pub duration_ms: Option<f64>,
    pub status: Option<u16>,
    pub error: Option<String>,
}

impl SeenRequest {
    pub fn of(finished: &FinishedRequest) -> SeenRequest {
        let record = &finished.record;
        let attempts = record
            .attempts
            .iter()
            .map(|attempt| SeenAttempt {
                replica: attempt.node_id.clone(),
                upstream: attempt.upstream.clone(),
                offset_ms: millis(attempt.started.saturating_duration_since(record.started)),
                connect_ms: attempt
                    .connected
                    .map(|(at, _)| millis(at.saturating_duration_since(attempt.started))),
                reused_connection: attempt.connected.map(|(_, reused)| reused),
                duration_ms: attempt
                    .finished
                    .map(|end| millis(end.saturating_duration_since(attempt.started))),
                status: attempt.status,
                error: attempt.error.clone(),
            })
            .collect();
        SeenRequest {
            request_id: record.request_id.clone(),
            time: rfc3339(record.received_at),
            method: finished.method.to_string(),
            path: finished.uri.path().to_string(),
            service: finished.service.clone(),
            status: finished.status,
            duration_ms: millis(finished.duration),
            replica: finished.replica().cloned(),
            attempts,
        }
    }
}

/// `2xx`, `4xx`, ...; `none` when no answer went out.
fn status_class(status: u16) -> String {
    match status {
        0 => "none".into(),
        status => format!("{}xx", status / 100),
    }
}

/// Which of the kept requests a listing wants.
#[derive(Debug, Default, Clone)]
pub struct RequestFilter {
    /// `2xx`, `4xx`, `5xx`, ...
    pub status_class: Option<String>,
    pub service: Option<String>,
    pub request_id: Option<String>,
}

impl RequestFilter {
    fn matches(&self, finished: &FinishedRequest) -> bool {
        let wanted = |filter: &Option<String>, value: Option<&str>| {
            filter.as_deref().is_none_or(|f| Some(f) == value)
        };
        self.status_class
            .as_deref()
            .is_none_or(|class| class == status_class(finished.status))
            && wanted(&self.service, finished.service.as_deref())
            && wanted(&self.request_id, Some(&finished.record.request_id))
    }
}

/// One thread's last [`KEPT`] requests, oldest first.
#[derive(Default)]
pub struct Ring {
    requests: VecDeque<FinishedRequest>,
}

impl Ring {
    pub fn push(&mut self, finished: FinishedRequest) {
        if self.requests.len() == KEPT {
            self.requests.pop_front();
        }
        self.requests.push_back(finished);
    }

    /// The requests that match, as `(arrival, what the dashboard shows)`.
    pub fn matching(
        &self,
        filter: &RequestFilter,
    ) -> impl Iterator<Item = (Instant, SeenRequest)> + '_ {
        let filter = filter.clone();
        self.requests
            .iter()
            .filter(move |finished| filter.matches(finished))
            .map(|finished| (finished.record.started, SeenRequest::of(finished)))
    }
}

/// Merges the threads' matches: the newest [`KEPT`], newest first.
pub fn newest_first(mut seen: Vec<(Instant, SeenRequest)>) -> Vec<SeenRequest> {
    seen.sort_by_key(|(arrived, _)| std::cmp::Reverse(*arrived));
    seen.truncate(KEPT);
    seen.into_iter().map(|(_, seen)| seen).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceContext;

    fn finished(id: &str, status: u16, service: &str) -> FinishedRequest {
        FinishedRequest {
            record: RequestRecord::new(id.into(), TraceContext::continue_or_start(None)),
            method: http::Method::GET,
            uri: "/api/x/y".parse().unwrap(),
            service: Some(Arc::from(service)),
            route: None,
            status,
            duration: Duration::from_millis(1),
        }
    }

    #[test]
    fn the_ring_keeps_the_last_thousand_newest_first_and_filters() {
        let mut ring = Ring::default();
        for n in 0..KEPT + 5 {
            let status = if n % 2 == 0 { 200 } else { 503 };
            ring.push(finished(
                &format!("r{n}"),
                status,
                if n % 3 == 0 { "a" } else { "b" },
            ));
        }
        let all = newest_first(ring.matching(&RequestFilter::default()).collect());
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0].request_id, format!("r{}", KEPT + 4));
        assert_eq!(all.last().unwrap().request_id, "r5");
        let by_id = |id: &str| RequestFilter {
            request_id: Some(id.into()),
            ..RequestFilter::default()
        };
        assert_eq!(ring.matching(&by_id("r4")).count(), 0, "the oldest went");
        let failed = newest_first(
            ring.matching(&RequestFilter {
                status_class: Some("5xx".into()),
                service: Some("a".into()),
                ..RequestFilter::default()
            })
            .collect(),
        );
        assert!(!failed.is_empty());
        assert!(failed
            .iter()
            .all(|s| s.status == 503 && s.service.as_deref() == Some("a")));
        let found: Vec<_> = ring.matching(&by_id("r1000")).collect();
        assert_eq!(found[0].1.status, 200);
        assert_eq!(found[0].1.path, "/api/x/y");
    }
}
