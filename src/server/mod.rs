//! The reactor: one thread, one `mio::Poll`, multiplexing the TCP listener,
//! the UDP socket, client connections, replication links and 2PC timers.
//!
//! The replication state machine (a [`Coordinator`] on a master, a
//! [`Participant`] on a slave) does no I/O: the reactor feeds it events and
//! executes the actions it returns. All client writes that arrive in one loop
//! iteration become one transaction (group commit).
//!
//! Here: the configuration, the [`Server`] and its role. The rest of the
//! reactor, by job: `bind.rs` (from a [`Config`] to bound sockets, a
//! recovered store and a role), `reactor.rs` (the loop: poll, accept, drive
//! links, timers, settle each turn) and `execute.rs` (the actions of the
//! state machine carried out, their completions fed back).

pub mod announce;
pub mod auth;
mod bind;
mod connection;
mod exec_view;
mod execute;
mod expiry;
mod failover;
mod forward;
mod forward_io;
mod handler;
mod limits;
mod multi;
mod peer;
mod reactor;
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
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Token, Waker};
use slab::Slab;

use crate::replication::{
    Action, Coordinator, CoordinatorConfig, Event, LinkState, Participant, PeerId,
};
use crate::store::Store;
use crate::wal::{FsyncPolicy, Wal, WalConfig, WalError};

use bind::{Announce, announced};
use connection::Connection;
pub use failover::FailoverConfig;
use failover::{Failover, Standby};
pub use handler::Core;
use handler::Mode;
use limits::Timeouts;
pub use limits::UdpLimitScope;
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
/// A slave's dial to its master that is still unanswered after this is
/// abandoned and reported failed, and the participant redials after its
/// backoff. Without it a SYN dropped by a partition waits for the kernel's
/// retransmissions (1, 3, 7, 15 s ...), so a slave rejoined seconds after the
/// heal; a fresh SYN every ~second finds a healed path at once. A TCP
/// handshake needs one round trip: 500 ms is far beyond any LAN or region.
const MASTER_CONNECT_TIMEOUT_MS: u64 = 500;
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

/// The replication state machine this server runs: the one source of truth
/// for this server's role. The request handler sees it as a [`Mode`] derived
/// by [`Role::mode`]; [`Server::set_role`] changes both.
enum Role {
    /// Coordinates every write.
    Master(Box<Coordinator>),
    /// Failover: waiting for the election to say whom to follow, or to lead.
    Standby(Box<Standby>),
    /// Follows a master.
    Slave {
        participant: Box<Participant>,
        master_addr: SocketAddr,
        /// The master's client address as given (`-m host:port`) or as etcd
        /// records the leader: what INFO, ROLE and STATS show, and where
        /// clients are redirected.
        master: String,
        /// A snapshot being installed; swapped in whole when its last chunk arrives.
        staging: Option<Store>,
    },
}

impl Role {
    /// The request handler's view of this role ([`Core::mode`]).
    fn mode(&self) -> Mode {
        match self {
            Role::Master(_) => Mode::Master,
            Role::Standby(_) => Mode::Slave { master: None },
            Role::Slave { master, .. } => Mode::Slave {
                master: Some(master.clone()),
            },
        }
    }

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
    fn describe(&self, now_ms: u64) -> String {
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
            Role::Slave {
                participant,
                master,
                ..
            } => {
                let link = match participant.link() {
                    LinkState::Down => "down",
                    LinkState::Connecting => "connecting",
                    LinkState::CatchingUp(_) => "catching_up",
                    LinkState::Following(_) => "following",
                    LinkState::Diverged(_) => "diverged",
                };
                text.push_str("role slave\n");
                text.push_str(&format!("master {master}\n"));
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
    /// Changed only by [`Server::set_role`], which keeps `core.mode` in step.
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

impl Server {
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
        match &self.role {
            Role::Master(_) => format!(
                "dkvs-server ready: master serving {transports} on {}",
                self.addr
            ),
            Role::Slave { master, .. } => format!(
                "dkvs-server ready: slave of {master} serving {transports} on {}",
                self.addr
            ),
            // Only failover makes a standby, answered above.
            Role::Standby(_) => format!(
                "dkvs-server ready: standby serving {transports} on {}",
                self.addr
            ),
        }
    }

    /// Change this server's role, and with it the request handler's view of
    /// it ([`Core::mode`]): the one place either is set after [`Server::bind`].
    fn set_role(&mut self, role: Role) {
        self.core.mode = role.mode();
        self.role = role;
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

/// Register a stream living at slab `key` for both directions, once: with
/// edge-triggered readiness no re-registration is ever needed.
fn register_link(poll: &Poll, stream: &mut TcpStream, key: usize) -> io::Result<()> {
    poll.registry().register(
        stream,
        Token(key + FIRST_LINK),
        Interest::READABLE | Interest::WRITABLE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ParticipantConfig;

    #[test]
    fn the_handler_sees_the_role_it_is_derived_from() {
        let master = Role::Master(Box::new(Coordinator::new(CoordinatorConfig::default(), 0)));
        assert_eq!(master.mode(), Mode::Master);
        let standby = Role::Standby(Box::new(failover::empty_standby()));
        assert_eq!(standby.mode(), Mode::Slave { master: None });
        let slave = Role::Slave {
            participant: Box::new(Participant::recover(ParticipantConfig::default(), 0, 0)),
            master_addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
            master: "m:7000".into(),
            staging: None,
        };
        assert_eq!(
            slave.mode(),
            Mode::Slave {
                master: Some("m:7000".into())
            }
        );
    }
}
