//! The EventBus service: thin handlers that convert, call the bus and convert back.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt, future::ready};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{
    convert, pb,
    status::{invalid, to_status},
};
use crate::{
    bus::{Bus, BusError, DEFAULT_TENANT, ReplayRequest, decode_resume_token},
    event::{Event, InvalidInput},
    store::ReadQuery,
    telemetry,
};

/// Implements nerve.v1.EventBus.
pub struct EventBusApi {
    bus: Arc<Bus>,
}

impl EventBusApi {
    /// Wraps the bus.
    pub fn new(bus: Arc<Bus>) -> Self {
        EventBusApi { bus }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Reads the caller's grpc-timeout header ("100m", "5S", ...), when sent.
fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl pb::event_bus_server::EventBus for EventBusApi {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let header = call_traceparent(&request);
        let request = request.into_inner();
        let mut events = request
            .events
            .into_iter()
            .enumerate()
            .map(|(i, e)| convert::event_from_pb(e, &format!("events[{i}]")))
            .collect::<Result<Vec<_>, InvalidInput>>()
            .map_err(|e| to_status(e.into()))?;
        let span =
            tracing::info_span!("nerve.publish", otel.kind = "server", events = events.len());
        trace_events(&span, header.as_deref(), &mut events);
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let appended = self
            .bus
            .publish(DEFAULT_TENANT, events)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::PublishResponse {
            results: ids
                .into_iter()
                .zip(appended)
                .map(|(id, a)| pb::PublishResult {
                    id,
                    sequence: a.sequence,
                    duplicate: a.duplicate,
                })
                .collect(),
        }))
    }

    type SubscribeStream = ResponseStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let open = match inbound.message().await? {
            Some(pb::SubscribeRequest {
                action: Some(pb::subscribe_request::Action::Open(open)),
            }) => open,
            _ => {
                return Err(invalid(
                    "open",
                    "the first message must open the subscription",
                ));
            }
        };
        let spec =
            convert::subscribe_spec(open, DEFAULT_TENANT).map_err(|e| to_status(e.into()))?;
        // a broken inbound stream means the subscriber went away: end the command stream
        let commands = inbound.take_while(|m| ready(m.is_ok())).map(|m| match m {
            Ok(m) => convert::command(m).map_err(BusError::from),
            Err(status) => Err(BusError::FailedPrecondition(status.message().to_owned())),
        });
        let outbound = self
            .bus
            .subscribe(spec, Box::pin(commands))
            .await
            .map_err(to_status)?;
        let stream =
            ReceiverStream::new(outbound).map(|m| m.map(convert::outbound).map_err(to_status));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn request(
        &self,
        request: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let header = call_traceparent(&request);
        let request = request.into_inner();
        let event = request
            .event
            .ok_or_else(|| invalid("event", "is required"))?;
        let event = convert::event_from_pb(event, "event").map_err(|e| to_status(e.into()))?;
        let span =
            tracing::info_span!("nerve.request", otel.kind = "server", r#type = %event.event_type);
        let mut events = [event];
        trace_events(&span, header.as_deref(), &mut events);
        let [event] = events;
        let asked = request
            .timeout
            .map(|d| convert::duration_from_pb(&d, "timeout"))
            .transpose()
            .map_err(|e| to_status(e.into()))?;
        let timeout = match (asked, deadline) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        };
        let outcome = self
            .bus
            .request(DEFAULT_TENANT, event, timeout)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RequestResponse {
            reply: Some(convert::stored_to_pb(&outcome.reply)),
            request_sequence: outcome.request_sequence,
        }))
    }

    async fn reply(
        &self,
        request: Request<pb::ReplyRequest>,
    ) -> Result<Response<pb::ReplyResponse>, Status> {
        let header = call_traceparent(&request);
        let request = request.into_inner();
        let event = request
            .event
            .ok_or_else(|| invalid("event", "is required"))?;
        let mut event = convert::event_from_pb(event, "event").map_err(|e| to_status(e.into()))?;
        let span =
            tracing::info_span!("nerve.reply", otel.kind = "server", r#type = %event.event_type);
        // a reply without its own context continues the caller's; else the bus gives it the request's
        telemetry::continue_trace(&span, header.as_deref().or(event.traceparent.as_deref()));
        if event.traceparent.is_none() && header.is_some() {
            event.traceparent = telemetry::traceparent_of(&span, header.as_deref());
        }
        let (delivered, sequence) = self
            .bus
            .reply(DEFAULT_TENANT, &request.reply_to, event)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ReplyResponse {
            delivered,
            sequence: sequence.unwrap_or_default(),
        }))
    }

    type ReplayStream = ResponseStream<pb::ReplayResponse>;

    async fn replay(
        &self,
        request: Request<pb::ReplayRequest>,
    ) -> Result<Response<Self::ReplayStream>, Status> {
        let r = request.into_inner();
        let bad = |e: InvalidInput| to_status(e.into());
        let after = if r.resume_token.is_empty() {
            r.after_sequence
        } else {
            decode_resume_token(&r.resume_token).map_err(bad)?
        };
        let page_size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            _ => return Err(invalid("page_size", "must be at most 1000")),
        };
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let query = ReadQuery {
            tenant: DEFAULT_TENANT.to_owned(),
            after,
            until: (r.until_sequence != 0).then_some(r.until_sequence),
            types: convert::patterns(r.types, "types").map_err(bad)?,
            source: opt(r.source),
            subject: opt(r.subject),
            correlation_id: opt(r.correlation_id),
            recorded_from: r
                .start_time
                .map(|t| convert::time_from_pb(&t, "start_time"))
                .transpose()
                .map_err(bad)?,
            recorded_before: r
                .end_time
                .map(|t| convert::time_from_pb(&t, "end_time"))
                .transpose()
                .map_err(bad)?,
            priority: None,
            limit: 0,
        };
        let pages = self.bus.replay(ReplayRequest {
            query,
            limit: (r.limit != 0).then_some(u64::from(r.limit)),
            page_size,
        });
        let stream = ReceiverStream::new(pages).map(|page| {
            page.map(|p| pb::ReplayResponse {
                events: p.events.iter().map(|e| convert::stored_to_pb(e)).collect(),
                resume_token: p.resume_token,
                end_of_history: p.end_of_history,
            })
            .map_err(to_status)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The caller's W3C `traceparent` header, if any.
fn call_traceparent<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Continues the caller's trace (header, else the first event's) in `span`, and stamps events that
/// carry no trace context with it, so deliveries and replies continue the same trace.
fn trace_events(span: &tracing::Span, header: Option<&str>, events: &mut [Event]) {
    let parent = header.or_else(|| events.iter().find_map(|e| e.traceparent.as_deref()));
    telemetry::continue_trace(span, parent);
    let stamp = telemetry::traceparent_of(span, header);
    for event in events.iter_mut().filter(|e| e.traceparent.is_none()) {
        event.traceparent = stamp.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grpc_timeout_units() {
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert("grpc-timeout", v.parse().expect("header"));
            grpc_timeout(&r)
        };
        assert_eq!(with("300m"), Some(Duration::from_millis(300)));
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("5x"), None);
        assert_eq!(with("m"), None);
        assert_eq!(grpc_timeout(&Request::new(())), None);
    }
}
