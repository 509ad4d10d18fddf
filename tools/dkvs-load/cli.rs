//! Command-line flags and the checks between them, turned into one validated [`Config`].

use std::time::Duration;

use ::dkvs::protocol::{HEADER_LEN, MAX_KEY_BYTES, MAX_UDP_FRAME_BYTES};
use clap::{Parser, ValueEnum};

use crate::workload::decimal_digits;

/// Wire protocol to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// dkvs binary frames.
    Dkvs,
    /// Redis RESP2 (SET/GET), to compare against redis-server with the same client.
    Resp,
}

/// How keys are picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Distribution {
    /// Every key equally likely.
    Uniform,
    /// YCSB-style zipfian: a few hot keys (see --zipf-theta).
    Zipf,
}

/// Longest pipeline accepted; bounds the in-flight bookkeeping and the UDP request-id space.
pub const MAX_PIPELINE: usize = 4096;
/// Most connections accepted; well above what one process should open on loopback.
pub const MAX_CONNECTIONS: usize = 50_000;

/// Load generator for dkvs (and Redis, for side-by-side comparisons).
#[derive(Debug, Parser)]
#[command(name = "dkvs-load", version, about, long_about = None)]
pub struct Args {
    /// Server host name or address, or several servers of a cluster as
    /// `host[:port],host[:port],…`: the run starts on the first that accepts a
    /// connection, and a connection that fails reconnects to the next.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Server port [default: 9099 for dkvs, 6379 for resp].
    #[arg(long)]
    pub port: Option<u16>,
    /// File holding the server's password (dkvs `--requirepass-file`, Redis
    /// `requirepass`; one trailing newline dropped): every TCP connection,
    /// reconnections and redirect targets included, sends AUTH first.
    #[arg(long, value_name = "PATH")]
    pub password_file: Option<std::path::PathBuf>,
    /// Connections (UDP sockets with --udp), spread over --threads reactors.
    #[arg(short = 'c', long, default_value_t = 50)]
    pub connections: usize,
    /// Requests outstanding per connection (1 = no pipelining).
    #[arg(short = 'P', long, default_value_t = 1)]
    pub pipeline: usize,
    /// Fraction of operations that are GETs (the rest are SET/PUT), 0.0..=1.0.
    #[arg(long, default_value_t = 0.9)]
    pub get_ratio: f64,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub keyspace: u64,
    /// Key popularity.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// Skew of --distribution zipf, strictly between 0 and 1.
    #[arg(long, default_value_t = 0.99)]
    pub zipf_theta: f64,
    /// Bytes per value written.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Bytes per key (`key:000000012345` at 16).
    #[arg(long, default_value_t = 16)]
    pub key_size: usize,
    /// Seconds to measure [default: 10 when --ops is not given].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Operations to measure (whichever of --duration and --ops ends first stops the run).
    #[arg(long, value_name = "N")]
    pub ops: Option<u64>,
    /// Seconds of load before measuring starts (not counted).
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    pub warmup: f64,
    /// Write every key of the keyspace once before warmup and measurement.
    #[arg(long)]
    pub preload: bool,
    /// Use UDP: one socket per connection, lost datagrams retried (dkvs only).
    #[arg(long)]
    pub udp: bool,
    /// UDP resends before a request counts as timed out.
    #[arg(long, default_value_t = 3)]
    pub udp_retries: u32,
    /// Wire protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Dkvs)]
    pub protocol: Protocol,
    /// Count a slave's REDIRECT answer to a write as an error instead of sending the write
    /// (and that connection's later writes) to the master it names.
    #[arg(long)]
    pub no_follow_redirects: bool,
    /// With --protocol resp: send `WAIT N 1000` after each SET; the pair is one operation.
    #[arg(long, value_name = "N")]
    pub resp_wait: Option<u32>,
    /// Reactor threads; connections are split evenly between them.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Make each write a transaction of N consecutive keys (dkvs TXN of N PUTs; Redis
    /// MULTI, N SETs, EXEC); 1: plain writes. At most 100.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub txn_keys: usize,
    /// Milliseconds a request (or a connect) may take before it counts as timed out.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Seed for key and operation choice [default: random].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the result as one JSON object, the last thing on stdout (summary goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// No progress lines.
    #[arg(short, long)]
    pub quiet: bool,
}

/// A validated run configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Server host.
    pub host: String,
    /// The password every TCP connection sends AUTH with (`--password-file`).
    pub password: Option<::dkvs::client::ClientPassword>,
    /// Server port.
    pub port: u16,
    /// Wire protocol.
    pub protocol: Protocol,
    /// UDP instead of TCP.
    pub udp: bool,
    /// Connections in total.
    pub connections: usize,
    /// Requests outstanding per connection.
    pub pipeline: usize,
    /// Reactor threads.
    pub threads: usize,
    /// Fraction of GETs.
    pub get_ratio: f64,
    /// Distinct keys.
    pub keyspace: u64,
    /// Key popularity.
    pub distribution: Distribution,
    /// Zipf skew.
    pub zipf_theta: f64,
    /// Bytes per key.
    pub key_size: usize,
    /// Bytes per value.
    pub value_size: usize,
    /// Measurement time limit.
    pub duration: Option<Duration>,
    /// Measurement operation count.
    pub ops: Option<u64>,
    /// Unmeasured load first.
    pub warmup: Duration,
    /// Write the keyspace first.
    pub preload: bool,
    /// Per-request (and per-connect) timeout.
    pub timeout: Duration,
    /// UDP resends per request.
    pub udp_retries: u32,
    /// Replicas each Redis write waits for.
    pub resp_wait: Option<u32>,
    /// Keys per write transaction; 1: plain writes.
    pub txn_keys: usize,
    /// Send writes a slave redirects to the master it names (dkvs protocol only).
    pub follow_redirects: bool,
    /// Machine-readable output.
    pub json: bool,
    /// RNG seed.
    pub seed: u64,
    /// Suppress progress lines.
    pub quiet: bool,
}

fn seconds(name: &str, secs: f64, allow_zero: bool) -> Result<Duration, String> {
    let ok = secs.is_finite() && (secs > 0.0 || (allow_zero && secs == 0.0)) && secs < 1e9;
    if !ok {
        let want = if allow_zero {
            "0 or more"
        } else {
            "more than 0"
        };
        return Err(format!("--{name} must be {want} seconds, got {secs}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl Args {
    /// Check the flags against each other; the message names the offending flags.
    pub fn validate(self) -> Result<Config, String> {
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(format!(
                "--connections must be 1..={MAX_CONNECTIONS}, got {}",
                self.connections
            ));
        }
        if self.pipeline == 0 || self.pipeline > MAX_PIPELINE {
            return Err(format!(
                "--pipeline must be 1..={MAX_PIPELINE}, got {}",
                self.pipeline
            ));
        }
        if self.threads == 0 || self.threads > self.connections {
            return Err(format!(
                "--threads must be 1..=--connections ({}), got {}",
                self.connections, self.threads
            ));
        }
        if !(0.0..=1.0).contains(&self.get_ratio) {
            return Err(format!(
                "--get-ratio must be between 0.0 and 1.0, got {}",
                self.get_ratio
            ));
        }
        if self.keyspace == 0 {
            return Err("--keyspace must be at least 1".to_string());
        }
        if !(self.zipf_theta > 0.0 && self.zipf_theta < 1.0) {
            return Err(format!(
                "--zipf-theta must be strictly between 0 and 1, got {}",
                self.zipf_theta
            ));
        }
        let digits = decimal_digits(self.keyspace - 1);
        if self.key_size < digits || self.key_size > MAX_KEY_BYTES {
            return Err(format!(
                "--key-size must be {digits}..={MAX_KEY_BYTES} to number {} keys, got {}",
                self.keyspace, self.key_size
            ));
        }
        if self.value_size > u32::MAX as usize {
            return Err(format!("--value-size {} is too large", self.value_size));
        }
        let password = match &self.password_file {
            None => None,
            Some(_) if self.udp => {
                return Err("--password-file needs TCP: UDP cannot authenticate".to_string());
            }
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| ::dkvs::client::ClientPassword::from_file_contents(&bytes))
                    .map_err(|e| format!("--password-file {}: {e}", path.display()))?,
            ),
        };
        if self.udp && self.protocol == Protocol::Resp {
            return Err("--udp works with --protocol dkvs only (Redis speaks TCP)".to_string());
        }
        if self.resp_wait.is_some() && self.protocol != Protocol::Resp {
            return Err("--resp-wait needs --protocol resp".to_string());
        }
        if !(1..=100).contains(&self.txn_keys) {
            return Err(format!("--txn-keys must be 1..=100, got {}", self.txn_keys));
        }
        if self.txn_keys > 1
            && self.udp
            && HEADER_LEN + 4 + self.txn_keys * (7 + self.key_size + self.value_size)
                > MAX_UDP_FRAME_BYTES
        {
            return Err(format!(
                "with --udp a transaction must fit one datagram ({MAX_UDP_FRAME_BYTES} bytes): \
                 lower --txn-keys, --key-size or --value-size"
            ));
        }
        if self.udp && HEADER_LEN + self.key_size + self.value_size > MAX_UDP_FRAME_BYTES {
            return Err(format!(
                "with --udp a request must fit one datagram ({MAX_UDP_FRAME_BYTES} bytes): \
                 --key-size + --value-size must be at most {}",
                MAX_UDP_FRAME_BYTES - HEADER_LEN
            ));
        }
        if self.timeout_ms == 0 {
            return Err("--timeout-ms must be at least 1".to_string());
        }
        if self.ops == Some(0) {
            return Err("--ops must be at least 1".to_string());
        }
        let duration = match (self.duration, self.ops) {
            (Some(secs), _) => Some(seconds("duration", secs, false)?),
            (None, Some(_)) => None,
            (None, None) => Some(Duration::from_secs(10)),
        };
        let warmup = seconds("warmup", self.warmup, true)?;
        let port = self.port.unwrap_or(match self.protocol {
            Protocol::Dkvs => 9099,
            Protocol::Resp => 6379,
        });
        if port == 0 {
            return Err("--port must not be 0".to_string());
        }
        Ok(Config {
            host: self.host,
            port,
            protocol: self.protocol,
            udp: self.udp,
            connections: self.connections,
            pipeline: self.pipeline,
            threads: self.threads,
            get_ratio: self.get_ratio,
            keyspace: self.keyspace,
            distribution: self.distribution,
            zipf_theta: self.zipf_theta,
            key_size: self.key_size,
            value_size: self.value_size,
            duration,
            ops: self.ops,
            warmup,
            preload: self.preload,
            timeout: Duration::from_millis(self.timeout_ms),
            udp_retries: self.udp_retries,
            resp_wait: self.resp_wait,
            txn_keys: self.txn_keys,
            follow_redirects: !self.no_follow_redirects,
            password,
            json: self.json,
            seed: self.seed.unwrap_or_else(rand::random),
            quiet: self.quiet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn config(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["dkvs-load"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv)
            .map_err(|e| e.to_string())
            .and_then(Args::validate)
    }

    #[test]
    fn defaults() {
        let Ok(c) = config(&[]) else {
            panic!("defaults must validate")
        };
        assert_eq!(c.port, 9099);
        assert_eq!(c.duration, Some(Duration::from_secs(10)));
        assert_eq!(c.ops, None);
        assert_eq!((c.connections, c.pipeline, c.threads), (50, 1, 1));
        assert_eq!((c.key_size, c.value_size), (16, 100));
        assert!(
            c.follow_redirects,
            "redirects are followed unless told otherwise"
        );
        let Ok(no_follow) = config(&["--no-follow-redirects"]) else {
            panic!("--no-follow-redirects must validate")
        };
        assert!(!no_follow.follow_redirects);
        let Ok(resp) = config(&["--protocol", "resp"]) else {
            panic!("resp must validate")
        };
        assert_eq!(resp.port, 6379);
    }

    #[test]
    fn ops_alone_means_no_time_limit() {
        let Ok(c) = config(&["--ops", "2000"]) else {
            panic!("--ops must validate")
        };
        assert_eq!((c.ops, c.duration), (Some(2000), None));
        let Ok(both) = config(&["--ops", "5", "--duration", "1.5"]) else {
            panic!("both must validate")
        };
        assert_eq!(both.duration, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn clap_rejects_malformed_flags() {
        for bad in [
            &["--distribution", "pareto"][..],
            &["--protocol", "memcache"],
            &["--connections", "-1"],
            &["--pipeline", "many"],
            &["--no-such-flag"],
        ] {
            let mut argv = vec!["dkvs-load"];
            argv.extend_from_slice(bad);
            let Err(e) = Args::try_parse_from(argv) else {
                panic!("{bad:?} should not parse")
            };
            assert_ne!(e.kind(), ErrorKind::DisplayHelp);
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn validation_rejects_inconsistent_flags() {
        let cases: &[(&[&str], &str)] = &[
            (&["--connections", "0"], "--connections"),
            (&["--pipeline", "0"], "--pipeline"),
            (&["--pipeline", "5000"], "--pipeline"),
            (&["--threads", "3", "--connections", "2"], "--threads"),
            (&["--threads", "0"], "--threads"),
            (&["--get-ratio", "1.5"], "--get-ratio"),
            (&["--get-ratio", "NaN"], "--get-ratio"),
            (&["--keyspace", "0"], "--keyspace"),
            (&["--zipf-theta", "1.0"], "--zipf-theta"),
            (&["--keyspace", "1000000", "--key-size", "5"], "--key-size"),
            (&["--key-size", "0"], "--key-size"),
            (&["--udp", "--protocol", "resp"], "--udp"),
            (&["--resp-wait", "1"], "--resp-wait"),
            (&["--udp", "--value-size", "70000"], "--udp"),
            (&["--duration", "0"], "--duration"),
            (&["--duration=-3"], "--duration"),
            (&["--warmup=-1"], "--warmup"),
            (&["--ops", "0"], "--ops"),
            (&["--timeout-ms", "0"], "--timeout-ms"),
        ];
        for (args, flag) in cases {
            match config(args) {
                Ok(_) => panic!("{args:?} should be rejected"),
                Err(msg) => assert!(msg.contains(flag), "{args:?}: message {msg:?}"),
            }
        }
    }

    #[test]
    fn valid_combinations() {
        for args in [
            &["--protocol", "resp", "--resp-wait", "1", "--pipeline", "16"][..],
            &["--udp", "--pipeline", "4096", "--threads", "2"],
            &[
                "--distribution",
                "zipf",
                "--keyspace",
                "1",
                "--key-size",
                "1",
            ],
            &["--get-ratio", "0", "--preload", "--warmup", "0.5", "--json"],
        ] {
            if let Err(e) = config(args) {
                panic!("{args:?} rejected: {e}");
            }
        }
    }

    #[test]
    fn a_password_file_is_read_and_needs_tcp() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").expect("write");
        let path = path.display().to_string();
        let cfg = config(&["--password-file", &path]).expect("valid");
        let password = cfg.password.expect("password");
        assert_eq!(password.0, b"s3cret");
        assert_eq!(format!("{password:?}"), "ClientPassword(..)");
        let err = config(&["--password-file", &path, "--udp"]).unwrap_err();
        assert!(err.contains("UDP cannot authenticate"), "{err}");
        let err = config(&["--password-file", "/nonexistent/pw"]).unwrap_err();
        assert!(err.contains("--password-file /nonexistent/pw"), "{err}");
        assert!(config(&[]).expect("valid").password.is_none());
    }
}
