//! Fuzz the write-ahead log's record decoder (`decode_record`) and the segment
//! scan (`segment::scan`) that classifies a bad record as a torn tail or as
//! corruption.
//!
//! A CRC stands in front of every payload, and a fuzzer cannot guess CRCs, so
//! the input is read as pieces: each is either raw bytes or a body framed with
//! its correct length and CRC. That reaches the payload decoder and lets the
//! fuzzer build segments of many valid records with damage between them.
//!
//! Properties: no panic; a record's length lies within the input; a truncated
//! answer names more bytes than there are; a record re-encodes (through
//! `encode_record`) to exactly its bytes; every prefix of a record is
//! truncated. The scan's records are consecutive from the header on, a clean
//! segment is used to its last byte, a bad tail starts where the valid records
//! end, a zero tail is zeros to the end and a torn one is not, and cutting a
//! segment at either (the repair, or the cut of the preallocated space) leaves
//! a clean segment with the same records.

#![no_main]

use dkvs::wal::record::{RECORD_HEADER_BYTES, RecordError, decode_record, encode_record};
use dkvs::wal::segment::{SEGMENT_HEADER_BYTES, Tail, scan, segment_header};
use libfuzzer_sys::fuzz_target;

const SEGMENT_ID: u64 = 3;

/// Build a byte string from the fuzz input: pieces of `tag u8, len u8, bytes`.
fn assemble(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    while let [tag, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (body, after) = tail.split_at(n);
        if tag & 1 == 1 && !body.is_empty() {
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(&crc32c::crc32c(body).to_be_bytes());
        }
        out.extend_from_slice(body);
        rest = after;
    }
    out.extend_from_slice(rest);
    out
}

fn check_record(bytes: &[u8]) {
    match decode_record(bytes) {
        Ok((record, used)) => {
            assert!(used > RECORD_HEADER_BYTES && used <= bytes.len());
            let mut again = Vec::new();
            encode_record(&mut again, &record);
            assert_eq!(again, &bytes[..used], "{record:?}");
            for cut in [0, RECORD_HEADER_BYTES - 1, RECORD_HEADER_BYTES, used - 1] {
                assert!(
                    matches!(
                        decode_record(&bytes[..cut]),
                        Err(RecordError::Truncated { .. })
                    ),
                    "cut at {cut}"
                );
            }
        }
        Err(RecordError::Truncated { needed, available }) => {
            assert_eq!(available, bytes.len());
            assert!(needed > available);
        }
        Err(_) => {}
    }
}

fn check_segment(body: &[u8]) {
    let mut bytes = segment_header(SEGMENT_ID).to_vec();
    bytes.extend_from_slice(body);
    let s = scan(&bytes, SEGMENT_ID);
    let mut at = SEGMENT_HEADER_BYTES;
    for (record, end) in &s.records {
        let (again, used) = decode_record(&bytes[at..]).expect("scanned record decodes");
        assert_eq!(&again, record);
        assert_eq!(at + used, *end);
        at = *end;
    }
    match &s.tail {
        Tail::Clean => assert_eq!(at, bytes.len()),
        Tail::Zeros { offset } => {
            assert_eq!(*offset, at);
            assert!(at < bytes.len());
            assert!(bytes[at..].iter().all(|&b| b == 0));
            let repaired = scan(&bytes[..*offset], SEGMENT_ID);
            assert_eq!(repaired.tail, Tail::Clean);
            assert_eq!(repaired.records, s.records);
        }
        Tail::Torn { offset, .. } => {
            assert_eq!(*offset, at);
            assert!(at < bytes.len());
            // Never only zeros: those are the preallocated end (`Tail::Zeros`).
            assert!(bytes[at..].iter().any(|&b| b != 0));
            // The repair cuts the file at the torn tail: what is left is clean.
            let repaired = scan(&bytes[..*offset], SEGMENT_ID);
            assert_eq!(repaired.tail, Tail::Clean);
            assert_eq!(repaired.records, s.records);
        }
        Tail::Corrupt { offset, .. } => {
            assert_eq!(*offset, at);
            assert!(at < bytes.len());
        }
    }
    // A segment too short for its header is torn at 0, whatever its bytes.
    let cut = body.len().min(SEGMENT_HEADER_BYTES - 1);
    let short = scan(&bytes[..cut], SEGMENT_ID);
    assert!(short.records.is_empty() && matches!(short.tail, Tail::Torn { offset: 0, .. }));
}

fuzz_target!(|data: &[u8]| {
    check_record(data);
    let assembled = assemble(data);
    check_record(&assembled);
    check_segment(&assembled);
});
