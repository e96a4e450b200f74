//! Keeps one node registered: its key is put under a lease that is kept alive every TTL/3.
//!
//! If the lease is lost (etcd lost its data, or the node was cut off longer than the TTL),
//! a new lease is granted and the key put again. [`Registration::deregister`] revokes the
//! lease, which deletes the key at once, so gateways stop routing to a draining node before
//! its in-flight requests finish.

use crate::diagnostics::Repeats;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{backoff, EtcdEndpoints, NodeInfo, RegistryError};

/// A node's live registration; drop it or call [`Registration::deregister`] to leave.
pub struct Registration {
    node: NodeInfo,
    etcd: EtcdEndpoints,
    lease_id: Arc<AtomicI64>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

enum KeepAliveEnd {
    /// etcd says the lease no longer exists: grant a new one.
    LeaseLost,
    /// The stream broke and did not come back within the TTL.
    Unreachable,
    Stopped,
}

impl Registration {
    /// Registers `node` and keeps it registered in the background. The first attempt
    /// happens before this returns, so a caller that started listening first is routable
    /// as soon as this returns `Ok`; if etcd is unreachable the error is returned and
    /// the background task keeps trying.
    pub async fn start(
        etcd: EtcdEndpoints,
        node: NodeInfo,
        ttl: Duration,
    ) -> (Self, Result<(), RegistryError>) {
        let lease_id = Arc::new(AtomicI64::new(0));
        let first = register_once(&etcd, &node, ttl).await;
        let initial = match &first {
            Ok((client, lease)) => {
                lease_id.store(*lease, Ordering::SeqCst);
                Some((client.clone(), *lease))
            }
            Err(_) => None,
        };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(keep_registered(
            etcd.clone(),
            node.clone(),
            ttl,
            initial,
            lease_id.clone(),
            stopped,
        ));
        let registration = Registration {
            node,
            etcd,
            lease_id,
            stop,
            task,
        };
        (registration, first.map(|_| ()))
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// The lease currently holding the key (0 while none is held).
    pub fn lease_id(&self) -> i64 {
        self.lease_id.load(Ordering::SeqCst)
    }

    /// Stops the keep-alive and revokes the lease, deleting the key.
    pub async fn deregister(self) -> Result<(), RegistryError> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let lease = self.lease_id.load(Ordering::SeqCst);
        if lease == 0 {
            return Ok(());
        }
        let mut client = self.etcd.connect().await?;
        self.etcd.bounded(client.lease_revoke(lease)).await?;
        info!(
            "[{}] node [{}] deregistered (lease revoked)",
            self.node.service, self.node.id
        );
        Ok(())
    }
}

async fn register_once(
    etcd: &EtcdEndpoints,
    node: &NodeInfo,
    ttl: Duration,
) -> Result<(Client, i64), RegistryError> {
    let mut client = etcd.connect().await?;
    let lease = etcd
        .bounded(client.lease_grant(ttl.as_secs() as i64, None))
        .await?
        .id();
    let value = serde_json::to_string(node).expect("NodeInfo always serialises");
    etcd.bounded(client.put(node.key(), value, Some(PutOptions::new().with_lease(lease))))
        .await?;
    info!(
        "[{}] node [{}] registered at {} (lease {lease:x}, ttl {}s)",
        node.service,
        node.id,
        node.key(),
        ttl.as_secs()
    );
    Ok((client, lease))
}

async fn keep_registered(
    etcd: EtcdEndpoints,
    node: NodeInfo,
    ttl: Duration,
    mut current: Option<(Client, i64)>,
    lease_id: Arc<AtomicI64>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut failures = 0;
    let mut refused = Repeats::default();
    loop {
        let (client, lease) = match current.take() {
            Some(held) => held,
            None => match register_once(&etcd, &node, ttl).await {
                Ok(held) => {
                    failures = 0;
                    refused.reset();
                    lease_id.store(held.1, Ordering::SeqCst);
                    held
                }
                Err(error) => {
                    if let Some(repeats) = refused.occurred() {
                        warn!(message = "Registration failed; retrying.", service = %node.service, id = %node.id, %error, repeats);
                    }
                    failures += 1;
                    if sleep_or_stop(backoff(failures), &mut stopped).await {
                        return;
                    }
                    continue;
                }
            },
        };
        match keep_alive(&etcd, client, lease, ttl, &mut stopped).await {
            KeepAliveEnd::Stopped => return,
            KeepAliveEnd::LeaseLost => {
                warn!(
                    "[{}] node [{}] lease {lease:x} lost; registering again",
                    node.service, node.id
                );
            }
            KeepAliveEnd::Unreachable => {
                warn!("[{}] node [{}] etcd unreachable for longer than the lease TTL; registering again", node.service, node.id);
            }
        }
        lease_id.store(0, Ordering::SeqCst);
    }
}

/// Refreshes `lease` every TTL/3 until it is lost, etcd stays away past the TTL, or stop.
async fn keep_alive(
    etcd: &EtcdEndpoints,
    mut client: Client,
    lease: i64,
    ttl: Duration,
    stopped: &mut watch::Receiver<bool>,
) -> KeepAliveEnd {
    let period = (ttl / 3).max(Duration::from_millis(500));
    let mut last_refresh = Instant::now();
    let mut failures = 0;
    loop {
        if last_refresh.elapsed() > ttl {
            return KeepAliveEnd::Unreachable;
        }
        let stream = etcd.bounded(client.lease_keep_alive(lease)).await;
        let (mut keeper, mut responses) = match stream {
            Ok(pair) => pair,
            Err(error) if lease_is_gone(&error) => return KeepAliveEnd::LeaseLost,
            Err(error) => {
                warn!(message = "Lease keep-alive stream failed; reconnecting.", lease = %format!("{lease:x}"), %error);
                failures += 1;
                if sleep_or_stop(backoff(failures), stopped).await {
                    return KeepAliveEnd::Stopped;
                }
                if let Ok(fresh) = etcd.connect().await {
                    client = fresh;
                }
                continue;
            }
        };
        let mut ticker = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = stopped.changed() => return KeepAliveEnd::Stopped,
                _ = ticker.tick() => {}
            }
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(etcd.timeout(), responses.message()).await {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {
                    last_refresh = Instant::now();
                    failures = 0;
                }
                Ok(Ok(Some(_))) => return KeepAliveEnd::LeaseLost,
                _ => break,
            }
        }
    }
}

/// etcd answers a keep-alive for a revoked or expired lease either with TTL 0 (handled by
/// the caller) or, when the stream is opened after the loss, with a "lease not found" error.
fn lease_is_gone(error: &RegistryError) -> bool {
    match error {
        RegistryError::Etcd { source, .. } => match source {
            etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
            etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
            _ => false,
        },
        RegistryError::Timeout { .. } => false,
    }
}

/// Sleeps for `delay`; returns true if asked to stop meanwhile.
async fn sleep_or_stop(delay: Duration, stopped: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *stopped.borrow(),
        _ = stopped.changed() => true,
    }
}
