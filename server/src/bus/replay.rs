use std::sync::Arc;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use super::{
    Bus, BusError, BusResult,
    history::{HISTORY_READS_PER_TURN, ReadSizer},
};
use crate::{
    event::{InvalidInput, StoredEvent},
    store::ReadQuery,
};

const TOKEN_PREFIX: &str = "nerve.replay.v1:";
/// Events read from the store per query; a replay never holds more than one such page.
const SCAN_PAGE: usize = 1000;
/// Sequences one read looks at when the replay filters by source or subject, which no index
/// answers: unbounded, such a read would scan on until it found a page of matches.
const FILTERED_SPAN: u64 = 4096;
/// Events of any type the look past a limit's last match reads for a type pattern: where the next
/// match, or the head, is further, the replay's last page does not say it ended the history.
const END_PROBE_ROWS: usize = 64;

/// A replay: the history query plus paging.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub query: ReadQuery,
    /// The request field `query.after` came from (`after_sequence` or `resume_token`), named when
    /// it lies past the stored head.
    pub after_field: &'static str,
    /// Only events recorded at or after this time.
    pub recorded_from: Option<DateTime<Utc>>,
    /// Only events recorded before this time.
    pub recorded_before: Option<DateTime<Utc>>,
    /// Most events in total; `None` for all.
    pub limit: Option<u64>,
    pub page_size: usize,
}

/// One page of replayed history.
#[derive(Debug, Clone)]
pub struct ReplayPage {
    pub events: Vec<Arc<StoredEvent>>,
    pub resume_token: String,
    pub end_of_history: bool,
}

/// Encodes the position after which a replay continues.
pub fn encode_resume_token(after: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{TOKEN_PREFIX}{after}"))
}

/// Decodes a resume token.
pub fn decode_resume_token(token: &str) -> Result<u64, InvalidInput> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix(TOKEN_PREFIX)?.parse().ok())
        .ok_or_else(|| {
            InvalidInput::field(
                "resume_token",
                "is not a token returned by an earlier Replay",
            )
        })
}

impl Bus {
    /// Streams history page by page; the channel holds one page, so memory stays constant.
    pub fn replay(
        self: &Arc<Self>,
        request: ReplayRequest,
    ) -> mpsc::Receiver<BusResult<ReplayPage>> {
        let (tx, rx) = mpsc::channel(1);
        let bus = self.clone();
        tokio::spawn(async move {
            ::metrics::gauge!(crate::metrics::names::REPLAYS).increment(1.0);
            let _active = active_replay_guard();
            let mut query = match bus
                .sequence_range(
                    request.query,
                    request.after_field,
                    request.recorded_from,
                    request.recorded_before,
                )
                .await
            {
                Ok(query) => query,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let mut remaining = request.limit.unwrap_or(u64::MAX);
            // the replay's end; a filtered one without an end takes the store's head as it once
            // reaches this replica's view of it (below)
            let mut bound = query.until;
            let filtered = query.source.is_some() || query.subject.is_some();
            let mut sizer = ReadSizer::new(&bus.limits);
            loop {
                let mut page = ReplayPage {
                    events: Vec::new(),
                    resume_token: String::new(),
                    end_of_history: false,
                };
                // fill one page: read what it needs, and read further ahead only while matches are
                // sparse; after a few reads, answer with what was found, so a selection that matches
                // little still sends pages (and tokens) at a steady pace
                let mut scan = 0;
                let mut bytes = 0;
                let mut reads = 0;
                while page.events.len() < request.page_size
                    && remaining > 0
                    && reads < HISTORY_READS_PER_TURN
                {
                    // a selection that matches little scans on between pages: not for a caller gone
                    if tx.is_closed() {
                        return;
                    }
                    reads += 1;
                    let fit = sizer.fit();
                    let want = (request.page_size - page.events.len())
                        .min(remaining as usize)
                        .min(fit);
                    scan = (scan * 2).max(want).min(SCAN_PAGE).min(fit);
                    query.limit = scan;
                    if filtered {
                        let span = query.after.saturating_add(FILTERED_SPAN);
                        query.until = Some(bound.map_or(span, |bound| bound.min(span)));
                    }
                    let read = match bus.store.read(&query).await {
                        Ok(read) => read,
                        Err(e) => {
                            let _ = tx.send(Err(BusError::from(e))).await;
                            return;
                        }
                    };
                    sizer.observe_read(&read);
                    let mut cut = false;
                    for event in read.events {
                        // large events end a page early: it must fit one message, and memory stays bounded
                        bytes += event.event.size();
                        if page.events.len() >= request.page_size
                            || (!page.events.is_empty() && bytes > bus.limits.page_bytes())
                        {
                            cut = true;
                            break;
                        }
                        query.after = event.sequence;
                        page.events.push(event);
                        remaining -= 1;
                        if remaining == 0 {
                            cut = true;
                            break;
                        }
                    }
                    if cut {
                        break;
                    }
                    query.after = query.after.max(read.scanned_to);
                    // A read that found all it could ends the history unless it stopped at its span
                    // (it then scanned to the span's end, and the history may go on past it): one
                    // bounded by the replay's own end, or short of its span, reached the newest event.
                    let read_until = query.until.unwrap_or(u64::MAX);
                    if read.exhausted && (query.until == bound || read.scanned_to < read_until) {
                        // Short of its span, at this replica's view of the head, which other
                        // replicas' commits may have passed: the scan goes on to the store's head
                        // of now, once, and ends there (every event up to it is committed).
                        if query.until != bound {
                            match bus.store.head().await {
                                Ok(head) if head > query.after => {
                                    bound = Some(bound.map_or(head, |bound| bound.min(head)));
                                    continue;
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    let _ = tx.send(Err(BusError::from(e))).await;
                                    return;
                                }
                            }
                        }
                        page.end_of_history = true;
                        break;
                    }
                }
                // a replay that reached its limit ends the history too when nothing after its last
                // event matches; a filtered one's span may stop the look short, and it then says not
                if remaining == 0 && !filtered && !page.end_of_history {
                    match bus.history_ends_after(&query, bound, sizer.fit()).await {
                        Ok(ends) => page.end_of_history = ends,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                page.resume_token = encode_resume_token(query.after);
                let done = page.end_of_history || remaining == 0;
                if bus.shutdown.is_cancelled() {
                    let _ = tx.send(Err(BusError::ShuttingDown)).await;
                    return;
                }
                if tx.send(Ok(page)).await.is_err() || done {
                    return;
                }
            }
        });
        rx
    }

    /// Whether no stored event after `query.after`, up to `bound` (or the store's head of now, up to
    /// which every event is committed), matches. One read looks: at one event of each literal type,
    /// or for a pattern at [`END_PROBE_ROWS`] events of any type (fewer where `fit`, the replay's
    /// read sizing, holds fewer), which may not reach the end, and then says not.
    async fn history_ends_after(
        &self,
        query: &ReadQuery,
        bound: Option<u64>,
        fit: usize,
    ) -> BusResult<bool> {
        let until = match bound {
            Some(bound) => bound,
            None => self.store.head().await?,
        };
        if until <= query.after {
            return Ok(true);
        }
        let limit = if crate::store::literal_types(&query.types).is_some() {
            1
        } else {
            END_PROBE_ROWS.min(fit)
        };
        let probe = ReadQuery {
            until: Some(until),
            limit,
            ..query.clone()
        };
        let read = self.store.read(&probe).await?;
        Ok(read.events.is_empty() && read.exhausted)
    }

    /// Checks that a query starts at or before the stored head, and narrows its sequence range to a
    /// time range. Recorded time never goes backwards with the sequence, so the range is exact, and
    /// the reads walk only the events inside it: a time filter in the reads let the database pick
    /// the recorded-time index and sort what followed for each page, or scan all history before the
    /// start (docs/benchmarks.md, cause 7).
    async fn sequence_range(
        &self,
        mut query: ReadQuery,
        after_field: &'static str,
        from: Option<DateTime<Utc>>,
        before: Option<DateTime<Utc>>,
    ) -> BusResult<ReadQuery> {
        // past the committed head the replay would end at once and look complete, skipping the
        // events up to that position once they come (a position kept from a store since wiped, or
        // from another deployment); Subscribe refuses such a start alike
        if query.after > 0 {
            let head = self.store.head().await?;
            if query.after > head {
                return Err(BusError::OutOfRange(InvalidInput::field(
                    after_field,
                    format!("{} is past the last stored sequence, {head}", query.after),
                )));
            }
        }
        if let Some(from) = from {
            let head = self.store.head().await?;
            let before = self.store.sequence_before(from).await?;
            query.after = query.after.max(before);
            // nothing stored is recorded at or after it, and it is not reached yet: what commits
            // while the replay reads is recorded before it, so the replay ends where it starts.
            // (Events stored at or after it, when this clock is behind the store's, are still read.)
            if before >= head && from > Utc::now() {
                query.until = Some(query.after);
            }
        }
        if let Some(before) = before {
            let last = self.store.sequence_before(before).await?;
            query.until = Some(query.until.map_or(last, |until| until.min(last)));
        }
        Ok(query)
    }
}

/// Lowers the active-replay gauge when the replay task ends, however it ends.
fn active_replay_guard() -> impl Drop {
    struct Active;
    impl Drop for Active {
        fn drop(&mut self) {
            ::metrics::gauge!(crate::metrics::names::REPLAYS).decrement(1.0);
        }
    }
    Active
}
