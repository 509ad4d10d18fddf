//! Binding: from a [`Config`] to a server with its sockets bound, its data
//! directory recovered and its role chosen; and the address it announces to
//! the others.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use log::{info, warn};
use mio::net::{TcpListener, UdpSocket};
use mio::{Interest, Poll, Waker};
use slab::Slab;

use crate::replication::{
    CommitLog, Coordinator, CoordinatorConfig, Participant, ParticipantConfig,
};
use crate::wal::Wal;

use super::failover::{Failover, Standby};
use super::handler::{self, Core};
use super::limits::{self, InputBudget, Timeouts};
use super::peer;
use super::snapshots::SnapshotSet;
use super::timers::Timers;
use super::udp::UdpService;
use super::{Config, LISTENER, Role, Server, ServerError, UDP, WAKER, auth, forward};

/// Attempts at finding a port free for both TCP and UDP when asked for port 0.
const PORT_ZERO_ATTEMPTS: usize = 32;

/// What this node tells others to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Announce {
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
        let role = match &config.master {
            _ if config.failover.is_some() => {
                // The election decides: lead, or follow whom etcd names.
                let standby = Standby {
                    history_id: replay.history_id,
                    prepared: replay.prepared.clone(),
                    commits: replay.commits.clone(),
                    floor: replay.floor,
                    seen: replay.max_seq,
                };
                Role::Standby(Box::new(standby))
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
                Role::Master(Box::new(coordinator))
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
                Role::Slave {
                    participant: Box::new(participant),
                    master_addr,
                    master: format!("{host}:{port}"),
                    staging: None,
                }
            }
        };
        let mode = role.mode();
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

    /// With [`Announce::LinkLocal`], announce the link's local address (with
    /// the bound port) in the REGISTER that follows; said in the log when it
    /// changes.
    pub(super) fn announce_link_local(&mut self, local: io::Result<SocketAddr>) {
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
}

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
pub(super) fn announced(announce: &Announce, bound: SocketAddr) -> String {
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
