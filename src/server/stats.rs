//! Counters reported by the STATS operation.

use std::fmt::Write as _;
use std::time::Instant;

use crate::protocol::Opcode;
use crate::store::Store;

/// Server counters, rendered as `name value` lines by STATS.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Requests served, indexed by opcode byte.
    ops: [u64; 7],
    /// Requests rejected for a protocol error.
    pub protocol_errors: u64,
    /// TCP connections accepted since start.
    pub connections_accepted: u64,
    /// TCP connections open now.
    pub connections_open: u64,
    /// UDP datagrams received.
    pub udp_datagrams: u64,
    /// UDP writes answered from the retry cache instead of being applied again.
    pub udp_retries_deduplicated: u64,
    /// Writes answered with a redirect to the master.
    pub redirects: u64,
    /// Writes refused or aborted by replication.
    pub writes_failed: u64,
    /// Replication lines (role, master or slaves), kept current by the reactor.
    pub replication: String,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            started: Instant::now(),
            ops: [0; 7],
            protocol_errors: 0,
            connections_accepted: 0,
            connections_open: 0,
            udp_datagrams: 0,
            udp_retries_deduplicated: 0,
            redirects: 0,
            writes_failed: 0,
            replication: "role master\n".to_string(),
        }
    }
}

impl Stats {
    /// Count one request of `op`.
    pub fn count(&mut self, op: Opcode) {
        self.ops[op as usize] += 1;
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
        line("keys", &store.len());
        line("data_bytes", &store.data_bytes());
        line("commit_seq", &commit_seq);
        for op in [
            Opcode::Get,
            Opcode::Put,
            Opcode::Update,
            Opcode::Delete,
            Opcode::Ping,
            Opcode::Stats,
        ] {
            line(&format!("ops_{}", op.name()), &self.ops[op as usize]);
        }
        line("protocol_errors", &self.protocol_errors);
        line("connections_accepted", &self.connections_accepted);
        line("connections_open", &self.connections_open);
        line("udp_datagrams", &self.udp_datagrams);
        line("udp_retries_deduplicated", &self.udp_retries_deduplicated);
        line("redirects", &self.redirects);
        line("writes_failed", &self.writes_failed);
        text.push_str(&self.replication);
        text
    }
}
