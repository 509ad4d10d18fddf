//! `dkvs-server --forward-writes`: a slave forwards its RESP clients' writes
//! to the master and answers with the master's reply once it has applied the
//! write itself (docs/PROTOCOL.md §11.8). Real processes: a master, a
//! forwarding slave and a plain one, driven by redis-cli, redis-py and raw
//! RESP connections.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::EtcdProcess;
use common::{ServerProcess, wait_until};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
const READONLY: &str = "READONLY You can't write against a read only replica.\n\n";

fn redis_cli() -> PathBuf {
    std::env::var_os("DKVS_REDIS_CLI").map_or_else(|| PathBuf::from("redis-cli"), PathBuf::from)
}

/// `redis-cli -p PORT ARGS...` (not a terminal: raw values, one per line;
/// an error is followed by an empty line).
fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new(redis_cli())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli (apt-get install -y redis-tools, or set DKVS_REDIS_CLI)");
    assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The Python with the `redis` package (`$DKVS_REDIS_PYTHON`, else the
/// virtualenv `.ci/run` makes under target/).
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
        "no Python with the redis package at {} (set DKVS_REDIS_PYTHON)",
        path.display()
    );
    path
}

/// Run `script` (Python, with `redis` imported and `PORT` set) against `port`.
fn redis_py(port: u16, script: &str) {
    let program = format!("import redis, sys\nPORT = {port}\n{script}");
    let output = Command::new(python())
        .args(["-c", &program])
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "redis-py script failed:\n{script}\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
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

    fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.send(&command(args));
        self.reply()
    }

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
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A master, a slave with `--forward-writes` (and `extra` flags) and a plain
/// slave, all in sync.
fn cluster(extra: &[&str]) -> (ServerProcess, ServerProcess, ServerProcess) {
    let master = ServerProcess::start(&[]);
    // Stale reads served: a read at the slave right after a forwarded write
    // shows what this slave has applied (never MASTERDOWN because a read
    // lease lapsed on a loaded test machine), so it proves read-your-writes.
    let mut args = vec!["--forward-writes", "--serve-stale-reads"];
    args.extend_from_slice(extra);
    let forwarding = ServerProcess::start_slave(&master, &args);
    let plain = ServerProcess::start_slave(&master, &[]);
    wait_until("both slaves are in sync", Duration::from_secs(60), || {
        let info = cli(master.port, &["INFO", "replication"]);
        info.matches("state=online").count() == 2
    });
    for slave in [&forwarding, &plain] {
        wait_until("the slave follows", Duration::from_secs(60), || {
            cli(slave.port, &["INFO", "replication"]).contains("master_link_status:up")
        });
    }
    (master, forwarding, plain)
}

/// Write commands and what they exercise; each runs at the slave on `s:` keys
/// and at the master on `m:` keys, and the replies must be the same bytes.
const WRITES: &[&str] = &[
    "SET {}a 1",
    "SET {}a 2 NX",
    "SET {}a 3 XX GET",
    "SET {}b 5 EX 100",
    "SET {}c x PX 100000 GET",
    "SET {}a 9 KEEPTTL",
    "GETSET {}a 10",
    "SETNX {}a 11",
    "SETNX {}d 1",
    "INCR {}n",
    "INCRBY {}n 10",
    "DECR {}n",
    "DECRBY {}n 3",
    "INCR {}a2",
    "APPEND {}a2 xyz",
    "INCR {}a2",
    "MSET {}m1 1 {}m2 2",
    "MSETNX {}m1 1 {}m3 3",
    "MSETNX {}m4 4 {}m5 5",
    "EXPIRE {}m1 100",
    "EXPIRE {}m1 50 GT",
    "PEXPIRE {}m1 500000 NX",
    "EXPIREAT {}m2 99999999999",
    "PEXPIREAT {}m2 99999999999999 LT",
    "PERSIST {}m2",
    "PERSIST {}m2",
    "GETEX {}m3 EX 100",
    "GETEX {}m3 PERSIST",
    "GETEX {}missing EX 5",
    "GETDEL {}m4",
    "GETDEL {}m4",
    "DEL {}m5 {}m4 {}nothing",
    "EXPIRE {}m5 0",
    "SET {}e 1 EX 0",
    "SET {}e 1 NX XX",
    "INCRBY {}n notanumber",
];

fn run_writes(raw: &mut Raw, prefix: &str) -> Vec<Vec<u8>> {
    WRITES
        .iter()
        .map(|line| {
            let line = line.replace("{}", prefix);
            let args: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
            raw.call(&args)
        })
        .collect()
}

#[test]
fn writes_at_a_forwarding_slave_get_the_masters_replies_and_land_everywhere() {
    let (master, slave, plain) = cluster(&[]);
    for hello3 in [false, true] {
        let mut at_slave = Raw::connect(slave.port);
        let mut at_master = Raw::connect(master.port);
        if hello3 {
            at_slave.call(&[b"HELLO", b"3"]);
            at_master.call(&[b"HELLO", b"3"]);
        }
        let p = if hello3 { "3" } else { "2" };
        let from_slave = run_writes(&mut at_slave, &format!("s{p}:"));
        let from_master = run_writes(&mut at_master, &format!("m{p}:"));
        for ((line, s), m) in WRITES.iter().zip(&from_slave).zip(&from_master) {
            assert_eq!(
                String::from_utf8_lossy(s),
                String::from_utf8_lossy(m),
                "RESP{p} {line}: the slave's reply differs from the master's"
            );
        }
        // Read at once, on the same connection and on a new one: this slave has applied them.
        let s = format!("s{p}:");
        assert_eq!(
            at_slave.call(&[b"GET", format!("{s}a").as_bytes()]),
            b"$2\r\n10\r\n"
        );
        assert_eq!(cli(slave.port, &["GET", &format!("{s}n")]), "7\n");
        assert_eq!(cli(slave.port, &["GET", &format!("{s}a2")]), "1xyz\n");
        assert_eq!(cli(slave.port, &["EXISTS", &format!("{s}m4")]), "0\n");
        assert_eq!(cli(master.port, &["GET", &format!("{s}n")]), "7\n");
        wait_until("the plain slave has them", Duration::from_secs(30), || {
            cli(plain.port, &["GET", &format!("{s}a2")]) == "1xyz\n"
        });
    }
    // redis-cli at the forwarding slave, read back there at once.
    assert_eq!(cli(slave.port, &["SET", "cli", "hello"]), "OK\n");
    // WAIT goes to the master too: both slaves hold every acknowledged write.
    assert_eq!(cli(slave.port, &["WAIT", "2", "0"]), "2\n");
    assert!(
        cli(plain.port, &["WAIT", "2", "0"]).starts_with("ERR WAIT cannot be used with replica")
    );
    assert_eq!(cli(slave.port, &["GET", "cli"]), "hello\n");
    assert_eq!(cli(slave.port, &["INCR", "cli:n"]), "1\n");
    assert_eq!(cli(slave.port, &["GET", "cli:n"]), "1\n");
    assert_eq!(cli(master.port, &["GET", "cli"]), "hello\n");
    wait_until("the plain slave has it", Duration::from_secs(30), || {
        cli(plain.port, &["GET", "cli"]) == "hello\n"
    });
    // Without the flag: READONLY, as before.
    assert_eq!(cli(plain.port, &["SET", "k", "v"]), READONLY);
    assert_eq!(cli(plain.port, &["FLUSHDB"]), READONLY);
    // redis-py, in its default configuration (RESP3) and with protocol=2.
    for protocol in ["3", "2"] {
        let connect = if protocol == "3" {
            "r = redis.Redis(host='127.0.0.1', port=PORT, socket_timeout=30)"
        } else {
            "r = redis.Redis(host='127.0.0.1', port=PORT, protocol=2, socket_timeout=30)"
        };
        redis_py(
            slave.port,
            &format!(
                "{connect}
k = 'py{protocol}:'
assert r.set(k + 'a', b'\\x00\\r\\nbin') is True
assert r.get(k + 'a') == b'\\x00\\r\\nbin', r.get(k + 'a')
assert r.incr(k + 'n') == 1
assert r.incrby(k + 'n', 41) == 42
assert r.get(k + 'n') == b'42'
assert r.set(k + 'a', 'x', nx=True) is None
assert r.getset(k + 'a', 'y') == b'\\x00\\r\\nbin'
assert r.mset({{k + 'm1': '1', k + 'm2': '2'}}) is True
assert r.mget([k + 'm1', k + 'm2']) == [b'1', b'2']
assert r.delete(k + 'm1', k + 'm2', k + 'none') == 2
assert r.expire(k + 'a', 100) is True
assert 0 < r.ttl(k + 'a') <= 100
assert r.persist(k + 'a') is True
assert r.ttl(k + 'a') == -1
p = r.pipeline(transaction=True)
p.set(k + 't', 1).incr(k + 't').get(k + 't')
assert p.execute() == [True, 2, b'2']
assert r.get(k + 't') == b'2'
try:
    r.incr(k + 'a')
    raise SystemExit('incr of a string: no error')
except redis.ResponseError as e:
    assert 'not an integer' in str(e), e
"
            ),
        );
        assert_eq!(
            cli(master.port, &["GET", &format!("py{protocol}:n")]),
            "42\n"
        );
        wait_until("the plain slave has it", Duration::from_secs(30), || {
            cli(plain.port, &["GET", &format!("py{protocol}:t")]) == "2\n"
        });
    }
    // FLUSHALL through the slave empties every replica.
    assert_eq!(cli(slave.port, &["FLUSHALL"]), "OK\n");
    assert_eq!(cli(slave.port, &["DBSIZE"]), "0\n");
    assert_eq!(cli(master.port, &["DBSIZE"]), "0\n");
    wait_until("the plain slave is empty", Duration::from_secs(30), || {
        cli(plain.port, &["DBSIZE"]) == "0\n"
    });
    // The counters.
    let info = cli(slave.port, &["INFO", "stats"]);
    let forwarded: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("forwarded_writes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no forwarded_writes in {info}"));
    assert!(forwarded >= 2 * WRITES.len() as u64, "{info}");
    assert!(
        info.contains("forwarded_writes_outcome_unknown:0"),
        "{info}"
    );
    let stats = slave
        .client(dkvs::client::Transport::Tcp)
        .stats()
        .expect("stats");
    assert!(stats.contains("forwarded_writes "), "{stats}");
    // The binary protocol still redirects.
    let mut binary = slave.client(dkvs::client::Transport::Tcp);
    let redirected = binary.put(b"bin", b"v");
    assert!(
        redirected.is_ok(),
        "the client follows the redirect: {redirected:?}"
    );
}

#[test]
fn multi_exec_with_writes_is_forwarded_whole_and_watch_is_refused() {
    let (master, slave, _plain) = cluster(&[]);
    let mut raw = Raw::connect(slave.port);
    assert_eq!(raw.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(raw.call(&[b"SET", b"t", b"1"]), b"+QUEUED\r\n");
    assert_eq!(raw.call(&[b"INCR", b"t"]), b"+QUEUED\r\n");
    assert_eq!(raw.call(&[b"GET", b"t"]), b"+QUEUED\r\n");
    assert_eq!(raw.call(&[b"GET", b"none"]), b"+QUEUED\r\n");
    assert_eq!(
        raw.call(&[b"EXEC"]),
        b"*4\r\n+OK\r\n:2\r\n$1\r\n2\r\n$-1\r\n"
    );
    assert_eq!(raw.call(&[b"GET", b"t"]), b"$1\r\n2\r\n");
    assert_eq!(cli(master.port, &["GET", "t"]), "2\n");
    // A queue the master refuses as a whole.
    assert_eq!(raw.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(raw.call(&[b"SET", b"t"]).first(), Some(&b'-'));
    assert_eq!(
        raw.call(&[b"EXEC"]),
        b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    // Reads only: run here, as without the flag.
    assert_eq!(raw.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(raw.call(&[b"GET", b"t"]), b"+QUEUED\r\n");
    assert_eq!(raw.call(&[b"EXEC"]), b"*1\r\n$1\r\n2\r\n");
    // A command that would change the shared link's state on the master: refused.
    assert_eq!(raw.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(raw.call(&[b"SET", b"t", b"8"]), b"+QUEUED\r\n");
    assert_eq!(raw.call(&[b"HELLO", b"3"]), b"+QUEUED\r\n");
    let refused = String::from_utf8_lossy(&raw.call(&[b"EXEC"])).into_owned();
    assert!(refused.contains("('hello' does not)"), "{refused}");
    assert_eq!(raw.call(&[b"GET", b"t"]), b"$1\r\n2\r\n");
    // WATCH could not guard a forwarded EXEC: refused, nothing written.
    assert_eq!(raw.call(&[b"WATCH", b"t"]), b"+OK\r\n");
    assert_eq!(raw.call(&[b"MULTI"]), b"+OK\r\n");
    assert_eq!(raw.call(&[b"SET", b"t", b"9"]), b"+QUEUED\r\n");
    let refused = String::from_utf8_lossy(&raw.call(&[b"EXEC"])).into_owned();
    assert!(
        refused.starts_with("-ERR dkvs: a slave cannot forward a WATCHed"),
        "{refused}"
    );
    assert_eq!(cli(master.port, &["GET", "t"]), "2\n");
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
fn incrs_from_several_clients_at_a_slave_end_at_the_exact_total() {
    let (master, slave, plain) = cluster(&[]);
    // 4 × 1000 pipelined: past the per-connection cap, so backpressure is exercised too.
    concurrent_incrs(slave.port, b"counter", 4, 1_000);
    assert_eq!(cli(slave.port, &["GET", "counter"]), "4000\n");
    assert_eq!(cli(master.port, &["GET", "counter"]), "4000\n");
    wait_until(
        "the plain slave has every INCR",
        Duration::from_secs(30),
        || cli(plain.port, &["GET", "counter"]) == "4000\n",
    );
    let info = cli(slave.port, &["INFO", "stats"]);
    assert!(info.contains("forwarded_writes_in_flight:0"), "{info}");
}

#[test]
fn a_pipeline_of_1000_mixed_commands_at_a_slave_is_answered_in_order() {
    let (_master, slave, _plain) = cluster(&[]);
    let mut raw = Raw::connect(slave.port);
    let mut batch = Vec::new();
    let mut expected: Vec<Vec<u8>> = Vec::new();
    for i in 0..250 {
        let value = i.to_string();
        batch.extend(command(&[b"SET", b"p", value.as_bytes()]));
        expected.push(b"+OK\r\n".to_vec());
        batch.extend(command(&[b"GET", b"p"]));
        expected.push(format!("${}\r\n{value}\r\n", value.len()).into_bytes());
        batch.extend(command(&[b"INCR", b"pc"]));
        expected.push(format!(":{}\r\n", i + 1).into_bytes());
        batch.extend(command(&[b"ECHO", value.as_bytes()]));
        expected.push(format!("${}\r\n{value}\r\n", value.len()).into_bytes());
    }
    raw.send(&batch);
    for (i, want) in expected.iter().enumerate() {
        let got = raw.reply();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want),
            "reply {i} of the pipeline"
        );
    }
}

#[test]
fn forwarding_authenticates_with_the_masterauth_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "s3cret\n").expect("write password");
    let pass = pass.display().to_string();
    let master = ServerProcess::start(&["--requirepass-file", &pass]);
    let with = ServerProcess::start_slave(
        &master,
        &[
            "--forward-writes",
            "--serve-stale-reads",
            "--masterauth-file",
            &pass,
        ],
    );
    let without = ServerProcess::start_slave(&master, &["--forward-writes"]);
    for slave in [&with, &without] {
        wait_until("the slave follows", Duration::from_secs(60), || {
            cli(slave.port, &["INFO", "replication"]).contains("master_link_status:up")
        });
    }
    assert_eq!(cli(with.port, &["SET", "k", "v"]), "OK\n");
    assert_eq!(cli(with.port, &["GET", "k"]), "v\n");
    assert_eq!(
        cli(
            master.port,
            &["-a", "s3cret", "--no-auth-warning", "GET", "k"]
        ),
        "v\n"
    );
    // Without it the master's own answer comes back.
    assert_eq!(
        cli(without.port, &["SET", "k", "w"]),
        "NOAUTH Authentication required.\n\n"
    );
}

#[test]
fn a_dead_master_fails_forwarded_writes_promptly_and_the_slave_keeps_serving() {
    let master = ServerProcess::start(&[]);
    let slave = ServerProcess::start_slave(&master, &["--forward-writes", "--serve-stale-reads"]);
    wait_until("the slave follows", Duration::from_secs(60), || {
        cli(slave.port, &["INFO", "replication"]).contains("master_link_status:up")
    });
    let mut raw = Raw::connect(slave.port);
    assert_eq!(raw.call(&[b"SET", b"k", b"before"]), b"+OK\r\n");
    // A write the master received but never answered: its outcome is unknown.
    let mut master = master;
    master.stop();
    raw.send(&command(&[b"SET", b"k", b"during"]));
    std::thread::sleep(Duration::from_millis(300));
    master.signal("KILL");
    let started = Instant::now();
    assert_eq!(
        String::from_utf8_lossy(&raw.reply()),
        "-ERR forwarded write outcome unknown: link to master lost\r\n"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered promptly"
    );
    // Writes after that are never sent: MASTERDOWN, at once.
    for _ in 0..3 {
        let started = Instant::now();
        let reply = String::from_utf8_lossy(&raw.call(&[b"INCR", b"n"])).into_owned();
        assert!(
            reply.starts_with("-MASTERDOWN forwarded write not sent: "),
            "{reply}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered promptly"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The slave keeps serving.
    assert_eq!(raw.call(&[b"PING"]), b"+PONG\r\n");
    assert_eq!(raw.call(&[b"GET", b"k"]), b"$6\r\nbefore\r\n");
    let info = cli(slave.port, &["INFO", "stats"]);
    assert!(
        info.contains("forwarded_writes_outcome_unknown:1"),
        "{info}"
    );
}

#[test]
fn help_describes_forward_writes() {
    let output = Command::new(common::bin("dkvs-server"))
        .arg("--help")
        .output()
        .expect("run dkvs-server --help");
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--forward-writes"), "{help}");
    assert!(help.contains("--masterauth-file"), "{help}");
    // A password file that cannot be used is a bad flag: exit 2, before serving.
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let missing = dir.path().join("missing").display().to_string();
    let empty = empty.display().to_string();
    for args in [
        vec!["--forward-writes", "--masterauth-file", missing.as_str()],
        vec!["--forward-writes", "--masterauth-file", empty.as_str()],
        vec!["--masterauth-file", empty.as_str()],
    ] {
        let output = Command::new(common::bin("dkvs-server"))
            .args(["-p", "0", "-d"])
            .arg(dir.path().join("data"))
            .args(&args)
            .output()
            .expect("run dkvs-server");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("masterauth-file"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_silent_master_fails_forwarded_writes_after_the_reply_timeout() {
    let mut master = ServerProcess::start(&[]);
    let slave = ServerProcess::start_slave(&master, &["--forward-writes", "--serve-stale-reads"]);
    wait_until("the slave follows", Duration::from_secs(60), || {
        cli(slave.port, &["INFO", "replication"]).contains("master_link_status:up")
    });
    let mut raw = Raw::connect(slave.port);
    assert_eq!(raw.call(&[b"SET", b"k", b"before"]), b"+OK\r\n");
    // Stopped, as a master behind a partition: the link stays open and silent.
    master.stop();
    let started = Instant::now();
    raw.send(&command(&[b"SET", b"k", b"during"]));
    raw.send(&command(&[b"GET", b"k"]));
    assert_eq!(
        String::from_utf8_lossy(&raw.reply()),
        "-ERR forwarded write outcome unknown: link to master lost".to_string() + "\r\n"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "given up after the 5 s reply timeout, not before and not never: {waited:?}"
    );
    // The read behind it is served, from what this slave holds.
    assert_eq!(raw.reply(), b"$6\r\nbefore\r\n");
    master.resume();
}

/// The port of the server that is master now and takes writes, waiting for one.
fn writable_master(servers: &[&ServerProcess]) -> usize {
    let mut found = 0;
    wait_until(
        "a master that takes writes",
        Duration::from_secs(60),
        || {
            servers.iter().enumerate().any(|(i, s)| {
                let master = cli(s.port, &["INFO", "replication"]).contains("role:master")
                    && cli(s.port, &["SET", "probe", "x"]) == "OK\n";
                if master {
                    found = i;
                }
                master
            })
        },
    );
    found
}

#[test]
fn after_a_failover_slaves_forward_to_the_new_leader() {
    common::etcd::require_etcd();
    let etcd = EtcdProcess::start();
    let url = EtcdProcess::urls(std::slice::from_ref(&etcd)).join(",");
    let mut servers: Vec<ServerProcess> = (0..3)
        .map(|_| {
            ServerProcess::start(&[
                "--etcd",
                &url,
                "--cluster",
                "forward",
                "--lease-ttl-ms",
                "2000",
                "--forward-writes",
                "--serve-stale-reads",
            ])
        })
        .collect();
    let all: Vec<&ServerProcess> = servers.iter().collect();
    let first = writable_master(&all);
    let slaves: Vec<usize> = (0..3).filter(|&i| i != first).collect();
    for &i in &slaves {
        wait_until("the slave forwards", Duration::from_secs(60), || {
            cli(servers[i].port, &["SET", "before", "1"]) == "OK\n"
        });
        assert_eq!(cli(servers[i].port, &["GET", "before"]), "1\n");
    }
    assert_eq!(cli(servers[first].port, &["GET", "before"]), "1\n");
    servers[first].kill9();
    let rest: Vec<&ServerProcess> = slaves.iter().map(|&i| &servers[i]).collect();
    let second = slaves[writable_master(&rest)];
    let slave = slaves
        .iter()
        .copied()
        .find(|&i| i != second)
        .unwrap_or(second);
    // The surviving slave follows the new leader and forwards there (writes
    // during the election get MASTERDOWN or "outcome unknown", never a hang).
    wait_until(
        "the slave forwards to the new leader",
        Duration::from_secs(60),
        || {
            let reply = cli(servers[slave].port, &["INCR", "after"]);
            assert!(
                reply.chars().next().is_some_and(|c| c.is_ascii_digit())
                    || reply.starts_with("MASTERDOWN")
                    || reply.starts_with("ERR forwarded write outcome unknown"),
                "{reply}"
            );
            reply.chars().next().is_some_and(|c| c.is_ascii_digit())
        },
    );
    let at_leader = cli(servers[second].port, &["GET", "after"]);
    assert_eq!(cli(servers[slave].port, &["GET", "after"]), at_leader);
    assert_eq!(cli(servers[second].port, &["GET", "before"]), "1\n");
}

#[test]
fn an_idle_link_the_master_closed_is_dialled_again_by_the_next_write() {
    let master = ServerProcess::start(&["--timeout", "1"]);
    // A --masterauth-file the master does not need (it has no password) is no obstacle.
    let dir = tempfile::tempdir().expect("temp dir");
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "unneeded\n").expect("write password");
    let pass = pass.display().to_string();
    let slave = ServerProcess::start_slave(
        &master,
        &[
            "--forward-writes",
            "--serve-stale-reads",
            "--masterauth-file",
            &pass,
        ],
    );
    wait_until("the slave follows", Duration::from_secs(60), || {
        cli(slave.port, &["INFO", "replication"]).contains("master_link_status:up")
    });
    assert_eq!(cli(slave.port, &["SET", "k", "1"]), "OK\n");
    // The master's idle timeout closes the forwarding link (not the replication link).
    wait_until(
        "the master closed the idle link",
        Duration::from_secs(30),
        || {
            let stats = master
                .client(dkvs::client::Transport::Tcp)
                .stats()
                .expect("stats");
            stats.lines().any(|l| {
                l.strip_prefix("connections_closed_idle ")
                    .is_some_and(|n| n.trim() != "0")
            })
        },
    );
    std::thread::sleep(Duration::from_millis(100));
    // Not a failure of the master: the next write dials again at once.
    assert_eq!(cli(slave.port, &["SET", "k", "2"]), "OK\n");
    assert_eq!(cli(slave.port, &["GET", "k"]), "2\n");
    let stats = slave
        .client(dkvs::client::Transport::Tcp)
        .stats()
        .expect("stats");
    assert!(stats.contains("forward_links_opened 2"), "{stats}");
    assert!(stats.contains("forwarded_writes_refused 0"), "{stats}");
}
