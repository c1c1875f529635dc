use serde::Deserialize;

use super::{Event, ExtensionValue, validate_type};

/// One problem with a request, naming the field as the client spelled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

/// Most violations an error lists (in its message, and in a status' details); the rest are counted.
/// One request can hold dozens (a bad name and value per extension), and each listed one goes into the
/// response's headers, where clients refuse more than 8-16 KiB and would see a protocol error instead
/// of the status.
const LISTED_VIOLATIONS: usize = 20;

/// Bad input: what is wrong and whether it is malformed or merely too large.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput {
    pub violations: Vec<Violation>,
    /// Set when the input is well-formed but exceeds a size limit.
    pub too_large: bool,
}

/// Most bytes of the violations an error's message lists (at least one is): the message goes into
/// response headers too, where status messages are cut at 1 KiB.
const LISTED_MESSAGE_BYTES: usize = 768;

impl std::fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let listed = self.listed(LISTED_MESSAGE_BYTES, |v| {
            v.field.len() + v.description.len() + 4
        });
        for (i, v) in listed.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        match self.violations.len() - listed.len() {
            0 => Ok(()),
            more => write!(f, "; and {more} more"),
        }
    }
}

impl std::error::Error for InvalidInput {}

impl InvalidInput {
    /// The violations to list: the first [`LISTED_VIOLATIONS`] whose sizes (by `size`) fit in
    /// `budget` bytes, and at least one.
    pub fn listed(&self, budget: usize, size: impl Fn(&Violation) -> usize) -> &[Violation] {
        let mut total = 0;
        let fitting = self
            .violations
            .iter()
            .take(LISTED_VIOLATIONS)
            .take_while(|v| {
                total += size(v);
                total <= budget
            })
            .count();
        &self.violations[..fitting.max(self.violations.len().min(1))]
    }

    /// Builds a malformed-input error for one field.
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        InvalidInput {
            violations: vec![Violation {
                field: field.into(),
                description: description.into(),
            }],
            too_large: false,
        }
    }

    /// Checks every item with `check`, gathering the violations of all (a size error only when every
    /// one is): a caller hears of every bad field at once, not of one per attempt.
    pub fn gather<T, U>(
        items: impl IntoIterator<Item = T>,
        mut check: impl FnMut(usize, T) -> Result<U, InvalidInput>,
    ) -> Result<Vec<U>, InvalidInput> {
        let mut checked = Vec::new();
        let mut invalid: Option<InvalidInput> = None;
        for (i, item) in items.into_iter().enumerate() {
            match (check(i, item), &mut invalid) {
                (Ok(u), _) => checked.push(u),
                (Err(e), None) => invalid = Some(e),
                (Err(e), Some(all)) => {
                    all.too_large &= e.too_large;
                    all.violations.extend(e.violations);
                }
            }
        }
        invalid.map_or(Ok(checked), Err)
    }

    /// Builds a size-limit error for one field.
    pub fn too_large(field: impl Into<String>, description: impl Into<String>) -> Self {
        InvalidInput {
            too_large: true,
            ..InvalidInput::field(field, description)
        }
    }
}

/// Size limits applied to every request.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest event (attributes, extensions and data), in bytes.
    pub max_event_bytes: usize,
    /// Most events in one Publish.
    pub max_batch_events: usize,
    /// Largest Publish batch, in bytes.
    pub max_batch_bytes: usize,
    /// Largest single attribute or extension value, in bytes.
    pub max_attribute_bytes: usize,
    /// Most extensions on one event.
    pub max_extensions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: 1 << 20,
            max_batch_events: 1000,
            max_batch_bytes: 4 << 20,
            max_attribute_bytes: 1024,
            max_extensions: 32,
        }
    }
}

/// Most bytes a source and an id take together, and a correlation id alone: with the tenant (and a
/// sequence) each is one entry of a Postgres b-tree (`events_key`, `events_correlation`), which holds
/// at most 2,704 bytes. Longer is refused as too large on either backend, so that events move between
/// them, rather than failing in the database.
pub const MAX_KEY_BYTES: usize = 2560;

/// Names that are context or bus attributes in the CloudEvents formats, so not free for extensions.
pub(crate) const RESERVED_EXTENSIONS: &[&str] = &[
    "id",
    "source",
    "type",
    "specversion",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "database64",
    "priority",
    "correlationid",
    "causationid",
    "traceparent",
    "replyto",
    "sequence",
    "recordedtime",
    "protodatatype",
];

/// Why a text attribute cannot hold `value`, if it holds a control character (U+0000-U+001F,
/// U+007F-U+009F). CloudEvents forbids them in string attributes, and Postgres cannot store U+0000 in
/// a text column: stored, it failed the whole group commit it came in, other publishers' events too.
fn control_character(value: &str) -> Option<String> {
    value.chars().find(|c| c.is_control()).map(|c| {
        format!(
            "must not contain control characters (found U+{:04X})",
            c as u32
        )
    })
}

/// Checks that a text field of a request holds no control character (see [`control_character`]).
pub fn check_text(field: &str, value: &str) -> Result<(), InvalidInput> {
    control_character(value).map_or(Ok(()), |reason| Err(InvalidInput::field(field, reason)))
}

fn valid_extension_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether a call's `traceparent` header has W3C's shape: the four fields of version 00, followed by
/// more only under a later version (which a version-00 reader ignores).
pub fn traceparent_header_shape(value: &str) -> bool {
    let mut fields = value.split('-');
    let first: Vec<&str> = fields.by_ref().take(4).collect();
    let more = fields.next().is_some();
    first.len() == 4 && valid_traceparent(&first.join("-")) && !(more && first[0] == "00")
}

/// W3C's grammar is lowercase hex throughout; tracers compare ids as written, so an uppercase id would
/// not be the trace it names.
fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1] != "0".repeat(32)
        && hex(parts[2], 16)
        && parts[2] != "0".repeat(16)
        && hex(parts[3], 2)
}

impl Limits {
    /// Most event bytes one answer page carries (a replay page, a page of dead letters): what one
    /// publish may carry, so a page of any events fits the message limit (`max_batch_bytes` + 1 MiB).
    pub fn page_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    /// How many of `sizes` (event sizes, in order) one answer page takes: all of them while their sum
    /// stays within [`Limits::page_bytes`], and always the first.
    pub fn page_fits(&self, sizes: impl IntoIterator<Item = usize>) -> usize {
        let mut bytes = 0;
        let mut count = 0;
        for size in sizes {
            bytes += size;
            if count > 0 && bytes > self.page_bytes() {
                break;
            }
            count += 1;
        }
        count
    }

    /// Checks one event; `field` is its path in the request (e.g. `events[2]`).
    pub fn check_event(&self, event: &Event, field: &str) -> Result<(), InvalidInput> {
        let mut bad = Vec::new();
        let mut size_count = 0usize;
        let mut push = |name: &str, description: String| {
            bad.push(super::Violation {
                field: format!("{field}.{name}"),
                description,
            })
        };
        let required = [
            ("id", &event.id),
            ("source", &event.source),
            ("type", &event.event_type),
        ];
        for (name, value) in required {
            if value.is_empty() {
                push(name, "is required".into());
            }
        }
        if event.spec_version != "1.0" {
            push(
                "spec_version",
                format!("must be \"1.0\", got {:?}", event.spec_version),
            );
        }
        if !event.event_type.is_empty()
            && let Err(reason) = validate_type(&event.event_type)
        {
            push("type", reason);
        }
        let optional = [
            ("subject", &event.subject),
            ("data_content_type", &event.data_content_type),
            ("data_schema", &event.data_schema),
            ("correlation_id", &event.correlation_id),
            ("causation_id", &event.causation_id),
            ("reply_to", &event.reply_to),
        ];
        for (name, value) in optional {
            if value.as_deref() == Some("") {
                push(name, "must not be empty when present".into());
            }
        }
        if let Some(tp) = &event.traceparent
            && !valid_traceparent(tp)
        {
            push(
                "traceparent",
                "is not a W3C traceparent (00-<32 lowercase hex>-<16 lowercase hex>-<2 lowercase hex>)".into(),
            );
        }
        let too_many_extensions = event.extensions.len() > self.max_extensions;
        if too_many_extensions {
            push(
                "extensions",
                format!("more than {} extensions", self.max_extensions),
            );
            size_count += 1;
        }
        // past the limit, the count is the problem: each of thousands would otherwise be checked and named
        let checked_extensions = if too_many_extensions { 0 } else { usize::MAX };
        for (name, value) in event.extensions.iter().take(checked_extensions) {
            if !valid_extension_name(name) {
                push(
                    &format!("extensions[{name:?}]"),
                    "extension names are [a-z0-9]{1,20}".into(),
                );
            } else if RESERVED_EXTENSIONS.contains(&name.as_str()) {
                push(
                    &format!("extensions[{name:?}]"),
                    "is a reserved attribute name; use the event field instead".into(),
                );
            }
            if value.size() > self.max_attribute_bytes {
                push(
                    &format!("extensions[{name:?}]"),
                    format!("value longer than {} bytes", self.max_attribute_bytes),
                );
                size_count += 1;
            }
            if let ExtensionValue::String(s) | ExtensionValue::Uri(s) | ExtensionValue::UriRef(s) =
                value
            {
                if s.is_empty() {
                    push(&format!("extensions[{name:?}]"), "must not be empty".into());
                } else if let Some(reason) = control_character(s) {
                    push(&format!("extensions[{name:?}]"), reason);
                }
            }
        }
        let attributes = [
            ("id", Some(&event.id)),
            ("source", Some(&event.source)),
            ("subject", event.subject.as_ref()),
            ("data_content_type", event.data_content_type.as_ref()),
            ("data_schema", event.data_schema.as_ref()),
            ("correlation_id", event.correlation_id.as_ref()),
            ("causation_id", event.causation_id.as_ref()),
            ("reply_to", event.reply_to.as_ref()),
        ];
        for (name, value) in attributes {
            if value.is_some_and(|v| v.len() > self.max_attribute_bytes) {
                push(
                    name,
                    format!("longer than {} bytes", self.max_attribute_bytes),
                );
                size_count += 1;
            } else if let Some(reason) = value.and_then(|v| control_character(v)) {
                push(name, reason);
            }
        }
        // each within its own limit, yet too long for an index entry (a raised max_attribute_bytes)
        let key_bytes = event.source.len() + event.id.len();
        if key_bytes > MAX_KEY_BYTES
            && event.source.len() <= self.max_attribute_bytes
            && event.id.len() <= self.max_attribute_bytes
        {
            // the one to shorten: the source when it alone is too long
            let field = if event.source.len() > MAX_KEY_BYTES {
                "source"
            } else {
                "id"
            };
            push(
                field,
                format!(
                    "source and id are {key_bytes} bytes together, more than the {MAX_KEY_BYTES} \
                     an event's key may take"
                ),
            );
            size_count += 1;
        }
        if let Some(correlation) = &event.correlation_id
            && correlation.len() > MAX_KEY_BYTES
            && correlation.len() <= self.max_attribute_bytes
        {
            push(
                "correlation_id",
                format!("longer than the {MAX_KEY_BYTES} bytes its index entry may take"),
            );
            size_count += 1;
        }
        let size = event.size();
        if size > self.max_event_bytes {
            push(
                "data",
                format!(
                    "event is {size} bytes, more than the limit of {}",
                    self.max_event_bytes
                ),
            );
            size_count += 1;
        }
        if bad.is_empty() {
            Ok(())
        } else {
            // Only an event whose every problem is its size counts as RESOURCE_EXHAUSTED.
            let too_large = size_count == bad.len();
            Err(InvalidInput {
                violations: bad,
                too_large,
            })
        }
    }

    /// Checks a publish batch's count: at least one event, at most the batch limit.
    pub fn check_batch_count(&self, count: usize) -> Result<(), InvalidInput> {
        if count == 0 {
            return Err(InvalidInput::field(
                "events",
                "at least one event is required",
            ));
        }
        if count > self.max_batch_events {
            return Err(InvalidInput::too_large(
                "events",
                format!(
                    "{count} events, more than the batch limit of {}",
                    self.max_batch_events
                ),
            ));
        }
        Ok(())
    }

    /// Checks a publish batch: count, total size and every event.
    pub fn check_batch(&self, events: &[Event]) -> Result<(), InvalidInput> {
        self.check_batch_count(events.len())?;
        let total: usize = events.iter().map(Event::size).sum();
        if total > self.max_batch_bytes {
            return Err(InvalidInput::too_large(
                "events",
                format!(
                    "batch is {total} bytes, more than the limit of {}",
                    self.max_batch_bytes
                ),
            ));
        }
        InvalidInput::gather(events, |i, event| {
            self.check_event(event, &format!("events[{i}]"))
        })?;
        check_repeated_ids(events)
    }
}

/// An event named twice in one batch must be the same event both times (sent twice, it is stored
/// once): two different events under one source and id are the caller's mistake, not an event that
/// already exists.
fn check_repeated_ids(events: &[Event]) -> Result<(), InvalidInput> {
    if events.len() < 2 {
        return Ok(());
    }
    let mut first = std::collections::HashMap::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        let key = (event.source.as_str(), event.id.as_str());
        match first.entry(key) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(i);
            }
            std::collections::hash_map::Entry::Occupied(at) if events[*at.get()] != *event => {
                return Err(InvalidInput::field(
                    format!("events[{i}].id"),
                    format!(
                        "repeats the source and id of events[{}] with other content",
                        at.get()
                    ),
                ));
            }
            std::collections::hash_map::Entry::Occupied(_) => {}
        }
    }
    Ok(())
}
