//! What the gateway learns about one request while it passes through; trace events are
//! built from it when the request ends.

use std::time::{Duration, Instant, SystemTime};

use crate::trace::TraceContext;

/// One try at an upstream replica.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Shared with the balancer's node entry: recording an attempt copies no string.
    pub node_id: std::sync::Arc<str>,
    pub upstream: std::sync::Arc<str>,
    pub started: Instant,
    /// When the connection to the replica was ready, and whether it was a pooled one.
    pub connected: Option<(Instant, bool)>,
    pub finished: Option<Instant>,
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// Everything known about a request while it passes through the gateway; the trace
/// events of this request are built from it when it ends.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub request_id: String,
    pub trace: TraceContext,
    pub received_at: SystemTime,
    pub started: Instant,
    pub attempts: Vec<Attempt>,
    /// Set when the request is a gRPC call.
    pub grpc: Option<GrpcCall>,
}

/// What the trace says of a gRPC call: its method and how it ended.
#[derive(Debug, Clone)]
pub struct GrpcCall {
    /// `/package.Service/Method`.
    pub method: String,
    /// `grpc-status`, from the replica's trailers or the gateway's own answer.
    pub status: Option<u32>,
}

impl GrpcCall {
    pub fn new(path: &str) -> Self {
        GrpcCall {
            method: path.to_string(),
            status: None,
        }
    }

    /// Takes `grpc-status` from a header block (trailers, or a trailers-only answer).
    pub fn note_status(&mut self, headers: &http::HeaderMap) {
        let status = headers
            .get(super::grpc::GRPC_STATUS)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse().ok());
        if status.is_some() {
            self.status = status;
        }
    }
}

impl RequestRecord {
    pub fn new(request_id: String, trace: TraceContext) -> Self {
        RequestRecord {
            request_id,
            trace,
            received_at: SystemTime::now(),
            started: Instant::now(),
            attempts: Vec::new(),
            grpc: None,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}
