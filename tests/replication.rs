//! Replication with real processes: one master and its slaves on free loopback
//! ports, driven by the client library, raw pipelined TCP and the CLI, with
//! slaves killed (`kill -9`), frozen (`kill -STOP`) and restarted under load.
//!
//! Every wait polls a condition with a deadline; every loop is bounded in count and time.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{ServerProcess, bin, read_response, wait_until};
use dkvs::client::{Client, ClientConfig, ClientError, Transport};
use dkvs::protocol::{Opcode, Response, Status, encode_request};

/// Time allowed for slaves to register, catch up or converge.
const SYNC_LIMIT: Duration = Duration::from_secs(20);
/// Generous bound on the longest single write while a slave dies or freezes
/// (the 2PC timeout is 300 ms).
const STALL_LIMIT: Duration = Duration::from_secs(3);
/// Requests written before their replies are read, on a pipelined connection.
const PIPELINE_CHUNK: usize = 500;

/// A value and its version as a server holds them.
type Held = (Vec<u8>, u64);

/// A master and its slaves, each started fresh for one test.
struct Cluster {
    master: ServerProcess,
    slaves: Vec<ServerProcess>,
}

impl Cluster {
    /// A master started with `master_args` and `slaves` slaves, all in sync.
    fn start(master_args: &[&str], slaves: usize) -> Cluster {
        Cluster::start_with(master_args, &[], slaves)
    }

    /// [`Cluster::start`], with `slave_args` for every slave.
    fn start_with(master_args: &[&str], slave_args: &[&str], slaves: usize) -> Cluster {
        let master = ServerProcess::start(master_args);
        assert!(
            master
                .ready_line
                .contains("ready: master serving tcp+udp on 127.0.0.1:"),
            "{}",
            master.ready_line
        );
        let slaves: Vec<_> = (0..slaves)
            .map(|_| ServerProcess::start_slave(&master, slave_args))
            .collect();
        let cluster = Cluster { master, slaves };
        cluster.wait_in_sync(cluster.slaves.len() as u64);
        cluster
    }

    /// Wait until the master counts `n` slaves in sync.
    fn wait_in_sync(&self, n: u64) -> Duration {
        wait_until(&format!("{n} slaves are in sync"), SYNC_LIMIT, || {
            self.master.stats().num("slaves_in_sync") == n
        })
    }
}

/// Wait until `slave` follows its master and has applied everything the master
/// has applied now (call when no writes are in flight).
fn wait_caught_up(slave: &ServerProcess, master: &ServerProcess) -> Duration {
    let target = master.stats().num("commit_seq");
    wait_until(
        &format!("slave :{} applied through {target}", slave.port),
        SYNC_LIMIT,
        || {
            let stats = slave.stats();
            stats.get("master_link") == "following" && stats.num("commit_seq") >= target
        },
    )
}

fn client_with_timeout(server: &ServerProcess, transport: Transport, timeout: Duration) -> Client {
    let config = ClientConfig {
        transport,
        timeout,
        ..ClientConfig::default()
    };
    Client::connect("127.0.0.1", server.port, config).expect("connect")
}

/// Send `requests` over one raw TCP connection, [`PIPELINE_CHUNK`] at a time
/// without waiting for replies, and return the replies in order.
fn pipelined(server: &ServerProcess, requests: &[(Opcode, Vec<u8>, Vec<u8>)]) -> Vec<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut replies = Vec::with_capacity(requests.len());
    let mut next_id = 1u32;
    for chunk in requests.chunks(PIPELINE_CHUNK) {
        let mut bytes = Vec::new();
        let first = next_id;
        for (op, key, value) in chunk {
            encode_request(&mut bytes, *op, next_id, key, value);
            next_id += 1;
        }
        stream.write_all(&bytes).expect("write batch");
        for id in first..next_id {
            let reply = read_response(&mut stream);
            assert_eq!(reply.request_id, id, "replies come in request order");
            replies.push(reply);
        }
    }
    replies
}

/// What a server holds for `keys`: value and version, or `None`, read with
/// pipelined GETs. A slave redirects reads until it holds a read lease (it
/// has just caught up): read again until it serves them itself.
fn read_keys(server: &ServerProcess, keys: &[Vec<u8>]) -> Vec<Option<Held>> {
    let gets: Vec<_> = keys
        .iter()
        .map(|k| (Opcode::Get, k.clone(), Vec::new()))
        .collect();
    let deadline = Instant::now() + SYNC_LIMIT;
    loop {
        let replies = pipelined(server, &gets);
        if replies.iter().any(|r| r.status == Ok(Status::Redirect)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        return replies
            .into_iter()
            .map(|r| match r.status {
                Ok(Status::Ok) => Some((r.value, r.version)),
                Ok(Status::NotFound) => None,
                other => panic!("GET failed: {other:?} {}", r.message()),
            })
            .collect();
    }
}

/// A value and its version, or absence, for messages.
fn show(held: &Option<Held>) -> String {
    match held {
        Some((value, version)) => format!("{:?} v{version}", String::from_utf8_lossy(value)),
        None => "absent".to_string(),
    }
}

/// Assert `replica` holds exactly what `master` holds for `keys`, and as many keys.
fn assert_same_data(master: &ServerProcess, replica: &ServerProcess, keys: &[Vec<u8>]) {
    let on_master = read_keys(master, keys);
    let on_replica = read_keys(replica, keys);
    let differ: Vec<_> = keys
        .iter()
        .zip(on_master.iter().zip(&on_replica))
        .filter(|(_, (m, r))| m != r)
        .take(5)
        .map(|(k, (m, r))| {
            format!(
                "{}: master {}, replica {}",
                String::from_utf8_lossy(k),
                show(m),
                show(r)
            )
        })
        .collect();
    assert!(
        differ.is_empty(),
        "replica :{} differs from the master on {} of {} keys, e.g. {differ:#?}",
        replica.port,
        keys.iter()
            .zip(on_master.iter().zip(&on_replica))
            .filter(|(_, (m, r))| m != r)
            .count(),
        keys.len()
    );
    let (m, r) = (master.stats(), replica.stats());
    assert_eq!(m.num("keys"), r.num("keys"), "key counts differ");
    assert_eq!(
        m.num("commit_seq"),
        r.num("commit_seq"),
        "commit_seq differs"
    );
}

/// A writer doing sequential PUTs of distinct keys over TCP until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicU64>,
    handle: JoinHandle<LoadReport>,
}

/// What the writer saw.
#[derive(Debug, Default)]
struct LoadReport {
    /// Keys whose PUT was acknowledged, with the version the master gave.
    acked: Vec<(Vec<u8>, u64)>,
    /// Keys whose PUT failed, with the error.
    failed: Vec<(Vec<u8>, String)>,
    /// When each PUT was sent, and how long its answer took.
    latencies: Vec<(Instant, Duration)>,
}

impl LoadReport {
    fn value_of(key: &[u8]) -> Vec<u8> {
        let mut v = b"value-of-".to_vec();
        v.extend_from_slice(key);
        v
    }

    /// Every key the writer tried.
    fn keys(&self) -> Vec<Vec<u8>> {
        self.acked
            .iter()
            .map(|(k, _)| k.clone())
            .chain(self.failed.iter().map(|(k, _)| k.clone()))
            .collect()
    }

    /// The longest PUT overlapping `[from, to]`.
    fn max_latency_between(&self, from: Instant, to: Instant) -> Duration {
        self.latencies
            .iter()
            .filter(|(sent, took)| *sent <= to && *sent + *took >= from)
            .map(|(_, took)| *took)
            .max()
            .unwrap_or_default()
    }

    fn max_latency(&self) -> Duration {
        self.latencies
            .iter()
            .map(|(_, t)| *t)
            .max()
            .unwrap_or_default()
    }

    /// Assert no write failed or stalled, and every acknowledged write is on the
    /// master and, once caught up, on every slave, which hold the master's data.
    fn assert_nothing_lost(&self, cluster: &Cluster) {
        assert!(
            self.failed.is_empty(),
            "writes failed: {:?}",
            &self.failed[..self.failed.len().min(5)]
        );
        assert!(
            self.max_latency() < STALL_LIMIT,
            "a write took {:?}",
            self.max_latency()
        );
        self.assert_acked_on(&cluster.master);
        let keys = self.keys();
        for slave in &cluster.slaves {
            wait_caught_up(slave, &cluster.master);
            self.assert_acked_on(slave);
            assert_same_data(&cluster.master, slave, &keys);
        }
    }

    /// Assert every acknowledged write is on `server` with its acknowledged version.
    fn assert_acked_on(&self, server: &ServerProcess) {
        let keys: Vec<_> = self.acked.iter().map(|(k, _)| k.clone()).collect();
        let held = read_keys(server, &keys);
        let lost: Vec<_> = self
            .acked
            .iter()
            .zip(&held)
            .filter(|((k, v), got)| got.as_ref() != Some(&(LoadReport::value_of(k), *v)))
            .map(|((k, v), got)| format!("{} v{v}: {got:?}", String::from_utf8_lossy(k)))
            .collect();
        assert!(
            lost.is_empty(),
            "{} of {} acknowledged writes lost or changed on :{}, e.g. {:?}",
            lost.len(),
            self.acked.len(),
            server.port,
            &lost[..lost.len().min(5)]
        );
    }
}

impl Load {
    /// Start writing `PREFIX-N` keys to `server` over `transport`, at most
    /// `max_writes` and for at most 60 s.
    fn start(server: &ServerProcess, transport: Transport, prefix: &str, max_writes: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked_count = Arc::new(AtomicU64::new(0));
        let mut client = client_with_timeout(server, transport, Duration::from_secs(10));
        let (stop2, acked2, prefix) = (stop.clone(), acked_count.clone(), prefix.to_string());
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let mut report = LoadReport::default();
            for i in 0..max_writes {
                if stop2.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let key = format!("{prefix}-{i}").into_bytes();
                let value = LoadReport::value_of(&key);
                let sent = Instant::now();
                let result = client.put(&key, &value);
                report.latencies.push((sent, sent.elapsed()));
                match result {
                    Ok(version) => {
                        report.acked.push((key, version));
                        acked2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        report.failed.push((key, e.to_string()));
                        // A broken connection would fail every later write: reconnect.
                        if matches!(
                            e,
                            ClientError::Io(_) | ClientError::Closed | ClientError::Timeout(_)
                        ) {
                            std::thread::sleep(Duration::from_millis(50));
                            if let Ok(c) = Client::connect(
                                "127.0.0.1",
                                client.server().port(),
                                ClientConfig {
                                    transport,
                                    timeout: Duration::from_secs(10),
                                    ..ClientConfig::default()
                                },
                            ) {
                                client = c;
                            }
                        }
                    }
                }
            }
            report
        });
        Load {
            stop,
            acked_count,
            handle,
        }
    }

    fn acked(&self) -> u64 {
        self.acked_count.load(Ordering::Relaxed)
    }

    /// Wait until `more` further writes are acknowledged; returns the count then.
    fn wait_for_more(&self, more: u64, what: &str) -> u64 {
        let target = self.acked() + more;
        wait_until(
            &format!("{more} more writes are acknowledged ({what})"),
            SYNC_LIMIT,
            || self.acked() >= target,
        );
        self.acked()
    }

    fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("writer thread")
    }

    /// Start a TCP writer and a UDP writer (whose retries of writes held up by a
    /// dead or frozen slave must not be applied twice).
    fn start_both(server: &ServerProcess, prefix: &str) -> [Load; 2] {
        [
            Load::start(server, Transport::Tcp, &format!("{prefix}-tcp"), 200_000),
            Load::start(server, Transport::Udp, &format!("{prefix}-udp"), 200_000),
        ]
    }

    /// Wait until each writer has `more` further writes acknowledged.
    fn wait_for_more_each(loads: &[Load], more: u64, what: &str) -> u64 {
        loads.iter().map(|l| l.wait_for_more(more, what)).sum()
    }

    fn acked_all(loads: &[Load]) -> u64 {
        loads.iter().map(Load::acked).sum()
    }

    /// Stop every writer and merge what they saw.
    fn finish_all(loads: [Load; 2]) -> LoadReport {
        let stop: Vec<_> = loads.iter().map(|l| l.stop.clone()).collect();
        for s in stop {
            s.store(true, Ordering::Relaxed);
        }
        let mut all = LoadReport::default();
        for load in loads {
            let report = load.finish();
            all.acked.extend(report.acked);
            all.failed.extend(report.failed);
            all.latencies.extend(report.latencies);
        }
        all
    }
}

/// `key` as `server` itself holds it: a slave is read once it holds a read
/// lease (a redirect to the master is not followed).
fn get_versioned(server: &ServerProcess, transport: Transport, key: &[u8]) -> Option<Held> {
    let mut client = server.own_reads_client(transport);
    let deadline = Instant::now() + SYNC_LIMIT;
    loop {
        match client.get(key) {
            Ok(v) => return v.map(|v| (v.value, v.version)),
            Err(e) if is_redirect(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("get {}: {e}", String::from_utf8_lossy(key)),
        }
    }
}

fn is_redirect(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Server {
            status: Ok(Status::Redirect),
            ..
        }
    )
}

/// Writes over TCP and over UDP to the master reach both slaves with the same versions,
/// updates and deletes included.
#[test]
fn writes_over_tcp_and_udp_are_readable_from_both_slaves() {
    let cluster = Cluster::start(&[], 2);
    let mut expected: Vec<(Vec<u8>, Option<Held>)> = Vec::new();
    for transport in [Transport::Tcp, Transport::Udp] {
        let mut client = cluster.master.client(transport);
        for i in 0..40 {
            let key = format!("{transport:?}-key-{i}").into_bytes();
            let value = format!("{transport:?} value {i}").into_bytes();
            let version = client.put(&key, &value).expect("put");
            expected.push((key, Some((value, version))));
        }
        let key = format!("{transport:?}-updated").into_bytes();
        client.put(&key, b"first").expect("put");
        let version = client
            .update(&key, b"second")
            .expect("update")
            .expect("exists");
        expected.push((key, Some((b"second".to_vec(), version))));
        let key = format!("{transport:?}-deleted").into_bytes();
        client.put(&key, b"doomed").expect("put");
        assert!(client.delete(&key).expect("delete"));
        expected.push((key, None));
    }
    for slave in &cluster.slaves {
        wait_caught_up(slave, &cluster.master);
        for transport in [Transport::Tcp, Transport::Udp] {
            let mut client = slave.client(transport);
            for (key, want) in &expected {
                let got = client.get(key).expect("get").map(|v| (v.value, v.version));
                assert_eq!(
                    &got,
                    want,
                    "slave :{} over {transport:?}, key {}",
                    slave.port,
                    String::from_utf8_lossy(key)
                );
            }
        }
    }
    let keys: Vec<_> = expected.iter().map(|(k, _)| k.clone()).collect();
    for slave in &cluster.slaves {
        assert_same_data(&cluster.master, slave, &keys);
    }
}

/// A slave started after 10,000 pipelined writes catches up to all of them and
/// shows as in sync in the master's STATS.
#[test]
fn a_slave_started_after_10000_writes_holds_all_of_them() {
    let cluster = Cluster::start(&[], 2);
    let count = 10_000;
    let keys: Vec<Vec<u8>> = (0..count)
        .map(|i| format!("bulk{i:05}").into_bytes())
        .collect();
    let puts: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (Opcode::Put, k.clone(), format!("value {i}").into_bytes()))
        .collect();
    let started = Instant::now();
    let replies = pipelined(&cluster.master, &puts);
    let write_time = started.elapsed();
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, Ok(Status::Ok), "put {i}: {}", reply.message());
    }
    let master_stats = cluster.master.stats();
    assert_eq!(master_stats.num("keys"), count as u64);
    let commit_seq = master_stats.num("commit_seq");
    let third = ServerProcess::start_slave(&cluster.master, &[]);
    let sync_time = wait_until("the third slave is in sync", SYNC_LIMIT, || {
        let stats = cluster.master.stats();
        stats.num("slaves_in_sync") == 3
            && stats
                .slave(&third.addr())
                .is_some_and(|s| s.state == "in-sync")
    });
    wait_caught_up(&third, &cluster.master);
    let stats = third.stats();
    assert_eq!(stats.num("keys"), count as u64, "{}", stats.text);
    assert_eq!(stats.num("commit_seq"), commit_seq, "{}", stats.text);
    assert_eq!(stats.num("applied_seq"), commit_seq, "{}", stats.text);
    assert_same_data(&cluster.master, &third, &keys);
    for slave in &cluster.slaves {
        wait_caught_up(slave, &cluster.master);
        assert_same_data(&cluster.master, slave, &keys);
    }
    // Every value and version is the one the master acknowledged.
    let held = read_keys(&third, &keys);
    for (i, (reply, got)) in replies.iter().zip(&held).enumerate() {
        let want = (format!("value {i}").into_bytes(), reply.version);
        assert_eq!(got.as_ref(), Some(&want), "key {i}");
    }
    // It takes part in later writes like the others.
    let version = cluster
        .master
        .client(Transport::Tcp)
        .put(b"after", b"join")
        .expect("put");
    for slave in cluster.slaves.iter().chain([&third]) {
        wait_caught_up(slave, &cluster.master);
        assert_eq!(
            get_versioned(slave, Transport::Tcp, b"after"),
            Some((b"join".to_vec(), version))
        );
    }
    let slave_line = cluster.master.stats().slave(&third.addr()).expect("listed");
    assert_eq!(slave_line.state, "in-sync");
    eprintln!(
        "10,000 pipelined writes in {write_time:?} ({commit_seq} transactions); \
         third slave in sync after {sync_time:?}"
    );
}

/// `kill -9` of a slave under a write load: writes stall no longer than about
/// the 2PC timeout, no acknowledged write is lost, and the restarted
/// slave converges to identical data while the load goes on.
#[test]
fn kill_9_of_a_slave_under_load_loses_nothing_and_the_restarted_slave_converges() {
    let mut cluster = Cluster::start(&[], 2);
    let loads = Load::start_both(&cluster.master, "k9");
    Load::wait_for_more_each(&loads, 150, "before the kill");
    let killed_at = Instant::now();
    cluster.slaves[1].kill9();
    let at_kill = Load::acked_all(&loads);
    Load::wait_for_more_each(&loads, 150, "after the kill");
    let evicted_in = wait_until("the master drops the killed slave", SYNC_LIMIT, || {
        cluster.master.stats().num("slaves_in_sync") == 1
    });
    let restarted_at = Instant::now();
    cluster.slaves[1].restart();
    // The restarted slave catches up while writes continue.
    Load::wait_for_more_each(&loads, 150, "while the slave rejoins");
    cluster.wait_in_sync(2);
    Load::wait_for_more_each(&loads, 50, "after it rejoined");
    let finished_at = Instant::now();
    let report = Load::finish_all(loads);
    let kill_stall = report.max_latency_between(killed_at, killed_at + Duration::from_secs(1));
    let rejoin_stall = report.max_latency_between(restarted_at, finished_at);
    eprintln!(
        "kill -9: {} writes acked ({} before the kill), {} failed; longest write around the \
         kill {kill_stall:?}, while rejoining {rejoin_stall:?}, overall {:?}; master noticed \
         within {evicted_in:?} of the check",
        report.acked.len(),
        at_kill,
        report.failed.len(),
        report.max_latency()
    );
    assert!(
        kill_stall < STALL_LIMIT,
        "a write took {kill_stall:?} while a slave died"
    );
    report.assert_nothing_lost(&cluster);
    let stats = cluster.master.stats();
    assert_eq!(stats.num("slaves_in_sync"), 2, "{}", stats.text);
}

/// `kill -STOP` of a slave (link open, nothing answered) under a write load:
/// writes resume after about the 2PC timeout, the master stops counting it in
/// sync, and after `kill -CONT` it resyncs and converges.
#[test]
fn kill_stop_of_a_slave_under_load_evicts_it_and_it_converges_after_cont() {
    let mut cluster = Cluster::start(&[], 2);
    let frozen_addr = cluster.slaves[1].addr();
    let loads = Load::start_both(&cluster.master, "stop");
    Load::wait_for_more_each(&loads, 150, "before the stop");
    let stopped_at = Instant::now();
    cluster.slaves[1].stop();
    let at_stop = Load::acked_all(&loads);
    Load::wait_for_more_each(&loads, 150, "while the slave is frozen");
    let stats = cluster.master.stats();
    assert_eq!(stats.num("slaves_in_sync"), 1, "{}", stats.text);
    let line = stats.slave(&frozen_addr);
    assert!(
        line.as_ref().is_none_or(|l| l.state != "in-sync"),
        "frozen slave still listed in sync: {line:?}"
    );
    let resumed_at = Instant::now();
    cluster.slaves[1].resume();
    Load::wait_for_more_each(&loads, 150, "while the slave resyncs");
    wait_until("the resumed slave is in sync again", SYNC_LIMIT, || {
        let stats = cluster.master.stats();
        stats.num("slaves_in_sync") == 2
            && stats
                .slaves()
                .iter()
                .any(|s| s.addr == frozen_addr && s.state == "in-sync")
    });
    let rejoin = resumed_at.elapsed();
    Load::wait_for_more_each(&loads, 50, "after it rejoined");
    let finished_at = Instant::now();
    let report = Load::finish_all(loads);
    let udp_retries = cluster.master.stats().num("udp_retries_deduplicated");
    let stop_stall = report.max_latency_between(stopped_at, resumed_at);
    let rejoin_stall = report.max_latency_between(resumed_at, finished_at);
    eprintln!(
        "kill -STOP: {} writes acked ({} before the stop), {} failed; longest write while \
         frozen {stop_stall:?}, after CONT {rejoin_stall:?}; back in sync {rejoin:?} after CONT; \
         {udp_retries} UDP retries deduplicated",
        report.acked.len(),
        at_stop,
        report.failed.len()
    );
    assert!(
        stop_stall < STALL_LIMIT,
        "a write took {stop_stall:?} while a slave was frozen"
    );
    // The first PREPARE (or COMMIT) the frozen slave left unanswered held its
    // transaction until the 300 ms timer evicted the slave: the master waited.
    assert!(
        stop_stall >= Duration::from_millis(200),
        "no write waited for the frozen slave ({stop_stall:?}): was it still a participant?"
    );
    report.assert_nothing_lost(&cluster);
}

/// A write sent to a slave succeeds through the redirect (library over TCP and
/// UDP, the CLI over both) and is then readable on the master and the other slave.
#[test]
fn writes_sent_to_a_slave_succeed_through_the_redirect() {
    let cluster = Cluster::start(&[], 2);
    let (slave, other) = (&cluster.slaves[0], &cluster.slaves[1]);
    let mut written = Vec::new();
    for transport in [Transport::Tcp, Transport::Udp] {
        let mut client = slave.client(transport);
        let key = format!("redirected-{transport:?}").into_bytes();
        let version = client
            .put(&key, b"via a slave")
            .expect("put through a slave");
        written.push((key.clone(), b"via a slave".to_vec(), version));
        // Reads stay on the slave; later writes go straight to the master.
        let version = client
            .update(&key, b"updated via a slave")
            .expect("update")
            .expect("exists");
        written.pop();
        written.push((key, b"updated via a slave".to_vec(), version));
    }
    for flag in ["-t", "-u"] {
        let key = format!("redirected-cli{flag}");
        let out = std::process::Command::new(bin("dkvs-client"))
            .args([
                "-p",
                &slave.port.to_string(),
                flag,
                "put",
                &key,
                "from the cli",
            ])
            .output()
            .expect("run dkvs-client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "dkvs-client {flag} put via a slave: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let version: u64 = stdout
            .trim()
            .strip_prefix("OK version ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected output {stdout:?}"));
        written.push((key.into_bytes(), b"from the cli".to_vec(), version));
    }
    assert!(slave.stats().num("redirects") >= 4);
    for (key, value, version) in &written {
        let want = Some((value.clone(), *version));
        assert_eq!(get_versioned(&cluster.master, Transport::Tcp, key), want);
    }
    for replica in [slave, other] {
        wait_caught_up(replica, &cluster.master);
        for (key, value, version) in &written {
            for transport in [Transport::Tcp, Transport::Udp] {
                assert_eq!(
                    get_versioned(replica, transport, key),
                    Some((value.clone(), *version)),
                    "slave :{} over {transport:?}",
                    replica.port
                );
            }
        }
    }
}

/// `--min-slaves 2` with one slave down: writes are refused with UNAVAILABLE and a
/// clear message (library and CLI), nothing refused is applied, and writes work
/// again once the slave is back.
#[test]
fn min_slaves_refuses_writes_while_a_slave_is_down() {
    let mut cluster = Cluster::start(&["--min-slaves", "2"], 2);
    let mut client = cluster.master.client(Transport::Tcp);
    client.put(b"before", b"ok").expect("put with both slaves");
    cluster.slaves[1].kill9();
    cluster.wait_in_sync(1);
    for transport in [Transport::Tcp, Transport::Udp] {
        let mut client = cluster.master.client(transport);
        match client.put(b"refused", b"no") {
            Err(ClientError::Server { status, message }) => {
                assert_eq!(status, Ok(Status::Unavailable), "{message}");
                assert!(
                    message.contains("1 slaves in sync")
                        && message.contains("--min-slaves requires 2"),
                    "unclear message: {message}"
                );
            }
            other => panic!("expected UNAVAILABLE over {transport:?}, got {other:?}"),
        }
        // Through a slave too (the redirect leads to the same refusal).
        match cluster.slaves[0].client(transport).delete(b"before") {
            Err(ClientError::Server { status, .. }) => assert_eq!(status, Ok(Status::Unavailable)),
            other => panic!("expected UNAVAILABLE via the slave, got {other:?}"),
        }
    }
    let out = std::process::Command::new(bin("dkvs-client"))
        .args([
            "-p",
            &cluster.master.port.to_string(),
            "put",
            "refused",
            "no",
        ])
        .output()
        .expect("run dkvs-client");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("UNAVAILABLE") && stderr.contains("--min-slaves requires 2"),
        "{stderr}"
    );
    // Reads still work, and nothing refused was applied.
    assert_eq!(
        get_versioned(&cluster.master, Transport::Tcp, b"refused"),
        None
    );
    assert!(get_versioned(&cluster.master, Transport::Tcp, b"before").is_some());
    assert!(cluster.master.stats().num("writes_failed") >= 5);
    cluster.slaves[1].restart();
    cluster.wait_in_sync(2);
    let version = client
        .put(b"after", b"ok again")
        .expect("put once both are back");
    for slave in &cluster.slaves {
        wait_caught_up(slave, &cluster.master);
        assert_eq!(
            get_versioned(slave, Transport::Tcp, b"after"),
            Some((b"ok again".to_vec(), version))
        );
        assert_eq!(get_versioned(slave, Transport::Tcp, b"refused"), None);
        assert!(get_versioned(slave, Transport::Tcp, b"before").is_some());
    }
}

/// A slave's STATS name its master and link state; the master's list both slaves.
#[test]
fn stats_show_the_master_link_and_the_slaves() {
    let mut cluster = Cluster::start(&[], 2);
    let mut client = cluster.master.client(Transport::Tcp);
    for i in 0..5 {
        client.put(format!("s{i}").as_bytes(), b"v").expect("put");
    }
    let master_addr = cluster.master.addr();
    for slave in &cluster.slaves {
        assert_eq!(
            slave.ready_line,
            format!(
                "dkvs-server ready: slave of {master_addr} serving tcp+udp on {}",
                slave.addr()
            )
        );
        wait_caught_up(slave, &cluster.master);
        let stats = slave.stats();
        assert_eq!(stats.get("role"), "slave", "{}", stats.text);
        assert_eq!(stats.get("master"), master_addr, "{}", stats.text);
        assert_eq!(stats.get("master_link"), "following", "{}", stats.text);
        assert_eq!(
            stats.num("applied_seq"),
            cluster.master.stats().num("commit_seq")
        );
    }
    let commit_seq = cluster.master.stats().num("commit_seq");
    wait_until(
        "the master sees both slaves at its commit_seq",
        SYNC_LIMIT,
        || {
            let stats = cluster.master.stats();
            stats
                .slaves()
                .iter()
                .all(|s| s.applied == commit_seq && s.lag == 0)
        },
    );
    let stats = cluster.master.stats();
    assert_eq!(stats.get("role"), "master", "{}", stats.text);
    assert_eq!(stats.num("slaves"), 2, "{}", stats.text);
    assert_eq!(stats.num("slaves_in_sync"), 2, "{}", stats.text);
    let mut listed: Vec<_> = stats
        .slaves()
        .into_iter()
        .map(|s| (s.addr, s.state))
        .collect();
    listed.sort();
    let mut want: Vec<_> = cluster
        .slaves
        .iter()
        .map(|s| (s.addr(), "in-sync".to_string()))
        .collect();
    want.sort();
    assert_eq!(listed, want, "{}", stats.text);
    // Without its master a slave says so, and redirects reads to it: its
    // own could be stale.
    cluster.master.kill9();
    for slave in &cluster.slaves {
        wait_until("the slave notices its master is gone", SYNC_LIMIT, || {
            matches!(slave.stats().get("master_link"), "down" | "connecting")
        });
        let refused = slave.own_reads_client(Transport::Udp).get(b"s0");
        assert!(
            refused.as_ref().is_err_and(is_redirect),
            "a slave without its master must not serve reads: {refused:?}"
        );
        assert!(slave.stats().num("reads_refused") >= 1);
    }
}

/// A slave the master evicted and that rejoined is listed once. At b3cc1c0 it
/// was not: an eviction closed the link without telling the coordinator, so the
/// evicted entry stayed in the membership for ever (`slaves 3` for two slave
/// processes after one STOP/CONT, one more entry per eviction).
#[test]
fn an_evicted_slave_that_rejoins_is_listed_once() {
    let mut cluster = Cluster::start(&[], 2);
    cluster.slaves[1].stop();
    // A write makes the master wait for the frozen slave's vote and evict it.
    cluster
        .master
        .client(Transport::Tcp)
        .put(b"k", b"v")
        .expect("put");
    cluster.wait_in_sync(1);
    cluster.slaves[1].resume();
    cluster.wait_in_sync(2);
    let stats = cluster.master.stats();
    assert_eq!(stats.num("slaves"), 2, "{}", stats.text);
    assert_eq!(stats.slaves().len(), 2, "{}", stats.text);
}

/// The snapshot path with real processes. The master's in-memory commit log
/// holds 100,000 transactions, so a new or restarted slave normally catches up
/// by log replay; a slave that knows *more* than its master must take a
/// snapshot. So: the master dies and comes back with its disk lost (an empty
/// data directory) while a slave is frozen; the new master takes a few writes;
/// the thawed slave, whose operator allows it (`--resync-discard-data`),
/// registers ahead of it and must end up with exactly the new master's data,
/// the old master's keys gone.
#[test]
fn a_slave_ahead_of_a_restarted_master_resyncs_by_snapshot() {
    let mut cluster = Cluster::start_with(&[], &["--resync-discard-data"], 1);
    let mut client = cluster.master.client(Transport::Tcp);
    for i in 0..50 {
        client
            .put(format!("old{i}").as_bytes(), b"from the first master")
            .expect("put");
    }
    drop(client);
    wait_caught_up(&cluster.slaves[0], &cluster.master);
    let old_seq = cluster.slaves[0].stats().num("applied_seq");
    cluster.slaves[0].stop();
    cluster.master.restart_with(false);
    let mut client = cluster.master.client(Transport::Tcp);
    let mut written = Vec::new();
    for i in 0..10 {
        let key = format!("new{i}").into_bytes();
        let version = client.put(&key, b"from the second master").expect("put");
        written.push((key, version));
    }
    let new_seq = cluster.master.stats().num("commit_seq");
    assert!(
        new_seq < old_seq,
        "the slave must be ahead: {new_seq} vs {old_seq}"
    );
    cluster.slaves[0].resume();
    cluster.wait_in_sync(1);
    wait_caught_up(&cluster.slaves[0], &cluster.master);
    let slave = &cluster.slaves[0];
    let stats = slave.stats();
    assert_eq!(stats.num("keys"), 10, "{}", stats.text);
    assert_eq!(stats.num("applied_seq"), new_seq, "{}", stats.text);
    let mut keys: Vec<Vec<u8>> = (0..50).map(|i| format!("old{i}").into_bytes()).collect();
    keys.extend(written.iter().map(|(k, _)| k.clone()));
    assert_same_data(&cluster.master, slave, &keys);
    // Later writes reach it by two-phase commit as usual.
    let version = client.put(b"after", b"snapshot").expect("put");
    wait_caught_up(slave, &cluster.master);
    assert_eq!(
        get_versioned(slave, Transport::Tcp, b"after"),
        Some((b"snapshot".to_vec(), version))
    );
}

/// A slave that followed an earlier life of the master, resuming at a position
/// the new master's commit numbers have passed (and its log covers): the two
/// histories have nothing in common, so log replay would leave the old
/// master's keys in place and miss most of the new master's. REGISTER carries
/// the history id the slave's position belongs to; the master restarted with
/// an empty data directory has a new one, so the slave (allowed to discard its
/// data) must get a snapshot.
#[test]
fn a_slave_of_an_earlier_master_life_does_not_resume_by_log_replay() {
    let mut cluster = Cluster::start_with(&[], &["--resync-discard-data"], 1);
    let mut client = cluster.master.client(Transport::Tcp);
    for i in 0..50 {
        client
            .put(format!("old{i}").as_bytes(), b"first life")
            .expect("put");
    }
    drop(client);
    wait_caught_up(&cluster.slaves[0], &cluster.master);
    cluster.slaves[0].stop();
    cluster.master.restart_with(false);
    let mut client = cluster.master.client(Transport::Tcp);
    let mut keys: Vec<Vec<u8>> = (0..50).map(|i| format!("old{i}").into_bytes()).collect();
    for i in 0..60 {
        let key = format!("new{i}").into_bytes();
        client.put(&key, b"second life").expect("put");
        keys.push(key);
    }
    cluster.slaves[0].resume();
    cluster.wait_in_sync(1);
    wait_caught_up(&cluster.slaves[0], &cluster.master);
    assert_same_data(&cluster.master, &cluster.slaves[0], &keys);
}

/// A slave joining by snapshot while writes go on: with `--repl-backlog-mb 0`
/// the master keeps no commits for partial resync, so the third slave gets a
/// snapshot of 10,000 keys of 300 bytes (several chunks, streamed across loop
/// iterations; commits that land meanwhile make the master send a newer one).
/// Writes must not stall while it streams, and every replica ends identical.
#[test]
fn a_slave_joining_by_snapshot_under_load_converges() {
    let cluster = Cluster::start(&["--repl-backlog-mb", "0"], 2);
    let value = vec![b'x'; 300];
    let keys: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("bulk{i:05}").into_bytes())
        .collect();
    let puts: Vec<_> = keys
        .iter()
        .map(|k| (Opcode::Put, k.clone(), value.clone()))
        .collect();
    for reply in pipelined(&cluster.master, &puts) {
        assert_eq!(reply.status, Ok(Status::Ok), "{}", reply.message());
    }
    let loads = Load::start_both(&cluster.master, "snap");
    Load::wait_for_more_each(&loads, 50, "before the join");
    let joining_at = Instant::now();
    let third = ServerProcess::start_slave(&cluster.master, &[]);
    let joined = cluster.wait_in_sync(3);
    Load::wait_for_more_each(&loads, 100, "after the join");
    let report = Load::finish_all(loads);
    let stall = report.max_latency_between(joining_at, Instant::now());
    eprintln!(
        "snapshot join under load: in sync after {joined:?}; {} writes acked, {} failed, \
         longest write while it joined {stall:?}",
        report.acked.len(),
        report.failed.len()
    );
    assert!(
        report.failed.is_empty(),
        "writes failed: {:?}",
        &report.failed[..report.failed.len().min(5)]
    );
    assert!(
        stall < STALL_LIMIT,
        "a write took {stall:?} during the snapshot"
    );
    let mut all_keys = keys;
    all_keys.extend(report.keys());
    report.assert_acked_on(&cluster.master);
    for slave in cluster.slaves.iter().chain([&third]) {
        wait_caught_up(slave, &cluster.master);
        report.assert_acked_on(slave);
        assert_same_data(&cluster.master, slave, &all_keys);
    }
}

#[test]
fn a_slave_notices_a_stopped_master_and_rejoins_after_it_resumes() {
    let mut cluster = Cluster::start(&[], 1);
    let mut client = cluster.master.client(Transport::Tcp);
    client.put(b"before", b"stop").expect("put");
    wait_caught_up(&cluster.slaves[0], &cluster.master);
    // SIGSTOP keeps the master's sockets open: only its silence tells the slave.
    let stopped_at = Instant::now();
    cluster.master.stop();
    // Its read lease (200 ms) is not renewed: it stops serving reads long
    // before it gives up on the link. (At 401208d it served them for 3 s.)
    let mut reader = cluster.slaves[0].own_reads_client(Transport::Tcp);
    let refused_after = wait_until(
        "the slave refuses reads of a master it no longer hears",
        Duration::from_secs(10),
        || reader.get(b"before").is_err_and(|e| is_redirect(&e)),
    );
    eprintln!("reads refused {refused_after:?} after the master stopped");
    assert!(
        refused_after < Duration::from_millis(1_000),
        "reads were served {refused_after:?} after the master stopped"
    );
    wait_until(
        "the slave gives up on its silent master",
        Duration::from_secs(15),
        || cluster.slaves[0].stats().get("master_link") != "following",
    );
    // The silence period is 1.5 s (docs/PROTOCOL.md §9.7), counted from the
    // last heartbeat heard, up to 100 ms before the stop.
    let took = stopped_at.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "the slave waited for the silence period, not less: {took:?}"
    );
    cluster.master.resume();
    wait_until(
        "the slave follows the master again",
        Duration::from_secs(15),
        || cluster.slaves[0].stats().get("master_link") == "following",
    );
    client.put(b"after", b"resume").expect("put after resume");
    wait_caught_up(&cluster.slaves[0], &cluster.master);
    // Served by the slave itself once its lease is renewed.
    assert_eq!(
        get_versioned(&cluster.slaves[0], Transport::Tcp, b"after").map(|v| v.0),
        Some(b"resume".to_vec())
    );
}
