//! What the queued commands of one EXEC see: the store, then the writes the
//! commands before them in the same EXEC queued, in order, as Redis runs
//! them back to back.
//!
//! EXEC checks first that no key its commands name has a write undecided, so
//! for those keys the store holds the settled state and replaying this EXEC's
//! own writes on it gives exactly what the commit will leave. Keys nobody in
//! the EXEC named (KEYS, SCAN, DBSIZE see them) read as the store has them, as
//! they would outside EXEC.
//!
//! The view is folded incrementally from the batch (each write once), so a
//! lookup costs one hash probe whatever the size of the transaction.

use std::collections::HashMap;

use crate::protocol::peer::OpKind;

use super::handler::Core;

/// A key as this EXEC's writes left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Deleted (or never present, and an UPDATE or EXPIRE found nothing).
    Absent,
    /// Present: its value is the stored value of batch write `from`, or the
    /// store's (`None`: only its deadline changed); `deadline` in unix ms.
    Present {
        from: Option<usize>,
        deadline: Option<u64>,
    },
}

/// The writes of one EXEC so far, by key.
#[derive(Debug)]
pub struct ExecView {
    /// Batch index of the first write not folded in yet.
    folded: usize,
    /// A FLUSHDB ran: keys not in `keys` are absent.
    cleared: bool,
    keys: HashMap<Vec<u8>, Held>,
}

impl ExecView {
    /// A view whose writes start at batch index `from` (the EXEC's mark).
    pub fn new(from: usize) -> ExecView {
        ExecView {
            folded: from,
            cleared: false,
            keys: HashMap::new(),
        }
    }

    /// Take in the writes the last command queued (everything in the batch past
    /// what was folded), in order.
    pub fn fold(&mut self, core: &Core) {
        while self.folded < core.batch.len() {
            let i = self.folded;
            let op = &core.batch[i].op;
            self.folded += 1;
            let held = match op.kind {
                OpKind::Clear => {
                    self.keys.clear();
                    self.cleared = true;
                    continue;
                }
                OpKind::Put => Held::Present {
                    from: Some(i),
                    deadline: None,
                },
                OpKind::PutExpiring => Held::Present {
                    from: Some(i),
                    deadline: Some(op.deadline_ms()),
                },
                OpKind::Delete => Held::Absent,
                // Only if present, as the store applies them.
                OpKind::Update if self.get(core, op.key()).is_some() => Held::Present {
                    from: Some(i),
                    deadline: None,
                },
                OpKind::Expire if self.get(core, op.key()).is_some() => {
                    let from = match self.keys.get(op.key()) {
                        Some(Held::Present { from, .. }) => *from,
                        _ => None,
                    };
                    let deadline = Some(op.deadline_ms()).filter(|&d| d != 0);
                    Held::Present { from, deadline }
                }
                OpKind::Update | OpKind::Expire => continue,
            };
            self.keys.insert(op.key().to_vec(), held);
        }
    }

    /// The value and deadline of `key` (`None`: absent, or its deadline passed).
    pub fn get<'c>(&self, core: &'c Core, key: &[u8]) -> Option<(&'c [u8], Option<u64>)> {
        let (value, deadline) = match self.keys.get(key) {
            Some(Held::Absent) => return None,
            Some(Held::Present { from, deadline }) => {
                let value = match from {
                    Some(i) => core.batch.get(*i)?.op.stored_value(),
                    None => core.store.get_held(key)?.0,
                };
                (value, *deadline)
            }
            None if self.cleared => return None,
            None => {
                let (value, _) = core.store.get(key)?;
                (value, core.store.deadline(key))
            }
        };
        if deadline.is_some_and(|d| d <= core.store.now_ms()) {
            return None;
        }
        Some((value, deadline))
    }

    /// Whether the store's own entry for `key` is hidden by this view (the
    /// view decides it: a write of this EXEC named it, or a FLUSHDB ran).
    pub fn overrides(&self, key: &[u8]) -> bool {
        self.cleared || self.keys.contains_key(key)
    }

    /// Keys this EXEC wrote that are present now, in no particular order.
    pub fn present_keys<'v>(&'v self, core: &'v Core) -> impl Iterator<Item = &'v [u8]> + 'v {
        self.keys
            .keys()
            .map(Vec::as_slice)
            .filter(move |k| self.get(core, k).is_some())
    }

    /// The number of keys that exist (DBSIZE), counting this EXEC's writes.
    pub fn len(&self, core: &Core) -> usize {
        let base = if self.cleared {
            0
        } else {
            core.store.live_len()
        };
        let mut len = base as i64;
        for key in self.keys.keys() {
            let before = !self.cleared && core.store.get(key).is_some();
            let after = self.get(core, key).is_some();
            len += i64::from(after) - i64::from(before);
        }
        debug_assert!(len >= 0, "an EXEC cannot remove more keys than exist");
        len.max(0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::peer::WriteOp;
    use crate::server::handler::{Mode, ReplyTarget};
    use crate::store::Write;

    fn op(kind: OpKind, key: &[u8], value: &[u8]) -> WriteOp {
        WriteOp::new(kind, key, value)
    }

    fn core() -> Core {
        let mut core = Core::new(1 << 20, Mode::Master);
        core.store.set_now_ms(1_000);
        core.store.apply(
            Write::Put {
                key: b"old",
                value: b"o",
            },
            1,
        );
        core.store.apply(
            Write::PutExpiring {
                key: b"gone",
                value: b"g",
                deadline_ms: 500,
            },
            2,
        );
        core
    }

    fn run(core: &mut Core, view: &mut ExecView, ops: Vec<WriteOp>) {
        core.submit(ops, ReplyTarget::Nobody, 0, 0, None);
        view.fold(core);
    }

    #[test]
    fn writes_are_seen_in_order_with_their_deadlines() {
        let mut core = core();
        let mut view = ExecView::new(core.batch.len());
        assert_eq!(view.get(&core, b"old"), Some((&b"o"[..], None)));
        assert_eq!(view.get(&core, b"gone"), None, "expired in the store");
        assert_eq!(view.len(&core), 1);
        run(&mut core, &mut view, vec![op(OpKind::Put, b"new", b"n")]);
        run(
            &mut core,
            &mut view,
            vec![WriteOp::expire(b"new", Some(5_000))],
        );
        assert_eq!(view.get(&core, b"new"), Some((&b"n"[..], Some(5_000))));
        run(
            &mut core,
            &mut view,
            vec![WriteOp::expire(b"old", Some(6_000))],
        );
        assert_eq!(view.get(&core, b"old"), Some((&b"o"[..], Some(6_000))));
        run(&mut core, &mut view, vec![WriteOp::expire(b"old", None)]);
        assert_eq!(view.get(&core, b"old"), Some((&b"o"[..], None)));
        // EXPIRE and UPDATE of an absent key change nothing.
        run(
            &mut core,
            &mut view,
            vec![WriteOp::expire(b"nope", Some(9))],
        );
        run(
            &mut core,
            &mut view,
            vec![op(OpKind::Update, b"gone", b"x")],
        );
        assert_eq!(view.get(&core, b"nope"), None);
        assert_eq!(view.get(&core, b"gone"), None);
        assert_eq!(view.len(&core), 2);
        run(&mut core, &mut view, vec![op(OpKind::Update, b"new", b"u")]);
        assert_eq!(view.get(&core, b"new"), Some((&b"u"[..], None)));
        run(
            &mut core,
            &mut view,
            vec![WriteOp::put_expiring(b"soon", b"s", 900)],
        );
        assert_eq!(view.get(&core, b"soon"), None, "a deadline already passed");
        run(&mut core, &mut view, vec![op(OpKind::Delete, b"old", b"")]);
        assert_eq!(view.get(&core, b"old"), None);
        assert_eq!(view.len(&core), 1);
        let mut keys: Vec<&[u8]> = view.present_keys(&core).collect();
        keys.sort();
        assert_eq!(keys, vec![&b"new"[..]]);
    }

    #[test]
    fn a_flush_hides_the_store() {
        let mut core = core();
        let mut view = ExecView::new(core.batch.len());
        run(&mut core, &mut view, vec![op(OpKind::Clear, b"", b"")]);
        assert_eq!(view.get(&core, b"old"), None);
        assert!(view.overrides(b"old"));
        assert_eq!(view.len(&core), 0);
        run(&mut core, &mut view, vec![op(OpKind::Put, b"a", b"1")]);
        assert_eq!(view.len(&core), 1);
        assert_eq!(view.get(&core, b"a"), Some((&b"1"[..], None)));
    }
}
