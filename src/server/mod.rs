//! The reactor: one thread, one `mio::Poll`, multiplexing the TCP listener,
//! the UDP socket, client connections, replication links and 2PC timers.
//!
//! The replication state machine (a [`Coordinator`] on a master, a
//! [`Participant`] on a slave) does no I/O: the reactor feeds it events and
//! executes the actions it returns. All client writes that arrive in one loop
//! iteration become one transaction (group commit).

pub mod announce;
pub mod auth;
mod connection;
mod exec_view;
mod expiry;
mod failover;
mod forward;
mod forward_io;
mod handler;
mod limits;
mod multi;
mod peer;
mod resp;
mod snapshots;
mod stats;
mod stream;
mod timers;
mod udp;
mod waiting;

/// The master's limit on a slave's frames, for the peer decoder's fuzz target (fuzz/).
pub use peer::MAX_SLAVE_FRAME_PAYLOAD;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::protocol::Status;
use crate::protocol::peer::PeerMessage;
use crate::protocol::peer_auth::PeerAuth;
use crate::replication::{
    Action, BACKLOG_LOW_WATER_BYTES, ClientRef, CommitLog, Coordinator, CoordinatorConfig, Event,
    LinkState, Participant, ParticipantConfig, PeerId, WriteError,
};
use crate::store::{Applied, Store};
use crate::wal::{FsyncPolicy, Wal, WalConfig, WalError};

use connection::{Connection, Liveness};
pub use failover::FailoverConfig;
use failover::{Failover, Standby};
pub use handler::Core;
use handler::{Mode, ReadGate, ReplyTarget};
pub use limits::UdpLimitScope;
use limits::{InputBudget, Timeouts, Verdict};
use peer::PeerLink;
use snapshots::SnapshotSet;
pub use stats::DEFAULT_INPUT_BUDGET_BYTES;
use stream::Framed;
use timers::Timers;
use udp::UdpService;

const LISTENER: Token = Token(0);
const UDP: Token = Token(1);
/// The write-ahead log's helper threads wake the reactor with this token.
const WAKER: Token = Token(2);
/// Link tokens are slab keys shifted past the fixed tokens.
const FIRST_LINK: usize = 3;
/// Attempts at finding a port free for both TCP and UDP when asked for port 0.
const PORT_ZERO_ATTEMPTS: usize = 32;
/// Milliseconds between attempts to accept after running out of descriptors.
const ACCEPT_RETRY_MS: u64 = 50;
/// Bytes of snapshot copies freed, their pages given back to the system, per
/// turn (`Server::give_back_snapshot_memory`): about 1 ms of CPU on the loaded
/// 2-core test machine, and 130 MB (a million keys' copies) in about 30 turns.
const RELEASE_PER_TURN: usize = 4 << 20;
/// Replication links a master accepts (each may hold a snapshot copy and large buffers).
const MAX_PEER_LINKS: usize = 64;
/// A slave's dial to its master that is still unanswered after this is
/// abandoned and reported failed, and the participant redials after its
/// backoff. Without it a SYN dropped by a partition waits for the kernel's
/// retransmissions (1, 3, 7, 15 s ...), so a slave rejoined seconds after the
/// heal; a fresh SYN every ~second finds a healed path at once. A TCP
/// handshake needs one round trip: 500 ms is far beyond any LAN or region.
const MASTER_CONNECT_TIMEOUT_MS: u64 = 500;
/// Rounds of "submit writes, deliver replies, resume clients" per loop
/// iteration; each round consumes client input, this only bounds the loop.
const MAX_SETTLE_ROUNDS: usize = 1024;

/// How a server is set up (the `dkvs-server` flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// Host name or address to bind.
    pub host: String,
    /// Port for TCP and UDP; 0 picks a free one.
    pub port: u16,
    /// Serve TCP.
    pub tcp: bool,
    /// Serve UDP.
    pub udp: bool,
    /// Largest value accepted.
    pub max_value_bytes: usize,
    /// Run as a slave of the master at this host and port.
    pub master: Option<(String, u16)>,
    /// Time a slave has to vote or acknowledge before it is evicted.
    pub tpc_timeout_ms: u64,
    /// Evict a slave that keeps a transaction waiting this long after the others voted (0: off).
    pub max_slave_lag_ms: u64,
    /// Slave: the read lease to hold to serve reads (0: serve stale reads too).
    pub slave_read_lease_ms: u32,
    /// Refuse writes while fewer slaves are in sync.
    pub min_slaves: usize,
    /// Bytes of recent writes kept for partial resync.
    pub repl_backlog_bytes: usize,
    /// The data directory (write-ahead log, snapshots, node id).
    pub data_dir: PathBuf,
    /// When a logged record counts as durable.
    pub fsync: FsyncPolicy,
    /// Snapshot the store once the log has grown by this many bytes.
    pub snapshot_log_bytes: u64,
    /// Slave: accept a snapshot of another history even though it replaces data held here.
    pub resync_discard_data: bool,
    /// Client connections open at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Master: transactions in flight at once; at the bound client writes are
    /// no longer read until one ends (`--max-inflight-txns`).
    pub max_inflight_txns: usize,
    /// Master: bytes the snapshots streamed to slaves may hold in copied
    /// shards (`--max-snapshot-memory-mb`).
    pub max_snapshot_bytes: usize,
    /// Close a client connection idle this long (0 = never).
    pub idle_timeout_ms: u64,
    /// Close a client connection whose frame, once begun, takes longer than this to arrive.
    pub frame_timeout_ms: u64,
    /// Bytes all client connections together may hold in partial frames.
    pub partial_frame_budget_bytes: usize,
    /// Which UDP sources the amplification and rate limits apply to.
    pub udp_limits: UdpLimitScope,
    /// UDP replies per second per limited source IP (0 = unlimited).
    pub udp_rate_per_sec: u32,
    /// Answer the Redis protocol (RESP) on the TCP port too.
    pub resp: bool,
    /// Slave: forward RESP writes to the master instead of answering READONLY.
    pub forward_writes: bool,
    /// `--masterauth-file`: the password a forwarding slave sends its master.
    pub master_password: Option<Vec<u8>>,
    /// Failover through etcd; `None`: one fixed master (`-m` makes a slave).
    pub failover: Option<FailoverConfig>,
    /// The secret replication links prove with (`--cluster-secret-file`);
    /// without one, only loopback peers are accepted.
    pub cluster_secret: Option<crate::protocol::peer_auth::Secret>,
    /// `--requirepass-file`: clients must AUTH before anything but PING.
    pub password: Option<auth::Password>,
    /// `--protected-mode` (on by default): bound to a non-loopback address
    /// without a password, refuse clients from non-loopback addresses.
    pub protected_mode: bool,
    /// `--announce-addr`: the address announced to the master in REGISTER and
    /// recorded in etcd as leader, instead of the bound one.
    pub announce_addr: Option<announce::AnnounceAddr>,
}

impl Config {
    /// The write-ahead log's part of the configuration.
    pub fn wal_config(&self, repair: bool) -> WalConfig {
        WalConfig {
            dir: self.data_dir.clone(),
            fsync: self.fsync,
            snapshot_log_bytes: self.snapshot_log_bytes,
            repair,
        }
    }
}

/// Largest `--max-value-size` a server accepts; also what a slave allows for its
/// master's frames, so that master and slave need not agree on the limit.
pub const MAX_VALUE_BYTES_LIMIT: usize = 512 << 20;

/// Why a server could not start or stopped.
#[derive(Debug)]
pub enum ServerError {
    /// The host did not resolve to an address.
    Resolve {
        /// The host as given.
        host: String,
        /// What the resolver said.
        source: io::Error,
    },
    /// A socket could not be bound.
    Bind {
        /// `TCP` or `UDP`.
        transport: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the kernel said.
        source: io::Error,
    },
    /// The poller failed.
    Poll(io::Error),
    /// The data directory could not be opened or recovered.
    Wal(WalError),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Resolve { host, source } => {
                write!(f, "cannot resolve host '{host}': {source}")
            }
            ServerError::Bind {
                transport,
                addr,
                source,
            } => {
                write!(f, "cannot bind {transport} on {addr}: {source}")?;
                if source.kind() == io::ErrorKind::AddrInUse {
                    write!(
                        f,
                        " (is another server running on this port? choose one with -p)"
                    )?;
                }
                Ok(())
            }
            ServerError::Poll(e) => write!(f, "poll failed: {e}"),
            ServerError::Wal(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// A registered socket other than the listener and the UDP socket.
enum Link {
    /// A client connection.
    Client(Connection),
    /// A replication link.
    Peer(PeerLink),
    /// A slave's link to its master for forwarded writes (`--forward-writes`).
    Forward(ForwardLink),
}

/// The RESP connection a slave forwards its clients' writes on.
struct ForwardLink {
    io: Framed,
    /// The master dialled.
    addr: SocketAddr,
    /// The dial is not answered yet.
    connecting: bool,
}

/// The replication state machine this server runs.
enum Role {
    /// Coordinates every write.
    Master(Box<Coordinator>),
    /// Failover: waiting for the election to say whom to follow, or to lead.
    Standby(Box<Standby>),
    /// Follows a master.
    Slave {
        participant: Box<Participant>,
        master_addr: SocketAddr,
        /// A snapshot being installed; swapped in whole when its last chunk arrives.
        staging: Option<Store>,
    },
}

impl Role {
    fn handle(&mut self, now_ms: u64, event: Event) {
        match self {
            Role::Master(c) => c.handle(now_ms, event),
            Role::Slave { participant, .. } => participant.handle(now_ms, event),
            Role::Standby(_) => {}
        }
    }

    fn poll_action(&mut self) -> Option<Action> {
        match self {
            Role::Master(c) => c.poll_action(),
            Role::Slave { participant, .. } => participant.poll_action(),
            Role::Standby(_) => None,
        }
    }

    /// A master holding this turn's batch of writes back for a snapshot
    /// (`Coordinator::write_hold`): until when, at the latest.
    fn write_hold(&mut self, now_ms: u64) -> Option<u64> {
        match self {
            Role::Master(c) => c.write_hold(now_ms),
            Role::Slave { .. } | Role::Standby(_) => None,
        }
    }

    /// A master whose transactions in flight are at their bound.
    fn at_inflight_bound(&self) -> bool {
        matches!(self, Role::Master(c) if c.at_inflight_bound())
    }

    /// The history the store's position belongs to.
    fn history_id(&self) -> u64 {
        match self {
            Role::Master(c) => c.history_id(),
            Role::Slave { participant, .. } => participant.history_id(),
            Role::Standby(s) => s.history_id,
        }
    }

    /// The replication lines of STATS.
    fn describe(&self, master_text: &str, now_ms: u64) -> String {
        let mut text = String::new();
        match self {
            Role::Master(c) => {
                let members = c.members();
                let seq = c.commit_seq();
                text.push_str("role master\n");
                text.push_str(&format!("slaves {}\n", members.iter().count()));
                text.push_str(&format!("slaves_in_sync {}\n", members.in_sync_count()));
                text.push_str(&format!("transactions_in_flight {}\n", c.in_flight()));
                text.push_str(&format!("lag_evictions {}\n", c.lag_evictions()));
                text.push_str(&format!("snapshot_restarts {}\n", c.snapshot_restarts()));
                text.push_str(&format!(
                    "write_throttle_ms {}\n",
                    c.write_throttle_ms(now_ms)
                ));
                for (i, (_, slave)) in members.iter().enumerate() {
                    // The address is the slave's own choice: escaped, it cannot forge lines.
                    text.push_str(&format!(
                        "slave{i} addr={} state={} applied={} lag={}\n",
                        stats::printable(&slave.client_addr),
                        slave.state.name(),
                        slave.applied_seq,
                        slave.lag(seq)
                    ));
                }
            }
            Role::Slave { participant, .. } => {
                let link = match participant.link() {
                    LinkState::Down => "down",
                    LinkState::Connecting => "connecting",
                    LinkState::CatchingUp(_) => "catching_up",
                    LinkState::Following(_) => "following",
                    LinkState::Diverged(_) => "diverged",
                };
                text.push_str("role slave\n");
                text.push_str(&format!("master {master_text}\n"));
                text.push_str(&format!("master_link {link}\n"));
                text.push_str(&format!("applied_seq {}\n", participant.position()));
                text.push_str(&format!("in_doubt {}\n", participant.in_doubt()));
            }
            Role::Standby(s) => {
                text.push_str("role standby\n");
                text.push_str(&format!("in_doubt {}\n", s.prepared.len()));
            }
        }
        text
    }

    /// The replication state for INFO, ROLE and WAIT.
    fn info(&self) -> handler::ReplicationInfo {
        match self {
            Role::Master(c) => {
                let members = c.members();
                let seq = c.commit_seq();
                handler::ReplicationInfo {
                    slaves: members
                        .iter()
                        .map(|(_, slave)| handler::SlaveSummary {
                            addr: slave.client_addr.clone(),
                            state: slave.state.name(),
                            applied_seq: slave.applied_seq,
                            lag: slave.lag(seq),
                        })
                        .collect(),
                    in_sync: members.in_sync_count(),
                    ..Default::default()
                }
            }
            Role::Slave { participant, .. } => handler::ReplicationInfo {
                master_link_up: matches!(participant.link(), LinkState::Following(_)),
                applied_seq: participant.position(),
                ..Default::default()
            },
            Role::Standby(_) => handler::ReplicationInfo::default(),
        }
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    udp: Option<UdpService>,
    links: Slab<Link>,
    core: Core,
    addr: SocketAddr,
    role: Role,
    timers: Timers,
    clock: Instant,
    /// Slab key of each replication link.
    peers: HashMap<PeerId, usize>,
    next_peer_id: u64,
    next_conn_id: u64,
    /// Completions the reactor feeds back once the current actions are done.
    completions: VecDeque<Event>,
    /// Client connections that received replies and must be resumed.
    touched: Vec<usize>,
    /// Replication links with output queued.
    dirty_peers: Vec<usize>,
    /// The snapshots streamed to slaves, shared by the links reading them.
    snapshots: SnapshotSet,
    /// Whether STATS' replication lines need refreshing.
    replication_changed: bool,
    /// Failed attempts to reach the master since the last success.
    connect_failures: u64,
    /// The slave's dial in progress and when it is given up
    /// ([`MASTER_CONNECT_TIMEOUT_MS`]).
    master_dial: Option<(PeerId, u64)>,
    /// The last settle stopped at its round bound with work left.
    work_left: bool,
    /// Keys have deadlines: wake within this for the expiry sweep.
    expiry_wake: Option<Duration>,
    /// `accept` failed (out of descriptors): connections waiting in the
    /// backlog get no new edge, so the listener is retried on a timer.
    accept_paused: bool,
    /// The write-ahead log.
    wal: Wal,
    /// Client connections allowed open at once.
    max_connections: usize,
    /// Frame and idle timeouts of client connections.
    timeouts: Timeouts,
    /// When the next sweep of client connections for timeouts is due.
    next_sweep_ms: u64,
    /// Largest unsent output a replication link may hold.
    max_peer_output_bytes: usize,
    /// Client connections that stopped at their per-turn budget, resumed next iteration.
    deferred_clients: Vec<usize>,
    /// Replication links that stopped reading at their budget, resumed next iteration.
    deferred_reads: Vec<usize>,
    /// Replication links that stopped streaming a snapshot at their budget.
    deferred_flushes: Vec<usize>,
    /// The batch of writes is held back for a snapshot until this time at
    /// the latest (`Coordinator::write_hold`); asked again every turn.
    write_hold_until: Option<u64>,
    /// Failover through etcd, when configured.
    failover: Option<Failover>,
    /// The coordinator's knobs, for a master created by a promotion.
    coordinator_config: CoordinatorConfig,
    /// `--resync-discard-data`, for a slave created by a failover.
    resync_discard_data: bool,
    /// The read lease a slave holds to serve reads (0: it serves stale reads too).
    read_lease_ms: u32,
    /// The cluster secret replication links authenticate with.
    cluster_secret: Option<crate::protocol::peer_auth::Secret>,
    /// Slab key of the link forwarded writes go on, and when its dial is given up.
    forward_link: Option<usize>,
    forward_dial_deadline: Option<Instant>,
    /// The forward link stopped reading at its budget: resumed next iteration.
    forward_deferred: bool,
    /// Forward links lost with writes on them since the last that connected.
    forward_failures: u64,
    /// The client address this node announces to its master (and to etcd).
    announce: Announce,
}

/// What this node tells others to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Announce {
    /// `--announce-addr`, or the bound address when it names one host.
    Fixed(String),
    /// Bound to `0.0.0.0` or `::` without `--announce-addr`: the local address
    /// of the link to the master, with the bound port, learnt when the link
    /// connects. It is the address the master's host already reaches this one
    /// by, where the bound address would tell it nothing.
    LinkLocal,
}

impl Announce {
    fn new(config: &Config, bound: SocketAddr) -> Announce {
        match &config.announce_addr {
            Some(addr) => Announce::Fixed(addr.to_string()),
            None if bound.ip().is_unspecified() => Announce::LinkLocal,
            None => Announce::Fixed(bound.to_string()),
        }
    }
}

/// Raise the soft descriptor limit to what `max_connections` clients need
/// (within the hard limit), as Redis does for `maxclients`, and return the
/// number of client connections the resulting limit allows. Without this a
/// common soft limit of 1024 makes the default cap of 10000 unreachable, and
/// the connections past the limit fail in `accept` instead of being refused
/// cleanly, while the log and replication links compete for what is left.
fn raise_descriptor_limit(max_connections: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(
            "cannot read the descriptor limit: {}; serving up to {max_connections} \
             client connections",
            io::Error::last_os_error()
        );
        return max_connections;
    }
    // rlim_t is u64 on Linux (RLIM_INFINITY is u64::MAX), as the limits module counts.
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    let mut set = limits::descriptor_limit_to_set(max_connections, soft, hard);
    if set != soft {
        limit.rlim_cur = set;
        // SAFETY: setrlimit reads one rlimit through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            warn!(
                "cannot raise the descriptor limit from {soft} to {set}: {}",
                io::Error::last_os_error()
            );
            set = soft;
        }
    }
    let cap = limits::connection_cap(max_connections, set);
    if cap < max_connections {
        warn!(
            "--max-connections {max_connections} needs {} descriptors, but the limit is \
             {set} (hard limit {hard}): serving at most {cap} client connections; \
             further ones are accepted and closed",
            limits::descriptors_wanted(max_connections)
        );
    }
    cap
}

impl Server {
    /// Bind the sockets named by `config` and register them with a new poller.
    pub fn bind(config: &Config) -> Result<Server, ServerError> {
        let max_connections = raise_descriptor_limit(config.max_connections);
        let addr = resolve(&config.host, config.port)?;
        let (listener, udp, addr) = bind_sockets(addr, config)?;
        let poll = Poll::new().map_err(ServerError::Poll)?;
        let mut listener = listener;
        if let Some(l) = listener.as_mut() {
            poll.registry()
                .register(l, LISTENER, Interest::READABLE)
                .map_err(ServerError::Poll)?;
        }
        let mut udp =
            udp.map(|socket| UdpService::new(socket, config.udp_limits, config.udp_rate_per_sec));
        if let Some(u) = udp.as_mut() {
            poll.registry()
                .register(&mut u.socket, UDP, Interest::READABLE)
                .map_err(ServerError::Poll)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(ServerError::Poll)?);
        let (mut wal, replay, report) =
            Wal::open(config.wal_config(false), Arc::clone(&waker)).map_err(ServerError::Wal)?;
        info!(
            "recovered {} keys at seq {} of history {:#018x} from {} ({} records in {} segments{}){}",
            replay.store.len(),
            replay.seq,
            replay.history_id,
            config.data_dir.display(),
            report.records,
            report.segments,
            match &report.snapshot {
                Some((path, seq)) => format!(", snapshot {} at {seq}", path.display()),
                None => String::new(),
            },
            if report.repairs.is_empty() {
                String::new()
            } else {
                format!("; repairs: {}", report.repairs.join("; "))
            }
        );
        let coordinator_config = CoordinatorConfig {
            tpc_timeout_ms: config.tpc_timeout_ms,
            max_slave_lag_ms: config.max_slave_lag_ms,
            min_slaves: config.min_slaves,
            log_max_bytes: config.repl_backlog_bytes,
            max_inflight_txns: config.max_inflight_txns,
            ..CoordinatorConfig::default()
        };
        let announce = Announce::new(config, addr);
        let (role, mode) = match &config.master {
            _ if config.failover.is_some() => {
                // The election decides: lead, or follow whom etcd names.
                let standby = Standby {
                    history_id: replay.history_id,
                    prepared: replay.prepared.clone(),
                    commits: replay.commits.clone(),
                    floor: replay.floor,
                    seen: replay.max_seq,
                };
                let mode = Mode::Slave {
                    master: String::new(),
                };
                (Role::Standby(Box::new(standby)), mode)
            }
            None => {
                // A master continues the history its data belongs to; an empty
                // data directory starts a new one (0 means none).
                let history_id = if replay.history_id != 0 {
                    replay.history_id
                } else {
                    let id = rand::random::<u64>().max(1);
                    wal.start_history(id).map_err(ServerError::Wal)?;
                    info!("new history {id:#018x}");
                    id
                };
                let coordinator_config = CoordinatorConfig {
                    history_id,
                    ..coordinator_config.clone()
                };
                let mut log = CommitLog::new(coordinator_config.log_capacity, replay.floor)
                    .with_max_bytes(coordinator_config.log_max_bytes);
                for (seq, ops) in &replay.commits {
                    log.push(*seq, ops.clone());
                }
                let coordinator = if replay.history_id == 0 {
                    // An empty data directory: no earlier life granted leases.
                    Coordinator::new(coordinator_config, 0)
                } else {
                    // Numbering goes on after the last decision, an abort
                    // included: never again a number slaves have passed.
                    let decided = replay.seq.max(replay.max_seq);
                    Coordinator::recover(coordinator_config, 0, decided, log)
                };
                (Role::Master(Box::new(coordinator)), Mode::Master)
            }
            Some((host, port)) => {
                let master_addr = resolve(host, *port)?;
                let participant = Participant::recover(
                    ParticipantConfig {
                        client_addr: announced(&announce, addr),
                        node_id: wal.node_id(),
                        may_discard_data: config.resync_discard_data,
                        read_lease_ms: config.slave_read_lease_ms,
                        // Slaves that lost their master together redial apart.
                        jitter_seed: rand::random(),
                        ..ParticipantConfig::default()
                    },
                    replay.seq,
                    replay.history_id,
                );
                let role = Role::Slave {
                    participant: Box::new(participant),
                    master_addr,
                    staging: None,
                };
                let master = format!("{host}:{port}");
                (role, Mode::Slave { master })
            }
        };
        let mut core = Core::recovered(config.max_value_bytes, mode, replay.store, replay.seq);
        core.stats.input_budget = Rc::new(InputBudget::new(config.partial_frame_budget_bytes));
        let timeouts = Timeouts {
            frame_ms: config.frame_timeout_ms,
            idle_ms: config.idle_timeout_ms,
        };
        core.resp_enabled = config.resp;
        core.forward =
            forward::Forwarder::new(config.forward_writes, config.master_password.clone());
        core.fsync_policy = config.fsync.name();
        core.tcp_port = addr.port();
        core.password = config.password.clone();
        core.reported = handler::ReportedConfig {
            protected_mode: config.protected_mode,
            max_connections,
            idle_timeout_s: config.idle_timeout_ms / 1000,
        };
        core.protected = auth::protected_mode_applies(
            config.protected_mode,
            addr.ip(),
            config.password.is_some(),
        );
        let failover = config.failover.as_ref().map(|f| {
            let leader_addr = match &announce {
                Announce::Fixed(a) => a.clone(),
                Announce::LinkLocal => leader_addr_toward(&f.endpoints, addr),
            };
            Failover::start(f, wal.node_id(), leader_addr, waker, wal.led_epoch(), 0)
        });
        let mut server = Server {
            poll,
            listener,
            udp,
            links: Slab::new(),
            core,
            addr,
            role,
            timers: Timers::default(),
            clock: Instant::now(),
            peers: HashMap::new(),
            next_peer_id: 1,
            next_conn_id: 1,
            completions: VecDeque::new(),
            touched: Vec::new(),
            dirty_peers: Vec::new(),
            snapshots: SnapshotSet::new(config.max_snapshot_bytes),
            replication_changed: true,
            connect_failures: 0,
            master_dial: None,
            work_left: false,
            expiry_wake: None,
            accept_paused: false,
            wal,
            max_connections,
            timeouts,
            next_sweep_ms: timeouts.sweep_interval_ms(),
            max_peer_output_bytes: peer_output_limit(config),
            deferred_clients: Vec::new(),
            deferred_reads: Vec::new(),
            deferred_flushes: Vec::new(),
            write_hold_until: None,
            failover,
            coordinator_config,
            resync_discard_data: config.resync_discard_data,
            read_lease_ms: config.slave_read_lease_ms,
            cluster_secret: config.cluster_secret.clone(),
            forward_link: None,
            forward_dial_deadline: None,
            forward_deferred: false,
            forward_failures: 0,
            announce,
        };
        if server.core.protected {
            warn!(
                "protected mode: bound to {} without --requirepass-file; clients from \
                 non-loopback addresses are refused (--protected-mode no turns this off)",
                server.addr.ip()
            );
        }
        if server.cluster_secret.is_none() && !server.addr.ip().is_loopback() {
            warn!(
                "no --cluster-secret-file: replication links are accepted from loopback \
                 addresses only"
            );
        }
        // The state machines may have work from the start (a slave dials its
        // master, the election reads etcd).
        server.election_tick(0);
        server.work_left = server.settle();
        Ok(server)
    }

    /// The bound address (the port is the real one when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The ready line: role, transports and address.
    pub fn describe(&self) -> String {
        let transports = match (self.listener.is_some(), self.udp.is_some()) {
            (true, true) => "tcp+udp",
            (true, false) => "tcp",
            _ => "udp",
        };
        if self.failover.is_some() {
            return format!(
                "dkvs-server ready: failover through etcd, serving {transports} on {}",
                self.addr
            );
        }
        match &self.core.mode {
            Mode::Master => format!(
                "dkvs-server ready: master serving {transports} on {}",
                self.addr
            ),
            Mode::Slave { master } => format!(
                "dkvs-server ready: slave of {master} serving {transports} on {}",
                self.addr
            ),
        }
    }

    /// Largest payload accepted on a replication link, by direction (checked
    /// from the header, before the payload is buffered). From a slave: its
    /// largest message, a REGISTER with a 65535-byte address. From the master:
    /// a batch of writes plus one largest value (a PREPARE or LOG_ENTRY), or a
    /// snapshot chunk, with room to spare, for the largest value any master may
    /// accept, so that a slave follows a master whatever its `--max-value-size`.
    fn peer_frame_limit(&self, from_master: bool) -> usize {
        if from_master {
            MAX_MASTER_FRAME_PAYLOAD
        } else {
            peer::MAX_SLAVE_FRAME_PAYLOAD
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Serve until the poller fails.
    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        let mut turn_started: Option<Instant> = None;
        loop {
            let mut next = self.timers.next_deadline();
            if let Some(at) = self.election_deadline() {
                next = Some(next.map_or(at, |t| t.min(at)));
            }
            if !self.links.is_empty() {
                next = Some(next.map_or(self.next_sweep_ms, |t| t.min(self.next_sweep_ms)));
            }
            if let Some((_, at)) = self.master_dial {
                next = Some(next.map_or(at, |t| t.min(at)));
            }
            if let Some(at) = self.write_hold_until {
                next = Some(next.map_or(at, |t| t.min(at)));
            }
            let mut timeout = next.map(|at| {
                // Round up so a timer is never polled for just before it is due.
                Duration::from_millis(at.saturating_sub(self.now_ms()) + 1)
            });
            let forward_due = [
                self.forward_dial_deadline,
                self.core.forward.next_deadline(),
            ];
            for at in forward_due.into_iter().flatten() {
                let wait = at.saturating_duration_since(Instant::now()) + Duration::from_millis(1);
                timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
            }
            let deferred = !self.deferred_clients.is_empty()
                || !self.deferred_reads.is_empty()
                || !self.deferred_flushes.is_empty();
            if let Some(wake) = self.expiry_wake {
                // Keys with deadlines: the sweep runs at least this often.
                timeout = Some(timeout.map_or(wake, |t| t.min(wake)));
            }
            // Snapshot copies let go are freed a budget per turn, until all are.
            let releasing = self.snapshots.releasing_bytes() > 0;
            if self.work_left
                || self.core.udp_retry
                || deferred
                || self.forward_deferred
                || releasing
                || !self.drained_backlogs().is_empty()
            {
                // Left-over work goes on at once.
                timeout = Some(Duration::ZERO);
            } else if self.accept_paused {
                // A paused listener is retried soon (or at the next timer, if sooner).
                let retry = Duration::from_millis(ACCEPT_RETRY_MS);
                timeout = Some(timeout.map_or(retry, |t| t.min(retry)));
            }
            if let Some(started) = turn_started.take() {
                let micros = started.elapsed().as_micros() as u64;
                self.core.stats.longest_turn_us = self.core.stats.longest_turn_us.max(micros);
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Poll(e));
            }
            // A turn is the work between two polls: what other clients wait behind.
            turn_started = Some(Instant::now());
            // Before any client input is served: a master whose lease ran out
            // while it was not running (paused, descheduled) must know it
            // before it could acknowledge anything.
            let now = self.now_ms();
            self.election_tick(now);
            // Deadlines are compared with the clock of this turn, not of the last
            // one: an idle slave may have slept through a deadline, and must not
            // show (or count) the key after it.
            self.core.store.set_now_ms(expiry::unix_ms());
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    UDP => {
                        if let Some(udp) = self.udp.as_mut() {
                            udp.on_readable(&mut self.core);
                        }
                    }
                    WAKER => {
                        if let Some(lsn) = self.wal.on_wake() {
                            self.feed(Event::Persisted { lsn });
                        }
                        self.on_etcd_wake();
                    }
                    Token(t) => self.link_ready(t - FIRST_LINK, event.is_read_closed()),
                }
            }
            if self.accept_paused {
                self.accept();
            }
            // Work cut short by a budget in the last iteration goes on now, after
            // everyone with new events had a turn (each only once per iteration).
            for key in std::mem::take(&mut self.deferred_clients) {
                self.drive_client(key, false, false);
            }
            for key in std::mem::take(&mut self.deferred_reads) {
                self.drive_peer(key, false);
            }
            for key in std::mem::take(&mut self.deferred_flushes) {
                self.flush_peer(key);
            }
            // A slave being sent its backlog gets the next step once its link
            // drained: one step a turn, so a large backlog never fills one.
            for peer in self.drained_backlogs() {
                self.feed(Event::PeerDrained { peer });
            }
            if std::mem::take(&mut self.forward_deferred)
                && let Some(key) = self.forward_link
            {
                self.drive_forward(key);
            }
            if std::mem::take(&mut self.core.udp_retry)
                && let Some(udp) = self.udp.as_mut()
            {
                udp.on_readable(&mut self.core);
            }
            let now = self.now_ms();
            // After this turn's events: a dial answered meanwhile counts as answered.
            self.give_up_slow_dial(now);
            while let Some(timer) = self.timers.pop_expired(now) {
                self.role.handle(now, Event::TimerFired { timer });
                self.replication_changed = true;
            }
            if now >= self.next_sweep_ms {
                self.sweep(now);
            }
            self.expiry_wake = self.core.expiry_turn();
            self.work_left = self.settle();
        }
    }

    /// Close client connections past their frame or idle timeout. Runs every
    /// `Timeouts::sweep_interval_ms` (at most a second): O(connections), no
    /// per-connection timer to keep current on every read.
    fn sweep(&mut self, now: u64) {
        self.next_sweep_ms = now + self.timeouts.sweep_interval_ms();
        let mut expired = Vec::new();
        let mut stalled_peers = Vec::new();
        for (key, link) in self.links.iter_mut() {
            match link {
                Link::Client(connection) => {
                    let activity = connection.io.activity(connection.owes_replies());
                    match connection.io.watch.check(now, activity, self.timeouts) {
                        Verdict::Keep => {}
                        verdict => expired.push((key, verdict)),
                    }
                }
                // A slave's frames are small (at most 65564 bytes of payload): one
                // that does not arrive within the frame timeout holds a link slot
                // for nothing. (The master's frames to a slave may be large; the
                // slave's silence timer covers a stalled master.)
                Link::Peer(link) if !link.to_master() => {
                    let timeouts = Timeouts {
                        idle_ms: 0,
                        ..self.timeouts
                    };
                    let activity = link.io.activity(false);
                    if link.io.watch.check(now, activity, timeouts) == Verdict::SlowFrame {
                        stalled_peers.push(key);
                    }
                }
                Link::Peer(_) | Link::Forward(_) => {}
            }
        }
        for key in stalled_peers {
            self.lose_peer(key, "a frame took longer than the frame timeout to arrive");
        }
        for (key, verdict) in expired {
            if let Some(Link::Client(connection)) = self.links.get(key) {
                info!(
                    "{}: closing connection: {}",
                    connection.peer(),
                    match verdict {
                        Verdict::Idle => "idle timeout",
                        _ => "a frame took longer than the frame timeout to arrive",
                    }
                );
            }
            match verdict {
                Verdict::Idle => self.core.stats.connections_closed_idle += 1,
                _ => self.core.stats.connections_closed_slow_frame += 1,
            }
            self.close_client(key);
        }
    }

    fn accept(&mut self) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        let was_paused = std::mem::take(&mut self.accept_paused);
        loop {
            let (mut stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // Out of descriptors, usually: retry shortly, whatever the poller says.
                    if !was_paused {
                        error!("accept failed: {e}; retrying");
                    }
                    self.accept_paused = true;
                    return;
                }
            };
            if self.core.stats.connections_open as usize >= self.max_connections {
                // Accepted and closed at once: the client sees the close, not a
                // connection left waiting in the backlog.
                self.core.stats.connections_refused += 1;
                if self.core.stats.connections_refused % 1000 == 1 {
                    warn!(
                        "{peer}: {} connections open (--max-connections); refusing \
                         (refused so far: {})",
                        self.max_connections, self.core.stats.connections_refused
                    );
                }
                drop(stream);
                continue;
            }
            // Replies are written whole, one write per batch; Nagle would only delay them.
            if let Err(e) = stream.set_nodelay(true) {
                debug!("{peer}: cannot set TCP_NODELAY: {e}");
            }
            let entry = self.links.vacant_entry();
            let key = entry.key();
            if let Err(e) = register_link(&self.poll, &mut stream, key) {
                error!("{peer}: cannot register connection: {e}");
                continue;
            }
            debug!("{peer}: connected");
            let conn_id = self.next_conn_id;
            self.next_conn_id += 1;
            let mut connection = Connection::new(stream, peer, key, conn_id);
            if self.core.protected_mode_refuses(peer.ip()) {
                // Answered DENIED on its first request, then closed. A peer
                // handshake is still handed to replication, which has its own rule.
                connection.denied = true;
                self.core.stats.protected_mode_refusals += 1;
                if self.core.denied_log.should_log(peer.ip(), self.clock) {
                    warn!("protected mode: refused a client from {}", peer.ip());
                }
            }
            connection
                .io
                .set_budget(Rc::clone(&self.core.stats.input_budget));
            entry.insert(Link::Client(connection));
            self.core.stats.connections_accepted += 1;
            self.core.stats.connections_open += 1;
        }
    }

    fn link_ready(&mut self, key: usize, read_closed: bool) {
        match self.links.get(key) {
            Some(Link::Client(_)) => self.drive_client(key, true, read_closed),
            Some(Link::Peer(_)) => self.drive_peer(key, read_closed),
            Some(Link::Forward(_)) => self.drive_forward(key),
            None => {}
        }
    }

    /// Serve a client connection: on readiness (`event`), or to resume it after replies.
    fn drive_client(&mut self, key: usize, event: bool, read_closed: bool) {
        let Some(Link::Client(connection)) = self.links.get_mut(key) else {
            return;
        };
        let liveness = connection.on_ready(&mut self.core, event, read_closed);
        // A key may be queued twice in one iteration (an event and a resumption):
        // a second drive is harmless, and the list is drained every iteration.
        if connection.take_yielded() {
            self.deferred_clients.push(key);
        }
        match liveness {
            Liveness::Open => {}
            Liveness::Closed => self.close_client(key),
            Liveness::BecomePeer => self.become_peer(key),
        }
    }

    fn close_client(&mut self, key: usize) {
        if let Link::Client(mut connection) = self.links.remove(key) {
            debug!("{}: disconnected", connection.peer());
            if let Err(e) = self.poll.registry().deregister(&mut connection.io.stream) {
                debug!("{}: deregister failed: {e}", connection.peer());
            }
            self.core.stats.connections_open -= 1;
        }
    }

    /// A client connection sent a peer frame: on a master it becomes a replication link.
    fn become_peer(&mut self, key: usize) {
        if !matches!(self.links.get(key), Some(Link::Client(_))) {
            return;
        }
        let Some(Link::Client(connection)) = self.links.try_remove(key) else {
            return;
        };
        self.core.stats.connections_open -= 1;
        let addr = connection.peer();
        let (mut io, read_closed) = connection.into_io();
        if !matches!(self.role, Role::Master(_)) {
            warn!("{addr}: replication handshake sent to a server that is not the master; closing");
            let _ = self.poll.registry().deregister(&mut io.stream);
            return;
        }
        if self.cluster_secret.is_none() && !addr.ip().is_loopback() {
            // Anyone who reaches the port could otherwise join as a slave.
            warn!(
                "{addr}: replication handshake from a non-loopback address refused: \
                 start the servers with --cluster-secret-file to replicate across hosts"
            );
            let _ = self.poll.registry().deregister(&mut io.stream);
            return;
        }
        if self.peers.len() >= MAX_PEER_LINKS {
            // Each link may cost a snapshot copy and large buffers: bound them.
            warn!("{addr}: already {MAX_PEER_LINKS} replication links; refusing another");
            let _ = self.poll.registry().deregister(&mut io.stream);
            return;
        }
        let id = PeerId(self.next_peer_id);
        self.next_peer_id += 1;
        info!("{addr}: replication link {} opened", id.0);
        let limit = self.peer_frame_limit(false);
        let max_output = self.max_peer_output_bytes;
        let entry = self.links.vacant_entry();
        let new_key = entry.key();
        if new_key != key
            && let Err(e) = self.poll.registry().reregister(
                &mut io.stream,
                Token(new_key + FIRST_LINK),
                Interest::READABLE | Interest::WRITABLE,
            )
        {
            error!("{addr}: cannot register replication link: {e}");
            return;
        }
        let epoch = self.failover.as_ref().map_or(0, |f| f.epoch);
        let mut link = PeerLink::new(io, id, addr, false, limit, max_output).in_epoch(epoch);
        if let Some(secret) = &self.cluster_secret {
            link = link.with_auth(PeerAuth::master(secret.clone()), None);
        }
        entry.insert(Link::Peer(link));
        self.peers.insert(id, new_key);
        self.drive_peer(new_key, read_closed);
    }

    /// With [`Announce::LinkLocal`], announce the link's local address (with
    /// the bound port) in the REGISTER that follows; said in the log when it
    /// changes.
    fn announce_link_local(&mut self, local: io::Result<SocketAddr>) {
        if self.announce != Announce::LinkLocal {
            return;
        }
        let Role::Slave { participant, .. } = &mut self.role else {
            return;
        };
        let local = match local {
            Ok(local) if !local.ip().is_unspecified() => local,
            Ok(_) | Err(_) => {
                warn!(
                    "bound to {} and the link to the master has no local address: announcing \
                     {}; set --announce-addr",
                    self.addr,
                    participant.client_addr()
                );
                return;
            }
        };
        let addr = SocketAddr::new(local.ip(), self.addr.port()).to_string();
        if participant.client_addr() != addr {
            info!(
                "bound to {}: announcing {addr} (this end of the link to the master) to the \
                 master; --announce-addr sets another",
                self.addr
            );
            participant.set_client_addr(addr);
        }
    }

    /// Read, decode and hand to the state machine everything a replication link has.
    fn drive_peer(&mut self, key: usize, read_closed: bool) {
        let Some(Link::Peer(link)) = self.links.get_mut(key) else {
            return;
        };
        let id = link.id;
        if link.connecting {
            match link.io.stream.peer_addr() {
                Ok(_) => {
                    link.connecting = false;
                    self.master_dial = None;
                    self.connect_failures = 0;
                    info!("connected to master {}", link.addr);
                    let local = link.io.stream.local_addr();
                    self.announce_link_local(local);
                    self.feed(Event::Connected { peer: id });
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    let reason = link.io.stream.take_error().ok().flatten();
                    if let Some(e) = reason {
                        let addr = link.addr;
                        self.master_unreachable(addr, &e);
                        self.drop_peer(key);
                        self.feed(Event::ConnectFailed);
                    }
                    return;
                }
                Err(e) => {
                    let addr = link.addr;
                    self.master_unreachable(addr, &e);
                    self.drop_peer(key);
                    self.feed(Event::ConnectFailed);
                    return;
                }
            }
        }
        let Some(Link::Peer(link)) = self.links.get_mut(key) else {
            return;
        };
        let mut messages = Vec::new();
        let result = link.receive(&mut messages, read_closed);
        if std::mem::take(&mut link.read_yielded) && !self.deferred_reads.contains(&key) {
            self.deferred_reads.push(key);
        }
        for msg in messages {
            self.feed(Event::Message { peer: id, msg });
        }
        if let Err(e) = result {
            self.lose_peer(key, &e.to_string());
            return;
        }
        self.flush_peer(key);
    }

    /// Write a link's queued output; report a finished snapshot; drop a failed link.
    fn flush_peer(&mut self, key: usize) {
        let Some(Link::Peer(link)) = self.links.get_mut(key) else {
            return;
        };
        if link.connecting {
            return;
        }
        let id = link.id;
        let streaming = link.streaming_snapshot();
        let written = link.io.bytes_written();
        let flushed = link.flush(&self.core.store, &mut self.snapshots);
        if std::mem::take(&mut link.flush_yielded) && !self.deferred_flushes.contains(&key) {
            self.deferred_flushes.push(key);
        }
        // Reported only when the slave drained something: that is hearing
        // from it (it sends nothing meanwhile), and the write throttle paces
        // writes to the stream's progress.
        let progress = self
            .snapshots
            .progress(id.0)
            .filter(|_| streaming && link.io.bytes_written() > written);
        match flushed {
            Ok(Some(at_seq)) => self.feed(Event::SnapshotSent { peer: id, at_seq }),
            Ok(None) => {
                if let Some((at_seq, done_per_mille)) = progress {
                    self.feed(Event::SnapshotProgress {
                        peer: id,
                        at_seq,
                        done_per_mille,
                    });
                }
            }
            Err(e) => self.lose_peer(key, &e.to_string()),
        }
    }

    /// The slaves being sent a backlog (`Coordinator::backlog_peers`) whose
    /// link streams no snapshot and has less than `BACKLOG_LOW_WATER_BYTES`
    /// queued: each is owed its next step (`Event::PeerDrained`).
    fn drained_backlogs(&self) -> Vec<PeerId> {
        let Role::Master(c) = &self.role else {
            return Vec::new();
        };
        c.backlog_peers()
            .filter(|peer| {
                matches!(
                    self.peers.get(peer).and_then(|&key| self.links.get(key)),
                    Some(Link::Peer(link)) if !link.streaming_snapshot()
                        && link.io.pending_output() < BACKLOG_LOW_WATER_BYTES
                )
            })
            .collect()
    }

    /// A link failed: close it and tell the state machine.
    fn lose_peer(&mut self, key: usize, why: &str) {
        if let Some(id) = self.drop_peer(key) {
            info!("replication link {} closed: {why}", id.0);
            self.feed(Event::PeerLost { peer: id });
        }
    }

    /// Close a link without telling the state machine (it asked for it, or never knew it).
    fn drop_peer(&mut self, key: usize) -> Option<PeerId> {
        if !matches!(self.links.get(key), Some(Link::Peer(_))) {
            return None;
        }
        let Link::Peer(mut link) = self.links.remove(key) else {
            return None;
        };
        let _ = self.poll.registry().deregister(&mut link.io.stream);
        self.peers.remove(&link.id);
        // Its snapshot's copies go with its last reader.
        self.snapshots.remove(link.id.0);
        self.replication_changed = true;
        Some(link.id)
    }

    fn feed(&mut self, event: Event) {
        // Writes and their durability do not change who is in sync; refreshing
        // the STATS lines for them would format text on every write. Messages,
        // links and timers (heartbeats every 100 ms) keep the lines current.
        if !matches!(
            event,
            Event::ClientWrites { .. } | Event::Persisted { .. } | Event::SnapshotProgress { .. }
        ) {
            self.replication_changed = true;
        }
        let now = self.now_ms();
        self.role.handle(now, event);
    }

    /// Submit this iteration's writes, execute every action, resume the clients
    /// whose replies came, and repeat while that produces more writes.
    ///
    /// Returns whether work is left (the round bound was hit): the caller
    /// then polls without blocking.
    fn settle(&mut self) -> bool {
        let mut work_left = true;
        for _ in 0..MAX_SETTLE_ROUNDS {
            self.write_hold_until = None;
            if !self.core.batch.is_empty() {
                let now = self.now_ms();
                self.write_hold_until = self.role.write_hold(now);
            }
            // At the in-flight bound the batch waits (a read that met an
            // expired key may have added a deletion to it) for a transaction
            // to end; the decisions that end them come from the links, which
            // are read whatever this gate says.
            let at_bound = self.role.at_inflight_bound();
            if !self.core.batch.is_empty() && self.write_hold_until.is_none() && !at_bound {
                let writes = self.core.take_batch();
                self.feed(Event::ClientWrites { writes });
                self.update_write_gate();
                if !self.core.writes_paused {
                    self.resume_writers();
                }
            }
            self.run_actions();
            // Flushing can finish a snapshot or find a link dead: both are events
            // whose actions run before the clients are resumed.
            let dirty = std::mem::take(&mut self.dirty_peers);
            for key in dirty {
                self.flush_peer(key);
            }
            self.run_actions();
            self.update_write_gate();
            let touched = std::mem::take(&mut self.touched);
            for key in touched {
                self.drive_client(key, false, false);
            }
            // Writes the clients forwarded go out; replies now applied come back.
            self.pump_forward();
            // A resumed connection may have become a peer link and fed the role.
            self.run_actions();
            // A batch held back for a snapshot, or for the in-flight bound, is
            // no work until the hold ends.
            let held = self.write_hold_until.is_some() || self.role.at_inflight_bound();
            if (self.core.batch.is_empty() || held)
                && self.touched.is_empty()
                && self.dirty_peers.is_empty()
                && self.completions.is_empty()
                && (!self.core.udp_waiting || held)
            {
                work_left = false;
                break;
            }
        }
        if let Some(why) = self.wal.failed()
            && self.core.write_refusal.is_none()
        {
            self.core.write_refusal = Some(format!("write-ahead log failed: {why}"));
            self.replication_changed = true;
            // The writes in flight wait for a sync that will never come, and
            // whether their records reached the disk is unknown: close their
            // connections, as if this server had died, rather than let them hang.
            let targets: Vec<ReplyTarget> = self
                .core
                .waiting
                .take_all()
                .into_iter()
                .map(|w| w.target)
                .collect();
            if !targets.is_empty() {
                warn!(
                    "closing the connections of {} writes in flight: their outcome is unknown",
                    targets.len()
                );
            }
            self.close_writers(targets);
        }
        self.core.stats.snapshots = self.snapshots.counters();
        self.core.stats.disk_snapshot_held_bytes = self.wal.snapshot_held_bytes();
        self.give_back_snapshot_memory();
        self.forget_led_epoch_once_following();
        self.core.read_gate = self.read_gate();
        let alone = matches!(&self.role, Role::Master(c) if c.members().in_sync_count() == 0);
        self.wal.set_group_window(alone);
        if self.wal.snapshot_due() {
            let seq = self.core.commit_seq;
            let history_id = self.role.history_id();
            self.wal.start_snapshot(seq, history_id);
        }
        // One bounded step per turn: a snapshot never holds the loop for long.
        self.wal.snapshot_step(&self.core.store);
        work_left |= self.wal.snapshot_pending();
        if self.replication_changed {
            self.replication_changed = false;
            self.core.stats.wal = self.wal.stats();
            let master = match &self.core.mode {
                Mode::Master => String::new(),
                Mode::Slave { master } => master.clone(),
            };
            let now = self.now_ms();
            self.core.stats.replication = self.role.describe(&master, now);
            if let Some(f) = &self.failover {
                let now = self.now_ms();
                self.core.stats.replication.push_str(&f.describe(now));
            }
            self.core.replication = self.role.info();
            self.core.replication.failover = self.failover.as_ref().map(|f| f.summary());
        }
        work_left
    }

    /// Pause or resume the intake of client writes as the transactions in
    /// flight reach or leave their bound (backpressure: a connection stops
    /// reading at its next write, the UDP socket stops reading; nothing is
    /// refused). Resuming wakes everyone who stopped.
    fn update_write_gate(&mut self) {
        let paused = self.role.at_inflight_bound();
        if paused == self.core.writes_paused {
            return;
        }
        self.core.writes_paused = paused;
        if paused {
            self.core.stats.txn_backpressure_pauses += 1;
            debug!("transactions in flight at their bound: client writes paused");
        } else {
            self.resume_writers();
        }
    }

    /// Drive again the connections and the UDP socket that stopped at a full
    /// batch or paused writes.
    fn resume_writers(&mut self) {
        let waiters = std::mem::take(&mut self.core.batch_waiters);
        self.touched.extend(waiters);
        if std::mem::take(&mut self.core.udp_waiting)
            && let Some(udp) = self.udp.as_mut()
        {
            udp.on_readable(&mut self.core);
        }
    }

    /// Whether reads may be served: a slave only within the read lease its
    /// participant holds (unless it serves stale reads by choice).
    fn read_gate(&self) -> ReadGate {
        if self.read_lease_ms == 0 {
            return ReadGate::Open;
        }
        match &self.role {
            Role::Master(_) => ReadGate::Open,
            Role::Slave { participant, .. } => match participant.read_lease_until() {
                Some(ms) => ReadGate::Until(self.clock + Duration::from_millis(ms)),
                None => ReadGate::Closed,
            },
            Role::Standby(_) => ReadGate::Closed,
        }
    }

    /// Execute actions until the state machine and the completions are quiet.
    fn run_actions(&mut self) {
        loop {
            match self.role.poll_action() {
                Some(action) => self.execute(action),
                None => {
                    if let Some(event) = self.next_completion() {
                        self.feed(event);
                        continue;
                    }
                    if self.drop_snapshot_evictions() {
                        continue;
                    }
                    // Everything this round appended goes to the log in one write
                    // (and, under --fsync always, one sync in flight at a time).
                    match self.wal.flush() {
                        Some(lsn) => self.feed(Event::Persisted { lsn }),
                        None => return,
                    }
                }
            }
        }
    }

    /// Free [`RELEASE_PER_TURN`] of the snapshot copies let go, their pages
    /// given back to the system as they are freed (`SnapshotSet::release_some`):
    /// an evicted receiver's copy leaves the master's RSS (tests/rejoin.rs)
    /// over a few turns instead of in one long one.
    fn give_back_snapshot_memory(&mut self) {
        if self.snapshots.releasing_bytes() == 0 {
            return;
        }
        let freed = self.snapshots.release_some(RELEASE_PER_TURN);
        debug!(
            "gave {freed} bytes of snapshot copies back to the system, {} to go",
            self.snapshots.releasing_bytes()
        );
    }

    /// Close the links whose snapshot was dropped at the memory cap; returns
    /// whether there were any (their loss is an event with actions to run).
    fn drop_snapshot_evictions(&mut self) -> bool {
        let evicted = self.snapshots.take_evicted();
        let any = !evicted.is_empty();
        for e in evicted {
            let peer = PeerId(e.reader);
            if let Some(&key) = self.peers.get(&peer) {
                if let Some(Link::Peer(link)) = self.links.get(key) {
                    warn!(
                        "{}: disconnecting a snapshot receiver at the memory cap: {}; it \
                         registers again after its reconnect backoff",
                        link.addr, e.reason
                    );
                }
                self.lose_peer(key, "snapshot dropped at the memory cap");
            }
        }
        any
    }

    /// The next completion; consecutive `Persisted` ones collapse into the highest.
    fn next_completion(&mut self) -> Option<Event> {
        let mut event = self.completions.pop_front()?;
        while let (Event::Persisted { lsn }, Some(Event::Persisted { lsn: next })) =
            (&event, self.completions.front())
        {
            debug_assert!(next > lsn);
            event = Event::Persisted { lsn: *next };
            self.completions.pop_front();
        }
        Some(event)
    }

    fn execute(&mut self, action: Action) {
        match action {
            Action::Send { peer, msg } => self.send_peer(peer, &msg),
            Action::Disconnect { peer } => {
                if let Some(&key) = self.peers.get(&peer) {
                    // Flush what was queued (e.g. a refusal) before closing.
                    self.flush_peer(key);
                    if let Some(Link::Peer(link)) = self.links.get(key)
                        && let Some(summary) = link.snapshot_summary(&self.snapshots)
                    {
                        info!("{}: dropping the {summary}", link.addr);
                    }
                    self.drop_peer(key);
                    info!("replication link {} closed by replication", peer.0);
                    // The link is gone for the state machine too: it forgets the slave.
                    self.completions.push_back(Event::PeerLost { peer });
                }
            }
            Action::Connect => self.connect_to_master(),
            Action::Persist { lsn, record } => self.wal.append(lsn, &record),
            Action::Apply {
                seq,
                ops,
                replies,
                key_hashes,
            } => self.apply(seq, &ops, &replies, key_hashes),
            Action::Reply { client, error } => {
                self.core.stats.writes_failed += 1;
                let message = error.to_string();
                let status = match error {
                    WriteError::Unavailable(_) => Status::Unavailable,
                    WriteError::Aborted(_) => Status::Aborted,
                };
                self.reply(client, status, 0, message.as_bytes());
            }
            Action::SetTimer { timer, at_ms } => self.timers.set(timer, at_ms),
            Action::CancelTimer { timer } => self.timers.cancel(timer),
            Action::StartSnapshot { peer, at_seq } => {
                if let Some(&key) = self.peers.get(&peer)
                    && let Some(Link::Peer(link)) = self.links.get_mut(key)
                {
                    // A snapshot already streaming is shared if the log still
                    // holds what a receiver of it needs after it.
                    let log_floor = match &self.role {
                        Role::Master(c) => c.log_floor(),
                        Role::Slave { .. } | Role::Standby(_) => at_seq,
                    };
                    let sent_at = self.snapshots.start(peer.0, at_seq, log_floor);
                    if sent_at == at_seq {
                        info!(
                            "streaming a snapshot of {} keys at seq {at_seq} to {} (copied shard by shard)",
                            self.core.store.len(),
                            link.addr
                        );
                    } else {
                        info!(
                            "streaming to {} the snapshot at seq {sent_at} already streaming to \
                             others (shared: no copy of its own; it catches up from seq {sent_at})",
                            link.addr
                        );
                        self.completions.push_back(Event::SnapshotJoined {
                            peer,
                            at_seq: sent_at,
                        });
                    }
                    link.start_snapshot(sent_at);
                    self.dirty_peers.push(key);
                }
            }
            Action::InstallSnapshot {
                at_seq,
                entries,
                begin,
                end,
            } => self.install_snapshot(at_seq, entries, begin, end),
            Action::RecordSyncSet { version, members } => self.record_sync_set(version, members),
        }
    }

    fn send_peer(&mut self, peer: PeerId, msg: &PeerMessage) {
        if let Some(&key) = self.peers.get(&peer)
            && let Some(Link::Peer(link)) = self.links.get_mut(key)
        {
            link.send(msg);
            self.dirty_peers.push(key);
        }
    }

    /// Log a failed attempt to reach the master: the first of a streak and
    /// then every 50th at warning level, so a down master does not flood the log.
    fn master_unreachable(&mut self, addr: SocketAddr, e: &io::Error) {
        self.connect_failures += 1;
        if self.connect_failures % 50 == 1 {
            warn!(
                "cannot reach master {addr} over TCP: {e} (attempt {}; retrying with backoff; \
                 replication needs the master to serve TCP, i.e. not -u)",
                self.connect_failures
            );
        } else {
            debug!("cannot reach master {addr}: {e}");
        }
    }

    fn connect_to_master(&mut self) {
        let Role::Slave {
            master_addr,
            staging,
            ..
        } = &mut self.role
        else {
            return;
        };
        // A snapshot half-received on the old link is never finished: free it.
        *staging = None;
        let master_addr = *master_addr;
        let mut stream = match TcpStream::connect(master_addr) {
            Ok(stream) => stream,
            Err(e) => {
                self.master_unreachable(master_addr, &e);
                self.completions.push_back(Event::ConnectFailed);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let limit = self.peer_frame_limit(true);
        let max_output = self.max_peer_output_bytes;
        let entry = self.links.vacant_entry();
        let key = entry.key();
        if let Err(e) = register_link(&self.poll, &mut stream, key) {
            error!("cannot register link to master: {e}");
            self.completions.push_back(Event::ConnectFailed);
            return;
        }
        let id = PeerId(self.next_peer_id);
        self.next_peer_id += 1;
        let epoch = self.failover.as_ref().map_or(0, |f| f.epoch);
        let mut link = PeerLink::new(
            Framed::new(stream),
            id,
            master_addr,
            true,
            limit,
            max_output,
        )
        .in_epoch(epoch);
        if let Some(secret) = &self.cluster_secret {
            match PeerAuth::slave(secret.clone()) {
                Ok((auth, hello)) => link = link.with_auth(auth, Some(hello)),
                Err(e) => {
                    error!("cannot authenticate to the master: {e}");
                    self.completions.push_back(Event::ConnectFailed);
                    return;
                }
            }
        }
        entry.insert(Link::Peer(link));
        self.peers.insert(id, key);
        self.master_dial = Some((id, self.now_ms() + MASTER_CONNECT_TIMEOUT_MS));
    }

    /// Abandon the dial to the master if it is still unanswered past its
    /// deadline, and report it failed: the participant redials after its backoff.
    fn give_up_slow_dial(&mut self, now: u64) {
        let Some((id, deadline)) = self.master_dial else {
            return;
        };
        if now < deadline {
            return;
        }
        self.master_dial = None;
        let Some(&key) = self.peers.get(&id) else {
            return; // failed or closed already
        };
        let Some(Link::Peer(link)) = self.links.get(key) else {
            return;
        };
        if !link.connecting {
            return;
        }
        let addr = link.addr;
        let e = io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {MASTER_CONNECT_TIMEOUT_MS} ms"),
        );
        self.master_unreachable(addr, &e);
        self.drop_peer(key);
        self.feed(Event::ConnectFailed);
    }

    /// Apply committed transaction `seq`. `key_hashes` are the keys' store
    /// hashes when the writes came from this master's clients (hashed once, at
    /// submission); writes from elsewhere (a slave's, a promoted master's
    /// recovered ones) come without, and are hashed here: a hash is never
    /// taken from the network.
    fn apply(
        &mut self,
        seq: u64,
        ops: &[crate::protocol::peer::WriteOp],
        replies: &[ClientRef],
        key_hashes: Vec<u64>,
    ) {
        debug_assert!(
            seq > self.core.commit_seq,
            "commits apply in sequence order"
        );
        debug_assert!(key_hashes.is_empty() || key_hashes.len() == ops.len());
        let hashes = if key_hashes.len() == ops.len() {
            key_hashes
        } else {
            let store = &self.core.store;
            ops.iter().map(|op| store.key_hash(op.key())).collect()
        };
        let keys = ops.iter().map(|op| op.key());
        self.core.store.warm(keys.zip(hashes.iter().copied()));
        self.core.waiting.warm(replies);
        for (i, (op, &hash)) in ops.iter().zip(&hashes).enumerate() {
            let Some(write) = crate::wal::replay::store_write(op) else {
                self.wal.before_clear(&self.core.store);
                self.snapshots.before_clear(&self.core.store);
                self.core.store.clear();
                if let Some(&client) = replies.get(i) {
                    self.reply(client, Status::Ok, seq, &[]);
                }
                continue;
            };
            // A snapshot being streamed or written keeps the key (or its
            // shard) as it was at its start (found from the hash at hand,
            // not hashed again).
            self.wal.before_key_write(&self.core.store, op.key(), hash);
            self.snapshots
                .before_key_write(&self.core.store, op.key(), hash);
            let applied = self.core.store.apply_hashed(write, seq, hash);
            if let Some(&client) = replies.get(i) {
                match applied {
                    Applied::Changed(version) => self.reply(client, Status::Ok, version, &[]),
                    Applied::NotFound => self.reply(client, Status::NotFound, 0, &[]),
                }
            }
        }
        self.core.commit_seq = seq;
    }

    fn install_snapshot(
        &mut self,
        at_seq: u64,
        entries: Vec<crate::protocol::peer::SnapshotEntry>,
        begin: bool,
        end: bool,
    ) {
        let Role::Slave { staging, .. } = &mut self.role else {
            return;
        };
        if begin {
            // Keeps the hash key: see `Store::empty_like`.
            *staging = Some(self.core.store.empty_like());
        }
        let Some(store) = staging.as_mut() else {
            warn!("snapshot chunk without a beginning; ignored");
            return;
        };
        for e in entries {
            store.set(&e.key, &e.value, e.version);
            if e.deadline_ms > 0 {
                store.set_deadline(&e.key, Some(e.deadline_ms));
            }
        }
        if end && let Some(store) = staging.take() {
            info!(
                "installed a snapshot of {} keys at seq {at_seq}",
                store.len()
            );
            self.core.store = store;
            self.core.commit_seq = at_seq;
        }
    }

    /// Close the TCP connections of writes whose outcome this server cannot
    /// tell (no status says "unknown": UNAVAILABLE means "not applied"). A
    /// UDP client hears nothing and retries.
    fn close_writers(&mut self, targets: impl IntoIterator<Item = ReplyTarget>) {
        for target in targets {
            if let ReplyTarget::Tcp { key, conn_id } = target
                && let Some(Link::Client(connection)) = self.links.get(key)
                && connection.conn_id() == conn_id
            {
                self.close_client(key);
            }
        }
    }

    /// Send the reply of a write that waited for its transaction.
    fn reply(&mut self, client: ClientRef, status: Status, version: u64, message: &[u8]) {
        let Some((target, completion)) = self.core.finish(client, status, version, message) else {
            return;
        };
        // A write was decided: commands waiting to read a key in flight may go on.
        self.touched.append(&mut self.core.key_waiters);
        match target {
            ReplyTarget::Tcp { key, conn_id } => {
                if let Some(Link::Client(connection)) = self.links.get_mut(key)
                    && connection.conn_id() == conn_id
                {
                    connection.deliver(client, |out| completion.encode(out));
                    // A batch's replies to one connection mostly come one after
                    // another (its pipelined commands were parsed together): one
                    // drive after them flushes them all, where a drive per reply
                    // cost a pass through the connection each.
                    if self.touched.last() != Some(&key) {
                        self.touched.push(key);
                    }
                }
            }
            ReplyTarget::Nobody => {}
            ReplyTarget::Udp { from, fingerprint } => {
                if let Some(udp) = self.udp.as_mut() {
                    let mut bytes = Vec::with_capacity(crate::protocol::HEADER_LEN + message.len());
                    completion.encode(&mut bytes);
                    udp.deliver(
                        &mut self.core,
                        from,
                        completion.request_id(),
                        fingerprint,
                        &bytes,
                    );
                }
            }
        }
    }
}

/// Recover the data directory named by `config` with repairs allowed, then
/// close it; returns what was found and done.
pub fn repair(config: &Config) -> Result<String, ServerError> {
    let poll = Poll::new().map_err(ServerError::Poll)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(ServerError::Poll)?);
    let (_wal, replay, report) =
        Wal::open(config.wal_config(true), waker).map_err(ServerError::Wal)?;
    let mut text = format!(
        "{}: {} keys at seq {} of history {:#018x} ({} records in {} segments)",
        config.data_dir.display(),
        replay.store.len(),
        replay.seq,
        replay.history_id,
        report.records,
        report.segments
    );
    if report.repairs.is_empty() {
        text.push_str("; nothing to repair");
    }
    for r in &report.repairs {
        text.push_str("\nrepaired: ");
        text.push_str(r);
    }
    Ok(text)
}

/// Largest payload a slave accepts from its master (see `peer_frame_limit`).
/// Public so that the peer decoder's fuzz target (fuzz/) runs with both directions' limits.
pub const MAX_MASTER_FRAME_PAYLOAD: usize =
    handler::MAX_BATCH_BYTES + 2 * MAX_VALUE_BYTES_LIMIT + (8 << 20);

/// Largest unsent output a replication link may hold before it is dropped:
/// room for what the pinned commit log holds, up to 4 times
/// `--repl-backlog-mb` and at least 64 MiB of keys and values, counted twice
/// for the encoding of small writes, plus a snapshot window and two largest
/// frames (a PREPARE queued behind a LOG_ENTRY), although a backlog is queued
/// only a step at a time, while the link has drained (`Event::PeerDrained`).
fn peer_output_limit(config: &Config) -> usize {
    let largest_frame = handler::MAX_BATCH_BYTES + 2 * config.max_value_bytes + (8 << 20);
    config
        .repl_backlog_bytes
        .saturating_mul(crate::replication::PIN_SLACK)
        .max(crate::replication::PIN_FLOOR_BYTES)
        .saturating_mul(2)
        .saturating_add(2 * largest_frame)
        .saturating_add(peer::SNAPSHOT_LOW_WATER_BYTES)
}

/// Register a stream living at slab `key` for both directions, once: with
/// edge-triggered readiness no re-registration is ever needed.
fn register_link(poll: &Poll, stream: &mut TcpStream, key: usize) -> io::Result<()> {
    poll.registry().register(
        stream,
        Token(key + FIRST_LINK),
        Interest::READABLE | Interest::WRITABLE,
    )
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, ServerError> {
    let resolve_err = |source| ServerError::Resolve {
        host: host.to_string(),
        source,
    };
    (host, port)
        .to_socket_addrs()
        .map_err(resolve_err)?
        .next()
        .ok_or_else(|| resolve_err(io::ErrorKind::NotFound.into()))
}

/// The address to announce before any link tells better: for
/// [`Announce::LinkLocal`] the bound one, replaced when the link connects.
fn announced(announce: &Announce, bound: SocketAddr) -> String {
    match announce {
        Announce::Fixed(a) => a.clone(),
        Announce::LinkLocal => bound.to_string(),
    }
}

/// The address a node bound to `0.0.0.0`/`::` without `--announce-addr`
/// records in etcd as leader: its local address on the route to the first
/// etcd endpoint (the other nodes reach etcd, so most likely this address
/// too), with the bound port. Found by connecting a UDP socket, which sends
/// nothing. Falls back to the bound address, with a warning.
fn leader_addr_toward(endpoints: &[String], bound: SocketAddr) -> String {
    let route = endpoints.first().and_then(|endpoint| {
        let hostport = endpoint.strip_prefix("http://")?.split('/').next()?;
        let target = hostport.to_socket_addrs().ok()?.next()?;
        let local: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(local).ok()?;
        socket.connect(target).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_unspecified()).then_some(ip)
    });
    match route {
        Some(ip) => {
            let addr = SocketAddr::new(ip, bound.port());
            info!(
                "bound to {bound}: announcing {addr} (the local address toward etcd) as this \
                 node's address; --announce-addr sets another"
            );
            addr.to_string()
        }
        None => {
            warn!(
                "bound to {bound} and no route to etcd found: announcing {bound}, which other \
                 hosts cannot connect to; set --announce-addr"
            );
            bound.to_string()
        }
    }
}

/// Bind TCP and/or UDP on `addr`; for port 0, find one port free for both.
fn bind_sockets(
    addr: SocketAddr,
    config: &Config,
) -> Result<(Option<TcpListener>, Option<UdpSocket>, SocketAddr), ServerError> {
    let bind_err = |transport, addr, source| ServerError::Bind {
        transport,
        addr,
        source,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let listener = if config.tcp {
            Some(TcpListener::bind(addr).map_err(|e| bind_err("TCP", addr, e))?)
        } else {
            None
        };
        let mut bound = addr;
        if let Some(l) = &listener {
            bound = l.local_addr().map_err(|e| bind_err("TCP", addr, e))?;
        }
        if !config.udp {
            return Ok((listener, None, bound));
        }
        match UdpSocket::bind(bound) {
            Ok(socket) => {
                let bound = socket.local_addr().map_err(|e| bind_err("UDP", addr, e))?;
                return Ok((listener, Some(socket), bound));
            }
            // The port TCP got by chance may be taken for UDP: try another.
            Err(e)
                if addr.port() == 0
                    && listener.is_some()
                    && e.kind() == io::ErrorKind::AddrInUse
                    && attempt < PORT_ZERO_ATTEMPTS =>
            {
                info!("port {} is taken for UDP, trying another", bound.port());
            }
            Err(e) => return Err(bind_err("UDP", bound, e)),
        }
    }
}
