//! The payload of a TXN request (opcode 0x07): conditions the master checks,
//! then writes it applies as one replicated transaction, all or none.
//!
//! The layout is documented byte by byte in `docs/PROTOCOL.md` §4.3. Decoding
//! borrows keys and values from the frame and checks every count against the
//! bytes actually present before anything is allocated.

use std::fmt;

use byteorder::{BigEndian, ByteOrder};

use super::frame::MAX_KEY_BYTES;

/// Most conditions one TXN may carry.
pub const MAX_TXN_CONDITIONS: usize = 256;
/// Most writes one TXN may carry.
pub const MAX_TXN_WRITES: usize = 256;
/// Fixed bytes of one condition before its key: kind, version, key length.
const CONDITION_HEAD: usize = 1 + 8 + 2;
/// Fixed bytes of one write before its key: kind, key length, value length.
const WRITE_HEAD: usize = 1 + 2 + 4;
/// Bytes of the deadline that starts the value of a PUT_EXPIRING or EXPIRE write.
const DEADLINE_BYTES: usize = 8;

/// What a condition asks of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The key exists and carries exactly this version.
    Version(u64),
    /// The key does not exist.
    Absent,
    /// The key exists, whatever its version.
    Exists,
}

impl Check {
    /// The wire byte of the condition's kind.
    fn kind(self) -> u8 {
        match self {
            Check::Version(_) => 1,
            Check::Absent => 2,
            Check::Exists => 3,
        }
    }

    /// Whether a key with this version (`None`: absent) satisfies the check.
    pub fn holds(self, current: Option<u64>) -> bool {
        match self {
            Check::Version(v) => current == Some(v),
            Check::Absent => current.is_none(),
            Check::Exists => current.is_some(),
        }
    }
}

/// One condition of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Condition<'a> {
    /// The key checked.
    pub key: &'a [u8],
    /// What must hold of it.
    pub check: Check,
}

/// One write of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnWrite<'a> {
    /// Create or replace.
    Put {
        /// Key written.
        key: &'a [u8],
        /// New value.
        value: &'a [u8],
    },
    /// Remove if present.
    Delete {
        /// Key removed.
        key: &'a [u8],
    },
    /// Replace only if present (its deadline goes, as a PUT's does).
    Update {
        /// Key written.
        key: &'a [u8],
        /// New value.
        value: &'a [u8],
    },
    /// Create or replace, expiring at an absolute deadline.
    PutExpiring {
        /// Key written.
        key: &'a [u8],
        /// New value.
        value: &'a [u8],
        /// Unix ms from which the key reads as absent (not 0).
        deadline_ms: u64,
    },
    /// Set the deadline of a key if present; `None` removes it (PERSIST).
    Expire {
        /// Key whose deadline changes.
        key: &'a [u8],
        /// The new deadline, unix ms.
        deadline_ms: Option<u64>,
    },
}

impl<'a> TxnWrite<'a> {
    /// The key the write changes.
    pub fn key(&self) -> &'a [u8] {
        match self {
            TxnWrite::Put { key, .. }
            | TxnWrite::Delete { key }
            | TxnWrite::Update { key, .. }
            | TxnWrite::PutExpiring { key, .. }
            | TxnWrite::Expire { key, .. } => key,
        }
    }

    /// The wire byte of the write's kind.
    fn kind(&self) -> u8 {
        match self {
            TxnWrite::Put { .. } => 1,
            TxnWrite::Delete { .. } => 2,
            TxnWrite::Update { .. } => 3,
            TxnWrite::PutExpiring { .. } => 4,
            TxnWrite::Expire { .. } => 5,
        }
    }
}

/// A decoded TXN payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn<'a> {
    /// Checked in order; the first that fails decides the answer.
    pub conditions: Vec<Condition<'a>>,
    /// Applied in order if every condition holds.
    pub writes: Vec<TxnWrite<'a>>,
}

/// Why a TXN payload cannot be served. Every one is `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnError {
    /// The payload ends inside a field (`what` names where).
    Truncated(&'static str),
    /// Bytes follow the last write.
    TrailingBytes(usize),
    /// More conditions than [`MAX_TXN_CONDITIONS`].
    TooManyConditions(usize),
    /// More writes than [`MAX_TXN_WRITES`].
    TooManyWrites(usize),
    /// A condition kind byte with no meaning.
    BadConditionKind(u8),
    /// A write kind byte with no meaning.
    BadWriteKind(u8),
    /// A condition or write with key length 0.
    EmptyKey,
    /// A DELETE carrying value bytes.
    DeleteWithValue,
    /// A version condition on version 0, which no key ever carries.
    ZeroVersion,
    /// A PUT_EXPIRING whose value is shorter than its 8-byte deadline, or an
    /// EXPIRE whose value is not exactly the 8-byte deadline.
    BadDeadlineLength {
        /// The write's kind byte.
        kind: u8,
        /// Bytes of its value.
        len: usize,
    },
    /// A PUT_EXPIRING with deadline 0 (no deadline: use PUT).
    ZeroDeadline,
    /// A write's value exceeds the server's value limit.
    ValueTooLarge {
        /// Bytes of the value.
        len: usize,
        /// Configured limit.
        max: usize,
    },
}

impl fmt::Display for TxnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxnError::Truncated(what) => write!(f, "txn payload truncated in {what}"),
            TxnError::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the txn writes"),
            TxnError::TooManyConditions(n) => write!(
                f,
                "txn has {n} conditions, the limit is {MAX_TXN_CONDITIONS}"
            ),
            TxnError::TooManyWrites(n) => {
                write!(f, "txn has {n} writes, the limit is {MAX_TXN_WRITES}")
            }
            TxnError::BadConditionKind(k) => write!(f, "unknown txn condition kind {k}"),
            TxnError::BadWriteKind(k) => write!(f, "unknown txn write kind {k}"),
            TxnError::EmptyKey => write!(f, "txn key must be 1 to 65535 bytes, got 0"),
            TxnError::DeleteWithValue => write!(f, "txn delete carries a value"),
            TxnError::ZeroVersion => {
                write!(f, "txn version condition on version 0 (use kind 2, absent)")
            }
            TxnError::BadDeadlineLength { kind, len } => write!(
                f,
                "txn write kind {kind} needs an 8-byte deadline first, its value has {len} bytes"
            ),
            TxnError::ZeroDeadline => {
                write!(f, "txn put with deadline 0 (use kind 1, put)")
            }
            TxnError::ValueTooLarge { len, max } => {
                write!(
                    f,
                    "txn value of {len} bytes exceeds the limit of {max} bytes"
                )
            }
        }
    }
}

impl std::error::Error for TxnError {}

/// A cursor over the payload that never reads past its end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TxnError> {
        if self.bytes.len() < n {
            return Err(TxnError::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, TxnError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, TxnError> {
        Ok(BigEndian::read_u16(self.take(2, what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, TxnError> {
        Ok(BigEndian::read_u32(self.take(4, what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, TxnError> {
        Ok(BigEndian::read_u64(self.take(8, what)?))
    }
}

/// Decode a TXN payload; `max_value_bytes` bounds each write's value.
pub fn decode_txn(payload: &[u8], max_value_bytes: usize) -> Result<Txn<'_>, TxnError> {
    let mut r = Reader { bytes: payload };
    let count = r.u16("the condition count")? as usize;
    if count > MAX_TXN_CONDITIONS {
        return Err(TxnError::TooManyConditions(count));
    }
    // A count the remaining bytes cannot hold is refused before the vector is sized.
    if count > r.bytes.len() / (CONDITION_HEAD + 1) {
        return Err(TxnError::Truncated("the conditions"));
    }
    let mut conditions = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = r.u8("a condition")?;
        let version = r.u64("a condition")?;
        let key_len = r.u16("a condition")? as usize;
        let check = match kind {
            1 if version == 0 => return Err(TxnError::ZeroVersion),
            1 => Check::Version(version),
            2 => Check::Absent,
            3 => Check::Exists,
            other => return Err(TxnError::BadConditionKind(other)),
        };
        if key_len == 0 {
            return Err(TxnError::EmptyKey);
        }
        let key = r.take(key_len, "a condition's key")?;
        conditions.push(Condition { key, check });
    }
    let count = r.u16("the write count")? as usize;
    if count > MAX_TXN_WRITES {
        return Err(TxnError::TooManyWrites(count));
    }
    if count > r.bytes.len() / (WRITE_HEAD + 1) {
        return Err(TxnError::Truncated("the writes"));
    }
    let mut writes = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = r.u8("a write")?;
        let key_len = r.u16("a write")? as usize;
        let value_len = r.u32("a write")? as usize;
        if key_len == 0 {
            return Err(TxnError::EmptyKey);
        }
        // The deadline a PUT_EXPIRING carries is not part of the stored value.
        let stored_len = match kind {
            4 => value_len.saturating_sub(DEADLINE_BYTES),
            _ => value_len,
        };
        if stored_len > max_value_bytes {
            return Err(TxnError::ValueTooLarge {
                len: stored_len,
                max: max_value_bytes,
            });
        }
        let key = r.take(key_len, "a write's key")?;
        let value = r.take(value_len, "a write's value")?;
        writes.push(match kind {
            1 => TxnWrite::Put { key, value },
            2 if value.is_empty() => TxnWrite::Delete { key },
            2 => return Err(TxnError::DeleteWithValue),
            3 => TxnWrite::Update { key, value },
            4 if value.len() < DEADLINE_BYTES => {
                return Err(TxnError::BadDeadlineLength {
                    kind,
                    len: value_len,
                });
            }
            4 => {
                let (deadline, value) = value.split_at(DEADLINE_BYTES);
                let deadline_ms = BigEndian::read_u64(deadline);
                if deadline_ms == 0 {
                    return Err(TxnError::ZeroDeadline);
                }
                TxnWrite::PutExpiring {
                    key,
                    value,
                    deadline_ms,
                }
            }
            5 if value.len() != DEADLINE_BYTES => {
                return Err(TxnError::BadDeadlineLength {
                    kind,
                    len: value_len,
                });
            }
            5 => TxnWrite::Expire {
                key,
                deadline_ms: Some(BigEndian::read_u64(value)).filter(|&d| d != 0),
            },
            other => return Err(TxnError::BadWriteKind(other)),
        });
    }
    if !r.bytes.is_empty() {
        return Err(TxnError::TrailingBytes(r.bytes.len()));
    }
    Ok(Txn { conditions, writes })
}

impl Txn<'_> {
    /// Append the payload to `out`. The caller keeps to the limits: at most
    /// [`MAX_TXN_CONDITIONS`] conditions and [`MAX_TXN_WRITES`] writes, keys of
    /// 1..=65535 bytes (see [`Txn::check_limits`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        debug_assert!(self.check_limits().is_ok());
        out.extend_from_slice(&(self.conditions.len() as u16).to_be_bytes());
        for c in &self.conditions {
            out.push(c.check.kind());
            let version = match c.check {
                Check::Version(v) => v,
                Check::Absent | Check::Exists => 0,
            };
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&(c.key.len() as u16).to_be_bytes());
            out.extend_from_slice(c.key);
        }
        out.extend_from_slice(&(self.writes.len() as u16).to_be_bytes());
        for w in &self.writes {
            let (key, deadline, value): (&[u8], Option<u64>, &[u8]) = match *w {
                TxnWrite::Put { key, value } | TxnWrite::Update { key, value } => {
                    (key, None, value)
                }
                TxnWrite::Delete { key } => (key, None, &[]),
                TxnWrite::PutExpiring {
                    key,
                    value,
                    deadline_ms,
                } => (key, Some(deadline_ms), value),
                TxnWrite::Expire { key, deadline_ms } => (key, Some(deadline_ms.unwrap_or(0)), &[]),
            };
            let value_len = value.len() + deadline.map_or(0, |_| DEADLINE_BYTES);
            out.push(w.kind());
            out.extend_from_slice(&(key.len() as u16).to_be_bytes());
            out.extend_from_slice(&(value_len as u32).to_be_bytes());
            out.extend_from_slice(key);
            if let Some(deadline) = deadline {
                out.extend_from_slice(&deadline.to_be_bytes());
            }
            out.extend_from_slice(value);
        }
    }

    /// The limits a sender must respect for [`Txn::encode`] to be decodable.
    pub fn check_limits(&self) -> Result<(), TxnError> {
        if self.conditions.len() > MAX_TXN_CONDITIONS {
            return Err(TxnError::TooManyConditions(self.conditions.len()));
        }
        if self.writes.len() > MAX_TXN_WRITES {
            return Err(TxnError::TooManyWrites(self.writes.len()));
        }
        let keys = self
            .conditions
            .iter()
            .map(|c| c.key)
            .chain(self.writes.iter().map(TxnWrite::key));
        for key in keys {
            if key.is_empty() || key.len() > MAX_KEY_BYTES {
                return Err(TxnError::EmptyKey);
            }
        }
        if self.conditions.iter().any(|c| c.check == Check::Version(0)) {
            return Err(TxnError::ZeroVersion);
        }
        let zero_deadline = |w: &TxnWrite<'_>| {
            matches!(
                w,
                TxnWrite::PutExpiring { deadline_ms: 0, .. }
                    | TxnWrite::Expire {
                        deadline_ms: Some(0),
                        ..
                    }
            )
        };
        if self.writes.iter().any(zero_deadline) {
            return Err(TxnError::ZeroDeadline);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn sample() -> Txn<'static> {
        Txn {
            conditions: vec![
                Condition {
                    key: b"a",
                    check: Check::Version(7),
                },
                Condition {
                    key: b"bb",
                    check: Check::Absent,
                },
                Condition {
                    key: b"c",
                    check: Check::Exists,
                },
            ],
            writes: vec![
                TxnWrite::Put {
                    key: b"a",
                    value: b"xyz",
                },
                TxnWrite::Delete { key: b"c" },
            ],
        }
    }

    fn bytes(txn: &Txn<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        txn.encode(&mut out);
        out
    }

    #[test]
    fn layout_is_as_documented() {
        let txn = Txn {
            conditions: vec![Condition {
                key: b"k",
                check: Check::Version(5),
            }],
            writes: vec![TxnWrite::Put {
                key: b"k",
                value: b"v",
            }],
        };
        assert_eq!(
            bytes(&txn),
            vec![
                0, 1, // one condition
                1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 1, b'k', // version 5 of "k"
                0, 1, // one write
                1, 0, 1, 0, 0, 0, 1, b'k', b'v', // PUT k = v
            ]
        );
    }

    #[test]
    fn the_example_of_protocol_md_4_3() {
        let txn = Txn {
            conditions: vec![Condition {
                key: b"a",
                check: Check::Version(5),
            }],
            writes: vec![
                TxnWrite::Put {
                    key: b"a",
                    value: b"1",
                },
                TxnWrite::Delete { key: b"b" },
            ],
        };
        let documented = "00 01 01 00 00 00 00 00 00 00 05 00 01 61 \
                          00 02 01 00 01 00 00 00 01 61 31 02 00 01 00 00 00 00 62";
        let documented: Vec<u8> = documented
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex"))
            .collect();
        assert_eq!(bytes(&txn), documented);
    }

    #[test]
    fn round_trips() {
        let txn = sample();
        let encoded = bytes(&txn);
        assert_eq!(decode_txn(&encoded, MAX), Ok(txn));
        let empty = Txn::default();
        assert_eq!(decode_txn(&bytes(&empty), MAX), Ok(empty));
    }

    #[test]
    fn every_cut_is_truncated_never_a_panic() {
        let encoded = bytes(&sample());
        for len in 0..encoded.len() {
            match decode_txn(&encoded[..len], MAX) {
                Err(TxnError::Truncated(_)) => {}
                other => panic!("cut at {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut encoded = bytes(&sample());
        encoded.push(0);
        assert_eq!(decode_txn(&encoded, MAX), Err(TxnError::TrailingBytes(1)));
    }

    #[test]
    fn counts_are_checked_before_allocating() {
        // 256 conditions claimed, but no bytes for them.
        assert_eq!(
            decode_txn(&[1, 0], MAX),
            Err(TxnError::Truncated("the conditions"))
        );
        assert_eq!(
            decode_txn(&[0xFF, 0xFF], MAX),
            Err(TxnError::TooManyConditions(65535))
        );
        assert_eq!(
            decode_txn(&[0, 0, 0xFF, 0xFF], MAX),
            Err(TxnError::TooManyWrites(65535))
        );
        assert_eq!(
            decode_txn(&[0, 0, 0, 200], MAX),
            Err(TxnError::Truncated("the writes"))
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut encoded = bytes(&sample());
        encoded[2] = 9; // first condition's kind
        assert_eq!(
            decode_txn(&encoded, MAX),
            Err(TxnError::BadConditionKind(9))
        );
        // Version condition on version 0.
        let zero = [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'k', 0, 0];
        assert_eq!(decode_txn(&zero, MAX), Err(TxnError::ZeroVersion));
        // Empty condition key.
        let empty = [0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode_txn(&empty, MAX), Err(TxnError::EmptyKey));
        // Unknown write kind, delete with a value, value over the limit.
        let write = |kind: u8, value: &[u8]| {
            let mut out = vec![0, 0, 0, 1, kind, 0, 1];
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.push(b'k');
            out.extend_from_slice(value);
            out
        };
        assert_eq!(
            decode_txn(&write(9, b""), MAX),
            Err(TxnError::BadWriteKind(9))
        );
        assert_eq!(
            decode_txn(&write(2, b"x"), MAX),
            Err(TxnError::DeleteWithValue)
        );
        assert_eq!(
            decode_txn(&write(1, b"abc"), 2),
            Err(TxnError::ValueTooLarge { len: 3, max: 2 })
        );
        let no_key = [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode_txn(&no_key, MAX), Err(TxnError::EmptyKey));
    }

    /// One write of each new kind (3, 4, 5), as documented in PROTOCOL.md §4.3.
    #[test]
    fn update_and_deadline_writes_are_laid_out_as_documented() {
        let txn = Txn {
            conditions: vec![],
            writes: vec![
                TxnWrite::Update {
                    key: b"k",
                    value: b"v",
                },
                TxnWrite::PutExpiring {
                    key: b"k",
                    value: b"v",
                    deadline_ms: 0x0102,
                },
                TxnWrite::Expire {
                    key: b"k",
                    deadline_ms: Some(0x0304),
                },
                TxnWrite::Expire {
                    key: b"k",
                    deadline_ms: None,
                },
            ],
        };
        let documented = "00 00 00 04 \
                          03 00 01 00 00 00 01 6B 76 \
                          04 00 01 00 00 00 09 6B 00 00 00 00 00 00 01 02 76 \
                          05 00 01 00 00 00 08 6B 00 00 00 00 00 00 03 04 \
                          05 00 01 00 00 00 08 6B 00 00 00 00 00 00 00 00";
        let documented: Vec<u8> = documented
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex"))
            .collect();
        assert_eq!(bytes(&txn), documented);
        assert_eq!(decode_txn(&documented, MAX), Ok(txn.clone()));
        for len in 0..documented.len() {
            assert!(
                matches!(
                    decode_txn(&documented[..len], MAX),
                    Err(TxnError::Truncated(_))
                ),
                "cut at {len}"
            );
        }
    }

    #[test]
    fn deadline_writes_refuse_bad_deadlines() {
        let write = |kind: u8, value: &[u8]| {
            let mut out = vec![0, 0, 0, 1, kind, 0, 1];
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.push(b'k');
            out.extend_from_slice(value);
            out
        };
        // PUT_EXPIRING: at least the deadline, not 0; the limit is on the value after it.
        assert_eq!(
            decode_txn(&write(4, &[0; 7]), MAX),
            Err(TxnError::BadDeadlineLength { kind: 4, len: 7 })
        );
        assert_eq!(
            decode_txn(&write(4, &[0; 9]), MAX),
            Err(TxnError::ZeroDeadline)
        );
        let mut at_one = 1u64.to_be_bytes().to_vec();
        at_one.extend_from_slice(b"ab");
        assert!(decode_txn(&write(4, &at_one), 2).is_ok());
        assert_eq!(
            decode_txn(&write(4, &at_one), 1),
            Err(TxnError::ValueTooLarge { len: 2, max: 1 })
        );
        // An empty value after the deadline is a value like any other.
        assert_eq!(
            decode_txn(&write(4, &1u64.to_be_bytes()), MAX).map(|t| t.writes),
            Ok(vec![TxnWrite::PutExpiring {
                key: b"k",
                value: b"",
                deadline_ms: 1
            }])
        );
        // EXPIRE: exactly the deadline; 0 removes it.
        for len in [0, 7, 9] {
            assert_eq!(
                decode_txn(&write(5, &vec![0; len]), MAX),
                Err(TxnError::BadDeadlineLength { kind: 5, len })
            );
        }
        assert_eq!(
            decode_txn(&write(5, &[0; 8]), MAX).map(|t| t.writes),
            Ok(vec![TxnWrite::Expire {
                key: b"k",
                deadline_ms: None
            }])
        );
        // UPDATE takes any value within the limit, the empty one too.
        assert!(decode_txn(&write(3, b""), MAX).is_ok());
        assert_eq!(
            decode_txn(&write(3, b"abc"), 2),
            Err(TxnError::ValueTooLarge { len: 3, max: 2 })
        );
        assert_eq!(
            decode_txn(&write(6, b""), MAX),
            Err(TxnError::BadWriteKind(6))
        );
        let zero = Txn {
            conditions: vec![],
            writes: vec![TxnWrite::PutExpiring {
                key: b"k",
                value: b"",
                deadline_ms: 0,
            }],
        };
        assert_eq!(zero.check_limits(), Err(TxnError::ZeroDeadline));
        for e in [
            TxnError::BadDeadlineLength { kind: 5, len: 3 },
            TxnError::ZeroDeadline,
        ] {
            assert!(e.to_string().starts_with("txn "), "{e}");
        }
    }

    #[test]
    fn limits_are_checked_for_senders() {
        let mut txn = sample();
        assert_eq!(txn.check_limits(), Ok(()));
        txn.writes = vec![TxnWrite::Delete { key: b"k" }; MAX_TXN_WRITES + 1];
        assert_eq!(
            txn.check_limits(),
            Err(TxnError::TooManyWrites(MAX_TXN_WRITES + 1))
        );
    }

    #[test]
    fn checks_hold_as_documented() {
        assert!(Check::Version(3).holds(Some(3)));
        assert!(!Check::Version(3).holds(Some(4)));
        assert!(!Check::Version(3).holds(None));
        assert!(Check::Absent.holds(None));
        assert!(!Check::Absent.holds(Some(1)));
        assert!(Check::Exists.holds(Some(1)));
        assert!(!Check::Exists.holds(None));
    }
}
