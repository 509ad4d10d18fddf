//! Snapshot files: the whole store as of one commit sequence number.
//!
//! ```text
//! magic "DKVSSNP1" (8) | seq u64 | history id u64 | first segment u64 | header crc32c u32
//! blocks: length u32 (1..=MAX_BLOCK_BYTES) | crc32c u32 | entries (store::snapshot encoding)
//! end:    0 u32 | crc32c of the count u32 | entry count u64
//! ```
//!
//! All integers big-endian. A snapshot is written to a temporary name, synced,
//! renamed, and the directory synced (the order ALICE shows a crash needs), so
//! a file with a final name is always complete; it is still checked on load.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use byteorder::{BigEndian, ByteOrder};

use crate::store::Store;
use crate::store::snapshot::decode_entry;

/// The first bytes of every snapshot file this build writes. Version 2 entries
/// may carry a deadline (the flag bit in their value length, `store::snapshot`).
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"DKVSSNP2";
/// Version 1, written before expiry existed: the same layout, no entry has a
/// deadline, so it loads with the same decoder.
const SNAPSHOT_MAGIC_V1: &[u8; 8] = b"DKVSSNP1";
const HEADER_BYTES: usize = 8 + 8 + 8 + 8 + 4;
/// Largest block of entries accepted (a block holds whole entries: one largest value fits).
pub const MAX_BLOCK_BYTES: usize = 32 << 20;

/// The file name of the snapshot taken at rotation to segment `id`.
pub fn snapshot_name(id: u64) -> String {
    format!("snap-{id:016x}.dat")
}

/// The segment id named by a snapshot file name, if it is one.
pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("snap-")?.strip_suffix(".dat")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// What a snapshot is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The store reflects every commit through this sequence number.
    pub seq: u64,
    /// The history that sequence number belongs to.
    pub history_id: u64,
    /// Segments from this id on hold the records after the snapshot.
    pub first_segment: u64,
}

impl SnapshotHeader {
    /// The encoded header.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..8].copy_from_slice(SNAPSHOT_MAGIC);
        BigEndian::write_u64(&mut h[8..16], self.seq);
        BigEndian::write_u64(&mut h[16..24], self.history_id);
        BigEndian::write_u64(&mut h[24..32], self.first_segment);
        let crc = crc32c::crc32c(&h[..32]);
        BigEndian::write_u32(&mut h[32..36], crc);
        h
    }
}

/// Append one block of encoded entries.
pub fn write_block(out: &mut impl Write, entries: &[u8]) -> io::Result<()> {
    debug_assert!(!entries.is_empty() && entries.len() <= MAX_BLOCK_BYTES);
    let mut h = [0u8; 8];
    BigEndian::write_u32(&mut h[..4], entries.len() as u32);
    BigEndian::write_u32(&mut h[4..], crc32c::crc32c(entries));
    out.write_all(&h)?;
    out.write_all(entries)
}

/// Append the end marker with the number of entries written.
pub fn write_end(out: &mut impl Write, entries: u64) -> io::Result<()> {
    let count = entries.to_be_bytes();
    let mut h = [0u8; 8];
    BigEndian::write_u32(&mut h[4..], crc32c::crc32c(&count));
    out.write_all(&h)?;
    out.write_all(&count)
}

/// Why a snapshot file cannot be loaded.
#[derive(Debug)]
pub enum SnapshotError {
    /// Reading failed.
    Io(io::Error),
    /// The bytes are not a complete, valid snapshot.
    Invalid {
        /// Byte offset of the problem.
        offset: u64,
        /// What is wrong.
        why: String,
    },
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::Io(e) => write!(f, "{e}"),
            SnapshotError::Invalid { offset, why } => write!(f, "at byte {offset}: {why}"),
        }
    }
}

impl From<io::Error> for SnapshotError {
    fn from(e: io::Error) -> SnapshotError {
        SnapshotError::Io(e)
    }
}

/// Read only the header of the snapshot at `path`.
pub fn read_header(path: &Path) -> Result<SnapshotHeader, SnapshotError> {
    let mut file = BufReader::new(File::open(path)?);
    read_header_from(&mut file)
}

fn read_header_from(r: &mut impl Read) -> Result<SnapshotHeader, SnapshotError> {
    let mut h = [0u8; HEADER_BYTES];
    read_exact(r, &mut h, 0)?;
    let invalid = |why: String| SnapshotError::Invalid { offset: 0, why };
    if &h[..8] != SNAPSHOT_MAGIC && &h[..8] != SNAPSHOT_MAGIC_V1 {
        return Err(invalid("not a dkvs snapshot (bad magic)".into()));
    }
    if crc32c::crc32c(&h[..32]) != BigEndian::read_u32(&h[32..36]) {
        return Err(invalid("header checksum mismatch".into()));
    }
    Ok(SnapshotHeader {
        seq: BigEndian::read_u64(&h[8..16]),
        history_id: BigEndian::read_u64(&h[16..24]),
        first_segment: BigEndian::read_u64(&h[24..32]),
    })
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], offset: u64) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            SnapshotError::Invalid {
                offset,
                why: "file ends early".into(),
            }
        } else {
            SnapshotError::Io(e)
        }
    })
}

/// Load the snapshot at `path` into a new store.
pub fn load(path: &Path) -> Result<(SnapshotHeader, Store), SnapshotError> {
    load_from(BufReader::with_capacity(1 << 20, File::open(path)?))
}

/// Load a snapshot from any reader (the file, or bytes in memory for the fuzz
/// target in fuzz/): the same checks as [`load`].
pub fn load_from(mut file: impl Read) -> Result<(SnapshotHeader, Store), SnapshotError> {
    let header = read_header_from(&mut file)?;
    let mut store = Store::new();
    let mut offset = HEADER_BYTES as u64;
    let mut entries = 0u64;
    let mut block = Vec::new();
    loop {
        let mut h = [0u8; 8];
        read_exact(&mut file, &mut h, offset)?;
        let len = BigEndian::read_u32(&h[..4]) as usize;
        let crc = BigEndian::read_u32(&h[4..]);
        let invalid = |why: String| SnapshotError::Invalid { offset, why };
        if len == 0 {
            let mut count = [0u8; 8];
            read_exact(&mut file, &mut count, offset + 8)?;
            if crc32c::crc32c(&count) != crc {
                return Err(invalid("end marker checksum mismatch".into()));
            }
            let declared = u64::from_be_bytes(count);
            if declared != entries {
                return Err(invalid(format!(
                    "end marker says {declared} entries, the blocks hold {entries}"
                )));
            }
            let mut rest = [0u8; 1];
            if file.read(&mut rest)? != 0 {
                return Err(invalid("bytes after the end marker".into()));
            }
            return Ok((header, store));
        }
        if len > MAX_BLOCK_BYTES {
            return Err(invalid(format!("impossible block length {len}")));
        }
        // The buffer grows with the bytes the file holds, never to the length
        // it declares: a damaged length in a short file must not cost 32 MiB.
        block.clear();
        if (&mut file).take(len as u64).read_to_end(&mut block)? < len {
            return Err(SnapshotError::Invalid {
                offset: offset + 8,
                why: "file ends early".into(),
            });
        }
        if crc32c::crc32c(&block) != crc {
            return Err(invalid("block checksum mismatch".into()));
        }
        let mut bytes = &block[..];
        while !bytes.is_empty() {
            let Some((e, used)) = decode_entry(bytes) else {
                return Err(invalid("malformed entry in block".into()));
            };
            store.set(e.key, e.value, e.version);
            if e.deadline_ms > 0 {
                store.set_deadline(e.key, Some(e.deadline_ms));
            }
            entries += 1;
            bytes = &bytes[used..];
        }
        offset += 8 + len as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::snapshot::ShardCopy;

    fn write_snapshot(path: &Path, store: &Store, header: SnapshotHeader) {
        let mut out = Vec::new();
        out.extend_from_slice(&header.encode());
        let mut copy = ShardCopy::new();
        loop {
            copy.fill(store, 4096);
            let block = copy.take(4096);
            if block.is_empty() {
                break;
            }
            write_block(&mut out, block).expect("vec write");
            copy.compact();
        }
        write_end(&mut out, copy.entries()).expect("vec write");
        std::fs::write(path, out).expect("write snapshot");
    }

    #[test]
    fn snapshot_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(snapshot_name(5));
        let mut store = Store::new();
        for i in 0..10_000u64 {
            store.set(
                format!("key{i}").as_bytes(),
                &vec![b'v'; (i % 200) as usize],
                i + 1,
            );
        }
        let header = SnapshotHeader {
            seq: 10_000,
            history_id: 77,
            first_segment: 5,
        };
        write_snapshot(&path, &store, header);
        assert_eq!(read_header(&path).expect("header"), header);
        let (h, loaded) = load(&path).expect("loads");
        assert_eq!(h, header);
        assert_eq!(loaded.len(), store.len());
        for b in store.iter() {
            assert_eq!(loaded.get(b.key()), Some((b.value(), b.version())));
        }
    }

    #[test]
    fn deadlines_survive_a_snapshot_and_version_1_still_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(snapshot_name(6));
        let mut store = Store::new();
        for i in 0..1000u64 {
            let key = format!("key{i}");
            store.set(key.as_bytes(), b"v", i + 1);
            if i % 3 == 0 {
                store.set_deadline(key.as_bytes(), Some(1_000_000 + i));
            }
        }
        let header = SnapshotHeader {
            seq: 1000,
            history_id: 7,
            first_segment: 6,
        };
        write_snapshot(&path, &store, header);
        let (_, loaded) = load(&path).expect("loads");
        assert_eq!(loaded.expiring(), store.expiring());
        for b in store.iter() {
            assert_eq!(loaded.deadline(b.key()), store.deadline(b.key()));
        }
        // A version-1 file (no deadlines) differs only in its magic.
        let mut plain = Store::new();
        plain.set(b"k", b"v", 1);
        let old = dir.path().join(snapshot_name(7));
        write_snapshot(&old, &plain, header);
        let mut bytes = std::fs::read(&old).expect("read");
        bytes[..8].copy_from_slice(b"DKVSSNP1");
        let crc = crc32c::crc32c(&bytes[..32]);
        bytes[32..36].copy_from_slice(&crc.to_be_bytes());
        std::fs::write(&old, bytes).expect("write");
        let (_, loaded) = load(&old).expect("a version-1 snapshot loads");
        assert_eq!(loaded.get(b"k"), Some((&b"v"[..], 1)));
    }

    #[test]
    fn an_empty_store_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        let header = SnapshotHeader {
            seq: 0,
            history_id: 1,
            first_segment: 1,
        };
        write_snapshot(&path, &Store::new(), header);
        let (_, loaded) = load(&path).expect("loads");
        assert!(loaded.is_empty());
    }

    #[test]
    fn damage_anywhere_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        let mut store = Store::new();
        for i in 0..300u64 {
            store.set(format!("key{i}").as_bytes(), b"value", i + 1);
        }
        let header = SnapshotHeader {
            seq: 300,
            history_id: 1,
            first_segment: 1,
        };
        write_snapshot(&path, &store, header);
        let good = std::fs::read(&path).expect("read");
        let step = (good.len() / 97).max(1);
        for at in (0..good.len()).step_by(step) {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).expect("write");
            assert!(load(&path).is_err(), "flip at {at} accepted");
        }
        for cut in (0..good.len()).step_by(step) {
            std::fs::write(&path, &good[..cut]).expect("write");
            assert!(load(&path).is_err(), "cut at {cut} accepted");
        }
        assert_eq!(parse_snapshot_name(&snapshot_name(9)), Some(9));
    }

    /// A reader that remembers the largest buffer it was asked to fill: the
    /// size the loader allocated before knowing the bytes are there.
    struct Probe<'a> {
        bytes: &'a [u8],
        largest_read: usize,
    }

    impl Read for Probe<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest_read = self.largest_read.max(buf.len());
            self.bytes.read(buf)
        }
    }

    #[test]
    fn a_block_length_is_not_allocated_before_its_bytes_are_there() {
        // Found while bounding the snapshot fuzz target's allocations: a valid
        // header, a block header declaring MAX_BLOCK_BYTES, then 3 bytes. The
        // loader sized its buffer to 32 MiB before reading them.
        let header = SnapshotHeader {
            seq: 1,
            history_id: 1,
            first_segment: 1,
        };
        let mut file = header.encode().to_vec();
        file.extend_from_slice(&(MAX_BLOCK_BYTES as u32).to_be_bytes());
        file.extend_from_slice(&[0, 0, 0, 0, 1, 2, 3]);
        let mut probe = Probe {
            bytes: &file,
            largest_read: 0,
        };
        match load_from(&mut probe) {
            Err(SnapshotError::Invalid { offset, why }) => {
                assert_eq!(offset, HEADER_BYTES as u64 + 8);
                assert!(why.contains("ends early"), "{why}");
            }
            other => panic!("{:?}", other.map(|(h, _)| h)),
        }
        assert!(
            probe.largest_read < 64 << 10,
            "asked for a {}-byte read",
            probe.largest_read
        );
    }
}
