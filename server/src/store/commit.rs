//! Group commit: publishes waiting at the same time are committed in one transaction (one fsync), in the
//! order they arrived, each inside its own savepoint or check so one conflicting request fails alone.

use std::future::Future;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error};

use super::{Appended, NewEvent, StoreError, StoreResult};

/// Most events one group commit takes in.
const MAX_GROUP_COMMIT_EVENTS: usize = 10_000;

/// One publish waiting to be committed.
pub(crate) struct CommitRequest {
    pub tenant: String,
    pub events: Vec<NewEvent>,
    pub reply: oneshot::Sender<StoreResult<Vec<Appended>>>,
}

/// Commits a batch of requests in one transaction.
pub(crate) trait BatchWriter: Send + 'static {
    /// Returns one result per request, in order; `Err` when the whole transaction failed.
    fn commit(
        &mut self,
        batch: &[CommitRequest],
    ) -> impl Future<Output = StoreResult<Vec<StoreResult<Vec<Appended>>>>> + Send;
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
            match writer.commit(&batch).await {
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
                    for request in batch {
                        let _ = request.reply.send(Err(match &e {
                            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                            other => StoreError::Internal(other.to_string()),
                        }));
                    }
                }
            }
        }
    });
    tx
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
