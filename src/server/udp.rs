//! Serving requests that arrive as UDP datagrams, one frame per datagram.
//!
//! UDP sources can be forged, so this path guards against being used as a
//! weapon: datagrams that are not requests (responses included) are never
//! answered, replies to limited sources are at most 3x the request and
//! rate-limited, and the retry cache is partitioned per source (see
//! docs/SECURITY.md).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use byteorder::{BigEndian, ByteOrder};
use log::{debug, warn};
use mio::net::UdpSocket;

use crate::protocol::{
    HEADER_LEN, MAGIC, MAX_UDP_FRAME_BYTES, Opcode, ProtocolError, RESPONSE_FLAG, Request, Status,
    decode_datagram, encode_response,
};
use crate::store::{KeyHash, KeyHasher};

use super::auth;
use super::handler::{Core, Outcome, ReplyTarget};
use super::limits::{RateLimiter, UdpLimitScope, amplification_limit};

/// How many recent UDP write replies are remembered to answer retries, in all.
const REPLY_CACHE_ENTRIES: usize = 16 * 1024;
/// How many of them one source IP address may hold: its own writes evict its
/// own oldest entries, never another source's.
const REPLY_CACHE_ENTRIES_PER_SOURCE: usize = 1024;

/// Receive errors tolerated in one readiness before giving the loop back.
const MAX_RECEIVE_ERRORS: usize = 64;
/// Datagrams handled in one wake-up; the rest wait for the next loop
/// iteration, so a UDP flood cannot hold the reactor from everyone else.
const MAX_DATAGRAMS_PER_TURN: usize = 256;

/// A UDP request's sender and request id.
type RetryKey = (SocketAddr, u32);

/// What the cache knows of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known<'a> {
    /// Still being replicated: the reply is sent when it is decided.
    InFlight,
    /// Decided: this was the reply.
    Answered(&'a [u8]),
}

/// Replies to recent UDP writes, keyed by sender and request id, so that a
/// retried write is answered again without being applied twice — including a
/// retry that arrives while the write is still being replicated.
///
/// Each entry keeps a fingerprint of the request: a client that reuses an id
/// for a different write gets that write applied, not the old reply. Writes in
/// flight are kept apart and never evicted (the coordinator bounds them):
/// evicting one would let its retry be applied a second time.
///
/// Answered entries are partitioned by source IP address: a source holding
/// `REPLY_CACHE_ENTRIES_PER_SOURCE` evicts its own oldest entry, and once the
/// whole cache is full the oldest entry of the source holding the most goes.
/// One source therefore cannot flush the entries of the others.
#[derive(Debug, Default)]
pub struct ReplyCache {
    answered: HashMap<RetryKey, (u64, Box<[u8]>)>,
    /// Insertion order of `answered`, per source address.
    order: HashMap<IpAddr, VecDeque<RetryKey>>,
    /// (entries, source) for every source in `order`: the largest is last.
    sizes: BTreeSet<(usize, IpAddr)>,
    /// Writes in flight by key and fingerprint (an id reused with other bytes
    /// while the first is in flight is a second entry, not a replacement),
    /// with the largest reply the source may be sent.
    in_flight: HashMap<(RetryKey, u64), usize>,
}

impl ReplyCache {
    fn get(&self, key: RetryKey, fingerprint: u64) -> Option<Known<'_>> {
        if self.in_flight.contains_key(&(key, fingerprint)) {
            return Some(Known::InFlight);
        }
        match self.answered.get(&key) {
            Some((f, reply)) if *f == fingerprint => Some(Known::Answered(reply)),
            _ => None,
        }
    }

    fn start(&mut self, key: RetryKey, fingerprint: u64, max_reply: usize) {
        self.in_flight.insert((key, fingerprint), max_reply);
    }

    /// The largest reply allowed for a write in flight (taken when it was received).
    fn max_reply(&self, key: RetryKey, fingerprint: u64) -> Option<usize> {
        self.in_flight.get(&(key, fingerprint)).copied()
    }

    /// Remember the reply of a write (moving it out of flight if it was there).
    fn answer(&mut self, key: RetryKey, fingerprint: u64, reply: &[u8]) {
        self.in_flight.remove(&(key, fingerprint));
        if let Some(entry) = self.answered.get_mut(&key) {
            *entry = (fingerprint, reply.into());
            return;
        }
        let source = key.0.ip();
        let held = self.order.get(&source).map_or(0, VecDeque::len);
        if held >= REPLY_CACHE_ENTRIES_PER_SOURCE {
            self.evict_oldest(source);
        } else if self.answered.len() >= REPLY_CACHE_ENTRIES
            && let Some(&(_, largest)) = self.sizes.last()
        {
            self.evict_oldest(largest);
        }
        self.answered.insert(key, (fingerprint, reply.into()));
        let order = self.order.entry(source).or_default();
        self.sizes.remove(&(order.len(), source));
        order.push_back(key);
        self.sizes.insert((order.len(), source));
    }

    fn evict_oldest(&mut self, source: IpAddr) {
        let Some(order) = self.order.get_mut(&source) else {
            return;
        };
        self.sizes.remove(&(order.len(), source));
        if let Some(oldest) = order.pop_front() {
            self.answered.remove(&oldest);
        }
        if order.is_empty() {
            self.order.remove(&source);
        } else {
            self.sizes.insert((order.len(), source));
        }
    }
}

/// Whether a datagram may be answered at all: it must be long enough to hold
/// a header, start with the magic byte, and not carry the response flag.
/// Anything else (a response, another protocol, a fragment) is dropped without
/// a word, so that two servers, or a server and itself, can never be made to
/// answer each other's answers by a forged source address.
fn is_request_datagram(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN && bytes[0] == MAGIC && bytes[2] & RESPONSE_FLAG == 0
}

/// Make `reply` (a whole response frame) fit in `max_len` bytes: a data reply
/// or redirect that does not fit becomes a USE_TCP error, and an error whose
/// message does not fit has its message cut. Returns whether the reply was changed.
fn fit_reply(core: &mut Core, reply: &mut Vec<u8>, max_len: usize) -> bool {
    if reply.len() <= max_len {
        return false;
    }
    let status = reply[3];
    // Data must not be cut, nor a master's address: those become USE_TCP
    // (a write answered so was not applied: OK replies of writes always fit).
    let whole = [Status::Ok, Status::NotFound, Status::Redirect].map(|s| s as u8);
    if whole.contains(&status) {
        let request_id = BigEndian::read_u32(&reply[4..8]);
        let op_byte = reply[2] & !RESPONSE_FLAG;
        let err = if reply.len() > MAX_UDP_FRAME_BYTES {
            ProtocolError::ResponseTooLargeForUdp(reply.len())
        } else {
            ProtocolError::AmplificationLimit {
                reply_len: reply.len(),
            }
        };
        reply.clear();
        core.reject(op_byte, request_id, &err, reply);
    }
    if reply.len() > max_len {
        // Cut the message at a character boundary (it is UTF-8 text).
        let message = String::from_utf8_lossy(&reply[HEADER_LEN..]).into_owned();
        let mut keep = max_len.saturating_sub(HEADER_LEN).min(message.len());
        while !message.is_char_boundary(keep) {
            keep -= 1;
        }
        reply.truncate(HEADER_LEN);
        reply.extend_from_slice(&message.as_bytes()[..keep]);
        BigEndian::write_u32(&mut reply[20..24], keep as u32);
    }
    true
}

/// The UDP socket with its receive buffer, limits and retry cache.
#[derive(Debug)]
pub struct UdpService {
    /// The socket, registered with the reactor.
    pub socket: UdpSocket,
    datagram: Vec<u8>,
    reply: Vec<u8>,
    cache: ReplyCache,
    scope: UdpLimitScope,
    rate: RateLimiter,
    clock: Instant,
    /// Keys the fingerprints of cached writes (see [`UdpService::fingerprint`]).
    fingerprints: KeyHasher,
    /// `MAX_DATAGRAMS_PER_TURN`, smaller in tests.
    datagrams_per_turn: usize,
}

impl UdpService {
    /// Wrap a bound socket; `scope` and `rate_per_sec` are the source limits.
    pub fn new(socket: UdpSocket, scope: UdpLimitScope, rate_per_sec: u32) -> UdpService {
        UdpService {
            socket,
            // One byte more than the largest frame, so an oversized datagram is detectable.
            datagram: vec![0; MAX_UDP_FRAME_BYTES + 1],
            reply: Vec::with_capacity(1024),
            cache: ReplyCache::default(),
            scope,
            rate: RateLimiter::new(rate_per_sec),
            clock: Instant::now(),
            fingerprints: KeyHasher::new(),
            datagrams_per_turn: MAX_DATAGRAMS_PER_TURN,
        }
    }

    /// A hash of a request datagram, telling a retry from a different write
    /// with the same id. Keyed at random per server, with the store's keyed
    /// hash (SipHash-1-3): with an unkeyed hash anyone could compute
    /// fingerprints offline and build a different write that passes for a
    /// cached one (its retry answered from the cache, never applied).
    fn fingerprint(&self, datagram: &[u8]) -> u64 {
        self.fingerprints.hash_key(datagram)
    }

    /// Answer every datagram waiting on the socket (until the write batch is full;
    /// the reactor calls again once it has been submitted).
    pub fn on_readable(&mut self, core: &mut Core) {
        let mut errors = 0;
        for received in 0.. {
            if received == self.datagrams_per_turn {
                // Edge-triggered: what is left is read at the next iteration, unasked.
                core.udp_retry = true;
                return;
            }
            if core.batch_full() {
                core.udp_waiting = true;
                return;
            }
            let (len, from) = match self.socket.recv_from(&mut self.datagram) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they concern one peer
                    // only. Any other error that keeps coming must not spin the reactor.
                    debug!("udp receive failed: {e}");
                    errors += 1;
                    if errors >= MAX_RECEIVE_ERRORS {
                        // Edge-triggered: come back without waiting for a new datagram.
                        core.udp_retry = true;
                        return;
                    }
                    continue;
                }
            };
            core.stats.udp_datagrams += 1;
            // The header is checked before anything else is done with the datagram.
            if !is_request_datagram(&self.datagram[..len]) {
                core.stats.udp_ignored += 1;
                continue;
            }
            let limited = self.scope.applies_to(from.ip());
            let now_ms = self.clock.elapsed().as_millis() as u64;
            if limited && !self.rate.allow(from.ip(), now_ms) {
                core.stats.udp_rate_limited += 1;
                continue;
            }
            let max_reply = if limited {
                amplification_limit(len).min(MAX_UDP_FRAME_BYTES)
            } else {
                MAX_UDP_FRAME_BYTES
            };
            self.reply.clear();
            self.answer(len, from, core, max_reply);
            if !self.reply.is_empty() {
                core.stats.udp_replies += 1;
                send(&self.socket, &self.reply, from);
            }
        }
    }

    /// Send the decided reply of a write that was pending, and remember it for retries.
    pub fn deliver(
        &mut self,
        core: &mut Core,
        from: SocketAddr,
        request_id: u32,
        fingerprint: u64,
        reply: &[u8],
    ) {
        let key = (from, request_id);
        let max_reply = self
            .cache
            .max_reply(key, fingerprint)
            .unwrap_or(MAX_UDP_FRAME_BYTES);
        self.reply.clear();
        self.reply.extend_from_slice(reply);
        if fit_reply(core, &mut self.reply, max_reply) {
            core.stats.udp_replies_limited += 1;
        }
        self.cache.answer(key, fingerprint, &self.reply);
        core.stats.udp_replies += 1;
        send(&self.socket, &self.reply, from);
    }

    /// Put the answer to the request datagram of `len` bytes from `from` in
    /// `self.reply` (or nothing, for a retry in flight), at most `max_reply` bytes.
    fn answer(&mut self, len: usize, from: SocketAddr, core: &mut Core, max_reply: usize) {
        let bytes = &self.datagram[..len];
        // The caller checked that a header is there.
        let request_id = BigEndian::read_u32(&bytes[4..8]);
        let op_byte = bytes[2];
        if core.protected_mode_refuses(from.ip()) {
            core.stats.protected_mode_refusals += 1;
            if core.denied_log.should_log(from.ip(), Instant::now()) {
                warn!("protected mode: refused UDP requests from {}", from.ip());
            }
            core.deny(op_byte, request_id, &mut self.reply);
            if fit_reply(core, &mut self.reply, max_reply) {
                core.stats.udp_replies_limited += 1;
            }
            return;
        }
        let request = if len > MAX_UDP_FRAME_BYTES {
            // Only possible over IPv6: the buffer is one byte larger than a frame may be.
            Err(ProtocolError::DatagramTooLarge(len))
        } else {
            decode_datagram(bytes, core.max_value_bytes).and_then(|f| Request::from_frame(&f))
        };
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                debug!("udp {from}: rejected request {request_id}: {e}");
                core.reject(op_byte, request_id, &e, &mut self.reply);
                if fit_reply(core, &mut self.reply, max_reply) {
                    core.stats.udp_replies_limited += 1;
                }
                return;
            }
        };
        if core.password.is_some() && request.opcode() != Opcode::Ping {
            // No connection to authenticate: with a password, UDP serves PING only.
            core.stats.auth_required += 1;
            let message = auth::NOAUTH_UDP_MESSAGE.as_bytes();
            let op = request.opcode() as u8;
            encode_response(&mut self.reply, op, Status::NoAuth, request_id, 0, message);
            if fit_reply(core, &mut self.reply, max_reply) {
                core.stats.udp_replies_limited += 1;
            }
            return;
        }
        let is_write = request.opcode().is_write();
        let fingerprint = if is_write { self.fingerprint(bytes) } else { 0 };
        if is_write && let Some(known) = self.cache.get((from, request_id), fingerprint) {
            core.stats.udp_retries_deduplicated += 1;
            if let Known::Answered(reply) = known {
                // Stored already fitted to this source's limit.
                self.reply.extend_from_slice(reply);
            }
            return;
        }
        let target = ReplyTarget::Udp { from, fingerprint };
        let outcome = core.execute(request, request_id, target, &mut self.reply);
        if outcome == Outcome::WaitKey {
            // A datagram cannot be parked like a stream: no reply and no cache
            // entry, so the client's retry (same id) executes it afresh.
            return;
        }
        if fit_reply(core, &mut self.reply, max_reply) {
            core.stats.udp_replies_limited += 1;
        }
        if is_write {
            match outcome {
                Outcome::Answered => {
                    self.cache
                        .answer((from, request_id), fingerprint, &self.reply)
                }
                Outcome::Pending(_) => self.cache.start((from, request_id), fingerprint, max_reply),
                Outcome::WaitKey => {}
            }
        }
    }
}

fn send(socket: &UdpSocket, reply: &[u8], to: SocketAddr) {
    match socket.send_to(reply, to) {
        Ok(_) => {}
        // A full socket buffer drops the reply as the network could; the client retries.
        Err(e) => debug!("udp reply to {to} dropped: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> RetryKey {
        (SocketAddr::from(([127, 0, 0, 1], 4000)), i)
    }

    #[test]
    fn a_write_in_flight_survives_any_number_of_later_answers() {
        let mut cache = ReplyCache::default();
        cache.start(key(0), 7, 100);
        for i in 1..=(2 * REPLY_CACHE_ENTRIES as u32) {
            cache.answer(key(i), 1, b"ok");
        }
        assert_eq!(cache.get(key(0), 7), Some(Known::InFlight));
        assert_eq!(
            cache.get(key(1), 1),
            None,
            "the oldest answers were evicted"
        );
        cache.answer(key(0), 7, b"done");
        assert_eq!(cache.get(key(0), 7), Some(Known::Answered(&b"done"[..])));
        assert!(cache.in_flight.is_empty());
    }

    #[test]
    fn an_id_reused_while_in_flight_keeps_both_writes_in_flight() {
        let mut cache = ReplyCache::default();
        cache.start(key(9), 1, 100);
        cache.start(key(9), 2, 100);
        assert_eq!(cache.get(key(9), 1), Some(Known::InFlight));
        assert_eq!(cache.get(key(9), 2), Some(Known::InFlight));
        cache.answer(key(9), 1, b"one");
        assert_eq!(cache.get(key(9), 2), Some(Known::InFlight));
        cache.answer(key(9), 2, b"two");
        assert!(cache.in_flight.is_empty());
    }

    #[test]
    fn a_reused_id_with_other_bytes_is_a_new_write() {
        let mut cache = ReplyCache::default();
        cache.start(key(5), 1, 100);
        assert_eq!(cache.get(key(5), 2), None);
        cache.answer(key(5), 1, b"first");
        assert_eq!(cache.get(key(5), 2), None);
        assert_eq!(cache.get(key(5), 1), Some(Known::Answered(&b"first"[..])));
    }

    fn from(source: u8, i: u32) -> RetryKey {
        (SocketAddr::from(([10, 0, 0, source], 4000)), i)
    }

    #[test]
    fn one_source_cannot_flush_the_entries_of_another() {
        let mut cache = ReplyCache::default();
        for i in 0..10 {
            cache.answer(from(1, i), 1, b"mine");
        }
        // A flood from one source evicts only its own entries...
        for i in 0..(4 * REPLY_CACHE_ENTRIES as u32) {
            cache.answer(from(2, i), 1, b"flood");
        }
        for i in 0..10 {
            assert_eq!(
                cache.get(from(1, i), 1),
                Some(Known::Answered(&b"mine"[..]))
            );
        }
        assert_eq!(
            cache.order[&from(2, 0).0.ip()].len(),
            REPLY_CACHE_ENTRIES_PER_SOURCE
        );
        // ...and a flood from many sources, once the cache is full, evicts from
        // the largest partitions first.
        for source in 3..=250u8 {
            for i in 0..REPLY_CACHE_ENTRIES_PER_SOURCE as u32 {
                cache.answer(from(source, i), 1, b"many");
            }
        }
        assert!(cache.answered.len() <= REPLY_CACHE_ENTRIES);
        for i in 0..10 {
            assert_eq!(
                cache.get(from(1, i), 1),
                Some(Known::Answered(&b"mine"[..]))
            );
        }
        let total: usize = cache.order.values().map(VecDeque::len).sum();
        assert_eq!(total, cache.answered.len());
        assert_eq!(cache.sizes.len(), cache.order.len());
    }

    #[test]
    fn only_request_datagrams_are_answered() {
        let mut ping = Vec::new();
        crate::protocol::encode_request(&mut ping, crate::protocol::Opcode::Ping, 1, b"", b"");
        assert!(is_request_datagram(&ping));
        let mut response = ping.clone();
        response[2] |= RESPONSE_FLAG;
        assert!(!is_request_datagram(&response));
        assert!(!is_request_datagram(&ping[..HEADER_LEN - 1]));
        let mut other = ping.clone();
        other[0] = b'G';
        assert!(!is_request_datagram(&other));
    }

    #[test]
    fn write_fingerprints_are_keyed_per_server() {
        let service = |_| {
            let socket = UdpSocket::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
            UdpService::new(socket, UdpLimitScope::Auto, 0)
        };
        let (a, b) = (service(0), service(1));
        let mut put = Vec::new();
        crate::protocol::encode_request(&mut put, Opcode::Put, 7, b"k", b"v");
        // One server tells a retry by its bytes...
        assert_eq!(a.fingerprint(&put), a.fingerprint(&put));
        // ...but no one can predict the fingerprint: it is not std's unkeyed
        // SipHash (the one used before), and another server's key differs.
        assert_ne!(a.fingerprint(&put), b.fingerprint(&put));
        use std::hash::BuildHasher;
        let unkeyed = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default();
        assert_ne!(a.fingerprint(&put), unkeyed.hash_one(&put[..]));
    }

    #[test]
    fn one_wake_up_handles_a_bounded_number_of_datagrams() {
        let socket = UdpSocket::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = socket.local_addr().expect("addr");
        let mut service = UdpService::new(socket, UdpLimitScope::Auto, 0);
        // Few enough that the kernel buffers all of them.
        service.datagrams_per_turn = 20;
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut ping = Vec::new();
        crate::protocol::encode_request(&mut ping, crate::protocol::Opcode::Ping, 1, b"", b"");
        for _ in 0..30 {
            client.send_to(&ping, addr).expect("send");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut core = Core::new(
            crate::protocol::DEFAULT_MAX_VALUE_BYTES,
            super::super::handler::Mode::Master,
        );
        service.on_readable(&mut core);
        assert_eq!(core.stats.udp_datagrams, 20);
        assert!(
            core.udp_retry,
            "the reactor is asked to come back for the rest"
        );
        core.udp_retry = false;
        service.on_readable(&mut core);
        assert_eq!(core.stats.udp_datagrams, 30);
        assert!(!core.udp_retry);
    }
}
