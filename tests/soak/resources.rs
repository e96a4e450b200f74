//! The gateways' resident memory and open file descriptors over the run, read from
//! `/proc` once a second, per incarnation (a gateway started again is a new series).
//!
//! Descriptors are counted without the client connections on the gateway's public port:
//! how many the client holds is its own choice (it moves them to the other gateway while
//! one is down), while what a gateway opens itself (listeners, upstream pools, etcd, the
//! broker, files) must stay flat.

use std::time::{Duration, Instant};

use crate::stack::Stack;

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the traffic started.
    pub at: f64,
    pub gateway: usize,
    pub pid: i32,
    pub rss_kib: u64,
    /// Open descriptors other than client connections.
    pub fds: usize,
    pub client_connections: usize,
}

/// Samples every second from now until `until`. A second in which a fault holds the
/// processes (starting one again) is skipped.
pub async fn sample_until(stack: &Stack, t0: Instant, until: Instant) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < until {
        tick.tick().await;
        let Ok(processes) = stack.processes.try_lock() else {
            continue;
        };
        let at = t0.elapsed().as_secs_f64();
        let local_ports = socket_local_ports();
        for (gateway, process) in processes.gateways.iter().enumerate() {
            let pid = process.pid();
            let Some(rss_kib) = rss_kib(pid) else {
                continue;
            };
            let Some(fds) = open_fds(pid) else {
                continue;
            };
            let client_connections = fds
                .iter()
                .filter(|fd| {
                    socket_inode(fd).and_then(|i| local_ports.get(&i)) == Some(&process.port)
                })
                .count()
                // The listener itself has the port too.
                .saturating_sub(1);
            samples.push(Sample {
                at,
                gateway,
                pid,
                rss_kib,
                fds: fds.len() - client_connections,
                client_connections,
            });
        }
    }
    samples
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Where each descriptor of `pid` points (`socket:[inode]`, a path, ...).
fn open_fds(pid: i32) -> Option<Vec<String>> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| std::fs::read_link(entry.path()).ok())
            .map(|target| target.display().to_string())
            .collect(),
    )
}

fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Every TCP socket's inode and local port, from `/proc/net/tcp` and `tcp6`.
fn socket_local_ports() -> std::collections::HashMap<u64, u16> {
    let mut ports = std::collections::HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            let port = local
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            if let (Some(port), Ok(inode)) = (port, inode.parse()) {
                ports.insert(inode, port);
            }
        }
    }
    ports
}
