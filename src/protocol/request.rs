//! Typed views of frames: a validated client request, and a response as a client sees it.

use super::error::ProtocolError;
use super::frame::{EXPECT_ABSENT, Frame, Opcode, RESPONSE_FLAG, Status};
use super::txn::{Txn, decode_txn};

/// A client request whose shape has been checked against its opcode.
///
/// `expect` on a write is the header's version field: `0` writes
/// unconditionally, [`EXPECT_ABSENT`] (PUT only) writes only if the key is
/// absent, any other value only if the key exists with exactly that version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Read `key`.
    Get {
        /// Key to read.
        key: &'a [u8],
    },
    /// Create or replace `key`.
    Put {
        /// Key to write.
        key: &'a [u8],
        /// New value.
        value: &'a [u8],
        /// Expected version (compare-and-set); 0: none.
        expect: u64,
    },
    /// Replace `key` only if present.
    Update {
        /// Key to write.
        key: &'a [u8],
        /// New value.
        value: &'a [u8],
        /// Expected version (compare-and-set); 0: none.
        expect: u64,
    },
    /// Remove `key`.
    Delete {
        /// Key to remove.
        key: &'a [u8],
        /// Expected version (compare-and-set); 0: none.
        expect: u64,
    },
    /// Liveness check.
    Ping,
    /// Statistics.
    Stats,
    /// Conditions, then writes applied as one transaction.
    Txn(Txn<'a>),
    /// Create or replace `key`, expiring at `deadline_ms`.
    PutExpiring {
        /// Key to write.
        key: &'a [u8],
        /// New value.
        value: &'a [u8],
        /// Unix ms from which the key reads as absent (> 0).
        deadline_ms: u64,
        /// Expected version (compare-and-set); 0: none.
        expect: u64,
    },
    /// Set (`Some`) or remove (`None`) the deadline of `key`, if present.
    Expire {
        /// Key whose deadline changes.
        key: &'a [u8],
        /// The deadline, unix ms; `None`: never expire.
        deadline_ms: Option<u64>,
        /// Expected version (compare-and-set); 0: none.
        expect: u64,
    },
    /// Read the deadline of `key`.
    Ttl {
        /// Key to read.
        key: &'a [u8],
    },
    /// Authenticate the connection (`--requirepass-file`).
    Auth {
        /// The password as sent.
        password: &'a [u8],
    },
}

impl<'a> Request<'a> {
    /// Validate a frame as a request. Errors here leave the stream parseable.
    pub fn from_frame(frame: &Frame<'a>) -> Result<Request<'a>, ProtocolError> {
        let byte = frame.header.opcode;
        if byte & RESPONSE_FLAG != 0 {
            return Err(ProtocolError::NotARequest(byte));
        }
        let op = Opcode::from_u8(byte).ok_or(ProtocolError::UnknownOpcode(byte))?;
        let (key, value) = (frame.key, frame.value);
        let needs_key = !matches!(
            op,
            Opcode::Ping | Opcode::Stats | Opcode::Txn | Opcode::Auth
        );
        if needs_key && key.is_empty() {
            return Err(ProtocolError::EmptyKey);
        }
        if !needs_key && !key.is_empty() {
            return Err(ProtocolError::UnexpectedKey);
        }
        let takes_value = matches!(
            op,
            Opcode::Put
                | Opcode::Update
                | Opcode::Txn
                | Opcode::PutExpiring
                | Opcode::Expire
                | Opcode::Auth
        );
        if !takes_value && !value.is_empty() {
            return Err(ProtocolError::UnexpectedValue);
        }
        let expect = frame.header.version;
        // "Only if absent" contradicts UPDATE (only if present) and means nothing for DELETE.
        if expect == EXPECT_ABSENT && matches!(op, Opcode::Update | Opcode::Delete | Opcode::Expire)
        {
            return Err(ProtocolError::ExpectAbsentNotPut);
        }
        // The deadline leads the value; an EXPIRE's value is nothing else.
        let deadline = match op {
            Opcode::PutExpiring | Opcode::Expire => {
                let Some(bytes) = value.get(..8) else {
                    return Err(ProtocolError::BadDeadline);
                };
                let deadline = u64::from_be_bytes(bytes.try_into().unwrap_or([0; 8]));
                if (op == Opcode::Expire && value.len() != 8)
                    || (op == Opcode::PutExpiring && deadline == 0)
                {
                    return Err(ProtocolError::BadDeadline);
                }
                deadline
            }
            _ => 0,
        };
        Ok(match op {
            Opcode::Get => Request::Get { key },
            Opcode::Put => Request::Put { key, value, expect },
            Opcode::Update => Request::Update { key, value, expect },
            Opcode::Delete => Request::Delete { key, expect },
            Opcode::Ping => Request::Ping,
            Opcode::Stats => Request::Stats,
            // The frame's value is already within the value limit, so each write's is too.
            Opcode::Txn => {
                Request::Txn(decode_txn(value, value.len()).map_err(ProtocolError::Txn)?)
            }
            Opcode::PutExpiring => Request::PutExpiring {
                key,
                value: &value[8..],
                deadline_ms: deadline,
                expect,
            },
            Opcode::Expire => Request::Expire {
                key,
                deadline_ms: Some(deadline).filter(|&d| d > 0),
                expect,
            },
            Opcode::Ttl => Request::Ttl { key },
            Opcode::Auth => Request::Auth { password: value },
        })
    }

    /// The request's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Get { .. } => Opcode::Get,
            Request::Put { .. } => Opcode::Put,
            Request::Update { .. } => Opcode::Update,
            Request::Delete { .. } => Opcode::Delete,
            Request::Ping => Opcode::Ping,
            Request::Stats => Opcode::Stats,
            Request::Txn(_) => Opcode::Txn,
            Request::PutExpiring { .. } => Opcode::PutExpiring,
            Request::Expire { .. } => Opcode::Expire,
            Request::Ttl { .. } => Opcode::Ttl,
            Request::Auth { .. } => Opcode::Auth,
        }
    }
}

/// A response frame as the client library sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The request's opcode byte (response flag cleared).
    pub opcode: u8,
    /// Decoded status; `None` if the server sent a code this client does not know.
    pub status: Result<Status, u8>,
    /// Echo of the request id.
    pub request_id: u32,
    /// The key's version (commit sequence number), where the operation has one.
    pub version: u64,
    /// The value, or a UTF-8 error message for error statuses.
    pub value: Vec<u8>,
}

impl Response {
    /// Copy a response out of a frame, checking it is one.
    pub fn from_frame(frame: &Frame<'_>) -> Result<Response, ProtocolError> {
        let byte = frame.header.opcode;
        if byte & RESPONSE_FLAG == 0 {
            return Err(ProtocolError::NotARequest(byte));
        }
        Ok(Response {
            opcode: byte & !RESPONSE_FLAG,
            status: Status::from_u8(frame.header.status).ok_or(frame.header.status),
            request_id: frame.header.request_id,
            version: frame.header.version,
            value: frame.value.to_vec(),
        })
    }

    /// The value read as an error message.
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}
