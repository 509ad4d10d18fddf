//! What the deterministic simulations share: the event queue's entry (events
//! ordered by time, then by the order they were scheduled in, so that a seed
//! replays exactly), a caught panic as a failure message, and numeric knobs
//! from the environment.

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

/// A simulation run's outcome when it panicked: the panic's message.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    format!("panic: {text}")
}

/// A numeric knob from the environment (`DKVS_SIM_SEED` and the like).
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}
