//! The domain: publish, subscribe (private streams and durable groups), request/reply, replay and admin.
//!
//! Works against the [`EventStore`] and [`LiveStreams`] traits only; knows nothing of gRPC.

mod admin;
mod error;
mod history;
mod replay;
mod request;
mod scheduler;
mod subscription;
#[cfg(test)]
mod test_support;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use chrono::Utc;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::metrics::names;

pub use admin::{GroupSummary, Page, RedriveSelection};
pub use error::{BusError, BusResult};
pub use replay::{ReplayPage, ReplayRequest, decode_resume_token, encode_resume_token};
pub use request::RequestOutcome;
pub use scheduler::{PriorityScheduler, WEIGHTS};
pub use subscription::{
    Command, Delivery, Outbound, Start, SubscribeSpec, delivery_id, parse_delivery_id,
};

use crate::{
    event::{Event, InvalidInput, Limits},
    store::{Appended, EventStore, NewEvent, Queued},
    stream::LiveStreams,
};

/// Tenant of every caller until authentication assigns tenants.
pub const DEFAULT_TENANT: &str = "default";

/// Defaults and bounds of subscriptions and requests.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BusSettings {
    /// Deliveries outstanding per subscriber when the open message does not say.
    pub default_max_in_flight: u32,
    /// Largest window (outstanding + credits) a subscriber may ask for.
    pub max_in_flight_limit: u32,
    /// Ack deadline when the open message does not say.
    #[serde(with = "humantime_serde")]
    pub default_ack_deadline: Duration,
    /// Longest ack deadline or extension accepted.
    #[serde(with = "humantime_serde")]
    pub max_ack_deadline: Duration,
    /// Deliveries of one event before it is dead-lettered, when the open message does not say.
    pub default_max_attempts: u32,
    /// Heartbeat interval when the open message does not say.
    #[serde(with = "humantime_serde")]
    pub default_heartbeat: Duration,
    /// Request timeout when the request does not say.
    #[serde(with = "humantime_serde")]
    pub default_request_timeout: Duration,
    /// Longest request timeout accepted.
    #[serde(with = "humantime_serde")]
    pub max_request_timeout: Duration,
    /// Most durable groups one tenant keeps: an open that would create one more is refused (each
    /// group is kept, with its cursors, until it is deleted, and checked and sampled on every replica).
    pub max_groups_per_tenant: usize,
}

impl Default for BusSettings {
    fn default() -> Self {
        BusSettings {
            default_max_in_flight: 64,
            max_in_flight_limit: 10_000,
            default_ack_deadline: Duration::from_secs(30),
            max_ack_deadline: Duration::from_secs(600),
            default_max_attempts: 5,
            default_heartbeat: Duration::from_secs(10),
            default_request_timeout: Duration::from_secs(30),
            max_request_timeout: Duration::from_secs(300),
            max_groups_per_tenant: 1000,
        }
    }
}

/// Shortest ack deadline a subscriber may ask for.
pub const SHORTEST_ACK_DEADLINE: Duration = Duration::from_millis(10);
/// Heartbeat intervals a subscriber may ask for.
pub const HEARTBEAT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(300);
/// Most deliveries of one event a group may allow before it is dead-lettered.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;
/// Longest `max_ack_deadline` and `max_request_timeout` a server takes: deadlines are timed as
/// instants and Redis expiries, which a far larger bound would overflow.
pub const LONGEST_BOUND: Duration = Duration::from_secs(24 * 60 * 60);

impl BusSettings {
    /// Fails naming the first setting out of bounds: a bound the server cannot time, or a default
    /// its own bound refuses (every call leaving the field unset would fail, naming a field the
    /// caller never set).
    pub fn check(&self) -> Result<(), String> {
        let fail = |setting: &str, bound: String| Err(format!("bus.{setting} must be {bound}"));
        if self.max_in_flight_limit == 0 {
            return fail("max_in_flight_limit", "at least 1".into());
        }
        if !(1..=self.max_in_flight_limit).contains(&self.default_max_in_flight) {
            return fail(
                "default_max_in_flight",
                format!(
                    "between 1 and bus.max_in_flight_limit ({})",
                    self.max_in_flight_limit
                ),
            );
        }
        if !(SHORTEST_ACK_DEADLINE..=LONGEST_BOUND).contains(&self.max_ack_deadline) {
            return fail(
                "max_ack_deadline",
                format!("between {SHORTEST_ACK_DEADLINE:?} and {LONGEST_BOUND:?}"),
            );
        }
        if !(SHORTEST_ACK_DEADLINE..=self.max_ack_deadline).contains(&self.default_ack_deadline) {
            return fail(
                "default_ack_deadline",
                format!(
                    "between {SHORTEST_ACK_DEADLINE:?} and bus.max_ack_deadline ({:?})",
                    self.max_ack_deadline
                ),
            );
        }
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.default_max_attempts) {
            return fail(
                "default_max_attempts",
                format!("between 1 and {MAX_ATTEMPTS_LIMIT}"),
            );
        }
        if !HEARTBEAT_RANGE.contains(&self.default_heartbeat) {
            return fail(
                "default_heartbeat",
                format!(
                    "between {:?} and {:?}",
                    HEARTBEAT_RANGE.start(),
                    HEARTBEAT_RANGE.end()
                ),
            );
        }
        if self.max_request_timeout.is_zero() || self.max_request_timeout > LONGEST_BOUND {
            return fail(
                "max_request_timeout",
                format!("positive and at most {LONGEST_BOUND:?}"),
            );
        }
        if self.default_request_timeout.is_zero()
            || self.default_request_timeout > self.max_request_timeout
        {
            return fail(
                "default_request_timeout",
                format!(
                    "positive and at most bus.max_request_timeout ({:?})",
                    self.max_request_timeout
                ),
            );
        }
        Ok(())
    }
}

/// The event bus.
pub struct Bus {
    store: Arc<dyn EventStore>,
    streams: Arc<dyn LiveStreams>,
    limits: Limits,
    settings: BusSettings,
    shutdown: CancellationToken,
}

impl Bus {
    /// Creates the bus and starts the relay that feeds committed events to the live streams.
    pub fn start(
        store: Arc<dyn EventStore>,
        streams: Arc<dyn LiveStreams>,
        limits: Limits,
        settings: BusSettings,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let bus = Arc::new(Bus {
            store,
            streams,
            limits,
            settings,
            shutdown,
        });
        tokio::spawn(relay(bus.clone()));
        bus
    }

    /// Completes when the server begins to shut down.
    pub async fn shutting_down(&self) {
        self.shutdown.cancelled().await
    }

    /// Returns the size limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Commits a batch of events atomically; returns their sequences in order. `trace` is recorded as
    /// the traceparent of events that carry none (see [`Bus::queue_publish`]).
    pub async fn publish(
        &self,
        tenant: &str,
        events: Vec<Event>,
        trace: Option<String>,
    ) -> BusResult<Vec<Appended>> {
        self.queue_publish(tenant, events, trace)
            .await?
            .committed()
            .await
    }

    /// Checks a batch and queues it for commit after every batch queued before it, so batches queued
    /// one after another get increasing sequences; [`QueuedPublish::committed`] waits for the commit.
    /// `trace` is recorded as the traceparent of events that carry none, after their content is hashed:
    /// it is the call's, and differs between a publish and its retry.
    pub async fn queue_publish(
        &self,
        tenant: &str,
        events: Vec<Event>,
        trace: Option<String>,
    ) -> BusResult<QueuedPublish> {
        let started = std::time::Instant::now();
        // only checked events name their type: a refused one (any string, up to the message limit)
        // must not take one of the capped label values for good
        if let Err(invalid) = self.limits.check_batch(&events) {
            let error = BusError::from(invalid);
            let types = vec![crate::metrics::INVALID_TYPE.to_owned(); events.len()];
            record_publish(started, types, Err(&error));
            return Err(error);
        }
        self.queue_checked(tenant, events, trace, started).await
    }

    /// Publishes one event its caller checked as it was sent, before the server set fields of its
    /// own (a request's inbox and correlation id, a reply's): those do not count against the limits
    /// the caller is held to, as a publish's traceparent and time do not.
    pub(crate) async fn publish_checked(
        &self,
        tenant: &str,
        event: Event,
        trace: Option<String>,
    ) -> BusResult<Vec<Appended>> {
        self.queue_checked(tenant, vec![event], trace, std::time::Instant::now())
            .await?
            .committed()
            .await
    }

    async fn queue_checked(
        &self,
        tenant: &str,
        events: Vec<Event>,
        trace: Option<String>,
        started: std::time::Instant,
    ) -> BusResult<QueuedPublish> {
        let types: Vec<String> = events
            .iter()
            .map(|e| crate::metrics::type_label(&e.event_type))
            .collect();
        match self.queue_commit(tenant, events, trace).await {
            Ok(queued) => Ok(QueuedPublish {
                started,
                types,
                queued,
            }),
            Err(error) => {
                record_publish(started, types, Err(&error));
                Err(error)
            }
        }
    }

    async fn queue_commit(
        &self,
        tenant: &str,
        events: Vec<Event>,
        trace: Option<String>,
    ) -> BusResult<Queued> {
        let now = Utc::now();
        let batch = events
            .into_iter()
            .map(|mut event| {
                // hashed as sent, so a retry that again leaves time or traceparent unset is recognized
                // as the same event
                let content_hash = event.content_hash();
                event.time.get_or_insert(now);
                if event.traceparent.is_none() {
                    event.traceparent.clone_from(&trace);
                }
                NewEvent::new(event, content_hash)
            })
            .collect();
        Ok(self.store.queue(tenant, batch).await?)
    }

    /// Checks both backends at once, each given `within` to answer: one that hangs (Redis killed
    /// mid-reconnect) neither delays nor fails the other's answer.
    pub async fn check_backends(
        &self,
        within: std::time::Duration,
    ) -> (BusResult<()>, BusResult<()>) {
        let late = |backend: &str| {
            BusError::Unavailable(format!("the {backend} did not answer within {within:?}"))
        };
        let store = async {
            match tokio::time::timeout(within, self.store.ping()).await {
                Ok(answer) => answer.map_err(BusError::from),
                Err(_) => Err(late("event store")),
            }
        };
        let streams = async {
            match tokio::time::timeout(within, self.streams.ping()).await {
                Ok(answer) => answer.map_err(BusError::from),
                Err(_) => Err(late("live streams backend")),
            }
        };
        tokio::join!(store, streams)
    }
}

/// A checked batch in the commit queue. Its events are counted when the commit answers, also when
/// the caller went away before that: the batch commits all the same.
pub struct QueuedPublish {
    started: std::time::Instant,
    /// Metric labels of the events' types, in order; taken when they are counted.
    types: Vec<String>,
    queued: Queued,
}

impl QueuedPublish {
    /// Waits for the commit; returns the events' sequences in order.
    pub async fn committed(mut self) -> BusResult<Vec<Appended>> {
        let outcome = self.queued.answer().await.map_err(BusError::from);
        record_publish(
            self.started,
            std::mem::take(&mut self.types),
            outcome.as_ref(),
        );
        outcome
    }
}

impl Drop for QueuedPublish {
    fn drop(&mut self) {
        if self.types.is_empty() {
            return;
        }
        // dropped before the answer (a caller gone, a deadline passed): count the events when the
        // commit answers
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (started, types, queued) = (
            self.started,
            std::mem::take(&mut self.types),
            self.queued.take(),
        );
        runtime.spawn(async move {
            let outcome = queued.committed().await.map_err(BusError::from);
            record_publish(started, types, outcome.as_ref());
        });
    }
}

/// Counts a publish's events by outcome and records its duration.
fn record_publish(
    started: std::time::Instant,
    types: Vec<String>,
    outcome: Result<&Vec<Appended>, &BusError>,
) {
    ::metrics::histogram!(names::PUBLISH_SECONDS).record(started.elapsed());
    match outcome {
        Ok(appended) => {
            for (event_type, a) in types.into_iter().zip(appended) {
                let outcome = if a.duplicate { "duplicate" } else { "stored" };
                ::metrics::counter!(names::PUBLISHED, "type" => event_type, "outcome" => outcome)
                    .increment(1);
            }
        }
        Err(error) => {
            let outcome = match error {
                BusError::Invalid(_) | BusError::AlreadyExists { .. } => "rejected",
                BusError::Unavailable(_) => "unavailable",
                _ => "failed",
            };
            for event_type in types {
                ::metrics::counter!(names::PUBLISHED, "type" => event_type, "outcome" => outcome)
                    .increment(1);
            }
        }
    }
}

/// Samples every group's backlog into gauges until `shutdown` (metrics on). Groups of every tenant are
/// sampled; like the counters, the gauges carry no tenant, so groups that share a label (one name in
/// several tenants, or names folded into "other") add up. A label whose groups are gone drops to 0.
pub async fn sample_groups(bus: Arc<Bus>, interval: Duration, shutdown: CancellationToken) {
    let mut labelled: HashSet<String> = HashSet::new();
    loop {
        match backlog_by_label(&bus).await {
            Ok(backlog) => {
                let current: HashSet<String> = backlog.keys().cloned().collect();
                for gone in labelled.difference(&current) {
                    set_group_gauges(gone, GroupBacklog::default());
                }
                labelled = current;
                for (group, sums) in backlog {
                    set_group_gauges(&group, sums);
                }
            }
            Err(error) => debug!(%error, "group sampling failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Pending, lag and consumers summed over the groups of one label.
#[derive(Debug, Default, Clone, Copy)]
struct GroupBacklog {
    pending: u64,
    lag: u64,
    consumers: u64,
}

async fn backlog_by_label(bus: &Bus) -> BusResult<HashMap<String, GroupBacklog>> {
    let mut backlog: HashMap<String, GroupBacklog> = HashMap::new();
    for tenant in bus.streams.group_tenants().await? {
        let mut after = String::new();
        loop {
            let page = bus.list_groups(&tenant, &after, 1_000, |_| true).await?;
            for g in page.items {
                let sums = backlog
                    .entry(crate::metrics::group_label(&g.stats.key.name))
                    .or_default();
                sums.pending += g.stats.pending;
                sums.lag += g.lag;
                sums.consumers += u64::from(g.stats.consumers);
            }
            match page.next_after {
                Some(next) => after = next,
                None => break,
            }
        }
    }
    Ok(backlog)
}

fn set_group_gauges(group: &str, backlog: GroupBacklog) {
    ::metrics::gauge!(names::GROUP_PENDING, "group" => group.to_owned())
        .set(backlog.pending as f64);
    ::metrics::gauge!(names::GROUP_LAG, "group" => group.to_owned()).set(backlog.lag as f64);
    ::metrics::gauge!(names::GROUP_CONSUMERS, "group" => group.to_owned())
        .set(backlog.consumers as f64);
}

/// Validates a durable group name: it becomes part of keys in the stream backend.
pub fn validate_group_name(name: &str, field: &str) -> Result<(), InvalidInput> {
    let ok = (1..=128).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(InvalidInput::field(
            field,
            "group names are 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit",
        ))
    }
}

/// Feeds every committed event to the live streams, in sequence order, resuming from what the streams hold.
async fn relay(bus: Arc<Bus>) {
    let bus = &bus;
    crate::retry::follow(
        bus.store.committed(),
        "relaying committed events to the live streams",
        bus.shutdown.cancelled(),
        |head| async move { Some(relay_step(bus, head).await) },
    )
    .await;
}

/// Appends the next committed events after what the streams hold, up to 1000; returns whether there were any.
async fn relay_step(bus: &Bus, head: u64) -> BusResult<bool> {
    let last = bus.streams.last_appended().await?;
    if head <= last {
        return Ok(false);
    }
    let events = bus.store.read_all(last, 1000).await?;
    if events.is_empty() {
        return Ok(false);
    }
    bus.streams.append(&events).await?;
    Ok(true)
}

impl Drop for Bus {
    fn drop(&mut self) {
        info!("bus stopped");
    }
}
