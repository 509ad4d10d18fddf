//! SipHash-1-3 of a whole key in one call: the store's hash of client keys.
//!
//! std's `RandomState` computes the same function, but through the streaming
//! `Hasher` interface: `[u8]`'s `Hash` writes an 8-byte length prefix, then
//! the bytes through a tail buffer. For the 16-byte keys of a typical load
//! that was about 310 instructions per hash (callgrind), on every GET and
//! SET. Hashing the slice at once, with SipHash's own length byte in the
//! last block and no prefix, takes about a third of that. The function and
//! its security are SipHash-1-3's: a keyed PRF under a random 128-bit key
//! per store (docs/SECURITY.md, hash flooding).

/// A key for [`KeyHasher`] drawn from the operating system.
fn random_key() -> (u64, u64) {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // Not seen on Linux; std's RandomState draws from the same source
        // (its own way), and two of its hashes are 128 unpredictable bits.
        use std::hash::BuildHasher;
        let state = std::hash::RandomState::new();
        return (state.hash_one(0u8), state.hash_one(1u8));
    }
    let (k0, k1) = bytes.split_at(8);
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    (word(k0), word(k1))
}

/// The hash of client keys: SipHash-1-3 under a random key (see the module).
/// `Clone` keeps the key (a store that replaces another, `Store::empty_like`);
/// `Default` draws a new one.
#[derive(Clone)]
pub struct KeyHasher {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is what keeps the tables safe from chosen collisions.
        f.write_str("KeyHasher(..)")
    }
}

impl Default for KeyHasher {
    fn default() -> KeyHasher {
        KeyHasher::new()
    }
}

impl KeyHasher {
    /// A hasher under a fresh random key.
    pub fn new() -> KeyHasher {
        let (k0, k1) = random_key();
        KeyHasher { k0, k1 }
    }
}

/// How the store hashes a key: [`KeyHasher`], or in benchmarks another
/// candidate to compare it with.
pub trait KeyHash {
    /// The hash of `key`.
    fn hash_key(&self, key: &[u8]) -> u64;
}

impl KeyHash for KeyHasher {
    #[inline]
    fn hash_key(&self, key: &[u8]) -> u64 {
        siphash::<1, 3>(self.k0, self.k1, key)
    }
}

#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// The little-endian word of the last 0 to 7 bytes of a message, in at most
/// three loads: a copy of a variable length would call `memcpy`.
#[inline(always)]
fn tail_word(tail: &[u8]) -> u64 {
    debug_assert!(tail.len() < 8);
    let mut word = 0u64;
    let mut at = 0;
    if tail.len() >= 4 {
        word = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        at = 4;
    }
    if tail.len() - at >= 2 {
        word |= u64::from(u16::from_le_bytes([tail[at], tail[at + 1]])) << (8 * at);
        at += 2;
    }
    if at < tail.len() {
        word |= u64::from(tail[at]) << (8 * at);
    }
    word
}

/// SipHash-C-D of `message` under the key (`k0`, `k1`), as its paper
/// specifies it (Aumasson and Bernstein, 2012): 8-byte little-endian words,
/// the last one completed by the message's length modulo 256 in its top byte.
#[inline]
fn siphash<const C: usize, const D: usize>(k0: u64, k1: u64, message: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let compress = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        for _ in 0..C {
            round(v);
        }
        v[0] ^= m;
    };
    let mut words = message.chunks_exact(8);
    for w in &mut words {
        compress(
            &mut v,
            u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]),
        );
    }
    let last = tail_word(words.remainder()) | (message.len() as u64) << 56;
    compress(&mut v, last);
    v[2] ^= 0xff;
    for _ in 0..D {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use std::hash::{DefaultHasher, Hasher};

    use super::*;

    #[test]
    fn siphash_2_4_gives_the_reference_vectors() {
        // The paper's key 00 01 .. 0f; messages 00 01 .. (n-1). n = 0 is the
        // reference implementation's first vector, n = 15 the paper's example.
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let message: Vec<u8> = (0..15).collect();
        assert_eq!(siphash::<2, 4>(k0, k1, &[]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash::<2, 4>(k0, k1, &message), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn siphash_1_3_is_the_one_std_computes() {
        // std's DefaultHasher is SipHash-1-3 under the key (0, 0); its bytes
        // fed through `write` are the message. Every length of tail, words
        // of every byte value.
        for len in 0..=70usize {
            let message: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let mut std = DefaultHasher::new();
            std.write(&message);
            assert_eq!(siphash::<1, 3>(0, 0, &message), std.finish(), "{len} bytes");
        }
    }

    #[test]
    fn each_hasher_has_its_own_key_and_a_clone_keeps_it() {
        let a = KeyHasher::new();
        let b = KeyHasher::new();
        assert_ne!(a.hash_key(b"key"), b.hash_key(b"key"));
        assert_eq!(a.clone().hash_key(b"key"), a.hash_key(b"key"));
        assert_ne!(a.hash_key(b"key"), siphash::<1, 3>(0, 0, b"key"));
        assert_eq!(format!("{a:?}"), "KeyHasher(..)");
    }

    #[test]
    fn keys_that_differ_only_in_length_hash_apart() {
        // The length byte: a key and the key with a zero byte appended.
        let h = KeyHasher::new();
        assert_ne!(h.hash_key(b"k"), h.hash_key(b"k\0"));
        assert_ne!(h.hash_key(b""), h.hash_key(b"\0"));
    }
}
