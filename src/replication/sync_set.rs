//! The in-sync set as recorded in the coordination store (etcd), and the
//! changes on their way there.
//!
//! With failover, a slave may be promoted only if it is in the recorded set,
//! so the master keeps two rules (docs/FAILOVER.md): a slave leaves the
//! recorded set before any transaction is decided without it, and joins it
//! only once it has caught up. This type holds the bookkeeping; the
//! coordinator applies the rules.

use std::collections::{BTreeMap, BTreeSet};

use super::PeerId;

/// The recorded set, the one change in flight, and the slaves held back by it.
#[derive(Debug, Default)]
pub struct RecordedSet {
    /// What the coordination store holds, as far as this master knows.
    recorded: BTreeSet<u64>,
    /// A write of the set that has not completed: its version and contents.
    in_flight: Option<(u64, BTreeSet<u64>)>,
    next_version: u64,
    /// Links of slaves that left the in-sync set while recorded (node ids):
    /// nothing is decided until their removal is recorded.
    held: BTreeMap<PeerId, u64>,
}

impl RecordedSet {
    /// The set as last recorded.
    pub fn recorded(&self) -> &BTreeSet<u64> {
        &self.recorded
    }

    /// Whether `node` is, or may be about to be, a member of the recorded set.
    pub fn may_be_recorded(&self, node: u64) -> bool {
        self.recorded.contains(&node)
            || self
                .in_flight
                .as_ref()
                .is_some_and(|(_, set)| set.contains(&node))
    }

    /// Hold `peer` (node `node`) until a set without it is recorded.
    pub fn hold(&mut self, peer: PeerId, node: u64) {
        self.held.insert(peer, node);
    }

    /// Whether a slave that left is still recorded (decisions wait).
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// The write to start for `desired`, if it differs from what is recorded
    /// and no write is in flight: `(version, members)`.
    pub fn request(&mut self, desired: BTreeSet<u64>) -> Option<(u64, Vec<u64>)> {
        if self.in_flight.is_some() || desired == self.recorded {
            return None;
        }
        self.next_version += 1;
        let members = desired.iter().copied().collect();
        self.in_flight = Some((self.next_version, desired));
        Some((self.next_version, members))
    }

    /// The write `version` completed. Returns the held links it releases.
    pub fn recorded_as(&mut self, version: u64) -> Vec<PeerId> {
        match self.in_flight.take() {
            Some((v, set)) if v == version => self.recorded = set,
            other => {
                self.in_flight = other;
                return Vec::new();
            }
        }
        let recorded = &self.recorded;
        let released: Vec<PeerId> = self
            .held
            .iter()
            .filter(|(_, node)| !recorded.contains(node))
            .map(|(peer, _)| *peer)
            .collect();
        for peer in &released {
            self.held.remove(peer);
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nodes: &[u64]) -> BTreeSet<u64> {
        nodes.iter().copied().collect()
    }

    #[test]
    fn one_write_at_a_time_and_only_for_a_change() {
        let mut r = RecordedSet::default();
        assert_eq!(r.request(set(&[])), None, "nothing to change");
        assert_eq!(r.request(set(&[1, 2])), Some((1, vec![1, 2])));
        assert!(r.may_be_recorded(2), "in flight counts as maybe recorded");
        assert_eq!(r.request(set(&[1])), None, "one write in flight");
        assert!(
            r.recorded_as(7).is_empty(),
            "a stale completion changes nothing"
        );
        assert!(r.recorded().is_empty());
        r.recorded_as(1);
        assert_eq!(r.recorded(), &set(&[1, 2]));
        assert_eq!(r.request(set(&[1])), Some((2, vec![1])));
    }

    #[test]
    fn a_held_slave_is_released_once_a_set_without_it_is_recorded() {
        let mut r = RecordedSet::default();
        r.request(set(&[1, 2]));
        r.recorded_as(1);
        r.hold(PeerId(5), 2);
        assert!(r.holding());
        assert_eq!(r.request(set(&[1])), Some((2, vec![1])));
        assert_eq!(r.recorded_as(2), vec![PeerId(5)]);
        assert!(!r.holding());
        assert!(!r.may_be_recorded(2));
    }
}
