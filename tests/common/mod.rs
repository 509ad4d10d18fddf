//! Starting real `dkvs-server` processes on free loopback ports, and stopping them.

#![allow(dead_code)]

pub mod etcd;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dkvs::client::{Client, ClientConfig, Transport};

/// Path of a binary built by this package.
pub fn bin(name: &str) -> &'static str {
    match name {
        "dkvs-server" => env!("CARGO_BIN_EXE_dkvs-server"),
        "dkvs-client" => env!("CARGO_BIN_EXE_dkvs-client"),
        other => panic!("unknown binary {other}"),
    }
}

/// Have `command`'s process start with `RLIMIT_NOFILE` at `soft` / `hard`.
fn set_descriptor_limit(command: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: runs in the forked child before exec; setrlimit is
    // async-signal-safe and only reads `limit`, a copy owned by the closure.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A running server; killed when dropped, even if the test fails.
pub struct ServerProcess {
    child: Child,
    /// The port it reported in its ready line.
    pub port: u16,
    /// The ready line itself.
    pub ready_line: String,
    /// The arguments it was started with (after `-p PORT`), for [`restart`](Self::restart).
    args: Vec<String>,
    /// Sent SIGSTOP and not yet SIGCONT.
    stopped: bool,
    /// The data directory (`-d`), kept across [`restart`](Self::restart) and
    /// removed when the server is dropped. `None` when the test passed its own `-d`.
    data: Option<std::sync::Arc<tempfile::TempDir>>,
}

impl ServerProcess {
    /// Start `dkvs-server -p 0 ARGS...` and wait for its ready line.
    pub fn start(args: &[&str]) -> ServerProcess {
        ServerProcess::start_on(0, args)
    }

    /// Start `dkvs-server -p 0 ARGS...` with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let data = if args.iter().any(|a| a == "-d" || a == "--data-dir") {
            None
        } else {
            Some(std::sync::Arc::new(
                tempfile::tempdir().expect("temp data dir"),
            ))
        };
        ServerProcess::spawn(0, &args, data, &env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start `dkvs-server -p PORT ARGS...` and wait for its ready line.
    pub fn start_on(port: u16, args: &[&str]) -> ServerProcess {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let data = if args.iter().any(|a| a == "-d" || a == "--data-dir") {
            None
        } else {
            Some(std::sync::Arc::new(
                tempfile::tempdir().expect("temp data dir"),
            ))
        };
        ServerProcess::try_start_on(port, &args, data).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start `dkvs-server -p 0 ARGS...` as user `uid` (needs root: `setpriv`),
    /// with a data directory that user may write.
    pub fn start_as_user(uid: u32, args: &[&str]) -> ServerProcess {
        let data = std::sync::Arc::new(tempfile::tempdir().expect("temp data dir"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o777))
            .expect("open the data dir to the user");
        let mut all = vec![format!("@uid={uid}")];
        all.extend(args.iter().map(|a| a.to_string()));
        ServerProcess::spawn(0, &all, Some(data), &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start `dkvs-server -p 0 ARGS...` with its descriptor limit
    /// (`RLIMIT_NOFILE`) set to `soft` and `hard` before it runs.
    pub fn start_with_descriptor_limit(soft: u64, hard: u64, args: &[&str]) -> ServerProcess {
        let mut all = vec![format!("@nofile={soft}:{hard}")];
        all.extend(args.iter().map(|a| a.to_string()));
        let data = Some(std::sync::Arc::new(
            tempfile::tempdir().expect("temp data dir"),
        ));
        ServerProcess::spawn(0, &all, data, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The data directory, when the helper made it.
    pub fn data_dir(&self) -> Option<std::path::PathBuf> {
        self.data.as_ref().map(|d| d.path().to_path_buf())
    }

    /// Start a slave of `master` (`-m 127.0.0.1 -q MASTER_PORT ARGS...`) on a free port.
    pub fn start_slave(master: &ServerProcess, args: &[&str]) -> ServerProcess {
        let port = master.port.to_string();
        let mut all = vec!["-m", "127.0.0.1", "-q", &port];
        all.extend_from_slice(args);
        ServerProcess::start(&all)
    }

    fn try_start_on(
        port: u16,
        args: &[String],
        data: Option<std::sync::Arc<tempfile::TempDir>>,
    ) -> Result<ServerProcess, String> {
        ServerProcess::spawn(port, args, data, &[])
    }

    fn spawn(
        port: u16,
        args: &[String],
        data: Option<std::sync::Arc<tempfile::TempDir>>,
        env: &[(String, String)],
    ) -> Result<ServerProcess, String> {
        let quiet = !args.iter().any(|a| a == "-l" || a == "--log");
        let data_args: Vec<String> = match &data {
            Some(d) => vec!["-d".into(), d.path().display().to_string()],
            None => Vec::new(),
        };
        // `@uid=N` as the first argument (see `start_as_user`) runs the server as
        // that user, so that firewall rules can single out its packets.
        let (mut command, args) = match args.first().and_then(|a| a.strip_prefix("@uid=")) {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    bin("dkvs-server"),
                ]);
                (c, &args[1..])
            }
            None => match args.first().and_then(|a| a.strip_prefix("@nofile=")) {
                // `@nofile=SOFT:HARD` (see `start_with_descriptor_limit`).
                Some(limits) => {
                    let (soft, hard) = limits
                        .split_once(':')
                        .and_then(|(s, h)| Some((s.parse().ok()?, h.parse().ok()?)))
                        .expect("@nofile=SOFT:HARD");
                    let mut c = Command::new(bin("dkvs-server"));
                    set_descriptor_limit(&mut c, soft, hard);
                    (c, &args[1..])
                }
                None => (Command::new(bin("dkvs-server")), args),
            },
        };
        let mut child = command
            .args(["-p", &port.to_string()])
            .args(if quiet { &["-l", "error"][..] } else { &[] })
            .args(&data_args)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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
                let status = child.wait();
                return Err(format!(
                    "dkvs-server -p {port} {args:?} printed no ready line ({status:?})"
                ));
            }
        };
        let port = ready_line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port in ready line {ready_line:?}"));
        Ok(ServerProcess {
            child,
            port,
            ready_line,
            args: args.to_vec(),
            stopped: false,
            data,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `signal` (a name such as `STOP`, `CONT`, `KILL`) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// SIGSTOP: the process freezes, its sockets stay open and unanswered.
    pub fn stop(&mut self) {
        self.signal("STOP");
        self.stopped = true;
    }

    /// SIGCONT after [`stop`](Self::stop).
    pub fn resume(&mut self) {
        self.signal("CONT");
        self.stopped = false;
    }

    /// SIGKILL, and reap the process.
    pub fn kill9(&mut self) {
        if self.stopped {
            self.resume();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kill the process if it runs, then start a new one with the same arguments
    /// and data directory on the same port (it recovers from its log). If the
    /// port cannot be had back within a few seconds, a free one is used instead.
    pub fn restart(&mut self) {
        self.restart_with(true);
    }

    /// [`restart`](Self::restart), with a new, empty data directory when
    /// `keep_data` is false (a server whose disk was lost).
    pub fn restart_with(&mut self, keep_data: bool) {
        self.kill9();
        let data = if keep_data {
            self.data.clone()
        } else {
            Some(std::sync::Arc::new(
                tempfile::tempdir().expect("temp data dir"),
            ))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut attempts = 0;
        let replacement = loop {
            attempts += 1;
            match ServerProcess::try_start_on(self.port, &self.args, data.clone()) {
                Ok(server) => break server,
                Err(e) if Instant::now() < deadline && attempts < 50 => {
                    eprintln!("restart on port {} failed, retrying: {e}", self.port);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    eprintln!(
                        "restart on port {} failed, using a free port: {e}",
                        self.port
                    );
                    break ServerProcess::try_start_on(0, &self.args, data.clone())
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
        };
        // The old (reaped) process is dropped harmlessly in the swap.
        *self = replacement;
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

    /// A client that does not follow redirects: it reads what this server
    /// itself serves (a slave outside its read lease redirects reads).
    pub fn own_reads_client(&self, transport: Transport) -> Client {
        let config = ClientConfig {
            transport,
            timeout: Duration::from_secs(10),
            max_redirects: 0,
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
        if self.stopped {
            let _ = Command::new("kill")
                .args(["-CONT".to_string(), self.pid().to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `condition` every few milliseconds until it holds; panic naming `what`
/// if it does not within `limit`. Returns how long it took.
pub fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    // Bounded in time (the deadline) and in count (the sleep between polls).
    let max_polls = limit.as_millis() / 10 + 1;
    for _ in 0..max_polls {
        if condition() {
            return start.elapsed();
        }
        if start.elapsed() >= limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if condition() {
        return start.elapsed();
    }
    panic!("timed out after {limit:?} waiting until {what}");
}

/// A server's STATS, parsed.
#[derive(Debug, Clone)]
pub struct Stats {
    /// The raw text.
    pub text: String,
    /// `name value` lines; the value is the rest of the line.
    pub values: BTreeMap<String, String>,
}

/// One `slaveI addr=... state=... applied=N lag=N` line of a master's STATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaveLine {
    /// The slave's client address.
    pub addr: String,
    /// Its state (`in-sync`, `evicted`, `syncing (log)`, ...).
    pub state: String,
    /// Highest sequence number it reported applied.
    pub applied: u64,
    /// How far behind the master it is.
    pub lag: u64,
}

impl Stats {
    /// Parse STATS text.
    pub fn parse(text: String) -> Stats {
        let values = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Stats { text, values }
    }

    /// The value of `name`; panics if missing.
    pub fn get(&self, name: &str) -> &str {
        self.values
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in STATS:\n{}", self.text))
    }

    /// The value of `name` as a number; panics if missing or not a number.
    pub fn num(&self, name: &str) -> u64 {
        self.get(name)
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a number in STATS:\n{}", self.text))
    }

    /// A master's `slaveI` lines, in order.
    pub fn slaves(&self) -> Vec<SlaveLine> {
        (0..)
            .map_while(|i| self.values.get(&format!("slave{i}")))
            .map(|line| {
                let field = |name: &str, next: Option<&str>| -> String {
                    let start = line
                        .find(&format!("{name}="))
                        .unwrap_or_else(|| panic!("no {name}= in slave line {line:?}"))
                        + name.len()
                        + 1;
                    let rest = &line[start..];
                    let end = match next {
                        Some(next) => rest.find(&format!(" {next}=")).unwrap_or(rest.len()),
                        None => rest.len(),
                    };
                    rest[..end].to_string()
                };
                SlaveLine {
                    addr: field("addr", Some("state")),
                    state: field("state", Some("applied")),
                    applied: field("applied", Some("lag")).parse().expect("applied"),
                    lag: field("lag", None).parse().expect("lag"),
                }
            })
            .collect()
    }

    /// The line of the slave whose client address is `addr`, if the master lists it.
    pub fn slave(&self, addr: &str) -> Option<SlaveLine> {
        self.slaves().into_iter().find(|s| s.addr == addr)
    }
}

impl ServerProcess {
    /// The server's STATS over a fresh TCP connection.
    pub fn stats(&self) -> Stats {
        Stats::parse(self.client(Transport::Tcp).stats().expect("stats"))
    }

    /// The address it serves clients on, as a slave announces it to its master.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Read one response frame off a raw stream.
pub fn read_response(stream: &mut std::net::TcpStream) -> dkvs::protocol::Response {
    use dkvs::protocol::{Decoded, HEADER_LEN, Response, decode, decode_datagram};
    use std::io::Read;
    let mut buf = vec![0u8; HEADER_LEN];
    stream.read_exact(&mut buf).expect("response header");
    let need = match decode(&buf, usize::MAX) {
        Ok(Decoded::Incomplete(Some(need))) => need,
        Ok(Decoded::Frame(..)) => HEADER_LEN,
        other => panic!("bad response header: {other:?}"),
    };
    buf.resize(need, 0);
    stream
        .read_exact(&mut buf[HEADER_LEN..])
        .expect("response body");
    let frame = decode_datagram(&buf, usize::MAX).expect("frame");
    Response::from_frame(&frame).expect("response")
}

/// The user a partitioned server runs as (see [`ServerProcess::start_as_user`]),
/// so that a firewall rule can single out its packets (`-m owner --uid-owner`).
pub const PARTITIONED_UID: u32 = 65534;

/// An iptables rule, removed when dropped (even on panic).
pub struct FirewallRule {
    table: &'static str,
    spec: Vec<String>,
}

impl FirewallRule {
    /// Drop the TCP packets the partitioned user's processes send to `port`.
    /// The other direction still passes: the server at `port` still reaches
    /// them, and its close of a connection reaches them too.
    pub fn drop_to_port(port: u16) -> FirewallRule {
        let uid = PARTITIONED_UID.to_string();
        let port = port.to_string();
        FirewallRule::insert(
            "filter",
            &[
                "OUTPUT",
                "-p",
                "tcp",
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "--dport",
                &port,
                "-j",
                "DROP",
            ],
        )
    }

    /// Drop every packet, both ways, of the TCP connections the partitioned
    /// user's processes open to `port` (marked on their first packet after the
    /// rules are in): nothing of a link in place passes, not even a close, as
    /// in a real partition. Returns both rules; drop them to heal.
    pub fn silence_connections_to_port(port: u16) -> Vec<FirewallRule> {
        let uid = PARTITIONED_UID.to_string();
        let port = port.to_string();
        // The drop goes in first, so no marked packet slips through between the two.
        let drop = FirewallRule::insert(
            "filter",
            &[
                "OUTPUT", "-p", "tcp", "-m", "connmark", "--mark", "0x5e1", "-j", "DROP",
            ],
        );
        let mark = FirewallRule::insert(
            "mangle",
            &[
                "OUTPUT",
                "-p",
                "tcp",
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "--dport",
                &port,
                "-j",
                "CONNMARK",
                "--set-mark",
                "0x5e1",
            ],
        );
        vec![mark, drop]
    }

    fn insert(table: &'static str, spec: &[&str]) -> FirewallRule {
        let spec: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
        let status = Command::new("iptables")
            .args(["-w", "-t", table, "-I"])
            .args(&spec)
            .status()
            .expect("run iptables (apt-get install iptables; the test needs root)");
        assert!(
            status.success(),
            "iptables -t {table} -I {spec:?} failed (root needed)"
        );
        FirewallRule { table, spec }
    }
}

impl Drop for FirewallRule {
    fn drop(&mut self) {
        let _ = Command::new("iptables")
            .args(["-w", "-t", self.table, "-D"])
            .args(&self.spec)
            .status();
    }
}

/// PUT `{prefix}{i}` = `value` for every `i` of `keys` over one raw TCP
/// connection to `port`, a thousand requests written before their replies are
/// read; every reply must be OK, in request order.
pub fn put_pipelined(port: u16, prefix: &str, keys: impl Iterator<Item = u64>, value: &[u8]) {
    use dkvs::protocol::{Opcode, Status, encode_request};
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let keys: Vec<u64> = keys.collect();
    for chunk in keys.chunks(1_000) {
        let mut bytes = Vec::new();
        for (id, i) in chunk.iter().enumerate() {
            let key = format!("{prefix}{i}");
            encode_request(
                &mut bytes,
                Opcode::Put,
                id as u32 + 1,
                key.as_bytes(),
                value,
            );
        }
        stream.write_all(&bytes).expect("write batch");
        for id in 1..=chunk.len() {
            let reply = read_response(&mut stream);
            assert_eq!(reply.request_id, id as u32, "replies come in request order");
            assert_eq!(reply.status, Ok(Status::Ok), "{}", reply.message());
        }
    }
}
