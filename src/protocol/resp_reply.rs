//! RESP2 replies as a client reads them: what a slave running with
//! `--forward-writes` reads back from its master (docs/PROTOCOL.md §11.8).
//!
//! [`reply_len`] delimits one complete reply at the front of a buffer without
//! allocating (it checks every declared length against a limit first);
//! [`transcode`] copies a delimited reply for a RESP2 or RESP3 client (the
//! only difference in the replies of write commands is the null); the other
//! functions read what the forwarder needs out of a delimited reply.

use std::fmt;

use super::resp::{MAX_INLINE_BYTES, MAX_MULTIBULK_ARGS, RespVersion, parse_i64};

/// Nesting of arrays a reply may have (EXEC's array holds flat replies; ROLE's
/// holds one array of arrays).
pub const MAX_REPLY_DEPTH: usize = 4;

/// Why bytes from the master are not a RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    /// The first byte of an element is not `+ - : $ *`.
    BadType(u8),
    /// A length or an integer that does not parse, or a bulk string without its CRLF.
    BadLength,
    /// A line longer than [`MAX_INLINE_BYTES`] without its CRLF.
    LineTooLong,
    /// The reply exceeds the limit the caller gave.
    TooLarge(usize),
    /// Arrays nested deeper than [`MAX_REPLY_DEPTH`].
    TooDeep,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::BadType(b) => write!(f, "unexpected reply type byte 0x{b:02x}"),
            ReplyError::BadLength => f.write_str("malformed length or integer in a reply"),
            ReplyError::LineTooLong => {
                write!(f, "reply line longer than {MAX_INLINE_BYTES} bytes")
            }
            ReplyError::TooLarge(limit) => write!(f, "reply larger than {limit} bytes"),
            ReplyError::TooDeep => write!(f, "reply nested deeper than {MAX_REPLY_DEPTH}"),
        }
    }
}

impl std::error::Error for ReplyError {}

/// One element header: its type byte, the text of its line (without the type
/// byte and CRLF) and where the element's bytes end.
struct Element<'a> {
    kind: u8,
    line: &'a [u8],
    /// Offset just past the header line.
    after_line: usize,
}

/// The header line of the element at `at`, `Ok(None)` if its CRLF has not arrived.
fn element(input: &[u8], at: usize) -> Result<Option<Element<'_>>, ReplyError> {
    let Some(&kind) = input.get(at) else {
        return Ok(None);
    };
    if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
        return Err(ReplyError::BadType(kind));
    }
    let window = &input[at..input.len().min(at + MAX_INLINE_BYTES + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(cr) => Ok(Some(Element {
            kind,
            line: &input[at + 1..at + cr],
            after_line: at + cr + 2,
        })),
        None if window.len() >= MAX_INLINE_BYTES + 2 => Err(ReplyError::LineTooLong),
        None => Ok(None),
    }
}

/// A length of a `$` or `*` header: -1 (null) or 0..=`max`.
fn length(line: &[u8], max: usize) -> Result<Option<usize>, ReplyError> {
    match parse_i64(line) {
        Some(-1) => Ok(None),
        Some(n) if n >= 0 && (n as u64) <= max as u64 => Ok(Some(n as usize)),
        Some(n) if n >= 0 => Err(ReplyError::TooLarge(max)),
        _ => Err(ReplyError::BadLength),
    }
}

/// The length of the complete reply at the front of `input`; `Ok(None)` while
/// it has not all arrived. No reply longer than `max_bytes` is accepted, and
/// its declared lengths are checked before its bytes are waited for.
pub fn reply_len(input: &[u8], max_bytes: usize) -> Result<Option<usize>, ReplyError> {
    // Elements still to read at each open array level.
    let mut open: [usize; MAX_REPLY_DEPTH] = [0; MAX_REPLY_DEPTH];
    let mut depth = 0usize;
    let mut at = 0usize;
    loop {
        if at > max_bytes {
            return Err(ReplyError::TooLarge(max_bytes));
        }
        let Some(e) = element(input, at)? else {
            return Ok(None);
        };
        at = e.after_line;
        match e.kind {
            b':' => {
                parse_i64(e.line).ok_or(ReplyError::BadLength)?;
            }
            b'$' => {
                if let Some(n) = length(e.line, max_bytes)? {
                    let end = at.saturating_add(n).saturating_add(2);
                    if end > max_bytes {
                        return Err(ReplyError::TooLarge(max_bytes));
                    }
                    if input.len() < end {
                        return Ok(None);
                    }
                    if &input[at + n..end] != b"\r\n" {
                        return Err(ReplyError::BadLength);
                    }
                    at = end;
                }
            }
            b'*' => {
                if let Some(n) = length(e.line, MAX_MULTIBULK_ARGS)?
                    && n > 0
                {
                    if depth == MAX_REPLY_DEPTH {
                        return Err(ReplyError::TooDeep);
                    }
                    open[depth] = n;
                    depth += 1;
                    continue;
                }
            }
            _ => {} // + and -: the line is the element
        }
        // One element done: close every array it completes.
        loop {
            if depth == 0 {
                return Ok(Some(at));
            }
            open[depth - 1] -= 1;
            if open[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
}

/// The elements of a reply delimited by [`reply_len`], in order: type byte,
/// header line, and for a bulk string its bytes.
fn elements(reply: &[u8]) -> impl Iterator<Item = (u8, &[u8], Option<&[u8]>)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let e = element(reply, at).ok().flatten()?;
        at = e.after_line;
        let mut data = None;
        if e.kind == b'$'
            && let Some(Some(n)) = length(e.line, reply.len()).ok()
        {
            data = reply.get(at..at + n);
            at += n + 2;
        }
        Some((e.kind, e.line, data))
    })
}

/// Append `reply` (delimited by [`reply_len`]) as a client of `version` gets
/// it: unchanged in RESP2; in RESP3 a null bulk string or null array is `_`,
/// as the master itself answers a RESP3 connection.
pub fn transcode(reply: &[u8], version: RespVersion, out: &mut Vec<u8>) {
    if version == RespVersion::Two {
        out.extend_from_slice(reply);
        return;
    }
    for (kind, line, data) in elements(reply) {
        if matches!(kind, b'$' | b'*') && line == b"-1" {
            out.extend_from_slice(b"_\r\n");
            continue;
        }
        out.push(kind);
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
        if let Some(data) = data {
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The text of an error reply (`-CODE message`), `None` for any other reply.
pub fn error_text(reply: &[u8]) -> Option<&[u8]> {
    match elements(reply).next() {
        Some((b'-', line, _)) => Some(line),
        _ => None,
    }
}

/// A master's ROLE reply (`*3 $6 master :offset *N ...`): its offset, the
/// commit sequence number it had applied when it answered. `None` for any
/// other reply (a server that is no longer master, an error).
pub fn master_offset(reply: &[u8]) -> Option<u64> {
    let mut items = elements(reply);
    match (items.next(), items.next(), items.next()) {
        (Some((b'*', _, _)), Some((b'$', _, Some(b"master"))), Some((b':', n, _))) => {
            parse_i64(n).and_then(|n| u64::try_from(n).ok())
        }
        _ => None,
    }
}

/// Append `args` as a RESP command: an array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        let arg = arg.as_ref();
        out.push(b'$');
        out.extend_from_slice(arg.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    #[test]
    fn delimits_every_reply_type_and_waits_for_the_rest() {
        let replies: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR value is not an integer or out of range\r\n",
            b":-42\r\n",
            b"$5\r\nhe\r\nl\r\n",
            b"$-1\r\n",
            b"$0\r\n\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n:1\r\n$-1\r\n*2\r\n+OK\r\n$1\r\nx\r\n",
            b"*3\r\n$6\r\nmaster\r\n:17\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n9100\r\n$2\r\n17\r\n",
        ];
        for reply in replies {
            let mut stream = reply.to_vec();
            stream.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(
                reply_len(&stream, LIMIT),
                Ok(Some(reply.len())),
                "{reply:?}"
            );
            // Split at every byte: incomplete until the last one is there.
            for cut in 0..reply.len() {
                assert_eq!(
                    reply_len(&reply[..cut], LIMIT),
                    Ok(None),
                    "{reply:?} at {cut}"
                );
            }
        }
    }

    #[test]
    fn hostile_replies_are_errors_before_their_bytes_are_waited_for() {
        assert_eq!(reply_len(b"!x\r\n", LIMIT), Err(ReplyError::BadType(b'!')));
        assert_eq!(reply_len(b":12a\r\n", LIMIT), Err(ReplyError::BadLength));
        assert_eq!(reply_len(b"$-2\r\n", LIMIT), Err(ReplyError::BadLength));
        assert_eq!(
            reply_len(b"$3\r\nabcd\r\n", LIMIT),
            Err(ReplyError::BadLength)
        );
        // A declared length over the limit is refused from its header alone.
        assert_eq!(
            reply_len(b"$99999999999\r\n", LIMIT),
            Err(ReplyError::TooLarge(LIMIT))
        );
        assert_eq!(
            reply_len(b"$1048570\r\n", LIMIT),
            Err(ReplyError::TooLarge(LIMIT))
        );
        assert_eq!(
            reply_len(b"*99999999\r\n", LIMIT),
            Err(ReplyError::TooLarge(MAX_MULTIBULK_ARGS))
        );
        assert_eq!(
            reply_len(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", LIMIT),
            Err(ReplyError::TooDeep)
        );
        let long = vec![b'+'; MAX_INLINE_BYTES + 8];
        assert_eq!(reply_len(&long, LIMIT), Err(ReplyError::LineTooLong));
        // Many small elements cannot add up past the limit either.
        let mut many = b"*1000\r\n".to_vec();
        for _ in 0..1000 {
            many.extend_from_slice(b"+OKOKOKOK\r\n");
        }
        assert_eq!(reply_len(&many, 100), Err(ReplyError::TooLarge(100)));
    }

    #[test]
    fn resp3_clients_get_nulls_as_underscore() {
        let reply = b"*4\r\n$-1\r\n*-1\r\n$3\r\n-1\r\r\n:5\r\n";
        let mut out = Vec::new();
        transcode(reply, RespVersion::Three, &mut out);
        assert_eq!(out, b"*4\r\n_\r\n_\r\n$3\r\n-1\r\r\n:5\r\n");
        out.clear();
        transcode(reply, RespVersion::Two, &mut out);
        assert_eq!(out, reply);
    }

    #[test]
    fn reads_errors_and_the_masters_offset() {
        assert_eq!(
            error_text(b"-NOAUTH Authentication required.\r\n"),
            Some(&b"NOAUTH Authentication required."[..])
        );
        assert_eq!(error_text(b"+OK\r\n"), None);
        assert_eq!(
            master_offset(b"*3\r\n$6\r\nmaster\r\n:17\r\n*0\r\n"),
            Some(17)
        );
        let slave = b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:9099\r\n$9\r\nconnected\r\n:3\r\n";
        assert_eq!(master_offset(slave), None);
        assert_eq!(master_offset(b"-MASTERDOWN x\r\n"), None);
    }

    #[test]
    fn commands_encode_as_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode_command(&mut out, &[&b"SET"[..], b"k", b"a\r\nb"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n");
        assert_eq!(reply_len(&out, LIMIT), Ok(Some(out.len())));
    }
}
