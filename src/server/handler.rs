//! Executing one client request against the server's state.
//!
//! Reads are answered at once. On a master, writes join this loop
//! iteration's batch (one 2PC transaction) and are answered when it is
//! decided; on a slave they are answered with a redirect to the master.
//! Shared by the TCP and UDP paths so both behave identically.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use crate::protocol::peer::{OpKind, WriteOp};
use crate::protocol::resp::Encoder;
use crate::protocol::txn::{Check, Txn, TxnWrite};
use crate::protocol::{EXPECT_ABSENT, Opcode, ProtocolError, Request, Status, encode_response};
use crate::replication::{ClientRef, ClientWrite};
use crate::store::Store;

use super::auth::{
    self, DeniedLog, NO_PASSWORD_MESSAGE, NOAUTH_MESSAGE, Password, WRONG_PASSWORD_MESSAGE,
};
use super::forward::Forwarder;
use super::stats::Stats;
use super::waiting::WaitingTable;

/// Largest encoded size of one transaction's writes; more writes wait for
/// the next one, so that a PREPARE stays well inside a peer frame.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// What one write adds to a batch besides its key and value (its encoding, roughly).
const BATCH_BYTES_PER_WRITE: usize = 32;

/// Where the reply to a pending write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyTarget {
    /// A TCP connection, named by slab key and a never-reused id.
    Tcp {
        /// Slab key.
        key: usize,
        /// Connection id; a reused slab key gets a new one.
        conn_id: u64,
    },
    /// A UDP sender; the reply also fills the retry cache entry.
    Udp {
        /// Sender address.
        from: SocketAddr,
        /// Fingerprint of the request datagram.
        fingerprint: u64,
    },
    /// Nobody: the master's own writes (deleting expired keys).
    Nobody,
}

/// A write waiting for its transaction's outcome.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// Where the reply goes.
    pub target: ReplyTarget,
    /// The request's id.
    pub request_id: u32,
    /// The request's opcode byte.
    pub op: u8,
    /// A RESP command's reply, made once all its writes are applied; `None` for the binary protocol.
    pub resp: Option<RespPending>,
    /// Binary protocol: writes whose result has not come yet (several for a TXN).
    pub remaining: u32,
    /// Binary protocol: the highest version among the results seen so far.
    pub version: u64,
}

/// How the RESP reply of a write command is made from its writes' results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespWriteReply {
    /// `+OK`.
    Ok,
    /// The number of writes that changed something (DEL).
    Changed,
    /// An integer known when the command was executed (INCR, APPEND, SETNX, MSETNX).
    Int(i64),
    /// A bulk string or null known when the command was executed (SET ... GET, GETSET).
    Bulk(Option<Vec<u8>>),
    /// `+OK` if the (conditional) write found its key, else null (SET ... XX).
    OkOrNull,
}

/// A RESP write command waiting for the outcome of its writes, all in one transaction.
#[derive(Debug, Clone)]
pub struct RespPending {
    /// What to answer.
    pub reply: RespWriteReply,
    /// The connection's protocol version when the command was sent.
    pub encoder: Encoder,
    /// Writes whose result has not come yet.
    pub remaining: u32,
    /// Writes that changed something.
    pub changed: u32,
}

/// The reply of a write whose outcome is known, ready to encode.
#[derive(Debug)]
pub enum Completion<'m> {
    /// A binary-protocol response.
    Binary {
        /// Opcode byte.
        op: u8,
        /// Request id.
        request_id: u32,
        /// Outcome.
        status: Status,
        /// The key's new version.
        version: u64,
        /// Error text, if any.
        message: &'m [u8],
    },
    /// A RESP reply.
    Resp {
        /// The command's pending state.
        pending: RespPending,
        /// Set when replication failed the write: status and message.
        failure: Option<(Status, &'m [u8])>,
    },
}

impl Completion<'_> {
    /// The binary request id (0 for RESP, which has none).
    pub fn request_id(&self) -> u32 {
        match self {
            Completion::Binary { request_id, .. } => *request_id,
            Completion::Resp { .. } => 0,
        }
    }

    /// Append the reply to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Completion::Binary {
                op,
                request_id,
                status,
                version,
                message,
            } => encode_response(out, *op, *status, *request_id, *version, message),
            Completion::Resp { pending, failure } => {
                let enc = pending.encoder;
                if let Some((status, message)) = failure {
                    let text = String::from_utf8_lossy(message);
                    // Redis's code for "not enough replicas"; an abort has no Redis analogue.
                    let code = if *status == Status::Unavailable {
                        "NOREPLICAS"
                    } else {
                        "ERR"
                    };
                    enc.error(out, &format!("{code} {text}"));
                    return;
                }
                match &pending.reply {
                    RespWriteReply::Ok => enc.ok(out),
                    RespWriteReply::Changed => enc.int(out, i64::from(pending.changed)),
                    RespWriteReply::Int(n) => enc.int(out, *n),
                    RespWriteReply::Bulk(value) => enc.opt_bulk(out, value.as_deref()),
                    RespWriteReply::OkOrNull if pending.changed > 0 => enc.ok(out),
                    RespWriteReply::OkOrNull => enc.null(out),
                }
            }
        }
    }
}

/// The replication state as INFO, ROLE and WAIT report it, refreshed by the reactor.
#[derive(Debug, Clone, Default)]
pub struct ReplicationInfo {
    /// Master: registered slaves.
    pub slaves: Vec<SlaveSummary>,
    /// Master: slaves in the in-sync set.
    pub in_sync: usize,
    /// Slave: whether the link to the master follows it.
    pub master_link_up: bool,
    /// Slave: the last transaction applied.
    pub applied_seq: u64,
    /// Failover through etcd: the epoch, the leader's address and the recorded in-sync set.
    pub failover: Option<(u64, String, String)>,
}

/// One slave as the master sees it.
#[derive(Debug, Clone)]
pub struct SlaveSummary {
    /// The slave's client address (`host:port`).
    pub addr: String,
    /// Its state name (`in-sync`, `syncing-log`, ...).
    pub state: &'static str,
    /// The last transaction it reported applied.
    pub applied_seq: u64,
    /// Transactions it is behind.
    pub lag: u64,
}

/// A point in the batch to roll back to ([`Core::batch_mark`]).
#[derive(Debug, Clone, Copy)]
pub struct BatchMark {
    len: usize,
    bytes: usize,
    next_client_ref: u64,
}

/// Whether a key written by a pending write can be read from the current
/// batch, or its latest value is in a transaction still in flight.
#[derive(Debug, PartialEq, Eq)]
pub enum Latest<'a> {
    /// The key's latest value and deadline (`None`: absent), including writes
    /// not yet applied.
    Known(Option<(&'a [u8], Option<u64>)>),
    /// A transaction in flight wrote it: wait until it is decided.
    InFlight,
}

/// What the master knows of a key's version for a compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// No write of it is undecided: its version (`None`: absent).
    Version(Option<u64>),
    /// A write of it (or a FLUSHDB) is still in the batch or in flight.
    Undecided,
}

/// The result of executing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The reply is in the output buffer.
    Answered,
    /// The write joined the batch; its reply comes with the transaction's outcome.
    Pending(ClientRef),
    /// A compare-and-set or TXN condition reads a key that a write not yet
    /// decided changes: nothing was done; execute the request again once a
    /// write was decided (TCP), or let the client retry (UDP).
    WaitKey,
}

/// Whether a server may serve reads of data now: a slave only while it
/// follows its master within a read lease (docs/PROTOCOL.md §9.7), so that
/// none of its reads misses a write acknowledged longer than the lease ago,
/// and none shows a state older than one it showed before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadGate {
    /// Serve them: a master, or a slave run with `--serve-stale-reads`.
    Open,
    /// Serve them until then: a slave's read lease.
    Until(Instant),
    /// Refuse them: a slave that is not following its master, or whose
    /// master has not renewed its lease.
    Closed,
}

impl ReadGate {
    /// Whether reads may be served now.
    pub fn is_open(&self) -> bool {
        match self {
            ReadGate::Open => true,
            ReadGate::Until(until) => Instant::now() < *until,
            ReadGate::Closed => false,
        }
    }
}

/// What a request needs to know of this server's place in replication:
/// whether it takes writes, and where a slave sends the clients it cannot serve.
///
/// The server's role (`Role` in the reactor: master, standby or slave) is the
/// one source of truth; this is only its view for the request handler.
/// `Role::mode` derives it, and `Server::set_role` alone stores it in
/// [`Core::mode`], together with the role itself: a role change (a
/// promotion, a step-down, following a new master) cannot update one and
/// forget the other. Debug builds check every turn that the two agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Takes writes and coordinates them.
    Master,
    /// Serves reads; redirects writes to its master.
    Slave {
        /// The master's client address (`host:port`); `None` for a standby,
        /// which waits for the election (failover through etcd) to name one.
        master: Option<String>,
    },
}

/// The state every request may touch.
#[derive(Debug)]
pub struct Core {
    /// The key-value map.
    pub store: Store,
    /// Sequence number of the last applied commit.
    pub commit_seq: u64,
    /// Counters reported by STATS.
    pub stats: Stats,
    /// Largest value accepted.
    pub max_value_bytes: usize,
    /// Master or slave.
    pub mode: Mode,
    /// Writes received in this loop iteration, in arrival order.
    pub batch: Vec<ClientWrite>,
    batch_bytes: usize,
    /// Connections (slab keys) that stopped reading because the batch was full
    /// or writes were paused.
    pub batch_waiters: Vec<usize>,
    /// The master's transactions in flight are at their bound: no write joins
    /// the batch (the connection stops reading) until one ends. Backpressure,
    /// where refusing the write would fail a client for the master's being busy.
    pub writes_paused: bool,
    /// The UDP socket stopped reading because the batch was full.
    pub udp_waiting: bool,
    /// The UDP socket stopped reading after repeated receive errors; read it again soon.
    pub udp_retry: bool,
    /// Writes are refused with this reason (the write-ahead log failed): the
    /// server cannot keep what it would acknowledge. Reads go on.
    pub write_refusal: Option<String>,
    /// Why reads of data are refused, if they are (a master whose leadership
    /// lease is not known valid must not serve what may be stale).
    pub read_refusal: Option<String>,
    /// Whether a slave's reads are within its read lease.
    pub read_gate: ReadGate,
    /// Reply routes of writes handed to the coordinator and not yet answered.
    pub waiting: WaitingTable,
    /// Answer the Redis protocol on TCP connections whose first byte says so.
    pub resp_enabled: bool,
    /// The write-ahead log's `--fsync` policy, for INFO and CONFIG GET.
    pub fsync_policy: &'static str,
    /// Replication state for the RESP commands that report it.
    pub replication: ReplicationInfo,
    /// Key hash -> the last write to it handed out and maybe not yet applied (it is
    /// applied once its handle left `waiting`). Read-modify-write commands (INCR, ...)
    /// compute on the master against the store plus these pending writes. The
    /// hash is the store's [`Store::key_hash`], a keyed PRF: two keys that
    /// collided here would share one entry, and nobody can build such keys.
    /// The same hash applies the write ([`ClientWrite::key_hash`]).
    last_write: HashMap<u64, ClientRef, foldhash::fast::RandomState>,
    /// The last FLUSHDB handed out and maybe not yet applied.
    last_clear: Option<ClientRef>,
    /// Connections waiting for a transaction in flight to be decided before a
    /// read-modify-write command can read its key; resumed on the next reply.
    pub key_waiters: Vec<usize>,
    /// RESP commands executed.
    pub resp_commands: u64,
    /// The TCP port served (INFO reports it).
    pub tcp_port: u16,
    /// The shard the expiry sweep looks at next.
    pub(super) sweep_cursor: usize,
    /// Where in that shard it stopped (a step may end inside a shard).
    pub(super) sweep_pos: usize,
    /// `--requirepass-file`: clients must AUTH before anything but PING.
    pub password: Option<Password>,
    /// Protected mode applies: bound to a non-loopback address, no password,
    /// not turned off. Clients from non-loopback addresses are refused.
    pub protected: bool,
    /// Rate limit of the protected-mode log.
    pub denied_log: DeniedLog,
    /// `--forward-writes`: a slave's RESP writes sent to its master.
    pub forward: Forwarder,
    /// Flags CONFIG GET reports that nothing else in here needs.
    pub reported: ReportedConfig,
}

/// Flags as given, for CONFIG GET (RESP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedConfig {
    /// `--protected-mode` (whether or not it applies to the bound address,
    /// as Redis's `protected-mode` reports the setting).
    pub protected_mode: bool,
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--timeout`, seconds.
    pub idle_timeout_s: u64,
}

impl Default for ReportedConfig {
    fn default() -> ReportedConfig {
        // The flags' defaults.
        ReportedConfig {
            protected_mode: true,
            max_connections: 10_000,
            idle_timeout_s: 0,
        }
    }
}

impl Core {
    /// Empty state with the given value limit.
    pub fn new(max_value_bytes: usize, mode: Mode) -> Core {
        Core::recovered(max_value_bytes, mode, Store::new(), 0)
    }

    /// State around a store recovered from the write-ahead log at `commit_seq`.
    pub fn recovered(max_value_bytes: usize, mode: Mode, store: Store, commit_seq: u64) -> Core {
        Core {
            store,
            commit_seq,
            write_refusal: None,
            read_refusal: None,
            read_gate: ReadGate::Open,
            stats: Stats::default(),
            max_value_bytes,
            mode,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_waiters: Vec::new(),
            writes_paused: false,
            udp_waiting: false,
            udp_retry: false,
            waiting: WaitingTable::default(),
            resp_enabled: true,
            fsync_policy: "always",
            replication: ReplicationInfo::default(),
            last_write: HashMap::default(),
            last_clear: None,
            key_waiters: Vec::new(),
            resp_commands: 0,
            tcp_port: 0,
            sweep_cursor: 0,
            sweep_pos: 0,
            password: None,
            protected: false,
            denied_log: DeniedLog::default(),
            forward: Forwarder::default(),
            reported: ReportedConfig::default(),
        }
    }

    /// A reply handle no write uses (a forwarded command's slot in its
    /// connection's queue of replies).
    pub fn new_client_ref(&mut self) -> ClientRef {
        self.waiting.handle_without_slot()
    }

    /// Whether RESP writes go to the master (a slave with `--forward-writes`)
    /// instead of being answered `READONLY`.
    pub fn forwards_writes(&self) -> bool {
        self.forward.enabled && matches!(self.mode, Mode::Slave { .. })
    }

    /// Queue `ops` as one command's writes: they join the current batch together,
    /// so they land in one transaction, all or nothing. Returns the reply handle.
    pub fn submit(
        &mut self,
        ops: impl IntoIterator<Item = WriteOp>,
        target: ReplyTarget,
        request_id: u32,
        op: u8,
        resp: Option<RespPending>,
    ) -> ClientRef {
        let client = self.waiting.insert(Waiting {
            target,
            request_id,
            op,
            resp,
            remaining: 0,
            version: 0,
        });
        let mut count = 0u32;
        for write in ops {
            count += 1;
            // Hashed once here, for `last_write` and to apply the write.
            let key_hash = self.store.key_hash(write.key());
            if write.kind == OpKind::Clear {
                self.last_clear = Some(client);
            } else {
                self.last_write.insert(key_hash, client);
            }
            self.batch_bytes += write.key().len() + write.value().len() + BATCH_BYTES_PER_WRITE;
            // Every op of a command carries the same handle; its reply waits for all.
            self.batch.push(ClientWrite {
                client,
                op: write,
                key_hash,
            });
        }
        if let Some(waiting) = self.waiting.get_mut(client) {
            waiting.remaining = count;
        }
        client
    }

    /// The version of `key` (`None`: absent) if no write of it, and no FLUSHDB,
    /// is still undecided; [`Settled::Undecided`] while one is (compare-and-set
    /// must wait: the master decides conditions against settled state only, so
    /// the plain writes it replicates apply to exactly the state it checked).
    pub fn settled_version(&self, key: &[u8]) -> Settled {
        if self.undecided(key) {
            return Settled::Undecided;
        }
        Settled::Version(self.store.get(key).map(|(_, version)| version))
    }

    /// Whether a write of `key` (or a FLUSHDB) handed out is not applied yet.
    fn undecided(&self, key: &[u8]) -> bool {
        let hash = self.store.key_hash(key);
        let pending_key = self
            .last_write
            .get(&hash)
            .is_some_and(|&c| self.waiting.contains(c));
        let pending_clear = self.last_clear.is_some_and(|c| self.waiting.contains(c));
        pending_key || pending_clear
    }

    /// The latest value of `key` on a master, counting writes not yet applied.
    /// (Inside EXEC, commands read through `ExecView` instead.)
    pub fn latest(&self, key: &[u8]) -> Latest<'_> {
        if !self.undecided(key) {
            return Latest::Known(self.store.get_with_deadline(key));
        }
        // The current batch holds the newest writes; search it newest first. A
        // deadline change seen on the way applies to the value found below it.
        let mut newer_deadline: Option<Option<u64>> = None;
        let now = self.store.now_ms();
        for write in self.batch.iter().rev() {
            let op = &write.op;
            let (value, deadline) = match op.kind {
                OpKind::Clear => return Latest::Known(None),
                _ if op.key() != key => continue,
                OpKind::Put => (op.value(), None),
                OpKind::PutExpiring => (op.stored_value(), Some(op.deadline_ms())),
                OpKind::Delete => return Latest::Known(None),
                OpKind::Expire => {
                    let d = op.deadline_ms();
                    newer_deadline.get_or_insert((d != 0).then_some(d));
                    continue;
                }
                // Its effect depends on what came before: let it be decided first.
                OpKind::Update => return Latest::InFlight,
            };
            let deadline = newer_deadline.unwrap_or(deadline);
            // A pending write whose deadline has passed leaves the key absent.
            if deadline.is_some_and(|d| d <= now) {
                return Latest::Known(None);
            }
            return Latest::Known(Some((value, deadline)));
        }
        Latest::InFlight
    }

    /// Where the batch and the reply handles stand now, to undo what follows.
    pub fn batch_mark(&self) -> BatchMark {
        BatchMark {
            len: self.batch.len(),
            bytes: self.batch_bytes,
            next_client_ref: self.waiting.mark(),
        }
    }

    /// Take back every write submitted since `mark` (an EXEC that cannot run
    /// whole). Their handles leave `waiting`, so their keys count as settled again.
    pub fn rollback(&mut self, mark: BatchMark) {
        self.batch.truncate(mark.len);
        self.batch_bytes = mark.bytes;
        self.waiting.forget_since(mark.next_client_ref);
    }

    /// The outcome of one write of `client` is known: the reply, once all its
    /// command's writes are known (or at once when replication failed it).
    pub fn finish<'m>(
        &mut self,
        client: ClientRef,
        status: Status,
        version: u64,
        message: &'m [u8],
    ) -> Option<(ReplyTarget, Completion<'m>)> {
        let waiting = self.waiting.get_mut(client)?;
        let applied = matches!(status, Status::Ok | Status::NotFound);
        if applied {
            if let Some(resp) = waiting.resp.as_mut() {
                resp.remaining = resp.remaining.saturating_sub(1);
                resp.changed += u32::from(status == Status::Ok);
                if resp.remaining > 0 {
                    return None;
                }
            } else {
                waiting.remaining = waiting.remaining.saturating_sub(1);
                waiting.version = waiting.version.max(version);
                if waiting.remaining > 0 {
                    return None;
                }
            }
        }
        let waiting = self.waiting.remove(client)?;
        if self.waiting.is_empty() {
            // Nothing is pending: every recorded write is applied.
            self.last_write.clear();
            self.last_clear = None;
        }
        let completion = match waiting.resp {
            Some(pending) => Completion::Resp {
                pending,
                failure: (!applied).then_some((status, message)),
            },
            // A committed TXN is OK at its version even if a delete found nothing.
            None if applied && waiting.op == Opcode::Txn as u8 => Completion::Binary {
                op: waiting.op,
                request_id: waiting.request_id,
                status: Status::Ok,
                version: waiting.version,
                message,
            },
            None => Completion::Binary {
                op: waiting.op,
                request_id: waiting.request_id,
                status,
                version,
                message,
            },
        };
        Some((waiting.target, completion))
    }

    /// Whether the current batch takes no more writes (full, or writes paused
    /// for the in-flight bound); callers stop taking writes until the reactor
    /// resumes them (`batch_waiters`, `udp_waiting`).
    pub fn batch_full(&self) -> bool {
        self.batch_bytes >= MAX_BATCH_BYTES || self.writes_paused
    }

    /// Take the batch for submission as one transaction.
    pub fn take_batch(&mut self) -> Vec<ClientWrite> {
        self.batch_bytes = 0;
        if self.last_write.len() > 4 * self.waiting.len() + 4096 {
            // Bound the map under constant load: forget writes already applied.
            let waiting = &self.waiting;
            self.last_write.retain(|_, c| waiting.contains(*c));
        }
        // The next batch starts with room for as many writes as this one had:
        // grown from empty it would be reallocated (and copied) about a dozen
        // times per turn under a pipelined load. The length is bounded by
        // MAX_BATCH_BYTES / BATCH_BYTES_PER_WRITE.
        let room = self.batch.len();
        std::mem::replace(&mut self.batch, Vec::with_capacity(room))
    }

    /// Execute `request`, appending an immediate reply to `out` or queueing the write.
    pub fn execute(
        &mut self,
        request: Request<'_>,
        request_id: u32,
        target: ReplyTarget,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let opcode = request.opcode();
        let outcome = self.execute_counted(request, request_id, target, out);
        // A request that waits runs again later: count it once, then.
        if outcome != Outcome::WaitKey {
            self.stats.count(opcode);
        }
        outcome
    }

    fn execute_counted(
        &mut self,
        request: Request<'_>,
        request_id: u32,
        target: ReplyTarget,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let op = request.opcode() as u8;
        // `deadline`: `None` for the plain writes; `Some` for PUTEX (always a
        // deadline) and EXPIRE (`Some(None)` removes it).
        let (kind, key, value, expect, deadline) = match request {
            Request::Get { key } => {
                if self.refuse_read(op, request_id, out) {
                    return Outcome::Answered;
                }
                match self.store.get(key) {
                    Some((value, version)) => {
                        encode_response(out, op, Status::Ok, request_id, version, value)
                    }
                    None => {
                        encode_response(out, op, Status::NotFound, request_id, 0, &[]);
                        self.expire_if_due(key);
                    }
                }
                return Outcome::Answered;
            }
            Request::Ttl { key } => {
                if self.refuse_read(op, request_id, out) {
                    return Outcome::Answered;
                }
                match self.store.get(key) {
                    Some((_, version)) => {
                        let deadline = self.store.deadline(key).unwrap_or(0).to_be_bytes();
                        encode_response(out, op, Status::Ok, request_id, version, &deadline)
                    }
                    None => encode_response(out, op, Status::NotFound, request_id, 0, &[]),
                }
                return Outcome::Answered;
            }
            Request::Auth { .. } => {
                // A connection authenticates in `Connection` (it holds the
                // state); what reaches here has no connection: UDP.
                let message = auth::NOAUTH_UDP_MESSAGE.as_bytes();
                encode_response(out, op, Status::NoAuth, request_id, 0, message);
                return Outcome::Answered;
            }
            Request::Ping => {
                encode_response(out, op, Status::Ok, request_id, self.commit_seq, b"PONG");
                return Outcome::Answered;
            }
            Request::Stats => {
                let mut text = self.stats.render(&self.store, self.commit_seq);
                if self.forward.enabled {
                    text.push_str(&self.forward.describe());
                }
                encode_response(
                    out,
                    op,
                    Status::Ok,
                    request_id,
                    self.commit_seq,
                    text.as_bytes(),
                );
                return Outcome::Answered;
            }
            Request::Put { key, value, expect } => (OpKind::Put, key, value, expect, None),
            Request::Update { key, value, expect } => (OpKind::Update, key, value, expect, None),
            Request::Delete { key, expect } => (OpKind::Delete, key, &[][..], expect, None),
            Request::PutExpiring {
                key,
                value,
                deadline_ms,
                expect,
            } => (
                OpKind::PutExpiring,
                key,
                value,
                expect,
                Some(Some(deadline_ms)),
            ),
            Request::Expire {
                key,
                deadline_ms,
                expect,
            } => (OpKind::Expire, key, &[][..], expect, Some(deadline_ms)),
            Request::Txn(txn) => {
                if self.refuse_write(op, request_id, out) {
                    return Outcome::Answered;
                }
                return self.execute_txn(txn, request_id, target, out);
            }
        };
        if self.refuse_write(op, request_id, out) {
            return Outcome::Answered;
        }
        if expect != 0 {
            let check = if expect == EXPECT_ABSENT {
                Check::Absent
            } else {
                Check::Version(expect)
            };
            match self.settled_version(key) {
                Settled::Undecided => return Outcome::WaitKey,
                Settled::Version(current) if !check.holds(current) => {
                    let current = current.unwrap_or(0);
                    encode_response(out, op, Status::VersionMismatch, request_id, current, &[]);
                    return Outcome::Answered;
                }
                Settled::Version(_) => {}
            }
        }
        if matches!(kind, OpKind::Update | OpKind::Delete | OpKind::Expire)
            && self.expired_but_held(key)
        {
            // These apply to the key as held, which an expired key still is
            // until its deletion commits: answer for the key as read.
            if self.settled_version(key) == Settled::Undecided {
                return Outcome::WaitKey;
            }
            encode_response(out, op, Status::NotFound, request_id, 0, &[]);
            self.expire_if_due(key);
            return Outcome::Answered;
        }
        let write = match (kind, deadline) {
            (OpKind::PutExpiring, Some(Some(at))) => WriteOp::put_expiring(key, value, at),
            (OpKind::Expire, Some(at)) => WriteOp::expire(key, at),
            _ => WriteOp::new(kind, key, value),
        };
        Outcome::Pending(self.submit(std::iter::once(write), target, request_id, op, None))
    }

    /// Answer a read this server may not serve now; say whether it did. A
    /// slave outside its read lease redirects to its master (where the read
    /// is fresh), or answers UNAVAILABLE while it knows none.
    fn refuse_read(&mut self, op: u8, request_id: u32, out: &mut Vec<u8>) -> bool {
        if let Some(why) = &self.read_refusal {
            encode_response(out, op, Status::Unavailable, request_id, 0, why.as_bytes());
            return true;
        }
        if self.read_gate.is_open() {
            return false;
        }
        self.stats.reads_refused += 1;
        match &self.mode {
            Mode::Slave {
                master: Some(master),
            } => {
                self.stats.redirects += 1;
                encode_response(out, op, Status::Redirect, request_id, 0, master.as_bytes());
            }
            _ => {
                let why = "this slave does not follow a master within its read lease \
                           (catching up, or no master elected yet); its reads could be stale";
                encode_response(out, op, Status::Unavailable, request_id, 0, why.as_bytes());
            }
        }
        true
    }

    /// Answer a write this server cannot take (a slave, a standby, or a failed log); say whether it did.
    fn refuse_write(&mut self, op: u8, request_id: u32, out: &mut Vec<u8>) -> bool {
        if let Mode::Slave { master: None } = &self.mode {
            let why = "no master is elected yet (failover through etcd in progress)";
            encode_response(out, op, Status::Unavailable, request_id, 0, why.as_bytes());
            return true;
        }
        if let Mode::Slave {
            master: Some(master),
        } = &self.mode
        {
            self.stats.redirects += 1;
            encode_response(out, op, Status::Redirect, request_id, 0, master.as_bytes());
            return true;
        }
        if let Some(why) = &self.write_refusal {
            encode_response(out, op, Status::Unavailable, request_id, 0, why.as_bytes());
            return true;
        }
        false
    }

    /// Check a TXN's conditions against settled state and submit its writes as
    /// one command, so they land in one transaction. A failed condition answers
    /// VERSION_MISMATCH with the key's current version and the condition's
    /// index (u32), and nothing is written.
    fn execute_txn(
        &mut self,
        txn: Txn<'_>,
        request_id: u32,
        target: ReplyTarget,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let op = Opcode::Txn as u8;
        for (index, condition) in txn.conditions.iter().enumerate() {
            match self.settled_version(condition.key) {
                Settled::Undecided => return Outcome::WaitKey,
                Settled::Version(current) if !condition.check.holds(current) => {
                    let index = (index as u32).to_be_bytes();
                    let current = current.unwrap_or(0);
                    encode_response(
                        out,
                        op,
                        Status::VersionMismatch,
                        request_id,
                        current,
                        &index,
                    );
                    return Outcome::Answered;
                }
                Settled::Version(_) => {}
            }
        }
        if txn.writes.is_empty() {
            // Only conditions: they hold now, and nothing needs replicating.
            encode_response(out, op, Status::Ok, request_id, 0, &[]);
            return Outcome::Answered;
        }
        let now = self.store.now_ms();
        let delete = |key: &[u8]| WriteOp::new(OpKind::Delete, key, b"");
        let mut ops: Vec<WriteOp> = Vec::with_capacity(txn.writes.len());
        for (i, w) in txn.writes.iter().enumerate() {
            let key = w.key();
            // UPDATE and EXPIRE apply to the key as held; one the master still
            // holds past its deadline must stay absent, not come back. Its
            // deletion does that (and is what expiry would replicate anyway),
            // unless an earlier write of this TXN made the key anew.
            let revives = matches!(w, TxnWrite::Update { .. } | TxnWrite::Expire { .. })
                && !txn.writes[..i].iter().any(|earlier| earlier.key() == key)
                && self.expired_but_held(key);
            if revives && self.settled_version(key) == Settled::Undecided {
                return Outcome::WaitKey;
            }
            ops.push(match *w {
                _ if revives => delete(key),
                TxnWrite::Put { key, value } => WriteOp::new(OpKind::Put, key, value),
                TxnWrite::Update { key, value } => WriteOp::new(OpKind::Update, key, value),
                TxnWrite::Delete { key } => delete(key),
                // A deadline already past leaves the key absent: a deletion says
                // so on every replica (and no later write of the TXN can revive it).
                TxnWrite::PutExpiring { deadline_ms, .. }
                | TxnWrite::Expire {
                    deadline_ms: Some(deadline_ms),
                    ..
                } if deadline_ms <= now => delete(key),
                TxnWrite::PutExpiring {
                    key,
                    value,
                    deadline_ms,
                } => WriteOp::put_expiring(key, value, deadline_ms),
                TxnWrite::Expire { key, deadline_ms } => WriteOp::expire(key, deadline_ms),
            });
        }
        Outcome::Pending(self.submit(ops, target, request_id, op, None))
    }

    /// Answer a binary AUTH with `password`; say whether it authenticated.
    /// A wrong password, or AUTH while the server has none, is `AUTH_FAILED`
    /// and counts in `auth_failures`.
    pub fn authenticate(&mut self, password: &[u8], request_id: u32, out: &mut Vec<u8>) -> bool {
        let op = Opcode::Auth as u8;
        self.stats.count(Opcode::Auth);
        let refusal = match &self.password {
            Some(p) if p.matches(password) => None,
            Some(_) => Some(WRONG_PASSWORD_MESSAGE),
            None => Some(NO_PASSWORD_MESSAGE),
        };
        match refusal {
            None => {
                encode_response(out, op, Status::Ok, request_id, 0, &[]);
                true
            }
            Some(message) => {
                self.stats.auth_failures += 1;
                let status = Status::AuthFailed;
                encode_response(out, op, status, request_id, 0, message.as_bytes());
                false
            }
        }
    }

    /// Whether a request with `op` must be refused `NOAUTH` on a connection
    /// that has (`authenticated`) or has not authenticated.
    pub fn needs_auth(&self, authenticated: bool, op: Opcode) -> bool {
        self.password.is_some() && !authenticated && !auth::allowed_before_auth(op)
    }

    /// Append the `NOAUTH` response (TCP's message) to a request.
    pub fn refuse_unauthenticated(&mut self, op: Opcode, request_id: u32, out: &mut Vec<u8>) {
        self.stats.auth_required += 1;
        let message = NOAUTH_MESSAGE.as_bytes();
        encode_response(out, op as u8, Status::NoAuth, request_id, 0, message);
    }

    /// Protected mode: whether a client from `peer` is refused.
    pub fn protected_mode_refuses(&self, peer: std::net::IpAddr) -> bool {
        self.protected && !peer.to_canonical().is_loopback()
    }

    /// Append the protected-mode refusal of a client's first request.
    pub fn deny(&mut self, op_byte: u8, request_id: u32, out: &mut Vec<u8>) {
        let op = if Opcode::from_u8(op_byte).is_some() {
            op_byte
        } else {
            0
        };
        let message = auth::DENIED_MESSAGE.as_bytes();
        encode_response(out, op, Status::Denied, request_id, 0, message);
    }

    /// Append the error response for a request that could not be served.
    pub fn reject(&mut self, op_byte: u8, request_id: u32, err: &ProtocolError, out: &mut Vec<u8>) {
        self.stats.protocol_errors += 1;
        // Echo the opcode only when it is a request opcode, so the response flag stays meaningful.
        let op = if Opcode::from_u8(op_byte).is_some() {
            op_byte
        } else {
            0
        };
        let message = err.to_string();
        encode_response(out, op, err.status(), request_id, 0, message.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::txn::Condition;

    const TARGET: ReplyTarget = ReplyTarget::Tcp { key: 0, conn_id: 1 };

    fn put(key: &[u8], expect: u64) -> Request<'_> {
        Request::Put {
            key,
            value: b"v",
            expect,
        }
    }

    /// The status and version of the one reply in `out`.
    fn answer(out: &[u8]) -> (u8, u64) {
        (
            out[3],
            u64::from_be_bytes(out[8..16].try_into().expect("8 bytes")),
        )
    }

    #[test]
    fn latest_reads_the_newest_value_and_deadline_of_the_batch() {
        let mut core = Core::new(1 << 20, Mode::Master);
        core.store.set_now_ms(1_000);
        core.store.set(b"k", b"settled", 1);
        core.store.set_deadline(b"k", Some(9_000));
        assert_eq!(
            core.latest(b"k"),
            Latest::Known(Some((&b"settled"[..], Some(9_000))))
        );
        let submit = |core: &mut Core, op: WriteOp| {
            core.submit([op], TARGET, 0, 0, None);
        };
        submit(&mut core, WriteOp::put_expiring(b"k", b"a", 5_000));
        assert_eq!(
            core.latest(b"k"),
            Latest::Known(Some((&b"a"[..], Some(5_000))))
        );
        // A deadline change after the write applies to the value it wrote.
        submit(&mut core, WriteOp::expire(b"k", Some(7_000)));
        assert_eq!(
            core.latest(b"k"),
            Latest::Known(Some((&b"a"[..], Some(7_000))))
        );
        submit(&mut core, WriteOp::expire(b"k", None));
        assert_eq!(core.latest(b"k"), Latest::Known(Some((&b"a"[..], None))));
        submit(&mut core, WriteOp::new(OpKind::Put, b"k", b"b"));
        assert_eq!(core.latest(b"k"), Latest::Known(Some((&b"b"[..], None))));
        // A pending write whose deadline is already past leaves the key absent.
        submit(&mut core, WriteOp::put_expiring(b"k", b"c", 500));
        assert_eq!(core.latest(b"k"), Latest::Known(None));
        // A deadline change alone says nothing of the value: wait for it.
        core.take_batch();
        submit(&mut core, WriteOp::expire(b"k", Some(8_000)));
        core.take_batch();
        assert_eq!(core.latest(b"k"), Latest::InFlight);
    }

    #[test]
    fn cas_waits_while_its_key_has_a_write_undecided() {
        let mut core = Core::new(1 << 20, Mode::Master);
        core.store.set(b"k", b"old", 4);
        let mut out = Vec::new();
        assert_eq!(
            core.execute(put(b"k", 3), 1, TARGET, &mut out),
            Outcome::Answered
        );
        assert_eq!(answer(&out), (Status::VersionMismatch as u8, 4));
        out.clear();
        let Outcome::Pending(first) = core.execute(put(b"k", 4), 2, TARGET, &mut out) else {
            panic!("the version matches");
        };
        // A second CAS on the key must not be decided against the state the first changes.
        assert_eq!(
            core.execute(put(b"k", 4), 3, TARGET, &mut out),
            Outcome::WaitKey
        );
        assert_eq!(
            core.stats.requests(),
            2,
            "a request that waits is counted once it runs"
        );
        let txn = Txn {
            conditions: vec![Condition {
                key: b"k",
                check: Check::Exists,
            }],
            writes: Vec::new(),
        };
        assert_eq!(
            core.execute(Request::Txn(txn.clone()), 4, TARGET, &mut out),
            Outcome::WaitKey
        );
        // Decided and applied: the next CAS is checked against the new version.
        core.take_batch();
        core.store.set(b"k", b"v", 9);
        assert!(core.finish(first, Status::Ok, 9, &[]).is_some());
        assert_eq!(
            core.execute(put(b"k", 4), 3, TARGET, &mut out),
            Outcome::Answered
        );
        assert_eq!(answer(&out), (Status::VersionMismatch as u8, 9));
        out.clear();
        assert_eq!(
            core.execute(Request::Txn(txn), 4, TARGET, &mut out),
            Outcome::Answered
        );
        assert_eq!(answer(&out), (Status::Ok as u8, 0));
    }

    #[test]
    fn paused_writes_make_the_batch_take_no_more() {
        let mut core = Core::new(1 << 20, Mode::Master);
        assert!(!core.batch_full());
        core.writes_paused = true;
        assert!(core.batch_full(), "callers stop taking writes while paused");
        core.writes_paused = false;
        assert!(!core.batch_full());
    }

    #[test]
    fn a_txn_replies_once_all_its_writes_are_known() {
        let mut core = Core::new(1 << 20, Mode::Master);
        let txn = Txn {
            conditions: Vec::new(),
            writes: vec![
                TxnWrite::Put {
                    key: b"a",
                    value: b"1",
                },
                TxnWrite::Delete { key: b"gone" },
            ],
        };
        let mut out = Vec::new();
        let Outcome::Pending(client) = core.execute(Request::Txn(txn), 7, TARGET, &mut out) else {
            panic!("no conditions: submitted");
        };
        assert_eq!(core.take_batch().len(), 2, "both writes in one batch");
        assert!(core.finish(client, Status::Ok, 5, &[]).is_none());
        let Some((
            _,
            Completion::Binary {
                status, version, ..
            },
        )) = core.finish(client, Status::NotFound, 0, &[])
        else {
            panic!("the second result completes the reply");
        };
        assert_eq!((status, version), (Status::Ok, 5));
    }

    #[test]
    fn an_expired_key_still_held_is_absent_to_writes_and_its_deletion_is_submitted() {
        let mut core = Core::new(1 << 20, Mode::Master);
        core.store.set(b"k", b"v", 3);
        core.store.set_deadline(b"k", Some(100));
        core.store.set_now_ms(100);
        let mut out = Vec::new();
        let update = Request::Update {
            key: b"k",
            value: b"w",
            expect: 0,
        };
        assert_eq!(core.execute(update, 1, TARGET, &mut out), Outcome::Answered);
        assert_eq!(answer(&out), (Status::NotFound as u8, 0));
        // The master replicates the deletion (nobody waits for it)...
        let batch = core.take_batch();
        assert_eq!(batch.len(), 1);
        assert_eq!(
            (batch[0].op.kind, batch[0].op.key()),
            (OpKind::Delete, &b"k"[..])
        );
        // ...and, until it is decided, a compare-and-set on the key waits for it.
        assert_eq!(
            core.execute(put(b"k", EXPECT_ABSENT), 2, TARGET, &mut out),
            Outcome::WaitKey
        );
    }

    #[test]
    fn txn_update_and_deadline_writes_never_revive_an_expired_key() {
        let mut core = Core::new(1 << 20, Mode::Master);
        core.store.set(b"live", b"v", 1);
        core.store.set(b"dead", b"v", 2);
        core.store.set_deadline(b"dead", Some(100));
        core.store.set_now_ms(100);
        let txn = Txn {
            conditions: Vec::new(),
            writes: vec![
                TxnWrite::Update {
                    key: b"live",
                    value: b"u",
                },
                TxnWrite::Expire {
                    key: b"live",
                    deadline_ms: Some(5_000),
                },
                // Held past its deadline: deleted, not updated.
                TxnWrite::Update {
                    key: b"dead",
                    value: b"u",
                },
                TxnWrite::PutExpiring {
                    key: b"new",
                    value: b"n",
                    deadline_ms: 6_000,
                },
                // A deadline already past: the key is absent, so deleted.
                TxnWrite::PutExpiring {
                    key: b"past",
                    value: b"p",
                    deadline_ms: 50,
                },
                TxnWrite::Expire {
                    key: b"new",
                    deadline_ms: None,
                },
            ],
        };
        let mut out = Vec::new();
        let outcome = core.execute(Request::Txn(txn), 7, TARGET, &mut out);
        assert!(matches!(outcome, Outcome::Pending(_)), "{outcome:?}");
        let ops: Vec<(OpKind, &[u8], u64)> = core
            .batch
            .iter()
            .map(|w| (w.op.kind, w.op.key(), w.op.deadline_ms()))
            .collect();
        assert_eq!(
            ops,
            vec![
                (OpKind::Update, &b"live"[..], 0),
                (OpKind::Expire, b"live", 5_000),
                (OpKind::Delete, b"dead", 0),
                (OpKind::PutExpiring, b"new", 6_000),
                (OpKind::Delete, b"past", 0),
                (OpKind::Expire, b"new", 0),
            ]
        );
        // While the deletion of an expired key is undecided, a TXN updating it waits.
        let again = Txn {
            conditions: Vec::new(),
            writes: vec![TxnWrite::Expire {
                key: b"dead",
                deadline_ms: Some(9_000),
            }],
        };
        assert_eq!(
            core.execute(Request::Txn(again), 8, TARGET, &mut out),
            Outcome::WaitKey
        );
    }

    #[test]
    fn a_slave_redirects_cas_and_txn() {
        let mut core = Core::new(
            1 << 20,
            Mode::Slave {
                master: Some("m:1".into()),
            },
        );
        let mut out = Vec::new();
        core.execute(put(b"k", 4), 1, TARGET, &mut out);
        core.execute(Request::Txn(Txn::default()), 2, TARGET, &mut out);
        assert_eq!(out[3], Status::Redirect as u8);
        assert_eq!(out[24 + 3 + 3], Status::Redirect as u8);
    }

    #[test]
    fn auth_answers_ok_or_auth_failed_and_counts_failures() {
        let mut core = Core::new(1 << 20, Mode::Master);
        let mut out = Vec::new();
        // No password: nothing needs AUTH, and AUTH itself fails.
        assert!(!core.needs_auth(false, Opcode::Get));
        assert!(!core.authenticate(b"x", 1, &mut out));
        assert_eq!(out[3], Status::AuthFailed as u8);
        assert_eq!(&out[24..], NO_PASSWORD_MESSAGE.as_bytes());
        core.password = Some(Password::from_file_contents(b"pw\n").expect("password"));
        assert!(core.needs_auth(false, Opcode::Get));
        assert!(core.needs_auth(false, Opcode::Stats));
        assert!(!core.needs_auth(false, Opcode::Ping));
        assert!(!core.needs_auth(false, Opcode::Auth));
        assert!(!core.needs_auth(true, Opcode::Put));
        out.clear();
        assert!(!core.authenticate(b"wrong", 2, &mut out));
        assert_eq!((out[2], out[3]), (0x8B, Status::AuthFailed as u8));
        assert_eq!(&out[24..], WRONG_PASSWORD_MESSAGE.as_bytes());
        out.clear();
        assert!(core.authenticate(b"pw", 3, &mut out));
        assert_eq!((out[2], out[3], out.len()), (0x8B, Status::Ok as u8, 24));
        assert_eq!(core.stats.auth_failures, 2);
        out.clear();
        core.refuse_unauthenticated(Opcode::Get, 4, &mut out);
        assert_eq!((out[2], out[3]), (0x81, Status::NoAuth as u8));
        assert_eq!(&out[24..], NOAUTH_MESSAGE.as_bytes());
        out.clear();
        // What reaches the core without a connection (UDP) cannot authenticate.
        core.execute(Request::Auth { password: b"pw" }, 5, TARGET, &mut out);
        assert_eq!(out[3], Status::NoAuth as u8);
    }
}
