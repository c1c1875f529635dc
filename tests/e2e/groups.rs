use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use crate::{harness::*, injected_store::start_injected};
use nerve::api::pb::{self, subscribe_request::Action};

fn group_open(types: &[&str], group: &str) -> pb::SubscriptionOpen {
    pb::SubscriptionOpen {
        start: earliest(),
        ..open(types, group)
    }
}

/// Waits until the group reports `n` pending deliveries.
async fn await_pending(server: &TestServer, group: &str, n: u64) {
    let admin = server.admin();
    eventually(&format!("{n} pending in group {group}"), || {
        let mut admin = admin.clone();
        async move {
            let groups = admin
                .list_groups(pb::ListGroupsRequest::default())
                .await
                .ok()?
                .into_inner()
                .groups;
            groups
                .iter()
                .find(|g| g.name == group && g.pending == n)
                .map(|_| ())
        }
    })
    .await;
}

#[tokio::test]
async fn one_group_load_balances_across_three_subscribers() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut o = group_open(&["jobs.>"], "workers");
        o.max_in_flight = 10;
        let sub = Subscriber::open(&mut bus, o).await.expect("open");
        assert_eq!(sub.subscribed.group, "workers");
        subs.push(sub);
    }
    publish_n(&mut bus, "j", "jobs.run", 300).await;
    let mut per_sub = vec![0usize; 3];
    let mut seen = BTreeSet::new();
    // hold each delivery unacked until all three have work, so none can take everything
    'outer: loop {
        for (i, sub) in subs.iter_mut().enumerate() {
            if let Some(d) = sub.try_next_delivery(Duration::from_millis(50)).await {
                assert!(seen.insert(seq(&d)), "delivered twice: {}", seq(&d));
                per_sub[i] += 1;
                sub.ack_one(&d).await;
            }
            if seen.len() == 300 {
                break 'outer;
            }
        }
    }
    assert!(
        per_sub.iter().all(|n| *n > 0),
        "every member got work: {per_sub:?}"
    );
    for sub in &mut subs {
        sub.expect_idle(1).await;
    }
}

/// Members claiming one backlog at once: each claim reads its events before it takes the group's
/// cursor, so a read overtaken by another member's claim must hand out only what is still unclaimed.
#[tokio::test]
async fn a_backlog_claimed_by_competing_members_is_delivered_once() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    // another type in between, so the claims also skip what the group does not select
    let mut expected = BTreeSet::new();
    for round in 0..4 {
        expected.extend(publish_n(&mut bus, &format!("b{round}"), "backlog.item", 500).await);
        publish_n(&mut bus, &format!("o{round}"), "other.item", 100).await;
    }
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut o = group_open(&["backlog.>"], "drainers");
        o.max_in_flight = 64;
        subs.push(Subscriber::open(&mut bus, o).await.expect("open"));
    }
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} delivered in 60 s",
            seen.len(),
            expected.len()
        );
        for sub in &mut subs {
            let mut ids = Vec::new();
            while let Some(d) = sub.try_next_delivery(Duration::from_millis(20)).await {
                assert!(seen.insert(seq(&d)), "delivered twice: {}", seq(&d));
                ids.push(d.delivery_id.clone());
                if ids.len() == 64 {
                    break;
                }
            }
            if !ids.is_empty() {
                sub.ack(&ids).await;
            }
        }
    }
    assert_eq!(seen, expected);
    for sub in &mut subs {
        sub.expect_idle(1).await;
    }
}

/// A window larger than the backends' chunks (1,000 entries per Redis call): one claim and one ack
/// message cover all of it, with an ack repeated inside the message.
#[tokio::test]
async fn a_window_of_thousands_is_claimed_and_settled_in_one_go() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let expected: BTreeSet<u64> = publish_n(&mut bus, "big", "bulk.item", 2_500)
        .await
        .into_iter()
        .collect();
    let mut o = group_open(&["bulk.item"], "bulk");
    o.max_in_flight = 2_500;
    let mut sub = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    let got = sub.deliveries(2_500).await;
    assert_eq!(got.iter().map(seq).collect::<BTreeSet<_>>(), expected);
    let mut ids: Vec<String> = got.iter().map(|d| d.delivery_id.clone()).collect();
    ids.push(ids[0].clone());
    sub.ack(&ids).await;
    await_pending(&server, "bulk", 0).await;
    sub.close();
    // settled, not released: a new member gets nothing back
    let mut again = Subscriber::open(&mut bus, o).await.expect("reopen");
    again.expect_idle(1).await;
}

#[tokio::test]
async fn different_groups_each_get_every_event() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut a = Subscriber::open(&mut bus, group_open(&["fan.>"], "audit"))
        .await
        .expect("open a");
    let mut b = Subscriber::open(&mut bus, group_open(&["fan.>"], "billing"))
        .await
        .expect("open b");
    let seqs = publish_n(&mut bus, "f", "fan.out", 50).await;
    for sub in [&mut a, &mut b] {
        let got: BTreeSet<u64> = sub.deliveries(50).await.iter().map(seq).collect();
        assert_eq!(got, seqs.iter().copied().collect());
    }
}

#[tokio::test]
async fn unacked_delivery_comes_back_after_the_deadline_with_next_attempt() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["retry.x"], "g");
    o.ack_deadline = millis(300);
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    publish(&mut bus, vec![event("r1", "retry.x")]).await;
    let first = sub.next_delivery().await;
    let handed_out = Instant::now();
    assert_eq!(first.attempt, 1);
    let second = sub.next_delivery().await;
    assert_eq!(id(&second), "r1");
    assert_eq!(second.attempt, 2);
    assert!(
        handed_out.elapsed() >= Duration::from_millis(250),
        "not before the deadline"
    );
    sub.ack_one(&second).await;
    sub.expect_idle(3).await;
}

#[tokio::test]
async fn extending_the_deadline_prevents_redelivery() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["ext.x"], "g");
    o.ack_deadline = millis(300);
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    publish(&mut bus, vec![event("e1", "ext.x")]).await;
    let d = sub.next_delivery().await;
    sub.send(Action::Extend(pb::ExtendDeadline {
        delivery_ids: vec![d.delivery_id.clone()],
        extension: millis(5000),
    }))
    .await;
    // heartbeats are 200ms apart: five of them span well past the original 300ms deadline
    sub.expect_idle(5).await;
    // the extension gave the delivery a lease of its own; the ack settles it there
    await_pending(&server, "g", 1).await;
    sub.ack_one(&d).await;
    await_pending(&server, "g", 0).await;
}

/// A member that reads slowly keeps a delivery it extends: the server takes its commands while it
/// waits for room to send to it. Here the member reads one delivery and no more, with far more
/// waiting for it than HTTP/2 and the server's queue hold; it extends that one while another member
/// gets every other event (their leases run out), and never that one.
#[tokio::test]
async fn a_member_that_reads_slowly_keeps_the_delivery_it_extends() {
    const EVENTS: usize = 60;
    let server = TestServer::start().await;
    let mut bus = server.bus();
    // just over 512 KiB each, so each goes to the response stream alone: 31 MB in all
    publish_sized(&mut bus, "slow", "slow.x", EVENTS, (512 << 10) + 1).await;
    let mut o = group_open(&["slow.x"], "g");
    o.max_in_flight = EVENTS as u32;
    o.ack_deadline = millis(2000);
    let mut slow = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    let held = slow.next_delivery().await;
    let mut other = Subscriber::open(&mut bus, o).await.expect("open");
    let extending = async {
        loop {
            slow.send(Action::Extend(pb::ExtendDeadline {
                delivery_ids: vec![held.delivery_id.clone()],
                extension: millis(2000),
            }))
            .await;
            // the member's own pace of extending, well within the extension
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let every_other = async {
        let mut got = BTreeSet::new();
        while got.len() < EVENTS - 1 {
            let d = other.next_delivery().await;
            assert_ne!(
                id(&d),
                id(&held),
                "the extended delivery went to another member"
            );
            got.insert(seq(&d));
            other.ack_one(&d).await;
        }
    };
    tokio::select! {
        () = every_other => {}
        _ = extending => unreachable!("extending goes on"),
    }
    // the slow member's ack is taken while it still reads nothing
    slow.ack_one(&held).await;
    await_pending(&server, "g", 0).await;
    // and so is its Close: the stream ends once the member has read what was queued for it
    let closed = tokio::time::timeout(WAIT, slow.close_gracefully()).await;
    assert!(matches!(closed, Ok(Ok(()))), "{closed:?}");
}

#[tokio::test]
async fn an_extended_delivery_is_settled_by_its_ack_beside_its_claims_open_ones() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    // published before the group exists, so one claim hands out both
    publish(&mut bus, vec![event("x1", "ext.y"), event("x2", "ext.y")]).await;
    let mut sub = Subscriber::open(&mut bus, group_open(&["ext.y"], "g"))
        .await
        .expect("open");
    let first = sub.next_delivery().await;
    let second = sub.next_delivery().await;
    sub.send(Action::Extend(pb::ExtendDeadline {
        delivery_ids: vec![first.delivery_id.clone()],
        extension: millis(60_000),
    }))
    .await;
    sub.ack_one(&first).await;
    await_pending(&server, "g", 1).await;
    sub.ack_one(&second).await;
    await_pending(&server, "g", 0).await;
}

#[tokio::test]
async fn nack_with_delay_redelivers_after_the_delay() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut sub = Subscriber::open(&mut bus, group_open(&["nack.x"], "g"))
        .await
        .expect("open");
    publish(&mut bus, vec![event("n1", "nack.x")]).await;
    let d = sub.next_delivery().await;
    let nacked = Instant::now();
    sub.send(Action::Nack(pb::Nack {
        delivery_ids: vec![d.delivery_id],
        retry_delay: millis(500),
        dead_letter: false,
        reason: "busy".into(),
    }))
    .await;
    let again = sub.next_delivery().await;
    assert!(
        nacked.elapsed() >= Duration::from_millis(450),
        "redelivered after {:?}",
        nacked.elapsed()
    );
    assert_eq!(again.attempt, 2);
    assert_eq!(id(&again), "n1");
    sub.ack_one(&again).await;
}

/// A nack's delay or an extension past the server's max_ack_deadline is cut to it, not refused: a
/// refusal would end the stream and cost every delivery in flight an attempt.
#[tokio::test]
async fn a_delay_or_extension_past_the_longest_deadline_is_cut_to_it() {
    let server = TestServer::start_with(|c| {
        c.bus.max_ack_deadline = Duration::from_millis(400);
        c.bus.default_ack_deadline = Duration::from_millis(400);
    })
    .await;
    let mut bus = server.bus();
    let mut o = group_open(&["cut.x"], "g");
    o.ack_deadline = millis(400);
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    publish(&mut bus, vec![event("c1", "cut.x"), event("c2", "cut.x")]).await;
    let (first, second) = (sub.next_delivery().await, sub.next_delivery().await);
    let an_hour = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    sub.send(Action::Nack(pb::Nack {
        delivery_ids: vec![first.delivery_id.clone()],
        retry_delay: an_hour,
        dead_letter: false,
        reason: "later".into(),
    }))
    .await;
    sub.send(Action::Extend(pb::ExtendDeadline {
        delivery_ids: vec![second.delivery_id.clone()],
        extension: an_hour,
    }))
    .await;
    // both come back on the same stream within the longest deadline, not in an hour
    let mut again = vec![sub.next_delivery().await, sub.next_delivery().await];
    again.sort_by_key(seq);
    assert_eq!(
        again
            .iter()
            .map(|d| (id(d).to_owned(), d.attempt))
            .collect::<Vec<_>>(),
        [("c1".to_owned(), 2), ("c2".to_owned(), 2)]
    );
    for d in &again {
        sub.ack_one(d).await;
    }
    await_pending(&server, "g", 0).await;
}

/// A settlement naming more deliveries than a stream may hold is refused, naming the field: each id
/// is a change under the store's writer, and one message could name hundreds of thousands. An id
/// named twice counts once.
#[tokio::test]
async fn a_settlement_naming_more_deliveries_than_a_stream_may_hold_is_refused() {
    let server = TestServer::start_with(|c| {
        c.bus.max_in_flight_limit = 8;
        c.bus.default_max_in_flight = 8;
    })
    .await;
    let mut bus = server.bus();
    let mut o = group_open(&["many.x"], "g");
    o.max_in_flight = 8;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    publish(&mut bus, vec![event("m1", "many.x"), event("m2", "many.x")]).await;
    let (first, second) = (sub.next_delivery().await, sub.next_delivery().await);
    // the same delivery named more often than the window allows is one change
    sub.send(Action::Extend(pb::ExtendDeadline {
        delivery_ids: vec![first.delivery_id.clone(); 20],
        extension: millis(60_000),
    }))
    .await;
    sub.ack(&vec![first.delivery_id.clone(); 20]).await;
    await_pending(&server, "g", 1).await;
    // nine deliveries: the second, and eight this server never handed out
    let mut nine: Vec<String> = (100..108).map(|seq| format!("{seq}-1")).collect();
    nine.push(second.delivery_id.clone());
    sub.ack(&nine).await;
    // heartbeats go on while the stream does
    let ended = tokio::time::timeout(WAIT, sub.final_status())
        .await
        .expect("the stream ends");
    assert_status(
        ended,
        tonic::Code::InvalidArgument,
        "ack.delivery_ids: names 9 deliveries, more than a stream may hold (8)",
    );
}

async fn dead_letters(server: &TestServer, group: &str) -> Vec<pb::DeadLetter> {
    server
        .admin()
        .list_dead_letters(pb::ListDeadLettersRequest {
            group: group.into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner()
        .dead_letters
}

async fn await_dead_letters(server: &TestServer, group: &str) -> Vec<pb::DeadLetter> {
    eventually("a dead letter", || async {
        let letters = dead_letters(server, group).await;
        (!letters.is_empty()).then_some(letters)
    })
    .await
}

async fn redrive_all(server: &TestServer, group: &str) -> u64 {
    server
        .admin()
        .redrive_dead_letters(pb::RedriveDeadLettersRequest {
            group: group.into(),
            sequences: vec![],
            all: true,
        })
        .await
        .expect("redrive")
        .into_inner()
        .redriven
}

#[tokio::test]
async fn dead_letters_after_max_attempts_and_redrives_only_to_that_group() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["poison.x"], "fragile");
    o.max_attempts = 3;
    let mut fragile = Subscriber::open(&mut bus, o).await.expect("open");
    let mut other = Subscriber::open(&mut bus, group_open(&["poison.x"], "sturdy"))
        .await
        .expect("open other");
    publish(&mut bus, vec![event("p1", "poison.x")]).await;
    let d = other.next_delivery().await;
    other.ack_one(&d).await;
    for attempt in 1..=3 {
        let d = fragile.next_delivery().await;
        assert_eq!(d.attempt, attempt);
        fragile
            .send(Action::Nack(pb::Nack {
                delivery_ids: vec![d.delivery_id],
                retry_delay: None,
                dead_letter: false,
                reason: format!("boom {attempt}"),
            }))
            .await;
    }
    let letters = await_dead_letters(&server, "fragile").await;
    fragile.expect_idle(2).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 3);
    assert!(
        letters[0].reason.contains("boom 3"),
        "{:?}",
        letters[0].reason
    );
    assert_eq!(letters[0].event.as_ref().expect("event").id, "p1");
    let groups = server
        .admin()
        .list_groups(pb::ListGroupsRequest::default())
        .await
        .expect("groups")
        .into_inner()
        .groups;
    let fragile_info = groups
        .iter()
        .find(|g| g.name == "fragile")
        .expect("group listed");
    assert_eq!(fragile_info.dead_letters, 1);
    assert_eq!(fragile_info.pending, 0);

    let redriven = redrive_all(&server, "fragile").await;
    assert_eq!(redriven, 1);
    let back = fragile.next_delivery().await;
    assert_eq!(id(&back), "p1");
    assert_eq!(back.attempt, 1, "redrive starts the attempts afresh");
    fragile.ack_one(&back).await;
    other.expect_idle(2).await;
    assert!(dead_letters(&server, "fragile").await.is_empty());
    // redriving again finds nothing: no duplicates
    let again = redrive_all(&server, "fragile").await;
    assert_eq!(again, 0);
}

async fn nack_to_dead_letter(sub: &Subscriber, d: &pb::Delivery, reason: &str) {
    sub.send(Action::Nack(pb::Nack {
        delivery_ids: vec![d.delivery_id.clone()],
        retry_delay: None,
        dead_letter: true,
        reason: reason.into(),
    }))
    .await;
}

#[tokio::test]
async fn a_redrive_while_a_member_dead_letters_the_event_keeps_the_letter() {
    let (server, injection) = start_injected().await;
    let mut bus = server.bus();
    let mut sub = Subscriber::open(&mut bus, group_open(&["race.x"], "g"))
        .await
        .expect("open");
    publish(&mut bus, vec![event("r1", "race.x")]).await;
    let d = sub.next_delivery().await;
    let (reached, go) = injection.after_put_dead_letter.arm();
    nack_to_dead_letter(&sub, &d, "unreadable").await;
    reached.wait("the member records the letter").await;
    // the letter is recorded, and the event is still in the group: the member takes it out next
    assert_eq!(
        redrive_all(&server, "g").await,
        0,
        "a letter whose event is still pending stays"
    );
    drop(go);
    // once the member has taken the event out, the letter is all there is of it, and it redrives
    eventually("the letter redriven", || async {
        (redrive_all(&server, "g").await == 1).then_some(())
    })
    .await;
    let back = sub.next_delivery().await;
    assert_eq!((id(&back).as_str(), back.attempt), ("r1", 1));
    sub.ack_one(&back).await;
    await_pending(&server, "g", 0).await;
}

/// The first letter is of a second attempt and the new one of a first (attempts start again after a
/// redrive): the new letter must replace it all the same, or the redrive would remove the only
/// letter of an event the member has taken out of the group.
#[tokio::test]
async fn a_redriven_event_dead_lettered_again_at_once_keeps_its_new_letter() {
    let (server, injection) = start_injected().await;
    let mut bus = server.bus();
    let mut sub = Subscriber::open(&mut bus, group_open(&["race.x"], "g"))
        .await
        .expect("open");
    publish(&mut bus, vec![event("r2", "race.x")]).await;
    let d = sub.next_delivery().await;
    sub.send(Action::Nack(pb::Nack {
        delivery_ids: vec![d.delivery_id.clone()],
        retry_delay: None,
        dead_letter: false,
        reason: "retry".into(),
    }))
    .await;
    let d = sub.next_delivery().await;
    assert_eq!(d.attempt, 2);
    nack_to_dead_letter(&sub, &d, "first").await;
    assert_eq!(await_dead_letters(&server, "g").await[0].attempts, 2);

    let (reached, go) = injection.before_remove_dead_letters.arm();
    let mut admin = server.admin();
    let redrive = tokio::spawn(async move {
        admin
            .redrive_dead_letters(pb::RedriveDeadLettersRequest {
                group: "g".into(),
                sequences: vec![],
                all: true,
            })
            .await
            .expect("redrive")
            .into_inner()
            .redriven
    });
    reached.wait("the redrive requeues the event").await;
    // the redrive has put the event back but not yet removed its letter; a commit wakes the member
    publish(&mut bus, vec![event("nudge", "race.x")]).await;
    for d in sub.deliveries(2).await {
        if id(&d) == "r2" {
            assert_eq!(d.attempt, 1);
            nack_to_dead_letter(&sub, &d, "second").await;
        } else {
            sub.ack_one(&d).await;
        }
    }
    eventually("the member's new letter", || async {
        let letters = dead_letters(&server, "g").await;
        letters.iter().any(|l| l.reason == "second").then_some(())
    })
    .await;
    drop(go);
    assert_eq!(
        redrive.await.expect("redrive task"),
        0,
        "the letter recorded after the listing is not the one redriven"
    );
    let letters = dead_letters(&server, "g").await;
    assert_eq!(
        letters
            .iter()
            .map(|l| l.reason.as_str())
            .collect::<Vec<_>>(),
        ["second"]
    );
    await_pending(&server, "g", 0).await;
}

/// A redrive whose caller goes away between putting the letters back and removing them (its
/// deadline) runs to its end all the same: the event is delivered once and its letter is gone, not
/// kept for a second redrive to deliver again; and the change is in the audit log.
#[tokio::test]
async fn a_redrive_its_caller_gives_up_on_still_removes_what_it_put_back() {
    let (server, injection) = start_injected().await;
    let mut bus = server.bus();
    let mut sub = Subscriber::open(&mut bus, group_open(&["cut.x"], "g"))
        .await
        .expect("open");
    publish(&mut bus, vec![event("cut-1", "cut.x")]).await;
    let d = sub.next_delivery().await;
    nack_to_dead_letter(&sub, &d, "bad").await;
    await_dead_letters(&server, "g").await;

    let (reached, go) = injection.before_remove_dead_letters.arm();
    let mut request = tonic::Request::new(pb::RedriveDeadLettersRequest {
        group: "g".into(),
        sequences: vec![],
        all: true,
    });
    request.set_timeout(std::time::Duration::from_millis(300));
    let mut admin = server.admin();
    let redrive = tokio::spawn(async move { admin.redrive_dead_letters(request).await });
    reached.wait("the redrive puts the event back").await;
    let cut = redrive.await.expect("redrive task").expect_err("cut off");
    assert!(
        matches!(
            cut.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{cut:?}"
    );
    drop(go);
    let again = sub.next_delivery().await;
    assert_eq!(id(&again), "cut-1");
    sub.ack_one(&again).await;
    eventually("the letter removed", || async {
        dead_letters(&server, "g").await.is_empty().then_some(())
    })
    .await;
    // audit records are stored in batches, off the call's path
    eventually("the redrive audited", || async {
        let records = server
            .admin()
            .list_audit_records(pb::ListAuditRecordsRequest {
                outcome: "allowed".into(),
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner()
            .records;
        records
            .iter()
            .any(|r| r.action == "admin.redrive_dead_letters" && r.resource == "groups/g")
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_late_dead_letter_of_an_attempt_another_member_holds_is_taken_back() {
    let (server, injection) = start_injected().await;
    let mut bus = server.bus();
    let mut short = group_open(&["late.x"], "g");
    short.ack_deadline = millis(300);
    let mut slow = Subscriber::open(&mut bus, short.clone())
        .await
        .expect("open slow");
    publish(&mut bus, vec![event("l1", "late.x")]).await;
    let d = slow.next_delivery().await;
    let mut other = Subscriber::open(&mut bus, short).await.expect("open other");
    let (reached, go) = injection.after_put_dead_letter.arm();
    nack_to_dead_letter(&slow, &d, "too late").await;
    reached.wait("the slow member records the letter").await;
    // between recording its letter and taking the event out, the slow member's lease ends and the
    // other member gets the next attempt
    let again = other.next_delivery().await;
    assert_eq!((id(&again).as_str(), again.attempt), ("l1", 2));
    drop(go);
    other.ack_one(&again).await;
    eventually("the late letter taken back", || async {
        dead_letters(&server, "g").await.is_empty().then_some(())
    })
    .await;
    await_pending(&server, "g", 0).await;
}

/// Two members dead-letter the same event at successive attempts, the later one first, and it takes
/// the entry out: the earlier one's letter replaces its only until the earlier member finds its
/// attempt gone and puts back what it replaced. Otherwise the event would end neither pending nor
/// dead-lettered.
#[tokio::test]
async fn a_stale_dead_letter_puts_back_a_later_attempts_letter() {
    let (server, injection) = start_injected().await;
    let mut bus = server.bus();
    let mut o = group_open(&["twice.x"], "g");
    o.max_attempts = 1;
    o.ack_deadline = millis(300);
    publish(&mut bus, vec![event("twice-1", "twice.x")]).await;
    // a first member gets the one attempt and goes away: the event is due again, past it
    let mut first = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    assert_eq!(first.next_delivery().await.attempt, 1);
    drop(first);
    // the next member claims it to dead-letter it, and stops before recording the letter
    let (reached, go) = injection.before_put_dead_letter.arm();
    let _stalled = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    reached
        .wait("the stalled member is about to record its letter")
        .await;
    // its lease runs out: the member after it claims the next attempt, dead-letters it and takes it
    // out of the group
    let _last = Subscriber::open(&mut bus, o).await.expect("open");
    // the group's one event: its one letter
    let current = await_dead_letters(&server, "g").await;
    await_pending(&server, "g", 0).await;
    // the stalled member records its letter, finds its attempt gone and puts back what it replaced
    let (restored, restored_go) = injection.after_restore_dead_letter.arm();
    drop(go);
    restored
        .wait("the stale member puts back the letter it replaced")
        .await;
    drop(restored_go);
    assert_eq!(
        dead_letters(&server, "g").await,
        current,
        "the later attempt's letter is back"
    );
    await_pending(&server, "g", 0).await;
}

/// A member nacks a delivery to dead-letter it as its lease runs out, and the next member's claim,
/// past `maxAttempts`, dead-letters the event after as many attempts and takes it out. The late
/// letter replaces that one until its member finds its attempt gone and puts it back; removing it
/// instead would leave the event neither pending nor dead-lettered.
#[tokio::test]
async fn a_late_nack_to_dead_letter_puts_back_the_letter_it_replaced() {
    let (server, injection) = start_injected().await;
    let mut bus = server.bus();
    let mut o = group_open(&["tie.x"], "g");
    o.max_attempts = 1;
    // long enough for the slow member's session to take the nack before the lease runs out (else
    // it would dead-letter the event itself), short enough for the next member to get it soon
    o.ack_deadline = millis(1_000);
    let mut slow = Subscriber::open(&mut bus, o.clone())
        .await
        .expect("open slow");
    publish(&mut bus, vec![event("tie-1", "tie.x")]).await;
    let d = slow.next_delivery().await;
    let (reached, go) = injection.before_put_dead_letter.arm();
    nack_to_dead_letter(&slow, &d, "too late").await;
    reached
        .wait("the slow member is about to record its letter")
        .await;
    // its lease runs out; the next member's claim is past the one attempt: it records a letter
    // after 1 attempt, as the slow member's says, and takes the event out of the group
    let _last = Subscriber::open(&mut bus, o).await.expect("open last");
    // the group's one event: its one letter
    let current = await_dead_letters(&server, "g").await;
    assert_eq!(current[0].attempts, 1);
    await_pending(&server, "g", 0).await;
    let (recorded, recorded_go) = injection.after_put_dead_letter.arm();
    drop(go);
    recorded.wait("the slow member records its letter").await;
    assert_eq!(dead_letters(&server, "g").await[0].reason, "too late");
    drop(recorded_go);
    eventually("the replaced letter back", || async {
        (dead_letters(&server, "g").await == current).then_some(())
    })
    .await;
    await_pending(&server, "g", 0).await;
}

/// A member that cannot record a dead letter ends with UNAVAILABLE, and what it had claimed goes
/// back at once on the same attempt (nobody was sent it): the next member dead-letters it after the
/// same attempts, not after the lease.
#[tokio::test]
async fn claims_left_by_a_failed_dead_letter_go_back_at_once_uncounted() {
    let (server, injection) = start_injected().await;
    let mut bus = server.bus();
    let mut o = group_open(&["dlfail.x"], "g");
    o.max_attempts = 1;
    o.ack_deadline = millis(60_000);
    publish(
        &mut bus,
        vec![event("dlfail-1", "dlfail.x"), event("dlfail-2", "dlfail.x")],
    )
    .await;
    // a first member gets both and goes away: both are due again, past the one attempt
    let mut first = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    assert!(first.deliveries(2).await.iter().all(|d| d.attempt == 1));
    drop(first);
    // the next member claims them and fails to record the first letter
    injection
        .fail_next_put_dead_letter
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut failing = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    let ended = failing
        .next_message(WAIT)
        .await
        .expect_err("the store failed under the dead letter");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    // the member after it dead-letters both at once, not after the 60 s lease, after 1 attempt each
    let mut last = Subscriber::open(&mut bus, o).await.expect("open");
    let letters = eventually("both dead letters", || async {
        let letters = dead_letters(&server, "g").await;
        (letters.len() == 2).then_some(letters)
    })
    .await;
    assert!(letters.iter().all(|l| l.attempts == 1), "{letters:?}");
    last.expect_idle(1).await;
    await_pending(&server, "g", 0).await;
}

/// A message the server cannot read (here, over the message size limit) ends the stream with the
/// reason, after the acks before it: a stream that read on without it would drop every later ack
/// and let the leases of processed deliveries run out.
#[tokio::test]
async fn an_unreadable_message_ends_the_stream_after_the_acks_before_it() {
    let server = TestServer::start_with(|c| c.limits.max_batch_bytes = 64 << 10).await;
    let mut bus = server.bus();
    let mut sub = Subscriber::open(&mut bus, group_open(&["unread.msg"], "g"))
        .await
        .expect("open");
    publish(&mut bus, vec![event("um-1", "unread.msg")]).await;
    let d = sub.next_delivery().await;
    sub.ack_one(&d).await;
    // over the message limit (max_batch_bytes + 1 MiB)
    sub.send(Action::Ack(pb::Ack {
        delivery_ids: vec!["x".repeat(2 << 20)],
    }))
    .await;
    let ended = sub
        .next_message(WAIT)
        .await
        .expect_err("the stream ends with the reason");
    assert_eq!(ended.code(), tonic::Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("could not be read"), "{ended:?}");
    await_pending(&server, "g", 0).await;
}

#[tokio::test]
async fn every_member_gives_up_after_the_groups_latest_max_attempts() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut member = Subscriber::open(&mut bus, group_open(&["tries.x"], "g"))
        .await
        .expect("open with the default of 5 attempts");
    publish(&mut bus, vec![event("t1", "tries.x")]).await;
    let d = member.next_delivery().await;
    // another member opens the group with 1 attempt, which becomes the group's, and leaves
    let mut once = group_open(&["tries.x"], "g");
    once.max_attempts = 1;
    let mut other = Subscriber::open(&mut bus, once).await.expect("open other");
    other.close_gracefully().await.expect("closed");
    // the redelivery would be attempt 2: past the group's 1, so it is dead-lettered, not sent
    member
        .send(Action::Nack(pb::Nack {
            delivery_ids: vec![d.delivery_id],
            retry_delay: None,
            dead_letter: false,
            reason: "boom".into(),
        }))
        .await;
    let letters = await_dead_letters(&server, "g").await;
    assert_eq!(letters[0].attempts, 1, "{letters:?}");
    member.expect_idle(2).await;
}

#[tokio::test]
async fn nack_to_dead_letter_parks_at_once_with_the_reason() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut sub = Subscriber::open(&mut bus, group_open(&["park.x"], "g"))
        .await
        .expect("open");
    let seqs = publish(&mut bus, vec![event("k1", "park.x"), event("k2", "park.x")]).await;
    let ds = sub.deliveries(2).await;
    sub.send(Action::Nack(pb::Nack {
        delivery_ids: vec![ds[0].delivery_id.clone()],
        retry_delay: None,
        dead_letter: true,
        reason: "schema mismatch".into(),
    }))
    .await;
    sub.ack_one(&ds[1]).await;
    let letters = await_dead_letters(&server, "g").await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "schema mismatch");
    assert_eq!(letters[0].event.as_ref().expect("event").sequence, seqs[0]);
    let redriven = server
        .admin()
        .redrive_dead_letters(pb::RedriveDeadLettersRequest {
            group: "g".into(),
            sequences: vec![seqs[0]],
            all: false,
        })
        .await
        .expect("redrive")
        .into_inner()
        .redriven;
    assert_eq!(redriven, 1);
    assert_eq!(seq(&sub.next_delivery().await), seqs[0]);
}

#[tokio::test]
async fn a_stream_that_ends_without_ack_counts_as_an_attempt() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["crash.x"], "g");
    o.max_attempts = 2;
    o.ack_deadline = millis(60_000);
    let mut first = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    publish(&mut bus, vec![event("c1", "crash.x")]).await;
    assert_eq!(first.next_delivery().await.attempt, 1);
    first.close();
    // released at once, long before the 60s deadline
    let mut second = Subscriber::open(&mut bus, o.clone()).await.expect("reopen");
    let d = second.next_delivery().await;
    assert_eq!((id(&d), d.attempt), ("c1".to_owned(), 2));
    second.close();
    let mut third = Subscriber::open(&mut bus, o).await.expect("reopen again");
    let letters = await_dead_letters(&server, "g").await;
    third.expect_idle(2).await;
    assert_eq!(
        letters.len(),
        1,
        "a poison message is parked, not redelivered forever"
    );
    assert!(
        letters[0].reason.contains("ended before ack"),
        "{}",
        letters[0].reason
    );
}

#[tokio::test]
async fn higher_priority_goes_first_and_lower_levels_keep_a_share() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["prio.x"], "g");
    o.max_in_flight = 1;
    // create the group first so the backlog below is the group's
    Subscriber::open(&mut bus, o.clone())
        .await
        .expect("create group")
        .close();
    let mut events = Vec::new();
    for i in 0..60 {
        let mut low = event(&format!("low-{i}"), "prio.x");
        low.priority = pb::Priority::Low as i32;
        events.push(low);
    }
    for i in 0..60 {
        let mut critical = event(&format!("crit-{i}"), "prio.x");
        critical.priority = pb::Priority::Critical as i32;
        events.push(critical);
    }
    publish(&mut bus, events).await;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let mut order = Vec::new();
    for _ in 0..120 {
        let d = sub.next_delivery().await;
        order.push(d.event.as_ref().expect("event").priority);
        sub.ack_one(&d).await;
    }
    let critical = pb::Priority::Critical as i32;
    let first_18: Vec<i32> = order[..18].to_vec();
    let crit_early = first_18.iter().filter(|p| **p == critical).count();
    assert!(
        crit_early >= 15,
        "critical dominates while backlogged: {first_18:?}"
    );
    assert!(
        first_18.contains(&(pb::Priority::Low as i32)),
        "low is not starved: {first_18:?}"
    );
    let last_critical = order
        .iter()
        .rposition(|p| *p == critical)
        .expect("critical delivered");
    assert!(
        last_critical < 75,
        "critical drains well before low: last at {last_critical}"
    );
}

#[tokio::test]
async fn groups_report_pending_lag_and_consumers() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["stats.x"], "stats");
    o.max_in_flight = 2;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    publish_n(&mut bus, "s", "stats.x", 10).await;
    publish_n(&mut bus, "u", "unrelated.x", 5).await;
    sub.deliveries(2).await;
    let groups = server
        .admin()
        .list_groups(pb::ListGroupsRequest::default())
        .await
        .expect("groups")
        .into_inner()
        .groups;
    let g = groups.iter().find(|g| g.name == "stats").expect("listed");
    assert_eq!(g.pending, 2);
    assert_eq!(g.lag, 8, "unrelated types are not lag");
    assert_eq!(g.consumers, 1);
    assert_eq!(g.types, vec!["stats.x".to_owned()]);
    let mut counts: HashMap<String, u32> = HashMap::new();
    for g in &groups {
        *counts.entry(g.name.clone()).or_default() += 1;
    }
    assert_eq!(counts["stats"], 1);
}

/// An ack message with one id the server never handed out (here attempt 0) ends the stream naming it,
/// but the ids beside it in the same message are settled: those deliveries were processed.
#[tokio::test]
async fn the_good_ids_of_an_ack_with_a_bad_one_are_kept() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["mixed.x"], "mixed");
    o.ack_deadline = millis(60_000);
    let mut first = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    publish_n(&mut bus, "m", "mixed.x", 2).await;
    let got = first.deliveries(2).await;
    // attempts count from 1: attempt 0 names an entry never delivered
    let never_delivered = format!("{}-0", seq(&got[1]));
    first
        .ack(&[got[0].delivery_id.clone(), never_delivered])
        .await;
    let status = first.final_status().await.expect_err("bad id rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("ack.delivery_ids[1]"),
        "{status:?}"
    );
    // only the other delivery comes back
    let mut second = Subscriber::open(&mut bus, o).await.expect("reopen");
    let again = second.next_delivery().await;
    assert_eq!(seq(&again), seq(&got[1]));
    second.expect_idle(2).await;
}

#[tokio::test]
async fn acks_sent_before_a_failing_command_are_kept() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["keep.x"], "keepers");
    o.max_in_flight = 10;
    o.ack_deadline = millis(60_000);
    let mut first = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    let seqs = publish_n(&mut bus, "k", "keep.x", 10).await;
    let got = first.deliveries(10).await;
    let (acked, unacked) = got.split_at(6);
    // the server writes acks once per batch of commands; whether or not it reads the bad ack in the same
    // batch, the good ones before it must stay written
    first
        .ack(
            &acked
                .iter()
                .map(|d| d.delivery_id.clone())
                .collect::<Vec<_>>(),
        )
        .await;
    first.ack(&["not-a-delivery".to_owned()]).await;
    let status = first.final_status().await.expect_err("bad id rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("ack.delivery_ids[0]"),
        "{status:?}"
    );
    let mut second = Subscriber::open(&mut bus, o).await.expect("reopen");
    let redelivered = second.deliveries(4).await;
    let again: BTreeSet<u64> = redelivered.iter().map(seq).collect();
    assert_eq!(again, unacked.iter().map(seq).collect::<BTreeSet<_>>());
    assert!(again.iter().all(|s| seqs.contains(s)));
    second.expect_idle(2).await;
    // acks of the first attempt are stale and settle nothing; one current ack settles one
    second
        .ack(
            &unacked
                .iter()
                .map(|d| d.delivery_id.clone())
                .collect::<Vec<_>>(),
        )
        .await;
    second.ack_one(&redelivered[0]).await;
    await_pending(&server, "keepers", 3).await;
}

#[tokio::test]
async fn a_whole_window_comes_back_when_its_stream_ends_and_when_nacked_at_once() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["window.x"], "windows");
    o.max_in_flight = 300;
    o.ack_deadline = millis(60_000);
    let mut first = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    let seqs: BTreeSet<u64> = publish_n(&mut bus, "w", "window.x", 300)
        .await
        .into_iter()
        .collect();
    let held: BTreeSet<u64> = first.deliveries(300).await.iter().map(seq).collect();
    assert_eq!(held, seqs);
    first.close();
    // released at once, long before the 60 s deadline
    let mut second = Subscriber::open(&mut bus, o).await.expect("reopen");
    let again = second.deliveries(300).await;
    assert!(again.iter().all(|d| d.attempt == 2));
    assert_eq!(again.iter().map(seq).collect::<BTreeSet<_>>(), seqs);
    second
        .send(Action::Nack(pb::Nack {
            delivery_ids: again.iter().map(|d| d.delivery_id.clone()).collect(),
            retry_delay: millis(0),
            dead_letter: false,
            reason: "all at once".into(),
        }))
        .await;
    let third = second.deliveries(300).await;
    assert!(third.iter().all(|d| d.attempt == 3));
    assert_eq!(third.iter().map(seq).collect::<BTreeSet<_>>(), seqs);
}

/// A group over many types (on Redis, a stream each) delivers its backlog and catches up: the bound
/// on a claim's reads counts only reads that leave more of a stream behind, so a claim over streams
/// read to their ends reports no more, and the caught-up marker comes.
#[tokio::test]
async fn a_group_over_many_types_catches_up() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let events = (0..12)
        .map(|t| event(&format!("many-{t}"), &format!("many.t{t}")))
        .collect();
    let mut published = publish(&mut bus, events).await;
    let mut o = open(&["many.>"], "many-types");
    o.start = earliest();
    let mut member = Subscriber::open(&mut bus, o).await.expect("open");
    // heartbeats keep the stream busy: the whole wait is bounded, not each message's
    let mut delivered: Vec<u64> = tokio::time::timeout(WAIT, member.until_caught_up())
        .await
        .expect("caught up in time")
        .iter()
        .map(|d| d.event.as_ref().expect("event").sequence)
        .collect();
    delivered.sort_unstable();
    published.sort_unstable();
    assert_eq!(delivered, published);
}

/// The caught-up marker follows the fill that delivered the rest of the backlog: a member that
/// waits for it before acking is not left until a heartbeat wakes its session (or, under steady
/// traffic, for good).
#[tokio::test]
async fn a_group_member_is_told_it_caught_up_right_after_its_backlog() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut published = publish_n(&mut bus, "backlog", "caught.x", 3).await;
    let mut o = open(&["caught.x"], "caught");
    o.start = earliest();
    o.heartbeat_interval = Some(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    let mut member = Subscriber::open(&mut bus, o).await.expect("open");
    let mut delivered: Vec<u64> = member.until_caught_up().await.iter().map(seq).collect();
    assert_eq!(
        member.heartbeats, 0,
        "a heartbeat came before the caught-up marker"
    );
    delivered.sort_unstable();
    published.sort_unstable();
    assert_eq!(delivered, published);
}

#[tokio::test]
async fn a_sparse_group_reads_its_backlog_without_waiting_for_a_commit() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    for b in 0..20 {
        let noise = (0..1000)
            .map(|i| event(&format!("noise-{b}-{i}"), "noise.a"))
            .collect();
        publish(&mut bus, noise).await;
    }
    let [job] = publish(&mut bus, vec![event("job-1", "job.x")]).await[..] else {
        panic!("one sequence")
    };
    // a wildcard: the types cannot narrow the read, so the claims read the noise too
    let mut o = open(&["job.>"], "sparse");
    o.start = earliest();
    o.heartbeat_interval = Some(prost_types::Duration {
        seconds: 10,
        nanos: 0,
    });
    let mut member = Subscriber::open(&mut bus, o).await.expect("open");
    // nothing is committed meanwhile: the claims must go on by themselves, not at the next heartbeat
    let d = member
        .try_next_delivery(std::time::Duration::from_secs(8))
        .await
        .expect("the job within 8 s, not one claim's reading per heartbeat");
    assert_eq!(d.event.as_ref().expect("event").sequence, job);
    assert_eq!(
        member.caught_up, None,
        "caught up before the backlog was read"
    );
}

#[tokio::test]
async fn deliveries_claimed_but_never_sent_go_to_the_next_member_at_once_on_their_first_attempt() {
    const EVENTS: usize = 5000;
    let server = TestServer::start().await;
    let mut bus = server.bus();
    // 2 KiB each: more than the connection's flow-control windows hold, so sending takes reading
    publish_sized(&mut bus, "handoff", "handoff.x", EVENTS, 2048).await;
    let mut o = open(&["handoff.x"], "handoff");
    o.start = earliest();
    o.max_in_flight = EVENTS as u32;
    o.ack_deadline = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    // the first member is claimed the whole backlog, reads one run and goes away while the rest is
    // still being sent to it
    let mut first = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    first.next_delivery().await;
    drop(first);
    let mut next = Subscriber::open(&mut bus, o).await.expect("open");
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < EVENTS {
        // within the harness's wait, not the 60 s lease of what the first member never got
        let d = next.next_delivery().await;
        seen.insert(d.event.expect("event").sequence, d.attempt);
    }
    // what reached the first member comes again as a second attempt; what it was never sent does
    // not count one: its first attempt is the next member's
    let never_sent: Vec<u64> = seen
        .iter()
        .filter(|(_, a)| **a == 1)
        .map(|(s, _)| *s)
        .collect();
    let sent: Vec<u64> = seen
        .iter()
        .filter(|(_, a)| **a == 2)
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(never_sent.len() + sent.len(), EVENTS, "attempts: {seen:?}");
    assert!(!sent.is_empty(), "the first member read a run");
    assert!(
        !never_sent.is_empty(),
        "the first member went away before most runs were sent"
    );
    // runs leave in sequence order: what was sent is a prefix
    assert!(sent.iter().max() < never_sent.iter().min(), "sent {sent:?}");
}

#[tokio::test]
async fn large_events_replay_and_list_as_dead_letters_in_pages_that_fit_a_message() {
    const EVENTS: usize = 12;
    const DATA: usize = 900 << 10;
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["big.x"], "big");
    o.max_in_flight = EVENTS as u32;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let mut seqs = Vec::new();
    for b in 0..EVENTS / 3 {
        let events = (0..3)
            .map(|i| {
                let mut e = event(&format!("big-{b}-{i}"), "big.x");
                e.data = Some(pb::event::Data::BinaryData(vec![b as u8; DATA]));
                e
            })
            .collect();
        seqs.extend(publish(&mut bus, events).await);
    }
    // the default page of 100 would be 10.8 MB, over the 5 MiB message limit
    let pages = replay_pages(
        &mut bus,
        pb::ReplayRequest {
            types: vec!["big.x".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(page_sequences(&pages), seqs, "every event, in order");
    assert!(pages.len() > 1, "large events end pages early");

    let ds = sub.deliveries(EVENTS).await;
    sub.send(Action::Nack(pb::Nack {
        delivery_ids: ds.iter().map(|d| d.delivery_id.clone()).collect(),
        retry_delay: None,
        dead_letter: true,
        reason: "too big to handle".into(),
    }))
    .await;
    let (listed, _) = eventually("every dead letter, page by page", || async {
        let (listed, pages) = every_dead_letter(&server, "big", 0).await;
        (listed.len() == EVENTS).then_some((listed, pages))
    })
    .await;
    assert_eq!(listed, seqs);
}

/// Publishes `n` events of type `<group>.x` to a new group `group` and has its member dead-letter
/// them all with `reason`; returns the member (kept open until the letters are made) and the
/// events' sequences.
async fn dead_letter_new(
    server: &TestServer,
    group: &str,
    n: usize,
    reason: &str,
) -> (Subscriber, Vec<u64>) {
    let mut bus = server.bus();
    let event_type = format!("{group}.x");
    let mut o = group_open(&[event_type.as_str()], group);
    o.max_in_flight = n as u32;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let seqs = publish_n(&mut bus, group, &event_type, n).await;
    let ds = sub.deliveries(n).await;
    sub.send(Action::Nack(pb::Nack {
        delivery_ids: ds.iter().map(|d| d.delivery_id.clone()).collect(),
        retry_delay: None,
        dead_letter: true,
        reason: reason.into(),
    }))
    .await;
    (sub, seqs)
}

/// The sequences of a group's dead letters, read page by page, and how many pages that took.
async fn every_dead_letter(server: &TestServer, group: &str, page_size: u32) -> (Vec<u64>, usize) {
    let mut token = String::new();
    let mut listed = Vec::new();
    let mut pages = 0;
    loop {
        let page = server
            .admin()
            .list_dead_letters(pb::ListDeadLettersRequest {
                group: group.into(),
                page_size,
                page_token: token,
            })
            .await
            .expect("a page that fits a message")
            .into_inner();
        pages += 1;
        listed.extend(
            page.dead_letters
                .iter()
                .map(|d| d.event.as_ref().expect("event").sequence),
        );
        if page.next_page_token.is_empty() {
            return (listed, pages);
        }
        token = page.next_page_token;
    }
}

/// Dead letters come a page at a time, and a last page that is exactly full has no token: the
/// reader is not sent for an empty page.
#[tokio::test]
async fn an_exactly_full_last_page_of_dead_letters_has_no_token() {
    const EVENTS: usize = 4;
    let server = TestServer::start().await;
    let (_sub, seqs) = dead_letter_new(&server, "paged", EVENTS, "paged").await;
    eventually("every dead letter listed", || async {
        let (listed, _) = every_dead_letter(&server, "paged", 0).await;
        (listed.len() == EVENTS).then_some(())
    })
    .await;
    for (page_size, pages) in [(2, 2), (4, 1), (3, 2), (5, 1)] {
        assert_eq!(
            every_dead_letter(&server, "paged", page_size).await,
            (seqs.clone(), pages),
            "pages of {page_size}"
        );
    }
}

/// Long reasons end a page of dead letters early too, even when its events are small: each NUL of
/// a reason is kept escaped (5 bytes), so 1 KiB of them outweighs a small event fifty times.
#[tokio::test]
async fn dead_letters_with_long_reasons_come_in_pages_that_fit_a_message() {
    const EVENTS: usize = 300;
    // message limit: 64 KiB + 1 MiB; 300 letters with 5 KiB reasons are 1.5 MB, their events 50 KB
    let server = TestServer::start_with(|c| c.limits.max_batch_bytes = 64 << 10).await;
    let (_sub, seqs) = dead_letter_new(&server, "reasons", EVENTS, &"\0".repeat(1024)).await;
    let (listed, pages) = eventually("every dead letter, page by page", || async {
        let (listed, pages) = every_dead_letter(&server, "reasons", EVENTS as u32).await;
        (listed.len() == EVENTS).then_some((listed, pages))
    })
    .await;
    assert_eq!(listed, seqs);
    assert!(pages > 1, "long reasons end pages early");
}

#[tokio::test]
async fn acks_sent_right_before_a_graceful_close_all_count() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["close.x"], "closers");
    o.max_in_flight = 1;
    for i in 0..50 {
        let mut sub = Subscriber::open(&mut bus, o.clone()).await.expect("open");
        publish(&mut bus, vec![event(&format!("c{i}"), "close.x")]).await;
        let d = sub.next_delivery().await;
        assert_eq!(
            (id(&d), d.attempt),
            (format!("c{i}"), 1),
            "nothing comes twice"
        );
        // the ack and the close leave together; the stream ends only after the ack is saved
        sub.ack_one(&d).await;
        sub.close_gracefully()
            .await
            .expect("a graceful close ends with OK");
        await_pending(&server, "closers", 0).await;
    }
}

/// A nack's reason is stored with the entry and its dead letter as text every store keeps: a NUL
/// (which Postgres refuses, failing the write for good) is escaped, and only the first 1 KiB is kept.
/// The stream goes on: a reason is whatever a failing consumer had at hand.
#[tokio::test]
async fn a_nack_reason_is_kept_as_text_every_store_takes() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut o = group_open(&["reason.x"], "reasoners");
    o.max_in_flight = 2;
    o.ack_deadline = millis(60_000);
    let mut member = Subscriber::open(&mut bus, o).await.expect("open");
    publish_n(&mut bus, "r", "reason.x", 2).await;
    let long = "x".repeat(5000);
    for (d, reason) in member
        .deliveries(2)
        .await
        .into_iter()
        .zip(["bad\u{0}input\n  at line 2".to_owned(), long.clone()])
    {
        member
            .send(pb::subscribe_request::Action::Nack(pb::Nack {
                delivery_ids: vec![d.delivery_id],
                retry_delay: None,
                dead_letter: true,
                reason,
            }))
            .await;
    }
    let letters = eventually("both dead letters", || {
        let mut admin = server.admin();
        async move {
            let letters = admin
                .list_dead_letters(pb::ListDeadLettersRequest {
                    group: "reasoners".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .dead_letters;
            (letters.len() == 2).then_some(letters)
        }
    })
    .await;
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("bad\\u{0}input\n  at line 2")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains(&long[..1024])
            && !r.contains(&long[..1025])
            && r.contains("5000 bytes")),
        "{reasons:?}"
    );
    // the stream is still open
    member.expect_idle(1).await;
}

/// A tenant keeps at most `bus.max_groups_per_tenant` durable groups: an open that would create one
/// more is refused, saying so, while the groups it keeps open as before, and a deleted one makes room.
#[tokio::test]
async fn a_tenant_keeps_at_most_its_limit_of_groups() {
    let server = TestServer::start_with(|c| c.bus.max_groups_per_tenant = 2).await;
    let mut bus = server.bus();
    for name in ["kept-1", "kept-2"] {
        drop(
            Subscriber::open(&mut bus, group_open(&["limited.t"], name))
                .await
                .expect("within the limit"),
        );
    }
    let refused = Subscriber::open(&mut bus, group_open(&["limited.t"], "third"))
        .await
        .map(|_| ())
        .expect_err("one group more than the limit");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("bus.max_groups_per_tenant"),
        "{refused:?}"
    );
    drop(
        Subscriber::open(&mut bus, group_open(&["limited.t"], "kept-1"))
            .await
            .expect("a group the tenant keeps opens as before"),
    );
    server
        .admin()
        .delete_group(pb::DeleteGroupRequest {
            group: "kept-2".into(),
        })
        .await
        .expect("delete");
    drop(
        Subscriber::open(&mut bus, group_open(&["limited.t"], "third"))
            .await
            .expect("a deleted group makes room"),
    );
}
