//! One entry (version, key, value) in a single heap allocation behind a thin
//! pointer: 8 bytes in the hash table instead of 40, and one allocation per
//! key instead of two. This is what keeps a million small keys within the
//! memory target.

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::ptr::{NonNull, copy_nonoverlapping};

/// Bytes before the key: version u64, value length u32, key length u16.
const HEADER_BYTES: usize = 14;
const VALUE_LEN_AT: usize = 8;
const KEY_LEN_AT: usize = 12;

/// An owned entry: `[version: u64][value_len: u32][key_len: u16][key][value]`, native-endian.
pub struct Block(NonNull<u8>);

// SAFETY: a Block uniquely owns its allocation, like a Box<[u8]>; nothing is shared.
unsafe impl Send for Block {}
// SAFETY: shared access only reads the allocation.
unsafe impl Sync for Block {}

impl Block {
    /// Allocate a block holding `key`, `value` and `version`.
    ///
    /// Panics if `key` exceeds `u16::MAX` or `value` exceeds `u32::MAX` bytes:
    /// the protocol cannot carry such lengths, so callers never pass them.
    pub fn new(key: &[u8], value: &[u8], version: u64) -> Block {
        let key_len = u16::try_from(key.len()).expect("key length fits u16");
        let value_len = u32::try_from(value.len()).expect("value length fits u32");
        let layout = layout_for(key.len(), value.len());
        // SAFETY: the layout's size is at least HEADER_BYTES, so not zero.
        let raw = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        // SAFETY: `ptr` is a fresh allocation of `layout.size()` =
        // HEADER_BYTES + key.len() + value.len() bytes, aligned to 8. The header
        // fields and the key and value ranges written below are disjoint and lie
        // inside it; the sources are distinct live slices, so they do not overlap
        // the new allocation.
        unsafe {
            let base = ptr.as_ptr();
            base.cast::<u64>().write(version);
            base.add(VALUE_LEN_AT)
                .cast::<u32>()
                .write_unaligned(value_len);
            base.add(KEY_LEN_AT).cast::<u16>().write_unaligned(key_len);
            copy_nonoverlapping(key.as_ptr(), base.add(HEADER_BYTES), key.len());
            copy_nonoverlapping(
                value.as_ptr(),
                base.add(HEADER_BYTES + key.len()),
                value.len(),
            );
        }
        Block(ptr)
    }

    fn key_len(&self) -> usize {
        // SAFETY: every Block was initialised by `new`, whose header holds the key length here.
        unsafe {
            self.0
                .as_ptr()
                .add(KEY_LEN_AT)
                .cast::<u16>()
                .read_unaligned() as usize
        }
    }

    fn value_len(&self) -> usize {
        // SAFETY: as for key_len.
        unsafe {
            self.0
                .as_ptr()
                .add(VALUE_LEN_AT)
                .cast::<u32>()
                .read_unaligned() as usize
        }
    }

    /// The commit sequence number of the write that set this entry.
    pub fn version(&self) -> u64 {
        // SAFETY: the allocation is 8-aligned and starts with the version written by `new`.
        unsafe { self.0.as_ptr().cast::<u64>().read() }
    }

    /// The key bytes.
    pub fn key(&self) -> &[u8] {
        // SAFETY: `new` wrote key_len key bytes right after the header, inside the
        // allocation, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().add(HEADER_BYTES), self.key_len()) }
    }

    /// The value bytes.
    pub fn value(&self) -> &[u8] {
        // SAFETY: `new` wrote value_len value bytes after the key, inside the allocation.
        unsafe {
            std::slice::from_raw_parts(
                self.0.as_ptr().add(HEADER_BYTES + self.key_len()),
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
    pub fn overwrite(&mut self, value: &[u8], version: u64) -> bool {
        if value.len() != self.value_len() {
            return false;
        }
        // SAFETY: the value range has exactly value.len() bytes inside the allocation,
        // which `&mut self` owns exclusively; the source is a distinct slice.
        unsafe {
            let base = self.0.as_ptr();
            copy_nonoverlapping(
                value.as_ptr(),
                base.add(HEADER_BYTES + self.key_len()),
                value.len(),
            );
            base.cast::<u64>().write(version);
        }
        true
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let layout = layout_for(self.key_len(), self.value_len());
        // SAFETY: the pointer came from `alloc` with this same layout (the lengths
        // in the header never change after `new`), and is freed only here, once.
        unsafe { dealloc(self.0.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("value_len", &self.value_len())
            .field("version", &self.version())
            .finish()
    }
}

fn layout_for(key_len: usize, value_len: usize) -> Layout {
    // Cannot fail: the size is below 2^33 and the alignment is a power of two.
    Layout::from_size_align(HEADER_BYTES + key_len + value_len, 8).expect("block layout")
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
    fn overwrite_only_in_place_for_equal_length() {
        let mut block = Block::new(b"k", b"abc", 1);
        assert!(block.overwrite(b"xyz", 2));
        assert_eq!((block.value(), block.version()), (&b"xyz"[..], 2));
        assert!(!block.overwrite(b"longer", 3));
        assert_eq!((block.value(), block.version()), (&b"xyz"[..], 2));
    }
}
