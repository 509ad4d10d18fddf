//! Counters reported by the STATS operation.

use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Instant;

use crate::protocol::Opcode;
use crate::store::Store;

use super::limits::InputBudget;
use super::snapshots::SnapshotCounters;

/// Counter slots per opcode byte (client opcodes are 0x01..=0x0B).
const OP_SLOTS: usize = 16;

/// Default server-wide budget for bytes held in partial frames.
pub const DEFAULT_INPUT_BUDGET_BYTES: usize = 256 << 20;

/// Server counters, rendered as `name value` lines by STATS.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Requests served, indexed by opcode byte.
    ops: [u64; OP_SLOTS],
    /// Requests rejected for a protocol error.
    pub protocol_errors: u64,
    /// AUTH (binary or RESP, HELLO's included) with a wrong password.
    pub auth_failures: u64,
    /// Requests refused `NOAUTH` (binary or RESP).
    pub auth_required: u64,
    /// Clients refused by protected mode (TCP connections and UDP datagrams).
    pub protected_mode_refusals: u64,
    /// TCP connections accepted since start.
    pub connections_accepted: u64,
    /// TCP connections open now.
    pub connections_open: u64,
    /// UDP datagrams received.
    pub udp_datagrams: u64,
    /// UDP writes answered from the retry cache instead of being applied again.
    pub udp_retries_deduplicated: u64,
    /// Requests answered with a redirect to the master (writes at a slave,
    /// and reads at a slave outside its read lease).
    pub redirects: u64,
    /// Reads a slave refused because it held no read lease.
    pub reads_refused: u64,
    /// Writes refused or aborted by replication.
    pub writes_failed: u64,
    /// UDP datagrams dropped unanswered: not a request (a response, no magic, under 24 bytes).
    pub udp_ignored: u64,
    /// UDP datagrams dropped unanswered by the per-source rate limit.
    pub udp_rate_limited: u64,
    /// UDP replies sent.
    pub udp_replies: u64,
    /// UDP replies replaced by USE_TCP or cut to fit the amplification limit.
    pub udp_replies_limited: u64,
    /// TCP connections accepted and closed at once because `--max-connections` were open.
    pub connections_refused: u64,
    /// Longest time between two polls of the reactor since start, microseconds.
    pub longest_turn_us: u64,
    /// Expired keys the master's sweep deleted (replicated deletions).
    pub expired_keys: u64,
    /// Longest single step of the expiry sweep, microseconds.
    pub longest_sweep_us: u64,
    /// Connections closed by the idle timeout.
    pub connections_closed_idle: u64,
    /// Connections closed because a frame took longer than the frame timeout to arrive.
    pub connections_closed_slow_frame: u64,
    /// Times client writes were paused because the transactions in flight
    /// reached `--max-inflight-txns` (backpressure, not refusal).
    pub txn_backpressure_pauses: u64,
    /// The snapshots streamed to slaves, kept current by the reactor.
    pub snapshots: SnapshotCounters,
    /// Bytes the copy of a disk snapshot in progress holds, kept current by the reactor.
    pub disk_snapshot_held_bytes: usize,
    /// Bytes held in partial frames, server-wide, against their budget.
    pub input_budget: Rc<InputBudget>,
    /// Replication lines (role, master or slaves), kept current by the reactor.
    pub replication: String,
    /// Write-ahead log lines, kept current by the reactor.
    pub wal: String,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            started: Instant::now(),
            ops: [0; OP_SLOTS],
            protocol_errors: 0,
            auth_failures: 0,
            auth_required: 0,
            protected_mode_refusals: 0,
            connections_accepted: 0,
            connections_open: 0,
            udp_datagrams: 0,
            udp_retries_deduplicated: 0,
            redirects: 0,
            reads_refused: 0,
            writes_failed: 0,
            udp_ignored: 0,
            udp_rate_limited: 0,
            udp_replies: 0,
            udp_replies_limited: 0,
            connections_refused: 0,
            longest_turn_us: 0,
            expired_keys: 0,
            longest_sweep_us: 0,
            connections_closed_idle: 0,
            connections_closed_slow_frame: 0,
            txn_backpressure_pauses: 0,
            snapshots: SnapshotCounters::default(),
            disk_snapshot_held_bytes: 0,
            input_budget: Rc::new(InputBudget::new(DEFAULT_INPUT_BUDGET_BYTES)),
            replication: "role master\n".to_string(),
            wal: String::new(),
        }
    }
}

impl Stats {
    /// Count one request of `op`.
    pub fn count(&mut self, op: Opcode) {
        // Every opcode is below OP_SLOTS (a unit test checks); a miss is not worth a panic.
        if let Some(n) = self.ops.get_mut(op as usize) {
            *n += 1;
        }
    }

    /// Seconds since the server started.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Binary-protocol requests served.
    pub fn requests(&self) -> u64 {
        self.ops.iter().sum()
    }

    /// The STATS text: one `name value` pair per line.
    pub fn render(&self, store: &Store, commit_seq: u64) -> String {
        let mut text = String::with_capacity(512);
        let mut line = |name: &str, value: &dyn std::fmt::Display| {
            let _ = writeln!(text, "{name} {value}");
        };
        line("version", &env!("CARGO_PKG_VERSION"));
        line("uptime_s", &self.started.elapsed().as_secs());
        // What users read as the number of keys: those that exist, leaving out
        // any whose deadline passed and whose deletion is not applied yet.
        line("keys", &store.live_len());
        line("data_bytes", &store.data_bytes());
        line("commit_seq", &commit_seq);
        for op in [
            Opcode::Get,
            Opcode::Put,
            Opcode::Update,
            Opcode::Delete,
            Opcode::Ping,
            Opcode::Stats,
            Opcode::Txn,
            Opcode::PutExpiring,
            Opcode::Expire,
            Opcode::Ttl,
            Opcode::Auth,
        ] {
            line(
                &format!("ops_{}", op.name()),
                &self.ops.get(op as usize).unwrap_or(&0),
            );
        }
        line("protocol_errors", &self.protocol_errors);
        line("auth_failures", &self.auth_failures);
        line("auth_required", &self.auth_required);
        line("protected_mode_refusals", &self.protected_mode_refusals);
        line("connections_accepted", &self.connections_accepted);
        line("connections_open", &self.connections_open);
        line("udp_datagrams", &self.udp_datagrams);
        line("udp_retries_deduplicated", &self.udp_retries_deduplicated);
        line("redirects", &self.redirects);
        line("reads_refused", &self.reads_refused);
        line("writes_failed", &self.writes_failed);
        line("udp_ignored", &self.udp_ignored);
        line("udp_rate_limited", &self.udp_rate_limited);
        line("udp_replies", &self.udp_replies);
        line("udp_replies_limited", &self.udp_replies_limited);
        line("connections_refused", &self.connections_refused);
        line("longest_turn_us", &self.longest_turn_us);
        line("keys_with_deadline", &store.expiring());
        line("keys_held", &store.len());
        line("expired_keys", &self.expired_keys);
        line("longest_sweep_us", &self.longest_sweep_us);
        line("connections_closed_idle", &self.connections_closed_idle);
        line(
            "connections_closed_slow_frame",
            &self.connections_closed_slow_frame,
        );
        line("txn_backpressure_pauses", &self.txn_backpressure_pauses);
        line("snapshot_held_bytes", &self.snapshots.held_bytes);
        line("snapshot_max_bytes", &self.snapshots.max_bytes);
        line("snapshots_streaming", &self.snapshots.streaming);
        line("snapshot_receivers", &self.snapshots.readers);
        line("snapshot_joins", &self.snapshots.joins);
        line("snapshot_cap_evictions", &self.snapshots.cap_evictions);
        line("disk_snapshot_held_bytes", &self.disk_snapshot_held_bytes);
        line("partial_frame_bytes", &self.input_budget.used());
        line("partial_frame_refusals", &self.input_budget.refusals());
        text.push_str(&self.wal);
        text.push_str(&self.replication);
        text
    }
}

/// `text` with every byte outside printable ASCII, the space and the
/// backslash written as `\xNN`, so that a name a peer chose (a slave's
/// announced address) cannot add or forge lines or fields in STATS.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        if byte.is_ascii_graphic() && byte != b'\\' {
            out.push(byte as char);
        } else {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_line_breaks_spaces_and_non_ascii() {
        assert_eq!(printable("127.0.0.1:9100"), "127.0.0.1:9100");
        assert_eq!(printable("[::1]:9100"), "[::1]:9100");
        assert_eq!(
            printable("x\nrole slave state=in-sync"),
            "x\\x0arole\\x20slave\\x20state=in-sync"
        );
        assert_eq!(printable("a\\b\u{e9}"), "a\\x5cb\\xc3\\xa9");
    }
}

#[cfg(test)]
mod op_slot_tests {
    use super::*;

    #[test]
    fn every_client_opcode_has_a_counter() {
        for byte in 0..=255u8 {
            if let Some(op) = Opcode::from_u8(byte) {
                assert!((op as usize) < OP_SLOTS, "{op:?}");
            }
        }
    }
}
