//! The stored encoding of an event: a format byte, then a protobuf message private to the store.
//!
//! Reads decode every event they deliver, so the encoding is the store's hottest code after SQL.
//! Bodies used to be serde JSON: decoding it (with base64 for binary data and RFC 3339 for times) was
//! ~19 % of the server's CPU in an embedded group drain. Protobuf decodes several times faster and
//! keeps binary data as it is. The message is the store's own, not the API's `nerve.v1.Event`, so the
//! API can evolve without touching stored bytes. Bodies written as JSON before stay readable: JSON
//! starts with `{`, which is no format byte.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::event::{Data, Event, ExtensionValue, Priority};

/// The first byte of a body in the current encoding.
const FORMAT_PROTOBUF_V1: u8 = 1;
/// The first byte of a body written as serde JSON, before the protobuf encoding.
const FORMAT_JSON: u8 = b'{';

/// Why a stored body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not even a format byte.
    #[error("empty body")]
    Empty,
    /// A first byte that is neither format.
    #[error("unknown body format byte {0:#04x}")]
    UnknownFormat(u8),
    /// A damaged protobuf body.
    #[error("{0}")]
    Protobuf(#[from] prost::DecodeError),
    /// A damaged JSON body.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A field decoded to a value the event cannot hold.
    #[error("{0} is out of range")]
    OutOfRange(&'static str),
    /// A field every stored event has is absent.
    #[error("{0} is missing")]
    Missing(&'static str),
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredBody {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    source: String,
    #[prost(string, tag = "3")]
    event_type: String,
    #[prost(string, tag = "4")]
    spec_version: String,
    #[prost(string, optional, tag = "5")]
    subject: Option<String>,
    #[prost(message, optional, tag = "6")]
    time: Option<prost_types::Timestamp>,
    #[prost(string, optional, tag = "7")]
    data_content_type: Option<String>,
    #[prost(string, optional, tag = "8")]
    data_schema: Option<String>,
    #[prost(oneof = "StoredData", tags = "9, 10, 11")]
    data: Option<StoredData>,
    #[prost(btree_map = "string, message", tag = "12")]
    extensions: BTreeMap<String, StoredExtension>,
    /// [`Priority::as_i64`].
    #[prost(int32, tag = "13")]
    priority: i32,
    #[prost(string, optional, tag = "14")]
    correlation_id: Option<String>,
    #[prost(string, optional, tag = "15")]
    causation_id: Option<String>,
    #[prost(string, optional, tag = "16")]
    traceparent: Option<String>,
    #[prost(string, optional, tag = "17")]
    reply_to: Option<String>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum StoredData {
    #[prost(bytes, tag = "9")]
    Binary(Vec<u8>),
    #[prost(string, tag = "10")]
    Text(String),
    #[prost(message, tag = "11")]
    Proto(prost_types::Any),
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredExtension {
    #[prost(oneof = "StoredExtensionValue", tags = "1, 2, 3, 4, 5, 6, 7")]
    value: Option<StoredExtensionValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum StoredExtensionValue {
    #[prost(string, tag = "1")]
    String(String),
    #[prost(bool, tag = "2")]
    Bool(bool),
    #[prost(int32, tag = "3")]
    Integer(i32),
    #[prost(bytes, tag = "4")]
    Bytes(Vec<u8>),
    #[prost(string, tag = "5")]
    Uri(String),
    #[prost(string, tag = "6")]
    UriRef(String),
    #[prost(message, tag = "7")]
    Timestamp(prost_types::Timestamp),
}

fn time_to_stored(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn time_from_stored(
    t: &prost_types::Timestamp,
    what: &'static str,
) -> Result<DateTime<Utc>, BodyError> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or(BodyError::OutOfRange(what))
}

/// Encodes an event as the stores keep it.
pub fn encode(event: &Event) -> Vec<u8> {
    use prost::Message as _;
    let e = event.clone();
    let body = StoredBody {
        id: e.id,
        source: e.source,
        event_type: e.event_type,
        spec_version: e.spec_version,
        subject: e.subject,
        time: e.time.map(time_to_stored),
        data_content_type: e.data_content_type,
        data_schema: e.data_schema,
        data: match e.data {
            Data::None => None,
            Data::Binary(b) => Some(StoredData::Binary(b)),
            Data::Text(t) => Some(StoredData::Text(t)),
            Data::Proto { type_url, value } => {
                Some(StoredData::Proto(prost_types::Any { type_url, value }))
            }
        },
        extensions: e
            .extensions
            .into_iter()
            .map(|(name, value)| {
                let value = match value {
                    ExtensionValue::String(s) => StoredExtensionValue::String(s),
                    ExtensionValue::Bool(b) => StoredExtensionValue::Bool(b),
                    ExtensionValue::Integer(i) => StoredExtensionValue::Integer(i),
                    ExtensionValue::Bytes(b) => StoredExtensionValue::Bytes(b),
                    ExtensionValue::Uri(s) => StoredExtensionValue::Uri(s),
                    ExtensionValue::UriRef(s) => StoredExtensionValue::UriRef(s),
                    ExtensionValue::Timestamp(t) => {
                        StoredExtensionValue::Timestamp(time_to_stored(t))
                    }
                };
                (name, StoredExtension { value: Some(value) })
            })
            .collect(),
        priority: e.priority.as_i64() as i32,
        correlation_id: e.correlation_id,
        causation_id: e.causation_id,
        traceparent: e.traceparent,
        reply_to: e.reply_to,
    };
    let mut bytes = Vec::with_capacity(1 + body.encoded_len());
    bytes.push(FORMAT_PROTOBUF_V1);
    body.encode_raw(&mut bytes);
    bytes
}

/// Decodes a stored body in either encoding the stores have written.
pub fn decode(bytes: &[u8]) -> Result<Event, BodyError> {
    use prost::Message as _;
    let (&format, rest) = bytes.split_first().ok_or(BodyError::Empty)?;
    let body = match format {
        FORMAT_PROTOBUF_V1 => StoredBody::decode(rest)?,
        FORMAT_JSON => return Ok(serde_json::from_slice(bytes)?),
        other => return Err(BodyError::UnknownFormat(other)),
    };
    let mut extensions = BTreeMap::new();
    for (name, value) in body.extensions {
        let value = match value
            .value
            .ok_or(BodyError::Missing("an extension's value"))?
        {
            StoredExtensionValue::String(s) => ExtensionValue::String(s),
            StoredExtensionValue::Bool(b) => ExtensionValue::Bool(b),
            StoredExtensionValue::Integer(i) => ExtensionValue::Integer(i),
            StoredExtensionValue::Bytes(b) => ExtensionValue::Bytes(b),
            StoredExtensionValue::Uri(s) => ExtensionValue::Uri(s),
            StoredExtensionValue::UriRef(s) => ExtensionValue::UriRef(s),
            StoredExtensionValue::Timestamp(t) => {
                ExtensionValue::Timestamp(time_from_stored(&t, "extension time")?)
            }
        };
        extensions.insert(name, value);
    }
    Ok(Event {
        id: body.id,
        source: body.source,
        event_type: body.event_type,
        spec_version: body.spec_version,
        subject: body.subject,
        time: body
            .time
            .map(|t| time_from_stored(&t, "time"))
            .transpose()?,
        data_content_type: body.data_content_type,
        data_schema: body.data_schema,
        data: match body.data {
            None => Data::None,
            Some(StoredData::Binary(b)) => Data::Binary(b),
            Some(StoredData::Text(t)) => Data::Text(t),
            Some(StoredData::Proto(any)) => Data::Proto {
                type_url: any.type_url,
                value: any.value,
            },
        },
        extensions,
        priority: Priority::from_i64(body.priority.into())
            .ok_or(BodyError::OutOfRange("priority"))?,
        correlation_id: body.correlation_id,
        causation_id: body.causation_id,
        traceparent: body.traceparent,
        reply_to: body.reply_to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_attribute() -> Event {
        let time = DateTime::from_timestamp(1_700_000_000, 123_456_789).expect("time");
        Event {
            id: "e-1".into(),
            source: "/planner".into(),
            event_type: "task.created".into(),
            spec_version: "1.0".into(),
            subject: Some("task/7".into()),
            time: Some(time),
            data_content_type: Some("application/json".into()),
            data_schema: Some("https://example.com/schema".into()),
            data: Data::Binary(vec![0, 0x1e, b'{', 255]),
            extensions: BTreeMap::from([
                ("s".into(), ExtensionValue::String("x".into())),
                ("b".into(), ExtensionValue::Bool(false)),
                ("i".into(), ExtensionValue::Integer(-3)),
                ("y".into(), ExtensionValue::Bytes(vec![1, 2])),
                ("u".into(), ExtensionValue::Uri("https://a/b".into())),
                ("r".into(), ExtensionValue::UriRef("/b".into())),
                ("t".into(), ExtensionValue::Timestamp(time)),
            ]),
            priority: Priority::High,
            correlation_id: Some("c".into()),
            causation_id: Some("d".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            reply_to: Some("inbox".into()),
        }
    }

    #[test]
    fn every_attribute_and_kind_of_data_round_trips() {
        let event = every_attribute();
        let datas = [
            Data::None,
            Data::Text(String::new()),
            Data::Text("{\"a\":1}".into()),
            Data::Binary(Vec::new()),
            Data::Proto {
                type_url: "type.googleapis.com/x.Y".into(),
                value: vec![8, 1],
            },
        ];
        assert_eq!(decode(&encode(&event)).expect("decode"), event);
        for data in datas {
            let event = Event {
                data,
                time: None,
                subject: None,
                extensions: BTreeMap::new(),
                ..event.clone()
            };
            assert_eq!(decode(&encode(&event)).expect("decode"), event);
        }
    }

    #[test]
    fn bodies_written_as_json_stay_readable() {
        let event = every_attribute();
        let json = serde_json::to_vec(&event).expect("json");
        assert_eq!(decode(&json).expect("decode"), event);
    }

    #[test]
    fn damaged_bodies_are_refused() {
        let mut truncated = encode(&every_attribute());
        truncated.truncate(truncated.len() - 3);
        assert!(matches!(decode(&truncated), Err(BodyError::Protobuf(_))));
        assert!(matches!(decode(&[7, 1]), Err(BodyError::UnknownFormat(7))));
        assert!(matches!(decode(&[]), Err(BodyError::Empty)));
        let bad_priority = [FORMAT_PROTOBUF_V1, 13 << 3, 9];
        assert!(matches!(
            decode(&bad_priority),
            Err(BodyError::OutOfRange("priority"))
        ));
    }
}
