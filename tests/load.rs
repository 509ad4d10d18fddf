//! dkvs-load end to end: the real load generator against the real server on a free port.

use std::io::{BufRead, BufReader};
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
    // A temporary working directory keeps any data the server writes out of the source tree.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dkvs-server"))
        .args(["-p", "0", "-l", "error"])
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
