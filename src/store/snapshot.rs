//! A point-in-time copy of the store taken a shard at a time.
//!
//! Shards are copied as the consumer (a replication link, a snapshot file)
//! asks for bytes, and a key about to be written is kept first as it was (its
//! before-image, [`KeyImages`]; its whole shard once a quarter of the shard's
//! keys were written: copy-on-write), so the copy is exactly the store as
//! it was when the copy started, without one long pause. Used for snapshots
//! streamed to slaves and for snapshots written to disk.

use byteorder::{BigEndian, ByteOrder};

use super::{SHARDS, Store};

/// Bytes before an entry's key: key length u16, value length u32, version u64 (big-endian).
pub const ENTRY_HEADER_BYTES: usize = 14;
/// Set in an entry's value length when an 8-byte deadline (unix ms) follows the
/// version. Free: no value is 2 GiB or longer (the limit is 512 MiB).
pub const DEADLINE_FLAG: u32 = 1 << 31;

/// One entry as the copy encodes it, borrowed from the copy's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// Key.
    pub key: &'a [u8],
    /// Value.
    pub value: &'a [u8],
    /// Version.
    pub version: u64,
    /// Deadline (unix ms); 0: none.
    pub deadline_ms: u64,
}

/// Encode one entry as `[key_len u16][value_len u32][version u64][key][value]`,
/// or with a deadline `[key_len][value_len | DEADLINE_FLAG][version][deadline u64][key][value]`.
pub fn encode_entry(out: &mut Vec<u8>, key: &[u8], value: &[u8], version: u64, deadline_ms: u64) {
    let mut header = [0u8; ENTRY_HEADER_BYTES];
    BigEndian::write_u16(&mut header[0..2], key.len() as u16);
    let flag = if deadline_ms > 0 { DEADLINE_FLAG } else { 0 };
    BigEndian::write_u32(&mut header[2..6], value.len() as u32 | flag);
    BigEndian::write_u64(&mut header[6..14], version);
    out.extend_from_slice(&header);
    if deadline_ms > 0 {
        out.extend_from_slice(&deadline_ms.to_be_bytes());
    }
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// Decode the entry at the start of `bytes`; `None` if it is cut short or has
/// an empty key. Returns the entry and the bytes it took.
pub fn decode_entry(bytes: &[u8]) -> Option<(EntryRef<'_>, usize)> {
    if bytes.len() < ENTRY_HEADER_BYTES {
        return None;
    }
    let key_len = BigEndian::read_u16(&bytes[0..2]) as usize;
    let raw_len = BigEndian::read_u32(&bytes[2..6]);
    let value_len = (raw_len & !DEADLINE_FLAG) as usize;
    let version = BigEndian::read_u64(&bytes[6..14]);
    let (deadline_ms, key_start) = if raw_len & DEADLINE_FLAG != 0 {
        let at = bytes.get(ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + 8)?;
        (BigEndian::read_u64(at), ENTRY_HEADER_BYTES + 8)
    } else {
        (0, ENTRY_HEADER_BYTES)
    };
    let key_end = key_start + key_len;
    let end = key_end.checked_add(value_len)?;
    if key_len == 0 || bytes.len() < end || (raw_len & DEADLINE_FLAG != 0 && deadline_ms == 0) {
        return None;
    }
    Some((
        EntryRef {
            key: &bytes[key_start..key_end],
            value: &bytes[key_end..end],
            version,
            deadline_ms,
        },
        end,
    ))
}

/// Append every entry of `store`'s shard `shard` to `out` with [`encode_entry`];
/// returns how many.
pub fn encode_shard(store: &Store, shard: usize, out: &mut Vec<u8>) -> u64 {
    let mut entries = 0;
    for block in store.iter_shard(shard) {
        let deadline = block.deadline().unwrap_or(0);
        encode_entry(out, block.key(), block.value(), block.version(), deadline);
        entries += 1;
    }
    entries
}

/// Bytes [`encode_shard`] appends for `store`'s shard `shard`, so that a copy
/// of it is allocated once, at its size.
pub fn encoded_shard_len(store: &Store, shard: usize) -> usize {
    store
        .iter_shard(shard)
        .map(|block| {
            let deadline = if block.deadline().unwrap_or(0) > 0 {
                8
            } else {
                0
            };
            ENTRY_HEADER_BYTES + deadline + block.key().len() + block.value().len()
        })
        .sum()
}

/// A shard of which more than one in this many keys were written since a
/// snapshot began is copied whole instead of kept key by key (before-images).
/// A shard's copy costs about 45 µs at a million keys (245 keys), a key's
/// image a key's worth: a copy made only after a quarter of its keys' worth
/// of images costs at most 4 entries' encoding per write, however the
/// writes of one turn spread over the shards, and images never hold more
/// than about a quarter of what copies of their shards would.
const KEYS_PER_IMAGE: usize = 4;

/// The keys of a shard written since a snapshot began, each with its entry
/// as it was then (its before-image), if it existed.
#[derive(Debug, Default)]
pub struct KeyImages {
    /// Each key's [`Store::key_hash`] and the offset of its `[len u16][key]`
    /// in `keys`, sorted by hash.
    index: Vec<(u64, u32)>,
    keys: Vec<u8>,
    /// The before-images of the keys that existed, encoded with `encode_entry`.
    before: Vec<u8>,
    /// Entries in `before`.
    entries: u64,
}

impl KeyImages {
    fn contains(&self, key: &[u8], hash: u64) -> bool {
        let from = self.index.partition_point(|&(h, _)| h < hash);
        self.index[from..]
            .iter()
            .take_while(|&&(h, _)| h == hash)
            .any(|&(_, at)| {
                let at = at as usize;
                let len = u16::from_be_bytes([self.keys[at], self.keys[at + 1]]) as usize;
                &self.keys[at + 2..at + 2 + len] == key
            })
    }

    /// Record `key`, about to change, as it is in `store` now, unless it
    /// already was (the first image is the one as of the snapshot's start).
    pub fn record(&mut self, store: &Store, key: &[u8], hash: u64) {
        if self.contains(key, hash) {
            return;
        }
        let at = self.index.partition_point(|&(h, _)| h <= hash);
        self.index.insert(at, (hash, self.keys.len() as u32));
        // Keys are at most u16::MAX bytes (the store's limit).
        self.keys
            .extend_from_slice(&(key.len() as u16).to_be_bytes());
        self.keys.extend_from_slice(key);
        if let Some(block) = store.held_block_hashed(key, hash) {
            let deadline = block.deadline().unwrap_or(0);
            encode_entry(
                &mut self.before,
                key,
                block.value(),
                block.version(),
                deadline,
            );
            self.entries += 1;
        }
    }

    pub fn held_bytes(&self) -> usize {
        self.index.capacity() * std::mem::size_of::<(u64, u32)>()
            + self.keys.capacity()
            + self.before.capacity()
    }

    /// Append the shard as of the snapshot's start to `out`: the store's entries for the
    /// keys not written since, then the before-images; returns the entries.
    pub fn encode(&self, store: &Store, shard: usize, out: &mut Vec<u8>) -> u64 {
        let mut entries = self.entries;
        for block in store.iter_shard(shard) {
            if !self.contains(block.key(), store.key_hash(block.key())) {
                let deadline = block.deadline().unwrap_or(0);
                encode_entry(out, block.key(), block.value(), block.version(), deadline);
                entries += 1;
            }
        }
        out.extend_from_slice(&self.before);
        entries
    }

    /// Bytes [`KeyImages::encode`] appends.
    pub fn encoded_len(&self, store: &Store, shard: usize) -> usize {
        let unchanged: usize = store
            .iter_shard(shard)
            .filter(|b| !self.contains(b.key(), store.key_hash(b.key())))
            .map(|b| {
                let deadline = if b.deadline().unwrap_or(0) > 0 { 8 } else { 0 };
                ENTRY_HEADER_BYTES + deadline + b.key().len() + b.value().len()
            })
            .sum();
        unchanged + self.before.len()
    }

    /// Whether more than a quarter of `shard`'s keys were written
    /// ([`KEYS_PER_IMAGE`]): time to copy the whole shard instead.
    pub fn too_many(&self, store: &Store, shard: usize) -> bool {
        self.index.len() * KEYS_PER_IMAGE > store.shard_len(shard)
    }

    /// The buffers, to be freed by the caller (the index is dropped here).
    pub fn into_buffers(self) -> [Vec<u8>; 2] {
        [self.keys, self.before]
    }
}

/// A lazy, exact copy of a store as of the moment it was created.
///
/// Call [`ShardCopy::before_write`] before every write to the store from then
/// on; call [`ShardCopy::fill`] to copy more shards.
#[derive(Debug)]
pub struct ShardCopy {
    /// Copied entries not yet taken, encoded with [`encode_entry`].
    bytes: Vec<u8>,
    taken: usize,
    /// Shards already copied into `bytes`.
    copied: Vec<bool>,
    /// Before-images of the keys written in shards not copied yet.
    images: Vec<Option<Box<KeyImages>>>,
    /// Bytes `images` holds.
    image_bytes: usize,
    /// Shards below this index are all copied.
    scan: usize,
    entries: u64,
}

impl Default for ShardCopy {
    fn default() -> ShardCopy {
        ShardCopy::new()
    }
}

impl ShardCopy {
    /// A copy of the store as it is now (nothing is copied yet).
    pub fn new() -> ShardCopy {
        ShardCopy {
            bytes: Vec::new(),
            taken: 0,
            copied: vec![false; SHARDS],
            images: (0..SHARDS).map(|_| None).collect(),
            image_bytes: 0,
            scan: 0,
            entries: 0,
        }
    }

    /// Copy one shard as it is now, unless already copied.
    fn copy_shard(&mut self, store: &Store, shard: usize) {
        if self.copied[shard] {
            return;
        }
        self.copied[shard] = true;
        self.entries += match self.images[shard].take() {
            Some(images) => {
                self.image_bytes -= images.held_bytes();
                images.encode(store, shard, &mut self.bytes)
            }
            None => encode_shard(store, shard, &mut self.bytes),
        };
    }

    /// `key` is about to change in `store`: keep it as of the copy.
    pub fn before_write(&mut self, store: &Store, key: &[u8]) {
        self.before_key_write(store, key, store.key_hash(key));
    }

    /// `key`, whose [`Store::key_hash`] is `hash`, is about to change: keep
    /// its before-image if its shard is not copied yet, or copy the shard
    /// once a quarter of its keys were written ([`KeyImages::too_many`]).
    pub fn before_key_write(&mut self, store: &Store, key: &[u8], hash: u64) {
        let shard = store.shard_of_hash(hash);
        if self.copied[shard] {
            return;
        }
        let images = self.images[shard].get_or_insert_default();
        let before = images.held_bytes();
        images.record(store, key, hash);
        self.image_bytes = self.image_bytes - before + images.held_bytes();
        if images.too_many(store, shard) {
            self.copy_shard(store, shard);
        }
    }

    /// The whole store is about to be cleared: copy every shard not copied yet.
    pub fn before_clear(&mut self, store: &Store) {
        for shard in 0..SHARDS {
            self.copy_shard(store, shard);
        }
    }

    /// Copy shards until `want` bytes are waiting or every shard is copied.
    pub fn fill(&mut self, store: &Store, want: usize) {
        while self.pending() < want && self.scan < SHARDS {
            self.copy_shard(store, self.scan);
            self.scan += 1;
        }
    }

    /// Bytes copied and not yet taken.
    pub fn pending(&self) -> usize {
        self.bytes.len() - self.taken
    }

    /// Whether every shard is copied and every byte taken.
    pub fn is_done(&self) -> bool {
        self.scan == SHARDS && self.pending() == 0
    }

    /// Bytes of memory the copy holds (what dropping it releases).
    pub fn held_bytes(&self) -> usize {
        self.bytes.capacity() + self.image_bytes
    }

    /// Thousandths of the shards the scan has copied (shards hold about equal
    /// parts of the keys: they are picked by hash).
    pub fn scanned_per_mille(&self) -> u64 {
        (self.scan * 1000 / SHARDS) as u64
    }

    /// Entries copied so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The next whole entries, about `max` bytes of them (at least one if any is pending).
    pub fn take(&mut self, max: usize) -> &[u8] {
        let start = self.taken;
        let mut end = start;
        while end < self.bytes.len() && (end - start < max || end == start) {
            // `bytes` holds only entries written by `encode_entry`, so they decode.
            match decode_entry(&self.bytes[end..]) {
                Some((_, used)) => end += used,
                None => break,
            }
        }
        self.taken = end;
        &self.bytes[start..end]
    }

    /// Forget taken bytes once they are the larger part (amortised O(1) moves).
    /// Slices returned by [`ShardCopy::take`] must be dropped first.
    pub fn compact(&mut self) {
        if 2 * self.taken >= self.bytes.len() {
            self.bytes.drain(..self.taken);
            self.taken = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Write;

    fn drain(copy: &mut ShardCopy, store: &Store, seen: &mut Store) {
        copy.fill(store, 64 * 1024);
        let mut bytes = copy.take(64 * 1024);
        while let Some((e, used)) = decode_entry(bytes) {
            assert!(seen.get(e.key).is_none(), "entry copied twice");
            seen.set(e.key, e.value, e.version);
            bytes = &bytes[used..];
        }
        assert!(bytes.is_empty());
        copy.compact();
    }

    #[test]
    fn copy_sees_the_store_as_it_was_despite_writes() {
        let mut store = Store::new();
        for i in 0..20_000u64 {
            store.set(format!("key{i}").as_bytes(), &[b'a'; 100], 1);
        }
        let expected: Vec<(Vec<u8>, Vec<u8>, u64)> = store
            .iter()
            .map(|b| (b.key().to_vec(), b.value().to_vec(), b.version()))
            .collect();
        let mut copy = ShardCopy::new();
        let mut seen = Store::new();
        let mut round = 0u64;
        while !copy.is_done() {
            drain(&mut copy, &store, &mut seen);
            round += 1;
            for j in 0..200u64 {
                let key = format!("key{}", (round * 997 + j * 31) % 20_000);
                copy.before_write(&store, key.as_bytes());
                if j % 3 == 0 {
                    store.apply(
                        Write::Delete {
                            key: key.as_bytes(),
                        },
                        round + 1,
                    );
                } else {
                    store.set(key.as_bytes(), b"changed", round + 1);
                }
                let new_key = format!("new{round}-{j}");
                copy.before_write(&store, new_key.as_bytes());
                store.set(new_key.as_bytes(), b"new", round + 1);
            }
        }
        assert!(round > 1, "the copy took several rounds");
        assert_eq!(copy.entries(), expected.len() as u64);
        assert_eq!(seen.len(), expected.len());
        for (key, value, version) in expected {
            assert_eq!(seen.get(&key), Some((&value[..], version)));
        }
    }

    #[test]
    fn writes_to_every_shard_keep_key_images_and_the_copy_exact() {
        let mut store = Store::new();
        for i in 0..100_000u64 {
            store.set(format!("key{i}").as_bytes(), &[b'a'; 100], 1);
            if i % 5 == 0 {
                store.set_deadline(format!("key{i}").as_bytes(), Some(7_000 + i));
            }
        }
        let entry = |b: &crate::store::Block| {
            let deadline = b.deadline().unwrap_or(0);
            (b.key().to_vec(), b.value().to_vec(), b.version(), deadline)
        };
        let mut expected: Vec<_> = store.iter().map(entry).collect();
        expected.sort();
        let mut copy = ShardCopy::new();
        let mut first_of = vec![None; SHARDS];
        for i in 0..100_000u64 {
            let key = format!("key{i}");
            first_of[store.shard_of(key.as_bytes())].get_or_insert(key);
        }
        // One batch: a key of every shard changed, deleted, or joined by a new one.
        for (shard, key) in first_of.iter().enumerate() {
            let key = key.as_ref().expect("every shard has keys").as_bytes();
            copy.before_write(&store, key);
            match shard % 3 {
                0 => store.set(key, b"changed", 2),
                1 => {
                    store.apply(Write::Delete { key }, 2);
                }
                _ => {
                    let new_key = [key, b"-new"].concat();
                    copy.before_write(&store, &new_key);
                    store.set(&new_key, b"new", 2);
                }
            }
        }
        // At most the rare shard of a handful of keys is copied for one or two.
        let shards: usize = (0..SHARDS).map(|i| encoded_shard_len(&store, i)).sum();
        assert!(copy.pending() < shards / 200, "{} copied", copy.pending());
        let pending = copy.pending();
        assert!(copy.held_bytes() < shards / 4, "{} held", copy.held_bytes());
        // Many keys of one shard: it is copied at once, whole.
        let busy = store.shard_of(b"key0");
        for key in store.keys_in_shard(busy, 40) {
            copy.before_write(&store, key.as_bytes());
            store.set(key.as_bytes(), b"busy", 3);
        }
        assert!(copy.pending() > pending, "the busy shard was copied");
        let mut seen = Vec::new();
        while !copy.is_done() {
            copy.fill(&store, 64 * 1024);
            let mut bytes = copy.take(64 * 1024);
            while let Some((e, used)) = decode_entry(bytes) {
                seen.push((e.key.to_vec(), e.value.to_vec(), e.version, e.deadline_ms));
                bytes = &bytes[used..];
            }
            copy.compact();
        }
        seen.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn the_encoded_length_of_a_shard_is_what_encoding_it_appends() {
        let mut store = Store::new();
        for i in 0..5_000u64 {
            let key = format!("key{i}");
            store.set(key.as_bytes(), &vec![b'v'; (i % 300) as usize], i + 1);
            if i % 7 == 0 {
                store.set_deadline(key.as_bytes(), Some(1_000 + i));
            }
        }
        for shard in 0..SHARDS {
            let mut out = Vec::new();
            encode_shard(&store, shard, &mut out);
            assert_eq!(encoded_shard_len(&store, shard), out.len(), "shard {shard}");
        }
    }

    #[test]
    fn entry_codec_refuses_short_and_empty() {
        let mut out = Vec::new();
        encode_entry(&mut out, b"key", b"value", 9, 0);
        let (e, used) = decode_entry(&out).expect("decodes");
        assert_eq!(
            (e.key, e.value, e.version, e.deadline_ms, used),
            (&b"key"[..], &b"value"[..], 9, 0, out.len())
        );
        for cut in 0..out.len() {
            assert!(decode_entry(&out[..cut]).is_none(), "cut at {cut}");
        }
        // With a deadline: the flag in the value length, 8 more bytes before the key.
        let mut timed = Vec::new();
        encode_entry(&mut timed, b"key", b"value", 9, 77);
        assert_eq!(timed.len(), out.len() + 8);
        assert_eq!(timed[2] & 0x80, 0x80);
        let (e, used) = decode_entry(&timed).expect("decodes");
        assert_eq!(
            (e.key, e.value, e.deadline_ms, used),
            (&b"key"[..], &b"value"[..], 77, timed.len())
        );
        for cut in 0..timed.len() {
            assert!(decode_entry(&timed[..cut]).is_none(), "cut at {cut}");
        }
        // The flag with a zero deadline is refused.
        timed[14..22].fill(0);
        assert!(decode_entry(&timed).is_none());
        let mut empty = Vec::new();
        encode_entry(&mut empty, b"", b"v", 1, 0);
        assert!(decode_entry(&empty).is_none());
    }
}
