//! The gRPC surface: EventBus and Admin services, health and reflection, on one tonic router.

mod admin;
pub mod convert;
mod event_bus;
mod limits;
mod shutdown;
pub mod status;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

pub use admin::AdminApi;
pub use event_bus::EventBusApi;

use crate::{
    auth::{Auth, AuthLayer},
    bus::Bus,
};

/// Generated nerve.v1 messages and services.
#[expect(clippy::large_enum_variant, reason = "generated code")]
pub mod pb {
    tonic::include_proto!("nerve.v1");
}

/// The official CloudEvents protobuf format.
pub mod cloudevents {
    tonic::include_proto!("io.cloudevents.v1");
}

/// Descriptor set of every .proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nerve_descriptor.bin"));

/// Services whose health is reported besides the overall "" entry: SERVING while both backends answer.
pub const SERVICES: [&str; 2] = ["nerve.v1.EventBus", "nerve.v1.Admin"];

/// Health entry for liveness probes: SERVING from the start until shutdown, whatever the backends do.
/// A backend outage is not cured by a restart, and a replica restarted while a backend is down cannot
/// start at all, so liveness must not follow the backends.
pub const LIVENESS: &str = "nerve.v1.Liveness";

/// Health entry for readiness probes: SERVING while the event store answers. Publishes commit without
/// Redis, so a Redis outage must not take every replica out of a load balancer.
pub const READINESS: &str = "nerve.v1.Readiness";

/// Largest health check decoded, in bytes: it names one service. Callers without credentials reach
/// it, and tonic reserves room for a message as soon as its length arrives, so a larger one is
/// refused before anything is held.
const HEALTH_MESSAGE_LIMIT: usize = 4 * 1024;

/// How the gRPC listener is served.
#[derive(Debug)]
pub struct ServeSettings {
    /// Largest message decoded or encoded, in bytes.
    pub message_limit: usize,
    pub health_interval: Duration,
    pub connections: crate::auth::ConnectionsConfig,
    /// TLS on the main listener, when configured.
    pub tls: Option<Arc<crate::auth::Tls>>,
    /// Plaintext listener for grpc.health.v1 only, when configured.
    pub health_listener: Option<TcpListener>,
    /// Cancelled when the server stops being ready before it shuts down (a child of `shutdown`).
    pub draining: CancellationToken,
    /// Cancelled once every call has ended, when what is left is storing the last audit records.
    pub calls_ended: CancellationToken,
}

/// Serves EventBus, Admin, health and reflection (v1 and v1alpha) on the listener until `shutdown`.
pub async fn serve(
    bus: Arc<Bus>,
    auth: Arc<Auth>,
    listener: TcpListener,
    settings: ServeSettings,
    shutdown: CancellationToken,
) -> Result<(), crate::error::Error> {
    let reporter = HealthReporter::new();
    // tonic-health's Watch streams never end: an open one (grpcurl, a mesh's health checker) would
    // hold the graceful shutdown
    let health = shutdown::EndsAtShutdown::new(
        tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        )
        .max_decoding_message_size(HEALTH_MESSAGE_LIMIT),
        shutdown.clone(),
    );
    // every service has a status from the first call on; the watcher flips it to SERVING
    report(&reporter, Backends::DOWN).await;
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    tokio::spawn(watch_health(
        bus.clone(),
        reporter,
        settings.health_interval,
        settings.draining,
        shutdown.clone(),
    ));
    if let Some(health_listener) = settings.health_listener {
        let health = health.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .layer(tower::util::MapResponseLayer::new(
                    limits::unreadable_message_status,
                ))
                .add_service(health)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(health_listener),
                    shutdown.cancelled_owned(),
                )
                .await;
            if let Err(error) = served {
                warn!(%error, "health listener failed");
            }
        });
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let limit = settings.message_limit;
    let connections = settings.connections;
    let event_bus = pb::event_bus_server::EventBusServer::new(EventBusApi::new(
        bus.clone(),
        auth.clone(),
        connections.stream_open_timeout,
    ))
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let admin = pb::admin_server::AdminServer::new(AdminApi::new(bus, auth.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let incoming = crate::auth::tls::incoming(listener, settings.tls, shutdown.clone());
    let audit = auth.clone();
    let calls_ended = settings.calls_ended.clone();
    let served = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            limits::unreadable_message_status,
        ))
        .layer(AuthLayer::new(auth))
        .http2_keepalive_interval(Some(connections.keepalive_interval))
        .http2_keepalive_timeout(Some(connections.keepalive_timeout))
        .max_concurrent_streams(Some(connections.max_concurrent_streams))
        .add_service(health)
        .add_service(shutdown::EndsAtShutdown::new(
            reflection_v1,
            shutdown.clone(),
        ))
        .add_service(shutdown::EndsAtShutdown::new(
            reflection_v1alpha,
            shutdown.clone(),
        ))
        .add_service(event_bus)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    calls_ended.cancel();
    // the records of the last calls are still queued for the store: the process ends after this
    audit.flush_audit().await;
    served?;
    Ok(())
}

/// How long a backend check may take before the backend counts as down, when the interval is shorter:
/// a short interval makes an outage show sooner, but a loaded database answering its check in 200 ms
/// is not down.
const MIN_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Which backends answered the last check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backends {
    store: bool,
    streams: bool,
}

impl Backends {
    const DOWN: Backends = Backends {
        store: false,
        streams: false,
    };
    const UP: Backends = Backends {
        store: true,
        streams: true,
    };
}

/// Reports the overall entry and [`SERVICES`] SERVING only while both backends answer, and
/// [`READINESS`] while the store does; all but [`LIVENESS`] NOT_SERVING once draining begins, and
/// [`LIVENESS`] too once shutdown begins.
async fn watch_health(
    bus: Arc<Bus>,
    reporter: HealthReporter,
    interval: Duration,
    draining: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut last: Option<Backends> = None;
    loop {
        // a drain is seen at once, also while a backend that hangs holds a check up
        let (store, streams) = tokio::select! {
            checked = bus.check_backends(interval.max(MIN_CHECK_TIMEOUT)) => checked,
            _ = draining.cancelled() => break,
        };
        let now = Backends {
            store: store.is_ok(),
            streams: streams.is_ok(),
        };
        if now != Backends::UP && last != Some(now) {
            warn!(store = ?store.err(), streams = ?streams.err(), "backend check failed");
        }
        ::metrics::gauge!(crate::metrics::names::BACKEND_UP, "backend" => "store")
            .set(f64::from(u8::from(now.store)));
        ::metrics::gauge!(crate::metrics::names::BACKEND_UP, "backend" => "streams")
            .set(f64::from(u8::from(now.streams)));
        if last != Some(now) {
            info!(store = now.store, streams = now.streams, "health changed");
            report(&reporter, now).await;
            last = Some(now);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = draining.cancelled() => break,
        }
    }
    // draining (shutdown cancels draining too)
    report(&reporter, Backends::DOWN).await;
    shutdown.cancelled().await;
    reporter
        .set_service_status(LIVENESS, ServingStatus::NotServing)
        .await;
}

async fn report(reporter: &HealthReporter, backends: Backends) {
    let status = |serving: bool| {
        if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    // readiness first: once an overall entry shows a change, readiness shows it too
    reporter
        .set_service_status(READINESS, status(backends.store))
        .await;
    let all = status(backends.store && backends.streams);
    reporter.set_service_status("", all).await;
    for service in SERVICES {
        reporter.set_service_status(service, all).await;
    }
}
