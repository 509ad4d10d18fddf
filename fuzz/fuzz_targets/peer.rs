//! Fuzz the peer (replication) decoder: `decode_peer` with both directions'
//! limits, which runs `PeerMessage::from_frame` on every complete frame.
//!
//! Properties: no panic; a message's length lies within the input; every
//! prefix of a message asks for more; a decoded message re-encodes (through
//! `encode`) to a frame of the same length that decodes to the same message;
//! a message a slave sends fits within the master's limit on a slave's frames;
//! a stream split in two reads decodes to the same messages.

#![no_main]

use dkvs::protocol::peer::{PeerError, PeerMessage, decode_peer};
use dkvs::protocol::{Decoded, HEADER_LEN, ProtocolError, decode};
use dkvs::server::{MAX_MASTER_FRAME_PAYLOAD, MAX_SLAVE_FRAME_PAYLOAD};
use libfuzzer_sys::fuzz_target;

/// Whether a slave is the side that sends `msg` (the master limits these to
/// [`MAX_SLAVE_FRAME_PAYLOAD`]). CAUGHT_UP and HEARTBEAT go both ways.
fn slave_sends(msg: &PeerMessage) -> bool {
    matches!(
        msg,
        PeerMessage::Register { .. }
            | PeerMessage::Vote { .. }
            | PeerMessage::Ack { .. }
            | PeerMessage::CaughtUp { .. }
            | PeerMessage::Heartbeat { .. }
            | PeerMessage::OutcomeQuery { .. }
    )
}

fn check_one(data: &[u8], limit: usize) {
    match decode_peer(data, limit) {
        Ok(Some((msg, used))) => {
            assert!(used >= HEADER_LEN && used <= data.len());
            assert!(used - HEADER_LEN <= limit);
            let mut again = Vec::new();
            msg.encode(&mut again);
            // Request id and status are not part of a peer message, and a
            // Diverged catch-up drops its sequence; lengths are kept exactly.
            assert_eq!(again.len(), used, "{msg:?}");
            assert_eq!(again[..2], data[..2]);
            assert_eq!(again[16..HEADER_LEN], data[16..HEADER_LEN]);
            let (back, back_used) = decode_peer(&again, limit)
                .expect("re-encoded message decodes")
                .expect("re-encoded message is complete");
            assert_eq!(back_used, again.len());
            assert_eq!(back, msg);
            if slave_sends(&msg) {
                assert!(
                    used - HEADER_LEN <= MAX_SLAVE_FRAME_PAYLOAD,
                    "{msg:?} is {used} bytes, beyond the master's limit on slaves"
                );
            }
            for cut in [0, HEADER_LEN - 1, HEADER_LEN, used - 1] {
                if cut < used {
                    assert_eq!(decode_peer(&data[..cut], limit), Ok(None), "cut at {cut}");
                }
            }
        }
        Ok(None) => match decode(data, limit) {
            Ok(Decoded::Incomplete(None)) => assert!(data.len() < HEADER_LEN),
            Ok(Decoded::Incomplete(Some(total))) => assert!(total > data.len()),
            other => panic!("peer decoder incomplete, frame decoder {other:?}"),
        },
        Err(PeerError::Frame(e)) => {
            assert!(data.len() >= HEADER_LEN);
            if let ProtocolError::ValueTooLarge { len, max } = e {
                assert!(len > max && max == limit);
            }
        }
        Err(_) => {
            // A message error means the frame was complete.
            assert!(matches!(decode(data, limit), Ok(Decoded::Frame(..))));
        }
    }
}

/// Every message from the front of `input`, and the bytes they used.
fn decode_stream(input: &[u8], limit: usize) -> (Vec<PeerMessage>, usize, bool) {
    let mut at = 0;
    let mut msgs = Vec::new();
    loop {
        match decode_peer(&input[at..], limit) {
            Ok(Some((m, used))) => {
                msgs.push(m);
                at += used;
            }
            Ok(None) => return (msgs, at, false),
            Err(_) => return (msgs, at, true),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The master reads a slave's frames with the small limit, a slave its
    // master's with the large one: both must hold the same properties.
    for limit in [MAX_SLAVE_FRAME_PAYLOAD, MAX_MASTER_FRAME_PAYLOAD] {
        check_one(data, limit);
    }
    if data.is_empty() {
        return;
    }
    let limit = MAX_SLAVE_FRAME_PAYLOAD;
    let (whole, _, whole_failed) = decode_stream(data, limit);
    let cut = data[0] as usize % data.len();
    let mut buffer: Vec<u8> = Vec::new();
    let mut msgs = Vec::new();
    let mut failed = false;
    'reads: for chunk in [&data[..cut], &data[cut..]] {
        buffer.extend_from_slice(chunk);
        loop {
            match decode_peer(&buffer, limit) {
                Ok(Some((m, used))) => {
                    msgs.push(m);
                    buffer.drain(..used);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'reads;
                }
            }
        }
    }
    assert_eq!(msgs, whole, "split at {cut}");
    assert_eq!(failed, whole_failed, "split at {cut}");
});
