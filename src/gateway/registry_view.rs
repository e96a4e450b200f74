//! What the gateway knows of the registry besides the replicas themselves: whether it has
//! listed it yet, and whether that listing is current. The request path reads it to hold
//! requests until the first listing and to say why a service has no replica; the admin
//! listener reads it for `/readyz` and `/cluster`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::registry::{Members, RegistryStatus};

pub struct RegistryView {
    pub members: watch::Receiver<Arc<Members>>,
    /// Set once the gateway has listed the registry: until then it knows no replica, and
    /// a 503 says why.
    pub loaded: Arc<AtomicBool>,
    /// Whether the registry view is current: routing goes on with the last one through an
    /// etcd outage, and answers say so.
    pub status: Arc<RegistryStatus>,
    /// etcd's endpoints, for the messages that blame it.
    pub etcd: String,
}

impl RegistryView {
    pub fn registry_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Holds a request that came before the first membership listing until it is in, for at
    /// most `limit`: a gateway that has just started would otherwise answer 503 for its first
    /// milliseconds, as if no replica were registered. Envoy holds its listeners back until
    /// its clusters are initialised in the same way (`initial_fetch_timeout`).
    pub async fn first_listing(&self, limit: std::time::Duration) {
        if self.registry_loaded() {
            return;
        }
        let mut members = self.members.clone();
        let _ = tokio::time::timeout(limit, members.wait_for(|_| self.registry_loaded())).await;
    }

    /// Why the gateway cannot route yet, or `None` once it can.
    pub fn not_ready_because(&self) -> Option<String> {
        (!self.registry_loaded()).then(|| {
            format!(
                "the gateway has not read the registry yet: etcd at {} has not answered",
                self.etcd
            )
        })
    }

    /// Why the registry view may be out of date (etcd unreachable since a load), or `None`
    /// while it is current.
    pub fn stale_because(&self) -> Option<String> {
        let (length, error) = self.status.unreachable()?;
        Some(format!(
            "the registry view is {}s old: {error}",
            length.as_secs()
        ))
    }

    /// The 503 of a route whose service has no replica: before the first listing and
    /// through an outage it names etcd, since the registry may well hold replicas.
    pub fn no_replica_because(&self, service: &str) -> String {
        if let Some(reason) = self.not_ready_because() {
            return reason;
        }
        match self.stale_because() {
            Some(stale) => format!(
                "no replica of service `{service}` was registered when etcd last answered; {stale}"
            ),
            None => format!("no replica of service `{service}` is registered"),
        }
    }
}
