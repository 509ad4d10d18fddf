//! The bytes of one replicated write (its key, then its value), in buffers
//! the thread recycles.
//!
//! Every SET builds a [`WriteOp`](super::peer::WriteOp) and drops it once its
//! batch is applied: a `malloc` and a `free` per write on the hottest path.
//! A committed batch frees hundreds of same-sized buffers at once, which
//! overflows glibc's per-thread cache (7 per size) and sends the rest
//! through its slower bins (about 10% of a pipelined SET's instructions).
//! So the buffers go back to a bounded per-thread pool instead, sized in
//! steps of [`STEP`] bytes up to [`MAX_POOLED_BYTES`], and the next batch takes
//! them from there.

use std::cell::RefCell;
use std::fmt;
use std::hash::{Hash, Hasher};

/// Pooled buffers come in capacities of a multiple of this.
pub const STEP: usize = 64;
/// The largest pooled capacity; larger writes allocate as usual.
pub const MAX_POOLED_BYTES: usize = 1024;
const CLASSES: usize = MAX_POOLED_BYTES / STEP;
/// Buffers kept per capacity: a batch of writes of one size fits, and the
/// pool holds at most this many times 8.5 KiB per thread.
pub const MAX_POOLED_PER_CLASS: usize = 1024;

thread_local! {
    static POOL: RefCell<[Vec<Vec<u8>>; CLASSES]> = const { RefCell::new([const { Vec::new() }; CLASSES]) };
}

/// The pool class of a buffer of `capacity` bytes, if it is one of the pooled capacities.
fn class_of_capacity(capacity: usize) -> Option<usize> {
    (capacity.is_multiple_of(STEP) && (STEP..=MAX_POOLED_BYTES).contains(&capacity))
        .then(|| capacity / STEP - 1)
}

/// An empty buffer with room for `len` bytes: from the pool when `len` is pooled.
fn take(len: usize) -> Vec<u8> {
    if len == 0 || len > MAX_POOLED_BYTES {
        return Vec::with_capacity(len);
    }
    let class = len.div_ceil(STEP) - 1;
    POOL.try_with(|pool| pool.borrow_mut()[class].pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity((class + 1) * STEP))
}

/// Keep `buffer` for a later [`take`] if it has a pooled capacity and its class has room.
fn give(mut buffer: Vec<u8>) {
    let Some(class) = class_of_capacity(buffer.capacity()) else {
        return;
    };
    buffer.clear();
    // During the thread's exit the pool may be gone: the buffer is freed.
    let _ = POOL.try_with(|pool| {
        if let Ok(mut pool) = pool.try_borrow_mut()
            && pool[class].len() < MAX_POOLED_PER_CLASS
        {
            pool[class].push(buffer);
        }
    });
}

/// Buffers in this thread's pool (for tests).
#[cfg(test)]
fn pooled() -> usize {
    POOL.with(|pool| pool.borrow().iter().map(Vec::len).sum())
}

/// A key and value in one buffer, returned to the thread's pool when dropped.
pub struct OpBytes(Vec<u8>);

impl OpBytes {
    /// The concatenation of `parts`.
    pub fn concat(parts: &[&[u8]]) -> OpBytes {
        let mut bytes = take(parts.iter().map(|p| p.len()).sum());
        for part in parts {
            bytes.extend_from_slice(part);
        }
        OpBytes(bytes)
    }

    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for OpBytes {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

impl Clone for OpBytes {
    fn clone(&self) -> OpBytes {
        OpBytes::concat(&[&self.0])
    }
}

impl PartialEq for OpBytes {
    fn eq(&self, other: &OpBytes) -> bool {
        self.0 == other.0
    }
}

impl Eq for OpBytes {}

impl Hash for OpBytes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for OpBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_slice(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_the_parts_concatenated() {
        for total in [0, 1, 63, 64, 65, 116, 1023, 1024, 1025, 70_000] {
            let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
            for cut in [0, total / 3, total] {
                let (a, b) = data.split_at(cut);
                let bytes = OpBytes::concat(&[a, b]);
                assert_eq!(bytes.as_slice(), &data[..], "{total} cut at {cut}");
                assert_eq!(bytes.clone(), bytes);
            }
        }
    }

    #[test]
    fn dropped_buffers_are_reused_up_to_the_bound() {
        // Tests run on threads of their own: this pool is this test's.
        assert_eq!(pooled(), 0);
        let ops: Vec<OpBytes> = (0..MAX_POOLED_PER_CLASS + 10)
            .map(|i| OpBytes::concat(&[b"key:", &i.to_be_bytes(), &[7; 100]]))
            .collect();
        let first = ops[0].as_slice().as_ptr();
        drop(ops);
        assert_eq!(pooled(), MAX_POOLED_PER_CLASS, "the class is bounded");
        // The last buffer given back is the first taken, and keeps its capacity.
        let again = OpBytes::concat(&[&[1; 120]]);
        assert_eq!(again.0.capacity(), 128);
        assert_eq!(pooled(), MAX_POOLED_PER_CLASS - 1);
        assert_ne!(
            again.as_slice().as_ptr(),
            first,
            "the first ones were freed, not kept"
        );
        // Large and empty buffers are never pooled.
        drop(OpBytes::concat(&[&vec![0; MAX_POOLED_BYTES + 1]]));
        drop(OpBytes::concat(&[]));
        drop(again);
        assert_eq!(pooled(), MAX_POOLED_PER_CLASS);
    }

    #[test]
    fn a_buffer_dropped_on_another_thread_goes_to_that_threads_pool() {
        let op = OpBytes::concat(&[b"k", b"v"]);
        std::thread::spawn(move || {
            drop(op);
            assert_eq!(pooled(), 1);
        })
        .join()
        .expect("thread");
        assert_eq!(pooled(), 0);
    }
}
