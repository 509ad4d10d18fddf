//! Every deadline the reactor keeps, in one ordered structure; the earliest
//! bounds `poll`'s timeout.

use std::collections::{BTreeSet, HashMap};

use crate::replication::TimerId;

/// Armed timers by deadline (milliseconds on the server's clock).
#[derive(Debug, Default)]
pub struct Timers {
    by_deadline: BTreeSet<(u64, TimerId)>,
    by_id: HashMap<TimerId, u64>,
}

impl Timers {
    /// Arm `timer` at `at_ms`, moving it if already armed.
    pub fn set(&mut self, timer: TimerId, at_ms: u64) {
        if let Some(old) = self.by_id.insert(timer, at_ms) {
            self.by_deadline.remove(&(old, timer));
        }
        self.by_deadline.insert((at_ms, timer));
    }

    /// Disarm `timer` if armed.
    pub fn cancel(&mut self, timer: TimerId) {
        if let Some(at) = self.by_id.remove(&timer) {
            self.by_deadline.remove(&(at, timer));
        }
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        self.by_deadline.first().map(|(at, _)| *at)
    }

    /// Disarm and return the earliest timer due at `now_ms`, if any.
    pub fn pop_expired(&mut self, now_ms: u64) -> Option<TimerId> {
        let &(at, timer) = self.by_deadline.first()?;
        if at > now_ms {
            return None;
        }
        self.by_deadline.remove(&(at, timer));
        self.by_id.remove(&timer);
        Some(timer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fire_in_deadline_order_and_moves_replace() {
        let mut timers = Timers::default();
        timers.set(TimerId::Txn(2), 30);
        timers.set(TimerId::Txn(1), 10);
        timers.set(TimerId::Heartbeat, 20);
        timers.set(TimerId::Txn(2), 5);
        assert_eq!(timers.next_deadline(), Some(5));
        assert_eq!(timers.pop_expired(4), None);
        assert_eq!(timers.pop_expired(25), Some(TimerId::Txn(2)));
        assert_eq!(timers.pop_expired(25), Some(TimerId::Txn(1)));
        assert_eq!(timers.pop_expired(25), Some(TimerId::Heartbeat));
        assert_eq!(timers.pop_expired(100), None);
        assert_eq!(timers.next_deadline(), None);
    }

    #[test]
    fn cancel_disarms() {
        let mut timers = Timers::default();
        timers.set(TimerId::Reconnect, 10);
        timers.cancel(TimerId::Reconnect);
        timers.cancel(TimerId::OutcomeCheck);
        assert_eq!(timers.pop_expired(100), None);
    }
}
