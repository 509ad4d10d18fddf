//! Starting real `etcd` members on free loopback ports, in temp dirs, and stopping them.
//!
//! The binary is `etcd` from PATH (Debian's `etcd-server`, which `.ci/run` installs), or
//! `DKVS_ETCD_BIN`. Members run with a 50 ms heartbeat and a 500 ms election timeout so that a
//! 3-member cluster elects quickly and the minimum lease TTL is 1 s (etcd's floor is 1.5
//! election timeouts, rounded up to a second).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dkvs::etcd::EtcdClient;

/// How long a member (or cluster) gets to become healthy.
const START_LIMIT: Duration = Duration::from_secs(20);

/// The etcd binary to run.
pub fn etcd_bin() -> String {
    std::env::var("DKVS_ETCD_BIN").unwrap_or_else(|_| "etcd".to_string())
}

/// Panic with a clear message unless the etcd binary can be run.
pub fn require_etcd() {
    let bin = etcd_bin();
    match Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("`{bin} --version` failed ({status}); these tests need etcd 3.4+"),
        Err(e) => panic!(
            "cannot run `{bin}` ({e}): these tests need a real etcd 3.4+ on PATH \
             (apt-get install etcd-server, as .ci/run does) or DKVS_ETCD_BIN=/path/to/etcd"
        ),
    }
}

/// A port that was free a moment ago (etcd takes port numbers, not a listening socket).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// One etcd member; killed (and reaped) when dropped, even if the test fails.
pub struct EtcdProcess {
    child: Option<Child>,
    /// Member name, unique in its cluster.
    pub name: String,
    /// `http://127.0.0.1:PORT` for clients (and the JSON gateway).
    pub client_url: String,
    /// `http://127.0.0.1:PORT` for peers.
    pub peer_url: String,
    /// `name=peer_url,...` for every member.
    initial_cluster: String,
    /// Unique per cluster, so members of different tests never join each other.
    cluster_token: String,
    data: Arc<tempfile::TempDir>,
    /// Sent SIGSTOP and not yet SIGCONT.
    stopped: bool,
}

static CLUSTERS: AtomicU64 = AtomicU64::new(0);

fn cluster_token() -> String {
    format!(
        "dkvs-test-{}-{}",
        std::process::id(),
        CLUSTERS.fetch_add(1, Ordering::Relaxed)
    )
}

impl EtcdProcess {
    /// Start a single-member cluster and wait until it serves requests.
    pub fn start() -> EtcdProcess {
        require_etcd();
        // A port picked free can be taken by someone else before etcd binds it: try again.
        let mut last = String::new();
        for _ in 0..3 {
            let mut member = EtcdProcess::prepare("m0", cluster_token());
            member.initial_cluster = format!("{}={}", member.name, member.peer_url);
            member.spawn();
            match member.wait_healthy(START_LIMIT) {
                Ok(()) => return member,
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start: {last}");
    }

    /// Start an `n`-member cluster and wait until every member serves requests.
    pub fn cluster(n: usize) -> Vec<EtcdProcess> {
        require_etcd();
        let token = cluster_token();
        let mut members: Vec<EtcdProcess> = (0..n)
            .map(|i| EtcdProcess::prepare(&format!("m{i}"), token.clone()))
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = initial.clone();
            m.spawn();
        }
        for m in &mut members {
            if let Err(e) = m.wait_healthy(START_LIMIT) {
                panic!("etcd cluster did not start: {e}");
            }
        }
        members
    }

    /// Client URLs of `members`, in order.
    pub fn urls(members: &[EtcdProcess]) -> Vec<String> {
        members.iter().map(|m| m.client_url.clone()).collect()
    }

    fn prepare(name: &str, cluster_token: String) -> EtcdProcess {
        EtcdProcess {
            child: None,
            name: name.to_string(),
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            initial_cluster: String::new(),
            cluster_token,
            data: Arc::new(tempfile::tempdir().expect("etcd temp dir")),
            stopped: false,
        }
    }

    /// The member's data directory (kept across [`restart`](Self::restart)).
    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("data")
    }

    /// Its log, for a failure message.
    pub fn log_path(&self) -> PathBuf {
        self.data.path().join(format!("{}.log", self.name))
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let log_err = log.try_clone().expect("etcd log file");
        let child = Command::new(etcd_bin())
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.cluster_token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", etcd_bin()));
        self.child = Some(child);
        self.stopped = false;
    }

    /// The last lines of the member's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Wait until the member answers a linearizable read (which needs a raft leader).
    pub fn wait_healthy(&mut self, limit: Duration) -> Result<(), String> {
        let client = EtcdClient::new(vec![self.client_url.clone()], Duration::from_millis(500));
        let start = Instant::now();
        let mut last = String::from("not tried");
        // Bounded by the deadline.
        while start.elapsed() < limit {
            match client.range(b"/dkvs-test/health") {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "etcd {} exited ({status}):\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "etcd {} at {} not healthy after {limit:?}: {last}\n{}",
            self.name,
            self.client_url,
            self.log_tail()
        ))
    }

    /// A client for this member alone.
    pub fn client(&self, request_timeout: Duration) -> EtcdClient {
        EtcdClient::new(vec![self.client_url.clone()], request_timeout)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn signal(&self, signal: &str) {
        let Some(pid) = self.pid() else { return };
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// SIGSTOP: the member freezes; its sockets accept connections and never answer.
    pub fn stop(&mut self) {
        self.signal("STOP");
        self.stopped = true;
    }

    /// SIGCONT after [`stop`](Self::stop).
    pub fn resume(&mut self) {
        self.signal("CONT");
        self.stopped = false;
    }

    /// SIGKILL, and reap the process. The data directory stays.
    pub fn kill9(&mut self) {
        if self.stopped {
            self.resume();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill the member if it runs, start it again on the same ports and data directory, and
    /// wait until it is healthy (in a cluster, that needs a quorum of members running).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        if let Err(e) = self.wait_healthy(START_LIMIT) {
            panic!("etcd did not restart: {e}");
        }
    }

    /// Start a killed member again without waiting for it.
    pub fn restart_no_wait(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
