//! A replication link: the master's end of a registered slave, or a slave's
//! end of its link to the master. Frames are peer messages; a snapshot being
//! streamed is fed into the link as its output drains, so the reactor never
//! stalls on it.

use std::net::SocketAddr;

use byteorder::{BigEndian, ByteOrder};

use crate::protocol::peer::{PeerError, PeerMessage, SnapshotEntry, decode_peer};
use crate::replication::PeerId;
use crate::store::{SHARDS, Store};

use super::stream::{Filled, Framed};

/// A snapshot chunk is cut after this many bytes of entries.
const SNAPSHOT_CHUNK_BYTES: usize = 256 * 1024;
/// More snapshot chunks are queued only while less than this is unsent.
const SNAPSHOT_LOW_WATER_BYTES: usize = 1 << 20;
/// A peer that lets this much output pile up is dropped rather than buffered for.
pub const MAX_PEER_BACKLOG_BYTES: usize = 512 << 20;

/// Why a link is finished.
#[derive(Debug)]
pub enum LinkError {
    /// The socket failed or closed.
    Io(String),
    /// The peer sent bytes that are not a peer message.
    Protocol(PeerError),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Protocol(e) => write!(f, "bad peer message: {e}"),
        }
    }
}

/// A point-in-time copy of the store being sent in chunks, copied a shard at
/// a time: shards are copied as the link drains, and a shard about to be
/// written is copied first (copy-on-write at shard granularity), so the copy
/// is exactly the store as of `at_seq` without one long pause.
#[derive(Debug)]
struct SnapshotStream {
    at_seq: u64,
    /// Copied entries not yet sent, as `[key_len u16][value_len u32][version u64][key][value]`.
    bytes: Vec<u8>,
    sent: usize,
    /// Shards already copied into `bytes` (or sent).
    copied: Vec<bool>,
    /// Shards below this index are all copied.
    scan: usize,
}

const ENTRY_HEADER_BYTES: usize = 14;

impl SnapshotStream {
    fn new(at_seq: u64) -> SnapshotStream {
        SnapshotStream {
            at_seq,
            bytes: Vec::new(),
            sent: 0,
            copied: vec![false; SHARDS],
            scan: 0,
        }
    }

    /// Copy one shard as it is now, unless already copied.
    fn copy_shard(&mut self, store: &Store, shard: usize) {
        if self.copied[shard] {
            return;
        }
        self.copied[shard] = true;
        for block in store.iter_shard(shard) {
            let mut header = [0u8; ENTRY_HEADER_BYTES];
            BigEndian::write_u16(&mut header[0..2], block.key().len() as u16);
            BigEndian::write_u32(&mut header[2..6], block.value().len() as u32);
            BigEndian::write_u64(&mut header[6..14], block.version());
            self.bytes.extend_from_slice(&header);
            self.bytes.extend_from_slice(block.key());
            self.bytes.extend_from_slice(block.value());
        }
    }

    /// `key` is about to change: keep its shard's state as of the snapshot.
    fn before_write(&mut self, store: &Store, key: &[u8]) {
        self.copy_shard(store, store.shard_of(key));
    }

    /// The next chunk message; `last` is set on the final one.
    fn next_chunk(&mut self, store: &Store) -> PeerMessage {
        // Copy shards until a chunk's worth is waiting or all are copied.
        while self.bytes.len() - self.sent < SNAPSHOT_CHUNK_BYTES && self.scan < SHARDS {
            self.copy_shard(store, self.scan);
            self.scan += 1;
        }
        let mut entries = Vec::new();
        let mut taken = 0;
        while self.sent < self.bytes.len() && taken < SNAPSHOT_CHUNK_BYTES {
            let rest = &self.bytes[self.sent..];
            // The buffer was written by `copy_shard` above, so its lengths are trusted.
            let key_len = BigEndian::read_u16(&rest[0..2]) as usize;
            let value_len = BigEndian::read_u32(&rest[2..6]) as usize;
            let version = BigEndian::read_u64(&rest[6..14]);
            let key_end = ENTRY_HEADER_BYTES + key_len;
            let end = key_end + value_len;
            entries.push(SnapshotEntry {
                key: rest[ENTRY_HEADER_BYTES..key_end].to_vec(),
                value: rest[key_end..end].to_vec(),
                version,
            });
            self.sent += end;
            taken += end;
        }
        // Forget what was sent once it is the larger part (amortised O(1) moves).
        if 2 * self.sent >= self.bytes.len() {
            self.bytes.drain(..self.sent);
            self.sent = 0;
        }
        let last = self.scan == SHARDS && self.sent == self.bytes.len();
        PeerMessage::SnapshotChunk {
            snapshot_seq: self.at_seq,
            entries,
            last,
        }
    }
}

/// One replication link.
#[derive(Debug)]
pub struct PeerLink {
    /// The stream and its buffers.
    pub io: Framed,
    /// The state machines' name for this link.
    pub id: PeerId,
    /// The other end.
    pub addr: SocketAddr,
    /// A slave's outgoing connection that has not completed yet.
    pub connecting: bool,
    snapshot: Option<SnapshotStream>,
    /// Largest frame accepted from the peer.
    max_frame_bytes: usize,
    /// The poller reported the peer's FIN: read on to the EOF.
    read_closed: bool,
}

impl PeerLink {
    /// Wrap a stream (possibly with frames already buffered).
    pub fn new(
        io: Framed,
        id: PeerId,
        addr: SocketAddr,
        connecting: bool,
        max_frame_bytes: usize,
    ) -> PeerLink {
        PeerLink {
            io,
            id,
            addr,
            connecting,
            snapshot: None,
            max_frame_bytes,
            read_closed: false,
        }
    }

    /// Queue a message.
    pub fn send(&mut self, msg: &PeerMessage) {
        msg.encode(&mut self.io.output);
    }

    /// Read what the socket has and decode every complete message into `out`.
    /// With `read_closed` (the poller saw the FIN) a short read is not the end:
    /// reading goes on to the EOF, which no later readiness would report.
    pub fn receive(
        &mut self,
        out: &mut Vec<PeerMessage>,
        read_closed: bool,
    ) -> Result<(), LinkError> {
        self.read_closed |= read_closed;
        loop {
            self.decode_buffered(out)?;
            match self.io.fill() {
                Ok(Filled::Eof) => {
                    self.decode_buffered(out)?;
                    return Err(LinkError::Io("connection closed by peer".into()));
                }
                Ok(Filled::Full) => {}
                Ok(Filled::Short) if self.read_closed => {}
                Ok(Filled::Short) | Ok(Filled::WouldBlock) => {
                    return self.decode_buffered(out);
                }
                Err(e) => return Err(LinkError::Io(e.to_string())),
            }
        }
    }

    /// Decode the complete messages already buffered.
    pub fn decode_buffered(&mut self, out: &mut Vec<PeerMessage>) -> Result<(), LinkError> {
        loop {
            match decode_peer(self.io.buffered(), self.max_frame_bytes) {
                Ok(Some((msg, used))) => {
                    self.io.consume(used);
                    out.push(msg);
                }
                Ok(None) => {
                    let need =
                        match crate::protocol::decode(self.io.buffered(), self.max_frame_bytes) {
                            Ok(crate::protocol::Decoded::Incomplete(need)) => need,
                            _ => None,
                        };
                    self.io.need(need);
                    return Ok(());
                }
                Err(e) => return Err(LinkError::Protocol(e)),
            }
        }
    }

    /// Write queued output; refill it from a snapshot in progress.
    /// Returns the snapshot's sequence number once its last chunk is queued.
    pub fn flush(&mut self, store: &Store) -> Result<Option<u64>, LinkError> {
        let mut finished = None;
        loop {
            self.io.flush().map_err(|e| LinkError::Io(e.to_string()))?;
            let Some(snapshot) = self.snapshot.as_mut() else {
                break;
            };
            if self.io.pending_output() >= SNAPSHOT_LOW_WATER_BYTES {
                break;
            }
            let chunk = snapshot.next_chunk(store);
            let last = matches!(chunk, PeerMessage::SnapshotChunk { last: true, .. });
            chunk.encode(&mut self.io.output);
            if last {
                finished = Some(snapshot.at_seq);
                self.snapshot = None;
            }
        }
        if self.io.pending_output() > MAX_PEER_BACKLOG_BYTES {
            return Err(LinkError::Io(format!(
                "peer is not reading: {} bytes unsent",
                self.io.pending_output()
            )));
        }
        Ok(finished)
    }

    /// Start streaming a copy of the store as it is now (copied lazily: call
    /// [`PeerLink::before_write`] before every write from here on).
    pub fn start_snapshot(&mut self, at_seq: u64) {
        self.snapshot = Some(SnapshotStream::new(at_seq));
    }

    /// `key` is about to change in `store`: preserve what the snapshot must send.
    pub fn before_write(&mut self, store: &Store, key: &[u8]) {
        if let Some(snapshot) = self.snapshot.as_mut() {
            snapshot.before_write(store, key);
        }
    }

    /// The whole store is about to be cleared: a snapshot being streamed copies
    /// every shard it has not sent yet, so it stays as of its start.
    pub fn before_clear(&mut self, store: &Store) {
        if let Some(snapshot) = self.snapshot.as_mut() {
            for shard in 0..SHARDS {
                snapshot.copy_shard(store, shard);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_chunks_cover_every_entry_once() {
        let mut store = Store::new();
        for i in 0..5000u64 {
            store.set(
                format!("key{i}").as_bytes(),
                &vec![b'v'; (i % 300) as usize],
                i + 1,
            );
        }
        let mut stream = SnapshotStream::new(5000);
        let mut seen = Store::new();
        let mut chunks = 0;
        loop {
            let PeerMessage::SnapshotChunk {
                snapshot_seq,
                entries,
                last,
            } = stream.next_chunk(&store)
            else {
                panic!("not a chunk");
            };
            assert_eq!(snapshot_seq, 5000);
            chunks += 1;
            for e in entries {
                assert!(seen.get(&e.key).is_none(), "entry sent twice");
                seen.set(&e.key, &e.value, e.version);
            }
            if last {
                break;
            }
        }
        assert!(chunks > 1, "a large store is cut into several chunks");
        assert_eq!(seen.len(), store.len());
        for block in store.iter() {
            assert_eq!(
                seen.get(block.key()),
                Some((block.value(), block.version()))
            );
        }
    }

    #[test]
    fn writes_during_the_stream_do_not_leak_into_it() {
        let mut store = Store::new();
        for i in 0..20_000u64 {
            store.set(format!("key{i}").as_bytes(), &[b'a'; 100], 1);
        }
        let expected: Vec<(Vec<u8>, Vec<u8>, u64)> = store
            .iter()
            .map(|b| (b.key().to_vec(), b.value().to_vec(), b.version()))
            .collect();
        let mut stream = SnapshotStream::new(1);
        let mut seen = Store::new();
        let mut round = 0u64;
        loop {
            let PeerMessage::SnapshotChunk { entries, last, .. } = stream.next_chunk(&store) else {
                panic!("not a chunk");
            };
            for e in entries {
                assert!(seen.get(&e.key).is_none(), "entry sent twice");
                seen.set(&e.key, &e.value, e.version);
            }
            if last {
                break;
            }
            // Between chunks, overwrite, delete and add keys, as the reactor
            // would after calling before_write.
            round += 1;
            for j in 0..200u64 {
                let key = format!("key{}", (round * 997 + j * 31) % 20_000);
                stream.before_write(&store, key.as_bytes());
                if j % 3 == 0 {
                    store.apply(
                        crate::store::Write::Delete {
                            key: key.as_bytes(),
                        },
                        round + 1,
                    );
                } else {
                    store.set(key.as_bytes(), b"changed", round + 1);
                }
                let new_key = format!("new{round}-{j}");
                stream.before_write(&store, new_key.as_bytes());
                store.set(new_key.as_bytes(), b"new", round + 1);
            }
        }
        assert!(round > 1, "the stream took several chunks");
        assert_eq!(seen.len(), expected.len());
        for (key, value, version) in expected {
            assert_eq!(seen.get(&key), Some((&value[..], version)));
        }
    }

    #[test]
    fn empty_store_is_one_last_chunk() {
        let store = Store::new();
        let mut stream = SnapshotStream::new(7);
        assert_eq!(
            stream.next_chunk(&store),
            PeerMessage::SnapshotChunk {
                snapshot_seq: 7,
                entries: Vec::new(),
                last: true
            }
        );
    }
}
