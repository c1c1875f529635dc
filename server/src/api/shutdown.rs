//! Ends a service's streams at shutdown: the response with UNAVAILABLE, as every other stream
//! ends, and then the request as at the client's half-close, so the handler lets go of it (HTTP/2
//! keeps a stream, and so the graceful shutdown, until both sides are done). The request ends after
//! the response: a handler that ended first would end the response with OK.
//!
//! For services whose streams never end by themselves: tonic-health's Watch (grpcurl, a mesh's
//! health checker) and tonic-reflection's stream, which ends only when the client half-closes
//! (grpcui, a reflection client kept for a session). Open, they held the graceful shutdown until
//! `shutdown_timeout`. Both services are built by their crates, so the wrapper is around the service,
//! not the handler.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Frame, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{body::Body, codegen::Bytes, server::NamedService};

use super::status::to_status;
use crate::bus::BusError;

/// A service whose request bodies end, and whose response bodies end with UNAVAILABLE, once
/// `shutdown` is cancelled.
#[derive(Clone)]
pub(super) struct EndsAtShutdown<S> {
    inner: S,
    shutdown: CancellationToken,
}

impl<S> EndsAtShutdown<S> {
    pub(super) fn new(inner: S, shutdown: CancellationToken) -> Self {
        EndsAtShutdown { inner, shutdown }
    }
}

impl<S: NamedService> NamedService for EndsAtShutdown<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for EndsAtShutdown<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let responded = CancellationToken::new();
        let request = request.map(|body| {
            Body::new(Ending {
                body,
                end_at: Box::pin(responded.clone().cancelled_owned()),
                unavailable: false,
                ended: false,
                on_end: None,
            })
        });
        let response = self.inner.call(request);
        let shutdown = self.shutdown.clone();
        Box::pin(async move {
            let Ok(response) = response.await;
            Ok(response.map(|body| {
                Body::new(Ending {
                    body,
                    end_at: Box::pin(shutdown.cancelled_owned()),
                    unavailable: true,
                    ended: false,
                    on_end: Some(responded),
                })
            }))
        })
    }
}

/// A body that ends when `end_at` fires, if it has not ended before: with UNAVAILABLE trailers when
/// `unavailable` (a response), else as at its sender's end (a request). `on_end` is cancelled once
/// it has ended, or is dropped.
struct Ending {
    body: Body,
    end_at: Pin<Box<WaitForCancellationFutureOwned>>,
    unavailable: bool,
    ended: bool,
    on_end: Option<CancellationToken>,
}

impl Ending {
    fn end(&mut self) {
        self.ended = true;
        if let Some(on_end) = &self.on_end {
            on_end.cancel();
        }
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.end();
    }
}

impl http_body::Body for Ending {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            if frame
                .as_ref()
                .is_none_or(|f| f.as_ref().is_ok_and(Frame::is_trailers))
            {
                self.end();
            }
            return Poll::Ready(frame);
        }
        if self.end_at.as_mut().poll(cx).is_ready() {
            self.end();
            if !self.unavailable {
                return Poll::Ready(None);
            }
            let mut trailers = http::HeaderMap::new();
            to_status(BusError::ShuttingDown).add_header(&mut trailers)?;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
