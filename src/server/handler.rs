//! Executing one client request against the server's state.
//!
//! Reads are answered at once. On a master, writes join this loop
//! iteration's batch (one 2PC transaction) and are answered when it is
//! decided; on a slave they are answered with a redirect to the master.
//! Shared by the TCP and UDP paths so both behave identically.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::protocol::peer::{OpKind, WriteOp};
use crate::protocol::{Opcode, ProtocolError, Request, Status, encode_response};
use crate::replication::{ClientRef, ClientWrite};
use crate::store::Store;

use super::stats::Stats;

/// Largest encoded size of one transaction's writes; more writes wait for
/// the next one, so that a PREPARE stays well inside a peer frame.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// What one write adds to a batch besides its key and value (its encoding, roughly).
const BATCH_BYTES_PER_WRITE: usize = 32;

/// Where the reply to a pending write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyTarget {
    /// A TCP connection, named by slab key and a never-reused id.
    Tcp {
        /// Slab key.
        key: usize,
        /// Connection id; a reused slab key gets a new one.
        conn_id: u64,
    },
    /// A UDP sender; the reply also fills the retry cache entry.
    Udp {
        /// Sender address.
        from: SocketAddr,
        /// Fingerprint of the request datagram.
        fingerprint: u64,
    },
}

/// A write waiting for its transaction's outcome.
#[derive(Debug, Clone, Copy)]
pub struct Waiting {
    /// Where the reply goes.
    pub target: ReplyTarget,
    /// The request's id.
    pub request_id: u32,
    /// The request's opcode byte.
    pub op: u8,
}

/// The result of executing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The reply is in the output buffer.
    Answered,
    /// The write joined the batch; its reply comes with the transaction's outcome.
    Pending(ClientRef),
}

/// This server's place in replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Takes writes and coordinates them.
    Master,
    /// Serves reads; redirects writes to the master at this `host:port`.
    Slave {
        /// The master's client address.
        master: String,
    },
}

/// The state every request may touch.
#[derive(Debug)]
pub struct Core {
    /// The key-value map.
    pub store: Store,
    /// Sequence number of the last applied commit.
    pub commit_seq: u64,
    /// Counters reported by STATS.
    pub stats: Stats,
    /// Largest value accepted.
    pub max_value_bytes: usize,
    /// Master or slave.
    pub mode: Mode,
    /// Writes received in this loop iteration, in arrival order.
    pub batch: Vec<ClientWrite>,
    batch_bytes: usize,
    /// Connections (slab keys) that stopped reading because the batch was full.
    pub batch_waiters: Vec<usize>,
    /// The UDP socket stopped reading because the batch was full.
    pub udp_waiting: bool,
    /// The UDP socket stopped reading after repeated receive errors; read it again soon.
    pub udp_retry: bool,
    /// Writes are refused with this reason (the write-ahead log failed): the
    /// server cannot keep what it would acknowledge. Reads go on.
    pub write_refusal: Option<String>,
    /// Reply routes of writes handed to the coordinator and not yet answered
    /// (foldhash: one insert and one remove per write, SipHash showed in profiles).
    pub waiting: HashMap<ClientRef, Waiting, foldhash::fast::RandomState>,
    next_client_ref: u64,
}

impl Core {
    /// Empty state with the given value limit.
    pub fn new(max_value_bytes: usize, mode: Mode) -> Core {
        Core::recovered(max_value_bytes, mode, Store::new(), 0)
    }

    /// State around a store recovered from the write-ahead log at `commit_seq`.
    pub fn recovered(max_value_bytes: usize, mode: Mode, store: Store, commit_seq: u64) -> Core {
        Core {
            store,
            commit_seq,
            write_refusal: None,
            stats: Stats::default(),
            max_value_bytes,
            mode,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_waiters: Vec::new(),
            udp_waiting: false,
            udp_retry: false,
            waiting: HashMap::default(),
            next_client_ref: 1,
        }
    }

    /// Whether the current batch is full; callers stop taking writes until it is submitted.
    pub fn batch_full(&self) -> bool {
        self.batch_bytes >= MAX_BATCH_BYTES
    }

    /// Take the batch for submission as one transaction.
    pub fn take_batch(&mut self) -> Vec<ClientWrite> {
        self.batch_bytes = 0;
        std::mem::take(&mut self.batch)
    }

    /// Execute `request`, appending an immediate reply to `out` or queueing the write.
    pub fn execute(
        &mut self,
        request: Request<'_>,
        request_id: u32,
        target: ReplyTarget,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let op = request.opcode() as u8;
        self.stats.count(request.opcode());
        let (kind, key, value) = match request {
            Request::Get { key } => {
                match self.store.get(key) {
                    Some((value, version)) => {
                        encode_response(out, op, Status::Ok, request_id, version, value)
                    }
                    None => encode_response(out, op, Status::NotFound, request_id, 0, &[]),
                }
                return Outcome::Answered;
            }
            Request::Ping => {
                encode_response(out, op, Status::Ok, request_id, self.commit_seq, b"PONG");
                return Outcome::Answered;
            }
            Request::Stats => {
                let text = self.stats.render(&self.store, self.commit_seq);
                encode_response(
                    out,
                    op,
                    Status::Ok,
                    request_id,
                    self.commit_seq,
                    text.as_bytes(),
                );
                return Outcome::Answered;
            }
            Request::Put { key, value } => (OpKind::Put, key, value),
            Request::Update { key, value } => (OpKind::Update, key, value),
            Request::Delete { key } => (OpKind::Delete, key, &[][..]),
        };
        if let Mode::Slave { master } = &self.mode {
            self.stats.redirects += 1;
            encode_response(out, op, Status::Redirect, request_id, 0, master.as_bytes());
            return Outcome::Answered;
        }
        if let Some(why) = &self.write_refusal {
            encode_response(out, op, Status::Unavailable, request_id, 0, why.as_bytes());
            return Outcome::Answered;
        }
        let client = ClientRef(self.next_client_ref);
        self.next_client_ref += 1;
        self.batch_bytes += key.len() + value.len() + BATCH_BYTES_PER_WRITE;
        self.batch.push(ClientWrite {
            client,
            op: WriteOp {
                kind,
                key: key.to_vec(),
                value: value.to_vec(),
            },
        });
        self.waiting.insert(
            client,
            Waiting {
                target,
                request_id,
                op,
            },
        );
        Outcome::Pending(client)
    }

    /// Append the error response for a request that could not be served.
    pub fn reject(&mut self, op_byte: u8, request_id: u32, err: &ProtocolError, out: &mut Vec<u8>) {
        self.stats.protocol_errors += 1;
        // Echo the opcode only when it is a request opcode, so the response flag stays meaningful.
        let op = if Opcode::from_u8(op_byte).is_some() {
            op_byte
        } else {
            0
        };
        let message = err.to_string();
        encode_response(out, op, err.status(), request_id, 0, message.as_bytes());
    }
}
