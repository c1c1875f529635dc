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
    let outcome = runtime.block_on(async {
        let signals = match shutdown_signals() {
            Ok(signals) => signals,
            Err(e) => {
                return Err(nerve::error::Error::Io {
                    context: "listening for SIGINT and SIGTERM".into(),
                    source: e,
                });
            }
        };
        nerve::run(config, signals).await
    });
    nerve::telemetry::shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "nerve-server failed");
            ExitCode::FAILURE
        }
    }
}

/// Listens for SIGINT and SIGTERM from now on and forwards each. Called before the server opens its
/// ports: a signal that arrived before the listeners existed killed the process ungracefully, or
/// (between tokio installing its handler and a listener subscribing) was lost.
fn shutdown_signals() -> std::io::Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    for kind in [
        tokio::signal::unix::SignalKind::interrupt(),
        tokio::signal::unix::SignalKind::terminate(),
    ] {
        let mut signal = tokio::signal::unix::signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move { while signal.recv().await.is_some() && tx.send(()).is_ok() {} });
    }
    #[cfg(not(unix))]
    tokio::spawn(
        async move { while tokio::signal::ctrl_c().await.is_ok() && tx.send(()).is_ok() {} },
    );
    Ok(rx)
}
