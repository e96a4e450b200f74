//! The service SDK: serve an axum router as a goms service.
//!
//! [`serve`] binds the port, wraps the router with the `Call-Service-Key` check and the
//! `X-Served-By` header, registers the node in etcd, follows membership (logging every
//! node's join and leave), and on shutdown leaves the registry before it drains in-flight
//! requests. [`serve_with_rpc`] adds the node's gRPC port ([`rpc`]). [`echo`] is the stock
//! service built on it, and the reference use of the SDK.

pub mod auth;
pub mod echo;
pub mod rpc;
pub mod tracing_layer;

use std::future::Future;
use std::time::Duration;

use axum::http::HeaderValue;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{ConfigError, GomsConfig};
use crate::registry::{node, watch_members, EtcdEndpoints, NodeInfo, Registration};
use crate::trace::{Publisher, PublisherSettings, Redactor, RunningPublisher, TraceSink};
use std::sync::Arc;

/// After the lease is revoked, gateways need a moment to see the `leave`; the node keeps
/// serving meanwhile so requests already routed to it do not hit a closed socket.
pub const DEREGISTER_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on port {port}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("node id `{0}` cannot be sent as a header value")]
    NodeId(String),
    #[error(transparent)]
    Spool(#[from] crate::trace::SpoolError),
    #[error("serving HTTP failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("cannot listen for gRPC on port {port}")]
    ListenRpc {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("serving gRPC failed: {0}")]
    ServeRpc(#[source] tonic::transport::Error),
}

/// Everything a service needs to join the cluster.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub name: String,
    /// 0 picks a free port; the bound port is what gets registered.
    pub http_port: u16,
    /// The gRPC port, served when [`serve_with_rpc`] is given services; 0 picks a free one.
    pub rpc_port: Option<u16>,
    pub advertise_host: String,
    /// Defaults to `advertise_host:port`.
    pub node_id: Option<String>,
    pub version: String,
    pub weight: u32,
    pub zone: String,
    pub lease_ttl: Duration,
    pub etcd: EtcdEndpoints,
    /// `callServiceKey` and `previousCallServiceKeys`.
    pub call_service_keys: auth::AcceptedKeys,
    pub drain_timeout: Duration,
    /// Where trace events go; `None` switches them off.
    pub trace: Option<TraceOptions>,
}

/// Trace settings of a service node.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// Where events go; the node's own spool subfolder is added at start.
    pub publisher: PublisherSettings,
    pub project_name: String,
    pub redact_headers: Vec<String>,
    pub body_max_bytes: usize,
}

impl ServiceOptions {
    pub fn from_config(config: &GomsConfig) -> Result<Self, ConfigError> {
        let service = &config.service;
        Ok(ServiceOptions {
            name: service.name.clone(),
            http_port: service.http_port,
            rpc_port: service.rpc_port,
            advertise_host: service.advertise_host.clone(),
            node_id: None,
            version: service.version.clone(),
            weight: service.weight,
            zone: service.zone.clone(),
            lease_ttl: config.lease_ttl(),
            etcd: EtcdEndpoints::new(config.etcd_addr.clone(), config.registry.etcd_timeout),
            call_service_keys: auth::AcceptedKeys::new(
                config.require_call_service_key()?.clone(),
                &config.previous_call_service_keys,
            ),
            drain_timeout: service.drain_timeout,
            trace: config.trace.enabled.then(|| TraceOptions {
                publisher: crate::trace::publisher_settings(config),
                project_name: config.trace.project_name.clone(),
                redact_headers: config.trace.redact_headers.clone(),
                body_max_bytes: config.trace.body_max_bytes,
            }),
        })
    }

    /// This node's registry entry, serving HTTP on `port` and gRPC on `rpc_port` (the bound
    /// ports, where 0 was asked).
    pub fn node_info(&self, port: u16, rpc_port: Option<u16>) -> NodeInfo {
        let http = format!("{}:{port}", self.advertise_host);
        NodeInfo {
            id: self.node_id.clone().unwrap_or_else(|| http.clone()),
            service: self.name.clone(),
            http,
            rpc: rpc_port.map(|port| format!("{}:{port}", self.advertise_host)),
            version: self.version.clone(),
            weight: self.weight,
            zone: self.zone.clone(),
            started_at: node::now_rfc3339(),
        }
    }

    /// The node's tracer and its publisher, prepared to run on whichever runtime the caller
    /// owns; with tracing off, a tracer that emits nothing and no publisher.
    pub fn tracer(
        &self,
        node: &NodeInfo,
    ) -> Result<(tracing_layer::ServiceTracer, Option<Publisher>), ServiceError> {
        let Some(trace) = &self.trace else {
            let tracer = tracing_layer::ServiceTracer {
                sink: TraceSink::disabled(),
                redactor: Arc::new(Redactor::new(&[], 0)),
                service: self.name.clone(),
                node_id: node.id.clone(),
                project_name: String::new(),
            };
            return Ok((tracer, None));
        };
        let settings = trace
            .publisher
            .clone()
            .for_node(&format!("{}-{}", node.service, node.id));
        let (sink, publisher) = Publisher::prepare(settings)?;
        let tracer = tracing_layer::ServiceTracer {
            sink,
            redactor: Arc::new(Redactor::new(&trace.redact_headers, trace.body_max_bytes)),
            service: self.name.clone(),
            node_id: node.id.clone(),
            project_name: trace.project_name.clone(),
        };
        Ok((tracer, Some(publisher)))
    }
}

/// Serves `router` as a goms service until `shutdown` completes, then deregisters and drains.
///
/// The router holds only the service's own work; the key check, `X-Served-By`, registration
/// and the trace events are added here. `examples/sdk_service.rs` is a whole service.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use axum::{routing::get, Router};
///
/// let config = goms::config::GomsConfig::load(std::path::Path::new("config/goms.yml"))?;
/// let mut options = goms::service::ServiceOptions::from_config(&config)?;
/// options.name = "hello".into();
/// let router = Router::new().route("/greet", get(|| async { "hello" }));
/// goms::service::serve(options, router, async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await?;
/// # Ok(())
/// # }
/// ```
pub async fn serve(
    options: ServiceOptions,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    serve_with_rpc(options, router, tonic::service::Routes::default(), shutdown).await
}

/// [`serve`], plus the gRPC services `rpc` on `options.rpc_port` (h2c), behind the same key
/// check, registered as the node's `rpc` address and drained with its HTTP side. Without an
/// RPC port, `rpc` is not served.
pub async fn serve_with_rpc(
    options: ServiceOptions,
    router: Router,
    rpc: tonic::service::Routes,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let listener = TcpListener::bind(("0.0.0.0", options.http_port))
        .await
        .map_err(|source| ServiceError::Listen {
            port: options.http_port,
            source,
        })?;
    let port = listener.local_addr().map_err(ServiceError::Serve)?.port();
    let rpc_listener = match options.rpc_port {
        Some(rpc_port) => Some(TcpListener::bind(("0.0.0.0", rpc_port)).await.map_err(
            |source| ServiceError::ListenRpc {
                port: rpc_port,
                source,
            },
        )?),
        None => None,
    };
    let rpc_port = match &rpc_listener {
        Some(listener) => Some(listener.local_addr().map_err(ServiceError::Serve)?.port()),
        None => None,
    };
    let node = options.node_info(port, rpc_port);
    let guard = auth::Guard {
        keys: options.call_service_keys.clone(),
        node_id: HeaderValue::from_str(&node.id)
            .map_err(|_| ServiceError::NodeId(node.id.clone()))?,
    };
    let rpc_guard = rpc::KeyCheck {
        keys: options.call_service_keys.clone(),
        node_id: node.id.clone(),
    };
    let (tracer, publisher) = options.tracer(&node)?;
    let publisher = publisher.map(RunningPublisher::spawn);
    // Outermost first: the key check runs before tracing, so refused calls leave no events.
    let app = router
        .layer(axum::middleware::from_fn_with_state(
            tracer,
            tracing_layer::trace_request,
        ))
        .layer(axum::middleware::from_fn_with_state(
            guard,
            auth::require_key,
        ));
    info!("[{}] Http Listen on port: {port}", options.name);
    if let Some(rpc_port) = rpc_port {
        info!("[{}] gRPC Listen on port: {rpc_port}", options.name);
    }

    let (stop, stopped) = watch::channel(false);
    let _members = watch_members(options.etcd.clone(), Default::default(), stopped);
    let (registration, first) =
        Registration::start(options.etcd.clone(), node, options.lease_ttl).await;
    if let Err(error) = first {
        warn!(message = "Not registered yet; retrying in the background.", %error);
    }

    let (draining_tx, mut draining) = watch::channel(false);
    let leave_then_drain = async move {
        shutdown.await;
        info!("Shutting down: leaving the registry, then draining in-flight requests.");
        if let Err(error) = registration.deregister().await {
            warn!(message = "Could not revoke the lease; it expires by TTL.", %error);
        }
        tokio::time::sleep(DEREGISTER_GRACE).await;
        let _ = draining_tx.send(true);
    };
    let rpc_server = rpc_listener.map(|listener| {
        let mut draining = draining.clone();
        let drained = async move {
            let _ = draining.wait_for(|draining| *draining).await;
        };
        tokio::spawn(rpc::serve(listener, rpc, rpc_guard, drained))
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(leave_then_drain);
    let drain_timeout = options.drain_timeout;
    let deadline = async move {
        let _ = draining.wait_for(|draining| *draining).await;
        tokio::time::sleep(drain_timeout).await;
    };
    let result = tokio::select! {
        result = server => result.map_err(ServiceError::Serve),
        _ = deadline => {
            warn!(message = "Drain timeout reached; closing remaining connections.", timeout = ?drain_timeout);
            Ok(())
        }
    };
    let _ = stop.send(true);
    if let Some(rpc_server) = rpc_server {
        // It drains from the same moment as the HTTP side; calls still open past the drain
        // timeout are cut off with the process.
        match tokio::time::timeout(drain_timeout, rpc_server).await {
            Ok(Ok(Err(error))) => warn!(message = "The gRPC server stopped with an error.", %error),
            Err(_) => warn!(message = "Drain timeout reached on the gRPC port; closing its calls."),
            Ok(_) => {}
        }
    }
    if let Some(publisher) = publisher {
        publisher.shutdown(Duration::from_secs(5)).await;
    }
    info!("[{}] stopped", options.name);
    result
}

/// Completes on SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
