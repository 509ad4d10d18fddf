//! The real `dkvs-server` driven over TCP and UDP by the real client library and raw sockets.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use common::{ServerProcess, read_response};
use dkvs::client::{ClientError, Transport};
use dkvs::protocol::{
    HEADER_LEN, Opcode, RESPONSE_FLAG, Response, Status, decode_datagram, encode_request,
};

fn request(op: Opcode, id: u32, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(&mut out, op, id, key, value);
    out
}

fn tcp(server: &ServerProcess) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

/// Assert the server closed the stream (EOF, or a reset after unread input).
fn assert_closed(stream: &mut TcpStream) {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("expected the connection to be closed, got more data"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

fn udp(server: &ServerProcess) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(("127.0.0.1", server.port)).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    socket
}

fn udp_exchange(socket: &UdpSocket, datagram: &[u8]) -> Response {
    socket.send(datagram).expect("send");
    let mut buf = vec![0u8; 70_000];
    let len = socket.recv(&mut buf).expect("reply");
    let frame = decode_datagram(&buf[..len], usize::MAX).expect("reply frame");
    Response::from_frame(&frame).expect("response")
}

fn still_serves(server: &ServerProcess) {
    for transport in [Transport::Tcp, Transport::Udp] {
        let mut client = server.client(transport);
        client.put(b"alive", b"yes").expect("put after bad input");
        let got = client.get(b"alive").expect("get").expect("present");
        assert_eq!(got.value, b"yes");
    }
}

fn crud_over(transport: Transport) {
    let server = ServerProcess::start(&[]);
    let mut client = server.client(transport);
    assert_eq!(client.get(b"k").expect("get"), None);
    let v1 = client.put(b"k", b"one").expect("put");
    let got = client.get(b"k").expect("get").expect("present");
    assert_eq!((got.value.as_slice(), got.version), (&b"one"[..], v1));
    let v2 = client
        .update(b"k", b"two")
        .expect("update")
        .expect("exists");
    assert!(v2 > v1, "versions increase: {v1} then {v2}");
    assert_eq!(
        client.get(b"k").expect("get").expect("present").value,
        b"two"
    );
    assert_eq!(client.update(b"absent", b"x").expect("update"), None);
    assert!(client.delete(b"k").expect("delete"));
    assert!(!client.delete(b"k").expect("delete again"));
    assert_eq!(client.get(b"k").expect("get"), None);
    assert_eq!(client.get(b"absent").expect("get"), None);
    // Binary-safe keys and values, and an empty value.
    let key: Vec<u8> = (0..=255u8).collect();
    let value: Vec<u8> = (0..=255u8).rev().collect();
    client.put(&key, &value).expect("binary put");
    assert_eq!(
        client.get(&key).expect("get").expect("present").value,
        value
    );
    client.put(b"empty", b"").expect("empty value");
    assert_eq!(
        client.get(b"empty").expect("get").expect("present").value,
        b""
    );
    client.ping().expect("ping");
    let stats = client.stats().expect("stats");
    assert!(stats.contains("role master"), "{stats}");
    assert!(stats.contains("keys 2"), "{stats}");
}

#[test]
fn crud_over_tcp() {
    crud_over(Transport::Tcp);
}

#[test]
fn crud_over_udp() {
    crud_over(Transport::Udp);
}

#[test]
fn tcp_and_udp_see_the_same_data() {
    let server = ServerProcess::start(&[]);
    let mut over_tcp = server.client(Transport::Tcp);
    let mut over_udp = server.client(Transport::Udp);
    over_tcp.put(b"shared", b"from tcp").expect("put");
    assert_eq!(
        over_udp
            .get(b"shared")
            .expect("get")
            .expect("present")
            .value,
        b"from tcp"
    );
    over_udp.put(b"shared", b"from udp").expect("put");
    assert_eq!(
        over_tcp
            .get(b"shared")
            .expect("get")
            .expect("present")
            .value,
        b"from udp"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = ServerProcess::start(&[]);
    let mut stream = tcp(&server);
    let count = 2000u32;
    let mut batch = Vec::new();
    for i in 0..count {
        let key = format!("key{i}");
        batch.extend(request(
            Opcode::Put,
            2 * i,
            key.as_bytes(),
            format!("v{i}").as_bytes(),
        ));
        batch.extend(request(Opcode::Get, 2 * i + 1, key.as_bytes(), b""));
    }
    // One write of the whole batch; replies must come back in request order.
    stream.write_all(&batch).expect("write batch");
    for i in 0..count {
        let put = read_response(&mut stream);
        assert_eq!((put.request_id, put.status), (2 * i, Ok(Status::Ok)));
        let get = read_response(&mut stream);
        assert_eq!(get.request_id, 2 * i + 1);
        assert_eq!(get.value, format!("v{i}").as_bytes());
        assert_eq!(get.version, put.version);
    }
}

#[test]
fn frames_split_across_writes_are_reassembled() {
    let server = ServerProcess::start(&[]);
    let mut stream = tcp(&server);
    stream.set_nodelay(true).expect("nodelay");
    let mut bytes = request(Opcode::Put, 1, b"split", b"across many writes");
    bytes.extend(request(Opcode::Get, 2, b"split", b""));
    for chunk in bytes.chunks(5) {
        stream.write_all(chunk).expect("write chunk");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_response(&mut stream).status, Ok(Status::Ok));
    assert_eq!(read_response(&mut stream).value, b"across many writes");
}

#[test]
fn garbage_gets_an_error_and_the_connection_closed() {
    // With RESP on, a first letter means an inline Redis command (tests/resp.rs covers that).
    let server = ServerProcess::start(&["--resp", "off"]);
    let mut stream = tcp(&server);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let reply = read_response(&mut stream);
    assert_eq!(reply.status, Ok(Status::Malformed));
    assert!(reply.message().contains("magic"), "{}", reply.message());
    assert_closed(&mut stream);
    still_serves(&server);
}

#[test]
fn unsupported_version_gets_an_error() {
    let server = ServerProcess::start(&[]);
    let mut stream = tcp(&server);
    let mut bytes = request(Opcode::Get, 9, b"k", b"");
    bytes[1] = 2;
    stream.write_all(&bytes).expect("write");
    let reply = read_response(&mut stream);
    assert_eq!(reply.status, Ok(Status::UnsupportedVersion));
    assert_eq!(reply.request_id, 9);
    assert_closed(&mut stream);
    still_serves(&server);
}

#[test]
fn truncated_frame_then_disconnect_leaves_the_server_serving() {
    let server = ServerProcess::start(&[]);
    {
        let mut stream = tcp(&server);
        let bytes = request(Opcode::Put, 1, b"key", b"a value that never fully arrives");
        stream.write_all(&bytes[..bytes.len() - 7]).expect("write");
        stream.write_all(&[]).expect("flush");
    }
    {
        let mut stream = tcp(&server);
        stream.write_all(&[0xDB, 1, 2]).expect("header fragment");
    }
    still_serves(&server);
    let mut client = server.client(Transport::Tcp);
    assert_eq!(
        client.get(b"key").expect("get"),
        None,
        "partial PUT must not apply"
    );
}

#[test]
fn oversized_length_is_refused_before_buffering() {
    let server = ServerProcess::start(&["--max-value-size", "1024"]);
    let mut stream = tcp(&server);
    let mut bytes = request(Opcode::Put, 5, b"k", b"");
    bytes[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    stream.write_all(&bytes).expect("write");
    let reply = read_response(&mut stream);
    assert_eq!(reply.status, Ok(Status::TooLarge));
    assert_eq!(reply.request_id, 5);
    assert!(reply.message().contains("1024"), "{}", reply.message());
    assert_closed(&mut stream);
    // Just over the limit through the library: a clear error, and the limit itself is fine.
    let mut client = server.client(Transport::Tcp);
    match client.put(b"k", &[0u8; 1025]) {
        Err(ClientError::Server { status, message }) => {
            assert_eq!(status, Ok(Status::TooLarge), "{message}");
        }
        other => panic!("expected TOO_LARGE, got {other:?}"),
    }
    let mut client = server.client(Transport::Tcp);
    client.put(b"k", &[1u8; 1024]).expect("value at the limit");
    still_serves(&server);
}

#[test]
fn unknown_opcode_and_empty_key_keep_the_connection() {
    let server = ServerProcess::start(&[]);
    let mut stream = tcp(&server);
    let mut unknown = request(Opcode::Get, 1, b"k", b"");
    unknown[2] = 0x3E;
    stream.write_all(&unknown).expect("write");
    let reply = read_response(&mut stream);
    assert_eq!(reply.status, Ok(Status::UnknownOpcode));
    assert_eq!(
        reply.opcode, 0,
        "unknown opcodes are answered with opcode 0"
    );
    stream
        .write_all(&request(Opcode::Put, 2, b"", b"v"))
        .expect("write");
    let reply = read_response(&mut stream);
    assert_eq!(
        (reply.request_id, reply.status),
        (2, Ok(Status::InvalidArgument))
    );
    assert!(reply.message().contains("key"), "{}", reply.message());
    let mut as_response = request(Opcode::Get, 3, b"k", b"");
    as_response[2] |= RESPONSE_FLAG;
    stream.write_all(&as_response).expect("write");
    assert_eq!(read_response(&mut stream).status, Ok(Status::Malformed));
    // The same connection still works.
    stream
        .write_all(&request(Opcode::Put, 4, b"k", b"v"))
        .expect("write");
    let reply = read_response(&mut stream);
    assert_eq!((reply.request_id, reply.status), (4, Ok(Status::Ok)));
}

#[test]
fn bad_datagrams_get_errors_and_udp_keeps_serving() {
    let server = ServerProcess::start(&[]);
    let socket = udp(&server);
    // Bytes that are not a dkvs request get no answer at all (see tests/security.rs);
    // a request that is malformed past its header is answered.
    let mut reserved_set = request(Opcode::Get, 76, b"k", b"");
    reserved_set[18] = 1;
    let reply = udp_exchange(&socket, &reserved_set);
    assert_eq!(reply.status, Ok(Status::Malformed));
    let full = request(Opcode::Put, 77, b"key", b"value");
    let reply = udp_exchange(&socket, &full[..full.len() - 2]);
    assert_eq!(
        (reply.request_id, reply.status),
        (77, Ok(Status::Malformed))
    );
    assert!(reply.message().contains("truncated"), "{}", reply.message());
    assert!(
        reply.message().contains("32-byte frame it declares"),
        "{}",
        reply.message()
    );
    let mut padded = full.clone();
    padded.extend_from_slice(b"xx");
    assert_eq!(udp_exchange(&socket, &padded).status, Ok(Status::Malformed));
    let reply = udp_exchange(&socket, &request(Opcode::Delete, 78, b"", b""));
    assert_eq!(reply.status, Ok(Status::InvalidArgument));
    still_serves(&server);
}

#[test]
fn retried_udp_write_is_applied_once() {
    let server = ServerProcess::start(&[]);
    let socket = udp(&server);
    let put = request(Opcode::Put, 4242, b"counter", b"1");
    let first = udp_exchange(&socket, &put);
    let retry = udp_exchange(&socket, &put);
    assert_eq!(first.status, Ok(Status::Ok));
    assert_eq!(retry, first, "a retry is answered with the original reply");
    let mut client = server.client(Transport::Tcp);
    let stats = client.stats().expect("stats");
    assert!(stats.contains("udp_retries_deduplicated 1"), "{stats}");
    assert!(
        stats.contains(&format!("commit_seq {}", first.version)),
        "{stats}"
    );
    // A new request id is a new write.
    let again = udp_exchange(&socket, &request(Opcode::Put, 4243, b"counter", b"1"));
    assert!(again.version > first.version);
    // So is an old id reused for a different write.
    let reused = udp_exchange(&socket, &request(Opcode::Put, 4242, b"counter", b"2"));
    assert!(reused.version > again.version);
    let got = server.client(Transport::Udp).get(b"counter").expect("get");
    assert_eq!(got.expect("present").value, b"2");
}

#[test]
fn values_up_to_the_limit_round_trip_and_udp_says_use_tcp() {
    let server = ServerProcess::start(&[]);
    let mut over_tcp = server.client(Transport::Tcp);
    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    over_tcp.put(b"big", &big).expect("1 MiB put");
    assert_eq!(
        over_tcp.get(b"big").expect("get").expect("present").value,
        big
    );
    // Told USE_TCP, the library sends the request again over TCP by itself...
    let mut over_udp = server.client(Transport::Udp);
    assert_eq!(
        over_udp.get(b"big").expect("get").expect("present").value,
        big
    );
    over_udp
        .put(b"big2", &big)
        .expect("a put too large for UDP goes over TCP");
    // ...unless told not to.
    let mut over_udp = dkvs::client::Client::connect(
        "127.0.0.1",
        server.port,
        dkvs::client::ClientConfig {
            transport: Transport::Udp,
            tcp_fallback: false,
            ..dkvs::client::ClientConfig::default()
        },
    )
    .expect("connect");
    match over_udp.get(b"big") {
        Err(ClientError::Server { status, message }) => {
            assert_eq!(status, Ok(Status::UseTcp));
            assert!(message.contains("use TCP"), "{message}");
        }
        other => panic!("expected USE_TCP, got {other:?}"),
    }
    match over_udp.put(b"big2", &big) {
        Err(ClientError::InvalidRequest(message)) => assert!(message.contains("use TCP")),
        other => panic!("expected a local USE TCP error, got {other:?}"),
    }
}

#[test]
fn a_client_that_does_not_read_cannot_stall_others() {
    let server = ServerProcess::start(&[]);
    let mut writer = server.client(Transport::Tcp);
    let value = vec![7u8; 64 * 1024];
    writer.put(b"large", &value).expect("put");
    // Ask for ~64 MiB of replies and never read them.
    let mut hog = tcp(&server);
    hog.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let get = request(Opcode::Get, 1, b"large", b"");
    for _ in 0..1000 {
        if hog.write_all(&get).is_err() {
            break; // the server stopped reading from us: backpressure works
        }
    }
    // 64 MiB of replies were asked for; backpressure keeps the server near its idle size.
    std::thread::sleep(Duration::from_millis(200));
    let rss_kib = server.rss_kib();
    assert!(rss_kib < 32 * 1024, "server RSS grew to {rss_kib} KiB");
    let mut other = server.client(Transport::Tcp);
    for i in 0..100u32 {
        let key = format!("other{i}");
        other
            .put(key.as_bytes(), b"v")
            .expect("other client served");
    }
    drop(hog);
    still_serves(&server);
}

#[test]
fn many_connections_at_once() {
    let server = ServerProcess::start(&[]);
    let mut clients: Vec<_> = (0..200).map(|_| server.client(Transport::Tcp)).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.put(format!("c{i}").as_bytes(), b"x").expect("put");
    }
    let mut check = server.client(Transport::Tcp);
    let stats = check.stats().expect("stats");
    assert!(stats.contains("connections_open 201"), "{stats}");
    assert!(stats.contains("keys 200"), "{stats}");
}

#[test]
fn two_servers_side_by_side_and_a_taken_port() {
    let a = ServerProcess::start(&[]);
    let b = ServerProcess::start(&[]);
    assert_ne!(a.port, b.port);
    a.client(Transport::Tcp).put(b"where", b"a").expect("put a");
    b.client(Transport::Tcp).put(b"where", b"b").expect("put b");
    let got = a
        .client(Transport::Udp)
        .get(b"where")
        .expect("get")
        .expect("present");
    assert_eq!(got.value, b"a");
    let got = b
        .client(Transport::Udp)
        .get(b"where")
        .expect("get")
        .expect("present");
    assert_eq!(got.value, b"b");
    let out = std::process::Command::new(common::bin("dkvs-server"))
        .args(["-p", &a.port.to_string()])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert!(stderr.contains(&a.port.to_string()), "{stderr}");
}

#[test]
fn tcp_only_and_udp_only() {
    let tcp_only = ServerProcess::start(&["-t"]);
    assert!(
        tcp_only.ready_line.contains("serving tcp on"),
        "{}",
        tcp_only.ready_line
    );
    tcp_only.client(Transport::Tcp).ping().expect("tcp ping");
    let udp_only = ServerProcess::start(&["-u"]);
    assert!(
        udp_only.ready_line.contains("serving udp on"),
        "{}",
        udp_only.ready_line
    );
    udp_only.client(Transport::Udp).ping().expect("udp ping");
    let refused = TcpStream::connect(("127.0.0.1", udp_only.port));
    assert!(refused.is_err(), "a UDP-only server must not accept TCP");
}

#[test]
fn a_pipelined_request_after_a_large_reply_is_answered() {
    // The first reply alone passes the output high-water mark; the second
    // request was read in the same short read and must not be left behind.
    let server = ServerProcess::start(&[]);
    let mut writer = server.client(Transport::Tcp);
    let big = vec![b'b'; 300 * 1024];
    writer.put(b"big", &big).expect("put big");
    writer.put(b"small", b"s").expect("put small");
    let mut stream = tcp(&server);
    let mut batch = request(Opcode::Get, 1, b"big", b"");
    batch.extend(request(Opcode::Get, 2, b"small", b""));
    stream.write_all(&batch).expect("write both");
    let first = read_response(&mut stream);
    assert_eq!((first.request_id, first.value.len()), (1, big.len()));
    let second = read_response(&mut stream);
    assert_eq!((second.request_id, second.value), (2, b"s".to_vec()));
}

#[test]
fn half_closed_client_gets_every_reply_then_eof() {
    let server = ServerProcess::start(&[]);
    let mut stream = tcp(&server);
    let mut batch = Vec::new();
    for i in 0..50u32 {
        batch.extend(request(Opcode::Put, i, format!("h{i}").as_bytes(), b"v"));
    }
    // Data and FIN leave together: the server may see both in one readiness.
    stream.write_all(&batch).expect("write");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    for i in 0..50u32 {
        let reply = read_response(&mut stream);
        assert_eq!((reply.request_id, reply.status), (i, Ok(Status::Ok)));
    }
    let mut byte = [0u8; 1];
    assert_eq!(stream.read(&mut byte).expect("EOF, not a timeout"), 0);
}

#[test]
fn a_slow_but_steady_reader_does_not_grow_the_server() {
    let server = ServerProcess::start(&[]);
    let value = vec![b'x'; 32 * 1024];
    server
        .client(Transport::Tcp)
        .put(b"v", &value)
        .expect("put");
    let mut stream = tcp(&server);
    let get = request(Opcode::Get, 0, b"v", b"");
    let requests = 3000; // ~96 MiB of replies
    let writer_stream = stream.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let mut s = writer_stream;
        let mut batch = Vec::new();
        for _ in 0..requests {
            batch.extend_from_slice(&get);
        }
        s.write_all(&batch).expect("write requests");
    });
    // Read in bites with pauses, so the server's output never quite drains.
    let mut chunk = vec![0u8; 256 * 1024];
    let total = requests * (HEADER_LEN + value.len());
    let mut got = 0;
    let mut max_rss_kib = 0;
    while got < total {
        let n = stream.read(&mut chunk).expect("read replies");
        assert!(n > 0, "server closed early");
        got += n;
        if got % (8 << 20) < n {
            max_rss_kib = max_rss_kib.max(server.rss_kib());
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    writer.join().expect("writer");
    assert!(
        max_rss_kib < 48 * 1024,
        "server RSS reached {max_rss_kib} KiB while streaming 96 MiB to a slow reader"
    );
}

#[test]
fn the_client_recovers_after_a_timed_out_request() {
    let mut server = ServerProcess::start(&[]);
    let config = dkvs::client::ClientConfig {
        timeout: Duration::from_millis(300),
        ..dkvs::client::ClientConfig::default()
    };
    let mut client =
        dkvs::client::Client::connect("127.0.0.1", server.port, config).expect("connect");
    client.put(b"a", b"1").expect("put a");
    client.put(b"b", b"2").expect("put b");
    server.stop();
    assert!(matches!(client.get(b"a"), Err(ClientError::Timeout(_))));
    server.resume();
    // The late reply to the timed-out GET must not be taken for this one's.
    let got = client
        .get(b"b")
        .expect("get after timeout")
        .expect("present");
    assert_eq!(got.value, b"2");
}
