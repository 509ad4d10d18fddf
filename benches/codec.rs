//! Encoding and decoding frames: the per-request cost of the protocol.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dkvs::protocol::{
    DEFAULT_MAX_VALUE_BYTES, Decoded, Opcode, Request, Status, decode, encode_request,
    encode_response,
};

fn codec(c: &mut Criterion) {
    let key = b"key:000000012345";
    let value = [b'v'; 100];
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));

    let mut out = Vec::with_capacity(256);
    group.bench_function("encode_put_request_16b_key_100b_value", |b| {
        b.iter(|| {
            out.clear();
            encode_request(&mut out, Opcode::Put, black_box(7), key, &value);
            black_box(out.len())
        })
    });
    group.bench_function("encode_get_response_100b_value", |b| {
        b.iter(|| {
            out.clear();
            encode_response(&mut out, Opcode::Get as u8, Status::Ok, 7, 42, &value);
            black_box(out.len())
        })
    });

    let mut frame = Vec::new();
    encode_request(&mut frame, Opcode::Put, 7, key, &value);
    group.bench_function("decode_and_validate_put_request", |b| {
        b.iter(
            || match decode(black_box(&frame), DEFAULT_MAX_VALUE_BYTES) {
                Ok(Decoded::Frame(f, used)) => {
                    black_box(Request::from_frame(&f).is_ok());
                    used
                }
                _ => unreachable!("a whole frame"),
            },
        )
    });

    // A pipelined batch of 16 GETs, as the server sees one read of a pipelining client.
    let mut batch = Vec::new();
    for i in 0..16 {
        encode_request(&mut batch, Opcode::Get, i, key, &[]);
    }
    group.throughput(Throughput::Elements(16));
    group.bench_function("decode_batch_of_16_gets", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut n = 0;
            while let Ok(Decoded::Frame(f, used)) = decode(&batch[at..], DEFAULT_MAX_VALUE_BYTES) {
                black_box(Request::from_frame(&f).is_ok());
                at += used;
                n += 1;
            }
            n
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
