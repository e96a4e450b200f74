//! The publisher's link to the broker: whether there is one, the attempt to open one (to
//! which of `amqpAddr`'s brokers: [`Failover`]), and whether the broker blocks publishers on
//! it.

use crate::diagnostics::Repeats;
use std::time::Instant;

use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::broker::{open_confirmed_link, BrokerError};
use super::PublisherSettings;
use crate::trace::amqp::{redact_url, Brokers, Failover, Link};

pub(super) struct Connection {
    link: Option<Link>,
    /// A connection attempt, run as its own task: a broker that does not answer (packets
    /// dropped by a partition, a host gone) holds an attempt for up to
    /// [`amqp::CONNECT_TIMEOUT`](crate::trace::amqp::CONNECT_TIMEOUT), and meanwhile the
    /// publisher must keep draining the in-process queue, or the request path would find it
    /// full and write the spool itself.
    attempt: Option<JoinHandle<Result<Link, BrokerError>>>,
    /// Counts the links opened, so that a late failure of a batch sent on an earlier link
    /// does not tear down the current one ([`Connection::failed_on`]).
    generation: u64,
    brokers: Brokers,
    /// The broker tried next, and how many attempts failed since the last link.
    failover: Failover,
    next_attempt: Instant,
    away: Repeats,
    /// Whether the broker said it blocks publishers on this link (`connection.blocked`: a
    /// memory or disk alarm), as last logged.
    blocked: bool,
}

/// A link that takes publishes now, and its generation.
pub(super) struct Publishable {
    pub channel: lapin::Channel,
    pub generation: u64,
}

impl Connection {
    pub(super) fn new(brokers: Brokers) -> Self {
        Connection {
            link: None,
            attempt: None,
            generation: 0,
            brokers,
            failover: Failover::default(),
            next_attempt: Instant::now(),
            away: Repeats::default(),
            blocked: false,
        }
    }

    /// Takes up a finished connection attempt, or starts one when it is due; never waits for
    /// the broker.
    pub(super) async fn ensure(&mut self, settings: &PublisherSettings) {
        if self.link.is_some() {
            return;
        }
        match self.attempt.take() {
            Some(attempt) if attempt.is_finished() => match attempt.await {
                Ok(Ok(link)) => self.connected(link),
                Ok(Err(error)) => self.lost(&error),
                Err(join_error) => self.lost(&BrokerError::Task(join_error)),
            },
            Some(attempt) => self.attempt = Some(attempt),
            None if Instant::now() >= self.next_attempt => {
                let Some(url) = self.failover.current(&self.brokers) else {
                    return;
                };
                let attempt = open_confirmed_link(settings.clone(), url.to_string());
                self.attempt = Some(tokio::spawn(attempt));
            }
            None => {}
        }
    }

    pub(super) fn is_connecting(&self) -> bool {
        self.attempt.is_some()
    }

    /// The link, unless there is none or the broker blocks publishers. lapin writes nothing
    /// to a blocked connection, so a publish there would wait for the alarm to clear.
    pub(super) fn publishable(&mut self) -> Option<Publishable> {
        let blocked = self
            .link
            .as_ref()
            .is_some_and(|link| link.connection.status().blocked());
        if blocked != self.blocked {
            self.blocked = blocked;
            if blocked {
                warn!("Trace broker blocks publishers (resource alarm); spooling events to disk.");
            } else {
                info!("Trace broker accepts publishers again.");
            }
        }
        let generation = self.generation;
        self.link
            .as_ref()
            .filter(|_| !blocked)
            .map(|link| Publishable {
                channel: link.channel.clone(),
                generation,
            })
    }

    /// A publish on link `generation` failed: the broker counts as lost if that is still the
    /// current link, while a late failure on an earlier link leaves the current one alone.
    pub(super) fn failed_on(&mut self, generation: u64, error: &BrokerError) {
        if self.link.is_some() && self.generation == generation {
            self.lost(error);
        }
    }

    /// Gives up a connection attempt still running (shutdown).
    pub(super) fn abort_attempt(&mut self) {
        if let Some(attempt) = self.attempt.take() {
            attempt.abort();
        }
    }

    fn connected(&mut self, link: Link) {
        let failures = self.failover.failures();
        if failures > 0 {
            let broker = self.failover.current(&self.brokers).map(redact_url);
            info!(
                message = "Trace broker reachable again.",
                broker = broker.unwrap_or_default(),
                attempts = failures
            );
        }
        self.failover.reached();
        self.away.reset();
        self.link = Some(link);
        self.generation += 1;
    }

    fn lost(&mut self, error: &BrokerError) {
        self.link = None;
        // The next link starts unblocked; the broker says so again if its alarm still holds.
        self.blocked = false;
        let delay = self.failover.failed(&self.brokers);
        if let Some(repeats) = self.away.occurred() {
            warn!(message = "Trace broker unavailable; spooling events to disk.", %error, attempts = self.failover.failures(), repeats);
        }
        self.next_attempt = Instant::now() + delay;
    }
}
