//! Fuzz the client frame codec: `decode`, `decode_datagram`, `Header::parse`,
//! then `Request::from_frame` and `Response::from_frame` on every frame found.
//!
//! Properties: a frame's length is its header's and lies within the input; an
//! incomplete answer asks for more than the input has; a header error does not
//! depend on the bytes after the header; a frame re-encodes to exactly the bytes
//! it came from; every prefix of a frame is incomplete; a stream split in two
//! reads decodes to the same frames; a request or response re-encodes to one
//! that validates the same.

#![no_main]

use dkvs::protocol::{
    Decoded, HEADER_LEN, Header, ProtocolError, RESPONSE_FLAG, Request, Response, Status, decode,
    decode_datagram, encode, encode_request_expecting, encode_response,
};
use libfuzzer_sys::fuzz_target;

/// An owned copy of a frame, to compare frames decoded from different buffers.
type Owned = (Header, Vec<u8>, Vec<u8>);

/// Decode every frame from the front of `input`; stop at the first incomplete or bad one.
fn decode_stream(input: &[u8], max_value_bytes: usize) -> (Vec<Owned>, usize) {
    let mut at = 0;
    let mut frames = Vec::new();
    // Each frame is at least HEADER_LEN bytes, so this ends within input.len() / 24 rounds.
    while let Ok(Decoded::Frame(f, used)) = decode(&input[at..], max_value_bytes) {
        frames.push((f.header, f.key.to_vec(), f.value.to_vec()));
        at += used;
    }
    (frames, at)
}

fn check_one(data: &[u8], max_value_bytes: usize) {
    let result = decode(data, max_value_bytes);
    match &result {
        Ok(Decoded::Frame(f, used)) => {
            let used = *used;
            assert!(used >= HEADER_LEN && used <= data.len());
            assert_eq!(used, f.header.frame_len());
            assert_eq!(f.key.len(), f.header.key_len as usize);
            assert_eq!(f.value.len(), f.header.value_len as usize);
            assert!(f.value.len() <= max_value_bytes);
            // The encoding is canonical: the frame re-encodes to its own bytes.
            let mut again = Vec::new();
            let h = f.header;
            encode(
                &mut again,
                h.opcode,
                h.status,
                h.request_id,
                h.version,
                f.key,
                f.value,
            );
            assert_eq!(again, &data[..used]);
            // Every prefix is incomplete and names the frame's length once the header is in.
            for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, used - 1] {
                if cut >= used {
                    continue;
                }
                let want = if cut < HEADER_LEN { None } else { Some(used) };
                assert_eq!(
                    decode(&data[..cut], max_value_bytes),
                    Ok(Decoded::Incomplete(want))
                );
            }
            match decode_datagram(data, max_value_bytes) {
                Ok(g) if used == data.len() => assert_eq!(&g, f),
                Err(ProtocolError::TrailingBytes(n)) if used < data.len() => {
                    assert_eq!(n, data.len() - used)
                }
                other => panic!("datagram of {} bytes, frame {used}: {other:?}", data.len()),
            }
            check_typed(f);
        }
        Ok(Decoded::Incomplete(None)) => assert!(data.len() < HEADER_LEN),
        Ok(Decoded::Incomplete(Some(total))) => {
            assert!(*total > data.len());
            let h = Header::parse(&data[..HEADER_LEN], max_value_bytes).expect("header parsed");
            assert_eq!(*total, h.frame_len());
            assert!(matches!(
                decode_datagram(data, max_value_bytes),
                Err(ProtocolError::Truncated { .. })
            ));
        }
        Err(e) => {
            // Only the header can be refused, so the error is the header's.
            assert!(data.len() >= HEADER_LEN);
            assert_eq!(
                Header::parse(&data[..HEADER_LEN], max_value_bytes).as_ref(),
                Err(e)
            );
            assert_eq!(decode(&data[..HEADER_LEN], max_value_bytes), result);
        }
    }
    if data.len() >= HEADER_LEN {
        if let Ok(h) = Header::parse(&data[..HEADER_LEN], max_value_bytes) {
            let mut again = Vec::new();
            h.write(&mut again);
            assert_eq!(again, &data[..HEADER_LEN]);
        }
    }
}

/// Validate a frame as a request and as a response; what validates re-encodes to the same.
fn check_typed(f: &dkvs::protocol::Frame<'_>) {
    let as_request = Request::from_frame(f);
    let as_response = Response::from_frame(f);
    // A frame is a request or a response by its flag, never both.
    assert!(as_request.is_err() || as_response.is_err());
    if let Ok(req) = as_request {
        assert_eq!(req.opcode() as u8, f.header.opcode);
        // Every request is its opcode, version (the expected version), key
        // and value; built again from those, it validates the same.
        let mut bytes = Vec::new();
        encode_request_expecting(
            &mut bytes,
            req.opcode(),
            f.header.request_id,
            f.header.version,
            f.key,
            f.value,
        );
        let Ok(Decoded::Frame(g, used)) = decode(&bytes, usize::MAX) else {
            panic!("re-encoded request does not decode");
        };
        assert_eq!(used, bytes.len());
        assert_eq!(Request::from_frame(&g), Ok(req));
    }
    if let Ok(resp) = as_response {
        assert_eq!(resp.opcode | RESPONSE_FLAG, f.header.opcode);
        assert_eq!(&resp.value[..], f.value);
        let mut bytes = Vec::new();
        match resp.status {
            Ok(status) => encode_response(
                &mut bytes,
                resp.opcode,
                status,
                resp.request_id,
                resp.version,
                &resp.value,
            ),
            Err(byte) => {
                assert!(Status::from_u8(byte).is_none());
                encode(
                    &mut bytes,
                    f.header.opcode,
                    byte,
                    resp.request_id,
                    resp.version,
                    &[],
                    &resp.value,
                );
            }
        }
        let Ok(Decoded::Frame(g, _)) = decode(&bytes, usize::MAX) else {
            panic!("re-encoded response does not decode");
        };
        assert_eq!(Response::from_frame(&g).as_ref(), Ok(&resp));
    }
}

fuzz_target!(|data: &[u8]| {
    // The last byte picks the value limit, so the fuzzer explores both sides of it.
    let max_value_bytes = match data.last() {
        Some(b) if b & 1 == 1 => (*b as usize) << 2,
        _ => dkvs::protocol::DEFAULT_MAX_VALUE_BYTES,
    };
    check_one(data, max_value_bytes);

    // A stream delivered in two reads decodes to the same frames as in one.
    let (whole, consumed) = decode_stream(data, max_value_bytes);
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let mut buffer: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    let mut failed = false;
    for chunk in [&data[..cut], &data[cut..]] {
        buffer.extend_from_slice(chunk);
        loop {
            match decode(&buffer, max_value_bytes) {
                Ok(Decoded::Frame(f, used)) => {
                    frames.push((f.header, f.key.to_vec(), f.value.to_vec()));
                    buffer.drain(..used);
                }
                Ok(Decoded::Incomplete(_)) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            break;
        }
    }
    assert_eq!(
        frames,
        whole,
        "split at {cut} of {} (consumed {consumed})",
        data.len()
    );
    if !failed {
        assert_eq!(buffer.len(), data.len() - consumed);
    }
});
