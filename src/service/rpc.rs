//! The node's gRPC port: tonic serves the node's gRPC services over h2c, behind the same
//! `Call-Service-Key` check as its HTTP side (a missing or wrong key is `UNAUTHENTICATED`),
//! and stops when the node drains. Also the stock echo service's gRPC half,
//! `goms.echo.v1.Echo` (`proto/goms/echo/v1/echo.proto`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::metadata::MetadataMap;
use tonic::service::{InterceptorLayer, Routes};
use tonic::{Code, Request, Response, Status};

use super::auth::{AcceptedKeys, CALL_SERVICE_KEY_HEADER};

/// The messages and the server and client of `goms.echo.v1.Echo`, generated from its proto.
pub mod echo_v1 {
    tonic::include_proto!("goms.echo.v1");
}

use echo_v1::echo_server::{Echo, EchoServer};
use echo_v1::{EchoReply, EchoRequest, StreamRequest};

/// What every call on the gRPC port passes first: the key, checked in constant time. An
/// admitted call carries the node's id in its extensions as a [`ServedBy`].
#[derive(Clone)]
pub struct KeyCheck {
    pub keys: AcceptedKeys,
    pub node_id: String,
}

/// The id of the node that serves a call, for services that report it.
#[derive(Debug, Clone)]
pub struct ServedBy(pub String);

impl KeyCheck {
    fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get(CALL_SERVICE_KEY_HEADER)
            .map(|value| value.as_bytes())
            .unwrap_or_default();
        if !self.keys.accept(presented) {
            return Err(Status::unauthenticated(
                "Call-Service-Key is missing or wrong",
            ));
        }
        request
            .extensions_mut()
            .insert(ServedBy(self.node_id.clone()));
        Ok(request)
    }
}

/// Serves `routes` on `listener` until `drained` completes, then lets open calls finish.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    keys: KeyCheck,
    drained: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let check = move |request| keys.check(request);
    tonic::transport::Server::builder()
        .layer(InterceptorLayer::new(check))
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drained)
        .await
}

/// The stock service's gRPC services: `goms.echo.v1.Echo`.
pub fn echo_routes() -> Routes {
    Routes::new(EchoServer::new(EchoService))
}

/// `goms.echo.v1.Echo`: echoes the message with the serving node and the call's metadata.
#[derive(Debug, Clone, Copy)]
pub struct EchoService;

/// The replies a server stream sends ahead of a slow reader.
const STREAM_BUFFER: usize = 64;

type ReplyStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let served_by = served_by(&request);
        let metadata = metadata_lines(request.metadata());
        let asked = request.into_inner();
        if asked.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(asked.delay_ms.into())).await;
        }
        if asked.fail_with != 0 {
            return Err(Status::new(
                Code::from_i32(asked.fail_with),
                "failed as asked",
            ));
        }
        Ok(Response::new(EchoReply {
            message: asked.message,
            served_by,
            sequence: 0,
            metadata,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let served_by = served_by(&request);
        let asked = request.into_inner();
        let (replies, stream) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            let interval = Duration::from_millis(asked.interval_ms.into());
            for sequence in 0..u64::from(asked.count) {
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                let reply = EchoReply {
                    message: asked.message.clone(),
                    served_by: served_by.clone(),
                    sequence,
                    metadata: Vec::new(),
                };
                if replies.send(Ok(reply)).await.is_err() {
                    // The caller went away.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }
}

fn served_by<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<ServedBy>()
        .map(|served_by| served_by.0.clone())
        .unwrap_or_default()
}

/// The call's text metadata as `name: value` lines, the service key left out.
fn metadata_lines(metadata: &MetadataMap) -> Vec<String> {
    metadata
        .clone()
        .into_headers()
        .iter()
        .filter(|(name, _)| name.as_str() != CALL_SERVICE_KEY_HEADER)
        .filter_map(|(name, value)| Some(format!("{name}: {}", value.to_str().ok()?)))
        .collect()
}
