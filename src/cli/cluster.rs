//! `goms cluster`: prints the `/cluster` document from a gateway or from etcd; with
//! `--watch`, redraws a summary every second (services, replicas and their health, and,
//! from a gateway's admin listener, requests/s per route).

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::GomsConfig;
use crate::gateway::admin::cluster::cluster_document;
use crate::registry::{list_members, EtcdEndpoints};

const TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(config: &GomsConfig, gateway: Option<&str>) -> anyhow::Result<()> {
    let document = match gateway {
        Some(address) => get_from_gateway(address, "/cluster").await?,
        None => from_etcd(config).await?,
    };
    println!("{document}");
    Ok(())
}

/// Redraws the summary every second until interrupted.
pub async fn watch(config: &GomsConfig, gateway: Option<&str>) -> anyhow::Result<()> {
    loop {
        let summary = match summary(config, gateway).await {
            Ok(summary) => summary,
            Err(error) => format!("{error:#}\n"),
        };
        // Home, clear, then the frame: one write, so the screen never shows half of it.
        print!("\x1b[H\x1b[2J{summary}");
        use std::io::Write;
        std::io::stdout().flush()?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// One frame of `--watch`.
pub async fn summary(config: &GomsConfig, gateway: Option<&str>) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let time = crate::config::now_rfc3339();
    match gateway {
        Some(address) => {
            let topology: serde_json::Value =
                serde_json::from_str(&get_from_gateway(address, "/ui/api/topology").await?)?;
            let traffic: serde_json::Value =
                serde_json::from_str(&get_from_gateway(address, "/ui/api/traffic").await?)?;
            writeln!(out, "goms cluster, gateway {address}, {time}")?;
            let services = topology["services"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for (name, service) in &services {
                writeln!(out, "\n{name}")?;
                for route in service["routes"].as_array().into_iter().flatten() {
                    let key = format!("{name}/{}", route["name"].as_str().unwrap_or_default());
                    let rate = traffic["routes"][&key]["requestsPerSecond"]
                        .as_f64()
                        .unwrap_or(0.0);
                    let p99 = traffic["routes"][&key]["p99Ms"].as_f64();
                    writeln!(
                        out,
                        "  route   {:<32} {:>8.2} req/s  p99 {}",
                        route["url"].as_str().unwrap_or_default(),
                        rate,
                        p99.map_or("-".into(), |p| format!("{p:.1} ms"))
                    )?;
                }
                for replica in service["replicas"].as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "  replica {:<32} {:<8} {}",
                        replica["id"].as_str().unwrap_or_default(),
                        replica["health"].as_str().unwrap_or_default(),
                        replica["lastError"].as_str().unwrap_or_default()
                    )?;
                }
            }
            let gateways = topology["gateways"].as_array().map_or(0, Vec::len);
            writeln!(out, "\n{gateways} gateway(s)")?;
        }
        None => {
            let etcd = EtcdEndpoints::new(config.etcd_addr.clone(), config.registry.etcd_timeout);
            let members = list_members(&etcd).await?;
            writeln!(
                out,
                "goms cluster, etcd {}, {time}",
                config.etcd_addr.join(",")
            )?;
            for (name, nodes) in &members.services {
                writeln!(out, "\n{name}")?;
                for node in nodes.values() {
                    writeln!(out, "  replica {:<32} {}", node.id, node.http)?;
                }
            }
            writeln!(
                out,
                "\n(health and traffic come from a gateway: --gateway ADMIN_ADDR)"
            )?;
        }
    }
    Ok(out)
}

async fn from_etcd(config: &GomsConfig) -> anyhow::Result<String> {
    let etcd = EtcdEndpoints::new(config.etcd_addr.clone(), config.registry.etcd_timeout);
    let members = list_members(&etcd).await?;
    Ok(serde_json::to_string_pretty(&cluster_document(
        &members, None, None,
    ))?)
}

/// A plain HTTP/1.1 GET of `path` from a gateway: the binary needs no HTTP client library
/// for one request.
pub async fn get_from_gateway(address: &str, path: &str) -> anyhow::Result<String> {
    let address = address.trim_start_matches("http://").trim_end_matches('/');
    let exchange = async {
        let mut stream = TcpStream::connect(address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .with_context(|| format!("gateway {address} did not answer"))?
        .with_context(|| format!("asking gateway {address}"))?;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("gateway {address} sent no HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "gateway {address} answered: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_string())
}
