//! The loop: poll, accept, drive client connections and replication links on
//! their readiness, fire timers, sweep timeouts, and settle each turn's work
//! (submit the batch of writes, run the actions, resume the clients).

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::{Events, Interest, Token};

use crate::protocol::peer_auth::PeerAuth;
use crate::replication::{BACKLOG_LOW_WATER_BYTES, Event, PeerId};

use super::connection::{Connection, Liveness};
use super::handler::{ReadGate, ReplyTarget};
use super::limits::{Timeouts, Verdict};
use super::peer::PeerLink;
use super::{
    FIRST_LINK, LISTENER, Link, MASTER_CONNECT_TIMEOUT_MS, Role, Server, ServerError, UDP, WAKER,
    expiry, register_link,
};

/// Milliseconds between attempts to accept after running out of descriptors.
const ACCEPT_RETRY_MS: u64 = 50;
/// Bytes of snapshot copies freed, their pages given back to the system, per
/// turn (`Server::give_back_snapshot_memory`): about 1 ms of CPU on the loaded
/// 2-core test machine, and 130 MB (a million keys' copies) in about 30 turns.
const RELEASE_PER_TURN: usize = 4 << 20;
/// Replication links a master accepts (each may hold a snapshot copy and large buffers).
const MAX_PEER_LINKS: usize = 64;
/// Rounds of "submit writes, deliver replies, resume clients" per loop
/// iteration; each round consumes client input, this only bounds the loop.
const MAX_SETTLE_ROUNDS: usize = 1024;

impl Server {
    /// Serve until the poller fails.
    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        let mut turn_started: Option<Instant> = None;
        loop {
            let mut next = self.timers.next_deadline();
            if let Some(at) = self.election_deadline() {
                next = Some(next.map_or(at, |t| t.min(at)));
            }
            if !self.links.is_empty() {
                next = Some(next.map_or(self.next_sweep_ms, |t| t.min(self.next_sweep_ms)));
            }
            if let Some((_, at)) = self.master_dial {
                next = Some(next.map_or(at, |t| t.min(at)));
            }
            if let Some(at) = self.write_hold_until {
                next = Some(next.map_or(at, |t| t.min(at)));
            }
            let mut timeout = next.map(|at| {
                // Round up so a timer is never polled for just before it is due.
                Duration::from_millis(at.saturating_sub(self.now_ms()) + 1)
            });
            let forward_due = [
                self.forward_dial_deadline,
                self.core.forward.next_deadline(),
            ];
            for at in forward_due.into_iter().flatten() {
                let wait = at.saturating_duration_since(Instant::now()) + Duration::from_millis(1);
                timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
            }
            let deferred = !self.deferred_clients.is_empty()
                || !self.deferred_reads.is_empty()
                || !self.deferred_flushes.is_empty();
            if let Some(wake) = self.expiry_wake {
                // Keys with deadlines: the sweep runs at least this often.
                timeout = Some(timeout.map_or(wake, |t| t.min(wake)));
            }
            // Snapshot copies let go are freed a budget per turn, until all are.
            let releasing = self.snapshots.releasing_bytes() > 0;
            if self.work_left
                || self.core.udp_retry
                || deferred
                || self.forward_deferred
                || releasing
                || !self.drained_backlogs().is_empty()
            {
                // Left-over work goes on at once.
                timeout = Some(Duration::ZERO);
            } else if self.accept_paused {
                // A paused listener is retried soon (or at the next timer, if sooner).
                let retry = Duration::from_millis(ACCEPT_RETRY_MS);
                timeout = Some(timeout.map_or(retry, |t| t.min(retry)));
            }
            if let Some(started) = turn_started.take() {
                let micros = started.elapsed().as_micros() as u64;
                self.core.stats.longest_turn_us = self.core.stats.longest_turn_us.max(micros);
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Poll(e));
            }
            // A turn is the work between two polls: what other clients wait behind.
            turn_started = Some(Instant::now());
            // Before any client input is served: a master whose lease ran out
            // while it was not running (paused, descheduled) must know it
            // before it could acknowledge anything.
            let now = self.now_ms();
            self.election_tick(now);
            // Deadlines are compared with the clock of this turn, not of the last
            // one: an idle slave may have slept through a deadline, and must not
            // show (or count) the key after it.
            self.core.store.set_now_ms(expiry::unix_ms());
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    UDP => {
                        if let Some(udp) = self.udp.as_mut() {
                            udp.on_readable(&mut self.core);
                        }
                    }
                    WAKER => {
                        if let Some(lsn) = self.wal.on_wake() {
                            self.feed(Event::Persisted { lsn });
                        }
                        self.on_etcd_wake();
                    }
                    Token(t) => self.link_ready(t - FIRST_LINK, event.is_read_closed()),
                }
            }
            if self.accept_paused {
                self.accept();
            }
            // Work cut short by a budget in the last iteration goes on now, after
            // everyone with new events had a turn (each only once per iteration).
            for key in std::mem::take(&mut self.deferred_clients) {
                self.drive_client(key, false, false);
            }
            for key in std::mem::take(&mut self.deferred_reads) {
                self.drive_peer(key, false);
            }
            for key in std::mem::take(&mut self.deferred_flushes) {
                self.flush_peer(key);
            }
            // A slave being sent its backlog gets the next step once its link
            // drained: one step a turn, so a large backlog never fills one.
            for peer in self.drained_backlogs() {
                self.feed(Event::PeerDrained { peer });
            }
            if std::mem::take(&mut self.forward_deferred)
                && let Some(key) = self.forward_link
            {
                self.drive_forward(key);
            }
            if std::mem::take(&mut self.core.udp_retry)
                && let Some(udp) = self.udp.as_mut()
            {
                udp.on_readable(&mut self.core);
            }
            let now = self.now_ms();
            // After this turn's events: a dial answered meanwhile counts as answered.
            self.give_up_slow_dial(now);
            while let Some(timer) = self.timers.pop_expired(now) {
                self.role.handle(now, Event::TimerFired { timer });
                self.replication_changed = true;
            }
            if now >= self.next_sweep_ms {
                self.sweep(now);
            }
            self.expiry_wake = self.core.expiry_turn();
            self.work_left = self.settle();
        }
    }

    /// Close client connections past their frame or idle timeout. Runs every
    /// `Timeouts::sweep_interval_ms` (at most a second): O(connections), no
    /// per-connection timer to keep current on every read.
    fn sweep(&mut self, now: u64) {
        self.next_sweep_ms = now + self.timeouts.sweep_interval_ms();
        let mut expired = Vec::new();
        let mut stalled_peers = Vec::new();
        for (key, link) in self.links.iter_mut() {
            match link {
                Link::Client(connection) => {
                    let activity = connection.io.activity(connection.owes_replies());
                    match connection.io.watch.check(now, activity, self.timeouts) {
                        Verdict::Keep => {}
                        verdict => expired.push((key, verdict)),
                    }
                }
                // A slave's frames are small (at most 65564 bytes of payload): one
                // that does not arrive within the frame timeout holds a link slot
                // for nothing. (The master's frames to a slave may be large; the
                // slave's silence timer covers a stalled master.)
                Link::Peer(link) if !link.to_master() => {
                    let timeouts = Timeouts {
                        idle_ms: 0,
                        ..self.timeouts
                    };
                    let activity = link.io.activity(false);
                    if link.io.watch.check(now, activity, timeouts) == Verdict::SlowFrame {
                        stalled_peers.push(key);
                    }
                }
                Link::Peer(_) | Link::Forward(_) => {}
            }
        }
        for key in stalled_peers {
            self.lose_peer(key, "a frame took longer than the frame timeout to arrive");
        }
        for (key, verdict) in expired {
            if let Some(Link::Client(connection)) = self.links.get(key) {
                info!(
                    "{}: closing connection: {}",
                    connection.peer(),
                    match verdict {
                        Verdict::Idle => "idle timeout",
                        _ => "a frame took longer than the frame timeout to arrive",
                    }
                );
            }
            match verdict {
                Verdict::Idle => self.core.stats.connections_closed_idle += 1,
                _ => self.core.stats.connections_closed_slow_frame += 1,
            }
            self.close_client(key);
        }
    }

    fn accept(&mut self) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        let was_paused = std::mem::take(&mut self.accept_paused);
        loop {
            let (mut stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // Out of descriptors, usually: retry shortly, whatever the poller says.
                    if !was_paused {
                        error!("accept failed: {e}; retrying");
                    }
                    self.accept_paused = true;
                    return;
                }
            };
            if self.core.stats.connections_open as usize >= self.max_connections {
                // Accepted and closed at once: the client sees the close, not a
                // connection left waiting in the backlog.
                self.core.stats.connections_refused += 1;
                if self.core.stats.connections_refused % 1000 == 1 {
                    warn!(
                        "{peer}: {} connections open (--max-connections); refusing \
                         (refused so far: {})",
                        self.max_connections, self.core.stats.connections_refused
                    );
                }
                drop(stream);
                continue;
            }
            // Replies are written whole, one write per batch; Nagle would only delay them.
            if let Err(e) = stream.set_nodelay(true) {
                debug!("{peer}: cannot set TCP_NODELAY: {e}");
            }
            let entry = self.links.vacant_entry();
            let key = entry.key();
            if let Err(e) = register_link(&self.poll, &mut stream, key) {
                error!("{peer}: cannot register connection: {e}");
                continue;
            }
            debug!("{peer}: connected");
            let conn_id = self.next_conn_id;
            self.next_conn_id += 1;
            let mut connection = Connection::new(stream, peer, key, conn_id);
            if self.core.protected_mode_refuses(peer.ip()) {
                // Answered DENIED on its first request, then closed. A peer
                // handshake is still handed to replication, which has its own rule.
                connection.denied = true;
                self.core.stats.protected_mode_refusals += 1;
                if self.core.denied_log.should_log(peer.ip(), self.clock) {
                    warn!("protected mode: refused a client from {}", peer.ip());
                }
            }
            connection
                .io
                .set_budget(Rc::clone(&self.core.stats.input_budget));
            entry.insert(Link::Client(connection));
            self.core.stats.connections_accepted += 1;
            self.core.stats.connections_open += 1;
        }
    }

    fn link_ready(&mut self, key: usize, read_closed: bool) {
        match self.links.get(key) {
            Some(Link::Client(_)) => self.drive_client(key, true, read_closed),
            Some(Link::Peer(_)) => self.drive_peer(key, read_closed),
            Some(Link::Forward(_)) => self.drive_forward(key),
            None => {}
        }
    }

    /// Serve a client connection: on readiness (`event`), or to resume it after replies.
    fn drive_client(&mut self, key: usize, event: bool, read_closed: bool) {
        let Some(Link::Client(connection)) = self.links.get_mut(key) else {
            return;
        };
        let liveness = connection.on_ready(&mut self.core, event, read_closed);
        // A key may be queued twice in one iteration (an event and a resumption):
        // a second drive is harmless, and the list is drained every iteration.
        if connection.take_yielded() {
            self.deferred_clients.push(key);
        }
        match liveness {
            Liveness::Open => {}
            Liveness::Closed => self.close_client(key),
            Liveness::BecomePeer => self.become_peer(key),
        }
    }

    pub(super) fn close_client(&mut self, key: usize) {
        if let Link::Client(mut connection) = self.links.remove(key) {
            debug!("{}: disconnected", connection.peer());
            if let Err(e) = self.poll.registry().deregister(&mut connection.io.stream) {
                debug!("{}: deregister failed: {e}", connection.peer());
            }
            self.core.stats.connections_open -= 1;
        }
    }

    /// A client connection sent a peer frame: on a master it becomes a replication link.
    fn become_peer(&mut self, key: usize) {
        if !matches!(self.links.get(key), Some(Link::Client(_))) {
            return;
        }
        let Some(Link::Client(connection)) = self.links.try_remove(key) else {
            return;
        };
        self.core.stats.connections_open -= 1;
        let addr = connection.peer();
        let (mut io, read_closed) = connection.into_io();
        if !matches!(self.role, Role::Master(_)) {
            warn!("{addr}: replication handshake sent to a server that is not the master; closing");
            let _ = self.poll.registry().deregister(&mut io.stream);
            return;
        }
        if self.cluster_secret.is_none() && !addr.ip().is_loopback() {
            // Anyone who reaches the port could otherwise join as a slave.
            warn!(
                "{addr}: replication handshake from a non-loopback address refused: \
                 start the servers with --cluster-secret-file to replicate across hosts"
            );
            let _ = self.poll.registry().deregister(&mut io.stream);
            return;
        }
        if self.peers.len() >= MAX_PEER_LINKS {
            // Each link may cost a snapshot copy and large buffers: bound them.
            warn!("{addr}: already {MAX_PEER_LINKS} replication links; refusing another");
            let _ = self.poll.registry().deregister(&mut io.stream);
            return;
        }
        let id = PeerId(self.next_peer_id);
        self.next_peer_id += 1;
        info!("{addr}: replication link {} opened", id.0);
        let limit = self.peer_frame_limit(false);
        let max_output = self.max_peer_output_bytes;
        let entry = self.links.vacant_entry();
        let new_key = entry.key();
        if new_key != key
            && let Err(e) = self.poll.registry().reregister(
                &mut io.stream,
                Token(new_key + FIRST_LINK),
                Interest::READABLE | Interest::WRITABLE,
            )
        {
            error!("{addr}: cannot register replication link: {e}");
            return;
        }
        let epoch = self.failover.as_ref().map_or(0, |f| f.epoch);
        let mut link = PeerLink::new(io, id, addr, false, limit, max_output).in_epoch(epoch);
        if let Some(secret) = &self.cluster_secret {
            link = link.with_auth(PeerAuth::master(secret.clone()), None);
        }
        entry.insert(Link::Peer(link));
        self.peers.insert(id, new_key);
        self.drive_peer(new_key, read_closed);
    }

    /// Read, decode and hand to the state machine everything a replication link has.
    fn drive_peer(&mut self, key: usize, read_closed: bool) {
        let Some(Link::Peer(link)) = self.links.get_mut(key) else {
            return;
        };
        let id = link.id;
        if link.connecting {
            match link.io.stream.peer_addr() {
                Ok(_) => {
                    link.connecting = false;
                    self.master_dial = None;
                    self.connect_failures = 0;
                    info!("connected to master {}", link.addr);
                    let local = link.io.stream.local_addr();
                    self.announce_link_local(local);
                    self.feed(Event::Connected { peer: id });
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    let reason = link.io.stream.take_error().ok().flatten();
                    if let Some(e) = reason {
                        let addr = link.addr;
                        self.master_unreachable(addr, &e);
                        self.drop_peer(key);
                        self.feed(Event::ConnectFailed);
                    }
                    return;
                }
                Err(e) => {
                    let addr = link.addr;
                    self.master_unreachable(addr, &e);
                    self.drop_peer(key);
                    self.feed(Event::ConnectFailed);
                    return;
                }
            }
        }
        let Some(Link::Peer(link)) = self.links.get_mut(key) else {
            return;
        };
        let mut messages = Vec::new();
        let result = link.receive(&mut messages, read_closed);
        if std::mem::take(&mut link.read_yielded) && !self.deferred_reads.contains(&key) {
            self.deferred_reads.push(key);
        }
        for msg in messages {
            self.feed(Event::Message { peer: id, msg });
        }
        if let Err(e) = result {
            self.lose_peer(key, &e.to_string());
            return;
        }
        self.flush_peer(key);
    }

    /// Write a link's queued output; report a finished snapshot; drop a failed link.
    pub(super) fn flush_peer(&mut self, key: usize) {
        let Some(Link::Peer(link)) = self.links.get_mut(key) else {
            return;
        };
        if link.connecting {
            return;
        }
        let id = link.id;
        let streaming = link.streaming_snapshot();
        let written = link.io.bytes_written();
        let flushed = link.flush(&self.core.store, &mut self.snapshots);
        if std::mem::take(&mut link.flush_yielded) && !self.deferred_flushes.contains(&key) {
            self.deferred_flushes.push(key);
        }
        // Reported only when the slave drained something: that is hearing
        // from it (it sends nothing meanwhile), and the write throttle paces
        // writes to the stream's progress.
        let progress = self
            .snapshots
            .progress(id.0)
            .filter(|_| streaming && link.io.bytes_written() > written);
        match flushed {
            Ok(Some(at_seq)) => self.feed(Event::SnapshotSent { peer: id, at_seq }),
            Ok(None) => {
                if let Some((at_seq, done_per_mille)) = progress {
                    self.feed(Event::SnapshotProgress {
                        peer: id,
                        at_seq,
                        done_per_mille,
                    });
                }
            }
            Err(e) => self.lose_peer(key, &e.to_string()),
        }
    }

    /// The slaves being sent a backlog (`Coordinator::backlog_peers`) whose
    /// link streams no snapshot and has less than `BACKLOG_LOW_WATER_BYTES`
    /// queued: each is owed its next step (`Event::PeerDrained`).
    fn drained_backlogs(&self) -> Vec<PeerId> {
        let Role::Master(c) = &self.role else {
            return Vec::new();
        };
        c.backlog_peers()
            .filter(|peer| {
                matches!(
                    self.peers.get(peer).and_then(|&key| self.links.get(key)),
                    Some(Link::Peer(link)) if !link.streaming_snapshot()
                        && link.io.pending_output() < BACKLOG_LOW_WATER_BYTES
                )
            })
            .collect()
    }

    /// A link failed: close it and tell the state machine.
    pub(super) fn lose_peer(&mut self, key: usize, why: &str) {
        if let Some(id) = self.drop_peer(key) {
            info!("replication link {} closed: {why}", id.0);
            self.feed(Event::PeerLost { peer: id });
        }
    }

    /// Close a link without telling the state machine (it asked for it, or never knew it).
    pub(super) fn drop_peer(&mut self, key: usize) -> Option<PeerId> {
        if !matches!(self.links.get(key), Some(Link::Peer(_))) {
            return None;
        }
        let Link::Peer(mut link) = self.links.remove(key) else {
            return None;
        };
        let _ = self.poll.registry().deregister(&mut link.io.stream);
        self.peers.remove(&link.id);
        // Its snapshot's copies go with its last reader.
        self.snapshots.remove(link.id.0);
        self.replication_changed = true;
        Some(link.id)
    }

    /// Submit this iteration's writes, execute every action, resume the clients
    /// whose replies came, and repeat while that produces more writes.
    ///
    /// Returns whether work is left (the round bound was hit): the caller
    /// then polls without blocking.
    pub(super) fn settle(&mut self) -> bool {
        let mut work_left = true;
        for _ in 0..MAX_SETTLE_ROUNDS {
            self.write_hold_until = None;
            if !self.core.batch.is_empty() {
                let now = self.now_ms();
                self.write_hold_until = self.role.write_hold(now);
            }
            // At the in-flight bound the batch waits (a read that met an
            // expired key may have added a deletion to it) for a transaction
            // to end; the decisions that end them come from the links, which
            // are read whatever this gate says.
            let at_bound = self.role.at_inflight_bound();
            if !self.core.batch.is_empty() && self.write_hold_until.is_none() && !at_bound {
                let writes = self.core.take_batch();
                self.feed(Event::ClientWrites { writes });
                self.update_write_gate();
                if !self.core.writes_paused {
                    self.resume_writers();
                }
            }
            self.run_actions();
            // Flushing can finish a snapshot or find a link dead: both are events
            // whose actions run before the clients are resumed.
            let dirty = std::mem::take(&mut self.dirty_peers);
            for key in dirty {
                self.flush_peer(key);
            }
            self.run_actions();
            self.update_write_gate();
            let touched = std::mem::take(&mut self.touched);
            for key in touched {
                self.drive_client(key, false, false);
            }
            // Writes the clients forwarded go out; replies now applied come back.
            self.pump_forward();
            // A resumed connection may have become a peer link and fed the role.
            self.run_actions();
            // A batch held back for a snapshot, or for the in-flight bound, is
            // no work until the hold ends.
            let held = self.write_hold_until.is_some() || self.role.at_inflight_bound();
            if (self.core.batch.is_empty() || held)
                && self.touched.is_empty()
                && self.dirty_peers.is_empty()
                && self.completions.is_empty()
                && (!self.core.udp_waiting || held)
            {
                work_left = false;
                break;
            }
        }
        if let Some(why) = self.wal.failed()
            && self.core.write_refusal.is_none()
        {
            self.core.write_refusal = Some(format!("write-ahead log failed: {why}"));
            self.replication_changed = true;
            // The writes in flight wait for a sync that will never come, and
            // whether their records reached the disk is unknown: close their
            // connections, as if this server had died, rather than let them hang.
            let targets: Vec<ReplyTarget> = self
                .core
                .waiting
                .take_all()
                .into_iter()
                .map(|w| w.target)
                .collect();
            if !targets.is_empty() {
                warn!(
                    "closing the connections of {} writes in flight: their outcome is unknown",
                    targets.len()
                );
            }
            self.close_writers(targets);
        }
        self.core.stats.snapshots = self.snapshots.counters();
        self.core.stats.disk_snapshot_held_bytes = self.wal.snapshot_held_bytes();
        self.give_back_snapshot_memory();
        self.forget_led_epoch_once_following();
        self.core.read_gate = self.read_gate();
        debug_assert_eq!(
            self.core.mode,
            self.role.mode(),
            "the role changes only through set_role"
        );
        let alone = matches!(&self.role, Role::Master(c) if c.members().in_sync_count() == 0);
        self.wal.set_group_window(alone);
        if self.wal.snapshot_due() {
            let seq = self.core.commit_seq;
            let history_id = self.role.history_id();
            self.wal.start_snapshot(seq, history_id);
        }
        // One bounded step per turn: a snapshot never holds the loop for long.
        self.wal.snapshot_step(&self.core.store);
        work_left |= self.wal.snapshot_pending();
        if self.replication_changed {
            self.replication_changed = false;
            self.core.stats.wal = self.wal.stats();
            let now = self.now_ms();
            self.core.stats.replication = self.role.describe(now);
            if let Some(f) = &self.failover {
                let now = self.now_ms();
                self.core.stats.replication.push_str(&f.describe(now));
            }
            self.core.replication = self.role.info();
            self.core.replication.failover = self.failover.as_ref().map(|f| f.summary());
        }
        work_left
    }

    /// Pause or resume the intake of client writes as the transactions in
    /// flight reach or leave their bound (backpressure: a connection stops
    /// reading at its next write, the UDP socket stops reading; nothing is
    /// refused). Resuming wakes everyone who stopped.
    fn update_write_gate(&mut self) {
        let paused = self.role.at_inflight_bound();
        if paused == self.core.writes_paused {
            return;
        }
        self.core.writes_paused = paused;
        if paused {
            self.core.stats.txn_backpressure_pauses += 1;
            debug!("transactions in flight at their bound: client writes paused");
        } else {
            self.resume_writers();
        }
    }

    /// Drive again the connections and the UDP socket that stopped at a full
    /// batch or paused writes.
    fn resume_writers(&mut self) {
        let waiters = std::mem::take(&mut self.core.batch_waiters);
        self.touched.extend(waiters);
        if std::mem::take(&mut self.core.udp_waiting)
            && let Some(udp) = self.udp.as_mut()
        {
            udp.on_readable(&mut self.core);
        }
    }

    /// Whether reads may be served: a slave only within the read lease its
    /// participant holds (unless it serves stale reads by choice).
    fn read_gate(&self) -> ReadGate {
        if self.read_lease_ms == 0 {
            return ReadGate::Open;
        }
        match &self.role {
            Role::Master(_) => ReadGate::Open,
            Role::Slave { participant, .. } => match participant.read_lease_until() {
                Some(ms) => ReadGate::Until(self.clock + Duration::from_millis(ms)),
                None => ReadGate::Closed,
            },
            Role::Standby(_) => ReadGate::Closed,
        }
    }

    /// Free [`RELEASE_PER_TURN`] of the snapshot copies let go, their pages
    /// given back to the system as they are freed (`SnapshotSet::release_some`):
    /// an evicted receiver's copy leaves the master's RSS (tests/rejoin.rs)
    /// over a few turns instead of in one long one.
    fn give_back_snapshot_memory(&mut self) {
        if self.snapshots.releasing_bytes() == 0 {
            return;
        }
        let freed = self.snapshots.release_some(RELEASE_PER_TURN);
        debug!(
            "gave {freed} bytes of snapshot copies back to the system, {} to go",
            self.snapshots.releasing_bytes()
        );
    }

    /// Abandon the dial to the master if it is still unanswered past its
    /// deadline, and report it failed: the participant redials after its backoff.
    fn give_up_slow_dial(&mut self, now: u64) {
        let Some((id, deadline)) = self.master_dial else {
            return;
        };
        if now < deadline {
            return;
        }
        self.master_dial = None;
        let Some(&key) = self.peers.get(&id) else {
            return; // failed or closed already
        };
        let Some(Link::Peer(link)) = self.links.get(key) else {
            return;
        };
        if !link.connecting {
            return;
        }
        let addr = link.addr;
        let e = io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {MASTER_CONNECT_TIMEOUT_MS} ms"),
        );
        self.master_unreachable(addr, &e);
        self.drop_peer(key);
        self.feed(Event::ConnectFailed);
    }
}
