//! `--forward-writes`: a slave sends the RESP writes of its clients to its
//! master and answers each client with the master's own reply
//! (docs/PROTOCOL.md §11.8).
//!
//! This is the sans-I/O half: a queue of commands to send, the FIFO of
//! replies expected on the one link to the master, and the replies held until
//! this slave has applied the write (read-your-writes). The reactor
//! (`mod.rs`) owns the socket: it dials when [`Forwarder::wants_link`], writes
//! what [`Forwarder::take_sendable`] gives, feeds every delimited reply to
//! [`Forwarder::on_reply`], and delivers what [`Forwarder::take_ready`] gives.
//!
//! The link speaks RESP2 to the master, so every command the master answers
//! is forwarded with its exact reply (INCR, APPEND, SET ... GET, FLUSHDB, a
//! MULTI/EXEC block), computed where it is atomic. After the commands sent in
//! one flush the forwarder sends `ROLE`: the master runs a read only after
//! every earlier write of the connection is answered, so ROLE's offset is at
//! least the commit sequence number of each of those writes; their replies are
//! held until this slave's `commit_seq` reaches it, or [`RYW_WAIT_MS`] passed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::protocol::resp::Encoder;
use crate::protocol::resp_reply::{encode_command, error_text, master_offset, transcode};
use crate::replication::ClientRef;

/// Forwarded commands one client connection may have unanswered; past it the
/// connection is not read until replies come (backpressure).
pub const MAX_FORWARDED_PER_CONNECTION: usize = 256;
/// Forwarded commands unanswered on the whole slave.
pub const MAX_FORWARDED: usize = 4096;
/// Bytes of forwarded commands queued or unanswered on the whole slave.
pub const MAX_FORWARDED_BYTES: usize = 64 << 20;
/// Longest a reply the master gave is held for this slave to apply the write.
pub const RYW_WAIT_MS: u64 = 1000;
/// After the link failed, new forwarded writes are refused at once for this
/// long (the master is down: answer promptly), then a write dials again.
pub const REDIAL_AFTER_MS: u64 = 250;
/// A dial unanswered for this long fails (as the replication link's).
pub const CONNECT_TIMEOUT_MS: u64 = 500;
/// A link owing replies that brings none for this long is dropped (a master
/// cut off by a partition, or stopped): its writes get "outcome unknown".
/// A master answers every write within its 2PC timeout, far less than this.
pub const REPLY_TIMEOUT_MS: u64 = 5000;

/// Where a forwarded command's reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The client connection's slab key.
    pub key: usize,
    /// Its never-reused id (a reply for a closed connection is dropped).
    pub conn_id: u64,
    /// Its slot in the connection's queue of replies.
    pub client: ClientRef,
    /// The connection's protocol version when it sent the command.
    pub encoder: Encoder,
}

/// What the next reply on the link answers.
#[derive(Debug)]
enum Expect {
    /// The link's AUTH.
    Auth,
    /// MULTI or a queued command's `+QUEUED` of a forwarded transaction.
    Discard,
    /// A client's command, of `bytes` encoded bytes.
    Reply { origin: Origin, bytes: usize },
    /// The ROLE sent after a flush: the master's commit sequence number.
    Seq,
}

/// A reply the master gave, held until this slave applied the write.
#[derive(Debug)]
struct Held {
    origin: Origin,
    reply: Vec<u8>,
    /// The master's commit sequence number once its ROLE answered.
    seq: Option<u64>,
    /// Delivered by then whatever this slave applied.
    deadline: Option<Instant>,
}

/// The link's state, as the forwarder needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No link.
    Down,
    /// Dialled, not yet connected.
    Connecting,
    /// Connected; the AUTH is unanswered.
    Authenticating,
    /// Commands may be sent.
    Up,
}

/// Counters for STATS and INFO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Commands (a MULTI/EXEC block counts once) sent to the master.
    pub forwarded: u64,
    /// Refused without being sent (no master, link down): `-MASTERDOWN`.
    pub refused: u64,
    /// Sent, then the link was lost before the reply: outcome unknown.
    pub outcome_unknown: u64,
    /// Replies delivered before this slave had applied the write.
    pub ryw_timeouts: u64,
    /// Links to the master opened.
    pub links_opened: u64,
}

/// The forwarding state of a slave.
#[derive(Debug)]
pub struct Forwarder {
    /// `--forward-writes`.
    pub enabled: bool,
    /// `--masterauth-file`: sent as `AUTH` first on every link.
    password: Option<Vec<u8>>,
    /// The master's address (`host:port`) while this server follows one.
    target: Option<String>,
    phase: Phase,
    /// Encoded commands not yet written to the link, and what they expect.
    outbox: Vec<u8>,
    unsent: VecDeque<Expect>,
    /// What the replies on the link answer, oldest first.
    sent: VecDeque<Expect>,
    /// Since when replies are owed and none came (`None`: none owed).
    silent_since: Option<Instant>,
    /// Replies the master gave, in arrival order, and their bytes.
    held: VecDeque<Held>,
    held_bytes: usize,
    /// Replies ready for their connections.
    ready: Vec<(Origin, Vec<u8>)>,
    /// Unanswered commands per connection id, and in all.
    per_conn: HashMap<u64, usize>,
    count: usize,
    bytes: usize,
    /// A client command went into the outbox since the last ROLE.
    seq_due: bool,
    /// A ROLE is sent and unanswered: the next waits for it. On the master a
    /// read stops the connection's input until the writes before it are
    /// answered, so a ROLE per flush would give every flush a 2PC round of its
    /// own; one at a time lets the writes sent meanwhile share one.
    seq_in_flight: bool,
    /// Until when new commands are refused, and why (the last failure).
    refuse_until: Option<Instant>,
    failure: String,
    /// Connections that stopped reading at the total cap; resumed on any reply.
    pub waiters: Vec<usize>,
    /// Counters.
    pub stats: ForwardStats,
}

impl Default for Forwarder {
    fn default() -> Forwarder {
        Forwarder::new(false, None)
    }
}

/// The reply to a command never sent (no link to the master).
fn masterdown(why: &str) -> String {
    format!("MASTERDOWN forwarded write not sent: {why}")
}

/// What a master without a password answers AUTH with (§11.7).
const NO_PASSWORD_NEEDLE: &[u8] = b"called without any password configured";

/// The reply to a command sent whose reply never came.
pub const OUTCOME_UNKNOWN: &str = "ERR forwarded write outcome unknown: link to master lost";

impl Forwarder {
    /// A forwarder; `enabled` is `--forward-writes`, `password` `--masterauth-file`.
    pub fn new(enabled: bool, password: Option<Vec<u8>>) -> Forwarder {
        Forwarder {
            enabled,
            password,
            target: None,
            phase: Phase::Down,
            outbox: Vec::new(),
            unsent: VecDeque::new(),
            sent: VecDeque::new(),
            silent_since: None,
            held: VecDeque::new(),
            held_bytes: 0,
            ready: Vec::new(),
            per_conn: HashMap::new(),
            count: 0,
            bytes: 0,
            seq_due: false,
            seq_in_flight: false,
            refuse_until: None,
            failure: String::new(),
            waiters: Vec::new(),
            stats: ForwardStats::default(),
        }
    }

    /// The STATS lines (`name value`).
    pub fn describe(&self) -> String {
        let s = &self.stats;
        format!(
            "forwarded_writes {}\nforwarded_writes_in_flight {}\nforwarded_writes_refused {}\n\
             forwarded_writes_outcome_unknown {}\nforwarded_writes_ryw_timeouts {}\n\
             forward_links_opened {}\n",
            s.forwarded, self.count, s.refused, s.outcome_unknown, s.ryw_timeouts, s.links_opened
        )
    }

    /// The link's phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Commands unanswered (queued, sent or held).
    pub fn in_flight(&self) -> usize {
        self.count
    }

    /// The master this server follows now (`None`: none, e.g. a standby).
    pub fn set_target(&mut self, target: Option<&str>) {
        if self.target.as_deref() != target {
            self.target = target.map(str::to_string);
        }
    }

    /// Whether a connection must stop reading before its next write.
    pub fn at_cap(&self, conn_id: u64) -> bool {
        self.count >= MAX_FORWARDED
            || self.bytes + self.held_bytes >= MAX_FORWARDED_BYTES
            || self.per_conn.get(&conn_id).copied().unwrap_or(0) >= MAX_FORWARDED_PER_CONNECTION
    }

    /// Whether the check for a new command refuses it now, and with what text.
    fn refusal(&self, now: Instant) -> Option<String> {
        if self.target.is_none() {
            return Some(masterdown("this server follows no master now"));
        }
        match self.refuse_until {
            Some(until) if self.phase == Phase::Down && now < until => {
                Some(masterdown(&self.failure))
            }
            _ => None,
        }
    }

    fn admit(&mut self, origin: Origin, bytes: usize) {
        *self.per_conn.entry(origin.conn_id).or_insert(0) += 1;
        self.count += 1;
        self.bytes += bytes;
        self.unsent.push_back(Expect::Reply { origin, bytes });
        self.seq_due = true;
        self.stats.forwarded += 1;
    }

    /// Queue one command for the master; `Err` is the error to answer at
    /// once (the command is not sent).
    pub fn enqueue(&mut self, origin: Origin, args: &[&[u8]], now: Instant) -> Result<(), String> {
        if let Some(refusal) = self.refusal(now) {
            self.stats.refused += 1;
            return Err(refusal);
        }
        let before = self.outbox.len();
        encode_command(&mut self.outbox, args);
        self.admit(origin, self.outbox.len() - before);
        Ok(())
    }

    /// Queue a transaction (MULTI, `commands`, EXEC) as one command: its
    /// reply is EXEC's.
    pub fn enqueue_block(
        &mut self,
        origin: Origin,
        commands: &[Vec<Vec<u8>>],
        now: Instant,
    ) -> Result<(), String> {
        if let Some(refusal) = self.refusal(now) {
            self.stats.refused += 1;
            return Err(refusal);
        }
        let before = self.outbox.len();
        encode_command(&mut self.outbox, &[b"MULTI"]);
        self.unsent.push_back(Expect::Discard);
        for args in commands {
            encode_command(&mut self.outbox, args);
            self.unsent.push_back(Expect::Discard);
        }
        encode_command(&mut self.outbox, &[b"EXEC"]);
        self.admit(origin, self.outbox.len() - before);
        Ok(())
    }

    /// Whether the reactor should dial the master now.
    pub fn wants_link(&self, now: Instant) -> bool {
        self.phase == Phase::Down
            && !self.unsent.is_empty()
            && self.target.is_some()
            && self.refuse_until.is_none_or(|until| now >= until)
    }

    /// The reactor dialled.
    pub fn on_dialing(&mut self) {
        debug_assert_eq!(self.phase, Phase::Down);
        self.phase = Phase::Connecting;
    }

    /// The link connected; returns the bytes to write first (the AUTH).
    pub fn on_connected(&mut self, now: Instant) -> Vec<u8> {
        self.stats.links_opened += 1;
        let mut out = Vec::new();
        match &self.password {
            Some(password) => {
                encode_command(&mut out, &[&b"AUTH"[..], password]);
                self.sent.push_back(Expect::Auth);
                self.silent_since = Some(now);
                self.phase = Phase::Authenticating;
            }
            None => self.phase = Phase::Up,
        }
        out
    }

    /// Bytes to write to the link now (empty before it is up): every queued
    /// command, then a ROLE for the read-your-writes position.
    pub fn take_sendable(&mut self, now: Instant) -> Vec<u8> {
        if self.seq_due && !self.seq_in_flight {
            encode_command(&mut self.outbox, &[b"ROLE"]);
            self.unsent.push_back(Expect::Seq);
            self.seq_due = false;
            self.seq_in_flight = true;
        }
        if self.phase != Phase::Up || self.unsent.is_empty() {
            return Vec::new();
        }
        if self.sent.is_empty() {
            self.silent_since = Some(now);
        }
        self.sent.extend(self.unsent.drain(..));
        std::mem::take(&mut self.outbox)
    }

    /// One complete reply (delimited by `resp_reply::reply_len`) arrived;
    /// `Err`: the link must be dropped (it answered what nobody asked, or
    /// refused the AUTH).
    pub fn on_reply(&mut self, reply: &[u8], now: Instant) -> Result<(), String> {
        let Some(expect) = self.sent.pop_front() else {
            return Err("the master sent a reply nobody asked for".into());
        };
        self.silent_since = (!self.sent.is_empty()).then_some(now);
        match expect {
            Expect::Auth => {
                // A master without a password refuses AUTH <password> with
                // this text, and serves the link all the same (as a Redis
                // replica whose masterauth the master does not need goes on).
                let unneeded = |text: &[u8]| {
                    text.windows(NO_PASSWORD_NEEDLE.len())
                        .any(|w| w == NO_PASSWORD_NEEDLE)
                };
                if let Some(text) = error_text(reply).filter(|t| !unneeded(t)) {
                    return Err(format!(
                        "the master refused AUTH (--masterauth-file): {}",
                        String::from_utf8_lossy(text)
                    ));
                }
                self.phase = Phase::Up;
            }
            Expect::Discard => {}
            Expect::Reply { origin, bytes } => {
                self.bytes -= bytes;
                let mut out = Vec::with_capacity(reply.len());
                transcode(reply, origin.encoder.0, &mut out);
                self.held_bytes += out.len();
                self.held.push_back(Held {
                    origin,
                    reply: out,
                    seq: None,
                    deadline: None,
                });
            }
            Expect::Seq => {
                self.seq_in_flight = false;
                // Replies come in order: every command sent before this ROLE
                // has answered, none sent after it has. An error (a master whose lease is not known valid) or a
                // server that is no longer master gives no position: deliver.
                let seq = master_offset(reply).unwrap_or(0);
                let deadline = now + Duration::from_millis(RYW_WAIT_MS);
                for held in self.held.iter_mut().filter(|h| h.seq.is_none()) {
                    held.seq = Some(seq);
                    held.deadline = Some(deadline);
                }
            }
        }
        Ok(())
    }

    /// The link failed (or was dropped): commands sent get "outcome unknown",
    /// those never sent `-MASTERDOWN`, held replies are delivered as they are.
    pub fn on_link_lost(&mut self, why: &str, now: Instant) {
        // An idle link the master closed (its --timeout) says nothing about the
        // master: the next write dials again at once. A failed dial, AUTH or
        // a link lost with commands on it refuses new ones for a moment.
        let idle = self.phase == Phase::Up && self.sent.is_empty() && self.unsent.is_empty();
        self.phase = Phase::Down;
        self.silent_since = None;
        self.failure = why.to_string();
        if !idle {
            self.refuse_until = Some(now + Duration::from_millis(REDIAL_AFTER_MS));
        }
        for held in self.held.iter_mut() {
            held.seq = Some(held.seq.unwrap_or(0));
        }
        let mut failed = Vec::new();
        for expect in self.sent.drain(..) {
            if let Expect::Reply { origin, bytes } = expect {
                self.stats.outcome_unknown += 1;
                failed.push((origin, bytes, OUTCOME_UNKNOWN.to_string()));
            }
        }
        let refusal = masterdown(why);
        for expect in self.unsent.drain(..) {
            if let Expect::Reply { origin, bytes } = expect {
                self.stats.refused += 1;
                failed.push((origin, bytes, refusal.clone()));
            }
        }
        self.outbox.clear();
        self.seq_due = false;
        self.seq_in_flight = false;
        self.release(u64::MAX, now);
        for (origin, bytes, text) in failed {
            self.bytes -= bytes;
            let mut out = Vec::new();
            origin.encoder.error(&mut out, &text);
            self.finish(origin, out);
        }
    }

    fn finish(&mut self, origin: Origin, reply: Vec<u8>) {
        if let Some(n) = self.per_conn.get_mut(&origin.conn_id) {
            *n -= 1;
            if *n == 0 {
                self.per_conn.remove(&origin.conn_id);
            }
        }
        self.count -= 1;
        self.ready.push((origin, reply));
    }

    /// Move to the ready list every held reply whose write this slave has
    /// applied (`commit_seq`), or that waited [`RYW_WAIT_MS`], in order.
    pub fn release(&mut self, commit_seq: u64, now: Instant) {
        while let Some(front) = self.held.front() {
            let Some(seq) = front.seq else { break };
            if seq > commit_seq {
                if front.deadline.is_some_and(|d| now < d) {
                    break;
                }
                self.stats.ryw_timeouts += 1;
            }
            if let Some(held) = self.held.pop_front() {
                self.held_bytes -= held.reply.len();
                self.finish(held.origin, held.reply);
            }
        }
    }

    /// Whether the link owes replies and brought none for [`REPLY_TIMEOUT_MS`].
    pub fn silent_too_long(&self, now: Instant) -> bool {
        self.silent_since
            .is_some_and(|since| now >= since + Duration::from_millis(REPLY_TIMEOUT_MS))
    }

    /// When [`release`](Forwarder::release) or [`silent_too_long`](Forwarder::silent_too_long)
    /// must be asked again at the latest.
    pub fn next_deadline(&self) -> Option<Instant> {
        let silent = self
            .silent_since
            .map(|since| since + Duration::from_millis(REPLY_TIMEOUT_MS));
        let held = self.held.front().and_then(|h| h.deadline);
        match (silent, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Replies ready for their connections, in order.
    pub fn take_ready(&mut self) -> Vec<(Origin, Vec<u8>)> {
        std::mem::take(&mut self.ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::resp::RespVersion;

    const RESP2: Encoder = Encoder(RespVersion::Two);

    fn origin(conn_id: u64, client: u64) -> Origin {
        Origin {
            key: conn_id as usize,
            conn_id,
            client: ClientRef(client),
            encoder: RESP2,
        }
    }

    fn up(f: &mut Forwarder) {
        f.set_target(Some("127.0.0.1:9099"));
    }

    fn replies(f: &mut Forwarder) -> Vec<(u64, Vec<u8>)> {
        f.take_ready()
            .into_iter()
            .map(|(o, r)| (o.client.0, r))
            .collect()
    }

    #[test]
    fn replies_are_matched_in_order_and_held_until_applied() {
        let now = Instant::now();
        let mut f = Forwarder::new(true, None);
        up(&mut f);
        f.enqueue(origin(1, 1), &[b"SET", b"k", b"v"], now)
            .expect("queued");
        f.enqueue(origin(2, 2), &[b"INCR", b"n"], now)
            .expect("queued");
        assert!(f.wants_link(now));
        assert!(
            f.take_sendable(now).is_empty(),
            "nothing is sent before the link is up"
        );
        f.on_dialing();
        assert!(f.on_connected(now).is_empty(), "no password: no AUTH");
        let sent = f.take_sendable(now);
        assert!(sent.ends_with(b"*1\r\n$4\r\nROLE\r\n"), "{sent:?}");
        f.on_reply(b"+OK\r\n", now).expect("expected");
        f.on_reply(b":7\r\n", now).expect("expected");
        f.release(100, now);
        assert!(
            replies(&mut f).is_empty(),
            "held until ROLE says where they committed"
        );
        f.on_reply(b"*3\r\n$6\r\nmaster\r\n:12\r\n*0\r\n", now)
            .expect("expected");
        f.release(11, now);
        assert!(
            replies(&mut f).is_empty(),
            "this slave has not applied seq 12 yet"
        );
        f.release(12, now);
        assert_eq!(
            replies(&mut f),
            vec![(1, b"+OK\r\n".to_vec()), (2, b":7\r\n".to_vec())]
        );
        assert_eq!(f.in_flight(), 0);
        assert!(f.on_reply(b"+OK\r\n", now).is_err(), "nobody asked");
    }

    #[test]
    fn one_role_at_a_time_covers_the_writes_sent_while_it_was_out() {
        let now = Instant::now();
        let mut f = Forwarder::new(true, None);
        up(&mut f);
        f.on_dialing();
        f.on_connected(now);
        f.enqueue(origin(1, 1), &[b"SET", b"a", b"1"], now)
            .expect("queued");
        let first = f.take_sendable(now);
        assert!(first.ends_with(b"*1\r\n$4\r\nROLE\r\n"));
        f.enqueue(origin(2, 2), &[b"SET", b"b", b"2"], now)
            .expect("queued");
        let second = f.take_sendable(now);
        assert!(!second.ends_with(b"ROLE\r\n"), "a ROLE is out: none more");
        f.on_reply(b"+OK\r\n", now).expect("a");
        f.on_reply(b"*3\r\n$6\r\nmaster\r\n:5\r\n*0\r\n", now)
            .expect("role");
        f.on_reply(b"+OK\r\n", now).expect("b");
        f.release(5, now);
        assert_eq!(
            replies(&mut f),
            vec![(1, b"+OK\r\n".to_vec())],
            "b waits for its ROLE"
        );
        // The answered ROLE lets the next one go, for b.
        assert_eq!(f.take_sendable(now), b"*1\r\n$4\r\nROLE\r\n");
        f.on_reply(b"*3\r\n$6\r\nmaster\r\n:6\r\n*0\r\n", now)
            .expect("role");
        f.release(5, now);
        assert!(replies(&mut f).is_empty());
        f.release(6, now);
        assert_eq!(replies(&mut f), vec![(2, b"+OK\r\n".to_vec())]);
    }

    #[test]
    fn a_held_reply_goes_out_after_the_wait_even_if_not_applied() {
        let now = Instant::now();
        let mut f = Forwarder::new(true, None);
        up(&mut f);
        f.enqueue(origin(1, 1), &[b"DEL", b"k"], now)
            .expect("queued");
        f.on_dialing();
        f.on_connected(now);
        f.take_sendable(now);
        f.on_reply(b":1\r\n", now).expect("expected");
        f.on_reply(b"*3\r\n$6\r\nmaster\r\n:9\r\n*0\r\n", now)
            .expect("expected");
        let deadline = f.next_deadline().expect("a deadline");
        f.release(3, deadline - Duration::from_millis(1));
        assert!(replies(&mut f).is_empty());
        f.release(3, deadline);
        assert_eq!(replies(&mut f), vec![(1, b":1\r\n".to_vec())]);
        assert_eq!(f.stats.ryw_timeouts, 1);
    }

    #[test]
    fn a_lost_link_fails_sent_writes_as_unknown_and_unsent_as_masterdown() {
        let now = Instant::now();
        let mut f = Forwarder::new(true, Some(b"pw".to_vec()));
        up(&mut f);
        f.enqueue(origin(1, 1), &[b"SET", b"a", b"1"], now)
            .expect("queued");
        f.on_dialing();
        let auth = f.on_connected(now);
        assert_eq!(auth, b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n");
        assert!(
            f.take_sendable(now).is_empty(),
            "commands wait for the AUTH's answer"
        );
        f.on_reply(b"+OK\r\n", now).expect("auth");
        f.take_sendable(now);
        f.on_reply(b"+OK\r\n", now).expect("expected");
        f.enqueue(origin(1, 2), &[b"SET", b"b", b"2"], now)
            .expect("queued");
        f.on_link_lost("connection reset", now);
        let got = replies(&mut f);
        assert_eq!(
            got[0],
            (1, b"+OK\r\n".to_vec()),
            "the answered one keeps its answer"
        );
        assert_eq!(
            got[1],
            (
                2,
                b"-MASTERDOWN forwarded write not sent: connection reset\r\n".to_vec()
            )
        );
        assert_eq!(f.in_flight(), 0);
        // Refused at once for a moment, then a new write dials again.
        let err = f.enqueue(origin(1, 3), &[b"SET", b"c", b"3"], now);
        assert!(err.is_err_and(|e| e.starts_with("MASTERDOWN")));
        let later = now + Duration::from_millis(REDIAL_AFTER_MS);
        f.enqueue(origin(1, 4), &[b"SET", b"c", b"3"], later)
            .expect("queued");
        assert!(f.wants_link(later));
        f.on_dialing();
        f.on_connected(now);
        f.on_reply(b"+OK\r\n", later).expect("auth");
        f.take_sendable(now);
        f.on_link_lost("reset again", later);
        assert_eq!(
            replies(&mut f),
            vec![(4, format!("-{OUTCOME_UNKNOWN}\r\n").into_bytes())]
        );
        assert_eq!((f.stats.outcome_unknown, f.stats.refused), (1, 2));
    }

    #[test]
    fn a_silent_link_owing_replies_is_given_up() {
        let now = Instant::now();
        let mut f = Forwarder::new(true, None);
        up(&mut f);
        f.enqueue(origin(1, 1), &[b"SET", b"a", b"1"], now)
            .expect("queued");
        f.on_dialing();
        f.on_connected(now);
        assert!(!f.silent_too_long(now), "nothing owed yet");
        f.take_sendable(now);
        let timeout = Duration::from_millis(REPLY_TIMEOUT_MS);
        assert_eq!(f.next_deadline(), Some(now + timeout));
        // A reply restarts the clock; the ROLE is still owed.
        let later = now + timeout / 2;
        f.on_reply(b"+OK\r\n", later).expect("expected");
        assert!(!f.silent_too_long(now + timeout));
        assert!(f.silent_too_long(later + timeout));
        f.on_reply(b"*3\r\n$6\r\nmaster\r\n:1\r\n*0\r\n", later)
            .expect("expected");
        assert!(!f.silent_too_long(later + 2 * timeout), "nothing owed");
    }

    #[test]
    fn a_refused_auth_drops_the_link() {
        let now = Instant::now();
        let mut f = Forwarder::new(true, Some(b"bad".to_vec()));
        up(&mut f);
        f.enqueue(origin(1, 1), &[b"SET", b"a", b"1"], now)
            .expect("queued");
        f.on_dialing();
        f.on_connected(now);
        let err = f.on_reply(b"-WRONGPASS invalid username-password pair\r\n", now);
        assert!(err.is_err_and(|e| e.contains("WRONGPASS")));
        // A master that needs no password: the link goes on.
        let mut f = Forwarder::new(true, Some(b"pw".to_vec()));
        up(&mut f);
        f.on_dialing();
        f.on_connected(now);
        let unneeded = b"-ERR AUTH <password> called without any password configured for the \
              default user. Are you sure your configuration is correct?\r\n";
        f.on_reply(unneeded, now).expect("served all the same");
        assert_eq!(f.phase(), Phase::Up);
    }

    #[test]
    fn a_transaction_is_one_command_whose_reply_is_execs() {
        let now = Instant::now();
        let mut f = Forwarder::new(true, None);
        up(&mut f);
        let block = vec![
            vec![b"SET".to_vec(), b"a".to_vec(), b"1".to_vec()],
            vec![b"GET".to_vec(), b"missing".to_vec()],
        ];
        let mut o = origin(1, 1);
        o.encoder = Encoder(RespVersion::Three);
        f.enqueue_block(o, &block, now).expect("queued");
        f.on_dialing();
        f.on_connected(now);
        let sent = f.take_sendable(now);
        assert!(sent.starts_with(b"*1\r\n$5\r\nMULTI\r\n"));
        for reply in [&b"+OK\r\n"[..], b"+QUEUED\r\n", b"+QUEUED\r\n"] {
            f.on_reply(reply, now).expect("expected");
        }
        f.on_reply(b"*2\r\n+OK\r\n$-1\r\n", now).expect("expected");
        f.on_reply(b"-MASTERDOWN lease\r\n", now).expect("expected");
        f.release(0, now);
        // A RESP3 client gets RESP3's null; the master's ROLE error releases at once.
        assert_eq!(replies(&mut f), vec![(1, b"*2\r\n+OK\r\n_\r\n".to_vec())]);
    }

    #[test]
    fn caps_bound_each_connection_and_the_whole_slave() {
        let now = Instant::now();
        let mut f = Forwarder::new(true, None);
        up(&mut f);
        for i in 0..MAX_FORWARDED_PER_CONNECTION as u64 {
            assert!(!f.at_cap(1));
            f.enqueue(origin(1, i + 1), &[b"INCR", b"n"], now)
                .expect("queued");
        }
        assert!(f.at_cap(1));
        assert!(!f.at_cap(2), "another connection may still forward");
        // The total cap holds whoever asks.
        for c in 2..=(MAX_FORWARDED / MAX_FORWARDED_PER_CONNECTION) as u64 {
            for i in 0..MAX_FORWARDED_PER_CONNECTION as u64 {
                f.enqueue(origin(c, c * 1000 + i), &[b"INCR", b"n"], now)
                    .expect("queued");
            }
        }
        assert_eq!(f.in_flight(), MAX_FORWARDED);
        assert!(f.at_cap(9999), "every connection waits at the total cap");
        // Without a master nothing is queued at all.
        f.set_target(None);
        let refused = f.enqueue(origin(3, 99999), &[b"SET", b"k", b"v"], now);
        assert!(refused.is_err_and(|e| e.contains("follows no master")));
    }
}
