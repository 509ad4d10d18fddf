//! dkvs-chaos: replication under faults (issue 9).
//!
//! Starts a real master and two slaves on loopback, drives recorded clients
//! against them, injects seeded fault rounds (kill -9, SIGSTOP, partitions,
//! a slow slave), and at the end checks the history: the master's is
//! linearizable, nothing acknowledged is lost, slave reads never go back (and
//! their staleness is bounded), and the replicas end identical.

mod check;
mod cluster;
mod faults;
mod history;
mod report;
mod workload;

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::cluster::{Cluster, ClusterError, pause};
use crate::faults::{Holds, RoundRecord};
use crate::history::{Clock, FINAL_CLIENT, Node, Op, Outcome, Request};
use crate::workload::{Clients, Workload};

/// Replication under faults: a master and two slaves (real dkvs-server
/// processes on loopback), recorded clients, seeded fault rounds, and a check
/// of the history.
///
/// Each round injects one fault, drawn from a seeded schedule (each kind
/// comes up once per cycle of the kinds chosen with --faults, default all):
/// kill -9 of the master or a slave and a restart on the same port and data dir; SIGSTOP/SIGCONT of the master or a
/// slave; a partition between the master and one slave (iptables drops the
/// slave's packets to the master port; each slave runs as its own user,
/// 65534 and 65533, through setpriv); a slow slave (STOP 250 ms / CONT 50 ms
/// in a loop). After each round the run waits until the master lists every
/// slave in sync.
///
/// At the end it checks, and exits 1 if any check fails (2: the run itself
/// could not be carried out):
/// 1. the master's history is linearizable per key (a version-based check);
/// 2. no acknowledged write is lost;
/// 3. each slave's reads never go back in time, and their staleness stays
///    within --max-staleness-ms (unless --ignore-staleness);
/// 4. after settling, master and slaves hold every key identically.
///
/// Needs root (iptables, setpriv). Everything it starts is undone at the
/// end, on a panic and on Ctrl-C: servers killed, iptables rules deleted,
/// the temp dir removed (kept, and its path printed, when a check fails or
/// with --keep-dir: it holds each server's log).
#[derive(Debug, Parser)]
#[command(name = "dkvs-chaos", version, about, long_about)]
struct Args {
    /// Fault rounds to run.
    #[arg(long, default_value_t = 12)]
    rounds: usize,
    /// Only these kinds of fault (comma-separated) [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<faults::FaultKind>,
    /// Stop starting rounds after this many seconds (the checks still run).
    #[arg(long, default_value_t = 900)]
    max_secs: u64,
    /// Seed of the fault schedule and of the clients' choices [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// The dkvs-server binary [default: next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Extra argument passed to every server (repeat for several), e.g.
    /// `--server-arg=--fsync --server-arg=never`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Keys in the key space (few, so that histories interleave).
    #[arg(long, default_value_t = 32)]
    keys: u32,
    /// Client threads writing and reading at the master.
    #[arg(long, default_value_t = 4)]
    master_clients: u32,
    /// Reader threads per slave.
    #[arg(long, default_value_t = 1)]
    slave_readers: u32,
    /// Timeout of one request, in ms (a write that times out has an unknown outcome).
    #[arg(long, default_value_t = 1000)]
    op_timeout_ms: u64,
    /// Pause between two requests of one client, in ms.
    #[arg(long, default_value_t = 2)]
    think_ms: u64,
    /// Downtime between a kill -9 and the restart, in ms: MIN..MAX.
    #[arg(long, default_value = "0..1000", value_parser = parse_range)]
    kill_ms: RangeInclusive<u64>,
    /// SIGSTOP to SIGCONT, in ms: MIN..MAX.
    #[arg(long, default_value = "200..3000", value_parser = parse_range)]
    pause_ms: RangeInclusive<u64>,
    /// Length of a partition, in seconds: MIN..MAX (the issue asks for 2..25).
    #[arg(long, default_value = "2..6", value_parser = parse_range)]
    partition_secs: RangeInclusive<u64>,
    /// Length of a slow-slave period, in seconds: MIN..MAX.
    #[arg(long, default_value = "2..5", value_parser = parse_range)]
    slow_secs: RangeInclusive<u64>,
    /// Load without faults after each settled round, in ms.
    #[arg(long, default_value_t = 500)]
    calm_ms: u64,
    /// Longest wait for the slaves to be in sync after a round, in seconds
    /// (a round that does not settle is reported and fails the run).
    #[arg(long, default_value_t = 30)]
    settle_secs: u64,
    /// Worst staleness allowed at a slave, in ms: the servers' slave read
    /// lease (`--slave-read-lease-ms`, 200 by default).
    #[arg(long, default_value_t = 200)]
    max_staleness_ms: u64,
    /// Report the staleness at the slaves but do not fail on it (for slaves
    /// run with `--serve-stale-reads`, which serve stale reads by design).
    #[arg(long)]
    ignore_staleness: bool,
    /// Check a history file written by an earlier run (`--history`) again,
    /// with this build's checker, instead of running servers.
    #[arg(long, value_name = "FILE")]
    check_history: Option<PathBuf>,
    /// Write the recorded history to this file (one op per line), to read
    /// after a violation. Without it, a failed run writes `history.txt` in the kept temp dir.
    #[arg(long)]
    history: Option<PathBuf>,
    /// Keep the temp dir (data dirs and server logs) even if the run passes.
    #[arg(long)]
    keep_dir: bool,
}

/// `MIN..MAX` (inclusive) or a single number.
fn parse_range(text: &str) -> Result<RangeInclusive<u64>, String> {
    let (lo, hi) = text.split_once("..").unwrap_or((text, text));
    let number = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("'{s}' is not a number (want MIN..MAX)"))
    };
    let (lo, hi) = (number(lo)?, number(hi.trim_start_matches('='))?);
    if lo > hi {
        return Err(format!("{lo}..{hi} is empty"));
    }
    Ok(lo..=hi)
}

/// Scale a range by `factor` (seconds to milliseconds).
fn scaled(range: &RangeInclusive<u64>, factor: u64) -> RangeInclusive<u64> {
    range.start() * factor..=range.end() * factor
}

fn main() -> ExitCode {
    let args = Args::parse();
    simplelog::TermLogger::init(
        log::LevelFilter::Info,
        simplelog::Config::default(),
        simplelog::TerminalMode::Stderr,
        simplelog::ColorChoice::Never,
    )
    .unwrap_or_else(|e| eprintln!("dkvs-chaos: no logger: {e}"));
    if let Some(path) = &args.check_history {
        return match recheck(path, &args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("dkvs-chaos: {e}");
                ExitCode::from(2)
            }
        };
    }
    cluster::catch_interrupts();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("dkvs-chaos: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Check a recorded history again; prints the checker's figures.
fn recheck(path: &std::path::Path, args: &Args) -> Result<bool, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let ops = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(history::parse_op)
        .collect::<Result<Vec<_>, _>>()?;
    let outcome = check::check(&ops);
    let bound = Duration::from_millis(args.max_staleness_ms);
    println!(
        "{}: {} operations, {} checked, {} acknowledged writes, {} lost",
        path.display(),
        ops.len(),
        outcome.ops_checked,
        outcome.acked_writes,
        outcome.lost_writes
    );
    let mut stale = false;
    for (node, worst) in &outcome.worst_staleness {
        let over = Duration::from_nanos(worst.nanos) > bound;
        stale |= over && !args.ignore_staleness;
        println!(
            "{node}: worst staleness {} ms (key {}){}",
            worst.nanos / 1_000_000,
            worst.key,
            if over { ", over the bound" } else { "" }
        );
    }
    for v in &outcome.violations {
        println!("violation: {v:?}");
    }
    Ok(outcome.violations.is_empty() && outcome.lost_writes == 0 && !stale)
}

/// The server binary: the flag, or `dkvs-server` next to this executable.
fn server_bin(args: &Args) -> Result<PathBuf, ClusterError> {
    let path = match &args.server_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| ClusterError::Io("find this executable".into(), e))?
            .with_file_name("dkvs-server"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(ClusterError::Command(format!(
            "no server binary at {} (build it, or pass --server-bin)",
            path.display()
        )))
    }
}

/// The whole run; `Ok(false)` when a check failed.
fn run(args: &Args) -> Result<bool, ClusterError> {
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(rand::random);
    log::info!("seed {seed} (rerun the same schedule with --seed {seed})");
    let bin = server_bin(args)?;
    let settle_limit = Duration::from_secs(args.settle_secs);
    let mut cluster = Cluster::start(&bin, 2, &args.server_args)?;
    log::info!(
        "master on port {}, slaves on {} and {}; data and logs in {}",
        cluster.master.port,
        cluster.slaves[0].port,
        cluster.slaves[1].port,
        cluster.dir.path().display()
    );
    cluster.wait(
        "both slaves in sync",
        settle_limit,
        Duration::from_millis(20),
        |c| c.in_sync(false),
    )?;
    let clock = Clock::start();
    let workload = Workload {
        keys: args.keys.max(1),
        master_clients: args.master_clients,
        slave_readers: args.slave_readers,
        op_timeout: Duration::from_millis(args.op_timeout_ms),
        think: Duration::from_millis(args.think_ms),
        seed,
    };
    let slave_ports: Vec<u16> = cluster.slaves.iter().map(|s| s.port).collect();
    let clients = Clients::start(&workload, clock, cluster.master.port, &slave_ports);
    let holds = Holds {
        kill_ms: args.kill_ms.clone(),
        pause_ms: args.pause_ms.clone(),
        partition_ms: scaled(&args.partition_secs, 1000),
        slow_ms: scaled(&args.slow_secs, 1000),
    };
    let schedule = faults::schedule(
        seed,
        args.rounds,
        cluster.slaves.len(),
        &holds,
        &args.faults,
    );
    let mut rounds: Vec<RoundRecord> = Vec::new();
    pause(Duration::from_millis(args.calm_ms))?;
    for (i, &fault) in schedule.iter().enumerate() {
        if started.elapsed() >= Duration::from_secs(args.max_secs) {
            log::warn!(
                "time budget of {} s used: stopping after {i} rounds",
                args.max_secs
            );
            break;
        }
        let record = faults::run_round(&mut cluster, fault, clock, settle_limit)?;
        let settle_ms = (record.settled - record.healed) / 1_000_000;
        if record.settle_timed_out {
            log::warn!(
                "round {i}: {fault}: did not settle within {} s\n{}",
                args.settle_secs,
                cluster.describe()
            );
        } else {
            log::info!("round {i}: {fault}: settled {settle_ms} ms after the heal");
        }
        rounds.push(record);
        pause(Duration::from_millis(args.calm_ms))?;
    }
    let mut ops = clients.finish();
    // Settled for the final reads: every slave in sync and caught up.
    if let Err(e) = cluster.wait(
        "both slaves in sync with lag 0 after the last round",
        settle_limit,
        Duration::from_millis(20),
        |c| c.in_sync(true),
    ) {
        log::warn!("{e}\n{}", cluster.describe());
    }
    let finals = final_reads(&cluster, workload.keys, clock)?;
    ops.extend(finals.iter().cloned());
    let outcome = check::check(&ops);
    let replicas = check::compare_replicas(&finals);
    let max_staleness =
        (!args.ignore_staleness).then(|| Duration::from_millis(args.max_staleness_ms));
    let staleness_exceeded: Vec<Node> = match max_staleness {
        Some(bound) => outcome
            .worst_staleness
            .iter()
            .filter(|(_, w)| Duration::from_nanos(w.nanos) > bound)
            .map(|(node, _)| *node)
            .collect(),
        None => Vec::new(),
    };
    let unsettled = rounds.iter().filter(|r| r.settle_timed_out).count();
    let text = report::render(&report::Run {
        seed,
        rounds: &rounds,
        ops: &ops,
        check: &outcome,
        replicas: &replicas,
        max_staleness,
        staleness_exceeded: &staleness_exceeded,
        elapsed: started.elapsed(),
    });
    print!("{text}");
    let passed = outcome.violations.is_empty()
        && replicas.is_empty()
        && staleness_exceeded.is_empty()
        && unsettled == 0;
    if unsettled > 0 {
        println!(
            "{unsettled} round(s) did not settle within {} s: FAIL",
            args.settle_secs
        );
    }
    let history = args
        .history
        .clone()
        .or_else(|| (!passed).then(|| cluster.dir.path().join("history.txt")));
    if let Some(path) = history {
        match report::write_history(&path, &ops) {
            Ok(()) => println!("history written to {}", path.display()),
            Err(e) => eprintln!("dkvs-chaos: cannot write {}: {e}", path.display()),
        }
    }
    if !passed || args.keep_dir {
        cluster.dir.keep();
        println!(
            "kept {} (data dirs and server logs)",
            cluster.dir.path().display()
        );
    }
    if !passed {
        println!("reproduce the schedule with --seed {seed}");
    }
    Ok(passed)
}

/// Read every key at the master and at each slave, once each, retrying what
/// got no answer (or a refusal) for a few seconds.
fn final_reads(cluster: &Cluster, keys: u32, clock: Clock) -> Result<Vec<Op>, ClusterError> {
    let timeout = Duration::from_secs(2);
    let servers = std::iter::once((Node::Master, &cluster.master)).chain(
        cluster
            .slaves
            .iter()
            .enumerate()
            .map(|(i, s)| (Node::Slave(i as u8), s)),
    );
    let mut finals = Vec::new();
    for (node, server) in servers {
        let mut client = None;
        for key in 0..keys {
            let mut last = None;
            // Bounded: 50 attempts, 100 ms apart.
            for _ in 0..50 {
                if client.is_none() {
                    client = server.client(timeout).ok();
                }
                if let Some(c) = client.as_mut() {
                    let op = workload::execute(c, FINAL_CLIENT, node, key, Request::Get, clock);
                    let answered = matches!(op.outcome, Outcome::Found { .. } | Outcome::NotFound);
                    if !answered {
                        client = None;
                    }
                    last = Some(op);
                    if answered {
                        break;
                    }
                }
                pause(Duration::from_millis(100))?;
            }
            match last {
                Some(op) => finals.push(op),
                None => log::warn!("{node} never accepted a connection for the final reads"),
            }
        }
    }
    Ok(finals)
}
