use std::time::Duration;

use mio::{Events, Poll};

use super::*;
use crate::protocol::peer::{OpKind, WriteOp};
use crate::replication::Ops;
use crate::wal::replay::apply_ops;

fn put(key: &str, value: &str) -> Ops {
    vec![WriteOp::new(OpKind::Put, key.as_bytes(), value.as_bytes())].into()
}

struct Harness {
    poll: Poll,
    wal: Wal,
    store: Store,
    lsn: u64,
}

fn open(dir: &Path, fsync: FsyncPolicy, snapshot_log_bytes: u64) -> (Harness, Replay) {
    let poll = Poll::new().expect("poll");
    let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
    let (wal, replay, _) = Wal::open(
        WalConfig {
            dir: dir.to_path_buf(),
            fsync,
            snapshot_log_bytes,
            repair: false,
        },
        waker,
    )
    .expect("open");
    (
        Harness {
            poll,
            wal,
            store: Store::new(),
            lsn: 0,
        },
        replay,
    )
}

impl Harness {
    /// Append a commit, apply it, and return once it is durable.
    fn commit(&mut self, seq: u64, ops: Ops) {
        self.lsn += 1;
        self.wal.append(
            self.lsn,
            &Record::CommitDecision {
                seq,
                ops: ops.clone(),
            },
        );
        for op in ops.iter() {
            self.wal.before_write(&self.store, op.key());
        }
        apply_ops(&mut self.store, seq, &ops);
        let mut durable = self.wal.flush().unwrap_or(0);
        let mut events = Events::with_capacity(4);
        while durable < self.lsn {
            self.poll
                .poll(&mut events, Some(Duration::from_secs(5)))
                .expect("poll");
            durable = durable.max(self.wal.on_wake().unwrap_or(0));
            assert!(self.wal.failed().is_none(), "{:?}", self.wal.failed());
        }
    }

    /// Drive a snapshot in progress to its end.
    fn finish_snapshot(&mut self) {
        let mut events = Events::with_capacity(4);
        while self.wal.snapshot.is_some() {
            while self.wal.snapshot_step(&self.store) {}
            self.poll
                .poll(&mut events, Some(Duration::from_millis(50)))
                .expect("poll");
            self.wal.on_wake();
        }
    }
}

#[test]
fn group_commit_syncs_and_recovery_replays_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut h, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
        assert_eq!((replay.seq, replay.store.len()), (0, 0));
        h.wal.start_history(77).expect("history");
        for seq in 1..=50 {
            h.commit(seq, put(&format!("k{}", seq % 20), &format!("v{seq}")));
        }
        assert!(h.wal.stats().contains("wal_fsync always"));
        assert!(!h.wal.fsync_us.is_empty(), "syncs were timed");
    }
    let (h, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    assert_eq!((replay.seq, replay.history_id), (50, 77));
    assert_eq!(replay.store.len(), 20);
    assert_eq!(replay.store.get(b"k10"), Some((&b"v50"[..], 50)));
    assert_eq!(replay.commits.len(), 50);
    let node = h.wal.node_id();
    drop(h);
    let (h, _) = open(dir.path(), FsyncPolicy::Never, 1 << 30);
    assert_eq!(h.wal.node_id(), node, "the node id is created once");
}

#[test]
fn a_snapshot_by_log_size_bounds_the_log_and_recovery_uses_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let value = "x".repeat(200);
    let mut model = std::collections::HashMap::new();
    {
        let (mut h, _) = open(dir.path(), FsyncPolicy::Never, 64 * 1024);
        h.wal.start_history(5).expect("history");
        let mut snapshots = 0;
        for seq in 1..=3_000u64 {
            let key = format!("key{}", seq % 500);
            let v = format!("{value}{seq}");
            h.commit(seq, put(&key, &v));
            model.insert(key, (v, seq));
            if h.wal.snapshot_due() {
                h.wal.start_snapshot(seq, 5);
                snapshots += 1;
            }
            // One bounded step per "turn", as the reactor does: writes go on meanwhile.
            h.wal.snapshot_step(&h.store);
            h.wal.on_wake();
            // The snapshot thread's pace depends on the machine; wait for it once
            // the log has grown a threshold past its start, so the counts below
            // hold on a slow CI machine as well.
            if h.wal.snapshot.is_some() && h.wal.bytes_since_snapshot >= 64 * 1024 {
                h.finish_snapshot();
            }
        }
        h.finish_snapshot();
        assert!(snapshots >= 5, "{snapshots} snapshots");
        let log_bytes: u64 = h.wal.segments.iter().map(|s| s.bytes).sum();
        assert!(
            log_bytes < 8 * 64 * 1024,
            "the log stays bounded: {log_bytes}"
        );
    }
    let names = list_dir(dir.path()).expect("list");
    let snaps = names
        .iter()
        .filter(|n| parse_snapshot_name(n).is_some())
        .count();
    assert_eq!(snaps, 1, "older snapshots are deleted: {names:?}");
    let (_, replay) = open(dir.path(), FsyncPolicy::Never, 64 * 1024);
    assert!(replay.floor > 0, "recovery started from a snapshot");
    assert_eq!(replay.seq, 3_000);
    assert_eq!(replay.store.len(), model.len());
    for (key, (v, seq)) in &model {
        assert_eq!(
            replay.store.get(key.as_bytes()),
            Some((v.as_bytes(), *seq)),
            "{key}"
        );
    }
}

#[test]
fn a_resync_checkpoint_counts_only_once_its_snapshot_is_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut h, _) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
        h.wal.start_history(1).expect("history");
        h.commit(1, put("old", "history"));
        // The slave installs a snapshot of another history at 40.
        h.store = Store::new();
        h.store.set(b"snap", b"shot", 40);
        h.lsn += 1;
        h.wal.append(
            h.lsn,
            &Record::Checkpoint {
                seq: 40,
                history_id: 2,
            },
        );
        assert_eq!(h.wal.flush(), None, "not durable before its snapshot");
        h.finish_snapshot();
        h.commit(41, put("after", "checkpoint"));
    }
    let (_, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    assert_eq!((replay.seq, replay.history_id), (41, 2));
    assert_eq!(replay.store.get(b"old"), None, "the old history is gone");
    assert_eq!(replay.store.get(b"snap"), Some((&b"shot"[..], 40)));
    assert_eq!(replay.store.get(b"after"), Some((&b"checkpoint"[..], 41)));
}
