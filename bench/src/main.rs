//! nerve-bench: drives a running Nerve and prints each figure as a ratio to a same-run baseline.
//!
//! By default it starts the real `nerve-server` binary (found next to this executable) once per backend
//! (embedded and Postgres + Redis, both running for the whole run), runs each scenario against each
//! server in turn over gRPC (the latency scenario takes the servers and its baselines in turn within
//! each round, `latency.rs`), measures the raw
//! baselines on the same Postgres and Redis and NATS JetStream as a peer, and prints one table per
//! scenario and the targets with PASS / MISS. It exits non-zero when a scenario fails (not when a target
//! is missed).

mod baseline;
mod floor;
mod latency;
mod nats;
mod procstat;
mod report;
mod scenarios;
mod server;
mod util;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Result;
use clap::{Parser, ValueEnum};
use serde::Serialize;
use sqlx::Connection as _;

use crate::{
    report::{Failure, Ratio, Report, Row, Target},
    server::{Backend, ServerProcess, redact},
    util::{fmt_rate, parse_duration},
};

/// The allocator nerve-server uses, configured alike (`no_thp`), so the gRPC floors (this
/// executable) allocate as a server would, and the client side costs the same for every system measured.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum BackendArg {
    /// SQLite + in-process streams (the default backend).
    Embedded,
    /// Postgres event store + Redis Streams (--database-url, --redis-url).
    Postgres,
}

/// How the open-loop scenarios (latency, fan-out, slow consumers) publish; one event per request either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum PublishVia {
    /// One PublishStream per connection, as a high-rate publisher does.
    Stream,
    /// One Publish call per event.
    Call,
}

/// When an open loop's sends leave (`--pacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Pacing {
    /// On the runtime's 1 ms timer: each wake sends what fell due since the last, 10-20 events at
    /// 10K/s. Cheap for the tool (a thousand wakes a second), bursty for the system measured.
    Tick,
    /// Evenly spaced, one per 1/rate (a timerfd): at 10K/s one send every 100 µs, and as many wakes
    /// of the tool.
    Even,
    /// At random times, as arrivals from many independent publishers come (a Poisson process with
    /// the planned count in the duration; a timerfd).
    Poisson,
}

/// Where the slow-consumer scenario's stalled reader starts (`--slow-stalled-start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum StalledStart {
    /// At the newest event: it is handed the second phase's events as they come.
    Latest,
    /// At the oldest: it also has the first phase's events, a backlog handed over in full runs.
    Earliest,
}

/// How the tool names the events it publishes (`--ids`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Ids {
    /// `<run>-<tag>-<n>`: unique to the run, and near one another in the key index, as ids that grow
    /// with time are.
    Tool,
    /// Random UUIDs (version 4), as publishers that make random ids send: each lands anywhere in the
    /// key index.
    Uuid4,
    /// UUIDv7 (the time, then random bits), the ids the Go and Python clients make by default.
    Uuid7,
}

impl Ids {
    /// One event's id: the tool's own name for it (`tool`), unless the scheme replaces it.
    pub fn name(self, tool: impl FnOnce() -> String) -> String {
        match self {
            Ids::Tool => tool(),
            Ids::Uuid4 => uuid::Uuid::new_v4().to_string(),
            Ids::Uuid7 => uuid::Uuid::now_v7().to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Scenario {
    /// Durable publish throughput, every batch size x publisher count.
    Publish,
    /// Publish -> deliver latency at fixed rates (open loop), one private subscriber.
    Latency,
    /// Fan-out of every event to --groups durable groups.
    Fanout,
    /// One subscriber drains a stored backlog (private stream, then a group).
    Drain,
    /// Slow consumers under load: the server RSS they add.
    Slow,
    /// Request / reply round trips.
    Request,
    /// Replay of --replay-events stored events.
    Replay,
    /// A durable group over every type of a bus that stores --wide-types types, one event at a time.
    Wide,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum BaselineArg {
    /// Raw inserts of the same rows into a scratch copy of the events table.
    Postgres,
    /// Raw pipelined XADD and XADD -> XREADGROUP latency.
    Redis,
    /// NATS JetStream (file storage, acks awaited).
    Nats,
    /// fdatasync after one 4 KiB write, in the temporary directory: the least a durable commit adds.
    Disk,
    /// The latency scenario against gRPC servers of Nerve's protocol that hand events on from
    /// memory: one stores nothing (what tonic, HTTP/2 and this tool cost before any bus work); one
    /// first group-commits them to a log file, a second thread fdatasyncing what was written before
    /// each sync (the least a durable bus over gRPC does); with embedded, one that commits to SQLite
    /// alike; with postgres, one that commits to Postgres.
    Grpc,
    /// No baselines.
    None,
}

/// Load tool for Nerve: throughput and latency, with same-run baselines on the same Postgres and Redis,
/// and NATS JetStream as a peer.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(version)]
pub struct Args {
    /// Backends to start nerve-server on; each runs for the whole run, and each scenario runs on each in turn.
    #[arg(long, value_delimiter = ',', default_value = "embedded,postgres")]
    pub backends: Vec<BackendArg>,
    /// Drive an already running Nerve at this address instead of starting servers.
    #[arg(long)]
    pub addr: Option<String>,
    /// With --addr: the server's pid, to read its CPU and RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The nerve-server binary (default: next to this executable).
    #[arg(long, env = "NERVE_BENCH_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
    /// Postgres for the postgres backend and the raw baselines (a scratch schema is created and dropped).
    #[arg(long, env = "NERVE_TEST_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Redis for the postgres backend and the raw baselines (scratch keys are deleted afterwards).
    #[arg(long, env = "NERVE_TEST_REDIS_URL")]
    pub redis_url: Option<String>,
    /// nats-server binary (default: PATH, /usr/sbin, ~/.cache/nerve-tools/bin).
    #[arg(long, env = "NERVE_BENCH_NATS_SERVER")]
    pub nats_server: Option<PathBuf>,
    /// Scenarios to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "publish,latency,fanout,drain,slow,request,replay,wide"
    )]
    pub scenarios: Vec<Scenario>,
    /// Baselines to measure ("none" for none).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "postgres,redis,nats,disk,grpc"
    )]
    pub baselines: Vec<BaselineArg>,
    /// Length of each measured cell (publish cells, latency rates, fan-out, request/reply).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    #[serde(with = "secs")]
    pub duration: Duration,
    /// The latency scenario measures each rate in this many rounds of --duration / N; each round takes
    /// every system (Nerve's servers, raw Redis, the gRPC floors) in turn, so that a host whose speed
    /// changes during the run slows them alike.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Before each measured slice of the latency scenario, the same open loop runs this long,
    /// unmeasured, on a subscription of its own ("0s": no warm-up).
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    #[serde(with = "secs")]
    pub warm_up: Duration,
    /// Concurrent publishers of the publish matrix.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub publishers: Vec<usize>,
    /// Events per Publish call of the publish matrix.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub batch_sizes: Vec<usize>,
    /// Offered rates (events/s) of the latency scenario.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pub rates: Vec<u64>,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 256)]
    pub payload_size: usize,
    /// HTTP/2 connections to the server (publishers and subscribers spread over them).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// How the open-loop scenarios publish.
    #[arg(long, value_enum, default_value = "stream")]
    pub publish_via: PublishVia,
    /// How events are named, in Nerve's cells and in the raw Postgres and NATS baselines alike.
    #[arg(long, value_enum, default_value = "tool")]
    pub ids: Ids,
    /// When the open loops' sends leave (latency, fan-out, slow consumers, and the raw XADD latency).
    #[arg(long, value_enum, default_value = "tick")]
    pub pacing: Pacing,
    /// Open loop: most publishes in flight before the schedule slips.
    #[arg(long, default_value_t = 4096)]
    pub max_outstanding: usize,
    /// Durable groups of the fan-out scenario.
    #[arg(long, default_value_t = 4)]
    pub groups: usize,
    /// Events/s published in the fan-out scenario.
    #[arg(long, default_value_t = 5000)]
    pub fanout_rate: u64,
    /// Backlog the drain scenario stores, then drains.
    #[arg(long, default_value_t = 200_000)]
    pub drain_events: u64,
    /// Length of each phase of the slow-consumer scenario.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(with = "secs")]
    pub slow_duration: Duration,
    /// Events/s published during the slow-consumer scenario.
    #[arg(long, default_value_t = 2000)]
    pub slow_rate: u64,
    /// Bytes of data per event in the slow-consumer scenario: at the defaults (2,000/s for 10 s) a
    /// phase publishes 320 MiB, five times the 64 MB the target allows, so a server that kept every
    /// event for the stalled reader would miss it.
    #[arg(long, default_value_t = 16_384)]
    pub slow_payload_size: usize,
    /// Window (`maxInFlight`) of each slow consumer: with a wide one and large events, what the
    /// server holds for the stalled reader shows (the window bounds deliveries, not their bytes).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub slow_window: u32,
    /// Where the stalled slow consumer starts.
    #[arg(long, value_enum, default_value = "latest")]
    pub slow_stalled_start: StalledStart,
    /// Concurrent requesters of the request/reply scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub rr_concurrency: Vec<usize>,
    /// Events the replay scenario stores, then replays.
    #[arg(long, default_value_t = 1_000_000)]
    pub replay_events: u64,
    /// Event types the wide scenario stores before its group over all of them opens.
    #[arg(long, default_value_t = 200)]
    pub wide_types: usize,
    /// Subscribers of the latency and fan-out scenarios use a server-side filter (prefix on subject,
    /// matching every event, so counts are unchanged and the filter's cost shows).
    #[arg(long)]
    pub filter: bool,
    /// Also write the results as JSON to this file ("-" for stdout; the tables then go to stderr).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Show every server log line.
    #[arg(long)]
    pub server_logs: bool,
    /// Serve the gRPC floor baseline (the tool starts itself with this; not for use by hand).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub serve_grpc_floor: bool,
    /// With --serve-grpc-floor: group-commit to a log file in this directory.
    #[arg(long, hide = true, group = "floor_storage")]
    #[serde(skip)]
    pub floor_log_dir: Option<PathBuf>,
    /// With --serve-grpc-floor: group-commit to a SQLite database in this directory.
    #[arg(long, hide = true, group = "floor_storage")]
    #[serde(skip)]
    pub floor_sqlite_dir: Option<PathBuf>,
    /// With --serve-grpc-floor: group-commit to Postgres, in the schema this URL selects.
    #[arg(long, hide = true, env = floor::FLOOR_DATABASE_URL, group = "floor_storage")]
    #[serde(skip)]
    pub floor_database_url: Option<String>,
}

impl Args {
    /// Where a floor server commits: clap's `floor_storage` group admits at most one of its flags.
    fn floor_storage(&self) -> floor::Storage<'_> {
        match (
            &self.floor_log_dir,
            &self.floor_sqlite_dir,
            &self.floor_database_url,
        ) {
            (Some(dir), _, _) => floor::Storage::Log(dir),
            (_, Some(dir), _) => floor::Storage::Sqlite(dir),
            (_, _, Some(url)) => floor::Storage::Postgres(url),
            (None, None, None) => floor::Storage::Memory,
        }
    }
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nerve-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.serve_grpc_floor {
        return match runtime.block_on(floor::serve(args.floor_storage())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nerve-bench: gRPC floor server: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nerve-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn progress(what: &str) {
    eprintln!("nerve-bench: {what}");
}

async fn run(args: Args) -> Result<ExitCode> {
    let args = Arc::new(args);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let mut report = Report {
        settings: settings_json(&args),
        ..Report::default()
    };
    let temp_dir = std::env::temp_dir();
    let filesystem = baseline::on_a_disk(&temp_dir)?;
    report.environment.push((
        "temporary directory (embedded data, NATS store, disk and floor files)".into(),
        format!("{} ({filesystem})", temp_dir.display()),
    ));
    environment(&mut report, &args).await;
    // the raw baseline's events table, to compare with the one nerve-server migrates in this run
    let mut baseline_shape = None;

    // baselines
    if args.baselines.contains(&BaselineArg::Postgres) {
        match &args.database_url {
            Some(url) => {
                progress("baseline: raw Postgres inserts");
                let max = args.publishers.iter().copied().max().unwrap_or(1) as u32;
                match baseline::Pg::create(url, max + 1).await {
                    Ok(pg) => {
                        report.environment.push((
                            "postgres (baseline connections)".into(),
                            pg.settings.clone(),
                        ));
                        baseline_shape = Some(pg.shape.clone());
                        if let Err(e) =
                            baseline::postgres_matrix(&pg, &args, &run_id, &mut report.rows).await
                        {
                            fail(&mut report, "baseline.postgres", "postgres (raw)", e);
                        }
                        if let Err(e) = pg.drop().await {
                            fail(
                                &mut report,
                                "baseline.postgres",
                                "postgres (raw)",
                                e.context("dropping the scratch schema"),
                            );
                        }
                    }
                    Err(e) => fail(&mut report, "baseline.postgres", "postgres (raw)", e),
                }
            }
            None => report.notes.push(
                "no --database-url / NERVE_TEST_DATABASE_URL: raw Postgres baselines skipped"
                    .into(),
            ),
        }
    }
    // raw Redis latency is measured with the latency scenario (`latency.rs`)
    if args.baselines.contains(&BaselineArg::Redis) && args.scenarios.contains(&Scenario::Publish) {
        match &args.redis_url {
            Some(url) => {
                progress("baseline: raw Redis XADD");
                if let Err(e) = redis_baselines(&args, url, &run_id, &mut report).await {
                    fail(&mut report, "baseline.redis", REDIS, e);
                }
            }
            None => report
                .notes
                .push("no --redis-url / NERVE_TEST_REDIS_URL: raw Redis baselines skipped".into()),
        }
    }
    if args.baselines.contains(&BaselineArg::Nats) && args.scenarios.contains(&Scenario::Publish) {
        nats_comparison(&args, &run_id, &mut report).await;
    }

    report.environment.push((
        "nerve-bench".into(),
        // the gRPC floors run in this executable, so its profile decides theirs
        if cfg!(debug_assertions) {
            "debug build (no target is judged, and the gRPC floors are not shown as floors)".into()
        } else {
            "release build".into()
        },
    ));

    // Nerve: every server is started first and runs until the end, so that the latency scenario can
    // take them in turn with its baselines
    let mut servers = Vec::new();
    let mut buses = Vec::new();
    if let Some(addr) = &args.addr {
        buses.push(
            scenarios::Ctx::connect(
                addr,
                &args,
                args.server_pid,
                format!("nerve@{addr}"),
                &run_id,
            )
            .await?,
        );
    } else {
        let binary = server::find_binary(args.server_bin.clone())?;
        report.environment.push((
            "nerve-server".into(),
            format!(
                "{} ({})",
                binary.display(),
                // the cargo profile directory tells; a copied binary elsewhere does not
                match binary.to_string_lossy() {
                    p if p.contains("/release/") => "release build",
                    p if p.contains("/debug/") => "debug build",
                    _ => "build profile not known from its path",
                }
            ),
        ));
        for backend in &args.backends {
            let backend = match backend {
                BackendArg::Embedded => Backend::Embedded,
                BackendArg::Postgres => Backend::Production,
            };
            if let Some((server, ctx)) = start_server(
                &args,
                &binary,
                backend,
                &baseline_shape,
                &run_id,
                &mut report,
            )
            .await
            {
                servers.push(server);
                buses.push(ctx);
            }
        }
    }
    let mut settles = util::DiskSettles::default();
    for scenario in &args.scenarios {
        if *scenario == Scenario::Latency {
            latency::run(&args, &buses, &run_id, &mut report).await;
        } else {
            for ctx in &buses {
                settles.settle().await;
                run_scenario(ctx, *scenario, &mut report).await;
            }
        }
    }
    report
        .notes
        .extend(settles.note("every other scenario on each server"));
    for (server, ctx) in servers.into_iter().zip(&buses) {
        if let Err(e) = server.stop().await {
            fail(&mut report, "stop", &ctx.system, e);
        }
    }

    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        report.environment.push((
            "load average at end (1/5/15 min)".into(),
            l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        ));
    }
    compare(&mut report, !cfg!(debug_assertions));
    let mut text = String::new();
    report::print_tables(&mut text, &report);
    report::print_summary(&mut text, &report);
    let to_stdout_json = args.json.as_deref().is_some_and(|p| p.as_os_str() == "-");
    if to_stdout_json {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        if to_stdout_json {
            println!("{json}");
        } else {
            std::fs::write(path, json)?;
        }
    }
    let errored = !report.failures.is_empty() || report.rows.iter().any(|r| r.errors > 0);
    if errored {
        eprintln!("nerve-bench: some scenarios failed or had errors (see above)");
        Ok(ExitCode::FAILURE)
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// Checks that the raw baseline's events table (`expected`, [`baseline::events_table_shape`]) is the one
/// nerve-server migrated in `schema`: the same columns and the same indexes.
async fn same_events_table(expected: &[String], database_url: &str, schema: &str) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(database_url).await?;
    let nerve = baseline::events_table_shape(&mut conn, schema).await?;
    let _ = conn.close().await;
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|x| !b.contains(x)).cloned().collect()
    };
    let (raw_only, nerve_only) = (only(expected, &nerve), only(&nerve, expected));
    if raw_only.is_empty() && nerve_only.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the raw baseline's events table is not nerve-server's: only in the baseline's {raw_only:?}, \
         only in nerve-server's {nerve_only:?}"
    )
}

/// Starts nerve-server on `backend` and connects to it; a failure is reported and gives `None`.
async fn start_server(
    args: &Arc<Args>,
    binary: &std::path::Path,
    backend: Backend,
    baseline_shape: &Option<Vec<String>>,
    run_id: &str,
    report: &mut Report,
) -> Option<(ServerProcess, scenarios::Ctx)> {
    progress(&format!("starting nerve-server ({})", backend.name()));
    let server = match ServerProcess::spawn(
        binary,
        backend,
        args.database_url.as_deref(),
        args.redis_url.as_deref(),
        args.server_logs,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            fail(report, "start", backend.name(), e);
            return None;
        }
    };
    if let Some(settings) = &server.commit_settings {
        report.environment.push((
            "postgres (nerve-server's connections)".into(),
            settings.clone(),
        ));
    }
    if let (Some(expected), Some((url, schema))) = (baseline_shape, server.store_schema())
        && let Err(e) = same_events_table(expected, url, schema).await
    {
        fail(report, "baseline.postgres", PG, e);
    }
    let system = backend.name().to_owned();
    match scenarios::Ctx::connect(
        &server.addr.to_string(),
        args,
        Some(server.pid),
        system,
        run_id,
    )
    .await
    {
        Ok(ctx) => Some((server, ctx)),
        Err(e) => {
            fail(report, "connect", backend.name(), e);
            if let Err(e) = server.stop().await {
                fail(report, "stop", backend.name(), e);
            }
            None
        }
    }
}

fn fail(report: &mut Report, scenario: &str, system: &str, e: anyhow::Error) {
    eprintln!("nerve-bench: {system} / {scenario} failed: {e:#}");
    report.failures.push(Failure {
        scenario: scenario.to_owned(),
        system: system.to_owned(),
        error: format!("{e:#}"),
    });
}

/// Runs one scenario other than latency (which takes every server at once, `latency.rs`) on one server.
async fn run_scenario(ctx: &scenarios::Ctx, scenario: Scenario, report: &mut Report) {
    progress(&format!("{}: {scenario:?}", ctx.system));
    let outcome = match scenario {
        Scenario::Publish => scenarios::publish(ctx, &mut report.rows).await,
        // measured for every server at once, with its baselines, by `latency::run`
        Scenario::Latency => return,
        Scenario::Fanout => scenarios::fanout(ctx, &mut report.rows).await,
        Scenario::Drain => scenarios::drain(ctx, &mut report.rows).await,
        Scenario::Slow => scenarios::slow(ctx, &mut report.rows).await,
        Scenario::Request => scenarios::request_reply(ctx, &mut report.rows).await,
        Scenario::Replay => scenarios::replay(ctx, &mut report.rows).await,
        Scenario::Wide => scenarios::wide_group(ctx, &mut report.rows).await,
    };
    if let Err(e) = outcome {
        fail(
            report,
            &format!("{scenario:?}").to_lowercase(),
            &ctx.system,
            e,
        );
    }
}

async fn redis_baselines(args: &Args, url: &str, run: &str, report: &mut Report) -> Result<()> {
    let base = baseline::RedisBase::new(url, run)?;
    let outcome = base
        .xadd_pipelined(4, 100, args.duration, args.payload_size)
        .await
        .map(|row| report.rows.push(row));
    server::delete_keys(url, &base.prefix).await?;
    outcome
}

async fn nats_comparison(args: &Args, run: &str, report: &mut Report) {
    let Some(binary) = nats::find_binary(args.nats_server.clone()) else {
        let msg = "nats-server not found (apt-get install nats-server, or pass --nats-server): NATS JetStream comparison skipped";
        eprintln!("nerve-bench: {msg}");
        report.notes.push(msg.into());
        return;
    };
    let version = nats::version(&binary);
    report.environment.push((
        "nats-server".into(),
        format!(
            "{} ({})",
            binary.display(),
            version.as_ref().map_or("unknown version", |v| v.2.as_str())
        ),
    ));
    // sync_interval (fsync before every ack) exists from 2.10 on
    let supports_sync = version
        .as_ref()
        .is_some_and(|(ma, mi, _)| (*ma, *mi) >= (2, 10));
    let mut modes = vec![(false, "nats (file)")];
    if supports_sync {
        modes.push((true, "nats (file, fsync always)"));
    } else {
        report.notes.push(
            "nats-server < 2.10 has no sync_interval: only its default mode (no fsync before acks) is measured".into(),
        );
    }
    for (sync, label) in modes {
        progress(&format!("peer: {label}"));
        let outcome = async {
            let server = nats::NatsServer::start(&binary, sync).await?;
            let r = nats::publish_matrix(&server, label, args, run, &mut report.rows).await;
            server.stop().await;
            r
        }
        .await;
        if let Err(e) = outcome {
            fail(report, "publish", label, e);
        }
    }
}

fn settings_json(args: &Args) -> serde_json::Value {
    let mut value = serde_json::to_value(args).unwrap_or_default();
    for key in ["database_url", "redis_url"] {
        if let Some(v) = value.get_mut(key)
            && let Some(s) = v.as_str()
        {
            *v = serde_json::Value::String(redact(s));
        }
    }
    value
}

async fn environment(report: &mut Report, args: &Args) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    report
        .environment
        .push(("cpus".into(), format!("{cpus} x {model}")));
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        report.environment.push((
            "load average at start (1/5/15 min)".into(),
            l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        ));
    }
    if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        report
            .environment
            .push(("kernel".into(), k.trim().to_owned()));
    }
    if let Some(url) = &args.database_url {
        use sqlx::Connection as _;
        if let Ok(mut c) = sqlx::PgConnection::connect(url).await
            && let Ok((v, f, s)) = sqlx::query_as::<_, (String, String, String)>(
                "SELECT version(), current_setting('fsync'), current_setting('synchronous_commit')",
            )
            .fetch_one(&mut c)
            .await
        {
            report.environment.push((
                "postgres".into(),
                format!(
                    "{} (fsync={f}, synchronous_commit={s})",
                    v.split(" on ").next().unwrap_or(&v)
                ),
            ));
        }
    }
    if let Some(url) = &args.redis_url
        && let Ok(client) = redis::Client::open(url.as_str())
        && let Ok(mut c) = client.get_multiplexed_async_connection().await
        && let Ok(info) = redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut c)
            .await
        && let Some(v) = info.lines().find_map(|l| l.strip_prefix("redis_version:"))
    {
        report
            .environment
            .push(("redis".into(), v.trim().to_owned()));
    }
    for (k, v) in &report.environment {
        progress(&format!("{k}: {v}"));
    }
}

fn find<'a>(rows: &'a [Row], scenario: &str, system: &str, case: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.system == system && r.case == case)
}

/// The fastest of the matching cells, among the complete ones when there are any ([`incomplete`]):
/// a cell that had errors cannot be the best, and one is picked only when no other is left, for
/// [`judged`] to refuse.
fn best<'a>(
    rows: &'a [Row],
    scenario: &str,
    system: &str,
    pred: impl Fn(&Row) -> bool,
) -> Option<&'a Row> {
    let matching = rows
        .iter()
        .filter(|r| r.scenario == scenario && r.system == system && pred(r));
    let by_rate = |a: &&Row, b: &&Row| a.rate.total_cmp(&b.rate);
    matching
        .clone()
        .filter(|r| incomplete(r).is_none())
        .max_by(by_rate)
        .or_else(|| matching.max_by(by_rate))
}

fn batch_of(r: &Row) -> Option<usize> {
    r.case
        .split_whitespace()
        .find_map(|p| p.strip_prefix("batch="))
        .and_then(|v| v.parse().ok())
}

fn publishers_of(r: &Row) -> Option<usize> {
    r.case
        .split_whitespace()
        .find_map(|p| p.strip_prefix("publishers="))
        .and_then(|v| v.parse().ok())
}

const PG: &str = "postgres (raw)";
const REDIS: &str = baseline::REDIS_SYSTEM;
const NATS: &str = "nats (file)";
const NATS_SYNC: &str = "nats (file, fsync always)";

/// A floor's own verdict, printed right after it: "out of reach on this machine" when the floor,
/// measured in the same run, misses the target alone. Every floor gets one, so where two are printed
/// neither verdict can be read as the other's.
fn verdict(floor: f64, within: impl Fn(f64) -> bool) -> &'static str {
    if within(floor) {
        ", within reach"
    } else {
        ", out of reach on this machine"
    }
}

/// The least a durable publish -> deliver p50 can be on this machine without gRPC, from the same run:
/// the raw Redis hand-off (no durability) plus one fdatasync, with its verdict on the 0.5 ms target.
fn durable_floor(raw: Option<util::Latency>, sync: Option<util::Latency>) -> Option<String> {
    let (Some(raw), Some(sync)) = (raw, sync) else {
        return None;
    };
    let floor = raw.p50_ms + sync.p50_ms;
    Some(format!(
        "raw XADD->XREADGROUP {:.3} + fdatasync {:.3} = {:.3} ms{}",
        raw.p50_ms,
        sync.p50_ms,
        floor,
        verdict(floor, |f| f <= 0.5)
    ))
}

/// Why a cell cannot carry a verdict: it had errors, or its open loop sent fewer events than it
/// planned (the system did not keep up). None for a complete cell.
fn incomplete(r: &Row) -> Option<String> {
    let mut why = Vec::new();
    if r.errors > 0 {
        why.push(format!("{} errors", r.errors));
    }
    if let (Some(sent), Some(planned)) = (r.sent, r.planned)
        && sent < planned
    {
        why.push(format!("sent {sent} of {planned} planned"));
    }
    (!why.is_empty()).then(|| format!("{}: {}", r.system, why.join(", ")))
}

/// A target's verdict, given whether its figure meets it (`pass`), and the text appended to its
/// measurement: a MISS when Nerve's own cell is incomplete (a cell that lost events or fell short of
/// its plan cannot pass), none (n/a) when a baseline it is compared with is, with the reason either way.
fn judged(
    pass: Option<bool>,
    nerve: Option<&Row>,
    baselines: &[Option<&Row>],
) -> (Option<bool>, String) {
    if let Some(why) = nerve.and_then(incomplete) {
        return (Some(false), format!("; incomplete cell ({why})"));
    }
    let why: Vec<String> = baselines
        .iter()
        .flatten()
        .filter_map(|r| incomplete(r))
        .collect();
    if !why.is_empty() {
        return (
            None,
            format!(
                "; not judged: incomplete baseline cell ({})",
                why.join("; ")
            ),
        );
    }
    (pass, String::new())
}

/// " (floor: A)" or " (floors: A; B)", or nothing without a floor.
fn floors_note(parts: Vec<String>) -> String {
    match parts.len() {
        0 => String::new(),
        1 => format!(" (floor: {})", parts[0]),
        _ => format!(" (floors: {})", parts.join("; ")),
    }
}

/// Host CPU steal (percent) from which a latency target names it: its cell ran on a disturbed host.
const STEAL_NOTICE_PCT: f64 = 5.0;

/// "; host CPU steal N % in the cell of X" for each cell the target compares that ran with at least
/// [`STEAL_NOTICE_PCT`] of the host's CPU time taken by other guests.
fn steal_note(cells: &[Option<&Row>]) -> String {
    cells
        .iter()
        .flatten()
        .filter_map(|r| {
            r.usage
                .steal_pct
                .filter(|s| *s >= STEAL_NOTICE_PCT)
                .map(|s| format!("; host CPU steal {s:.0} % in the cell of {}", r.system))
        })
        .collect()
}

/// Every system measured as a baseline or peer, not as Nerve.
const BASELINES: [&str; 10] = [
    PG,
    baseline::PG_SERIAL,
    REDIS,
    NATS,
    NATS_SYNC,
    baseline::DISK,
    floor::SYSTEM,
    floor::DURABLE_SYSTEM,
    floor::SQLITE_SYSTEM,
    floor::POSTGRES_SYSTEM,
];

/// Adds the ratios to baselines and evaluates the targets. The baselines and the gRPC floors run in
/// this executable, so only an `optimized` one judges a target or shows one out of reach.
fn compare(report: &mut Report, optimized: bool) {
    let baseline_rows: Vec<Row> = report
        .rows
        .iter()
        .filter(|r| BASELINES.contains(&r.system.as_str()))
        .cloned()
        .collect();
    let xadd = baseline_rows
        .iter()
        .find(|r| r.scenario == "redis XADD")
        .map(|r| r.rate);
    let nerve_systems: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in &report.rows {
            if !BASELINES.contains(&r.system.as_str()) && !v.contains(&r.system) {
                v.push(r.system.clone());
            }
        }
        v
    };
    let nerve_max_batch = report
        .rows
        .iter()
        .filter(|r| r.scenario == "publish" && !BASELINES.contains(&r.system.as_str()))
        .filter_map(batch_of)
        .max();
    for row in report.rows.iter_mut() {
        if BASELINES.contains(&row.system.as_str()) {
            continue;
        }
        match row.scenario.as_str() {
            "publish" => {
                for base in [PG, NATS, NATS_SYNC] {
                    if let Some(b) = find(&baseline_rows, "publish", base, &row.case)
                        && b.rate > 0.0
                    {
                        row.ratios.push(Ratio {
                            against: base.to_owned(),
                            ratio: row.rate / b.rate,
                        });
                    }
                }
                // the one-writer row holds a whole group commit of the largest cell
                if let Some(serial) = baseline_rows
                    .iter()
                    .find(|b| b.system == baseline::PG_SERIAL && b.rate > 0.0)
                    && batch_of(row) == nerve_max_batch
                {
                    row.ratios.push(Ratio {
                        against: baseline::PG_SERIAL.to_owned(),
                        ratio: row.rate / serial.rate,
                    });
                }
                if row.system == Backend::Production.name()
                    && let Some(x) = xadd.filter(|x| *x > 0.0)
                {
                    row.ratios.push(Ratio {
                        against: "redis XADD pipelined".into(),
                        ratio: row.rate / x,
                    });
                }
            }
            "latency" => {
                if let (Some(b), Some(l)) = (
                    find(&baseline_rows, "latency", REDIS, &row.case).and_then(|b| b.latency),
                    row.latency,
                ) {
                    if b.p50_ms > 0.0 {
                        row.ratios.push(Ratio {
                            against: "p50 of redis XADD->XREADGROUP".into(),
                            ratio: l.p50_ms / b.p50_ms,
                        });
                    }
                    if b.p99_ms > 0.0 {
                        row.ratios.push(Ratio {
                            against: "p99 of redis".into(),
                            ratio: l.p99_ms / b.p99_ms,
                        });
                    }
                }
            }
            _ => {}
        }
    }

    let rows = report.rows.clone();
    let max_batch = nerve_max_batch;
    let max_publishers = rows
        .iter()
        .filter(|r| r.scenario == "publish" && !BASELINES.contains(&r.system.as_str()))
        .filter_map(publishers_of)
        .max();
    let rate = |v: f64| format!("{} ev/s", fmt_rate(v));
    for system in nerve_systems {
        let mut add = |name: &str, measured: String, required: String, pass: Option<bool>| {
            report.targets.push(Target {
                system: system.clone(),
                name: name.to_owned(),
                measured,
                required,
                pass,
            });
        };
        // batched durable publish vs raw batched insert, each at its best publisher count
        match max_batch.filter(|b| *b > 1) {
            Some(b) => {
                let n = best(&rows, "publish", &system, |r| batch_of(r) == Some(b));
                let p = best(&rows, "publish", PG, |r| batch_of(r) == Some(b));
                match (n, p) {
                    (Some(n), Some(p)) if p.rate > 0.0 => {
                        let (pass, why) = judged(Some(n.rate / p.rate >= 0.6), Some(n), &[Some(p)]);
                        add(
                            &format!("batched publish (batch {b}) vs raw batched Postgres insert"),
                            format!(
                                "{} ({}) = {:.2}x raw {} ({}){why}",
                                rate(n.rate),
                                n.case,
                                n.rate / p.rate,
                                rate(p.rate),
                                p.case
                            ),
                            ">= 0.6x".into(),
                            pass,
                        )
                    }
                    _ => add(
                        "batched publish vs raw batched Postgres insert",
                        "not measured".into(),
                        ">= 0.6x".into(),
                        None,
                    ),
                }
            }
            None => add(
                "batched publish vs raw batched Postgres insert",
                "no batch > 1 measured".into(),
                ">= 0.6x".into(),
                None,
            ),
        }
        // one event per RPC, most publishers, vs single-row sync commit from one connection
        let single = max_publishers.and_then(|p| {
            find(
                &rows,
                "publish",
                &system,
                &format!("batch=1 publishers={p}"),
            )
        });
        let raw_single = find(&rows, "publish", PG, "batch=1 publishers=1");
        match (single, raw_single) {
            (Some(n), Some(p)) if p.rate > 0.0 => {
                let (pass, why) = judged(Some(n.rate / p.rate >= 2.0), Some(n), &[Some(p)]);
                add(
                    "1 event/RPC at most publishers vs raw single-row sync commit",
                    format!(
                        "{} ({}) = {:.2}x raw {} (1 connection; the verdict's){}{why}",
                        rate(n.rate),
                        n.case,
                        n.rate / p.rate,
                        rate(p.rate),
                        // informative: as many connections, each committing its own rows, where
                        // Postgres' own WAL group flush shares the syncs
                        publishers_of(n)
                            .filter(|&c| c > 1)
                            .and_then(|c| find(
                                &rows,
                                "publish",
                                PG,
                                &format!("batch=1 publishers={c}")
                            ))
                            .filter(|r| r.rate > 0.0)
                            .map_or(String::new(), |r| format!(
                                "; {:.2}x raw {} ({} connections)",
                                n.rate / r.rate,
                                rate(r.rate),
                                publishers_of(r).unwrap_or(0)
                            ))
                    ),
                    ">= 2x".into(),
                    pass,
                )
            }
            _ => add(
                "1 event/RPC at most publishers vs raw single-row sync commit",
                "not measured".into(),
                ">= 2x".into(),
                None,
            ),
        }
        // latency at 10K/s
        let lat = find(&rows, "latency", &system, "rate=10000/s");
        let lat_l = lat.and_then(|r| r.latency);
        // measured in the same rounds as raw Redis' and Nerve's cells at this rate
        let sync_l = find(&rows, "latency", baseline::DISK, "rate=10000/s").and_then(|r| r.latency);
        // the least durable buses over gRPC on the same storage, at the same rate; only a complete run
        // of an optimized build can show a target out of reach. Embedded has two: the least durable
        // log (fdatasync), and the least one that is a SQLite table, as its own is.
        let floor_systems: &[&str] = if system == Backend::Production.name() {
            &[floor::POSTGRES_SYSTEM]
        } else {
            &[floor::DURABLE_SYSTEM, floor::SQLITE_SYSTEM]
        };
        let floors: Vec<(&str, &Row, util::Latency)> = floor_systems
            .iter()
            .filter_map(|&f| {
                let row = find(&rows, "latency", f, "rate=10000/s")
                    .filter(|r| incomplete(r).is_none() && optimized)?;
                Some((f, row, row.latency?))
            })
            .collect();
        let floor_rows: Vec<Option<&Row>> = floors.iter().map(|&(_, r, _)| Some(r)).collect();
        // each gRPC floor's part, e.g. "A p99 1.0 ms, within reach"
        let floor_parts = |part: &dyn Fn(&str, util::Latency) -> String| -> Vec<String> {
            floors.iter().map(|&(f, _, l)| part(f, l)).collect()
        };
        // " (floors: A p99 1.0 ms, within reach; B p99 2.5 ms, out of reach on this machine)"
        let floor_note =
            |part: &dyn Fn(&str, util::Latency) -> String| floors_note(floor_parts(part));
        let raw = find(&rows, "latency", REDIS, "rate=10000/s");
        let raw_l = raw.and_then(|r| r.latency);
        // a floor is only drawn from a complete cell
        let raw_floor_l = raw
            .filter(|r| incomplete(r).is_none())
            .and_then(|r| r.latency);
        let (p50_pass, p50_why) = judged(lat_l.map(|l| l.p50_ms <= 0.5), lat, &[]);
        add(
            "publish->deliver p50 at 10K/s",
            lat_l.map_or(format!("not measured{p50_why}"), |l| {
                // without gRPC (raw Redis + fdatasync), then the least durable buses over gRPC
                let parts = durable_floor(raw_floor_l, sync_l)
                    .into_iter()
                    .chain(floor_parts(&|f, fl| {
                        format!(
                            "{f} p50 {:.3} ms{}",
                            fl.p50_ms,
                            verdict(fl.p50_ms, |p| p <= 0.5)
                        )
                    }))
                    .collect();
                let cells: Vec<Option<&Row>> =
                    [lat, raw].into_iter().chain(floor_rows.clone()).collect();
                format!(
                    "{:.3} ms{}{}{p50_why}",
                    l.p50_ms,
                    floors_note(parts),
                    steal_note(&cells)
                )
            }),
            "<= 0.5 ms".into(),
            p50_pass,
        );
        let (p99_pass, p99_why) = judged(lat_l.map(|l| l.p99_ms <= 2.0), lat, &[]);
        add(
            "publish->deliver p99 at 10K/s",
            lat_l.map_or(format!("not measured{p99_why}"), |l| {
                let floor = floor_note(&|f, fl| {
                    format!(
                        "{f} p99 {:.3} ms{}",
                        fl.p99_ms,
                        verdict(fl.p99_ms, |p| p <= 2.0)
                    )
                });
                let cells: Vec<Option<&Row>> =
                    [lat].into_iter().chain(floor_rows.clone()).collect();
                format!("{:.3} ms{floor}{}{p99_why}", l.p99_ms, steal_note(&cells))
            }),
            "<= 2 ms".into(),
            p99_pass,
        );
        match (lat_l, raw_l) {
            (Some(l), Some(b)) if b.p50_ms > 0.0 => {
                let (pass, why) = judged(Some(l.p50_ms / b.p50_ms <= 3.0), lat, &[raw]);
                add(
                    "publish->deliver p50 at 10K/s vs raw XADD->XREADGROUP p50",
                    format!(
                        "{:.3} ms = {:.2}x raw {:.3} ms{}{}{why}",
                        l.p50_ms,
                        l.p50_ms / b.p50_ms,
                        b.p50_ms,
                        floor_note(&|f, fl| format!(
                            "{f} p50 {:.3} ms = {:.2}x raw{}",
                            fl.p50_ms,
                            fl.p50_ms / b.p50_ms,
                            verdict(fl.p50_ms / b.p50_ms, |r| r <= 3.0)
                        )),
                        steal_note(
                            &[lat, raw]
                                .into_iter()
                                .chain(floor_rows.clone())
                                .collect::<Vec<_>>()
                        )
                    ),
                    "<= 3x".into(),
                    pass,
                )
            }
            _ => add(
                "publish->deliver p50 at 10K/s vs raw XADD->XREADGROUP p50",
                "not measured".into(),
                "<= 3x".into(),
                None,
            ),
        }
        for case in ["private stream, backlog", "durable group, backlog"] {
            let d = find(&rows, "drain", &system, case);
            add(
                &format!("one subscriber drains ({case})"),
                d.map_or("not measured".into(), |r| rate(r.rate)),
                ">= 100,000 ev/s".into(),
                d.map(|r| r.rate >= 100_000.0 && r.errors == 0),
            );
        }
        let slow = rows.iter().find(|r| {
            r.scenario == "slow consumer" && r.system == system && r.rss_added_mb.is_some()
        });
        // signed, judged as it is: below zero, the second phase peaked lower than the first
        let added = slow.and_then(|r| r.rss_added_mb);
        let (pass, why) = judged(added.map(|v| v < 64.0), slow, &[]);
        add(
            "slow consumers add server RSS",
            added.map_or("not measured".into(), |v| format!("{v:+.1} MB{why}")),
            "< 64 MB".into(),
            pass,
        );
        // on Postgres + Redis every event is a Postgres row: the raw insert of the same rows shows
        // how far Postgres itself gets on this machine
        let raw_insert = (system == Backend::Production.name())
            .then(|| best(&rows, "publish", PG, |_| true))
            .flatten();
        for base in [NATS, NATS_SYNC] {
            let n = best(&rows, "publish", &system, |_| true);
            let j = best(&rows, "publish", base, |_| true);
            if let (Some(n), Some(j)) = (n, j) {
                if j.rate > 0.0 {
                    // it explains only the comparison with NATS' default mode, which Postgres misses
                    let postgres = raw_insert
                        .filter(|_| base == NATS)
                        .map_or(String::new(), |p| {
                            format!(
                                " (raw Postgres insert of the same rows, best cell: {} = {:.2}x)",
                                rate(p.rate),
                                p.rate / j.rate
                            )
                        });
                    let (pass, why) = judged(Some(n.rate / j.rate > 1.0), Some(n), &[Some(j)]);
                    add(
                        &format!("best durable publish vs {base}"),
                        format!(
                            "{} ({}) = {:.2}x {} ({}){postgres}{why}",
                            rate(n.rate),
                            n.case,
                            n.rate / j.rate,
                            rate(j.rate),
                            j.case
                        ),
                        "> 1x".into(),
                        pass,
                    );
                }
            } else {
                // the fsync-always mode is the target: a nats-server before 2.10 cannot run
                // it, and the line says so instead of going missing
                add(
                    &format!("best durable publish vs {base}"),
                    "not measured".into(),
                    "> 1x".into(),
                    None,
                );
            }
        }
    }
    if !optimized {
        // the baselines and the tool's own clients run unoptimized in this executable: a figure
        // against them says nothing of the machine
        for target in &mut report.targets {
            if target.pass.take().is_some() {
                target
                    .measured
                    .push_str("; not judged: a debug build of nerve-bench");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_named_by_the_scheme_asked_for() {
        assert_eq!(Ids::Tool.name(|| "run-lat-7".into()), "run-lat-7");
        for (ids, version) in [(Ids::Uuid4, 4), (Ids::Uuid7, 7)] {
            let id = ids.name(|| unreachable!("a UUID scheme does not use the tool's name"));
            let parsed = uuid::Uuid::parse_str(&id).expect("a UUID");
            assert_eq!(parsed.get_version_num(), version, "{id}");
        }
    }

    fn publish(system: &str, case: &str, rate: f64) -> Row {
        let mut row = Row::new("publish", system, case);
        row.rate = rate;
        row
    }

    #[test]
    fn throughput_targets_judge_complete_cells_and_refuse_incomplete_ones() {
        let failed = |mut row: Row| {
            row.errors = 3;
            row
        };
        let mut report = Report {
            rows: vec![
                // a baseline cell that lost calls is not the best, however fast it looks
                failed(publish(PG, "batch=100 publishers=64", 90_000.0)),
                publish(PG, "batch=100 publishers=16", 50_000.0),
                publish(PG, "batch=1 publishers=1", 1_000.0),
                // and Nerve's: its complete cell is judged, or its incomplete one refused
                failed(publish("embedded", "batch=100 publishers=64", 80_000.0)),
                publish("embedded", "batch=100 publishers=16", 40_000.0),
                failed(publish("embedded", "batch=1 publishers=64", 9_000.0)),
                publish(NATS, "batch=100 publishers=64", 45_000.0),
            ],
            ..Report::default()
        };
        compare(&mut report, true);
        let target = |name: &str| {
            report
                .targets
                .iter()
                .find(|t| t.system == "embedded" && t.name.starts_with(name))
                .unwrap_or_else(|| panic!("no target {name}"))
        };
        let batched = target("batched publish");
        assert_eq!(batched.pass, Some(true), "{}", batched.measured);
        assert!(
            batched
                .measured
                .starts_with("40,000 ev/s (batch=100 publishers=16) = 0.80x raw 50,000"),
            "{}",
            batched.measured
        );
        let single = target("1 event/RPC");
        assert_eq!(single.pass, Some(false), "{}", single.measured);
        assert!(
            single.measured.contains("incomplete cell"),
            "{}",
            single.measured
        );
        let nats = target("best durable publish vs nats (file)");
        assert_eq!(nats.pass, Some(false), "{}", nats.measured);
        assert!(
            nats.measured.starts_with("40,000 ev/s"),
            "{}",
            nats.measured
        );
        // no fsync-always cell (a nats-server before 2.10): its target is there, not measured
        let nats_sync = target("best durable publish vs nats (file, fsync always)");
        assert_eq!(
            (nats_sync.pass, nats_sync.measured.as_str()),
            (None, "not measured")
        );
    }

    #[test]
    fn the_nats_target_of_postgres_names_the_raw_insert_rate_of_the_same_run() {
        let mut report = Report {
            rows: vec![
                publish(PG, "batch=100 publishers=16", 55_000.0),
                publish(PG, "batch=100 publishers=64", 40_000.0),
                publish(NATS, "batch=100 publishers=64", 85_000.0),
                publish("embedded", "batch=100 publishers=64", 90_000.0),
                publish("postgres+redis", "batch=100 publishers=64", 50_000.0),
            ],
            ..Report::default()
        };
        compare(&mut report, true);
        let measured = |system: &str| {
            report
                .targets
                .iter()
                .find(|t| t.system == system && t.name == "best durable publish vs nats (file)")
                .map(|t| t.measured.clone())
                .unwrap_or_else(|| panic!("no NATS target for {system}"))
        };
        assert_eq!(
            measured("postgres+redis"),
            "50,000 ev/s (batch=100 publishers=64) = 0.59x 85,000 ev/s (batch=100 publishers=64) \
             (raw Postgres insert of the same rows, best cell: 55,000 ev/s = 0.65x)"
        );
        assert!(
            !measured("embedded").contains("raw Postgres"),
            "the embedded backend stores no Postgres rows"
        );
    }

    fn latency(system: &str, p50_ms: f64, p99_ms: f64) -> Row {
        let mut row = Row::new("latency", system, "rate=10000/s");
        row.latency = Some(util::Latency {
            count: 50_000,
            p50_ms,
            p90_ms: p50_ms,
            p99_ms,
            p999_ms: p99_ms,
            max_ms: p99_ms,
            mean_ms: p50_ms,
        });
        row
    }

    #[test]
    fn each_backend_is_held_to_the_floor_of_its_own_storage() {
        let mut report = Report {
            rows: vec![
                latency(REDIS, 0.5, 1.0),
                latency(baseline::DISK, 0.1, 0.2),
                latency(floor::DURABLE_SYSTEM, 1.0, 2.5),
                latency(floor::SQLITE_SYSTEM, 1.1, 1.8),
                latency(floor::POSTGRES_SYSTEM, 2.0, 4.0),
                latency("embedded", 1.2, 3.0),
                latency("postgres+redis", 2.5, 6.0),
            ],
            ..Report::default()
        };
        compare(&mut report, true);
        let measured = |system: &str, name: &str| {
            report
                .targets
                .iter()
                .find(|t| t.system == system && t.name == name)
                .map(|t| t.measured.clone())
                .unwrap_or_else(|| panic!("no target {name} for {system}"))
        };
        // the p50 target: the floor without gRPC, then the gRPC floors, each with its verdict
        assert_eq!(
            measured("embedded", "publish->deliver p50 at 10K/s"),
            "1.200 ms (floors: raw XADD->XREADGROUP 0.500 + fdatasync 0.100 = 0.600 ms, out of reach on \
             this machine; grpc floor + fdatasync (raw) p50 1.000 ms, out of reach on this machine; \
             grpc floor + SQLite commit (raw) p50 1.100 ms, out of reach on this machine)"
        );
        let vs_raw = "publish->deliver p50 at 10K/s vs raw XADD->XREADGROUP p50";
        assert_eq!(
            measured("embedded", vs_raw),
            "1.200 ms = 2.40x raw 0.500 ms (floors: grpc floor + fdatasync (raw) p50 1.000 ms = 2.00x raw, \
             within reach; grpc floor + SQLite commit (raw) p50 1.100 ms = 2.20x raw, within reach)"
        );
        // embedded is held to both: the least durable log, and the least one that is a SQLite table
        assert_eq!(
            measured("embedded", "publish->deliver p99 at 10K/s"),
            "3.000 ms (floors: grpc floor + fdatasync (raw) p99 2.500 ms, out of reach on this machine; \
             grpc floor + SQLite commit (raw) p99 1.800 ms, within reach)"
        );
        assert_eq!(
            measured("postgres+redis", vs_raw),
            "2.500 ms = 5.00x raw 0.500 ms (floor: grpc floor + Postgres commit (raw) p50 2.000 ms \
             = 4.00x raw, out of reach on this machine)"
        );
        assert_eq!(
            measured("postgres+redis", "publish->deliver p99 at 10K/s"),
            "6.000 ms (floor: grpc floor + Postgres commit (raw) p99 4.000 ms, out of reach on this machine)"
        );
    }

    fn target<'a>(report: &'a Report, system: &str, name: &str) -> &'a Target {
        report
            .targets
            .iter()
            .find(|t| t.system == system && t.name == name)
            .unwrap_or_else(|| panic!("no target {name} for {system}"))
    }

    const P50: &str = "publish->deliver p50 at 10K/s";
    const P99: &str = "publish->deliver p99 at 10K/s";
    const VS_RAW: &str = "publish->deliver p50 at 10K/s vs raw XADD->XREADGROUP p50";

    /// A latency cell whose figures meet every target, as its open loop left it.
    fn fast(system: &str, sent: u64, errors: u64) -> Row {
        let mut row = latency(system, 0.2, 0.5);
        row.planned = Some(50_000);
        row.sent = Some(sent);
        row.errors = errors;
        row
    }

    #[test]
    fn a_latency_cell_that_lost_events_or_fell_short_of_its_plan_misses() {
        for (sent, errors, why) in [
            (50_000, 3, "embedded: 3 errors"),
            (49_000, 0, "embedded: sent 49000 of 50000 planned"),
        ] {
            let mut report = Report {
                rows: vec![fast(REDIS, 50_000, 0), fast("embedded", sent, errors)],
                ..Report::default()
            };
            compare(&mut report, true);
            for name in [P50, P99, VS_RAW] {
                let t = target(&report, "embedded", name);
                assert_eq!(t.pass, Some(false), "{name}: {}", t.measured);
                assert!(t.measured.contains(why), "{name}: {}", t.measured);
            }
        }
        // the same figures from a complete cell pass
        let mut report = Report {
            rows: vec![fast(REDIS, 50_000, 0), fast("embedded", 50_000, 0)],
            ..Report::default()
        };
        compare(&mut report, true);
        for name in [P50, P99, VS_RAW] {
            assert_eq!(target(&report, "embedded", name).pass, Some(true), "{name}");
        }
    }

    #[test]
    fn an_incomplete_raw_redis_cell_judges_no_ratio_to_it() {
        let mut report = Report {
            rows: vec![fast(REDIS, 40_000, 0), fast("embedded", 50_000, 0)],
            ..Report::default()
        };
        compare(&mut report, true);
        let t = target(&report, "embedded", VS_RAW);
        assert_eq!(t.pass, None, "{}", t.measured);
        assert!(
            t.measured.ends_with(
                "not judged: incomplete baseline cell (redis (raw): sent 40000 of 50000 planned)"
            ),
            "{}",
            t.measured
        );
        // the p50 target does not depend on it, and its floor is not drawn from it
        let t = target(&report, "embedded", P50);
        assert_eq!(t.pass, Some(true));
        assert!(!t.measured.contains("XADD"), "{}", t.measured);
    }

    #[test]
    fn the_one_event_per_rpc_target_names_both_raw_rates_and_judges_on_one_connection() {
        let mut report = Report {
            rows: vec![
                publish(PG, "batch=1 publishers=1", 3_000.0),
                publish(PG, "batch=1 publishers=64", 10_000.0),
                publish("embedded", "batch=1 publishers=1", 2_000.0),
                publish("embedded", "batch=1 publishers=64", 15_000.0),
            ],
            ..Report::default()
        };
        compare(&mut report, true);
        let t = target(
            &report,
            "embedded",
            "1 event/RPC at most publishers vs raw single-row sync commit",
        );
        assert_eq!(
            t.measured,
            "15,000 ev/s (batch=1 publishers=64) = 5.00x raw 3,000 ev/s (1 connection; the verdict's); \
             1.50x raw 10,000 ev/s (64 connections)"
        );
        assert_eq!(t.pass, Some(true));
    }

    fn slow_row(added: f64, errors: u64) -> Row {
        let mut row = Row::new(
            "slow consumer",
            "embedded",
            "with 3 slow consumers (2 at 100/s, 1 stalled)",
        );
        row.rss_added_mb = Some(added);
        row.errors = errors;
        row
    }

    #[test]
    fn the_slow_consumer_target_judges_the_signed_rss_delta_of_a_complete_cell() {
        let verdict = |row: Row| {
            let mut report = Report {
                rows: vec![row],
                ..Report::default()
            };
            compare(&mut report, true);
            let t = target(&report, "embedded", "slow consumers add server RSS");
            (t.pass, t.measured.clone())
        };
        assert_eq!(verdict(slow_row(-3.25, 0)), (Some(true), "-3.2 MB".into()));
        assert_eq!(verdict(slow_row(70.0, 0)), (Some(false), "+70.0 MB".into()));
        assert_eq!(
            verdict(slow_row(1.0, 1)),
            (
                Some(false),
                "+1.0 MB; incomplete cell (embedded: 1 errors)".into()
            )
        );
    }
}
