//! The embedded event store: one SQLite file in WAL mode, one writer that group-commits. Event commits
//! are synced by a thread of their own before they are answered or read ([`open_event_writer`]);
//! groups' delivery state goes to the disk with the next sync ([`SqliteDb::lock_delivery_writer`]);
//! every other commit syncs the log itself (`synchronous=FULL`).

use std::{
    ops::{Deref, DerefMut},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{
    Connection, QueryBuilder, Row, Sqlite, SqliteConnection,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};
use tokio::sync::{Mutex, MutexGuard, watch};
use tracing::{info, warn};

use super::{
    AuditPruned, AuditQuery, AuditRecord, DeadLetter, EventStore, EventTypeStats, NewEvent,
    PageFill, Publisher, Queued, ReadPage, ReadQuery, StoreError, StoreResult, audit_limit,
    commit::{self, Attempt, BatchWriter, CommitRequest, Committed, RecentCommits},
    literal_types,
};
use crate::event::{Priority, Selection, StoredEvent};

/// The SQLite database shared by the embedded store and the embedded streams.
#[derive(Clone)]
pub struct SqliteDb {
    /// Readers; WAL lets them run beside the writer.
    pub pool: SqlitePool,
    /// The one connection that writes, so writes never wait on SQLite's busy handler. The group
    /// commit writes events on a connection of its own, holding this one's lock while it does.
    pub writer: Arc<Mutex<SqliteConnection>>,
    /// The connection that writes groups' delivery state (claims, acks, lease changes), only while
    /// `writer` is held ([`SqliteDb::lock_delivery_writer`]). It commits with `synchronous=NORMAL`: a
    /// commit is in the log at once, so it survives the process, and on the disk with the next
    /// sync of the log (the one after each batch of event commits; a checkpoint's, every 50 ms). A
    /// sync of its own made each claim and each ack wait for the disk (docs/benchmarks.md, cause 5 (q)).
    /// A rusqlite connection, run on the caller's thread: through sqlx every statement crossed to a
    /// thread of its own and back.
    delivery_writer: Arc<Mutex<rusqlite::Connection>>,
    /// The database file.
    path: PathBuf,
    /// Held while the database is open ([`lock_database`]).
    _lock: Arc<std::fs::File>,
}

impl SqliteDb {
    /// Opens (creating when missing) the database file and applies the migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let lock = lock_database(path).await?;
        // made here, readable by this user only (SQLite makes its log and shared-memory files with
        // the database's mode): the events of every tenant, the audit log and the registry are in it
        private_file(path)?;
        // the path as it is, not a URL: `?` and `%` are path characters here
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // what this connection writes is answered once it is on disk, not in the OS cache
            .synchronous(SqliteSynchronous::Full)
            // never by itself: SQLite ignores the outcome of a commit's own checkpoint, so only the
            // event writer (`checkpoint_past_the_backstop`) and the checkpoint thread make them
            .pragma("wal_autocheckpoint", "0")
            .busy_timeout(Duration::from_secs(10));
        let mut writer = SqliteConnection::connect_with(&options)
            .await
            .map_err(map_err)?;
        sqlx::migrate!("server/migrations/sqlite")
            .run(&mut writer)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrating {}: {e}", path.display())))?;
        let delivery_writer = open_delivery_writer(path)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(map_err)?;
        Ok(SqliteDb {
            pool,
            writer: Arc::new(Mutex::new(writer)),
            delivery_writer: Arc::new(Mutex::new(delivery_writer)),
            path: path.to_owned(),
            _lock: Arc::new(lock),
        })
    }

    /// The delivery-state connection for reads only, without the writer's lock: WAL lets it read
    /// beside any writer, so a check that finds nothing to write waits for no commit.
    pub async fn lock_delivery_reads(&self) -> MutexGuard<'_, rusqlite::Connection> {
        self.delivery_writer.lock().await
    }

    /// The delivery-state connection, with the writer's lock held for as long as it is used.
    pub async fn lock_delivery_writer(&self) -> DeliveryWriter<'_> {
        let writing = self.writer.lock().await;
        DeliveryWriter {
            conn: self.delivery_writer.lock().await,
            _writing: writing,
        }
    }
}

/// [`SqliteDb::delivery_writer`], locked, and the writer's lock: SQLite lets one connection write at a
/// time, and every write takes the writer's lock first.
pub struct DeliveryWriter<'a> {
    conn: MutexGuard<'a, rusqlite::Connection>,
    _writing: MutexGuard<'a, SqliteConnection>,
}

impl Deref for DeliveryWriter<'_> {
    type Target = rusqlite::Connection;

    fn deref(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

impl DerefMut for DeliveryWriter<'_> {
    fn deref_mut(&mut self) -> &mut rusqlite::Connection {
        &mut self.conn
    }
}

/// Translates driver errors at the store boundary.
pub(crate) fn map_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(ref db) if away_or_busy(db.as_ref()) => {
            StoreError::Unavailable(e.to_string())
        }
        other => StoreError::Internal(other.to_string()),
    }
}

/// Whether a database error says the database is away or busy (a retry may succeed), not that the
/// statement is at fault.
fn away_or_busy(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return postgres_away_or_busy(pg.code());
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        return db
            .code()
            .and_then(|code| code.parse().ok())
            .is_some_and(sqlite_away_or_busy);
    }
    false
}

/// Whether a Postgres SQLSTATE says the database is away or busy: connection errors (08), out of
/// resources (53), shutting down, restarting or starting up (57P), a standby after a failover (25006),
/// serialization failures and deadlocks (40001, 40P01), a lock timeout (55P03), and the idle
/// transaction timeout (25P03). Not a statement timeout or cancel (57014): a statement that always
/// takes too long would be retried for good.
pub(crate) fn postgres_away_or_busy(code: &str) -> bool {
    ["08", "53", "57P"]
        .iter()
        .any(|class| code.starts_with(class))
        || matches!(code, "25006" | "40001" | "40P01" | "55P03" | "25P03")
}

/// Converts nanoseconds since the epoch.
pub(crate) fn from_ns(ns: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(ns)
}

/// Converts to nanoseconds since the epoch (saturating outside 1677..2262).
pub(crate) fn to_ns(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

pub(crate) fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn decode(row: &sqlx::sqlite::SqliteRow) -> StoreResult<StoredEvent> {
    Ok(StoredEvent {
        tenant: row.try_get("tenant").map_err(map_err)?,
        sequence: row.try_get::<i64, _>("seq").map_err(map_err)? as u64,
        recorded_at: from_ns(row.try_get("recorded_ns").map_err(map_err)?),
        event: super::decode_body(row.try_get::<&[u8], _>("body").map_err(map_err)?)?,
    })
}

/// Decodes the events of one page-read row: each `seq recorded_ns length body`, back to back, where
/// `length` is the body's size in bytes.
fn decode_page_row(tenant: &str, mut row: &[u8]) -> StoreResult<Vec<StoredEvent>> {
    let undecodable = || StoreError::Internal("undecodable stored page row".to_owned());
    let number = |row: &mut &[u8]| -> StoreResult<i64> {
        let end = row
            .iter()
            .position(|b| *b == b' ')
            .ok_or_else(undecodable)?;
        let value = std::str::from_utf8(&row[..end])
            .ok()
            .and_then(|digits| digits.parse().ok())
            .ok_or_else(undecodable)?;
        *row = &row[end + 1..];
        Ok(value)
    };
    let mut events = Vec::new();
    while !row.is_empty() {
        let seq = number(&mut row)?;
        let recorded_ns = number(&mut row)?;
        let length = usize::try_from(number(&mut row)?).map_err(|_| undecodable())?;
        let body = row.get(..length).ok_or_else(undecodable)?;
        row = &row[length..];
        events.push(StoredEvent {
            tenant: tenant.to_owned(),
            sequence: seq as u64,
            recorded_at: from_ns(recorded_ns),
            event: super::decode_body(body)?,
        });
    }
    Ok(events)
}

/// Appends a page read: `(COUNT(*), events)` rows in the order of their groups of sequences, the
/// events inside a row in none, decoded by [`decode_page_row`].
///
/// One result row per 64 events: sqlx hands every row from SQLite's worker thread to this task on its
/// own (a thread wake-up each), which made reads cost more in hand-offs than in SQLite. Rows group
/// events by `seq >> 6` (at most 64 sequences each; a window function numbering them would be
/// materialized and sorted twice); 64 events of at most 1 MiB stay far below SQLite's 1 GB string
/// limit. Bodies are binary, so each event carries its body's length in bytes (`||` and
/// `group_concat` copy bytes as they are).
///
/// The page is chosen and grouped by sequence alone; each group's events are then concatenated by a
/// subquery over its `lo..=hi` range with the same filter. Grouping or ordering the concatenated lines
/// themselves made SQLite copy every event through its sorter, twice: 8.3 ms against 0.8 ms of CPU
/// per 1,024-event page of 700-byte events in the sqlite3 shell, a tenth of the server's CPU in a
/// group drain (`perf`).
fn push_page_read<'a>(
    sql: &mut QueryBuilder<Sqlite>,
    query: &'a ReadQuery,
    literals: Option<&[&'a str]>,
    limit: usize,
) {
    // A group spans at most 64 sequences: its events are read along the primary key, one b-tree
    // descent per group; `+` keeps SQLite off the indexes, which would cost one descent per event.
    sql.push("SELECT n, (SELECT group_concat(seq || ' ' || recorded_ns || ' ' || octet_length(body) || ' ' || body, '') FROM events WHERE +tenant = ");
    super::push_read_filter(sql, query, None);
    if let Some(types) = literals {
        sql.push(" AND +type IN (");
        let mut list = sql.separated(", ");
        for t in types {
            list.push_bind(*t);
        }
        sql.push(")");
    }
    sql.push(" AND seq BETWEEN lo AND hi)");
    sql.push(" FROM (SELECT COUNT(*) AS n, min(seq) AS lo, max(seq) AS hi FROM (SELECT seq FROM (");
    // one ordered, limited index range per literal type, merged: `type IN (...)` would make SQLite
    // collect and sort every match after the position before it could apply the limit. Types are
    // indexed only under their priority (events_type_priority), so a read of every level takes one
    // range per level and type.
    let levels: Vec<Option<Priority>> = match query.priority {
        None if literals.is_some() => Priority::ALL.into_iter().map(Some).collect(),
        _ => vec![None],
    };
    let branches: Vec<(Option<&str>, Option<Priority>)> = match literals {
        Some(types) => types
            .iter()
            .flat_map(|t| levels.iter().map(move |level| (Some(*t), *level)))
            .collect(),
        None => vec![(None, None)],
    };
    // Without statistics SQLite reads `tenant = ?` alone through an index that starts with it,
    // visiting every event of the tenant and sorting the matches, for each page. Where no index
    // column follows the tenant, `+tenant` leaves it the primary key's range after the position. The
    // normal level, most events, has no index of its own (migration 0006): read by priority alone,
    // it walks the primary key too.
    let by_sequence =
        matches!(query.priority, None | Some(Priority::Normal)) && query.correlation_id.is_none();
    for (i, (literal, level)) in branches.into_iter().enumerate() {
        if i > 0 {
            sql.push(" UNION ALL ");
        }
        sql.push("SELECT * FROM (SELECT seq FROM events WHERE ");
        sql.push(if literal.is_none() && by_sequence {
            "+tenant = "
        } else {
            "tenant = "
        });
        super::push_read_filter(sql, query, literal);
        if let Some(level) = level {
            sql.push(" AND priority = ").push_bind(level.as_i64());
        }
        if literal.is_none() && query.priority.is_some_and(|p| p != Priority::Normal) {
            sql.push(" AND ").push(NOT_NORMAL_PRIORITY);
        }
        sql.push(" ORDER BY seq LIMIT ")
            .push_bind(limit as i64)
            .push(")");
    }
    sql.push(") ORDER BY seq LIMIT ")
        .push_bind(limit as i64)
        .push(") GROUP BY seq >> 6 ORDER BY seq >> 6)");
}

/// The condition of the index of the levels other than normal, `events_priority_not_normal`
/// (migration 0006). A query that repeats it can use the index: SQLite uses a partial index only for
/// a WHERE clause that contains the index's own condition, and `priority = ?` does not imply it.
const NOT_NORMAL_PRIORITY: &str = "priority <> 2";

/// Sequences a read of the normal level by priority alone looks at for a page of `limit` events
/// (see [`SqliteStore::read`]): enough for a page where most events are of that level.
fn normal_level_span(limit: usize) -> u64 {
    (limit as u64).saturating_mul(4).max(4096)
}

/// Counts one priority level's events of a tenant in `(after, until]`, per type: the levels other than
/// normal through their index (the statement repeats [`NOT_NORMAL_PRIORITY`]); the normal level, which
/// has no index of its own, as one range of `events_type_priority` per type the tenant has, so a
/// level rare in the tenant is not counted by walking every event after the position.
fn level_count_sql(level: Priority) -> &'static str {
    match level {
        Priority::Normal => {
            "SELECT t.type, (SELECT COUNT(*) FROM events e WHERE e.tenant = t.tenant AND e.type = t.type \
             AND e.priority = ?2 AND e.seq > ?3 AND e.seq <= ?4) AS n FROM event_types t WHERE t.tenant = ?1"
        }
        _ => {
            "SELECT type, COUNT(*) AS n FROM events WHERE tenant = ?1 AND priority = ?2 \
             AND priority <> 2 AND seq > ?3 AND seq <= ?4 GROUP BY type"
        }
    }
}

/// One statement counting the events of `literals` after each level's position, as a sum of one index
/// range per type and level. The API takes at most 100 types (`MAX_TYPE_PATTERNS`), so 400 terms: well
/// within SQLite's expression depth of 1,000. A level at `u64::MAX` is not counted.
fn literal_count<'a>(
    sql: &mut QueryBuilder<Sqlite>,
    tenant: &'a str,
    literals: &[&'a str],
    after_by_level: [u64; 4],
    durable: u64,
) {
    sql.push("SELECT 0");
    for event_type in literals {
        for (level, after) in Priority::ALL.iter().zip(after_by_level) {
            if after == u64::MAX {
                continue;
            }
            sql.push(" + (SELECT COUNT(*) FROM events WHERE tenant = ")
                .push_bind(tenant)
                .push(" AND type = ")
                .push_bind(*event_type)
                .push(" AND priority = ")
                .push_bind(level.as_i64())
                .push(" AND seq > ")
                .push_bind(seq_i64(after))
                .push(" AND seq <= ")
                .push_bind(seq_i64(durable))
                .push(")");
        }
    }
}

/// Encodes a list of patterns as a JSON array.
fn encode_patterns(patterns: &[String]) -> StoreResult<String> {
    serde_json::to_string(patterns)
        .map_err(|e| StoreError::Internal(format!("encoding patterns: {e}")))
}

fn decode_publisher(row: &sqlx::sqlite::SqliteRow) -> StoreResult<Publisher> {
    let patterns = |column: &str| -> StoreResult<Vec<String>> {
        let text: String = row.try_get(column).map_err(map_err)?;
        serde_json::from_str(&text).map_err(|e| {
            StoreError::Internal(format!("undecodable stored publisher {column}: {e}"))
        })
    };
    Ok(Publisher {
        tenant: row.try_get("tenant").map_err(map_err)?,
        principal: row.try_get("principal").map_err(map_err)?,
        types: patterns("types")?,
        sources: patterns("sources")?,
        description: row.try_get("description").map_err(map_err)?,
        updated_at: from_ns(row.try_get("updated_ns").map_err(map_err)?),
    })
}

fn decode_dead_letter(row: &sqlx::sqlite::SqliteRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        tenant: row.try_get("tenant").map_err(map_err)?,
        group: row.try_get("grp").map_err(map_err)?,
        sequence: row.try_get::<i64, _>("seq").map_err(map_err)? as u64,
        attempts: row.try_get::<i64, _>("attempts").map_err(map_err)? as u32,
        reason: row.try_get("reason").map_err(map_err)?,
        dead_lettered_at: from_ns(row.try_get("dead_ns").map_err(map_err)?),
    })
}

/// Binds a dead letter as `?1` to `?6`: tenant, group, sequence, attempts, reason, time.
fn bind_dead_letter<'q>(
    query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
    dl: &'q DeadLetter,
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments> {
    query
        .bind(&dl.tenant)
        .bind(&dl.group)
        .bind(seq_i64(dl.sequence))
        .bind(i64::from(dl.attempts))
        .bind(&dl.reason)
        .bind(to_ns(dl.dead_lettered_at))
}

fn decode_audit(row: &sqlx::sqlite::SqliteRow) -> StoreResult<AuditRecord> {
    Ok(AuditRecord {
        id: row.try_get::<i64, _>("id").map_err(map_err)? as u64,
        time: from_ns(row.try_get("time_ns").map_err(map_err)?),
        tenant: row.try_get("tenant").map_err(map_err)?,
        principal: row.try_get("principal").map_err(map_err)?,
        action: row.try_get("action").map_err(map_err)?,
        resource: row.try_get("resource").map_err(map_err)?,
        outcome: row.try_get("outcome").map_err(map_err)?,
        reason: row.try_get("reason").map_err(map_err)?,
    })
}

/// The embedded event store.
pub struct SqliteStore {
    db: SqliteDb,
    commits: commit::CommitQueue,
    committed: watch::Receiver<u64>,
    recent: Arc<RecentCommits>,
}

impl SqliteStore {
    /// Starts the store on an open database, with its group-commit writer.
    pub async fn start(db: SqliteDb) -> StoreResult<Arc<Self>> {
        Self::start_with(db, |sync| sync).await
    }

    /// [`SqliteStore::start`], with the log sync wrapped (tests hold it back).
    async fn start_with(
        db: SqliteDb,
        wrap: impl FnOnce(commit::LogSync) -> commit::LogSync,
    ) -> StoreResult<Arc<Self>> {
        let conn = open_event_writer(&db.path)?;
        // The writer's connection has read the database in WAL mode, so the log file exists. Every
        // frame a commit wrote is in it, and SQLite's recovery keeps every commit whose frames are
        // whole, so its `fdatasync` makes the commits written before it durable. It stays the same
        // file while this process has the database open: SQLite deletes it only when its last
        // connection closes, and a restart of the log rewrites it in place. Its name comes from
        // SQLite, which resolves a database path through symbolic links.
        let log_path = format!(
            "{}-wal",
            conn.path()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| StoreError::Internal("the database has no file name".into()))?
        );
        let log = std::fs::File::open(&log_path)
            .map_err(|e| StoreError::Unavailable(format!("opening the log {log_path}: {e}")))?;
        // A process that stopped between a commit and its sync left that commit in the log, maybe
        // only in the OS cache; everything up to the head read below is shown as durable.
        log.sync_data()
            .map_err(|e| StoreError::Unavailable(format!("syncing the log {log_path}: {e}")))?;
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events")
            .fetch_one(&db.pool)
            .await
            .map_err(map_err)?;
        // the last event's time is the latest: recorded times never go backwards
        let last_ns: i64 = sqlx::query_scalar(
            "SELECT COALESCE((SELECT recorded_ns FROM events ORDER BY seq DESC LIMIT 1), 0)",
        )
        .fetch_one(&db.pool)
        .await
        .map_err(map_err)?;
        let (committed_tx, committed) = watch::channel(head as u64);
        let recent = Arc::new(RecentCommits::default());
        let commits = commit::start(
            SqliteWriter {
                conn,
                writer: db.writer.clone(),
                last_ns,
                head: Some(head),
                log_sync: Some(wrap(Box::new(move || log.sync_data()))),
            },
            committed_tx,
            recent.clone(),
        )?;
        start_checkpoints(&db.path, committed.clone())?;
        Ok(Arc::new(SqliteStore {
            db,
            commits,
            committed,
            recent,
        }))
    }

    /// Returns the database, for the embedded streams.
    pub fn db(&self) -> &SqliteDb {
        &self.db
    }

    /// The committed head: the last event whose commit is synced. The writer's commits are in the
    /// database before their sync ([`open_event_writer`]), so every read of events stops here.
    fn durable(&self) -> u64 {
        *self.committed.borrow()
    }

    /// Waits until the committed head reaches `seq`: an answer that names a sequence read from a
    /// commit not yet synced (the sync in flight, at most) waits for it.
    async fn synced_through(&self, seq: u64) -> StoreResult<()> {
        if seq > self.durable() {
            let mut committed = self.committed.clone();
            committed
                .wait_for(|head| *head >= seq)
                .await
                .map_err(|_| StoreError::Unavailable("the event writer has stopped".into()))?;
        }
        Ok(())
    }
}

/// How long a write waits for SQLite's lock when something outside this process holds it (the sqlite3
/// shell, a backup); within the process every write holds [`SqliteDb::writer`]'s lock first.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The error of a connection that could not be opened or set up.
fn unopened(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    move |e| StoreError::Unavailable(format!("opening {}: {e}", path.display()))
}

/// Opens a rusqlite connection to the database, as durable as sqlx's: `synchronous=FULL` (the
/// checkpoint thread's: a checkpoint syncs the log before copying it, and the database file after).
/// The event and delivery-state writers set `NORMAL` on theirs; their commits are synced otherwise.
fn open_rusqlite(path: &Path) -> StoreResult<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(unopened(path))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unopened(path))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unopened(path))?;
    Ok(conn)
}

/// How often an open waits to look again whether the process holding the database let it go.
const LOCK_RETRY: Duration = Duration::from_millis(200);

/// Creates `path` empty, readable and writable by this user only, when it is missing (an empty file
/// is a new SQLite database); an existing file keeps its mode.
fn private_file(path: &Path) -> StoreResult<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Unavailable(format!(
            "creating {}: {e}",
            path.display()
        ))),
    }
}

/// Takes the exclusive lock of the database (`<database>.lock`), waiting while another process holds
/// it. Two processes writing one file would number events from the same head: a pod's replacement
/// started before it stopped (an eviction, a deleted pod), or a second server started by hand. A
/// file system that cannot lock is warned about, and the database opened all the same.
async fn lock_database(path: &Path) -> StoreResult<std::fs::File> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| StoreError::Unavailable(format!("opening {}: {e}", lock_path.display())))?;
    let mut waiting = false;
    loop {
        match file.try_lock() {
            Ok(()) => {
                if waiting {
                    info!(database = %path.display(), "the other process let the database go; opening it");
                }
                return Ok(file);
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                if !waiting {
                    warn!(database = %path.display(), "another process has the database open; waiting for it to stop");
                    waiting = true;
                }
                tokio::time::sleep(LOCK_RETRY).await;
            }
            Err(std::fs::TryLockError::Error(error)) => {
                warn!(lock = %lock_path.display(), %error, "cannot lock the database; two servers on this data directory would number events alike");
                return Ok(file);
            }
        }
    }
}

/// Opens the connection of groups' delivery state ([`SqliteDb::lock_delivery_writer`]): its commits
/// do not sync the log, and it never checkpoints, since its statements run on the server's runtime
/// (the log sync thread syncs; the checkpoint thread, and the event writer past the backstop,
/// checkpoint).
fn open_delivery_writer(path: &Path) -> StoreResult<rusqlite::Connection> {
    let unopened = unopened(path);
    let conn = open_rusqlite(path)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(unopened)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(unopened)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
        .map_err(unopened)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Opens the group commit's own connection to the migrated database.
///
/// sqlx runs each connection's statements on a thread of its own and answers every statement of a
/// call with a message of its own, so each commit (`BEGIN`, the inserts, `COMMIT`) crossed to that
/// thread and woke the writer once per statement; this connection runs on the writer's thread itself
/// (docs/benchmarks.md, cause 4: "Fixed: the commit crossed threads").
///
/// Its commits do not sync the log (`synchronous=NORMAL`): the log sync thread does, while the writer
/// writes the next commit ([`SqliteWriter::log_sync`]). A commit is shown and answered only after
/// that sync, and readers see no event past the committed head ([`SqliteStore::durable`]), so what
/// a power loss can take back was never answered or read. SQLite keeps the log consistent either way.
fn open_event_writer(path: &Path) -> StoreResult<rusqlite::Connection> {
    let unopened = unopened(path);
    let conn = open_rusqlite(path)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(unopened)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
        .map_err(unopened)?;
    // in place of `wal_autocheckpoint`, whose checkpoint's outcome SQLite ignores
    conn.wal_hook(Some(checkpoint_past_the_backstop));
    let journal: String = conn
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .map_err(unopened)?;
    if !journal.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Internal(format!(
            "{} is in journal mode {journal}, not WAL",
            path.display()
        )));
    }
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// How often the log (`-wal` file) is checkpointed into the database file, off the writer's thread.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// Log pages (4 KiB) past which a commit checkpoints by itself, as SQLite does by default past 1,000:
/// the backstop for when the background checkpoints cannot finish. Under continuous writes they never
/// do (frames are appended while one runs), and only a finished checkpoint lets the log start over.
pub const WAL_BACKSTOP_PAGES: i64 = 10_000;
/// Bytes the log file is cut back to when it starts over after growing past them.
pub const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// The event writer's commit hook: past [`WAL_BACKSTOP_PAGES`] in the log, the commit checkpoints
/// it by itself (passively), as SQLite's `wal_autocheckpoint` would. Made here because SQLite ignores
/// the outcome of its own: an I/O error stops the process, as one of the background checkpoints does
/// ([`checkpoint_failure_is_fatal`]). Any other failure (busy) is left for the next commit, and the
/// hook never fails the commit, which was made before it runs.
fn checkpoint_past_the_backstop(
    wal: &rusqlite::hooks::Wal,
    pages: std::ffi::c_int,
) -> rusqlite::Result<()> {
    if i64::from(pages) >= WAL_BACKSTOP_PAGES
        && let Err(e) = wal.checkpoint()
        && checkpoint_failure_is_fatal(&e)
    {
        commit::stop_process(&format!(
            "checkpointing the event log past {WAL_BACKSTOP_PAGES} pages failed ({e})"
        ));
    }
    Ok(())
}

/// Starts a thread that checkpoints the log every [`CHECKPOINT_EVERY`] on a connection of its own,
/// until the writer stops (`committed` closes).
///
/// SQLite checkpoints inside the commit that takes the log past its threshold: the group commit then
/// copied every page of the log into the database file and synced it before answering, ~16 % of the
/// writer thread's time at 100-event publishes. A passive checkpoint here runs beside the writer
/// instead (docs/benchmarks.md, cause 6).
fn start_checkpoints(path: &Path, committed: watch::Receiver<u64>) -> StoreResult<()> {
    let conn = open_rusqlite(path)?;
    let path = path.display().to_string();
    std::thread::Builder::new()
        .name("nerve-checkpoint".into())
        .spawn(move || {
            let mut failing = false;
            // a closed channel means the writer stopped: the store was dropped
            while committed.has_changed().is_ok() {
                std::thread::sleep(CHECKPOINT_EVERY);
                // PASSIVE copies what no reader still needs and never waits for a lock
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    Err(e) if checkpoint_failure_is_fatal(&e) => commit::stop_process(&format!(
                        "checkpointing the log into {path} failed ({e})"
                    )),
                    // once per failure, not every 50 ms; commits still checkpoint past the backstop
                    Err(e) if !failing => {
                        tracing::warn!(database = %path, error = %e, "checkpointing the log failed");
                        failing = true;
                    }
                    Err(_) => {}
                    Ok(()) if failing => {
                        tracing::info!(database = %path, "checkpointing the log works again");
                        failing = false;
                    }
                    Ok(()) => {}
                }
            }
        })
        .map_err(|e| StoreError::Internal(format!("starting the checkpoints: {e}")))?;
    Ok(())
}

/// Whether a checkpoint's failure leaves the database file in doubt: an I/O error writing or syncing
/// it. A checkpoint that does not reach the log's end records its progress without syncing the file,
/// and the kernel may mark pages it failed to write back clean; the next checkpoint copies only what
/// follows, its sync then succeeds, and the log starts over without the only good copy of those
/// pages. The process stops instead, as for a failed sync of the log.
fn checkpoint_failure_is_fatal(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code & 0xff == rusqlite::ffi::SQLITE_IOERR)
}

/// Events of a tenant with an id, from any source (`?1` tenant, `?2` id, `?3` the committed head, `?4`
/// the sequence they come after, `?5` how many): each
/// source of the tenant found with one seek of `events_key`, then the id looked up under it. The key
/// leads with the source, and SQLite does not skip over a leading column by itself: a lookup by id
/// alone read every event of the tenant (70-100 ms at 300,000 events, against 0.5 ms this way).
const FIND_IN_EVERY_SOURCE: &str = "WITH RECURSIVE sources(source) AS (\
     SELECT MIN(source) FROM events WHERE tenant = ?1 \
     UNION ALL SELECT (SELECT MIN(source) FROM events WHERE tenant = ?1 AND source > sources.source) \
     FROM sources WHERE sources.source IS NOT NULL) \
     SELECT e.* FROM sources JOIN events e ON e.tenant = ?1 AND e.source = sources.source AND e.id = ?2 \
     AND e.seq <= ?3 AND e.seq > ?4 ORDER BY e.seq LIMIT ?5";

/// Translates errors of the rusqlite writers (events, delivery state): a full or failing disk is worth
/// a retry.
pub(crate) fn map_write_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if sqlite_away_or_busy(f.extended_code) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

/// Whether an SQLite result code says the database is busy or its disk failed (a retry may succeed):
/// busy, locked, I/O error, disk full, cannot open. Extended codes carry the primary one in their low
/// byte.
fn sqlite_away_or_busy(code: i32) -> bool {
    matches!(
        code & 0xff,
        rusqlite::ffi::SQLITE_BUSY
            | rusqlite::ffi::SQLITE_LOCKED
            | rusqlite::ffi::SQLITE_IOERR
            | rusqlite::ffi::SQLITE_FULL
            | rusqlite::ffi::SQLITE_CANTOPEN
    )
}

/// Whether the unique key of events refused a row.
fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// The embedded group commit's writer ([`BatchWriter`]).
struct SqliteWriter {
    /// The group commit's own connection; see [`open_event_writer`].
    conn: rusqlite::Connection,
    /// Held while committing, so no other write of the process takes SQLite's write lock meanwhile.
    writer: Arc<Mutex<SqliteConnection>>,
    last_ns: i64,
    /// The highest stored sequence, kept here because this writer is the only one that inserts events;
    /// `None` after a failed commit, until it is read again.
    head: Option<i64>,
    /// The sync of the log (`-wal`) file, for [`BatchWriter::log_sync`].
    log_sync: Option<commit::LogSync>,
}

impl BatchWriter for SqliteWriter {
    fn probe(&self) -> impl Future<Output = StoreResult<()>> + Send + 'static {
        // a local file: nothing to wait for
        std::future::ready(Ok(()))
    }

    fn log_sync(&mut self) -> Option<commit::LogSync> {
        self.log_sync.take()
    }

    async fn attempt(
        &mut self,
        batch: &[CommitRequest],
        look_up_keys: bool,
    ) -> Result<Committed, Attempt> {
        // recorded time never goes backwards, so time positions and sequence order agree
        self.last_ns = to_ns(Utc::now()).max(self.last_ns);
        let _writing = self.writer.lock().await;
        let head = match self.head {
            Some(head) => head,
            None => self
                .conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |row| {
                    row.get(0)
                })
                .map_err(map_write_err)?,
        };
        self.head = None;
        let plan = match write_batch(&mut self.conn, batch, self.last_ns, head, look_up_keys) {
            Ok(plan) => plan,
            Err(Attempt::KeyStored) => {
                // the unique index refused the batch before anything committed: the head stands
                self.head = Some(head);
                return Err(Attempt::KeyStored);
            }
            Err(failed) => return Err(failed),
        };
        self.head = Some(plan.rows.last().map_or(head, |r| r.seq));
        Ok(Committed {
            results: plan.results,
            recorded_ns: self.last_ns,
        })
    }
}

/// Rows per multi-row statement (key lookups, audit records, stream entries): at a dozen parameters
/// per row, far below SQLite's 32,766.
pub(crate) const ROWS_PER_STATEMENT: usize = 500;
/// Statements each rusqlite writer keeps prepared: the group commit's two inserts, the delivery
/// state's ten, and room to spare.
const STATEMENT_CACHE: usize = 16;

/// Writes the batch in one transaction (see [`BatchWriter::attempt`]): look up the keys already stored
/// when asked to, decide in memory ([`commit::plan`]), insert the rows and the per-type statistics,
/// commit; returns the plan written (its rows are in sequence order). A failure leaves nothing: the
/// transaction rolls back when it is dropped uncommitted.
fn write_batch<'a>(
    conn: &mut rusqlite::Connection,
    batch: &'a [CommitRequest],
    recorded_ns: i64,
    head: i64,
    look_up_keys: bool,
) -> Result<commit::Plan<'a>, Attempt> {
    // IMMEDIATE takes the write lock now: the transaction writes whatever the lookup finds
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(map_write_err)?;
    let mut known = commit::Known::new();
    if look_up_keys {
        for chunk in commit::keys(batch).chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT e.tenant, e.source, e.id, e.seq, e.content_hash FROM (VALUES {}) AS k \
                 JOIN events e ON e.tenant = k.column1 AND e.source = k.column2 AND e.id = k.column3",
                placeholders(chunk.len(), 3)
            );
            let mut statement = tx.prepare(&sql).map_err(map_write_err)?;
            let keys = chunk
                .iter()
                .flat_map(|(tenant, source, id)| [tenant, source, id]);
            let mut rows = statement
                .query(rusqlite::params_from_iter(keys))
                .map_err(map_write_err)?;
            while let Some(row) = rows.next().map_err(map_write_err)? {
                let seq: i64 = row.get(3).map_err(map_write_err)?;
                known.insert(
                    (
                        row.get(0).map_err(map_write_err)?,
                        row.get(1).map_err(map_write_err)?,
                        row.get(2).map_err(map_write_err)?,
                    ),
                    (seq as u64, row.get(4).map_err(map_write_err)?),
                );
            }
        }
    }
    let plan = commit::plan(batch, known, head);
    match insert_rows(&tx, &plan, recorded_ns) {
        Ok(()) => {}
        Err(e) if !look_up_keys && is_unique_violation(&e) => return Err(Attempt::KeyStored),
        Err(e) => return Err(map_write_err(e).into()),
    }
    tx.commit().map_err(map_write_err)?;
    Ok(plan)
}

/// `(?, ?, ?), (?, ?, ?)`: `rows` rows of `columns` placeholders.
fn placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

/// Inserts the plan's event rows and per-type statistics, one row per execution of a statement that
/// stays prepared. This connection runs on the writer's own thread, so a statement per row costs no
/// hand-off; multi-row statements came in one shape per row count and were parsed again for most
/// commits of more than a few rows (~15 % of the writer thread's samples at 10K events/s).
///
/// `OR ROLLBACK`: a refused row ends the whole transaction (nothing of a failed commit stays anyway),
/// so SQLite keeps no statement journal to undo one statement alone. That journal copied every page a
/// commit touched (~16 at 10 events) and spilled past 64 KiB to a temporary file; without it a commit at
/// 10K events/s took 0.55 instead of 0.63 ms.
fn insert_rows(
    conn: &rusqlite::Connection,
    plan: &commit::Plan<'_>,
    recorded_ns: i64,
) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT OR ROLLBACK INTO events (seq, tenant, source, id, type, subject, correlation_id, \
         priority, recorded_ns, content_hash, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?;
    for r in &plan.rows {
        let e = r.event.event();
        insert.execute(rusqlite::params![
            r.seq,
            r.tenant,
            e.source,
            e.id,
            e.event_type,
            e.subject,
            e.correlation_id,
            r.priority(),
            recorded_ns,
            &r.event.content_hash()[..],
            r.event.body(),
        ])?;
    }
    let mut count = conn.prepare_cached(
        "INSERT OR ROLLBACK INTO event_types (tenant, type, count, first_seq, last_seq, last_recorded_ns) \
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, type) DO UPDATE SET count = count + excluded.count, \
         last_seq = excluded.last_seq, last_recorded_ns = excluded.last_recorded_ns",
    )?;
    for s in commit::type_stats(&plan.rows) {
        count.execute(rusqlite::params![
            s.tenant,
            s.event_type,
            s.count,
            s.first_seq,
            s.last_seq,
            recorded_ns
        ])?;
    }
    Ok(())
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn queue(&self, tenant: &str, events: Vec<NewEvent>) -> StoreResult<Queued> {
        commit::queue(&self.commits, tenant, events).await
    }

    async fn read(&self, query: &ReadQuery) -> StoreResult<ReadPage> {
        // the head before the read: every event up to it is committed, so the read sees it, and
        // none after it is read (it may not be synced yet)
        let committed = self.durable();
        let limit = query.page_limit();
        let literals = literal_types(&query.types);
        let until = query.until.map_or(committed, |until| until.min(committed));
        // The normal level has no index of its own: read by priority alone it walks the primary key,
        // every level's and tenant's events. Where it is rare that walk would go on to the head for a
        // page, so it looks at a span of sequences; the page then ends where the span does.
        let span_end = (query.priority == Some(Priority::Normal)
            && literals.is_none()
            && query.correlation_id.is_none())
        .then(|| query.after.saturating_add(normal_level_span(limit)))
        .filter(|end| *end < until);
        let bounded = ReadQuery {
            until: Some(span_end.unwrap_or(until)),
            ..query.clone()
        };
        let mut sql = QueryBuilder::<Sqlite>::new("");
        push_page_read(&mut sql, &bounded, literals.as_deref(), limit);
        let mut chunks = sql.build_query_as::<(i64, Vec<u8>)>().fetch(&self.db.pool);
        let mut fill = PageFill::new(query.after);
        let mut count = 0;
        let mut last = query.after;
        'rows: while let Some((n, row)) = chunks.try_next().await.map_err(map_err)? {
            count += n as usize;
            // rows come in the order of their groups, the events inside one row in none
            let mut events = decode_page_row(&query.tenant, &row)?;
            events.sort_unstable_by_key(|e| e.sequence);
            // a page cut for its bytes keeps the events before the cut: a group out of order would
            // be passed over
            if let Some(first) = events.first() {
                if first.sequence <= last {
                    return Err(StoreError::Internal(
                        "a page read's rows came out of sequence order".into(),
                    ));
                }
                last = events.last().map_or(last, |e| e.sequence);
            }
            for stored in events {
                let matches = literals.is_some()
                    || query.types.is_empty()
                    || query
                        .types
                        .iter()
                        .any(|t| t.matches(&stored.event.event_type));
                if !fill.take(stored, matches) {
                    break 'rows;
                }
            }
        }
        if let Some(end) = span_end {
            // the span's rows were all looked at when fewer than a page came back: it ends the page,
            // and events past it may still match
            let mut page = fill.finish(count >= limit, Some(end), committed);
            page.exhausted = false;
            return Ok(page);
        }
        Ok(fill.finish(count >= limit, query.until, committed))
    }

    async fn read_sequences(&self, sequences: &[u64]) -> StoreResult<Vec<Arc<StoredEvent>>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = QueryBuilder::<Sqlite>::new("SELECT * FROM events WHERE seq IN (");
        let mut list = sql.separated(", ");
        for s in sequences {
            list.push_bind(seq_i64(*s));
        }
        sql.push(") AND seq <= ")
            .push_bind(seq_i64(self.durable()))
            .push(" ORDER BY seq");
        let rows = sql
            .build()
            .fetch_all(&self.db.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(|r| decode(r).map(Arc::new)).collect()
    }

    async fn read_all(&self, after: u64, limit: usize) -> StoreResult<Vec<Arc<StoredEvent>>> {
        if let Some(events) = self.recent.read_after(after, limit) {
            return Ok(events);
        }
        let rows =
            sqlx::query("SELECT * FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?")
                .bind(seq_i64(after))
                .bind(seq_i64(self.durable()))
                .bind(limit as i64)
                .fetch(&self.db.pool)
                .map_err(map_err);
        super::collect_within_read_bytes(rows, decode).await
    }

    async fn find(
        &self,
        tenant: &str,
        id: &str,
        source: Option<&str>,
        after: u64,
    ) -> StoreResult<Vec<Arc<StoredEvent>>> {
        let durable = seq_i64(self.durable());
        let query = match source {
            Some(source) => sqlx::query(
                "SELECT * FROM events WHERE tenant = ? AND source = ? AND id = ? AND seq <= ? AND seq > ?",
            )
            .bind(tenant)
            .bind(source)
            .bind(id)
            .bind(durable)
            .bind(seq_i64(after)),
            None => sqlx::query(FIND_IN_EVERY_SOURCE)
                .bind(tenant)
                .bind(id)
                .bind(durable)
                .bind(seq_i64(after))
                .bind(super::FIND_PAGE as i64),
        };
        let rows = query.fetch_all(&self.db.pool).await.map_err(map_err)?;
        rows.iter().map(|r| decode(r).map(Arc::new)).collect()
    }

    async fn head(&self) -> StoreResult<u64> {
        Ok(*self.committed.borrow())
    }

    async fn sequence_before(&self, time: DateTime<Utc>) -> StoreResult<u64> {
        // a commit in flight is stamped before it takes the writer's lock and shows at its end: a
        // bound computed meanwhile would leave out its events, stamped before the bound
        self.recent.settled().await;
        let seq: i64 = sqlx::query_scalar(super::SEQUENCE_BEFORE_SQL)
            .bind(to_ns(time))
            .fetch_one(&self.db.pool)
            .await
            .map_err(map_err)?;
        // a commit begun since is in the database before its sync: its events are stamped before
        // `time` (a time ahead of this clock), so the answer counts them, once they are synced
        self.synced_through(seq as u64).await?;
        Ok(seq as u64)
    }

    async fn count_after(
        &self,
        tenant: &str,
        after_by_level: [u64; 4],
        selection: &Selection,
    ) -> StoreResult<u64> {
        // literal types (most groups) count their own index ranges, one per type and level, in one
        // statement, instead of every type's events after the position
        if let Some(literals) = literal_types(&selection.types) {
            let mut sql = QueryBuilder::<Sqlite>::default();
            literal_count(&mut sql, tenant, &literals, after_by_level, self.durable());
            let count: i64 = sql
                .build()
                .fetch_one(&self.db.pool)
                .await
                .and_then(|row| row.try_get(0))
                .map_err(map_err)?;
            return Ok(count as u64);
        }
        let mut total = 0;
        let durable = self.durable();
        for (level, after) in Priority::ALL.iter().zip(after_by_level) {
            // a level the selection does not cover here
            if after == u64::MAX {
                continue;
            }
            let rows = sqlx::query(level_count_sql(*level))
                .bind(tenant)
                .bind(level.as_i64())
                .bind(seq_i64(after))
                .bind(seq_i64(durable))
                .fetch_all(&self.db.pool)
                .await
                .map_err(map_err)?;
            for row in rows {
                let t: String = row.try_get("type").map_err(map_err)?;
                if selection.matches_type(&t) {
                    total += row.try_get::<i64, _>("n").map_err(map_err)? as u64;
                }
            }
        }
        Ok(total)
    }

    async fn event_types(
        &self,
        tenant: &str,
        after: &str,
        limit: usize,
    ) -> StoreResult<Vec<EventTypeStats>> {
        let rows = sqlx::query(
            "SELECT * FROM event_types WHERE tenant = ? AND type > ? ORDER BY type LIMIT ?",
        )
        .bind(tenant)
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.db.pool)
        .await
        .map_err(map_err)?;
        let stats = rows
            .iter()
            .map(|r| {
                Ok(EventTypeStats {
                    event_type: r.try_get("type").map_err(map_err)?,
                    count: r.try_get::<i64, _>("count").map_err(map_err)? as u64,
                    first_sequence: r.try_get::<i64, _>("first_seq").map_err(map_err)? as u64,
                    last_sequence: r.try_get::<i64, _>("last_seq").map_err(map_err)? as u64,
                    last_recorded_at: from_ns(r.try_get("last_recorded_ns").map_err(map_err)?),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        // A commit's statistics are in the table before its sync: answer once what they name is on
        // the disk (the sync in flight, at most).
        self.synced_through(stats.iter().map(|s| s.last_sequence).max().unwrap_or(0))
            .await?;
        Ok(stats)
    }

    async fn put_dead_letter(&self, dl: &DeadLetter) -> StoreResult<Option<DeadLetter>> {
        // the writer's lock keeps every other write out between the read and the upsert
        let mut conn = self.db.writer.lock().await;
        let replaced =
            sqlx::query("SELECT * FROM dead_letters WHERE tenant = ? AND grp = ? AND seq = ?")
                .bind(&dl.tenant)
                .bind(&dl.group)
                .bind(seq_i64(dl.sequence))
                .fetch_optional(&mut *conn)
                .await
                .map_err(map_err)?
                .as_ref()
                .map(decode_dead_letter)
                .transpose()?;
        bind_dead_letter(
            sqlx::query(
                "INSERT INTO dead_letters (tenant, grp, seq, attempts, reason, dead_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (tenant, grp, seq) DO UPDATE SET attempts = excluded.attempts, reason = excluded.reason, dead_ns = excluded.dead_ns",
            ),
            dl,
        )
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
        Ok(replaced)
    }

    async fn restore_dead_letter(
        &self,
        replaced: &DeadLetter,
        recorded_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut conn = self.db.writer.lock().await;
        let done = bind_dead_letter(
            sqlx::query(
                "UPDATE dead_letters SET attempts = ?4, reason = ?5, dead_ns = ?6 \
                 WHERE tenant = ?1 AND grp = ?2 AND seq = ?3 AND dead_ns = ?7",
            ),
            replaced,
        )
        .bind(to_ns(recorded_at))
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn dead_letters(
        &self,
        tenant: &str,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT * FROM dead_letters WHERE tenant = ? AND grp = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(tenant)
        .bind(group)
        .bind(seq_i64(after))
        .bind(limit as i64)
        .fetch_all(&self.db.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(decode_dead_letter).collect()
    }

    async fn dead_letter_counts(
        &self,
        tenant: &str,
        groups: &[String],
    ) -> StoreResult<Vec<(String, u64)>> {
        // the names as one JSON array: any number of them in one statement
        let rows = sqlx::query(
            "SELECT grp, COUNT(*) AS n FROM dead_letters \
             WHERE tenant = ? AND grp IN (SELECT value FROM json_each(?)) GROUP BY grp",
        )
        .bind(tenant)
        .bind(serde_json::to_string(groups).map_err(|e| StoreError::Internal(e.to_string()))?)
        .fetch_all(&self.db.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("grp").map_err(map_err)?,
                    r.try_get::<i64, _>("n").map_err(map_err)? as u64,
                ))
            })
            .collect()
    }

    async fn remove_dead_letters(
        &self,
        tenant: &str,
        group: &str,
        letters: &[(u64, DateTime<Utc>)],
    ) -> StoreResult<u64> {
        if letters.is_empty() {
            return Ok(0);
        }
        let mut sql = QueryBuilder::<Sqlite>::new("DELETE FROM dead_letters WHERE tenant = ");
        sql.push_bind(tenant)
            .push(" AND grp = ")
            .push_bind(group)
            .push(" AND (seq, dead_ns) IN (VALUES ");
        let mut list = sql.separated(", ");
        for (seq, at) in letters {
            list.push("(")
                .push_bind_unseparated(seq_i64(*seq))
                .push_unseparated(", ")
                .push_bind_unseparated(to_ns(*at))
                .push_unseparated(")");
        }
        sql.push(")");
        let mut conn = self.db.writer.lock().await;
        let done = sql.build().execute(&mut *conn).await.map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn insert_publisher(&self, p: &Publisher) -> StoreResult<bool> {
        let (types, sources) = (encode_patterns(&p.types)?, encode_patterns(&p.sources)?);
        let mut conn = self.db.writer.lock().await;
        let done = sqlx::query(
            "INSERT INTO publishers (tenant, principal, types, sources, description, updated_ns) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (tenant, principal) DO NOTHING",
        )
        .bind(&p.tenant)
        .bind(&p.principal)
        .bind(types)
        .bind(sources)
        .bind(&p.description)
        .bind(to_ns(p.updated_at))
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn update_publisher(&self, p: &Publisher) -> StoreResult<bool> {
        let (types, sources) = (encode_patterns(&p.types)?, encode_patterns(&p.sources)?);
        let mut conn = self.db.writer.lock().await;
        let done = sqlx::query(
            "UPDATE publishers SET types = ?, sources = ?, description = ?, updated_ns = ? WHERE tenant = ? AND principal = ?",
        )
        .bind(types)
        .bind(sources)
        .bind(&p.description)
        .bind(to_ns(p.updated_at))
        .bind(&p.tenant)
        .bind(&p.principal)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn remove_publisher(&self, tenant: &str, principal: &str) -> StoreResult<bool> {
        let mut conn = self.db.writer.lock().await;
        let done = sqlx::query("DELETE FROM publishers WHERE tenant = ? AND principal = ?")
            .bind(tenant)
            .bind(principal)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn publishers(&self) -> StoreResult<Vec<Publisher>> {
        let rows = sqlx::query("SELECT * FROM publishers ORDER BY tenant, principal")
            .fetch_all(&self.db.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(decode_publisher).collect()
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut conn = self.db.writer.lock().await;
        let mut tx = conn.begin().await.map_err(map_err)?;
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            let mut sql = QueryBuilder::<Sqlite>::new(
                "INSERT INTO audit_log (time_ns, tenant, principal, action, resource, outcome, reason) ",
            );
            sql.push_values(chunk, |mut row, r| {
                row.push_bind(to_ns(r.time))
                    .push_bind(&r.tenant)
                    .push_bind(&r.principal)
                    .push_bind(&r.action)
                    .push_bind(&r.resource)
                    .push_bind(&r.outcome)
                    .push_bind(&r.reason);
            });
            sql.build()
                .persistent(false)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(())
    }

    async fn prune_audit(
        &self,
        before: DateTime<Utc>,
        after_id: u64,
        max: usize,
    ) -> StoreResult<AuditPruned> {
        let last: Option<i64> = sqlx::query_scalar(
            "SELECT max(id) FROM (SELECT id FROM audit_log WHERE id > ? ORDER BY id LIMIT ?)",
        )
        .bind(seq_i64(after_id))
        .bind(max as i64)
        .fetch_one(&self.db.pool)
        .await
        .map_err(map_err)?;
        let Some(last) = last else {
            return Ok(AuditPruned {
                deleted: 0,
                last_id: None,
            });
        };
        let mut conn = self.db.writer.lock().await;
        let deleted = sqlx::query("DELETE FROM audit_log WHERE id > ? AND id <= ? AND time_ns < ?")
            .bind(seq_i64(after_id))
            .bind(last)
            .bind(to_ns(before))
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        Ok(AuditPruned {
            deleted: deleted.rows_affected(),
            last_id: Some(last as u64),
        })
    }

    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        if query.tenants.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = QueryBuilder::<Sqlite>::new("SELECT * FROM audit_log WHERE tenant IN (");
        let mut list = sql.separated(", ");
        for tenant in &query.tenants {
            list.push_bind(tenant);
        }
        sql.push(") AND id > ").push_bind(seq_i64(query.after_id));
        if let Some(principal) = &query.principal {
            sql.push(" AND principal = ").push_bind(principal);
        }
        if let Some(outcome) = &query.outcome {
            sql.push(" AND outcome = ").push_bind(outcome);
        }
        sql.push(" ORDER BY id LIMIT ")
            .push_bind(audit_limit(query.limit));
        let rows = sql
            .build()
            .fetch_all(&self.db.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(decode_audit).collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.db.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

#[cfg(test)]
impl SqliteStore {
    /// A store started on a new database file at `path`, for tests.
    pub(crate) async fn started(path: &Path) -> Arc<SqliteStore> {
        SqliteStore::start(SqliteDb::open(path).await.expect("open"))
            .await
            .expect("store")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn postgres_codes_of_a_database_away_or_busy_are_told_from_faults_of_the_statement() {
        use super::postgres_away_or_busy as away;
        for code in [
            "57P01", "57P03", "08006", "53300", "25006", "40001", "40P01", "55P03",
        ] {
            assert!(away(code), "{code}");
        }
        // faults of the statement (invalid text, unique and check violations), some all digits
        for code in ["22021", "23505", "23514", "42P01", "57014", "XX000"] {
            assert!(!away(code), "{code}");
        }
    }

    /// The event writer's own backstop does what SQLite's automatic checkpoint did: the commit that
    /// takes the log past it copies the log, so the next commit starts the log over.
    #[test]
    fn the_event_writer_checkpoints_the_log_past_the_backstop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backstop.db");
        let other = rusqlite::Connection::open(&path).expect("create");
        let mode: String = other
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .expect("journal mode");
        assert_eq!(mode, "wal");
        other
            .execute_batch("PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (b BLOB)")
            .expect("table");
        let writer = super::open_event_writer(&path).expect("event writer");
        // 1 MiB rows fill ~257 pages each: 12 commits of 4 cross the backstop in their 10th
        let row = vec![7u8; 1 << 20];
        for commit in 1..=12 {
            writer.execute_batch("BEGIN").expect("begin");
            for _ in 0..4 {
                writer
                    .execute("INSERT INTO t (b) VALUES (?1)", [&row])
                    .expect("insert");
            }
            writer.execute_batch("COMMIT").expect("commit");
            if commit == 9 {
                // not before it (SQLite's own default is 1,000 pages): a log started over would be
                // written again from the file's start
                let log = std::fs::metadata(dir.path().join("backstop.db-wal"))
                    .expect("log file")
                    .len();
                assert!(
                    log > (9 * 4) << 20,
                    "the log file has {log} bytes: checkpointed before the backstop"
                );
            }
        }
        let (_, log, _): (i64, i64, i64) = other
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("checkpoint");
        assert!(
            (1..super::WAL_BACKSTOP_PAGES).contains(&log),
            "the log holds {log} pages: it never started over"
        );
    }

    #[test]
    fn only_io_errors_of_a_checkpoint_stop_the_process() {
        let failure =
            |code: i32| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        for code in [
            rusqlite::ffi::SQLITE_IOERR,
            rusqlite::ffi::SQLITE_IOERR_FSYNC,
            rusqlite::ffi::SQLITE_IOERR_WRITE,
        ] {
            assert!(super::checkpoint_failure_is_fatal(&failure(code)), "{code}");
        }
        for code in [
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_LOCKED,
            rusqlite::ffi::SQLITE_FULL,
        ] {
            assert!(
                !super::checkpoint_failure_is_fatal(&failure(code)),
                "{code}"
            );
        }
    }

    use super::*;
    use crate::event::TypePattern;

    /// The steps of the plan SQLite chooses for a page read, one per line.
    async fn plan(db: &SqliteDb, query: &ReadQuery) -> String {
        let literals = literal_types(&query.types);
        let mut sql = QueryBuilder::<Sqlite>::new("EXPLAIN QUERY PLAN ");
        push_page_read(&mut sql, query, literals.as_deref(), 1024);
        let steps = sql.build().fetch_all(&db.pool).await.expect("explain");
        let steps: Vec<String> = steps
            .iter()
            .map(|row| row.try_get("detail").expect("detail"))
            .collect();
        steps.join("\n")
    }

    fn query(types: &[&str], priority: Option<Priority>) -> ReadQuery {
        ReadQuery {
            tenant: "t".into(),
            after: 10,
            until: Some(5000),
            types: types
                .iter()
                .map(|t| TypePattern::parse(t).expect("pattern"))
                .collect(),
            priority,
            limit: 1024,
            ..ReadQuery::default()
        }
    }

    /// Events `e{first}..` of the given types and priorities, as one request.
    fn new_events(first: usize, kinds: &[(&str, Priority)]) -> Vec<NewEvent> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, (event_type, priority))| {
                let event = crate::event::Event {
                    id: format!("e{}", first + i),
                    source: "test".into(),
                    event_type: (*event_type).into(),
                    priority: *priority,
                    ..crate::event::Event::default()
                };
                let hash = event.content_hash();
                NewEvent::new(event, hash)
            })
            .collect()
    }

    /// A data directory whose name has URL characters (`?`, `%`) is used as it is, by every
    /// connection; the files made there are readable by this user only.
    #[tokio::test]
    async fn a_database_path_is_a_path_not_a_url_and_its_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("50%41 ?x=1");
        std::fs::create_dir(&data).expect("data dir");
        let path = data.join("nerve.db");
        let db = SqliteDb::open(&path).await.expect("open");
        let store = SqliteStore::start(db).await.expect("start");
        let event = crate::event::Event {
            id: "e1".into(),
            source: "//test".into(),
            event_type: "path.test".into(),
            spec_version: "1.0".into(),
            ..Default::default()
        };
        let hash = event.content_hash();
        store
            .append("t", vec![NewEvent::new(event, hash)])
            .await
            .expect("append");
        assert_eq!(store.head().await.expect("head"), 1);
        let mut made: Vec<String> = std::fs::read_dir(&data)
            .expect("list")
            .map(|e| {
                let e = e.expect("entry");
                let mode = e.metadata().expect("metadata").permissions().mode() & 0o777;
                format!("{} {mode:o}", e.file_name().to_string_lossy())
            })
            .collect();
        made.sort();
        assert_eq!(
            made,
            [
                "nerve.db 600",
                "nerve.db-shm 600",
                "nerve.db-wal 600",
                "nerve.db.lock 600"
            ]
        );
        assert!(!dir.path().join("50A ").exists());
    }

    #[tokio::test]
    async fn only_the_connection_of_other_writes_syncs_its_own_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nerve.db");
        let db = SqliteDb::open(&path).await.expect("open");
        // 2 is FULL (every commit syncs the log), 1 NORMAL
        let writer: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *db.writer.lock().await)
            .await
            .expect("synchronous");
        assert_eq!(writer, 2);
        let level = |conn: &rusqlite::Connection| -> i64 {
            conn.pragma_query_value(None, "synchronous", |row| row.get(0))
                .expect("synchronous")
        };
        assert_eq!(level(&*db.lock_delivery_writer().await), 1);
        // event commits are synced by the log sync (the test below)
        assert_eq!(
            level(&open_event_writer(&path).expect("events connection")),
            1
        );
    }

    /// Set for the child process of the test below, which runs that test alone: the directory of its
    /// database (the parent's, which removes it; the child is aborted before it could).
    const SYNC_PANIC_CHILD: &str = "NERVE_TEST_SYNC_PANIC_CHILD";

    #[tokio::test]
    async fn a_panic_in_the_log_sync_thread_stops_the_process() {
        const NAME: &str = "store::sqlite::tests::a_panic_in_the_log_sync_thread_stops_the_process";
        if let Some(dir) = std::env::var_os(SYNC_PANIC_CHILD) {
            let db = SqliteDb::open(&Path::new(&dir).join("nerve.db"))
                .await
                .expect("open");
            let store = SqliteStore::start_with(db, |_| Box::new(|| panic!("a sync panicked")))
                .await
                .expect("store");
            let mut commit = store
                .queue("t", new_events(0, &[("a", Priority::Normal)]))
                .await
                .expect("queued");
            // The process stops while the sync thread unwinds, which may first drop the commit's
            // answer: the wait ends, and the child waits on for the stop. Were the process not
            // stopped, the child would end normally, and the test fail.
            let ended = tokio::time::timeout(Duration::from_secs(10), commit.answer()).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            println!(
                "the child went on (the wait for the commit ended: {})",
                ended.is_ok()
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(SYNC_PANIC_CHILD, dir.path())
            .output()
            .expect("running the test alone in a child process");
        let stdout = String::from_utf8_lossy(&child.stdout);
        let stderr = String::from_utf8_lossy(&child.stderr);
        use std::os::unix::process::ExitStatusExt as _;
        const SIGABRT: i32 = 6;
        assert_eq!(
            child.status.signal(),
            Some(SIGABRT),
            "the process went on after its sync thread panicked ({});\nstdout:\n{stdout}\nstderr:\n{stderr}",
            child.status
        );
        assert!(
            stderr.contains("the nerve-sync thread panicked; stopping the process"),
            "stderr does not say why the process stopped:\n{stderr}"
        );
    }

    #[tokio::test]
    async fn a_commit_is_answered_and_read_only_after_the_log_sync_that_follows_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nerve.db");
        let (asked, sync_asked) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let db = SqliteDb::open(&path).await.expect("open");
        let store = SqliteStore::start_with(db, move |mut sync| {
            Box::new(move || {
                let _ = asked.send(());
                // held until the test lets it go (or ends)
                let _ = released.recv();
                sync()
            })
        })
        .await
        .expect("store");
        let sync_asked = Arc::new(std::sync::Mutex::new(sync_asked));
        let next_sync = || {
            let sync_asked = sync_asked.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    sync_asked
                        .lock()
                        .expect("receiver")
                        .recv_timeout(Duration::from_secs(10))
                })
                .await
                .expect("join")
                .expect("no sync was asked for within 10 s")
            }
        };
        let raw = rusqlite::Connection::open(&path).expect("raw connection");
        let rows = || -> i64 {
            raw.query_row("SELECT COUNT(*) FROM events", [], |row| row.get(0))
                .expect("count")
        };
        let mut first = store
            .queue("t", new_events(0, &[("a", Priority::Normal)]))
            .await
            .expect("queued");
        next_sync().await;
        // the commit is in the database before its sync...
        assert_eq!(rows(), 1, "the commit was not written before its sync");
        // ...but neither answered nor read through the store
        assert!(
            futures::FutureExt::now_or_never(first.answer()).is_none(),
            "answered before the sync"
        );
        assert_eq!(store.head().await.expect("head"), 0);
        assert!(store.read_all(0, 10).await.expect("read_all").is_empty());
        let from_start = |types: &[&str]| ReadQuery {
            after: 0,
            until: None,
            ..query(types, None)
        };
        let page = store.read(&from_start(&[])).await.expect("read");
        assert!(page.events.is_empty(), "a page read an unsynced event");
        let literal = store.read(&from_start(&["a"])).await.expect("read");
        assert!(literal.events.is_empty(), "a page read an unsynced event");
        // a range past the head is read, and reported scanned, only up to the head
        for until in [1, u64::MAX] {
            for types in [&[][..], &["a"]] {
                let page = store
                    .read(&ReadQuery {
                        until: Some(until),
                        ..from_start(types)
                    })
                    .await
                    .expect("read");
                assert!(page.events.is_empty(), "a range read an unsynced event");
                assert!(page.exhausted);
                assert_eq!(page.scanned_to, 0, "a range was scanned past the head");
            }
        }
        assert!(
            store
                .read_sequences(&[1])
                .await
                .expect("by sequence")
                .is_empty()
        );
        assert!(
            store
                .find("t", "e0", Some("test"), 0)
                .await
                .expect("find")
                .is_empty()
        );
        assert!(
            store
                .find("t", "e0", None, 0)
                .await
                .expect("find")
                .is_empty()
        );
        let lag = store
            .count_after("t", [0; 4], &Selection::default())
            .await
            .expect("count");
        assert_eq!(lag, 0, "an unsynced event was counted");
        // the type statistics name the sequence: they answer once it is synced (a wait that ends
        // by itself would have read them at once)
        let mut listing = tokio::spawn({
            let store = store.clone();
            async move { store.event_types("t", "", 10).await }
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut listing)
                .await
                .is_err(),
            "the type statistics answered before the sync"
        );
        // a commit written while the sync is held waits for the next sync, not that one
        let mut second = store
            .queue("t", new_events(1, &[("a", Priority::Normal)]))
            .await
            .expect("queued");
        // nothing tells when the writer has written it: look
        let written = std::time::Instant::now();
        while rows() < 2 {
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "the second commit was not written within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        release.send(()).expect("release");
        assert_eq!(first.committed().await.expect("committed")[0].sequence, 1);
        let types = listing.await.expect("join").expect("event types");
        assert_eq!(types[0].last_sequence, 1);
        let range = ReadQuery {
            until: Some(u64::MAX),
            ..from_start(&["a"])
        };
        let page = store.read(&range).await.expect("read");
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.scanned_to, 1, "a range was scanned past the head");
        next_sync().await;
        assert!(
            futures::FutureExt::now_or_never(second.answer()).is_none(),
            "answered before its own sync"
        );
        assert_eq!(store.head().await.expect("head"), 1);
        let read: Vec<u64> = store
            .read_all(0, 10)
            .await
            .expect("read_all")
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(read, [1]);
        assert_eq!(
            store
                .read_sequences(&[1, 2])
                .await
                .expect("by sequence")
                .len(),
            1
        );
        release.send(()).expect("release");
        assert_eq!(second.committed().await.expect("committed")[0].sequence, 2);
        assert_eq!(store.head().await.expect("head"), 2);
        assert_eq!(store.find("t", "e1", None, 0).await.expect("find").len(), 1);
        let page = store.read(&from_start(&["a"])).await.expect("read");
        assert_eq!(page.events.len(), 2);
    }

    /// How many events the database file holds by itself: `immutable` makes SQLite ignore the log.
    /// An error (no table yet, a page read mid-copy) counts as none.
    fn events_in_database_file(path: &Path) -> i64 {
        let uri = format!("file:{}?immutable=1", path.display());
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        rusqlite::Connection::open_with_flags(uri, flags)
            .and_then(|conn| conn.query_row("SELECT COUNT(*) FROM events", [], |row| row.get(0)))
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn the_log_is_checkpointed_into_the_database_file_beside_the_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("checkpoint.db");
        let store = SqliteStore::started(&path).await;
        store
            .append("t", new_events(0, &[("job", Priority::Normal); 10]))
            .await
            .expect("append");
        // ten events are a few pages of log, far below the threshold at which a commit checkpoints
        // by itself: only the checkpoint thread copies them into the database file
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while events_in_database_file(&path) != 10 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the events did not reach the database file within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_read_of_literal_types_merges_their_priority_levels_in_sequence_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::started(&dir.path().join("levels.db")).await;
        // "a" at every level in turn, "b" between them
        let kinds: Vec<(&str, Priority)> = (0..40)
            .map(|i| match i % 2 {
                0 => ("a", Priority::ALL[(i / 2) % 4]),
                _ => ("b", Priority::ALL[3 - (i / 2) % 4]),
            })
            .collect();
        store
            .append("t", new_events(0, &kinds))
            .await
            .expect("append");
        let ids = |page: &ReadPage| -> Vec<String> {
            page.events.iter().map(|e| e.event.id.clone()).collect()
        };
        let mut read = ReadQuery {
            tenant: "t".into(),
            types: vec![TypePattern::parse("a").expect("pattern")],
            limit: 7,
            ..ReadQuery::default()
        };
        let first = store.read(&read).await.expect("read");
        let expected: Vec<String> = (0..14).step_by(2).map(|i| format!("e{i}")).collect();
        assert_eq!(ids(&first), expected, "the first page of type a");
        assert!(!first.exhausted);
        read.after = first.scanned_to;
        read.limit = 100;
        let rest = store.read(&read).await.expect("read");
        let expected: Vec<String> = (14..40).step_by(2).map(|i| format!("e{i}")).collect();
        assert_eq!(ids(&rest), expected, "the rest of type a");
        // the most literal types a selection may hold, each read at every level: 400 ranges merged
        let mut types = vec!["b".to_owned(), "a".to_owned()];
        types.extend((2..crate::api::convert::MAX_TYPE_PATTERNS).map(|i| format!("other{i}")));
        let every = ReadQuery {
            tenant: "t".into(),
            types: types
                .iter()
                .map(|t| TypePattern::parse(t).expect("pattern"))
                .collect(),
            limit: 100,
            ..ReadQuery::default()
        };
        let all = store
            .read(&every)
            .await
            .expect("read of the most literal types");
        let expected: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
        assert_eq!(ids(&all), expected);
    }

    #[tokio::test]
    async fn a_read_of_a_rare_normal_level_looks_at_a_span_and_goes_on_from_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::started(&dir.path().join("normal.db")).await;
        // 10,000 events of the high level, then one of the normal level, then five of the normal
        // level of another tenant
        let span = normal_level_span(64);
        let mut others = vec![("job", Priority::High); 10_000];
        others.push(("job", Priority::Normal));
        store
            .append("t", new_events(0, &others))
            .await
            .expect("append");
        store
            .append("u", new_events(10_001, &[("job", Priority::Normal); 5]))
            .await
            .expect("append");
        let selection = Selection {
            types: vec![TypePattern::parse("*").expect("pattern")],
            ..Selection::default()
        };
        let mut read = ReadQuery {
            tenant: "t".into(),
            types: selection.types.clone(),
            priority: Some(Priority::Normal),
            limit: 64,
            ..ReadQuery::default()
        };
        let mut pages = 0;
        let found = loop {
            let page = store.read(&read).await.expect("read");
            pages += 1;
            assert!(page.scanned_to > read.after, "a read moves on");
            assert!(
                page.scanned_to <= read.after + span,
                "a read looks at {span} sequences at most"
            );
            if !page.events.is_empty() {
                assert!(!page.exhausted || page.scanned_to >= 10_001);
                break page;
            }
            assert!(!page.exhausted, "events past the span may still match");
            read.after = page.scanned_to;
        };
        let ids: Vec<&str> = found.events.iter().map(|e| e.event.id.as_str()).collect();
        assert_eq!(ids, ["e10000"], "tenant u's events are not tenant t's");
        assert_eq!(pages as u64, 10_000 / span + 1);
        // the rest of the history holds nothing more for tenant t at this level
        read.after = found.scanned_to;
        let rest = store.read(&read).await.expect("read");
        assert!(rest.events.is_empty() && rest.exhausted, "{rest:?}");
        // the lag of a group over the pattern, at each level from the start
        let lag = |after: [u64; 4]| {
            let store = store.clone();
            let selection = selection.clone();
            async move {
                store
                    .count_after("t", after, &selection)
                    .await
                    .expect("count")
            }
        };
        assert_eq!(lag([0; 4]).await, 10_001);
        // the normal level alone (levels run critical, high, normal, low)
        assert_eq!(lag([u64::MAX, u64::MAX, 0, u64::MAX]).await, 1);
        assert_eq!(lag([u64::MAX, u64::MAX, 10_001, u64::MAX]).await, 0);
        assert_eq!(lag([u64::MAX, 9_000, u64::MAX, u64::MAX]).await, 1_000);
    }

    #[tokio::test]
    async fn a_time_is_found_by_halving_the_primary_key() {
        // correctness on both stores: tests/e2e/store_conformance.rs; here, that a lookup seeks
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("times.db");
        let store = SqliteStore::started(&path).await;
        // 200 commits of 50 events: each commit's events share one recorded time
        for commit in 0..200 {
            let kinds = vec![("job", Priority::Normal); 50];
            store
                .append("t", new_events(commit * 50, &kinds))
                .await
                .expect("append");
        }
        let middle = store.read_all(5_000, 1).await.expect("read")[0].clone();
        let conn = open_rusqlite(&path).expect("connection");
        let mut lookup = conn
            .prepare(super::super::SEQUENCE_BEFORE_SQL)
            .expect("prepare");
        let seq: i64 = lookup
            .query_row([to_ns(middle.recorded_at) + 1], |row| row.get(0))
            .expect("lookup");
        assert_eq!(
            seq, 5_050,
            "one nanosecond after the commit of events 5,001-5,050"
        );
        // a scan of the times would visit all 10,000 events (60,019 steps for the query that used
        // the recorded-time index, without it)
        let steps = lookup.get_status(rusqlite::StatementStatus::VmStep);
        assert!(
            steps < 2_000,
            "{steps} virtual machine steps for one lookup"
        );
    }

    #[tokio::test]
    async fn a_lookup_by_id_alone_seeks_the_key_under_each_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = SqliteDb::open(&dir.path().join("find.db"))
            .await
            .expect("open");
        let steps: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {FIND_IN_EVERY_SOURCE}"
        )))
        .bind("t")
        .bind("id")
        .bind(i64::MAX)
        .fetch_all(&db.pool)
        .await
        .expect("explain")
        .iter()
        .map(|row| row.try_get("detail").expect("detail"))
        .collect();
        let plan = steps.join("\n");
        // the bad plan read every event of the tenant: `SEARCH events USING INDEX ... (tenant=?)`
        for step in &steps {
            let seeks_key = step.contains("INDEX events_key (tenant=?")
                || step.starts_with("SCAN sources")
                || step.starts_with("MATERIALIZE")
                || !step.contains("events");
            assert!(
                seeks_key,
                "a step that does not seek events_key: {step}\n{plan}"
            );
        }
        assert!(
            // the committed head bounds the key's rows by sequence (`rowid`)
            plan.contains("INDEX events_key (tenant=? AND source=? AND id=?"),
            "the id is not looked up under each source in\n{plan}"
        );
    }

    #[tokio::test]
    async fn a_lag_of_literal_types_counts_their_index_ranges_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::started(&dir.path().join("lag.db")).await;
        // 60 events: "a" at every level in turn, "b" at every other level, "c" in between
        let kinds: Vec<(&str, Priority)> = (0..60)
            .map(|i| match i % 3 {
                0 => ("a", Priority::ALL[(i / 3) % 4]),
                1 => ("b", Priority::ALL[(i / 3) % 2 * 2]),
                _ => ("c", Priority::Normal),
            })
            .collect();
        store
            .append("t", new_events(0, &kinds))
            .await
            .expect("append");
        let selection = |types: &[&str]| Selection {
            types: types
                .iter()
                .map(|t| TypePattern::parse(t).expect("pattern"))
                .collect(),
            filter: None,
        };
        // the most literal types a selection may hold, and a level not covered (u64::MAX)
        let mut most: Vec<String> = vec!["b".into(), "a".into()];
        most.extend((2..crate::api::convert::MAX_TYPE_PATTERNS).map(|i| format!("other{i}")));
        let most: Vec<&str> = most.iter().map(String::as_str).collect();
        for after in [
            [0; 4],
            [7, 20, 33, 58],
            [59; 4],
            [0, u64::MAX, 30, u64::MAX],
        ] {
            for types in [&["a"][..], &["a", "b", "a"], &most] {
                // counted by hand: events of the types at each level after that level's position
                let expected = kinds
                    .iter()
                    .enumerate()
                    .filter(|(seq0, (t, level))| {
                        let index = Priority::ALL.iter().position(|l| l == level);
                        let after = after[index.expect("a level")];
                        types.contains(t) && after != u64::MAX && *seq0 as u64 + 1 > after
                    })
                    .count() as u64;
                let counted = store
                    .count_after("t", after, &selection(types))
                    .await
                    .expect("count");
                assert_eq!(counted, expected, "{} types after {after:?}", types.len());
            }
        }
        // each type and level is one range of events_type_priority, not a scan of the positions
        let mut sql = QueryBuilder::<Sqlite>::new("EXPLAIN QUERY PLAN ");
        literal_count(&mut sql, "t", &["a", "b"], [0; 4], 60);
        let steps = sql
            .build()
            .fetch_all(&store.db().pool)
            .await
            .expect("explain");
        let searches: Vec<String> = steps
            .iter()
            .map(|row| row.try_get("detail").expect("detail"))
            .filter(|step: &String| step.contains("events"))
            .collect();
        assert_eq!(searches.len(), 8, "{searches:?}");
        for search in searches {
            assert!(
                // the range ends at the committed head
                search.contains("COVERING INDEX events_type_priority (tenant=? AND type=? AND priority=? AND seq>? AND seq<?)"),
                "{search}"
            );
        }
    }

    #[tokio::test]
    async fn page_reads_search_the_range_of_positions_through_an_index() {
        // a fresh database has no statistics, as every store has until it is analyzed
        let dir = tempfile::tempdir().expect("tempdir");
        let db = SqliteDb::open(&dir.path().join("plan.db"))
            .await
            .expect("open");
        for (what, query, index) in [
            ("every type", query(&[], None), "USING INTEGER PRIMARY KEY"),
            (
                "patterns",
                query(&["a.*", "b.>"], None),
                "USING INTEGER PRIMARY KEY",
            ),
            (
                "literal types, one range per priority level",
                query(&["a.b", "c.d"], None),
                "COVERING INDEX events_type_priority (",
            ),
            (
                "literal types at one priority, as a group claims them",
                query(&["a.b", "c.d"], Some(Priority::High)),
                "COVERING INDEX events_type_priority (",
            ),
            (
                "one priority but normal, through the index of those levels",
                query(&[], Some(Priority::High)),
                "INDEX events_priority_not_normal (",
            ),
            (
                "patterns at one priority but normal",
                query(&["a.*"], Some(Priority::Low)),
                "INDEX events_priority_not_normal (",
            ),
            (
                "the normal priority, which has no index of its own",
                query(&[], Some(Priority::Normal)),
                "USING INTEGER PRIMARY KEY",
            ),
            (
                "patterns at the normal priority",
                query(&["a.*"], Some(Priority::Normal)),
                "USING INTEGER PRIMARY KEY",
            ),
            (
                "literal types at the normal priority",
                query(&["a.b"], Some(Priority::Normal)),
                "COVERING INDEX events_type_priority (",
            ),
            (
                "a correlation id at the normal priority",
                ReadQuery {
                    correlation_id: Some("c".into()),
                    ..query(&[], Some(Priority::Normal))
                },
                "INDEX events_correlation (",
            ),
            (
                "a source at one priority but normal",
                ReadQuery {
                    source: Some("s".into()),
                    ..query(&[], Some(Priority::High))
                },
                "INDEX events_priority_not_normal (",
            ),
        ] {
            let plan = plan(&db, &query).await;
            let (page, groups) = plan
                .split_once("CORRELATED SCALAR SUBQUERY")
                .unwrap_or_else(|| panic!("{what}: no per-group subquery in\n{plan}"));
            // the bad plan: `SEARCH events USING INDEX events_type_priority (tenant=?)`, or any index
            // that starts with the tenant, then every match after the position sorted before the limit
            // applies
            let searches: Vec<&str> = page
                .lines()
                .filter(|step| step.starts_with("SEARCH events"))
                .collect();
            assert!(!searches.is_empty(), "{what}: no index search in\n{plan}");
            for search in searches {
                assert!(
                    search.contains(index)
                        && (search.contains("rowid>? AND rowid<?")
                            || search.contains("seq>? AND seq<?")),
                    "{what}: expected {index} over the range of positions in\n{plan}"
                );
            }
            // each group of at most 64 positions is read along the primary key, not event by event
            // through an index
            let group_searches: Vec<&str> = groups
                .lines()
                .filter(|step| step.starts_with("SEARCH events"))
                .collect();
            assert!(
                !group_searches.is_empty()
                    && group_searches.iter().all(
                        |step| step.contains("USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)")
                    ),
                "{what}: expected the primary key's range for each group in\n{plan}"
            );
            // the groups come in order from their grouping: a sort after it would copy every
            // event's bytes through SQLite's sorter
            assert!(
                !groups.contains("TEMP B-TREE"),
                "{what}: the groups are sorted again, with their events, in\n{plan}"
            );
        }
    }

    #[tokio::test]
    async fn counts_of_one_level_search_the_range_of_positions() {
        // a fresh database has no statistics, as every store has until it is analyzed
        let dir = tempfile::tempdir().expect("tempdir");
        let db = SqliteDb::open(&dir.path().join("count.db"))
            .await
            .expect("open");
        let migration = include_str!("../../migrations/sqlite/0006_events_priority_not_normal.sql");
        assert!(
            migration.contains(&format!("WHERE {NOT_NORMAL_PRIORITY};"))
                && NOT_NORMAL_PRIORITY.ends_with(&Priority::Normal.as_i64().to_string()),
            "the reads repeat the index's condition as the migration wrote it"
        );
        for level in Priority::ALL {
            let sql = level_count_sql(level);
            let index = if level == Priority::Normal {
                // one range per type of the tenant
                "COVERING INDEX events_type_priority (tenant=? AND type=? AND priority=? AND seq>? AND seq<?)"
            } else {
                assert!(sql.contains(NOT_NORMAL_PRIORITY), "{sql}");
                "INDEX events_priority_not_normal (tenant=? AND priority=? AND seq>? AND seq<?)"
            };
            let steps = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .bind("t")
                .bind(level.as_i64())
                .bind(10_i64)
                .bind(5000_i64)
                .fetch_all(&db.pool)
                .await
                .expect("explain");
            let plan: Vec<String> = steps
                .iter()
                .map(|row| row.try_get("detail").expect("detail"))
                .collect();
            assert!(
                plan.iter()
                    .any(|step| step.starts_with("SEARCH") && step.contains(index))
                    && !plan.iter().any(|step| step.starts_with("SCAN")),
                "{level:?}: expected {index}, and no scan, in {plan:?}"
            );
        }
    }
}
