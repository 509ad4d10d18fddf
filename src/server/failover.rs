//! The reactor's side of failover through etcd: it runs the [`Election`],
//! hands its requests to the etcd [`Agent`], and changes the server's role
//! when leadership moves. The rules these changes follow, and why no
//! acknowledged write is lost by them, are in docs/FAILOVER.md.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};
use mio::Waker;

use super::handler::ReplyTarget;
use super::{Role, Server};
use crate::failover::agent::Agent;
use crate::failover::{self, Election, ElectionConfig, LeaderRecord};
use crate::protocol::Status;
use crate::replication::{
    ClientRef, CommitLog, Coordinator, CoordinatorConfig, Event, Ops, Participant,
    ParticipantConfig, Record,
};

/// How a server takes part in failover (`--etcd`, `--cluster`, `--lease-ttl-ms`).
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    /// etcd endpoints (`http://host:port`).
    pub endpoints: Vec<String>,
    /// The cluster's name: its keys live under `/dkvs/NAME/`.
    pub cluster: String,
    /// TTL of the leader's lease.
    pub lease_ttl_ms: u64,
}

/// The election and the agent that talks to etcd for it.
pub struct Failover {
    pub(super) election: Election,
    agent: Agent,
    /// The epoch of the leader this node follows or is.
    pub(super) epoch: u64,
    /// The leader this node follows (or is).
    pub(super) leader: Option<LeaderRecord>,
    /// The epoch this node last led in, as its data directory records it.
    led_epoch: Option<u64>,
    /// The address this node records in etcd when it leads (announced).
    pub(super) addr: String,
}

impl Failover {
    /// Start the agent's threads and the election.
    pub fn start(
        config: &FailoverConfig,
        node_id: u64,
        addr: String,
        waker: Arc<Waker>,
        led_epoch: Option<u64>,
        now_ms: u64,
    ) -> Failover {
        // Each etcd call is bounded well inside the lease, so a keepalive
        // queued behind a slow call still lands in time.
        let timeout = Duration::from_millis((config.lease_ttl_ms / 4).clamp(100, 2_000));
        let agent = Agent::start(config.endpoints.clone(), &config.cluster, timeout, waker);
        let election = Election::new(
            ElectionConfig {
                node_id,
                addr: addr.clone(),
                lease_ttl_ms: config.lease_ttl_ms,
            },
            now_ms,
        );
        Failover {
            election,
            agent,
            epoch: 0,
            leader: None,
            led_epoch,
            addr,
        }
    }

    /// The epoch, the leader's address and the recorded in-sync set, for INFO.
    pub fn summary(&self) -> (u64, String, String) {
        let leader = self
            .leader
            .as_ref()
            .map_or(String::new(), |l| l.addr.clone());
        let members = self.election.sync_record().map_or(String::new(), |s| {
            s.members
                .iter()
                .map(|m| format!("{m:016x}"))
                .collect::<Vec<_>>()
                .join(",")
        });
        (self.epoch, leader, members)
    }

    /// The STATS lines of failover.
    pub fn describe(&self, now_ms: u64) -> String {
        let state = match self.election.state() {
            failover::State::Observing => "observing",
            failover::State::Following(_) => "following",
            failover::State::Vacant => "waiting",
            failover::State::Granting | failover::State::Campaigning { .. } => "campaigning",
            failover::State::Leading { .. } => "leading",
        };
        let mut text = format!("failover {state}\nepoch {}\n", self.epoch);
        if let Some(l) = &self.leader {
            text.push_str(&format!("leader {} node={:016x}\n", l.addr, l.node_id));
        }
        if let Some(s) = self.election.sync_record() {
            let members: Vec<String> = s.members.iter().map(|m| format!("{m:016x}")).collect();
            text.push_str(&format!("sync_set {}\n", members.join(",")));
        }
        if let Some(left) = self.election.lease_left_ms(now_ms) {
            text.push_str(&format!("lease_left_ms {left}\n"));
        }
        text
    }
}

/// What a standby holds for the role it takes next.
pub struct Standby {
    /// The history its store's position belongs to (0: none).
    pub history_id: u64,
    /// Transactions a promotion of this node commits: prepared here and not
    /// known decided, or (after a step-down) decided to commit and not released.
    pub prepared: BTreeMap<u64, Ops>,
    /// Commits recovered from the log (for a promotion's partial-resync log).
    pub commits: Vec<(u64, Ops)>,
    /// The sequence number the log's snapshot covered.
    pub floor: u64,
    /// The highest sequence number this node knows was used (an abort's
    /// included): leading from here numbers after it.
    pub seen: u64,
}

impl Server {
    /// The etcd agent woke the reactor: feed its replies to the election.
    pub(super) fn on_etcd_wake(&mut self) {
        let Some(f) = self.failover.as_mut() else {
            return;
        };
        let now = self.clock.elapsed().as_millis() as u64;
        while let Some(reply) = f.agent.try_recv() {
            f.election.on_reply(now, reply);
        }
        self.run_election();
    }

    /// Time passed: let the election renew, notice and read.
    pub(super) fn election_tick(&mut self, now: u64) {
        if let Some(f) = self.failover.as_mut() {
            f.election.tick(now);
            self.run_election();
        }
    }

    /// When the election next needs a tick.
    pub(super) fn election_deadline(&self) -> Option<u64> {
        self.failover.as_ref().map(|f| f.election.next_wake_ms())
    }

    /// Hand the coordinator's in-sync set to the election to record in etcd.
    pub(super) fn record_sync_set(&mut self, version: u64, members: Vec<u64>) {
        if let Some(f) = self.failover.as_mut() {
            f.election.record_sync_set(version, members);
            self.run_election();
        } else {
            warn!("in-sync set {version} not recorded: no failover configured");
        }
    }

    fn run_election(&mut self) {
        loop {
            let Some(f) = self.failover.as_mut() else {
                return;
            };
            let Some(action) = f.election.poll_action() else {
                return;
            };
            self.replication_changed = true;
            match action {
                failover::Action::Etcd(request) => f.agent.send(request),
                failover::Action::Lead { epoch } => self.lead(epoch),
                failover::Action::Follow(leader) => self.follow(leader),
                failover::Action::StepDown => self.step_down(),
                failover::Action::LeaseValid(valid) => {
                    let now = self.now_ms();
                    if let Role::Master(c) = &mut self.role {
                        c.set_lease_valid(now, valid);
                    }
                    self.core.read_refusal = (!valid).then(|| {
                        "this master's leadership lease is not renewed (etcd unreachable?); \
                         reads would risk being stale"
                            .to_string()
                    });
                }
                failover::Action::SyncRecorded { version } => {
                    self.feed(Event::SyncSetRecorded { version });
                }
            }
            self.work_left = true;
        }
    }

    /// This node won `epoch`: commit what it prepared and serve as master.
    fn lead(&mut self, epoch: u64) {
        // Before the first acknowledgement of the epoch: if this node is
        // deposed later, it knows it must not trust decisions it took alone.
        if let Err(e) = self.wal.set_led_epoch(Some(epoch)) {
            error!("cannot record the epoch led: {e}; not leading");
            return;
        }
        self.drop_all_peers();
        let history_of_store = self.role.history_id();
        let (history_id, prepared, commits, floor, seen) =
            match std::mem::replace(&mut self.role, Role::Standby(Box::new(empty_standby()))) {
                Role::Slave {
                    mut participant, ..
                } => (
                    participant.history_id(),
                    participant.take_prepared(),
                    Vec::new(),
                    self.core.commit_seq,
                    participant.seen_seq(),
                ),
                Role::Standby(s) => (s.history_id, s.prepared, s.commits, s.floor, s.seen),
                Role::Master(_) => (
                    history_of_store,
                    BTreeMap::new(),
                    Vec::new(),
                    self.core.commit_seq,
                    0,
                ),
            };
        // The promotion rule: a transaction prepared here and not seen aborted
        // commits. Every acknowledged write was prepared on every recorded
        // slave, so this node holds them all.
        let mut lsn = self.wal.appended_lsn();
        let mut committed = 0;
        let mut commits = commits;
        for (seq, ops) in prepared {
            if seq <= self.core.commit_seq {
                continue;
            }
            lsn += 1;
            self.wal.append(
                lsn,
                &Record::CommitDecision {
                    seq,
                    ops: ops.clone(),
                },
            );
            self.apply(seq, &ops, &[], Vec::new());
            // Slaves that held it only prepared catch up by log from below it.
            commits.push((seq, ops));
            committed += 1;
        }
        let history_id = if history_id != 0 {
            history_id
        } else {
            let id = rand::random::<u64>().max(1);
            if let Err(e) = self.wal.start_history(id) {
                error!("cannot start a history: {e}");
            }
            lsn = self.wal.appended_lsn();
            id
        };
        // Number after everything the old master was heard to use: a slave
        // may have seen an aborted transaction's number, and numbers name
        // transactions. (Gaps are harmless: aborts leave them too.)
        let released = self.core.commit_seq.max(seen);
        self.core.commit_seq = released;
        let config = CoordinatorConfig {
            epoch,
            history_id,
            record_sync_set: true,
            ..self.coordinator_config.clone()
        };
        let mut log =
            CommitLog::new(config.log_capacity, floor).with_max_bytes(config.log_max_bytes);
        for (seq, ops) in commits {
            log.push(seq, ops);
        }

        let now = self.now_ms();
        let mut coordinator = Coordinator::recover(config, now, self.core.commit_seq, log);
        coordinator.start_lsns_after(lsn, self.wal.reported_lsn());
        // The in-doubt commits were applied at once but are durable only
        // later: no slave catches up to them before they are.
        coordinator.hold_registrations_until(lsn);
        // Nothing is acknowledged before the election says the lease is valid
        // (LeaseValid follows Lead): a campaign settled late may have won a
        // lease that is already past its margin.
        coordinator.set_lease_valid(now, false);
        info!(
            "leading epoch {epoch} at seq {} of history {history_id:#018x} ({committed} in-doubt transactions committed)",
            self.core.commit_seq
        );
        self.set_role(Role::Master(Box::new(coordinator)));
        if let Some(f) = self.failover.as_mut() {
            f.epoch = epoch;
            f.led_epoch = Some(epoch);
            f.leader = Some(LeaderRecord {
                epoch,
                node_id: self.wal.node_id(),
                addr: f.addr.clone(),
            });
        }
    }

    /// Follow `leader` as a slave.
    fn follow(&mut self, leader: LeaderRecord) {
        if let Some(f) = self.failover.as_ref()
            && f.leader.as_ref() == Some(&leader)
            && matches!(self.role, Role::Slave { .. })
        {
            return;
        }
        let master_addr = match leader.addr.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(e) => {
                warn!(
                    "leader address {:?} in etcd: {e}; not following",
                    leader.addr
                );
                return;
            }
        };
        if matches!(self.role, Role::Master(_)) {
            self.step_down();
        }
        self.drop_all_peers();
        let (mut history_id, mut in_doubt) = match &mut self.role {
            Role::Slave { participant, .. } => {
                (participant.history_id(), participant.take_prepared())
            }
            Role::Standby(s) => (s.history_id, std::mem::take(&mut s.prepared)),
            Role::Master(_) => (0, BTreeMap::new()),
        };
        let mut may_discard = self.resync_discard_data;
        let led_epoch = self.failover.as_ref().and_then(|f| f.led_epoch);
        if let Some(led) = led_epoch
            && led < leader.epoch
        {
            // This node led an earlier epoch: decisions it took alone (an abort
            // a slave never heard of, a commit decided but not released) may
            // differ from what the new master decided. Start over from its
            // data; everything acknowledged is there.
            warn!(
                "this node led epoch {led}; epoch {} is led by {}: discarding local data to resync",
                leader.epoch, leader.addr
            );
            self.wal.before_clear(&self.core.store);
            // Keeps the hash key: see `Store::empty_like`.
            self.core.store = self.core.store.empty_like();
            self.core.commit_seq = 0;
            history_id = 0;
            in_doubt.clear();
            let lsn = self.wal.appended_lsn() + 1;
            self.wal.append(
                lsn,
                &Record::Checkpoint {
                    seq: 0,
                    history_id: 0,
                },
            );
            may_discard = true;
        }
        if !in_doubt.is_empty() {
            info!(
                "{} in-doubt transactions follow the new master's outcome (kept for a promotion until it is known)",
                in_doubt.len()
            );
        }
        let mut participant = Participant::recover(
            ParticipantConfig {
                client_addr: self.failover.as_ref().map_or_else(
                    || super::announced(&self.announce, self.addr),
                    |f| f.addr.clone(),
                ),
                node_id: self.wal.node_id(),
                may_discard_data: may_discard,
                epoch: leader.epoch,
                read_lease_ms: self.read_lease_ms,
                // Slaves that lost their master together redial apart.
                jitter_seed: rand::random(),
                ..ParticipantConfig::default()
            },
            self.core.commit_seq,
            history_id,
        );
        participant.start_lsns_after(self.wal.appended_lsn(), self.wal.reported_lsn());
        // Until their outcome is known this node may be the one a promotion
        // picks to hold them (an acknowledged write among them must survive).
        participant.keep_in_doubt(in_doubt);
        info!("following {} in epoch {}", leader.addr, leader.epoch);
        self.set_role(Role::Slave {
            participant: Box::new(participant),
            master_addr,
            master: leader.addr.clone(),
            staging: None,
        });
        self.core.read_refusal = None;
        if let Some(f) = self.failover.as_mut() {
            f.epoch = leader.epoch;
            f.leader = Some(leader);
        }
    }

    /// Leadership is lost: stop acting as master, answer the writes in flight.
    fn step_down(&mut self) {
        let Role::Master(c) = &mut self.role else {
            return;
        };
        // Commits it decided (and logged) but could not release: its log
        // replays them, so if it leads again it commits them (lead() does,
        // as for a slave's prepares) instead of reusing their numbers.
        let decided = c.decided_commits();
        let seen = c.used_seq();
        let clients: Vec<ClientRef> = c.abandon();
        warn!(
            "stepping down: closing the connections of {} writes in flight (the next master decides them)",
            clients.len()
        );
        let history_id = c.history_id();
        // Their outcome is not known here, and no status says "unknown"
        // (UNAVAILABLE means "not applied"): the connection closes, as if this
        // server had died, and a UDP client hears nothing and retries.
        let targets: Vec<ReplyTarget> = clients
            .into_iter()
            .filter_map(|client| self.core.finish(client, Status::Unavailable, 0, &[]))
            .map(|(target, _)| target)
            .collect();
        self.close_writers(targets);
        self.drop_all_peers();
        self.set_role(Role::Standby(Box::new(Standby {
            history_id,
            prepared: decided,
            commits: Vec::new(),
            floor: self.core.commit_seq,
            seen,
        })));
        if let Some(f) = self.failover.as_mut() {
            f.leader = None;
        }
    }

    /// Close every replication link (a role change starts them afresh).
    fn drop_all_peers(&mut self) {
        let keys: Vec<usize> = self.peers.values().copied().collect();
        for key in keys {
            self.drop_peer(key);
        }
    }

    /// Once a deposed leader follows the new one with its catch-up durable,
    /// its own decisions are gone from its disk too: the epoch it led no
    /// longer matters. (Only following is not enough: until the resync's
    /// checkpoint is durable, a crash brings the old data back, and without
    /// the marker it would be trusted.)
    pub(super) fn forget_led_epoch_once_following(&mut self) {
        let Some(f) = self.failover.as_mut() else {
            return;
        };
        if f.led_epoch.is_some()
            && let Role::Slave { participant, .. } = &self.role
            && participant.caught_up_durably()
        {
            match self.wal.set_led_epoch(None) {
                Ok(()) => f.led_epoch = None,
                Err(e) => warn!("cannot remove the led-epoch marker: {e}"),
            }
        }
    }
}

/// A standby holding nothing: what `lead` leaves in the role it moves out.
pub(super) fn empty_standby() -> Standby {
    Standby {
        history_id: 0,
        prepared: BTreeMap::new(),
        commits: Vec::new(),
        floor: 0,
        seen: 0,
    }
}
