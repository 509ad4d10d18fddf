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
    /// Bound on the key and value bytes held: a count alone would let big
    /// group-committed transactions hold gigabytes.
    max_bytes: usize,
    bytes: usize,
    floor: u64,
    /// A snapshot being streamed as of this seq: the commits after it are
    /// kept past the bounds (up to [`PIN_SLACK`] times them), so that the
    /// slave can catch up from the log once the snapshot is in instead of
    /// needing another snapshot, and another, under heavy writes.
    pin: Option<u64>,
}

/// How far past its bounds the log may grow to keep a pinned range.
pub const PIN_SLACK: usize = 4;
/// Bytes a pinned range may always hold, however small the bounds. A snapshot
/// is streamed over many loop iterations (a bounded part per turn) and every
/// commit released meanwhile must still be in the log when its last chunk is
/// queued. 64 MiB is about 350,000 writes of 16 B keys and 100 B values (the
/// SPEC's workload): the several seconds a 1M-key store (about 130 MB of
/// entries) takes to stream, at the master's full write rate. It is the
/// memory a master may spend beyond `--repl-backlog-mb` for a joining slave;
/// past a quarter of it the coordinator throttles writes to the snapshot's
/// progress instead (`Coordinator::write_hold`), so a snapshot finishes
/// whatever the write load, and the log gives way only if the snapshot stalls.
pub const PIN_FLOOR_BYTES: usize = 64 << 20;
/// How full a pinned log is, in thousandths of its pinned bounds.
pub const PIN_FULL: u64 = 1000;

/// Bytes a transaction holds in the log, for the byte bound.
pub(super) fn ops_bytes(ops: &Ops) -> usize {
    ops.iter()
        .map(|op| op.key().len() + op.value().len() + 64)
        .sum()
}

impl CommitLog {
    /// An empty log that remembers at most `capacity` transactions, covering everything after `floor`.
    pub fn new(capacity: usize, floor: u64) -> CommitLog {
        CommitLog {
            entries: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
            max_bytes: usize::MAX,
            bytes: 0,
            floor,
            pin: None,
        }
    }

    /// The same log, also bounded to about `max_bytes` of keys and values.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> CommitLog {
        self.max_bytes = max_bytes;
        self
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
        self.bytes += ops_bytes(&ops);
        self.entries.push_back((seq, ops));
        while self.entries.len() > self.capacity || self.bytes > self.max_bytes {
            let Some(&(oldest, _)) = self.entries.front() else {
                break;
            };
            let within_slack =
                self.entries.len() <= self.pin_max_len() && self.bytes <= self.pin_max_bytes();
            if self.pin.is_some_and(|pin| oldest > pin) && within_slack {
                break;
            }
            let Some((old, ops)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= ops_bytes(&ops);
            self.floor = old;
        }
    }

    /// Keep the commits after `seq` past the bounds (within a slack), or stop keeping them.
    pub fn pin(&mut self, seq: Option<u64>) {
        self.pin = seq;
    }

    /// Bytes (keys, values and 64 per write) the log holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Most bytes a pinned log holds before the pin gives way.
    pub fn pin_max_bytes(&self) -> usize {
        self.max_bytes
            .saturating_mul(PIN_SLACK)
            .max(PIN_FLOOR_BYTES)
    }

    /// Most transactions a pinned log holds before the pin gives way.
    fn pin_max_len(&self) -> usize {
        self.capacity.saturating_mul(PIN_SLACK)
    }

    /// Whether a pin is set and still holds: every commit after it is kept.
    /// A pin that gave way (the log wrapped past it) stays broken until moved.
    pub fn pin_holds(&self) -> bool {
        self.pin.is_some_and(|pin| self.covers(pin))
    }

    /// How full the log is against its pinned bounds, in thousandths
    /// ([`PIN_FULL`] and beyond: the pin gives way at the next commit), by
    /// whichever of the count and the byte bound is closer.
    pub fn pin_fill(&self) -> u64 {
        let per_mille = |used: usize, max: usize| -> u64 {
            if max == 0 {
                return PIN_FULL;
            }
            (used as u128 * PIN_FULL as u128 / max as u128).min(u64::MAX as u128) as u64
        };
        per_mille(self.entries.len(), self.pin_max_len())
            .max(per_mille(self.bytes, self.pin_max_bytes()))
    }

    /// Forget everything and cover only what comes after `seq` (a commit not kept).
    pub fn forget_through(&mut self, seq: u64) {
        debug_assert!(seq >= self.floor, "the floor never goes back");
        self.entries.clear();
        self.bytes = 0;
        self.floor = seq;
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
    fn byte_bound_forgets_oldest_too() {
        let op = |len| {
            crate::protocol::peer::WriteOp::new(
                crate::protocol::peer::OpKind::Put,
                b"k",
                vec![0; len],
            )
        };
        let mut log = CommitLog::new(100, 0).with_max_bytes(1000);
        log.push(1, vec![op(400)].into());
        log.push(2, vec![op(400)].into());
        assert_eq!(log.len(), 2);
        log.push(3, vec![op(400)].into());
        assert_eq!(log.len(), 2, "three transactions of ~465 bytes exceed 1000");
        assert_eq!(log.floor(), 1);
        log.push(4, vec![op(5000)].into());
        assert!(
            log.is_empty(),
            "a transaction larger than the bound is not kept"
        );
        assert_eq!(log.floor(), 4);
        assert!(log.covers(4) && !log.covers(3));
    }

    #[test]
    fn a_pin_keeps_the_commits_after_it_within_the_slack() {
        let mut log = CommitLog::new(2, 0);
        log.push(1, ops());
        log.push(2, ops());
        log.pin(Some(2));
        for seq in 3..=10 {
            log.push(seq, ops());
        }
        assert!(log.covers(2), "everything after the pin is still there");
        assert_eq!(log.len(), 8);
        log.push(11, ops());
        assert!(!log.covers(2), "past the slack (4 x 2) the pin gives way");
        log.pin(None);
        log.push(12, ops());
        assert_eq!(log.len(), 2);
        assert_eq!(log.floor(), 10);
    }

    #[test]
    fn a_pin_keeps_a_floor_of_bytes_even_with_a_zero_byte_bound() {
        let op = |len| {
            crate::protocol::peer::WriteOp::new(
                crate::protocol::peer::OpKind::Put,
                b"k",
                vec![0; len],
            )
        };
        let mut log = CommitLog::new(100, 0).with_max_bytes(0);
        log.pin(Some(0));
        for seq in 1..=50 {
            log.push(seq, vec![op(1000)].into());
        }
        assert!(log.covers(0), "50 KB of commits after the pin are kept");
        log.pin(None);
        log.push(51, vec![op(1000)].into());
        assert!(log.is_empty(), "unpinned, the zero-byte bound holds");
    }

    #[test]
    fn a_pin_reports_how_full_the_log_is_and_whether_it_holds() {
        let mut log = CommitLog::new(2, 0);
        assert!(!log.pin_holds(), "no pin");
        log.push(1, ops());
        log.pin(Some(1));
        assert!(log.pin_holds());
        assert_eq!(
            log.pin_fill(),
            125,
            "1 of the pinned 8 entries (empty ops: no bytes)"
        );
        for seq in 2..=5 {
            log.push(seq, ops());
        }
        assert_eq!(
            log.pin_fill(),
            500,
            "4 of the pinned 8 (seq 1 itself is not kept)"
        );
        for seq in 6..=9 {
            log.push(seq, ops());
        }
        assert_eq!(log.pin_fill(), PIN_FULL);
        assert!(log.pin_holds(), "full, not past it");
        log.push(10, ops());
        assert!(!log.pin_holds(), "past the slack the pin gave way");
        log.pin(Some(10));
        assert!(log.pin_holds(), "moved to the present, it holds again");
    }

    #[test]
    fn a_pin_keeps_64_mib_however_small_the_byte_bound() {
        // Zeroed values are never touched: no memory is actually used.
        let op = |len| {
            crate::protocol::peer::WriteOp::new(
                crate::protocol::peer::OpKind::Put,
                b"k",
                vec![0; len],
            )
        };
        let mut log = CommitLog::new(1000, 0).with_max_bytes(1 << 20);
        assert_eq!(log.pin_max_bytes(), PIN_FLOOR_BYTES);
        log.pin(Some(0));
        for seq in 1..=63 {
            log.push(seq, vec![op(1 << 20)].into());
        }
        assert!(log.pin_holds(), "63 MiB after the pin are kept");
        assert!(
            (984..PIN_FULL).contains(&log.pin_fill()),
            "{}",
            log.pin_fill()
        );
        log.push(64, vec![op(1 << 20)].into());
        assert!(!log.pin_holds(), "past 64 MiB the pin gives way");
        assert!(log.bytes() <= PIN_FLOOR_BYTES);
        let big = CommitLog::new(1000, 0).with_max_bytes(64 << 20);
        assert_eq!(big.pin_max_bytes(), PIN_SLACK << 26, "4 x a large bound");
    }

    #[test]
    fn forgetting_moves_the_floor_past_everything() {
        let mut log = CommitLog::new(10, 0);
        log.push(1, ops());
        log.push(2, ops());
        log.forget_through(3);
        assert!(log.is_empty());
        assert_eq!(log.floor(), 3);
        assert!(log.covers(3) && !log.covers(2));
        log.push(4, ops());
        assert_eq!(log.range(3, 4).count(), 1);
    }

    #[test]
    fn zero_capacity_log_covers_only_the_present() {
        let mut log = CommitLog::new(0, 0);
        log.push(1, ops());
        assert!(log.is_empty());
        assert!(log.covers(1) && !log.covers(0));
    }
}
