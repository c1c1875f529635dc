//! Delivery-state calls of the live streams, run unchanged against both implementations: embedded
//! (SQLite) and Redis over Postgres, through the `LiveStreams` trait. Each test works in a store,
//! schema and key prefix of its own, so they run in parallel.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use nerve::{
    event::{Event, Priority, Selection, TypePattern},
    store::{EventStore, NewEvent, PostgresStore, ReadQuery, SqliteDb, SqliteStore},
    stream::{EmbeddedStreams, GroupConfig, GroupKey, LiveStreams, RedisSettings, RedisStreams},
};

use crate::harness::{WAIT, fresh_schema_url, redis_url};

/// Live streams plus the store they read and whatever must live as long as they do.
struct Backend {
    store: Arc<dyn EventStore>,
    streams: Arc<dyn LiveStreams>,
    _dir: Option<tempfile::TempDir>,
}

async fn embedded() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteDb::open(&dir.path().join("nerve.db"))
        .await
        .expect("open sqlite");
    let store = SqliteStore::start(db).await.expect("start store");
    Backend {
        streams: EmbeddedStreams::start(store.clone())
            .await
            .expect("start streams"),
        store,
        _dir: Some(dir),
    }
}

async fn redis() -> Backend {
    let store = PostgresStore::connect(&fresh_schema_url().await, 8)
        .await
        .expect("connect postgres store");
    let settings = RedisSettings {
        url: redis_url(),
        key_prefix: format!("nerve-test:{}", uuid::Uuid::new_v4().simple()),
        stream_max_len: 100_000,
        inbox_ttl: Duration::from_secs(60),
    };
    Backend {
        streams: RedisStreams::start(&settings, store.clone())
            .await
            .expect("start redis streams"),
        store,
        _dir: None,
    }
}

/// Stores `n` events of type "job", hands them to the streams and waits until groups can claim them;
/// returns group "g" of tenant "t" (created from the start) with every event claimed by member "a",
/// and the lease end.
async fn all_claimed(b: &Backend, n: usize) -> (GroupKey, DateTime<Utc>) {
    let events = (0..n)
        .map(|i| {
            let event = Event {
                id: format!("e{i}"),
                source: "//conformance".into(),
                event_type: "job".into(),
                spec_version: "1.0".into(),
                ..Event::default()
            };
            let hash = event.content_hash();
            NewEvent::new(event, hash)
        })
        .collect();
    b.store.append("t", events).await.expect("append");
    let stored = b
        .store
        .read(&ReadQuery {
            tenant: "t".into(),
            limit: n,
            ..ReadQuery::default()
        })
        .await
        .expect("read");
    let key = GroupKey {
        tenant: "t".into(),
        name: "g".into(),
    };
    let config = GroupConfig {
        selection: Selection {
            types: vec![TypePattern::parse("job").expect("pattern")],
            filter: None,
        },
        max_attempts: 5,
    };
    b.streams
        .ensure_group(&key, &config, 0)
        .await
        .expect("group");
    let mut claimable = b.streams.group_head();
    b.streams.append(&stored.events).await.expect("tail");
    let last = stored.events.last().map_or(0, |e| e.sequence);
    tokio::time::timeout(WAIT, claimable.wait_for(|head| *head >= last))
        .await
        .expect("the events became claimable in time")
        .expect("group head open");
    let lease = Utc::now() + chrono::Duration::seconds(30);
    let claimed = b
        .streams
        .claim_new(&key, "a", Priority::Normal, 100, lease)
        .await
        .expect("claim")
        .entries;
    assert_eq!(claimed.len(), n);
    (key, lease)
}

/// Claims what is due for member "b": (sequence, attempt), sorted.
async fn claim_due(b: &Backend, key: &GroupKey, lease: DateTime<Utc>) -> Vec<(u64, u32)> {
    let mut due: Vec<(u64, u32)> = b
        .streams
        .claim_due(key, "b", 100, lease)
        .await
        .expect("claim due")
        .iter()
        .map(|c| (c.sequence, c.attempt))
        .collect();
    due.sort();
    due
}

async fn a_release_of_deliveries_never_sent_takes_their_attempt_back(b: Backend) {
    let (key, lease) = all_claimed(&b, 3).await;
    // 1 was sent and comes back (an attempt), 2 was never sent (a first attempt), 3 stays leased; an
    // attempt that is not current moves nothing
    let released = b
        .streams
        .set_visible_at(&key, &[(1, 1)], Utc::now(), None)
        .await
        .expect("release");
    assert_eq!(released, [true]);
    let unsent = b
        .streams
        .release_unsent(&key, &[(2, 1), (3, 2)])
        .await
        .expect("release unsent");
    assert_eq!(unsent, [true, false]);
    assert_eq!(claim_due(&b, &key, lease).await, [(1, 2), (2, 1)]);
    // a later attempt never sent is taken back too: the next claim makes it again
    let unsent = b
        .streams
        .release_unsent(&key, &[(1, 2)])
        .await
        .expect("release unsent");
    assert_eq!(unsent, [true]);
    assert_eq!(claim_due(&b, &key, lease).await, [(1, 2)]);
    assert_eq!(
        pending(&b, &key).await,
        3,
        "each entry counted once, wherever it moved"
    );
    // and only the current attempt settles it
    let acked = b
        .streams
        .ack(&key, &[(1, 1), (1, 2), (2, 1), (3, 1)])
        .await
        .expect("ack");
    assert_eq!(acked, [false, true, true, true]);
    assert_eq!(pending(&b, &key).await, 0);
}

/// The group's pending entries, as ListGroups reports them.
async fn pending(b: &Backend, key: &GroupKey) -> u64 {
    b.streams
        .groups(&key.tenant, std::slice::from_ref(&key.name))
        .await
        .expect("groups")[0]
        .pending
}

#[tokio::test]
async fn embedded_release_of_deliveries_never_sent_takes_their_attempt_back() {
    a_release_of_deliveries_never_sent_takes_their_attempt_back(embedded().await).await;
}

#[tokio::test]
async fn redis_release_of_deliveries_never_sent_takes_their_attempt_back() {
    a_release_of_deliveries_never_sent_takes_their_attempt_back(redis().await).await;
}
