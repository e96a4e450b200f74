//! The last requests this gateway handled, in a bounded ring: what the dashboard lists and
//! what a request's timeline is drawn from (the gateway's part of it).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::gateway::record::RequestRecord;
use crate::trace::{millis, rfc3339};

/// Requests kept; the oldest goes when a new one comes.
pub const KEPT: usize = 1_000;

/// One request as the gateway saw it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SeenRequest {
    pub request_id: String,
    /// When the request arrived, RFC 3339.
    pub time: String,
    pub method: String,
    pub path: String,
    /// The route's service, for a request that matched one.
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
    pub fn new(
        record: &RequestRecord,
        method: &str,
        path: &str,
        service: Option<&Arc<str>>,
        status: u16,
    ) -> SeenRequest {
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
            .collect::<Vec<_>>();
        SeenRequest {
            request_id: record.request_id.clone(),
            time: rfc3339(record.received_at),
            method: method.to_string(),
            path: path.to_string(),
            service: service.cloned(),
            status,
            duration_ms: millis(record.elapsed()),
            replica: attempts.last().map(|a| a.replica.clone()),
            attempts,
        }
    }

    /// `2xx`, `4xx`, ...; `none` when no answer went out.
    pub fn status_class(&self) -> String {
        match self.status {
            0 => "none".into(),
            status => format!("{}xx", status / 100),
        }
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
    fn matches(&self, seen: &SeenRequest) -> bool {
        let wanted = |filter: &Option<String>, value: Option<&str>| {
            filter.as_deref().is_none_or(|f| Some(f) == value)
        };
        wanted(&self.status_class, Some(&seen.status_class()))
            && wanted(&self.service, seen.service.as_deref())
            && wanted(&self.request_id, Some(&seen.request_id))
    }
}

#[derive(Default)]
pub struct RecentRequests {
    ring: Mutex<VecDeque<SeenRequest>>,
}

impl RecentRequests {
    pub fn push(&self, seen: SeenRequest) {
        let mut ring = super::lock(&self.ring);
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(seen);
    }

    /// The kept requests that match, newest first.
    pub fn list(&self, filter: &RequestFilter) -> Vec<SeenRequest> {
        let ring = super::lock(&self.ring);
        ring.iter()
            .rev()
            .filter(|seen| filter.matches(seen))
            .cloned()
            .collect()
    }

    pub fn find(&self, request_id: &str) -> Option<SeenRequest> {
        let ring = super::lock(&self.ring);
        ring.iter()
            .rev()
            .find(|seen| seen.request_id == request_id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceContext;

    fn seen(id: &str, status: u16, service: &str) -> SeenRequest {
        let record = RequestRecord::new(id.into(), TraceContext::continue_or_start(None));
        SeenRequest::new(
            &record,
            "GET",
            "/api/x/y",
            Some(&Arc::from(service)),
            status,
        )
    }

    #[test]
    fn the_ring_keeps_the_last_thousand_newest_first_and_filters() {
        let recent = RecentRequests::default();
        for n in 0..KEPT + 5 {
            let status = if n % 2 == 0 { 200 } else { 503 };
            recent.push(seen(
                &format!("r{n}"),
                status,
                if n % 3 == 0 { "a" } else { "b" },
            ));
        }
        let all = recent.list(&RequestFilter::default());
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0].request_id, format!("r{}", KEPT + 4));
        assert_eq!(all.last().unwrap().request_id, "r5");
        assert!(recent.find("r4").is_none(), "the oldest went");
        let failed = recent.list(&RequestFilter {
            status_class: Some("5xx".into()),
            service: Some("a".into()),
            ..RequestFilter::default()
        });
        assert!(!failed.is_empty());
        assert!(failed
            .iter()
            .all(|s| s.status == 503 && s.service.as_deref() == Some("a")));
        assert_eq!(recent.find("r1000").unwrap().status, 200);
    }
}
