//! The Nerve scenarios, driven over gRPC against one running server.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use nerve::api::pb::{
    self, admin_client::AdminClient, event_bus_client::EventBusClient,
    publish_stream_response::Outcome as Answer, subscribe_request::Action,
    subscribe_response::Message,
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

use crate::{
    Args, PublishVia,
    latency::Slice,
    procstat::{Meter, Usage, rss_mb},
    report::{Ratio, Row},
    util::{
        Call, Hist, LoadResult, Send1, closed_loop, delivery_rate, event, from_schedule_note,
        load_row, now_ns, open_loop, pacing_note, scheduled_event, stamps_of,
    },
};

/// What every scenario needs: connections to one server, and the settings.
#[derive(Clone)]
pub struct Ctx {
    pub channels: Vec<Channel>,
    pub args: Arc<Args>,
    /// The server process, when this tool started it (CPU and RSS are read from /proc).
    pub pid: Option<u32>,
    /// Backend name for the tables.
    pub system: String,
    /// Unique per run, so ids never collide with an earlier run against the same server.
    pub run: String,
}

impl Ctx {
    /// Connects `--connections` HTTP/2 connections to the server at `addr`, named `system` in the
    /// tables; `pid` is its process, when known.
    pub async fn connect(
        addr: &str,
        args: &Arc<Args>,
        pid: Option<u32>,
        system: String,
        run: &str,
    ) -> Result<Ctx> {
        let mut channels = Vec::new();
        for _ in 0..args.connections.max(1) {
            let channel = Channel::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to nerve at {addr}"))?;
            channels.push(channel);
        }
        Ok(Ctx {
            channels,
            args: args.clone(),
            pid,
            system,
            run: run.to_owned(),
        })
    }

    pub fn bus(&self, i: usize) -> EventBusClient<Channel> {
        EventBusClient::new(self.channels[i % self.channels.len()].clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn buses(&self) -> Arc<Vec<EventBusClient<Channel>>> {
        Arc::new((0..self.channels.len()).map(|i| self.bus(i)).collect())
    }

    fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channels[0].clone())
    }

    fn row(&self, scenario: &str, case: impl Into<String>) -> Row {
        Row::new(scenario, &self.system, case)
    }

    fn filter(&self) -> Option<pb::Filter> {
        self.args.filter.then(|| pb::Filter {
            filter: Some(pb::filter::Filter::Prefix(pb::AttributeValues {
                attributes: [("subject".to_owned(), "bench/".to_owned())].into(),
            })),
        })
    }

    /// Events per publish for bulk loads: up to 1000, under the default 4 MiB batch limit.
    fn bulk_batch(&self) -> usize {
        (3_000_000 / (self.args.payload_size + 200)).clamp(1, 1000)
    }
}

// ---------------------------------------------------------------------------------------------------
// subscribers

/// An open Subscribe stream.
pub struct Sub {
    tx: mpsc::Sender<pb::SubscribeRequest>,
    inbound: Streaming<pb::SubscribeResponse>,
}

impl Sub {
    pub async fn open(mut bus: EventBusClient<Channel>, open: pb::SubscriptionOpen) -> Result<Sub> {
        let (tx, rx) = mpsc::channel(1024);
        tx.send(pb::SubscribeRequest {
            action: Some(Action::Open(open)),
        })
        .await
        .map_err(|_| anyhow!("subscribe request stream closed"))?;
        let mut inbound = bus
            .subscribe(ReceiverStream::new(rx))
            .await
            .context("Subscribe")?
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| anyhow!("no Subscribed answer within 10 s"))??;
        match first.and_then(|m| m.message) {
            Some(Message::Subscribed(_)) => Ok(Sub { tx, inbound }),
            other => bail!("expected Subscribed first, got {other:?}"),
        }
    }

    async fn ack(&self, ids: Vec<String>) -> Result<()> {
        self.tx
            .send(pb::SubscribeRequest {
                action: Some(Action::Ack(pb::Ack { delivery_ids: ids })),
            })
            .await
            .map_err(|_| anyhow!("subscribe request stream closed"))
    }
}

fn open_msg(
    types: &[&str],
    group: &str,
    start: Option<pb::start_position::Position>,
    max_in_flight: u32,
    filter: Option<pb::Filter>,
) -> pb::SubscriptionOpen {
    pb::SubscriptionOpen {
        types: types.iter().map(|t| (*t).to_owned()).collect(),
        group: group.to_owned(),
        filter,
        start: start.map(|p| pb::StartPosition { position: Some(p) }),
        max_in_flight,
        ..pb::SubscriptionOpen::default()
    }
}

/// What a reader saw.
pub struct Outcome {
    /// First deliveries (attempt 1): each event once.
    pub delivered: u64,
    /// Deliveries of a later attempt (a lease that ran out): acked, and neither counted nor timed.
    pub redelivered: u64,
    /// Publish -> deliver latency from the time each send left.
    pub hist: Hist,
    /// Publish -> deliver latency from the time each send was scheduled.
    pub from_schedule: Hist,
    /// When the last delivery was read (nanoseconds since the process epoch; 0 before any).
    pub last_ns: u64,
    pub error: Option<String>,
}

/// Reads deliveries until `stop`, recording publish->deliver latency from each event's stamps (the
/// time its send left, and the time it was scheduled) and acking
/// in batches of `ack_every` (and at least every 2 ms). With `pace`, waits that long after each delivery
/// (a slow consumer).
pub fn spawn_reader(
    mut sub: Sub,
    counter: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    ack_every: usize,
    pace: Option<Duration>,
) -> JoinHandle<Outcome> {
    tokio::spawn(async move {
        let mut out = Outcome {
            delivered: 0,
            redelivered: 0,
            hist: Hist::new(),
            from_schedule: Hist::new(),
            last_ns: 0,
            error: None,
        };
        let mut pending: Vec<String> = Vec::new();
        let mut flush = tokio::time::interval(Duration::from_millis(2));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *stop.borrow() {
                break;
            }
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                message = sub.inbound.message() => match message {
                    Ok(Some(m)) => {
                        if let Some(Message::Delivery(d)) = m.message {
                            let now = now_ns();
                            if d.attempt > 1 {
                                // its first attempt was counted, from the same send stamp
                                out.redelivered += 1;
                            } else {
                                if let Some((stamp, scheduled)) =
                                    d.event.as_ref().and_then(stamps_of)
                                {
                                    out.hist.record_ns(now.saturating_sub(stamp));
                                    out.from_schedule.record_ns(now.saturating_sub(scheduled));
                                } else {
                                    // counted but not timed: the figures would come from the rest
                                    out.error.get_or_insert_with(|| {
                                        "a delivery without the tool's send stamps: its latency is not measured".into()
                                    });
                                }
                                out.last_ns = now;
                                out.delivered += 1;
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            pending.push(d.delivery_id);
                            if let Some(pace) = pace {
                                tokio::time::sleep(pace).await;
                            }
                            if (pending.len() >= ack_every || pace.is_some())
                                && sub.ack(std::mem::take(&mut pending)).await.is_err()
                            {
                                out.error = Some("subscribe request stream closed".into());
                                break;
                            }
                        }
                    }
                    Ok(None) => {
                        out.error = Some("the server ended the stream".into());
                        break;
                    }
                    Err(status) => {
                        out.error = Some(format!("stream failed: {status}"));
                        break;
                    }
                },
                _ = flush.tick() => {
                    if !pending.is_empty() && sub.ack(std::mem::take(&mut pending)).await.is_err() {
                        out.error = Some("subscribe request stream closed".into());
                        break;
                    }
                }
            }
        }
        out
    })
}

/// Waits for the deliveries of an open loop that has just sent its last event; returns whether all
/// arrived and the usage to report. When some never arrive, the usage is the one read as the sending
/// ended: read after the wait, it would spread the run's CPU over up to `timeout` of idling.
async fn wait_deliveries(
    meter: &Meter,
    counter: &AtomicU64,
    target: u64,
    timeout: Duration,
) -> (bool, Usage) {
    let at_send_end = meter.finish();
    if wait_count(counter, target, timeout).await {
        (true, meter.finish())
    } else {
        (false, at_send_end)
    }
}

/// Waits until `counter` reaches `target`; false after `timeout`.
async fn wait_count(counter: &AtomicU64, target: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while counter.load(Ordering::Relaxed) < target {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Publishes one event of `size` bytes of data per request, stamped, round-robin over the
/// connections, as `--publish-via` says.
async fn single_sender(
    ctx: &Ctx,
    event_type: &'static str,
    tag: &str,
    size: usize,
) -> Result<Send1> {
    match ctx.args.publish_via {
        PublishVia::Call => Ok(call_sender(ctx, event_type, tag, size)),
        PublishVia::Stream => stream_sender(ctx, event_type, tag, size).await,
    }
}

/// Events acknowledged as committed by a publish's results: a duplicate of an event already stored
/// wrote nothing.
fn committed(results: &[pb::PublishResult]) -> u64 {
    results.iter().filter(|r| !r.duplicate).count() as u64
}

/// How the open-loop scenarios published, for their rows' notes.
pub fn publish_note(ctx: &Ctx) -> String {
    let via = match ctx.args.publish_via {
        PublishVia::Call => "one Publish call per event",
        PublishVia::Stream => "one event per request on a PublishStream per connection",
    };
    format!("{via}, {}", pacing_note(ctx.args.pacing))
}

/// Publishes one event per request on a PublishStream per connection.
async fn stream_sender(
    ctx: &Ctx,
    event_type: &'static str,
    tag: &str,
    size: usize,
) -> Result<Send1> {
    let mut streams = Vec::new();
    for i in 0..ctx.channels.len() {
        streams.push(PublishStream::open(ctx.bus(i)).await?);
    }
    let prefix = format!("{}-{tag}", ctx.run);
    let ids = ctx.args.ids;
    Ok(Arc::new(move |i, stamp, scheduled| {
        let stream = &streams[(i as usize) % streams.len()];
        let e = scheduled_event(
            ids.name(|| format!("{prefix}-{i}")),
            event_type,
            i,
            size,
            stamp,
            scheduled,
        );
        let answer = stream.send(i, vec![e]);
        Box::pin(async move {
            answer
                .await
                .map_err(|_| anyhow!("the PublishStream ended before answering"))?
        })
    }))
}

/// Waiters of one PublishStream's answers, in the order their requests were sent.
type Waiters = std::collections::VecDeque<(u64, oneshot::Sender<Result<u64>>)>;

/// One PublishStream: requests go out in order and their answers come back in that order.
struct PublishStream {
    /// The stream's sender and the waiters; one lock keeps both in the same order.
    sending: Arc<std::sync::Mutex<(mpsc::UnboundedSender<pb::PublishStreamRequest>, Waiters)>>,
}

impl PublishStream {
    async fn open(mut bus: EventBusClient<Channel>) -> Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut answers = bus
            .publish_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .context("opening a PublishStream")?
            .into_inner();
        let sending = Arc::new(std::sync::Mutex::new((tx, Waiters::new())));
        let waiters = sending.clone();
        tokio::spawn(async move {
            let ended = loop {
                let answer = match answers.message().await {
                    Ok(Some(answer)) => answer,
                    Ok(None) => break anyhow!("the PublishStream ended"),
                    Err(status) => break anyhow!("the PublishStream failed: {status}"),
                };
                let waiter = waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .1
                    .pop_front();
                let Some((request_id, waiter)) = waiter else {
                    break anyhow!("an answer to no request: {}", answer.request_id);
                };
                let outcome = if answer.request_id != request_id {
                    Err(anyhow!(
                        "answer to request {} where {request_id} was next",
                        answer.request_id
                    ))
                } else {
                    match answer.outcome {
                        Some(Answer::Published(p)) => Ok(committed(&p.results)),
                        Some(Answer::Error(e)) => Err(anyhow!("code {}: {}", e.code, e.message)),
                        None => Err(anyhow!("an answer without an outcome")),
                    }
                };
                let _ = waiter.send(outcome);
            };
            // fail whoever still waits
            let mut guard = waiters.lock().unwrap_or_else(|p| p.into_inner());
            for (_, waiter) in guard.1.drain(..) {
                let _ = waiter.send(Err(anyhow!("{ended}")));
            }
        });
        Ok(PublishStream { sending })
    }

    /// Sends one request; the receiver gets its answer.
    fn send(&self, request_id: u64, events: Vec<pb::Event>) -> oneshot::Receiver<Result<u64>> {
        let (done, answer) = oneshot::channel();
        let mut guard = self.sending.lock().unwrap_or_else(|p| p.into_inner());
        let (tx, waiters) = &mut *guard;
        // a closed stream drops `done`, which the caller sees as an error
        if tx
            .send(pb::PublishStreamRequest { request_id, events })
            .is_ok()
        {
            waiters.push_back((request_id, done));
        }
        answer
    }
}

/// Publishes one event per call, stamped, round-robin over the connections.
fn call_sender(ctx: &Ctx, event_type: &'static str, tag: &str, size: usize) -> Send1 {
    let buses = ctx.buses();
    let prefix = format!("{}-{tag}", ctx.run);
    let ids = ctx.args.ids;
    Arc::new(move |i, stamp, scheduled| {
        let mut bus = buses[(i as usize) % buses.len()].clone();
        let e = scheduled_event(
            ids.name(|| format!("{prefix}-{i}")),
            event_type,
            i,
            size,
            stamp,
            scheduled,
        );
        Box::pin(async move {
            let r = bus.publish(pb::PublishRequest { events: vec![e] }).await?;
            Ok(committed(&r.into_inner().results))
        })
    })
}

// ---------------------------------------------------------------------------------------------------
// scenarios

/// Durable publish throughput: closed loop, every batch size x publisher count.
pub async fn publish(ctx: &Ctx, rows: &mut Vec<Row>) -> Result<()> {
    for &batch in &ctx.args.batch_sizes {
        for &publishers in &ctx.args.publishers {
            let buses = ctx.buses();
            let prefix = format!("{}-pub-b{batch}-p{publishers}", ctx.run);
            let size = ctx.args.payload_size;
            let ids = ctx.args.ids;
            let call: Call = Arc::new(move |w, k| {
                let mut bus = buses[w % buses.len()].clone();
                let stamp = now_ns();
                let events = (0..batch)
                    .map(|j| {
                        event(
                            ids.name(|| format!("{prefix}-{w}-{k}-{j}")),
                            "bench.publish.v1",
                            k,
                            size,
                            stamp,
                        )
                    })
                    .collect();
                Box::pin(async move {
                    let r = bus.publish(pb::PublishRequest { events }).await?;
                    Ok(committed(&r.into_inner().results))
                })
            });
            let meter = Meter::start(ctx.pid);
            let r = closed_loop(publishers, ctx.args.duration, call).await;
            let mut row = load_row(
                ctx.row("publish", format!("batch={batch} publishers={publishers}")),
                &r,
                &meter,
            );
            row.note = String::new();
            rows.push(row);
        }
    }
    Ok(())
}

/// One slice of the latency scenario ([`crate::latency`]): an open loop at `rate` for `duration`, one
/// private subscriber from the latest event; `tag` names the events.
pub async fn latency_slice(ctx: &Ctx, rate: u64, tag: &str, duration: Duration) -> Result<Slice> {
    let counter = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let sub = Sub::open(
        ctx.bus(0),
        open_msg(
            &["bench.latency.v1"],
            "",
            Some(pb::start_position::Position::Latest(())),
            5000,
            ctx.filter(),
        ),
    )
    .await?;
    let reader = spawn_reader(sub, counter.clone(), stop, 256, None);
    let meter = Meter::start(ctx.pid);
    let load = open_loop(
        rate as f64,
        duration,
        ctx.args.max_outstanding,
        ctx.args.pacing,
        single_sender(ctx, "bench.latency.v1", tag, ctx.args.payload_size).await?,
    )
    .await;
    let (complete, usage) =
        wait_deliveries(&meter, &counter, load.events, Duration::from_secs(10)).await;
    let _ = stop_tx.send(true);
    let out = reader.await?;
    Ok(Slice {
        load,
        delivered: out.delivered,
        hist: out.hist,
        from_schedule: out.from_schedule,
        last_ns: out.last_ns,
        reader_error: out.error,
        complete,
        usage,
    })
}

/// Fan-out: every event to `groups` durable groups, open loop.
pub async fn fanout(ctx: &Ctx, rows: &mut Vec<Row>) -> Result<()> {
    let groups = ctx.args.groups;
    let rate = ctx.args.fanout_rate;
    let counter = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let mut readers = Vec::new();
    let names: Vec<String> = (0..groups)
        .map(|g| format!("bench-fanout-{}-{g}", ctx.run))
        .collect();
    for (g, name) in names.iter().enumerate() {
        let sub = Sub::open(
            ctx.bus(g),
            open_msg(
                &["bench.fanout.v1"],
                name,
                Some(pb::start_position::Position::Latest(())),
                2000,
                ctx.filter(),
            ),
        )
        .await?;
        readers.push(spawn_reader(sub, counter.clone(), stop.clone(), 128, None));
    }
    let meter = Meter::start(ctx.pid);
    let r = open_loop(
        rate as f64,
        ctx.args.duration,
        ctx.args.max_outstanding,
        ctx.args.pacing,
        single_sender(ctx, "bench.fanout.v1", "fan", ctx.args.payload_size).await?,
    )
    .await;
    let expected = r.events * groups as u64;
    let (complete, usage) =
        wait_deliveries(&meter, &counter, expected, Duration::from_secs(15)).await;
    let _ = stop_tx.send(true);
    let mut hist = Hist::new();
    let mut from_schedule = Hist::new();
    let mut last_ns = 0;
    let mut per_group = Vec::new();
    let mut redelivered = 0;
    let mut errors = Vec::new();
    for reader in readers {
        let out = reader.await?;
        hist.merge(&out.hist);
        from_schedule.merge(&out.from_schedule);
        last_ns = last_ns.max(out.last_ns);
        per_group.push(out.delivered);
        redelivered += out.redelivered;
        errors.extend(out.error);
    }
    // every group must have every event: one group's shortfall is not made up by another's
    if let Some(short) = per_group.iter().position(|&d| d < r.events) {
        errors.push(format!(
            "group {} received {} of the {} events published",
            names[short], per_group[short], r.events
        ));
    }
    let delivered: u64 = per_group.iter().sum();
    let mut row = ctx.row("fanout", format!("groups={groups} rate={rate}/s"));
    row.events = delivered;
    (row.seconds, row.rate) = delivery_rate(delivered, r.first_send_ns, last_ns);
    row.offered_rate = Some((rate * groups as u64) as f64);
    row.planned = Some(r.planned);
    row.sent = Some(r.sent);
    row.latency = hist.summary();
    row.latency_from_schedule = from_schedule.summary();
    row.usage = usage;
    row.errors = r.errors + errors.len() as u64 + u64::from(!complete);
    row.first_error = r.first_error.clone().or(errors.first().cloned());
    row.note = format!(
        "{}: {} events published ({} of {} planned sends), first deliveries per group \
         {per_group:?}, {redelivered} redelivered (not counted); deliveries/s over first send -> \
         last delivery; {}{}",
        publish_note(ctx),
        r.events,
        r.sent,
        r.planned,
        from_schedule_note(row.latency_from_schedule),
        if complete {
            ""
        } else {
            "; not all delivered within 15 s (CPU figures cover the sending)"
        }
    );
    rows.push(row);
    let mut admin = ctx.admin();
    for name in names {
        let _ = admin
            .delete_group(pb::DeleteGroupRequest { group: name })
            .await;
    }
    Ok(())
}

/// A durable group over every type of a bus that stores `--wide-types` of them: one event of each type is
/// stored first, then, for `--duration`, one event at a time is published (to the first three types in
/// turn), its delivery to the group awaited and acknowledged. Each publish wakes the group, whose
/// claims look at every stream its pattern matches: this measures what a group pays per type.
pub async fn wide_group(ctx: &Ctx, rows: &mut Vec<Row>) -> Result<()> {
    let types = ctx.args.wide_types.max(1);
    let group = format!("bench-wide-{}", ctx.run);
    let outcome = wide_group_loop(ctx, types, &group).await;
    // the group goes however the loop ended
    let _ = ctx
        .admin()
        .delete_group(pb::DeleteGroupRequest { group })
        .await;
    let (k, seconds, hist, usage, error) = outcome?;
    let mut row = ctx.row("wide", format!("group over {types} types"));
    row.events = k;
    row.seconds = seconds;
    row.rate = k as f64 / seconds;
    row.latency = hist.summary();
    row.usage = usage;
    if let Some(e) = error {
        row.errors = 1;
        row.first_error = Some(format!("{e:#}"));
    }
    row.note = format!(
        "one event of each of {types} types stored, then a group over bench.wide.> (start latest); \
         after one unmeasured event per type in turn, a closed loop: one event published, its delivery \
         awaited and acked; latency = publish sent -> its delivery read"
    );
    rows.push(row);
    Ok(())
}

/// What [`wide_group`]'s loop measured: events, seconds, latency, usage, and the error that ended it.
type WideOutcome = (
    u64,
    f64,
    Hist,
    crate::procstat::Usage,
    Option<anyhow::Error>,
);

async fn wide_group_loop(ctx: &Ctx, types: usize, group: &str) -> Result<WideOutcome> {
    let type_of = |i: usize| format!("bench.wide.t{i}.v1");
    let size = ctx.args.payload_size;
    let ids = ctx.args.ids;
    let mut bus = ctx.bus(0);
    let names: Vec<String> = (0..types).map(type_of).collect();
    for (c, chunk) in names.chunks(100).enumerate() {
        let events = chunk
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let n = (c * 100 + i) as u64;
                event(
                    ids.name(|| format!("{}-wide-seed-{n}", ctx.run)),
                    t,
                    n,
                    size,
                    now_ns(),
                )
            })
            .collect();
        bus.publish(pb::PublishRequest { events })
            .await
            .context("storing one event of each type")?;
    }
    let mut sub = Sub::open(
        ctx.bus(1),
        open_msg(
            &["bench.wide.>"],
            group,
            Some(pb::start_position::Position::Latest(())),
            16,
            None,
        ),
    )
    .await?;
    // unmeasured: the first claim of each stream may create the group's place in it
    for k in 0..3 {
        wide_one(ctx, &bus, &mut sub, k, types).await?;
    }
    let meter = Meter::start(ctx.pid);
    let started = Instant::now();
    let mut hist = Hist::new();
    let mut k = 0u64;
    let mut error = None;
    while started.elapsed() < ctx.args.duration {
        match wide_one(ctx, &bus, &mut sub, 3 + k, types).await {
            Ok(latency_ns) => hist.record_ns(latency_ns),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
        k += 1;
    }
    let usage = meter.finish();
    Ok((k, started.elapsed().as_secs_f64(), hist, usage, error))
}

/// One event of the wide scenario (the `k`th, of one of the first three types), published while its
/// delivery to the group is awaited (on embedded it may come before the publish's answer), then
/// acked: the time from its send to its delivery read.
async fn wide_one(
    ctx: &Ctx,
    bus: &EventBusClient<Channel>,
    sub: &mut Sub,
    k: u64,
    types: usize,
) -> Result<u64> {
    let id = ctx.args.ids.name(|| format!("{}-wide-{k}", ctx.run));
    let sent = now_ns();
    let event_type = format!("bench.wide.t{}.v1", (k % 3) as usize % types);
    let e = event(id.clone(), &event_type, k, ctx.args.payload_size, sent);
    let mut bus = bus.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let publish = async {
        bus.publish(pb::PublishRequest { events: vec![e] })
            .await
            .context("publish")
    };
    let deliver = async {
        loop {
            let message = tokio::time::timeout_at(deadline, sub.inbound.message())
                .await
                .map_err(|_| anyhow!("event {id} not delivered to the group within 10 s"))??;
            match message.and_then(|m| m.message) {
                Some(Message::Delivery(d)) if d.event.as_ref().is_some_and(|e| e.id == id) => {
                    return Ok::<_, anyhow::Error>((now_ns().saturating_sub(sent), d.delivery_id));
                }
                // another event's delivery (a redelivery): settled, not timed
                Some(Message::Delivery(d)) => sub.ack(vec![d.delivery_id]).await?,
                Some(_) => {}
                None => bail!("the server ended the group's stream"),
            }
        }
    };
    let (published, delivered) = tokio::join!(publish, deliver);
    published?;
    let (latency_ns, delivery_id) = delivered?;
    sub.ack(vec![delivery_id]).await?;
    Ok(latency_ns)
}

/// Publishes `n` events of one type as fast as `workers` publishers can, in batches; returns the
/// lowest sequence and the load row.
async fn bulk_load(ctx: &Ctx, event_type: &'static str, tag: &str, n: u64) -> Result<(u64, Row)> {
    let batch = ctx.bulk_batch() as u64;
    let chunks = n.div_ceil(batch);
    let next = Arc::new(AtomicU64::new(0));
    let first = Arc::new(AtomicU64::new(u64::MAX));
    let buses = ctx.buses();
    let prefix = format!("{}-{tag}", ctx.run);
    let size = ctx.args.payload_size;
    let ids = ctx.args.ids;
    let meter = Meter::start(ctx.pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let (next, first, buses, prefix) =
            (next.clone(), first.clone(), buses.clone(), prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut bus = buses[w % buses.len()].clone();
            let mut hist = Hist::new();
            let mut done = 0u64;
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= chunks {
                    return Ok::<_, anyhow::Error>((done, hist));
                }
                let stamp = now_ns();
                let events: Vec<pb::Event> = (c * batch..((c + 1) * batch).min(n))
                    .map(|i| {
                        event(
                            ids.name(|| format!("{prefix}-{i}")),
                            event_type,
                            i,
                            size,
                            stamp,
                        )
                    })
                    .collect();
                let t0 = Instant::now();
                let results = bus
                    .publish(pb::PublishRequest { events })
                    .await
                    .context("bulk publish")?
                    .into_inner()
                    .results;
                hist.record(t0.elapsed());
                if let Some(min) = results.iter().map(|r| r.sequence).min() {
                    first.fetch_min(min, Ordering::Relaxed);
                }
                done += committed(&results);
            }
        }));
    }
    let mut r = LoadResult::default();
    for t in tasks {
        let (done, hist) = t.await??;
        r.events += done;
        r.hist.merge(&hist);
    }
    r.elapsed = started.elapsed();
    let row = load_row(
        ctx.row(
            "bulk load",
            format!("{tag}: {n} events, batch={batch} publishers=4"),
        ),
        &r,
        &meter,
    );
    Ok((first.load(Ordering::Relaxed), row))
}

/// One subscriber drains a stored backlog: a private stream, then a durable group.
pub async fn drain(ctx: &Ctx, rows: &mut Vec<Row>) -> Result<()> {
    let n = ctx.args.drain_events;
    let (first, load) = bulk_load(ctx, "bench.drain.v1", "drain", n).await?;
    rows.push(load);
    for group in ["", "bench-drain"] {
        let group = if group.is_empty() {
            String::new()
        } else {
            format!("{group}-{}", ctx.run)
        };
        let counter = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop) = watch::channel(false);
        let meter = Meter::start(ctx.pid);
        let started = Instant::now();
        let started_ns = now_ns();
        let sub = Sub::open(
            ctx.bus(0),
            open_msg(
                &["bench.drain.v1"],
                &group,
                Some(pb::start_position::Position::AfterSequence(
                    first.saturating_sub(1),
                )),
                10_000,
                None,
            ),
        )
        .await?;
        let reader = spawn_reader(sub, counter.clone(), stop, 1000, None);
        let complete = wait_count(&counter, n, Duration::from_secs(300)).await;
        let elapsed = started.elapsed();
        let usage = meter.finish();
        let _ = stop_tx.send(true);
        let out = reader.await?;
        let mut row = ctx.row(
            "drain",
            if group.is_empty() {
                "private stream, backlog".to_owned()
            } else {
                "durable group, backlog".to_owned()
            },
        );
        row.events = out.delivered;
        // to the last delivery, not to when the counter's poll (every 2 ms) saw it
        row.seconds = if out.last_ns > started_ns {
            (out.last_ns - started_ns) as f64 / 1e9
        } else {
            elapsed.as_secs_f64()
        };
        row.rate = out.delivered as f64 / row.seconds.max(1e-9);
        row.usage = usage;
        row.errors = u64::from(out.error.is_some()) + u64::from(!complete);
        row.first_error = out.error.or_else(|| {
            (!complete).then(|| format!("only {} of {n} delivered in 300 s", out_count(&counter)))
        });
        row.note = "rate = deliveries / time from open to last delivery; latency column n/a".into();
        rows.push(row);
        if !group.is_empty() {
            let _ = ctx
                .admin()
                .delete_group(pb::DeleteGroupRequest { group })
                .await;
        }
    }
    Ok(())
}

fn out_count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// How often the slow-consumer scenario samples the server's RSS.
const RSS_EVERY: Duration = Duration::from_millis(100);

/// Samples the server's RSS every [`RSS_EVERY`] until `stop`; returns (seconds since the start, MB)
/// of each sample.
fn rss_sampler(pid: Option<u32>, mut stop: watch::Receiver<bool>) -> JoinHandle<Vec<(f64, f64)>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut samples = Vec::new();
        let mut every = tokio::time::interval(RSS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = every.tick() => {}
            }
            if let Some(v) = pid.and_then(rss_mb) {
                samples.push((started.elapsed().as_secs_f64(), v));
            }
        }
        // one at the end, so the trace covers the whole phase
        if let Some(v) = pid.and_then(rss_mb) {
            samples.push((started.elapsed().as_secs_f64(), v));
        }
        samples
    })
}

/// The highest sample, MB.
fn rss_peak(samples: &[(f64, f64)]) -> Option<f64> {
    samples.iter().map(|s| s.1).max_by(f64::total_cmp)
}

/// The least-squares slope of RSS over time, MB per second: how fast the server's memory grew.
fn rss_slope(samples: &[(f64, f64)]) -> Option<f64> {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return None;
    }
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_m = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let var = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum::<f64>();
    (var > 0.0).then(|| {
        samples
            .iter()
            .map(|s| (s.0 - mean_t) * (s.1 - mean_m))
            .sum::<f64>()
            / var
    })
}

/// RSS over a phase in a few points and its slope: "RSS 40.1 MB at 0.1 s, 45.0 at 2.5 s, ..., slope
/// +1.20 MB/s".
fn rss_trace(samples: &[(f64, f64)]) -> String {
    let Some(&last) = samples.last() else {
        return "RSS not read".into();
    };
    let points = 5usize.min(samples.len());
    let picked: Vec<String> = (0..points)
        .map(|k| {
            let at = if points == 1 {
                last
            } else {
                samples[k * (samples.len() - 1) / (points - 1)]
            };
            format!("{:.1} at {:.1} s", at.1, at.0)
        })
        .collect();
    format!(
        "RSS MB {}, slope {}",
        picked.join(", "),
        rss_slope(samples).map_or("n/a".into(), |v| format!("{v:+.2} MB/s"))
    )
}

/// Slow consumers: the same publish load twice, first without and then with three slow consumers (a
/// private stream and a group member each acking 100 events/s, and a private stream that never reads);
/// the RSS they add is the second phase's peak minus the first's. Each event carries
/// `--slow-payload-size` bytes, so that a server keeping every event for the stalled reader would grow
/// by several times the 64 MB the target allows.
pub async fn slow(ctx: &Ctx, rows: &mut Vec<Row>) -> Result<()> {
    let rate = ctx.args.slow_rate as f64;
    let duration = ctx.args.slow_duration;
    let size = ctx.args.slow_payload_size;
    let before = ctx.pid.and_then(rss_mb);

    // phase 1: the load alone
    let (stop_tx, stop) = watch::channel(false);
    let sampler = rss_sampler(ctx.pid, stop);
    let meter = Meter::start(ctx.pid);
    let control = open_loop(
        rate,
        duration,
        ctx.args.max_outstanding,
        ctx.args.pacing,
        single_sender(ctx, "bench.slow.v1", "slow-control", size).await?,
    )
    .await;
    let _ = stop_tx.send(true);
    let control_samples = sampler.await?;
    let control_peak = rss_peak(&control_samples);
    let mut row = load_row(ctx.row("slow consumer", "load alone"), &control, &meter);
    row.offered_rate = Some(rate);
    row.note = format!(
        "{}, {size}-byte data; server RSS before {:.1} MB, peak {:.1} MB; {}",
        publish_note(ctx),
        before.unwrap_or(0.0),
        control_peak.unwrap_or(0.0),
        rss_trace(&control_samples),
    );
    row.rss_over_time = control_samples;
    rows.push(row);

    // phase 2: the same load with slow consumers
    let group = format!("bench-slow-{}", ctx.run);
    let counter = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let latest = || Some(pb::start_position::Position::Latest(()));
    let paced = Some(Duration::from_millis(10));
    let window = ctx.args.slow_window;
    let private = Sub::open(
        ctx.bus(0),
        open_msg(&["bench.slow.v1"], "", latest(), window, None),
    )
    .await?;
    let member = Sub::open(
        ctx.bus(1),
        open_msg(&["bench.slow.v1"], &group, latest(), window, None),
    )
    .await?;
    let stalled_start = match ctx.args.slow_stalled_start {
        crate::StalledStart::Latest => latest(),
        crate::StalledStart::Earliest => Some(pb::start_position::Position::Earliest(())),
    };
    let stalled = Sub::open(
        ctx.bus(2),
        open_msg(&["bench.slow.v1"], "", stalled_start, window, None),
    )
    .await?;
    let readers = vec![
        spawn_reader(private, counter.clone(), stop.clone(), 1, paced),
        spawn_reader(member, counter.clone(), stop.clone(), 1, paced),
    ];
    let start_phase2 = ctx.pid.and_then(rss_mb);
    let sampler = rss_sampler(ctx.pid, stop.clone());
    let meter = Meter::start(ctx.pid);
    let loaded = open_loop(
        rate,
        duration,
        ctx.args.max_outstanding,
        ctx.args.pacing,
        single_sender(ctx, "bench.slow.v1", "slow-consumers", size).await?,
    )
    .await;
    let usage = meter.finish();
    let _ = stop_tx.send(true);
    let samples = sampler.await?;
    let peak = rss_peak(&samples);
    let mut errors = Vec::new();
    let mut received = Vec::new();
    for (r, consumer) in readers.into_iter().zip(["private stream", "group member"]) {
        let out = r.await?;
        errors.extend(out.error);
        received.push(out.delivered);
        // a paced consumer that got nothing would leave a lighter scenario than the one described
        if out.delivered == 0 && loaded.events > 0 {
            errors.push(format!(
                "the slow {consumer} received none of the {} events published",
                loaded.events
            ));
        }
    }
    drop(stalled);
    let mut row = load_row(
        ctx.row(
            "slow consumer",
            "with 3 slow consumers (2 at 100/s, 1 stalled)",
        ),
        &loaded,
        &meter,
    );
    row.usage = usage;
    row.offered_rate = Some(rate);
    row.errors += errors.len() as u64;
    row.first_error = row.first_error.or(errors.first().cloned());
    // signed: a second peak below the first is noise in the reading, shown as it is
    let added = peak.zip(control_peak).map(|(p, c)| p - c);
    row.rss_added_mb = added;
    // what the stalled reader alone would pin if the server kept every event published for it
    let published_mb = loaded.events as f64 * size as f64 / (1024.0 * 1024.0);
    row.note = format!(
        "server RSS at start {:.1} MB, peak {:.1} MB: {} MB against the load-alone peak; {}; \
         {} events x {size} bytes published = {published_mb:.0} MB, what the stalled reader would \
         hold if the server buffered every event for it; windows of {window}, the stalled reader \
         from {stalled_from:?}; the paced private stream and group member received {received:?}",
        start_phase2.unwrap_or(0.0),
        peak.unwrap_or(0.0),
        added.map_or("n/a".into(), |v| format!("{v:+.1}")),
        rss_trace(&samples),
        loaded.events,
        stalled_from = ctx.args.slow_stalled_start,
    );
    row.rss_over_time = samples;
    rows.push(row);
    let _ = ctx
        .admin()
        .delete_group(pb::DeleteGroupRequest { group })
        .await;
    Ok(())
}

/// Request / reply round trips with one responder, closed loop per concurrency level.
pub async fn request_reply(ctx: &Ctx, rows: &mut Vec<Row>) -> Result<()> {
    let (stop_tx, mut stop) = watch::channel(false);
    let mut responder = Sub::open(
        ctx.bus(0),
        open_msg(
            &["bench.request.v1"],
            "",
            Some(pb::start_position::Position::Latest(())),
            2000,
            None,
        ),
    )
    .await?;
    let reply_bus = ctx.buses();
    let responder_task = tokio::spawn(async move {
        let mut k = 0usize;
        loop {
            let message = tokio::select! {
                _ = stop.changed() => return Ok::<(), anyhow::Error>(()),
                m = responder.inbound.message() => m?,
            };
            let Some(m) = message else {
                bail!("the server ended the responder stream");
            };
            if let Some(Message::Delivery(d)) = m.message {
                let Some(request) = d.event else { continue };
                let mut bus = reply_bus[k % reply_bus.len()].clone();
                k += 1;
                tokio::spawn(async move {
                    let reply = pb::Event {
                        id: format!("{}-reply", request.id),
                        source: crate::util::SOURCE.to_owned(),
                        r#type: "bench.reply.v1".to_owned(),
                        spec_version: "1.0".to_owned(),
                        data: request.data.clone(),
                        ..pb::Event::default()
                    };
                    let _ = bus
                        .reply(pb::ReplyRequest {
                            reply_to: request.reply_to,
                            event: Some(reply),
                        })
                        .await;
                });
                responder.ack(vec![d.delivery_id]).await?;
            }
        }
    });
    let size = ctx.args.payload_size;
    let ids = ctx.args.ids;
    let request_call = |tag: String| -> Call {
        let buses = ctx.buses();
        Arc::new(move |w, k| {
            let mut bus = buses[w % buses.len()].clone();
            let e = event(
                ids.name(|| format!("{tag}-{w}-{k}")),
                "bench.request.v1",
                k,
                size,
                now_ns(),
            );
            Box::pin(async move {
                bus.request(pb::RequestRequest {
                    event: Some(e),
                    timeout: Some(prost_types::Duration {
                        seconds: 10,
                        nanos: 0,
                    }),
                })
                .await?;
                Ok(1)
            })
        })
    };
    // a responder counts once the server knows it (presence may take a moment on Redis)
    let warm = request_call(format!("{}-rr-warm", ctx.run));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut k = 0;
    loop {
        match warm(0, k).await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => return Err(e.context("warm-up request")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        k += 1;
    }
    for &c in &ctx.args.rr_concurrency {
        let meter = Meter::start(ctx.pid);
        let r = closed_loop(
            c,
            ctx.args.duration,
            request_call(format!("{}-rr-c{c}", ctx.run)),
        )
        .await;
        rows.push(load_row(
            ctx.row("request/reply", format!("requesters={c}")),
            &r,
            &meter,
        ));
    }
    let _ = stop_tx.send(true);
    responder_task.await??;
    Ok(())
}

/// Replays a stored history of `replay_events` events, 1000 per page; then the middle half of it by
/// recorded time, whose rate should match the whole replay's (a time range is a sequence range).
pub async fn replay(ctx: &Ctx, rows: &mut Vec<Row>) -> Result<()> {
    let n = ctx.args.replay_events;
    let (first, load) = bulk_load(ctx, "bench.replay.v1", "replay", n).await?;
    rows.push(load);
    let whole = pb::ReplayRequest {
        types: vec!["bench.replay.v1".to_owned()],
        after_sequence: first.saturating_sub(1),
        page_size: 1000,
        ..pb::ReplayRequest::default()
    };
    let mut times = Vec::with_capacity(n as usize);
    let mut row = timed_replay(ctx, whole.clone(), |t| times.push(t)).await?;
    row.case = format!("{n} events, page_size=1000");
    if times.len() as u64 != n {
        row.errors = 1;
        row.first_error = Some(format!("replayed {} events, expected {n}", times.len()));
    }
    let whole_rate = row.rate;
    rows.push(row);
    let (Some(&from), Some(&before)) = (times.get(times.len() / 4), times.get(times.len() * 3 / 4))
    else {
        return Ok(());
    };
    // recorded times never go backwards, so the window is one run of the history; it holds only this
    // load's events, so it is read without a type filter (the database's own choice of index)
    let expected = times.iter().filter(|&&t| t >= from && t < before).count();
    let stamp = |(seconds, nanos)| prost_types::Timestamp { seconds, nanos };
    let window = pb::ReplayRequest {
        types: Vec::new(),
        start_time: Some(stamp(from)),
        end_time: Some(stamp(before)),
        ..whole
    };
    let mut count = 0usize;
    let mut row = timed_replay(ctx, window, |_| count += 1).await?;
    row.case = format!("{expected} events recorded in the middle half, page_size=1000");
    if count != expected {
        row.errors = 1;
        row.first_error = Some(format!("replayed {count} events, expected {expected}"));
    }
    row.ratios.push(Ratio {
        against: "rate / whole replay".to_owned(),
        ratio: row.rate / whole_rate.max(1e-9),
    });
    rows.push(row);
    Ok(())
}

/// Runs one replay to its end, handing each event's recorded time (seconds, nanos) to `seen`.
async fn timed_replay(
    ctx: &Ctx,
    request: pb::ReplayRequest,
    mut seen: impl FnMut((i64, i32)),
) -> Result<Row> {
    let meter = Meter::start(ctx.pid);
    let started = Instant::now();
    let mut stream = ctx
        .bus(0)
        .replay(request)
        .await
        .context("Replay")?
        .into_inner();
    let mut count = 0u64;
    let mut first_page = None;
    let mut pages = Hist::new();
    let mut last = Instant::now();
    while let Some(page) = stream.message().await.context("replay page")? {
        let now = Instant::now();
        first_page.get_or_insert(now - started);
        pages.record(now - last);
        last = now;
        count += page.events.len() as u64;
        for e in &page.events {
            let t = e.recorded_time.unwrap_or_default();
            seen((t.seconds, t.nanos));
        }
        if page.end_of_history {
            break;
        }
    }
    let elapsed = started.elapsed();
    let mut row = ctx.row("replay", "");
    row.events = count;
    row.seconds = elapsed.as_secs_f64();
    row.rate = count as f64 / elapsed.as_secs_f64().max(1e-9);
    row.latency = pages.summary();
    row.usage = meter.finish();
    row.note = format!(
        "latency columns = time between pages; first page after {:.1} ms",
        first_page.map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_over_time_is_traced_in_five_points_with_its_slope() {
        // 2 MB/s for 4 s, sampled every 100 ms
        let samples: Vec<(f64, f64)> = (0..=40)
            .map(|k| (f64::from(k) / 10.0, 50.0 + f64::from(k) / 5.0))
            .collect();
        let slope = rss_slope(&samples).expect("a slope");
        assert!((slope - 2.0).abs() < 1e-9, "slope {slope}");
        assert_eq!(rss_peak(&samples), Some(58.0));
        assert_eq!(
            rss_trace(&samples),
            "RSS MB 50.0 at 0.0 s, 52.0 at 1.0 s, 54.0 at 2.0 s, 56.0 at 3.0 s, 58.0 at 4.0 s, \
             slope +2.00 MB/s"
        );
        // shrinking memory has a negative slope, shown as it is
        let falling: Vec<(f64, f64)> = samples.iter().map(|&(t, m)| (t, 100.0 - m)).collect();
        assert!(rss_trace(&falling).ends_with("slope -2.00 MB/s"));
        assert_eq!(rss_slope(&samples[..1]), None);
        assert_eq!(rss_trace(&[]), "RSS not read");
    }

    #[test]
    fn duplicates_are_not_counted_as_committed() {
        let result = |duplicate| pb::PublishResult {
            duplicate,
            ..pb::PublishResult::default()
        };
        assert_eq!(committed(&[result(false), result(true), result(false)]), 2);
        assert_eq!(committed(&[result(true)]), 0);
    }
}
