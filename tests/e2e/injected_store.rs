//! Fault injection for in-process servers: a store wrapper that fails or stops on command, so tests
//! can put a server into states that otherwise need bad luck (a database going away, one call
//! landing between two steps of another).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use nerve::{
    Backends,
    event::{Selection, StoredEvent},
    store::{
        AuditPruned, AuditQuery, AuditRecord, DeadLetter, EventStore, EventTypeStats, NewEvent,
        Publisher, Queued, ReadPage, ReadQuery, StoreError, StoreResult,
    },
};
use tokio::sync::{oneshot, watch};

use crate::harness::*;

/// What a test can do to the store of a server started with [`start_injected`].
#[derive(Default)]
pub struct Injection {
    /// While set, every call fails with UNAVAILABLE.
    pub down: AtomicBool,
    /// Stops a `put_dead_letter` before it records the letter.
    pub before_put_dead_letter: Gate,
    /// Stops a `put_dead_letter` after it recorded the letter.
    pub after_put_dead_letter: Gate,
    /// Stops a `remove_dead_letters` before it removes anything.
    pub before_remove_dead_letters: Gate,
    /// Stops a `remove_dead_letters` after it removed what it did.
    pub after_remove_dead_letters: Gate,
    /// Stops a `restore_dead_letter` after it put back what it did.
    pub after_restore_dead_letter: Gate,
    /// Fails the next `read_sequences` with UNAVAILABLE.
    pub fail_next_read_sequences: AtomicBool,
    /// Fails the next `put_dead_letter` with UNAVAILABLE, recording nothing.
    pub fail_next_put_dead_letter: AtomicBool,
    /// Stops a `read` before it reads.
    pub before_read: Gate,
    /// Stops a `queue` (a publish) before it reaches the commit queue.
    pub before_queue: Gate,
    /// Stops a `head` before it reads the committed head (a subscription's open reads it first).
    pub before_head: Gate,
    /// Stops an `append_audit` before it writes the records.
    pub before_append_audit: Gate,
    /// Stops a `ping` (the health check's) before it reaches the store.
    pub before_ping: Gate,
    /// Milliseconds each `read` takes first, as a slow store's do.
    pub read_delay_ms: AtomicU64,
    /// How many `read` calls reached the store.
    pub reads: AtomicUsize,
    /// The most events one `read` returned.
    pub most_events_read: AtomicUsize,
    /// The most sequences one `read_sequences` asked for.
    pub most_sequences_read: AtomicUsize,
}

/// A point in a store call where, once armed, the next call to reach it waits for the test.
#[derive(Default)]
pub struct Gate(Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>);

impl Gate {
    /// Arms the gate for the next call: returns what fires when a call reaches it, and what lets
    /// that call go on (dropping it does too).
    pub fn arm(&self) -> (Reached, oneshot::Sender<()>) {
        let (reached_tx, reached) = oneshot::channel();
        let (go, go_rx) = oneshot::channel();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((reached_tx, go_rx));
        (Reached(reached), go)
    }

    async fn pass(&self) {
        let armed = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((reached, go)) = armed {
            let _ = reached.send(());
            let _ = go.await;
        }
    }
}

/// Fires when a call reaches an armed [`Gate`].
pub struct Reached(oneshot::Receiver<()>);

impl Reached {
    /// Waits, at most [`WAIT`], for a call to reach the gate; fails naming `what` was awaited.
    pub async fn wait(self, what: &str) {
        match tokio::time::timeout(WAIT, self.0).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                panic!("{what}: the gate was re-armed or dropped before a call reached it")
            }
            Err(_) => panic!("{what}: no call reached the gate within {WAIT:?}"),
        }
    }
}

/// Starts a server (on the backend the tests run on) whose store the returned [`Injection`] controls.
pub async fn start_injected() -> (TestServer, Arc<Injection>) {
    start_injected_with(|_| {}).await
}

/// [`start_injected`], with its configuration adjusted first.
pub async fn start_injected_with(
    adjust: impl FnOnce(&mut nerve::config::Config),
) -> (TestServer, Arc<Injection>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    if redis_backend() {
        use_production_backend(&mut config).await;
    }
    adjust(&mut config);
    let real = nerve::open_backends(&config).await.expect("backends");
    let injection = Arc::new(Injection::default());
    let store: Arc<dyn EventStore> = Arc::new(InjectedStore {
        inner: real.store.clone(),
        injection: injection.clone(),
    });
    let backends = Backends {
        store,
        streams: real.streams,
    };
    (TestServer::start_on(config, backends, dir).await, injection)
}

/// A store that forwards to a real one, with faults a test switches on: it stops answering, as a
/// database that went away does, or it stops in a call at a [`Gate`].
struct InjectedStore {
    inner: Arc<dyn EventStore>,
    injection: Arc<Injection>,
}

impl InjectedStore {
    fn check(&self) -> StoreResult<()> {
        if self.injection.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "connection refused (injected)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl EventStore for InjectedStore {
    async fn queue(&self, tenant: &str, events: Vec<NewEvent>) -> StoreResult<Queued> {
        self.check()?;
        self.injection.before_queue.pass().await;
        self.inner.queue(tenant, events).await
    }
    async fn read(&self, query: &ReadQuery) -> StoreResult<ReadPage> {
        self.check()?;
        self.injection.before_read.pass().await;
        let delay = self.injection.read_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        self.injection.reads.fetch_add(1, Ordering::SeqCst);
        let page = self.inner.read(query).await?;
        self.injection
            .most_events_read
            .fetch_max(page.events.len(), Ordering::SeqCst);
        Ok(page)
    }
    async fn read_sequences(&self, sequences: &[u64]) -> StoreResult<Vec<Arc<StoredEvent>>> {
        self.check()?;
        self.injection
            .most_sequences_read
            .fetch_max(sequences.len(), Ordering::SeqCst);
        if self
            .injection
            .fail_next_read_sequences
            .swap(false, Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable("read failed (injected)".into()));
        }
        self.inner.read_sequences(sequences).await
    }
    async fn read_all(&self, after: u64, limit: usize) -> StoreResult<Vec<Arc<StoredEvent>>> {
        self.check()?;
        self.inner.read_all(after, limit).await
    }
    async fn find(
        &self,
        tenant: &str,
        id: &str,
        source: Option<&str>,
        after: u64,
    ) -> StoreResult<Vec<Arc<StoredEvent>>> {
        self.check()?;
        self.inner.find(tenant, id, source, after).await
    }
    async fn head(&self) -> StoreResult<u64> {
        self.check()?;
        self.injection.before_head.pass().await;
        self.inner.head().await
    }
    async fn sequence_before(&self, time: DateTime<Utc>) -> StoreResult<u64> {
        self.check()?;
        self.inner.sequence_before(time).await
    }
    async fn count_after(
        &self,
        tenant: &str,
        after: [u64; 4],
        selection: &Selection,
    ) -> StoreResult<u64> {
        self.check()?;
        self.inner.count_after(tenant, after, selection).await
    }
    async fn event_types(
        &self,
        tenant: &str,
        after: &str,
        limit: usize,
    ) -> StoreResult<Vec<EventTypeStats>> {
        self.check()?;
        self.inner.event_types(tenant, after, limit).await
    }
    async fn put_dead_letter(&self, dl: &DeadLetter) -> StoreResult<Option<DeadLetter>> {
        self.check()?;
        self.injection.before_put_dead_letter.pass().await;
        if self
            .injection
            .fail_next_put_dead_letter
            .swap(false, Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable(
                "dead letter not recorded (injected)".into(),
            ));
        }
        let replaced = self.inner.put_dead_letter(dl).await?;
        self.injection.after_put_dead_letter.pass().await;
        Ok(replaced)
    }
    async fn restore_dead_letter(
        &self,
        replaced: &DeadLetter,
        recorded_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        self.check()?;
        let restored = self.inner.restore_dead_letter(replaced, recorded_at).await;
        self.injection.after_restore_dead_letter.pass().await;
        restored
    }
    async fn dead_letters(
        &self,
        tenant: &str,
        group: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<DeadLetter>> {
        self.check()?;
        self.inner.dead_letters(tenant, group, after, limit).await
    }
    async fn dead_letter_counts(
        &self,
        tenant: &str,
        groups: &[String],
    ) -> StoreResult<Vec<(String, u64)>> {
        self.check()?;
        self.inner.dead_letter_counts(tenant, groups).await
    }
    async fn remove_dead_letters(
        &self,
        tenant: &str,
        group: &str,
        letters: &[(u64, DateTime<Utc>)],
    ) -> StoreResult<u64> {
        self.check()?;
        self.injection.before_remove_dead_letters.pass().await;
        let removed = self.inner.remove_dead_letters(tenant, group, letters).await;
        self.injection.after_remove_dead_letters.pass().await;
        removed
    }
    async fn insert_publisher(&self, publisher: &Publisher) -> StoreResult<bool> {
        self.check()?;
        self.inner.insert_publisher(publisher).await
    }
    async fn update_publisher(&self, publisher: &Publisher) -> StoreResult<bool> {
        self.check()?;
        self.inner.update_publisher(publisher).await
    }
    async fn remove_publisher(&self, tenant: &str, principal: &str) -> StoreResult<bool> {
        self.check()?;
        self.inner.remove_publisher(tenant, principal).await
    }
    async fn publishers(&self) -> StoreResult<Vec<Publisher>> {
        self.check()?;
        self.inner.publishers().await
    }
    async fn append_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
        self.check()?;
        self.injection.before_append_audit.pass().await;
        self.inner.append_audit(records).await
    }
    async fn audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        self.check()?;
        self.inner.audit(query).await
    }
    async fn prune_audit(
        &self,
        before: DateTime<Utc>,
        after_id: u64,
        max: usize,
    ) -> StoreResult<AuditPruned> {
        self.check()?;
        self.inner.prune_audit(before, after_id, max).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.injection.before_ping.pass().await;
        self.check()?;
        self.inner.ping().await
    }
    fn committed(&self) -> watch::Receiver<u64> {
        self.inner.committed()
    }
}
