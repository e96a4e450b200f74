//! goms: a microservice appliance. An API gateway built on pingora routes
//! `/api/{service}/{route}` to service replicas registered in etcd, balances and retries
//! across them, and guards service-to-service calls with a shared key.
//!
//! # Layout
//! Modules follow the data path; imports point one way (`cli` uses everything; `gateway`
//! and `service` use `registry`, `trace` and `config`; `registry` and `trace` use only
//! `config`; `gateway` and `service` never import each other).
//! - [`config`]: `goms.yml` and `services.yml`, env overrides, validation with `file:line`.
//! - [`registry`]: etcd registration (leases) and membership watching.
//! - [`gateway`]: the pingora proxy, balancers, `/cluster`, `/metrics`.
//! - [`trace`]: request ids, W3C trace context, per-request timings.
//! - [`service`]: the service SDK (axum) and the stock echo service.
//! - [`cli`]: the `goms` command line.

pub mod cli;
pub mod config;
pub mod gateway;
pub mod registry;
pub mod service;
pub mod trace;
