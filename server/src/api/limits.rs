//! Reports a request message tonic could not read with the codes Nerve gives bad input: over the
//! message size limit as RESOURCE_EXHAUSTED, the code gRPC specifies for it, and one that is not
//! protobuf as INVALID_ARGUMENT.
//!
//! tonic refuses such a message before any handler runs, with OUT_OF_RANGE or INTERNAL; clients should
//! see the same codes as for Nerve's own checks (a Subscribe or PublishStream message is answered so by
//! its handler). The status travels in the headers of a trailers-only response or in the trailers of a
//! body, so both are checked.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};

const OUT_OF_RANGE: &[u8] = b"11";
const INTERNAL: &[u8] = b"13";
const RESOURCE_EXHAUSTED: &str = "8";
const INVALID_ARGUMENT: &str = "3";

fn rewrite(headers: &mut HeaderMap) {
    let status = headers.get("grpc-status").map(HeaderValue::as_bytes);
    // grpc-message is percent-encoded on the wire
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(|m| m.replace("%20", " "))
        .unwrap_or_default();
    let code = match status {
        Some(OUT_OF_RANGE) if message.contains("message length too large") => RESOURCE_EXHAUSTED,
        // prost's DecodeError, which tonic reports as INTERNAL
        Some(INTERNAL) if message.starts_with("failed to decode Protobuf message") => {
            INVALID_ARGUMENT
        }
        _ => return,
    };
    headers.insert("grpc-status", HeaderValue::from_static(code));
}

/// Rewrites the status of responses that report an over-limit message.
pub fn unreadable_message_status<B>(response: Response<B>) -> Response<UnreadableMessageBody<B>> {
    let (mut parts, body) = response.into_parts();
    rewrite(&mut parts.headers);
    Response::from_parts(parts, UnreadableMessageBody(body))
}

/// A response body whose trailers get the same rewrite.
pub struct UnreadableMessageBody<B>(B);

impl<B: Body + Unpin> Body for UnreadableMessageBody<B> {
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
