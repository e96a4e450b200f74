//! A node's way out of the cluster. On shutdown a node leaves the registry, stops taking
//! new connections, finishes the requests in flight and flushes what it still holds (trace
//! events); [`Drain`] tells when all of that is over, so that the process exits then rather
//! than after a fixed grace period. The caller bounds the wait (`drainTimeout`).
//! [`run_args`] hands the shutdown signal and the drain to a pingora server (the gateway's
//! and the sidecar's).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tracing::warn;

/// Requests in flight and shutdown duties not yet done.
#[derive(Debug, Default)]
pub struct Drain {
    in_flight: AtomicUsize,
    duties: AtomicUsize,
}

impl Drain {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Something that must finish before the process may exit (leaving the registry,
    /// flushing the trace queue); done when the returned guard is dropped. Take it when the
    /// node starts, so that a shutdown never finds it not yet counted.
    pub fn duty(self: &Arc<Self>) -> Duty {
        self.duties.fetch_add(1, Ordering::AcqRel);
        Duty(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether nothing is in flight and every duty is done.
    pub fn is_done(&self) -> bool {
        self.duties.load(Ordering::Acquire) == 0 && self.in_flight() == 0
    }
}

/// A pingora background service that runs one piece of work (the trace publisher, say) with
/// the server's shutdown watch, and counts as a shutdown duty until the work returns.
pub struct DutyService {
    work: Mutex<Option<(ShutdownWork, Duty)>>,
}

type ShutdownWork =
    Box<dyn FnOnce(ShutdownWatch) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

impl Drain {
    /// `work` as a pingora background service whose return the drain waits for.
    pub fn duty_service<F, Fut>(self: &Arc<Self>, work: F) -> DutyService
    where
        F: FnOnce(ShutdownWatch) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let work: ShutdownWork = Box::new(move |shutdown| Box::pin(work(shutdown)));
        DutyService {
            work: Mutex::new(Some((work, self.duty()))),
        }
    }
}

#[async_trait]
impl BackgroundService for DutyService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let work = self.work.lock().expect("work slot").take();
        if let Some((work, _done_on_return)) = work {
            work(shutdown).await;
        }
    }
}

/// One request in flight; see [`Drain::request`].
#[derive(Debug)]
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One shutdown duty; see [`Drain::duty`].
#[derive(Debug)]
pub struct Duty(Arc<Drain>);

impl Drop for Duty {
    fn drop(&mut self) {
        self.0.duties.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a node is to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Leave the registry, finish the requests in flight (up to `drainTimeout`), then return.
    Drain,
    /// Return at once; requests in flight are cut off.
    Now,
}

/// SIGTERM drains, SIGINT stops at once: the signals the goms processes answer.
pub async fn termination_signal() -> Stop {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("Cannot listen for SIGTERM/SIGINT; the process stops only when killed.");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => Stop::Drain,
        _ = interrupt.recv() => Stop::Now,
    }
}

/// pingora's run arguments for a node: stop when `shutdown` says, and end a drain's grace
/// period as soon as `drain` is done.
pub fn run_args(
    shutdown: impl Future<Output = Stop> + Send + 'static,
    drain: Arc<Drain>,
) -> RunArgs {
    RunArgs {
        shutdown_signal: Box::new(StopSignal(Mutex::new(Some(Box::pin(shutdown))))),
        drained: Some(Box::new(move || drain.is_done())),
    }
}

type StopFuture = Pin<Box<dyn Future<Output = Stop> + Send>>;

/// Hands the caller's shutdown future to pingora, which waits for it once.
struct StopSignal(Mutex<Option<StopFuture>>);

#[async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        let shutdown = self.0.lock().expect("stop signal slot").take();
        let Some(shutdown) = shutdown else {
            return std::future::pending().await;
        };
        match shutdown.await {
            Stop::Drain => ShutdownSignal::GracefulTerminate,
            Stop::Now => ShutdownSignal::FastShutdown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_once_requests_and_duties_are_over() {
        let drain = Drain::new();
        assert!(drain.is_done());
        let duty = drain.duty();
        let request = drain.request();
        assert_eq!(drain.in_flight(), 1);
        drop(duty);
        assert!(!drain.is_done(), "a request is still in flight");
        drop(request);
        assert!(drain.is_done());
    }
}
