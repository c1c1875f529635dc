//! Shared pieces: the latency histogram, the events every scenario sends, and the load drivers
//! (closed loop for throughput, open loop at a fixed rate for latency).

use std::{
    future::Future,
    os::fd::OwnedFd,
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use nerve::api::pb;
use serde::Serialize;
use tokio::{io::unix::AsyncFd, sync::Semaphore};

use crate::{Pacing, procstat::Meter, report::Row};

/// One clock for the whole process: send stamps carried in events are nanoseconds since this instant.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since the process epoch (monotonic).
pub fn now_ns() -> u64 {
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The host's dirty pages written to disk (`sync(2)`) before each measured part, and how long each
/// took. Postgres' checkpoints and the kernel's writeback flush what a system wrote seconds or minutes
/// before (a publish matrix leaves gigabytes); settled first, those writes do not land in another
/// system's measurement.
#[derive(Default)]
pub struct DiskSettles(Vec<Duration>);

impl DiskSettles {
    /// Writes every dirty page of the host to disk and waits for it.
    pub async fn settle(&mut self) {
        let started = Instant::now();
        // sync(2) returns once the writes are done: off the runtime's threads
        let _ = tokio::task::spawn_blocking(rustix::fs::sync).await;
        self.0.push(started.elapsed());
    }

    /// "N syncs before <what>: p50 X ms, max Y ms", or `None` before any.
    pub fn note(&self, what: &str) -> Option<String> {
        let mut took = self.0.clone();
        took.sort();
        let max = *took.last()?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Some(format!(
            "{} syncs of the host's dirty pages before {what}, not measured in any cell: p50 {:.1} ms, max {:.1} ms",
            took.len(),
            ms(took[took.len() / 2]),
            ms(max)
        ))
    }
}

/// Fills a row from a load result and the meter that watched it.
pub fn load_row(mut row: Row, r: &LoadResult, meter: &Meter) -> Row {
    row.events = r.events;
    row.seconds = r.elapsed.as_secs_f64();
    row.rate = r.rate();
    row.latency = r.hist.summary();
    row.usage = meter.finish();
    row.errors = r.errors;
    row.first_error = r.first_error.clone();
    if r.planned > 0 {
        row.planned = Some(r.planned);
        row.sent = Some(r.sent);
    }
    row
}

/// "from schedule p50 X ms p99 Y ms": the row's publish -> deliver latency counted from the time each
/// send was scheduled (the row's columns count from the time it left).
pub fn from_schedule_note(l: Option<Latency>) -> String {
    l.map_or("from schedule: no deliveries".into(), |l| {
        format!(
            "from schedule p50 {:.3} ms p99 {:.3} ms",
            l.p50_ms, l.p99_ms
        )
    })
}

/// Seconds from an open loop's first send to the last delivery, and deliveries per second over them:
/// deliveries that arrive after the sending ended count in the time they took.
pub fn delivery_rate(
    delivered: u64,
    first_send_ns: Option<u64>,
    last_delivery_ns: u64,
) -> (f64, f64) {
    match first_send_ns {
        Some(first) if delivered > 0 && last_delivery_ns > first => {
            let seconds = (last_delivery_ns - first) as f64 / 1e9;
            (seconds, delivered as f64 / seconds)
        }
        _ => (0.0, 0.0),
    }
}

/// Events per second over `seconds` of merged slices; 0 when no time was measured.
pub fn per_second(events: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        events as f64 / seconds
    } else {
        0.0
    }
}

/// A boxed future, for the per-call closures the drivers take.
pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Latency histogram in nanoseconds (1 ns .. 10 min, 3 significant digits).
#[derive(Clone)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

impl Hist {
    pub fn new() -> Self {
        // constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, 3 significant digits)
        Hist(Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds"))
    }

    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1));
    }

    pub fn record(&mut self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: &Hist) {
        // both have the same bounds; a value out of range is impossible, so the error is ignored
        let _ = self.0.add(&other.0);
    }

    pub fn summary(&self) -> Option<Latency> {
        if self.0.is_empty() {
            return None;
        }
        let ms = |v: u64| v as f64 / 1e6;
        Some(Latency {
            count: self.0.len(),
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p90_ms: ms(self.0.value_at_quantile(0.90)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            p999_ms: ms(self.0.value_at_quantile(0.999)),
            max_ms: ms(self.0.max()),
            mean_ms: self.0.mean() / 1e6,
        })
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// The source every benchmark event carries.
pub const SOURCE: &str = "//nerve-bench";

/// Builds a benchmark event: `payload_size` bytes of binary data whose first 8 bytes are the send stamp
/// (nanoseconds since the process epoch), and a subject `bench/<n mod 16>` filters can select on. Its
/// send counts as scheduled when it left (closed loops have no schedule); see [`scheduled_event`].
pub fn event(
    id: String,
    event_type: &str,
    n: u64,
    payload_size: usize,
    stamp_ns: u64,
) -> pb::Event {
    scheduled_event(id, event_type, n, payload_size, stamp_ns, stamp_ns)
}

/// How many subjects the tool's events take (`bench/<n % SUBJECTS>`).
pub const SUBJECTS: u64 = 16;

/// [`event`] sent by an open loop: bytes 8..16 of its data are the time its schedule planned the send
/// (`scheduled_ns`, at or before `stamp_ns`), so a reader can measure latency from either.
pub fn scheduled_event(
    id: String,
    event_type: &str,
    n: u64,
    payload_size: usize,
    stamp_ns: u64,
    scheduled_ns: u64,
) -> pb::Event {
    pb::Event {
        id,
        source: SOURCE.to_owned(),
        r#type: event_type.to_owned(),
        spec_version: "1.0".to_owned(),
        subject: format!("bench/{}", n % SUBJECTS),
        data_content_type: "application/octet-stream".to_owned(),
        data: Some(pb::event::Data::BinaryData(payload(
            payload_size,
            stamp_ns,
            scheduled_ns,
        ))),
        ..pb::Event::default()
    }
}

/// The fewest bytes of data an event carries: its two stamps.
pub const STAMPS_LEN: usize = 16;

/// `size` bytes (at least [`STAMPS_LEN`]): the send stamp, the scheduled time, then a repeating
/// pattern.
pub fn payload(size: usize, stamp_ns: u64, scheduled_ns: u64) -> Vec<u8> {
    let mut data: Vec<u8> = (0..size.max(STAMPS_LEN)).map(|i| (i % 251) as u8).collect();
    data[..8].copy_from_slice(&stamp_ns.to_le_bytes());
    data[8..16].copy_from_slice(&scheduled_ns.to_le_bytes());
    data
}

/// Reads the send stamp and the scheduled time of an event built by [`scheduled_event`] or [`event`].
pub fn stamps_of(event: &pb::Event) -> Option<(u64, u64)> {
    match &event.data {
        Some(pb::event::Data::BinaryData(b)) => stamps_of_bytes(b),
        _ => None,
    }
}

/// The send stamp and scheduled time at the start of an event's data.
pub fn stamps_of_bytes(b: &[u8]) -> Option<(u64, u64)> {
    let at = |range: std::ops::Range<usize>| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(range)?.try_into().ok()?))
    };
    Some((at(0..8)?, at(8..16)?))
}

/// What a load driver measured.
#[derive(Default)]
pub struct LoadResult {
    /// Events acknowledged.
    pub events: u64,
    /// Calls that failed, and the first failure.
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Call latency (closed loop) or send-to-acknowledgement latency (open loop).
    pub hist: Hist,
    /// Open loop only: how late sends left compared with their schedule.
    pub schedule_lag: Hist,
    /// Open loop only: sends the schedule planned, and sends that left.
    pub planned: u64,
    pub sent: u64,
    /// Open loop only: when the first send left (nanoseconds since the process epoch).
    pub first_send_ns: Option<u64>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One call of a closed-loop driver: (worker, iteration) -> events acknowledged.
pub type Call = Arc<dyn Fn(usize, u64) -> BoxFut<anyhow::Result<u64>> + Send + Sync>;

/// Runs `workers` tasks, each calling `call` back to back until `duration` has passed.
pub async fn closed_loop(workers: usize, duration: Duration, call: Call) -> LoadResult {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for w in 0..workers.max(1) {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            let mut k = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match call(w, k).await {
                    Ok(n) => {
                        r.events += n;
                        r.hist.record(t0.elapsed());
                    }
                    Err(e) => {
                        r.errors += 1;
                        if r.first_error.is_none() {
                            r.first_error = Some(format!("{e:#}"));
                        }
                        // a failing backend must not turn the loop into a busy spin
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                k += 1;
            }
            r
        }));
    }
    let mut total = LoadResult::default();
    for t in tasks {
        match t.await {
            Ok(r) => absorb(&mut total, r),
            Err(e) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert(format!("worker panicked: {e}"));
            }
        }
    }
    total.elapsed = started.elapsed();
    total
}

fn absorb(total: &mut LoadResult, r: LoadResult) {
    total.events += r.events;
    total.errors += r.errors;
    if total.first_error.is_none() {
        total.first_error = r.first_error;
    }
    total.hist.merge(&r.hist);
    total.schedule_lag.merge(&r.schedule_lag);
}

/// One send of an open-loop driver: (index, send stamp, the time the schedule planned it) -> events
/// acknowledged. Both times are nanoseconds since the process epoch; the send stamp is when the send
/// actually left, at or after its planned time.
pub type Send1 = Arc<dyn Fn(u64, u64, u64) -> BoxFut<anyhow::Result<u64>> + Send + Sync>;

/// How a row's open loop paced its sends, for its note.
pub fn pacing_note(pacing: Pacing) -> &'static str {
    match pacing {
        Pacing::Tick => "sends in 1 ms ticks",
        Pacing::Even => "sends evenly spaced",
        Pacing::Poisson => "sends at random times (Poisson)",
    }
}

/// When an open loop's sends fall due, in nanoseconds after its start.
enum Arrivals {
    /// Every 1/rate.
    Even { period_ns: f64 },
    /// A Poisson process with `total` arrivals in the duration: as many uniform random times, sorted
    /// (a Poisson process given its count is exactly that), so the count is the planned one.
    Poisson(Vec<u64>),
}

impl Arrivals {
    fn new(pacing: Pacing, rate: f64, total: u64, duration: Duration) -> Self {
        match pacing {
            Pacing::Tick | Pacing::Even => Self::Even {
                period_ns: 1e9 / rate.max(1e-3),
            },
            Pacing::Poisson => {
                let span = u64::try_from(duration.as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let mut rng = fastrand::Rng::new();
                let mut at: Vec<u64> = (0..total).map(|_| rng.u64(0..span)).collect();
                at.sort_unstable();
                Self::Poisson(at)
            }
        }
    }

    /// When send `i` falls due.
    fn at_ns(&self, i: u64) -> u64 {
        match self {
            Self::Even { period_ns } => (i as f64 * period_ns) as u64,
            Self::Poisson(at) => at.get(i as usize).copied().unwrap_or(u64::MAX),
        }
    }
}

/// A one-shot timerfd on the runtime's reactor: tokio's own timer has 1 ms resolution, a timerfd
/// expires when it is set to (no timer slack).
struct Alarm(AsyncFd<OwnedFd>);

impl Alarm {
    fn new() -> std::io::Result<Self> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // `new` is deprecated because it accepts any raw fd (tokio#8587); this one is an `OwnedFd` the
        // alarm owns and never replaces, the case that is sound (`register` is `unsafe`, which the
        // workspace forbids)
        #[allow(deprecated)]
        let registered = AsyncFd::new(fd)?;
        Ok(Self(registered))
    }

    /// Returns after `wait` (at once when it is zero).
    async fn sleep(&self, wait: Duration) -> std::io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        if wait.is_zero() {
            return Ok(());
        }
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let value = Timespec {
            tv_sec: wait.as_secs() as _,
            tv_nsec: wait.subsec_nanos() as _,
        };
        // one-shot: no interval
        timerfd_settime(
            self.0.get_ref(),
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: value,
            },
        )?;
        loop {
            let mut ready = self.0.readable().await?;
            let mut expiries = [0u8; 8];
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expiries)?)) {
                Ok(read) => return read.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Sends `rate` events per second for `duration`, on a fixed schedule that does not wait for answers
/// (open loop); at most `max_outstanding` calls are in flight. Every send that falls due before the
/// deadline leaves, late when the schedule slipped (`schedule_lag` shows it), except once
/// `max_outstanding` calls are unanswered at the deadline: sending then stops, so `sent` < `planned`
/// means the system did not keep up. (A send that fell due in the timer's last tick leaves just after
/// the deadline.) `pacing` says when sends leave: in the runtime timer's 1 ms ticks, evenly spaced, or
/// at random times; each carries the time it actually left as its stamp, and the time the schedule
/// planned it.
pub async fn open_loop(
    rate: f64,
    duration: Duration,
    max_outstanding: usize,
    pacing: Pacing,
    send: Send1,
) -> LoadResult {
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let arrivals = Arrivals::new(pacing, rate, total, duration);
    let alarm = match pacing {
        Pacing::Tick => None,
        Pacing::Even | Pacing::Poisson => match Alarm::new() {
            Ok(alarm) => Some(alarm),
            Err(e) => {
                return LoadResult {
                    errors: 1,
                    first_error: Some(format!("creating the pacing's timerfd: {e}")),
                    planned: total,
                    ..LoadResult::default()
                };
            }
        },
    };
    let permits = Arc::new(Semaphore::new(max_outstanding.max(1)));
    let shared = Arc::new(Mutex::new(LoadResult::default()));
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + duration);
    let start_ns = now_ns();
    let mut first_send_ns = None;
    let mut i = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    // on the clock of the stamps, so no send's stamp is before its planned time
    let elapsed_ns = || now_ns().saturating_sub(start_ns);
    'sending: while i < total {
        while i < total && arrivals.at_ns(i) <= elapsed_ns() {
            // a permit is waited for until the deadline; after it, only one free at once is taken
            let permit = if tokio::time::Instant::now() < deadline {
                match tokio::time::timeout_at(deadline, permits.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => break 'sending,
                }
            } else {
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => break 'sending,
                }
            };
            let stamp = now_ns();
            first_send_ns.get_or_insert(stamp);
            let scheduled = start_ns + arrivals.at_ns(i);
            let send = send.clone();
            let shared = shared.clone();
            let acked = acked.clone();
            let index = i;
            tasks.spawn(async move {
                let result = send(index, stamp, scheduled).await;
                let took = now_ns().saturating_sub(stamp);
                drop(permit);
                let mut r = shared.lock().unwrap_or_else(|p| p.into_inner());
                r.schedule_lag.record_ns(stamp.saturating_sub(scheduled));
                match result {
                    Ok(n) => {
                        acked.fetch_add(n, Ordering::Relaxed);
                        r.hist.record_ns(took);
                    }
                    Err(e) => {
                        r.errors += 1;
                        if r.first_error.is_none() {
                            r.first_error = Some(format!("{e:#}"));
                        }
                    }
                }
            });
            i += 1;
        }
        if i >= total {
            break;
        }
        // reap finished sends so the set does not grow without bound
        while tasks.try_join_next().is_some() {}
        match &alarm {
            None => tokio::time::sleep(Duration::from_millis(1)).await,
            Some(alarm) => {
                let next = Duration::from_nanos(arrivals.at_ns(i));
                if let Err(e) = alarm.sleep(next.saturating_sub(started.elapsed())).await {
                    let mut r = shared.lock().unwrap_or_else(|p| p.into_inner());
                    r.errors += 1;
                    r.first_error
                        .get_or_insert_with(|| format!("waiting on the pacing's timerfd: {e}"));
                    break;
                }
            }
        }
    }
    // the schedule spans the duration even when its last send left before the deadline
    let send_phase = started.elapsed().max(duration);
    while tasks.join_next().await.is_some() {}
    let mut r = std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner()));
    r.events = acked.load(Ordering::Relaxed);
    r.elapsed = send_phase;
    r.planned = total;
    r.sent = i;
    r.first_send_ns = first_send_ns;
    r
}

/// Parses "5s", "500ms", "2m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Formats a rate: 12345.6 -> "12,346".
pub fn fmt_rate(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_settle_is_timed_and_the_note_gives_their_median_and_max() {
        let mut settles = DiskSettles::default();
        assert_eq!(settles.note("x"), None, "no note before any sync");
        settles.settle().await;
        assert_eq!(settles.0.len(), 1);
        settles.0 = [3, 1, 2].map(Duration::from_millis).to_vec();
        assert_eq!(
            settles.note("the slices").as_deref(),
            Some(
                "3 syncs of the host's dirty pages before the slices, not measured in any cell: p50 2.0 ms, max 3.0 ms"
            )
        );
    }

    /// The tests that time an open loop's sends run one at a time: on a machine of two cores, two
    /// loops at once delay each other's wakes, and the sends of a late wake leave in a burst.
    static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// The send stamps of an open loop at 10,000 events/s for 200 ms, in order.
    async fn send_stamps(pacing: Pacing) -> Vec<u64> {
        let stamps = Arc::new(Mutex::new(Vec::new()));
        let record = stamps.clone();
        let send: Send1 = Arc::new(move |_, stamp, _| {
            record.lock().unwrap_or_else(|p| p.into_inner()).push(stamp);
            Box::pin(async { Ok(1) })
        });
        let r = open_loop(10_000.0, Duration::from_millis(200), 4096, pacing, send).await;
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        // a system that keeps up is sent every planned event, the timer's last tick included
        assert_eq!((r.sent, r.planned), (2_000, 2_000), "{pacing:?}");
        let mut stamps = std::mem::take(&mut *stamps.lock().unwrap_or_else(|p| p.into_inner()));
        stamps.sort_unstable();
        stamps
    }

    /// The share of consecutive sends at least 10 µs apart: a send of its own rather than one of a
    /// burst. At 10,000/s, sends at random times are 90% of them, evenly paced ones all, 1 ms ticks
    /// one in ten (the first of each burst of ten).
    fn spread(stamps: &[u64]) -> f64 {
        let gaps = stamps.len().saturating_sub(1).max(1);
        let apart = stamps.windows(2).filter(|w| w[1] - w[0] >= 10_000).count();
        apart as f64 / gaps as f64
    }

    #[test]
    fn poisson_arrivals_are_the_planned_count_at_exponential_gaps() {
        let span = Duration::from_secs(2);
        let Arrivals::Poisson(at) = Arrivals::new(Pacing::Poisson, 10_000.0, 20_000, span) else {
            panic!("poisson pacing made another schedule");
        };
        assert_eq!(at.len(), 20_000);
        assert!(at.windows(2).all(|w| w[0] <= w[1]), "not in order");
        assert!(
            at.last().is_some_and(|&t| t < 2_000_000_000),
            "beyond the duration"
        );
        // exponential gaps: the standard deviation equals the mean (100 µs); evenly spaced it is 0
        let gaps: Vec<f64> = at.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
        assert!((90_000.0..110_000.0).contains(&mean), "mean gap {mean} ns");
        assert!(
            (0.9..1.1).contains(&(sd / mean)),
            "gaps' sd / mean {}",
            sd / mean
        );
    }

    #[tokio::test]
    async fn even_and_poisson_pacing_space_the_sends_that_ticks_send_in_bursts() {
        let _one_at_a_time = TIMED.lock().await;
        let poisson = send_stamps(Pacing::Poisson).await;
        let even = send_stamps(Pacing::Even).await;
        let tick = send_stamps(Pacing::Tick).await;
        assert_eq!(
            (poisson.len(), even.len(), tick.len()),
            (2_000, 2_000, 2_000)
        );
        // bounds far from the ideal (0.9, 1.0, 0.1): a loaded host wakes late and sends planned sends
        // together (with two busy loops on this 2-core host: 0.39-0.46, 0.56-0.59 and 0.04), which
        // once left the median gap of random sends at 19 µs
        let (poisson, even, tick) = (spread(&poisson), spread(&even), spread(&tick));
        assert!(
            poisson >= 0.2,
            "only {poisson:.2} of the sends at random times were 10 µs or more apart"
        );
        assert!(
            even >= 0.2,
            "only {even:.2} of the evenly paced sends were 10 µs or more apart"
        );
        assert!(
            tick <= 0.15,
            "{tick:.2} of the sends on 1 ms ticks were 10 µs or more apart: not in bursts"
        );
    }

    #[tokio::test]
    async fn each_send_carries_its_planned_time_which_ticks_send_late() {
        let _one_at_a_time = TIMED.lock().await;
        let times = Arc::new(Mutex::new(Vec::new()));
        let record = times.clone();
        let send: Send1 = Arc::new(move |i, stamp, scheduled| {
            record
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((i, stamp, scheduled));
            Box::pin(async { Ok(1) })
        });
        let r = open_loop(
            10_000.0,
            Duration::from_millis(100),
            4096,
            Pacing::Tick,
            send,
        )
        .await;
        let mut times = std::mem::take(&mut *times.lock().unwrap_or_else(|p| p.into_inner()));
        times.sort_unstable();
        assert_eq!(times.len(), 1_000);
        assert!(
            times
                .iter()
                .all(|&(_, stamp, scheduled)| scheduled <= stamp),
            "a send left before its planned time"
        );
        // planned one per 100 µs from the first
        let first = times[0].2;
        for &(i, _, scheduled) in &times {
            let planned = scheduled - first;
            assert!(
                planned.abs_diff(i * 100_000) <= 1,
                "send {i} planned {planned} ns after the first"
            );
        }
        // in 1 ms ticks most sends leave after their planned time, the lag the second figure includes
        let late = times.iter().filter(|&&(_, s, p)| s - p > 50_000).count();
        assert!(late > 300, "only {late} of 1,000 sends left > 50 µs late");
        assert_eq!(
            r.first_send_ns,
            Some(times.iter().map(|t| t.1).min().unwrap_or(0))
        );
    }

    #[tokio::test]
    async fn sending_stops_at_the_deadline_when_max_outstanding_calls_are_unanswered() {
        let _one_at_a_time = TIMED.lock().await;
        // every send hangs until well after the loop's deadline: a system that stalled
        let duration = Duration::from_millis(100);
        let (open_tx, open) = tokio::sync::watch::channel(false);
        let send: Send1 = Arc::new(move |_, _, _| {
            let mut open = open.clone();
            Box::pin(async move {
                open.wait_for(|o| *o).await?;
                Ok(1)
            })
        });
        let gate = tokio::spawn(async move {
            tokio::time::sleep(duration * 3).await;
            let _ = open_tx.send(true);
        });
        let r = open_loop(10_000.0, duration, 10, Pacing::Tick, send).await;
        gate.await.expect("the gate's task");
        assert_eq!((r.sent, r.planned, r.events), (10, 1_000, 10));
    }
}
