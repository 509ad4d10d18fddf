//! Orchestrating a run: open the sockets, hand them to reactor threads, drive the phases
//! (preload, warmup, measurement) and print a progress line every second meanwhile.

use std::thread;
use std::time::{Duration, Instant};

use crate::cli::{Config, Distribution, Protocol};
use crate::net;
use crate::reactor::{Phase, PhaseKind, Progress, Worker};
use crate::report::{RunInfo, Stats, group};
use crate::workload::{KeyDistribution, Zipf};

/// How often the main thread checks whether the workers are done.
const JOIN_POLL: Duration = Duration::from_millis(5);

/// The result of the measured phase.
pub struct Outcome {
    /// The run's settings.
    pub info: RunInfo,
    /// Merged statistics of all threads.
    pub stats: Stats,
    /// From the start of measurement to the last finished request.
    pub elapsed: Duration,
}

/// Run the whole load; errors are messages for the user.
pub fn run(cfg: &Config) -> Result<Outcome, String> {
    let servers = dkvs::client::parse_servers(&cfg.host, cfg.port)?;
    let addrs = servers
        .iter()
        .map(|(host, port)| net::resolve(host, *port))
        .collect::<Result<Vec<_>, _>>()?;
    // Start on the first server that accepts a connection (a cluster's dead
    // members are skipped); the rest are where failed connections move on to.
    let first = addrs
        .iter()
        .position(|a| std::net::TcpStream::connect_timeout(a, cfg.timeout).is_ok())
        .unwrap_or(0);
    let addrs: Vec<_> = addrs[first..]
        .iter()
        .chain(&addrs[..first])
        .copied()
        .collect();
    let addr = addrs[0];
    let sockets = net::open(cfg, addr)?;
    let distribution = match cfg.distribution {
        Distribution::Uniform => KeyDistribution::Uniform,
        Distribution::Zipf => KeyDistribution::Zipf(Zipf::new(cfg.keyspace, cfg.zipf_theta)),
    };
    let mut per_thread: Vec<Vec<net::Socket>> = (0..cfg.threads).map(|_| Vec::new()).collect();
    for (i, socket) in sockets.into_iter().enumerate() {
        per_thread[i % cfg.threads].push(socket);
    }
    let mut workers = Vec::with_capacity(cfg.threads);
    for (t, sockets) in per_thread.into_iter().enumerate() {
        let worker = Worker::new(cfg, addrs.clone(), t, sockets, distribution.clone())
            .map_err(|e| format!("cannot set up reactor thread {t}: {e}"))?;
        workers.push(worker);
    }
    let progress: Vec<Progress> = (0..cfg.threads).map(|_| Progress::default()).collect();

    if cfg.preload {
        let threads = cfg.threads as u64;
        let (stats, elapsed) = run_phase(
            cfg,
            &mut workers,
            &progress,
            PhaseKind::Preload,
            None,
            |t| {
                // Thread t writes keys t, t + threads, t + 2 * threads, ...
                Some((cfg.keyspace + threads - 1 - t as u64) / threads)
            },
        )?;
        eprintln!(
            "preload: {} keys written in {:.2} s, {} errors",
            group(stats.sets),
            elapsed.as_secs_f64(),
            group(stats.errors.total())
        );
    }
    if !cfg.warmup.is_zero() {
        let (stats, elapsed) = run_phase(
            cfg,
            &mut workers,
            &progress,
            PhaseKind::Warmup,
            Some(cfg.warmup),
            |_| None,
        )?;
        eprintln!(
            "warmup: {} ops in {:.2} s, {} errors (not counted)",
            group(stats.ops),
            elapsed.as_secs_f64(),
            group(stats.errors.total())
        );
    }
    let threads = cfg.threads as u64;
    let (stats, elapsed) = run_phase(
        cfg,
        &mut workers,
        &progress,
        PhaseKind::Measure,
        cfg.duration,
        |t| {
            cfg.ops
                .map(|n| n / threads + u64::from((t as u64) < n % threads))
        },
    )?;
    let distribution = match cfg.distribution {
        Distribution::Uniform => "uniform".to_string(),
        Distribution::Zipf => format!("zipf({})", cfg.zipf_theta),
    };
    let info = RunInfo {
        protocol: match cfg.protocol {
            Protocol::Dkvs => "dkvs",
            Protocol::Resp => "resp",
        },
        transport: if cfg.udp { "udp" } else { "tcp" },
        target: addr.to_string(),
        connections: cfg.connections,
        pipeline: cfg.pipeline,
        threads: cfg.threads,
        get_ratio: cfg.get_ratio,
        keyspace: cfg.keyspace,
        distribution,
        key_size: cfg.key_size,
        value_size: cfg.value_size,
        resp_wait: cfg.resp_wait,
        txn_keys: cfg.txn_keys,
        follow_redirects: cfg.follow_redirects && cfg.protocol == Protocol::Dkvs,
    };
    Ok(Outcome {
        info,
        stats,
        elapsed,
    })
}

/// Run one phase on every worker at once; `quota(t)` is thread t's share of requests.
fn run_phase(
    cfg: &Config,
    workers: &mut [Worker],
    progress: &[Progress],
    kind: PhaseKind,
    duration: Option<Duration>,
    quota: impl Fn(usize) -> Option<u64>,
) -> Result<(Stats, Duration), String> {
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let total_quota: Option<u64> = (0..workers.len()).map(&quota).sum();
    thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .zip(progress)
            .enumerate()
            .map(|(t, (worker, progress))| {
                let phase = Phase {
                    kind,
                    deadline,
                    quota: quota(t),
                };
                scope.spawn(move || worker.run(phase, progress))
            })
            .collect();
        let mut next_report = start + Duration::from_secs(1);
        let mut last_ops = 0u64;
        let mut last_at = start;
        while !handles.iter().all(|h| h.is_finished()) {
            thread::sleep(JOIN_POLL);
            let now = Instant::now();
            if now < next_report {
                continue;
            }
            next_report += Duration::from_secs(1);
            let ops: u64 = progress
                .iter()
                .map(|p| p.ops.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            let errors: u64 = progress
                .iter()
                .map(|p| p.errors.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            let rate = (ops - last_ops.min(ops)) as f64 / now.duration_since(last_at).as_secs_f64();
            (last_ops, last_at) = (ops, now);
            if !cfg.quiet {
                progress_line(
                    kind,
                    now.duration_since(start),
                    rate,
                    ops,
                    errors,
                    total_quota,
                    cfg.keyspace,
                );
            }
        }
        let mut merged = Stats::new();
        let mut end = start;
        let mut first_error = None;
        for handle in handles {
            match handle.join() {
                Ok(Ok((stats, finished_at))) => {
                    merged.merge(&stats);
                    end = end.max(finished_at);
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert_with(|| e.to_string());
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| "a load thread panicked".to_string());
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok((merged, end.duration_since(start))),
        }
    })
}

fn progress_line(
    kind: PhaseKind,
    elapsed: Duration,
    rate: f64,
    ops: u64,
    errors: u64,
    quota: Option<u64>,
    keyspace: u64,
) {
    let secs = elapsed.as_secs_f64().round() as u64;
    match kind {
        PhaseKind::Preload => eprintln!(
            "[preload {secs:>3}s] {}/{} keys written, {} errors",
            group(ops),
            group(quota.unwrap_or(keyspace)),
            group(errors)
        ),
        PhaseKind::Warmup => eprintln!(
            "[warmup  {secs:>3}s] {} ops/s, {} errors",
            group(rate.round() as u64),
            group(errors)
        ),
        PhaseKind::Measure => eprintln!(
            "[{secs:>4}s] {} ops/s, {} ops total, {} errors",
            group(rate.round() as u64),
            group(ops),
            group(errors)
        ),
    }
}
