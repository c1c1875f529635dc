//! One Subscribe stream: a private stream (catch-up from the store, then the live tail, in sequence order)
//! or a member of a durable group (leases, redelivery, dead letters, priority order).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::{FutureExt, Stream, StreamExt};
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, warn};

use super::{
    Bus, BusError, BusResult, PriorityScheduler,
    history::{HISTORY_READS_PER_TURN, ReadSizer},
    validate_group_name,
};
use crate::{
    event::{Filter, InvalidInput, Priority, Selection, StoredEvent},
    metrics::names,
    store::{DeadLetter, ReadPage, ReadQuery, StoreResult},
    stream::{Claimed, GroupConfig, GroupKey, Interest, TailRead},
};

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    #[default]
    Latest,
    Earliest,
    /// After this sequence: a resume token.
    AfterSequence(u64),
    /// At the first event recorded at or after this time.
    Time(DateTime<Utc>),
}

/// The open message, in domain terms; zero/`None` fields take the server defaults.
#[derive(Debug, Clone, Default)]
pub struct SubscribeSpec {
    pub tenant: String,
    pub selection: Selection,
    pub group: Option<String>,
    pub start: Start,
    pub max_in_flight: Option<u32>,
    pub ack_deadline: Option<Duration>,
    pub max_attempts: Option<u32>,
    pub heartbeat: Option<Duration>,
    /// Whether the caller may read events from before the latest one; when not, a group this open
    /// creates starts at the latest event, whatever `start` says.
    pub may_read_history: bool,
}

/// What the subscriber sends after opening.
#[derive(Debug, Clone)]
pub enum Command {
    Ack(Vec<String>),
    Nack {
        delivery_ids: Vec<String>,
        retry_delay: Duration,
        dead_letter: bool,
        reason: Option<String>,
    },
    Extend {
        delivery_ids: Vec<String>,
        extension: Duration,
    },
    Credit(u32),
    SetFilter(Option<Filter>),
    /// Ends the subscription after what was sent before it; the stream ends with OK.
    Close,
}

/// What the subscriber sends, read by the session both while it waits for work and while it waits
/// for room to send. Only the session reads it, through `&mut`: the wrapper lets the session be
/// shared (`&Session`) across awaits, as a stream of the transport is not `Sync`.
type Commands = sync_wrapper::SyncWrapper<futures::stream::BoxStream<'static, BusResult<Command>>>;

/// Whether a session goes on after a command.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Go,
    Close,
}

/// One handed-out event.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: Arc<StoredEvent>,
    pub delivery_id: String,
    pub attempt: u32,
    /// When it is redelivered unless acked (groups only).
    pub ack_deadline: Option<DateTime<Utc>>,
}

/// What the server sends.
#[derive(Debug, Clone)]
pub enum Outbound {
    Subscribed {
        subscription_id: String,
        group: Option<String>,
        head_sequence: u64,
        /// The heartbeat interval in effect.
        heartbeat: Duration,
        /// The window in effect.
        max_in_flight: u32,
    },
    /// Deliveries in order, handed over at once; each goes out as its own message.
    Deliveries(Vec<Delivery>),
    Heartbeat {
        head_sequence: u64,
        in_flight: u32,
        credits: u32,
    },
    CaughtUp {
        sequence: u64,
    },
}

/// Formats a delivery id: the sequence and the attempt it belongs to.
pub fn delivery_id(sequence: u64, attempt: u32) -> String {
    format!("{sequence}-{attempt}")
}

/// Parses a delivery id. Attempts handed out count from 1: an entry at attempt 0 was never delivered
/// (released unsent, or redriven), and an ack naming it would take it out of the group undelivered.
pub fn parse_delivery_id(id: &str) -> Option<(u64, u32)> {
    let (seq, attempt) = id.split_once('-')?;
    let attempt = attempt.parse().ok().filter(|a| *a > 0)?;
    Some((seq.parse().ok()?, attempt))
}

struct Outstanding {
    attempt: u32,
    deadline: Option<Instant>,
    /// Handed to the response stream; a group delivery claimed but never sent does not count as an
    /// attempt when it is released.
    sent: bool,
}

struct Session {
    bus: Arc<Bus>,
    id: String,
    tenant: String,
    selection: Selection,
    group: Option<GroupKey>,
    /// None once the subscriber half-closed its side.
    commands: Option<Commands>,
    /// A Close came while the session waited for room to send: nothing more is sent, and the
    /// session ends once its current turn unwinds.
    closing: bool,
    /// The group's wakeups (see [`LiveStreams::group_wakeups`]), watched since before the open.
    wakeups: Option<tokio::sync::watch::Receiver<u64>>,
    /// When the group it joined was created: one created again under the name is another group.
    group_created_ns: i64,
    ack_deadline: Duration,
    heartbeat: Duration,
    window_limit: u32,
    credits: u32,
    outstanding: HashMap<u64, Outstanding>,
    deadlines: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    position: u64,
    /// A private stream's start time while events before it may still come: one in the future when
    /// it opened, or a commit in flight then recorded just before it. Recorded times never go
    /// backwards, so it is cleared at the first event recorded at or after it.
    recorded_from: Option<DateTime<Utc>>,
    caught_up: bool,
    scheduler: PriorityScheduler,
    tx: mpsc::Sender<BusResult<Outbound>>,
    last_sent: Instant,
    /// What this session added to the process-wide gauges.
    gauged: Gauged,
    /// The group's metric label ("" for a private stream).
    group_label: String,
    /// Group acks settled here and not yet written to the backend: one write per batch of commands.
    unsaved_acks: Vec<(u64, u32)>,
    /// History pages read while the current one is delivered, in order.
    prefetch: VecDeque<ReadAhead>,
    /// How many events a tail or history read may ask for, by the sizes read so far.
    sizer: ReadSizer,
}

/// A history page being read before the session needs it.
struct ReadAhead {
    /// The page holds the matches after this sequence...
    after: u64,
    /// ...up to this one, at most `limit` of them.
    until: u64,
    limit: usize,
    read: tokio::task::JoinHandle<StoreResult<ReadPage>>,
}

/// Deliveries gathered for one hand-over to the response stream, within [`DELIVERY_RUN`] and
/// [`DELIVERY_RUN_BYTES`].
#[derive(Default)]
struct Run {
    deliveries: Vec<Delivery>,
    bytes: usize,
}

impl Run {
    /// Adds a delivery; returns the runs to hand over: the one it closed, when this delivery would
    /// have taken it past its bytes, and the one this delivery filled.
    fn push(&mut self, delivery: Delivery) -> Vec<Vec<Delivery>> {
        let size = delivery.event.event.size();
        let mut full = Vec::new();
        if self.bytes + size > DELIVERY_RUN_BYTES {
            full.extend(self.finish());
        }
        self.bytes += size;
        self.deliveries.push(delivery);
        if self.deliveries.len() == DELIVERY_RUN || self.bytes >= DELIVERY_RUN_BYTES {
            full.extend(self.finish());
        }
        full
    }

    /// What is left to hand over, if anything.
    fn finish(&mut self) -> Option<Vec<Delivery>> {
        self.bytes = 0;
        (!self.deliveries.is_empty()).then(|| std::mem::take(&mut self.deliveries))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for ahead in self.prefetch.drain(..) {
            ahead.read.abort();
        }
    }
}

/// Most commands handled before the session looks for deliveries again.
const COMMAND_BATCH: usize = 256;
/// Most tail entries read at once by a private stream.
const TAIL_READ: usize = 512;
/// Most deliveries handed to the response stream at once.
const DELIVERY_RUN: usize = 64;
/// Most event bytes in one run, unless one event alone is larger: the response stream holds 32
/// runs, so a subscriber that reads slowly with a wide window pins at most about 32 MiB there (or 32
/// events, where each is larger).
const DELIVERY_RUN_BYTES: usize = 1 << 20;
/// Events per history page a private stream reads from the store.
const HISTORY_PAGE: usize = 1024;
/// History pages a private stream reads ahead when most sequences of its history match it (each
/// within its credits: it never reads more than its window could take).
const DENSE_READ_AHEAD: usize = 2;

impl Bus {
    /// Opens a subscription; the returned channel yields what to send, ending with an error status if any.
    pub async fn subscribe<S>(
        self: &Arc<Self>,
        spec: SubscribeSpec,
        commands: S,
    ) -> BusResult<mpsc::Receiver<BusResult<Outbound>>>
    where
        S: Stream<Item = BusResult<Command>> + Send + 'static,
    {
        let s = &self.settings;
        let max_in_flight = spec.max_in_flight.unwrap_or(s.default_max_in_flight);
        if max_in_flight == 0 || max_in_flight > s.max_in_flight_limit {
            return Err(InvalidInput::field(
                "open.max_in_flight",
                format!("must be between 1 and {}", s.max_in_flight_limit),
            )
            .into());
        }
        let ack_deadline = spec.ack_deadline.unwrap_or(s.default_ack_deadline);
        if !(super::SHORTEST_ACK_DEADLINE..=s.max_ack_deadline).contains(&ack_deadline) {
            return Err(InvalidInput::field(
                "open.ack_deadline",
                format!(
                    "must be between {:?} and {:?}",
                    super::SHORTEST_ACK_DEADLINE,
                    s.max_ack_deadline
                ),
            )
            .into());
        }
        let max_attempts = spec.max_attempts.unwrap_or(s.default_max_attempts);
        if !(1..=super::MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
            return Err(InvalidInput::field(
                "open.max_attempts",
                format!("must be between 1 and {}", super::MAX_ATTEMPTS_LIMIT),
            )
            .into());
        }
        let heartbeat = spec.heartbeat.unwrap_or(s.default_heartbeat);
        if !super::HEARTBEAT_RANGE.contains(&heartbeat) {
            return Err(InvalidInput::field(
                "open.heartbeat_interval",
                format!(
                    "must be between {:?} and {:?}",
                    super::HEARTBEAT_RANGE.start(),
                    super::HEARTBEAT_RANGE.end()
                ),
            )
            .into());
        }
        if let Some(filter) = &spec.selection.filter {
            filter
                .validate(self.limits.max_attribute_bytes)
                .map_err(|(path, reason)| {
                    InvalidInput::field(format!("open.filter{path}"), reason)
                })?;
        }
        // the committed head, not the relay's progress: an acknowledged publish is always "before" this open
        let head = self.store.head().await?;
        let start_after = match spec.start {
            Start::Latest => head,
            Start::Earliest => 0,
            // past the head it would silently skip the events up to it when they come (a position
            // kept from a store since wiped, or from another deployment)
            Start::AfterSequence(s) if s > head => {
                return Err(BusError::OutOfRange(InvalidInput::field(
                    "open.start.after_sequence",
                    format!("{s} is past the last stored sequence, {head}"),
                )));
            }
            Start::AfterSequence(s) => s,
            Start::Time(t) => self.store.sequence_before(t).await?,
        };
        let id = uuid::Uuid::now_v7().simple().to_string();
        let group = match &spec.group {
            Some(name) => {
                validate_group_name(name, "open.group")?;
                let key = GroupKey {
                    tenant: spec.tenant.clone(),
                    name: name.clone(),
                };
                let config = GroupConfig {
                    selection: spec.selection.clone(),
                    max_attempts,
                };
                self.room_for_group(&key).await?;
                // watched before the group is looked up: a delete after that wakes this member, which
                // then finds the group gone or created again (another `created_ns`) and ends
                let wakeups = self.streams.group_wakeups(&key);
                // a caller held to `deny.replay` joins an existing group at its position, and may
                // only create one that starts now
                let created_after = if spec.may_read_history {
                    start_after
                } else {
                    head
                };
                let settings = self
                    .streams
                    .ensure_group(&key, &config, created_after)
                    .await?;
                Some((key, (wakeups, settings.created_ns)))
            }
            None => None,
        };
        let (group, joined) = group.unzip();
        // a group's start is its creator's, resolved once: see docs/design.md
        let recorded_from = match spec.start {
            Start::Time(t) if group.is_none() => Some(t),
            _ => None,
        };
        let (wakeups, group_created_ns) = joined.unzip();
        self.streams
            .join(
                &id,
                group.as_ref(),
                Interest {
                    tenant: spec.tenant.clone(),
                    selection: spec.selection.clone(),
                },
            )
            .await?;
        // deliveries never exceed the window, so this bound only matters for heartbeats and markers
        let (tx, rx) = mpsc::channel(32);
        let session = Session {
            bus: self.clone(),
            id: id.clone(),
            tenant: spec.tenant,
            selection: spec.selection,
            group,
            commands: Some(sync_wrapper::SyncWrapper::new(commands.boxed())),
            closing: false,
            wakeups,
            group_created_ns: group_created_ns.unwrap_or_default(),
            ack_deadline,
            heartbeat,
            window_limit: s.max_in_flight_limit,
            credits: max_in_flight,
            outstanding: HashMap::new(),
            deadlines: BinaryHeap::new(),
            position: start_after,
            recorded_from,
            caught_up: false,
            scheduler: PriorityScheduler::default(),
            unsaved_acks: Vec::new(),
            prefetch: VecDeque::new(),
            sizer: ReadSizer::new(&self.limits),
            tx,
            last_sent: Instant::now(),
            gauged: Gauged::new(if spec.group.is_some() {
                "group"
            } else {
                "private"
            }),
            group_label: crate::metrics::group_label(spec.group.as_deref().unwrap_or_default()),
        };
        let opened = Outbound::Subscribed {
            subscription_id: id,
            group: spec.group,
            head_sequence: head,
            heartbeat,
            max_in_flight,
        };
        tokio::spawn(session.run(opened));
        Ok(rx)
    }
}

/// The subscriber's next command, None at its half-close; never, after it.
async fn next_command(commands: &mut Option<Commands>) -> Option<BusResult<Command>> {
    match commands {
        Some(commands) => commands.get_mut().next().await,
        None => std::future::pending().await,
    }
}

/// A session's share of the process-wide gauges (one subscription of its kind, its credits and
/// deliveries in flight), taken back when it is dropped, however the session ends: a panic included.
struct Gauged {
    kind: &'static str,
    /// Credits and in-flight count last added.
    window: (u32, usize),
}

impl Gauged {
    fn new(kind: &'static str) -> Self {
        ::metrics::gauge!(names::SUBSCRIPTIONS, "kind" => kind).increment(1.0);
        Gauged {
            kind,
            window: (0, 0),
        }
    }

    /// Moves the window gauges to `now` (credits, in flight).
    fn window(&mut self, now: (u32, usize)) {
        ::metrics::gauge!(names::CREDITS).increment(f64::from(now.0) - f64::from(self.window.0));
        ::metrics::gauge!(names::IN_FLIGHT).increment(now.1 as f64 - self.window.1 as f64);
        self.window = now;
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        self.window((0, 0));
        ::metrics::gauge!(names::SUBSCRIPTIONS, "kind" => self.kind).decrement(1.0);
    }
}

impl Session {
    async fn run(mut self, opened: Outbound) {
        let outcome = self.serve(opened).await;
        // acks read before an error or the end still count
        if let Err(error) = self.save_acks().await {
            warn!(subscription = %self.id, %error, "acks not saved; those deliveries will be redelivered");
        }
        self.release_all().await;
        let _ = self.bus.streams.leave(&self.id).await;
        // the session leaves the gauges when it is dropped (`Gauged`), a private stream's unacked
        // deliveries too: they are not released anywhere
        match outcome {
            Ok(()) => debug!(subscription = %self.id, "subscriber cancelled the stream"),
            Err(error) => {
                debug!(subscription = %self.id, %error, "subscription ended");
                let _ = self.tx.send(Err(error)).await;
            }
        }
    }

    async fn serve(&mut self, opened: Outbound) -> BusResult<()> {
        // however the shutdown reached the session (waiting for commands, or for room to send to a
        // subscriber that does not read), what the subscriber had sent by then still counts
        match self.serve_until_end(opened).await {
            Err(BusError::ShuttingDown) => self.shut_down().await,
            outcome => outcome,
        }
    }

    async fn serve_until_end(&mut self, opened: Outbound) -> BusResult<()> {
        self.send(opened).await?;
        // a group consumer wakes when its group can claim more, a private one when the tail grew
        let mut head = match self.group {
            Some(_) => self.bus.streams.group_head(),
            None => self.bus.streams.head(),
        };
        let mut wakeups = self.wakeups.take();
        // after the subscriber half-closes, a private stream's deliveries go on until it cancels the
        // call (as grpcurl does); a group member's stream ends ([`Session::half_closed`])
        loop {
            self.expire_leases();
            let next_due = match self.fill().await {
                Ok(next_due) => next_due,
                // the subscriber went away while something was sent to it
                Err(_) if self.tx.is_closed() => return self.settle_received(usize::MAX).await,
                Err(e) => return Err(e),
            };
            self.report_window();
            self.heartbeat_if_due().await?;
            if self.closing {
                return Ok(());
            }
            let wake_at = self.next_wake(next_due);
            tokio::select! {
                biased;
                _ = self.bus.shutdown.cancelled() => return Err(BusError::ShuttingDown),
                _ = self.tx.closed() => return self.settle_received(usize::MAX).await,
                command = next_command(&mut self.commands) => match command {
                    None => self.half_closed()?,
                    Some(command) => if self.handle_received(command).await? == Flow::Close {
                        return Ok(());
                    },
                },
                changed = head.changed() => if changed.is_err() {
                    return Err(BusError::Unavailable("live stream closed".into()));
                },
                deleted = async {
                    match wakeups.as_mut() {
                        Some(w) => w.changed().await.is_err(),
                        None => std::future::pending().await,
                    }
                } => if deleted {
                    // the backend let go of the group's wakeups (none does while they are watched)
                    let name = self.group.as_ref().map(|g| g.name.clone()).unwrap_or_default();
                    return Err(crate::stream::StreamError::NoSuchGroup(name).into());
                },
                _ = tokio::time::sleep_until(wake_at) => self.heartbeat_if_due().await?,
            }
        }
    }

    /// The subscriber half-closed its side: it can settle nothing from now on. A private stream's
    /// deliveries then stop holding window slots (it has no redelivery, and its window would stay full
    /// after `max_in_flight` events). A group member would take events only to lose them when their
    /// leases expire, each a counted attempt, until healthy events are dead-lettered: its stream ends,
    /// and what it holds goes back to the group.
    fn half_closed(&mut self) -> BusResult<()> {
        self.commands = None;
        if self.group.is_some() {
            return Err(BusError::FailedPrecondition(
                "the request side was half-closed: a group member acks there, so it could settle \
                 nothing more it received; keep it open, or send close to end the subscription"
                    .into(),
            ));
        }
        self.credits += self.outstanding.len() as u32;
        self.outstanding.clear();
        Ok(())
    }

    /// Ends the session for a shutdown. What the subscriber had sent when it came still counts: acks
    /// among it are saved on the way out, so those deliveries do not come back after the restart (a
    /// batch at most: a subscriber still sending must not hold the shutdown).
    async fn shut_down(&mut self) -> BusResult<()> {
        let _ = self.settle_received(COMMAND_BATCH).await;
        Err(BusError::ShuttingDown)
    }

    /// Settles up to `at_most` commands already received (acks, most often), when the subscriber
    /// cancelled or the server shuts down: they arrived ahead of that and still count, instead of
    /// coming back as failed attempts.
    async fn settle_received(&mut self, at_most: usize) -> BusResult<()> {
        for _ in 0..at_most {
            // nothing after a Close counts
            let Some(commands) = self.commands.as_mut().filter(|_| !self.closing) else {
                break;
            };
            let Some(Some(Ok(command))) = commands.get_mut().next().now_or_never() else {
                break;
            };
            if self.handle(command).await? == Flow::Close {
                break;
            }
        }
        Ok(())
    }

    /// Sends a heartbeat when nothing was sent for the interval. Called from the loop's timer, and
    /// also at the top of each turn and between history reads: a head that changes on every publish
    /// wakes the loop before its timer, and a subscriber takes a stream silent for a few intervals
    /// for a dead connection.
    async fn heartbeat_if_due(&mut self) -> BusResult<()> {
        // a gone subscriber is `serve`'s to see: it still settles the commands sent before
        if self.last_sent.elapsed() < self.heartbeat || self.tx.is_closed() {
            return Ok(());
        }
        let head_sequence = *self.bus.streams.head().borrow();
        let sent = self
            .send(Outbound::Heartbeat {
                head_sequence,
                in_flight: self.outstanding.len() as u32,
                credits: self.credits,
            })
            .await;
        match sent {
            // gone while this waited for room: `serve` sees the closed stream and settles
            Err(_) if self.tx.is_closed() => Ok(()),
            other => other,
        }
    }

    fn next_wake(&self, next_due: Option<Instant>) -> Instant {
        let mut wake = self.last_sent + self.heartbeat;
        if let Some(Reverse((deadline, _, _))) = self.deadlines.peek() {
            wake = wake.min(*deadline);
        }
        if let Some(due) = next_due {
            wake = wake.min(due);
        }
        wake
    }

    /// Moves the process-wide credit and in-flight gauges by what changed since the last report.
    fn report_window(&mut self) {
        self.gauged.window((self.credits, self.outstanding.len()));
    }

    /// Handles `first` and what else the subscriber has sent meanwhile (a batch at most), then saves
    /// the acks among them in one backend call.
    async fn handle_received(&mut self, first: BusResult<Command>) -> BusResult<Flow> {
        if self.handle(first?).await? == Flow::Close {
            return Ok(Flow::Close);
        }
        for _ in 0..COMMAND_BATCH {
            let Some(commands) = self.commands.as_mut() else {
                break;
            };
            match commands.get_mut().next().now_or_never() {
                Some(Some(command)) => {
                    if self.handle(command?).await? == Flow::Close {
                        return Ok(Flow::Close);
                    }
                }
                Some(None) => self.half_closed()?,
                None => break,
            }
        }
        self.save_acks().await?;
        Ok(Flow::Go)
    }

    /// Queues a message for the subscriber, unless a Close came before it could be: the stream ends
    /// after what was sent before the Close, so then nothing is sent (see [`Self::deliver_group`]).
    async fn send(&mut self, message: Outbound) -> BusResult<()> {
        if self.closing {
            return Ok(());
        }
        // A place in the queue first: deliveries a gone subscriber never got are not counted as sent.
        // A subscriber that reads slowly keeps settling meanwhile (an extension it sends for a
        // delivery it works on must not wait until it reads again: the lease would run out), and one
        // that does not read must not hold the session past a shutdown.
        while self.tx.capacity() == 0 && !self.tx.is_closed() {
            tokio::select! {
                biased;
                // room (kept: this is the queue's only sender), or the subscriber gone
                _ = self.tx.reserve().map(drop) => {}
                () = self.bus.shutdown.cancelled() => return Err(BusError::ShuttingDown),
                command = next_command(&mut self.commands) => match command {
                    None => self.half_closed()?,
                    Some(command) => if self.handle_received(command).await? == Flow::Close {
                        self.closing = true;
                        return Ok(());
                    },
                },
            }
        }
        let permit = self
            .tx
            .try_reserve()
            .map_err(|_| BusError::FailedPrecondition("subscriber went away".into()))?;
        if let Outbound::Deliveries(all) = &message {
            self.record_deliveries(all);
        }
        permit.send(Ok(message));
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Traces, logs and counts deliveries as they are handed over; metric handles are looked up once per run.
    fn record_deliveries(&self, all: &[Delivery]) {
        let exporting = crate::telemetry::exporting();
        let now = Utc::now();
        let latency =
            ::metrics::histogram!(names::DELIVERY_SECONDS, "group" => self.group_label.clone());
        let mut redelivered = 0;
        // runs are usually of one type: count consecutive deliveries of a type under one label lookup
        let mut counted: Option<(&str, u64)> = None;
        // logs and spans name the group itself: they have no label cap
        let group = self.group.as_ref().map_or("", |g| g.name.as_str());
        for d in all {
            let event = &d.event.event;
            if exporting {
                let span = tracing::info_span!(
                    "nerve.deliver",
                    otel.kind = "producer",
                    r#type = %event.event_type,
                    group = %group,
                    sequence = d.event.sequence,
                    attempt = d.attempt,
                );
                crate::telemetry::continue_trace(&span, event.traceparent.as_deref());
            }
            debug!(subscription = %self.id, r#type = %event.event_type, group = %group, sequence = d.event.sequence, attempt = d.attempt, "delivering");
            match &mut counted {
                Some((t, n)) if *t == event.event_type => *n += 1,
                _ => {
                    if let Some((t, n)) = counted.replace((&event.event_type, 1)) {
                        self.count_delivered(t, n);
                    }
                }
            }
            if d.attempt == 1 {
                // history read to catch up is not latency: its age would swamp the live figures
                if self.caught_up {
                    latency.record((now - d.event.recorded_at).to_std().unwrap_or_default());
                }
            } else {
                redelivered += 1;
            }
        }
        if let Some((t, n)) = counted {
            self.count_delivered(t, n);
        }
        if redelivered > 0 {
            ::metrics::counter!(names::REDELIVERIES, "group" => self.group_label.clone())
                .increment(redelivered);
        }
    }

    fn count_delivered(&self, event_type: &str, n: u64) {
        ::metrics::counter!(names::DELIVERED, "type" => crate::metrics::type_label(event_type), "group" => self.group_label.clone())
            .increment(n);
    }

    /// Returns expired leases to the window: the backend already lets another consumer claim them.
    fn expire_leases(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((deadline, seq, attempt))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let current = self
                .outstanding
                .get(&seq)
                .is_some_and(|o| o.attempt == attempt && o.deadline == Some(deadline));
            if current {
                self.outstanding.remove(&seq);
                self.credits += 1;
                ::metrics::counter!(names::DELIVERY_FAILURES, "group" => self.group_label.clone(), "reason" => "expired")
                    .increment(1);
            }
        }
    }

    /// Sends what the credits allow; returns when group entries next become due, if known.
    async fn fill(&mut self) -> BusResult<Option<Instant>> {
        match self.group.clone() {
            // history left to read: again at once, after the commands
            None => Ok(self.fill_private().await?.then(Instant::now)),
            Some(key) => self.fill_group(&key).await,
        }
    }

    /// Sends what the credits allow from the tail or history; true when it stopped with history left
    /// to read ([`HISTORY_READS_PER_TURN`]).
    async fn fill_private(&mut self) -> BusResult<bool> {
        let mut pages = 0;
        // a selection that matches little reads history for a while without sending: not for a
        // subscriber gone meanwhile (`serve` then sees the closed stream)
        while self.credits > 0 && !self.tx.is_closed() && !self.closing {
            let tail = self
                .bus
                .streams
                .read_after(self.position, TAIL_READ.min(self.sizer.fit()))
                .await?;
            let history_until = match tail {
                TailRead::Events(events) if !events.is_empty() => {
                    self.sizer.observe(&events);
                    let last = events.last().map(|e| e.sequence);
                    if self.deliver_private(events).await?
                        && let Some(last) = last
                    {
                        self.position = self.position.max(last);
                    }
                    continue;
                }
                // the relay may not have appended what is already committed: read that from the store
                TailRead::Events(_) => {
                    // Once caught up, what commits next comes through the tail: the relay feeds it
                    // and waits for nothing else, and its growth wakes this stream. The store (its
                    // head a round trip on Postgres, after every delivery) is read only to catch up.
                    if self.caught_up {
                        return Ok(false);
                    }
                    let committed = self.bus.store.head().await?;
                    if self.position >= committed {
                        self.mark_caught_up().await?;
                        return Ok(false);
                    }
                    committed
                }
                // history the tail no longer holds comes from the store, up to where the tail begins
                TailRead::Trimmed { oldest } => oldest.saturating_sub(1),
            };
            let after = self.position;
            let page = self.history_page(after, history_until).await?;
            // at least half of the sequences read matched: read the next ranges of sequences at once
            let dense = page.events.len() as u64 * 2 >= page.scanned_to.saturating_sub(after);
            let spare = (self.credits as usize).saturating_sub(page.events.len());
            self.read_ahead(&page, history_until, dense, spare);
            // an exhausted page was scanned to the end of its range, or to the committed head
            // where that came first: never past what a later commit could still add
            if self.deliver_private(page.events).await? {
                self.position = self.position.max(page.scanned_to);
            }
            pages += 1;
            if pages == HISTORY_READS_PER_TURN {
                return Ok(true);
            }
            self.heartbeat_if_due().await?;
        }
        Ok(false)
    }

    fn history_query(&self, after: u64, until: u64, limit: usize) -> ReadQuery {
        ReadQuery {
            tenant: self.tenant.clone(),
            after,
            until: Some(until),
            types: self.selection.types.clone(),
            limit,
            ..ReadQuery::default()
        }
    }

    /// Reads the history page after `after`, taking a read-ahead one when it starts there and ends by
    /// `until`.
    async fn history_page(&mut self, after: u64, until: u64) -> BusResult<ReadPage> {
        if let Some(ahead) = self.prefetch.front()
            && ahead.after == after
            && ahead.until <= until
            && let Some(ahead) = self.prefetch.pop_front()
        {
            return match ahead.read.await {
                Ok(page) => {
                    let page = page?;
                    self.sizer.observe_read(&page);
                    Ok(page)
                }
                Err(e) => Err(BusError::Internal(format!("history read failed: {e}"))),
            };
        }
        for stale in self.prefetch.drain(..) {
            stale.read.abort();
        }
        // no more than the window takes (the rest would be read again after the next acks), nor than
        // a page's bytes of events
        let limit = HISTORY_PAGE
            .min(self.credits as usize)
            .min(self.sizer.fit());
        let page = self
            .bus
            .store
            .read(&self.history_query(after, until, limit))
            .await?;
        self.sizer.observe_read(&page);
        Ok(page)
    }

    /// Starts reading the history after `page` while it is delivered, at most `spare` events: the
    /// credits left once `page` is delivered. Committed history never changes, so a page read ahead
    /// is as good as one read later. A dense history is read as ranges of sequences, several at once:
    /// a range holds at most as many events as sequences, so where one ends is known before it is
    /// read. A sparse one is read one page of matches ahead.
    fn read_ahead(&mut self, page: &ReadPage, history_until: u64, dense: bool, spare: usize) {
        let depth = if dense { DENSE_READ_AHEAD } else { 1 };
        let mut budget = spare.saturating_sub(self.prefetch.iter().map(|a| a.limit).sum());
        while self.prefetch.len() < depth && budget > 0 {
            let after = match self.prefetch.back() {
                Some(ahead) => ahead.until,
                None => page.scanned_to,
            };
            if after >= history_until {
                break;
            }
            let limit = HISTORY_PAGE.min(budget).min(self.sizer.fit());
            let to = if dense {
                history_until.min(after + limit as u64)
            } else {
                history_until
            };
            budget -= limit;
            let store = self.bus.store.clone();
            let query = self.history_query(after, to, limit);
            self.prefetch.push_back(ReadAhead {
                after,
                until: to,
                limit,
                read: tokio::spawn(async move { store.read(&query).await }),
            });
        }
    }

    /// Delivers matching events in order while credits last; returns whether all were consumed.
    /// Deliveries go to the response stream in runs ([`Run`]): one hand-over (and wake-up) per run
    /// instead of per event.
    async fn deliver_private(&mut self, events: Vec<Arc<StoredEvent>>) -> BusResult<bool> {
        let mut run = Run::default();
        let mut consumed = true;
        for event in events {
            if event.sequence <= self.position {
                continue;
            }
            if let Some(from) = self.recorded_from {
                if event.recorded_at < from {
                    continue;
                }
                self.recorded_from = None;
            }
            if event.tenant == self.tenant && self.selection.matches(&event.event) {
                if self.credits == 0 {
                    consumed = false;
                    break;
                }
                // half-closed, the subscriber can free no slot: a delivery holds none
                if self.commands.is_some() {
                    self.credits -= 1;
                    self.outstanding.insert(
                        event.sequence,
                        Outstanding {
                            attempt: 1,
                            deadline: None,
                            sent: true,
                        },
                    );
                }
                self.position = event.sequence;
                let full = run.push(Delivery {
                    delivery_id: delivery_id(event.sequence, 1),
                    attempt: 1,
                    ack_deadline: None,
                    event,
                });
                for full in full {
                    self.send(Outbound::Deliveries(full)).await?;
                }
            } else {
                self.position = event.sequence;
            }
        }
        if let Some(rest) = run.finish() {
            self.send(Outbound::Deliveries(rest)).await?;
        }
        Ok(consumed)
    }

    /// The highest sequence groups can claim (what the relay has brought them).
    fn claimable(&self) -> u64 {
        *self.bus.streams.group_head().borrow()
    }

    async fn mark_caught_up(&mut self) -> BusResult<()> {
        if !self.caught_up {
            self.caught_up = true;
            // A private stream has delivered every match up to its position and no further: the tail
            // may already hold later events, which follow the marker, so a client resuming after the
            // marker's sequence must not skip them. A group member has no position of its own.
            let sequence = if self.group.is_some() {
                *self.bus.streams.head().borrow()
            } else {
                self.position
            };
            self.send(Outbound::CaughtUp { sequence }).await?;
        }
        Ok(())
    }

    /// How many entries the next group claim may take: what the credits allow, within a page's bytes
    /// of the events claimed last (Redis claims carry their events).
    fn claim_budget(&self) -> u32 {
        self.credits
            .min(u32::try_from(self.sizer.fit()).unwrap_or(u32::MAX))
    }

    async fn fill_group(&mut self, key: &GroupKey) -> BusResult<Option<Instant>> {
        let streams = self.bus.streams.clone();
        // the group's, which the latest open set: every member gives up after the same attempts
        let settings = streams.group_settings(key).await?;
        if settings.created_ns != self.group_created_ns {
            // deleted and created again (a replica hears of deletes late): not this member's group
            return Err(crate::stream::StreamError::NoSuchGroup(key.name.clone()).into());
        }
        let max_attempts = settings.max_attempts;
        // What is due again goes first, a claim's budget at a time, before anything new. A claim
        // that delivered nothing (its entries were dead-lettered) ends the run of claims: the next
        // fill goes on after the session's commands.
        while self.credits > 0 && !self.tx.is_closed() && !self.closing {
            let budget = self.claim_budget() as usize;
            let lease = Utc::now() + self.ack_deadline;
            let due = streams.claim_due(key, &self.id, budget, lease).await?;
            let more = due.len() == budget;
            let due = self.events_or_release(key, due).await?;
            self.sizer.observe(due.iter().map(|(_, event)| event));
            let sent = self.deliver_group(key, due, lease, max_attempts).await?;
            if !more || sent == 0 {
                break;
            }
        }
        let mut backlogged = [true; 4];
        // a claim stopped reading before the head (a selection that matches little of a long
        // backlog): the session goes on with it after its other work, not at the next commit
        let mut scanning = false;
        while self.credits > 0 && backlogged.iter().any(|b| *b) && !self.closing {
            let share = self.scheduler.allocate(self.claim_budget(), backlogged);
            for (index, level) in Priority::ALL.into_iter().enumerate() {
                if share[index] == 0 || self.closing {
                    continue;
                }
                let lease = Utc::now() + self.ack_deadline;
                let claim = streams
                    .claim_new(key, &self.id, level, share[index] as usize, lease)
                    .await?;
                self.sizer.observe_claim(&claim);
                if claim.entries.len() < share[index] as usize {
                    backlogged[index] = false;
                    if claim.more {
                        scanning = true;
                    } else {
                        self.scheduler.drained(index);
                    }
                }
                let claimed = self.events_or_release(key, claim.entries).await?;
                self.deliver_group(key, claimed, lease, max_attempts)
                    .await?;
            }
        }
        // caught up once every level's claim came back short of its share in this fill (what it
        // delivered included) and the relay has brought the group everything already committed
        if !self.caught_up
            && !scanning
            && !backlogged.iter().any(|b| *b)
            && self.claimable() >= self.bus.store.head().await?
        {
            self.mark_caught_up().await?;
        }
        // with no credits nothing due can be claimed: waking for it would spin until an ack
        if self.credits == 0 {
            return Ok(None);
        }
        if scanning {
            return Ok(Some(Instant::now()));
        }
        let next_due = streams.next_due(key).await?;
        Ok(next_due.map(|due| {
            let wait = (due - Utc::now()).to_std().unwrap_or_default();
            Instant::now() + wait
        }))
    }

    /// [`Session::with_events`]; when the events cannot be read, the claims go back at once and
    /// uncounted (nobody saw them) instead of waiting out their lease, and the error ends the session.
    async fn events_or_release(
        &self,
        key: &GroupKey,
        claimed: Vec<Claimed>,
    ) -> BusResult<Vec<(Claimed, Arc<StoredEvent>)>> {
        let deliveries: Vec<(u64, u32)> = claimed.iter().map(|c| (c.sequence, c.attempt)).collect();
        let read = self.with_events(key, claimed).await;
        if read.is_err() {
            self.hand_back_unsent(key, &deliveries).await;
        }
        read
    }

    /// Claims a failure left unsent go back at once, uncounted, and the group is woken for them.
    async fn hand_back_unsent(&self, key: &GroupKey, deliveries: &[(u64, u32)]) {
        if self.release_unsent(key, deliveries).await {
            let _ = self.bus.streams.wake_group(key).await;
        }
    }

    /// Hands back deliveries nobody was sent, uncounted ([`LiveStreams::release_unsent`]); false
    /// (and a warning) when the backend failed, and their leases will expire instead.
    async fn release_unsent(&self, key: &GroupKey, deliveries: &[(u64, u32)]) -> bool {
        match self.bus.streams.release_unsent(key, deliveries).await {
            Ok(_) => true,
            Err(error) => {
                warn!(%error, group = %key.name, deliveries = deliveries.len(), "release of deliveries never sent failed; their leases will expire instead (counting an attempt)");
                false
            }
        }
    }

    /// Pairs claims with their events, reading from the store what the stream no longer holds.
    async fn with_events(
        &self,
        key: &GroupKey,
        claimed: Vec<Claimed>,
    ) -> BusResult<Vec<(Claimed, Arc<StoredEvent>)>> {
        let missing: Vec<u64> = claimed
            .iter()
            .filter(|c| c.event.is_none())
            .map(|c| c.sequence)
            .collect();
        let mut from_store: HashMap<u64, Arc<StoredEvent>> = self
            .bus
            .store
            .read_sequences(&missing)
            .await?
            .into_iter()
            .map(|e| (e.sequence, e))
            .collect();
        let mut out = Vec::with_capacity(claimed.len());
        for mut c in claimed {
            let event = c.event.take().or_else(|| from_store.remove(&c.sequence));
            match event {
                Some(event) => out.push((c, event)),
                None => {
                    warn!(group = %key.name, sequence = c.sequence, "pending entry has no stored event; dropping it");
                    self.bus
                        .streams
                        .ack(key, &[(c.sequence, c.attempt)])
                        .await?;
                }
            }
        }
        Ok(out)
    }

    /// Hands claimed entries to the subscriber in runs, dead-lettering those past `max_attempts`;
    /// returns how many it delivered.
    async fn deliver_group(
        &mut self,
        key: &GroupKey,
        claimed: Vec<(Claimed, Arc<StoredEvent>)>,
        lease: DateTime<Utc>,
        max_attempts: u32,
    ) -> BusResult<usize> {
        let deadline = Instant::now() + self.ack_deadline;
        let mut delivered = 0;
        // every entry is outstanding before the first run is sent: if the subscriber goes away
        // meanwhile, the session's end releases the unsent ones with the rest, instead of leaving them
        // leased, to nobody, until the lease ends (and without counting the attempt nobody saw)
        let mut runs = Vec::new();
        let mut run = Run::default();
        let mut claimed = claimed.into_iter();
        while let Some((entry, event)) = claimed.next() {
            if entry.attempt > max_attempts {
                if let Err(error) = self.dead_letter(key, &entry, entry.attempt - 1, None).await {
                    // this entry and the rest are leased to this member and were never sent
                    let left: Vec<(u64, u32)> = std::iter::once(&entry)
                        .chain(claimed.as_slice().iter().map(|(c, _)| c))
                        .map(|c| (c.sequence, c.attempt))
                        .collect();
                    self.hand_back_unsent(key, &left).await;
                    return Err(error);
                }
                continue;
            }
            self.credits = self.credits.saturating_sub(1);
            let replaced = self.outstanding.insert(
                entry.sequence,
                Outstanding {
                    attempt: entry.attempt,
                    deadline: Some(deadline),
                    sent: false,
                },
            );
            // this member's own earlier attempt, claimed again as its lease ran out just before the
            // session's deadline: one entry holds one slot, so the earlier one's comes back
            if replaced.is_some() {
                self.credits += 1;
            }
            self.track_deadline(deadline, entry.sequence, entry.attempt);
            delivered += 1;
            runs.extend(run.push(Delivery {
                delivery_id: delivery_id(entry.sequence, entry.attempt),
                attempt: entry.attempt,
                ack_deadline: Some(lease),
                event,
            }));
        }
        runs.extend(run.finish());
        for run in runs {
            let sequences: Vec<u64> = run.iter().map(|d| d.event.sequence).collect();
            self.send(Outbound::Deliveries(run)).await?;
            // a Close came first: this run and the rest were not sent, and go back uncounted
            if self.closing {
                break;
            }
            for seq in sequences {
                if let Some(o) = self.outstanding.get_mut(&seq) {
                    o.sent = true;
                }
            }
        }
        Ok(delivered)
    }

    /// Records a dead letter, then takes the entry out of the group if it is still at this attempt.
    /// The letter comes first: a crash in between leaves it both pending and dead-lettered, never
    /// neither. It replaces any letter of the event, so a redrive that listed an older one removes
    /// that one only. An entry that moved on meanwhile (its lease ran out and another member holds
    /// the next attempt, or it was settled) keeps going, and what this letter replaced is put back
    /// (the letter of a member that dead-lettered a later attempt and took the entry out), or the
    /// letter is removed if it replaced none. Returns whether the entry was still at this attempt.
    async fn dead_letter(
        &self,
        key: &GroupKey,
        claimed: &Claimed,
        attempts: u32,
        reason: Option<String>,
    ) -> BusResult<bool> {
        let reason = reason.unwrap_or_else(|| match &claimed.last_error {
            Some(e) => format!("gave up after {attempts} attempts; last error: {e}"),
            None => format!("gave up after {attempts} attempts without an ack"),
        });
        let letter = DeadLetter {
            tenant: key.tenant.clone(),
            group: key.name.clone(),
            sequence: claimed.sequence,
            attempts,
            reason,
            dead_lettered_at: Utc::now(),
        };
        let replaced = self.bus.store.put_dead_letter(&letter).await?;
        let removed = self
            .bus
            .streams
            .ack(key, &[(claimed.sequence, claimed.attempt)])
            .await?;
        let removed = removed.first().copied().unwrap_or(false);
        if removed {
            ::metrics::counter!(names::DEAD_LETTERS, "group" => self.group_label.clone())
                .increment(1);
        } else if let Some(replaced) = replaced {
            self.bus
                .store
                .restore_dead_letter(&replaced, letter.dead_lettered_at)
                .await?;
        } else {
            self.bus
                .store
                .remove_dead_letters(
                    &key.tenant,
                    &key.name,
                    &[(letter.sequence, letter.dead_lettered_at)],
                )
                .await?;
        }
        Ok(removed)
    }

    fn parse_ids(&self, ids: &[String], field: &str) -> BusResult<Vec<(u64, u32)>> {
        let mut parsed = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                parse_delivery_id(id).ok_or_else(|| {
                    InvalidInput::field(
                        format!("{field}.delivery_ids[{i}]"),
                        format!("{id:?} is not a delivery id this server handed out"),
                    )
                    .into()
                })
            })
            .collect::<BusResult<Vec<_>>>()?;
        // one backend change per delivery, however often it was named
        parsed.sort_unstable();
        parsed.dedup();
        self.check_id_count(parsed.len(), field)?;
        Ok(parsed)
    }

    /// Refuses a command naming more deliveries (each counted once) than a stream may hold: each
    /// is a change made under the store's writer lock, and one message could name hundreds of
    /// thousands.
    fn check_id_count(&self, deliveries: usize, field: &str) -> BusResult<()> {
        if deliveries > self.window_limit as usize {
            return Err(InvalidInput::field(
                format!("{field}.delivery_ids"),
                format!(
                    "names {deliveries} deliveries, more than a stream may hold ({})",
                    self.window_limit
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Keeps a lease's deadline for [`Self::expire_leases`]. Settled deliveries leave their entries
    /// until those come due; past twice the outstanding deliveries, the heap keeps only current
    /// ones, so it stays within the window however long the deadlines.
    fn track_deadline(&mut self, deadline: Instant, seq: u64, attempt: u32) {
        self.deadlines.push(Reverse((deadline, seq, attempt)));
        if self.deadlines.len() > 2 * self.outstanding.len() + 64 {
            let outstanding = &self.outstanding;
            self.deadlines.retain(|Reverse((deadline, seq, attempt))| {
                outstanding
                    .get(seq)
                    .is_some_and(|o| o.attempt == *attempt && o.deadline == Some(*deadline))
            });
        }
    }

    /// Counts acks and nacks of deliveries no longer outstanding: redelivered, or settled already.
    fn count_stale(&self, settlements: usize) {
        if settlements > 0 {
            ::metrics::counter!(names::STALE_SETTLEMENTS, "group" => self.group_label.clone())
                .increment(settlements as u64);
        }
    }

    /// Forgets an outstanding delivery and returns its credit; false when it was not outstanding.
    fn settle(&mut self, seq: u64, attempt: u32) -> bool {
        match self.outstanding.get(&seq) {
            Some(o) if o.attempt == attempt => {
                self.outstanding.remove(&seq);
                self.credits += 1;
                true
            }
            _ => false,
        }
    }

    /// Writes the acks gathered since the last write, in one backend call.
    async fn save_acks(&mut self) -> BusResult<()> {
        let Some(key) = &self.group else {
            return Ok(());
        };
        if self.unsaved_acks.is_empty() {
            return Ok(());
        }
        let mut ids = std::mem::take(&mut self.unsaved_acks);
        // an id acked again in a later command is one ack, not a stale second one
        ids.sort_unstable();
        ids.dedup();
        let acked = match self.bus.streams.ack(key, &ids).await {
            Ok(acked) => acked,
            Err(error) => {
                // kept for the session's last try on the way out, which warns if that fails too
                self.unsaved_acks = ids;
                return Err(error.into());
            }
        };
        self.count_stale(acked.iter().filter(|a| !**a).count());
        Ok(())
    }

    async fn handle(&mut self, command: Command) -> BusResult<Flow> {
        if !matches!(command, Command::Ack(_)) {
            // acks stay ordered before whatever the subscriber sent after them
            self.save_acks().await?;
        }
        match command {
            // the acks before it are saved above; `run` releases the rest as at any end
            Command::Close => return Ok(Flow::Close),
            Command::Ack(ids) => {
                // the ids that parse are settled even beside one that does not: its error ends the
                // stream, and deliveries already processed must not come back as attempts
                let mut valid: Vec<(u64, u32)> =
                    ids.iter().filter_map(|id| parse_delivery_id(id)).collect();
                let parsed = valid.len();
                valid.sort_unstable();
                valid.dedup();
                self.check_id_count(valid.len(), "ack")?;
                for (seq, attempt) in &valid {
                    self.settle(*seq, *attempt);
                }
                let refused = parsed < ids.len();
                if self.group.is_some() {
                    self.unsaved_acks.extend(valid);
                    // a batch of commands is saved in one call, but not one of more settlements
                    // than a stream may hold (`check_id_count`'s reason): many messages of many
                    // ids each would make it one long hold of the store's writer, or of Redis
                    if self.unsaved_acks.len() >= self.window_limit as usize {
                        self.save_acks().await?;
                    }
                }
                if refused {
                    self.parse_ids(&ids, "ack")?;
                }
            }
            Command::Nack {
                delivery_ids,
                retry_delay,
                dead_letter,
                reason,
            } => {
                let ids = self.parse_ids(&delivery_ids, "nack")?;
                // cut, not refused: a refusal would end the stream and cost every delivery in
                // flight an attempt, for a backoff a consumer computed
                let retry_delay = retry_delay.min(self.bus.settings.max_ack_deadline);
                let Some(key) = self.group.clone() else {
                    for (seq, attempt) in ids {
                        self.settle(seq, attempt);
                    }
                    return Ok(Flow::Go);
                };
                // one backend call for every delivery to retry later; whether each was outstanding
                // here (one whose lease ran out was counted as expired already)
                let mut retries = Vec::new();
                let mut outstanding = Vec::new();
                for (seq, attempt) in ids {
                    let was_outstanding = self.settle(seq, attempt);
                    if dead_letter {
                        if !was_outstanding {
                            self.count_stale(1);
                            continue;
                        }
                        let claimed = Claimed {
                            sequence: seq,
                            attempt,
                            event: None,
                            priority: Priority::Normal,
                            last_error: None,
                        };
                        let reason = reason
                            .clone()
                            .unwrap_or_else(|| "dead-lettered by the subscriber".into());
                        if !self
                            .dead_letter(&key, &claimed, attempt, Some(reason))
                            .await?
                        {
                            self.count_stale(1);
                        }
                    } else {
                        retries.push((seq, attempt));
                        outstanding.push(was_outstanding);
                    }
                }
                if !retries.is_empty() {
                    let moved = self
                        .bus
                        .streams
                        .set_visible_at(&key, &retries, Utc::now() + retry_delay, reason.as_deref())
                        .await?;
                    // a failure is a delivery this nack moved; one it could not move is stale
                    let failed = moved.iter().zip(&outstanding).filter(|(m, o)| **m && **o);
                    ::metrics::counter!(names::DELIVERY_FAILURES, "group" => self.group_label.clone(), "reason" => "nack")
                        .increment(failed.count() as u64);
                    self.count_stale(moved.iter().filter(|m| !**m).count());
                }
                self.bus.streams.wake_group(&key).await?;
            }
            Command::Extend {
                delivery_ids,
                extension,
            } => {
                let ids = self.parse_ids(&delivery_ids, "extend")?;
                if extension.is_zero() {
                    return Err(InvalidInput::field("extend.extension", "must be positive").into());
                }
                // cut, not refused, as a nack's delay: the member may extend again
                let extension = extension.min(self.bus.settings.max_ack_deadline);
                let Some(key) = self.group.clone() else {
                    return Ok(Flow::Go);
                };
                let current: Vec<(u64, u32)> = ids
                    .into_iter()
                    .filter(|(seq, attempt)| {
                        self.outstanding
                            .get(seq)
                            .is_some_and(|o| o.attempt == *attempt)
                    })
                    .collect();
                if current.is_empty() {
                    return Ok(Flow::Go);
                }
                let moved = self
                    .bus
                    .streams
                    .set_visible_at(&key, &current, Utc::now() + extension, None)
                    .await?;
                let deadline = Instant::now() + extension;
                for ((seq, attempt), moved) in current.into_iter().zip(moved) {
                    if let (true, Some(o)) = (moved, self.outstanding.get_mut(&seq)) {
                        o.deadline = Some(deadline);
                        self.track_deadline(deadline, seq, attempt);
                    }
                }
            }
            Command::Credit(n) => {
                let window = self.credits as u64 + self.outstanding.len() as u64 + n as u64;
                if window > self.window_limit as u64 {
                    return Err(InvalidInput::field(
                        "credit.credits",
                        format!(
                            "would open the window to {window}, above the limit of {}",
                            self.window_limit
                        ),
                    )
                    .into());
                }
                self.credits += n;
            }
            Command::SetFilter(filter) => {
                if let Some(f) = &filter {
                    f.validate(self.bus.limits.max_attribute_bytes)
                        .map_err(|(path, reason)| {
                            InvalidInput::field(format!("set_filter.filter{path}"), reason)
                        })?;
                }
                self.selection.filter = filter;
                if let Some(key) = &self.group {
                    self.bus
                        .streams
                        .set_group_selection(key, self.group_created_ns, &self.selection)
                        .await?;
                }
                self.bus
                    .streams
                    .update_interest(
                        &self.id,
                        Interest {
                            tenant: self.tenant.clone(),
                            selection: self.selection.clone(),
                        },
                    )
                    .await?;
            }
        }
        Ok(Flow::Go)
    }

    /// Hands every outstanding group delivery back at once: one sent that the stream ended without
    /// acking counts as an attempt; one claimed but never sent does not.
    async fn release_all(&mut self) {
        let Some(key) = self.group.clone() else {
            return;
        };
        let (mut sent, mut unsent) = (Vec::new(), Vec::new());
        for (seq, o) in self.outstanding.drain() {
            if o.sent { &mut sent } else { &mut unsent }.push((seq, o.attempt));
        }
        ::metrics::counter!(names::DELIVERY_FAILURES, "group" => self.group_label.clone(), "reason" => "released")
            .increment(sent.len() as u64);
        let mut released = false;
        // one backend call for each kind, however large the window
        if !sent.is_empty() {
            match self
                .bus
                .streams
                .set_visible_at(
                    &key,
                    &sent,
                    Utc::now(),
                    Some("subscriber stream ended before ack"),
                )
                .await
            {
                Ok(_) => released = true,
                Err(error) => {
                    warn!(%error, group = %key.name, deliveries = sent.len(), "release failed; the leases will expire instead")
                }
            }
        }
        if !unsent.is_empty() && self.release_unsent(&key, &unsent).await {
            released = true;
        }
        if released {
            let _ = self.bus.streams.wake_group(&key).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::test_support::{embedded_bus, group_g_spec, job, join_g};

    fn delivery(data_bytes: usize) -> Delivery {
        Delivery {
            event: Arc::new(StoredEvent {
                tenant: "t".into(),
                sequence: 1,
                recorded_at: DateTime::UNIX_EPOCH,
                event: crate::event::Event {
                    data: crate::event::Data::Binary(vec![0; data_bytes]),
                    ..Default::default()
                },
            }),
            delivery_id: String::new(),
            attempt: 1,
            ack_deadline: None,
        }
    }

    /// Hands `sizes` to a run and returns the lengths of the runs handed over, the rest last.
    fn runs(sizes: &[usize]) -> Vec<usize> {
        let mut run = Run::default();
        let mut lengths: Vec<usize> = sizes
            .iter()
            .flat_map(|size| run.push(delivery(*size)))
            .map(|full| full.len())
            .collect();
        lengths.extend(run.finish().map(|rest| rest.len()));
        lengths
    }

    /// A member of group "g" of type "job" on a fresh embedded store, with `heartbeat`, holding the
    /// delivery of the one event published: the shutdown token, the store's streams, the command
    /// sender, the session's queue and the delivery.
    struct HeldDelivery {
        shutdown: tokio_util::sync::CancellationToken,
        streams: Arc<crate::stream::EmbeddedStreams>,
        send: futures::channel::mpsc::UnboundedSender<BusResult<Command>>,
        out: mpsc::Receiver<BusResult<Outbound>>,
        delivery: Delivery,
        _dir: tempfile::TempDir,
    }

    impl HeldDelivery {
        async fn start(heartbeat: Option<Duration>) -> Self {
            let (bus, shutdown, streams, dir) = embedded_bus().await;
            let (send, mut out) = join_g(&bus, None, heartbeat).await;
            bus.publish("t", vec![job("j1", 0)], None)
                .await
                .expect("publish");
            let delivery = loop {
                match out.recv().await.expect("open").expect("no error") {
                    Outbound::Deliveries(mut run) => break run.remove(0),
                    _ => continue,
                }
            };
            HeldDelivery {
                shutdown,
                streams,
                send,
                out,
                delivery,
                _dir: dir,
            }
        }

        fn ack(&self) {
            self.send
                .unbounded_send(Ok(Command::Ack(vec![self.delivery.delivery_id.clone()])))
                .expect("send");
        }

        /// Reads the session to its end, which must be the shutdown's, and asserts the ack was saved.
        async fn assert_saved_after_the_shutdown(mut self) {
            use crate::stream::LiveStreams as _;
            while let Some(message) = self.out.recv().await {
                if let Err(e) = message {
                    assert!(matches!(e, BusError::ShuttingDown), "{e:?}");
                }
            }
            let stats = self
                .streams
                .groups("t", &["g".to_owned()])
                .await
                .expect("groups");
            assert_eq!(stats[0].pending, 0, "the ack was saved");
        }
    }

    /// A group that an open without leave to read history creates starts at the latest event,
    /// whatever the open's start: such an open skips the `deny.replay` check for a group that
    /// exists, and the group may be deleted before the bus opens it.
    #[tokio::test]
    async fn a_group_an_open_without_history_creates_starts_at_the_latest_event() {
        let (bus, _shutdown, _streams, _dir) = embedded_bus().await;
        bus.publish("t", vec![job("before", 0)], None)
            .await
            .expect("publish");
        let spec = SubscribeSpec {
            may_read_history: false,
            ..group_g_spec(None, None)
        };
        let (_send, received) = futures::channel::mpsc::unbounded();
        let mut out = bus.subscribe(spec, received).await.expect("subscribe");
        bus.publish("t", vec![job("after", 0)], None)
            .await
            .expect("publish");
        let first = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match out.recv().await.expect("open").expect("no error") {
                    Outbound::Deliveries(mut run) => break run.remove(0),
                    _ => continue,
                }
            }
        })
        .await
        .expect("a delivery within 10 s");
        assert_eq!(
            first.event.event.id, "after",
            "the group starts after `before`"
        );
    }

    /// An ack that reached the server with its shutdown, before the session looked, is saved: the
    /// delivery is not handed back (counting an attempt) for another member after the restart.
    #[tokio::test]
    async fn an_ack_that_came_with_the_shutdown_is_saved() {
        let held = HeldDelivery::start(None).await;
        // both before the session runs again (this runtime has one thread): the shutdown, then the ack
        held.shutdown.cancel();
        held.ack();
        held.assert_saved_after_the_shutdown().await;
    }

    /// An ack sent while the session waited for room to send to a subscriber that reads nothing (its
    /// queue full of heartbeats) is saved at the shutdown, as one the session had in hand is.
    #[tokio::test]
    async fn an_ack_sent_while_the_session_waited_for_room_is_saved_at_the_shutdown() {
        let held = HeldDelivery::start(Some(Duration::from_millis(100))).await;
        // read no more: heartbeats fill the queue, and the session waits for room to send the next
        let full = tokio::time::Instant::now() + Duration::from_secs(30);
        while held.out.len() < held.out.max_capacity() {
            assert!(tokio::time::Instant::now() < full, "the queue never filled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // past the next heartbeat's time, so the session waits in its send, not between heartbeats
        // (nothing tells from outside which it is in)
        tokio::time::sleep(Duration::from_millis(300)).await;
        held.ack();
        held.shutdown.cancel();
        held.assert_saved_after_the_shutdown().await;
    }

    /// A Close read while the session waits for room to send ends the stream after what was queued
    /// before it: the runs still waiting are not sent, and go back to the group without counting an
    /// attempt.
    #[tokio::test]
    async fn a_close_read_while_waiting_for_room_sends_nothing_more() {
        use crate::stream::LiveStreams as _;
        const EVENTS: usize = 40;
        let (bus, _shutdown, streams, _dir) = embedded_bus().await;
        // over half of a run's bytes each, so each is a run of its own
        for chunk in 0..EVENTS / 4 {
            let events = (0..4)
                .map(|i| job(&format!("j{chunk}-{i}"), (512 << 10) + 1))
                .collect();
            bus.publish("t", events, None).await.expect("publish");
        }
        let (send, mut out) = join_g(&bus, Some(EVENTS as u32), None).await;
        // nothing read: the queue fills, and the session waits for room to send the next run
        let full = tokio::time::Instant::now() + Duration::from_secs(30);
        while out.len() < out.max_capacity() {
            assert!(tokio::time::Instant::now() < full, "the queue never filled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        send.unbounded_send(Ok(Command::Close)).expect("send");
        // the session ends (and leaves the group) while its queue is still full
        loop {
            let stats = streams
                .groups("t", &["g".to_owned()])
                .await
                .expect("groups");
            if stats[0].consumers == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < full,
                "the session never ended"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut queued = Vec::new();
        while let Some(message) = out.recv().await {
            if let Outbound::Deliveries(run) = message.expect("no error") {
                queued.extend(run.into_iter().map(|d| d.event.sequence));
            }
        }
        // the queue held the confirmation and one run of one event in each other place
        assert_eq!(queued.len(), out.max_capacity() - 1, "sent after the Close");
        let (_next, mut again) = join_g(&bus, Some(EVENTS as u32), None).await;
        let mut attempts = HashMap::new();
        while attempts.len() < EVENTS {
            if let Outbound::Deliveries(run) = again.recv().await.expect("open").expect("no error")
            {
                attempts.extend(run.into_iter().map(|d| (d.event.sequence, d.attempt)));
            }
        }
        for (sequence, attempt) in attempts {
            let expected = if queued.contains(&sequence) { 2 } else { 1 };
            assert_eq!(attempt, expected, "sequence {sequence}");
        }
    }

    #[test]
    fn runs_end_at_their_count_or_their_bytes() {
        assert_eq!(runs(&[100; 130]), [64, 64, 2]);
        // 300 KiB events: a fourth would take a run past 1 MiB
        assert_eq!(runs(&[300 << 10; 10]), [3, 3, 3, 1]);
        // an event larger than a run's bytes goes alone
        assert_eq!(runs(&[10, 2 << 20, 10]), [1, 1, 1]);
        assert_eq!(runs(&[1 << 20, 1 << 20]), [1, 1]);
        assert_eq!(runs(&[]), Vec::<usize>::new());
    }
}
