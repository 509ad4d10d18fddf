//! Client authentication (`--requirepass-file`) and protected mode, with real
//! processes: the binary protocol (raw frames and the client library),
//! dkvs-client, RESP over raw TCP compared byte for byte with a real
//! redis-server, redis-cli and redis-py.
//!
//! Needs redis-server, redis-cli (`DKVS_REDIS_SERVER`, `DKVS_REDIS_CLI`) and a
//! Python with the `redis` package (`DKVS_REDIS_PYTHON`), as tests/resp.rs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ServerProcess, Stats, bin, read_response, wait_until};
use dkvs::client::{Client, ClientConfig, ClientError, ClientPassword, Transport};
use dkvs::protocol::{Opcode, Response, Status, decode_datagram, encode_request};

const PASSWORD: &str = "correct horse battery staple";
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A password file (mode 600) in a temp dir that lives as long as the value.
struct PasswordFile {
    dir: tempfile::TempDir,
}

impl PasswordFile {
    fn new(contents: &str, mode: u32) -> PasswordFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("password");
        std::fs::write(&path, contents).expect("write password file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        PasswordFile { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    fn arg(&self) -> String {
        self.path().display().to_string()
    }
}

fn start_with_password(file: &PasswordFile, args: &[&str]) -> ServerProcess {
    let path = file.arg();
    let mut all = vec!["--requirepass-file", path.as_str()];
    all.extend_from_slice(args);
    ServerProcess::start(&all)
}

fn config(password: Option<&str>, transport: Transport) -> ClientConfig {
    ClientConfig {
        transport,
        timeout: Duration::from_secs(10),
        password: password.map(|p| ClientPassword(p.as_bytes().to_vec())),
        ..ClientConfig::default()
    }
}

fn stats_with_password(port: u16) -> Stats {
    let mut client = Client::connect("127.0.0.1", port, config(Some(PASSWORD), Transport::Tcp))
        .expect("connect with the password");
    Stats::parse(client.stats().expect("stats"))
}

/// Send one binary request on `stream` and read its response.
fn call(stream: &mut TcpStream, op: Opcode, id: u32, key: &[u8], value: &[u8]) -> Response {
    let mut out = Vec::new();
    encode_request(&mut out, op, id, key, value);
    stream.write_all(&out).expect("write");
    let reply = read_response(stream);
    assert_eq!(reply.request_id, id);
    reply
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
}

#[test]
fn binary_auth_right_wrong_and_absent_and_noauth_until_then() {
    let file = PasswordFile::new(&format!("{PASSWORD}\n"), 0o600);
    let server = start_with_password(&file, &[]);
    let mut s = connect(([127, 0, 0, 1], server.port).into());
    // Before AUTH: PING is served, everything else is NOAUTH and the connection stays open.
    let reply = call(&mut s, Opcode::Ping, 1, b"", b"");
    assert_eq!(
        (reply.status, reply.value),
        (Ok(Status::Ok), b"PONG".to_vec())
    );
    for (id, op, key, value) in [
        (2, Opcode::Get, &b"k"[..], &b""[..]),
        (3, Opcode::Put, b"k", b"v"),
        (4, Opcode::Stats, b"", b""),
        (5, Opcode::Delete, b"k", b""),
    ] {
        let reply = call(&mut s, op, id, key, value);
        assert_eq!(reply.status, Ok(Status::NoAuth), "{op:?}");
        assert_eq!(reply.opcode, op as u8);
        assert_eq!(
            reply.message(),
            "authentication required: send AUTH with the password first"
        );
    }
    // A wrong password (and the file's newline is not part of the password).
    for (id, wrong) in [(6, "nope"), (7, "correct horse battery staple\n"), (8, "")] {
        let reply = call(&mut s, Opcode::Auth, id, b"", wrong.as_bytes());
        assert_eq!(reply.status, Ok(Status::AuthFailed), "{wrong:?}");
        assert_eq!(reply.opcode, Opcode::Auth as u8);
        assert_eq!(reply.message(), "invalid password");
    }
    let reply = call(&mut s, Opcode::Get, 9, b"k", b"");
    assert_eq!(reply.status, Ok(Status::NoAuth));
    // The right one: OK, and then everything is served.
    let reply = call(&mut s, Opcode::Auth, 10, b"", PASSWORD.as_bytes());
    assert_eq!((reply.status, reply.value.len()), (Ok(Status::Ok), 0));
    let reply = call(&mut s, Opcode::Put, 11, b"k", b"v");
    assert_eq!(reply.status, Ok(Status::Ok));
    let reply = call(&mut s, Opcode::Get, 12, b"k", b"");
    assert_eq!((reply.status, reply.value), (Ok(Status::Ok), b"v".to_vec()));
    // A failed AUTH later leaves the connection authenticated, as in Redis.
    let reply = call(&mut s, Opcode::Auth, 13, b"", b"nope");
    assert_eq!(reply.status, Ok(Status::AuthFailed));
    let reply = call(&mut s, Opcode::Get, 14, b"k", b"");
    assert_eq!(reply.status, Ok(Status::Ok));
    // A new connection starts unauthenticated.
    let mut other = connect(([127, 0, 0, 1], server.port).into());
    assert_eq!(
        call(&mut other, Opcode::Get, 1, b"k", b"").status,
        Ok(Status::NoAuth)
    );
    let stats = stats_with_password(server.port);
    assert_eq!(stats.num("auth_failures"), 4);
    assert_eq!(stats.num("auth_required"), 6);
    assert_eq!(stats.num("ops_auth"), 6);
}

#[test]
fn auth_without_a_configured_password_fails_and_changes_nothing() {
    let server = ServerProcess::start(&[]);
    let mut s = connect(([127, 0, 0, 1], server.port).into());
    let reply = call(&mut s, Opcode::Auth, 1, b"", b"anything");
    assert_eq!(reply.status, Ok(Status::AuthFailed));
    assert!(
        reply.message().contains("no password configured"),
        "{}",
        reply.message()
    );
    assert_eq!(
        call(&mut s, Opcode::Get, 2, b"k", b"").status,
        Ok(Status::NotFound)
    );
    // A client configured with a password fails to connect, saying why.
    match Client::connect("127.0.0.1", server.port, config(Some("x"), Transport::Tcp)) {
        Err(ClientError::Server { status, .. }) => assert_eq!(status, Ok(Status::AuthFailed)),
        other => panic!("expected AUTH_FAILED, got {:?}", other.map(|_| ())),
    }
    assert_eq!(server.stats().num("auth_failures"), 2);
}

#[test]
fn the_client_library_authenticates_and_udp_serves_only_ping() {
    let file = PasswordFile::new(PASSWORD, 0o600);
    let server = start_with_password(&file, &[]);
    let mut c = Client::connect(
        "127.0.0.1",
        server.port,
        config(Some(PASSWORD), Transport::Tcp),
    )
    .expect("connect");
    c.put(b"k", b"v").expect("put");
    assert_eq!(
        c.get(b"k").expect("get").map(|r| r.value),
        Some(b"v".to_vec())
    );
    // Without the password: NOAUTH; with a wrong one: the connection fails.
    let mut anonymous =
        Client::connect("127.0.0.1", server.port, config(None, Transport::Tcp)).expect("connect");
    anonymous.ping().expect("ping needs no password");
    match anonymous.get(b"k") {
        Err(ClientError::Server { status, .. }) => assert_eq!(status, Ok(Status::NoAuth)),
        other => panic!("expected NOAUTH, got {other:?}"),
    }
    match Client::connect(
        "127.0.0.1",
        server.port,
        config(Some("wrong"), Transport::Tcp),
    ) {
        Err(ClientError::Server { status, message }) => {
            assert_eq!(
                (status, message.as_str()),
                (Ok(Status::AuthFailed), "invalid password")
            )
        }
        other => panic!("expected AUTH_FAILED, got {:?}", other.map(|_| ())),
    }
    // UDP has no connection to authenticate: PING only, even with the password.
    let mut udp = Client::connect(
        "127.0.0.1",
        server.port,
        config(Some(PASSWORD), Transport::Udp),
    )
    .expect("udp");
    udp.ping().expect("udp ping");
    for result in [udp.get(b"k").map(|_| ()), udp.put(b"k", b"w").map(|_| ())] {
        match result {
            Err(ClientError::Server { status, message }) => {
                assert_eq!(status, Ok(Status::NoAuth));
                assert!(message.contains("UDP cannot authenticate"), "{message}");
            }
            other => panic!("expected NOAUTH over UDP, got {other:?}"),
        }
    }
    assert_eq!(
        c.get(b"k").expect("get").map(|r| r.value),
        Some(b"v".to_vec())
    );
}

#[test]
fn dkvs_client_password_file() {
    let file = PasswordFile::new(&format!("{PASSWORD}\n"), 0o600);
    let server = start_with_password(&file, &[]);
    let port = server.port.to_string();
    let run = |extra: &[&str]| {
        Command::new(bin("dkvs-client"))
            .args(["-p", &port])
            .args(extra)
            .output()
            .expect("run dkvs-client")
    };
    let path = file.arg();
    let out = run(&["--password-file", &path, "put", "k", "v"]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["--password-file", &path, "get", "k"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v\n", "{out:?}");
    let out = run(&["get", "k"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOAUTH"),
        "{out:?}"
    );
    let out = run(&["--password-file", "/nonexistent/password", "get", "k"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_bad_password_file_stops_the_server_with_exit_2_and_a_loose_one_warns() {
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = PasswordFile::new("\n", 0o600);
    for (path, why) in [
        (empty.path(), "the password file is empty"),
        (PathBuf::from("/nonexistent/password"), "No such file"),
    ] {
        let out = Command::new(bin("dkvs-server"))
            .args(["-p", "0", "-d"])
            .arg(dir.path())
            .arg("--requirepass-file")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run dkvs-server");
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--requirepass-file") && stderr.contains(why),
            "{stderr}"
        );
    }
    // Readable by others: started, with a warning that never shows the password.
    let loose = PasswordFile::new(PASSWORD, 0o644);
    let mut child = Command::new(bin("dkvs-server"))
        .args(["-p", "0", "-l", "info", "-d"])
        .arg(dir.path())
        .arg("--requirepass-file")
        .arg(loose.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dkvs-server");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut log = String::new();
    while !log.contains("ready") {
        let mut line = String::new();
        if stderr.read_line(&mut line).expect("read log") == 0 {
            break;
        }
        log.push_str(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        log.contains("readable or writable by group or others"),
        "{log}"
    );
    assert!(!log.contains(PASSWORD), "{log}");
}

#[test]
fn a_slave_replicates_from_a_master_with_a_password() {
    // Replication links do not AUTH: they are peers (--cluster-secret-file).
    let file = PasswordFile::new(PASSWORD, 0o600);
    let master = start_with_password(&file, &[]);
    let path = file.arg();
    let slave = ServerProcess::start_slave(&master, &["--requirepass-file", &path]);
    let mut c = Client::connect(
        "127.0.0.1",
        master.port,
        config(Some(PASSWORD), Transport::Tcp),
    )
    .expect("connect");
    c.put(b"k", b"v").expect("put");
    let mut at_slave = Client::connect(
        "127.0.0.1",
        slave.port,
        config(Some(PASSWORD), Transport::Tcp),
    )
    .expect("connect to the slave");
    wait_until(
        "the slave has k",
        Duration::from_secs(20),
        || matches!(at_slave.get(b"k"), Ok(Some(r)) if r.value == b"v"),
    );
    // A write sent to the slave is redirected, and the client authenticates at the master.
    at_slave.put(b"k2", b"w").expect("put through the redirect");
    assert_eq!(
        c.get(b"k2").expect("get").map(|r| r.value),
        Some(b"w".to_vec())
    );
}

#[test]
fn dkvs_load_password_file_authenticates_every_connection() {
    // Through a slave: its redirected writes open links to the master, which authenticate too.
    let file = PasswordFile::new(&format!("{PASSWORD}\n"), 0o600);
    // Generous timeouts: a loaded machine must not evict the slave or time requests out.
    let master = start_with_password(
        &file,
        &["--tpc-timeout-ms", "10000", "--max-slave-lag-ms", "0"],
    );
    let path = file.arg();
    let slave = ServerProcess::start_slave(&master, &["--requirepass-file", &path]);
    wait_until("the slave is in sync", Duration::from_secs(20), || {
        stats_with_password(master.port).num("slaves_in_sync") == 1
    });
    for (port, protocol) in [(slave.port, "dkvs"), (master.port, "resp")] {
        let out = Command::new(env!("CARGO_BIN_EXE_dkvs-load"))
            .args(["--port", &port.to_string(), "--protocol", protocol])
            .args(["--ops", "500", "-c", "3", "--get-ratio", "0.5", "-q"])
            .args(["--timeout-ms", "20000"])
            .args(["--password-file", &path])
            .output()
            .expect("run dkvs-load");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{protocol}: {text}");
        assert!(!text.contains("AUTH"), "{protocol}: {text}");
        assert!(text.contains("errors      0"), "{protocol}: {text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dkvs-load"))
        .args(["--port", &master.port.to_string(), "--ops", "10", "-q"])
        .args(["--password-file", "/dev/null"])
        .output()
        .expect("run dkvs-load");
    assert!(!out.status.success());
    // Three connections on the master, three on the slave and their three master links.
    let stats = stats_with_password(master.port);
    assert!(stats.num("ops_auth") >= 6, "{}", stats.num("ops_auth"));
}

// ---- RESP ----

fn tool(var: &str, name: &str, install: &str) -> PathBuf {
    if let Ok(path) = std::env::var(var) {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{name} not found on PATH (or in ${var}); install it with: {install}")
    })
}

/// A real redis-server with `--requirepass`, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start(password: &str) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(tool(
            "DKVS_REDIS_SERVER",
            "redis-server",
            "apt-get install -y redis-server",
        ))
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            password,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server");
        let server = RedisServer { child, port };
        wait_until("redis-server listens", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        server
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send inline commands on one connection and read one reply line each.
fn resp_lines(port: u16, commands: &[&str]) -> Vec<String> {
    let stream = connect(([127, 0, 0, 1], port).into());
    let mut reader = BufReader::new(stream);
    commands
        .iter()
        .map(|command| {
            reader
                .get_mut()
                .write_all(format!("{command}\r\n").as_bytes())
                .expect("write");
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            line
        })
        .collect()
}

#[test]
fn resp_auth_replies_are_redis_7s_byte_for_byte() {
    let file = PasswordFile::new(&format!("{PASSWORD}\n"), 0o600);
    let dkvs = start_with_password(&file, &[]);
    let redis = RedisServer::start(PASSWORD);
    let auth = format!("AUTH \"{PASSWORD}\"");
    let auth_default = format!("AUTH default \"{PASSWORD}\"");
    let sessions: Vec<Vec<&str>> = vec![
        vec![
            "GET k",
            "PING",
            "SET k v",
            "MULTI",
            "CLIENT ID",
            "NOSUCHCOMMAND",
            "HELLO",
            "HELLO 3",
            "HELLO 3 AUTH default wrong",
            "AUTH wrong",
            "AUTH default wrong",
            "AUTH someone wrong",
            "AUTH a b c",
            "GET k",
            &auth,
            "GET k",
            "AUTH wrong",
            "GET k",
            "QUIT",
        ],
        vec![&auth_default, "SET k v", "GET k"],
        vec!["QUIT"],
    ];
    for session in &sessions {
        let want = resp_lines(redis.port, session);
        let got = resp_lines(dkvs.port, session);
        assert_eq!(got, want, "{session:?}");
    }
    // HELLO 3 AUTH: a RESP3 map (its contents differ: server name, version, id).
    let hello = format!("HELLO 3 AUTH default \"{PASSWORD}\"");
    let lines = resp_lines(dkvs.port, &[&hello]);
    assert_eq!(lines, ["%7\r\n"]);
    // Without a password configured, Redis's answers.
    let open = ServerProcess::start(&[]);
    let lines = resp_lines(open.port, &["AUTH x", "AUTH default x", "AUTH other x"]);
    assert_eq!(
        lines,
        [
            "-ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?\r\n",
            "+OK\r\n",
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        ]
    );
    // HELLO's, three AUTHs before and one after the right one.
    let stats = stats_with_password(dkvs.port);
    assert_eq!(stats.num("auth_failures"), 5);
}

/// Send each inline command on one connection and take everything that
/// arrives for it (a reply may span many lines) until the line goes quiet.
fn resp_replies(port: u16, commands: &[&str]) -> Vec<String> {
    let mut stream = connect(([127, 0, 0, 1], port).into());
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    commands
        .iter()
        .map(|command| {
            stream
                .write_all(format!("{command}\r\n").as_bytes())
                .expect("write");
            let mut reply = Vec::new();
            let mut buf = [0u8; 4096];
            // Bounded: a reply here is a few hundred bytes at most.
            for _ in 0..64 {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => reply.extend_from_slice(&buf[..n]),
                    Err(_) if !reply.is_empty() => break,
                    Err(e) => panic!("{command}: no reply: {e}"),
                }
            }
            String::from_utf8_lossy(&reply).into_owned()
        })
        .collect()
}

#[test]
fn config_get_requirepass_and_protected_mode_answer_as_redis_7() {
    let file = PasswordFile::new(&format!("{PASSWORD}\n"), 0o600);
    let dkvs = start_with_password(&file, &[]);
    let redis = RedisServer::start(PASSWORD);
    let auth = format!("AUTH \"{PASSWORD}\"");
    // Byte for byte as Redis, but for the password's value.
    let same = [
        "CONFIG GET requirepass",
        &auth,
        "CONFIG GET protected-mode",
        "CONFIG GET PROTECTED-MODE",
        "CONFIG GET nosuch",
        "HELLO 3",
        "CONFIG GET protected-mode",
    ];
    let want = resp_replies(redis.port, &same);
    let got = resp_replies(dkvs.port, &same);
    assert_eq!(got[..5], want[..5]);
    assert_eq!(got[6], want[6]);
    assert_eq!(want[0], "-NOAUTH Authentication required.\r\n");
    // Redis gives the password away to an authenticated client; dkvs keeps only
    // a keyed hash of it, so it shows a fixed text, never empty (empty = none).
    let hidden = "<set: dkvs keeps only a keyed hash of it>";
    let got = resp_replies(dkvs.port, &[&auth, "CONFIG GET requirepass"]);
    assert_eq!(
        got[1],
        format!(
            "*2\r\n$11\r\nrequirepass\r\n${}\r\n{hidden}\r\n",
            hidden.len()
        )
    );
    assert!(!got[1].contains(PASSWORD));
    // Without a password, and with protected mode off: Redis 7.0.15's bytes.
    let open = ServerProcess::start(&["--protected-mode", "no"]);
    assert_eq!(
        resp_replies(
            open.port,
            &[
                "CONFIG GET requirepass",
                "CONFIG GET protected-mode",
                "CONFIG GET REQUIREPASS"
            ]
        ),
        [
            "*2\r\n$11\r\nrequirepass\r\n$0\r\n\r\n",
            "*2\r\n$14\r\nprotected-mode\r\n$2\r\nno\r\n",
            "*2\r\n$11\r\nREQUIREPASS\r\n$0\r\n\r\n",
        ]
    );
    let default = ServerProcess::start(&[]);
    assert_eq!(
        resp_replies(default.port, &["CONFIG GET protected-mode"]),
        ["*2\r\n$14\r\nprotected-mode\r\n$3\r\nyes\r\n"]
    );
}

#[test]
fn redis_cli_and_redis_py_authenticate() {
    let file = PasswordFile::new(&format!("{PASSWORD}\n"), 0o600);
    let server = start_with_password(&file, &[]);
    let port = server.port.to_string();
    let cli = |args: &[&str]| {
        let out = Command::new(tool(
            "DKVS_REDIS_CLI",
            "redis-cli",
            "apt-get install -y redis-tools",
        ))
        .args(["-h", "127.0.0.1", "-p", &port, "--no-auth-warning"])
        .args(args)
        .output()
        .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert_eq!(cli(&["-a", PASSWORD, "SET", "k", "v"]), "OK\n");
    assert_eq!(cli(&["-a", PASSWORD, "GET", "k"]), "v\n");
    assert_eq!(cli(&["GET", "k"]), "NOAUTH Authentication required.\n\n");
    assert!(
        cli(&["-a", "wrong", "GET", "k"])
            .contains("AUTH failed: WRONGPASS invalid username-password pair or user is disabled.")
    );
    let python = std::env::var("DKVS_REDIS_PYTHON").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/redis-venv/bin/python"),
        PathBuf::from,
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/redis_py_check.py");
    for protocol in ["3", "2"] {
        let out = Command::new(&python)
            .arg(&script)
            .args(["auth", &port, protocol, PASSWORD])
            .output()
            .unwrap_or_else(|e| panic!("run {} (set DKVS_REDIS_PYTHON): {e}", python.display()));
        assert!(
            out.status.success(),
            "redis-py auth check, protocol {protocol}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---- Protected mode ----

/// A non-loopback address of this host, from which (and to which) a test can
/// connect: the source of a connection to it is that address too.
fn non_loopback_address() -> Option<IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the route's source.
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket
        .connect("192.0.2.1:9")
        .or_else(|_| socket.connect("198.51.100.1:9"))
        .ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Read everything until the server closes the connection.
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all).expect("read until close");
    all
}

#[test]
fn protected_mode_refuses_remote_clients_of_a_public_server_without_a_password() {
    let Some(ip) = non_loopback_address() else {
        eprintln!("no non-loopback address on this host: protected mode is unit-tested only");
        return;
    };
    let server = ServerProcess::start(&["-s", "0.0.0.0"]);
    let remote = SocketAddr::new(ip, server.port);
    // Binary: the first request is answered DENIED, then the connection closes.
    let mut s = connect(remote);
    let reply = call(&mut s, Opcode::Get, 7, b"k", b"");
    assert_eq!(
        (reply.status, reply.opcode),
        (Ok(Status::Denied), Opcode::Get as u8)
    );
    assert!(
        reply.message().contains("protected mode"),
        "{}",
        reply.message()
    );
    assert!(read_to_close(&mut s).is_empty());
    // RESP: Redis's -DENIED, then the close.
    let mut s = connect(remote);
    s.write_all(b"PING\r\n").expect("write");
    let text = String::from_utf8(read_to_close(&mut s)).expect("utf-8");
    assert!(
        text.starts_with("-DENIED dkvs is running in protected mode") && text.ends_with(".\r\n"),
        "{text:?}"
    );
    // UDP from the same source: DENIED too (cut to the 3x amplification limit).
    let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("udp");
    udp.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut request = Vec::new();
    encode_request(&mut request, Opcode::Get, 9, b"k", b"");
    udp.send_to(&request, remote).expect("send");
    let mut buf = [0u8; 2048];
    let n = udp.recv(&mut buf).expect("udp reply");
    let frame = decode_datagram(&buf[..n], usize::MAX).expect("frame");
    assert_eq!(frame.header.status, Status::Denied as u8);
    // Loopback clients are served.
    let mut local = connect(([127, 0, 0, 1], server.port).into());
    assert_eq!(
        call(&mut local, Opcode::Get, 1, b"k", b"").status,
        Ok(Status::NotFound)
    );
    let stats = server.stats();
    assert_eq!(stats.num("protected_mode_refusals"), 3);

    // --protected-mode no: remote clients are served.
    let open = ServerProcess::start(&["-s", "0.0.0.0", "--protected-mode", "no"]);
    let mut s = connect(SocketAddr::new(ip, open.port));
    assert_eq!(
        call(&mut s, Opcode::Get, 1, b"k", b"").status,
        Ok(Status::NotFound)
    );

    // With a password: remote clients get in, and must AUTH.
    let file = PasswordFile::new(PASSWORD, 0o600);
    let guarded = start_with_password(&file, &["-s", "0.0.0.0"]);
    let mut s = connect(SocketAddr::new(ip, guarded.port));
    assert_eq!(
        call(&mut s, Opcode::Get, 1, b"k", b"").status,
        Ok(Status::NoAuth)
    );
    let reply = call(&mut s, Opcode::Auth, 2, b"", PASSWORD.as_bytes());
    assert_eq!(reply.status, Ok(Status::Ok));
    assert_eq!(
        call(&mut s, Opcode::Get, 3, b"k", b"").status,
        Ok(Status::NotFound)
    );
}
