//! The in-memory map: each key holds a value and the version (commit sequence
//! number) of the write that last changed it.
//!
//! The replication layer applies committed writes through [`Store::apply`],
//! so the same deterministic code decides NOT_FOUND on every replica.

mod block;
pub mod snapshot;

use std::hash::BuildHasher;

use foldhash::fast::RandomState;
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
}

/// What applying a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The key changed; it now carries this version (for a delete, the delete's version).
    Changed(u64),
    /// UPDATE or DELETE of an absent key: nothing changed.
    NotFound,
}

/// Number of shards the map is split into (a power of two). Many small shards
/// keep the copy a snapshot makes before a write small (about 45 µs per shard
/// at a million keys), at the same memory as one table.
pub const SHARDS: usize = 4096;

/// The key-value map with per-key versions.
///
/// Entries are [`Block`]s in `hashbrown` tables keyed by a randomly seeded
/// foldhash of the key (fast, and not predictable by a client). The map is
/// split into [`SHARDS`] tables so that a snapshot can be copied a shard at a
/// time, between turns of the reactor, instead of in one long pause.
pub struct Store {
    shards: Vec<HashTable<Block>>,
    hasher: RandomState,
    len: usize,
    /// Sum of key and value bytes, for STATS.
    data_bytes: usize,
}

impl Default for Store {
    fn default() -> Store {
        Store {
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
            hasher: RandomState::default(),
            len: 0,
            data_bytes: 0,
        }
    }
}

impl std::fmt::Debug for Store {
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

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard of a hash. Bits 32.. are used because hashbrown takes the
    /// bucket index from the low bits and its tag from the top seven: a shard
    /// chosen from either would leave every key of a shard alike there.
    fn shard_index(hash: u64) -> usize {
        ((hash >> 32) as usize) & (SHARDS - 1)
    }

    /// The shard `key` lives in.
    pub fn shard_of(&self, key: &[u8]) -> usize {
        Store::shard_index(self.hash(key))
    }

    /// The value and version of `key`.
    pub fn get(&self, key: &[u8]) -> Option<(&[u8], u64)> {
        let hash = self.hash(key);
        self.shards[Store::shard_index(hash)]
            .find(hash, |b| b.key() == key)
            .map(|b| (b.value(), b.version()))
    }

    /// Apply one write at `version`; UPDATE and DELETE of an absent key change nothing.
    pub fn apply(&mut self, write: Write<'_>, version: u64) -> Applied {
        match write {
            Write::Put { key, value } => {
                self.set(key, value, version);
                Applied::Changed(version)
            }
            Write::Update { key, value } => {
                let hash = self.hash(key);
                match self.shards[Store::shard_index(hash)].find_mut(hash, |b| b.key() == key) {
                    Some(block) => {
                        self.data_bytes = self.data_bytes - block.value().len() + value.len();
                        if !block.overwrite(value, version) {
                            *block = Block::new(key, value, version);
                        }
                        Applied::Changed(version)
                    }
                    None => Applied::NotFound,
                }
            }
            Write::Delete { key } => {
                let hash = self.hash(key);
                match self.shards[Store::shard_index(hash)].find_entry(hash, |b| b.key() == key) {
                    Ok(entry) => {
                        let (block, _) = entry.remove();
                        self.len -= 1;
                        self.data_bytes -= key.len() + block.value().len();
                        Applied::Changed(version)
                    }
                    Err(_) => Applied::NotFound,
                }
            }
        }
    }

    /// Create or replace `key` (also used to load snapshots).
    pub fn set(&mut self, key: &[u8], value: &[u8], version: u64) {
        let hash = self.hash(key);
        let hasher = &self.hasher;
        match self.shards[Store::shard_index(hash)].entry(
            hash,
            |b| b.key() == key,
            |b| hasher.hash_one(b.key()),
        ) {
            TableEntry::Occupied(mut entry) => {
                let block = entry.get_mut();
                self.data_bytes = self.data_bytes - block.value().len() + value.len();
                if !block.overwrite(value, version) {
                    *block = Block::new(key, value, version);
                }
            }
            TableEntry::Vacant(entry) => {
                self.len += 1;
                self.data_bytes += key.len() + value.len();
                entry.insert(Block::new(key, value, version));
            }
        }
    }

    /// Number of keys.
    /// Remove every entry (FLUSHDB), giving the memory back; keys keep their
    /// shards, so a SCAN cursor (a shard index) stays meaningful.
    pub fn clear(&mut self) {
        for shard in &mut self.shards {
            *shard = HashTable::new();
        }
        self.len = 0;
        self.data_bytes = 0;
    }

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
