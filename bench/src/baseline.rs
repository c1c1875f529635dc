//! Same-run baselines on the same Postgres and Redis: the rows Nerve stores, inserted raw; XADD pipelined;
//! XADD -> XREADGROUP latency; and the disk: `fdatasync` after one small write.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use nerve::api::pb;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::{mpsc, watch};

use crate::{
    Args, Ids, Pacing,
    latency::Slice,
    procstat::Meter,
    report::Row,
    server::{create_schema, drop_schema, url_with_options},
    util::{
        Call, Hist, SUBJECTS, Send1, closed_loop, event, load_row, now_ns, open_loop, pacing_note,
    },
};

/// Nerve's own Postgres migrations (`server/migrations/postgres`, embedded at build time as the server
/// embeds them; `build.rs` rebuilds this crate when one is added). The raw baseline runs all of them in
/// its scratch schema, so its events table is Nerve's as the server's migrations leave it: columns,
/// constraints and indexes, whatever a later migration changes.
static NERVE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../server/migrations/postgres");

/// The events table of a schema as one line per column and per index (the index's definition with
/// the schema's name taken out), sorted: two schemas made by the same migrations read the same.
pub async fn events_table_shape(
    conn: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<Vec<String>> {
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = 'events'",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .context("reading the events table's columns")?;
    let indexes: Vec<(String,)> = sqlx::query_as(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = 'events'",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .context("reading the events table's indexes")?;
    let mut shape: Vec<String> = columns
        .into_iter()
        .map(|(name, data_type, nullable)| format!("column {name} {data_type} nullable={nullable}"))
        .chain(
            indexes
                .into_iter()
                .map(|(def,)| format!("index {}", def.replace(&format!("{schema}."), ""))),
        )
        .collect();
    shape.sort();
    Ok(shape)
}

/// One row as Nerve's store writes it, but for its sequence and id.
pub struct RawRow {
    source: String,
    event_type: String,
    subject: Option<String>,
    correlation_id: Option<String>,
    priority: i16,
    hash: Vec<u8>,
    body: Vec<u8>,
}

/// Turns a protobuf event into the row Nerve would store: the server's own conversion, the content hash
/// over the event as sent, then the commit time filled in and the stored body.
pub fn raw_row(e: pb::Event) -> Result<RawRow> {
    let mut event = nerve::api::convert::event_from_pb(e, "events[0]")
        .map_err(|e| anyhow!("converting a benchmark event: {e}"))?;
    let hash = event.content_hash().to_vec();
    event.time.get_or_insert(chrono::Utc::now());
    Ok(RawRow {
        source: event.source.clone(),
        event_type: event.event_type.clone(),
        subject: event.subject.clone(),
        correlation_id: event.correlation_id.clone(),
        priority: event.priority.as_i64() as i16,
        hash,
        body: nerve::store::body::encode(&event),
    })
}

/// `synchronous_commit` and `fsync` as a connection sees them.
pub async fn commit_settings<'e>(executor: impl sqlx::PgExecutor<'e>) -> Result<(String, String)> {
    sqlx::query_as("SELECT current_setting('synchronous_commit'), current_setting('fsync')")
        .fetch_one(executor)
        .await
        .context("reading synchronous_commit and fsync")
}

/// A scratch schema with Nerve's events table, dropped by [`Pg::drop`].
pub struct Pg {
    pool: PgPool,
    database_url: String,
    schema: String,
    seq: Arc<AtomicI64>,
    /// `synchronous_commit` and `fsync` as the baseline connections see them.
    pub settings: String,
    /// The events table's columns and indexes ([`events_table_shape`]), to compare with the table of
    /// the Nerve server measured in the same run.
    pub shape: Vec<String>,
}

impl Pg {
    pub async fn create(database_url: &str, connections: u32) -> Result<Pg> {
        let schema = create_schema(database_url, "nerve_bench_raw").await?;
        let url = url_with_options(database_url, &schema, &[("synchronous_commit", "on")]);
        let connections = connections.max(1);
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            // sqlx pings a pooled connection before handing it out: a round trip per insert that
            // Nerve's writer, holding its own connection, does not make
            .test_before_acquire(false)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .context("connecting the baseline pool")?;
        // every connection opened now, not inside the measured cells that first need it
        let mut opened = Vec::new();
        for _ in 0..connections {
            opened.push(
                pool.acquire()
                    .await
                    .context("opening the baseline's connections")?,
            );
        }
        drop(opened);
        NERVE_MIGRATIONS
            .run(&pool)
            .await
            .context("running Nerve's migrations in the baseline's schema")?;
        let shape = events_table_shape(&mut *pool.acquire().await?, &schema).await?;
        let (sync, fsync) = commit_settings(&pool).await?;
        // a baseline that never flushes would make every ratio against it look worse than it is
        anyhow::ensure!(
            sync == "on" && fsync == "on",
            "the raw Postgres baseline needs synchronous_commit=on and fsync=on, as Nerve's writer \
             does; this Postgres has synchronous_commit={sync} fsync={fsync}"
        );
        Ok(Pg {
            pool,
            database_url: database_url.to_owned(),
            schema,
            seq: Arc::new(AtomicI64::new(0)),
            settings: format!("synchronous_commit={sync} fsync={fsync}"),
            shape,
        })
    }

    /// Removes the scratch schema.
    pub async fn drop(self) -> Result<()> {
        self.pool.close().await;
        drop_schema(&self.database_url, &self.schema).await
    }

    /// A call that inserts `batch` rows, in one autocommit statement: a plain INSERT for one row,
    /// Nerve's UNNEST insert for more. The rows' content hashes and bodies (the server's work, not the
    /// database's) are made before the cell starts, one per subject the tool's events take; each call
    /// gives its rows their own ids and sequences, so only the insert is timed.
    pub fn insert_call(
        &self,
        batch: usize,
        payload_size: usize,
        ids: Ids,
        tag: String,
    ) -> Result<Call> {
        let pool = self.pool.clone();
        let seq = self.seq.clone();
        let stamp = now_ns();
        let templates: Arc<Vec<RawRow>> = Arc::new(
            (0..SUBJECTS)
                .map(|n| {
                    let e = event(
                        ids.name(|| format!("{tag}-0-{n}-0")),
                        "bench.publish.v1",
                        n,
                        payload_size,
                        stamp,
                    );
                    raw_row(e)
                })
                .collect::<Result<_>>()?,
        );
        Ok(Arc::new(move |w, k| {
            let pool = pool.clone();
            let seq = seq.clone();
            let tag = tag.clone();
            let templates = templates.clone();
            Box::pin(async move {
                let first = seq.fetch_add(batch as i64, Ordering::Relaxed) + 1;
                let keys: Vec<(i64, String)> = (0..batch)
                    .map(|j| {
                        let id = ids.name(|| format!("{tag}-{w}-{k}-{j}"));
                        (first + j as i64, id)
                    })
                    .collect();
                insert(&pool, &templates[(k % SUBJECTS) as usize], &keys).await?;
                Ok(batch as u64)
            })
        }))
    }
}

/// Inserts `keys` (sequence and id) as rows otherwise like `template`.
async fn insert(pool: &PgPool, template: &RawRow, keys: &[(i64, String)]) -> Result<()> {
    let recorded_ns: i64 = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let r = template;
    if let [(seq, id)] = keys {
        sqlx::query(
            "INSERT INTO events (seq, tenant, source, id, type, subject, correlation_id, priority, recorded_ns, content_hash, body_binary) \
             VALUES ($1, 'default', $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(seq)
        .bind(&r.source)
        .bind(id)
        .bind(&r.event_type)
        .bind(&r.subject)
        .bind(&r.correlation_id)
        .bind(r.priority)
        .bind(recorded_ns)
        .bind(&r.hash)
        .bind(&r.body)
        .execute(pool)
        .await?;
        return Ok(());
    }
    let n = keys.len();
    let seqs: Vec<i64> = keys.iter().map(|(seq, _)| *seq).collect();
    let ids: Vec<&str> = keys.iter().map(|(_, id)| id.as_str()).collect();
    let tenants = vec!["default"; n];
    let sources = vec![r.source.as_str(); n];
    let types = vec![r.event_type.as_str(); n];
    let subjects = vec![r.subject.as_deref(); n];
    let correlations = vec![r.correlation_id.as_deref(); n];
    let priorities = vec![r.priority; n];
    let hashes = vec![r.hash.as_slice(); n];
    let bodies = vec![r.body.as_slice(); n];
    sqlx::query(
        "INSERT INTO events (seq, tenant, source, id, type, subject, correlation_id, priority, recorded_ns, content_hash, body_binary) \
         SELECT s, t, so, i, ty, su, c, p, $9, h, b FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], \
         $6::TEXT[], $7::TEXT[], $8::SMALLINT[], $10::BYTEA[], $11::BYTEA[]) AS x(s, t, so, i, ty, su, c, p, h, b)",
    )
    .bind(&seqs)
    .bind(&tenants)
    .bind(&sources)
    .bind(&ids)
    .bind(&types)
    .bind(&subjects)
    .bind(&correlations)
    .bind(&priorities)
    .bind(recorded_ns)
    .bind(&hashes)
    .bind(&bodies)
    .execute(pool)
    .await?;
    Ok(())
}

/// Runs `insert` (a call inserting `batch` rows) from `writers` connections in a closed loop for
/// `duration`.
async fn measure_inserts(
    system: &str,
    batch: usize,
    writers: usize,
    duration: Duration,
    insert: Call,
    note: String,
) -> Row {
    let meter = Meter::start(None);
    let r = closed_loop(writers, duration, insert).await;
    let row = Row::new(
        "publish",
        system,
        format!("batch={batch} publishers={writers}"),
    );
    let mut row = load_row(row, &r, &meter);
    row.note = note;
    row
}

/// Raw insert rates for every batch size x publisher count of the publish matrix, then the ceiling
/// of one ordered writer.
pub async fn postgres_matrix(pg: &Pg, args: &Args, run: &str, rows: &mut Vec<Row>) -> Result<()> {
    let insert =
        |batch: usize, tag: String| pg.insert_call(batch, args.payload_size, args.ids, tag);
    for &batch in &args.batch_sizes {
        for &w in &args.publishers {
            let note = if batch == 1 {
                "single-row INSERT, autocommit, synchronous_commit=on".into()
            } else {
                format!(
                    "{batch}-row UNNEST INSERT per autocommit transaction, synchronous_commit=on"
                )
            };
            let call = insert(batch, format!("{run}-raw-b{batch}-w{w}"))?;
            rows.push(measure_inserts("postgres (raw)", batch, w, args.duration, call, note).await);
        }
    }
    // Nerve commits in sequence order, so one connection writes each group commit; at the largest
    // cell a group commit holds up to batch x publishers events. One connection inserting batches of
    // that size is the ceiling of any design that keeps commit order = sequence order.
    let (Some(&batch), Some(&w)) = (args.batch_sizes.iter().max(), args.publishers.iter().max())
    else {
        return Ok(());
    };
    let group = batch * w;
    if group <= 1 {
        return Ok(());
    }
    let note = format!(
        "one connection, {group}-row UNNEST INSERT per transaction (a full group commit of the \
         largest cell): the ceiling of one ordered writer"
    );
    let call = insert(group, format!("{run}-raw-serial-b{group}"))?;
    rows.push(measure_inserts(PG_SERIAL, group, 1, args.duration, call, note).await);
    Ok(())
}

/// System name of the raw Redis rows.
pub const REDIS_SYSTEM: &str = "redis (raw)";

/// System name of the one-ordered-writer ceiling row.
pub const PG_SERIAL: &str = "postgres (raw, one writer)";

/// The Redis baselines on one scratch key prefix; keys are deleted afterwards by the caller.
pub struct RedisBase {
    client: redis::Client,
    pub prefix: String,
}

impl RedisBase {
    pub fn new(url: &str, run: &str) -> Result<Self> {
        Ok(RedisBase {
            client: redis::Client::open(url)?,
            prefix: format!("nerve-bench-raw:{run}:"),
        })
    }

    /// The entry Nerve's relay adds: the event as the store encodes it and its commit time (plus the
    /// send stamp `t`).
    fn entry_body(payload_size: usize, i: u64, stamp: u64) -> Result<Vec<u8>> {
        let e = event(
            format!("raw-{i}"),
            "bench.publish.v1",
            i,
            payload_size,
            stamp,
        );
        Ok(raw_row(e)?.body)
    }

    /// Pipelined XADD: `workers` tasks, each sending pipelines of `depth` XADDs.
    pub async fn xadd_pipelined(
        &self,
        workers: usize,
        depth: usize,
        duration: Duration,
        payload_size: usize,
    ) -> Result<Row> {
        let conn = self.client.get_multiplexed_async_connection().await?;
        let key = format!("{}xadd", self.prefix);
        let body = Arc::new(Self::entry_body(payload_size, 0, now_ns())?);
        let call: Call = Arc::new(move |_, _| {
            let mut conn = conn.clone();
            let key = key.clone();
            let body = body.clone();
            Box::pin(async move {
                let mut pipe = redis::pipe();
                let ns = now_ns();
                for _ in 0..depth {
                    pipe.cmd("XADD")
                        .arg(&key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(100_000)
                        .arg("*")
                        .arg("e")
                        .arg(body.as_slice())
                        .arg("r")
                        .arg(ns)
                        .ignore();
                }
                pipe.query_async::<()>(&mut conn).await?;
                Ok(depth as u64)
            })
        });
        let meter = Meter::start(None);
        let r = closed_loop(workers, duration, call).await;
        let row = Row::new(
            "redis XADD",
            REDIS_SYSTEM,
            format!("pipelined depth={depth} workers={workers}"),
        );
        let mut row = load_row(row, &r, &meter);
        row.note = "latency columns = one pipeline round trip".into();
        Ok(row)
    }

    /// One slice of the latency scenario ([`crate::latency`]): XADD at a fixed rate (one XADD per
    /// event, open loop) -> XREADGROUP on its own connection; the reader hands the ids it read to a task
    /// that XACKs them on a third connection and reads again at once, as Nerve's subscribers send their
    /// acks without waiting for an answer. Each slice has a stream of its own (named by `tag`), deleted
    /// at its end.
    pub async fn xadd_latency(
        &self,
        args: &Args,
        rate: u64,
        tag: &str,
        duration: Duration,
    ) -> Result<Slice> {
        let key = format!("{}{tag}", self.prefix);
        let mut admin = self.client.get_multiplexed_async_connection().await?;
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async::<()>(&mut admin)
            .await?;
        // a blocking XREADGROUP gets a connection of its own, and so do the acks: on the reader's,
        // an XACK would wait behind the next blocking read
        let mut reader_conn = self.client.get_multiplexed_async_connection().await?;
        let mut ack_conn = self.client.get_multiplexed_async_connection().await?;
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Vec<String>>();
        let acker = {
            let key = key.clone();
            tokio::spawn(async move {
                while let Some(ids) = ack_rx.recv().await {
                    redis::cmd("XACK")
                        .arg(&key)
                        .arg("g")
                        .arg(&ids)
                        .query_async::<()>(&mut ack_conn)
                        .await?;
                }
                Ok::<(), anyhow::Error>(())
            })
        };
        let received = Arc::new(AtomicU64::new(0));
        let (stop_tx, mut stop) = watch::channel(false);
        let reader = {
            let key = key.clone();
            let received = received.clone();
            tokio::spawn(async move {
                let mut hist = Hist::new();
                let mut from_schedule = Hist::new();
                let mut last_ns = 0;
                loop {
                    if *stop.borrow_and_update() {
                        // dropping the sender lets the ack task finish
                        return Ok::<_, anyhow::Error>((hist, from_schedule, last_ns));
                    }
                    let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg("g")
                        .arg("c")
                        .arg("COUNT")
                        .arg(1000)
                        .arg("BLOCK")
                        .arg(100)
                        .arg("STREAMS")
                        .arg(&key)
                        .arg(">")
                        .query_async(&mut reader_conn)
                        .await?;
                    let Some(reply) = reply else { continue };
                    let now = now_ns();
                    let mut ids = Vec::new();
                    for k in reply.keys {
                        for entry in k.ids {
                            // an entry counted but not timed would leave the figures to the rest
                            let stamp = |field: &str| {
                                entry.map.get(field).ok_or_else(|| {
                                    anyhow!("entry {} has no {field:?} stamp: its latency is not measured", entry.id)
                                })
                            };
                            let t: u64 = redis::from_redis_value_ref(stamp("t")?)?;
                            hist.record_ns(now.saturating_sub(t));
                            let s: u64 = redis::from_redis_value_ref(stamp("s")?)?;
                            from_schedule.record_ns(now.saturating_sub(s));
                            ids.push(entry.id);
                        }
                    }
                    if !ids.is_empty() {
                        last_ns = now;
                        received.fetch_add(ids.len() as u64, Ordering::Relaxed);
                        ack_tx
                            .send(ids)
                            .map_err(|_| anyhow!("the XACK task ended early"))?;
                    }
                }
            })
        };
        let conn = self.client.get_multiplexed_async_connection().await?;
        let body = Arc::new(Self::entry_body(args.payload_size, 0, now_ns())?);
        let send: Send1 = {
            let key = key.clone();
            Arc::new(move |_, stamp, scheduled| {
                let mut conn = conn.clone();
                let key = key.clone();
                let body = body.clone();
                Box::pin(async move {
                    redis::cmd("XADD")
                        .arg(&key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(100_000)
                        .arg("*")
                        .arg("t")
                        .arg(stamp)
                        .arg("s")
                        .arg(scheduled)
                        .arg("e")
                        .arg(body.as_slice())
                        .arg("r")
                        .arg(stamp)
                        .query_async::<()>(&mut conn)
                        .await?;
                    Ok(1)
                })
            })
        };
        let meter = Meter::start(None);
        let load = open_loop(
            rate as f64,
            duration,
            args.max_outstanding,
            args.pacing,
            send,
        )
        .await;
        // as for Nerve's slices: when events never arrive, the CPU figures cover the sending only
        let at_send_end = meter.finish();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while received.load(Ordering::Relaxed) < load.events && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let arrived = received.load(Ordering::Relaxed) >= load.events;
        let usage = if arrived { meter.finish() } else { at_send_end };
        let _ = stop_tx.send(true);
        let (hist, from_schedule, last_ns) = reader.await??;
        acker.await??;
        redis::cmd("DEL")
            .arg(&key)
            .query_async::<()>(&mut admin)
            .await?;
        let delivered = received.load(Ordering::Relaxed);
        Ok(Slice {
            complete: delivered >= load.events,
            load,
            delivered,
            hist,
            from_schedule,
            last_ns,
            reader_error: None,
            usage,
        })
    }
}

/// How the raw Redis latency baseline sends and reads, for its row's note.
pub fn xadd_latency_note(pacing: Pacing) -> String {
    format!(
        "XADD (one per event) -> XREADGROUP COUNT 1000 BLOCK, XACK sent from another task and \
         connection without waiting; {}",
        pacing_note(pacing)
    )
}

/// The system of the disk baseline's row.
pub const DISK: &str = "disk (raw)";

/// Bytes written before each `fdatasync` of the disk baseline: one page, the least a commit writes.
const DISK_WRITE: usize = 4096;
/// The region of the disk baseline's file that writes cycle through, allocated (and synced) first, so
/// the file never grows: as SQLite's write-ahead log, which is overwritten once checkpointed.
const DISK_REGION: u64 = 1 << 20;

/// Writes `bytes` of zeros from the start of `file` and syncs it, so later writes within them never
/// change the file's size (an `fdatasync` then flushes data only, as for a log that is overwritten).
pub fn preallocate(file: &std::fs::File, bytes: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < bytes {
        let n = (bytes - at).min(chunk.len() as u64);
        file.write_all_at(&chunk[..n as usize], at)?;
        at += n;
    }
    file.sync_all()
}

/// The disk baseline: one 4 KiB write then `fdatasync`, back to back, in a file of the temporary
/// directory (where the embedded server keeps its data): the least one durable commit adds to publish ->
/// deliver on this machine. The latency scenario measures it in slices among its other systems.
pub struct DiskBase {
    file: std::sync::Arc<tempfile::NamedTempFile>,
}

/// What one slice of the disk baseline measured.
pub struct DiskSlice {
    pub hist: Hist,
    pub samples: u64,
    pub seconds: f64,
}

impl DiskBase {
    /// Creates the file and allocates the region its writes cycle through.
    pub async fn new() -> Result<Self> {
        let file = tokio::task::spawn_blocking(|| -> Result<tempfile::NamedTempFile> {
            let file = tempfile::Builder::new()
                .prefix("nerve-bench-disk-")
                .tempfile()
                .context("creating the disk baseline's file")?;
            preallocate(file.as_file(), DISK_REGION)?;
            Ok(file)
        })
        .await
        .context("the disk baseline's thread")??;
        Ok(DiskBase {
            file: std::sync::Arc::new(file),
        })
    }

    /// Writes and syncs back to back for `duration`, on a thread of its own.
    pub async fn slice(&self, duration: Duration) -> Result<DiskSlice> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt as _;
            let handle = file.as_file();
            let page = vec![0x5au8; DISK_WRITE];
            let mut hist = Hist::new();
            let started = std::time::Instant::now();
            let mut samples = 0u64;
            while started.elapsed() < duration {
                let at = (samples * DISK_WRITE as u64) % DISK_REGION;
                let t = std::time::Instant::now();
                handle.write_all_at(&page, at)?;
                handle.sync_data()?;
                hist.record(t.elapsed());
                samples += 1;
            }
            Ok(DiskSlice {
                hist,
                samples,
                seconds: started.elapsed().as_secs_f64(),
            })
        })
        .await
        .context("the disk baseline's thread")?
    }
}

/// How the disk baseline measures, for its rows' notes.
/// Refuses a directory in memory (tmpfs, ramfs), where an `fdatasync` writes nothing: the embedded
/// server, NATS' fsync-always mode and the disk and floor baselines keep their files in the temporary
/// directory, and would be measured without the durability they claim. Returns the filesystem's name.
pub fn on_a_disk(dir: &std::path::Path) -> Result<&'static str> {
    const TMPFS_MAGIC: i128 = 0x0102_1994;
    const RAMFS_MAGIC: i128 = 0x8584_58f6;
    let stat = rustix::fs::statfs(dir).with_context(|| format!("statfs {}", dir.display()))?;
    let kind = match i128::from(stat.f_type) {
        TMPFS_MAGIC => "tmpfs",
        RAMFS_MAGIC => "ramfs",
        _ => return Ok("on a disk"),
    };
    anyhow::bail!(
        "{} is in memory ({kind}): an fdatasync there writes nothing, so the embedded server, NATS' \
         fsync-always mode and the disk and floor baselines would be measured without durability; \
         set TMPDIR to a directory on a disk",
        dir.display()
    )
}

pub fn disk_note() -> String {
    format!(
        "one 4 KiB pwrite + fdatasync, back to back, in {} (where the embedded server keeps its data): the least a durable commit adds",
        std::env::temp_dir().display()
    )
}

#[cfg(test)]
mod tests {
    use sqlx::Connection as _;

    use super::*;

    #[test]
    fn a_directory_in_memory_is_refused() {
        let shm = std::path::Path::new("/dev/shm");
        let err = on_a_disk(shm).expect_err("/dev/shm is tmpfs on Linux");
        assert!(err.to_string().contains("in memory (tmpfs)"), "{err}");
        on_a_disk(std::path::Path::new(env!("CARGO_MANIFEST_DIR")))
            .expect("the checkout is on a disk");
    }

    /// Needs NERVE_TEST_DATABASE_URL (scripts/test.sh starts Postgres and sets it).
    #[tokio::test]
    async fn the_raw_baseline_table_is_the_one_nerve_server_migrates() {
        let url = std::env::var("NERVE_TEST_DATABASE_URL")
            .expect("NERVE_TEST_DATABASE_URL is not set: run scripts/test.sh");
        let pg = Pg::create(&url, 3).await.expect("the baseline's schema");
        // its connections are open before any cell, and taken without the ping Nerve's writer skips
        assert_eq!(pg.pool.size(), 3);
        assert!(!pg.pool.options().get_test_before_acquire());
        // Nerve's store migrates a schema of its own, as nerve-server does when it starts
        let schema = create_schema(&url, "nerve_bench_test")
            .await
            .expect("schema");
        let store = nerve::store::PostgresStore::connect(&url_with_options(&url, &schema, &[]), 2)
            .await
            .map_err(|e| anyhow!("{e}"));
        let nerve = async {
            store?;
            let mut conn = sqlx::PgConnection::connect(&url).await?;
            events_table_shape(&mut conn, &schema).await
        }
        .await;
        let raw = pg.shape.clone();
        drop_schema(&url, &schema).await.expect("drop schema");
        pg.drop().await.expect("drop the baseline's schema");
        let nerve = nerve.expect("nerve-server's events table");
        assert_eq!(raw, nerve);
        // what the shape holds: migration 0005 dropped the recorded-time index
        assert!(
            raw.iter()
                .any(|l| l.starts_with("index CREATE UNIQUE INDEX events_pkey")),
            "{raw:#?}"
        );
        assert!(
            raw.iter()
                .any(|l| l.starts_with("column body_binary bytea")),
            "{raw:#?}"
        );
        assert!(
            !raw.iter().any(|l| l.contains("events_recorded")),
            "{raw:#?}"
        );
    }
}
