use super::*;

const MAX: usize = DEFAULT_MAX_VALUE_BYTES;

fn request_bytes(op: Opcode, id: u32, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(&mut out, op, id, key, value);
    out
}

#[test]
fn header_layout_is_as_documented() {
    let bytes = request_bytes(Opcode::Put, 0x0102_0304, b"ab", b"xyz");
    assert_eq!(
        &bytes[..HEADER_LEN],
        &[
            0xDB, 1, 0x02, 0, // magic, version, opcode, status
            1, 2, 3, 4, // request id
            0, 0, 0, 0, 0, 0, 0, 0, // version
            0, 2, // key length
            0, 0, // reserved
            0, 0, 0, 3, // value length
        ]
    );
    assert_eq!(&bytes[HEADER_LEN..], b"abxyz");
}

#[test]
fn every_request_round_trips() {
    let cases: Vec<(Opcode, &[u8], &[u8], Request<'_>)> = vec![
        (Opcode::Get, b"k", b"", Request::Get { key: b"k" }),
        (
            Opcode::Put,
            b"key",
            b"value",
            Request::Put {
                key: b"key",
                value: b"value",
                expect: 0,
            },
        ),
        (
            Opcode::Update,
            b"key",
            b"",
            Request::Update {
                key: b"key",
                value: b"",
                expect: 0,
            },
        ),
        (
            Opcode::Delete,
            b"key",
            b"",
            Request::Delete {
                key: b"key",
                expect: 0,
            },
        ),
        (Opcode::Ping, b"", b"", Request::Ping),
        (Opcode::Stats, b"", b"", Request::Stats),
    ];
    for (op, key, value, expected) in cases {
        let bytes = request_bytes(op, 77, key, value);
        let Ok(Decoded::Frame(frame, used)) = decode(&bytes, MAX) else {
            panic!("{op:?} did not decode");
        };
        assert_eq!(used, bytes.len());
        assert_eq!(frame.header.request_id, 77);
        assert_eq!(Request::from_frame(&frame), Ok(expected));
        assert_eq!(Request::from_frame(&frame).map(|r| r.opcode()), Ok(op));
    }
}

#[test]
fn response_round_trips() {
    let mut out = Vec::new();
    encode_response(&mut out, Opcode::Get as u8, Status::Ok, 9, 42, b"hello");
    let frame = decode_datagram(&out, MAX).expect("decodes");
    let response = Response::from_frame(&frame).expect("is a response");
    assert_eq!(response.opcode, Opcode::Get as u8);
    assert_eq!(response.status, Ok(Status::Ok));
    assert_eq!(response.request_id, 9);
    assert_eq!(response.version, 42);
    assert_eq!(response.value, b"hello");
    assert_eq!(
        Request::from_frame(&frame),
        Err(ProtocolError::NotARequest(0x81))
    );
}

#[test]
fn largest_key_and_value_round_trip() {
    let key = vec![b'k'; MAX_KEY_BYTES];
    let value = vec![7u8; MAX];
    let bytes = request_bytes(Opcode::Put, 1, &key, &value);
    let frame = decode_datagram(&bytes, MAX).expect("decodes");
    assert_eq!(frame.key.len(), MAX_KEY_BYTES);
    assert_eq!(frame.value.len(), MAX);
}

#[test]
fn every_prefix_is_incomplete_not_an_error() {
    let bytes = request_bytes(Opcode::Put, 5, b"key", b"value");
    for len in 0..bytes.len() {
        let expected = if len < HEADER_LEN {
            Decoded::Incomplete(None)
        } else {
            Decoded::Incomplete(Some(bytes.len()))
        };
        assert_eq!(decode(&bytes[..len], MAX), Ok(expected), "prefix {len}");
    }
}

#[test]
fn pipelined_frames_decode_one_at_a_time() {
    let mut bytes = request_bytes(Opcode::Put, 1, b"a", b"1");
    bytes.extend(request_bytes(Opcode::Get, 2, b"a", b""));
    let Ok(Decoded::Frame(first, used)) = decode(&bytes, MAX) else {
        panic!("first frame");
    };
    assert_eq!(first.header.request_id, 1);
    let Ok(Decoded::Frame(second, rest)) = decode(&bytes[used..], MAX) else {
        panic!("second frame");
    };
    assert_eq!(second.header.request_id, 2);
    assert_eq!(used + rest, bytes.len());
}

#[test]
fn bad_magic_breaks_the_stream() {
    let mut bytes = request_bytes(Opcode::Get, 1, b"k", b"");
    bytes[0] = b'G';
    let err = decode(&bytes, MAX).unwrap_err();
    assert_eq!(err, ProtocolError::BadMagic(b'G'));
    assert_eq!(err.status(), Status::Malformed);
    assert!(err.breaks_stream());
}

#[test]
fn garbage_text_is_rejected_at_the_header() {
    let garbage = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n";
    let err = decode(garbage, MAX).unwrap_err();
    assert!(err.breaks_stream());
}

#[test]
fn unsupported_version_is_reported() {
    let mut bytes = request_bytes(Opcode::Get, 1, b"k", b"");
    bytes[1] = 9;
    let err = decode(&bytes, MAX).unwrap_err();
    assert_eq!(err, ProtocolError::UnsupportedVersion(9));
    assert_eq!(err.status(), Status::UnsupportedVersion);
    assert!(err.breaks_stream());
}

#[test]
fn reserved_bits_are_rejected() {
    let mut bytes = request_bytes(Opcode::Get, 1, b"k", b"");
    bytes[19] = 1;
    let err = decode(&bytes, MAX).unwrap_err();
    assert_eq!(err, ProtocolError::ReservedBits(1));
    assert_eq!(err.status(), Status::Malformed);
}

#[test]
fn oversized_value_is_rejected_from_the_header_alone() {
    // Only the header is present: the limit must be enforced before any value byte is buffered.
    let mut bytes = request_bytes(Opcode::Put, 1, b"k", b"");
    bytes[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    let err = decode(&bytes[..HEADER_LEN], 1000).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::ValueTooLarge {
            len: u32::MAX as usize,
            max: 1000
        }
    );
    assert_eq!(err.status(), Status::TooLarge);
    assert!(err.breaks_stream());
    assert!(err.to_string().contains("exceeds the limit"));
}

#[test]
fn unknown_opcode_keeps_the_stream() {
    let mut bytes = request_bytes(Opcode::Get, 1, b"k", b"");
    bytes[2] = 0x3F;
    let Ok(Decoded::Frame(frame, _)) = decode(&bytes, MAX) else {
        panic!("frame is well formed");
    };
    let err = Request::from_frame(&frame).unwrap_err();
    assert_eq!(err, ProtocolError::UnknownOpcode(0x3F));
    assert_eq!(err.status(), Status::UnknownOpcode);
    assert!(!err.breaks_stream());
}

#[test]
fn empty_key_is_invalid() {
    for op in [Opcode::Get, Opcode::Put, Opcode::Update, Opcode::Delete] {
        let bytes = request_bytes(op, 1, b"", b"");
        let frame = decode_datagram(&bytes, MAX).expect("well formed");
        let err = Request::from_frame(&frame).unwrap_err();
        assert_eq!(err, ProtocolError::EmptyKey, "{op:?}");
        assert_eq!(err.status(), Status::InvalidArgument);
        assert!(!err.breaks_stream());
    }
}

#[test]
fn stray_key_or_value_is_invalid() {
    let bytes = request_bytes(Opcode::Ping, 1, b"k", b"");
    let frame = decode_datagram(&bytes, MAX).expect("well formed");
    assert_eq!(
        Request::from_frame(&frame),
        Err(ProtocolError::UnexpectedKey)
    );
    let bytes = request_bytes(Opcode::Get, 1, b"k", b"v");
    let frame = decode_datagram(&bytes, MAX).expect("well formed");
    assert_eq!(
        Request::from_frame(&frame),
        Err(ProtocolError::UnexpectedValue)
    );
    let bytes = request_bytes(Opcode::Delete, 1, b"k", b"v");
    let frame = decode_datagram(&bytes, MAX).expect("well formed");
    assert_eq!(
        Request::from_frame(&frame),
        Err(ProtocolError::UnexpectedValue)
    );
}

#[test]
fn truncated_and_padded_datagrams_are_malformed() {
    let bytes = request_bytes(Opcode::Put, 1, b"key", b"value");
    let err = decode_datagram(&bytes[..bytes.len() - 1], MAX).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::Truncated {
            len: bytes.len() - 1,
            declared: Some(bytes.len())
        }
    );
    assert_eq!(err.status(), Status::Malformed);
    // The message names the header only when the header itself is cut.
    assert!(
        err.to_string().contains("32-byte frame it declares"),
        "{err}"
    );
    assert!(!err.to_string().contains("header"), "{err}");
    let err = decode_datagram(&bytes[..10], MAX).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::Truncated {
            len: 10,
            declared: None
        }
    );
    assert!(err.to_string().contains("24-byte header"), "{err}");
    let mut padded = bytes.clone();
    padded.push(0);
    let err = decode_datagram(&padded, MAX).unwrap_err();
    assert_eq!(err, ProtocolError::TrailingBytes(1));
}

#[test]
fn status_and_opcode_bytes_round_trip() {
    for byte in 0..=255u8 {
        if let Some(status) = Status::from_u8(byte) {
            assert_eq!(status as u8, byte);
            assert!(!status.name().is_empty());
        }
        if let Some(op) = Opcode::from_u8(byte) {
            assert_eq!(op as u8, byte);
            assert!(!op.name().is_empty());
        }
    }
    assert_eq!(Status::from_u8(11), Some(Status::Aborted));
    assert_eq!(Status::from_u8(16), None);
    assert_eq!(Opcode::from_u8(0x0C), None);
}

#[test]
fn unknown_status_byte_is_kept_raw() {
    let mut out = Vec::new();
    encode(&mut out, 0x81, 200, 3, 0, b"", b"");
    let frame = decode_datagram(&out, MAX).expect("decodes");
    let response = Response::from_frame(&frame).expect("response");
    assert_eq!(response.status, Err(200));
}

#[test]
fn random_bytes_never_panic_the_decoder() {
    use rand::{RngExt, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(0xD1C5);
    for _ in 0..20_000 {
        let len = rng.random_range(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if len >= 2 && rng.random_bool(0.5) {
            bytes[0] = MAGIC;
            bytes[1] = PROTOCOL_VERSION;
        }
        if let Ok(Decoded::Frame(frame, used)) = decode(&bytes, 64) {
            assert!(used <= bytes.len());
            let _ = Request::from_frame(&frame);
        }
        let _ = decode_datagram(&bytes, 64);
    }
}

fn frame_with_version(op: Opcode, version: u64, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request_expecting(&mut out, op, 9, version, key, value);
    out
}

#[test]
fn writes_carry_their_expected_version() {
    let bytes = frame_with_version(Opcode::Put, 5, b"k", b"v");
    assert_eq!(&bytes[8..16], &5u64.to_be_bytes());
    let Ok(Decoded::Frame(frame, _)) = decode(&bytes, MAX) else {
        panic!("no frame");
    };
    assert_eq!(
        Request::from_frame(&frame),
        Ok(Request::Put {
            key: b"k",
            value: b"v",
            expect: 5
        })
    );
    let bytes = frame_with_version(Opcode::Put, EXPECT_ABSENT, b"k", b"v");
    let Ok(Decoded::Frame(frame, _)) = decode(&bytes, MAX) else {
        panic!("no frame");
    };
    assert!(matches!(
        Request::from_frame(&frame),
        Ok(Request::Put {
            expect: EXPECT_ABSENT,
            ..
        })
    ));
}

#[test]
fn only_put_may_expect_absence() {
    for op in [Opcode::Update, Opcode::Delete] {
        let value: &[u8] = if op == Opcode::Update { b"v" } else { b"" };
        let bytes = frame_with_version(op, EXPECT_ABSENT, b"k", value);
        let Ok(Decoded::Frame(frame, _)) = decode(&bytes, MAX) else {
            panic!("no frame");
        };
        let err = Request::from_frame(&frame).unwrap_err();
        assert_eq!(err, ProtocolError::ExpectAbsentNotPut);
        assert_eq!(err.status(), Status::InvalidArgument);
        assert!(!err.breaks_stream());
    }
}

#[test]
fn txn_requests_are_validated() {
    use super::txn::{Check, Condition, Txn, TxnError, TxnWrite};
    let txn = Txn {
        conditions: vec![Condition {
            key: b"a",
            check: Check::Absent,
        }],
        writes: vec![TxnWrite::Put {
            key: b"a",
            value: b"1",
        }],
    };
    let mut payload = Vec::new();
    txn.encode(&mut payload);
    let bytes = request_bytes(Opcode::Txn, 1, b"", &payload);
    let Ok(Decoded::Frame(frame, _)) = decode(&bytes, MAX) else {
        panic!("no frame");
    };
    assert_eq!(Request::from_frame(&frame), Ok(Request::Txn(txn)));
    assert!(Opcode::Txn.is_write());
    // A key on a TXN, and a payload that ends early.
    let bytes = request_bytes(Opcode::Txn, 1, b"k", &payload);
    let Ok(Decoded::Frame(frame, _)) = decode(&bytes, MAX) else {
        panic!("no frame");
    };
    assert_eq!(
        Request::from_frame(&frame),
        Err(ProtocolError::UnexpectedKey)
    );
    let bytes = request_bytes(Opcode::Txn, 1, b"", &payload[..payload.len() - 1]);
    let Ok(Decoded::Frame(frame, _)) = decode(&bytes, MAX) else {
        panic!("no frame");
    };
    let err = Request::from_frame(&frame).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::Txn(TxnError::Truncated("a write's value"))
    );
    assert_eq!(err.status(), Status::InvalidArgument);
    assert_eq!(err.to_string(), "txn payload truncated in a write's value");
}

#[test]
fn version_mismatch_is_status_12() {
    assert_eq!(Status::from_u8(12), Some(Status::VersionMismatch));
    assert_eq!(Status::VersionMismatch.name(), "VERSION_MISMATCH");
    assert_eq!(Opcode::from_u8(7), Some(Opcode::Txn));
}

#[test]
fn putex_expire_and_ttl_are_validated() {
    let decoded = |op: Opcode, key: &[u8], value: &[u8]| {
        let bytes = request_bytes(op, 1, key, value);
        let frame = decode_datagram(&bytes, MAX).expect("frame");
        Request::from_frame(&frame).map(|r| format!("{r:?}"))
    };
    let mut putex = 77u64.to_be_bytes().to_vec();
    putex.extend_from_slice(b"val");
    assert_eq!(
        decoded(Opcode::PutExpiring, b"k", &putex),
        Ok(format!(
            "{:?}",
            Request::PutExpiring {
                key: b"k",
                value: b"val",
                deadline_ms: 77,
                expect: 0
            }
        ))
    );
    assert_eq!(
        decoded(Opcode::Expire, b"k", &0u64.to_be_bytes()),
        Ok(format!(
            "{:?}",
            Request::Expire {
                key: b"k",
                deadline_ms: None,
                expect: 0
            }
        ))
    );
    assert_eq!(
        decoded(Opcode::Ttl, b"k", b""),
        Ok(format!("{:?}", Request::Ttl { key: b"k" }))
    );
    for (op, value) in [
        (Opcode::PutExpiring, &[0u8; 7][..]),
        (Opcode::PutExpiring, &[0u8; 8][..]),
        (Opcode::Expire, &[0u8; 9][..]),
        (Opcode::Expire, &[][..]),
    ] {
        let err = decoded(op, b"k", value).unwrap_err();
        assert_eq!(err, ProtocolError::BadDeadline, "{op:?} {value:?}");
        assert_eq!(err.status(), Status::InvalidArgument);
    }
    assert_eq!(
        decoded(Opcode::Ttl, b"k", b"x"),
        Err(ProtocolError::UnexpectedValue)
    );
    assert_eq!(decoded(Opcode::Ttl, b"", b""), Err(ProtocolError::EmptyKey));
}

#[test]
fn auth_is_opcode_0x0b_with_the_password_as_value_and_no_key() {
    assert_eq!(Opcode::from_u8(0x0B), Some(Opcode::Auth));
    assert_eq!(Opcode::Auth.name(), "auth");
    assert!(!Opcode::Auth.is_write());
    for (byte, status, name) in [
        (13, Status::NoAuth, "NOAUTH"),
        (14, Status::AuthFailed, "AUTH_FAILED"),
        (15, Status::Denied, "DENIED"),
    ] {
        assert_eq!(Status::from_u8(byte), Some(status));
        assert_eq!(status.name(), name);
    }
    let bytes = request_bytes(Opcode::Auth, 9, b"", b"pw");
    assert_eq!(
        bytes,
        [
            0xDB, 1, 0x0B, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, b'p',
            b'w'
        ]
    );
    let frame = decode_datagram(&bytes, MAX).expect("frame");
    assert_eq!(
        Request::from_frame(&frame),
        Ok(Request::Auth { password: b"pw" })
    );
    // An empty password is a request too (it fails like any wrong one).
    let bytes = request_bytes(Opcode::Auth, 9, b"", b"");
    let frame = decode_datagram(&bytes, MAX).expect("frame");
    assert_eq!(
        Request::from_frame(&frame),
        Ok(Request::Auth { password: b"" })
    );
    let bytes = request_bytes(Opcode::Auth, 9, b"user", b"pw");
    let frame = decode_datagram(&bytes, MAX).expect("frame");
    assert_eq!(
        Request::from_frame(&frame),
        Err(ProtocolError::UnexpectedKey)
    );
}
