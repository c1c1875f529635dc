//! The event store: the durable, totally ordered log every event is committed to, plus dead letters,
//! registered publishers and the audit log.
//!
//! One trait, two implementations: SQLite (embedded default) and Postgres (production).

pub mod body;
mod commit;
mod postgres;
pub(crate) mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// Commits the embedded writer runs ahead of its log sync, for the benchmark tool's floors.
pub use commit::COMMITS_AWAITING_SYNC;
pub use postgres::PostgresStore;
/// How the embedded store keeps its log, for the benchmark tool's SQLite floor to keep its own alike.
pub use sqlite::{
    CHECKPOINT_EVERY as SQLITE_CHECKPOINT_EVERY, WAL_BACKSTOP_PAGES as SQLITE_BACKSTOP_PAGES,
    WAL_SIZE_LIMIT as SQLITE_SIZE_LIMIT,
};
pub use sqlite::{SqliteDb, SqliteStore};

use crate::event::{Event, Selection, StoredEvent, TypePattern};

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The same (source, id) is stored with different content.
    #[error("event {id:?} from source {event_source:?} already exists with different content")]
    Conflict { event_source: String, id: String },
    /// The database does not answer.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded, or the database failed in an unexpected way.
    #[error("event store failure: {0}")]
    Internal(String),
}

/// Result alias of the store layer.
pub type StoreResult<T> = Result<T, StoreError>;

pub use commit::Queued;

/// Decodes a stored body; one that cannot be decoded is a store failure.
pub(crate) fn decode_body(bytes: &[u8]) -> StoreResult<Event> {
    body::decode(bytes).map_err(|e| StoreError::Internal(format!("undecodable stored event: {e}")))
}

/// What an append did for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub sequence: u64,
    /// The (source, id) was already stored with the same content; nothing was written.
    pub duplicate: bool,
}

/// An event ready to be committed.
#[derive(Debug, Clone)]
pub struct NewEvent {
    event: Event,
    content_hash: [u8; 32],
    body: Vec<u8>,
}

impl NewEvent {
    /// Prepares an event (time filled in) and the hash of it as the publisher sent it, before defaults
    /// were filled in. Its stored body is encoded here, in the caller's task, so the one writer that
    /// serializes commits does not spend its time encoding.
    pub fn new(event: Event, content_hash: [u8; 32]) -> Self {
        let body = body::encode(&event);
        NewEvent {
            event,
            content_hash,
            body,
        }
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// Hash of the event as the publisher sent it.
    pub fn content_hash(&self) -> &[u8; 32] {
        &self.content_hash
    }

    /// The event as stored ([`body::encode`]).
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

/// A history query, read in sequence order after `after`.
#[derive(Debug, Clone, Default)]
pub struct ReadQuery {
    pub tenant: String,
    pub after: u64,
    /// Inclusive upper bound.
    pub until: Option<u64>,
    pub types: Vec<TypePattern>,
    pub source: Option<String>,
    pub subject: Option<String>,
    pub correlation_id: Option<String>,
    /// Only this priority level.
    pub priority: Option<crate::event::Priority>,
    pub limit: usize,
}

impl ReadQuery {
    /// The most events one page of this query holds: its limit, within 1..=10,000. Every reader of a
    /// page (both stores, and embedded claims served from the tail) bounds it alike.
    pub(crate) fn page_limit(&self) -> usize {
        self.limit.clamp(1, 10_000)
    }
}

/// The literal types of a selection made only of literal types, else None (read every type, filter
/// after reading). Both stores read literal types as one ordered index range each.
pub(crate) fn literal_types(types: &[TypePattern]) -> Option<Vec<&str>> {
    let mut literals: Vec<&str> = (!types.is_empty())
        .then(|| types.iter().map(|t| t.literal()).collect())
        .flatten()?;
    // each literal becomes a branch of its own (Postgres unions them): a repeated one would read
    // its events twice
    literals.sort_unstable();
    literals.dedup();
    Some(literals)
}

/// Appends the conditions of a read after `WHERE tenant = ` (binding the tenant first); `literal` limits
/// it to one event type. Both stores read with it, so a query means the same on either.
pub(crate) fn push_read_filter<'a, DB>(
    sql: &mut sqlx::QueryBuilder<DB>,
    query: &'a ReadQuery,
    literal: Option<&'a str>,
) where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let seq = sqlite::seq_i64;
    sql.push_bind(query.tenant.as_str());
    sql.push(" AND seq > ").push_bind(seq(query.after));
    if let Some(until) = query.until {
        sql.push(" AND seq <= ").push_bind(seq(until));
    }
    if let Some(level) = query.priority {
        sql.push(" AND priority = ").push_bind(level.as_i64());
    }
    if let Some(literal) = literal {
        sql.push(" AND type = ").push_bind(literal);
    }
    for (column, value) in [
        ("source", &query.source),
        ("subject", &query.subject),
        ("correlation_id", &query.correlation_id),
    ] {
        if let Some(value) = value {
            sql.push(format_args!(" AND {column} = "))
                .push_bind(value.as_str());
        }
    }
}

/// `EventStore::sequence_before` in SQL both stores run (`$1`: the time in ns): the sequence before
/// the first event recorded at or after the time, or the last sequence when there is none. Both
/// stores record times that never go backwards with the sequence (one writer at a time, which never
/// records a time before the last), so the primary key is halved until the first such event is
/// found: about 2 log2(n) seeks, and no index on the recorded time for every commit to update (on
/// SQLite it wrote two log pages per commit; docs/benchmarks.md, cause 4). `lo..=hi` holds the lowest
/// position whose next stored event is recorded at or after the time, `MAX(seq) + 1` when none is.
pub(crate) const SEQUENCE_BEFORE_SQL: &str = "WITH RECURSIVE halves(lo, hi) AS (\
     SELECT COALESCE((SELECT MIN(seq) FROM events), 1), COALESCE((SELECT MAX(seq) FROM events), 0) + 1 \
     UNION ALL SELECT \
     CASE WHEN (SELECT recorded_ns FROM events WHERE seq >= (lo + hi) / 2 ORDER BY seq LIMIT 1) >= $1 \
     THEN lo ELSE (lo + hi) / 2 + 1 END, \
     CASE WHEN (SELECT recorded_ns FROM events WHERE seq >= (lo + hi) / 2 ORDER BY seq LIMIT 1) >= $1 \
     THEN (lo + hi) / 2 ELSE hi END \
     FROM halves WHERE lo < hi) \
     SELECT COALESCE(\
     (SELECT seq FROM events WHERE seq >= (SELECT lo FROM halves WHERE lo = hi) ORDER BY seq LIMIT 1) - 1, \
     (SELECT MAX(seq) FROM events), 0)";

/// One page of history.
#[derive(Debug, Clone, Default)]
pub struct ReadPage {
    pub events: Vec<Arc<StoredEvent>>,
    /// Highest sequence looked at; the next page starts after it even when nothing matched. A page
    /// may hold no event and not be exhausted (a read that looks at a bounded span): read on from here.
    pub scanned_to: u64,
    /// No stored event after `scanned_to` can match.
    pub exhausted: bool,
    /// Rows the read looked at, matching or not, and their events' bytes: what a read of the same
    /// kind costs per row.
    pub rows_read: usize,
    pub bytes_read: usize,
}

/// Decodes rows of events in order up to [`READ_BYTES`], stopping before the event that would take
/// it past them (keeping at least one), as [`PageFill`] does: a read of large events the caller
/// asked for by count alone (the relay's) stays bounded in bytes.
pub(crate) async fn collect_within_read_bytes<R, S>(
    rows: S,
    decode: impl Fn(&R) -> StoreResult<StoredEvent>,
) -> StoreResult<Vec<Arc<StoredEvent>>>
where
    S: futures::Stream<Item = Result<R, StoreError>>,
{
    use futures::TryStreamExt as _;
    let mut rows = std::pin::pin!(rows);
    let mut events = Vec::new();
    let mut bytes = 0;
    while let Some(row) = rows.try_next().await? {
        let event = decode(&row)?;
        let size = event.event.size();
        if !events.is_empty() && bytes + size > READ_BYTES {
            break;
        }
        bytes += size;
        events.push(Arc::new(event));
    }
    Ok(events)
}

/// Most events with one id one [`EventStore::find`] returns (each from another source).
pub const FIND_PAGE: usize = 16;

/// Most event bytes ([`Event::size`]) one read holds: it stops before the event that would take it
/// past them, keeping at least one, and is then not exhausted. Readers size their reads to fit
/// (`bus::history`); this bounds a read whose events are larger than its reader expected.
pub const READ_BYTES: usize = 8 << 20;

/// A read's page filled from its rows in sequence order, up to [`READ_BYTES`]; both stores read
/// through it.
pub(crate) struct PageFill {
    page: ReadPage,
    bytes: usize,
    full: bool,
}

impl PageFill {
    /// An empty page of the events after `after`.
    pub(crate) fn new(after: u64) -> Self {
        PageFill {
            page: ReadPage {
                events: Vec::new(),
                scanned_to: after,
                exhausted: false,
                rows_read: 0,
                bytes_read: 0,
            },
            bytes: 0,
            full: false,
        }
    }

    /// Takes the next row looked at, as an event of the page when it `matches`; false when the page
    /// had no room for it (nothing more is taken then).
    pub(crate) fn take(&mut self, event: StoredEvent, matches: bool) -> bool {
        if self.full {
            return false;
        }
        let size = event.event.size();
        if matches {
            if !self.page.events.is_empty() && self.bytes + size > READ_BYTES {
                self.full = true;
                return false;
            }
            self.bytes += size;
        }
        self.page.rows_read += 1;
        self.page.bytes_read += size;
        self.page.scanned_to = self.page.scanned_to.max(event.sequence);
        if matches {
            self.page.events.push(Arc::new(event));
        }
        true
    }

    /// The page. `rows_left` says the query may have had more rows than it returned (it returned its
    /// limit); a page cut for its bytes is not exhausted either. An exhausted read of a range has
    /// looked at all of it that was committed (`committed`: the head before the read).
    pub(crate) fn finish(self, rows_left: bool, until: Option<u64>, committed: u64) -> ReadPage {
        let mut page = self.page;
        page.exhausted = !rows_left && !self.full;
        if page.exhausted
            && let Some(until) = until
        {
            page.scanned_to = page.scanned_to.max(until.min(committed));
        }
        page
    }
}

/// Per-type statistics.
#[derive(Debug, Clone)]
pub struct EventTypeStats {
    pub event_type: String,
    pub count: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub last_recorded_at: DateTime<Utc>,
}

/// An event a group gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub tenant: String,
    pub group: String,
    pub sequence: u64,
    pub attempts: u32,
    pub reason: String,
    pub dead_lettered_at: DateTime<Utc>,
}

/// A publisher registered through the Admin API: the event types and sources it may publish in its tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publisher {
    pub tenant: String,
    /// The principal (certificate identity or token subject).
    pub principal: String,
    /// Event type patterns (`*`, `>`), as text.
    pub types: Vec<String>,
    /// Source patterns (`*` matches any run of characters), as text.
    pub sources: Vec<String>,
    pub description: String,
    pub updated_at: DateTime<Utc>,
}

/// One audit record: a denied call or an admin action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Assigned by the store, increasing; 0 when appending.
    pub id: u64,
    pub time: DateTime<Utc>,
    /// Tenant of the principal; empty for callers that did not authenticate.
    pub tenant: String,
    pub principal: String,
    /// e.g. "publish", "subscribe", "admin.delete_group".
    pub action: String,
    /// e.g. the event type or group name.
    pub resource: String,
    /// "allowed", "denied" or "unauthenticated".
    pub outcome: String,
    pub reason: String,
}

/// What one step of audit pruning did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditPruned {
    /// Records deleted.
    pub deleted: u64,
    /// The highest id the step looked at, where the next starts; `None` when none was left.
    pub last_id: Option<u64>,
}

/// Which audit records to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Records of these tenants only.
    pub tenants: Vec<String>,
    /// Records with a higher id only.
    pub after_id: u64,
    pub principal: Option<String>,
    pub outcome: Option<String>,
    pub limit: usize,
}

/// Most audit records one read returns.
const MAX_AUDIT_LIMIT: usize = 10_000;

/// The number of audit records to read: 0 means 100; capped at [`MAX_AUDIT_LIMIT`].
fn audit_limit(limit: usize) -> i64 {
    (if limit == 0 {
        100
    } else {
        limit.min(MAX_AUDIT_LIMIT)
    }) as i64
}

/// The durable event log.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Queues a batch to be committed atomically after every batch queued before it, so sequences follow
    /// queue order; [`Queued::committed`] waits for the commit. Duplicates return their original sequence.
    async fn queue(&self, tenant: &str, events: Vec<NewEvent>) -> StoreResult<Queued>;

    /// Commits a batch and waits for the commit: [`EventStore::queue`], then [`Queued::committed`].
    async fn append(&self, tenant: &str, events: Vec<NewEvent>) -> StoreResult<Vec<Appended>> {
        self.queue(tenant, events).await?.committed().await
    }

    /// Reads matching events after `query.after`, in sequence order.
    async fn read(&self, query: &ReadQuery) -> StoreResult<ReadPage>;

    /// Reads the given sequences (any tenant), in sequence order; missing ones are left out.
    async fn read_sequences(&self, sequences: &[u64]) -> StoreResult<Vec<Arc<StoredEvent>>>;

    /// Reads every event after `after` up to `limit`, of all tenants: the relay's and group readers' feed.
    /// A read from the database stops once it holds [`READ_BYTES`] of events (callers read on from
    /// the last one returned).
    async fn read_all(&self, after: u64, limit: usize) -> StoreResult<Vec<Arc<StoredEvent>>>;

    /// Finds events by id, optionally narrowed to one source: those after sequence `after`, at most
    /// [`FIND_PAGE`], in sequence order.
    async fn find(
        &self,
        tenant: &str,
        id: &str,
        source: Option<&str>,
        after: u64,
    ) -> StoreResult<Vec<Arc<StoredEvent>>>;

    /// Returns the highest committed sequence (0 when empty).
    async fn head(&self) -> StoreResult<u64>;

    /// Returns the highest sequence recorded before `time` (0 when none): recorded time never goes
    /// backwards with the sequence, so every event after it was recorded at or after `time`.
    async fn sequence_before(&self, time: DateTime<Utc>) -> StoreResult<u64>;

    /// Counts stored events after `after` per type and priority level, for lag.
    async fn count_after(
        &self,
        tenant: &str,
        after_by_level: [u64; 4],
        selection: &Selection,
    ) -> StoreResult<u64>;

    /// Lists stored event types with counts: at most `limit` of those named after `after`, in byte
    /// order of their names.
    async fn event_types(
        &self,
        tenant: &str,
        after: &str,
        limit: usize,
    ) -> StoreResult<Vec<EventTypeStats>>;

    /// Records a dead letter, replacing the group's letter of the same event; returns the one it
    /// replaced, for [`EventStore::restore_dead_letter`] if the entry turns out to be another
    /// member's by now.
    async fn put_dead_letter(&self, dead_letter: &DeadLetter) -> StoreResult<Option<DeadLetter>>;

    /// Puts `replaced` back where the letter of its event recorded at `recorded_at` still stands
    /// (a letter recorded since stays); returns whether it did.
    async fn restore_dead_letter(
        &self,
        replaced: &DeadLetter,
        recorded_at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Lists a group's dead letters after a sequence, oldest first.
    async fn dead_letters(
        &self,
        tenant: &str,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<DeadLetter>>;

    /// Counts the dead letters of the named groups (those with none are left out).
    async fn dead_letter_counts(
        &self,
        tenant: &str,
        groups: &[String],
    ) -> StoreResult<Vec<(String, u64)>>;

    /// Removes dead letters, each given as (sequence, when it was dead-lettered): one recorded again
    /// since stays, so a redrive never takes away a newer dead letter of the same event. Returns how
    /// many were removed.
    async fn remove_dead_letters(
        &self,
        tenant: &str,
        group: &str,
        letters: &[(u64, DateTime<Utc>)],
    ) -> StoreResult<u64>;

    /// Registers a publisher; false when (tenant, principal) is already registered.
    async fn insert_publisher(&self, publisher: &Publisher) -> StoreResult<bool>;
    /// Replaces a registered publisher's types, sources and description; false when it is not registered.
    async fn update_publisher(&self, publisher: &Publisher) -> StoreResult<bool>;
    /// Removes a publisher; false when it was not registered.
    async fn remove_publisher(&self, tenant: &str, principal: &str) -> StoreResult<bool>;
    /// Lists the publishers of every tenant, ordered by tenant then principal.
    async fn publishers(&self) -> StoreResult<Vec<Publisher>>;
    /// Appends audit records in the given order; ids are assigned in that order.
    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()>;
    /// Reads matching audit records with id > after_id, oldest first, at most limit (limit 0 = 100).
    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>>;
    /// Deletes those of the next `max` audit records after `after_id` (by id) made before `before`.
    /// Reads no more than `max` records, however large the log.
    async fn prune_audit(
        &self,
        before: DateTime<Utc>,
        after_id: u64,
        max: usize,
    ) -> StoreResult<AuditPruned>;

    /// Answers when the database is reachable.
    async fn ping(&self) -> StoreResult<()>;

    /// Watches the highest committed sequence this process knows of: its own commits, and other
    /// replicas' where the database announces them.
    fn committed(&self) -> watch::Receiver<u64>;
}
