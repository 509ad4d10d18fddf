//! dkvs-load end to end: the real load generator against the real server on a free port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Kills the server when the test ends, passed or failed.
struct ServerGuard {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port in the server's ready line: the last token that is a socket address.
fn port_of_ready_line(line: &str) -> Option<u16> {
    line.split_whitespace()
        .rev()
        .filter_map(|token| {
            token
                .trim_matches(|c: char| c == ',' || c == '(' || c == ')')
                .parse::<SocketAddr>()
                .ok()
        })
        .map(|addr| addr.port())
        .next()
}

fn start_server() -> ServerGuard {
    start_server_with(&[])
}

/// `dkvs-server -p 0 -l error ARGS...`, once it has printed its ready line.
fn start_server_with(args: &[&str]) -> ServerGuard {
    // A temporary working directory keeps any data the server writes out of the source tree.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dkvs-server"))
        .args(["-p", "0", "-l", "error"])
        .args(args)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dkvs-server");
    let stdout = child.stdout.take().expect("server stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(line)) = lines.next() {
            if let Some(port) = port_of_ready_line(&line) {
                let _ = tx.send(port);
                break;
            }
        }
        // Keep draining so the server never blocks on a full pipe.
        for _ in lines {}
    });
    let guard_dir = dir;
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(port) => ServerGuard {
            child,
            port,
            _dir: guard_dir,
        },
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dkvs-server printed no ready line with its address within 10 s");
        }
    }
}

fn load(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dkvs-load"))
        .args(args)
        .output()
        .expect("run dkvs-load")
}

/// The text of `"key":value` in a flat JSON object (numbers and null only; enough here).
fn json_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let start = json.find(&pattern)? + pattern.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn run_json(port: u16, extra: &[&str]) -> String {
    let port = port.to_string();
    let mut args = vec![
        "--port",
        &port,
        "--ops",
        "2000",
        "--json",
        "--quiet",
        "--connections",
        "8",
    ];
    args.extend_from_slice(extra);
    let out = load(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dkvs-load failed: {stderr}");
    let last = stdout.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with('{') && last.ends_with('}'),
        "last stdout line is not a JSON object: {last:?}"
    );
    last
}

fn assert_clean_run(json: &str) {
    assert_eq!(json_field(json, "ops"), Some("2000"), "{json}");
    assert_eq!(json_field(json, "errors"), Some("0"), "{json}");
    for key in [
        "duration_s",
        "ops_per_sec",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
    ] {
        let value: f64 = json_field(json, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} missing or not a number in {json}"));
        assert!(value > 0.0, "{key} = {value}");
    }
    assert!(json.contains("\"errors_by_kind\":{"), "{json}");
}

#[test]
fn tcp_run_completes_every_op_without_errors() {
    let server = start_server();
    let json = run_json(server.port, &["--pipeline", "4", "--get-ratio", "0.5"]);
    assert_clean_run(&json);
    assert!(json.contains("\"transport\":\"tcp\""));
}

#[test]
fn udp_run_completes_every_op_without_errors() {
    let server = start_server();
    let json = run_json(
        server.port,
        &["--udp", "--pipeline", "4", "--get-ratio", "0.5"],
    );
    assert_clean_run(&json);
    assert!(json.contains("\"transport\":\"udp\""));
}

#[test]
fn preload_then_reads_all_hit() {
    let server = start_server();
    let json = run_json(
        server.port,
        &[
            "--preload",
            "--keyspace",
            "500",
            "--get-ratio",
            "1",
            "--distribution",
            "zipf",
            "--threads",
            "2",
        ],
    );
    assert_clean_run(&json);
    assert_eq!(json_field(&json, "get_misses"), Some("0"), "{json}");
}

#[test]
fn unreachable_server_fails_fast() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let start = Instant::now();
    let out = load(&["--port", &port.to_string(), "--ops", "10"]);
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(2), "not a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn bad_flags_exit_2() {
    for args in [
        &["--pipeline", "0"][..],
        &["--distribution", "pareto"],
        &["--udp", "--protocol", "resp"],
    ] {
        let out = load(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

/// A master and one slave of it; both killed when dropped (fields drop in order).
struct Replicated {
    slave: ServerGuard,
    master: ServerGuard,
}

/// STATS of the server on `port` through the real CLI, as `name value` lines.
fn cli_stats(port: u16) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dkvs-client"))
        .args(["-p", &port.to_string(), "stats"])
        .output()
        .expect("run dkvs-client");
    assert!(
        out.status.success(),
        "dkvs-client stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The numeric value of `name` in STATS text, if present.
fn stat(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Poll (every 50 ms, at most `limit`) until `condition` holds; panic naming `what` if not.
fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "not {what} within {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A master and a slave that the master counts in sync.
fn start_replicated() -> Replicated {
    let master = start_server();
    let master_port = master.port.to_string();
    let slave = start_server_with(&["-m", "127.0.0.1", "-q", &master_port]);
    wait_until("the slave is in sync", Duration::from_secs(15), || {
        stat(&cli_stats(master.port), "slaves_in_sync") == Some(1)
    });
    Replicated { slave, master }
}

fn num(json: &str, key: &str) -> u64 {
    json_field(json, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} missing or not a number in {json}"))
}

/// Load a slave with half writes: every write is redirected, and must reach the master.
fn follows_redirects_over(transport: &[&str]) {
    let servers = start_replicated();
    let port = servers.slave.port.to_string();
    let mut args = vec!["--port", &port, "--ops", "2000", "--get-ratio", "0.5"];
    args.extend_from_slice(&["--json", "--quiet", "--connections", "8"]);
    args.extend_from_slice(transport);
    let out = load(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dkvs-load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = stdout.lines().last().unwrap_or_default();
    assert_clean_run(json);
    assert!(num(json, "redirects") > 0, "no redirect followed: {json}");
    assert!(num(json, "sets") > 0, "{json}");
    assert_eq!(json_field(json, "redirect_failed"), Some("0"), "{json}");
    assert_eq!(json_field(json, "follow_redirects"), Some("true"), "{json}");

    let master = cli_stats(servers.master.port);
    assert!(
        stat(&master, "commit_seq").is_some_and(|s| s > 0),
        "{master}"
    );
    let master_keys = stat(&master, "keys").expect("keys in master STATS");
    assert!(master_keys > 0, "{master}");
    wait_until(
        "the slave holds the master's keys",
        Duration::from_secs(10),
        || stat(&cli_stats(servers.slave.port), "keys") == Some(master_keys),
    );
}

#[test]
fn tcp_load_on_a_slave_follows_redirects_to_the_master() {
    follows_redirects_over(&["--pipeline", "4"]);
}

#[test]
fn udp_load_on_a_slave_follows_redirects_to_the_master() {
    follows_redirects_over(&["--udp", "--pipeline", "4"]);
}

#[test]
fn no_follow_redirects_counts_them_as_errors() {
    let servers = start_replicated();
    let json = run_json(
        servers.slave.port,
        &["--get-ratio", "0.5", "--no-follow-redirects"],
    );
    let redirected = num(&json, "REDIRECT");
    assert!(redirected > 0, "{json}");
    assert_eq!(num(&json, "errors"), redirected, "{json}");
    assert_eq!(num(&json, "ops") + redirected, 2000, "{json}");
    assert_eq!(json_field(&json, "redirects"), Some("0"), "{json}");
    assert_eq!(
        json_field(&json, "follow_redirects"),
        Some("false"),
        "{json}"
    );
    assert_eq!(
        stat(&cli_stats(servers.master.port), "commit_seq"),
        Some(0),
        "no write may reach the master"
    );
}

/// A run against a target whose redirects cannot be followed: it must end promptly, count
/// the bad target once per connection (8), and end every write as a REDIRECT error.
fn assert_unfollowable(port: u16, extra: &[&str], reason: &str) {
    let start = Instant::now();
    let mut args = vec!["--get-ratio", "0.5"];
    args.extend_from_slice(extra);
    let json = run_json(port, &args);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(num(&json, "redirect_failed"), 8, "{json}");
    let redirected = num(&json, "REDIRECT");
    assert!(redirected > 0, "{json}");
    assert_eq!(num(&json, "ops") + redirected, 2000, "{json}");
    assert_eq!(num(&json, "errors"), redirected + 8, "{json}");
    assert!(json.contains(reason), "expected {reason:?} in {json}");
}

#[test]
fn unreachable_master_is_one_error_per_connection_not_a_hang() {
    let dead = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port().to_string()
    };
    // A slave starts and serves reads without its master; it still redirects writes there.
    let slave = start_server_with(&["-m", "127.0.0.1", "-q", &dead]);
    assert_unfollowable(slave.port, &["--pipeline", "4"], "cannot connect to master");
    assert_unfollowable(slave.port, &["--udp", "--pipeline", "4"], "does not answer");
}

/// A fake dkvs slave on TCP: PONG to PING, NOT_FOUND to reads, and every write redirected to
/// `target`. Its threads end with the test process.
fn fake_slave(target: &'static [u8]) -> u16 {
    use dkvs::protocol::{Decoded, Opcode, Status, decode, encode_response};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut out = Vec::new();
                loop {
                    let n = match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let mut pos = 0;
                    while let Ok(Decoded::Frame(frame, used)) = decode(&buf[pos..], 1 << 20) {
                        let (op, id) = (frame.header.opcode, frame.header.request_id);
                        let (status, value) = match op {
                            o if o == Opcode::Ping as u8 => (Status::Ok, &b"PONG"[..]),
                            o if o == Opcode::Get as u8 => (Status::NotFound, &b""[..]),
                            _ => (Status::Redirect, target),
                        };
                        encode_response(&mut out, op, status, id, 0, value);
                        pos += used;
                    }
                    buf.drain(..pos);
                    if stream.write_all(&out).is_err() {
                        return;
                    }
                    out.clear();
                }
            });
        }
    });
    port
}

#[test]
fn unparsable_redirect_target_is_one_error_per_connection() {
    let port = fake_slave(b"no port here");
    assert_unfollowable(port, &["--pipeline", "4"], "is not host:port");
}
