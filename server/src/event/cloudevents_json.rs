//! The CloudEvents JSON format (structured mode), with Nerve's bus attributes as extensions.
//!
//! Bytes, URI and timestamp extensions become JSON strings, as the format specifies, and come back as
//! strings; everything else round-trips exactly.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{Data, Event, ExtensionValue, InvalidInput, Priority, StoredEvent};

fn is_json_content_type(ct: Option<&str>) -> bool {
    ct.is_none_or(|ct| {
        // media types are case-insensitive
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        mime == "application/json" || mime.ends_with("+json") || mime == "text/json"
    })
}

/// Renders an event (with its sequence and commit time when stored) in the CloudEvents JSON format.
pub fn to_cloudevents_json(event: &Event, stored: Option<&StoredEvent>) -> Value {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut out = Map::new();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_owned(), v);
    };
    put("specversion", event.spec_version.clone().into());
    put("id", event.id.clone().into());
    put("source", event.source.clone().into());
    put("type", event.event_type.clone().into());
    let optional = [
        ("subject", &event.subject),
        ("datacontenttype", &event.data_content_type),
        ("dataschema", &event.data_schema),
        ("correlationid", &event.correlation_id),
        ("causationid", &event.causation_id),
        ("traceparent", &event.traceparent),
        ("replyto", &event.reply_to),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            put(k, v.clone().into());
        }
    }
    if let Some(t) = event.time {
        put("time", rfc3339(t).into());
    }
    if event.priority != Priority::Normal {
        put("priority", event.priority.as_str().into());
    }
    for (name, value) in &event.extensions {
        let v = match value {
            ExtensionValue::Bool(b) => Value::Bool(*b),
            ExtensionValue::Integer(i) => Value::from(*i),
            other => Value::String(other.canonical()),
        };
        put(name, v);
    }
    match &event.data {
        Data::None => {}
        Data::Binary(bytes) => put("data_base64", b64.encode(bytes).into()),
        Data::Text(text) => {
            let as_json = is_json_content_type(event.data_content_type.as_deref())
                .then(|| serde_json::from_str::<Value>(text).ok())
                .flatten()
                // only when it renders back to the very same text, so the round trip is exact; a
                // `null` reads back as no data
                .filter(|v| {
                    !v.is_string()
                        && !v.is_null()
                        && serde_json::to_string(v).ok().as_deref() == Some(text)
                });
            put(
                "data",
                as_json.unwrap_or_else(|| Value::String(text.clone())),
            );
        }
        Data::Proto { type_url, value } => {
            put("protodatatype", type_url.clone().into());
            put("data_base64", b64.encode(value).into());
        }
    }
    if let Some(stored) = stored {
        put("sequence", stored.sequence.to_string().into());
        put("recordedtime", rfc3339(stored.recorded_at).into());
    }
    Value::Object(out)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Parses a CloudEvents JSON event; bus attributes come from their extensions. Sequence and commit time are ignored.
pub fn from_cloudevents_json(value: &Value) -> Result<Event, InvalidInput> {
    let obj = value
        .as_object()
        .ok_or_else(|| InvalidInput::field("event", "must be a JSON object"))?;
    let string = |k: &str| -> Result<Option<String>, InvalidInput> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(InvalidInput::field(k, "must be a string")),
        }
    };
    let time = |k: &str| -> Result<Option<DateTime<Utc>>, InvalidInput> {
        string(k)?
            .map(|s| {
                DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| InvalidInput::field(k, format!("not an RFC 3339 time: {e}")))
            })
            .transpose()
    };
    let b64 = &base64::engine::general_purpose::STANDARD;
    let decode = |k: &str, s: &str| {
        b64.decode(s)
            .map_err(|e| InvalidInput::field(k, format!("not base64: {e}")))
    };
    let mut event = Event {
        id: string("id")?.unwrap_or_default(),
        source: string("source")?.unwrap_or_default(),
        event_type: string("type")?.unwrap_or_default(),
        spec_version: string("specversion")?.unwrap_or_default(),
        subject: string("subject")?,
        time: time("time")?,
        data_content_type: string("datacontenttype")?,
        data_schema: string("dataschema")?,
        correlation_id: string("correlationid")?,
        causation_id: string("causationid")?,
        traceparent: string("traceparent")?,
        reply_to: string("replyto")?,
        ..Event::default()
    };
    if let Some(p) = string("priority")? {
        event.priority = Priority::parse(&p).ok_or_else(|| {
            InvalidInput::field("priority", "must be one of critical, high, normal, low")
        })?;
    }
    let proto_type = string("protodatatype")?;
    // a null attribute is an absent one (CloudEvents' JSON format, type system mapping)
    let data = obj.get("data").filter(|d| !d.is_null());
    event.data = match (data, string("data_base64")?, proto_type) {
        (Some(_), Some(_), _) => {
            return Err(InvalidInput::field(
                "data",
                "data and data_base64 are mutually exclusive",
            ));
        }
        (None, None, _) => Data::None,
        (None, Some(encoded), Some(type_url)) => Data::Proto {
            type_url,
            value: decode("data_base64", &encoded)?,
        },
        (None, Some(encoded), None) => Data::Binary(decode("data_base64", &encoded)?),
        (Some(Value::String(s)), None, _) => Data::Text(s.clone()),
        (Some(other), None, _) => Data::Text(other.to_string()),
    };
    const SKIP: &[&str] = &[
        "id",
        "source",
        "type",
        "specversion",
        "subject",
        "time",
        "datacontenttype",
        "dataschema",
        "correlationid",
        "causationid",
        "traceparent",
        "replyto",
        "priority",
        "protodatatype",
        "data",
        "data_base64",
        "sequence",
        "recordedtime",
    ];
    for (name, value) in obj {
        if SKIP.contains(&name.as_str()) || value.is_null() {
            continue;
        }
        let ext = match value {
            Value::String(s) => ExtensionValue::String(s.clone()),
            Value::Bool(b) => ExtensionValue::Bool(*b),
            Value::Number(n) => n
                .as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .map(ExtensionValue::Integer)
                .ok_or_else(|| {
                    InvalidInput::field(name.as_str(), "numbers must be 32-bit integers")
                })?,
            _ => {
                return Err(InvalidInput::field(
                    name.as_str(),
                    "extension values must be strings, booleans or integers",
                ));
            }
        };
        event.extensions.insert(name.clone(), ext);
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format's own example carries `"unsetextension": null`: a null attribute is absent.
    #[test]
    fn a_null_attribute_is_absent() {
        let event = from_cloudevents_json(&serde_json::json!({
            "specversion": "1.0", "id": "1", "source": "/s", "type": "a.b",
            "unsetextension": null, "subject": null,
            "data": null, "data_base64": "AAE=",
        }))
        .expect("parses");
        assert!(event.extensions.is_empty(), "{:?}", event.extensions);
        assert_eq!(event.subject, None);
        assert_eq!(event.data, Data::Binary(vec![0, 1]));
    }

    #[test]
    fn a_json_content_type_is_recognised_in_any_case() {
        let event = Event {
            id: "1".into(),
            source: "/s".into(),
            event_type: "a.b".into(),
            spec_version: "1.0".into(),
            data_content_type: Some("Application/JSON; charset=utf-8".into()),
            data: Data::Text(r#"{"a":1}"#.into()),
            ..Event::default()
        };
        assert_eq!(to_cloudevents_json(&event, None)["data"]["a"], 1);
    }

    #[test]
    fn json_round_trip_is_exact() {
        let mut event = Event {
            id: "e1".into(),
            source: "//svc".into(),
            event_type: "a.b.v1".into(),
            spec_version: "1.0".into(),
            subject: Some("s".into()),
            time: Some(DateTime::from_timestamp(1_700_000_000, 123_456_789).expect("time")),
            data_content_type: Some("application/json".into()),
            data: Data::Text(r#"{"a":1}"#.into()),
            priority: Priority::High,
            correlation_id: Some("c".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            ..Event::default()
        };
        event
            .extensions
            .insert("n".into(), ExtensionValue::Integer(7));
        event
            .extensions
            .insert("flag".into(), ExtensionValue::Bool(true));
        event
            .extensions
            .insert("s".into(), ExtensionValue::String("x".into()));
        let json = to_cloudevents_json(&event, None);
        assert_eq!(json["data"]["a"], 1);
        assert_eq!(from_cloudevents_json(&json).expect("parses"), event);

        for text in [r#"{"a": 1}"#, "\"quoted\"", "plain", "null"] {
            let e = Event {
                data: Data::Text(text.into()),
                ..event.clone()
            };
            assert_eq!(
                from_cloudevents_json(&to_cloudevents_json(&e, None)).expect("parses"),
                e
            );
        }
        for data in [
            Data::Binary(vec![0, 1, 2]),
            Data::Proto {
                type_url: "type.googleapis.com/x.Y".into(),
                value: vec![8, 1],
            },
        ] {
            let e = Event {
                data,
                ..event.clone()
            };
            assert_eq!(
                from_cloudevents_json(&to_cloudevents_json(&e, None)).expect("parses"),
                e
            );
        }
    }
}
