//! dkvs-load: a load generator for dkvs (and Redis, for side-by-side comparisons).
//!
//! Many connections from one process on mio reactors, a configurable op mix, key distribution,
//! value size and pipelining depth, over TCP or UDP; reports throughput, latency percentiles
//! and errors by kind, optionally as JSON.

mod cli;
mod dkvs;
mod net;
mod reactor;
mod report;
mod resp;
mod run;
mod workload;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, error::ErrorKind};

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let cfg = match args.validate() {
        Ok(cfg) => cfg,
        // Through clap, so inconsistent flags look and exit (status 2) like malformed ones.
        Err(msg) => cli::Args::command()
            .error(ErrorKind::ArgumentConflict, msg)
            .exit(),
    };
    match run::run(&cfg) {
        Ok(outcome) => {
            let summary = report::human(&outcome.info, &outcome.stats, outcome.elapsed);
            if cfg.json {
                eprint!("{summary}");
                println!(
                    "{}",
                    report::json(&outcome.info, &outcome.stats, outcome.elapsed)
                );
            } else {
                print!("{summary}");
            }
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("dkvs-load: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
