//! The sidecar's duties as a node: it is in the registry exactly while the app is healthy,
//! and it leaves the registry before it stops.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;
use tracing::{info, warn};

use super::health::HealthCheck;
use crate::registry::drain::Duty;
use crate::registry::{EtcdEndpoints, NodeInfo, Registration};

/// What `/readyz` and `/metrics` report of the node.
#[derive(Debug, Default)]
pub struct NodeState {
    pub app_healthy: AtomicBool,
    pub registered: AtomicBool,
    pub failed_checks: AtomicU64,
}

/// Follows the app's health into the registry; on shutdown (or when asked to leave first)
/// revokes the lease.
pub struct NodeLink {
    pub etcd: EtcdEndpoints,
    pub node: NodeInfo,
    pub lease_ttl: Duration,
    pub check: HealthCheck,
    pub interval: Duration,
    /// Failed checks in a row after which the node leaves the registry.
    pub failures_allowed: u32,
    pub state: Arc<NodeState>,
    /// Flips when the sidecar is to leave the registry ahead of pingora's shutdown.
    pub leave: watch::Receiver<bool>,
    /// Flipped once the node has left.
    pub left: watch::Sender<bool>,
    /// Done once the node has left.
    pub leaving: Mutex<Option<Duty>>,
}

impl NodeLink {
    fn service(&self) -> &str {
        &self.node.service
    }

    /// One health check, and what it changes: registers a node whose app answers, and
    /// deregisters one whose app failed `failures_allowed` checks in a row.
    async fn follow_health(&self, registration: &mut Option<Registration>, failures: &mut u32) {
        match self.check.run().await {
            Ok(()) => {
                *failures = 0;
                self.state.app_healthy.store(true, Ordering::Relaxed);
                if registration.is_none() {
                    info!(
                        "[{}] app {} is healthy; registering.",
                        self.service(),
                        self.check.app
                    );
                    *registration = Some(self.register().await);
                }
            }
            Err(error) => {
                *failures += 1;
                self.state.failed_checks.fetch_add(1, Ordering::Relaxed);
                self.state.app_healthy.store(false, Ordering::Relaxed);
                if *failures == 1 {
                    warn!(message = "App health check failed.", service = self.service(), %error);
                }
                if *failures >= self.failures_allowed {
                    if let Some(current) = registration.take() {
                        warn!(
                            "[{}] app failed {} checks in a row ({error}); leaving the registry until it recovers.",
                            self.service(),
                            failures
                        );
                        self.deregister(current).await;
                    }
                }
            }
        }
    }

    async fn register(&self) -> Registration {
        let (registration, first) =
            Registration::start(self.etcd.clone(), self.node.clone(), self.lease_ttl).await;
        if let Err(error) = first {
            warn!(message = "Not registered yet; retrying in the background.", %error);
        }
        self.state.registered.store(true, Ordering::Relaxed);
        registration
    }

    async fn deregister(&self, registration: Registration) {
        self.state.registered.store(false, Ordering::Relaxed);
        if let Err(error) = registration.deregister().await {
            warn!(message = "Could not revoke the lease; it expires by TTL.", %error);
        }
    }
}

#[async_trait]
impl BackgroundService for NodeLink {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut leave = self.leave.clone();
        let mut registration = None;
        let mut failures = 0;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*leave.borrow_and_update() {
            tokio::select! {
                _ = ticker.tick() => self.follow_health(&mut registration, &mut failures).await,
                changed = leave.changed() => if changed.is_err() { break },
                _ = shutdown.changed() => break,
            }
        }
        if let Some(registration) = registration {
            info!("[{}] leaving the registry.", self.service());
            self.deregister(registration).await;
        }
        let _ = self.left.send(true);
        drop(self.leaving.lock().expect("duty slot").take());
    }
}
