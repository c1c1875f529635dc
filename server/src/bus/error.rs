use crate::{event::InvalidInput, store::StoreError, stream::StreamError};

/// Errors of the bus; the api layer maps each to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The request is malformed or over a limit.
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    /// A position past what is stored yet (a sequence after the head), naming the field.
    #[error("{0}")]
    OutOfRange(InvalidInput),
    /// The same (source, id) is stored with different content.
    #[error("event {id:?} from source {event_source:?} already exists with different content")]
    AlreadyExists { event_source: String, id: String },
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// What the call would create exists already (a registration, say).
    #[error("{0}")]
    Exists(String),
    /// A request found no subscriber that could receive it.
    #[error("no responders: no connected subscriber receives type {event_type:?}")]
    NoResponders { event_type: String },
    /// No reply came in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The call is valid but cannot be carried out in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A backend does not answer.
    #[error("{0}")]
    Unavailable(String),
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The caller is not identified.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's bearer token has expired.
    #[error("{0}")]
    TokenExpired(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A per-caller limit is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// An unexpected failure; never caused by input.
    #[error("{0}")]
    Internal(String),
}

/// Result alias of the bus.
pub type BusResult<T> = Result<T, BusError>;

impl From<StoreError> for BusError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { event_source, id } => {
                BusError::AlreadyExists { event_source, id }
            }
            StoreError::Unavailable(_) => BusError::Unavailable(e.to_string()),
            StoreError::Internal(_) => BusError::Internal(e.to_string()),
        }
    }
}

impl From<crate::auth::AuthError> for BusError {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError;
        match e {
            AuthError::Unauthenticated(m) => BusError::Unauthenticated(m),
            AuthError::TokenExpired(m) => BusError::TokenExpired(m),
            AuthError::PermissionDenied(m) => BusError::PermissionDenied(m),
            AuthError::SubjectMismatch { reason, .. } => BusError::PermissionDenied(reason),
            AuthError::ResourceExhausted(m) => BusError::ResourceExhausted(m),
        }
    }
}

impl From<StreamError> for BusError {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Unavailable(_) => BusError::Unavailable(e.to_string()),
            StreamError::NoSuchGroup(_) => BusError::NotFound(e.to_string()),
            StreamError::OtherTypes { .. } => BusError::FailedPrecondition(e.to_string()),
            StreamError::Internal(_) => BusError::Internal(e.to_string()),
        }
    }
}
