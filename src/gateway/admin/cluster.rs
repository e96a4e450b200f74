//! The `/cluster` document: the Go original's shape
//! (`services.{name}.PollNext|Nodes|RequestFinish`, `status`), plus per-node detail under
//! `NodeDetail`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::gateway::upstreams::Upstreams;
use crate::registry::Members;

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterDocument {
    pub services: BTreeMap<String, ServiceEntry>,
    pub status: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// Index of the node the next request goes to (round robin).
    #[serde(rename = "PollNext")]
    pub poll_next: u64,
    /// Node ids, as registered.
    #[serde(rename = "Nodes")]
    pub nodes: Vec<String>,
    /// Requests this gateway has had answered by the service.
    #[serde(rename = "RequestFinish")]
    pub request_finish: u64,
    #[serde(rename = "NodeDetail")]
    pub node_detail: Vec<NodeDetail>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDetail {
    pub id: String,
    pub http: String,
    pub version: String,
    pub zone: String,
    pub weight: u32,
    pub started_at: String,
    /// Last TCP health check result; `None` where this document came straight from etcd.
    pub healthy: Option<bool>,
    pub in_flight: i64,
    pub requests: u64,
    pub failures: u64,
}

/// Builds the document from etcd membership and, in a gateway, its live counters.
pub fn cluster_document(members: &Members, upstreams: Option<&Upstreams>) -> ClusterDocument {
    let mut services = BTreeMap::new();
    for (name, nodes) in &members.services {
        let upstream = upstreams.and_then(|u| u.get(name));
        let states = upstream.as_ref().map(|u| u.nodes()).unwrap_or_default();
        let node_detail = nodes
            .values()
            .map(|info| {
                let state = states.iter().find(|s| s.info.id == info.id);
                NodeDetail {
                    id: info.id.clone(),
                    http: info.http.clone(),
                    version: info.version.clone(),
                    zone: info.zone.clone(),
                    weight: info.weight,
                    started_at: info.started_at.clone(),
                    healthy: match (&upstream, state) {
                        (Some(upstream), Some(state)) => Some(upstream.is_healthy(state)),
                        _ => None,
                    },
                    in_flight: state.map_or(0, |s| s.in_flight.load(Ordering::Relaxed)),
                    requests: state.map_or(0, |s| s.requests.load(Ordering::Relaxed)),
                    failures: state.map_or(0, |s| s.failures.load(Ordering::Relaxed)),
                }
            })
            .collect();
        services.insert(
            name.clone(),
            ServiceEntry {
                poll_next: upstream.as_ref().map_or(0, |u| u.poll_next()),
                nodes: nodes.keys().cloned().collect(),
                request_finish: upstream
                    .as_ref()
                    .map_or(0, |u| u.finished.load(Ordering::Relaxed)),
                node_detail,
            },
        );
    }
    ClusterDocument {
        services,
        status: true,
    }
}
