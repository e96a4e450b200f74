//! The faults the soak injects, one every `--fault-every` (30 s) from half that on, in an
//! order drawn from the seed. Each cycle of six is a fresh shuffle, so every run of three
//! minutes or more meets each fault; which replica is hit is drawn too. The gateway killed
//! is always the second one (see [`Fault::KillGateway`]).

use std::time::{Duration, Instant};

use crate::rng::Rng;
use crate::stack::Stack;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillReplica,
    RestartEtcd,
    StopBroker,
    KillConsumer,
    RefuseIndexing,
    KillGateway,
}

const ALL: [Fault; 6] = [
    Fault::KillReplica,
    Fault::RestartEtcd,
    Fault::StopBroker,
    Fault::KillConsumer,
    Fault::RefuseIndexing,
    Fault::KillGateway,
];

/// How long RabbitMQ stays stopped, and the stand-in refuses every request.
const OUTAGE: Duration = Duration::from_secs(20);
/// How long a SIGKILLed process stays down before it is started again.
const DOWN_FOR: Duration = Duration::from_secs(3);

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillReplica => "SIGKILL a replica, start it again",
            Fault::RestartEtcd => "restart etcd",
            Fault::StopBroker => "stop RabbitMQ for 20 s",
            Fault::KillConsumer => "SIGKILL the consumer, start it again",
            Fault::RefuseIndexing => "Elasticsearch refuses for 20 s",
            Fault::KillGateway => "SIGKILL the second gateway, start it again",
        }
    }
}

/// A process the fault SIGKILLed, by the port it serves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Killed {
    Replica(u16),
    Gateway(u16),
    Consumer,
}

#[derive(Debug, Clone)]
pub struct Injected {
    pub fault: Fault,
    pub target: String,
    /// Seconds since the traffic started.
    pub started: f64,
    pub ended: f64,
    pub killed: Option<Killed>,
}

/// Injects faults from `t0 + every / 2` on, one every `every`, until `until`; returns once
/// the last one is over (every process started again, every outage ended).
pub async fn inject_until(
    stack: &Stack,
    t0: Instant,
    until: Instant,
    every: Duration,
    seed: u64,
) -> Vec<Injected> {
    let mut rng = Rng::new(seed);
    let mut order = Vec::new();
    let mut injected = Vec::new();
    let mut next = t0 + every / 2;
    while next < until {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        if order.is_empty() {
            order = ALL.to_vec();
            rng.shuffle(&mut order);
        }
        let fault = order.pop().expect("a fault left in this cycle");
        let started = t0.elapsed().as_secs_f64();
        let (target, killed) = inject(stack, fault, &mut rng).await;
        let done = Injected {
            fault,
            target,
            started,
            ended: t0.elapsed().as_secs_f64(),
            killed,
        };
        println!(
            "[soak] {:6.1}s  {} ({}), over after {:.1}s",
            done.started,
            fault.name(),
            done.target,
            done.ended - done.started
        );
        injected.push(done);
    }
    injected
}

/// `--outage-loop`: `count` RabbitMQ outages of `down` each, `gap` apart (and `gap` before
/// the first); returns once the last is over.
pub async fn outage_loop(
    stack: &Stack,
    t0: Instant,
    count: usize,
    down: Duration,
    gap: Duration,
) -> Vec<Injected> {
    let mut injected = Vec::new();
    for n in 1..=count {
        tokio::time::sleep(gap).await;
        let started = t0.elapsed().as_secs_f64();
        stack.broker.pause().await;
        tokio::time::sleep(down).await;
        stack.broker.resume().await;
        let ended = t0.elapsed().as_secs_f64();
        println!(
            "[soak] {started:6.1}s  RabbitMQ outage {n} of {count}, over after {:.1}s",
            ended - started
        );
        injected.push(Injected {
            fault: Fault::StopBroker,
            target: "RabbitMQ".into(),
            started,
            ended,
            killed: None,
        });
    }
    injected
}

async fn inject(stack: &Stack, fault: Fault, rng: &mut Rng) -> (String, Option<Killed>) {
    match fault {
        Fault::KillReplica => {
            let mut processes = stack.processes.lock().await;
            let processes = &mut *processes;
            let replica = &mut processes.replicas[rng.below(crate::stack::REPLICAS)];
            replica.kill();
            tokio::time::sleep(DOWN_FOR).await;
            replica.start_again(&mut processes.retired).await;
            (replica.label.clone(), Some(Killed::Replica(replica.port)))
        }
        Fault::KillGateway => {
            let mut processes = stack.processes.lock().await;
            let processes = &mut *processes;
            // Always the second: the first lives through the whole run, so that its memory
            // over time tells warm-up from a leak.
            let gateway = &mut processes.gateways[crate::stack::GATEWAYS - 1];
            gateway.kill();
            tokio::time::sleep(DOWN_FOR).await;
            gateway.start_again(&mut processes.retired).await;
            (gateway.label.clone(), Some(Killed::Gateway(gateway.port)))
        }
        Fault::KillConsumer => {
            let mut processes = stack.processes.lock().await;
            let processes = &mut *processes;
            processes.consumer.kill();
            tokio::time::sleep(DOWN_FOR).await;
            processes.consumer.start_again(&mut processes.retired).await;
            ("consumer".into(), Some(Killed::Consumer))
        }
        Fault::RestartEtcd => {
            stack.etcd.pause().await;
            stack.etcd.resume().await;
            ("etcd".into(), None)
        }
        Fault::StopBroker => {
            stack.broker.pause().await;
            tokio::time::sleep(OUTAGE).await;
            stack.broker.resume().await;
            ("RabbitMQ".into(), None)
        }
        Fault::RefuseIndexing => {
            stack.es.change(|faults| faults.outage = true);
            tokio::time::sleep(OUTAGE).await;
            stack.es.change(|faults| faults.outage = false);
            ("Elasticsearch stand-in".into(), None)
        }
    }
}
