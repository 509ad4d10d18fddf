//! The cluster under test: real `dkvs-server` processes (a master and its
//! slaves) on loopback ports, their data and log directories, and the
//! iptables rules that partition them. Everything here is undone on drop,
//! also while a panic unwinds: processes are killed, rules deleted and the
//! temporary directory removed.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dkvs::client::{Client, ClientConfig};

/// Set by SIGINT/SIGTERM: every wait gives up, and the run unwinds through the drops.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// What can go wrong driving the cluster.
#[derive(Debug)]
pub enum ClusterError {
    /// A command (the server, `kill`, `iptables`, `setpriv`) could not run or failed.
    Command(String),
    /// A file system operation failed.
    Io(String, std::io::Error),
    /// A server printed no ready line.
    NotReady(String),
    /// The cluster did not reach a state in time.
    Timeout(String),
    /// SIGINT or SIGTERM.
    Interrupted,
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Command(msg) => write!(f, "{msg}"),
            ClusterError::Io(what, e) => write!(f, "{what}: {e}"),
            ClusterError::NotReady(msg) => write!(f, "{msg}"),
            ClusterError::Timeout(what) => write!(f, "timed out waiting until {what}"),
            ClusterError::Interrupted => write!(f, "interrupted"),
        }
    }
}

impl std::error::Error for ClusterError {}

/// Sleep for `d`, in short steps so that an interrupt ends it.
pub fn pause(d: Duration) -> Result<(), ClusterError> {
    let until = Instant::now() + d;
    loop {
        if INTERRUPTED.load(Ordering::Relaxed) {
            return Err(ClusterError::Interrupted);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Catch SIGINT and SIGTERM so that a run stopped by hand still cleans up
/// (the servers die with the process group; the iptables rules would not).
pub fn catch_interrupts() {
    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::Relaxed);
    }
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// A directory removed (with everything in it) when dropped, unless kept.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// A new, empty directory under the system's temporary directory.
    pub fn new(prefix: &str) -> Result<TempDir, ClusterError> {
        let base = std::env::temp_dir();
        // Bounded: a collision needs another process with our pid and nanosecond.
        for attempt in 0..100u32 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let path = base.join(format!(
                "{prefix}-{}-{nanos:09}-{attempt}",
                std::process::id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ClusterError::Io(format!("create {}", path.display()), e)),
            }
        }
        Err(ClusterError::Command(
            "no free temporary directory name".into(),
        ))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leave the directory in place when dropped (its logs explain a failure).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// How to start one server, the same way each time.
#[derive(Debug, Clone)]
struct Spec {
    /// `master`, `slave0`, ...
    name: String,
    /// Holds `data/` and `server.log`.
    dir: PathBuf,
    /// Run as this user (its packets can then be singled out by iptables).
    uid: Option<u32>,
    /// Arguments after the common ones (`-m HOST -q PORT` for a slave).
    args: Vec<String>,
}

/// One `dkvs-server` process; killed when dropped.
pub struct Server {
    spec: Spec,
    bin: PathBuf,
    child: Option<Child>,
    /// The port it serves on (kept across restarts).
    pub port: u16,
    /// Sent SIGSTOP and not yet SIGCONT.
    stopped: bool,
}

impl Server {
    fn start(spec: Spec, bin: &Path, port: u16) -> Result<Server, ClusterError> {
        let mut server = Server {
            spec,
            bin: bin.to_path_buf(),
            child: None,
            port,
            stopped: false,
        };
        server.spawn()?;
        Ok(server)
    }

    /// The address a slave announces to its master (as the master's STATS show it).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start the process on `self.port` (0 the first time) and wait for its ready line.
    fn spawn(&mut self) -> Result<(), ClusterError> {
        let data = self.spec.dir.join("data");
        let log = self.spec.dir.join("server.log");
        // setpriv for every server: --pdeathsig kills it if this process dies
        // without unwinding (SIGKILL), and --reuid gives a slave its own user.
        let mut command = Command::new("setpriv");
        command.arg("--pdeathsig=KILL");
        if let Some(uid) = self.spec.uid {
            command.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_string(),
            ]);
        }
        command
            .arg(&self.bin)
            .args(["-p", &self.port.to_string()])
            .arg("-d")
            .arg(&data)
            .args(["-l", "info", "--logfile"])
            .arg(&log)
            .args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().map_err(|e| {
            ClusterError::Command(format!(
                "cannot run setpriv {} (util-linux): {e}",
                self.bin.display()
            ))
        })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| ClusterError::Command("no stdout pipe".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so that the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                return Err(ClusterError::NotReady(format!(
                    "{} (port {}) printed no ready line ({status:?}); see {}",
                    self.spec.name,
                    self.port,
                    log.display()
                )));
            }
        };
        let port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| ClusterError::NotReady(format!("no port in ready line {line:?}")))?;
        self.port = port;
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Send `signal` (`STOP`, `CONT`) with kill(1).
    fn signal(&self, signal: &str) -> Result<(), ClusterError> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .map_err(|e| ClusterError::Command(format!("run kill: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(ClusterError::Command(format!(
                "kill -{signal} {pid} failed"
            )))
        }
    }

    /// SIGSTOP: the process freezes; its sockets stay open and unanswered.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        self.signal("STOP")?;
        self.stopped = true;
        Ok(())
    }

    /// SIGCONT after [`stop`](Self::stop).
    pub fn resume(&mut self) -> Result<(), ClusterError> {
        self.signal("CONT")?;
        self.stopped = false;
        Ok(())
    }

    /// SIGKILL, and reap the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL works on a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stopped = false;
    }

    /// Start it again on the same port and data directory (it recovers from its
    /// log). The port may still be held for a moment: retried for a few seconds.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    log::warn!("restart of {} failed, retrying: {e}", self.spec.name);
                    pause(Duration::from_millis(200))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A client of this server.
    pub fn client(&self, timeout: Duration) -> Result<Client, dkvs::client::ClientError> {
        Client::connect(
            "127.0.0.1",
            self.port,
            ClientConfig {
                timeout,
                max_redirects: 0,
                ..ClientConfig::default()
            },
        )
    }

    /// STATS, or `None` if the server does not answer within `timeout`.
    pub fn stats(&self, timeout: Duration) -> Option<Stats> {
        let mut client = self.client(timeout).ok()?;
        client.stats().ok().map(Stats::parse)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One `slaveI addr=.. state=.. applied=.. lag=..` line of a master's STATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaveLine {
    /// The slave's client address.
    pub addr: String,
    /// `in-sync`, `evicted`, `syncing (log)`, ...
    pub state: String,
    /// Highest sequence number it reported applied.
    pub applied: u64,
    /// How far behind the master it is.
    pub lag: u64,
}

/// A server's STATS text.
#[derive(Debug, Clone)]
pub struct Stats {
    /// The raw `name value` lines.
    pub text: String,
}

impl Stats {
    fn parse(text: String) -> Stats {
        Stats { text }
    }

    /// The value of `name` (the rest of its line).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
    }

    /// A master's slave lines; lines that do not parse are skipped.
    pub fn slaves(&self) -> Vec<SlaveLine> {
        (0..64)
            .map_while(|i| self.get(&format!("slave{i}")))
            .filter_map(parse_slave_line)
            .collect()
    }

    /// The line of the slave announcing `addr`.
    pub fn slave(&self, addr: &str) -> Option<SlaveLine> {
        self.slaves().into_iter().find(|s| s.addr == addr)
    }
}

/// `addr=A state=S applied=N lag=N`; the state may contain spaces (`syncing (log)`).
fn parse_slave_line(line: &str) -> Option<SlaveLine> {
    let addr_at = line.find("addr=")? + 5;
    let state_at = line.find(" state=")?;
    let applied_at = line.find(" applied=")?;
    let lag_at = line.find(" lag=")?;
    Some(SlaveLine {
        addr: line.get(addr_at..state_at)?.to_string(),
        state: line.get(state_at + 7..applied_at)?.to_string(),
        applied: line.get(applied_at + 9..lag_at)?.trim().parse().ok()?,
        lag: line.get(lag_at + 5..)?.trim().parse().ok()?,
    })
}

/// An iptables OUTPUT rule, deleted when dropped (even on panic).
pub struct FirewallRule {
    spec: Vec<String>,
}

impl FirewallRule {
    /// Drop the TCP packets that processes of user `uid` send to `port`.
    /// Cutting one direction stalls the connection both ways: nothing the
    /// slave sends, acknowledgements included, reaches the master.
    pub fn drop_to_port(uid: u32, port: u16) -> Result<FirewallRule, ClusterError> {
        let spec: Vec<String> = [
            "-p",
            "tcp",
            "-m",
            "owner",
            "--uid-owner",
            &uid.to_string(),
            "--dport",
            &port.to_string(),
            "-j",
            "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let status = Command::new("iptables")
            .args(["-w", "-I", "OUTPUT"])
            .args(&spec)
            .status()
            .map_err(|e| ClusterError::Command(format!("run iptables (needs root): {e}")))?;
        if !status.success() {
            return Err(ClusterError::Command(format!(
                "iptables -I OUTPUT {} failed (root needed)",
                spec.join(" ")
            )));
        }
        Ok(FirewallRule { spec })
    }
}

impl Drop for FirewallRule {
    fn drop(&mut self) {
        let deleted = Command::new("iptables")
            .args(["-w", "-D", "OUTPUT"])
            .args(&self.spec)
            .status();
        if !matches!(deleted, Ok(s) if s.success()) {
            eprintln!(
                "dkvs-chaos: could not delete iptables rule OUTPUT {}: delete it by hand",
                self.spec.join(" ")
            );
        }
    }
}

/// The uid of slave `n` (distinct users, so one slave can be cut off alone).
pub fn slave_uid(n: usize) -> u32 {
    65534 - n as u32
}

/// A master and its slaves, each with its own directory under one temp dir.
pub struct Cluster {
    /// The master.
    pub master: Server,
    /// The slaves; slave `i` runs as [`slave_uid`]`(i)`.
    pub slaves: Vec<Server>,
    /// Dropped after the servers (field order), so no server writes into a removed dir.
    pub dir: TempDir,
}

impl Cluster {
    /// Start a master and `slaves` slaves of it.
    pub fn start(
        bin: &Path,
        slaves: usize,
        extra_args: &[String],
    ) -> Result<Cluster, ClusterError> {
        let dir = TempDir::new("dkvs-chaos")?;
        let server_dir = |name: &str, uid: Option<u32>| -> Result<PathBuf, ClusterError> {
            let path = dir.path().join(name);
            std::fs::create_dir(&path)
                .map_err(|e| ClusterError::Io(format!("create {}", path.display()), e))?;
            if let Some(uid) = uid {
                std::os::unix::fs::chown(&path, Some(uid), Some(uid))
                    .map_err(|e| ClusterError::Io(format!("chown {}", path.display()), e))?;
            }
            Ok(path)
        };
        // Readable by the slaves' users on the way down to their own dirs.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| ClusterError::Io(format!("chmod {}", dir.path().display()), e))?;
        let master_spec = Spec {
            name: "master".into(),
            dir: server_dir("master", None)?,
            uid: None,
            args: extra_args.to_vec(),
        };
        let master = Server::start(master_spec, bin, 0)?;
        let mut list = Vec::new();
        for i in 0..slaves {
            let uid = slave_uid(i);
            let name = format!("slave{i}");
            let mut args = vec![
                "-m".to_string(),
                "127.0.0.1".to_string(),
                "-q".to_string(),
                master.port.to_string(),
            ];
            args.extend_from_slice(extra_args);
            let spec = Spec {
                dir: server_dir(&name, Some(uid))?,
                name,
                uid: Some(uid),
                args,
            };
            list.push(Server::start(spec, bin, 0)?);
        }
        Ok(Cluster {
            master,
            slaves: list,
            dir,
        })
    }

    /// Whether the master's STATS list every slave as in sync (and, with
    /// `caught_up`, with lag 0).
    pub fn in_sync(&self, caught_up: bool) -> bool {
        let Some(stats) = self.master.stats(Duration::from_millis(500)) else {
            return false;
        };
        self.slaves.iter().all(|s| {
            stats
                .slave(&s.addr())
                .is_some_and(|l| l.state == "in-sync" && (!caught_up || l.lag == 0))
        })
    }

    /// Whether slave `n` is in sync according to the master.
    pub fn slave_in_sync(&self, n: usize) -> bool {
        let Some(stats) = self.master.stats(Duration::from_millis(500)) else {
            return false;
        };
        stats
            .slave(&self.slaves[n].addr())
            .is_some_and(|l| l.state == "in-sync")
    }

    /// Wait (polling every `poll`) until `condition` holds; how long it took.
    pub fn wait(
        &self,
        what: &str,
        limit: Duration,
        poll: Duration,
        mut condition: impl FnMut(&Cluster) -> bool,
    ) -> Result<Duration, ClusterError> {
        let start = Instant::now();
        loop {
            if condition(self) {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= limit {
                return Err(ClusterError::Timeout(what.to_string()));
            }
            pause(poll)?;
        }
    }

    /// The master's STATS text (for a failure report).
    pub fn describe(&self) -> String {
        self.master
            .stats(Duration::from_secs(1))
            .map_or_else(|| "master: no STATS".to_string(), |s| s.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slave_lines_parse_with_spaces_in_the_state() {
        let stats = Stats::parse(
            "role master\nslave0 addr=127.0.0.1:4000 state=syncing (log) applied=17 lag=3\n\
             slave1 addr=127.0.0.1:4001 state=in-sync applied=20 lag=0\n"
                .into(),
        );
        let slaves = stats.slaves();
        assert_eq!(slaves.len(), 2);
        assert_eq!(slaves[0].state, "syncing (log)");
        assert_eq!((slaves[0].applied, slaves[0].lag), (17, 3));
        assert_eq!(stats.slave("127.0.0.1:4001").map(|s| s.lag), Some(0));
        assert_eq!(stats.get("role"), Some("master"));
    }
}
