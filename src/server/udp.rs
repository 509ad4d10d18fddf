//! Serving requests that arrive as UDP datagrams, one frame per datagram.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::net::SocketAddr;

use log::debug;
use mio::net::UdpSocket;

use crate::protocol::{MAX_UDP_FRAME_BYTES, ProtocolError, Request, decode_datagram};

use super::handler::{Core, Outcome, ReplyTarget};

/// How many recent UDP write replies are remembered to answer retries.
const REPLY_CACHE_ENTRIES: usize = 16 * 1024;

/// Receive errors tolerated in one readiness before giving the loop back.
const MAX_RECEIVE_ERRORS: usize = 64;

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
#[derive(Debug, Default)]
pub struct ReplyCache {
    answered: HashMap<RetryKey, (u64, Box<[u8]>)>,
    /// Insertion order of `answered`, for evicting the oldest entry once full.
    order: VecDeque<RetryKey>,
    /// Writes in flight by key and fingerprint (an id reused with other bytes
    /// while the first is in flight is a second entry, not a replacement).
    in_flight: HashSet<(RetryKey, u64)>,
}

impl ReplyCache {
    fn get(&self, key: RetryKey, fingerprint: u64) -> Option<Known<'_>> {
        if self.in_flight.contains(&(key, fingerprint)) {
            return Some(Known::InFlight);
        }
        match self.answered.get(&key) {
            Some((f, reply)) if *f == fingerprint => Some(Known::Answered(reply)),
            _ => None,
        }
    }

    fn start(&mut self, key: RetryKey, fingerprint: u64) {
        self.in_flight.insert((key, fingerprint));
    }

    /// Remember the reply of a write (moving it out of flight if it was there).
    fn answer(&mut self, key: RetryKey, fingerprint: u64, reply: &[u8]) {
        self.in_flight.remove(&(key, fingerprint));
        if self.order.len() == REPLY_CACHE_ENTRIES
            && let Some(oldest) = self.order.pop_front()
        {
            self.answered.remove(&oldest);
        }
        if self
            .answered
            .insert(key, (fingerprint, reply.into()))
            .is_none()
        {
            self.order.push_back(key);
        }
    }
}

/// The UDP socket with its receive buffer and retry cache.
#[derive(Debug)]
pub struct UdpService {
    /// The socket, registered with the reactor.
    pub socket: UdpSocket,
    datagram: Vec<u8>,
    reply: Vec<u8>,
    cache: ReplyCache,
}

impl UdpService {
    /// Wrap a bound socket.
    pub fn new(socket: UdpSocket) -> UdpService {
        UdpService {
            socket,
            // One byte more than the largest frame, so an oversized datagram is detectable.
            datagram: vec![0; MAX_UDP_FRAME_BYTES + 1],
            reply: Vec::with_capacity(1024),
            cache: ReplyCache::default(),
        }
    }

    /// Answer every datagram waiting on the socket (until the write batch is full;
    /// the reactor calls again once it has been submitted).
    pub fn on_readable(&mut self, core: &mut Core) {
        let mut errors = 0;
        loop {
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
            self.reply.clear();
            self.answer(len, from, core);
            if !self.reply.is_empty() {
                send(&self.socket, &self.reply, from);
            }
        }
    }

    /// Send the decided reply of a write that was pending, and remember it for retries.
    pub fn deliver(&mut self, from: SocketAddr, request_id: u32, fingerprint: u64, reply: &[u8]) {
        self.cache.answer((from, request_id), fingerprint, reply);
        send(&self.socket, reply, from);
    }

    fn answer(&mut self, len: usize, from: SocketAddr, core: &mut Core) {
        let bytes = &self.datagram[..len];
        let request_id = if len >= 8 {
            u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]])
        } else {
            0
        };
        let op_byte = if len >= 3 { bytes[2] } else { 0 };
        let frame = match decode_datagram(bytes, core.max_value_bytes) {
            Ok(frame) => frame,
            Err(e) => {
                debug!("udp {from}: rejected datagram: {e}");
                core.reject(op_byte, request_id, &e, &mut self.reply);
                return;
            }
        };
        let request = match Request::from_frame(&frame) {
            Ok(request) => request,
            Err(e) => {
                debug!("udp {from}: rejected request {request_id}: {e}");
                core.reject(op_byte, request_id, &e, &mut self.reply);
                return;
            }
        };
        let is_write = request.opcode().is_write();
        let fingerprint = if is_write { fingerprint(bytes) } else { 0 };
        if is_write && let Some(known) = self.cache.get((from, request_id), fingerprint) {
            core.stats.udp_retries_deduplicated += 1;
            if let Known::Answered(reply) = known {
                self.reply.extend_from_slice(reply);
            }
            return;
        }
        let target = ReplyTarget::Udp { from, fingerprint };
        let outcome = core.execute(request, request_id, target, &mut self.reply);
        if self.reply.len() > MAX_UDP_FRAME_BYTES {
            let err = ProtocolError::ResponseTooLargeForUdp(self.reply.len());
            self.reply.clear();
            core.reject(op_byte, request_id, &err, &mut self.reply);
        }
        if is_write {
            match outcome {
                Outcome::Answered => {
                    self.cache
                        .answer((from, request_id), fingerprint, &self.reply)
                }
                Outcome::Pending(_) => self.cache.start((from, request_id), fingerprint),
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

/// A hash of a request datagram, telling a retry from a different write with the same id.
fn fingerprint(datagram: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    datagram.hash(&mut hasher);
    hasher.finish()
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
        cache.start(key(0), 7);
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
        cache.start(key(9), 1);
        cache.start(key(9), 2);
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
        cache.start(key(5), 1);
        assert_eq!(cache.get(key(5), 2), None);
        cache.answer(key(5), 1, b"first");
        assert_eq!(cache.get(key(5), 2), None);
        assert_eq!(cache.get(key(5), 1), Some(Known::Answered(&b"first"[..])));
    }
}
