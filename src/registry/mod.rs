//! Service registry on etcd v3: nodes register under a lease, everybody watches everybody.
//!
//! - [`Registration`] keeps one node's key alive (lease, keep-alive, re-grant after a loss,
//!   revoke on shutdown).
//! - [`membership::watch_members`] lists the prefix, watches from the next revision, and
//!   republishes a [`Members`] snapshot on every change, logging the Go original's
//!   `[service] node [id] join|leave` lines.
//! - [`Drain`] tells a stopping node when it has left and finished its work.
//!
//! Registration and membership reconnect on their own: etcd restarting, a broken stream or a compacted revision
//! never needs a process restart.

pub mod drain;
pub mod lease;
pub mod membership;
pub mod node;

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

pub use drain::Drain;
pub use lease::Registration;
pub use membership::{list_members, watch_members, Members, RegistryStatus};
pub use node::{node_key, parse_node_key, NodeInfo, KEY_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Shows only the root cause: the client's own message nests a gRPC status, a transport
    /// error and a connect error around one `Connection refused`.
    #[error("etcd at {endpoints}: {}", etcd_root_cause(source))]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints}: no answer within {timeout:?}")]
    Timeout {
        endpoints: String,
        timeout: Duration,
    },
}

/// The innermost cause of an etcd client error; a gRPC status keeps its cause one level in.
fn etcd_root_cause(error: &etcd_client::Error) -> String {
    use crate::diagnostics::root_cause;
    match error {
        etcd_client::Error::GRpcStatus(status) => root_cause(status),
        other => root_cause(other),
    }
}

/// HTTP/2 ping interval towards etcd; etcd refuses pings more frequent than 5 s.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How to reach etcd; cheap to clone, connects afresh on demand.
#[derive(Debug, Clone)]
pub struct EtcdEndpoints {
    endpoints: Vec<String>,
    timeout: Duration,
}

impl EtcdEndpoints {
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Self {
        EtcdEndpoints { endpoints, timeout }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn describe(&self) -> String {
        self.endpoints.join(",")
    }

    pub(crate) fn error(&self, source: etcd_client::Error) -> RegistryError {
        RegistryError::Etcd {
            endpoints: self.describe(),
            source,
        }
    }

    pub(crate) fn timed_out(&self) -> RegistryError {
        RegistryError::Timeout {
            endpoints: self.describe(),
            timeout: self.timeout,
        }
    }

    /// Opens a client. HTTP/2 keep-alive pings make a dead etcd visible on an idle watch
    /// stream; they must stay above etcd's `--grpc-keepalive-min-time` (5 s by default), or
    /// etcd answers "too many pings" and drops the connection.
    pub async fn connect(&self) -> Result<Client, RegistryError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, self.timeout)
            .with_keep_alive_while_idle(true);
        self.bounded(Client::connect(&self.endpoints, Some(options)))
            .await
    }

    /// Runs one etcd call with the configured timeout, mapping both failure kinds.
    pub(crate) async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(self.error(source)),
            Err(_) => Err(self.timed_out()),
        }
    }
}

/// Delay before the next reconnect attempt: doubles from 200 ms up to 5 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let millis = 200u64.saturating_mul(1 << attempt.min(5));
    Duration::from_millis(millis.min(5_000))
}
