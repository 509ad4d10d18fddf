//! Reply routes of the writes in flight, found by their handle without hashing.
//!
//! Every write is inserted here once and looked up once or twice per result;
//! as a hash map this was a tenth of a pipelined SET's CPU (the removal
//! missed the cache). A handle instead names its slot: the low 32 bits are
//! the slab index, the high 32 bits the low bits of a sequence number, so a
//! handle whose write is long answered never finds the slot's next tenant.

use slab::Slab;

use crate::replication::ClientRef;

use super::handler::Waiting;

/// Bits of a handle that hold the slot index.
const INDEX_BITS: u32 = 32;

/// Writes waiting for their transaction's outcome, by handle.
#[derive(Debug)]
pub struct WaitingTable<T = Waiting> {
    /// Per slot: the handle it was given, its full sequence number, the entry.
    slots: Slab<(ClientRef, u64, T)>,
    /// The next handle's sequence number; 1 first, so that no handle is 0
    /// (connections use `ClientRef(0)` for replies that wait for nothing).
    next_seq: u64,
}

impl<T> Default for WaitingTable<T> {
    fn default() -> Self {
        WaitingTable {
            slots: Slab::new(),
            next_seq: 1,
        }
    }
}

impl<T> WaitingTable<T> {
    /// Keep `entry` under a new handle.
    pub fn insert(&mut self, entry: T) -> ClientRef {
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = self.slots.vacant_entry();
        let index = slot.key() as u64;
        // Slab indexes stay far below 2^32: each slot holds a write in memory.
        let handle = ClientRef(((seq & u64::from(u32::MAX)) << INDEX_BITS) | index);
        let handle = if handle.0 == 0 {
            ClientRef(1 << INDEX_BITS)
        } else {
            handle
        };
        slot.insert((handle, seq, entry));
        handle
    }

    /// A handle unlike every other, that names no slot (for replies that wait
    /// in a connection's queue for something else than a write here).
    pub fn handle_without_slot(&mut self) -> ClientRef {
        let seq = self.next_seq;
        self.next_seq += 1;
        // No slab grows to index u32::MAX: each slot holds a write in memory.
        ClientRef(((seq & u64::from(u32::MAX)) << INDEX_BITS) | u64::from(u32::MAX))
    }

    fn index(handle: ClientRef) -> usize {
        (handle.0 & u64::from(u32::MAX)) as usize
    }

    /// The entry of `handle`, if its write is still waiting.
    pub fn get_mut(&mut self, handle: ClientRef) -> Option<&mut T> {
        match self.slots.get_mut(Self::index(handle)) {
            Some((h, _, entry)) if *h == handle => Some(entry),
            _ => None,
        }
    }

    /// Whether `handle`'s write is still waiting.
    pub fn contains(&self, handle: ClientRef) -> bool {
        self.slots
            .get(Self::index(handle))
            .is_some_and(|(h, _, _)| *h == handle)
    }

    /// Take `handle`'s entry out.
    pub fn remove(&mut self, handle: ClientRef) -> Option<T> {
        let index = Self::index(handle);
        if !self.contains(handle) {
            return None;
        }
        self.slots.try_remove(index).map(|(_, _, entry)| entry)
    }

    /// Read the slots of `handles` ahead of answering them, so that their
    /// cache misses overlap (as [`crate::store::Store::warm`] does for keys).
    pub fn warm(&self, handles: &[ClientRef]) {
        for &handle in handles {
            std::hint::black_box(self.contains(handle));
        }
    }

    /// Take every entry out (their writes will never be answered).
    pub fn take_all(&mut self) -> Vec<T> {
        std::mem::take(&mut self.slots)
            .into_iter()
            .map(|(_, (_, _, entry))| entry)
            .collect()
    }

    /// How many writes are waiting.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no write is waiting.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Where the handles stand: [`WaitingTable::forget_since`] takes back
    /// every one inserted after this.
    pub fn mark(&self) -> u64 {
        self.next_seq
    }

    /// Remove every entry inserted since `mark` (an EXEC that cannot run whole).
    pub fn forget_since(&mut self, mark: u64) {
        self.slots.retain(|_, (_, seq, _)| *seq < mark);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_finds_its_entry_until_it_is_removed() {
        let mut t = WaitingTable::default();
        let a = t.insert("a");
        let b = t.insert("b");
        assert_ne!(a, b);
        assert_ne!(a.0, 0);
        assert_eq!(t.len(), 2);
        assert_eq!(t.get_mut(a).map(|e| *e), Some("a"));
        assert_eq!(t.remove(a), Some("a"));
        assert!(!t.contains(a));
        assert_eq!(t.remove(a), None);
        assert_eq!(t.get_mut(a), None);
        assert!(t.contains(b));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_its_old_handle() {
        let mut t = WaitingTable::default();
        let old = t.insert(1);
        t.remove(old);
        let new = t.insert(2);
        // Same slot, another handle.
        assert_eq!(
            WaitingTable::<i32>::index(old),
            WaitingTable::<i32>::index(new)
        );
        assert_ne!(old, new);
        assert!(!t.contains(old));
        assert_eq!(t.get_mut(old), None);
        assert_eq!(t.remove(old), None);
        assert_eq!(t.remove(new), Some(2));
        assert!(t.is_empty());
    }

    #[test]
    fn forget_since_takes_back_only_the_later_handles() {
        let mut t = WaitingTable::default();
        let before = t.insert("kept");
        let mark = t.mark();
        let x = t.insert("x");
        let y = t.insert("y");
        t.forget_since(mark);
        assert!(t.contains(before));
        assert!(!t.contains(x) && !t.contains(y));
        assert_eq!(t.len(), 1);
        // A later handle reuses a slot but is none of the forgotten ones.
        let z = t.insert("z");
        assert!(t.contains(z) && z != x && z != y);
        assert!(!t.contains(x) && !t.contains(y));
        let other = t.handle_without_slot();
        assert!(!t.contains(other) && other != z && other != before);
        assert_eq!(t.remove(other), None);
        assert_eq!(t.len(), 2);
        assert_eq!(t.take_all(), vec!["kept", "z"]);
        assert!(t.is_empty() && !t.contains(before));
    }
}
