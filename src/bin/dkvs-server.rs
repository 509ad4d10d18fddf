//! `dkvs-server`: serve the dkvs protocol over TCP and UDP.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dkvs::logging::{self, LogLevel};
use dkvs::protocol::DEFAULT_MAX_VALUE_BYTES;
use dkvs::server::{Config, Server};
use log::{error, info};

/// A replicated key-value store server: one thread, one reactor, TCP and UDP on one port.
#[derive(Parser, Debug)]
#[command(name = "dkvs-server", version, about)]
struct Args {
    /// Address to bind.
    #[arg(short = 's', long = "host", default_value = "127.0.0.1")]
    host: String,
    /// Port for both TCP and UDP (0 picks a free port and prints it).
    #[arg(short = 'p', long = "port", default_value_t = 9099)]
    port: u16,
    /// Serve TCP only.
    #[arg(short = 't', long = "tcp", conflicts_with = "udp")]
    tcp: bool,
    /// Serve UDP only.
    #[arg(short = 'u', long = "udp")]
    udp: bool,
    /// Run as a slave of the master at HOST (registers with it and follows its writes).
    #[arg(short = 'm', long = "mhost")]
    mhost: Option<String>,
    /// The master's port.
    #[arg(
        short = 'q',
        long = "qport",
        default_value_t = 9099,
        requires = "mhost"
    )]
    qport: u16,
    /// Master: milliseconds a slave has to vote or acknowledge before it is evicted.
    #[arg(long = "tpc-timeout-ms", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    tpc_timeout_ms: u64,
    /// Master: refuse writes while fewer than N slaves are in sync.
    #[arg(long = "min-slaves", default_value_t = 0)]
    min_slaves: usize,
    /// Master: MiB of recent writes kept so a briefly disconnected slave can
    /// catch up without a full snapshot.
    #[arg(long = "repl-backlog-mb", default_value_t = 8)]
    repl_backlog_mb: usize,
    /// Log level: error, info or debug (also 0, 1, 2).
    #[arg(short = 'l', long = "log", default_value = "info", value_parser = LogLevel::parse)]
    log: LogLevel,
    /// Log to this file instead of standard error.
    #[arg(long = "logfile")]
    logfile: Option<PathBuf>,
    /// Largest value accepted, in bytes.
    #[arg(long = "max-value-size", default_value_t = DEFAULT_MAX_VALUE_BYTES as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_value_size: u32,
    /// Answer the Redis protocol (RESP2/RESP3) on the TCP port: on or off.
    #[arg(long = "resp", default_value = "on", value_parser = ["on", "off"])]
    resp: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = logging::init(args.log, args.logfile.as_deref()) {
        eprintln!("dkvs-server: {e}");
        return ExitCode::from(1);
    }
    let config = Config {
        host: args.host,
        port: args.port,
        tcp: !args.udp,
        udp: !args.tcp,
        max_value_bytes: args.max_value_size as usize,
        master: args.mhost.map(|host| (host, args.qport)),
        tpc_timeout_ms: args.tpc_timeout_ms,
        min_slaves: args.min_slaves,
        repl_backlog_bytes: args.repl_backlog_mb.saturating_mul(1 << 20),
        resp: args.resp == "on",
    };
    let mut server = match Server::bind(&config) {
        Ok(server) => server,
        Err(e) => {
            error!("{e}");
            eprintln!("dkvs-server: {e}");
            return ExitCode::from(1);
        }
    };
    let ready = server.describe();
    info!("{ready}");
    // Scripts and tests wait for this line (and read the port from it when -p 0).
    println!("{ready}");
    let _ = std::io::stdout().flush();
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("dkvs-server: {e}");
            ExitCode::from(1)
        }
    }
}
