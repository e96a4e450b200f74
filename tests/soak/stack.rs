//! The process stack the soak runs: etcd and RabbitMQ in containers, the Elasticsearch
//! stand-in in this process, and `goms` processes (two gateways, three `user` replicas, one
//! trace consumer), each of which can be SIGKILLed and started again at the same address.
//!
//! Every node spools into one shared root, as the nodes of one host do: a node started
//! again at its address finds its own spool folder and replays it, unless a live node
//! adopted the folder first while it was down.

use std::time::{Duration, Instant};

use crate::support::es_standin::EsStandIn;
use crate::support::{free_port, route_file, wait_for_nodes, Etcd, Goms, RabbitMq, ROUTES};

pub const REPLICAS: usize = 3;
pub const GATEWAYS: usize = 2;

/// The containers and the stand-in, which faults stop and start in place, and the `goms`
/// processes, which faults kill and start again.
pub struct Stack {
    pub etcd: Etcd,
    pub broker: RabbitMq,
    pub es: EsStandIn,
    pub processes: tokio::sync::Mutex<Processes>,
    _routes: tempfile::TempDir,
    _spool: tempfile::TempDir,
}

pub struct Processes {
    pub gateways: Vec<Process>,
    pub replicas: Vec<Process>,
    pub consumer: Process,
    /// Processes killed during the run, kept for their logs.
    pub retired: Vec<Goms>,
}

/// One `goms` process and what it takes to start it again as the same node.
pub struct Process {
    pub label: String,
    pub port: u16,
    pub goms: Goms,
    /// When this incarnation started.
    pub since: Instant,
    recipe: Recipe,
}

#[derive(Clone)]
struct Recipe {
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// A log line the process writes once it serves.
    ready: Option<&'static str>,
}

impl Stack {
    pub async fn start() -> Stack {
        let (etcd, broker, es) = tokio::join!(Etcd::start(), RabbitMq::start(), EsStandIn::start());
        let (routes_folder, routes) = route_file(ROUTES);
        let spool = tempfile::tempdir().expect("spool root");
        let common_env = vec![
            ("GOMS__AMQP_ADDR".to_string(), broker.url()),
            (
                "GOMS__TRACE__SPOOL_DIR".to_string(),
                spool.path().display().to_string(),
            ),
        ];
        let mut replicas = Vec::new();
        for n in 0..REPLICAS {
            let port = free_port();
            let args = [
                "service",
                "--name",
                "user",
                "--http-port",
                &port.to_string(),
                "--etcd-addr",
                &etcd.endpoint(),
            ];
            let recipe = node_recipe(&args, &common_env, &[], None);
            replicas.push(Process::start(format!("user-{n}:{port}"), port, recipe).await);
        }
        let mut gateways = Vec::new();
        for n in 0..GATEWAYS {
            let port = free_port();
            let admin = format!("127.0.0.1:{}", free_port());
            let args = [
                "gateway",
                "--http-port",
                &port.to_string(),
                "--etcd-addr",
                &etcd.endpoint(),
                "--routes",
                &routes.display().to_string(),
            ];
            let recipe = node_recipe(
                &args,
                &common_env,
                &[("GOMS__GATEWAY__ADMIN_ADDR", &admin)],
                Some("Http Listen on port"),
            );
            gateways.push(Process::start(format!("gateway-{n}:{port}"), port, recipe).await);
        }
        // As `trace_fixtures::consumer` starts it, with a recipe to start it again.
        let consumer_env = [
            ("GOMS__ES_ADDR", es.url()),
            ("GOMS__TRACE_CONSUMER__BATCH_WAIT", "50ms".into()),
            ("GOMS__TRACE_CONSUMER__MAX_BACKOFF", "500ms".into()),
        ];
        let consumer_env: Vec<(&str, &str)> =
            consumer_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let recipe = node_recipe(&["trace-consumer"], &common_env, &consumer_env, None);
        let consumer = Process::start("consumer".into(), 0, recipe).await;
        for gateway in &gateways {
            wait_for_nodes(gateway.port, "user", REPLICAS).await;
        }
        Stack {
            etcd,
            broker,
            es,
            processes: tokio::sync::Mutex::new(Processes {
                gateways,
                replicas,
                consumer,
                retired: Vec::new(),
            }),
            _routes: routes_folder,
            _spool: spool,
        }
    }
}

fn node_recipe(
    args: &[&str],
    common_env: &[(String, String)],
    env: &[(&str, &str)],
    ready: Option<&'static str>,
) -> Recipe {
    let mut all_env = common_env.to_vec();
    all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Recipe {
        args: args.iter().map(|a| a.to_string()).collect(),
        env: all_env,
        ready,
    }
}

impl Process {
    async fn start(label: String, port: u16, recipe: Recipe) -> Process {
        let goms = launch(&label, &recipe).await;
        Process {
            label,
            port,
            goms,
            since: Instant::now(),
            recipe,
        }
    }

    /// SIGKILL: no deregistration, no flush; what it held in memory is gone.
    pub fn kill(&mut self) {
        self.goms.kill();
    }

    /// Starts the process again as the same node; the old one's log goes to `retired`.
    pub async fn start_again(&mut self, retired: &mut Vec<Goms>) {
        let fresh = launch(&self.label, &self.recipe).await;
        retired.push(std::mem::replace(&mut self.goms, fresh));
        self.since = Instant::now();
    }

    pub fn pid(&self) -> i32 {
        self.goms.pid()
    }
}

async fn launch(label: &str, recipe: &Recipe) -> Goms {
    let args: Vec<&str> = recipe.args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = recipe
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let goms = Goms::spawn(label, &args, &env);
    if let Some(line) = recipe.ready {
        goms.wait_for_line(line, Duration::from_secs(30)).await;
    }
    goms
}
