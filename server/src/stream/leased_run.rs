//! A leased run: the first deliveries of one embedded group claim, leased together and stored as one
//! row (`leased_runs`), so a claim writes one row and an ack updates one bitmap instead of writing
//! and deleting a row per event. Entries leave a run when they are settled (acked, dead-lettered)
//! or when their lease moves on its own (nack, extension, release, expiry: they go to `pending`).

/// At most this many entries per run: a claim of more is leased as several runs, so an ack that
/// settles a single entry rewrites a row of a few kB, not one as large as the window.
pub(super) const RUN_ENTRIES: usize = 1024;

/// The first deliveries handed out by one claim at one priority level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LeasedRun {
    /// When the lease of every entry still in the run ends.
    pub visible_ns: i64,
    /// The claimed sequences, ascending; the first one keys the run.
    seqs: Vec<u64>,
    left: Left,
}

/// Which entries of a run left it: one bit per entry, and how many are still in it. Changes are
/// made on a copy of this (not of the whole run) until their transaction commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Left {
    bits: Vec<u8>,
    open: usize,
}

impl Left {
    /// Marks entry `i` as gone; false when it already was.
    pub fn take(&mut self, i: usize) -> bool {
        let (byte, bit) = (i / 8, 1u8 << (i % 8));
        if self.bits[byte] & bit != 0 {
            return false;
        }
        self.bits[byte] |= bit;
        self.open -= 1;
        true
    }

    fn has(&self, i: usize) -> bool {
        self.bits[i / 8] & (1 << (i % 8)) != 0
    }

    /// How many entries are still in the run.
    pub fn open(&self) -> usize {
        self.open
    }

    /// The `settled` column.
    pub fn bytes(&self) -> &[u8] {
        &self.bits
    }
}

/// Why a stored run could not be read back.
#[derive(Debug, thiserror::Error)]
pub(super) enum RunDecodeError {
    #[error("sequence list is cut short")]
    Truncated,
    #[error("sequence list does not ascend")]
    NotAscending,
    #[error("bitmap holds {bytes} bytes for {entries} entries")]
    BitmapSize { bytes: usize, entries: usize },
}

impl LeasedRun {
    /// A run of `seqs` (ascending, not empty) leased until `visible_ns`.
    pub fn new(seqs: Vec<u64>, visible_ns: i64) -> Self {
        LeasedRun {
            visible_ns,
            left: Left {
                bits: vec![0; seqs.len().div_ceil(8)],
                open: seqs.len(),
            },
            seqs,
        }
    }

    /// The sequence that keys the run.
    pub fn first(&self) -> u64 {
        self.seqs.first().copied().unwrap_or(0)
    }

    /// How many entries are still in the run.
    pub fn open(&self) -> usize {
        self.left.open
    }

    /// Where `seq` is among the run's entries, whether or not it left.
    pub fn index(&self, seq: u64) -> Option<usize> {
        self.seqs.binary_search(&seq).ok()
    }

    /// Which entries left the run.
    pub fn left(&self) -> &Left {
        &self.left
    }

    /// Puts in what a committed change left of the run.
    pub fn set_left(&mut self, left: Left) {
        debug_assert_eq!(left.bits.len(), self.left.bits.len());
        self.left = left;
    }

    /// Takes `seq` out of the run; false when it is not in it (any more).
    #[cfg(test)]
    pub fn take(&mut self, seq: u64) -> bool {
        self.index(seq).is_some_and(|i| self.left.take(i))
    }

    /// The sequences still in the run, ascending.
    pub fn open_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.seqs
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.left.has(*i))
            .map(|(_, s)| *s)
    }

    /// The `seqs` column: each sequence after the first as its distance to the one before, LEB128.
    pub fn encode_seqs(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.seqs.len());
        for pair in self.seqs.windows(2) {
            let mut delta = pair[1] - pair[0];
            loop {
                let byte = (delta & 0x7f) as u8;
                delta >>= 7;
                if delta == 0 {
                    out.push(byte);
                    break;
                }
                out.push(byte | 0x80);
            }
        }
        out
    }

    /// Reads a run back from its row.
    pub fn decode(
        first: u64,
        seqs: &[u8],
        left: &[u8],
        visible_ns: i64,
    ) -> Result<Self, RunDecodeError> {
        let mut all = vec![first];
        let (mut delta, mut shift) = (0u64, 0u32);
        for byte in seqs {
            if shift >= 64 {
                return Err(RunDecodeError::Truncated);
            }
            delta |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if delta == 0 {
                    return Err(RunDecodeError::NotAscending);
                }
                let next = all[all.len() - 1]
                    .checked_add(delta)
                    .ok_or(RunDecodeError::NotAscending)?;
                all.push(next);
                (delta, shift) = (0, 0);
            } else {
                shift += 7;
            }
        }
        if shift != 0 {
            return Err(RunDecodeError::Truncated);
        }
        if left.len() != all.len().div_ceil(8) {
            return Err(RunDecodeError::BitmapSize {
                bytes: left.len(),
                entries: all.len(),
            });
        }
        let left = Left {
            bits: left.to_vec(),
            open: all.len(),
        };
        let open = all.len() - (0..all.len()).filter(|i| left.has(*i)).count();
        Ok(LeasedRun {
            visible_ns,
            seqs: all,
            left: Left { open, ..left },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_reads_back_as_it_was_stored() {
        let seqs = vec![5, 6, 7, 200, 201, 70_000, 70_001, u64::from(u32::MAX) * 4];
        let mut run = LeasedRun::new(seqs.clone(), 42);
        assert!(run.take(200));
        assert!(run.take(u64::from(u32::MAX) * 4));
        let back =
            LeasedRun::decode(5, &run.encode_seqs(), run.left().bytes(), 42).expect("decode");
        assert_eq!(back, run);
        assert_eq!(back.open(), 6);
        assert_eq!(
            back.open_seqs().collect::<Vec<_>>(),
            vec![5, 6, 7, 201, 70_000, 70_001]
        );
        assert_eq!(back.first(), 5);
    }

    #[test]
    fn an_entry_leaves_a_run_once() {
        let mut run = LeasedRun::new(vec![10, 12, 14], 0);
        assert!(run.take(12));
        assert!(!run.take(12), "taken twice");
        assert!(!run.take(13), "never in the run");
        assert!(run.take(10) && run.take(14));
        assert_eq!(run.open(), 0);
        assert_eq!(run.open_seqs().count(), 0);
    }

    #[test]
    fn a_damaged_row_is_refused() {
        let run = LeasedRun::new(vec![1, 2, 300], 0);
        let seqs = run.encode_seqs();
        assert!(matches!(
            LeasedRun::decode(1, &seqs[..seqs.len() - 1], run.left().bytes(), 0),
            Err(RunDecodeError::Truncated)
        ));
        assert!(matches!(
            LeasedRun::decode(1, &[0], &[0], 0),
            Err(RunDecodeError::NotAscending)
        ));
        assert!(matches!(
            LeasedRun::decode(1, &seqs, &[0, 0], 0),
            Err(RunDecodeError::BitmapSize { .. })
        ));
    }
}
