use std::time::{Duration, Instant};

use tonic::Code;

use crate::harness::*;
use nerve::api::pb::{self, event_bus_client::EventBusClient};
use tonic::transport::Channel;

fn request(id: &str, timeout_ms: i32) -> pb::RequestRequest {
    pb::RequestRequest {
        event: Some(event(id, "planner.plan.requested")),
        timeout: millis(timeout_ms),
    }
}

#[tokio::test]
async fn request_gets_the_reply_with_correlation() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut responder = Subscriber::open(&mut bus, open(&["planner.plan.requested"], "planners"))
        .await
        .expect("open");
    let mut requester = server.bus();
    let call = tokio::spawn(async move { requester.request(request("q1", 5000)).await });
    let d = responder.next_delivery().await;
    let asked = d.event.clone().expect("event");
    assert!(asked.reply_to.starts_with("_inbox."), "{}", asked.reply_to);
    assert_eq!(
        asked.correlation_id, "q1",
        "correlation defaults to the request id"
    );
    let reply = bus
        .reply(pb::ReplyRequest {
            reply_to: asked.reply_to.clone(),
            event: Some(event("a1", "planner.plan.ready")),
        })
        .await
        .expect("reply")
        .into_inner();
    assert!(reply.delivered);
    responder.ack_one(&d).await;
    let answer = call
        .await
        .expect("join")
        .expect("request succeeds")
        .into_inner();
    let got = answer.reply.expect("reply event");
    assert_eq!(got.id, "a1");
    assert_eq!(got.correlation_id, "q1");
    assert_eq!(got.causation_id, "q1");
    assert_eq!(got.sequence, reply.sequence);
    assert_eq!(answer.request_sequence, asked.sequence);
    // the conversation is in history, findable by correlation id
    let pages = collect_replay(
        bus.replay(pb::ReplayRequest {
            correlation_id: "q1".into(),
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner(),
    )
    .await;
    let ids: Vec<String> = pages
        .iter()
        .flat_map(|p| p.events.iter().map(|e| e.id.clone()))
        .collect();
    assert_eq!(ids, ["q1", "a1"]);
}

#[tokio::test]
async fn a_call_deadline_past_the_longest_timeout_only_bounds_the_wait() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut responder = Subscriber::open(&mut bus, open(&["planner.plan.requested"], ""))
        .await
        .expect("open");
    let mut requester = server.bus();
    let call = tokio::spawn(async move {
        // no timeout field; a deadline past the server's longest timeout (300 s) is not a bad field
        let mut ask = tonic::Request::new(pb::RequestRequest {
            event: Some(event("long", "planner.plan.requested")),
            timeout: None,
        });
        ask.set_timeout(Duration::from_secs(600));
        requester.request(ask).await
    });
    let asked = responder.next_delivery().await.event.expect("event");
    bus.reply(pb::ReplyRequest {
        reply_to: asked.reply_to,
        event: Some(event("long-answer", "planner.plan.ready")),
    })
    .await
    .expect("reply");
    let answer = call
        .await
        .expect("join")
        .expect("a long deadline is not refused")
        .into_inner();
    assert_eq!(answer.reply.expect("reply").id, "long-answer");
}

#[tokio::test]
async fn request_without_responders_fails_at_once() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let _unrelated = Subscriber::open(&mut bus, open(&["other.>"], ""))
        .await
        .expect("open");
    let started = Instant::now();
    let result = bus.request(request("lonely", 10_000)).await;
    let status = assert_status(result, Code::FailedPrecondition, "no responders");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "fails fast, not at the deadline"
    );
    assert!(status.message().contains("planner.plan.requested"));
}

/// Replies to `asked` with the event `reply_id`; the requester's `call` must get that reply.
async fn reply_and_expect_answer(
    bus: &mut EventBusClient<Channel>,
    asked: pb::Event,
    call: tokio::task::JoinHandle<Result<tonic::Response<pb::RequestResponse>, tonic::Status>>,
    reply_id: &str,
) {
    bus.reply(pb::ReplyRequest {
        reply_to: asked.reply_to,
        event: Some(event(reply_id, "planner.plan.ready")),
    })
    .await
    .expect("reply");
    let answer = call
        .await
        .expect("join")
        .expect("answered, not 'no responders'");
    assert_eq!(answer.into_inner().reply.expect("reply").id, reply_id);
}

/// A responder counts by its filter on what the server adds to a request: its inbox, and its time
/// when the requester left it unset (as `request` does).
#[tokio::test]
async fn a_responder_that_filters_on_the_inbox_and_time_counts_as_one() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    // takes only requests (events whose replyto is a server-made inbox) stamped in this millennium
    let only_requests = pb::Filter {
        filter: Some(pb::filter::Filter::Prefix(pb::AttributeValues {
            attributes: [
                ("replyto".to_owned(), "_inbox.".to_owned()),
                ("time".to_owned(), "2".to_owned()),
            ]
            .into(),
        })),
    };
    let mut responder = Subscriber::open(
        &mut bus,
        pb::SubscriptionOpen {
            filter: Some(only_requests),
            ..open(&["planner.plan.requested"], "")
        },
    )
    .await
    .expect("open");
    let mut requester = server.bus();
    let call = tokio::spawn(async move { requester.request(request("q-f", 5000)).await });
    let d = responder.next_delivery().await;
    let asked = d.event.expect("event");
    reply_and_expect_answer(&mut bus, asked, call, "a-f").await;
}

#[tokio::test]
async fn a_group_member_counts_as_a_responder_by_its_groups_filter() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let subject = |s: &str| pb::Filter {
        filter: Some(pb::filter::Filter::Exact(pb::AttributeValues {
            attributes: [("subject".to_owned(), s.to_owned())].into(),
        })),
    };
    let mut member = Subscriber::open(
        &mut bus,
        pb::SubscriptionOpen {
            filter: Some(subject("a")),
            ..open(&["planner.plan.requested"], "answerers")
        },
    )
    .await
    .expect("open");
    // another member opens the group without a filter, which becomes the group's, and leaves
    let mut other = Subscriber::open(&mut bus, open(&["planner.plan.requested"], "answerers"))
        .await
        .expect("open other");
    other.close_gracefully().await.expect("closed");
    // the member opened with subject "a", but the group now delivers every subject to it
    let mut asking = request("q-g", 5000);
    asking.event.as_mut().expect("event").subject = "b".into();
    let mut requester = server.bus();
    let call = tokio::spawn(async move { requester.request(asking).await });
    let d = member.next_delivery().await;
    let asked = d.event.expect("event");
    assert_eq!(asked.subject, "b");
    reply_and_expect_answer(&mut bus, asked, call, "a-g").await;
}

/// Two responders answer one request: the first reply is the answer, and the second is told it
/// was not delivered (stored or not, as it came before or after the requester closed its inbox).
#[tokio::test]
async fn of_two_replies_to_one_request_only_the_first_is_delivered() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut responders = Vec::new();
    for _ in 0..2 {
        responders.push(
            Subscriber::open(&mut bus, open(&["planner.plan.requested"], ""))
                .await
                .expect("open"),
        );
    }
    let mut requester = server.bus();
    let call = tokio::spawn(async move { requester.request(request("both", 5000)).await });
    let mut inboxes = Vec::new();
    for responder in &mut responders {
        inboxes.push(
            responder
                .next_delivery()
                .await
                .event
                .expect("event")
                .reply_to,
        );
    }
    let mut answered = Vec::new();
    for (inbox, id) in inboxes.into_iter().zip(["first", "second"]) {
        answered.push(
            bus.reply(pb::ReplyRequest {
                reply_to: inbox,
                event: Some(event(id, "planner.plan.ready")),
            })
            .await
            .expect("a second reply is not an error")
            .into_inner(),
        );
    }
    assert!(answered[0].delivered);
    assert!(!answered[1].delivered, "the second reply was delivered too");
    let answer = call.await.expect("join").expect("request succeeds");
    let reply = answer.into_inner().reply.expect("reply event");
    assert_eq!(
        (reply.id.as_str(), reply.sequence),
        ("first", answered[0].sequence)
    );
}

#[tokio::test]
async fn request_times_out_with_deadline_exceeded_and_late_reply_is_dropped() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut responder = Subscriber::open(&mut bus, open(&["planner.>"], ""))
        .await
        .expect("open");
    let mut requester = server.bus();
    let started = Instant::now();
    let result = requester.request(request("slow", 300)).await;
    assert_status(result, Code::DeadlineExceeded, "slow");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let d = responder.next_delivery().await;
    let late = bus
        .reply(pb::ReplyRequest {
            reply_to: d.event.expect("event").reply_to,
            event: Some(event("late", "planner.plan.ready")),
        })
        .await
        .expect("late reply is not an error")
        .into_inner();
    assert!(!late.delivered);
    assert_eq!(late.sequence, 0, "a late reply is not stored");
    // the request was stored: asked again under its id, it is refused saying why (not "different
    // content": the caller sent the same)
    let status = requester
        .request(request("slow", 300))
        .await
        .expect_err("a request's id is taken");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("new id"), "{status:?}");
    assert!(
        !status.message().contains("different content"),
        "{status:?}"
    );
}

/// A request's timeout runs from the server's receipt of the call, as its deadline does: a publish
/// held up on its way to the store takes from it, and the call ends at the timeout while the publish
/// is still held (before, the wait for a reply began once the request was stored).
#[tokio::test]
async fn a_request_ends_at_its_timeout_while_its_publish_is_held() {
    let (server, injection) = crate::injected_store::start_injected().await;
    let mut bus = server.bus();
    let _responder = Subscriber::open(&mut bus, open(&["planner.>"], ""))
        .await
        .expect("open");
    let (reached, _go) = injection.before_queue.arm();
    let mut requester = server.bus();
    let started = Instant::now();
    let call = tokio::spawn(async move { requester.request(request("held", 2000)).await });
    reached
        .wait("the request's publish reaches the store")
        .await;
    let result = tokio::time::timeout(WAIT, call)
        .await
        .expect("the call ends at its timeout, not when its publish is let through")
        .expect("join");
    assert_status(
        result,
        Code::DeadlineExceeded,
        "was not committed within 2s",
    );
    assert!(started.elapsed() >= Duration::from_millis(2000));
}

#[tokio::test]
async fn reply_validation() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let status = bus
        .reply(pb::ReplyRequest {
            reply_to: String::new(),
            event: Some(event("r", "a.b")),
        })
        .await
        .expect_err("no inbox");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut with_reply_to = request("spoof", 1000);
    if let Some(e) = with_reply_to.event.as_mut() {
        e.reply_to = "_inbox.someone-else".into();
    }
    let status = bus
        .request(with_reply_to)
        .await
        .expect_err("reply_to is the server's");
    assert_eq!(status.code(), Code::InvalidArgument);
    // nor does a reply carry one, as a publish does not: refused, not dropped unsaid
    let mut replying_to = event("r", "a.b");
    replying_to.reply_to = format!("_inbox.{}", "1".repeat(32));
    let status = bus
        .reply(pb::ReplyRequest {
            reply_to: format!("_inbox.{}", "0".repeat(32)),
            event: Some(replying_to),
        })
        .await
        .expect_err("a reply's reply_to");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violations(&status), ["event.reply_to"], "{status:?}");
}

/// A reply's event is checked before its inbox is looked up, and named as the caller sent it
/// (`event`): a bad one is refused whether its requester still waits or not.
#[tokio::test]
async fn a_bad_reply_event_is_refused_by_its_own_name_whether_or_not_anyone_waits() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut bad = event("bad-reply", "planner.plan.ready");
    bad.r#type = "not a type".into();
    // nobody waits on this inbox
    let status = bus
        .reply(pb::ReplyRequest {
            reply_to: format!("_inbox.{}", "0".repeat(32)),
            event: Some(bad.clone()),
        })
        .await
        .expect_err("a bad event is refused even when nobody waits");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violations(&status), ["event.type"], "{status:?}");
    // a requester waits
    let mut responder = Subscriber::open(&mut bus, open(&["planner.plan.requested"], "planners"))
        .await
        .expect("open");
    let mut requester = server.bus();
    let _call = tokio::spawn(async move { requester.request(request("q-bad", 5000)).await });
    let d = responder.next_delivery().await;
    bad.correlation_id = String::new();
    let status = bus
        .reply(pb::ReplyRequest {
            reply_to: d.event.expect("event").reply_to,
            event: Some(bad),
        })
        .await
        .expect_err("a bad event is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violations(&status), ["event.type"], "{status:?}");
}

/// An event of `id` whose size ([`nerve::event::Event::size`]: its attributes and data) is exactly
/// the limit of 1 MiB.
fn event_of_the_limit(id: &str, event_type: &str) -> pb::Event {
    let mut e = event(id, event_type);
    let attributes = e.id.len() + e.source.len() + e.r#type.len() + e.spec_version.len();
    e.data = Some(pb::event::Data::BinaryData(vec![7; (1 << 20) - attributes]));
    e
}

/// A request and a reply as large as the event limit go through: the inbox, correlation and
/// causation ids the server sets on them do not count against the caller's limit.
#[tokio::test]
async fn a_request_and_a_reply_of_the_event_limit_go_through() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut responder = Subscriber::open(&mut bus, open(&["planner.plan.requested"], "planners"))
        .await
        .expect("open");
    // with the caller's trace context, which the server records on the request: it does not count
    let mut requester = server.bus();
    let call = tokio::spawn(async move {
        let mut request = tonic::Request::new(pb::RequestRequest {
            event: Some(event_of_the_limit("q-full", "planner.plan.requested")),
            timeout: millis(5000),
        });
        request.metadata_mut().insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .expect("ascii"),
        );
        requester.request(request).await
    });
    let d = responder.next_delivery().await;
    let asked = d.event.clone().expect("event");
    assert!(
        asked
            .traceparent
            .contains("4bf92f3577b34da6a3ce929d0e0e4736"),
        "{asked:?}"
    );
    let reply = bus
        .reply(pb::ReplyRequest {
            reply_to: asked.reply_to,
            event: Some(event_of_the_limit("a-full", "planner.plan.ready")),
        })
        .await
        .expect("a reply of the limit is taken")
        .into_inner();
    assert!(reply.delivered);
    let answer = call
        .await
        .expect("join")
        .expect("a request of the limit is taken")
        .into_inner();
    let got = answer.reply.expect("reply");
    assert_eq!(
        (got.id.as_str(), got.causation_id.as_str()),
        ("a-full", "q-full")
    );
    // one byte more is over the limit, named as the caller sent it
    let mut over = event_of_the_limit("q-over", "planner.plan.requested");
    over.id.push('x');
    let status = bus
        .request(pb::RequestRequest {
            event: Some(over),
            timeout: millis(5000),
        })
        .await
        .expect_err("one byte over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(violations(&status), ["event.data"], "{status:?}");
}

/// An in-process server checks its settings as `nerve-server` does: a default request timeout above
/// its own bound would refuse every request that leaves the timeout unset.
#[tokio::test]
async fn an_in_process_server_with_a_default_its_bound_refuses_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.bus.max_request_timeout = Duration::from_secs(1);
    config.bus.default_request_timeout = Duration::from_secs(2);
    let backends = nerve::open_backends(&config).await.expect("backends");
    let err = nerve::start(config, backends).await.err().expect("refused");
    assert!(
        err.to_string().contains("bus.default_request_timeout"),
        "{err}"
    );
}
