//! The map at a realistic size: GET and PUT against one million keys, and
//! filling a store with them, for each candidate hash of client keys (the
//! store's `KeyHasher`, chosen from these figures; docs/SECURITY.md).
//!
//! `cargo bench --bench store` runs them all; `cargo bench --bench store -- sip`
//! one hasher.

use std::hash::BuildHasher;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use dkvs::store::{Store, Write};

const KEYS: u64 = 1_000_000;

fn key(i: u64) -> [u8; 16] {
    let mut k = *b"key:000000000000";
    let digits = format!("{i:012}");
    k[4..].copy_from_slice(digits.as_bytes());
    k
}

/// A store of `KEYS` keys hashed by `S`.
fn filled<S: BuildHasher + Default>(keys: &[[u8; 16]], value: &[u8]) -> Store<S> {
    let mut store = Store::<S>::default();
    for (i, k) in keys.iter().enumerate() {
        store.set(k, value, i as u64 + 1);
    }
    store
}

fn bench_hasher<S: BuildHasher + Default>(c: &mut Criterion, name: &str) {
    let value = [b'v'; 100];
    let keys: Vec<[u8; 16]> = (0..KEYS).map(key).collect();
    // A fixed pseudo-random walk over all the keys, so lookups miss the CPU
    // caches as they do in real use.
    const WALK: usize = 1 << 20;
    let order: Vec<[u8; 16]> = (0..WALK as u64)
        .map(|i| key(i.wrapping_mul(2_654_435_761) % KEYS))
        .collect();

    let mut group = c.benchmark_group(format!("store_1m_keys/{name}"));
    group.throughput(Throughput::Elements(1));
    let hasher = S::default();
    group.bench_function("hash_16b_key", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & (WALK - 1);
            black_box(hasher.hash_one(&order[i][..]))
        })
    });
    let mut store = filled::<S>(&keys, &value);
    let mut i = 0usize;
    group.bench_function("get_hit", |b| {
        b.iter(|| {
            i = (i + 1) & (WALK - 1);
            black_box(store.get(&order[i]).map(|(v, _)| v.len()))
        })
    });
    group.bench_function("get_miss", |b| {
        b.iter(|| black_box(store.get(b"key:absent-absent").is_none()))
    });
    let mut version = KEYS;
    group.bench_function("put_overwrite", |b| {
        b.iter(|| {
            i = (i + 1) & (WALK - 1);
            version += 1;
            let write = Write::Put {
                key: &order[i],
                value: &value,
            };
            black_box(store.apply(write, version))
        })
    });
    // A new key into the store at 1M keys, removed again so the size stays.
    let fresh: Vec<[u8; 16]> = (0..WALK as u64).map(|i| key(KEYS + i)).collect();
    group.bench_function("insert_then_delete_new_key", |b| {
        b.iter(|| {
            i = (i + 1) & (WALK - 1);
            version += 1;
            let k = &fresh[i];
            let put = Write::Put {
                key: k,
                value: &value,
            };
            black_box(store.apply(put, version));
            black_box(store.apply(Write::Delete { key: k }, version + 1))
        })
    });
    drop(store);
    group.finish();

    // Every key into an empty store (the tables grow as they fill, as when a
    // slave loads a snapshot): one fill per iteration, 1M elements.
    let mut group = c.benchmark_group(format!("store_fill_1m/{name}"));
    group.throughput(Throughput::Elements(KEYS));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.bench_function("insert_1m_fresh", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let store = filled::<S>(&keys, &value);
                total += start.elapsed();
                // Freeing 1M blocks is not an insert's cost.
                drop(black_box(store));
            }
            total
        })
    });
    group.finish();
}

fn store(c: &mut Criterion) {
    // The store's own choice first, then the candidates it was chosen from.
    bench_hasher::<dkvs::store::KeyHasher>(c, "store_default");
    bench_hasher::<std::hash::RandomState>(c, "siphash13");
    bench_hasher::<foldhash::fast::RandomState>(c, "foldhash");
    bench_hasher::<ahash::RandomState>(c, "ahash");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = store
}
criterion_main!(benches);
