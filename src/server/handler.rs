//! Executing one request against the server's state and encoding its response.
//!
//! Shared by the TCP and UDP paths so both behave identically.

use crate::protocol::{Opcode, ProtocolError, Request, Status, encode_response};
use crate::store::{Applied, Store, Write};

use super::stats::Stats;

/// The state every request may touch: the map, the commit counter and the counters.
#[derive(Debug)]
pub struct Core {
    /// The key-value map.
    pub store: Store,
    /// Sequence number of the last committed write.
    pub commit_seq: u64,
    /// Counters reported by STATS.
    pub stats: Stats,
    /// Largest value accepted.
    pub max_value_bytes: usize,
}

impl Core {
    /// Empty state with the given value limit.
    pub fn new(max_value_bytes: usize) -> Core {
        Core {
            store: Store::new(),
            commit_seq: 0,
            stats: Stats::default(),
            max_value_bytes,
        }
    }

    /// Execute `request` and append its response to `out`.
    pub fn execute(&mut self, request: Request<'_>, request_id: u32, out: &mut Vec<u8>) {
        let op = request.opcode() as u8;
        self.stats.count(request.opcode());
        let write = match request {
            Request::Get { key } => {
                match self.store.get(key) {
                    Some((value, version)) => {
                        encode_response(out, op, Status::Ok, request_id, version, value)
                    }
                    None => encode_response(out, op, Status::NotFound, request_id, 0, &[]),
                }
                return;
            }
            Request::Ping => {
                encode_response(out, op, Status::Ok, request_id, self.commit_seq, b"PONG");
                return;
            }
            Request::Stats => {
                let text = self.stats.render(&self.store, self.commit_seq);
                encode_response(out, op, Status::Ok, request_id, self.commit_seq, text.as_bytes());
                return;
            }
            Request::Put { key, value } => Write::Put { key, value },
            Request::Update { key, value } => Write::Update { key, value },
            Request::Delete { key } => Write::Delete { key },
        };
        let version = self.commit_seq + 1;
        match self.store.apply(write, version) {
            Applied::Changed(v) => {
                self.commit_seq = version;
                encode_response(out, op, Status::Ok, request_id, v, &[]);
            }
            Applied::NotFound => encode_response(out, op, Status::NotFound, request_id, 0, &[]),
        }
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
