//! Live streams on Redis Streams, for any number of replicas sharing one Redis and one Postgres.
//!
//! - One stream per (tenant, event type, priority level); entry ids are `<sequence>-0`. Every replica
//!   adds every committed event in order with an idempotent script, behind its in-memory tail, so a
//!   replica dying between commit and `XADD` delays nothing: the others add it, and a restarted one
//!   resumes from `relayed`.
//! - A group's consumer group on each stream holds its cursor. New entries are read with `XRANGE` and
//!   leased as runs (one record per claim, a bit per entry to settle); entries nacked, extended or
//!   expired get ledger entries of their own with lease ends and attempts (see `redis_scripts`). Entries the
//!   stream no longer holds (trimmed, or lost with Redis) are read from the store; nothing is skipped.
//! - Group settings live in Postgres; each group's position is checkpointed there, so a Redis that comes
//!   back empty is rebuilt: groups resume from their checkpoint, reading the store for what is missing.
//! - Private subscribers read this replica's in-memory tail (global order across types).
//! - Presence (for "no responders" and consumer counts) is a per-tenant hash with expiring entries;
//!   replies and group wake-ups travel over pub/sub.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Mutex as SyncMutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use redis::{AsyncCommands, aio::ConnectionManager};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    Claimed, GroupConfig, GroupKey, GroupSettings, GroupStats, Inbox, Interest, LiveStreams,
    NewClaim, StreamError, StreamResult, TailRead,
    quiet::{Asked, QuietStreams},
    redis_scripts as lua,
    tail::Tail,
};
use crate::{
    event::{Event, Priority, Selection, StoredEvent, TypePattern},
    retry::Backoff,
    store::{EventStore, PostgresStore, ReadQuery, body, sqlite::from_ns},
};

/// Settings of the Redis backend.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://` URL.
    pub url: String,
    /// Prefix of every key and channel, so deployments (and tests) can share one Redis.
    pub key_prefix: String,
    /// Approximate length each stream is trimmed to; older events are read from the store.
    pub stream_max_len: u64,
    /// How long a reply inbox record lives, so a replica that dies leaves none for good: longer
    /// than any request waits, or replies from other replicas to a longer wait are dropped as late.
    pub inbox_ttl: Duration,
    /// How long a stream found with nothing new for a group is passed over by the group's claims
    /// without asking Redis, unless an event is relayed there (see `stream::quiet`).
    pub quiet_ttl: Duration,
}

/// Reads that leave more of their stream behind one new claim makes at most; a read that reaches a
/// stream's end does not count, so empty streams never stop a claim. A filter that matches little of a
/// long backlog is then read a bounded step at a time (the claim says it stopped early), and between
/// steps the session reads its commands and sends its heartbeats, as the embedded backend's claims do.
const CLAIM_ROUNDS: usize = 8;
/// How long a presence entry lives without being refreshed (its replica died).
const PRESENCE_TTL: Duration = Duration::from_secs(30);
/// How often presence is refreshed and group positions checkpointed.
const PRESENCE_REFRESH: Duration = Duration::from_secs(10);
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long a cached group setting is trusted without a change notice.
const CONFIG_TTL: Duration = Duration::from_secs(1);
/// The ledgers of a group on a stream that settle and lease entries, in the order scripts take them.
const LEDGERS: &[&str] = &["due", "att", "err", "pos", "runs", "bits"];
/// Bound of the sequence -> stream cache used to route acks.
const LOCATIONS_MAX: usize = 200_000;

/// Redis' answers that the server cannot serve now but will: loading its data after a restart, a
/// primary demoted to replica in a failover, a script running too long, out of memory. A caller
/// retries these as any other outage (UNAVAILABLE), not as a bug of the bus (INTERNAL).
const PASSING_REDIS_ERRORS: &[&str] = &[
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "BUSY",
    "OOM",
];

fn redis_err(e: redis::RedisError) -> StreamError {
    // a pipeline's error gives its code only for the kinds the client knows (not BUSY or OOM)
    let passing = e
        .code()
        .is_some_and(|code| PASSING_REDIS_ERRORS.contains(&code))
        || e.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, error)| PASSING_REDIS_ERRORS.contains(&error.code()))
        });
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || passing
    {
        StreamError::Unavailable(format!("redis: {e}"))
    } else {
        StreamError::Internal(format!("redis: {e}"))
    }
}

fn db_err(e: sqlx::Error) -> StreamError {
    crate::store::sqlite::map_err(e).into()
}

/// Parses a number a script returned as a bulk string.
fn number<T: std::str::FromStr>(bytes: &[u8]) -> Option<T> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Ascending sequences as (first, last) ranges of consecutive ones: what the claim and ack scripts take,
/// so a dense claim of thousands of entries is two arguments instead of thousands.
fn seq_ranges(ascending: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for seq in ascending {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            Some((_, last)) if *last == seq => {}
            _ => out.push((seq, seq)),
        }
    }
    out
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn level_number(level: Priority) -> i64 {
    level.as_i64()
}

/// The streams of a tenant this replica knows of.
#[derive(Default)]
struct KnownStreams {
    /// Whether the store's type statistics were read into `streams` (the relay adds to it before).
    seeded: bool,
    streams: BTreeSet<StreamId>,
}

/// A sequence read from a stream, with its event when the entry could be decoded.
type StreamEntry = (u64, Option<Arc<StoredEvent>>);

/// What a claim of new entries read before it leases: the cursor it read after, the last sequence
/// read, the entries among them it wants (with their events), and how many entries the page held (a
/// full page: the stream may go on after it).
struct Read {
    after: String,
    to: u64,
    wanted: Vec<StreamEntry>,
    page: usize,
}

/// The sequence of an entry as `XRANGE` gives it, `[id, fields]`, from its id `<sequence>-0`.
fn entry_sequence(entry: &redis::Value) -> Option<u64> {
    let redis::Value::Array(parts) = entry else {
        return None;
    };
    let Some(redis::Value::BulkString(id)) = parts.first() else {
        return None;
    };
    number(id.split(|b| *b == b'-').next()?)
}

/// Sequence -> stream of recent claims per tenant; a claim's entries share one `StreamId`, so
/// remembering and routing thousands of them allocates nothing per entry.
#[derive(Default)]
struct Locations {
    by_tenant: HashMap<String, HashMap<u64, Arc<StreamId>>>,
    len: usize,
}

impl Locations {
    fn insert(&mut self, tenant: &str, seqs: impl Iterator<Item = u64>, stream: &StreamId) {
        if self.len > LOCATIONS_MAX {
            *self = Self::default();
        }
        let stream = Arc::new(stream.clone());
        let map = match self.by_tenant.get_mut(tenant) {
            Some(map) => map,
            None => self.by_tenant.entry(tenant.to_owned()).or_default(),
        };
        for seq in seqs {
            if map.insert(seq, stream.clone()).is_none() {
                self.len += 1;
            }
        }
    }

    fn get(&self, tenant: &str, seq: u64) -> Option<&Arc<StreamId>> {
        self.by_tenant.get(tenant)?.get(&seq)
    }

    fn remove(&mut self, tenant: &str, seq: u64) {
        if let Some(map) = self.by_tenant.get_mut(tenant)
            && map.remove(&seq).is_some()
        {
            self.len -= 1;
        }
    }
}

/// One Redis stream: the events of one type and priority level of a tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct StreamId {
    event_type: String,
    level: i64,
}

impl StreamId {
    /// The stream that holds an event.
    fn of(event: &crate::event::Event) -> Self {
        Self {
            event_type: event.event_type.clone(),
            level: level_number(event.priority),
        }
    }

    fn priority(&self) -> Priority {
        Priority::from_i64(self.level).unwrap_or_default()
    }
}

/// Key names. The stream's hash tag is shared by its group ledgers.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn stream(&self, tenant: &str, s: &StreamId) -> String {
        format!(
            "{}:s:{{{}/{}/{}}}",
            self.prefix, tenant, s.event_type, s.level
        )
    }
    fn ledger(&self, tenant: &str, s: &StreamId, what: &str, group: &str) -> String {
        format!("{}:{what}:{group}", self.stream(tenant, s))
    }
    /// Several ledger keys of a group on a stream, in the order a script takes them.
    fn ledgers(&self, key: &GroupKey, s: &StreamId, whats: &[&str]) -> Vec<String> {
        whats
            .iter()
            .map(|what| self.ledger(&key.tenant, s, what, &key.name))
            .collect()
    }
    fn relayed(&self) -> String {
        format!("{}:relayed", self.prefix)
    }
    fn presence(&self, tenant: &str) -> String {
        format!("{}:presence:{{{tenant}}}", self.prefix)
    }
    fn inbox(&self, inbox: &str) -> String {
        format!("{}:inbox:{inbox}", self.prefix)
    }
    fn wake_channel(&self) -> String {
        format!("{}:wake", self.prefix)
    }
    fn health(&self) -> String {
        format!("{}:health", self.prefix)
    }
    fn reply_channel(&self, replica: &str) -> String {
        format!("{}:replies:{replica}", self.prefix)
    }
}

/// What Redis keeps about a waiting requester.
#[derive(Serialize, Deserialize)]
struct InboxRecord {
    tenant: String,
    correlation_id: String,
    request_id: String,
    request_source: String,
    #[serde(default)]
    request_type: String,
    #[serde(default)]
    traceparent: Option<String>,
    replica: String,
}

/// What Redis keeps about a connected subscriber.
#[derive(Serialize, Deserialize)]
struct PresenceRecord {
    group: Option<String>,
    selection: String,
    expires_ms: i64,
}

struct Subscriber {
    group: Option<GroupKey>,
    interest: Interest,
}

#[derive(Clone)]
struct GroupRow {
    config: GroupConfig,
    start_after: u64,
    created_ns: i64,
}

type InboxEntry = (Inbox, mpsc::Sender<Arc<StoredEvent>>);

/// A group's position on one stream, read from Redis to be written to the store.
struct GroupCheckpoint {
    key: GroupKey,
    /// The creation of the group the position was read for.
    created_ns: i64,
    stream: StreamId,
    position: u64,
}

/// Group positions read from Redis ([`RedisStreams::checkpoint_rows`]).
#[doc(hidden)]
pub struct GroupCheckpoints(Vec<GroupCheckpoint>);

impl GroupCheckpoints {
    /// Whether no position changed since it was last written.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Live streams on Redis Streams.
pub struct RedisStreams {
    /// Replaced when the server it reaches turned out to be a replica (a primary demoted in a
    /// failover while the connection stayed open): the client reconnects only after a broken one.
    conn: std::sync::RwLock<ConnectionManager>,
    conn_config: redis::aio::ConnectionManagerConfig,
    /// Counts the times `conn` was made again: the pub/sub listener connects again when it moves
    /// past what the listener's session started with (a count, not a notification, so one made
    /// before the session connected does not end it once more).
    listener_again: tokio::sync::watch::Sender<u64>,
    /// The `run_id` of the server the address led to just before the listener's session connected
    /// (None: between sessions, or not known). The health check compares it with the server its
    /// command connection reaches: a failover that ends normal clients only (Sentinel's `CLIENT KILL TYPE normal`) moves
    /// that connection by itself and leaves the listener's where it was.
    listener_server: SyncMutex<Option<String>>,
    client: redis::Client,
    store: Arc<PostgresStore>,
    keys: Keys,
    max_len: u64,
    inbox_ttl_ms: u64,
    replica: String,
    tail: Tail,
    /// Highest sequence this replica has added to Redis; group consumers wake on it.
    relayed: watch::Sender<u64>,
    /// What this replica last saw `<prefix>:relayed` hold: a key found lower is a Redis that went back
    /// to an older snapshot or log (see `redis_scripts::RAISE`).
    raised: AtomicU64,
    /// Streams known per tenant: seeded from the store's type statistics, grown by the relay.
    streams: SyncMutex<HashMap<String, KnownStreams>>,
    /// Groups' rows as last read, kept for [`CONFIG_TTL`], and the reads in flight.
    configs: SyncMutex<HashMap<GroupKey, CachedGroup>>,
    /// Sequence -> stream of recent claims, to route acks without reading the store.
    locations: SyncMutex<Locations>,
    subscribers: SyncMutex<HashMap<String, Subscriber>>,
    inboxes: SyncMutex<HashMap<String, InboxEntry>>,
    wakeups: SyncMutex<HashMap<GroupKey, watch::Sender<u64>>>,
    /// Last checkpoint written per (group, stream), with its group's creation, to skip unchanged ones.
    checkpoints: SyncMutex<HashMap<(GroupKey, StreamId), (i64, u64)>>,
    /// The last sequence this replica added to each (tenant, stream): a stream that ends before it
    /// lost entries (Redis came back from an older snapshot or log), and the relay goes back for them.
    added: SyncMutex<HashMap<(String, StreamId), u64>>,
    /// Held by each relay step: the relay task and a check after a reconnect both step.
    relaying: tokio::sync::Mutex<()>,
    /// Store reads of replies routed here from other replicas, [`ROUTED_REPLY_READS`] at once: a
    /// burst of them must not take every pooled connection from the subscriptions' reads.
    reply_reads: tokio::sync::Semaphore,
    /// Streams where a group's claims found nothing new, passed over until an event is relayed there.
    quiet: SyncMutex<QuietStreams<StreamId>>,
}

impl RedisStreams {
    /// Hands a reply to the requester waiting here on `inbox`, forgetting its channel here, so no
    /// reply is handed over twice: false when nobody waits here (closed, or a reply was handed over).
    fn hand_over(&self, inbox: &str, reply: Arc<StoredEvent>) -> bool {
        let waiting = self
            .inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(inbox);
        waiting.is_some_and(|(_, tx)| tx.try_send(reply).is_ok())
    }

    /// Connects to Redis and starts the background tasks (pub/sub, presence refresh, checkpoints).
    pub async fn start(
        settings: &RedisSettings,
        store: Arc<PostgresStore>,
    ) -> StreamResult<Arc<Self>> {
        if settings.key_prefix.is_empty()
            || !settings
                .key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
        {
            return Err(StreamError::Internal(format!(
                "redis key prefix {:?} must be non-empty [A-Za-z0-9_.:-]",
                settings.key_prefix
            )));
        }
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| StreamError::Internal(format!("redis url: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let mut conn = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(redis_err)?;
        let keys = Keys {
            prefix: settings.key_prefix.clone(),
        };
        // Group ledgers and streams have no expiry, inboxes and presence do: a policy that evicts
        // keys under memory pressure can drop leased deliveries for good (or answer requests "no
        // responders"). Said, not refused: a managed Redis may not show its policy (CONFIG refused).
        if let Ok(reply) = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async::<Vec<String>>(&mut conn)
            .await
            && let Some(policy) = reply.get(1).filter(|p| *p != "noeviction")
        {
            warn!(
                policy = %policy,
                "Redis' maxmemory-policy is not noeviction: under memory pressure Redis may evict \
                 group ledgers, streams, inboxes or presence, losing the deliveries they hold; set \
                 maxmemory-policy noeviction (at its memory limit Redis then refuses writes, and \
                 Nerve answers UNAVAILABLE)"
            );
        }
        let head = store.head().await?;
        let relayed: Option<u64> = conn.get(keys.relayed()).await.map_err(redis_err)?;
        // Redis holds events past the store's last: the store went back (restored, or failed over
        // to a standby that missed commits). Those events were delivered and are gone from the
        // store, and new ones would be numbered with their sequences, which the relay would take
        // for added and subscribers resuming after them would skip: refused, saying what to do.
        if let Some(relayed) = relayed.filter(|r| *r > head) {
            return Err(StreamError::Unavailable(format!(
                "Redis (key prefix {:?}) holds events up to sequence {relayed}, past the event \
                 store's last, {head}: the store went back (restored, or failed over to a standby \
                 that missed commits), or another deployment's store uses this prefix. Delete this \
                 prefix's keys to serve the store as it is, or point the replica at its own store",
                keys.prefix
            )));
        }
        // resume where this deployment last added to Redis; an empty Redis starts at the head, and
        // groups read what Redis lacks from the store
        let start = relayed.unwrap_or(head);
        let streams = Arc::new(RedisStreams {
            conn: std::sync::RwLock::new(conn),
            conn_config: config,
            listener_again: tokio::sync::watch::channel(0).0,
            listener_server: SyncMutex::new(None),
            client,
            store,
            keys,
            max_len: settings.stream_max_len.max(1),
            inbox_ttl_ms: settings.inbox_ttl.as_millis().max(1) as u64,
            replica: uuid::Uuid::new_v4().simple().to_string(),
            tail: Tail::new(start),
            relayed: watch::channel(start).0,
            raised: AtomicU64::new(relayed.unwrap_or(0)),
            streams: SyncMutex::new(HashMap::new()),
            configs: SyncMutex::new(HashMap::new()),
            locations: SyncMutex::new(Locations::default()),
            subscribers: SyncMutex::new(HashMap::new()),
            inboxes: SyncMutex::new(HashMap::new()),
            wakeups: SyncMutex::new(HashMap::new()),
            checkpoints: SyncMutex::new(HashMap::new()),
            added: SyncMutex::new(HashMap::new()),
            relaying: tokio::sync::Mutex::new(()),
            reply_reads: tokio::sync::Semaphore::new(ROUTED_REPLY_READS),
            quiet: SyncMutex::new(QuietStreams::new(settings.quiet_ttl)),
        });
        tokio::spawn(listen(Arc::downgrade(&streams)));
        tokio::spawn(maintain(Arc::downgrade(&streams)));
        tokio::spawn(relay(Arc::downgrade(&streams)));
        Ok(streams)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The `run_id` of the server the command connection reaches.
    async fn server_run_id(&self) -> redis::RedisResult<Option<String>> {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.conn())
            .await?;
        Ok(info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned()))
    }

    /// Records the server the listener's session listens on ([`Self::listener_server`]).
    fn listening_on(&self, server: Option<String>) {
        *self
            .listener_server
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = server;
    }

    /// Moves the listener when the command connection reaches another server than the one its
    /// session recorded ([`Self::listener_server`]).
    async fn follow_command_connection(&self) {
        let now = match self.server_run_id().await {
            Ok(Some(now)) => now,
            // a server that answers no run id, or refuses INFO, leaves the listener to READONLY
            Ok(None) => return,
            Err(error) => {
                debug!(%error, "INFO server failed; the listener moves only on READONLY");
                return;
            }
        };
        let mut listening = self
            .listener_server
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if listening.as_ref().is_some_and(|was| *was != now) {
            // told once: the listener's next session records where it listens
            *listening = None;
            self.listener_again.send_modify(|made| *made += 1);
            info!(server = %now, "redis commands reach another server; the listener connects again");
        }
    }

    fn quiet(&self) -> std::sync::MutexGuard<'_, QuietStreams<StreamId>> {
        self.quiet.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The streams of a tenant, seeded from the store on first use.
    async fn known_streams(&self, tenant: &str) -> StreamResult<BTreeSet<StreamId>> {
        if let Some(known) = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .filter(|known| known.seeded)
        {
            return Ok(known.streams.clone());
        }
        self.every_stream(self.store.pool(), tenant).await
    }

    /// Every stream of a tenant: the store's statistics read now through `conn`, with what this
    /// replica knows besides. What clears a group's consumer groups needs this, not the streams known
    /// here: other replicas' members may have claimed from streams this replica has not relayed yet.
    async fn every_stream<'c>(
        &self,
        conn: impl sqlx::PgExecutor<'c>,
        tenant: &str,
    ) -> StreamResult<BTreeSet<StreamId>> {
        let seeded: BTreeSet<StreamId> = PostgresStore::type_levels(conn, tenant)
            .await?
            .into_iter()
            .flat_map(|(event_type, levels)| {
                levels.into_iter().map(move |level| StreamId {
                    event_type: event_type.clone(),
                    level: level_number(level),
                })
            })
            .collect();
        // what the relay added while the statistics were read stays: they may predate it
        let mut all = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let known = all.entry(tenant.to_owned()).or_default();
        known.streams.extend(seeded);
        known.seeded = true;
        Ok(known.streams.clone())
    }

    /// The streams a group reads, optionally of one level.
    async fn group_streams(
        &self,
        key: &GroupKey,
        selection: &Selection,
        level: Option<Priority>,
    ) -> StreamResult<Vec<StreamId>> {
        Ok(self
            .known_streams(&key.tenant)
            .await?
            .into_iter()
            .filter(|s| level.is_none_or(|l| level_number(l) == s.level))
            .filter(|s| selection.matches_type(&s.event_type))
            .collect())
    }

    async fn group_row(&self, key: &GroupKey) -> StreamResult<GroupRow> {
        let forgets = {
            let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
            let cached = configs.entry(key.clone()).or_default();
            if let Some((row, at)) = &cached.row
                && at.elapsed() < CONFIG_TTL
            {
                return Ok(row.clone());
            }
            cached.reads += 1;
            cached.forgets
        };
        let _reading = GroupRead {
            configs: &self.configs,
            key,
        };
        let read = self.read_group_row(key).await;
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = configs.get_mut(key) {
            match &read {
                // a read that began before a forget (the group deleted, created again) may hold the
                // old row: it answers this caller, which asked before, but is not kept for later ones
                Ok(group) if cached.forgets == forgets => {
                    cached.row = Some((group.clone(), Instant::now()));
                }
                Err(StreamError::NoSuchGroup(_)) => cached.row = None,
                _ => {}
            }
        }
        read
    }

    /// Reads a group's row from the store.
    async fn read_group_row(&self, key: &GroupKey) -> StreamResult<GroupRow> {
        let row = sqlx::query(
            "SELECT selection, max_attempts, start_after, created_ns FROM nerve_groups WHERE tenant = $1 AND name = $2",
        )
        .bind(&key.tenant)
        .bind(&key.name)
        .fetch_optional(self.store.pool())
        .await
        .map_err(db_err)?
        .ok_or_else(|| StreamError::NoSuchGroup(key.name.clone()))?;
        let selection: String = row.try_get("selection").map_err(db_err)?;
        Ok(GroupRow {
            config: GroupConfig {
                selection: Selection::from_json(&selection)
                    .map_err(|e| StreamError::Internal(format!("group {:?}: {e}", key.name)))?,
                max_attempts: row.try_get::<i32, _>("max_attempts").map_err(db_err)? as u32,
            },
            start_after: row.try_get::<i64, _>("start_after").map_err(db_err)? as u64,
            created_ns: row.try_get("created_ns").map_err(db_err)?,
        })
    }

    /// Removes a group's consumer group and ledgers from streams.
    async fn destroy_on(&self, key: &GroupKey, streams: &[StreamId]) -> StreamResult<()> {
        if streams.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&lua::DESTROY_GROUP).ignore();
        let ledgers: Vec<&str> = LEDGERS.iter().chain(&["floor"]).copied().collect();
        for s in streams {
            pipe.invoke_script(
                lua::DESTROY_GROUP
                    .key(self.keys.stream(&key.tenant, s))
                    .key(self.keys.ledgers(key, s, &ledgers))
                    .arg(&key.name),
            )
            .ignore();
        }
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(redis_err)
    }

    fn forget_config(&self, key: &GroupKey) {
        // what changed may have moved the group's cursors back
        self.quiet().forget(key);
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = configs.get_mut(key) {
            if cached.reads == 0 {
                configs.remove(key);
            } else {
                // kept, so the reads in flight see the count move
                cached.row = None;
                cached.forgets += 1;
            }
        }
    }

    /// Decodes a stream entry's event (the store's encoding, [`body::encode`]); `None` sends the
    /// caller to the store.
    fn decode(
        &self,
        tenant: &str,
        sequence: u64,
        body: &[u8],
        recorded: &[u8],
    ) -> Option<Arc<StoredEvent>> {
        if body.is_empty() {
            return None;
        }
        let event = match body::decode(body) {
            Ok(e) => e,
            Err(error) => {
                warn!(%error, sequence, "undecodable stream entry; reading the store instead");
                return None;
            }
        };
        Some(Arc::new(StoredEvent {
            tenant: tenant.to_owned(),
            sequence,
            recorded_at: from_ns(number(recorded).unwrap_or_default()),
            event,
        }))
    }

    /// Reads one entry as `XRANGE` gives it, `[id, [field, value, ...]]`; the event is None when it
    /// cannot be decoded (it is read from the store instead).
    fn stream_entry(&self, tenant: &str, entry: &redis::Value) -> Option<StreamEntry> {
        let sequence = entry_sequence(entry)?;
        let redis::Value::Array(parts) = entry else {
            return None;
        };
        let [_, redis::Value::Array(fields)] = parts.as_slice() else {
            return None;
        };
        let (mut body, mut recorded): (&[u8], &[u8]) = (&[], b"0");
        for pair in fields.chunks(2) {
            if let [
                redis::Value::BulkString(name),
                redis::Value::BulkString(value),
            ] = pair
            {
                match name.as_slice() {
                    b"e" => body = value,
                    b"r" => recorded = value,
                    _ => {}
                }
            }
        }
        Some((sequence, self.decode(tenant, sequence, body, recorded)))
    }

    fn remember(&self, tenant: &str, seqs: impl Iterator<Item = u64>, stream: &StreamId) {
        self.locations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant, seqs, stream);
    }

    fn forget(&self, tenant: &str, seqs: impl Iterator<Item = u64>) {
        let mut locations = self.locations.lock().unwrap_or_else(|p| p.into_inner());
        for seq in seqs {
            locations.remove(tenant, seq);
        }
    }

    /// Moves the lease ends of deliveries whose attempt is current to `visible_at` (`SET_VISIBLE`);
    /// unless `counts`, the attempt is taken back. Returns which moved.
    async fn move_leases(
        &self,
        key: &GroupKey,
        deliveries: &[(u64, u32)],
        visible_at: DateTime<Utc>,
        error: Option<&str>,
        counts: bool,
    ) -> StreamResult<Vec<bool>> {
        let mut out = vec![false; deliveries.len()];
        for (stream, indexes) in self.by_stream(&key.tenant, deliveries).await? {
            let mut call = lua::SET_VISIBLE.prepare_invoke();
            call.key(self.keys.ledgers(key, &stream, LEDGERS))
                .arg(ms(visible_at))
                .arg(error.unwrap_or(""))
                .arg(if counts { "1" } else { "0" });
            for i in &indexes {
                call.arg(deliveries[*i].0).arg(deliveries[*i].1);
            }
            let moved: Vec<i64> = call
                .invoke_async(&mut self.conn())
                .await
                .map_err(redis_err)?;
            for (i, done) in indexes.into_iter().zip(moved) {
                out[i] = done == 1;
            }
        }
        Ok(out)
    }

    /// Groups deliveries by the stream that holds them, as indexes into `deliveries`, from recent claims
    /// or else from the store; deliveries whose stream is unknown (no longer pending) are left out.
    async fn by_stream(
        &self,
        tenant: &str,
        deliveries: &[(u64, u32)],
    ) -> StreamResult<HashMap<Arc<StreamId>, Vec<usize>>> {
        let mut by_stream: HashMap<Arc<StreamId>, Vec<usize>> = HashMap::new();
        let mut missing = Vec::new();
        {
            let locations = self.locations.lock().unwrap_or_else(|p| p.into_inner());
            for (i, (seq, _)) in deliveries.iter().enumerate() {
                match locations.get(tenant, *seq) {
                    Some(s) => by_stream.entry(s.clone()).or_default().push(i),
                    None => missing.push(i),
                }
            }
        }
        if !missing.is_empty() {
            let seqs: Vec<u64> = missing.iter().map(|i| deliveries[*i].0).collect();
            let found: HashMap<u64, Arc<StreamId>> = self
                .store
                .read_sequences(&seqs)
                .await?
                .into_iter()
                .map(|event| (event.sequence, Arc::new(StreamId::of(&event.event))))
                .collect();
            for i in missing {
                if let Some(s) = found.get(&deliveries[i].0) {
                    by_stream.entry(s.clone()).or_default().push(i);
                }
            }
        }
        Ok(by_stream)
    }

    /// Creates the consumer group on a stream at its checkpoint (or its start); false when it
    /// existed.
    async fn create_group(
        &self,
        key: &GroupKey,
        stream: &StreamId,
        start_after: u64,
    ) -> StreamResult<bool> {
        let checkpoint: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM nerve_group_checkpoints WHERE tenant = $1 AND grp = $2 AND type = $3 AND priority = $4",
        )
        .bind(&key.tenant)
        .bind(&key.name)
        .bind(&stream.event_type)
        .bind(stream.level as i16)
        .fetch_optional(self.store.pool())
        .await
        .map_err(db_err)?;
        let start = checkpoint.map_or(start_after, |c| (c as u64).max(start_after));
        let relayed = *self.relayed.borrow();
        let created: i64 = lua::CREATE_GROUP
            .key(self.keys.stream(&key.tenant, stream))
            .key(self.keys.ledger(&key.tenant, stream, "floor", &key.name))
            .arg(&key.name)
            .arg(start)
            .arg(relayed)
            .invoke_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        if created == 1 {
            debug!(group = %key.name, stream = %stream.event_type, start, "consumer group created");
        }
        Ok(created == 1)
    }

    /// The streams among `streams` where a claim of new entries could find anything: those not
    /// known quiet (see [`QuietStreams`]) are asked (`lua::HAS_NEW`) in one round trip, and those
    /// that answer no are marked quiet as of `asked`. A claim otherwise spends two round trips on
    /// each stream with nothing new, and a group over many types claims from every stream of a level
    /// on every fill. One stream left is claimed from without asking.
    async fn streams_with_new(
        &self,
        key: &GroupKey,
        created_ns: i64,
        streams: Vec<StreamId>,
        asked: Asked,
    ) -> StreamResult<Vec<StreamId>> {
        let streams: Vec<StreamId> = {
            let quiet = self.quiet();
            streams
                .into_iter()
                .filter(|s| !quiet.is_quiet(key, created_ns, s))
                .collect()
        };
        if streams.len() < 2 {
            return Ok(streams);
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&lua::HAS_NEW).ignore();
        for stream in &streams {
            pipe.invoke_script(
                lua::HAS_NEW
                    .key(self.keys.stream(&key.tenant, stream))
                    .key(self.keys.ledger(&key.tenant, stream, "floor", &key.name))
                    .arg(&key.name),
            );
        }
        let (with_new, quiet) = self.streams_answering(streams, pipe).await?;
        let mut marks = self.quiet();
        for stream in quiet {
            marks.mark(asked, key, created_ns, stream);
        }
        Ok(with_new)
    }

    /// The streams among `streams` where an entry of the group is due by `now` (ms), each with when
    /// its longest-due entry became due, asked of all in one round trip; one stream is claimed from
    /// without asking.
    async fn streams_with_due(
        &self,
        key: &GroupKey,
        streams: Vec<StreamId>,
        now: i64,
    ) -> StreamResult<Vec<(StreamId, i64)>> {
        if streams.len() < 2 {
            return Ok(streams.into_iter().map(|s| (s, 0)).collect());
        }
        let earliest = self.earliest_due(key, &streams).await?;
        Ok(streams
            .into_iter()
            .zip(earliest)
            .filter_map(|(stream, due)| due.filter(|due| *due <= now).map(|due| (stream, due)))
            .collect())
    }

    /// When the longest-due entry of the group in each of `streams` is due (ms), in one round trip.
    async fn earliest_due(
        &self,
        key: &GroupKey,
        streams: &[StreamId],
    ) -> StreamResult<Vec<Option<i64>>> {
        let mut pipe = redis::pipe();
        for s in streams {
            pipe.cmd("ZRANGE")
                .arg(self.keys.ledger(&key.tenant, s, "due", &key.name))
                .arg(0)
                .arg(0)
                .arg("WITHSCORES");
        }
        let firsts: Vec<Vec<(String, f64)>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        Ok(firsts
            .into_iter()
            .map(|first| first.first().map(|(_, score)| *score as i64))
            .collect())
    }

    /// Runs `pipe`, which asks one number of each of `streams` in order, and parts the streams whose
    /// number is above zero from the others.
    async fn streams_answering(
        &self,
        streams: Vec<StreamId>,
        pipe: redis::Pipeline,
    ) -> StreamResult<(Vec<StreamId>, Vec<StreamId>)> {
        let answers: Vec<u64> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        let (above, zero): (Vec<_>, Vec<_>) = streams
            .into_iter()
            .zip(answers)
            .partition(|(_, answer)| *answer > 0);
        let streams =
            |answered: Vec<(StreamId, u64)>| answered.into_iter().map(|(s, _)| s).collect();
        Ok((streams(above), streams(zero)))
    }

    /// Hands back what a claim that failed part way had leased: at once and uncounted, as the session
    /// hands back claims whose events it cannot read, instead of waiting out their lease as an attempt
    /// nobody saw; the group's members are woken for them.
    async fn hand_back(&self, key: &GroupKey, leased: &[(u64, u32)]) {
        if leased.is_empty() {
            return;
        }
        match self.release_unsent(key, leased).await {
            Ok(_) => {
                let _ = self.wake_group(key).await;
            }
            Err(release) => {
                warn!(%release, group = %key.name, entries = leased.len(), "claimed entries not handed back; they wait out their lease");
            }
        }
    }

    /// The entries of a read that `selection` matches, each with its event: those the stream could not
    /// give are read from the store (one neither has is passed over).
    async fn wanted(
        &self,
        selection: &Selection,
        entries: Vec<StreamEntry>,
    ) -> StreamResult<Vec<StreamEntry>> {
        let unreadable: Vec<u64> = entries
            .iter()
            .filter(|e| e.1.is_none())
            .map(|e| e.0)
            .collect();
        let mut from_store: HashMap<u64, Arc<StoredEvent>> = if unreadable.is_empty() {
            HashMap::new()
        } else {
            self.store
                .read_sequences(&unreadable)
                .await?
                .into_iter()
                .map(|e| (e.sequence, e))
                .collect()
        };
        Ok(entries
            .into_iter()
            .filter_map(|(sequence, event)| {
                let event = event.or_else(|| from_store.remove(&sequence))?;
                selection
                    .matches(&event.event)
                    .then_some((sequence, Some(event)))
            })
            .collect())
    }

    /// Claims new entries of one stream that the selection of `group` (the row the claim serves)
    /// matches: from Redis, or from the store for what Redis lacks. Entries it does not match are
    /// passed over (the cursor moves past them), never leased, so no member can be handed one,
    /// whatever fails afterwards. Every entry returned has its event. `read_count` counts the
    /// entries read, matching or not, and their events' bytes.
    async fn claim_stream(
        &self,
        key: &GroupKey,
        group: &GroupRow,
        stream: &StreamId,
        max: usize,
        lease: chrono::Duration,
        read_count: &mut (usize, usize),
    ) -> StreamResult<(Vec<StreamEntry>, bool)> {
        // each call leases for the whole time from when it runs: a claim of several round trips
        // must not write a lease end already past (ack deadlines go down to 10 ms), which another
        // member would take at once
        let lease_ms = || ms(Utc::now() + lease);
        let skey = self.keys.stream(&key.tenant, stream);
        let mut read: Option<Read> = None;
        for _ in 0..8 {
            let mut call = lua::CLAIM_NEW.prepare_invoke();
            call.key(&skey)
                .key(
                    self.keys
                        .ledgers(key, stream, &["due", "floor", "runs", "bits"]),
                )
                .arg(&key.name)
                .arg(lease_ms());
            match &read {
                Some(read) => {
                    call.arg(&read.after).arg(read.to);
                    for (first, last) in seq_ranges(read.wanted.iter().map(|e| e.0)) {
                        call.arg(first).arg(last);
                    }
                }
                None => {
                    call.arg("").arg("");
                }
            }
            let reply: Vec<redis::Value> = call
                .invoke_async(&mut self.conn())
                .await
                .map_err(redis_err)?;
            let word = |i: usize| match reply.get(i) {
                Some(redis::Value::BulkString(b)) => Some(b.as_slice()),
                _ => None,
            };
            match word(0) {
                Some(b"NOGROUP") => {
                    // a group deleted meanwhile must stay deleted, and one created again under the
                    // name (another creation time) is not the one this claim serves: ask the store
                    // (not the cache) before creating, and after, in case the delete cleared Redis
                    // in between
                    self.forget_config(key);
                    let stored = self.group_row(key).await?;
                    if stored.created_ns != group.created_ns {
                        return Err(StreamError::NoSuchGroup(key.name.clone()));
                    }
                    let created = self.create_group(key, stream, stored.start_after).await?;
                    self.forget_config(key);
                    match self.group_row(key).await {
                        Ok(now) if now.created_ns == group.created_ns => {}
                        // what this call created holds the deleted group's position, which a group
                        // created again must not take over; a consumer group found there instead
                        // may be the new group's own
                        Ok(_) | Err(StreamError::NoSuchGroup(_)) => {
                            if created {
                                self.destroy_on(key, std::slice::from_ref(stream)).await?;
                            }
                            return Err(StreamError::NoSuchGroup(key.name.clone()));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Some(b"GAP") => {
                    let (Some(last), Some(floor)) = (word(1), word(2)) else {
                        return Err(StreamError::Internal("malformed gap reply".into()));
                    };
                    let (after, until) = (
                        number(last).unwrap_or_default(),
                        number(floor).unwrap_or_default(),
                    );
                    let page = self
                        .store
                        .read(&ReadQuery {
                            tenant: key.tenant.clone(),
                            after,
                            until: Some(until),
                            priority: Some(stream.priority()),
                            types: vec![
                                crate::event::TypePattern::parse(&stream.event_type)
                                    .map_err(StreamError::Internal)?,
                            ],
                            limit: max,
                            ..ReadQuery::default()
                        })
                        .await?;
                    read_count.0 += page.rows_read;
                    read_count.1 += page.bytes_read;
                    let moved_to = if page.exhausted {
                        until
                    } else {
                        page.scanned_to.min(until)
                    };
                    let mut wanted = page.events;
                    wanted.retain(|e| group.config.selection.matches(&e.event));
                    let mut call = lua::CLAIM_GAP.prepare_invoke();
                    call.key(&skey)
                        .key(self.keys.ledgers(key, stream, &["due", "runs", "bits"]))
                        .arg(&key.name)
                        .arg(last)
                        .arg(moved_to)
                        .arg(lease_ms());
                    for (first, last) in seq_ranges(wanted.iter().map(|e| e.sequence)) {
                        call.arg(first).arg(last);
                    }
                    let recorded: i64 = call
                        .invoke_async(&mut self.conn())
                        .await
                        .map_err(redis_err)?;
                    if recorded == 1 {
                        debug!(group = %key.name, after, moved_to, taken = wanted.len(), "filled a stream gap from the store");
                        let events = wanted.into_iter().map(|e| (e.sequence, Some(e)));
                        return Ok((events.collect(), true));
                    }
                }
                Some(b"AT") => {
                    let Some(after) = word(1).map(|a| String::from_utf8_lossy(a).into_owned())
                    else {
                        return Err(StreamError::Internal("malformed cursor reply".into()));
                    };
                    let entries: Vec<redis::Value> = redis::cmd("XRANGE")
                        .arg(&skey)
                        .arg(format!("({after}-0"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(max)
                        .query_async(&mut self.conn())
                        .await
                        .map_err(redis_err)?;
                    // nothing after the cursor: nothing to lease, so no script to ask (a group over
                    // many types claims from every stream of a level, most of them with nothing new)
                    if entries.is_empty() {
                        return Ok((Vec::new(), false));
                    }
                    let page = entries.len();
                    // the cursor goes past everything read, an entry that could not be read too
                    let last_read = entries.last().and_then(entry_sequence);
                    let entries: Vec<StreamEntry> = entries
                        .iter()
                        .filter_map(|entry| self.stream_entry(&key.tenant, entry))
                        .collect();
                    read_count.0 += page;
                    read_count.1 += entries
                        .iter()
                        .filter_map(|e| e.1.as_ref())
                        .map(|e| e.event.size())
                        .sum::<usize>();
                    let to = last_read.or(entries.last().map(|e| e.0)).ok_or_else(|| {
                        StreamError::Internal(format!(
                            "stream {skey}: no entry id in a page of {page}"
                        ))
                    })?;
                    read = Some(Read {
                        after,
                        to,
                        wanted: self.wanted(&group.config.selection, entries).await?,
                        page,
                    });
                }
                Some(b"OK") => {
                    // entries up to `from` went to another consumer meanwhile
                    let from: u64 = word(1).and_then(number).unwrap_or_default();
                    let Some(Read {
                        mut wanted, page, ..
                    }) = read
                    else {
                        return Ok((Vec::new(), false));
                    };
                    wanted.retain(|(sequence, _)| *sequence > from);
                    // the page read, not what is left of it, tells whether the stream goes on
                    return Ok((wanted, page >= max));
                }
                _ => {
                    return Err(StreamError::Internal(format!(
                        "unexpected claim reply {:?}",
                        reply.first()
                    )));
                }
            }
        }
        Ok((Vec::new(), true))
    }

    fn bump_wakeup(&self, key: &GroupKey) {
        if let Some(tx) = self
            .wakeups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn presence_record(&self, s: &Subscriber) -> String {
        serde_json::to_string(&PresenceRecord {
            group: s.group.as_ref().map(|g| g.name.clone()),
            selection: s.interest.selection.to_json(),
            expires_ms: ms(Utc::now()) + PRESENCE_TTL.as_millis() as i64,
        })
        .unwrap_or_default()
    }

    async fn publish_presence(&self, id: &str) -> StreamResult<()> {
        let record = {
            let subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
            subscribers
                .get(id)
                .map(|s| (s.interest.tenant.clone(), self.presence_record(s)))
        };
        if let Some((tenant, record)) = record {
            let key = self.keys.presence(&tenant);
            let _: () = self
                .conn()
                .hset(&key, id, record)
                .await
                .map_err(redis_err)?;
            // a subscriber that left while this was written had its record removed before it: take
            // the one just written away again, or it would count as a responder until it expires
            let gone = !self
                .subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id);
            if gone {
                let _: i64 = self.conn().hdel(&key, id).await.map_err(redis_err)?;
            }
        }
        Ok(())
    }

    /// Live presence records of a tenant; expired ones (their replica died) are dropped.
    async fn presence(&self, tenant: &str) -> StreamResult<Vec<PresenceRecord>> {
        let key = self.keys.presence(tenant);
        let all: HashMap<String, String> = self.conn().hgetall(&key).await.map_err(redis_err)?;
        let now = ms(Utc::now());
        let mut live = Vec::new();
        let mut expired = Vec::new();
        for (id, raw) in all {
            match serde_json::from_str::<PresenceRecord>(&raw) {
                Ok(r) if r.expires_ms > now => live.push(r),
                _ => expired.push(id),
            }
        }
        if !expired.is_empty() {
            let _: Result<(), _> = self.conn().hdel(&key, expired).await;
        }
        Ok(live)
    }

    /// Writes changed group positions to Postgres: for each group with consumers here, the position at or
    /// below which its stream has nothing unsettled.
    async fn checkpoint(&self) -> StreamResult<()> {
        let rows = self.checkpoint_rows().await?;
        self.write_checkpoints(rows).await
    }

    /// The positions of this replica's groups in Redis that changed since last written. Public
    /// only so that a test can delete and create a group again between reading and writing them.
    #[doc(hidden)]
    pub async fn checkpoint_rows(&self) -> StreamResult<GroupCheckpoints> {
        let groups: HashSet<GroupKey> = self
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|s| s.group.clone())
            .collect();
        let mut rows = Vec::new();
        for key in groups {
            let Ok(row) = self.group_row(&key).await else {
                continue;
            };
            let streams = self
                .group_streams(&key, &row.config.selection, None)
                .await?;
            let mut pipe = redis::pipe();
            pipe.load_script(&lua::GROUP_STATE).ignore();
            for s in &streams {
                pipe.invoke_script(
                    lua::GROUP_STATE
                        .key(self.keys.stream(&key.tenant, s))
                        .key(self.keys.ledgers(&key, s, &["due", "pos", "runs", "bits"]))
                        .arg(&key.name),
                );
            }
            let states: Vec<Vec<String>> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(redis_err)?;
            for (s, state) in streams.into_iter().zip(states) {
                let Some(Ok(last)) = state.first().map(|l| l.parse::<u64>()) else {
                    continue;
                };
                let position = match state.get(1).and_then(|o| o.parse::<u64>().ok()) {
                    Some(oldest) => last.min(oldest.saturating_sub(1)),
                    None => last,
                };
                let id = (key.clone(), s.clone());
                let mut written = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
                if written.get(&id) != Some(&(row.created_ns, position)) {
                    written.insert(id, (row.created_ns, position));
                    rows.push(GroupCheckpoint {
                        key: key.clone(),
                        created_ns: row.created_ns,
                        stream: s,
                        position,
                    });
                }
            }
        }
        Ok(GroupCheckpoints(rows))
    }

    /// Writes group positions to the store, for the groups that still exist as they were when the
    /// positions were read.
    #[doc(hidden)]
    pub async fn write_checkpoints(&self, rows: GroupCheckpoints) -> StreamResult<()> {
        let rows = rows.0;
        if rows.is_empty() {
            return Ok(());
        }
        let tenants: Vec<&str> = rows.iter().map(|r| r.key.tenant.as_str()).collect();
        let groups: Vec<&str> = rows.iter().map(|r| r.key.name.as_str()).collect();
        let created: Vec<i64> = rows.iter().map(|r| r.created_ns).collect();
        let types: Vec<&str> = rows.iter().map(|r| r.stream.event_type.as_str()).collect();
        let levels: Vec<i16> = rows.iter().map(|r| r.stream.level as i16).collect();
        let positions: Vec<i64> = rows.iter().map(|r| r.position as i64).collect();
        let written = sqlx::query(
            // only for groups that still exist as they were read: the row lock waits out a delete in
            // flight, and a group deleted and created again under the same name since (another
            // created_ns) never starts from the deleted one's position
            "INSERT INTO nerve_group_checkpoints (tenant, grp, type, priority, position) \
             SELECT c.tenant, c.grp, c.type, c.priority, c.position \
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::SMALLINT[], $6::BIGINT[]) \
               AS c(tenant, grp, created_ns, type, priority, position) \
             WHERE EXISTS (SELECT 1 FROM nerve_groups g WHERE g.tenant = c.tenant AND g.name = c.grp \
               AND g.created_ns = c.created_ns FOR KEY SHARE) \
             ON CONFLICT (tenant, grp, type, priority) DO UPDATE SET position = excluded.position",
        )
        .bind(&tenants)
        .bind(&groups)
        .bind(&created)
        .bind(&types)
        .bind(&levels)
        .bind(&positions)
        .execute(self.store.pool())
        .await;
        if let Err(e) = written {
            // try again next round
            self.checkpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            return Err(db_err(e));
        }
        Ok(())
    }
}

/// Receives group wake-ups and replies for this replica; resubscribes after a lost connection.
async fn listen(streams: Weak<RedisStreams>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // the first session has nothing to check: this replica has added nothing yet, and it read
    // Redis' relayed position at start (its relay checks each stream against the store before it
    // first adds to it)
    let mut reconnected = false;
    loop {
        let Some(this) = streams.upgrade() else {
            return;
        };
        let client = this.client.clone();
        let wake = this.keys.wake_channel();
        let replies = this.keys.reply_channel(&this.replica);
        // marked seen before connecting: a connection made again from here on is one this
        // session may have missed, and ends it
        let mut again = this.listener_again.subscribe();
        again.borrow_and_update();
        drop(this);
        let mut subscribed = false;
        let session = async {
            // Where the address leads, read before connecting: a failover between this read and
            // the connection then costs the check one needless move, where a read after it could
            // record the new server while this session listens on the old one for good. A server
            // that refuses INFO (an ACL) leaves the listener to the READONLY case; a read that
            // fails otherwise fails the session, which starts over.
            let server = match streams.upgrade() {
                Some(this) => match this.server_run_id().await {
                    Ok(server) => server,
                    Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                        return Err(redis_err(e));
                    }
                    Err(error) => {
                        debug!(%error, "INFO server refused; the listener moves only on READONLY");
                        None
                    }
                },
                None => return Ok(Ended::Lost),
            };
            let mut pubsub = client.get_async_pubsub().await.map_err(redis_err)?;
            pubsub.subscribe(&wake).await.map_err(redis_err)?;
            pubsub.subscribe(&replies).await.map_err(redis_err)?;
            // a Redis that went away may be back from an older snapshot, holding streams shorter
            // than what was added to them: a stream that gets no new event would keep its hole
            if let Some(this) = streams.upgrade().filter(|_| reconnected) {
                this.add_lost_entries_again().await?;
            }
            // anything sent while we were away is covered by waking every local group once
            if let Some(this) = streams.upgrade() {
                let keys: Vec<GroupKey> = this
                    .wakeups
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                for key in keys {
                    this.forget_config(&key);
                    this.bump_wakeup(&key);
                }
            }
            // the session got as far as listening: a connection that fails later starts the waits over
            subscribed = true;
            // the health check compares its commands' server with it from here on
            if let Some(this) = streams.upgrade() {
                this.listening_on(server);
            }
            let mut messages = pubsub.into_on_message();
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    // the command connection was made again (its server took no writes): this
                    // one goes where it went at once, and the new session looks for lost entries
                    changed = again.changed() => match changed {
                        Ok(()) => return Ok(Ended::Again),
                        Err(_) => return Ok(Ended::Lost),
                    },
                };
                let Some(message) = message else { break };
                let Some(this) = streams.upgrade() else {
                    return Ok(Ended::Lost);
                };
                let payload: String = message.get_payload().unwrap_or_default();
                let Some((a, b)) = payload.split_once('\n') else {
                    continue;
                };
                if message.get_channel_name() == wake {
                    // a previous version sent "<name>\ndeleted" besides the plain wake: the name
                    // is the first line either way
                    let name = b.split_once('\n').map_or(b, |(name, _)| name);
                    let key = GroupKey {
                        tenant: a.to_owned(),
                        name: name.to_owned(),
                    };
                    // members read the group again at once: a deleted group's end with NOT_FOUND,
                    // and so do those of a group created again since (another creation time).
                    // The message itself ends nobody: it may arrive after a new open of the name
                    // here, whose member must go on.
                    this.forget_config(&key);
                    this.bump_wakeup(&key);
                } else if let Ok(seq) = b.parse::<u64>() {
                    // read beside the listener: a slow store must hold back neither the other
                    // replies nor the groups' wake-ups behind this one
                    let inbox = a.to_owned();
                    tokio::spawn(async move { deliver_reply(&this, &inbox, seq).await });
                }
            }
            Ok::<Ended, StreamError>(Ended::Lost)
        };
        let ended = session.await;
        reconnected = true;
        // listening nowhere until the next session says where: a check meanwhile has nothing to move
        if let Some(this) = streams.upgrade() {
            this.listening_on(None);
        }
        // waits grow only while connecting fails: replies to this replica's requesters are lost
        // while it is not subscribed
        if subscribed {
            backoff.reset();
        }
        let wait = match ended {
            _ if streams.strong_count() == 0 => return,
            Ok(Ended::Again) => continue,
            Ok(Ended::Lost) => backoff.next_wait(),
            Err(error) => {
                let wait = backoff.next_wait();
                warn!(%error, retry_in = ?wait, "redis pub/sub connection lost");
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Why a session of the pub/sub listener ended without an error.
enum Ended {
    /// The command connection was made again: connect again at once.
    Again,
    /// Its connection closed.
    Lost,
}

/// Most routed replies read from the store at once ([`RedisStreams::reply_reads`]).
const ROUTED_REPLY_READS: usize = 4;

/// Hands a reply stored by another replica, read from the store, to the requester waiting here.
/// The reply took the inbox's record there.
async fn deliver_reply(this: &RedisStreams, inbox: &str, seq: u64) {
    let sender = this
        .inboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(inbox)
        .map(|(_, tx)| tx.clone());
    // the requester stopped waiting: nothing to read
    let Some(sender) = sender.filter(|s| !s.is_closed()) else {
        return;
    };
    // never closed; the requester may have stopped waiting meanwhile
    let Ok(_reading) = this.reply_reads.acquire().await else {
        return;
    };
    // the reply is committed, and its responder was told it was delivered: read again while the
    // requester waits
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
    while !sender.is_closed() {
        match this.store.read_sequences(&[seq]).await {
            Ok(mut events) => {
                if let Some(reply) = events.pop() {
                    this.hand_over(inbox, reply);
                }
                return;
            }
            Err(error) => {
                let wait = backoff.next_wait();
                warn!(%error, inbox, seq, retry_in = ?wait, "could not read a routed reply");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Refreshes presence and checkpoints group positions until the streams are dropped.
async fn maintain(streams: Weak<RedisStreams>) {
    let mut last_presence = Instant::now();
    loop {
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        let Some(this) = streams.upgrade() else {
            return;
        };
        if let Err(error) = this.checkpoint().await {
            debug!(%error, "group checkpoint failed; retrying");
        }
        if last_presence.elapsed() >= PRESENCE_REFRESH {
            last_presence = Instant::now();
            let ids: Vec<String> = this
                .subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            for id in ids {
                if let Err(error) = this.publish_presence(&id).await {
                    debug!(%error, "presence refresh failed");
                    break;
                }
            }
        }
    }
}

/// One (tenant, stream)'s events of a relay step, in sequence order.
type StreamEvents<'a> = ((String, StreamId), Vec<&'a Arc<StoredEvent>>);

/// A group's row as last read, with the reads of it in flight and how often it was forgotten while
/// they ran: a read keeps its answer only if the count did not move. The entry goes once it holds
/// no row and no read.
#[derive(Default)]
struct CachedGroup {
    row: Option<(GroupRow, Instant)>,
    reads: u32,
    forgets: u64,
}

/// One read of a group's row in flight (see [`CachedGroup`]); ends with the read, even a cancelled
/// one.
struct GroupRead<'a> {
    configs: &'a SyncMutex<HashMap<GroupKey, CachedGroup>>,
    key: &'a GroupKey,
}

impl Drop for GroupRead<'_> {
    fn drop(&mut self) {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = configs.get_mut(self.key) {
            cached.reads -= 1;
            if cached.reads == 0 && cached.row.is_none() {
                configs.remove(self.key);
            }
        }
    }
}

/// Most events one step of [`relay`] adds to Redis.
const RELAY_BATCH: usize = 1_000;

/// Adds the events of the tail to Redis, in sequence order, until the streams are dropped. It follows
/// the tail instead of leading it: private subscribers read the tail, so they wait neither for a
/// Redis round trip nor, while Redis is down, for its retries.
async fn relay(streams: Weak<RedisStreams>) {
    let Some(appended) = streams.upgrade().map(|s| s.tail.head()) else {
        return;
    };
    // ends when the streams are dropped: the tail's sender goes with them
    crate::retry::follow(
        appended,
        "adding events to redis",
        std::future::pending(),
        |target| {
            let streams = streams.clone();
            async move { Some(streams.upgrade()?.relay_up_to(target).await) }
        },
    )
    .await;
}

impl RedisStreams {
    /// Checks the relayed position and every stream this replica added to for entries Redis lost (one
    /// pipeline), and adds them again from where the shortest one ends, before returning.
    async fn add_lost_entries_again(&self) -> StreamResult<()> {
        let remembered: Vec<((String, StreamId), u64)> = self
            .added
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, last)| (id.clone(), *last))
            .collect();
        let mut pipe = redis::pipe();
        pipe.load_script(&lua::APPEND).ignore();
        for ((tenant, stream), last) in &remembered {
            // no events: only the check of the stream's end against what was added
            pipe.invoke_script(
                lua::APPEND
                    .key(self.keys.stream(tenant, stream))
                    .arg(self.max_len)
                    .arg(*last),
            );
        }
        self.raise_relayed(&mut pipe, 0);
        let results: Vec<i64> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        let Some((&raised, results)) = results.split_last() else {
            return Err(StreamError::Internal(
                "redis answered the check of lost entries with nothing".into(),
            ));
        };
        let mut back_to = self.key_went_back(raised);
        let key_at = back_to;
        let mut lost = false;
        {
            let mut added = self.added.lock().unwrap_or_else(|p| p.into_inner());
            for ((id, _), &result) in remembered.into_iter().zip(results) {
                if result >= 0 {
                    continue;
                }
                added.remove(&id);
                lost = true;
                let top = (-1 - result) as u64;
                // an empty stream is a Redis that came back empty: groups read the store for it
                if top > 0 {
                    warn!(tenant = %id.0, stream = %id.1.event_type, top, "a redis stream lost entries it had; adding them again");
                    back_to = Some(back_to.map_or(top, |b| b.min(top)));
                }
            }
        }
        let Some(from) = back_to else {
            if lost {
                self.quiet().forget_all();
            }
            return Ok(());
        };
        {
            let _step = self.relaying.lock().await;
            self.go_back(from, key_at);
        }
        let target = *self.tail.head().borrow();
        while self.relay_up_to(target).await? {}
        Ok(())
    }

    /// Adds `RAISE` of the relayed position to `to` (0: only the check) to a pipeline.
    fn raise_relayed(&self, pipe: &mut redis::Pipeline, to: u64) {
        pipe.load_script(&lua::RAISE).ignore();
        pipe.invoke_script(
            lua::RAISE
                .key(self.keys.relayed())
                .arg(to)
                .arg(self.raised.load(Ordering::Relaxed)),
        );
    }

    /// Reads `RAISE`'s answer: the relayed position Redis went back to, if it did.
    fn key_went_back(&self, raised: i64) -> Option<u64> {
        if raised >= 0 {
            return None;
        }
        let at = (-1 - raised) as u64;
        warn!(
            relayed = at,
            seen = self.raised.load(Ordering::Relaxed),
            "redis holds an older relayed position than it did: it came back from an older snapshot \
             or log; adding every event after it again"
        );
        Some(at)
    }

    /// Goes back to `from` to add again what Redis lost after it. `key_at` is where Redis' relayed
    /// position went back to, if it did: any stream may lack entries after it, so each is added to
    /// again without the check against what this replica added before it went back (a check that
    /// refused would leave the raise in the same step to claim the entries it refused). Called
    /// holding `relaying`.
    fn go_back(&self, from: u64, key_at: Option<u64>) {
        self.relayed.send_if_modified(|r| {
            let lower = from < *r;
            *r = (*r).min(from);
            lower
        });
        if let Some(at) = key_at {
            self.added.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.raised.store(at, Ordering::Relaxed);
        }
        // after the lowering: a claim asking from now on is marked at most as of `from`
        self.quiet().forget_all();
    }

    /// Adds the next events after what this replica relayed, up to `target`; returns whether it added any.
    async fn relay_up_to(&self, target: u64) -> StreamResult<bool> {
        let _step = self.relaying.lock().await;
        let relayed = *self.relayed.borrow();
        if relayed >= target {
            return Ok(false);
        }
        let events = match self.tail.read_after(relayed, RELAY_BATCH) {
            TailRead::Events(events) => events,
            // Redis fell behind the tail's window (a long outage): read the store
            TailRead::Trimmed { .. } => self.store.read_all(relayed, RELAY_BATCH).await?,
        };
        let Some(last) = events.last().map(|e| e.sequence) else {
            return Ok(false);
        };
        #[cfg(debug_assertions)]
        if std::env::var("NERVE_TEST_FAULT").as_deref() == Ok("abort-before-stream-append") {
            // test-only: a crash between the commit and the stream write
            std::process::abort();
        }
        let mut by_stream: Vec<StreamEvents<'_>> = Vec::new();
        let mut index: HashMap<(String, StreamId), usize> = HashMap::new();
        for event in &events {
            let id = (event.tenant.clone(), StreamId::of(&event.event));
            let i = *index.entry(id.clone()).or_insert_with(|| {
                by_stream.push((id, Vec::new()));
                by_stream.len() - 1
            });
            by_stream[i].1.push(event);
        }
        // what this replica added last to each stream, read once: a reconnect check may forget a
        // stream while the store is read below, and what was read stays a valid check
        let last_added: Vec<Option<u64>> = {
            let added = self.added.lock().unwrap_or_else(|p| p.into_inner());
            by_stream
                .iter()
                .map(|(id, _)| added.get(id).copied())
                .collect()
        };
        // a stream this replica has not added to since it started (or went back) is checked against
        // the store instead: it must hold its last event up to `relayed`, or it lost entries (added
        // before then) that this batch would hide for good; a store read in the steps that first
        // add to a stream since the start or since going back
        let unchecked: Vec<usize> = (0..by_stream.len())
            .filter(|&i| last_added[i].is_none())
            .collect();
        let mut must_hold: Vec<Option<u64>> = vec![None; by_stream.len()];
        if !unchecked.is_empty() {
            let streams: Vec<(&str, &str, i16)> = unchecked
                .iter()
                .map(|&i| {
                    let (tenant, stream) = &by_stream[i].0;
                    (
                        tenant.as_str(),
                        stream.event_type.as_str(),
                        stream.level as i16,
                    )
                })
                .collect();
            let ends = self.store.stream_ends(&streams, relayed).await?;
            for (&i, end) in unchecked.iter().zip(ends) {
                must_hold[i] = end;
            }
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&lua::APPEND).ignore();
        for (i, (id, events)) in by_stream.iter().enumerate() {
            // what this replica added last, or minus what the store says the stream must hold
            let expected = match (last_added[i], must_hold[i]) {
                (Some(last), _) => last as i64,
                (None, Some(end)) => -(end as i64),
                (None, None) => 0,
            };
            let mut call = lua::APPEND.prepare_invoke();
            call.key(self.keys.stream(&id.0, &id.1))
                .arg(self.max_len)
                .arg(expected);
            for e in events {
                let body = body::encode(&e.event);
                call.arg(e.sequence)
                    .arg(body)
                    .arg(e.recorded_at.timestamp_nanos_opt().unwrap_or_default());
            }
            pipe.invoke_script(&call);
        }
        // after the appends: a Redis that lost entries this replica added also lost this replica's
        // raise past them, so the script refuses then (a Redis back empty has no key to refuse with:
        // there the appends' checks alone keep streams whole)
        self.raise_relayed(&mut pipe, last);
        let results: Vec<i64> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        let Some((&raised, appended)) = results.split_last() else {
            return Err(StreamError::Internal(
                "redis answered a relay step with nothing".into(),
            ));
        };
        // where to go back to when Redis lost entries this replica had added
        let mut back_to = self.key_went_back(raised);
        let key_at = back_to;
        if key_at.is_none() {
            // only the relay's own steps move it up: a check's answer may predate a go-back
            self.raised.fetch_max(raised as u64, Ordering::Relaxed);
        }
        {
            let mut added = self.added.lock().unwrap_or_else(|p| p.into_inner());
            let mut known = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            let mut quiet = self.quiet();
            for ((id, events), &result) in by_stream.into_iter().zip(appended) {
                if result < 0 {
                    let top = (-1 - result) as u64;
                    // an empty stream is a Redis that came back empty: groups read the store for
                    // what it lacks, so only this batch is added again; else from the stream's top
                    let from = if top == 0 { relayed } else { top };
                    warn!(tenant = %id.0, stream = %id.1.event_type, top, from, "a redis stream lost entries it had; adding them again");
                    back_to = Some(back_to.map_or(from, |b| b.min(from)));
                    added.remove(&id);
                    continue;
                }
                if let Some(last) = events.last() {
                    added.insert(id.clone(), last.sequence);
                    quiet.relayed(&id.0, &id.1, last.sequence);
                }
                // also before the tenant is seeded: a read of its statistics in flight may not
                // hold this stream yet
                known.entry(id.0).or_default().streams.insert(id.1);
            }
        }
        if let Some(from) = back_to {
            // entries added again may land behind cursors that passed them
            self.go_back(from, key_at);
            return Ok(true);
        }
        self.relayed.send_if_modified(|r| {
            let moved = last > *r;
            *r = (*r).max(last);
            moved
        });
        Ok(true)
    }
}

/// A subscriber being joined: when dropped before it has joined, removed from `subscribers`, and
/// its presence record from Redis.
struct Joining<'a> {
    streams: &'a RedisStreams,
    id: &'a str,
    presence_key: String,
    joined: bool,
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        if self.joined {
            return;
        }
        self.streams
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.id);
        // a presence write already sent still goes through (a cancelled call does not recall it);
        // sent after it on the same connection, this removes it, instead of leaving a responder
        // for every replica to count until it expires
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut conn = self.streams.conn();
            let key = std::mem::take(&mut self.presence_key);
            let id = self.id.to_owned();
            runtime.spawn(async move {
                let _: redis::RedisResult<i64> = conn.hdel(key, id).await;
            });
        }
    }
}

#[async_trait]
impl LiveStreams for RedisStreams {
    async fn append(&self, events: &[Arc<StoredEvent>]) -> StreamResult<()> {
        // private subscribers read the tail, which needs no Redis; `relay` adds the events to Redis
        self.tail.push(events);
        Ok(())
    }

    async fn last_appended(&self) -> StreamResult<u64> {
        Ok(self.tail.last())
    }

    async fn read_after(&self, after: u64, max: usize) -> StreamResult<TailRead> {
        Ok(self.tail.read_after(after, max))
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.tail.head()
    }

    fn group_head(&self) -> watch::Receiver<u64> {
        self.relayed.subscribe()
    }

    async fn ensure_group(
        &self,
        key: &GroupKey,
        config: &GroupConfig,
        start_after: u64,
    ) -> StreamResult<GroupSettings> {
        let mut tx = self.store.pool().begin().await.map_err(db_err)?;
        let now_ns = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        // a loop only while a DeleteGroup removes the row between the insert that found it and the
        // lock (each statement sees what committed before it)
        let created_ns = loop {
            let created = sqlx::query(
                "INSERT INTO nerve_groups (tenant, name, selection, max_attempts, start_after, created_ns) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, name) DO NOTHING",
            )
            .bind(&key.tenant)
            .bind(&key.name)
            .bind(config.selection.to_json())
            .bind(config.max_attempts as i32)
            .bind(start_after as i64)
            .bind(now_ns)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected()
                == 1;
            if created {
                // letters recorded under the name after the delete's transaction (a member of the
                // deleted group whose ack went through before the delete reached Redis), or left by
                // an older build's delete, are not this group's
                sqlx::query("DELETE FROM dead_letters WHERE tenant = $1 AND grp = $2")
                    .bind(&key.tenant)
                    .bind(&key.name)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                // a DeleteGroup that failed on Redis after the row went (or is still clearing it)
                // leaves consumer groups and ledgers under the name: the new group must not take
                // over their cursors and entries. Cleared before the commit, so no member of the new
                // group (here or on another replica, whose insert waits for this one) claims before.
                // Read through the transaction: a second connection could wait for a pool this open
                // holds.
                let streams: Vec<StreamId> = self
                    .every_stream(&mut *tx, &key.tenant)
                    .await?
                    .into_iter()
                    .collect();
                self.destroy_on(key, &streams).await?;
                break now_ns;
            }
            // locked until the update: an open with other types cannot slip in between
            let Some((stored, created)): Option<(String, i64)> = sqlx::query_as(
                "SELECT selection, created_ns FROM nerve_groups WHERE tenant = $1 AND name = $2 FOR UPDATE",
            )
            .bind(&key.tenant)
            .bind(&key.name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?
            else {
                continue;
            };
            super::check_group_types(key, &stored, &config.selection)?;
            sqlx::query(
                "UPDATE nerve_groups SET selection = $3, max_attempts = $4 WHERE tenant = $1 AND name = $2",
            )
            .bind(&key.tenant)
            .bind(&key.name)
            .bind(config.selection.to_json())
            .bind(config.max_attempts as i32)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            break created;
        };
        tx.commit().await.map_err(db_err)?;
        self.forget_config(key);
        self.wake_group(key).await?;
        Ok(GroupSettings {
            max_attempts: config.max_attempts,
            created_ns,
        })
    }

    async fn group_settings(&self, key: &GroupKey) -> StreamResult<GroupSettings> {
        let row = self.group_row(key).await?;
        Ok(GroupSettings {
            max_attempts: row.config.max_attempts,
            created_ns: row.created_ns,
        })
    }

    async fn set_group_selection(
        &self,
        key: &GroupKey,
        created_ns: i64,
        selection: &Selection,
    ) -> StreamResult<()> {
        let updated = sqlx::query(
            "UPDATE nerve_groups SET selection = $1 \
             WHERE tenant = $2 AND name = $3 AND created_ns = $4",
        )
        .bind(selection.to_json())
        .bind(&key.tenant)
        .bind(&key.name)
        .bind(created_ns)
        .execute(self.store.pool())
        .await
        .map_err(db_err)?;
        if updated.rows_affected() == 0 {
            return Err(StreamError::NoSuchGroup(key.name.clone()));
        }
        self.forget_config(key);
        self.wake_group(key).await
    }

    async fn claim_new(
        &self,
        key: &GroupKey,
        _consumer: &str,
        level: Priority,
        max: usize,
        lease_until: DateTime<Utc>,
    ) -> StreamResult<NewClaim> {
        // how long what this claim leases stays leased, from when each of its calls runs
        let lease = (lease_until - Utc::now()).max(chrono::Duration::zero());
        let row = self.group_row(key).await?;
        let streams = self
            .group_streams(key, &row.config.selection, Some(level))
            .await?;
        // before anything is asked: what a stream is found quiet as of
        let asked = self.quiet().ask(*self.relayed.borrow());
        let streams = self
            .streams_with_new(key, row.created_ns, streams, asked)
            .await?;
        let mut taken = Vec::new();
        // entries read, matching or not, and their events' bytes
        let mut read_count = (0, 0);
        // every entry this claim leased, taken or not yet: if the claim fails part way, they go back
        let mut leased: Vec<(u64, u32)> = Vec::new();
        // start at a different stream each time so one busy type cannot starve the others
        let offset = if streams.is_empty() {
            0
        } else {
            (Utc::now().timestamp_subsec_nanos() as usize) % streams.len()
        };
        let claimed: StreamResult<bool> = async {
            let mut rounds = 0;
            for stream in streams.iter().cycle().skip(offset).take(streams.len()) {
                loop {
                    let want = max - taken.len();
                    if want == 0 {
                        break;
                    }
                    let (events, more) = self
                        .claim_stream(key, &row, stream, want, lease, &mut read_count)
                        .await?;
                    self.remember(&key.tenant, events.iter().map(|e| e.0), stream);
                    leased.extend(events.iter().map(|e| (e.0, 1)));
                    taken.extend(events.into_iter().map(|(sequence, event)| Claimed {
                        sequence,
                        attempt: 1,
                        event,
                        priority: level,
                        last_error: None,
                    }));
                    if !more {
                        // read to its end after `asked`: what was there then is behind the cursor
                        self.quiet()
                            .mark(asked, key, row.created_ns, stream.clone());
                        break;
                    }
                    // only reads that leave more of their stream behind count
                    rounds += 1;
                    if rounds >= CLAIM_ROUNDS && taken.len() < max {
                        return Ok(true);
                    }
                }
                if taken.len() >= max {
                    break;
                }
            }
            // every stream was read to its end or the claim is full
            Ok(false)
        }
        .await;
        match claimed {
            Ok(more) => Ok(NewClaim {
                entries: taken,
                more,
                rows_read: read_count.0,
                bytes_read: read_count.1,
            }),
            Err(error) => {
                self.hand_back(key, &leased).await;
                Err(error)
            }
        }
    }

    async fn claim_due(
        &self,
        key: &GroupKey,
        _consumer: &str,
        max: usize,
        lease_until: DateTime<Utc>,
    ) -> StreamResult<Vec<Claimed>> {
        // as a claim of new entries: each call leases for the whole time from when it runs
        let lease = (lease_until - Utc::now()).max(chrono::Duration::zero());
        let row = self.group_row(key).await?;
        let streams = self.group_streams(key, &row.config.selection, None).await?;
        let now = ms(Utc::now());
        // most urgent level first; within a level, the stream whose entry has been due longest, so
        // one type's entry failing again at once does not keep the others' behind it
        let mut streams = self.streams_with_due(key, streams, now).await?;
        streams.sort_by_key(|(s, due)| (std::cmp::Reverse(s.level), *due));
        let mut claimed: Vec<Claimed> = Vec::new();
        for (stream, _) in streams {
            if claimed.len() >= max {
                break;
            }
            let reply: Vec<Vec<u8>> = match lua::CLAIM_DUE
                .key(self.keys.stream(&key.tenant, &stream))
                .key(self.keys.ledgers(key, &stream, LEDGERS))
                .arg(now)
                .arg(ms(Utc::now() + lease))
                .arg(max - claimed.len())
                .invoke_async(&mut self.conn())
                .await
            {
                Ok(reply) => reply,
                Err(error) => {
                    let leased: Vec<(u64, u32)> =
                        claimed.iter().map(|c| (c.sequence, c.attempt)).collect();
                    self.hand_back(key, &leased).await;
                    return Err(redis_err(error));
                }
            };
            let mut seqs = Vec::new();
            for c in reply.chunks(5) {
                let [seq, attempt, body, recorded, error] = c else {
                    continue;
                };
                let Some(sequence) = number(seq) else {
                    continue;
                };
                seqs.push(sequence);
                claimed.push(Claimed {
                    sequence,
                    attempt: number(attempt).unwrap_or(1),
                    event: self.decode(&key.tenant, sequence, body, recorded),
                    priority: stream.priority(),
                    last_error: (!error.is_empty())
                        .then(|| String::from_utf8_lossy(error).into_owned()),
                });
            }
            self.remember(&key.tenant, seqs.into_iter(), &stream);
        }
        Ok(claimed)
    }

    async fn next_due(&self, key: &GroupKey) -> StreamResult<Option<DateTime<Utc>>> {
        let row = self.group_row(key).await?;
        let streams = self.group_streams(key, &row.config.selection, None).await?;
        if streams.is_empty() {
            return Ok(None);
        }
        Ok(self
            .earliest_due(key, &streams)
            .await?
            .into_iter()
            .flatten()
            .min()
            .and_then(DateTime::from_timestamp_millis))
    }

    async fn ack(&self, key: &GroupKey, deliveries: &[(u64, u32)]) -> StreamResult<Vec<bool>> {
        let mut out = vec![false; deliveries.len()];
        for (stream, indexes) in self.by_stream(&key.tenant, deliveries).await? {
            // first deliveries go as ranges of sequences, later attempts as (sequence, attempt) pairs
            let (firsts, later): (Vec<usize>, Vec<usize>) =
                indexes.into_iter().partition(|i| deliveries[*i].1 == 1);
            let mut first_seqs: Vec<u64> = firsts.iter().map(|i| deliveries[*i].0).collect();
            first_seqs.sort_unstable();
            let ranges = seq_ranges(first_seqs.iter().copied());
            let mut call = lua::ACK.prepare_invoke();
            call.key(self.keys.stream(&key.tenant, &stream))
                .key(self.keys.ledgers(key, &stream, LEDGERS))
                .arg(&key.name)
                .arg(ranges.len() * 2);
            for (first, last) in &ranges {
                call.arg(*first).arg(*last);
            }
            for i in &later {
                call.arg(deliveries[*i].0).arg(deliveries[*i].1);
            }
            let (unsettled, flags): (Vec<u64>, Vec<i64>) = call
                .invoke_async(&mut self.conn())
                .await
                .map_err(redis_err)?;
            let unsettled: HashSet<u64> = unsettled.into_iter().collect();
            // an ack repeated in the same call counts once
            let repeated = first_seqs.windows(2).any(|w| w[0] == w[1]);
            let mut counted = HashSet::new();
            for i in firsts {
                let seq = deliveries[i].0;
                out[i] = !unsettled.contains(&seq) && (!repeated || counted.insert(seq));
            }
            for (i, flag) in later.into_iter().zip(flags) {
                out[i] = flag == 1;
            }
        }
        let settled = deliveries.iter().zip(&out).filter(|(_, done)| **done);
        self.forget(&key.tenant, settled.map(|((seq, _), _)| *seq));
        Ok(out)
    }

    async fn set_visible_at(
        &self,
        key: &GroupKey,
        deliveries: &[(u64, u32)],
        visible_at: DateTime<Utc>,
        error: Option<&str>,
    ) -> StreamResult<Vec<bool>> {
        self.move_leases(key, deliveries, visible_at, error, true)
            .await
    }

    async fn release_unsent(
        &self,
        key: &GroupKey,
        deliveries: &[(u64, u32)],
    ) -> StreamResult<Vec<bool>> {
        self.move_leases(key, deliveries, Utc::now(), None, false)
            .await
    }

    async fn requeue(
        &self,
        key: &GroupKey,
        created_ns: i64,
        events: &[Arc<StoredEvent>],
    ) -> StreamResult<Vec<u64>> {
        // the group's row held (FOR SHARE) while Redis is written: a delete waits for it, and then
        // clears what this put back, instead of leaving it to a group created again under the name
        let mut tx = self.store.pool().begin().await.map_err(db_err)?;
        let exists: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM nerve_groups WHERE tenant = $1 AND name = $2 AND created_ns = $3 FOR SHARE",
        )
        .bind(&key.tenant)
        .bind(&key.name)
        .bind(created_ns)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        if exists.is_none() {
            return Err(StreamError::NoSuchGroup(key.name.clone()));
        }
        let mut by_stream: HashMap<StreamId, Vec<u64>> = HashMap::new();
        for e in events {
            by_stream
                .entry(StreamId::of(&e.event))
                .or_default()
                .push(e.sequence);
        }
        let now = ms(Utc::now());
        let mut added = Vec::new();
        // per stream, the position below the first entry put back
        let mut lowered: Vec<(StreamId, u64)> = Vec::new();
        for (stream, seqs) in by_stream {
            let mut call = lua::REQUEUE.prepare_invoke();
            call.key(
                self.keys
                    .ledgers(key, &stream, &["due", "att", "pos", "runs", "bits"]),
            )
            .arg(now);
            for s in &seqs {
                call.arg(*s);
            }
            let put_back: Vec<u64> = call
                .invoke_async(&mut self.conn())
                .await
                .map_err(redis_err)?;
            if let Some(first) = put_back.iter().min() {
                lowered.push((stream.clone(), first - 1));
            }
            added.extend(put_back);
            self.remember(&key.tenant, seqs.into_iter(), &stream);
            self.streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.tenant.clone())
                .or_default()
                .streams
                .insert(stream);
        }
        // What was put back is unsettled again, below the group's checkpoints: they go below it
        // before the caller removes the letters, so a Redis that comes back empty (groups made again
        // at their checkpoints) still has it to deliver. Replicas with members of the group write
        // them from Redis each second; with none, nothing else would. A stream with no checkpoint
        // starts again at the group's start, below anything delivered: none is made (one made here
        // would start it past entries still leased below the redriven ones).
        if !lowered.is_empty() {
            let types: Vec<&str> = lowered.iter().map(|l| l.0.event_type.as_str()).collect();
            let levels: Vec<i16> = lowered.iter().map(|l| l.0.level as i16).collect();
            let positions: Vec<i64> = lowered.iter().map(|l| l.1 as i64).collect();
            sqlx::query(
                "UPDATE nerve_group_checkpoints k SET position = LEAST(k.position, c.position) \
                 FROM UNNEST($3::TEXT[], $4::SMALLINT[], $5::BIGINT[]) AS c(type, priority, position) \
                 WHERE k.tenant = $1 AND k.grp = $2 AND k.type = c.type AND k.priority = c.priority",
            )
            .bind(&key.tenant)
            .bind(&key.name)
            .bind(&types)
            .bind(&levels)
            .bind(&positions)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            // this replica's next checkpoint of them is written, even if it equals its last
            let mut written = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
            for (stream, _) in &lowered {
                written.remove(&(key.clone(), stream.clone()));
            }
        }
        tx.commit().await.map_err(db_err)?;
        Ok(added)
    }

    fn group_wakeups(&self, key: &GroupKey) -> watch::Receiver<u64> {
        let mut wakeups = self.wakeups.lock().unwrap_or_else(|p| p.into_inner());
        // groups every member left (or deleted ones): nobody to wake
        wakeups.retain(|k, tx| k == key || tx.receiver_count() > 0);
        wakeups
            .entry(key.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    async fn wake_group(&self, key: &GroupKey) -> StreamResult<()> {
        self.bump_wakeup(key);
        let _: i64 = self
            .conn()
            .publish(
                self.keys.wake_channel(),
                format!("{}\n{}", key.tenant, key.name),
            )
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn group_tenants(&self) -> StreamResult<Vec<String>> {
        sqlx::query_scalar("SELECT DISTINCT tenant FROM nerve_groups ORDER BY tenant")
            .fetch_all(self.store.pool())
            .await
            .map_err(db_err)
    }

    async fn group_names(&self, tenant: &str) -> StreamResult<Vec<String>> {
        sqlx::query_scalar(
            "SELECT name FROM nerve_groups WHERE tenant = $1 ORDER BY name COLLATE \"C\"",
        )
        .bind(tenant)
        .fetch_all(self.store.pool())
        .await
        .map_err(db_err)
    }

    async fn groups(&self, tenant: &str, names: &[String]) -> StreamResult<Vec<GroupStats>> {
        let mut consumers: HashMap<String, u32> = HashMap::new();
        for record in self.presence(tenant).await? {
            if let Some(g) = record.group {
                *consumers.entry(g).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for name in names {
            let key = GroupKey {
                tenant: tenant.to_owned(),
                name: name.clone(),
            };
            // the store's row, not the cached one: a group deleted on another replica is gone at
            // once, not when this replica hears of it
            let row = match self.read_group_row(&key).await {
                Ok(row) => row,
                // deleted since the names were read
                Err(StreamError::NoSuchGroup(_)) => continue,
                // a failed read is not an empty answer
                Err(e) => return Err(e),
            };
            let streams = self
                .group_streams(&key, &row.config.selection, None)
                .await?;
            let mut positions = Vec::with_capacity(streams.len());
            let mut pending = 0;
            if !streams.is_empty() {
                let mut pipe = redis::pipe();
                pipe.load_script(&lua::GROUP_STATE).ignore();
                for s in &streams {
                    pipe.invoke_script(
                        lua::GROUP_STATE
                            .key(self.keys.stream(tenant, s))
                            .key(self.keys.ledgers(&key, s, &["due", "pos", "runs", "bits"]))
                            .arg(&key.name),
                    );
                }
                let states: Vec<Vec<String>> = pipe
                    .query_async(&mut self.conn())
                    .await
                    .map_err(redis_err)?;
                for (s, state) in streams.iter().zip(states) {
                    let index = Priority::ALL
                        .iter()
                        .position(|p| level_number(*p) == s.level)
                        .unwrap_or(2);
                    // each stream's own cursor: a group claims stream by stream, so one stream of a
                    // level can be far behind another
                    let last = state
                        .first()
                        .and_then(|l| l.parse::<u64>().ok())
                        .unwrap_or(0);
                    let mut cursors = [u64::MAX; 4];
                    cursors[index] = last.max(row.start_after);
                    let literal = TypePattern::parse(&s.event_type).map_err(|e| {
                        StreamError::Internal(format!("stream type {:?}: {e}", s.event_type))
                    })?;
                    let selection = Selection {
                        types: vec![literal],
                        filter: row.config.selection.filter.clone(),
                    };
                    positions.push((selection, cursors));
                    pending += state
                        .get(2)
                        .and_then(|p| p.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
            out.push(GroupStats {
                consumers: consumers.get(&key.name).copied().unwrap_or(0),
                key,
                config: row.config,
                created_ns: row.created_ns,
                pending,
                positions,
            });
        }
        Ok(out)
    }

    async fn delete_group(&self, key: &GroupKey) -> StreamResult<bool> {
        // no early return for a group the store no longer has: a delete that failed on Redis after
        // the store's row went is retried, and must still clear what Redis holds of the group
        // the store's row first: a member that then finds its consumer group gone does not create it
        // again (claim_stream asks the store), so no ledger outlives the group
        let mut tx = self.store.pool().begin().await.map_err(db_err)?;
        let deleted = sqlx::query("DELETE FROM nerve_groups WHERE tenant = $1 AND name = $2")
            .bind(&key.tenant)
            .bind(&key.name)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected()
            > 0;
        sqlx::query("DELETE FROM nerve_group_checkpoints WHERE tenant = $1 AND grp = $2")
            .bind(&key.tenant)
            .bind(&key.name)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        // with the row: a delete that then fails on Redis leaves no letters to a group created again
        let letters = sqlx::query("DELETE FROM dead_letters WHERE tenant = $1 AND grp = $2")
            .bind(&key.tenant)
            .bind(&key.name)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
        tx.commit().await.map_err(db_err)?;
        let deleted = deleted || letters > 0;
        // every stream of the tenant, not only those of the group's types (a member that opened
        // with other types left consumer groups and pending entries there, which a group created
        // again under the name would otherwise take over), read after the commit: a member that
        // creates a consumer group on a stream the read does not know yet finds the row gone
        // and removes it
        let streams: Vec<StreamId> = self
            .every_stream(self.store.pool(), &key.tenant)
            .await?
            .into_iter()
            .collect();
        self.forget_config(key);
        // the members, here and on the other replicas, read the group at once: it is gone (or
        // another group, created again since), and they end. Nobody is ended here directly: an
        // open of the name since the commit is a member of the new group, and goes on.
        self.wake_group(key).await?;
        self.destroy_on(key, &streams).await?;
        // a group created again meanwhile may have found the old consumer groups' cursors with
        // nothing new, here or elsewhere: those marks go with the consumer groups they came from
        self.forget_config(key);
        self.wake_group(key).await?;
        self.checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(g, _), _| g != key);
        Ok(deleted)
    }

    async fn join(
        &self,
        id: &str,
        group: Option<&GroupKey>,
        interest: Interest,
    ) -> StreamResult<()> {
        let presence_key = self.keys.presence(&interest.tenant);
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.to_owned(),
                Subscriber {
                    group: group.cloned(),
                    interest,
                },
            );
        // Until the presence is written, a failure, or the caller going away (a cancelled open:
        // this future dropped), removes the subscriber again (and its presence): the session that
        // would remove it never starts, and kept it would count as a consumer and responder,
        // refreshed for ever.
        let mut joining = Joining {
            streams: self,
            id,
            presence_key,
            joined: false,
        };
        self.publish_presence(id).await?;
        joining.joined = true;
        Ok(())
    }

    async fn update_interest(&self, id: &str, interest: Interest) -> StreamResult<()> {
        if let Some(s) = self
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            s.interest = interest;
        }
        self.publish_presence(id).await
    }

    async fn leave(&self, id: &str) -> StreamResult<()> {
        let removed = self
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(s) = removed {
            let _: i64 = self
                .conn()
                .hdel(self.keys.presence(&s.interest.tenant), id)
                .await
                .map_err(redis_err)?;
        }
        Ok(())
    }

    async fn has_interest(&self, tenant: &str, event: &Event) -> StreamResult<bool> {
        // a member receives what its group selects: the latest open or setFilter of any member
        // decides the group's filter, so a group member counts by its group's selection
        let mut groups = BTreeSet::new();
        let local = self
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.interest.tenant == tenant)
            .any(|s| match &s.group {
                Some(key) => {
                    groups.insert(key.name.clone());
                    false
                }
                None => s.interest.selection.matches(event),
            });
        if local {
            return Ok(true);
        }
        for record in self.presence(tenant).await? {
            match record.group {
                Some(name) => {
                    groups.insert(name);
                }
                None => {
                    if Selection::from_json(&record.selection).is_ok_and(|s| s.matches(event)) {
                        return Ok(true);
                    }
                }
            }
        }
        for name in groups {
            let key = GroupKey {
                tenant: tenant.to_owned(),
                name,
            };
            match self.group_row(&key).await {
                Ok(row) if row.config.selection.matches(event) => return Ok(true),
                Ok(_) | Err(StreamError::NoSuchGroup(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    async fn open_inbox(
        &self,
        inbox: &str,
        info: Inbox,
    ) -> StreamResult<mpsc::Receiver<Arc<StoredEvent>>> {
        let record = serde_json::to_string(&InboxRecord {
            tenant: info.tenant.clone(),
            correlation_id: info.correlation_id.clone(),
            request_id: info.request_id.clone(),
            request_source: info.request_source.clone(),
            request_type: info.request_type.clone(),
            traceparent: info.traceparent.clone(),
            replica: self.replica.clone(),
        })
        .map_err(|e| StreamError::Internal(e.to_string()))?;
        let (tx, rx) = mpsc::channel(1);
        self.inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(inbox.to_owned(), (info, tx));
        // on failure (or when the requester goes away meanwhile) the request's inbox guard closes it
        let _: () = self
            .conn()
            .pset_ex(self.keys.inbox(inbox), record, self.inbox_ttl_ms)
            .await
            .map_err(redis_err)?;
        Ok(rx)
    }

    async fn inbox(&self, inbox: &str) -> StreamResult<Option<Inbox>> {
        if let Some((info, _)) = self
            .inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(inbox)
        {
            return Ok(Some(info.clone()));
        }
        let raw: Option<String> = self
            .conn()
            .get(self.keys.inbox(inbox))
            .await
            .map_err(redis_err)?;
        // one a reply took is still the inbox: a retry of that reply, on any replica, is handed
        // over again, and a later one is stored and told it was not delivered
        Ok(raw
            .and_then(|r| {
                let record = lua::taken_by(&r).map_or(r.as_str(), |(_, record)| record);
                serde_json::from_str::<InboxRecord>(record).ok()
            })
            .map(|r| Inbox {
                tenant: r.tenant,
                correlation_id: r.correlation_id,
                request_id: r.request_id,
                request_source: r.request_source,
                request_type: r.request_type,
                traceparent: r.traceparent,
            }))
    }

    async fn send_reply(&self, inbox: &str, reply: Arc<StoredEvent>) -> StreamResult<bool> {
        // The first reply takes the inbox's record, on whichever replica it comes: a later one, here
        // or elsewhere, finds it taken. A retry of the same reply (its call failed after the take)
        // finds it its own, and hands the reply over again.
        let taken: Option<(String, i64)> = lua::TAKE_INBOX
            .key(self.keys.inbox(inbox))
            .arg(reply.sequence)
            .arg(lua::TAKEN)
            .invoke_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        let Some((taken, now)) = taken else {
            // Closed, or lost by Redis (restarted without its data): only a requester still waiting
            // here is reached, since closing forgets the inbox here before it deletes the record.
            return Ok(self.hand_over(inbox, reply));
        };
        let Some((raw, record)) = lua::taken_by(&taken)
            .filter(|(by, _)| *by == reply.sequence.to_string())
            .and_then(|(_, raw)| Some((raw, serde_json::from_str::<InboxRecord>(raw).ok()?)))
        else {
            return Ok(false);
        };
        // A take that reached nobody is given back (below), so a take found standing from an
        // earlier call of this reply got it through, or that call's answer was lost before it
        // could: handed over now where nothing is left to hand, it was delivered.
        let retry = now == 0;
        let reached = if record.replica == self.replica {
            self.hand_over(inbox, reply) || retry
        } else {
            let receivers: i64 = self
                .conn()
                .publish(
                    self.keys.reply_channel(&record.replica),
                    format!("{inbox}\n{}", reply.sequence),
                )
                .await
                .map_err(redis_err)?;
            receivers > 0
        };
        if !reached {
            // nobody waits here, or the requester's replica is not listening: another reply may
            // still reach the requester
            let _: i64 = lua::UNTAKE_INBOX
                .key(self.keys.inbox(inbox))
                .arg(&taken)
                .arg(raw)
                .invoke_async(&mut self.conn())
                .await
                .map_err(redis_err)?;
        }
        Ok(reached)
    }

    async fn close_inbox(&self, inbox: &str) -> StreamResult<()> {
        self.inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(inbox);
        let _: i64 = self
            .conn()
            .del(self.keys.inbox(inbox))
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn ping(&self) -> StreamResult<()> {
        // a write: a replica answers a PING, but not the writes every group and relay step make
        let written: redis::RedisResult<()> = redis::cmd("SET")
            .arg(self.keys.health())
            .arg(&self.replica)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut self.conn())
            .await;
        match written {
            Err(e) if e.code() == Some("READONLY") => {
                // a connection made again reaches whatever the address leads to now (a DNS name or
                // proxy that follows the primary)
                let conn = ConnectionManager::new_with_config(
                    self.client.clone(),
                    self.conn_config.clone(),
                )
                .await
                .map_err(redis_err)?;
                *self.conn.write().unwrap_or_else(|p| p.into_inner()) = conn;
                self.listener_again.send_modify(|made| *made += 1);
                warn!(error = %e, "redis takes no writes (a replica); connected again");
                Err(redis_err(e))
            }
            Err(e) => Err(redis_err(e)),
            Ok(()) => {
                self.follow_command_connection().await;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{redis_err, seq_ranges};
    use crate::stream::StreamError;

    /// The error Redis answers with `line` (as sent: "-CODE message").
    fn answered(line: &str) -> redis::RedisError {
        let reply =
            redis::parse_redis_value(format!("{line}\r\n").as_bytes()).expect("a RESP error line");
        match reply.extract_error() {
            Err(error) => error,
            Ok(value) => panic!("{line:?} parsed as {value:?}, not an error"),
        }
    }

    /// A pipeline's error of a code the client does not know (BUSY, OOM) passes as well. Needs
    /// NERVE_TEST_REDIS_URL (scripts/test.sh starts Redis and sets it).
    #[tokio::test]
    async fn a_pipelines_passing_answer_is_unavailable() {
        let url = std::env::var("NERVE_TEST_REDIS_URL")
            .expect("NERVE_TEST_REDIS_URL is not set: run scripts/test.sh");
        let client = redis::Client::open(url).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        for (code, passes) in [("BUSY", true), ("OOM", true), ("WRONGTYPE", false)] {
            let mut pipe = redis::pipe();
            pipe.cmd("PING").ignore();
            pipe.cmd("EVAL")
                .arg(format!("return redis.error_reply('{code} pretended')"))
                .arg(0);
            let error = pipe
                .query_async::<Vec<redis::Value>>(&mut conn)
                .await
                .expect_err("the script answers an error");
            let mapped = redis_err(error);
            assert_eq!(
                matches!(mapped, StreamError::Unavailable(_)),
                passes,
                "{code}: {mapped:?}"
            );
        }
    }

    #[test]
    fn redis_answers_that_pass_are_unavailable_others_internal() {
        for line in [
            "-LOADING Redis is loading the dataset in memory",
            "-READONLY You can't write against a read only replica.",
            "-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "-BUSY Redis is busy running a script.",
            "-OOM command not allowed when used memory > 'maxmemory'.",
        ] {
            assert!(
                matches!(redis_err(answered(line)), StreamError::Unavailable(_)),
                "{line}"
            );
        }
        for line in [
            "-ERR unknown command 'NOPE'",
            "-WRONGTYPE Operation against a key holding the wrong kind of value",
            "-NOSCRIPT No matching script.",
        ] {
            assert!(
                matches!(redis_err(answered(line)), StreamError::Internal(_)),
                "{line}"
            );
        }
    }

    #[test]
    fn sequences_become_ranges_of_consecutive_ones() {
        assert_eq!(seq_ranges([]), Vec::<(u64, u64)>::new());
        assert_eq!(seq_ranges([7]), vec![(7, 7)]);
        assert_eq!(seq_ranges([1, 2, 3, 5, 6, 9]), vec![(1, 3), (5, 6), (9, 9)]);
        // a repeated sequence stays in its range
        assert_eq!(seq_ranges([4, 4, 5]), vec![(4, 5)]);
    }
}
