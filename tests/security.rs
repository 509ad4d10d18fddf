//! Hostile input against the real server (issue 10): UDP reflection and
//! amplification, slowloris, connection caps and timeouts, peer frames from
//! strangers, flag bounds. Every test here failed on the code before it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ServerProcess, Stats, bin, read_response, wait_until};
use dkvs::client::{Client, ClientConfig, ClientError, Transport};
use dkvs::protocol::peer::PeerMessage;
use dkvs::protocol::{
    HEADER_LEN, Opcode, RESPONSE_FLAG, Response, Status, decode_datagram, encode_request,
};

fn request(op: Opcode, id: u32, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(&mut out, op, id, key, value);
    out
}

fn udp_to(server: &ServerProcess, local: &str) -> UdpSocket {
    let socket = UdpSocket::bind(local).expect("bind");
    socket.connect(("127.0.0.1", server.port)).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    socket
}

/// Send one datagram and return the reply's bytes.
fn udp_exchange_raw(socket: &UdpSocket, datagram: &[u8]) -> Vec<u8> {
    socket.send(datagram).expect("send");
    let mut buf = vec![0u8; 70_000];
    let len = socket.recv(&mut buf).expect("reply");
    buf.truncate(len);
    buf
}

fn parse(reply: &[u8]) -> Response {
    Response::from_frame(&decode_datagram(reply, usize::MAX).expect("frame")).expect("response")
}

/// Whether anything arrives on `socket` within `wait`.
fn silent_for(socket: &UdpSocket, wait: Duration) -> bool {
    socket.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 2048];
    let silent = socket.recv(&mut buf).is_err();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    silent
}

fn tcp(server: &ServerProcess) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    stream
}

/// Assert the server closed the stream within the read timeout (EOF or reset);
/// a timeout means it kept the connection open.
fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue, // replies sent before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: expected the server to close the connection: {e}"),
        }
    }
}

fn ping_over_tcp(server: &ServerProcess) -> Duration {
    let mut client = server.client(Transport::Tcp);
    let start = Instant::now();
    client.ping().expect("ping");
    start.elapsed()
}

#[test]
fn datagrams_that_are_not_requests_get_no_answer() {
    let server = ServerProcess::start(&[]);
    let socket = udp_to(&server, "127.0.0.1:0");
    // A PONG, as a server tricked into answering another (or itself) would send it.
    let mut pong = Vec::new();
    dkvs::protocol::encode_response(&mut pong, Opcode::Ping as u8, Status::Ok, 7, 0, b"PONG");
    let mut error_reply = Vec::new();
    dkvs::protocol::encode_response(&mut error_reply, 0, Status::Malformed, 7, 0, b"no");
    let mut as_response = request(Opcode::Get, 8, b"k", b"");
    as_response[2] |= RESPONSE_FLAG;
    for datagram in [
        &pong[..],
        &error_reply[..],
        &as_response[..],
        b"hello there, this is not a frame",
        &[0xDB][..],
        &request(Opcode::Ping, 9, b"", b"")[..HEADER_LEN - 1],
    ] {
        socket.send(datagram).expect("send");
    }
    assert!(
        silent_for(&socket, Duration::from_millis(500)),
        "a datagram that is not a request was answered"
    );
    // The server is not busy answering itself: TCP and UDP requests are answered.
    let latency = ping_over_tcp(&server);
    eprintln!("TCP PING after the forged responses: {latency:?}");
    let reply = parse(&udp_exchange_raw(
        &socket,
        &request(Opcode::Ping, 10, b"", b""),
    ));
    assert_eq!((reply.request_id, reply.status), (10, Ok(Status::Ok)));
    let stats = server.stats();
    assert_eq!(stats.num("udp_ignored"), 6, "{}", stats.text);
    assert_eq!(stats.num("udp_replies"), 1, "only the PING was answered");
    assert_eq!(stats.num("udp_datagrams"), 7);
}

#[test]
fn udp_replies_to_limited_sources_are_at_most_three_times_the_request() {
    let server = ServerProcess::start(&["--udp-limits", "always"]);
    let value = vec![b'v'; 1000];
    server
        .client(Transport::Tcp)
        .put(b"big", &value)
        .expect("put");
    let socket = udp_to(&server, "127.0.0.1:0");
    let get = request(Opcode::Get, 1, b"big", b"");
    let reply = udp_exchange_raw(&socket, &get);
    assert!(reply.len() <= 3 * get.len(), "{} bytes", reply.len());
    let parsed = parse(&reply);
    assert_eq!((parsed.request_id, parsed.status), (1, Ok(Status::UseTcp)));
    assert!(parsed.message().contains("use TCP"), "{}", parsed.message());
    // STATS text is longer than 72 bytes too; PING fits.
    let stats_request = request(Opcode::Stats, 2, b"", b"");
    let reply = udp_exchange_raw(&socket, &stats_request);
    assert!(reply.len() <= 3 * HEADER_LEN);
    assert_eq!(parse(&reply).status, Ok(Status::UseTcp));
    let reply = parse(&udp_exchange_raw(
        &socket,
        &request(Opcode::Ping, 3, b"", b""),
    ));
    assert_eq!(
        (reply.status, &reply.value[..]),
        (Ok(Status::Ok), &b"PONG"[..])
    );
    // An error whose message is longer than the limit is cut, not dropped.
    let mut bad_version = request(Opcode::Get, 4, b"k", b"");
    bad_version[1] = 9;
    let reply = udp_exchange_raw(&socket, &bad_version);
    assert!(reply.len() <= 3 * bad_version.len());
    let parsed = parse(&reply);
    assert_eq!(parsed.status, Ok(Status::UnsupportedVersion));
    assert!(
        parsed
            .message()
            .starts_with("unsupported protocol version 9")
    );
    // The client library and the CLI fall back to TCP on their own.
    let got = server.client(Transport::Udp).get(b"big").expect("get");
    assert_eq!(got.expect("present").value, value);
    let out = Command::new(bin("dkvs-client"))
        .args(["-p", &server.port.to_string(), "-u", "get", "big"])
        .output()
        .expect("run client");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout.len(), 1001, "the value and a newline");
    let mut no_fallback = Client::connect(
        "127.0.0.1",
        server.port,
        ClientConfig {
            transport: Transport::Udp,
            tcp_fallback: false,
            ..ClientConfig::default()
        },
    )
    .expect("connect");
    match no_fallback.get(b"big") {
        Err(ClientError::Server { status, .. }) => assert_eq!(status, Ok(Status::UseTcp)),
        other => panic!("expected USE_TCP, got {other:?}"),
    }
    let stats = server.stats();
    assert!(stats.num("udp_replies_limited") >= 4, "{}", stats.text);
}

#[test]
fn loopback_sources_are_not_limited_by_default() {
    let server = ServerProcess::start(&[]);
    let value = vec![b'v'; 1000];
    server
        .client(Transport::Tcp)
        .put(b"big", &value)
        .expect("put");
    let socket = udp_to(&server, "127.0.0.1:0");
    let reply = parse(&udp_exchange_raw(
        &socket,
        &request(Opcode::Get, 1, b"big", b""),
    ));
    assert_eq!((reply.status, reply.value), (Ok(Status::Ok), value));
}

#[test]
fn a_flooding_udp_source_is_rate_limited() {
    let server = ServerProcess::start(&["--udp-limits", "always", "--udp-rate-limit", "5"]);
    let socket = udp_to(&server, "127.0.0.1:0");
    for i in 0..50 {
        socket
            .send(&request(Opcode::Ping, i, b"", b""))
            .expect("send");
    }
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    let mut replies = 0;
    while socket.recv(&mut buf).is_ok() {
        replies += 1;
    }
    // A burst of 5, plus whatever refilled (5 per second) while the rest arrived.
    assert!((1..=10).contains(&replies), "{replies} replies");
    let stats = server.stats();
    assert!(stats.num("udp_rate_limited") >= 40, "{}", stats.text);
    // Another source is not affected.
    let other = udp_to(&server, "127.0.0.2:0");
    let reply = parse(&udp_exchange_raw(
        &other,
        &request(Opcode::Ping, 99, b"", b""),
    ));
    assert_eq!(reply.request_id, 99);
}

#[test]
fn one_udp_source_cannot_flush_the_retry_cache_of_another() {
    let server = ServerProcess::start(&[]);
    let victim = udp_to(&server, "127.0.0.2:0");
    let put = request(Opcode::Put, 4242, b"victim", b"1");
    let first = parse(&udp_exchange_raw(&victim, &put));
    assert_eq!(first.status, Ok(Status::Ok));
    // More writes than the whole cache holds, all from one other source.
    let flood = udp_to(&server, "127.0.0.3:0");
    for i in 0..17_000u32 {
        let reply = parse(&udp_exchange_raw(
            &flood,
            &request(Opcode::Put, i, b"f", b"x"),
        ));
        assert_eq!(reply.request_id, i);
    }
    let retry = parse(&udp_exchange_raw(&victim, &put));
    assert_eq!(
        retry, first,
        "the retry is answered from the cache, not applied again"
    );
    assert_eq!(server.stats().num("udp_retries_deduplicated"), 1);
}

#[test]
fn an_ipv6_datagram_over_the_udp_frame_limit_is_told_to_use_tcp() {
    // Only IPv6 carries datagrams over 65507 bytes; a host without ::1 cannot test it.
    let Ok(socket) = UdpSocket::bind("[::1]:0") else {
        eprintln!("skipped: this host has no IPv6 loopback (::1)");
        return;
    };
    let server = ServerProcess::start(&["-s", "::1"]);
    socket.connect(("::1", server.port)).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for frame_len in [65_508usize, 65_520, 65_527] {
        let value = vec![b'v'; frame_len - HEADER_LEN - 1];
        let datagram = request(Opcode::Put, 5, b"k", &value);
        assert_eq!(datagram.len(), frame_len);
        let reply = parse(&udp_exchange_raw(&socket, &datagram));
        assert_eq!(
            reply.status,
            Ok(Status::UseTcp),
            "{frame_len}: {}",
            reply.message()
        );
        assert!(reply.message().contains("65507"), "{}", reply.message());
    }
    // The largest frame is still served.
    let value = vec![b'v'; 65_507 - HEADER_LEN - 1];
    let reply = parse(&udp_exchange_raw(
        &socket,
        &request(Opcode::Put, 6, b"k", &value),
    ));
    assert_eq!(reply.status, Ok(Status::Ok));
}

#[test]
fn slowloris_headers_do_not_grow_the_server_and_pings_are_answered() {
    let server = ServerProcess::start(&[]);
    let before = server.rss_kib();
    // Each connection declares a PUT of a 1 MiB value (the limit) and sends 20 KiB of it:
    // more than the resting 4 KiB buffer, so the buffer must grow.
    let mut header = request(Opcode::Put, 1, b"k", b"");
    header[20..24].copy_from_slice(&(1u32 << 20).to_be_bytes());
    let connections: Vec<TcpStream> = (0..500)
        .map(|_| {
            let mut stream = tcp(&server);
            stream.write_all(&header).expect("header");
            stream.write_all(b"k").expect("key");
            stream
                .write_all(&[b'v'; 20 << 10])
                .expect("20 KiB of the value");
            stream
        })
        .collect();
    wait_until(
        "the server holds every connection",
        Duration::from_secs(30),
        || server.stats().num("connections_open") >= 501,
    );
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        worst = worst.max(ping_over_tcp(&server));
    }
    let after = server.rss_kib();
    let growth_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "slowloris: 500 connections, RSS {before} KiB -> {after} KiB (+{growth_mib} MiB); \
         worst of 20 PINGs on new connections {worst:?}"
    );
    assert!(growth_mib < 64, "RSS grew by {growth_mib} MiB");
    // Each buffer grew by halves (4 -> 6 -> 9 -> 13.5 -> 20.25 KiB) for the bytes that came,
    // not to 1 MiB: at most 1.5 times what arrived.
    let held = server.stats().num("partial_frame_bytes");
    assert!(
        held <= 500 * (30 << 10),
        "{held} bytes held in partial frames"
    );
    drop(connections);
}

#[test]
fn idle_connections_hold_little_memory() {
    // Issue 10 asks for 10,000 idle connections in <= 100 MB (tools/bench-conns.py
    // measures that: ~48 MB). At a fifth of the scale: an idle connection holds its
    // 4 KiB resting input buffer and no output buffer, ~4.5 KiB in all, so 2,000
    // take ~9 MiB. 20 MiB fails if the resting buffers grow to 16 KiB, or at the
    // server before ab82c35 (a zeroed 16 KiB input buffer and a 16 KiB output
    // reservation each: ~19.5 KiB, 193 MB at 10,000, ~39 MiB here).
    let server = ServerProcess::start(&[]);
    let before = server.rss_kib();
    let connections: Vec<TcpStream> = (0..2000).map(|_| tcp(&server)).collect();
    wait_until(
        "the server holds every connection",
        Duration::from_secs(60),
        || server.stats().num("connections_open") >= 2001,
    );
    let after = server.rss_kib();
    let growth_mib = after.saturating_sub(before) / 1024;
    eprintln!("idle: 2000 connections, RSS {before} KiB -> {after} KiB (+{growth_mib} MiB)");
    assert!(growth_mib < 20, "RSS grew by {growth_mib} MiB");
    drop(connections);
}

#[test]
fn partial_frames_are_charged_to_one_server_wide_budget() {
    let server = ServerProcess::start(&["--partial-frame-budget-mb", "1"]);
    let partial_put = |stream: &mut TcpStream, value_len: u32, sent: usize| {
        let mut header = request(Opcode::Put, 1, b"k", b"");
        header[20..24].copy_from_slice(&value_len.to_be_bytes());
        stream.write_all(&header).expect("header");
        stream.write_all(b"k").expect("key");
        stream
            .write_all(&vec![b'v'; sent])
            .expect("part of the value");
    };
    let mut first = tcp(&server);
    partial_put(&mut first, 600_000, 590_000);
    wait_until(
        "the first partial frame is held",
        Duration::from_secs(20),
        || {
            // The buffer grows with what arrived, up to the frame: at most 600025 bytes.
            let held = server.stats().num("partial_frame_bytes");
            held > 500_000 && held <= 600_025
        },
    );
    // A second one does not fit in what is left of the 1 MiB: it is closed.
    let mut second = tcp(&server);
    partial_put(&mut second, 600_000, 590_000);
    assert_closed(&mut second, "a partial frame beyond the budget");
    assert_eq!(server.stats().num("partial_frame_refusals"), 1);
    // The first completes and is served; its charge is given back.
    first.write_all(&vec![b'v'; 10_000]).expect("the rest");
    assert_eq!(read_response(&mut first).status, Ok(Status::Ok));
    drop(first);
    wait_until("the budget is given back", Duration::from_secs(20), || {
        server.stats().num("partial_frame_bytes") == 0
    });
}

#[test]
fn connections_beyond_the_cap_are_accepted_and_closed() {
    let server = ServerProcess::start(&["--max-connections", "3"]);
    let mut held: Vec<Client> = (0..3).map(|_| server.client(Transport::Tcp)).collect();
    for client in &mut held {
        client.ping().expect("ping within the cap");
    }
    let mut extra = tcp(&server);
    let _ = extra.write_all(&request(Opcode::Ping, 1, b"", b""));
    assert_closed(&mut extra, "a connection beyond --max-connections");
    drop(held.pop());
    wait_for_a_free_slot(&server);
}

/// Wait until a new client is served again (a slot was freed) and the
/// server has counted the refusal before it.
fn wait_for_a_free_slot(server: &ServerProcess) {
    wait_until("a slot is free again", Duration::from_secs(20), || {
        Client::connect(
            "127.0.0.1",
            server.port,
            ClientConfig {
                timeout: Duration::from_secs(2),
                ..ClientConfig::default()
            },
        )
        .and_then(|mut c| c.stats())
        .is_ok_and(|text| Stats::parse(text).num("connections_refused") >= 1)
    });
}

/// A connection that was accepted and served: it answers a PING.
fn served(server: &ServerProcess) -> TcpStream {
    let mut stream = tcp(server);
    stream
        .write_all(&request(Opcode::Ping, 1, b"", b""))
        .expect("ping");
    assert_eq!(read_response(&mut stream).status, Ok(Status::Ok));
    stream
}

#[test]
fn the_server_raises_a_low_descriptor_limit_for_its_connection_cap() {
    // A soft limit of 256 (1024 is common) with room above it: the server raises
    // it for --max-connections 600. Before, accept failed with EMFILE near 250
    // and the later connections waited in the backlog, unanswered.
    let server =
        ServerProcess::start_with_descriptor_limit(256, 1024, &["--max-connections", "600"]);
    let held: Vec<TcpStream> = (0..400).map(|_| served(&server)).collect();
    assert!(server.stats().num("connections_open") >= 400);
    assert_eq!(server.stats().num("connections_refused"), 0);
    drop(held);
}

#[test]
fn a_connection_cap_beyond_the_descriptor_limit_is_lowered_to_fit() {
    // The hard limit is 256 too: the default cap of 10000 cannot be reached, so the
    // server keeps 128 descriptors for its log and links and serves 128 clients;
    // the next one is refused as beyond --max-connections, not left in the backlog.
    let server = ServerProcess::start_with_descriptor_limit(256, 256, &[]);
    let mut held: Vec<TcpStream> = (0..128).map(|_| served(&server)).collect();
    let mut extra = tcp(&server);
    let _ = extra.write_all(&request(Opcode::Ping, 1, b"", b""));
    assert_closed(
        &mut extra,
        "a connection beyond what the descriptor limit allows",
    );
    drop(held.pop());
    wait_for_a_free_slot(&server);
    drop(held);
}

#[test]
fn a_frame_that_never_completes_is_closed_after_the_frame_timeout() {
    let server = ServerProcess::start(&["--frame-timeout-ms", "300"]);
    let mut slow = tcp(&server);
    let bytes = request(Opcode::Put, 1, b"key", b"a value that never fully arrives");
    slow.write_all(&bytes[..bytes.len() - 5]).expect("write");
    // A client that keeps completing frames is not affected.
    let mut steady = server.client(Transport::Tcp);
    for _ in 0..10 {
        steady.ping().expect("steady ping");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_closed(&mut slow, "a frame begun and never finished");
    steady.ping().expect("steady ping after the sweep");
    assert_eq!(server.stats().num("connections_closed_slow_frame"), 1);
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let server = ServerProcess::start(&["--timeout", "1"]);
    let mut idle = tcp(&server);
    idle.write_all(&request(Opcode::Ping, 1, b"", b""))
        .expect("ping");
    assert_eq!(read_response(&mut idle).status, Ok(Status::Ok));
    let start = Instant::now();
    assert_closed(&mut idle, "an idle connection");
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert!(server.stats().num("connections_closed_idle") >= 1);
    // Without --timeout nothing idle is closed.
    let server = ServerProcess::start(&[]);
    let mut idle = tcp(&server);
    idle.set_read_timeout(Some(Duration::from_millis(2500)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let err = idle.read(&mut byte).expect_err("nothing arrives");
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
}

fn peer_bytes(msg: &PeerMessage) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    out
}

fn register(addr: &str) -> Vec<u8> {
    peer_bytes(&PeerMessage::Register {
        client_addr: addr.to_string(),
        last_applied_seq: 0,
        history_id: 0,
        protocol_version: dkvs::protocol::peer::PEER_PROTOCOL_VERSION,
        node_id: 0,
        may_discard_data: false,
        epoch: 0,
    })
}

/// A header of `opcode` declaring a payload of `len` bytes.
fn peer_header(opcode: u8, len: u32) -> Vec<u8> {
    let mut header = vec![0u8; HEADER_LEN];
    header[0] = 0xDB;
    header[1] = 1;
    header[2] = opcode;
    header[20..24].copy_from_slice(&len.to_be_bytes());
    header
}

#[test]
fn a_fake_slave_is_refused_from_the_header_of_a_big_or_misdirected_frame() {
    use dkvs::protocol::peer::opcode;
    let master = ServerProcess::start(&[]);
    // As the first frame: a PREPARE (a master's message) declaring 1 MiB.
    let mut stream = tcp(&master);
    stream
        .write_all(&peer_header(opcode::PREPARE, 1 << 20))
        .expect("header");
    stream.write_all(&[0u8; 100]).expect("a little payload");
    assert_closed(&mut stream, "a PREPARE sent to a master");
    // A REGISTER larger than any a slave can send.
    let mut stream = tcp(&master);
    stream
        .write_all(&peer_header(opcode::REGISTER, 70_000))
        .expect("header");
    assert_closed(&mut stream, "a 70000-byte REGISTER");
    // Registered first, then a big PREPARE.
    let mut stream = tcp(&master);
    stream
        .write_all(&register("127.0.0.1:1"))
        .expect("register");
    stream
        .write_all(&peer_header(opcode::PREPARE, 2 << 20))
        .expect("header");
    stream.write_all(&[0u8; 100]).expect("a little payload");
    assert_closed(&mut stream, "a registered slave's PREPARE");
    let stats = master.stats();
    assert_eq!(stats.num("partial_frame_bytes"), 0);
    master
        .client(Transport::Tcp)
        .put(b"k", b"v")
        .expect("still serves writes");
}

#[test]
fn a_peer_frame_that_never_completes_frees_its_link() {
    use dkvs::protocol::peer::opcode;
    let master = ServerProcess::start(&["--frame-timeout-ms", "300"]);
    let mut stream = tcp(&master);
    stream
        .write_all(&peer_header(opcode::REGISTER, 40))
        .expect("header");
    stream
        .write_all(&[0, 2, 0])
        .expect("three bytes of the payload");
    assert_closed(&mut stream, "a REGISTER that never completes");
    // A real slave still registers and follows.
    let slave = ServerProcess::start_slave(&master, &[]);
    wait_until("the slave is in sync", Duration::from_secs(30), || {
        master.stats().num("slaves_in_sync") == 1
    });
    drop(slave);
}

#[test]
fn a_slave_address_with_line_breaks_cannot_forge_stats_lines() {
    let master = ServerProcess::start(&[]);
    let mut stream = tcp(&master);
    stream
        .write_all(&register("x\nrole slave\nslaves 99\nstate=in-sync"))
        .expect("register");
    wait_until("the fake slave is listed", Duration::from_secs(20), || {
        master.stats().num("slaves") == 1
    });
    let stats = master.stats();
    assert_eq!(stats.get("role"), "master", "{}", stats.text);
    assert_eq!(stats.num("slaves"), 1, "{}", stats.text);
    let line = stats.get("slave0");
    assert!(
        line.starts_with("addr=x\\x0arole\\x20slave\\x0aslaves\\x2099\\x0astate=in-sync state="),
        "{line}"
    );
    assert_eq!(
        stats
            .text
            .lines()
            .filter(|l| l.starts_with("role "))
            .count(),
        1
    );
    drop(stream);
}

#[test]
fn a_slave_with_a_smaller_value_limit_follows_a_master_with_larger_values() {
    let master = ServerProcess::start(&["--max-value-size", "33554432"]);
    let slave = ServerProcess::start_slave(&master, &[]);
    wait_until("the slave is in sync", Duration::from_secs(30), || {
        master.stats().num("slaves_in_sync") == 1
    });
    let value: Vec<u8> = (0..20 << 20).map(|i| (i % 251) as u8).collect();
    master
        .client(Transport::Tcp)
        .put(b"huge", &value)
        .expect("20 MiB put");
    let mut reader = slave.client(Transport::Tcp);
    wait_until(
        "the slave has the 20 MiB value",
        Duration::from_secs(60),
        || {
            reader
                .get(b"huge")
                .ok()
                .flatten()
                .is_some_and(|got| got.value == value)
        },
    );
    // A slave that fell behind the 20 MiB prepare on a loaded machine may
    // serve the value from a snapshot before the master counts it in sync
    // again: what must hold is that it gets there and stays, not an endless
    // resync.
    wait_until(
        "the slave is in sync again",
        Duration::from_secs(30),
        || master.stats().num("slaves_in_sync") == 1,
    );
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let stats = master.stats();
        assert_eq!(stats.num("slaves_in_sync"), 1, "stays in sync");
        assert_eq!(stats.num("snapshot_receivers"), 0, "no resync");
    }
}

#[test]
fn numeric_flags_are_bounded() {
    for args in [
        &["--tpc-timeout-ms", "60001"][..],
        &["--tpc-timeout-ms", "18446744073709551615"],
        &["--min-slaves", "65"],
        &["--repl-backlog-mb", "4097"],
        &["--max-value-size", "536870913"],
        &["--max-connections", "0"],
        &["--frame-timeout-ms", "99"],
        &["--timeout", "2592001"],
        &["--udp-rate-limit", "10000001"],
        &["--udp-limits", "sometimes"],
        &["--partial-frame-budget-mb", "0"],
        &["--qport", "0", "-m", "127.0.0.1"],
        &["--snapshot-log-mb", "1048577"],
        &[
            "--lease-ttl-ms",
            "60001",
            "--etcd",
            "http://127.0.0.1:1",
            "--cluster",
            "c",
        ],
        &["--slave-read-lease-ms", "9"],
        &["--max-slave-lag-ms", "60001"],
    ] {
        let mut child = Command::new(bin("dkvs-server"))
            .args(["-p", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dkvs-server {args:?} started instead of refusing the flag");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read stderr");
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(args[0]), "{args:?}: {err}");
    }
}

/// A secret file in `dir` holding `secret`.
fn secret_file(dir: &std::path::Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("write the secret file");
    path.display().to_string()
}

#[test]
fn with_a_cluster_secret_only_a_slave_that_knows_it_replicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = secret_file(dir.path(), "good", "a cluster secret of some length");
    let bad = secret_file(dir.path(), "bad", "not the cluster secret, though long");
    let master = ServerProcess::start(&["--cluster-secret-file", &good]);
    let slave = ServerProcess::start_slave(&master, &["--cluster-secret-file", &good]);
    wait_until(
        "the slave with the secret in sync",
        Duration::from_secs(20),
        || {
            master
                .stats()
                .slave(&slave.addr())
                .is_some_and(|s| s.state == "in-sync")
        },
    );
    master
        .client(Transport::Tcp)
        .put(b"k", b"v")
        .expect("a replicated write");
    wait_until("the write on the slave", Duration::from_secs(10), || {
        slave
            .client(Transport::Tcp)
            .get(b"k")
            .ok()
            .flatten()
            .is_some_and(|v| v.value == b"v")
    });
    // A slave with another secret never registers, and the master keeps serving.
    let impostor = ServerProcess::start_slave(&master, &["--cluster-secret-file", &bad]);
    let mut without = ServerProcess::start_slave(&master, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    let stats = master.stats();
    assert!(stats.slave(&impostor.addr()).is_none(), "{}", stats.text);
    assert!(stats.slave(&without.addr()).is_none(), "{}", stats.text);
    assert_eq!(stats.num("slaves"), 1, "{}", stats.text);
    master
        .client(Transport::Tcp)
        .put(b"k2", b"v2")
        .expect("writes go on");
    without.kill9();
    // A bare REGISTER, the fake slave of before, is closed at once.
    let mut stream = TcpStream::connect(("127.0.0.1", master.port)).expect("connect");
    stream
        .write_all(&register("127.0.0.1:1"))
        .expect("send REGISTER");
    assert_closed(&mut stream, "an unauthenticated REGISTER");
    assert_eq!(master.stats().num("slaves"), 1);
}

#[test]
fn a_short_or_missing_cluster_secret_file_stops_the_server_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let short = secret_file(dir.path(), "short", "too short");
    for (file, why) in [
        (short.as_str(), "at least 16"),
        ("/nonexistent/secret", "No such file"),
    ] {
        let out = Command::new(bin("dkvs-server"))
            .args(["-p", "0", "-d"])
            .arg(dir.path().join("data"))
            .args(["--cluster-secret-file", file])
            .stdin(Stdio::null())
            .output()
            .expect("run dkvs-server");
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "{stderr}");
    }
}

/// Run `dkvs-server -p 0 ARGS` expecting it to refuse its flags: exit 2 and
/// standard error containing each of `needles`.
fn assert_flag_refused(args: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin("dkvs-server"))
        .args(["-p", "0", "-d"])
        .arg(dir.path().join("data"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dkvs-server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn an_announced_address_must_name_one_host_and_port() {
    for (addr, why) in [
        ("0.0.0.0:9100", "unspecified"),
        ("[::]:9100", "unspecified"),
        ("10.0.0.7", "no port"),
        ("10.0.0.7:0", "port 0"),
        ("10.0.0.7:70000", "not a port"),
        ("::1:9100", "brackets"),
        ("x\nrole slave:9100", "not a host name"),
    ] {
        assert_flag_refused(
            &["-m", "127.0.0.1", "-q", "1", "--announce-addr", addr],
            &["--announce-addr", why],
        );
    }
    // Nodes read a leader's address from etcd without a DNS lookup.
    assert_flag_refused(
        &[
            "--etcd",
            "http://127.0.0.1:1",
            "--cluster",
            "c",
            "--announce-addr",
            "db.example:9100",
        ],
        &["--announce-addr", "IP address"],
    );
}

#[test]
fn two_slaves_announcing_one_address_are_told_apart_by_node_id() {
    // Issue 10 item 4: two slaves both announcing the same address (as two
    // hosts started with `-s 0.0.0.0 -p 9100` did) evicted each other forever.
    let master = ServerProcess::start(&[]);
    let same = ["--announce-addr", "10.9.9.9:9100"];
    let a = ServerProcess::start_slave(&master, &same);
    let b = ServerProcess::start_slave(&master, &same);
    wait_until("both slaves in sync", Duration::from_secs(30), || {
        master.stats().num("slaves_in_sync") == 2
    });
    master
        .client(Transport::Tcp)
        .put(b"k", b"v")
        .expect("a write both vote on");
    // Long enough for many rounds of the old re-registration loop (40 a second).
    std::thread::sleep(Duration::from_millis(1500));
    let stats = master.stats();
    assert_eq!(stats.num("slaves"), 2, "{}", stats.text);
    assert_eq!(stats.num("slaves_in_sync"), 2, "{}", stats.text);
    for line in stats.slaves() {
        assert_eq!(line.addr, "10.9.9.9:9100", "{}", stats.text);
        assert_eq!(line.state, "in-sync", "{}", stats.text);
    }
    for slave in [&a, &b] {
        let value = slave
            .own_reads_client(Transport::Tcp)
            .get(b"k")
            .expect("read");
        assert_eq!(value.map(|v| v.value), Some(b"v".to_vec()));
    }
}

#[test]
fn a_slave_bound_to_every_address_announces_its_end_of_the_link() {
    let master = ServerProcess::start(&[]);
    let slave = ServerProcess::start_slave(&master, &["-s", "0.0.0.0"]);
    // The link to 127.0.0.1 starts from 127.0.0.1: that, with the slave's port.
    let expected = format!("127.0.0.1:{}", slave.port);
    wait_until("the slave in sync", Duration::from_secs(30), || {
        master
            .stats()
            .slave(&expected)
            .is_some_and(|s| s.state == "in-sync")
    });
    let stats = master.stats();
    assert!(!stats.text.contains("0.0.0.0"), "{}", stats.text);
}

#[test]
fn a_master_restarted_without_its_data_shows_no_stale_applied_for_its_slaves() {
    // Issue 10 item 12: the slave's position in the master's earlier history
    // stayed in STATS as its `applied` (with lag 0) after the restart.
    let mut master = ServerProcess::start(&[]);
    let slave = ServerProcess::start_slave(&master, &[]);
    wait_until("the slave in sync", Duration::from_secs(30), || {
        master.stats().num("slaves_in_sync") == 1
    });
    let mut client = master.client(Transport::Tcp);
    for i in 0..5u8 {
        client.put(&[b'k', i], b"v").expect("write");
    }
    drop(client);
    wait_until("the slave applied 5", Duration::from_secs(10), || {
        master
            .stats()
            .slave(&slave.addr())
            .is_some_and(|s| s.applied == 5)
    });
    master.restart_with(false);
    assert_eq!(
        master.port,
        slave
            .stats()
            .get("master")
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0),
        "the master came back on its port"
    );
    // The slave holds data of another history: kept, shown diverged, at 0 of ours.
    wait_until(
        "the slave registered again",
        Duration::from_secs(20),
        || master.stats().slave(&slave.addr()).is_some(),
    );
    let stats = master.stats();
    let line = stats.slave(&slave.addr()).expect("listed");
    assert_eq!(line.state, "diverged", "{}", stats.text);
    assert_eq!(line.applied, 0, "{}", stats.text);
}
