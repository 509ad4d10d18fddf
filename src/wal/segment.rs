//! Segment files: a header, then records, written one after the other until
//! the next rotation, then zeros up to the preallocated size.
//!
//! ```text
//! magic "DKVSWAL1" (8 bytes) | segment id u64 BE | records... | zeros...
//! ```
//!
//! A segment is created [`SEGMENT_BYTES`] long, filled with zeros and synced
//! before it is used, and records overwrite the zeros: an fdatasync after an
//! overwrite does not have to commit a new file size (a journal commit), which
//! an append needs every time. A segment is rotated out before a record would
//! go past its end, and closed by a segment-end marker after its last record
//! when zeros remain. The zeros after the last record are the clean end of the
//! newest segment, or of any segment after its marker; no record starts with
//! them, since every record's length is at least 1.
//!
//! Scanning tells a torn tail (a write the crash cut short, which was never
//! reported durable) from corruption in the middle of the log (a record that
//! was complete and has been damaged since): only the first is repaired on
//! its own.

use super::record::{
    RECORD_HEADER_BYTES, RecordError, SEGMENT_END_BYTES, decode_record, decode_segment_end,
};
use crate::replication::Record;

/// The first bytes of every segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"DKVSWAL1";
/// Magic and segment id.
pub const SEGMENT_HEADER_BYTES: usize = 16;
/// Size a segment is preallocated to. 8 MiB of zeros take tens of
/// milliseconds to write and sync on the helper thread, and at 50 writers
/// (about 5 MB/s of log) a segment lasts a second or two, so a rotation (a
/// rename, a marker and one more fsync) is rare.
pub const SEGMENT_BYTES: u64 = 8 << 20;

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
    /// The segment-end marker ends at `offset` and only zeros follow it: a
    /// segment rotation closed, its unused preallocated space after the marker.
    Closed {
        /// Where the marker ends.
        offset: usize,
    },
    /// Every byte from `offset` on is zero: the unused preallocated space of
    /// the segment being written when the server stopped, or a write the
    /// crash lost before any of its bytes reached the disk. The clean end of
    /// the newest segment; in an older one (which rotation closed with a
    /// marker or cut to its records) a torn tail.
    Zeros {
        /// Where the valid records end.
        offset: usize,
    },
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
        if decode_segment_end(&bytes[at..]) == Some(id) {
            let end = at + SEGMENT_END_BYTES;
            let tail = if bytes[end..].iter().all(|&b| b == 0) {
                Tail::Closed { offset: end }
            } else {
                // Nothing is ever written after a segment's marker.
                Tail::Corrupt {
                    offset: end,
                    why: "bytes after the segment's end marker".into(),
                }
            };
            return Scanned { records, tail };
        }
        match decode_record(&bytes[at..]) {
            Ok((record, used)) => {
                at += used;
                records.push((record, at));
            }
            Err(_) if bytes[at..].iter().all(|&b| b == 0) => {
                // A record's length is never 0, so no record starts in a run
                // of zeros that reaches the end of the file.
                return Scanned {
                    records,
                    tail: Tail::Zeros { offset: at },
                };
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
    if matches!(err, RecordError::Truncated { .. }) {
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
            let expected = if bytes[last_start..cut].iter().all(|&b| b == 0) {
                // Only the zero high bytes of its length made it: nothing to keep.
                Tail::Zeros { offset: last_start }
            } else {
                Tail::Torn {
                    offset: last_start,
                    why: s_why(&s.tail),
                }
            };
            assert_eq!(s.tail, expected, "cut at {cut}");
        }
        // Cut exactly at a record boundary: clean.
        assert_eq!(scan(&bytes[..last_start], 3).tail, Tail::Clean);
    }

    fn s_why(tail: &Tail) -> String {
        match tail {
            Tail::Torn { why, .. } | Tail::Corrupt { why, .. } => why.clone(),
            Tail::Clean | Tail::Closed { .. } | Tail::Zeros { .. } => String::new(),
        }
    }

    #[test]
    fn a_marker_closes_a_segment_and_only_zeros_may_follow_it() {
        let (mut bytes, ends) = segment(&records());
        crate::wal::record::encode_segment_end(&mut bytes, 3);
        let closed_at = bytes.len();
        assert_eq!(closed_at, ends[3] + SEGMENT_END_BYTES);
        assert_eq!(scan(&bytes, 3).tail, Tail::Closed { offset: closed_at });
        bytes.resize(64 << 10, 0);
        let s = scan(&bytes, 3);
        assert_eq!(s.records.len(), 4);
        assert_eq!(s.tail, Tail::Closed { offset: closed_at });
        // Another segment's marker (a copied file) closes nothing.
        let mut foreign = segment(&records()).0;
        crate::wal::record::encode_segment_end(&mut foreign, 4);
        assert!(
            matches!(scan(&foreign, 3).tail, Tail::Torn { offset, .. } if offset == ends[3]),
            "{:?}",
            scan(&foreign, 3).tail
        );
        // Bytes after the marker were never written by the log.
        bytes[closed_at + 100] = 1;
        assert!(matches!(
            scan(&bytes, 3).tail,
            Tail::Corrupt { offset, .. } if offset == closed_at
        ));
        // A marker cut short (its write torn) is a torn tail like any record.
        let (mut torn, _) = segment(&records());
        crate::wal::record::encode_segment_end(&mut torn, 3);
        torn.truncate(closed_at - 5);
        torn.resize(64 << 10, 0);
        assert!(matches!(
            scan(&torn, 3).tail,
            Tail::Torn { offset, .. } if offset == ends[3]
        ));
    }

    #[test]
    fn zeros_after_the_last_record_are_the_preallocated_end() {
        let (mut bytes, ends) = segment(&records());
        bytes.resize(64 << 10, 0);
        let s = scan(&bytes, 3);
        assert_eq!(s.records.len(), 4);
        assert_eq!(s.tail, Tail::Zeros { offset: ends[3] });
        // A segment preallocated and never written to.
        let mut empty = segment_header(3).to_vec();
        empty.resize(64 << 10, 0);
        let s = scan(&empty, 3);
        assert!(s.records.is_empty());
        assert_eq!(
            s.tail,
            Tail::Zeros {
                offset: SEGMENT_HEADER_BYTES
            }
        );
    }

    #[test]
    fn records_that_start_with_zero_bytes_are_not_taken_for_the_zero_tail() {
        // Every record here is shorter than 16 MiB: its length starts with a zero byte.
        let (mut bytes, ends) = segment(&records());
        assert_eq!(bytes[SEGMENT_HEADER_BYTES], 0);
        bytes.resize(bytes.len() + 100, 0);
        let s = scan(&bytes, 3);
        assert_eq!(s.records.len(), 4, "no record swallowed");
        assert_eq!(s.tail, Tail::Zeros { offset: ends[3] });
    }

    #[test]
    fn bytes_after_zeros_make_a_torn_tail_not_a_clean_end() {
        let (mut bytes, ends) = segment(&records());
        bytes.resize(bytes.len() + 4096, 0);
        bytes.extend_from_slice(&[0, 0, 0, 40, 0xAB, 0xCD]);
        bytes.resize(bytes.len() + 4096, 0);
        let s = scan(&bytes, 3);
        assert_eq!(s.records.len(), 4);
        assert!(
            matches!(s.tail, Tail::Torn { offset, .. } if offset == ends[3]),
            "{:?}",
            s.tail
        );
    }

    #[test]
    fn a_torn_record_followed_by_zeros_is_torn() {
        let (bytes, ends) = segment(&records());
        // The last record's second half never reached the disk: zeros there
        // and in the preallocated space after it.
        let start = ends[2];
        let mut torn = bytes[..start + (ends[3] - start) / 2].to_vec();
        torn.resize(64 << 10, 0);
        let s = scan(&torn, 3);
        assert_eq!(s.records.len(), 3);
        assert!(
            matches!(&s.tail, Tail::Torn { offset, why } if *offset == start && why.contains("checksum")),
            "{:?}",
            s.tail
        );
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
