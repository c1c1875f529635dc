//! What every history scan shares: how many store reads it makes before it answers, and how many
//! events one read (or group claim) may ask for.

use std::sync::Arc;

use crate::{
    event::{Limits, StoredEvent},
    store::ReadPage,
    stream::NewClaim,
};

/// Store reads a history scan makes before it answers with what it found (a Replay page, possibly
/// empty; a private stream's turn to its commands and heartbeats): a selection that matches little
/// can read a long history without finding anything to send.
pub(super) const HISTORY_READS_PER_TURN: usize = 16;

/// Sizes history reads and group claims by bytes as well as by count: each asks for no more rows
/// than an answer page's bytes ([`Limits::page_bytes`]) of the rows last read (matching or not),
/// entries a claim last read (its filter matching them or not) or events last claimed, or, before
/// any, of the largest event allowed. Where sizes change from one read to the next, a store read still
/// holds at most [`crate::store::READ_BYTES`]; a claim on Redis, which cannot stop reading a stream
/// at a number of bytes, one page's count of the entries the claim before it read.
#[derive(Debug, Clone)]
pub(super) struct ReadSizer {
    budget: usize,
    largest_allowed: usize,
    event_bytes: Option<usize>,
}

impl ReadSizer {
    /// A sizer that knows nothing yet of the history it reads.
    pub(super) fn new(limits: &Limits) -> Self {
        ReadSizer {
            budget: limits.page_bytes(),
            largest_allowed: limits.max_event_bytes.max(1),
            event_bytes: None,
        }
    }

    /// The most events the next read may ask for: at least one.
    pub(super) fn fit(&self) -> usize {
        let event_bytes = self.event_bytes.unwrap_or(self.largest_allowed).max(1);
        (self.budget / event_bytes).max(1)
    }

    /// Learns the events' mean size from a read or claim that returned any.
    pub(super) fn observe<'a>(&mut self, events: impl IntoIterator<Item = &'a Arc<StoredEvent>>) {
        let (count, bytes) = events.into_iter().fold((0, 0), |(count, bytes), e| {
            (count + 1, bytes + e.event.size())
        });
        self.learn(count, bytes);
    }

    /// Learns from a store read: from every row it looked at, which its limit counts, matching or
    /// not (a selection filtered after reading may match none of them).
    pub(super) fn observe_read(&mut self, page: &ReadPage) {
        self.learn(page.rows_read, page.bytes_read);
    }

    /// Learns from a group claim the larger of two means: of every entry it read, its filter
    /// matching them or not, and of the events it took. So neither a filter that passes over large
    /// events nor one that takes rare large ones among small ones sizes the next claim from the
    /// small ones.
    pub(super) fn observe_claim(&mut self, claim: &NewClaim) {
        let (taken, taken_bytes) = claim
            .entries
            .iter()
            .filter_map(|c| c.event.as_ref())
            .fold((0usize, 0usize), |(count, bytes), e| {
                (count + 1, bytes + e.event.size())
            });
        let read = claim.bytes_read.checked_div(claim.rows_read);
        if let Some(mean) = read.max(taken_bytes.checked_div(taken)) {
            self.event_bytes = Some(mean);
        }
    }

    fn learn(&mut self, count: usize, bytes: usize) {
        if let Some(mean) = bytes.checked_div(count) {
            self.event_bytes = Some(mean);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(data_bytes: usize) -> Arc<StoredEvent> {
        Arc::new(StoredEvent {
            tenant: "t".into(),
            sequence: 1,
            recorded_at: chrono::DateTime::UNIX_EPOCH,
            event: crate::event::Event {
                data: crate::event::Data::Binary(vec![0; data_bytes]),
                ..Default::default()
            },
        })
    }

    fn claim(rows_read: usize, bytes_read: usize, taken: &[usize]) -> NewClaim {
        NewClaim {
            entries: taken
                .iter()
                .map(|bytes| crate::stream::Claimed {
                    sequence: 1,
                    attempt: 1,
                    event: Some(stored(*bytes)),
                    priority: crate::event::Priority::Normal,
                    last_error: None,
                })
                .collect(),
            more: false,
            rows_read,
            bytes_read,
        }
    }

    #[test]
    fn claims_are_sized_from_the_larger_of_what_they_read_and_what_they_took() {
        let limits = Limits::default();
        let mut sizer = ReadSizer::new(&limits);
        // a filter passed over three events of 300 KB to take one small one
        sizer.observe_claim(&claim(4, 900_100, &[100]));
        assert_eq!(sizer.fit(), limits.page_bytes() / 225_025);
        // a filter took one large event among 99 small ones it passed over
        sizer.observe_claim(&claim(100, 99_000 + (512 << 10), &[512 << 10]));
        let large = sizer.fit();
        assert!((7..=8).contains(&large), "{large} events of 512 KiB");
        // small ones read and taken
        sizer.observe_claim(&claim(2, 2_048, &[1000, 1048]));
        assert!(sizer.fit() > 3000, "{}", sizer.fit());
        // a claim that read nothing teaches nothing
        sizer.observe_claim(&claim(0, 0, &[]));
        assert!(sizer.fit() > 3000, "{}", sizer.fit());
    }

    #[test]
    fn reads_ask_for_a_page_of_the_last_read_events_or_of_the_largest_allowed() {
        let limits = Limits::default();
        let mut sizer = ReadSizer::new(&limits);
        assert_eq!(sizer.fit(), limits.page_bytes() / limits.max_event_bytes);
        sizer.observe(&[]);
        assert_eq!(sizer.fit(), limits.page_bytes() / limits.max_event_bytes);
        // events of about 1 KiB: a page's bytes of them
        sizer.observe(&[stored(1000), stored(1048)]);
        let small = sizer.fit();
        assert!(small > 3000, "{small} events of about 1 KiB");
        // a read of large events lowers the fit, and a later read of small ones raises it again
        sizer.observe(&[stored(512 << 10)]);
        let large = sizer.fit();
        assert!((7..=8).contains(&large), "{large} events of 512 KiB");
        sizer.observe(&[stored(1000), stored(1048)]);
        assert_eq!(sizer.fit(), small);
    }
}
