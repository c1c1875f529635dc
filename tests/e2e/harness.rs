//! Test harness: starts real servers (in-process on 127.0.0.1:0, or as a child process) and talks to
//! them over real gRPC connections.

use std::{collections::HashMap, path::Path, process::Stdio, time::Duration};

use nerve::{
    Backends,
    api::pb::{self, admin_client::AdminClient, event_bus_client::EventBusClient},
    config::Config,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Code, Status, Streaming, transport::Channel};

/// Longest any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A server started inside the test process.
pub struct TestServer {
    pub channel: Channel,
    _server: nerve::Server,
    _dir: tempfile::TempDir,
}

/// Settings tests use unless they say otherwise: fast health checks.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    config.health_check_interval = Duration::from_millis(100);
    config
}

/// The URL of the test database, or a failure that says how to get one.
pub fn database_url() -> String {
    std::env::var("NERVE_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!("NERVE_TEST_DATABASE_URL is not set: run scripts/test.sh, or eval \"$(scripts/services.sh)\" first")
    })
}

/// The URL of the test Redis, or a failure that says how to get one.
pub fn redis_url() -> String {
    std::env::var("NERVE_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("NERVE_TEST_REDIS_URL is not set: run scripts/test.sh, or eval \"$(scripts/services.sh)\" first")
    })
}

/// A fresh schema in the test database; returns a URL whose connections use it.
pub async fn fresh_schema_url() -> String {
    use sqlx::Connection as _;
    let url = database_url();
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&url)
        .await
        .expect("connect to the test database");
    // the schema name is generated here, never input
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20search_path%3D{schema}")
}

/// Whether in-process servers run on Postgres + Redis (NERVE_TEST_BACKEND=redis) instead of embedded.
pub fn redis_backend() -> bool {
    std::env::var("NERVE_TEST_BACKEND").is_ok_and(|b| b == "redis")
}

/// Points a config at a private Postgres schema and Redis key prefix, so tests run in parallel.
pub async fn use_production_backend(config: &mut Config) {
    config.store = fresh_schema_url().await;
    config.streams = redis_url();
    config.redis.key_prefix = format!("nerve-test:{}", uuid::Uuid::new_v4().simple());
}

/// Installs the process's metrics recorder, shared by every test's server, before the first one
/// starts: a gauge a session raised is then the gauge it lowers (a session started before a later
/// install would lower what it never raised). Label values are not capped here: every test's types
/// and groups share the process's labels. In-process servers started without [`TestServer`] call it
/// first too.
pub fn install_recorder() {
    static RECORDER: std::sync::Once = std::sync::Once::new();
    RECORDER.call_once(|| {
        nerve::metrics::install(usize::MAX).expect("the metrics recorder");
    });
}

impl TestServer {
    /// Starts a server with default test settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after letting the test adjust the settings.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        if redis_backend() {
            use_production_backend(&mut config).await;
        }
        adjust(&mut config);
        let backends = nerve::open_backends(&config).await.expect("backends");
        Self::start_on(config, backends, dir).await
    }

    /// Starts a server on given backends (for fault injection).
    pub async fn start_on(config: Config, backends: Backends, dir: tempfile::TempDir) -> Self {
        install_recorder();
        let server = nerve::start(config, backends).await.expect("server starts");
        // lazy: a TLS server refuses a plaintext connection, and its tests make their own channels
        let channel = Channel::from_shared(format!("http://{}", server.local_addr()))
            .expect("uri")
            .connect_lazy();
        TestServer {
            channel,
            _server: server,
            _dir: dir,
        }
    }

    /// Makes the server not ready while it still serves (the first signal of a drain).
    pub fn drain(&self) {
        self._server.drain();
    }

    /// Shuts the server down gracefully and waits until it has stopped.
    pub async fn stop(self) {
        self._server.shutdown();
        self._server.wait().await.expect("the server stops cleanly");
    }

    /// The gRPC address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self._server.local_addr()
    }

    /// The plaintext health listener's address, when configured.
    pub fn health_addr(&self) -> Option<std::net::SocketAddr> {
        self._server.health_addr()
    }

    pub fn bus(&self) -> EventBusClient<Channel> {
        EventBusClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// The stored event with `id` (one source only), read back with GetEvent.
    pub async fn stored_event(&self, id: &str) -> pb::Event {
        self.admin()
            .get_event(pb::GetEventRequest {
                id: id.into(),
                source: String::new(),
            })
            .await
            .expect("get")
            .into_inner()
            .event
            .expect("event")
    }

    /// Fetches the Prometheus text from the server's /metrics listener.
    pub async fn scrape(&self) -> String {
        let addr = self._server.metrics_addr().expect("metrics are on");
        http_get(addr, "/metrics").await
    }
}

/// A plain HTTP/1.1 GET; returns the body of a 200 response.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Connects a channel to a server.
pub async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects")
}

/// Builds a valid event.
pub fn event(id: &str, event_type: &str) -> pb::Event {
    pb::Event {
        id: id.to_owned(),
        source: "//tests".to_owned(),
        r#type: event_type.to_owned(),
        spec_version: "1.0".to_owned(),
        data: Some(pb::event::Data::TextData(format!("payload of {id}"))),
        ..pb::Event::default()
    }
}

/// Publishes events and returns their sequences.
pub async fn publish(bus: &mut EventBusClient<Channel>, events: Vec<pb::Event>) -> Vec<u64> {
    bus.publish(pb::PublishRequest { events })
        .await
        .expect("publish succeeds")
        .into_inner()
        .results
        .iter()
        .map(|r| r.sequence)
        .collect()
}

/// Publishes `n` events of one type with ids `{prefix}-{i}`.
pub async fn publish_n(
    bus: &mut EventBusClient<Channel>,
    prefix: &str,
    event_type: &str,
    n: usize,
) -> Vec<u64> {
    let mut seqs = Vec::new();
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(500) {
        let events = chunk
            .iter()
            .map(|i| event(&format!("{prefix}-{i}"), event_type))
            .collect();
        seqs.extend(publish(bus, events).await);
    }
    seqs
}

/// Publishes `n` events of one type with ids `{prefix}-{i}`, each carrying `bytes` of binary data,
/// in requests of at most 3 MiB of data and 500 events.
pub async fn publish_sized(
    bus: &mut EventBusClient<Channel>,
    prefix: &str,
    event_type: &str,
    n: usize,
    bytes: usize,
) -> Vec<u64> {
    let per_request = ((3 << 20) / bytes.max(1)).clamp(1, 500);
    let mut seqs = Vec::new();
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(per_request) {
        let events = chunk
            .iter()
            .map(|i| {
                let mut e = event(&format!("{prefix}-{i}"), event_type);
                e.data = Some(pb::event::Data::BinaryData(vec![7; bytes]));
                e
            })
            .collect();
        seqs.extend(publish(bus, events).await);
    }
    seqs
}

/// Builds an open message.
pub fn open(types: &[&str], group: &str) -> pb::SubscriptionOpen {
    pb::SubscriptionOpen {
        types: types.iter().map(|t| t.to_string()).collect(),
        group: group.to_owned(),
        heartbeat_interval: Some(prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        ..pb::SubscriptionOpen::default()
    }
}

/// Start position helpers.
pub fn earliest() -> Option<pb::StartPosition> {
    Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Earliest(())),
    })
}

pub fn after_sequence(seq: u64) -> Option<pb::StartPosition> {
    Some(pb::StartPosition {
        position: Some(pb::start_position::Position::AfterSequence(seq)),
    })
}

pub fn millis(ms: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::from(ms / 1000),
        nanos: (ms % 1000) * 1_000_000,
    })
}

/// Sends a Request of `event` from `requester` in the background, so the test can answer it meanwhile.
pub fn request_in_background(
    mut requester: EventBusClient<Channel>,
    event: pb::Event,
    timeout_ms: i32,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::RequestResponse>, Status>> {
    tokio::spawn(async move {
        requester
            .request(pb::RequestRequest {
                event: Some(event),
                timeout: millis(timeout_ms),
            })
            .await
    })
}

/// A subscriber on a real Subscribe stream.
pub struct Subscriber {
    tx: Option<mpsc::Sender<pb::SubscribeRequest>>,
    inbound: Streaming<pb::SubscribeResponse>,
    pub subscribed: pb::Subscribed,
    pub caught_up: Option<u64>,
    pub heartbeats: u64,
}

impl Subscriber {
    /// Opens a subscription and waits for the server's confirmation.
    pub async fn open(
        bus: &mut EventBusClient<Channel>,
        open: pb::SubscriptionOpen,
    ) -> Result<Self, Status> {
        Self::open_as(bus, open, None).await
    }

    /// Opens a subscription with a bearer token, when given.
    pub async fn open_as(
        bus: &mut EventBusClient<Channel>,
        open: pb::SubscriptionOpen,
        token: Option<&str>,
    ) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(64);
        tx.send(pb::SubscribeRequest {
            action: Some(pb::subscribe_request::Action::Open(open)),
        })
        .await
        .expect("queue open");
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("ascii token"),
            );
        }
        let mut inbound = bus.subscribe(request).await?.into_inner();
        let first = tokio::time::timeout(WAIT, inbound.message())
            .await
            .expect("subscribed in time")?;
        match first.and_then(|m| m.message) {
            Some(pb::subscribe_response::Message::Subscribed(subscribed)) => Ok(Subscriber {
                tx: Some(tx),
                inbound,
                subscribed,
                caught_up: None,
                heartbeats: 0,
            }),
            other => panic!("expected Subscribed first, got {other:?}"),
        }
    }

    /// Sends a request message.
    pub async fn send(&self, action: pb::subscribe_request::Action) {
        self.tx
            .as_ref()
            .expect("request side open")
            .send(pb::SubscribeRequest {
                action: Some(action),
            })
            .await
            .expect("stream open");
    }

    pub async fn ack(&self, ids: &[String]) {
        self.send(pb::subscribe_request::Action::Ack(pb::Ack {
            delivery_ids: ids.to_vec(),
        }))
        .await;
    }

    pub async fn ack_one(&self, d: &pb::Delivery) {
        self.ack(std::slice::from_ref(&d.delivery_id)).await;
    }

    /// Receives the next message that is not a heartbeat; caught-up markers are recorded.
    pub async fn next_delivery(&mut self) -> pb::Delivery {
        self.try_next_delivery(WAIT)
            .await
            .unwrap_or_else(|| panic!("no delivery within {WAIT:?}"))
    }

    /// Like `next_delivery`, but returns None when `within` passes first.
    pub async fn try_next_delivery(&mut self, within: Duration) -> Option<pb::Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = tokio::time::timeout_at(deadline, self.inbound.message())
                .await
                .ok()?;
            match message
                .expect("stream healthy")
                .expect("stream open")
                .message
            {
                Some(pb::subscribe_response::Message::Delivery(d)) => return Some(d),
                Some(pb::subscribe_response::Message::CaughtUp(c)) => {
                    self.caught_up = Some(c.sequence)
                }
                Some(pb::subscribe_response::Message::Heartbeat(_)) => self.heartbeats += 1,
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Waits up to `within` for the next delivery or heartbeat: the delivery, or None for a heartbeat
    /// (counted); caught-up markers are recorded on the way. Panics when neither comes in time.
    pub async fn next_delivery_or_heartbeat(&mut self, within: Duration) -> Option<pb::Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let message = tokio::time::timeout_at(deadline, self.inbound.message())
                .await
                .unwrap_or_else(|_| panic!("no delivery nor heartbeat within {within:?}"))
                .expect("stream healthy")
                .expect("stream open");
            match message.message {
                Some(pb::subscribe_response::Message::Delivery(d)) => return Some(d),
                Some(pb::subscribe_response::Message::Heartbeat(_)) => {
                    self.heartbeats += 1;
                    return None;
                }
                Some(pb::subscribe_response::Message::CaughtUp(c)) => {
                    self.caught_up = Some(c.sequence)
                }
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Waits up to `within` for the next delivery; Ok(None) when none came, Err when the stream failed.
    pub async fn next_message(&mut self, within: Duration) -> Result<Option<pb::Delivery>, Status> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let Ok(message) = tokio::time::timeout_at(deadline, self.inbound.message()).await
            else {
                return Ok(None);
            };
            match message?.and_then(|m| m.message) {
                Some(pb::subscribe_response::Message::Delivery(d)) => return Ok(Some(d)),
                Some(pb::subscribe_response::Message::CaughtUp(c)) => {
                    self.caught_up = Some(c.sequence)
                }
                Some(pb::subscribe_response::Message::Heartbeat(_)) => self.heartbeats += 1,
                None => return Err(Status::unavailable("stream ended")),
                Some(other) => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Collects deliveries until `n` arrived.
    pub async fn deliveries(&mut self, n: usize) -> Vec<pb::Delivery> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(self.next_delivery().await);
        }
        out
    }

    /// Asserts nothing is delivered while the server sends `beats` heartbeats (its own "idle" signal).
    pub async fn expect_idle(&mut self, beats: u64) {
        let target = self.heartbeats + beats;
        while self.heartbeats < target {
            let message = tokio::time::timeout(WAIT, self.inbound.message())
                .await
                .expect("heartbeat in time")
                .expect("stream healthy")
                .expect("stream open");
            match message.message {
                Some(pb::subscribe_response::Message::Heartbeat(_)) => self.heartbeats += 1,
                Some(pb::subscribe_response::Message::CaughtUp(c)) => {
                    self.caught_up = Some(c.sequence)
                }
                other => panic!("expected no delivery, got {other:?}"),
            }
        }
    }

    /// Waits until the caught-up marker arrives (deliveries before it are returned).
    pub async fn until_caught_up(&mut self) -> Vec<pb::Delivery> {
        let mut out = Vec::new();
        while self.caught_up.is_none() {
            let message = tokio::time::timeout(WAIT, self.inbound.message())
                .await
                .expect("caught up in time")
                .expect("stream healthy")
                .expect("stream open");
            match message.message {
                Some(pb::subscribe_response::Message::Delivery(d)) => out.push(d),
                Some(pb::subscribe_response::Message::CaughtUp(c)) => {
                    self.caught_up = Some(c.sequence)
                }
                Some(pb::subscribe_response::Message::Heartbeat(_)) => self.heartbeats += 1,
                other => panic!("unexpected message {other:?}"),
            }
        }
        out
    }

    /// Sends Close and reads until the stream ends: by then the server has settled what was sent
    /// before and handed back the rest. Returns the final status (Ok for a graceful end).
    pub async fn close_gracefully(&mut self) -> Result<(), Status> {
        self.send(pb::subscribe_request::Action::Close(pb::Close {}))
            .await;
        self.final_status().await
    }

    /// Reads until the stream ends; returns its final status (Ok for a clean end).
    pub async fn final_status(&mut self) -> Result<(), Status> {
        loop {
            match tokio::time::timeout(WAIT, self.inbound.message())
                .await
                .expect("stream ends in time")
            {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(status) => return Err(status),
            }
        }
    }

    /// Cancels the call, as a client that goes away does.
    pub fn close(self) {}

    /// Closes only the request side; deliveries keep coming.
    pub fn half_close(&mut self) {
        self.tx = None;
    }
}

/// Asserts a call failed with this code and a message mentioning `needle`.
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    needle: &str,
) -> Status {
    let status = result.expect_err("call should fail");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert!(
        status.message().contains(needle),
        "status message {:?} should mention {needle:?}",
        status.message()
    );
    status
}

/// The sequence of a delivery's event.
pub fn seq(d: &pb::Delivery) -> u64 {
    d.event.as_ref().expect("event").sequence
}

/// The id of a delivery's event.
pub fn id(d: &pb::Delivery) -> String {
    d.event.as_ref().expect("event").id.clone()
}

/// A server running as a child process (for kill -9 and signal tests).
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    /// Its log lines after the one that said it listens.
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ServerProcess {
    /// Starts `nerve-server` on a free port with the given data directory and extra environment.
    pub async fn spawn(data_dir: &Path, env: &HashMap<&str, &str>) -> Self {
        Self::start(data_dir, env).listening().await
    }

    /// Starts `nerve-server` as [`ServerProcess::spawn`] does, returning before it listens.
    pub fn start(data_dir: &Path, env: &HashMap<&str, &str>) -> Starting {
        let mut child = Self::command(data_dir, env)
            .spawn()
            .expect("spawn nerve-server");
        let stderr = child.stderr.take().expect("stderr");
        Starting {
            child,
            lines: BufReader::new(stderr).lines(),
        }
    }
}

/// A `nerve-server` child process that has not listened yet, with its log.
pub struct Starting {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
}

impl Starting {
    /// Waits (up to [`WAIT`]) for the process to exit without listening, and asserts it failed.
    pub async fn fails(mut self) {
        let exit = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        assert!(!exit.success(), "exit status {exit:?}");
    }

    /// Reads the log up to a line containing `text`; panics when the server listens first.
    pub async fn logged(&mut self, text: &str) {
        tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.next_line().await.expect("read stderr") {
                assert!(
                    listen_addr(&line).is_none(),
                    "listened before logging {text:?}"
                );
                if line.contains(text) {
                    return;
                }
            }
            panic!("nerve-server exited before logging {text:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("{text:?} logged in time"));
    }

    /// Waits until the server listens.
    pub async fn listening(mut self) -> ServerProcess {
        let addr = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.next_line().await.expect("read stderr") {
                if let Some(addr) = listen_addr(&line) {
                    return addr;
                }
            }
            panic!("nerve-server exited before listening");
        })
        .await
        .expect("server listens in time");
        // keep draining stderr so the child never blocks on a full pipe; NERVE_TEST_SERVER_LOGS=1 shows it
        let show = std::env::var_os("NERVE_TEST_SERVER_LOGS").is_some();
        let mut lines = self.lines;
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if show {
                    eprintln!("[{addr}] {line}");
                }
                // a test that never reads the log lets it go
                let _ = tx.send(line);
            }
        });
        ServerProcess {
            child: self.child,
            addr,
            log,
        }
    }
}

/// The address of the server's "listening" log line, if `line` is one.
fn listen_addr(line: &str) -> Option<std::net::SocketAddr> {
    let rest = line.split("addr=").nth(1)?;
    let addr = rest.split_whitespace().next().unwrap_or_default();
    Some(addr.parse().expect("listen address"))
}

impl ServerProcess {
    /// The command [`ServerProcess::spawn`] runs: on a free port, logging to a pipe.
    pub fn command(data_dir: &Path, env: &HashMap<&str, &str>) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nerve-server"));
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .env("NERVE_LOG_LEVEL", "info")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        command
    }

    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    /// Reads the log up to a line containing `text` (up to [`WAIT`]), and returns that line.
    pub async fn logged(&mut self, text: &str) -> String {
        tokio::time::timeout(WAIT, async {
            while let Some(line) = self.log.recv().await {
                if line.contains(text) {
                    return line;
                }
            }
            panic!("nerve-server's log ended before {text:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("{text:?} logged in time"))
    }

    /// Kills the process with SIGKILL and reaps it.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("kill");
        self.child.wait().await.expect("reap");
    }

    /// Waits (up to [`WAIT`]) for the process to exit, and asserts it exited 0.
    pub async fn exits_zero(&mut self) {
        let exit = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        assert!(exit.success(), "exit status {exit:?}");
    }

    /// Sends a signal by number.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill command");
        assert!(status.success());
    }
}

/// Collects the stream into a Vec (for small replays).
pub async fn collect_replay(mut stream: Streaming<pb::ReplayResponse>) -> Vec<pb::ReplayResponse> {
    let mut out = Vec::new();
    while let Some(page) = stream.next().await {
        out.push(page.expect("page"));
    }
    out
}

/// Replays `request` to its end and returns every page.
pub async fn replay_pages(
    bus: &mut EventBusClient<Channel>,
    request: pb::ReplayRequest,
) -> Vec<pb::ReplayResponse> {
    collect_replay(bus.replay(request).await.expect("replay").into_inner()).await
}

/// The sequences of the pages' events, in order.
pub fn page_sequences(pages: &[pb::ReplayResponse]) -> Vec<u64> {
    pages
        .iter()
        .flat_map(|p| p.events.iter().map(|e| e.sequence))
        .collect()
}

/// Polls `check` until it returns Some, failing after [`WAIT`]; for server-side effects with no event to await.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fields a status' `BadRequest` detail names, in order.
pub fn violations(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// Sends one uncompressed gRPC message of raw `bytes` to `path` over a bare HTTP/2 stream, with
/// `headers`, closes the request, and returns the `grpc-status` and the (percent-decoded)
/// `grpc-message` the server answered: what a client that is not tonic would see.
pub async fn raw_grpc_call(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    bytes: Vec<u8>,
) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let mut head = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        head = head.header(*name, *value);
    }
    let (response, mut body) = client
        .send_request(head.body(()).expect("request"), false)
        .expect("send");
    // flag, length, bytes
    let mut frame = vec![0];
    frame.extend(u32::try_from(bytes.len()).expect("small").to_be_bytes());
    frame.extend(bytes);
    body.send_data(frame.into(), true)
        .expect("send the message");
    let response = response.await.expect("response");
    let status = |headers: &http::HeaderMap| {
        let text = |name: &str| {
            headers
                .get(name)
                .map(|v| v.to_str().expect("ascii").replace("%20", " "))
        };
        text("grpc-status").map(|status| (status, text("grpc-message").unwrap_or_default()))
    };
    if let Some(status) = status(response.headers()) {
        return status; // trailers only
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        data.expect("data");
    }
    let trailers = body.trailers().await.expect("trailers");
    status(&trailers.expect("trailers")).expect("grpc-status")
}
