//! The slice of RESP2 (the Redis protocol) the load generator needs: SET, GET and WAIT commands
//! prebuilt for the run's fixed key and value sizes, and a reply parser that never allocates and
//! tells a complete reply from one still arriving, so pipelined replies can be split off a stream.

use std::fmt;

/// Deepest array nesting accepted; GET/SET/WAIT replies never nest, so this only bounds recursion.
const MAX_DEPTH: usize = 8;
/// Largest bulk string or array accepted; bounds the read buffer against a garbage length.
pub const MAX_BULK_BYTES: usize = 64 << 20;

/// Commands with their constant parts prebuilt, so encoding a request is a few memcpys.
#[derive(Debug, Clone)]
pub struct RespEncoder {
    get_prefix: Vec<u8>,
    set_prefix: Vec<u8>,
    set_middle: Vec<u8>,
    wait: Option<Vec<u8>>,
}

fn push_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

impl RespEncoder {
    /// An encoder for keys of `key_size` and values of `value_size` bytes; `wait_replicas` appends
    /// `WAIT n 1000` after every SET.
    pub fn new(key_size: usize, value_size: usize, wait_replicas: Option<u32>) -> RespEncoder {
        let mut get_prefix = b"*2\r\n".to_vec();
        push_bulk(&mut get_prefix, b"GET");
        get_prefix.extend_from_slice(format!("${key_size}\r\n").as_bytes());
        let mut set_prefix = b"*3\r\n".to_vec();
        push_bulk(&mut set_prefix, b"SET");
        set_prefix.extend_from_slice(format!("${key_size}\r\n").as_bytes());
        let set_middle = format!("\r\n${value_size}\r\n").into_bytes();
        let wait = wait_replicas.map(|n| {
            let mut cmd = b"*3\r\n".to_vec();
            push_bulk(&mut cmd, b"WAIT");
            push_bulk(&mut cmd, n.to_string().as_bytes());
            push_bulk(&mut cmd, b"1000");
            cmd
        });
        RespEncoder {
            get_prefix,
            set_prefix,
            set_middle,
            wait,
        }
    }

    /// Append `GET key`; expects one reply.
    pub fn get(&self, out: &mut Vec<u8>, key: &[u8]) {
        out.extend_from_slice(&self.get_prefix);
        out.extend_from_slice(key);
        out.extend_from_slice(b"\r\n");
    }

    /// Append `SET key value`, plus `WAIT` when configured; expects [`Self::set_replies`] replies.
    pub fn set(&self, out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
        self.set_only(out, key, value);
        if let Some(wait) = &self.wait {
            out.extend_from_slice(wait);
        }
    }

    /// Append `SET key value` without any `WAIT` (used to preload).
    pub fn set_only(&self, out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
        out.extend_from_slice(&self.set_prefix);
        out.extend_from_slice(key);
        out.extend_from_slice(&self.set_middle);
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }

    /// Append `MULTI`, a `SET` per key of `keys` (each with `value`), `EXEC`, plus `WAIT`
    /// when configured; expects `n + 2` replies (+OK, n +QUEUED, EXEC's array), plus WAIT's.
    pub fn txn<'k>(&self, out: &mut Vec<u8>, keys: impl Iterator<Item = &'k [u8]>, value: &[u8]) {
        out.extend_from_slice(b"*1\r\n$5\r\nMULTI\r\n");
        for key in keys {
            self.set_only(out, key, value);
        }
        out.extend_from_slice(b"*1\r\n$4\r\nEXEC\r\n");
        if let Some(wait) = &self.wait {
            out.extend_from_slice(wait);
        }
    }

    /// Whether writes are followed by `WAIT`.
    pub fn waits(&self) -> bool {
        self.wait.is_some()
    }
}

/// `AUTH password` as a RESP array.
pub fn encode_auth(out: &mut Vec<u8>, password: &[u8]) {
    out.extend_from_slice(format!("*2\r\n$4\r\nAUTH\r\n${}\r\n", password.len()).as_bytes());
    out.extend_from_slice(password);
    out.extend_from_slice(b"\r\n");
}

/// One RESP2 reply, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `+OK`
    Simple(&'a [u8]),
    /// `-ERR message`
    Error(&'a [u8]),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo` or the null bulk `$-1`.
    Bulk(Option<&'a [u8]>),
    /// An array's element count (elements are validated and skipped); `None` for `*-1`.
    Array(Option<usize>),
}

/// Bytes that are not a RESP2 reply; the stream cannot be resynchronised after one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespError {
    /// The first byte names no RESP2 type.
    BadType(u8),
    /// A length or integer line is not a decimal number.
    BadNumber,
    /// A bulk string is not followed by CRLF.
    MissingCrlf,
    /// A length is negative (other than -1) or above [`MAX_BULK_BYTES`].
    BadLength(i64),
    /// Arrays nest deeper than the load generator ever expects.
    TooDeep,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::BadType(b) => write!(f, "unexpected RESP type byte 0x{b:02x}"),
            RespError::BadNumber => write!(f, "RESP length or integer is not a number"),
            RespError::MissingCrlf => write!(f, "RESP bulk string not terminated by CRLF"),
            RespError::BadLength(n) => write!(f, "RESP length {n} out of range"),
            RespError::TooDeep => write!(f, "RESP arrays nested deeper than {MAX_DEPTH}"),
        }
    }
}

/// The line starting at `buf[0]` without its CRLF, and the bytes it used with CRLF.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn parse_int(digits: &[u8]) -> Result<i64, RespError> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(RespError::BadNumber);
    }
    let mut value: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(RespError::BadNumber);
        }
        value = value * 10 + (d - b'0') as i64;
    }
    Ok(if negative { -value } else { value })
}

fn length(n: i64) -> Result<Option<usize>, RespError> {
    match n {
        -1 => Ok(None),
        0.. if n as usize <= MAX_BULK_BYTES => Ok(Some(n as usize)),
        _ => Err(RespError::BadLength(n)),
    }
}

/// Parse the reply at the start of `buf`: `Ok(None)` when more bytes are needed, otherwise the
/// reply and how many bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply<'_>, usize)>, RespError> {
    parse_at_depth(buf, 0)
}

fn parse_at_depth(buf: &[u8], depth: usize) -> Result<Option<(Reply<'_>, usize)>, RespError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
        return Err(RespError::BadType(kind));
    }
    let Some((text, line_len)) = line(&buf[1..]) else {
        return Ok(None);
    };
    let head = 1 + line_len;
    match kind {
        b'+' => Ok(Some((Reply::Simple(text), head))),
        b'-' => Ok(Some((Reply::Error(text), head))),
        b':' => Ok(Some((Reply::Integer(parse_int(text)?), head))),
        b'$' => {
            let Some(len) = length(parse_int(text)?)? else {
                return Ok(Some((Reply::Bulk(None), head)));
            };
            let end = head + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::MissingCrlf);
            }
            Ok(Some((Reply::Bulk(Some(&buf[head..end])), end + 2)))
        }
        _ => {
            let Some(count) = length(parse_int(text)?)? else {
                return Ok(Some((Reply::Array(None), head)));
            };
            if depth >= MAX_DEPTH {
                return Err(RespError::TooDeep);
            }
            let mut used = head;
            for _ in 0..count {
                match parse_at_depth(&buf[used..], depth + 1)? {
                    Some((_, n)) => used += n,
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(count)), used)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_replies() {
        assert_eq!(parse(b"+OK\r\n"), Ok(Some((Reply::Simple(b"OK"), 5))));
        assert_eq!(
            parse(b"-ERR wrong\r\n+OK\r\n"),
            Ok(Some((Reply::Error(b"ERR wrong"), 12)))
        );
        assert_eq!(parse(b":12\r\n"), Ok(Some((Reply::Integer(12), 5))));
        assert_eq!(parse(b":-3\r\n"), Ok(Some((Reply::Integer(-3), 5))));
        assert_eq!(
            parse(b"$3\r\nfoo\r\n"),
            Ok(Some((Reply::Bulk(Some(b"foo")), 9)))
        );
        assert_eq!(parse(b"$0\r\n\r\n"), Ok(Some((Reply::Bulk(Some(b"")), 6))));
        assert_eq!(parse(b"$-1\r\n"), Ok(Some((Reply::Bulk(None), 5))));
        assert_eq!(
            parse(b"*2\r\n$1\r\na\r\n:1\r\nextra"),
            Ok(Some((Reply::Array(Some(2)), 15)))
        );
        assert_eq!(parse(b"*-1\r\n"), Ok(Some((Reply::Array(None), 5))));
        // Binary-safe: CRLF inside a bulk string is data.
        assert_eq!(
            parse(b"$4\r\n\r\n\r\n\r\n"),
            Ok(Some((Reply::Bulk(Some(b"\r\n\r\n")), 10)))
        );
    }

    #[test]
    fn pipelined_replies_split_in_order() {
        let stream = b"+OK\r\n$2\r\nhi\r\n$-1\r\n:1\r\n";
        let mut pos = 0;
        let mut replies = Vec::new();
        while let Ok(Some((reply, used))) = parse(&stream[pos..]) {
            replies.push(reply);
            pos += used;
        }
        assert_eq!(pos, stream.len());
        assert_eq!(
            replies,
            vec![
                Reply::Simple(b"OK"),
                Reply::Bulk(Some(b"hi")),
                Reply::Bulk(None),
                Reply::Integer(1)
            ]
        );
    }

    #[test]
    fn incomplete_replies_ask_for_more() {
        let whole: &[&[u8]] = &[
            b"+OK\r\n",
            b"$5\r\nhello\r\n",
            b"*2\r\n:1\r\n$1\r\nx\r\n",
            b":7\r\n",
        ];
        for reply in whole {
            for cut in 0..reply.len() {
                assert_eq!(parse(&reply[..cut]), Ok(None), "prefix {cut} of {reply:?}");
            }
            assert!(matches!(parse(reply), Ok(Some((_, n))) if n == reply.len()));
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert_eq!(parse(b"?x\r\n"), Err(RespError::BadType(b'?')));
        assert_eq!(parse(b"\xdb\x01"), Err(RespError::BadType(0xdb)));
        assert_eq!(parse(b":abc\r\n"), Err(RespError::BadNumber));
        assert_eq!(parse(b"$\r\n"), Err(RespError::BadNumber));
        assert_eq!(parse(b"$-2\r\n"), Err(RespError::BadLength(-2)));
        assert_eq!(
            parse(b"$999999999999\r\n"),
            Err(RespError::BadLength(999_999_999_999))
        );
        assert_eq!(parse(b"$2\r\nabXY"), Err(RespError::MissingCrlf));
        let deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(&deep), Err(RespError::TooDeep));
    }

    #[test]
    fn encoder_builds_exact_commands() {
        let enc = RespEncoder::new(3, 2, None);
        let mut out = Vec::new();
        enc.get(&mut out, b"k01");
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$3\r\nk01\r\n");
        out.clear();
        enc.set(&mut out, b"k01", b"vv");
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$3\r\nk01\r\n$2\r\nvv\r\n");
        assert!(!enc.waits());

        let waiting = RespEncoder::new(3, 2, Some(2));
        out.clear();
        waiting.set(&mut out, b"k01", b"vv");
        assert_eq!(
            out,
            b"*3\r\n$3\r\nSET\r\n$3\r\nk01\r\n$2\r\nvv\r\n*3\r\n$4\r\nWAIT\r\n$1\r\n2\r\n$4\r\n1000\r\n"
        );
        assert!(waiting.waits());
    }
}
