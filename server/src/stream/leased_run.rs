//! A leased run: the first deliveries of one embedded group claim, leased together and stored as one
//! row (`leased_runs`), so a claim writes one row and an ack updates one bitmap instead of writing
//! and deleting a row per event. Entries leave a run when they are settled (acked, dead-lettered)
//! or when their lease moves on its own (nack, extension, release, expiry: they go to `pending`).

/// The first deliveries handed out by one claim at one priority level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LeasedRun {
    /// When the lease of every entry still in the run ends.
    pub visible_ns: i64,
    /// The claimed sequences, ascending; the first one keys the run.
    seqs: Vec<u64>,
    /// One bit per entry of `seqs`, set once the entry left the run.
    left: Vec<u8>,
    open: usize,
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
        let open = seqs.len();
        LeasedRun {
            visible_ns,
            left: vec![0; open.div_ceil(8)],
            seqs,
            open,
        }
    }

    /// The sequence that keys the run.
    pub fn first(&self) -> u64 {
        self.seqs.first().copied().unwrap_or(0)
    }

    /// The last sequence of the run.
    pub fn last(&self) -> u64 {
        self.seqs.last().copied().unwrap_or(0)
    }

    /// How many entries are still in the run.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Takes `seq` out of the run; false when it is not in it (any more).
    pub fn take(&mut self, seq: u64) -> bool {
        let Ok(i) = self.seqs.binary_search(&seq) else {
            return false;
        };
        let (byte, bit) = (i / 8, 1u8 << (i % 8));
        if self.left[byte] & bit != 0 {
            return false;
        }
        self.left[byte] |= bit;
        self.open -= 1;
        true
    }

    /// The sequences still in the run, ascending.
    pub fn open_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.seqs
            .iter()
            .enumerate()
            .filter(|(i, _)| self.left[i / 8] & (1 << (i % 8)) == 0)
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

    /// The `settled` column.
    pub fn encode_left(&self) -> &[u8] {
        &self.left
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
        let taken: usize = (0..all.len())
            .filter(|i| left[i / 8] & (1 << (i % 8)) != 0)
            .count();
        Ok(LeasedRun {
            visible_ns,
            open: all.len() - taken,
            seqs: all,
            left: left.to_vec(),
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
        let back = LeasedRun::decode(5, &run.encode_seqs(), run.encode_left(), 42).expect("decode");
        assert_eq!(back, run);
        assert_eq!(back.open(), 6);
        assert_eq!(
            back.open_seqs().collect::<Vec<_>>(),
            vec![5, 6, 7, 201, 70_000, 70_001]
        );
        assert_eq!((back.first(), back.last()), (5, u64::from(u32::MAX) * 4));
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
            LeasedRun::decode(1, &seqs[..seqs.len() - 1], run.encode_left(), 0),
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
