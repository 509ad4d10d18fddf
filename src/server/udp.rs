//! Serving requests that arrive as UDP datagrams, one frame per datagram.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;

use log::debug;
use mio::net::UdpSocket;

use crate::protocol::{MAX_UDP_FRAME_BYTES, ProtocolError, Request, decode_datagram};

use super::handler::Core;

/// How many recent UDP write replies are remembered to answer retries.
const REPLY_CACHE_ENTRIES: usize = 16 * 1024;

/// Replies to recent UDP writes, keyed by sender and request id, so that a
/// retried write is answered again without being applied twice.
#[derive(Debug, Default)]
pub struct ReplyCache {
    replies: HashMap<(SocketAddr, u32), Box<[u8]>>,
    /// Insertion order, for evicting the oldest entry once full.
    order: VecDeque<(SocketAddr, u32)>,
}

impl ReplyCache {
    fn get(&self, from: SocketAddr, request_id: u32) -> Option<&[u8]> {
        self.replies.get(&(from, request_id)).map(|r| &**r)
    }

    fn insert(&mut self, from: SocketAddr, request_id: u32, reply: &[u8]) {
        if self.order.len() == REPLY_CACHE_ENTRIES {
            if let Some(oldest) = self.order.pop_front() {
                self.replies.remove(&oldest);
            }
        }
        if self.replies.insert((from, request_id), reply.into()).is_none() {
            self.order.push_back((from, request_id));
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

    /// Answer every datagram waiting on the socket.
    pub fn on_readable(&mut self, core: &mut Core) {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.datagram) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they concern one peer only.
                    debug!("udp receive failed: {e}");
                    continue;
                }
            };
            core.stats.udp_datagrams += 1;
            self.reply.clear();
            self.answer(len, from, core);
            match self.socket.send_to(&self.reply, from) {
                Ok(_) => {}
                // A full socket buffer drops the reply as the network could; the client retries.
                Err(e) => debug!("udp reply to {from} dropped: {e}"),
            }
        }
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
        if is_write {
            if let Some(cached) = self.cache.get(from, request_id) {
                core.stats.udp_retries_deduplicated += 1;
                self.reply.extend_from_slice(cached);
                return;
            }
        }
        core.execute(request, request_id, &mut self.reply);
        if self.reply.len() > MAX_UDP_FRAME_BYTES {
            let err = ProtocolError::ResponseTooLargeForUdp(self.reply.len());
            self.reply.clear();
            core.reject(op_byte, request_id, &err, &mut self.reply);
        }
        if is_write {
            self.cache.insert(from, request_id, &self.reply);
        }
    }
}
