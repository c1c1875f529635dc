//! The event store contract, run unchanged against every implementation (SQLite and Postgres).
//!
//! Postgres tests need NERVE_TEST_DATABASE_URL (scripts/test.sh starts Postgres and sets it); each test
//! works in a schema of its own, so they run in parallel.

use std::{collections::BTreeSet, sync::Arc};

use crate::harness::{eventually, fresh_schema_url};
use nerve::{
    event::{Data, Event, Priority, Selection, TypePattern},
    store::{
        AuditPruned, AuditQuery, AuditRecord, DeadLetter, EventStore, NewEvent, PostgresStore,
        Publisher, READ_BYTES, ReadQuery, SqliteDb, SqliteStore, StoreError,
    },
};

/// A store plus whatever must live as long as it.
pub struct Backend {
    pub store: Arc<dyn EventStore>,
    _dir: Option<tempfile::TempDir>,
}

pub async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteDb::open(&dir.path().join("nerve.db"))
        .await
        .expect("open sqlite");
    Backend {
        store: SqliteStore::start(db).await.expect("start"),
        _dir: Some(dir),
    }
}

pub async fn postgres() -> Backend {
    let url = fresh_schema_url().await;
    Backend {
        store: PostgresStore::connect(&url, 8)
            .await
            .expect("connect postgres store"),
        _dir: None,
    }
}

fn event(id: &str, event_type: &str) -> Event {
    Event {
        id: id.into(),
        source: "//conformance".into(),
        event_type: event_type.into(),
        spec_version: "1.0".into(),
        ..Event::default()
    }
}

fn prepared(event: Event) -> NewEvent {
    NewEvent::new(event.clone(), event.content_hash())
}

fn new_event(id: &str, event_type: &str) -> NewEvent {
    prepared(event(id, event_type))
}

/// The event with a subject added: same key, different content.
fn changed(new: &NewEvent, subject: &str) -> NewEvent {
    let mut event = new.event().clone();
    event.subject = Some(subject.into());
    prepared(event)
}

fn query(after: u64) -> ReadQuery {
    ReadQuery {
        tenant: "t".into(),
        after,
        limit: 1000,
        ..ReadQuery::default()
    }
}

async fn appends_in_order_and_returns_the_original_sequence_for_duplicates(b: Backend) {
    let s = &b.store;
    let first = s
        .append("t", vec![new_event("a", "x.y"), new_event("b", "x.y")])
        .await
        .expect("append");
    assert_eq!(
        first
            .iter()
            .map(|a| (a.sequence, a.duplicate))
            .collect::<Vec<_>>(),
        [(1, false), (2, false)]
    );
    let again = s
        .append("t", vec![new_event("b", "x.y"), new_event("c", "x.y")])
        .await
        .expect("append");
    assert_eq!(
        again
            .iter()
            .map(|a| (a.sequence, a.duplicate))
            .collect::<Vec<_>>(),
        [(2, true), (3, false)]
    );
    // the same id in another tenant is another event
    let other = s
        .append("u", vec![new_event("a", "x.y")])
        .await
        .expect("append");
    assert!(!other[0].duplicate);
    assert_eq!(s.head().await.expect("head"), 4);
    match s
        .append("t", vec![changed(&new_event("a", "x.y"), "different")])
        .await
    {
        Err(StoreError::Conflict { id, .. }) => assert_eq!(id, "a"),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

async fn a_conflicting_request_fails_alone_and_leaves_no_gap(b: Backend) {
    let s = b.store.clone();
    s.append("t", vec![new_event("taken", "x.y")])
        .await
        .expect("seed");
    let conflicting = changed(&new_event("taken", "x.y"), "changed");
    // concurrent requests land in one group commit more often than not; either way the outcome is the same
    let (a, bad, c) = tokio::join!(
        s.append("t", vec![new_event("a1", "x.y"), new_event("a2", "x.y")]),
        s.append("t", vec![new_event("b1", "x.y"), conflicting]),
        s.append("t", vec![new_event("c1", "x.y")]),
    );
    assert!(matches!(bad, Err(StoreError::Conflict { .. })), "{bad:?}");
    let mut seqs: Vec<u64> = a
        .expect("a")
        .iter()
        .chain(&c.expect("c"))
        .map(|x| x.sequence)
        .collect();
    seqs.sort();
    assert_eq!(seqs, [2, 3, 4], "sequences stay gapless");
    let all = s.read(&query(0)).await.expect("read");
    let ids: Vec<&str> = all.events.iter().map(|e| e.event.id.as_str()).collect();
    assert!(
        !ids.contains(&"b1"),
        "the failed request wrote nothing: {ids:?}"
    );
    assert_eq!(all.events.len(), 4);
}

/// A request the database refuses for a reason of its own (on Postgres: an idempotency key longer than
/// its index takes, which the API refuses before, but the store is not to rely on that) fails alone:
/// the requests committed with it are stored.
async fn a_request_the_database_refuses_fails_alone(b: Backend) {
    let s = b.store.clone();
    // random text compresses little: a key of several KiB even after Postgres compresses it
    let long: String = (0..250)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let mut refused = event(&long, "x.y");
    refused.source = format!("//{long}");
    let (first, maybe, last) = tokio::join!(
        s.append("t", vec![new_event("before", "x.y")]),
        s.append("t", vec![prepared(refused)]),
        s.append("t", vec![new_event("after", "x.y")]),
    );
    first.expect("the request before is stored");
    last.expect("the request after is stored");
    let stored = s.read(&query(0)).await.expect("read").events.len();
    assert_eq!(stored, if maybe.is_ok() { 3 } else { 2 }, "{maybe:?}");
}

/// A commit larger than one multi-row statement (the SQLite store splits at 500 rows): every event
/// stored once in order, a key repeated inside the commit answered as a duplicate, statistics exact.
async fn large_commits_store_every_event_once_with_exact_type_statistics(b: Backend) {
    let s = &b.store;
    s.append("t", vec![new_event("e0", "big.a")])
        .await
        .expect("seed");
    let mut events: Vec<NewEvent> = (0..1_300)
        .map(|i| new_event(&format!("e{i}"), if i % 2 == 0 { "big.a" } else { "big.b" }))
        .collect();
    events.push(new_event("e7", "big.b"));
    let appended = s.append("t", events).await.expect("append");
    assert_eq!(appended.len(), 1_301);
    assert_eq!((appended[0].sequence, appended[0].duplicate), (1, true));
    assert_eq!((appended[1].sequence, appended[1].duplicate), (2, false));
    assert_eq!(
        (appended[1_299].sequence, appended[1_299].duplicate),
        (1_300, false)
    );
    assert_eq!(
        (appended[1_300].sequence, appended[1_300].duplicate),
        (appended[7].sequence, true),
        "a key repeated in one request is stored once"
    );
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let page = s.read(&query(after)).await.expect("read");
        stored.extend(page.events.iter().map(|e| (e.sequence, e.event.id.clone())));
        after = page.scanned_to;
        if page.exhausted {
            break;
        }
    }
    assert_eq!(
        stored,
        (0..1_300)
            .map(|i| (i as u64 + 1, format!("e{i}")))
            .collect::<Vec<_>>()
    );
    let stats = s.event_types("t", "", 100).await.expect("event types");
    let summary: Vec<(&str, u64, u64, u64)> = stats
        .iter()
        .map(|t| {
            (
                t.event_type.as_str(),
                t.count,
                t.first_sequence,
                t.last_sequence,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("big.a", 650, 1, 1_299), ("big.b", 650, 2, 1_300)]
    );
}

/// Tails the log the way the relay does (committed head, then read after the position) until `total`
/// events were seen, asserting that no sequence is skipped and no event is read twice.
fn follow(store: Arc<dyn EventStore>, total: usize) -> tokio::task::JoinHandle<BTreeSet<String>> {
    let mut committed = store.committed();
    tokio::spawn(async move {
        let mut position = 0;
        let mut seen = BTreeSet::new();
        while seen.len() < total {
            if *committed.borrow_and_update() <= position {
                committed.changed().await.expect("store alive");
                continue;
            }
            for e in store.read_all(position, 1000).await.expect("read") {
                assert_eq!(
                    e.sequence,
                    position + 1,
                    "the follower never skips a sequence"
                );
                position = e.sequence;
                assert!(seen.insert(e.event.id.clone()), "{} read twice", e.event.id);
            }
        }
        seen
    })
}

async fn concurrent_publishers_get_gapless_sequences_a_follower_sees_in_order(b: Backend) {
    let s = b.store.clone();
    let follower = follow(s.clone(), 3200);
    let mut publishers = Vec::new();
    for p in 0..16 {
        let s = s.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..200 {
                s.append("t", vec![new_event(&format!("p{p}-{i}"), "x.y")])
                    .await
                    .expect("append");
            }
        }));
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    let seen = tokio::time::timeout(std::time::Duration::from_secs(30), follower)
        .await
        .expect("follower done")
        .expect("follower");
    assert_eq!(seen.len(), 3200);
    assert_eq!(
        seen.iter().collect::<BTreeSet<_>>().len(),
        3200,
        "every event once"
    );
}

/// An event with every attribute set, extensions of every type and a time with nanoseconds.
fn rich_event(id: &str) -> Event {
    use nerve::event::{Data, ExtensionValue};
    let time = chrono::DateTime::from_timestamp(1_764_000_000, 123_456_789).expect("valid time");
    Event {
        subject: Some("orders/42".into()),
        time: Some(time),
        data_content_type: Some("application/octet-stream".into()),
        data_schema: Some("https://example.com/schema".into()),
        data: Data::Binary(vec![0, 1, 2, 254, 255]),
        extensions: [
            ("s", ExtensionValue::String("text \u{e9} \"quoted\"".into())),
            ("b", ExtensionValue::Bool(true)),
            ("i", ExtensionValue::Integer(-7)),
            ("by", ExtensionValue::Bytes(vec![9, 8, 7])),
            ("u", ExtensionValue::Uri("https://example.com/x".into())),
            ("ur", ExtensionValue::UriRef("/x?y=1".into())),
            ("ts", ExtensionValue::Timestamp(time)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        priority: Priority::High,
        correlation_id: Some("corr".into()),
        causation_id: Some("cause".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        reply_to: Some("inbox-1".into()),
        ..event(id, "x.rich")
    }
}

/// The relay's feed (`read_all`, served from the events the store just committed where it can) returns
/// exactly what a read from the database returns: same sequences, recorded times and contents, no
/// duplicate twice, nothing of a failed request.
async fn the_feed_of_fresh_commits_equals_what_the_database_holds(b: Backend) {
    let s = &b.store;
    s.append("t", vec![new_event("taken", "x.y")])
        .await
        .expect("append");
    let batch = vec![
        prepared(rich_event("r1")),
        new_event("taken", "x.y"),
        prepared(Event {
            data: nerve::event::Data::Text("plain".into()),
            ..event("r2", "x.text")
        }),
        prepared(rich_event("r1")),
    ];
    let appended = s.append("t", batch).await.expect("append");
    assert_eq!(
        appended
            .iter()
            .map(|a| (a.sequence, a.duplicate))
            .collect::<Vec<_>>(),
        [(2, false), (1, true), (3, false), (2, true)]
    );
    assert!(
        s.append("t", vec![changed(&new_event("taken", "x.y"), "other")])
            .await
            .is_err(),
        "a conflicting request fails"
    );
    s.append("u", vec![prepared(rich_event("r1"))])
        .await
        .expect("append");
    let fed = s.read_all(0, 1000).await.expect("read_all");
    let mut stored = s.read(&query(0)).await.expect("read").events;
    stored.extend(
        s.read(&ReadQuery {
            tenant: "u".into(),
            ..query(0)
        })
        .await
        .expect("read")
        .events,
    );
    stored.sort_by_key(|e| e.sequence);
    assert_eq!(fed.len(), 4);
    assert_eq!(fed, stored);
    assert_eq!(fed[1].event, rich_event("r1"));
    // and from any position, in pieces
    let tail = s.read_all(2, 1).await.expect("read_all");
    assert_eq!(tail, stored[2..3]);
}

async fn reads_filter_by_type_source_subject_correlation_priority_and_range(b: Backend) {
    let s = &b.store;
    let mut a = event("a", "shop.order.created");
    a.subject = Some("order-1".into());
    a.correlation_id = Some("conv".into());
    a.priority = Priority::High;
    let mut c = event("c", "shop.refund.created");
    c.source = "//refunds".into();
    let batch = vec![prepared(a), new_event("b", "shop.order.paid"), prepared(c)];
    s.append("t", batch).await.expect("append");
    let ids = |page: nerve::store::ReadPage| {
        page.events
            .iter()
            .map(|e| e.event.id.clone())
            .collect::<Vec<_>>()
    };
    let pattern = |p: &str| TypePattern::parse(p).expect("pattern");
    assert_eq!(
        ids(s
            .read(&ReadQuery {
                types: vec![pattern("shop.*.created")],
                ..query(0)
            })
            .await
            .expect("read")),
        ["a", "c"]
    );
    assert_eq!(
        ids(s
            .read(&ReadQuery {
                types: vec![pattern("shop.order.paid")],
                ..query(0)
            })
            .await
            .expect("read")),
        ["b"]
    );
    // several literal types: merged in sequence order, limited, paged
    let two_types = |after, limit| ReadQuery {
        types: vec![
            pattern("shop.refund.created"),
            pattern("shop.order.created"),
        ],
        limit,
        ..query(after)
    };
    assert_eq!(
        ids(s.read(&two_types(0, 10)).await.expect("read")),
        ["a", "c"]
    );
    let first = s.read(&two_types(0, 1)).await.expect("read");
    assert!(!first.exhausted);
    let after = first.scanned_to;
    assert_eq!(ids(first), ["a"]);
    assert_eq!(
        ids(s.read(&two_types(after, 1)).await.expect("read")),
        ["c"]
    );
    assert_eq!(
        ids(s
            .read(&ReadQuery {
                source: Some("//refunds".into()),
                ..query(0)
            })
            .await
            .expect("read")),
        ["c"]
    );
    assert_eq!(
        ids(s
            .read(&ReadQuery {
                subject: Some("order-1".into()),
                ..query(0)
            })
            .await
            .expect("read")),
        ["a"]
    );
    assert_eq!(
        ids(s
            .read(&ReadQuery {
                correlation_id: Some("conv".into()),
                ..query(0)
            })
            .await
            .expect("read")),
        ["a"]
    );
    assert_eq!(
        ids(s
            .read(&ReadQuery {
                priority: Some(Priority::High),
                ..query(0)
            })
            .await
            .expect("read")),
        ["a"]
    );
    assert_eq!(
        ids(s
            .read(&ReadQuery {
                until: Some(2),
                ..query(1)
            })
            .await
            .expect("read")),
        ["b"]
    );
    let page = s
        .read(&ReadQuery {
            limit: 2,
            ..query(0)
        })
        .await
        .expect("read");
    assert!(!page.exhausted);
    assert_eq!(page.scanned_to, 2);
    let wild = s
        .read(&ReadQuery {
            types: vec![pattern("shop.refund.>")],
            ..query(0)
        })
        .await
        .expect("read");
    assert_eq!(wild.scanned_to, 3, "non-matching rows are scanned past");
    let found = s.find("t", "b", None, 0).await.expect("find");
    assert_eq!(found[0].sequence, 2);
    // a find after an event's sequence goes on past it
    assert!(s.find("t", "b", None, 2).await.expect("find").is_empty());
    assert_eq!(s.find("t", "b", None, 1).await.expect("find").len(), 1);
    let recorded = found[0].recorded_at;
    assert_eq!(
        s.sequence_before(recorded + chrono::Duration::seconds(1))
            .await
            .expect("before"),
        3
    );
    assert_eq!(
        s.sequence_before(recorded - chrono::Duration::days(1))
            .await
            .expect("before"),
        0
    );
    let types = s.event_types("t", "", 100).await.expect("types");
    assert_eq!(
        types
            .iter()
            .map(|t| (t.event_type.as_str(), t.count))
            .collect::<Vec<_>>(),
        [
            ("shop.order.created", 1),
            ("shop.order.paid", 1),
            ("shop.refund.created", 1)
        ]
    );
    // a page: the types named after the last one of the previous page, in byte order
    let page = s
        .event_types("t", "shop.order.created", 1)
        .await
        .expect("a page of types");
    assert_eq!(
        page.iter()
            .map(|t| t.event_type.as_str())
            .collect::<Vec<_>>(),
        ["shop.order.paid"]
    );
    let selection = Selection {
        types: vec![pattern("shop.order.>")],
        filter: None,
    };
    assert_eq!(
        s.count_after("t", [0; 4], &selection).await.expect("count"),
        2
    );
    // the three share their commit's time: none of them is before it
    assert_eq!(s.sequence_before(recorded).await.expect("before"), 0);
    s.append(
        "t",
        vec![
            new_event("d", "shop.order.paid"),
            new_event("e", "shop.order.paid"),
        ],
    )
    .await
    .expect("append");
    let later = s.find("t", "e", None, 0).await.expect("find")[0].recorded_at;
    assert!(later >= recorded, "recorded time never goes backwards");
    let before_later = s.sequence_before(later).await.expect("before");
    if later > recorded {
        assert_eq!(
            before_later, 3,
            "the position before the later commit's first event"
        );
    } else {
        assert_eq!(before_later, 0, "one clock reading: all five share a time");
    }
    assert_eq!(
        s.sequence_before(later + chrono::Duration::nanoseconds(1))
            .await
            .expect("before"),
        5
    );
}

async fn a_type_asked_for_twice_reads_its_events_once(b: Backend) {
    let s = &b.store;
    s.append(
        "t",
        vec![
            new_event("r1", "a.b"),
            new_event("r2", "c.d"),
            new_event("r3", "a.b"),
        ],
    )
    .await
    .expect("append");
    let pattern = |t: &str| TypePattern::parse(t).expect("pattern");
    let page = s
        .read(&ReadQuery {
            types: vec![pattern("a.b"), pattern("c.d"), pattern("a.b")],
            ..query(0)
        })
        .await
        .expect("read");
    let ids: Vec<&str> = page.events.iter().map(|e| e.event.id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2", "r3"]);
}

/// Stores `count` events of `event_type` with `data_bytes` of data, `batch` to a commit; returns
/// their sequences and the size of one event.
async fn store_large(
    s: &Arc<dyn EventStore>,
    event_type: &str,
    data_bytes: usize,
    count: usize,
    batch: usize,
) -> (Vec<u64>, usize) {
    let large = |i: usize| {
        let mut e = event(&format!("{event_type}-{i}"), event_type);
        e.data = Data::Binary(vec![7; data_bytes]);
        prepared(e)
    };
    let mut stored = Vec::new();
    for first in (0..count).step_by(batch) {
        let appended = s
            .append(
                "t",
                (first..(first + batch).min(count)).map(large).collect(),
            )
            .await
            .expect("append");
        stored.extend(appended.iter().map(|a| a.sequence));
    }
    (stored, large(0).event().size())
}

/// The relay's feed read from the database (past the events the store keeps of its fresh commits,
/// 32 MiB) holds at most its bytes of large events, and the next read goes on after them.
async fn the_feed_read_from_the_database_holds_at_most_its_bytes(b: Backend) {
    let s = &b.store;
    let (stored, size) = store_large(s, "feed.x", 1 << 20, 40, 4).await;
    // the first events are no longer among the fresh commits kept: this read is the database's
    let first = s.read_all(0, 1000).await.expect("read_all");
    assert!(
        (1..=READ_BYTES / size).contains(&first.len()),
        "the read held {} events of {size} bytes",
        first.len()
    );
    let mut fed: Vec<u64> = first.iter().map(|e| e.sequence).collect();
    loop {
        let after = fed.last().copied().unwrap_or_default();
        let events = s.read_all(after, 1000).await.expect("read_all");
        if events.is_empty() {
            break;
        }
        fed.extend(events.iter().map(|e| e.sequence));
    }
    assert_eq!(fed, stored, "every event once, in order");
}

/// A read of large events holds no more than [`READ_BYTES`] of them (whatever its limit), is then not
/// exhausted, and the next read goes on after them.
async fn a_read_holds_at_most_its_bytes_and_the_next_goes_on_after_them(b: Backend) {
    let s = &b.store;
    // 100 events of 200 KB: each read holds about 40, cut inside SQLite's groups of 64 sequences
    let (stored, size) = store_large(s, "large.x", 200_000, 100, 10).await;
    let mut read = Vec::new();
    let mut after = 0;
    let exhausted = loop {
        let page = s
            .read(&ReadQuery {
                until: stored.last().copied(),
                ..query(after)
            })
            .await
            .expect("read");
        assert!(
            page.events.len() <= (READ_BYTES / size).max(1),
            "one read held {} events of {size} bytes",
            page.events.len()
        );
        read.extend(page.events.iter().map(|e| e.sequence));
        if page.exhausted || page.events.is_empty() {
            break page.exhausted;
        }
        assert_eq!(page.scanned_to, read.last().copied().unwrap_or_default());
        after = page.scanned_to;
    };
    assert!(exhausted, "the last read is exhausted");
    assert_eq!(read, stored, "every event once, in order");
    assert!(
        stored.len() > READ_BYTES / size,
        "the events fill more than one read"
    );
}

/// Time positions: the sequence before the first event recorded at or after a time, found without an
/// index on the time, is the one a scan of every event finds, for every commit's time and either side.
async fn each_time_is_the_position_before_the_first_event_recorded_at_it(b: Backend) {
    let s = &b.store;
    let now = chrono::Utc::now();
    assert_eq!(s.sequence_before(now).await.expect("before"), 0, "empty");
    for commit in 0..40 {
        let events = (0..3)
            .map(|i| new_event(&format!("c{commit}-{i}"), "shop.order.created"))
            .collect();
        s.append("t", events).await.expect("append");
    }
    let stored = s.read(&query(0)).await.expect("read").events;
    assert_eq!(stored.len(), 120);
    let last = stored[119].sequence;
    let scanned = |time: chrono::DateTime<chrono::Utc>| {
        stored
            .iter()
            .find(|e| e.recorded_at >= time)
            .map_or(last, |e| e.sequence - 1)
    };
    let tick = chrono::Duration::nanoseconds(1);
    for e in &stored {
        for time in [e.recorded_at - tick, e.recorded_at, e.recorded_at + tick] {
            assert_eq!(
                s.sequence_before(time).await.expect("before"),
                scanned(time),
                "the position before {time:?}"
            );
        }
    }
}

async fn dead_letters_are_recorded_once_listed_and_removed(b: Backend) {
    let s = &b.store;
    s.append("t", vec![new_event("d", "x.y"), new_event("e", "x.y")])
        .await
        .expect("append");
    let letter = |seq: u64, attempts: u32| DeadLetter {
        tenant: "t".into(),
        group: "g".into(),
        sequence: seq,
        attempts,
        reason: format!("attempt {attempts}"),
        dead_lettered_at: chrono::Utc::now(),
    };
    // a letter recorded again replaces the one there, and says which it replaced
    let mut replaced = Vec::new();
    for (seq, attempts) in [(1, 3), (1, 4), (2, 1)] {
        let put = s
            .put_dead_letter(&letter(seq, attempts))
            .await
            .expect("put");
        replaced.push(put.map(|d| (d.sequence, d.attempts)));
    }
    assert_eq!(replaced, [None, Some((1, 3)), None]);
    let letters = s.dead_letters("t", "g", 0, 10).await.expect("list");
    assert_eq!(
        letters
            .iter()
            .map(|d| (d.sequence, d.attempts))
            .collect::<Vec<_>>(),
        [(1, 4), (2, 1)],
        "one entry per event"
    );
    // what a letter replaced goes back, as it was, only where that letter still stands
    let stale = letter(1, 2);
    let fourth = s
        .put_dead_letter(&stale)
        .await
        .expect("put stale")
        .expect("it replaced the fourth attempt's");
    assert!(
        s.restore_dead_letter(&fourth, stale.dead_lettered_at)
            .await
            .expect("restore")
    );
    assert!(
        !s.restore_dead_letter(&letter(1, 9), stale.dead_lettered_at)
            .await
            .expect("restore again"),
        "the stale letter is gone: nothing to put back over"
    );
    assert_eq!(
        s.dead_letters("t", "g", 0, 10).await.expect("list"),
        letters,
        "the fourth attempt's letter is back as it was"
    );
    assert_eq!(
        s.dead_letter_counts("t", &["g".to_owned(), "none".to_owned()])
            .await
            .expect("counts"),
        [("g".to_owned(), 2)]
    );
    assert!(
        s.dead_letter_counts("t", &["none".to_owned()])
            .await
            .expect("counts of a group with none")
            .is_empty()
    );
    // a letter goes only as it was listed: recorded again since, it stays
    let listed: Vec<_> = letters
        .iter()
        .map(|d| (d.sequence, d.dead_lettered_at))
        .collect();
    s.put_dead_letter(&DeadLetter {
        reason: "again".into(),
        ..letter(2, 2)
    })
    .await
    .expect("put again");
    assert_eq!(
        s.remove_dead_letters("t", "g", &listed)
            .await
            .expect("remove"),
        1
    );
    let left = s.dead_letters("t", "g", 0, 10).await.expect("list");
    assert_eq!(
        left.iter()
            .map(|d| (d.sequence, d.reason.as_str()))
            .collect::<Vec<_>>(),
        [(2, "again")]
    );
}

fn publisher(tenant: &str, principal: &str, types: &[&str]) -> Publisher {
    Publisher {
        tenant: tenant.into(),
        principal: principal.into(),
        types: types.iter().map(|t| t.to_string()).collect(),
        sources: vec!["//shop/*".into(), "//billing".into()],
        description: format!("{principal} of {tenant}"),
        updated_at: chrono::Utc::now(),
    }
}

async fn publishers_are_registered_once_updated_and_removed(b: Backend) {
    let s = &b.store;
    let original = publisher("t", "svc-orders", &["shop.order.*", "shop.>"]);
    assert!(s.insert_publisher(&original).await.expect("insert"));
    let mut duplicate = publisher("t", "svc-orders", &["other.>"]);
    duplicate.description = "second registration".into();
    assert!(
        !s.insert_publisher(&duplicate).await.expect("insert again"),
        "(tenant, principal) is registered once"
    );
    assert_eq!(
        s.publishers().await.expect("list"),
        std::slice::from_ref(&original),
        "a refused duplicate changes nothing"
    );
    let updated = Publisher {
        types: vec!["shop.refund.created".into()],
        sources: Vec::new(),
        description: "refunds only".into(),
        updated_at: original.updated_at + chrono::Duration::seconds(5),
        ..original.clone()
    };
    assert!(s.update_publisher(&updated).await.expect("update"));
    assert_eq!(s.publishers().await.expect("list"), [updated]);
    assert!(s.remove_publisher("t", "svc-orders").await.expect("remove"));
    assert!(
        !s.remove_publisher("t", "svc-orders")
            .await
            .expect("remove again")
    );
    assert!(s.publishers().await.expect("list").is_empty());
    assert!(
        !s.update_publisher(&original).await.expect("update missing"),
        "an update registers nothing"
    );
    assert!(s.publishers().await.expect("list").is_empty());
}

async fn publishers_of_tenants_are_kept_apart_and_listed_in_order(b: Backend) {
    let s = &b.store;
    // inserted out of order; byte order puts upper case first on every backend
    for (tenant, principal) in [
        ("u", "b"),
        ("t", "b"),
        ("u", "a"),
        ("t", "a"),
        ("t", "B"),
        ("t", "a-2"),
    ] {
        assert!(
            s.insert_publisher(&publisher(tenant, principal, &["x.>"]))
                .await
                .expect("insert")
        );
    }
    let listed = |publishers: Vec<Publisher>| {
        publishers
            .into_iter()
            .map(|p| (p.tenant, p.principal))
            .collect::<Vec<_>>()
    };
    let pairs = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(t, p)| (t.to_string(), p.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(s.publishers().await.expect("list")),
        pairs(&[
            ("t", "B"),
            ("t", "a"),
            ("t", "a-2"),
            ("t", "b"),
            ("u", "a"),
            ("u", "b")
        ])
    );
    // the same principal in another tenant is another publisher
    assert!(s.remove_publisher("u", "a").await.expect("remove"));
    let mut changed = publisher("t", "b", &["y.*"]);
    changed.description = "changed in t".into();
    assert!(s.update_publisher(&changed).await.expect("update"));
    let all = s.publishers().await.expect("list");
    assert_eq!(
        listed(all.clone()),
        pairs(&[("t", "B"), ("t", "a"), ("t", "a-2"), ("t", "b"), ("u", "b")])
    );
    let description = |tenant: &str, principal: &str| {
        all.iter()
            .find(|p| p.tenant == tenant && p.principal == principal)
            .map(|p| p.description.clone())
    };
    assert_eq!(description("t", "b").as_deref(), Some("changed in t"));
    assert_eq!(description("u", "b").as_deref(), Some("b of u"));
}

fn audit_record(tenant: &str, principal: &str, outcome: &str, resource: &str) -> AuditRecord {
    AuditRecord {
        id: 0,
        time: chrono::Utc::now(),
        tenant: tenant.into(),
        principal: principal.into(),
        action: "publish".into(),
        resource: resource.into(),
        outcome: outcome.into(),
        reason: format!("{outcome} for {principal}"),
    }
}

async fn audit_records_are_read_by_tenant_in_id_order_with_filters_and_paging(b: Backend) {
    let s = &b.store;
    let records = [
        audit_record("t", "alice", "denied", "r1"),
        audit_record("u", "bob", "denied", "r2"),
        audit_record("t", "bob", "allowed", "r3"),
        audit_record("", "", "unauthenticated", "r4"),
        audit_record("t", "alice", "allowed", "r5"),
    ];
    s.append_audit(&records[..3]).await.expect("append");
    s.append_audit(&[]).await.expect("append nothing");
    s.append_audit(&records[3..]).await.expect("append");
    let read = |query: AuditQuery| async move { s.audit(&query).await.expect("audit") };
    let of = |tenants: &[&str]| AuditQuery {
        tenants: tenants.iter().map(|t| t.to_string()).collect(),
        ..AuditQuery::default()
    };
    let resources = |records: &[AuditRecord]| {
        records
            .iter()
            .map(|r| r.resource.clone())
            .collect::<Vec<_>>()
    };

    let t = read(of(&["t"])).await;
    assert_eq!(resources(&t), ["r1", "r3", "r5"], "only tenant t, in order");
    assert!(
        t.windows(2).all(|w| w[0].id < w[1].id),
        "ids increase: {t:?}"
    );
    assert!(t[0].id > 0);
    // everything else is stored as given
    for (read, given) in t.iter().zip([&records[0], &records[2], &records[4]]) {
        assert_eq!(
            read,
            &AuditRecord {
                id: read.id,
                ..given.clone()
            }
        );
    }
    assert_eq!(resources(&read(of(&["u"])).await), ["r2"]);
    assert_eq!(
        resources(&read(of(&[""])).await),
        ["r4"],
        "unauthenticated callers have the empty tenant"
    );
    let both = read(of(&["t", "u"])).await;
    assert_eq!(resources(&both), ["r1", "r2", "r3", "r5"]);
    assert!(
        both.windows(2).all(|w| w[0].id < w[1].id),
        "ids follow append order across tenants"
    );
    assert!(read(of(&[])).await.is_empty(), "no tenants, no records");
    assert!(read(of(&["nobody"])).await.is_empty());

    // paging by id
    let page = read(AuditQuery {
        limit: 2,
        ..of(&["t"])
    })
    .await;
    assert_eq!(resources(&page), ["r1", "r3"]);
    let next = read(AuditQuery {
        after_id: page[1].id,
        limit: 2,
        ..of(&["t"])
    })
    .await;
    assert_eq!(resources(&next), ["r5"]);
    assert!(
        read(AuditQuery {
            after_id: next[0].id,
            ..of(&["t"])
        })
        .await
        .is_empty()
    );

    // filters
    assert_eq!(
        resources(
            &read(AuditQuery {
                principal: Some("alice".into()),
                ..of(&["t", "u"])
            })
            .await
        ),
        ["r1", "r5"]
    );
    assert_eq!(
        resources(
            &read(AuditQuery {
                outcome: Some("denied".into()),
                ..of(&["t", "u"])
            })
            .await
        ),
        ["r1", "r2"]
    );
    assert_eq!(
        resources(
            &read(AuditQuery {
                principal: Some("bob".into()),
                outcome: Some("denied".into()),
                ..of(&["t", "u"])
            })
            .await
        ),
        ["r2"]
    );
    assert_eq!(
        resources(
            &read(AuditQuery {
                principal: Some("alice".into()),
                after_id: t[0].id,
                ..of(&["t"])
            })
            .await
        ),
        ["r5"]
    );

    // limit 0 reads up to 100
    let many: Vec<AuditRecord> = (0..150)
        .map(|i| audit_record("v", "carol", "denied", &format!("m{i}")))
        .collect();
    s.append_audit(&many).await.expect("append many");
    let first = read(of(&["v"])).await;
    assert_eq!(first.len(), 100);
    assert_eq!(
        resources(&first),
        (0..100).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "ids follow the order of the slice"
    );
    let rest = read(AuditQuery {
        after_id: first[99].id,
        limit: 1000,
        ..of(&["v"])
    })
    .await;
    assert_eq!(
        resources(&rest),
        (100..150).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
}

/// Pruning goes step by step from the oldest record: each step reads the next `max` records after a
/// position, deletes those made before the cutoff (a newer one among them stays), and says where it
/// stopped; past the last record there is no step.
async fn audit_records_are_pruned_oldest_first_before_a_time(b: Backend) {
    let s = &b.store;
    let now = chrono::Utc::now();
    let aged = |resource: &str, age_hours: i64| AuditRecord {
        time: now - chrono::Duration::hours(age_hours),
        ..audit_record("t", "alice", "denied", resource)
    };
    s.append_audit(&[
        aged("old1", 3),
        aged("old2", 3),
        aged("new", 0),
        aged("late", 3),
    ])
    .await
    .expect("append");
    let stored = || async {
        s.audit(&AuditQuery {
            tenants: vec!["t".into()],
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("audit")
    };
    let ids: Vec<u64> = stored().await.iter().map(|r| r.id).collect();
    let cutoff = now - chrono::Duration::hours(1);
    let step = |after_id: u64, max: usize| async move {
        s.prune_audit(cutoff, after_id, max).await.expect("prune")
    };
    let pruned = |deleted: u64, last: usize| AuditPruned {
        deleted,
        last_id: Some(ids[last]),
    };
    assert_eq!(step(0, 1).await, pruned(1, 0));
    // "old2" and "new": the newer one stays
    assert_eq!(step(ids[0], 2).await, pruned(1, 2));
    let left: Vec<String> = stored().await.into_iter().map(|r| r.resource).collect();
    assert_eq!(left, ["new", "late"]);
    assert_eq!(step(ids[2], 10).await, pruned(1, 3));
    assert_eq!(
        step(ids[3], 10).await,
        AuditPruned {
            deleted: 0,
            last_id: None
        }
    );
}

/// The columns of a row as stores wrote it before bodies were binary: the body is the event's JSON.
const LEGACY_ROW: &str = "INSERT INTO events (seq, tenant, source, id, type, subject, correlation_id, \
     priority, recorded_ns, content_hash, body) VALUES (1, 't', '//conformance', 'legacy', 'x.rich', \
     'orders/42', 'corr', 3, 1764000000000000000, ";

/// A SQLite store holding one event (sequence 1, `rich_event("legacy")`) committed as JSON.
async fn sqlite_with_a_json_body() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteDb::open(&dir.path().join("nerve.db"))
        .await
        .expect("open sqlite");
    let json = serde_json::to_string(&rich_event("legacy")).expect("json");
    // the body column was and is TEXT; JSON bodies are still in it after the upgrade
    sqlx::query(sqlx::AssertSqlSafe(format!("{LEGACY_ROW} ?, ?)")))
        .bind(&rich_event("legacy").content_hash()[..])
        .bind(json)
        .execute(&mut *db.writer.lock().await)
        .await
        .expect("insert a JSON row");
    Backend {
        store: SqliteStore::start(db).await.expect("start"),
        _dir: Some(dir),
    }
}

/// A Postgres store migrated from a schema before migration 0004, holding one event (sequence 1,
/// `rich_event("legacy")`) committed as JSON then.
async fn postgres_with_a_json_body() -> Backend {
    use sqlx::Connection as _;
    let url = fresh_schema_url().await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut before = sqlx::migrate!("server/migrations/postgres");
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < 4)
        .cloned()
        .collect();
    before.run(&mut conn).await.expect("migrations before 0004");
    let json = serde_json::to_string(&rich_event("legacy")).expect("json");
    sqlx::query(sqlx::AssertSqlSafe(format!("{LEGACY_ROW} $1, $2)")))
        .bind(&rich_event("legacy").content_hash()[..])
        .bind(json)
        .execute(&mut conn)
        .await
        .expect("insert a JSON row");
    sqlx::query("UPDATE nerve_sequence SET seq = 1, recorded_ns = 1764000000000000000")
        .execute(&mut conn)
        .await
        .expect("advance the sequence");
    Backend {
        store: PostgresStore::connect(&url, 8)
            .await
            .expect("connect and migrate"),
        _dir: None,
    }
}

/// An event committed as JSON before bodies were binary reads back unchanged through every read, beside
/// one committed after.
async fn json_bodies_from_before_read_back_unchanged(b: Backend) {
    let s = &b.store;
    let appended = s
        .append("t", vec![prepared(rich_event("binary"))])
        .await
        .expect("append");
    assert_eq!(appended[0].sequence, 2);
    let expected = [rich_event("legacy"), rich_event("binary")];
    let events = |stored: &[Arc<nerve::event::StoredEvent>]| -> Vec<Event> {
        stored.iter().map(|e| e.event.clone()).collect()
    };
    assert_eq!(
        events(&s.read(&query(0)).await.expect("read").events),
        expected
    );
    let by_type = ReadQuery {
        types: vec![TypePattern::parse("x.rich").expect("pattern")],
        ..query(0)
    };
    assert_eq!(
        events(&s.read(&by_type).await.expect("read").events),
        expected
    );
    assert_eq!(
        events(&s.read_sequences(&[1, 2]).await.expect("read_sequences")),
        expected
    );
    assert_eq!(
        events(&s.read_all(0, 10).await.expect("read_all")),
        expected
    );
    assert_eq!(
        events(&s.find("t", "legacy", None, 0).await.expect("find")),
        expected[..1]
    );
    // a retry of the JSON-stored event is still recognized as the same event
    let retried = s
        .append("t", vec![prepared(rich_event("legacy"))])
        .await
        .expect("retry");
    assert_eq!((retried[0].sequence, retried[0].duplicate), (1, true));
}

#[tokio::test]
async fn sqlite_json_bodies_from_before_read_back_unchanged() {
    json_bodies_from_before_read_back_unchanged(sqlite_with_a_json_body().await).await;
}

#[tokio::test]
async fn postgres_json_bodies_from_before_read_back_unchanged() {
    json_bodies_from_before_read_back_unchanged(postgres_with_a_json_body().await).await;
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::sqlite().await).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::postgres().await).await })*
        }
    };
}

conformance!(
    appends_in_order_and_returns_the_original_sequence_for_duplicates,
    a_conflicting_request_fails_alone_and_leaves_no_gap,
    a_request_the_database_refuses_fails_alone,
    large_commits_store_every_event_once_with_exact_type_statistics,
    concurrent_publishers_get_gapless_sequences_a_follower_sees_in_order,
    the_feed_of_fresh_commits_equals_what_the_database_holds,
    reads_filter_by_type_source_subject_correlation_priority_and_range,
    a_type_asked_for_twice_reads_its_events_once,
    a_read_holds_at_most_its_bytes_and_the_next_goes_on_after_them,
    the_feed_read_from_the_database_holds_at_most_its_bytes,
    each_time_is_the_position_before_the_first_event_recorded_at_it,
    dead_letters_are_recorded_once_listed_and_removed,
    publishers_are_registered_once_updated_and_removed,
    publishers_of_tenants_are_kept_apart_and_listed_in_order,
    audit_records_are_read_by_tenant_in_id_order_with_filters_and_paging,
    audit_records_are_pruned_oldest_first_before_a_time,
);

/// The database closed the writer's connection while it was unused (an idle timeout, a pooler, a
/// restart): the next publish still commits, on a connection made again, instead of failing.
#[tokio::test]
async fn postgres_writer_reconnects_when_its_unused_connection_was_closed() {
    use sqlx::Connection as _;
    let name = format!("nerve-idle-{}", uuid::Uuid::new_v4().simple());
    let url = format!("{}&application_name={name}", fresh_schema_url().await);
    let store = PostgresStore::connect(&url, 8).await.expect("connect");
    store
        .append("t", vec![new_event("before", "x.y")])
        .await
        .expect("append");
    let admin_url = url.split('?').next().expect("url").to_owned();
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("connect");
    let ended: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
            .bind(&name)
            .fetch_all(&mut admin)
            .await
            .expect("the store's connections");
    assert!(!ended.is_empty(), "no connection of the store was found");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid")
        .bind(&ended)
        .execute(&mut admin)
        .await
        .expect("terminate");
    eventually("the store's connections gone", || {
        let (admin_url, ended) = (admin_url.clone(), ended.clone());
        async move {
            let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                    .bind(&ended)
                    .fetch_one(&mut admin)
                    .await
                    .ok()?;
            (left == 0).then_some(())
        }
    })
    .await;
    // the writer checks a connection unused for a second before it commits on it
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let appended = store
        .append("t", vec![new_event("after", "x.y")])
        .await
        .expect("a publish after the database closed the writer's connection");
    assert_eq!(appended[0].sequence, 2);
}

/// Two replicas commit into one database while a follower on the first tails the log: it learns of the
/// second replica's commits through the database's notifications and skips none of 20,000 events.
#[tokio::test]
async fn postgres_replicas_interleave_and_a_follower_skips_nothing() {
    let url = fresh_schema_url().await;
    let replicas: [Arc<dyn EventStore>; 2] = [
        PostgresStore::connect(&url, 8).await.expect("replica 1"),
        PostgresStore::connect(&url, 8).await.expect("replica 2"),
    ];
    const PUBLISHERS: usize = 16;
    const BATCHES: usize = 125;
    const BATCH: usize = 10;
    let total = PUBLISHERS * BATCHES * BATCH;
    let follower = follow(replicas[0].clone(), total);
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let s = replicas[p % 2].clone();
        publishers.push(tokio::spawn(async move {
            for b in 0..BATCHES {
                // uneven pacing, so the replicas' transactions interleave differently on every run
                let pause = (p * 7 + b * 13) % 3;
                tokio::time::sleep(std::time::Duration::from_millis(pause as u64)).await;
                let batch = (0..BATCH)
                    .map(|i| new_event(&format!("p{p}-b{b}-{i}"), "x.y"))
                    .collect();
                s.append("t", batch).await.expect("append");
            }
        }));
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    let seen = tokio::time::timeout(std::time::Duration::from_secs(60), follower)
        .await
        .expect("follower done")
        .expect("follower");
    assert_eq!(seen.len(), total);
}

/// A Postgres commit takes its recorded time once it holds the sequence row, not before it waits for
/// it: a time lookup that waits for the row (Replay's end time) then counts every commit stamped
/// before it. Here the row is held by another transaction while a commit waits for it.
#[tokio::test]
async fn postgres_a_commit_is_stamped_once_it_holds_the_sequence_row() {
    use sqlx::Connection as _;
    let url = fresh_schema_url().await;
    let store = PostgresStore::connect(&url, 8).await.expect("store");
    // the writer's connection is made by its first commit
    store
        .append("t", vec![new_event("first", "x.y")])
        .await
        .expect("append");
    let mut holder = sqlx::PgConnection::connect(&url).await.expect("connect");
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .expect("pid");
    sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .expect("begin");
    sqlx::query("SELECT seq FROM nerve_sequence FOR UPDATE")
        .execute(&mut holder)
        .await
        .expect("hold the sequence row");
    let commit = tokio::spawn({
        let store = store.clone();
        async move { store.append("t", vec![new_event("held", "x.y")]).await }
    });
    let mut watcher = sqlx::PgConnection::connect(&url).await.expect("connect");
    let watcher = tokio::sync::Mutex::new(&mut watcher);
    eventually("the commit waits for the sequence row", || async {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(holder_pid)
        .fetch_one(&mut **watcher.lock().await)
        .await
        .expect("blocked backends");
        (blocked > 0).then_some(())
    })
    .await;
    let released_ns: i64 = sqlx::query_scalar(
        "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT * 1000",
    )
    .fetch_one(&mut holder)
    .await
    .expect("time");
    sqlx::query("COMMIT")
        .execute(&mut holder)
        .await
        .expect("let go");
    let appended = commit.await.expect("join").expect("committed");
    let stored = store
        .read_sequences(&[appended[0].sequence])
        .await
        .expect("read");
    let recorded_ns = stored[0].recorded_at.timestamp_nanos_opt().expect("ns");
    assert!(
        recorded_ns >= released_ns,
        "stamped {} ns before the row was free",
        released_ns - recorded_ns
    );
}
