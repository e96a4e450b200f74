//! What one registered node looks like in etcd: its key and its JSON value.

use serde::{Deserialize, Serialize};

pub use crate::config::now_rfc3339;

/// Every node lives under this prefix: `/goms/services/{service}/{id}`.
pub const KEY_PREFIX: &str = "/goms/services/";

/// The JSON value stored at a node's key (DESIGN.md, "Registry contract").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub service: String,
    /// `host:port` the node serves HTTP on.
    pub http: String,
    /// `host:port` the node serves gRPC on (h2c), when it has an RPC port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc: Option<String>,
    #[serde(default)]
    pub version: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub zone: String,
    /// RFC 3339 time the node started.
    #[serde(default)]
    pub started_at: String,
}

fn one() -> u32 {
    1
}

impl NodeInfo {
    pub fn key(&self) -> String {
        node_key(&self.service, &self.id)
    }
}

pub fn node_key(service: &str, id: &str) -> String {
    format!("{KEY_PREFIX}{service}/{id}")
}

/// Splits `/goms/services/{service}/{id}` into its service and id.
pub fn parse_node_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (service, id) = rest.split_once('/')?;
    (!service.is_empty() && !id.is_empty()).then_some((service, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips() {
        let key = node_key("user", "127.0.0.1:9080");
        assert_eq!(key, "/goms/services/user/127.0.0.1:9080");
        assert_eq!(parse_node_key(&key), Some(("user", "127.0.0.1:9080")));
        assert_eq!(parse_node_key("/goms/services/user"), None);
    }
}
