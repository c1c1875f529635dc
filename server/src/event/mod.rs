//! The domain vocabulary shared by the bus, the store and the streams: events, type patterns and filters.
//!
//! It knows nothing of protobuf, SQL or Redis, so every layer can depend on it without cycles.

mod cloudevents_json;
mod filter;
mod model;
mod pattern;
mod validate;

pub use cloudevents_json::{from_cloudevents_json, to_cloudevents_json};
pub use filter::{Filter, FilterKind, MAX_FILTER_DEPTH, MAX_FILTER_NODES, Selection};
pub use model::{Data, Event, ExtensionValue, Priority, StoredEvent};
pub use pattern::{TypePattern, validate_type};
pub use validate::{InvalidInput, Limits, Violation, check_text, traceparent_header_shape};
