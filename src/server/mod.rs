//! The reactor: one thread, one `mio::Poll`, multiplexing the TCP listener,
//! the UDP socket and every client connection.

mod connection;
mod handler;
mod stats;
mod udp;

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use log::{debug, error, info};
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use connection::{Connection, Liveness};
pub use handler::Core;
use udp::UdpService;

const LISTENER: Token = Token(0);
const UDP: Token = Token(1);
/// Connection tokens are slab keys shifted past the fixed tokens.
const FIRST_CONNECTION: usize = 2;
/// Attempts at finding a port free for both TCP and UDP when asked for port 0.
const PORT_ZERO_ATTEMPTS: usize = 32;

/// How a server is set up (the `dkvs-server` flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// Host name or address to bind.
    pub host: String,
    /// Port for TCP and UDP; 0 picks a free one.
    pub port: u16,
    /// Serve TCP.
    pub tcp: bool,
    /// Serve UDP.
    pub udp: bool,
    /// Largest value accepted.
    pub max_value_bytes: usize,
}

/// Why a server could not start or stopped.
#[derive(Debug)]
pub enum ServerError {
    /// The host did not resolve to an address.
    Resolve {
        /// The host as given.
        host: String,
        /// What the resolver said.
        source: io::Error,
    },
    /// A socket could not be bound.
    Bind {
        /// `TCP` or `UDP`.
        transport: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the kernel said.
        source: io::Error,
    },
    /// The poller failed.
    Poll(io::Error),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Resolve { host, source } => {
                write!(f, "cannot resolve host '{host}': {source}")
            }
            ServerError::Bind {
                transport,
                addr,
                source,
            } => {
                write!(f, "cannot bind {transport} on {addr}: {source}")?;
                if source.kind() == io::ErrorKind::AddrInUse {
                    write!(f, " (is another server running on this port? choose one with -p)")?;
                }
                Ok(())
            }
            ServerError::Poll(e) => write!(f, "poll failed: {e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    udp: Option<UdpService>,
    connections: Slab<Connection>,
    core: Core,
    addr: SocketAddr,
}

impl Server {
    /// Bind the sockets named by `config` and register them with a new poller.
    pub fn bind(config: &Config) -> Result<Server, ServerError> {
        let resolve_err = |source| ServerError::Resolve {
            host: config.host.clone(),
            source,
        };
        let addr = (config.host.as_str(), config.port)
            .to_socket_addrs()
            .map_err(resolve_err)?
            .next()
            .ok_or_else(|| resolve_err(io::ErrorKind::NotFound.into()))?;
        let (listener, udp, addr) = bind_sockets(addr, config)?;
        let poll = Poll::new().map_err(ServerError::Poll)?;
        let mut listener = listener;
        if let Some(l) = listener.as_mut() {
            poll.registry()
                .register(l, LISTENER, Interest::READABLE)
                .map_err(ServerError::Poll)?;
        }
        let mut udp = udp.map(UdpService::new);
        if let Some(u) = udp.as_mut() {
            poll.registry()
                .register(&mut u.socket, UDP, Interest::READABLE)
                .map_err(ServerError::Poll)?;
        }
        Ok(Server {
            poll,
            listener,
            udp,
            connections: Slab::new(),
            core: Core::new(config.max_value_bytes),
            addr,
        })
    }

    /// The bound address (the port is the real one when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The ready line: role, transports and address.
    pub fn describe(&self) -> String {
        let transports = match (self.listener.is_some(), self.udp.is_some()) {
            (true, true) => "tcp+udp",
            (true, false) => "tcp",
            _ => "udp",
        };
        format!("dkvs-server ready: master serving {transports} on {}", self.addr)
    }

    /// Serve until the poller fails.
    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Poll(e));
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    UDP => {
                        if let Some(udp) = self.udp.as_mut() {
                            udp.on_readable(&mut self.core);
                        }
                    }
                    Token(t) => self.connection_ready(t - FIRST_CONNECTION),
                }
            }
        }
    }

    fn accept(&mut self) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        loop {
            let (mut stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, usually: the pending client waits for the next attempt.
                    error!("accept failed: {e}");
                    return;
                }
            };
            // Replies are written whole, one write per batch; Nagle would only delay them.
            if let Err(e) = stream.set_nodelay(true) {
                debug!("{peer}: cannot set TCP_NODELAY: {e}");
            }
            let entry = self.connections.vacant_entry();
            let token = Token(entry.key() + FIRST_CONNECTION);
            // Both interests once, so that no re-registration is ever needed.
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                error!("{peer}: cannot register connection: {e}");
                continue;
            }
            debug!("{peer}: connected");
            entry.insert(Connection::new(stream, peer));
            self.core.stats.connections_accepted += 1;
            self.core.stats.connections_open += 1;
        }
    }

    fn connection_ready(&mut self, key: usize) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        if connection.on_ready(&mut self.core) == Liveness::Closed {
            let mut connection = self.connections.remove(key);
            debug!("{}: disconnected", connection.peer());
            if let Err(e) = self.poll.registry().deregister(&mut connection.stream) {
                debug!("{}: deregister failed: {e}", connection.peer());
            }
            self.core.stats.connections_open -= 1;
        }
    }
}

/// Bind TCP and/or UDP on `addr`; for port 0, find one port free for both.
fn bind_sockets(
    addr: SocketAddr,
    config: &Config,
) -> Result<(Option<TcpListener>, Option<UdpSocket>, SocketAddr), ServerError> {
    let bind_err = |transport, addr, source| ServerError::Bind {
        transport,
        addr,
        source,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let listener = if config.tcp {
            Some(TcpListener::bind(addr).map_err(|e| bind_err("TCP", addr, e))?)
        } else {
            None
        };
        let mut bound = addr;
        if let Some(l) = &listener {
            bound = l.local_addr().map_err(|e| bind_err("TCP", addr, e))?;
        }
        if !config.udp {
            return Ok((listener, None, bound));
        }
        match UdpSocket::bind(bound) {
            Ok(socket) => {
                let bound = socket.local_addr().map_err(|e| bind_err("UDP", addr, e))?;
                return Ok((listener, Some(socket), bound));
            }
            // The port TCP got by chance may be taken for UDP: try another.
            Err(e)
                if addr.port() == 0
                    && listener.is_some()
                    && e.kind() == io::ErrorKind::AddrInUse
                    && attempt < PORT_ZERO_ATTEMPTS =>
            {
                info!("port {} is taken for UDP, trying another", bound.port());
            }
            Err(e) => return Err(bind_err("UDP", bound, e)),
        }
    }
}
