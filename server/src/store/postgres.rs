//! The production event store on Postgres: pooled connections, embedded migrations applied under
//! sqlx's advisory lock, group commit, and commit notifications for the other replicas.

use std::{str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{
    Connection, PgConnection, Postgres, QueryBuilder, Row,
    postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow},
};
use tokio::sync::watch;
use tracing::warn;

use super::{
    Appended, AuditPruned, AuditQuery, AuditRecord, DeadLetter, EventStore, EventTypeStats,
    NewEvent, PageFill, Publisher, Queued, ReadPage, ReadQuery, StoreError, StoreResult,
    audit_limit,
    commit::{self, Attempt, BatchWriter, CommitRequest, Committed, NewRow, RecentCommits},
    literal_types,
    sqlite::{from_ns, map_err, seq_i64, to_ns},
};
use crate::{
    event::{Priority, Selection, StoredEvent},
    retry::Backoff,
};

/// Channel other replicas LISTEN on (suffixed with the schema); the payload is the new head sequence.
const COMMIT_CHANNEL: &str = "nerve_commits";
/// Longest a commit waits for a connection, and a probe of an unavailable database for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the writer's connection may go unused before a commit checks it first (one round trip):
/// the database, a pooler or a NAT may have closed it meanwhile, and the commit would then fail
/// (UNAVAILABLE) or wait out the commit timeout, though the database answers.
const WRITER_IDLE_CHECK: Duration = Duration::from_secs(1);
/// Longest one commit may take before its connection is given up on. The writer's connection is kept
/// from commit to commit, so a database that stops answering without closing it (a network partition)
/// would otherwise hold every publish until TCP gives up.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns [`decode`] reads: event reads fetch only these, not the key, indexed and hash columns.
/// Events committed before migration 0004 have their JSON in `body`; [`super::body::decode`] reads both.
macro_rules! event_columns {
    () => {
        "seq, tenant, recorded_ns, coalesce(body_binary, convert_to(body, 'UTF8')) AS body"
    };
}

fn decode(row: &PgRow) -> StoreResult<StoredEvent> {
    Ok(StoredEvent {
        tenant: row.try_get("tenant").map_err(map_err)?,
        sequence: row.try_get::<i64, _>("seq").map_err(map_err)? as u64,
        recorded_at: from_ns(row.try_get("recorded_ns").map_err(map_err)?),
        event: super::decode_body(row.try_get::<&[u8], _>("body").map_err(map_err)?)?,
    })
}

fn decode_publisher(row: &PgRow) -> StoreResult<Publisher> {
    Ok(Publisher {
        tenant: row.try_get("tenant").map_err(map_err)?,
        principal: row.try_get("principal").map_err(map_err)?,
        types: row.try_get("types").map_err(map_err)?,
        sources: row.try_get("sources").map_err(map_err)?,
        description: row.try_get("description").map_err(map_err)?,
        updated_at: from_ns(row.try_get("updated_ns").map_err(map_err)?),
    })
}

fn decode_dead_letter(row: &PgRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        tenant: row.try_get("tenant").map_err(map_err)?,
        group: row.try_get("grp").map_err(map_err)?,
        sequence: row.try_get::<i64, _>("seq").map_err(map_err)? as u64,
        attempts: row.try_get::<i32, _>("attempts").map_err(map_err)? as u32,
        reason: row.try_get("reason").map_err(map_err)?,
        dead_lettered_at: from_ns(row.try_get("dead_ns").map_err(map_err)?),
    })
}

/// Binds a dead letter as `$1` to `$6`: tenant, group, sequence, attempts, reason, time.
fn bind_dead_letter<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    dl: &'q DeadLetter,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(&dl.tenant)
        .bind(&dl.group)
        .bind(seq_i64(dl.sequence))
        .bind(dl.attempts as i32)
        .bind(&dl.reason)
        .bind(super::sqlite::to_ns(dl.dead_lettered_at))
}

fn decode_audit(row: &PgRow) -> StoreResult<AuditRecord> {
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

/// The Postgres event store.
pub struct PostgresStore {
    pool: PgPool,
    commits: commit::CommitQueue,
    committed: watch::Receiver<u64>,
    /// Raised by [`EventStore::head`] as well: a head read from the database is committed.
    committed_tx: watch::Sender<u64>,
    recent: Arc<RecentCommits>,
    went_back: WentBack,
}

/// Set once the database's head is found below one this store saw committed: the database went back
/// (restored to an earlier point, or failed over to a standby that had not received the last
/// commits). Events after that point, delivered already, are gone from it, and the next commits
/// would be numbered with their sequences again: subscribers that resume after those would skip the
/// new events, and the relay to Redis would take them for added. So from then on the store refuses
/// commits and its health check fails, saying so; a replica started on such a database refuses to
/// start (`RedisStreams::start`).
#[derive(Clone, Default)]
struct WentBack(Arc<std::sync::OnceLock<String>>);

impl WentBack {
    /// Records the going back when `head`, read from the database, is below `seen`.
    fn check(&self, seen: u64, head: u64) {
        if head < seen {
            self.0.get_or_init(|| {
                let why = format!(
                    "the event store went back from sequence {seen} to {head} (restored, or failed \
                     over to a standby that missed commits): events after {head} were delivered and \
                     are gone from it, and new ones would reuse their sequences. Commits are refused; \
                     clear this deployment's Redis keys (redis.key_prefix) and restart the replicas \
                     to serve the store as it is"
                );
                tracing::error!("{why}");
                why
            });
        }
    }

    /// UNAVAILABLE, saying why, once the store went back.
    fn refused(&self) -> StoreResult<()> {
        match self.0.get() {
            Some(why) => Err(StoreError::Unavailable(why.clone())),
            None => Ok(()),
        }
    }
}

impl PostgresStore {
    /// The connection pool, for the Redis backend's group bookkeeping.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Lists a tenant's event types with the priority levels each has used, read through `conn` (a
    /// transaction of the caller's, or the pool).
    pub(crate) async fn type_levels<'c>(
        conn: impl sqlx::PgExecutor<'c>,
        tenant: &str,
    ) -> StoreResult<Vec<(String, Vec<Priority>)>> {
        let rows = sqlx::query("SELECT type, levels FROM event_types WHERE tenant = $1")
            .bind(tenant)
            .fetch_all(conn)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let levels: i16 = row.try_get("levels").map_err(map_err)?;
                let used = Priority::ALL
                    .into_iter()
                    .filter(|p| levels & commit::level_bit(p.as_i64() as i16) != 0)
                    .collect();
                Ok((row.try_get("type").map_err(map_err)?, used))
            })
            .collect()
    }

    /// The last sequence at or below `at_most` of each (tenant, type, priority), if it has one: what
    /// the Redis stream of each must hold before anything after `at_most` is added to it.
    pub(crate) async fn stream_ends(
        &self,
        streams: &[(&str, &str, i16)],
        at_most: u64,
    ) -> StoreResult<Vec<Option<u64>>> {
        let tenants: Vec<&str> = streams.iter().map(|s| s.0).collect();
        let types: Vec<&str> = streams.iter().map(|s| s.1).collect();
        let priorities: Vec<i16> = streams.iter().map(|s| s.2).collect();
        let level_bits: Vec<i16> = priorities.iter().map(|&p| commit::level_bit(p)).collect();
        let rows: Vec<(i64, Option<i64>)> = sqlx::query_as(STREAM_ENDS)
            .bind(&tenants)
            .bind(&types)
            .bind(&priorities)
            .bind(seq_i64(at_most))
            .bind(&level_bits)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        // a stream without a row has no event up to `at_most`
        let mut ends = vec![None; streams.len()];
        for (i, end) in rows {
            if let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| ends.get_mut(i)) {
                *slot = end.map(|e| e as u64);
            }
        }
        Ok(ends)
    }

    /// Connects, applies the migrations and starts the group-commit writer and the commit listener.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Arc<Self>> {
        let options = connect_options(url).await?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("connecting to postgres: {e}")))?;
        writable(&pool).await?;
        sqlx::migrate!("server/migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrating postgres: {e}")))?;
        let head: i64 = sqlx::query_scalar("SELECT seq FROM nerve_sequence")
            .fetch_one(&pool)
            .await
            .map_err(map_err)?;
        // deployments sharing a database in different schemas must not hear each other's commits
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await
            .map_err(map_err)?;
        let channel = commit_channel(&schema);
        let (committed_tx, committed) = watch::channel(head as u64);
        let went_back = WentBack::default();
        tokio::spawn(listen_for_commits(
            pool.clone(),
            channel.clone(),
            committed_tx.clone(),
            went_back.clone(),
        ));
        let recent = Arc::new(RecentCommits::default());
        let commits = commit::start(
            PostgresWriter {
                options: writer_options(options),
                conn: None,
                used: std::time::Instant::now(),
                channel,
                went_back: went_back.clone(),
            },
            committed_tx.clone(),
            recent.clone(),
        )?;
        Ok(Arc::new(PostgresStore {
            pool,
            commits,
            committed,
            committed_tx,
            recent,
            went_back,
        }))
    }
}

/// Fails UNAVAILABLE, saying why, when the database takes no writes: a standby (a failover left the
/// address on the old primary, or a read replica was given), or `default_transaction_read_only`.
/// Every commit would fail there, so the server must not start on it, and health says so.
async fn writable<'c>(conn: impl sqlx::PgExecutor<'c>) -> StoreResult<()> {
    let read_only: String = sqlx::query_scalar("SELECT current_setting('transaction_read_only')")
        .fetch_one(conn)
        .await
        .map_err(map_err)?;
    if read_only == "on" {
        return Err(StoreError::Unavailable(
            "postgres is read-only (a standby, or default_transaction_read_only): commits need the primary"
                .into(),
        ));
    }
    Ok(())
}

/// The channel of a schema's commit notifications: `nerve_commits_<schema>`, or for a schema name too
/// long for that (channel names have at most 63 bytes; `pg_notify` refuses longer ones, which failed
/// every commit, while LISTEN cuts them short) a hash of it in its place.
fn commit_channel(schema: &str) -> String {
    let channel = format!("{COMMIT_CHANNEL}_{schema}");
    if channel.len() <= 63 {
        return channel;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(schema.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{COMMIT_CHANNEL}_{hex}")
}

/// The options of every connection of the store: the URL's, with `synchronous_commit` pinned to the
/// value the database gives this server now, or `on` where that is `off` (a common tuning, under
/// which COMMIT answers before the WAL is flushed, so a publish, a dead letter or a registry change
/// would be answered before it is durable). Pinned, a later `ALTER ROLE ... SET` or reload does not
/// turn it off under a running server. Warns about either, and about `fsync=off`, which cannot be
/// undone per connection.
async fn connect_options(url: &str) -> StoreResult<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Unavailable(format!("connecting to postgres: {e}")))?;
    // bounded as the pool's first connection is: a store that takes the connection and never
    // answers fails the start instead of holding it
    let read = async {
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("connecting to postgres: {e}")))?;
        let settings: (String, String) = sqlx::query_as(
            "SELECT current_setting('synchronous_commit'), current_setting('fsync')",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(map_err)?;
        let _ = conn.close().await;
        Ok::<_, StoreError>(settings)
    };
    let (sync, fsync) = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| {
            StoreError::Unavailable("connecting to postgres: no answer within 5s".into())
        })??;
    if fsync == "off" {
        warn!(
            "postgres runs with fsync=off: a crash of its host can lose events it has acknowledged"
        );
    }
    let sync = if sync == "off" {
        warn!(
            "postgres has synchronous_commit=off for this server's connections; they set it on, so \
             that nothing is answered before it is durable"
        );
        "on".to_owned()
    } else {
        sync
    };
    Ok(options.options([("synchronous_commit", sync)]))
}

/// Where the group-commit writer connects: the store's connection options ([`connect_options`]) with
/// the settings its commit statement needs.
fn writer_options(options: PgConnectOptions) -> PgConnectOptions {
    options.options([
        // Without statistics (a new deployment) the commit statement's estimates cross the JIT
        // threshold, and compiling it cost ~15 ms per commit; it never pays off for one commit.
        ("jit", "off"),
        // The commit statement's plan does not depend on its parameters (arrays unnested into
        // inserts, one locked row), yet Postgres' default chose a custom plan for every commit:
        // planning its five CTEs was about a quarter of the writer backend's CPU (docs/benchmarks.md,
        // cause 4). The key lookup, whose plan does depend on the table, sets the default back.
        ("plan_cache_mode", "force_generic_plan"),
        // A replica that dies or is cut off inside the key lookup's explicit transaction would
        // hold the sequence lock, and so every replica's commits, until the server's TCP
        // keepalive notices (hours); the transaction never idles this long otherwise.
        ("idle_in_transaction_session_timeout", "10s"),
    ])
}

/// How often the head is re-read whatever the commit listener heard: a connection dropped silently (an
/// idle timeout in a NAT or firewall) never reports itself, and notifications sent while the listener
/// was away are gone.
const HEAD_REREAD: Duration = Duration::from_secs(1);

/// Reads the head from the database and raises `committed` to it; returns it. A head below the one
/// watched is the database going back ([`WentBack`]).
async fn read_head(
    pool: &PgPool,
    committed: &watch::Sender<u64>,
    went_back: &WentBack,
) -> Result<u64, sqlx::Error> {
    // what was known committed before the read began: the read sees all of it (a commit raises the
    // watch once it is visible), while a commit during the read may raise the watch past what it reads
    let seen = *committed.borrow();
    let head: i64 = sqlx::query_scalar("SELECT seq FROM nerve_sequence")
        .fetch_one(pool)
        .await?;
    went_back.check(seen, head as u64);
    commit::advance(committed, head as u64);
    Ok(head as u64)
}

/// Follows other replicas' commits; after a lost connection, and every [`HEAD_REREAD`], the head is
/// re-read, so nothing is missed for long.
async fn listen_for_commits(
    pool: PgPool,
    channel: String,
    committed: watch::Sender<u64>,
    went_back: WentBack,
) {
    tokio::spawn({
        let (pool, committed, went_back) = (pool.clone(), committed.clone(), went_back.clone());
        async move {
            let mut reread = tokio::time::interval(HEAD_REREAD);
            reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !committed.is_closed() {
                reread.tick().await;
                // a failure shows in the listener's log and the health checks
                let _ = read_head(&pool, &committed, &went_back).await;
            }
        }
    });
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let session = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            read_head(&pool, &committed, &went_back).await?;
            loop {
                match listener.try_recv().await? {
                    Some(note) => {
                        if let Ok(head) = note.payload().parse::<u64>() {
                            commit::advance(&committed, head);
                        }
                    }
                    // the connection was lost (the next call reconnects), and with it whatever
                    // was sent meanwhile
                    None => {
                        read_head(&pool, &committed, &went_back).await?;
                    }
                }
            }
            #[expect(unreachable_code, reason = "names the error type of the async block")]
            Ok::<(), sqlx::Error>(())
        };
        if let Err(error) = session.await {
            if committed.is_closed() {
                return;
            }
            let wait = backoff.next_wait();
            warn!(%error, retry_in = ?wait, "commit listener lost its connection");
            tokio::time::sleep(wait).await;
        }
    }
}

struct PostgresWriter {
    /// Where the writer connects.
    options: PgConnectOptions,
    /// The writer's own connection, kept from commit to commit (a pool pings a connection when it hands
    /// it out and again when it comes back: two more round trips per commit); `None` after a failure,
    /// until the next commit connects again. A commit never queues behind readers for it, so failing
    /// to connect means the database is unreachable, not busy.
    conn: Option<PgConnection>,
    /// When the connection last finished a commit.
    used: std::time::Instant,
    channel: String,
    went_back: WentBack,
}

impl PostgresWriter {
    /// A new connection, or UNAVAILABLE at once when the database does not take one.
    async fn connect(&self) -> StoreResult<PgConnection> {
        tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect_with(&self.options))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!("no database connection within {PROBE_TIMEOUT:?}"))
            })?
            .map_err(map_err)
    }
}

impl BatchWriter for PostgresWriter {
    fn probe(&self) -> impl std::future::Future<Output = StoreResult<()>> + Send + 'static {
        let options = self.options.clone();
        let went_back = self.went_back.clone();
        async move {
            went_back.refused()?;
            // answered, and by a database that takes writes: a standby answers too
            let answer = async {
                let mut conn = PgConnection::connect_with(&options)
                    .await
                    .map_err(map_err)?;
                writable(&mut conn).await?;
                conn.close().await.map_err(map_err)
            };
            tokio::time::timeout(PROBE_TIMEOUT, answer)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(format!(
                        "no answer within {PROBE_TIMEOUT:?}"
                    )))
                })
        }
    }

    async fn attempt(
        &mut self,
        batch: &[CommitRequest],
        look_up_keys: bool,
    ) -> Result<Committed, Attempt> {
        self.went_back.refused()?;
        let mut conn = match self.conn.take() {
            Some(mut conn) if self.used.elapsed() >= WRITER_IDLE_CHECK => {
                match tokio::time::timeout(PROBE_TIMEOUT, conn.ping()).await {
                    Ok(Ok(())) => conn,
                    _ => {
                        warn!("the commit connection went away while unused; connecting again");
                        self.connect().await?
                    }
                }
            }
            Some(conn) => conn,
            // fail fast when the database is gone rather than wait out connection attempts
            None => self.connect().await?,
        };
        let written = tokio::time::timeout(
            COMMIT_TIMEOUT,
            write_batch(&mut conn, batch, look_up_keys, &self.channel),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Attempt::Failed(StoreError::Unavailable(format!(
                "the database did not finish a commit within {COMMIT_TIMEOUT:?}, and may still \
                 finish it: publish again with the same event ids, which are answered with their \
                 sequences if it did"
            ))))
        });
        // After a failure the connection may be broken, or still inside the transaction: dropping it
        // ends both. Not always before the commit: a backend waiting (for the sequence lock) with the
        // whole statement sent does not see the socket close, and commits when the wait ends.
        if !matches!(written, Err(Attempt::Failed(_))) {
            self.conn = Some(conn);
        }
        self.used = std::time::Instant::now();
        written
    }
}

/// Writes the batch (see [`BatchWriter::attempt`]). Without the key lookup, the commit is one
/// statement in a transaction of its own ([`insert_rows`]: it takes the sequence lock, numbers the rows
/// from the head it finds, and commits): one round trip. With the lookup, the transaction is explicit:
/// `BEGIN` with the sequence lock, the lookup, the same statement, `COMMIT`.
async fn write_batch(
    conn: &mut PgConnection,
    batch: &[CommitRequest],
    look_up_keys: bool,
    channel: &str,
) -> Result<Committed, Attempt> {
    commit_jitter().await;
    if !look_up_keys {
        // numbered from 0: the statement adds the head it locks
        let plan = commit::plan(batch, commit::Known::new(), 0);
        if plan.rows.is_empty() {
            return Ok(Committed {
                results: plan.results,
                recorded_ns: 0,
            });
        }
        let (head, recorded_ns) = match insert_rows(conn, &plan.rows, 0, channel).await {
            Ok(written) => written,
            // the statement's transaction is rolled back with it, the sequence lock released
            Err(sqlx::Error::Database(e)) if e.constraint() == Some("events_key") => {
                return Err(Attempt::KeyStored);
            }
            Err(e) => return Err(map_err(e).into()),
        };
        let offset = |appended: Vec<Appended>| {
            appended
                .into_iter()
                .map(|a| Appended {
                    sequence: a.sequence + head as u64,
                    ..a
                })
                .collect()
        };
        return Ok(Committed {
            results: plan.results.into_iter().map(|r| r.map(offset)).collect(),
            recorded_ns,
        });
    }
    // One round trip (simple query protocol). The row lock orders whole transactions across replicas:
    // sequence order is commit order.
    let locked = sqlx::raw_sql(
        "BEGIN; SET LOCAL plan_cache_mode = auto; SELECT seq FROM nerve_sequence FOR UPDATE",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(map_err)?;
    let head: i64 = locked
        .first()
        .ok_or_else(|| StoreError::Internal("the nerve_sequence row is missing".into()))?
        .try_get("seq")
        .map_err(map_err)?;
    let known = stored_keys(conn, batch).await?;
    let plan = commit::plan(batch, known, head);
    let mut recorded_ns = 0;
    if !plan.rows.is_empty() {
        match insert_rows(conn, &plan.rows, head, channel).await {
            Ok((_, now_ns)) => recorded_ns = now_ns,
            Err(sqlx::Error::Database(e)) if e.constraint() == Some("events_key") => {
                // before the next attempt: the sequence lock goes with the transaction
                sqlx::raw_sql("ROLLBACK")
                    .execute(&mut *conn)
                    .await
                    .map_err(map_err)?;
                return Err(Attempt::KeyStored);
            }
            Err(e) => return Err(map_err(e).into()),
        }
    }
    commit_jitter().await;
    sqlx::raw_sql("COMMIT")
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    Ok(Committed {
        results: plan.results,
        recorded_ns,
    })
}

/// The rows already stored under the batch's keys.
async fn stored_keys(
    conn: &mut PgConnection,
    batch: &[CommitRequest],
) -> StoreResult<commit::Known> {
    let (tenants, sources, ids): (Vec<&str>, Vec<&str>, Vec<&str>) = commit::keys(batch)
        .into_iter()
        .fold((vec![], vec![], vec![]), |mut acc, (t, s, i)| {
            acc.0.push(t);
            acc.1.push(s);
            acc.2.push(i);
            acc
        });
    // Planned for each call (unnamed statement), with the table's size at that moment: a plan cached
    // while the table was small (a new deployment) stays a hash join over a sequential scan of every
    // stored event as the table grows (46 ms per 100 keys at 100,000 events, against 1.2 ms with the
    // unique index, EXPLAIN ANALYZE).
    let existing_rows = sqlx::query(
        "SELECT e.tenant, e.source, e.id, e.seq, e.content_hash FROM events e \
         JOIN UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS k(tenant, source, id) \
         ON e.tenant = k.tenant AND e.source = k.source AND e.id = k.id",
    )
    .persistent(false)
    .bind(&tenants)
    .bind(&sources)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(map_err)?;
    let mut known = commit::Known::new();
    for row in existing_rows {
        known.insert(
            (
                row.try_get("tenant").map_err(map_err)?,
                row.try_get("source").map_err(map_err)?,
                row.try_get("id").map_err(map_err)?,
            ),
            (
                row.try_get::<i64, _>("seq").map_err(map_err)? as u64,
                row.try_get("content_hash").map_err(map_err)?,
            ),
        );
    }
    Ok(known)
}

/// Test-only fault (debug builds, NERVE_TEST_FAULT=commit-jitter): random delays inside each commit, so
/// transactions of several replicas begin and finish in shuffled order.
async fn commit_jitter() {
    #[cfg(debug_assertions)]
    if std::env::var("NERVE_TEST_FAULT").as_deref() == Ok("commit-jitter") {
        let micros = (uuid::Uuid::new_v4().as_u128() % 3_000) as u64;
        tokio::time::sleep(Duration::from_micros(micros)).await;
    }
}

/// Inserts the rows, updates the per-type statistics and the head, and notifies the other replicas, in
/// one statement; returns the head it found and the recorded time of the rows (ns since the epoch). It
/// locks the sequence row itself, and takes the time once it holds the row (a locking scan computes its
/// columns before it waits for the lock, so the time is read from the locked row's materialized
/// result): a time lookup that waits for the row then counts every commit stamped before it. The
/// rows' sequences are `head + (seq - base)`: with `base` 0 the rows are numbered from whatever head
/// it finds, with `base` the head an open transaction has locked they keep their sequences.
/// Data-modifying CTEs run whether or not the outer query reads them.
async fn insert_rows(
    conn: &mut PgConnection,
    rows: &[NewRow<'_>],
    base: i64,
    channel: &str,
) -> Result<(i64, i64), sqlx::Error> {
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq - base).collect();
    let tenants: Vec<&str> = rows.iter().map(|r| r.tenant).collect();
    let events = || rows.iter().map(|r| r.event.event());
    let sources: Vec<&str> = events().map(|e| e.source.as_str()).collect();
    let ids: Vec<&str> = events().map(|e| e.id.as_str()).collect();
    let types: Vec<&str> = events().map(|e| e.event_type.as_str()).collect();
    let subjects: Vec<Option<&str>> = events().map(|e| e.subject.as_deref()).collect();
    let correlations: Vec<Option<&str>> = events().map(|e| e.correlation_id.as_deref()).collect();
    let priorities: Vec<i16> = rows.iter().map(|r| r.priority() as i16).collect();
    let hashes: Vec<&[u8]> = rows.iter().map(|r| &r.event.content_hash()[..]).collect();
    let bodies: Vec<&[u8]> = rows.iter().map(|r| r.event.body()).collect();
    let stats = commit::type_stats(rows);
    let last = rows.last().map_or(0, |r| r.seq - base);
    let row = sqlx::query(
        "WITH locked AS MATERIALIZED (SELECT seq, recorded_ns FROM nerve_sequence FOR UPDATE), \
         lock AS (SELECT seq AS head, \
           GREATEST(recorded_ns, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT * 1000) AS now_ns \
           FROM locked), \
         ins AS (INSERT INTO events (seq, tenant, source, id, type, subject, correlation_id, priority, recorded_ns, content_hash, body_binary) \
           SELECT lock.head + s, t, so, i, ty, su, c, p, lock.now_ns, h, b FROM lock, UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], \
           $6::TEXT[], $7::TEXT[], $8::SMALLINT[], $9::BYTEA[], $10::BYTEA[]) AS x(s, t, so, i, ty, su, c, p, h, b)), \
         stats AS (INSERT INTO event_types (tenant, type, count, first_seq, last_seq, last_recorded_ns, levels) \
           SELECT t, ty, n, lock.head + f, lock.head + l, lock.now_ns, lv FROM lock, \
           UNNEST($11::TEXT[], $12::TEXT[], $13::BIGINT[], $14::BIGINT[], $15::BIGINT[], $16::SMALLINT[]) AS x(t, ty, n, f, l, lv) \
           ON CONFLICT (tenant, type) DO UPDATE SET count = event_types.count + excluded.count, \
           last_seq = excluded.last_seq, last_recorded_ns = excluded.last_recorded_ns, \
           levels = event_types.levels | excluded.levels), \
         firsts AS (INSERT INTO event_type_levels (tenant, type, level, first_seq) \
           SELECT x.t, x.ty, v.level, lock.head + v.f FROM lock, \
           UNNEST($11::TEXT[], $12::TEXT[], $19::BIGINT[], $20::BIGINT[], $21::BIGINT[], $22::BIGINT[]) AS x(t, ty, f1, f2, f3, f4), \
           LATERAL (VALUES (1::SMALLINT, x.f1), (2::SMALLINT, x.f2), (3::SMALLINT, x.f3), (4::SMALLINT, x.f4)) AS v(level, f) \
           WHERE v.f IS NOT NULL AND NOT EXISTS (SELECT 1 FROM event_types o WHERE o.tenant = x.t AND o.type = x.ty \
             AND o.levels & (1::SMALLINT << (v.level - 1)) <> 0) \
           ON CONFLICT DO NOTHING), \
         head AS (UPDATE nerve_sequence SET seq = lock.head + $17, recorded_ns = lock.now_ns FROM lock), \
         notify AS (SELECT pg_notify($18, (lock.head + $17)::TEXT) FROM lock) \
         SELECT lock.head, lock.now_ns FROM lock, notify",
    )
    .bind(&seqs)
    .bind(&tenants)
    .bind(&sources)
    .bind(&ids)
    .bind(&types)
    .bind(&subjects)
    .bind(&correlations)
    .bind(&priorities)
    .bind(&hashes)
    .bind(&bodies)
    .bind(stats.iter().map(|s| s.tenant).collect::<Vec<_>>())
    .bind(stats.iter().map(|s| s.event_type).collect::<Vec<_>>())
    .bind(stats.iter().map(|s| s.count).collect::<Vec<_>>())
    .bind(stats.iter().map(|s| s.first_seq - base).collect::<Vec<_>>())
    .bind(stats.iter().map(|s| s.last_seq - base).collect::<Vec<_>>())
    .bind(stats.iter().map(|s| s.levels).collect::<Vec<_>>())
    .bind(last)
    .bind(channel)
    .bind(level_firsts(&stats, 0, base))
    .bind(level_firsts(&stats, 1, base))
    .bind(level_firsts(&stats, 2, base))
    .bind(level_firsts(&stats, 3, base))
    .fetch_one(&mut *conn)
    .await?;
    Ok((row.try_get("head")?, row.try_get("now_ns")?))
}

/// The first sequence of priority level `index + 1` in each statistics row, relative to `base`.
fn level_firsts(stats: &[commit::TypeStats], index: usize, base: i64) -> Vec<Option<i64>> {
    stats
        .iter()
        .map(|s| s.level_first_seqs[index].map(|seq| seq - base))
        .collect()
}

/// The last event up to `$4` of each stream (tenant `$1`, type `$2`, priority `$3`, whose level bit
/// is `$5`), for [`PostgresStore::stream_ends`].
///
/// A stream is not looked up when its type's statistics show no event of the type up to `$4`, none
/// of its priority, or the first of its priority after `$4` (`event_type_levels`; a level used
/// without a row there is not known, and is looked up): a walk back would read every event of the
/// type up to `$4` to find none (11.5 s for a relay step's new types in a benchmark, when the
/// planner walked the priority's 6M events instead). The others walk back by the (tenant, type, seq)
/// index to the last event of their priority; `priority + 0` keeps the planner from walking back by
/// (tenant, priority, seq) instead, which it chose without statistics.
const STREAM_ENDS: &str = "SELECT s.i, (SELECT e.seq FROM events e \
       WHERE e.tenant = s.tenant AND e.type = s.type AND e.priority + 0 = s.priority \
         AND e.seq <= $4 ORDER BY e.seq DESC LIMIT 1) \
     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::SMALLINT[], $5::SMALLINT[]) WITH ORDINALITY \
       AS s(tenant, type, priority, level_bit, i) \
     JOIN event_types t ON t.tenant = s.tenant AND t.type = s.type \
     LEFT JOIN event_type_levels l ON l.tenant = s.tenant AND l.type = s.type AND l.level = s.priority \
     WHERE t.first_seq <= $4 AND t.levels & s.level_bit <> 0 AND COALESCE(l.first_seq, 0) <= $4";

#[async_trait]
impl EventStore for PostgresStore {
    async fn queue(&self, tenant: &str, events: Vec<NewEvent>) -> StoreResult<Queued> {
        commit::queue(&self.commits, tenant, events).await
    }

    async fn read(&self, query: &ReadQuery) -> StoreResult<ReadPage> {
        // the head before the read: every event up to it is committed, so the read sees it
        let committed = *self.committed.borrow();
        let limit = query.page_limit();
        let literals = literal_types(&query.types);
        // one ordered, limited index range per literal type, merged: with `type = ANY($n)` a plan made
        // from stale statistics (a fast-growing table) reads and sorts every match after the position
        // before applying the limit (63 ms instead of 0.3 ms per 512-event page over 100,000 events).
        // A read of every type is one range per priority level of (tenant, priority, seq) for the same
        // reason: `tenant = $1` alone made the planner read the tenant's whole tail of that index and
        // sort it for each page (42 ms per 1,000-event page 25,000 events into 100,000).
        let by_level =
            literals.is_none() && query.priority.is_none() && query.correlation_id.is_none();
        let per_level: Vec<ReadQuery> = if by_level {
            Priority::ALL
                .iter()
                .map(|level| ReadQuery {
                    priority: Some(*level),
                    ..query.clone()
                })
                .collect()
        } else {
            Vec::new()
        };
        let branches: Vec<(&ReadQuery, Option<&str>)> = match &literals {
            Some(types) => types.iter().map(|t| (query, Some(*t))).collect(),
            None if by_level => per_level.iter().map(|q| (q, None)).collect(),
            None => vec![(query, None)],
        };
        let mut sql = QueryBuilder::<Postgres>::new("SELECT * FROM (");
        for (i, (branch, literal)) in branches.iter().enumerate() {
            if i > 0 {
                sql.push(" UNION ALL ");
            }
            sql.push(concat!(
                "(SELECT ",
                event_columns!(),
                " FROM events WHERE tenant = "
            ));
            super::push_read_filter(&mut sql, branch, *literal);
            sql.push(" ORDER BY seq LIMIT ")
                .push_bind(limit as i64)
                .push(")");
        }
        sql.push(") AS page ORDER BY seq LIMIT ")
            .push_bind(limit as i64);
        // planned for each call (unnamed statement), like the key lookup: the generic plan of a cached
        // statement cannot see which level or type a branch asks for, and walked the primary key with
        // a filter, reading the whole range after the position for each empty branch (757 ms per page
        // 400,000 events into 1,000,000 with three empty levels, against 1.0 ms planned for the call)
        let mut rows = sql.build().persistent(false).fetch(&self.pool);
        let mut fill = PageFill::new(query.after);
        let mut count = 0;
        while let Some(row) = rows.try_next().await.map_err(map_err)? {
            count += 1;
            let stored = decode(&row)?;
            let matches = query.types.is_empty()
                || literals.is_some()
                || query
                    .types
                    .iter()
                    .any(|t| t.matches(&stored.event.event_type));
            // the rows not taken are still sent: the pool's next use of the connection reads past them
            if !fill.take(stored, matches) {
                break;
            }
        }
        Ok(fill.finish(count >= limit, query.until, committed))
    }

    async fn read_sequences(&self, sequences: &[u64]) -> StoreResult<Vec<Arc<StoredEvent>>> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let seqs: Vec<i64> = sequences.iter().map(|s| seq_i64(*s)).collect();
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE seq = ANY($1) ORDER BY seq"
        ))
        .bind(&seqs)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(|r| decode(r).map(Arc::new)).collect()
    }

    async fn read_all(&self, after: u64, limit: usize) -> StoreResult<Vec<Arc<StoredEvent>>> {
        if let Some(events) = self.recent.read_after_settled(after, limit).await {
            return Ok(events);
        }
        // Postgres sends every row a query asks for, also those a read stopped at its bytes leaves:
        // the rows starting past READ_BYTES of stored bodies are left out in the query (their sizes
        // come from the rows' headers, without reading the bodies)
        let rows = sqlx::query(concat!(
            "SELECT seq, tenant, recorded_ns, body FROM (SELECT ",
            event_columns!(),
            ", coalesce(octet_length(body_binary), octet_length(body)) AS size, \
             sum(coalesce(octet_length(body_binary), octet_length(body))) OVER (ORDER BY seq) AS upto \
             FROM events WHERE seq > $1 ORDER BY seq LIMIT $2) feed \
             WHERE upto - size < $3 ORDER BY seq"
        ))
        .bind(seq_i64(after))
        .bind(limit as i64)
        .bind(super::READ_BYTES as i64)
        .fetch(&self.pool)
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
        let query = match source {
            Some(source) => sqlx::query(concat!(
                "SELECT ",
                event_columns!(),
                " FROM events WHERE tenant = $1 AND source = $2 AND id = $3 AND seq > $4"
            ))
            .bind(tenant)
            .bind(source)
            .bind(id)
            .bind(after as i64),
            // each source of the tenant found with one seek of events_key, then the id under it:
            // Postgres 15 does not skip over the key's leading source by itself, so a lookup by id
            // alone read every event of the tenant
            None => sqlx::query(concat!(
                "WITH RECURSIVE sources(source) AS (\
                 SELECT MIN(source) FROM events WHERE tenant = $1 \
                 UNION ALL SELECT (SELECT MIN(source) FROM events WHERE tenant = $1 AND source > sources.source) \
                 FROM sources WHERE sources.source IS NOT NULL) \
                 SELECT ",
                event_columns!(),
                " FROM sources JOIN events e ON e.tenant = $1 AND e.source = sources.source AND e.id = $2 \
                 AND e.seq > $3 ORDER BY seq LIMIT $4"
            ))
            .bind(tenant)
            .bind(id)
            .bind(after as i64)
            .bind(super::FIND_PAGE as i64),
        };
        let rows = query.fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter().map(|r| decode(r).map(Arc::new)).collect()
    }

    async fn head(&self) -> StoreResult<u64> {
        // Raised here too: a read bounds what it reports scanned by the watched head, so a reader
        // that caught up to a head the watch did not have yet (other replicas' commits, their
        // notification on its way) would read the same range again and again until it came
        read_head(&self.pool, &self.committed_tx, &self.went_back)
            .await
            .map_err(map_err)
    }

    async fn sequence_before(&self, time: DateTime<Utc>) -> StoreResult<u64> {
        // Any replica's commit in flight holds the sequence row from its recorded time until it
        // shows; taking the row (and letting go at once) waits for it, so the search below counts
        // its events, and every later commit is stamped after this moment. FOR UPDATE, not FOR
        // SHARE: a share lock may pass writers already waiting, and a stream of lookups starve them.
        sqlx::query("SELECT seq FROM nerve_sequence FOR UPDATE")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        let seq: i64 = sqlx::query_scalar(super::SEQUENCE_BEFORE_SQL)
            .bind(super::sqlite::to_ns(time))
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(seq as u64)
    }

    async fn count_after(
        &self,
        tenant: &str,
        after_by_level: [u64; 4],
        selection: &Selection,
    ) -> StoreResult<u64> {
        let mut total = 0;
        // literal types (a Redis group's stream, most groups) read their own types' index entries
        // instead of every type's after the position
        let literals = literal_types(&selection.types);
        for (level, after) in Priority::ALL.iter().zip(after_by_level) {
            if after == u64::MAX {
                continue;
            }
            let rows = sqlx::query(
                "SELECT type, COUNT(*) AS n FROM events WHERE tenant = $1 AND priority = $2 AND seq > $3 \
                 AND ($4::TEXT[] IS NULL OR type = ANY($4)) GROUP BY type",
            )
            .bind(tenant)
            .bind(level.as_i64() as i16)
            .bind(seq_i64(after))
            .bind(literals.as_deref())
            .fetch_all(&self.pool)
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
            "SELECT * FROM event_types WHERE tenant = $1 AND type COLLATE \"C\" > $2 \
             ORDER BY type COLLATE \"C\" LIMIT $3",
        )
        .bind(tenant)
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(EventTypeStats {
                    event_type: r.try_get("type").map_err(map_err)?,
                    count: r.try_get::<i64, _>("count").map_err(map_err)? as u64,
                    first_sequence: r.try_get::<i64, _>("first_seq").map_err(map_err)? as u64,
                    last_sequence: r.try_get::<i64, _>("last_seq").map_err(map_err)? as u64,
                    last_recorded_at: from_ns(r.try_get("last_recorded_ns").map_err(map_err)?),
                })
            })
            .collect()
    }

    async fn put_dead_letter(&self, dl: &DeadLetter) -> StoreResult<Option<DeadLetter>> {
        // Each statement of a read-committed transaction sees what committed before it: the letter
        // there is locked and read, or a concurrent insert makes the insert find it and look again
        // (a loop only while other letters of the event come and go between the two statements).
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let replaced = loop {
            let there = sqlx::query(
                "SELECT * FROM dead_letters WHERE tenant = $1 AND grp = $2 AND seq = $3 FOR UPDATE",
            )
            .bind(&dl.tenant)
            .bind(&dl.group)
            .bind(seq_i64(dl.sequence))
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            if let Some(row) = there {
                bind_dead_letter(
                    sqlx::query(
                        "UPDATE dead_letters SET attempts = $4, reason = $5, dead_ns = $6 \
                         WHERE tenant = $1 AND grp = $2 AND seq = $3",
                    ),
                    dl,
                )
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                break Some(decode_dead_letter(&row)?);
            }
            let inserted = bind_dead_letter(
                sqlx::query(
                    "INSERT INTO dead_letters (tenant, grp, seq, attempts, reason, dead_ns) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (tenant, grp, seq) DO NOTHING",
                ),
                dl,
            )
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            if inserted.rows_affected() == 1 {
                break None;
            }
        };
        tx.commit().await.map_err(map_err)?;
        Ok(replaced)
    }

    async fn restore_dead_letter(
        &self,
        replaced: &DeadLetter,
        recorded_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let done = bind_dead_letter(
            sqlx::query(
                "UPDATE dead_letters SET attempts = $4, reason = $5, dead_ns = $6 \
                 WHERE tenant = $1 AND grp = $2 AND seq = $3 AND dead_ns = $7",
            ),
            replaced,
        )
        .bind(super::sqlite::to_ns(recorded_at))
        .execute(&self.pool)
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
            "SELECT * FROM dead_letters WHERE tenant = $1 AND grp = $2 AND seq > $3 ORDER BY seq LIMIT $4",
        )
        .bind(tenant)
        .bind(group)
        .bind(seq_i64(after))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(decode_dead_letter).collect()
    }

    async fn dead_letter_counts(
        &self,
        tenant: &str,
        groups: &[String],
    ) -> StoreResult<Vec<(String, u64)>> {
        let rows = sqlx::query(
            "SELECT grp, COUNT(*) AS n FROM dead_letters WHERE tenant = $1 AND grp = ANY($2) GROUP BY grp",
        )
        .bind(tenant)
        .bind(groups)
        .fetch_all(&self.pool)
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
        let (seqs, times): (Vec<i64>, Vec<i64>) = letters
            .iter()
            .map(|(seq, at)| (seq_i64(*seq), super::sqlite::to_ns(*at)))
            .unzip();
        let done = sqlx::query(
            "DELETE FROM dead_letters d USING unnest($3::bigint[], $4::bigint[]) AS l(seq, dead_ns) \
             WHERE d.tenant = $1 AND d.grp = $2 AND d.seq = l.seq AND d.dead_ns = l.dead_ns",
        )
        .bind(tenant)
        .bind(group)
        .bind(&seqs)
        .bind(&times)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn insert_publisher(&self, p: &Publisher) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO publishers (tenant, principal, types, sources, description, updated_ns) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (tenant, principal) DO NOTHING",
        )
        .bind(&p.tenant)
        .bind(&p.principal)
        .bind(&p.types)
        .bind(&p.sources)
        .bind(&p.description)
        .bind(to_ns(p.updated_at))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn update_publisher(&self, p: &Publisher) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE publishers SET types = $3, sources = $4, description = $5, updated_ns = $6 WHERE tenant = $1 AND principal = $2",
        )
        .bind(&p.tenant)
        .bind(&p.principal)
        .bind(&p.types)
        .bind(&p.sources)
        .bind(&p.description)
        .bind(to_ns(p.updated_at))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn remove_publisher(&self, tenant: &str, principal: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM publishers WHERE tenant = $1 AND principal = $2")
            .bind(tenant)
            .bind(principal)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn publishers(&self) -> StoreResult<Vec<Publisher>> {
        let rows = sqlx::query("SELECT * FROM publishers ORDER BY tenant, principal")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(decode_publisher).collect()
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        let times: Vec<i64> = records.iter().map(|r| to_ns(r.time)).collect();
        let column = |f: fn(&AuditRecord) -> &str| records.iter().map(f).collect::<Vec<&str>>();
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // self-exclusive, so appends commit in id order and a reader paging by id never skips one
        // committed late; readers are not blocked
        sqlx::query("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query(
            "INSERT INTO audit_log (time_ns, tenant, principal, action, resource, outcome, reason) \
             SELECT ti, te, pr, ac, re, ou, rs FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], \
             $6::TEXT[], $7::TEXT[]) WITH ORDINALITY AS x(ti, te, pr, ac, re, ou, rs, n) ORDER BY n",
        )
        .bind(&times)
        .bind(column(|r| &r.tenant))
        .bind(column(|r| &r.principal))
        .bind(column(|r| &r.action))
        .bind(column(|r| &r.resource))
        .bind(column(|r| &r.outcome))
        .bind(column(|r| &r.reason))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
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
            "SELECT max(id) FROM (SELECT id FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2) step",
        )
        .bind(seq_i64(after_id))
        .bind(max as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        let Some(last) = last else {
            return Ok(AuditPruned {
                deleted: 0,
                last_id: None,
            });
        };
        let deleted =
            sqlx::query("DELETE FROM audit_log WHERE id > $1 AND id <= $2 AND time_ns < $3")
                .bind(seq_i64(after_id))
                .bind(last)
                .bind(to_ns(before))
                .execute(&self.pool)
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
        let rows = sqlx::query(
            "SELECT * FROM audit_log WHERE tenant = ANY($1) AND id > $2 \
             AND ($3::TEXT IS NULL OR principal = $3) AND ($4::TEXT IS NULL OR outcome = $4) ORDER BY id LIMIT $5",
        )
        .bind(&query.tenants)
        .bind(seq_i64(query.after_id))
        .bind(query.principal.as_deref())
        .bind(query.outcome.as_deref())
        .bind(audit_limit(query.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(decode_audit).collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        self.went_back.refused()?;
        writable(&self.pool).await
    }

    fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::event::Event;

    /// Needs NERVE_TEST_DATABASE_URL (scripts/test.sh starts Postgres and sets it).
    async fn fresh_schema_url() -> String {
        let url = std::env::var("NERVE_TEST_DATABASE_URL")
            .expect("NERVE_TEST_DATABASE_URL is not set: run scripts/test.sh");
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .expect("create schema");
        format!("{url}?options=-c%20search_path%3D{schema}")
    }

    #[tokio::test]
    async fn a_schema_whose_name_makes_a_long_channel_commits() {
        let url = fresh_schema_url().await;
        let (base, short) = url
            .split_once("?options=-c%20search_path%3D")
            .expect("schema url");
        // 55 bytes: "nerve_commits_" and it are over Postgres' 63-byte names
        let schema = format!("{short}_{}", "x".repeat(20));
        let mut conn = PgConnection::connect(base).await.expect("connect");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .expect("create schema");
        let store =
            PostgresStore::connect(&format!("{base}?options=-c%20search_path%3D{schema}"), 2)
                .await
                .expect("connect store");
        let event = Event {
            id: "long".into(),
            source: "//schemas".into(),
            event_type: "schema.long".into(),
            spec_version: "1.0".into(),
            ..Event::default()
        };
        let appended = store
            .append(
                "t",
                vec![NewEvent::new(event.clone(), event.content_hash())],
            )
            .await
            .expect("commits");
        assert_eq!(appended.len(), 1);
    }

    #[tokio::test]
    async fn a_head_read_from_the_database_is_what_a_later_read_scans_to() {
        let url = fresh_schema_url().await;
        let store = PostgresStore::connect(&url, 2)
            .await
            .expect("connect store");
        // another replica's commit (of events of other tenants) whose notification has not arrived
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        sqlx::query("UPDATE nerve_sequence SET seq = seq + 5")
            .execute(&mut conn)
            .await
            .expect("move the sequence on");
        let head = store.head().await.expect("head");
        assert_eq!(head, 5);
        let page = store
            .read(&ReadQuery {
                tenant: "t".into(),
                after: 0,
                until: Some(head),
                limit: 10,
                ..ReadQuery::default()
            })
            .await
            .expect("read");
        // a subscription catching up to `head` moves on to it, instead of reading (0, 5] again
        assert!(page.exhausted && page.events.is_empty());
        assert_eq!(
            page.scanned_to, head,
            "the read did not count the head it was asked to read up to as scanned"
        );
    }

    #[tokio::test]
    async fn every_connection_commits_durably_where_the_database_does_not() {
        let url = fresh_schema_url().await;
        let lax = format!("{url}%20-c%20synchronous_commit%3Doff");
        let setting = |options: PgConnectOptions| async move {
            let mut conn = PgConnection::connect_with(&options).await.expect("connect");
            sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
                .fetch_one(&mut conn)
                .await
                .expect("show")
        };
        for (url, database) in [(&url, "on"), (&lax, "off")] {
            let given = PgConnectOptions::from_str(url).expect("options");
            assert_eq!(setting(given).await, database, "{url}");
            let options = connect_options(url).await.expect("options");
            assert_eq!(setting(options.clone()).await, "on", "the pool's: {url}");
            assert_eq!(
                setting(writer_options(options)).await,
                "on",
                "the writer's: {url}"
            );
        }
        // and the store's pool, which dead letters, registry changes and audit records commit on
        let store = PostgresStore::connect(&lax, 2)
            .await
            .expect("connect store");
        let pooled: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&store.pool)
            .await
            .expect("show");
        assert_eq!(pooled, "on");
    }

    #[tokio::test]
    async fn the_writer_plans_its_commit_statement_once_not_per_commit() {
        let url = fresh_schema_url().await;
        // migrates the schema
        let _store = PostgresStore::connect(&url, 2)
            .await
            .expect("connect store");
        let mut conn = PgConnection::connect_with(&writer_options(
            connect_options(&url).await.expect("options"),
        ))
        .await
        .expect("connect writer");
        for commit in 0..8 {
            let (reply, _) = tokio::sync::oneshot::channel();
            let events = (0..3)
                .map(|i| {
                    let event = Event {
                        id: format!("{commit}-{i}"),
                        source: "//plans".into(),
                        event_type: "plan.checked".into(),
                        spec_version: "1.0".into(),
                        ..Event::default()
                    };
                    NewEvent::new(event.clone(), event.content_hash())
                })
                .collect();
            let batch = [CommitRequest {
                tenant: "t".into(),
                events,
                reply,
                _room: commit::unqueued_room(),
            }];
            assert!(
                write_batch(&mut conn, &batch, false, "plans").await.is_ok(),
                "commit {commit} failed"
            );
        }
        let (generic, custom): (i64, i64) = sqlx::query_as(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
             WHERE statement LIKE 'WITH locked AS%'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("the commit statement is prepared");
        assert_eq!(
            (generic, custom),
            (8, 0),
            "(generic, custom) plans of 8 commits"
        );
    }

    #[tokio::test]
    async fn stream_ends_looks_up_only_streams_the_statistics_do_not_rule_out() {
        let url = fresh_schema_url().await;
        let store = PostgresStore::connect(&url, 2)
            .await
            .expect("connect store");
        let event = |n: u32, event_type: &str, priority: Priority| {
            let event = Event {
                id: format!("e{n}"),
                source: "//ends".into(),
                event_type: event_type.into(),
                spec_version: "1.0".into(),
                priority,
                ..Event::default()
            };
            NewEvent::new(event.clone(), event.content_hash())
        };
        // three normal events and one high of ends.a, then the first event of ends.b and the first
        // critical one of ends.a, both after the position asked about (the fourth event); the
        // second batch repeats the first event, so its commit numbers its rows from a locked head
        let mut seqs = Vec::new();
        for batch in [
            vec![
                event(1, "ends.a", Priority::Normal),
                event(2, "ends.a", Priority::Normal),
                event(3, "ends.a", Priority::Normal),
                event(4, "ends.a", Priority::High),
            ],
            vec![
                event(1, "ends.a", Priority::Normal),
                event(5, "ends.b", Priority::Normal),
                event(6, "ends.a", Priority::Critical),
                event(7, "ends.a", Priority::High),
            ],
        ] {
            let appended = store.append("t", batch).await.expect("commits");
            seqs.extend(appended.iter().filter(|a| !a.duplicate).map(|a| a.sequence));
        }
        assert_eq!(seqs.len(), 7, "one duplicate in {seqs:?}");
        let at_most = seqs[3];
        let streams = [
            ("t", "ends.a", Priority::Normal as i16),
            ("t", "ends.a", Priority::High as i16),
            // never used by ends.a
            ("t", "ends.a", Priority::Low as i16),
            // first used after the position
            ("t", "ends.a", Priority::Critical as i16),
            ("t", "ends.b", Priority::Normal as i16),
            // not stored at all
            ("t", "ends.c", Priority::Normal as i16),
            ("u", "ends.a", Priority::Normal as i16),
        ];
        let expected = [Some(seqs[2]), Some(at_most), None, None, None, None, None];
        let ends = store
            .stream_ends(&streams, at_most)
            .await
            .expect("reads the ends");
        assert_eq!(ends, expected, "ends up to {at_most}");

        // how many streams the lookup walked back through the events for
        let walks = || async {
            let plan: (serde_json::Value,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "EXPLAIN (ANALYZE, FORMAT JSON) {STREAM_ENDS}"
            )))
            .bind(streams.iter().map(|s| s.0).collect::<Vec<_>>())
            .bind(streams.iter().map(|s| s.1).collect::<Vec<_>>())
            .bind(streams.iter().map(|s| s.2).collect::<Vec<_>>())
            .bind(seq_i64(at_most))
            .bind(
                streams
                    .iter()
                    .map(|s| commit::level_bit(s.2))
                    .collect::<Vec<_>>(),
            )
            .fetch_one(&store.pool)
            .await
            .expect("explains the lookup");
            fn subplan_loops(node: &serde_json::Value) -> Option<u64> {
                if node["Subplan Name"].as_str().is_some() {
                    return node["Actual Loops"].as_u64();
                }
                node["Plans"].as_array()?.iter().find_map(subplan_loops)
            }
            (subplan_loops(&plan.0[0]["Plan"]), plan.0)
        };
        // only the first two: a walk for the others would read every event of the type up to the
        // position and find none (seconds on a large store)
        let (loops, plan) = walks().await;
        assert_eq!(loops, Some(2), "walks of the events in {plan:#}");

        // a level's first sequence is the one that first set its bit; a later event leaves it
        let firsts: Vec<(i16, i64)> = sqlx::query_as(
            "SELECT level, first_seq FROM event_type_levels \
             WHERE tenant = 't' AND type = 'ends.a' ORDER BY level",
        )
        .fetch_all(&store.pool)
        .await
        .expect("reads the first sequences");
        let seq = |i: usize| seqs[i] as i64;
        assert_eq!(firsts, [(2, seq(0)), (3, seq(3)), (4, seq(5))]);

        // levels whose first sequence is not known (first used before it was kept) are walked, and
        // a later event of such a level does not make its own sequence the level's first; ends.b's
        // first event is still after the position
        sqlx::query("DELETE FROM event_type_levels")
            .execute(&store.pool)
            .await
            .expect("forgets the first sequences");
        store
            .append("t", vec![event(8, "ends.a", Priority::High)])
            .await
            .expect("commits");
        let ends = store
            .stream_ends(&streams, at_most)
            .await
            .expect("reads the ends");
        assert_eq!(
            ends, expected,
            "ends up to {at_most}, first sequences unknown"
        );
        let (loops, plan) = walks().await;
        assert_eq!(loops, Some(3), "walks of the events in {plan:#}");
    }
}
