//! Who is registered right now: a snapshot of every node of every service, kept current
//! by listing the prefix and then watching it from the listed revision.
//!
//! When the watch breaks (etcd restarted, network cut) or its revision was compacted away,
//! the watcher lists again and diffs the listing against what it knew, so a change made
//! while it was away still produces its `join`/`leave` line. While etcd is unreachable the
//! last snapshot stays published: routing keeps working on what was known.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{backoff, parse_node_key, EtcdEndpoints, NodeInfo, RegistryError, KEY_PREFIX};
use crate::diagnostics::Repeats;

/// `service -> node id -> node`, as last seen in etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    pub services: BTreeMap<String, BTreeMap<String, NodeInfo>>,
}

impl Members {
    pub fn nodes(&self, service: &str) -> impl Iterator<Item = &NodeInfo> {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|nodes| nodes.values())
    }

    fn insert(&mut self, node: NodeInfo) -> bool {
        let nodes = self.services.entry(node.service.clone()).or_default();
        nodes.insert(node.id.clone(), node).is_none()
    }

    fn remove(&mut self, service: &str, id: &str) -> bool {
        let Some(nodes) = self.services.get_mut(service) else {
            return false;
        };
        let removed = nodes.remove(id).is_some();
        if nodes.is_empty() {
            self.services.remove(service);
        }
        removed
    }
}

/// Whether the watcher reaches etcd now. A gateway routes on the last snapshot through an
/// outage; this says since when that snapshot may be stale, and why.
#[derive(Debug, Default)]
pub struct RegistryStatus {
    outage: Mutex<Option<Outage>>,
}

#[derive(Debug)]
struct Outage {
    since: Instant,
    error: String,
}

impl RegistryStatus {
    /// For how long etcd has been unreachable, and the last error; `None` while it answers.
    pub fn unreachable(&self) -> Option<(Duration, String)> {
        let outage = self.outage.lock().expect("registry status lock");
        outage
            .as_ref()
            .map(|outage| (outage.since.elapsed(), outage.error.clone()))
    }

    fn failed(&self, error: &RegistryError) {
        let mut outage = self.outage.lock().expect("registry status lock");
        let since = outage.as_ref().map_or_else(Instant::now, |o| o.since);
        *outage = Some(Outage {
            since,
            error: error.to_string(),
        });
    }

    fn reached(&self) {
        *self.outage.lock().expect("registry status lock") = None;
    }
}

/// Starts the watcher; the receiver always holds the newest snapshot, and `status` says
/// whether it is current. The task ends when `shutdown` flips to true or every receiver is
/// dropped.
pub fn watch_members(
    etcd: EtcdEndpoints,
    status: Arc<RegistryStatus>,
    shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Arc<Members>> {
    let (publish, snapshot) = watch::channel(Arc::new(Members::default()));
    tokio::spawn(run(etcd, publish, status, shutdown));
    snapshot
}

enum WatchEnd {
    /// The stream ended or failed, or its start revision was compacted: list again.
    Relist(String),
    Stopped,
}

async fn run(
    etcd: EtcdEndpoints,
    publish: watch::Sender<Arc<Members>>,
    status: Arc<RegistryStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut known = Members::default();
    let mut failures = 0;
    let mut away = Repeats::default();
    loop {
        if *shutdown.borrow() || publish.is_closed() {
            return;
        }
        let listed = list(&etcd).await;
        let (mut client, listing, revision) = match listed {
            Ok(listed) => listed,
            Err(error) => {
                failures += 1;
                status.failed(&error);
                if let Some(repeats) = away.occurred() {
                    warn!(message = "Cannot list registered nodes; keeping the last known set.", %error, attempts = failures, repeats);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff(failures)) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        if failures > 0 {
            info!(
                message = "etcd reachable again; membership resynchronised.",
                revision
            );
        }
        failures = 0;
        away.reset();
        status.reached();
        apply_listing(&mut known, listing);
        publish.send_replace(Arc::new(known.clone()));
        match follow(
            &mut client,
            revision + 1,
            &mut known,
            &publish,
            &mut shutdown,
        )
        .await
        {
            WatchEnd::Stopped => return,
            WatchEnd::Relist(reason) => {
                warn!(message = "Membership watch interrupted; listing again.", %reason);
            }
        }
    }
}

/// Every node registered now, read once (`goms cluster` without a gateway): the same
/// listing, timeout and decoding as the watcher's.
pub async fn list_members(etcd: &EtcdEndpoints) -> Result<Members, RegistryError> {
    let (_, members, _) = list(etcd).await?;
    Ok(members)
}

async fn list(etcd: &EtcdEndpoints) -> Result<(Client, Members, i64), RegistryError> {
    let mut client = etcd.connect().await?;
    let response = etcd
        .bounded(client.get(KEY_PREFIX, Some(GetOptions::new().with_prefix())))
        .await?;
    let revision = response.header().map_or(0, |header| header.revision());
    let mut members = Members::default();
    for kv in response.kvs() {
        if let Some(node) = decode(kv.key(), kv.value()) {
            members.insert(node);
        }
    }
    Ok((client, members, revision))
}

/// Replaces `known` by `listing`, logging the difference as joins and leaves.
fn apply_listing(known: &mut Members, listing: Members) {
    for (service, nodes) in &known.services {
        for id in nodes.keys() {
            if !listing
                .services
                .get(service)
                .is_some_and(|n| n.contains_key(id))
            {
                log_leave(service, id);
            }
        }
    }
    for (service, nodes) in &listing.services {
        for id in nodes.keys() {
            if !known
                .services
                .get(service)
                .is_some_and(|n| n.contains_key(id))
            {
                log_join(service, id);
            }
        }
    }
    *known = listing;
}

async fn follow(
    client: &mut Client,
    start_revision: i64,
    known: &mut Members,
    publish: &watch::Sender<Arc<Members>>,
    shutdown: &mut watch::Receiver<bool>,
) -> WatchEnd {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(start_revision);
    let mut stream = match client.watch(KEY_PREFIX, Some(options)).await {
        Ok(stream) => stream,
        Err(error) => return WatchEnd::Relist(error.to_string()),
    };
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = shutdown.changed() => return WatchEnd::Stopped,
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => return WatchEnd::Relist("watch stream closed".into()),
            Err(error) => return WatchEnd::Relist(error.to_string()),
        };
        if response.compact_revision() > 0 {
            return WatchEnd::Relist(format!(
                "revision {start_revision} was compacted (now {})",
                response.compact_revision()
            ));
        }
        if response.canceled() {
            return WatchEnd::Relist(format!("watch canceled: {}", response.cancel_reason()));
        }
        if apply_events(known, response.events()) {
            publish.send_replace(Arc::new(known.clone()));
        }
    }
}

/// Applies watch events; returns whether the snapshot changed.
fn apply_events(known: &mut Members, events: &[etcd_client::Event]) -> bool {
    let mut changed = false;
    for event in events {
        let Some(kv) = event.kv() else { continue };
        match event.event_type() {
            EventType::Put => {
                if let Some(node) = decode(kv.key(), kv.value()) {
                    let (service, id) = (node.service.clone(), node.id.clone());
                    let unchanged = known
                        .services
                        .get(&service)
                        .and_then(|nodes| nodes.get(&id))
                        == Some(&node);
                    if known.insert(node) {
                        log_join(&service, &id);
                    }
                    changed |= !unchanged;
                }
            }
            EventType::Delete => {
                let Ok(key) = std::str::from_utf8(kv.key()) else {
                    continue;
                };
                if let Some((service, id)) = parse_node_key(key) {
                    if known.remove(service, id) {
                        log_leave(service, id);
                        changed = true;
                    }
                }
            }
        }
    }
    changed
}

/// Decodes a node value; the key is authoritative for service and id.
fn decode(key: &[u8], value: &[u8]) -> Option<NodeInfo> {
    let key = std::str::from_utf8(key).ok()?;
    let (service, id) = parse_node_key(key)?;
    match serde_json::from_slice::<NodeInfo>(value) {
        Ok(mut node) => {
            node.service = service.to_string();
            node.id = id.to_string();
            Some(node)
        }
        Err(error) => {
            warn!(message = "Ignoring a registry entry that is not a goms node.", key, %error);
            None
        }
    }
}

fn log_join(service: &str, id: &str) {
    info!("[{service}] node [{id}] join");
}

fn log_leave(service: &str, id: &str) {
    info!("[{service}] node [{id}] leave");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(service: &str, id: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            service: service.into(),
            http: id.into(),
            rpc: None,
            version: String::new(),
            weight: 1,
            zone: String::new(),
            started_at: String::new(),
        }
    }

    #[test]
    fn listing_replaces_known_set() {
        let mut known = Members::default();
        known.insert(node("user", "a"));
        known.insert(node("user", "b"));
        let mut listing = Members::default();
        listing.insert(node("user", "b"));
        listing.insert(node("order", "c"));
        apply_listing(&mut known, listing.clone());
        assert_eq!(known, listing);
    }

    #[test]
    fn empty_service_disappears() {
        let mut known = Members::default();
        known.insert(node("user", "a"));
        assert!(known.remove("user", "a"));
        assert!(known.services.is_empty());
    }
}
