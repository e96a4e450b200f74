//! goms: a microservice appliance. An API gateway built on pingora routes
//! `/api/{service}/{route}` to service replicas registered in etcd, balances and retries
//! across them, and guards service-to-service calls with a shared key.
//!
//! # Layout
//! Modules follow the data path, config -> registry -> gateway / service -> trace -> indexer;
//! imports point one way:
//! - `cli` uses everything;
//! - `gateway` and `service` use `registry`, `trace` and `config`; `sidecar` uses
//!   `service` (it is a service node that forwards), `registry`, `trace` and `config`;
//!   `gateway` never imports `service` or `sidecar`, nor they it (they meet over HTTP, as a
//!   service in any language would);
//! - `indexer` uses `trace` and `config`;
//! - `registry` and `trace` use only `config` and `per_thread`; `config` uses none of them.
//!
//! The modules:
//! - [`config`]: `goms.yml` and `services.yml`, env overrides, validation with `file:line`.
//! - [`registry`]: etcd registration (leases) and membership watching.
//! - [`gateway`]: the pingora proxy, balancers, `/cluster`, `/metrics`, and the gateway's
//!   own trace events.
//! - [`service`]: the service SDK (axum) and the stock echo service.
//! - [`sidecar`]: `goms sidecar`, which makes an HTTP app in any language a goms node.
//! - [`trace`]: request ids, W3C trace context, the event document, and the publisher that
//!   carries events to RabbitMQ.
//! - [`indexer`]: `goms trace-consumer`, RabbitMQ -> Elasticsearch.
//! - [`cli`]: the `goms` command line.
//! - [`diagnostics`]: failures in one line with their root cause, and repeats rate-limited;
//!   used by every module, it uses none.
//! - [`per_thread`]: state every request thread writes and readers merge (a shard per
//!   thread); it uses none.

pub mod allocator;
pub mod cli;
pub mod config;
pub mod diagnostics;
pub mod gateway;
pub mod indexer;
pub mod per_thread;
pub mod registry;
pub mod service;
pub mod sidecar;
pub mod trace;
