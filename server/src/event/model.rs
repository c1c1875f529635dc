use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Delivery priority inside a durable group; higher levels go first when a group has a backlog.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub enum Priority {
    Low = 1,
    #[default]
    Normal = 2,
    High = 3,
    Critical = 4,
}

impl Priority {
    /// Every level, most urgent first.
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    /// Returns the level stored in the database.
    pub fn as_i64(self) -> i64 {
        self as i64
    }

    /// Parses a stored level.
    pub fn from_i64(value: i64) -> Option<Self> {
        match value {
            1 => Some(Priority::Low),
            2 => Some(Priority::Normal),
            3 => Some(Priority::High),
            4 => Some(Priority::Critical),
            _ => None,
        }
    }

    /// Returns the CloudEvents extension spelling ("critical", "high", ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// Parses the CloudEvents extension spelling.
    pub fn parse(value: &str) -> Option<Self> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(value))
    }
}

/// The payload of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Data {
    #[default]
    None,
    Binary(#[serde(with = "base64_bytes")] Vec<u8>),
    Text(String),
    /// A protobuf `Any`: its type URL and encoded message.
    Proto {
        type_url: String,
        #[serde(with = "base64_bytes")]
        value: Vec<u8>,
    },
}

impl Data {
    /// Returns the payload size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Data::None => 0,
            Data::Binary(b) => b.len(),
            Data::Text(t) => t.len(),
            Data::Proto { type_url, value } => type_url.len() + value.len(),
        }
    }

    /// Tells whether there is no payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A CloudEvents extension attribute value, in the CloudEvents type system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum ExtensionValue {
    String(String),
    Bool(bool),
    Integer(i32),
    Bytes(#[serde(with = "base64_bytes")] Vec<u8>),
    Uri(String),
    UriRef(String),
    Timestamp(DateTime<Utc>),
}

impl ExtensionValue {
    /// Returns the canonical string form filters compare against (CloudEvents type system rules).
    pub fn canonical(&self) -> String {
        use base64::Engine as _;
        match self {
            ExtensionValue::String(s) | ExtensionValue::Uri(s) | ExtensionValue::UriRef(s) => {
                s.clone()
            }
            ExtensionValue::Bool(b) => b.to_string(),
            ExtensionValue::Integer(i) => i.to_string(),
            ExtensionValue::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b),
            ExtensionValue::Timestamp(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        }
    }

    /// Returns the size counted against attribute limits.
    pub fn size(&self) -> usize {
        match self {
            ExtensionValue::String(s) | ExtensionValue::Uri(s) | ExtensionValue::UriRef(s) => {
                s.len()
            }
            ExtensionValue::Bytes(b) => b.len(),
            ExtensionValue::Bool(_) => 1,
            ExtensionValue::Integer(_) => 4,
            ExtensionValue::Timestamp(_) => 12,
        }
    }
}

/// A CloudEvents 1.0 event with the bus attributes. Optional attributes are `None` when absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Event {
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub spec_version: String,
    pub subject: Option<String>,
    pub time: Option<DateTime<Utc>>,
    pub data_content_type: Option<String>,
    pub data_schema: Option<String>,
    pub data: Data,
    pub extensions: BTreeMap<String, ExtensionValue>,
    pub priority: Priority,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    pub reply_to: Option<String>,
}

impl Event {
    /// Hashes everything the publisher sent, so a retry can be told apart from a conflicting reuse of an id.
    pub fn content_hash(&self) -> [u8; 32] {
        // serde_json over a struct with a BTreeMap is deterministic
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(bytes).into()
    }

    /// Returns the value of a context attribute or extension by its CloudEvents name, as filters see it.
    pub fn attribute(&self, name: &str) -> Option<String> {
        match name {
            "id" => Some(self.id.clone()),
            "source" => Some(self.source.clone()),
            "type" => Some(self.event_type.clone()),
            "specversion" => Some(self.spec_version.clone()),
            "subject" => self.subject.clone(),
            "time" => self
                .time
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            "datacontenttype" => self.data_content_type.clone(),
            "dataschema" => self.data_schema.clone(),
            "priority" => Some(self.priority.as_str().to_owned()),
            "correlationid" => self.correlation_id.clone(),
            "causationid" => self.causation_id.clone(),
            "traceparent" => self.traceparent.clone(),
            "replyto" => self.reply_to.clone(),
            other => self.extensions.get(other).map(ExtensionValue::canonical),
        }
    }

    /// Returns the approximate encoded size, counted against the event size limit.
    pub fn size(&self) -> usize {
        let opt = |o: &Option<String>| o.as_ref().map_or(0, String::len);
        self.id.len()
            + self.source.len()
            + self.event_type.len()
            + self.spec_version.len()
            + opt(&self.subject)
            + opt(&self.data_content_type)
            + opt(&self.data_schema)
            + opt(&self.correlation_id)
            + opt(&self.causation_id)
            + opt(&self.traceparent)
            + opt(&self.reply_to)
            + self.data.len()
            + self
                .extensions
                .iter()
                .map(|(k, v)| k.len() + v.size())
                .sum::<usize>()
    }
}

/// An event as committed: its tenant, global sequence and commit time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub tenant: String,
    pub sequence: u64,
    pub recorded_at: DateTime<Utc>,
    pub event: Event,
}

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}
