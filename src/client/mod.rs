//! The blocking client library used by the CLI, the tests and the tools.
//!
//! Over TCP, requests and replies travel in order on one stream. Over UDP,
//! each request is one datagram; a lost request or reply is retried with the
//! same request id, which the server uses to apply a retried write only once.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use crate::protocol::txn::Txn;
use crate::protocol::{
    Decoded, EXPECT_ABSENT, HEADER_LEN, Header, MAX_KEY_BYTES, MAX_UDP_FRAME_BYTES, Opcode,
    ProtocolError, Response, Status, decode, decode_datagram, encode_request_expecting,
};

/// Largest reply value the client accepts unless told otherwise.
pub const DEFAULT_MAX_REPLY_VALUE_BYTES: usize = 64 << 20;

/// How replies are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One TCP connection.
    Tcp,
    /// One UDP socket, one datagram per request.
    Udp,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// TCP or UDP.
    pub transport: Transport,
    /// Time allowed for connecting and for each request, retries included.
    pub timeout: Duration,
    /// Time before a UDP request is sent again.
    pub udp_retry_after: Duration,
    /// Largest reply value accepted; bigger replies are an error, not an allocation.
    pub max_reply_value_bytes: usize,
    /// Redirects (a write sent to a slave) followed before giving up; 0 returns them.
    pub max_redirects: u8,
    /// Over UDP, send a request again over TCP when it or its reply does not
    /// fit (a `USE_TCP` answer, or a request too large for a datagram).
    pub tcp_fallback: bool,
    /// The server's password (`--requirepass-file`): every TCP connection,
    /// redirect targets and reconnections included, sends AUTH with it first.
    /// UDP cannot authenticate: a server with a password serves UDP PING only.
    pub password: Option<ClientPassword>,
}

/// A password for AUTH; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientPassword(pub Vec<u8>);

impl fmt::Debug for ClientPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientPassword(..)")
    }
}

impl ClientPassword {
    /// The password held by a file: its contents with one trailing line end
    /// (`\n` or `\r\n`) removed, as `dkvs-server --requirepass-file` reads it.
    pub fn from_file_contents(bytes: &[u8]) -> Result<ClientPassword, String> {
        let bytes = bytes
            .strip_suffix(b"\r\n")
            .or_else(|| bytes.strip_suffix(b"\n"))
            .unwrap_or(bytes);
        if bytes.is_empty() {
            return Err("the password file is empty".into());
        }
        Ok(ClientPassword(bytes.to_vec()))
    }
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            transport: Transport::Tcp,
            timeout: Duration::from_secs(5),
            udp_retry_after: Duration::from_millis(200),
            max_reply_value_bytes: DEFAULT_MAX_REPLY_VALUE_BYTES,
            max_redirects: 3,
            tcp_fallback: true,
            password: None,
        }
    }
}

/// What went wrong with a request.
#[derive(Debug)]
pub enum ClientError {
    /// The server's address did not resolve.
    Resolve(String),
    /// Connecting, sending or receiving failed.
    Io(io::Error),
    /// No reply within the timeout.
    Timeout(Duration),
    /// The server closed the connection.
    Closed,
    /// The reply could not be decoded.
    Protocol(ProtocolError),
    /// The reply does not answer the request sent.
    Mismatch(String),
    /// The request breaks a limit before it is sent.
    InvalidRequest(String),
    /// The server answered with an error status.
    Server {
        /// The status (or the unknown raw byte).
        status: Result<Status, u8>,
        /// The server's message.
        message: String,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Resolve(msg) => write!(f, "{msg}"),
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Timeout(t) => write!(f, "no reply within {} ms", t.as_millis()),
            ClientError::Closed => write!(f, "server closed the connection"),
            ClientError::Protocol(e) => write!(f, "bad reply: {e}"),
            ClientError::Mismatch(msg) => write!(f, "bad reply: {msg}"),
            ClientError::InvalidRequest(msg) => write!(f, "{msg}"),
            ClientError::Server { status, message } => match status {
                Ok(status) => write!(f, "server error {}: {message}", status.name()),
                Err(byte) => write!(f, "server error {byte}: {message}"),
            },
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::Timeout(Duration::ZERO)
            }
            io::ErrorKind::UnexpectedEof => ClientError::Closed,
            _ => ClientError::Io(e),
        }
    }
}

/// A key's value with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The value.
    pub value: Vec<u8>,
    /// Commit sequence number of the write that set it.
    pub version: u64,
}

/// The answer to a compare-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    /// Written at this version.
    Done(u64),
    /// UPDATE or DELETE without an expected version found no key.
    NotFound,
    /// The key's version was not the one expected: nothing was written. The
    /// key's current version (0: absent).
    Mismatch(u64),
}

/// The answer to a TXN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every condition held and every write was applied at this version
    /// (0 when the transaction held no writes, or none changed anything).
    Committed(u64),
    /// Condition `index` (counting from 0) did not hold: nothing was written.
    Failed {
        /// The first failed condition.
        index: u32,
        /// Its key's current version (0: absent).
        current: u64,
    },
}

enum Link {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

/// A blocking connection to one server.
pub struct Client {
    link: Link,
    config: ClientConfig,
    server: SocketAddr,
    next_id: u32,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    /// The master a slave redirected writes to, kept for the next writes.
    master: Option<Box<Client>>,
    /// A TCP connection to the same server for requests UDP cannot carry,
    /// opened on the first `USE_TCP` and kept.
    tcp: Option<Box<Client>>,
    /// A TCP exchange failed midway: the stream may hold a late or partial
    /// reply, so the next request starts on a new connection.
    broken: bool,
}

/// Open the socket for `config.transport` to `server`.
fn open_link(server: SocketAddr, config: &ClientConfig) -> Result<Link, ClientError> {
    Ok(match config.transport {
        Transport::Tcp => {
            let stream = TcpStream::connect_timeout(&server, config.timeout).map_err(|e| {
                ClientError::Io(io::Error::new(
                    e.kind(),
                    format!("cannot connect to {server} over TCP: {e}"),
                ))
            })?;
            stream.set_nodelay(true)?;
            Link::Tcp(stream)
        }
        Transport::Udp => {
            let local: SocketAddr = if server.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(local)?;
            socket.connect(server)?;
            Link::Udp(socket)
        }
    })
}

/// Resolve `host:port` to the first address.
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, ClientError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| ClientError::Resolve(format!("cannot resolve '{host}': {e}")))?
        .next()
        .ok_or_else(|| ClientError::Resolve(format!("'{host}' has no address")))
}

/// Parse a server list: `host[:port]` entries separated by commas (`[v6]:port`
/// for IPv6), with `default_port` where an entry has none.
pub fn parse_servers(list: &str, default_port: u16) -> Result<Vec<(String, u16)>, String> {
    let mut servers = Vec::new();
    for entry in list.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(format!("empty entry in the server list '{list}'"));
        }
        let (host, port) = match entry.rsplit_once(':') {
            // A bare IPv6 address has colons but no port.
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                let port = port
                    .parse()
                    .map_err(|_| format!("'{port}' in '{entry}' is not a port"))?;
                (host.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (entry, default_port),
        };
        servers.push((host.to_string(), port));
    }
    Ok(servers)
}

/// The master's `host:port` as the leader key of cluster `cluster` in etcd names it.
pub fn master_from_etcd(
    endpoints: Vec<String>,
    cluster: &str,
    timeout: Duration,
) -> Result<(String, u16), ClientError> {
    let client = crate::etcd::EtcdClient::new(endpoints, timeout);
    let key = crate::failover::agent::Keys::new(cluster).leader;
    let (kv, _) = client
        .range(&key)
        .map_err(|e| ClientError::Resolve(format!("etcd: {e}")))?;
    let kv = kv.ok_or_else(|| {
        ClientError::Resolve(format!("etcd: cluster '{cluster}' has no master right now"))
    })?;
    let leader = crate::failover::LeaderRecord::parse(&kv.value)
        .map_err(|e| ClientError::Resolve(format!("etcd: the leader key: {e}")))?;
    let (host, port) = leader
        .addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
        .ok_or_else(|| ClientError::Resolve(format!("etcd: bad leader address {}", leader.addr)))?;
    Ok((host, port))
}

impl Client {
    /// Connect to the first of `servers` that accepts a connection: a client
    /// of a cluster moves on past the ones that are down.
    pub fn connect_first(
        servers: &[(String, u16)],
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        let mut last = ClientError::Resolve("no server given".into());
        for (host, port) in servers {
            match Client::connect(host, *port, config.clone()) {
                Ok(client) => return Ok(client),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Connect to `host:port` over the configured transport.
    pub fn connect(host: &str, port: u16, config: ClientConfig) -> Result<Client, ClientError> {
        let server = resolve(host, port)?;
        Client::connect_addr(server, config)
    }

    /// Connect to a resolved address.
    pub fn connect_addr(server: SocketAddr, config: ClientConfig) -> Result<Client, ClientError> {
        let link = open_link(server, &config)?;
        let mut client = Client {
            link,
            config,
            server,
            // A random start keeps ids from colliding with an earlier process's
            // in the server's UDP retry cache when the OS reuses a source port.
            next_id: rand::random(),
            out: Vec::with_capacity(256),
            inbuf: Vec::new(),
            master: None,
            tcp: None,
            broken: false,
        };
        client.authenticate()?;
        Ok(client)
    }

    /// Send AUTH with the configured password on a fresh TCP connection.
    fn authenticate(&mut self) -> Result<(), ClientError> {
        let Some(password) = self.config.password.clone() else {
            return Ok(());
        };
        if !matches!(self.link, Link::Tcp(_)) {
            return Ok(());
        }
        let reply = self.request_here(Opcode::Auth, 0, &[], &password.0)?;
        match reply.status {
            Ok(Status::Ok) => Ok(()),
            status => Err(ClientError::Server {
                status,
                message: reply.message(),
            }),
        }
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Read `key`: `None` if it does not exist.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Versioned>, ClientError> {
        let reply = self.call(Opcode::Get, key, &[])?;
        Ok(match reply.status {
            Ok(Status::Ok) => Some(Versioned {
                value: reply.value,
                version: reply.version,
            }),
            _ => None,
        })
    }

    /// Create or replace `key`; returns the new version.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<u64, ClientError> {
        let reply = self.call(Opcode::Put, key, value)?;
        match reply.status {
            Ok(Status::Ok) => Ok(reply.version),
            _ => Err(ClientError::Mismatch("PUT answered NOT_FOUND".into())),
        }
    }

    /// Replace `key` if it exists; `None` if it does not.
    pub fn update(&mut self, key: &[u8], value: &[u8]) -> Result<Option<u64>, ClientError> {
        let reply = self.call(Opcode::Update, key, value)?;
        Ok((reply.status == Ok(Status::Ok)).then_some(reply.version))
    }

    /// Remove `key`; `false` if it did not exist.
    pub fn delete(&mut self, key: &[u8]) -> Result<bool, ClientError> {
        let reply = self.call(Opcode::Delete, key, &[])?;
        Ok(reply.status == Ok(Status::Ok))
    }

    /// PUT, UPDATE or DELETE `key` only if it carries version `expect`
    /// ([`EXPECT_ABSENT`]: PUT only if absent; 0: unconditionally).
    pub fn write_if(
        &mut self,
        op: Opcode,
        key: &[u8],
        value: &[u8],
        expect: u64,
    ) -> Result<Cas, ClientError> {
        let reply = self.request_expecting(op, expect, key, value)?;
        match reply.status {
            Ok(Status::Ok) => Ok(Cas::Done(reply.version)),
            Ok(Status::NotFound) => Ok(Cas::NotFound),
            Ok(Status::VersionMismatch) => Ok(Cas::Mismatch(reply.version)),
            status => Err(ClientError::Server {
                status,
                message: reply.message(),
            }),
        }
    }

    /// Create or replace `key` so that it expires at `deadline_ms` (unix ms, > 0),
    /// only if it carries version `expect` (0: unconditionally, see [`Client::write_if`]).
    pub fn put_expiring(
        &mut self,
        key: &[u8],
        value: &[u8],
        deadline_ms: u64,
        expect: u64,
    ) -> Result<Cas, ClientError> {
        if deadline_ms == 0 {
            return Err(ClientError::InvalidRequest(
                "a deadline is unix milliseconds, not 0".into(),
            ));
        }
        let mut payload = Vec::with_capacity(8 + value.len());
        payload.extend_from_slice(&deadline_ms.to_be_bytes());
        payload.extend_from_slice(value);
        self.write_if(Opcode::PutExpiring, key, &payload, expect)
    }

    /// Set the deadline of `key` (unix ms; `None` removes it); `None` if the key is absent.
    pub fn expire(
        &mut self,
        key: &[u8],
        deadline_ms: Option<u64>,
    ) -> Result<Option<u64>, ClientError> {
        let bytes = deadline_ms.unwrap_or(0).to_be_bytes();
        match self.write_if(Opcode::Expire, key, &bytes, 0)? {
            Cas::Done(version) => Ok(Some(version)),
            Cas::NotFound | Cas::Mismatch(_) => Ok(None),
        }
    }

    /// The deadline of `key` (unix ms, `None`: none) and its version; `None` if absent.
    pub fn ttl(&mut self, key: &[u8]) -> Result<Option<(Option<u64>, u64)>, ClientError> {
        let reply = self.call(Opcode::Ttl, key, &[])?;
        if reply.status != Ok(Status::Ok) {
            return Ok(None);
        }
        let deadline = <[u8; 8]>::try_from(reply.value.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| ClientError::Mismatch("TTL reply is not 8 bytes".into()))?;
        Ok(Some((Some(deadline).filter(|&d| d > 0), reply.version)))
    }

    /// Create `key` only if it does not exist.
    pub fn put_if_absent(&mut self, key: &[u8], value: &[u8]) -> Result<Cas, ClientError> {
        self.write_if(Opcode::Put, key, value, EXPECT_ABSENT)
    }

    /// Check `txn`'s conditions and apply its writes as one transaction on the master.
    /// The writes may be any [`TxnWrite`](crate::protocol::txn::TxnWrite): PUT,
    /// DELETE, UPDATE, PUT with a deadline, EXPIRE or PERSIST (docs/PROTOCOL.md §4.3).
    pub fn txn(&mut self, txn: &Txn<'_>) -> Result<TxnOutcome, ClientError> {
        txn.check_limits()
            .map_err(|e| ClientError::InvalidRequest(e.to_string()))?;
        let mut payload = Vec::new();
        txn.encode(&mut payload);
        let reply = self.request(Opcode::Txn, &[], &payload)?;
        match reply.status {
            Ok(Status::Ok) => Ok(TxnOutcome::Committed(reply.version)),
            Ok(Status::VersionMismatch) => {
                let index = <[u8; 4]>::try_from(reply.value.as_slice())
                    .map(u32::from_be_bytes)
                    .map_err(|_| {
                        ClientError::Mismatch(format!(
                            "VERSION_MISMATCH to a TXN carries {} bytes, not a 4-byte index",
                            reply.value.len()
                        ))
                    })?;
                Ok(TxnOutcome::Failed {
                    index,
                    current: reply.version,
                })
            }
            status => Err(ClientError::Server {
                status,
                message: reply.message(),
            }),
        }
    }

    /// Check the server answers.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.call(Opcode::Ping, &[], &[]).map(|_| ())
    }

    /// The server's statistics as `name value` lines.
    pub fn stats(&mut self) -> Result<String, ClientError> {
        self.call(Opcode::Stats, &[], &[])
            .map(|reply| String::from_utf8_lossy(&reply.value).into_owned())
    }

    /// Send one request and return its reply if the status is OK or NOT_FOUND.
    pub fn call(&mut self, op: Opcode, key: &[u8], value: &[u8]) -> Result<Response, ClientError> {
        let reply = self.request(op, key, value)?;
        match reply.status {
            Ok(Status::Ok) | Ok(Status::NotFound) => Ok(reply),
            status => Err(ClientError::Server {
                status,
                message: reply.message(),
            }),
        }
    }

    /// Send one request and return whatever the server answered, following a
    /// redirect of a write to the master named by a slave.
    pub fn request(
        &mut self,
        op: Opcode,
        key: &[u8],
        value: &[u8],
    ) -> Result<Response, ClientError> {
        self.request_expecting(op, 0, key, value)
    }

    /// [`Client::request`] with the header's version field set to `expect`
    /// (a write's expected version, compare-and-set).
    pub fn request_expecting(
        &mut self,
        op: Opcode,
        expect: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<Response, ClientError> {
        if op.is_write()
            && let Some(master) = self.master.as_mut()
        {
            let reply = master.request_expecting(op, expect, key, value);
            if !matches!(&reply, Ok(r) if r.status != Ok(Status::Redirect)) {
                // Forget it (failed, or no longer the master): the next write asks
                // the slave again where the master is.
                self.master = None;
            }
            return reply;
        }
        let reply = match self.request_here(op, expect, key, value) {
            Ok(reply) if reply.status == Ok(Status::UseTcp) && self.falls_back() => {
                return self.request_over_tcp(op, expect, key, value);
            }
            Err(ClientError::InvalidRequest(_)) if self.falls_back() && self.fits_tcp(key) => {
                return self.request_over_tcp(op, expect, key, value);
            }
            other => other?,
        };
        if reply.status != Ok(Status::Redirect) || self.config.max_redirects == 0 {
            return Ok(reply);
        }
        let target = reply.message();
        let (host, port) = target
            .rsplit_once(':')
            .and_then(|(h, p)| {
                Some((
                    h.trim_start_matches('[').trim_end_matches(']'),
                    p.parse().ok()?,
                ))
            })
            .ok_or_else(|| ClientError::Mismatch(format!("bad redirect target '{target}'")))?;
        let config = ClientConfig {
            max_redirects: self.config.max_redirects - 1,
            ..self.config.clone()
        };
        let mut master = Client::connect(host, port, config)?;
        let reply = master.request_expecting(op, expect, key, value)?;
        self.master = Some(Box::new(master));
        Ok(reply)
    }

    /// Whether a request UDP cannot carry goes over TCP instead.
    fn falls_back(&self) -> bool {
        matches!(self.link, Link::Udp(_)) && self.config.tcp_fallback
    }

    /// Whether the key is one TCP can carry (the only other local refusal).
    fn fits_tcp(&self, key: &[u8]) -> bool {
        key.len() <= MAX_KEY_BYTES
    }

    /// Send the request over this client's TCP connection to the same server.
    /// Safe for writes too: a `USE_TCP` answer means nothing was applied.
    fn request_over_tcp(
        &mut self,
        op: Opcode,
        expect: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<Response, ClientError> {
        if self.tcp.is_none() {
            let config = ClientConfig {
                transport: Transport::Tcp,
                ..self.config.clone()
            };
            self.tcp = Some(Box::new(Client::connect_addr(self.server, config)?));
        }
        let Some(tcp) = self.tcp.as_mut() else {
            unreachable!("just opened");
        };
        let reply = tcp.request_expecting(op, expect, key, value);
        if reply.is_err() {
            // Open a fresh one next time.
            self.tcp = None;
        }
        reply
    }

    fn request_here(
        &mut self,
        op: Opcode,
        expect: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<Response, ClientError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(ClientError::InvalidRequest(format!(
                "key of {} bytes is longer than the limit of {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        if self.broken {
            self.link = open_link(self.server, &self.config)?;
            self.broken = false;
            self.authenticate()?;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.out.clear();
        encode_request_expecting(&mut self.out, op, id, expect, key, value);
        let reply = match self.link {
            Link::Tcp(_) => {
                let reply = self.tcp_round_trip();
                self.broken = reply.is_err();
                reply?
            }
            Link::Udp(_) => {
                if self.out.len() > MAX_UDP_FRAME_BYTES {
                    return Err(ClientError::InvalidRequest(format!(
                        "request of {} bytes does not fit one UDP datagram \
                         (max {MAX_UDP_FRAME_BYTES}): use TCP",
                        self.out.len()
                    )));
                }
                self.udp_round_trip(id)?
            }
        };
        if reply.request_id != id {
            self.broken = true;
            return Err(ClientError::Mismatch(format!(
                "reply to request {} arrived for request {id}",
                reply.request_id
            )));
        }
        if reply.opcode != op as u8 && reply.opcode != 0 {
            self.broken = true;
            return Err(ClientError::Mismatch(format!(
                "reply opcode 0x{:02x} does not match request 0x{:02x}",
                reply.opcode, op as u8
            )));
        }
        Ok(reply)
    }

    fn tcp_round_trip(&mut self) -> Result<Response, ClientError> {
        let Link::Tcp(stream) = &mut self.link else {
            unreachable!("tcp_round_trip is only called on TCP links");
        };
        stream.set_write_timeout(Some(self.config.timeout))?;
        stream
            .write_all(&self.out)
            .map_err(|e| timeout_or(e, self.config.timeout))?;
        let deadline = Instant::now() + self.config.timeout;
        let mut header = [0u8; HEADER_LEN];
        read_full(stream, &mut header, deadline, self.config.timeout)?;
        let parsed = Header::parse(&header, self.config.max_reply_value_bytes)
            .map_err(ClientError::Protocol)?;
        self.inbuf.clear();
        self.inbuf.extend_from_slice(&header);
        // Lengths were checked by the header parser before this allocation.
        self.inbuf.resize(parsed.frame_len(), 0);
        read_full(
            stream,
            &mut self.inbuf[HEADER_LEN..],
            deadline,
            self.config.timeout,
        )?;
        match decode(&self.inbuf, self.config.max_reply_value_bytes) {
            Ok(Decoded::Frame(frame, _)) => {
                Response::from_frame(&frame).map_err(ClientError::Protocol)
            }
            Ok(Decoded::Incomplete(_)) => Err(ClientError::Closed),
            Err(e) => Err(ClientError::Protocol(e)),
        }
    }

    fn udp_round_trip(&mut self, id: u32) -> Result<Response, ClientError> {
        let Link::Udp(socket) = &self.link else {
            unreachable!("udp_round_trip is only called on UDP links");
        };
        self.inbuf.resize(MAX_UDP_FRAME_BYTES + 1, 0);
        let deadline = Instant::now() + self.config.timeout;
        loop {
            socket.send(&self.out)?;
            // At least a millisecond between sends, whatever the configuration says.
            let retry_after = self.config.udp_retry_after.max(Duration::from_millis(1));
            let resend_at = (Instant::now() + retry_after).min(deadline);
            // Wait for our reply; stale replies to earlier retries are skipped.
            loop {
                let now = Instant::now();
                if now >= resend_at {
                    break;
                }
                socket.set_read_timeout(Some(resend_at - now))?;
                let len = match socket.recv(&mut self.inbuf) {
                    Ok(len) => len,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break;
                    }
                    // A port-unreachable ICMP: the server is not (yet) there; retry later.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        std::thread::sleep(resend_at.saturating_duration_since(Instant::now()));
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                let frame = decode_datagram(&self.inbuf[..len], self.config.max_reply_value_bytes)
                    .map_err(ClientError::Protocol)?;
                if frame.header.request_id == id {
                    return Response::from_frame(&frame).map_err(ClientError::Protocol);
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(self.config.timeout));
            }
        }
    }
}

fn timeout_or(e: io::Error, timeout: Duration) -> ClientError {
    match ClientError::from(e) {
        ClientError::Timeout(_) => ClientError::Timeout(timeout),
        other => other,
    }
}

fn read_full(
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), ClientError> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(buf) {
            Ok(0) => return Err(ClientError::Closed),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timeout_or(e, timeout)),
        }
    }
    Ok(())
}
