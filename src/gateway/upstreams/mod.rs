//! The replicas of every service, as pingora load balancers fed by the etcd watcher.
//!
//! Each service gets a round-robin [`LoadBalancer`] whose [`ServiceDiscovery`] reads the
//! latest membership snapshot; [`Upstreams::sync`] pushes a new snapshot and rebuilds the
//! affected selectors, so a new replica takes traffic without a restart. Per-node counters
//! (in flight, requests, failures) are atomics: they are touched on every request.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::health_check::TcpHealthCheck;
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use tracing::warn;

use crate::registry::{Members, NodeInfo};

/// Selection gives up after this many candidates; far above any replica count.
const MAX_SELECT_ITERATIONS: usize = 256;

/// Live counters of one replica.
#[derive(Debug)]
pub struct NodeState {
    pub info: NodeInfo,
    pub addr: SocketAddr,
    /// `info.id` and `addr` as shared strings, for per-request records without copies.
    pub id: Arc<str>,
    pub addr_text: Arc<str>,
    pub in_flight: AtomicI64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
}

/// One service's replicas and balancer.
pub struct ServiceUpstream {
    pub name: String,
    balancer: LoadBalancer<RoundRobin>,
    discovered: Arc<ArcSwap<BTreeSet<Backend>>>,
    nodes: ArcSwap<HashMap<SocketAddr, Arc<NodeState>>>,
    /// Selections made, for the Go original's `PollNext`.
    picks: AtomicU64,
    /// Requests answered by a replica, the Go original's `RequestFinish`.
    pub finished: AtomicU64,
}

/// Hands the balancer whatever the watcher published last.
struct SnapshotDiscovery(Arc<ArcSwap<BTreeSet<Backend>>>);

#[async_trait]
impl ServiceDiscovery for SnapshotDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        Ok(((**self.0.load()).clone(), HashMap::new()))
    }
}

impl ServiceUpstream {
    fn new(name: &str) -> Self {
        let discovered = Arc::new(ArcSwap::from_pointee(BTreeSet::new()));
        let mut backends = Backends::new(Box::new(SnapshotDiscovery(discovered.clone())));
        let mut check = TcpHealthCheck::new();
        check.consecutive_failure = 1;
        check.consecutive_success = 1;
        backends.set_health_check(check);
        ServiceUpstream {
            name: name.to_string(),
            balancer: LoadBalancer::from_backends(backends),
            discovered,
            nodes: ArcSwap::from_pointee(HashMap::new()),
            picks: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        }
    }

    /// Picks the next replica round robin, skipping `tried` ones. Unhealthy replicas are
    /// used only when no healthy untried one is left: a health check can lag a restart.
    ///
    /// Only current members are drawn. The balancer learns a membership change after
    /// `nodes` does (its update is asynchronous), and in between it could still draw a
    /// replica that just left, which has no entry any more: that request failed with 503
    /// while other replicas were up.
    pub fn select(&self, tried: &[SocketAddr]) -> Option<Arc<NodeState>> {
        let nodes = self.nodes.load();
        let eligible = |backend: &Backend| {
            backend
                .addr
                .as_inet()
                .is_some_and(|addr| !tried.contains(addr) && nodes.contains_key(addr))
        };
        let backend = self
            .balancer
            .select_with(b"", MAX_SELECT_ITERATIONS, |b, healthy| {
                healthy && eligible(b)
            })
            .or_else(|| {
                self.balancer
                    .select_with(b"", MAX_SELECT_ITERATIONS, |b, _| eligible(b))
            })?;
        self.picks.fetch_add(1, Ordering::Relaxed);
        let addr = *backend.addr.as_inet()?;
        nodes.get(&addr).cloned()
    }

    /// Whether a retry would find a replica not tried yet.
    pub fn has_untried(&self, tried: &[SocketAddr]) -> bool {
        self.nodes.load().keys().any(|addr| !tried.contains(addr))
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.load().is_empty()
    }

    pub fn nodes(&self) -> Vec<Arc<NodeState>> {
        let mut nodes: Vec<_> = self.nodes.load().values().cloned().collect();
        nodes.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        nodes
    }

    pub fn is_healthy(&self, node: &NodeState) -> bool {
        match Backend::new_with_weight(&node.addr.to_string(), node.info.weight.max(1) as usize) {
            Ok(backend) => self.balancer.backends().ready(&backend),
            Err(_) => false,
        }
    }

    pub fn poll_next(&self) -> u64 {
        let count = self.nodes.load().len() as u64;
        if count == 0 {
            0
        } else {
            self.picks.load(Ordering::Relaxed) % count
        }
    }

    /// Replaces the replica set; counters of replicas that stay are kept.
    async fn replace(&self, resolved: Vec<(NodeInfo, SocketAddr)>) {
        let previous = self.nodes.load_full();
        let mut nodes = HashMap::new();
        let mut backends = BTreeSet::new();
        for (info, addr) in resolved {
            let weight = info.weight.max(1) as usize;
            match Backend::new_with_weight(&addr.to_string(), weight) {
                Ok(backend) => {
                    backends.insert(backend);
                }
                Err(error) => {
                    warn!(message = "Skipping a replica with an unusable address.", service = %self.name, %addr, %error);
                    continue;
                }
            }
            let state = match previous.get(&addr) {
                Some(existing) if existing.info == info => existing.clone(),
                _ => Arc::new(NodeState {
                    id: Arc::from(info.id.as_str()),
                    addr_text: Arc::from(addr.to_string()),
                    info,
                    addr,
                    in_flight: AtomicI64::new(0),
                    requests: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                }),
            };
            nodes.insert(addr, state);
        }
        self.discovered.store(Arc::new(backends));
        self.nodes.store(Arc::new(nodes));
        if let Err(error) = self.balancer.update().await {
            warn!(message = "Load balancer update failed.", service = %self.name, %error);
        }
    }

    async fn check_health(&self) {
        self.balancer.backends().run_health_check(true).await;
    }
}

/// All services the gateway can route to.
#[derive(Default)]
pub struct Upstreams {
    services: ArcSwap<HashMap<String, Arc<ServiceUpstream>>>,
}

impl Upstreams {
    pub fn get(&self, service: &str) -> Option<Arc<ServiceUpstream>> {
        self.services.load().get(service).cloned()
    }

    pub fn all(&self) -> Vec<Arc<ServiceUpstream>> {
        let mut services: Vec<_> = self.services.load().values().cloned().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        services
    }

    /// Brings every service's replica set in line with `members`.
    pub async fn sync(&self, members: &Members) {
        let current = self.services.load_full();
        let mut next = HashMap::new();
        for (service, nodes) in &members.services {
            let upstream = current
                .get(service)
                .cloned()
                .unwrap_or_else(|| Arc::new(ServiceUpstream::new(service)));
            let resolved = resolve_all(nodes.values()).await;
            upstream.replace(resolved).await;
            next.insert(service.clone(), upstream);
        }
        self.services.store(Arc::new(next));
    }

    pub async fn check_health(&self) {
        for upstream in self.all() {
            upstream.check_health().await;
        }
    }
}

/// Resolves each node's `host:port`; hostnames (compose service names) go through DNS.
async fn resolve_all<'a>(nodes: impl Iterator<Item = &'a NodeInfo>) -> Vec<(NodeInfo, SocketAddr)> {
    let mut resolved = Vec::new();
    for node in nodes {
        if let Ok(addr) = node.http.parse::<SocketAddr>() {
            resolved.push((node.clone(), addr));
            continue;
        }
        match tokio::net::lookup_host(node.http.as_str()).await {
            Ok(mut addrs) => match addrs.find(SocketAddr::is_ipv4).or_else(|| addrs.next()) {
                Some(addr) => resolved.push((node.clone(), addr)),
                None => {
                    warn!(message = "Replica address resolves to nothing.", service = %node.service, http = %node.http)
                }
            },
            Err(error) => {
                warn!(message = "Cannot resolve replica address.", service = %node.service, http = %node.http, %error)
            }
        }
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(port: u16) -> (NodeInfo, SocketAddr) {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let info = serde_json::from_value(serde_json::json!({
            "id": format!("user-{port}"), "service": "user", "http": addr.to_string()
        }))
        .unwrap();
        (info, addr)
    }

    #[tokio::test]
    async fn a_replica_that_left_is_not_drawn_while_the_balancer_catches_up() {
        let upstream = ServiceUpstream::new("user");
        upstream.replace(vec![member(9001), member(9002)]).await;
        // The moment inside `replace` after the membership changed and before the
        // balancer's update finished: 9002 has left, the balancer still holds it.
        let staying: HashMap<_, _> = upstream
            .nodes
            .load()
            .iter()
            .filter(|(addr, _)| addr.port() == 9001)
            .map(|(addr, node)| (*addr, node.clone()))
            .collect();
        upstream.nodes.store(Arc::new(staying));
        for _ in 0..10 {
            let picked = upstream.select(&[]).expect("9001 is still a member");
            assert_eq!(picked.addr.port(), 9001);
        }
    }
}
