//! The dkvs binary wire protocol: frames, their codec, and typed requests.
//!
//! See `docs/PROTOCOL.md` for the byte-by-byte description.

mod error;
mod frame;
mod op_bytes;
pub mod peer;
pub mod peer_auth;
mod request;
pub mod resp;
pub mod resp_reply;
pub mod txn;

pub use error::ProtocolError;
pub use frame::{
    DEFAULT_MAX_VALUE_BYTES, Decoded, EXPECT_ABSENT, Frame, HEADER_LEN, Header, MAGIC,
    MAX_KEY_BYTES, MAX_UDP_FRAME_BYTES, Opcode, PROTOCOL_VERSION, RESPONSE_FLAG, Status, decode,
    decode_datagram, encode, encode_request, encode_request_expecting, encode_response,
};
pub use peer::{PeerError, PeerMessage};
pub use request::{Request, Response};

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
