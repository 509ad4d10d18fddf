//! The map at a realistic size: GET and PUT against one million keys, and
//! filling a store with them, for each candidate hash of client keys (the
//! store's `KeyHasher`, chosen from these figures; docs/SECURITY.md).
//!
//! `cargo bench --bench store` runs them all; `cargo bench --bench store -- /siphash13/`
//! one hasher. `store_default` is the store's SipHash-1-3 hashing a key in one
//! call; `siphash13` is the same function through std's streaming `Hasher`.
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not
//! wall time: on a shared 2-core machine the wall time mostly measures who
//! else was running. Cache misses caused by others still count.

use std::hash::BuildHasher;
use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use dkvs::store::{KeyHash, Store, Write};

const KEYS: u64 = 1_000_000;

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Criterion's measurement of the benchmark thread's CPU time.
struct ThreadCpuTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Nanoseconds, as wall time's are.
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

fn key(i: u64) -> [u8; 16] {
    let mut k = *b"key:000000000000";
    let digits = format!("{i:012}");
    k[4..].copy_from_slice(digits.as_bytes());
    k
}

/// A candidate hash through std's `BuildHasher` (std's own SipHash-1-3,
/// foldhash, ahash), to compare with the store's one-shot `KeyHasher`.
#[derive(Default)]
struct Streaming<S>(S);

impl<S: BuildHasher> KeyHash for Streaming<S> {
    fn hash_key(&self, key: &[u8]) -> u64 {
        self.0.hash_one(key)
    }
}

/// A store of `KEYS` keys hashed by `S`.
fn filled<S: KeyHash + Default>(keys: &[[u8; 16]], value: &[u8]) -> Store<S> {
    let mut store = Store::<S>::default();
    for (i, k) in keys.iter().enumerate() {
        store.set(k, value, i as u64 + 1);
    }
    store
}

fn bench_hasher<S: KeyHash + Default>(c: &mut Criterion<ThreadCpuTime>, name: &str) {
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
            black_box(hasher.hash_key(&order[i][..]))
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
                let start = thread_cpu();
                let store = filled::<S>(&keys, &value);
                total += thread_cpu() - start;
                // Freeing 1M blocks is not an insert's cost.
                drop(black_box(store));
            }
            total
        })
    });
    group.finish();
}

fn store(c: &mut Criterion<ThreadCpuTime>) {
    // The store's own choice first, then the candidates it was chosen from.
    bench_hasher::<dkvs::store::KeyHasher>(c, "store_default");
    bench_hasher::<Streaming<std::hash::RandomState>>(c, "siphash13");
    bench_hasher::<Streaming<foldhash::fast::RandomState>>(c, "foldhash");
    bench_hasher::<Streaming<ahash::RandomState>>(c, "ahash");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(ThreadCpuTime)
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = store
}
criterion_main!(benches);
