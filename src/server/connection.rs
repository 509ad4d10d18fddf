//! One client's TCP stream: requests parsed from the input buffer and
//! answered strictly in order, including writes that wait for replication.

use std::collections::VecDeque;
use std::io::{Read, Write};
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

/// A client connection over transport `S` (a socket but in unit tests).
#[derive(Debug)]
pub struct Connection<S = TcpStream> {
    /// The stream and its buffers.
    pub io: Framed<S>,
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

impl<S: Read + Write> Connection<S> {
    /// Wrap an accepted stream living at slab `key`, with a never-reused `conn_id`.
    pub fn new(stream: S, peer: SocketAddr, key: usize, conn_id: u64) -> Connection<S> {
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
    pub fn into_io(self) -> (Framed<S>, bool) {
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
        // Where the loop stopped before its next read (replies backed up), a
        // frame consumed last may have left the buffer empty but grown.
        self.io.settle();
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

/// The connection's real buffers, budgets and limits driven through an
/// in-memory transport: no socket, no timing, the same on every run.
#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::protocol::{Opcode, Response, Status, encode_request};
    use crate::server::handler::Mode;
    use crate::server::limits::InputBudget;
    use crate::server::stream::testing::MemTransport;

    const RESTING: usize = 4 * 1024;

    fn connection() -> Connection<MemTransport> {
        let addr = "127.0.0.1:1".parse().expect("an address");
        Connection::new(MemTransport::new(usize::MAX), addr, 0, 1)
    }

    fn core() -> Core {
        Core::new(1 << 20, Mode::Master)
    }

    fn request(op: Opcode, id: u32, key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request(&mut out, op, id, key, value);
        out
    }

    /// The header and key of a request whose value is `value_len` bytes, none of them sent.
    fn header_of(op: Opcode, id: u32, key: &[u8], value_len: u32) -> Vec<u8> {
        let mut out = request(op, id, key, b"");
        out[20..24].copy_from_slice(&value_len.to_be_bytes());
        out
    }

    /// Every response in `bytes`, which must hold whole frames only.
    fn responses(bytes: &[u8]) -> Vec<Response> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            match decode(rest, usize::MAX).expect("a response frame") {
                Decoded::Frame(frame, used) => {
                    out.push(Response::from_frame(&frame).expect("a response"));
                    rest = &rest[used..];
                }
                Decoded::Incomplete(_) => panic!("a partial response"),
            }
        }
        out
    }

    /// The client sends `bytes` and the reactor reports readability.
    fn arrive(conn: &mut Connection<MemTransport>, core: &mut Core, bytes: &[u8]) -> Liveness {
        conn.io.stream.send(bytes);
        conn.on_ready(core, true, false)
    }

    /// Resume the connection as the reactor does while it yields; say how many wake-ups it took.
    fn run_until_settled(conn: &mut Connection<MemTransport>, core: &mut Core) -> usize {
        let mut turns = 0;
        while conn.take_yielded() {
            turns += 1;
            assert_eq!(conn.on_ready(core, false, false), Liveness::Open);
            assert!(turns < 1_000_000, "the connection settles");
        }
        turns
    }

    /// Requests that are answered at once (no write waits for replication),
    /// including one the server rejects and keeps serving after.
    fn mixed_requests() -> Vec<u8> {
        let mut bytes = request(Opcode::Ping, 1, b"", b"");
        bytes.extend(request(Opcode::Get, 2, b"absent", b""));
        bytes.extend(request(Opcode::Get, 3, b"k", b"an unexpected value"));
        bytes.extend(request(Opcode::Get, 4, &[b'k'; 5000], b""));
        bytes.extend(request(Opcode::Ping, 5, b"", b""));
        bytes
    }

    /// `bytes` arriving in two reads, split at each byte, is answered with `expected`.
    fn assert_every_split_answers(bytes: &[u8], expected: &[u8]) {
        for split in 1..bytes.len() {
            let mut conn = connection();
            let mut core = self::core();
            assert_eq!(
                arrive(&mut conn, &mut core, &bytes[..split]),
                Liveness::Open
            );
            assert_eq!(
                arrive(&mut conn, &mut core, &bytes[split..]),
                Liveness::Open
            );
            assert_eq!(conn.io.stream.written, expected, "split at byte {split}");
        }
    }

    #[test]
    fn a_stream_split_at_any_byte_parses_as_the_whole() {
        let bytes = mixed_requests();
        let mut whole = connection();
        let mut core = core();
        assert_eq!(arrive(&mut whole, &mut core, &bytes), Liveness::Open);
        let expected = whole.io.stream.take_written();
        let ids: Vec<u32> = responses(&expected).iter().map(|r| r.request_id).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        assert_every_split_answers(&bytes, &expected);
        // One byte per read and per readiness event.
        let mut conn = connection();
        let mut core = self::core();
        for byte in &bytes {
            assert_eq!(arrive(&mut conn, &mut core, &[*byte]), Liveness::Open);
        }
        assert_eq!(conn.io.stream.written, expected, "one byte at a time");
    }

    #[test]
    fn a_resp_stream_split_at_any_byte_parses_as_the_whole() {
        let bytes: &[u8] = b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n\
                             *1\r\n$7\r\nNOTACMD\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$3\r\nabc\r\n";
        let mut whole = connection();
        let mut core = core();
        assert_eq!(arrive(&mut whole, &mut core, bytes), Liveness::Open);
        let expected = whole.io.stream.take_written();
        assert_eq!(
            expected,
            b"+PONG\r\n$-1\r\n-ERR unknown command 'NOTACMD', with args beginning with: \r\n+PONG\r\n$3\r\nabc\r\n"
        );
        assert_every_split_answers(bytes, &expected);
    }

    #[test]
    fn the_input_buffer_grows_with_the_bytes_received_never_to_a_declared_length() {
        let mut core = Core::new(2 << 20, Mode::Master);
        let budget = Rc::new(InputBudget::new(usize::MAX));
        let mut conn = connection();
        conn.io.set_budget(Rc::clone(&budget));
        // A GET declaring a value of 1 MiB + 16 KiB (rejected once whole: a GET takes no
        // value, but the frame is delimited, so the connection keeps serving).
        let value_len = (1 << 20) + (16 << 10);
        let mut bytes = header_of(Opcode::Get, 7, b"k", value_len);
        bytes.extend([b'v'; 100]);
        assert_eq!(arrive(&mut conn, &mut core, &bytes), Liveness::Open);
        assert_eq!(
            conn.io.input_len(),
            RESTING,
            "a few bytes fit the resting buffer"
        );
        assert_eq!(budget.used(), 0);
        // Each growth is by half the buffer, and only once it is full of bytes that came.
        let mut received = bytes.len();
        let chunk = vec![b'v'; 10_000];
        while received + chunk.len() < HEADER_LEN + 1 + value_len as usize {
            assert_eq!(arrive(&mut conn, &mut core, &chunk), Liveness::Open);
            received += chunk.len();
            assert!(
                conn.io.input_len() <= (received * 3 / 2).max(RESTING),
                "{} bytes of buffer for {received} received",
                conn.io.input_len()
            );
            assert_eq!(budget.used(), conn.io.input_len() - RESTING);
        }
        assert!(conn.io.stream.written.is_empty(), "nothing answered yet");
        let rest = HEADER_LEN + 1 + value_len as usize - received;
        assert_eq!(
            arrive(&mut conn, &mut core, &vec![b'v'; rest]),
            Liveness::Open
        );
        let replies = responses(&conn.io.stream.take_written());
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].status, Ok(Status::InvalidArgument));
        assert_eq!(replies[0].request_id, 7);
        // The grown buffer is given back at once: the read that completed the
        // frame filled it exactly, so the connection read again and found it empty.
        assert_eq!(conn.io.input_len(), RESTING);
        assert_eq!(budget.used(), 0);
        assert_eq!(
            arrive(&mut conn, &mut core, &request(Opcode::Ping, 8, b"", b"")),
            Liveness::Open
        );
        let replies = responses(&conn.io.stream.take_written());
        assert_eq!(replies[0].status, Ok(Status::Ok));
    }

    /// The read that completes a large frame fills the grown buffer exactly
    /// (growth stops at the frame's length), so the connection reads once
    /// more, finds the buffer empty and gives it back.
    #[test]
    fn a_large_write_waiting_for_replication_holds_no_input_buffer() {
        let mut core = core();
        let budget = Rc::new(InputBudget::new(usize::MAX));
        let put = request(Opcode::Put, 1, b"k", &vec![b'v'; 1 << 20]);
        let mut set = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048576\r\n".to_vec();
        set.extend(vec![b'v'; 1 << 20]);
        set.extend(b"\r\n");
        for bytes in [put, set] {
            let mut conn = connection();
            conn.io.set_budget(Rc::clone(&budget));
            for chunk in bytes.chunks(64 << 10) {
                assert_eq!(arrive(&mut conn, &mut core, chunk), Liveness::Open);
            }
            assert!(conn.owes_replies(), "the write waits for its outcome");
            assert!(budget.refusals() == 0 && conn.io.bytes_read() == bytes.len() as u64);
            assert_eq!(conn.io.input_len(), RESTING);
            assert_eq!(budget.used(), 0);
        }
        assert_eq!(core.batch.len(), 2);
    }

    /// A client that stops reading once the reply to a large frame takes its
    /// replies over the high-water mark: the server stops before its next
    /// read, the frame is consumed and none is partial, so neither timeout
    /// applies (it owes replies); the grown buffer must not stay charged.
    #[test]
    fn a_large_frame_answered_into_a_full_output_leaves_no_grown_buffer() {
        let one_reply = |bytes: &[u8]| {
            let mut conn = connection();
            assert_eq!(arrive(&mut conn, &mut core(), bytes), Liveness::Open);
            conn.io.stream.written.len()
        };
        let small = request(Opcode::Get, 1, b"absent", b"");
        let big = request(Opcode::Get, 2, b"k", &vec![b'v'; 1 << 20]);
        let (small_reply, big_reply) = (one_reply(&small), one_reply(&big));
        // The small replies stay under the mark; the big frame's takes them over it.
        let before = (OUTPUT_HIGH_WATER_BYTES - 1) / small_reply;
        assert!(before * small_reply + big_reply >= OUTPUT_HIGH_WATER_BYTES);
        let mut bytes = small.repeat(before);
        bytes.extend(&big);
        let mut core = core();
        let budget = Rc::new(InputBudget::new(usize::MAX));
        let mut conn = connection();
        conn.io.set_budget(Rc::clone(&budget));
        conn.io.stream.write_capacity = 0;
        assert_eq!(arrive(&mut conn, &mut core, &bytes), Liveness::Open);
        run_until_settled(&mut conn, &mut core);
        assert_eq!(conn.io.stream.unread(), 0);
        assert!(conn.io.buffered().is_empty(), "every frame is consumed");
        assert!(conn.io.pending_output() >= OUTPUT_HIGH_WATER_BYTES);
        assert!(!conn.io.activity(conn.owes_replies()).partial_frame);
        assert_eq!(conn.io.input_len(), RESTING);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn partial_frames_share_one_budget_and_a_frame_beyond_it_closes_its_connection() {
        let mut core = core();
        let budget = Rc::new(InputBudget::new(64 << 10));
        let partial = |value_len: u32, sent: usize| {
            let mut bytes = header_of(Opcode::Put, 1, b"k", value_len);
            bytes.extend(vec![b'v'; sent]);
            bytes
        };
        let mut first = connection();
        first.io.set_budget(Rc::clone(&budget));
        assert_eq!(
            arrive(&mut first, &mut core, &partial(50_000, 40_000)),
            Liveness::Open
        );
        let held = budget.used();
        assert!(held > 0 && held <= 50_025 - RESTING, "{held} bytes charged");
        // A second partial frame does not fit in what is left: its connection closes, unanswered.
        let mut second = connection();
        second.io.set_budget(Rc::clone(&budget));
        assert_eq!(
            arrive(&mut second, &mut core, &partial(50_000, 40_000)),
            Liveness::Closed
        );
        assert!(second.io.stream.written.is_empty());
        assert_eq!(budget.refusals(), 1);
        drop(second);
        assert_eq!(budget.used(), held, "the refused connection held no charge");
        // A small frame needs no growth: served whatever the budget.
        let mut third = connection();
        third.io.set_budget(Rc::clone(&budget));
        let ping = request(Opcode::Ping, 2, b"", b"");
        assert_eq!(arrive(&mut third, &mut core, &ping), Liveness::Open);
        assert_eq!(responses(&third.io.stream.written).len(), 1);
        // Closing the first mid-frame gives its charge back.
        drop(first);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_flooding_client_gets_a_bounded_number_of_reads_per_wake_up() {
        let mut core = core();
        let mut conn = connection();
        let count = 20_000u32;
        let mut bytes = Vec::new();
        for id in 0..count {
            bytes.extend(request(Opcode::Ping, id, b"", b""));
        }
        conn.io.stream.send(&bytes);
        assert_eq!(conn.on_ready(&mut core, true, false), Liveness::Open);
        assert_eq!(conn.io.stream.reads, MAX_ROUNDS_PER_TURN);
        assert!(
            conn.io.stream.unread() > 0,
            "the rest waits for the next turn"
        );
        let mut reads = conn.io.stream.reads;
        let mut turns = 0;
        while conn.take_yielded() {
            turns += 1;
            assert_eq!(conn.on_ready(&mut core, false, false), Liveness::Open);
            let now = conn.io.stream.reads;
            assert!(
                now - reads <= MAX_ROUNDS_PER_TURN,
                "{} reads in one turn",
                now - reads
            );
            reads = now;
        }
        // Each read fills the 4 KiB buffer: 170 requests, so 20,000 take 118 reads.
        assert!(turns >= 6, "{turns} turns");
        assert_eq!(conn.io.stream.unread(), 0);
        let replies = responses(&conn.io.stream.written);
        assert_eq!(replies.len(), count as usize);
        assert!(
            replies
                .iter()
                .enumerate()
                .all(|(i, r)| r.request_id == i as u32)
        );
    }

    #[test]
    fn a_client_that_does_not_read_its_replies_is_not_read_from() {
        let count = 80_000;
        let binary: Vec<u8> = (0..count)
            .flat_map(|id| request(Opcode::Get, id, b"absent", b""))
            .collect();
        let resp = b"*2\r\n$3\r\nGET\r\n$6\r\nabsent\r\n".repeat(count as usize);
        for bytes in [binary, resp] {
            let mut core = core();
            let mut conn = connection();
            conn.io.stream.write_capacity = 0;
            conn.io.stream.send(&bytes);
            assert_eq!(conn.on_ready(&mut core, true, false), Liveness::Open);
            run_until_settled(&mut conn, &mut core);
            let pending = conn.io.pending_output();
            let read = conn.io.bytes_read();
            assert!(
                pending >= OUTPUT_HIGH_WATER_BYTES,
                "{pending} bytes of replies queued"
            );
            assert!(
                conn.io.stream.unread() > 0,
                "the rest is left in the socket"
            );
            // Readiness without room to write changes nothing.
            for _ in 0..10 {
                assert_eq!(conn.on_ready(&mut core, true, false), Liveness::Open);
                assert!(!conn.take_yielded());
            }
            assert_eq!(conn.io.bytes_read(), read);
            assert_eq!(conn.io.pending_output(), pending);
            // The client reads: the server writes, then reads and answers the rest.
            conn.io.stream.write_capacity = usize::MAX;
            assert_eq!(conn.on_ready(&mut core, true, false), Liveness::Open);
            run_until_settled(&mut conn, &mut core);
            assert_eq!(conn.io.stream.unread(), 0);
            assert_eq!(conn.io.pending_output(), 0);
            let written = &conn.io.stream.written;
            if conn.resp.is_some() {
                assert_eq!(*written, b"$-1\r\n".repeat(count as usize));
            } else {
                let replies = responses(written);
                assert_eq!(replies.len(), count as usize);
                assert!(replies.iter().all(|r| r.status == Ok(Status::NotFound)));
            }
        }
    }

    #[test]
    fn an_oversized_frame_is_answered_too_large_after_earlier_replies_then_closed() {
        let mut core = core();
        let mut conn = connection();
        conn.io.stream.write_capacity = 10;
        let mut bytes = request(Opcode::Ping, 1, b"", b"");
        bytes.extend(header_of(Opcode::Put, 2, b"k", (1 << 20) + 1));
        bytes.extend([b'v'; 1000]);
        bytes.extend(request(Opcode::Ping, 3, b"", b""));
        // The replies do not fit the socket yet: the connection stays until they are sent.
        assert_eq!(arrive(&mut conn, &mut core, &bytes), Liveness::Open);
        conn.io.stream.write_capacity = usize::MAX;
        assert_eq!(conn.on_ready(&mut core, true, false), Liveness::Closed);
        let replies = responses(&conn.io.stream.written);
        assert_eq!(replies.len(), 2, "nothing after the bad frame is answered");
        assert_eq!(
            (replies[0].request_id, replies[0].status),
            (1, Ok(Status::Ok))
        );
        assert_eq!(
            (replies[1].request_id, replies[1].status),
            (2, Ok(Status::TooLarge))
        );
        assert_eq!(
            conn.io.input_len(),
            RESTING,
            "no byte of the value was buffered for"
        );
    }

    #[test]
    fn a_half_closed_client_gets_its_replies_then_the_connection_closes() {
        let mut core = core();
        let mut conn = connection();
        let mut bytes = request(Opcode::Ping, 1, b"", b"");
        bytes.extend(&request(Opcode::Ping, 2, b"", b"")[..10]);
        conn.io.stream.send(&bytes);
        conn.io.stream.eof = true;
        assert_eq!(conn.on_ready(&mut core, true, true), Liveness::Closed);
        let replies = responses(&conn.io.stream.written);
        assert_eq!(replies.len(), 1, "the partial frame is discarded");
        assert_eq!(replies[0].request_id, 1);
    }
}
