//! Resource control: the bounds that keep one hostile client (or a forged UDP
//! source) from growing the server's memory, holding connections forever, or
//! using the server to flood a third party. Pure bookkeeping, no I/O: the
//! reactor passes the time in, so every rule is unit-tested here.
//! docs/SECURITY.md explains what each bound protects against.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;

/// A UDP reply to an unvalidated source is at most this many times the
/// request's bytes (QUIC's anti-amplification rule, RFC 9000 §8).
pub const UDP_AMPLIFICATION_FACTOR: usize = 3;
/// Sources the UDP rate limiter tracks one by one; beyond that, new sources share one bucket.
const MAX_RATE_SOURCES: usize = 65_536;
/// Milliseconds between two prunes of a full rate-limiter map.
const RATE_PRUNE_INTERVAL_MS: u64 = 1000;

/// Which UDP sources the amplification limit and the rate limit apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpLimitScope {
    /// Every source except loopback ones: a loopback source cannot be forged
    /// from another host (Linux drops such packets arriving from outside), so a
    /// server bound to loopback is never limited.
    Auto,
    /// Every source, loopback included (for testing the limits on 127.0.0.1).
    Always,
}

impl UdpLimitScope {
    /// Parse `auto` or `always` (the `--udp-limits` flag).
    pub fn parse(text: &str) -> Result<UdpLimitScope, String> {
        match text {
            "auto" => Ok(UdpLimitScope::Auto),
            "always" => Ok(UdpLimitScope::Always),
            other => Err(format!("'{other}' is not auto or always")),
        }
    }

    /// Whether datagrams from `source` are limited.
    pub fn applies_to(self, source: IpAddr) -> bool {
        match self {
            UdpLimitScope::Always => true,
            UdpLimitScope::Auto => !is_loopback(source),
        }
    }
}

/// Loopback, including IPv4 loopback mapped into IPv6 (`::ffff:127.0.0.1`).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// One source's token bucket, in thousandths of a reply.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli_tokens: u64,
    updated_ms: u64,
}

impl Bucket {
    fn full(capacity: u64, now_ms: u64) -> Bucket {
        Bucket {
            milli_tokens: capacity,
            updated_ms: now_ms,
        }
    }

    /// Add what `rate_per_sec` earned since the last update, capped at `capacity`.
    /// A rate of R per second earns R thousandths per millisecond.
    fn refill(&mut self, rate_per_sec: u64, capacity: u64, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.updated_ms);
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(rate_per_sec))
            .min(capacity);
        self.updated_ms = now_ms;
    }
}

/// Replies per second per source IP, as a token bucket holding one second's
/// worth (so a burst of `rate` is allowed after a quiet second). The map is
/// bounded: once `MAX_RATE_SOURCES` are tracked, buckets that have refilled
/// completely (they hold no information) are pruned, and if it is still full
/// every new source shares one overflow bucket.
#[derive(Debug)]
pub struct RateLimiter {
    /// Replies per second; 0 turns the limit off.
    rate_per_sec: u64,
    buckets: HashMap<IpAddr, Bucket>,
    overflow: Bucket,
    last_prune_ms: u64,
}

impl RateLimiter {
    /// A limiter allowing `rate_per_sec` replies per second per source (0 = unlimited).
    pub fn new(rate_per_sec: u32) -> RateLimiter {
        let rate = u64::from(rate_per_sec);
        RateLimiter {
            rate_per_sec: rate,
            buckets: HashMap::new(),
            overflow: Bucket::full(rate * 1000, 0),
            last_prune_ms: 0,
        }
    }

    fn capacity(&self) -> u64 {
        self.rate_per_sec * 1000
    }

    /// Whether `source` may get one more reply at `now_ms`; takes the token if so.
    pub fn allow(&mut self, source: IpAddr, now_ms: u64) -> bool {
        if self.rate_per_sec == 0 {
            return true;
        }
        let (rate, capacity) = (self.rate_per_sec, self.capacity());
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_RATE_SOURCES {
            self.prune(now_ms);
        }
        let bucket = if self.buckets.len() < MAX_RATE_SOURCES || self.buckets.contains_key(&source)
        {
            self.buckets
                .entry(source)
                .or_insert_with(|| Bucket::full(capacity, now_ms))
        } else {
            &mut self.overflow
        };
        bucket.refill(rate, capacity, now_ms);
        if bucket.milli_tokens >= 1000 {
            bucket.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    /// Forget sources whose bucket is full again (at most once per interval: O(n)).
    fn prune(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.last_prune_ms) < RATE_PRUNE_INTERVAL_MS {
            return;
        }
        self.last_prune_ms = now_ms;
        let (rate, capacity) = (self.rate_per_sec, self.capacity());
        self.buckets.retain(|_, b| {
            b.refill(rate, capacity, now_ms);
            b.milli_tokens < capacity
        });
    }

    /// Sources tracked one by one.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// The largest reply allowed for a request of `request_len` bytes, by QUIC's rule.
pub fn amplification_limit(request_len: usize) -> usize {
    request_len.saturating_mul(UDP_AMPLIFICATION_FACTOR)
}

/// Descriptors kept back from client connections for everything else the
/// process opens: the listener, UDP socket, poller and waker, up to
/// `MAX_PEER_LINKS` (64) replication links, the log's segments, directory and
/// lock, snapshot files, etcd and forwarding connections, standard streams.
/// Running out of those would fail a log segment or a slave's link, which is
/// worse than refusing one more client.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// The descriptor limit (`RLIMIT_NOFILE`) a server serving `max_connections`
/// clients asks for.
pub fn descriptors_wanted(max_connections: usize) -> u64 {
    (max_connections as u64).saturating_add(RESERVED_DESCRIPTORS)
}

/// The soft descriptor limit to set, given the current soft and hard limits:
/// what `max_connections` wants, within the hard limit, and never below the
/// current soft limit.
pub fn descriptor_limit_to_set(max_connections: usize, soft: u64, hard: u64) -> u64 {
    descriptors_wanted(max_connections).min(hard).max(soft)
}

/// How many client connections fit in a soft descriptor limit of `soft`:
/// `max_connections`, or fewer if the limit is too low for it (at least one,
/// so that a tiny limit still serves someone).
pub fn connection_cap(max_connections: usize, soft: u64) -> usize {
    let fit = soft.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    max_connections.min(usize::try_from(fit).unwrap_or(usize::MAX))
}

/// One server-wide budget for input-buffer bytes beyond each connection's
/// resting buffer: the bytes held in partial frames. A connection whose frame
/// needs more than is left is closed instead of buffered for.
#[derive(Debug)]
pub struct InputBudget {
    limit: usize,
    used: Cell<usize>,
    refusals: Cell<u64>,
}

impl InputBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> InputBudget {
        InputBudget {
            limit,
            used: Cell::new(0),
            refusals: Cell::new(0),
        }
    }

    /// Take `bytes` from the budget; `false` (and counted) if that would exceed it.
    pub fn try_charge(&self, bytes: usize) -> bool {
        let used = self.used.get();
        match used.checked_add(bytes) {
            Some(total) if total <= self.limit => {
                self.used.set(total);
                true
            }
            _ => {
                self.refusals.set(self.refusals.get() + 1);
                false
            }
        }
    }

    /// Give back `bytes` charged earlier.
    pub fn release(&self, bytes: usize) {
        debug_assert!(bytes <= self.used.get(), "released more than charged");
        self.used.set(self.used.get().saturating_sub(bytes));
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.get()
    }

    /// Growths refused since start.
    pub fn refusals(&self) -> u64 {
        self.refusals.get()
    }
}

/// What a connection did, as seen by one periodic sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// Bytes read from the socket since the connection opened.
    pub bytes_read: u64,
    /// Frames taken from the input since the connection opened.
    pub frames_consumed: u64,
    /// The input holds the beginning of a frame that has not completely arrived.
    pub partial_frame: bool,
    /// The server owes the client replies (writes in flight or output unsent).
    pub owes_replies: bool,
}

/// The sweep's verdict on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Nothing arrived and nothing was owed for the idle timeout.
    Idle,
    /// A frame started and did not complete within the frame timeout.
    SlowFrame,
}

/// The timeouts a sweep applies; 0 turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest time a frame may take to arrive once begun.
    pub frame_ms: u64,
    /// Longest time a connection may be idle.
    pub idle_ms: u64,
}

impl Timeouts {
    /// How often the sweep should run: often enough that a timeout fires
    /// within a quarter of its length late, at most once a second.
    pub fn sweep_interval_ms(&self) -> u64 {
        let shortest = [self.frame_ms, self.idle_ms]
            .into_iter()
            .filter(|&t| t > 0)
            .min()
            .unwrap_or(4000);
        (shortest / 4).clamp(10, 1000)
    }
}

/// A connection's state between sweeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    seen: Option<Activity>,
    /// When the sweep first saw the current partial frame.
    partial_since_ms: Option<u64>,
    /// When the sweep last saw the connection do anything.
    active_ms: u64,
}

impl Watch {
    /// Compare `now` with the last sweep and decide.
    pub fn check(&mut self, now_ms: u64, now: Activity, timeouts: Timeouts) -> Verdict {
        let first = self.seen.is_none();
        let prev = self.seen.replace(now);
        let progressed = prev.is_none_or(|p| p.frames_consumed != now.frames_consumed);
        let read = prev.is_none_or(|p| p.bytes_read != now.bytes_read);
        if first || read || now.owes_replies {
            self.active_ms = now_ms;
        }
        if !now.partial_frame || progressed {
            // A frame completed since the last look (or none is under way): a new clock.
            self.partial_since_ms = now.partial_frame.then_some(now_ms);
        } else if self.partial_since_ms.is_none() {
            self.partial_since_ms = Some(now_ms);
        }
        if timeouts.frame_ms > 0
            && let Some(since) = self.partial_since_ms
            && now_ms.saturating_sub(since) >= timeouts.frame_ms
        {
            return Verdict::SlowFrame;
        }
        if timeouts.idle_ms > 0 && now_ms.saturating_sub(self.active_ms) >= timeouts.idle_ms {
            return Verdict::Idle;
        }
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn the_descriptor_limit_is_raised_within_the_hard_limit_and_caps_connections() {
        // Raised to what 10000 connections need when the hard limit allows.
        assert_eq!(descriptor_limit_to_set(10_000, 1024, 1 << 20), 10_128);
        assert_eq!(connection_cap(10_000, 10_128), 10_000);
        // Only to the hard limit otherwise, and the cap shrinks to fit in it.
        assert_eq!(descriptor_limit_to_set(10_000, 1024, 4096), 4096);
        assert_eq!(connection_cap(10_000, 4096), 4096 - 128);
        // Never lowered: a generous limit is left alone.
        assert_eq!(descriptor_limit_to_set(100, 65_536, 1 << 20), 65_536);
        assert_eq!(connection_cap(100, 65_536), 100);
        // A limit below the reserve still serves one client.
        assert_eq!(connection_cap(10_000, 64), 1);
        // RLIM_INFINITY (u64::MAX) neither overflows nor truncates.
        assert_eq!(
            descriptor_limit_to_set(10_000, u64::MAX, u64::MAX),
            u64::MAX
        );
        assert_eq!(connection_cap(10_000, u64::MAX), 10_000);
    }

    #[test]
    fn loopback_sources_are_limited_only_when_asked() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        for source in [v4, v6, mapped] {
            assert!(!UdpLimitScope::Auto.applies_to(source), "{source}");
            assert!(UdpLimitScope::Always.applies_to(source), "{source}");
        }
        assert!(UdpLimitScope::Auto.applies_to(ip(1)));
        assert_eq!(UdpLimitScope::parse("always"), Ok(UdpLimitScope::Always));
        assert!(UdpLimitScope::parse("sometimes").is_err());
    }

    #[test]
    fn a_bucket_allows_a_burst_then_the_rate() {
        let mut limiter = RateLimiter::new(10);
        let allowed = (0..100).filter(|_| limiter.allow(ip(1), 0)).count();
        assert_eq!(allowed, 10, "one second's worth at once");
        assert!(!limiter.allow(ip(1), 50), "half a token earned, none taken");
        assert!(limiter.allow(ip(1), 100), "one token after 100 ms at 10/s");
        assert!(
            limiter.allow(ip(2), 100),
            "another source has its own bucket"
        );
    }

    #[test]
    fn rate_zero_is_unlimited() {
        let mut limiter = RateLimiter::new(0);
        assert!((0..10_000).all(|_| limiter.allow(ip(1), 0)));
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn the_source_map_is_bounded_and_new_sources_share_a_bucket_when_full() {
        let mut limiter = RateLimiter::new(2);
        for i in 0..MAX_RATE_SOURCES as u32 {
            assert!(limiter.allow(IpAddr::from(i.to_be_bytes()), 0));
        }
        assert_eq!(limiter.tracked(), MAX_RATE_SOURCES);
        // Full, and no bucket has refilled yet: newcomers share the overflow bucket.
        let newcomer = IpAddr::from([250, 0, 0, 1]);
        let other = IpAddr::from([250, 0, 0, 2]);
        assert!(limiter.allow(newcomer, 10));
        assert!(limiter.allow(other, 10));
        assert!(!limiter.allow(newcomer, 10), "the shared bucket is empty");
        assert_eq!(limiter.tracked(), MAX_RATE_SOURCES);
        // Two seconds later every bucket is full again: the map is pruned.
        assert!(limiter.allow(newcomer, 2000));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn the_input_budget_refuses_and_counts_what_does_not_fit() {
        let budget = InputBudget::new(100);
        assert!(budget.try_charge(60));
        assert!(!budget.try_charge(41));
        assert!(budget.try_charge(40));
        assert_eq!((budget.used(), budget.refusals()), (100, 1));
        budget.release(100);
        assert_eq!(budget.used(), 0);
        assert!(!budget.try_charge(usize::MAX), "no overflow");
    }

    const T: Timeouts = Timeouts {
        frame_ms: 10_000,
        idle_ms: 0,
    };

    fn act(bytes: u64, frames: u64, partial: bool) -> Activity {
        Activity {
            bytes_read: bytes,
            frames_consumed: frames,
            partial_frame: partial,
            owes_replies: false,
        }
    }

    #[test]
    fn a_frame_trickling_in_is_closed_after_the_frame_timeout() {
        let mut watch = Watch::default();
        assert_eq!(watch.check(0, act(30, 0, true), T), Verdict::Keep);
        // New bytes keep arriving, but the same frame never completes.
        assert_eq!(watch.check(5_000, act(31, 0, true), T), Verdict::Keep);
        assert_eq!(watch.check(9_999, act(32, 0, true), T), Verdict::Keep);
        assert_eq!(watch.check(10_000, act(33, 0, true), T), Verdict::SlowFrame);
    }

    #[test]
    fn completed_frames_restart_the_frame_clock() {
        let mut watch = Watch::default();
        // A pipelining client is caught mid-frame at every sweep, but frames complete.
        for (i, now) in (0..100u64).map(|i| (i, i * 1000)) {
            assert_eq!(watch.check(now, act(i * 100, i, true), T), Verdict::Keep);
        }
        let mut watch = Watch::default();
        assert_eq!(watch.check(0, act(0, 0, false), T), Verdict::Keep);
        assert_eq!(watch.check(60_000, act(0, 0, false), T), Verdict::Keep);
    }

    #[test]
    fn idle_timeout_counts_from_the_last_byte_or_reply_owed() {
        let t = Timeouts {
            frame_ms: 10_000,
            idle_ms: 3000,
        };
        let mut watch = Watch::default();
        assert_eq!(watch.check(0, act(10, 1, false), t), Verdict::Keep);
        assert_eq!(watch.check(2000, act(20, 2, false), t), Verdict::Keep);
        assert_eq!(watch.check(4999, act(20, 2, false), t), Verdict::Keep);
        let owing = Activity {
            owes_replies: true,
            ..act(20, 2, false)
        };
        assert_eq!(watch.check(5500, owing, t), Verdict::Keep);
        assert_eq!(watch.check(8499, act(20, 2, false), t), Verdict::Keep);
        assert_eq!(watch.check(8500, act(20, 2, false), t), Verdict::Idle);
        assert_eq!(t.sweep_interval_ms(), 750);
        assert_eq!(T.sweep_interval_ms(), 1000);
    }
}
