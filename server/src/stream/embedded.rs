//! In-process live streams for the embedded default. The tail is a bounded in-memory window over the log;
//! group cursors, pending deliveries and leases live in the SQLite database, so they survive restarts.
//! First deliveries are leased in runs, one row per claim (see [`LeasedRun`]); entries whose lease
//! moved on its own, and redeliveries, have a `pending` row each.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex as SyncMutex},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Connection, Row, sqlite::SqliteRow};
use tokio::sync::{mpsc, watch};

use super::{
    Claimed, GroupConfig, GroupKey, GroupSettings, GroupStats, Inbox, Interest, LiveStreams,
    NewClaim, StreamError, StreamResult, TailRead,
    leased_run::{LeasedRun, Left, RUN_ENTRIES},
    tail::Tail,
};
use crate::store::sqlite::{from_ns, map_err, map_write_err, to_ns};
use crate::{
    event::{Event, Priority, Selection, StoredEvent, TypePattern},
    store::{EventStore, ReadPage, ReadQuery, SqliteStore, StoreError},
};

fn db_err(e: sqlx::Error) -> StreamError {
    map_err(e).into()
}

/// A waiting requester's inbox: its reply channel until a reply takes it, then that reply's sequence.
type InboxEntry = (Inbox, Taken);

/// Whether a reply took an inbox.
enum Taken {
    /// Not yet: where the first reply goes.
    No(mpsc::Sender<Arc<StoredEvent>>),
    /// By the reply of this sequence.
    By(u64),
}

/// Sequences past its cursor a claim that found no event of its level must have looked at before it
/// moves the cursor there (taking the writer's lock, which waits for the event commit in flight).
const RECORD_LOOK: u64 = 4096;

#[derive(Clone)]
struct GroupState {
    config: GroupConfig,
    cursors: [u64; 4],
    created_ns: i64,
}

/// Events of a group's backlog at one priority level, read ahead of its claims while the claim
/// before is written and delivered. Committed history never changes, so they are as good as a read
/// made later for the same range and types.
struct ClaimAhead {
    /// `ready` holds, in order, every event of `types` at the level in (after, scanned_to].
    after: u64,
    scanned_to: u64,
    types: Vec<TypePattern>,
    ready: VecDeque<Arc<StoredEvent>>,
    /// The read of the page after `scanned_to`, when one is under way.
    reading: Option<tokio::task::JoinHandle<Result<ReadPage, StoreError>>>,
}

/// A group's leased runs per priority level (as in [`Priority::ALL`]), keyed by their first sequence.
/// Runs of one level never overlap: each claim starts after the cursor the one before it moved.
type GroupRuns = [BTreeMap<u64, LeasedRun>; 4];

/// What one operation leaves of the runs it changed, keyed by (level index, first sequence): written
/// in its transaction and put in memory once that commits. A run with no entry left is deleted.
type RunChanges = HashMap<(usize, u64), Left>;

/// What [`EmbeddedStreams::change_current`] does to the deliveries it finds.
enum PendingChange<'a> {
    /// Settles them (ack).
    Remove,
    /// Moves their lease end (nack, extension, release), recording the error if one is given; an
    /// attempt that does not count (never sent) is taken back.
    Move {
        visible_ns: i64,
        error: Option<&'a str>,
        counts: bool,
    },
}

struct Subscriber {
    group: Option<GroupKey>,
    interest: Interest,
}

/// In-process streams over the embedded SQLite store.
pub struct EmbeddedStreams {
    store: Arc<SqliteStore>,
    tail: Tail,
    groups: SyncMutex<HashMap<GroupKey, GroupState>>,
    subscribers: SyncMutex<HashMap<String, Subscriber>>,
    inboxes: SyncMutex<HashMap<String, InboxEntry>>,
    wakeups: SyncMutex<HashMap<GroupKey, watch::Sender<u64>>>,
    claim_ahead: SyncMutex<HashMap<(GroupKey, usize), ClaimAhead>>,
    /// Every group's leased runs, as `leased_runs` holds them; changed only under the writer lock.
    runs: SyncMutex<HashMap<GroupKey, GroupRuns>>,
}

fn level_index(level: Priority) -> usize {
    Priority::ALL.iter().position(|p| *p == level).unwrap_or(2)
}

fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Errors of the delivery-state connection ([`crate::store::SqliteDb::lock_delivery_writer`], and its
/// reads without the lock).
fn write_err(e: rusqlite::Error) -> StreamError {
    map_write_err(e).into()
}

/// Gives entries taken out of runs a `pending` row each, with `attempts` made (1 for their first, 0
/// when it does not count), due at `visible_ns`.
fn insert_pending(
    tx: &rusqlite::Transaction<'_>,
    key: &GroupKey,
    entries: &[(u64, usize)],
    attempts: u32,
    visible_ns: i64,
    error: Option<&str>,
) -> StreamResult<()> {
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO pending (tenant, grp, seq, priority, attempts, visible_ns, last_error) \
             VALUES (?1, ?2, ?3, ?4, ?7, ?5, ?6) ON CONFLICT (tenant, grp, seq) DO NOTHING",
        )
        .map_err(write_err)?;
    for (seq, index) in entries {
        insert
            .execute(rusqlite::params![
                key.tenant,
                key.name,
                seq_i64(*seq),
                Priority::ALL[*index].as_i64(),
                visible_ns,
                error,
                attempts
            ])
            .map_err(write_err)?;
    }
    Ok(())
}

/// Writes changed runs: what is left of each, or its deletion when nothing is.
fn write_runs(
    tx: &rusqlite::Transaction<'_>,
    key: &GroupKey,
    changes: &RunChanges,
) -> StreamResult<()> {
    for ((_, first), left) in changes {
        let first = seq_i64(*first);
        if left.open() == 0 {
            tx.prepare_cached(
                "DELETE FROM leased_runs WHERE tenant = ?1 AND grp = ?2 AND first_seq = ?3",
            )
            .and_then(|mut delete| delete.execute(rusqlite::params![key.tenant, key.name, first]))
        } else {
            tx.prepare_cached(
                "UPDATE leased_runs SET settled = ?4 WHERE tenant = ?1 AND grp = ?2 AND first_seq = ?3",
            )
            .and_then(|mut update| {
                update.execute(rusqlite::params![key.tenant, key.name, first, left.bytes()])
            })
        }
        .map_err(write_err)?;
    }
    Ok(())
}

/// The group a row belongs to: its `tenant` column and the group name in `name_column`.
fn row_group_key(row: &SqliteRow, name_column: &str) -> StreamResult<GroupKey> {
    Ok(GroupKey {
        tenant: row.try_get("tenant").map_err(db_err)?,
        name: row.try_get(name_column).map_err(db_err)?,
    })
}

/// The level index of a row's `priority` column.
fn row_level(row: &SqliteRow) -> StreamResult<usize> {
    let priority = Priority::from_i64(row.try_get("priority").map_err(db_err)?);
    Ok(level_index(priority.unwrap_or_default()))
}

impl EmbeddedStreams {
    /// Starts the streams on the embedded store, loading the durable groups.
    pub async fn start(store: Arc<SqliteStore>) -> StreamResult<Arc<Self>> {
        let head = store.head().await?;
        let mut groups = HashMap::new();
        let rows =
            sqlx::query("SELECT tenant, name, selection, max_attempts, created_ns FROM groups")
                .fetch_all(&store.db().pool)
                .await
                .map_err(db_err)?;
        for row in rows {
            let key = row_group_key(&row, "name")?;
            let selection: String = row.try_get("selection").map_err(db_err)?;
            let selection = crate::event::Selection::from_json(&selection)
                .map_err(|e| StreamError::Internal(format!("group {:?}: {e}", key.name)))?;
            let mut cursors = [0; 4];
            let cursor_rows = sqlx::query(
                "SELECT priority, cursor FROM group_cursors WHERE tenant = ? AND grp = ?",
            )
            .bind(&key.tenant)
            .bind(&key.name)
            .fetch_all(&store.db().pool)
            .await
            .map_err(db_err)?;
            for c in cursor_rows {
                cursors[row_level(&c)?] = c.try_get::<i64, _>("cursor").map_err(db_err)? as u64;
            }
            let max_attempts = row.try_get::<i64, _>("max_attempts").map_err(db_err)? as u32;
            groups.insert(
                key,
                GroupState {
                    config: GroupConfig {
                        selection,
                        max_attempts,
                    },
                    cursors,
                    created_ns: row.try_get("created_ns").map_err(db_err)?,
                },
            );
        }
        let mut runs: HashMap<GroupKey, GroupRuns> = HashMap::new();
        let rows = sqlx::query(
            "SELECT tenant, grp, first_seq, priority, visible_ns, seqs, settled FROM leased_runs",
        )
        .fetch_all(&store.db().pool)
        .await
        .map_err(db_err)?;
        for row in rows {
            let key = row_group_key(&row, "grp")?;
            let first = row.try_get::<i64, _>("first_seq").map_err(db_err)? as u64;
            let level = row_level(&row)?;
            let seqs: Vec<u8> = row.try_get("seqs").map_err(db_err)?;
            let settled: Vec<u8> = row.try_get("settled").map_err(db_err)?;
            let visible_ns = row.try_get::<i64, _>("visible_ns").map_err(db_err)?;
            let run = LeasedRun::decode(first, &seqs, &settled, visible_ns).map_err(|e| {
                StreamError::Internal(format!("group {:?}: leased run at {first}: {e}", key.name))
            })?;
            runs.entry(key).or_default()[level].insert(first, run);
        }
        Ok(Arc::new(EmbeddedStreams {
            store,
            tail: Tail::new(head),
            groups: SyncMutex::new(groups),
            subscribers: SyncMutex::new(HashMap::new()),
            inboxes: SyncMutex::new(HashMap::new()),
            wakeups: SyncMutex::new(HashMap::new()),
            claim_ahead: SyncMutex::new(HashMap::new()),
            runs: SyncMutex::new(runs),
        }))
    }

    /// Settles or moves the lease of the deliveries whose current attempt is the one given, in one
    /// transaction; returns the (sequence, attempt) changed. Entries of leased runs leave their run;
    /// moved ones get a `pending` row with the new lease end.
    async fn change_current(
        &self,
        key: &GroupKey,
        deliveries: &[(u64, u32)],
        change: PendingChange<'_>,
    ) -> StreamResult<HashSet<(u64, u32)>> {
        let mut conn = self.store.db().lock_delivery_writer().await;
        // what is in a run is there on its first attempt
        let (runs, taken) = self.take_from_runs(
            key,
            deliveries
                .iter()
                .filter(|(_, attempt)| *attempt == 1)
                .map(|(sequence, _)| *sequence),
        );
        let tx = conn.transaction().map_err(write_err)?;
        let mut changed: HashSet<(u64, u32)> = taken.iter().map(|(seq, _)| (*seq, 1)).collect();
        if let PendingChange::Move {
            visible_ns,
            error,
            counts,
        } = &change
        {
            insert_pending(&tx, key, &taken, u32::from(*counts), *visible_ns, *error)?;
        }
        write_runs(&tx, key, &runs)?;
        let rest: Vec<(u64, u32)> = deliveries
            .iter()
            .filter(|d| !changed.contains(d))
            .copied()
            .collect();
        // one row each, looked up by key; a delivery repeated in the call changes its row once
        for (sequence, attempt) in rest {
            let found = match &change {
                PendingChange::Remove => tx
                    .prepare_cached(
                        "DELETE FROM pending WHERE tenant = ?1 AND grp = ?2 AND seq = ?3 AND attempts = ?4",
                    )
                    .and_then(|mut delete| {
                        delete.execute(rusqlite::params![
                            key.tenant,
                            key.name,
                            seq_i64(sequence),
                            attempt
                        ])
                    }),
                PendingChange::Move {
                    visible_ns,
                    error,
                    counts,
                } => tx
                    .prepare_cached(
                        "UPDATE pending SET visible_ns = ?5, last_error = COALESCE(?6, last_error), \
                         attempts = attempts - ?7 \
                         WHERE tenant = ?1 AND grp = ?2 AND seq = ?3 AND attempts = ?4",
                    )
                    .and_then(|mut update| {
                        update.execute(rusqlite::params![
                            key.tenant,
                            key.name,
                            seq_i64(sequence),
                            attempt,
                            visible_ns,
                            error,
                            u32::from(!*counts)
                        ])
                    }),
            }
            .map_err(write_err)?;
            if found > 0 {
                changed.insert((sequence, attempt));
            }
        }
        tx.commit().map_err(write_err)?;
        self.apply_runs(key, runs);
        Ok(changed)
    }

    /// Applies a [`PendingChange::Move`]; returns, per delivery, whether it moved.
    async fn moved(
        &self,
        key: &GroupKey,
        deliveries: &[(u64, u32)],
        change: PendingChange<'_>,
    ) -> StreamResult<Vec<bool>> {
        let moved = self.change_current(key, deliveries, change).await?;
        Ok(deliveries.iter().map(|d| moved.contains(d)).collect())
    }

    /// Takes the given sequences out of the group's leased runs, on copies of the runs; returns the
    /// changed copies and the (sequence, level index) of each entry taken.
    fn take_from_runs(
        &self,
        key: &GroupKey,
        sequences: impl Iterator<Item = u64>,
    ) -> (RunChanges, Vec<(u64, usize)>) {
        let all = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let mut changes = RunChanges::new();
        let mut taken = Vec::new();
        let Some(group) = all.get(key) else {
            return (changes, taken);
        };
        for seq in sequences {
            // runs of different levels overlap in sequences: the one holding `seq` is the one
            for (index, level) in group.iter().enumerate() {
                let Some((first, run)) = level.range(..=seq).next_back() else {
                    continue;
                };
                let Some(i) = run.index(seq) else {
                    continue;
                };
                let left = changes
                    .entry((index, *first))
                    .or_insert_with(|| run.left().clone());
                if left.take(i) {
                    taken.push((seq, index));
                }
                break;
            }
        }
        (changes, taken)
    }

    /// Puts runs changed by a committed operation in memory.
    fn apply_runs(&self, key: &GroupKey, changes: RunChanges) {
        if changes.is_empty() {
            return;
        }
        let mut all = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let group = all.entry(key.clone()).or_default();
        for ((index, first), left) in changes {
            if left.open() == 0 {
                group[index].remove(&first);
            } else if let Some(run) = group[index].get_mut(&first) {
                run.set_left(left);
            }
        }
        if group.iter().all(BTreeMap::is_empty) {
            all.remove(key);
        }
    }

    /// Takes what was read ahead for this group and level if it continues `after` with the same
    /// types; a read-ahead that does not is dropped.
    fn take_claim_ahead(
        &self,
        key: &GroupKey,
        index: usize,
        after: u64,
        types: &[TypePattern],
    ) -> Option<ClaimAhead> {
        let ahead = self
            .claim_ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(key.clone(), index))?;
        (ahead.after == after && ahead.types == types).then_some(ahead)
    }

    /// Drops what was read ahead for a group's claims.
    fn forget_claim_ahead(&self, key: &GroupKey) {
        self.claim_ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(group, _), _| group != key);
    }

    /// The page a claim's `query` reads, taken from the tail when it holds the whole range: live
    /// groups then claim without a read on the store's threads, which cost each claim two thread
    /// hand-offs (docs/benchmarks.md, cause 5 (r)). It returns every matching event up to where it
    /// looked, as [`EventStore::read`] does; `None` for what the tail does not hold or cannot filter.
    fn page_from_tail(&self, query: &ReadQuery) -> Option<ReadPage> {
        if query.source.is_some() || query.subject.is_some() || query.correlation_id.is_some() {
            return None;
        }
        let limit = query.page_limit();
        let (events, scanned_to) = self.tail.scan(query.after, query.until?, limit, |e| {
            e.tenant == query.tenant
                && query.priority.is_none_or(|level| e.event.priority == level)
                && (query.types.is_empty()
                    || query.types.iter().any(|t| t.matches(&e.event.event_type)))
        })?;
        Some(ReadPage {
            exhausted: events.len() < limit,
            rows_read: events.len(),
            bytes_read: events.iter().map(|e| e.event.size()).sum(),
            events,
            scanned_to,
        })
    }

    /// When the group's earliest pending entry (outside runs) is due, in ns since the epoch. Read on
    /// the delivery connection without the writer's lock: every fill asks, and through sqlx's pool
    /// each ask was two thread hand-offs (docs/benchmarks.md, cause 5 (s)).
    async fn next_pending_due(&self, key: &GroupKey) -> StreamResult<Option<i64>> {
        let conn = self.store.db().lock_delivery_reads().await;
        conn.prepare_cached("SELECT MIN(visible_ns) FROM pending WHERE tenant = ?1 AND grp = ?2")
            .and_then(|mut next| {
                next.query_row(rusqlite::params![key.tenant, key.name], |row| row.get(0))
            })
            .map_err(write_err)
    }

    /// When the group's earliest leased run's lease ends, in ns since the epoch.
    fn next_run_due(&self, key: &GroupKey) -> Option<i64> {
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .and_then(|group| {
                group
                    .iter()
                    .flat_map(|level| level.values().map(|run| run.visible_ns))
                    .min()
            })
    }

    /// Whether a claim of due entries at `now` can find any. Most fills find none, and the claim
    /// itself takes the writer's lock, so it waited for the event commit in flight for nothing.
    async fn anything_due(&self, key: &GroupKey, now: i64) -> StreamResult<bool> {
        if self.next_run_due(key).is_some_and(|due| due <= now) {
            return Ok(true);
        }
        Ok(self
            .next_pending_due(key)
            .await?
            .is_some_and(|due| due <= now))
    }

    fn group_snapshot(&self, key: &GroupKey) -> StreamResult<GroupState> {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups
            .get(key)
            .cloned()
            .ok_or_else(|| StreamError::NoSuchGroup(key.name.clone()))
    }
}

#[async_trait]
impl LiveStreams for EmbeddedStreams {
    async fn append(&self, events: &[Arc<StoredEvent>]) -> StreamResult<()> {
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
        // claims read the store, which holds whatever the tail does
        self.tail.head()
    }

    async fn ensure_group(
        &self,
        key: &GroupKey,
        config: &GroupConfig,
        start_after: u64,
    ) -> StreamResult<GroupSettings> {
        let selection = config.selection.to_json();
        let mut conn = self.store.db().writer.lock().await;
        let mut tx = conn.begin().await.map_err(db_err)?;
        let now_ns = to_ns(Utc::now());
        let created = sqlx::query(
            "INSERT INTO groups (tenant, name, selection, max_attempts, created_ns) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (tenant, name) DO NOTHING",
        )
        .bind(&key.tenant)
        .bind(&key.name)
        .bind(&selection)
        .bind(i64::from(config.max_attempts))
        .bind(now_ns)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected()
            == 1;
        let mut created_ns = now_ns;
        if created {
            // letters a delete of an older build left under the name (it cleared them on their own)
            // are not this group's
            sqlx::query("DELETE FROM dead_letters WHERE tenant = ? AND grp = ?")
                .bind(&key.tenant)
                .bind(&key.name)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            for level in Priority::ALL {
                sqlx::query(
                    "INSERT INTO group_cursors (tenant, grp, priority, cursor) VALUES (?, ?, ?, ?)",
                )
                .bind(&key.tenant)
                .bind(&key.name)
                .bind(level.as_i64())
                .bind(seq_i64(start_after))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            }
        } else {
            let (stored, created): (String, i64) = sqlx::query_as(
                "SELECT selection, created_ns FROM groups WHERE tenant = ? AND name = ?",
            )
            .bind(&key.tenant)
            .bind(&key.name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            created_ns = created;
            super::check_group_types(key, &stored, &config.selection)?;
            sqlx::query(
                "UPDATE groups SET selection = ?, max_attempts = ? WHERE tenant = ? AND name = ?",
            )
            .bind(&selection)
            .bind(i64::from(config.max_attempts))
            .bind(&key.tenant)
            .bind(&key.name)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let state = groups.entry(key.clone()).or_insert_with(|| GroupState {
            config: config.clone(),
            cursors: [start_after; 4],
            created_ns,
        });
        state.config = config.clone();
        Ok(GroupSettings {
            max_attempts: config.max_attempts,
            created_ns,
        })
    }

    async fn group_settings(&self, key: &GroupKey) -> StreamResult<GroupSettings> {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|g| GroupSettings {
                max_attempts: g.config.max_attempts,
                created_ns: g.created_ns,
            })
            .ok_or_else(|| StreamError::NoSuchGroup(key.name.clone()))
    }

    async fn set_group_selection(
        &self,
        key: &GroupKey,
        created_ns: i64,
        selection: &Selection,
    ) -> StreamResult<()> {
        let mut conn = self.store.db().writer.lock().await;
        let updated = sqlx::query(
            "UPDATE groups SET selection = ? WHERE tenant = ? AND name = ? AND created_ns = ?",
        )
        .bind(selection.to_json())
        .bind(&key.tenant)
        .bind(&key.name)
        .bind(created_ns)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        match groups.get_mut(key) {
            Some(g) if updated.rows_affected() > 0 && g.created_ns == created_ns => {
                g.config.selection = selection.clone();
                Ok(())
            }
            _ => Err(StreamError::NoSuchGroup(key.name.clone())),
        }
    }

    async fn claim_new(
        &self,
        key: &GroupKey,
        _consumer: &str,
        level: Priority,
        max: usize,
        lease_until: DateTime<Utc>,
    ) -> StreamResult<NewClaim> {
        let index = level_index(level);
        // pages are read without the writer lock, so acks and commits go on meanwhile; the lock
        // then makes check-cursor, insert-pending, move-cursor one step for all consumers
        let GroupState {
            config,
            cursors,
            created_ns,
        } = self.group_snapshot(key)?;
        let until = self.last_appended().await?;
        let mut cursor = cursors[index];
        let query = |after: u64, limit: usize| ReadQuery {
            tenant: key.tenant.clone(),
            after,
            until: Some(until),
            priority: Some(level),
            types: config.selection.types.clone(),
            limit,
            ..ReadQuery::default()
        };
        let mut ahead = self
            .take_claim_ahead(key, index, cursor, &config.selection.types)
            .unwrap_or_else(|| ClaimAhead {
                after: cursor,
                scanned_to: cursor,
                types: config.selection.types.clone(),
                ready: VecDeque::new(),
                reading: None,
            });
        let mut taken = Vec::new();
        // whether the range read holds any event of the level and types
        let mut passed_any = false;
        let (mut rows_read, mut bytes_read) = (0, 0);
        // bounded, so a group whose selection matches little answers its consumer in time
        for _ in 0..8 {
            while taken.len() < max
                && let Some(event) = ahead.ready.pop_front()
            {
                passed_any = true;
                cursor = event.sequence;
                if config.selection.matches(&event.event) {
                    taken.push(event);
                }
            }
            if taken.len() >= max {
                break;
            }
            cursor = cursor.max(ahead.scanned_to);
            if ahead.scanned_to >= until {
                break;
            }
            let page = match ahead.reading.take() {
                Some(read) => read.await.map_err(|e| {
                    StreamError::Internal(format!("group read-ahead failed: {e}"))
                })??,
                // most pages match in full (types are filtered in SQL): more would be decoded for nothing
                None => {
                    let page = query(ahead.scanned_to, (max - taken.len()).max(64));
                    match self.page_from_tail(&page) {
                        Some(page) => page,
                        None => self.store.read(&page).await?,
                    }
                }
            };
            rows_read += page.rows_read;
            bytes_read += page.bytes_read;
            ahead.ready.extend(page.events);
            ahead.scanned_to = page.scanned_to;
        }
        if !passed_any {
            // No event of the level and types past the cursor: nothing to lease, and the cursor need
            // not move (the group's lag counts none there), so no writer's lock, which would wait for
            // the event commit in flight. The read-ahead keeps how far this claim looked.
            // what the last page read is still to be looked at
            let more = !ahead.ready.is_empty() || ahead.scanned_to < until;
            if ahead.ready.is_empty()
                && ahead.scanned_to >= cursors[index].saturating_add(RECORD_LOOK)
            {
                // Looked far: the cursor moves there, so that another member's claim, which finds
                // no read-ahead while this one holds it, or the next after the last member left,
                // does not look at the same sequences again (no event of the level is in between).
                let conn = self.store.db().lock_delivery_writer().await;
                let now = self.group_snapshot(key)?;
                // not in a group made again meanwhile, whose selection may differ
                if now.created_ns == created_ns && now.cursors[index] == cursors[index] {
                    conn.prepare_cached(
                        "UPDATE group_cursors SET cursor = ?1 WHERE tenant = ?2 AND grp = ?3 AND priority = ?4",
                    )
                    .and_then(|mut update| {
                        update.execute(rusqlite::params![
                            seq_i64(ahead.scanned_to),
                            key.tenant,
                            key.name,
                            level.as_i64()
                        ])
                    })
                    .map_err(write_err)?;
                    if let Some(g) = self
                        .groups
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(key)
                    {
                        g.cursors[index] = ahead.scanned_to;
                    }
                    ahead.after = ahead.scanned_to;
                }
            }
            self.claim_ahead
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((key.clone(), index), ahead);
            return Ok(NewClaim {
                entries: Vec::new(),
                more,
                rows_read,
                bytes_read,
            });
        }
        let mut conn = self.store.db().lock_delivery_writer().await;
        // another consumer of the group may have claimed part of what was read: what it took is
        // not handed out again (committed history never changes, so the rest of the page stands)
        let now = self.group_snapshot(key)?;
        // A claim that lost the cursor to another member's, or to a group made again, says there
        // is more: the next one goes on from the cursor as it is now. With no more, the session
        // would take the level for drained and wait for the next commit.
        let lost = NewClaim {
            entries: Vec::new(),
            more: true,
            rows_read,
            bytes_read,
        };
        if now.created_ns != created_ns {
            // the group was deleted and made again meanwhile, maybe with another selection or
            // start: what was read for the old one is not claimed for it
            return Ok(lost);
        }
        let cursor_now = now.cursors[index];
        taken.retain(|event| event.sequence > cursor_now);
        if cursor <= cursor_now {
            return Ok(lost);
        }
        let tx = conn.transaction().map_err(write_err)?;
        // a row per run leases the claim: acks then update its bitmap, not a row per event
        let runs: Vec<LeasedRun> = taken
            .chunks(RUN_ENTRIES)
            .map(|chunk| {
                LeasedRun::new(
                    chunk.iter().map(|e| e.sequence).collect(),
                    to_ns(lease_until),
                )
            })
            .collect();
        for run in &runs {
            tx.prepare_cached(
                "INSERT INTO leased_runs (tenant, grp, first_seq, priority, visible_ns, seqs, settled) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut insert| {
                insert.execute(rusqlite::params![
                    key.tenant,
                    key.name,
                    seq_i64(run.first()),
                    level.as_i64(),
                    run.visible_ns,
                    run.encode_seqs(),
                    run.left().bytes()
                ])
            })
            .map_err(write_err)?;
        }
        tx.prepare_cached(
            "UPDATE group_cursors SET cursor = ?1 WHERE tenant = ?2 AND grp = ?3 AND priority = ?4",
        )
        .and_then(|mut update| {
            update.execute(rusqlite::params![
                seq_i64(cursor),
                key.tenant,
                key.name,
                level.as_i64()
            ])
        })
        .map_err(write_err)?;
        tx.commit().map_err(write_err)?;
        if let Some(g) = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(key)
        {
            g.cursors[index] = cursor;
        }
        if !runs.is_empty() {
            let mut all = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            let level_runs = &mut all.entry(key.clone()).or_default()[index];
            for run in runs {
                level_runs.insert(run.first(), run);
            }
        }
        drop(conn);
        // with backlog left, the next claim's events are read while this one is delivered and acked
        ahead.after = cursor;
        // (the tail's events cost no read: the next claim takes them from there)
        if ahead.reading.is_none()
            && ahead.scanned_to < until
            && ahead.ready.len() < max
            && !self.tail.holds(ahead.scanned_to, until)
        {
            let store = self.store.clone();
            let query = query(ahead.scanned_to, max.max(64));
            ahead.reading = Some(tokio::spawn(async move { store.read(&query).await }));
        }
        self.claim_ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((key.clone(), index), ahead);
        Ok(NewClaim {
            entries: taken
                .into_iter()
                .map(|event| Claimed {
                    sequence: event.sequence,
                    attempt: 1,
                    priority: level,
                    event: Some(event),
                    last_error: None,
                })
                .collect(),
            // the bound on pages read stopped it before the head
            more: cursor < until,
            rows_read,
            bytes_read,
        })
    }

    async fn claim_due(
        &self,
        key: &GroupKey,
        consumer: &str,
        max: usize,
        lease_until: DateTime<Utc>,
    ) -> StreamResult<Vec<Claimed>> {
        let now = to_ns(Utc::now());
        if !self.anything_due(key, now).await? {
            return Ok(Vec::new());
        }
        let mut conn = self.store.db().lock_delivery_writer().await;
        // what is still in runs whose lease ran out becomes pending entries, due, claimed like any other
        let expired: Vec<u64> = self
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|group| {
                group
                    .iter()
                    .flat_map(|level| level.values())
                    .filter(|run| run.visible_ns <= now)
                    .flat_map(LeasedRun::open_seqs)
                    .collect()
            })
            .unwrap_or_default();
        if !expired.is_empty() {
            let (runs, taken) = self.take_from_runs(key, expired.into_iter());
            let tx = conn.transaction().map_err(write_err)?;
            insert_pending(&tx, key, &taken, 1, now, None)?;
            write_runs(&tx, key, &runs)?;
            tx.commit().map_err(write_err)?;
            self.apply_runs(key, runs);
        }
        // one statement (so one transaction), not a read plus an update per entry; within a level,
        // what has been due longest first: an entry failing again at once goes behind the others
        let rows = conn
            .prepare_cached(
                "UPDATE pending SET attempts = attempts + 1, visible_ns = ?1, consumer = ?2 \
                 WHERE tenant = ?3 AND grp = ?4 AND seq IN (SELECT seq FROM pending \
                 WHERE tenant = ?3 AND grp = ?4 AND visible_ns <= ?5 ORDER BY priority DESC, visible_ns, seq LIMIT ?6) \
                 RETURNING seq, priority, attempts, last_error",
            )
            .and_then(|mut claim| {
                claim
                    .query_map(
                        rusqlite::params![
                            to_ns(lease_until),
                            consumer,
                            key.tenant,
                            key.name,
                            now,
                            max as i64
                        ],
                        |row| {
                            Ok((
                                row.get::<_, i64>(0)?,
                                row.get::<_, i64>(1)?,
                                row.get::<_, i64>(2)?,
                                row.get::<_, Option<String>>(3)?,
                            ))
                        },
                    )?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(write_err)?;
        drop(conn);
        let mut claimed: Vec<Claimed> = rows
            .into_iter()
            .map(|(sequence, priority, attempt, last_error)| Claimed {
                sequence: sequence as u64,
                attempt: attempt as u32,
                event: None,
                priority: Priority::from_i64(priority).unwrap_or_default(),
                last_error,
            })
            .collect();
        // RETURNING gives no order: hand them out as the selection ranked them
        claimed.sort_by_key(|c| (Reverse(c.priority.as_i64()), c.sequence));
        let sequences: Vec<u64> = claimed.iter().map(|c| c.sequence).collect();
        let mut cached = self.tail.cached(&sequences);
        for c in &mut claimed {
            c.event = cached.remove(&c.sequence);
        }
        Ok(claimed)
    }

    async fn next_due(&self, key: &GroupKey) -> StreamResult<Option<DateTime<Utc>>> {
        let next = self.next_pending_due(key).await?;
        Ok(next
            .into_iter()
            .chain(self.next_run_due(key))
            .min()
            .map(from_ns))
    }

    async fn ack(&self, key: &GroupKey, deliveries: &[(u64, u32)]) -> StreamResult<Vec<bool>> {
        let mut removed = self
            .change_current(key, deliveries, PendingChange::Remove)
            .await?;
        // an ack repeated in the same call counts once
        Ok(deliveries.iter().map(|d| removed.remove(d)).collect())
    }

    async fn set_visible_at(
        &self,
        key: &GroupKey,
        deliveries: &[(u64, u32)],
        visible_at: DateTime<Utc>,
        error: Option<&str>,
    ) -> StreamResult<Vec<bool>> {
        let change = PendingChange::Move {
            visible_ns: to_ns(visible_at),
            error,
            counts: true,
        };
        self.moved(key, deliveries, change).await
    }

    async fn release_unsent(
        &self,
        key: &GroupKey,
        deliveries: &[(u64, u32)],
    ) -> StreamResult<Vec<bool>> {
        let change = PendingChange::Move {
            visible_ns: to_ns(Utc::now()),
            error: None,
            counts: false,
        };
        self.moved(key, deliveries, change).await
    }

    async fn requeue(
        &self,
        key: &GroupKey,
        created_ns: i64,
        events: &[Arc<StoredEvent>],
    ) -> StreamResult<Vec<u64>> {
        let now = to_ns(Utc::now());
        let mut conn = self.store.db().writer.lock().await;
        // under the writer lock, which a delete holds until the group is gone: no pending rows are
        // written for a group deleted (or deleted and created again) meanwhile
        if self.group_snapshot(key)?.created_ns != created_ns {
            return Err(StreamError::NoSuchGroup(key.name.clone()));
        }
        // an entry still leased in a run is pending already, as a `pending` row would be
        let (_, leased) = self.take_from_runs(key, events.iter().map(|e| e.sequence));
        let leased: HashSet<u64> = leased.into_iter().map(|(seq, _)| seq).collect();
        let mut tx = conn.begin().await.map_err(db_err)?;
        let mut added = Vec::new();
        for event in events.iter().filter(|e| !leased.contains(&e.sequence)) {
            let inserted = sqlx::query(
                "INSERT INTO pending (tenant, grp, seq, priority, attempts, visible_ns) VALUES (?, ?, ?, ?, 0, ?) \
                 ON CONFLICT (tenant, grp, seq) DO NOTHING",
            )
            .bind(&key.tenant)
            .bind(&key.name)
            .bind(seq_i64(event.sequence))
            .bind(event.event.priority.as_i64())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
            if inserted == 1 {
                added.push(event.sequence);
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
        if let Some(tx) = self
            .wakeups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            tx.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    async fn group_tenants(&self) -> StreamResult<Vec<String>> {
        sqlx::query_scalar("SELECT DISTINCT tenant FROM groups ORDER BY tenant")
            .fetch_all(&self.store.db().pool)
            .await
            .map_err(db_err)
    }

    async fn group_names(&self, tenant: &str) -> StreamResult<Vec<String>> {
        let mut names: Vec<String> = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|k| k.tenant == tenant)
            .map(|k| k.name.clone())
            .collect();
        names.sort();
        Ok(names)
    }

    async fn groups(&self, tenant: &str, names: &[String]) -> StreamResult<Vec<GroupStats>> {
        let mut consumers: HashMap<GroupKey, u32> = HashMap::new();
        for s in self
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if let Some(g) = &s.group {
                *consumers.entry(g.clone()).or_default() += 1;
            }
        }
        // entries handed out and settled back to the table (the names as one JSON array, so a page
        // is one statement), then those leased in runs
        let rows = sqlx::query(
            "SELECT grp, COUNT(*) AS n FROM pending \
             WHERE tenant = ? AND grp IN (SELECT value FROM json_each(?)) GROUP BY grp",
        )
        .bind(tenant)
        .bind(serde_json::to_string(names).map_err(|e| StreamError::Internal(e.to_string()))?)
        .fetch_all(&self.store.db().pool)
        .await
        .map_err(db_err)?;
        let mut stored: HashMap<String, u64> = HashMap::new();
        for row in rows {
            let name: String = row.try_get("grp").map_err(db_err)?;
            stored.insert(name, row.try_get::<i64, _>("n").map_err(db_err)? as u64);
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let key = GroupKey {
                tenant: tenant.to_owned(),
                name: name.clone(),
            };
            let leased: usize = self
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .map_or(0, |group| {
                    group
                        .iter()
                        .flat_map(|level| level.values().map(LeasedRun::open))
                        .sum()
                });
            let Some((config, cursors, created_ns)) = self
                .groups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .map(|g| (g.config.clone(), g.cursors, g.created_ns))
            else {
                continue;
            };
            out.push(GroupStats {
                consumers: consumers.get(&key).copied().unwrap_or(0),
                key,
                created_ns,
                pending: stored.get(name).copied().unwrap_or(0) + leased as u64,
                positions: vec![(config.selection.clone(), cursors)],
                config,
            });
        }
        Ok(out)
    }

    async fn delete_group(&self, key: &GroupKey) -> StreamResult<bool> {
        let mut conn = self.store.db().writer.lock().await;
        self.forget_claim_ahead(key);
        let mut tx = conn.begin().await.map_err(db_err)?;
        let mut deleted = false;
        for table in [
            "DELETE FROM groups WHERE tenant = ? AND name = ?",
            "DELETE FROM group_cursors WHERE tenant = ? AND grp = ?",
            "DELETE FROM pending WHERE tenant = ? AND grp = ?",
            "DELETE FROM leased_runs WHERE tenant = ? AND grp = ?",
            // in the same transaction: a delete that failed part-way leaves none to a group made
            // again under the name
            "DELETE FROM dead_letters WHERE tenant = ? AND grp = ?",
        ] {
            let done = sqlx::query(table)
                .bind(&key.tenant)
                .bind(&key.name)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            deleted |= done.rows_affected() > 0;
        }
        tx.commit().await.map_err(db_err)?;
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        // the members end when they read the group again (see `group_wakeups`); the channel stays:
        // an open that watched it before this delete and made the group again is that group's member
        self.wake_group(key).await?;
        Ok(deleted)
    }

    async fn join(
        &self,
        id: &str,
        group: Option<&GroupKey>,
        interest: Interest,
    ) -> StreamResult<()> {
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
        Ok(())
    }

    async fn leave(&self, id: &str) -> StreamResult<()> {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        let left = subscribers.remove(id).and_then(|s| s.group);
        // what was read ahead for a group is held only while a member is connected
        if let Some(group) = left
            && !subscribers
                .values()
                .any(|s| s.group.as_ref() == Some(&group))
        {
            drop(subscribers);
            self.forget_claim_ahead(&group);
        }
        Ok(())
    }

    async fn has_interest(&self, tenant: &str, event: &Event) -> StreamResult<bool> {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.interest.tenant == tenant)
            .any(|s| {
                // a member receives what its group selects: the latest open or setFilter of any
                // member decides the group's filter
                let group = s.group.as_ref().and_then(|key| groups.get(key));
                group
                    .map_or(&s.interest.selection, |g| &g.config.selection)
                    .matches(event)
            }))
    }

    async fn open_inbox(
        &self,
        inbox: &str,
        info: Inbox,
    ) -> StreamResult<mpsc::Receiver<Arc<StoredEvent>>> {
        let (tx, rx) = mpsc::channel(1);
        self.inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(inbox.to_owned(), (info, Taken::No(tx)));
        Ok(rx)
    }

    async fn inbox(&self, inbox: &str) -> StreamResult<Option<Inbox>> {
        Ok(self
            .inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(inbox)
            .map(|(info, _)| info.clone()))
    }

    async fn send_reply(&self, inbox: &str, reply: Arc<StoredEvent>) -> StreamResult<bool> {
        // the first reply takes the channel: a later one finds the inbox and nobody to hand it to,
        // and a retry of the first (the same stored reply) finds it delivered
        let mut inboxes = self.inboxes.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, taken)) = inboxes.get_mut(inbox) else {
            return Ok(false);
        };
        Ok(match taken {
            Taken::By(sequence) => *sequence == reply.sequence,
            Taken::No(tx) => {
                let sequence = reply.sequence;
                let delivered = tx.try_send(reply).is_ok();
                if delivered {
                    *taken = Taken::By(sequence);
                }
                delivered
            }
        })
    }

    async fn close_inbox(&self, inbox: &str) -> StreamResult<()> {
        self.inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(inbox);
        Ok(())
    }

    async fn ping(&self) -> StreamResult<()> {
        self.store.ping().await.map_err(|e| match e {
            StoreError::Unavailable(m) => StreamError::Unavailable(m),
            other => StreamError::Internal(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewEvent;

    /// A store holding `n` events of type `job` of tenant `t`, event `i` at `priority(i)` (sequence `i + 1`).
    async fn stored_jobs(
        dir: &std::path::Path,
        n: usize,
        priority: impl Fn(usize) -> Priority,
    ) -> Arc<SqliteStore> {
        let store = SqliteStore::started(&dir.join("t.db")).await;
        let events = (0..n)
            .map(|i| {
                let event = Event {
                    id: format!("e{i}"),
                    source: "test".into(),
                    event_type: "job".into(),
                    priority: priority(i),
                    ..Event::default()
                };
                let hash = event.content_hash();
                NewEvent::new(event, hash)
            })
            .collect();
        store.append("t", events).await.expect("append");
        store
    }

    /// A store holding `n` events of type `job` (event `i` at `priority(i)`), streams whose tail
    /// holds them too, and group `g` of tenant `t` selecting them from the start.
    async fn group_with_backlog(
        dir: &std::path::Path,
        n: usize,
        priority: impl Fn(usize) -> Priority,
    ) -> (Arc<EmbeddedStreams>, GroupKey, Selection) {
        let store = stored_jobs(dir, n, priority).await;
        let streams = EmbeddedStreams::start(store.clone())
            .await
            .expect("streams");
        let stored = store
            .read(&ReadQuery {
                tenant: "t".into(),
                limit: n,
                ..ReadQuery::default()
            })
            .await
            .expect("read");
        streams.append(&stored.events).await.expect("tail");
        let key = GroupKey {
            tenant: "t".into(),
            name: "g".into(),
        };
        let selection = Selection {
            types: vec![TypePattern::parse("job").expect("pattern")],
            filter: None,
        };
        let config = GroupConfig {
            selection: selection.clone(),
            max_attempts: 5,
        };
        streams.ensure_group(&key, &config, 0).await.expect("group");
        (streams, key, selection)
    }

    /// A group with a backlog of `n` events, every one claimed by member "a"; returns its lease end.
    async fn all_claimed(
        dir: &std::path::Path,
        n: usize,
    ) -> (Arc<EmbeddedStreams>, GroupKey, DateTime<Utc>) {
        let (streams, key, _) = group_with_backlog(dir, n, |_| Priority::Normal).await;
        let lease = Utc::now() + chrono::Duration::seconds(30);
        let claimed = streams
            .claim_new(&key, "a", Priority::Normal, 100, lease)
            .await
            .expect("claim")
            .entries;
        assert_eq!(claimed.len(), n);
        (streams, key, lease)
    }

    /// The group's pending entries, as ListGroups reports them.
    async fn pending(streams: &EmbeddedStreams, key: &GroupKey) -> u64 {
        streams
            .groups(&key.tenant, std::slice::from_ref(&key.name))
            .await
            .expect("groups")[0]
            .pending
    }

    /// Every page of `query` from `after` on until `until`, read by `read`: the sequences in order.
    async fn page_through<F, Fut>(mut query: ReadQuery, until: u64, read: F) -> Vec<u64>
    where
        F: Fn(ReadQuery) -> Fut,
        Fut: std::future::Future<Output = ReadPage>,
    {
        let mut sequences = Vec::new();
        while query.after < until {
            let page = read(query.clone()).await;
            sequences.extend(page.events.iter().map(|e| e.sequence));
            assert!(page.scanned_to > query.after, "a page must move on");
            query.after = page.scanned_to;
        }
        sequences
    }

    /// A claim whose group is deleted and made again between its read and the writer's lock leases
    /// nothing in the new group and leaves its cursor: the new group's selection or start may
    /// differ, and moving its cursor past what was read for the old one would skip its events.
    #[tokio::test]
    async fn a_claim_leases_nothing_in_a_group_made_again_meanwhile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (streams, key, _) = group_with_backlog(dir.path(), 10, |_| Priority::Normal).await;
        let writing = streams.store.db().writer.lock().await;
        let claim = tokio::spawn({
            let (streams, key) = (streams.clone(), key.clone());
            async move {
                let lease = Utc::now() + chrono::Duration::seconds(30);
                streams
                    .claim_new(&key, "a", Priority::Normal, 100, lease)
                    .await
            }
        });
        // on this one-threaded runtime the claim runs until it waits for the writer's lock (its
        // page comes from the tail); it reads the group's creation time before its first wait
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(!claim.is_finished());
        // what a delete and a create under the name leave in memory: another creation time
        streams
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&key)
            .expect("group")
            .created_ns += 1;
        drop(writing);
        let claimed = claim.await.expect("claim task").expect("claim");
        assert!(claimed.entries.is_empty() && claimed.more, "{claimed:?}");
        assert_eq!(streams.group_snapshot(&key).expect("group").cursors, [0; 4]);
    }

    #[tokio::test]
    async fn claim_pages_from_the_tail_hold_what_the_store_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::started(&dir.path().join("t.db")).await;
        let streams = EmbeddedStreams::start(store.clone())
            .await
            .expect("streams");
        let types = ["job", "job.big", "other"];
        for tenant in ["t", "u"] {
            let events = (0..90)
                .map(|i| {
                    let event = Event {
                        id: format!("{tenant}{i}"),
                        source: "test".into(),
                        event_type: types[i % 3].into(),
                        priority: Priority::ALL[(i / 3) % 4],
                        ..Event::default()
                    };
                    let hash = event.content_hash();
                    NewEvent::new(event, hash)
                })
                .collect();
            store.append(tenant, events).await.expect("append");
        }
        let head = store.head().await.expect("head");
        let all = store.read_all(0, 1000).await.expect("read");
        streams.append(&all).await.expect("tail");
        let pattern = |p: &str| TypePattern::parse(p).expect("pattern");
        let selections = [
            vec![pattern("job")],
            vec![pattern("job.>")],
            vec![pattern("*")],
            vec![],
        ];
        for tenant in ["t", "u"] {
            for level in Priority::ALL {
                for types in &selections {
                    for limit in [1, 7, 64] {
                        let query = ReadQuery {
                            tenant: tenant.into(),
                            until: Some(head),
                            priority: Some(level),
                            types: types.clone(),
                            limit,
                            ..ReadQuery::default()
                        };
                        let from_tail = page_through(query.clone(), head, |q| {
                            let page = streams.page_from_tail(&q).expect("the tail holds it");
                            async move { page }
                        })
                        .await;
                        let from_store = page_through(query, head, |q| {
                            let store = store.clone();
                            async move { store.read(&q).await.expect("read") }
                        })
                        .await;
                        assert_eq!(
                            from_tail, from_store,
                            "{tenant} {level:?} {types:?} limit {limit}"
                        );
                    }
                }
            }
        }
        // what the window does not hold is left to the store
        let beyond = ReadQuery {
            tenant: "t".into(),
            until: Some(head + 1),
            limit: 10,
            ..ReadQuery::default()
        };
        assert!(streams.page_from_tail(&beyond).is_none());
    }

    #[tokio::test]
    async fn a_leased_run_keeps_what_left_it_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (streams, key, _) = group_with_backlog(dir.path(), 10, |_| Priority::Normal).await;
        // a lease that already ran out: the run's open entries are due at once
        let lease = Utc::now() - chrono::Duration::seconds(1);
        let claimed = streams
            .claim_new(&key, "a", Priority::Normal, 100, lease)
            .await
            .expect("claim")
            .entries;
        assert_eq!(claimed.len(), 10);
        let acked = streams
            .ack(&key, &[(1, 1), (2, 1), (3, 1), (4, 1), (4, 1), (6, 2)])
            .await
            .expect("ack");
        assert_eq!(acked, [true, true, true, true, false, false]);
        let later = Utc::now() + chrono::Duration::seconds(10);
        let moved = streams
            .set_visible_at(&key, &[(5, 1)], later, Some("boom"))
            .await
            .expect("nack");
        assert_eq!(moved, [true]);

        let store = streams.store.clone();
        drop(streams);
        let streams = EmbeddedStreams::start(store).await.expect("restart");
        assert_eq!(
            pending(&streams, &key).await,
            6,
            "5 moved, 6..=10 in the run"
        );
        let lease = Utc::now() + chrono::Duration::seconds(30);
        let due = streams
            .claim_due(&key, "b", 100, lease)
            .await
            .expect("claim due");
        let due: Vec<(u64, u32)> = due.iter().map(|c| (c.sequence, c.attempt)).collect();
        assert_eq!(due, [(6, 2), (7, 2), (8, 2), (9, 2), (10, 2)]);
        assert_eq!(
            streams.next_due(&key).await.expect("next due").map(to_ns),
            Some(to_ns(later)),
            "the moved entry keeps its own lease"
        );
        let acked = streams
            .ack(&key, &[(5, 1), (6, 1), (6, 2)])
            .await
            .expect("ack");
        assert_eq!(acked, [true, false, true]);
        assert_eq!(pending(&streams, &key).await, 4);
    }

    /// Streams over `n - 1` events of the high level and then one of the normal level (sequence `n`),
    /// their tail holding only the last ten (so claims read the store), and group `every` of tenant
    /// `t` over every type: a claim of the normal level, which has no index of its own, reads spans
    /// of sequences along the primary key.
    async fn one_normal_after_high(
        dir: &std::path::Path,
        n: u64,
    ) -> (Arc<EmbeddedStreams>, GroupKey) {
        let store = stored_jobs(dir, n as usize, |i| {
            if i as u64 + 1 == n {
                Priority::Normal
            } else {
                Priority::High
            }
        })
        .await;
        let streams = EmbeddedStreams::start(store.clone())
            .await
            .expect("streams");
        let last = store
            .read(&ReadQuery {
                tenant: "t".into(),
                after: n - 10,
                limit: 10,
                ..ReadQuery::default()
            })
            .await
            .expect("read");
        streams.append(&last.events).await.expect("tail");
        let key = GroupKey {
            tenant: "t".into(),
            name: "every".into(),
        };
        let config = GroupConfig {
            selection: Selection {
                types: vec![TypePattern::parse("*").expect("pattern")],
                filter: None,
            },
            max_attempts: 5,
        };
        streams.ensure_group(&key, &config, 0).await.expect("group");
        (streams, key)
    }

    #[tokio::test]
    async fn a_claim_that_looked_far_for_its_level_moves_the_cursor_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 40,000 events of the high level, then one of the normal level
        let n: u64 = 40_001;
        let (streams, key) = one_normal_after_high(dir.path(), n).await;
        let lease = Utc::now() + chrono::Duration::seconds(30);
        let normal = level_index(Priority::Normal);

        let first = streams
            .claim_new(&key, "a", Priority::Normal, 100, lease)
            .await
            .expect("claim");
        assert!(
            first.entries.is_empty() && first.more,
            "eight spans hold no event of the level"
        );
        let cursors = streams.group_snapshot(&key).expect("group").cursors;
        assert!(
            cursors[normal] >= RECORD_LOOK && cursors[normal] < n,
            "the cursor moved to where the claim looked: {}",
            cursors[normal]
        );
        // without what was read ahead, as for another member's claim meanwhile, or the next after the
        // last member left, the claim goes on from the cursor
        streams.forget_claim_ahead(&key);
        let second = streams
            .claim_new(&key, "b", Priority::Normal, 100, lease)
            .await
            .expect("claim");
        let claimed: Vec<u64> = second.entries.iter().map(|c| c.sequence).collect();
        assert_eq!(claimed, [n]);
    }

    #[tokio::test]
    async fn a_claim_whose_last_span_holds_its_level_says_there_is_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 29,999 events of the high level, then one of the normal level at the head, in the eighth
        // span a claim of 100 over every type reads (4,096 sequences each): read, not yet looked at
        let n: u64 = 30_000;
        let (streams, key) = one_normal_after_high(dir.path(), n).await;
        let lease = Utc::now() + chrono::Duration::seconds(30);
        let first = streams
            .claim_new(&key, "a", Priority::Normal, 100, lease)
            .await
            .expect("claim");
        assert!(
            !first.entries.is_empty() || first.more,
            "a claim that read the event says there is more"
        );
        let mut claimed: Vec<u64> = first.entries.iter().map(|c| c.sequence).collect();
        if claimed.is_empty() {
            let second = streams
                .claim_new(&key, "a", Priority::Normal, 100, lease)
                .await
                .expect("claim");
            claimed = second.entries.iter().map(|c| c.sequence).collect();
        }
        assert_eq!(claimed, [n]);
    }

    #[tokio::test]
    async fn claims_with_nothing_to_claim_wait_for_no_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (streams, key, lease) = all_claimed(dir.path(), 3).await;
        // an event commit in flight holds the writer's lock
        let db = streams.store.db().clone();
        let commit = db.writer.lock().await;
        let quick = std::time::Duration::from_secs(5);
        let due = tokio::time::timeout(quick, streams.claim_due(&key, "b", 100, lease))
            .await
            .expect("nothing is due: the claim must not wait for the commit")
            .expect("claim due");
        assert!(due.is_empty());
        for level in Priority::ALL {
            let new = tokio::time::timeout(quick, streams.claim_new(&key, "b", level, 100, lease))
                .await
                .expect("nothing is new: the claim must not wait for the commit")
                .expect("claim new")
                .entries;
            assert!(new.is_empty());
        }
        let next = tokio::time::timeout(quick, streams.next_due(&key))
            .await
            .expect("asking when something is due must not wait for the commit")
            .expect("next due");
        assert_eq!(next.map(to_ns), Some(to_ns(lease)), "the run's lease");
        drop(commit);

        // something due still takes the lock and is claimed
        let moved = streams
            .set_visible_at(
                &key,
                &[(2, 1)],
                Utc::now() - chrono::Duration::seconds(1),
                None,
            )
            .await
            .expect("nack");
        assert_eq!(moved, [true]);
        let due = streams
            .claim_due(&key, "b", 100, lease)
            .await
            .expect("claim due");
        let due: Vec<(u64, u32)> = due.iter().map(|c| (c.sequence, c.attempt)).collect();
        assert_eq!(due, [(2, 2)]);
    }

    #[tokio::test]
    async fn a_change_the_database_refuses_leaves_the_runs_as_they_were() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (streams, key, lease) = all_claimed(dir.path(), 10).await;
        let query_only = |on: bool| {
            let streams = streams.clone();
            async move {
                let writer = streams.store.db().lock_delivery_writer().await;
                writer
                    .pragma_update(None, "query_only", on)
                    .expect("pragma");
            }
        };
        query_only(true).await;
        let later = Utc::now() + chrono::Duration::seconds(10);
        assert!(streams.ack(&key, &[(1, 1), (2, 1)]).await.is_err());
        assert!(
            streams
                .set_visible_at(&key, &[(3, 1)], later, Some("boom"))
                .await
                .is_err()
        );
        query_only(false).await;
        // the refused transaction rolled back, and memory did not move ahead of the database
        assert_eq!(pending(&streams, &key).await, 10);
        let acked = streams
            .ack(&key, &[(1, 1), (2, 1), (3, 1)])
            .await
            .expect("ack");
        assert_eq!(acked, [true, true, true]);

        let store = streams.store.clone();
        drop(streams);
        let streams = EmbeddedStreams::start(store).await.expect("restart");
        assert_eq!(pending(&streams, &key).await, 7);
        assert_eq!(
            streams.next_due(&key).await.expect("next due").map(to_ns),
            Some(to_ns(lease)),
            "no entry kept the refused move's lease"
        );
    }

    #[tokio::test]
    async fn acks_find_their_run_among_the_levels_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        // every other event is high priority: the two levels' runs span the same sequences
        let (streams, key, _) = group_with_backlog(dir.path(), 3000, |i| {
            if i % 2 == 0 {
                Priority::High
            } else {
                Priority::Normal
            }
        })
        .await;
        let lease = Utc::now() + chrono::Duration::seconds(30);
        let mut claimed = Vec::new();
        for level in [Priority::High, Priority::Normal] {
            claimed.extend(
                streams
                    .claim_new(&key, "a", level, 5000, lease)
                    .await
                    .expect("claim")
                    .entries,
            );
        }
        assert_eq!(claimed.len(), 3000);
        assert_eq!(pending(&streams, &key).await, 3000);
        let mut deliveries: Vec<(u64, u32)> = claimed.iter().map(|c| (c.sequence, 1)).collect();
        deliveries.sort();
        let acked = streams.ack(&key, &deliveries).await.expect("ack");
        assert!(acked.iter().all(|a| *a), "every delivery acked");
        assert_eq!(pending(&streams, &key).await, 0);
        assert!(
            streams
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty(),
            "settled runs are gone"
        );
    }

    #[tokio::test]
    async fn a_groups_read_ahead_lives_only_while_a_member_is_connected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (streams, key, selection) =
            group_with_backlog(dir.path(), 300, |_| Priority::Normal).await;
        let interest = Interest {
            tenant: "t".into(),
            selection,
        };
        for member in ["a", "b"] {
            streams
                .join(member, Some(&key), interest.clone())
                .await
                .expect("join");
        }
        let lease = Utc::now() + chrono::Duration::seconds(30);
        let first = streams
            .claim_new(&key, "a", Priority::Normal, 100, lease)
            .await
            .expect("claim")
            .entries;
        let second = streams
            .claim_new(&key, "b", Priority::Normal, 100, lease)
            .await
            .expect("claim")
            .entries;
        let sequences: Vec<u64> = first.iter().chain(&second).map(|c| c.sequence).collect();
        assert_eq!(
            sequences,
            (1..=200).collect::<Vec<u64>>(),
            "claims continue in order"
        );
        let held = |streams: &EmbeddedStreams| {
            streams
                .claim_ahead
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&(key.clone(), level_index(Priority::Normal)))
        };
        assert!(held(&streams), "a full claim reads the next one ahead");
        streams.leave("a").await.expect("leave");
        assert!(held(&streams), "kept while another member is connected");
        streams.leave("b").await.expect("leave");
        assert!(!held(&streams), "dropped with the last member");
    }
}
