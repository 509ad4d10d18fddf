//! The in-memory map: each key holds a value and the version (commit sequence
//! number) of the write that last changed it.
//!
//! The replication layer applies committed writes through [`Store::apply`],
//! so the same deterministic code decides NOT_FOUND on every replica.

use std::collections::HashMap;

/// A key's value and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stored bytes.
    pub value: Box<[u8]>,
    /// Commit sequence number of the write that last changed the key.
    pub version: u64,
}

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

/// The key-value map with per-key versions.
#[derive(Debug, Default)]
pub struct Store {
    map: HashMap<Box<[u8]>, Entry>,
    /// Sum of key and value bytes, for STATS.
    data_bytes: usize,
}

impl Store {
    /// An empty store.
    pub fn new() -> Store {
        Store::default()
    }

    /// The value and version of `key`.
    pub fn get(&self, key: &[u8]) -> Option<(&[u8], u64)> {
        self.map.get(key).map(|e| (&*e.value, e.version))
    }

    /// Apply one write at `version`; UPDATE and DELETE of an absent key change nothing.
    pub fn apply(&mut self, write: Write<'_>, version: u64) -> Applied {
        match write {
            Write::Put { key, value } => {
                self.set(key, value, version);
                Applied::Changed(version)
            }
            Write::Update { key, value } => match self.map.get_mut(key) {
                Some(entry) => {
                    self.data_bytes = self.data_bytes - entry.value.len() + value.len();
                    entry.value = value.into();
                    entry.version = version;
                    Applied::Changed(version)
                }
                None => Applied::NotFound,
            },
            Write::Delete { key } => match self.map.remove(key) {
                Some(entry) => {
                    self.data_bytes -= key.len() + entry.value.len();
                    Applied::Changed(version)
                }
                None => Applied::NotFound,
            },
        }
    }

    /// Create or replace `key` (also used to load snapshots).
    pub fn set(&mut self, key: &[u8], value: &[u8], version: u64) {
        match self.map.get_mut(key) {
            Some(entry) => {
                self.data_bytes = self.data_bytes - entry.value.len() + value.len();
                entry.value = value.into();
                entry.version = version;
            }
            None => {
                self.data_bytes += key.len() + value.len();
                self.map.insert(
                    key.into(),
                    Entry {
                        value: value.into(),
                        version,
                    },
                );
            }
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of keys and values held (not counting the map's own overhead).
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// Every key with its entry, in no particular order (snapshots, comparisons).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.map.iter().map(|(k, e)| (&**k, e))
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
    fn iter_sees_every_key() {
        let mut store = Store::new();
        for i in 0..100u64 {
            store.set(format!("key{i}").as_bytes(), b"v", i + 1);
        }
        let mut versions: Vec<u64> = store.iter().map(|(_, e)| e.version).collect();
        versions.sort_unstable();
        assert_eq!(versions, (1..=100).collect::<Vec<_>>());
    }
}
