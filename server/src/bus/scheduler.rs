//! Priority order with starvation prevention: deficit round robin over the four levels.
//!
//! With every level backlogged, CRITICAL:HIGH:NORMAL:LOW get 8:4:2:1 of the deliveries, so a lower level
//! always keeps a guaranteed share (LOW at least 1 in 15) instead of waiting for higher levels to drain.

use crate::event::Priority;

/// Share of each level per round, in the order of [`Priority::ALL`].
pub const WEIGHTS: [u32; 4] = [8, 4, 2, 1];

/// Deficit round robin state of one subscriber, kept across fills.
#[derive(Debug, Default)]
pub struct PriorityScheduler {
    current: usize,
    deficit: [u32; 4],
}

impl PriorityScheduler {
    /// Splits `credits` deliveries across the levels that may have a backlog.
    pub fn allocate(&mut self, mut credits: u32, backlogged: [bool; 4]) -> [u32; 4] {
        let mut share = [0; 4];
        if !backlogged.iter().any(|b| *b) {
            return share;
        }
        while credits > 0 {
            let level = self.current;
            if !backlogged[level] {
                self.deficit[level] = 0;
                self.advance();
                continue;
            }
            if self.deficit[level] == 0 {
                self.deficit[level] = WEIGHTS[level];
            }
            let take = credits.min(self.deficit[level]);
            share[level] += take;
            self.deficit[level] -= take;
            credits -= take;
            if self.deficit[level] == 0 {
                self.advance();
            }
        }
        share
    }

    /// Gives back what a level could not use (it ran dry), so the next visit starts fresh.
    pub fn drained(&mut self, level: usize) {
        self.deficit[level] = 0;
        if self.current == level {
            self.advance();
        }
    }

    fn advance(&mut self) {
        self.current = (self.current + 1) % Priority::ALL.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_weights_when_all_levels_are_backlogged() {
        let mut s = PriorityScheduler::default();
        let mut total = [0; 4];
        for _ in 0..150 {
            let share = s.allocate(1, [true; 4]);
            for i in 0..4 {
                total[i] += share[i];
            }
        }
        assert_eq!(total, [80, 40, 20, 10]);
    }

    #[test]
    fn an_empty_level_gives_its_share_to_the_others() {
        let mut s = PriorityScheduler::default();
        let share = s.allocate(9, [true, false, false, true]);
        assert_eq!(share, [8, 0, 0, 1]);
    }
}
