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

/// Keys the sweep looks at per turn, counted key by key (a shard without
/// deadlines counts one). With 1M keys expiring at once, 256 keys and 128
/// deletions per turn cost p99 0.17 ms, max 0.22 ms of CPU (the step plus
/// applying its deletions, most of it freeing the blocks), well under the
/// 1 ms target (`sweep_step_time_at_a_million_keys`). When a step stopped
/// only at shard ends, a turn grew with the keys per shard (max 0.76 ms).
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

    /// Walk the next keys of shards with deadlines and delete those that
    /// passed; whether it stopped at its deletion bound (more may be due).
    /// At most `SWEEP_KEYS_PER_TURN` keys are looked at, wherever shards begin
    /// and end: a step stops inside a shard and the next resumes there, so a
    /// turn's work does not grow with the keys per shard (a store ten times
    /// larger has shards ten times larger).
    fn sweep_step(&mut self) -> bool {
        if self.write_refusal.is_some() {
            return false;
        }
        let now = self.store.now_ms();
        let mut examined = 0;
        let mut shards_visited = 0;
        let mut due = Vec::new();
        while examined < SWEEP_KEYS_PER_TURN
            && due.len() < SWEEP_DELETES_PER_TURN
            && shards_visited < SHARDS
        {
            let shard = self.sweep_cursor;
            // A shard without deadlines is skipped at the cost of one key.
            let mut finished = true;
            if self.store.expiring_in_shard(shard) == 0 {
                examined += 1;
            } else {
                let mut pos = self.sweep_pos;
                let due_before = due.len();
                for block in self.store.shard_blocks_from(shard, pos) {
                    if examined >= SWEEP_KEYS_PER_TURN || due.len() >= SWEEP_DELETES_PER_TURN {
                        finished = false;
                        break;
                    }
                    examined += 1;
                    pos += 1;
                    // A key with a write undecided is left to that write (and a later sweep).
                    if block.deadline().is_some_and(|d| d <= now)
                        && self.settled_version(block.key()) == Settled::Version(None)
                    {
                        due.push(block.key().to_vec());
                    }
                }
                // The keys due here leave the shard when their deletion is
                // applied, and the keys after them move up as many places:
                // resume that much earlier, or they would wait for a whole pass.
                // (Met again before their deletion is applied, they are
                // undecided and skipped.)
                self.sweep_pos = pos - (due.len() - due_before);
            }
            if finished {
                self.sweep_cursor = (shard + 1) % SHARDS;
                self.sweep_pos = 0;
                shards_visited += 1;
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
