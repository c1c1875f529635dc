use std::collections::BTreeSet;

use tonic::Code;

use crate::harness::*;
use nerve::api::pb::{self, subscribe_request::Action};

#[tokio::test]
async fn private_stream_from_latest_gets_only_new_matching_events() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish(&mut bus, vec![event("old", "orders.created")]).await;
    let mut sub = Subscriber::open(&mut bus, open(&["orders.*"], ""))
        .await
        .expect("open");
    sub.until_caught_up().await;
    publish(
        &mut bus,
        vec![
            event("other", "users.created"),
            event("new", "orders.created"),
        ],
    )
    .await;
    let d = sub.next_delivery().await;
    assert_eq!(id(&d), "new");
    assert_eq!(d.attempt, 1);
    sub.ack_one(&d).await;
    sub.expect_idle(2).await;
}

#[tokio::test]
async fn catch_up_from_sequence_zero_reaches_live_with_no_gap_and_no_duplicate() {
    // a small tail forces the catch-up through the store while publishing continues
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let history = publish_n(&mut bus, "h", "stream.tick", 3000).await;
    let publisher = {
        let mut bus = server.bus();
        tokio::spawn(async move { publish_n(&mut bus, "live", "stream.tick", 2000).await })
    };
    let mut o = open(&["stream.tick"], "");
    o.start = after_sequence(0);
    o.max_in_flight = 200;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let mut seen = Vec::new();
    while seen.len() < 5000 {
        let d = sub.next_delivery().await;
        seen.push(seq(&d));
        sub.ack_one(&d).await;
    }
    let live = publisher.await.expect("publisher");
    let expected: Vec<u64> = history.into_iter().chain(live).collect();
    assert_eq!(seen, expected, "every event once, in sequence order");
    assert!(sub.caught_up.is_some() || sub.until_caught_up().await.is_empty());
    sub.expect_idle(1).await;
}

#[tokio::test]
async fn history_older_than_the_tail_is_read_from_the_store_once_and_in_order() {
    // More events than the in-memory tail keeps (16,384): the oldest come from the store in pages. All
    // types match nearly every sequence, so their pages are read several ranges ahead; `*.rare` matches
    // one in twenty, read one page of matches ahead. Both selections are patterns, not literal types.
    // A window of 64 reads no more than 64 events at a time.
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let (mut every, mut rare) = (Vec::new(), Vec::new());
    for round in 0..10 {
        every.extend(publish_n(&mut bus, &format!("c{round}"), "history.common", 1900).await);
        let sequences = publish_n(&mut bus, &format!("r{round}"), "history.rare", 100).await;
        every.extend(&sequences);
        rare.extend(sequences);
    }
    every.sort_unstable();
    for (types, expected, window) in [
        ("history.*", every.clone(), 5000),
        ("*.rare", rare, 5000),
        ("history.*", every, 64),
    ] {
        let mut o = open(&[types], "");
        o.start = after_sequence(0);
        o.max_in_flight = window;
        let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
        let mut seen = Vec::with_capacity(expected.len());
        while seen.len() < expected.len() {
            let run = sub
                .deliveries((window as usize).min(500).min(expected.len() - seen.len()))
                .await;
            let ids: Vec<String> = run.iter().map(|d| d.delivery_id.clone()).collect();
            sub.ack(&ids).await;
            seen.extend(run.iter().map(seq));
        }
        assert_eq!(
            seen, expected,
            "{types}, window {window}: every event once, in sequence order"
        );
        sub.until_caught_up().await;
        sub.expect_idle(1).await;
    }
}

#[tokio::test]
async fn start_after_sequence_and_at_time_resume_where_asked() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let first = publish_n(&mut bus, "a", "resume.x", 5).await;
    let mut o = open(&["resume.x"], "");
    o.start = after_sequence(first[2]);
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let got: Vec<u64> = sub.deliveries(2).await.iter().map(seq).collect();
    assert_eq!(got, first[3..].to_vec());

    let stored = server.stored_event("a-3").await;
    let mut o = open(&["resume.x"], "");
    o.start = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Time(
            stored.recorded_time.expect("recorded"),
        )),
    });
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open at time");
    let d = sub.next_delivery().await;
    assert!(
        seq(&d) <= first[3],
        "starts at or before the event recorded at that time"
    );
}

/// A private stream that starts at a time still ahead gets only what is recorded from then on: an
/// event published before that time is not delivered, one published after it is.
#[tokio::test]
async fn a_start_time_ahead_delivers_only_events_recorded_from_then() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let start = std::time::SystemTime::now() + std::time::Duration::from_millis(1_500);
    let mut o = open(&["ahead.x"], "");
    o.start = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Time(start.into())),
    });
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    publish(&mut bus, vec![event("early", "ahead.x")]).await;
    // the clock itself is what this waits for
    let left = start
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + std::time::Duration::from_millis(50)).await;
    let late = publish(&mut bus, vec![event("late", "ahead.x")]).await[0];
    let d = sub.next_delivery().await;
    assert_eq!(
        seq(&d),
        late,
        "{:?} was recorded before the start",
        d.event.as_ref().map(|e| &e.id)
    );
}

#[tokio::test]
async fn credits_bound_what_the_server_sends() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish_n(&mut bus, "c", "credit.x", 20).await;
    let mut o = open(&["credit.x"], "");
    o.start = earliest();
    o.max_in_flight = 5;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let first = sub.deliveries(5).await;
    sub.expect_idle(2).await;
    sub.send(Action::Credit(pb::Credit { credits: 3 })).await;
    let more = sub.deliveries(3).await;
    sub.expect_idle(1).await;
    sub.ack(&[first[0].delivery_id.clone(), more[0].delivery_id.clone()])
        .await;
    let after_ack = sub.deliveries(2).await;
    let all: BTreeSet<u64> = first
        .iter()
        .chain(&more)
        .chain(&after_ack)
        .map(seq)
        .collect();
    assert_eq!(all.len(), 10, "no duplicates");
    sub.expect_idle(1).await;
}

#[tokio::test]
async fn opening_badly_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    for (o, needle) in [
        (open(&["a.>.b"], ""), "open.types[0]"),
        (open(&["a"], "bad group!"), "open.group"),
        (
            pb::SubscriptionOpen {
                types: (0..101).map(|i| format!("t.{i}")).collect(),
                ..open(&[], "")
            },
            "more than the limit of 100",
        ),
        (
            pb::SubscriptionOpen {
                max_in_flight: 1_000_000,
                ..open(&["a"], "")
            },
            "open.max_in_flight",
        ),
        (
            pb::SubscriptionOpen {
                ack_deadline: millis(1),
                ..open(&["a"], "g")
            },
            "open.ack_deadline",
        ),
    ] {
        let result = Subscriber::open(&mut bus, o).await;
        let status = result.err().expect("rejected");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{needle}: {status:?}");
    }
    // a first message that is not open
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::SubscribeRequest {
        action: Some(Action::Credit(pb::Credit { credits: 1 })),
    })
    .await
    .expect("send");
    let result = bus
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    assert_status(result, Code::InvalidArgument, "first message");
}

#[tokio::test]
async fn malformed_ack_ends_the_stream_with_invalid_argument() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut sub = Subscriber::open(&mut bus, open(&["a"], ""))
        .await
        .expect("open");
    sub.ack(&["not-an-id".to_owned()]).await;
    let status = sub.final_status().await.expect_err("ends with error");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("ack.delivery_ids[0]"),
        "{status:?}"
    );
}

/// Heartbeats come at the interval asked for (the harness asks for 200 ms), which the server confirms
/// on open, so that a client can tell a quiet stream from a dead connection; without one asked for,
/// the confirmation names the default. The window in effect is confirmed alike.
#[tokio::test]
async fn heartbeats_flow_while_idle() {
    let server = TestServer::start_with(|c| c.bus.default_max_in_flight = 300).await;
    let mut bus = server.bus();
    let mut o = open(&["quiet.>"], "");
    o.max_in_flight = 7;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    assert_eq!(sub.subscribed.heartbeat_interval, millis(200));
    assert_eq!(sub.subscribed.max_in_flight, 7);
    let defaults = pb::SubscriptionOpen {
        heartbeat_interval: None,
        max_in_flight: 0,
        ..open(&["quiet.>"], "")
    };
    let default = Subscriber::open(&mut bus, defaults).await.expect("open");
    assert_eq!(default.subscribed.heartbeat_interval, millis(10_000));
    assert_eq!(default.subscribed.max_in_flight, 300);
    sub.expect_idle(3).await;
    assert!(
        sub.caught_up.is_some(),
        "a live stream reports it is caught up"
    );
}

/// The longest silence between the next `n` heartbeats, asserting nothing is delivered meanwhile.
async fn longest_silence(sub: &mut Subscriber, n: usize) -> std::time::Duration {
    let mut last = tokio::time::Instant::now();
    let mut longest = std::time::Duration::ZERO;
    for _ in 0..n {
        let delivered = sub.next_delivery_or_heartbeat(WAIT).await;
        assert!(delivered.is_none(), "nothing matches: {delivered:?}");
        longest = longest.max(last.elapsed());
        last = tokio::time::Instant::now();
    }
    longest
}

/// Opens a subscription (in `group`, or private) with heartbeats every `interval_ms`, from the
/// earliest of 30,000 events, with a filter that matches none of them, on a store whose reads take
/// 50 ms and a bus that keeps publishing events nobody selects (the head changes all the time).
/// Returns the longest silence between its first `beats` heartbeats, and whether it caught up
/// meanwhile.
async fn silence_while_reading_nothing(
    group: &str,
    interval_ms: i32,
    beats: usize,
) -> (std::time::Duration, bool) {
    let (server, injection) = crate::injected_store::start_injected().await;
    let mut bus = server.bus();
    publish_n(&mut bus, "hay", "hay.x", 30_000).await;
    // private reads of the window (64 events) at 50 ms each: a turn of 16 reads takes 800 ms, the
    // whole history many seconds
    injection
        .read_delay_ms
        .store(50, std::sync::atomic::Ordering::SeqCst);
    let busy = {
        let mut bus = server.bus();
        tokio::spawn(async move {
            for i in 0.. {
                publish(&mut bus, vec![event(&format!("noise-{i}"), "noise.x")]).await;
            }
        })
    };
    let mut o = open(&["hay.x"], group);
    o.start = earliest();
    o.heartbeat_interval = millis(interval_ms);
    o.filter = Some(pb::Filter {
        filter: Some(pb::filter::Filter::Exact(pb::AttributeValues {
            attributes: [("subject".to_owned(), "never".to_owned())].into(),
        })),
    });
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let longest = longest_silence(&mut sub, beats).await;
    busy.abort();
    (longest, sub.caught_up.is_some())
}

/// Heartbeats keep coming, well within 3 intervals of each other (what the clients wait before they
/// take a stream for dead), while a private stream reads history that matches nothing on a busy bus:
/// a head that changes on every publish wakes the stream's loop before its heartbeat timer, and one
/// turn of the loop reads for longer than 3 intervals here.
#[tokio::test]
async fn heartbeats_come_while_history_that_matches_nothing_is_read_on_a_busy_bus() {
    let (longest, caught_up) = silence_while_reading_nothing("", 200, 10).await;
    assert!(!caught_up, "the history was read before 10 heartbeats came");
    assert!(
        longest < std::time::Duration::from_millis(600),
        "{longest:?} between heartbeats of 200 ms"
    );
}

/// The same for a group claiming a backlog that matches nothing: on Redis one claim used to read the
/// whole backlog, 64 entries a round trip, before the session could send anything (over 10 s here).
/// Claims go on for seconds, a few Redis round trips each, so the heartbeats are 500 ms apart: a
/// turn of claims then fits well inside the clients' 3 intervals on a loaded host. On embedded the
/// claims read the store a page of bytes at a time, this backlog in a few reads: there it checks
/// only that the heartbeats go on as the group catches up.
#[tokio::test]
async fn heartbeats_come_while_a_group_claims_a_backlog_that_matches_nothing() {
    let (longest, caught_up) = silence_while_reading_nothing("sparse-heartbeats", 500, 5).await;
    if redis_backend() {
        assert!(
            !caught_up,
            "the backlog was claimed before 5 heartbeats came"
        );
    }
    assert!(
        longest < std::time::Duration::from_millis(1_500),
        "{longest:?} between heartbeats of 500 ms"
    );
}

#[tokio::test]
async fn half_closing_the_request_side_keeps_deliveries_coming() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = open(&["half.x"], "");
    o.max_in_flight = 3;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    sub.half_close();
    sub.until_caught_up().await;
    // more than the window: a subscriber that can no longer ack frees no slot, so none is held
    let stored = publish_n(&mut bus, "h", "half.x", 5).await;
    let delivered: Vec<u64> = sub.deliveries(5).await.iter().map(seq).collect();
    assert_eq!(delivered, stored);
}

/// A group member that half-closes could settle nothing it receives: every event it took would come
/// back as a failed attempt until healthy events were dead-lettered. Its stream ends naming the
/// cause, and what it held goes to another member at once, not when its lease runs out.
#[tokio::test]
async fn a_group_member_that_half_closes_ends_and_hands_back_what_it_held() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = open(&["halfg.x"], "halves");
    o.ack_deadline = millis(60_000);
    let mut held = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    publish(&mut bus, vec![event("h1", "halfg.x")]).await;
    assert_eq!(id(&held.next_delivery().await), "h1");
    let mut other = Subscriber::open(&mut bus, o).await.expect("open");
    held.half_close();
    // heartbeats would keep `final_status` reading a stream that goes on
    let status = tokio::time::timeout(WAIT, held.final_status())
        .await
        .expect("the half-closed member's stream ended")
        .expect_err("ended");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("half-closed"), "{status:?}");
    assert_eq!(id(&other.next_delivery().await), "h1");
}

#[tokio::test]
async fn a_start_past_the_head_is_out_of_range_instead_of_skipping_what_comes() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let stored = publish_n(&mut bus, "p", "past.x", 3).await;
    let head = stored[2];
    for group in ["", "past-group"] {
        let mut o = open(&["past.x"], group);
        // e.g. a position kept from a store since wiped
        o.start = after_sequence(head + 100);
        let status = Subscriber::open(&mut bus, o).await.err().expect("refused");
        assert_eq!(status.code(), Code::OutOfRange, "{group:?}: {status:?}");
        assert!(
            status.message().contains("open.start.after_sequence"),
            "{status:?}"
        );
    }
    // at the head it is the live tail: the next event comes
    let mut o = open(&["past.x"], "");
    o.start = after_sequence(head);
    let mut sub = Subscriber::open(&mut bus, o)
        .await
        .expect("open at the head");
    let next = publish_n(&mut bus, "q", "past.x", 1).await;
    assert_eq!(seq(&sub.next_delivery().await), next[0]);
}
