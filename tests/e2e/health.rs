use std::sync::atomic::Ordering;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{harness::*, injected_store::start_injected};

async fn status_of(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> ServingStatus {
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("check")
        .into_inner();
    ServingStatus::try_from(response.status).expect("known status")
}

/// Health checks need no credentials, so one larger than a service name is refused when its length
/// arrives, before the server holds room for it (a caller could otherwise hold 4 MiB per stream).
#[tokio::test]
async fn a_health_check_larger_than_a_service_name_is_refused() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel.clone());
    let large = health
        .check(HealthCheckRequest {
            service: "x".repeat(64 * 1024),
        })
        .await
        .expect_err("a 64 KiB service name");
    assert_eq!(large.code(), Code::ResourceExhausted, "{large:?}");
    // the connection stays usable
    status_of(&mut health, "").await;
}

#[tokio::test]
async fn health_is_serving_per_service_and_reflection_lists_services() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in ["", "nerve.v1.EventBus", "nerve.v1.Admin"] {
        let status = eventually("serving", || {
            let mut health = health.clone();
            async move {
                (status_of(&mut health, service).await == ServingStatus::Serving).then_some(())
            }
        });
        status.await;
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await;
    assert_eq!(unknown.expect_err("unknown service").code(), Code::NotFound);

    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(server.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected {response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "nerve.v1.EventBus",
        "nerve.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn health_turns_not_serving_while_the_store_is_down_and_recovers() {
    let (server, injection) = start_injected().await;
    let mut health = HealthClient::new(server.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "nerve.v1.EventBus".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    async fn next_status(
        watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    ) -> ServingStatus {
        let message = tokio::time::timeout(WAIT, watch.next())
            .await
            .expect("status in time")
            .expect("stream open")
            .expect("ok");
        ServingStatus::try_from(message.status).expect("known")
    }
    let mut status = next_status(&mut watch).await;
    while status != ServingStatus::Serving {
        status = next_status(&mut watch).await;
    }
    injection.down.store(true, Ordering::SeqCst);
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    // without its store a replica takes no publishes: not ready; but a restart would not help it
    assert_eq!(
        status_of(&mut health, nerve::api::READINESS).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        status_of(&mut health, nerve::api::LIVENESS).await,
        ServingStatus::Serving
    );
    let mut bus = server.bus();
    let result = bus
        .publish(nerve::api::pb::PublishRequest {
            events: vec![event("while-down", "a.b")],
        })
        .await;
    assert_status(result, Code::Unavailable, "unavailable");
    injection.down.store(false, Ordering::SeqCst);
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    assert_eq!(
        status_of(&mut health, nerve::api::READINESS).await,
        ServingStatus::Serving
    );
    publish(&mut bus, vec![event("after", "a.b")]).await;
}

/// A drain makes the server not ready at once, also while a backend check hangs (a store that takes
/// connections and never answers): not when the check gives up, a whole interval later.
#[tokio::test]
async fn a_drain_is_not_held_up_by_a_backend_check_that_hangs() {
    let (server, injection) = crate::injected_store::start_injected_with(|c| {
        c.health_check_interval = std::time::Duration::from_secs(8)
    })
    .await;
    let mut health = HealthClient::new(server.channel.clone());
    // the first check answered: ready
    eventually("ready", || async {
        let mut health = HealthClient::new(server.channel.clone());
        (status_of(&mut health, nerve::api::READINESS).await == ServingStatus::Serving)
            .then_some(())
    })
    .await;
    // the next one (an interval later) hangs in the store until the check's own timeout
    let (reached, go) = injection.before_ping.arm();
    reached.wait("the next backend check").await;
    server.drain();
    // the hanging check gives up at its timeout, the interval (8 s): half of it is "at once" enough
    tokio::time::timeout(std::time::Duration::from_secs(4), async {
        loop {
            let mut health = health.clone();
            if status_of(&mut health, nerve::api::READINESS).await == ServingStatus::NotServing {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("not ready only once the hanging check gave up");
    drop(go);
    assert_eq!(
        status_of(&mut health, nerve::api::LIVENESS).await,
        ServingStatus::Serving
    );
}

/// A reflection stream the client keeps open (grpcui, a reflection client kept for a session)
/// ends with UNAVAILABLE at shutdown instead of holding the server's stop.
#[tokio::test]
async fn an_open_reflection_stream_ends_unavailable_at_shutdown() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let server = TestServer::start().await;
    let mut reflection = ServerReflectionClient::new(server.channel.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    })
    .await
    .expect("queue");
    let mut responses = reflection
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("reflection")
        .into_inner();
    responses.next().await.expect("a response").expect("ok");
    // the request side stays open (tx is kept)
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("the server stops with a reflection stream open");
    let end = responses
        .next()
        .await
        .expect("the stream ends with a status")
        .expect_err("ended by the shutdown");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    drop(tx);
}
