//! The dkvs side of the load generator: which frame each operation becomes and what each
//! response status means for the run. Framing itself is the library's codec.

use ::dkvs::protocol::{Opcode, Status, encode_request};

use crate::workload::OpKind;

/// Largest response value accepted; generous for GETs of any value the tool writes, and a
/// bound on the read buffer against a corrupt length.
pub const MAX_RESPONSE_VALUE_BYTES: usize = 64 << 20;

/// How a response ends an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The operation succeeded.
    Ok,
    /// A GET of a key that does not exist: a successful operation, counted as a miss.
    Miss,
    /// A slave answered a write with the master's `host:port`; the write was not applied.
    Redirect,
    /// The server refused or failed the operation with this status byte.
    Failed(u8),
}

/// The opcode an operation is sent as.
pub fn opcode(kind: OpKind) -> Opcode {
    match kind {
        OpKind::Get => Opcode::Get,
        OpKind::Set => Opcode::Put,
        OpKind::Txn => Opcode::Txn,
    }
}

/// Append a TXN request of PUTs, one per (key, value) the caller streams into `payload`
/// with [`push_txn_put`] after [`begin_txn`].
pub fn encode_txn(out: &mut Vec<u8>, request_id: u32, payload: &[u8]) {
    encode_request(out, Opcode::Txn, request_id, &[], payload);
}

/// Start a TXN payload of `writes` writes and no conditions (docs/PROTOCOL.md §4.3).
pub fn begin_txn(payload: &mut Vec<u8>, writes: u16) {
    payload.clear();
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&writes.to_be_bytes());
}

/// Append one PUT to a TXN payload begun with [`begin_txn`].
pub fn push_txn_put(payload: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    payload.push(1);
    payload.extend_from_slice(&(key.len() as u16).to_be_bytes());
    payload.extend_from_slice(&(value.len() as u32).to_be_bytes());
    payload.extend_from_slice(key);
    payload.extend_from_slice(value);
}

/// Append the request frame for one operation.
pub fn encode(out: &mut Vec<u8>, kind: OpKind, request_id: u32, key: &[u8], value: &[u8]) {
    match kind {
        OpKind::Get => encode_request(out, Opcode::Get, request_id, key, &[]),
        OpKind::Set => encode_request(out, Opcode::Put, request_id, key, value),
        // The caller builds the payload over several keys (Requests::encode).
        OpKind::Txn => encode_txn(out, request_id, value),
    }
}

/// What a response status byte means for an operation of `kind`.
pub fn outcome(kind: OpKind, status: u8) -> Outcome {
    match Status::from_u8(status) {
        Some(Status::Ok) => Outcome::Ok,
        Some(Status::NotFound) if kind == OpKind::Get => Outcome::Miss,
        // A slave redirects writes, and reads while it holds no read lease
        // (catching up, or cut off from its master): both go to the master.
        Some(Status::Redirect) => Outcome::Redirect,
        _ => Outcome::Failed(status),
    }
}

/// Name of a status byte for reports, `status_N` for bytes this build does not know.
pub fn status_name(status: u8) -> String {
    match Status::from_u8(status) {
        Some(s) => s.name().to_string(),
        None => format!("status_{status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::dkvs::protocol::{Decoded, decode};

    #[test]
    fn requests_round_trip_through_the_codec() {
        let mut out = Vec::new();
        encode(&mut out, OpKind::Set, 9, b"key", b"value");
        encode(&mut out, OpKind::Get, 10, b"key", b"ignored");
        let Ok(Decoded::Frame(put, used)) = decode(&out, 1 << 20) else {
            panic!("put did not decode");
        };
        assert_eq!(put.header.opcode, Opcode::Put as u8);
        assert_eq!(
            (put.header.request_id, put.key, put.value),
            (9, &b"key"[..], &b"value"[..])
        );
        let Ok(Decoded::Frame(get, _)) = decode(&out[used..], 1 << 20) else {
            panic!("get did not decode");
        };
        assert_eq!(get.header.opcode, Opcode::Get as u8);
        assert!(get.value.is_empty(), "a GET carries no value");
    }

    #[test]
    fn a_txn_payload_decodes_as_the_server_does() {
        let mut payload = Vec::new();
        begin_txn(&mut payload, 2);
        push_txn_put(&mut payload, b"k1", b"v1");
        push_txn_put(&mut payload, b"k2", b"v2");
        let txn = ::dkvs::protocol::txn::decode_txn(&payload, 1 << 20).expect("decodes");
        assert!(txn.conditions.is_empty());
        assert_eq!(txn.writes.len(), 2);
        assert_eq!(opcode(OpKind::Txn), Opcode::Txn);
        assert_eq!(outcome(OpKind::Txn, 8), Outcome::Redirect);
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(outcome(OpKind::Get, 0), Outcome::Ok);
        assert_eq!(outcome(OpKind::Get, 1), Outcome::Miss);
        assert_eq!(outcome(OpKind::Set, 1), Outcome::Failed(1));
        assert_eq!(outcome(OpKind::Set, 8), Outcome::Redirect);
        // A slave outside its read lease redirects reads too.
        assert_eq!(outcome(OpKind::Get, 8), Outcome::Redirect);
        assert_eq!(status_name(8), "REDIRECT");
        assert_eq!(status_name(200), "status_200");
    }
}
