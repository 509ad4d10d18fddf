//! The master side of two-phase commit: a pure state machine.
//!
//! Every transaction gets the next commit sequence number when it is created.
//! Decisions are taken strictly in sequence order and released (applied,
//! replied, sent) strictly in sequence order once durable, so every replica
//! sees the same commit order and a slave can apply whatever it is told the
//! moment it is told.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use log::{debug, info, warn};

use super::log::{CommitLog, PIN_FULL};
use super::membership::{Membership, SlaveState};
use super::sync_set::RecordedSet;
use super::{
    Action, CatchUp, ClientRef, ClientWrite, Event, Ops, Outcome, PeerId, PeerMessage, Record,
    TimerId, Vote, WriteError,
};
use crate::protocol::peer::PEER_PROTOCOL_VERSION;

/// REGISTERs a coordinator keeps waiting at most (one per link; more are refused).
const MAX_HELD_REGISTERS: usize = 64;

// Snapshots finish under sustained writes (docs/PROTOCOL.md §9.5).
//
// A slave that needs a snapshot gets the store as of `at_seq`, streamed a
// bounded part per reactor turn, then every commit released meanwhile from
// the commit log. Writes go on while it streams, so three things together
// make sure the log still holds those commits when the last chunk is queued:
//
// 1. The log is pinned at `at_seq` (`pin_log`): it keeps every later commit
//    past its bounds, up to `PIN_SLACK` times them and at least
//    `PIN_FLOOR_BYTES` (64 MiB), the memory a joining slave may cost.
// 2. Past a quarter of that the writes are paced to the snapshot's progress
//    (`write_hold`): the log may fill to 1/4 + 1/2 x (fraction streamed) of
//    its pinned bounds, so it reaches 3/4 only as the stream ends (the last
//    quarter is room for the batch admitted last). A batch that would start
//    beyond that waits in the reactor, whose clients then stop being read
//    (the batch is bounded), for the stream to move on, but at most
//    `write_hold_max_ms` (doubled after each restart, at most 4 times): a
//    write is delayed, never refused. A stream that made no progress for
//    `SNAPSHOT_STALL_MS` (a slave not reading) throttles nothing: the pin
//    gives way instead and the master's writes go on at full speed.
// 3. If the log wrapped anyway (a stalled or very slow slave, or writes
//    faster than the hold bound lets the throttle slow them), the snapshot
//    is restarted after a backoff (`snapshot_retry_min_ms`, doubling to
//    `snapshot_retry_max_ms`), during which the slave is heartbeaten, so
//    that a slave that cannot keep up does not keep the master streaming
//    snapshots back to back.
//
// The backlog itself then goes a bounded step per drain of the link
// (`backlog_step`), as does the backlog of a log replay, with the log pinned
// at the last commit sent; a slave whose backlog the log no longer holds
// (the pin gave way) is evicted, and gets a snapshot when it registers again.

/// A snapshot stream that reported no progress for this long throttles no
/// writes: its slave is not reading. Long enough for a slave that is only
/// descheduled or busy installing a chunk on a loaded machine.
const SNAPSHOT_STALL_MS: u64 = 3_000;
/// Restarts after which the hold bound stops doubling (4 x `write_hold_max_ms`).
const HOLD_DOUBLINGS: u32 = 2;
/// Milliseconds a slave is given per MiB queued ahead of its next heartbeat
/// after each step of its backlog (it reads at least 4 MiB/s), before its
/// silence counts: it cannot answer before it has read what is queued.
const BACKLOG_DRAIN_MS_PER_MIB: u64 = 250;
/// Bytes of snapshot chunks that may still be queued when the last one is.
const SNAPSHOT_WINDOW_BYTES: u64 = 1 << 20;
/// The reactor reports a link drained ([`Event::PeerDrained`]) while less
/// than this is queued on it: the next step of a backlog is queued behind at
/// most this much.
pub const BACKLOG_LOW_WATER_BYTES: usize = 1 << 20;

/// Knobs of the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// How long a slave may take to vote or ack before it is evicted (`--tpc-timeout-ms`).
    pub tpc_timeout_ms: u64,
    /// Refuse writes while fewer slaves are in sync (`--min-slaves`).
    pub min_slaves: usize,
    /// Committed transactions kept in memory for partial resync.
    pub log_capacity: usize,
    /// Bound on the key and value bytes those transactions may hold.
    pub log_max_bytes: usize,
    /// Interval between heartbeats to slaves.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a slave is evicted even with no transaction in flight.
    pub peer_timeout_ms: u64,
    /// Bound on transactions in flight (`--max-inflight-txns`). The reactor
    /// stops reading writes from clients while it is reached
    /// ([`Coordinator::at_inflight_bound`]), so a batch beyond it is never
    /// submitted; one that is anyway is refused, as a last resort.
    pub max_inflight_txns: usize,
    /// Identity of the history this master's commit sequence numbers belong to,
    /// sent in REGISTERED. A master that restarts without its data starts a new
    /// history and must pick a new id; the server draws it at random. Never 0,
    /// which in REGISTER means "no history yet". The state machine only compares
    /// it, so it stays deterministic.
    pub history_id: u64,
    /// This master's leadership epoch (failover through etcd; 0 without it),
    /// sent in REGISTERED.
    pub epoch: u64,
    /// Failover: keep the in-sync set recorded in the coordination store
    /// ([`Action::RecordSyncSet`]) and decide nothing without a slave that
    /// left it until its removal is recorded.
    pub record_sync_set: bool,
    /// A slave that keeps a transaction waiting this long after every other
    /// participant voted is evicted as lagging (`--max-slave-lag-ms`; 0: off).
    pub max_slave_lag_ms: u64,
    /// The first probation of a slave evicted for lagging; it doubles with
    /// each such eviction, up to `max_probation_ms`.
    pub first_probation_ms: u64,
    /// The longest probation.
    pub max_probation_ms: u64,
    /// Longest a batch of writes waits for a snapshot to progress before it
    /// starts anyway (see the policy above `SNAPSHOT_STALL_MS`).
    pub write_hold_max_ms: u64,
    /// Backoff before the first restart of a snapshot the log outran.
    pub snapshot_retry_min_ms: u64,
    /// Longest backoff between restarts of a slave's snapshot.
    pub snapshot_retry_max_ms: u64,
    /// How long a released commit may wait for the next PREPARE to a
    /// participant to carry it, before it is sent alone (0: always at once).
    /// Every other message to that slave takes it along first.
    pub commit_delay_ms: u64,
    /// Bytes of commits (keys, values and 64 per write, as the commit log
    /// counts them) queued to a catching-up slave per step of its backlog:
    /// one step when its catch-up starts, then one per [`Event::PeerDrained`],
    /// so that a large backlog never holds the reactor for long. At least one
    /// commit goes per step, however large.
    pub backlog_step_bytes: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> CoordinatorConfig {
        CoordinatorConfig {
            tpc_timeout_ms: 300,
            min_slaves: 0,
            log_capacity: 100_000,
            log_max_bytes: 8 << 20,
            heartbeat_interval_ms: 100,
            peer_timeout_ms: 1_000,
            max_inflight_txns: 10_000,
            history_id: 1,
            epoch: 0,
            record_sync_set: false,
            max_slave_lag_ms: 200,
            first_probation_ms: 1_000,
            max_probation_ms: 30_000,
            write_hold_max_ms: 50,
            snapshot_retry_min_ms: 500,
            snapshot_retry_max_ms: 8_000,
            // Clock ticks are whole ms and a timer set at tick t + 1 may be
            // due at once: 2 gives the next write at least a millisecond.
            commit_delay_ms: 2,
            // Measured on a master with 1M keys and 50 clients (pipeline 16):
            // the whole backlog after a snapshot in one turn took 29 ms of
            // CPU (11-71 ms in other runs); a step of 256 KiB about 2 ms.
            backlog_step_bytes: 256 << 10,
        }
    }
}

/// What a transaction's outcome is (or will be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Apply it everywhere.
    Commit,
    /// Apply it nowhere; the reason goes to the clients.
    Abort(String),
}

/// The life of one transaction on the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnState {
    /// PREPARE sent; waiting for these participants' votes.
    Preparing {
        /// Participants whose vote has not arrived.
        awaiting: BTreeSet<PeerId>,
        /// Set once any participant votes NO.
        refusal: Option<String>,
    },
    /// Decided; the decision record is being made durable.
    Deciding {
        /// The decision.
        decision: Decision,
        /// Log sequence number of the decision record.
        lsn: u64,
    },
    /// Committed and released; waiting for participants' acks.
    Committed {
        /// Participants that have not acked.
        awaiting_acks: BTreeSet<PeerId>,
    },
    /// Aborted, the ABORT sent; waiting for participants to make it durable
    /// before the clients hear ABORTED (a slave promoted later commits what it
    /// prepared unless it recorded the abort), and before any later
    /// transaction is released.
    Aborting {
        /// Participants that have not acked the abort.
        awaiting_acks: BTreeSet<PeerId>,
        /// Why, for the clients.
        reason: String,
    },
    /// Aborted and released. Terminal.
    Aborted,
}

impl TxnState {
    /// A new transaction waiting for the votes of `participants`.
    pub fn preparing(participants: &BTreeSet<PeerId>) -> TxnState {
        TxnState::Preparing {
            awaiting: participants.clone(),
            refusal: None,
        }
    }

    /// Record `peer`'s vote; returns whether it was awaited (stale votes are ignored).
    pub fn on_vote(&mut self, peer: PeerId, vote: &Vote) -> bool {
        match self {
            TxnState::Preparing { awaiting, refusal } => {
                if !awaiting.remove(&peer) {
                    return false;
                }
                if let Vote::No(reason) = vote
                    && refusal.is_none()
                {
                    *refusal = Some(format!("a slave voted no: {reason}"));
                }
                true
            }
            _ => false,
        }
    }

    /// `peer` was evicted or lost: stop waiting for it.
    pub fn on_peer_gone(&mut self, peer: PeerId) {
        match self {
            TxnState::Preparing { awaiting, .. } => {
                awaiting.remove(&peer);
            }
            TxnState::Committed { awaiting_acks } | TxnState::Aborting { awaiting_acks, .. } => {
                awaiting_acks.remove(&peer);
            }
            TxnState::Deciding { .. } | TxnState::Aborted => {}
        }
    }

    /// The decision, once every remaining participant has voted. `yes_voters` is how
    /// many participants remain (all of whom voted yes unless there is a refusal).
    pub fn ready(&self, yes_voters: usize, min_slaves: usize) -> Option<Decision> {
        match self {
            TxnState::Preparing { awaiting, refusal } if awaiting.is_empty() => {
                Some(match refusal {
                    Some(reason) => Decision::Abort(reason.clone()),
                    None if yes_voters < min_slaves => Decision::Abort(format!(
                        "only {yes_voters} slaves remained in sync, {min_slaves} required"
                    )),
                    None => Decision::Commit,
                })
            }
            _ => None,
        }
    }

    /// Take the decision; its record has log sequence number `lsn`.
    pub fn decide(&mut self, decision: Decision, lsn: u64) {
        debug_assert!(
            matches!(self, TxnState::Preparing { awaiting, .. } if awaiting.is_empty()),
            "decide only a fully voted transaction, not {self:?}"
        );
        *self = TxnState::Deciding { decision, lsn };
    }

    /// The decision record is durable: release. Returns the decision.
    pub fn on_durable(&mut self, participants: &BTreeSet<PeerId>) -> Decision {
        let TxnState::Deciding { decision, .. } = self else {
            debug_assert!(false, "release of an undecided transaction: {self:?}");
            return Decision::Abort("internal error: released undecided".into());
        };
        let decision = decision.clone();
        *self = match &decision {
            Decision::Commit => TxnState::Committed {
                awaiting_acks: participants.clone(),
            },
            Decision::Abort(reason) => TxnState::Aborting {
                awaiting_acks: participants.clone(),
                reason: reason.clone(),
            },
        };
        decision
    }

    /// `peer` acked (a commit or an abort); returns whether the ack was awaited.
    pub fn on_ack(&mut self, peer: PeerId) -> bool {
        match self {
            TxnState::Committed { awaiting_acks } | TxnState::Aborting { awaiting_acks, .. } => {
                awaiting_acks.remove(&peer)
            }
            _ => false,
        }
    }

    /// An abort every participant has acked: the clients may hear of it. Returns the reason.
    pub fn finish_abort(&mut self) -> Option<String> {
        match self {
            TxnState::Aborting {
                awaiting_acks,
                reason,
            } if awaiting_acks.is_empty() => {
                let reason = std::mem::take(reason);
                *self = TxnState::Aborted;
                Some(reason)
            }
            _ => None,
        }
    }

    /// Whether the master can forget the transaction.
    pub fn is_finished(&self) -> bool {
        match self {
            TxnState::Committed { awaiting_acks } => awaiting_acks.is_empty(),
            TxnState::Aborted => true,
            _ => false,
        }
    }
}

/// A transaction in flight on the master.
#[derive(Debug)]
struct Txn {
    ops: Ops,
    replies: Vec<ClientRef>,
    /// The writes' [`ClientWrite::key_hash`]es, for [`Action::Apply`].
    key_hashes: Vec<u64>,
    /// In-sync slaves at creation, minus those evicted since.
    participants: BTreeSet<PeerId>,
    state: TxnState,
    /// Deadline of the armed vote/ack timer, if any (to ignore stale firings).
    deadline_ms: Option<u64>,
    /// The one participant whose vote is still awaited after every other
    /// voted, and since when: it is evicted as lagging `max_slave_lag_ms` later.
    laggard: Option<(PeerId, u64)>,
}

/// How often a slave was evicted for lagging, for its probation on return.
#[derive(Debug, Clone, Copy)]
struct LagRecord {
    evictions: u32,
    last_ms: u64,
}

/// A slave not evicted for lagging this long starts again from the first probation.
const LAG_MEMORY_MS: u64 = 60_000;

/// A slave catching up by snapshot: how its stream goes, and its restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotTrack {
    /// The snapshot being streamed (or, in a backoff, the last one sent).
    at_seq: u64,
    /// Thousandths of it streamed, as last reported.
    done_per_mille: u64,
    /// When the stream started or last moved on.
    progress_at_ms: u64,
    /// Snapshots of this slave the log outran so far.
    restarts: u32,
    /// In a backoff: when the next snapshot starts.
    retry_at_ms: Option<u64>,
}

/// The 2PC coordinator of the master.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    /// Sequence number the next transaction gets.
    next_seq: u64,
    /// Every transaction up to here has a decision.
    decided_seq: u64,
    /// Every transaction up to here has a durable decision and has been applied and sent.
    released_seq: u64,
    last_lsn: u64,
    durable_lsn: u64,
    txns: BTreeMap<u64, Txn>,
    members: Membership,
    log: CommitLog,
    /// Whether commits are kept for partial resync: only once a slave has
    /// registered in this life (as Redis allocates its backlog), since before
    /// that no slave can hold a position in this history to resume from.
    keep_log: bool,
    /// The in-sync set as recorded for failover (unused without it).
    sync_set: RecordedSet,
    /// REGISTERs wait until this lsn is durable: a promotion's commits are
    /// applied before their decision records are, and must not reach a slave
    /// (by log or snapshot) that a crash of this node could leave ahead of it.
    register_after_lsn: u64,
    /// REGISTERs waiting for it (bounded by `MAX_HELD_REGISTERS`).
    held_registers: Vec<(PeerId, PeerMessage)>,
    /// Whether this master's leadership lease is known valid: while it is not,
    /// nothing is released (no client hears OK) and new writes are refused.
    lease_valid: bool,
    /// Nothing is released before this time: a slave that left may serve
    /// reads until then under the read lease granted to it, and it will not
    /// see what is released from now on.
    read_fence_ms: u64,
    /// Slaves evicted for lagging, by node id (or address), for their probation.
    lag_records: BTreeMap<String, LagRecord>,
    /// Evictions for lagging since start (STATS).
    lag_evictions: u64,
    /// Slaves catching up by snapshot (see the policy above `SNAPSHOT_STALL_MS`).
    snapshots: BTreeMap<PeerId, SnapshotTrack>,
    /// Since when a batch of writes waits for a snapshot (`write_hold`).
    hold_since_ms: Option<u64>,
    /// Milliseconds batches of writes waited for snapshots, finished holds only.
    write_throttle_ms: u64,
    /// Snapshots the log outran and that had to be sent again.
    snapshot_restarts: u64,
    /// Per participant, the newest commit released and not sent to it yet,
    /// and since when (see `CoordinatorConfig::commit_delay_ms`): it goes
    /// on the next PREPARE, ahead of any other message, or alone when
    /// `TimerId::CommitFlush` finds it due.
    unsent_commits: BTreeMap<PeerId, (u64, u64)>,
    /// Whether `TimerId::CommitFlush` is armed.
    commit_flush_armed: bool,
    actions: VecDeque<Action>,
}

impl Coordinator {
    /// A master with an empty store.
    pub fn new(config: CoordinatorConfig, now_ms: u64) -> Coordinator {
        let log = CommitLog::new(config.log_capacity, 0).with_max_bytes(config.log_max_bytes);
        let mut c = Coordinator::recover(config, now_ms, 0, log);
        // A new history has no earlier life whose read leases could still run.
        c.read_fence_ms = 0;
        c.actions.retain(|a| {
            !matches!(
                a,
                Action::SetTimer {
                    timer: TimerId::ReadFence,
                    ..
                }
            )
        });
        c
    }

    /// A master restarted from its log: `released_seq` is the last durable
    /// decision, a commit or an abort (an abort is released only once durable,
    /// and slaves were told positions through it: numbering must go on after
    /// it, or a new commit would reuse a number a slave has already passed),
    /// `log` holds recent commits. Presumed abort: any transaction
    /// above `released_seq` (prepared but never durably decided) is aborted;
    /// slaves that prepared it drop it when they re-register, and an
    /// OUTCOME_QUERY about it is answered ABORTED.
    pub fn recover(
        config: CoordinatorConfig,
        now_ms: u64,
        released_seq: u64,
        log: CommitLog,
    ) -> Coordinator {
        let mut c = Coordinator {
            next_seq: released_seq + 1,
            decided_seq: released_seq,
            released_seq,
            last_lsn: 0,
            durable_lsn: 0,
            txns: BTreeMap::new(),
            members: Membership::new(),
            // A restarted master's slaves may resume in its history from the log.
            keep_log: released_seq > 0,
            log,
            sync_set: RecordedSet::default(),
            register_after_lsn: 0,
            held_registers: Vec::new(),
            lease_valid: true,
            // A previous life of this master may have granted read leases
            // that have not run out yet (a quick restart): they end within
            // the longest lease it grants. Before its first commit too: the
            // heartbeats of an idle master grant leases at seq 0, and a slave
            // that has not come back serves reads under one of them.
            read_fence_ms: now_ms + config.tpc_timeout_ms,
            lag_records: BTreeMap::new(),
            lag_evictions: 0,
            snapshots: BTreeMap::new(),
            hold_since_ms: None,
            write_throttle_ms: 0,
            snapshot_restarts: 0,
            unsent_commits: BTreeMap::new(),
            commit_flush_armed: false,
            actions: VecDeque::new(),
            config,
        };
        c.actions.push_back(Action::SetTimer {
            timer: TimerId::Heartbeat,
            at_ms: now_ms + c.config.heartbeat_interval_ms,
        });
        if c.read_fence_ms > now_ms {
            c.actions.push_back(Action::SetTimer {
                timer: TimerId::ReadFence,
                at_ms: c.read_fence_ms,
            });
        }
        c
    }

    /// Slaves evicted for lagging since start.
    pub fn lag_evictions(&self) -> u64 {
        self.lag_evictions
    }

    /// Next action for the reactor, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Number this machine's log records after `appended`, the log's last
    /// lsn, of which `durable` has been reported durable (a failover hands a
    /// log over mid-way).
    pub fn start_lsns_after(&mut self, appended: u64, durable: u64) {
        self.last_lsn = appended;
        self.durable_lsn = durable;
    }

    /// The slaves, their states and positions (for STATS).
    pub fn members(&self) -> &Membership {
        &self.members
    }

    /// The history this master's sequence numbers belong to.
    pub fn history_id(&self) -> u64 {
        self.config.history_id
    }

    /// Highest commit sequence number released (applied on the master).
    pub fn commit_seq(&self) -> u64 {
        self.released_seq
    }

    /// Transactions not yet forgotten (preparing, deciding, or awaiting acks).
    pub fn in_flight(&self) -> usize {
        self.txns.len()
    }

    /// The commit log holds every commit after this seq: a slave may catch
    /// up from any seq at or above it.
    pub fn log_floor(&self) -> u64 {
        self.log.floor()
    }

    /// Whether the transactions in flight reached `max_inflight_txns`: the
    /// reactor holds the next batch and reads no more writes until one ends.
    pub fn at_inflight_bound(&self) -> bool {
        self.txns.len() >= self.config.max_inflight_txns
    }

    /// State of transaction `seq`, if still in flight.
    pub fn txn_state(&self, seq: u64) -> Option<&TxnState> {
        self.txns.get(&seq).map(|t| &t.state)
    }

    /// The in-sync set as last recorded in the coordination store (node ids).
    pub fn recorded_sync_set(&self) -> &BTreeSet<u64> {
        self.sync_set.recorded()
    }

    /// The leadership lease is (or is no longer) known valid. Without it the
    /// master acknowledges nothing: an older epoch's master must not.
    pub fn set_lease_valid(&mut self, now_ms: u64, valid: bool) {
        if self.lease_valid == valid {
            return;
        }
        self.lease_valid = valid;
        if valid {
            self.release(now_ms);
        }
    }

    /// Answer no REGISTER until `lsn` is durable: a promotion logged and
    /// applied its in-doubt commits through `lsn`, and a slave must not catch
    /// up to commits this node could still lose in a crash.
    pub fn hold_registrations_until(&mut self, lsn: u64) {
        self.register_after_lsn = lsn;
    }

    /// The highest sequence number this master has given a transaction
    /// (released, aborted or still in flight).
    pub fn used_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Transactions decided to commit and not yet released (their decision
    /// is logged, or on its way to the log; a lost lease holds them back).
    /// They are this node's own word: its log replays them as committed, so
    /// a node that leads again must commit them too, not reuse their numbers.
    pub fn decided_commits(&self) -> BTreeMap<u64, Ops> {
        self.txns
            .iter()
            .filter(|(_, t)| {
                matches!(
                    t.state,
                    TxnState::Deciding {
                        decision: Decision::Commit,
                        ..
                    }
                )
            })
            .map(|(&seq, t)| (seq, t.ops.clone()))
            .collect()
    }

    /// Leadership is lost: forget every transaction in flight and return the
    /// clients still waiting (their writes' outcome is not known here: the
    /// next master decides it).
    pub fn abandon(&mut self) -> Vec<ClientRef> {
        let mut clients = Vec::new();
        for (_, txn) in std::mem::take(&mut self.txns) {
            clients.extend(txn.replies);
        }
        self.unsent_commits.clear();
        // Its timer may have been dropped with the actions: arm a new one next time.
        self.commit_flush_armed = false;
        self.actions.clear();
        clients
    }

    /// Feed one event.
    pub fn handle(&mut self, now_ms: u64, event: Event) {
        match event {
            Event::ClientWrites { writes } => self.on_client_writes(now_ms, writes),
            Event::Message { peer, msg } => self.on_message(now_ms, peer, msg),
            Event::PeerLost { peer } => {
                self.held_registers.retain(|(p, _)| *p != peer);
                self.on_peer_lost(now_ms, peer);
            }
            Event::Persisted { lsn } => {
                debug_assert!(lsn <= self.last_lsn, "persisted lsn {lsn} never issued");
                self.durable_lsn = self.durable_lsn.max(lsn);
                if self.durable_lsn >= self.register_after_lsn {
                    for (peer, msg) in std::mem::take(&mut self.held_registers) {
                        self.on_register(now_ms, peer, msg);
                    }
                }
                self.release(now_ms);
            }
            Event::TimerFired { timer } => self.on_timer(now_ms, timer),
            Event::SnapshotSent { peer, at_seq } => self.on_snapshot_sent(now_ms, peer, at_seq),
            Event::PeerDrained { peer } => self.backlog_step(now_ms, peer),
            Event::SnapshotJoined { peer, at_seq } => self.on_snapshot_joined(peer, at_seq),
            Event::SnapshotProgress {
                peer,
                at_seq,
                done_per_mille,
            } => self.on_snapshot_progress(now_ms, peer, at_seq, done_per_mille),
            Event::SyncSetRecorded { version } => {
                for peer in self.sync_set.recorded_as(version) {
                    info!("removal of slave {peer:?} from the in-sync set is recorded");
                    self.forget_peer(now_ms, peer);
                }
                self.record_sync_set();
                self.advance();
                self.release(now_ms);
            }
            Event::Connected { .. } | Event::ConnectFailed => {
                debug!("coordinator ignores slave-side event {event:?}");
            }
        }
    }

    /// Queue `msg` to `peer`, with the commit it has not been sent yet
    /// ahead of it: on a PREPARE, in it; before anything else, alone. The
    /// link is FIFO, so the slave sees the commit before whatever follows,
    /// exactly as if it had been sent at its release (docs/PROTOCOL.md §9.7).
    fn send(&mut self, peer: PeerId, mut msg: PeerMessage) {
        if let Some((seq, _)) = self.unsent_commits.remove(&peer) {
            match &mut msg {
                PeerMessage::Prepare { commit_through, .. } => *commit_through = seq,
                _ => self.actions.push_back(Action::Send {
                    peer,
                    msg: PeerMessage::Commit { seq },
                }),
            }
        }
        self.actions.push_back(Action::Send { peer, msg });
    }

    /// Commit `seq`, released, to participant `peer`: at once, or held for
    /// the next PREPARE to carry it (`CoordinatorConfig::commit_delay_ms`).
    fn send_commit(&mut self, now_ms: u64, peer: PeerId, seq: u64) {
        if self.config.commit_delay_ms == 0 {
            self.send(peer, PeerMessage::Commit { seq });
            return;
        }
        // Commits are cumulative: a newer one covers the one it replaces, and
        // the older one's wait is what bounds the delay.
        let since = self.unsent_commits.get(&peer).map_or(now_ms, |&(_, t)| t);
        self.unsent_commits.insert(peer, (seq, since));
        if !self.commit_flush_armed {
            self.commit_flush_armed = true;
            self.actions.push_back(Action::SetTimer {
                timer: TimerId::CommitFlush,
                at_ms: since + self.config.commit_delay_ms,
            });
        }
    }

    /// `TimerId::CommitFlush`: send alone every commit that waited its
    /// delay for a PREPARE; come back for the others.
    fn flush_commits(&mut self, now_ms: u64) {
        self.commit_flush_armed = false;
        let delay = self.config.commit_delay_ms;
        let due: Vec<(PeerId, u64)> = self
            .unsent_commits
            .iter()
            .filter(|(_, (_, since))| since + delay <= now_ms)
            .map(|(&peer, &(seq, _))| (peer, seq))
            .collect();
        for (peer, seq) in due {
            self.unsent_commits.remove(&peer);
            self.actions.push_back(Action::Send {
                peer,
                msg: PeerMessage::Commit { seq },
            });
        }
        if let Some(since) = self.unsent_commits.values().map(|&(_, t)| t).min() {
            self.commit_flush_armed = true;
            self.actions.push_back(Action::SetTimer {
                timer: TimerId::CommitFlush,
                at_ms: since + delay,
            });
        }
    }

    fn on_client_writes(&mut self, now_ms: u64, writes: Vec<ClientWrite>) {
        if writes.is_empty() {
            return;
        }
        let in_sync = self.members.in_sync_count();
        let refusal = if !self.lease_valid {
            Some("this master's leadership lease is not renewed (etcd unreachable?)".to_string())
        } else if in_sync < self.config.min_slaves {
            Some(format!(
                "{in_sync} slaves in sync, --min-slaves requires {}",
                self.config.min_slaves
            ))
        } else if self.txns.len() >= self.config.max_inflight_txns {
            Some(format!(
                "{} transactions in flight (limit)",
                self.txns.len()
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            for w in writes {
                self.actions.push_back(Action::Reply {
                    client: w.client,
                    error: WriteError::Unavailable(why.clone()),
                });
            }
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        debug_assert!(seq > self.decided_seq && seq > self.released_seq);
        let mut replies = Vec::with_capacity(writes.len());
        let mut key_hashes = Vec::with_capacity(writes.len());
        let ops: Vec<_> = writes
            .into_iter()
            .map(|w| {
                replies.push(w.client);
                key_hashes.push(w.key_hash);
                w.op
            })
            .collect();
        let ops: Ops = ops.into();
        let participants: BTreeSet<PeerId> = self.members.in_sync().collect();
        for &peer in &participants {
            self.send(
                peer,
                PeerMessage::Prepare {
                    seq,
                    commit_through: 0,
                    ops: ops.clone(),
                },
            );
        }
        let deadline_ms = if participants.is_empty() {
            None
        } else {
            let at_ms = now_ms + self.config.tpc_timeout_ms;
            self.actions.push_back(Action::SetTimer {
                timer: TimerId::Txn(seq),
                at_ms,
            });
            Some(at_ms)
        };
        let state = TxnState::preparing(&participants);
        self.txns.insert(
            seq,
            Txn {
                ops,
                replies,
                key_hashes,
                participants,
                state,
                deadline_ms,
                laggard: None,
            },
        );
        self.advance();
    }

    /// Decide every transaction that can be decided, in sequence order.
    fn advance(&mut self) {
        if self.sync_set.holding() {
            // A slave that left may still be promoted: decide nothing without
            // it until its removal is recorded (docs/FAILOVER.md).
            return;
        }
        loop {
            let seq = self.decided_seq + 1;
            let Some(txn) = self.txns.get_mut(&seq) else {
                break;
            };
            let Some(decision) = txn
                .state
                .ready(txn.participants.len(), self.config.min_slaves)
            else {
                break;
            };
            self.last_lsn += 1;
            let lsn = self.last_lsn;
            let record = match decision {
                Decision::Commit => Record::CommitDecision {
                    seq,
                    ops: txn.ops.clone(),
                },
                Decision::Abort(_) => Record::AbortDecision { seq },
            };
            if txn.deadline_ms.take().is_some() {
                self.actions.push_back(Action::CancelTimer {
                    timer: TimerId::Txn(seq),
                });
            }
            txn.state.decide(decision, lsn);
            self.actions.push_back(Action::Persist { lsn, record });
            self.decided_seq = seq;
        }
    }

    /// Release, in sequence order, every decision that is durable.
    fn release(&mut self, now_ms: u64) {
        if !self.lease_valid {
            return;
        }
        if now_ms < self.read_fence_ms {
            // Resumed by `TimerId::ReadFence`.
            return;
        }
        loop {
            let seq = self.released_seq + 1;
            let Some(txn) = self.txns.get_mut(&seq) else {
                break;
            };
            match txn.state {
                TxnState::Deciding { lsn, .. } if lsn <= self.durable_lsn => {}
                TxnState::Aborting { .. } => {
                    // Nothing later is released before every participant has
                    // the abort: see `TxnState::Aborting`.
                    let Some(reason) = txn.state.finish_abort() else {
                        break;
                    };
                    debug!("transaction {seq} aborted: {reason}");
                    for client in std::mem::take(&mut txn.replies) {
                        self.actions.push_back(Action::Reply {
                            client,
                            error: WriteError::Aborted(reason.clone()),
                        });
                    }
                    self.released_seq = seq;
                    self.forget(seq);
                    continue;
                }
                _ => break,
            }
            debug_assert!(seq > self.released_seq, "commit order must increase");
            let decision = txn.state.on_durable(&txn.participants);
            if matches!(decision, Decision::Commit) {
                self.released_seq = seq;
            }
            match decision {
                Decision::Commit => {
                    self.actions.push_back(Action::Apply {
                        seq,
                        ops: txn.ops.clone(),
                        replies: std::mem::take(&mut txn.replies),
                        key_hashes: std::mem::take(&mut txn.key_hashes),
                    });
                    if self.keep_log {
                        self.log.push(seq, txn.ops.clone());
                    } else {
                        self.log.forget_through(seq);
                    }
                    let mut commits = Vec::new();
                    let mut entries = Vec::new();
                    for (peer, info) in self.members.iter() {
                        if !info.state.receives_commits() {
                            continue;
                        }
                        if txn.participants.contains(&peer) {
                            commits.push(peer);
                        } else {
                            debug_assert!(
                                !matches!(info.state, SlaveState::InSync { join_seq } if join_seq <= seq),
                                "in-sync slave {peer:?} missing from transaction {seq}"
                            );
                            entries.push(peer);
                        }
                    }
                    let ops = txn.ops.clone();
                    let finished = txn.state.is_finished();
                    for peer in commits {
                        self.send_commit(now_ms, peer, seq);
                    }
                    for peer in entries {
                        self.send(
                            peer,
                            PeerMessage::LogEntry {
                                seq,
                                ops: ops.clone(),
                            },
                        );
                    }
                    if finished {
                        self.txns.remove(&seq);
                    } else if let Some(txn) = self.txns.get_mut(&seq) {
                        let at_ms = now_ms + self.config.tpc_timeout_ms;
                        txn.deadline_ms = Some(at_ms);
                        self.actions.push_back(Action::SetTimer {
                            timer: TimerId::Txn(seq),
                            at_ms,
                        });
                    }
                }
                Decision::Abort(_) => {
                    let participants: Vec<PeerId> = txn.participants.iter().copied().collect();
                    // Ahead of it go the commits before it (`send`): a slave
                    // commits what it holds prepared through a COMMIT's seq,
                    // so it must have dropped this one by then.
                    for &peer in &participants {
                        self.send(peer, PeerMessage::Abort { seq });
                    }
                    if !participants.is_empty()
                        && let Some(txn) = self.txns.get_mut(&seq)
                    {
                        let at_ms = now_ms + self.config.tpc_timeout_ms;
                        txn.deadline_ms = Some(at_ms);
                        self.actions.push_back(Action::SetTimer {
                            timer: TimerId::Txn(seq),
                            at_ms,
                        });
                    }
                    // Released by the `Aborting` arm: now if no one must ack.
                }
            }
        }
    }

    fn on_message(&mut self, now_ms: u64, peer: PeerId, msg: PeerMessage) {
        if matches!(msg, PeerMessage::Register { .. }) {
            if self.durable_lsn < self.register_after_lsn {
                if self.held_registers.len() >= MAX_HELD_REGISTERS {
                    self.actions.push_back(Action::Disconnect { peer });
                } else {
                    self.held_registers.push((peer, msg));
                }
                return;
            }
            self.on_register(now_ms, peer, msg);
            return;
        }
        let Some(info) = self.members.get(peer) else {
            warn!("message from unregistered peer {peer:?}; closing its link");
            self.actions.push_back(Action::Disconnect { peer });
            return;
        };
        if info.evicted_because.is_some() {
            return; // its link is being closed; whatever it says no longer counts
        }
        self.members.heard_from(peer, now_ms);
        match msg {
            PeerMessage::Vote {
                seq,
                vote,
                ack_through,
            } => {
                // The ack went out before the vote (it was durable by then).
                if ack_through > 0 {
                    self.on_ack(now_ms, peer, ack_through);
                }
                self.on_vote(now_ms, peer, seq, vote);
            }
            PeerMessage::Ack { seq } => self.on_ack(now_ms, peer, seq),
            PeerMessage::CaughtUp { seq } => {
                if self.members.get(peer).map(|s| s.state)
                    == Some(SlaveState::Tailing { marker: seq })
                {
                    self.members.applied(peer, seq);
                    match self.probation_until(now_ms, peer) {
                        Some(until_ms) => {
                            info!(
                                "slave {peer:?} caught up at {seq}; on probation for {} ms \
                                 (it was evicted for lagging)",
                                until_ms - now_ms
                            );
                            self.members
                                .set_state(peer, SlaveState::Probation { until_ms });
                        }
                        None => {
                            // Back after its probation would have ended (it was
                            // away, e.g. cut off): it is not a slave that keeps
                            // falling behind, so the next lag starts from scratch.
                            self.forgive_lag(peer);
                            info!(
                                "slave {peer:?} caught up at {seq}; in sync from {}",
                                self.next_seq
                            );
                            self.members.set_state(
                                peer,
                                SlaveState::InSync {
                                    join_seq: self.next_seq,
                                },
                            );
                        }
                    }
                }
            }
            PeerMessage::Heartbeat {
                seq,
                stamp,
                lease_ms,
                ..
            } => {
                self.members.applied(peer, seq);
                self.grant_lease(now_ms, peer, stamp, lease_ms);
            }
            PeerMessage::OutcomeQuery { seq } => {
                let outcome = self.outcome_of(seq);
                self.send(peer, PeerMessage::Outcome { seq, outcome });
            }
            other => {
                self.evict(
                    now_ms,
                    peer,
                    &format!("protocol violation: unexpected 0x{:02x}", other.opcode()),
                );
            }
        }
    }

    fn outcome_of(&self, seq: u64) -> Outcome {
        if seq > self.released_seq {
            // Ours and undecided, or from a previous life of this master: presumed abort.
            if self.txns.contains_key(&seq) {
                Outcome::Pending
            } else {
                Outcome::Aborted
            }
        } else if seq <= self.log.floor() {
            Outcome::Unknown
        } else if self.log.contains(seq) {
            Outcome::Committed
        } else {
            Outcome::Aborted
        }
    }

    /// A REGISTER (`msg`) arrived on `peer`.
    fn on_register(&mut self, now_ms: u64, peer: PeerId, msg: PeerMessage) {
        let PeerMessage::Register {
            client_addr,
            last_applied_seq,
            history_id,
            protocol_version,
            node_id,
            may_discard_data,
            epoch,
        } = msg
        else {
            return;
        };
        if epoch > self.config.epoch {
            // The slave follows a newer master: this one was deposed.
            warn!(
                "slave {client_addr} knows epoch {epoch}, ours is {}: refusing it",
                self.config.epoch
            );
            self.actions.push_back(Action::Disconnect { peer });
            return;
        }
        if self.members.get(peer).is_some() {
            self.evict(now_ms, peer, "registered twice on one link");
            return;
        }
        if protocol_version != PEER_PROTOCOL_VERSION {
            warn!(
                "slave {client_addr} speaks peer protocol {protocol_version}, we speak \
                 {PEER_PROTOCOL_VERSION}: refusing it (master and slaves must run the same version)"
            );
            self.actions.push_back(Action::Disconnect { peer });
            return;
        }
        let old = if node_id != 0 {
            self.members.find_by_node(node_id)
        } else {
            self.members.find_by_addr(&client_addr)
        };
        if let Some(old) = old {
            // The slave noticed its old link die before we did.
            self.evict(now_ms, old, "re-registered on a new link");
        }
        info!(
            "slave {client_addr} (node {node_id:016x}) registered on {peer:?} at {last_applied_seq} of history {history_id:#018x}"
        );
        let master_seq = self.released_seq;
        let own_history = self.config.history_id;
        // A position means something only within the history it was reached in:
        // sequence numbers of another history (an earlier life of this master that
        // lost its data, or another master) name different transactions. Position 0
        // with no history is the empty store, which every history starts from.
        let same_history = (history_id == own_history && own_history != 0)
            || (history_id == 0 && last_applied_seq == 0);
        // STATS `applied` is a position in our history, and only ever rises
        // (Membership::applied): a slave of another history at 500 would show
        // 500 and lag 0 until we passed 500 (issue 10 item 12, after a master
        // restarted without its data). It has applied none of ours yet.
        let applied_seq = if same_history { last_applied_seq } else { 0 };
        self.members
            .add(peer, client_addr, node_id, applied_seq, now_ms);
        self.keep_log = true;
        if same_history && last_applied_seq <= master_seq && self.log.covers(last_applied_seq) {
            self.send_registered(
                peer,
                CatchUp::Log {
                    from_seq: last_applied_seq,
                },
            );
            self.start_backlog(now_ms, peer, last_applied_seq);
            return;
        }
        // A snapshot replaces what the slave holds. Within our history and behind
        // us that loses nothing; otherwise (another history, or ahead of us: this
        // master lost writes the slave has) the slave's data may be the only copy
        // of acknowledged writes, so it is replaced only if its operator said so.
        let loses_data = last_applied_seq > 0 && (!same_history || last_applied_seq > master_seq);
        if loses_data && !may_discard_data {
            warn!(
                "slave on {peer:?} holds seq {last_applied_seq} of history {history_id:#018x}, \
                 ours is {master_seq} of {own_history:#018x}: diverged, its data is kept \
                 (restart it with --resync-discard-data to replace it with ours)"
            );
            self.members.set_state(peer, SlaveState::Diverged);
            self.send_registered(peer, CatchUp::Diverged);
            return;
        }
        if !same_history {
            info!(
                "slave on {peer:?} is at {last_applied_seq} of history {history_id:#018x}, \
                 ours is {own_history:#018x}: snapshot"
            );
        }
        self.send_registered(peer, CatchUp::Snapshot { at_seq: master_seq });
        self.start_snapshot(now_ms, peer);
    }

    /// Answer a REGISTER: our released seq and history, and what follows.
    fn send_registered(&mut self, peer: PeerId, catch_up: CatchUp) {
        self.send(
            peer,
            PeerMessage::Registered {
                master_seq: self.released_seq,
                history_id: self.config.history_id,
                catch_up,
                epoch: self.config.epoch,
            },
        );
    }

    fn start_snapshot(&mut self, now_ms: u64, peer: PeerId) {
        let at_seq = self.released_seq;
        self.members
            .set_state(peer, SlaveState::Snapshotting { at_seq });
        let restarts = self.snapshots.get(&peer).map_or(0, |t| t.restarts);
        self.snapshots.insert(
            peer,
            SnapshotTrack {
                at_seq,
                done_per_mille: 0,
                progress_at_ms: now_ms,
                restarts,
                retry_at_ms: None,
            },
        );
        self.actions
            .push_back(Action::StartSnapshot { peer, at_seq });
        self.pin_log();
    }

    /// Keep the commits every snapshot in flight will need after it (one
    /// waiting out a backoff needs none: its next one starts at a later seq),
    /// and those every backlog being sent has yet to send.
    fn pin_log(&mut self) {
        let members = &self.members;
        // Forget slaves that no longer catch up by snapshot (evicted, lost, in sync).
        self.snapshots.retain(|peer, _| {
            matches!(
                members.get(*peer).map(|s| s.state),
                Some(SlaveState::Snapshotting { .. })
            )
        });
        let snapshots = self
            .snapshots
            .values()
            .filter(|t| t.retry_at_ms.is_none())
            .map(|t| t.at_seq);
        let backlogs = self.members.iter().filter_map(|(_, s)| match s.state {
            SlaveState::Backlog { sent } => Some(sent),
            _ => None,
        });
        let oldest = snapshots.chain(backlogs).min();
        self.log.pin(oldest);
    }

    /// Slaves being sent their backlog: each gets its next step when the
    /// reactor reports its link drained ([`Event::PeerDrained`]).
    pub fn backlog_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.members
            .iter()
            .filter(|(_, s)| matches!(s.state, SlaveState::Backlog { .. }))
            .map(|(p, _)| p)
    }

    /// Whether the batch of client writes waiting in the reactor must wait
    /// longer for a snapshot to progress: `Some(ms)` asks again by then (or at
    /// the next event), `None` lets it start now. See the policy above
    /// `SNAPSHOT_STALL_MS`: the log may fill to 1/4 + 1/2 x (fraction
    /// streamed) of its pinned bounds, and no batch waits more than the hold
    /// bound.
    pub fn write_hold(&mut self, now_ms: u64) -> Option<u64> {
        if let Some((allowed, hold_max_ms)) = self.write_allowance(now_ms)
            && self.log.pin_fill() >= allowed
        {
            let since = *self.hold_since_ms.get_or_insert(now_ms);
            let until = since.saturating_add(hold_max_ms);
            if now_ms < until {
                return Some(until);
            }
        }
        if let Some(since) = self.hold_since_ms.take() {
            self.write_throttle_ms += now_ms.saturating_sub(since);
        }
        None
    }

    /// How full the pinned log may get now (thousandths of its pinned
    /// bounds) and how long a batch may be held, while some snapshot
    /// streams, makes progress and is still covered by the log.
    fn write_allowance(&self, now_ms: u64) -> Option<(u64, u64)> {
        if !self.log.pin_holds() {
            // Nothing pinned, or the log wrapped already: that snapshot is
            // sent again anyway, and holding writes would not save it.
            return None;
        }
        let live = self.snapshots.values().filter(|t| {
            t.retry_at_ms.is_none() && now_ms.saturating_sub(t.progress_at_ms) < SNAPSHOT_STALL_MS
        });
        let (done, restarts) = live.fold(None, |acc: Option<(u64, u32)>, t| {
            let (done, restarts) = acc.unwrap_or((PIN_FULL, 0));
            Some((done.min(t.done_per_mille), restarts.max(t.restarts)))
        })?;
        let allowed = PIN_FULL / 4 + done.min(PIN_FULL) / 2;
        let hold_max_ms = self
            .config
            .write_hold_max_ms
            .saturating_mul(1 << restarts.min(HOLD_DOUBLINGS));
        Some((allowed, hold_max_ms))
    }

    /// Milliseconds batches of writes have waited for snapshots, the current hold included.
    pub fn write_throttle_ms(&self, now_ms: u64) -> u64 {
        self.write_throttle_ms + self.hold_since_ms.map_or(0, |s| now_ms.saturating_sub(s))
    }

    /// Snapshots the log outran, each sent again after a backoff.
    pub fn snapshot_restarts(&self) -> u64 {
        self.snapshot_restarts
    }

    /// Start sending `peer` every commit after `after` from the log, then the
    /// end-of-backlog marker: a first step now, the others as its link drains
    /// (`backlog_step`), which pins the log at the cursor meanwhile.
    fn start_backlog(&mut self, now_ms: u64, peer: PeerId, after: u64) {
        self.members
            .set_state(peer, SlaveState::Backlog { sent: after });
        self.backlog_step(now_ms, peer);
    }

    /// The next step of `peer`'s backlog: the commits after its cursor, up to
    /// `backlog_step_bytes` of them (at least one), and once the cursor
    /// reaches the released seq, the marker: the slave is then `Tailing` and
    /// each release forwards the commit to it too. Until then releases are
    /// not forwarded to it; the cursor reaches them in the log.
    fn backlog_step(&mut self, now_ms: u64, peer: PeerId) {
        let Some(SlaveState::Backlog { sent: after }) = self.members.get(peer).map(|s| s.state)
        else {
            return; // a drained link of a slave not being sent a backlog
        };
        if !self.log.covers(after) {
            // The pin gave way (the slave read slower than writes came): the
            // commits after its position are gone, and only a snapshot can
            // bridge the gap. It gets one when it registers again.
            let reason = format!(
                "the commit log no longer holds its backlog after seq {after} (it starts after \
                 {}): it will catch up by snapshot",
                self.log.floor()
            );
            self.evict(now_ms, peer, &reason);
            return;
        }
        let through = self.released_seq;
        let budget = self.config.backlog_step_bytes;
        let mut bytes = 0;
        let mut entries: Vec<(u64, Ops)> = Vec::new();
        let done = {
            let mut rest = self.log.range(after, through).peekable();
            while let Some((seq, ops)) = rest.next_if(|_| entries.is_empty() || bytes < budget) {
                bytes += super::log::ops_bytes(ops);
                entries.push((*seq, ops.clone()));
            }
            rest.peek().is_none()
        };
        let last = entries.last().map_or(after, |e| e.0);
        for (seq, ops) in entries {
            self.send(peer, PeerMessage::LogEntry { seq, ops });
        }
        // The slave sends nothing while it receives the backlog (its answers
        // queue behind it), and cannot answer the next heartbeat before it
        // has read what is queued: at most a drained window and this step.
        let queued = SNAPSHOT_WINDOW_BYTES.max(BACKLOG_LOW_WATER_BYTES as u64) + bytes as u64;
        let grace_ms = queued.div_ceil(1 << 20) * BACKLOG_DRAIN_MS_PER_MIB;
        self.members
            .heard_from(peer, now_ms.saturating_add(grace_ms));
        if done {
            self.send(peer, PeerMessage::CaughtUp { seq: through });
            self.members
                .set_state(peer, SlaveState::Tailing { marker: through });
        } else {
            self.members
                .set_state(peer, SlaveState::Backlog { sent: last });
        }
        self.pin_log();
    }

    fn on_snapshot_sent(&mut self, now_ms: u64, peer: PeerId, at_seq: u64) {
        let Some(info) = self.members.get(peer) else {
            return;
        };
        if info.state != (SlaveState::Snapshotting { at_seq }) {
            return;
        }
        // The slave is silent while a snapshot streams to it; that is not a stall.
        self.members.heard_from(peer, now_ms);
        if self.log.covers(at_seq) {
            self.snapshots.remove(&peer);
            // Nor is the time it takes to read the rest of the stream and the
            // backlog, which `backlog_step` allows for.
            self.start_backlog(now_ms, peer, at_seq);
        } else {
            // The log wrapped while the snapshot streamed, even pinned and
            // with writes throttled (the slave stalled, or writes outran the
            // hold bound): only a newer snapshot can bridge the gap. Not at
            // once: one that failed is likely to fail again right away, and
            // streaming snapshots back to back costs the master for nothing.
            self.snapshot_restarts += 1;
            let (retry_min, retry_max) = (
                self.config.snapshot_retry_min_ms,
                self.config.snapshot_retry_max_ms,
            );
            let Some(track) = self.snapshots.get_mut(&peer) else {
                // Every snapshotting slave is tracked; start afresh if not.
                self.start_snapshot(now_ms, peer);
                return;
            };
            track.restarts = track.restarts.saturating_add(1);
            let backoff_ms = retry_min
                .saturating_mul(1 << (track.restarts - 1).min(16))
                .min(retry_max);
            let retry_at_ms = now_ms.saturating_add(backoff_ms);
            track.retry_at_ms = Some(retry_at_ms);
            info!(
                "log wrapped during snapshot {} to {peer:?}; sending a newer one in {backoff_ms} ms",
                track.restarts
            );
            self.retry_snapshot_later(now_ms, peer, retry_at_ms);
        }
        self.pin_log();
    }

    /// Evict every slave whose snapshot or backlog drained nothing for the
    /// peer timeout: a stopped or cut-off receiver otherwise holds its link,
    /// the snapshot's copy of every shard written since it began and the
    /// pinned commit log for as long as it stays away (the silence check
    /// below skips it, since a receiving slave sends nothing).
    fn evict_stalled_snapshots(&mut self, now_ms: u64) {
        let silent_before = now_ms.saturating_sub(self.config.peer_timeout_ms);
        let stalled: Vec<(PeerId, &str, u64, u64)> = self
            .members
            .iter()
            .filter_map(|(peer, info)| match info.state {
                SlaveState::Snapshotting { at_seq } if info.last_heard_ms < silent_before => {
                    Some((peer, "the snapshot", at_seq, info.last_heard_ms))
                }
                SlaveState::Backlog { sent } if info.last_heard_ms < silent_before => {
                    Some((peer, "the backlog", sent, info.last_heard_ms))
                }
                _ => None,
            })
            .collect();
        for (peer, what, at_seq, last_progress_ms) in stalled {
            let reason = format!(
                "stalled receiving {what} at seq {at_seq}: nothing drained for {} ms, \
                 {} transactions behind (master at {})",
                now_ms.saturating_sub(last_progress_ms),
                self.released_seq.saturating_sub(at_seq),
                self.released_seq
            );
            self.evict(now_ms, peer, &reason);
        }
    }

    /// In a snapshot backoff: heartbeat the slave (it hears nothing else, and
    /// would give up on a silent master) and come back at the next heartbeat
    /// or when the backoff ends.
    fn retry_snapshot_later(&mut self, now_ms: u64, peer: PeerId, retry_at_ms: u64) {
        let seq = self.released_seq;
        self.send(peer, PeerMessage::poll(seq));
        let next = now_ms
            .saturating_add(self.config.heartbeat_interval_ms.max(1))
            .min(retry_at_ms);
        self.actions.push_back(Action::SetTimer {
            timer: TimerId::SnapshotRetry(peer),
            at_ms: next,
        });
    }

    fn on_snapshot_retry(&mut self, now_ms: u64, peer: PeerId) {
        self.pin_log(); // forgets slaves gone since
        let Some(retry_at_ms) = self.snapshots.get(&peer).and_then(|t| t.retry_at_ms) else {
            return; // stale: the slave left, or its snapshot started again
        };
        if now_ms >= retry_at_ms {
            self.start_snapshot(now_ms, peer);
        } else {
            self.retry_snapshot_later(now_ms, peer, retry_at_ms);
        }
    }

    /// The reactor gave `peer` a snapshot already streaming to others, at
    /// `at_seq`, instead of a new one: the slave is sent the backlog from
    /// there, and the log is pinned there for it too.
    fn on_snapshot_joined(&mut self, peer: PeerId, at_seq: u64) {
        let Some(SlaveState::Snapshotting { at_seq: asked }) =
            self.members.get(peer).map(|s| s.state)
        else {
            return;
        };
        if at_seq > asked {
            debug_assert!(
                false,
                "a shared snapshot is never newer than the one asked for"
            );
            return;
        }
        self.members
            .set_state(peer, SlaveState::Snapshotting { at_seq });
        if let Some(track) = self.snapshots.get_mut(&peer) {
            track.at_seq = at_seq;
        }
        self.pin_log();
    }

    /// The snapshot to `peer` drained (the reactor reports only then): the
    /// slave reads, however slowly, and the stream moved on by `done`.
    fn on_snapshot_progress(&mut self, now_ms: u64, peer: PeerId, at_seq: u64, done: u64) {
        if let Some(SlaveState::Snapshotting { .. }) = self.members.get(peer).map(|s| s.state) {
            // It sends nothing meanwhile: this is what hearing from it means.
            self.members.heard_from(peer, now_ms);
        }
        if let Some(track) = self.snapshots.get_mut(&peer)
            && track.at_seq == at_seq
            && track.retry_at_ms.is_none()
            && done > track.done_per_mille
        {
            track.done_per_mille = done.min(PIN_FULL);
            track.progress_at_ms = now_ms;
        }
    }

    fn on_vote(&mut self, now_ms: u64, peer: PeerId, seq: u64, vote: Vote) {
        let Some(txn) = self.txns.get_mut(&seq) else {
            return; // decided without this voter already
        };
        if !txn.state.on_vote(peer, &vote) {
            return;
        }
        if let Vote::No(reason) = vote {
            // A slave only refuses when it cannot follow the stream: it must resync.
            self.evict(now_ms, peer, &format!("voted no on {seq}: {reason}"));
        } else if self.config.max_slave_lag_ms > 0
            && txn.laggard.is_none()
            && txn.participants.len() >= 2
            && let TxnState::Preparing { awaiting, .. } = &txn.state
            && awaiting.len() == 1
            && let Some(&last) = awaiting.iter().next()
        {
            // Every other participant is ready: from now on `last` alone
            // holds this transaction (and every later one) back.
            txn.laggard = Some((last, now_ms));
            let lag_at = now_ms + self.config.max_slave_lag_ms;
            if txn.deadline_ms.is_none_or(|d| lag_at < d) {
                self.actions.push_back(Action::SetTimer {
                    timer: TimerId::Txn(seq),
                    at_ms: lag_at,
                });
            }
        }
        self.advance();
    }

    fn on_ack(&mut self, now_ms: u64, peer: PeerId, seq: u64) {
        self.members.acked(peer, seq);
        self.record_sync_set();
        let mut finished = Vec::new();
        let mut aborts_acked = false;
        for (&s, txn) in self.txns.range_mut(..=seq) {
            if txn.state.on_ack(peer) {
                aborts_acked |= matches!(txn.state, TxnState::Aborting { .. });
                if txn.state.is_finished() {
                    finished.push(s);
                }
            }
        }
        for s in finished {
            self.forget(s);
        }
        if aborts_acked {
            self.release(now_ms);
        }
    }

    /// Drop a finished transaction and its timer.
    fn forget(&mut self, seq: u64) {
        if let Some(txn) = self.txns.remove(&seq)
            && txn.deadline_ms.is_some()
        {
            self.actions.push_back(Action::CancelTimer {
                timer: TimerId::Txn(seq),
            });
        }
    }

    /// Drop `peer` from the in-sync set, close its link and decide without it.
    fn evict(&mut self, now_ms: u64, peer: PeerId, reason: &str) {
        let (node, lease_until) = self
            .members
            .get(peer)
            .map_or((0, 0), |s| (s.node_id, s.lease_until_ms));
        if !self.members.evict(peer, reason) {
            return;
        }
        self.unsent_commits.remove(&peer);
        self.fence_reads(now_ms, lease_until);
        warn!("evicting slave {peer:?}: {reason}");
        self.actions.push_back(Action::Disconnect { peer });
        self.leave(now_ms, peer, node);
    }

    fn on_peer_lost(&mut self, now_ms: u64, peer: PeerId) {
        self.unsent_commits.remove(&peer);
        if let Some(info) = self.members.remove(peer)
            && info.evicted_because.is_none()
        {
            info!("slave {} lost", info.client_addr);
            self.fence_reads(now_ms, info.lease_until_ms);
            self.leave(now_ms, peer, info.node_id);
        }
    }

    /// `peer` (node `node`) left: decide without it, once that is recorded if it must be.
    fn leave(&mut self, now_ms: u64, peer: PeerId, node: u64) {
        if self.config.record_sync_set && self.sync_set.may_be_recorded(node) {
            info!("slave {peer:?} left the in-sync set; recording that before deciding without it");
            self.sync_set.hold(peer, node);
            self.record_sync_set();
            return;
        }
        self.forget_peer(now_ms, peer);
    }

    /// Ask for the current in-sync set to be recorded, if it changed.
    fn record_sync_set(&mut self) {
        if !self.config.record_sync_set {
            return;
        }
        let desired = self.members.durably_in_sync().map(|s| s.node_id).collect();
        if let Some((version, members)) = self.sync_set.request(desired) {
            self.actions
                .push_back(Action::RecordSyncSet { version, members });
        }
    }

    fn forget_peer(&mut self, now_ms: u64, peer: PeerId) {
        self.pin_log();
        let mut finished = Vec::new();
        for (&seq, txn) in self.txns.iter_mut() {
            txn.participants.remove(&peer);
            txn.state.on_peer_gone(peer);
            if txn.state.is_finished() {
                finished.push(seq);
            }
        }
        for seq in finished {
            self.forget(seq);
        }
        self.advance();
        self.release(now_ms);
    }

    /// Answer a slave's heartbeat with a read lease from its `stamp`, if it
    /// may have one: it receives every commit, so the grant reaches it after
    /// everything released so far; and the lease ends before any deadline it
    /// could be evicted at (a vote, an ack, the lag bound), so a slave
    /// evicted on time has stopped serving reads before anything is
    /// released without it. A grant is at most `--tpc-timeout-ms`.
    fn grant_lease(&mut self, now_ms: u64, peer: PeerId, stamp: u64, asked_ms: u32) {
        let Some(info) = self.members.get(peer) else {
            return;
        };
        if asked_ms == 0 || !info.state.receives_commits() {
            return;
        }
        let lease_ms = u64::from(asked_ms).min(self.config.tpc_timeout_ms);
        let ends = now_ms + lease_ms;
        let max_lag = self.config.max_slave_lag_ms;
        let due_before_end = self.txns.values().any(|txn| {
            let awaited = match &txn.state {
                TxnState::Preparing { awaiting, .. } => awaiting.contains(&peer),
                TxnState::Committed { awaiting_acks } => awaiting_acks.contains(&peer),
                TxnState::Aborting { awaiting_acks, .. } => awaiting_acks.contains(&peer),
                TxnState::Deciding { .. } | TxnState::Aborted => false,
            };
            let lag_due = match txn.laggard {
                Some((p, since)) if p == peer && max_lag > 0 => Some(since + max_lag),
                _ => None,
            };
            awaited
                && (txn.deadline_ms.is_some_and(|d| d <= ends)
                    || lag_due.is_some_and(|d| d <= ends))
        });
        if due_before_end {
            return;
        }
        if let Some(info) = self.members.get_mut(peer) {
            info.lease_until_ms = info.lease_until_ms.max(ends);
        }
        let seq = self.released_seq;
        self.send(
            peer,
            PeerMessage::Heartbeat {
                seq,
                stamp,
                lease_ms: lease_ms as u32,
                poll: false,
            },
        );
    }

    /// A slave left holding a read lease until `lease_until_ms`: release
    /// nothing before then, so no read it serves misses an acknowledged write.
    fn fence_reads(&mut self, now_ms: u64, lease_until_ms: u64) {
        if lease_until_ms <= now_ms || lease_until_ms <= self.read_fence_ms {
            return;
        }
        debug!(
            "holding releases {} ms for the read lease of a slave that left",
            lease_until_ms - now_ms
        );
        self.read_fence_ms = lease_until_ms;
        self.actions.push_back(Action::SetTimer {
            timer: TimerId::ReadFence,
            at_ms: lease_until_ms,
        });
    }

    /// Evict `peer` for keeping transaction `seq` waiting `waited_ms` after
    /// every other participant voted; its return starts with a probation.
    fn evict_lagging(&mut self, now_ms: u64, peer: PeerId, seq: u64, waited_ms: u64) {
        let Some(info) = self.members.get(peer) else {
            return;
        };
        let key = lag_key(info.node_id, &info.client_addr);
        let record = self.lag_records.entry(key).or_insert(LagRecord {
            evictions: 0,
            last_ms: now_ms,
        });
        if now_ms.saturating_sub(record.last_ms) > LAG_MEMORY_MS {
            record.evictions = 0;
        }
        record.evictions += 1;
        record.last_ms = now_ms;
        self.lag_evictions += 1;
        let in_flight = self.txns.len();
        let reason = format!(
            "lagging: kept transaction {seq} waiting {waited_ms} ms after the other slaves voted \
             (--max-slave-lag-ms {}; {in_flight} transactions in flight; lag eviction {})",
            self.config.max_slave_lag_ms, record.evictions
        );
        self.evict(now_ms, peer, &reason);
    }

    /// Until when a slave evicted for lagging stays on probation, if it does.
    fn probation_until(&self, now_ms: u64, peer: PeerId) -> Option<u64> {
        let info = self.members.get(peer)?;
        let record = self
            .lag_records
            .get(&lag_key(info.node_id, &info.client_addr))?;
        // Away longer than a first probation (cut off or stopped, not slow:
        // a slow slave is back within moments of its eviction): no probation,
        // however often it lagged before.
        let away_ms = now_ms.saturating_sub(record.last_ms);
        if away_ms > LAG_MEMORY_MS || away_ms >= self.config.first_probation_ms {
            return None;
        }
        let shift = record.evictions.saturating_sub(1).min(16);
        let probation = (self.config.first_probation_ms << shift).min(self.config.max_probation_ms);
        let until = record.last_ms + probation;
        (until > now_ms).then_some(until)
    }

    /// Forget the lag evictions of `peer`'s node.
    fn forgive_lag(&mut self, peer: PeerId) {
        if let Some(info) = self.members.get(peer) {
            self.lag_records
                .remove(&lag_key(info.node_id, &info.client_addr));
        }
    }

    /// Make slaves whose probation is over 2PC participants again.
    fn end_probations(&mut self, now_ms: u64) {
        let done: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(_, s)| matches!(s.state, SlaveState::Probation { until_ms } if until_ms <= now_ms))
            .map(|(p, _)| p)
            .collect();
        for peer in done {
            info!(
                "slave {peer:?} ends its probation; in sync from {}",
                self.next_seq
            );
            // It received every commit as a LOG_ENTRY meanwhile, in order.
            self.members.set_state(
                peer,
                SlaveState::InSync {
                    join_seq: self.next_seq,
                },
            );
        }
    }

    fn on_timer(&mut self, now_ms: u64, timer: TimerId) {
        match timer {
            TimerId::Txn(seq) => {
                let Some(txn) = self.txns.get(&seq) else {
                    return;
                };
                if let Some((laggard, since)) = txn.laggard
                    && self.config.max_slave_lag_ms > 0
                    && since + self.config.max_slave_lag_ms <= now_ms
                    && matches!(&txn.state, TxnState::Preparing { awaiting, .. } if awaiting.contains(&laggard))
                {
                    self.evict_lagging(now_ms, laggard, seq, now_ms - since);
                    return;
                }
                match txn.deadline_ms {
                    Some(deadline) if deadline <= now_ms => {}
                    Some(deadline) if txn.laggard.is_some() => {
                        // Fired early for the lag check: the deadline still stands.
                        self.actions.push_back(Action::SetTimer {
                            timer: TimerId::Txn(seq),
                            at_ms: deadline,
                        });
                        return;
                    }
                    _ => return, // stale firing of a moved or cancelled timer
                }
                let (late, what): (Vec<PeerId>, &str) = match &txn.state {
                    TxnState::Preparing { awaiting, .. } => {
                        (awaiting.iter().copied().collect(), "vote")
                    }
                    TxnState::Committed { awaiting_acks } => {
                        (awaiting_acks.iter().copied().collect(), "ack")
                    }
                    TxnState::Aborting { awaiting_acks, .. } => {
                        (awaiting_acks.iter().copied().collect(), "abort ack")
                    }
                    _ => return,
                };
                let reason = format!(
                    "no {what} on {seq} within {} ms",
                    self.config.tpc_timeout_ms
                );
                for peer in late {
                    self.evict(now_ms, peer, &reason);
                }
            }
            TimerId::Heartbeat => {
                let silent_before = now_ms.saturating_sub(self.config.peer_timeout_ms);
                let mut silent = Vec::new();
                let mut live = Vec::new();
                for (peer, info) in self.members.iter() {
                    // Diverged slaves get heartbeats (so both ends see a live link) and nothing else.
                    if !info.state.receives_commits() && info.state != SlaveState::Diverged {
                        continue;
                    }
                    if info.last_heard_ms < silent_before {
                        silent.push(peer);
                    } else {
                        live.push(peer);
                    }
                }
                let seq = self.released_seq;
                for peer in live {
                    self.send(peer, PeerMessage::poll(seq));
                }
                self.end_probations(now_ms);
                let reason = format!("silent for {} ms", self.config.peer_timeout_ms);
                for peer in silent {
                    self.evict(now_ms, peer, &reason);
                }
                self.evict_stalled_snapshots(now_ms);
                self.actions.push_back(Action::SetTimer {
                    timer: TimerId::Heartbeat,
                    at_ms: now_ms + self.config.heartbeat_interval_ms,
                });
            }
            TimerId::ReadFence => self.release(now_ms),
            TimerId::SnapshotRetry(peer) => self.on_snapshot_retry(now_ms, peer),
            TimerId::CommitFlush => self.flush_commits(now_ms),
            TimerId::Reconnect | TimerId::OutcomeCheck | TimerId::MasterSilence => {}
        }
    }
}

/// The key a slave's lag evictions are remembered by: its node id, or its
/// address if it announced none.
fn lag_key(node_id: u64, client_addr: &str) -> String {
    if node_id != 0 {
        format!("{node_id:016x}")
    } else {
        client_addr.to_string()
    }
}

#[cfg(test)]
mod tests;
