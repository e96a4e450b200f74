//! Whether the app answers: an HTTP GET of its health path that must answer 2xx, or, without
//! one, a TCP connect.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a check failed, in one line.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    #[error("app {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("app {addr}: no answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("app {addr}: GET {path} answered {status_line:?}")]
    Status {
        addr: SocketAddr,
        path: String,
        status_line: String,
    },
}

/// How the app is checked.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub app: SocketAddr,
    /// `None`: a TCP connect is the check.
    pub path: Option<String>,
    pub timeout: Duration,
}

impl HealthCheck {
    pub async fn run(&self) -> Result<(), Unhealthy> {
        let (addr, timeout) = (self.app, self.timeout);
        tokio::time::timeout(timeout, self.exchange())
            .await
            .map_err(|_| Unhealthy::Timeout { addr, timeout })?
    }

    async fn exchange(&self) -> Result<(), Unhealthy> {
        let addr = self.app;
        let io = |source| Unhealthy::Connect { addr, source };
        let mut stream = TcpStream::connect(addr).await.map_err(io)?;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: goms-sidecar\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        // The status line is all the check reads; 256 bytes hold it.
        let mut head = [0u8; 256];
        let mut filled = 0;
        while filled < head.len() && !head[..filled].contains(&b'\n') {
            let read = stream.read(&mut head[filled..]).await.map_err(io)?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        let status_line = String::from_utf8_lossy(&head[..filled])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let status = status_line.split(' ').nth(1).unwrap_or_default();
        if status.len() == 3 && status.starts_with('2') {
            Ok(())
        } else {
            Err(Unhealthy::Status {
                addr,
                path: path.clone(),
                status_line,
            })
        }
    }
}
