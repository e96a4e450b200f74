//! The API gateway: a pingora proxy that routes `/api/{service}/{route}` to replicas found
//! in etcd.
//!
//! # Layout
//! - [`route_store`]: the route table in force and its live reload.
//! - [`upstreams`]: per-service round-robin balancers fed by the etcd watcher.
//! - [`proxy`]: the pingora filters, i.e. the request path itself.
//! - [`cluster`]: goms's `/cluster` document.
//! - [`metrics`]: Prometheus counters at `/metrics`.
//! - [`respond`]: responses the gateway writes itself (goms's JSON envelope).
//! - [`record`]: what the gateway learns about a request while it passes.
//! - [`trace_events`]: the gateway's `request.start` / `request.end` trace events, written
//!   by [`json`], the request path's JSON writer.
//!
//! Threads: pingora gives the proxy and the registry link each their own tokio runtime;
//! they share only lock-free snapshots ([`arc_swap`]) and atomics.

pub mod cluster;
pub mod json;
pub mod metrics;
pub mod proxy;
pub mod record;
pub mod respond;
pub mod route_store;
pub mod trace_events;
pub mod upstreams;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{ConfigError, GomsConfig, RouteDefaults};
use crate::registry::{node, watch_members, EtcdEndpoints, Members, NodeInfo, Registration};
use crate::trace::{Publisher, Redactor, TraceSink};
use metrics::GatewayMetrics;
use proxy::GatewayProxy;
use route_store::{route_source, RouteStore};
use trace_events::GatewayTracer;
use upstreams::Upstreams;

/// The service name gateways register under.
pub const GATEWAY_SERVICE: &str = "gateway";

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spool(#[from] crate::trace::SpoolError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Starts the gateway and serves until SIGTERM (graceful) or SIGINT (fast). Never returns
/// on success: pingora exits the process when it is done.
pub fn run(config: GomsConfig, node_id: Option<String>) -> Result<Infallible, GatewayError> {
    let call_service_key = config.require_call_service_key()?.clone();
    let gateway = &config.gateway;
    let defaults = RouteDefaults {
        timeout: gateway.upstream_timeout,
        retries: gateway.retries,
    };
    let routes = Arc::new(RouteStore::load(
        route_source(&gateway.routes, config.services.as_ref()),
        defaults,
    )?);
    let listen = format!("{}:{}", gateway.listen_host, gateway.http_port);
    // pingora panics on a busy port; check first so the user gets a sentence instead.
    drop(
        std::net::TcpListener::bind(&listen).map_err(|source| GatewayError::Listen {
            addr: listen.clone(),
            source,
        })?,
    );

    let upstreams = Arc::new(Upstreams::default());
    let (members_tx, members_rx) = watch::channel(Arc::new(Members::default()));
    let metrics = Arc::new(GatewayMetrics::default());
    let advertised = format!("{}:{}", gateway.advertise_host, gateway.http_port);
    let node = NodeInfo {
        id: node_id.unwrap_or_else(|| advertised.clone()),
        service: GATEWAY_SERVICE.to_string(),
        http: advertised,
        version: env!("CARGO_PKG_VERSION").to_string(),
        weight: 1,
        zone: config.service.zone.clone(),
        started_at: node::now_rfc3339(),
    };

    let (trace, publisher) = if config.trace.enabled {
        let settings =
            crate::trace::publisher_settings(&config).for_node(&format!("gateway-{}", node.id));
        let (sink, publisher) = Publisher::prepare(settings)?;
        (sink, Some(publisher))
    } else {
        (TraceSink::disabled(), None)
    };
    let tracer = GatewayTracer {
        node_id: node.id.clone(),
        project_name: config.trace.project_name.clone(),
        redactor: Redactor::new(&config.trace.redact_headers, config.trace.body_max_bytes),
    };

    let mut server = Server::new_with_opt_and_conf(
        None,
        ServerConf {
            threads: gateway.threads,
            upstream_keepalive_pool_size: gateway.upstream_keepalive,
            work_stealing: gateway.work_stealing,
            grace_period_seconds: Some(gateway.drain_timeout.as_secs().max(1)),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        },
    );
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        GatewayProxy {
            routes: routes.clone(),
            upstreams: upstreams.clone(),
            members: members_rx,
            call_service_key: key_header(&call_service_key)?,
            connect_timeout: gateway.connect_timeout,
            metrics,
            trace,
            tracer,
        },
    );
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.add_service(background_service(
        "registry link",
        RegistryLink {
            etcd: EtcdEndpoints::new(config.etcd_addr.clone(), config.registry.etcd_timeout),
            node,
            lease_ttl: config.lease_ttl(),
            health_interval: gateway.health_check_interval,
            upstreams,
            routes,
            members_tx,
        },
    ));
    if let Some(publisher) = publisher {
        server.add_service(background_service(
            "trace publisher",
            PublisherService(std::sync::Mutex::new(Some(publisher))),
        ));
    }
    info!("[gateway] Http Listen on port: {}", gateway.http_port);
    server.run_forever()
}

fn key_header(key: &crate::config::Secret) -> Result<http::HeaderValue, GatewayError> {
    let mut value = http::HeaderValue::from_str(key.expose()).map_err(|_| {
        ConfigError::Missing(
            "callServiceKey must be printable ASCII: it travels as an HTTP header".into(),
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Connects the gateway to etcd: registers it, follows membership into the balancers,
/// runs health checks and the route file watch. On shutdown it leaves the registry first.
struct RegistryLink {
    etcd: EtcdEndpoints,
    node: NodeInfo,
    lease_ttl: Duration,
    health_interval: Duration,
    upstreams: Arc<Upstreams>,
    routes: Arc<RouteStore>,
    members_tx: watch::Sender<Arc<Members>>,
}

#[async_trait]
impl BackgroundService for RegistryLink {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (stop, stopped) = watch::channel(false);
        let mut members = watch_members(self.etcd.clone(), stopped.clone());
        let (registration, first) =
            Registration::start(self.etcd.clone(), self.node.clone(), self.lease_ttl).await;
        if let Err(error) = first {
            warn!(message = "Gateway not registered yet; retrying in the background.", %error);
        }
        tokio::spawn(self.routes.clone().watch(stopped.clone()));
        tokio::spawn(check_health(
            self.upstreams.clone(),
            self.health_interval,
            stopped,
        ));
        loop {
            tokio::select! {
                changed = members.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = members.borrow_and_update().clone();
                    self.upstreams.sync(&snapshot).await;
                    self.members_tx.send_replace(snapshot);
                }
                _ = shutdown.changed() => break,
            }
        }
        info!("Shutting down: leaving the registry, then draining in-flight requests.");
        if let Err(error) = registration.deregister().await {
            warn!(message = "Could not revoke the gateway's lease; it expires by TTL.", %error);
        }
        let _ = stop.send(true);
    }
}

/// Runs the trace publisher in pingora's runtime; on shutdown it drains the queue into
/// the broker or the spool.
struct PublisherService(std::sync::Mutex<Option<Publisher>>);

#[async_trait]
impl BackgroundService for PublisherService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let publisher = self.0.lock().expect("publisher slot").take();
        if let Some(publisher) = publisher {
            publisher.run(shutdown).await;
        }
    }
}

async fn check_health(
    upstreams: Arc<Upstreams>,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => upstreams.check_health().await,
            _ = stopped.changed() => return,
        }
    }
}
