//! The `goms` command line: flags, logging, and one function per subcommand.
//!
//! Precedence is flags > `GOMS__*` environment > `goms.yml` > built-in defaults.

mod check;
mod cluster;
pub mod logging;
mod trace;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{GomsConfig, LogFormat, DEFAULT_CONFIG_PATH};

#[derive(Debug, Parser)]
#[command(
    name = "goms",
    version,
    about = "goms: API gateway, service registry on etcd, and distributed trace logs",
    long_about = "goms routes /api/{service}/{route} to service replicas registered in etcd.\n\n\
Configuration is read from --config (default config/goms.yml; an absent file means defaults), \
then overridden by GOMS__* environment variables (GOMS__CALL_SERVICE_KEY, GOMS__GATEWAY__HTTP_PORT, ...), \
then by the flags below."
)]
pub struct Cli {
    /// Process config file (goms.yml). An absent file means built-in defaults.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Log format: `text` for people, `json` for log shippers. Overrides log.format.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,

    /// Log filter such as `info` or `goms=debug,info`. Overrides log.level; RUST_LOG wins over both.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the API gateway (pingora): routes /api/{service}/{route} to replicas from etcd.
    Gateway(GatewayArgs),
    /// Run the stock example service: echoes every request as the Go original's JSON body.
    Service(ServiceArgs),
    /// Run beside an HTTP app in any language and make it a goms node: register while the app
    /// is healthy, check and strip Call-Service-Key, forward, emit service.start/service.end.
    Sidecar(SidecarArgs),
    /// Move trace events from RabbitMQ into Elasticsearch; run as many as you like.
    TraceConsumer(TraceConsumerArgs),
    /// Print the /cluster document of a running gateway, or straight from etcd.
    Cluster(ClusterArgs),
    /// Print a request's timeline: the gateway, each attempt, the services, and back.
    Trace(TraceArgs),
    /// Validate goms.yml and services.yml; exit non-zero with file:line: reason on the first error.
    CheckConfig(CheckArgs),
}

/// Flags shared by everything that registers in etcd.
#[derive(Debug, Args)]
struct NodeArgs {
    /// etcd endpoint host:port; repeat the flag or separate with `,` or `|`. Overrides etcdAddr.
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    etcd_addr: Vec<String>,

    /// Host other nodes reach this one at (registered in etcd). Overrides *.advertiseHost.
    #[arg(long, value_name = "HOST")]
    advertise_host: Option<String>,

    /// Registration lease TTL in seconds; a dead node disappears after at most this. Overrides registry.leaseTtl.
    #[arg(long, value_name = "SECONDS")]
    lease_ttl: Option<u64>,

    /// Node id in etcd and in join/leave logs. Default: advertise-host:port.
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,

    /// RabbitMQ URL trace events are published to, or several separated by `,` to fail over
    /// between. Overrides amqpAddr.
    #[arg(long, value_name = "URL")]
    amqp_addr: Option<String>,
}

#[derive(Debug, Args)]
struct TraceConsumerArgs {
    /// RabbitMQ URL to consume trace events from, or several separated by `,` to fail over
    /// between. Overrides amqpAddr.
    #[arg(long, value_name = "URL")]
    amqp_addr: Option<String>,

    /// Elasticsearch URL to index into. Overrides esAddr.
    #[arg(long, value_name = "URL")]
    es_addr: Option<String>,
}

#[derive(Debug, Args)]
struct GatewayArgs {
    /// Port the gateway listens on, all interfaces. Overrides gateway.httpPort (default 8080).
    #[arg(long, value_name = "PORT")]
    http_port: Option<u16>,

    /// Route file (services.yml, the Go original's format), watched for live edits. Overrides
    /// gateway.routes.
    #[arg(long, value_name = "PATH")]
    routes: Option<PathBuf>,

    /// Proxy worker threads. Overrides gateway.threads (default 2).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Admin listener for /cluster, /metrics and /healthz (host:port; port 0 picks one).
    /// Overrides gateway.adminAddr (default: 127.0.0.1 on the public port + 1821, so 9901 for
    /// 8080 and 9902 for 8081; port 0 when the public port is 0).
    #[arg(long, value_name = "HOST:PORT")]
    admin_addr: Option<String>,

    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
struct ServiceArgs {
    /// Service name, the {service} in /api/{service}/{route}. Overrides service.name (default user).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Port the service listens on; 0 picks a free one. Overrides service.httpPort (default 9080).
    #[arg(long, value_name = "PORT")]
    http_port: Option<u16>,

    /// Port the service serves gRPC on (h2c; the echo service's goms.echo.v1.Echo), registered
    /// in etcd as `rpc`; 0 picks a free one. Overrides service.rpcPort (default none: no gRPC).
    #[arg(long, value_name = "PORT")]
    rpc_port: Option<u16>,

    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
struct SidecarArgs {
    /// Service name the app registers under, the {service} in /api/{service}/{route}.
    /// Overrides service.name.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// The app's address (host:port), reached over keep-alive connections. Overrides
    /// sidecar.app (default 127.0.0.1:3000).
    #[arg(long, value_name = "HOST:PORT")]
    app: Option<String>,

    /// Port the sidecar listens on for gateways, all interfaces; 0 picks a free one (the port
    /// it got is registered). Overrides service.httpPort (default 9080).
    #[arg(long, value_name = "PORT")]
    http_port: Option<u16>,

    /// The app's health check, a GET of this path that must answer 2xx; without it the check
    /// is a TCP connect. Overrides sidecar.health.
    #[arg(long, value_name = "PATH")]
    health: Option<String>,

    /// How often the app is checked, e.g. `2s`; after sidecar.healthFailures (3) failures in a
    /// row the node leaves the registry until the app recovers. Overrides
    /// sidecar.healthInterval.
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
    health_interval: Option<std::time::Duration>,

    /// Where /healthz, /readyz and /metrics are served (host:port; port 0 picks one).
    /// Overrides sidecar.adminAddr (default 127.0.0.1:4191).
    #[arg(long, value_name = "HOST:PORT")]
    admin_addr: Option<String>,

    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
struct ClusterArgs {
    /// Ask this running gateway (host:port) instead of reading etcd; includes live counters.
    #[arg(long, value_name = "HOST:PORT")]
    gateway: Option<String>,

    /// etcd endpoint host:port when reading etcd. Overrides etcdAddr.
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    etcd_addr: Vec<String>,

    /// Redraw a summary every second (services, replicas and health; requests/s per route
    /// with --gateway, which then names the gateway's admin listener) until Ctrl-C.
    #[arg(long)]
    watch: bool,
}

#[derive(Debug, Args)]
struct TraceArgs {
    /// The request's X-Request-Id.
    request_id: String,

    /// Read the events from this Elasticsearch (default: esAddr).
    #[arg(long, value_name = "URL", conflicts_with = "gateway")]
    es: Option<String>,

    /// Ask this gateway's admin listener (host:port, gateway.adminAddr): its own record of
    /// the request (exact attempt times) plus the services' events it finds in Elasticsearch.
    #[arg(long, value_name = "HOST:PORT")]
    gateway: Option<String>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Route file to check. With only --config, only goms.yml is checked, and vice versa;
    /// with neither, both default files are checked.
    #[arg(long, value_name = "PATH")]
    routes: Option<PathBuf>,
}

/// Parses the command line and runs the subcommand; the process exit code follows the result.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::CheckConfig(args) = &cli.command {
        return check::run(cli.config.as_deref(), args.routes.as_deref());
    }
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let mut config = GomsConfig::load(&config_path)?;
    if let Some(format) = cli.log_format {
        config.log.format = format;
    }
    if let Some(level) = &cli.log_level {
        config.log.level = level.clone();
    }
    logging::init(&config.log);
    match cli.command {
        Command::Gateway(args) => run_gateway(config, args),
        Command::Service(args) => run_service(config, args),
        Command::Sidecar(args) => run_sidecar(config, args),
        Command::TraceConsumer(args) => run_trace_consumer(config, args),
        Command::Cluster(args) => {
            if !args.etcd_addr.is_empty() {
                config.etcd_addr = args.etcd_addr;
            }
            if args.watch {
                runtime()?.block_on(cluster::watch(&config, args.gateway.as_deref()))
            } else {
                runtime()?.block_on(cluster::run(&config, args.gateway.as_deref()))
            }
        }
        Command::Trace(args) => runtime()?.block_on(trace::run(
            &config,
            &args.request_id,
            args.es.as_deref(),
            args.gateway.as_deref(),
        )),
        Command::CheckConfig(_) => unreachable!("handled above"),
    }
}

fn apply_node_args(config: &mut GomsConfig, node: &NodeArgs, advertise_host: &mut String) {
    let endpoints: Vec<String> = node
        .etcd_addr
        .iter()
        .flat_map(|e| e.split('|'))
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if !endpoints.is_empty() {
        config.etcd_addr = endpoints;
    }
    if let Some(host) = &node.advertise_host {
        *advertise_host = host.clone();
    }
    if let Some(ttl) = node.lease_ttl {
        config.registry.lease_ttl = ttl;
    }
    if let Some(amqp) = &node.amqp_addr {
        config.amqp_addr = amqp.clone();
    }
}

fn run_gateway(mut config: GomsConfig, args: GatewayArgs) -> anyhow::Result<()> {
    let mut host = config.gateway.advertise_host.clone();
    apply_node_args(&mut config, &args.node, &mut host);
    config.gateway.advertise_host = host;
    if let Some(port) = args.http_port {
        config.gateway.http_port = port;
    }
    if let Some(routes) = args.routes {
        config.gateway.routes = routes;
    }
    if let Some(threads) = args.threads {
        config.gateway.threads = threads;
    }
    if let Some(admin) = args.admin_addr {
        config.gateway.explicit_admin_addr = Some(admin);
    }
    config.validate().map_err(anyhow::Error::msg)?;
    let listeners = crate::gateway::bind(&config).context("gateway")?;
    crate::gateway::run(
        config,
        args.node.node_id,
        listeners,
        crate::registry::drain::termination_signal(),
    )
    .context("gateway")?;
    Ok(())
}

/// The flags a service node shares with a sidecar, which is one: the node's, its name, port.
fn apply_service_args(
    config: &mut GomsConfig,
    node: &NodeArgs,
    name: Option<String>,
    http_port: Option<u16>,
) {
    let mut host = config.service.advertise_host.clone();
    apply_node_args(config, node, &mut host);
    config.service.advertise_host = host;
    if let Some(name) = name {
        config.service.name = name;
    }
    if let Some(port) = http_port {
        config.service.http_port = port;
    }
}

fn run_service(mut config: GomsConfig, args: ServiceArgs) -> anyhow::Result<()> {
    apply_service_args(&mut config, &args.node, args.name, args.http_port);
    if let Some(port) = args.rpc_port {
        config.service.rpc_port = Some(port);
    }
    config.validate().map_err(anyhow::Error::msg)?;
    let mut options = crate::service::ServiceOptions::from_config(&config)?;
    options.node_id = args.node.node_id;
    runtime()?.block_on(crate::service::serve_with_rpc(
        options,
        crate::service::echo::echo_router(),
        crate::service::rpc::echo_routes(),
        crate::service::termination_signal(),
    ))?;
    Ok(())
}

fn run_sidecar(mut config: GomsConfig, args: SidecarArgs) -> anyhow::Result<()> {
    apply_service_args(&mut config, &args.node, args.name, args.http_port);
    let sidecar = &mut config.sidecar;
    if let Some(app) = args.app {
        sidecar.app = app;
    }
    if let Some(health) = args.health {
        sidecar.health = Some(health);
    }
    if let Some(interval) = args.health_interval {
        sidecar.health_interval = interval;
    }
    if let Some(admin) = args.admin_addr {
        sidecar.admin_addr = admin;
    }
    config.validate().map_err(anyhow::Error::msg)?;
    let mut options = crate::sidecar::SidecarOptions::from_config(&config)?;
    options.node.node_id = args.node.node_id;
    let (listener, admin) = options.bind().context("sidecar")?;
    crate::sidecar::run(
        options,
        listener,
        admin,
        crate::registry::drain::termination_signal(),
    )
    .context("sidecar")?;
    Ok(())
}

fn run_trace_consumer(mut config: GomsConfig, args: TraceConsumerArgs) -> anyhow::Result<()> {
    if let Some(amqp) = args.amqp_addr {
        config.amqp_addr = amqp;
    }
    if let Some(es) = args.es_addr {
        config.es_addr = es;
    }
    config.validate().map_err(anyhow::Error::msg)?;
    let settings = crate::indexer::ConsumerSettings::from_config(&config);
    runtime()?.block_on(async {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            crate::service::termination_signal().await;
            let _ = stop.send(true);
        });
        let stats = crate::indexer::ConsumerStats::default();
        let result = crate::indexer::run(settings, &stats, stopped).await;
        tracing::info!("trace consumer stopped: {}", stats.summary());
        result.context("trace consumer")
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}
