//! The slave side of two-phase commit: a pure state machine.
//!
//! The master's link is FIFO and the master releases decisions in sequence
//! order, so a slave applies exactly what it is told, when it is told:
//! LOG_ENTRY and COMMIT messages arrive in increasing sequence order. The
//! slave's `position` is the highest sequence number whose outcome it knows
//! (committed and applied, or aborted); it is what it registers with, together
//! with the history id of the master it last caught up from: sequence numbers
//! of different histories (a master that restarted without its data starts a
//! new one) name different transactions, so a position alone means nothing.

use std::collections::{BTreeMap, VecDeque};

use log::{info, warn};

use super::{Action, CatchUp, Event, Ops, Outcome, PeerId, PeerMessage, Record, TimerId, Vote};
use crate::protocol::peer::PEER_PROTOCOL_VERSION;

/// Knobs of the participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantConfig {
    /// Address this slave serves clients on, announced to the master.
    pub client_addr: String,
    /// This node's id, announced to the master (0: none).
    pub node_id: u64,
    /// Accept a snapshot of another history even though it replaces the data
    /// held here (`--resync-discard-data`); without it such data is kept.
    pub may_discard_data: bool,
    /// First reconnect delay after losing the master.
    pub reconnect_min_ms: u64,
    /// Reconnect delays double up to this. Each delay actually waited is drawn
    /// between half of it and all of it, so that slaves that lost their master
    /// together do not redial in lockstep.
    pub reconnect_max_ms: u64,
    /// Seed of the generator the reconnect jitter is drawn from: the state
    /// machine stays deterministic (a simulation replays it from its seed);
    /// a server seeds it at random.
    pub jitter_seed: u64,
    /// Ask the master about a transaction voted on but undecided for this long.
    pub outcome_query_after_ms: u64,
    /// Drop the link and reconnect when nothing arrived from the master for
    /// this long (it heartbeats every 100 ms by default). This is what notices
    /// a link that died silently (a partition eats the master's FIN), so it
    /// bounds how late after a heal the slave starts redialing.
    pub master_silence_ms: u64,
    /// The leadership epoch of the master to follow (failover through etcd; 0
    /// without it): a master that answers with an older one has been deposed.
    pub epoch: u64,
    /// The read lease asked for in every heartbeat (`--slave-read-lease-ms`;
    /// 0: none, the slave serves stale reads by choice).
    pub read_lease_ms: u32,
}

impl Default for ParticipantConfig {
    fn default() -> ParticipantConfig {
        ParticipantConfig {
            client_addr: String::new(),
            node_id: 0,
            may_discard_data: false,
            reconnect_min_ms: 50,
            // With the reactor's 500 ms connect timeout, a heal is followed by a
            // successful dial within about a second, whatever the outage's length.
            reconnect_max_ms: 500,
            jitter_seed: 0,
            outcome_query_after_ms: 1_000,
            // Fifteen missed heartbeats; the master evicts a slave silent for 1 s.
            master_silence_ms: 1_500,
            epoch: 0,
            read_lease_ms: 200,
        }
    }
}

/// The slave's link to its master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No link; a reconnect timer is armed.
    Down,
    /// [`Action::Connect`] issued, waiting for `Connected`/`ConnectFailed`.
    Connecting,
    /// REGISTER sent, catching up (log or snapshot).
    CatchingUp(PeerId),
    /// Caught up: a 2PC participant.
    Following(PeerId),
    /// The master's history differs from the data held here, which may not be
    /// discarded: registered, heartbeating, applying nothing.
    Diverged(PeerId),
}

impl LinkState {
    fn peer(self) -> Option<PeerId> {
        match self {
            LinkState::CatchingUp(p) | LinkState::Following(p) | LinkState::Diverged(p) => Some(p),
            LinkState::Down | LinkState::Connecting => None,
        }
    }
}

/// A PREPARE this slave has accepted.
#[derive(Debug, Clone)]
struct Prepared {
    ops: Ops,
    /// When the vote went out (None while the PREPARE is being persisted).
    voted_at_ms: Option<u64>,
}

/// What to send once a log record is durable.
#[derive(Debug, Clone, Copy)]
enum AfterPersist {
    Vote(u64),
    Ack(u64),
    CaughtUp(u64),
}

/// The 2PC participant of a slave.
#[derive(Debug)]
pub struct Participant {
    config: ParticipantConfig,
    link: LinkState,
    /// Highest sequence number whose outcome is known and applied.
    position: u64,
    /// The history `position` belongs to: the history id of the master this slave
    /// last caught up from (0: none yet; only position 0 is meaningful without one).
    history_id: u64,
    /// The history id the master of the current link announced in REGISTERED.
    link_history: Option<u64>,
    prepared: BTreeMap<u64, Prepared>,
    /// Transactions prepared on an earlier link (or by an earlier process)
    /// whose outcome is not known yet. The catch-up does not need them, but
    /// a promotion does: an acknowledged write may be held only here. They
    /// are known decided once a later commit is applied (decisions are taken
    /// in sequence order) or a snapshot replaces the store, exactly as the
    /// write-ahead log's replay forgets their PREPARE records.
    unresolved: BTreeMap<u64, Ops>,
    /// Whether the catch-up of the current link is durable (its CAUGHT_UP
    /// reply went out): the data held here is then the master's, on disk too.
    caught_up_durably: bool,
    /// Sequence number of the snapshot being installed, if one is.
    snapshot_in_progress: Option<u64>,
    last_lsn: u64,
    durable_lsn: u64,
    /// Replies waiting for durability, in lsn order, each tied to the link it answers.
    after_persist: VecDeque<(u64, PeerId, AfterPersist)>,
    reconnect_delay_ms: u64,
    /// State of the jitter generator (splitmix64), seeded from the config.
    jitter_state: u64,
    outcome_timer_armed: bool,
    violations: u64,
    actions: VecDeque<Action>,
    /// When the current link last delivered anything.
    last_heard_ms: u64,
    /// The highest sequence number any master was heard to have used or
    /// released (a promoted slave numbers its transactions after it).
    seen_seq: u64,
    /// Reads may be served until this time (0: no lease): granted by the
    /// master of the current link, after it sent everything released before.
    lease_until_ms: u64,
}

impl Participant {
    /// A slave whose store (recovered from its log) reflects every commit through
    /// `recovered_seq`. Emits [`Action::Connect`] at once. It knows no history
    /// yet, so unless `recovered_seq` is 0 its first catch-up is a snapshot.
    pub fn new(config: ParticipantConfig, recovered_seq: u64) -> Participant {
        Participant::recover(config, recovered_seq, 0)
    }

    /// A slave restarted from its write-ahead log: its store reflects every
    /// commit through `recovered_seq` of history `history_id`, so it can resume
    /// by log replay from a master of that history.
    pub fn recover(config: ParticipantConfig, recovered_seq: u64, history_id: u64) -> Participant {
        let mut p = Participant {
            reconnect_delay_ms: config.reconnect_min_ms,
            jitter_state: config.jitter_seed,
            config,
            link: LinkState::Connecting,
            position: recovered_seq,
            history_id,
            link_history: None,
            prepared: BTreeMap::new(),
            unresolved: BTreeMap::new(),
            caught_up_durably: false,
            snapshot_in_progress: None,
            last_lsn: 0,
            durable_lsn: 0,
            after_persist: VecDeque::new(),
            outcome_timer_armed: false,
            violations: 0,
            actions: VecDeque::new(),
            last_heard_ms: 0,
            seen_seq: recovered_seq,
            lease_until_ms: 0,
        };
        p.actions.push_back(Action::Connect);
        p
    }

    /// Next action for the reactor, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Number this machine's log records after `appended` (see
    /// [`Coordinator::start_lsns_after`](super::Coordinator::start_lsns_after)).
    pub fn start_lsns_after(&mut self, appended: u64, durable: u64) {
        self.last_lsn = appended;
        self.durable_lsn = durable;
    }

    /// The highest sequence number a master was heard to have used or released.
    pub fn seen_seq(&self) -> u64 {
        self.seen_seq.max(self.position)
    }

    /// Hand over the transactions prepared and not known decided, oldest
    /// first, including those prepared on an earlier link: a slave promoted
    /// to master commits them (docs/FAILOVER.md). A PREPARE on the current
    /// link replaces an older one of the same number (a restarted master
    /// reuses the numbers of what it never decided).
    pub fn take_prepared(&mut self) -> BTreeMap<u64, Ops> {
        let mut all = std::mem::take(&mut self.unresolved);
        all.extend(
            std::mem::take(&mut self.prepared)
                .into_iter()
                .map(|(seq, p)| (seq, p.ops)),
        );
        all
    }

    /// Keep `prepared` (transactions this node prepared under an earlier
    /// role, e.g. recovered from its log) as in doubt until their outcome is
    /// known, so that a promotion still commits them.
    pub fn keep_in_doubt(&mut self, prepared: BTreeMap<u64, Ops>) {
        let position = self.position;
        self.unresolved
            .extend(prepared.into_iter().filter(|(seq, _)| *seq > position));
    }

    /// Highest sequence number whose outcome this slave knows and has applied.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The client address announced in the next REGISTER.
    pub fn client_addr(&self) -> &str {
        &self.config.client_addr
    }

    /// Announce `addr` from the next REGISTER on (a slave bound to an
    /// unspecified address learns its own from the link to the master).
    pub fn set_client_addr(&mut self, addr: String) {
        self.config.client_addr = addr;
    }

    /// The history id of the master this slave last caught up from (0: none yet).
    pub fn history_id(&self) -> u64 {
        self.history_id
    }

    /// Whether this slave follows its master with the catch-up durable:
    /// everything logged before it (a resync's checkpoint among them) is on
    /// disk, so a crash can no longer bring back what it replaced.
    pub fn caught_up_durably(&self) -> bool {
        self.caught_up_durably && matches!(self.link, LinkState::Following(_))
    }

    /// Until when this slave may serve reads (its clock, ms), if it holds a
    /// read lease: it follows its master, which granted the lease after
    /// sending it every commit released before; so no read served before
    /// then misses a write acknowledged more than the lease ago.
    pub fn read_lease_until(&self) -> Option<u64> {
        match self.link {
            LinkState::Following(_) if self.lease_until_ms > 0 => Some(self.lease_until_ms),
            _ => None,
        }
    }

    /// The link's state (for STATS).
    pub fn link(&self) -> LinkState {
        self.link
    }

    /// Transactions prepared and not yet decided.
    pub fn in_doubt(&self) -> usize {
        self.prepared.len()
    }

    /// Messages the master sent that broke the protocol (each forced a resync).
    pub fn protocol_violations(&self) -> u64 {
        self.violations
    }

    /// Feed one event.
    pub fn handle(&mut self, now_ms: u64, event: Event) {
        match event {
            Event::Connected { peer } => {
                self.last_heard_ms = now_ms;
                self.on_connected(peer);
                if self.link.peer() == Some(peer) {
                    self.actions.push_back(Action::SetTimer {
                        timer: TimerId::MasterSilence,
                        at_ms: now_ms + self.config.master_silence_ms,
                    });
                }
            }
            Event::ConnectFailed => {
                if self.link == LinkState::Connecting {
                    self.link_down(now_ms);
                }
            }
            Event::PeerLost { peer } => {
                if self.link.peer() == Some(peer) {
                    info!("lost the master on {peer:?}");
                    self.link_down(now_ms);
                }
            }
            Event::Message { peer, msg } => {
                if self.link.peer() == Some(peer) {
                    self.last_heard_ms = now_ms;
                    self.seen_seq = self.seen_seq.max(msg.header_seq());
                    self.on_message(now_ms, peer, msg);
                }
            }
            Event::Persisted { lsn } => self.on_persisted(now_ms, lsn),
            Event::TimerFired { timer } => self.on_timer(now_ms, timer),
            Event::ClientWrites { .. }
            | Event::SnapshotSent { .. }
            | Event::SnapshotProgress { .. }
            | Event::SnapshotJoined { .. }
            | Event::PeerDrained { .. }
            | Event::SyncSetRecorded { .. } => {
                warn!("participant ignores master-side event {event:?}");
            }
        }
    }

    fn send(&mut self, peer: PeerId, msg: PeerMessage) {
        self.actions.push_back(Action::Send { peer, msg });
    }

    fn persist(&mut self, record: Record) -> u64 {
        self.last_lsn += 1;
        self.actions.push_back(Action::Persist {
            lsn: self.last_lsn,
            record,
        });
        self.last_lsn
    }

    fn on_connected(&mut self, peer: PeerId) {
        if self.link != LinkState::Connecting {
            // Not asked for (or superseded): do not keep two links to the master.
            self.actions.push_back(Action::Disconnect { peer });
            return;
        }
        // Prepared transactions from the old link are in doubt. The catch-up that
        // follows registration resolves them: every commit after `position` is
        // replayed and anything not replayed was aborted (presumed abort). So
        // the catch-up does without them, and the master may even reuse their
        // numbers. They stay in doubt for a promotion until their outcome is known:
        // this node may still be the only one a promotion can pick that holds
        // an acknowledged write (the master may die before it ever answers).
        for (seq, p) in std::mem::take(&mut self.prepared) {
            self.unresolved.insert(seq, p.ops);
        }
        self.snapshot_in_progress = None;
        self.link_history = None;
        self.lease_until_ms = 0;
        self.link = LinkState::CatchingUp(peer);
        self.send(
            peer,
            PeerMessage::Register {
                client_addr: self.config.client_addr.clone(),
                last_applied_seq: self.position,
                history_id: self.history_id,
                protocol_version: PEER_PROTOCOL_VERSION,
                node_id: self.config.node_id,
                may_discard_data: self.config.may_discard_data,
                epoch: self.config.epoch,
            },
        );
    }

    fn link_down(&mut self, now_ms: u64) {
        self.link = LinkState::Down;
        self.lease_until_ms = 0;
        self.caught_up_durably = false;
        self.snapshot_in_progress = None;
        self.link_history = None;
        let delay = self.jittered(self.reconnect_delay_ms);
        self.actions.push_back(Action::SetTimer {
            timer: TimerId::Reconnect,
            at_ms: now_ms + delay,
        });
        self.reconnect_delay_ms = (self.reconnect_delay_ms * 2).min(self.config.reconnect_max_ms);
    }

    /// A delay between half of `delay_ms` and all of it ("equal jitter"): spread
    /// enough that slaves which lost their master at once redial apart, never
    /// longer than the documented bound.
    fn jittered(&mut self, delay_ms: u64) -> u64 {
        let half = delay_ms / 2;
        delay_ms - half + self.next_random() % (half + 1)
    }

    /// splitmix64: tiny, and good enough to spread retries.
    fn next_random(&mut self) -> u64 {
        self.jitter_state = self.jitter_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.jitter_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The master broke the protocol: drop the link and resync from scratch.
    fn violation(&mut self, now_ms: u64, peer: PeerId, what: &str) {
        warn!("protocol violation from master on {peer:?}: {what}; resyncing");
        self.violations += 1;
        self.actions.push_back(Action::Disconnect { peer });
        self.link_down(now_ms);
    }

    fn on_message(&mut self, now_ms: u64, peer: PeerId, msg: PeerMessage) {
        if self.link == LinkState::Diverged(peer) && !matches!(msg, PeerMessage::Heartbeat { .. }) {
            return self.violation(now_ms, peer, "data sent to a diverged slave");
        }
        let following = self.link == LinkState::Following(peer);
        let registered = self.link_history.is_some();
        match msg {
            PeerMessage::Registered {
                history_id,
                catch_up,
                epoch,
                ..
            } => {
                if registered {
                    return self.violation(now_ms, peer, "registered twice");
                }
                if epoch < self.config.epoch {
                    // A deposed master still running: its votes must never count.
                    return self.violation(
                        now_ms,
                        peer,
                        &format!(
                            "master of epoch {epoch}, but epoch {} has begun",
                            self.config.epoch
                        ),
                    );
                }
                self.link_history = Some(history_id);
                let wipes = history_id != self.history_id || self.position > 0;
                match catch_up {
                    CatchUp::Diverged => {
                        log::error!(
                            "master's history {history_id:#018x} is not the one of the data held \
                             here (seq {} of history {:#018x}); keeping this data and applying \
                             nothing. Start with --resync-discard-data to replace it with the \
                             master's",
                            self.position,
                            self.history_id
                        );
                        self.link = LinkState::Diverged(peer);
                        return;
                    }
                    CatchUp::Snapshot { .. }
                        if wipes
                            && history_id != self.history_id
                            && self.position > 0
                            && !self.config.may_discard_data =>
                    {
                        // A master that does not know the rule: refuse on our side.
                        return self.violation(
                            now_ms,
                            peer,
                            "snapshot of another history would replace the data held here",
                        );
                    }
                    _ => {}
                }
                if let CatchUp::Log { from_seq } = catch_up {
                    if from_seq != self.position {
                        return self.violation(
                            now_ms,
                            peer,
                            "log catch-up from the wrong position",
                        );
                    }
                    let same = history_id == self.history_id
                        || (self.history_id == 0 && self.position == 0);
                    if !same {
                        return self.violation(now_ms, peer, "log catch-up across histories");
                    }
                    // The master vouches that our position is one of its history's:
                    // from here on (and for every later registration) we are in its.
                    if self.history_id != history_id {
                        self.history_id = history_id;
                        self.persist(Record::History { history_id });
                    }
                }
            }
            PeerMessage::SnapshotChunk {
                snapshot_seq,
                entries,
                last,
            } => {
                if following {
                    return self.violation(now_ms, peer, "snapshot while following");
                }
                let Some(master_history) = self.link_history else {
                    return self.violation(now_ms, peer, "snapshot before REGISTERED");
                };
                let begin = self.snapshot_in_progress != Some(snapshot_seq);
                self.snapshot_in_progress = if last { None } else { Some(snapshot_seq) };
                self.actions.push_back(Action::InstallSnapshot {
                    at_seq: snapshot_seq,
                    entries,
                    begin,
                    end: last,
                });
                if last {
                    // The checkpoint supersedes every PREPARE record before it.
                    self.unresolved.clear();
                    self.position = snapshot_seq;
                    self.history_id = master_history;
                    self.persist(Record::Checkpoint {
                        seq: snapshot_seq,
                        history_id: master_history,
                    });
                }
            }
            PeerMessage::LogEntry { seq, ops } => {
                if !registered {
                    return self.violation(now_ms, peer, "log entry before REGISTERED");
                }
                if seq <= self.position || self.prepared.range(..=seq).next().is_some() {
                    return self.violation(now_ms, peer, "log entry out of order");
                }
                self.apply(seq, ops.clone());
                self.persist(Record::CommittedTxn { seq, ops });
            }
            PeerMessage::CaughtUp { seq } => {
                if following
                    || !registered
                    || seq < self.position
                    || self.snapshot_in_progress.is_some()
                {
                    return self.violation(now_ms, peer, "caught-up marker out of place");
                }
                // Every outcome through `seq` has been delivered (aborts leave no entry).
                self.position = seq;
                self.link = LinkState::Following(peer);
                self.reconnect_delay_ms = self.config.reconnect_min_ms;
                self.after_persist
                    .push_back((self.last_lsn, peer, AfterPersist::CaughtUp(seq)));
                self.on_persisted(now_ms, self.durable_lsn);
            }
            PeerMessage::Prepare {
                seq,
                commit_through,
                ops,
            } => {
                // The commit it carries comes first, as if sent just before it.
                if commit_through > 0 && !self.commit_through(now_ms, peer, commit_through) {
                    return;
                }
                let newest = self.prepared.keys().next_back().copied().unwrap_or(0);
                if !following || seq <= self.position || seq <= newest {
                    // Cannot take part; the master evicts us and we resync.
                    self.send(
                        peer,
                        PeerMessage::Vote {
                            seq,
                            vote: Vote::No(format!(
                                "prepare {seq} out of order (position {}, newest prepared {newest})",
                                self.position
                            )),
                            ack_through: 0,
                        },
                    );
                    return;
                }
                let lsn = self.persist(Record::Prepared {
                    seq,
                    ops: ops.clone(),
                });
                self.prepared.insert(
                    seq,
                    Prepared {
                        ops,
                        voted_at_ms: None,
                    },
                );
                self.after_persist
                    .push_back((lsn, peer, AfterPersist::Vote(seq)));
            }
            PeerMessage::Commit { seq } => {
                self.commit_through(now_ms, peer, seq);
            }
            PeerMessage::Abort { seq } => {
                if self.prepared.remove(&seq).is_some() {
                    // The position does not move past an abort: after a failover
                    // a new master that never saw this ABORT may commit `seq`, and
                    // re-registering below it is what makes us replay it then.
                    // The abort is made durable and acknowledged, because the
                    // master answers ABORTED only once every participant has it:
                    // a slave promoted later must not commit what it was told
                    // is aborted.
                    let lsn = self.persist(Record::AbortDecision { seq });
                    self.after_persist
                        .push_back((lsn, peer, AfterPersist::Ack(seq)));
                }
            }
            PeerMessage::Heartbeat {
                stamp,
                lease_ms,
                poll,
                ..
            } => {
                if poll {
                    let seq = self.position;
                    let lease_ms = self.config.read_lease_ms;
                    self.send(
                        peer,
                        PeerMessage::Heartbeat {
                            seq,
                            stamp: now_ms,
                            lease_ms,
                            poll: false,
                        },
                    );
                } else if following
                    && lease_ms > 0
                    && self.config.read_lease_ms > 0
                    && stamp <= now_ms
                {
                    // A grant from a stamp of ours: the lease runs from when we
                    // sent it, never from when the (possibly delayed) grant came.
                    // It never exceeds what we asked for.
                    let lease = u64::from(lease_ms.min(self.config.read_lease_ms));
                    self.lease_until_ms = self.lease_until_ms.max(stamp + lease);
                }
            }
            PeerMessage::Outcome { seq, outcome } => {
                // The answer may trail the decision itself (the query crossed the
                // COMMIT/ABORT on the wire): only a transaction still held matters.
                if !self.prepared.contains_key(&seq) {
                    return;
                }
                match outcome {
                    Outcome::Aborted => {
                        self.prepared.remove(&seq);
                        self.persist(Record::AbortDecision { seq });
                    }
                    Outcome::Unknown => {
                        self.violation(now_ms, peer, "master forgot a transaction we hold");
                    }
                    Outcome::Pending | Outcome::Committed => {}
                }
            }
            PeerMessage::Register { .. }
            | PeerMessage::Vote { .. }
            | PeerMessage::Ack { .. }
            | PeerMessage::OutcomeQuery { .. } => {
                self.violation(now_ms, peer, "master-bound message sent to a slave");
            }
        }
    }

    /// COMMIT(`seq`), alone or carried by a PREPARE: every transaction held
    /// prepared through `seq` committed (the master sent the ABORT of any
    /// that did not before it). Applies and logs each in order; the ACK
    /// follows once they are durable. Returns false on a violation: `seq`
    /// is not held prepared (the link is then closed).
    fn commit_through(&mut self, now_ms: u64, peer: PeerId, seq: u64) -> bool {
        if seq <= self.position || !self.prepared.contains_key(&seq) {
            self.violation(now_ms, peer, "commit of a transaction not held prepared");
            return false;
        }
        let later = self.prepared.split_off(&(seq + 1));
        let committed = std::mem::replace(&mut self.prepared, later);
        let mut lsn = self.last_lsn;
        for (s, txn) in committed {
            debug_assert!(txn.voted_at_ms.is_some(), "commit before our yes vote");
            self.apply(s, txn.ops);
            lsn = self.persist(Record::Committed { seq: s });
        }
        self.after_persist
            .push_back((lsn, peer, AfterPersist::Ack(seq)));
        true
    }

    fn apply(&mut self, seq: u64, ops: Ops) {
        debug_assert!(seq > self.position, "commit order must increase");
        // Everything numbered up to a commit is decided.
        self.unresolved = self.unresolved.split_off(&(seq + 1));
        self.position = seq;
        self.actions.push_back(Action::Apply {
            seq,
            ops,
            replies: Vec::new(),
            key_hashes: Vec::new(),
        });
    }

    fn on_persisted(&mut self, now_ms: u64, lsn: u64) {
        debug_assert!(lsn <= self.last_lsn, "persisted lsn {lsn} never issued");
        self.durable_lsn = self.durable_lsn.max(lsn);
        let current = self.link.peer();
        let mut due = Vec::new();
        while let Some(&(lsn, peer, what)) = self.after_persist.front() {
            if lsn > self.durable_lsn {
                break;
            }
            self.after_persist.pop_front();
            if Some(peer) != current {
                continue; // answers belong to a link that is gone
            }
            due.push((peer, what));
        }
        // Acks are cumulative: one per batch of durable outcomes is enough,
        // and it rides the batch's first YES vote if there is one.
        let mut ack = due.iter().rev().find_map(|&(peer, what)| match what {
            AfterPersist::Ack(seq) => Some((peer, seq)),
            _ => None,
        });
        for (peer, what) in due {
            match what {
                AfterPersist::Vote(seq) => {
                    if let Some(p) = self.prepared.get_mut(&seq) {
                        p.voted_at_ms = Some(now_ms);
                        let ack_through = match ack {
                            Some((p, acked)) if p == peer => {
                                ack = None;
                                acked
                            }
                            _ => 0,
                        };
                        self.send(
                            peer,
                            PeerMessage::Vote {
                                seq,
                                vote: Vote::Yes,
                                ack_through,
                            },
                        );
                        if !self.outcome_timer_armed {
                            self.outcome_timer_armed = true;
                            self.actions.push_back(Action::SetTimer {
                                timer: TimerId::OutcomeCheck,
                                at_ms: now_ms + self.config.outcome_query_after_ms,
                            });
                        }
                    }
                }
                AfterPersist::Ack(_) => {}
                AfterPersist::CaughtUp(seq) => {
                    self.caught_up_durably = true;
                    self.send(peer, PeerMessage::CaughtUp { seq });
                }
            }
        }
        if let Some((peer, seq)) = ack {
            self.send(peer, PeerMessage::Ack { seq });
        }
    }

    fn on_timer(&mut self, now_ms: u64, timer: TimerId) {
        match timer {
            TimerId::Reconnect => {
                if self.link == LinkState::Down {
                    self.link = LinkState::Connecting;
                    self.actions.push_back(Action::Connect);
                }
            }
            TimerId::OutcomeCheck => {
                self.outcome_timer_armed = false;
                let Some(peer) = self.link.peer() else {
                    return; // re-registration will resolve what is in doubt
                };
                let limit = self.config.outcome_query_after_ms;
                let stale: Vec<u64> = self
                    .prepared
                    .iter()
                    .filter(|(_, p)| p.voted_at_ms.is_some_and(|t| t + limit <= now_ms))
                    .map(|(s, _)| *s)
                    .collect();
                for seq in stale {
                    self.send(peer, PeerMessage::OutcomeQuery { seq });
                }
                if !self.prepared.is_empty() {
                    self.outcome_timer_armed = true;
                    self.actions.push_back(Action::SetTimer {
                        timer: TimerId::OutcomeCheck,
                        at_ms: now_ms + limit,
                    });
                }
            }
            TimerId::MasterSilence => {
                let Some(peer) = self.link.peer() else {
                    return; // the next link arms it again
                };
                let deadline = self.last_heard_ms + self.config.master_silence_ms;
                if now_ms < deadline {
                    self.actions.push_back(Action::SetTimer {
                        timer: TimerId::MasterSilence,
                        at_ms: deadline,
                    });
                    return;
                }
                warn!(
                    "nothing from the master on {peer:?} for {} ms; reconnecting",
                    now_ms - self.last_heard_ms
                );
                self.actions.push_back(Action::Disconnect { peer });
                self.link_down(now_ms);
            }
            TimerId::Txn(_)
            | TimerId::Heartbeat
            | TimerId::ReadFence
            | TimerId::SnapshotRetry(_)
            | TimerId::CommitFlush => {}
        }
    }
}

#[cfg(test)]
mod tests;
