//! The EventBus service: thin handlers that convert, call the bus and convert back.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, Stream, StreamExt, future::ready};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{
    convert, pb,
    status::{invalid, to_status},
};
use crate::{
    auth::{Action, Auth, Principal},
    bus::{Bus, BusError, ReplayRequest, Start, decode_resume_token},
    event::{Event, InvalidInput, TypePattern, check_text},
    store::ReadQuery,
    telemetry,
};

/// Implements nerve.v1.EventBus.
#[derive(Clone)]
pub struct EventBusApi {
    bus: Arc<Bus>,
    auth: Arc<Auth>,
    stream_open_timeout: Duration,
}

impl EventBusApi {
    /// Wraps the bus; every call is checked with `auth`.
    pub fn new(bus: Arc<Bus>, auth: Arc<Auth>, stream_open_timeout: Duration) -> Self {
        EventBusApi {
            bus,
            auth,
            stream_open_timeout,
        }
    }
}

/// Requests of one PublishStream queued for commit and not yet answered; beyond this the stream is not
/// read until answers go out, so a publisher cannot queue without bound.
const PUBLISH_STREAM_IN_FLIGHT: usize = 1024;
/// Events of one PublishStream's requests whose answers the transport has not taken yet: each holds
/// its id (and, until committed, its type label), so once this many are unanswered the stream is not
/// read, which bounds what a publisher that does not read its answers keeps in memory (at the
/// default limits, 1 KiB ids, about 12 MB: this bound plus one batch). A request is read whenever
/// it holds nothing, whatever its size.
const PUBLISH_STREAM_EVENTS_IN_FLIGHT: usize = 8 * 1024;
/// Answers of one PublishStream waiting for the publisher to read them.
const PUBLISH_STREAM_ANSWERS: usize = 256;

impl EventBusApi {
    /// Converts and authorizes a batch as sent; returns its events, the span of its publish and the
    /// traceparent to record on its events that carry none.
    fn checked_batch(
        &self,
        principal: &Principal,
        header: Option<&str>,
        events: Vec<pb::Event>,
    ) -> Result<(Vec<Event>, tracing::Span, Option<String>), Status> {
        // before converting: a message of millions of empty events would otherwise be copied whole
        self.bus
            .limits()
            .check_batch_count(events.len())
            .map_err(|e| to_status(e.into()))?;
        let events = InvalidInput::gather(events, |i, e| {
            convert::event_from_pb(e, &format!("events[{i}]"))
        })
        .map_err(|e| to_status(e.into()))?;
        // an inbox in a published event would route a responder's answer into someone else's waiting
        // Request: inboxes are the server's to give, on Request (which publishes through the bus)
        if let Some(i) = events.iter().position(|e| e.reply_to.is_some()) {
            return Err(invalid(
                &format!("events[{i}].reply_to"),
                "is set by the server on requests; send requests with Request",
            ));
        }
        for event in &events {
            self.auth
                .check(principal, "publish", &event.event_type, |e| {
                    e.publish(&event.event_type, &event.source)
                })
                .map_err(denied)?;
        }
        // The log layer keeps a formatted copy of every enabled span's fields: ~4 % of the server's
        // samples at 10K one-event publishes/s. Unless spans are exported, this one is made at debug
        // level, so it costs nothing at the default level and still gives debug logs their context.
        let span = if telemetry::exporting() {
            tracing::info_span!(
                "nerve.publish",
                otel.kind = "server",
                events = events.len(),
                principal = %principal.id
            )
        } else {
            tracing::debug_span!("nerve.publish", events = events.len(), principal = %principal.id)
        };
        let trace = trace_events(&span, header, &events);
        Ok((events, span, trace))
    }

    /// Serves one PublishStream: checks and queues each request in the order received (so commits keep
    /// that order), and answers each as its commit ends, in the same order. Ends when the publisher
    /// closes its side and every answer is out, or when either side goes away. When the server shuts
    /// down it reads no more requests, answers the ones it read, then ends the stream with UNAVAILABLE.
    async fn serve_publish_stream(
        self,
        principal: Principal,
        header: Option<String>,
        mut inbound: Streaming<pb::PublishStreamRequest>,
        answers: tokio::sync::mpsc::Sender<(usize, Result<pb::PublishStreamResponse, Status>)>,
        in_flight: Arc<EventsInFlight>,
    ) {
        let mut queued = futures::stream::FuturesOrdered::new();
        let mut reading = true;
        // why the stream ends, when not at the publisher's close: it is sent once the requests read
        // before are answered
        let mut ending = None;
        let token_expiry = principal.token_expiry();
        tokio::pin!(token_expiry);
        loop {
            tokio::select! {
                () = self.bus.shutting_down(), if reading => {
                    // requests not read were not taken: the publisher sends them again elsewhere
                    reading = false;
                    ending = Some(to_status(BusError::ShuttingDown));
                }
                () = &mut token_expiry, if reading => {
                    reading = false;
                    ending = Some(denied(principal.token_expired()));
                }
                message = inbound.message(), if reading && has_room(queued.len(), in_flight.events()) => {
                    match message {
                        Ok(Some(request)) => {
                            let events = request.events.len();
                            let answer = self.queue_stream_request(&principal, header.as_deref(), request).await;
                            in_flight.events.fetch_add(events, Ordering::Relaxed);
                            queued.push_back(answer.map(move |answer| (events, answer)));
                            // the wall clock may pass the expiry before the stream's timer does
                            if principal.token_has_expired() {
                                reading = false;
                                ending = Some(denied(principal.token_expired()));
                            }
                        }
                        Ok(None) => reading = false,
                        // a message that could not be read (over the size limit, not protobuf),
                        // answered as a subscriber's is; when the publisher went away, sending the
                        // answers fails and ends this
                        Err(status) => {
                            reading = false;
                            ending = Some(unreadable(&status).map_or(status, to_status));
                        }
                    }
                }
                // the transport took answers the bound was waiting for
                () = in_flight.taken.notified(), if reading && !has_room(queued.len(), in_flight.events()) => {}
                // the publisher went away while the bound held the reader, so neither its requests
                // nor the transport's taking of answers would wake it
                () = answers.closed(), if reading => return,
                Some((events, answer)) = queued.next() => {
                    if answers.send((events, Ok(answer))).await.is_err() {
                        return;
                    }
                }
                else => break,
            }
        }
        if let Some(status) = ending {
            let _ = answers.send((0, Err(status))).await;
        }
    }

    /// Checks and queues one request of a PublishStream; the returned future answers it once committed.
    async fn queue_stream_request(
        &self,
        principal: &Principal,
        header: Option<&str>,
        request: pb::PublishStreamRequest,
    ) -> futures::future::BoxFuture<'static, pb::PublishStreamResponse> {
        let request_id = request.request_id;
        let answer = move |outcome| convert::publish_answer(request_id, outcome);
        // read in the moment the token expired, before the stream stopped reading
        if principal.token_has_expired() {
            let expired = Err(denied(principal.token_expired()));
            return Box::pin(futures::future::ready(answer(expired)));
        }
        let checked = self
            .auth
            .check_publish_rate(principal)
            .map_err(denied)
            .and_then(|()| self.checked_batch(principal, header, request.events));
        let (events, span, trace) = match checked {
            Ok(checked) => checked,
            Err(status) => return Box::pin(futures::future::ready(answer(Err(status)))),
        };
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let queued = self
            .bus
            .queue_publish(&principal.tenant, events, trace)
            .instrument(span.clone())
            .await;
        Box::pin(async move {
            let outcome = match queued {
                Ok(queued) => queued
                    .committed()
                    .instrument(span)
                    .await
                    .map(|appended| published(ids, appended))
                    .map_err(to_status),
                Err(error) => Err(to_status(error)),
            };
            answer(outcome)
        })
    }
}

/// Events of one PublishStream read and not yet taken by the transport: its reader counts a
/// request's in, and its outbound stream counts an answer's out as it takes the answer.
#[derive(Default)]
struct EventsInFlight {
    events: AtomicUsize,
    /// Wakes a reader held by the bound.
    taken: tokio::sync::Notify,
}

impl EventsInFlight {
    fn events(&self) -> usize {
        self.events.load(Ordering::Relaxed)
    }

    fn take(&self, events: usize) {
        if events > 0 {
            self.events.fetch_sub(events, Ordering::Relaxed);
            self.taken.notify_one();
        }
    }
}

/// Whether a PublishStream with `requests` requests queued and `events` events read and not yet
/// taken by the transport reads the next request: always when it holds nothing.
fn has_room(requests: usize, events: usize) -> bool {
    (requests == 0 && events == 0)
        || (requests < PUBLISH_STREAM_IN_FLIGHT && events < PUBLISH_STREAM_EVENTS_IN_FLIGHT)
}

/// The answer to a committed batch: one result per event, in order.
fn published(ids: Vec<String>, appended: Vec<crate::store::Appended>) -> pb::PublishResponse {
    pb::PublishResponse {
        results: ids
            .into_iter()
            .zip(appended)
            .map(|(id, a)| pb::PublishResult {
                id,
                sequence: a.sequence,
                duplicate: a.duplicate,
            })
            .collect(),
    }
}

/// The caller the auth layer identified.
pub(super) fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the call was not authenticated"))
}

/// The patterns a selection reads; none means every type.
fn read_patterns(types: &[TypePattern]) -> Vec<TypePattern> {
    if types.is_empty() {
        TypePattern::parse(">").into_iter().collect()
    } else {
        types.to_vec()
    }
}

/// The patterns as one audit resource, e.g. `task.>,plan.*`.
fn pattern_list(patterns: &[TypePattern]) -> String {
    patterns
        .iter()
        .map(TypePattern::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a subscriber's message could not be read: over the message size limit (tonic's OUT_OF_RANGE,
/// reported as RESOURCE_EXHAUSTED like Nerve's own limits), or not a valid message (a decoding error:
/// INTERNAL without a transport error beneath it). `None` for a broken connection or stream.
fn unreadable(status: &Status) -> Option<BusError> {
    let reason = format!("could not be read: {}", status.message());
    match status.code() {
        tonic::Code::OutOfRange => Some(InvalidInput::too_large("message", reason)),
        tonic::Code::Internal if std::error::Error::source(status).is_none() => {
            Some(InvalidInput::field("message", reason))
        }
        _ => None,
    }
    .map(BusError::Invalid)
}

fn denied(e: crate::auth::AuthError) -> Status {
    to_status(e.into())
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
        let principal = principal(&request)?;
        let (events, span, trace) =
            self.checked_batch(&principal, header.as_deref(), request.into_inner().events)?;
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let appended = self
            .bus
            .publish(&principal.tenant, events, trace)
            .instrument(span)
            .await
            .map_err(to_status)?;
        Ok(Response::new(published(ids, appended)))
    }

    type PublishStreamStream = ResponseStream<pb::PublishStreamResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let header = call_traceparent(&request);
        let principal = principal(&request)?;
        let permit = self.auth.open_stream(&principal).map_err(denied)?;
        let api = self.clone();
        let (answers, outbound) = tokio::sync::mpsc::channel(PUBLISH_STREAM_ANSWERS);
        let in_flight = Arc::new(EventsInFlight::default());
        let taken = in_flight.clone();
        tokio::spawn(async move {
            let _open = permit;
            let inbound = request.into_inner();
            api.serve_publish_stream(principal, header, inbound, answers, in_flight)
                .await;
        });
        let outbound = ReceiverStream::new(outbound).map(move |(events, answer)| {
            taken.take(events);
            answer
        });
        Ok(Response::new(Box::pin(outbound)))
    }

    type SubscribeStream = ResponseStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let principal = principal(&request)?;
        let permit = self.auth.open_stream(&principal).map_err(denied)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.stream_open_timeout, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no open message within {:?}",
                    self.stream_open_timeout
                ))
            })??;
        let open = match first {
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
        let mut spec =
            convert::subscribe_spec(open, &principal.tenant).map_err(|e| to_status(e.into()))?;
        let patterns = read_patterns(&spec.selection.types);
        let resource = pattern_list(&patterns);
        self.auth
            .check(&principal, "subscribe", &resource, |e| {
                e.read(Action::Subscribe, &patterns)
            })
            .map_err(denied)?;
        if let Some(group) = &spec.group {
            self.auth
                .check(&principal, "subscribe.group", group, |e| e.group(group))
                .map_err(denied)?;
        }
        // a private stream that starts before the latest event reads history: what `deny.replay`
        // keeps from the caller stays kept (the subscribe grant covers history otherwise, as a
        // consumer's does elsewhere). So does a group this open creates, since its creator picks its
        // start; an existing group's backlog is shared, and falls under the group grant.
        let reads_history = !principal.unrestricted
            && !matches!(spec.start, Start::Latest)
            && match &spec.group {
                None => true,
                Some(group) => !self
                    .bus
                    .group_exists(&principal.tenant, group)
                    .await
                    .map_err(to_status)?,
            };
        if reads_history {
            self.auth
                .check(&principal, "subscribe.history", &resource, |e| {
                    e.read_not_denied(Action::Replay, &patterns)
                })
                .map_err(denied)?;
        }
        // the group found above may be gone by the time the bus opens it: should this open create
        // it again, it starts where a caller held to `deny.replay` may start
        spec.may_read_history = self
            .auth
            .permits(&principal, |e| e.read_not_denied(Action::Replay, &patterns));
        // A message that cannot be read (over the size limit, not a SubscribeRequest) ends the
        // stream with the reason, after the commands before it: dropping it silently would lose its
        // acks, and every later one. Any other read error means the subscriber went away: the
        // commands end, as at a half-close.
        let commands = inbound
            .map(|m| match m {
                Ok(m) => Some(convert::command(m).map_err(BusError::from)),
                Err(status) => unreadable(&status).map(Err),
            })
            .take_while(|c| ready(c.is_some()))
            .filter_map(ready);
        let outbound = self
            .bus
            .subscribe(spec, commands)
            .await
            .map_err(to_status)?;
        // the permit counts the stream until the response stream is dropped
        let stream = ReceiverStream::new(outbound).flat_map(move |m| {
            let _open = &permit;
            let responses: Vec<Result<pb::SubscribeResponse, Status>> = match m {
                Ok(m) => convert::outbound(m).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(to_status(e))],
            };
            futures::stream::iter(responses)
        });
        Ok(Response::new(until_token_expires(
            Box::pin(stream),
            &principal,
        )))
    }

    async fn request(
        &self,
        request: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let header = call_traceparent(&request);
        let principal = principal(&request)?;
        // a waiting request holds an inbox for up to bus.max_request_timeout: bounded as streams are
        let _permit = self.auth.open_stream(&principal).map_err(denied)?;
        let request = request.into_inner();
        let event = request
            .event
            .ok_or_else(|| invalid("event", "is required"))?;
        let event = convert::event_from_pb(event, "event").map_err(|e| to_status(e.into()))?;
        self.auth
            .check(&principal, "request", &event.event_type, |e| {
                e.typed(Action::Request, &event.event_type)?;
                // stored as an event of its type, as a reply is: what the caller may not publish stays out
                e.publish_not_denied(&event.event_type)?;
                e.source(&event.source)
            })
            .map_err(denied)?;
        let span =
            tracing::info_span!("nerve.request", otel.kind = "server", r#type = %event.event_type);
        let trace = trace_events(&span, header.as_deref(), std::slice::from_ref(&event));
        let asked = request
            .timeout
            .map(|d| convert::duration_from_pb(&d, "timeout"))
            .transpose()
            .map_err(|e| to_status(e.into()))?;
        let outcome = self
            .bus
            .request(&principal.tenant, event, trace, asked, deadline)
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
        let principal = principal(&request)?;
        let request = request.into_inner();
        let event = request
            .event
            .ok_or_else(|| invalid("event", "is required"))?;
        let event = convert::event_from_pb(event, "event").map_err(|e| to_status(e.into()))?;
        self.auth
            .check(&principal, "reply", &event.event_type, |e| {
                e.source(&event.source)
                    .and_then(|()| e.publish_not_denied(&event.event_type))
            })
            .map_err(denied)?;
        let reply_type = event.event_type.clone();
        let span =
            tracing::info_span!("nerve.reply", otel.kind = "server", r#type = %event.event_type);
        let (delivered, sequence) = self
            .bus
            .reply(
                &principal.tenant,
                &request.reply_to,
                event,
                header.as_deref(),
                span,
                |inbox| {
                    // only a principal allowed to answer this request type may reply to it, and only
                    // with a type it may store (subscribers of that type receive the reply); with no
                    // inbox (its requester gone) nothing is stored, but a type the replier may not
                    // reply with is refused all the same, not answered as merely undelivered
                    if let Some(inbox) = inbox {
                        self.auth
                            .check(&principal, "reply", &inbox.request_type, |e| {
                                e.typed(Action::Reply, &inbox.request_type)
                            })
                            .map_err(BusError::from)?;
                    }
                    self.auth
                        .check(&principal, "reply", &reply_type, |e| {
                            e.reply_type(&reply_type)
                        })
                        .map_err(BusError::from)
                },
            )
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
        let principal = principal(&request)?;
        let permit = self.auth.open_stream(&principal).map_err(denied)?;
        let r = request.into_inner();
        let bad = |e: InvalidInput| to_status(e.into());
        let (after, after_field) = if r.resume_token.is_empty() {
            (r.after_sequence, "after_sequence")
        } else {
            (
                decode_resume_token(&r.resume_token).map_err(bad)?,
                "resume_token",
            )
        };
        // as end_time before start_time is: a range that ends before it starts is the caller's mistake
        // (a resume token's position is the server's, and ends such a range's replay as it should)
        if r.resume_token.is_empty() && r.until_sequence != 0 && r.until_sequence < r.after_sequence
        {
            return Err(invalid("until_sequence", "is before after_sequence"));
        }
        let page_size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            _ => return Err(invalid("page_size", "must be at most 1000")),
        };
        let opt = |s: String| (!s.is_empty()).then_some(s);
        for (field, value) in [
            ("source", &r.source),
            ("subject", &r.subject),
            ("correlation_id", &r.correlation_id),
        ] {
            check_text(field, value).map_err(bad)?;
        }
        let types = convert::patterns(r.types, "types").map_err(bad)?;
        let patterns = read_patterns(&types);
        let resource = pattern_list(&patterns);
        self.auth
            .check(&principal, "replay", &resource, |e| {
                e.read(Action::Replay, &patterns)
            })
            .map_err(denied)?;
        let query = ReadQuery {
            tenant: principal.tenant.clone(),
            after,
            until: (r.until_sequence != 0).then_some(r.until_sequence),
            types,
            source: opt(r.source),
            subject: opt(r.subject),
            correlation_id: opt(r.correlation_id),
            priority: None,
            limit: 0,
        };
        let recorded_from = r
            .start_time
            .map(|t| convert::time_from_pb(&t, "start_time"))
            .transpose()
            .map_err(bad)?;
        let recorded_before = r
            .end_time
            .map(|t| convert::time_from_pb(&t, "end_time"))
            .transpose()
            .map_err(bad)?;
        if let (Some(from), Some(before)) = (recorded_from, recorded_before)
            && before < from
        {
            return Err(invalid("end_time", "is before start_time"));
        }
        let pages = self.bus.replay(ReplayRequest {
            query,
            after_field,
            recorded_from,
            recorded_before,
            limit: (r.limit != 0).then_some(u64::from(r.limit)),
            page_size,
        });
        let stream = ReceiverStream::new(pages).map(move |page| {
            let _open = &permit;
            page.map(|p| pb::ReplayResponse {
                events: p.events.iter().map(|e| convert::stored_to_pb(e)).collect(),
                resume_token: p.resume_token,
                end_of_history: p.end_of_history,
            })
            .map_err(to_status)
        });
        Ok(Response::new(until_token_expires(
            Box::pin(stream),
            &principal,
        )))
    }
}

/// Ends a response stream with UNAUTHENTICATED when the caller's token expires: a stream goes on
/// under the credentials it was opened with, no longer than they are accepted. Dropping the stream
/// ends what serves it, as when the caller goes away.
fn until_token_expires<T: Send + 'static>(
    stream: ResponseStream<T>,
    principal: &Principal,
) -> ResponseStream<T> {
    if principal.expires.is_none() {
        return stream;
    }
    let expired = denied(principal.token_expired());
    let expiry = Box::pin(principal.token_expiry());
    Box::pin(futures::stream::unfold(
        Some((stream, expiry, expired)),
        |state| async move {
            let (mut stream, mut expiry, expired) = state?;
            tokio::select! {
                // first: a stream that always has a message ready must still end
                biased;
                () = &mut expiry => Some((Err(expired), None)),
                item = stream.next() => item.map(|item| (item, Some((stream, expiry, expired)))),
            }
        },
    ))
}

/// The caller's W3C `traceparent` header, if any; one that is not a valid traceparent counts as
/// none, so the event's own (or a reply's request's) context is continued instead, and so do two
/// (W3C: a parent that cannot be told counts as none).
fn call_traceparent<T>(request: &Request<T>) -> Option<String> {
    let mut headers = request.metadata().get_all("traceparent").iter();
    let header = headers.next()?;
    if headers.next().is_some() {
        return None;
    }
    header
        .to_str()
        .ok()
        .filter(|header| telemetry::parse_traceparent(Some(header)).is_some())
        .map(str::to_owned)
}

/// Continues the caller's trace (header, else the first event's) in `span`, and stamps events that
/// carry no trace context with it, so deliveries and replies continue the same trace.
fn trace_events(span: &tracing::Span, header: Option<&str>, events: &[Event]) -> Option<String> {
    let parent = header.or_else(|| events.iter().find_map(|e| e.traceparent.as_deref()));
    telemetry::continue_trace(span, parent);
    telemetry::traceparent_of(span, header)
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

    #[test]
    fn a_publish_stream_reads_on_while_its_unanswered_requests_and_events_are_under_their_bounds() {
        // one request is read whatever its size, so a stream never stalls with nothing in flight
        assert!(has_room(0, 0));
        // answers the transport has not taken count: a publisher that does not read them is not
        // read either
        assert!(!has_room(0, PUBLISH_STREAM_EVENTS_IN_FLIGHT));
        assert!(has_room(1, PUBLISH_STREAM_EVENTS_IN_FLIGHT - 1));
        assert!(has_room(
            PUBLISH_STREAM_IN_FLIGHT - 1,
            PUBLISH_STREAM_IN_FLIGHT - 1
        ));
        // a thousand-event batch each: a few of them fill the event bound long before the request one
        assert!(!has_room(9, 9_000));
        assert!(!has_room(
            PUBLISH_STREAM_IN_FLIGHT,
            PUBLISH_STREAM_IN_FLIGHT
        ));
    }
}
