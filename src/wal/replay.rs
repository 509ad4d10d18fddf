//! Rebuilding the store from a snapshot and the records after it: pure, so
//! the simulation recovers its crashed nodes with the same code as the server.

use std::collections::BTreeMap;

use crate::protocol::peer::{OpKind, WriteOp};
use crate::replication::{Ops, Record};
use crate::store::{Store, Write};

/// What replaying one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Applied or skipped; go on.
    Continue,
    /// A resync checkpoint no snapshot covers: it never became durable, so
    /// neither did anything after it. Replay stops here.
    UncoveredCheckpoint,
}

/// The state replay builds.
#[derive(Debug)]
pub struct Replay {
    /// The store as of `seq`.
    pub store: Store,
    /// Highest commit sequence number applied (or covered by the snapshot).
    pub seq: u64,
    /// The history `seq` belongs to (0: none yet).
    pub history_id: u64,
    /// Commits replayed after the snapshot, oldest first (for the master's partial-resync log).
    pub commits: Vec<(u64, Ops)>,
    /// Sequence number the snapshot reflected: commits at or below it are in the store already.
    pub floor: u64,
    /// Prepared transactions with no decision (in doubt; resolved by re-registration).
    pub prepared: BTreeMap<u64, Ops>,
    /// Records applied.
    pub applied: u64,
    /// The highest sequence number any replayed record names (aborts and
    /// prepares included): a node that leads from here numbers after it, since
    /// slaves may hold positions or prepares of those numbers.
    pub max_seq: u64,
}

impl Replay {
    /// Start from a snapshot (or an empty store at 0 with no history).
    pub fn new(store: Store, seq: u64, history_id: u64) -> Replay {
        Replay {
            store,
            seq,
            history_id,
            commits: Vec::new(),
            floor: seq,
            prepared: BTreeMap::new(),
            applied: 0,
            max_seq: seq,
        }
    }

    /// Apply one record in log order.
    pub fn apply(&mut self, record: &Record) -> Result<Step, String> {
        if !matches!(record, Record::Checkpoint { .. }) {
            self.max_seq = self.max_seq.max(super::record::record_seq(record));
        }
        match record {
            Record::History { history_id } => self.history_id = *history_id,
            Record::Checkpoint { seq, history_id } => {
                // The snapshot a checkpoint wrote is where replay started; a
                // checkpoint met while replaying is one whose snapshot never
                // completed.
                if !(*seq == self.floor && *history_id == self.history_id && self.applied == 0) {
                    return Ok(Step::UncoveredCheckpoint);
                }
            }
            Record::CommitDecision { seq, ops } | Record::CommittedTxn { seq, ops } => {
                self.commit(*seq, ops.clone())?;
            }
            Record::AbortDecision { seq } => {
                self.prepared.remove(seq);
            }
            Record::Prepared { seq, ops } => {
                if *seq > self.seq {
                    self.prepared.insert(*seq, ops.clone());
                }
            }
            Record::Committed { seq } => {
                if *seq > self.seq {
                    let ops = self
                        .prepared
                        .remove(seq)
                        .ok_or_else(|| format!("commit of {seq} without its prepare"))?;
                    self.commit(*seq, ops)?;
                }
            }
        }
        Ok(Step::Continue)
    }

    fn commit(&mut self, seq: u64, ops: Ops) -> Result<(), String> {
        if seq <= self.seq {
            // Already in the snapshot (records before it are kept until the
            // segment holding them is deleted).
            return Ok(());
        }
        // Prepares at or below a commit were decided (aborted, or committed and
        // applied here): only later ones can still be in doubt.
        self.prepared = self.prepared.split_off(&(seq + 1));
        apply_ops(&mut self.store, seq, &ops);
        self.seq = seq;
        self.applied += 1;
        self.commits.push((seq, ops));
        Ok(())
    }
}

/// The store write a replicated op is, or `None` for a clear (FLUSHDB) of the whole store.
pub fn store_write(op: &WriteOp) -> Option<Write<'_>> {
    Some(match op.kind {
        OpKind::Put => Write::Put {
            key: op.key(),
            value: op.value(),
        },
        OpKind::Update => Write::Update {
            key: op.key(),
            value: op.value(),
        },
        OpKind::Delete => Write::Delete { key: op.key() },
        OpKind::PutExpiring => Write::PutExpiring {
            key: op.key(),
            value: op.stored_value(),
            // Decoding refused a zero deadline; a local op never has one.
            deadline_ms: op.deadline_ms().max(1),
        },
        OpKind::Expire => Write::Expire {
            key: op.key(),
            deadline_ms: Some(op.deadline_ms()).filter(|&d| d > 0),
        },
        OpKind::Clear => return None,
    })
}

/// Apply a committed transaction's writes to `store` at version `seq`.
pub fn apply_ops(store: &mut Store, seq: u64, ops: &Ops) {
    for op in ops.iter() {
        match store_write(op) {
            Some(write) => {
                store.apply(write, seq);
            }
            None => store.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::WriteOp;

    fn put(key: &str, value: &str) -> Ops {
        vec![WriteOp::new(OpKind::Put, key.as_bytes(), value.as_bytes())].into()
    }

    #[test]
    fn master_records_rebuild_the_store_and_skip_aborts() {
        let mut r = Replay::new(Store::new(), 0, 0);
        for rec in [
            Record::History { history_id: 9 },
            Record::CommitDecision {
                seq: 1,
                ops: put("a", "1"),
            },
            Record::AbortDecision { seq: 2 },
            Record::CommitDecision {
                seq: 3,
                ops: put("a", "3"),
            },
        ] {
            assert_eq!(r.apply(&rec), Ok(Step::Continue));
        }
        assert_eq!((r.seq, r.history_id), (3, 9));
        assert_eq!(r.store.get(b"a"), Some((&b"3"[..], 3)));
        assert_eq!(r.commits.len(), 2);
        r.apply(&Record::AbortDecision { seq: 4 }).expect("apply");
        assert_eq!((r.seq, r.max_seq), (3, 4), "an abort's number is used");
    }

    #[test]
    fn slave_in_doubt_prepares_stay_in_doubt_and_commits_apply() {
        let mut r = Replay::new(Store::new(), 0, 5);
        for rec in [
            Record::Prepared {
                seq: 1,
                ops: put("a", "1"),
            },
            Record::Committed { seq: 1 },
            Record::Prepared {
                seq: 2,
                ops: put("b", "2"),
            },
            Record::CommittedTxn {
                seq: 4,
                ops: put("c", "4"),
            },
            Record::Prepared {
                seq: 5,
                ops: put("d", "5"),
            },
        ] {
            assert_eq!(r.apply(&rec), Ok(Step::Continue));
        }
        assert_eq!(r.seq, 4);
        assert_eq!(r.store.get(b"b"), None, "2 was never committed here");
        assert_eq!(r.prepared.keys().copied().collect::<Vec<_>>(), vec![5]);
        assert_eq!(
            r.apply(&Record::Committed { seq: 7 }),
            Err("commit of 7 without its prepare".into())
        );
    }

    #[test]
    fn a_replicated_flush_empties_the_store_on_replay() {
        let mut r = Replay::new(Store::new(), 0, 1);
        r.apply(&Record::CommitDecision {
            seq: 1,
            ops: put("a", "1"),
        })
        .expect("apply");
        let clear: Ops = vec![WriteOp::new(OpKind::Clear, b"", b"")].into();
        r.apply(&Record::CommitDecision { seq: 2, ops: clear })
            .expect("apply");
        r.apply(&Record::CommitDecision {
            seq: 3,
            ops: put("b", "3"),
        })
        .expect("apply");
        assert_eq!(r.store.get(b"a"), None);
        assert_eq!(r.store.get(b"b"), Some((&b"3"[..], 3)));
    }

    #[test]
    fn records_covered_by_the_snapshot_are_skipped() {
        let mut store = Store::new();
        store.set(b"a", b"snap", 10);
        let mut r = Replay::new(store, 10, 5);
        r.apply(&Record::CommitDecision {
            seq: 9,
            ops: put("a", "old"),
        })
        .expect("skip");
        r.apply(&Record::Committed { seq: 10 }).expect("skip");
        assert_eq!(r.store.get(b"a"), Some((&b"snap"[..], 10)));
        assert_eq!(r.seq, 10);
    }

    #[test]
    fn a_checkpoint_only_counts_when_its_snapshot_was_loaded() {
        let mut r = Replay::new(Store::new(), 20, 7);
        let own = Record::Checkpoint {
            seq: 20,
            history_id: 7,
        };
        assert_eq!(r.apply(&own), Ok(Step::Continue));
        r.apply(&Record::CommittedTxn {
            seq: 21,
            ops: put("x", "y"),
        })
        .expect("apply");
        assert_eq!(
            r.apply(&Record::Checkpoint {
                seq: 3,
                history_id: 8
            }),
            Ok(Step::UncoveredCheckpoint)
        );
    }
}
