//! The replicas of every service, as pingora load balancers fed by the etcd watcher, and what
//! guards them: outlier ejection ([`ejection`]), the retry budget ([`retry_budget`]) and the
//! cap on requests in flight.
//!
//! Each service gets a round-robin [`LoadBalancer`] whose [`ServiceDiscovery`] reads the
//! latest membership snapshot; [`Upstreams::sync`] pushes a new snapshot and rebuilds the
//! affected selectors, so a new replica takes traffic without a restart. Per-node counters
//! (in flight, requests, failures) are atomics: they are touched on every request.

pub mod ejection;
pub mod retry_budget;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::health_check::{HealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use tracing::warn;

use crate::config::ServicePolicy;
use crate::registry::{Members, NodeInfo};
use ejection::{may_eject_one_more, Availability, Outlier, Ticks, Verdict};
use retry_budget::RetryBudget;

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
    /// Passive health: whether the replica is ejected.
    pub outlier: Outlier,
    /// When an attempt at the replica last succeeded, in [`Ticks`]: a replica that answered
    /// within the health check's interval is not connected to again to learn that it is up.
    pub last_success: AtomicU64,
    /// The replica as the balancer holds it, built once and not on every membership change.
    backend: Backend,
}

/// The replicas of a service by address, as requests and the health check read them.
type NodeMap = HashMap<SocketAddr, Arc<NodeState>>;

/// The TCP health check, skipped for a replica that answered a request successfully within
/// `fresh_within`: with traffic, most replicas prove themselves, and a gateway in front of a
/// thousand replicas does not open a thousand connections a second to learn what it knows.
struct PassiveFirstCheck {
    tcp: TcpHealthCheck,
    nodes: Arc<ArcSwap<NodeMap>>,
    fresh_within: Duration,
}

#[async_trait]
impl HealthCheck for PassiveFirstCheck {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let answered_lately = target
            .addr
            .as_inet()
            .and_then(|addr| self.nodes.load().get(addr).cloned())
            .is_some_and(|node| {
                let last = node.last_success.load(Ordering::Relaxed);
                last != 0
                    && Ticks::now().0.saturating_sub(last) < self.fresh_within.as_millis() as u64
            });
        if answered_lately {
            return Ok(());
        }
        self.tcp.check(target).await
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.tcp.health_threshold(success)
    }
}

/// A replica drawn for an attempt.
pub struct Pick {
    pub node: Arc<NodeState>,
    /// Whether the attempt is the trial request that ends the replica's ejection.
    pub trial: bool,
}

/// One service's replicas and balancer.
pub struct ServiceUpstream {
    pub name: String,
    balancer: LoadBalancer<RoundRobin>,
    discovered: Arc<ArcSwap<BTreeSet<Backend>>>,
    nodes: Arc<ArcSwap<NodeMap>>,
    /// Selections made, for the Go original's `PollNext`.
    picks: AtomicU64,
    /// Requests answered by a replica, the Go original's `RequestFinish`.
    pub finished: AtomicU64,
    pub retry_budget: RetryBudget,
    /// Requests to the service in progress, against `maxInFlight`.
    in_flight: AtomicU32,
    /// Requests answered 503 at once because `maxInFlight` were in progress.
    pub refused_over_cap: AtomicU64,
    /// Replicas whose address did not resolve at the last membership change: the next
    /// change anywhere tries them again.
    unresolved: AtomicU32,
}

/// One request's place under its service's `maxInFlight`, given back when it is dropped.
pub struct ServiceSlot(Arc<ServiceUpstream>);

impl Drop for ServiceSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
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
    fn new(name: &str, health_interval: Duration) -> Self {
        let discovered = Arc::new(ArcSwap::from_pointee(BTreeSet::new()));
        let nodes = Arc::new(ArcSwap::from_pointee(HashMap::new()));
        let mut backends = Backends::new(Box::new(SnapshotDiscovery(discovered.clone())));
        let mut tcp = *TcpHealthCheck::new();
        tcp.consecutive_failure = 1;
        tcp.consecutive_success = 1;
        backends.set_health_check(Box::new(PassiveFirstCheck {
            tcp,
            nodes: nodes.clone(),
            fresh_within: health_interval,
        }));
        ServiceUpstream {
            name: name.to_string(),
            balancer: LoadBalancer::from_backends(backends),
            discovered,
            nodes,
            picks: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            retry_budget: RetryBudget::default(),
            in_flight: AtomicU32::new(0),
            refused_over_cap: AtomicU64::new(0),
            unresolved: AtomicU32::new(0),
        }
    }

    /// Takes a place for one request under `cap` (`maxInFlight`); `None` when the service
    /// has that many in progress, counted.
    pub fn admit(self: &Arc<Self>, cap: Option<u32>) -> Option<ServiceSlot> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let slot = ServiceSlot(self.clone());
        if cap.is_some_and(|cap| before >= cap) {
            self.refused_over_cap.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(slot)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Picks the next replica round robin, skipping `tried` ones and, under `policy`'s
    /// ejection, ejected ones: a replica whose ejection is over is drawn once, as its trial.
    /// Unhealthy replicas are used only when no healthy untried one is left: a health check
    /// can lag a restart.
    ///
    /// Only current members are drawn. The balancer learns a membership change after
    /// `nodes` does (its update is asynchronous), and in between it could still draw a
    /// replica that just left, which has no entry any more: that request failed with 503
    /// while other replicas were up.
    pub fn select(&self, tried: &[SocketAddr], policy: &ServicePolicy, now: Ticks) -> Option<Pick> {
        let nodes = self.nodes.load();
        let trial = std::cell::Cell::new(false);
        let eligible = |backend: &Backend| {
            let Some(node) = backend
                .addr
                .as_inet()
                .and_then(|addr| (!tried.contains(addr)).then(|| nodes.get(addr)).flatten())
            else {
                return false;
            };
            if policy.ejection.is_none() {
                return true;
            }
            match node.outlier.availability(now) {
                Availability::Serving => true,
                Availability::TrialDue if node.outlier.claim_trial() => {
                    trial.set(true);
                    true
                }
                _ => false,
            }
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
        let node = nodes.get(&addr).cloned()?;
        Some(Pick {
            node,
            trial: trial.get(),
        })
    }

    /// Whether a retry would find a replica not tried yet that may take it.
    pub fn has_untried(&self, tried: &[SocketAddr], policy: &ServicePolicy, now: Ticks) -> bool {
        self.nodes.load().iter().any(|(addr, node)| {
            !tried.contains(addr)
                && (policy.ejection.is_none()
                    || matches!(
                        node.outlier.availability(now),
                        Availability::Serving | Availability::TrialDue
                    ))
        })
    }

    /// Applies how an attempt at `pick`'s replica ended to its passive health; an ejection is
    /// logged once, when it happens.
    pub fn record_verdict(&self, pick: &Pick, verdict: Verdict, policy: &ServicePolicy) {
        let Some(ejection) = policy.ejection.as_ref() else {
            return;
        };
        let now = Ticks::now();
        let may_eject = || {
            let nodes = self.nodes.load();
            let ejected = nodes.values().filter(|n| n.outlier.is_ejected()).count();
            may_eject_one_more(ejected, nodes.len(), ejection.max_percent)
        };
        let node = &pick.node;
        if node
            .outlier
            .record(verdict, pick.trial, now, ejection, may_eject)
        {
            if let Some(view) = node.outlier.view(now) {
                warn!(
                    message = "Replica ejected.",
                    service = %self.name,
                    node = %node.id,
                    reason = %view.reason,
                    for_ms = view.time_left.as_millis() as u64,
                );
            }
        }
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
        self.balancer.backends().ready(&node.backend)
    }

    pub fn poll_next(&self) -> u64 {
        let count = self.nodes.load().len() as u64;
        if count == 0 {
            0
        } else {
            self.picks.load(Ordering::Relaxed) % count
        }
    }

    /// Brings the replica set in line with `members`, the service's registered nodes. Only
    /// nodes that are new or changed are resolved; the others keep their state.
    async fn apply(&self, members: &BTreeMap<String, NodeInfo>) {
        let known = self.nodes.load_full();
        let known_by_id: HashMap<&str, &Arc<NodeState>> =
            known.values().map(|n| (n.info.id.as_str(), n)).collect();
        let mut resolved = Vec::with_capacity(members.len());
        let mut unresolved = 0;
        for info in members.values() {
            match known_by_id.get(info.id.as_str()) {
                Some(state) if state.info == *info => resolved.push((info.clone(), state.addr)),
                _ => match resolve(info).await {
                    Some(addr) => resolved.push((info.clone(), addr)),
                    None => unresolved += 1,
                },
            }
        }
        self.unresolved.store(unresolved, Ordering::Relaxed);
        self.replace(resolved).await;
    }

    /// Replaces the replica set; counters of replicas that stay are kept.
    async fn replace(&self, resolved: Vec<(NodeInfo, SocketAddr)>) {
        let previous = self.nodes.load_full();
        let mut nodes = HashMap::with_capacity(resolved.len());
        let mut backends = BTreeSet::new();
        for (info, addr) in resolved {
            let state = match previous.get(&addr) {
                Some(existing) if existing.info == info => existing.clone(),
                _ => Arc::new(NodeState {
                    id: Arc::from(info.id.as_str()),
                    addr_text: Arc::from(addr.to_string()),
                    backend: Backend {
                        addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                        weight: info.weight.max(1) as usize,
                        ext: Default::default(),
                    },
                    info,
                    addr,
                    in_flight: AtomicI64::new(0),
                    requests: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    outlier: Outlier::default(),
                    last_success: AtomicU64::new(0),
                }),
            };
            backends.insert(state.backend.clone());
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
pub struct Upstreams {
    services: ArcSwap<HashMap<String, Arc<ServiceUpstream>>>,
    /// The membership last applied, to tell which services a change touched.
    applied: ArcSwap<Members>,
    /// `gateway.healthCheckInterval`: a replica that answered within it is not checked.
    health_interval: Duration,
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams::new(Duration::from_secs(1))
    }
}

impl Upstreams {
    pub fn new(health_interval: Duration) -> Self {
        Upstreams {
            services: ArcSwap::default(),
            applied: ArcSwap::default(),
            health_interval,
        }
    }

    pub fn get(&self, service: &str) -> Option<Arc<ServiceUpstream>> {
        self.services.load().get(service).cloned()
    }

    pub fn all(&self) -> Vec<Arc<ServiceUpstream>> {
        let mut services: Vec<_> = self.services.load().values().cloned().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        services
    }

    /// Brings every service's replica set in line with `members`. A membership change costs
    /// what it changed: services whose nodes are the same keep their balancer and every
    /// replica's state untouched, and within a changed service only new or changed nodes are
    /// resolved.
    pub async fn sync(&self, members: &Arc<Members>) {
        let previous = self.applied.swap(members.clone());
        let current = self.services.load_full();
        let mut next = HashMap::with_capacity(members.services.len());
        for (service, nodes) in &members.services {
            let existing = current.get(service);
            let unchanged = existing
                .is_some_and(|upstream| upstream.unresolved.load(Ordering::Relaxed) == 0)
                && previous.services.get(service) == Some(nodes);
            let upstream = existing
                .cloned()
                .unwrap_or_else(|| Arc::new(ServiceUpstream::new(service, self.health_interval)));
            if !unchanged {
                upstream.apply(nodes).await;
            }
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

/// Resolves a node's `host:port`; hostnames (compose service names) go through DNS.
async fn resolve(node: &NodeInfo) -> Option<SocketAddr> {
    if let Ok(addr) = node.http.parse::<SocketAddr>() {
        return Some(addr);
    }
    match tokio::net::lookup_host(node.http.as_str()).await {
        Ok(mut addrs) => {
            let addr = addrs.find(SocketAddr::is_ipv4).or_else(|| addrs.next());
            if addr.is_none() {
                warn!(message = "Replica address resolves to nothing.", service = %node.service, http = %node.http);
            }
            addr
        }
        Err(error) => {
            warn!(message = "Cannot resolve replica address.", service = %node.service, http = %node.http, %error);
            None
        }
    }
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

    fn members(services: &[(&str, &[u16])]) -> Arc<Members> {
        let mut members = Members::default();
        for (service, ports) in services {
            let nodes = ports
                .iter()
                .map(|port| {
                    let info: NodeInfo = serde_json::from_value(serde_json::json!({
                        "id": format!("{service}-{port}"), "service": service,
                        "http": format!("127.0.0.1:{port}")
                    }))
                    .unwrap();
                    (info.id.clone(), info)
                })
                .collect();
            members.services.insert(service.to_string(), nodes);
        }
        Arc::new(members)
    }

    #[tokio::test]
    async fn a_membership_change_leaves_the_other_services_and_replicas_untouched() {
        let upstreams = Upstreams::default();
        upstreams
            .sync(&members(&[("user", &[9001, 9002]), ("order", &[9101])]))
            .await;
        let order = upstreams.get("order").unwrap();
        let user = upstreams.get("user").unwrap();
        let staying = user.nodes()[0].clone();
        let picks_before = user.picks.load(Ordering::Relaxed);

        upstreams
            .sync(&members(&[
                ("user", &[9001, 9002, 9003]),
                ("order", &[9101]),
            ]))
            .await;
        assert!(Arc::ptr_eq(&order, &upstreams.get("order").unwrap()));
        assert!(Arc::ptr_eq(&user, &upstreams.get("user").unwrap()));
        assert!(
            Arc::ptr_eq(&staying, &user.nodes()[0]),
            "a replica that stays keeps its state"
        );
        assert_eq!(user.nodes().len(), 3);
        assert_eq!(user.picks.load(Ordering::Relaxed), picks_before);

        upstreams.sync(&members(&[("user", &[9001])])).await;
        assert!(
            upstreams.get("order").is_none(),
            "a service with no node is gone"
        );
        assert_eq!(user.nodes().len(), 1);
    }

    #[tokio::test]
    async fn a_replica_that_left_is_not_drawn_while_the_balancer_catches_up() {
        let upstream = ServiceUpstream::new("user", Duration::from_secs(1));
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
            let picked = upstream
                .select(&[], &ServicePolicy::default(), Ticks::now())
                .expect("9001 is still a member");
            assert_eq!(picked.node.addr.port(), 9001);
        }
    }
}
