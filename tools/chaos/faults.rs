//! The fault rounds: a seeded schedule, and running one round against the
//! cluster (inject, hold, heal, settle), recording when each step happened.

use std::fmt;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use crate::cluster::{Cluster, ClusterError, FirewallRule, pause, slave_uid};
use crate::history::{Clock, Nanos};

/// The kinds of fault, in the order the figures list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum FaultKind {
    /// `kill -9` of the master, restart on the same port and data dir.
    KillMaster,
    /// `kill -9` of a slave, restart.
    KillSlave,
    /// SIGSTOP of the master, SIGCONT later.
    PauseMaster,
    /// SIGSTOP of a slave, SIGCONT later.
    PauseSlave,
    /// The slave's packets to the master port dropped (stalls the link both ways).
    Partition,
    /// A slave stopped 250 ms, running 50 ms, in a loop.
    SlowSlave,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::KillMaster,
        FaultKind::KillSlave,
        FaultKind::PauseMaster,
        FaultKind::PauseSlave,
        FaultKind::Partition,
        FaultKind::SlowSlave,
    ];

    /// Whether the fault hits a slave (which one is drawn).
    fn hits_slave(self) -> bool {
        !matches!(self, FaultKind::KillMaster | FaultKind::PauseMaster)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that the report's column widths apply.
        f.pad(match self {
            FaultKind::KillMaster => "kill -9 master",
            FaultKind::KillSlave => "kill -9 slave",
            FaultKind::PauseMaster => "STOP/CONT master",
            FaultKind::PauseSlave => "STOP/CONT slave",
            FaultKind::Partition => "partition master|slave",
            FaultKind::SlowSlave => "slow slave",
        })
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// The slave it hits (unused for master faults).
    pub slave: usize,
    /// How long it lasts: downtime after a kill, the pause, the partition, the slow period.
    pub hold: Duration,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if self.kind.hits_slave() {
            write!(f, " {}", self.slave)?;
        }
        write!(f, " for {} ms", self.hold.as_millis())
    }
}

/// How long each kind of fault may last, in milliseconds.
#[derive(Debug, Clone)]
pub struct Holds {
    /// Downtime between a kill and the restart.
    pub kill_ms: RangeInclusive<u64>,
    /// SIGSTOP to SIGCONT.
    pub pause_ms: RangeInclusive<u64>,
    /// Partition length.
    pub partition_ms: RangeInclusive<u64>,
    /// Slow-slave period.
    pub slow_ms: RangeInclusive<u64>,
}

/// `rounds` faults drawn from `seed`: the `kinds` (empty: all six) in shuffled
/// cycles, so that every kind comes up equally often (and each within one cycle).
pub fn schedule(
    seed: u64,
    rounds: usize,
    slaves: usize,
    holds: &Holds,
    kinds: &[FaultKind],
) -> Vec<Fault> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(rounds);
    let kinds = if kinds.is_empty() {
        &FaultKind::ALL[..]
    } else {
        kinds
    };
    while out.len() < rounds {
        let mut cycle = kinds.to_vec();
        cycle.shuffle(&mut rng);
        for kind in cycle {
            if out.len() == rounds {
                break;
            }
            let range = match kind {
                FaultKind::KillMaster | FaultKind::KillSlave => &holds.kill_ms,
                FaultKind::PauseMaster | FaultKind::PauseSlave => &holds.pause_ms,
                FaultKind::Partition => &holds.partition_ms,
                FaultKind::SlowSlave => &holds.slow_ms,
            };
            out.push(Fault {
                kind,
                slave: rng.random_range(0..slaves.max(1)),
                hold: Duration::from_millis(rng.random_range(range.clone())),
            });
        }
    }
    out
}

/// What happened in one round.
#[derive(Debug, Clone)]
pub struct RoundRecord {
    /// The fault.
    pub fault: Fault,
    /// When it was injected.
    pub start: Nanos,
    /// When it was undone (restart done, CONT sent, rule deleted).
    pub healed: Nanos,
    /// When the cluster was settled again (every slave in sync), or gave up.
    pub settled: Nanos,
    /// Partitions: from the heal until the master listed the slave in sync again.
    pub heal_to_in_sync: Option<Duration>,
    /// Partitions: how long after the cut the master stopped listing the slave in sync.
    pub cut_to_out_of_sync: Option<Duration>,
    /// The cluster did not settle within the limit.
    pub settle_timed_out: bool,
}

/// Run one fault round, then wait for every slave to be in sync (at most `settle_limit`).
pub fn run_round(
    cluster: &mut Cluster,
    fault: Fault,
    clock: Clock,
    settle_limit: Duration,
) -> Result<RoundRecord, ClusterError> {
    let start = clock.now();
    let mut heal_to_in_sync = None;
    let mut cut_to_out_of_sync = None;
    match fault.kind {
        FaultKind::KillMaster => {
            cluster.master.kill9();
            pause(fault.hold)?;
            cluster.master.restart()?;
        }
        FaultKind::KillSlave => {
            let slave = &mut cluster.slaves[fault.slave];
            slave.kill9();
            pause(fault.hold)?;
            slave.restart()?;
        }
        FaultKind::PauseMaster => {
            cluster.master.stop()?;
            let held = pause(fault.hold);
            cluster.master.resume()?;
            held?;
        }
        FaultKind::PauseSlave => {
            let slave = &mut cluster.slaves[fault.slave];
            slave.stop()?;
            let held = pause(fault.hold);
            slave.resume()?;
            held?;
        }
        FaultKind::Partition => {
            let cut_at = Instant::now();
            let rule = FirewallRule::drop_to_port(slave_uid(fault.slave), cluster.master.port)?;
            // Watch the master notice (it evicts the slave once a transaction
            // times out on it), but hold the partition its full length.
            let until = cut_at + fault.hold;
            while Instant::now() < until {
                if cut_to_out_of_sync.is_none() && !cluster.slave_in_sync(fault.slave) {
                    cut_to_out_of_sync = Some(cut_at.elapsed());
                }
                pause(
                    Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())),
                )?;
            }
            drop(rule);
            let healed_at = Instant::now();
            // Poll every ~20 ms until the master lists the slave in sync again.
            let took = cluster.wait(
                "the partitioned slave in sync again",
                settle_limit,
                Duration::from_millis(20),
                |c| c.slave_in_sync(fault.slave),
            );
            if took.is_ok() {
                heal_to_in_sync = Some(healed_at.elapsed());
            }
        }
        FaultKind::SlowSlave => {
            let until = Instant::now() + fault.hold;
            let slave = &mut cluster.slaves[fault.slave];
            // Bounded by the hold: at most hold / 300 ms iterations.
            while Instant::now() < until {
                slave.stop()?;
                let held = pause(Duration::from_millis(250));
                slave.resume()?;
                held?;
                pause(Duration::from_millis(50))?;
            }
        }
    }
    let healed = clock.now();
    let settle = cluster.wait(
        "every slave in sync",
        settle_limit,
        Duration::from_millis(20),
        |c| c.in_sync(false),
    );
    let settle_timed_out = match settle {
        Ok(_) => false,
        Err(ClusterError::Timeout(_)) => true,
        Err(e) => return Err(e),
    };
    Ok(RoundRecord {
        fault,
        start,
        healed,
        settled: clock.now(),
        heal_to_in_sync,
        cut_to_out_of_sync,
        settle_timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds() -> Holds {
        Holds {
            kill_ms: 0..=1000,
            pause_ms: 200..=3000,
            partition_ms: 2000..=6000,
            slow_ms: 2000..=5000,
        }
    }

    #[test]
    fn a_schedule_is_reproducible_from_its_seed_and_covers_every_kind() {
        let a = schedule(42, 12, 2, &holds(), &[]);
        assert_eq!(a, schedule(42, 12, 2, &holds(), &[]));
        assert_ne!(a, schedule(43, 12, 2, &holds(), &[]));
        for kind in FaultKind::ALL {
            assert_eq!(a[..6].iter().filter(|f| f.kind == kind).count(), 1);
            assert_eq!(a.iter().filter(|f| f.kind == kind).count(), 2);
        }
        for f in &a {
            assert!(f.slave < 2);
            if f.kind == FaultKind::Partition {
                assert!((2000..=6000).contains(&(f.hold.as_millis() as u64)));
            }
        }
        assert_eq!(schedule(1, 4, 2, &holds(), &[]).len(), 4);
        let only = schedule(1, 5, 2, &holds(), &[FaultKind::Partition]);
        assert!(only.iter().all(|f| f.kind == FaultKind::Partition));
    }
}
