//! Nerve: a gRPC event bus. Publish, subscribe in load-balanced groups with acks and dead letters,
//! request/reply with correlation ids, and replay history, on a durable event store.

pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
pub mod error;
pub mod event;
pub mod metrics;
mod retry;
pub mod store;
pub mod stream;
pub mod telemetry;

#[cfg(test)]
mod proptests;

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    bus::Bus,
    config::Config,
    error::{Error, Result},
    store::{EventStore, PostgresStore, SqliteDb, SqliteStore},
    stream::{EmbeddedStreams, LiveStreams, RedisSettings, RedisStreams},
};

/// The two backends a bus runs on.
#[derive(Clone)]
pub struct Backends {
    pub store: Arc<dyn EventStore>,
    pub streams: Arc<dyn LiveStreams>,
}

/// Opens the configured backends: embedded (SQLite in `data_dir`, in-process streams) or Postgres + Redis.
pub async fn open_backends(config: &Config) -> Result<Backends> {
    if config.backends().map_err(Error::Config)? == config::BackendKind::Production {
        let store = PostgresStore::connect(&config.store, config.postgres.max_connections).await?;
        let streams = RedisStreams::start(
            &RedisSettings {
                url: config.streams.clone(),
                key_prefix: config.redis.key_prefix.clone(),
                stream_max_len: config.redis.stream_max_len,
                // a request waits at most this long: its inbox must outlive the wait
                inbox_ttl: config.bus.max_request_timeout + std::time::Duration::from_secs(60),
                quiet_ttl: crate::stream::QUIET_TTL,
            },
            store.clone(),
        )
        .await?;
        return Ok(Backends { store, streams });
    }
    // what it makes, for this user only (an existing directory keeps its mode: a volume's, say)
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&config.data_dir)
        .map_err(|source| Error::Io {
            context: format!("creating data directory {}", config.data_dir.display()),
            source,
        })?;
    let db = SqliteDb::open(&config.data_dir.join("nerve.db")).await?;
    let store = SqliteStore::start(db).await?;
    let streams = EmbeddedStreams::start(store.clone()).await?;
    Ok(Backends { store, streams })
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    health_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    draining: CancellationToken,
    shutdown: CancellationToken,
    calls_ended: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl Server {
    /// Returns the address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the address of the plaintext health listener, when configured.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Returns the address of the /metrics listener, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops reporting ready (readiness and overall health NOT_SERVING) while still serving every call,
    /// so load balancers route new calls elsewhere before [`Server::shutdown`].
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// Begins a graceful shutdown: streams end with UNAVAILABLE, no new calls are accepted.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> Result<()> {
        self.task
            .await
            .map_err(|e| Error::Config(format!("server task failed: {e}")))?
    }
}

/// Binds a listener; the error names what it was for and the address.
async fn bind(
    what: &str,
    addr: impl tokio::net::ToSocketAddrs + std::fmt::Display,
) -> Result<(TcpListener, SocketAddr)> {
    let context = format!("binding {what} {addr}");
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Io {
        context: context.clone(),
        source,
    })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Io { context, source })?;
    Ok((listener, bound))
}

/// Checks the settings as `config::load` does, binds the listen address and starts serving on the
/// given backends.
pub async fn start(config: Config, backends: Backends) -> Result<Server> {
    config.check().map_err(Error::Config)?;
    let authenticated = auth::Auth::configured(&config.tls, &config.auth);
    if !authenticated && !config.listen.ip().is_loopback() {
        // refused by `check` unless --insecure
        tracing::warn!(listen = %config.listen, "listening without authentication (--insecure): anyone who can connect may publish, read and administer");
    }
    // not refused: TLS may end before the server (a mesh sidecar, a proxy), which the server cannot see
    if authenticated && !config.tls.enabled() && !config.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.listen, "JWTs arrive without TLS: unless TLS ends in front of this server, anyone on the path can read and replay them");
    }
    let tls = if config.tls.enabled() {
        Some(Arc::new(
            auth::Tls::new(&config.tls, config.auth.reload_check_interval)
                .map_err(Error::Config)?,
        ))
    } else {
        None
    };
    let health = if config.health_listen.is_empty() {
        None
    } else {
        Some(bind("the health listener", &config.health_listen).await?)
    };
    let health_addr = health.as_ref().map(|(_, addr)| *addr);
    let health_listener = health.map(|(listener, _)| listener);
    let (listener, addr) = bind("the gRPC listener", config.listen).await?;
    let shutdown = CancellationToken::new();
    // a start that fails from here on stops what it started (the metrics listener, auth's tasks)
    let stopped_unless_started = shutdown.clone().drop_guard();
    let draining = shutdown.child_token();
    let calls_ended = CancellationToken::new();
    let metrics_addr = if config.metrics.listen.is_empty() {
        None
    } else {
        let handle = metrics::install(config.metrics.max_label_values).map_err(Error::Config)?;
        let (listener, metrics_addr) =
            bind("the metrics listener", config.metrics.listen.as_str()).await?;
        tokio::spawn(metrics::serve(listener, handle, shutdown.clone()));
        info!(addr = %metrics_addr, "metrics listening on /metrics");
        Some(metrics_addr)
    };
    let auth = auth::Auth::start(
        &config.tls,
        &config.auth,
        &config.connections,
        backends.store.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(Error::Config)?;
    let bus = Bus::start(
        backends.store,
        backends.streams,
        config.limits.clone(),
        config.bus.clone(),
        shutdown.clone(),
    );
    // decoding limit: a whole batch plus protobuf framing overhead
    let message_limit = config.limits.max_batch_bytes + (1 << 20);
    let task = tokio::spawn(api::serve(
        bus.clone(),
        auth,
        listener,
        api::ServeSettings {
            message_limit,
            health_interval: config.health_check_interval,
            connections: config.connections.clone(),
            tls: tls.clone(),
            health_listener,
            draining: draining.clone(),
            calls_ended: calls_ended.clone(),
        },
        shutdown.clone(),
    ));
    info!(%addr, tls = tls.is_some(), "nerve listening");
    if let Some(health_addr) = health_addr {
        info!(addr = %health_addr, "health (plaintext, grpc.health.v1 only) listening");
    }
    if metrics_addr.is_some() {
        tokio::spawn(bus::sample_groups(
            bus.clone(),
            config.metrics.group_sample_interval,
            shutdown.clone(),
        ));
    }
    stopped_unless_started.disarm();
    Ok(Server {
        addr,
        health_addr,
        metrics_addr,
        draining,
        shutdown,
        calls_ended,
        task,
    })
}

/// Runs the server until the first of `signals` (or their end), drains for `shutdown_delay` (or
/// until the next signal), then stops gracefully; a signal while starting stops it there.
pub async fn run(
    config: Config,
    mut signals: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> Result<()> {
    let (delay, stop_within) = (config.shutdown_delay, config.shutdown_timeout);
    // a signal while starting (migrations waiting on another replica's lock, a slow open) stops
    // there: the ports never open
    let server = tokio::select! {
        started = async {
            let backends = open_backends(&config).await?;
            start(config, backends).await
        } => started?,
        _ = signals.recv() => {
            info!("stopped while starting");
            return Ok(());
        }
    };
    signals.recv().await;
    if !delay.is_zero() {
        info!(delay = %humantime::format_duration(delay), "draining: not ready, still serving");
        server.drain();
        // only a signal cuts it short: senders that went away leave the full delay
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            Some(()) = signals.recv() => info!("second signal: draining cut short"),
        }
    }
    info!("shutting down");
    server.shutdown();
    let calls_ended = server.calls_ended.clone();
    // an acknowledged publish is durable whatever comes after, and streams were ended: what is
    // left is sending their ends, which a client that does not read holds back, then storing the
    // last audit records
    // a further signal ends the wait, as an operator's second Ctrl-C means
    let stopped = tokio::select! {
        stopped = tokio::time::timeout(stop_within, server.wait()) => stopped,
        Some(()) = signals.recv() => {
            warn!("another signal: stopping now, without the calls still open and the audit records not yet stored (each is in the log)");
            info!("stopped");
            return Ok(());
        }
    };
    match stopped {
        Ok(stopped) => stopped?,
        Err(_) if calls_ended.is_cancelled() => warn!(
            timeout = %humantime::format_duration(stop_within),
            "audit records still being stored after shutdown_timeout (the store is slow or down); stopping without them: each is in the log"
        ),
        Err(_) => warn!(
            timeout = %humantime::format_duration(stop_within),
            "calls still open after shutdown_timeout (a subscriber not reading, say); stopping without them"
        ),
    }
    info!("stopped");
    Ok(())
}
