//! The API gateway: a pingora proxy that routes `/api/{service}/{route}` to replicas found
//! in etcd.
//!
//! # Layout
//! The top level is the request path, in the order a request meets it; [`proxy`] holds the
//! pingora filters that call each phase.
//! - [`tls`]: the HTTPS listener's certificates, chosen by SNI and reloaded from disk.
//! - [`limits`]: what a client may send (header size and count, target, body, framing).
//! - [`forwarded`]: who the client is, and the `X-Forwarded-*` headers a replica gets.
//! - [`route_store`]: the route table in force and its live reload; the route match.
//! - [`registry_view`]: whether the registry was listed yet and is current (holds, 503s).
//! - [`upstreams`]: per-service round-robin balancers fed by the etcd watcher; the pick.
//! - [`record`]: what the gateway learns about a request while it passes.
//! - [`respond`]: answers the gateway writes itself (the Go original's JSON envelope).
//! - The end of a request: [`trace_events`] (its `request.start` / `request.end` events,
//!   written by a JSON writer of their own), [`metrics`] (the counters) and [`request_log`]
//!   (what the dashboard shows).
//! - [`admin`]: the admin surface (`/cluster`, `/metrics`, `/healthz`, `/readyz`, `/ui`). It
//!   reads what the request path records; the request path never reaches into it.
//!
//! Threads: pingora gives the proxy and the registry link each their own tokio runtime;
//! they share only lock-free snapshots ([`arc_swap`]) and atomics.

pub mod admin;
pub mod forwarded;
pub mod grpc;
pub mod limits;
pub mod metrics;
pub mod overload;
pub mod proxy;
pub mod rate_limit;
pub mod record;
pub mod registry_view;
pub mod request_log;
pub mod respond;
pub mod route_store;
pub mod tls;
pub mod trace_events;
pub mod upstreams;

use std::future::Future;
use std::net::TcpListener;
use std::os::unix::io::IntoRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{ConfigError, GomsConfig, RouteDefaults};
use crate::registry::drain::{self, Duty, Stop};
use crate::registry::{
    node, watch_members, Drain, EtcdEndpoints, Members, NodeInfo, Registration, RegistryStatus,
};
use crate::trace::{Publisher, Redactor, TraceSink};
use admin::{AdminApp, AdminEndpoints};
use metrics::GatewayMetrics;
use overload::MemoryGuard;
use pingora::services::listening::ConnectionLimit;
use proxy::GatewayProxy;
use registry_view::RegistryView;
use request_log::RequestLog;
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
    /// The cause is the source only, so that `{:#}` names it once.
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(
        "cannot listen on {addr} for the admin listener (another gateway on this host? give \
         each its own with --admin-addr or gateway.adminAddr)"
    )]
    AdminListen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The gateway's two sockets, bound by the caller.
pub struct Listeners {
    /// The public port, for clients.
    pub public: TcpListener,
    /// The admin listener, for operators.
    pub admin: TcpListener,
    /// HTTPS, when `gateway.tls` is set.
    pub tls: Option<TcpListener>,
}

/// Binds the gateway's public port (`gateway.listenHost`:`gateway.httpPort`) and its admin
/// listener (`gateway.adminAddr`). Port 0 lets the system choose; [`run`] serves, logs and
/// registers the ports it got.
pub fn bind(config: &GomsConfig) -> Result<Listeners, GatewayError> {
    let gateway = &config.gateway;
    let public = format!("{}:{}", gateway.listen_host, gateway.http_port);
    let public = TcpListener::bind(&public).map_err(|source| GatewayError::Listen {
        addr: public,
        source,
    })?;
    let admin = gateway.admin_addr();
    let admin = TcpListener::bind(&admin).map_err(|source| GatewayError::AdminListen {
        addr: admin,
        source,
    })?;
    let tls = match &gateway.tls {
        Some(tls) => {
            Some(
                TcpListener::bind(&tls.listen).map_err(|source| GatewayError::Listen {
                    addr: tls.listen.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    Ok(Listeners { public, admin, tls })
}

/// What the request path needs to know of HTTPS: where it is, and whether plain requests are
/// sent there.
fn https_front(
    tls: Option<&crate::config::TlsConfig>,
    bound: Option<std::net::SocketAddr>,
) -> Option<proxy::HttpsFront> {
    let (tls, bound) = (tls?, bound?);
    Some(proxy::HttpsFront {
        port: bound.port(),
        redirect: tls.redirect,
        hsts: tls
            .hsts
            .as_deref()
            .and_then(|value| http::HeaderValue::from_str(value).ok()),
    })
}

/// The address a bound listener serves, set non-blocking for pingora.
fn serving_addr(listener: &TcpListener) -> Result<std::net::SocketAddr, GatewayError> {
    listener
        .local_addr()
        .and_then(|addr| listener.set_nonblocking(true).map(|()| addr))
        .map_err(|source| GatewayError::Listen {
            addr: "bound socket".into(),
            source,
        })
}

/// Serves on `listeners` until `shutdown` resolves, then stops as it says and returns.
///
/// pingora runs its own runtimes and blocks the calling thread, so this must not be called
/// from inside a tokio runtime.
pub fn run(
    config: GomsConfig,
    node_id: Option<String>,
    listeners: Listeners,
    shutdown: impl Future<Output = Stop> + Send + 'static,
) -> Result<(), GatewayError> {
    let call_service_key = config.require_call_service_key()?.clone();
    let gateway = &config.gateway;
    let defaults = RouteDefaults {
        max_body_bytes: gateway.limits.body_bytes,
        timeout: gateway.upstream_timeout,
        retries: gateway.retries,
    };
    let routes = Arc::new(RouteStore::load(
        route_source(&gateway.routes, config.services.as_ref()),
        defaults,
    )?);
    let bound = serving_addr(&listeners.public)?;
    let admin_bound = serving_addr(&listeners.admin)?;
    let tls_bound = listeners.tls.as_ref().map(serving_addr).transpose()?;
    let certificates = match &gateway.tls {
        Some(tls) => Some(tls::CertStore::load(&tls.certificates)?),
        None => None,
    };
    let port = bound.port();
    // pingora matches a listener to its service by this text.
    let (listen, admin_listen) = (bound.to_string(), admin_bound.to_string());

    let upstreams = Arc::new(Upstreams::new(gateway.health_check_interval));
    let registry_loaded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let registry_status = Arc::new(RegistryStatus::default());
    let (members_tx, members_rx) = watch::channel(Arc::new(Members::default()));
    limits::raise_open_files_limit(gateway.limits.max_connections);
    let connections = Arc::new(ConnectionLimit::new(gateway.limits.max_connections));
    let metrics = Arc::new(GatewayMetrics::new(connections.clone()));
    let advertised = format!("{}:{port}", gateway.advertise_host);
    let node = NodeInfo {
        id: node_id.unwrap_or_else(|| advertised.clone()),
        service: GATEWAY_SERVICE.to_string(),
        http: advertised,
        rpc: None,
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
    let spool_dir = publisher.as_ref().map(Publisher::spool_dir);
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
    server.add_listener_fd(listen.clone(), listeners.public.into_raw_fd());
    server.add_listener_fd(admin_listen.clone(), listeners.admin.into_raw_fd());
    if let (Some(bound), Some(listener)) = (tls_bound, listeners.tls) {
        server.add_listener_fd(bound.to_string(), listener.into_raw_fd());
    }
    let request_log = gateway.dashboard.then(|| Arc::new(RequestLog::default()));
    let memory_guard = MemoryGuard::new(gateway.memory_limit);
    let registry = Arc::new(RegistryView {
        members: members_rx,
        loaded: registry_loaded.clone(),
        status: registry_status.clone(),
        etcd: config.etcd_addr.join(","),
    });
    let admin = Arc::new(AdminEndpoints {
        registry: registry.clone(),
        upstreams: upstreams.clone(),
        routes: routes.clone(),
        metrics: metrics.clone(),
        trace: trace.clone(),
        allow: gateway.admin_allow.clone(),
        certificates: certificates.clone(),
        memory_guard: memory_guard.clone(),
        dashboard: request_log.clone().map(|log| {
            Arc::new(admin::dashboard::Dashboard::new(
                log,
                &config.es_addr,
                &config.trace_consumer.index_prefix,
                gateway.kibana_url.clone(),
            ))
        }),
    });

    let drain = Drain::new();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        GatewayProxy {
            routes: routes.clone(),
            upstreams: upstreams.clone(),
            admin: admin.clone(),
            registry,
            request_log,
            call_service_key: key_header(&call_service_key)?,
            connect_timeout: gateway.connect_timeout,
            limits: gateway.limits.clone(),
            trusted_proxies: gateway.trusted_proxies.clone(),
            https: https_front(gateway.tls.as_ref(), tls_bound),
            metrics: metrics.clone(),
            trace: trace.clone(),
            tracer,
            drain: drain.clone(),
            memory_guard: memory_guard.clone(),
        },
    );
    let refusals = metrics.clone();
    let app = proxy.app_logic_mut().expect("a new service");
    let mut options = limits::server_options(&gateway.limits, move || {
        refusals.refused.count(limits::Refusal::HeaderTimeout)
    });
    options.h2c = gateway.http2_cleartext;
    app.server_options = Some(options);
    // Whichever way HTTP/2 comes (ALPN on the TLS listener, h2c on the plain port).
    app.h2_options = Some(limits::h2_options(&gateway.limits));
    proxy.set_connection_limit(connections);
    proxy.add_tcp(&listen);
    if let (Some(bound), Some(store), Some(tls)) = (tls_bound, &certificates, &gateway.tls) {
        let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "")
            .expect("TLS settings without files");
        settings.set_cert_resolver(store.clone());
        // The header timeout bounds the handshake too: a client that connects and then stalls
        // holds a connection no longer over TLS than without (vendor patch 11).
        settings.set_handshake_timeout(gateway.limits.header_timeout);
        if tls.http2 {
            settings.enable_h2();
        }
        proxy.add_tls_with_settings(&bound.to_string(), None, settings);
        server.add_service(background_service(
            "certificate reload",
            tls::CertReloader {
                store: store.clone(),
                interval: tls.reload_interval,
            },
        ));
        info!("[gateway] TLS listen on {bound}");
    }
    server.add_service(proxy);
    let mut admin_service = Service::new("admin".to_string(), AdminApp(admin));
    admin_service.add_tcp(&admin_listen);
    server.add_service(admin_service);
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
            leaving: Mutex::new(Some(drain.duty())),
            registry_loaded,
            registry_status,
        },
    ));
    if let Some(guard) = memory_guard {
        server.add_service(background_service(
            "memory guard",
            MemoryWatch {
                guard,
                trace: trace.clone(),
            },
        ));
    }
    if let Some(publisher) = publisher {
        server.add_service(background_service(
            "trace publisher",
            drain.duty_service(|shutdown| publisher.run(shutdown)),
        ));
    }
    info!("[gateway] Http Listen on port: {port}");
    info!("[gateway] admin (/cluster, /metrics) on {admin_listen}");
    server.run(drain::run_args(shutdown, drain));
    // Every runtime has stopped: nothing emits any more.
    if let Some(dir) = spool_dir {
        crate::trace::remove_spool_if_empty(&dir);
    }
    info!("Gateway stopped.");
    Ok(())
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

/// How long a client connection may idle between requests and take to send a header; a
/// header timeout is counted in `metrics`.
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
    /// Done once the gateway has left the registry.
    leaving: Mutex<Option<Duty>>,
    /// Set at the first membership listing.
    registry_loaded: Arc<std::sync::atomic::AtomicBool>,
    registry_status: Arc<RegistryStatus>,
}

#[async_trait]
impl BackgroundService for RegistryLink {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (stop, stopped) = watch::channel(false);
        let mut members = watch_members(
            self.etcd.clone(),
            self.registry_status.clone(),
            stopped.clone(),
        );
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
                    // Set before the send: requests held for the first listing wake on it.
                    self.registry_loaded.store(true, std::sync::atomic::Ordering::Release);
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
        drop(self.leaving.lock().expect("duty slot").take());
    }
}

/// Runs the memory guard; while the gateway is over its limit, each reading spills the trace
/// queue to the spool and has the allocator return its free pages.
struct MemoryWatch {
    guard: Arc<MemoryGuard>,
    trace: TraceSink,
}

#[async_trait]
impl BackgroundService for MemoryWatch {
    async fn start(&self, shutdown: ShutdownWatch) {
        let relieve = || {
            self.trace.spill();
            crate::allocator::return_free_memory();
        };
        self.guard.clone().watch(relieve, shutdown).await;
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
