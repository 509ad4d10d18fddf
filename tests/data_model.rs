//! Compare-and-set and multi-key transactions with real processes: a master
//! and slaves on free loopback ports, in temp dirs, driven by the client library.
//!
//! Every wait polls a condition with a deadline; every loop is bounded.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::{ServerProcess, read_response, wait_until};
use dkvs::client::{Cas, Client, Transport, TxnOutcome};
use dkvs::protocol::txn::{Check, Condition, Txn, TxnWrite};
use dkvs::protocol::{EXPECT_ABSENT, Opcode, Status, encode_request};

/// Time allowed for slaves to register and catch up.
const SYNC_LIMIT: Duration = Duration::from_secs(20);
/// Attempts one CAS increment may take under contention before the test gives up.
const MAX_ATTEMPTS: usize = 100_000;

fn cluster(slaves: usize) -> (ServerProcess, Vec<ServerProcess>) {
    let master = ServerProcess::start(&["--fsync", "never"]);
    let slaves: Vec<_> = (0..slaves)
        .map(|_| ServerProcess::start_slave(&master, &["--fsync", "never"]))
        .collect();
    wait_until("slaves in sync", SYNC_LIMIT, || {
        master.stats().num("slaves_in_sync") == slaves.len() as u64
    });
    (master, slaves)
}

/// Wait until `slave` has applied everything the master has (no writes in flight).
fn caught_up(slave: &ServerProcess, master: &ServerProcess) {
    let target = master.stats().num("commit_seq");
    wait_until("slave caught up", SYNC_LIMIT, || {
        slave.stats().num("commit_seq") >= target
    });
}

/// Add one to the counter at `key` by read, then compare-and-set; returns the attempts.
fn cas_increment(client: &mut Client, key: &[u8]) -> usize {
    for attempt in 1..=MAX_ATTEMPTS {
        let (next, expect) = match client.get(key).expect("get") {
            None => (1, EXPECT_ABSENT),
            Some(held) => {
                let n: u64 = std::str::from_utf8(&held.value)
                    .expect("utf8")
                    .parse()
                    .expect("a number");
                (n + 1, held.version)
            }
        };
        let value = next.to_string();
        match client
            .write_if(Opcode::Put, key, value.as_bytes(), expect)
            .expect("cas")
        {
            Cas::Done(_) => return attempt,
            Cas::Mismatch(_) => continue,
            Cas::NotFound => panic!("PUT answered NOT_FOUND"),
        }
    }
    panic!("no CAS increment succeeded in {MAX_ATTEMPTS} attempts");
}

#[test]
fn a_cas_counter_from_8_clients_ends_at_the_exact_total() {
    const CLIENTS: usize = 8;
    const EACH: usize = 40;
    let (master, slaves) = cluster(1);
    let port = master.port;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let transport = if i % 4 == 3 {
                    Transport::Udp
                } else {
                    Transport::Tcp
                };
                let mut client = Client::connect(
                    "127.0.0.1",
                    port,
                    dkvs::client::ClientConfig {
                        transport,
                        timeout: Duration::from_secs(10),
                        ..Default::default()
                    },
                )
                .expect("connect");
                (0..EACH)
                    .map(|_| cas_increment(&mut client, b"counter"))
                    .sum::<usize>()
            })
        })
        .collect();
    let attempts: usize = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    let total = (CLIENTS * EACH).to_string();
    assert!(attempts >= CLIENTS * EACH);
    let mut client = master.client(Transport::Tcp);
    let held = client.get(b"counter").expect("get").expect("present");
    assert_eq!(held.value, total.as_bytes(), "{attempts} attempts");
    caught_up(&slaves[0], &master);
    let on_slave = slaves[0].client(Transport::Tcp).get(b"counter");
    let on_slave = on_slave.expect("get").expect("present");
    assert_eq!(on_slave, held, "the slave holds the same value and version");
}

#[test]
fn cas_answers_version_mismatch_and_writes_nothing() {
    let (master, _slaves) = cluster(0);
    for transport in [Transport::Tcp, Transport::Udp] {
        let mut c = master.client(transport);
        let key: &[u8] = if transport == Transport::Tcp {
            b"t"
        } else {
            b"u"
        };
        let Cas::Done(v1) = c.put_if_absent(key, b"1").expect("put") else {
            panic!("the key is absent");
        };
        assert_eq!(c.get(key).expect("get").expect("present").version, v1);
        assert_eq!(c.put_if_absent(key, b"2").expect("put"), Cas::Mismatch(v1));
        assert_eq!(
            c.write_if(Opcode::Put, key, b"2", v1 + 100).expect("put"),
            Cas::Mismatch(v1)
        );
        assert_eq!(
            c.write_if(Opcode::Update, b"absent", b"2", 5)
                .expect("update"),
            Cas::Mismatch(0)
        );
        let Cas::Done(v2) = c.write_if(Opcode::Update, key, b"2", v1).expect("update") else {
            panic!("update with the right version must apply");
        };
        assert!(v2 > v1);
        assert_eq!(
            c.write_if(Opcode::Delete, key, b"", v1).expect("delete"),
            Cas::Mismatch(v2)
        );
        assert_eq!(c.get(key).expect("get").expect("kept").value, b"2");
        assert!(matches!(
            c.write_if(Opcode::Delete, key, b"", v2).expect("delete"),
            Cas::Done(_)
        ));
        assert_eq!(c.get(key).expect("get"), None);
    }
}

fn txn<'a>(conditions: &[(&'a [u8], Check)], writes: &[TxnWrite<'a>]) -> Txn<'a> {
    Txn {
        conditions: conditions
            .iter()
            .map(|&(key, check)| Condition { key, check })
            .collect(),
        writes: writes.to_vec(),
    }
}

#[test]
fn a_transaction_is_all_or_nothing_on_the_master_and_every_slave() {
    let (master, slaves) = cluster(2);
    let mut c = master.client(Transport::Tcp);
    let va = c.put(b"a", b"1").expect("put");
    // A failed condition writes nothing, and says which condition failed.
    let failing = txn(
        &[(b"a", Check::Version(va)), (b"b", Check::Exists)],
        &[
            TxnWrite::Put {
                key: b"a",
                value: b"2",
            },
            TxnWrite::Put {
                key: b"c",
                value: b"3",
            },
        ],
    );
    assert_eq!(
        c.txn(&failing).expect("txn"),
        TxnOutcome::Failed {
            index: 1,
            current: 0
        }
    );
    // Four writes land together at one version, through a slave's redirect too.
    let four = txn(
        &[(b"a", Check::Version(va)), (b"b", Check::Absent)],
        &[
            TxnWrite::Put {
                key: b"a",
                value: b"A",
            },
            TxnWrite::Put {
                key: b"b",
                value: b"B",
            },
            TxnWrite::Put {
                key: b"c",
                value: b"C",
            },
            TxnWrite::Delete { key: b"absent" },
        ],
    );
    let mut via_slave = slaves[0].client(Transport::Tcp);
    let TxnOutcome::Committed(version) = via_slave.txn(&four).expect("txn") else {
        panic!("conditions hold");
    };
    assert!(version > va);
    assert_eq!(
        via_slave.txn(&four).expect("txn again"),
        TxnOutcome::Failed {
            index: 0,
            current: version
        }
    );
    for server in std::iter::once(&master).chain(&slaves) {
        caught_up(server, &master);
        let mut client = server.client(Transport::Tcp);
        for (key, value) in [(b"a", b"A"), (b"b", b"B"), (b"c", b"C")] {
            let held = client.get(key).expect("get").expect("present");
            assert_eq!((held.value.as_slice(), held.version), (&value[..], version));
        }
    }
}

#[test]
fn concurrent_transfers_keep_the_sum_on_every_replica() {
    const ACCOUNTS: usize = 4;
    const WORKERS: usize = 4;
    const TRANSFERS: usize = 25;
    let (master, slaves) = cluster(1);
    let mut c = master.client(Transport::Tcp);
    let names: Vec<Vec<u8>> = (0..ACCOUNTS)
        .map(|i| format!("acct{i}").into_bytes())
        .collect();
    for name in &names {
        c.put(name, b"100").expect("seed");
    }
    let port = master.port;
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let names = names.clone();
            thread::spawn(move || {
                let mut client =
                    Client::connect("127.0.0.1", port, Default::default()).expect("connect");
                for t in 0..TRANSFERS {
                    let from = &names[(w + t) % ACCOUNTS];
                    let to = &names[(w + t + 1) % ACCOUNTS];
                    for attempt in 0..=MAX_ATTEMPTS {
                        assert!(attempt < MAX_ATTEMPTS, "transfer never committed");
                        let read = |client: &mut Client, key: &[u8]| {
                            let held = client.get(key).expect("get").expect("present");
                            let n: i64 = String::from_utf8(held.value)
                                .expect("utf8")
                                .parse()
                                .expect("number");
                            (n, held.version)
                        };
                        let (a, va) = read(&mut client, from);
                        let (b, vb) = read(&mut client, to);
                        let (a, b) = ((a - 7).to_string(), (b + 7).to_string());
                        let t = txn(
                            &[(from, Check::Version(va)), (to, Check::Version(vb))],
                            &[
                                TxnWrite::Put {
                                    key: from,
                                    value: a.as_bytes(),
                                },
                                TxnWrite::Put {
                                    key: to,
                                    value: b.as_bytes(),
                                },
                            ],
                        );
                        if let TxnOutcome::Committed(_) = client.txn(&t).expect("txn") {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    for server in std::iter::once(&master).chain(&slaves) {
        caught_up(server, &master);
        let mut client = server.client(Transport::Tcp);
        let sum: i64 = names
            .iter()
            .map(|n| {
                let held = client.get(n).expect("get").expect("present");
                String::from_utf8(held.value)
                    .expect("utf8")
                    .parse::<i64>()
                    .expect("n")
            })
            .sum();
        assert_eq!(sum, 100 * ACCOUNTS as i64, "server :{}", server.port);
    }
}

#[test]
fn a_malformed_txn_is_invalid_argument_and_keeps_the_connection() {
    let (master, _slaves) = cluster(0);
    let mut stream = TcpStream::connect(("127.0.0.1", master.port)).expect("connect");
    let mut bad = Vec::new();
    // One condition announced, none present.
    encode_request(&mut bad, Opcode::Txn, 1, b"", &[0, 1, 0]);
    encode_request(&mut bad, Opcode::Ping, 2, b"", b"");
    stream.write_all(&bad).expect("write");
    let reply = read_response(&mut stream);
    assert_eq!(reply.status, Ok(Status::InvalidArgument));
    assert_eq!(reply.opcode, Opcode::Txn as u8);
    assert!(reply.message().contains("truncated"), "{}", reply.message());
    let reply = read_response(&mut stream);
    assert_eq!((reply.request_id, reply.status), (2, Ok(Status::Ok)));
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn expired_keys_vanish_on_the_master_and_every_slave() {
    const TIMED: usize = 50;
    let (master, slaves) = cluster(2);
    let mut c = master.client(Transport::Tcp);
    c.put(b"stays", b"1").expect("put");
    let deadline = unix_ms() + 400;
    for i in 0..TIMED {
        let key = format!("timed{i}");
        c.put_expiring(key.as_bytes(), b"v", deadline, 0)
            .expect("putex");
    }
    // One key expired by EXPIRE, one saved by PERSIST.
    c.put(b"later", b"x").expect("put");
    assert!(
        c.expire(b"later", Some(deadline))
            .expect("expire")
            .is_some()
    );
    c.put_expiring(b"saved", b"y", deadline, 0).expect("putex");
    assert!(c.expire(b"saved", None).expect("persist").is_some());
    assert_eq!(c.expire(b"absent", Some(deadline)).expect("expire"), None);
    let (at, _) = c.ttl(b"later").expect("ttl").expect("present");
    assert_eq!(at, Some(deadline));
    for slave in &slaves {
        caught_up(slave, &master);
        let mut s = slave.client(Transport::Tcp);
        assert!(s.get(b"timed0").expect("get").is_some(), "not expired yet");
        assert_eq!(
            s.ttl(b"later").expect("ttl").map(|t| t.0),
            Some(Some(deadline))
        );
    }
    // The master deletes them (a replicated transaction): the key counts fall everywhere.
    let expected_keys = 2; // stays, saved
    wait_until("the master deleted the expired keys", SYNC_LIMIT, || {
        master.stats().num("keys_held") == expected_keys
    });
    assert!(master.stats().num("expired_keys") > TIMED as u64);
    for server in std::iter::once(&master).chain(&slaves) {
        caught_up(server, &master);
        let stats = server.stats();
        assert_eq!(stats.num("keys"), expected_keys, "server :{}", server.port);
        assert_eq!(
            stats.num("keys_held"),
            expected_keys,
            "server :{}",
            server.port
        );
        assert_eq!(stats.num("keys_with_deadline"), 0);
        let mut client = server.client(Transport::Tcp);
        for key in [&b"timed7"[..], b"later"] {
            assert_eq!(client.get(key).expect("get"), None);
        }
        assert!(client.get(b"saved").expect("get").is_some());
        assert!(client.get(b"stays").expect("get").is_some());
    }
}

#[test]
fn a_slave_hides_an_expired_key_before_the_deletion_reaches_it() {
    let (master, mut slaves) = cluster(1);
    let mut c = master.client(Transport::Tcp);
    c.put_expiring(b"k", b"v", unix_ms() + 300, 0)
        .expect("putex");
    caught_up(&slaves[0], &master);
    // Frozen, the slave is evicted and receives no deletion; its own reads
    // must hide the key once the deadline passed anyway.
    slaves[0].stop();
    wait_until("the master deleted the key", SYNC_LIMIT, || {
        master.stats().num("expired_keys") >= 1
    });
    slaves[0].resume();
    let mut s = slaves[0].client(Transport::Tcp);
    assert_eq!(s.get(b"k").expect("get"), None);
}

#[test]
fn deadlines_survive_a_restart() {
    let mut master = ServerProcess::start(&[]);
    let mut c = master.client(Transport::Tcp);
    let far = unix_ms() + 3_600_000;
    c.put_expiring(b"far", b"v", far, 0).expect("putex");
    c.put(b"plain", b"v").expect("put");
    c.expire(b"plain", Some(far + 1)).expect("expire");
    drop(c);
    master.restart();
    let mut c = master.client(Transport::Tcp);
    assert_eq!(c.ttl(b"far").expect("ttl").map(|t| t.0), Some(Some(far)));
    assert_eq!(
        c.ttl(b"plain").expect("ttl").map(|t| t.0),
        Some(Some(far + 1))
    );
}
