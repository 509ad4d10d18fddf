//! The Redis protocol on dkvs's TCP port, driven by real Redis tools: redis-cli
//! (Debian package redis-tools), the Python `redis` package (in a virtualenv)
//! and, as the reference for exact replies, a real redis-server.
//!
//! `.ci/run` installs all three. Elsewhere the tests fail with how to install
//! them rather than skip: set `DKVS_REDIS_CLI`, `DKVS_REDIS_SERVER` and
//! `DKVS_REDIS_PYTHON` to use other paths.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ServerProcess, wait_until};
use dkvs::client::Transport;

const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A tool from the environment variable `var`, else `name` on the PATH.
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

fn redis_cli_path() -> PathBuf {
    tool(
        "DKVS_REDIS_CLI",
        "redis-cli",
        "apt-get install -y redis-tools",
    )
}

fn redis_server_path() -> PathBuf {
    tool(
        "DKVS_REDIS_SERVER",
        "redis-server",
        "apt-get install -y redis-server",
    )
}

/// The Python with the `redis` package: `$DKVS_REDIS_PYTHON`, else the
/// virtualenv `.ci/run` makes under target/.
fn python() -> PathBuf {
    let path = std::env::var("DKVS_REDIS_PYTHON").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/redis-venv/bin/python"),
        PathBuf::from,
    );
    let works = Command::new(&path)
        .args(["-c", "import redis"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        works,
        "no Python with the redis package at {} (set DKVS_REDIS_PYTHON); make one with: \
         python3 -m venv target/redis-venv && target/redis-venv/bin/pip install redis",
        path.display()
    );
    path
}

/// Run the redis-py checks in tests/redis_py_check.py.
fn redis_py(args: &[String]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/redis_py_check.py");
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "redis-py check {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `redis-cli -p PORT ARGS...` (output not to a terminal: raw values, one per
/// line; an error is followed by an empty line).
fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new(redis_cli_path())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A real redis-server on a free port, killed on drop: the reference for replies.
struct RedisServer {
    child: Child,
    port: u16,
    /// Its directory (the AOF), removed on drop.
    _dir: tempfile::TempDir,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        // Configured as dkvs is by default: an append-only log synced before every reply.
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new(redis_server_path())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--daemonize", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        wait_until("redis-server accepts", Duration::from_secs(20), || {
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

/// A raw RESP connection: send bytes, read whole replies.
struct Raw {
    reader: BufReader<TcpStream>,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        Raw {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).expect("write");
    }

    /// Send a command as a multibulk array and read its reply.
    fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.send(&command(args));
        self.reply()
    }

    /// One whole reply, its bytes as sent.
    fn reply(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.read_value(&mut out);
        out
    }

    fn read_value(&mut self, out: &mut Vec<u8>) {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line).expect("read");
        assert!(line.ends_with(b"\r\n"), "reply line {line:?}");
        out.extend_from_slice(&line);
        let body = &line[1..line.len() - 2];
        let n = || -> i64 {
            std::str::from_utf8(body)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("bad length {line:?}"))
        };
        match line[0] {
            b'$' | b'=' | b'!' if n() >= 0 => {
                let mut bulk = vec![0; n() as usize + 2];
                self.reader.read_exact(&mut bulk).expect("read bulk");
                out.extend_from_slice(&bulk);
            }
            b'*' | b'~' | b'>' => {
                for _ in 0..n().max(0) {
                    self.read_value(out);
                }
            }
            b'%' | b'|' => {
                for _ in 0..2 * n() {
                    self.read_value(out);
                }
            }
            _ => {}
        }
    }

    /// Whether the server closed the connection (after any replies already read).
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0) | Err(_))
    }
}

/// A command as a RESP array of bulk strings.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn words(line: &str) -> Vec<&[u8]> {
    line.split(' ').map(str::as_bytes).collect()
}

/// Commands whose replies must be exactly Redis 7's, in order, on one connection.
/// (Not here: what differs by design, e.g. ids, INFO, COMMAND, SCAN cursors, expiry.)
const SAME_AS_REDIS: &[&str] = &[
    "PING",
    "PING hello",
    "ECHO hi",
    "FLUSHALL",
    "GET k",
    "SET k v",
    "GET k",
    "SET k w NX",
    "SET k2 w NX",
    "SET k3 w XX",
    "SET k2 x XX",
    "SET k2 y GET",
    "SET k2 y NX GET",
    "SET k v NX XX",
    "SET k v BOGUS",
    "SET k",
    "GETSET k v2",
    "GETSET new 1",
    "SETNX k x",
    "SETNX nx1 x",
    "MSET m1 1 m2 2",
    "MSET m1",
    "MSET m1 1 m2",
    "MGET m1 nope m2",
    "MSETNX m1 x m9 y",
    "MSETNX n1 x n2 y",
    "GET m9",
    "EXISTS m1 m1 nope m2",
    "DEL m1 m2 nope",
    "DEL",
    "EXISTS m1",
    "INCR c",
    "INCRBY c 41",
    "DECR c",
    "DECRBY c 51",
    "INCRBY c x",
    "INCR k",
    "SET big 9223372036854775807",
    "INCR big",
    "DECRBY c -9223372036854775808",
    "APPEND a hello",
    "APPEND a world",
    "STRLEN a",
    "STRLEN nope",
    "TYPE a",
    "TYPE nope",
    "KEYS a*",
    "NOSUCH a b",
    "NOSUCH",
    "GET",
    "GET a b",
    "SELECT 0",
    "SELECT x",
    "AUTH pw",
    "AUTH default pw",
    "AUTH someone pw",
    "CLIENT GETNAME",
    "CLIENT SETNAME tester",
    "CLIENT GETNAME",
    "CLIENT BOGUS",
    "CONFIG GET save",
    "CONFIG GET appendonly",
    "CONFIG BOGUS",
    "WAIT 0 0",
    "WAIT 0 -1",
    "WAIT x 0",
    "SCAN x",
    "HELLO 4",
    "HELLO x",
    "FLUSHDB",
    "DBSIZE",
    "SET k v",
    "DBSIZE",
    "KEYS *",
    "SCAN 0 COUNT 0",
    "QUIT",
];

/// The same commands after `HELLO 3`, where RESP3 types differ from RESP2.
const SAME_AS_REDIS_RESP3: &[&str] = &[
    "GET nope",
    "SET k v",
    "GET k",
    "MGET k nope",
    "SET k w NX",
    "SET k w GET",
    "CONFIG GET save",
    "CLIENT GETNAME",
    "HELLO 4",
    "NOSUCH x",
    "INCR k",
    "DEL k",
    "WATCH w",
    "SET w 1",
    "MULTI",
    "GET w",
    "EXEC",
    "MULTI",
    "GET w",
    "GET nope",
    "EXEC",
];

/// Expiry commands whose replies do not depend on timing (TTLs of 100 s and more
/// are read well within a second), and GETDEL.
const SAME_AS_REDIS_EXPIRY: &[&str] = &[
    "FLUSHALL",
    "SET k v EX 100",
    "TTL k",
    "SET k v PX 100000",
    "TTL k",
    "SET k v EXAT 99999999999",
    "EXPIRETIME k",
    "SET k v PXAT 99999999999000",
    "PEXPIRETIME k",
    "SET k w KEEPTTL",
    "EXPIRETIME k",
    "SET k x",
    "TTL k",
    "TTL nope",
    "PTTL k",
    "SET k v EX 0",
    "SET k v EX -1",
    "SET k v EX x",
    "SET k v EX",
    "SET k v EX 10 PX 10",
    "SET k v KEEPTTL EX 10",
    "SET k2 v NX EX 100",
    "TTL k2",
    "SET k2 v XX EX 200 GET",
    "TTL k2",
    "EXPIRE k 100",
    "TTL k",
    "EXPIRE k 50 GT",
    "EXPIRE k 200 GT",
    "TTL k",
    "EXPIRE k 300 LT",
    "EXPIRE k 10 NX",
    "EXPIRE k 10 XX",
    "TTL k",
    "EXPIRE k 10 NX XX",
    "EXPIRE k 10 BOGUS",
    "EXPIRE k x",
    "EXPIRE nope 10",
    "PEXPIRE k 100000",
    "TTL k",
    "EXPIREAT k 99999999999",
    "EXPIRETIME k",
    "PEXPIREAT k 99999999999000",
    "PEXPIRETIME k",
    "PERSIST k",
    "PERSIST k",
    "TTL k",
    "PERSIST nope",
    "GETEX k EX 100",
    "TTL k",
    "GETEX k PERSIST",
    "TTL k",
    "GETEX k",
    "GETEX nope EX 10",
    "GETEX k EX 0",
    "GETEX k BOGUS 1",
    "EXPIRE k -1",
    "EXISTS k",
    "SET d 1",
    "GETDEL d",
    "GETDEL d",
    "EXISTS d",
    // Read-modify-write commands keep the key's time to live.
    "SET n 5 EX 100",
    "INCR n",
    "TTL n",
    "INCRBY n 10",
    "DECR n",
    "DECRBY n 2",
    "TTL n",
    "APPEND n 0",
    "TTL n",
    "GET n",
    "SET s abc PX 100000",
    "APPEND s def",
    "TTL s",
    "INCR s",
    "PERSIST n",
    "INCR n",
    "TTL n",
    "MULTI",
    "SET e 1 EX 100",
    "INCR e",
    "APPEND e x",
    "TTL e",
    "EXEC",
    "TTL e",
];

/// WATCH, MULTI, EXEC, DISCARD on one connection (its own writes change watched keys too).
const SAME_AS_REDIS_MULTI: &[&str] = &[
    "FLUSHALL",
    "MULTI",
    "SET a 1",
    "INCR a",
    "GET a",
    "MGET a nope",
    "EXISTS a nope",
    "DEL nope",
    "APPEND s x",
    "APPEND s y",
    "EXEC",
    "GET a",
    "GET s",
    "MULTI",
    "MULTI",
    "DISCARD",
    "DISCARD",
    "EXEC",
    "WATCH a",
    "SET a 5",
    "MULTI",
    "INCR a",
    "EXEC",
    "GET a",
    "WATCH a",
    "MULTI",
    "INCR a",
    "EXEC",
    "GET a",
    "MULTI",
    "NOSUCH",
    "SET a 9",
    "EXEC",
    "GET a",
    "MULTI",
    "SET a",
    "EXEC",
    "WATCH nope",
    "MULTI",
    "SET nope 1",
    "EXEC",
    "GET nope",
    "UNWATCH",
    "MULTI",
    "WATCH x",
    "EXEC",
    "MULTI",
    "SET x 1 EX 100",
    "SET y 2 GET",
    "GETDEL nope",
    "SET a 10 XX",
    "INCR a",
    "EXEC",
    "TTL x",
    "GET a",
    "MULTI",
    "EXPIRE a 100",
    "GET a",
    "EXEC",
    "TTL a",
    "WATCH a b",
    "UNWATCH",
    // MULTI's own commands are matched whatever their case.
    "wAtCh a",
    "mUlTi",
    "set a 7",
    "ExEc",
    "discard",
    "Multi",
    "Discard",
    "unWATCH",
    "SET a 1",
    "MULTI",
    "GET a",
    "EXEC",
    "MULTI",
    "EXEC",
];

/// Inside EXEC every command sees the writes of those before it, as Redis runs
/// them one after the other: reads of every kind, and deadline changes of keys
/// the same EXEC wrote. (KEYS and SCAN name one key: their order is the store's.)
const SAME_AS_REDIS_EXEC_IN_ORDER: &[&str] = &[
    "FLUSHALL",
    "SET old o",
    "SET gone g EX 100",
    "MULTI",
    "SET a hello",
    "STRLEN a",
    "TYPE a",
    "EXISTS a nope",
    "GET a",
    "TTL a",
    "PTTL a",
    "EXPIRETIME a",
    "EXPIRE a 100",
    "TTL a",
    "EXPIREAT a 99999999999",
    "EXPIRETIME a",
    "PEXPIRETIME a",
    "PERSIST a",
    "PERSIST a",
    "TTL a",
    "GETEX a EX 100",
    "TTL a",
    "GETEX a PERSIST",
    "TTL a",
    "SET a world KEEPTTL",
    "TTL a",
    "PEXPIRE a 200000",
    "SET a again KEEPTTL",
    "TTL a",
    "SET a xx XX KEEPTTL GET",
    "TTL a",
    "DBSIZE",
    "KEYS a",
    "SCAN 0 MATCH a COUNT 100000",
    "DEL old",
    "TYPE old",
    "STRLEN old",
    "DBSIZE",
    "KEYS o*",
    "SCAN 0 MATCH old COUNT 100000",
    "EXPIRE gone 300 GT",
    "TTL gone",
    "PERSIST gone",
    "EXPIRE a -1",
    "EXISTS a",
    "TTL a",
    "DBSIZE",
    "GETEX a PERSIST",
    "SET a back",
    "EXPIRE a 100 NX",
    "EXPIRE a 100 NX",
    "DEL a a",
    "FLUSHDB",
    "DBSIZE",
    "KEYS *",
    "TYPE gone",
    "SET c 1",
    "DBSIZE",
    "KEYS *",
    "SCAN 0 COUNT 100000",
    "EXEC",
    "DBSIZE",
    "KEYS *",
    "TTL gone",
    "GET c",
];

fn compare_with_redis(commands: &[&str], hello3: bool) {
    let redis = RedisServer::start();
    let dkvs = ServerProcess::start(&[]);
    let mut reference = Raw::connect(redis.port);
    let mut ours = Raw::connect(dkvs.port);
    if hello3 {
        reference.call(&words("HELLO 3"));
        ours.call(&words("HELLO 3"));
    }
    for line in commands {
        let want = reference.call(&words(line));
        let got = ours.call(&words(line));
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "reply to {line:?} (hello3: {hello3})"
        );
    }
}

#[test]
fn multi_exec_replies_are_redis_byte_for_byte() {
    compare_with_redis(SAME_AS_REDIS_MULTI, false);
}

#[test]
fn exec_runs_its_commands_in_order_as_redis_byte_for_byte() {
    compare_with_redis(SAME_AS_REDIS_EXEC_IN_ORDER, false);
}

#[test]
fn expiry_replies_are_redis_byte_for_byte() {
    compare_with_redis(SAME_AS_REDIS_EXPIRY, false);
}

#[test]
fn resp2_replies_are_redis_byte_for_byte() {
    compare_with_redis(SAME_AS_REDIS, false);
}

#[test]
fn resp3_replies_are_redis_byte_for_byte() {
    compare_with_redis(SAME_AS_REDIS_RESP3, true);
}

#[test]
fn inline_commands_and_protocol_errors_are_redis_byte_for_byte() {
    let redis = RedisServer::start();
    let dkvs = ServerProcess::start(&[]);
    // Inline commands, each answered; then malformed input: the error, then the close.
    let cases: &[&[u8]] = &[
        b"PING\r\nset a b\r\nget a\nGET \"a\"\r\nECHO 'x y'\r\n",
        b"*x\r\n",
        b"*1\r\n:1\r\n",
        b"*1\r\n$x\r\n",
        b"*1\r\n$-5\r\n",
        b"SET \"unbalanced\r\n",
    ];
    for input in cases {
        let mut reference = Raw::connect(redis.port);
        let mut ours = Raw::connect(dkvs.port);
        reference.send(input);
        ours.send(input);
        // Every reply until the server closes (the first cases keep it open: stop after 5).
        for _ in 0..5 {
            if input.starts_with(b"*") || input.starts_with(b"SET \"") {
                let want = reference.reply();
                let got = ours.reply();
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want)
                );
                assert!(ours.closed(), "closed after a protocol error");
                break;
            }
            let want = reference.reply();
            let got = ours.reply();
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            );
        }
    }
    // The server still serves.
    assert_eq!(Raw::connect(dkvs.port).call(&[b"PING"]), b"+PONG\r\n");
}

#[test]
fn redis_cli_drives_every_command() {
    let server = ServerProcess::start(&[]);
    let p = server.port;
    assert_eq!(cli(p, &["PING"]), "PONG\n");
    assert_eq!(cli(p, &["SET", "greeting", "hello world"]), "OK\n");
    assert_eq!(cli(p, &["GET", "greeting"]), "hello world\n");
    assert_eq!(cli(p, &["-3", "GET", "greeting"]), "hello world\n");
    assert_eq!(cli(p, &["SET", "greeting", "x", "NX"]), "\n");
    assert_eq!(cli(p, &["GETSET", "greeting", "hi"]), "hello world\n");
    assert_eq!(cli(p, &["SETNX", "greeting", "x"]), "0\n");
    assert_eq!(cli(p, &["MSET", "a", "1", "b", "2"]), "OK\n");
    assert_eq!(cli(p, &["MGET", "a", "b", "c"]), "1\n2\n\n");
    assert_eq!(cli(p, &["MSETNX", "c", "3", "d", "4"]), "1\n");
    assert_eq!(cli(p, &["INCR", "a"]), "2\n");
    assert_eq!(cli(p, &["INCRBY", "a", "10"]), "12\n");
    assert_eq!(cli(p, &["DECR", "a"]), "11\n");
    assert_eq!(cli(p, &["DECRBY", "a", "20"]), "-9\n");
    assert_eq!(cli(p, &["APPEND", "b", "34"]), "3\n");
    assert_eq!(cli(p, &["STRLEN", "b"]), "1\n".replace('1', "3"));
    assert_eq!(cli(p, &["TYPE", "b"]), "string\n");
    assert_eq!(cli(p, &["EXISTS", "a", "b", "zz"]), "2\n");
    assert_eq!(cli(p, &["DEL", "c", "d", "zz"]), "2\n");
    assert_eq!(cli(p, &["DBSIZE"]), "3\n");
    let mut keys: Vec<String> = cli(p, &["KEYS", "*"]).lines().map(String::from).collect();
    keys.sort();
    assert_eq!(keys, ["a", "b", "greeting"]);
    let mut scanned: Vec<String> = cli(p, &["--scan"]).lines().map(String::from).collect();
    scanned.sort();
    assert_eq!(scanned, ["a", "b", "greeting"]);
    assert!(cli(p, &["DKVS.VERSION", "a"]).trim().parse::<u64>().is_ok());
    assert!(cli(p, &["INFO"]).contains("role:master"));
    assert!(cli(p, &["INFO", "keyspace"]).contains("db0:keys=3"));
    assert_eq!(cli(p, &["CONFIG", "GET", "save"]), "save\n\n");
    assert!(cli(p, &["COMMAND", "COUNT"]).trim().parse::<u32>().is_ok());
    assert!(cli(p, &["-3", "HELLO", "3"]).contains("proto 3\n"));
    assert_eq!(cli(p, &["WAIT", "0", "0"]), "0\n");
    assert_eq!(cli(p, &["SET", "k", "v", "EX", "100"]), "OK\n");
    assert_eq!(cli(p, &["TTL", "k"]), "100\n");
    assert_eq!(cli(p, &["PERSIST", "k"]), "1\n");
    assert_eq!(
        cli(p, &["NOSUCH", "x"]),
        "ERR unknown command 'NOSUCH', with args beginning with: 'x' \n\n"
    );
    assert_eq!(cli(p, &["FLUSHALL"]), "OK\n");
    assert_eq!(cli(p, &["DBSIZE"]), "0\n");
    // Binary-safe values: redis-cli -x takes the last argument from stdin as is.
    let value: Vec<u8> = (0..=255u8).chain(*b"\r\n*1\r\n").collect();
    let mut child = Command::new(redis_cli_path())
        .args(["-h", "127.0.0.1", "-p", &p.to_string(), "-x", "SET", "bin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli -x");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&value)
        .expect("value");
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.stdout, b"OK\n");
    assert_eq!(cli(p, &["STRLEN", "bin"]), format!("{}\n", value.len()));
    let mut raw = Raw::connect(p);
    let mut want = format!("${}\r\n", value.len()).into_bytes();
    want.extend_from_slice(&value);
    want.extend_from_slice(b"\r\n");
    assert_eq!(raw.call(&[b"GET", b"bin"]), want);
    // redis-cli --pipe (mass insertion) answers every command.
    let mut pipe = Vec::new();
    for i in 0..10_000 {
        pipe.extend(command(&[b"SET", format!("p{i}").as_bytes(), b"v"]));
    }
    let mut child = Command::new(redis_cli_path())
        .args(["-h", "127.0.0.1", "-p", &p.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli --pipe");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&pipe)
        .expect("pipe");
    let output = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("errors: 0, replies: 10000"), "{text}");
    assert_eq!(cli(p, &["DBSIZE"]), "10001\n");
}

#[test]
fn redis_py_resp3_default_configuration() {
    let server = ServerProcess::start(&[]);
    redis_py(&["commands".into(), server.port.to_string(), "3".into()]);
}

#[test]
fn redis_py_protocol_2() {
    let server = ServerProcess::start(&[]);
    redis_py(&["commands".into(), server.port.to_string(), "2".into()]);
}

#[test]
fn a_pipeline_of_10000_commands_is_answered_in_order() {
    let server = ServerProcess::start(&[]);
    let mut raw = Raw::connect(server.port);
    let mut batch = Vec::new();
    for i in 0..5_000 {
        let key = format!("key{i}");
        batch.extend(command(&[b"SET", key.as_bytes(), i.to_string().as_bytes()]));
        batch.extend(command(&[b"INCR", key.as_bytes()]));
    }
    // Written from a thread: the replies come back while the commands still go out.
    let mut writer = raw.reader.get_ref().try_clone().expect("clone");
    let sender = std::thread::spawn(move || writer.write_all(&batch).expect("write"));
    for i in 0..5_000 {
        assert_eq!(raw.reply(), b"+OK\r\n", "SET {i}");
        assert_eq!(
            raw.reply(),
            format!(":{}\r\n", i + 1).into_bytes(),
            "INCR {i}"
        );
    }
    sender.join().expect("sender");
}

#[test]
fn binary_and_resp_clients_share_the_store() {
    let server = ServerProcess::start(&[]);
    let mut client = server.client(Transport::Tcp);
    client.put(b"shared", b"41").expect("put");
    let mut raw = Raw::connect(server.port);
    assert_eq!(raw.call(&[b"INCR", b"shared"]), b":42\r\n");
    let got = client.get(b"shared").expect("get").expect("present");
    assert_eq!(got.value, b"42");
    let version = got.version;
    assert_eq!(
        raw.call(&[b"DKVS.VERSION", b"shared"]),
        format!(":{version}\r\n").into_bytes()
    );
}

#[test]
fn resp_off_answers_only_the_binary_protocol() {
    let server = ServerProcess::start(&["--resp", "off"]);
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    // Long enough for a frame header: the binary protocol then says it is not a frame.
    stream
        .write_all(b"PING\r\nPING\r\nPING\r\nPING\r\nPING\r\n")
        .expect("write");
    let reply = common::read_response(&mut stream);
    assert_eq!(reply.status, Ok(dkvs::protocol::Status::Malformed));
}

#[test]
fn an_oversized_bulk_is_refused_before_its_bytes_arrive() {
    let server = ServerProcess::start(&["--max-value-size", "1000"]);
    let mut raw = Raw::connect(server.port);
    // Only the header of a 100,000-byte value: refused at once, without waiting for the bytes.
    raw.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\n");
    assert_eq!(raw.reply(), b"-ERR Protocol error: invalid bulk length\r\n");
    assert!(raw.closed());
    // Within the bulk limit (keys may be 65535 bytes) but over the value limit: an error, open.
    let mut raw = Raw::connect(server.port);
    let value = vec![b'x'; 2000];
    assert_eq!(
        raw.call(&[b"SET", b"k", &value]),
        b"-ERR string exceeds maximum allowed size (proto-max-bulk-len)\r\n"
    );
    assert_eq!(raw.call(&[b"PING"]), b"+PONG\r\n");
}

#[test]
fn an_http_request_is_closed_without_a_reply() {
    let server = ServerProcess::start(&[]);
    let mut raw = Raw::connect(server.port);
    raw.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(
        raw.reply(),
        b"-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert!(raw.closed());
    assert_eq!(Raw::connect(server.port).call(&[b"PING"]), b"+PONG\r\n");
}

/// INFO replication at the master, as fields.
fn replication_info(port: u16) -> String {
    cli(port, &["INFO", "replication"])
}

#[test]
fn master_with_two_slaves_through_redis_py_and_redis_cli() {
    let master = ServerProcess::start(&[]);
    let slave1 = ServerProcess::start_slave(&master, &[]);
    let slave2 = ServerProcess::start_slave(&master, &[]);
    wait_until("both slaves are in sync", Duration::from_secs(60), || {
        let info = replication_info(master.port);
        info.contains("connected_slaves:2") && info.matches("state=online").count() == 2
    });
    let info = replication_info(master.port);
    for slave in [&slave1, &slave2] {
        assert!(
            info.contains(&format!("ip=127.0.0.1,port={},state=online", slave.port)),
            "{info}"
        );
    }
    let slave_info = replication_info(slave1.port);
    assert!(slave_info.contains("role:slave"), "{slave_info}");
    assert!(
        slave_info.contains(&format!("master_port:{}", master.port)),
        "{slave_info}"
    );
    assert_eq!(
        cli(slave1.port, &["SET", "k", "v"]),
        "READONLY You can't write against a read only replica.\n\n"
    );
    assert_eq!(cli(master.port, &["WAIT", "2", "0"]), "2\n");
    redis_py(&[
        "replicated".into(),
        master.port.to_string(),
        slave1.port.to_string(),
        slave2.port.to_string(),
    ]);
}

/// `INCR key` `n` times on each of `connections` connections at once, pipelined.
fn concurrent_incrs(port: u16, key: &[u8], connections: usize, n: usize) {
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let key = key.to_vec();
            std::thread::spawn(move || {
                let mut raw = Raw::connect(port);
                let mut batch = Vec::new();
                for _ in 0..n {
                    batch.extend(command(&[b"INCR", &key]));
                }
                raw.send(&batch);
                let mut last = 0;
                for _ in 0..n {
                    let reply = raw.reply();
                    let text = String::from_utf8_lossy(&reply);
                    let value: i64 = text
                        .strip_prefix(':')
                        .and_then(|t| t.trim_end().parse().ok())
                        .unwrap_or_else(|| panic!("INCR reply {text:?}"));
                    assert!(value > last, "replies to one connection increase");
                    last = value;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("incr thread");
    }
}

#[test]
fn concurrent_incrs_lose_nothing_with_and_without_slaves() {
    let master = ServerProcess::start(&[]);
    concurrent_incrs(master.port, b"alone", 4, 2_000);
    assert_eq!(cli(master.port, &["GET", "alone"]), "8000\n");
    // With a slave, transactions stay in flight across reactor turns: an INCR
    // whose key is in flight waits for it instead of reading a stale value.
    let slave = ServerProcess::start_slave(&master, &[]);
    wait_until("the slave is in sync", Duration::from_secs(60), || {
        replication_info(master.port).contains("state=online")
    });
    concurrent_incrs(master.port, b"shared", 4, 2_000);
    assert_eq!(cli(master.port, &["GET", "shared"]), "8000\n");
    wait_until("the slave has every INCR", Duration::from_secs(60), || {
        cli(slave.port, &["GET", "shared"]) == "8000\n"
    });
    assert_eq!(cli(master.port, &["APPEND", "shared", "x"]), "5\n");
}

/// One WATCH/GET/MULTI/SET/EXEC increment of `key`, retried while EXEC answers nil.
fn watch_increment(raw: &mut Raw, key: &[u8]) -> usize {
    for attempt in 1..=100_000 {
        assert_eq!(raw.call(&[b"WATCH", key]), b"+OK\r\n");
        let reply = raw.call(&[b"GET", key]);
        let text = String::from_utf8_lossy(&reply).into_owned();
        let n: i64 = match text.split("\r\n").nth(1) {
            Some(v) if text.starts_with('$') && !text.starts_with("$-1") => {
                v.parse().expect("a number")
            }
            _ => 0,
        };
        assert_eq!(raw.call(&[b"MULTI"]), b"+OK\r\n");
        let next = (n + 1).to_string();
        assert_eq!(raw.call(&[b"SET", key, next.as_bytes()]), b"+QUEUED\r\n");
        match raw.call(&[b"EXEC"]).as_slice() {
            b"*-1\r\n" => continue,
            b"*1\r\n+OK\r\n" => return attempt,
            other => panic!("EXEC answered {:?}", String::from_utf8_lossy(other)),
        }
    }
    panic!("no WATCH increment committed");
}

#[test]
fn watch_multi_exec_increments_lose_nothing_and_reach_the_slaves() {
    const CLIENTS: usize = 8;
    const EACH: usize = 25;
    let master = ServerProcess::start(&["--fsync", "never"]);
    let slave = ServerProcess::start_slave(&master, &["--fsync", "never"]);
    wait_until("slave in sync", Duration::from_secs(20), || {
        master.stats().num("slaves_in_sync") == 1
    });
    let port = master.port;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut raw = Raw::connect(port);
                (0..EACH)
                    .map(|_| watch_increment(&mut raw, b"ctr"))
                    .sum::<usize>()
            })
        })
        .collect();
    let attempts: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    let want = format!(
        "${}\r\n{}\r\n",
        (CLIENTS * EACH).to_string().len(),
        CLIENTS * EACH
    );
    let mut raw = Raw::connect(port);
    assert_eq!(
        String::from_utf8_lossy(&raw.call(&[b"GET", b"ctr"])),
        want,
        "{attempts} attempts"
    );
    // A MULTI of several keys reaches the slave whole.
    raw.call(&[b"MULTI"]);
    for key in [&b"t1"[..], b"t2", b"t3", b"t4"] {
        raw.call(&[b"SET", key, b"v"]);
    }
    let exec = raw.call(&[b"EXEC"]);
    assert_eq!(exec, b"*4\r\n+OK\r\n+OK\r\n+OK\r\n+OK\r\n");
    let target = master.stats().num("commit_seq");
    wait_until("slave caught up", Duration::from_secs(20), || {
        slave.stats().num("commit_seq") >= target
    });
    let mut on_slave = Raw::connect(slave.port);
    assert_eq!(
        String::from_utf8_lossy(&on_slave.call(&[b"GET", b"ctr"])),
        want
    );
    let versions: Vec<Vec<u8>> = [&b"t1"[..], b"t2", b"t3", b"t4"]
        .iter()
        .map(|k| on_slave.call(&[b"DKVS.VERSION", k]))
        .collect();
    assert!(
        versions
            .iter()
            .all(|v| v == &versions[0] && v.starts_with(b":")),
        "{versions:?}"
    );
}

#[test]
fn keys_past_their_deadline_are_not_counted_before_their_deletion_commits() {
    const LIMIT: Duration = Duration::from_secs(20);
    // Two in-sync slaves required and one frozen: the master cannot commit the
    // deletion of the expired keys, so the master and the other slave hold them.
    let master = ServerProcess::start(&["--fsync", "never", "--min-slaves", "2"]);
    let follower =
        ServerProcess::start_slave(&master, &["--fsync", "never", "--serve-stale-reads"]);
    let mut frozen = ServerProcess::start_slave(&master, &["--fsync", "never"]);
    wait_until("slaves in sync", LIMIT, || {
        master.stats().num("slaves_in_sync") == 2
    });
    cli(master.port, &["SET", "plain", "1"]);
    cli(master.port, &["SET", "t1", "v", "PX", "700"]);
    cli(master.port, &["SET", "t2", "v", "PX", "700"]);
    let target = master.stats().num("commit_seq");
    wait_until("the follower caught up", LIMIT, || {
        follower.stats().num("commit_seq") >= target
    });
    assert_eq!(cli(follower.port, &["DBSIZE"]), "3\n");
    frozen.stop();
    std::thread::sleep(Duration::from_millis(1_000));
    for server in [&master, &follower] {
        let port = server.port;
        assert_eq!(cli(port, &["DBSIZE"]), "1\n", "server :{port}");
        assert_eq!(cli(port, &["KEYS", "*"]), "plain\n", "server :{port}");
        assert_eq!(
            cli(port, &["SCAN", "0", "COUNT", "100000"]),
            "0\nplain\n",
            "server :{port}"
        );
        assert_eq!(cli(port, &["EXISTS", "t1", "t2"]), "0\n", "server :{port}");
        let stats = server.stats();
        assert_eq!(stats.num("keys"), 1, "server :{port}: {}", stats.text);
        assert_eq!(stats.num("keys_held"), 3, "deletions not committed");
        let info = cli(port, &["INFO", "keyspace"]);
        assert!(info.contains("db0:keys=1,"), "server :{port}: {info}");
    }
    frozen.resume();
}
