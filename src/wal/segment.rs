//! Segment files: a header, then records, appended until the next rotation.
//!
//! ```text
//! magic "DKVSWAL1" (8 bytes) | segment id u64 BE | records...
//! ```
//!
//! Scanning tells a torn tail (a write the crash cut short, which was never
//! reported durable) from corruption in the middle of the log (a record that
//! was complete and has been damaged since): only the first is repaired on
//! its own.

use super::record::{RECORD_HEADER_BYTES, RecordError, decode_record};
use crate::replication::Record;

/// The first bytes of every segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"DKVSWAL1";
/// Magic and segment id.
pub const SEGMENT_HEADER_BYTES: usize = 16;

/// The file name of segment `id`.
pub fn segment_name(id: u64) -> String {
    format!("wal-{id:016x}.log")
}

/// The segment id named by a file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The header of segment `id`.
pub fn segment_header(id: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..].copy_from_slice(&id.to_be_bytes());
    h
}

/// How a segment ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Every byte is part of a valid record.
    Clean,
    /// The bytes from `offset` on are a write cut short by a crash: truncate them.
    Torn {
        /// Where the valid records end.
        offset: usize,
        /// What was wrong with the first bad record.
        why: String,
    },
    /// A damaged record at `offset` with valid data after it: stop and ask the operator.
    Corrupt {
        /// Where the damaged record starts.
        offset: usize,
        /// What was wrong with it.
        why: String,
    },
}

/// What scanning a segment found.
#[derive(Debug)]
pub struct Scanned {
    /// The valid records, in order, each with the offset it ends at.
    pub records: Vec<(Record, usize)>,
    /// How the segment ends.
    pub tail: Tail,
}

/// Scan the bytes of segment `id`.
pub fn scan(bytes: &[u8], id: u64) -> Scanned {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        // Created and cut before its header was durable: nothing was ever in it.
        return Scanned {
            records: Vec::new(),
            tail: Tail::Torn {
                offset: 0,
                why: format!("header cut short at {} bytes", bytes.len()),
            },
        };
    }
    if bytes[..SEGMENT_HEADER_BYTES] != segment_header(id) {
        return Scanned {
            records: Vec::new(),
            tail: Tail::Corrupt {
                offset: 0,
                why: format!("not the header of segment {id:016x}"),
            },
        };
    }
    let mut records = Vec::new();
    let mut at = SEGMENT_HEADER_BYTES;
    while at < bytes.len() {
        match decode_record(&bytes[at..]) {
            Ok((record, used)) => {
                at += used;
                records.push((record, at));
            }
            Err(e) => {
                let tail = classify(&bytes[at..], at, &e);
                return Scanned { records, tail };
            }
        }
    }
    Scanned {
        records,
        tail: Tail::Clean,
    }
}

/// A bad record at `offset` with `rest` from it to the end of the file.
fn classify(rest: &[u8], offset: usize, err: &RecordError) -> Tail {
    let why = err.to_string();
    if matches!(err, RecordError::Truncated { .. }) || rest.iter().all(|&b| b == 0) {
        return Tail::Torn { offset, why };
    }
    // The record is complete but damaged. If a valid record follows where its
    // length says it ends, the log went on after it: that is corruption, not
    // a torn write (a torn write is always the last thing in the file).
    if rest.len() >= RECORD_HEADER_BYTES {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let end = RECORD_HEADER_BYTES.saturating_add(len);
        if end < rest.len() && decode_record(&rest[end..]).is_ok() {
            return Tail::Corrupt { offset, why };
        }
    }
    Tail::Torn { offset, why }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::{OpKind, WriteOp};
    use crate::wal::record::encode_record;

    fn segment(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = segment_header(3).to_vec();
        let mut ends = Vec::new();
        for r in records {
            encode_record(&mut bytes, r);
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    fn records() -> Vec<Record> {
        (1..=4)
            .map(|seq| Record::CommitDecision {
                seq,
                ops: vec![WriteOp::new(OpKind::Put, format!("key{seq}"), [b'v'; 20])].into(),
            })
            .collect()
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(0x2a), "wal-000000000000002a.log");
        assert_eq!(parse_segment_name(&segment_name(0x2a)), Some(0x2a));
        assert_eq!(parse_segment_name("wal-2a.log"), None);
        assert_eq!(parse_segment_name("wal-000000000000002a.log.torn"), None);
    }

    #[test]
    fn a_clean_segment_yields_every_record() {
        let (bytes, _) = segment(&records());
        let s = scan(&bytes, 3);
        assert_eq!(s.tail, Tail::Clean);
        let got: Vec<Record> = s.records.into_iter().map(|(r, _)| r).collect();
        assert_eq!(got, records());
    }

    #[test]
    fn the_last_record_cut_at_every_offset_is_a_torn_tail() {
        let (bytes, ends) = segment(&records());
        let last_start = ends[ends.len() - 2];
        for cut in last_start + 1..bytes.len() {
            let s = scan(&bytes[..cut], 3);
            assert_eq!(s.records.len(), 3, "cut at {cut}");
            assert_eq!(
                s.tail,
                Tail::Torn {
                    offset: last_start,
                    why: s_why(&s.tail)
                },
                "cut at {cut}"
            );
        }
        // Cut exactly at a record boundary: clean.
        assert_eq!(scan(&bytes[..last_start], 3).tail, Tail::Clean);
    }

    fn s_why(tail: &Tail) -> String {
        match tail {
            Tail::Torn { why, .. } | Tail::Corrupt { why, .. } => why.clone(),
            Tail::Clean => String::new(),
        }
    }

    #[test]
    fn a_zeroed_tail_is_torn() {
        let (mut bytes, ends) = segment(&records());
        bytes.extend_from_slice(&[0; 4096]);
        let s = scan(&bytes, 3);
        assert_eq!(s.records.len(), 4);
        assert!(matches!(s.tail, Tail::Torn { offset, .. } if offset == ends[3]));
    }

    #[test]
    fn a_damaged_last_record_is_torn_but_a_damaged_middle_one_is_corrupt() {
        let (bytes, ends) = segment(&records());
        let mut last = bytes.clone();
        let n = last.len();
        last[n - 3] ^= 0x40;
        assert!(matches!(scan(&last, 3).tail, Tail::Torn { offset, .. } if offset == ends[2]));
        let mut middle = bytes.clone();
        middle[ends[0] + 12] ^= 0x40;
        let s = scan(&middle, 3);
        assert_eq!(s.records.len(), 1);
        assert!(
            matches!(&s.tail, Tail::Corrupt { offset, why } if *offset == ends[0] && why.contains("checksum")),
            "{:?}",
            s.tail
        );
    }

    #[test]
    fn a_short_or_foreign_header_is_reported() {
        let (bytes, _) = segment(&records());
        assert!(matches!(
            scan(&bytes[..10], 3).tail,
            Tail::Torn { offset: 0, .. }
        ));
        assert!(matches!(
            scan(&bytes, 4).tail,
            Tail::Corrupt { offset: 0, .. }
        ));
    }
}
