//! Delivery-state calls of the live streams, run unchanged against both implementations: embedded
//! (SQLite) and Redis over Postgres, through the `LiveStreams` trait. Each test works in a store,
//! schema and key prefix of its own, so they run in parallel.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use nerve::{
    event::{Event, Priority, Selection, TypePattern},
    store::{EventStore, NewEvent, PostgresStore, ReadQuery, SqliteDb, SqliteStore},
    stream::{
        EmbeddedStreams, GroupConfig, GroupKey, Inbox, Interest, LiveStreams, RedisSettings,
        RedisStreams,
    },
};
use redis::AsyncCommands;

use crate::harness::{WAIT, eventually, fresh_schema_url, redis_url};

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
    redis_with_prefix().await.0
}

/// A Redis backend and the prefix of its keys.
async fn redis_with_prefix() -> (Backend, String) {
    let (store, prefix) = redis_deployment().await;
    (redis_replica(store, &prefix).await, prefix)
}

/// A store of its own and a key prefix of its own, for the replicas of one deployment.
async fn redis_deployment() -> (Arc<PostgresStore>, String) {
    let store = PostgresStore::connect(&fresh_schema_url().await, 8)
        .await
        .expect("connect postgres store");
    (
        store,
        format!("nerve-test:{}", uuid::Uuid::new_v4().simple()),
    )
}

/// A replica of a deployment: Redis streams of its own over the deployment's store and keys.
async fn redis_replica(store: Arc<PostgresStore>, prefix: &str) -> Backend {
    Backend {
        streams: redis_streams(store.clone(), prefix).await,
        store,
        _dir: None,
    }
}

/// The Redis streams of a replica, as their own type.
async fn redis_streams(store: Arc<PostgresStore>, prefix: &str) -> Arc<RedisStreams> {
    let settings = RedisSettings {
        url: redis_url(),
        key_prefix: prefix.to_owned(),
        stream_max_len: 100_000,
        inbox_ttl: Duration::from_secs(60),
        // a stream wrongly passed over as quiet stays so for the whole test
        quiet_ttl: Duration::from_secs(3600),
    };
    RedisStreams::start(&settings, store)
        .await
        .expect("start redis streams")
}

/// Stores events of tenant "t" (id, type), hands them to the streams and waits until groups can
/// claim them; returns their sequences.
async fn stored(b: &Backend, events: &[(String, &str)]) -> Vec<u64> {
    let events = events
        .iter()
        .map(|(id, event_type)| Event {
            id: id.clone(),
            source: "//conformance".into(),
            event_type: (*event_type).into(),
            spec_version: "1.0".into(),
            ..Event::default()
        })
        .collect();
    stored_events(b, events).await
}

/// Stores events of tenant "t" as [`stored`] does.
async fn stored_events(b: &Backend, events: Vec<Event>) -> Vec<u64> {
    let before = b.store.head().await.expect("head");
    let new: Vec<NewEvent> = events
        .into_iter()
        .map(|event| {
            let hash = event.content_hash();
            NewEvent::new(event, hash)
        })
        .collect();
    let count = new.len();
    b.store.append("t", new).await.expect("append");
    let stored = b
        .store
        .read(&ReadQuery {
            tenant: "t".into(),
            after: before,
            limit: count,
            ..ReadQuery::default()
        })
        .await
        .expect("read");
    assert_eq!(stored.events.len(), count);
    let mut claimable = b.streams.group_head();
    b.streams.append(&stored.events).await.expect("tail");
    let last = stored.events.last().map_or(0, |e| e.sequence);
    tokio::time::timeout(WAIT, claimable.wait_for(|head| *head >= last))
        .await
        .expect("the events became claimable in time")
        .expect("group head open");
    stored.events.iter().map(|e| e.sequence).collect()
}

/// Creates group `name` of tenant "t" over `types`, from the start.
async fn group(b: &Backend, name: &str, types: &[&str]) -> GroupKey {
    let key = GroupKey {
        tenant: "t".into(),
        name: name.into(),
    };
    b.streams
        .ensure_group(&key, &group_config(types), 0)
        .await
        .expect("group");
    key
}

/// A group of `types`, no filter, five attempts.
fn group_config(types: &[&str]) -> GroupConfig {
    GroupConfig {
        selection: Selection {
            types: types
                .iter()
                .map(|t| TypePattern::parse(t).expect("pattern"))
                .collect(),
            filter: None,
        },
        max_attempts: 5,
    }
}

/// Stores `n` events of type "job" and hands them to the streams; returns group "g" (created from
/// the start) with every event claimed by member "a", and the lease end.
async fn all_claimed(b: &Backend, n: usize) -> (GroupKey, DateTime<Utc>) {
    let key = group(b, "g", &["job"]).await;
    let events: Vec<(String, &str)> = (0..n).map(|i| (format!("e{i}"), "job")).collect();
    stored(b, &events).await;
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

/// Within a level, what has been due longest is claimed first: one entry failing again at once (a
/// poison event nacked without delay) does not keep another type's due entry behind it.
async fn a_due_entry_is_not_passed_over_by_one_failing_again(b: Backend) {
    let key = group(&b, "g", &["a", "b"]).await;
    let [a1, b1] = stored(&b, &[("a1".into(), "a"), ("b1".into(), "b")]).await[..] else {
        panic!("two events")
    };
    let lease = Utc::now() + chrono::Duration::seconds(30);
    let new = b
        .streams
        .claim_new(&key, "m", Priority::Normal, 10, lease)
        .await
        .expect("claim new");
    assert_eq!(new.entries.len(), 2);
    // b1 (the later sequence, the other type) has been due longer
    let due_since = |secs| Utc::now() - chrono::Duration::seconds(secs);
    for (seq, since) in [(b1, 2), (a1, 1)] {
        b.streams
            .set_visible_at(&key, &[(seq, 1)], due_since(since), Some("x"))
            .await
            .expect("nack");
    }
    let mut handed = Vec::new();
    for _ in 0..2 {
        let claimed = b
            .streams
            .claim_due(&key, "m", 1, lease)
            .await
            .expect("claim due");
        let [c] = &claimed[..] else {
            panic!("one due entry: {claimed:?}")
        };
        handed.push(c.sequence);
        // it fails again at once: due now, after the other
        b.streams
            .set_visible_at(&key, &[(c.sequence, c.attempt)], Utc::now(), Some("x"))
            .await
            .expect("nack");
    }
    assert_eq!(
        handed,
        [b1, a1],
        "the entry due longest first, then the other"
    );
}

#[tokio::test]
async fn embedded_a_due_entry_is_not_passed_over_by_one_failing_again() {
    a_due_entry_is_not_passed_over_by_one_failing_again(embedded().await).await;
}

#[tokio::test]
async fn redis_a_due_entry_is_not_passed_over_by_one_failing_again() {
    a_due_entry_is_not_passed_over_by_one_failing_again(redis().await).await;
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

/// Claims at most `max` new entries for member "a" and acks them; returns their sequences, sorted.
async fn claim_and_ack(b: &Backend, key: &GroupKey, max: usize) -> Vec<u64> {
    let lease = Utc::now() + chrono::Duration::seconds(30);
    let mut claimed: Vec<u64> = b
        .streams
        .claim_new(key, "a", Priority::Normal, max, lease)
        .await
        .expect("claim")
        .entries
        .iter()
        .map(|c| c.sequence)
        .collect();
    claimed.sort_unstable();
    let deliveries: Vec<(u64, u32)> = claimed.iter().map(|s| (*s, 1)).collect();
    let acked = b.streams.ack(key, &deliveries).await.expect("ack");
    assert!(acked.iter().all(|a| *a), "{acked:?}");
    claimed
}

/// A group over several types (on Redis, a stream each) whose claims found its streams with nothing
/// new still gets what comes to any of them later, and a group created again under the name gets
/// everything from its start. (Redis passes over streams it found quiet; these tests' servers trust
/// such a mark for an hour, so a mark wrongly kept fails them.)
async fn a_group_claims_what_comes_to_streams_it_found_quiet(b: Backend) {
    let ev = |id: &str, t: &'static str| (id.to_owned(), t);
    let types = ["q.>"];
    let key = group(&b, "g", &types).await;
    let mut all = stored(
        &b,
        &[
            ev("a1", "q.a"),
            ev("a2", "q.a"),
            ev("b1", "q.b"),
            ev("b2", "q.b"),
        ],
    )
    .await;
    // every stream has something: a claim that stops at its first entry leaves the rest to the next
    let first = claim_and_ack(&b, &key, 1).await;
    assert_eq!(first.len(), 1);
    let rest = claim_and_ack(&b, &key, 100).await;
    assert_eq!(rest.len(), 3, "after {first:?}");
    let later = stored(&b, &[ev("c1", "q.c")]).await;
    assert_eq!(claim_and_ack(&b, &key, 100).await, later);
    all.extend(later);
    assert_eq!(claim_and_ack(&b, &key, 100).await, [0u64; 0], "nothing new");
    // opened again: the marks go, and the next claim asks every stream, which all have nothing new
    group(&b, "g", &types).await;
    assert_eq!(claim_and_ack(&b, &key, 100).await, [0u64; 0], "nothing new");
    for later in [
        vec![ev("b3", "q.b")],
        vec![ev("c2", "q.c"), ev("a3", "q.a")],
    ] {
        let later = stored(&b, &later).await;
        assert_eq!(claim_and_ack(&b, &key, 100).await, later);
        all.extend(later);
    }
    all.sort_unstable();
    assert!(b.streams.delete_group(&key).await.expect("delete"));
    let key = group(&b, "g", &types).await;
    assert_eq!(
        claim_and_ack(&b, &key, 100).await,
        all,
        "the new group from its start"
    );
}

#[tokio::test]
async fn embedded_group_claims_what_comes_to_streams_it_found_quiet() {
    a_group_claims_what_comes_to_streams_it_found_quiet(embedded().await).await;
}

#[tokio::test]
async fn redis_group_claims_what_comes_to_streams_it_found_quiet() {
    a_group_claims_what_comes_to_streams_it_found_quiet(redis().await).await;
}

/// A member's selection change reaches only the group it joined: after that group was deleted and
/// created again under its name with other types, the change is refused as the group being gone,
/// and the new group keeps its types (its members receive no type they were not checked for).
async fn a_selection_change_does_not_reach_a_group_made_again(b: Backend) {
    let config = group_config;
    let key = GroupKey {
        tenant: "t".into(),
        name: "remade".into(),
    };
    let old = b
        .streams
        .ensure_group(&key, &config(&["task.>"]), 0)
        .await
        .expect("group");
    assert!(b.streams.delete_group(&key).await.expect("delete"));
    let new = b
        .streams
        .ensure_group(&key, &config(&["plan.>"]), 0)
        .await
        .expect("group made again");
    assert_ne!(old.created_ns, new.created_ns);
    let stale = b
        .streams
        .set_group_selection(&key, old.created_ns, &config(&["task.>"]).selection)
        .await;
    assert!(
        matches!(stale, Err(nerve::stream::StreamError::NoSuchGroup(_))),
        "{stale:?}"
    );
    b.streams
        .ensure_group(&key, &config(&["plan.>"]), 0)
        .await
        .expect("the new group keeps its types");
    b.streams
        .set_group_selection(&key, new.created_ns, &config(&["plan.>"]).selection)
        .await
        .expect("its own member's change");
}

#[tokio::test]
async fn embedded_selection_change_does_not_reach_a_group_made_again() {
    a_selection_change_does_not_reach_a_group_made_again(embedded().await).await;
}

#[tokio::test]
async fn redis_selection_change_does_not_reach_a_group_made_again() {
    a_selection_change_does_not_reach_a_group_made_again(redis().await).await;
}

/// A redrive puts letters back only into the group it read them from: after that group was deleted
/// and created again under its name, its requeue is refused as the group being gone, and the new
/// group has nothing due.
async fn a_requeue_does_not_reach_a_group_made_again(b: Backend) {
    let key = GroupKey {
        tenant: "t".into(),
        name: "redriven".into(),
    };
    let old = b
        .streams
        .ensure_group(&key, &group_config(&["job"]), 0)
        .await
        .expect("group");
    let seqs = stored(&b, &[("j1".to_owned(), "job")]).await;
    let events = b.store.read_sequences(&seqs).await.expect("read");
    assert!(b.streams.delete_group(&key).await.expect("delete"));
    // made again past the event, which it never gets
    let new = b
        .streams
        .ensure_group(&key, &group_config(&["job"]), seqs[0])
        .await
        .expect("group made again");
    assert_ne!(old.created_ns, new.created_ns);
    let stale = b.streams.requeue(&key, old.created_ns, &events).await;
    assert!(
        matches!(stale, Err(nerve::stream::StreamError::NoSuchGroup(_))),
        "{stale:?}"
    );
    let lease = Utc::now() + chrono::Duration::seconds(30);
    assert_eq!(claim_due(&b, &key, lease).await, []);
    let put_back = b
        .streams
        .requeue(&key, new.created_ns, &events)
        .await
        .expect("its own redrive");
    assert_eq!(put_back, seqs);
    assert_eq!(claim_due(&b, &key, lease).await, [(seqs[0], 1)]);
}

#[tokio::test]
async fn embedded_requeue_does_not_reach_a_group_made_again() {
    a_requeue_does_not_reach_a_group_made_again(embedded().await).await;
}

#[tokio::test]
async fn redis_requeue_does_not_reach_a_group_made_again() {
    a_requeue_does_not_reach_a_group_made_again(redis().await).await;
}

/// A connection to the test Redis, and the keys of tenant "t"'s stream of `event_type` (the stream
/// itself ends with `}`; the others are its groups' ledgers).
async fn stream_keys(
    prefix: &str,
    event_type: &str,
) -> (redis::aio::MultiplexedConnection, Vec<String>) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:s:{{t/{event_type}/*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    (conn, keys)
}

/// A stream Redis lost (its entries, its consumer groups and ledgers), with events the group never
/// claimed: they come from the store, a page at a time. Once a claim has taken the first, the stream
/// holds the group's cursor and no entry after it, and the check that picks the streams a claim
/// reads from must still answer for it (`HAS_NEW`'s gap branch).
#[tokio::test]
async fn redis_group_claims_from_the_store_a_stream_redis_lost() {
    let (b, prefix) = redis_with_prefix().await;
    let key = group(&b, "g", &["lost.>"]).await;
    let ev = |id: &str, t: &'static str| (id.to_owned(), t);
    let b1 = stored(&b, &[ev("b1", "lost.b")]).await;
    assert_eq!(claim_and_ack(&b, &key, 100).await, b1);
    let a = stored(
        &b,
        &[ev("a1", "lost.a"), ev("a2", "lost.a"), ev("a3", "lost.a")],
    )
    .await;
    let (mut conn, lost) = stream_keys(&prefix, "lost.a").await;
    assert!(!lost.is_empty(), "no keys of stream lost.a");
    let _: i64 = redis::cmd("DEL")
        .arg(&lost)
        .query_async(&mut conn)
        .await
        .expect("del");
    // the stream is made again for the group, and its first page comes from the store
    assert_eq!(claim_and_ack(&b, &key, 1).await, a[..1]);
    // with another stream to ask about, the lost one must answer for its gap
    let b2 = stored(&b, &[ev("b2", "lost.b")]).await;
    let mut rest = a[1..].to_vec();
    rest.extend(b2);
    rest.sort_unstable();
    assert_eq!(claim_and_ack(&b, &key, 100).await, rest);
}

/// A claim counts every entry it read, those its filter passed over too, with their events' bytes:
/// the session sizes its next claim from them, so that large events a filter passes over do not
/// make the next read of a stream (on Redis, a count of entries) hold thousands of them.
async fn a_claim_counts_what_its_filter_passed_over(b: Backend) {
    let key = GroupKey {
        tenant: "t".into(),
        name: "small-only".into(),
    };
    let config = GroupConfig {
        selection: Selection {
            types: vec![TypePattern::parse("doc").expect("pattern")],
            filter: Some(nerve::event::Filter(nerve::event::FilterKind::Exact(
                [("subject".to_owned(), "small".to_owned())].into(),
            ))),
        },
        max_attempts: 5,
    };
    b.streams
        .ensure_group(&key, &config, 0)
        .await
        .expect("group");
    let doc = |id: &str, subject: &str, bytes: usize| Event {
        id: id.into(),
        source: "//conformance".into(),
        event_type: "doc".into(),
        spec_version: "1.0".into(),
        subject: Some(subject.into()),
        data: nerve::event::Data::Binary(vec![7; bytes]),
        ..Event::default()
    };
    let sequences = stored_events(
        &b,
        vec![
            doc("big1", "big", 300_000),
            doc("big2", "big", 300_000),
            doc("big3", "big", 300_000),
            doc("small1", "small", 100),
        ],
    )
    .await;
    let lease = Utc::now() + chrono::Duration::seconds(30);
    let claim = b
        .streams
        .claim_new(&key, "a", Priority::Normal, 100, lease)
        .await
        .expect("claim");
    let taken: Vec<u64> = claim.entries.iter().map(|c| c.sequence).collect();
    assert_eq!(taken, sequences[3..]);
    assert_eq!(claim.rows_read, 4);
    assert!(
        (900_000..1_000_000).contains(&claim.bytes_read),
        "{} bytes read",
        claim.bytes_read
    );
}

#[tokio::test]
async fn embedded_claim_counts_what_its_filter_passed_over() {
    a_claim_counts_what_its_filter_passed_over(embedded().await).await;
}

#[tokio::test]
async fn redis_claim_counts_what_its_filter_passed_over() {
    a_claim_counts_what_its_filter_passed_over(redis().await).await;
}

/// A redrive puts a group's checkpoints below what it put back only where the group has one: a stream
/// with none starts again at the group's start, and one made there would start it past entries still
/// leased below the redriven one.
#[tokio::test]
async fn redis_redrive_lowers_only_the_checkpoints_a_group_has() {
    use sqlx::Connection as _;
    let url = fresh_schema_url().await;
    let store = PostgresStore::connect(&url, 8)
        .await
        .expect("connect postgres store");
    let prefix = format!("nerve-test:{}", uuid::Uuid::new_v4().simple());
    let b = Backend {
        streams: redis_streams(store.clone(), &prefix).await,
        store,
        _dir: None,
    };
    let key = group(&b, "g", &["a", "b"]).await;
    let ev = |id: &str, t: &'static str| (id.to_owned(), t);
    let seqs = stored(&b, &[ev("a1", "a"), ev("a2", "a"), ev("b1", "b")]).await;
    assert_eq!(claim_and_ack(&b, &key, 100).await, seqs);
    // a checkpoint of stream a past both its events; none of stream b
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "INSERT INTO nerve_group_checkpoints (tenant, grp, type, priority, position) \
         VALUES ('t', 'g', 'a', $1, $2)",
    )
    .bind(Priority::Normal.as_i64() as i16)
    .bind(seqs[1] as i64)
    .execute(&mut conn)
    .await
    .expect("checkpoint of a");
    let events = b
        .store
        .read_sequences(&[seqs[0], seqs[2]])
        .await
        .expect("read");
    let created_ns = b
        .streams
        .group_settings(&key)
        .await
        .expect("group")
        .created_ns;
    let mut put_back = b
        .streams
        .requeue(&key, created_ns, &events)
        .await
        .expect("requeue");
    put_back.sort_unstable();
    assert_eq!(put_back, [seqs[0], seqs[2]]);
    let checkpoints: Vec<(String, i64)> = sqlx::query_as(
        "SELECT type, position FROM nerve_group_checkpoints WHERE grp = 'g' ORDER BY type",
    )
    .fetch_all(&mut conn)
    .await
    .expect("checkpoints");
    assert_eq!(checkpoints, [("a".to_owned(), seqs[0] as i64 - 1)]);
}

/// A replica read its group's position in Redis for the store's checkpoint, and the group was
/// deleted and created again from the start before it wrote it: the position is not written for
/// the new group, whose consumer group, made at its first claim, starts at its own start and not
/// where the deleted one had got to.
#[tokio::test]
async fn redis_checkpoint_of_a_deleted_group_is_not_written_for_one_made_again() {
    let (store, prefix) = redis_deployment().await;
    let streams = redis_streams(store.clone(), &prefix).await;
    let b = Backend {
        streams: streams.clone(),
        store,
        _dir: None,
    };
    let key = group(&b, "g", &["job"]).await;
    // only groups with a member here are checkpointed
    let interest = Interest {
        tenant: "t".into(),
        selection: Selection {
            types: vec![TypePattern::parse("job").expect("pattern")],
            filter: None,
        },
    };
    b.streams
        .join("m", Some(&key), interest)
        .await
        .expect("join");
    let mut sequences = Vec::new();
    // The replica's own checkpoint, each second, may write a position between the acks and the
    // read below, which then has nothing new to write: another event moves it on.
    let read = loop {
        let event = [(format!("e{}", sequences.len()), "job")];
        let stored = stored(&b, &event).await;
        assert_eq!(claim_and_ack(&b, &key, 100).await, stored);
        sequences.extend(stored);
        let read = streams.checkpoint_rows().await.expect("checkpoint rows");
        if !read.is_empty() {
            break read;
        }
        assert!(
            sequences.len() < 10,
            "every read found its position written"
        );
    };
    assert!(b.streams.delete_group(&key).await.expect("delete"));
    group(&b, "g", &["job"]).await;
    streams
        .write_checkpoints(read)
        .await
        .expect("write checkpoints");
    assert_eq!(
        claim_and_ack(&b, &key, 100).await,
        sequences,
        "the group made again from the start gets every event"
    );
}

/// Redis came back from an older snapshot or log: its relayed position and a stream went back. The
/// next relay step, of another stream, finds the position lower than this replica saw it, and adds
/// every event after it again: the stream that got no new event is mended without waiting for a
/// reconnect, and Redis' relayed position is never raised past an entry the stream lacks (a replica
/// started then would begin there), as every command Redis ran shows (`MONITOR`).
#[tokio::test]
async fn redis_relay_adds_again_what_redis_lost_when_its_relayed_position_went_back() {
    let (b, prefix) = redis_with_prefix().await;
    let ev = |id: &str, t: &'static str| (id.to_owned(), t);
    let kept = stored(&b, &[ev("a1", "back.a")]).await;
    let lost = stored(&b, &[ev("a2", "back.a"), ev("a3", "back.a")]).await;
    let (mut conn, stream) =
        back_to_a_snapshot(&prefix, "back.a", &kept, &lost, RelayedKey::WentBack).await;

    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut commands = client
        .get_async_monitor()
        .await
        .expect("monitor")
        .into_on_message::<String>();
    let other = stored(&b, &[ev("b1", "back.b")]).await;
    // every command Redis ran before this marker has reached the monitor once the marker has
    let marker = format!("{prefix}:seen-all");
    let _: String = redis::cmd("ECHO")
        .arg(&marker)
        .query_async(&mut conn)
        .await
        .expect("echo");
    let relayed_key = format!("{prefix}:relayed");
    let mut added_again = Vec::new();
    loop {
        let line = tokio::time::timeout(WAIT, commands.next())
            .await
            .expect("the monitor's lines in time")
            .expect("monitor open");
        if line.contains(&marker) {
            break;
        }
        // e.g. 1700000000.000001 [0 lua] "XADD" "<stream>" "MAXLEN" "~" "100000" "2-0" "e" ...
        let args: Vec<&str> = line.split("\" \"").collect();
        match args.as_slice() {
            [command, key, _, _, _, id, ..] if command.ends_with("\"XADD") && *key == stream => {
                added_again.push((*id).to_owned());
            }
            [command, key, value] if command.ends_with("\"SET") && *key == relayed_key => {
                let value: u64 = value.trim_end_matches('"').parse().expect("a sequence");
                for seq in lost.iter().filter(|s| **s <= value) {
                    assert!(
                        added_again.contains(&format!("{seq}-0")),
                        "relayed raised to {value} before {seq} was added again"
                    );
                }
            }
            _ => {}
        }
    }
    let mut all = kept.clone();
    all.extend(&lost);
    assert_eq!(
        held_ids(&mut conn, &stream).await,
        entry_ids(&all),
        "what the stream holds once the relay moved on"
    );
    let relayed: u64 = conn.get(&relayed_key).await.expect("get");
    assert_eq!(relayed, other[0], "the relayed position");
}

/// A replica started after entries were added (so it never added them) is the first to add to their
/// stream once Redis went back past them: its first append there checks the stream against the last
/// event the store has for it, finds it shorter, and the relay adds the lost entries again before the
/// new one, which would otherwise hide them for good.
#[tokio::test]
async fn redis_replica_started_later_adds_again_what_redis_lost_before_it_started() {
    a_replica_started_later_adds_again_what_a_stream_lost(RelayedKey::WentBack).await;
}

/// The same after a Redis that came back empty (no relayed position to check), where a lagging
/// replica has already refilled the stream in part: the append must not go past what it lacks.
#[tokio::test]
async fn redis_replica_started_later_adds_again_what_a_stream_refilled_in_part_lacks() {
    a_replica_started_later_adds_again_what_a_stream_lost(RelayedKey::Gone).await;
}

async fn a_replica_started_later_adds_again_what_a_stream_lost(key: RelayedKey) {
    let (store, prefix) = redis_deployment().await;
    let first = redis_replica(store.clone(), &prefix).await;
    let ev = |id: &str| (id.to_owned(), "late.a");
    let kept = stored(&first, &[ev("a1")]).await;
    let lost = stored(&first, &[ev("a2"), ev("a3")]).await;
    let second = redis_replica(store, &prefix).await;
    let (mut conn, stream) = back_to_a_snapshot(&prefix, "late.a", &kept, &lost, key).await;

    let new = stored(&second, &[ev("a4")]).await;
    let mut all = kept;
    all.extend(lost.iter().chain(&new));
    assert_eq!(
        held_ids(&mut conn, &stream).await,
        entry_ids(&all),
        "what the stream holds once the later replica added to it"
    );
}

/// The entry ids of sequences.
fn entry_ids(sequences: &[u64]) -> Vec<String> {
    sequences.iter().map(|s| format!("{s}-0")).collect()
}

/// The ids of the entries a stream holds.
async fn held_ids(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<String> {
    let held: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("xrange");
    held.into_iter().map(|(id, _)| id).collect()
}

/// Deletes the entries of `sequences` from tenant "t"'s stream of `event_type` (`XDEL`); returns a
/// connection and the stream's key.
async fn delete_entries(
    prefix: &str,
    event_type: &str,
    sequences: &[u64],
) -> (redis::aio::MultiplexedConnection, String) {
    let (mut conn, keys) = stream_keys(prefix, event_type).await;
    let stream = keys
        .into_iter()
        .find(|k| k.ends_with('}'))
        .expect("the stream");
    let _: i64 = redis::cmd("XDEL")
        .arg(&stream)
        .arg(entry_ids(sequences))
        .query_async(&mut conn)
        .await
        .expect("xdel");
    (conn, stream)
}

/// What Redis' relayed position holds after [`back_to_a_snapshot`].
enum RelayedKey {
    /// As old as the stream: an older snapshot or log.
    WentBack,
    /// Nothing: a Redis that came back empty, where a lagging replica refilled the stream in part.
    Gone,
}

/// Makes Redis what an older snapshot of it holds: tenant "t"'s stream of `event_type` ends at `kept`
/// (its entries `lost` gone, as if never added), and the relayed position is as `key` says. Returns
/// a connection and the stream's key.
async fn back_to_a_snapshot(
    prefix: &str,
    event_type: &str,
    kept: &[u64],
    lost: &[u64],
    key: RelayedKey,
) -> (redis::aio::MultiplexedConnection, String) {
    let (mut conn, stream) = delete_entries(prefix, event_type, lost).await;
    let last_kept = *kept.last().expect("an entry kept");
    let _: () = redis::cmd("XSETID")
        .arg(&stream)
        .arg(format!("{last_kept}-0"))
        .query_async(&mut conn)
        .await
        .expect("xsetid");
    let relayed = format!("{prefix}:relayed");
    let _: () = match key {
        RelayedKey::WentBack => conn.set(&relayed, last_kept).await,
        RelayedKey::Gone => conn.del(&relayed).await,
    }
    .expect("set the relayed position");
    (conn, stream)
}

/// An operator's `XDEL` of a stream's newest entry is not a Redis that lost it: the stream's last id
/// stays, so adding again from its top would skip the entry forever, and the relay, going back
/// for it at every event of the stream, would never get past it. It goes on and adds what comes.
#[tokio::test]
async fn redis_relay_goes_on_past_entries_deleted_from_a_streams_top() {
    let (b, prefix) = redis_with_prefix().await;
    let ev = |id: &str, t: &'static str| (id.to_owned(), t);
    let kept = stored(&b, &[ev("c1", "deleted.c")]).await;
    let deleted = stored(&b, &[ev("c2", "deleted.c")]).await;
    let (mut conn, stream) = delete_entries(&prefix, "deleted.c", &deleted).await;
    // more than a relay step of other events, so going back from the top never reaches the next
    let others: Vec<(String, &str)> = (0..1_100)
        .map(|i| ev(&format!("d{i}"), "deleted.d"))
        .collect();
    stored(&b, &others).await;
    let next = stored(&b, &[ev("c3", "deleted.c")]).await;
    let mut held = kept;
    held.extend(next);
    assert_eq!(held_ids(&mut conn, &stream).await, entry_ids(&held));
}

/// The information of an inbox the tests open.
fn inbox_info() -> Inbox {
    Inbox {
        tenant: "t".into(),
        correlation_id: "c".into(),
        request_id: "r".into(),
        request_source: "//conformance".into(),
        request_type: "ask".into(),
        traceparent: None,
    }
}

/// Opens an inbox of a new name on `b`: its name and where its replies arrive.
async fn opened_inbox(
    b: &Backend,
) -> (
    String,
    tokio::sync::mpsc::Receiver<Arc<nerve::event::StoredEvent>>,
) {
    let inbox = format!("_inbox.{}", uuid::Uuid::new_v4().simple());
    let replies = b
        .streams
        .open_inbox(&inbox, inbox_info())
        .await
        .expect("open inbox");
    (inbox, replies)
}

/// Stores replies of the given ids on `b`: their sequences, and the replies as read back.
async fn stored_replies(
    b: &Backend,
    ids: &[&str],
) -> (Vec<u64>, Vec<Arc<nerve::event::StoredEvent>>) {
    let events: Vec<(String, &str)> = ids.iter().map(|id| ((*id).to_owned(), "answer")).collect();
    let sequences = stored(b, &events).await;
    let read = b
        .store
        .read_sequences(&sequences)
        .await
        .expect("read replies");
    (sequences, read)
}

/// Sends `reply` to `inbox` on `b`: whether it was delivered.
async fn reply_to(b: &Backend, inbox: &str, reply: &Arc<nerve::event::StoredEvent>) -> bool {
    b.streams
        .send_reply(inbox, reply.clone())
        .await
        .expect("send a reply")
}

/// The sequence of the next reply to arrive at an inbox; fails naming `what` if none comes.
async fn next_reply(
    replies: &mut tokio::sync::mpsc::Receiver<Arc<nerve::event::StoredEvent>>,
    what: &str,
) -> u64 {
    tokio::time::timeout(WAIT, replies.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: no reply within {WAIT:?}"))
        .unwrap_or_else(|| panic!("{what}: the inbox closed"))
        .sequence
}

/// A connection of the test's own to Redis.
async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// A request's inbox takes one reply: the first, wherever it comes from. A later one, on the
/// requester's replica or another, still finds the inbox (the bus stores it) but is not delivered,
/// also once the requester read the first and has not closed the inbox yet; a retry of the first
/// (the same stored reply) is told it was delivered, and is not handed over twice. Once closed,
/// the inbox is found nowhere.
async fn only_the_first_reply_reaches_an_inbox(requester: &Backend, responder: &Backend) {
    let (inbox, mut replies) = opened_inbox(requester).await;
    let (sequences, events) = stored_replies(requester, &["first", "second"]).await;
    assert!(
        reply_to(responder, &inbox, &events[0]).await,
        "the first reply is delivered"
    );
    assert_eq!(
        next_reply(&mut replies, "the first reply arrives").await,
        sequences[0]
    );
    for (side, b) in [("requester's", requester), ("responder's", responder)] {
        assert!(
            b.streams.inbox(&inbox).await.expect("inbox").is_some(),
            "the {side} replica finds no inbox before it is closed"
        );
        assert!(
            !reply_to(b, &inbox, &events[1]).await,
            "a second reply on the {side} replica is reported delivered"
        );
    }
    assert!(
        reply_to(responder, &inbox, &events[0]).await,
        "a retry of the delivered reply is reported not delivered"
    );
    // a routed reply comes over pub/sub: what would come does within this wait (the channel
    // ends at once where the reply handed over was its last)
    assert!(
        !matches!(
            tokio::time::timeout(Duration::from_millis(300), replies.recv()).await,
            Ok(Some(_))
        ),
        "a second reply, or the first again, reached the requester"
    );
    requester
        .streams
        .close_inbox(&inbox)
        .await
        .expect("close inbox");
    for (side, b) in [("requester's", requester), ("responder's", responder)] {
        assert!(
            b.streams.inbox(&inbox).await.expect("inbox").is_none(),
            "the {side} replica finds the inbox after it was closed"
        );
    }
}

#[tokio::test]
async fn embedded_only_the_first_reply_reaches_an_inbox() {
    let b = embedded().await;
    only_the_first_reply_reaches_an_inbox(&b, &b).await;
}

#[tokio::test]
async fn redis_only_the_first_reply_reaches_an_inbox() {
    let b = redis().await;
    only_the_first_reply_reaches_an_inbox(&b, &b).await;
}

/// As above, the first reply made on another replica than the requester's.
#[tokio::test]
async fn redis_only_the_first_reply_reaches_an_inbox_across_replicas() {
    let (requester, responder, _) = two_listening_replicas().await;
    only_the_first_reply_reaches_an_inbox(&requester, &responder).await;
}

/// Two replicas of one deployment, each listening for the replies routed to it.
async fn two_listening_replicas() -> (Backend, Backend, String) {
    let (store, prefix) = redis_deployment().await;
    let a = redis_replica(store.clone(), &prefix).await;
    let b = redis_replica(store, &prefix).await;
    let conn = redis_connection().await;
    let pattern = format!("{prefix}:replies:*");
    eventually("both replicas listening for replies", || {
        let mut conn = conn.clone();
        let pattern = pattern.clone();
        async move {
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(&pattern)
                .query_async(&mut conn)
                .await
                .expect("pubsub channels");
            (channels.len() == 2).then_some(())
        }
    })
    .await;
    (a, b, prefix)
}

/// A reply's call failed after it took the inbox (its answer from Redis was lost): its retry, the
/// same stored reply, on another replica than the requester's, finds the inbox and the take its own,
/// and hands the reply over; another reply finds it taken. And a requester whose inbox record Redis lost (restarted without its data) still gets
/// a reply made on its own replica, once.
#[tokio::test]
async fn redis_a_reply_retried_after_its_take_is_handed_over_and_a_lost_record_is_no_loss() {
    let (requester, responder, prefix) = two_listening_replicas().await;
    let mut conn = redis_connection().await;
    let (sequences, events) = stored_replies(&requester, &["retried", "other", "local"]).await;

    let (inbox, mut replies) = opened_inbox(&requester).await;
    // the take of the first call, whose answer never came back
    let key = format!("{prefix}:inbox:{inbox}");
    let record: String = conn.get(&key).await.expect("record");
    let _: () = conn
        .set_ex(&key, format!("taken:{}\n{record}", sequences[0]), 60)
        .await
        .expect("mark taken");
    assert!(
        responder
            .streams
            .inbox(&inbox)
            .await
            .expect("inbox")
            .is_some(),
        "a taken inbox is not found for the retry"
    );
    assert!(
        !reply_to(&responder, &inbox, &events[1]).await,
        "another reply got the inbox the first took"
    );
    assert!(
        reply_to(&responder, &inbox, &events[0]).await,
        "the retry of the reply that took the inbox was not delivered"
    );
    assert_eq!(
        next_reply(&mut replies, "the retried reply arrives").await,
        sequences[0]
    );

    let (inbox, mut replies) = opened_inbox(&requester).await;
    let _: i64 = conn
        .del(format!("{prefix}:inbox:{inbox}"))
        .await
        .expect("lose the record");
    for (n, delivered) in [(1, true), (2, false)] {
        assert_eq!(
            reply_to(&requester, &inbox, &events[2]).await,
            delivered,
            "reply {n} on the requester's replica, its record lost"
        );
    }
    assert_eq!(
        next_reply(&mut replies, "the local reply arrives").await,
        sequences[2]
    );
}

/// A reply routed to a requester's replica that is not listening (its pub/sub connection being made
/// again) reached nobody: it is told so, and gives the inbox back, so a reply made once the replica
/// listens again still reaches the requester.
#[tokio::test]
async fn redis_a_take_whose_reply_reached_nobody_is_given_back() {
    let (requester, responder, prefix) = two_listening_replicas().await;
    let mut conn = redis_connection().await;
    let (sequences, events) = stored_replies(&requester, &["unheard", "heard"]).await;
    let (inbox, mut replies) = opened_inbox(&requester).await;
    // the record names a replica nobody listens for, as while the requester's is away
    let key = format!("{prefix}:inbox:{inbox}");
    let record: String = conn.get(&key).await.expect("record");
    let mut away: serde_json::Value = serde_json::from_str(&record).expect("record json");
    let replica = away["replica"].as_str().expect("replica").to_owned();
    away["replica"] = "away".into();
    let _: () = conn
        .set_ex(&key, away.to_string(), 60)
        .await
        .expect("record of a replica away");
    assert!(
        !reply_to(&responder, &inbox, &events[0]).await,
        "a reply that reached nobody is reported delivered"
    );
    // the replica listens again: its name back in the record, as it now is (taken or not)
    let now: String = conn.get(&key).await.expect("record");
    let back = now.replace(
        "\"replica\":\"away\"",
        &format!("\"replica\":\"{replica}\""),
    );
    assert_ne!(back, now, "the record names the replica away");
    let _: () = conn.set_ex(&key, back, 60).await.expect("replica back");
    assert!(
        reply_to(&responder, &inbox, &events[1]).await,
        "the inbox a reply that reached nobody took was not given back"
    );
    assert_eq!(
        next_reply(&mut replies, "the reply arrives").await,
        sequences[1]
    );
}
