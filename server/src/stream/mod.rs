//! Live streams: the ordered tail of the log that subscribers follow, durable consumer groups with leases,
//! who is listening (for "no responders"), and reply inboxes.
//!
//! One trait, two implementations: in-process (embedded default, group state in the SQLite database) and
//! Redis Streams (production). Sequences are the stream positions: entry `<seq>-0` in Redis.

mod embedded;
mod leased_run;
mod quiet;
mod redis;
mod redis_scripts;
mod tail;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};

pub use embedded::EmbeddedStreams;
pub use quiet::QUIET_TTL;
pub use redis::{RedisSettings, RedisStreams};

use crate::event::{Event, Priority, Selection, StoredEvent};

/// Errors of the stream layer.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The backend does not answer.
    #[error("stream backend unavailable: {0}")]
    Unavailable(String),
    /// The named group does not exist.
    #[error("group {0:?} does not exist")]
    NoSuchGroup(String),
    /// An open asked an existing group for other types than it has.
    #[error(
        "open.types: group {group:?} selects {types:?}; open it with those types, or delete the group to change them"
    )]
    OtherTypes { group: String, types: Vec<String> },
    /// The backend failed in an unexpected way.
    #[error("stream backend failure: {0}")]
    Internal(String),
}

/// Result alias of the stream layer.
pub type StreamResult<T> = Result<T, StreamError>;

/// Checks an open's selection against the one stored with an existing group (as
/// [`crate::event::Selection::to_json`] wrote it): a group keeps the types it was created with.
pub(crate) fn check_group_types(
    key: &GroupKey,
    stored: &str,
    asked: &crate::event::Selection,
) -> StreamResult<()> {
    let stored = crate::event::Selection::from_json(stored)
        .map_err(|e| StreamError::Internal(format!("group {:?}: {e}", key.name)))?;
    if stored.same_types(asked) {
        Ok(())
    } else {
        Err(StreamError::OtherTypes {
            group: key.name.clone(),
            types: stored.type_strings(),
        })
    }
}

impl From<crate::store::StoreError> for StreamError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Unavailable(m) => StreamError::Unavailable(m),
            other => StreamError::Internal(other.to_string()),
        }
    }
}

/// Identifies a durable group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub tenant: String,
    pub name: String,
}

/// The settings of a durable group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// What the group receives; every subscriber that opens or changes the filter replaces it.
    pub selection: Selection,
    /// Deliveries of one event before it is dead-lettered.
    pub max_attempts: u32,
}

/// A delivery handed to a group consumer under a lease.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub sequence: u64,
    /// 1 on first delivery.
    pub attempt: u32,
    /// The event; `None` when the stream no longer holds it (trimmed), so the caller reads it from the store.
    pub event: Option<Arc<StoredEvent>>,
    pub priority: Priority,
    /// Why the previous attempt failed, when it did.
    pub last_error: Option<String>,
}

/// What [`LiveStreams::claim_new`] handed out.
#[derive(Debug, Default)]
pub struct NewClaim {
    /// The leased entries, at most as many as asked for.
    pub entries: Vec<Claimed>,
    /// Whether the claim stopped reading before the head (a bound on one claim's reading): fewer
    /// entries than asked then does not mean the level has no more.
    pub more: bool,
    /// Entries the claim read, its selection's filter matching them or not, and their events' bytes:
    /// what the next claim's count is sized from, as a filter may pass over events larger than
    /// those it hands out.
    pub rows_read: usize,
    pub bytes_read: usize,
}

/// Backlog of one group.
#[derive(Debug, Clone)]
pub struct GroupStats {
    pub key: GroupKey,
    pub config: GroupConfig,
    /// When the group was created: a group created again under the name has another.
    pub created_ns: i64,
    pub pending: u64,
    /// How far the group has handed out events: per selection, the last sequence per priority level
    /// (as in [`Priority::ALL`]; `u64::MAX` for a level the selection does not cover there). One for
    /// the whole group embedded; one per stream (type and level) on Redis, whose cursors move apart.
    pub positions: Vec<(Selection, [u64; 4])>,
    pub consumers: u32,
}

/// What a member reads of its group at each fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSettings {
    /// The deliveries of one event the group makes before it is dead-lettered (the latest open's).
    pub max_attempts: u32,
    /// When the group was created (ns): a group deleted and created again under its name is another
    /// group, whose members its old ones must not become.
    pub created_ns: i64,
}

/// Result of reading the live tail.
#[derive(Debug)]
pub enum TailRead {
    /// Events after the position, in order (possibly none).
    Events(Vec<Arc<StoredEvent>>),
    /// The position is older than the oldest retained entry; read the store up to `oldest`.
    Trimmed { oldest: u64 },
}

/// Who requested, for a reply to find its way back.
#[derive(Debug, Clone)]
pub struct Inbox {
    pub tenant: String,
    pub correlation_id: String,
    pub request_id: String,
    pub request_source: String,
    /// Type of the request, which repliers must be allowed to answer.
    pub request_type: String,
    /// Trace context of the request, which a reply without its own continues.
    pub traceparent: Option<String>,
}

/// A live subscription, as far as "no responders" is concerned.
#[derive(Debug, Clone)]
pub struct Interest {
    pub tenant: String,
    pub selection: Selection,
}

/// The live stream backend.
#[async_trait]
pub trait LiveStreams: Send + Sync + 'static {
    /// Appends committed events in sequence order to the live tail (and, behind it, to whatever
    /// groups claim from); re-adding a sequence already appended is a no-op.
    async fn append(&self, events: &[Arc<StoredEvent>]) -> StreamResult<()>;

    /// Returns the highest sequence appended to the tail.
    async fn last_appended(&self) -> StreamResult<u64>;

    /// Reads up to `max` entries after `after`.
    async fn read_after(&self, after: u64, max: usize) -> StreamResult<TailRead>;

    /// Watches the highest sequence appended to the tail, to wake private readers.
    fn head(&self) -> watch::Receiver<u64>;

    /// Watches the highest sequence groups can claim, to wake group consumers; it may follow
    /// [`LiveStreams::head`].
    fn group_head(&self) -> watch::Receiver<u64>;

    /// Creates the group at `start_after` when missing, else updates its filter and max attempts;
    /// returns its settings, which tell this group from one created again under its name. A group keeps the types it was created with: an open with
    /// others is [`StreamError::OtherTypes`], so no member receives types it did not ask for.
    async fn ensure_group(
        &self,
        key: &GroupKey,
        config: &GroupConfig,
        start_after: u64,
    ) -> StreamResult<GroupSettings>;

    /// What a member reads of its group at each fill.
    async fn group_settings(&self, key: &GroupKey) -> StreamResult<GroupSettings>;

    /// Replaces the selection of the group created at `created_ns`, [`StreamError::NoSuchGroup`]
    /// when it is gone: a member's change must not reach a group created again under the name,
    /// whose types may differ.
    async fn set_group_selection(
        &self,
        key: &GroupKey,
        created_ns: i64,
        selection: &Selection,
    ) -> StreamResult<()>;

    /// Hands out up to `max` new entries of one priority level under a lease until `lease_until`.
    async fn claim_new(
        &self,
        key: &GroupKey,
        consumer: &str,
        level: Priority,
        max: usize,
        lease_until: DateTime<Utc>,
    ) -> StreamResult<NewClaim>;

    /// Hands out up to `max` pending entries whose lease ran out (or that were released), with attempt + 1.
    async fn claim_due(
        &self,
        key: &GroupKey,
        consumer: &str,
        max: usize,
        lease_until: DateTime<Utc>,
    ) -> StreamResult<Vec<Claimed>>;

    /// Returns when the earliest pending entry of the group becomes due, if any.
    async fn next_due(&self, key: &GroupKey) -> StreamResult<Option<DateTime<Utc>>>;

    /// Settles deliveries; an entry is removed only if its current attempt matches. Returns which were settled.
    async fn ack(&self, key: &GroupKey, deliveries: &[(u64, u32)]) -> StreamResult<Vec<bool>>;

    /// Moves the leases of deliveries (nack with delay, extension, release): they become due at
    /// `visible_at`. Only an entry whose current attempt matches moves; returns which moved.
    async fn set_visible_at(
        &self,
        key: &GroupKey,
        deliveries: &[(u64, u32)],
        visible_at: DateTime<Utc>,
        error: Option<&str>,
    ) -> StreamResult<Vec<bool>>;

    /// Hands back deliveries that were claimed but never sent to a subscriber (its stream ended first):
    /// due now, and the attempt they were claimed for does not count, so the next claim makes it
    /// again. Only an entry whose current attempt matches moves; returns which moved.
    async fn release_unsent(
        &self,
        key: &GroupKey,
        deliveries: &[(u64, u32)],
    ) -> StreamResult<Vec<bool>>;

    /// Puts events back into the pending list of the group created at `created_ns`, due now, with
    /// their attempts reset (redrive); returns the sequences put back. One still pending (leased, or
    /// due) is left as it is. [`StreamError::NoSuchGroup`] when that group is gone: a redrive that
    /// read the letters of a group deleted and created again meanwhile puts nothing in the new one.
    async fn requeue(
        &self,
        key: &GroupKey,
        created_ns: i64,
        events: &[Arc<StoredEvent>],
    ) -> StreamResult<Vec<u64>>;

    /// Watches a counter that moves whenever pending entries of the group became due early (release, nack,
    /// redrive, delete). A delete wakes the members, which end when they read the group again (gone,
    /// or created again: another `created_ns`), so a member never goes on in a group created again
    /// under the name (whose types it may not read). The sender stays while anyone watches: an open
    /// that watched before a delete and then made the group again is a member of the group it made.
    fn group_wakeups(&self, key: &GroupKey) -> watch::Receiver<u64>;

    /// Tells every consumer of the group (on every replica) to look for due entries now.
    async fn wake_group(&self, key: &GroupKey) -> StreamResult<()>;

    /// The names of a tenant's groups, in byte order.
    async fn group_names(&self, tenant: &str) -> StreamResult<Vec<String>>;

    /// The named groups of a tenant with their backlog, in the order named; a name with no group
    /// (deleted since it was listed) is left out.
    async fn groups(&self, tenant: &str, names: &[String]) -> StreamResult<Vec<GroupStats>>;

    /// The tenants that have durable groups.
    async fn group_tenants(&self) -> StreamResult<Vec<String>>;

    /// Deletes a group, its pending entries and its dead letters (with the group's row, in one
    /// transaction); true when any of them was there. A group created anew under a name starts
    /// without letters recorded there before.
    async fn delete_group(&self, key: &GroupKey) -> StreamResult<bool>;

    /// Registers a connected subscriber; `group` counts it as a consumer of that group.
    async fn join(
        &self,
        id: &str,
        group: Option<&GroupKey>,
        interest: Interest,
    ) -> StreamResult<()>;

    /// Updates what a connected subscriber listens to.
    async fn update_interest(&self, id: &str, interest: Interest) -> StreamResult<()>;

    /// Unregisters a subscriber.
    async fn leave(&self, id: &str) -> StreamResult<()>;

    /// Tells whether any connected subscriber (on any replica) would receive the event.
    async fn has_interest(&self, tenant: &str, event: &Event) -> StreamResult<bool>;

    /// Opens a reply inbox; replies arrive on the returned channel until [`LiveStreams::close_inbox`].
    async fn open_inbox(
        &self,
        inbox: &str,
        info: Inbox,
    ) -> StreamResult<mpsc::Receiver<Arc<StoredEvent>>>;

    /// Looks up a waiting inbox.
    async fn inbox(&self, inbox: &str) -> StreamResult<Option<Inbox>>;

    /// Delivers a reply to a waiting inbox, which only the first reply does (or a retry of it, the
    /// same stored reply): [`LiveStreams::inbox`] still finds the inbox until it is closed, but a
    /// later reply is not delivered. False when nobody waits any more, or another reply took it.
    async fn send_reply(&self, inbox: &str, reply: Arc<StoredEvent>) -> StreamResult<bool>;

    /// Closes an inbox.
    async fn close_inbox(&self, inbox: &str) -> StreamResult<()>;

    /// Answers when the backend is reachable and takes writes.
    async fn ping(&self) -> StreamResult<()>;
}
