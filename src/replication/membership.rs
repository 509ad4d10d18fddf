//! The master's view of its slaves: who is in sync, who is catching up, how far behind.

use std::collections::BTreeMap;

use super::PeerId;

/// Where a slave stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlaveState {
    /// Receiving a snapshot as of `at_seq`; nothing else may be sent on its link
    /// until the reactor reports the snapshot sent (it would overtake the chunks).
    Snapshotting {
        /// Sequence number of the snapshot being streamed.
        at_seq: u64,
    },
    /// Being sent the commits after its position from the commit log, a
    /// bounded step at a time as its link drains: every commit through `sent`
    /// is queued. Commits released meanwhile are not forwarded: the cursor
    /// reaches them in the log, which is pinned at `sent`.
    Backlog {
        /// The last commit queued to it (or its position, before the first).
        sent: u64,
    },
    /// The backlog through `marker` has been sent, followed by a CAUGHT_UP marker;
    /// every later commit is forwarded as a LOG_ENTRY. Waiting for the marker's echo.
    Tailing {
        /// Sequence number in the CAUGHT_UP marker sent.
        marker: u64,
    },
    /// A 2PC participant in every transaction from `join_seq` on; commits
    /// before `join_seq` still reach it as LOG_ENTRY messages.
    InSync {
        /// First transaction it takes part in.
        join_seq: u64,
    },
    /// Caught up after being evicted for lagging, and receiving every commit
    /// as a LOG_ENTRY, but not a 2PC participant before `until_ms`: a slave
    /// that keeps falling behind must not set the cluster's pace again at once.
    Probation {
        /// When it becomes a participant again.
        until_ms: u64,
    },
    /// Dropped from the in-sync set; its link has been closed. Rejoins by registering again.
    Evicted,
    /// Holds data of another history (or is ahead of the master) and may not
    /// discard it: kept registered and heartbeated, never sent commits.
    Diverged,
}

impl SlaveState {
    /// Short name for STATS and logs.
    pub fn name(&self) -> &'static str {
        match self {
            SlaveState::Snapshotting { .. } => "syncing-snapshot",
            SlaveState::Backlog { .. } | SlaveState::Tailing { .. } => "syncing-log",
            SlaveState::InSync { .. } => "in-sync",
            SlaveState::Probation { .. } => "probation",
            SlaveState::Evicted => "evicted",
            SlaveState::Diverged => "diverged",
        }
    }

    /// Whether commits are forwarded to this slave (as COMMIT or LOG_ENTRY).
    pub fn receives_commits(&self) -> bool {
        matches!(
            self,
            SlaveState::Tailing { .. } | SlaveState::InSync { .. } | SlaveState::Probation { .. }
        )
    }
}

/// One registered slave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaveInfo {
    /// Address it serves clients on.
    pub client_addr: String,
    /// Its node id (0: none announced).
    pub node_id: u64,
    /// Where it stands.
    pub state: SlaveState,
    /// Highest sequence number it reported applied (acks, heartbeats, catch-up echo).
    pub applied_seq: u64,
    /// Highest sequence number it acked: every outcome through it is durable there.
    pub acked_seq: u64,
    /// Last time anything arrived from it.
    pub last_heard_ms: u64,
    /// Why it was evicted, if it was.
    pub evicted_because: Option<String>,
    /// The read leases granted to it end by then (master clock, ms).
    pub lease_until_ms: u64,
}

impl SlaveInfo {
    /// How many commit sequence numbers it is behind `master_seq`.
    pub fn lag(&self, master_seq: u64) -> u64 {
        master_seq.saturating_sub(self.applied_seq)
    }
}

/// All slaves known to the master, by link.
#[derive(Debug, Clone, Default)]
pub struct Membership {
    slaves: BTreeMap<PeerId, SlaveInfo>,
}

impl Membership {
    /// No slaves.
    pub fn new() -> Membership {
        Membership::default()
    }

    /// Add a slave that has just registered.
    pub fn add(
        &mut self,
        peer: PeerId,
        client_addr: String,
        node_id: u64,
        applied_seq: u64,
        now_ms: u64,
    ) {
        let state = SlaveState::Evicted; // replaced by the catch-up decision right after
        self.slaves.insert(
            peer,
            SlaveInfo {
                client_addr,
                node_id,
                state,
                applied_seq,
                acked_seq: 0,
                last_heard_ms: now_ms,
                evicted_because: None,
                lease_until_ms: 0,
            },
        );
    }

    /// Forget a slave whose link is gone.
    pub fn remove(&mut self, peer: PeerId) -> Option<SlaveInfo> {
        self.slaves.remove(&peer)
    }

    /// Look a slave up.
    pub fn get(&self, peer: PeerId) -> Option<&SlaveInfo> {
        self.slaves.get(&peer)
    }

    /// Look a slave up for change.
    pub fn get_mut(&mut self, peer: PeerId) -> Option<&mut SlaveInfo> {
        self.slaves.get_mut(&peer)
    }

    /// Move a slave to `state`.
    pub fn set_state(&mut self, peer: PeerId, state: SlaveState) {
        if let Some(s) = self.slaves.get_mut(&peer) {
            debug_assert!(
                s.evicted_because.is_none() || state == SlaveState::Evicted,
                "an evicted slave rejoins only by registering on a new link"
            );
            s.state = state;
        }
    }

    /// Mark a slave evicted; returns whether it was not already.
    pub fn evict(&mut self, peer: PeerId, reason: &str) -> bool {
        match self.slaves.get_mut(&peer) {
            Some(s) if s.evicted_because.is_none() => {
                s.state = SlaveState::Evicted;
                s.evicted_because = Some(reason.to_string());
                true
            }
            _ => false,
        }
    }

    /// Note that something arrived from `peer`.
    pub fn heard_from(&mut self, peer: PeerId, now_ms: u64) {
        if let Some(s) = self.slaves.get_mut(&peer) {
            s.last_heard_ms = now_ms;
        }
    }

    /// Raise a slave's applied position.
    pub fn applied(&mut self, peer: PeerId, seq: u64) {
        if let Some(s) = self.slaves.get_mut(&peer) {
            s.applied_seq = s.applied_seq.max(seq);
        }
    }

    /// A slave acked `seq`: every outcome through it is durable there.
    pub fn acked(&mut self, peer: PeerId, seq: u64) {
        if let Some(s) = self.slaves.get_mut(&peer) {
            s.applied_seq = s.applied_seq.max(seq);
            s.acked_seq = s.acked_seq.max(seq);
        }
    }

    /// In-sync slaves that hold every commit durably: they acked a transaction
    /// they took part in, so everything before it is durable there too. Only
    /// these may be recorded as promotable (docs/FAILOVER.md).
    pub fn durably_in_sync(&self) -> impl Iterator<Item = &SlaveInfo> + '_ {
        self.slaves.values().filter(
            |s| matches!(s.state, SlaveState::InSync { join_seq } if s.acked_seq >= join_seq),
        )
    }

    /// Links of the slaves that take part in new transactions.
    pub fn in_sync(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.slaves
            .iter()
            .filter(|(_, s)| matches!(s.state, SlaveState::InSync { .. }))
            .map(|(p, _)| *p)
    }

    /// Number of in-sync slaves.
    pub fn in_sync_count(&self) -> usize {
        self.in_sync().count()
    }

    /// Every slave, for STATS.
    pub fn iter(&self) -> impl Iterator<Item = (PeerId, &SlaveInfo)> {
        self.slaves.iter().map(|(p, s)| (*p, s))
    }

    /// The link of a live (not evicted) slave with node id `node_id`, if any.
    pub fn find_by_node(&self, node_id: u64) -> Option<PeerId> {
        self.slaves
            .iter()
            .find(|(_, s)| s.node_id == node_id && s.evicted_because.is_none())
            .map(|(p, _)| *p)
    }

    /// The link of a live (not evicted) slave advertising `client_addr`, if any.
    pub fn find_by_addr(&self, client_addr: &str) -> Option<PeerId> {
        self.slaves
            .iter()
            .find(|(_, s)| s.client_addr == client_addr && s.evicted_because.is_none())
            .map(|(p, _)| *p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_name_is_the_one_protocol_md_gives_for_stats() {
        // Issue 10 item 12: §4.1 once listed `syncing (log)` where STATS prints
        // `syncing-log`, and did not say whether `evicted` is ever shown.
        let doc = include_str!("../../docs/PROTOCOL.md");
        let row = doc
            .lines()
            .find(|l| l.starts_with("| `slave<i>` |"))
            .expect("PROTOCOL.md §4.1 has the slave<i> row");
        let states = [
            SlaveState::Snapshotting { at_seq: 0 },
            SlaveState::Backlog { sent: 0 },
            SlaveState::Tailing { marker: 0 },
            SlaveState::InSync { join_seq: 0 },
            SlaveState::Probation { until_ms: 0 },
            SlaveState::Evicted,
            SlaveState::Diverged,
        ];
        for state in states {
            let name = format!("`{}`", state.name());
            assert!(row.contains(&name), "§4.1 does not name {name}");
        }
        assert!(
            row.contains("`evicted` exists too, but") && row.contains("STATS does not show it"),
            "§4.1 says whether STATS shows `evicted`"
        );
    }

    #[test]
    fn states_move_and_eviction_sticks() {
        let mut m = Membership::new();
        let p = PeerId(1);
        m.add(p, "a:1".into(), 0, 5, 0);
        m.set_state(p, SlaveState::Tailing { marker: 9 });
        assert_eq!(m.in_sync_count(), 0);
        m.set_state(p, SlaveState::InSync { join_seq: 10 });
        assert_eq!(m.in_sync().collect::<Vec<_>>(), vec![p]);
        assert!(m.evict(p, "timeout"));
        assert!(!m.evict(p, "again"));
        assert_eq!(m.in_sync_count(), 0);
        assert_eq!(m.find_by_addr("a:1"), None);
        m.applied(p, 7);
        m.applied(p, 6);
        assert_eq!(m.get(p).map(|s| s.lag(10)), Some(3));
        assert!(m.remove(p).is_some());
    }
}
