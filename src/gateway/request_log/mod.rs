//! What the request path records of every request that ends, for the admin listener's
//! dashboard to read: the last requests ([`recent`]), the traffic of each route and replica
//! over the last minute ([`traffic`]), and each replica's last failure.
//!
//! Each request thread records into a view of its own ([`PerThread`]): the request path takes
//! no lock another thread wants, and formats nothing. Readers merge the views.

pub mod recent;
pub mod traffic;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

pub use recent::{FinishedRequest, RequestFilter, SeenAttempt, SeenRequest};
use traffic::{ThreadTraffic, TrafficTotals};

use crate::per_thread::PerThread;

/// Every request thread's view.
#[derive(Default)]
pub struct RequestLog {
    threads: PerThread<ThreadView>,
}

/// What one request thread recorded.
#[derive(Default)]
struct ThreadView {
    recent: recent::Ring,
    traffic: ThreadTraffic,
    /// The last failed attempt at each replica.
    last_failure: HashMap<Arc<str>, Failure>,
}

/// A failed attempt, kept as it was: it is put in words when the topology is read.
#[derive(Clone)]
pub struct Failure {
    pub at: SystemTime,
    status: Option<u16>,
    error: Option<String>,
}

impl Failure {
    pub fn why(&self) -> String {
        // A status says it in a word; pingora's error text for it is a dump.
        match (self.status, &self.error) {
            (Some(status), _) => format!("answered {status}"),
            (None, Some(error)) => error.trim().to_string(),
            (None, None) => "failed".into(),
        }
    }
}

impl RequestLog {
    /// Records a request that ended: into this thread's ring, the traffic of its route and
    /// replica, and the replicas' last failures.
    pub fn record(&self, finished: FinishedRequest) {
        let ended = finished.record.received_at + finished.duration;
        let mut view = self.threads.local();
        let view = &mut *view;
        view.traffic.record(
            traffic::second_of(ended),
            finished.route.as_ref(),
            finished.replica(),
            finished.is_error(),
            finished.duration,
        );
        let failed = finished
            .record
            .attempts
            .iter()
            .filter(|a| a.error.is_some() || a.status.is_some_and(|s| s >= 500));
        for attempt in failed {
            let failure = Failure {
                at: finished.record.received_at,
                status: attempt.status,
                error: attempt.error.clone(),
            };
            view.last_failure.insert(attempt.node_id.clone(), failure);
        }
        view.recent.push(finished);
    }

    /// The last failure of each replica, whichever thread saw it.
    pub fn last_failures(&self) -> HashMap<Arc<str>, Failure> {
        let mut latest: HashMap<Arc<str>, Failure> = HashMap::new();
        self.threads.each(|view| {
            for (replica, failure) in &view.last_failure {
                let newer = latest.get(replica).is_none_or(|kept| kept.at < failure.at);
                if newer {
                    latest.insert(replica.clone(), failure.clone());
                }
            }
        });
        latest
    }

    /// The kept requests that match, newest first, from every thread.
    pub fn requests(&self, filter: &RequestFilter) -> Vec<SeenRequest> {
        let mut seen = Vec::new();
        self.threads
            .each(|view| seen.extend(view.recent.matching(filter)));
        recent::newest_first(seen)
    }

    /// The last minute of every route and replica, added up over the threads.
    pub fn traffic(&self) -> TrafficTotals {
        let now = traffic::second_now();
        let mut totals = TrafficTotals::default();
        self.threads
            .each(|view| view.traffic.add_to(now, &mut totals));
        totals
    }
}
