//! The etcd agent: the helper threads that talk to etcd for the reactor.
//!
//! Every etcd call blocks for a network round trip (and up to the request
//! timeout when etcd is unreachable), so none may run on the reactor thread:
//! it would stall every client. The reactor hands [`Request`]s to a worker
//! thread through a channel; the worker runs them one at a time and sends the
//! [`Reply`] back, waking the reactor through its `mio::Waker`. A second
//! thread holds a watch on the cluster's keys (a streamed HTTP body that
//! blocks between events) and reports each change as [`Reply::Changed`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, warn};
use mio::Waker;

use super::election::{Observation, Reply, Request};
use super::record::{LeaderRecord, SyncRecord};
use crate::etcd::{Compare, EtcdClient, EtcdError, TxnOp, TxnOpResponse, WatchNext};

/// The keys of one cluster in etcd.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `/dkvs/NAME/`: everything of the cluster (watched).
    pub prefix: Vec<u8>,
    /// `/dkvs/NAME/leader`.
    pub leader: Vec<u8>,
    /// `/dkvs/NAME/sync`.
    pub sync: Vec<u8>,
}

impl Keys {
    /// The keys of cluster `name`.
    pub fn new(name: &str) -> Keys {
        let prefix = format!("/dkvs/{name}/");
        Keys {
            leader: format!("{prefix}leader").into_bytes(),
            sync: format!("{prefix}sync").into_bytes(),
            prefix: prefix.into_bytes(),
        }
    }
}

/// Handle of the agent's threads; dropping it stops them.
pub struct Agent {
    requests: Option<Sender<Request>>,
    replies: Receiver<Reply>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Start the threads for `endpoints` and cluster `name`, each call bounded by `timeout`.
    pub fn start(
        endpoints: Vec<String>,
        name: &str,
        timeout: Duration,
        waker: Arc<Waker>,
    ) -> Agent {
        let (request_tx, request_rx) = mpsc::channel::<Request>();
        let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
        let stop = Arc::new(AtomicBool::new(false));
        let keys = Keys::new(name);
        let mut threads = Vec::new();
        {
            let client = EtcdClient::new(endpoints.clone(), timeout);
            let (keys, replies, waker) = (keys.clone(), reply_tx.clone(), Arc::clone(&waker));
            threads.push(
                thread::Builder::new()
                    .name("dkvs-etcd".into())
                    .spawn(move || {
                        while let Ok(request) = request_rx.recv() {
                            let reply = run(&client, &keys, request);
                            if replies.send(reply).is_err() {
                                return;
                            }
                            wake(&waker);
                        }
                    })
                    .expect("spawn the etcd agent thread"),
            );
        }
        {
            let client = EtcdClient::new(endpoints, timeout);
            let stop = Arc::clone(&stop);
            threads.push(
                thread::Builder::new()
                    .name("dkvs-etcd-watch".into())
                    .spawn(move || watch(&client, &keys, &stop, &reply_tx, &waker, timeout))
                    .expect("spawn the etcd watch thread"),
            );
        }
        Agent {
            requests: Some(request_tx),
            replies: reply_rx,
            stop,
            threads,
        }
    }

    /// Queue a request.
    pub fn send(&self, request: Request) {
        if let Some(tx) = &self.requests
            && tx.send(request).is_err()
        {
            warn!("etcd agent thread is gone; request dropped");
        }
    }

    /// The next reply, if one has arrived.
    pub fn try_recv(&self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the channel ends the worker after its current call.
        self.requests = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn wake(waker: &Waker) {
    if let Err(e) = waker.wake() {
        warn!("cannot wake the reactor: {e}");
    }
}

fn failed(what: &'static str, e: EtcdError) -> Reply {
    Reply::Failed {
        what,
        error: e.to_string(),
    }
}

/// Run one request against etcd.
fn run(client: &EtcdClient, keys: &Keys, request: Request) -> Reply {
    match request {
        Request::Read => {
            let ops = [
                TxnOp::Range {
                    key: keys.leader.clone(),
                },
                TxnOp::Range {
                    key: keys.sync.clone(),
                },
            ];
            match client.txn(&[], &ops, &[]) {
                Ok(r) => Reply::Read(observation(keys, &r.responses)),
                Err(e) => failed("read", e),
            }
        }
        Request::GrantLease { ttl_ms, sent_ms } => {
            match client.lease_grant(Duration::from_millis(ttl_ms)) {
                Ok((lease, ttl_secs)) => Reply::LeaseGranted {
                    lease,
                    ttl_ms: ttl_secs.max(0) as u64 * 1000,
                    sent_ms,
                },
                Err(e) => failed("grant lease", e),
            }
        }
        Request::Campaign {
            lease,
            leader,
            sync_mod_revision,
            sync,
        } => {
            let compares = [
                Compare::Version(keys.leader.clone(), 0),
                Compare::ModRevision(keys.sync.clone(), sync_mod_revision),
            ];
            let success = [
                TxnOp::Put {
                    key: keys.leader.clone(),
                    value: leader.to_string().into_bytes(),
                    lease: Some(lease),
                },
                TxnOp::Put {
                    key: keys.sync.clone(),
                    value: sync.to_string().into_bytes(),
                    lease: None,
                },
            ];
            match client.txn(&compares, &success, &[]) {
                Ok(r) => Reply::Campaigned { won: r.succeeded },
                Err(e) => failed("campaign", e),
            }
        }
        Request::Keepalive { lease, sent_ms } => match client.lease_keepalive(lease) {
            Ok(ttl_secs) => Reply::KeptAlive {
                sent_ms,
                ttl_ms: ttl_secs.max(0) as u64 * 1000,
            },
            Err(e) if e.is_lease_not_found() => Reply::KeptAlive { sent_ms, ttl_ms: 0 },
            Err(e) => failed("keepalive", e),
        },
        Request::WriteSync {
            version,
            leader,
            sync,
        } => {
            let compares = [Compare::Value(
                keys.leader.clone(),
                leader.to_string().into_bytes(),
            )];
            let success = [TxnOp::Put {
                key: keys.sync.clone(),
                value: sync.to_string().into_bytes(),
                lease: None,
            }];
            match client.txn(&compares, &success, &[]) {
                Ok(r) => Reply::SyncWritten {
                    version,
                    ok: r.succeeded,
                },
                Err(e) => failed("write sync", e),
            }
        }
        Request::Revoke { lease } => match client.lease_revoke(lease) {
            Ok(_) => Reply::Changed,
            Err(e) => failed("revoke", e),
        },
    }
}

/// Both keys from a read's range results; a value that does not parse counts as absent.
fn observation(keys: &Keys, responses: &[TxnOpResponse]) -> Observation {
    let mut obs = Observation::default();
    for r in responses {
        let TxnOpResponse::Range(Some(kv)) = r else {
            continue;
        };
        if kv.key == keys.leader {
            match LeaderRecord::parse(&kv.value) {
                Ok(l) => obs.leader = Some((l, kv.lease)),
                Err(e) => warn!("etcd: ignoring the leader key's value: {e}"),
            }
        } else if kv.key == keys.sync {
            match SyncRecord::parse(&kv.value) {
                Ok(s) => obs.sync = Some((s, kv.mod_revision)),
                Err(e) => warn!("etcd: ignoring the in-sync set's value: {e}"),
            }
        }
    }
    obs
}

/// Hold a watch on the cluster's keys; report every change (and every
/// reopening, since events may have been missed meanwhile) as `Changed`.
fn watch(
    client: &EtcdClient,
    keys: &Keys,
    stop: &AtomicBool,
    replies: &Sender<Reply>,
    waker: &Waker,
    timeout: Duration,
) {
    let tick = Duration::from_millis(200);
    while !stop.load(Ordering::Relaxed) {
        let mut w = match client.watch_prefix(&keys.prefix, 0) {
            Ok(w) => w,
            Err(e) => {
                debug!("etcd watch: cannot open: {e}");
                thread::sleep(timeout.min(Duration::from_secs(1)));
                continue;
            }
        };
        if replies.send(Reply::Changed).is_err() {
            return;
        }
        wake(waker);
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match w.next(tick) {
                Ok(WatchNext::Event(_)) => {
                    if replies.send(Reply::Changed).is_err() {
                        return;
                    }
                    wake(waker);
                }
                Ok(WatchNext::Timeout) => {}
                Ok(other) => {
                    debug!("etcd watch ended ({other:?}); reopening");
                    break;
                }
                Err(e) => {
                    debug!("etcd watch failed: {e}; reopening");
                    break;
                }
            }
        }
    }
}
