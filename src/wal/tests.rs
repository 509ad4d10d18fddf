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
        // One record per commit, each waited for: every one covered by a sync.
        // (The history record was synced on the reactor thread, not counted.)
        assert!(
            h.wal.stats().contains("\nwal_fsync_records 50\n"),
            "{}",
            h.wal.stats()
        );
        assert_eq!((h.wal.synced_records, h.wal.synced_writes), (50, 50));
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

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("metadata").len()
}

fn side_files(dir: &Path, kind: &str) -> Vec<String> {
    list_dir(dir)
        .expect("list")
        .into_iter()
        .filter(|n| n.contains(kind))
        .collect()
}

impl Harness {
    /// Wait until a preallocation in flight has reported.
    fn wait_prepared(&mut self) {
        let mut events = Events::with_capacity(4);
        while self.wal.preparing.is_some() {
            self.poll
                .poll(&mut events, Some(Duration::from_millis(50)))
                .expect("poll");
            self.wal.on_wake();
        }
    }

    /// Preallocate the next segment now, whatever the active one holds.
    fn prepare_now(&mut self) {
        let id = self.wal.active_id() + 1;
        let thread = self
            .wal
            .helpers
            .prepare(self.wal.config.dir.clone(), id)
            .expect("spawn");
        self.wal.preparing = Some((id, thread));
        self.wait_prepared();
        assert!(self.wal.next.is_some(), "segment {id} prepared");
    }
}

#[test]
fn a_crash_in_the_middle_of_a_preallocated_segment_loses_nothing_and_leaves_no_side_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logical;
    let first;
    {
        let (mut h, _) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
        h.wal.start_history(3).expect("history");
        for seq in 1..=40 {
            h.commit(seq, put(&format!("k{seq}"), "value"));
        }
        first = h.wal.segment_path(h.wal.active_id());
        assert_eq!(file_len(&first), SEGMENT_BYTES, "written over the zeros");
        logical = h.wal.active_len;
        assert!(
            h.wal
                .stats()
                .contains(&format!("wal_log_bytes {logical}\n")),
            "STATS counts written bytes, not the preallocated size: {}",
            h.wal.stats()
        );
        // Dropped without anything a clean stop would do: a crash.
    }
    let (h, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    assert_eq!((replay.seq, replay.history_id), (40, 3));
    assert_eq!(replay.store.len(), 40);
    assert_eq!(file_len(&first), logical, "the zeros are cut at recovery");
    assert!(side_files(dir.path(), ".torn-").is_empty());
    assert!(side_files(dir.path(), ".discarded-").is_empty());
    let active = h.wal.segment_path(h.wal.active_id());
    assert_ne!(active, first);
    assert_eq!(file_len(&active), SEGMENT_BYTES);
    drop(h);
    // Recovered twice: the first segment, no longer the newest, ends clean.
    let (_, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    assert_eq!(replay.seq, 40);
    assert!(side_files(dir.path(), ".torn-").is_empty());
}

/// Segment `id` at `path` keeps its preallocated size, its records end at
/// `written`, and its end marker follows them, then zeros only.
fn assert_closed(path: &Path, written: u64, id: u64) {
    assert_eq!(
        file_len(path),
        SEGMENT_BYTES,
        "not cut: closed by its marker"
    );
    let bytes = std::fs::read(path).expect("read segment");
    let at = usize::try_from(written).expect("offset");
    assert_eq!(record::decode_segment_end(&bytes[at..]), Some(id));
    assert!(
        bytes[at + record::SEGMENT_END_BYTES..]
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn rotation_closes_the_segment_with_a_marker_and_uses_the_prepared_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut h, _) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    h.wal.start_history(1).expect("history");
    h.commit(1, put("a", "1"));
    let old_id = h.wal.active_id();
    let old = h.wal.segment_path(old_id);
    let written = h.wal.active_len;
    // Nothing prepared: the new segment grows as it is written.
    h.wal.rotate();
    assert_closed(&old, written, old_id);
    assert_eq!(h.wal.active_capacity, 0);
    h.commit(2, put("b", "2"));
    h.wait_prepared();
    // A prepared segment is taken at the next record, since this one was not preallocated.
    h.commit(3, put("c", "3"));
    assert_eq!(h.wal.active_capacity, SEGMENT_BYTES);
    let prepared = h.wal.segment_path(h.wal.active_id());
    assert_eq!(file_len(&prepared), SEGMENT_BYTES);
    assert!(!prepared_path(dir.path(), h.wal.active_id()).exists());
    // A snapshot's rotation into a prepared segment closes the preallocated one.
    h.prepare_now();
    let written = h.wal.active_len;
    let prepared_id = h.wal.active_id();
    h.wal.rotate();
    assert_closed(&prepared, written, prepared_id);
    assert_eq!(h.wal.active_capacity, SEGMENT_BYTES);
    h.commit(4, put("d", "4"));
    drop(h);
    let (_, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    assert_eq!(replay.seq, 4);
    assert_eq!(replay.store.len(), 4);
    assert!(side_files(dir.path(), ".torn-").is_empty());
}

#[test]
fn a_full_segment_rotates_before_a_record_would_pass_its_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let value = "v".repeat(64 << 10);
    let first;
    {
        let (mut h, _) = open(dir.path(), FsyncPolicy::Never, 1 << 30);
        h.wal.start_history(1).expect("history");
        first = h.wal.segment_path(h.wal.active_id());
        let mut seq = 0;
        while h.wal.segments.len() < 2 {
            seq += 1;
            h.commit(seq, put(&format!("k{seq}"), &value));
            h.wait_prepared();
            assert!(seq < 1000, "never rotated");
        }
        assert!(h.wal.active_len < SEGMENT_BYTES);
        for _ in 0..3 {
            seq += 1;
            h.commit(seq, put(&format!("k{seq}"), &value));
        }
    }
    let len = file_len(&first);
    assert!(
        len <= SEGMENT_BYTES && len > SEGMENT_BYTES - (65 << 10),
        "filled to its end and cut to its records: {len}"
    );
    let (_, replay) = open(dir.path(), FsyncPolicy::Never, 1 << 30);
    assert!(replay.seq > 100);
    assert_eq!(replay.store.len() as u64, replay.seq);
    assert!(side_files(dir.path(), ".torn-").is_empty());
}

#[test]
fn zeros_in_a_segment_that_is_not_the_newest_are_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id;
    {
        let (mut h, _) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
        h.wal.start_history(1).expect("history");
        h.commit(1, put("a", "1"));
        h.commit(2, put("b", "2"));
        id = h.wal.active_id();
    }
    // A newer segment beside the preallocated one: as if the machine crashed
    // after the rotation's new name was durable and before its cut was.
    let mut newer = segment_header(id + 1).to_vec();
    encode_record(
        &mut newer,
        &Record::CommitDecision {
            seq: 3,
            ops: put("c", "3"),
        },
    );
    std::fs::write(dir.path().join(segment_name(id + 1)), &newer).expect("write");
    let (_, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    assert_eq!(replay.seq, 2, "nothing after the zeros is replayed");
    assert_eq!(replay.store.get(b"c"), None);
    let torn = side_files(dir.path(), ".torn-");
    assert_eq!(torn.len(), 1);
    // Nothing but zeros was cut: the side file keeps none of them.
    let kept = std::fs::metadata(dir.path().join(&torn[0])).expect("side file");
    assert_eq!(kept.len(), 0);
    assert_eq!(side_files(dir.path(), ".discarded-").len(), 1);
}

#[test]
fn a_segment_in_use_under_its_temporary_name_is_adopted_at_recovery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let second;
    {
        let (mut h, _) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
        h.wal.start_history(1).expect("history");
        h.commit(1, put("a", "1"));
        h.prepare_now();
        h.wal.rotate();
        second = h.wal.active_id();
        assert_eq!(h.wal.renames.len(), 1, "left to the sync thread");
        h.commit(2, put("b", "2"));
        assert!(
            h.wal.segment_path(second).exists(),
            "renamed before durable"
        );
    }
    // The process stopped after the rotation, before the sync thread renamed it.
    let named = dir.path().join(segment_name(second));
    std::fs::rename(&named, prepared_path(dir.path(), second)).expect("unrename");
    let (h, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    assert_eq!((replay.seq, replay.store.len()), (2, 2));
    assert!(named.exists());
    assert!(side_files(dir.path(), ".torn-").is_empty());
    assert!(side_files(dir.path(), ".discarded-").is_empty());
    drop(h);
    // Once more: it reads as an ordinary closed segment now.
    let (_, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    assert_eq!(replay.seq, 2);
    assert!(side_files(dir.path(), ".torn-").is_empty());
}

#[test]
fn a_prepared_segment_never_written_to_is_not_adopted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let next;
    {
        let (mut h, _) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
        h.wal.start_history(1).expect("history");
        h.commit(1, put("a", "1"));
        h.prepare_now();
        next = h.wal.active_id() + 1;
        assert!(prepared_path(dir.path(), next).exists());
    }
    let (h, replay) = open(dir.path(), FsyncPolicy::Always, 1 << 30);
    assert_eq!(replay.seq, 1);
    assert!(
        side_files(dir.path(), ".torn-").is_empty(),
        "the newest named segment's zeros are its clean end"
    );
    // Recovery deleted it; the log opened a segment of that id afresh.
    assert_eq!(h.wal.active_id(), next);
    assert!(!prepared_path(dir.path(), next).exists());
}
