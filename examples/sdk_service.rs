//! A goms service in Rust, on the SDK: an `inventory` service with one route of its own.
//!
//! `goms::service::serve` does a node's duties around an ordinary axum router: it registers
//! the service in etcd under a lease (and leaves the registry on SIGTERM before it drains),
//! refuses calls without the shared `Call-Service-Key`, stamps `X-Served-By`, and emits the
//! `service.start`/`service.end` trace events. The handler only does the service's work.
//!
//!     GOMS__CALL_SERVICE_KEY=secret cargo run --example sdk_service
//!     # routes: services.yml  ->  inventory: { stock: "/stock" }
//!     curl 'http://127.0.0.1:8080/api/inventory/stock?item=7'
//!
//! Settings come from `config/goms.yml` and `GOMS__*` variables, as for `goms service`:
//! `GOMS__SERVICE__HTTP_PORT`, `GOMS__ETCD_ADDR`, `GOMS__AMQP_ADDR`, ...

use axum::extract::Query;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

#[derive(Deserialize)]
struct StockQuery {
    item: String,
}

/// The service's own work: how many of an item are in stock.
async fn stock(Query(query): Query<StockQuery>) -> Json<serde_json::Value> {
    let count = query.item.bytes().map(u32::from).sum::<u32>() % 100;
    Json(serde_json::json!({
        "code": 0,
        "data": {"item": query.item, "inStock": count},
        "msg": "success",
        "status": true,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config =
        goms::config::GomsConfig::load(std::path::Path::new(goms::config::DEFAULT_CONFIG_PATH))?;
    // The same logs as `goms` itself: `log.level`, `log.format`, colour only on a terminal.
    goms::cli::logging::init(&config.log);
    let mut options = goms::service::ServiceOptions::from_config(&config)?;
    options.name = "inventory".into();
    let router = Router::new().route("/stock", get(stock));
    goms::service::serve(options, router, goms::service::termination_signal()).await?;
    Ok(())
}
