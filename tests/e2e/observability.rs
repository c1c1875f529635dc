//! Metrics move with the traffic, and trace context travels with events.

use nerve::api::pb;

use crate::harness::{Subscriber, TestServer, event, millis, open, publish};

/// The value of the series `name{labels}` where every given label matches, or 0.
pub(crate) fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, want)| rest.contains(&format!("{k}=\"{want}\""))))
            .then(|| v.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

#[tokio::test]
async fn metrics_count_publishes_deliveries_failures_and_dead_letters() {
    let server = TestServer::start_with(|c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.metrics.group_sample_interval = std::time::Duration::from_millis(100);
    })
    .await;
    let mut bus = server.bus();
    let before = server.scrape().await;
    let mut o = open(&["metrics.probe"], "metered");
    o.max_attempts = 1;
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    // deliveries count in the latency histogram from the caught-up marker on (history read to catch
    // up is not latency): published before it, the events could be read as the group's backlog
    assert!(
        sub.until_caught_up().await.is_empty(),
        "a new group has no backlog"
    );
    publish(
        &mut bus,
        vec![event("m1", "metrics.probe"), event("m2", "metrics.probe")],
    )
    .await;
    publish(&mut bus, vec![event("m1", "metrics.probe")]).await; // a retry: duplicate
    // a refused type takes no label value: labels are capped, and junk would crowd out real types
    let junk = format!("metrics.junk {}", uuid::Uuid::new_v4().simple());
    let refused = bus
        .publish(pb::PublishRequest {
            events: vec![event("j1", &junk)],
        })
        .await;
    assert_eq!(
        refused.expect_err("invalid type").code(),
        tonic::Code::InvalidArgument
    );
    let first = sub.next_delivery().await;
    let second = sub.next_delivery().await;
    sub.ack_one(&first).await;
    // the second is nacked: one failure, and with max_attempts 1 it is dead-lettered on redelivery
    sub.send(pb::subscribe_request::Action::Nack(pb::Nack {
        delivery_ids: vec![second.delivery_id.clone()],
        ..Default::default()
    }))
    .await;
    let after = crate::harness::eventually("dead letter counted", || async {
        let text = server.scrape().await;
        (value(&text, "nerve_dead_letters_total", &[("group", "metered")]) >= 1.0).then_some(text)
    })
    .await;
    assert!(!after.contains(&junk), "a refused type became a label");
    let invalid = [("type", "invalid"), ("outcome", "rejected")];
    assert!(
        value(&after, "nerve_events_published_total", &invalid)
            > value(&before, "nerve_events_published_total", &invalid)
    );
    let stored = [("type", "metrics.probe"), ("outcome", "stored")];
    let duplicate = [("type", "metrics.probe"), ("outcome", "duplicate")];
    assert_eq!(
        value(&after, "nerve_events_published_total", &stored)
            - value(&before, "nerve_events_published_total", &stored),
        2.0
    );
    assert_eq!(
        value(&after, "nerve_events_published_total", &duplicate),
        1.0
    );
    let delivered = [("type", "metrics.probe"), ("group", "metered")];
    assert_eq!(
        value(&after, "nerve_events_delivered_total", &delivered),
        2.0
    );
    assert_eq!(
        value(
            &after,
            "nerve_delivery_failures_total",
            &[("group", "metered"), ("reason", "nack")]
        ),
        1.0
    );
    assert!(
        value(
            &after,
            "nerve_delivery_latency_seconds_count",
            &[("group", "metered")]
        ) >= 2.0
    );
    assert!(value(&after, "nerve_store_commit_duration_seconds_count", &[]) >= 2.0);
    assert!(value(&after, "nerve_publish_duration_seconds_count", &[]) >= 2.0);
    assert!(value(&after, "nerve_subscriptions_active", &[("kind", "group")]) >= 1.0);
    // the health watcher reports both backends up once its first check has answered
    crate::harness::eventually("backends counted up", || async {
        let text = server.scrape().await;
        (value(&text, "nerve_backend_up", &[("backend", "store")]) == 1.0
            && value(&text, "nerve_backend_up", &[("backend", "streams")]) == 1.0)
            .then_some(())
    })
    .await;
    // the sampler reports the group's backlog
    crate::harness::eventually("group gauges", || async {
        let text = server.scrape().await;
        text.contains("nerve_group_pending{group=\"metered\"}")
            .then_some(())
    })
    .await;
}

/// Replies are counted by whether they reached the requester, and an ack of a delivery already
/// redelivered (its lease ran out first) is counted as stale: both tell an operator that deadlines are
/// too short.
#[tokio::test]
async fn replies_and_stale_acks_are_counted() {
    let server = TestServer::start_with(|c| c.metrics.listen = "127.0.0.1:0".into()).await;
    let mut bus = server.bus();
    // the recorder is the process's: other tests' replies count in it too
    let replies =
        |text: &str, outcome: &str| value(text, "nerve_replies_total", &[("outcome", outcome)]);
    let before = server.scrape().await;
    let mut responder = Subscriber::open(&mut bus, open(&["metrics.asked-twice"], ""))
        .await
        .expect("open");
    let call = crate::harness::request_in_background(
        server.bus(),
        event("twice", "metrics.asked-twice"),
        10_000,
    );
    let inbox = responder
        .next_delivery()
        .await
        .event
        .expect("event")
        .reply_to;
    for id in ["first", "second"] {
        bus.reply(pb::ReplyRequest {
            reply_to: inbox.clone(),
            event: Some(event(id, "metrics.answered")),
        })
        .await
        .expect("reply");
    }
    call.await.expect("join").expect("answered");
    let mut o = open(&["metrics.leased"], "stale-metered");
    o.ack_deadline = millis(1_000);
    let mut member = Subscriber::open(&mut bus, o).await.expect("open");
    publish(&mut bus, vec![event("leased", "metrics.leased")]).await;
    let first = member.next_delivery().await;
    // not acked: it comes again once its lease runs out, and the first attempt's ack is too late
    let again = member.next_delivery().await;
    assert_eq!((first.attempt, again.attempt), (1, 2));
    // (`again` stays unacked: under a slow run its own lease could run out before its ack, which
    // would then be stale too)
    member.ack_one(&first).await;
    let after = crate::harness::eventually("the late ack counted", || async {
        let text = server.scrape().await;
        let stale = value(
            &text,
            "nerve_stale_settlements_total",
            &[("group", "stale-metered")],
        );
        (stale >= 1.0).then_some(text)
    })
    .await;
    assert_eq!(
        value(
            &after,
            "nerve_stale_settlements_total",
            &[("group", "stale-metered")]
        ),
        1.0,
        "one stale ack, counted once"
    );
    assert!(replies(&after, "delivered") > replies(&before, "delivered"));
    // the second reply finds the inbox taken, or already closed
    let undelivered = |text: &str| replies(text, "not_delivered") + replies(text, "late");
    assert!(undelivered(&after) > undelivered(&before));
}

/// A nack of a delivery acked already is a stale settlement, not a failure: one nack counts in one
/// series.
#[tokio::test]
async fn a_nack_of_an_acked_delivery_is_stale_and_no_failure() {
    let server = TestServer::start_with(|c| c.metrics.listen = "127.0.0.1:0".into()).await;
    let mut bus = server.bus();
    let mut member = Subscriber::open(&mut bus, open(&["metrics.nacked-late"], "stale-nack"))
        .await
        .expect("open");
    publish(&mut bus, vec![event("nacked-late", "metrics.nacked-late")]).await;
    let delivery = member.next_delivery().await;
    member.ack_one(&delivery).await;
    member
        .send(pb::subscribe_request::Action::Nack(pb::Nack {
            delivery_ids: vec![delivery.delivery_id.clone()],
            ..Default::default()
        }))
        .await;
    let group = [("group", "stale-nack")];
    let after = crate::harness::eventually("the late nack counted", || async {
        let text = server.scrape().await;
        (value(&text, "nerve_stale_settlements_total", &group) >= 1.0).then_some(text)
    })
    .await;
    assert_eq!(value(&after, "nerve_stale_settlements_total", &group), 1.0);
    assert_eq!(
        value(
            &after,
            "nerve_delivery_failures_total",
            &[("group", "stale-nack"), ("reason", "nack")]
        ),
        0.0,
        "{after}"
    );
}

/// A request that its call's deadline ends before the bus answers is counted too, as cancelled: the
/// transport drops the call, and with it the wait for a reply.
#[tokio::test]
async fn a_request_its_call_deadline_ends_is_counted() {
    let server = TestServer::start_with(|c| c.metrics.listen = "127.0.0.1:0".into()).await;
    let mut bus = server.bus();
    let cancelled = [("outcome", "cancelled")];
    // the recorder is the process's: other tests' requests count in it too
    let before = value(&server.scrape().await, "nerve_requests_total", &cancelled);
    // a responder that never answers
    let _responder = Subscriber::open(&mut bus, open(&["metrics.asked"], ""))
        .await
        .expect("open");
    let mut request = tonic::Request::new(pb::RequestRequest {
        event: Some(event("asked-1", "metrics.asked")),
        timeout: millis(60_000),
    });
    request.set_timeout(std::time::Duration::from_millis(300));
    bus.request(request).await.expect_err("no reply comes");
    crate::harness::eventually("the request counted", || async {
        let text = server.scrape().await;
        (value(&text, "nerve_requests_total", &cancelled) > before).then_some(())
    })
    .await;
}

/// Holds the lock the store's writer commits under (SQLite's write lock, or Postgres' sequence row),
/// so a publish waits for the test.
enum CommitLock {
    Sqlite(rusqlite::Connection),
    Postgres(sqlx::PgConnection),
}

impl CommitLock {
    async fn hold(store_url: &str, data_dir: &std::path::Path) -> Self {
        use sqlx::Connection;
        if !store_url.starts_with("postgres") {
            let conn =
                rusqlite::Connection::open(data_dir.join("nerve.db")).expect("open the database");
            conn.execute_batch("BEGIN IMMEDIATE")
                .expect("take the write lock");
            return CommitLock::Sqlite(conn);
        }
        let mut conn = sqlx::PgConnection::connect(store_url)
            .await
            .expect("connect");
        sqlx::raw_sql("BEGIN; SELECT seq FROM nerve_sequence FOR UPDATE")
            .execute(&mut conn)
            .await
            .expect("lock the sequence row");
        CommitLock::Postgres(conn)
    }

    async fn release(self) {
        match self {
            CommitLock::Sqlite(conn) => conn.execute_batch("COMMIT").expect("release"),
            CommitLock::Postgres(mut conn) => {
                sqlx::raw_sql("COMMIT")
                    .execute(&mut conn)
                    .await
                    .expect("release");
            }
        }
    }
}

/// Publishes over a bare HTTP/2 stream whose `grpc-timeout` only the server keeps (a tonic client ends
/// the call at the same moment), and returns the `grpc-status` the server answered.
async fn publish_with_server_deadline(
    addr: std::net::SocketAddr,
    request: pb::PublishRequest,
    timeout: &str,
) -> String {
    use prost::Message;
    let (status, _) = crate::harness::raw_grpc_call(
        addr,
        "/nerve.v1.EventBus/Publish",
        &[("grpc-timeout", timeout)],
        request.encode_to_vec(),
    )
    .await;
    status
}

/// A publish whose caller gave up before its commit answered is counted all the same: it was stored.
#[tokio::test]
async fn a_publish_is_counted_when_its_caller_gave_up_before_the_commit_answered() {
    let (mut store_url, mut data_dir) = (String::new(), std::path::PathBuf::new());
    let server = TestServer::start_with(|c| {
        c.metrics.listen = "127.0.0.1:0".into();
        store_url.clone_from(&c.store);
        data_dir.clone_from(&c.data_dir);
    })
    .await;
    // labels are capped per process, first come first served: take this one before other tests
    let label = nerve::metrics::type_label("metrics.abandoned");
    let stored = [("type", label.as_str()), ("outcome", "stored")];
    let before = value(
        &server.scrape().await,
        "nerve_events_published_total",
        &stored,
    );
    let lock = CommitLock::hold(&store_url, &data_dir).await;
    let request = pb::PublishRequest {
        events: vec![event("abandoned-1", "metrics.abandoned")],
    };
    // the server's deadline ends the call, and it drops the handler before it answers so
    let status = publish_with_server_deadline(server.addr(), request, "1S").await;
    // tonic answers an expired deadline CANCELLED ("Timeout expired"); DEADLINE_EXCEEDED would do
    assert!(
        status == "1" || status == "4",
        "grpc-status {status}, want the deadline's"
    );
    lock.release().await;
    crate::harness::eventually("the abandoned publish counted as stored", || async {
        let text = server.scrape().await;
        (value(&text, "nerve_events_published_total", &stored) - before == 1.0).then_some(())
    })
    .await;
    assert_eq!(server.stored_event("abandoned-1").await.id, "abandoned-1");
}

const CALLER_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const CALLER_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn with_traceparent<T>(message: T) -> tonic::Request<T> {
    with_trace_header(message, CALLER_TRACE)
}

/// A call carrying `traceparent` as its header.
fn with_trace_header<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    request
}

#[tokio::test]
async fn trace_context_travels_from_publish_to_delivery_and_from_request_to_reply() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let mut sub = Subscriber::open(&mut bus, open(&["traced.>"], ""))
        .await
        .expect("open");
    // the call's traceparent header is stored on an event that has none
    bus.publish(with_traceparent(pb::PublishRequest {
        events: vec![event("t1", "traced.call")],
    }))
    .await
    .expect("publish");
    // an event's own trace context is kept
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut e = event("t2", "traced.own");
    e.traceparent = own.into();
    bus.publish(with_traceparent(pb::PublishRequest { events: vec![e] }))
        .await
        .expect("publish");
    let first = sub.next_delivery().await.event.expect("event");
    assert_eq!(first.traceparent, CALLER_TRACE);
    let second = sub.next_delivery().await.event.expect("event");
    assert_eq!(second.traceparent, own);

    // a request's trace context reaches the responder and comes back on the reply
    let mut responder = Subscriber::open(&mut bus, open(&["traced.ask"], ""))
        .await
        .expect("open");
    let mut requester = server.bus();
    let call = tokio::spawn(async move {
        requester
            .request(with_traceparent(pb::RequestRequest {
                event: Some(event("q", "traced.ask")),
                timeout: crate::harness::millis(5000),
            }))
            .await
    });
    let asked = responder.next_delivery().await.event.expect("event");
    assert_eq!(asked.traceparent, CALLER_TRACE);
    bus.reply(pb::ReplyRequest {
        reply_to: asked.reply_to,
        event: Some(event("a", "traced.answer")),
    })
    .await
    .expect("reply");
    let reply = call
        .await
        .expect("join")
        .expect("answered")
        .into_inner()
        .reply
        .expect("reply");
    assert_eq!(
        reply.traceparent, CALLER_TRACE,
        "the reply continues the request's trace"
    );
}

/// A header of a later version (more fields, any length) is stored as version 00 writes the same trace
/// context: an event's own field must have that shape, and a consumer republishing the event would be
/// refused otherwise. It would also carry any number of bytes past the event size limit. Headers
/// without W3C's shape (odd id lengths, version ff in either case) are ignored; level 2's flags are
/// kept, a later version's reserved bits zeroed.
#[tokio::test]
async fn a_trace_header_of_a_later_version_is_stored_as_version_00() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let later = format!(
        "01-{CALLER_TRACE_ID}-00f067aa0ba902b7-01-{}",
        "a".repeat(8000)
    );
    bus.publish(with_trace_header(
        pb::PublishRequest {
            events: vec![event("later-1", "traced.later")],
        },
        &later,
    ))
    .await
    .expect("publish");
    let stored = server.stored_event("later-1").await;
    assert_eq!(stored.traceparent, CALLER_TRACE);
    // ids of other lengths are not a trace context: nothing is made up from them
    bus.publish(with_trace_header(
        pb::PublishRequest {
            events: vec![event("odd-1", "traced.later")],
        },
        "00-1-1-01",
    ))
    .await
    .expect("publish");
    assert_eq!(server.stored_event("odd-1").await.traceparent, "");
    // nor are two headers: which parent is meant cannot be told
    let mut twice = tonic::Request::new(pb::PublishRequest {
        events: vec![event("twice-1", "traced.later")],
    });
    for header in [
        CALLER_TRACE.to_owned(),
        format!("00-{CALLER_TRACE_ID}-b7ad6b7169203331-01"),
    ] {
        twice
            .metadata_mut()
            .append("traceparent", header.parse().expect("ascii"));
    }
    bus.publish(twice).await.expect("publish");
    assert_eq!(server.stored_event("twice-1").await.traceparent, "");
    // nor is version ff, nor uppercase hex (W3C writes lowercase; tracers compare ids as written)
    for (id, header) in [
        ("ff-1", format!("ff-{CALLER_TRACE_ID}-00f067aa0ba902b7-01")),
        (
            "upper-1",
            format!(
                "00-{}-00F067AA0BA902B7-01",
                CALLER_TRACE_ID.to_ascii_uppercase()
            ),
        ),
    ] {
        bus.publish(with_trace_header(
            pb::PublishRequest {
                events: vec![event(id, "traced.later")],
            },
            &header,
        ))
        .await
        .expect("publish");
        assert_eq!(server.stored_event(id).await.traceparent, "", "{header}");
    }
    // Level 2's random-trace-id flag (02) travels with its trace id, also beside sampled (03, what
    // tracers of that level send); the reserved bits of a later version's flags are not written
    for (id, header, stored) in [
        (
            "flags-02",
            format!("00-{CALLER_TRACE_ID}-00f067aa0ba902b7-02"),
            "02",
        ),
        (
            "flags-03",
            format!("00-{CALLER_TRACE_ID}-00f067aa0ba902b7-03"),
            "03",
        ),
        (
            "flags-ff",
            format!("01-{CALLER_TRACE_ID}-00f067aa0ba902b7-ff-x"),
            "03",
        ),
    ] {
        bus.publish(with_trace_header(
            pb::PublishRequest {
                events: vec![event(id, "traced.later")],
            },
            &header,
        ))
        .await
        .expect("publish");
        assert_eq!(
            server.stored_event(id).await.traceparent,
            format!("00-{CALLER_TRACE_ID}-00f067aa0ba902b7-{stored}"),
            "{header}"
        );
    }
    // what is stored can be published again as it is
    let mut again = stored;
    again.id = "later-2".into();
    bus.publish(pb::PublishRequest {
        events: vec![again],
    })
    .await
    .expect("a stored event is valid input");
}

#[tokio::test]
async fn a_retry_under_another_span_is_the_same_event() {
    let server = TestServer::start().await;
    let mut bus = server.bus();
    let call = |span_id: &str, e: pb::Event| {
        let header = format!("00-{CALLER_TRACE_ID}-{span_id}-01");
        with_trace_header(pb::PublishRequest { events: vec![e] }, &header)
    };
    let first = bus
        .publish(call("00f067aa0ba902b7", event("r1", "traced.retry")))
        .await
        .expect("publish")
        .into_inner()
        .results;
    // the client's tracing starts a span per attempt: the retry's header differs, its event does not
    let retry = bus
        .publish(call("00f067aa0ba902b8", event("r1", "traced.retry")))
        .await
        .expect("a retry is not a conflict")
        .into_inner()
        .results;
    assert!(retry[0].duplicate, "{retry:?}");
    assert_eq!(retry[0].sequence, first[0].sequence);
    let stored = server.stored_event("r1").await;
    assert_eq!(
        stored.traceparent,
        format!("00-{CALLER_TRACE_ID}-00f067aa0ba902b7-01"),
        "the first call's trace context is the one kept"
    );
}

/// A collector, and a nerve-server in a directory of its own exporting its spans to it (with `env`
/// besides).
async fn exporting_server(
    env: &[(&str, &str)],
) -> (Collector, crate::harness::ServerProcess, tempfile::TempDir) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("http://{addr}");
    let mut vars = std::collections::HashMap::from([
        ("NERVE_TRACING__OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    vars.extend(env.iter().copied());
    let server = crate::harness::ServerProcess::spawn(dir.path(), &vars).await;
    (collector, server, dir)
}

/// An in-process start that fails after opening its metrics listener (here the policy file cannot
/// be read) closes it again: an embedder that retries finds the port free.
#[tokio::test]
async fn a_start_that_fails_lets_go_of_its_metrics_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut config = crate::harness::test_config(dir.path());
    config.metrics.listen = format!("127.0.0.1:{port}");
    config.auth.policy_file = dir.path().join("missing.toml").display().to_string();
    config.auth.jwt.hs_secret_file = dir.path().join("missing.key").display().to_string();
    let backends = nerve::open_backends(&config).await.expect("backends");
    crate::harness::install_recorder();
    let failed = nerve::start(config, backends).await;
    assert!(failed.is_err(), "a policy that cannot be read");
    // the listener's task sees its end at its next poll
    crate::harness::eventually("the metrics port let go", || async {
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
}

/// A trace collector that takes connections and never answers does not hold the exit past
/// `shutdown_timeout` by much: the last spans' export is given up after a short wait.
#[tokio::test]
async fn a_collector_that_does_not_answer_does_not_hold_the_exit() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            held.push(connection);
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = crate::harness::ServerProcess::spawn(
        dir.path(),
        &std::collections::HashMap::from([
            ("NERVE_TRACING__OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("NERVE_SHUTDOWN_TIMEOUT", "1s"),
        ]),
    )
    .await;
    let mut bus = nerve::api::pb::event_bus_client::EventBusClient::new(server.channel().await);
    publish(&mut bus, vec![event("unexported", "exported.silent")]).await;
    server.signal(15);
    // within the harness' wait (10 s), where the exporter alone would wait 10 s twice
    server.exits_zero().await;
}

/// Spans are exported whatever the log filter says: a quieter log (here the API's module at `warn`,
/// where its call spans are `info`) does not end the export.
#[tokio::test]
async fn spans_are_exported_whatever_the_log_level() {
    let (collector, server, _dir) =
        exporting_server(&[("NERVE_LOG_LEVEL", "warn,nerve=info,nerve::api=warn")]).await;
    let mut bus = nerve::api::pb::event_bus_client::EventBusClient::new(server.channel().await);
    bus.publish(with_traceparent(pb::PublishRequest {
        events: vec![event("quiet-1", "exported.quiet")],
    }))
    .await
    .expect("publish");
    crate::harness::eventually("the publish span exported", || async {
        let spans = collector.0.lock().expect("lock").clone();
        spans
            .iter()
            .any(|(name, trace, _)| name == "nerve.publish" && trace == CALLER_TRACE_ID)
            .then_some(())
    })
    .await;
}

/// Deliveries are logged with their group's name: logs have no label cap (and without metrics every
/// group's label is `other`).
#[tokio::test]
async fn a_delivery_is_logged_with_its_groups_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = crate::harness::ServerProcess::spawn(
        dir.path(),
        &std::collections::HashMap::from([(
            "NERVE_LOG_LEVEL",
            "info,nerve::bus::subscription=debug",
        )]),
    )
    .await;
    let mut bus = nerve::api::pb::event_bus_client::EventBusClient::new(server.channel().await);
    let mut member = Subscriber::open(&mut bus, open(&["logged.x"], "logged-group"))
        .await
        .expect("open");
    publish(&mut bus, vec![event("logged-1", "logged.x")]).await;
    member.next_delivery().await;
    let line = server.logged("delivering").await;
    assert!(line.contains("group=logged-group"), "{line}");
}

/// Collects exported spans as (name, trace id hex, parent span id hex).
#[derive(Clone, Default)]
struct Collector(std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut spans = self.0.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((span.name, hex(&span.trace_id), hex(&span.parent_span_id)));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test]
async fn a_reply_retried_under_another_span_is_the_same_reply() {
    let (server, injection) = crate::injected_store::start_injected().await;
    let mut bus = server.bus();
    let mut responder = Subscriber::open(&mut bus, open(&["svc.ask"], ""))
        .await
        .expect("open");
    let call =
        crate::harness::request_in_background(server.bus(), event("ask-r", "svc.ask"), 10_000);
    let asked = responder.next_delivery().await.event.expect("event");
    let reply = |traceparent: &str| {
        let mut bus = server.bus();
        let request = with_trace_header(
            pb::ReplyRequest {
                reply_to: asked.reply_to.clone(),
                event: Some(event("answer-r", "svc.answer")),
            },
            traceparent,
        );
        async move { bus.reply(request).await }
    };
    // the first attempt is stored, then fails before it reaches the requester
    injection
        .fail_next_read_sequences
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = reply("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").await;
    assert_eq!(
        failed.expect_err("the injected failure").code(),
        tonic::Code::Unavailable
    );
    // the client retries under a span of its own: the same reply, delivered
    let retried = reply("00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01")
        .await
        .expect("the retry is the same reply, not another with the same id")
        .into_inner();
    assert!(retried.delivered);
    let answer = call.await.expect("join").expect("answered").into_inner();
    assert_eq!(answer.reply.expect("reply").id, "answer-r");
}

#[tokio::test]
async fn spans_are_exported_over_otlp_in_the_callers_trace() {
    let (collector, server, _dir) = exporting_server(&[]).await;
    let mut bus = nerve::api::pb::event_bus_client::EventBusClient::new(server.channel().await);
    let mut sub = Subscriber::open(&mut bus, open(&["exported.x"], ""))
        .await
        .expect("open");
    bus.publish(with_traceparent(pb::PublishRequest {
        events: vec![event("x1", "exported.x")],
    }))
    .await
    .expect("publish");
    let delivered = sub.next_delivery().await.event.expect("event");
    // stored with the publish span's context: same trace, the server's span as parent
    assert!(
        delivered.traceparent.contains(CALLER_TRACE_ID),
        "{}",
        delivered.traceparent
    );
    assert_ne!(delivered.traceparent, CALLER_TRACE);
    // each call has a span of its own, recorded on events without a traceparent: a retry is still the same event
    let retry = bus
        .publish(with_traceparent(pb::PublishRequest {
            events: vec![event("x1", "exported.x")],
        }))
        .await
        .expect("a retry is not a conflict")
        .into_inner()
        .results;
    assert!(retry[0].duplicate, "{retry:?}");
    let spans = crate::harness::eventually("publish and deliver spans exported", || async {
        let spans = collector.0.lock().expect("lock").clone();
        let names: Vec<&str> = spans
            .iter()
            .filter(|(_, trace, _)| trace == CALLER_TRACE_ID)
            .map(|(name, _, _)| name.as_str())
            .collect();
        (names.contains(&"nerve.publish") && names.contains(&"nerve.deliver")).then_some(spans)
    })
    .await;
    let publish = spans
        .iter()
        .find(|s| s.0 == "nerve.publish")
        .expect("publish span");
    assert_eq!(
        publish.2, "00f067aa0ba902b7",
        "the publish span is a child of the caller's span"
    );
    // a caller's random-trace-id flag is kept on the server's span, beside sampled
    let random = "0af7651916cd43dd8448eb211c80319c";
    bus.publish(with_trace_header(
        pb::PublishRequest {
            events: vec![event("x2", "exported.x")],
        },
        &format!("00-{random}-b7ad6b7169203331-03"),
    ))
    .await
    .expect("publish");
    let delivered = sub.next_delivery().await.event.expect("event");
    assert!(
        delivered.traceparent.starts_with(&format!("00-{random}-"))
            && delivered.traceparent.ends_with("-03")
            && !delivered.traceparent.contains("b7ad6b7169203331"),
        "{}",
        delivered.traceparent
    );
    // a reply whose traceparent header is not one continues its request's trace, as a reply
    // without a header does, instead of a trace of its own
    let mut responder = Subscriber::open(&mut bus, open(&["exported.ask"], ""))
        .await
        .expect("open");
    let call =
        crate::harness::request_in_background(bus.clone(), event("ask-1", "exported.ask"), 10_000);
    let asked = responder.next_delivery().await.event.expect("event");
    bus.reply(with_trace_header(
        pb::ReplyRequest {
            reply_to: asked.reply_to.clone(),
            event: Some(event("answer-1", "exported.answer")),
        },
        "not-a-traceparent",
    ))
    .await
    .expect("reply");
    let reply = call
        .await
        .expect("join")
        .expect("answered")
        .into_inner()
        .reply
        .expect("reply");
    let trace_id = |traceparent: &str| traceparent.split('-').nth(1).map(str::to_owned);
    assert!(trace_id(&asked.traceparent).is_some(), "{asked:?}");
    assert_eq!(
        trace_id(&reply.traceparent),
        trace_id(&asked.traceparent),
        "{} against the request's {}",
        reply.traceparent,
        asked.traceparent
    );
    // and so does the reply's span: one trace shows the request, its delivery and the reply
    let request_trace = trace_id(&asked.traceparent).expect("a trace id");
    crate::harness::eventually("the reply span in the request's trace", || async {
        let spans = collector.0.lock().expect("lock").clone();
        spans
            .iter()
            .any(|(name, trace, _)| name == "nerve.reply" && *trace == request_trace)
            .then_some(())
    })
    .await;
}
