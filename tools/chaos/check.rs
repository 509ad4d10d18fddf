//! Checking a recorded history against versions, in O(n log n).
//!
//! A general linearizability search (WGL) is exponential in the concurrency;
//! dkvs hands out versions that make it unnecessary. Every write that commits
//! gets the commit sequence number of its transaction, increasing across the
//! cluster, so the versions order the writes of a key, and every read names
//! the version it saw. Each operation then has a *position* in commit order:
//! a write's is its version; a read at position `p` sees the state left by the
//! writes with versions `<= p`. The history is linearizable if positions can be
//! chosen so that:
//!
//! - a read of version `v` sits in `[v, next(v) - 1]`, where `next(v)` is the
//!   key's next write version (a read of "absent" sits where the key is absent:
//!   before its first write or after a DELETE);
//! - an op that completed before another was invoked has a lower (writes:
//!   strictly lower) position.
//!
//! Write positions are fixed, so for a read the writes give a window: at least
//! the highest version completed before it was invoked (else: stale), below the
//! lowest version invoked after it completed (else: it saw the future). Reads
//! ordered in real time must not go back; choosing each read the lowest
//! position its window allows (in invoke order) is optimal, as the only
//! constraints between reads push later ones up.
//!
//! Group commit puts several writes in one transaction, so several writes of a
//! key may share a version: the last one in the batch wins, and all reads of
//! that version must agree on the value. Values are unique per write, so a
//! read's value names the write it saw: a write whose outcome was unknown
//! (timeout, connection lost) is taken as applied at the version it was seen
//! at, or as never applied if no one saw it; a write the server answered as
//! failed must never be seen.
//!
//! Slave reads are checked the same way without the lower bound from the
//! writes (a slave may lag): per slave, real-time ordered reads never go
//! back, nothing is seen before it was written, and the lag is measured as
//! staleness.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::history::{FINAL_CLIENT, Nanos, Node, Op, Outcome, Request};

/// No upper bound (a version or a time).
const UNBOUNDED: u64 = u64::MAX;

/// Which rule a history broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// A master read returned a version older than one acknowledged before it began.
    StaleRead,
    /// A read returned (or was absent at) a state only a later write could make.
    FutureRead,
    /// A master read returned an older state than a read that completed before it began.
    ReadsWentBack,
    /// A write that began after another one completed got a lower (or the same) version.
    WriteOrder,
    /// A read returned a value no write wrote.
    UnknownValue,
    /// A read returned a write's value with another version than the write got.
    ValueMismatch,
    /// Two reads of the same key and version returned different values.
    VersionConflict,
    /// A write the server answered as failed was seen.
    FailedWriteVisible,
    /// A slave showed a state older than one it had already shown.
    SlaveWentBack,
    /// After the last round, the master holds an older state of a key than an
    /// acknowledged write made.
    LostWrite,
    /// After the last round, a slave holds a key differently from the master.
    ReplicasDiffer,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Rule::StaleRead => "stale read at the master",
            Rule::FutureRead => "read of a write not yet invoked",
            Rule::ReadsWentBack => "master reads went back in time",
            Rule::WriteOrder => "writes out of real-time order",
            Rule::UnknownValue => "value no write wrote",
            Rule::ValueMismatch => "value read with the wrong version",
            Rule::VersionConflict => "two values for one version",
            Rule::FailedWriteVisible => "failed write visible",
            Rule::SlaveWentBack => "slave reads went back in time",
            Rule::LostWrite => "acknowledged write lost",
            Rule::ReplicasDiffer => "replicas differ at the end",
        };
        f.write_str(name)
    }
}

/// One broken rule, with what a reader needs to find it in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule.
    pub rule: Rule,
    /// Where the offending op ran.
    pub node: Node,
    /// The key.
    pub key: u32,
    /// What happened, in words.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} key {}): {}",
            self.rule, self.node, self.key, self.detail
        )
    }
}

/// The worst staleness seen at one slave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staleness {
    /// How long before the read began a newer write of the key had been acknowledged.
    pub nanos: Nanos,
    /// The key.
    pub key: u32,
    /// When the read began.
    pub read_at: Nanos,
    /// The version it returned (0: absent).
    pub version_read: u64,
    /// The version of the acknowledged write it missed.
    pub missed_version: u64,
}

/// Everything the checker found.
#[derive(Debug, Clone, Default)]
pub struct CheckOutcome {
    /// Broken rules (empty: the history passed).
    pub violations: Vec<Violation>,
    /// Ops with a definite answer that took part in the check.
    pub ops_checked: usize,
    /// Writes the master acknowledged.
    pub acked_writes: usize,
    /// Writes whose outcome is unknown.
    pub unknown_writes: usize,
    /// Unknown writes that reads showed to have been applied.
    pub unknown_writes_seen: usize,
    /// Writes the master answered as failed.
    pub failed_writes: usize,
    /// Acknowledged writes missing from the final state (check 2).
    pub lost_writes: usize,
    /// Reads a slave refused (REDIRECT or UNAVAILABLE), per slave.
    pub refused_reads: BTreeMap<Node, usize>,
    /// Reads a slave served, per slave.
    pub served_reads: BTreeMap<Node, usize>,
    /// Worst staleness per slave (absent: no stale read).
    pub worst_staleness: BTreeMap<Node, Staleness>,
    /// Absent reads explained only by a DELETE whose outcome is unknown.
    pub lenient_absent_reads: usize,
}

/// A write of one key with a known (acknowledged or observed) version.
#[derive(Debug, Clone, Copy)]
struct Write {
    version: u64,
    delete: bool,
    invoke: Nanos,
    /// [`UNBOUNDED`] for a write whose answer never came.
    complete: Nanos,
    acked: bool,
}

/// A read (or an UPDATE/DELETE that found nothing, which reads absence).
#[derive(Debug, Clone, Copy)]
struct Read<'a> {
    op: &'a Op,
    /// `None`: absent.
    version: Option<u64>,
}

/// The writes of one key, ordered by version, and what follows from them.
struct KeyWrites {
    /// By version.
    by_version: Vec<Write>,
    /// Distinct versions, ascending.
    versions: Vec<u64>,
    /// Inclusive ranges of positions where the key is absent, ascending.
    absent: Vec<(u64, u64)>,
    /// By completion time, with the running maximum version.
    by_complete: Vec<(Nanos, u64)>,
    /// By invoke time, with the minimum version of this and all later ones.
    by_invoke: Vec<(Nanos, u64)>,
    /// Per index of `by_version`: the earliest acknowledgement among the
    /// acknowledged writes at that index or after.
    acked_from: Vec<(Nanos, u64)>,
    /// DELETEs with unknown outcome that no read pinned down: (invoke, when
    /// the client saw the failure), the span it may have been applied in.
    unknown_deletes: Vec<(Nanos, Nanos)>,
    /// Acknowledged writes by invocation: (invoke, the earliest
    /// acknowledgement (time, version) among this and every later-invoked one).
    acked_by_invoke: Vec<(Nanos, (Nanos, u64))>,
}

impl KeyWrites {
    fn new(
        mut writes: Vec<Write>,
        present_seen: &[u64],
        unknown_deletes: Vec<(Nanos, Nanos)>,
    ) -> KeyWrites {
        writes.sort_by_key(|w| (w.version, w.invoke));
        let mut versions: Vec<u64> = writes.iter().map(|w| w.version).collect();
        versions.dedup();
        // Absent from the start until the first write, and after each version
        // whose batch leaves the key deleted (a DELETE there, and no read saw
        // the key present at that version) until the next version.
        let mut absent = Vec::new();
        let end = versions
            .first()
            .map_or(UNBOUNDED, |&first| first.saturating_sub(1));
        absent.push((0, end));
        for (i, &v) in versions.iter().enumerate() {
            let deletes = writes.iter().any(|w| w.version == v && w.delete);
            let seen_present = present_seen.binary_search(&v).is_ok();
            if deletes && !seen_present {
                let end = versions.get(i + 1).map_or(UNBOUNDED, |n| n - 1);
                absent.push((v, end));
            }
        }
        let mut by_complete: Vec<(Nanos, u64)> = writes
            .iter()
            .filter(|w| w.complete != UNBOUNDED)
            .map(|w| (w.complete, w.version))
            .collect();
        by_complete.sort_unstable();
        let mut max = 0;
        for entry in &mut by_complete {
            max = max.max(entry.1);
            entry.1 = max;
        }
        let mut by_invoke: Vec<(Nanos, u64)> =
            writes.iter().map(|w| (w.invoke, w.version)).collect();
        by_invoke.sort_unstable();
        let mut min = UNBOUNDED;
        for entry in by_invoke.iter_mut().rev() {
            min = min.min(entry.1);
            entry.1 = min;
        }
        let mut acked_from = vec![(UNBOUNDED, 0); writes.len()];
        let mut best = (UNBOUNDED, 0);
        for (i, w) in writes.iter().enumerate().rev() {
            if w.acked && w.complete <= best.0 {
                best = (w.complete, w.version);
            }
            acked_from[i] = best;
        }
        let mut acked_by_invoke: Vec<(Nanos, (Nanos, u64))> = writes
            .iter()
            .filter(|w| w.acked)
            .map(|w| (w.invoke, (w.complete, w.version)))
            .collect();
        acked_by_invoke.sort_unstable();
        let mut earliest = (UNBOUNDED, 0);
        for entry in acked_by_invoke.iter_mut().rev() {
            if entry.1.0 < earliest.0 {
                earliest = entry.1;
            }
            entry.1 = earliest;
        }
        KeyWrites {
            acked_by_invoke,
            by_version: writes,
            versions,
            absent,
            by_complete,
            by_invoke,
            acked_from,
            unknown_deletes,
        }
    }

    /// The highest version of a write that completed before `t` (0: none).
    fn completed_before(&self, t: Nanos) -> u64 {
        let n = self.by_complete.partition_point(|&(c, _)| c < t);
        if n == 0 { 0 } else { self.by_complete[n - 1].1 }
    }

    /// The lowest version of a write invoked after `t` ([`UNBOUNDED`]: none).
    fn invoked_after(&self, t: Nanos) -> u64 {
        let n = self.by_invoke.partition_point(|&(i, _)| i <= t);
        self.by_invoke.get(n).map_or(UNBOUNDED, |&(_, v)| v)
    }

    /// The last position at which version `v` is still the key's state.
    fn last_position_of(&self, v: u64) -> u64 {
        let n = self.versions.partition_point(|&x| x <= v);
        self.versions.get(n).map_or(UNBOUNDED, |&next| next - 1)
    }

    /// The earliest acknowledged write with a version above `position`:
    /// (acknowledged at, version).
    /// The earliest acknowledgement (when, version) of a write invoked after
    /// time `t`: such a write was applied after anything applied before `t`.
    fn first_ack_of_write_invoked_after(&self, t: Nanos) -> Option<(Nanos, u64)> {
        let n = self.acked_by_invoke.partition_point(|&(i, _)| i <= t);
        self.acked_by_invoke.get(n).map(|&(_, ack)| ack)
    }

    fn first_acked_after(&self, position: u64) -> Option<(Nanos, u64)> {
        let n = self.by_version.partition_point(|w| w.version <= position);
        self.acked_from
            .get(n)
            .copied()
            .filter(|&(t, _)| t != UNBOUNDED)
    }

    /// Acknowledged writes with a version above `position`.
    fn acked_after(&self, position: u64) -> usize {
        self.by_version
            .iter()
            .filter(|w| w.acked && w.version > position)
            .count()
    }

    /// The lowest absent position in `[lo, hi]`.
    fn lowest_absent(&self, lo: u64, hi: u64) -> Option<u64> {
        let n = self.absent.partition_point(|&(_, end)| end < lo);
        let &(start, _) = self.absent.get(n)?;
        (start.max(lo) <= hi).then_some(start.max(lo))
    }

    /// The last absent range starting at or before `hi`.
    fn last_absent_until(&self, hi: u64) -> (u64, u64) {
        let n = self.absent.partition_point(|&(start, _)| start <= hi);
        // The first range starts at 0, so there is always one.
        self.absent[n.saturating_sub(1)]
    }
}

/// Check a whole history (see the module comment); `ops` in any order.
pub fn check(ops: &[Op]) -> CheckOutcome {
    let mut out = CheckOutcome::default();
    // Every written value names its write (values are unique per write).
    let mut by_value: HashMap<&[u8], usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if op.node == Node::Master
            && let Some(value) = op.request.value()
        {
            let earlier = by_value.insert(value, i);
            debug_assert!(earlier.is_none(), "written values are unique");
        }
        if op.request.is_write() && op.node == Node::Master {
            match op.outcome {
                Outcome::Written(_) => out.acked_writes += 1,
                Outcome::Unknown(_) => out.unknown_writes += 1,
                Outcome::Failed(_) => out.failed_writes += 1,
                Outcome::Found { .. } | Outcome::NotFound | Outcome::Refused(_) => {}
            }
        }
        if let Node::Slave(_) = op.node {
            match op.outcome {
                Outcome::Refused(_) => *out.refused_reads.entry(op.node).or_default() += 1,
                Outcome::Found { .. } | Outcome::NotFound => {
                    *out.served_reads.entry(op.node).or_default() += 1
                }
                _ => {}
            }
        }
    }

    // Reads name the writes they saw: an unknown write seen is applied at the
    // version it was seen at.
    let mut seen_version: HashMap<usize, u64> = HashMap::new();
    let mut value_at: HashMap<(u32, u64), (&[u8], &Op)> = HashMap::new();
    let mut present_seen: HashMap<u32, Vec<u64>> = HashMap::new();
    for op in ops {
        let Outcome::Found { value, version } = &op.outcome else {
            continue;
        };
        present_seen.entry(op.key).or_default().push(*version);
        match value_at.get(&(op.key, *version)) {
            Some((other, first)) if *other != value.as_slice() => {
                out.violations.push(Violation {
                    rule: Rule::VersionConflict,
                    node: op.node,
                    key: op.key,
                    detail: format!(
                        "version {version} read as {:?} at {} ({} ms) and as {:?} at {} ({} ms)",
                        show(other),
                        first.node,
                        ms(first.invoke),
                        show(value),
                        op.node,
                        ms(op.invoke)
                    ),
                });
            }
            Some(_) => {}
            None => {
                value_at.insert((op.key, *version), (value, op));
            }
        }
        let Some(&w) = by_value.get(value.as_slice()) else {
            out.violations.push(Violation {
                rule: Rule::UnknownValue,
                node: op.node,
                key: op.key,
                detail: format!("read {:?} at version {version}", show(value)),
            });
            continue;
        };
        let write = &ops[w];
        let mismatch = |wrote: String| Violation {
            rule: Rule::ValueMismatch,
            node: op.node,
            key: op.key,
            detail: format!(
                "read {:?} at version {version}, written {wrote}",
                show(value)
            ),
        };
        if write.key != op.key {
            out.violations
                .push(mismatch(format!("to key {} instead", write.key)));
            continue;
        }
        match &write.outcome {
            Outcome::Written(v) if v != version => {
                out.violations.push(mismatch(format!("at version {v}")));
            }
            Outcome::Written(_) => {}
            Outcome::Failed(why) => out.violations.push(Violation {
                rule: Rule::FailedWriteVisible,
                node: op.node,
                key: op.key,
                detail: format!(
                    "read {:?} at version {version}; its write was answered {why:?}",
                    show(value)
                ),
            }),
            Outcome::Unknown(_) => match seen_version.get(&w) {
                Some(v) if v != version => {
                    out.violations
                        .push(mismatch(format!("(unknown outcome) seen at version {v}")));
                }
                Some(_) => {}
                None => {
                    seen_version.insert(w, *version);
                }
            },
            Outcome::Found { .. } | Outcome::NotFound | Outcome::Refused(_) => {
                out.violations
                    .push(mismatch("by a write that changed nothing".into()));
            }
        }
    }
    out.unknown_writes_seen = seen_version.len();

    // Per key: the writes with known versions, and the reads.
    let mut writes: BTreeMap<u32, Vec<Write>> = BTreeMap::new();
    let mut unknown_deletes: BTreeMap<u32, Vec<(Nanos, Nanos)>> = BTreeMap::new();
    let mut reads: BTreeMap<(u32, Node), Vec<Read<'_>>> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        let delete = op.request == Request::Delete;
        let write = |version, acked, complete| Write {
            version,
            delete,
            invoke: op.invoke,
            complete,
            acked,
        };
        match (&op.outcome, op.request.is_write()) {
            (Outcome::Written(v), _) => {
                writes
                    .entry(op.key)
                    .or_default()
                    .push(write(*v, true, op.complete))
            }
            (Outcome::Unknown(_), true) => match seen_version.get(&i) {
                Some(&v) => writes
                    .entry(op.key)
                    .or_default()
                    .push(write(v, false, UNBOUNDED)),
                None if delete => unknown_deletes
                    .entry(op.key)
                    .or_default()
                    .push((op.invoke, op.complete)),
                None => {}
            },
            (Outcome::Found { version, .. }, _) => {
                reads.entry((op.key, op.node)).or_default().push(Read {
                    op,
                    version: Some(*version),
                })
            }
            (Outcome::NotFound, _) => reads
                .entry((op.key, op.node))
                .or_default()
                .push(Read { op, version: None }),
            _ => {}
        }
    }
    let keys: Vec<u32> = writes
        .keys()
        .chain(reads.keys().map(|(k, _)| k))
        .copied()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for key in keys {
        let mut seen = present_seen.remove(&key).unwrap_or_default();
        seen.sort_unstable();
        let kw = KeyWrites::new(
            writes.remove(&key).unwrap_or_default(),
            &seen,
            unknown_deletes.remove(&key).unwrap_or_default(),
        );
        check_write_order(key, &kw, &mut out);
        for node in [Node::Master, Node::Slave(0), Node::Slave(1)] {
            if let Some(list) = reads.remove(&(key, node)) {
                check_reads(key, node, &kw, list, &mut out);
            }
        }
        // Any other slave numbers (more than two slaves).
        let rest: Vec<Node> = reads
            .keys()
            .filter(|(k, _)| *k == key)
            .map(|(_, n)| *n)
            .collect();
        for node in rest {
            if let Some(list) = reads.remove(&(key, node)) {
                check_reads(key, node, &kw, list, &mut out);
            }
        }
    }
    out.ops_checked = ops
        .iter()
        .filter(|op| !matches!(op.outcome, Outcome::Unknown(_) | Outcome::Refused(_)))
        .count()
        + out.unknown_writes_seen;
    out
}

/// Writes ordered in real time have increasing versions.
fn check_write_order(key: u32, kw: &KeyWrites, out: &mut CheckOutcome) {
    for w in &kw.by_version {
        let before = kw.completed_before(w.invoke);
        if before >= w.version {
            out.violations.push(Violation {
                rule: Rule::WriteOrder,
                node: Node::Master,
                key,
                detail: format!(
                    "a write invoked at {} ms got version {}, but version {before} \
                     had been acknowledged before",
                    ms(w.invoke),
                    w.version
                ),
            });
        }
    }
}

/// The reads of one key at one node: each at the lowest position its window allows.
fn check_reads(
    key: u32,
    node: Node,
    kw: &KeyWrites,
    mut list: Vec<Read<'_>>,
    out: &mut CheckOutcome,
) {
    let at_master = node == Node::Master;
    list.sort_by_key(|r| (r.op.invoke, r.op.complete));
    let mut by_complete: Vec<usize> = (0..list.len()).collect();
    by_complete.sort_by_key(|&i| list[i].op.complete);
    let mut positions = vec![0u64; list.len()];
    let mut done = 0;
    // The highest position among the reads that completed before this one began.
    let mut prior = 0u64;
    for i in 0..list.len() {
        let read = list[i];
        while done < by_complete.len() && list[by_complete[done]].op.complete < read.op.invoke {
            prior = prior.max(positions[by_complete[done]]);
            done += 1;
        }
        // A slave may lag: only the master's reads must see every acknowledged write.
        let floor = if at_master {
            kw.completed_before(read.op.invoke)
        } else {
            0
        };
        let ceiling = kw.invoked_after(read.op.complete).saturating_sub(1);
        let lo = floor.max(prior);
        let violation = |rule: Rule, detail: String| Violation {
            rule,
            node,
            key,
            detail: format!(
                "read invoked at {} ms, completed at {} ms: {detail}",
                ms(read.op.invoke),
                ms(read.op.complete)
            ),
        };
        let went_back = if at_master {
            Rule::ReadsWentBack
        } else {
            Rule::SlaveWentBack
        };
        let (position, last) = match read.version {
            Some(v) => {
                let last = kw.last_position_of(v);
                let position = v.max(lo);
                if position <= last.min(ceiling) {
                    (position, last)
                } else {
                    let (rule, detail) = if v > ceiling {
                        (
                            Rule::FutureRead,
                            format!(
                                "version {v}, but version {} was invoked after it",
                                ceiling + 1
                            ),
                        )
                    } else if last < floor {
                        (
                            Rule::StaleRead,
                            format!(
                                "version {v}, but version {floor} had been acknowledged before"
                            ),
                        )
                    } else {
                        (
                            went_back,
                            format!("version {v}, after an earlier read at position {prior}"),
                        )
                    };
                    out.violations.push(violation(rule, detail));
                    (v, last)
                }
            }
            None => match kw.lowest_absent(lo, ceiling) {
                Some(position) => (position, kw.last_absent_until(ceiling).1),
                None if kw
                    .unknown_deletes
                    .iter()
                    .any(|&(t, _)| t < read.op.complete) =>
                {
                    // A DELETE that may have been applied explains it; where it
                    // would sit is unknown, so nothing follows for later reads.
                    out.lenient_absent_reads += 1;
                    (lo, UNBOUNDED)
                }
                None => {
                    let (_, end) = kw.last_absent_until(ceiling);
                    let (rule, detail) = if end < floor {
                        (
                            Rule::StaleRead,
                            format!(
                                "absent, but version {floor} (present) had been acknowledged before"
                            ),
                        )
                    } else {
                        (
                            went_back,
                            format!("absent, after an earlier read at position {prior}"),
                        )
                    };
                    out.violations.push(violation(rule, detail));
                    (lo, end)
                }
            },
        };
        positions[i] = position;
        if !at_master {
            // How long ago a newer state of the key had been acknowledged.
            let mut newer = kw.first_acked_after(last);
            if read.version.is_none()
                && let Some(deleted) = kw
                    .unknown_deletes
                    .iter()
                    .filter(|&&(t, _)| t < read.op.complete)
                    .map(|&(_, failed)| failed.min(read.op.complete))
                    .max()
            {
                // A DELETE of unknown outcome invoked before the read ended may
                // be what it saw, applied as late as the client saw it fail (or
                // the read ended): only a write invoked after that is surely
                // newer. The kinder of the two explanations is taken, as for
                // the history.
                newer = match (newer, kw.first_ack_of_write_invoked_after(deleted)) {
                    (Some(n), Some(alt)) => Some(if alt.0 > n.0 { alt } else { n }),
                    // Either explanation leaves nothing newer: not stale.
                    _ => None,
                };
            }
            if let Some((acked_at, missed)) = newer
                && acked_at < read.op.invoke
            {
                let nanos = read.op.invoke - acked_at;
                let worst = out.worst_staleness.entry(node).or_insert(Staleness {
                    nanos: 0,
                    key,
                    read_at: 0,
                    version_read: 0,
                    missed_version: 0,
                });
                if nanos > worst.nanos {
                    *worst = Staleness {
                        nanos,
                        key,
                        read_at: read.op.invoke,
                        version_read: read.version.unwrap_or(0),
                        missed_version: missed,
                    };
                }
            }
        } else if read.op.client == FINAL_CLIENT {
            // Check 2: the final state reflects every acknowledged write.
            let lost = kw.acked_after(last);
            if lost > 0 {
                out.lost_writes += lost;
                out.violations.push(violation(
                    Rule::LostWrite,
                    format!(
                        "final state {}, but {lost} acknowledged write(s) have higher versions",
                        read.version
                            .map_or("absent".to_string(), |v| format!("version {v}"))
                    ),
                ));
            }
        }
    }
}

/// Check 4: the final reads of every key (one per key and node, made after
/// the cluster settled) agree: same value and version, or absent everywhere.
pub fn compare_replicas(finals: &[Op]) -> Vec<Violation> {
    let state = |op: &Op| match &op.outcome {
        Outcome::Found { value, version } => {
            Some(format!("{:?} at version {version}", show(value)))
        }
        Outcome::NotFound => Some("absent".to_string()),
        _ => None,
    };
    let mut at_master: BTreeMap<u32, Option<String>> = BTreeMap::new();
    for op in finals.iter().filter(|op| op.node == Node::Master) {
        at_master.insert(op.key, state(op));
    }
    let mut out = Vec::new();
    for op in finals.iter().filter(|op| op.node != Node::Master) {
        let here = state(op);
        let master = at_master.get(&op.key).cloned().flatten();
        if here.is_none() || master.is_none() || here != master {
            out.push(Violation {
                rule: Rule::ReplicasDiffer,
                node: op.node,
                key: op.key,
                detail: format!(
                    "{} at the slave, {} at the master",
                    here.unwrap_or_else(|| format!("no answer ({:?})", op.outcome)),
                    master.unwrap_or_else(|| "no answer".to_string())
                ),
            });
        }
    }
    out
}

/// Milliseconds, for messages.
fn ms(t: Nanos) -> String {
    format!("{:.1}", t as f64 / 1e6)
}

/// A value, for messages.
fn show(value: &[u8]) -> String {
    String::from_utf8_lossy(value).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds histories in milliseconds.
    struct H {
        ops: Vec<Op>,
    }

    const MS: u64 = 1_000_000;

    impl H {
        fn new() -> H {
            H { ops: Vec::new() }
        }

        fn op(
            &mut self,
            node: Node,
            key: u32,
            request: Request,
            span: (u64, u64),
            outcome: Outcome,
        ) -> &mut H {
            self.ops.push(Op {
                client: self.ops.len() as u32,
                node,
                key,
                request,
                invoke: span.0 * MS,
                complete: span.1 * MS,
                outcome,
            });
            self
        }

        fn put(&mut self, key: u32, value: &str, span: (u64, u64), version: u64) -> &mut H {
            self.op(
                Node::Master,
                key,
                Request::Put(value.into()),
                span,
                Outcome::Written(version),
            )
        }

        fn put_unknown(&mut self, key: u32, value: &str, span: (u64, u64)) -> &mut H {
            self.op(
                Node::Master,
                key,
                Request::Put(value.into()),
                span,
                Outcome::Unknown("timeout".into()),
            )
        }

        fn put_failed(&mut self, key: u32, value: &str, span: (u64, u64)) -> &mut H {
            self.op(
                Node::Master,
                key,
                Request::Put(value.into()),
                span,
                Outcome::Failed("ABORTED".into()),
            )
        }

        fn delete(&mut self, key: u32, span: (u64, u64), version: u64) -> &mut H {
            self.op(
                Node::Master,
                key,
                Request::Delete,
                span,
                Outcome::Written(version),
            )
        }

        fn get_at(
            &mut self,
            node: Node,
            key: u32,
            span: (u64, u64),
            seen: Option<(&str, u64)>,
        ) -> &mut H {
            let outcome = match seen {
                Some((value, version)) => Outcome::Found {
                    value: value.into(),
                    version,
                },
                None => Outcome::NotFound,
            };
            self.op(node, key, Request::Get, span, outcome)
        }

        fn get(&mut self, key: u32, span: (u64, u64), seen: Option<(&str, u64)>) -> &mut H {
            self.get_at(Node::Master, key, span, seen)
        }

        fn final_get(&mut self, key: u32, at: u64, seen: Option<(&str, u64)>) -> &mut H {
            self.get(key, (at, at + 1), seen);
            if let Some(op) = self.ops.last_mut() {
                op.client = FINAL_CLIENT;
            }
            self
        }

        fn rules(&self) -> Vec<Rule> {
            let mut rules: Vec<Rule> = check(&self.ops).violations.iter().map(|v| v.rule).collect();
            rules.sort();
            rules.dedup();
            rules
        }
    }

    const S0: Node = Node::Slave(0);

    #[test]
    fn a_linearizable_history_passes() {
        let mut h = H::new();
        h.get(1, (0, 1), None)
            .put(1, "a", (2, 5), 10)
            .get(1, (3, 4), None) // concurrent with the put: either is fine
            .get(1, (6, 7), Some(("a", 10)))
            .put(1, "b", (8, 12), 20)
            .get(1, (9, 11), Some(("b", 20)))
            .get(1, (13, 14), Some(("b", 20)))
            .delete(1, (15, 16), 30)
            .get(1, (17, 18), None)
            .final_get(1, 100, None);
        let out = check(&h.ops);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert_eq!(out.acked_writes, 3);
        assert_eq!(out.lost_writes, 0);
    }

    #[test]
    fn a_read_older_than_an_acknowledged_write_is_stale() {
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .put(1, "b", (2, 3), 20)
            .get(1, (4, 5), Some(("a", 10)));
        assert_eq!(h.rules(), vec![Rule::StaleRead]);
    }

    #[test]
    fn a_read_absent_after_an_acknowledged_put_is_stale() {
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10).get(1, (2, 3), None);
        assert_eq!(h.rules(), vec![Rule::StaleRead]);
    }

    #[test]
    fn a_read_of_a_write_invoked_after_it_completed_sees_the_future() {
        let mut h = H::new();
        h.get(1, (0, 1), Some(("a", 10))).put(1, "a", (2, 3), 10);
        assert_eq!(h.rules(), vec![Rule::FutureRead]);
    }

    #[test]
    fn reads_ordered_in_real_time_must_not_go_back() {
        let mut h = H::new();
        // Both reads are concurrent with the second put, but ordered with each other.
        h.put(1, "a", (0, 1), 10)
            .put(1, "b", (2, 10), 20)
            .get(1, (3, 4), Some(("b", 20)))
            .get(1, (5, 6), Some(("a", 10)));
        assert_eq!(h.rules(), vec![Rule::ReadsWentBack]);
        // Concurrent reads may disagree.
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .put(1, "b", (2, 10), 20)
            .get(1, (3, 6), Some(("b", 20)))
            .get(1, (4, 5), Some(("a", 10)));
        assert!(h.rules().is_empty());
    }

    #[test]
    fn an_absent_read_after_a_present_one_needs_a_delete() {
        let mut h = H::new();
        h.put(1, "a", (0, 10), 10)
            .get(1, (2, 3), Some(("a", 10)))
            .get(1, (4, 5), None);
        assert_eq!(h.rules(), vec![Rule::ReadsWentBack]);
        let mut h = H::new();
        h.put(1, "a", (0, 10), 10)
            .delete(1, (1, 10), 11)
            .get(1, (2, 3), Some(("a", 10)))
            .get(1, (4, 5), None)
            .get(1, (6, 7), None);
        assert!(h.rules().is_empty());
    }

    #[test]
    fn writes_ordered_in_real_time_have_increasing_versions() {
        let mut h = H::new();
        h.put(1, "a", (0, 1), 20).put(1, "b", (2, 3), 10);
        assert_eq!(h.rules(), vec![Rule::WriteOrder]);
        // One batch: concurrent writes share a version.
        let mut h = H::new();
        h.put(1, "a", (0, 3), 10)
            .put(1, "b", (1, 3), 10)
            .get(1, (4, 5), Some(("b", 10)));
        assert!(h.rules().is_empty());
        // ... but writes ordered in time cannot.
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10).put(1, "b", (2, 3), 10);
        assert_eq!(h.rules(), vec![Rule::WriteOrder]);
    }

    #[test]
    fn a_version_has_one_value() {
        let mut h = H::new();
        h.put(1, "a", (0, 3), 10)
            .put(1, "b", (1, 3), 10)
            .get(1, (4, 5), Some(("b", 10)))
            .get_at(S0, 1, (4, 5), Some(("a", 10)));
        assert_eq!(h.rules(), vec![Rule::VersionConflict]);
    }

    #[test]
    fn the_value_read_must_be_the_one_written_at_that_version() {
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .put(1, "b", (2, 3), 20)
            .get(1, (4, 5), Some(("a", 20)));
        assert_eq!(h.rules(), vec![Rule::ValueMismatch]);
        let mut h = H::new();
        h.put(2, "a", (0, 1), 10).get(1, (4, 5), Some(("a", 10)));
        assert!(h.rules().contains(&Rule::ValueMismatch));
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10).get(1, (2, 3), Some(("zzz", 10)));
        assert!(h.rules().contains(&Rule::UnknownValue));
    }

    #[test]
    fn a_failed_write_must_never_be_seen() {
        let mut h = H::new();
        h.put_failed(1, "a", (0, 1)).get(1, (2, 3), Some(("a", 10)));
        assert!(h.rules().contains(&Rule::FailedWriteVisible));
        // Unseen, it is fine.
        let mut h = H::new();
        h.put_failed(1, "a", (0, 1)).get(1, (2, 3), None);
        assert!(h.rules().is_empty());
    }

    #[test]
    fn an_unknown_write_may_or_may_not_appear() {
        // Not seen: as if never applied.
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .put_unknown(1, "b", (2, 3))
            .get(1, (4, 5), Some(("a", 10)));
        assert!(h.rules().is_empty());
        // Seen: applied at the version it was seen at, and ordered from then on.
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .put_unknown(1, "b", (2, 3))
            .get(1, (4, 5), Some(("b", 15)))
            .get(1, (6, 7), Some(("a", 10)));
        assert_eq!(h.rules(), vec![Rule::ReadsWentBack]);
        let out = check(&h.ops);
        assert_eq!(out.unknown_writes, 1);
        assert_eq!(out.unknown_writes_seen, 1);
        // Seen at a version below one acknowledged before it was invoked.
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .put_unknown(1, "b", (2, 3))
            .get(1, (4, 5), Some(("b", 5)));
        assert!(h.rules().contains(&Rule::WriteOrder));
        // Seen at two versions.
        let mut h = H::new();
        h.put_unknown(1, "b", (2, 3))
            .get(1, (4, 5), Some(("b", 5)))
            .get_at(S0, 1, (4, 5), Some(("b", 6)));
        assert!(h.rules().contains(&Rule::ValueMismatch));
    }

    #[test]
    fn an_unknown_delete_may_explain_an_absent_read() {
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .op(
                Node::Master,
                1,
                Request::Delete,
                (2, 3),
                Outcome::Unknown("timeout".into()),
            )
            .get(1, (4, 5), None);
        let out = check(&h.ops);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert_eq!(out.lenient_absent_reads, 1);
    }

    #[test]
    fn an_update_or_delete_that_found_nothing_reads_absence() {
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10).op(
            Node::Master,
            1,
            Request::Update("u".into()),
            (2, 3),
            Outcome::NotFound,
        );
        assert_eq!(h.rules(), vec![Rule::StaleRead]);
        let mut h = H::new();
        h.op(Node::Master, 1, Request::Delete, (0, 1), Outcome::NotFound)
            .put(1, "a", (2, 3), 10);
        assert!(h.rules().is_empty());
    }

    #[test]
    fn slaves_may_lag_but_never_go_back() {
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10).put(1, "b", (2, 3), 20).get_at(
            S0,
            1,
            (1000, 1001),
            Some(("a", 10)),
        );
        let out = check(&h.ops);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        let worst = out.worst_staleness[&S0];
        assert_eq!(worst.nanos, 997 * MS);
        assert_eq!((worst.version_read, worst.missed_version), (10, 20));
        // Going back at one slave fails; two slaves are independent.
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .put(1, "b", (2, 3), 20)
            .get_at(S0, 1, (4, 5), Some(("b", 20)))
            .get_at(Node::Slave(1), 1, (6, 7), Some(("a", 10)));
        assert!(h.rules().is_empty());
        h.get_at(S0, 1, (8, 9), Some(("a", 10)));
        assert_eq!(h.rules(), vec![Rule::SlaveWentBack]);
        // Absent again after having shown the key, with no delete.
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .get_at(S0, 1, (4, 5), Some(("a", 10)))
            .get_at(S0, 1, (6, 7), None);
        assert_eq!(h.rules(), vec![Rule::SlaveWentBack]);
        // A slave cannot show a write before it was invoked.
        let mut h = H::new();
        h.get_at(S0, 1, (0, 1), Some(("a", 10)))
            .put(1, "a", (2, 3), 10);
        assert_eq!(h.rules(), vec![Rule::FutureRead]);
    }

    #[test]
    fn staleness_of_an_absent_read_counts_from_the_put_that_ended_the_absence() {
        let mut h = H::new();
        h.put(1, "a", (0, 10), 10).get_at(S0, 1, (500, 501), None);
        let out = check(&h.ops);
        assert!(out.violations.is_empty());
        assert_eq!(out.worst_staleness[&S0].nanos, 490 * MS);
        // An up-to-date slave read is not stale.
        let mut h = H::new();
        h.put(1, "a", (0, 10), 10)
            .get_at(S0, 1, (500, 501), Some(("a", 10)));
        assert!(check(&h.ops).worst_staleness.is_empty());
    }

    #[test]
    fn an_absent_slave_read_an_unknown_delete_explains_is_measured_from_that_delete() {
        // Deleted (acknowledged), put again, then a DELETE whose answer never
        // came: an absent read long after may show that last DELETE, so it
        // is not stale, though the older deletion alone would make it so.
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .delete(1, (2, 3), 11)
            .put(1, "b", (4, 5), 12)
            .op(
                Node::Master,
                1,
                Request::Delete,
                (6, 7),
                Outcome::Unknown("closed".into()),
            )
            .get_at(S0, 1, (1_000, 1_001), None);
        let out = check(&h.ops);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert!(out.worst_staleness.is_empty(), "{:?}", out.worst_staleness);
        // A write acknowledged after that DELETE makes the absence stale again.
        h.put(1, "c", (8, 9), 13)
            .get_at(S0, 1, (1_500, 1_501), None);
        let out = check(&h.ops);
        assert_eq!(out.worst_staleness[&S0].nanos, (1_500 - 9) * MS);
    }

    #[test]
    fn an_old_unknown_delete_does_not_make_a_current_absence_stale() {
        // The DELETE whose answer never came is long past; a later one was
        // acknowledged, and the absent read shows that one: not stale.
        let mut h = H::new();
        h.op(
            Node::Master,
            1,
            Request::Delete,
            (0, 1),
            Outcome::Unknown("closed".into()),
        )
        .put(1, "a", (2, 3), 10)
        .delete(1, (4, 5), 11)
        .get_at(S0, 1, (1_000, 1_001), None);
        let out = check(&h.ops);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert!(out.worst_staleness.is_empty(), "{:?}", out.worst_staleness);
    }

    #[test]
    fn the_final_state_must_reflect_every_acknowledged_write() {
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .put(1, "b", (2, 3), 20)
            .final_get(1, 100, Some(("a", 10)));
        let out = check(&h.ops);
        assert_eq!(out.lost_writes, 1);
        assert!(out.violations.iter().any(|v| v.rule == Rule::LostWrite));
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10).final_get(1, 100, None);
        assert_eq!(check(&h.ops).lost_writes, 1);
        // An unknown write may be the last one.
        let mut h = H::new();
        h.put(1, "a", (0, 1), 10)
            .put_unknown(1, "b", (2, 3))
            .final_get(1, 100, Some(("b", 30)));
        let out = check(&h.ops);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
        assert_eq!(out.lost_writes, 0);
    }

    #[test]
    fn replicas_must_hold_the_same_state_at_the_end() {
        let mut h = H::new();
        h.get(1, (0, 1), Some(("a", 10)))
            .get_at(S0, 1, (0, 1), Some(("a", 10)))
            .get_at(Node::Slave(1), 1, (0, 1), Some(("a", 10)))
            .get(2, (0, 1), None)
            .get_at(S0, 2, (0, 1), None);
        assert!(compare_replicas(&h.ops).is_empty());
        h.get_at(Node::Slave(1), 2, (0, 1), Some(("b", 4)));
        let differ = compare_replicas(&h.ops);
        assert_eq!(differ.len(), 1);
        assert_eq!((differ[0].rule, differ[0].key), (Rule::ReplicasDiffer, 2));
        // A stale version differs too, and so does no answer.
        let mut h = H::new();
        h.get(1, (0, 1), Some(("a", 10)))
            .get_at(S0, 1, (0, 1), Some(("a", 9)));
        assert_eq!(compare_replicas(&h.ops).len(), 1);
        h.op(
            Node::Slave(1),
            1,
            Request::Get,
            (0, 1),
            Outcome::Unknown("timeout".into()),
        );
        assert_eq!(compare_replicas(&h.ops).len(), 2);
    }

    #[test]
    fn refused_slave_reads_are_counted_not_checked() {
        let mut h = H::new();
        h.op(
            S0,
            1,
            Request::Get,
            (0, 1),
            Outcome::Refused("REDIRECT".into()),
        );
        let out = check(&h.ops);
        assert!(out.violations.is_empty());
        assert_eq!(out.refused_reads[&S0], 1);
        assert_eq!(out.ops_checked, 0);
    }
}
