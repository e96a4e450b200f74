//! Process configuration (`config/goms.yml`) and the route file (`config/services.yml`).
//!
//! This module owns what users edit: it reads the files, applies `GOMS__*` environment
//! overrides, validates everything, and reports refusals as `file:line: reason`. It depends
//! on no other goms module.
//!
//! Loading is two passes. The file alone is deserialised first, so errors carry YAML
//! positions; then the `config` crate layers environment overrides on top, where
//! `GOMS__CALL_SERVICE_KEY` sets `callServiceKey` and `GOMS__GATEWAY__HTTP_PORT` sets
//! `gateway.httpPort` (snake case in the environment, camel case in the file).

mod allow;
mod error;
pub mod policy;
pub mod routes;
mod time;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use allow::{AllowList, Cidr};
pub use error::ConfigError;
pub use policy::{
    Balance, EjectionPolicy, HashOn, RateLimitKey, RateLimitPolicy, RetryBudgetPolicy,
    ServicePolicy,
};
pub use routes::{
    load_routes_file, parse_duration, parse_routes, Route, RouteDefaults, RouteTable,
    ServiceRoutes, ServiceSpec, Transform,
};
pub use time::{now_rfc3339, parse_rfc3339, rfc3339, rfc3339_from_unix};

/// Prefix of environment overrides; sections are separated by `__`.
pub const ENV_PREFIX: &str = "GOMS";

/// Where `--config` points when it is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/goms.yml";
/// Where `--routes` points when it is not given.
pub const DEFAULT_ROUTES_PATH: &str = "config/services.yml";

/// Everything a goms process reads from `goms.yml`. The Go original's own top-level keys are kept,
/// so a goms `config.yml` loads unchanged; the sections below them are new.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GomsConfig {
    /// Shared key the gateway injects as `Call-Service-Key` and services verify.
    /// No default: gateways and services refuse to start without one.
    #[serde(default)]
    pub call_service_key: Option<Secret>,
    /// Keys that services and sidecars still accept while a new `callServiceKey` rolls out;
    /// the gateway never sends them. Default none.
    #[serde(default)]
    pub previous_call_service_keys: Vec<Secret>,
    /// etcd endpoints, `host:port`; the Go original's `a|b` form is accepted too. Default
    /// `127.0.0.1:2379`.
    #[serde(default = "default_etcd_addr", deserialize_with = "etcd_endpoints")]
    pub etcd_addr: Vec<String>,
    /// Elasticsearch URL for the trace consumer. Default `http://127.0.0.1:9200`.
    #[serde(default = "default_es_addr")]
    pub es_addr: String,
    /// AMQP URL for trace events, or several separated by `,` (the nodes of a RabbitMQ
    /// cluster): publishers and consumers link to one and fail over to the next. Default
    /// `amqp://guest:guest@127.0.0.1:5672`. The Go original's README spells it `amqpaddr`;
    /// both are accepted.
    #[serde(default = "default_amqp_addr", alias = "amqpaddr")]
    pub amqp_addr: String,
    /// goms kept routes in `config.yml`; they are used when the route file is absent.
    #[serde(default)]
    pub services: Option<ServiceRoutes>,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub service: ServiceConfig,
    /// `goms sidecar`; the node's name, port and labels come from `service`.
    #[serde(default)]
    pub sidecar: SidecarConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub trace: TraceConfig,
    #[serde(default)]
    pub trace_consumer: TraceConsumerConfig,
}

/// Trace events published by gateways and services.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TraceConfig {
    /// Publish trace events to `amqpAddr`. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The Go original's `projectName` field. Default `goms`.
    #[serde(default = "default_project_name")]
    pub project_name: String,
    /// Durable queue events go to. Default `goms.trace` (dead letters: `<queue>.dead`).
    #[serde(default = "default_trace_queue")]
    pub queue: String,
    /// `classic` or `quorum` (replicated, for a RabbitMQ cluster); applies to the queue and
    /// its dead-letter queue. A queue's type cannot change once declared. Default `classic`.
    #[serde(default)]
    pub queue_type: QueueType,
    /// Entries held in memory between the request path and the publisher (a gateway request's
    /// two events are one entry). Default 10000; beyond it events go to the spool, and only a
    /// full spool drops.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// The most memory the in-process queue's event buffers may hold, counting events that
    /// wait and those sent and awaiting the broker's confirms, in bytes or with `KiB`, `MiB`
    /// or `GiB`. Buffers are 576 KiB each; past the bound events go to the spool. The
    /// journal has a slot for each buffer, so it is also the journal's size. Default `64MiB`.
    #[serde(default = "default_buffer_max_bytes", deserialize_with = "byte_size")]
    pub buffer_max_bytes: u64,
    /// How long the publisher lets events gather before it sends them and waits for the
    /// broker's confirms, unless the queue (`queueCapacity`) is already half full. Each round
    /// trip costs the broker a write and a sync, so a longer wait costs it less CPU and
    /// delays events by up to this much. Default `200ms`.
    #[serde(
        default = "default_publish_interval",
        deserialize_with = "duration_text"
    )]
    pub publish_interval: Duration,
    /// How message bodies are compressed on the wire: `lz4` (default) or `none`. Consumers
    /// read both; LZ4 cuts the broker's work (it follows the bytes) for a little publisher CPU.
    #[serde(default)]
    pub compression: TraceCompression,
    /// Folder for the disk spool used while the broker is away. Default `/tmp/goms-spool`;
    /// each node uses its own subfolder.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// Size cap of the spool in bytes; events beyond it are dropped and counted. Default 256 MiB.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Keep a copy of the in-process queue in a memory-mapped file of the node's spool
    /// folder (`queue.journal`, sparse, as large as `bufferMaxBytes`), so that the events a SIGKILLed or
    /// crashed process held in memory are replayed by its next start. Default true.
    #[serde(default = "default_true")]
    pub journal: bool,
    /// Request bodies are cut to this many bytes in events. Default 4096.
    #[serde(default = "default_body_max_bytes")]
    pub body_max_bytes: usize,
    /// Header names redacted in addition to Authorization, Cookie, Set-Cookie and Call-Service-Key.
    #[serde(default)]
    pub redact_headers: Vec<String>,
}

/// How trace messages are compressed (`trace.compression`); the trace framing names each
/// as an AMQP `content-encoding`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceCompression {
    #[default]
    Lz4,
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

/// `goms trace-consumer`: RabbitMQ -> Elasticsearch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TraceConsumerConfig {
    /// Events per `_bulk` request. Default 500.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest wait for a batch to fill. Default `200ms`.
    #[serde(default = "default_batch_wait", deserialize_with = "duration_text")]
    pub batch_wait: Duration,
    /// Unacknowledged messages the broker hands this consumer; a message carries up to 1,024
    /// events (512 KiB). Default 32: enough for full `_bulk` batches, few enough that
    /// consumers sharing a backlog each get a part of it.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Daily index prefix: `<prefix>-YYYY.MM.DD`. Default `trace_logs`.
    #[serde(default = "default_index_prefix")]
    pub index_prefix: String,
    /// Longest pause between retries of a failing bulk request. Default `30s`.
    #[serde(default = "default_max_backoff", deserialize_with = "duration_text")]
    pub max_backoff: Duration,
}

/// How nodes register in etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegistryConfig {
    /// Lease TTL in seconds; a node that dies disappears after at most this long. Default 10.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: u64,
    /// Timeout for connecting to etcd and for each etcd call. Default `3s`.
    #[serde(default = "default_etcd_timeout", deserialize_with = "duration_text")]
    pub etcd_timeout: Duration,
}

/// The gateway's own settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayConfig {
    /// Port the proxy listens on (all interfaces). Default 8080.
    #[serde(default = "default_gateway_port")]
    pub http_port: u16,
    /// Address the gateway binds. Default `0.0.0.0` (all interfaces); `127.0.0.1` keeps it local.
    #[serde(default = "default_listen_host")]
    pub listen_host: String,
    /// Route file path. Default `config/services.yml`.
    #[serde(default = "default_routes_path")]
    pub routes: PathBuf,
    /// Host other nodes and clients reach this gateway at; registered in etcd. Default `127.0.0.1`.
    #[serde(default = "default_advertise_host")]
    pub advertise_host: String,
    /// Upstream timeout per attempt for routes that set none. Default `30s`.
    #[serde(
        default = "default_upstream_timeout",
        deserialize_with = "duration_text"
    )]
    pub upstream_timeout: Duration,
    /// Upstream connect timeout. Default `1s`: a replica that cannot accept in a second is skipped.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "duration_text"
    )]
    pub connect_timeout: Duration,
    /// Extra attempts for routes that set none. Default 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Interval of the TCP health check of every replica. Default `1s`.
    #[serde(
        default = "default_health_interval",
        deserialize_with = "duration_text"
    )]
    pub health_check_interval: Duration,
    /// Worker threads of the proxy. Default 2.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Whether idle proxy threads take work from busy ones. Default false: each thread
    /// keeps the connections it accepted, which saves the cross-thread wake-ups that cost
    /// more than they balance on small machines.
    #[serde(default)]
    pub work_stealing: bool,
    /// Idle upstream connections kept for reuse, over all replicas. Default 1024: pingora's
    /// own default of 128 closes and reopens upstream connections once more than 128 client
    /// connections are busy at the same time.
    #[serde(default = "default_upstream_keepalive")]
    pub upstream_keepalive: usize,
    /// On SIGTERM, how long in-flight requests may take to finish. Default `10s`.
    #[serde(default = "default_drain", deserialize_with = "duration_text")]
    pub drain_timeout: Duration,
    /// The admin listener: `/cluster`, `/metrics`, `/healthz` (and the dashboard), for
    /// operators only. Default: loopback, on a port that follows the public port (see
    /// [`GatewayConfig::admin_addr`]), so that several gateways on one host each get their own.
    #[serde(default, rename = "adminAddr")]
    pub explicit_admin_addr: Option<String>,
    /// Clients that may read `/cluster` and `/metrics` on the public port as well, as CIDR
    /// blocks; `/cluster` lists node addresses. Default loopback (`127.0.0.0/8`, `::1`).
    #[serde(default = "AllowList::loopback")]
    pub admin_allow: AllowList,
    /// The proxies in front of the gateway (a load balancer, a CDN), as CIDR blocks, whose
    /// `X-Forwarded-For`, `-Proto` and `-Host` are believed and passed on. Default none: those
    /// headers are replaced with what the gateway saw, and the peer is the client.
    #[serde(default = "AllowList::nobody")]
    pub trusted_proxies: AllowList,
    /// Kibana's address (`http://kibana:5601`, say), for the dashboard's link from a request
    /// to its events in Discover. Default none: no link.
    #[serde(default)]
    pub kibana_url: Option<String>,
    /// HTTP/2 with prior knowledge (h2c) on the plain port, beside HTTP/1 (`http2Cleartext`;
    /// `h2c` would not survive the environment's case conversion). Default false: a
    /// plain port that is reached through proxies and load balancers speaks HTTP/1 only.
    /// Over TLS, HTTP/2 is offered by ALPN (`gateway.tls.http2`).
    #[serde(default)]
    pub http2_cleartext: bool,
    /// The dashboard (`/ui` on the admin listener) and what it records of each request.
    /// Default on; off, `/ui` answers 404 and the request path records nothing for it.
    #[serde(default = "default_true")]
    pub dashboard: bool,
    /// Limits on what a client may send, in the class of Envoy's and nginx's defaults.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// HTTPS on a listener of its own (`gateway.tls`). Default none: plain HTTP only.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The memory guard: past this much anonymous resident memory (`RssAnon`), new requests
    /// get a 503 at once and the gateway gives back what it can, until it is below 90% of it
    /// again. Bytes, or a size such as `400MiB`. Default none; set it below the container's
    /// memory limit, so that the gateway sheds load before the OOM killer ends it.
    #[serde(default, deserialize_with = "optional_byte_size")]
    pub memory_limit: Option<u64>,
}

/// The gateway's TLS listener (`gateway.tls`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsConfig {
    /// Where HTTPS is served. Default `0.0.0.0:8443`.
    #[serde(default = "default_tls_listen")]
    pub listen: String,
    /// One or more certificates, chosen by the name the client asks for (SNI); the first is
    /// served when none matches. TLS 1.2 and 1.3 are offered. In the environment, one string
    /// of `cert:key` pairs separated by `,`.
    #[serde(deserialize_with = "certificate_list")]
    pub certificates: Vec<CertificateConfig>,
    /// Answer requests on the plain port with a 308 to the same URL on HTTPS (`/healthz` and
    /// `/readyz` stay on plain HTTP for load balancers). Default false.
    #[serde(default)]
    pub redirect: bool,
    /// The `Strict-Transport-Security` value sent on HTTPS answers, e.g.
    /// `max-age=31536000; includeSubDomains`. Default none.
    #[serde(default)]
    pub hsts: Option<String>,
    /// How often the certificate files are checked for a replacement. Default `2s`.
    #[serde(
        default = "default_cert_reload_interval",
        deserialize_with = "duration_text"
    )]
    pub reload_interval: Duration,
    /// Offer HTTP/2 by ALPN (`h2`, then `http/1.1`). Default true; routes, the key, ids,
    /// retries, limits, trace events and the dashboard work the same over both.
    #[serde(default = "default_true")]
    pub http2: bool,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Request limits of the gateway (`gateway.limits`). A refusal is answered in the envelope,
/// closes the connection and is counted in `/metrics` by reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsConfig {
    /// Total bytes of the request's header fields (names and values). Default 61440
    /// (60 KiB); past it, 431.
    #[serde(default = "default_header_bytes")]
    pub header_bytes: usize,
    /// Header fields in a request. Default 100; past it, 431.
    #[serde(default = "default_header_count")]
    pub header_count: usize,
    /// Bytes of the request target (path and query). Default 8192; past it, 414.
    #[serde(default = "default_uri_bytes")]
    pub uri_bytes: usize,
    /// Request body bytes, for routes that set no `maxBodyBytes`. Default 10485760 (10 MiB);
    /// past it, 413, before the body is read when `Content-Length` says so.
    #[serde(default = "default_body_bytes")]
    pub body_bytes: u64,
    /// Time from a request header's first byte to its end (slow-header clients). Default
    /// `10s`; past it, 408 and the connection closes.
    #[serde(default = "default_header_timeout", deserialize_with = "duration_text")]
    pub header_timeout: Duration,
    /// How long a keep-alive connection may wait idle for its next request. Default `60s`;
    /// then the gateway closes it.
    #[serde(default = "default_idle_timeout", deserialize_with = "duration_text")]
    pub idle_timeout: Duration,
    /// Client connections served at once on the public port. Default 10000; a connection
    /// past it is closed at accept and counted (`goms_gateway_connections_refused_total`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests in flight at once on one HTTP/2 connection (its `SETTINGS_MAX_CONCURRENT_STREAMS`).
    /// Default 128, as nginx's.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
}

/// Settings of `goms service` and of services built on the SDK.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceConfig {
    /// Service name, the `{service}` in `/api/{service}/{route}`. Default `user`.
    #[serde(default = "default_service_name")]
    pub name: String,
    /// Port the service listens on. Default 9080.
    #[serde(default = "default_service_port")]
    pub http_port: u16,
    /// Port the node serves gRPC on (h2c, registered as `rpc` in etcd); 0 picks a free one.
    /// Default none: no gRPC.
    #[serde(default)]
    pub rpc_port: Option<u16>,
    /// Host the gateway reaches this replica at; registered in etcd. Default `127.0.0.1`.
    #[serde(default = "default_advertise_host")]
    pub advertise_host: String,
    /// Version label registered with the node. Default the goms version.
    #[serde(default = "default_version")]
    pub version: String,
    /// Relative share of traffic. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Free-form zone label registered with the node. Default empty.
    #[serde(default)]
    pub zone: String,
    /// On SIGTERM, how long in-flight requests may take to finish. Default `10s`.
    #[serde(default = "default_drain", deserialize_with = "duration_text")]
    pub drain_timeout: Duration,
}

/// Settings of `goms sidecar`, which makes an HTTP app in any language a goms node. Its name,
/// port, advertised host, labels and drain timeout are the `service` section's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SidecarConfig {
    /// The app's address, `host:port`, reached over keep-alive connections. Default
    /// `127.0.0.1:3000`.
    #[serde(default = "default_sidecar_app")]
    pub app: String,
    /// Path of the app's health check, an HTTP GET that must answer 2xx. Without it the
    /// check is a TCP connect. Default none.
    #[serde(default)]
    pub health: Option<String>,
    /// How often the app is checked. Default `2s`.
    #[serde(
        default = "default_app_health_interval",
        deserialize_with = "duration_text"
    )]
    pub health_interval: Duration,
    /// Failed checks in a row after which the node leaves the registry. Default 3.
    #[serde(default = "default_health_failures")]
    pub health_failures: u32,
    /// Where `/healthz`, `/readyz` and `/metrics` are served, apart from the app's own
    /// paths. Default `127.0.0.1:4191`.
    #[serde(default = "default_sidecar_admin")]
    pub admin_addr: String,
    /// Longest wait for a connection to the app; past it the caller gets 502. Default `1s`.
    #[serde(
        default = "default_app_connect_timeout",
        deserialize_with = "duration_text"
    )]
    pub app_connect_timeout: Duration,
    /// Longest wait for the app's answer; past it the caller gets 504. Default `30s`.
    #[serde(default = "default_app_timeout", deserialize_with = "duration_text")]
    pub app_timeout: Duration,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LogConfig {
    /// `text` or `json`. Default `text`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `goms=debug,info`. Default `info`; `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A value that must never reach a log line: `Debug` and `Display` print `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

fn default_etcd_addr() -> Vec<String> {
    vec!["127.0.0.1:2379".into()]
}
fn default_es_addr() -> String {
    "http://127.0.0.1:9200".into()
}
fn default_amqp_addr() -> String {
    "amqp://guest:guest@127.0.0.1:5672".into()
}
fn default_lease_ttl() -> u64 {
    10
}
fn default_publish_interval() -> Duration {
    Duration::from_millis(200)
}

fn default_etcd_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_gateway_port() -> u16 {
    8080
}
fn default_listen_host() -> String {
    "0.0.0.0".into()
}
fn default_routes_path() -> PathBuf {
    PathBuf::from(DEFAULT_ROUTES_PATH)
}
fn default_advertise_host() -> String {
    "127.0.0.1".into()
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_retries() -> u32 {
    2
}
fn default_health_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_upstream_keepalive() -> usize {
    1024
}
fn default_threads() -> usize {
    2
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}
fn default_header_bytes() -> usize {
    60 * 1024
}
fn default_header_count() -> usize {
    100
}
fn default_uri_bytes() -> usize {
    8 * 1024
}
fn default_body_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_concurrent_streams() -> u32 {
    128
}
/// A list of `{cert, key}`, or (as `GOMS__GATEWAY__TLS__CERTIFICATES` writes it) one string
/// of `cert:key` pairs separated by `,`.
fn certificate_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<CertificateConfig>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<CertificateConfig>),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::List(list) => Ok(list),
        Raw::Text(text) => text
            .split(',')
            .filter(|pair| !pair.trim().is_empty())
            .map(|pair| match pair.trim().rsplit_once(':') {
                Some((cert, key)) if !cert.is_empty() && !key.is_empty() => Ok(CertificateConfig {
                    cert: cert.into(),
                    key: key.into(),
                }),
                _ => Err(serde::de::Error::custom(format!(
                    "`{pair}` is not `cert.pem:key.pem`"
                ))),
            })
            .collect(),
    }
}

fn default_tls_listen() -> String {
    "0.0.0.0:8443".into()
}
fn default_cert_reload_interval() -> Duration {
    Duration::from_secs(2)
}
/// How far the default admin port sits from the public port: 8080 -> 9901, 8081 -> 9902.
const ADMIN_PORT_OFFSET: u16 = 9901 - 8080;
fn default_sidecar_app() -> String {
    "127.0.0.1:3000".into()
}
fn default_app_health_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_health_failures() -> u32 {
    3
}
fn default_sidecar_admin() -> String {
    "127.0.0.1:4191".into()
}
fn default_app_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_app_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_service_name() -> String {
    "user".into()
}
fn default_service_port() -> u16 {
    9080
}
fn default_version() -> String {
    env!("CARGO_PKG_VERSION").into()
}
fn default_weight() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_project_name() -> String {
    "goms".into()
}
fn default_trace_queue() -> String {
    "goms.trace".into()
}
fn default_queue_capacity() -> usize {
    10_000
}
fn default_buffer_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("/tmp/goms-spool")
}
fn default_spool_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_body_max_bytes() -> usize {
    4096
}
fn default_batch_size() -> usize {
    500
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(200)
}
fn default_prefetch() -> u16 {
    32
}
fn default_index_prefix() -> String {
    "trace_logs".into()
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_log_level() -> String {
    "info".into()
}

macro_rules! default_from_serde {
    ($($ty:ty),*) => {$(
        impl Default for $ty {
            fn default() -> Self {
                serde_norway::from_str("{}").expect("every field has a default")
            }
        }
    )*};
}
default_from_serde!(
    GomsConfig,
    RegistryConfig,
    GatewayConfig,
    ServiceConfig,
    SidecarConfig,
    LimitsConfig,
    LogConfig,
    TraceConfig,
    TraceConsumerConfig
);

/// goms wrote endpoints as a list or as `a:2379|b:2379`; the environment writes `a,b`.
fn etcd_endpoints<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let raw = match Raw::deserialize(deserializer)? {
        Raw::One(one) => vec![one],
        Raw::Many(many) => many,
    };
    let endpoints: Vec<String> = raw
        .iter()
        .flat_map(|entry| entry.split(['|', ',']))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        return Err(serde::de::Error::custom("etcdAddr lists no endpoint"));
    }
    Ok(endpoints)
}

/// A size in bytes: a number, or a number with `KiB`, `MiB` or `GiB` (`400MiB`).
fn byte_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    optional_byte_size(deserializer)?
        .ok_or_else(|| serde::de::Error::custom("a size is needed here (`64MiB`)"))
}

fn optional_byte_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    let text = match Option::<Size>::deserialize(deserializer)? {
        None => return Ok(None),
        Some(Size::Bytes(bytes)) => return Ok(Some(bytes)),
        Some(Size::Text(text)) => text,
    };
    parse_byte_size(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "`{text}` is no size: write bytes, or a number with KiB, MiB or GiB"
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .filter(|bytes| *bytes > 0)
        .ok_or_else(|| {
            format!("`{text}` is no size: write bytes, or a number with KiB, MiB or GiB")
        })
}

fn duration_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    routes::DurationText::deserialize(deserializer).map(|d| d.0)
}

impl GatewayConfig {
    /// The admin listener's address: `gateway.adminAddr` when set; otherwise loopback on the
    /// public port plus 1821 (8080 -> 9901, 8081 -> 9902), the Go original's tour of three
    /// gateways on one host. A public port of 0, or one too high to offset, lets the system
    /// choose (the gateway logs the port it got).
    pub fn admin_addr(&self) -> String {
        if let Some(addr) = &self.explicit_admin_addr {
            return addr.clone();
        }
        let port = match self.http_port {
            0 => 0,
            port => port.checked_add(ADMIN_PORT_OFFSET).unwrap_or(0),
        };
        format!("127.0.0.1:{port}")
    }
}

impl GomsConfig {
    /// Loads `path` (an absent file means defaults) and applies `GOMS__*` overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Self::check_file(path, &text)?;
        let config = Self::with_environment(&text)?;
        config.validate().map_err(|reason| ConfigError::Whole {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// Validates the file alone, so errors point at a line.
    pub fn check_file(path: &Path, text: &str) -> Result<GomsConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(GomsConfig::default());
        }
        serde_norway::from_str(text).map_err(|error| ConfigError::from_yaml(path, text, error))
    }

    /// The file's `text` with the `GOMS__*` overrides of this process's environment applied.
    pub fn with_environment(text: &str) -> Result<Self, ConfigError> {
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .convert_case(config::Case::Camel)
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("etcdAddr")
            .with_list_parse_key("trace.redactHeaders")
            .with_list_parse_key("previousCallServiceKeys");
        let mut builder = config::Config::builder();
        if !text.trim().is_empty() {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Yaml));
        }
        builder
            .add_source(environment)
            .build()
            .and_then(|merged| merged.try_deserialize::<GomsConfig>())
            .map_err(|error| ConfigError::environment(&error.to_string()))
    }

    /// Checks that span several keys; the message names the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.registry.lease_ttl < 2 {
            return Err("registry.leaseTtl must be at least 2 seconds".into());
        }
        if self.sidecar.health_failures == 0 {
            return Err("sidecar.healthFailures must be at least 1".into());
        }
        if self
            .sidecar
            .health
            .as_deref()
            .is_some_and(|path| !path.starts_with('/'))
        {
            return Err("sidecar.health must be a path starting with `/`, e.g. `/healthz`".into());
        }
        if self.gateway.threads == 0 {
            return Err("gateway.threads must be at least 1".into());
        }
        if self.gateway.limits.max_concurrent_streams == 0 {
            return Err("gateway.limits.maxConcurrentStreams must be at least 1".into());
        }
        if self.trace.queue_capacity == 0 {
            return Err("trace.queueCapacity must be at least 1".into());
        }
        let buffer_bytes = crate::trace::framing::MESSAGE_BUFFER_BYTES as u64;
        if self.trace.buffer_max_bytes < buffer_bytes {
            return Err(format!(
                "trace.bufferMaxBytes must hold at least one event buffer ({} KiB)",
                buffer_bytes / 1024
            ));
        }
        let brokers = crate::trace::amqp::Brokers::parse(&self.amqp_addr);
        if brokers.urls().is_empty() {
            return Err(
                "amqpAddr names no broker: give an AMQP URL, or several separated by `,`".into(),
            );
        }
        if let Some(url) = brokers
            .urls()
            .iter()
            .find(|url| !(url.starts_with("amqp://") || url.starts_with("amqps://")))
        {
            return Err(format!(
                "amqpAddr `{}` is not an AMQP URL (amqp://user:password@host:5672)",
                crate::trace::amqp::redact_url(url)
            ));
        }
        if self.trace.publish_interval < Duration::from_millis(1) {
            return Err("trace.publishInterval must be at least 1ms (e.g. `200ms`)".into());
        }
        if self.trace_consumer.batch_size == 0 {
            return Err("traceConsumer.batchSize must be at least 1".into());
        }
        if self.service.weight == 0 {
            return Err("service.weight must be at least 1".into());
        }
        if let Some(tls) = &self.gateway.tls {
            if tls.certificates.is_empty() {
                return Err("gateway.tls.certificates must name at least one cert and key".into());
            }
            if tls
                .hsts
                .as_deref()
                .is_some_and(|hsts| http::HeaderValue::from_str(hsts).is_err())
            {
                return Err(
                    "gateway.tls.hsts must be a header value, e.g. `max-age=31536000`".into(),
                );
            }
        }
        Ok(())
    }

    /// The key services verify, or an error telling how to set it.
    pub fn require_call_service_key(&self) -> Result<&Secret, ConfigError> {
        match &self.call_service_key {
            Some(key) if !key.expose().is_empty() => Ok(key),
            _ => Err(ConfigError::Missing(
                "callServiceKey is not set: put `callServiceKey: \"...\"` in goms.yml, or set \
                 GOMS__CALL_SERVICE_KEY; gateways and services must share it"
                    .into(),
            )),
        }
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.registry.lease_ttl)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_byte_size_takes_a_unit_or_none() {
        assert_eq!(parse_byte_size("400MiB"), Ok(400 << 20));
        assert_eq!(parse_byte_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert!(parse_byte_size("400MB")
            .unwrap_err()
            .contains("KiB, MiB or GiB"));
        assert!(parse_byte_size("0").is_err());
        assert!(parse_byte_size("MiB").is_err());
    }
    use super::*;

    #[test]
    fn goms_config_yml_loads_unchanged() {
        let text = "callServiceKey: \"goms by panco\"\netcdAddr:\n  - \"192.168.125.181:2379\"\nesAddr: \"http://192.168.125.181:9200\"\namqpaddr: \"amqp://guest:guest@192.168.125.181:5672\"\nservices:\n  user:\n    register: \"/register\"\n    login: \"/login\"\n  order:\n    submit: \"/order/submit\"\n";
        let config = GomsConfig::check_file(Path::new("config.yml"), text).unwrap();
        assert_eq!(config.call_service_key.unwrap().expose(), "goms by panco");
        assert_eq!(config.etcd_addr, vec!["192.168.125.181:2379"]);
        assert_eq!(config.amqp_addr, "amqp://guest:guest@192.168.125.181:5672");
        assert_eq!(
            config.services.unwrap().0["order"].routes["submit"].path,
            "/order/submit"
        );
    }

    #[test]
    fn the_default_admin_port_follows_the_public_port_and_an_explicit_one_wins() {
        let admin = |text: &str| {
            GomsConfig::check_file(Path::new("goms.yml"), text)
                .unwrap()
                .gateway
                .admin_addr()
        };
        assert_eq!(admin(""), "127.0.0.1:9901");
        assert_eq!(admin("gateway:\n  httpPort: 8081\n"), "127.0.0.1:9902");
        assert_eq!(admin("gateway:\n  httpPort: 0\n"), "127.0.0.1:0");
        assert_eq!(admin("gateway:\n  httpPort: 65000\n"), "127.0.0.1:0");
        let explicit = "gateway:\n  httpPort: 8081\n  adminAddr: 0.0.0.0:7000\n";
        assert_eq!(admin(explicit), "0.0.0.0:7000");
    }

    #[test]
    fn tls_certificates_read_as_a_list_or_as_one_string_of_pairs() {
        let listed = "gateway:\n  tls:\n    certificates:\n      - {cert: a.crt, key: a.key}\n";
        let config = GomsConfig::check_file(Path::new("goms.yml"), listed).unwrap();
        let tls = config.gateway.tls.unwrap();
        assert_eq!(tls.listen, "0.0.0.0:8443");
        assert_eq!(tls.certificates[0].key, Path::new("a.key"));
        let text = "gateway:\n  tls:\n    certificates: /t/a.crt:/t/a.key, /t/b.crt:/t/b.key\n";
        let config = GomsConfig::check_file(Path::new("goms.yml"), text).unwrap();
        let certificates = config.gateway.tls.unwrap().certificates;
        assert_eq!(certificates.len(), 2);
        assert_eq!(certificates[1].cert, Path::new("/t/b.crt"));
        let bad = "gateway:\n  tls:\n    certificates: only-a-cert.pem\n";
        let error = GomsConfig::check_file(Path::new("goms.yml"), bad).unwrap_err();
        assert!(
            error.to_string().contains("is not `cert.pem:key.pem`"),
            "{error}"
        );
    }

    #[test]
    fn goms_pipe_separated_endpoints() {
        let config = GomsConfig::check_file(
            Path::new("c.yml"),
            "etcdAddr: \"127.0.0.1:2379|127.0.0.1:2380\"\n",
        )
        .unwrap();
        assert_eq!(config.etcd_addr, vec!["127.0.0.1:2379", "127.0.0.1:2380"]);
    }

    #[test]
    fn unknown_key_names_line_and_suggests() {
        let error =
            GomsConfig::check_file(Path::new("goms.yml"), "callServiceKey: k\netcAddr: [a]\n")
                .unwrap_err()
                .to_string();
        assert!(error.starts_with("goms.yml:2:"), "{error}");
        assert!(error.contains("did you mean `etcdAddr`"), "{error}");
    }

    #[test]
    fn defaults_without_file() {
        let config = GomsConfig::default();
        assert_eq!(config.gateway.http_port, 8080);
        assert_eq!(config.registry.lease_ttl, 10);
        assert_eq!(config.gateway.retries, 2);
        assert!(config.call_service_key.is_none());
        assert_eq!(config.trace.publish_interval, Duration::from_millis(200));
        assert_eq!(config.trace.compression, TraceCompression::Lz4);
    }

    #[test]
    fn trace_compression_is_lz4_or_none() {
        let read = |text: &str| GomsConfig::check_file(Path::new("goms.yml"), text);
        let config = read("trace:\n  compression: none\n").unwrap();
        assert_eq!(config.trace.compression, TraceCompression::None);
        let error = read("trace:\n  compression: gzip\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("goms.yml:2"), "{error}");
        assert!(error.contains("lz4"), "{error}");
    }

    #[test]
    fn publish_interval_is_read_and_zero_is_refused() {
        let read = |text: &str| GomsConfig::check_file(Path::new("goms.yml"), text).unwrap();
        let config = read("trace:\n  publishInterval: 250ms\n");
        assert_eq!(config.trace.publish_interval, Duration::from_millis(250));
        assert!(config.validate().is_ok());
        let error = read("trace:\n  publishInterval: 0s\n")
            .validate()
            .unwrap_err();
        assert!(error.contains("trace.publishInterval"), "{error}");
    }

    #[test]
    fn the_trace_buffer_bound_takes_a_size_and_refuses_less_than_one_buffer() {
        let read = |text: &str| GomsConfig::check_file(Path::new("goms.yml"), text).unwrap();
        assert_eq!(read("trace: {}\n").trace.buffer_max_bytes, 64 * 1024 * 1024);
        let config = read("trace:\n  bufferMaxBytes: 16MiB\n");
        assert_eq!(config.trace.buffer_max_bytes, 16 * 1024 * 1024);
        assert!(config.validate().is_ok());
        let error = read("trace:\n  bufferMaxBytes: 64KiB\n")
            .validate()
            .unwrap_err();
        assert!(error.contains("trace.bufferMaxBytes"), "{error}");
        assert!(error.contains("576 KiB"), "{error}");
    }

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(format!("{secret}"), "***");
    }
}
