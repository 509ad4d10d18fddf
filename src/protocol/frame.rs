//! The wire unit: a fixed 24-byte header followed by a key and a value.
//!
//! The layout is documented byte by byte in `docs/PROTOCOL.md`; this file is
//! its executable form. Decoding never allocates: a [`Frame`] borrows the key
//! and value from the caller's buffer, and every length is checked against the
//! limits before the caller is asked to buffer more bytes.

use byteorder::{BigEndian, ByteOrder};

use super::error::ProtocolError;

/// First byte of every frame; lets a server reject a stray client at once.
pub const MAGIC: u8 = 0xDB;
/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;
/// Longest key the protocol can carry (the key length is a `u16`).
pub const MAX_KEY_BYTES: usize = u16::MAX as usize;
/// Default largest value a server accepts (`--max-value-size`).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1 << 20;
/// Largest UDP payload on IPv4; a frame sent over UDP must fit in it.
pub const MAX_UDP_FRAME_BYTES: usize = 65_507;
/// The expected version that asks for a write "only if the key is absent"
/// (PUT only): no key ever carries it, versions are commit sequence numbers.
pub const EXPECT_ABSENT: u64 = u64::MAX;
/// Set in the opcode byte of every response.
pub const RESPONSE_FLAG: u8 = 0x80;

/// Client operations. Values 0x40..=0x7F are reserved for peer (replication) messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    /// Read a key.
    Get = 0x01,
    /// Create or replace a key.
    Put = 0x02,
    /// Replace a key only if it exists.
    Update = 0x03,
    /// Remove a key.
    Delete = 0x04,
    /// Liveness check.
    Ping = 0x05,
    /// Server statistics as text.
    Stats = 0x06,
    /// Conditions and writes applied as one transaction (payload in `txn.rs`).
    Txn = 0x07,
    /// Create or replace a key that expires: the value is an 8-byte deadline
    /// (unix ms, > 0) followed by the key's value.
    PutExpiring = 0x08,
    /// Set a key's deadline (8-byte unix ms in the value; 0 removes it), if present.
    Expire = 0x09,
    /// Read a key's deadline: 8 bytes, 0 when it has none.
    Ttl = 0x0A,
    /// Authenticate the connection: empty key, the password as value.
    Auth = 0x0B,
}

impl Opcode {
    /// The opcode for a request byte, if it names a client operation.
    pub fn from_u8(byte: u8) -> Option<Opcode> {
        Some(match byte {
            0x01 => Opcode::Get,
            0x02 => Opcode::Put,
            0x03 => Opcode::Update,
            0x04 => Opcode::Delete,
            0x05 => Opcode::Ping,
            0x06 => Opcode::Stats,
            0x07 => Opcode::Txn,
            0x08 => Opcode::PutExpiring,
            0x09 => Opcode::Expire,
            0x0A => Opcode::Ttl,
            0x0B => Opcode::Auth,
            _ => return None,
        })
    }

    /// Whether the operation changes the store (and so must be replicated and deduplicated).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Opcode::Put
                | Opcode::Update
                | Opcode::Delete
                | Opcode::Txn
                | Opcode::PutExpiring
                | Opcode::Expire
        )
    }

    /// Lower-case name, as used by the CLI and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Get => "get",
            Opcode::Put => "put",
            Opcode::Update => "update",
            Opcode::Delete => "delete",
            Opcode::Ping => "ping",
            Opcode::Stats => "stats",
            Opcode::Txn => "txn",
            Opcode::PutExpiring => "putex",
            Opcode::Expire => "expire",
            Opcode::Ttl => "ttl",
            Opcode::Auth => "auth",
        }
    }
}

/// Response status codes. Anything but `Ok` and `NotFound` carries a UTF-8 message as its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// The operation succeeded.
    Ok = 0,
    /// The key does not exist (GET, UPDATE, DELETE).
    NotFound = 1,
    /// The frame could not be parsed (bad magic, reserved bits set, trailing bytes).
    Malformed = 2,
    /// The protocol version byte is not one this server speaks.
    UnsupportedVersion = 3,
    /// The opcode is not a known operation.
    UnknownOpcode = 4,
    /// The key or value breaks a rule of the operation (empty key, value on a GET, ...).
    InvalidArgument = 5,
    /// A length exceeds the server's limits.
    TooLarge = 6,
    /// The request or its response does not fit in one UDP datagram.
    UseTcp = 7,
    /// This server is a slave; the value names the master's `host:port`.
    Redirect = 8,
    /// The server cannot take writes now (e.g. too few slaves in sync).
    Unavailable = 9,
    /// The server failed internally (e.g. a disk error).
    ServerError = 10,
    /// The write's transaction was aborted; it was applied nowhere.
    Aborted = 11,
    /// A compare-and-set or TXN condition did not hold: nothing was applied.
    /// The version field carries the key's current version (0: absent).
    VersionMismatch = 12,
    /// The server has a password and this connection has not sent a
    /// successful AUTH yet (or the request came over UDP, which cannot).
    NoAuth = 13,
    /// AUTH with a wrong password, or while the server has none.
    AuthFailed = 14,
    /// Protected mode: a server bound to a non-loopback address without a
    /// password refuses clients from non-loopback addresses.
    Denied = 15,
}

impl Status {
    /// The status for a wire byte; unknown bytes map to `None`.
    pub fn from_u8(byte: u8) -> Option<Status> {
        Some(match byte {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::Malformed,
            3 => Status::UnsupportedVersion,
            4 => Status::UnknownOpcode,
            5 => Status::InvalidArgument,
            6 => Status::TooLarge,
            7 => Status::UseTcp,
            8 => Status::Redirect,
            9 => Status::Unavailable,
            10 => Status::ServerError,
            11 => Status::Aborted,
            12 => Status::VersionMismatch,
            13 => Status::NoAuth,
            14 => Status::AuthFailed,
            15 => Status::Denied,
            _ => return None,
        })
    }

    /// Upper-case name, as printed by the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::NotFound => "NOT_FOUND",
            Status::Malformed => "MALFORMED",
            Status::UnsupportedVersion => "UNSUPPORTED_VERSION",
            Status::UnknownOpcode => "UNKNOWN_OPCODE",
            Status::InvalidArgument => "INVALID_ARGUMENT",
            Status::TooLarge => "TOO_LARGE",
            Status::UseTcp => "USE_TCP",
            Status::Redirect => "REDIRECT",
            Status::Unavailable => "UNAVAILABLE",
            Status::ServerError => "SERVER_ERROR",
            Status::Aborted => "ABORTED",
            Status::VersionMismatch => "VERSION_MISMATCH",
            Status::NoAuth => "NOAUTH",
            Status::AuthFailed => "AUTH_FAILED",
            Status::Denied => "DENIED",
        }
    }
}

/// The fixed part of a frame, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Operation, with [`RESPONSE_FLAG`] set on responses.
    pub opcode: u8,
    /// Status byte; 0 in requests.
    pub status: u8,
    /// Chosen by the client, echoed by the server.
    pub request_id: u32,
    /// Commit sequence number: the key's version in responses, 0 in requests.
    pub version: u64,
    /// Bytes of key following the header.
    pub key_len: u16,
    /// Bytes of value following the key.
    pub value_len: u32,
}

impl Header {
    /// Total bytes of the frame this header starts.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.key_len as usize + self.value_len as usize
    }

    /// Decode and validate a header. `max_value_bytes` bounds the value before anything is buffered.
    pub fn parse(bytes: &[u8], max_value_bytes: usize) -> Result<Header, ProtocolError> {
        debug_assert!(bytes.len() >= HEADER_LEN);
        if bytes[0] != MAGIC {
            return Err(ProtocolError::BadMagic(bytes[0]));
        }
        if bytes[1] != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(bytes[1]));
        }
        let flags = BigEndian::read_u16(&bytes[18..20]);
        if flags != 0 {
            return Err(ProtocolError::ReservedBits(flags));
        }
        let header = Header {
            opcode: bytes[2],
            status: bytes[3],
            request_id: BigEndian::read_u32(&bytes[4..8]),
            version: BigEndian::read_u64(&bytes[8..16]),
            key_len: BigEndian::read_u16(&bytes[16..18]),
            value_len: BigEndian::read_u32(&bytes[20..24]),
        };
        if header.value_len as usize > max_value_bytes {
            return Err(ProtocolError::ValueTooLarge {
                len: header.value_len as usize,
                max: max_value_bytes,
            });
        }
        Ok(header)
    }

    /// Append the 24 header bytes to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0] = MAGIC;
        bytes[1] = PROTOCOL_VERSION;
        bytes[2] = self.opcode;
        bytes[3] = self.status;
        BigEndian::write_u32(&mut bytes[4..8], self.request_id);
        BigEndian::write_u64(&mut bytes[8..16], self.version);
        BigEndian::write_u16(&mut bytes[16..18], self.key_len);
        // bytes 18..20: reserved flags, always zero in version 1.
        BigEndian::write_u32(&mut bytes[20..24], self.value_len);
        out.extend_from_slice(&bytes);
    }
}

/// A complete frame borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The decoded header.
    pub header: Header,
    /// The key bytes (`header.key_len` of them).
    pub key: &'a [u8],
    /// The value bytes (`header.value_len` of them).
    pub value: &'a [u8],
}

/// Result of looking for a frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame and the number of bytes it used.
    Frame(Frame<'a>, usize),
    /// More bytes are needed; the number is the total frame length when the header is known.
    Incomplete(Option<usize>),
}

/// Decode the frame at the start of `buf`, borrowing key and value from it.
///
/// A header error means the stream can no longer be parsed: the caller must
/// answer with the error and close the stream.
pub fn decode(buf: &[u8], max_value_bytes: usize) -> Result<Decoded<'_>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete(None));
    }
    let header = Header::parse(&buf[..HEADER_LEN], max_value_bytes)?;
    let total = header.frame_len();
    if buf.len() < total {
        return Ok(Decoded::Incomplete(Some(total)));
    }
    let key_end = HEADER_LEN + header.key_len as usize;
    Ok(Decoded::Frame(
        Frame {
            header,
            key: &buf[HEADER_LEN..key_end],
            value: &buf[key_end..total],
        },
        total,
    ))
}

/// Decode a datagram that must hold exactly one frame.
pub fn decode_datagram(buf: &[u8], max_value_bytes: usize) -> Result<Frame<'_>, ProtocolError> {
    match decode(buf, max_value_bytes)? {
        Decoded::Frame(frame, used) if used == buf.len() => Ok(frame),
        Decoded::Frame(_, used) => Err(ProtocolError::TrailingBytes(buf.len() - used)),
        Decoded::Incomplete(declared) => Err(ProtocolError::Truncated {
            len: buf.len(),
            declared,
        }),
    }
}

/// Append a whole frame to `out`. The caller guarantees `key.len() <= MAX_KEY_BYTES`.
pub fn encode(
    out: &mut Vec<u8>,
    opcode: u8,
    status: u8,
    request_id: u32,
    version: u64,
    key: &[u8],
    value: &[u8],
) {
    debug_assert!(key.len() <= MAX_KEY_BYTES);
    debug_assert!(value.len() <= u32::MAX as usize);
    out.reserve(HEADER_LEN + key.len() + value.len());
    Header {
        opcode,
        status,
        request_id,
        version,
        key_len: key.len() as u16,
        value_len: value.len() as u32,
    }
    .write(out);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// Append a request frame to `out`.
pub fn encode_request(out: &mut Vec<u8>, op: Opcode, request_id: u32, key: &[u8], value: &[u8]) {
    encode(out, op as u8, 0, request_id, 0, key, value);
}

/// Append a request frame carrying an expected version (compare-and-set) to `out`.
pub fn encode_request_expecting(
    out: &mut Vec<u8>,
    op: Opcode,
    request_id: u32,
    expect: u64,
    key: &[u8],
    value: &[u8],
) {
    encode(out, op as u8, 0, request_id, expect, key, value);
}

/// Append a response frame to `out`; responses carry no key.
pub fn encode_response(
    out: &mut Vec<u8>,
    op_byte: u8,
    status: Status,
    request_id: u32,
    version: u64,
    value: &[u8],
) {
    encode(
        out,
        op_byte | RESPONSE_FLAG,
        status as u8,
        request_id,
        version,
        &[],
        value,
    );
}
