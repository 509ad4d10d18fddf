//! Log records on disk: each framed with its length, a CRC32C and its type.
//!
//! ```text
//! length u32 BE   bytes of type + payload (1 ..= MAX_RECORD_BYTES)
//! crc32c u32 BE   CRC32C (Castagnoli) of type + payload
//! type   u8       1 commit decision, 2 abort decision, 3 prepared, 4 committed,
//!                 5 committed txn, 6 checkpoint, 7 history, 8 segment end
//! payload         seq u64 BE, then the writes (the peer protocol's encoding) or a history id
//! ```
//!
//! A segment end (the segment's id in the seq field) is not a replication
//! record: [`decode_segment_end`] reads it, [`decode_record`] refuses it.

use std::fmt;

use byteorder::{BigEndian, ByteOrder};

use crate::protocol::peer::{decode_ops_exact, encode_ops};
use crate::replication::Record;

/// Length and CRC before every record's type byte.
pub const RECORD_HEADER_BYTES: usize = 8;
/// Largest type + payload accepted: a full batch of writes with room to spare.
/// A corrupt length beyond it is refused before anything is allocated.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

const COMMIT_DECISION: u8 = 1;
const ABORT_DECISION: u8 = 2;
const PREPARED: u8 = 3;
const COMMITTED: u8 = 4;
const COMMITTED_TXN: u8 = 5;
const CHECKPOINT: u8 = 6;
const HISTORY: u8 = 7;
const SEGMENT_END: u8 = 8;

/// Bytes of a segment-end marker: header, type and the segment id.
pub const SEGMENT_END_BYTES: usize = RECORD_HEADER_BYTES + 1 + 8;

/// Why bytes in a log are not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the header or the declared length: a write cut short.
    Truncated {
        /// Bytes the record needs.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The declared length is 0 or beyond [`MAX_RECORD_BYTES`].
    BadLength(u32),
    /// The CRC does not match the bytes.
    BadChecksum {
        /// CRC stored in the record.
        stored: u32,
        /// CRC of the bytes present.
        computed: u32,
    },
    /// The type byte names no record.
    UnknownType(u8),
    /// The payload does not decode as its type says.
    BadPayload(String),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Truncated { needed, available } => {
                write!(
                    f,
                    "record cut short: needs {needed} bytes, {available} present"
                )
            }
            RecordError::BadLength(len) => write!(f, "impossible record length {len}"),
            RecordError::BadChecksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            RecordError::UnknownType(t) => write!(f, "unknown record type {t}"),
            RecordError::BadPayload(why) => write!(f, "malformed record payload: {why}"),
        }
    }
}

impl std::error::Error for RecordError {}

/// Append `record` to `out`, framed.
pub fn encode_record(out: &mut Vec<u8>, record: &Record) {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    let (kind, seq) = match record {
        Record::CommitDecision { seq, .. } => (COMMIT_DECISION, *seq),
        Record::AbortDecision { seq } => (ABORT_DECISION, *seq),
        Record::Prepared { seq, .. } => (PREPARED, *seq),
        Record::Committed { seq } => (COMMITTED, *seq),
        Record::CommittedTxn { seq, .. } => (COMMITTED_TXN, *seq),
        Record::Checkpoint { seq, .. } => (CHECKPOINT, *seq),
        Record::History { history_id } => (HISTORY, *history_id),
    };
    out.push(kind);
    out.extend_from_slice(&seq.to_be_bytes());
    match record {
        Record::CommitDecision { ops, .. }
        | Record::Prepared { ops, .. }
        | Record::CommittedTxn { ops, .. } => encode_ops(out, ops),
        Record::Checkpoint { history_id, .. } => out.extend_from_slice(&history_id.to_be_bytes()),
        Record::AbortDecision { .. } | Record::Committed { .. } | Record::History { .. } => {}
    }
    let body = &out[start + RECORD_HEADER_BYTES..];
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    BigEndian::write_u32(&mut out[start..start + 4], len);
    BigEndian::write_u32(&mut out[start + 4..start + 8], crc);
}

/// Append the marker that closes segment `id`: what follows it is unused space.
pub fn encode_segment_end(out: &mut Vec<u8>, id: u64) {
    let mut body = [0u8; 9];
    body[0] = SEGMENT_END;
    body[1..].copy_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    out.extend_from_slice(&body);
}

/// The segment id of a valid segment-end marker at the start of `bytes`, if one is there.
pub fn decode_segment_end(bytes: &[u8]) -> Option<u64> {
    let frame = bytes.get(..SEGMENT_END_BYTES)?;
    let body = &frame[RECORD_HEADER_BYTES..];
    let well_formed = BigEndian::read_u32(&frame[0..4]) == 9
        && body[0] == SEGMENT_END
        && BigEndian::read_u32(&frame[4..8]) == crc32c::crc32c(body);
    well_formed.then(|| BigEndian::read_u64(&body[1..]))
}

/// Decode the record at the start of `bytes`: the record and the bytes it took.
pub fn decode_record(bytes: &[u8]) -> Result<(Record, usize), RecordError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(RecordError::Truncated {
            needed: RECORD_HEADER_BYTES,
            available: bytes.len(),
        });
    }
    let len = BigEndian::read_u32(&bytes[0..4]);
    if len == 0 || len as usize > MAX_RECORD_BYTES {
        return Err(RecordError::BadLength(len));
    }
    let end = RECORD_HEADER_BYTES + len as usize;
    if bytes.len() < end {
        return Err(RecordError::Truncated {
            needed: end,
            available: bytes.len(),
        });
    }
    let stored = BigEndian::read_u32(&bytes[4..8]);
    let body = &bytes[RECORD_HEADER_BYTES..end];
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(RecordError::BadChecksum { stored, computed });
    }
    let kind = body[0];
    let rest = &body[1..];
    if rest.len() < 8 {
        return Err(RecordError::BadPayload(format!(
            "type {kind} needs 8 bytes of sequence, has {}",
            rest.len()
        )));
    }
    let seq = BigEndian::read_u64(&rest[0..8]);
    let payload = &rest[8..];
    let ops = || decode_ops_exact(payload).map_err(|e| RecordError::BadPayload(e.to_string()));
    let empty = |record: Record| {
        if payload.is_empty() {
            Ok(record)
        } else {
            Err(RecordError::BadPayload(format!(
                "{} trailing bytes",
                payload.len()
            )))
        }
    };
    let record = match kind {
        COMMIT_DECISION => Record::CommitDecision { seq, ops: ops()? },
        ABORT_DECISION => empty(Record::AbortDecision { seq })?,
        PREPARED => Record::Prepared { seq, ops: ops()? },
        COMMITTED => empty(Record::Committed { seq })?,
        COMMITTED_TXN => Record::CommittedTxn { seq, ops: ops()? },
        CHECKPOINT => {
            if payload.len() != 8 {
                return Err(RecordError::BadPayload(format!(
                    "checkpoint needs an 8-byte history id, has {} bytes",
                    payload.len()
                )));
            }
            Record::Checkpoint {
                seq,
                history_id: BigEndian::read_u64(payload),
            }
        }
        HISTORY => empty(Record::History { history_id: seq })?,
        other => return Err(RecordError::UnknownType(other)),
    };
    Ok((record, end))
}

/// The commit sequence number a record is about (0 for a history record).
pub fn record_seq(record: &Record) -> u64 {
    match record {
        Record::CommitDecision { seq, .. }
        | Record::AbortDecision { seq }
        | Record::Prepared { seq, .. }
        | Record::Committed { seq }
        | Record::CommittedTxn { seq, .. }
        | Record::Checkpoint { seq, .. } => *seq,
        Record::History { .. } => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::{OpKind, Ops, WriteOp};

    fn ops() -> Ops {
        vec![
            WriteOp::new(OpKind::Put, b"k1", b"value"),
            WriteOp::new(OpKind::Delete, vec![0xFF; 300], b""),
            // FLUSHDB: the one op with an empty key.
            WriteOp::new(OpKind::Clear, b"", b""),
            // Expiry: a PUT with a deadline, an EXPIRE and a PERSIST.
            WriteOp::put_expiring(b"t", b"v", 1_700_000_000_000),
            WriteOp::expire(b"t", Some(1_800_000_000_000)),
            WriteOp::expire(b"t", None),
        ]
        .into()
    }

    /// One record of every type.
    pub fn all_records() -> Vec<Record> {
        vec![
            Record::CommitDecision { seq: 7, ops: ops() },
            Record::AbortDecision { seq: 8 },
            Record::Prepared { seq: 9, ops: ops() },
            Record::Committed { seq: 9 },
            Record::CommittedTxn {
                seq: u64::MAX,
                ops: ops(),
            },
            Record::Checkpoint {
                seq: 3,
                history_id: 0xABCD,
            },
            Record::History { history_id: 42 },
        ]
    }

    #[test]
    fn every_record_round_trips() {
        let mut log = Vec::new();
        for r in all_records() {
            encode_record(&mut log, &r);
        }
        let mut at = 0;
        for r in all_records() {
            let (decoded, used) = decode_record(&log[at..]).expect("decodes");
            assert_eq!(decoded, r);
            at += used;
        }
        assert_eq!(at, log.len());
    }

    #[test]
    fn a_record_cut_at_every_offset_is_truncated() {
        for r in all_records() {
            let mut bytes = Vec::new();
            encode_record(&mut bytes, &r);
            for cut in 0..bytes.len() {
                match decode_record(&bytes[..cut]) {
                    Err(RecordError::Truncated { .. }) => {}
                    other => panic!("{r:?} cut at {cut}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let mut bytes = Vec::new();
        encode_record(&mut bytes, &Record::CommitDecision { seq: 7, ops: ops() });
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[byte] ^= 1 << bit;
                if let Ok((r, _)) = decode_record(&bad) {
                    panic!("flip {byte}.{bit} decoded as {r:?}");
                }
            }
        }
    }

    #[test]
    fn impossible_lengths_are_refused_before_allocation() {
        let mut bytes = vec![0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 1];
        assert_eq!(decode_record(&bytes), Err(RecordError::BadLength(u32::MAX)));
        bytes[..4].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(decode_record(&bytes), Err(RecordError::BadLength(0)));
    }

    #[test]
    fn a_segment_end_round_trips_and_is_no_replication_record() {
        let mut bytes = Vec::new();
        encode_segment_end(&mut bytes, 0x2a);
        assert_eq!(bytes.len(), SEGMENT_END_BYTES);
        assert_eq!(decode_segment_end(&bytes), Some(0x2a));
        assert_eq!(decode_record(&bytes), Err(RecordError::UnknownType(8)));
        for cut in 0..bytes.len() {
            assert_eq!(decode_segment_end(&bytes[..cut]), None, "cut at {cut}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_segment_end(&flipped), None, "bit {bit}");
        }
        let mut record = Vec::new();
        encode_record(&mut record, &Record::AbortDecision { seq: 0x2a });
        assert_eq!(
            decode_segment_end(&record),
            None,
            "a record of another type"
        );
    }

    #[test]
    fn unknown_type_and_bad_payload_are_errors() {
        let body = [99u8, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        bytes.extend_from_slice(&body);
        assert_eq!(decode_record(&bytes), Err(RecordError::UnknownType(99)));
        let body = [ABORT_DECISION, 0, 0, 0, 0, 0, 0, 0, 1, 0xAA];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        bytes.extend_from_slice(&body);
        assert!(matches!(
            decode_record(&bytes),
            Err(RecordError::BadPayload(_))
        ));
    }
}
