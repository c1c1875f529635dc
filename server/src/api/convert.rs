//! Conversions between protobuf messages and domain types; the only code that knows both.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};

use super::cloudevents as ce;
use super::pb;
use crate::{
    bus::{Command, Delivery, Outbound, Start, SubscribeSpec},
    event::{
        Data, Event, ExtensionValue, Filter, FilterKind, InvalidInput, MAX_FILTER_DEPTH, Priority,
        Selection, StoredEvent, TypePattern,
    },
};

type Result<T> = std::result::Result<T, InvalidInput>;

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Seconds of 0001-01-01T00:00:00Z and of 9999-12-31T23:59:59Z: the range of a protobuf Timestamp,
/// outside which JSON encoders (grpcurl's, protobuf's own) refuse it and RFC 3339 cannot write it.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// Converts a protobuf timestamp, rejecting out-of-range values.
pub fn time_from_pb(t: &prost_types::Timestamp, field: &str) -> Result<DateTime<Utc>> {
    if !TIMESTAMP_SECONDS.contains(&t.seconds) {
        return Err(InvalidInput::field(
            field,
            "is outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z, the range of a timestamp",
        ));
    }
    u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or_else(|| InvalidInput::field(field, "is not a valid timestamp"))
}

/// Converts to a protobuf timestamp.
pub fn time_to_pb(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// Converts a protobuf duration, rejecting negative values.
pub fn duration_from_pb(d: &prost_types::Duration, field: &str) -> Result<Duration> {
    if d.seconds < 0 || (d.seconds == 0 && d.nanos < 0) {
        return Err(InvalidInput::field(
            field,
            "must be a non-negative duration",
        ));
    }
    // protobuf's own rule: nanos within a second, with the sign of seconds
    if !(0..1_000_000_000).contains(&d.nanos) {
        return Err(InvalidInput::field(
            field,
            "nanos must be 0 to 999,999,999 (whole seconds go into seconds)",
        ));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn priority_from_pb(value: i32, field: &str) -> Result<Priority> {
    match pb::Priority::try_from(value) {
        Ok(pb::Priority::Unspecified) | Ok(pb::Priority::Normal) => Ok(Priority::Normal),
        Ok(pb::Priority::Low) => Ok(Priority::Low),
        Ok(pb::Priority::High) => Ok(Priority::High),
        Ok(pb::Priority::Critical) => Ok(Priority::Critical),
        Err(_) => Err(InvalidInput::field(
            field,
            format!("unknown priority value {value}"),
        )),
    }
}

fn priority_to_pb(p: Priority) -> pb::Priority {
    match p {
        Priority::Low => pb::Priority::Low,
        Priority::Normal => pb::Priority::Normal,
        Priority::High => pb::Priority::High,
        Priority::Critical => pb::Priority::Critical,
    }
}

fn extension_from_pb(v: pb::ExtensionValue, field: &str) -> Result<ExtensionValue> {
    use pb::extension_value::Value;
    Ok(match v.value {
        Some(Value::StringValue(s)) => ExtensionValue::String(s),
        Some(Value::BoolValue(b)) => ExtensionValue::Bool(b),
        Some(Value::IntegerValue(i)) => ExtensionValue::Integer(i),
        Some(Value::BytesValue(b)) => ExtensionValue::Bytes(b),
        Some(Value::UriValue(s)) => ExtensionValue::Uri(s),
        Some(Value::UriRefValue(s)) => ExtensionValue::UriRef(s),
        Some(Value::TimestampValue(t)) => ExtensionValue::Timestamp(time_from_pb(&t, field)?),
        None => return Err(InvalidInput::field(field, "has no value")),
    })
}

fn extension_to_pb(v: &ExtensionValue) -> pb::ExtensionValue {
    use pb::extension_value::Value;
    pb::ExtensionValue {
        value: Some(match v {
            ExtensionValue::String(s) => Value::StringValue(s.clone()),
            ExtensionValue::Bool(b) => Value::BoolValue(*b),
            ExtensionValue::Integer(i) => Value::IntegerValue(*i),
            ExtensionValue::Bytes(b) => Value::BytesValue(b.clone()),
            ExtensionValue::Uri(s) => Value::UriValue(s.clone()),
            ExtensionValue::UriRef(s) => Value::UriRefValue(s.clone()),
            ExtensionValue::Timestamp(t) => Value::TimestampValue(time_to_pb(*t)),
        }),
    }
}

/// Converts a protobuf event; `field` is its path in the request.
pub fn event_from_pb(e: pb::Event, field: &str) -> Result<Event> {
    use pb::event::Data as PbData;
    let time = e
        .time
        .map(|t| time_from_pb(&t, &format!("{field}.time")))
        .transpose()?;
    let mut extensions = BTreeMap::new();
    for (name, value) in e.extensions {
        let path = format!("{field}.extensions[{name:?}]");
        extensions.insert(name, extension_from_pb(value, &path)?);
    }
    Ok(Event {
        id: e.id,
        source: e.source,
        event_type: e.r#type,
        spec_version: e.spec_version,
        subject: opt(e.subject),
        time,
        data_content_type: opt(e.data_content_type),
        data_schema: opt(e.data_schema),
        data: match e.data {
            None => Data::None,
            Some(PbData::BinaryData(b)) => Data::Binary(b),
            Some(PbData::TextData(t)) => Data::Text(t),
            Some(PbData::ProtoData(any)) => Data::Proto {
                type_url: any.type_url,
                value: any.value,
            },
        },
        extensions,
        priority: priority_from_pb(e.priority, &format!("{field}.priority"))?,
        correlation_id: opt(e.correlation_id),
        causation_id: opt(e.causation_id),
        traceparent: opt(e.traceparent),
        reply_to: opt(e.reply_to),
    })
}

/// Converts a domain event, with its sequence and commit time when stored.
pub fn event_to_pb(e: &Event, stored: Option<&StoredEvent>) -> pb::Event {
    event_into_pb(e.clone(), stored.map(|s| (s.sequence, s.recorded_at)))
}

/// Converts an owned event, moving its strings and data; `stored` is its (sequence, recorded time).
fn event_into_pb(e: Event, stored: Option<(u64, DateTime<Utc>)>) -> pb::Event {
    use pb::event::Data as PbData;
    pb::Event {
        id: e.id,
        source: e.source,
        r#type: e.event_type,
        spec_version: e.spec_version,
        subject: e.subject.unwrap_or_default(),
        time: e.time.map(time_to_pb),
        data_content_type: e.data_content_type.unwrap_or_default(),
        data_schema: e.data_schema.unwrap_or_default(),
        data: match e.data {
            Data::None => None,
            Data::Binary(b) => Some(PbData::BinaryData(b)),
            Data::Text(t) => Some(PbData::TextData(t)),
            Data::Proto { type_url, value } => {
                Some(PbData::ProtoData(prost_types::Any { type_url, value }))
            }
        },
        extensions: e
            .extensions
            .into_iter()
            .map(|(k, v)| (k, extension_to_pb(&v)))
            .collect(),
        priority: priority_to_pb(e.priority) as i32,
        correlation_id: e.correlation_id.unwrap_or_default(),
        causation_id: e.causation_id.unwrap_or_default(),
        traceparent: e.traceparent.unwrap_or_default(),
        reply_to: e.reply_to.unwrap_or_default(),
        sequence: stored.map_or(0, |s| s.0),
        recorded_time: stored.map(|s| time_to_pb(s.1)),
    }
}

/// Converts a stored event.
pub fn stored_to_pb(s: &StoredEvent) -> pb::Event {
    event_to_pb(&s.event, Some(s))
}

/// Converts a stored event, moving out of it when nothing else holds it (history pages; not the live tail).
fn stored_into_pb(s: Arc<StoredEvent>) -> pb::Event {
    match Arc::try_unwrap(s) {
        Ok(s) => event_into_pb(s.event, Some((s.sequence, s.recorded_at))),
        Err(shared) => stored_to_pb(&shared),
    }
}

/// Most type patterns one selection may list: each literal type is its own index range in a read, one
/// per priority level on the embedded store, and SQLite merges at most 500 ranges in one statement.
pub const MAX_TYPE_PATTERNS: usize = 100;

/// The answer to one PublishStream request: its results, or the status a Publish call would have ended
/// with.
pub fn publish_answer(
    request_id: u64,
    outcome: std::result::Result<pb::PublishResponse, tonic::Status>,
) -> pb::PublishStreamResponse {
    use pb::publish_stream_response::Outcome;
    pb::PublishStreamResponse {
        request_id,
        outcome: Some(match outcome {
            Ok(published) => Outcome::Published(published),
            Err(status) => Outcome::Error(pb::PublishError {
                code: status.code() as i32,
                message: status.message().to_owned(),
                details: status.details().to_vec(),
            }),
        }),
    }
}

/// Parses type patterns; `field` is the repeated field's path.
pub fn patterns(types: Vec<String>, field: &str) -> Result<Vec<TypePattern>> {
    if types.len() > MAX_TYPE_PATTERNS {
        return Err(InvalidInput::field(
            field,
            format!(
                "{} type patterns, more than the limit of {MAX_TYPE_PATTERNS}; use wildcards",
                types.len()
            ),
        ));
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            TypePattern::parse(t)
                .map_err(|reason| InvalidInput::field(format!("{field}[{i}]"), reason))
        })
        .collect()
}

/// Converts a filter, bounding recursion before validation sees it.
pub fn filter_from_pb(f: pb::Filter, field: &str) -> Result<Filter> {
    filter_at(f, field, 1)
}

fn filter_at(f: pb::Filter, field: &str, depth: usize) -> Result<Filter> {
    use pb::filter::Filter as F;
    if depth > MAX_FILTER_DEPTH {
        return Err(InvalidInput::field(
            field,
            format!("filter nests deeper than {MAX_FILTER_DEPTH}"),
        ));
    }
    let kind = match f.filter {
        None => return Err(InvalidInput::field(field, "names no dialect")),
        Some(F::Exact(v)) => FilterKind::Exact(v.attributes.into_iter().collect()),
        Some(F::Prefix(v)) => FilterKind::Prefix(v.attributes.into_iter().collect()),
        Some(F::Suffix(v)) => FilterKind::Suffix(v.attributes.into_iter().collect()),
        Some(F::All(list)) => FilterKind::All(filter_list(list, &format!("{field}.all"), depth)?),
        Some(F::Any(list)) => FilterKind::Any(filter_list(list, &format!("{field}.any"), depth)?),
        Some(F::Negate(inner)) => FilterKind::Not(Box::new(filter_at(
            *inner,
            &format!("{field}.negate"),
            depth + 1,
        )?)),
    };
    // the rest (names, values, size) is checked by the bus, which knows the attribute limit
    Ok(Filter(kind))
}

fn filter_list(list: pb::FilterList, field: &str, depth: usize) -> Result<Vec<Filter>> {
    list.filters
        .into_iter()
        .enumerate()
        .map(|(i, f)| filter_at(f, &format!("{field}.filters[{i}]"), depth + 1))
        .collect()
}

/// Converts the open message.
pub fn subscribe_spec(open: pb::SubscriptionOpen, tenant: &str) -> Result<SubscribeSpec> {
    use pb::start_position::Position;
    let selection = Selection {
        types: patterns(open.types, "open.types")?,
        filter: open
            .filter
            .map(|f| filter_from_pb(f, "open.filter"))
            .transpose()?,
    };
    let start = match open.start.and_then(|s| s.position) {
        None | Some(Position::Latest(())) => Start::Latest,
        Some(Position::Earliest(())) => Start::Earliest,
        Some(Position::AfterSequence(s)) => Start::AfterSequence(s),
        Some(Position::Time(t)) => Start::Time(time_from_pb(&t, "open.start.time")?),
    };
    let group = opt(open.group);
    // before the API looks the group up for the caller's grants: a name no backend can store is the
    // caller's mistake, not the database's error
    if let Some(name) = &group {
        crate::bus::validate_group_name(name, "open.group")?;
    }
    let nonzero = |v: u32| (v != 0).then_some(v);
    Ok(SubscribeSpec {
        tenant: tenant.to_owned(),
        selection,
        group,
        start,
        max_in_flight: nonzero(open.max_in_flight),
        ack_deadline: open
            .ack_deadline
            .map(|d| duration_from_pb(&d, "open.ack_deadline"))
            .transpose()?,
        max_attempts: nonzero(open.max_attempts),
        heartbeat: open
            .heartbeat_interval
            .map(|d| duration_from_pb(&d, "open.heartbeat_interval"))
            .transpose()?,
        // the caller's grants decide it (api::event_bus)
        may_read_history: false,
    })
}

/// Converts a message sent after the open message.
pub fn command(msg: pb::SubscribeRequest) -> Result<Command> {
    use pb::subscribe_request::Action;
    match msg.action {
        None => Err(InvalidInput::field("action", "is required")),
        Some(Action::Open(_)) => Err(InvalidInput::field(
            "open",
            "the subscription is already open; send open only once, first",
        )),
        Some(Action::Ack(a)) => Ok(Command::Ack(a.delivery_ids)),
        Some(Action::Nack(n)) => Ok(Command::Nack {
            reason: nack_reason(n.reason),
            delivery_ids: n.delivery_ids,
            retry_delay: n
                .retry_delay
                .map(|d| duration_from_pb(&d, "nack.retry_delay"))
                .transpose()?
                .unwrap_or_default(),
            dead_letter: n.dead_letter,
        }),
        Some(Action::Extend(e)) => Ok(Command::Extend {
            delivery_ids: e.delivery_ids,
            extension: e
                .extension
                .map(|d| duration_from_pb(&d, "extend.extension"))
                .transpose()?
                .ok_or_else(|| InvalidInput::field("extend.extension", "is required"))?,
        }),
        Some(Action::Credit(c)) => Ok(Command::Credit(c.credits)),
        Some(Action::SetFilter(f)) => Ok(Command::SetFilter(
            f.filter
                .map(|f| filter_from_pb(f, "set_filter.filter"))
                .transpose()?,
        )),
        Some(Action::Close(_)) => Ok(Command::Close),
    }
}

/// Converts a server message into the responses it stands for, in order.
pub fn outbound(message: Outbound) -> Vec<pb::SubscribeResponse> {
    use pb::subscribe_response::Message;
    let response = |message| pb::SubscribeResponse {
        message: Some(message),
    };
    let one = |message| vec![response(message)];
    match message {
        Outbound::Subscribed {
            subscription_id,
            group,
            head_sequence,
            heartbeat,
            max_in_flight,
        } => one(Message::Subscribed(pb::Subscribed {
            subscription_id,
            group: group.unwrap_or_default(),
            head_sequence,
            heartbeat_interval: prost_types::Duration::try_from(heartbeat).ok(),
            max_in_flight,
        })),
        Outbound::Deliveries(all) => all
            .into_iter()
            .map(|d| response(Message::Delivery(delivery_to_pb(d))))
            .collect(),
        Outbound::Heartbeat {
            head_sequence,
            in_flight,
            credits,
        } => one(Message::Heartbeat(pb::Heartbeat {
            time: Some(time_to_pb(Utc::now())),
            head_sequence,
            in_flight,
            credits,
        })),
        Outbound::CaughtUp { sequence } => one(Message::CaughtUp(pb::CaughtUp { sequence })),
    }
}

fn delivery_to_pb(d: Delivery) -> pb::Delivery {
    pb::Delivery {
        event: Some(stored_into_pb(d.event)),
        delivery_id: d.delivery_id,
        attempt: d.attempt,
        ack_deadline: d.ack_deadline.map(time_to_pb),
    }
}

// Bus attributes travel as these CloudEvents extensions in the CloudEvents formats.
const EXT_PRIORITY: &str = "priority";
const EXT_CORRELATION: &str = "correlationid";
const EXT_CAUSATION: &str = "causationid";
const EXT_TRACEPARENT: &str = "traceparent";
const EXT_REPLY_TO: &str = "replyto";

fn ce_value(
    v: ce::cloud_event::cloud_event_attribute_value::Attr,
) -> ce::cloud_event::CloudEventAttributeValue {
    ce::cloud_event::CloudEventAttributeValue { attr: Some(v) }
}

/// Converts to the official CloudEvents protobuf format; bus attributes become extensions.
pub fn to_cloudevent(e: &Event) -> ce::CloudEvent {
    use ce::cloud_event::{Data as CeData, cloud_event_attribute_value::Attr};
    let mut attributes = std::collections::HashMap::new();
    let mut put_str = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            attributes.insert(k.to_owned(), ce_value(Attr::CeString(v.clone())));
        }
    };
    put_str("subject", &e.subject);
    put_str("datacontenttype", &e.data_content_type);
    put_str(EXT_CORRELATION, &e.correlation_id);
    put_str(EXT_CAUSATION, &e.causation_id);
    put_str(EXT_TRACEPARENT, &e.traceparent);
    put_str(EXT_REPLY_TO, &e.reply_to);
    if let Some(schema) = &e.data_schema {
        attributes.insert("dataschema".into(), ce_value(Attr::CeUri(schema.clone())));
    }
    if let Some(t) = e.time {
        attributes.insert("time".into(), ce_value(Attr::CeTimestamp(time_to_pb(t))));
    }
    if e.priority != Priority::Normal {
        attributes.insert(
            EXT_PRIORITY.into(),
            ce_value(Attr::CeString(e.priority.as_str().into())),
        );
    }
    for (name, value) in &e.extensions {
        let attr = match value {
            ExtensionValue::String(s) => Attr::CeString(s.clone()),
            ExtensionValue::Bool(b) => Attr::CeBoolean(*b),
            ExtensionValue::Integer(i) => Attr::CeInteger(*i),
            ExtensionValue::Bytes(b) => Attr::CeBytes(b.clone()),
            ExtensionValue::Uri(s) => Attr::CeUri(s.clone()),
            ExtensionValue::UriRef(s) => Attr::CeUriRef(s.clone()),
            ExtensionValue::Timestamp(t) => Attr::CeTimestamp(time_to_pb(*t)),
        };
        attributes.insert(name.clone(), ce_value(attr));
    }
    ce::CloudEvent {
        id: e.id.clone(),
        source: e.source.clone(),
        spec_version: e.spec_version.clone(),
        r#type: e.event_type.clone(),
        attributes,
        data: match &e.data {
            Data::None => None,
            Data::Binary(b) => Some(CeData::BinaryData(b.clone())),
            Data::Text(t) => Some(CeData::TextData(t.clone())),
            Data::Proto { type_url, value } => Some(CeData::ProtoData(prost_types::Any {
                type_url: type_url.clone(),
                value: value.clone(),
            })),
        },
    }
}

/// Converts from the official CloudEvents protobuf format; the bus extensions fill the bus attributes.
pub fn from_cloudevent(c: ce::CloudEvent) -> Result<Event> {
    use ce::cloud_event::{Data as CeData, cloud_event_attribute_value::Attr};
    let mut event = Event {
        id: c.id,
        source: c.source,
        spec_version: c.spec_version,
        event_type: c.r#type,
        data: match c.data {
            None => Data::None,
            Some(CeData::BinaryData(b)) => Data::Binary(b),
            Some(CeData::TextData(t)) => Data::Text(t),
            Some(CeData::ProtoData(any)) => Data::Proto {
                type_url: any.type_url,
                value: any.value,
            },
        },
        ..Event::default()
    };
    for (name, value) in c.attributes {
        let field = format!("attributes[{name:?}]");
        let Some(attr) = value.attr else {
            return Err(InvalidInput::field(field, "has no value"));
        };
        let text = |attr: &Attr| match attr {
            Attr::CeString(s) | Attr::CeUri(s) | Attr::CeUriRef(s) => Some(s.clone()),
            _ => None,
        };
        let want_text = |attr: &Attr| {
            text(attr).ok_or_else(|| InvalidInput::field(field.clone(), "must be a string"))
        };
        match name.as_str() {
            "subject" => event.subject = Some(want_text(&attr)?),
            "datacontenttype" => event.data_content_type = Some(want_text(&attr)?),
            "dataschema" => event.data_schema = Some(want_text(&attr)?),
            "time" => match &attr {
                Attr::CeTimestamp(t) => event.time = Some(time_from_pb(t, &field)?),
                _ => return Err(InvalidInput::field(field, "must be a timestamp")),
            },
            EXT_PRIORITY => {
                event.priority = Priority::parse(&want_text(&attr)?).ok_or_else(|| {
                    InvalidInput::field(field.clone(), "must be critical, high, normal or low")
                })?
            }
            EXT_CORRELATION => event.correlation_id = Some(want_text(&attr)?),
            EXT_CAUSATION => event.causation_id = Some(want_text(&attr)?),
            EXT_TRACEPARENT => event.traceparent = Some(want_text(&attr)?),
            EXT_REPLY_TO => event.reply_to = Some(want_text(&attr)?),
            _ => {
                let value = match attr {
                    Attr::CeString(s) => ExtensionValue::String(s),
                    Attr::CeBoolean(b) => ExtensionValue::Bool(b),
                    Attr::CeInteger(i) => ExtensionValue::Integer(i),
                    Attr::CeBytes(b) => ExtensionValue::Bytes(b),
                    Attr::CeUri(s) => ExtensionValue::Uri(s),
                    Attr::CeUriRef(s) => ExtensionValue::UriRef(s),
                    Attr::CeTimestamp(t) => ExtensionValue::Timestamp(time_from_pb(&t, &field)?),
                };
                event.extensions.insert(name, value);
            }
        }
    }
    Ok(event)
}

/// Most bytes of a nack's reason kept; it is stored with the entry and its dead letter.
const MAX_NACK_REASON: usize = 1024;

/// A nack's reason, if any, as it is stored: its first [`MAX_NACK_REASON`] bytes, NUL escaped (Postgres
/// refuses it in text). A reason is what a failing consumer had at hand (an exception's text, a
/// traceback): refusing it would end the stream and cost every delivery in flight an attempt.
fn nack_reason(reason: String) -> Option<String> {
    let head = super::status::bounded(&reason, MAX_NACK_REASON);
    opt(head.replace('\0', "\\u{0}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ce::cloud_event::cloud_event_attribute_value::Attr;

    fn full_event() -> Event {
        let mut e = Event {
            id: "e1".into(),
            source: "//svc".into(),
            event_type: "a.b.v1".into(),
            spec_version: "1.0".into(),
            subject: Some("s".into()),
            time: DateTime::from_timestamp(1_700_000_000, 7),
            data_content_type: Some("application/octet-stream".into()),
            data_schema: Some("https://schemas.example/x".into()),
            data: Data::Binary(vec![1, 2, 3]),
            priority: Priority::Critical,
            correlation_id: Some("c".into()),
            causation_id: Some("cause".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            reply_to: Some("_inbox.x".into()),
            ..Event::default()
        };
        let ext = [
            ("str", ExtensionValue::String("v".into())),
            ("flag", ExtensionValue::Bool(false)),
            ("count", ExtensionValue::Integer(-3)),
            ("blob", ExtensionValue::Bytes(vec![9])),
            ("link", ExtensionValue::Uri("https://x".into())),
            ("rel", ExtensionValue::UriRef("/x".into())),
            (
                "at",
                ExtensionValue::Timestamp(DateTime::from_timestamp(5, 6).expect("time")),
            ),
        ];
        for (k, v) in ext {
            e.extensions.insert(k.into(), v);
        }
        e
    }

    #[test]
    fn a_duration_is_refused_for_what_is_wrong_with_it() {
        let refused = |seconds, nanos| {
            duration_from_pb(&prost_types::Duration { seconds, nanos }, "d")
                .expect_err("refused")
                .to_string()
        };
        assert!(refused(-1, 0).contains("non-negative"));
        assert!(refused(0, -1).contains("non-negative"));
        assert!(refused(5, -1).contains("nanos must be 0 to 999,999,999"));
        assert!(refused(1, 1_000_000_000).contains("nanos must be 0 to 999,999,999"));
        let most = prost_types::Duration {
            seconds: 1,
            nanos: 999_999_999,
        };
        assert_eq!(
            duration_from_pb(&most, "d").expect("valid"),
            Duration::new(1, 999_999_999)
        );
    }

    #[test]
    fn nerve_to_cloudevent_and_back_is_exact() {
        for data in [
            Data::None,
            Data::Binary(vec![0, 1]),
            Data::Text("hi".into()),
            Data::Proto {
                type_url: "type.googleapis.com/x.Y".into(),
                value: vec![8, 1],
            },
        ] {
            let e = Event {
                data,
                ..full_event()
            };
            assert_eq!(from_cloudevent(to_cloudevent(&e)).expect("converts"), e);
        }
        let minimal = Event {
            id: "m".into(),
            source: "//s".into(),
            event_type: "t".into(),
            spec_version: "1.0".into(),
            ..Event::default()
        };
        assert_eq!(
            from_cloudevent(to_cloudevent(&minimal)).expect("converts"),
            minimal
        );
    }

    #[test]
    fn cloudevent_to_nerve_and_back_is_exact() {
        let original = to_cloudevent(&full_event());
        assert!(matches!(
            original.attributes["count"].attr,
            Some(Attr::CeInteger(-3))
        ));
        let back = to_cloudevent(&from_cloudevent(original.clone()).expect("converts"));
        assert_eq!(back, original);
    }

    #[test]
    fn wrong_attribute_types_are_rejected() {
        let mut c = to_cloudevent(&full_event());
        c.attributes
            .insert("time".into(), ce_value(Attr::CeString("yesterday".into())));
        assert!(from_cloudevent(c).is_err());
    }
}
