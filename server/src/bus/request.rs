use std::{sync::Arc, time::Duration};

use tracing::{Instrument, debug};

use super::{Bus, BusError, BusResult};
use crate::{
    event::{Event, InvalidInput, StoredEvent},
    store::Appended,
    stream::Inbox,
    telemetry,
};

/// The answer to a request.
#[derive(Debug)]
pub struct RequestOutcome {
    pub reply: Arc<StoredEvent>,
    pub request_sequence: u64,
}

/// Runs a step a request takes before its wait for the reply, ended at `until` as that wait is;
/// `unfinished` says where that left the request.
async fn before<T>(
    until: tokio::time::Instant,
    step: impl std::future::Future<Output = BusResult<T>>,
    unfinished: impl FnOnce() -> String,
) -> BusResult<T> {
    tokio::time::timeout_at(until, step)
        .await
        .unwrap_or_else(|_| Err(BusError::DeadlineExceeded(unfinished())))
}

/// The nearer bound of the wait (`bound`, see [`Bus::ask`]) passed without a reply.
fn no_reply(id: &str, bound: &str) -> BusError {
    BusError::DeadlineExceeded(format!("no reply to request {id:?} within {bound}"))
}

struct InboxGuard<'a> {
    bus: &'a Bus,
    inbox: String,
}

impl Drop for InboxGuard<'_> {
    fn drop(&mut self) {
        let streams = self.bus.streams.clone();
        let inbox = std::mem::take(&mut self.inbox);
        tokio::spawn(async move {
            let _ = streams.close_inbox(&inbox).await;
        });
    }
}

/// Counts a request by its outcome when dropped, however its call ended.
struct Counted(Option<&'static str>);

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(outcome) = self.0.take() {
            ::metrics::counter!(crate::metrics::names::REQUESTS, "outcome" => outcome).increment(1);
        }
    }
}

fn count_reply(outcome: &'static str) {
    ::metrics::counter!(crate::metrics::names::REPLIES, "outcome" => outcome).increment(1);
}

impl Bus {
    /// Publishes a request and waits for its reply, at most `timeout` (the request's field, or the
    /// default) and at most the call's `deadline`, both from now; fails at once when nobody could
    /// receive it. A request without a traceparent gets `trace` (the call's), after the limits are
    /// checked: a context the server records does not count against them.
    pub async fn request(
        &self,
        tenant: &str,
        event: Event,
        trace: Option<String>,
        timeout: Option<Duration>,
        deadline: Option<Duration>,
    ) -> BusResult<RequestOutcome> {
        // the call's deadline (the transport's timer, which runs from before this wait) or the
        // caller's going away drops this future: counted then as cancelled
        let mut counted = Counted(Some("cancelled"));
        let timeout = timeout.unwrap_or(self.settings.default_request_timeout);
        // when the call's deadline is the nearer bound, the bus's own timer and the transport's end
        // the call in the same instant, and either may run first: counted alike whichever does
        let call_bounds_the_wait = deadline.is_some_and(|deadline| deadline <= timeout);
        let outcome = self.ask(tenant, event, trace, timeout, deadline).await;
        counted.0 = Some(match &outcome {
            Ok(_) => "answered",
            Err(BusError::NoResponders { .. }) => "no_responders",
            Err(BusError::DeadlineExceeded(_)) if call_bounds_the_wait => "cancelled",
            Err(BusError::DeadlineExceeded(_)) => "timeout",
            Err(_) => "failed",
        });
        outcome
    }

    async fn ask(
        &self,
        tenant: &str,
        mut event: Event,
        trace: Option<String>,
        timeout: Duration,
        deadline: Option<Duration>,
    ) -> BusResult<RequestOutcome> {
        if timeout.is_zero() || timeout > self.settings.max_request_timeout {
            return Err(InvalidInput::field(
                "timeout",
                format!(
                    "must be positive and at most {:?}",
                    self.settings.max_request_timeout
                ),
            )
            .into());
        }
        // the call's deadline is not a field the client set: it only shortens the wait, and the
        // messages say which of the two ended it
        let (timeout, bound) = match deadline {
            Some(deadline) if deadline.is_zero() => {
                return Err(BusError::DeadlineExceeded(
                    "the call's deadline passed before the request was published".into(),
                ));
            }
            Some(deadline) if deadline <= timeout => {
                (deadline, format!("{deadline:?} (the call's deadline)"))
            }
            _ => (timeout, format!("{timeout:?}")),
        };
        // from the call's receipt, as the transport's deadline runs: the steps before the wait for
        // the reply (Redis, a busy or failing store) take from it, and end with it
        let until = tokio::time::Instant::now() + timeout;
        if event.reply_to.is_some() {
            return Err(InvalidInput::field(
                "event.reply_to",
                "is set by the server on requests; leave it empty",
            )
            .into());
        }
        self.limits.check_event(&event, "event")?;
        // a request's inbox differs on every call, so its content does too: the stamp may be part of it
        if event.traceparent.is_none() {
            event.traceparent = trace;
        }
        let correlation_id = event
            .correlation_id
            .get_or_insert_with(|| event.id.clone())
            .clone();
        let inbox = format!("_inbox.{}", uuid::Uuid::new_v4().simple());
        event.reply_to = Some(inbox.clone());
        // asked of the request as subscribers will see it (with its inbox, correlation id and time),
        // so a responder whose filter looks at those counts; the time is left unset again for the
        // publish, which hashes the event as sent
        let unset_time = event.time.is_none();
        event.time.get_or_insert_with(chrono::Utc::now);
        let id = event.id.clone();
        let unpublished = || format!("request {id:?} was not published within {bound}");
        let interest = before(
            until,
            async { Ok(self.streams.has_interest(tenant, &event).await?) },
            unpublished,
        )
        .await;
        if unset_time {
            event.time = None;
        }
        if !interest? {
            return Err(BusError::NoResponders {
                event_type: event.event_type,
            });
        }
        // guarded before it is opened: a requester that goes away while the inbox is being written
        // (to Redis) leaves nothing behind, nor does a failed write
        let _guard = InboxGuard {
            bus: self,
            inbox: inbox.clone(),
        };
        let inbox_of = Inbox {
            tenant: tenant.to_owned(),
            correlation_id,
            request_id: event.id.clone(),
            request_source: event.source.clone(),
            request_type: event.event_type.clone(),
            traceparent: event.traceparent.clone(),
        };
        let mut replies = before(
            until,
            async { Ok(self.streams.open_inbox(&inbox, inbox_of).await?) },
            unpublished,
        )
        .await?;
        let source = event.source.clone();
        // its inbox is part of its content, so a request asked again under the same (source, id) is
        // a conflict, never a duplicate: the message says why, not "different content"
        let taken = || {
            BusError::Exists(format!(
                "event {id:?} from source {source:?} is stored already: a request is a new event \
                 on every call (its reply inbox differs), so ask again with a new id"
            ))
        };
        // a request whose commit ends after its timeout may still be stored (a commit is not called
        // back), as when the call's deadline ends it
        let appended = before(until, self.publish_checked(tenant, event, None), || {
            format!(
                "request {id:?} was not committed within {bound}; it may still be stored and \
                 delivered"
            )
        })
        .await
        .map_err(|e| match e {
            BusError::AlreadyExists { .. } => taken(),
            e => e,
        })?;
        let Some(Appended {
            sequence,
            duplicate,
        }) = appended.first().copied()
        else {
            return Err(BusError::Internal("publish returned no result".into()));
        };
        if duplicate {
            return Err(taken());
        }
        let ended = tokio::select! {
            biased;
            reply = replies.recv() => return match reply {
                Some(reply) => Ok(RequestOutcome { reply, request_sequence: sequence }),
                None => Err(BusError::Unavailable("reply inbox closed".into())),
            },
            _ = tokio::time::sleep_until(until) => no_reply(&id, &bound),
            _ = self.shutdown.cancelled() => BusError::ShuttingDown,
        };
        // closed first, so no reply gets in from here on; one that got in as the wait ended (its
        // responder was told it was delivered) is still the answer
        replies.close();
        match replies.try_recv() {
            Ok(reply) => Ok(RequestOutcome {
                reply,
                request_sequence: sequence,
            }),
            Err(_) => Err(ended),
        }
    }

    /// Stores a reply and hands it to the waiting requester. Returns whether it was delivered and its
    /// sequence; a reply for a requester that stopped waiting is dropped unstored and counted, and
    /// one that another reply beat to the inbox is stored, not delivered, and counted.
    /// `authorize` sees the waiting request before anything is stored, or none when no request waits
    /// (a reply the caller may not make is refused either way). The reply's work runs in `span`, in
    /// the trace of the call's `header` (a valid W3C traceparent), else of the reply's own
    /// traceparent, else of the request's: so the span is entered only once the inbox is read. A
    /// reply without a traceparent gets the call's trace, else the request's, after its content is
    /// hashed, as a publish does.
    pub async fn reply(
        &self,
        tenant: &str,
        reply_to: &str,
        event: Event,
        header: Option<&str>,
        span: tracing::Span,
        authorize: impl FnOnce(Option<&Inbox>) -> BusResult<()>,
    ) -> BusResult<(bool, Option<u64>)> {
        if reply_to.is_empty() {
            return Err(InvalidInput::field("reply_to", "is required").into());
        }
        // inbox names become Redis keys: only what `ask` makes, `_inbox.` and 32 hex digits
        let well_formed = reply_to
            .strip_prefix("_inbox.")
            .is_some_and(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()));
        if !well_formed {
            return Err(InvalidInput::field(
                "reply_to",
                "is not an inbox of a request (take it from the request's reply_to)",
            )
            .into());
        }
        // an inbox is the server's to give, on Request; a reply stored with one would look like a
        // request to whoever reads it (a publish that sets it is refused alike)
        if event.reply_to.is_some() {
            return Err(InvalidInput::field(
                "event.reply_to",
                "is set by the server on requests; a reply carries none",
            )
            .into());
        }
        // named as the caller sent it, and checked whether or not anyone still waits
        self.limits.check_event(&event, "event")?;
        let inbox = match self.streams.inbox(reply_to).await? {
            Some(inbox) if inbox.tenant == tenant => {
                authorize(Some(&inbox))?;
                inbox
            }
            _ => {
                authorize(None)?;
                telemetry::continue_trace(&span, header.or(event.traceparent.as_deref()));
                let _entered = span.enter();
                count_reply("late");
                debug!(reply_to, "late reply dropped");
                return Ok((false, None));
            }
        };
        telemetry::continue_trace(
            &span,
            header
                .or(event.traceparent.as_deref())
                .or(inbox.traceparent.as_deref()),
        );
        let trace = header
            .and_then(|h| telemetry::traceparent_of(&span, Some(h)))
            .or(inbox.traceparent.clone());
        self.reply_to_inbox(reply_to, event, inbox, trace)
            .instrument(span)
            .await
    }

    /// Stores a reply to the request of `inbox`, stamped with `trace` when it carries none, and hands
    /// it over.
    async fn reply_to_inbox(
        &self,
        reply_to: &str,
        mut event: Event,
        inbox: Inbox,
        trace: Option<String>,
    ) -> BusResult<(bool, Option<u64>)> {
        let tenant = inbox.tenant.as_str();
        match &event.correlation_id {
            None => event.correlation_id = Some(inbox.correlation_id.clone()),
            Some(c) if *c != inbox.correlation_id => {
                return Err(InvalidInput::field(
                    "event.correlation_id",
                    format!(
                        "does not match the request's correlation id {:?}",
                        inbox.correlation_id
                    ),
                )
                .into());
            }
            Some(_) => {}
        }
        event.causation_id.get_or_insert(inbox.request_id);
        // stamped after hashing: a retry under another span is the same reply
        let appended = self.publish_checked(tenant, event, trace).await?;
        let sequence = appended.first().map(|a| a.sequence).unwrap_or_default();
        let stored = self
            .store
            .read_sequences(&[sequence])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| BusError::Internal("stored reply not found".into()))?;
        let delivered = self.streams.send_reply(reply_to, stored).await?;
        count_reply(if delivered {
            "delivered"
        } else {
            "not_delivered"
        });
        Ok((delivered, Some(sequence)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::bus::test_support::{Member, embedded_bus, job, join_g};

    /// The series of `metric` that `asks` moved on a bus of its own, with a recorder of its own (the
    /// process' one is shared with every other test); `asks` gets a member that reads requests.
    fn counted<F: std::future::Future<Output = ()>>(
        metric: &str,
        asks: impl FnOnce(std::sync::Arc<crate::bus::Bus>, Member) -> F,
    ) -> String {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async {
                    let (bus, _shutdown, _streams, _dir) = embedded_bus().await;
                    let member = join_g(&bus, None, None).await;
                    asks(bus, member).await;
                });
        });
        handle
            .render()
            .lines()
            .filter(|l| l.starts_with(metric))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The counted outcomes of requests made by `asks`, to a responder that never answers.
    fn outcomes<F: std::future::Future<Output = ()>>(
        asks: impl FnOnce(std::sync::Arc<crate::bus::Bus>) -> F,
    ) -> String {
        counted(crate::metrics::names::REQUESTS, |bus, member| async move {
            let _member = member;
            asks(bus).await
        })
    }

    /// Each reply that passes its checks is counted once, by whether it reached the requester; one
    /// refused is not counted at all.
    #[test]
    fn replies_are_counted_by_whether_they_reached_the_requester() {
        let counted =
            counted(
                crate::metrics::names::REPLIES,
                |bus, (send, mut out)| async move {
                    // held: a member whose command stream ends (half-closed) ends too
                    let _send = send;
                    let asking = tokio::spawn({
                        let bus = bus.clone();
                        async move {
                            bus.request(
                                "t",
                                job("asked", 0),
                                None,
                                Some(Duration::from_secs(10)),
                                None,
                            )
                            .await
                        }
                    });
                    let reply_to = loop {
                        match out
                            .recv()
                            .await
                            .expect("the member is open")
                            .expect("no error")
                        {
                            crate::bus::Outbound::Deliveries(d) => {
                                break d[0].event.event.reply_to.clone().expect("a request");
                            }
                            _ => continue,
                        }
                    };
                    let reply =
                        |id: &'static str, to: String| {
                            let bus = bus.clone();
                            async move {
                                bus.reply("t", &to, job(id, 0), None, tracing::Span::none(), |_| {
                                    Ok(())
                                })
                                .await
                            }
                        };
                    let first = reply("first", reply_to.clone()).await.expect("reply");
                    // found open (the requester has not run since), and taken: stored, not delivered
                    let second = reply("second", reply_to).await.expect("reply");
                    assert_eq!((first.0, second.0), (true, false));
                    asking.await.expect("join").expect("answered");
                    let nobody = format!("_inbox.{}", "0".repeat(32));
                    assert_eq!(
                        reply("late", nobody.clone()).await.expect("reply"),
                        (false, None)
                    );
                    let refused = bus
                        .reply(
                            "t",
                            &nobody,
                            job("refused", 0),
                            None,
                            tracing::Span::none(),
                            |_| Err(crate::bus::BusError::PermissionDenied("no".into())),
                        )
                        .await;
                    assert!(refused.is_err());
                },
            );
        for outcome in ["delivered", "not_delivered", "late"] {
            assert!(
                counted.contains(&format!("outcome=\"{outcome}\"}} 1")),
                "{outcome}: {counted}"
            );
        }
    }

    /// The call's deadline, nearer than the request's timeout, ends the wait through the bus' own
    /// timer when the transport's has not dropped the call first (both come due together): counted as
    /// cancelled either way, as the transport's drop is. A request's own timeout is a timeout.
    /// The message names the bound that ended it.
    #[test]
    fn the_nearer_bound_names_the_outcome_whichever_timer_ends_the_wait() {
        let counted = outcomes(|bus| async move {
            let by_call = bus
                .request(
                    "t",
                    job("by-call", 0),
                    None,
                    Some(Duration::from_secs(60)),
                    Some(Duration::from_millis(50)),
                )
                .await;
            let message = by_call.expect_err("no reply").to_string();
            assert!(
                message.contains("within 50ms (the call's deadline)"),
                "{message}"
            );
            let by_timeout = bus
                .request(
                    "t",
                    job("by-timeout", 0),
                    None,
                    Some(Duration::from_millis(50)),
                    Some(Duration::from_secs(60)),
                )
                .await;
            let message = by_timeout.expect_err("no reply").to_string();
            assert!(message.ends_with("within 50ms"), "{message}");
        });
        assert!(counted.contains("outcome=\"cancelled\"} 1"), "{counted}");
        assert!(counted.contains("outcome=\"timeout\"} 1"), "{counted}");
    }
}
