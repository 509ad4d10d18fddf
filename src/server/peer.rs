//! A replication link: the master's end of a registered slave, or a slave's
//! end of its link to the master. Frames are peer messages; a snapshot being
//! streamed is fed into the link as its output drains, so the reactor never
//! stalls on it.

use std::io::{Read, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;

use crate::protocol::peer::{PeerError, PeerMessage, decode_peer, opcode};
use crate::protocol::peer_auth::{
    AUTH_CHALLENGE, AUTH_HELLO, AUTH_PROOF, AuthError, AuthFrame, PeerAuth,
};
use crate::protocol::{HEADER_LEN, Header};
use crate::replication::PeerId;
use crate::store::Store;

use super::snapshots::SnapshotSet;
use super::stream::{Filled, Framed};

/// A snapshot chunk is cut after this many bytes of entries.
const SNAPSHOT_CHUNK_BYTES: usize = 256 * 1024;
/// More snapshot chunks are queued only while less than this is unsent.
pub const SNAPSHOT_LOW_WATER_BYTES: usize = 1 << 20;
/// Snapshot chunks queued by one flush; the rest wait for the next loop
/// iteration, so streaming a large store never holds the reactor for long.
/// Measured on a master with 1M keys and 50 clients while a slave joined:
/// 4 chunks a turn gave turns of 5-7 ms of CPU (one 14 ms), 1 chunk 3-4.6 ms.
const SNAPSHOT_CHUNKS_PER_TURN: usize = 1;
/// Bytes read by one wake-up of a link before it yields to the rest of the loop.
const READ_BYTES_PER_TURN: u64 = 1 << 20;
/// Largest payload a master accepts from a slave: its largest message, a
/// REGISTER with a 65535-byte address (2 + 8 + 8 + 1 + 8 + 2 + 65535 bytes).
pub const MAX_SLAVE_FRAME_PAYLOAD: usize = 2 + 8 + 8 + 1 + 8 + 2 + u16::MAX as usize;

/// Opcodes a slave sends (what a master accepts).
const SLAVE_OPCODES: [u8; 6] = [
    opcode::REGISTER,
    opcode::VOTE,
    opcode::ACK,
    opcode::CAUGHT_UP,
    opcode::HEARTBEAT,
    opcode::OUTCOME_QUERY,
];
/// Opcodes a master sends (what a slave accepts).
const MASTER_OPCODES: [u8; 9] = [
    opcode::REGISTERED,
    opcode::PREPARE,
    opcode::COMMIT,
    opcode::ABORT,
    opcode::SNAPSHOT_CHUNK,
    opcode::LOG_ENTRY,
    opcode::CAUGHT_UP,
    opcode::HEARTBEAT,
    opcode::OUTCOME,
];

/// Why a link is finished.
#[derive(Debug)]
pub enum LinkError {
    /// The socket failed or closed.
    Io(String),
    /// The peer sent bytes that are not a peer message.
    Protocol(PeerError),
    /// The peer sent a header for a message its side never sends.
    WrongDirection(u8),
    /// The peer let too much output pile up.
    NotReading(usize),
    /// The snapshot being streamed was dropped at the memory cap.
    SnapshotDropped,
    /// The cluster-secret handshake failed (docs/SECURITY.md).
    Auth(AuthError),
    /// A message of another leadership epoch than the link's: from a master
    /// of an older one (deposed), or from a slave that knows a newer one.
    Epoch {
        /// The epoch in the message.
        theirs: u32,
        /// The link's.
        ours: u32,
    },
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Protocol(e) => write!(f, "bad peer message: {e}"),
            LinkError::WrongDirection(op) => write!(
                f,
                "peer sent opcode 0x{op:02x}, which only the other side of a link sends"
            ),
            LinkError::NotReading(unsent) => {
                write!(f, "peer is not reading: {unsent} bytes unsent")
            }
            LinkError::SnapshotDropped => write!(
                f,
                "its snapshot was dropped at the memory cap (--max-snapshot-memory-mb)"
            ),
            LinkError::Auth(e) => write!(f, "authentication failed: {e}"),
            LinkError::Epoch { theirs, ours } => write!(
                f,
                "peer message of leadership epoch {theirs} on a link of epoch {ours}"
            ),
        }
    }
}

/// A snapshot being sent in chunks; its entries come from the server's
/// [`SnapshotSet`], where this link is a reader named by its `PeerId`.
#[derive(Debug)]
struct SnapshotStream {
    at_seq: u64,
    /// The link's `bytes_written` when the stream began.
    written_at_start: u64,
}

/// One replication link, over transport `S` (a socket but in unit tests).
#[derive(Debug)]
pub struct PeerLink<S = TcpStream> {
    /// The stream and its buffers.
    pub io: Framed<S>,
    /// The state machines' name for this link.
    pub id: PeerId,
    /// The other end.
    pub addr: SocketAddr,
    /// A slave's outgoing connection that has not completed yet.
    pub connecting: bool,
    snapshot: Option<SnapshotStream>,
    /// Largest frame payload accepted from the peer.
    max_frame_bytes: usize,
    /// The other end is the master (this is a slave's link).
    from_master: bool,
    /// Largest unsent output before the link is dropped.
    max_output_bytes: usize,
    /// The poller reported the peer's FIN: read on to the EOF.
    read_closed: bool,
    /// The last receive stopped at its budget with bytes left: the reactor
    /// must come back without waiting for an edge.
    pub read_yielded: bool,
    /// The last flush stopped at its snapshot budget: likewise.
    pub flush_yielded: bool,
    /// The leadership epoch this link belongs to (0 without failover).
    epoch: u32,
    /// The cluster-secret handshake, while it runs (None: none configured).
    auth: Option<PeerAuth>,
    /// A slave's messages queued before its proof was sent: the master takes
    /// nothing before the handshake is done.
    held: Vec<u8>,
}

impl<S: Read + Write> PeerLink<S> {
    /// Wrap a stream (possibly with frames already buffered). `connecting` is
    /// set on a slave's own link to its master, which is still being set up.
    pub fn new(
        io: Framed<S>,
        id: PeerId,
        addr: SocketAddr,
        connecting: bool,
        max_frame_bytes: usize,
        max_output_bytes: usize,
    ) -> PeerLink<S> {
        PeerLink {
            io,
            id,
            addr,
            connecting,
            snapshot: None,
            max_frame_bytes,
            from_master: connecting,
            max_output_bytes,
            read_closed: false,
            read_yielded: false,
            flush_yielded: false,
            epoch: 0,
            auth: None,
            held: Vec::new(),
        }
    }

    /// Authenticate the link with the cluster secret before any peer message
    /// passes; `first` is a slave's HELLO, sent at once.
    pub fn with_auth(mut self, auth: PeerAuth, first: Option<AuthFrame>) -> PeerLink<S> {
        if let Some(frame) = first {
            self.send_auth_frame(&frame);
        }
        self.auth = Some(auth);
        self
    }

    fn authenticating(&self) -> bool {
        self.auth.as_ref().is_some_and(|a| !a.done())
    }

    fn send_auth_frame(&mut self, (op, payload): &AuthFrame) {
        crate::protocol::encode(&mut self.io.output, *op, 0, self.epoch, 0, &[], payload);
    }

    /// The link belongs to leadership epoch `epoch` (failover through etcd):
    /// every message sent carries it, and every message received is checked
    /// against it.
    pub fn in_epoch(mut self, epoch: u64) -> PeerLink<S> {
        // Epochs count promotions; 2^32 of them is beyond any deployment.
        self.epoch = u32::try_from(epoch).unwrap_or(u32::MAX);
        self
    }

    /// Whether the other end is the master (this is a slave's link).
    pub fn to_master(&self) -> bool {
        self.from_master
    }

    /// Check the header at the front of the input before its payload is
    /// buffered or decoded: the opcode must be one the other side sends, and
    /// the payload within this direction's limit.
    fn check_header(&self) -> Result<(), LinkError> {
        let buffered = self.io.buffered();
        if buffered.len() < HEADER_LEN {
            return Ok(());
        }
        let header = Header::parse(&buffered[..HEADER_LEN], self.max_frame_bytes)
            .map_err(|e| LinkError::Protocol(PeerError::Frame(e)))?;
        if self.authenticating() {
            // Only the handshake's own frames, each from its side, until it is done.
            let allowed: &[u8] = if self.from_master {
                &[AUTH_CHALLENGE]
            } else {
                &[AUTH_HELLO, AUTH_PROOF]
            };
            if !allowed.contains(&header.opcode) {
                return Err(LinkError::Auth(AuthError::Unexpected(header.opcode)));
            }
            return Ok(());
        }
        let allowed: &[u8] = if self.from_master {
            &MASTER_OPCODES
        } else {
            &SLAVE_OPCODES
        };
        // Unassigned opcodes are left to the decoder, which names them.
        let known =
            SLAVE_OPCODES.contains(&header.opcode) || MASTER_OPCODES.contains(&header.opcode);
        if known && !allowed.contains(&header.opcode) {
            return Err(LinkError::WrongDirection(header.opcode));
        }
        // A slave takes nothing from an older epoch's master (it was deposed and
        // must never gather a vote again); a master takes nothing from a slave
        // that knows a newer epoch (this master is the deposed one).
        let theirs = header.request_id;
        let stale = if self.from_master {
            theirs < self.epoch
        } else {
            theirs > self.epoch
        };
        if stale {
            return Err(LinkError::Epoch {
                theirs,
                ours: self.epoch,
            });
        }
        Ok(())
    }

    /// Queue a message.
    pub fn send(&mut self, msg: &PeerMessage) {
        if self.authenticating() {
            msg.encode_in_epoch(&mut self.held, self.epoch);
            return;
        }
        msg.encode_in_epoch(&mut self.io.output, self.epoch);
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
        let start = self.io.bytes_read();
        loop {
            self.decode_buffered(out)?;
            if self.io.bytes_read() - start >= READ_BYTES_PER_TURN {
                self.read_yielded = true;
                return Ok(());
            }
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
            self.check_header()?;
            if self.authenticating() {
                if !self.step_auth()? {
                    return Ok(());
                }
                continue;
            }
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

    /// Take one handshake frame if a whole one is buffered; returns whether it did.
    fn step_auth(&mut self) -> Result<bool, LinkError> {
        let (op, payload, used) =
            match crate::protocol::decode(self.io.buffered(), self.max_frame_bytes) {
                Ok(crate::protocol::Decoded::Frame(f, used)) => {
                    (f.header.opcode, f.value.to_vec(), used)
                }
                Ok(crate::protocol::Decoded::Incomplete(need)) => {
                    self.io.need(need);
                    return Ok(false);
                }
                Err(e) => return Err(LinkError::Protocol(PeerError::Frame(e))),
            };
        self.io.consume(used);
        let Some(auth) = self.auth.as_mut() else {
            return Ok(false);
        };
        let reply = auth.on_frame(op, &payload).map_err(LinkError::Auth)?;
        if let Some(frame) = reply {
            self.send_auth_frame(&frame);
        }
        if !self.authenticating() {
            // The proof went out first: what the slave queued meanwhile follows it.
            let held = std::mem::take(&mut self.held);
            self.io.output.extend_from_slice(&held);
        }
        Ok(true)
    }

    /// Write queued output; refill it from a snapshot in progress, at most
    /// `SNAPSHOT_CHUNKS_PER_TURN` chunks (then `flush_yielded` is set).
    /// Returns the snapshot's sequence number once its last chunk is queued.
    pub fn flush(
        &mut self,
        store: &Store,
        snapshots: &mut SnapshotSet,
    ) -> Result<Option<u64>, LinkError> {
        let mut finished = None;
        for queued in 0.. {
            self.io.flush().map_err(|e| LinkError::Io(e.to_string()))?;
            let Some(snapshot) = self.snapshot.as_ref() else {
                break;
            };
            if self.io.pending_output() >= SNAPSHOT_LOW_WATER_BYTES {
                break;
            }
            if queued == SNAPSHOT_CHUNKS_PER_TURN {
                self.flush_yielded = true;
                break;
            }
            let at_seq = snapshot.at_seq;
            let output = &mut self.io.output;
            let epoch = self.epoch;
            let emitted = snapshots.next_chunk_with(
                self.id.0,
                store,
                SNAPSHOT_CHUNK_BYTES,
                |seq, last, count, entries| {
                    PeerMessage::encode_snapshot_chunk(output, epoch, seq, last, count, entries);
                    last
                },
            );
            let Some(last) = emitted else {
                self.snapshot = None;
                return Err(LinkError::SnapshotDropped);
            };
            if last {
                finished = Some(at_seq);
                self.snapshot = None;
            }
        }
        if self.io.pending_output() > self.max_output_bytes {
            return Err(LinkError::NotReading(self.io.pending_output()));
        }
        Ok(finished)
    }

    /// Start streaming the snapshot at `at_seq` this link reads in the
    /// server's [`SnapshotSet`] (started there first).
    pub fn start_snapshot(&mut self, at_seq: u64) {
        self.snapshot = Some(SnapshotStream {
            at_seq,
            written_at_start: self.io.bytes_written(),
        });
    }

    /// Whether a snapshot is being streamed (its last chunk not queued yet).
    pub fn streaming_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }

    /// What a snapshot in progress has cost so far, for the log line of a
    /// link dropped while streaming one.
    pub fn snapshot_summary(&self, snapshots: &SnapshotSet) -> Option<String> {
        let snapshot = self.snapshot.as_ref()?;
        let (entries, held) = snapshots.summary(self.id.0).unwrap_or((0, 0));
        Some(format!(
            "snapshot at seq {}: {entries} entries staged, {} bytes sent, {} bytes unsent, \
             {held} bytes held by the snapshot it shares",
            snapshot.at_seq,
            self.io.bytes_written() - snapshot.written_at_start,
            self.io.pending_output(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_flush_queues_a_bounded_part_of_a_large_snapshot() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = mio::net::TcpStream::connect(addr).expect("connect");
        let (mut reader, _) = listener.accept().expect("accept");
        // The other end reads everything, as fast as it can: only the budget stops the flush.
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0usize;
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        });
        let mut store = Store::new();
        for i in 0..60_000u64 {
            store.set(format!("key{i}").as_bytes(), &[b'v'; 100], 1);
        }
        let mut link = PeerLink::new(
            Framed::new(stream),
            PeerId(1),
            addr,
            false,
            MAX_SLAVE_FRAME_PAYLOAD,
            64 << 20,
        );
        // Wait until the connection is up, so writes do not fail.
        while link.io.stream.peer_addr().is_err() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut snapshots = SnapshotSet::new(usize::MAX);
        snapshots.start(link.id.0, 1, 0);
        link.start_snapshot(1);
        let mut flushes = 0;
        loop {
            flushes += 1;
            let finished = link.flush(&store, &mut snapshots).expect("flush");
            if finished.is_some() {
                break;
            }
            assert!(
                link.flush_yielded || link.io.pending_output() >= SNAPSHOT_LOW_WATER_BYTES,
                "a flush stops at its budget or at the window, never in between"
            );
            link.flush_yielded = false;
            assert!(flushes < 10_000, "the snapshot finishes");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // About 8 MB of entries in 256 KiB chunks, at most 4 per flush.
        assert!(flushes >= 7, "{flushes} flushes");
        while link.io.pending_output() > 0 {
            link.io.flush().expect("flush the rest");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(link);
        assert!(drain.join().expect("reader") > 60_000 * 100);
    }
}

#[cfg(test)]
mod epoch_tests {
    use super::*;
    use crate::server::stream::testing::MemTransport;

    /// A connected link (a slave's when `to_master`) whose other end sent `bytes`.
    fn link_fed(to_master: bool, bytes: &[u8]) -> PeerLink<MemTransport> {
        let mut transport = MemTransport::new(usize::MAX);
        transport.send(bytes);
        let mut link = PeerLink::new(
            Framed::new(transport),
            PeerId(1),
            "127.0.0.1:1".parse().expect("an address"),
            to_master,
            MAX_SLAVE_FRAME_PAYLOAD,
            1 << 20,
        );
        link.connecting = false;
        link
    }

    /// A link of `epoch` (a slave's when `to_master`) fed `bytes` by the other end.
    fn receive(to_master: bool, epoch: u64, bytes: &[u8]) -> Result<Vec<PeerMessage>, LinkError> {
        let mut link = link_fed(to_master, bytes).in_epoch(epoch);
        let mut out = Vec::new();
        link.receive(&mut out, false)?;
        Ok(out)
    }

    fn heartbeat(epoch: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        PeerMessage::Heartbeat {
            seq: 5,
            stamp: 7,
            lease_ms: 200,
            poll: false,
        }
        .encode_in_epoch(&mut bytes, epoch);
        bytes
    }

    #[test]
    fn a_link_reads_a_bounded_number_of_bytes_per_wake_up() {
        let mut bytes = Vec::new();
        while bytes.len() < 3 * READ_BYTES_PER_TURN as usize {
            bytes.extend(heartbeat(0));
        }
        let count = bytes.len() / heartbeat(0).len();
        let mut link = link_fed(true, &bytes);
        let mut out = Vec::new();
        let mut turns = 0;
        loop {
            turns += 1;
            let before = link.io.bytes_read();
            link.receive(&mut out, false).expect("heartbeats");
            let read = link.io.bytes_read() - before;
            // One read past the budget at most: the 4 KiB resting buffer.
            assert!(
                read < READ_BYTES_PER_TURN + 4096,
                "{read} bytes in one turn"
            );
            if !std::mem::take(&mut link.read_yielded) {
                break;
            }
        }
        assert!(turns >= 3, "{turns} turns for 3 MiB");
        assert_eq!(out.len(), count);
    }

    #[test]
    fn a_master_refuses_a_frame_over_the_slave_limit_from_its_header() {
        let mut header = heartbeat(3)[..HEADER_LEN].to_vec();
        header[2] = opcode::REGISTER;
        let len = MAX_SLAVE_FRAME_PAYLOAD as u32 + 1;
        header[20..24].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            receive(false, 3, &header),
            Err(LinkError::Protocol(_))
        ));
        // A slave's link to its master takes nothing a slave sends.
        header[20..24].copy_from_slice(&8u32.to_be_bytes());
        assert!(matches!(
            receive(true, 3, &header),
            Err(LinkError::WrongDirection(opcode::REGISTER))
        ));
    }

    #[test]
    fn a_slave_refuses_every_message_of_an_older_epochs_master() {
        assert!(matches!(
            receive(true, 3, &heartbeat(2)),
            Err(LinkError::Epoch { theirs: 2, ours: 3 })
        ));
        assert_eq!(
            receive(true, 3, &heartbeat(3)).expect("same epoch"),
            vec![PeerMessage::Heartbeat {
                seq: 5,
                stamp: 7,
                lease_ms: 200,
                poll: false,
            }]
        );
    }

    #[test]
    fn a_master_refuses_a_slave_that_knows_a_newer_epoch() {
        assert!(matches!(
            receive(false, 3, &heartbeat(4)),
            Err(LinkError::Epoch { theirs: 4, ours: 3 })
        ));
        assert_eq!(
            receive(false, 3, &heartbeat(3)).expect("same epoch"),
            vec![PeerMessage::Heartbeat {
                seq: 5,
                stamp: 7,
                lease_ms: 200,
                poll: false,
            }]
        );
    }
}
