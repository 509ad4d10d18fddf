//! Fuzz the snapshot file decoder (`wal::snapshot::load_from`, what `load`
//! runs on a file).
//!
//! Header, blocks and end marker each carry a CRC a fuzzer cannot guess, so
//! the input is read as a recipe: an optional valid header, then pieces that
//! are raw bytes, a block framed with its correct length and CRC, or an end
//! marker with its correct CRC. The entries inside blocks are the fuzzer's own.
//!
//! Properties: no panic; bounded allocation (run with `-malloc_limit_mb`: a
//! block length is checked against the bytes present before it is allocated);
//! a loaded snapshot holds at most the entries its end marker counts; it
//! re-encodes (header, one block, end marker) to a file that loads to the same
//! header and store; every proper prefix of a loadable file is refused.

#![no_main]

use dkvs::store::Store;
use dkvs::store::snapshot::encode_entry;
use dkvs::wal::snapshot::{SnapshotError, SnapshotHeader, load_from, write_block, write_end};
use libfuzzer_sys::fuzz_target;

fn assemble(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    if let [flags, tail @ ..] = rest {
        rest = tail;
        if flags & 1 == 1 && rest.len() >= 24 {
            let (h, tail) = rest.split_at(24);
            let u64_at = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().unwrap());
            let header = SnapshotHeader {
                seq: u64_at(0),
                history_id: u64_at(8),
                first_segment: u64_at(16),
            };
            out.extend_from_slice(&header.encode());
            rest = tail;
        }
    }
    while let [tag, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        match tag % 4 {
            // A block of whatever entries the fuzzer wrote.
            1 if n > 0 => {
                let (body, after) = tail.split_at(n);
                write_block(&mut out, body).unwrap();
                rest = after;
            }
            // An end marker counting `len` entries.
            2 => {
                write_end(&mut out, *len as u64).unwrap();
                rest = tail;
            }
            _ => {
                let (body, after) = tail.split_at(n);
                out.extend_from_slice(body);
                rest = after;
            }
        }
    }
    out.extend_from_slice(rest);
    out
}

/// The store's entries, sorted, to compare stores.
fn contents(store: &Store) -> Vec<(Vec<u8>, Vec<u8>, u64, u64)> {
    let mut all: Vec<_> = store
        .iter()
        .map(|b| {
            let deadline = b.deadline().unwrap_or(0);
            (b.key().to_vec(), b.value().to_vec(), b.version(), deadline)
        })
        .collect();
    all.sort();
    all
}

fn check(bytes: &[u8]) {
    let Ok((header, store)) = load_from(bytes) else {
        return;
    };
    // The end marker is the last 16 bytes and counts every entry of the blocks;
    // a key written twice is counted twice but held once.
    let declared = u64::from_be_bytes(bytes[bytes.len() - 8..].try_into().unwrap());
    assert!(store.len() as u64 <= declared);

    let mut again = header.encode().to_vec();
    let mut block = Vec::new();
    for (key, value, version, deadline) in contents(&store) {
        encode_entry(&mut block, &key, &value, version, deadline);
    }
    if !block.is_empty() {
        write_block(&mut again, &block).unwrap();
    }
    write_end(&mut again, store.len() as u64).unwrap();
    let (h2, s2) = load_from(&again[..]).expect("re-encoded snapshot loads");
    assert_eq!(h2, header);
    assert_eq!(contents(&s2), contents(&store));

    let cut = bytes[bytes.len() / 2] as usize % bytes.len();
    for cut in [cut, bytes.len() - 1] {
        match load_from(&bytes[..cut]) {
            Err(SnapshotError::Invalid { .. }) => {}
            other => panic!("prefix of {cut} bytes: {:?}", other.map(|(h, _)| h)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&assemble(data));
});
