use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use nerve::{
    Backends,
    event::{Selection, StoredEvent},
    store::{
        AuditQuery, AuditRecord, DeadLetter, EventStore, EventTypeStats, NewEvent, Publisher,
        Queued, ReadPage, ReadQuery, StoreError, StoreResult,
    },
};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::harness::*;

/// A store that stops answering on command, as a database that went away does.
struct FlakyStore {
    inner: Arc<dyn EventStore>,
    down: Arc<AtomicBool>,
}

impl FlakyStore {
    fn check(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "connection refused (injected)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl EventStore for FlakyStore {
    async fn queue(&self, tenant: &str, events: Vec<NewEvent>) -> StoreResult<Queued> {
        self.check()?;
        self.inner.queue(tenant, events).await
    }
    async fn read(&self, query: &ReadQuery) -> StoreResult<ReadPage> {
        self.check()?;
        self.inner.read(query).await
    }
    async fn read_sequences(&self, sequences: &[u64]) -> StoreResult<Vec<Arc<StoredEvent>>> {
        self.check()?;
        self.inner.read_sequences(sequences).await
    }
    async fn read_all(&self, after: u64, limit: usize) -> StoreResult<Vec<Arc<StoredEvent>>> {
        self.check()?;
        self.inner.read_all(after, limit).await
    }
    async fn find(
        &self,
        tenant: &str,
        id: &str,
        source: Option<&str>,
    ) -> StoreResult<Vec<Arc<StoredEvent>>> {
        self.check()?;
        self.inner.find(tenant, id, source).await
    }
    async fn head(&self) -> StoreResult<u64> {
        self.check()?;
        self.inner.head().await
    }
    async fn sequence_before(&self, time: DateTime<Utc>) -> StoreResult<u64> {
        self.check()?;
        self.inner.sequence_before(time).await
    }
    async fn count_after(
        &self,
        tenant: &str,
        after: [u64; 4],
        selection: &Selection,
    ) -> StoreResult<u64> {
        self.check()?;
        self.inner.count_after(tenant, after, selection).await
    }
    async fn event_types(&self, tenant: &str) -> StoreResult<Vec<EventTypeStats>> {
        self.check()?;
        self.inner.event_types(tenant).await
    }
    async fn put_dead_letter(&self, dl: &DeadLetter) -> StoreResult<()> {
        self.check()?;
        self.inner.put_dead_letter(dl).await
    }
    async fn dead_letters(
        &self,
        tenant: &str,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<DeadLetter>> {
        self.check()?;
        self.inner.dead_letters(tenant, group, after, limit).await
    }
    async fn dead_letter_counts(&self, tenant: &str) -> StoreResult<Vec<(String, u64)>> {
        self.check()?;
        self.inner.dead_letter_counts(tenant).await
    }
    async fn remove_dead_letters(
        &self,
        tenant: &str,
        group: &str,
        sequences: &[u64],
    ) -> StoreResult<u64> {
        self.check()?;
        self.inner
            .remove_dead_letters(tenant, group, sequences)
            .await
    }
    async fn clear_dead_letters(&self, tenant: &str, group: &str) -> StoreResult<u64> {
        self.check()?;
        self.inner.clear_dead_letters(tenant, group).await
    }
    async fn insert_publisher(&self, publisher: &Publisher) -> StoreResult<bool> {
        self.check()?;
        self.inner.insert_publisher(publisher).await
    }
    async fn update_publisher(&self, publisher: &Publisher) -> StoreResult<bool> {
        self.check()?;
        self.inner.update_publisher(publisher).await
    }
    async fn remove_publisher(&self, tenant: &str, principal: &str) -> StoreResult<bool> {
        self.check()?;
        self.inner.remove_publisher(tenant, principal).await
    }
    async fn publishers(&self) -> StoreResult<Vec<Publisher>> {
        self.check()?;
        self.inner.publishers().await
    }
    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
        self.check()?;
        self.inner.append_audit(records).await
    }
    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        self.check()?;
        self.inner.audit(query).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.check()?;
        self.inner.ping().await
    }
    fn committed(&self) -> watch::Receiver<u64> {
        self.inner.committed()
    }
}

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
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let real = nerve::open_backends(&config).await.expect("backends");
    let down = Arc::new(AtomicBool::new(false));
    let store: Arc<dyn EventStore> = Arc::new(FlakyStore {
        inner: real.store.clone(),
        down: down.clone(),
    });
    let server = TestServer::start_on(
        config,
        Backends {
            store,
            streams: real.streams,
        },
        dir,
    )
    .await;
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
    down.store(true, Ordering::SeqCst);
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    let mut bus = server.bus();
    let result = bus
        .publish(nerve::api::pb::PublishRequest {
            events: vec![event("while-down", "a.b")],
        })
        .await;
    assert_status(result, Code::Unavailable, "unavailable");
    down.store(false, Ordering::SeqCst);
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    publish(&mut bus, vec![event("after", "a.b")]).await;
}
