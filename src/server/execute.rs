//! The executor of actions: what the replication state machine asks for
//! (send, persist, apply, reply, timers, snapshots, dial the master) done
//! against the sockets, the log and the store, with the completions fed back.

use std::io;
use std::net::SocketAddr;

use log::{debug, error, info, warn};
use mio::net::TcpStream;

use crate::protocol::Status;
use crate::protocol::peer::PeerMessage;
use crate::protocol::peer_auth::PeerAuth;
use crate::replication::{Action, ClientRef, Event, PeerId, WriteError};
use crate::store::Applied;

use super::handler::ReplyTarget;
use super::peer::PeerLink;
use super::stream::Framed;
use super::{Link, MASTER_CONNECT_TIMEOUT_MS, Role, Server, register_link};

impl Server {
    /// Execute actions until the state machine and the completions are quiet.
    pub(super) fn run_actions(&mut self) {
        loop {
            match self.role.poll_action() {
                Some(action) => self.execute(action),
                None => {
                    if let Some(event) = self.next_completion() {
                        self.feed(event);
                        continue;
                    }
                    if self.drop_snapshot_evictions() {
                        continue;
                    }
                    // Everything this round appended goes to the log in one write
                    // (and, under --fsync always, one sync in flight at a time).
                    match self.wal.flush() {
                        Some(lsn) => self.feed(Event::Persisted { lsn }),
                        None => return,
                    }
                }
            }
        }
    }

    /// Close the links whose snapshot was dropped at the memory cap; returns
    /// whether there were any (their loss is an event with actions to run).
    fn drop_snapshot_evictions(&mut self) -> bool {
        let evicted = self.snapshots.take_evicted();
        let any = !evicted.is_empty();
        for e in evicted {
            let peer = PeerId(e.reader);
            if let Some(&key) = self.peers.get(&peer) {
                if let Some(Link::Peer(link)) = self.links.get(key) {
                    warn!(
                        "{}: disconnecting a snapshot receiver at the memory cap: {}; it \
                         registers again after its reconnect backoff",
                        link.addr, e.reason
                    );
                }
                self.lose_peer(key, "snapshot dropped at the memory cap");
            }
        }
        any
    }

    /// The next completion; consecutive `Persisted` ones collapse into the highest.
    fn next_completion(&mut self) -> Option<Event> {
        let mut event = self.completions.pop_front()?;
        while let (Event::Persisted { lsn }, Some(Event::Persisted { lsn: next })) =
            (&event, self.completions.front())
        {
            debug_assert!(next > lsn);
            event = Event::Persisted { lsn: *next };
            self.completions.pop_front();
        }
        Some(event)
    }

    fn execute(&mut self, action: Action) {
        match action {
            Action::Send { peer, msg } => self.send_peer(peer, &msg),
            Action::Disconnect { peer } => {
                if let Some(&key) = self.peers.get(&peer) {
                    // Flush what was queued (e.g. a refusal) before closing.
                    self.flush_peer(key);
                    if let Some(Link::Peer(link)) = self.links.get(key)
                        && let Some(summary) = link.snapshot_summary(&self.snapshots)
                    {
                        info!("{}: dropping the {summary}", link.addr);
                    }
                    self.drop_peer(key);
                    info!("replication link {} closed by replication", peer.0);
                    // The link is gone for the state machine too: it forgets the slave.
                    self.completions.push_back(Event::PeerLost { peer });
                }
            }
            Action::Connect => self.connect_to_master(),
            Action::Persist { lsn, record } => self.wal.append(lsn, &record),
            Action::Apply {
                seq,
                ops,
                replies,
                key_hashes,
            } => self.apply(seq, &ops, &replies, key_hashes),
            Action::Reply { client, error } => {
                self.core.stats.writes_failed += 1;
                let message = error.to_string();
                let status = match error {
                    WriteError::Unavailable(_) => Status::Unavailable,
                    WriteError::Aborted(_) => Status::Aborted,
                };
                self.reply(client, status, 0, message.as_bytes());
            }
            Action::SetTimer { timer, at_ms } => self.timers.set(timer, at_ms),
            Action::CancelTimer { timer } => self.timers.cancel(timer),
            Action::StartSnapshot { peer, at_seq } => {
                if let Some(&key) = self.peers.get(&peer)
                    && let Some(Link::Peer(link)) = self.links.get_mut(key)
                {
                    // A snapshot already streaming is shared if the log still
                    // holds what a receiver of it needs after it.
                    let log_floor = match &self.role {
                        Role::Master(c) => c.log_floor(),
                        Role::Slave { .. } | Role::Standby(_) => at_seq,
                    };
                    let sent_at = self.snapshots.start(peer.0, at_seq, log_floor);
                    if sent_at == at_seq {
                        info!(
                            "streaming a snapshot of {} keys at seq {at_seq} to {} (copied shard by shard)",
                            self.core.store.len(),
                            link.addr
                        );
                    } else {
                        info!(
                            "streaming to {} the snapshot at seq {sent_at} already streaming to \
                             others (shared: no copy of its own; it catches up from seq {sent_at})",
                            link.addr
                        );
                        self.completions.push_back(Event::SnapshotJoined {
                            peer,
                            at_seq: sent_at,
                        });
                    }
                    link.start_snapshot(sent_at);
                    self.dirty_peers.push(key);
                }
            }
            Action::InstallSnapshot {
                at_seq,
                entries,
                begin,
                end,
            } => self.install_snapshot(at_seq, entries, begin, end),
            Action::RecordSyncSet { version, members } => self.record_sync_set(version, members),
        }
    }

    fn send_peer(&mut self, peer: PeerId, msg: &PeerMessage) {
        if let Some(&key) = self.peers.get(&peer)
            && let Some(Link::Peer(link)) = self.links.get_mut(key)
        {
            link.send(msg);
            self.dirty_peers.push(key);
        }
    }

    /// Log a failed attempt to reach the master: the first of a streak and
    /// then every 50th at warning level, so a down master does not flood the log.
    pub(super) fn master_unreachable(&mut self, addr: SocketAddr, e: &io::Error) {
        self.connect_failures += 1;
        if self.connect_failures % 50 == 1 {
            warn!(
                "cannot reach master {addr} over TCP: {e} (attempt {}; retrying with backoff; \
                 replication needs the master to serve TCP, i.e. not -u)",
                self.connect_failures
            );
        } else {
            debug!("cannot reach master {addr}: {e}");
        }
    }

    fn connect_to_master(&mut self) {
        let Role::Slave {
            master_addr,
            staging,
            ..
        } = &mut self.role
        else {
            return;
        };
        // A snapshot half-received on the old link is never finished: free it.
        *staging = None;
        let master_addr = *master_addr;
        let mut stream = match TcpStream::connect(master_addr) {
            Ok(stream) => stream,
            Err(e) => {
                self.master_unreachable(master_addr, &e);
                self.completions.push_back(Event::ConnectFailed);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let limit = self.peer_frame_limit(true);
        let max_output = self.max_peer_output_bytes;
        let entry = self.links.vacant_entry();
        let key = entry.key();
        if let Err(e) = register_link(&self.poll, &mut stream, key) {
            error!("cannot register link to master: {e}");
            self.completions.push_back(Event::ConnectFailed);
            return;
        }
        let id = PeerId(self.next_peer_id);
        self.next_peer_id += 1;
        let epoch = self.failover.as_ref().map_or(0, |f| f.epoch);
        let mut link = PeerLink::new(
            Framed::new(stream),
            id,
            master_addr,
            true,
            limit,
            max_output,
        )
        .in_epoch(epoch);
        if let Some(secret) = &self.cluster_secret {
            match PeerAuth::slave(secret.clone()) {
                Ok((auth, hello)) => link = link.with_auth(auth, Some(hello)),
                Err(e) => {
                    error!("cannot authenticate to the master: {e}");
                    self.completions.push_back(Event::ConnectFailed);
                    return;
                }
            }
        }
        entry.insert(Link::Peer(link));
        self.peers.insert(id, key);
        self.master_dial = Some((id, self.now_ms() + MASTER_CONNECT_TIMEOUT_MS));
    }

    /// Apply committed transaction `seq`. `key_hashes` are the keys' store
    /// hashes when the writes came from this master's clients (hashed once, at
    /// submission); writes from elsewhere (a slave's, a promoted master's
    /// recovered ones) come without, and are hashed here: a hash is never
    /// taken from the network.
    pub(super) fn apply(
        &mut self,
        seq: u64,
        ops: &[crate::protocol::peer::WriteOp],
        replies: &[ClientRef],
        key_hashes: Vec<u64>,
    ) {
        debug_assert!(
            seq > self.core.commit_seq,
            "commits apply in sequence order"
        );
        debug_assert!(key_hashes.is_empty() || key_hashes.len() == ops.len());
        let hashes = if key_hashes.len() == ops.len() {
            key_hashes
        } else {
            let store = &self.core.store;
            ops.iter().map(|op| store.key_hash(op.key())).collect()
        };
        let keys = ops.iter().map(|op| op.key());
        self.core.store.warm(keys.zip(hashes.iter().copied()));
        self.core.waiting.warm(replies);
        for (i, (op, &hash)) in ops.iter().zip(&hashes).enumerate() {
            let Some(write) = crate::wal::replay::store_write(op) else {
                self.wal.before_clear(&self.core.store);
                self.snapshots.before_clear(&self.core.store);
                self.core.store.clear();
                if let Some(&client) = replies.get(i) {
                    self.reply(client, Status::Ok, seq, &[]);
                }
                continue;
            };
            // A snapshot being streamed or written keeps the key (or its
            // shard) as it was at its start (found from the hash at hand,
            // not hashed again).
            self.wal.before_key_write(&self.core.store, op.key(), hash);
            self.snapshots
                .before_key_write(&self.core.store, op.key(), hash);
            let applied = self.core.store.apply_hashed(write, seq, hash);
            if let Some(&client) = replies.get(i) {
                match applied {
                    Applied::Changed(version) => self.reply(client, Status::Ok, version, &[]),
                    Applied::NotFound => self.reply(client, Status::NotFound, 0, &[]),
                }
            }
        }
        self.core.commit_seq = seq;
    }

    fn install_snapshot(
        &mut self,
        at_seq: u64,
        entries: Vec<crate::protocol::peer::SnapshotEntry>,
        begin: bool,
        end: bool,
    ) {
        let Role::Slave { staging, .. } = &mut self.role else {
            return;
        };
        if begin {
            // Keeps the hash key: see `Store::empty_like`.
            *staging = Some(self.core.store.empty_like());
        }
        let Some(store) = staging.as_mut() else {
            warn!("snapshot chunk without a beginning; ignored");
            return;
        };
        for e in entries {
            store.set(&e.key, &e.value, e.version);
            if e.deadline_ms > 0 {
                store.set_deadline(&e.key, Some(e.deadline_ms));
            }
        }
        if end && let Some(store) = staging.take() {
            info!(
                "installed a snapshot of {} keys at seq {at_seq}",
                store.len()
            );
            self.core.store = store;
            self.core.commit_seq = at_seq;
        }
    }

    /// Close the TCP connections of writes whose outcome this server cannot
    /// tell (no status says "unknown": UNAVAILABLE means "not applied"). A
    /// UDP client hears nothing and retries.
    pub(super) fn close_writers(&mut self, targets: impl IntoIterator<Item = ReplyTarget>) {
        for target in targets {
            if let ReplyTarget::Tcp { key, conn_id } = target
                && let Some(Link::Client(connection)) = self.links.get(key)
                && connection.conn_id() == conn_id
            {
                self.close_client(key);
            }
        }
    }

    /// Send the reply of a write that waited for its transaction.
    fn reply(&mut self, client: ClientRef, status: Status, version: u64, message: &[u8]) {
        let Some((target, completion)) = self.core.finish(client, status, version, message) else {
            return;
        };
        // A write was decided: commands waiting to read a key in flight may go on.
        self.touched.append(&mut self.core.key_waiters);
        match target {
            ReplyTarget::Tcp { key, conn_id } => {
                if let Some(Link::Client(connection)) = self.links.get_mut(key)
                    && connection.conn_id() == conn_id
                {
                    connection.deliver(client, |out| completion.encode(out));
                    // A batch's replies to one connection mostly come one after
                    // another (its pipelined commands were parsed together): one
                    // drive after them flushes them all, where a drive per reply
                    // cost a pass through the connection each.
                    if self.touched.last() != Some(&key) {
                        self.touched.push(key);
                    }
                }
            }
            ReplyTarget::Nobody => {}
            ReplyTarget::Udp { from, fingerprint } => {
                if let Some(udp) = self.udp.as_mut() {
                    let mut bytes = Vec::with_capacity(crate::protocol::HEADER_LEN + message.len());
                    completion.encode(&mut bytes);
                    udp.deliver(
                        &mut self.core,
                        from,
                        completion.request_id(),
                        fingerprint,
                        &bytes,
                    );
                }
            }
        }
    }
}
