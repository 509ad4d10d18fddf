//! One load thread: a mio reactor driving its share of the connections through one phase
//! (preload, warmup or measurement) at a time.
//!
//! The hot path allocates nothing: requests are encoded into each connection's reused output
//! buffer, responses are parsed in place from its reused input buffer, and in-flight requests
//! live in ring buffers sized to the pipeline. Each connection gets at most one `write` per
//! readiness event, covering every request its responses made room for.
//!
//! Redirects (dkvs protocol, unless `--no-follow-redirects`): a slave answers every write with
//! REDIRECT naming its master, and every read while it holds no read lease (catching up, or cut
//! off from its master); a redirected read is sent to the master like a write, later reads are
//! tried at the target first again. Each logical connection is then a pair: the first redirected
//! write lazily opens a second socket to the master (once per connection; a non-blocking TCP
//! connect, or a connected UDP socket), the redirected write is sent there again keeping its
//! original send time, and from then on that connection's writes go straight to the master
//! while its reads stay on the target. Each socket of the pair keeps its own in-order in-flight
//! queue (TCP) or its own slots' routing (UDP); `--pipeline` bounds their sum. A target that
//! cannot be used (not `host:port`, unresolvable, refused, connect timed out) counts one
//! `redirect_failed` for the connection, which then no longer follows redirects to that target:
//! its writes end as REDIRECT errors, as with `--no-follow-redirects`, until (over TCP) a
//! redirect names another master (a failover moved it).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::dkvs::protocol::{
    Decoded, MAX_UDP_FRAME_BYTES, Opcode, RESPONSE_FLAG, Status, decode, decode_datagram,
};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};

use crate::cli::{Config, Protocol};
use crate::dkvs::{self, MAX_RESPONSE_VALUE_BYTES, Outcome};
use crate::net::{self, Socket};
use crate::report::Stats;
use crate::resp::{self, MAX_BULK_BYTES, Reply, RespEncoder};
use crate::workload::{KeyBuf, KeyDistribution, OpKind, Workload, make_value};

/// How often timeouts, reconnects and progress are looked at when no event wakes the reactor.
const TICK: Duration = Duration::from_millis(10);
/// Pause before reconnecting a failed connection, so a dead server is not hammered.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// Initial read buffer per TCP connection; grows only for a response larger than it.
const READ_BUF_BYTES: usize = 64 * 1024;
/// Largest read buffer: one maximal response plus its framing.
const MAX_READ_BUF_BYTES: usize = MAX_RESPONSE_VALUE_BYTES + MAX_BULK_BYTES / 64 + 1024;
/// Token bit of a connection's second socket, to the master a redirect named.
const MASTER_TOKEN: usize = 1 << (usize::BITS - 1);
/// The REDIRECT status byte, for counting redirects that are not followed.
const REDIRECT: u8 = Status::Redirect as u8;

/// Counters a worker publishes for the progress line, read by the main thread.
#[derive(Debug, Default)]
pub struct Progress {
    /// Successful operations so far in the phase.
    pub ops: AtomicU64,
    /// Errors so far in the phase.
    pub errors: AtomicU64,
}

/// Which part of a run a phase is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    /// Write every key once, sequentially, without WAIT.
    Preload,
    /// Load whose statistics are thrown away.
    Warmup,
    /// The measured load.
    Measure,
}

/// What one worker does in one phase.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    /// Which phase.
    pub kind: PhaseKind,
    /// Stop issuing requests at this instant.
    pub deadline: Option<Instant>,
    /// Stop issuing requests after this many (this worker's share).
    pub quota: Option<u64>,
}

/// Why a worker gave up on a phase.
#[derive(Debug)]
pub enum RunError {
    /// The poller itself failed.
    Poll(io::Error),
    /// No request ended (successfully or not) for this long: the server is gone.
    Stalled(Duration, String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Poll(e) => write!(f, "poll failed: {e}"),
            RunError::Stalled(d, last) => write!(
                f,
                "no request completed for {:.1} s; giving up (last connection error: {last})",
                d.as_secs_f64()
            ),
        }
    }
}

/// What a finished request counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    Status(u8),
    Timeout,
    Lost,
    Protocol,
    RespError,
    WaitShort,
}

fn count_fail(stats: &mut Stats, fail: Fail, n: u64) {
    let e = &mut stats.errors;
    match fail {
        Fail::Status(s) => e.status[s as usize] += n,
        Fail::Timeout => e.timeout += n,
        Fail::Lost => e.lost += n,
        Fail::Protocol => e.protocol += n,
        Fail::RespError => e.resp_error += n,
        Fail::WaitShort => e.wait_short += n,
    }
}

/// Request generation for one worker: the op mix, key bytes, and the phase's limits.
struct Requests {
    protocol: Protocol,
    resp: RespEncoder,
    keys: KeyBuf,
    value: Vec<u8>,
    workload: Workload,
    keyspace: u64,
    thread_index: u64,
    threads: u64,
    preloading: bool,
    preload_next: u64,
    issued: u64,
    quota: Option<u64>,
    stopped: bool,
    /// Keys per write transaction (`--txn-keys`); 1: plain writes.
    txn_keys: u64,
    /// The TXN payload being built.
    scratch: Vec<u8>,
    /// Keys of a transaction, copied out of `keys` (RESP needs them all at once).
    txn_key_bytes: Vec<Vec<u8>>,
}

impl Requests {
    fn begin(&mut self, phase: &Phase) {
        self.preloading = phase.kind == PhaseKind::Preload;
        self.preload_next = self.thread_index;
        self.issued = 0;
        self.quota = phase.quota;
        self.stopped = false;
    }

    /// Whether no more requests will be issued in this phase.
    fn exhausted(&self) -> bool {
        self.stopped
            || self.quota.is_some_and(|q| self.issued >= q)
            || (self.preloading && self.preload_next >= self.keyspace)
    }

    fn next(&mut self) -> Option<(OpKind, u64)> {
        if self.exhausted() {
            return None;
        }
        self.issued += 1;
        if self.preloading {
            let key = self.preload_next;
            self.preload_next += self.threads;
            return Some((OpKind::Set, key));
        }
        Some(match self.workload.next_op() {
            (OpKind::Set, key) if self.txn_keys > 1 => (OpKind::Txn, key),
            other => other,
        })
    }

    /// Replies the request for `kind` will get (SET + WAIT get two).
    fn replies(&self, kind: OpKind) -> u8 {
        let wait = u8::from(kind.is_write() && self.resp.waits() && !self.preloading);
        match (self.protocol, kind) {
            // +OK, N +QUEUED, EXEC's array (parsed whole); --txn-keys is at most 100.
            (Protocol::Resp, OpKind::Txn) => self.txn_keys as u8 + 2 + wait,
            _ => 1 + wait,
        }
    }

    fn encode(&mut self, out: &mut Vec<u8>, kind: OpKind, key_index: u64, request_id: u32) {
        if kind == OpKind::Txn {
            // N consecutive keys from the chosen one, wrapping in the keyspace.
            self.txn_key_bytes
                .resize(self.txn_keys as usize, Vec::new());
            for (i, slot) in self.txn_key_bytes.iter_mut().enumerate() {
                slot.clear();
                slot.extend_from_slice(self.keys.key((key_index + i as u64) % self.keyspace));
            }
            match self.protocol {
                Protocol::Dkvs => {
                    dkvs::begin_txn(&mut self.scratch, self.txn_keys as u16);
                    for key in &self.txn_key_bytes {
                        dkvs::push_txn_put(&mut self.scratch, key, &self.value);
                    }
                    dkvs::encode_txn(out, request_id, &self.scratch);
                }
                Protocol::Resp => {
                    let keys = self.txn_key_bytes.iter().map(Vec::as_slice);
                    self.resp.txn(out, keys, &self.value);
                }
            }
            return;
        }
        let key = self.keys.key(key_index);
        match (self.protocol, kind) {
            (Protocol::Dkvs, _) => dkvs::encode(out, kind, request_id, key, &self.value),
            (Protocol::Resp, OpKind::Get) => self.resp.get(out, key),
            (Protocol::Resp, OpKind::Set) if self.preloading => {
                self.resp.set_only(out, key, &self.value)
            }
            (Protocol::Resp, OpKind::Set | OpKind::Txn) => self.resp.set(out, key, &self.value),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    sent_at: Instant,
    request_id: u32,
    kind: OpKind,
    /// Key index, to send the request again if a slave redirects it.
    key: u64,
    /// Replies still due; a RESP SET followed by WAIT starts at 2.
    replies_left: u8,
    /// Whether the last reply due is WAIT's.
    waits: bool,
    /// Set when an earlier reply of a multi-reply operation already failed it.
    failed: Option<Fail>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpState {
    Up,
    Connecting { since: Instant },
    Down { retry_at: Instant },
}

/// Why a TCP connection is being closed.
enum ConnError {
    Io(io::Error),
    Closed,
    Protocol,
    /// The server refused the connection's AUTH (`--password-file`): its answer.
    Auth(String),
}

struct TcpConn {
    stream: Option<TcpStream>,
    state: TcpState,
    out: Vec<u8>,
    out_pos: usize,
    inbuf: Vec<u8>,
    in_len: usize,
    inflight: VecDeque<InFlight>,
    next_id: u32,
    /// Writes a slave answered with REDIRECT, popped from `inflight` and waiting to be sent
    /// to the master; the worker empties it right after each read.
    redirected: VecDeque<InFlight>,
    /// The `host:port` of the latest REDIRECT (allocated on the first one only).
    redirect_to: Vec<u8>,
    /// The redirect target that could not be reached (a later, different one is followed).
    broken_target: Vec<u8>,
    /// An AUTH was queued first on this connection and its reply has not come yet.
    auth_pending: bool,
}

/// A connection's second socket, to the master a slave redirected its writes to.
enum MasterLink {
    /// No redirect yet (or the link failed after working; the next redirect reopens it).
    Unknown,
    /// Connecting or up; writes go here.
    Open(Box<TcpConn>),
    /// The redirect target cannot be used; redirected writes count as REDIRECT errors.
    Broken,
}

impl TcpConn {
    fn new(stream: Option<TcpStream>, state: TcpState, pipeline: usize) -> TcpConn {
        TcpConn {
            stream,
            state,
            out: Vec::with_capacity(64 * 1024),
            out_pos: 0,
            inbuf: vec![0; READ_BUF_BYTES],
            in_len: 0,
            inflight: VecDeque::with_capacity(pipeline),
            next_id: 1,
            redirected: VecDeque::new(),
            redirect_to: Vec::new(),
            broken_target: Vec::new(),
            auth_pending: false,
        }
    }

    /// On a new connection, send `auth` (an encoded AUTH, empty for none)
    /// before anything queued; its reply is checked and not counted.
    fn start_auth(&mut self, auth: &[u8]) {
        if !auth.is_empty() {
            self.out
                .splice(self.out_pos..self.out_pos, auth.iter().copied());
            self.auth_pending = true;
        }
    }

    /// Queue one request; `sent_at` is earlier than now for a write sent again after a redirect.
    fn push(&mut self, req: &mut Requests, kind: OpKind, key: u64, sent_at: Instant) {
        let request_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        req.encode(&mut self.out, kind, key, request_id);
        let replies = req.replies(kind);
        self.inflight.push_back(InFlight {
            sent_at,
            request_id,
            kind,
            key,
            replies_left: replies,
            waits: replies == 2,
            failed: None,
        });
    }

    /// Write queued bytes until done or the socket is full; the rest waits for WRITABLE.
    fn flush(&mut self) -> Result<(), ConnError> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        while self.out_pos < self.out.len() {
            match stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }

    /// Read until a short read, handling every complete response; with `follow`, writes
    /// answered with REDIRECT are moved to `redirected` instead of counted as errors.
    fn read(
        &mut self,
        protocol: Protocol,
        wait: u32,
        follow: bool,
        stats: &mut Stats,
    ) -> Result<(), ConnError> {
        loop {
            if self.in_len == self.inbuf.len() {
                if self.inbuf.len() >= MAX_READ_BUF_BYTES {
                    return Err(ConnError::Protocol);
                }
                let grown = (self.inbuf.len() * 2).min(MAX_READ_BUF_BYTES);
                self.inbuf.resize(grown, 0);
            }
            let Some(stream) = self.stream.as_mut() else {
                return Ok(());
            };
            let n = match stream.read(&mut self.inbuf[self.in_len..]) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ConnError::Io(e)),
            };
            self.in_len += n;
            // A short read drained the socket: no second read just to learn WouldBlock.
            let short = self.in_len < self.inbuf.len();
            let now = Instant::now();
            match protocol {
                Protocol::Dkvs => self.parse_dkvs(now, follow, stats)?,
                Protocol::Resp => self.parse_resp(now, wait, stats)?,
            }
            if short {
                return Ok(());
            }
        }
    }

    /// Drop the first `used` input bytes, keeping a partial response at the front.
    fn consume(&mut self, used: usize) {
        if used > 0 {
            self.inbuf.copy_within(used..self.in_len, 0);
            self.in_len -= used;
        }
    }

    fn parse_dkvs(
        &mut self,
        now: Instant,
        follow: bool,
        stats: &mut Stats,
    ) -> Result<(), ConnError> {
        let mut pos = 0;
        loop {
            match decode(&self.inbuf[pos..self.in_len], MAX_RESPONSE_VALUE_BYTES) {
                Ok(Decoded::Frame(frame, used)) if self.auth_pending => {
                    self.auth_pending = false;
                    if frame.header.opcode != Opcode::Auth as u8 | RESPONSE_FLAG
                        || frame.header.status != Status::Ok as u8
                    {
                        return Err(ConnError::Auth(format!(
                            "{}: {}",
                            dkvs::status_name(frame.header.status),
                            String::from_utf8_lossy(frame.value)
                        )));
                    }
                    pos += used;
                }
                Ok(Decoded::Frame(frame, used)) => {
                    let Some(req) = self.inflight.pop_front() else {
                        return Err(ConnError::Protocol);
                    };
                    let expected_op = dkvs::opcode(req.kind) as u8 | RESPONSE_FLAG;
                    if frame.header.request_id != req.request_id
                        || frame.header.opcode != expected_op
                    {
                        // Responses come back in order over TCP; anything else means the
                        // stream is out of step and every later match would be wrong.
                        self.inflight.push_front(req);
                        return Err(ConnError::Protocol);
                    }
                    match dkvs::outcome(req.kind, frame.header.status) {
                        Outcome::Ok => {
                            stats.record_ok(req.kind == OpKind::Get, false, now - req.sent_at)
                        }
                        Outcome::Miss => stats.record_ok(true, true, now - req.sent_at),
                        Outcome::Redirect if follow => {
                            self.redirect_to.clear();
                            self.redirect_to.extend_from_slice(frame.value);
                            self.redirected.push_back(req);
                        }
                        Outcome::Redirect => count_fail(stats, Fail::Status(REDIRECT), 1),
                        Outcome::Failed(status) => count_fail(stats, Fail::Status(status), 1),
                    }
                    pos += used;
                }
                Ok(Decoded::Incomplete(total)) => {
                    if let Some(total) = total
                        && total > self.inbuf.len()
                    {
                        self.consume(pos);
                        self.inbuf.resize(total, 0);
                        return Ok(());
                    }
                    break;
                }
                Err(_) => return Err(ConnError::Protocol),
            }
        }
        self.consume(pos);
        Ok(())
    }

    fn parse_resp(&mut self, now: Instant, wait: u32, stats: &mut Stats) -> Result<(), ConnError> {
        let mut pos = 0;
        loop {
            let (reply, used) = match resp::parse(&self.inbuf[pos..self.in_len]) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(_) => return Err(ConnError::Protocol),
            };
            pos += used;
            if self.auth_pending {
                self.auth_pending = false;
                match reply {
                    Reply::Simple(b"OK") => continue,
                    Reply::Error(msg) => {
                        return Err(ConnError::Auth(String::from_utf8_lossy(msg).into_owned()));
                    }
                    _ => return Err(ConnError::Protocol),
                }
            }
            let Some(req) = self.inflight.front_mut() else {
                return Err(ConnError::Protocol);
            };
            let is_wait_reply = req.waits && req.replies_left == 1;
            req.replies_left -= 1;
            let fail = match (req.kind, reply) {
                (_, Reply::Error(_)) => Some(Fail::RespError),
                (OpKind::Get, Reply::Bulk(_)) => None,
                (OpKind::Set | OpKind::Txn, Reply::Integer(acked)) if is_wait_reply => {
                    (acked < wait as i64).then_some(Fail::WaitShort)
                }
                (OpKind::Set | OpKind::Txn, Reply::Simple(_)) if !is_wait_reply => None,
                // EXEC's array header; a nil one (aborted) is a failure.
                (OpKind::Txn, Reply::Array(Some(_))) if !is_wait_reply => None,
                _ => Some(Fail::Protocol),
            };
            if req.failed.is_none() {
                req.failed = fail;
            }
            if req.replies_left > 0 {
                continue;
            }
            let Some(req) = self.inflight.pop_front() else {
                return Err(ConnError::Protocol);
            };
            match (req.failed, req.kind, reply) {
                (Some(fail), _, _) => count_fail(stats, fail, 1),
                (None, OpKind::Get, Reply::Bulk(value)) => {
                    stats.record_ok(true, value.is_none(), now - req.sent_at)
                }
                (None, kind, _) => stats.record_ok(kind == OpKind::Get, false, now - req.sent_at),
            }
        }
        self.consume(pos);
        Ok(())
    }
}

/// Queue requests on a connection and, once a redirect opened one, its link to the master,
/// until their requests in flight together fill the pipeline or the phase issues no more.
/// Writes go to the master when there is one; everything else to `conn`.
fn fill_pair(
    conn: &mut TcpConn,
    mut master: Option<&mut TcpConn>,
    req: &mut Requests,
    pipeline: usize,
    now: Instant,
) {
    let mut in_flight = conn.inflight.len() + master.as_ref().map_or(0, |m| m.inflight.len());
    while in_flight < pipeline {
        let Some((kind, key)) = req.next() else {
            break;
        };
        match master.as_deref_mut() {
            Some(m) if kind.is_write() => m.push(req, kind, key, now),
            _ => conn.push(req, kind, key, now),
        }
        in_flight += 1;
    }
}

struct UdpSlot {
    busy: bool,
    /// Sent (or to be sent) on the socket to the master rather than the target.
    to_master: bool,
    generation: u32,
    request_id: u32,
    kind: OpKind,
    first_sent: Instant,
    last_sent: Instant,
    frame: Vec<u8>,
}

/// A UDP connection's second socket, to the master a slave redirected its writes to.
enum UdpMaster {
    /// No redirect yet.
    Unknown,
    /// Writes go here.
    Open(UdpSocket),
    /// The redirect target cannot be used; redirected writes count as REDIRECT errors.
    Broken,
}

struct UdpConn {
    socket: UdpSocket,
    master: UdpMaster,
    /// Slots whose request a slave redirected (already marked `to_master`), waiting for the
    /// worker to send them to the master right after the read that found them.
    redirected: Vec<usize>,
    /// The `host:port` of the latest REDIRECT.
    redirect_to: Vec<u8>,
    slots: Vec<UdpSlot>,
    idle: Vec<usize>,
    slot_bits: u32,
}

impl UdpConn {
    fn new(socket: UdpSocket, pipeline: usize, now: Instant) -> UdpConn {
        let slot_bits = usize::BITS - (pipeline.max(2) - 1).leading_zeros();
        let slots = (0..pipeline)
            .map(|_| UdpSlot {
                busy: false,
                to_master: false,
                generation: 0,
                request_id: 0,
                kind: OpKind::Get,
                first_sent: now,
                last_sent: now,
                frame: Vec::new(),
            })
            .collect();
        UdpConn {
            socket,
            master: UdpMaster::Unknown,
            redirected: Vec::new(),
            redirect_to: Vec::new(),
            slots,
            idle: (0..pipeline).rev().collect(),
            slot_bits,
        }
    }

    fn send(&mut self, slot: usize, stats: &mut Stats) {
        let s = &self.slots[slot];
        let (socket, to_master) = match (&self.master, s.to_master) {
            (UdpMaster::Open(master), true) => (master, true),
            _ => (&self.socket, false),
        };
        match socket.send(&s.frame) {
            Ok(_) => {}
            // Not sent: the retry timer resends it like a lost datagram.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // Typically the ICMP "port unreachable" of an earlier datagram to the master.
            Err(e) if to_master => self.break_master(&e, stats),
            Err(_) => stats.errors.connection += 1,
        }
    }

    /// Give up on the master: count it once, end its requests as REDIRECT errors, and send
    /// later writes to the target (whose redirects are then counted, not followed).
    fn break_master(&mut self, e: &io::Error, stats: &mut Stats) {
        if !matches!(self.master, UdpMaster::Open(_)) {
            return;
        }
        // Dropping the socket also removes it from epoll.
        self.master = UdpMaster::Broken;
        stats.redirect_failed(|| {
            format!(
                "UDP master {} named by a redirect does not answer: {e} \
                 (is it running with UDP enabled?)",
                String::from_utf8_lossy(&self.redirect_to)
            )
        });
        for slot in 0..self.slots.len() {
            if self.slots[slot].busy && self.slots[slot].to_master {
                count_fail(stats, Fail::Status(REDIRECT), 1);
                self.free(slot);
            }
        }
    }

    fn fill(&mut self, req: &mut Requests, now: Instant, stats: &mut Stats) {
        while let Some(&slot) = self.idle.last() {
            let Some((kind, key)) = req.next() else {
                break;
            };
            self.idle.pop();
            let s = &mut self.slots[slot];
            s.generation = s.generation.wrapping_add(1);
            // The slot index in the low bits finds the slot; the generation tells a late
            // duplicate of an earlier request apart from the current one.
            s.request_id = (s.generation << self.slot_bits) | slot as u32;
            s.busy = true;
            s.to_master = kind.is_write() && matches!(self.master, UdpMaster::Open(_));
            s.kind = kind;
            s.first_sent = now;
            s.last_sent = now;
            s.frame.clear();
            req.encode(&mut s.frame, kind, key, s.request_id);
            self.send(slot, stats);
        }
    }

    fn free(&mut self, slot: usize) {
        self.slots[slot].busy = false;
        self.idle.push(slot);
    }

    /// Receive until WouldBlock (datagrams give no short-read signal) on the target's socket
    /// or, with `from_master`, the master's; with `follow`, writes the target redirects are
    /// queued in `redirected` instead of counted as errors.
    fn read(&mut self, buf: &mut [u8], from_master: bool, follow: bool, stats: &mut Stats) {
        loop {
            let socket = match (&self.master, from_master) {
                (_, false) => &self.socket,
                (UdpMaster::Open(master), true) => master,
                _ => return,
            };
            let n = match socket.recv(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if from_master => {
                    self.break_master(&e, stats);
                    return;
                }
                // An ICMP error from an earlier datagram; later ones may still arrive.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    stats.errors.connection += 1;
                    continue;
                }
                Err(_) => {
                    stats.errors.connection += 1;
                    return;
                }
            };
            let now = Instant::now();
            let frame = match decode_datagram(&buf[..n], MAX_RESPONSE_VALUE_BYTES) {
                Ok(frame) => frame,
                Err(_) => {
                    stats.errors.protocol += 1;
                    continue;
                }
            };
            let id = frame.header.request_id;
            let slot = (id & ((1 << self.slot_bits) - 1)) as usize;
            let matches = self.slots.get(slot).is_some_and(|s| {
                s.busy
                    && s.request_id == id
                    && s.to_master == from_master
                    && frame.header.opcode == dkvs::opcode(s.kind) as u8 | RESPONSE_FLAG
            });
            if !matches {
                stats.udp_stale += 1;
                continue;
            }
            let s = &mut self.slots[slot];
            let latency = now - s.first_sent;
            match dkvs::outcome(s.kind, frame.header.status) {
                Outcome::Ok => stats.record_ok(s.kind == OpKind::Get, false, latency),
                Outcome::Miss => stats.record_ok(true, true, latency),
                Outcome::Redirect if follow && !from_master => {
                    // Still busy; marked now so a duplicate REDIRECT (a retried request
                    // answered twice) no longer matches and is counted stale.
                    s.to_master = true;
                    self.redirected.push(slot);
                    self.redirect_to.clear();
                    self.redirect_to.extend_from_slice(frame.value);
                    continue;
                }
                Outcome::Redirect => count_fail(stats, Fail::Status(REDIRECT), 1),
                Outcome::Failed(status) => count_fail(stats, Fail::Status(status), 1),
            }
            self.free(slot);
        }
    }

    /// Resend requests unanswered for an attempt interval; time out those past the deadline.
    fn retry(&mut self, now: Instant, timeout: Duration, attempt: Duration, stats: &mut Stats) {
        for slot in 0..self.slots.len() {
            let s = &self.slots[slot];
            if !s.busy {
                continue;
            }
            if now.duration_since(s.first_sent) >= timeout {
                count_fail(stats, Fail::Timeout, 1);
                self.free(slot);
            } else if now.duration_since(s.last_sent) >= attempt {
                self.slots[slot].last_sent = now;
                stats.udp_retries += 1;
                self.send(slot, stats);
            }
        }
    }

    fn busy(&self) -> usize {
        self.slots.len() - self.idle.len()
    }
}

/// Whether a non-blocking connect finished (`Ok(false)`: still in progress).
fn connect_state(stream: &TcpStream) -> io::Result<bool> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => Err(e),
        Ok(None) => match stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        },
    }
}

/// One reactor thread's connections and state, reused across phases.
pub struct Worker {
    poll: Poll,
    events: Events,
    /// The servers, the one the run started on first; a reconnect moves on to the next.
    addrs: Vec<SocketAddr>,
    /// Reconnect attempts so far, which pick the server to try.
    reconnects: usize,
    protocol: Protocol,
    pipeline: usize,
    timeout: Duration,
    udp_attempt: Duration,
    resp_wait: u32,
    tcp: Vec<TcpConn>,
    /// Each TCP connection's link to the master its target redirected writes to.
    masters: Vec<MasterLink>,
    udp: Vec<UdpConn>,
    udp_buf: Vec<u8>,
    req: Requests,
    stats: Stats,
    last_conn_error: String,
    /// Send redirected writes to the master (dkvs protocol without `--no-follow-redirects`).
    follow: bool,
    /// The AUTH every new TCP connection sends first (`--password-file`); empty: none.
    auth: Vec<u8>,
    /// The last redirect target resolved, and to what; every slave of a run names the same
    /// master, so each worker resolves it once (unparsable or unresolvable included).
    redirect_cache: Option<(Vec<u8>, Result<SocketAddr, String>)>,
}

impl Worker {
    /// A worker for `sockets`, already connected; registers them with a new poller.
    pub fn new(
        cfg: &Config,
        addrs: Vec<SocketAddr>,
        thread_index: usize,
        sockets: Vec<Socket>,
        distribution: KeyDistribution,
    ) -> io::Result<Worker> {
        let poll = Poll::new()?;
        let now = Instant::now();
        let auth = auth_request(cfg);
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for socket in sockets {
            match socket {
                Socket::Tcp(stream) => {
                    stream.set_nonblocking(true)?;
                    let mut stream = TcpStream::from_std(stream);
                    let token = Token(tcp.len());
                    // Registered once for both directions: edge-triggered WRITABLE costs
                    // nothing while unused and saves re-registering when a write blocks.
                    poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    // Authenticated already, by `net::open`.
                    tcp.push(TcpConn::new(Some(stream), TcpState::Up, cfg.pipeline));
                }
                Socket::Udp(socket) => {
                    socket.set_nonblocking(true)?;
                    let mut socket = UdpSocket::from_std(socket);
                    poll.registry()
                        .register(&mut socket, Token(udp.len()), Interest::READABLE)?;
                    udp.push(UdpConn::new(socket, cfg.pipeline, now));
                }
            }
        }
        let seed = cfg
            .seed
            .wrapping_add((thread_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let req = Requests {
            protocol: cfg.protocol,
            resp: RespEncoder::new(cfg.key_size, cfg.value_size, cfg.resp_wait),
            keys: KeyBuf::new(cfg.key_size, cfg.keyspace),
            value: make_value(cfg.value_size),
            workload: Workload::new(seed, cfg.keyspace, cfg.get_ratio, distribution),
            keyspace: cfg.keyspace,
            thread_index: thread_index as u64,
            threads: cfg.threads as u64,
            preloading: false,
            preload_next: 0,
            issued: 0,
            quota: None,
            stopped: false,
            txn_keys: cfg.txn_keys as u64,
            scratch: Vec::new(),
            txn_key_bytes: Vec::new(),
        };
        let masters = tcp.iter().map(|_| MasterLink::Unknown).collect();
        Ok(Worker {
            poll,
            events: Events::with_capacity(1024),
            addrs,
            reconnects: 0,
            protocol: cfg.protocol,
            pipeline: cfg.pipeline,
            timeout: cfg.timeout,
            udp_attempt: (cfg.timeout / (cfg.udp_retries + 1)).max(Duration::from_millis(1)),
            resp_wait: cfg.resp_wait.unwrap_or(0),
            tcp,
            masters,
            udp,
            udp_buf: if cfg.udp {
                vec![0; MAX_UDP_FRAME_BYTES + 1]
            } else {
                Vec::new()
            },
            req,
            stats: Stats::new(),
            last_conn_error: "none".to_string(),
            follow: cfg.follow_redirects && cfg.protocol == Protocol::Dkvs,
            auth,
            redirect_cache: None,
        })
    }

    /// Run one phase to its end; returns its statistics and when the last request finished.
    pub fn run(&mut self, phase: Phase, progress: &Progress) -> Result<(Stats, Instant), RunError> {
        self.stats = Stats::new();
        self.req.begin(&phase);
        debug_assert_eq!(self.in_flight(), 0, "a phase starts with nothing in flight");
        let stall_limit = (self.timeout * 3).max(Duration::from_secs(5));
        let start = Instant::now();
        let mut last_resolved = 0u64;
        let mut last_progress_at = start;
        let mut next_tick = start + TICK;
        for i in 0..self.tcp.len() {
            self.pump_tcp(i);
        }
        for i in 0..self.udp.len() {
            self.pump_udp(i);
        }
        loop {
            let now = Instant::now();
            if let Some(deadline) = phase.deadline {
                if now >= deadline {
                    self.req.stopped = true;
                }
                // Whatever is still unanswered a full timeout after the end is lost.
                if now >= deadline + self.timeout {
                    self.expire_all(now);
                }
            }
            if self.req.exhausted() && self.in_flight() == 0 {
                self.publish(progress);
                return Ok((std::mem::take(&mut self.stats), now));
            }
            let resolved = self.stats.resolved();
            if resolved != last_resolved {
                last_resolved = resolved;
                last_progress_at = now;
            } else if now.duration_since(last_progress_at) >= stall_limit {
                self.publish(progress);
                return Err(RunError::Stalled(stall_limit, self.last_conn_error.clone()));
            }
            let mut wait = next_tick.saturating_duration_since(now);
            if let Some(deadline) = phase.deadline
                && !self.req.stopped
            {
                wait = wait.min(deadline.saturating_duration_since(now));
            }
            if let Err(e) = self.poll.poll(&mut self.events, Some(wait)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RunError::Poll(e));
            }
            // Taken out for the loop so handlers may borrow the worker mutably; swapping
            // vectors allocates nothing.
            let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
            let now = Instant::now();
            for event in events.iter() {
                let token = event.token().0;
                let (i, to_master) = (token & !MASTER_TOKEN, token & MASTER_TOKEN != 0);
                let readable = event.is_readable() || event.is_error() || event.is_read_closed();
                if !self.udp.is_empty() {
                    if readable {
                        self.on_udp_readable(i, to_master);
                    }
                } else if to_master {
                    self.on_master_event(i, readable);
                } else {
                    self.on_tcp_event(i, readable, now);
                }
            }
            self.events = events;
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.tick(now);
                self.publish(progress);
            }
        }
    }

    fn publish(&self, progress: &Progress) {
        progress.ops.store(self.stats.ops, Ordering::Relaxed);
        progress
            .errors
            .store(self.stats.errors.total(), Ordering::Relaxed);
    }

    /// Fill a TCP connection's pipeline (its master link's included) and write what was
    /// queued. A connection that is down issues nothing, though its master link drains.
    fn pump_tcp(&mut self, i: usize) {
        // Read here, not passed in: an event batch takes long enough to skew send times.
        let now = Instant::now();
        let conn = &mut self.tcp[i];
        if conn.state == TcpState::Up {
            let master = match &mut self.masters[i] {
                MasterLink::Open(m) => Some(&mut **m),
                _ => None,
            };
            fill_pair(conn, master, &mut self.req, self.pipeline, now);
            if let Err(e) = conn.flush() {
                self.fail_tcp(i, e, now);
            }
        }
        if let MasterLink::Open(m) = &mut self.masters[i]
            && m.state == TcpState::Up
            && let Err(e) = m.flush()
        {
            self.fail_master(i, e);
        }
    }

    fn pump_udp(&mut self, i: usize) {
        let now = Instant::now();
        self.udp[i].fill(&mut self.req, now, &mut self.stats);
    }

    fn on_tcp_event(&mut self, i: usize, readable: bool, now: Instant) {
        let Some(conn) = self.tcp.get_mut(i) else {
            return;
        };
        match conn.state {
            TcpState::Down { .. } => {}
            TcpState::Connecting { .. } => self.finish_connect(i, now),
            TcpState::Up => {
                if readable {
                    let result =
                        conn.read(self.protocol, self.resp_wait, self.follow, &mut self.stats);
                    // Before any failure handling: redirected writes are no longer in flight
                    // on this connection, so closing it would not count them.
                    self.follow_tcp(i, now);
                    if let Err(e) = result {
                        self.fail_tcp(i, e, now);
                        return;
                    }
                }
                // Writable or not, refill and write: a write that would block keeps its
                // bytes for the next WRITABLE edge.
                self.pump_tcp(i);
            }
        }
    }

    /// An event on connection `i`'s link to the master.
    fn on_master_event(&mut self, i: usize, readable: bool) {
        let Some(MasterLink::Open(m)) = self.masters.get_mut(i) else {
            return;
        };
        match m.state {
            TcpState::Down { .. } => {}
            TcpState::Connecting { .. } => {
                let Some(stream) = m.stream.as_ref() else {
                    return;
                };
                match connect_state(stream) {
                    Ok(true) => {
                        let _ = stream.set_nodelay(true);
                        m.state = TcpState::Up;
                        self.pump_tcp(i);
                    }
                    Ok(false) => {}
                    Err(e) => self.fail_master(i, ConnError::Io(e)),
                }
            }
            TcpState::Up => {
                // A master that redirects again is not followed further: counted REDIRECT.
                if readable
                    && let Err(e) = m.read(self.protocol, self.resp_wait, false, &mut self.stats)
                {
                    self.fail_master(i, e);
                    return;
                }
                self.pump_tcp(i);
            }
        }
    }

    /// Send the writes connection `i`'s target just redirected to the master, opening the
    /// link to it on the first redirect.
    fn follow_tcp(&mut self, i: usize, now: Instant) {
        if self.tcp[i].redirected.is_empty() {
            return;
        }
        // A failover moves the master: a redirect naming another one than the
        // target that failed is worth following again.
        if matches!(self.masters[i], MasterLink::Broken)
            && self.tcp[i].redirect_to != self.tcp[i].broken_target
        {
            self.masters[i] = MasterLink::Unknown;
        }
        if matches!(self.masters[i], MasterLink::Unknown) {
            self.open_master(i, now);
        }
        let conn = &mut self.tcp[i];
        match &mut self.masters[i] {
            MasterLink::Open(m) => {
                while let Some(r) = conn.redirected.pop_front() {
                    // Latency still counts from the first send, to the slave.
                    m.push(&mut self.req, r.kind, r.key, r.sent_at);
                    self.stats.redirects += 1;
                }
            }
            MasterLink::Unknown | MasterLink::Broken => {
                let n = conn.redirected.len() as u64;
                conn.redirected.clear();
                count_fail(&mut self.stats, Fail::Status(REDIRECT), n);
            }
        }
        if let MasterLink::Open(m) = &mut self.masters[i]
            && m.state == TcpState::Up
            && let Err(e) = m.flush()
        {
            self.fail_master(i, e);
        }
    }

    /// Start connecting connection `i`'s link to the master its latest redirect named.
    fn open_master(&mut self, i: usize, now: Instant) {
        let target = std::mem::take(&mut self.tcp[i].redirect_to);
        let opened = self.redirect_addr(&target).and_then(|addr| {
            let named = String::from_utf8_lossy(&target);
            let mut stream = TcpStream::connect(addr).map_err(|e| {
                format!("cannot connect to master {named} named by a redirect: {e}")
            })?;
            self.poll
                .registry()
                .register(
                    &mut stream,
                    Token(i | MASTER_TOKEN),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map_err(|e| format!("cannot poll the connection to master {named}: {e}"))?;
            Ok(stream)
        });
        self.masters[i] = match opened {
            Ok(stream) => {
                let mut conn = TcpConn::new(
                    Some(stream),
                    TcpState::Connecting { since: now },
                    self.pipeline,
                );
                conn.start_auth(&self.auth);
                MasterLink::Open(Box::new(conn))
            }
            Err(msg) => {
                self.last_conn_error.clone_from(&msg);
                self.stats.redirect_failed(|| msg);
                self.tcp[i].broken_target.clone_from(&target);
                MasterLink::Broken
            }
        };
        self.tcp[i].redirect_to = target;
    }

    /// The address a redirect target names, or why it cannot be used; resolved once per
    /// distinct target (a host name may mean a blocking DNS lookup).
    fn redirect_addr(&mut self, target: &[u8]) -> Result<SocketAddr, String> {
        if let Some((cached, result)) = &self.redirect_cache
            && cached.as_slice() == target
        {
            return result.clone();
        }
        let result = net::parse_redirect_target(target)
            .and_then(|(host, port)| net::resolve(host, port))
            .map_err(|e| format!("cannot follow a redirect: {e}"));
        self.redirect_cache = Some((target.to_vec(), result.clone()));
        result
    }

    /// Close connection `i`'s link to the master. One that never connected means the
    /// redirect target is unusable: counted once, and the connection stops following. One
    /// that worked fails like any connection, and the next redirect opens it again.
    fn fail_master(&mut self, i: usize, err: ConnError) {
        let MasterLink::Open(m) = &self.masters[i] else {
            return;
        };
        let lost = m.inflight.len() as u64;
        if let TcpState::Connecting { .. } = m.state {
            let named = String::from_utf8_lossy(&self.tcp[i].redirect_to).into_owned();
            let why = match &err {
                ConnError::Io(e) => format!("{} ({e})", net::describe(e, self.timeout)),
                ConnError::Closed => "connection closed".to_string(),
                ConnError::Protocol => "unexpected response".to_string(),
                ConnError::Auth(why) => format!("AUTH refused: {why}"),
            };
            let msg = format!("cannot connect to master {named} named by a redirect: {why}");
            self.last_conn_error.clone_from(&msg);
            self.stats.redirect_failed(|| msg);
            // Never sent: these writes end as the REDIRECT they got.
            count_fail(&mut self.stats, Fail::Status(REDIRECT), lost);
            let target = self.tcp[i].redirect_to.clone();
            self.tcp[i].broken_target = target;
            self.close_master(i, MasterLink::Broken);
            return;
        }
        match err {
            ConnError::Io(e) => {
                self.stats.errors.connection += 1;
                self.last_conn_error = format!("master: {e}");
            }
            ConnError::Closed => {
                self.stats.errors.connection += 1;
                self.last_conn_error = "master closed the connection".to_string();
            }
            ConnError::Protocol => {
                self.stats.errors.protocol += 1;
                self.last_conn_error = "unparsable or mismatched response from master".to_string();
            }
            ConnError::Auth(why) => {
                self.stats.errors.connection += 1;
                self.last_conn_error = format!("master refused AUTH: {why}");
            }
        }
        count_fail(&mut self.stats, Fail::Lost, lost);
        self.close_master(i, MasterLink::Unknown);
    }

    /// Drop connection `i`'s master link (whatever it had in flight already counted).
    fn close_master(&mut self, i: usize, next: MasterLink) {
        if let MasterLink::Open(mut m) = std::mem::replace(&mut self.masters[i], next)
            && let Some(mut stream) = m.stream.take()
        {
            let _ = self.poll.registry().deregister(&mut stream);
        }
    }

    fn on_udp_readable(&mut self, i: usize, from_master: bool) {
        let Some(conn) = self.udp.get_mut(i) else {
            return;
        };
        conn.read(&mut self.udp_buf, from_master, self.follow, &mut self.stats);
        self.follow_udp(i);
        self.pump_udp(i);
    }

    /// Send the writes UDP connection `i`'s target just redirected to the master, opening
    /// the socket to it on the first redirect.
    fn follow_udp(&mut self, i: usize) {
        if self.udp[i].redirected.is_empty() {
            return;
        }
        if matches!(self.udp[i].master, UdpMaster::Unknown) {
            self.open_udp_master(i);
        }
        let now = Instant::now();
        let conn = &mut self.udp[i];
        for k in 0..conn.redirected.len() {
            let slot = conn.redirected[k];
            // A send below may have given up on the master, ending its slots already.
            if !(conn.slots[slot].busy && conn.slots[slot].to_master) {
                continue;
            }
            if matches!(conn.master, UdpMaster::Open(_)) {
                // Same frame and id; `first_sent` stays, so latency counts from the slave.
                conn.slots[slot].last_sent = now;
                self.stats.redirects += 1;
                conn.send(slot, &mut self.stats);
            } else {
                count_fail(&mut self.stats, Fail::Status(REDIRECT), 1);
                conn.free(slot);
            }
        }
        conn.redirected.clear();
    }

    fn open_udp_master(&mut self, i: usize) {
        let target = std::mem::take(&mut self.udp[i].redirect_to);
        let opened = self.redirect_addr(&target).and_then(|addr| {
            let named = String::from_utf8_lossy(&target);
            let socket = net::open_udp(addr)?;
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("cannot set up the UDP socket to master {named}: {e}"))?;
            let mut socket = UdpSocket::from_std(socket);
            self.poll
                .registry()
                .register(&mut socket, Token(i | MASTER_TOKEN), Interest::READABLE)
                .map_err(|e| format!("cannot poll the UDP socket to master {named}: {e}"))?;
            Ok(socket)
        });
        self.udp[i].master = match opened {
            Ok(socket) => UdpMaster::Open(socket),
            Err(msg) => {
                self.stats.redirect_failed(|| msg);
                UdpMaster::Broken
            }
        };
        self.udp[i].redirect_to = target;
    }

    fn finish_connect(&mut self, i: usize, now: Instant) {
        let conn = &mut self.tcp[i];
        let Some(stream) = conn.stream.as_ref() else {
            return;
        };
        match connect_state(stream) {
            Ok(true) => {
                // Best effort: without it only pipelined latency suffers, never correctness.
                let _ = stream.set_nodelay(true);
                conn.state = TcpState::Up;
                self.pump_tcp(i);
            }
            Ok(false) => {}
            Err(e) => self.fail_tcp(i, ConnError::Io(e), now),
        }
    }

    /// Close a connection, count what it had in flight, and schedule a reconnect.
    fn fail_tcp(&mut self, i: usize, err: ConnError, now: Instant) {
        let conn = &mut self.tcp[i];
        let lost = conn.inflight.len() as u64;
        match err {
            ConnError::Io(e) => {
                self.stats.errors.connection += 1;
                count_fail(&mut self.stats, Fail::Lost, lost);
                self.last_conn_error = e.to_string();
            }
            ConnError::Closed => {
                self.stats.errors.connection += 1;
                count_fail(&mut self.stats, Fail::Lost, lost);
                self.last_conn_error = "server closed the connection".to_string();
            }
            ConnError::Protocol => {
                self.stats.errors.protocol += 1;
                count_fail(&mut self.stats, Fail::Lost, lost);
                self.last_conn_error = "unparsable or mismatched response".to_string();
            }
            ConnError::Auth(why) => {
                self.stats.errors.connection += 1;
                count_fail(&mut self.stats, Fail::Lost, lost);
                self.last_conn_error = format!("AUTH refused: {why}");
            }
        }
        self.close_tcp(i, now);
    }

    fn close_tcp(&mut self, i: usize, now: Instant) {
        let conn = &mut self.tcp[i];
        if let Some(mut stream) = conn.stream.take() {
            // The socket is dropped right after, which also removes it from epoll.
            let _ = self.poll.registry().deregister(&mut stream);
        }
        conn.inflight.clear();
        conn.redirected.clear();
        conn.out.clear();
        conn.out_pos = 0;
        conn.in_len = 0;
        conn.state = TcpState::Down {
            retry_at: now + RECONNECT_DELAY,
        };
    }

    /// Timeouts, retries and reconnects; run every [`TICK`].
    fn tick(&mut self, now: Instant) {
        for i in 0..self.tcp.len() {
            match self.tcp[i].state {
                TcpState::Up => {
                    let expired = self.tcp[i]
                        .inflight
                        .front()
                        .is_some_and(|r| now.duration_since(r.sent_at) >= self.timeout);
                    if expired {
                        // Over TCP a late response would still arrive in order, so the
                        // connection must go: later matches would be wrong.
                        let n = self.tcp[i].inflight.len() as u64;
                        count_fail(&mut self.stats, Fail::Timeout, n);
                        self.last_conn_error = "request timed out".to_string();
                        self.close_tcp(i, now);
                    } else {
                        self.pump_tcp(i);
                    }
                }
                TcpState::Connecting { since } => {
                    if now.duration_since(since) >= self.timeout {
                        let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                        self.fail_tcp(i, ConnError::Io(e), now);
                    }
                }
                TcpState::Down { retry_at } => {
                    if now >= retry_at && !self.req.exhausted() {
                        self.reconnect(i, now);
                    }
                }
            }
            self.tick_master(i, now);
        }
        for i in 0..self.udp.len() {
            self.udp[i].retry(now, self.timeout, self.udp_attempt, &mut self.stats);
            self.pump_udp(i);
        }
    }

    /// Timeouts of connection `i`'s link to the master.
    fn tick_master(&mut self, i: usize, now: Instant) {
        let MasterLink::Open(m) = &self.masters[i] else {
            return;
        };
        match m.state {
            TcpState::Up => {
                let expired = m
                    .inflight
                    .front()
                    .is_some_and(|r| now.duration_since(r.sent_at) >= self.timeout);
                if expired {
                    // As on the target: later responses would match the wrong requests.
                    count_fail(&mut self.stats, Fail::Timeout, m.inflight.len() as u64);
                    self.last_conn_error = "request to the master timed out".to_string();
                    self.close_master(i, MasterLink::Unknown);
                }
            }
            TcpState::Connecting { since } => {
                if now.duration_since(since) >= self.timeout {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    self.fail_master(i, ConnError::Io(e));
                }
            }
            TcpState::Down { .. } => {}
        }
    }

    fn reconnect(&mut self, i: usize, now: Instant) {
        // With one server this is always it; with several, a connection that
        // failed tries the next (the master may have moved).
        self.reconnects += 1;
        let addr = self.addrs[(i + self.reconnects) % self.addrs.len()];
        let mut stream = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => {
                self.fail_tcp(i, ConnError::Io(e), now);
                return;
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.fail_tcp(i, ConnError::Io(e), now);
            return;
        }
        let conn = &mut self.tcp[i];
        conn.stream = Some(stream);
        conn.state = TcpState::Connecting { since: now };
        conn.start_auth(&self.auth);
    }

    /// Requests sent and not yet finished; counted only while draining, so not kept as a field.
    fn in_flight(&self) -> usize {
        self.tcp.iter().map(|c| c.inflight.len()).sum::<usize>()
            + self
                .masters
                .iter()
                .map(|m| match m {
                    MasterLink::Open(m) => m.inflight.len(),
                    MasterLink::Unknown | MasterLink::Broken => 0,
                })
                .sum::<usize>()
            + self.udp.iter().map(UdpConn::busy).sum::<usize>()
    }

    /// Count everything still in flight as timed out, closing TCP connections it was sent on.
    fn expire_all(&mut self, now: Instant) {
        for i in 0..self.tcp.len() {
            let n = self.tcp[i].inflight.len() as u64;
            if n > 0 {
                count_fail(&mut self.stats, Fail::Timeout, n);
                self.close_tcp(i, now);
            }
            if let MasterLink::Open(m) = &self.masters[i]
                && !m.inflight.is_empty()
            {
                count_fail(&mut self.stats, Fail::Timeout, m.inflight.len() as u64);
                self.close_master(i, MasterLink::Unknown);
            }
        }
        for i in 0..self.udp.len() {
            let conn = &mut self.udp[i];
            let busy = conn.busy();
            count_fail(&mut self.stats, Fail::Timeout, busy as u64);
            for slot in 0..conn.slots.len() {
                if conn.slots[slot].busy {
                    conn.free(slot);
                }
            }
        }
    }
}

/// The AUTH request a new connection sends first, encoded for the run's
/// protocol; empty without `--password-file`.
pub fn auth_request(cfg: &Config) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(password) = &cfg.password {
        match cfg.protocol {
            // Request id 0: the run's own requests count from 1.
            Protocol::Dkvs => {
                ::dkvs::protocol::encode_request(&mut out, Opcode::Auth, 0, &[], &password.0)
            }
            Protocol::Resp => resp::encode_auth(&mut out, &password.0),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::dkvs::protocol::{Opcode, encode_response};

    fn requests(get_ratio: f64) -> Requests {
        Requests {
            protocol: Protocol::Dkvs,
            resp: RespEncoder::new(16, 8, None),
            keys: KeyBuf::new(16, 100),
            value: make_value(8),
            workload: Workload::new(7, 100, get_ratio, KeyDistribution::Uniform),
            keyspace: 100,
            thread_index: 0,
            threads: 1,
            preloading: false,
            preload_next: 0,
            issued: 0,
            quota: None,
            stopped: false,
            txn_keys: 1,
            scratch: Vec::new(),
            txn_key_bytes: Vec::new(),
        }
    }

    #[test]
    fn a_redis_transaction_expects_one_reply_per_queued_set_plus_two() {
        let mut req = requests(0.0);
        req.protocol = Protocol::Resp;
        req.txn_keys = 4;
        assert_eq!(req.replies(OpKind::Txn), 6, "+OK, 4 +QUEUED, EXEC's array");
        let mut out = Vec::new();
        req.encode(&mut out, OpKind::Txn, 99, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("*1\r\n$5\r\nMULTI\r\n") && text.ends_with("*1\r\n$4\r\nEXEC\r\n")
        );
        // Four consecutive keys, wrapping at the keyspace (100).
        for key in [
            "key:000000000099",
            "key:000000000000",
            "key:000000000001",
            "key:000000000002",
        ] {
            assert!(text.contains(key), "{key}");
        }
    }

    /// A connection with no socket, for the buffer and queue logic alone.
    fn detached(pipeline: usize) -> TcpConn {
        TcpConn::new(None, TcpState::Up, pipeline)
    }

    /// Opcode and request id of every frame in `bytes`.
    fn frames(bytes: &[u8]) -> Vec<(u8, u32)> {
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < bytes.len() {
            let Ok(Decoded::Frame(frame, used)) = decode(&bytes[pos..], 1 << 20) else {
                panic!("undecodable request at {pos}");
            };
            out.push((frame.header.opcode, frame.header.request_id));
            pos += used;
        }
        out
    }

    /// Put `bytes` in the connection's input buffer as if read from the socket.
    fn receive(conn: &mut TcpConn, bytes: &[u8]) {
        conn.inbuf[conn.in_len..conn.in_len + bytes.len()].copy_from_slice(bytes);
        conn.in_len += bytes.len();
    }

    #[test]
    fn writes_go_to_the_master_once_there_is_one_and_the_pipeline_bounds_the_pair() {
        let mut req = requests(0.5);
        let now = Instant::now();
        let mut conn = detached(16);
        let mut master = detached(16);
        fill_pair(&mut conn, Some(&mut master), &mut req, 16, now);
        assert_eq!(conn.inflight.len() + master.inflight.len(), 16);
        assert!(!conn.inflight.is_empty() && !master.inflight.is_empty());
        assert!(conn.inflight.iter().all(|r| r.kind == OpKind::Get));
        assert!(master.inflight.iter().all(|r| r.kind == OpKind::Set));
        let get = Opcode::Get as u8;
        let put = Opcode::Put as u8;
        assert!(frames(&conn.out).iter().all(|&(op, _)| op == get));
        assert!(frames(&master.out).iter().all(|&(op, _)| op == put));
        // Each socket numbers its own requests, in the order it sends them.
        let ids: Vec<u32> = master.inflight.iter().map(|r| r.request_id).collect();
        let sent: Vec<u32> = frames(&master.out).iter().map(|&(_, id)| id).collect();
        assert_eq!(ids, sent);
        assert_eq!(ids[0], 1);

        // Full: nothing more until responses make room.
        fill_pair(&mut conn, Some(&mut master), &mut req, 16, now);
        assert_eq!(conn.inflight.len() + master.inflight.len(), 16);
        master.inflight.pop_front();
        fill_pair(&mut conn, Some(&mut master), &mut req, 16, now);
        assert_eq!(conn.inflight.len() + master.inflight.len(), 16);

        // Without a master everything stays on the connection.
        let mut alone = detached(8);
        fill_pair(&mut alone, None, &mut req, 8, now);
        assert_eq!(alone.inflight.len(), 8);
        assert!(alone.inflight.iter().any(|r| r.kind == OpKind::Set));
    }

    #[test]
    fn redirected_writes_are_queued_with_their_key_and_first_send_time() {
        let mut req = requests(0.5);
        let sent = Instant::now() - Duration::from_millis(5);
        let mut conn = detached(4);
        conn.push(&mut req, OpKind::Set, 5, sent);
        conn.push(&mut req, OpKind::Get, 6, sent);
        conn.push(&mut req, OpKind::Set, 7, sent);
        let mut answers = Vec::new();
        let put = Opcode::Put as u8;
        encode_response(&mut answers, put, Status::Redirect, 1, 0, b"127.0.0.1:9");
        encode_response(&mut answers, Opcode::Get as u8, Status::NotFound, 2, 0, b"");
        encode_response(&mut answers, put, Status::Redirect, 3, 0, b"127.0.0.1:10");
        receive(&mut conn, &answers);
        let mut stats = Stats::new();
        assert!(conn.parse_dkvs(Instant::now(), true, &mut stats).is_ok());
        assert!(conn.inflight.is_empty());
        assert_eq!(
            (stats.ops, stats.get_misses, stats.errors.total()),
            (1, 1, 0)
        );
        let keys: Vec<(OpKind, u64)> = conn.redirected.iter().map(|r| (r.kind, r.key)).collect();
        assert_eq!(keys, [(OpKind::Set, 5), (OpKind::Set, 7)]);
        assert!(conn.redirected.iter().all(|r| r.sent_at == sent));
        assert_eq!(conn.redirect_to, b"127.0.0.1:10");

        // Sent again on the master link: new ids there, the original send time kept.
        let mut master = detached(4);
        while let Some(r) = conn.redirected.pop_front() {
            master.push(&mut req, r.kind, r.key, r.sent_at);
        }
        assert_eq!(frames(&master.out), [(put, 1), (put, 2)]);
        assert!(master.inflight.iter().all(|r| r.sent_at == sent));
    }

    #[test]
    fn without_following_a_redirect_is_a_redirect_error() {
        let mut req = requests(0.5);
        let mut conn = detached(2);
        conn.push(&mut req, OpKind::Set, 5, Instant::now());
        let mut answer = Vec::new();
        encode_response(
            &mut answer,
            Opcode::Put as u8,
            Status::Redirect,
            1,
            0,
            b"127.0.0.1:9",
        );
        receive(&mut conn, &answer);
        let mut stats = Stats::new();
        assert!(conn.parse_dkvs(Instant::now(), false, &mut stats).is_ok());
        assert!(conn.redirected.is_empty() && conn.inflight.is_empty());
        assert_eq!(stats.errors.status[REDIRECT as usize], 1);
        assert_eq!(stats.resolved(), 1);
        assert_eq!(stats.redirects, 0);
    }
}
