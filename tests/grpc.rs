//! gRPC through the gateway: a tonic client calls `goms.echo.v1.Echo` on two echo replicas'
//! `rpc` ports, over h2c on the gateway's plain port. Real etcd, real processes.

mod support;

use std::time::{Duration, Instant};

use goms::service::rpc::echo_v1::echo_client::EchoClient;
use goms::service::rpc::echo_v1::{EchoRequest, StreamRequest};
use support::es_standin::EsStandIn;
use support::trace_fixtures::consumer;
use support::{eventually, free_port, route_file, wait_for_nodes, Etcd, Goms, RabbitMq};
use tonic::transport::Channel;
use tonic::Code;

const GRPC_ROUTES: &str = "services:
  user:
    login: /login
    grpc: [goms.echo.v1.Echo]
  ghost:
    grpc: [goms.ghost]
";

/// Two echo replicas with an RPC port, and a gateway that takes h2c on its plain port.
struct Stage {
    etcd: Etcd,
    replicas: Vec<(Goms, u16)>,
    gateway: Goms,
    _routes: tempfile::TempDir,
}

impl Stage {
    async fn start() -> Stage {
        Stage::start_with(&[]).await
    }

    /// With `env` for the gateway.
    async fn start_with(env: &[(&str, &str)]) -> Stage {
        let etcd = Etcd::start().await;
        let replicas = (0..2)
            .map(|_| {
                let port = free_port();
                (Goms::service(&etcd, port, &["--rpc-port", "0"]), port)
            })
            .collect();
        let (routes_folder, routes) = route_file(GRPC_ROUTES);
        let gateway = gateway(&etcd, &routes, env).await;
        wait_for_nodes(gateway.port(), "user", 2).await;
        Stage {
            etcd,
            replicas,
            gateway,
            _routes: routes_folder,
        }
    }

    async fn client(&self) -> EchoClient<Channel> {
        client(self.gateway.port()).await
    }
}

async fn gateway(etcd: &Etcd, routes: &std::path::Path, env: &[(&str, &str)]) -> Goms {
    let mut env = env.to_vec();
    env.push(("GOMS__GATEWAY__HTTP2_CLEARTEXT", "true"));
    Goms::gateway_with(&etcd.endpoint(), routes, &[], &env).await
}

async fn client(port: u16) -> EchoClient<Channel> {
    EchoClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect to the gateway")
}

fn unary(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn unary_calls_reach_both_replicas_with_the_gateways_metadata() {
    let stage = Stage::start().await;
    let mut client = stage.client().await;
    let mut served_by = std::collections::BTreeSet::new();
    for n in 0..10 {
        let mut request = tonic::Request::new(unary(&format!("hello {n}")));
        request
            .metadata_mut()
            .insert("x-request-id", format!("grpc-{n}").parse().unwrap());
        let reply = client.unary(request).await.expect("a unary call");
        let request_id = reply
            .metadata()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_string());
        let reply = reply.into_inner();
        assert_eq!(reply.message, format!("hello {n}"));
        assert_eq!(request_id.as_deref(), Some(format!("grpc-{n}").as_str()));
        // The replica saw the call as the gateway sent it: the request id, and not the key.
        assert!(
            reply.metadata.contains(&format!("x-request-id: grpc-{n}")),
            "{:?}",
            reply.metadata
        );
        assert!(
            reply
                .metadata
                .iter()
                .any(|m| m.starts_with("traceparent: ")),
            "{:?}",
            reply.metadata
        );
        served_by.insert(reply.served_by);
    }
    let expected: std::collections::BTreeSet<String> = stage
        .replicas
        .iter()
        .map(|(_, port)| format!("127.0.0.1:{port}"))
        .collect();
    assert_eq!(served_by, expected, "round robin over both replicas");

    // A third replica without an RPC port serves HTTP, and takes no gRPC call.
    let http_only_port = free_port();
    let _http_only = Goms::service(&stage.etcd, http_only_port, &[]);
    wait_for_nodes(stage.gateway.port(), "user", 3).await;
    for _ in 0..6 {
        let reply = client.unary(unary("again")).await.expect("a unary call");
        let served_by = reply.into_inner().served_by;
        assert!(expected.contains(&served_by), "{served_by}");
    }
    let mut http_answers_from = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let response = support::http()
            .get(format!(
                "http://127.0.0.1:{}/api/user/login",
                stage.gateway.port()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let served_by = response.headers()["x-served-by"]
            .to_str()
            .unwrap()
            .to_string();
        http_answers_from.insert(served_by);
    }
    assert!(
        http_answers_from.contains(&format!("127.0.0.1:{http_only_port}")),
        "{http_answers_from:?}"
    );

    // A status the replica answers with reaches the client as it was sent.
    let failing = EchoRequest {
        message: "fail".into(),
        fail_with: Code::FailedPrecondition as i32,
        ..Default::default()
    };
    let status = client.unary(failing).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "failed as asked");
}

#[tokio::test]
async fn a_server_stream_of_ten_thousand_messages_arrives_whole_and_in_order() {
    let stage = Stage::start().await;
    let mut client = stage.client().await;
    let request = StreamRequest {
        message: "tick".into(),
        count: 10_000,
        interval_ms: 0,
    };
    let mut stream = client
        .server_stream(request)
        .await
        .expect("the stream starts")
        .into_inner();
    let mut received = 0u64;
    while let Some(reply) = stream.message().await.expect("every message arrives") {
        assert_eq!(reply.sequence, received);
        assert_eq!(reply.message, "tick");
        received += 1;
    }
    assert_eq!(received, 10_000);
}

#[tokio::test]
async fn the_gateways_own_answers_are_grpc_statuses() {
    let stage = Stage::start().await;

    // No service lists the gRPC service: UNIMPLEMENTED, with what was looked for.
    let unknown = tonic::Request::new(unary("x"));
    let mut grpc = tonic::client::Grpc::new(
        Channel::from_shared(format!("http://127.0.0.1:{}", stage.gateway.port()))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    grpc.ready().await.unwrap();
    let codec =
        tonic_prost::ProstCodec::<EchoRequest, goms::service::rpc::echo_v1::EchoReply>::default();
    let status = grpc
        .unary(
            unknown,
            "/goms.nowhere.v1.Echo/Unary".parse().unwrap(),
            codec.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(
        status.message().contains("goms.nowhere.v1.Echo"),
        "{status:?}"
    );

    // A package prefix routes to a service with no replica: UNAVAILABLE.
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(unary("x")),
            "/goms.ghost.v1.Ghost/Call".parse().unwrap(),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("ghost"), "{status:?}");

    // The call's own deadline: it asks for 300 ms, the replica would take 3 s.
    let slow = EchoRequest {
        message: "slow".into(),
        delay_ms: 3_000,
        ..Default::default()
    };
    let port = stage.gateway.port();
    let (status, _message, took) = raw_unary(port, "/goms.echo.v1.Echo/Unary", &slow, "300m").await;
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    assert!(
        took < Duration::from_secs(2),
        "the deadline ended the call: {took:?}"
    );

    // The route's timeout caps a longer deadline (10 s asked, gateway.upstreamTimeout 300ms).
    let (_routes_folder, routes) = route_file(GRPC_ROUTES);
    let short = gateway(
        &stage.etcd,
        &routes,
        &[("GOMS__GATEWAY__UPSTREAM_TIMEOUT", "300ms")],
    )
    .await;
    wait_for_nodes(short.port(), "user", 2).await;
    let mut capped = tonic::Request::new(slow);
    capped.set_timeout(Duration::from_secs(10));
    let started = Instant::now();
    let status = client_of(&short).await.unary(capped).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A gateway with the wrong key: the replica refuses it, and the client reads why.
    let (_routes_folder, routes) = route_file(GRPC_ROUTES);
    let wrong_key = gateway(
        &stage.etcd,
        &routes,
        &[("GOMS__CALL_SERVICE_KEY", "not-the-shared-key")],
    )
    .await;
    wait_for_nodes(wrong_key.port(), "user", 2).await;
    let status = client_of(&wrong_key)
        .await
        .unary(unary("x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

async fn client_of(gateway: &Goms) -> EchoClient<Channel> {
    client(gateway.port()).await
}

/// A unary call made by hand over h2c, as a client without a timer of its own sends it
/// (tonic's client ends a call at its `grpc-timeout` itself): the `grpc-status` and
/// `grpc-message` it ended with, and how long it took.
async fn raw_unary(
    port: u16,
    path: &str,
    request: &EchoRequest,
    grpc_timeout: &str,
) -> (String, String, Duration) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let head = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .body(())
        .unwrap();
    let started = Instant::now();
    let (response, mut body) = h2.send_request(head, false).unwrap();
    let message = prost::Message::encode_to_vec(request);
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    body.send_data(frame.into(), true).unwrap();
    let (head, mut answer) = response.await.unwrap().into_parts();
    let mut ended_with = head.headers;
    if !ended_with.contains_key("grpc-status") {
        while let Some(chunk) = answer.data().await {
            chunk.unwrap();
        }
        ended_with = answer.trailers().await.unwrap().expect("trailers");
    }
    let text = |name: &str| {
        ended_with
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (text("grpc-status"), text("grpc-message"), started.elapsed())
}

#[tokio::test]
async fn a_replica_killed_mid_stream_ends_the_call_unavailable_not_hanging() {
    let mut stage = Stage::start().await;
    let mut client = stage.client().await;
    let request = StreamRequest {
        message: "slow tick".into(),
        count: 1_000,
        interval_ms: 20,
    };
    let mut stream = client
        .server_stream(request)
        .await
        .expect("the stream starts")
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first message");
    let serving = stage
        .replicas
        .iter_mut()
        .find(|(_, port)| first.served_by == format!("127.0.0.1:{port}"))
        .expect("the serving replica is one of the two");
    serving.0.kill();

    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Err("the stream ended as if complete".to_string()),
                Err(status) => return Ok(status),
            }
        }
    })
    .await
    .expect("the call ended within 10 s of the kill");
    let status = ended.unwrap();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // The other replica takes the next call.
    let reply = client.unary(unary("after")).await.expect("a unary call");
    assert_ne!(reply.into_inner().served_by, first.served_by);
}

#[tokio::test]
async fn a_calls_trace_events_carry_its_method_and_grpc_status() {
    let broker = RabbitMq::start().await;
    let es = EsStandIn::start().await;
    let _consumer = consumer("consumer", &broker, &es.url(), &[]);
    let amqp = broker.url();
    let stage = Stage::start_with(&[("GOMS__AMQP_ADDR", &amqp)]).await;
    let mut client = stage.client().await;
    for (request_id, fail_with) in [("grpc-trace-ok", 0), ("grpc-trace-failed", 9)] {
        let mut request = tonic::Request::new(EchoRequest {
            message: "traced".into(),
            fail_with,
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("x-request-id", request_id.parse().unwrap());
        let _ = client.unary(request).await;
    }
    for (request_id, status) in [("grpc-trace-ok", 0), ("grpc-trace-failed", 9)] {
        eventually(
            &format!("the gateway's two events of {request_id}"),
            Duration::from_secs(30),
            || {
                let es = es.clone();
                async move { es.by_request(request_id).len() == 2 }
            },
        )
        .await;
        let documents = es.by_request(request_id);
        let end = documents
            .iter()
            .map(|(_, _, doc)| doc)
            .find(|doc| doc["event"] == "request.end")
            .expect("a request.end event");
        assert_eq!(end["grpc"]["method"], "/goms.echo.v1.Echo/Unary", "{end}");
        assert_eq!(end["grpc"]["status"], status, "{end}");
        assert_eq!(end["status"], 200, "{end}");
    }
}
