//! Failover through a real etcd: three real servers, `kill -9` of the master
//! under write load, a master paused past its lease, and etcd itself stopped.
//! Every acknowledged write must survive, on every server.
//!
//! `DKVS_FAILOVER_ROUNDS` sets the number of kill rounds (default 3; the
//! issue's figure is 20).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::EtcdProcess;
use common::{FirewallRule, PARTITIONED_UID, ServerProcess, Stats, wait_until};
use dkvs::client::{Client, ClientConfig, ClientError};
use dkvs::protocol::Status;

const LEASE_TTL_MS: u64 = 2_000;

fn rounds() -> usize {
    std::env::var("DKVS_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn client_config() -> ClientConfig {
    ClientConfig {
        timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

/// STATS of the server on `port`, or `None` if it does not answer.
fn try_stats(port: u16) -> Option<Stats> {
    let mut c = Client::connect("127.0.0.1", port, client_config()).ok()?;
    c.stats().ok().map(Stats::parse)
}

fn value_of(stats: &Stats, name: &str) -> Option<String> {
    stats
        .text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::to_string)
}

/// Wait until the STATS of the server on `port` satisfy `condition`.
fn wait_stats(port: u16, what: &str, limit: Duration, condition: impl Fn(&Stats) -> bool) {
    wait_until(what, limit, || {
        try_stats(port).is_some_and(|st| condition(&st))
    });
}

/// Whether STATS say the server follows a master.
fn following(st: &Stats) -> bool {
    value_of(st, "master_link").as_deref() == Some("following")
}

/// The recorded in-sync set in STATS, as node ids.
fn sync_set(st: &Stats) -> Vec<String> {
    value_of(st, "sync_set")
        .unwrap_or_default()
        .split(',')
        .filter(|n| !n.trim().is_empty())
        .map(|n| n.trim().to_string())
        .collect()
}

/// A three-server cluster failing over through one etcd.
struct Cluster {
    etcd: EtcdProcess,
    servers: Vec<ServerProcess>,
}

impl Cluster {
    fn start(name: &str) -> Cluster {
        let etcd = EtcdProcess::start();
        let url = EtcdProcess::urls(std::slice::from_ref(&etcd)).join(",");
        let ttl = LEASE_TTL_MS.to_string();
        let servers = (0..3)
            .map(|_| {
                ServerProcess::start(&[
                    "--etcd",
                    &url,
                    "--cluster",
                    name,
                    "--lease-ttl-ms",
                    &ttl,
                    "--fsync",
                    "always",
                ])
            })
            .collect();
        Cluster { etcd, servers }
    }

    fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(|s| s.port).collect()
    }

    /// The index of the server that leads with a valid lease, waiting for one.
    fn master(&self, limit: Duration) -> usize {
        let mut found = None;
        wait_until("a master with a valid lease", limit, || {
            found = self.servers.iter().position(|s| {
                try_stats(s.port).is_some_and(|st| {
                    value_of(&st, "role").as_deref() == Some("master")
                        && value_of(&st, "failover").as_deref() == Some("leading")
                })
            });
            found.is_some()
        });
        found.unwrap_or(0)
    }

    /// Wait until the master has recorded at least one slave: a failover can
    /// then promote it.
    fn wait_recorded_slave(&self, master: usize) {
        wait_stats(
            self.servers[master].port,
            "a slave recorded in the in-sync set",
            Duration::from_secs(20),
            |st| !sync_set(st).is_empty(),
        );
    }
}

/// Writers putting unique keys through whichever server answers, recording
/// what was acknowledged.
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl Writers {
    fn start(ports: Arc<Mutex<Vec<u16>>>, count: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let handles = (0..count)
            .map(|w| {
                let (stop, acked, ports) = (stop.clone(), acked.clone(), ports.clone());
                thread::spawn(move || {
                    let mut client: Option<Client> = None;
                    let mut next_server = w;
                    // Bounded in count as well as by the stop flag.
                    for i in 0..200_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let key = format!("w{w}-{i}");
                        let value = format!("v{i}");
                        if client.is_none() {
                            let list = ports.lock().map(|p| p.clone()).unwrap_or_default();
                            let port = list[next_server % list.len()];
                            next_server += 1;
                            client = Client::connect("127.0.0.1", port, client_config()).ok();
                        }
                        let Some(c) = client.as_mut() else {
                            thread::sleep(Duration::from_millis(20));
                            continue;
                        };
                        match c.put(key.as_bytes(), value.as_bytes()) {
                            Ok(_) => {
                                acked.lock().expect("acked").insert(key, value);
                            }
                            Err(_) => {
                                // Outcome unknown (or refused): try the next server.
                                client = None;
                                thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                })
            })
            .collect();
        Writers {
            stop,
            acked,
            handles,
        }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().expect("acked").len()
    }

    fn finish(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.join();
        }
        Arc::try_unwrap(self.acked)
            .map(|m| m.into_inner().expect("acked"))
            .unwrap_or_default()
    }
}

/// Wait until every server holds every acknowledged write, and the same keys.
fn check_converged(cluster: &Cluster, acked: &BTreeMap<String, String>) {
    assert!(!acked.is_empty(), "no write was acknowledged at all");
    for server in &cluster.servers {
        let port = server.port;
        let mut missing = Vec::new();
        wait_until(
            &format!(
                "server on {port} to hold all {} acknowledged writes",
                acked.len()
            ),
            Duration::from_secs(30),
            || {
                let Ok(mut c) = Client::connect("127.0.0.1", port, client_config()) else {
                    return false;
                };
                missing.clear();
                for (k, v) in acked {
                    match c.get(k.as_bytes()) {
                        Ok(Some(got)) if got.value == v.as_bytes() => {}
                        other => {
                            missing.push(format!("{k}: {other:?}"));
                            if missing.len() > 5 {
                                break;
                            }
                        }
                    }
                }
                missing.is_empty()
            },
        );
    }
    // Writes whose outcome the writers never learned may have committed or
    // not, but the same everywhere: the servers converge to one state.
    let mut keys: Vec<u64> = Vec::new();
    let converged = (0..300).any(|_| {
        keys = cluster
            .servers
            .iter()
            .map(|s| try_stats(s.port).map_or(0, |st| st.num("keys")))
            .collect();
        let same = keys.iter().all(|k| *k == keys[0]);
        if !same {
            thread::sleep(Duration::from_millis(100));
        }
        same
    });
    if !converged {
        for server in &cluster.servers {
            if let Some(st) = try_stats(server.port) {
                eprintln!("server {}:\n{}", server.port, st.text);
            }
        }
    }
    assert!(
        converged,
        "the servers hold different numbers of keys: {keys:?}"
    );
}

#[test]
fn kill_9_of_the_master_under_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start("kill9");
    let ports = Arc::new(Mutex::new(cluster.ports()));
    let writers = Writers::start(ports.clone(), 4);
    let mut failover_ms = Vec::new();
    for round in 0..rounds() {
        let old = cluster.master(Duration::from_secs(20));
        cluster.wait_recorded_slave(old);
        let before = writers.acked_count();
        wait_until(
            "writes acknowledged before the kill",
            Duration::from_secs(10),
            || writers.acked_count() > before + 20,
        );
        cluster.servers[old].kill9();
        let killed = Instant::now();
        // A new master, elected by etcd, accepts a write.
        let mut accepted = None;
        wait_until(
            "a new master accepting writes",
            Duration::from_secs(30),
            || {
                for (i, s) in cluster.servers.iter().enumerate() {
                    if i == old {
                        continue;
                    }
                    if let Ok(mut c) = Client::connect("127.0.0.1", s.port, client_config())
                        && c.put(format!("probe{round}").as_bytes(), b"p").is_ok()
                    {
                        accepted = Some(killed.elapsed());
                        return true;
                    }
                }
                false
            },
        );
        let took = accepted.unwrap_or_default();
        failover_ms.push(took.as_millis() as u64);
        eprintln!("round {round}: failover took {} ms", took.as_millis());
        assert!(
            took < Duration::from_millis(LEASE_TTL_MS + 5_000),
            "failover took {took:?} with a lease of {LEASE_TTL_MS} ms"
        );
        // The old master comes back and rejoins as a slave.
        cluster.servers[old].restart();
        if let Ok(mut p) = ports.lock() {
            *p = cluster.ports();
        }
        wait_stats(
            cluster.servers[old].port,
            "the old master to follow the new one",
            Duration::from_secs(30),
            |st| value_of(st, "role").as_deref() == Some("slave") && following(st),
        );
    }
    let acked = writers.finish();
    failover_ms.sort_unstable();
    eprintln!(
        "{} rounds: failover p50 {} ms, max {} ms; {} writes acknowledged",
        failover_ms.len(),
        failover_ms[failover_ms.len() / 2],
        failover_ms[failover_ms.len() - 1],
        acked.len()
    );
    check_converged(&cluster, &acked);
}

#[test]
fn a_master_paused_past_its_lease_acknowledges_nothing_after_its_epoch() {
    let mut cluster = Cluster::start("pause");
    let ports = Arc::new(Mutex::new(cluster.ports()));
    let writers = Writers::start(ports.clone(), 2);
    let old = cluster.master(Duration::from_secs(20));
    cluster.wait_recorded_slave(old);
    // A client of the old master whose write arrives while it is paused.
    let mut stale = Client::connect(
        "127.0.0.1",
        cluster.servers[old].port,
        ClientConfig {
            timeout: Duration::from_secs(15),
            ..ClientConfig::default()
        },
    )
    .expect("connect to the master");
    stale.ping().expect("ping");
    cluster.servers[old].stop();
    let new = {
        let mut found = None;
        wait_until("another master", Duration::from_secs(20), || {
            found = cluster.servers.iter().enumerate().position(|(i, s)| {
                i != old
                    && try_stats(s.port)
                        .is_some_and(|st| value_of(&st, "role").as_deref() == Some("master"))
            });
            found.is_some()
        });
        found.unwrap_or(0)
    };
    let sender = thread::spawn(move || stale.put(b"stale-write", b"from-the-old-epoch"));
    thread::sleep(Duration::from_millis(300));
    cluster.servers[old].resume();
    let reply = sender.join().expect("sender thread");
    match &reply {
        Ok(version) => panic!("the deposed master acknowledged a write (version {version})"),
        Err(ClientError::Server { status, message }) => {
            assert_ne!(*status, Ok(Status::Ok), "{message}");
            eprintln!("deposed master answered {status:?}: {message}");
        }
        Err(e) => eprintln!("deposed master's write failed: {e}"),
    }
    wait_stats(
        cluster.servers[old].port,
        "the paused master to follow the new one",
        Duration::from_secs(30),
        following,
    );
    assert_eq!(
        cluster.master(Duration::from_secs(5)),
        new,
        "the new master keeps the lead"
    );
    let acked = writers.finish();
    check_converged(&cluster, &acked);
}

#[test]
fn with_etcd_stopped_writes_fail_clearly_and_resume_after() {
    let mut cluster = Cluster::start("etcdstop");
    let master = cluster.master(Duration::from_secs(20));
    let port = cluster.servers[master].port;
    let mut c = Client::connect("127.0.0.1", port, client_config()).expect("connect");
    c.put(b"before", b"1").expect("a write before etcd stops");
    // Redis tools see the failover state in INFO replication.
    let info = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"*2\r\n$4\r\nINFO\r\n$11\r\nreplication\r\n")
            .expect("send INFO");
        let mut buf = vec![0; 4096];
        let n = s.read(&mut buf).expect("INFO reply");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(
        info.contains("role:master") && info.contains("failover_epoch:1"),
        "{info}"
    );
    cluster.etcd.stop();
    // The lease cannot be renewed: within the TTL the master stops acknowledging.
    let mut refusal = String::new();
    wait_until(
        "writes refused while etcd is stopped",
        Duration::from_secs(15),
        || {
            let Ok(mut c) = Client::connect("127.0.0.1", port, client_config()) else {
                return false;
            };
            match c.put(b"during", b"x") {
                Err(ClientError::Server { message, .. }) => {
                    refusal = message;
                    true
                }
                _ => false,
            }
        },
    );
    assert!(refusal.contains("lease"), "a clear reason: {refusal}");
    cluster.etcd.resume();
    wait_until(
        "writes accepted again after etcd resumed",
        Duration::from_secs(30),
        || {
            cluster.servers.iter().any(|s| {
                Client::connect("127.0.0.1", s.port, client_config())
                    .is_ok_and(|mut c| c.put(b"after", b"2").is_ok())
            })
        },
    );
    // The command-line client finds the master through etcd, or moves past a dead server.
    let url = EtcdProcess::urls(std::slice::from_ref(&cluster.etcd)).join(",");
    let out = std::process::Command::new(common::bin("dkvs-client"))
        .args(["--etcd", &url, "--cluster", "etcdstop", "get", "after"])
        .output()
        .expect("run dkvs-client");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2", "{out:?}");
    let acked: BTreeMap<String, String> = [("before", "1"), ("after", "2")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    check_converged(&cluster, &acked);
    // Once every server holds the writes (a slave may still be resyncing before):
    // a list whose first server is dead moves on to the next.
    let dead = common::etcd::free_port();
    let list = format!("127.0.0.1:{dead},127.0.0.1:{}", cluster.servers[0].port);
    let out = std::process::Command::new(common::bin("dkvs-client"))
        .args(["-s", &list, "get", "before"])
        .output()
        .expect("run dkvs-client");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{out:?}");
}

/// A cluster whose first server runs as [`PARTITIONED_UID`]; `first_leads`
/// starts it alone first, so that it becomes the master.
fn partition_cluster(name: &str, first_leads: bool) -> Cluster {
    let etcd = EtcdProcess::start();
    let url = EtcdProcess::urls(std::slice::from_ref(&etcd)).join(",");
    let ttl = LEASE_TTL_MS.to_string();
    let args = ["--etcd", &url, "--cluster", name, "--lease-ttl-ms", &ttl];
    let mut servers = Vec::new();
    if !first_leads {
        servers.push(ServerProcess::start(&args));
        let cluster = Cluster { etcd, servers };
        cluster.master(Duration::from_secs(20));
        let Cluster { etcd, mut servers } = cluster;
        servers.insert(0, ServerProcess::start_as_user(PARTITIONED_UID, &args));
        servers.push(ServerProcess::start(&args));
        return Cluster { etcd, servers };
    }
    servers.push(ServerProcess::start_as_user(PARTITIONED_UID, &args));
    let cluster = Cluster { etcd, servers };
    assert_eq!(
        cluster.master(Duration::from_secs(20)),
        0,
        "started alone, it leads"
    );
    let Cluster { etcd, mut servers } = cluster;
    servers.push(ServerProcess::start(&args));
    servers.push(ServerProcess::start(&args));
    Cluster { etcd, servers }
}

#[test]
fn a_master_cut_off_from_etcd_is_replaced_and_acknowledges_nothing_meanwhile() {
    let cluster = partition_cluster("cut-etcd", true);
    let ports = Arc::new(Mutex::new(cluster.ports()));
    let writers = Writers::start(ports.clone(), 4);
    cluster.wait_recorded_slave(0);
    let etcd_port: u16 = EtcdProcess::urls(std::slice::from_ref(&cluster.etcd))[0]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("etcd port");
    let before = writers.acked_count();
    {
        let _cut = FirewallRule::drop_to_port(etcd_port);
        // Another server takes over once the old master's lease expires.
        let mut new = None;
        wait_until(
            "a new master while the old one is cut off",
            Duration::from_secs(30),
            || {
                new = (1..3).find(|&i| {
                    try_stats(cluster.servers[i].port)
                        .is_some_and(|st| value_of(&st, "role").as_deref() == Some("master"))
                });
                new.is_some()
            },
        );
        let during = writers.acked_count();
        wait_until(
            "writes acknowledged by the new master",
            Duration::from_secs(20),
            || writers.acked_count() > during + 20,
        );
        // The old master, still reachable by clients, refuses (it has no lease).
        let mut c = Client::connect("127.0.0.1", cluster.servers[0].port, client_config())
            .expect("the old master still accepts connections");
        assert!(c.put(b"to-the-cut-off-master", b"x").is_err());
    }
    assert!(writers.acked_count() > before);
    // Healed: the old master learns it was deposed and follows.
    wait_stats(
        cluster.servers[0].port,
        "the old master to follow after the heal",
        Duration::from_secs(30),
        following,
    );
    let acked = writers.finish();
    check_converged(&cluster, &acked);
}

#[test]
fn a_slave_cut_off_from_the_master_is_removed_from_the_set_and_writes_go_on() {
    let cluster = partition_cluster("cut-slave", false);
    let master = cluster.master(Duration::from_secs(20));
    assert_ne!(master, 0, "the partitioned server is a slave");
    let ports = Arc::new(Mutex::new(cluster.ports()));
    let writers = Writers::start(ports.clone(), 4);
    let master_port = cluster.servers[master].port;
    let slave_node = {
        let mut node = String::new();
        wait_stats(
            master_port,
            "both slaves recorded",
            Duration::from_secs(20),
            |st| sync_set(st).len() == 2,
        );
        // The partitioned slave's node id, from its own data directory.
        if let Some(dir) = cluster.servers[0].data_dir() {
            node = std::fs::read_to_string(dir.join("node_id")).unwrap_or_default();
        }
        node.trim().to_string()
    };
    assert_eq!(slave_node.len(), 16, "node id of the partitioned slave");
    {
        let _cut = FirewallRule::drop_to_port(master_port);
        wait_stats(
            master_port,
            "the cut-off slave removed from the recorded set",
            Duration::from_secs(20),
            |st| !sync_set(st).contains(&slave_node),
        );
        let during = writers.acked_count();
        wait_until(
            "writes acknowledged without the cut-off slave",
            Duration::from_secs(20),
            || writers.acked_count() > during + 20,
        );
    }
    wait_stats(
        master_port,
        "the slave back in the recorded set after the heal",
        Duration::from_secs(40),
        |st| sync_set(st).contains(&slave_node),
    );
    let acked = writers.finish();
    check_converged(&cluster, &acked);
}
