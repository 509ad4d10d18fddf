//! One entry (version, key, value, and a deadline if it has one) in a single
//! heap allocation behind a thin pointer: 8 bytes in the hash table instead of
//! 40, and one allocation per key instead of two. This is what keeps a million
//! small keys within the memory target; a deadline costs its 8 bytes, and only
//! keys that have one pay them.
//!
//! Blocks come from the system allocator (glibc's malloc) even if the program
//! installs another global allocator: they live long, one per key, and malloc's
//! 8-byte header and 16-byte steps waste little on them (with mimalloc for
//! everything, a million 16-byte keys with 100-byte values took 203 MB, not 166).

use std::alloc::{GlobalAlloc, Layout, System, handle_alloc_error};
use std::ptr::{NonNull, copy_nonoverlapping};

/// Bytes before the key (or the deadline): version u64, value length u32, key length u16.
const HEADER_BYTES: usize = 14;
const VALUE_LEN_AT: usize = 8;
const KEY_LEN_AT: usize = 12;
/// Set in the stored value length when an 8-byte deadline follows the header.
/// Free: values are at most 512 MiB, far below 2 GiB.
const DEADLINE_FLAG: u32 = 1 << 31;
/// Bytes of a deadline.
const DEADLINE_BYTES: usize = 8;

/// An owned entry: `[version: u64][value_len: u32][key_len: u16][deadline: u64, only if
/// bit 31 of value_len][key][value]`, native-endian.
pub struct Block(NonNull<u8>);

// SAFETY: a Block uniquely owns its allocation, like a Box<[u8]>; nothing is shared.
unsafe impl Send for Block {}
// SAFETY: shared access only reads the allocation.
unsafe impl Sync for Block {}

impl Block {
    /// Allocate a block holding `key`, `value` and `version`, without a deadline.
    ///
    /// Panics if `key` exceeds `u16::MAX` or `value` exceeds 2^31 - 1 bytes:
    /// the protocol cannot carry such lengths, so callers never pass them.
    pub fn new(key: &[u8], value: &[u8], version: u64) -> Block {
        Block::with_deadline(key, value, version, None)
    }

    /// Allocate a block holding `key`, `value`, `version` and `deadline` (unix ms).
    pub fn with_deadline(key: &[u8], value: &[u8], version: u64, deadline: Option<u64>) -> Block {
        let key_len = u16::try_from(key.len()).expect("key length fits u16");
        let value_len = u32::try_from(value.len())
            .ok()
            .filter(|&n| n & DEADLINE_FLAG == 0)
            .expect("value length fits 31 bits");
        let layout = layout_for(key.len(), value.len(), deadline.is_some());
        let body = body_at(deadline.is_some());
        let stored_len = value_len | if deadline.is_some() { DEADLINE_FLAG } else { 0 };
        // SAFETY: the layout's size is at least HEADER_BYTES, so not zero.
        let raw = unsafe { System.alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        // SAFETY: `ptr` is a fresh allocation of `layout.size()` = body +
        // key.len() + value.len() bytes (body = HEADER_BYTES, plus DEADLINE_BYTES
        // with a deadline), aligned to 8. The header fields, the deadline and the
        // key and value ranges written below are disjoint and lie inside it; the
        // sources are distinct live slices, so they do not overlap the new allocation.
        unsafe {
            let base = ptr.as_ptr();
            base.cast::<u64>().write(version);
            base.add(VALUE_LEN_AT)
                .cast::<u32>()
                .write_unaligned(stored_len);
            base.add(KEY_LEN_AT).cast::<u16>().write_unaligned(key_len);
            if let Some(deadline) = deadline {
                base.add(HEADER_BYTES)
                    .cast::<u64>()
                    .write_unaligned(deadline);
            }
            copy_nonoverlapping(key.as_ptr(), base.add(body), key.len());
            copy_nonoverlapping(value.as_ptr(), base.add(body + key.len()), value.len());
        }
        Block(ptr)
    }

    fn key_len(&self) -> usize {
        // SAFETY: every Block was initialised by `with_deadline`, whose header holds
        // the key length here.
        unsafe {
            self.0
                .as_ptr()
                .add(KEY_LEN_AT)
                .cast::<u16>()
                .read_unaligned() as usize
        }
    }

    fn stored_len(&self) -> u32 {
        // SAFETY: as for key_len.
        unsafe {
            self.0
                .as_ptr()
                .add(VALUE_LEN_AT)
                .cast::<u32>()
                .read_unaligned()
        }
    }

    fn value_len(&self) -> usize {
        (self.stored_len() & !DEADLINE_FLAG) as usize
    }

    /// Whether the block holds a deadline (fixed when it is allocated).
    pub fn has_deadline(&self) -> bool {
        self.stored_len() & DEADLINE_FLAG != 0
    }

    /// Where the key starts.
    fn body(&self) -> usize {
        body_at(self.has_deadline())
    }

    /// The deadline (unix ms), if the key has one.
    pub fn deadline(&self) -> Option<u64> {
        if !self.has_deadline() {
            return None;
        }
        // SAFETY: with the flag set, `with_deadline` wrote the deadline right after
        // the header, inside the allocation.
        Some(unsafe {
            self.0
                .as_ptr()
                .add(HEADER_BYTES)
                .cast::<u64>()
                .read_unaligned()
        })
    }

    /// Replace the deadline of a block that has one; `false` (nothing done) if it has none.
    pub fn set_deadline(&mut self, deadline: u64) -> bool {
        if !self.has_deadline() {
            return false;
        }
        // SAFETY: the flag says the 8 bytes after the header are the deadline's,
        // inside the allocation `&mut self` owns exclusively.
        unsafe {
            self.0
                .as_ptr()
                .add(HEADER_BYTES)
                .cast::<u64>()
                .write_unaligned(deadline)
        }
        true
    }

    /// The commit sequence number of the write that set this entry.
    pub fn version(&self) -> u64 {
        // SAFETY: the allocation is 8-aligned and starts with the version written by `new`.
        unsafe { self.0.as_ptr().cast::<u64>().read() }
    }

    /// The key bytes.
    pub fn key(&self) -> &[u8] {
        // SAFETY: `with_deadline` wrote key_len key bytes at `body()`, inside the
        // allocation, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().add(self.body()), self.key_len()) }
    }

    /// The value bytes.
    pub fn value(&self) -> &[u8] {
        // SAFETY: `with_deadline` wrote value_len value bytes after the key, inside
        // the allocation.
        unsafe {
            std::slice::from_raw_parts(
                self.0.as_ptr().add(self.body() + self.key_len()),
                self.value_len(),
            )
        }
    }

    /// Change the version alone (EXPIRE and PERSIST change a key's state, not its value).
    pub fn set_version(&mut self, version: u64) {
        // SAFETY: the allocation is 8-aligned and starts with the version; `&mut self`
        // owns it exclusively.
        unsafe { self.0.as_ptr().cast::<u64>().write(version) }
    }

    /// Overwrite the value in place when the length is unchanged; `false` otherwise.
    /// The deadline, if any, stays.
    pub fn overwrite(&mut self, value: &[u8], version: u64) -> bool {
        if value.len() != self.value_len() {
            return false;
        }
        let at = self.body() + self.key_len();
        // SAFETY: the value range has exactly value.len() bytes inside the allocation,
        // which `&mut self` owns exclusively; the source is a distinct slice.
        unsafe {
            let base = self.0.as_ptr();
            copy_nonoverlapping(value.as_ptr(), base.add(at), value.len());
            base.cast::<u64>().write(version);
        }
        true
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let layout = layout_for(self.key_len(), self.value_len(), self.has_deadline());
        // SAFETY: the pointer came from `System.alloc` with this same layout (the
        // lengths and the deadline flag in the header never change after
        // `with_deadline`), and is freed only here, once, by the same allocator.
        unsafe { System.dealloc(self.0.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("value_len", &self.value_len())
            .field("version", &self.version())
            .field("deadline", &self.deadline())
            .finish()
    }
}

/// Where the key starts in a block with or without a deadline.
fn body_at(has_deadline: bool) -> usize {
    HEADER_BYTES + if has_deadline { DEADLINE_BYTES } else { 0 }
}

fn layout_for(key_len: usize, value_len: usize, has_deadline: bool) -> Layout {
    // Cannot fail: the size is below 2^33 and the alignment is a power of two.
    Layout::from_size_align(body_at(has_deadline) + key_len + value_len, 8).expect("block layout")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back() {
        let block = Block::new(b"key", b"value", 7);
        assert_eq!(block.key(), b"key");
        assert_eq!(block.value(), b"value");
        assert_eq!(block.version(), 7);
    }

    #[test]
    fn empty_value_and_largest_key() {
        let key = vec![b'k'; u16::MAX as usize];
        let block = Block::new(&key, b"", u64::MAX);
        assert_eq!(block.key(), &key[..]);
        assert_eq!(block.value(), b"");
        assert_eq!(block.version(), u64::MAX);
    }

    #[test]
    fn a_deadline_sits_before_the_key_and_survives_an_overwrite() {
        let mut block = Block::with_deadline(b"key", b"abc", 3, Some(1_700_000_000_000));
        assert_eq!(
            (
                block.key(),
                block.value(),
                block.version(),
                block.deadline()
            ),
            (&b"key"[..], &b"abc"[..], 3, Some(1_700_000_000_000))
        );
        assert!(block.overwrite(b"xyz", 4));
        assert!(block.set_deadline(9));
        assert_eq!((block.value(), block.deadline()), (&b"xyz"[..], Some(9)));
        let mut plain = Block::new(b"k", b"v", 1);
        assert_eq!((plain.has_deadline(), plain.deadline()), (false, None));
        assert!(
            !plain.set_deadline(9),
            "a block without room for one keeps none"
        );
    }

    #[test]
    fn overwrite_only_in_place_for_equal_length() {
        let mut block = Block::new(b"k", b"abc", 1);
        assert!(block.overwrite(b"xyz", 2));
        assert_eq!((block.value(), block.version()), (&b"xyz"[..], 2));
        assert!(!block.overwrite(b"longer", 3));
        assert_eq!((block.value(), block.version()), (&b"xyz"[..], 2));
    }
}
