//! Which streams a group's claim of new entries may pass over without asking Redis.
//!
//! A group over many types claims from every stream its patterns match, and asking each one whether
//! it holds anything after the group's cursor costs Redis a script per stream on every fill (6 ms a
//! delivery with 200 types). A stream found to hold nothing new is marked with the position this
//! replica had relayed when it was asked: every entry up to there was in Redis then and is behind the
//! cursor. The cursor only moves forward while the group lives, so the stream stays quiet until this
//! replica relays an event of it past that position. Group members wake when this replica's relay
//! moves, so that is when they would look anyway; only a fill for another reason (an ack, a wake-up)
//! no longer finds an entry another replica added before this one relayed it.
//!
//! What could move a cursor back (the group deleted and created again, its settings changed, Redis
//! losing entries or coming back from an older snapshot) forgets the marks, and a mark is not made
//! from an answer asked before such a change. Marks also expire (after [`QUIET_TTL`] in the server):
//! a change this replica is not told of (another replica adding again entries Redis lost) is found
//! by the group's first fill after that (the next event, ack or heartbeat).

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

use super::GroupKey;

/// How long the server trusts a stream found quiet without asking again.
pub const QUIET_TTL: Duration = Duration::from_secs(1);

/// Streams found quiet per group, and the newest event this replica relayed to each stream.
#[derive(Debug)]
pub(super) struct QuietStreams<S> {
    /// How long a mark is trusted.
    ttl: Duration,
    /// Moves at every forget: marks asked for before it are not kept.
    epoch: u64,
    /// Per tenant, per stream: the highest sequence this replica relayed there since it started.
    tops: HashMap<String, HashMap<S, u64>>,
    groups: HashMap<GroupKey, QuietGroup<S>>,
}

#[derive(Debug)]
struct QuietGroup<S> {
    /// The group's creation time: a group created again under the name has other cursors.
    created_ns: i64,
    /// Per stream: the relayed position it held nothing new at, and when that was asked.
    streams: HashMap<S, (u64, Instant)>,
}

/// What a claim knew before it asked: the relayed position and the epoch (see [`QuietStreams::ask`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Asked {
    relayed: u64,
    epoch: u64,
    at: Instant,
}

impl<S: Hash + Eq + Clone> QuietStreams<S> {
    /// No stream known quiet; marks trusted for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            epoch: 0,
            tops: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    /// Starts asking Redis about a group's streams while this replica has relayed up to `relayed`:
    /// to be read before the question is sent.
    pub fn ask(&self, relayed: u64) -> Asked {
        Asked {
            relayed,
            epoch: self.epoch,
            at: Instant::now(),
        }
    }

    /// Whether `stream` is still quiet for the group: marked within the ttl, for the group of
    /// this creation time, and no event of it relayed here since.
    pub fn is_quiet(&self, key: &GroupKey, created_ns: i64, stream: &S) -> bool {
        let Some(group) = self.groups.get(key) else {
            return false;
        };
        let Some((at, when)) = group.streams.get(stream) else {
            return false;
        };
        group.created_ns == created_ns
            && when.elapsed() < self.ttl
            && self
                .tops
                .get(&key.tenant)
                .and_then(|streams| streams.get(stream))
                .is_none_or(|top| top <= at)
    }

    /// Records that `stream` held nothing new for the group when `asked`; dropped when something
    /// was forgotten since.
    pub fn mark(&mut self, asked: Asked, key: &GroupKey, created_ns: i64, stream: S) {
        if asked.epoch != self.epoch {
            return;
        }
        let group = self
            .groups
            .entry(key.clone())
            .or_insert_with(|| QuietGroup {
                created_ns,
                streams: HashMap::new(),
            });
        if group.created_ns != created_ns {
            group.created_ns = created_ns;
            group.streams.clear();
        }
        group.streams.insert(stream, (asked.relayed, asked.at));
    }

    /// Records that this replica relayed events to `stream`, up to `last`.
    pub fn relayed(&mut self, tenant: &str, stream: &S, last: u64) {
        let tops = match self.tops.get_mut(tenant) {
            Some(tops) => tops,
            None => self.tops.entry(tenant.to_owned()).or_default(),
        };
        match tops.get_mut(stream) {
            Some(top) => *top = (*top).max(last),
            None => {
                tops.insert(stream.clone(), last);
            }
        }
    }

    /// Forgets a group's marks: its cursors may have moved back.
    pub fn forget(&mut self, key: &GroupKey) {
        self.epoch += 1;
        self.groups.remove(key);
    }

    /// Forgets every group's marks: Redis lost entries, which may come back behind cursors.
    pub fn forget_all(&mut self) {
        self.epoch += 1;
        self.groups.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> GroupKey {
        GroupKey {
            tenant: "t".into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_stream_stays_quiet_until_an_event_is_relayed_past_its_mark() {
        let mut quiet = QuietStreams::<&str>::new(Duration::from_secs(3600));
        let g = key("g");
        assert!(!quiet.is_quiet(&g, 1, &"a"), "never asked");
        // relayed before the question: behind the cursor the answer saw
        quiet.relayed("t", &"a", 5);
        let asked = quiet.ask(10);
        quiet.mark(asked, &g, 1, "a");
        assert!(quiet.is_quiet(&g, 1, &"a"));
        assert!(!quiet.is_quiet(&g, 1, &"b"), "only the stream asked");
        assert!(!quiet.is_quiet(&key("h"), 1, &"a"), "only the group asked");
        quiet.relayed("t", &"b", 11);
        quiet.relayed("other", &"a", 11);
        assert!(quiet.is_quiet(&g, 1, &"a"), "events of other streams");
        quiet.relayed("t", &"a", 10);
        assert!(quiet.is_quiet(&g, 1, &"a"), "up to the mark");
        quiet.relayed("t", &"a", 11);
        assert!(!quiet.is_quiet(&g, 1, &"a"), "an event past the mark");
        // an older batch relayed again (after a loss) does not lower the top
        quiet.relayed("t", &"a", 3);
        assert!(!quiet.is_quiet(&g, 1, &"a"));
    }

    #[test]
    fn a_group_created_again_or_forgotten_has_no_quiet_streams() {
        let mut quiet = QuietStreams::<&str>::new(Duration::from_secs(3600));
        let g = key("g");
        quiet.mark(quiet.ask(10), &g, 1, "a");
        assert!(!quiet.is_quiet(&g, 2, &"a"), "another creation time");
        quiet.mark(quiet.ask(10), &g, 2, "b");
        assert!(!quiet.is_quiet(&g, 1, &"a"), "the older group's marks went");
        assert!(quiet.is_quiet(&g, 2, &"b"));

        quiet.forget(&g);
        assert!(!quiet.is_quiet(&g, 2, &"b"));
        quiet.mark(quiet.ask(10), &g, 2, "b");
        quiet.mark(quiet.ask(10), &key("h"), 2, "b");
        quiet.forget_all();
        assert!(!quiet.is_quiet(&g, 2, &"b"));
        assert!(!quiet.is_quiet(&key("h"), 2, &"b"));
    }

    #[test]
    fn an_answer_asked_before_a_forget_is_not_kept() {
        let mut quiet = QuietStreams::<&str>::new(Duration::from_secs(3600));
        let (g, h) = (key("g"), key("h"));
        let asked = quiet.ask(10);
        quiet.forget(&h);
        quiet.mark(asked, &g, 1, "a");
        assert!(!quiet.is_quiet(&g, 1, &"a"));
        let asked = quiet.ask(10);
        quiet.forget_all();
        quiet.mark(asked, &g, 1, "a");
        assert!(!quiet.is_quiet(&g, 1, &"a"));
        quiet.mark(quiet.ask(10), &g, 1, "a");
        assert!(quiet.is_quiet(&g, 1, &"a"));
    }

    #[test]
    fn a_mark_expires_after_its_ttl() {
        let mut quiet = QuietStreams::<&str>::new(Duration::ZERO);
        let g = key("g");
        quiet.mark(quiet.ask(10), &g, 1, "a");
        assert!(!quiet.is_quiet(&g, 1, &"a"));
    }
}
