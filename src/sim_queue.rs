//! The event queue shared by the deterministic simulations: events ordered by
//! time, then by the order they were scheduled in, so that a seed replays exactly.

use std::cmp::Ordering;

/// One event due at `at` (simulated ms); `order` breaks ties in scheduling order.
pub struct Scheduled<E> {
    /// When it is due.
    pub at: u64,
    /// Scheduling order, unique per simulation.
    pub order: u64,
    /// The event.
    pub ev: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl<E> Eq for Scheduled<E> {}

impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Scheduled<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: earliest (then first scheduled) on top.
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}
