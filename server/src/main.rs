//! nerve-server: parses flags, loads configuration, starts logging and runs the bus.

use std::process::ExitCode;

use tracing::{error, warn};

/// mimalloc instead of the system allocator: deliveries allocate and free many small buffers
/// across threads, where glibc's malloc spent about a tenth of a group drain's CPU. Built without
/// transparent huge pages (`no_thp`): with them the server used ~13 % more CPU at 10K events/s on
/// Postgres + Redis, part of it faulting in and zeroing 2 MiB pages (docs/benchmarks.md, cause 4).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = nerve::config::parse_args();
    let (config, warnings) = match nerve::config::load(&args, std::env::vars()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("nerve-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nerve-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // the OTLP exporter needs the runtime
    if let Err(e) = runtime.block_on(async { nerve::telemetry::init(&config) }) {
        eprintln!("nerve-server: {e}");
        return ExitCode::from(2);
    }
    for warning in warnings {
        warn!("{warning}");
    }
    let outcome = runtime.block_on(nerve::run(config, shutdown_signal));
    nerve::telemetry::shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "nerve-server failed");
            ExitCode::FAILURE
        }
    }
}

/// Completes on the next SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
