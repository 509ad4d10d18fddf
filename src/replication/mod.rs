//! Master/slave replication with two-phase commit, as pure state machines.
//!
//! The [`Coordinator`] (master) and [`Participant`] (slave) never touch a
//! socket, a clock or a disk. The reactor feeds them [`Event`]s together with
//! the current time in milliseconds, then drains [`Action`]s with
//! `poll_action` and executes them in order. Executing actions *in order*
//! matters: an `Apply` must reach the store before a later `StartSnapshot` or
//! `Persist` that refers to the store's contents.
//!
//! The protocol in one paragraph: the master gives every transaction (a batch
//! of client writes) the next commit sequence number, sends PREPARE to every
//! in-sync slave over FIFO links, and each slave makes the PREPARE durable
//! before voting YES. The master decides strictly in sequence order, makes the
//! decision durable, then applies, replies to the clients and sends
//! COMMIT/ABORT (a COMMIT rides on the next PREPARE to that slave if one
//! follows within `CoordinatorConfig::commit_delay_ms`, and its ACK on the
//! slave's next vote). Writes are deterministic (an UPDATE of an absent key is
//! NOT_FOUND on every replica), so preparing needs no locks and the master's
//! apply result is the client's answer. A slave that does not vote or ack in
//! time, or whose link drops, is evicted and rejoins by catching up (log
//! replay or snapshot) before it becomes a participant again.

mod coordinator;
mod log;
mod membership;
mod participant;
mod sync_set;

#[cfg(test)]
mod sim;

pub use coordinator::{BACKLOG_LOW_WATER_BYTES, Coordinator, CoordinatorConfig, TxnState};
pub use log::{CommitLog, PIN_FLOOR_BYTES, PIN_SLACK};
pub use membership::{Membership, SlaveInfo, SlaveState};
pub use participant::{LinkState, Participant, ParticipantConfig};
pub use sync_set::RecordedSet;

pub use crate::protocol::peer::{
    CatchUp, OpKind, Ops, Outcome, PeerMessage, SnapshotEntry, Vote, WriteOp,
};

use std::fmt;

/// One peer link as the reactor names it. A reconnect gets a new id, so stale
/// messages of an old link can never be mistaken for the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u64);

/// An opaque handle for one pending client write; the reactor maps it to a connection and request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientRef(pub u64);

/// Timers the state machines ask for. Setting a timer that is already set moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerId {
    /// Master: the vote or ack deadline of transaction `seq`.
    Txn(u64),
    /// Master: send heartbeats and evict silent slaves.
    Heartbeat,
    /// Slave: try to reach the master again.
    Reconnect,
    /// Slave: ask the master about transactions in doubt for too long.
    OutcomeCheck,
    /// Slave: check that the master is still heard from (it heartbeats), so a
    /// master that stopped answering with its link open is noticed.
    MasterSilence,
    /// Master: the read lease of a slave that left has run out; releases
    /// held back until then may go on.
    ReadFence,
    /// Master: a slave's snapshot was outrun by the log; send it a new one
    /// once the backoff is over (heartbeating it meanwhile).
    SnapshotRetry(PeerId),
    /// Master: send, alone, the COMMITs no PREPARE carried in time.
    CommitFlush,
}

/// One client write handed to the coordinator, with the handle its reply goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientWrite {
    /// Where the reply goes.
    pub client: ClientRef,
    /// The write.
    pub op: WriteOp,
    /// The master's store hash of the write's key (`Store::key_hash`), made
    /// once when the write was submitted and handed back with
    /// [`Action::Apply`], so the key is not hashed again to apply it. Opaque
    /// to replication; never sent to a slave, which hashes what it receives.
    pub key_hash: u64,
}

/// A deterministic stand-in for the store's key hash in the simulations and
/// tests: any function of the key shows whether a hash travels with its op.
#[cfg(test)]
pub(crate) fn test_key_hash(key: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one(key)
}

/// Check the key hashes of an [`Action::Apply`] made with [`test_key_hash`]:
/// none, or one per op, each its op's.
#[cfg(test)]
pub(crate) fn check_key_hashes(
    seq: u64,
    ops: &[WriteOp],
    key_hashes: &[u64],
) -> Result<(), String> {
    if key_hashes.is_empty() {
        return Ok(());
    }
    if key_hashes.len() != ops.len() {
        return Err(format!(
            "commit {seq}: {} key hashes for {} ops",
            key_hashes.len(),
            ops.len()
        ));
    }
    match ops
        .iter()
        .zip(key_hashes)
        .position(|(op, &h)| h != test_key_hash(op.key()))
    {
        Some(i) => Err(format!(
            "commit {seq}: op {i} applies with another op's key hash"
        )),
        None => Ok(()),
    }
}

/// A record the write-ahead log must make durable (completion: [`Event::Persisted`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Master: transaction `seq` commits with these writes (the master's redo record).
    CommitDecision {
        /// Commit sequence number.
        seq: u64,
        /// The writes.
        ops: Ops,
    },
    /// Transaction `seq` aborted. On a master it keeps decisions durable in
    /// sequence order (presumed abort would do without it); on a slave it is
    /// what a failover must know: a promoted slave commits every transaction it
    /// prepared unless it recorded its abort.
    AbortDecision {
        /// Commit sequence number.
        seq: u64,
    },
    /// Slave: a PREPARE made durable before voting YES.
    Prepared {
        /// Commit sequence number.
        seq: u64,
        /// The writes.
        ops: Ops,
    },
    /// Slave: the prepared transaction `seq` committed.
    Committed {
        /// Commit sequence number.
        seq: u64,
    },
    /// Slave: a committed transaction received during catch-up (prepare and commit at once).
    CommittedTxn {
        /// Commit sequence number.
        seq: u64,
        /// The writes.
        ops: Ops,
    },
    /// Slave: the store was replaced by a snapshot as of `seq` of history
    /// `history_id`; persist the store's current contents (a checkpoint),
    /// which supersedes every earlier record.
    Checkpoint {
        /// Commit sequence number the store now reflects.
        seq: u64,
        /// The history the snapshot belongs to.
        history_id: u64,
    },
    /// The store's position now belongs to history `history_id` (a master's
    /// first start, or a slave adopting its master's history on log catch-up).
    History {
        /// The history id.
        history_id: u64,
    },
}

/// Why a client write was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The master refused it up front (too few slaves in sync, too many in flight).
    Unavailable(String),
    /// The transaction was aborted; nothing was applied anywhere.
    Aborted(String),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Unavailable(why) => write!(f, "write refused: {why}"),
            WriteError::Aborted(why) => write!(f, "write aborted: {why}"),
        }
    }
}

/// Something that happened, fed to a state machine with the current time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Master: writes that arrived in one reactor iteration; they become one transaction.
    ClientWrites {
        /// The writes, each with its reply handle.
        writes: Vec<ClientWrite>,
    },
    /// Slave: the link to the master requested by [`Action::Connect`] is up.
    Connected {
        /// The new link.
        peer: PeerId,
    },
    /// Slave: the connection attempt requested by [`Action::Connect`] failed.
    ConnectFailed,
    /// A peer message arrived on a link.
    Message {
        /// The link.
        peer: PeerId,
        /// The decoded message.
        msg: PeerMessage,
    },
    /// A link closed (either side, or a decode error). On a slave this is "master lost".
    PeerLost {
        /// The link.
        peer: PeerId,
    },
    /// Every record up to and including `lsn` is durable.
    Persisted {
        /// Highest durable log sequence number.
        lsn: u64,
    },
    /// A timer set with [`Action::SetTimer`] expired.
    TimerFired {
        /// Which timer.
        timer: TimerId,
    },
    /// Master: the in-sync set asked for by [`Action::RecordSyncSet`] `version` is recorded.
    SyncSetRecorded {
        /// The version echoed.
        version: u64,
    },
    /// Master: the reactor has queued the last chunk of the snapshot started by
    /// [`Action::StartSnapshot`] on the peer's link.
    SnapshotSent {
        /// The link.
        peer: PeerId,
        /// The snapshot's sequence number, echoed.
        at_seq: u64,
    },
    /// Master: the link of `peer` has less than [`BACKLOG_LOW_WATER_BYTES`]
    /// queued and streams no snapshot. Reported at most once per reactor turn,
    /// and only for the slaves [`Coordinator::backlog_peers`] names: each
    /// report gets the next bounded step of that slave's backlog queued.
    PeerDrained {
        /// The link.
        peer: PeerId,
    },
    /// Master: the link of `peer` was given, for the [`Action::StartSnapshot`]
    /// just executed, the snapshot at `at_seq` (older than the one asked
    /// for) that is already streaming to other slaves: one copy serves them
    /// all. The slave catches up from `at_seq`, which the commit log covered.
    SnapshotJoined {
        /// The link.
        peer: PeerId,
        /// The shared snapshot's sequence number.
        at_seq: u64,
    },
    /// Master: the link of `peer`, streaming the snapshot started by
    /// [`Action::StartSnapshot`], wrote some of it to its socket, and this far
    /// it has been streamed. A slave sends nothing while it receives a
    /// snapshot, so this is how the master tells a slow receiver from one that
    /// drains nothing (stopped, or cut off), which it evicts after
    /// `peer_timeout_ms`; and the write throttle follows the progress.
    SnapshotProgress {
        /// The link.
        peer: PeerId,
        /// The snapshot's sequence number, echoed.
        at_seq: u64,
        /// Thousandths of the store streamed (0 to 1000).
        done_per_mille: u64,
    },
}

/// Something the reactor must do. Execute in the order they are polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Encode `msg` and queue it on the link (FIFO per link).
    Send {
        /// The link.
        peer: PeerId,
        /// The message.
        msg: PeerMessage,
    },
    /// Close the link (eviction or protocol violation). A later `PeerLost` for it is harmless.
    Disconnect {
        /// The link.
        peer: PeerId,
    },
    /// Slave: open a link to the master; report `Connected` or `ConnectFailed`
    /// (also when the attempt is still unanswered after the reactor's connect
    /// timeout: a dropped SYN must not wait for the kernel's retransmissions).
    Connect,
    /// Append `record` to the write-ahead log; report `Persisted` once it (and all
    /// before it) is durable. `lsn`s are consecutive from 1 per state machine.
    Persist {
        /// Log sequence number of this record.
        lsn: u64,
        /// The record.
        record: Record,
    },
    /// Apply the writes of committed transaction `seq` to the store, in order,
    /// giving every written key version `seq`. On the master, `replies[i]` gets
    /// the result of `ops[i]` (OK with version `seq`, or NOT_FOUND).
    Apply {
        /// Commit sequence number.
        seq: u64,
        /// The writes.
        ops: Ops,
        /// Reply handles, one per op; empty on a slave.
        replies: Vec<ClientRef>,
        /// The [`ClientWrite::key_hash`]es, one per op, when the writes came
        /// from this master's clients; empty otherwise (a slave, or writes a
        /// promoted master recovered): then the store hashes the keys.
        key_hashes: Vec<u64>,
    },
    /// Tell a client its write failed.
    Reply {
        /// The client.
        client: ClientRef,
        /// Why.
        error: WriteError,
    },
    /// Arm (or move) a timer to fire at `at_ms`.
    SetTimer {
        /// Which timer.
        timer: TimerId,
        /// Absolute deadline in the caller's millisecond clock.
        at_ms: u64,
    },
    /// Disarm a timer; firing it anyway is harmless.
    CancelTimer {
        /// Which timer.
        timer: TimerId,
    },
    /// Master: stream the store, exactly as it is now (it reflects every commit
    /// through `at_seq`), to `peer` as SNAPSHOT_CHUNK messages of bounded size
    /// without blocking the loop; later commits must not leak into it (copy or
    /// copy-on-write). Then report `SnapshotSent`.
    StartSnapshot {
        /// The link.
        peer: PeerId,
        /// Sequence number the snapshot reflects.
        at_seq: u64,
    },
    /// Master (failover): record this in-sync set (node ids) in the
    /// coordination store, conditional on still being the leader; report
    /// `SyncSetRecorded` once it is. Until then no transaction is decided
    /// without a slave that left the set.
    RecordSyncSet {
        /// Echoed in the completion.
        version: u64,
        /// Node ids of the slaves in sync.
        members: Vec<u64>,
    },
    /// Slave: install snapshot entries. `begin`: start a fresh staging copy;
    /// `end`: atomically replace the store with it (reads never see a half snapshot).
    InstallSnapshot {
        /// Sequence number the snapshot reflects.
        at_seq: u64,
        /// Entries of this chunk.
        entries: Vec<SnapshotEntry>,
        /// First chunk of this snapshot.
        begin: bool,
        /// Last chunk of this snapshot.
        end: bool,
    },
}
