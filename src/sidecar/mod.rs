//! `goms sidecar`: makes an HTTP app in any language a goms node, without changing it.
//!
//! The sidecar runs beside the app (same container, pod or host) and does a node's duties
//! for it: it registers in etcd while the app answers its health check, checks and strips
//! `Call-Service-Key`, forwards every request to the app over keep-alive connections, emits
//! `service.start` and `service.end`, and on SIGTERM leaves the registry before it drains.
//! A sidecar is a service node that forwards: it takes its settings, node entry, key check
//! and trace events from [`service`](crate::service), and never imports the gateway; they
//! meet over HTTP.
//!
//! # Layout
//! - [`proxy`]: the request path, a pingora proxy with the app as its one upstream.
//! - [`node`]: registration that follows the app's health, and leaving on shutdown.
//! - [`health`]: the app's health check.
//! - [`admin`]: `/healthz`, `/readyz` and `/metrics` on a listener of their own.

pub mod admin;
pub mod health;
pub mod node;
pub mod proxy;

use std::future::Future;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::io::IntoRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::ConnectionLimit;
use tokio::sync::watch;
use tracing::info;

use crate::config::{ConfigError, GomsConfig};
use crate::gateway::limits;
use crate::registry::drain::{self, Stop};
use crate::registry::Drain;
use crate::service::{ServiceError, ServiceOptions, DEREGISTER_GRACE};
use health::HealthCheck;
use node::{NodeLink, NodeState};
use proxy::{ProxyCounters, SidecarProxy};

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Node(#[from] ServiceError),
    #[error("app address `{addr}`: {reason}")]
    App { addr: String, reason: String },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Everything a sidecar needs: the node it stands for, and the app it stands in front of.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    /// The node: name, port, advertised host, labels, lease, key, drain timeout, tracing.
    pub node: ServiceOptions,
    /// The app, `host:port`.
    pub app: String,
    /// The app's health path (GET, 2xx); `None` checks with a TCP connect.
    pub health: Option<String>,
    pub health_interval: Duration,
    pub health_failures: u32,
    pub admin_addr: String,
    pub app_connect_timeout: Duration,
    pub app_timeout: Duration,
    /// What a gateway may send: the header and idle timeouts and the connection cap of
    /// `gateway.limits`, as on the gateway's own public port.
    pub limits: crate::config::LimitsConfig,
}

impl SidecarOptions {
    pub fn from_config(config: &GomsConfig) -> Result<Self, ConfigError> {
        let sidecar = &config.sidecar;
        Ok(SidecarOptions {
            node: ServiceOptions::from_config(config)?,
            app: sidecar.app.clone(),
            health: sidecar.health.clone(),
            health_interval: sidecar.health_interval,
            health_failures: sidecar.health_failures,
            admin_addr: sidecar.admin_addr.clone(),
            app_connect_timeout: sidecar.app_connect_timeout,
            app_timeout: sidecar.app_timeout,
            limits: config.gateway.limits.clone(),
        })
    }

    /// Binds the sidecar's port (all interfaces; 0 lets the system choose, and the port it
    /// got is what registers) and its admin address.
    pub fn bind(&self) -> Result<(TcpListener, TcpListener), SidecarError> {
        let bind = |addr: String| {
            TcpListener::bind(&addr).map_err(|source| SidecarError::Listen { addr, source })
        };
        let public = bind(format!("0.0.0.0:{}", self.node.http_port))?;
        let admin = bind(self.admin_addr.clone())?;
        Ok((public, admin))
    }

    fn app_addr(&self) -> Result<SocketAddr, SidecarError> {
        let error = |reason: String| SidecarError::App {
            addr: self.app.clone(),
            reason,
        };
        self.app
            .to_socket_addrs()
            .map_err(|e| error(e.to_string()))?
            .next()
            .ok_or_else(|| error("resolves to no address".into()))
    }
}

/// Serves on `listener` (and the admin endpoints on `admin`) until `shutdown` resolves.
/// Draining, it leaves the registry first, gives gateways a moment to see it leave, then
/// stops accepting and returns as soon as nothing is in flight (at most the drain timeout).
///
/// pingora runs its own runtimes and blocks the calling thread, so this must not be called
/// from inside a tokio runtime.
pub fn run(
    options: SidecarOptions,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = Stop> + Send + 'static,
) -> Result<(), SidecarError> {
    let app = options.app_addr()?;
    let bound = local_addr(&listener)?;
    let admin_bound = local_addr(&admin)?;
    let node = options.node.node_info(bound.port(), None);
    let (tracer, publisher) = options.node.tracer(&node)?;
    let spool_dir = publisher.as_ref().map(crate::trace::Publisher::spool_dir);
    let node_id =
        http::HeaderValue::from_str(&node.id).map_err(|_| ServiceError::NodeId(node.id.clone()))?;
    let drain = Drain::new();
    let state = Arc::new(NodeState::default());
    let connections = Arc::new(ConnectionLimit::new(options.limits.max_connections));
    let counters = Arc::new(ProxyCounters::new(connections.clone()));
    let (leave_tx, leave) = watch::channel(false);
    let (left, mut left_rx) = watch::channel(false);

    let mut server = Server::new_with_opt_and_conf(
        None,
        ServerConf {
            threads: 1,
            grace_period_seconds: Some(options.node.drain_timeout.as_secs().max(1)),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        },
    );
    server.bootstrap();
    let listen = bound.to_string();
    server.add_listener_fd(listen.clone(), listener.into_raw_fd());

    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        SidecarProxy {
            app,
            keys: options.node.call_service_keys.clone(),
            node_id,
            tracer: tracer.clone(),
            app_connect_timeout: options.app_connect_timeout,
            app_timeout: options.app_timeout,
            drain: drain.clone(),
            counters: counters.clone(),
        },
    );
    let timeouts = counters.clone();
    proxy.app_logic_mut().expect("a new service").server_options =
        Some(limits::server_options(&options.limits, move || {
            timeouts.header_timeouts.fetch_add(1, Ordering::Relaxed);
        }));
    limits::raise_open_files_limit(options.limits.max_connections);
    proxy.set_connection_limit(connections.clone());
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    let service = node.service.clone();
    server.add_service(background_service(
        "node",
        NodeLink {
            etcd: options.node.etcd.clone(),
            node,
            lease_ttl: options.node.lease_ttl,
            check: HealthCheck {
                app,
                path: options.health.clone(),
                timeout: options.health_interval.min(Duration::from_secs(2)),
            },
            interval: options.health_interval,
            failures_allowed: options.health_failures,
            state: state.clone(),
            leave,
            left,
            leaving: Mutex::new(Some(drain.duty())),
        },
    ));
    server.add_service(background_service(
        "admin",
        admin::AdminService {
            listener: Mutex::new(Some(admin)),
            node: state,
            counters,
            trace: tracer.sink.clone(),
        },
    ));
    if let Some(publisher) = publisher {
        server.add_service(background_service(
            "trace publisher",
            drain.duty_service(|shutdown| publisher.run(shutdown)),
        ));
    }
    // Leave the registry before pingora stops accepting, as `goms service` does: requests
    // gateways already routed here still find an open socket.
    let leave_first = async move {
        let stop = shutdown.await;
        if stop == Stop::Drain {
            let _ = leave_tx.send(true);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), left_rx.wait_for(|left| *left)).await;
            tokio::time::sleep(DEREGISTER_GRACE).await;
        }
        stop
    };
    info!(
        "[{service}] sidecar on port {} in front of app {app} (admin {admin_bound})",
        bound.port()
    );
    server.run(drain::run_args(leave_first, drain));
    // Every runtime has stopped: nothing emits any more.
    if let Some(dir) = spool_dir {
        crate::trace::remove_spool_if_empty(&dir);
    }
    info!("[{service}] sidecar stopped");
    Ok(())
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, SidecarError> {
    listener
        .local_addr()
        .and_then(|addr| listener.set_nonblocking(true).map(|()| addr))
        .map_err(|source| SidecarError::Listen {
            addr: "bound socket".into(),
            source,
        })
}
