//! The figures of a run, computed from the history and the round records,
//! and printed as plain text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::check::{CheckOutcome, Rule, Violation};
use crate::faults::{FaultKind, RoundRecord};
use crate::history::{Nanos, Node, Op, Outcome};

/// Violations printed in full; the rest are counted by rule.
const MAX_VIOLATIONS_SHOWN: usize = 25;

/// Per fault kind: the longest gap between two successful write completions
/// at the master, from the fault's start until the cluster settled.
pub fn write_stalls(ops: &[Op], rounds: &[RoundRecord]) -> BTreeMap<FaultKind, Duration> {
    let mut acked: Vec<Nanos> = ops
        .iter()
        .filter(|op| op.node == Node::Master && matches!(op.outcome, Outcome::Written(_)))
        .map(|op| op.complete)
        .collect();
    acked.sort_unstable();
    let mut stalls: BTreeMap<FaultKind, Duration> = BTreeMap::new();
    for round in rounds {
        let stall = longest_gap(&acked, round.start, round.settled);
        let entry = stalls.entry(round.fault.kind).or_default();
        *entry = (*entry).max(Duration::from_nanos(stall));
    }
    stalls
}

/// The longest stretch of `[from, until]` without a time of `sorted`.
fn longest_gap(sorted: &[Nanos], from: Nanos, until: Nanos) -> Nanos {
    let first = sorted.partition_point(|&t| t < from);
    let mut previous = from;
    let mut longest = 0;
    for &t in sorted[first..].iter().take_while(|&&t| t <= until) {
        longest = longest.max(t - previous);
        previous = t;
    }
    longest.max(until.saturating_sub(previous))
}

/// Everything the report needs.
pub struct Run<'a> {
    /// The seed of the schedule and the clients.
    pub seed: u64,
    /// Rounds run.
    pub rounds: &'a [RoundRecord],
    /// Every recorded op.
    pub ops: &'a [Op],
    /// What the checker found.
    pub check: &'a CheckOutcome,
    /// Violations of check 4.
    pub replicas: &'a [Violation],
    /// The staleness bound, when enforced.
    pub max_staleness: Option<Duration>,
    /// Slaves whose worst staleness broke the bound.
    pub staleness_exceeded: &'a [Node],
    /// Wall time of the run.
    pub elapsed: Duration,
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// The report, as text.
pub fn render(run: &Run<'_>) -> String {
    let mut s = String::new();
    let c = run.check;
    let _ = writeln!(
        s,
        "== dkvs-chaos: seed {} ({} s)",
        run.seed,
        run.elapsed.as_secs()
    );
    let mut per_kind: BTreeMap<FaultKind, (usize, usize)> = BTreeMap::new();
    for r in run.rounds {
        let e = per_kind.entry(r.fault.kind).or_default();
        e.0 += 1;
        e.1 += usize::from(r.settle_timed_out);
    }
    let stalls = write_stalls(run.ops, run.rounds);
    let _ = writeln!(s, "rounds: {}", run.rounds.len());
    for (kind, (n, timeouts)) in &per_kind {
        let stall = stalls.get(kind).copied().unwrap_or_default();
        let _ = write!(
            s,
            "  {kind:<24} {n:>4} rounds, longest write stall {}",
            ms(stall)
        );
        if *timeouts > 0 {
            let _ = write!(s, ", {timeouts} did not settle");
        }
        s.push('\n');
    }
    let partitions: Vec<&RoundRecord> = run
        .rounds
        .iter()
        .filter(|r| r.fault.kind == FaultKind::Partition)
        .collect();
    if !partitions.is_empty() {
        let _ = writeln!(
            s,
            "partitions (length: cut -> master lists the slave out of sync; heal -> in sync again):"
        );
        let mut max_heal = Duration::ZERO;
        for r in &partitions {
            let show = |d: Option<Duration>| d.map_or("never".to_string(), ms);
            let _ = writeln!(
                s,
                "  {:>6.1} s (slave {}): out of sync after {}, in sync {} after the heal",
                r.fault.hold.as_secs_f64(),
                r.fault.slave,
                show(r.cut_to_out_of_sync),
                show(r.heal_to_in_sync)
            );
            max_heal = max_heal.max(r.heal_to_in_sync.unwrap_or_default());
        }
        let _ = writeln!(s, "  heal -> in sync, max: {}", ms(max_heal));
    }
    let master_ops = run.ops.iter().filter(|o| o.node == Node::Master).count();
    let _ = writeln!(
        s,
        "operations: {} recorded ({master_ops} at the master), {} checked",
        run.ops.len(),
        c.ops_checked
    );
    let _ = writeln!(
        s,
        "writes: {} acknowledged, {} unknown outcome ({} of them seen applied), {} failed",
        c.acked_writes, c.unknown_writes, c.unknown_writes_seen, c.failed_writes
    );
    let _ = writeln!(s, "acknowledged writes lost: {}", c.lost_writes);
    for (node, served) in &c.served_reads {
        let refused = c.refused_reads.get(node).copied().unwrap_or(0);
        let _ = write!(s, "{node}: {served} reads served, {refused} refused");
        match c.worst_staleness.get(node) {
            Some(w) => {
                let _ = writeln!(
                    s,
                    ", worst staleness {} (key {} read at {:.1} s returned version {}, \
                     version {} had been acknowledged before)",
                    ms(Duration::from_nanos(w.nanos)),
                    w.key,
                    w.read_at as f64 / 1e9,
                    w.version_read,
                    w.missed_version
                );
            }
            None => s.push_str(", never stale\n"),
        }
    }
    for (node, refused) in &c.refused_reads {
        if !c.served_reads.contains_key(node) {
            let _ = writeln!(s, "{node}: 0 reads served, {refused} refused");
        }
    }
    if c.lenient_absent_reads > 0 {
        let _ = writeln!(
            s,
            "absent reads explained only by a DELETE of unknown outcome: {}",
            c.lenient_absent_reads
        );
    }
    match run.max_staleness {
        Some(bound) => {
            let _ = writeln!(s, "staleness bound: {} (enforced)", ms(bound));
        }
        None => s.push_str("staleness bound: not enforced (--ignore-staleness)\n"),
    }
    let all: Vec<&Violation> = c.violations.iter().chain(run.replicas).collect();
    let failed = !all.is_empty() || !run.staleness_exceeded.is_empty();
    if all.is_empty() {
        s.push_str("violations: none\n");
    } else {
        let mut by_rule: BTreeMap<Rule, usize> = BTreeMap::new();
        for v in &all {
            *by_rule.entry(v.rule).or_default() += 1;
        }
        let _ = writeln!(s, "violations: {}", all.len());
        for (rule, n) in &by_rule {
            let _ = writeln!(s, "  {n:>6}  {rule}");
        }
        for v in all.iter().take(MAX_VIOLATIONS_SHOWN) {
            let _ = writeln!(s, "  - {v}");
        }
    }
    for node in run.staleness_exceeded {
        let _ = writeln!(s, "staleness at {node} exceeded the bound");
    }
    let _ = writeln!(s, "result: {}", if failed { "FAIL" } else { "PASS" });
    s
}

/// Write the history, one op per line sorted by invoke time, for reading by
/// hand after a violation: `invoke_ms complete_ms node client key request outcome`.
pub fn write_history(path: &std::path::Path, ops: &[Op]) -> std::io::Result<()> {
    use std::io::Write;
    let mut sorted: Vec<&Op> = ops.iter().collect();
    sorted.sort_by_key(|op| (op.invoke, op.complete));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for op in sorted {
        let request = match &op.request {
            crate::history::Request::Get => "GET".to_string(),
            crate::history::Request::Put(v) => format!("PUT {}", String::from_utf8_lossy(v)),
            crate::history::Request::Update(v) => format!("UPDATE {}", String::from_utf8_lossy(v)),
            crate::history::Request::Delete => "DELETE".to_string(),
        };
        let outcome = match &op.outcome {
            Outcome::Written(v) => format!("written v{v}"),
            Outcome::Found { value, version } => {
                format!("found {} v{version}", String::from_utf8_lossy(value))
            }
            Outcome::NotFound => "not-found".to_string(),
            Outcome::Refused(why) => format!("refused {why}"),
            Outcome::Failed(why) => format!("failed {why}"),
            Outcome::Unknown(why) => format!("unknown {why}"),
        };
        writeln!(
            out,
            "{:.3} {:.3} {} c{} k{:02} {request} -> {outcome}",
            op.invoke as f64 / 1e6,
            op.complete as f64 / 1e6,
            op.node,
            op.client,
            op.key
        )?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_from_the_start_and_to_the_end() {
        assert_eq!(longest_gap(&[], 10, 50), 40);
        assert_eq!(longest_gap(&[5, 12, 40, 45, 100], 10, 50), 28);
        assert_eq!(longest_gap(&[11, 12, 13], 10, 50), 37);
    }
}
