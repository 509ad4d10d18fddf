//! One client's TCP stream: requests parsed from the input buffer and
//! answered strictly in order, including writes that wait for replication.

use std::collections::VecDeque;
use std::net::SocketAddr;

use byteorder::{BigEndian, ByteOrder};
use log::{debug, info};
use mio::net::TcpStream;

use crate::protocol::peer::is_peer_opcode;
use crate::protocol::resp::is_resp_start;
use crate::protocol::{Decoded, HEADER_LEN, Request, decode};
use crate::replication::ClientRef;

use super::handler::{Core, Outcome, ReplyTarget};
use super::resp::RespConnection;
use super::stream::{Filled, Framed};

/// Replies pending beyond this stop the connection from reading: a client that
/// does not read its replies cannot grow the server's memory.
pub(super) const OUTPUT_HIGH_WATER_BYTES: usize = 256 * 1024;
/// Writes one connection may have waiting for replication; more wait in its input.
pub(super) const MAX_PENDING_WRITES: usize = 1024;
/// Rounds of read-answer-write one wake-up may take (each reads at most one
/// buffer or answers up to the output high-water mark); the rest waits for the
/// next loop iteration, so one flooding client cannot hold the reactor.
const MAX_ROUNDS_PER_TURN: usize = 16;

/// What the reactor should do with the connection next.
#[derive(Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Keep it.
    Open,
    /// Deregister and drop it.
    Closed,
    /// A peer handshake arrived: hand the stream to replication.
    BecomePeer,
}

/// A client connection.
#[derive(Debug)]
pub struct Connection {
    /// The stream and its buffers.
    pub io: Framed,
    peer: SocketAddr,
    /// Slab key, for routing replies and resuming after a full batch.
    pub(super) key: usize,
    /// Never reused, unlike the slab key: a reply for a closed connection is dropped.
    pub(super) conn_id: u64,
    /// Writes waiting for their outcome, in request order, each with its reply once known.
    pub(super) pending: VecDeque<(ClientRef, Option<Vec<u8>>)>,
    /// The poller reported the client's FIN: a short read does not prove the
    /// socket empty any more, the EOF behind the data must still be read.
    read_closed: bool,
    /// Set on EOF or a stream-breaking error: flush what is pending, then close.
    pub(super) closing: bool,
    /// No request has been answered yet: only then may a peer handshake arrive.
    fresh: bool,
    /// A read came back short or empty since the last readiness event: the
    /// socket is empty, and the next edge will say when it is not.
    drained: bool,
    /// The last wake-up stopped at its round budget with work left: the
    /// reactor must resume it (no new edge will come for what is buffered).
    yielded: bool,
    /// The protocol, known from the first byte: dkvs frames or RESP.
    pub(super) resp: Option<Box<RespConnection>>,
    /// The first byte has been seen (the protocol is decided).
    decided: bool,
    /// A successful AUTH was sent (binary or RESP); meaningful only with a password.
    pub(super) authenticated: bool,
    /// Protected mode refuses this client: its first request is answered
    /// `DENIED` (RESP `-DENIED`), then the connection closes.
    pub(super) denied: bool,
}

impl Connection {
    /// Wrap an accepted stream living at slab `key`, with a never-reused `conn_id`.
    pub fn new(stream: TcpStream, peer: SocketAddr, key: usize, conn_id: u64) -> Connection {
        Connection {
            io: Framed::new(stream),
            peer,
            key,
            conn_id,
            pending: VecDeque::new(),
            read_closed: false,
            closing: false,
            drained: false,
            fresh: true,
            yielded: false,
            resp: None,
            decided: false,
            authenticated: false,
            denied: false,
        }
    }

    /// Give up the stream and its buffers (the connection turned into a peer
    /// link), with whether the client's FIN has been reported.
    pub fn into_io(self) -> (Framed, bool) {
        (self.io, self.read_closed)
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The connection's never-reused id.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// Whether the last wake-up stopped at its budget with work left (and forget it).
    pub fn take_yielded(&mut self) -> bool {
        std::mem::take(&mut self.yielded)
    }

    /// Whether writes of this connection still wait for their outcome.
    pub fn owes_replies(&self) -> bool {
        !self.pending.is_empty()
    }

    /// React to readiness (`event`, either direction; `read_closed` when the
    /// peer's FIN is known to have arrived), or resume after replies arrived:
    /// answer buffered frames, write, and read more while that makes progress.
    ///
    /// Edge-triggered readiness is only lost if not drained, so this reads
    /// until a short read or `WouldBlock`; a short read already proves the
    /// socket is empty (unless the FIN came with the data), which saves the
    /// extra `read` per request, and a resumption reads only if the socket was
    /// not known to be empty. It reads only when no complete frame is left
    /// buffered, so the input buffer never holds more than one frame's worth.
    pub fn on_ready(&mut self, core: &mut Core, event: bool, read_closed: bool) -> Liveness {
        if event {
            self.drained = false;
        }
        self.read_closed |= read_closed;
        for round in 0.. {
            if round == MAX_ROUNDS_PER_TURN {
                self.yielded = true;
                break;
            }
            let stop = if self.closing {
                Stop::Closing
            } else {
                self.answer_buffered(core)
            };
            if stop == Stop::Peer {
                return Liveness::BecomePeer;
            }
            if let Err(e) = self.io.flush() {
                debug!("{}: write failed: {e}", self.peer);
                return Liveness::Closed;
            }
            match stop {
                // Answer more once the flush made room; else the WRITABLE edge brings us back.
                Stop::OutputFull if self.io.pending_output() < OUTPUT_HIGH_WATER_BYTES => continue,
                Stop::NeedBytes if !self.drained => {}
                // Waiting for replies (a delivery resumes us), for the client, or done.
                _ => break,
            }
            match self.io.fill() {
                Ok(Filled::Eof) => self.closing = true,
                Ok(Filled::Short) if self.read_closed => {} // the next read returns the EOF
                Ok(Filled::Short) | Ok(Filled::WouldBlock) => self.drained = true,
                Ok(Filled::Full) => {}
                Err(e) => {
                    debug!("{}: read failed: {e}", self.peer);
                    return Liveness::Closed;
                }
            }
        }
        if self.closing && self.io.pending_output() == 0 && self.pending.is_empty() {
            Liveness::Closed
        } else {
            Liveness::Open
        }
    }

    /// A pending write's reply is known: queue it, and every reply now unblocked, in order.
    ///
    /// `encode` appends the reply to the buffer it is given: the output itself
    /// when this write is the oldest pending one (the usual case, no copy), or
    /// a parking buffer until the writes before it are answered.
    pub fn deliver(&mut self, client: ClientRef, encode: impl FnOnce(&mut Vec<u8>)) {
        match self.pending.front() {
            Some((first, None)) if *first == client => {
                encode(&mut self.io.output);
                self.pending.pop_front();
            }
            _ => {
                if let Some(slot) = self.pending.iter_mut().find(|(c, _)| *c == client) {
                    let mut parked = Vec::new();
                    encode(&mut parked);
                    slot.1 = Some(parked);
                }
            }
        }
        while let Some((_, Some(_))) = self.pending.front() {
            if let Some((_, Some(reply))) = self.pending.pop_front() {
                self.io.output.extend_from_slice(&reply);
            }
        }
    }

    /// Answer complete frames in order until the input runs out, replies back
    /// up, or a request must wait; say which.
    fn answer_buffered(&mut self, core: &mut Core) -> Stop {
        if !self.decided {
            let Some(&first) = self.io.buffered().first() else {
                return Stop::NeedBytes;
            };
            self.decided = true;
            // 0xDB (or anything else) is the dkvs protocol, which rejects what it cannot parse.
            if core.resp_enabled && is_resp_start(first) {
                self.fresh = false;
                self.resp = Some(Box::new(RespConnection::new(self.conn_id)));
            }
        }
        if self.resp.is_some() {
            return self.answer_resp(core);
        }
        while self.io.pending_output() < OUTPUT_HIGH_WATER_BYTES {
            let (buffered, output) = self.io.split();
            match decode(buffered, core.max_value_bytes) {
                Ok(Decoded::Frame(frame, used)) => {
                    let id = frame.header.request_id;
                    if is_peer_opcode(frame.header.opcode) && self.fresh {
                        return Stop::Peer;
                    }
                    self.fresh = false;
                    if self.denied {
                        core.deny(frame.header.opcode, id, output);
                        self.io.consume(used);
                        self.closing = true;
                        return Stop::Closing;
                    }
                    let request = Request::from_frame(&frame);
                    let is_write = matches!(&request, Ok(r) if r.opcode().is_write());
                    // Replies go out in request order, and a read must see the
                    // writes sent before it: only writes may queue behind writes.
                    let must_wait = !self.pending.is_empty()
                        && (!is_write || self.pending.len() >= MAX_PENDING_WRITES);
                    if must_wait {
                        return Stop::Waiting;
                    }
                    if is_write && core.batch_full() {
                        core.batch_waiters.push(self.key);
                        return Stop::Waiting;
                    }
                    match request {
                        Ok(Request::Auth { password }) => {
                            // A failed AUTH leaves an authenticated connection so, as Redis.
                            self.authenticated |= core.authenticate(password, id, output);
                        }
                        Ok(request) if core.needs_auth(self.authenticated, request.opcode()) => {
                            core.refuse_unauthenticated(request.opcode(), id, output);
                        }
                        Ok(request) => {
                            let target = ReplyTarget::Tcp {
                                key: self.key,
                                conn_id: self.conn_id,
                            };
                            match core.execute(request, id, target, output) {
                                Outcome::Pending(client) => self.pending.push_back((client, None)),
                                Outcome::Answered => {}
                                Outcome::WaitKey => {
                                    // Not consumed: run again once a write is decided.
                                    core.key_waiters.push(self.key);
                                    return Stop::Waiting;
                                }
                            }
                        }
                        Err(e) => {
                            debug!("{}: rejected request {id}: {e}", self.peer);
                            core.reject(frame.header.opcode, id, &e, output);
                        }
                    }
                    self.io.consume(used);
                }
                Ok(Decoded::Incomplete(need)) => {
                    // A peer handshake is handed over on its header alone: the
                    // link checks its own, tighter limits before any payload.
                    if self.fresh && buffered.len() >= HEADER_LEN && is_peer_opcode(buffered[2]) {
                        return Stop::Peer;
                    }
                    self.io.need(need);
                    return Stop::NeedBytes;
                }
                Err(_) if !self.pending.is_empty() => {
                    // The error reply must follow the replies still owed.
                    return Stop::Waiting;
                }
                Err(e) => {
                    // The stream cannot be split into frames any more: say why, then close.
                    info!("{}: closing connection: {e}", self.peer);
                    let id = BigEndian::read_u32(&buffered[4..8]);
                    core.reject(buffered[2], id, &e, output);
                    self.closing = true;
                    return Stop::Closing;
                }
            }
        }
        Stop::OutputFull
    }
}

/// Why answering buffered frames stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// No complete frame is left: read more.
    NeedBytes,
    /// Replies reached the high-water mark.
    OutputFull,
    /// The next request waits for pending writes, or for the batch to be sent.
    Waiting,
    /// A peer handshake arrived.
    Peer,
    /// The stream is finished (EOF or unparseable): only flushing is left.
    Closing,
}
