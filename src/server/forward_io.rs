//! The reactor's half of `--forward-writes`: the one RESP connection a slave
//! keeps to its master, dialled when a write is queued, read and written in
//! the same loop as every other socket. The state (what to send, which reply
//! answers whom, what is held for read-your-writes) is `forward.rs`.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::TcpStream;

use crate::protocol::resp_reply::reply_len;

use super::forward::{CONNECT_TIMEOUT_MS, REPLY_TIMEOUT_MS};
use super::stream::{Filled, Framed};
use super::{ForwardLink, Link, MAX_VALUE_BYTES_LIMIT, Role, Server, register_link};

/// Reads of the forward link per wake-up; the rest waits for the next
/// iteration, so a flood of replies cannot hold the reactor.
const MAX_READS_PER_TURN: usize = 16;
/// Smallest input growth asked for while a reply is incomplete.
const MIN_GROW_BYTES: usize = 16 * 1024;

impl Server {
    /// Largest reply accepted from the master: a value of the largest size
    /// any master accepts (GETSET, GETDEL, SET ... GET), or an EXEC array of
    /// several, with room for the framing.
    fn forward_reply_limit(&self) -> usize {
        (2 * self.core.max_value_bytes.max(1 << 20)).min(2 * MAX_VALUE_BYTES_LIMIT) + (1 << 20)
    }

    /// Keep the link to the current master, send what clients queued,
    /// deliver the replies this slave may now give. Called every settle round.
    pub(super) fn pump_forward(&mut self) {
        if !self.core.forward.enabled {
            return;
        }
        let now = Instant::now();
        let target = match &self.role {
            Role::Slave {
                master_addr,
                master,
                ..
            } => Some((*master_addr, master)),
            Role::Master(_) | Role::Standby(_) => None,
        };
        self.core
            .forward
            .set_target(target.map(|(_, text)| text.as_str()));
        let target = target.map(|(addr, _)| addr);
        if let Some(key) = self.forward_link
            && let Some(Link::Forward(link)) = self.links.get(key)
            && Some(link.addr) != target
        {
            self.lose_forward("the master changed (failover) or this server is no longer a slave");
        }
        if self.core.forward.silent_too_long(now) {
            self.lose_forward(&format!(
                "no reply from the master within {REPLY_TIMEOUT_MS} ms"
            ));
        }
        if self.forward_dial_deadline.is_some_and(|at| now >= at) {
            self.lose_forward(&format!(
                "cannot reach the master: no answer to the dial within {CONNECT_TIMEOUT_MS} ms"
            ));
        }
        if self.forward_link.is_none()
            && self.core.forward.wants_link(now)
            && let Some(addr) = target
        {
            self.dial_forward(addr, now);
        }
        self.send_forwarded(now);
        self.core.forward.release(self.core.commit_seq, now);
        self.deliver_forwarded();
    }

    fn dial_forward(&mut self, addr: SocketAddr, now: Instant) {
        self.core.forward.on_dialing();
        let mut stream = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => {
                self.lose_forward(&format!("cannot reach the master {addr}: {e}"));
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let entry = self.links.vacant_entry();
        let key = entry.key();
        if let Err(e) = register_link(&self.poll, &mut stream, key) {
            self.lose_forward(&format!("cannot register the link to the master: {e}"));
            return;
        }
        entry.insert(Link::Forward(ForwardLink {
            io: Framed::new(stream),
            addr,
            connecting: true,
        }));
        self.forward_link = Some(key);
        self.forward_dial_deadline = Some(now + Duration::from_millis(CONNECT_TIMEOUT_MS));
    }

    /// Write what the forwarder has for the link (nothing before it is up).
    fn send_forwarded(&mut self, now: Instant) {
        let Some(key) = self.forward_link else {
            return;
        };
        let Some(Link::Forward(link)) = self.links.get_mut(key) else {
            return;
        };
        if link.connecting {
            return;
        }
        let bytes = self.core.forward.take_sendable(now);
        link.io.output.extend_from_slice(&bytes);
        if let Err(e) = link.io.flush() {
            self.lose_forward(&format!("write to the master failed: {e}"));
        }
    }

    /// Readiness of the forward link: finish the dial, write, read replies.
    pub(super) fn drive_forward(&mut self, key: usize) {
        let now = Instant::now();
        let Some(Link::Forward(link)) = self.links.get_mut(key) else {
            return;
        };
        if link.connecting {
            match link.io.stream.peer_addr() {
                Ok(_) => {
                    link.connecting = false;
                    self.forward_dial_deadline = None;
                    if std::mem::take(&mut self.forward_failures) > 0 {
                        info!("forwarding writes to the master {} again", link.addr);
                    }
                    let first = self.core.forward.on_connected(now);
                    link.io.output.extend_from_slice(&first);
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    let addr = link.addr;
                    if let Some(e) = link.io.stream.take_error().ok().flatten() {
                        self.lose_forward(&format!("cannot reach the master {addr}: {e}"));
                    }
                    return;
                }
                Err(e) => {
                    let addr = link.addr;
                    self.lose_forward(&format!("cannot reach the master {addr}: {e}"));
                    return;
                }
            }
        }
        let max = self.forward_reply_limit();
        let failure = self.read_forwarded(key, max, now);
        if let Some(why) = failure {
            self.lose_forward(&why);
        }
        self.pump_forward();
    }

    /// Read and hand over every complete reply; `Some(why)` if the link must go.
    fn read_forwarded(&mut self, key: usize, max: usize, now: Instant) -> Option<String> {
        let Some(Link::Forward(link)) = self.links.get_mut(key) else {
            return None;
        };
        if let Err(e) = link.io.flush() {
            return Some(format!("write to the master failed: {e}"));
        }
        for _ in 0..MAX_READS_PER_TURN {
            loop {
                let buffered = link.io.buffered();
                match reply_len(buffered, max) {
                    Ok(Some(len)) => {
                        if let Err(why) = self.core.forward.on_reply(&buffered[..len], now) {
                            return Some(why);
                        }
                        link.io.consume(len);
                    }
                    Ok(None) => {
                        let grow = buffered.len().saturating_mul(2).max(MIN_GROW_BYTES);
                        link.io.need(Some(grow.min(max + 1)));
                        break;
                    }
                    Err(e) => return Some(format!("malformed reply from the master: {e}")),
                }
            }
            match link.io.fill() {
                Ok(Filled::Eof) => return Some("the master closed the connection".into()),
                Ok(Filled::WouldBlock) => return None,
                // Read on until WouldBlock: the edge is lost if not drained.
                Ok(Filled::Short) | Ok(Filled::Full) => {}
                Err(e) => return Some(format!("read from the master failed: {e}")),
            }
        }
        self.forward_deferred = true;
        None
    }

    /// Close the forward link: its commands are answered (outcome unknown if
    /// sent, `-MASTERDOWN` if not).
    fn lose_forward(&mut self, why: &str) {
        if let Some(key) = self.forward_link.take()
            && matches!(self.links.get(key), Some(Link::Forward(_)))
            && let Link::Forward(mut link) = self.links.remove(key)
        {
            let _ = self.poll.registry().deregister(&mut link.io.stream);
        }
        self.forward_dial_deadline = None;
        let in_flight = self.core.forward.in_flight();
        if in_flight == 0 {
            debug!("link for forwarded writes closed: {why}");
        } else {
            // The first of a streak and every 50th: a master that stays down
            // is tried every 250 ms while writes come, not logged as often.
            self.forward_failures += 1;
            if self.forward_failures % 50 == 1 {
                warn!(
                    "link for forwarded writes lost with {in_flight} in flight: {why} \
                     (failure {} in a row)",
                    self.forward_failures
                );
            } else {
                debug!("link for forwarded writes lost with {in_flight} in flight: {why}");
            }
        }
        self.core.forward.on_link_lost(why, Instant::now());
        self.deliver_forwarded();
    }

    /// Hand the replies that are ready to their connections, in order.
    fn deliver_forwarded(&mut self) {
        let ready = self.core.forward.take_ready();
        if ready.is_empty() {
            return;
        }
        for (origin, reply) in ready {
            if let Some(Link::Client(connection)) = self.links.get_mut(origin.key)
                && connection.conn_id() == origin.conn_id
            {
                connection.deliver(origin.client, |out| out.extend_from_slice(&reply));
                self.touched.push(origin.key);
            }
        }
        // Room under the total cap: connections stopped by it read again.
        self.touched.append(&mut self.core.forward.waiters);
    }
}
