//! The master's bounded in-memory log of recent commits, used for partial resync.

use std::collections::VecDeque;

use super::Ops;

/// A ring of the most recent committed transactions.
///
/// Invariant: every committed transaction with `seq > floor()` is in the ring, in
/// order. A slave whose last known sequence is `>= floor()` can be caught up
/// from the ring alone; anyone older needs a snapshot.
#[derive(Debug, Clone)]
pub struct CommitLog {
    entries: VecDeque<(u64, Ops)>,
    capacity: usize,
    floor: u64,
}

impl CommitLog {
    /// An empty log that remembers at most `capacity` transactions, covering everything after `floor`.
    pub fn new(capacity: usize, floor: u64) -> CommitLog {
        CommitLog {
            entries: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
            floor,
        }
    }

    /// Every committed transaction after this sequence number is in the log.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Number of transactions held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the log holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Append a committed transaction, forgetting the oldest if full.
    pub fn push(&mut self, seq: u64, ops: Ops) {
        debug_assert!(
            seq > self.entries.back().map_or(self.floor, |e| e.0),
            "commit log must grow in sequence order"
        );
        if self.capacity == 0 {
            self.floor = seq;
            return;
        }
        if self.entries.len() == self.capacity
            && let Some((old, _)) = self.entries.pop_front()
        {
            self.floor = old;
        }
        self.entries.push_back((seq, ops));
    }

    /// Whether a slave that knows every outcome through `seq` can catch up from the log.
    pub fn covers(&self, seq: u64) -> bool {
        seq >= self.floor
    }

    /// Committed transactions with sequence numbers in `(after, through]`, in order.
    pub fn range(&self, after: u64, through: u64) -> impl Iterator<Item = &(u64, Ops)> {
        debug_assert!(self.covers(after));
        let start = self.entries.partition_point(|e| e.0 <= after);
        self.entries
            .range(start..)
            .take_while(move |e| e.0 <= through)
    }

    /// Whether `seq` is a commit the log still holds.
    pub fn contains(&self, seq: u64) -> bool {
        self.entries.binary_search_by_key(&seq, |e| e.0).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Ops {
        Vec::new().into()
    }

    #[test]
    fn ring_forgets_oldest_and_raises_floor() {
        let mut log = CommitLog::new(3, 0);
        for seq in [1, 2, 4, 5] {
            log.push(seq, ops());
        }
        assert_eq!(log.floor(), 1);
        assert!(log.covers(1) && !log.covers(0));
        let seqs: Vec<u64> = log.range(1, 10).map(|e| e.0).collect();
        assert_eq!(seqs, vec![2, 4, 5]);
        let seqs: Vec<u64> = log.range(2, 4).map(|e| e.0).collect();
        assert_eq!(seqs, vec![4]);
        assert!(log.contains(4) && !log.contains(3));
    }

    #[test]
    fn zero_capacity_log_covers_only_the_present() {
        let mut log = CommitLog::new(0, 0);
        log.push(1, ops());
        assert!(log.is_empty());
        assert!(log.covers(1) && !log.covers(0));
    }
}
