//! Peer (master <-> slave) messages and their codec.
//!
//! Peer messages ride in the ordinary 24-byte frame (see `frame.rs`) with
//! opcodes in the reserved range 0x40..=0x7F. Every message puts the commit
//! sequence number it is about in the header's `version` field, leaves the key
//! empty, and carries any further structure in the value, big-endian. Decoding
//! checks every length read from the wire against the bytes actually present
//! before it allocates, so a hostile peer cannot make us reserve memory it did
//! not send.

use std::fmt;
use std::sync::Arc;

use byteorder::{BigEndian, ByteOrder};

use super::error::ProtocolError;
use super::frame::{self, Decoded, Frame, MAX_KEY_BYTES};
use super::op_bytes::OpBytes;
use crate::store::snapshot::DEADLINE_FLAG;

/// Version of the peer protocol spoken by this build (sent in REGISTER).
///
/// Version 2 added the history id to REGISTER and REGISTERED; 3 the node id
/// and flags; 4 the leadership epoch; 5 the read lease in HEARTBEAT; 6 the
/// commit carried on PREPARE, the ack carried on VOTE, and cumulative COMMIT.
pub const PEER_PROTOCOL_VERSION: u16 = 6;
/// First opcode reserved for peer messages.
pub const PEER_OPCODE_FIRST: u8 = 0x40;
/// Last opcode reserved for peer messages.
pub const PEER_OPCODE_LAST: u8 = 0x7F;

/// Peer message opcodes (wire bytes).
pub mod opcode {
    /// Slave -> master: handshake.
    pub const REGISTER: u8 = 0x40;
    /// Master -> slave: handshake reply, announces the catch-up that follows.
    pub const REGISTERED: u8 = 0x41;
    /// Master -> slave: phase one of 2PC.
    pub const PREPARE: u8 = 0x42;
    /// Slave -> master: vote on a PREPARE.
    pub const VOTE: u8 = 0x43;
    /// Master -> slave: commit decision.
    pub const COMMIT: u8 = 0x44;
    /// Master -> slave: abort decision.
    pub const ABORT: u8 = 0x45;
    /// Slave -> master: commits applied and durable through a sequence number.
    pub const ACK: u8 = 0x46;
    /// Master -> slave: part of a full snapshot.
    pub const SNAPSHOT_CHUNK: u8 = 0x47;
    /// Master -> slave: a committed transaction replayed during catch-up.
    pub const LOG_ENTRY: u8 = 0x48;
    /// Both ways: end-of-backlog marker (master) and its echo (slave).
    pub const CAUGHT_UP: u8 = 0x49;
    /// Both ways: liveness and lag.
    pub const HEARTBEAT: u8 = 0x4A;
    /// Slave -> master: what happened to this transaction?
    pub const OUTCOME_QUERY: u8 = 0x4B;
    /// Master -> slave: answer to OUTCOME_QUERY.
    pub const OUTCOME: u8 = 0x4C;
}

/// Kind of a replicated write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Create or replace.
    Put = 1,
    /// Replace only if present (NotFound otherwise, identically on every replica).
    Update = 2,
    /// Remove (NotFound if absent).
    Delete = 3,
    /// Remove every key (FLUSHDB/FLUSHALL); key and value are empty.
    Clear = 4,
    /// Create or replace with an absolute deadline: the value is the deadline
    /// (u64 unix ms, > 0) followed by the key's value ([`WriteOp::put_expiring`]).
    PutExpiring = 5,
    /// Set the deadline of a key if present: the value is exactly the deadline
    /// (u64 unix ms), 0 for none (PERSIST) ([`WriteOp::expire`]).
    Expire = 6,
}

impl OpKind {
    fn from_u8(byte: u8) -> Option<OpKind> {
        Some(match byte {
            1 => OpKind::Put,
            2 => OpKind::Update,
            3 => OpKind::Delete,
            4 => OpKind::Clear,
            5 => OpKind::PutExpiring,
            6 => OpKind::Expire,
            _ => return None,
        })
    }
}

/// One client write as replicated: deterministic, so every replica computes the same result.
///
/// The key and the value share one buffer (the key first, as on the wire),
/// which the thread recycles (`op_bytes.rs`): no `malloc` or `free` per write
/// on the path every SET takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WriteOp {
    /// What to do.
    pub kind: OpKind,
    /// The key (1..=65535 bytes; empty for Clear), then the value (empty for Delete).
    bytes: OpBytes,
    /// Where the key ends in `bytes`.
    key_len: usize,
}

impl WriteOp {
    /// A write of `kind` to `key` with `value`.
    pub fn new(kind: OpKind, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> WriteOp {
        WriteOp::from_parts(kind, key.as_ref(), &[value.as_ref()])
    }

    /// A write whose value is the concatenation of `value_parts`.
    fn from_parts(kind: OpKind, key: &[u8], value_parts: &[&[u8]]) -> WriteOp {
        let bytes = match value_parts {
            [value] => OpBytes::concat(&[key, value]),
            [a, b] => OpBytes::concat(&[key, a, b]),
            _ => OpBytes::concat(&[&[key][..], value_parts].concat()),
        };
        WriteOp {
            kind,
            bytes,
            key_len: key.len(),
        }
    }

    /// The key (empty for Clear).
    #[inline]
    pub fn key(&self) -> &[u8] {
        &self.bytes.as_slice()[..self.key_len]
    }

    /// The value as replicated (for PutExpiring and Expire, the deadline first).
    #[inline]
    pub fn value(&self) -> &[u8] {
        &self.bytes.as_slice()[self.key_len..]
    }

    /// A PUT of `key` that expires at `deadline_ms` (unix ms, > 0).
    pub fn put_expiring(key: &[u8], value: &[u8], deadline_ms: u64) -> WriteOp {
        debug_assert!(deadline_ms > 0);
        WriteOp::from_parts(
            OpKind::PutExpiring,
            key,
            &[&deadline_ms.to_be_bytes(), value],
        )
    }

    /// Set the deadline of `key` (`None`: remove it), if the key is present.
    pub fn expire(key: &[u8], deadline_ms: Option<u64>) -> WriteOp {
        WriteOp::new(OpKind::Expire, key, deadline_ms.unwrap_or(0).to_be_bytes())
    }

    /// For PutExpiring and Expire, the deadline their value starts with (0: none).
    pub fn deadline_ms(&self) -> u64 {
        match (self.kind, self.value().get(..8)) {
            (OpKind::PutExpiring | OpKind::Expire, Some(bytes)) => {
                u64::from_be_bytes(bytes.try_into().unwrap_or([0; 8]))
            }
            _ => 0,
        }
    }

    /// The value the key takes (a PutExpiring's value after its deadline).
    pub fn stored_value(&self) -> &[u8] {
        match self.kind {
            OpKind::PutExpiring => self.value().get(8..).unwrap_or(&[]),
            _ => self.value(),
        }
    }
}

/// The writes of one transaction, shared between the log, the sends and the apply.
pub type Ops = Arc<[WriteOp]>;

/// A slave's vote on a PREPARE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    /// The PREPARE is durable; the slave will commit if told to.
    Yes,
    /// The slave cannot take part; the reason is for logs and STATS.
    No(String),
}

/// How a registering slave will be brought up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Committed transactions after `from_seq` follow as LOG_ENTRY messages.
    Log {
        /// The slave's last applied sequence number; entries start after it.
        from_seq: u64,
    },
    /// A full snapshot as of `at_seq` follows as SNAPSHOT_CHUNK messages.
    Snapshot {
        /// Commit sequence number the snapshot reflects.
        at_seq: u64,
    },
    /// The slave holds data of another history (or is ahead of the master) and
    /// may not discard it: nothing follows but heartbeats; the slave keeps its data.
    Diverged,
}

/// The master's answer to an OUTCOME_QUERY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not decided yet (or the decision is not durable yet).
    Pending = 0,
    /// Committed.
    Committed = 1,
    /// Aborted (including presumed abort).
    Aborted = 2,
    /// Too old: the master no longer remembers; the slave must resync.
    Unknown = 3,
}

impl Outcome {
    fn from_u8(byte: u8) -> Option<Outcome> {
        Some(match byte {
            0 => Outcome::Pending,
            1 => Outcome::Committed,
            2 => Outcome::Aborted,
            3 => Outcome::Unknown,
            _ => return None,
        })
    }
}

/// One key of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// Commit sequence number that last wrote the key.
    pub version: u64,
    /// The key's deadline (unix ms); 0: none.
    pub deadline_ms: u64,
}

/// A message between master and slave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// Slave -> master handshake.
    Register {
        /// Address clients should use to reach this slave (for STATS and redirects).
        client_addr: String,
        /// Highest commit sequence number the slave has applied.
        last_applied_seq: u64,
        /// History that position belongs to: the history id of the master the slave
        /// last caught up from (0: none, a slave that never caught up).
        history_id: u64,
        /// Peer protocol version the slave speaks.
        protocol_version: u16,
        /// The slave's node id (created once in its data directory; 0: none).
        node_id: u64,
        /// The operator allows replacing the slave's data with a snapshot of
        /// another history (`--resync-discard-data`).
        may_discard_data: bool,
        /// The newest leadership epoch the slave knows (failover through etcd;
        /// 0 without it). A master of an older epoch has been deposed.
        epoch: u64,
    },
    /// Master -> slave handshake reply.
    Registered {
        /// The master's highest released commit sequence number.
        master_seq: u64,
        /// The master's history id (random per master life, never 0).
        history_id: u64,
        /// What follows.
        catch_up: CatchUp,
        /// The master's leadership epoch (0 without etcd). A slave follows a
        /// link only while its epoch is the newest one the slave knows.
        epoch: u64,
    },
    /// Phase one: make these writes durable and vote.
    Prepare {
        /// Commit sequence number (also the transaction id).
        seq: u64,
        /// A COMMIT carried along (0: none): every transaction through this
        /// seq that the slave holds prepared has committed. The slave carries
        /// it out before it takes the PREPARE, exactly as a COMMIT sent just
        /// before it.
        commit_through: u64,
        /// The writes.
        ops: Ops,
    },
    /// A slave's vote.
    Vote {
        /// Transaction voted on.
        seq: u64,
        /// The vote.
        vote: Vote,
        /// An ACK carried along (0: none): the outcome of everything through
        /// this seq is durable here, exactly as an ACK sent just before it.
        ack_through: u64,
    },
    /// Phase two: apply every transaction held prepared through `seq` (cumulative).
    Commit {
        /// Highest transaction to commit; the slave holds it prepared.
        seq: u64,
    },
    /// Phase two: forget transaction `seq`.
    Abort {
        /// Transaction to abort.
        seq: u64,
    },
    /// Slave has applied and persisted every commit through `seq` (cumulative).
    Ack {
        /// Highest sequence applied and durable.
        seq: u64,
    },
    /// Part of a full snapshot.
    SnapshotChunk {
        /// Commit sequence number the snapshot reflects.
        snapshot_seq: u64,
        /// Entries in this chunk.
        entries: Vec<SnapshotEntry>,
        /// Whether this is the final chunk.
        last: bool,
    },
    /// A committed transaction replayed to a slave that is catching up or not a participant.
    LogEntry {
        /// Its commit sequence number.
        seq: u64,
        /// Its writes.
        ops: Ops,
    },
    /// Master: the backlog through `seq` has been sent. Slave: applied through `seq` (echo).
    CaughtUp {
        /// End of the backlog.
        seq: u64,
    },
    /// Liveness, and the slaves' read lease (docs/PROTOCOL.md §9.7).
    ///
    /// The master polls every slave with `poll` set; a slave answers each
    /// poll with its clock in `stamp` and the lease it asks for in
    /// `lease_ms`; the master answers that at once with the same `stamp` and
    /// the lease it grants (0: none). A lease granted from a stamp lasts
    /// until the slave's clock reads `stamp + lease_ms`: it began before the
    /// master sent the grant, so it never outlives what the master allowed.
    Heartbeat {
        /// Sender's position: the master's released seq, the slave's applied seq.
        seq: u64,
        /// Slave: its clock (ms) when it sent this. Master: the stamp of the
        /// slave heartbeat this answers (0 in a poll).
        stamp: u64,
        /// Slave: the read lease it asks for. Master: the lease it grants
        /// from `stamp` (0: none).
        lease_ms: u32,
        /// Master: the slave must answer this one. Slaves never set it.
        poll: bool,
    },
    /// Slave in doubt asks for the outcome of `seq`.
    OutcomeQuery {
        /// Transaction in doubt.
        seq: u64,
    },
    /// Master's answer to OUTCOME_QUERY.
    Outcome {
        /// Transaction asked about.
        seq: u64,
        /// Its outcome.
        outcome: Outcome,
    },
}

/// Why bytes from a peer are not a valid peer message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerError {
    /// The frame itself is broken (bad magic, oversized value, ...).
    Frame(ProtocolError),
    /// The opcode is not a peer message.
    UnknownOpcode(u8),
    /// Peer frames carry no key.
    UnexpectedKey(usize),
    /// A field runs past the end of the payload.
    Truncated {
        /// Field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the payload.
        available: usize,
    },
    /// Bytes remain after the message.
    TrailingBytes(usize),
    /// A tag byte has no meaning.
    BadTag {
        /// Field being read.
        field: &'static str,
        /// The byte found.
        byte: u8,
    },
    /// A text field is not UTF-8.
    BadUtf8(&'static str),
    /// A key is empty, which no write may have.
    EmptyKey,
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::Frame(e) => write!(f, "bad peer frame: {e}"),
            PeerError::UnknownOpcode(op) => write!(f, "unknown peer opcode 0x{op:02x}"),
            PeerError::UnexpectedKey(len) => {
                write!(
                    f,
                    "peer frame carries a {len}-byte key; peer frames have none"
                )
            }
            PeerError::Truncated {
                field,
                needed,
                available,
            } => write!(
                f,
                "peer message truncated reading {field}: needs {needed} bytes, {available} left"
            ),
            PeerError::TrailingBytes(n) => write!(f, "{n} unexpected bytes after peer message"),
            PeerError::BadTag { field, byte } => write!(f, "invalid {field} byte 0x{byte:02x}"),
            PeerError::BadUtf8(field) => write!(f, "{field} is not valid UTF-8"),
            PeerError::EmptyKey => write!(f, "write with an empty key"),
        }
    }
}

impl std::error::Error for PeerError {}

impl From<ProtocolError> for PeerError {
    fn from(e: ProtocolError) -> PeerError {
        PeerError::Frame(e)
    }
}

/// Whether an opcode byte belongs to the peer range.
pub fn is_peer_opcode(byte: u8) -> bool {
    (PEER_OPCODE_FIRST..=PEER_OPCODE_LAST).contains(&byte)
}

/// A cursor over a payload that refuses to read past its end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], PeerError> {
        if self.bytes.len() < n {
            return Err(PeerError::Truncated {
                field,
                needed: n,
                available: self.bytes.len(),
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, PeerError> {
        Ok(self.take(field, 1)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, PeerError> {
        Ok(BigEndian::read_u16(self.take(field, 2)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, PeerError> {
        Ok(BigEndian::read_u32(self.take(field, 4)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, PeerError> {
        Ok(BigEndian::read_u64(self.take(field, 8)?))
    }
    fn string(&mut self, field: &'static str) -> Result<String, PeerError> {
        let len = self.u16(field)? as usize;
        let bytes = self.take(field, len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| PeerError::BadUtf8(field))
    }
    /// A count of items each at least `min_item_bytes` long: bounded by what is present.
    fn count(&mut self, field: &'static str, min_item_bytes: usize) -> Result<usize, PeerError> {
        let count = self.u32(field)? as usize;
        let needed = count.saturating_mul(min_item_bytes);
        if needed > self.bytes.len() {
            return Err(PeerError::Truncated {
                field,
                needed,
                available: self.bytes.len(),
            });
        }
        Ok(count)
    }
    fn finish(self) -> Result<(), PeerError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(PeerError::TrailingBytes(self.bytes.len()))
        }
    }
}

/// Smallest encoded op: kind, key length, value length (a Clear has no key).
const MIN_OP_BYTES: usize = 1 + 2 + 4;
/// Smallest encoded snapshot entry: key length, value length, version, 1-byte key.
const MIN_ENTRY_BYTES: usize = 2 + 4 + 8 + 1;

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_str(out: &mut Vec<u8>, s: &str) {
    // Strings are addresses and reasons; cut rather than fail on absurd lengths.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    put_u16(out, bytes.len() as u16);
    out.extend_from_slice(bytes);
}

/// Encode a transaction's writes (also the write-ahead log's encoding of them).
pub(crate) fn encode_ops(out: &mut Vec<u8>, ops: &[WriteOp]) {
    put_u32(out, ops.len() as u32);
    for op in ops {
        debug_assert!(
            (op.kind == OpKind::Clear) == op.key().is_empty() && op.key().len() <= MAX_KEY_BYTES
        );
        out.push(op.kind as u8);
        put_u16(out, op.key().len() as u16);
        put_u32(out, op.value().len() as u32);
        out.extend_from_slice(op.key());
        out.extend_from_slice(op.value());
    }
}

fn decode_ops(r: &mut Reader<'_>) -> Result<Ops, PeerError> {
    let count = r.count("op count", MIN_OP_BYTES)?;
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        let tag = r.u8("op kind")?;
        let kind = OpKind::from_u8(tag).ok_or(PeerError::BadTag {
            field: "op kind",
            byte: tag,
        })?;
        let key_len = r.u16("op key length")? as usize;
        let value_len = r.u32("op value length")? as usize;
        // Every op names a key except Clear, which names none.
        if (key_len == 0) != (kind == OpKind::Clear) {
            return Err(PeerError::EmptyKey);
        }
        // The deadline kinds carry one at the start of their value: checked
        // here, so an op that decoded always applies as it says.
        let deadline_ok = match kind {
            OpKind::PutExpiring => value_len >= 8,
            OpKind::Expire => value_len == 8,
            _ => true,
        };
        if !deadline_ok {
            return Err(PeerError::BadTag {
                field: "op value length for its kind",
                byte: tag,
            });
        }
        // Taken apart, so that a truncation names the field it cut.
        let key = r.take("op key", key_len)?;
        let value = r.take("op value", value_len)?;
        let op = WriteOp::new(kind, key, value);
        if kind == OpKind::PutExpiring && op.deadline_ms() == 0 {
            return Err(PeerError::BadTag {
                field: "op deadline",
                byte: tag,
            });
        }
        ops.push(op);
    }
    Ok(ops.into())
}

/// Decode writes encoded by [`encode_ops`] that fill `bytes` exactly.
pub(crate) fn decode_ops_exact(bytes: &[u8]) -> Result<Ops, PeerError> {
    let mut r = Reader { bytes };
    let ops = decode_ops(&mut r)?;
    r.finish()?;
    Ok(ops)
}

impl PeerMessage {
    /// The wire opcode of this message.
    pub fn opcode(&self) -> u8 {
        match self {
            PeerMessage::Register { .. } => opcode::REGISTER,
            PeerMessage::Registered { .. } => opcode::REGISTERED,
            PeerMessage::Prepare { .. } => opcode::PREPARE,
            PeerMessage::Vote { .. } => opcode::VOTE,
            PeerMessage::Commit { .. } => opcode::COMMIT,
            PeerMessage::Abort { .. } => opcode::ABORT,
            PeerMessage::Ack { .. } => opcode::ACK,
            PeerMessage::SnapshotChunk { .. } => opcode::SNAPSHOT_CHUNK,
            PeerMessage::LogEntry { .. } => opcode::LOG_ENTRY,
            PeerMessage::CaughtUp { .. } => opcode::CAUGHT_UP,
            PeerMessage::Heartbeat { .. } => opcode::HEARTBEAT,
            PeerMessage::OutcomeQuery { .. } => opcode::OUTCOME_QUERY,
            PeerMessage::Outcome { .. } => opcode::OUTCOME,
        }
    }

    /// The master's periodic heartbeat to a slave, which the slave answers.
    pub fn poll(seq: u64) -> PeerMessage {
        PeerMessage::Heartbeat {
            seq,
            stamp: 0,
            lease_ms: 0,
            poll: true,
        }
    }

    /// The sequence number carried in the header's version field.
    pub fn header_seq(&self) -> u64 {
        match self {
            PeerMessage::Register {
                last_applied_seq, ..
            } => *last_applied_seq,
            PeerMessage::Registered { master_seq, .. } => *master_seq,
            PeerMessage::SnapshotChunk { snapshot_seq, .. } => *snapshot_seq,
            PeerMessage::Prepare { seq, .. }
            | PeerMessage::Vote { seq, .. }
            | PeerMessage::Commit { seq }
            | PeerMessage::Abort { seq }
            | PeerMessage::Ack { seq }
            | PeerMessage::LogEntry { seq, .. }
            | PeerMessage::CaughtUp { seq }
            | PeerMessage::Heartbeat { seq, .. }
            | PeerMessage::OutcomeQuery { seq }
            | PeerMessage::Outcome { seq, .. } => *seq,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            PeerMessage::Register {
                client_addr,
                history_id,
                protocol_version,
                node_id,
                may_discard_data,
                epoch,
                ..
            } => {
                put_u16(out, *protocol_version);
                put_u64(out, *history_id);
                put_u64(out, *node_id);
                out.push(u8::from(*may_discard_data));
                put_u64(out, *epoch);
                put_str(out, client_addr);
            }
            PeerMessage::Registered {
                history_id,
                catch_up,
                epoch,
                ..
            } => {
                put_u64(out, *history_id);
                match catch_up {
                    CatchUp::Log { from_seq } => {
                        out.push(1);
                        put_u64(out, *from_seq);
                    }
                    CatchUp::Snapshot { at_seq } => {
                        out.push(2);
                        put_u64(out, *at_seq);
                    }
                    CatchUp::Diverged => {
                        out.push(3);
                        put_u64(out, 0);
                    }
                }
                put_u64(out, *epoch);
            }
            PeerMessage::Prepare {
                commit_through,
                ops,
                ..
            } => {
                put_u64(out, *commit_through);
                encode_ops(out, ops)
            }
            PeerMessage::LogEntry { ops, .. } => encode_ops(out, ops),
            PeerMessage::Vote {
                vote, ack_through, ..
            } => match vote {
                Vote::Yes => {
                    out.push(1);
                    put_u64(out, *ack_through);
                }
                Vote::No(reason) => {
                    out.push(0);
                    put_u64(out, *ack_through);
                    put_str(out, reason);
                }
            },
            PeerMessage::SnapshotChunk { entries, last, .. } => {
                out.push(u8::from(*last));
                put_u32(out, entries.len() as u32);
                for e in entries {
                    debug_assert!(!e.key.is_empty() && e.key.len() <= MAX_KEY_BYTES);
                    put_u16(out, e.key.len() as u16);
                    let flag = if e.deadline_ms > 0 { DEADLINE_FLAG } else { 0 };
                    put_u32(out, e.value.len() as u32 | flag);
                    put_u64(out, e.version);
                    if e.deadline_ms > 0 {
                        put_u64(out, e.deadline_ms);
                    }
                    out.extend_from_slice(&e.key);
                    out.extend_from_slice(&e.value);
                }
            }
            PeerMessage::Outcome { outcome, .. } => out.push(*outcome as u8),
            PeerMessage::Heartbeat {
                stamp,
                lease_ms,
                poll,
                ..
            } => {
                put_u64(out, *stamp);
                put_u32(out, *lease_ms);
                out.push(u8::from(*poll));
            }
            PeerMessage::Commit { .. }
            | PeerMessage::Abort { .. }
            | PeerMessage::Ack { .. }
            | PeerMessage::CaughtUp { .. }
            | PeerMessage::OutcomeQuery { .. } => {}
        }
    }

    /// Append this message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_in_epoch(out, 0);
    }

    /// Encode with the sender's leadership epoch in the header's request-id
    /// field (failover through etcd, docs/FAILOVER.md), which receivers check
    /// on every message.
    pub fn encode_in_epoch(&self, out: &mut Vec<u8>, epoch: u32) {
        let mut payload = Vec::new();
        self.encode_payload(&mut payload);
        debug_assert!(payload.len() <= u32::MAX as usize);
        frame::encode(
            out,
            self.opcode(),
            0,
            epoch,
            self.header_seq(),
            &[],
            &payload,
        );
    }

    /// Append a SNAPSHOT_CHUNK frame whose `count` entries are already
    /// encoded in `entries`, in `store::snapshot`'s entry encoding, which is
    /// this message's byte for byte: a master streams staged shard bytes
    /// without decoding every entry into owned buffers and encoding it again.
    /// The bytes are those of the equivalent [`PeerMessage::SnapshotChunk`].
    pub fn encode_snapshot_chunk(
        out: &mut Vec<u8>,
        epoch: u32,
        snapshot_seq: u64,
        last: bool,
        count: u32,
        entries: &[u8],
    ) {
        let payload_len = 1 + 4 + entries.len();
        debug_assert!(payload_len <= u32::MAX as usize);
        out.reserve(frame::HEADER_LEN + payload_len);
        frame::Header {
            opcode: opcode::SNAPSHOT_CHUNK,
            status: 0,
            request_id: epoch,
            version: snapshot_seq,
            key_len: 0,
            value_len: payload_len as u32,
        }
        .write(out);
        out.push(u8::from(last));
        put_u32(out, count);
        out.extend_from_slice(entries);
    }

    /// Parse a complete frame as a peer message.
    pub fn from_frame(frame: &Frame<'_>) -> Result<PeerMessage, PeerError> {
        let op = frame.header.opcode;
        if !frame.key.is_empty() {
            return Err(PeerError::UnexpectedKey(frame.key.len()));
        }
        let seq = frame.header.version;
        let mut r = Reader { bytes: frame.value };
        let msg = match op {
            opcode::REGISTER => {
                let protocol_version = r.u16("protocol version")?;
                let history_id = r.u64("history id")?;
                let node_id = r.u64("node id")?;
                let may_discard_data = match r.u8("flags")? {
                    0 => false,
                    1 => true,
                    byte => {
                        return Err(PeerError::BadTag {
                            field: "flags",
                            byte,
                        });
                    }
                };
                let epoch = r.u64("epoch")?;
                let client_addr = r.string("client address")?;
                PeerMessage::Register {
                    client_addr,
                    last_applied_seq: seq,
                    history_id,
                    protocol_version,
                    node_id,
                    may_discard_data,
                    epoch,
                }
            }
            opcode::REGISTERED => {
                let history_id = r.u64("history id")?;
                let tag = r.u8("catch-up kind")?;
                let at = r.u64("catch-up sequence")?;
                let catch_up = match tag {
                    1 => CatchUp::Log { from_seq: at },
                    2 => CatchUp::Snapshot { at_seq: at },
                    3 => CatchUp::Diverged,
                    byte => {
                        return Err(PeerError::BadTag {
                            field: "catch-up kind",
                            byte,
                        });
                    }
                };
                let epoch = r.u64("epoch")?;
                PeerMessage::Registered {
                    master_seq: seq,
                    history_id,
                    catch_up,
                    epoch,
                }
            }
            opcode::PREPARE => {
                let commit_through = r.u64("commit through")?;
                PeerMessage::Prepare {
                    seq,
                    commit_through,
                    ops: decode_ops(&mut r)?,
                }
            }
            opcode::LOG_ENTRY => PeerMessage::LogEntry {
                seq,
                ops: decode_ops(&mut r)?,
            },
            opcode::VOTE => {
                let tag = r.u8("vote")?;
                if tag > 1 {
                    return Err(PeerError::BadTag {
                        field: "vote",
                        byte: tag,
                    });
                }
                let ack_through = r.u64("ack through")?;
                let vote = if tag == 1 {
                    Vote::Yes
                } else {
                    Vote::No(r.string("vote reason")?)
                };
                PeerMessage::Vote {
                    seq,
                    vote,
                    ack_through,
                }
            }
            opcode::COMMIT => PeerMessage::Commit { seq },
            opcode::ABORT => PeerMessage::Abort { seq },
            opcode::ACK => PeerMessage::Ack { seq },
            opcode::CAUGHT_UP => PeerMessage::CaughtUp { seq },
            opcode::HEARTBEAT => {
                let stamp = r.u64("heartbeat stamp")?;
                let lease_ms = r.u32("heartbeat lease")?;
                let poll = match r.u8("heartbeat poll flag")? {
                    0 => false,
                    1 => true,
                    byte => {
                        return Err(PeerError::BadTag {
                            field: "heartbeat poll flag",
                            byte,
                        });
                    }
                };
                PeerMessage::Heartbeat {
                    seq,
                    stamp,
                    lease_ms,
                    poll,
                }
            }
            opcode::OUTCOME_QUERY => PeerMessage::OutcomeQuery { seq },
            opcode::OUTCOME => {
                let byte = r.u8("outcome")?;
                let outcome = Outcome::from_u8(byte).ok_or(PeerError::BadTag {
                    field: "outcome",
                    byte,
                })?;
                PeerMessage::Outcome { seq, outcome }
            }
            opcode::SNAPSHOT_CHUNK => {
                let last = match r.u8("last flag")? {
                    0 => false,
                    1 => true,
                    byte => {
                        return Err(PeerError::BadTag {
                            field: "last flag",
                            byte,
                        });
                    }
                };
                let count = r.count("entry count", MIN_ENTRY_BYTES)?;
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let key_len = r.u16("entry key length")? as usize;
                    let raw_len = r.u32("entry value length")?;
                    let value_len = (raw_len & !DEADLINE_FLAG) as usize;
                    let version = r.u64("entry version")?;
                    let deadline_ms = if raw_len & DEADLINE_FLAG != 0 {
                        match r.u64("entry deadline")? {
                            0 => {
                                return Err(PeerError::BadTag {
                                    field: "entry deadline",
                                    byte: 0,
                                });
                            }
                            d => d,
                        }
                    } else {
                        0
                    };
                    if key_len == 0 {
                        return Err(PeerError::EmptyKey);
                    }
                    let key = r.take("entry key", key_len)?.to_vec();
                    let value = r.take("entry value", value_len)?.to_vec();
                    entries.push(SnapshotEntry {
                        key,
                        value,
                        version,
                        deadline_ms,
                    });
                }
                PeerMessage::SnapshotChunk {
                    snapshot_seq: seq,
                    entries,
                    last,
                }
            }
            other => return Err(PeerError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Decode the peer message at the start of a stream buffer.
///
/// `Ok(None)` means more bytes are needed; `Ok(Some((msg, used)))` consumed `used` bytes.
/// Any error means the link is broken and must be closed (a peer never sends garbage).
pub fn decode_peer(
    buf: &[u8],
    max_value_bytes: usize,
) -> Result<Option<(PeerMessage, usize)>, PeerError> {
    match frame::decode(buf, max_value_bytes)? {
        Decoded::Incomplete(_) => Ok(None),
        Decoded::Frame(f, used) => Ok(Some((PeerMessage::from_frame(&f)?, used))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_chunk_from_staged_entry_bytes_is_the_message_byte_for_byte() {
        let entries = vec![
            SnapshotEntry {
                key: b"a".to_vec(),
                value: b"one".to_vec(),
                version: 7,
                deadline_ms: 0,
            },
            SnapshotEntry {
                key: b"bb".to_vec(),
                value: Vec::new(),
                version: 9,
                deadline_ms: 1_700_000_000_123,
            },
        ];
        let mut staged = Vec::new();
        for e in &entries {
            crate::store::snapshot::encode_entry(
                &mut staged,
                &e.key,
                &e.value,
                e.version,
                e.deadline_ms,
            );
        }
        for last in [false, true] {
            let message = PeerMessage::SnapshotChunk {
                snapshot_seq: 42,
                entries: entries.clone(),
                last,
            };
            let mut want = Vec::new();
            message.encode_in_epoch(&mut want, 3);
            let mut got = Vec::new();
            PeerMessage::encode_snapshot_chunk(&mut got, 3, 42, last, 2, &staged);
            assert_eq!(got, want);
            let (decoded, used) = decode_peer(&got, usize::MAX)
                .expect("decodes")
                .expect("whole");
            assert_eq!((decoded, used), (message, got.len()));
        }
    }

    #[test]
    fn a_write_op_keeps_its_key_and_value_apart_in_one_buffer() {
        let op = WriteOp::new(OpKind::Put, b"key", b"value");
        assert_eq!((op.key(), op.value()), (&b"key"[..], &b"value"[..]));
        assert_eq!(op.stored_value(), b"value");
        let clear = WriteOp::new(OpKind::Clear, b"", b"");
        assert_eq!((clear.key(), clear.value()), (&b""[..], &b""[..]));
        let delete = WriteOp::new(OpKind::Delete, b"k", b"");
        assert_eq!((delete.key(), delete.value()), (&b"k"[..], &b""[..]));
        // Equal ops are equal whatever built them; a different split is a different op.
        assert_eq!(op, WriteOp::new(OpKind::Put, String::from("key"), "value"));
        assert_ne!(op, WriteOp::new(OpKind::Put, b"keyv", b"alue"));
        let expiring = WriteOp::put_expiring(b"k", b"v", 7);
        assert_eq!(expiring.key(), b"k");
        assert_eq!(expiring.deadline_ms(), 7);
        assert_eq!(expiring.stored_value(), b"v");
        assert_eq!(&expiring.value()[..8], &7u64.to_be_bytes());
        let expire = WriteOp::expire(b"k", None);
        assert_eq!((expire.key(), expire.deadline_ms()), (&b"k"[..], 0));
        // Through the wire the split survives.
        let mut out = Vec::new();
        let ops = [op.clone(), clear, delete, expiring, expire];
        encode_ops(&mut out, &ops);
        assert_eq!(&decode_ops_exact(&out).expect("decodes")[..], &ops[..]);
    }
    use crate::protocol::{DEFAULT_MAX_VALUE_BYTES, HEADER_LEN};

    const MAX: usize = DEFAULT_MAX_VALUE_BYTES;

    fn ops() -> Ops {
        vec![
            WriteOp::new(OpKind::Put, b"k1", b"v1"),
            WriteOp::new(OpKind::Update, b"k2", b""),
            WriteOp::new(OpKind::Delete, vec![0xFF; 300], b""),
            WriteOp::new(OpKind::Clear, b"", b""),
        ]
        .into()
    }

    fn all_messages() -> Vec<PeerMessage> {
        vec![
            PeerMessage::Register {
                client_addr: "127.0.0.1:9100".into(),
                last_applied_seq: 42,
                history_id: 0x0123_4567_89AB_CDEF,
                protocol_version: PEER_PROTOCOL_VERSION,
                node_id: 0x1122_3344_5566_7788,
                may_discard_data: true,
                epoch: 0,
            },
            PeerMessage::Register {
                client_addr: String::new(),
                last_applied_seq: 0,
                history_id: 0,
                protocol_version: PEER_PROTOCOL_VERSION,
                node_id: 0,
                may_discard_data: false,
                epoch: 0,
            },
            PeerMessage::Registered {
                master_seq: 50,
                history_id: 0x0123_4567_89AB_CDEF,
                catch_up: CatchUp::Log { from_seq: 42 },
                epoch: 0,
            },
            PeerMessage::Registered {
                master_seq: 50,
                history_id: u64::MAX,
                catch_up: CatchUp::Snapshot { at_seq: 49 },
                epoch: 0,
            },
            PeerMessage::Prepare {
                seq: 7,
                commit_through: 0,
                ops: ops(),
            },
            PeerMessage::Prepare {
                seq: 8,
                commit_through: 6,
                ops: Vec::new().into(),
            },
            PeerMessage::Vote {
                seq: 7,
                vote: Vote::Yes,
                ack_through: 0,
            },
            PeerMessage::Vote {
                seq: 8,
                vote: Vote::Yes,
                ack_through: 6,
            },
            PeerMessage::Vote {
                seq: 7,
                vote: Vote::No("disk full".into()),
                ack_through: 5,
            },
            PeerMessage::Commit { seq: 7 },
            PeerMessage::Abort { seq: 8 },
            PeerMessage::Ack { seq: 7 },
            PeerMessage::SnapshotChunk {
                snapshot_seq: 99,
                entries: vec![
                    SnapshotEntry {
                        key: b"a".to_vec(),
                        value: b"1".to_vec(),
                        version: 3,
                        deadline_ms: 0,
                    },
                    SnapshotEntry {
                        key: b"b".to_vec(),
                        value: Vec::new(),
                        version: 99,
                        deadline_ms: 1_700_000_000_000,
                    },
                ],
                last: false,
            },
            PeerMessage::SnapshotChunk {
                snapshot_seq: 99,
                entries: Vec::new(),
                last: true,
            },
            PeerMessage::LogEntry {
                seq: u64::MAX,
                ops: ops(),
            },
            PeerMessage::CaughtUp { seq: 12 },
            PeerMessage::Heartbeat {
                seq: 13,
                stamp: 0,
                lease_ms: 0,
                poll: true,
            },
            PeerMessage::Heartbeat {
                seq: 13,
                stamp: 1_234,
                lease_ms: 200,
                poll: false,
            },
            PeerMessage::OutcomeQuery { seq: 14 },
            PeerMessage::Outcome {
                seq: 14,
                outcome: Outcome::Committed,
            },
            PeerMessage::Outcome {
                seq: 15,
                outcome: Outcome::Unknown,
            },
        ]
    }

    fn encoded(msg: &PeerMessage) -> Vec<u8> {
        let mut out = Vec::new();
        msg.encode(&mut out);
        out
    }

    #[test]
    fn every_message_round_trips() {
        for msg in all_messages() {
            let bytes = encoded(&msg);
            assert!(is_peer_opcode(bytes[2]));
            let (decoded, used) = decode_peer(&bytes, MAX)
                .unwrap_or_else(|e| panic!("{msg:?}: {e}"))
                .unwrap_or_else(|| panic!("{msg:?}: incomplete"));
            assert_eq!(used, bytes.len());
            assert_eq!(decoded, msg);
        }
    }

    #[test]
    fn stream_of_messages_decodes_one_at_a_time() {
        let msgs = all_messages();
        let mut buf = Vec::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((m, used)) = decode_peer(&buf[at..], MAX).expect("valid stream") {
            got.push(m);
            at += used;
        }
        assert_eq!(at, buf.len());
        assert_eq!(got, msgs);
    }

    #[test]
    fn every_truncation_is_incomplete_or_an_error_never_a_panic() {
        for msg in all_messages() {
            let bytes = encoded(&msg);
            for cut in 0..bytes.len() {
                assert_eq!(
                    decode_peer(&bytes[..cut], MAX),
                    Ok(None),
                    "{msg:?} cut {cut}"
                );
            }
        }
    }

    /// Rewrite the frame's value length so the frame ends early: the payload is short.
    fn shorten_payload(bytes: &[u8], drop: usize) -> Vec<u8> {
        let mut out = bytes[..bytes.len() - drop].to_vec();
        let value_len = BigEndian::read_u32(&out[20..24]) as usize - drop;
        BigEndian::write_u32(&mut out[20..24], value_len as u32);
        out
    }

    #[test]
    fn short_payloads_are_truncation_errors() {
        for msg in all_messages() {
            let bytes = encoded(&msg);
            let payload = bytes.len() - HEADER_LEN;
            for drop in 1..=payload {
                let short = shorten_payload(&bytes, drop);
                match decode_peer(&short, MAX) {
                    Err(PeerError::Truncated { .. }) => {}
                    // Dropping a whole trailing element can leave a shorter valid message
                    // only if a count says so; counts are before elements, so it cannot.
                    other => panic!("{msg:?} minus {drop}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn counts_beyond_the_payload_are_rejected_before_allocating() {
        let mut payload = Vec::new();
        put_u64(&mut payload, 0); // commit through
        put_u32(&mut payload, u32::MAX); // four billion ops announced, none present
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::PREPARE, 0, 0, 1, &[], &payload);
        assert!(matches!(
            decode_peer(&bytes, MAX),
            Err(PeerError::Truncated {
                field: "op count",
                ..
            })
        ));

        let mut payload = vec![0u8];
        put_u32(&mut payload, 1_000_000);
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::SNAPSHOT_CHUNK, 0, 0, 1, &[], &payload);
        assert!(matches!(
            decode_peer(&bytes, MAX),
            Err(PeerError::Truncated {
                field: "entry count",
                ..
            })
        ));
    }

    #[test]
    fn key_length_beyond_payload_is_rejected() {
        let mut payload = Vec::new();
        put_u32(&mut payload, 1);
        payload.push(OpKind::Put as u8);
        put_u16(&mut payload, 60_000);
        put_u32(&mut payload, 0);
        payload.extend_from_slice(b"short");
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::LOG_ENTRY, 0, 0, 1, &[], &payload);
        assert!(matches!(
            decode_peer(&bytes, MAX),
            Err(PeerError::Truncated {
                field: "op key",
                ..
            })
        ));
    }

    #[test]
    fn bad_tags_and_unknown_opcodes_are_typed_errors() {
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, 0x7E, 0, 0, 0, &[], &[]);
        assert_eq!(
            decode_peer(&bytes, MAX),
            Err(PeerError::UnknownOpcode(0x7E))
        );

        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::VOTE, 0, 0, 1, &[], &[7]);
        assert_eq!(
            decode_peer(&bytes, MAX),
            Err(PeerError::BadTag {
                field: "vote",
                byte: 7
            })
        );

        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::OUTCOME, 0, 0, 1, &[], &[9]);
        assert!(matches!(
            decode_peer(&bytes, MAX),
            Err(PeerError::BadTag { .. })
        ));

        let mut payload = Vec::new();
        put_u64(&mut payload, 0);
        put_u32(&mut payload, 1);
        payload.extend_from_slice(&[9, 0, 1, 0, 0, 0, 0, b'k']);
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::PREPARE, 0, 0, 1, &[], &payload);
        assert!(matches!(
            decode_peer(&bytes, MAX),
            Err(PeerError::BadTag {
                field: "op kind",
                ..
            })
        ));
    }

    #[test]
    fn trailing_bytes_key_empty_keys_and_bad_utf8_are_rejected() {
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::COMMIT, 0, 0, 1, &[], &[0]);
        assert_eq!(decode_peer(&bytes, MAX), Err(PeerError::TrailingBytes(1)));

        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::COMMIT, 0, 0, 1, b"key", &[]);
        assert_eq!(decode_peer(&bytes, MAX), Err(PeerError::UnexpectedKey(3)));

        let mut payload = Vec::new();
        put_u64(&mut payload, 0);
        put_u32(&mut payload, 1);
        payload.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, b'x']);
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::PREPARE, 0, 0, 1, &[], &payload);
        assert_eq!(decode_peer(&bytes, MAX), Err(PeerError::EmptyKey));

        let mut payload = Vec::new();
        put_u16(&mut payload, PEER_PROTOCOL_VERSION);
        put_u64(&mut payload, 7);
        put_u64(&mut payload, 8);
        payload.push(0);
        put_u64(&mut payload, 0);
        put_u16(&mut payload, 2);
        payload.extend_from_slice(&[0xC3, 0x28]);
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::REGISTER, 0, 0, 1, &[], &payload);
        assert_eq!(
            decode_peer(&bytes, MAX),
            Err(PeerError::BadUtf8("client address"))
        );
    }

    #[test]
    fn register_and_registered_carry_the_history_id_and_epoch_at_fixed_offsets() {
        let register = encoded(&PeerMessage::Register {
            client_addr: "127.0.0.1:9100".into(),
            last_applied_seq: 42,
            history_id: 0x0123_4567_89AB_CDEF,
            protocol_version: PEER_PROTOCOL_VERSION,
            node_id: 0,
            may_discard_data: false,
            epoch: 0x0A0B,
        });
        let mut want = vec![0xDB, 0x01, 0x40, 0, 0, 0, 0, 0];
        want.extend_from_slice(&42u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 43]);
        want.extend_from_slice(&PEER_PROTOCOL_VERSION.to_be_bytes());
        want.extend_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]);
        want.extend_from_slice(&[0; 8]);
        want.push(0);
        want.extend_from_slice(&0x0A0Bu64.to_be_bytes());
        want.extend_from_slice(&[0, 14]);
        want.extend_from_slice(b"127.0.0.1:9100");
        assert_eq!(register, want);

        let registered = encoded(&PeerMessage::Registered {
            master_seq: 50,
            history_id: 0x0123_4567_89AB_CDEF,
            catch_up: CatchUp::Log { from_seq: 42 },
            epoch: 7,
        });
        let mut want = vec![0xDB, 0x01, 0x41, 0, 0, 0, 0, 0];
        want.extend_from_slice(&50u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 25]);
        want.extend_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF, 1]);
        want.extend_from_slice(&42u64.to_be_bytes());
        want.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(registered, want);
    }

    /// The example bytes of docs/PROTOCOL.md §9.12.
    #[test]
    fn prepare_and_vote_carry_commit_and_ack_as_documented() {
        let hex = |s: &str| -> Vec<u8> {
            s.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).expect("hex"))
                .collect()
        };
        let prepare = PeerMessage::Prepare {
            seq: 7,
            commit_through: 6,
            ops: vec![WriteOp::new(OpKind::Put, b"foo", b"bar")].into(),
        };
        let want = hex(
            "DB 01 42 00 00 00 00 00 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 19 \
             00 00 00 00 00 00 00 06 00 00 00 01 01 00 03 00 00 00 03 66 6F 6F 62 61 72",
        );
        assert_eq!(encoded(&prepare), want);
        assert_eq!(decode_peer(&want, MAX), Ok(Some((prepare, want.len()))));
        let vote = PeerMessage::Vote {
            seq: 7,
            vote: Vote::Yes,
            ack_through: 6,
        };
        let want = hex(
            "DB 01 43 00 00 00 00 00 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 09 \
             01 00 00 00 00 00 00 00 06",
        );
        assert_eq!(encoded(&vote), want);
        assert_eq!(decode_peer(&want, MAX), Ok(Some((vote, want.len()))));
    }

    #[test]
    fn a_cut_history_id_is_a_truncation_error() {
        // REGISTER: version, then only 5 of the history id's 8 bytes.
        let mut payload = Vec::new();
        put_u16(&mut payload, PEER_PROTOCOL_VERSION);
        payload.extend_from_slice(&[1, 2, 3, 4, 5]);
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::REGISTER, 0, 0, 9, &[], &payload);
        assert_eq!(
            decode_peer(&bytes, MAX),
            Err(PeerError::Truncated {
                field: "history id",
                needed: 8,
                available: 5
            })
        );
        // REGISTERED: 7 of the history id's 8 bytes (a version 1 payload is 9 bytes,
        // so it fails further on, reading the catch-up sequence).
        let mut bytes = Vec::new();
        frame::encode(&mut bytes, opcode::REGISTERED, 0, 0, 9, &[], &[0; 7]);
        assert_eq!(
            decode_peer(&bytes, MAX),
            Err(PeerError::Truncated {
                field: "history id",
                needed: 8,
                available: 7
            })
        );
    }

    #[test]
    fn frame_errors_pass_through() {
        let mut bytes = encoded(&PeerMessage::Ack { seq: 1 });
        bytes[0] = 0x00;
        assert!(matches!(
            decode_peer(&bytes, MAX),
            Err(PeerError::Frame(ProtocolError::BadMagic(0)))
        ));
        let bytes = encoded(&PeerMessage::Prepare {
            seq: 1,
            commit_through: 0,
            ops: ops(),
        });
        assert!(matches!(
            decode_peer(&bytes, 4),
            Err(PeerError::Frame(ProtocolError::ValueTooLarge { .. }))
        ));
    }

    #[test]
    fn random_bytes_never_panic_the_peer_decoder() {
        use rand::{RngExt, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(0x9EE7);
        let valid: Vec<Vec<u8>> = all_messages().iter().map(encoded).collect();
        for _ in 0..20_000 {
            let mut bytes = valid[rng.random_range(0..valid.len())].clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            let _ = decode_peer(&bytes, MAX);
        }
    }
}

#[cfg(test)]
mod expiry_op_tests {
    use super::*;

    fn encoded(ops: &[WriteOp]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_ops(&mut out, ops);
        out
    }

    #[test]
    fn deadline_ops_round_trip() {
        let ops = vec![
            WriteOp::put_expiring(b"k", b"value", 1_700_000_000_123),
            WriteOp::expire(b"k", Some(5)),
            WriteOp::expire(b"k", None),
        ];
        let bytes = encoded(&ops);
        // PUT_EXPIRING: kind 5, key length 1, value length 8 + 5, the deadline first.
        assert_eq!(&bytes[4..11], &[5, 0, 1, 0, 0, 0, 13]);
        assert_eq!(&bytes[12..20], &1_700_000_000_123u64.to_be_bytes());
        let decoded = decode_ops_exact(&bytes).expect("decodes");
        assert_eq!(&decoded[..], &ops[..]);
        assert_eq!(decoded[0].deadline_ms(), 1_700_000_000_123);
        assert_eq!(decoded[0].stored_value(), b"value");
        assert_eq!((decoded[1].deadline_ms(), decoded[2].deadline_ms()), (5, 0));
    }

    #[test]
    fn deadline_ops_with_the_wrong_length_or_a_zero_deadline_are_refused() {
        let bad = [
            WriteOp::new(OpKind::PutExpiring, b"k", vec![0; 7]),
            WriteOp::new(OpKind::PutExpiring, b"k", vec![0; 8]),
            WriteOp::new(OpKind::Expire, b"k", vec![0; 9]),
        ];
        for op in bad {
            let bytes = encoded(std::slice::from_ref(&op));
            assert!(
                matches!(decode_ops_exact(&bytes), Err(PeerError::BadTag { .. })),
                "{op:?}"
            );
        }
    }
}
