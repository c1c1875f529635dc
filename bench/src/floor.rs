//! The gRPC floors: servers of Nerve's own `EventBus` protocol that check nothing and hand every
//! published event to every open subscription from memory. The latency scenario runs against them
//! unchanged, over Publish calls or a PublishStream as it does against Nerve.
//! - [`SYSTEM`] stores nothing: what tonic, HTTP/2 and this tool cost on this machine before any bus
//!   work.
//! - [`DURABLE_SYSTEM`] also group-commits: one thread appends each batch of waiting publishes to a log
//!   file (one `pwrite` into a preallocated region, so no commit changes the file's size); a second
//!   `fdatasync`s it once for every batch written before the sync began, then hands their events on
//!   and answers the publishes, while the first writes the next batch. That is the least a durable
//!   event bus served over gRPC does, with no index, no sequence bookkeeping and no checks.
//! - [`SQLITE_SYSTEM`] group-commits to SQLite instead: one thread inserts each batch of waiting
//!   publishes as rows of a two-column table (sequence, encoded event) in one transaction, in WAL mode
//!   with the log checkpointed as `nerve-server`'s embedded store does it, and a second syncs the log
//!   file as above (`COMMIT` does not sync, at `synchronous=NORMAL`, as in Nerve's writer). The least
//!   a durable bus whose log is a SQLite table does, as Nerve's embedded backend is.
//! - [`POSTGRES_SYSTEM`] group-commits to Postgres instead: one connection inserts each batch of
//!   waiting publishes as rows of a two-column table (sequence, encoded event) in one statement, with
//!   `synchronous_commit=on`, then hands their events on. The least a durable bus whose log is a
//!   Postgres table does, as Nerve's Postgres + Redis backend is.
//!
//! Each runs in a process of its own (this executable, started with `--serve-grpc-floor`), as
//! `nerve-server` does, so it does not share the tool's runtime.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result};
use futures::Stream;
use nerve::api::pb::{
    self,
    event_bus_server::{EventBus, EventBusServer},
    subscribe_request::Action,
    subscribe_response::Message,
};
// How `nerve-server`'s embedded store keeps its log, with its own constants (a passive checkpoint
// every 50 ms on a connection of its own, a commit checkpointing by itself only past 10,000 log pages,
// the log cut back to 64 MiB when it starts over), and how many commits its writer runs ahead of the
// log's sync: the durable floors keep theirs alike, so the SQLite floor differs from Nerve only in
// what a commit writes.
use nerve::store::{
    COMMITS_AWAITING_SYNC, SQLITE_BACKSTOP_PAGES, SQLITE_CHECKPOINT_EVERY, SQLITE_SIZE_LIMIT,
};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, oneshot},
};
use tokio_stream::{
    StreamExt as _,
    wrappers::{ReceiverStream, TcpListenerStream},
};
use tonic::{Request, Response, Status, Streaming};

/// The row name of the in-memory floor's measurements.
pub const SYSTEM: &str = "grpc floor (raw)";
/// The row name of the group-committing floor's measurements.
pub const DURABLE_SYSTEM: &str = "grpc floor + fdatasync (raw)";
/// The row name of the floor that group-commits to SQLite.
pub const SQLITE_SYSTEM: &str = "grpc floor + SQLite commit (raw)";
/// The row name of the floor that group-commits to Postgres.
pub const POSTGRES_SYSTEM: &str = "grpc floor + Postgres commit (raw)";

/// What a floor does with the events it is given before it hands them on.
pub enum Durability {
    /// Nothing: hands them on at once.
    Memory,
    /// Group-commits them to a log file in the temporary directory.
    Fdatasync,
    /// Group-commits them to a SQLite database in a directory of the temporary directory.
    Sqlite,
    /// Group-commits them to a table of a scratch schema; the URL selects the schema.
    Postgres(String),
}

impl Durability {
    /// The row name of the floor's measurements.
    pub fn system(&self) -> &'static str {
        match self {
            Durability::Memory => SYSTEM,
            Durability::Fdatasync => DURABLE_SYSTEM,
            Durability::Sqlite => SQLITE_SYSTEM,
            Durability::Postgres(_) => POSTGRES_SYSTEM,
        }
    }
}

/// Where a floor server started by [`FloorProcess::spawn`] commits, from its hidden flags: the
/// serving side of a [`Durability`].
pub enum Storage<'a> {
    /// Nowhere.
    Memory,
    /// A log file in this directory.
    Log(&'a std::path::Path),
    /// A SQLite database in this directory.
    Sqlite(&'a std::path::Path),
    /// Postgres, in the schema this URL selects.
    Postgres(&'a str),
}

/// The variable that gives the Postgres floor its database (URL with the scratch schema).
pub const FLOOR_DATABASE_URL: &str = "NERVE_BENCH_FLOOR_DATABASE_URL";

/// The Postgres floor's table, in the scratch schema the tool creates for it.
const POSTGRES_DDL: &str = "CREATE TABLE floor_log (seq BIGINT PRIMARY KEY, event BYTEA NOT NULL)";

/// Creates the Postgres floor's scratch schema (`nerve_bench_floor_<uuid>`) and its table; returns
/// the schema, to drop afterwards, and the URL whose connections use it with synchronous commits.
pub async fn postgres_schema(database_url: &str) -> Result<(String, String)> {
    use sqlx::Connection as _;
    let schema = crate::server::create_schema(database_url, "nerve_bench_floor").await?;
    let url =
        crate::server::url_with_options(database_url, &schema, &[("synchronous_commit", "on")]);
    let created = async {
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        sqlx::raw_sql(POSTGRES_DDL)
            .execute(&mut conn)
            .await
            .context("creating the floor's table")?;
        conn.close().await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    match created {
        Ok(()) => Ok((schema, url)),
        Err(e) => {
            let _ = crate::server::drop_schema(database_url, &schema).await;
            Err(e)
        }
    }
}

/// The SQLite floor's table.
const SQLITE_DDL: &str = "CREATE TABLE floor_log (seq INTEGER PRIMARY KEY, event BLOB NOT NULL)";

/// Bytes of the durable floor's log region, written round and round.
const LOG_REGION: u64 = 64 << 20;

/// Published events waiting for slow subscriptions; a subscription further behind ends with an error
/// (Nerve has flow control instead; the latency scenario's one reader keeps up, or the row says so).
const BACKLOG: usize = 65_536;

#[derive(Clone)]
struct Floor {
    events: broadcast::Sender<Arc<pb::Event>>,
    sequence: Arc<AtomicU64>,
    /// The durable floors' group commit (a thread for the file, a task for Postgres).
    log: Option<mpsc::UnboundedSender<Append>>,
}

/// Published events waiting for the log.
struct Append {
    events: Vec<pb::Event>,
    done: oneshot::Sender<()>,
}

/// Starts the thread that syncs a durable floor's log beside its writer: one `sync` for every batch
/// written before it began, then their events handed on and their publishes answered, in order. The
/// floors write and sync as nerve-server's embedded store does: the writer writes the next batch while
/// the last one syncs (at most [`COMMITS_AWAITING_SYNC`] batches ahead), so a batch no longer waits
/// for the write and sync of the one before it, only for the sync in progress and its own. The thread
/// ends when the writer does, or when a sync fails (the writer's next send then fails).
fn start_syncs(
    mut sync: impl FnMut() -> std::io::Result<()> + Send + 'static,
    events: Handoff,
) -> std::sync::mpsc::SyncSender<Vec<Append>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Append>>(COMMITS_AWAITING_SYNC);
    std::thread::spawn(move || {
        while let Ok(first) = rx.recv() {
            let mut written = vec![first];
            written.extend(rx.try_iter());
            if let Err(e) = sync() {
                eprintln!("syncing the floor's log failed: {e}");
                return;
            }
            for batch in written {
                hand_on(batch, &events);
            }
        }
    });
    tx
}

/// The durable floor's group commit: takes every waiting publish and writes their events with one
/// `pwrite`; [`start_syncs`] syncs the file, then hands the events on and answers the publishes.
fn log_thread(
    log: std::fs::File,
    mut appends: mpsc::UnboundedReceiver<Append>,
    events: broadcast::Sender<Arc<pb::Event>>,
) -> std::io::Result<()> {
    use prost::Message as _;
    use std::os::unix::fs::FileExt as _;
    let synced = {
        let log = log.try_clone()?;
        start_syncs(move || log.sync_data(), events)
    };
    let mut at = 0u64;
    let mut buf = Vec::new();
    while let Some(first) = appends.blocking_recv() {
        let batch = with_waiting(first, &mut appends);
        buf.clear();
        for append in &batch {
            for event in &append.events {
                event.encode_length_delimited(&mut buf)?;
            }
        }
        // a batch above the whole region (64 MiB of events at once) would grow the file; the
        // latency scenario's batches are a few KiB
        if at + buf.len() as u64 > LOG_REGION {
            at = 0;
        }
        log.write_all_at(&buf, at)?;
        at += buf.len() as u64;
        if synced.send(batch).is_err() {
            return Err(std::io::Error::other("the log's sync stopped"));
        }
    }
    Ok(())
}

/// The Postgres floor's group commit: takes every waiting publish, inserts their events in one
/// autocommit statement (so the commit is synced before it returns), then hands them on and answers
/// the publishes. One connection, one commit at a time: Nerve's shape, where sequence order is commit
/// order.
async fn postgres_commits(
    mut conn: sqlx::PgConnection,
    mut appends: mpsc::UnboundedReceiver<Append>,
    events: broadcast::Sender<Arc<pb::Event>>,
) -> Result<()> {
    use prost::Message as _;
    let mut seq = 0i64;
    while let Some(first) = appends.recv().await {
        let batch = with_waiting(first, &mut appends);
        let mut seqs = Vec::new();
        let mut encoded = Vec::new();
        for event in batch.iter().flat_map(|a| &a.events) {
            seq += 1;
            seqs.push(seq);
            encoded.push(event.encode_to_vec());
        }
        sqlx::query(
            "INSERT INTO floor_log (seq, event) SELECT * FROM UNNEST($1::BIGINT[], $2::BYTEA[])",
        )
        .bind(&seqs)
        .bind(&encoded)
        .execute(&mut conn)
        .await
        .context("inserting into the floor's table")?;
        hand_on(batch, &events);
    }
    Ok(())
}

/// Opens the SQLite floor's database in `dir`: WAL mode, `synchronous=FULL` (checked, or the floor
/// refuses to start), as the set-up and checkpoints run; the commit thread's connection then runs at
/// `NORMAL` and syncs through [`start_syncs`].
fn open_sqlite(dir: &std::path::Path) -> Result<rusqlite::Connection> {
    let conn =
        rusqlite::Connection::open(dir.join("floor.db")).context("opening the floor's database")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let journal: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let synchronous: i64 = conn.pragma_query_value(None, "synchronous", |row| row.get(0))?;
    // a floor that skipped the sync would not be one (2 is FULL)
    anyhow::ensure!(
        journal.eq_ignore_ascii_case("wal") && synchronous == 2,
        "the floor's database has journal_mode={journal} synchronous={synchronous}; it must be WAL and FULL (2)"
    );
    Ok(conn)
}

/// Grows the SQLite floor's log file to the size at which a commit checkpoints by itself, then lets
/// the log start over in it. As in the fdatasync floor's preallocated region, no later commit then
/// changes the log file's size (a commit that does also syncs the file's size); Nerve's log has that
/// size by its latency cells, which follow the publish matrix. The database keeps the freed pages,
/// which the floor's rows then reuse.
fn grow_sqlite_log(conn: &rusqlite::Connection) -> Result<()> {
    conn.execute_batch("CREATE TABLE floor_fill (page BLOB NOT NULL)")?;
    let tx = conn.unchecked_transaction()?;
    {
        // a row of 4,000 bytes fills a 4 KiB page
        let mut insert = tx.prepare("INSERT INTO floor_fill (page) VALUES (zeroblob(4000))")?;
        for _ in 0..SQLITE_BACKSTOP_PAGES {
            insert.execute([])?;
        }
    }
    // past the backstop: this commit checkpoints the whole log by itself
    tx.commit()?;
    // and this write starts the log over from its beginning
    conn.execute_batch("DROP TABLE floor_fill")?;
    Ok(())
}

/// The SQLite floor's group commit: takes every waiting publish and inserts their events in one
/// transaction; [`start_syncs`] syncs the log file (`fdatasync`: `COMMIT` does not, at
/// `synchronous=NORMAL`), then hands them on and answers the publishes. One connection on a thread of
/// its own, with one prepared statement run per row, as Nerve's embedded writer does.
fn sqlite_commits(
    conn: rusqlite::Connection,
    appends: mpsc::UnboundedReceiver<Append>,
    events: broadcast::Sender<Arc<pb::Event>>,
) -> Result<()> {
    sqlite_commits_synced(conn, appends, events, |sync| sync)
}

/// A sync of a floor's log.
type LogSync = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// [`sqlite_commits`], with the log's sync wrapped (the test holds it back).
fn sqlite_commits_synced(
    mut conn: rusqlite::Connection,
    mut appends: mpsc::UnboundedReceiver<Append>,
    events: broadcast::Sender<Arc<pb::Event>>,
    wrap: impl FnOnce(LogSync) -> LogSync,
) -> Result<()> {
    use prost::Message as _;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let db = conn
        .path()
        .context("the floor's database has no file")?
        .to_owned();
    let log = std::fs::File::open(format!("{db}-wal")).context("opening the floor's log")?;
    let synced = start_syncs(wrap(Box::new(move || log.sync_data())), events);
    let mut seq = 0i64;
    while let Some(first) = appends.blocking_recv() {
        let batch = with_waiting(first, &mut appends);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            // OR ROLLBACK, as Nerve's inserts: no statement journal
            let mut insert =
                tx.prepare_cached("INSERT OR ROLLBACK INTO floor_log (seq, event) VALUES (?, ?)")?;
            for event in batch.iter().flat_map(|a| &a.events) {
                seq += 1;
                insert.execute(rusqlite::params![seq, event.encode_to_vec()])?;
            }
        }
        tx.commit().context("committing to the floor's database")?;
        if synced.send(batch).is_err() {
            anyhow::bail!("the floor's log sync stopped");
        }
    }
    Ok(())
}

/// Checkpoints the SQLite floor's log every [`SQLITE_CHECKPOINT_EVERY`], as `nerve-server` does,
/// until the process ends.
fn sqlite_checkpoints(conn: rusqlite::Connection) {
    loop {
        std::thread::sleep(SQLITE_CHECKPOINT_EVERY);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            eprintln!("checkpointing the floor's log failed: {e}");
        }
    }
}

/// `first` and every append waiting behind it: one group commit.
fn with_waiting(first: Append, appends: &mut mpsc::UnboundedReceiver<Append>) -> Vec<Append> {
    let mut batch = vec![first];
    while let Ok(append) = appends.try_recv() {
        batch.push(append);
    }
    batch
}

/// Hands a committed batch's events to the subscriptions and answers its publishes.
fn hand_on(batch: Vec<Append>, events: &broadcast::Sender<Arc<pb::Event>>) {
    for append in batch {
        for event in append.events {
            // no subscription open is not an error: the event is simply not delivered
            let _ = events.send(Arc::new(event));
        }
        let _ = append.done.send(());
    }
}

impl Floor {
    /// Numbers a batch and hands it to the log (or straight on, in memory); the future answers it once
    /// it is stored.
    fn queue(
        &self,
        events: Vec<pb::Event>,
    ) -> Result<
        impl std::future::Future<Output = Result<pb::PublishResponse, Status>> + use<>,
        Status,
    > {
        let first = self
            .sequence
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let results = events
            .iter()
            .zip(first + 1..)
            .map(|(event, sequence)| pb::PublishResult {
                id: event.id.clone(),
                sequence,
                duplicate: false,
            })
            .collect();
        let stored = match &self.log {
            Some(log) => {
                let (done, stored) = oneshot::channel();
                log.send(Append { events, done })
                    .map_err(|_| Status::unavailable("the log thread stopped"))?;
                Some(stored)
            }
            None => {
                for event in events {
                    // no subscription open is not an error: the event is simply not delivered
                    let _ = self.events.send(Arc::new(event));
                }
                None
            }
        };
        Ok(async move {
            if let Some(stored) = stored {
                stored
                    .await
                    .map_err(|_| Status::unavailable("the log thread failed"))?;
            }
            Ok(pb::PublishResponse { results })
        })
    }
}

type Deliveries = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventBus for Floor {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        Ok(Response::new(
            self.queue(request.into_inner().events)?.await?,
        ))
    }

    type PublishStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::PublishStreamResponse, Status>> + Send>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let floor = self.clone();
        let (tx, rx) = mpsc::channel(256);
        // as Nerve does: requests queued in the order read, answered in that order as they are stored
        tokio::spawn(async move {
            let mut queued = futures::stream::FuturesOrdered::new();
            let mut reading = true;
            loop {
                tokio::select! {
                    message = inbound.message(), if reading && queued.len() < 1024 => match message {
                        Ok(Some(request)) => {
                            let request_id = request.request_id;
                            let stored = floor.queue(request.events);
                            queued.push_back(async move {
                                let published = match stored {
                                    Ok(stored) => stored.await,
                                    Err(status) => Err(status),
                                };
                                nerve::api::convert::publish_answer(request_id, published)
                            });
                        }
                        Ok(None) => reading = false,
                        Err(_) => return,
                    },
                    Some(answer) = queued.next() => {
                        if tx.send(Ok(answer)).await.is_err() {
                            return;
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = Deliveries;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Deliveries>, Status> {
        let mut inbound = request.into_inner();
        match inbound.message().await? {
            Some(pb::SubscribeRequest {
                action: Some(Action::Open(_)),
            }) => {}
            _ => return Err(Status::invalid_argument("the first message must be open")),
        }
        let mut events = self.events.subscribe();
        let (tx, rx) = mpsc::channel(1024);
        let subscribed = pb::SubscribeResponse {
            message: Some(Message::Subscribed(pb::Subscribed::default())),
        };
        let _ = tx.send(Ok(subscribed)).await;
        // acks and credits are read and dropped: nothing is held for redelivery
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "subscriber fell {missed} events behind"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                n += 1;
                let delivery = pb::SubscribeResponse {
                    message: Some(Message::Delivery(pb::Delivery {
                        event: Some((*event).clone()),
                        delivery_id: n.to_string(),
                        attempt: 1,
                        ack_deadline: None,
                    })),
                };
                if tx.send(Ok(delivery)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn request(
        &self,
        _: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        Err(unserved())
    }

    async fn reply(
        &self,
        _: Request<pb::ReplyRequest>,
    ) -> Result<Response<pb::ReplyResponse>, Status> {
        Err(unserved())
    }

    type ReplayStream = Pin<Box<dyn Stream<Item = Result<pb::ReplayResponse, Status>> + Send>>;

    async fn replay(
        &self,
        _: Request<pb::ReplayRequest>,
    ) -> Result<Response<Self::ReplayStream>, Status> {
        Err(unserved())
    }
}

/// Where a floor hands the events it committed on to its subscribers.
type Handoff = broadcast::Sender<Arc<pb::Event>>;

/// Runs a floor's group commits (`commits`, on `state`) on a thread of their own, fed by the sender
/// it returns; `what` names them in the message if they fail.
fn commit_thread<S: Send + 'static, E: std::fmt::Display + 'static>(
    what: &'static str,
    state: S,
    events: &Handoff,
    commits: fn(S, mpsc::UnboundedReceiver<Append>, Handoff) -> std::result::Result<(), E>,
) -> mpsc::UnboundedSender<Append> {
    let (tx, rx) = mpsc::unbounded_channel();
    let events = events.clone();
    std::thread::spawn(move || {
        if let Err(e) = commits(state, rx, events) {
            eprintln!("{what} failed: {e:#}");
        }
    });
    tx
}

/// Serves a floor that commits to `storage` on a free loopback port until killed; prints
/// `addr=<address>` on stderr once it listens, as `nerve-server` does.
pub async fn serve(storage: Storage<'_>) -> Result<()> {
    let (events, _) = broadcast::channel(BACKLOG);
    let log = match storage {
        Storage::Memory => None,
        Storage::Log(dir) => {
            // unnamed: gone with the process, which the tool kills
            let file = tempfile::tempfile_in(dir).context("creating the floor's log")?;
            crate::baseline::preallocate(&file, LOG_REGION)?;
            Some(commit_thread("the log thread", file, &events, log_thread))
        }
        Storage::Sqlite(dir) => {
            let conn = open_sqlite(dir)?;
            conn.pragma_update(None, "wal_autocheckpoint", SQLITE_BACKSTOP_PAGES)?;
            conn.pragma_update(None, "journal_size_limit", SQLITE_SIZE_LIMIT)?;
            conn.set_prepared_statement_cache_capacity(16);
            conn.execute_batch(SQLITE_DDL)
                .context("creating the floor's table")?;
            grow_sqlite_log(&conn).context("growing the floor's log")?;
            let checkpoints = open_sqlite(dir)?;
            std::thread::spawn(move || sqlite_checkpoints(checkpoints));
            Some(commit_thread(
                "the SQLite commits",
                conn,
                &events,
                sqlite_commits,
            ))
        }
        Storage::Postgres(url) => {
            use sqlx::Connection as _;
            let mut conn = sqlx::PgConnection::connect(url)
                .await
                .context("connecting the floor to Postgres")?;
            // a floor that skipped the sync would not be one
            let (sync, fsync) = crate::baseline::commit_settings(&mut conn).await?;
            anyhow::ensure!(
                sync == "on" && fsync == "on",
                "the floor's connection has synchronous_commit={sync} fsync={fsync}; both must be on"
            );
            let (tx, rx) = mpsc::unbounded_channel();
            let events = events.clone();
            tokio::spawn(async move {
                if let Err(e) = postgres_commits(conn, rx, events).await {
                    eprintln!("the Postgres commits failed: {e:#}");
                }
            });
            Some(tx)
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    eprintln!("listening addr={}", listener.local_addr()?);
    let floor = Floor {
        events,
        sequence: Arc::new(AtomicU64::new(0)),
        log,
    };
    tonic::transport::Server::builder()
        .add_service(
            EventBusServer::new(floor)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .serve_with_incoming(TcpListenerStream::new(listener).map(|tcp| {
            // as nerve-server does: small messages leave at once
            if let Ok(tcp) = &tcp {
                let _ = tcp.set_nodelay(true);
            }
            tcp
        }))
        .await?;
    Ok(())
}

/// The answer to every call but Publish and Subscribe.
fn unserved() -> Status {
    Status::unimplemented("the gRPC floor serves Publish and Subscribe only")
}

/// A running floor server.
pub struct FloorProcess {
    /// Killed when dropped, before its data directory is removed.
    _child: tokio::process::Child,
    /// The SQLite floor's database directory, removed when dropped.
    _data_dir: Option<tempfile::TempDir>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id, for its CPU and RSS.
    pub pid: u32,
}

impl FloorProcess {
    /// Starts this executable as a floor server and waits until it listens. The fdatasync floor's log
    /// and the SQLite floor's database are in the temporary directory (where the embedded server's
    /// data is).
    pub async fn spawn(durability: &Durability) -> Result<Self> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut command = tokio::process::Command::new(exe);
        command.arg("--serve-grpc-floor");
        let mut data_dir = None;
        match durability {
            Durability::Memory => {}
            Durability::Fdatasync => {
                command.arg("--floor-log-dir").arg(std::env::temp_dir());
            }
            // the process is killed, so this process removes the database it leaves
            Durability::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("nerve-bench-floor-")
                    .tempdir()
                    .context("creating the SQLite floor's directory")?;
                command.arg("--floor-sqlite-dir").arg(dir.path());
                data_dir = Some(dir);
            }
            // in the environment, not the command line, where any user could read its password
            Durability::Postgres(url) => {
                command.env(FLOOR_DATABASE_URL, url);
            }
        }
        let (child, pid, addr) =
            crate::server::spawn_listening(command, "grpc floor", "listening", |_| true).await?;
        Ok(FloorProcess {
            _child: child,
            _data_dir: data_dir,
            addr,
            pid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> pb::Event {
        pb::Event {
            id: id.into(),
            ..pb::Event::default()
        }
    }

    #[tokio::test]
    async fn the_sqlite_floor_hands_a_batch_on_only_after_the_sync_that_follows_its_commit()
    -> Result<()> {
        let dir = tempfile::tempdir()?;
        let conn = open_sqlite(dir.path())?;
        conn.execute_batch(SQLITE_DDL)?;
        let (events, mut delivered) = broadcast::channel(16);
        let (appends, rx) = mpsc::unbounded_channel();
        let (asked, sync_asked) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let committing = std::thread::spawn(move || {
            sqlite_commits_synced(conn, rx, events, move |mut sync| {
                Box::new(move || {
                    let _ = asked.send(());
                    // held until the test lets it go (or ends)
                    let _ = released.recv();
                    sync()
                })
            })
        });

        let append = |ids: [&str; 3]| -> Result<oneshot::Receiver<()>> {
            let (done, stored) = oneshot::channel();
            let events = ids.into_iter().map(event).collect();
            if appends.send(Append { events, done }).is_err() {
                anyhow::bail!("the commit thread stopped");
            }
            Ok(stored)
        };
        let sync_asked = std::sync::Arc::new(std::sync::Mutex::new(sync_asked));
        let next_sync = || {
            let sync_asked = sync_asked.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let asked = sync_asked.lock().expect("receiver");
                    asked.recv_timeout(std::time::Duration::from_secs(10))
                })
                .await?
                .context("no sync was asked for within 10 s")
            }
        };
        let reader = open_sqlite(dir.path())?;
        let count = || -> Result<i64> {
            Ok(reader.query_row("SELECT COUNT(*) FROM floor_log", [], |row| row.get(0))?)
        };

        let mut first = append(["a", "b", "c"])?;
        next_sync().await?;
        // committed before the sync, answered and handed on only after it
        assert_eq!(count()?, 3, "the batch was not committed before its sync");
        assert!(
            futures::FutureExt::now_or_never(&mut first).is_none(),
            "answered before the sync"
        );
        assert!(delivered.try_recv().is_err(), "handed on before the sync");
        // a batch committed while that sync is held waits for the next one
        let mut second = append(["d", "e", "f"])?;
        // nothing tells when the commit thread has written it: look
        let written = std::time::Instant::now();
        while count()? < 6 {
            anyhow::ensure!(
                written.elapsed() < std::time::Duration::from_secs(10),
                "the second batch was not committed within 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        release.send(())?;
        first.await?;
        next_sync().await?;
        assert!(
            futures::FutureExt::now_or_never(&mut second).is_none(),
            "answered by the sync before its own"
        );
        for id in ["a", "b", "c"] {
            assert_eq!(delivered.try_recv()?.id, id);
        }
        assert!(
            delivered.try_recv().is_err(),
            "handed on before its own sync"
        );
        release.send(())?;
        second.await?;

        // another connection sees all six, in order
        let rows: Vec<(i64, Vec<u8>)> = reader
            .prepare("SELECT seq, event FROM floor_log ORDER BY seq")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let ids = rows
            .into_iter()
            .map(|(seq, bytes)| {
                use prost::Message as _;
                Ok((seq, pb::Event::decode(&bytes[..])?.id))
            })
            .collect::<Result<Vec<(i64, String)>>>()?;
        let expected: Vec<(i64, String)> = ["a", "b", "c", "d", "e", "f"]
            .into_iter()
            .zip(1..)
            .map(|(id, seq)| (seq, id.to_owned()))
            .collect();
        assert_eq!(ids, expected);
        for id in ["d", "e", "f"] {
            assert_eq!(delivered.try_recv()?.id, id);
        }

        drop(appends);
        committing.join().expect("the commit thread panicked")
    }
}
