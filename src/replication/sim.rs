//! Deterministic simulation of one master and three slaves.
//!
//! The real [`Coordinator`] and [`Participant`]s run against a simulated
//! network (per-link FIFO with random delay; a link break loses whatever was
//! still in flight beyond a random prefix and tells both ends after a random
//! detection delay), a simulated clock and simulated disks (persist
//! completions in log order, sometimes slow). Faults: partitions, slave
//! crashes (volatile state lost, durable records kept) and restarts, slave
//! stalls (no answers while the link stays open), slow persists, master
//! crashes (the master comes back with exactly what it had made durable: the
//! same history, its commits replayed, undecided transactions presumed
//! aborted; checked: no commit it had applied, i.e. acknowledged, is lost),
//! master restarts without their disk (a new coordinator with a new history id
//! and an empty store; the simulated slaves run with `--resync-discard-data`,
//! so they resync instead of keeping their data as diverged), both down for a
//! while (every link dies, what the master had sent may still arrive, nothing
//! the slaves had sent does), random `tpc_timeout`, log
//! capacity and `min_slaves`. Everything is drawn from one
//! seeded RNG, so a failing seed replays exactly:
//!
//! ```text
//! DKVS_SIM_SEED=1234 cargo test --lib replication::sim -- --nocapture
//! DKVS_SIM_SEEDS=100000 cargo test --release --lib replication::sim
//! ```
//!
//! Each life of the master is a history of its own (sequence numbers restart
//! at 1). Checked continuously: every replica passes through exactly the
//! states of the master life whose history id it holds (a digest of the whole
//! store after each applied commit must equal that life's after the same
//! commit), so commit order is the same everywhere, histories never mix, and
//! no aborted or uncommitted write is ever visible; when the master applies
//! (acknowledges) a commit, every slave in sync for it holds a durable PREPARE
//! of it; a crashed slave recovers to a state some master life passed
//! through. Checked at the end, after healing every fault: every client of
//! the current master life got exactly one reply (clients of a dead life got
//! at most one: their connection died with it), every slave is back in sync
//! and holds exactly the current master's data (writes acknowledged by a
//! master life whose disk was lost are legitimately gone), and nothing is
//! left in flight.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use rand::{RngExt, SeedableRng, rngs::StdRng};

use super::{
    Action, ClientRef, ClientWrite, Coordinator, CoordinatorConfig, Event, LinkState, OpKind, Ops,
    Participant, ParticipantConfig, PeerId, PeerMessage, Record, SlaveState, SnapshotEntry,
    TimerId, WriteError, WriteOp,
};
use crate::protocol::peer::decode_peer;

type Store = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

const SLAVES: usize = 3;
const KEYS: u8 = 6;
/// Simulated milliseconds of client load and faults.
const ACTIVE_MS: u64 = 300;
/// Simulated milliseconds after healing for everyone to converge.
const SETTLE_MS: u64 = 1_500;
/// Master -> slave and slave -> master.
const TO_SLAVE: usize = 0;
const TO_MASTER: usize = 1;

#[derive(Debug)]
enum Ev {
    Deliver {
        link: usize,
        dir: usize,
    },
    LinkLost {
        slave_side: bool,
        link: usize,
    },
    Timer {
        node: usize,
        timer: TimerId,
        at: u64,
        life: u64,
    },
    PersistDone {
        node: usize,
        lsn: u64,
        life: u64,
    },
    ConnectDone {
        slave: usize,
        life: u64,
    },
    SnapshotStep {
        link: usize,
    },
    /// The master's end of a link being sent a backlog has drained (the
    /// reactor reports it at most once a turn): feed `PeerDrained`.
    Drain {
        link: usize,
    },
    /// The coordination store recorded in-sync set `version` (asked by master life `life`).
    SyncRecorded {
        version: u64,
        members: Vec<u64>,
        life: u64,
    },
    ClientBatch,
    Partition {
        slave: usize,
        dur: u64,
    },
    HealPartition {
        slave: usize,
    },
    Crash {
        slave: usize,
        dur: u64,
    },
    /// The master dies, losing everything (its disk), and is back after `dur`.
    MasterRestart {
        dur: u64,
    },
    /// The master crashes and is back after `dur` with what it had made durable.
    MasterCrash {
        dur: u64,
    },
    Restart {
        slave: usize,
    },
    Stall {
        slave: usize,
        dur: u64,
    },
    SlowPersist {
        node: usize,
        dur: u64,
    },
}

impl Ev {
    /// The slave an event is processed by, if it is a slave (stalls defer these).
    fn slave_target(&self, links: &[Link]) -> Option<usize> {
        match self {
            Ev::Deliver { link, dir } if *dir == TO_SLAVE => Some(links[*link].slave),
            Ev::LinkLost {
                slave_side: true,
                link,
            } => Some(links[*link].slave),
            Ev::Timer { node, .. } | Ev::PersistDone { node, .. } if *node > 0 => Some(node - 1),
            Ev::ConnectDone { slave, .. } => Some(*slave),
            _ => None,
        }
    }
}

type Scheduled = crate::sim_support::Scheduled<Ev>;

struct Link {
    slave: usize,
    broken: bool,
    last_at: [u64; 2],
    queue: [VecDeque<Vec<u8>>; 2],
    /// Snapshot chunks still to stream, and the snapshot's sequence number.
    /// A snapshot being streamed: its seq, the chunks left, and how many it had.
    snapshot: Option<(u64, VecDeque<Vec<SnapshotEntry>>, usize)>,
    /// An `Ev::Drain` is scheduled for it.
    drain_due: bool,
}

/// Messages in flight to a slave beyond which its link counts as not
/// drained: a stalled slave reads nothing, and its backlog waits.
const DRAINED_BELOW: usize = 8;

impl Link {
    fn peer(index: usize) -> PeerId {
        PeerId(index as u64 + 1)
    }
}

/// Durable state of a slave: what survives a crash.
#[derive(Clone)]
enum Durable {
    Rec(Record),
    Checkpoint(u64, u64, Store),
}

struct SlaveNode {
    part: Option<Participant>,
    /// Bumped at each crash so events of a previous life are dropped.
    life: u64,
    store: Store,
    staging: Store,
    applied_seq: u64,
    link: Option<usize>,
    timers: BTreeMap<TimerId, u64>,
    pending: VecDeque<(u64, Durable)>,
    durable: Vec<Durable>,
    /// Durable PREPAREs, with their writes: sequence numbers repeat across master lives.
    durable_prepared: HashSet<(u64, Ops)>,
    last_persist_at: u64,
    slow_persist_until: u64,
    stalled_until: u64,
    partitioned: bool,
    violations: u64,
    /// The newest state it served reads from under its read lease, as
    /// (history, position): it must never serve an older one.
    shown: Option<(u64, u64)>,
}

struct Sim {
    rng: StdRng,
    now: u64,
    order: u64,
    heap: BinaryHeap<Scheduled>,
    links: Vec<Link>,
    coord: Coordinator,
    /// Config of every master life (each gets a new history id).
    coord_config: CoordinatorConfig,
    /// Current master life: an index into `histories`, `digests` and `committed`.
    master_life: usize,
    /// Bumped at every master crash, so events of a previous process are dropped.
    master_epoch: u64,
    /// The in-sync set (node ids) as the modelled coordination store holds it.
    recorded_sync_set: BTreeSet<u64>,
    /// Master records handed to its disk and not yet durable.
    master_pending: VecDeque<(u64, Record)>,
    /// Master records that survive a crash.
    master_durable: Vec<Record>,
    /// History id of each master life.
    histories: Vec<u64>,
    /// The master is down (between a crash and its restart) until then.
    master_down_until: u64,
    master_store: Store,
    master_timers: BTreeMap<TimerId, u64>,
    master_last_persist_at: u64,
    master_slow_persist_until: u64,
    /// Per master life: digest of the master's store after each committed seq (0: empty store).
    digests: Vec<BTreeMap<u64, u64>>,
    /// Per master life: the writes of each committed seq.
    committed: Vec<BTreeMap<u64, Ops>>,
    /// Clients whose master died before answering them.
    dropped_clients: BTreeSet<u64>,
    slaves: Vec<SlaveNode>,
    next_client: u64,
    replies: BTreeMap<u64, u32>,
    acked_ok: u64,
    refused: u64,
    aborted: u64,
    tpc_timeout_ms: u64,
    /// The read lease the slaves ask for.
    read_lease_ms: u32,
    /// Per master life: when each commit was released (its clients answered).
    released_at: Vec<BTreeMap<u64, u64>>,
    trace: Option<Vec<String>>,
    stats: RunStats,
}

/// What one run did, for the summary line.
#[derive(Debug, Default, Clone, Copy)]
struct RunStats {
    commits: u64,
    snapshots: u64,
    evictions: u64,
    crashes: u64,
    partitions: u64,
    stalls: u64,
    master_restarts: u64,
    master_crashes: u64,
    /// Moments a slave held a read lease, each checked for staleness.
    lease_checks: u64,
    /// The oldest acknowledged write a slave within its lease missed (ms).
    worst_staleness_ms: u64,
    /// Client batches the write throttle held back for a snapshot.
    held_batches: u64,
    /// Backlog steps fed by a drained link (`Event::PeerDrained`).
    backlog_steps: u64,
}

impl RunStats {
    fn add(&mut self, s: &RunStats) {
        self.commits += s.commits;
        self.snapshots += s.snapshots;
        self.evictions += s.evictions;
        self.crashes += s.crashes;
        self.partitions += s.partitions;
        self.stalls += s.stalls;
        self.master_restarts += s.master_restarts;
        self.master_crashes += s.master_crashes;
        self.lease_checks += s.lease_checks;
        self.worst_staleness_ms = self.worst_staleness_ms.max(s.worst_staleness_ms);
        self.held_batches += s.held_batches;
        self.backlog_steps += s.backlog_steps;
    }
}

fn digest(store: &Store) -> u64 {
    let mut h = DefaultHasher::new();
    store.hash(&mut h);
    h.finish()
}

/// Apply writes the way every replica must: deterministic, NotFound identical everywhere.
fn apply_ops(store: &mut Store, seq: u64, ops: &[WriteOp]) -> Vec<bool> {
    ops.iter()
        .map(|op| match op.kind {
            OpKind::Put => {
                store.insert(op.key().to_vec(), (op.value().to_vec(), seq));
                true
            }
            OpKind::Update => match store.get_mut(op.key()) {
                Some(slot) => {
                    *slot = (op.value().to_vec(), seq);
                    true
                }
                None => false,
            },
            // The model keeps a PutExpiring's deadline inside its value: what
            // the simulation checks is that every replica applies the same ops
            // to the same state, not what expiry then does.
            OpKind::PutExpiring => {
                store.insert(op.key().to_vec(), (op.value().to_vec(), seq));
                true
            }
            OpKind::Expire => match store.get_mut(op.key()) {
                Some(slot) => {
                    slot.1 = seq;
                    true
                }
                None => false,
            },
            OpKind::Delete => store.remove(op.key()).is_some(),
            OpKind::Clear => {
                store.clear();
                true
            }
        })
        .collect()
}

/// Rebuild a slave's store from its durable records, as a write-ahead log would.
fn recover(durable: &[Durable]) -> Result<(Store, u64, u64), String> {
    let mut store = Store::new();
    let mut pos = 0;
    let mut history = 0;
    let mut prepared: BTreeMap<u64, Ops> = BTreeMap::new();
    for d in durable {
        match d {
            Durable::Checkpoint(seq, h, snap) => {
                store = snap.clone();
                pos = *seq;
                history = *h;
                prepared.clear();
            }
            Durable::Rec(Record::Prepared { seq, ops }) => {
                prepared.insert(*seq, ops.clone());
            }
            Durable::Rec(Record::Committed { seq }) => {
                let ops = prepared
                    .remove(seq)
                    .ok_or(format!("recovery: commit {seq} without a durable prepare"))?;
                apply_ops(&mut store, *seq, &ops);
                pos = *seq;
            }
            Durable::Rec(Record::CommittedTxn { seq, ops }) => {
                apply_ops(&mut store, *seq, ops);
                pos = *seq;
            }
            Durable::Rec(Record::History { history_id }) => history = *history_id,
            Durable::Rec(Record::AbortDecision { seq }) => {
                prepared.remove(seq);
            }
            Durable::Rec(other) => {
                return Err(format!("slave persisted a master record {other:?}"));
            }
        }
    }
    Ok((store, pos, history))
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let tpc_timeout_ms = rng.random_range(30..=200);
        // Drawn apart, so that a seed draws the same faults and load as before
        // this knob existed. Mostly held for the next PREPARE, sometimes
        // past several of the simulated network's delays; sometimes at once.
        let mut knobs = StdRng::seed_from_u64(seed ^ 0xC0_4417_DE1A);
        let commit_delay_ms = if knobs.random_bool(0.2) {
            0
        } else {
            knobs.random_range(1..=5)
        };
        // Mostly a few of the simulated commits per step of a backlog (0: one
        // per step), so that backlogs span many drains; sometimes the
        // server's default, where every backlog goes in one step.
        let backlog_step_bytes = if knobs.random_bool(0.2) {
            CoordinatorConfig::default().backlog_step_bytes
        } else {
            knobs.random_range(0..=600)
        };
        let config = CoordinatorConfig {
            tpc_timeout_ms,
            min_slaves: if rng.random_bool(0.2) {
                rng.random_range(1..=2)
            } else {
                0
            },
            log_capacity: rng.random_range(0..=40),
            // Sometimes the byte bound, not the count, is what makes the log wrap.
            log_max_bytes: if rng.random_bool(0.3) {
                rng.random_range(100..=2_000)
            } else {
                usize::MAX
            },
            heartbeat_interval_ms: 50,
            // Several heartbeats plus the worst delay spike: silence means a stalled slave.
            peer_timeout_ms: 200 + tpc_timeout_ms,
            max_inflight_txns: 64,
            history_id: 0,
            epoch: 0,
            // Half the runs keep the in-sync set recorded, as with failover through etcd.
            record_sync_set: rng.random_bool(0.5),
            max_slave_lag_ms: if rng.random_bool(0.3) {
                0
            } else {
                rng.random_range(10..=300)
            },
            // Short enough to end within the settling time.
            first_probation_ms: rng.random_range(20..=200),
            max_probation_ms: 400,
            // Scaled to the simulated milliseconds, so that restarted snapshots
            // still finish within the settling time.
            write_hold_max_ms: rng.random_range(0..=30),
            snapshot_retry_min_ms: rng.random_range(1..=40),
            snapshot_retry_max_ms: rng.random_range(40..=300),
            commit_delay_ms,
            backlog_step_bytes,
        };
        // Sometimes longer than the master grants (it caps a lease at the 2PC timeout).
        let read_lease_ms = rng.random_range(5..=300);
        let history_id = rng.random_range(1..=u64::MAX);
        let mut digests = BTreeMap::new();
        digests.insert(0, digest(&Store::new()));
        let mut sim = Sim {
            rng,
            now: 0,
            order: 0,
            heap: BinaryHeap::new(),
            links: Vec::new(),
            coord: Coordinator::new(
                CoordinatorConfig {
                    history_id,
                    ..config.clone()
                },
                0,
            ),
            coord_config: config,
            master_life: 0,
            master_epoch: 0,
            recorded_sync_set: BTreeSet::new(),
            master_pending: VecDeque::new(),
            master_durable: Vec::new(),
            histories: vec![history_id],
            master_down_until: 0,
            master_store: Store::new(),
            master_timers: BTreeMap::new(),
            master_last_persist_at: 0,
            master_slow_persist_until: 0,
            digests: vec![digests],
            committed: vec![BTreeMap::new()],
            dropped_clients: BTreeSet::new(),
            slaves: Vec::new(),
            next_client: 0,
            replies: BTreeMap::new(),
            acked_ok: 0,
            refused: 0,
            aborted: 0,
            tpc_timeout_ms,
            read_lease_ms,
            released_at: vec![BTreeMap::new()],
            trace: trace.then(Vec::new),
            stats: RunStats::default(),
        };
        for i in 0..SLAVES {
            sim.slaves.push(SlaveNode {
                part: None,
                life: 0,
                store: Store::new(),
                staging: Store::new(),
                applied_seq: 0,
                link: None,
                timers: BTreeMap::new(),
                pending: VecDeque::new(),
                durable: Vec::new(),
                durable_prepared: HashSet::new(),
                last_persist_at: 0,
                slow_persist_until: 0,
                stalled_until: 0,
                partitioned: false,
                violations: 0,
                shown: None,
            });
            // Slaves start at staggered times: some join while writes flow.
            let at = if sim.rng.random_bool(0.5) {
                0
            } else {
                sim.rng.random_range(0..ACTIVE_MS)
            };
            sim.schedule(at, Ev::Restart { slave: i });
        }
        sim.schedule(1, Ev::ClientBatch);
        let faults = sim.rng.random_range(0..=6);
        for _ in 0..faults {
            let at = sim.rng.random_range(0..ACTIVE_MS);
            let slave = sim.rng.random_range(0..SLAVES);
            let dur = sim.rng.random_range(5..=300);
            let ev = match sim.rng.random_range(0..5) {
                0 => Ev::Partition { slave, dur },
                1 => Ev::Crash { slave, dur },
                2 => Ev::Stall { slave, dur },
                3 if sim.rng.random_bool(0.3) => Ev::MasterRestart { dur: dur / 4 },
                3 => Ev::MasterCrash { dur: dur / 4 },
                _ => Ev::SlowPersist {
                    node: sim.rng.random_range(0..=SLAVES),
                    dur,
                },
            };
            sim.schedule(at, ev);
        }
        sim
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(format!("{:>6} {}", self.now, line()));
        }
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.order += 1;
        self.heap.push(Scheduled {
            at,
            order: self.order,
            ev,
        });
    }

    fn net_delay(&mut self) -> u64 {
        // One draw in the common case: 0..=3 ms, and 2% of messages hit a 10..=80 ms spike.
        match self.rng.random_range(0..200u64) {
            r @ 0..=195 => r % 4,
            _ => self.rng.random_range(10..=80),
        }
    }

    fn persist_delay(&mut self, slow_until: u64) -> u64 {
        if self.now < slow_until {
            self.rng.random_range(20..=250)
        } else {
            self.rng.random_range(0..=2)
        }
    }

    fn send(&mut self, link: usize, dir: usize, msg: &PeerMessage) {
        if self.links[link].broken {
            return;
        }
        let mut bytes = Vec::new();
        msg.encode(&mut bytes);
        let delay = self.net_delay();
        let l = &mut self.links[link];
        let at = l.last_at[dir].max(self.now + delay);
        l.last_at[dir] = at;
        l.queue[dir].push_back(bytes);
        self.schedule(at, Ev::Deliver { link, dir });
    }

    /// Break a link: a random prefix of what is in flight still arrives, then each end
    /// learns of the break after its own detection delay.
    fn break_link(&mut self, link: usize) {
        if self.links[link].broken {
            return;
        }
        self.log(|| format!("link {link} breaks"));
        self.links[link].broken = true;
        self.links[link].snapshot = None;
        for dir in [TO_SLAVE, TO_MASTER] {
            let len = self.links[link].queue[dir].len();
            let keep = self.rng.random_range(0..=len);
            self.links[link].queue[dir].truncate(keep);
        }
        let max_detect = self.tpc_timeout_ms * 2;
        for (slave_side, dir) in [(true, TO_SLAVE), (false, TO_MASTER)] {
            let detect = self.rng.random_range(1..=max_detect);
            let at = (self.now + detect).max(self.links[link].last_at[dir] + 1);
            self.schedule(at, Ev::LinkLost { slave_side, link });
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let end = ACTIVE_MS + SETTLE_MS;
        let mut healed = false;
        self.run_master_actions()?;
        while let Some(s) = self.heap.pop() {
            if !healed && s.at >= ACTIVE_MS {
                self.now = ACTIVE_MS;
                self.heal_all();
                healed = true;
            }
            if s.at > end {
                break;
            }
            self.now = s.at;
            if let Some(slave) = s.ev.slave_target(&self.links)
                && self.slaves[slave].stalled_until > self.now
            {
                let until = self.slaves[slave].stalled_until;
                self.schedule(until, s.ev);
                continue;
            }
            self.step(s.ev)?;
        }
        self.now = end;
        self.final_checks()
    }

    fn heal_all(&mut self) {
        self.log(|| "heal everything".into());
        self.master_slow_persist_until = 0;
        self.master_down_until = self.master_down_until.min(self.now);
        for i in 0..SLAVES {
            let s = &mut self.slaves[i];
            s.partitioned = false;
            s.slow_persist_until = 0;
            if s.stalled_until > self.now {
                s.stalled_until = self.now;
            }
            if s.part.is_none() {
                self.schedule(self.now, Ev::Restart { slave: i });
            }
        }
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        self.step_event(ev)?;
        self.check_read_leases()
    }

    /// SPEC 4.7: a slave serves reads only within its read lease, and then
    /// none misses a write acknowledged longer than the lease ago, and none
    /// shows a state older than one it showed before.
    fn check_read_leases(&mut self) -> Result<(), String> {
        let history = self.histories[self.master_life];
        let lease = u64::from(self.read_lease_ms).min(self.tpc_timeout_ms);
        for i in 0..SLAVES {
            let s = &mut self.slaves[i];
            let Some(part) = s.part.as_ref() else {
                continue;
            };
            let Some(until) = part.read_lease_until() else {
                continue;
            };
            if until <= self.now {
                continue;
            }
            if until > self.now + lease {
                return Err(format!(
                    "slave {i} holds a read lease until {until}, past now + its lease"
                ));
            }
            let pos = s.applied_seq;
            let slave_history = part.history_id();
            if let Some((h, shown)) = s.shown
                && h == slave_history
                && pos < shown
            {
                return Err(format!(
                    "slave {i} serves reads at {pos} after serving them at {shown}"
                ));
            }
            s.shown = Some((slave_history, pos));
            self.stats.lease_checks += 1;
            if slave_history != history {
                continue; // a master life whose commits it cannot know
            }
            // The first acknowledged write it misses, and how long ago.
            if let Some((&seq, &at)) = self.released_at[self.master_life].range(pos + 1..).next() {
                let staleness = self.now.saturating_sub(at);
                self.stats.worst_staleness_ms = self.stats.worst_staleness_ms.max(staleness);
                if staleness > lease {
                    return Err(format!(
                        "slave {i} within its read lease (until {until}) at {pos} misses \
                         commit {seq}, acknowledged {staleness} ms ago (lease {lease} ms)"
                    ));
                }
            }
        }
        Ok(())
    }

    fn step_event(&mut self, ev: Ev) -> Result<(), String> {
        let active = self.now < ACTIVE_MS;
        match ev {
            Ev::Deliver { link, dir } => {
                let Some(bytes) = self.links[link].queue[dir].pop_front() else {
                    return Ok(()); // lost in a break
                };
                let (msg, used) = decode_peer(&bytes, usize::MAX)
                    .map_err(|e| format!("peer message failed to decode: {e}"))?
                    .ok_or("peer message incomplete")?;
                if used != bytes.len() {
                    return Err("peer message with trailing bytes".into());
                }
                let peer = Link::peer(link);
                self.log(|| format!("deliver link {link} dir {dir}: {msg:?}"));
                if dir == TO_MASTER {
                    self.coord.handle(self.now, Event::Message { peer, msg });
                    self.run_master_actions()?;
                } else {
                    let slave = self.links[link].slave;
                    self.slave_event(slave, Event::Message { peer, msg })?;
                }
            }
            Ev::LinkLost { slave_side, link } => {
                let peer = Link::peer(link);
                if slave_side {
                    let slave = self.links[link].slave;
                    if self.slaves[slave].link == Some(link) {
                        self.slaves[slave].link = None;
                    }
                    self.slave_event(slave, Event::PeerLost { peer })?;
                } else {
                    self.coord.handle(self.now, Event::PeerLost { peer });
                    self.run_master_actions()?;
                }
            }
            Ev::Timer {
                node,
                timer,
                at,
                life,
            } => {
                if node == 0 {
                    if life == self.master_epoch && self.master_timers.get(&timer) == Some(&at) {
                        self.master_timers.remove(&timer);
                        self.coord.handle(self.now, Event::TimerFired { timer });
                        self.run_master_actions()?;
                    }
                } else {
                    let s = &mut self.slaves[node - 1];
                    if s.life == life && s.timers.get(&timer) == Some(&at) {
                        s.timers.remove(&timer);
                        self.slave_event(node - 1, Event::TimerFired { timer })?;
                    }
                }
            }
            Ev::PersistDone { node, lsn, life } => {
                if node == 0 {
                    if life != self.master_epoch {
                        return Ok(()); // the disk of a dead master process
                    }
                    while self.master_pending.front().is_some_and(|(l, _)| *l <= lsn) {
                        if let Some((_, record)) = self.master_pending.pop_front() {
                            self.master_durable.push(record);
                        }
                    }
                    self.coord.handle(self.now, Event::Persisted { lsn });
                    self.run_master_actions()?;
                } else {
                    let s = &mut self.slaves[node - 1];
                    if s.life != life {
                        return Ok(());
                    }
                    while let Some((l, _)) = s.pending.front() {
                        if *l > lsn {
                            break;
                        }
                        if let Some((_, d)) = s.pending.pop_front() {
                            if let Durable::Rec(Record::Prepared { seq, ops }) = &d {
                                s.durable_prepared.insert((*seq, ops.clone()));
                            }
                            s.durable.push(d);
                        }
                    }
                    self.slave_event(node - 1, Event::Persisted { lsn })?;
                }
            }
            Ev::ConnectDone { slave, life } => {
                if self.slaves[slave].life != life || self.slaves[slave].part.is_none() {
                    return Ok(());
                }
                if self.slaves[slave].partitioned || self.now < self.master_down_until {
                    self.slave_event(slave, Event::ConnectFailed)?;
                } else {
                    let link = self.links.len();
                    self.links.push(Link {
                        slave,
                        broken: false,
                        last_at: [self.now; 2],
                        queue: [VecDeque::new(), VecDeque::new()],
                        snapshot: None,
                        drain_due: false,
                    });
                    self.slaves[slave].link = Some(link);
                    self.log(|| format!("slave {slave} connects on link {link}"));
                    self.slave_event(
                        slave,
                        Event::Connected {
                            peer: Link::peer(link),
                        },
                    )?;
                }
            }
            Ev::SnapshotStep { link } => {
                if self.links[link].broken {
                    return Ok(());
                }
                let Some((at_seq, chunks, total)) = &mut self.links[link].snapshot else {
                    return Ok(());
                };
                let at_seq = *at_seq;
                let entries = chunks.pop_front().unwrap_or_default();
                let last = chunks.is_empty();
                let done_per_mille = ((*total - chunks.len()) * 1000 / (*total).max(1)) as u64;
                if last {
                    self.links[link].snapshot = None;
                }
                self.send(
                    link,
                    TO_SLAVE,
                    &PeerMessage::SnapshotChunk {
                        snapshot_seq: at_seq,
                        entries,
                        last,
                    },
                );
                if last {
                    self.coord.handle(
                        self.now,
                        Event::SnapshotSent {
                            peer: Link::peer(link),
                            at_seq,
                        },
                    );
                    self.run_master_actions()?;
                } else {
                    // The write throttle follows the stream, as the reactor reports it.
                    self.coord.handle(
                        self.now,
                        Event::SnapshotProgress {
                            peer: Link::peer(link),
                            at_seq,
                            done_per_mille,
                        },
                    );
                    self.run_master_actions()?;
                    let next = self.now + self.rng.random_range(0..=3);
                    self.schedule(next, Ev::SnapshotStep { link });
                }
            }
            Ev::Drain { link } => {
                self.links[link].drain_due = false;
                if self.links[link].broken {
                    return Ok(());
                }
                if self.links[link].queue[TO_SLAVE].len() >= DRAINED_BELOW {
                    // Not drained yet (a stalled slave reads nothing): look again later.
                    self.links[link].drain_due = true;
                    let next = self.now + self.rng.random_range(1..=5);
                    self.schedule(next, Ev::Drain { link });
                    return Ok(());
                }
                self.stats.backlog_steps += 1;
                self.coord.handle(
                    self.now,
                    Event::PeerDrained {
                        peer: Link::peer(link),
                    },
                );
                self.run_master_actions()?;
            }
            Ev::SyncRecorded {
                version,
                members,
                life,
            } => {
                if life != self.master_epoch {
                    return Ok(()); // asked by a master process that died since
                }
                self.log(|| format!("coordination store records {members:?} ({version})"));
                self.recorded_sync_set = members.into_iter().collect();
                self.coord
                    .handle(self.now, Event::SyncSetRecorded { version });
                self.run_master_actions()?;
            }
            Ev::ClientBatch => {
                if !active {
                    return Ok(());
                }
                if self.now < self.master_down_until {
                    let next = self.master_down_until;
                    self.schedule(next, Ev::ClientBatch);
                    return Ok(());
                }
                if let Some(until) = self.coord.write_hold(self.now) {
                    // The reactor holds its batch back for a snapshot: so do we.
                    self.stats.held_batches += 1;
                    let next = until.min(self.now + self.rng.random_range(1..=5));
                    self.schedule(next, Ev::ClientBatch);
                    return Ok(());
                }
                let n = self.rng.random_range(1..=4);
                let mut writes = Vec::new();
                for _ in 0..n {
                    let kind = match self.rng.random_range(0..6) {
                        0 | 1 => OpKind::Put,
                        2 => OpKind::Update,
                        3 => OpKind::Delete,
                        // The expiry kinds: PUT with a deadline, and EXPIRE/PERSIST.
                        4 => OpKind::PutExpiring,
                        _ => OpKind::Expire,
                    };
                    let key = vec![b'k', b'0' + self.rng.random_range(0..KEYS)];
                    let value = format!("v{}", self.rng.random_range(0..1000u32)).into_bytes();
                    let deadline = self.rng.random_range(0..3u64) * 1000;
                    let op = match kind {
                        OpKind::Delete => WriteOp::new(kind, key, b""),
                        OpKind::PutExpiring => WriteOp::put_expiring(&key, &value, deadline + 1),
                        OpKind::Expire => WriteOp::expire(&key, Some(deadline).filter(|&d| d > 0)),
                        _ => WriteOp::new(kind, key, value),
                    };
                    self.next_client += 1;
                    writes.push(ClientWrite {
                        client: ClientRef(self.next_client),
                        key_hash: super::test_key_hash(op.key()),
                        op,
                    });
                }
                self.log(|| format!("client batch of {n}"));
                self.coord.handle(self.now, Event::ClientWrites { writes });
                self.run_master_actions()?;
                let next = self.now + self.rng.random_range(1..=10);
                self.schedule(next, Ev::ClientBatch);
            }
            Ev::Partition { slave, dur } => {
                self.log(|| format!("partition slave {slave} for {dur}"));
                self.stats.partitions += 1;
                self.slaves[slave].partitioned = true;
                if let Some(link) = self.slaves[slave].link {
                    self.break_link(link);
                }
                self.schedule(self.now + dur, Ev::HealPartition { slave });
            }
            Ev::HealPartition { slave } => self.slaves[slave].partitioned = false,
            Ev::Crash { slave, dur } => {
                if self.slaves[slave].part.is_none() {
                    return Ok(());
                }
                self.log(|| format!("crash slave {slave} for {dur}"));
                self.stats.crashes += 1;
                if let Some(link) = self.slaves[slave].link.take() {
                    self.break_link(link);
                }
                let s = &mut self.slaves[slave];
                if let Some(p) = s.part.take() {
                    s.violations += p.protocol_violations();
                }
                s.life += 1;
                s.timers.clear();
                s.pending.clear();
                s.staging.clear();
                s.stalled_until = 0;
                self.schedule(self.now + dur, Ev::Restart { slave });
            }
            Ev::Restart { slave } => {
                if self.slaves[slave].part.is_some() {
                    return Ok(());
                }
                let (store, pos, history) = recover(&self.slaves[slave].durable)?;
                self.check_state(slave, &store, pos, None, "recovery")?;
                self.log(|| format!("start slave {slave} at {pos}"));
                let s = &mut self.slaves[slave];
                s.store = store;
                s.applied_seq = pos;
                s.last_persist_at = self.now;
                s.part = Some(Participant::recover(
                    ParticipantConfig {
                        client_addr: format!("slave{slave}"),
                        node_id: slave as u64 + 1,
                        // The simulated master may restart without its data (a new
                        // history): its slaves then resync rather than diverge.
                        may_discard_data: true,
                        reconnect_min_ms: 10,
                        reconnect_max_ms: 500,
                        jitter_seed: self.rng.random(),
                        outcome_query_after_ms: 200,
                        // Longer than any delay spike: silence means a lost master.
                        master_silence_ms: 2_000,
                        epoch: 0,
                        read_lease_ms: self.read_lease_ms,
                    },
                    pos,
                    history,
                ));
                self.run_slave_actions(slave)?;
            }
            Ev::MasterRestart { dur } => self.restart_master(dur)?,
            Ev::MasterCrash { dur } => self.crash_master(dur)?,
            Ev::Stall { slave, dur } => {
                self.log(|| format!("stall slave {slave} for {dur}"));
                self.stats.stalls += 1;
                self.slaves[slave].stalled_until = self.now + dur;
            }
            Ev::SlowPersist { node, dur } => {
                if node == 0 {
                    self.master_slow_persist_until = self.now + dur;
                } else {
                    self.slaves[node - 1].slow_persist_until = self.now + dur;
                }
            }
        }
        Ok(())
    }

    /// The master process dies: its clients and links die with it.
    fn kill_master(&mut self) {
        self.master_epoch += 1;
        // The next master process records a set of its own (a promotion writes an empty one).
        self.recorded_sync_set.clear();
        self.master_pending.clear();
        // Its clients' connections die with it: they never get a reply.
        for c in 1..=self.next_client {
            if !self.replies.contains_key(&c) {
                self.dropped_clients.insert(c);
            }
        }
        // Every link dies. What the master had handed to the kernel may still reach
        // the slave; nothing in flight to the master reaches the new one (that
        // includes links already broken: their leftovers were for the old master).
        for link in 0..self.links.len() {
            self.links[link].queue[TO_MASTER].clear();
            if self.links[link].broken {
                continue;
            }
            self.log(|| format!("link {link} dies with the master"));
            self.links[link].broken = true;
            self.links[link].snapshot = None;
            let len = self.links[link].queue[TO_SLAVE].len();
            let keep = self.rng.random_range(0..=len);
            self.links[link].queue[TO_SLAVE].truncate(keep);
            let detect = self.rng.random_range(1..=self.tpc_timeout_ms * 2);
            let at = (self.now + detect).max(self.links[link].last_at[TO_SLAVE] + 1);
            self.schedule(
                at,
                Ev::LinkLost {
                    slave_side: true,
                    link,
                },
            );
        }
        self.master_timers.clear();
        self.master_last_persist_at = self.now;
    }

    /// The master crashes and comes back after `dur` with exactly what it had
    /// made durable: the same history, every acknowledged commit, the commit
    /// log rebuilt for partial resync; undecided transactions are presumed aborted.
    fn crash_master(&mut self, dur: u64) -> Result<(), String> {
        self.log(|| format!("master crashes for {dur}"));
        self.stats.master_crashes += 1;
        self.kill_master();
        let mut store = Store::new();
        let mut seq = 0;
        let mut log = super::CommitLog::new(self.coord_config.log_capacity, 0)
            .with_max_bytes(self.coord_config.log_max_bytes);
        let life = self.master_life;
        // Commits decided durably but held behind an abort awaiting its acks were
        // never applied; the state to compare is the one at the last applied commit.
        let last_applied = self.digests[life].keys().next_back().copied().unwrap_or(0);
        let mut applied_state = None;
        let mut recovered_commits = Vec::new();
        // Numbering resumes after every decision, aborts included (see `Coordinator::recover`).
        let mut decided = 0;
        for record in &self.master_durable {
            match record {
                Record::CommitDecision { seq: s, ops } => {
                    if applied_state.is_none() && *s > last_applied {
                        applied_state = Some((seq, digest(&store)));
                    }
                    apply_ops(&mut store, *s, ops);
                    seq = *s;
                    log.push(*s, ops.clone());
                    if *s > last_applied {
                        recovered_commits.push((*s, ops.clone(), digest(&store)));
                    }
                }
                Record::AbortDecision { seq: s } => decided = decided.max(*s),
                other => return Err(format!("master persisted a slave record {other:?}")),
            }
        }
        // Durability: every commit the master applied (and so acknowledged) is recovered.
        if let Some((&applied, _)) = self.committed[life].iter().next_back()
            && applied > seq
        {
            return Err(format!(
                "master crash lost commit {applied}: recovered only through {seq}"
            ));
        }
        let (at, state) = applied_state.unwrap_or((seq, digest(&store)));
        if self.digests[life].get(&at) != Some(&state) {
            return Err(format!("master recovered a state at {at} it never had"));
        }
        // Those commits are decided: the recovered master now has them.
        for (s, ops, d) in recovered_commits {
            self.digests[life].insert(s, d);
            self.committed[life].insert(s, ops);
        }
        self.master_store = store;
        self.master_down_until = self.now + dur;
        let config = CoordinatorConfig {
            history_id: self.histories[life],
            ..self.coord_config.clone()
        };
        self.coord = Coordinator::recover(config, self.master_down_until, seq.max(decided), log);
        self.run_master_actions()
    }

    /// The master crashes and comes back empty, with a new history id, after `dur`.
    fn restart_master(&mut self, dur: u64) -> Result<(), String> {
        let history_id = loop {
            let id = self.rng.random_range(1..=u64::MAX);
            if !self.histories.contains(&id) {
                break id;
            }
        };
        self.log(|| format!("master restarts after {dur} as history {history_id:#x}"));
        self.stats.master_restarts += 1;
        self.kill_master();
        self.master_durable.clear();
        self.master_life += 1;
        self.histories.push(history_id);
        let mut digests = BTreeMap::new();
        digests.insert(0, digest(&Store::new()));
        self.digests.push(digests);
        self.committed.push(BTreeMap::new());
        self.released_at.push(BTreeMap::new());
        self.master_store = Store::new();
        self.master_down_until = self.now + dur;
        let config = CoordinatorConfig {
            history_id,
            ..self.coord_config.clone()
        };
        self.coord = Coordinator::new(config, self.master_down_until);
        self.run_master_actions()
    }

    /// The master life a slave's history id names.
    fn life_of(&self, slave: usize) -> Result<usize, String> {
        let history_id = self.slaves[slave]
            .part
            .as_ref()
            .map_or(0, |p| p.history_id());
        self.histories
            .iter()
            .position(|h| *h == history_id)
            .ok_or(format!(
                "slave {slave} holds history {history_id:#x}, which no master life had"
            ))
    }

    fn slave_event(&mut self, slave: usize, event: Event) -> Result<(), String> {
        let Some(part) = self.slaves[slave].part.as_mut() else {
            return Ok(()); // crashed
        };
        part.handle(self.now, event);
        if part.protocol_violations() > 0 {
            return Err(format!("slave {slave} saw a protocol violation"));
        }
        self.run_slave_actions(slave)
    }

    /// Check that a replica's store is exactly the master's after commit `seq` of
    /// master life `life`, or of any life if the replica cannot know which.
    fn check_state(
        &self,
        slave: usize,
        store: &Store,
        seq: u64,
        life: Option<usize>,
        what: &str,
    ) -> Result<(), String> {
        let have = digest(store);
        let matches = |digests: &BTreeMap<u64, u64>| {
            digests.range(..=seq).next_back().map(|(_, d)| *d) == Some(have)
        };
        let ok = match life {
            Some(l) => matches(&self.digests[l]),
            None => self.digests.iter().any(matches),
        };
        if !ok {
            return Err(format!(
                "slave {slave} after {what} at seq {seq} holds a state master life {life:?} never had: {store:?}"
            ));
        }
        Ok(())
    }

    fn run_master_actions(&mut self) -> Result<(), String> {
        while let Some(action) = self.coord.poll_action() {
            self.log(|| format!("master: {action:?}"));
            match action {
                Action::Send { peer, msg } => {
                    let link = (peer.0 - 1) as usize;
                    if self.links[link].snapshot.is_some() {
                        return Err(format!(
                            "{msg:?} sent to {peer:?} while its snapshot streams"
                        ));
                    }
                    self.send(link, TO_SLAVE, &msg);
                }
                Action::Disconnect { peer } => {
                    self.stats.evictions += 1;
                    self.break_link((peer.0 - 1) as usize);
                }
                Action::Persist { lsn, record } => {
                    self.master_pending.push_back((lsn, record));
                    let delay = self.persist_delay(self.master_slow_persist_until);
                    let at = self.master_last_persist_at.max(self.now + delay);
                    self.master_last_persist_at = at;
                    self.schedule(
                        at,
                        Ev::PersistDone {
                            node: 0,
                            lsn,
                            life: self.master_epoch,
                        },
                    );
                }
                Action::Apply {
                    seq,
                    ops,
                    replies,
                    key_hashes,
                } => {
                    super::check_key_hashes(seq, &ops, &key_hashes)?;
                    if key_hashes.len() != replies.len() {
                        return Err(format!(
                            "commit {seq}: client writes without their key hashes"
                        ));
                    }
                    self.master_apply(seq, ops, replies)?;
                }
                Action::RecordSyncSet { version, members } => {
                    // Usually quick; now and then the store is slow or unreachable for a while.
                    // (Outages happen while faults do; settling heals them too.)
                    let delay = if self.now < ACTIVE_MS && self.rng.random_bool(0.03) {
                        self.rng.random_range(100..=1_000)
                    } else {
                        self.rng.random_range(0..=5)
                    };
                    let life = self.master_epoch;
                    self.schedule(
                        self.now + delay,
                        Ev::SyncRecorded {
                            version,
                            members,
                            life,
                        },
                    );
                }
                Action::Reply { client, error } => {
                    match error {
                        WriteError::Unavailable(_) => self.refused += 1,
                        WriteError::Aborted(_) => self.aborted += 1,
                    }
                    self.reply(client)?;
                }
                Action::SetTimer { timer, at_ms } => {
                    self.master_timers.insert(timer, at_ms);
                    self.schedule(
                        at_ms,
                        Ev::Timer {
                            node: 0,
                            timer,
                            at: at_ms,
                            life: self.master_epoch,
                        },
                    );
                }
                Action::CancelTimer { timer } => {
                    self.master_timers.remove(&timer);
                }
                Action::StartSnapshot { peer, at_seq } => {
                    let link = (peer.0 - 1) as usize;
                    let applied = self.committed[self.master_life]
                        .keys()
                        .next_back()
                        .copied()
                        .unwrap_or(0);
                    if applied > at_seq {
                        return Err(format!(
                            "snapshot at {at_seq} requested with the store at {applied}"
                        ));
                    }
                    self.stats.snapshots += 1;
                    // Point-in-time copy, streamed in small chunks over time.
                    let mut chunks = VecDeque::new();
                    let mut chunk = Vec::new();
                    let per_chunk = self.rng.random_range(1..=3);
                    for (key, (value, version)) in &self.master_store {
                        chunk.push(SnapshotEntry {
                            key: key.clone(),
                            value: value.clone(),
                            version: *version,
                            deadline_ms: 0,
                        });
                        if chunk.len() == per_chunk {
                            chunks.push_back(std::mem::take(&mut chunk));
                        }
                    }
                    if !chunk.is_empty() || chunks.is_empty() {
                        chunks.push_back(chunk);
                    }
                    if !self.links[link].broken {
                        let total = chunks.len();
                        self.links[link].snapshot = Some((at_seq, chunks, total));
                        self.schedule(self.now, Ev::SnapshotStep { link });
                    }
                }
                Action::Connect | Action::InstallSnapshot { .. } => {
                    return Err(format!("master emitted a slave action {action:?}"));
                }
            }
        }
        self.schedule_drains()
    }

    /// As the reactor does each turn: a slave being sent its backlog gets a
    /// drain report once its link drained, a turn or a few later.
    fn schedule_drains(&mut self) -> Result<(), String> {
        let peers: Vec<PeerId> = self.coord.backlog_peers().collect();
        for peer in peers {
            let link = (peer.0 - 1) as usize;
            let Some(l) = self.links.get(link) else {
                return Err(format!("backlog for {peer:?}, which has no link"));
            };
            if l.snapshot.is_some() {
                return Err(format!("backlog for {peer:?} while its snapshot streams"));
            }
            if l.broken || l.drain_due {
                continue;
            }
            self.links[link].drain_due = true;
            let at = self.now + self.net_delay();
            self.schedule(at, Ev::Drain { link });
        }
        Ok(())
    }

    fn reply(&mut self, client: ClientRef) -> Result<(), String> {
        let n = self.replies.entry(client.0).or_insert(0);
        *n += 1;
        if *n > 1 {
            return Err(format!("client {client:?} got two replies"));
        }
        Ok(())
    }

    fn master_apply(&mut self, seq: u64, ops: Ops, replies: Vec<ClientRef>) -> Result<(), String> {
        self.released_at[self.master_life].insert(seq, self.now);
        // A slave that left the master's set has stopped serving reads before
        // anything is released without it (its lease ran out first).
        let history = self.histories[self.master_life];
        for (i, s) in self.slaves.iter().enumerate() {
            let Some(part) = s.part.as_ref() else {
                continue;
            };
            let (LinkState::Following(peer), Some(until)) = (part.link(), part.read_lease_until())
            else {
                continue;
            };
            if until <= self.now || part.history_id() != history {
                continue;
            }
            let receives = self
                .coord
                .members()
                .get(peer)
                .is_some_and(|m| m.evicted_because.is_none() && m.state.receives_commits());
            if !receives {
                return Err(format!(
                    "commit {seq} released without slave {i}, which still serves reads \
                     under its lease (until {until})"
                ));
            }
        }
        if let Some((&last, _)) = self.committed[self.master_life].iter().next_back()
            && seq <= last
        {
            return Err(format!("master applied {seq} after {last}"));
        }
        // SPEC 4.1: acknowledged only once every slave in sync for it has it durably prepared.
        for (peer, info) in self.coord.members().iter() {
            if let SlaveState::InSync { join_seq } = info.state
                && join_seq <= seq
            {
                let slave = self.links[(peer.0 - 1) as usize].slave;
                if !self.slaves[slave]
                    .durable_prepared
                    .contains(&(seq, ops.clone()))
                {
                    return Err(format!(
                        "commit {seq} acknowledged but in-sync slave {slave} has no durable prepare"
                    ));
                }
            }
        }
        // With the set recorded (failover): every slave that could be promoted
        // holds this commit durably, prepared or applied.
        for &node in &self.recorded_sync_set {
            let s = &self.slaves[(node - 1) as usize];
            let has = s.durable_prepared.contains(&(seq, ops.clone()))
                || s.durable.iter().any(|d| {
                    matches!(d, Durable::Rec(Record::CommittedTxn { seq: c, ops: o }) if *c == seq && *o == ops)
                        || matches!(d, Durable::Checkpoint(at, ..) if *at >= seq)
                });
            if !has {
                return Err(format!(
                    "commit {seq} applied but recorded slave node {node} does not hold it durably"
                ));
            }
        }
        let results = apply_ops(&mut self.master_store, seq, &ops);
        if replies.len() != ops.len() {
            return Err(format!(
                "commit {seq}: {} replies for {} ops",
                replies.len(),
                ops.len()
            ));
        }
        for (client, _ok) in replies.into_iter().zip(results) {
            self.acked_ok += 1;
            self.reply(client)?;
        }
        let life = self.master_life;
        self.digests[life].insert(seq, digest(&self.master_store));
        self.committed[life].insert(seq, ops);
        self.stats.commits += 1;
        Ok(())
    }

    fn run_slave_actions(&mut self, slave: usize) -> Result<(), String> {
        loop {
            let Some(action) = self.slaves[slave]
                .part
                .as_mut()
                .and_then(|p| p.poll_action())
            else {
                return Ok(());
            };
            self.log(|| format!("slave {slave}: {action:?}"));
            match action {
                Action::Send { peer, msg } => {
                    let link = (peer.0 - 1) as usize;
                    if self.links[link].slave != slave {
                        return Err(format!("slave {slave} sent on another slave's link"));
                    }
                    self.send(link, TO_MASTER, &msg);
                }
                Action::Disconnect { peer } => {
                    let link = (peer.0 - 1) as usize;
                    if self.slaves[slave].link == Some(link) {
                        self.slaves[slave].link = None;
                    }
                    self.break_link(link);
                }
                Action::Connect => {
                    let delay = self.rng.random_range(1..=5);
                    let life = self.slaves[slave].life;
                    self.schedule(self.now + delay, Ev::ConnectDone { slave, life });
                }
                Action::Persist { lsn, record } => {
                    let s = &self.slaves[slave];
                    let durable = match record {
                        Record::Checkpoint { seq, history_id } => {
                            Durable::Checkpoint(seq, history_id, s.store.clone())
                        }
                        other => Durable::Rec(other),
                    };
                    let slow = s.slow_persist_until;
                    let delay = self.persist_delay(slow);
                    let s = &mut self.slaves[slave];
                    let at = s.last_persist_at.max(self.now + delay);
                    s.last_persist_at = at;
                    s.pending.push_back((lsn, durable));
                    let life = s.life;
                    self.schedule(
                        at,
                        Ev::PersistDone {
                            node: slave + 1,
                            lsn,
                            life,
                        },
                    );
                }
                Action::Apply {
                    seq,
                    ops,
                    replies,
                    key_hashes,
                } => {
                    if !replies.is_empty() || !key_hashes.is_empty() {
                        return Err("slave apply with client replies or key hashes".into());
                    }
                    let life = self.life_of(slave)?;
                    if self.committed[life].get(&seq) != Some(&ops) {
                        return Err(format!(
                            "slave {slave} applied {seq} which master life {life} did not commit (or not with these ops)"
                        ));
                    }
                    let s = &mut self.slaves[slave];
                    if seq <= s.applied_seq {
                        return Err(format!(
                            "slave {slave} applied {seq} after {}",
                            s.applied_seq
                        ));
                    }
                    apply_ops(&mut s.store, seq, &ops);
                    s.applied_seq = seq;
                    self.check_state(slave, &self.slaves[slave].store, seq, Some(life), "apply")?;
                }
                Action::InstallSnapshot {
                    at_seq,
                    entries,
                    begin,
                    end,
                } => {
                    let s = &mut self.slaves[slave];
                    if begin {
                        s.staging.clear();
                    }
                    for e in entries {
                        s.staging.insert(e.key, (e.value, e.version));
                    }
                    if end {
                        s.store = std::mem::take(&mut s.staging);
                        s.applied_seq = at_seq;
                        let life = self.life_of(slave)?;
                        let store = &self.slaves[slave].store;
                        self.check_state(slave, store, at_seq, Some(life), "snapshot")?;
                    }
                }
                Action::SetTimer { timer, at_ms } => {
                    let s = &mut self.slaves[slave];
                    s.timers.insert(timer, at_ms);
                    let life = s.life;
                    self.schedule(
                        at_ms,
                        Ev::Timer {
                            node: slave + 1,
                            timer,
                            at: at_ms,
                            life,
                        },
                    );
                }
                Action::CancelTimer { timer } => {
                    self.slaves[slave].timers.remove(&timer);
                }
                Action::Reply { .. }
                | Action::StartSnapshot { .. }
                | Action::RecordSyncSet { .. } => {
                    return Err(format!("slave emitted a master action {action:?}"));
                }
            }
        }
    }

    fn final_checks(&self) -> Result<(), String> {
        let missing: Vec<u64> = (1..=self.next_client)
            .filter(|c| !self.replies.contains_key(c) && !self.dropped_clients.contains(c))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{} clients never got a reply: {missing:?}",
                missing.len()
            ));
        }
        if self.coord.in_flight() != 0 {
            return Err(format!(
                "{} transactions still in flight after settling",
                self.coord.in_flight()
            ));
        }
        let in_sync: BTreeSet<usize> = self
            .coord
            .members()
            .iter()
            .filter(|(_, s)| matches!(s.state, SlaveState::InSync { .. }))
            .map(|(p, _)| self.links[(p.0 - 1) as usize].slave)
            .collect();
        for (i, s) in self.slaves.iter().enumerate() {
            let violations = s.violations + s.part.as_ref().map_or(0, |p| p.protocol_violations());
            if violations > 0 {
                return Err(format!("slave {i} saw {violations} protocol violations"));
            }
            if !in_sync.contains(&i) {
                let members: Vec<_> = self.coord.members().iter().collect();
                return Err(format!(
                    "slave {i} is not in sync after healing: {members:?}"
                ));
            }
            if s.part.as_ref().map(|p| p.link())
                != s.link.map(|l| LinkState::Following(Link::peer(l)))
            {
                return Err(format!("slave {i} is not following its master link"));
            }
            if s.store != self.master_store {
                return Err(format!(
                    "slave {i} diverged:\n slave  {:?}\n master {:?}",
                    s.store, self.master_store
                ));
            }
            let (recovered, pos, _) = recover(&s.durable)?;
            let life = Some(self.master_life);
            self.check_state(i, &recovered, pos, life, "final recovery check")?;
        }
        Ok(())
    }
}

fn run_seed(seed: u64, trace: bool) -> (Result<RunStats, String>, Vec<String>) {
    let mut sim = Sim::new(seed, trace);
    let result = catch_unwind(AssertUnwindSafe(|| sim.run()));
    let result = match result {
        Ok(Ok(())) => Ok(sim.stats),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(crate::sim_support::panic_message(panic.as_ref())),
    };
    (result, sim.trace.take().unwrap_or_default())
}

use crate::sim_support::env_u64;

/// Run `seeds`, stopping at the first failure; returns the summed stats or the failing seed.
fn run_seeds(seeds: &[u64], trace: bool) -> Result<RunStats, (u64, String, Vec<String>)> {
    let mut total = RunStats::default();
    for &seed in seeds {
        let (result, lines) = run_seed(seed, trace);
        let s = result.map_err(|e| (seed, e, lines))?;
        total.add(&s);
    }
    Ok(total)
}

#[test]
fn simulation_keeps_the_replication_invariants() {
    let seeds: Vec<u64> = match env_u64("DKVS_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("DKVS_SIM_SEEDS").unwrap_or(2_000)).collect(),
    };
    let trace = seeds.len() == 1;
    let started = Instant::now();
    // Seeds are independent: split them over two threads (the sims share nothing).
    let (even, odd): (Vec<u64>, Vec<u64>) = seeds.iter().partition(|s| *s % 2 == 0);
    let results = std::thread::scope(|scope| {
        let other = scope.spawn(|| run_seeds(&odd, trace));
        let mine = run_seeds(&even, trace);
        [
            mine,
            other
                .join()
                .unwrap_or_else(|_| Err((u64::MAX, "sim thread panicked".into(), Vec::new()))),
        ]
    });
    let mut total = RunStats::default();
    for result in results {
        match result {
            Ok(s) => total.add(&s),
            Err((seed, e, lines)) => {
                let keep = env_u64("DKVS_SIM_TRACE_LINES").unwrap_or(400) as usize;
                for line in lines.iter().rev().take(keep).rev() {
                    eprintln!("{line}");
                }
                panic!(
                    "simulation seed {seed} failed: {e}\n\
                     replay with: DKVS_SIM_SEED={seed} cargo test --lib replication::sim -- --nocapture"
                );
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "simulated {} seeds in {secs:.2}s ({:.0} seeds/s): {total:?}",
        seeds.len(),
        seeds.len() as f64 / secs.max(1e-9)
    );
}
