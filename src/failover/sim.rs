//! Deterministic simulation of failover through etcd: three nodes, each
//! running the real [`Election`], [`Coordinator`] and [`Participant`], with
//! role changes made the way `src/server/failover.rs` makes them (promotion
//! commits what was prepared and not aborted, numbers after what was seen,
//! and hands its commits to the partial-resync log; a deposed leader wipes
//! its store and resyncs; the led-epoch marker).
//!
//! Modelled: etcd (a linearizable store of the leader key under a lease and
//! the in-sync set with its `mod_revision`, leases expiring on the simulated
//! clock, the campaign and in-sync-set transactions, keepalive, reads and
//! watch notifications with delays), each node's etcd agent (one request at
//! a time, each bounded by the agent's timeout, a timed-out request may
//! still have been applied), FIFO peer links with delays and breaks, disks
//! (records durable in log order after a delay, a resync checkpoint slower;
//! a crash keeps only durable records, replayed with the server's
//! [`Replay`]) and clients that write fresh keys to whichever node is master.
//! Faults: crashes and restarts (the master more often), pauses (a stopped
//! process, possibly past its lease), partitions between nodes and between a
//! node and etcd, etcd outages (requests refused, or applied with replies
//! too late), slow disks, and clocks that drift (each node's runs up to 2%
//! fast or slow; `DKVS_SIM_CLOCK_DRIFT_PERMILLE` sets the bound).
//!
//! Checked: every acknowledged write survives every failover (after healing,
//! every replica holds it); no write answered ABORTED or UNAVAILABLE is ever
//! applied anywhere; at most one node acknowledges writes in an epoch, and
//! none after etcd ended its epoch; at the end all replicas are identical.
//!
//! ```text
//! DKVS_SIM_SEED=1234 cargo test --lib failover::sim -- --nocapture
//! DKVS_SIM_SEEDS=5000 cargo test --release --lib failover::sim
//! ```

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use rand::{RngExt, SeedableRng, rngs::StdRng};

use super::{Action as EAction, Election, ElectionConfig, LeaderRecord, Reply, Request, State};
use super::{Observation, SyncRecord};
use crate::replication::{
    Action, ClientRef, ClientWrite, CommitLog, Coordinator, CoordinatorConfig, Event, LinkState,
    OpKind, Ops, Participant, ParticipantConfig, PeerId, PeerMessage, Record, SlaveState,
    SnapshotEntry, TimerId, WriteError, WriteOp,
};
use crate::wal::replay::{Replay, Step};

type Store = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

const NODES: usize = 3;
/// Simulated milliseconds of client load and faults.
const ACTIVE_MS: u64 = 3_000;
/// Client writes go on this long after healing (so slaves get recorded again).
const TRICKLE_MS: u64 = 1_000;
/// Simulated milliseconds after healing within which everyone must converge.
const SETTLE_MS: u64 = 20_000;
/// Bound on events of one run (a livelock would otherwise spin forever).
const MAX_EVENTS: u64 = 3_000_000;

/// Something scheduled.
#[derive(Debug)]
enum Ev {
    /// The next message on `link` towards end `dir` arrives.
    Deliver {
        link: usize,
        dir: usize,
    },
    /// End `end` of `link` notices it is gone.
    LinkLost {
        link: usize,
        end: usize,
    },
    /// A connect on `link` completes (or fails).
    ConnectDone {
        link: usize,
    },
    /// The next snapshot chunk on `link` goes out.
    SnapshotStep {
        link: usize,
    },
    /// The master's end of `link`, being sent a backlog, has drained.
    Drain {
        link: usize,
    },
    /// A role timer.
    Timer {
        node: usize,
        life: u64,
        timer: TimerId,
        at: u64,
    },
    /// The election's next deadline.
    Wake {
        node: usize,
        life: u64,
    },
    /// Records up to `lsn` are durable.
    PersistDone {
        node: usize,
        life: u64,
        lsn: u64,
    },
    /// A request reaches etcd.
    EtcdArrive {
        node: usize,
        life: u64,
        request: Request,
        sent: u64,
        timeout_at: u64,
    },
    /// The agent hands a reply to the reactor.
    AgentReply {
        node: usize,
        life: u64,
        reply: Reply,
    },
    /// The watch reports a change.
    Watch {
        node: usize,
        life: u64,
    },
    /// A lease may expire now.
    LeaseExpiry {
        lease: i64,
    },
    /// Client writes reach `node`.
    Writes {
        node: usize,
        life: u64,
        writes: Vec<ClientWrite>,
    },
    ClientBatch,
    Crash {
        node: Option<usize>,
        dur: u64,
    },
    Restart {
        node: usize,
    },
    Pause {
        node: Option<usize>,
        dur: u64,
    },
    Cut {
        a: usize,
        b: usize,
        dur: u64,
    },
    Uncut {
        a: usize,
        b: usize,
    },
    CutEtcd {
        node: Option<usize>,
        dur: u64,
    },
    UncutEtcd {
        node: usize,
    },
    Outage {
        dur: u64,
        slow: bool,
    },
    OutageEnd,
    SlowDisk {
        node: usize,
        dur: u64,
    },
    Heal,
    Check,
}

impl Ev {
    /// The node that processes this event (a paused node defers it).
    fn target(&self, links: &[Link]) -> Option<usize> {
        match self {
            Ev::Deliver { link, dir } => Some(links[*link].ends[*dir]),
            Ev::LinkLost { link, end } => Some(links[*link].ends[*end]),
            Ev::ConnectDone { link } => Some(links[*link].ends[0]),
            Ev::SnapshotStep { link } | Ev::Drain { link } => Some(links[*link].ends[1]),
            Ev::Timer { node, .. }
            | Ev::Wake { node, .. }
            | Ev::PersistDone { node, .. }
            | Ev::AgentReply { node, .. }
            | Ev::Watch { node, .. }
            | Ev::Writes { node, .. } => Some(*node),
            _ => None,
        }
    }
}

type Scheduled = crate::sim_support::Scheduled<Ev>;

/// A replication link: end 0 connected, end 1 accepted. `dir` names the
/// destination end.
struct Link {
    ends: [usize; 2],
    lives: [u64; 2],
    broken: bool,
    queue: [VecDeque<PeerMessage>; 2],
    last_at: [u64; 2],
    /// A snapshot streaming: its seq, the chunks left, and how many there were.
    snapshot: Option<(u64, VecDeque<Vec<SnapshotEntry>>, usize)>,
    /// An `Ev::Drain` is scheduled for it.
    drain_due: bool,
}

/// A record as the disk holds it; a checkpoint carries the store it persists.
#[derive(Clone, Debug)]
enum Durable {
    Rec(Record),
    Checkpoint(u64, u64, Store),
}

/// What a standby holds (as `server::failover::Standby`).
struct Standby {
    history_id: u64,
    prepared: BTreeMap<u64, Ops>,
    commits: Vec<(u64, Ops)>,
    floor: u64,
    seen: u64,
}

enum Role {
    Master(Box<Coordinator>),
    Slave {
        part: Box<Participant>,
        staging: Option<Store>,
    },
    Standby(Box<Standby>),
    /// The process is not running.
    Dead,
}

impl Role {
    fn history_id(&self) -> u64 {
        match self {
            Role::Master(c) => c.history_id(),
            Role::Slave { part, .. } => part.history_id(),
            Role::Standby(s) => s.history_id,
            Role::Dead => 0,
        }
    }
}

struct Node {
    life: u64,
    election: Option<Election>,
    role: Role,
    store: Store,
    commit_seq: u64,
    /// The epoch followed or led, and the leader (as `server::failover::Failover`).
    epoch: u64,
    leader: Option<LeaderRecord>,
    /// The led-epoch marker as this process knows it, and as the disk holds it.
    led_epoch: Option<u64>,
    durable_led_epoch: Option<u64>,
    appended_lsn: u64,
    reported_lsn: u64,
    pending: VecDeque<(u64, Durable)>,
    durable: Vec<Durable>,
    last_persist_at: u64,
    slow_disk_until: u64,
    timers: BTreeMap<TimerId, u64>,
    peers: BTreeSet<usize>,
    /// The election's wake-up already scheduled.
    wake_at: u64,
    /// Requests waiting for the agent, and whether one is in flight.
    agent: VecDeque<Request>,
    agent_busy: bool,
    etcd_cut: bool,
    paused_until: u64,
    /// How fast this node's clock runs, per mille of real time.
    clock_rate: u64,
    /// The lsn of a wipe's checkpoint not yet durable: until it is, a crash
    /// brings the deposed leader's data back, so its marker must stay.
    wipe_lsn: Option<u64>,
    /// Clients waiting for a reply from this process.
    waiting: BTreeSet<u64>,
    completions: VecDeque<Event>,
}

struct Etcd {
    revision: i64,
    leader: Option<(LeaderRecord, i64)>,
    sync: Option<(SyncRecord, i64)>,
    /// Lease id -> (expiry, ttl).
    leases: BTreeMap<i64, (u64, u64)>,
    next_lease: i64,
    down: bool,
    slow: bool,
    /// When etcd ended each epoch (its leader key deleted).
    epoch_ended: BTreeMap<u64, u64>,
    epoch_leader: BTreeMap<u64, u64>,
}

/// What a client heard.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok { node: usize, epoch: u64, at: u64 },
    Aborted,
    Unavailable,
}

#[derive(Debug, Default, Clone, Copy)]
struct RunStats {
    acked: u64,
    aborted: u64,
    unavailable: u64,
    unanswered: u64,
    elections: u64,
    crashes: u64,
    pauses: u64,
    cuts: u64,
    outages: u64,
    wipes: u64,
    promotions_committing: u64,
    events: u64,
}

impl RunStats {
    fn add(&mut self, o: &RunStats) {
        self.acked += o.acked;
        self.aborted += o.aborted;
        self.unavailable += o.unavailable;
        self.unanswered += o.unanswered;
        self.elections += o.elections;
        self.crashes += o.crashes;
        self.pauses += o.pauses;
        self.cuts += o.cuts;
        self.outages += o.outages;
        self.wipes += o.wipes;
        self.promotions_committing += o.promotions_committing;
        self.events += o.events;
    }
}

struct Sim {
    rng: StdRng,
    now: u64,
    order: u64,
    heap: BinaryHeap<Scheduled>,
    nodes: Vec<Node>,
    links: Vec<Link>,
    etcd: Etcd,
    /// Node pairs that cannot reach each other.
    cut: BTreeSet<(usize, usize)>,
    lease_ttl_ms: u64,
    agent_timeout_ms: u64,
    coord_config: CoordinatorConfig,
    part_config: ParticipantConfig,
    next_client: u64,
    /// Every write by client: its key (fresh per write) and value.
    writes: BTreeMap<u64, (Vec<u8>, Vec<u8>)>,
    outcomes: BTreeMap<u64, Outcome>,
    /// Keys some node applied at some time.
    applied_ever: BTreeSet<Vec<u8>>,
    /// Keys whose write was answered ABORTED or UNAVAILABLE.
    refused_keys: BTreeSet<Vec<u8>>,
    healed: bool,
    done: bool,
    /// A failure found where it could not be returned at once.
    deferred_error: Option<String>,
    trace: Option<Vec<String>>,
    stats: RunStats,
}

fn addr(node: usize) -> String {
    format!("n{node}")
}

fn node_of(addr: &str) -> Option<usize> {
    addr.strip_prefix('n')?.parse().ok().filter(|n| *n < NODES)
}

fn apply_to(store: &mut Store, seq: u64, ops: &[WriteOp]) {
    for op in ops {
        match op.kind {
            OpKind::Put => {
                store.insert(op.key().to_vec(), (op.value().to_vec(), seq));
            }
            OpKind::Update => {
                if let Some(slot) = store.get_mut(op.key()) {
                    *slot = (op.value().to_vec(), seq);
                }
            }
            OpKind::Delete => {
                store.remove(op.key());
            }
            OpKind::Clear => store.clear(),
            // Its clients write plain keys: deadlines are the data model's
            // simulation's business (src/replication/sim.rs).
            OpKind::PutExpiring | OpKind::Expire => {
                unreachable!("the failover simulation writes no deadlines")
            }
        }
    }
}

/// Rebuild a node from its durable records with the server's replay: from
/// the last resync checkpoint (older records are superseded by it), as the
/// write-ahead log does.
fn recover(durable: &[Durable]) -> Result<(Replay, Store), String> {
    let start = durable
        .iter()
        .rposition(|d| matches!(d, Durable::Checkpoint(..)))
        .unwrap_or(0);
    let mut replay = match &durable.get(start) {
        Some(Durable::Checkpoint(seq, history, snap)) => {
            let mut store = crate::store::Store::new();
            for (k, (v, ver)) in snap {
                store.set(k, v, *ver);
            }
            Replay::new(store, *seq, *history)
        }
        _ => Replay::new(crate::store::Store::new(), 0, 0),
    };
    for d in &durable[start..] {
        let record = match d {
            Durable::Rec(r) => r.clone(),
            Durable::Checkpoint(seq, history_id, _) => Record::Checkpoint {
                seq: *seq,
                history_id: *history_id,
            },
        };
        match replay.apply(&record)? {
            Step::Continue => {}
            Step::UncoveredCheckpoint => {
                return Err(format!("replay met an uncovered checkpoint {record:?}"));
            }
        }
    }
    let store: Store = replay
        .store
        .iter()
        .map(|b| (b.key().to_vec(), (b.value().to_vec(), b.version())))
        .collect();
    Ok((replay, store))
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let lease_ttl_ms = rng.random_range(300..=1_000);
        let tpc_timeout_ms = rng.random_range(40..=200);
        let coord_config = CoordinatorConfig {
            tpc_timeout_ms,
            // Sometimes --min-slaves 1: a slave lost mid-vote then aborts.
            min_slaves: usize::from(rng.random_bool(0.3)),
            log_capacity: rng.random_range(0..=40),
            heartbeat_interval_ms: 50,
            peer_timeout_ms: 200 + tpc_timeout_ms,
            max_inflight_txns: 64,
            record_sync_set: true,
            // Drawn apart, so that a seed draws the same faults as before this
            // knob existed: mostly a commit or a few per step of a backlog,
            // so that catch-ups span drains; sometimes the server's default.
            backlog_step_bytes: {
                let mut knobs = StdRng::seed_from_u64(seed ^ 0xBAC4_1065);
                if knobs.random_bool(0.2) {
                    CoordinatorConfig::default().backlog_step_bytes
                } else {
                    knobs.random_range(0..=600)
                }
            },
            ..CoordinatorConfig::default()
        };
        // The server's defaults, scaled to the simulated lease.
        let part_config = ParticipantConfig {
            reconnect_min_ms: 10,
            reconnect_max_ms: lease_ttl_ms / 2,
            outcome_query_after_ms: lease_ttl_ms / 3,
            master_silence_ms: lease_ttl_ms,
            // Reconnect jitter replays from the simulation's seed (varied per node below).
            jitter_seed: seed,
            ..ParticipantConfig::default()
        };
        let mut sim = Sim {
            rng,
            now: 0,
            order: 0,
            heap: BinaryHeap::new(),
            nodes: Vec::new(),
            links: Vec::new(),
            etcd: Etcd {
                revision: 1,
                leader: None,
                sync: None,
                leases: BTreeMap::new(),
                next_lease: 100,
                down: false,
                slow: false,
                epoch_ended: BTreeMap::new(),
                epoch_leader: BTreeMap::new(),
            },
            cut: BTreeSet::new(),
            lease_ttl_ms,
            // As `Failover::start`: each etcd call bounded well inside the lease.
            agent_timeout_ms: (lease_ttl_ms / 4).clamp(100, 2_000),
            coord_config,
            part_config,
            next_client: 0,
            writes: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            applied_ever: BTreeSet::new(),
            refused_keys: BTreeSet::new(),
            healed: false,
            done: false,
            deferred_error: None,
            trace: trace.then(Vec::new),
            stats: RunStats::default(),
        };
        let max_drift = env_u64("DKVS_SIM_CLOCK_DRIFT_PERMILLE").unwrap_or(20);
        for i in 0..NODES {
            sim.nodes.push(Node {
                life: 0,
                election: None,
                role: Role::Dead,
                store: Store::new(),
                commit_seq: 0,
                epoch: 0,
                leader: None,
                led_epoch: None,
                durable_led_epoch: None,
                appended_lsn: 0,
                reported_lsn: 0,
                pending: VecDeque::new(),
                durable: Vec::new(),
                last_persist_at: 0,
                slow_disk_until: 0,
                timers: BTreeMap::new(),
                peers: BTreeSet::new(),
                wake_at: u64::MAX,
                agent: VecDeque::new(),
                agent_busy: false,
                etcd_cut: false,
                paused_until: 0,
                waiting: BTreeSet::new(),
                wipe_lsn: None,
                // Clocks drift a little (well inside the lease's margin).
                // (No draw without drift: runs then replay as before drift existed.)
                clock_rate: if max_drift == 0 {
                    1000
                } else {
                    1000 - max_drift + sim.rng.random_range(0..=2 * max_drift)
                },
                completions: VecDeque::new(),
            });
            let at = sim.rng.random_range(0..=50);
            sim.schedule(at, Ev::Restart { node: i });
        }
        sim.schedule(1, Ev::ClientBatch);
        let faults = sim.rng.random_range(0..=8);
        for _ in 0..faults {
            let at = sim.rng.random_range(200..ACTIVE_MS);
            // Sometimes past the lease, so the lease's end is what is tested.
            let dur = if sim.rng.random_bool(0.5) {
                sim.rng.random_range(10..=lease_ttl_ms)
            } else {
                sim.rng.random_range(lease_ttl_ms..=3 * lease_ttl_ms)
            };
            // `None`: whichever node is master when the fault strikes.
            let node = if sim.rng.random_bool(0.6) {
                None
            } else {
                Some(sim.rng.random_range(0..NODES))
            };
            let ev = match sim.rng.random_range(0..7) {
                0 | 1 => Ev::Crash { node, dur },
                2 => Ev::Pause { node, dur },
                3 => {
                    let a = sim.rng.random_range(0..NODES);
                    let b = (a + sim.rng.random_range(1..NODES)) % NODES;
                    Ev::Cut { a, b, dur }
                }
                4 => Ev::CutEtcd { node, dur },
                5 => Ev::Outage {
                    dur,
                    slow: sim.rng.random_bool(0.4),
                },
                _ => Ev::SlowDisk {
                    node: sim.rng.random_range(0..NODES),
                    dur,
                },
            };
            sim.schedule(at, ev);
        }
        sim.schedule(ACTIVE_MS, Ev::Heal);
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

    /// `node`'s clock: it runs at its own rate (per mille of the real one).
    fn local(&self, node: usize) -> u64 {
        self.now * self.nodes[node].clock_rate / 1000
    }

    /// The real time at which `node`'s clock reads `local`.
    fn global_at(&self, node: usize, local: u64) -> u64 {
        local
            .saturating_mul(1000)
            .div_ceil(self.nodes[node].clock_rate)
    }

    fn alive(&self, node: usize) -> bool {
        !matches!(self.nodes[node].role, Role::Dead)
    }

    fn is_cut(&self, a: usize, b: usize) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }

    fn net_delay(&mut self) -> u64 {
        match self.rng.random_range(0..100u64) {
            r @ 0..=96 => r % 4,
            _ => self.rng.random_range(10..=60),
        }
    }

    /// The node acting as master, by its own account (a deposed one may not know yet).
    fn masters(&self) -> Vec<usize> {
        (0..NODES)
            .filter(|&n| matches!(self.nodes[n].role, Role::Master(_)))
            .collect()
    }

    fn pick(&mut self, node: Option<usize>) -> usize {
        match node {
            Some(n) => n,
            None => {
                let masters = self.masters();
                if masters.is_empty() {
                    self.rng.random_range(0..NODES)
                } else {
                    masters[self.rng.random_range(0..masters.len())]
                }
            }
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let end = ACTIVE_MS + SETTLE_MS;
        let mut events = 0u64;
        while let Some(s) = self.heap.pop() {
            if self.done {
                break;
            }
            if s.at > end {
                return Err(format!(
                    "no convergence within {SETTLE_MS} ms of healing:\n{}",
                    self.describe()
                ));
            }
            events += 1;
            if events > MAX_EVENTS {
                return Err(format!("more than {MAX_EVENTS} events: livelock?"));
            }
            self.now = s.at;
            if let Some(node) = s.ev.target(&self.links)
                && self.nodes[node].paused_until > self.now
            {
                let until = self.nodes[node].paused_until;
                self.schedule(until, s.ev);
                continue;
            }
            self.step(s.ev)?;
        }
        self.stats.events = events;
        if !self.done {
            return Err(format!("ran out of events:\n{}", self.describe()));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let mut text = format!(
            "etcd leader {:?} sync {:?}\n",
            self.etcd.leader, self.etcd.sync
        );
        for (i, n) in self.nodes.iter().enumerate() {
            let role = match &n.role {
                Role::Master(c) => format!(
                    "master epoch {} seq {} in flight {} members {:?} recorded {:?}",
                    n.epoch,
                    c.commit_seq(),
                    c.in_flight(),
                    c.members()
                        .iter()
                        .map(|(p, s)| (p.0, s.node_id, s.state))
                        .collect::<Vec<_>>(),
                    c.recorded_sync_set()
                ),
                Role::Slave { part, .. } => format!(
                    "slave of {:?} link {:?} position {} in doubt {}",
                    n.leader.as_ref().map(|l| &l.addr),
                    part.link(),
                    part.position(),
                    part.in_doubt()
                ),
                Role::Standby(_) => "standby".into(),
                Role::Dead => "dead".into(),
            };
            let state = n.election.as_ref().map(|e| e.state().clone());
            // Where it differs from node 0, for a diverged run.
            let base = &self.nodes[0].store;
            let differ: Vec<String> = base
                .iter()
                .filter(|(k, v)| n.store.get(*k) != Some(v))
                .chain(n.store.iter().filter(|(k, _)| !base.contains_key(*k)))
                .take(6)
                .map(|(k, (_, ver))| format!("{}@{ver}", String::from_utf8_lossy(k)))
                .collect();
            if !differ.is_empty() {
                text.push_str(&format!("node {i} differs from node 0 at {differ:?}\n"));
            }
            text.push_str(&format!(
                "node {i}: {role}; election {state:?}; {} keys at {}\n",
                n.store.len(),
                n.commit_seq
            ));
        }
        text
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Deliver { link, dir } => {
                let Some(msg) = self.links[link].queue[dir].pop_front() else {
                    return Ok(()); // lost in a break
                };
                let node = self.links[link].ends[dir];
                if self.nodes[node].life != self.links[link].lives[dir]
                    || !self.nodes[node].peers.contains(&link)
                {
                    return Ok(());
                }
                self.log(|| format!("node {node} <- link {link}: {msg:?}"));
                self.turn(node);
                match &self.nodes[node].role {
                    Role::Slave { .. } if matches!(msg, PeerMessage::Register { .. }) => {
                        // As `become_peer`: a handshake sent to a slave is closed.
                        self.drop_peer(node, link);
                    }
                    _ => self.feed(
                        node,
                        Event::Message {
                            peer: PeerId(link as u64),
                            msg,
                        },
                    ),
                }
                self.settle(node)?;
            }
            Ev::LinkLost { link, end } => {
                let node = self.links[link].ends[end];
                if self.nodes[node].life != self.links[link].lives[end]
                    || !self.nodes[node].peers.remove(&link)
                {
                    return Ok(());
                }
                self.turn(node);
                self.feed(
                    node,
                    Event::PeerLost {
                        peer: PeerId(link as u64),
                    },
                );
                self.settle(node)?;
            }
            Ev::ConnectDone { link } => {
                let node = self.links[link].ends[0];
                if self.nodes[node].life != self.links[link].lives[0]
                    || !self.nodes[node].peers.contains(&link)
                {
                    return Ok(());
                }
                let target = self.links[link].ends[1];
                self.turn(node);
                if !self.alive(target) || self.is_cut(node, target) || self.links[link].broken {
                    self.nodes[node].peers.remove(&link);
                    self.links[link].broken = true;
                    self.feed(node, Event::ConnectFailed);
                } else {
                    self.links[link].lives[1] = self.nodes[target].life;
                    self.nodes[target].peers.insert(link);
                    self.log(|| format!("node {node} connected to {target} on link {link}"));
                    self.feed(
                        node,
                        Event::Connected {
                            peer: PeerId(link as u64),
                        },
                    );
                }
                self.settle(node)?;
            }
            Ev::SnapshotStep { link } => {
                let node = self.links[link].ends[1];
                if self.links[link].broken || !self.nodes[node].peers.contains(&link) {
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
                self.turn(node);
                self.send(
                    node,
                    link,
                    PeerMessage::SnapshotChunk {
                        snapshot_seq: at_seq,
                        entries,
                        last,
                    },
                );
                if last {
                    self.feed(
                        node,
                        Event::SnapshotSent {
                            peer: PeerId(link as u64),
                            at_seq,
                        },
                    );
                } else {
                    // The simulated network never pushes back: every chunk drains.
                    self.feed(
                        node,
                        Event::SnapshotProgress {
                            peer: PeerId(link as u64),
                            at_seq,
                            done_per_mille,
                        },
                    );
                    let next = self.now + self.rng.random_range(0..=3);
                    self.schedule(next, Ev::SnapshotStep { link });
                }
                self.settle(node)?;
            }
            Ev::Drain { link } => {
                self.links[link].drain_due = false;
                let node = self.links[link].ends[1];
                if self.links[link].broken
                    || !self.nodes[node].peers.contains(&link)
                    || !matches!(self.nodes[node].role, Role::Master(_))
                {
                    return Ok(());
                }
                self.turn(node);
                self.feed(
                    node,
                    Event::PeerDrained {
                        peer: PeerId(link as u64),
                    },
                );
                self.settle(node)?;
            }
            Ev::Timer {
                node,
                life,
                timer,
                at,
            } => {
                if self.nodes[node].life != life || self.nodes[node].timers.get(&timer) != Some(&at)
                {
                    return Ok(());
                }
                self.nodes[node].timers.remove(&timer);
                self.turn(node);
                self.feed(node, Event::TimerFired { timer });
                self.settle(node)?;
            }
            Ev::Wake { node, life } => {
                if self.nodes[node].life != life || !self.alive(node) {
                    return Ok(());
                }
                if self.nodes[node].wake_at == self.now {
                    self.nodes[node].wake_at = u64::MAX;
                }
                self.turn(node);
                self.settle(node)?;
            }
            Ev::PersistDone { node, life, lsn } => {
                if self.nodes[node].life != life {
                    return Ok(());
                }
                let n = &mut self.nodes[node];
                while n.pending.front().is_some_and(|(l, _)| *l <= lsn) {
                    if let Some((_, d)) = n.pending.pop_front() {
                        n.durable.push(d);
                    }
                }
                n.reported_lsn = n.reported_lsn.max(lsn);
                if n.wipe_lsn.is_some_and(|w| w <= lsn) {
                    n.wipe_lsn = None;
                }
                self.turn(node);
                self.feed(node, Event::Persisted { lsn });
                self.settle(node)?;
            }
            Ev::EtcdArrive {
                node,
                life,
                request,
                sent,
                timeout_at,
            } => {
                if self.etcd.down {
                    // Lost on the way: the agent's call times out.
                    let what = request_name(&request);
                    self.agent_reply(node, life, timeout_at, failed(what, "timed out"));
                    return Ok(());
                }
                let reply = self.etcd_apply(node, request, sent)?;
                let back = if self.etcd.slow {
                    self.rng.random_range(0..=self.agent_timeout_ms * 3 / 2)
                } else {
                    self.net_delay()
                };
                if self.now + back > timeout_at {
                    // Applied, but the answer comes too late: outcome unknown.
                    let what = request_name_of(&reply);
                    self.agent_reply(node, life, timeout_at, failed(what, "timed out"));
                } else {
                    self.agent_reply(node, life, self.now + back, reply);
                }
            }
            Ev::AgentReply { node, life, reply } => {
                if self.nodes[node].life != life {
                    return Ok(());
                }
                self.log(|| format!("node {node} etcd reply {reply:?}"));
                self.turn(node);
                self.nodes[node].agent_busy = false;
                let now = self.local(node);
                if let Some(e) = self.nodes[node].election.as_mut() {
                    e.on_reply(now, reply);
                }
                self.settle(node)?;
            }
            Ev::Watch { node, life } => {
                if self.nodes[node].life != life || !self.alive(node) {
                    return Ok(());
                }
                self.turn(node);
                let now = self.local(node);
                if let Some(e) = self.nodes[node].election.as_mut() {
                    e.on_reply(now, Reply::Changed);
                }
                self.settle(node)?;
            }
            Ev::LeaseExpiry { lease } => self.expire_leases(lease),
            Ev::Writes { node, life, writes } => {
                if self.nodes[node].life != life {
                    return Ok(()); // the connection died with the process
                }
                self.turn(node);
                if matches!(self.nodes[node].role, Role::Master(_)) {
                    for w in &writes {
                        self.nodes[node].waiting.insert(w.client.0);
                    }
                    self.feed(node, Event::ClientWrites { writes });
                } else {
                    // A slave redirects, a standby refuses: nothing is applied.
                    for w in writes {
                        self.answer(node, w.client, Err(WriteError::Unavailable("no".into())))?;
                    }
                }
                self.settle(node)?;
            }
            Ev::ClientBatch => {
                if self.now >= ACTIVE_MS + TRICKLE_MS {
                    return Ok(());
                }
                let masters = self.masters();
                if !masters.is_empty() {
                    let node = masters[self.rng.random_range(0..masters.len())];
                    let n = self.rng.random_range(1..=3);
                    let mut writes = Vec::new();
                    for _ in 0..n {
                        self.next_client += 1;
                        let c = self.next_client;
                        let key = format!("k{c}").into_bytes();
                        let value = format!("v{c}").into_bytes();
                        self.writes.insert(c, (key.clone(), value.clone()));
                        writes.push(ClientWrite {
                            client: ClientRef(c),
                            key_hash: crate::replication::test_key_hash(&key),
                            op: WriteOp::new(OpKind::Put, key, value),
                        });
                    }
                    let life = self.nodes[node].life;
                    let at = self.now + self.net_delay();
                    self.schedule(at, Ev::Writes { node, life, writes });
                }
                let next = self.now + self.rng.random_range(3..=25);
                self.schedule(next, Ev::ClientBatch);
            }
            Ev::Crash { node, dur } => {
                let node = self.pick(node);
                if self.alive(node) && !self.healed {
                    self.crash(node);
                    self.schedule(self.now + dur, Ev::Restart { node });
                }
            }
            Ev::Restart { node } => {
                if !self.alive(node) {
                    self.restart(node)?;
                }
            }
            Ev::Pause { node, dur } => {
                let node = self.pick(node);
                if !self.healed {
                    self.log(|| format!("pause node {node} for {dur}"));
                    self.stats.pauses += 1;
                    let n = &mut self.nodes[node];
                    n.paused_until = n.paused_until.max(self.now + dur);
                }
            }
            Ev::Cut { a, b, dur } => {
                if !self.healed {
                    self.log(|| format!("cut {a} from {b} for {dur}"));
                    self.stats.cuts += 1;
                    self.cut.insert((a.min(b), a.max(b)));
                    for link in 0..self.links.len() {
                        let ends = self.links[link].ends;
                        if (ends == [a, b] || ends == [b, a]) && !self.links[link].broken {
                            // Nothing arrives any more; each end notices late.
                            self.break_link(link, self.lease_ttl_ms * 2);
                        }
                    }
                    self.schedule(self.now + dur, Ev::Uncut { a, b });
                }
            }
            Ev::Uncut { a, b } => {
                self.cut.remove(&(a.min(b), a.max(b)));
            }
            Ev::CutEtcd { node, dur } => {
                let node = self.pick(node);
                if !self.healed {
                    self.log(|| format!("cut node {node} from etcd for {dur}"));
                    self.stats.cuts += 1;
                    self.nodes[node].etcd_cut = true;
                    self.schedule(self.now + dur, Ev::UncutEtcd { node });
                }
            }
            Ev::UncutEtcd { node } => {
                if self.nodes[node].etcd_cut {
                    self.nodes[node].etcd_cut = false;
                    self.watch_reopened(node);
                }
            }
            Ev::Outage { dur, slow } => {
                if !self.healed {
                    self.log(|| format!("etcd outage for {dur} (slow: {slow})"));
                    self.stats.outages += 1;
                    if slow {
                        self.etcd.slow = true;
                    } else {
                        self.etcd.down = true;
                    }
                    self.schedule(self.now + dur, Ev::OutageEnd);
                }
            }
            Ev::OutageEnd => {
                let was_down = self.etcd.down;
                self.etcd.down = false;
                self.etcd.slow = false;
                if was_down {
                    for n in 0..NODES {
                        self.watch_reopened(n);
                    }
                }
                self.expire_leases(0);
            }
            Ev::SlowDisk { node, dur } => {
                if !self.healed {
                    let n = &mut self.nodes[node];
                    n.slow_disk_until = n.slow_disk_until.max(self.now + dur);
                }
            }
            Ev::Heal => {
                self.log(|| "heal everything".into());
                self.healed = true;
                self.cut.clear();
                let was_down = self.etcd.down;
                self.etcd.down = false;
                self.etcd.slow = false;
                for n in 0..NODES {
                    let node = &mut self.nodes[n];
                    node.slow_disk_until = 0;
                    if node.paused_until > self.now {
                        node.paused_until = self.now;
                    }
                    if node.etcd_cut || was_down {
                        node.etcd_cut = false;
                        self.watch_reopened(n);
                    }
                    if !self.alive(n) {
                        self.schedule(self.now, Ev::Restart { node: n });
                    }
                }
                self.expire_leases(0);
                self.schedule(self.now + TRICKLE_MS, Ev::Check);
            }
            Ev::Check => {
                if self.converged() {
                    self.final_checks()?;
                    self.done = true;
                } else {
                    self.schedule(self.now + 100, Ev::Check);
                }
            }
        }
        Ok(())
    }

    // ---- etcd ----------------------------------------------------------

    fn bump(&mut self) -> i64 {
        self.etcd.revision += 1;
        let rev = self.etcd.revision;
        // Every change is seen by the watches of the nodes that reach etcd.
        for n in 0..NODES {
            if self.alive(n) && !self.nodes[n].etcd_cut && !self.etcd.down {
                let life = self.nodes[n].life;
                let at = self.now + self.net_delay();
                self.schedule(at, Ev::Watch { node: n, life });
            }
        }
        rev
    }

    fn watch_reopened(&mut self, node: usize) {
        if self.alive(node) {
            // The watch thread reports a reopening as a change.
            let life = self.nodes[node].life;
            let at = self.now + self.rng.random_range(1..=20);
            self.schedule(at, Ev::Watch { node, life });
        }
    }

    /// Expire every lease whose time has come (`_hint` is the one scheduled).
    fn expire_leases(&mut self, _hint: i64) {
        let now = self.now;
        let expired: Vec<(i64, u64)> = self
            .etcd
            .leases
            .iter()
            .filter(|(_, (expiry, _))| *expiry <= now)
            .map(|(l, (e, _))| (*l, *e))
            .collect();
        for (lease, expiry) in expired {
            self.revoke(lease, expiry);
        }
    }

    fn revoke(&mut self, lease: i64, at: u64) {
        if self.etcd.leases.remove(&lease).is_none() {
            return;
        }
        if let Some((leader, l)) = &self.etcd.leader
            && *l == lease
        {
            let epoch = leader.epoch;
            self.log(|| format!("etcd: leader key of epoch {epoch} gone (lease {lease})"));
            self.etcd.epoch_ended.insert(epoch, at);
            self.etcd.leader = None;
            self.bump();
        }
    }

    fn etcd_apply(&mut self, node: usize, request: Request, sent: u64) -> Result<Reply, String> {
        self.expire_leases(0);
        let ttl = self.lease_ttl_ms;
        Ok(match request {
            Request::Read => Reply::Read(Observation {
                leader: self.etcd.leader.clone(),
                sync: self.etcd.sync.clone(),
            }),
            Request::GrantLease { ttl_ms, sent_ms } => {
                let _ = sent;
                self.etcd.next_lease += 1;
                let lease = self.etcd.next_lease;
                self.etcd.leases.insert(lease, (self.now + ttl_ms, ttl_ms));
                self.schedule(self.now + ttl_ms, Ev::LeaseExpiry { lease });
                Reply::LeaseGranted {
                    lease,
                    ttl_ms,
                    sent_ms,
                }
            }
            Request::Campaign {
                lease,
                leader,
                sync_mod_revision,
                sync,
            } => {
                if !self.etcd.leases.contains_key(&lease) {
                    return Ok(failed("campaign", "requested lease not found"));
                }
                let sync_rev = self.etcd.sync.as_ref().map_or(0, |(_, r)| *r);
                let won = self.etcd.leader.is_none() && sync_rev == sync_mod_revision;
                if won {
                    let epoch = leader.epoch;
                    if let Some((&last, _)) = self.etcd.epoch_leader.iter().next_back()
                        && epoch <= last
                    {
                        return Err(format!(
                            "node {node} won epoch {epoch}, but epoch {last} was won before"
                        ));
                    }
                    if leader.node_id != node as u64 + 1 {
                        return Err(format!("node {node} campaigned as {leader:?}"));
                    }
                    self.log(|| format!("etcd: node {node} wins epoch {epoch}"));
                    self.stats.elections += 1;
                    self.etcd.epoch_leader.insert(epoch, node as u64);
                    let rev = self.bump();
                    self.etcd.leader = Some((leader, lease));
                    self.etcd.sync = Some((sync, rev));
                }
                Reply::Campaigned { won }
            }
            Request::Keepalive { lease, sent_ms } => match self.etcd.leases.get_mut(&lease) {
                Some(slot) => {
                    *slot = (self.now + slot.1, slot.1);
                    let at = slot.0;
                    self.schedule(at, Ev::LeaseExpiry { lease });
                    Reply::KeptAlive {
                        sent_ms,
                        ttl_ms: ttl,
                    }
                }
                None => Reply::KeptAlive { sent_ms, ttl_ms: 0 },
            },
            Request::WriteSync {
                version,
                leader,
                sync,
            } => {
                let ok = self.etcd.leader.as_ref().is_some_and(|(l, _)| *l == leader);
                if ok {
                    self.log(|| format!("etcd: sync set {sync:?}"));
                    let rev = self.bump();
                    self.etcd.sync = Some((sync, rev));
                }
                Reply::SyncWritten { version, ok }
            }
            Request::Revoke { lease } => {
                self.revoke(lease, self.now);
                Reply::Changed
            }
        })
    }

    fn agent_reply(&mut self, node: usize, life: u64, at: u64, reply: Reply) {
        self.schedule(at, Ev::AgentReply { node, life, reply });
    }

    /// Hand the agent its next request, if it is free.
    fn agent_next(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        if n.agent_busy {
            return;
        }
        let Some(request) = n.agent.pop_front() else {
            return;
        };
        n.agent_busy = true;
        let life = n.life;
        let timeout_at = self.now + self.agent_timeout_ms;
        if self.etcd.down || self.nodes[node].etcd_cut {
            // Refused at once, or no answer until the call times out.
            let at = if self.rng.random_bool(0.5) {
                self.now + 1
            } else {
                timeout_at
            };
            let what = request_name(&request);
            self.agent_reply(node, life, at, failed(what, "unreachable"));
            return;
        }
        let there = if self.etcd.slow {
            self.rng.random_range(0..=self.agent_timeout_ms)
        } else {
            self.net_delay()
        };
        let sent = self.now;
        self.schedule(
            self.now + there,
            Ev::EtcdArrive {
                node,
                life,
                request,
                sent,
                timeout_at,
            },
        );
    }

    // ---- nodes ---------------------------------------------------------

    /// The start of a reactor turn: the election notices the lease's end
    /// before anything else is served.
    fn turn(&mut self, node: usize) {
        let now = self.local(node);
        if let Some(e) = self.nodes[node].election.as_mut() {
            e.tick(now);
        }
        // As `Server::election_tick`: its actions (a lease found expired) are
        // carried out at once, before the turn's events are fed.
        if let Err(e) = self.run_election(node) {
            self.deferred_error.get_or_insert(e);
        }
    }

    /// `Server::run_election`: carry out every action the election has.
    fn run_election(&mut self, node: usize) -> Result<(), String> {
        for _ in 0..10_000 {
            let Some(action) = self.nodes[node]
                .election
                .as_mut()
                .and_then(|e| e.poll_action())
            else {
                return Ok(());
            };
            self.election_action(node, action)?;
        }
        Err(format!("node {node}: election actions did not settle"))
    }

    fn feed(&mut self, node: usize, event: Event) {
        let now = self.local(node);
        match &mut self.nodes[node].role {
            Role::Master(c) => c.handle(now, event),
            Role::Slave { part, .. } => part.handle(now, event),
            Role::Standby(_) | Role::Dead => {}
        }
    }

    /// As the reactor does each turn: a slave being sent its backlog gets a
    /// drain report once the link drained, a turn or a few later.
    fn schedule_drains(&mut self, node: usize) {
        let Role::Master(c) = &self.nodes[node].role else {
            return;
        };
        let links: Vec<usize> = c.backlog_peers().map(|p| p.0 as usize).collect();
        for link in links {
            let l = &self.links[link];
            if l.broken || l.drain_due || !self.nodes[node].peers.contains(&link) {
                continue;
            }
            self.links[link].drain_due = true;
            let at = self.now + self.net_delay();
            self.schedule(at, Ev::Drain { link });
        }
    }

    /// Run the election's and the role's actions until both are quiet.
    fn settle(&mut self, node: usize) -> Result<(), String> {
        for _ in 0..10_000 {
            if !self.alive(node) {
                return Ok(());
            }
            if let Some(e) = self.deferred_error.take() {
                return Err(e);
            }
            let mut busy = false;
            self.run_election(node)?;
            let action = match &mut self.nodes[node].role {
                Role::Master(c) => c.poll_action(),
                Role::Slave { part, .. } => part.poll_action(),
                Role::Standby(_) | Role::Dead => None,
            };
            if let Some(action) = action {
                busy = true;
                self.role_action(node, action)?;
            } else if let Some(event) = self.nodes[node].completions.pop_front() {
                busy = true;
                self.feed(node, event);
            }
            if !busy {
                self.schedule_drains(node);
                self.forget_led_epoch_once_following(node);
                self.agent_next(node);
                let at = self.nodes[node]
                    .election
                    .as_ref()
                    .map_or(u64::MAX, |e| e.next_wake_ms());
                let at = if at == u64::MAX {
                    at
                } else {
                    self.global_at(node, at)
                };
                if at != u64::MAX && at < self.nodes[node].wake_at.max(self.now + 1) {
                    let at = at.max(self.now + 1);
                    self.nodes[node].wake_at = at;
                    let life = self.nodes[node].life;
                    self.schedule(at, Ev::Wake { node, life });
                } else if self.nodes[node].wake_at <= self.now {
                    self.nodes[node].wake_at = u64::MAX;
                }
                return Ok(());
            }
        }
        Err(format!("node {node}: actions did not settle"))
    }

    fn election_action(&mut self, node: usize, action: EAction) -> Result<(), String> {
        self.log(|| format!("node {node} election: {action:?}"));
        match action {
            EAction::Etcd(request) => self.nodes[node].agent.push_back(request),
            EAction::Lead { epoch } => self.lead(node, epoch)?,
            EAction::Follow(leader) => self.follow(node, leader),
            EAction::StepDown => self.step_down(node),
            EAction::LeaseValid(valid) => {
                let now = self.local(node);
                if let Role::Master(c) = &mut self.nodes[node].role {
                    c.set_lease_valid(now, valid);
                }
            }
            EAction::SyncRecorded { version } => {
                self.feed(node, Event::SyncSetRecorded { version });
            }
        }
        Ok(())
    }

    fn wal_append(&mut self, node: usize, lsn: u64, record: Record) {
        let n = &mut self.nodes[node];
        debug_assert!(lsn > n.appended_lsn, "lsns increase");
        n.appended_lsn = lsn;
        let (durable, extra) = match record {
            // Its snapshot must be written before it counts.
            Record::Checkpoint { seq, history_id } => (
                Durable::Checkpoint(seq, history_id, n.store.clone()),
                self.rng.random_range(5..=60),
            ),
            other => (Durable::Rec(other), 0),
        };
        let delay = if self.now < n.slow_disk_until {
            self.rng.random_range(20..=250)
        } else {
            self.rng.random_range(0..=3)
        };
        let n = &mut self.nodes[node];
        let at = n.last_persist_at.max(self.now + delay + extra);
        n.last_persist_at = at;
        n.pending.push_back((lsn, durable));
        let life = n.life;
        self.schedule(at, Ev::PersistDone { node, life, lsn });
    }

    /// Apply a committed transaction to `node`'s store, checking that no
    /// refused write ever becomes visible.
    fn apply(&mut self, node: usize, seq: u64, ops: &Ops) -> Result<(), String> {
        if seq <= self.nodes[node].commit_seq {
            return Err(format!(
                "node {node} applied {seq} at {}",
                self.nodes[node].commit_seq
            ));
        }
        for op in ops.iter() {
            if self.refused_keys.contains(op.key()) {
                return Err(format!(
                    "node {node} applied {:?} at seq {seq}, a write answered ABORTED or UNAVAILABLE",
                    String::from_utf8_lossy(op.key())
                ));
            }
            self.applied_ever.insert(op.key().to_vec());
        }
        let n = &mut self.nodes[node];
        apply_to(&mut n.store, seq, ops);
        n.commit_seq = seq;
        Ok(())
    }

    fn answer(
        &mut self,
        node: usize,
        client: ClientRef,
        result: Result<(), WriteError>,
    ) -> Result<(), String> {
        self.nodes[node].waiting.remove(&client.0);
        let outcome = match result {
            Ok(()) => {
                let epoch = self.nodes[node].epoch;
                if let Some(&ended) = self.etcd.epoch_ended.get(&epoch)
                    && self.now >= ended
                {
                    return Err(format!(
                        "node {node} acknowledged client {} in epoch {epoch}, which etcd ended at {ended}",
                        client.0
                    ));
                }
                match self.etcd.epoch_leader.get(&epoch) {
                    Some(&leader) if leader == node as u64 => {}
                    other => {
                        return Err(format!(
                            "node {node} acknowledged client {} in epoch {epoch}, led by {other:?}",
                            client.0
                        ));
                    }
                }
                self.stats.acked += 1;
                Outcome::Ok {
                    node,
                    epoch,
                    at: self.now,
                }
            }
            Err(e) => {
                let key = self.writes[&client.0].0.clone();
                if self.applied_ever.contains(&key) {
                    return Err(format!(
                        "client {} answered {e} but its write was applied",
                        client.0
                    ));
                }
                self.refused_keys.insert(key);
                match e {
                    WriteError::Aborted(_) => {
                        self.stats.aborted += 1;
                        Outcome::Aborted
                    }
                    WriteError::Unavailable(_) => {
                        self.stats.unavailable += 1;
                        Outcome::Unavailable
                    }
                }
            }
        };
        if let Some(old) = self.outcomes.insert(client.0, outcome.clone()) {
            return Err(format!(
                "client {} answered twice: {old:?}, {outcome:?}",
                client.0
            ));
        }
        Ok(())
    }

    fn role_action(&mut self, node: usize, action: Action) -> Result<(), String> {
        self.log(|| format!("node {node}: {action:?}"));
        match action {
            Action::Send { peer, msg } => self.send(node, peer.0 as usize, msg),
            Action::Disconnect { peer } => {
                let link = peer.0 as usize;
                if self.nodes[node].peers.contains(&link) {
                    self.drop_peer(node, link);
                    self.nodes[node]
                        .completions
                        .push_back(Event::PeerLost { peer });
                }
            }
            Action::Connect => {
                let Some(target) = self.nodes[node]
                    .leader
                    .as_ref()
                    .and_then(|l| node_of(&l.addr))
                else {
                    return Err(format!("node {node} connects with no leader"));
                };
                let link = self.links.len();
                self.links.push(Link {
                    ends: [node, target],
                    lives: [self.nodes[node].life, 0],
                    broken: false,
                    queue: [VecDeque::new(), VecDeque::new()],
                    last_at: [self.now; 2],
                    snapshot: None,
                    drain_due: false,
                });
                self.nodes[node].peers.insert(link);
                let at = self.now + self.rng.random_range(1..=5);
                self.schedule(at, Ev::ConnectDone { link });
            }
            Action::Persist { lsn, record } => self.wal_append(node, lsn, record),
            Action::Apply {
                seq,
                ops,
                replies,
                key_hashes,
            } => {
                crate::replication::check_key_hashes(seq, &ops, &key_hashes)?;
                self.apply(node, seq, &ops)?;
                if !replies.is_empty() && replies.len() != ops.len() {
                    return Err(format!("commit {seq}: replies do not match ops"));
                }
                for client in replies {
                    self.answer(node, client, Ok(()))?;
                }
            }
            Action::Reply { client, error } => self.answer(node, client, Err(error))?,
            Action::SetTimer { timer, at_ms } => {
                self.nodes[node].timers.insert(timer, at_ms);
                let life = self.nodes[node].life;
                let at = self.global_at(node, at_ms);
                self.schedule(
                    at,
                    Ev::Timer {
                        node,
                        life,
                        timer,
                        at: at_ms,
                    },
                );
            }
            Action::CancelTimer { timer } => {
                self.nodes[node].timers.remove(&timer);
            }
            Action::StartSnapshot { peer, at_seq } => {
                let link = peer.0 as usize;
                // Aborts move the coordinator past the store's last commit.
                if self.nodes[node].commit_seq > at_seq {
                    return Err(format!(
                        "node {node}: snapshot at {at_seq} with the store at {}",
                        self.nodes[node].commit_seq
                    ));
                }
                let mut chunks = VecDeque::new();
                let mut chunk = Vec::new();
                for (key, (value, version)) in &self.nodes[node].store {
                    chunk.push(SnapshotEntry {
                        key: key.clone(),
                        value: value.clone(),
                        version: *version,
                        deadline_ms: 0,
                    });
                    if chunk.len() == 8 {
                        chunks.push_back(std::mem::take(&mut chunk));
                    }
                }
                if !chunk.is_empty() || chunks.is_empty() {
                    chunks.push_back(chunk);
                }
                if self.nodes[node].peers.contains(&link) && !self.links[link].broken {
                    let total = chunks.len();
                    self.links[link].snapshot = Some((at_seq, chunks, total));
                    self.schedule(self.now, Ev::SnapshotStep { link });
                }
            }
            Action::InstallSnapshot {
                at_seq,
                entries,
                begin,
                end,
            } => {
                let n = &mut self.nodes[node];
                let Role::Slave { staging, .. } = &mut n.role else {
                    return Ok(());
                };
                if begin {
                    *staging = Some(Store::new());
                }
                let Some(store) = staging.as_mut() else {
                    return Ok(());
                };
                for e in entries {
                    store.insert(e.key, (e.value, e.version));
                }
                if end && let Some(store) = staging.take() {
                    for key in store.keys() {
                        if self.refused_keys.contains(key) {
                            return Err(format!(
                                "node {node} installed a snapshot holding refused {:?}",
                                String::from_utf8_lossy(key)
                            ));
                        }
                    }
                    let n = &mut self.nodes[node];
                    n.store = store;
                    n.commit_seq = at_seq;
                }
            }
            Action::RecordSyncSet { version, members } => {
                if let Some(e) = self.nodes[node].election.as_mut() {
                    e.record_sync_set(version, members);
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, node: usize, link: usize, msg: PeerMessage) {
        if !self.nodes[node].peers.contains(&link) || self.links[link].broken {
            return;
        }
        let dir = if self.links[link].ends[0] == node {
            1
        } else {
            0
        };
        let delay = self.net_delay();
        let l = &mut self.links[link];
        let at = l.last_at[dir].max(self.now + delay);
        l.last_at[dir] = at;
        l.queue[dir].push_back(msg);
        self.schedule(at, Ev::Deliver { link, dir });
    }

    /// Close `link` at `node`'s end; the other end notices soon.
    fn drop_peer(&mut self, node: usize, link: usize) {
        self.nodes[node].peers.remove(&link);
        self.break_link(link, 10);
    }

    /// Break a link: a random prefix of what is in flight still arrives, each
    /// end still holding it learns of the break within `detect_ms`.
    fn break_link(&mut self, link: usize, detect_ms: u64) {
        if self.links[link].broken {
            return;
        }
        self.log(|| format!("link {link} breaks"));
        self.links[link].broken = true;
        self.links[link].snapshot = None;
        for dir in 0..2 {
            let len = self.links[link].queue[dir].len();
            let keep = self.rng.random_range(0..=len);
            self.links[link].queue[dir].truncate(keep);
            let at = (self.now + self.rng.random_range(1..=detect_ms))
                .max(self.links[link].last_at[dir] + 1);
            self.schedule(at, Ev::LinkLost { link, end: dir });
        }
    }

    fn drop_all_peers(&mut self, node: usize) {
        let links: Vec<usize> = self.nodes[node].peers.iter().copied().collect();
        for link in links {
            self.drop_peer(node, link);
        }
    }

    fn crash(&mut self, node: usize) {
        self.log(|| format!("crash node {node}"));
        self.stats.crashes += 1;
        let links: Vec<usize> = self.nodes[node].peers.iter().copied().collect();
        for link in links {
            self.break_link(link, 10);
        }
        let n = &mut self.nodes[node];
        n.life += 1;
        n.role = Role::Dead;
        n.election = None;
        n.pending.clear();
        n.wipe_lsn = None;
        n.timers.clear();
        n.peers.clear();
        n.agent.clear();
        n.agent_busy = false;
        n.completions.clear();
        n.paused_until = 0;
        n.wake_at = u64::MAX;
        // Their connections died with the process: no answer.
        self.stats.unanswered += n.waiting.len() as u64;
        n.waiting.clear();
    }

    /// Start the process again from its disk, as `Server::bind` does with failover.
    fn restart(&mut self, node: usize) -> Result<(), String> {
        let (replay, store) = recover(&self.nodes[node].durable)?;
        let led = self.nodes[node].durable_led_epoch;
        self.log(|| {
            format!(
                "restart node {node}: seq {} history {:#x}, {} prepared, led {led:?}",
                replay.seq,
                replay.history_id,
                replay.prepared.len(),
            )
        });
        for key in store.keys() {
            if self.refused_keys.contains(key) {
                return Err(format!(
                    "node {node} recovered refused {:?}",
                    String::from_utf8_lossy(key)
                ));
            }
            self.applied_ever.insert(key.clone());
        }
        let now = self.local(node);
        let n = &mut self.nodes[node];
        n.store = store;
        n.commit_seq = replay.seq;
        n.role = Role::Standby(Box::new(Standby {
            history_id: replay.history_id,
            prepared: replay.prepared,
            commits: replay.commits,
            floor: replay.floor,
            seen: replay.max_seq,
        }));
        n.epoch = 0;
        n.leader = None;
        n.led_epoch = n.durable_led_epoch;
        // The log's records are all durable after recovery.
        n.reported_lsn = n.appended_lsn;
        n.last_persist_at = now;
        n.election = Some(Election::new(
            ElectionConfig {
                node_id: node as u64 + 1,
                addr: addr(node),
                lease_ttl_ms: self.lease_ttl_ms,
            },
            now,
        ));
        self.watch_reopened(node);
        self.settle(node)
    }

    /// `server::failover::lead`: this node won `epoch`.
    fn lead(&mut self, node: usize, epoch: u64) -> Result<(), String> {
        self.nodes[node].durable_led_epoch = Some(epoch);
        self.drop_all_peers(node);
        let history_of_store = self.nodes[node].role.history_id();
        let commit_seq = self.nodes[node].commit_seq;
        let role = std::mem::replace(
            &mut self.nodes[node].role,
            Role::Standby(Box::new(Standby {
                history_id: 0,
                prepared: BTreeMap::new(),
                commits: Vec::new(),
                floor: 0,
                seen: 0,
            })),
        );
        let (history_id, prepared, mut commits, floor, seen) = match role {
            Role::Slave { mut part, .. } => (
                part.history_id(),
                part.take_prepared(),
                Vec::new(),
                commit_seq,
                part.seen_seq(),
            ),
            Role::Standby(s) => (s.history_id, s.prepared, s.commits, s.floor, s.seen),
            Role::Master(_) => (history_of_store, BTreeMap::new(), Vec::new(), commit_seq, 0),
            Role::Dead => return Err("a dead node leads".into()),
        };
        let mut lsn = self.nodes[node].appended_lsn;
        let mut committed = 0;
        for (seq, ops) in prepared {
            if seq <= self.nodes[node].commit_seq {
                continue;
            }
            lsn += 1;
            self.wal_append(
                node,
                lsn,
                Record::CommitDecision {
                    seq,
                    ops: ops.clone(),
                },
            );
            self.apply(node, seq, &ops)?;
            commits.push((seq, ops));
            committed += 1;
        }
        if committed > 0 {
            self.stats.promotions_committing += 1;
        }
        let history_id = if history_id != 0 {
            history_id
        } else {
            let id = self.rng.random_range(1..=u64::MAX);
            // `Wal::start_history` writes and syncs at once.
            self.nodes[node]
                .durable
                .push(Durable::Rec(Record::History { history_id: id }));
            lsn = self.nodes[node].appended_lsn;
            id
        };
        let now = self.local(node);
        let n = &mut self.nodes[node];
        let released = n.commit_seq.max(seen);
        n.commit_seq = released;
        let config = CoordinatorConfig {
            epoch,
            history_id,
            record_sync_set: true,
            ..self.coord_config.clone()
        };
        let mut log =
            CommitLog::new(config.log_capacity, floor).with_max_bytes(config.log_max_bytes);
        for (seq, ops) in commits {
            log.push(seq, ops);
        }
        let mut coordinator = Coordinator::recover(config, now, released, log);
        coordinator.start_lsns_after(lsn, n.reported_lsn);
        coordinator.hold_registrations_until(lsn);
        // Nothing is acknowledged before the election says the lease is valid
        // (LeaseValid follows Lead): a campaign settled late may have won a
        // lease that is already past its margin.
        coordinator.set_lease_valid(now, false);
        n.role = Role::Master(Box::new(coordinator));
        n.epoch = epoch;
        n.led_epoch = Some(epoch);
        n.leader = Some(LeaderRecord {
            epoch,
            node_id: node as u64 + 1,
            addr: addr(node),
        });
        self.log(|| {
            format!(
                "node {node} leads epoch {epoch} at {released} ({committed} in doubt committed)"
            )
        });
        Ok(())
    }

    /// `server::failover::follow`.
    fn follow(&mut self, node: usize, leader: LeaderRecord) {
        if self.nodes[node].leader.as_ref() == Some(&leader)
            && matches!(self.nodes[node].role, Role::Slave { .. })
        {
            return;
        }
        if node_of(&leader.addr).is_none() {
            return;
        }
        if matches!(self.nodes[node].role, Role::Master(_)) {
            self.step_down(node);
        }
        self.drop_all_peers(node);
        let n = &mut self.nodes[node];
        let (mut history_id, mut in_doubt) = match &mut n.role {
            Role::Slave { part, .. } => (part.history_id(), part.take_prepared()),
            Role::Standby(s) => (s.history_id, std::mem::take(&mut s.prepared)),
            Role::Master(_) | Role::Dead => (0, BTreeMap::new()),
        };
        let mut may_discard = false;
        if let Some(led) = n.led_epoch
            && led < leader.epoch
        {
            n.store = Store::new();
            n.commit_seq = 0;
            history_id = 0;
            in_doubt.clear();
            let lsn = n.appended_lsn + 1;
            n.wipe_lsn = Some(lsn);
            self.stats.wipes += 1;
            self.log(|| format!("node {node} led epoch {led}: wipes its data"));
            if !self.healed && self.rng.random_bool(0.3) {
                // A crash while the resync is on its way to the disk.
                let at = self.now + self.rng.random_range(1..=150);
                let dur = self.rng.random_range(10..=300);
                self.schedule(
                    at,
                    Ev::Crash {
                        node: Some(node),
                        dur,
                    },
                );
            }
            self.wal_append(
                node,
                lsn,
                Record::Checkpoint {
                    seq: 0,
                    history_id: 0,
                },
            );
            may_discard = true;
        }
        let n = &mut self.nodes[node];
        let mut participant = Participant::recover(
            ParticipantConfig {
                client_addr: addr(node),
                node_id: node as u64 + 1,
                may_discard_data: may_discard,
                epoch: leader.epoch,
                jitter_seed: self.part_config.jitter_seed.wrapping_add(node as u64),
                ..self.part_config.clone()
            },
            n.commit_seq,
            history_id,
        );
        participant.start_lsns_after(n.appended_lsn, n.reported_lsn);
        participant.keep_in_doubt(in_doubt);
        n.role = Role::Slave {
            part: Box::new(participant),
            staging: None,
        };
        n.epoch = leader.epoch;
        n.leader = Some(leader);
    }

    /// `server::failover::step_down`.
    fn step_down(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let Role::Master(c) = &mut n.role else {
            return;
        };
        let decided = c.decided_commits();
        let seen = c.used_seq();
        let clients = c.abandon();
        let history_id = c.history_id();
        // Their connections close: no answer.
        for client in clients {
            if n.waiting.remove(&client.0) {
                self.stats.unanswered += 1;
            }
        }
        self.log(|| format!("node {node} steps down"));
        self.drop_all_peers(node);
        let n = &mut self.nodes[node];
        n.role = Role::Standby(Box::new(Standby {
            history_id,
            prepared: decided,
            commits: Vec::new(),
            floor: n.commit_seq,
            seen,
        }));
        n.leader = None;
    }

    /// `server::failover::forget_led_epoch_once_following`.
    fn forget_led_epoch_once_following(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        if n.led_epoch.is_some()
            && let Role::Slave { part, .. } = &n.role
            && part.caught_up_durably()
        {
            if let Some(lsn) = n.wipe_lsn {
                self.deferred_error.get_or_insert(format!(
                    "node {node} removed its led-epoch marker before its wipe (lsn {lsn}) was durable: \
                     a crash now brings its old decisions back unmarked"
                ));
            }
            n.durable_led_epoch = None;
            n.led_epoch = None;
        }
    }

    // ---- the end -------------------------------------------------------

    fn converged(&self) -> bool {
        let masters = self.masters();
        let [m] = masters[..] else {
            return false;
        };
        let Role::Master(c) = &self.nodes[m].role else {
            return false;
        };
        let leading = matches!(
            self.nodes[m].election.as_ref().map(|e| e.state()),
            Some(State::Leading { .. })
        );
        if !leading || c.in_flight() != 0 {
            return false;
        }
        let in_sync = c
            .members()
            .iter()
            .filter(|(_, s)| matches!(s.state, SlaveState::InSync { .. }))
            .count();
        if in_sync != NODES - 1 {
            return false;
        }
        (0..NODES).filter(|&n| n != m).all(|n| {
            let node = &self.nodes[n];
            matches!(&node.role, Role::Slave { part, .. }
                if matches!(part.link(), LinkState::Following(_)) && part.in_doubt() == 0)
                && node.epoch == self.nodes[m].epoch
                && node.store == self.nodes[m].store
        })
    }

    fn final_checks(&mut self) -> Result<(), String> {
        let m = self.masters()[0];
        for (client, outcome) in &self.outcomes {
            let (key, value) = &self.writes[client];
            for (i, n) in self.nodes.iter().enumerate() {
                let held = n.store.get(key).map(|(v, _)| v);
                match outcome {
                    Outcome::Ok { node, epoch, at } => {
                        if held != Some(value) {
                            return Err(format!(
                                "write of client {client} acknowledged by node {node} in epoch {epoch} at {at} is missing on node {i} (final master {m})"
                            ));
                        }
                    }
                    Outcome::Aborted | Outcome::Unavailable => {
                        if held.is_some() {
                            return Err(format!(
                                "write of client {client} answered {outcome:?} is visible on node {i}"
                            ));
                        }
                    }
                }
            }
        }
        let mut ackers: BTreeMap<u64, usize> = BTreeMap::new();
        for outcome in self.outcomes.values() {
            if let Outcome::Ok { node, epoch, .. } = outcome
                && *ackers.entry(*epoch).or_insert(*node) != *node
            {
                return Err(format!("two nodes acknowledged writes in epoch {epoch}"));
            }
        }
        for i in 0..NODES {
            if self.nodes[i].store != self.nodes[m].store {
                return Err(format!("node {i} differs from master {m}"));
            }
        }
        Ok(())
    }
}

fn failed(what: &'static str, error: &str) -> Reply {
    Reply::Failed {
        what,
        error: error.to_string(),
    }
}

/// The `what` of a failed request, as the agent names it.
fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Read => "read",
        Request::GrantLease { .. } => "grant lease",
        Request::Campaign { .. } => "campaign",
        Request::Keepalive { .. } => "keepalive",
        Request::WriteSync { .. } => "write sync",
        Request::Revoke { .. } => "revoke",
    }
}

/// The `what` of the request a reply answers.
fn request_name_of(reply: &Reply) -> &'static str {
    match reply {
        Reply::Read(_) => "read",
        Reply::LeaseGranted { .. } => "grant lease",
        Reply::Campaigned { .. } => "campaign",
        Reply::KeptAlive { .. } => "keepalive",
        Reply::SyncWritten { .. } => "write sync",
        Reply::Changed => "revoke",
        Reply::Failed { what, .. } => what,
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

/// Run `seeds`, stopping at the first failure.
fn run_seeds(seeds: &[u64], trace: bool) -> Result<RunStats, (u64, String, Vec<String>)> {
    let mut total = RunStats::default();
    for &seed in seeds {
        let (result, lines) = run_seed(seed, trace);
        total.add(&result.map_err(|e| (seed, e, lines))?);
    }
    Ok(total)
}

#[test]
fn failover_simulation_loses_no_acknowledged_write() {
    let seeds: Vec<u64> = match env_u64("DKVS_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("DKVS_SIM_SEEDS").unwrap_or(300)).collect(),
    };
    let trace = seeds.len() == 1;
    let started = Instant::now();
    // Seeds are independent: spread them over a few threads.
    const THREADS: u64 = 4;
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let mine: Vec<u64> = seeds.iter().copied().filter(|s| s % THREADS == t).collect();
                scope.spawn(move || run_seeds(&mine, trace))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err((u64::MAX, "sim thread panicked".into(), Vec::new())))
            })
            .collect()
    });
    let mut total = RunStats::default();
    let mut failure = None;
    for result in results {
        match result {
            Ok(s) => total.add(&s),
            Err((seed, e, lines)) => {
                if failure.as_ref().is_none_or(|(s, _, _)| seed < *s) {
                    failure = Some((seed, e, lines));
                }
            }
        }
    }
    if let Some((seed, e, lines)) = failure {
        let keep = env_u64("DKVS_SIM_TRACE_LINES").unwrap_or(400) as usize;
        for line in lines.iter().rev().take(keep).rev() {
            eprintln!("{line}");
        }
        panic!(
            "failover simulation seed {seed} failed: {e}\n\
             replay with: DKVS_SIM_SEED={seed} cargo test --lib failover::sim -- --nocapture"
        );
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "simulated {} failover seeds in {secs:.2}s ({:.0} seeds/s): {total:?}",
        seeds.len(),
        seeds.len() as f64 / secs.max(1e-9)
    );
}
