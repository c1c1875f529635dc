//! Group commit: publishes waiting at the same time are committed in one transaction (one fsync), in the
//! order they arrived, each inside its own savepoint or check so one conflicting request fails alone.
//!
//! When the database stops answering, the writer fails publishes at once (UNAVAILABLE) instead of letting
//! them queue behind connection attempts, and probes in the background until it answers again.

use std::{collections::HashMap, future::Future, time::Duration};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info};

use super::{Appended, NewEvent, StoreError, StoreResult};

/// Most events one group commit takes in.
const MAX_GROUP_COMMIT_EVENTS: usize = 10_000;
/// How often an unavailable database is probed.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// One publish waiting to be committed.
pub(crate) struct CommitRequest {
    pub tenant: String,
    pub events: Vec<NewEvent>,
    pub reply: oneshot::Sender<StoreResult<Vec<Appended>>>,
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
/// Both stores insert the result with a few set-based statements instead of statements per event.
pub(crate) fn plan(batch: &[CommitRequest], mut known: Known, head: i64) -> Plan<'_> {
    let mut next = head;
    let mut rows: Vec<NewRow<'_>> = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    for request in batch {
        let mut appended = Vec::with_capacity(request.events.len());
        let mut added: Vec<(String, String, String)> = Vec::new();
        let mut request_rows = Vec::new();
        let mut conflict = None;
        for new in &request.events {
            let e = new.event();
            let key = (request.tenant.clone(), e.source.clone(), e.id.clone());
            if let Some((seq, hash)) = known.get(&key) {
                if hash[..] != new.content_hash()[..] {
                    conflict = Some(StoreError::Conflict {
                        event_source: e.source.clone(),
                        id: e.id.clone(),
                    });
                    break;
                }
                appended.push(Appended {
                    sequence: *seq,
                    duplicate: true,
                });
                continue;
            }
            next += 1;
            known.insert(key.clone(), (next as u64, new.content_hash().to_vec()));
            added.push(key);
            request_rows.push(NewRow {
                seq: next,
                tenant: &request.tenant,
                event: new,
            });
            appended.push(Appended {
                sequence: next as u64,
                duplicate: false,
            });
        }
        match conflict {
            Some(conflict) => {
                next -= request_rows.len() as i64;
                for key in added {
                    known.remove(&key);
                }
                results.push(Err(conflict));
            }
            None => {
                rows.extend(request_rows);
                results.push(Ok(appended));
            }
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
}

/// Aggregates the rows per (tenant, type), so each statistics row is written once per commit.
pub(crate) fn type_stats<'a>(rows: &[NewRow<'a>]) -> Vec<TypeStats<'a>> {
    let mut stats: Vec<TypeStats<'a>> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    for r in rows {
        let event_type = r.event.event().event_type.as_str();
        let i = *index.entry((r.tenant, event_type)).or_insert_with(|| {
            stats.push(TypeStats {
                tenant: r.tenant,
                event_type,
                count: 0,
                first_seq: r.seq,
                last_seq: r.seq,
                levels: 0,
            });
            stats.len() - 1
        });
        let s = &mut stats[i];
        s.count += 1;
        s.last_seq = r.seq;
        s.levels |= level_bit(r.priority() as i16);
    }
    stats
}

/// Commits a batch of requests in one transaction.
pub(crate) trait BatchWriter: Send + 'static {
    /// Returns one result per request, in order; `Err` when the whole transaction failed.
    fn commit(
        &mut self,
        batch: &[CommitRequest],
    ) -> impl Future<Output = StoreResult<Vec<StoreResult<Vec<Appended>>>>> + Send;

    /// Returns a check that answers whether the database takes commits again.
    fn probe(&self) -> impl Future<Output = bool> + Send + 'static;
}

/// Starts the writer task; returns where to send requests.
pub(crate) fn start<W: BatchWriter>(
    mut writer: W,
    committed: watch::Sender<u64>,
) -> mpsc::Sender<CommitRequest> {
    let (tx, mut rx) = mpsc::channel::<CommitRequest>(1024);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut total = first.events.len();
            let mut batch = vec![first];
            while total < MAX_GROUP_COMMIT_EVENTS {
                match rx.try_recv() {
                    Ok(more) => {
                        total += more.events.len();
                        batch.push(more);
                    }
                    Err(_) => break,
                }
            }
            let started = std::time::Instant::now();
            let committed_batch = writer.commit(&batch).await;
            ::metrics::histogram!(crate::metrics::names::COMMIT_SECONDS).record(started.elapsed());
            ::metrics::histogram!(crate::metrics::names::COMMIT_BATCH).record(total as f64);
            match committed_batch {
                Ok(results) => {
                    let head = results
                        .iter()
                        .filter_map(|r| r.as_ref().ok())
                        .flatten()
                        .map(|a| a.sequence)
                        .max();
                    if let Some(head) = head {
                        advance(&committed, head);
                    }
                    debug!(requests = batch.len(), events = total, "group commit");
                    for (request, result) in batch.into_iter().zip(results) {
                        let _ = request.reply.send(result);
                    }
                }
                Err(e) => {
                    error!(error = %e, "group commit failed");
                    let unavailable = matches!(e, StoreError::Unavailable(_));
                    for request in batch {
                        let _ = request.reply.send(Err(match &e {
                            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                            other => StoreError::Internal(other.to_string()),
                        }));
                    }
                    if unavailable && !fail_fast_until_available(&mut writer, &mut rx).await {
                        return;
                    }
                }
            }
        }
    });
    tx
}

/// Answers every request with UNAVAILABLE at once while probing the database; returns when it answers
/// again (true) or when every sender is gone (false).
async fn fail_fast_until_available<W: BatchWriter>(
    writer: &mut W,
    rx: &mut mpsc::Receiver<CommitRequest>,
) -> bool {
    let mut probe = Box::pin(writer.probe());
    loop {
        tokio::select! {
            request = rx.recv() => match request {
                Some(request) => {
                    let _ = request.reply.send(Err(StoreError::Unavailable(
                        "the database does not answer; not accepting publishes until it does".into(),
                    )));
                }
                None => return false,
            },
            answered = &mut probe => {
                if answered {
                    info!("the database answers again; accepting publishes");
                    return true;
                }
                tokio::time::sleep(PROBE_EVERY).await;
                probe = Box::pin(writer.probe());
            }
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

/// Queues a publish and waits for its commit.
pub(crate) async fn submit(
    commits: &mpsc::Sender<CommitRequest>,
    tenant: &str,
    events: Vec<NewEvent>,
) -> StoreResult<Vec<Appended>> {
    let (reply, rx) = oneshot::channel();
    commits
        .send(CommitRequest {
            tenant: tenant.to_owned(),
            events,
            reply,
        })
        .await
        .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?;
    rx.await
        .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
}
