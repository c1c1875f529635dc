use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use nerve::api::pb::{self, event_bus_client::EventBusClient};
use tonic::Code;

use crate::harness::*;

async fn replay_ids(channel: tonic::transport::Channel) -> Vec<String> {
    let mut bus = EventBusClient::new(channel);
    let pages = collect_replay(
        bus.replay(pb::ReplayRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner(),
    )
    .await;
    pages
        .iter()
        .flat_map(|p| p.events.iter().map(|e| e.id.clone()))
        .collect()
}

#[tokio::test]
async fn kill_9_mid_publish_keeps_every_acknowledged_event_and_groups_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    let channel = server.channel().await;
    let mut bus = EventBusClient::new(channel.clone());

    // a group that acked the first 50 events and holds 5 more unacked when the server dies
    let mut o = open(&["crash.>"], "survivors");
    o.start = earliest();
    o.max_in_flight = 5;
    o.ack_deadline = millis(3_000);
    let mut group = Subscriber::open(&mut bus, o.clone())
        .await
        .expect("open group");
    let first = publish_n(&mut bus, "pre", "crash.pre", 55).await;
    let mut acked_by_group = BTreeSet::new();
    while acked_by_group.len() < 50 {
        let d = group.next_delivery().await;
        acked_by_group.insert(seq(&d));
        group.ack_one(&d).await;
    }
    let held: Vec<pb::Delivery> = group.deliveries(5).await;

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut publishers = Vec::new();
    for p in 0..4 {
        let mut bus = EventBusClient::new(channel.clone());
        let acknowledged = acknowledged.clone();
        publishers.push(tokio::spawn(async move {
            for batch in 0.. {
                let events: Vec<pb::Event> = (0..10)
                    .map(|i| event(&format!("p{p}-b{batch}-{i}"), "crash.load"))
                    .collect();
                let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
                match bus.publish(pb::PublishRequest { events }).await {
                    Ok(_) => acknowledged.lock().expect("lock").extend(ids),
                    Err(status) => return status,
                }
            }
            unreachable!()
        }));
    }
    // kill once a good number of publishes were acknowledged, with more in flight
    eventually("acknowledged publishes", || {
        let n = acknowledged.lock().expect("lock").len();
        async move { (n >= 2000).then_some(()) }
    })
    .await;
    server.kill9().await;
    for p in publishers {
        let status = p.await.expect("publisher");
        assert!(
            matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            ),
            "{status:?}"
        );
    }
    drop(group);

    let restarted = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    let channel = restarted.channel().await;
    let stored = replay_ids(channel.clone()).await;
    let stored_set: BTreeSet<&String> = stored.iter().collect();
    assert_eq!(stored_set.len(), stored.len(), "no event stored twice");
    let acknowledged = acknowledged.lock().expect("lock").clone();
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored_set.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    // the group resumes: every stored event it had not acked arrives (the held ones again once their
    // lease runs out, with a later attempt), and nothing it acked comes back
    let mut bus = EventBusClient::new(channel);
    o.max_in_flight = 500;
    let mut group = Subscriber::open(&mut bus, o).await.expect("reopen group");
    let expected: BTreeSet<String> = stored
        .iter()
        .filter(|id| {
            !id.starts_with("pre-") || {
                let n: usize = id[4..].parse().expect("number");
                n >= 50
            }
        })
        .cloned()
        .collect();
    let mut received = BTreeSet::new();
    while received.len() < expected.len() {
        let d = group.next_delivery().await;
        assert!(
            !acked_by_group.contains(&seq(&d)),
            "acked event {} delivered again",
            seq(&d)
        );
        if held.iter().any(|h| seq(h) == seq(&d)) {
            assert!(
                d.attempt >= 2,
                "a held delivery comes back as a new attempt"
            );
        }
        received.insert(id(&d));
        group.ack_one(&d).await;
    }
    assert_eq!(received, expected);
    assert!(held.iter().all(|h| first.contains(&seq(h))));
}

#[tokio::test]
async fn sigterm_ends_streams_with_a_status_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    let mut bus = EventBusClient::new(server.channel().await);
    let mut sub = Subscriber::open(&mut bus, open(&["shutdown.>"], "g"))
        .await
        .expect("open");
    // a health watcher (grpcurl, a mesh's checker) must not hold the shutdown either
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await)
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health watch")
        .into_inner();
    publish(&mut bus, vec![event("s1", "shutdown.now")]).await;
    let _held = sub.next_delivery().await;
    let (requests, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut answers = bus
        .publish_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .expect("PublishStream opens")
        .into_inner();
    requests
        .send(pb::PublishStreamRequest {
            request_id: 1,
            events: vec![event("s2", "shutdown.now")],
        })
        .expect("send");
    let answer = answers.message().await.expect("answer").expect("open");
    assert!(
        matches!(
            answer.outcome,
            Some(pb::publish_stream_response::Outcome::Published(_))
        ),
        "{answer:?}"
    );
    server.signal(15);
    let status = sub
        .final_status()
        .await
        .expect_err("stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"));
    // an open PublishStream ends too, though its publisher still holds its side open
    let status = tokio::time::timeout(WAIT, answers.message())
        .await
        .expect("the PublishStream ends in time")
        .expect_err("PublishStream ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"));
    let status = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(status) = health.message().await {
                return status;
            }
        }
    })
    .await
    .expect("the health watch ends in time");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(requests);
    server.exits_zero().await;

    // the unacked delivery was released, not lost
    let restarted = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    let mut bus = EventBusClient::new(restarted.channel().await);
    let mut sub = Subscriber::open(&mut bus, open(&["shutdown.>"], "g"))
        .await
        .expect("reopen");
    let d = sub.next_delivery().await;
    assert_eq!((id(&d), d.attempt), ("s1".to_owned(), 2));
}

/// A subscriber that does not read holds its stream's end back for good (its deliveries fill every
/// buffer on the way): the server stops without it after `shutdown_timeout`, exits 0, and the
/// deliveries it held come back after the restart.
#[tokio::test]
async fn a_subscriber_that_does_not_read_holds_the_shutdown_back_only_so_long() {
    stopped_with_a_subscriber_that_does_not_read("1s", |server| async {
        (server, "after shutdown_timeout")
    })
    .await;
}

/// A second signal during the graceful stop ends it there, as an operator's second Ctrl-C means,
/// without waiting out `shutdown_timeout`; what the stuck subscriber held comes back all the same.
#[tokio::test]
async fn a_second_signal_ends_the_graceful_stop_at_once() {
    stopped_with_a_subscriber_that_does_not_read("1h", |mut server| async move {
        server.logged("shutting down").await;
        server.signal(15);
        (server, "another signal")
    })
    .await;
}

/// Stops a server (`NERVE_SHUTDOWN_TIMEOUT` = `timeout`) with a signal while a subscriber that does
/// not read holds its stream's end back, then `more` (which gives back the server and what its log
/// says when it stops without that stream); checks that it exits 0 within the harness' wait, and
/// that the deliveries held come back after a restart.
async fn stopped_with_a_subscriber_that_does_not_read<F>(
    timeout: &str,
    more: impl FnOnce(ServerProcess) -> F,
) where
    F: std::future::Future<Output = (ServerProcess, &'static str)>,
{
    const EVENTS: usize = 96;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = HashMap::from([("NERVE_SHUTDOWN_TIMEOUT", timeout)]);
    let server = ServerProcess::spawn(dir.path(), &env).await;
    let mut bus = EventBusClient::new(server.channel().await);
    let mut o = open(&["stuck.>"], "stuck");
    o.max_in_flight = EVENTS as u32;
    let _stuck = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    // 48 MB of deliveries, far past what HTTP/2 lets through to a reader that takes none
    publish_sized(&mut bus, "stuck", "stuck.x", EVENTS, 512 << 10).await;
    let mut ids: Vec<String> = (0..EVENTS).map(|i| format!("stuck-{i}")).collect();
    server.signal(15);
    let (mut server, stopping_without) = more(server).await;
    let line = server.logged(stopping_without).await;
    assert!(line.contains("calls still open"), "{line}");
    server.exits_zero().await;

    let restarted = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    let mut bus = EventBusClient::new(restarted.channel().await);
    let mut member = Subscriber::open(&mut bus, o).await.expect("reopen");
    let mut again: Vec<String> = member
        .deliveries(EVENTS)
        .await
        .iter()
        .map(|d| id(d).to_owned())
        .collect();
    again.sort();
    ids.sort();
    assert_eq!(again, ids, "every held delivery came back");
}

/// A second server started on a data directory another one has open (a pod's replacement started
/// before it stopped) waits for it to stop instead of numbering events from the same head; then it
/// starts with everything the first stored, and numbers on from there.
#[tokio::test]
async fn a_second_server_on_one_data_directory_waits_for_the_first_to_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    let mut bus = EventBusClient::new(first.channel().await);
    publish(&mut bus, vec![event("before", "lock.x")]).await;
    let mut second = ServerProcess::start(dir.path(), &HashMap::new());
    second
        .logged("another process has the database open; waiting for it to stop")
        .await;
    // the first goes on storing meanwhile
    let seqs = publish(&mut bus, vec![event("while", "lock.x")]).await;
    first.signal(15);
    first.exits_zero().await;
    let second = second.listening().await;
    let mut bus = EventBusClient::new(second.channel().await);
    let next = publish(&mut bus, vec![event("after", "lock.x")]).await;
    assert_eq!(
        next,
        [seqs[0] + 1],
        "numbered on from the first's last event"
    );
    let mut o = open(&["lock.x"], "");
    o.start = earliest();
    let mut sub = Subscriber::open(&mut bus, o).await.expect("open");
    let ids: Vec<String> = sub.deliveries(3).await.iter().map(id).collect();
    assert_eq!(ids, ["before", "while", "after"]);
}

/// With a shutdown delay the first SIGTERM only takes readiness away: calls are still served (a new
/// connection publishes, an open subscription receives it) until a second signal stops the server.
#[tokio::test]
async fn sigterm_with_a_shutdown_delay_drains_while_serving_until_a_second_signal() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let env = HashMap::from([("NERVE_SHUTDOWN_DELAY", "10m")]);
    let mut server = ServerProcess::spawn(dir.path(), &env).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let mut readiness = health
        .watch(check("nerve.v1.Readiness"))
        .await
        .expect("watch readiness")
        .into_inner();
    let mut next_readiness = async || {
        let update = tokio::time::timeout(WAIT, readiness.message())
            .await
            .expect("a readiness update in time")
            .expect("watch")
            .expect("watch open");
        ServingStatus::try_from(update.status).expect("known status")
    };
    while next_readiness().await != ServingStatus::Serving {}
    let mut bus = EventBusClient::new(channel);
    let mut sub = Subscriber::open(&mut bus, open(&["drain.>"], ""))
        .await
        .expect("open");

    server.signal(15);
    assert_eq!(next_readiness().await, ServingStatus::NotServing);
    let liveness = health
        .check(check("nerve.v1.Liveness"))
        .await
        .expect("liveness")
        .into_inner();
    assert_eq!(liveness.status, ServingStatus::Serving as i32);
    let mut fresh = EventBusClient::new(server.channel().await);
    publish(&mut fresh, vec![event("d1", "drain.now")]).await;
    assert_eq!(id(&sub.next_delivery().await), "d1");

    server.signal(15);
    let status = sub
        .final_status()
        .await
        .expect_err("stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    server.exits_zero().await;
}

/// A shutdown delay ends on its own.
#[tokio::test]
async fn a_shutdown_delay_ends_on_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = HashMap::from([("NERVE_SHUTDOWN_DELAY", "1s")]);
    let mut server = ServerProcess::spawn(dir.path(), &env).await;
    server.signal(15);
    server.exits_zero().await;
}

#[tokio::test]
async fn dead_letters_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    let mut bus = EventBusClient::new(server.channel().await);
    let mut sub = Subscriber::open(
        &mut bus,
        pb::SubscriptionOpen {
            start: earliest(),
            ..open(&["dl.>"], "g")
        },
    )
    .await
    .expect("open");
    publish(&mut bus, vec![event("d1", "dl.x")]).await;
    let d = sub.next_delivery().await;
    sub.send(pb::subscribe_request::Action::Nack(pb::Nack {
        delivery_ids: vec![d.delivery_id],
        retry_delay: None,
        dead_letter: true,
        reason: "bad".into(),
    }))
    .await;
    let mut admin = pb::admin_client::AdminClient::new(server.channel().await);
    eventually("dead letter", || {
        let mut admin = admin.clone();
        async move {
            let list = admin
                .list_dead_letters(pb::ListDeadLettersRequest {
                    group: "g".into(),
                    ..Default::default()
                })
                .await
                .ok()?;
            (!list.into_inner().dead_letters.is_empty()).then_some(())
        }
    })
    .await;
    server.kill9().await;
    let restarted = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    admin = pb::admin_client::AdminClient::new(restarted.channel().await);
    let list = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            group: "g".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.dead_letters.len(), 1);
    assert_eq!(list.dead_letters[0].reason, "bad");
}

#[tokio::test]
async fn help_lists_the_environment_variables() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_nerve-server"))
        .arg("--help")
        // set in the environment (a pod's Secret, say): the passwords are not printed
        .env("NERVE_STORE", "postgres://nerve:s3cret-store@db/nerve")
        .env("NERVE_STREAMS", "redis://:s3cret-streams@redis:6379")
        .output()
        .await
        .expect("run --help");
    let text = String::from_utf8_lossy(&output.stdout);
    for name in [
        "NERVE_LISTEN",
        "NERVE_DATA_DIR",
        "NERVE_LIMITS__MAX_EVENT_BYTES",
        "NERVE_BUS__DEFAULT_ACK_DEADLINE",
    ] {
        assert!(text.contains(name), "--help should list {name}:\n{text}");
    }
    assert!(!text.contains("s3cret"), "{text}");
}

#[tokio::test]
async fn unknown_config_keys_refuse_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("nerve.toml");
    std::fs::write(&file, "[limits]\nmax_batch_evnts = 3\n").expect("write");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_nerve-server"))
        .arg("--config")
        .arg(&file)
        .output()
        .await
        .expect("run");
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("max_batch_evnts"), "{text}");
}

/// Settings the server cannot run with stop it before it opens anything, saying which: a log level
/// tracing would take for a target name (it silenced every line, the error's too), and a listener
/// beyond loopback without authentication, refused at once, not after waiting for the database
/// another server holds.
#[tokio::test]
async fn bad_settings_stop_the_server_before_it_opens_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |env: Vec<(&'static str, String)>, args: Vec<&'static str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nerve-server"));
        command
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env)
            .kill_on_drop(true);
        async move {
            let output = tokio::time::timeout(WAIT, command.output())
                .await
                .expect("the server stops at once")
                .expect("run");
            assert!(!output.status.success(), "{output:?}");
            String::from_utf8_lossy(&output.stderr).into_owned()
        }
    };
    let text = run(vec![("NERVE_LOG_LEVEL", "warning".into())], vec![]).await;
    assert!(
        text.contains("log_level: \"warning\" is not a level"),
        "{text}"
    );
    // another server holds the data directory's database
    let _holder = ServerProcess::spawn(dir.path(), &HashMap::new()).await;
    let text = run(vec![], vec!["--listen", "0.0.0.0:0"]).await;
    assert!(text.contains("refusing to listen on 0.0.0.0:0"), "{text}");
}

/// A signal while the server starts (here its store accepts the connection and never answers, as a
/// replica waiting for another's migration lock would see) stops it there, cleanly and at once, not
/// when the start gives up or finishes and opens the ports.
#[tokio::test]
async fn a_signal_while_starting_stops_the_server_there() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a store that never answers");
    let store = format!(
        "postgres://nerve:nerve@{}/nerve",
        silent.local_addr().expect("addr")
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // Redis is never reached: the store is opened first
    let env = HashMap::from([
        ("NERVE_STORE", store.as_str()),
        ("NERVE_STREAMS", "redis://127.0.0.1:1"),
    ]);
    let mut child = ServerProcess::command(dir.path(), &env)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn nerve-server");
    // the server is opening its store: its signal handlers are in place (they come first)
    let _connection = tokio::time::timeout(WAIT, silent.accept())
        .await
        .expect("the server connects to its store")
        .expect("accept");
    let pid = child.id().expect("running");
    let killed = std::process::Command::new("kill")
        .arg("-15")
        .arg(pid.to_string())
        .status()
        .expect("kill command");
    assert!(killed.success());
    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("stops while starting")
        .expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
}

/// A group member with a wide window claims large events a page's bytes at a time: 30 redelivered
/// events of 900 KiB, which embedded claims read from the store once the live tail (64 MiB) has let
/// them go, are read a few at a time, not all at once. Embedded only, with the failure tests: Redis
/// claims carry their events.
#[tokio::test]
async fn group_claims_of_large_events_take_a_page_of_bytes_at_a_time() {
    use std::sync::atomic::Ordering::SeqCst;
    let (server, injection) = crate::injected_store::start_injected().await;
    let mut bus = server.bus();
    publish_sized(&mut bus, "claimed", "claimed.x", 30, 900 << 10).await;
    let mut o = open(&["claimed.x"], "claimed");
    o.start = earliest();
    o.max_in_flight = 1000;
    o.ack_deadline = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    // a first member gets them all; 72 MB of other events push them out of the tail; the member goes
    // away without acking, so they are due again at once
    let mut first = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    first.deliveries(30).await;
    publish_sized(&mut bus, "filler", "filler.x", 80, 900 << 10).await;
    drop(first);
    let mut next = Subscriber::open(&mut bus, o).await.expect("open");
    let again = next.deliveries(30).await;
    assert!(again.iter().all(|d| d.attempt == 2), "every event again");
    // a page carries 4 MiB: four such events
    let most = injection.most_sequences_read.load(SeqCst);
    assert!(
        (1..=5).contains(&most),
        "one claim read {most} events of 900 KiB"
    );
}

/// A member whose claimed events cannot be read (the store failed under it) ends with UNAVAILABLE,
/// and what it claimed goes back at once, on the same attempt: nobody saw it. Embedded group claims
/// of redeliveries read their events from the store, where the failure is injected (Redis claims
/// carry them), so this runs on the embedded backend only, with the other failure tests.
#[tokio::test]
async fn claims_whose_events_cannot_be_read_go_back_at_once_uncounted() {
    let (server, injection) = crate::injected_store::start_injected().await;
    let mut bus = server.bus();
    publish(&mut bus, vec![event("unread-1", "unread.x")]).await;
    let mut o = open(&["unread.x"], "unread");
    o.start = earliest();
    o.ack_deadline = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    // a first member gets it and goes away: it is due again, for attempt 2
    let mut first = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    assert_eq!(first.next_delivery().await.attempt, 1);
    drop(first);
    // the next member claims it, but cannot read its event
    injection
        .fail_next_read_sequences
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut failing = Subscriber::open(&mut bus, o.clone()).await.expect("open");
    let ended = failing
        .next_message(WAIT)
        .await
        .expect_err("the store failed under the claim");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    // the member after it gets it at once, not after the 60 s lease, and still on attempt 2
    let mut next = Subscriber::open(&mut bus, o).await.expect("open");
    let d = next.next_delivery().await;
    assert_eq!((id(&d).as_str(), d.attempt), ("unread-1", 2));
}

/// The embedded backend makes its data directory for its own user only: the events of every
/// tenant, the audit log and the registry are in it (the files' modes: the store's unit tests).
#[tokio::test]
async fn the_data_directory_the_embedded_backend_makes_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.data_dir = dir.path().join("made").join("here");
    let _backends = nerve::open_backends(&config).await.expect("backends");
    for made in [dir.path().join("made"), config.data_dir.clone()] {
        let mode = std::fs::metadata(&made).expect("made").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", made.display());
    }
}
