//! What to send: the operation mix, which key each operation touches, and the key bytes.
//!
//! Everything here is pure computation over a seeded RNG so a run can be replayed with `--seed`.

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

/// Which keys the workload touches.
#[derive(Debug, Clone)]
pub enum KeyDistribution {
    /// Every key equally likely.
    Uniform,
    /// A few hot keys, YCSB-style.
    Zipf(Zipf),
}

/// A zipfian generator over `0..items` after Gray et al., "Quickly Generating Billion-Record
/// Synthetic Databases" (SIGMOD 1994), as used by YCSB's `ZipfianGenerator`.
///
/// Rank 0 is the hottest item. [`Zipf::scatter`] maps ranks onto keys so the hot keys are spread
/// over the keyspace rather than bunched at its start, like YCSB's scrambled zipfian, but through
/// a bijection so the skew is kept exactly (no two ranks collide on one key).
#[derive(Debug, Clone)]
pub struct Zipf {
    items: u64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    half_pow_theta: f64,
    scatter_mul: u64,
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Zipf {
    /// A generator over `0..items` with skew `theta` (0 < theta < 1; YCSB uses 0.99).
    ///
    /// Computing the normalising constant is O(items), done once per run.
    pub fn new(items: u64, theta: f64) -> Zipf {
        debug_assert!(items >= 1);
        debug_assert!(theta > 0.0 && theta < 1.0);
        let zetan = zeta(items, theta);
        let zeta2 = zeta(2.min(items), theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = if items < 2 {
            0.0
        } else {
            (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan)
        };
        // Any multiplier coprime with `items` permutes 0..items; a large odd prime spreads
        // neighbouring ranks far apart.
        let mut scatter_mul = 2_654_435_761u64 % items.max(1);
        while items > 1 && gcd(scatter_mul, items) != 1 {
            scatter_mul += 1;
        }
        Zipf {
            items,
            alpha,
            zetan,
            eta,
            half_pow_theta: 0.5f64.powf(theta),
            scatter_mul: scatter_mul.max(1),
        }
    }

    /// Next rank in `0..items`; rank 0 is the most frequent.
    pub fn next_rank(&self, rng: &mut SmallRng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + self.half_pow_theta {
            return 1.min(self.items - 1);
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.items - 1)
    }

    /// Map a rank onto a key index, a bijection on `0..items`.
    pub fn scatter(&self, rank: u64) -> u64 {
        ((rank as u128 * self.scatter_mul as u128) % self.items as u128) as u64
    }
}

/// The kind of one load operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A read.
    Get,
    /// A write (dkvs PUT, Redis SET, followed by WAIT when `--resp-wait` is set).
    Set,
    /// A write of `--txn-keys` keys at once: a dkvs TXN of PUTs, Redis MULTI, SETs, EXEC.
    Txn,
}

impl OpKind {
    /// Whether the operation writes (goes to the master, may be redirected).
    pub fn is_write(self) -> bool {
        matches!(self, OpKind::Set | OpKind::Txn)
    }
}

/// Generates operations: kind and key index.
#[derive(Debug, Clone)]
pub struct Workload {
    rng: SmallRng,
    keyspace: u64,
    get_ratio: f64,
    distribution: KeyDistribution,
}

impl Workload {
    /// A workload over keys `0..keyspace`; `seed` makes it reproducible.
    pub fn new(seed: u64, keyspace: u64, get_ratio: f64, distribution: KeyDistribution) -> Self {
        debug_assert!(keyspace >= 1);
        Workload {
            rng: SmallRng::seed_from_u64(seed),
            keyspace,
            get_ratio,
            distribution,
        }
    }

    /// The next operation and the index of the key it touches.
    pub fn next_op(&mut self) -> (OpKind, u64) {
        let kind = if self.get_ratio >= 1.0 || self.rng.random::<f64>() < self.get_ratio {
            OpKind::Get
        } else {
            OpKind::Set
        };
        (kind, self.next_key())
    }

    fn next_key(&mut self) -> u64 {
        match &self.distribution {
            KeyDistribution::Uniform => self.rng.random_range(0..self.keyspace),
            KeyDistribution::Zipf(zipf) => zipf.scatter(zipf.next_rank(&mut self.rng)),
        }
    }
}

/// Decimal digits needed to print `n`.
pub fn decimal_digits(mut n: u64) -> usize {
    let mut digits = 1;
    while n >= 10 {
        n /= 10;
        digits += 1;
    }
    digits
}

const KEY_PREFIX: &[u8] = b"key:";

/// Fixed-size key bytes, rewritten in place for each operation (no allocation per request).
///
/// Keys look like redis-benchmark's (`key:000000012345` at 16 bytes) so both servers see the
/// same data; the prefix is dropped when the size leaves no room for it.
#[derive(Debug, Clone)]
pub struct KeyBuf {
    bytes: Vec<u8>,
}

impl KeyBuf {
    /// A key buffer of `key_size` bytes; the caller checked it holds the largest index.
    pub fn new(key_size: usize, keyspace: u64) -> KeyBuf {
        debug_assert!(key_size >= decimal_digits(keyspace.saturating_sub(1)));
        let mut bytes = vec![b'0'; key_size];
        if key_size >= KEY_PREFIX.len() + decimal_digits(keyspace.saturating_sub(1)) {
            bytes[..KEY_PREFIX.len()].copy_from_slice(KEY_PREFIX);
        }
        KeyBuf { bytes }
    }

    /// The key for `index`, valid until the next call.
    pub fn key(&mut self, mut index: u64) -> &[u8] {
        let len = self.bytes.len();
        let mut pos = len;
        loop {
            pos -= 1;
            self.bytes[pos] = b'0' + (index % 10) as u8;
            index /= 10;
            if index == 0 {
                break;
            }
        }
        // Digits left of the number may hold a longer previous index: zero them up to the prefix.
        let prefix_end = if self.bytes.starts_with(KEY_PREFIX) {
            KEY_PREFIX.len()
        } else {
            0
        };
        for byte in &mut self.bytes[prefix_end..pos] {
            *byte = b'0';
        }
        &self.bytes
    }
}

/// The value written by every write: `size` printable bytes.
pub fn make_value(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_stays_in_range() {
        let mut rng = SmallRng::seed_from_u64(7);
        for items in [1u64, 2, 3, 10, 1000] {
            let zipf = Zipf::new(items, 0.99);
            for _ in 0..20_000 {
                let rank = zipf.next_rank(&mut rng);
                assert!(rank < items, "rank {rank} out of 0..{items}");
                assert!(zipf.scatter(rank) < items);
            }
        }
    }

    #[test]
    fn zipf_is_skewed_towards_low_ranks() {
        let items = 1000u64;
        let zipf = Zipf::new(items, 0.99);
        let mut rng = SmallRng::seed_from_u64(42);
        let mut counts = vec![0u64; items as usize];
        let draws = 200_000u64;
        for _ in 0..draws {
            counts[zipf.next_rank(&mut rng) as usize] += 1;
        }
        // Expected share of rank 0 is 1/zeta(1000, 0.99), about 13%; uniform would be 0.1%.
        let top = counts[0] as f64 / draws as f64;
        assert!(top > 0.10 && top < 0.17, "rank 0 share {top}");
        let top10: u64 = counts[..10].iter().sum();
        assert!(top10 as f64 / draws as f64 > 0.35, "top-10 share too low");
        assert!(counts[0] > counts[1] && counts[1] > counts[9]);
        // The tail is still reached.
        assert!(counts[500..].iter().sum::<u64>() > 0);
    }

    #[test]
    fn zipf_scatter_is_a_bijection() {
        for items in [1u64, 7, 100, 1024, 4999] {
            let zipf = Zipf::new(items, 0.99);
            let mut seen = vec![false; items as usize];
            for rank in 0..items {
                let key = zipf.scatter(rank) as usize;
                assert!(!seen[key], "two ranks map to key {key}");
                seen[key] = true;
            }
        }
    }

    #[test]
    fn uniform_covers_keyspace_and_respects_ratio() {
        let mut w = Workload::new(1, 100, 0.75, KeyDistribution::Uniform);
        let mut gets = 0;
        let mut seen = [false; 100];
        for _ in 0..20_000 {
            let (kind, key) = w.next_op();
            assert!(key < 100);
            seen[key as usize] = true;
            if kind == OpKind::Get {
                gets += 1;
            }
        }
        assert!(seen.iter().all(|s| *s));
        assert!((14_000..16_000).contains(&gets), "gets {gets}");
    }

    #[test]
    fn keys_have_fixed_size_and_prefix() {
        let mut k = KeyBuf::new(16, 1_000_000);
        assert_eq!(k.key(123_456), b"key:000000123456");
        assert_eq!(k.key(7), b"key:000000000007");
        let mut short = KeyBuf::new(3, 1000);
        assert_eq!(short.key(999), b"999");
        assert_eq!(short.key(5), b"005");
    }

    #[test]
    fn digits() {
        assert_eq!(decimal_digits(0), 1);
        assert_eq!(decimal_digits(9), 1);
        assert_eq!(decimal_digits(10), 2);
        assert_eq!(decimal_digits(u64::MAX), 20);
    }
}
