//! Reports tonic's message size limit as RESOURCE_EXHAUSTED, the code gRPC specifies for it.
//!
//! tonic rejects an over-limit message before any handler runs, with OUT_OF_RANGE; clients should see
//! the same code as for Nerve's own size limits. The status travels in the headers of a trailers-only
//! response or in the trailers of a body, so both are checked.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};

const OUT_OF_RANGE: &[u8] = b"11";
const RESOURCE_EXHAUSTED: &str = "8";

fn rewrite(headers: &mut HeaderMap) {
    let too_large = headers.get("grpc-status").map(HeaderValue::as_bytes) == Some(OUT_OF_RANGE)
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            // grpc-message is percent-encoded on the wire
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static(RESOURCE_EXHAUSTED));
    }
}

/// Rewrites the status of responses that report an over-limit message.
pub fn size_limit_status<B>(response: Response<B>) -> Response<SizeLimitBody<B>> {
    let (mut parts, body) = response.into_parts();
    rewrite(&mut parts.headers);
    Response::from_parts(parts, SizeLimitBody(body))
}

/// A response body whose trailers get the same rewrite.
pub struct SizeLimitBody<B>(B);

impl<B: Body + Unpin> Body for SizeLimitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame.map(|mut frame| {
                    if let Some(trailers) = frame.trailers_mut() {
                        rewrite(trailers);
                    }
                    frame
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}
