//! Counting a run and reporting it: per-thread statistics, their merge, the human summary and
//! the one-line JSON object.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::dkvs::status_name;

/// Longest latency the histogram resolves; anything slower is recorded as this (100 s).
const MAX_LATENCY_NS: u64 = 100_000_000_000;

/// Failed operations and connection trouble, by kind.
#[derive(Debug, Clone)]
pub struct ErrorCounts {
    /// dkvs responses with a failing status, indexed by status byte.
    pub status: [u64; 256],
    /// Requests that got no response within `--timeout-ms`.
    pub timeout: u64,
    /// Connections that failed: refused, reset, closed by the server, connect timed out.
    pub connection: u64,
    /// Requests in flight on a connection when it failed.
    pub lost: u64,
    /// Responses that could not be parsed or did not match the request they answer.
    pub protocol: u64,
    /// Redis `-ERR` replies.
    pub resp_error: u64,
    /// `WAIT` replies acknowledging fewer replicas than `--resp-wait` asked for.
    pub wait_short: u64,
    /// Connections whose redirect target could not be used (not `host:port`, unresolvable,
    /// unreachable): counted once per connection, which then stops following redirects.
    pub redirect_failed: u64,
}

impl Default for ErrorCounts {
    fn default() -> Self {
        ErrorCounts {
            status: [0; 256],
            timeout: 0,
            connection: 0,
            lost: 0,
            protocol: 0,
            resp_error: 0,
            wait_short: 0,
            redirect_failed: 0,
        }
    }
}

impl ErrorCounts {
    /// Every error of every kind.
    pub fn total(&self) -> u64 {
        self.status.iter().sum::<u64>()
            + self.timeout
            + self.connection
            + self.lost
            + self.protocol
            + self.resp_error
            + self.wait_short
            + self.redirect_failed
    }

    /// Errors that ended a request (everything but connection-level failures themselves).
    pub fn resolved_requests(&self) -> u64 {
        self.total() - self.connection - self.redirect_failed
    }

    fn merge(&mut self, other: &ErrorCounts) {
        for (mine, theirs) in self.status.iter_mut().zip(other.status.iter()) {
            *mine += theirs;
        }
        self.timeout += other.timeout;
        self.connection += other.connection;
        self.lost += other.lost;
        self.protocol += other.protocol;
        self.resp_error += other.resp_error;
        self.wait_short += other.wait_short;
        self.redirect_failed += other.redirect_failed;
    }

    /// Named counts: the fixed kinds always, status codes only when seen.
    pub fn by_kind(&self) -> Vec<(String, u64)> {
        let mut kinds = vec![
            ("timeout".to_string(), self.timeout),
            ("connection".to_string(), self.connection),
            ("lost".to_string(), self.lost),
            ("protocol".to_string(), self.protocol),
            ("resp_error".to_string(), self.resp_error),
            ("wait_short".to_string(), self.wait_short),
            ("redirect_failed".to_string(), self.redirect_failed),
        ];
        for (status, &count) in self.status.iter().enumerate() {
            if count > 0 {
                kinds.push((status_name(status as u8), count));
            }
        }
        kinds
    }
}

/// What one thread counted in one phase; merged across threads at the end.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latency of successful operations, send to response, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// Operations that succeeded (including GET misses).
    pub ops: u64,
    /// Successful reads.
    pub gets: u64,
    /// Successful reads of absent keys.
    pub get_misses: u64,
    /// Successful writes.
    pub sets: u64,
    /// UDP requests sent again after no reply.
    pub udp_retries: u64,
    /// UDP responses that matched no outstanding request (late duplicates).
    pub udp_stale: u64,
    /// REDIRECT answers followed: the write sent again to the master named (whatever its end).
    pub redirects: u64,
    /// Why following a redirect first failed, if it did.
    pub redirect_error: Option<String>,
    /// Failures by kind.
    pub errors: ErrorCounts,
}

impl Stats {
    /// Empty statistics.
    pub fn new() -> Stats {
        let latency_ns = match Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3) {
            Ok(h) => h,
            // The bounds are constants that hdrhistogram accepts; this cannot fail.
            Err(e) => unreachable!("histogram bounds rejected: {e}"),
        };
        Stats {
            latency_ns,
            ops: 0,
            gets: 0,
            get_misses: 0,
            sets: 0,
            udp_retries: 0,
            udp_stale: 0,
            redirects: 0,
            redirect_error: None,
            errors: ErrorCounts::default(),
        }
    }

    /// Count a connection that cannot follow redirects, keeping the first reason given.
    pub fn redirect_failed(&mut self, reason: impl FnOnce() -> String) {
        self.errors.redirect_failed += 1;
        if self.redirect_error.is_none() {
            self.redirect_error = Some(reason());
        }
    }

    /// Record one successful operation.
    #[inline]
    pub fn record_ok(&mut self, is_get: bool, miss: bool, latency: Duration) {
        self.ops += 1;
        if is_get {
            self.gets += 1;
            self.get_misses += miss as u64;
        } else {
            self.sets += 1;
        }
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.latency_ns.saturating_record(ns);
    }

    /// Requests that ended, successfully or not; compared against `--ops`.
    pub fn resolved(&self) -> u64 {
        self.ops + self.errors.resolved_requests()
    }

    /// Fold another thread's statistics into these.
    pub fn merge(&mut self, other: &Stats) {
        // Both histograms share bounds, so adding cannot fail; saturate rather than lose counts.
        if self.latency_ns.add(&other.latency_ns).is_err() {
            for v in other.latency_ns.iter_recorded() {
                self.latency_ns
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        self.ops += other.ops;
        self.gets += other.gets;
        self.get_misses += other.get_misses;
        self.sets += other.sets;
        self.udp_retries += other.udp_retries;
        self.udp_stale += other.udp_stale;
        self.redirects += other.redirects;
        if self.redirect_error.is_none() {
            self.redirect_error.clone_from(&other.redirect_error);
        }
        self.errors.merge(&other.errors);
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// The run's settings, echoed in the report so a result file explains itself.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// `dkvs` or `resp`.
    pub protocol: &'static str,
    /// `tcp` or `udp`.
    pub transport: &'static str,
    /// `host:port` as resolved.
    pub target: String,
    /// Connections (UDP sockets) in total.
    pub connections: usize,
    /// Requests outstanding per connection.
    pub pipeline: usize,
    /// Reactor threads.
    pub threads: usize,
    /// Fraction of operations that are reads.
    pub get_ratio: f64,
    /// Distinct keys.
    pub keyspace: u64,
    /// `uniform` or `zipf(theta)`.
    pub distribution: String,
    /// Bytes per key.
    pub key_size: usize,
    /// Bytes per value.
    pub value_size: usize,
    /// Replicas each Redis write waits for, if any.
    pub resp_wait: Option<u32>,
    /// Keys per write transaction (1: plain writes).
    pub txn_keys: usize,
    /// Whether writes a slave redirects are sent to the master.
    pub follow_redirects: bool,
}

/// Latency figures in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Slowest.
    pub max_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

impl Percentiles {
    /// Percentiles of a nanosecond histogram; all zero when it is empty.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles {
                p50_us: 0.0,
                p90_us: 0.0,
                p99_us: 0.0,
                p999_us: 0.0,
                max_us: 0.0,
                mean_us: 0.0,
            };
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

fn ops_per_sec(ops: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { ops as f64 / secs } else { 0.0 }
}

/// Thousands separators, for the human summary.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The multi-line summary for people.
pub fn human(info: &RunInfo, stats: &Stats, elapsed: Duration) -> String {
    let p = Percentiles::of(&stats.latency_ns);
    let mut out = String::new();
    let wait = match info.resp_wait {
        Some(n) => format!(" + WAIT {n}"),
        None => String::new(),
    };
    let txn = if info.txn_keys > 1 {
        format!(", writes are {}-key transactions", info.txn_keys)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "dkvs-load: {}{wait} over {} to {}: {} connections x pipeline {} on {} thread(s); \
         get ratio {:.2}, {} keys ({}), {} B keys, {} B values{txn}",
        info.protocol,
        info.transport,
        info.target,
        info.connections,
        info.pipeline,
        info.threads,
        info.get_ratio,
        group(info.keyspace),
        info.distribution,
        info.key_size,
        info.value_size,
    );
    let _ = writeln!(
        out,
        "throughput  {} ops in {:.2} s = {} ops/s  (gets {}, misses {}; sets {})",
        group(stats.ops),
        elapsed.as_secs_f64(),
        group(ops_per_sec(stats.ops, elapsed).round() as u64),
        group(stats.gets),
        group(stats.get_misses),
        group(stats.sets),
    );
    let _ = writeln!(
        out,
        "latency us  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1})",
        p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us, p.mean_us
    );
    let total = stats.errors.total();
    let _ = write!(out, "errors      {}", group(total));
    if total > 0 {
        let kinds: Vec<String> = stats
            .errors
            .by_kind()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {}", group(n)))
            .collect();
        let _ = write!(out, "  ({})", kinds.join(", "));
    }
    if stats.redirects > 0 || stats.errors.redirect_failed > 0 {
        let _ = write!(
            out,
            "\nredirects   {} writes followed to the master",
            group(stats.redirects)
        );
        if let Some(e) = &stats.redirect_error {
            let _ = write!(out, "; could not follow: {e}");
        }
    }
    if info.transport == "udp" {
        let _ = write!(
            out,
            "\nudp         retries {}, stale replies {}",
            group(stats.udp_retries),
            group(stats.udp_stale)
        );
    }
    out.push('\n');
    out
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// JSON has no NaN or infinity; report them as 0 rather than emit an invalid document.
fn json_f64(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "0".to_string()
    }
}

/// The whole result as one JSON object on one line.
pub fn json(info: &RunInfo, stats: &Stats, elapsed: Duration) -> String {
    let p = Percentiles::of(&stats.latency_ns);
    let mut out = String::with_capacity(1024);
    let _ = write!(
        out,
        "{{\"ops\":{},\"duration_s\":{},\"ops_per_sec\":{},\"p50_us\":{},\"p90_us\":{},\
         \"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"mean_us\":{},\"errors\":{},",
        stats.ops,
        json_f64(elapsed.as_secs_f64()),
        json_f64(ops_per_sec(stats.ops, elapsed)),
        json_f64(p.p50_us),
        json_f64(p.p90_us),
        json_f64(p.p99_us),
        json_f64(p.p999_us),
        json_f64(p.max_us),
        json_f64(p.mean_us),
        stats.errors.total(),
    );
    out.push_str("\"errors_by_kind\":{");
    for (i, (kind, count)) in stats.errors.by_kind().into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(&mut out, &kind);
        let _ = write!(out, ":{count}");
    }
    let _ = write!(
        out,
        "}},\"gets\":{},\"get_misses\":{},\"sets\":{},\"udp_retries\":{},\"udp_stale\":{},\
         \"redirects\":{},\"redirect_error\":",
        stats.gets,
        stats.get_misses,
        stats.sets,
        stats.udp_retries,
        stats.udp_stale,
        stats.redirects
    );
    match &stats.redirect_error {
        Some(e) => json_string(&mut out, e),
        None => out.push_str("null"),
    }
    let _ = write!(out, ",\"follow_redirects\":{},", info.follow_redirects);
    out.push_str("\"protocol\":");
    json_string(&mut out, info.protocol);
    out.push_str(",\"transport\":");
    json_string(&mut out, info.transport);
    out.push_str(",\"target\":");
    json_string(&mut out, &info.target);
    let _ = write!(
        out,
        ",\"connections\":{},\"pipeline\":{},\"threads\":{},\"get_ratio\":{},\"keyspace\":{},",
        info.connections,
        info.pipeline,
        info.threads,
        json_f64(info.get_ratio),
        info.keyspace
    );
    out.push_str("\"distribution\":");
    json_string(&mut out, &info.distribution);
    let _ = write!(
        out,
        ",\"key_size\":{},\"value_size\":{},\"txn_keys\":{},\"resp_wait\":{}}}",
        info.key_size,
        info.value_size,
        info.txn_keys,
        match info.resp_wait {
            Some(n) => n.to_string(),
            None => "null".to_string(),
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            protocol: "dkvs",
            transport: "tcp",
            target: "127.0.0.1:9099".to_string(),
            connections: 50,
            pipeline: 1,
            threads: 1,
            get_ratio: 0.5,
            keyspace: 1000,
            distribution: "uniform".to_string(),
            key_size: 16,
            value_size: 100,
            resp_wait: None,
            txn_keys: 1,
            follow_redirects: true,
        }
    }

    /// The value of top-level or nested `"key":` in a flat-ish JSON object, as text.
    fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
        let pat = format!("\"{key}\":");
        let start = json.find(&pat)? + pat.len();
        let rest = &json[start..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(&rest[..end])
    }

    #[test]
    fn json_has_required_fields_and_shape() {
        let mut stats = Stats::new();
        for us in 1..=1000u64 {
            stats.record_ok(us % 2 == 0, false, Duration::from_micros(us));
        }
        stats.errors.timeout = 2;
        stats.errors.status[8] = 3;
        let text = json(&info(), &stats, Duration::from_secs(2));
        assert!(text.starts_with('{') && text.ends_with('}'));
        assert!(!text.contains('\n'));
        assert_eq!(field(&text, "ops"), Some("1000"));
        assert_eq!(field(&text, "errors"), Some("5"));
        assert_eq!(field(&text, "duration_s"), Some("2.000"));
        assert_eq!(field(&text, "ops_per_sec"), Some("500.000"));
        for key in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            let v: f64 = field(&text, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1.0);
            assert!(v > 0.0 && v <= 1001.0, "{key} = {v}");
        }
        let p50: f64 = field(&text, "p50_us")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!((495.0..=505.0).contains(&p50), "p50 {p50}");
        assert_eq!(field(&text, "REDIRECT"), Some("3"));
        assert_eq!(field(&text, "timeout"), Some("2"));
        assert!(text.contains("\"errors_by_kind\":{\"timeout\":2,"));
        assert_eq!(field(&text, "resp_wait"), Some("null"));
        assert_eq!(field(&text, "redirects"), Some("0"));
        assert_eq!(field(&text, "redirect_error"), Some("null"));
        assert_eq!(field(&text, "follow_redirects"), Some("true"));
        // Braces balance: the nested object is closed.
        let opens = text.matches('{').count();
        assert_eq!(opens, 2);
        assert_eq!(opens, text.matches('}').count());
    }

    #[test]
    fn json_of_empty_run_is_valid() {
        let text = json(&info(), &Stats::new(), Duration::ZERO);
        assert_eq!(field(&text, "ops"), Some("0"));
        assert_eq!(field(&text, "ops_per_sec"), Some("0.000"));
        assert_eq!(field(&text, "p50_us"), Some("0.000"));
        assert!(!text.contains("NaN") && !text.contains("inf"));
    }

    #[test]
    fn json_escapes_strings() {
        let mut i = info();
        i.target = "we\"ird\\host\n:1".to_string();
        let text = json(&i, &Stats::new(), Duration::from_secs(1));
        assert!(text.contains(r#""target":"we\"ird\\host\u000a:1""#));
    }

    #[test]
    fn merge_adds_everything() {
        let mut a = Stats::new();
        let mut b = Stats::new();
        a.record_ok(true, true, Duration::from_micros(10));
        b.record_ok(false, false, Duration::from_micros(30));
        b.errors.lost = 4;
        b.errors.connection = 1;
        a.merge(&b);
        assert_eq!((a.ops, a.gets, a.get_misses, a.sets), (2, 1, 1, 1));
        assert_eq!(a.latency_ns.len(), 2);
        assert_eq!(a.errors.total(), 5);
        assert_eq!(a.resolved(), 6);
    }

    #[test]
    fn redirects_are_reported_and_failures_counted_once() {
        let mut a = Stats::new();
        a.redirects = 7;
        a.redirect_failed(|| "first".to_string());
        let mut b = Stats::new();
        b.redirect_failed(|| "second".to_string());
        b.errors.status[8] = 2;
        a.merge(&b);
        assert_eq!(a.redirects, 7);
        assert_eq!(a.errors.redirect_failed, 2);
        assert_eq!(a.redirect_error.as_deref(), Some("first"));
        // A connection-level failure ends no request; the two REDIRECT answers do.
        assert_eq!(a.errors.total(), 4);
        assert_eq!(a.resolved(), 2);
        let text = json(&info(), &a, Duration::from_secs(1));
        assert_eq!(field(&text, "redirects"), Some("7"));
        assert_eq!(field(&text, "redirect_failed"), Some("2"));
        assert_eq!(field(&text, "redirect_error"), Some("\"first\""));
        let summary = human(&info(), &a, Duration::from_secs(1));
        assert!(summary.contains("redirects   7 writes"), "{summary}");
        assert!(summary.contains("could not follow: first"), "{summary}");
        assert!(summary.contains("redirect_failed 2"), "{summary}");
    }

    #[test]
    fn grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
    }
}
