//! grpc.health.v1 on tonic-health's statuses, with Watch streams that end at shutdown.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health};

use super::status::to_status;
use crate::bus::BusError;

/// The health service. tonic-health's Watch streams never end, and an open one (grpcurl, a mesh's
/// health checker) held the graceful shutdown until the process was killed; here they end with
/// UNAVAILABLE, as every other stream does.
pub(super) struct HealthService {
    inner: tonic_health::server::HealthService,
    shutdown: CancellationToken,
}

impl HealthService {
    /// Serves the statuses `reporter` sets until `shutdown`.
    pub(super) fn new(
        reporter: tonic_health::server::HealthReporter,
        shutdown: CancellationToken,
    ) -> Self {
        HealthService {
            inner: tonic_health::server::HealthService::from_health_reporter(reporter),
            shutdown,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let ended = futures::stream::once(async { Err(to_status(BusError::ShuttingDown)) });
        let stream = statuses
            .take_until(self.shutdown.clone().cancelled_owned())
            .chain(ended);
        Ok(Response::new(Box::pin(stream)))
    }
}
