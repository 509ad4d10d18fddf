//! The in-memory map: each key holds a value and the version (commit sequence
//! number) of the write that last changed it.
//!
//! The replication layer applies committed writes through [`Store::apply`],
//! so the same deterministic code decides NOT_FOUND on every replica.

mod block;
#[cfg(test)]
mod proptests;
mod siphash;
pub mod snapshot;

use std::collections::BTreeMap;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as TableEntry;

pub use block::Block;

/// A write as it is applied to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write<'a> {
    /// Create or replace.
    Put {
        /// Key to write.
        key: &'a [u8],
        /// New value.
        value: &'a [u8],
    },
    /// Replace only if present.
    Update {
        /// Key to write.
        key: &'a [u8],
        /// New value.
        value: &'a [u8],
    },
    /// Remove if present.
    Delete {
        /// Key to remove.
        key: &'a [u8],
    },
    /// Create or replace, expiring at an absolute deadline.
    PutExpiring {
        /// Key to write.
        key: &'a [u8],
        /// New value.
        value: &'a [u8],
        /// Unix time in milliseconds from which the key reads as absent (> 0).
        deadline_ms: u64,
    },
    /// Set (or with `None` remove) the deadline of a key, only if present.
    /// The key's version becomes the write's: its state changed.
    Expire {
        /// Key whose deadline changes.
        key: &'a [u8],
        /// The new deadline, unix ms; `None`: never expire (PERSIST).
        deadline_ms: Option<u64>,
    },
}

impl<'a> Write<'a> {
    /// The key the write changes.
    pub fn key(&self) -> &'a [u8] {
        match *self {
            Write::Put { key, .. }
            | Write::Update { key, .. }
            | Write::Delete { key }
            | Write::PutExpiring { key, .. }
            | Write::Expire { key, .. } => key,
        }
    }
}

/// What applying a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The key changed; it now carries this version (for a delete, the delete's version).
    Changed(u64),
    /// UPDATE or DELETE of an absent key: nothing changed.
    NotFound,
}

// The hash of client-chosen keys: SipHash-1-3 under a random 128-bit key per
// store, a keyed PRF designed for exactly this, so that a client cannot learn
// or build keys that collide in the tables (HashDoS) however long it probes a
// running server. foldhash, used before, is faster but its documentation
// advises against it where an attacker can probe a long-running process;
// ahash is keyed but not a PRF. The cost at 1M keys, measured by
// `benches/store.rs`, is in docs/SECURITY.md.
pub use siphash::{KeyHash, KeyHasher};

/// Number of shards the map is split into (a power of two). Many small shards
/// keep the copy a snapshot makes before a write small (about 45 µs per shard
/// at a million keys), at the same memory as one table.
pub const SHARDS: usize = 4096;

/// The key-value map with per-key versions.
///
/// Entries are [`Block`]s in `hashbrown` tables keyed by a [`KeyHasher`]
/// hash of the key (keyed at random: not predictable by a client). The map is
/// split into [`SHARDS`] tables so that a snapshot can be copied a shard at a
/// time, between turns of the reactor, instead of in one long pause.
pub struct Store<S = KeyHasher> {
    shards: Vec<HashTable<Block>>,
    /// Per shard, the keys that have a deadline (it lives in their block, see
    /// [`Block`]): the sweep skips shards where this is 0.
    expiring_per_shard: Vec<u32>,
    /// Keys that have a deadline, all shards together.
    expiring: usize,
    /// How many held keys have each deadline still ahead (`> now_ms`). As the
    /// clock passes one, its keys move to `expired_held`, so that the number
    /// of keys that exist (DBSIZE, STATS) is exact without a scan, even while
    /// a mass expiry's deletions are still being replicated. About 20 bytes
    /// per distinct deadline.
    deadlines: BTreeMap<u64, u32>,
    /// Held keys whose deadline is at or before `now_ms`: they read as absent.
    expired_held: usize,
    /// The wall clock (unix ms) reads compare deadlines with; set by the
    /// server each turn, never moved back. 0 (the default) expires nothing.
    now_ms: u64,
    hasher: S,
    len: usize,
    /// Sum of key and value bytes, for STATS.
    data_bytes: usize,
}

impl<S: KeyHash + Default> Default for Store<S> {
    fn default() -> Store<S> {
        Store {
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
            expiring_per_shard: vec![0; SHARDS],
            expiring: 0,
            deadlines: BTreeMap::new(),
            expired_held: 0,
            now_ms: 0,
            hasher: S::default(),
            len: 0,
            data_bytes: 0,
        }
    }
}

impl<S> std::fmt::Debug for Store<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.len)
            .field("data_bytes", &self.data_bytes)
            .finish()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Store {
        Store::default()
    }
}

impl<S: KeyHash + Clone + Default> Store<S> {
    /// An empty store that hashes keys as this one does, to replace it (a
    /// snapshot install, a resync). The master hashes a write's key once, when
    /// the write is submitted, and applies it with that hash
    /// ([`Store::apply_hashed`]) after its transaction commits; keeping the
    /// hash key across replacements keeps every such hash valid whatever
    /// replaced the store in between. The key stays as secret as before: it
    /// is random per process and never leaves it.
    pub fn empty_like(&self) -> Store<S> {
        Store {
            hasher: self.hasher.clone(),
            ..Store::default()
        }
    }
}

impl<S: KeyHash> Store<S> {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_key(key)
    }

    /// The hash the store files `key` under, for [`Store::warm`] and
    /// [`Store::apply_hashed`]; also a keyed hash for maps of pending writes,
    /// so that one computation serves both.
    pub fn key_hash(&self, key: &[u8]) -> u64 {
        self.hash(key)
    }

    /// The shard of a hash. Bits 32.. are used because hashbrown takes the
    /// bucket index from the low bits and its tag from the top seven: a shard
    /// chosen from either would leave every key of a shard alike there.
    fn shard_index(hash: u64) -> usize {
        ((hash >> 32) as usize) & (SHARDS - 1)
    }

    /// The shard `key` lives in.
    pub fn shard_of(&self, key: &[u8]) -> usize {
        Self::shard_index(self.hash(key))
    }

    /// `n` keys named `busy<i>` that fall in `shard` (tests that write one shard hard).
    #[cfg(test)]
    pub(crate) fn keys_in_shard(&self, shard: usize, n: usize) -> Vec<String> {
        (0u64..)
            .map(|i| format!("busy{i}"))
            .filter(|key| self.shard_of(key.as_bytes()) == shard)
            .take(n)
            .collect()
    }

    /// The shard of the key whose [`Store::key_hash`] is `hash`.
    pub fn shard_of_hash(&self, hash: u64) -> usize {
        Self::shard_index(hash)
    }

    /// The value and version of `key`; a key whose deadline has passed reads as
    /// absent (it is still held until the master replicates its deletion).
    pub fn get(&self, key: &[u8]) -> Option<(&[u8], u64)> {
        let block = self.block(key)?;
        if block.deadline().is_some_and(|d| d <= self.now_ms) {
            return None;
        }
        Some((block.value(), block.version()))
    }

    /// The value and deadline of `key`; absent once the deadline has passed.
    pub fn get_with_deadline(&self, key: &[u8]) -> Option<(&[u8], Option<u64>)> {
        let block = self.block(key)?;
        let deadline = block.deadline();
        if deadline.is_some_and(|d| d <= self.now_ms) {
            return None;
        }
        Some((block.value(), deadline))
    }

    /// The value and version of `key` whether or not its deadline has passed.
    pub fn get_held(&self, key: &[u8]) -> Option<(&[u8], u64)> {
        self.block(key).map(|b| (b.value(), b.version()))
    }

    /// Look up keys ahead of writing them, so that their cache misses overlap.
    ///
    /// A batch of writes applied one by one waits for each key's block in turn (a
    /// write to a large store misses the cache for its table group and its block),
    /// with the reply path between two writes. Lookups with nothing else between
    /// them are independent, so the processor overlaps their misses, and the
    /// writes that follow find the lines in cache.
    ///
    /// Each key comes with its [`Store::key_hash`], which the writes are then
    /// applied with ([`Store::apply_hashed`]): SipHash of a short key is a
    /// noticeable part of a write's cost, so a key is hashed once for all.
    pub fn warm<'k>(&self, keys: impl IntoIterator<Item = (&'k [u8], u64)>) {
        for (key, hash) in keys {
            debug_assert_eq!(hash, self.hash(key), "the hash is the key's");
            std::hint::black_box(self.block_hashed(key, hash).map(|b| b.version()));
        }
    }

    /// The entry held for the key whose [`Store::key_hash`] is `hash`, past
    /// its deadline or not (snapshots keep it as it was).
    pub fn held_block_hashed(&self, key: &[u8], hash: u64) -> Option<&Block> {
        self.block_hashed(key, hash)
    }

    /// Entries held in one shard.
    pub fn shard_len(&self, shard: usize) -> usize {
        self.shards[shard].len()
    }

    fn block(&self, key: &[u8]) -> Option<&Block> {
        self.block_hashed(key, self.hash(key))
    }

    fn block_hashed(&self, key: &[u8], hash: u64) -> Option<&Block> {
        self.shards[Self::shard_index(hash)].find(hash, |b| b.key() == key)
    }

    /// Set the clock reads compare deadlines with (unix ms). It never moves
    /// back (a wall-clock step back must not revive a key already read as
    /// expired), and the keys whose deadline it passes stop counting as existing.
    pub fn set_now_ms(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        while let Some(entry) = self.deadlines.first_entry()
            && *entry.key() <= self.now_ms
        {
            self.expired_held += entry.remove() as usize;
        }
    }

    /// Account for a held key of `shard` whose deadline goes from `old` to
    /// `new` (`None`: none; both `None` for a key without one).
    fn retrack(&mut self, shard: usize, old: Option<u64>, new: Option<u64>) {
        if old == new {
            return;
        }
        if let Some(d) = old {
            if d <= self.now_ms {
                self.expired_held -= 1;
            } else if let std::collections::btree_map::Entry::Occupied(mut e) =
                self.deadlines.entry(d)
            {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            } else {
                debug_assert!(false, "deadline {d} held but not counted");
            }
        }
        if let Some(d) = new {
            if d <= self.now_ms {
                self.expired_held += 1;
            } else {
                *self.deadlines.entry(d).or_insert(0) += 1;
            }
        }
        match (old.is_some(), new.is_some()) {
            (true, false) => {
                self.expiring -= 1;
                self.expiring_per_shard[shard] -= 1;
            }
            (false, true) => {
                self.expiring += 1;
                self.expiring_per_shard[shard] += 1;
            }
            _ => {}
        }
    }

    /// Keys that exist: those held, less those whose deadline has passed
    /// (still held until the master's deletion of them is applied).
    pub fn live_len(&self) -> usize {
        debug_assert!(self.expired_held <= self.len);
        self.len - self.expired_held
    }

    /// Whether `block` reads as absent because its deadline has passed.
    pub fn is_expired(&self, block: &Block) -> bool {
        block.deadline().is_some_and(|d| d <= self.now_ms)
    }

    /// The clock reads compare deadlines with (unix ms).
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Keys that carry a deadline (expired or not).
    pub fn expiring(&self) -> usize {
        self.expiring
    }

    /// The deadline of `key` (unix ms), if it has one.
    pub fn deadline(&self, key: &[u8]) -> Option<u64> {
        self.block(key)?.deadline()
    }

    /// Give `key` the deadline `deadline_ms` (`None`: none), if it is held.
    /// A block gains or loses room for a deadline by being allocated anew.
    pub fn set_deadline(&mut self, key: &[u8], deadline_ms: Option<u64>) {
        let hash = self.hash(key);
        let shard = Self::shard_index(hash);
        let Some(block) = self.shards[shard].find_mut(hash, |b| b.key() == key) else {
            return;
        };
        let old = block.deadline();
        match (old.is_some(), deadline_ms) {
            (true, Some(d)) => {
                block.set_deadline(d);
            }
            (false, None) => {}
            _ => {
                *block = Block::with_deadline(key, block.value(), block.version(), deadline_ms);
            }
        }
        self.retrack(shard, old, deadline_ms);
    }

    /// Keys of one shard whose deadline is at or before `now_ms` (the sweep).
    /// Walks the whole shard when any of its keys has a deadline.
    pub fn expired_in_shard(&self, shard: usize, now_ms: u64) -> impl Iterator<Item = &[u8]> {
        let any = self.expiring_per_shard[shard] > 0;
        self.shards[shard]
            .iter()
            .filter(move |b| any && b.deadline().is_some_and(|d| d <= now_ms))
            .map(Block::key)
    }

    /// The blocks of `shard` from position `from` of its order on, so that a
    /// sweep can stop anywhere in a shard and resume there. Positions shift when
    /// the shard changes in between: a key may then be seen twice, or only on
    /// the next pass, which a sweep tolerates.
    pub fn shard_blocks_from(&self, shard: usize, from: usize) -> impl Iterator<Item = &Block> {
        self.shards[shard].iter().skip(from)
    }

    /// Keys with a deadline in one shard.
    pub fn expiring_in_shard(&self, shard: usize) -> usize {
        self.expiring_per_shard[shard] as usize
    }

    /// Apply one write at `version`; UPDATE and DELETE of an absent key change nothing.
    pub fn apply(&mut self, write: Write<'_>, version: u64) -> Applied {
        let hash = self.hash(write.key());
        self.apply_hashed(write, version, hash)
    }

    /// [`Store::apply`] with the [`Store::key_hash`] of the write's key.
    pub fn apply_hashed(&mut self, write: Write<'_>, version: u64, hash: u64) -> Applied {
        debug_assert_eq!(hash, self.hash(write.key()), "the hash is the key's");
        match write {
            Write::Put { key, value } => {
                self.set_hashed(key, hash, value, version, None);
                Applied::Changed(version)
            }
            Write::PutExpiring {
                key,
                value,
                deadline_ms,
            } => {
                self.set_hashed(key, hash, value, version, Some(deadline_ms));
                Applied::Changed(version)
            }
            Write::Expire { key, deadline_ms } => {
                match self.shards[Self::shard_index(hash)].find_mut(hash, |b| b.key() == key) {
                    Some(block) => {
                        block.set_version(version);
                        self.set_deadline(key, deadline_ms);
                        Applied::Changed(version)
                    }
                    None => Applied::NotFound,
                }
            }
            Write::Update { key, value } => {
                let shard = Self::shard_index(hash);
                match self.shards[shard].find_mut(hash, |b| b.key() == key) {
                    Some(block) => {
                        self.data_bytes = self.data_bytes - block.value().len() + value.len();
                        // An UPDATE leaves no deadline (as Redis's SET XX).
                        let old = block.deadline();
                        if old.is_some() || !block.overwrite(value, version) {
                            *block = Block::new(key, value, version);
                        }
                        self.retrack(shard, old, None);
                        Applied::Changed(version)
                    }
                    None => Applied::NotFound,
                }
            }
            Write::Delete { key } => {
                let shard = Self::shard_index(hash);
                match self.shards[shard].find_entry(hash, |b| b.key() == key) {
                    Ok(entry) => {
                        let (block, _) = entry.remove();
                        self.len -= 1;
                        self.data_bytes -= key.len() + block.value().len();
                        self.retrack(shard, block.deadline(), None);
                        Applied::Changed(version)
                    }
                    Err(_) => Applied::NotFound,
                }
            }
        }
    }

    /// Create or replace `key` without a deadline (also used to load snapshots).
    pub fn set(&mut self, key: &[u8], value: &[u8], version: u64) {
        self.set_until(key, value, version, None);
    }

    /// Create or replace `key`, leaving it with `deadline` (unix ms; `None`: none).
    pub fn set_until(&mut self, key: &[u8], value: &[u8], version: u64, deadline: Option<u64>) {
        self.set_hashed(key, self.hash(key), value, version, deadline);
    }

    /// [`Store::set_until`] with the key's hash.
    fn set_hashed(
        &mut self,
        key: &[u8],
        hash: u64,
        value: &[u8],
        version: u64,
        deadline: Option<u64>,
    ) {
        let shard = Self::shard_index(hash);
        let hasher = &self.hasher;
        match self.shards[shard].entry(hash, |b| b.key() == key, |b| hasher.hash_key(b.key())) {
            TableEntry::Occupied(mut entry) => {
                let block = entry.get_mut();
                self.data_bytes = self.data_bytes - block.value().len() + value.len();
                let old = block.deadline();
                // In place only when the block keeps its shape (length, room for a deadline).
                let in_place =
                    old.is_some() == deadline.is_some() && block.overwrite(value, version);
                if in_place {
                    if let Some(d) = deadline {
                        block.set_deadline(d);
                    }
                } else {
                    *block = Block::with_deadline(key, value, version, deadline);
                }
                self.retrack(shard, old, deadline);
            }
            TableEntry::Vacant(entry) => {
                self.len += 1;
                self.data_bytes += key.len() + value.len();
                entry.insert(Block::with_deadline(key, value, version, deadline));
                self.retrack(shard, None, deadline);
            }
        }
    }

    /// Remove every entry (FLUSHDB), giving the memory back; keys keep their
    /// shards, so a SCAN cursor (a shard index) stays meaningful.
    pub fn clear(&mut self) {
        for shard in &mut self.shards {
            *shard = HashTable::new();
        }
        self.expiring_per_shard.fill(0);
        self.expiring = 0;
        self.deadlines.clear();
        self.expired_held = 0;
        self.len = 0;
        self.data_bytes = 0;
    }

    /// Keys held, including those whose deadline has passed but whose
    /// deletion is not applied yet ([`Store::live_len`] leaves them out).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of keys and values held (not counting the map's own overhead).
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// Every entry, in no particular order (comparisons, tests).
    pub fn iter(&self) -> impl Iterator<Item = &Block> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    /// The entries of one shard, in no particular order (snapshots).
    pub fn iter_shard(&self, shard: usize) -> impl Iterator<Item = &Block> {
        self.shards[shard].iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_then_get_returns_value_and_version() {
        let mut store = Store::new();
        assert_eq!(store.get(b"k"), None);
        let put = Write::Put {
            key: b"k",
            value: b"v1",
        };
        assert_eq!(store.apply(put, 1), Applied::Changed(1));
        assert_eq!(store.get(b"k"), Some((&b"v1"[..], 1)));
        let put = Write::Put {
            key: b"k",
            value: b"v22",
        };
        assert_eq!(store.apply(put, 2), Applied::Changed(2));
        assert_eq!(store.get(b"k"), Some((&b"v22"[..], 2)));
        assert_eq!(store.len(), 1);
        assert_eq!(store.data_bytes(), 4);
    }

    #[test]
    fn writes_applied_with_their_key_hashes_match_plain_applies() {
        let writes = [
            Write::Put {
                key: b"a",
                value: b"1",
            },
            Write::PutExpiring {
                key: b"b",
                value: b"2",
                deadline_ms: 9,
            },
            Write::Update {
                key: b"a",
                value: b"3",
            },
            Write::Update {
                key: b"c",
                value: b"4",
            },
            Write::Expire {
                key: b"b",
                deadline_ms: None,
            },
            Write::Delete { key: b"a" },
            Write::Delete { key: b"d" },
        ];
        let mut plain = Store::new();
        // Hashed by a store this one replaced: hashes outlive a replacement.
        let replaced = Store::new();
        let hashes: Vec<u64> = writes.iter().map(|w| replaced.key_hash(w.key())).collect();
        let mut hashed = replaced.empty_like();
        hashed.warm(writes.iter().map(|w| w.key()).zip(hashes.iter().copied()));
        for (i, (write, &hash)) in writes.iter().zip(&hashes).enumerate() {
            let version = i as u64 + 1;
            assert_eq!(hash, hashed.hash(write.key()));
            assert_eq!(
                hashed.apply_hashed(*write, version, hash),
                plain.apply(*write, version),
                "{write:?}"
            );
        }
        for key in [&b"a"[..], b"b", b"c", b"d"] {
            assert_eq!(hashed.get(key), plain.get(key));
            assert_eq!(hashed.deadline(key), plain.deadline(key));
        }
        assert_eq!(hashed.len(), plain.len());
        assert_eq!(hashed.data_bytes(), plain.data_bytes());
    }

    #[test]
    fn a_store_made_to_replace_another_keeps_its_hash_key() {
        let mut store = Store::new();
        store.set(b"k", b"v", 1);
        let hash = store.key_hash(b"k");
        let fresh = store.empty_like();
        assert!(fresh.is_empty());
        assert_eq!(fresh.key_hash(b"k"), hash);
        // Any other store has its own random key.
        assert_ne!(Store::new().key_hash(b"k"), hash);
    }

    #[test]
    fn update_only_changes_present_keys() {
        let mut store = Store::new();
        let update = Write::Update {
            key: b"k",
            value: b"v",
        };
        assert_eq!(store.apply(update, 1), Applied::NotFound);
        assert!(store.is_empty());
        store.set(b"k", b"old", 1);
        assert_eq!(store.apply(update, 2), Applied::Changed(2));
        assert_eq!(store.get(b"k"), Some((&b"v"[..], 2)));
        assert_eq!(store.data_bytes(), 2);
    }

    #[test]
    fn delete_removes_present_keys_only() {
        let mut store = Store::new();
        let delete = Write::Delete { key: b"k" };
        assert_eq!(store.apply(delete, 1), Applied::NotFound);
        store.set(b"k", b"value", 1);
        assert_eq!(store.apply(delete, 2), Applied::Changed(2));
        assert_eq!(store.get(b"k"), None);
        assert_eq!(store.data_bytes(), 0);
        assert_eq!(store.apply(delete, 3), Applied::NotFound);
    }

    #[test]
    fn deadlines_hide_keys_once_passed_and_writes_clear_them() {
        let mut store = Store::new();
        let put = Write::PutExpiring {
            key: b"k",
            value: b"v",
            deadline_ms: 1000,
        };
        assert_eq!(store.apply(put, 1), Applied::Changed(1));
        assert_eq!((store.deadline(b"k"), store.expiring()), (Some(1000), 1));
        store.set_now_ms(999);
        assert_eq!(store.get(b"k"), Some((&b"v"[..], 1)));
        store.set_now_ms(1000);
        assert_eq!(store.get(b"k"), None, "expired: reads as absent");
        assert_eq!(store.get_held(b"k"), Some((&b"v"[..], 1)), "but still held");
        assert_eq!(
            store.expired_in_shard(store.shard_of(b"k"), 1000).count(),
            1
        );
        // EXPIRE moves the deadline and the version; PERSIST removes it.
        let expire = Write::Expire {
            key: b"k",
            deadline_ms: Some(5000),
        };
        assert_eq!(store.apply(expire, 2), Applied::Changed(2));
        assert_eq!(store.get(b"k"), Some((&b"v"[..], 2)));
        let persist = Write::Expire {
            key: b"k",
            deadline_ms: None,
        };
        assert_eq!(store.apply(persist, 3), Applied::Changed(3));
        assert_eq!((store.deadline(b"k"), store.expiring()), (None, 0));
        let absent = Write::Expire {
            key: b"nope",
            deadline_ms: Some(1),
        };
        assert_eq!(store.apply(absent, 4), Applied::NotFound);
        // A plain PUT, UPDATE or DELETE leaves no deadline behind.
        for (i, write) in [
            Write::Put {
                key: b"k",
                value: b"w",
            },
            Write::Update {
                key: b"k",
                value: b"x",
            },
            Write::Delete { key: b"k" },
        ]
        .into_iter()
        .enumerate()
        {
            store.apply(put, 10 + 2 * i as u64);
            store.apply(write, 11 + 2 * i as u64);
            assert_eq!(
                (store.deadline(b"k"), store.expiring()),
                (None, 0),
                "{write:?}"
            );
        }
        store.apply(put, 20);
        store.clear();
        assert_eq!(store.expiring(), 0);
    }

    #[test]
    fn keys_past_their_deadline_stop_counting_before_they_are_deleted() {
        let mut store = Store::new();
        store.set_now_ms(100);
        store.set(b"plain", b"p", 1);
        for (i, deadline) in [150u64, 200, 200, 300].into_iter().enumerate() {
            let key = format!("k{i}");
            let put = Write::PutExpiring {
                key: key.as_bytes(),
                value: b"v",
                deadline_ms: deadline,
            };
            store.apply(put, 2 + i as u64);
        }
        assert_eq!((store.len(), store.live_len()), (5, 5));
        store.set_now_ms(200);
        assert_eq!((store.len(), store.live_len()), (5, 2));
        // The clock never moves back: an expired key stays expired.
        store.set_now_ms(120);
        assert_eq!((store.now_ms(), store.live_len()), (200, 2));
        // Deleting an expired key, or giving it a new deadline, counts once.
        store.apply(Write::Delete { key: b"k0" }, 10);
        assert_eq!((store.len(), store.live_len()), (4, 2));
        store.set_deadline(b"k1", Some(400));
        assert_eq!(store.live_len(), 3);
        store.set_deadline(b"k3", None);
        store.apply(
            Write::Update {
                key: b"k1",
                value: b"u",
            },
            11,
        );
        store.set_until(b"k2", b"w", 12, Some(150));
        store.set_now_ms(1_000);
        assert_eq!((store.len(), store.live_len()), (4, 3));
        store.set_until(b"k2", b"w", 13, None);
        assert_eq!((store.live_len(), store.expiring()), (4, 0));
        store.set_until(b"k2", b"w", 14, Some(2_000));
        store.clear();
        store.set_now_ms(3_000);
        assert_eq!((store.len(), store.live_len()), (0, 0));
    }

    #[test]
    fn shards_partition_the_keys() {
        let mut store = Store::new();
        for i in 0..100_000u64 {
            store.set(format!("key{i}").as_bytes(), b"v", i + 1);
        }
        let mut seen = 0;
        let mut used = 0;
        for shard in 0..SHARDS {
            let n = store.iter_shard(shard).count();
            seen += n;
            used += usize::from(n > 0);
            for block in store.iter_shard(shard) {
                assert_eq!(store.shard_of(block.key()), shard);
            }
        }
        assert_eq!(seen, store.len());
        // 100,000 keys in 4,096 shards: about 24 each, none empty unless the hash is broken.
        assert_eq!(used, SHARDS, "100,000 keys reach every shard");
    }

    #[test]
    fn iter_sees_every_key() {
        let mut store = Store::new();
        for i in 0..100u64 {
            store.set(format!("key{i}").as_bytes(), b"v", i + 1);
        }
        let mut versions: Vec<u64> = store.iter().map(|b| b.version()).collect();
        versions.sort_unstable();
        assert_eq!(versions, (1..=100).collect::<Vec<_>>());
    }
}

#[cfg(test)]
mod model_tests {
    use std::collections::HashMap;

    use rand::{RngExt, SeedableRng, rngs::StdRng};

    use super::*;

    /// Random writes against a std HashMap model: same answers, same contents.
    #[test]
    fn matches_a_hashmap_model() {
        let mut rng = StdRng::seed_from_u64(0x5709E);
        let mut store = Store::new();
        let mut model: HashMap<Vec<u8>, (Vec<u8>, u64)> = HashMap::new();
        for version in 1..20_000u64 {
            let key = format!("k{}", rng.random_range(0..500)).into_bytes();
            let value: Vec<u8> = vec![b'x'; rng.random_range(0..40)];
            let write = match rng.random_range(0..3) {
                0 => Write::Put {
                    key: &key,
                    value: &value,
                },
                1 => Write::Update {
                    key: &key,
                    value: &value,
                },
                _ => Write::Delete { key: &key },
            };
            let expected = match write {
                Write::Put { .. } => {
                    model.insert(key.clone(), (value.clone(), version));
                    Applied::Changed(version)
                }
                Write::Update { .. } => match model.get_mut(&key) {
                    Some(entry) => {
                        *entry = (value.clone(), version);
                        Applied::Changed(version)
                    }
                    None => Applied::NotFound,
                },
                Write::Delete { .. } => match model.remove(&key) {
                    Some(_) => Applied::Changed(version),
                    None => Applied::NotFound,
                },
                Write::PutExpiring { .. } | Write::Expire { .. } => unreachable!("not generated"),
            };
            assert_eq!(store.apply(write, version), expected);
            assert_eq!(
                store.get(&key),
                model.get(&key).map(|(v, ver)| (v.as_slice(), *ver))
            );
        }
        assert_eq!(store.len(), model.len());
        let bytes: usize = model.iter().map(|(k, (v, _))| k.len() + v.len()).sum();
        assert_eq!(store.data_bytes(), bytes);
        for block in store.iter() {
            let (value, version) = &model[block.key()];
            assert_eq!(
                (block.value(), block.version()),
                (value.as_slice(), *version)
            );
        }
    }
}
