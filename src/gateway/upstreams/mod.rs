//! The replicas of every service, how a request picks one (weighted round robin, least
//! request or consistent hashing: [`balance`]), and what guards them: outlier ejection
//! ([`ejection`]), the retry budget ([`retry_budget`]), the cap on requests in flight, and the
//! TCP health check.
//!
//! A service's replicas are one snapshot ([`Replicas`]): by address, and in the balancer's
//! order. [`Upstreams::sync`] swaps in a new snapshot for a service whose nodes changed, so a
//! new replica takes traffic without a restart, and a change costs a copy of the service's
//! pointers rather than a rebuild of a balancer (pingora's `LoadBalancer::update` re-hashed and
//! re-sorted every backend: 4 ms per event at 1,000 replicas). Per-node counters (in flight,
//! requests, failures, health) are atomics: they are touched on every request.

pub mod balance;
pub mod ejection;
pub mod retry_budget;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pingora::lb::health_check::{HealthCheck, TcpHealthCheck};
use pingora::lb::Backend;
use tracing::{info, warn};

use crate::config::ServicePolicy;
use crate::registry::{Members, NodeInfo};
use balance::{LatencyEwma, Ring};
use ejection::{may_eject_one_more, Availability, Outlier, Ticks, Verdict};
use retry_budget::RetryBudget;

/// Live counters of one replica.
#[derive(Debug)]
pub struct NodeState {
    pub info: NodeInfo,
    pub addr: SocketAddr,
    /// Where the replica serves gRPC (`info.rpc`, resolved); `None` for a node without one,
    /// which takes no gRPC calls.
    pub rpc_addr: Option<SocketAddr>,
    /// `info.id` and `addr` as shared strings, for per-request records without copies.
    pub id: Arc<str>,
    pub addr_text: Arc<str>,
    pub in_flight: AtomicI64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// The decaying average of the replica's latency, for `least_request`.
    pub latency: LatencyEwma,
    /// Passive health: whether the replica is ejected.
    pub outlier: Outlier,
    /// When an attempt at the replica last succeeded, in [`Ticks`]: a replica that answered
    /// within the health check's interval is not connected to again to learn that it is up.
    pub last_success: AtomicU64,
    /// The last TCP health check's result (a new replica counts as healthy until checked).
    healthy: std::sync::atomic::AtomicBool,
    /// The replica as pingora's health check takes it, built once.
    backend: Backend,
}

impl NodeState {
    fn answered_within(&self, interval: Duration, now: Ticks) -> bool {
        let last = self.last_success.load(Ordering::Relaxed);
        last != 0 && now.0.saturating_sub(last) < interval.as_millis() as u64
    }
}

/// A service's replicas at one moment, swapped as one so that no request sees one view
/// without the others.
#[derive(Default)]
struct Replicas {
    by_addr: HashMap<SocketAddr, Arc<NodeState>>,
    /// Each replica once, sorted by address: what `least_request` draws from.
    sorted: Vec<Arc<NodeState>>,
    /// Each replica's place in `sorted`, `weight` times: the round robin's order.
    rotation: Vec<usize>,
    /// The consistent-hash ring, built when a `hash` route first needs it.
    ring: OnceLock<Ring>,
}

/// How a request picks its replica: a route's `balance`, with the request's hash key.
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    RoundRobin,
    LeastRequest,
    Hash(&'a [u8]),
}

/// Whether a replica may take an attempt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eligibility {
    No,
    Yes,
    /// Its ejection is over and no trial is running: it may take one, as the trial.
    AsTrial,
}

/// A replica drawn for an attempt.
pub struct Pick {
    pub node: Arc<NodeState>,
    /// Whether the attempt is the trial request that ends the replica's ejection.
    pub trial: bool,
    /// When the replica was picked, and then when its connection was ready: the attempt's
    /// latency runs from here.
    pub started: Instant,
}

/// One service's replicas and balancer.
pub struct ServiceUpstream {
    pub name: String,
    replicas: ArcSwap<Replicas>,
    tcp_check: Arc<TcpHealthCheck>,
    /// `gateway.healthCheckInterval`: a replica that answered within it is not checked.
    health_interval: Duration,
    /// Selections made: the round robin's position, and the Go original's `PollNext`.
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

impl ServiceUpstream {
    fn new(name: &str, health_interval: Duration) -> Self {
        ServiceUpstream {
            name: name.to_string(),
            replicas: ArcSwap::default(),
            tcp_check: Arc::from(TcpHealthCheck::new()),
            health_interval,
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

    /// Picks a replica the way `how` says, skipping `tried` ones and, under `policy`'s
    /// ejection, ejected ones: a replica whose ejection is over is drawn once, as its trial.
    /// Unhealthy replicas are used only when no healthy untried one is left: a health check
    /// can lag a restart.
    ///
    /// Only current members are drawn: a replica that just left has no entry any more. A
    /// `grpc` call draws only replicas with an `rpc` address.
    pub fn select(
        &self,
        how: Selection<'_>,
        grpc: bool,
        tried: &[SocketAddr],
        policy: &ServicePolicy,
        now: Ticks,
    ) -> Option<Pick> {
        let replicas = self.replicas.load();
        if replicas.sorted.is_empty() {
            return None;
        }
        let eligibility = |node: &NodeState| {
            if grpc && node.rpc_addr.is_none() {
                return Eligibility::No;
            }
            eligibility(node, tried, policy, now)
        };
        match how {
            Selection::LeastRequest => self
                .less_loaded_of_two(&replicas, &eligibility)
                .or_else(|| self.next_in_rotation(&replicas, &eligibility)),
            Selection::Hash(key) => {
                let ring = replicas
                    .ring
                    .get_or_init(|| Ring::of(replicas.sorted.iter().map(|n| &**n)));
                let in_ring_order = ring
                    .order(key)
                    .filter_map(|addr| replicas.by_addr.get(&addr));
                first_that_may_take(in_ring_order, &eligibility)
            }
            Selection::RoundRobin => self.next_in_rotation(&replicas, &eligibility),
        }
        .map(|(node, trial)| Pick {
            node: node.clone(),
            trial,
            started: Instant::now(),
        })
    }

    /// The round robin: the replica whose turn it is, if it is healthy and may take the
    /// attempt. Otherwise one of the others that may, at random: taking the next one in order
    /// instead would give that one twice its share for as long as a replica is ejected or
    /// down.
    fn next_in_rotation<'r>(
        &self,
        replicas: &'r Replicas,
        eligibility: &dyn Fn(&NodeState) -> Eligibility,
    ) -> Option<(&'r Arc<NodeState>, bool)> {
        let (rotation, nodes) = (&replicas.rotation, &replicas.sorted);
        let turn = self.picks.fetch_add(1, Ordering::Relaxed) as usize % rotation.len();
        let turn = &nodes[rotation[turn]];
        if turn.healthy.load(Ordering::Relaxed) {
            if let Some(taken) = take(turn, eligibility(turn)) {
                return Some(taken);
            }
        }
        let may_take = |node: &&Arc<NodeState>| {
            node.healthy.load(Ordering::Relaxed) && eligibility(node) != Eligibility::No
        };
        let stand_in = one_at_random(rotation.iter().map(|&place| &nodes[place]).filter(may_take));
        stand_in
            .and_then(|node| take(node, eligibility(node)))
            .or_else(|| first_that_may_take(nodes.iter(), eligibility))
    }

    /// The power of two choices: the round robin's next replica against one drawn at random
    /// from the others, and the clearly less loaded of the two, where both may take the
    /// attempt. Between equal replicas the round robin's wins, so they share evenly (two
    /// random draws spread 1,000 requests over three replicas ±10%); a busy or slow one loses
    /// whenever it comes up. After three rounds without a replica that may take the attempt
    /// (most are tried, ejected or failing their check), `None`, and the round robin looks at
    /// every replica.
    fn less_loaded_of_two<'r>(
        &self,
        replicas: &'r Replicas,
        eligibility: &dyn Fn(&NodeState) -> Eligibility,
    ) -> Option<(&'r Arc<NodeState>, bool)> {
        let (rotation, nodes) = (&replicas.rotation, &replicas.sorted);
        if nodes.len() < 2 {
            return None;
        }
        let now = balance::nanos_of(Instant::now());
        let may_take = |node: &NodeState| {
            node.healthy.load(Ordering::Relaxed) && eligibility(node) != Eligibility::No
        };
        for _ in 0..3 {
            let next = self.picks.fetch_add(1, Ordering::Relaxed) as usize % rotation.len();
            let (a, b) = balance::next_and_another(rotation[next], nodes.len());
            let (a, b) = (&nodes[a], &nodes[b]);
            let (chosen, other) = match (may_take(a), may_take(b)) {
                (true, true) => balance::choose_less_loaded(a, b, now),
                (true, false) => (a, b),
                (false, true) => (b, a),
                (false, false) => continue,
            };
            if let Some(taken) = take(chosen, eligibility(chosen)) {
                return Some(taken);
            }
            if may_take(other) {
                if let Some(taken) = take(other, eligibility(other)) {
                    return Some(taken);
                }
            }
        }
        None
    }

    /// Whether a retry would find a replica not tried yet that may take it (one with an `rpc`
    /// address, for a `grpc` call).
    pub fn has_untried(
        &self,
        grpc: bool,
        tried: &[SocketAddr],
        policy: &ServicePolicy,
        now: Ticks,
    ) -> bool {
        self.replicas.load().by_addr.iter().any(|(addr, node)| {
            !tried.contains(addr)
                && (!grpc || node.rpc_addr.is_some())
                && (policy.ejection.is_none()
                    || matches!(
                        node.outlier.availability(now),
                        Availability::Serving | Availability::TrialDue
                    ))
        })
    }

    /// Applies how an attempt at `pick`'s replica ended to its passive health; an ejection is
    /// logged once, when it happens.
    pub fn record_verdict(
        &self,
        pick: &Pick,
        verdict: Verdict,
        policy: &ServicePolicy,
        now: Ticks,
    ) {
        let Some(ejection) = policy.ejection.as_ref() else {
            return;
        };
        let may_eject = || {
            let replicas = self.replicas.load();
            let nodes = &replicas.by_addr;
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
        self.replicas.load().by_addr.is_empty()
    }

    pub fn nodes(&self) -> Vec<Arc<NodeState>> {
        let mut nodes: Vec<_> = self.replicas.load().by_addr.values().cloned().collect();
        nodes.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        nodes
    }

    pub fn is_healthy(&self, node: &NodeState) -> bool {
        node.healthy.load(Ordering::Relaxed)
    }

    pub fn poll_next(&self) -> u64 {
        let count = self.replicas.load().by_addr.len() as u64;
        if count == 0 {
            0
        } else {
            self.picks.load(Ordering::Relaxed) % count
        }
    }

    /// Brings the replica set in line with `members`, the service's registered nodes. Only
    /// nodes that are new or changed are resolved; the others keep their state.
    async fn apply(&self, members: &BTreeMap<String, NodeInfo>) {
        let known = self.replicas.load_full();
        let known_by_id: HashMap<&str, &Arc<NodeState>> = known
            .by_addr
            .values()
            .map(|n| (n.info.id.as_str(), n))
            .collect();
        let mut states = Vec::with_capacity(members.len());
        let mut unresolved = 0;
        for info in members.values() {
            match known_by_id.get(info.id.as_str()) {
                Some(state) if state.info == *info => states.push((*state).clone()),
                _ => match resolve(info, &info.http).await {
                    Some(addr) => {
                        let rpc_addr = match &info.rpc {
                            Some(rpc) => resolve(info, rpc).await,
                            None => None,
                        };
                        states.push(Arc::new(NodeState::new(info.clone(), addr, rpc_addr)));
                    }
                    None => unresolved += 1,
                },
            }
        }
        self.unresolved.store(unresolved, Ordering::Relaxed);
        self.install(states);
    }

    /// Replaces the replica set with resolved nodes; the state of replicas that stay is kept.
    #[cfg(test)]
    fn replace(&self, resolved: Vec<(NodeInfo, SocketAddr)>) {
        let previous = self.replicas.load_full();
        let states = resolved
            .into_iter()
            .map(|(info, addr)| match previous.by_addr.get(&addr) {
                Some(existing) if existing.info == info => existing.clone(),
                _ => {
                    let rpc_addr = info.rpc.as_deref().and_then(|rpc| rpc.parse().ok());
                    Arc::new(NodeState::new(info, addr, rpc_addr))
                }
            })
            .collect();
        self.install(states);
    }

    /// Makes `states` the service's replicas; the hash ring is built again when next needed.
    fn install(&self, states: Vec<Arc<NodeState>>) {
        let by_addr: HashMap<SocketAddr, Arc<NodeState>> =
            states.into_iter().map(|node| (node.addr, node)).collect();
        let mut sorted: Vec<Arc<NodeState>> = by_addr.values().cloned().collect();
        sorted.sort_by_key(|node| node.addr);
        let rotation = sorted
            .iter()
            .enumerate()
            .flat_map(|(place, node)| std::iter::repeat_n(place, node.info.weight.max(1) as usize))
            .collect();
        self.replicas.store(Arc::new(Replicas {
            by_addr,
            sorted,
            rotation,
            ring: OnceLock::new(),
        }));
    }

    /// TCP-checks every replica that did not answer a request within the interval: with
    /// traffic, most replicas prove themselves, and a gateway in front of a thousand replicas
    /// does not open a thousand connections a second to learn what it knows.
    async fn check_health(&self) {
        let now = Ticks::now();
        let mut checks = tokio::task::JoinSet::new();
        for node in self.replicas.load().by_addr.values() {
            if node.answered_within(self.health_interval, now) {
                node.healthy.store(true, Ordering::Relaxed);
                continue;
            }
            let (node, tcp, service) = (node.clone(), self.tcp_check.clone(), self.name.clone());
            checks.spawn(async move {
                let result = tcp.check(&node.backend).await;
                let healthy = result.is_ok();
                if node.healthy.swap(healthy, Ordering::Relaxed) != healthy {
                    match result {
                        Ok(()) => info!(message = "Replica passes its health check again.", %service, node = %node.id),
                        Err(error) => warn!(message = "Replica fails its health check.", %service, node = %node.id, %error),
                    }
                }
            });
        }
        while checks.join_next().await.is_some() {}
    }
}

/// Whether `node` may take an attempt: not tried yet and, under ejection, serving or due its
/// trial.
fn eligibility(
    node: &NodeState,
    tried: &[SocketAddr],
    policy: &ServicePolicy,
    now: Ticks,
) -> Eligibility {
    if tried.contains(&node.addr) {
        return Eligibility::No;
    }
    if policy.ejection.is_none() {
        return Eligibility::Yes;
    }
    match node.outlier.availability(now) {
        Availability::Serving => Eligibility::Yes,
        Availability::TrialDue => Eligibility::AsTrial,
        _ => Eligibility::No,
    }
}

/// `node` with whether it takes the attempt as its trial, or `None` when it may not take it
/// (another request claimed the trial first).
fn take(node: &Arc<NodeState>, eligibility: Eligibility) -> Option<(&Arc<NodeState>, bool)> {
    match eligibility {
        Eligibility::Yes => Some((node, false)),
        Eligibility::AsTrial if node.outlier.claim_trial() => Some((node, true)),
        _ => None,
    }
}

/// One of `candidates`, each as likely (reservoir sampling: one pass, no allocation).
fn one_at_random<T>(candidates: impl Iterator<Item = T>) -> Option<T> {
    let mut chosen = None;
    for (seen, candidate) in candidates.enumerate() {
        if fastrand::usize(..=seen) == 0 {
            chosen = Some(candidate);
        }
    }
    chosen
}

/// The first of `candidates` that is healthy and may take the attempt, or else the first that
/// may take it at all.
fn first_that_may_take<'r>(
    candidates: impl Iterator<Item = &'r Arc<NodeState>> + Clone,
    eligibility: &dyn Fn(&NodeState) -> Eligibility,
) -> Option<(&'r Arc<NodeState>, bool)> {
    candidates
        .clone()
        .filter(|node| node.healthy.load(Ordering::Relaxed))
        .find_map(|node| take(node, eligibility(node)))
        .or_else(|| {
            candidates
                .into_iter()
                .find_map(|node| take(node, eligibility(node)))
        })
}

impl NodeState {
    fn new(info: NodeInfo, addr: SocketAddr, rpc_addr: Option<SocketAddr>) -> Self {
        NodeState {
            id: Arc::from(info.id.as_str()),
            addr_text: Arc::from(addr.to_string()),
            backend: Backend {
                addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                weight: info.weight.max(1) as usize,
                ext: Default::default(),
            },
            info,
            addr,
            rpc_addr,
            in_flight: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: LatencyEwma::default(),
            outlier: Outlier::default(),
            last_success: AtomicU64::new(0),
            healthy: std::sync::atomic::AtomicBool::new(true),
        }
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

/// Resolves one of a node's `host:port` addresses (`http` or `rpc`); hostnames (compose
/// service names) go through DNS.
async fn resolve(node: &NodeInfo, address: &str) -> Option<SocketAddr> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Some(addr);
    }
    match tokio::net::lookup_host(address).await {
        Ok(mut addrs) => {
            let addr = addrs.find(SocketAddr::is_ipv4).or_else(|| addrs.next());
            if addr.is_none() {
                warn!(message = "Replica address resolves to nothing.", service = %node.service, %address);
            }
            addr
        }
        Err(error) => {
            warn!(message = "Cannot resolve replica address.", service = %node.service, %address, %error);
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

    #[test]
    fn weighted_round_robin_skips_what_was_tried_and_a_replica_that_left() {
        let upstream = ServiceUpstream::new("user", Duration::from_secs(1));
        let (mut heavy, addr) = member(9003);
        heavy.weight = 2;
        upstream.replace(vec![member(9001), member(9002), (heavy, addr)]);
        let policy = ServicePolicy::default();
        let ports: Vec<u16> = (0..8)
            .map(|_| {
                upstream
                    .select(Selection::RoundRobin, false, &[], &policy, Ticks::now())
                    .unwrap()
                    .node
                    .addr
                    .port()
            })
            .collect();
        assert_eq!(ports, [9001, 9002, 9003, 9003, 9001, 9002, 9003, 9003]);
        let tried = [member(9001).1, member(9003).1];
        for _ in 0..4 {
            let picked = upstream
                .select(Selection::RoundRobin, false, &tried, &policy, Ticks::now())
                .unwrap();
            assert_eq!(picked.node.addr.port(), 9002);
        }
        upstream.replace(vec![member(9001)]);
        for _ in 0..4 {
            let picked = upstream
                .select(Selection::RoundRobin, false, &[], &policy, Ticks::now())
                .unwrap();
            assert_eq!(picked.node.addr.port(), 9001, "9002 and 9003 left");
        }
        assert!(upstream
            .select(
                Selection::RoundRobin,
                false,
                &[member(9001).1],
                &policy,
                Ticks::now()
            )
            .is_none());
    }

    #[test]
    fn an_unhealthy_replica_is_drawn_only_when_no_healthy_one_is_left() {
        let upstream = ServiceUpstream::new("user", Duration::from_secs(1));
        upstream.replace(vec![member(9001), member(9002)]);
        let sick = upstream.nodes()[0].clone();
        sick.healthy.store(false, Ordering::Relaxed);
        let policy = ServicePolicy::default();
        for _ in 0..4 {
            let picked = upstream
                .select(Selection::RoundRobin, false, &[], &policy, Ticks::now())
                .unwrap();
            assert_eq!(picked.node.addr.port(), 9002);
        }
        let picked = upstream
            .select(
                Selection::RoundRobin,
                false,
                &[member(9002).1],
                &policy,
                Ticks::now(),
            )
            .unwrap();
        assert_eq!(
            picked.node.addr.port(),
            9001,
            "better an unchecked replica than none"
        );
    }

    #[test]
    fn the_turns_of_a_replica_that_is_down_are_shared_by_the_others() {
        let upstream = ServiceUpstream::new("user", Duration::from_secs(1));
        upstream.replace(vec![member(9001), member(9002), member(9003)]);
        upstream.nodes()[0].healthy.store(false, Ordering::Relaxed);
        let policy = ServicePolicy::default();
        let picks = (0..3000).map(|_| {
            let pick = upstream.select(Selection::RoundRobin, false, &[], &policy, Ticks::now());
            pick.unwrap().node.addr.port()
        });
        let shares = counts(&upstream, picks);
        assert_eq!(shares[0], 0);
        assert!(
            (1350..=1650).contains(&shares[1]),
            "not twice the share for the next in order: {shares:?}"
        );
    }

    fn ports_of(upstream: &ServiceUpstream) -> Vec<u16> {
        upstream.nodes().iter().map(|n| n.addr.port()).collect()
    }

    /// How many of `picks` went to each port, in port order.
    fn counts(upstream: &ServiceUpstream, picks: impl Iterator<Item = u16>) -> Vec<usize> {
        let ports = ports_of(upstream);
        let mut counts = vec![0; ports.len()];
        for port in picks {
            counts[ports.iter().position(|p| *p == port).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn least_request_spreads_equal_replicas_evenly_and_avoids_a_slow_or_busy_one() {
        let upstream = ServiceUpstream::new("user", Duration::from_secs(1));
        upstream.replace(vec![member(9001), member(9002), member(9003)]);
        let policy = ServicePolicy::default();
        let pick = || {
            upstream
                .select(Selection::LeastRequest, false, &[], &policy, Ticks::now())
                .unwrap()
                .node
        };
        let at = balance::nanos_of(Instant::now());
        for node in upstream.nodes() {
            node.latency.observe(Duration::from_millis(2), at);
        }
        let even = counts(&upstream, (0..3000).map(|_| pick().addr.port()));
        assert!(
            even.iter().all(|n| (850..=1150).contains(n)),
            "equal replicas within ±15%: {even:?}"
        );

        let slow = upstream.nodes()[2].clone();
        slow.latency
            .observe(Duration::from_millis(202), at + 2_000_000_000);
        let shares = counts(&upstream, (0..3000).map(|_| pick().addr.port()));
        assert!(shares[2] <= 30, "the slow replica got {shares:?}");

        let busy = upstream.nodes()[0].clone();
        busy.in_flight.store(8, Ordering::Relaxed);
        let shares = counts(&upstream, (0..3000).map(|_| pick().addr.port()));
        assert!(
            shares[0] <= 30,
            "the replica with 8 in flight got {shares:?}"
        );
    }

    #[test]
    fn least_request_skips_what_was_tried_and_still_finds_the_last_replica() {
        let upstream = ServiceUpstream::new("user", Duration::from_secs(1));
        upstream.replace(vec![member(9001), member(9002), member(9003)]);
        let policy = ServicePolicy::default();
        let tried = [member(9001).1, member(9002).1];
        for _ in 0..50 {
            let picked = upstream
                .select(
                    Selection::LeastRequest,
                    false,
                    &tried,
                    &policy,
                    Ticks::now(),
                )
                .unwrap();
            assert_eq!(picked.node.addr.port(), 9003);
        }
        let all = [tried[0], tried[1], member(9003).1];
        assert!(upstream
            .select(Selection::LeastRequest, false, &all, &policy, Ticks::now())
            .is_none());
    }

    /// Which port each of `keys` hashes to.
    fn placement(upstream: &ServiceUpstream, keys: &[String]) -> Vec<u16> {
        let policy = ServicePolicy::default();
        keys.iter()
            .map(|key| {
                upstream
                    .select(
                        Selection::Hash(key.as_bytes()),
                        false,
                        &[],
                        &policy,
                        Ticks::now(),
                    )
                    .unwrap()
                    .node
                    .addr
                    .port()
            })
            .collect()
    }

    #[test]
    fn hashing_moves_only_the_keys_of_a_replica_that_leaves_or_joins_about_one_in_n() {
        let upstream = ServiceUpstream::new("user", Duration::from_secs(1));
        let ten: Vec<_> = (9001..=9010).map(member).collect();
        upstream.replace(ten.clone());
        let keys: Vec<String> = (0..10_000).map(|n| format!("user-{n}")).collect();
        let before = placement(&upstream, &keys);
        assert_eq!(
            before,
            placement(&upstream, &keys),
            "the same key, the same replica"
        );
        let spread = counts(&upstream, before.iter().copied());
        assert!(
            spread.iter().all(|n| (600..=1400).contains(n)),
            "{spread:?}"
        );

        upstream.replace(ten[1..].to_vec());
        let after_leave = placement(&upstream, &keys);
        let moved: Vec<usize> = (0..keys.len())
            .filter(|&i| before[i] != after_leave[i])
            .collect();
        assert!(
            moved.iter().all(|&i| before[i] == 9001),
            "only the leaver's keys move"
        );
        let share = moved.len() as f64 / keys.len() as f64;
        println!(
            "one replica of 10 left: {:.1}% of 10,000 keys moved",
            share * 100.0
        );
        assert!((0.06..=0.14).contains(&share), "{share}");

        let mut eleven = ten.clone();
        eleven.push(member(9011));
        upstream.replace(eleven);
        let after_join = placement(&upstream, &keys);
        let moved: Vec<usize> = (0..keys.len())
            .filter(|&i| before[i] != after_join[i])
            .collect();
        assert!(
            moved.iter().all(|&i| after_join[i] == 9011),
            "keys move only to the new one"
        );
        let share = moved.len() as f64 / keys.len() as f64;
        println!(
            "one replica joined 10: {:.1}% of 10,000 keys moved",
            share * 100.0
        );
        assert!((0.05..=0.13).contains(&share), "{share}");
    }

    #[test]
    fn a_hashed_key_whose_replica_is_tried_or_ejected_goes_to_the_next_on_the_ring_and_comes_back()
    {
        let upstream = ServiceUpstream::new("user", Duration::from_secs(1));
        upstream.replace(vec![member(9001), member(9002), member(9003)]);
        let policy = ServicePolicy::default();
        let select = |tried: &[SocketAddr]| {
            upstream
                .select(
                    Selection::Hash(b"alice"),
                    false,
                    tried,
                    &policy,
                    Ticks::now(),
                )
                .map(|pick| pick.node.addr)
        };
        let home = select(&[]).unwrap();
        let next = select(&[home]).unwrap();
        assert_ne!(home, next);
        let last = select(&[home, next]).unwrap();
        assert!(last != home && last != next);
        assert_eq!(select(&[home, next, last]), None);

        let home_node = upstream.replicas.load().by_addr[&home].clone();
        home_node.healthy.store(false, Ordering::Relaxed);
        assert_eq!(
            select(&[]),
            Some(next),
            "an unhealthy home sends the key on"
        );
        home_node.healthy.store(true, Ordering::Relaxed);
        assert_eq!(select(&[]), Some(home));
    }
}
