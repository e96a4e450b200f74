//! The gateways' resident memory and open file descriptors over the run, read from
//! `/proc` once a second, per incarnation (a gateway started again is a new series).
//! Memory is read apart: `RssAnon` (what the process holds: queues, buffers, the allocator)
//! and `RssFile` (page cache, which the kernel takes back under pressure: mostly the binary's
//! own pages, plus the trace journal's slots in use), with the allocator's committed and
//! reserved memory and the trace queue's buffers in use (`goms_trace_buffer_bytes`) from the gateway's
//! `/metrics`.
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
    pub anon_kib: u64,
    pub file_kib: u64,
    /// mimalloc's committed memory, from `/metrics`; 0 when it did not answer in time.
    pub committed_kib: u64,
    /// mimalloc's reserved address space, from `/metrics`; 0 when it did not answer.
    pub reserved_kib: u64,
    /// The trace queue's event buffers in use, from `/metrics`; 0 when it did not answer.
    pub trace_buffer_kib: u64,
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
        let mut taken = Vec::new();
        for (gateway, process) in processes.gateways.iter().enumerate() {
            let pid = process.pid();
            let Some(memory) = memory_kib(pid) else {
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
            taken.push((
                process.port,
                Sample {
                    at,
                    gateway,
                    pid,
                    anon_kib: memory.anon,
                    file_kib: memory.file,
                    committed_kib: 0,
                    reserved_kib: 0,
                    trace_buffer_kib: 0,
                    fds: fds.len() - client_connections,
                    client_connections,
                },
            ));
        }
        drop(processes);
        for (port, mut sample) in taken {
            let figures = metrics_kib(port).await.unwrap_or_default();
            (
                sample.committed_kib,
                sample.reserved_kib,
                sample.trace_buffer_kib,
            ) = figures;
            samples.push(sample);
        }
    }
    samples
}

struct Memory {
    anon: u64,
    file: u64,
}

fn memory_kib(pid: i32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some(Memory {
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
    })
}

/// mimalloc's committed and reserved memory and the trace queue's buffers in use, as the
/// gateway on `port` reports them.
async fn metrics_kib(port: u16) -> Option<(u64, u64, u64)> {
    let request = crate::support::http()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_millis(500))
        .send();
    let text = request.await.ok()?.text().await.ok()?;
    let kib = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' '))
        })?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
    };
    Some((
        kib("goms_process_allocator_committed_bytes")?,
        kib("goms_process_allocator_reserved_bytes").unwrap_or(0),
        kib("goms_trace_buffer_bytes").unwrap_or(0),
    ))
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

/// How long after an outage's end its after-value is read: the replay is done by then.
const AFTER_OUTAGE: f64 = 10.0;

/// A gateway's sample [`AFTER_OUTAGE`] after the end of each outage that it lived through.
pub fn after_each_outage<'a>(series: &[&'a Sample], outages: &[(f64, f64)]) -> Vec<&'a Sample> {
    outages
        .iter()
        .filter_map(|(_, ended)| series.iter().find(|s| s.at >= ended + AFTER_OUTAGE))
        .copied()
        .collect()
}

/// For `--outage-loop`: the long-lived gateway's memory before each outage, at its highest
/// during it, and `AFTER` its end, one line per outage. After-values that keep climbing
/// outage after outage are a leak; after-values that level off are buffers finding their size.
pub fn outage_table(samples: &[Sample], outages: &[(f64, f64)]) -> Vec<String> {
    let series: Vec<&Sample> = samples.iter().filter(|s| s.gateway == 0).collect();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let show = |s: Option<&&Sample>| {
        s.map_or("-".to_string(), |s| {
            format!(
                "{:.1}+{:.1} ({:.1}/{:.1}; {:.1})",
                mib(s.anon_kib),
                mib(s.file_kib),
                mib(s.committed_kib),
                mib(s.reserved_kib),
                mib(s.trace_buffer_kib)
            )
        })
    };
    let mut lines = vec![
        "outage  RssAnon+RssFile (allocator committed/reserved; trace buffers in use) MiB: before | highest during | 10 s after"
            .to_string(),
    ];
    for (n, (started, ended)) in outages.iter().enumerate() {
        let before = series.iter().rev().find(|s| s.at < *started);
        let during = series
            .iter()
            .filter(|s| s.at >= *started && s.at <= *ended)
            .max_by_key(|s| s.anon_kib);
        let after = series.iter().find(|s| s.at >= ended + AFTER_OUTAGE);
        lines.push(format!(
            "{:>6}  {} | {} | {}",
            n + 1,
            show(before),
            show(during),
            show(after)
        ));
    }
    lines
}
