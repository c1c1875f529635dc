//! The latency scenario: publish -> deliver at fixed rates, against Nerve and its baselines in turn.
//!
//! Each rate is measured in rounds. A round gives every system (raw Redis, the raw disk, the gRPC
//! floors, each Nerve server) one slice of `--duration / --rounds`, each after an unmeasured warm-up
//! (the disk's without), starting one system further along each round. A host whose speed changes
//! during the run (CPU steal, other guests' disk writes) then slows every system alike, and the ratios
//! between them hold.

use std::time::Duration;

use anyhow::Result;

use crate::{
    Args, BackendArg, BaselineArg, baseline, fail, floor,
    procstat::Usage,
    progress,
    report::{Report, Row},
    scenarios, server,
    util::{DiskSettles, Hist, LoadResult, delivery_rate, from_schedule_note, per_second},
};

/// What one slice of an open loop measured: the sending, and what the subscriber read.
pub struct Slice {
    pub load: LoadResult,
    pub delivered: u64,
    /// Publish -> deliver latency from the time each send left.
    pub hist: Hist,
    /// Publish -> deliver latency from the time each send was scheduled.
    pub from_schedule: Hist,
    /// When the last delivery was read (nanoseconds since the process epoch; 0 before any).
    pub last_ns: u64,
    /// Why the subscriber stopped early, if it did.
    pub reader_error: Option<String>,
    /// Every acknowledged event was delivered within the wait after the last send.
    pub complete: bool,
    pub usage: Usage,
}

/// The slices of one system at one rate, merged.
#[derive(Default)]
struct Cell {
    slices: u32,
    planned: u64,
    sent: u64,
    delivered: u64,
    /// Acknowledged events never delivered, over every slice and warm-up.
    undelivered: u64,
    /// First send -> last delivery, summed over the slices.
    seconds: f64,
    hist: Hist,
    from_schedule: Hist,
    ack: Hist,
    lag: Hist,
    usage: Vec<Usage>,
    errors: u64,
    first_error: Option<String>,
}

impl Cell {
    /// Adds a warm-up: its figures are not kept, but what went wrong in it is. A warm-up that fell
    /// short of its plan is not counted: it is there to take what starting costs, and a system that
    /// does not keep up shows it in the measured slices.
    fn add_warm_up(&mut self, s: &Slice) {
        self.count_errors(s);
    }

    fn add(&mut self, s: Slice) {
        self.count_errors(&s);
        self.slices += 1;
        self.planned += s.load.planned;
        self.sent += s.load.sent;
        self.delivered += s.delivered;
        self.seconds += delivery_rate(s.delivered, s.load.first_send_ns, s.last_ns).0;
        self.hist.merge(&s.hist);
        self.from_schedule.merge(&s.from_schedule);
        self.ack.merge(&s.load.hist);
        self.lag.merge(&s.load.schedule_lag);
        self.usage.push(s.usage);
    }

    fn count_errors(&mut self, s: &Slice) {
        self.errors += s.load.errors + u64::from(s.reader_error.is_some()) + u64::from(!s.complete);
        if !s.complete {
            self.undelivered += s.load.events.saturating_sub(s.delivered);
        }
        if self.first_error.is_none() {
            self.first_error = s.load.first_error.clone().or(s.reader_error.clone());
        }
    }

    /// The row of the merged slices; `how` says how the system sent and read.
    fn row(self, system: &str, rate: u64, how: &str, args: &Args) -> Row {
        let mut row = Row::new("latency", system, format!("rate={rate}/s"));
        row.events = self.delivered;
        row.seconds = self.seconds;
        row.rate = per_second(self.delivered, self.seconds);
        row.offered_rate = Some(rate as f64);
        row.planned = Some(self.planned);
        row.sent = Some(self.sent);
        row.latency = self.hist.summary();
        row.latency_from_schedule = self.from_schedule.summary();
        row.usage = Usage::merged(&self.usage);
        row.errors = self.errors;
        row.first_error = self.first_error;
        let ack = self.ack.summary();
        let lag = self.lag.summary();
        row.note = format!(
            "{how}; {}; sent {} of {} planned; {}; publish ack p50 {:.3} ms p99 {:.3} ms; send schedule lag p99 {:.3} ms{}",
            rounds_note(args, self.slices),
            self.sent,
            self.planned,
            from_schedule_note(row.latency_from_schedule),
            ack.map_or(0.0, |l| l.p50_ms),
            ack.map_or(0.0, |l| l.p99_ms),
            lag.map_or(0.0, |l| l.p99_ms),
            if self.undelivered == 0 {
                String::new()
            } else {
                format!(
                    "; {} acknowledged events not delivered within 10 s of their slice's last send (CPU figures of such a slice cover its sending)",
                    self.undelivered
                )
            }
        );
        row
    }
}

/// "N interleaved slices of D s, each after a W warm-up".
fn rounds_note(args: &Args, slices: u32) -> String {
    let warm_up = if args.warm_up.is_zero() {
        "no warm-up".to_owned()
    } else {
        format!(
            "each after a {} warm-up",
            humantime::format_duration(args.warm_up)
        )
    };
    format!(
        "{slices} interleaved slices of {}, {warm_up}",
        humantime::format_duration(slice_duration(args))
    )
}

/// The measured length of each slice.
fn slice_duration(args: &Args) -> Duration {
    args.duration / args.rounds.max(1)
}

/// The disk baseline's slices at one rate's rounds, merged.
#[derive(Default)]
struct DiskCell {
    slices: u32,
    samples: u64,
    seconds: f64,
    hist: Hist,
    errors: u64,
    first_error: Option<String>,
}

impl DiskCell {
    fn add(&mut self, s: baseline::DiskSlice) {
        self.slices += 1;
        self.samples += s.samples;
        self.seconds += s.seconds;
        self.hist.merge(&s.hist);
    }

    /// The row of the merged slices, named for the rate whose rounds they were measured in.
    fn row(self, rate: u64, args: &Args) -> Row {
        let mut row = Row::new("latency", baseline::DISK, format!("rate={rate}/s"));
        row.events = self.samples;
        row.seconds = self.seconds;
        row.rate = per_second(self.samples, self.seconds);
        row.latency = self.hist.summary();
        row.errors = self.errors;
        row.first_error = self.first_error;
        row.note = format!(
            "{}; {} interleaved slices of {} in the rounds of {rate}/s, no warm-up",
            baseline::disk_note(),
            self.slices,
            humantime::format_duration(slice_duration(args))
        );
        row
    }
}

/// A system the latency scenario measures.
pub enum System {
    /// A gRPC server of Nerve's protocol: nerve-server, or a floor.
    Bus(scenarios::Ctx),
    /// XADD -> XREADGROUP on Redis itself.
    RawRedis(baseline::RedisBase),
    /// A write and `fdatasync` of a file, back to back: no rate, no events.
    Disk(baseline::DiskBase),
}

/// What one system measured at one rate.
enum Measured {
    Loop(Box<Cell>),
    Disk(DiskCell),
}

impl Measured {
    /// Counts a round that could not be measured (no rounds follow it): the row stays, with the
    /// error, so a target judged on it reads MISS, or n/a for a baseline, with the reason, instead of
    /// "not measured".
    fn failed(&mut self, error: &anyhow::Error) {
        let (errors, first_error) = match self {
            Measured::Loop(cell) => (&mut cell.errors, &mut cell.first_error),
            Measured::Disk(cell) => (&mut cell.errors, &mut cell.first_error),
        };
        *errors += 1;
        first_error.get_or_insert_with(|| format!("{error:#}"));
    }

    /// The row of what was measured.
    fn row(self, system: &System, rate: u64, args: &Args) -> Row {
        match self {
            Measured::Loop(cell) => cell.row(system.name(), rate, &system.how(args), args),
            Measured::Disk(cell) => cell.row(rate, args),
        }
    }
}

impl System {
    fn name(&self) -> &str {
        match self {
            System::Bus(ctx) => &ctx.system,
            System::RawRedis(_) => baseline::REDIS_SYSTEM,
            System::Disk(_) => baseline::DISK,
        }
    }

    /// How this system's sends and reads are made, for its row's note.
    fn how(&self, args: &Args) -> String {
        match self {
            System::Bus(ctx) => scenarios::publish_note(ctx),
            System::RawRedis(_) => baseline::xadd_latency_note(args.pacing),
            System::Disk(_) => baseline::disk_note(),
        }
    }

    /// One slice of `duration` at `rate`; `tag` names its events (unique in the run).
    async fn slice(&self, args: &Args, rate: u64, tag: &str, duration: Duration) -> Result<Slice> {
        match self {
            System::Bus(ctx) => scenarios::latency_slice(ctx, rate, tag, duration).await,
            System::RawRedis(base) => base.xadd_latency(args, rate, tag, duration).await,
            System::Disk(_) => anyhow::bail!("the disk baseline has no open loop"),
        }
    }

    /// This system's slice of one round: an open loop after its warm-up, or the disk's writes.
    async fn measure(
        &self,
        args: &Args,
        rate: u64,
        round: usize,
        measured: &mut Measured,
    ) -> Result<()> {
        match (self, measured) {
            (System::Disk(disk), Measured::Disk(cell)) => {
                cell.add(disk.slice(slice_duration(args)).await?);
            }
            (_, Measured::Loop(cell)) => {
                if !args.warm_up.is_zero() {
                    let warm = self
                        .slice(args, rate, &format!("lat{rate}w{round}"), args.warm_up)
                        .await?;
                    cell.add_warm_up(&warm);
                }
                let slice = self
                    .slice(
                        args,
                        rate,
                        &format!("lat{rate}r{round}"),
                        slice_duration(args),
                    )
                    .await?;
                cell.add(slice);
            }
            (_, Measured::Disk(_)) => anyhow::bail!("an open loop measured as the disk"),
        }
        Ok(())
    }
}

/// Runs the latency scenario against `buses` (the Nerve servers) and, as `--baselines` asks, raw Redis
/// and the gRPC floors, which are started here and stopped at the end.
pub async fn run(
    args: &std::sync::Arc<Args>,
    buses: &[scenarios::Ctx],
    run_id: &str,
    report: &mut Report,
) {
    let mut systems = Vec::new();
    let mut redis_prefix = None;
    if args.baselines.contains(&BaselineArg::Redis) {
        match &args.redis_url {
            Some(url) => match baseline::RedisBase::new(url, run_id) {
                Ok(base) => {
                    redis_prefix = Some((url.clone(), base.prefix.clone()));
                    systems.push(System::RawRedis(base));
                }
                Err(e) => fail(report, "latency", baseline::REDIS_SYSTEM, e),
            },
            None => report
                .notes
                .push("no --redis-url / NERVE_TEST_REDIS_URL: raw Redis latency skipped".into()),
        }
    }
    if args.baselines.contains(&BaselineArg::Disk) {
        match baseline::DiskBase::new().await {
            Ok(disk) => systems.push(System::Disk(disk)),
            Err(e) => fail(report, "latency", baseline::DISK, e),
        }
    }
    // kept running until every round is done
    let mut floors = Vec::new();
    let mut floor_schema = None;
    if args.baselines.contains(&BaselineArg::Grpc) {
        let mut kinds = vec![floor::Durability::Memory, floor::Durability::Fdatasync];
        // the floor under the embedded backend's latency, where every event is a SQLite commit first
        if args.backends.contains(&BackendArg::Embedded) {
            kinds.push(floor::Durability::Sqlite);
        }
        // the floor under Postgres + Redis' latency, where every event is a Postgres commit first
        if args.backends.contains(&BackendArg::Postgres) {
            match &args.database_url {
                Some(url) => match floor::postgres_schema(url).await {
                    Ok((schema, floor_url)) => {
                        floor_schema = Some((url.clone(), schema));
                        kinds.push(floor::Durability::Postgres(floor_url));
                    }
                    Err(e) => fail(report, "latency", floor::POSTGRES_SYSTEM, e),
                },
                None => report.notes.push(format!(
                    "no --database-url / NERVE_TEST_DATABASE_URL: {} skipped",
                    floor::POSTGRES_SYSTEM
                )),
            }
        }
        for durability in kinds {
            progress(&format!("starting {}", durability.system()));
            match floor_system(args, &durability, run_id).await {
                Ok((process, ctx)) => {
                    floors.push(process);
                    systems.push(System::Bus(ctx));
                }
                Err(e) => fail(report, "latency", durability.system(), e),
            }
        }
    }
    systems.extend(buses.iter().map(|ctx| System::Bus(ctx.clone())));

    interleave(args, &systems, report).await;

    drop(systems);
    // killed before their scratch schema and keys go
    drop(floors);
    if let Some((url, schema)) = floor_schema
        && let Err(e) = server::drop_schema(&url, &schema).await
    {
        fail(
            report,
            "latency",
            floor::POSTGRES_SYSTEM,
            e.context("dropping the floor's scratch schema"),
        );
    }
    if let Some((url, prefix)) = redis_prefix
        && let Err(e) = server::delete_keys(&url, &prefix).await
    {
        fail(report, "latency", baseline::REDIS_SYSTEM, e);
    }
}

/// Starts a floor server in a process of its own and connects to it.
async fn floor_system(
    args: &std::sync::Arc<Args>,
    durability: &floor::Durability,
    run_id: &str,
) -> Result<(floor::FloorProcess, scenarios::Ctx)> {
    let process = floor::FloorProcess::spawn(durability).await?;
    let ctx = scenarios::Ctx::connect(
        &process.addr.to_string(),
        args,
        Some(process.pid),
        durability.system().to_owned(),
        run_id,
    )
    .await?;
    Ok((process, ctx))
}

/// The order of the systems in `round`: starting one further along each round, and backwards in odd
/// rounds, so that no system always follows the same one (whose leftover work, a relay's writes or a
/// database's checkpoint, would then always fall on it).
fn round_order(systems: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..systems).map(move |k| {
        let step = if round.is_multiple_of(2) {
            k
        } else {
            systems - k
        };
        (round + step) % systems
    })
}

/// Measures every rate in `--rounds` rounds; each round takes every system in turn ([`round_order`]).
/// A system that fails is reported and left out from then on.
async fn interleave(args: &Args, systems: &[System], report: &mut Report) {
    let rounds = args.rounds.max(1) as usize;
    let mut failed = vec![false; systems.len()];
    for &rate in &args.rates {
        let mut settles = DiskSettles::default();
        let mut cells: Vec<Measured> = systems
            .iter()
            .map(|system| match system {
                System::Disk(_) => Measured::Disk(DiskCell::default()),
                _ => Measured::Loop(Box::default()),
            })
            .collect();
        for round in 0..rounds {
            for i in round_order(systems.len(), round) {
                if failed[i] {
                    continue;
                }
                let system = &systems[i];
                progress(&format!(
                    "{}: latency at {rate}/s, round {} of {rounds}",
                    system.name(),
                    round + 1
                ));
                // what the system before wrote (a Postgres checkpoint's worth after a publish
                // matrix) would otherwise be flushed in this one's slice
                settles.settle().await;
                if let Err(e) = system.measure(args, rate, round, &mut cells[i]).await {
                    failed[i] = true;
                    cells[i].failed(&e);
                    fail(report, "latency", system.name(), e);
                }
            }
        }
        report
            .notes
            .extend(settles.note(&format!("the latency slices at {rate}/s (one before each)")));
        for (cell, system) in cells.into_iter().zip(systems) {
            report.rows.push(cell.row(system, rate, args));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(
        events: u64,
        delivered: u64,
        first_ns: u64,
        last_ns: u64,
        latency_ms: &[u64],
    ) -> Slice {
        let mut hist = Hist::new();
        for ms in latency_ms {
            hist.record_ns(ms * 1_000_000);
        }
        Slice {
            load: LoadResult {
                events,
                planned: events,
                sent: events,
                first_send_ns: Some(first_ns),
                ..LoadResult::default()
            },
            delivered,
            from_schedule: hist.clone(),
            hist,
            last_ns,
            reader_error: None,
            complete: delivered >= events,
            usage: Usage {
                server_cpu_pct: Some(50.0),
                wall_s: 1.0,
                ..Usage::default()
            },
        }
    }

    fn args() -> Args {
        use clap::Parser as _;
        Args::parse_from([
            "nerve-bench",
            "--duration",
            "4s",
            "--rounds",
            "2",
            "--warm-up",
            "100ms",
        ])
    }

    #[test]
    fn slices_merge_into_one_row_over_the_time_they_took() {
        let mut cell = Cell::default();
        cell.add_warm_up(&slice(10, 10, 0, 1, &[100]));
        cell.add(slice(100, 100, 1_000_000_000, 2_000_000_000, &[1, 1, 3]));
        cell.add(slice(300, 300, 5_000_000_000, 7_000_000_000, &[2, 4]));
        let row = cell.row("embedded", 100, "how", &args());
        assert_eq!(
            (row.events, row.planned, row.sent),
            (400, Some(400), Some(400))
        );
        // 400 deliveries over 1 s + 2 s: the gaps between slices are not counted
        assert_eq!(row.seconds, 3.0);
        assert!((row.rate - 400.0 / 3.0).abs() < 1e-9);
        let latency = row.latency.expect("latency of the measured slices");
        // the warm-up's 100 ms is not among them
        assert_eq!(latency.count, 5);
        assert!(latency.max_ms < 5.0, "{latency:?}");
        assert_eq!(row.usage.server_cpu_pct, Some(50.0));
        assert_eq!(row.errors, 0);
        assert!(
            row.note.starts_with("how; 2 interleaved slices of 2s, each after a 100ms warm-up; sent 400 of 400 planned"),
            "{}",
            row.note
        );
    }

    #[test]
    fn disk_slices_merge_into_one_row_named_for_their_rate() {
        let disk_slice = |latency_us: &[u64], seconds: f64| {
            let mut hist = Hist::new();
            for us in latency_us {
                hist.record_ns(us * 1_000);
            }
            baseline::DiskSlice {
                samples: latency_us.len() as u64,
                hist,
                seconds,
            }
        };
        let mut cell = DiskCell::default();
        cell.add(disk_slice(&[100, 100, 300], 1.0));
        cell.add(disk_slice(&[200], 0.5));
        let row = cell.row(10_000, &args());
        assert_eq!(
            (row.system.as_str(), row.case.as_str()),
            (baseline::DISK, "rate=10000/s")
        );
        assert_eq!((row.events, row.seconds), (4, 1.5));
        let latency = row.latency.expect("latency");
        assert_eq!(latency.count, 4);
        assert!((0.09..0.11).contains(&latency.p50_ms), "{latency:?}");
        assert!(
            row.note
                .ends_with("2 interleaved slices of 2s in the rounds of 10000/s, no warm-up"),
            "{}",
            row.note
        );
    }

    #[test]
    fn each_round_takes_every_system_once_and_changes_who_follows_whom() {
        let rounds: Vec<Vec<usize>> = (0..4).map(|r| round_order(4, r).collect()).collect();
        assert_eq!(rounds[0], [0, 1, 2, 3]);
        assert_eq!(rounds[1], [1, 0, 3, 2]);
        assert_eq!(rounds[2], [2, 3, 0, 1]);
        assert_eq!(rounds[3], [3, 2, 1, 0]);
        // over the rounds, system 0 follows different systems, not always the same one
        let before_0: std::collections::HashSet<usize> = rounds
            .iter()
            .filter_map(|order| {
                let at = order.iter().position(|&s| s == 0)?;
                at.checked_sub(1).map(|p| order[p])
            })
            .collect();
        assert_eq!(before_0, [1, 3].into(), "{rounds:?}");
        assert_eq!(round_order(1, 3).collect::<Vec<_>>(), [0]);
    }

    /// A round that failed (an open no Subscribed answered, say) keeps the system's row, with the
    /// error: a target judged on it is a MISS naming why, not a target "not measured".
    #[test]
    fn a_failed_round_keeps_the_row_and_its_error() {
        let mut cell = Measured::Loop(Box::default());
        if let Measured::Loop(c) = &mut cell {
            c.add(slice(100, 100, 0, 1_000_000_000, &[1]));
        }
        cell.failed(&anyhow::anyhow!("no Subscribed answer within 10 s"));
        let row = match cell {
            Measured::Loop(c) => c.row("embedded", 100, "how", &args()),
            Measured::Disk(_) => unreachable!("a loop cell"),
        };
        assert_eq!(row.errors, 1);
        assert_eq!(
            row.first_error.as_deref(),
            Some("no Subscribed answer within 10 s")
        );
        let (pass, why) = crate::judged(Some(true), Some(&row), &[]);
        assert_eq!(pass, Some(false), "{why}");
        assert!(why.contains("1 errors"), "{why}");
    }

    #[test]
    fn what_a_warm_up_or_a_slice_lost_is_an_error_of_the_row() {
        let mut cell = Cell::default();
        cell.add_warm_up(&slice(10, 7, 0, 1, &[1]));
        cell.add(slice(100, 100, 0, 1_000_000_000, &[1]));
        cell.add(slice(100, 98, 0, 1_000_000_000, &[1]));
        let row = cell.row("embedded", 100, "how", &args());
        assert_eq!(row.errors, 2);
        assert!(
            row.note.ends_with(
                "; 5 acknowledged events not delivered within 10 s of their slice's last send (CPU figures of such a slice cover its sending)"
            ),
            "{}",
            row.note
        );
    }
}
