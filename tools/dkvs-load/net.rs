//! Opening the run's sockets before any load starts, so that a wrong address, a server that is
//! not running, or a server speaking another protocol is reported at once and clearly.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use ::dkvs::protocol::{Decoded, Opcode, RESPONSE_FLAG, Status, decode, encode_request};

use crate::cli::{Config, Protocol};
use crate::dkvs::MAX_RESPONSE_VALUE_BYTES;
use crate::reactor::auth_request;
use crate::resp::{self, Reply};

/// A connected, still blocking socket, handed to a reactor thread.
#[derive(Debug)]
pub enum Socket {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A UDP socket connected to the server.
    Udp(UdpSocket),
}

/// The first address `host:port` resolves to.
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{host}:{port} resolves to no address"))
}

/// Open every connection of the run, checking on the first that the server answers a PING in
/// the chosen protocol.
pub fn open(cfg: &Config, addr: SocketAddr) -> Result<Vec<Socket>, String> {
    let mut sockets = Vec::with_capacity(cfg.connections);
    for i in 0..cfg.connections {
        let socket = if cfg.udp {
            let socket = open_udp(addr)?;
            if i == 0 {
                probe_udp(&socket, addr, cfg.timeout, cfg.udp_retries)?;
            }
            Socket::Udp(socket)
        } else {
            let mut stream = TcpStream::connect_timeout(&addr, cfg.timeout).map_err(|e| {
                format!(
                    "cannot connect to {addr} ({}): {e}",
                    describe(&e, cfg.timeout)
                )
            })?;
            // Pipelined batches must leave at once, not wait for the previous ACK.
            stream
                .set_nodelay(true)
                .map_err(|e| format!("cannot set TCP_NODELAY on {addr}: {e}"))?;
            if cfg.password.is_some() {
                authenticate(&mut stream, addr, cfg)?;
            }
            if i == 0 {
                probe_tcp(&mut stream, addr, cfg.protocol, cfg.timeout)?;
            }
            Socket::Tcp(stream)
        };
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Why a connect failed, in words.
pub fn describe(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "is the server running on that port?".to_string(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("no answer within {} ms", timeout.as_millis())
        }
        _ => "connection failed".to_string(),
    }
}

/// Split a REDIRECT's value, the master's `host:port` (`[v6]:port` for IPv6), into its parts.
pub fn parse_redirect_target(target: &[u8]) -> Result<(&str, u16), String> {
    let bad = || {
        format!(
            "redirect target '{}' is not host:port",
            String::from_utf8_lossy(target).escape_debug()
        )
    };
    let text = std::str::from_utf8(target).map_err(|_| bad())?;
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host, port))
}

/// A UDP socket bound to an ephemeral local port and connected to `addr`.
pub fn open_udp(addr: SocketAddr) -> Result<UdpSocket, String> {
    let local: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    // Connected, so the kernel filters other senders and reports ICMP unreachable as an error.
    socket
        .connect(addr)
        .map_err(|e| format!("cannot address UDP {addr}: {e}"))?;
    Ok(socket)
}

fn check_pong(header_opcode: u8, status: u8, value: &[u8], addr: SocketAddr) -> Result<(), String> {
    if header_opcode != Opcode::Ping as u8 | RESPONSE_FLAG {
        return Err(format!(
            "{addr} answered PING with opcode 0x{header_opcode:02x}: not a dkvs server?"
        ));
    }
    if status != Status::Ok as u8 {
        return Err(format!(
            "{addr} answered PING with status {}: {}",
            crate::dkvs::status_name(status),
            String::from_utf8_lossy(value)
        ));
    }
    Ok(())
}

/// Send AUTH (`--password-file`) on a new blocking connection and check the answer.
fn authenticate(stream: &mut TcpStream, addr: SocketAddr, cfg: &Config) -> Result<(), String> {
    let io_err = |e: io::Error| format!("AUTH to {addr} failed: {e}");
    stream.set_read_timeout(Some(cfg.timeout)).map_err(io_err)?;
    stream
        .set_write_timeout(Some(cfg.timeout))
        .map_err(io_err)?;
    stream.write_all(&auth_request(cfg)).map_err(io_err)?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    // Bounded: every read adds bytes or fails by the timeout, and a reply is short.
    while buf.len() < 64 * 1024 {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(format!("{addr} closed the connection on AUTH")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        buf.extend_from_slice(&chunk[..n]);
        match cfg.protocol {
            Protocol::Dkvs => match decode(&buf, MAX_RESPONSE_VALUE_BYTES) {
                Ok(Decoded::Frame(frame, _)) if frame.header.status == Status::Ok as u8 => {
                    return Ok(());
                }
                Ok(Decoded::Frame(frame, _)) => {
                    return Err(format!(
                        "{addr} refused AUTH: {}: {}",
                        crate::dkvs::status_name(frame.header.status),
                        String::from_utf8_lossy(frame.value)
                    ));
                }
                Ok(Decoded::Incomplete(_)) => {}
                Err(e) => return Err(format!("{addr} answered AUTH with a bad frame ({e})")),
            },
            Protocol::Resp => match resp::parse(&buf) {
                Ok(Some((Reply::Simple(b"OK"), _))) => return Ok(()),
                Ok(Some((Reply::Error(msg), _))) => {
                    return Err(format!(
                        "{addr} refused AUTH: {}",
                        String::from_utf8_lossy(msg)
                    ));
                }
                Ok(Some((other, _))) => return Err(format!("{addr} answered AUTH with {other:?}")),
                Ok(None) => {}
                Err(e) => return Err(format!("{addr} answered AUTH with bad RESP ({e})")),
            },
        }
    }
    Err(format!("{addr} sent no valid AUTH reply"))
}

fn probe_tcp(
    stream: &mut TcpStream,
    addr: SocketAddr,
    protocol: Protocol,
    timeout: Duration,
) -> Result<(), String> {
    let io_err = |e: io::Error| format!("PING to {addr} failed: {e}");
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut request = Vec::new();
    match protocol {
        Protocol::Dkvs => encode_request(&mut request, Opcode::Ping, 1, &[], &[]),
        Protocol::Resp => request.extend_from_slice(b"*1\r\n$4\r\nPING\r\n"),
    }
    stream.write_all(&request).map_err(io_err)?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Bounded: each read either adds bytes up to the buffer size or fails by the timeout.
    loop {
        if len == buf.len() || Instant::now() > deadline {
            return Err(format!(
                "{addr} sent no valid PING reply (wrong --protocol?)"
            ));
        }
        let n = match stream.read(&mut buf[len..]) {
            Ok(0) => {
                return Err(format!(
                    "{addr} closed the connection on PING (wrong --protocol?)"
                ));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "{addr} did not answer PING within {} ms (wrong --protocol?)",
                    timeout.as_millis()
                ));
            }
            Err(e) => return Err(io_err(e)),
        };
        len += n;
        match protocol {
            Protocol::Dkvs => match decode(&buf[..len], MAX_RESPONSE_VALUE_BYTES) {
                Ok(Decoded::Frame(frame, _)) => {
                    return check_pong(frame.header.opcode, frame.header.status, frame.value, addr);
                }
                Ok(Decoded::Incomplete(_)) => {}
                Err(e) => {
                    return Err(format!(
                        "{addr} answered PING with something that is not a dkvs frame ({e}); \
                         is it a Redis server (--protocol resp)?"
                    ));
                }
            },
            Protocol::Resp => match resp::parse(&buf[..len]) {
                Ok(Some((Reply::Simple(b"PONG"), _))) => return Ok(()),
                Ok(Some((Reply::Error(msg), _))) => {
                    return Err(format!(
                        "{addr} refused PING: {}",
                        String::from_utf8_lossy(msg)
                    ));
                }
                Ok(Some((other, _))) => {
                    return Err(format!("{addr} answered PING with {other:?}"));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(format!(
                        "{addr} does not speak RESP ({e}); is it a dkvs server (--protocol dkvs)?"
                    ));
                }
            },
        }
    }
}

fn probe_udp(
    socket: &UdpSocket,
    addr: SocketAddr,
    timeout: Duration,
    retries: u32,
) -> Result<(), String> {
    let attempt_timeout = (timeout / (retries + 1)).max(Duration::from_millis(1));
    let io_err = |e: io::Error| format!("UDP PING to {addr} failed: {e}");
    socket
        .set_read_timeout(Some(attempt_timeout))
        .map_err(io_err)?;
    let mut request = Vec::new();
    encode_request(&mut request, Opcode::Ping, 1, &[], &[]);
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..=retries {
        socket.send(&request).map_err(io_err)?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                return match decode(&buf[..n], MAX_RESPONSE_VALUE_BYTES) {
                    Ok(Decoded::Frame(frame, _)) => {
                        check_pong(frame.header.opcode, frame.header.status, frame.value, addr)
                    }
                    _ => Err(format!(
                        "{addr} answered a UDP PING with a malformed datagram"
                    )),
                };
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(format!(
                    "nothing listens on UDP {addr} (is the server running with UDP enabled?)"
                ));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Err(format!(
        "no reply to UDP PING from {addr} within {} ms",
        timeout.as_millis()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_targets_parse() {
        assert_eq!(
            parse_redirect_target(b"127.0.0.1:9099"),
            Ok(("127.0.0.1", 9099))
        );
        assert_eq!(
            parse_redirect_target(b"db-master.local:7"),
            Ok(("db-master.local", 7))
        );
        assert_eq!(parse_redirect_target(b"[::1]:9099"), Ok(("::1", 9099)));
        for bad in [
            &b""[..],
            b"no-port",
            b"host:",
            b":9099",
            b"host:0",
            b"host:65536",
            b"host:port",
            b"\xff\xfe:1",
        ] {
            let Err(msg) = parse_redirect_target(bad) else {
                panic!("{bad:?} should not parse")
            };
            assert!(msg.contains("is not host:port"), "{msg}");
        }
    }
}
