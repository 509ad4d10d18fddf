//! Property tests of the codecs (proptest): whatever is encoded decodes to
//! itself, and a stream decodes the same however the network splits it.
//!
//! The unit tests beside each codec pin the byte layouts and the malformed
//! inputs; these check the same codecs over generated values. Case counts are
//! kept small so the suite stays fast in debug builds; `PROPTEST_CASES=N`
//! runs more.

use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;

use super::peer::{
    CatchUp, OpKind, Outcome, PEER_PROTOCOL_VERSION, PeerMessage, SnapshotEntry, Vote, WriteOp,
    decode_peer,
};
use super::txn::{Check, Condition, Txn, TxnWrite, decode_txn};
use super::{Decoded, HEADER_LEN, decode, decode_datagram, encode};

/// Larger than any value generated here: the limit is not what is tested.
const MAX: usize = 1 << 20;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        // A failure is shrunk, then reported with its seed; none is persisted
        // (no regressions directory to litter the tree: a failure becomes a
        // unit test, as the fuzzers' crashes do).
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 1..=24)
}

fn text() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..12).prop_map(String::from_iter)
}

/// One client frame's fields: opcode, status, request id, version, key, value.
#[derive(Debug, Clone)]
struct FrameParts {
    opcode: u8,
    status: u8,
    request_id: u32,
    version: u64,
    key: Vec<u8>,
    value: Vec<u8>,
}

fn frame_parts() -> impl Strategy<Value = FrameParts> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<u32>(),
        any::<u64>(),
        bytes(40),
        bytes(200),
    )
        .prop_map(
            |(opcode, status, request_id, version, key, value)| FrameParts {
                opcode,
                status,
                request_id,
                version,
                key,
                value,
            },
        )
}

impl FrameParts {
    fn encode(&self, out: &mut Vec<u8>) {
        encode(
            out,
            self.opcode,
            self.status,
            self.request_id,
            self.version,
            &self.key,
            &self.value,
        );
    }

    fn matches(&self, frame: &super::Frame<'_>) -> bool {
        frame.header.opcode == self.opcode
            && frame.header.status == self.status
            && frame.header.request_id == self.request_id
            && frame.header.version == self.version
            && frame.key == self.key.as_slice()
            && frame.value == self.value.as_slice()
    }
}

/// Feed `chunks` one at a time to a buffer and take every complete frame off
/// its front, as a connection does; returns each frame's bytes.
fn frames_of(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut buffer = Vec::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buffer.extend_from_slice(chunk);
        loop {
            match decode(&buffer, MAX) {
                Ok(Decoded::Frame(_, used)) => {
                    frames.push(buffer.drain(..used).collect());
                }
                Ok(Decoded::Incomplete(need)) => {
                    // A known length is always more than is buffered.
                    assert!(need.is_none_or(|n| n > buffer.len()));
                    break;
                }
                Err(e) => panic!("a well-formed stream failed to decode: {e}"),
            }
        }
    }
    assert!(buffer.is_empty(), "{} bytes left over", buffer.len());
    frames
}

/// As [`frames_of`], for peer messages.
fn messages_of(chunks: &[&[u8]]) -> Vec<PeerMessage> {
    let mut buffer = Vec::new();
    let mut messages = Vec::new();
    for chunk in chunks {
        buffer.extend_from_slice(chunk);
        while let Some((msg, used)) = decode_peer(&buffer, MAX).expect("well-formed") {
            messages.push(msg);
            buffer.drain(..used);
        }
    }
    assert!(buffer.is_empty(), "{} bytes left over", buffer.len());
    messages
}

/// Cut points that split a stream into chunks, sorted, from arbitrary numbers.
fn cuts(len: usize, raw: &[usize]) -> Vec<usize> {
    let mut cuts: Vec<usize> = raw.iter().map(|c| c % (len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

fn chunks_at<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut from = 0;
    for &cut in cuts {
        chunks.push(&stream[from..cut]);
        from = cut;
    }
    chunks.push(&stream[from..]);
    chunks
}

fn op() -> impl Strategy<Value = WriteOp> {
    prop_oneof![
        (key(), bytes(40)).prop_map(|(key, value)| WriteOp::new(OpKind::Put, key, value)),
        (key(), bytes(40)).prop_map(|(key, value)| WriteOp::new(OpKind::Update, key, value)),
        key().prop_map(|key| WriteOp::new(OpKind::Delete, key, b"")),
        Just(WriteOp::new(OpKind::Clear, b"", b"")),
        (key(), bytes(40), 1..=u64::MAX).prop_map(|(k, v, d)| WriteOp::put_expiring(&k, &v, d)),
        (key(), proptest::option::of(1..=u64::MAX)).prop_map(|(k, d)| WriteOp::expire(&k, d)),
    ]
}

fn ops() -> impl Strategy<Value = Arc<[WriteOp]>> {
    vec(op(), 0..6).prop_map(Into::into)
}

fn snapshot_entry() -> impl Strategy<Value = SnapshotEntry> {
    (
        key(),
        bytes(40),
        any::<u64>(),
        prop_oneof![Just(0u64), any::<u64>()],
    )
        .prop_map(|(key, value, version, deadline_ms)| SnapshotEntry {
            key,
            value,
            version,
            deadline_ms,
        })
}

fn peer_message() -> impl Strategy<Value = PeerMessage> {
    let catch_up = prop_oneof![
        any::<u64>().prop_map(|from_seq| CatchUp::Log { from_seq }),
        any::<u64>().prop_map(|at_seq| CatchUp::Snapshot { at_seq }),
        Just(CatchUp::Diverged),
    ];
    let outcome = prop_oneof![
        Just(Outcome::Pending),
        Just(Outcome::Committed),
        Just(Outcome::Aborted),
        Just(Outcome::Unknown),
    ];
    prop_oneof![
        (
            text(),
            any::<u64>(),
            any::<u64>(),
            prop_oneof![Just(PEER_PROTOCOL_VERSION), any::<u16>()],
            any::<u64>(),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(
                |(
                    client_addr,
                    last_applied_seq,
                    history_id,
                    protocol_version,
                    node_id,
                    d,
                    epoch,
                )| {
                    PeerMessage::Register {
                        client_addr,
                        last_applied_seq,
                        history_id,
                        protocol_version,
                        node_id,
                        may_discard_data: d,
                        epoch,
                    }
                }
            ),
        (any::<u64>(), any::<u64>(), catch_up, any::<u64>()).prop_map(
            |(master_seq, history_id, catch_up, epoch)| PeerMessage::Registered {
                master_seq,
                history_id,
                catch_up,
                epoch,
            }
        ),
        (any::<u64>(), any::<u64>(), ops()).prop_map(|(seq, commit_through, ops)| {
            PeerMessage::Prepare {
                seq,
                commit_through,
                ops,
            }
        }),
        (any::<u64>(), ops()).prop_map(|(seq, ops)| PeerMessage::LogEntry { seq, ops }),
        (
            any::<u64>(),
            prop_oneof![Just(Vote::Yes), text().prop_map(Vote::No)],
            any::<u64>()
        )
            .prop_map(|(seq, vote, ack_through)| PeerMessage::Vote {
                seq,
                vote,
                ack_through
            }),
        any::<u64>().prop_map(|seq| PeerMessage::Commit { seq }),
        any::<u64>().prop_map(|seq| PeerMessage::Abort { seq }),
        any::<u64>().prop_map(|seq| PeerMessage::Ack { seq }),
        any::<u64>().prop_map(|seq| PeerMessage::CaughtUp { seq }),
        any::<u64>().prop_map(|seq| PeerMessage::OutcomeQuery { seq }),
        (any::<u64>(), outcome).prop_map(|(seq, outcome)| PeerMessage::Outcome { seq, outcome }),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>()).prop_map(
            |(seq, stamp, lease_ms, poll)| PeerMessage::Heartbeat {
                seq,
                stamp,
                lease_ms,
                poll,
            }
        ),
        (any::<u64>(), vec(snapshot_entry(), 0..5), any::<bool>()).prop_map(
            |(snapshot_seq, entries, last)| PeerMessage::SnapshotChunk {
                snapshot_seq,
                entries,
                last,
            }
        ),
    ]
}

/// Owned parts of a TXN payload; [`TxnParts::txn`] borrows them.
#[derive(Debug, Clone)]
struct TxnParts {
    conditions: Vec<(Vec<u8>, Check)>,
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl TxnParts {
    fn txn(&self) -> Txn<'_> {
        Txn {
            conditions: self
                .conditions
                .iter()
                .map(|(key, check)| Condition { key, check: *check })
                .collect(),
            writes: self
                .writes
                .iter()
                .map(|(key, value)| match value {
                    Some(value) => TxnWrite::Put { key, value },
                    None => TxnWrite::Delete { key },
                })
                .collect(),
        }
    }
}

fn txn_parts() -> impl Strategy<Value = TxnParts> {
    let check = prop_oneof![
        (1..=u64::MAX).prop_map(Check::Version),
        Just(Check::Absent),
        Just(Check::Exists),
    ];
    (
        vec((key(), check), 0..8),
        vec((key(), proptest::option::of(bytes(40))), 0..8),
    )
        .prop_map(|(conditions, writes)| TxnParts { conditions, writes })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_client_frame_decodes_to_what_was_encoded(parts in frame_parts()) {
        let mut wire = Vec::new();
        parts.encode(&mut wire);
        prop_assert_eq!(wire.len(), HEADER_LEN + parts.key.len() + parts.value.len());
        match decode(&wire, MAX) {
            Ok(Decoded::Frame(frame, used)) => {
                prop_assert_eq!(used, wire.len());
                prop_assert!(parts.matches(&frame), "{:?} vs {:?}", parts, frame);
            }
            other => prop_assert!(false, "{:?}", other),
        }
        let frame = decode_datagram(&wire, MAX).expect("one datagram");
        prop_assert!(parts.matches(&frame));
    }

    /// Whatever the bytes, a frame that decodes re-encodes to the bytes it used.
    #[test]
    fn any_bytes_that_decode_as_a_frame_re_encode_the_same(
        mut raw in vec(any::<u8>(), HEADER_LEN..160),
        plausible in any::<bool>(),
    ) {
        if plausible {
            // Mostly a valid header with small lengths, so that the property
            // is about frames and not only about rejected magic bytes.
            raw[0] = super::MAGIC;
            raw[1] = super::PROTOCOL_VERSION;
            raw[16] = 0;
            raw[17] &= 0x3F;
            raw[18] = 0;
            raw[19] = 0;
            raw[20] = 0;
            raw[21] = 0;
            raw[22] = 0;
            raw[23] &= 0x3F;
        }
        if let Ok(Decoded::Frame(frame, used)) = decode(&raw, MAX) {
            let mut again = Vec::new();
            encode(
                &mut again,
                frame.header.opcode,
                frame.header.status,
                frame.header.request_id,
                frame.header.version,
                frame.key,
                frame.value,
            );
            prop_assert_eq!(&again[..], &raw[..used]);
        }
    }

    #[test]
    fn client_frames_split_at_every_boundary_decode_the_same(
        frames in vec(frame_parts(), 1..4),
        raw_cuts in vec(any::<usize>(), 0..6),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for parts in &frames {
            let mut one = Vec::new();
            parts.encode(&mut one);
            stream.extend_from_slice(&one);
            expected.push(one);
        }
        for cut in 0..=stream.len() {
            prop_assert_eq!(&frames_of(&[&stream[..cut], &stream[cut..]]), &expected, "cut {}", cut);
        }
        let cuts = cuts(stream.len(), &raw_cuts);
        prop_assert_eq!(&frames_of(&chunks_at(&stream, &cuts)), &expected);
    }

    #[test]
    fn a_peer_message_decodes_to_what_was_encoded(msg in peer_message(), epoch in any::<u32>()) {
        let mut wire = Vec::new();
        msg.encode_in_epoch(&mut wire, epoch);
        let decoded = decode_peer(&wire, MAX).expect("decodes");
        prop_assert_eq!(decoded, Some((msg, wire.len())));
    }

    #[test]
    fn peer_messages_split_at_every_boundary_decode_the_same(
        msgs in vec(peer_message(), 1..4),
        raw_cuts in vec(any::<usize>(), 0..6),
    ) {
        let mut stream = Vec::new();
        for msg in &msgs {
            msg.encode(&mut stream);
        }
        for cut in 0..=stream.len() {
            prop_assert_eq!(&messages_of(&[&stream[..cut], &stream[cut..]]), &msgs, "cut {}", cut);
        }
        let cuts = cuts(stream.len(), &raw_cuts);
        prop_assert_eq!(&messages_of(&chunks_at(&stream, &cuts)), &msgs);
    }

    #[test]
    fn a_txn_payload_decodes_to_what_was_encoded(parts in txn_parts()) {
        let txn = parts.txn();
        let mut payload = Vec::new();
        txn.encode(&mut payload);
        prop_assert_eq!(decode_txn(&payload, MAX), Ok(txn));
    }

    /// A TXN payload cut short is refused, never read past its end.
    #[test]
    fn a_truncated_txn_payload_is_refused(parts in txn_parts(), cut in any::<usize>()) {
        let mut payload = Vec::new();
        parts.txn().encode(&mut payload);
        let cut = cut % payload.len();
        prop_assert!(decode_txn(&payload[..cut], MAX).is_err());
    }
}
