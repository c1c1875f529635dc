//! Helpers of the bus' unit tests: a bus on a fresh embedded store, a group member, an event.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;

use super::{
    Bus, BusResult,
    subscription::{Command, Outbound, Start, SubscribeSpec},
};
use crate::event::Selection;

/// A bus on a fresh embedded store: the bus, its shutdown token, its streams and the directory.
pub(crate) async fn embedded_bus() -> (
    Arc<Bus>,
    tokio_util::sync::CancellationToken,
    Arc<crate::stream::EmbeddedStreams>,
    tempfile::TempDir,
) {
    use crate::{
        store::{EventStore, SqliteStore},
        stream::{EmbeddedStreams, LiveStreams},
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::started(&dir.path().join("t.db")).await;
    let streams = EmbeddedStreams::start(store.clone())
        .await
        .expect("streams");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let bus = Bus::start(
        store.clone() as Arc<dyn EventStore>,
        streams.clone() as Arc<dyn LiveStreams>,
        crate::event::Limits::default(),
        crate::bus::BusSettings::default(),
        shutdown.clone(),
    );
    (bus, shutdown, streams, dir)
}

/// A member of a group: what it sends, and what it receives.
pub(crate) type Member = (
    futures::channel::mpsc::UnboundedSender<BusResult<Command>>,
    mpsc::Receiver<BusResult<Outbound>>,
);

/// Opens a member of group "g" of type "job" on `bus`, from the earliest event.
pub(crate) async fn join_g(
    bus: &Arc<Bus>,
    max_in_flight: Option<u32>,
    heartbeat: Option<Duration>,
) -> Member {
    let spec = group_g_spec(max_in_flight, heartbeat);
    let (send, received) = futures::channel::mpsc::unbounded();
    let out = bus.subscribe(spec, received).await.expect("subscribe");
    (send, out)
}

/// The open of a member of group "g" of type "job", from the earliest event, by a caller that may
/// read history.
pub(crate) fn group_g_spec(
    max_in_flight: Option<u32>,
    heartbeat: Option<Duration>,
) -> SubscribeSpec {
    SubscribeSpec {
        tenant: "t".into(),
        selection: Selection {
            types: vec![crate::event::TypePattern::parse("job").expect("pattern")],
            filter: None,
        },
        group: Some("g".into()),
        start: Start::Earliest,
        max_in_flight,
        ack_deadline: None,
        max_attempts: None,
        heartbeat,
        may_read_history: true,
    }
}

/// An event of type "job" with `data_bytes` of data.
pub(crate) fn job(id: &str, data_bytes: usize) -> crate::event::Event {
    crate::event::Event {
        id: id.into(),
        source: "test".into(),
        event_type: "job".into(),
        spec_version: "1.0".into(),
        data: crate::event::Data::Binary(vec![0; data_bytes]),
        ..Default::default()
    }
}
