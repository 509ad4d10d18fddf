//! `/v3/watch`: one watch per HTTP/1.1 connection, its events read off the chunked answer.
//!
//! The gateway turns the gRPC stream into a chunked HTTP body of newline-separated JSON messages:
//! first `{"result":{"created":true,...}}`, then one message per batch of events, and at the end
//! a `canceled` message (with `compact_revision` when the start revision was compacted away) or
//! `{"error":...}`. This reads it from a plain `TcpStream` rather than through `ureq`: a watch is
//! read with a deadline per [`Watch::next`] call that may pass with nothing said and be tried
//! again, and dropping the watch closes the socket, so no thread is left behind blocked in a
//! read. Both are things `ureq`'s per-request timeouts and owned body reader do not offer.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::json::{StreamMessage, WatchResponseJson};
use super::{EtcdError, KeyValue};

/// Largest single message accepted from the stream (etcd limits a request to 1.5 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Largest response head (status line and headers).
const MAX_HEAD_BYTES: usize = 16 << 10;
/// Largest chunk-size line or trailer line.
const MAX_LINE_BYTES: usize = 1024;
/// Bytes asked of the socket per read.
const READ_BYTES: usize = 64 << 10;

/// One change to a watched key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was put; `kv` is the key after the put.
    Put(KeyValue),
    /// The key was deleted (by a delete, a transaction or its lease expiring).
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The revision of the delete.
        mod_revision: i64,
    },
}

/// What [`Watch::next`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchNext {
    /// The next event, in revision order.
    Event(WatchEvent),
    /// Nothing arrived within the timeout; the watch is still open.
    Timeout,
    /// The start revision was compacted: watch again from `compact_revision` or read afresh.
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
    /// etcd canceled the watch, or the stream reported an error.
    Canceled {
        /// etcd's reason, possibly empty.
        reason: String,
    },
    /// The stream ended (etcd closed it, shut down or the connection broke): watch again from
    /// [`Watch::next_revision`].
    Ended,
}

/// Why opening a watch failed.
pub(crate) enum OpenError {
    /// Nothing was sent: the next endpoint may be tried.
    NotConnected(String),
    /// Something was sent and it failed.
    Failed(EtcdError),
}

/// How the body is framed.
enum Framing {
    /// `Transfer-Encoding: chunked`, in this state.
    Chunked(Chunk),
    /// `Content-Length`: this many bytes left.
    Length(usize),
    /// Until the connection closes.
    UntilClose,
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(usize),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last (empty) chunk: trailer lines until an empty one.
    Trailers,
    /// The body is complete.
    Done,
}

/// An open watch; events come out of [`next`](Watch::next). Dropping it closes the connection,
/// which makes etcd cancel the watch.
pub struct Watch {
    endpoint: String,
    stream: TcpStream,
    framing: Framing,
    /// Bytes read from the socket and not yet de-framed.
    raw: Vec<u8>,
    /// De-framed body bytes not yet parsed into messages.
    body: Vec<u8>,
    /// Events parsed and not yet returned.
    pending: VecDeque<WatchEvent>,
    /// The outcome once the watch has ended; returned again on every later call.
    end: Option<WatchNext>,
    /// The socket reported end of stream.
    eof: bool,
    /// The revision a replacement watch should start from to miss nothing.
    next_revision: i64,
    /// The store's revision in the watch's creation answer.
    created_revision: i64,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("endpoint", &self.endpoint)
            .field("next_revision", &self.next_revision)
            .field("end", &self.end)
            .finish()
    }
}

impl Watch {
    /// Connect to `endpoint`, send the watch request `body`, and wait for the creation answer.
    pub(crate) fn open(
        endpoint: &str,
        body: &[u8],
        timeout: Duration,
        start_revision: i64,
    ) -> Result<Watch, OpenError> {
        let deadline = Instant::now() + timeout;
        let hostport = endpoint
            .strip_prefix("http://")
            .map(|rest| rest.split('/').next().unwrap_or(rest))
            .filter(|h| !h.is_empty())
            .ok_or_else(|| OpenError::Failed(EtcdError::BadEndpoint(endpoint.to_string())))?;
        let addrs: Vec<_> = hostport
            .to_socket_addrs()
            .map_err(|e| OpenError::NotConnected(format!("resolving {hostport}: {e}")))?
            .collect();
        let mut stream = None;
        let mut why = format!("{hostport} resolved to no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => why = format!("connecting to {addr}: {e}"),
            }
        }
        let stream = stream.ok_or(OpenError::NotConnected(why))?;
        let lost = |cause: String| {
            OpenError::Failed(EtcdError::ConnectionLost {
                endpoint: endpoint.to_string(),
                cause,
            })
        };
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| lost(e.to_string()))?;
        let head = format!(
            "POST /v3/watch HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nAccept: application/json\r\n{}: {}\r\n\r\n",
            body.len(),
            super::REQUIRE_LEADER.0,
            super::REQUIRE_LEADER.1,
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        (&stream)
            .write_all(&request)
            .map_err(|e| lost(format!("sending the watch request: {e}")))?;
        let mut watch = Watch {
            endpoint: endpoint.to_string(),
            stream,
            framing: Framing::UntilClose,
            raw: Vec::new(),
            body: Vec::new(),
            pending: VecDeque::new(),
            end: None,
            eof: false,
            next_revision: start_revision,
            created_revision: 0,
        };
        watch.read_head(deadline).map_err(OpenError::Failed)?;
        watch.await_created(deadline).map_err(OpenError::Failed)?;
        Ok(watch)
    }

    /// The endpoint this watch is connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The store's revision when etcd created the watch.
    pub fn created_revision(&self) -> i64 {
        self.created_revision
    }

    /// The start revision for a new watch that continues this one without a gap or a repeat:
    /// one past the last event returned (or this watch's own start).
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// Wait up to `timeout` for the next event or for the end of the watch.
    pub fn next(&mut self, timeout: Duration) -> Result<WatchNext, EtcdError> {
        let deadline = Instant::now() + timeout;
        // Bounded: each turn either returns, parses a message out of the buffer, or reads
        // from the socket with the remaining time, which ends in a return once it runs out.
        loop {
            if let Some(event) = self.pending.pop_front() {
                // Revisions come from etcd, which anyone with access to it may
                // answer for: the largest one must not overflow.
                self.next_revision = match &event {
                    WatchEvent::Put(kv) => kv.mod_revision.saturating_add(1),
                    WatchEvent::Delete { mod_revision, .. } => mod_revision.saturating_add(1),
                };
                return Ok(WatchNext::Event(event));
            }
            if let Some(end) = &self.end {
                return Ok(end.clone());
            }
            if let Some(message) = self.parse_message()? {
                self.handle(message);
                continue;
            }
            if self.eof || matches!(self.framing, Framing::Chunked(Chunk::Done)) {
                self.end = Some(WatchNext::Ended);
                continue;
            }
            match self.fill(deadline) {
                Ok(true) => {}
                Ok(false) => return Ok(WatchNext::Timeout),
                Err(e @ EtcdError::BadResponse(_)) => return Err(e),
                Err(e) => {
                    // A broken connection ends the watch the same way a closed one does.
                    log::debug!("watch on {}: {e}", self.endpoint);
                    self.eof = true;
                }
            }
        }
    }

    /// Read once from the socket within `deadline` and de-frame what came. False if the time ran
    /// out with nothing read.
    fn fill(&mut self, deadline: Instant) -> Result<bool, EtcdError> {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let lost = |cause: String| EtcdError::ConnectionLost {
            endpoint: self.endpoint.clone(),
            cause,
        };
        self.stream
            .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
            .map_err(|e| lost(e.to_string()))?;
        // Read straight into the end of `raw`; it grows only by what arrived.
        let old_len = self.raw.len();
        self.raw.resize(old_len + READ_BYTES, 0);
        let read = loop {
            match self.stream.read(&mut self.raw[old_len..]) {
                Ok(n) => break Ok(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        self.raw.truncate(old_len + read.as_ref().map_or(0, |n| *n));
        let n = match read {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(false);
            }
            Err(e) => return Err(lost(e.to_string())),
        };
        if n == 0 {
            self.eof = true;
            return Ok(true);
        }
        self.deframe()?;
        Ok(true)
    }

    /// Move body bytes from `raw` to `body`, undoing the transfer framing.
    fn deframe(&mut self) -> Result<(), EtcdError> {
        let bad = |why: String| EtcdError::BadResponse(format!("watch stream: {why}"));
        let mut at = 0;
        // Bounded by `raw`: every turn consumes bytes or breaks.
        loop {
            let rest = &self.raw[at..];
            match &mut self.framing {
                Framing::UntilClose => {
                    self.body.extend_from_slice(rest);
                    at = self.raw.len();
                    break;
                }
                Framing::Length(left) => {
                    let take = (*left).min(rest.len());
                    self.body.extend_from_slice(&rest[..take]);
                    *left -= take;
                    at += take;
                    break;
                }
                Framing::Chunked(state) => match *state {
                    Chunk::Done => {
                        at = self.raw.len();
                        break;
                    }
                    Chunk::Size | Chunk::DataEnd | Chunk::Trailers => {
                        let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                            if rest.len() > MAX_LINE_BYTES {
                                return Err(bad("chunk line too long".into()));
                            }
                            break;
                        };
                        let line = &rest[..end];
                        at += end + 2;
                        *state = match *state {
                            Chunk::Size => {
                                let text = std::str::from_utf8(line)
                                    .map_err(|_| bad("chunk size is not text".into()))?;
                                let hex = text.split(';').next().unwrap_or("").trim();
                                let size = usize::from_str_radix(hex, 16)
                                    .map_err(|_| bad(format!("bad chunk size {hex:?}")))?;
                                // A declared size is a limit to check, never one to allocate.
                                if size > MAX_MESSAGE_BYTES {
                                    return Err(bad(format!("chunk of {size} bytes")));
                                }
                                if size == 0 {
                                    Chunk::Trailers
                                } else {
                                    Chunk::Data(size)
                                }
                            }
                            Chunk::DataEnd if line.is_empty() => Chunk::Size,
                            Chunk::DataEnd => return Err(bad("no CRLF after chunk".into())),
                            _ if line.is_empty() => Chunk::Done,
                            _ => Chunk::Trailers,
                        };
                    }
                    Chunk::Data(left) => {
                        if rest.is_empty() {
                            break;
                        }
                        let take = left.min(rest.len());
                        self.body.extend_from_slice(&rest[..take]);
                        at += take;
                        *state = if take == left {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left - take)
                        };
                    }
                },
            }
        }
        self.raw.drain(..at);
        if self.body.len() > MAX_MESSAGE_BYTES {
            return Err(bad(format!(
                "message over {MAX_MESSAGE_BYTES} bytes without an end"
            )));
        }
        Ok(())
    }

    /// Take one complete JSON message off the front of `body`, if there is one.
    fn parse_message(&mut self) -> Result<Option<StreamMessage<WatchResponseJson>>, EtcdError> {
        let start = self
            .body
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.body.len());
        self.body.drain(..start);
        if self.body.is_empty() {
            return Ok(None);
        }
        let mut values = serde_json::Deserializer::from_slice(&self.body)
            .into_iter::<StreamMessage<WatchResponseJson>>();
        match values.next() {
            Some(Ok(message)) => {
                let used = values.byte_offset();
                self.body.drain(..used);
                Ok(Some(message))
            }
            Some(Err(e)) if e.is_eof() => Ok(None),
            Some(Err(e)) => Err(EtcdError::BadResponse(format!("watch message: {e}"))),
            None => Ok(None),
        }
    }

    /// Queue a message's events, or record the end it announces.
    fn handle(&mut self, message: StreamMessage<WatchResponseJson>) {
        let Some(result) = message.result else {
            let reason = message
                .error
                .map(|e| {
                    if e.message.is_empty() {
                        e.error
                    } else {
                        e.message
                    }
                })
                .unwrap_or_default();
            self.end = Some(WatchNext::Canceled { reason });
            return;
        };
        if result.created && self.created_revision == 0 {
            self.created_revision = result.header.revision;
            // A watch "from now" sees everything after the revision it was created at.
            if self.next_revision <= 0 {
                self.next_revision = result.header.revision.saturating_add(1);
            }
        }
        for event in result.events {
            let kv = KeyValue::from(event.kv);
            self.pending.push_back(match event.kind.as_deref() {
                Some("DELETE") => WatchEvent::Delete {
                    key: kv.key,
                    mod_revision: kv.mod_revision,
                },
                _ => WatchEvent::Put(kv),
            });
        }
        if result.canceled {
            self.end = Some(if result.compact_revision > 0 {
                WatchNext::Compacted {
                    compact_revision: result.compact_revision,
                }
            } else {
                WatchNext::Canceled {
                    reason: result.cancel_reason,
                }
            });
        }
    }

    /// Read the status line and headers; an error status becomes [`EtcdError::Http`].
    fn read_head(&mut self, deadline: Instant) -> Result<(), EtcdError> {
        // Bounded by the deadline and by MAX_HEAD_BYTES.
        let head_len = loop {
            if let Some(i) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.raw.len() > MAX_HEAD_BYTES {
                return Err(EtcdError::BadResponse(
                    "watch: response head too long".into(),
                ));
            }
            let before = self.raw.len();
            if !self.fill_raw(deadline)? {
                return Err(EtcdError::Timeout {
                    endpoint: self.endpoint.clone(),
                });
            }
            if self.raw.len() == before {
                return Err(EtcdError::ConnectionLost {
                    endpoint: self.endpoint.clone(),
                    cause: "closed before answering the watch".into(),
                });
            }
        };
        let head = String::from_utf8_lossy(&self.raw[..head_len]).into_owned();
        self.raw.drain(..head_len);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| EtcdError::BadResponse(format!("watch: status line {status_line:?}")))?;
        let mut framing = Framing::UntilClose;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
            {
                framing = Framing::Chunked(Chunk::Size);
            } else if name.eq_ignore_ascii_case("content-length")
                && !matches!(framing, Framing::Chunked(_))
            {
                let n = value.parse().map_err(|_| {
                    EtcdError::BadResponse(format!("watch: content-length {value:?}"))
                })?;
                framing = Framing::Length(n);
            }
        }
        self.framing = framing;
        self.deframe()?;
        if status != 200 {
            // Read what error body arrives within the deadline, for the message.
            while !self.body_complete() && self.body.len() < 4096 {
                match self.fill(deadline) {
                    Ok(true) if !self.eof => {}
                    _ => break,
                }
            }
            let body = String::from_utf8_lossy(&self.body).trim().to_string();
            return Err(EtcdError::Http { status, body });
        }
        Ok(())
    }

    fn body_complete(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunk::Done)
        )
    }

    /// Read once into `raw` without de-framing (for the head). False if the deadline passed.
    fn fill_raw(&mut self, deadline: Instant) -> Result<bool, EtcdError> {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let lost = |cause: String| EtcdError::ConnectionLost {
            endpoint: self.endpoint.clone(),
            cause,
        };
        self.stream
            .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
            .map_err(|e| lost(e.to_string()))?;
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(n) => {
                    self.raw.extend_from_slice(&buf[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(false);
                }
                Err(e) => return Err(lost(e.to_string())),
            }
        }
    }

    /// Wait for the `created` answer; events before it are kept for [`next`](Self::next).
    fn await_created(&mut self, deadline: Instant) -> Result<(), EtcdError> {
        // Bounded by the deadline.
        loop {
            if let Some(message) = self.parse_message()? {
                let created = message.result.as_ref().is_some_and(|r| r.created);
                self.handle(message);
                if created || self.end.is_some() {
                    return Ok(());
                }
                continue;
            }
            if self.eof || self.body_complete() {
                return Err(EtcdError::ConnectionLost {
                    endpoint: self.endpoint.clone(),
                    cause: "watch stream ended before the watch was created".into(),
                });
            }
            if !self.fill(deadline)? {
                return Err(EtcdError::Timeout {
                    endpoint: self.endpoint.clone(),
                });
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Closing the connection is how an HTTP client cancels a gateway stream.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A watch whose "etcd" is a socket this test writes to.
    fn fake() -> (Watch, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let watch = Watch {
            endpoint: "test".into(),
            stream: client,
            framing: Framing::Chunked(Chunk::Size),
            raw: Vec::new(),
            body: Vec::new(),
            pending: VecDeque::new(),
            end: None,
            eof: false,
            next_revision: 1,
            created_revision: 0,
        };
        (watch, server)
    }

    fn chunk(data: &str) -> Vec<u8> {
        format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
    }

    const SHORT: Duration = Duration::from_millis(200);

    #[test]
    fn events_split_across_chunks_come_out_in_order() {
        let (mut watch, mut server) = fake();
        let message = r#"{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"aw==","mod_revision":"2","version":"1","value":"dg=="}},{"type":"DELETE","kv":{"key":"aw==","mod_revision":"3"}}]}}"#;
        let (a, b) = message.split_at(20);
        let mut bytes = chunk(a);
        bytes.extend(chunk(&format!("{b}\n")));
        server.write_all(&bytes).expect("write");
        match watch.next(SHORT).expect("next") {
            WatchNext::Event(WatchEvent::Put(kv)) => {
                assert_eq!(
                    (kv.key.as_slice(), kv.value.as_slice()),
                    (&b"k"[..], &b"v"[..])
                );
                assert_eq!(kv.mod_revision, 2);
            }
            other => panic!("expected a put, got {other:?}"),
        }
        assert_eq!(watch.next_revision(), 3);
        assert_eq!(
            watch.next(SHORT).expect("next"),
            WatchNext::Event(WatchEvent::Delete {
                key: b"k".to_vec(),
                mod_revision: 3
            })
        );
        assert_eq!(watch.next_revision(), 4);
        assert_eq!(watch.next(SHORT).expect("next"), WatchNext::Timeout);
        // The end of the body ends the watch, and it stays ended.
        server
            .write_all(b"0\r\nGrpc-Trailer: x\r\n\r\n")
            .expect("write");
        assert_eq!(watch.next(SHORT).expect("next"), WatchNext::Ended);
        assert_eq!(watch.next(SHORT).expect("next"), WatchNext::Ended);
    }

    #[test]
    fn the_largest_revision_from_a_hostile_etcd_does_not_overflow() {
        // Found while writing the fuzz targets: a revision of i64::MAX in a
        // created message or an event made `revision + 1` panic (debug) or
        // wrap to i64::MIN (release).
        let (mut watch, mut server) = fake();
        watch.next_revision = 0;
        let max = i64::MAX;
        let message = format!(
            r#"{{"result":{{"header":{{"revision":"{max}"}},"created":true,"events":[{{"kv":{{"key":"aw==","mod_revision":"{max}"}}}}]}}}}"#
        );
        server.write_all(&chunk(&message)).expect("write");
        match watch.next(SHORT).expect("next") {
            WatchNext::Event(WatchEvent::Put(kv)) => assert_eq!(kv.mod_revision, max),
            other => panic!("expected a put, got {other:?}"),
        }
        assert_eq!(watch.created_revision(), max);
        assert_eq!(watch.next_revision(), max);
    }

    #[test]
    fn compaction_and_errors_are_typed_ends() {
        let (mut watch, mut server) = fake();
        server
            .write_all(&chunk(
                r#"{"result":{"header":{},"canceled":true,"compact_revision":"4"}}"#,
            ))
            .expect("write");
        assert_eq!(
            watch.next(SHORT).expect("next"),
            WatchNext::Compacted {
                compact_revision: 4
            }
        );
        let (mut watch, mut server) = fake();
        server
            .write_all(&chunk(
                r#"{"error":{"grpc_code":14,"message":"unavailable"}}"#,
            ))
            .expect("write");
        assert_eq!(
            watch.next(SHORT).expect("next"),
            WatchNext::Canceled {
                reason: "unavailable".into()
            }
        );
    }

    /// An "etcd" that reads the request head and answers `reply` (then stays open a moment).
    fn serve_once(reply: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&seen).to_ascii_lowercase();
            assert!(head.starts_with("post /v3/watch http/1.1\r\n"), "{head}");
            assert!(head.contains("grpc-metadata-hasleader: true"), "{head}");
            let _ = conn.write_all(&reply);
            std::thread::sleep(Duration::from_millis(300));
        });
        url
    }

    #[test]
    fn open_reads_the_head_and_the_created_message() {
        let mut reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
            Transfer-Encoding: chunked\r\n\r\n"
            .to_vec();
        reply.extend(chunk(
            "{\"result\":{\"header\":{\"revision\":\"9\"},\"created\":true}}\n",
        ));
        reply.extend(chunk(
            r#"{"result":{"header":{"revision":"10"},"events":[{"kv":{"key":"aw==","mod_revision":"10"}}]}}"#,
        ));
        let url = serve_once(reply);
        let mut watch = match Watch::open(&url, b"{}", SHORT * 5, 0) {
            Ok(w) => w,
            Err(OpenError::Failed(e)) => panic!("open failed: {e}"),
            Err(OpenError::NotConnected(e)) => panic!("not connected: {e}"),
        };
        assert_eq!(watch.created_revision(), 9);
        assert_eq!(watch.next_revision(), 10);
        assert!(matches!(
            watch.next(SHORT),
            Ok(WatchNext::Event(WatchEvent::Put(kv))) if kv.mod_revision == 10
        ));
        assert_eq!(watch.next_revision(), 11);
    }

    #[test]
    fn open_reports_an_error_status_with_its_body() {
        let url = serve_once(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 17\r\n\r\n{\"error\":\"nope\"}".to_vec(),
        );
        match Watch::open(&url, b"{}", SHORT * 5, 0) {
            Err(OpenError::Failed(EtcdError::Http { status, body })) => {
                assert_eq!((status, body.as_str()), (400, r#"{"error":"nope"}"#));
            }
            Err(OpenError::Failed(e)) => panic!("wrong error {e}"),
            Err(OpenError::NotConnected(e)) => panic!("not connected: {e}"),
            Ok(w) => panic!("opened {w:?}"),
        }
        // Nobody listening: nothing was sent, so another endpoint may be tried.
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        assert!(matches!(
            Watch::open(&format!("http://127.0.0.1:{port}"), b"{}", SHORT, 0),
            Err(OpenError::NotConnected(_))
        ));
        assert!(matches!(
            Watch::open("https://127.0.0.1:1", b"{}", SHORT, 0),
            Err(OpenError::Failed(EtcdError::BadEndpoint(_)))
        ));
    }

    #[test]
    fn a_closed_connection_ends_the_watch() {
        let (mut watch, server) = fake();
        drop(server);
        assert_eq!(watch.next(SHORT).expect("next"), WatchNext::Ended);
    }

    #[test]
    fn malformed_framing_and_json_are_bad_responses() {
        let (mut watch, mut server) = fake();
        server.write_all(b"zz\r\n").expect("write");
        assert!(matches!(watch.next(SHORT), Err(EtcdError::BadResponse(_))));
        let (mut watch, mut server) = fake();
        server
            .write_all(&chunk("{\"result\":[1,2]}\n"))
            .expect("write");
        assert!(matches!(watch.next(SHORT), Err(EtcdError::BadResponse(_))));
        let (mut watch, mut server) = fake();
        server
            .write_all(format!("{:x}\r\n", MAX_MESSAGE_BYTES + 1).as_bytes())
            .expect("write");
        assert!(matches!(watch.next(SHORT), Err(EtcdError::BadResponse(_))));
    }
}
