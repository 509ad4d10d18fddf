//! Snapshots to slaves with real processes (issue 10, resource control): slaves
//! that join at about the same time share one snapshot, whose copy is freed
//! when the last of them is done; the memory a snapshot holds is capped by
//! `--max-snapshot-memory-mb`, and at the cap its receiver is disconnected and
//! comes back later, while no client write fails.
//!
//! Every wait polls with a deadline; no assertion is on wall-clock time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{ServerProcess, put_pipelined, wait_until};
use dkvs::client::Transport;

/// Keys loaded before the slaves join: a snapshot of them takes a while to
/// stream to a debug build, so that the slaves join it while it streams.
const KEYS: u64 = 200_000;

/// Overwrite keys all over the store, round after round, until `stop`:
/// every shard a snapshot still needs is copied before it changes.
fn overwrite_until(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut rounds = 0;
        while !stop.load(Ordering::Relaxed) {
            put_pipelined(port, "bulk", (rounds % 25..KEYS).step_by(25), b"changed");
            rounds += 1;
        }
        rounds
    })
}

fn state_of(master: &ServerProcess, addr: &str) -> Option<String> {
    master.stats().slave(addr).map(|s| s.state)
}

/// Wait until each slave is in sync and has applied the master's commit_seq.
fn wait_all_caught_up(master: &ServerProcess, slaves: &[ServerProcess]) {
    for slave in slaves {
        let addr = slave.addr();
        wait_until("the slave is in sync", Duration::from_secs(180), || {
            state_of(master, &addr).as_deref() == Some("in-sync")
        });
    }
    let target = master.stats().num("commit_seq");
    for slave in slaves {
        wait_until(
            "the slave applied everything",
            Duration::from_secs(60),
            || slave.stats().num("commit_seq") >= target,
        );
    }
}

/// Spot-check that `slave` holds what the master holds.
fn same_data(master: &ServerProcess, slave: &ServerProcess) {
    let mut at_master = master.client(Transport::Tcp);
    let mut at_slave = slave.own_reads_client(Transport::Tcp);
    for i in (0..KEYS).step_by(997).chain([0, 1, 24, 25, KEYS - 1]) {
        let key = format!("bulk{i}");
        let want = at_master.get(key.as_bytes()).expect("get at the master");
        let got = at_slave.get(key.as_bytes()).expect("get at the slave");
        assert_eq!(
            got.map(|g| g.value),
            want.map(|w| w.value),
            "{key} at slave {}",
            slave.addr()
        );
    }
}

#[test]
fn three_slaves_joining_together_share_one_snapshot() {
    let master = ServerProcess::start(&["--fsync", "never"]);
    put_pipelined(master.port, "bulk", 0..KEYS, &[b's'; 400]);
    let rss_loaded = master.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = overwrite_until(master.port, Arc::clone(&stop));
    // Started together: each registers as soon as it is up, while the first
    // one's snapshot still streams.
    let starters: Vec<_> = (0..3)
        .map(|_| {
            let port = master.port.to_string();
            std::thread::spawn(move || ServerProcess::start(&["-m", "127.0.0.1", "-q", &port]))
        })
        .collect();
    let slaves: Vec<ServerProcess> = starters
        .into_iter()
        .map(|t| t.join().expect("slave start"))
        .collect();
    // Watch the stream: how many snapshots at once, for how many receivers,
    // holding how much, and the master's RSS.
    let (mut most_streaming, mut most_receivers, mut most_held, mut rss_peak) = (0, 0, 0, 0);
    wait_until(
        "every slave has received its snapshot",
        Duration::from_secs(180),
        || {
            let stats = master.stats();
            most_streaming = most_streaming.max(stats.num("snapshots_streaming"));
            most_receivers = most_receivers.max(stats.num("snapshot_receivers"));
            most_held = most_held.max(stats.num("snapshot_held_bytes"));
            rss_peak = rss_peak.max(master.rss_kib());
            let syncing = stats
                .slaves()
                .iter()
                .filter(|s| s.state == "syncing-snapshot")
                .count();
            stats.slaves().len() == 3 && syncing == 0
        },
    );
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().expect("writer");
    wait_all_caught_up(&master, &slaves);
    let stats = master.stats();
    eprintln!(
        "3 slaves joining together: snapshot_joins {}, at most {most_streaming} snapshots \
         streaming at once for {most_receivers} receivers, at most {most_held} bytes held; \
         {rounds} overwrite rounds; master RSS {rss_loaded} KiB loaded, peak {rss_peak} KiB \
         while streaming, {} KiB after; snapshot_held_bytes {} after",
        stats.num("snapshot_joins"),
        master.rss_kib(),
        stats.num("snapshot_held_bytes")
    );
    assert!(
        stats.num("snapshot_joins") >= 1,
        "a slave that registered while the first snapshot streamed shared it:\n{}",
        stats.text
    );
    assert_eq!(stats.num("snapshots_streaming"), 0);
    assert_eq!(
        stats.num("snapshot_held_bytes"),
        0,
        "freed with its last reader"
    );
    assert_eq!(stats.num("writes_failed"), 0);
    for slave in &slaves {
        same_data(&master, slave);
    }
}

#[test]
fn at_the_snapshot_memory_cap_the_receiver_is_dropped_and_syncs_later() {
    let master = ServerProcess::start(&["--fsync", "never", "--max-snapshot-memory-mb", "4"]);
    put_pipelined(master.port, "bulk", 0..KEYS, &[b's'; 400]);
    let stop = Arc::new(AtomicBool::new(false));
    let slave = ServerProcess::start_slave(&master, &[]);
    let addr = slave.addr();
    wait_until("the snapshot streams", Duration::from_secs(30), || {
        state_of(&master, &addr).as_deref() == Some("syncing-snapshot")
    });
    // Overwrites all over the store: the snapshot would need a copy of
    // nearly every shard, far more than 4 MiB.
    let writer = overwrite_until(master.port, Arc::clone(&stop));
    let mut most_held = 0;
    wait_until(
        "the receiver is dropped at the cap",
        Duration::from_secs(60),
        || {
            let stats = master.stats();
            most_held = most_held.max(stats.num("snapshot_held_bytes"));
            stats.num("snapshot_cap_evictions") >= 1
        },
    );
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().expect("writer: every write acknowledged");
    // Without writes its next snapshot needs no copy: it gets in sync.
    wait_all_caught_up(&master, std::slice::from_ref(&slave));
    let stats = master.stats();
    eprintln!(
        "cap of 4 MiB: snapshot_cap_evictions {}, at most {most_held} bytes held seen in \
         STATS, {rounds} overwrite rounds, writes_failed {}",
        stats.num("snapshot_cap_evictions"),
        stats.num("writes_failed")
    );
    assert_eq!(stats.num("snapshot_max_bytes"), 4 << 20);
    assert!(
        most_held <= (4 << 20) + (1 << 20),
        "held {most_held} bytes, past the cap by more than a shard and a chunk"
    );
    assert_eq!(stats.num("writes_failed"), 0, "the cap never fails a write");
    same_data(&master, &slave);
}
