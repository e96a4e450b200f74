//! The gateways' resident memory and open file descriptors over the run, read from
//! `/proc` once a second, per incarnation (a gateway started again is a new series).

use std::time::{Duration, Instant};

use crate::stack::Stack;

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the traffic started.
    pub at: f64,
    pub gateway: usize,
    pub pid: i32,
    pub rss_kib: u64,
    pub fds: usize,
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
        for (gateway, process) in processes.gateways.iter().enumerate() {
            let pid = process.pid();
            if let (Some(rss_kib), Some(fds)) = (rss_kib(pid), open_fds(pid)) {
                samples.push(Sample {
                    at,
                    gateway,
                    pid,
                    rss_kib,
                    fds,
                });
            }
        }
    }
    samples
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn open_fds(pid: i32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}
