//! `goms cluster`: prints the `/cluster` document from a gateway or from etcd.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::GomsConfig;
use crate::gateway::cluster::cluster_document;
use crate::registry::{list_members, EtcdEndpoints};

const TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(config: &GomsConfig, gateway: Option<&str>) -> anyhow::Result<()> {
    let document = match gateway {
        Some(address) => fetch_from_gateway(address).await?,
        None => from_etcd(config).await?,
    };
    println!("{document}");
    Ok(())
}

async fn from_etcd(config: &GomsConfig) -> anyhow::Result<String> {
    let etcd = EtcdEndpoints::new(config.etcd_addr.clone(), config.registry.etcd_timeout);
    let members = list_members(&etcd).await?;
    Ok(serde_json::to_string_pretty(&cluster_document(
        &members, None,
    ))?)
}

/// A plain HTTP/1.1 GET: the binary needs no HTTP client library for one request.
async fn fetch_from_gateway(address: &str) -> anyhow::Result<String> {
    let address = address.trim_start_matches("http://").trim_end_matches('/');
    let exchange = async {
        let mut stream = TcpStream::connect(address).await?;
        let request =
            format!("GET /cluster HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
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
