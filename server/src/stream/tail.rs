//! The in-memory window over the newest committed events that a replica keeps for private subscribers,
//! in global sequence order across types. Older positions are read from the store.

use std::{collections::VecDeque, sync::Arc, sync::RwLock};

use tokio::sync::watch;

use super::TailRead;
use crate::event::StoredEvent;

/// Most events the window keeps.
const TAIL_EVENTS: usize = 16_384;
/// Most payload bytes the window keeps.
const TAIL_BYTES: usize = 64 << 20;

#[derive(Default)]
struct Window {
    events: VecDeque<Arc<StoredEvent>>,
    bytes: usize,
    last: u64,
}

impl Window {
    /// Whether every event in (`after`, `until`] is here: the window is a gapless run of the log.
    fn holds(&self, after: u64, until: u64) -> bool {
        let first = self.events.front().map_or(self.last + 1, |e| e.sequence);
        after + 1 >= first && until <= self.last
    }
}

/// A bounded window over the log's newest events with a watch on its last sequence.
pub(crate) struct Tail {
    window: RwLock<Window>,
    head: watch::Sender<u64>,
}

impl Tail {
    /// Starts an empty window positioned after `last`.
    pub(crate) fn new(last: u64) -> Self {
        Tail {
            window: RwLock::new(Window {
                last,
                ..Window::default()
            }),
            head: watch::channel(last).0,
        }
    }

    /// Adds events in sequence order, skipping those at or below the last one.
    pub(crate) fn push(&self, events: &[Arc<StoredEvent>]) {
        let mut window = self.window.write().unwrap_or_else(|p| p.into_inner());
        for event in events {
            if event.sequence <= window.last {
                continue;
            }
            window.bytes += event.event.size();
            window.last = event.sequence;
            window.events.push_back(event.clone());
        }
        while window.events.len() > TAIL_EVENTS
            || (window.bytes > TAIL_BYTES && window.events.len() > 1)
        {
            if let Some(old) = window.events.pop_front() {
                window.bytes -= old.event.size();
            }
        }
        let last = window.last;
        drop(window);
        self.head.send_if_modified(|h| {
            let grew = last > *h;
            *h = (*h).max(last);
            grew
        });
    }

    /// The last sequence pushed.
    pub(crate) fn last(&self) -> u64 {
        self.window.read().unwrap_or_else(|p| p.into_inner()).last
    }

    /// Watches the last sequence pushed.
    pub(crate) fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Reads up to `max` events after `after`, or says where the window begins.
    pub(crate) fn read_after(&self, after: u64, max: usize) -> TailRead {
        let window = self.window.read().unwrap_or_else(|p| p.into_inner());
        if after >= window.last {
            return TailRead::Events(Vec::new());
        }
        match window.events.front() {
            Some(first) if after + 1 >= first.sequence => {
                let start = window.events.partition_point(|e| e.sequence <= after);
                TailRead::Events(window.events.range(start..).take(max).cloned().collect())
            }
            Some(first) => TailRead::Trimmed {
                oldest: first.sequence,
            },
            None => TailRead::Trimmed {
                oldest: window.last + 1,
            },
        }
    }

    /// Up to `limit` events in (`after`, `until`] that `keep` accepts, in order, and the last sequence
    /// looked at (`until` when fewer than `limit` were kept); `None` unless the window holds every
    /// event in that range.
    pub(crate) fn scan(
        &self,
        after: u64,
        until: u64,
        limit: usize,
        keep: impl Fn(&StoredEvent) -> bool,
    ) -> Option<(Vec<Arc<StoredEvent>>, u64)> {
        let window = self.window.read().unwrap_or_else(|p| p.into_inner());
        if !window.holds(after, until) {
            return None;
        }
        let start = window.events.partition_point(|e| e.sequence <= after);
        let mut kept = Vec::new();
        for event in window.events.range(start..) {
            if event.sequence > until {
                break;
            }
            if keep(event) {
                kept.push(event.clone());
                if kept.len() >= limit {
                    return Some((kept, event.sequence));
                }
            }
        }
        Some((kept, until))
    }

    /// Whether the window holds every event in (`after`, `until`].
    pub(crate) fn holds(&self, after: u64, until: u64) -> bool {
        self.window
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .holds(after, until)
    }

    /// Returns the events of the given sequences that the window still holds.
    pub(crate) fn cached(
        &self,
        sequences: &[u64],
    ) -> std::collections::HashMap<u64, Arc<StoredEvent>> {
        let window = self.window.read().unwrap_or_else(|p| p.into_inner());
        let Some(first) = window.events.front().map(|e| e.sequence) else {
            return Default::default();
        };
        sequences
            .iter()
            .filter(|s| **s >= first)
            .filter_map(|s| {
                let i = window.events.partition_point(|e| e.sequence < *s);
                window.events.get(i).filter(|e| e.sequence == *s).cloned()
            })
            .map(|e| (e.sequence, e))
            .collect()
    }
}
