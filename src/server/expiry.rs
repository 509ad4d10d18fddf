//! Key expiry on the master: deadlines are absolute (unix ms) and only the
//! master decides that a key has expired. It finds expired keys lazily (a read
//! or a write that meets one) and by an incremental sweep with a bounded amount
//! of work per reactor turn, as Redis's active expiry does, and replicates each
//! deletion as an ordinary transaction, so every replica deletes the same keys
//! at the same point of the commit order. Slaves never delete on their own:
//! their reads only hide a key whose deadline has passed by their clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::Opcode;
use crate::protocol::peer::{OpKind, WriteOp};
use crate::store::SHARDS;

use super::handler::{Core, Mode, ReplyTarget, Settled};

/// Keys with a deadline the sweep looks at per turn (whole shards: it stops
/// after the shard that crosses this, and counts each shard visited as one).
pub const SWEEP_KEYS_PER_TURN: usize = 1024;
/// Deletions one turn of the sweep submits at most; the rest wait for the next turn.
pub const SWEEP_DELETES_PER_TURN: usize = 512;
/// How often an idle master wakes to sweep while keys have deadlines.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Wall-clock time in unix milliseconds (deadlines are absolute, so that they
/// mean the same after a restart or on another server).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Core {
    /// Once per reactor turn: read the clock, and on a master sweep a bounded
    /// part of the keys that have a deadline. Returns when the reactor should
    /// wake again for the sweep at the latest (`None`: nothing can expire).
    pub fn expiry_turn(&mut self) -> Option<Duration> {
        self.store.set_now_ms(unix_ms());
        if self.mode != Mode::Master || self.store.expiring() == 0 {
            return None;
        }
        if self.sweep_step() {
            // Cut short with expired keys left: go on at the next turn, as
            // Redis's active expiry repeats while it keeps finding them.
            return Some(Duration::ZERO);
        }
        Some(SWEEP_INTERVAL)
    }

    /// Whether `key` is still held but its deadline has passed (reads see it absent).
    pub fn expired_but_held(&self, key: &[u8]) -> bool {
        self.store.expiring() > 0
            && self
                .store
                .deadline(key)
                .is_some_and(|d| d <= self.store.now_ms())
            && self.store.get_held(key).is_some()
    }

    /// A read or write met `key` absent: if the master still holds it with a
    /// deadline that has passed, replicate its deletion now.
    pub fn expire_if_due(&mut self, key: &[u8]) {
        if self.mode != Mode::Master || self.store.expiring() == 0 {
            return;
        }
        if self.expired_but_held(key) && self.settled_version(key) == Settled::Version(None) {
            self.submit_expired(vec![key.to_vec()]);
        }
    }

    /// Walk the next shards' keys with deadlines and delete those that passed;
    /// whether it stopped at its deletion bound (more may be due).
    fn sweep_step(&mut self) -> bool {
        if self.write_refusal.is_some() {
            return false;
        }
        let now = self.store.now_ms();
        let mut examined = 0;
        let mut due = Vec::new();
        for _ in 0..SHARDS {
            if examined >= SWEEP_KEYS_PER_TURN || due.len() >= SWEEP_DELETES_PER_TURN {
                break;
            }
            let shard = self.sweep_cursor;
            examined += self.store.expiring_in_shard(shard) + 1;
            let before = due.len();
            for key in self.store.expired_in_shard(shard, now) {
                if due.len() >= SWEEP_DELETES_PER_TURN {
                    break;
                }
                // A key with a write undecided is left to that write (and a later sweep).
                if self.settled_version(key) == Settled::Version(None) {
                    due.push(key.to_vec());
                }
            }
            let full = due.len() >= SWEEP_DELETES_PER_TURN && due.len() > before;
            if !full {
                // A shard cut short is visited again next turn.
                self.sweep_cursor = (shard + 1) % SHARDS;
            }
        }
        let cut_short = due.len() >= SWEEP_DELETES_PER_TURN;
        if !due.is_empty() {
            self.submit_expired(due);
        }
        cut_short
    }

    /// Submit the deletion of expired keys as one command nobody waits for.
    fn submit_expired(&mut self, keys: Vec<Vec<u8>>) {
        self.stats.expired_keys += keys.len() as u64;
        let ops = keys.into_iter().map(|key| WriteOp {
            kind: OpKind::Delete,
            key,
            value: Vec::new(),
        });
        self.submit(ops, ReplyTarget::Nobody, 0, Opcode::Delete as u8, None);
    }
}
