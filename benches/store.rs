//! The map at a realistic size: GET and PUT against one million keys.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dkvs::store::{Store, Write};

const KEYS: u64 = 1_000_000;

fn key(i: u64) -> [u8; 16] {
    let mut k = *b"key:000000000000";
    let digits = format!("{i:012}");
    k[4..].copy_from_slice(digits.as_bytes());
    k
}

fn store(c: &mut Criterion) {
    let value = [b'v'; 100];
    let mut store = Store::new();
    for i in 0..KEYS {
        store.set(&key(i), &value, i + 1);
    }
    // A fixed pseudo-random walk over all the keys, so lookups miss the CPU
    // caches as they do in real use.
    const WALK: usize = 1 << 20;
    let order: Vec<[u8; 16]> = (0..WALK as u64)
        .map(|i| key(i.wrapping_mul(2_654_435_761) % KEYS))
        .collect();

    let mut group = c.benchmark_group("store_1m_keys");
    group.throughput(Throughput::Elements(1));
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
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = store
}
criterion_main!(benches);
