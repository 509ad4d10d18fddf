//! Everything that can be wrong with bytes received off the wire, and the one
//! place where such errors become protocol status codes.

use std::fmt;

use super::frame::{HEADER_LEN, MAX_UDP_FRAME_BYTES, Status};
use super::txn::TxnError;

/// A frame or request that cannot be served as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The first byte is not the protocol's magic byte.
    BadMagic(u8),
    /// The version byte names a protocol this server does not speak.
    UnsupportedVersion(u8),
    /// Reserved header bits are set.
    ReservedBits(u16),
    /// The declared value length exceeds the server's limit.
    ValueTooLarge {
        /// Declared length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// A datagram ended before the frame it declares.
    Truncated {
        /// Bytes in the datagram.
        len: usize,
        /// Length of the frame its header declares; `None` if the header itself is cut.
        declared: Option<usize>,
    },
    /// A datagram holds bytes after its frame.
    TrailingBytes(usize),
    /// The opcode is not a client operation.
    UnknownOpcode(u8),
    /// A response frame was sent where a request was expected.
    NotARequest(u8),
    /// The operation needs a key and none was given.
    EmptyKey,
    /// The operation takes no key but one was given.
    UnexpectedKey,
    /// The operation takes no value but one was given.
    UnexpectedValue,
    /// The response would not fit one UDP datagram.
    ResponseTooLargeForUdp(usize),
    /// A datagram larger than the largest UDP frame (possible over IPv6).
    DatagramTooLarge(usize),
    /// A UDP reply would exceed the amplification limit for its source.
    AmplificationLimit {
        /// Bytes of the reply that was not sent.
        reply_len: usize,
    },
    /// UPDATE or DELETE sent with the "only if absent" expected version.
    ExpectAbsentNotPut,
    /// A TXN payload that cannot be served.
    Txn(TxnError),
    /// A PUTEX value without its 8-byte deadline (or with deadline 0), or an
    /// EXPIRE value that is not exactly 8 bytes.
    BadDeadline,
}

impl ProtocolError {
    /// The status code that reports this error to a client. The only such mapping.
    pub fn status(&self) -> Status {
        match self {
            ProtocolError::BadMagic(_)
            | ProtocolError::ReservedBits(_)
            | ProtocolError::Truncated { .. }
            | ProtocolError::TrailingBytes(_)
            | ProtocolError::NotARequest(_) => Status::Malformed,
            ProtocolError::UnsupportedVersion(_) => Status::UnsupportedVersion,
            ProtocolError::ValueTooLarge { .. } => Status::TooLarge,
            ProtocolError::UnknownOpcode(_) => Status::UnknownOpcode,
            ProtocolError::EmptyKey
            | ProtocolError::UnexpectedKey
            | ProtocolError::UnexpectedValue
            | ProtocolError::ExpectAbsentNotPut
            | ProtocolError::Txn(_)
            | ProtocolError::BadDeadline => Status::InvalidArgument,
            ProtocolError::ResponseTooLargeForUdp(_)
            | ProtocolError::DatagramTooLarge(_)
            | ProtocolError::AmplificationLimit { .. } => Status::UseTcp,
        }
    }

    /// Whether a byte stream that produced this error can no longer be split into frames.
    pub fn breaks_stream(&self) -> bool {
        matches!(
            self,
            ProtocolError::BadMagic(_)
                | ProtocolError::UnsupportedVersion(_)
                | ProtocolError::ReservedBits(_)
                | ProtocolError::ValueTooLarge { .. }
        )
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::BadMagic(b) => {
                write!(
                    f,
                    "bad magic byte 0x{b:02x} (expected 0xdb): not a dkvs frame"
                )
            }
            ProtocolError::UnsupportedVersion(v) => {
                write!(f, "unsupported protocol version {v} (this server speaks 1)")
            }
            ProtocolError::ReservedBits(bits) => {
                write!(f, "reserved header bits set (0x{bits:04x})")
            }
            ProtocolError::ValueTooLarge { len, max } => {
                write!(f, "value of {len} bytes exceeds the limit of {max} bytes")
            }
            ProtocolError::Truncated {
                len,
                declared: Some(declared),
            } => write!(
                f,
                "truncated frame: datagram of {len} bytes is shorter than the \
                 {declared}-byte frame it declares"
            ),
            ProtocolError::Truncated {
                len,
                declared: None,
            } => write!(
                f,
                "truncated frame: datagram of {len} bytes is shorter than the \
                 {HEADER_LEN}-byte header"
            ),
            ProtocolError::TrailingBytes(n) => {
                write!(f, "{n} unexpected bytes after the frame in the datagram")
            }
            ProtocolError::UnknownOpcode(op) => write!(f, "unknown opcode 0x{op:02x}"),
            ProtocolError::NotARequest(op) => {
                write!(f, "opcode 0x{op:02x} is a response, not a request")
            }
            ProtocolError::EmptyKey => write!(f, "key must be 1 to 65535 bytes, got 0"),
            ProtocolError::UnexpectedKey => write!(f, "this operation takes no key"),
            ProtocolError::UnexpectedValue => write!(f, "this operation takes no value"),
            ProtocolError::ResponseTooLargeForUdp(len) => write!(
                f,
                "response of {len} bytes does not fit one UDP datagram \
                 (max {MAX_UDP_FRAME_BYTES}): use TCP"
            ),
            ProtocolError::DatagramTooLarge(len) => write!(
                f,
                "datagram of {len} or more bytes exceeds the UDP frame limit of \
                 {MAX_UDP_FRAME_BYTES}: use TCP"
            ),
            // Short on purpose: it must fit 3x the smallest request (72 bytes with the header).
            ProtocolError::AmplificationLimit { reply_len } => {
                write!(f, "use TCP: reply of {reply_len} bytes > 3x request")
            }
            ProtocolError::ExpectAbsentNotPut => write!(
                f,
                "expected version 0xffffffffffffffff (only if absent) is for PUT only"
            ),
            ProtocolError::Txn(e) => write!(f, "{e}"),
            ProtocolError::BadDeadline => write!(
                f,
                "PUTEX needs an 8-byte deadline (unix ms, not 0) before the value; \
                 EXPIRE's value is exactly that deadline (0: none)"
            ),
        }
    }
}

impl std::error::Error for ProtocolError {}
