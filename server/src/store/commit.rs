//! Group commit: publishes waiting at the same time are committed in one transaction (one sync of the
//! log; on SQLite a sync on a thread of its own may cover several), in the order they arrived, each
//! inside its own savepoint or check so one conflicting request fails alone.
//!
//! When the database stops answering, the writer fails publishes at once (UNAVAILABLE) instead of letting
//! them queue behind connection attempts, and probes in the background until it answers again. A
//! failed sync of SQLite's log stops the process instead ([`start_syncs`]).

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::{Appended, NewEvent, StoreError, StoreResult};
use crate::event::StoredEvent;

/// Events after which a group commit takes in no more requests: it holds at most this many plus one
/// request's (`limits.max_batch_events`), since a request is not split.
const MAX_GROUP_COMMIT_EVENTS: usize = 10_000;
/// Event bytes after which a group commit takes in no more requests (at most one request's more):
/// Postgres binds all bodies as one array, and refuses one over 1 GiB, which 256 concurrent 4 MiB
/// publishes reached.
const MAX_GROUP_COMMIT_BYTES: usize = 64 << 20;
/// How often an unavailable database is probed.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// Most requests queued for the writer.
const QUEUED_REQUESTS: usize = 1024;
/// Most bytes of publishes (each event and its encoding) queued for the writer and not yet answered;
/// a publish past them waits for room. By count alone the queue held up to 1,024 requests of 4 MiB
/// batches, about 8 GiB with their encodings.
pub(crate) const QUEUED_BYTES: usize = 256 << 20;
/// The bytes one permit of the queue's room stands for.
const ROOM_UNIT: usize = 1 << 10;

/// One publish waiting to be committed.
pub(crate) struct CommitRequest {
    pub tenant: String,
    pub events: Vec<NewEvent>,
    pub reply: oneshot::Sender<StoreResult<Vec<Appended>>>,
    /// Its bytes' share of the queue's room, given back when the request is answered (dropped).
    pub _room: OwnedSemaphorePermit,
}

/// Where publishes go to the writer: its queue and the room left in it, in bytes.
#[derive(Clone)]
pub(crate) struct CommitQueue {
    requests: mpsc::Sender<CommitRequest>,
    room: Arc<Semaphore>,
    /// All the room there is, in permits: a request larger than the queue waits for all of it.
    units: u32,
}

impl CommitQueue {
    /// A queue of at most [`QUEUED_REQUESTS`] requests and `bytes` of their events.
    fn new(bytes: usize) -> (Self, mpsc::Receiver<CommitRequest>) {
        let (requests, rx) = mpsc::channel(QUEUED_REQUESTS);
        let units = u32::try_from(bytes / ROOM_UNIT).unwrap_or(u32::MAX).max(1);
        let room = Arc::new(Semaphore::new(units as usize));
        (
            CommitQueue {
                requests,
                room,
                units,
            },
            rx,
        )
    }
}

/// Room in no queue, for tests that build requests themselves.
#[cfg(test)]
pub(crate) fn unqueued_room() -> OwnedSemaphorePermit {
    Arc::new(Semaphore::new(1))
        .try_acquire_owned()
        .expect("a permit")
}

/// A stored row's sequence and content hash, keyed by (tenant, source, id).
pub(crate) type Known = HashMap<(String, String, String), (u64, Vec<u8>)>;

/// One event row to insert, with its sequence assigned; it borrows from the batch.
pub(crate) struct NewRow<'a> {
    pub seq: i64,
    pub tenant: &'a str,
    pub event: &'a NewEvent,
}

impl NewRow<'_> {
    /// The event's priority level as stored.
    pub fn priority(&self) -> i64 {
        self.event.event().priority.as_i64()
    }
}

/// What a group commit writes and answers.
pub(crate) struct Plan<'a> {
    /// Rows to insert, in sequence order.
    pub rows: Vec<NewRow<'a>>,
    /// One result per request, in order.
    pub results: Vec<StoreResult<Vec<Appended>>>,
}

/// Decides a batch in memory, given the rows already stored under its keys (`known`) and the current
/// head: duplicates answer with their stored sequence, a request holding a conflicting event fails alone
/// (its sequences go to the next request, so none is skipped), everything else gets the next sequences.
/// Postgres inserts the result in one set-based statement (one round trip); SQLite, in process, runs
/// one prepared statement per row.
///
/// Keys are borrowed from the batch, so deciding an event allocates nothing: with owned keys, cloning
/// them took ~7 % of the writer thread at 100-event publishes (docs/benchmarks.md, cause 6).
pub(crate) fn plan(batch: &[CommitRequest], known: Known, head: i64) -> Plan<'_> {
    // every key stored or decided so far, with its sequence and content hash
    let mut decided: HashMap<(&str, &str, &str), (u64, &[u8])> = known
        .iter()
        .map(|((tenant, source, id), (seq, hash))| {
            (
                (tenant.as_str(), source.as_str(), id.as_str()),
                (*seq, hash.as_slice()),
            )
        })
        .collect();
    let mut next = head;
    let mut rows: Vec<NewRow<'_>> = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    for request in batch {
        let first_row = rows.len();
        let mut appended = Vec::with_capacity(request.events.len());
        let mut conflict = None;
        for new in &request.events {
            let e = new.event();
            let hash = &new.content_hash()[..];
            match decided.entry((request.tenant.as_str(), e.source.as_str(), e.id.as_str())) {
                Entry::Occupied(stored) => {
                    let (sequence, stored_hash) = *stored.get();
                    if stored_hash != hash {
                        conflict = Some(StoreError::Conflict {
                            event_source: e.source.clone(),
                            id: e.id.clone(),
                        });
                        break;
                    }
                    appended.push(Appended {
                        sequence,
                        duplicate: true,
                    });
                }
                Entry::Vacant(slot) => {
                    next += 1;
                    slot.insert((next as u64, hash));
                    rows.push(NewRow {
                        seq: next,
                        tenant: &request.tenant,
                        event: new,
                    });
                    appended.push(Appended {
                        sequence: next as u64,
                        duplicate: false,
                    });
                }
            }
        }
        match conflict {
            Some(conflict) => {
                // the request fails alone: its rows go, and the next request takes their sequences
                for row in rows.drain(first_row..) {
                    let e = row.event.event();
                    decided.remove(&(row.tenant, e.source.as_str(), e.id.as_str()));
                    next -= 1;
                }
                results.push(Err(conflict));
            }
            None => results.push(Ok(appended)),
        }
    }
    Plan { rows, results }
}

/// The keys of every event of the batch, in order: (tenant, source, id).
pub(crate) fn keys(batch: &[CommitRequest]) -> Vec<(&str, &str, &str)> {
    batch
        .iter()
        .flat_map(|r| {
            r.events.iter().map(|e| {
                let e = e.event();
                (r.tenant.as_str(), e.source.as_str(), e.id.as_str())
            })
        })
        .collect()
}

/// The bit of a priority level in the per-type `levels` set.
pub(crate) fn level_bit(priority: i16) -> i16 {
    1 << (priority.clamp(1, 4) - 1)
}

/// Per (tenant, type) of the rows: count, first and last sequence, and the priority levels seen.
pub(crate) struct TypeStats<'a> {
    pub tenant: &'a str,
    pub event_type: &'a str,
    pub count: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    /// Bit `level - 1` set for every priority level seen.
    pub levels: i16,
    /// The first sequence of each level seen, at index `level - 1`.
    pub level_first_seqs: [Option<i64>; 4],
}

/// Aggregates the rows per (tenant, type), so each statistics row is written once per commit.
pub(crate) fn type_stats<'a>(rows: &[NewRow<'a>]) -> Vec<TypeStats<'a>> {
    let mut stats: Vec<TypeStats<'a>> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    let mut last = None;
    for r in rows {
        let event_type = r.event.event().event_type.as_str();
        // rows of one type usually come in runs: look up only when the type changes
        let same = |i: &usize| stats[*i].tenant == r.tenant && stats[*i].event_type == event_type;
        let i = match last.filter(same) {
            Some(i) => i,
            None => *index.entry((r.tenant, event_type)).or_insert_with(|| {
                stats.push(TypeStats {
                    tenant: r.tenant,
                    event_type,
                    count: 0,
                    first_seq: r.seq,
                    last_seq: r.seq,
                    levels: 0,
                    level_first_seqs: [None; 4],
                });
                stats.len() - 1
            }),
        };
        last = Some(i);
        let s = &mut stats[i];
        s.count += 1;
        s.last_seq = r.seq;
        let level = r.priority() as i16;
        s.levels |= level_bit(level);
        s.level_first_seqs[level_bit(level).trailing_zeros() as usize].get_or_insert(r.seq);
    }
    stats
}

/// What a group commit wrote.
pub(crate) struct Committed {
    /// One result per request, in order.
    pub results: Vec<StoreResult<Vec<Appended>>>,
    /// The recorded time of every event it stored (ns since the epoch).
    pub recorded_ns: i64,
}

/// How one attempt at a group commit ended, short of success.
pub(crate) enum Attempt {
    /// Written without looking up the keys, and one was already stored: nothing was written.
    KeyStored,
    Failed(StoreError),
}

impl From<StoreError> for Attempt {
    fn from(e: StoreError) -> Self {
        Attempt::Failed(e)
    }
}

/// Commits a batch of requests in one transaction.
pub(crate) trait BatchWriter: Send + 'static {
    /// Returns one result per request, in order. With `look_up_keys` it first reads the rows stored
    /// under the batch's keys; without, it decides the batch as if none were stored and answers
    /// [`Attempt::KeyStored`], having written nothing, when the unique index refuses a row.
    fn attempt(
        &mut self,
        batch: &[CommitRequest],
        look_up_keys: bool,
    ) -> impl Future<Output = Result<Committed, Attempt>> + Send;

    /// Returns a check that answers whether the database takes commits again, and if not, why.
    fn probe(&self) -> impl Future<Output = StoreResult<()>> + Send + 'static;

    /// For a writer whose commits are not durable when [`BatchWriter::attempt`] returns: the sync
    /// that makes every commit returned before it durable. A thread of its own runs it while the
    /// writer goes on with the next batch, and a commit is shown and answered only after a sync that
    /// began after it returned.
    fn log_sync(&mut self) -> Option<LogSync> {
        None
    }
}

/// Makes every commit a writer returned before the call durable; see [`BatchWriter::log_sync`].
pub(crate) type LogSync = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// Commits that look up their keys first after a batch held an event already stored: retries of
/// publishes come in bursts, and each such batch would otherwise be written twice.
const LOOKUPS_AFTER_A_STORED_KEY: u32 = 64;

/// Commits a batch. Most batches hold no event already stored, so the key lookup (a round trip to
/// Postgres, and a unique-index probe per key) is skipped: the insert itself fails
/// on the unique key if one was stored, and then the batch is committed again with the lookup, which
/// answers duplicates and conflicts. `lookups_left` counts the commits still to look up first.
async fn commit<W: BatchWriter>(
    writer: &mut W,
    batch: &[CommitRequest],
    lookups_left: &mut u32,
) -> StoreResult<Committed> {
    if *lookups_left == 0 {
        match writer.attempt(batch, false).await {
            Ok(committed) => return Ok(committed),
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::KeyStored) => *lookups_left = LOOKUPS_AFTER_A_STORED_KEY,
        }
    }
    *lookups_left = lookups_left.saturating_sub(1);
    match writer.attempt(batch, true).await {
        Ok(committed) => Ok(committed),
        Err(Attempt::Failed(e)) => Err(e),
        Err(Attempt::KeyStored) => Err(StoreError::Internal(
            "an event key was stored between the lookup and the insert".into(),
        )),
    }
}

/// Most events [`RecentCommits`] holds.
const RECENT_EVENTS: usize = 16_384;
/// Most bytes of stored JSON [`RecentCommits`] holds, so large events cannot make it large.
const RECENT_BYTES: usize = 32 << 20;

/// The events this process committed last, in sequence order. The relay feeds the live streams from
/// here instead of reading every event back from the database and decoding it again; other replicas'
/// commits, and anything older, are read from the database.
#[derive(Default)]
pub(crate) struct RecentCommits {
    held: Mutex<Held>,
    /// Whether the writer has a commit in flight, and how many it finished.
    writer: watch::Sender<WriterState>,
}

#[derive(Default, Clone, Copy)]
struct WriterState {
    /// Commits begun; more than `finished` while some are in flight (one being written, others
    /// waiting for their sync).
    begun: u64,
    finished: u64,
}

impl WriterState {
    fn committing(&self) -> bool {
        self.begun > self.finished
    }
}

#[derive(Default)]
struct Held {
    /// (event, size of its stored JSON), sequences increasing.
    events: VecDeque<(Arc<StoredEvent>, usize)>,
    /// Sum of the sizes.
    bytes: usize,
}

impl RecentCommits {
    /// Marks a commit as in flight, until [`RecentCommits::finish`].
    fn begin(&self) {
        self.writer.send_modify(|w| w.begun += 1);
    }

    /// Adds the events a commit stored (sequences increasing; none when it failed), dropping the
    /// oldest beyond the bounds, and marks the commit finished. Commits finish in the order they
    /// began.
    fn finish(&self, fresh: Vec<(Arc<StoredEvent>, usize)>) {
        {
            let mut guard = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let Held { events, bytes } = &mut *guard;
            for (event, size) in fresh {
                if events
                    .back()
                    .is_some_and(|(last, _)| last.sequence >= event.sequence)
                {
                    // cannot happen while this process is the only writer of its sequences; stay ordered anyway
                    events.clear();
                    *bytes = 0;
                }
                *bytes += size;
                events.push_back((event, size));
            }
            while events.len() > RECENT_EVENTS || (*bytes > RECENT_BYTES && events.len() > 1) {
                if let Some((_, size)) = events.pop_front() {
                    *bytes -= size;
                }
            }
        }
        // after the events are held: a read woken by this finds them
        self.writer.send_modify(|w| {
            w.finished += 1;
            w.begun = w.begun.max(w.finished);
        });
    }

    /// The events from `after + 1` on without a gap, at most `limit`; `None` unless `after + 1` is held.
    pub(crate) fn read_after(&self, after: u64, limit: usize) -> Option<Vec<Arc<StoredEvent>>> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let events = &held.events;
        let next = after.checked_add(1)?;
        // other replicas' commits leave gaps, so the position is searched for, not computed
        let start = events
            .binary_search_by_key(&next, |(e, _)| e.sequence)
            .ok()?;
        let mut out = Vec::new();
        for (event, _) in events.range(start..) {
            if out.len() >= limit || event.sequence != next + out.len() as u64 {
                break;
            }
            out.push(event.clone());
        }
        (!out.is_empty()).then_some(out)
    }

    /// Waits for this process' commits in flight, if any. Their events carry a recorded time taken when
    /// they began, so a time bound turned into a sequence right after this counts them.
    pub(crate) async fn settled(&self) {
        let state = *self.writer.borrow();
        if state.committing() {
            // an error means the writer is gone: nothing is in flight any more
            let _ = self
                .writer
                .subscribe()
                .wait_for(|w| w.finished >= state.begun)
                .await;
        }
    }

    /// [`RecentCommits::read_after`], except that a read past every held event, while a commit is in
    /// flight, first waits for that commit. A replica's commit listener can hear its own commit before
    /// the writer has put the events here; reading them back from the database instead cost a round
    /// trip, for up to a third of the commits at 10K events/s (docs/benchmarks.md, cause 4). Another
    /// replica's events asked for meanwhile wait for that commit too, then come from the database.
    pub(crate) async fn read_after_settled(
        &self,
        after: u64,
        limit: usize,
    ) -> Option<Vec<Arc<StoredEvent>>> {
        // the state first: a commit that finishes after it is waited for, or its events are found below
        let state = *self.writer.borrow();
        if let Some(events) = self.read_after(after, limit) {
            return Some(events);
        }
        let past_held = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.events
                .back()
                .is_none_or(|(last, _)| last.sequence <= after)
        };
        if !state.committing() || !past_held {
            return None;
        }
        // an error means the writer is gone: the caller reads the database
        let _ = self
            .writer
            .subscribe()
            .wait_for(|w| w.finished > state.finished)
            .await;
        self.read_after(after, limit)
    }
}

/// Starts the writer on a thread of its own; returns where to send requests. Committed events go to
/// `recent` before the committed head moves, so whoever the head wakes finds them there.
///
/// The writer is the one serial step every publish waits for. As a task of the server's runtime it
/// waited behind gRPC tasks each time its database call returned; on its own thread (with a runtime
/// of its own for its database calls) it goes on at once (docs/benchmarks.md, cause 4: the p50 at 10K
/// events/s fell in six of seven alternated pairs).
pub(crate) fn start<W: BatchWriter>(
    mut writer: W,
    committed: watch::Sender<u64>,
    recent: Arc<RecentCommits>,
) -> StoreResult<CommitQueue> {
    let (tx, mut rx) = CommitQueue::new(QUEUED_BYTES);
    let finishing = match writer.log_sync() {
        None => Finishing::AtOnce {
            recent: recent.clone(),
            committed,
        },
        Some(sync) => Finishing::AfterSync(start_syncs(sync, recent.clone(), committed)?),
    };
    let writer_loop = async move {
        let mut lookups_left = 0;
        while let Some(first) = rx.recv().await {
            let size = |r: &CommitRequest| r.events.iter().map(|e| e.body().len()).sum::<usize>();
            let mut total = first.events.len();
            let mut bytes = size(&first);
            let mut batch = vec![first];
            while total < MAX_GROUP_COMMIT_EVENTS && bytes < MAX_GROUP_COMMIT_BYTES {
                match rx.try_recv() {
                    Ok(more) => {
                        total += more.events.len();
                        bytes += size(&more);
                        batch.push(more);
                    }
                    Err(_) => break,
                }
            }
            let failed = match commit_and_answer(
                &mut writer,
                batch,
                &mut lookups_left,
                &recent,
                &finishing,
            )
            .await
            {
                Ok(()) => None,
                // one bad request (an event key too long for Postgres' index, say) would fail the
                // whole batch, and the same traffic forms the same batch again: each request alone
                Err((batch, StoreError::Internal(e))) if batch.len() > 1 => {
                    warn!(error = %e, requests = batch.len(), "group commit failed; committing its requests one by one");
                    let mut failed = None;
                    for request in batch {
                        if let Some(e) = &failed {
                            answer(vec![request], e);
                            continue;
                        }
                        let single = commit_and_answer(
                            &mut writer,
                            vec![request],
                            &mut lookups_left,
                            &recent,
                            &finishing,
                        )
                        .await;
                        if let Err((single, e)) = single {
                            answer(single, &e);
                            // once the database is away, the rest get the same answer at once
                            if matches!(e, StoreError::Unavailable(_)) {
                                failed = Some(e);
                            }
                        }
                    }
                    failed
                }
                Err((batch, e)) => {
                    answer(batch, &e);
                    Some(e)
                }
            };
            if matches!(failed, Some(StoreError::Unavailable(_)))
                && !fail_fast_until_available(&mut writer, &mut rx).await
            {
                return;
            }
        }
    };
    let unstarted = |e: std::io::Error| StoreError::Internal(format!("starting the writer: {e}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(unstarted)?;
    spawn_vital("nerve-commit", move || runtime.block_on(writer_loop)).map_err(unstarted)?;
    Ok(tx)
}

/// Starts one of the threads every commit passes through (the writer, the log sync). A panic in one
/// stops the process: the commit it held would be neither answered nor shown, waits for it
/// ([`RecentCommits::settled`]) would not end, and every later publish would fail, in a process that
/// still looks alive to its probes.
fn spawn_vital(name: &'static str, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // the panic hook has already printed what panicked and where
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
                stop_process(&format!("the {name} thread panicked"));
            }
        })
        .map(|_| ())
}

/// Commits written and waiting for their sync, at most, before the writer waits for the sync too.
/// One sync covers every commit waiting, so more would only hold more memory.
pub const COMMITS_AWAITING_SYNC: usize = 2;

/// Starts the thread that syncs the writer's log ([`BatchWriter::log_sync`]) and then shows and
/// answers the commits written before the sync began, in the order they were written; returns where
/// to send them. It ends when the writer does, after syncing what was written last.
///
/// With the sync inside the commit, a publish waited for the commit in progress, its sync included,
/// and then for its own: the sync was on the writer's path twice (docs/benchmarks.md, cause 4).
fn start_syncs(
    mut sync: LogSync,
    recent: Arc<RecentCommits>,
    committed: watch::Sender<u64>,
) -> StoreResult<std::sync::mpsc::SyncSender<Written>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Written>(COMMITS_AWAITING_SYNC);
    spawn_vital("nerve-sync", move || {
        while let Ok(first) = rx.recv() {
            let mut written = vec![first];
            written.extend(rx.try_iter());
            if written.iter().any(|w| w.started.is_some())
                && let Err(e) = sync()
            {
                // The kernel may mark the pages it could not write clean, so a later sync
                // would succeed without writing them: which commits reached the disk cannot be
                // known, and none of these was shown or answered (Postgres stops alike).
                stop_process(&format!("syncing the event log failed ({e})"));
            }
            for w in written {
                w.finish(&recent, &committed);
            }
        }
    })
    .map_err(|e| StoreError::Internal(format!("starting the log sync: {e}")))?;
    Ok(tx)
}

/// Ends the process when commits can no longer be synced, shown and answered: it cannot tell which
/// of those in flight reached the disk, nor go on without them.
pub(crate) fn stop_process(why: &str) -> ! {
    error!(reason = why, "stopping the process");
    eprintln!("nerve: {why}; stopping the process");
    std::process::abort()
}

/// Where a written commit goes to be shown and answered.
enum Finishing {
    /// The commit was durable when written: at once, on the writer's thread.
    AtOnce {
        recent: Arc<RecentCommits>,
        committed: watch::Sender<u64>,
    },
    /// To the thread that syncs the log first ([`start_syncs`]).
    AfterSync(std::sync::mpsc::SyncSender<Written>),
}

impl Finishing {
    fn finish(&self, written: Written) {
        match self {
            Finishing::AtOnce { recent, committed } => written.finish(recent, committed),
            Finishing::AfterSync(syncs) => {
                // the sync thread ends after the writer, but for a panic, which stops the process
                // ([`spawn_vital`]) once it has unwound; a commit written meanwhile stops it here
                if syncs.send(written).is_err() {
                    stop_process("the nerve-sync thread has stopped");
                }
            }
        }
    }
}

/// A commit written (or failed), to be shown and answered in the order commits began.
struct Written {
    batch: Vec<CommitRequest>,
    results: Vec<StoreResult<Vec<Appended>>>,
    fresh: Vec<(Arc<StoredEvent>, usize)>,
    events: usize,
    /// When the commit began; `None` for a failed one, which only ends its turn in flight.
    started: Option<std::time::Instant>,
}

impl Written {
    fn failed() -> Self {
        Written {
            batch: Vec::new(),
            results: Vec::new(),
            fresh: Vec::new(),
            events: 0,
            started: None,
        }
    }

    /// Holds the commit's events for the relay, raises the committed head, answers the requests.
    fn finish(self, recent: &RecentCommits, committed: &watch::Sender<u64>) {
        if let Some(started) = self.started {
            // commits only: a failed batch is tried again, and would count its events twice
            ::metrics::histogram!(crate::metrics::names::COMMIT_SECONDS).record(started.elapsed());
            ::metrics::histogram!(crate::metrics::names::COMMIT_BATCH).record(self.events as f64);
            debug!(
                requests = self.batch.len(),
                events = self.events,
                "group commit"
            );
        }
        let head = self.fresh.last().map(|(e, _)| e.sequence);
        recent.finish(self.fresh);
        if let Some(head) = head {
            advance(committed, head);
        }
        for (request, result) in self.batch.into_iter().zip(self.results) {
            let _ = request.reply.send(result);
        }
    }
}

/// Commits one batch and hands it on to be answered; on failure it hands the batch back unanswered.
async fn commit_and_answer<W: BatchWriter>(
    writer: &mut W,
    mut batch: Vec<CommitRequest>,
    lookups_left: &mut u32,
    recent: &RecentCommits,
    finishing: &Finishing,
) -> Result<(), (Vec<CommitRequest>, StoreError)> {
    let events: usize = batch.iter().map(|r| r.events.len()).sum();
    let started = std::time::Instant::now();
    recent.begin();
    match commit(writer, &batch, lookups_left).await {
        Ok(Committed {
            results,
            recorded_ns,
        }) => {
            let fresh = stored_events(&mut batch, &results, recorded_ns);
            finishing.finish(Written {
                batch,
                results,
                fresh,
                events,
                started: Some(started),
            });
            Ok(())
        }
        Err(e) => {
            finishing.finish(Written::failed());
            error!(error = %e, requests = batch.len(), "group commit failed");
            Err((batch, e))
        }
    }
}

/// Answers every request of a failed commit with its error.
fn answer(batch: Vec<CommitRequest>, e: &StoreError) {
    for request in batch {
        let _ = request.reply.send(Err(match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::Internal(m) => StoreError::Internal(m.clone()),
            other => StoreError::Internal(other.to_string()),
        }));
    }
}

/// Moves the events a commit stored out of its requests, as read back later would return them.
fn stored_events(
    batch: &mut [CommitRequest],
    results: &[StoreResult<Vec<Appended>>],
    recorded_ns: i64,
) -> Vec<(Arc<StoredEvent>, usize)> {
    let recorded_at = super::sqlite::from_ns(recorded_ns);
    let mut fresh = Vec::new();
    for (request, result) in batch.iter_mut().zip(results) {
        let Ok(appended) = result else { continue };
        for (new, a) in request.events.drain(..).zip(appended) {
            if a.duplicate {
                continue;
            }
            let size = new.body.len();
            let stored = StoredEvent {
                tenant: request.tenant.clone(),
                sequence: a.sequence,
                recorded_at,
                event: new.event,
            };
            fresh.push((Arc::new(stored), size));
        }
    }
    // plan() numbers stored events in request order, so these are in sequence order
    fresh
}

/// Answers every request with UNAVAILABLE at once while probing the database; returns when it answers
/// again (true) or when every sender is gone (false).
async fn fail_fast_until_available<W: BatchWriter>(
    writer: &mut W,
    rx: &mut mpsc::Receiver<CommitRequest>,
) -> bool {
    let mut probe = Box::pin(writer.probe());
    // the last probe's answer once there is one (a standby answers, but takes no commits)
    let mut why = "the database does not answer".to_owned();
    loop {
        tokio::select! {
            // the probe first: one that answered at once lets the request beside it be tried
            biased;
            answered = &mut probe => {
                match answered {
                    Ok(()) => {
                        info!("the database takes commits again; accepting publishes");
                        return true;
                    }
                    Err(StoreError::Unavailable(reason) | StoreError::Internal(reason)) => {
                        why = reason;
                    }
                    Err(other) => why = other.to_string(),
                }
                tokio::time::sleep(PROBE_EVERY).await;
                probe = Box::pin(writer.probe());
            }
            request = rx.recv() => match request {
                Some(request) => {
                    let _ = request.reply.send(Err(StoreError::Unavailable(format!(
                        "{why}; not accepting publishes until it takes commits again"
                    ))));
                }
                None => return false,
            },
        }
    }
}

/// Raises the committed head (never lowers it).
pub(crate) fn advance(committed: &watch::Sender<u64>, head: u64) {
    committed.send_if_modified(|h| {
        let grew = head > *h;
        *h = (*h).max(head);
        grew
    });
}

/// A batch in the commit queue: it commits after every batch queued before it.
pub struct Queued(oneshot::Receiver<StoreResult<Vec<Appended>>>);

impl Queued {
    /// Waits for the batch's commit; one result per event, in order.
    pub async fn committed(mut self) -> StoreResult<Vec<Appended>> {
        self.answer().await
    }

    /// Waits for the batch's commit, leaving the wait in place if dropped before the answer.
    pub async fn answer(&mut self) -> StoreResult<Vec<Appended>> {
        (&mut self.0)
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }

    /// Moves the wait out, leaving one that answers at once as if the writer had stopped.
    pub fn take(&mut self) -> Queued {
        let (_, stopped) = oneshot::channel();
        Queued(std::mem::replace(&mut self.0, stopped))
    }
}

/// Queues a publish for the writer; it is committed in queue order.
pub(crate) async fn queue(
    commits: &CommitQueue,
    tenant: &str,
    events: Vec<NewEvent>,
) -> StoreResult<Queued> {
    let stopped = || StoreError::Unavailable("store writer stopped".into());
    let bytes: usize = events
        .iter()
        .map(|e| e.body().len() + e.event().size())
        .sum();
    let units = u32::try_from(bytes.div_ceil(ROOM_UNIT).max(1))
        .unwrap_or(u32::MAX)
        .min(commits.units);
    let room = commits
        .room
        .clone()
        .acquire_many_owned(units)
        .await
        .map_err(|_| stopped())?;
    let (reply, rx) = oneshot::channel();
    commits
        .requests
        .send(CommitRequest {
            tenant: tenant.to_owned(),
            events,
            reply,
            _room: room,
        })
        .await
        .map_err(|_| stopped())?;
    Ok(Queued(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_of(bytes: usize) -> Vec<NewEvent> {
        let event = crate::event::Event {
            id: "e".into(),
            data: crate::event::Data::Binary(vec![7; bytes]),
            ..Default::default()
        };
        let hash = event.content_hash();
        vec![NewEvent::new(event, hash)]
    }

    #[tokio::test]
    async fn a_publish_waits_for_room_in_the_queue_until_one_before_it_is_answered() {
        let (queue, mut writer) = CommitQueue::new(4 << 20);
        // an event and its encoding: about 3 MiB of the queue's 4 MiB
        let first = super::queue(&queue, "t", request_of(1_500_000))
            .await
            .expect("room for the first");
        let mut second = Box::pin(super::queue(&queue, "t", request_of(1_500_000)));
        assert!(
            futures::FutureExt::now_or_never(&mut second).is_none(),
            "the second waits for room"
        );
        // the writer takes the first and answers it, which gives its room back
        let CommitRequest {
            reply, _room: room, ..
        } = writer.recv().await.expect("the first request");
        let _ = reply.send(Ok(Vec::new()));
        drop(room);
        first.committed().await.expect("answered");
        second.await.expect("room for the second");
        assert!(writer.recv().await.is_some(), "the second was queued");
    }

    fn stored(sequence: u64) -> (Arc<StoredEvent>, usize) {
        let event = StoredEvent {
            tenant: "t".into(),
            sequence,
            recorded_at: chrono::DateTime::UNIX_EPOCH,
            event: crate::event::Event::default(),
        };
        (Arc::new(event), 1 << 20)
    }

    fn sequences(events: Option<Vec<Arc<StoredEvent>>>) -> Option<Vec<u64>> {
        events.map(|events| events.iter().map(|e| e.sequence).collect())
    }

    #[test]
    fn recent_commits_answer_only_for_a_gapless_run_from_the_position() {
        let recent = RecentCommits::default();
        // another replica committed 13: this process holds 10-12 and 14-15
        recent.finish([10, 11, 12, 14, 15].into_iter().map(stored).collect());
        assert_eq!(sequences(recent.read_after(9, 100)), Some(vec![10, 11, 12]));
        assert_eq!(sequences(recent.read_after(10, 1)), Some(vec![11]));
        assert_eq!(
            sequences(recent.read_after(12, 100)),
            None,
            "13 is not held"
        );
        assert_eq!(sequences(recent.read_after(13, 100)), Some(vec![14, 15]));
        assert_eq!(sequences(recent.read_after(8, 100)), None, "9 is not held");
        assert_eq!(sequences(recent.read_after(15, 100)), None);
        assert_eq!(sequences(recent.read_after(u64::MAX, 100)), None);
    }

    #[tokio::test]
    async fn settling_waits_for_the_commit_in_flight_only() {
        let recent = Arc::new(RecentCommits::default());
        recent.settled().await;
        recent.begin();
        let settling = tokio::spawn({
            let recent = recent.clone();
            async move { recent.settled().await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !settling.is_finished(),
            "settled before the commit finished"
        );
        recent.finish(Vec::new());
        settling.await.expect("settled");
    }

    #[tokio::test]
    async fn a_read_past_the_held_events_waits_for_the_commit_in_flight() {
        let recent = Arc::new(RecentCommits::default());
        recent.finish([10, 11, 12].into_iter().map(stored).collect());
        assert_eq!(
            sequences(recent.read_after_settled(12, 100).await),
            None,
            "with no commit in flight a miss goes to the database at once"
        );
        recent.begin();
        assert_eq!(
            sequences(recent.read_after_settled(8, 100).await),
            None,
            "older events than any held are not waited for"
        );
        let reader = tokio::spawn({
            let recent = recent.clone();
            async move { recent.read_after_settled(12, 100).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !reader.is_finished(),
            "the read answered before the commit in flight finished"
        );
        recent.finish([13, 14].into_iter().map(stored).collect());
        assert_eq!(sequences(reader.await.expect("reader")), Some(vec![13, 14]));
        // a failed commit ends the wait too; the reader then goes to the database
        recent.begin();
        let reader = tokio::spawn({
            let recent = recent.clone();
            async move { recent.read_after_settled(14, 100).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!reader.is_finished(), "the read did not wait");
        recent.finish(Vec::new());
        assert_eq!(sequences(reader.await.expect("reader")), None);
    }

    #[test]
    fn recent_commits_stay_within_their_bounds() {
        let recent = RecentCommits::default();
        // 1 MiB each: the byte bound keeps the last 32
        recent.finish((1..=100).map(stored).collect());
        assert_eq!(
            sequences(recent.read_after(68, 1000)).map(|s| s.len()),
            Some(32)
        );
        assert_eq!(sequences(recent.read_after(67, 1000)), None);
        let small = |sequence| (stored(sequence).0, 1);
        recent.finish((101..=20_100).map(small).collect());
        assert_eq!(
            sequences(recent.read_after(20_100 - RECENT_EVENTS as u64, 100_000)).map(|s| s.len()),
            Some(RECENT_EVENTS)
        );
        assert_eq!(
            sequences(recent.read_after(20_099 - RECENT_EVENTS as u64, 100)),
            None
        );
    }
}
