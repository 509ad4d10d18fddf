//! Key expiry on the master: deadlines are absolute (unix ms) and only the
//! master decides that a key has expired. It finds expired keys lazily (a read
//! or a write that meets one) and by an incremental sweep with a bounded amount
//! of work per reactor turn, as Redis's active expiry does, and replicates each
//! deletion as an ordinary transaction, so every replica deletes the same keys
//! at the same point of the commit order. Slaves never delete on their own:
//! their reads only hide a key whose deadline has passed by their clock.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::protocol::Opcode;
use crate::protocol::peer::{OpKind, WriteOp};
use crate::store::SHARDS;

use super::handler::{Core, Mode, ReplyTarget, Settled};

/// Keys with a deadline the sweep looks at per turn (whole shards: it stops
/// after the shard that crosses this, and counts each shard visited as one).
/// With 1M keys expiring at once, 512 keys and 256 deletions per turn cost
/// p50 0.34 ms, p99 0.76 ms, max 1.3 ms of CPU (the step plus applying its
/// deletions, most of it freeing the blocks): half of that keeps the turn
/// under the 1 ms target (`sweep_step_time_at_a_million_keys`).
pub const SWEEP_KEYS_PER_TURN: usize = 256;
/// Deletions one turn of the sweep submits at most; the rest wait for the next turn.
pub const SWEEP_DELETES_PER_TURN: usize = 128;
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
        let started = Instant::now();
        let cut_short = self.sweep_step();
        let micros = started.elapsed().as_micros() as u64;
        self.stats.longest_sweep_us = self.stats.longest_sweep_us.max(micros);
        if cut_short {
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
            // Each shard visited counts one, a shard with deadlines all its keys.
            examined += self.store.sweep_cost(shard) + 1;
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
        let ops = keys
            .into_iter()
            .map(|key| WriteOp::new(OpKind::Delete, key, b""));
        self.submit(ops, ReplyTarget::Nobody, 0, Opcode::Delete as u8, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Status;
    use crate::store::Write;

    /// CPU time this thread has used: unlike wall time, preemption by other
    /// processes on a shared machine does not count.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which `ts` is.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Per reactor turn of the sweep: its step's wall time, and the CPU time
    /// of the step plus applying the deletions it submitted.
    struct Turns {
        steps: Vec<Duration>,
        with_apply_cpu: Vec<Duration>,
    }

    /// Expired keys with a deadline, swept as the reactor would: each step
    /// submits deletions, which "commit" (are applied) before the next step.
    /// `together`: every key has the same deadline, else they are spread over
    /// a second. Returns the keys left with a deadline and the turns' times.
    fn sweep_all(keys: u64, value: &[u8], together: bool) -> (u64, Turns) {
        let mut core = Core::new(1 << 20, Mode::Master);
        let now = unix_ms();
        for i in 0..keys {
            let key = format!("key:{i:012}");
            let put = Write::PutExpiring {
                key: key.as_bytes(),
                value,
                deadline_ms: if together {
                    now - 1
                } else {
                    now - 1 - i % 1000
                },
            };
            core.store.apply(put, i + 1);
        }
        let mut turns = Turns {
            steps: Vec::new(),
            with_apply_cpu: Vec::new(),
        };
        let mut seq = keys;
        for _ in 0..(keys / SWEEP_DELETES_PER_TURN as u64 + SHARDS as u64 + 10) {
            let cpu = thread_cpu();
            let started = Instant::now();
            core.expiry_turn();
            turns.steps.push(started.elapsed());
            let batch = core.take_batch();
            if batch.is_empty() && core.store.expiring() == 0 {
                break;
            }
            assert!(
                batch.len() <= SWEEP_DELETES_PER_TURN,
                "bounded work per turn"
            );
            seq += 1;
            for write in batch {
                core.store.apply(
                    Write::Delete {
                        key: write.op.key(),
                    },
                    seq,
                );
                core.finish(write.client, Status::Ok, seq, &[]);
            }
            turns.with_apply_cpu.push(thread_cpu() - cpu);
        }
        (core.store.expiring() as u64, turns)
    }

    #[test]
    fn the_sweep_deletes_every_expired_key_a_bounded_step_at_a_time() {
        for together in [false, true] {
            let (left, _) = sweep_all(20_000, b"v", together);
            assert_eq!(left, 0);
        }
    }

    /// `cargo test --release --lib -- --ignored sweep_step_time --nocapture` prints the
    /// sweep's turns at 1M keys (16-byte keys, 100-byte values) expiring spread over a
    /// second and all in the same millisecond.
    #[test]
    #[ignore]
    fn sweep_step_time_at_a_million_keys() {
        let value = [b'v'; 100];
        for together in [false, true] {
            let (left, mut turns) = sweep_all(1_000_000, &value, together);
            assert_eq!(left, 0);
            for (what, times) in [
                ("sweep step, wall", &mut turns.steps),
                (
                    "step + applying its deletions, CPU",
                    &mut turns.with_apply_cpu,
                ),
            ] {
                times.sort();
                let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
                println!(
                    "1M keys expiring {}: {} turns, {what}: p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
                    if together { "together" } else { "over 1 s" },
                    times.len(),
                    at(0.5),
                    at(0.99),
                    at(0.999),
                    at(1.0)
                );
            }
        }
    }
}
