//! Prometheus metrics: one process-wide recorder (the `metrics` facade) rendered on `/metrics` of a
//! separate HTTP listener. Label values from input (event types, group names) are capped, the rest fold
//! into "other", so a client cannot grow the series without bound.

use std::{
    collections::HashSet,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Metric names, so the code and the docs use the same spelling.
pub mod names {
    pub const PUBLISHED: &str = "nerve_events_published_total";
    pub const PUBLISH_SECONDS: &str = "nerve_publish_duration_seconds";
    pub const COMMIT_SECONDS: &str = "nerve_store_commit_duration_seconds";
    pub const COMMIT_BATCH: &str = "nerve_store_commit_batch_events";
    pub const DELIVERED: &str = "nerve_events_delivered_total";
    pub const DELIVERY_SECONDS: &str = "nerve_delivery_latency_seconds";
    pub const REDELIVERIES: &str = "nerve_redeliveries_total";
    pub const DELIVERY_FAILURES: &str = "nerve_delivery_failures_total";
    pub const DEAD_LETTERS: &str = "nerve_dead_letters_total";
    pub const SUBSCRIPTIONS: &str = "nerve_subscriptions_active";
    pub const REPLAYS: &str = "nerve_replays_active";
    pub const CREDITS: &str = "nerve_subscription_credits";
    pub const IN_FLIGHT: &str = "nerve_deliveries_in_flight";
    pub const GROUP_PENDING: &str = "nerve_group_pending";
    pub const GROUP_LAG: &str = "nerve_group_lag";
    pub const GROUP_CONSUMERS: &str = "nerve_group_consumers";
    pub const BACKEND_UP: &str = "nerve_backend_up";
    pub const REQUESTS: &str = "nerve_requests_total";
    pub const REPLIES: &str = "nerve_replies_total";
    pub const STALE_SETTLEMENTS: &str = "nerve_stale_settlements_total";
}

/// Metrics settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP listener serving /metrics, e.g. "0.0.0.0:9090"; empty turns metrics off.
    pub listen: String,
    /// Distinct event types and groups given their own label value; the rest are "other".
    pub max_label_values: usize,
    /// How often group backlogs (pending, lag, consumers) are sampled.
    #[serde(with = "humantime_serde")]
    pub group_sample_interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: String::new(),
            max_label_values: 100,
            group_sample_interval: Duration::from_secs(5),
        }
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static TYPES: OnceLock<LabelCap> = OnceLock::new();
static GROUPS: OnceLock<LabelCap> = OnceLock::new();

/// Held while the recorder is installed: a second server starting at the same time in this process
/// (tests) would otherwise find the global recorder set and `HANDLE` not yet, and fail to start.
static INSTALLING: Mutex<()> = Mutex::new(());

/// Installs the process-wide recorder once; later calls return the same handle.
pub fn install(max_label_values: usize) -> Result<PrometheusHandle, String> {
    let _installing = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let latency = [
        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5, 5.0, 10.0,
    ];
    let batch = [
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
    ];
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(names::COMMIT_BATCH.into()), &batch))
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        // another recorder won a race or a test installed one: use whatever HANDLE holds
        return HANDLE
            .get()
            .cloned()
            .ok_or_else(|| "a different metrics recorder is installed".into());
    }
    let _ = TYPES.set(LabelCap::new(max_label_values));
    let _ = GROUPS.set(LabelCap::new(max_label_values));
    describe();
    let folded = handle.clone();
    start_upkeep(UPKEEP_EVERY, move || folded.run_upkeep())?;
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}

/// How often the recorder's histogram samples are folded into their buckets ([`start_upkeep`]).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Starts the thread that runs `upkeep` every `every`, for as long as the process lives, as the
/// recorder does.
///
/// The recorder keeps every histogram sample recorded since the last fold into buckets, and only a
/// scrape or an upkeep folds them: with no scrape, a server at 10K events/s grew by 25 MB a minute
/// more than with metrics off (docs/design.md, "Observability"). A thread, not a task, since the
/// recorder outlives any one runtime (tests start servers on runtimes of their own).
fn start_upkeep(every: Duration, upkeep: impl Fn() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name("nerve-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                upkeep();
            }
        })
        .map(|_| ())
        .map_err(|e| format!("starting the metrics upkeep: {e}"))
}

fn describe() {
    use names::*;
    describe_counter!(
        PUBLISHED,
        "Events published, by type and outcome (stored, duplicate, rejected, unavailable, failed)."
    );
    describe_histogram!(
        PUBLISH_SECONDS,
        Unit::Seconds,
        "Publish calls, from receipt to commit."
    );
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "Group commits of the event store that succeeded, from their start until they are on disk."
    );
    describe_histogram!(
        COMMIT_BATCH,
        Unit::Count,
        "Events per group commit that succeeded."
    );
    describe_counter!(
        DELIVERED,
        "Deliveries to subscribers, by type and group (\"\" for private streams)."
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        Unit::Seconds,
        "From commit to first delivery, by group, once the subscription has caught up."
    );
    describe_counter!(
        REDELIVERIES,
        "Deliveries after the first attempt, by group."
    );
    describe_counter!(
        DELIVERY_FAILURES,
        "Deliveries that failed, by group and reason (nack, expired, released)."
    );
    describe_counter!(DEAD_LETTERS, "Events moved to dead letters, by group.");
    describe_gauge!(
        SUBSCRIPTIONS,
        "Open Subscribe streams, by kind (group, private)."
    );
    describe_gauge!(REPLAYS, "Open Replay streams.");
    describe_gauge!(CREDITS, "Unused delivery credits over all subscriptions.");
    describe_gauge!(
        IN_FLIGHT,
        "Deliveries sent and not yet settled, over all subscriptions."
    );
    describe_gauge!(
        GROUP_PENDING,
        "Deliveries of a group not yet settled (sampled)."
    );
    describe_gauge!(
        GROUP_LAG,
        "Stored events a group has not been handed yet (sampled)."
    );
    describe_gauge!(GROUP_CONSUMERS, "Connected consumers of a group (sampled).");
    describe_gauge!(
        BACKEND_UP,
        "1 while the backend answers health checks, by backend (store, streams)."
    );
    describe_counter!(
        REQUESTS,
        "Request calls, by outcome (answered, no_responders, timeout, failed, cancelled: the call's deadline passed or its caller went away first)."
    );
    describe_counter!(
        REPLIES,
        "Reply calls that passed their checks, by outcome (delivered; not_delivered: stored, but another reply came first or the requester left; late: the request was over, nothing stored)."
    );
    describe_counter!(
        STALE_SETTLEMENTS,
        "Acks and nacks of deliveries no longer outstanding (redelivered after their lease ran out, or settled already), by group."
    );
}

/// Keeps the first `max` distinct values of a label; later ones become "other".
struct LabelCap {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl LabelCap {
    fn new(max: usize) -> Self {
        LabelCap {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    fn label(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        "other".to_owned()
    }
}

/// The type label of events refused before they were stored (invalid or over a limit).
pub const INVALID_TYPE: &str = "invalid";

/// The label value for an event type.
pub fn type_label(event_type: &str) -> String {
    TYPES
        .get()
        .map_or_else(|| "other".to_owned(), |cap| cap.label(event_type))
}

/// The label value for a group ("" for private streams).
pub fn group_label(group: &str) -> String {
    if group.is_empty() {
        return String::new();
    }
    GROUPS
        .get()
        .map_or_else(|| "other".to_owned(), |cap| cap.label(group))
}

/// Serves `GET /metrics` in the Prometheus text format until `shutdown`.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shutdown: CancellationToken) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(error) = served {
        tracing::warn!(%error, "metrics listener stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upkeep_runs_again_and_again() {
        let (ran, runs) = std::sync::mpsc::channel();
        start_upkeep(Duration::from_millis(10), move || {
            let _ = ran.send(());
        })
        .expect("the upkeep starts");
        // not once only: samples keep coming for as long as the server runs
        for _ in 0..3 {
            runs.recv_timeout(Duration::from_secs(10))
                .expect("the upkeep ran");
        }
    }
}
