//! `dkvs-server`: serve the dkvs protocol over TCP and UDP.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dkvs::logging::{self, LogLevel};
use dkvs::protocol::DEFAULT_MAX_VALUE_BYTES;
use dkvs::server::announce::AnnounceAddr;
use dkvs::server::{
    Config, DEFAULT_INPUT_BUDGET_BYTES, FailoverConfig, MAX_VALUE_BYTES_LIMIT, Server,
    UdpLimitScope,
};
use dkvs::wal::FsyncPolicy;
use log::{error, info};

/// A replicated key-value store server: one thread, one reactor, TCP and UDP on one port.
#[derive(Parser, Debug)]
#[command(name = "dkvs-server", version, about)]
struct Args {
    /// Address to bind.
    #[arg(short = 's', long = "host", default_value = "127.0.0.1")]
    host: String,
    /// Port for both TCP and UDP (0 picks a free port and prints it).
    #[arg(short = 'p', long = "port", default_value_t = 9099)]
    port: u16,
    /// Serve TCP only.
    #[arg(short = 't', long = "tcp", conflicts_with = "udp")]
    tcp: bool,
    /// Serve UDP only.
    #[arg(short = 'u', long = "udp")]
    udp: bool,
    /// Run as a slave of the master at HOST (registers with it and follows its writes).
    #[arg(short = 'm', long = "mhost")]
    mhost: Option<String>,
    /// Address other nodes and clients reach this server by (HOST:PORT, IPv6
    /// in brackets): what a slave announces to its master, and what a leader
    /// records in etcd (there an IP address). Default: the bound address, or
    /// when bound to 0.0.0.0/:: this end of the link to the master (to etcd
    /// for a leader). 0.0.0.0 and :: are refused.
    #[arg(long = "announce-addr", value_parser = AnnounceAddr::parse)]
    announce_addr: Option<AnnounceAddr>,
    /// The master's port (1 to 65535).
    #[arg(
        short = 'q',
        long = "qport",
        default_value_t = 9099,
        requires = "mhost",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    qport: u16,
    /// Master: milliseconds a slave has to vote or acknowledge before it is evicted (1 to 60000).
    #[arg(long = "tpc-timeout-ms", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    tpc_timeout_ms: u64,
    /// Master: evict a slave that keeps a transaction waiting this many
    /// milliseconds after every other slave voted, so one slow disk or CPU
    /// cannot set the cluster's pace; it rejoins by catch-up, after a
    /// probation that doubles with each such eviction (0: off).
    #[arg(long = "max-slave-lag-ms", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    max_slave_lag_ms: u64,
    /// Slave: serve reads only while following the master within a lease of
    /// this many milliseconds, renewed by every heartbeat (every 100 ms): a
    /// read is never older than that, and an evicted or cut-off slave stops
    /// serving reads before the master writes without it. Outside the lease
    /// reads are redirected to the master. The master grants at most
    /// --tpc-timeout-ms (10 to 60000).
    #[arg(long = "slave-read-lease-ms", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(10..=60_000))]
    slave_read_lease_ms: u32,
    /// Slave: serve reads whatever the state of the link to the master, as
    /// Redis's replica-serve-stale-data does: they may then be arbitrarily old.
    #[arg(long = "serve-stale-reads")]
    serve_stale_reads: bool,
    /// Master: refuse writes while fewer than N slaves are in sync (0 to 64, the link cap).
    #[arg(long = "min-slaves", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=64))]
    min_slaves: u64,
    /// Master: MiB of recent writes kept so a briefly disconnected slave can
    /// catch up without a full snapshot (0 to 4096).
    #[arg(long = "repl-backlog-mb", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(0..=4096))]
    repl_backlog_mb: u64,
    /// Master: replicated transactions (batches of writes) in flight at once
    /// (1 to 1000000). At the bound the server stops reading writes from
    /// clients until one ends (backpressure); no write is refused for it.
    #[arg(long = "max-inflight-txns", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_inflight_txns: u64,
    /// Master: MiB that snapshots being streamed to slaves may hold in shards
    /// copied on write (1 to 1048576). Slaves joining at about the same time
    /// share one snapshot. At the cap the snapshot stops taking late joiners
    /// and then its slowest receiver is disconnected (logged); that slave
    /// registers again after its reconnect backoff. No write is refused for it.
    #[arg(long = "max-snapshot-memory-mb", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    max_snapshot_memory_mb: u64,
    /// Client connections open at once; more are accepted and closed at once.
    #[arg(long = "max-connections", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// Close a client connection that sent nothing and is owed nothing for S
    /// seconds (0 = never; at most 30 days).
    #[arg(long = "timeout", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=2_592_000))]
    timeout: u64,
    /// Close a client connection whose frame, once begun, has not fully arrived
    /// within MS milliseconds (100 to 600000).
    #[arg(long = "frame-timeout-ms", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    frame_timeout_ms: u64,
    /// UDP replies per second to one source address (0 = unlimited; not
    /// applied to loopback sources unless --udp-limits always).
    #[arg(long = "udp-rate-limit", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    udp_rate_limit: u32,
    /// Which UDP sources get the 3x amplification limit and the rate limit:
    /// `auto` (all but loopback) or `always` (loopback too, for testing).
    #[arg(long = "udp-limits", default_value = "auto", value_parser = UdpLimitScope::parse)]
    udp_limits: UdpLimitScope,
    /// MiB that all client connections together may hold in partial frames
    /// (1 to 65536); a connection whose frame does not fit is closed.
    #[arg(long = "partial-frame-budget-mb", default_value_t = (DEFAULT_INPUT_BUDGET_BYTES >> 20) as u64,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    partial_frame_budget_mb: u64,
    /// Log level: error, info or debug (also 0, 1, 2).
    #[arg(short = 'l', long = "log", default_value = "info", value_parser = LogLevel::parse)]
    log: LogLevel,
    /// Log to this file instead of standard error.
    #[arg(long = "logfile")]
    logfile: Option<PathBuf>,
    /// Largest value accepted, in bytes (1 to 536870912, 512 MiB).
    #[arg(long = "max-value-size", default_value_t = DEFAULT_MAX_VALUE_BYTES as u32,
          value_parser = clap::value_parser!(u32).range(1..=MAX_VALUE_BYTES_LIMIT as i64))]
    max_value_size: u32,
    /// Data directory: write-ahead log, snapshots and node id. Locked while the
    /// server runs; created if missing.
    #[arg(short = 'd', long = "data-dir", default_value = "./dkvs-data")]
    data_dir: PathBuf,
    /// When a write counts as durable: always (fsync before the reply; nothing
    /// acknowledged is lost even on power loss), batch (fsync about once a second:
    /// a machine crash loses up to ~1 s), never (the OS decides; a process crash
    /// loses nothing, a machine crash may).
    #[arg(long = "fsync", default_value = "always", value_parser = FsyncPolicy::parse)]
    fsync: FsyncPolicy,
    /// Snapshot the store (and delete the log it covers) once the log has grown
    /// by this many MiB.
    #[arg(long = "snapshot-log-mb", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    snapshot_log_mb: u64,
    /// Slave: if the master's history differs from the data held here, replace
    /// this data with the master's snapshot. Without it such a slave keeps its
    /// data, applies nothing, and the master's STATS shows it as diverged.
    #[arg(long = "resync-discard-data")]
    resync_discard_data: bool,
    /// Recover the data directory, cutting the log at its first damaged record
    /// (the cut bytes are kept beside it), then exit without serving.
    #[arg(long = "repair")]
    repair: bool,
    /// Answer the Redis protocol (RESP2/RESP3) on the TCP port: on or off.
    #[arg(long = "resp", default_value = "on", value_parser = ["on", "off"])]
    resp: String,
    /// Slave: forward RESP writes (SET, DEL, INCR, MSET, EXPIRE, FLUSHDB, a
    /// MULTI/EXEC with writes, ...) to the master over one pipelined RESP
    /// connection and answer each with the master's reply, once this slave
    /// has applied the write (or after 1 s), instead of answering -READONLY.
    /// A write whose link dropped before its reply answers "-ERR forwarded
    /// write outcome unknown"; one never sent "-MASTERDOWN". Binary-protocol
    /// writes are still answered REDIRECT. Does nothing on a master.
    #[arg(long = "forward-writes")]
    forward_writes: bool,
    /// File holding the master's client password (its --requirepass-file;
    /// one trailing newline is dropped), sent as AUTH on the link for
    /// --forward-writes (as Redis's masterauth).
    #[arg(long = "masterauth-file", requires = "forward_writes")]
    masterauth_file: Option<std::path::PathBuf>,
    /// Fail over automatically through etcd at these endpoints (comma-separated
    /// http://host:port, etcd's v3 gateway). Every server of the cluster gets the
    /// same --etcd and --cluster and no -m: etcd elects the master, and a slave
    /// recorded as holding every acknowledged write takes over when it dies.
    #[arg(
        long = "etcd",
        value_delimiter = ',',
        requires = "cluster",
        conflicts_with = "mhost"
    )]
    etcd: Vec<String>,
    /// Name of the cluster in etcd (its keys live under /dkvs/NAME/).
    #[arg(long = "cluster", requires = "etcd", value_parser = parse_cluster)]
    cluster: Option<String>,
    /// File holding the cluster's shared secret (at least 16 bytes; whitespace
    /// around it is ignored). Master and slaves prove to each other that they
    /// know it (HMAC-SHA256 challenge-response) before any replication message
    /// passes. Without it, replication links are accepted from loopback only.
    #[arg(long = "cluster-secret-file")]
    cluster_secret_file: Option<std::path::PathBuf>,
    /// File holding the client password (one trailing newline is dropped).
    /// Clients must then authenticate (binary AUTH, RESP AUTH or HELLO … AUTH)
    /// before anything but PING; over UDP only PING is served. Replication
    /// links are not affected (see --cluster-secret-file).
    #[arg(long = "requirepass-file")]
    requirepass_file: Option<std::path::PathBuf>,
    /// Protected mode: bound to a non-loopback address without
    /// --requirepass-file, refuse clients that connect from non-loopback
    /// addresses (RESP `-DENIED`, binary status DENIED), as Redis does.
    #[arg(long = "protected-mode", default_value = "yes", value_parser = ["yes", "no"])]
    protected_mode: String,
    /// TTL of the master's lease in etcd: a dead master is replaced about this
    /// long after it stopped renewing it. etcd counts in whole seconds (and at
    /// least its minimum, 2 s by default).
    #[arg(long = "lease-ttl-ms", default_value_t = 3_000,
          value_parser = clap::value_parser!(u64).range(1_000..=60_000))]
    lease_ttl_ms: u64,
}

/// A cluster name: what fits in an etcd key segment readably.
fn parse_cluster(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 {
        return Err("a cluster name has 1 to 64 characters".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err("a cluster name uses only letters, digits, '-', '_' and '.'".into());
    }
    Ok(s.to_string())
}

/// The password in `path`; warns (never logs it) when others may read the file.
fn read_password(path: &std::path::Path) -> Result<dkvs::server::auth::Password, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            log::warn!(
                "--requirepass-file {}: readable or writable by group or others (mode {:o}); \
                 chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
    dkvs::server::auth::Password::from_file_contents(&bytes)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(addr) = &args.announce_addr
        && !args.etcd.is_empty()
        && addr.socket_addr().is_none()
    {
        // Nodes read the leader's address from etcd without a DNS lookup.
        eprintln!(
            "error: invalid value '{addr}' for '--announce-addr <ANNOUNCE_ADDR>': \
             with --etcd the announced host must be an IP address"
        );
        return ExitCode::from(2);
    }
    if let Err(e) = logging::init(args.log, args.logfile.as_deref()) {
        eprintln!("dkvs-server: {e}");
        return ExitCode::from(1);
    }
    if args.announce_addr.is_some() && args.mhost.is_none() && args.etcd.is_empty() {
        log::warn!(
            "--announce-addr has no effect on a master without --etcd: it announces nothing"
        );
    }
    let cluster_secret = match &args.cluster_secret_file {
        None => None,
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| dkvs::protocol::peer_auth::Secret::from_file_contents(&bytes))
        {
            Ok(secret) => Some(secret),
            Err(e) => {
                eprintln!("dkvs-server: --cluster-secret-file {}: {e}", path.display());
                return ExitCode::from(1);
            }
        },
    };
    let password = match &args.requirepass_file {
        None => None,
        Some(path) => match read_password(path) {
            Ok(password) => Some(password),
            Err(e) => {
                eprintln!("dkvs-server: --requirepass-file {}: {e}", path.display());
                // As clap does for any other bad flag.
                return ExitCode::from(2);
            }
        },
    };
    let master_password = match &args.masterauth_file {
        None => None,
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| dkvs::client::ClientPassword::from_file_contents(&bytes))
        {
            Ok(dkvs::client::ClientPassword(bytes)) => Some(bytes),
            Err(e) => {
                eprintln!("dkvs-server: --masterauth-file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let config = Config {
        host: args.host,
        port: args.port,
        tcp: !args.udp,
        udp: !args.tcp,
        max_value_bytes: args.max_value_size as usize,
        master: args.mhost.map(|host| (host, args.qport)),
        tpc_timeout_ms: args.tpc_timeout_ms,
        max_slave_lag_ms: args.max_slave_lag_ms,
        slave_read_lease_ms: if args.serve_stale_reads {
            0
        } else {
            args.slave_read_lease_ms
        },
        // Bounded by the parser: the casts cannot truncate.
        min_slaves: args.min_slaves as usize,
        repl_backlog_bytes: (args.repl_backlog_mb as usize) << 20,
        max_connections: args.max_connections as usize,
        max_inflight_txns: args.max_inflight_txns as usize,
        max_snapshot_bytes: (args.max_snapshot_memory_mb as usize) << 20,
        idle_timeout_ms: args.timeout * 1000,
        frame_timeout_ms: args.frame_timeout_ms,
        partial_frame_budget_bytes: (args.partial_frame_budget_mb as usize) << 20,
        udp_limits: args.udp_limits,
        udp_rate_per_sec: args.udp_rate_limit,
        data_dir: args.data_dir,
        fsync: args.fsync,
        snapshot_log_bytes: args.snapshot_log_mb << 20,
        resync_discard_data: args.resync_discard_data,
        resp: args.resp == "on",
        forward_writes: args.forward_writes,
        master_password,
        cluster_secret,
        password,
        protected_mode: args.protected_mode == "yes",
        announce_addr: args.announce_addr,
        failover: args.cluster.map(|cluster| FailoverConfig {
            endpoints: args.etcd,
            cluster,
            lease_ttl_ms: args.lease_ttl_ms,
        }),
    };
    if args.repair {
        return match dkvs::server::repair(&config) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dkvs-server: {e}");
                ExitCode::from(1)
            }
        };
    }
    let mut server = match Server::bind(&config) {
        Ok(server) => server,
        Err(e) => {
            error!("{e}");
            eprintln!("dkvs-server: {e}");
            return ExitCode::from(1);
        }
    };
    let ready = server.describe();
    info!("{ready}");
    // Scripts and tests wait for this line (and read the port from it when -p 0).
    println!("{ready}");
    let _ = std::io::stdout().flush();
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("dkvs-server: {e}");
            ExitCode::from(1)
        }
    }
}
