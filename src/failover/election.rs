//! Leadership through etcd, as a pure state machine: events in, actions out.
//!
//! This is Patroni's synchronous mode, for dkvs. The leader holds the leader
//! key under a lease and keeps it alive; only a node the in-sync set names
//! (the last leader, or a slave recorded as holding every acknowledged write)
//! may take a vacant key, in one etcd transaction that also bumps the epoch
//! and records an empty in-sync set for the new epoch. The machine never
//! touches the network or a clock: the reactor feeds it etcd replies (from the
//! agent thread) and the time, and carries out what it asks.

use std::collections::{BTreeSet, VecDeque};

use log::{info, warn};

use super::record::{LeaderRecord, SyncRecord};

/// Knobs of the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionConfig {
    /// This node's id (from its data directory).
    pub node_id: u64,
    /// Address this node serves clients and slaves on, written into the leader key.
    pub addr: String,
    /// TTL of the leader's lease (`--lease-ttl-ms`).
    pub lease_ttl_ms: u64,
}

impl ElectionConfig {
    /// How often the leader renews its lease: well inside the TTL.
    pub fn keepalive_interval_ms(&self) -> u64 {
        (self.lease_ttl_ms / 4).max(50)
    }

    /// How long before etcd would expire the lease the leader stops counting
    /// on it: room for a slow keepalive and clock rate drift between hosts.
    pub fn safety_margin_ms(&self) -> u64 {
        (self.lease_ttl_ms / 4).max(100)
    }

    /// How often a node that does not lead reads the keys again, in case a
    /// watch notification was lost.
    pub fn reread_interval_ms(&self) -> u64 {
        (self.lease_ttl_ms / 2).max(100)
    }
}

/// One read of both keys. A value that does not parse is reported as absent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation {
    /// The leader key's value and its lease id.
    pub leader: Option<(LeaderRecord, i64)>,
    /// The in-sync set's value and the key's `mod_revision`.
    pub sync: Option<(SyncRecord, i64)>,
}

/// A request for the etcd agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read the leader key and the in-sync set.
    Read,
    /// Grant a lease of `ttl_ms`, asked at `sent_ms`.
    GrantLease {
        /// The TTL.
        ttl_ms: u64,
        /// When the request was made (the lease runs from no earlier).
        sent_ms: u64,
    },
    /// Take the leader key under `lease`, only if it is absent and the in-sync
    /// set is unchanged since it was read (`sync_mod_revision`, 0 = absent);
    /// write `sync` in the same transaction.
    Campaign {
        /// The lease the key is put under.
        lease: i64,
        /// The leader key's new value.
        leader: LeaderRecord,
        /// The in-sync set's revision as read.
        sync_mod_revision: i64,
        /// The in-sync set's new value.
        sync: SyncRecord,
    },
    /// Renew `lease` (one keepalive round trip), asked at `sent_ms`.
    Keepalive {
        /// The lease.
        lease: i64,
        /// When the request was made.
        sent_ms: u64,
    },
    /// Write the in-sync set, only if the leader key still holds `leader`.
    WriteSync {
        /// Echoed in the reply.
        version: u64,
        /// The leader key's value this node wrote.
        leader: LeaderRecord,
        /// The in-sync set's new value.
        sync: SyncRecord,
    },
    /// Give `lease` up.
    Revoke {
        /// The lease.
        lease: i64,
    },
}

/// What the etcd agent reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Both keys, as read.
    Read(Observation),
    /// A lease was granted.
    LeaseGranted {
        /// Its id.
        lease: i64,
        /// The TTL granted.
        ttl_ms: u64,
        /// Echoed from the request.
        sent_ms: u64,
    },
    /// The campaign transaction ran.
    Campaigned {
        /// Whether the key is ours.
        won: bool,
    },
    /// A keepalive came back.
    KeptAlive {
        /// Echoed from the request.
        sent_ms: u64,
        /// The TTL left; 0 when the lease is gone.
        ttl_ms: u64,
    },
    /// The in-sync set write ran.
    SyncWritten {
        /// Echoed from the request.
        version: u64,
        /// False when the leader key no longer holds our value.
        ok: bool,
    },
    /// The watch saw one of the keys change.
    Changed,
    /// A request failed (etcd unreachable, timeout, a bad answer).
    Failed {
        /// What was asked.
        what: &'static str,
        /// Why it failed.
        error: String,
    },
}

/// What the reactor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this to the etcd agent.
    Etcd(Request),
    /// Become the master of `epoch` (or stay it).
    Lead {
        /// The epoch won.
        epoch: u64,
    },
    /// Follow this leader as a slave.
    Follow(LeaderRecord),
    /// Stop acting as master: the leader key is lost. The node serves as a
    /// standby until a `Follow` names the new leader.
    StepDown,
    /// The lease is (or is no longer) known valid: the master acknowledges
    /// writes and serves reads only while it is.
    LeaseValid(bool),
    /// The in-sync set the coordinator asked for as `version` is recorded.
    SyncRecorded {
        /// The coordinator's version.
        version: u64,
    },
}

/// Where this node stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waiting for the first read.
    Observing,
    /// Another node leads.
    Following(LeaderRecord),
    /// No leader, and this node may not take the key (or its own old key has
    /// not expired yet): waiting for a leader.
    Vacant,
    /// May take the vacant key: a lease is being granted.
    Granting,
    /// The campaign transaction is in flight.
    Campaigning {
        /// The lease it runs under.
        lease: i64,
        /// The epoch it claims.
        epoch: u64,
    },
    /// This node leads.
    Leading {
        /// The epoch.
        epoch: u64,
        /// The lease the key lives under.
        lease: i64,
    },
}

/// The election of one node.
#[derive(Debug)]
pub struct Election {
    config: ElectionConfig,
    state: State,
    /// The in-sync set as last read (or written by us), with its revision.
    sync: Option<(SyncRecord, i64)>,
    /// Until when the lease is certainly alive in etcd (minus the margin).
    lease_valid_until_ms: u64,
    /// Whether `LeaseValid(true)` is in force.
    lease_valid: bool,
    /// When the lease was granted (campaign), to start the validity clock.
    granted: Option<(u64, u64)>,
    read_in_flight: bool,
    keepalive_in_flight: bool,
    next_keepalive_ms: u64,
    next_read_ms: u64,
    /// A campaign whose reply was lost (lease, epoch): the next read settles it.
    unsettled_campaign: Option<(i64, u64)>,
    /// The newest in-sync set the coordinator asked for, not yet written.
    wanted_sync: Option<(u64, BTreeSet<u64>)>,
    sync_in_flight: bool,
    /// When to retry after a failure.
    retry_at_ms: Option<u64>,
    actions: VecDeque<Action>,
}

impl Election {
    /// A node that has just started: it reads the keys first.
    pub fn new(config: ElectionConfig, now_ms: u64) -> Election {
        let mut e = Election {
            next_read_ms: now_ms,
            config,
            state: State::Observing,
            sync: None,
            lease_valid_until_ms: 0,
            lease_valid: false,
            granted: None,
            read_in_flight: false,
            keepalive_in_flight: false,
            next_keepalive_ms: 0,
            unsettled_campaign: None,
            wanted_sync: None,
            sync_in_flight: false,
            retry_at_ms: None,
            actions: VecDeque::new(),
        };
        e.read(now_ms);
        e
    }

    /// Next action, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Where this node stands.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The in-sync set as last known.
    pub fn sync_record(&self) -> Option<&SyncRecord> {
        self.sync.as_ref().map(|(s, _)| s)
    }

    /// Milliseconds the lease is still counted on (leader only).
    pub fn lease_left_ms(&self, now_ms: u64) -> Option<u64> {
        match self.state {
            State::Leading { .. } => Some(self.lease_valid_until_ms.saturating_sub(now_ms)),
            _ => None,
        }
    }

    /// When [`Election::tick`] next has something to do.
    pub fn next_wake_ms(&self) -> u64 {
        let mut at = match self.state {
            State::Leading { .. } => {
                let expiry = if self.lease_valid {
                    self.lease_valid_until_ms
                } else {
                    u64::MAX
                };
                self.next_keepalive_ms.min(expiry)
            }
            State::Granting | State::Campaigning { .. } => u64::MAX,
            _ => self.next_read_ms,
        };
        if let Some(retry) = self.retry_at_ms {
            at = at.min(retry);
        }
        at
    }

    fn me(&self, epoch: u64) -> LeaderRecord {
        LeaderRecord {
            epoch,
            node_id: self.config.node_id,
            addr: self.config.addr.clone(),
        }
    }

    fn etcd(&mut self, request: Request) {
        self.actions.push_back(Action::Etcd(request));
    }

    fn read(&mut self, now_ms: u64) {
        self.next_read_ms = now_ms + self.config.reread_interval_ms();
        if !self.read_in_flight {
            self.read_in_flight = true;
            self.etcd(Request::Read);
        }
    }

    fn set_lease_valid(&mut self, valid: bool) {
        if self.lease_valid != valid {
            self.lease_valid = valid;
            self.actions.push_back(Action::LeaseValid(valid));
        }
    }

    /// Time passed: renew the lease, notice its end, read again.
    pub fn tick(&mut self, now_ms: u64) {
        if self.retry_at_ms.is_some_and(|t| t <= now_ms) {
            self.retry_at_ms = None;
            if matches!(self.state, State::Leading { .. }) {
                self.write_sync();
            }
        }
        match self.state {
            State::Leading { lease, .. } => {
                if self.lease_valid && now_ms >= self.lease_valid_until_ms {
                    warn!(
                        "leadership lease not renewed in time; acknowledging nothing until it is"
                    );
                    self.set_lease_valid(false);
                }
                if now_ms >= self.next_keepalive_ms && !self.keepalive_in_flight {
                    self.keepalive_in_flight = true;
                    self.next_keepalive_ms = now_ms + self.config.keepalive_interval_ms();
                    self.etcd(Request::Keepalive {
                        lease,
                        sent_ms: now_ms,
                    });
                }
            }
            State::Granting | State::Campaigning { .. } => {}
            State::Observing | State::Following(_) | State::Vacant => {
                if now_ms >= self.next_read_ms {
                    self.read(now_ms);
                }
            }
        }
    }

    /// The coordinator asks for this in-sync set to be recorded.
    pub fn record_sync_set(&mut self, version: u64, members: Vec<u64>) {
        self.wanted_sync = Some((version, members.into_iter().collect()));
        self.write_sync();
    }

    fn write_sync(&mut self) {
        let State::Leading { epoch, .. } = self.state else {
            return;
        };
        if self.sync_in_flight || self.retry_at_ms.is_some() {
            return;
        }
        let Some((version, members)) = self.wanted_sync.clone() else {
            return;
        };
        self.sync_in_flight = true;
        let leader = self.me(epoch);
        self.etcd(Request::WriteSync {
            version,
            leader,
            sync: SyncRecord {
                epoch,
                leader: self.config.node_id,
                members,
            },
        });
    }

    /// An answer from the etcd agent.
    pub fn on_reply(&mut self, now_ms: u64, reply: Reply) {
        match reply {
            Reply::Read(obs) => {
                self.read_in_flight = false;
                self.on_observation(now_ms, obs);
            }
            Reply::Changed => {
                if !matches!(self.state, State::Granting | State::Campaigning { .. }) {
                    self.read(now_ms);
                }
            }
            Reply::LeaseGranted {
                lease,
                ttl_ms,
                sent_ms,
            } => {
                if self.state != State::Granting {
                    self.etcd(Request::Revoke { lease });
                    return;
                }
                let (epoch, sync_mod_revision) = match &self.sync {
                    Some((s, rev)) => (s.epoch + 1, *rev),
                    None => (1, 0),
                };
                self.granted = Some((sent_ms, ttl_ms));
                self.state = State::Campaigning { lease, epoch };
                let leader = self.me(epoch);
                self.etcd(Request::Campaign {
                    lease,
                    leader,
                    sync_mod_revision,
                    sync: SyncRecord {
                        epoch,
                        leader: self.config.node_id,
                        members: BTreeSet::new(),
                    },
                });
            }
            Reply::Campaigned { won } => {
                let State::Campaigning { lease, epoch } = self.state else {
                    return;
                };
                if !won {
                    info!("another node took the leader key first");
                    self.etcd(Request::Revoke { lease });
                    self.state = State::Observing;
                    self.read(now_ms);
                    return;
                }
                self.won(now_ms, lease, epoch);
            }
            Reply::KeptAlive { sent_ms, ttl_ms } => {
                self.keepalive_in_flight = false;
                if !matches!(self.state, State::Leading { .. }) {
                    return;
                }
                if ttl_ms == 0 {
                    warn!("the leadership lease expired in etcd; stepping down");
                    self.step_down(now_ms);
                    return;
                }
                let until = (sent_ms + ttl_ms).saturating_sub(self.config.safety_margin_ms());
                self.lease_valid_until_ms = self.lease_valid_until_ms.max(until);
                if now_ms < self.lease_valid_until_ms {
                    self.set_lease_valid(true);
                }
            }
            Reply::SyncWritten { version, ok } => {
                self.sync_in_flight = false;
                if !matches!(self.state, State::Leading { .. }) {
                    return;
                }
                if !ok {
                    warn!("the leader key is no longer ours; stepping down");
                    self.step_down(now_ms);
                    return;
                }
                if let Some((wanted, members)) = &self.wanted_sync
                    && *wanted == version
                {
                    if let Some((s, _)) = self.sync.as_mut() {
                        s.members = members.clone();
                    }
                    self.wanted_sync = None;
                }
                self.actions.push_back(Action::SyncRecorded { version });
                self.write_sync();
            }
            Reply::Failed { what, error } => {
                warn!("etcd: {what} failed: {error}");
                match (&self.state, what) {
                    (_, "read") => {
                        self.read_in_flight = false;
                    }
                    (State::Leading { .. }, "keepalive") => self.keepalive_in_flight = false,
                    (State::Leading { .. }, "write sync") => {
                        // Nothing is decided without the slave until this succeeds: retry.
                        self.sync_in_flight = false;
                        self.retry_at_ms = Some(now_ms + self.config.keepalive_interval_ms());
                    }
                    (State::Campaigning { lease, epoch }, _) => {
                        // The outcome is unknown: etcd may hold our key. A read tells,
                        // and then the campaign is settled either way.
                        self.unsettled_campaign = Some((*lease, *epoch));
                        self.state = State::Observing;
                    }
                    (State::Granting, _) => self.state = State::Observing,
                    _ => {}
                }
                self.next_read_ms = self
                    .next_read_ms
                    .min(now_ms + self.config.keepalive_interval_ms());
            }
        }
    }

    /// The leader key is ours, under `lease`, in `epoch`.
    fn won(&mut self, now_ms: u64, lease: i64, epoch: u64) {
        self.unsettled_campaign = None;
        let (sent_ms, ttl_ms) = self.granted.take().unwrap_or((now_ms, 0));
        info!("won the leader key: epoch {epoch}");
        self.state = State::Leading { epoch, lease };
        // What we wrote is what etcd holds now (revision unknown until read).
        self.sync = Some((
            SyncRecord {
                epoch,
                leader: self.config.node_id,
                members: BTreeSet::new(),
            },
            0,
        ));
        self.lease_valid_until_ms =
            (sent_ms + ttl_ms).saturating_sub(self.config.safety_margin_ms());
        self.next_keepalive_ms = now_ms + self.config.keepalive_interval_ms();
        self.wanted_sync = None;
        self.sync_in_flight = false;
        self.actions.push_back(Action::Lead { epoch });
        // A new master starts with its lease not counted on: LeaseValid(true)
        // comes only while it is, and a late win waits for a keepalive.
        self.lease_valid = false;
        self.set_lease_valid(now_ms < self.lease_valid_until_ms);
    }

    fn step_down(&mut self, now_ms: u64) {
        self.set_lease_valid(false);
        self.actions.push_back(Action::StepDown);
        self.state = State::Observing;
        self.wanted_sync = None;
        self.read(now_ms);
    }

    fn on_observation(&mut self, now_ms: u64, obs: Observation) {
        let unsettled = self.unsettled_campaign.take();
        if let Some((lease, epoch)) = unsettled
            && !matches!(&obs.leader, Some((l, held)) if l.node_id == self.config.node_id
                && *held == lease && l.epoch == epoch)
        {
            // It did not take the key: give its lease back.
            self.etcd(Request::Revoke { lease });
        }
        if let Some(sync) = obs.sync.clone() {
            self.sync = Some(sync);
        } else if !matches!(self.state, State::Leading { .. }) {
            self.sync = None;
        }
        match self.state.clone() {
            State::Granting | State::Campaigning { .. } => {}
            State::Leading { epoch, .. } => match &obs.leader {
                Some((l, _)) if l.node_id == self.config.node_id && l.epoch == epoch => {}
                _ => {
                    warn!("the leader key no longer names us in epoch {epoch}; stepping down");
                    self.step_down(now_ms);
                    self.on_observation(now_ms, obs);
                }
            },
            State::Observing | State::Following(_) | State::Vacant => match obs.leader {
                Some((leader, lease))
                    if leader.node_id == self.config.node_id
                        && unsettled == Some((lease, leader.epoch)) =>
                {
                    // The campaign whose answer was lost did take the key.
                    self.won(now_ms, lease, leader.epoch);
                }
                Some((leader, _)) if leader.node_id == self.config.node_id => {
                    // Our own key from before a restart: its lease dies with the
                    // old process, then the key can be taken again.
                    self.state = State::Vacant;
                }
                Some((leader, _)) => {
                    if self.state != State::Following(leader.clone()) {
                        info!(
                            "following {} (node {:016x}) in epoch {}",
                            leader.addr, leader.node_id, leader.epoch
                        );
                        self.actions.push_back(Action::Follow(leader.clone()));
                        self.state = State::Following(leader);
                    }
                }
                None => {
                    let eligible = match &self.sync {
                        None => true,
                        Some((s, _)) => s.may_promote(self.config.node_id),
                    };
                    if eligible {
                        self.state = State::Granting;
                        self.etcd(Request::GrantLease {
                            ttl_ms: self.config.lease_ttl_ms,
                            sent_ms: now_ms,
                        });
                    } else {
                        self.state = State::Vacant;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests;
