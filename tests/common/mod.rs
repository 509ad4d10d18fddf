//! Starting real `dkvs-server` processes on free loopback ports, and stopping them.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use dkvs::client::{Client, ClientConfig, Transport};

/// Path of a binary built by this package.
pub fn bin(name: &str) -> &'static str {
    match name {
        "dkvs-server" => env!("CARGO_BIN_EXE_dkvs-server"),
        "dkvs-client" => env!("CARGO_BIN_EXE_dkvs-client"),
        other => panic!("unknown binary {other}"),
    }
}

/// A running server; killed when dropped, even if the test fails.
pub struct ServerProcess {
    child: Child,
    /// The port it reported in its ready line.
    pub port: u16,
    /// The ready line itself.
    pub ready_line: String,
}

impl ServerProcess {
    /// Start `dkvs-server -p 0 ARGS...` and wait for its ready line.
    pub fn start(args: &[&str]) -> ServerProcess {
        let quiet = !args.iter().any(|a| *a == "-l" || *a == "--log");
        let mut child = Command::new(bin("dkvs-server"))
            .args(["-p", "0"])
            .args(if quiet { &["-l", "error"][..] } else { &[] })
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dkvs-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let ready_line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dkvs-server printed no ready line");
            }
        };
        let port = ready_line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port in ready line {ready_line:?}"));
        ServerProcess {
            child,
            port,
            ready_line,
        }
    }

    /// A client connected over `transport`.
    pub fn client(&self, transport: Transport) -> Client {
        let config = ClientConfig {
            transport,
            timeout: Duration::from_secs(10),
            ..ClientConfig::default()
        };
        Client::connect("127.0.0.1", self.port, config).expect("connect")
    }

    /// Resident memory of the server process in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
