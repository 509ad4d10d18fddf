//! The Redis protocol (RESP2 and RESP3) as dkvs speaks it on its TCP port:
//! a parser for client commands (multibulk arrays and inline commands) and one
//! encoder for replies in either protocol version.
//!
//! The parser borrows arguments from the input buffer and never allocates a
//! declared length: a bulk string longer than the limit is refused from its
//! header, before its bytes are buffered, and an incomplete command only says
//! how many bytes are known to be missing.

use std::fmt;

/// Most arguments in one multibulk command (Redis's own limit).
pub const MAX_MULTIBULK_ARGS: usize = 1024 * 1024;
/// Longest inline command, and longest `*N` / `$N` header line (Redis's limit).
pub const MAX_INLINE_BYTES: usize = 64 * 1024;

/// A command the client sent that cannot be parsed; the connection is closed
/// after the `-ERR Protocol error: ...` reply, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespError {
    /// `*N` with N not a number or above [`MAX_MULTIBULK_ARGS`].
    InvalidMultibulkLength,
    /// `$N` with N not a number, negative, or above the bulk limit.
    InvalidBulkLength,
    /// An array element did not start with `$`.
    ExpectedBulk(u8),
    /// No line end within [`MAX_INLINE_BYTES`] of an inline command.
    TooBigInline,
    /// No line end within [`MAX_INLINE_BYTES`] of a `*N` header.
    TooBigMultibulkCount,
    /// No line end within [`MAX_INLINE_BYTES`] of a `$N` header.
    TooBigBulkCount,
    /// An inline command with an unterminated quote.
    UnbalancedQuotes,
    /// A bulk string not followed by CRLF.
    MissingCrlf,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The texts are Redis 7's, which clients show to users.
        match self {
            RespError::InvalidMultibulkLength => {
                write!(f, "Protocol error: invalid multibulk length")
            }
            RespError::InvalidBulkLength => write!(f, "Protocol error: invalid bulk length"),
            RespError::ExpectedBulk(b) => {
                write!(f, "Protocol error: expected '$', got '{}'", char::from(*b))
            }
            RespError::TooBigInline => write!(f, "Protocol error: too big inline request"),
            RespError::TooBigMultibulkCount => {
                write!(f, "Protocol error: too big mbulk count string")
            }
            RespError::TooBigBulkCount => write!(f, "Protocol error: too big bulk count string"),
            RespError::UnbalancedQuotes => {
                write!(f, "Protocol error: unbalanced quotes in request")
            }
            RespError::MissingCrlf => write!(f, "Protocol error: expected CRLF after bulk string"),
        }
    }
}

impl std::error::Error for RespError {}

/// The result of looking at the front of a RESP input buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum RespDecoded<'a> {
    /// A whole command (possibly with no arguments: an empty line or `*0`,
    /// which get no reply) using the first `used` bytes.
    Command {
        /// The arguments, the command name first.
        args: Vec<&'a [u8]>,
        /// Bytes consumed.
        used: usize,
    },
    /// The command is not complete; at least `need` bytes in all are needed.
    Incomplete {
        /// Total bytes (from the front) known to be needed, always more than buffered.
        need: usize,
    },
}

/// What [`decode_command_into`] found at the front of a RESP input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespFront {
    /// A whole command, its arguments in the caller's vector, using the first `used` bytes.
    Command {
        /// Bytes consumed.
        used: usize,
    },
    /// The command is not complete; at least `need` bytes in all are needed.
    Incomplete {
        /// Total bytes (from the front) known to be needed, always more than buffered.
        need: usize,
    },
}

/// Whether a connection whose first byte is `first` speaks RESP: an array or an inline command.
pub fn is_resp_start(first: u8) -> bool {
    first == b'*' || first.is_ascii_alphabetic()
}

/// Parse one command from the front of `input`. Bulk strings longer than
/// `max_bulk_bytes` are refused from their header. Inline commands whose
/// arguments need unquoting are unquoted into `scratch`.
pub fn decode_command<'a>(
    input: &'a [u8],
    max_bulk_bytes: usize,
    scratch: &'a mut Vec<u8>,
) -> Result<RespDecoded<'a>, RespError> {
    let mut args = Vec::new();
    Ok(
        match decode_command_into(input, max_bulk_bytes, scratch, &mut args)? {
            RespFront::Command { used } => RespDecoded::Command { args, used },
            RespFront::Incomplete { need } => RespDecoded::Incomplete { need },
        },
    )
}

/// [`decode_command`] into the caller's `args` (cleared first), so that a
/// connection parsing a pipeline reuses one vector instead of allocating one
/// per command. On `Incomplete` or an error `args` holds nothing meaningful.
pub fn decode_command_into<'a>(
    input: &'a [u8],
    max_bulk_bytes: usize,
    scratch: &'a mut Vec<u8>,
    args: &mut Vec<&'a [u8]>,
) -> Result<RespFront, RespError> {
    args.clear();
    match input.first() {
        None => Ok(RespFront::Incomplete { need: 1 }),
        Some(b'*') => decode_multibulk(input, max_bulk_bytes, args),
        Some(_) => decode_inline(input, scratch, args),
    }
}

/// An empty argument vector with the allocation of `args`, free to borrow
/// from another buffer: a connection keeps one between commands (it cannot
/// keep borrows of its input buffer, which moves on) and parses each command
/// of a pipeline into it.
pub fn recycle_args<'b>(mut args: Vec<&[u8]>) -> Vec<&'b [u8]> {
    args.clear();
    // Collecting a vector's own iterator into elements of the same size reuses
    // its allocation (std's in-place collection); the vector is empty, so the
    // map never runs.
    args.into_iter().map(|_| &[][..]).collect()
}

/// Find the end of the header line starting at `from`: the index of its `\r`,
/// once the `\n` after it is here too; `None` if not all here. A header holds
/// only digits, so its first `\r` ends it; one not followed by `\n` is
/// returned as well and makes the number invalid.
fn line_end(input: &[u8], from: usize) -> Option<usize> {
    let cr = from + input[from..].iter().position(|&b| b == b'\r')?;
    (cr + 1 < input.len()).then_some(cr)
}

/// The digits of the header line `from..cr`, or nothing valid if the line does not end in CRLF.
fn header_digits(input: &[u8], from: usize, cr: usize) -> &[u8] {
    if input[cr + 1] == b'\n' {
        &input[from..cr]
    } else {
        b""
    }
}

/// The header line at `from` when it is what clients send, a positive number
/// of at most 18 digits without a leading zero then CRLF, all here: its value
/// and the index of its `\r`, read in one pass. Anything else is `None`, and
/// `line_end`, `header_digits` and `parse_i64` decide it (the same value when
/// this gives one; an error, a wait for more bytes, or a negative count).
#[inline]
fn plain_header(input: &[u8], from: usize) -> Option<(i64, usize)> {
    // Nearly every header has 1 to 4 digits: read those from a fixed window
    // of six bytes, bounds-checked once instead of once per byte.
    if let Some(window) = input.get(from..from + 6) {
        let digit = |i: usize| window[i].wrapping_sub(b'0');
        if !(1..=9).contains(&digit(0)) {
            return None;
        }
        let mut n = i64::from(digit(0));
        for i in 1..5 {
            if digit(i) > 9 {
                return (window[i] == b'\r' && window[i + 1] == b'\n').then_some((n, from + i));
            }
            n = n * 10 + i64::from(digit(i));
        }
        // Five digits or more: the loop below reads them all.
    }
    let digits = input.get(from..)?;
    if !matches!(digits.first(), Some(b'1'..=b'9')) {
        return None;
    }
    let mut n = 0i64;
    for (i, &d) in digits.iter().enumerate() {
        let v = d.wrapping_sub(b'0');
        // 18 digits cannot overflow an i64; a 19th is left to `parse_i64`.
        if v <= 9 && i < 18 {
            n = n * 10 + i64::from(v);
            continue;
        }
        return (d == b'\r' && digits.get(i + 1) == Some(&b'\n')).then_some((n, from + i));
    }
    None
}

/// A command name of at most [`NameKey::MAX`] bytes folded to ASCII lower
/// case and packed into two words, so that finding a command compares three
/// integers per table entry instead of a byte-by-byte case-insensitive compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameKey {
    len: usize,
    words: [u64; 2],
}

impl NameKey {
    /// The longest name a key holds; longer names have none.
    pub const MAX: usize = 16;

    /// The key of a lower-case name known at compile time (a command table's entry).
    pub const fn of_lower(name: &str) -> NameKey {
        let bytes = name.as_bytes();
        assert!(
            bytes.len() <= NameKey::MAX,
            "command name too long for a NameKey"
        );
        let mut words = [0u64; 2];
        let mut i = 0;
        while i < bytes.len() {
            words[i / 8] |= (bytes[i].to_ascii_lowercase() as u64) << (8 * (i % 8));
            i += 1;
        }
        NameKey {
            len: bytes.len(),
            words,
        }
    }

    /// The key of a name as a client sent it, in any case; `None` if longer than [`NameKey::MAX`].
    #[inline]
    pub fn of(name: &[u8]) -> Option<NameKey> {
        if name.len() > NameKey::MAX {
            return None;
        }
        // Byte by byte: names are a few bytes long, and a copy of a variable
        // length would be a call to memcpy.
        let mut words = [0u64; 2];
        for (i, &b) in name.iter().enumerate() {
            words[i / 8] |= u64::from(b) << (8 * (i % 8));
        }
        Some(NameKey {
            len: name.len(),
            words: words.map(lower_ascii_word),
        })
    }
}

/// Eight bytes with every `A`..=`Z` turned into `a`..=`z` and every other
/// byte (non-ASCII included) left as it is, all at once.
#[inline]
fn lower_ascii_word(x: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let h = x & LOW7;
    // Per byte h <= 0x7f, so these sums never carry into the next byte: the
    // high bit says h >= b'A' (0x80 - 0x41 = 0x3f) and h > b'Z' (0x80 - 0x5b = 0x25).
    let at_least_a = h + 0x3f3f_3f3f_3f3f_3f3f;
    let above_z = h + 0x2525_2525_2525_2525;
    let upper = at_least_a & !above_z & !x & HIGH;
    // 0x80 >> 2 is 0x20, the case bit.
    x | (upper >> 2)
}

/// A strict decimal integer as Redis's `string2ll` accepts it.
pub fn parse_i64(digits: &[u8]) -> Option<i64> {
    // Lengths in headers are short positive numbers: parse them without a
    // detour through str, checking and accumulating in one pass (18 digits
    // cannot overflow an i64).
    if !digits.is_empty() && digits.len() <= 18 && digits[0] != b'0' {
        let mut n = 0i64;
        let mut all_digits = true;
        for &d in digits {
            let v = d.wrapping_sub(b'0');
            if v > 9 {
                all_digits = false;
                break;
            }
            n = n * 10 + i64::from(v);
        }
        if all_digits {
            return Some(n);
        }
    }
    let text = std::str::from_utf8(digits).ok()?;
    if text.is_empty() || text.starts_with('+') || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    if text.starts_with("-0") {
        return None;
    }
    text.parse().ok()
}

fn decode_multibulk<'a>(
    input: &'a [u8],
    max_bulk_bytes: usize,
    args: &mut Vec<&'a [u8]>,
) -> Result<RespFront, RespError> {
    let (count, end) = match plain_header(input, 1) {
        Some(header) => header,
        None => {
            let Some(end) = line_end(input, 1) else {
                if input.len() > MAX_INLINE_BYTES {
                    return Err(RespError::TooBigMultibulkCount);
                }
                return Ok(RespFront::Incomplete {
                    need: input.len() + 1,
                });
            };
            let digits = header_digits(input, 1, end);
            let count = parse_i64(digits).ok_or(RespError::InvalidMultibulkLength)?;
            (count, end)
        }
    };
    if count > MAX_MULTIBULK_ARGS as i64 {
        return Err(RespError::InvalidMultibulkLength);
    }
    let mut pos = end + 2;
    if count <= 0 {
        return Ok(RespFront::Command { used: pos });
    }
    // Capacity grows with the arguments that arrived, not with the declared count.
    args.reserve((count as usize).min(16));
    for _ in 0..count {
        let Some(&marker) = input.get(pos) else {
            return Ok(RespFront::Incomplete { need: pos + 1 });
        };
        if marker != b'$' {
            return Err(RespError::ExpectedBulk(marker));
        }
        let (len, end) = match plain_header(input, pos + 1) {
            Some(header) => header,
            None => {
                let Some(end) = line_end(input, pos + 1) else {
                    if input.len() - pos > MAX_INLINE_BYTES {
                        return Err(RespError::TooBigBulkCount);
                    }
                    return Ok(RespFront::Incomplete {
                        need: input.len() + 1,
                    });
                };
                let digits = header_digits(input, pos + 1, end);
                let len = parse_i64(digits).ok_or(RespError::InvalidBulkLength)?;
                (len, end)
            }
        };
        if len < 0 || len as u64 > max_bulk_bytes as u64 {
            return Err(RespError::InvalidBulkLength);
        }
        let start = end + 2;
        let stop = start + len as usize;
        if input.len() < stop + 2 {
            return Ok(RespFront::Incomplete { need: stop + 2 });
        }
        if &input[stop..stop + 2] != b"\r\n" {
            return Err(RespError::MissingCrlf);
        }
        args.push(&input[start..stop]);
        pos = stop + 2;
    }
    Ok(RespFront::Command { used: pos })
}

fn decode_inline<'a>(
    input: &'a [u8],
    scratch: &'a mut Vec<u8>,
    args: &mut Vec<&'a [u8]>,
) -> Result<RespFront, RespError> {
    let Some(newline) = input.iter().position(|&b| b == b'\n') else {
        if input.len() > MAX_INLINE_BYTES {
            return Err(RespError::TooBigInline);
        }
        return Ok(RespFront::Incomplete {
            need: input.len() + 1,
        });
    };
    if newline > MAX_INLINE_BYTES {
        return Err(RespError::TooBigInline);
    }
    let used = newline + 1;
    let mut line = &input[..newline];
    if let Some(stripped) = line.strip_suffix(b"\r") {
        line = stripped;
    }
    if !line.iter().any(|&b| b == b'"' || b == b'\'') {
        // The common case (redis-cli --pipe, telnet): plain words, borrowed.
        args.extend(
            line.split(|b| b.is_ascii_whitespace())
                .filter(|w| !w.is_empty()),
        );
        return Ok(RespFront::Command { used });
    }
    let spans = split_quoted(line, scratch)?;
    let scratch: &'a Vec<u8> = scratch;
    args.extend(spans.into_iter().map(|(a, b)| &scratch[a..b]));
    Ok(RespFront::Command { used })
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Split an inline line as Redis's `sdssplitargs` does (quotes, escapes),
/// writing the arguments into `scratch`; returns their spans.
fn split_quoted(line: &[u8], scratch: &mut Vec<u8>) -> Result<Vec<(usize, usize)>, RespError> {
    scratch.clear();
    let mut spans = Vec::new();
    let mut i = 0;
    // Each iteration consumes at least one byte of `line`.
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            break;
        }
        let start = scratch.len();
        let mut in_double = false;
        let mut in_single = false;
        loop {
            let c = line.get(i).copied();
            if in_double {
                match c {
                    None => return Err(RespError::UnbalancedQuotes),
                    Some(b'\\')
                        if line.get(i + 1) == Some(&b'x')
                            && line.get(i + 2).and_then(|&b| hex_value(b)).is_some()
                            && line.get(i + 3).and_then(|&b| hex_value(b)).is_some() =>
                    {
                        let hi = hex_value(line[i + 2]).unwrap_or(0);
                        let lo = hex_value(line[i + 3]).unwrap_or(0);
                        scratch.push(hi * 16 + lo);
                        i += 3;
                    }
                    Some(b'\\') if i + 1 < line.len() => {
                        i += 1;
                        scratch.push(match line[i] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                    }
                    Some(b'"') => {
                        // A closing quote must be followed by a space or the end.
                        if line.get(i + 1).is_some_and(|b| !b.is_ascii_whitespace()) {
                            return Err(RespError::UnbalancedQuotes);
                        }
                        in_double = false;
                    }
                    Some(other) => scratch.push(other),
                }
            } else if in_single {
                match c {
                    None => return Err(RespError::UnbalancedQuotes),
                    Some(b'\\') if line.get(i + 1) == Some(&b'\'') => {
                        i += 1;
                        scratch.push(b'\'');
                    }
                    Some(b'\'') => {
                        if line.get(i + 1).is_some_and(|b| !b.is_ascii_whitespace()) {
                            return Err(RespError::UnbalancedQuotes);
                        }
                        in_single = false;
                    }
                    Some(other) => scratch.push(other),
                }
            } else {
                match c {
                    None => break,
                    Some(b) if b.is_ascii_whitespace() => break,
                    Some(b'"') => in_double = true,
                    Some(b'\'') => in_single = true,
                    Some(other) => scratch.push(other),
                }
            }
            i += 1;
        }
        spans.push((start, scratch.len()));
    }
    Ok(spans)
}

/// The protocol version a RESP connection speaks (HELLO switches it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespVersion {
    /// RESP2, every connection's start.
    Two,
    /// RESP3, after `HELLO 3`.
    Three,
}

/// Reply encoding for one protocol version: where RESP3 has a type of its own
/// (null, map, verbatim string) it is used, else the RESP2 form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoder(pub RespVersion);

impl Encoder {
    fn header(out: &mut Vec<u8>, marker: u8, n: i64) {
        // Every reply has one, so it is built on the stack and appended in one
        // copy; lengths and counts are small, and four digits cover a 9,999-byte value.
        if let Ok(small @ 0..=9999) = u16::try_from(n) {
            let mut line = [marker, 0, 0, 0, 0, b'\r', b'\n', 0];
            let digits = small_decimal(small, &mut line[1..5]);
            line.copy_within(5 - digits..7, 1);
            // A copy of a fixed eight bytes is one store where a copy of
            // `digits + 3` would be a call to memcpy; the surplus is cut off.
            let start = out.len();
            out.extend_from_slice(&line);
            out.truncate(start + digits + 3);
            return;
        }
        out.push(marker);
        push_decimal(out, n);
        out.extend_from_slice(b"\r\n");
    }

    /// `+text`.
    pub fn simple(&self, out: &mut Vec<u8>, text: &str) {
        out.push(b'+');
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// `+OK`.
    pub fn ok(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"+OK\r\n");
    }

    /// `-text` (the text starts with its code, e.g. `ERR`); line ends become spaces.
    pub fn error(&self, out: &mut Vec<u8>, text: &str) {
        out.push(b'-');
        out.extend(
            text.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    }

    /// `:n`.
    pub fn int(&self, out: &mut Vec<u8>, n: i64) {
        Encoder::header(out, b':', n);
    }

    /// `$len` and the bytes.
    pub fn bulk(&self, out: &mut Vec<u8>, bytes: &[u8]) {
        // One reservation for the header, the bytes and the CRLF.
        out.reserve(bytes.len() + 24);
        Encoder::header(out, b'$', bytes.len() as i64);
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }

    /// A bulk string, or null when absent.
    pub fn opt_bulk(&self, out: &mut Vec<u8>, bytes: Option<&[u8]>) {
        match bytes {
            Some(b) => self.bulk(out, b),
            None => self.null(out),
        }
    }

    /// Null: `$-1` in RESP2, `_` in RESP3.
    pub fn null(&self, out: &mut Vec<u8>) {
        match self.0 {
            RespVersion::Two => out.extend_from_slice(b"$-1\r\n"),
            RespVersion::Three => out.extend_from_slice(b"_\r\n"),
        }
    }

    /// A null array (EXEC of a transaction whose watched keys changed): `*-1` in
    /// RESP2, `_` in RESP3.
    pub fn null_array(&self, out: &mut Vec<u8>) {
        match self.0 {
            RespVersion::Two => out.extend_from_slice(b"*-1\r\n"),
            RespVersion::Three => out.extend_from_slice(b"_\r\n"),
        }
    }

    /// An array of `n` elements follows.
    pub fn array(&self, out: &mut Vec<u8>, n: usize) {
        Encoder::header(out, b'*', n as i64);
    }

    /// A map of `n` pairs follows: `%n` in RESP3, an array of 2n in RESP2.
    pub fn map(&self, out: &mut Vec<u8>, n: usize) {
        match self.0 {
            RespVersion::Two => Encoder::header(out, b'*', 2 * n as i64),
            RespVersion::Three => Encoder::header(out, b'%', n as i64),
        }
    }

    /// Text for humans (INFO): a verbatim `txt` string in RESP3, a bulk string in RESP2.
    pub fn verbatim(&self, out: &mut Vec<u8>, text: &str) {
        match self.0 {
            RespVersion::Two => self.bulk(out, text.as_bytes()),
            RespVersion::Three => {
                Encoder::header(out, b'=', text.len() as i64 + 4);
                out.extend_from_slice(b"txt:");
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// Write `n` (at most 9,999) right-aligned into the four bytes of `to` and
/// say how many digits it has; two digits at a time from a table, as itoa does.
#[inline]
fn small_decimal(n: u16, to: &mut [u8]) -> usize {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let (high, low) = (usize::from(n / 100), usize::from(n % 100));
    to[2..4].copy_from_slice(&PAIRS[2 * low..2 * low + 2]);
    to[0..2].copy_from_slice(&PAIRS[2 * high..2 * high + 2]);
    match n {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        _ => 4,
    }
}

/// Append the decimal digits of `n` without allocating (lengths are on every reply).
fn push_decimal(out: &mut Vec<u8>, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
}

/// Whether `text` matches the glob `pattern` as Redis's `stringmatchlen`
/// matches it (`*`, `?`, `[...]` with `^` and ranges, `\` escapes).
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative with one backtrack point for `*`: linear work per star, no recursion.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class_match(pattern, p, text[t])
                        && matched
                    {
                        p = next;
                        t += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == text[t] {
                        p += 2;
                        t += 1;
                        continue;
                    }
                }
                c => {
                    if c == text[t] {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Match `c` against the class starting at `pattern[open] == '['`; returns
/// whether it matched and the index after the class.
fn class_match(pattern: &[u8], open: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = open + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    while i < pattern.len() && pattern[i] != b']' {
        if pattern[i] == b'\\' && i + 1 < pattern.len() {
            matched |= pattern[i + 1] == c;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (lo, hi) = (
                pattern[i].min(pattern[i + 2]),
                pattern[i].max(pattern[i + 2]),
            );
            matched |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            matched |= pattern[i] == c;
            i += 1;
        }
    }
    // An unterminated class is taken as running to the end, as Redis does.
    let next = (i + 1).min(pattern.len());
    Some((matched != negate, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn parse(input: &[u8]) -> Result<RespDecoded<'_>, RespError> {
        // Leaking keeps the scratch alive for the borrowed result in tests.
        let scratch: &'static mut Vec<u8> = Box::leak(Box::new(Vec::new()));
        decode_command(input, MAX, scratch)
    }

    /// A parsed command's arguments and length; else `Ok(need)` when
    /// incomplete or the error.
    type Owned = Result<(Vec<Vec<u8>>, usize), Result<usize, RespError>>;

    fn owned(input: &[u8]) -> Owned {
        let mut scratch = Vec::new();
        match decode_command(input, MAX, &mut scratch) {
            Ok(RespDecoded::Command { args, used }) => {
                Ok((args.iter().map(|a| a.to_vec()).collect(), used))
            }
            Ok(RespDecoded::Incomplete { need }) => Err(Ok(need)),
            Err(e) => Err(Err(e)),
        }
    }

    #[test]
    fn a_plain_header_reads_as_the_general_path_reads_it() {
        // The general path: the line, its digits, the number (or nothing).
        let general = |input: &[u8]| {
            let end = line_end(input, 0)?;
            Some((parse_i64(header_digits(input, 0, end))?, end))
        };
        let cases: &[&[u8]] = &[
            b"3\r\n",
            b"16\r\nkey",
            b"100\r\n",
            b"999999999999999999\r\n",
            b"1000000000000000000\r\n",
            b"9999999999999999999\r\n",
            b"0\r\n",
            b"01\r\n",
            b"-1\r\n",
            b"+1\r\n",
            b"1\r",
            b"1\rx",
            b"1\n",
            b"12",
            b"1x\r\n",
            b"\r\n",
            b"",
        ];
        // Each case alone, and with bytes after it (the fixed window's path),
        // and every number up to six digits, with CRLF and without.
        let padded = cases.iter().map(|c| [*c, b"$3\r\nxy"].concat());
        let numbers = (0..1_000_000u32).step_by(7).chain(0..10_000).flat_map(|n| {
            [
                format!("{n}\r\n$3\r\n"),
                format!("{n}\r$3\r\n"),
                format!("{n}x\r\n\r\n"),
            ]
        });
        let inputs: Vec<Vec<u8>> = cases
            .iter()
            .map(|c| c.to_vec())
            .chain(padded)
            .chain(numbers.map(String::into_bytes))
            .collect();
        for input in &inputs {
            let input = input.as_slice();
            match plain_header(input, 0) {
                Some(header) => assert_eq!(Some(header), general(input), "{input:?}"),
                // Left to the general path, which decides it alone.
                None => assert!(
                    !matches!(input.first(), Some(b'1'..=b'9'))
                        || general(input).is_none_or(|(n, _)| n.to_string().len() > 18),
                    "{input:?} is plain"
                ),
            }
        }
        assert_eq!(plain_header(b"*3\r\n", 1), Some((3, 2)));
        assert_eq!(plain_header(b"*3", 5), None, "past the end");
    }

    #[test]
    fn decoding_into_a_recycled_vector_reuses_it() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\nget k\r\n*2\r\n$3\r\nGET";
        let mut scratch = Vec::new();
        let mut spare: Vec<&'static [u8]> = Vec::with_capacity(8);
        let capacity = spare.capacity();
        let mut at = 0;
        let mut seen = Vec::new();
        loop {
            let mut args = recycle_args(std::mem::take(&mut spare));
            assert!(args.is_empty());
            assert_eq!(args.capacity(), capacity, "the allocation is kept");
            let front = decode_command_into(&input[at..], MAX, &mut scratch, &mut args);
            match front {
                Ok(RespFront::Command { used }) => {
                    seen.push(args.iter().map(|a| a.to_vec()).collect::<Vec<_>>());
                    at += used;
                }
                Ok(RespFront::Incomplete { need }) => {
                    assert!(need > input.len() - at);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            spare = recycle_args(args);
        }
        let words = |w: &[&str]| w.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(seen, vec![words(&["SET", "k", "v"]), words(&["get", "k"])]);
    }

    #[test]
    fn multibulk_commands_parse() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\nrest";
        let (args, used) = owned(input).expect("complete");
        assert_eq!(args, vec![b"SET".to_vec(), b"k".to_vec(), Vec::new()]);
        assert_eq!(used, input.len() - 4);
    }

    #[test]
    fn binary_values_pass_through() {
        let mut input = b"*2\r\n$3\r\nGET\r\n$4\r\n".to_vec();
        input.extend_from_slice(&[0, b'\r', b'\n', 0xFF]);
        input.extend_from_slice(b"\r\n");
        let (args, _) = owned(&input).expect("complete");
        assert_eq!(args[1], vec![0, b'\r', b'\n', 0xFF]);
    }

    #[test]
    fn empty_arrays_and_lines_are_commands_without_arguments() {
        assert_eq!(owned(b"*0\r\n"), Ok((vec![], 4)));
        assert_eq!(owned(b"*-1\r\n"), Ok((vec![], 5)));
        assert_eq!(owned(b"\r\n"), Ok((vec![], 2)));
        assert_eq!(owned(b"   \n"), Ok((vec![], 4)));
    }

    #[test]
    fn inline_commands_split_on_whitespace_and_quotes() {
        assert_eq!(
            owned(b"set  k\tv\r\n").map(|r| r.0),
            Ok(vec![b"set".to_vec(), b"k".to_vec(), b"v".to_vec()])
        );
        assert_eq!(
            owned(b"set \"a b\\x41\\n\" 'it\\'s'\n").map(|r| r.0),
            Ok(vec![b"set".to_vec(), b"a bA\n".to_vec(), b"it's".to_vec()])
        );
        assert_eq!(owned(b"set \"abc\n"), Err(Err(RespError::UnbalancedQuotes)));
        assert_eq!(owned(b"set 'abc\n"), Err(Err(RespError::UnbalancedQuotes)));
        assert_eq!(
            owned(b"set \"a\"b\n"),
            Err(Err(RespError::UnbalancedQuotes))
        );
    }

    #[test]
    fn every_malformed_input_is_an_error() {
        let cases: &[(&[u8], RespError)] = &[
            (b"*x\r\n", RespError::InvalidMultibulkLength),
            (b"*\r\n", RespError::InvalidMultibulkLength),
            (b"*+1\r\n", RespError::InvalidMultibulkLength),
            (b"*01\r\n", RespError::InvalidMultibulkLength),
            (b"*1048577\r\n", RespError::InvalidMultibulkLength),
            (
                b"*99999999999999999999\r\n",
                RespError::InvalidMultibulkLength,
            ),
            (b"*1\r\n:1\r\n", RespError::ExpectedBulk(b':')),
            (b"*1\r\n$x\r\n", RespError::InvalidBulkLength),
            (b"*1\r\n$-1\r\n", RespError::InvalidBulkLength),
            (b"*1\r\n$1048577\r\n", RespError::InvalidBulkLength),
            (b"*1\r\n$1\r\nab\r\n", RespError::MissingCrlf),
            (b"*1\r\n$1\r\nabc", RespError::MissingCrlf),
            (b"*1\rx", RespError::InvalidMultibulkLength),
            (b"*1\r\n$1\rxa\r\n", RespError::InvalidBulkLength),
        ];
        for (input, expected) in cases {
            assert_eq!(
                parse(input),
                Err(expected.clone()),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = vec![b'a'; MAX_INLINE_BYTES + 1];
        assert_eq!(parse(&long), Err(RespError::TooBigInline));
        let mut header = b"*".to_vec();
        header.extend(vec![b'1'; MAX_INLINE_BYTES + 1]);
        assert_eq!(parse(&header), Err(RespError::TooBigMultibulkCount));
        let mut header = b"*1\r\n$".to_vec();
        header.extend(vec![b'1'; MAX_INLINE_BYTES + 1]);
        assert_eq!(parse(&header), Err(RespError::TooBigBulkCount));
    }

    #[test]
    fn an_oversized_bulk_is_refused_from_its_header_alone() {
        // Only the header has arrived: the length is refused without waiting for the bytes.
        let mut scratch = Vec::new();
        assert_eq!(
            decode_command(b"*2\r\n$3\r\nSET\r\n$101\r\n", 100, &mut scratch),
            Err(RespError::InvalidBulkLength)
        );
        let mut scratch = Vec::new();
        assert_eq!(
            decode_command(b"*2\r\n$3\r\nSET\r\n$100\r\n", 100, &mut scratch),
            Ok(RespDecoded::Incomplete { need: 19 + 102 })
        );
    }

    #[test]
    fn incomplete_input_asks_for_more_than_it_has() {
        let full = b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n";
        for cut in 0..full.len() {
            match parse(&full[..cut]) {
                Ok(RespDecoded::Incomplete { need }) => {
                    assert!(need > cut && need <= full.len(), "cut {cut}: need {need}")
                }
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    /// A stream of commands, split into two reads at every byte boundary, parses the same.
    #[test]
    fn a_stream_split_at_every_boundary_parses_the_same() {
        let stream: &[u8] =
            b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$2\r\nk\x00\r\n$4\r\n\r\n\r\n\r\n\
            get k\r\nset \"q x\" 'y'\n*0\r\n\n*2\r\n$4\r\nECHO\r\n$0\r\n\r\n";
        let whole = parse_all(&[stream]);
        assert_eq!(whole.len(), 7);
        for cut in 0..=stream.len() {
            assert_eq!(
                parse_all(&[&stream[..cut], &stream[cut..]]),
                whole,
                "cut {cut}"
            );
        }
        // And byte by byte.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse_all(&bytes), whole);
    }

    /// Feed `chunks` one at a time to a buffer, parsing every complete command as a connection does.
    fn parse_all(chunks: &[&[u8]]) -> Vec<Vec<Vec<u8>>> {
        let mut buffer = Vec::new();
        let mut commands = Vec::new();
        for chunk in chunks {
            buffer.extend_from_slice(chunk);
            loop {
                let mut scratch = Vec::new();
                match decode_command(&buffer, MAX, &mut scratch) {
                    Ok(RespDecoded::Command { args, used }) => {
                        commands.push(args.iter().map(|a| a.to_vec()).collect());
                        buffer.drain(..used);
                    }
                    Ok(RespDecoded::Incomplete { need }) => {
                        assert!(need > buffer.len());
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert!(buffer.is_empty());
        commands
    }

    #[test]
    fn random_streams_split_anywhere_parse_the_same() {
        use rand::{RngExt, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(0x2E5B);
        for _ in 0..200 {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..rng.random_range(1..8) {
                let n = rng.random_range(1..5);
                let args: Vec<Vec<u8>> = (0..n)
                    .map(|_| {
                        (0..rng.random_range(0..20))
                            .map(|_| rng.random::<u8>())
                            .collect()
                    })
                    .collect();
                stream.extend_from_slice(format!("*{n}\r\n").as_bytes());
                for a in &args {
                    stream.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                    stream.extend_from_slice(a);
                    stream.extend_from_slice(b"\r\n");
                }
                expected.push(args);
            }
            let a = rng.random_range(0..=stream.len());
            let b = rng.random_range(a..=stream.len());
            assert_eq!(
                parse_all(&[&stream[..a], &stream[a..b], &stream[b..]]),
                expected
            );
        }
    }

    use proptest::strategy::Strategy as _;

    /// Encode `args` as one command: a multibulk array, or when every
    /// argument is a plain word and `inline` is set, an inline line.
    fn encode_command(args: &[Vec<u8>], inline: bool, out: &mut Vec<u8>) {
        let plain = |a: &Vec<u8>| !a.is_empty() && a.iter().all(u8::is_ascii_alphanumeric);
        // An inline command's first byte must tell RESP from the binary protocol.
        if inline && args.iter().all(plain) && args[0][0].is_ascii_alphabetic() {
            out.extend_from_slice(&args.join(&b' '));
            out.extend_from_slice(b"\r\n");
            return;
        }
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Generated commands (binary-safe multibulk, and inline where the
        /// arguments allow), split into two reads at every byte boundary and
        /// into random chunks, parse the same.
        #[test]
        fn generated_streams_split_at_every_boundary_parse_the_same(
            commands in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        proptest::prop_oneof![
                            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
                            "[a-z][a-z0-9]{0,6}".prop_map(String::into_bytes),
                        ],
                        1..4,
                    ),
                    proptest::prelude::any::<bool>(),
                ),
                1..5,
            ),
            raw_cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..6),
        ) {
            let mut stream = Vec::new();
            for (args, inline) in &commands {
                encode_command(args, *inline, &mut stream);
            }
            let expected: Vec<Vec<Vec<u8>>> = commands.iter().map(|(args, _)| args.clone()).collect();
            for cut in 0..=stream.len() {
                proptest::prop_assert_eq!(
                    &parse_all(&[&stream[..cut], &stream[cut..]]),
                    &expected,
                    "cut {}",
                    cut
                );
            }
            let mut cuts: Vec<usize> = raw_cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut from = 0;
            for cut in cuts {
                chunks.push(&stream[from..cut]);
                from = cut;
            }
            chunks.push(&stream[from..]);
            proptest::prop_assert_eq!(&parse_all(&chunks), &expected);
        }
    }

    #[test]
    fn name_keys_fold_exactly_what_ascii_case_folding_folds() {
        // Every byte value at every position of a name: two names have equal
        // keys exactly when they are equal ignoring ASCII case.
        let base = *b"abcdefghijklmnop";
        for len in [1, 3, 7, 8, 9, 15, 16] {
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut name = base;
                    name[pos] = b;
                    let name = &name[..len];
                    let lower = String::from_utf8(base[..len].to_vec()).unwrap();
                    let want = name.eq_ignore_ascii_case(&base[..len]);
                    assert_eq!(
                        NameKey::of(name) == Some(NameKey::of_lower(&lower)),
                        want,
                        "{name:?}"
                    );
                }
            }
        }
        assert_eq!(NameKey::of(b"GeT"), Some(NameKey::of_lower("get")));
        assert_ne!(NameKey::of(b"get\0"), Some(NameKey::of_lower("get")));
        assert_eq!(NameKey::of(&[b'a'; 17]), None);
        assert_eq!(NameKey::of(b""), Some(NameKey::of_lower("")));
    }

    #[test]
    fn word_lower_casing_matches_the_bytewise_one() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let bytes = rng.to_le_bytes();
            let want = u64::from_le_bytes(bytes.map(|b| b.to_ascii_lowercase()));
            assert_eq!(lower_ascii_word(rng), want, "{bytes:?}");
        }
    }

    #[test]
    fn integers_are_strict() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        for bad in [
            &b""[..],
            b"+1",
            b"01",
            b"-0",
            b" 1",
            b"1 ",
            b"9223372036854775808",
            b"1a",
        ] {
            assert_eq!(parse_i64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn encoder_speaks_both_versions() {
        let two = Encoder(RespVersion::Two);
        let three = Encoder(RespVersion::Three);
        let mut out = Vec::new();
        two.null(&mut out);
        three.null(&mut out);
        two.map(&mut out, 2);
        three.map(&mut out, 2);
        two.int(&mut out, -5);
        two.bulk(&mut out, b"a\r\nb");
        two.error(&mut out, "ERR bad\r\nthing");
        three.verbatim(&mut out, "x");
        two.verbatim(&mut out, "x");
        assert_eq!(
            out,
            b"$-1\r\n_\r\n*4\r\n%2\r\n:-5\r\n$4\r\na\r\nb\r\n-ERR bad  thing\r\n=5\r\ntxt:x\r\n$1\r\nx\r\n"
                .to_vec()
        );
    }

    #[test]
    fn integer_headers_print_as_format_prints_them() {
        let enc = Encoder(RespVersion::Two);
        let edges = [
            i64::MIN,
            i64::MIN + 1,
            -10_000,
            -1,
            0,
            9_999,
            10_000,
            i64::MAX,
        ];
        for n in (-1100..=11_000).chain(edges) {
            let mut out = Vec::new();
            enc.int(&mut out, n);
            assert_eq!(out, format!(":{n}\r\n").into_bytes(), "{n}");
        }
    }

    #[test]
    fn globs_match_as_redis_does() {
        let yes: &[(&[u8], &[u8])] = &[
            (b"*", b""),
            (b"*", b"anything"),
            (b"h?llo", b"hello"),
            (b"h*llo", b"heeeello"),
            (b"h[ae]llo", b"hallo"),
            (b"h[^e]llo", b"hallo"),
            (b"h[a-b]llo", b"hbllo"),
            (b"h\\*llo", b"h*llo"),
            (b"*a*b*", b"xxaxxbxx"),
            (b"user:*", b"user:1"),
        ];
        for (p, t) in yes {
            assert!(glob_match(p, t), "{p:?} {t:?}");
        }
        let no: &[(&[u8], &[u8])] = &[
            (b"h?llo", b"hllo"),
            (b"h[^e]llo", b"hello"),
            (b"h[a-b]llo", b"hcllo"),
            (b"a*b", b"acbd"),
            (b"", b"x"),
        ];
        for (p, t) in no {
            assert!(!glob_match(p, t), "{p:?} {t:?}");
        }
    }
}
