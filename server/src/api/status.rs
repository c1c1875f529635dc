//! The one place where domain errors become gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::bus::BusError;

/// Most bytes of a status message. It goes into the response's headers twice (`grpc-message`, and
/// the `grpc-status-details-bin` status, base64-encoded, with the violations), and gRPC's C core, the
/// Python client's, refuses headers past 8 KiB at random and past 16 KiB always.
const MAX_MESSAGE: usize = 1024;
/// Most bytes of a listed violation's field, and of its description.
const MAX_FIELD: usize = 128;
const MAX_DESCRIPTION: usize = 256;
/// Most bytes of the violations listed in a status; those past it are counted.
const MAX_LISTED_BYTES: usize = 2048;

/// `text` when it has at most `max` bytes, else its head (cut at a character) and its length. What a
/// caller sent is quoted in messages and audit records before it is validated, and a message of
/// megabytes would overflow the response's headers (the client then sees a protocol error).
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len()).into()
}

/// Maps a bus error to its status; every variant chooses its code here and nowhere else.
pub fn to_status(error: BusError) -> Status {
    let message = bounded(&error.to_string(), MAX_MESSAGE).into_owned();
    match error {
        BusError::Invalid(input) => {
            let code = if input.too_large {
                Code::ResourceExhausted
            } else {
                Code::InvalidArgument
            };
            violations(code, message, &input)
        }
        BusError::OutOfRange(input) => violations(Code::OutOfRange, message, &input),
        BusError::AlreadyExists { .. } => Status::already_exists(message),
        BusError::NotFound(_) => Status::not_found(message),
        BusError::Exists(_) => Status::already_exists(message),
        BusError::NoResponders { .. } => Status::with_error_details(
            Code::FailedPrecondition,
            message,
            ErrorDetails::with_error_info("NO_RESPONDERS", "nerve.v1", []),
        ),
        BusError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
        BusError::FailedPrecondition(_) => Status::failed_precondition(message),
        BusError::Unavailable(_) => Status::unavailable(message),
        BusError::ShuttingDown => Status::unavailable(message),
        BusError::Unauthenticated(_) => Status::unauthenticated(message),
        // clients whose credentials refresh may reopen at once (a replay resumes from its token)
        BusError::TokenExpired(_) => Status::with_error_details(
            Code::Unauthenticated,
            message,
            ErrorDetails::with_error_info("TOKEN_EXPIRED", "nerve.v1", []),
        ),
        BusError::PermissionDenied(_) => Status::permission_denied(message),
        BusError::ResourceExhausted(_) => Status::resource_exhausted(message),
        BusError::Internal(_) => {
            tracing::error!(error = %message, "internal error");
            Status::internal(message)
        }
    }
}

/// Builds an INVALID_ARGUMENT status naming one field.
pub fn invalid(field: &str, description: &str) -> Status {
    to_status(BusError::Invalid(crate::event::InvalidInput::field(
        field,
        description,
    )))
}

/// A status whose `BadRequest` detail names the fields of `input` that fit in [`MAX_LISTED_BYTES`]
/// ([`crate::event::InvalidInput::listed`]), and one more entry (field "...") counting the rest.
fn violations(code: Code, message: String, input: &crate::event::InvalidInput) -> Status {
    let mut details = ErrorDetails::new();
    let listed = input.listed(MAX_LISTED_BYTES, |v| {
        v.field.len().min(MAX_FIELD) + v.description.len().min(MAX_DESCRIPTION)
    });
    for v in listed {
        details.add_bad_request_violation(
            bounded(&v.field, MAX_FIELD),
            bounded(&v.description, MAX_DESCRIPTION),
        );
    }
    let unlisted = input.violations.len() - listed.len();
    if unlisted > 0 {
        details.add_bad_request_violation("...", format!("{unlisted} more not listed"));
    }
    Status::with_error_details(code, message, details)
}
