use tonic::{Code, transport::Channel};

use crate::harness::*;
use nerve::api::pb::{self, event_bus_client::EventBusClient};

#[tokio::test]
async fn publish_returns_sequences_in_order() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let seqs = publish(
        &mut bus,
        vec![event("a", "t.created"), event("b", "t.created")],
    )
    .await;
    assert_eq!(seqs.len(), 2);
    assert_eq!(seqs[1], seqs[0] + 1);
    let more = publish(&mut bus, vec![event("c", "t.created")]).await;
    assert_eq!(more[0], seqs[1] + 1);
}

#[tokio::test]
async fn retry_of_same_event_returns_original_sequence_and_writes_nothing() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let first = bus
        .publish(pb::PublishRequest {
            events: vec![event("dup", "t.created")],
        })
        .await
        .expect("publish")
        .into_inner();
    let retry = bus
        .publish(pb::PublishRequest {
            events: vec![event("dup", "t.created")],
        })
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retry.results[0].sequence, first.results[0].sequence);
    assert!(retry.results[0].duplicate);
    assert!(!first.results[0].duplicate);
    let types = server
        .admin()
        .list_event_types(pb::ListEventTypesRequest::default())
        .await
        .expect("types")
        .into_inner();
    assert_eq!(
        types.types[0].count, 1,
        "the retry must not be stored twice"
    );
}

#[tokio::test]
async fn same_id_with_different_content_is_already_exists() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish(&mut bus, vec![event("x", "t.created")]).await;
    let mut changed = event("x", "t.created");
    changed.data = Some(pb::event::Data::TextData("other".into()));
    let result = bus
        .publish(pb::PublishRequest {
            events: vec![changed],
        })
        .await;
    assert_status(result, Code::AlreadyExists, "\"x\"");
    // the same id from another source is a different event
    let mut other_source = event("x", "t.created");
    other_source.source = "//elsewhere".into();
    publish(&mut bus, vec![other_source]).await;
}

#[tokio::test]
async fn batch_is_atomic_when_one_event_conflicts() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish(&mut bus, vec![event("taken", "t.created")]).await;
    let mut conflicting = event("taken", "t.created");
    conflicting.subject = "changed".into();
    let result = bus
        .publish(pb::PublishRequest {
            events: vec![
                event("fresh-1", "t.created"),
                conflicting,
                event("fresh-2", "t.created"),
            ],
        })
        .await;
    assert_status(result, Code::AlreadyExists, "taken");
    let get = server
        .admin()
        .get_event(pb::GetEventRequest {
            id: "fresh-1".into(),
            source: String::new(),
        })
        .await;
    assert_status(get, Code::NotFound, "fresh-1");
}

/// One event named twice in a batch is stored once; two different events under one name are refused
/// as the caller's input, naming the second, and nothing of the batch is stored.
#[tokio::test]
async fn a_batch_naming_two_events_alike_is_invalid_and_the_same_event_twice_is_stored_once() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let twice = publish(
        &mut bus,
        vec![event("twice", "t.created"), event("twice", "t.created")],
    )
    .await;
    assert_eq!(twice[0], twice[1], "stored once: {twice:?}");
    let mut other = event("named-twice", "t.created");
    other.subject = "other".into();
    let status = bus
        .publish(pb::PublishRequest {
            events: vec![
                event("fresh-3", "t.created"),
                event("named-twice", "t.created"),
                other,
            ],
        })
        .await
        .expect_err("two events under one name");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violations(&status), ["events[2].id"], "{status:?}");
    let get = server
        .admin()
        .get_event(pb::GetEventRequest {
            id: "fresh-3".into(),
            source: String::new(),
        })
        .await;
    assert_status(get, Code::NotFound, "fresh-3");
}

#[tokio::test]
async fn server_fills_time_and_keeps_client_time() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut with_time = event("timed", "t.created");
    with_time.time = Some(prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 5,
    });
    publish(&mut bus, vec![with_time, event("untimed", "t.created")]).await;
    let timed = server.stored_event("timed").await;
    assert_eq!(
        timed.time,
        Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5
        })
    );
    let untimed = server.stored_event("untimed").await;
    assert!(untimed.time.is_some());
    assert!(untimed.recorded_time.is_some());
    // a retry without time is still recognized as the same event
    let retry = bus
        .publish(pb::PublishRequest {
            events: vec![event("untimed", "t.created")],
        })
        .await
        .expect("retry")
        .into_inner();
    assert!(retry.results[0].duplicate);
}

#[tokio::test]
async fn invalid_events_are_rejected_naming_the_field() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    type Mutation = Box<dyn Fn(&mut pb::Event)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("events[0].id", Box::new(|e| e.id.clear())),
        ("events[0].source", Box::new(|e| e.source.clear())),
        ("events[0].type", Box::new(|e| e.r#type.clear())),
        (
            "events[0].spec_version",
            Box::new(|e| e.spec_version = "0.3".into()),
        ),
        (
            "events[0].spec_version",
            Box::new(|e| e.spec_version.clear()),
        ),
        ("events[0].type", Box::new(|e| e.r#type = "bad:type".into())),
        ("events[0].type", Box::new(|e| e.r#type = "a.{b}".into())),
        ("events[0].type", Box::new(|e| e.r#type = "a.*".into())),
        ("events[0].priority", Box::new(|e| e.priority = 42)),
        (
            "events[0].traceparent",
            Box::new(|e| e.traceparent = "nope".into()),
        ),
        // W3C writes ids in lowercase; an uppercase one would not continue the trace it names
        (
            "events[0].traceparent",
            Box::new(|e| {
                e.traceparent = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01".into()
            }),
        ),
        // an inbox is the server's to give, on Request
        (
            "events[0].reply_to",
            Box::new(|e| e.reply_to = "_inbox.0123456789abcdef0123456789abcdef".into()),
        ),
        (
            "events[0].extensions[\"Bad_Name\"]",
            Box::new(|e| {
                e.extensions.insert(
                    "Bad_Name".into(),
                    pb::ExtensionValue {
                        value: Some(pb::extension_value::Value::StringValue("x".into())),
                    },
                );
            }),
        ),
        (
            "events[0].extensions[\"priority\"]",
            Box::new(|e| {
                e.extensions.insert(
                    "priority".into(),
                    pb::ExtensionValue {
                        value: Some(pb::extension_value::Value::StringValue("x".into())),
                    },
                );
            }),
        ),
        (
            "events[0].time",
            Box::new(|e| {
                e.time = Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                })
            }),
        ),
        // past the range of a protobuf Timestamp: 10000-01-01, and one second before 0001-01-01
        (
            "events[0].time",
            Box::new(|e| {
                e.time = Some(prost_types::Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                })
            }),
        ),
        (
            "events[0].extensions[\"at\"]",
            Box::new(|e| {
                e.extensions.insert(
                    "at".into(),
                    pb::ExtensionValue {
                        value: Some(pb::extension_value::Value::TimestampValue(
                            prost_types::Timestamp {
                                seconds: -62_135_596_801,
                                nanos: 0,
                            },
                        )),
                    },
                );
            }),
        ),
    ];
    for (field, mutate) in cases {
        let mut e = event("bad", "t.created");
        mutate(&mut e);
        let status = bus
            .publish(pb::PublishRequest { events: vec![e] })
            .await
            .expect_err("rejected");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            violations(&status).iter().any(|v| v == field),
            "{field} not named in {status:?}"
        );
    }
    let status = bus
        .publish(pb::PublishRequest { events: vec![] })
        .await
        .expect_err("empty batch");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn control_characters_in_text_are_refused_naming_the_field_while_other_publishes_commit() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    type Mutation = Box<dyn Fn(&mut pb::Event)>;
    let text = |s: &str| pb::ExtensionValue {
        value: Some(pb::extension_value::Value::StringValue(s.into())),
    };
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "events[0].subject",
            Box::new(|e| e.subject = "eu\0west".into()),
        ),
        ("events[0].id", Box::new(|e| e.id = "id\u{1}".into())),
        (
            "events[0].source",
            Box::new(|e| e.source = "//s\u{7f}".into()),
        ),
        (
            "events[0].correlation_id",
            Box::new(|e| e.correlation_id = "c\0".into()),
        ),
        (
            "events[0].extensions[\"region\"]",
            Box::new(move |e| {
                e.extensions.insert("region".into(), text("eu\u{85}"));
            }),
        ),
    ];
    let mut committed = 0;
    for (case, (field, mutate)) in cases.into_iter().enumerate() {
        let mut bad = event(&format!("bad{case}"), "t.created");
        mutate(&mut bad);
        // sent with other publishes, which may share its group commit: on Postgres a stored U+0000 failed
        // the whole commit, every publisher in it
        let others = (0..8).map(|i| {
            let mut bus = server.bus();
            let e = event(&format!("ok{case}-{i}"), "t.created");
            async move { bus.publish(pb::PublishRequest { events: vec![e] }).await }
        });
        let (refused, others) = tokio::join!(
            bus.publish(pb::PublishRequest { events: vec![bad] }),
            futures::future::join_all(others)
        );
        let status = refused.expect_err("a control character is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            violations(&status).iter().any(|v| v == field),
            "{field} not named in {status:?}"
        );
        for other in others {
            other.expect("the other publishes commit");
            committed += 1;
        }
    }
    let stored: u64 = server
        .admin()
        .list_event_types(pb::ListEventTypesRequest::default())
        .await
        .expect("types")
        .into_inner()
        .types
        .iter()
        .map(|t| t.count)
        .sum();
    assert_eq!(stored, committed, "only the other publishes were stored");

    // reads name the field too, instead of failing in the store
    let replay = bus
        .replay(pb::ReplayRequest {
            subject: "eu\0west".into(),
            ..Default::default()
        })
        .await;
    let status = assert_status(replay, Code::InvalidArgument, "subject");
    assert!(violations(&status).contains(&"subject".to_owned()));
    let get = server
        .admin()
        .get_event(pb::GetEventRequest {
            id: "bad\0".into(),
            source: String::new(),
        })
        .await;
    assert_status(get, Code::InvalidArgument, "id");
}

/// Every refused event of a batch is named, not only the first: a caller fixes them all at once.
/// Bad content makes it INVALID_ARGUMENT though another event is only too large. Fields that do not
/// convert (an unknown priority) are named before the rest is checked.
#[tokio::test]
async fn every_refused_event_of_a_batch_is_named() {
    let server = TestServer::start_with(|c| c.limits.max_event_bytes = 10_000).await;
    let mut bus = server.bus();
    let mut bad_type = event("bad-type", "t.created");
    bad_type.r#type = "not a type".into();
    let mut bad_type_too = event("bad-type-too", "t.created");
    bad_type_too.r#type = "a.*".into();
    let mut big = event("big", "t.created");
    big.data = Some(pb::event::Data::BinaryData(vec![0; 20_000]));
    let batch = vec![
        bad_type,
        event("fine", "t.created"),
        bad_type_too,
        big.clone(),
    ];
    let status = bus
        .publish(pb::PublishRequest { events: batch })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violations(&status),
        ["events[0].type", "events[2].type", "events[3].data"],
        "{status:?}"
    );
    // fields that do not convert are named, every one, before the rest is checked
    let unknown_priority = |id: &str| {
        let mut e = event(id, "t.created");
        e.priority = 42;
        e
    };
    let status = bus
        .publish(pb::PublishRequest {
            events: vec![unknown_priority("p1"), unknown_priority("p2")],
        })
        .await
        .expect_err("refused");
    assert_eq!(
        violations(&status),
        ["events[0].priority", "events[1].priority"],
        "{status:?}"
    );
    // only sizes: RESOURCE_EXHAUSTED, each named
    let status = bus
        .publish(pb::PublishRequest {
            events: vec![big.clone(), event("fine", "t.created"), big],
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        violations(&status),
        ["events[0].data", "events[2].data"],
        "{status:?}"
    );
}

#[tokio::test]
async fn a_request_with_many_problems_gets_a_status_listing_the_first() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let empty = || pb::ExtensionValue {
        value: Some(pb::extension_value::Value::StringValue(String::new())),
    };
    // two problems per extension, at the extension limit (32): a bad name and an empty value
    let mut bad = event("bad", "t.created");
    for i in 0..32 {
        bad.extensions.insert(format!("Bad_{i:02}"), empty());
    }
    let status = bus
        .publish(pb::PublishRequest { events: vec![bad] })
        .await
        .expect_err("bad extensions are refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let named = violations(&status);
    assert_eq!(
        named.len(),
        21,
        "twenty listed and one counting the rest: {named:?}"
    );
    assert_eq!(named[0], "events[0].extensions[\"Bad_00\"]");
    assert_eq!(named[20], "...");
    // the message lists fewer, by bytes, and counts the rest too
    assert!(
        status
            .message()
            .starts_with("events[0].extensions[\"Bad_00\"]")
            && status.message().contains("; and ")
            && status.message().ends_with(" more"),
        "{}",
        status.message()
    );

    // long names are cut, and fewer are listed, so that the status fits in the headers clients take
    let mut long = event("long", "t.created");
    for i in 0..32 {
        long.extensions
            .insert(format!("{i:02}{}", "X".repeat(500)), empty());
    }
    let status = bus
        .publish(pb::PublishRequest { events: vec![long] })
        .await
        .expect_err("bad extensions are refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.details().len() + status.message().len() < 4096,
        "{} bytes of details, {} of message",
        status.details().len(),
        status.message().len()
    );
    assert_eq!(violations(&status).last().map(String::as_str), Some("..."));

    // past the limit, the count is the one problem named, not each of thousands
    let mut crowded = event("crowded", "t.created");
    for i in 0..10_000 {
        crowded.extensions.insert(format!("Bad_{i}"), empty());
    }
    let status = bus
        .publish(pb::PublishRequest {
            events: vec![crowded],
        })
        .await
        .expect_err("too many extensions are refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(violations(&status), ["events[0].extensions"]);
}

/// With attributes allowed to be long, a source and an id that together would not fit the store's
/// key are refused as too large, naming the id, on either backend (one byte less is stored), and so
/// is a correlation id too long for its index.
#[tokio::test]
async fn a_source_and_id_too_long_together_are_resource_exhausted() {
    let server = TestServer::start_with(|c| c.limits.max_attribute_bytes = 4096).await;
    let mut bus = server.bus();
    let keyed = |source_bytes: usize, id_bytes: usize| {
        let mut e = event(&"i".repeat(id_bytes), "t.created");
        e.source = "s".repeat(source_bytes);
        e
    };
    let status = bus
        .publish(pb::PublishRequest {
            events: vec![keyed(1500, 1061)],
        })
        .await
        .expect_err("2,561 bytes of key");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(violations(&status), ["events[0].id"], "{status:?}");
    publish(&mut bus, vec![keyed(1500, 1060)]).await;
    // a source too long for the key by itself is the one named
    let status = bus
        .publish(pb::PublishRequest {
            events: vec![keyed(2600, 10)],
        })
        .await
        .expect_err("2,610 bytes of key");
    assert_eq!(violations(&status), ["events[0].source"], "{status:?}");
    // a correlation id is an index entry of its own
    let mut correlated = event("correlated", "t.created");
    correlated.correlation_id = "c".repeat(2561);
    let status = bus
        .publish(pb::PublishRequest {
            events: vec![correlated],
        })
        .await
        .expect_err("2,561 bytes of correlation id");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        violations(&status),
        ["events[0].correlation_id"],
        "{status:?}"
    );
}

#[tokio::test]
async fn oversized_input_is_resource_exhausted() {
    let server = TestServer::start_with(|c| {
        c.limits.max_event_bytes = 10_000;
        c.limits.max_batch_events = 5;
    })
    .await;
    let mut bus = server.bus();
    let mut big = event("big", "t.created");
    big.data = Some(pb::event::Data::BinaryData(vec![0; 20_000]));
    let status = bus
        .publish(pb::PublishRequest { events: vec![big] })
        .await
        .expect_err("too big");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(violations(&status).contains(&"events[0].data".to_owned()));

    let many = (0..6)
        .map(|i| event(&format!("m{i}"), "t.created"))
        .collect();
    let status = bus
        .publish(pb::PublishRequest { events: many })
        .await
        .expect_err("too many");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(violations(&status).contains(&"events".to_owned()));

    let mut long_subject = event("long", "t.created");
    long_subject.subject = "s".repeat(2000);
    let status = bus
        .publish(pb::PublishRequest {
            events: vec![long_subject],
        })
        .await
        .expect_err("long attribute");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(violations(&status).contains(&"events[0].subject".to_owned()));

    // a message over the transport limit is refused before decoding, the server stays up
    let huge = (0..1)
        .map(|_| {
            let mut e = event("huge", "t.created");
            e.data = Some(pb::event::Data::BinaryData(vec![1; 8 << 20]));
            e
        })
        .collect();
    let status = bus
        .publish(pb::PublishRequest { events: huge })
        .await
        .expect_err("over message limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    publish(&mut bus, vec![event("after", "t.created")]).await;
}

/// Opens a PublishStream; returns where to send requests and the answers.
async fn publish_stream(
    bus: &mut EventBusClient<Channel>,
) -> (
    tokio::sync::mpsc::UnboundedSender<pb::PublishStreamRequest>,
    tonic::Streaming<pb::PublishStreamResponse>,
) {
    let (requests, rx) = tokio::sync::mpsc::unbounded_channel();
    let answers = bus
        .publish_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .expect("PublishStream opens")
        .into_inner();
    (requests, answers)
}

/// The next answer of a PublishStream, within [`WAIT`].
async fn next_answer(
    answers: &mut tonic::Streaming<pb::PublishStreamResponse>,
) -> pb::PublishStreamResponse {
    tokio::time::timeout(WAIT, answers.message())
        .await
        .expect("an answer within the wait")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

fn published(answer: &pb::PublishStreamResponse) -> &pb::PublishResponse {
    match &answer.outcome {
        Some(pb::publish_stream_response::Outcome::Published(p)) => p,
        other => panic!("request {} not published: {other:?}", answer.request_id),
    }
}

fn refused(answer: &pb::PublishStreamResponse) -> &pb::PublishError {
    match &answer.outcome {
        Some(pb::publish_stream_response::Outcome::Error(e)) => e,
        other => panic!("request {} not refused: {other:?}", answer.request_id),
    }
}

#[tokio::test]
async fn publish_stream_commits_in_the_order_sent_and_answers_in_that_order() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let (requests, mut answers) = publish_stream(&mut bus).await;
    // every request is sent before any answer is read: the server must take them in order
    // even while earlier ones are still being committed
    let sent: Vec<(u64, Vec<String>)> = (0..300u64)
        .map(|r| {
            let ids: Vec<String> = (0..1 + r % 3).map(|k| format!("s{r}-{k}")).collect();
            // ids the client picks, in no particular order
            (r * 7919 % 1000, ids)
        })
        .collect();
    for (request_id, ids) in &sent {
        let events = ids.iter().map(|id| event(id, "stream.t")).collect();
        requests
            .send(pb::PublishStreamRequest {
                request_id: *request_id,
                events,
            })
            .expect("send");
    }
    let mut last = 0;
    for (request_id, ids) in &sent {
        let answer = next_answer(&mut answers).await;
        assert_eq!(
            answer.request_id, *request_id,
            "answers come in request order"
        );
        let results = &published(&answer).results;
        let got: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(got, *ids, "one result per event, in order");
        for r in results {
            assert!(r.sequence > last, "sequences follow the order sent");
            assert!(!r.duplicate);
            last = r.sequence;
        }
    }
    // the publisher closes its side: the server ends the stream cleanly once everything is answered
    drop(requests);
    let end = tokio::time::timeout(WAIT, answers.message())
        .await
        .expect("ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    // what was answered is stored and readable like any publish
    let first = server
        .admin()
        .get_event(pb::GetEventRequest {
            id: "s0-0".into(),
            source: String::new(),
        })
        .await
        .expect("stored")
        .into_inner();
    assert_eq!(first.event.expect("event").id, "s0-0");
}

#[tokio::test]
async fn a_publish_stream_message_over_the_limit_ends_the_stream_after_the_answers_before_it() {
    let server = TestServer::start_with(|c| c.limits.max_batch_bytes = 64 << 10).await;
    let mut bus = server.bus();
    let (requests, mut answers) = publish_stream(&mut bus).await;
    let mut huge = event("huge", "stream.t");
    huge.data = Some(pb::event::Data::BinaryData(vec![7; 2 << 20]));
    for (request_id, events) in [vec![event("before", "stream.t")], vec![huge]]
        .into_iter()
        .enumerate()
    {
        requests
            .send(pb::PublishStreamRequest {
                request_id: request_id as u64,
                events,
            })
            .expect("send");
    }
    // the message cannot be read, so nothing after it can: the request before it is answered, then
    // the stream ends with the reason
    let before = next_answer(&mut answers).await;
    assert_eq!(before.request_id, 0);
    published(&before);
    let end = tokio::time::timeout(WAIT, answers.message())
        .await
        .expect("the stream ends in time");
    let status = end.expect_err("the stream ends with an error, not OK");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

/// A message that is not protobuf is the caller's bad input, on a unary call as on a stream:
/// INVALID_ARGUMENT saying it could not be read, never INTERNAL.
#[tokio::test]
async fn a_message_that_is_not_protobuf_is_invalid_argument() {
    let server = TestServer::start().await;
    // a field of 5 bytes that holds 1
    let garbage = vec![0x0a, 0x05, 0x01];
    for path in [
        "/nerve.v1.EventBus/Publish",
        "/nerve.v1.EventBus/PublishStream",
    ] {
        let (status, message) =
            crate::harness::raw_grpc_call(server.addr(), path, &[], garbage.clone()).await;
        assert_eq!(status, "3", "{path}: {message}");
        assert!(
            message.contains("decode") || message.contains("could not be read"),
            "{path}: {message}"
        );
    }
}

#[tokio::test]
async fn a_refused_request_on_a_publish_stream_is_answered_and_the_stream_goes_on() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    publish(&mut bus, vec![event("taken", "stream.t")]).await;
    let (requests, mut answers) = publish_stream(&mut bus).await;
    let mut conflicting = event("taken", "stream.t");
    conflicting.subject = "changed".into();
    let mut invalid = event("bad", "stream.t");
    invalid.r#type = String::new();
    let batches = vec![
        vec![event("ok-1", "stream.t")],
        vec![event("fresh", "stream.t"), invalid],
        vec![conflicting, event("fresh-2", "stream.t")],
        vec![event("taken", "stream.t")],
        vec![event("ok-2", "stream.t")],
    ];
    for (request_id, events) in batches.into_iter().enumerate() {
        requests
            .send(pb::PublishStreamRequest {
                request_id: request_id as u64,
                events,
            })
            .expect("send");
    }
    let ok_1 = next_answer(&mut answers).await;
    let ok_1 = published(&ok_1).results[0].sequence;
    let bad = next_answer(&mut answers).await;
    let error = refused(&bad);
    assert_eq!(error.code, Code::InvalidArgument as i32, "{error:?}");
    assert!(error.message.contains("events[1].type"), "{error:?}");
    // the same details a Publish call's status carries, as a google.rpc.Status
    let status =
        tonic::Status::with_details(Code::InvalidArgument, "", error.details.clone().into());
    assert_eq!(violations(&status), ["events[1].type"], "{error:?}");
    let conflict = next_answer(&mut answers).await;
    let error = refused(&conflict);
    assert_eq!(error.code, Code::AlreadyExists as i32, "{error:?}");
    assert!(error.message.contains("taken"), "{error:?}");
    let retry = next_answer(&mut answers).await;
    assert!(
        published(&retry).results[0].duplicate,
        "a retry is a duplicate"
    );
    let ok_2 = next_answer(&mut answers).await;
    assert_eq!(
        published(&ok_2).results[0].sequence,
        ok_1 + 1,
        "refused requests stored nothing and took no sequence"
    );
    for id in ["fresh", "fresh-2"] {
        let get = server
            .admin()
            .get_event(pb::GetEventRequest {
                id: id.into(),
                source: String::new(),
            })
            .await;
        assert_status(get, Code::NotFound, id);
    }
}
