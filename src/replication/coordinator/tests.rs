use super::*;
use crate::replication::{OpKind, WriteOp};

fn put(key: &str) -> WriteOp {
    WriteOp::new(OpKind::Put, key.as_bytes(), b"v")
}

fn writes(first_client: u64, keys: &[&str]) -> Event {
    Event::ClientWrites {
        writes: keys
            .iter()
            .enumerate()
            .map(|(i, k)| ClientWrite {
                client: ClientRef(first_client + i as u64),
                op: put(k),
                key_hash: crate::replication::test_key_hash(k.as_bytes()),
            })
            .collect(),
    }
}

fn drain(c: &mut Coordinator) -> Vec<Action> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

fn msg(peer: u64, msg: PeerMessage) -> Event {
    Event::Message {
        peer: PeerId(peer),
        msg,
    }
}

/// The history id of the coordinator under test.
const H: u64 = 0x5EED_0000_0000_0001;

/// A slave at `last` of this master's history (at 0, a fresh slave is the same).
fn register(peer: u64, last: u64) -> Event {
    register_from(peer, last, H)
}

/// A slave whose operator allows replacing its data (`--resync-discard-data`).
fn register_from(peer: u64, last: u64, history_id: u64) -> Event {
    register_with(peer, last, history_id, true)
}

fn register_with(peer: u64, last: u64, history_id: u64, may_discard_data: bool) -> Event {
    msg(
        peer,
        PeerMessage::Register {
            client_addr: format!("slave{peer}"),
            last_applied_seq: last,
            history_id,
            protocol_version: PEER_PROTOCOL_VERSION,
            node_id: 0,
            may_discard_data,
            epoch: 0,
        },
    )
}

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        tpc_timeout_ms: 100,
        log_capacity: 4,
        history_id: H,
        ..CoordinatorConfig::default()
    }
}

/// A coordinator with slaves `peers` registered and in sync at seq 0.
fn with_slaves(peers: &[u64]) -> Coordinator {
    let mut c = Coordinator::new(config(), 0);
    for &p in peers {
        c.handle(0, register(p, 0));
        c.handle(0, msg(p, PeerMessage::CaughtUp { seq: 0 }));
    }
    drain(&mut c);
    assert_eq!(c.members().in_sync_count(), peers.len());
    c
}

fn sends_to(actions: &[Action], peer: u64) -> Vec<PeerMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { peer: p, msg } if *p == PeerId(peer) => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

fn persist_lsns(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Persist { lsn, .. } => Some(*lsn),
            _ => None,
        })
        .collect()
}

/// Fire `TimerId::CommitFlush` at `now` and return what it did.
fn flush_commits(c: &mut Coordinator, now: u64) -> Vec<Action> {
    c.handle(
        now,
        Event::TimerFired {
            timer: TimerId::CommitFlush,
        },
    );
    drain(c)
}

fn yes(peer: u64, seq: u64) -> Event {
    msg(
        peer,
        PeerMessage::Vote {
            seq,
            vote: Vote::Yes,
            ack_through: 0,
        },
    )
}

#[test]
fn txn_state_transitions() {
    let parts: BTreeSet<PeerId> = [PeerId(1), PeerId(2)].into();
    let mut s = TxnState::preparing(&parts);
    assert_eq!(s.ready(2, 0), None);
    assert!(s.on_vote(PeerId(1), &Vote::Yes));
    assert!(!s.on_vote(PeerId(1), &Vote::Yes), "duplicate vote ignored");
    assert!(!s.on_vote(PeerId(9), &Vote::Yes), "stranger's vote ignored");
    s.on_peer_gone(PeerId(2));
    assert_eq!(s.ready(1, 0), Some(Decision::Commit));
    assert_eq!(
        s.ready(1, 2),
        Some(Decision::Abort(
            "only 1 slaves remained in sync, 2 required".into()
        ))
    );
    s.decide(Decision::Commit, 7);
    assert_eq!(
        s,
        TxnState::Deciding {
            decision: Decision::Commit,
            lsn: 7
        }
    );
    assert!(
        !s.on_vote(PeerId(2), &Vote::Yes),
        "votes after the decision are stale"
    );
    let remaining: BTreeSet<PeerId> = [PeerId(1)].into();
    assert_eq!(s.on_durable(&remaining), Decision::Commit);
    assert!(!s.is_finished());
    assert!(s.on_ack(PeerId(1)));
    assert!(s.is_finished());

    let mut s = TxnState::preparing(&parts);
    s.on_vote(PeerId(1), &Vote::No("disk".into()));
    assert_eq!(s.ready(2, 0), None, "still waiting for the other vote");
    s.on_vote(PeerId(2), &Vote::Yes);
    let Some(Decision::Abort(reason)) = s.ready(2, 0) else {
        panic!("a no vote must abort");
    };
    assert!(reason.contains("disk"));
    s.decide(Decision::Abort(reason), 1);
    assert!(matches!(s.on_durable(&parts), Decision::Abort(_)));
    assert!(matches!(s, TxnState::Aborting { .. }));
    assert_eq!(s.finish_abort(), None, "the participants have not acked");
    assert!(s.on_ack(PeerId(1)));
    s.on_peer_gone(PeerId(2));
    assert!(s.finish_abort().is_some_and(|r| r.contains("disk")));
    assert_eq!(s, TxnState::Aborted);
    assert!(s.is_finished());
    assert!(
        !s.on_ack(PeerId(1)),
        "an aborted transaction never becomes committed"
    );
    assert_eq!(s, TxnState::Aborted);
}

#[test]
fn without_slaves_a_write_commits_after_its_decision_is_durable() {
    let mut c = Coordinator::new(config(), 0);
    drain(&mut c);
    c.handle(1, writes(10, &["a", "b"]));
    let actions = drain(&mut c);
    assert_eq!(persist_lsns(&actions), vec![1]);
    assert!(!actions.iter().any(|a| matches!(a, Action::Apply { .. })));
    c.handle(2, Event::Persisted { lsn: 1 });
    let actions = drain(&mut c);
    assert_eq!(
        actions,
        vec![Action::Apply {
            seq: 1,
            ops: vec![put("a"), put("b")].into(),
            replies: vec![ClientRef(10), ClientRef(11)],
            key_hashes: vec![
                crate::replication::test_key_hash(b"a"),
                crate::replication::test_key_hash(b"b")
            ],
        }]
    );
    assert_eq!(c.commit_seq(), 1);
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn commit_waits_for_every_vote_then_sends_commit_to_participants() {
    let mut c = with_slaves(&[1, 2]);
    c.handle(1, writes(10, &["a"]));
    let actions = drain(&mut c);
    assert!(matches!(
        sends_to(&actions, 1)[..],
        [PeerMessage::Prepare { seq: 1, .. }]
    ));
    assert!(matches!(
        sends_to(&actions, 2)[..],
        [PeerMessage::Prepare { seq: 1, .. }]
    ));
    assert!(actions.contains(&Action::SetTimer {
        timer: TimerId::Txn(1),
        at_ms: 101
    }));
    c.handle(2, yes(1, 1));
    assert!(persist_lsns(&drain(&mut c)).is_empty());
    c.handle(3, yes(2, 1));
    let actions = drain(&mut c);
    assert_eq!(persist_lsns(&actions), vec![1]);
    assert!(actions.contains(&Action::CancelTimer {
        timer: TimerId::Txn(1)
    }));
    c.handle(4, Event::Persisted { lsn: 1 });
    let actions = drain(&mut c);
    assert!(matches!(actions[0], Action::Apply { seq: 1, .. }));
    // The COMMIT waits for a PREPARE to carry it; none comes, so it goes alone.
    assert_eq!(sends_to(&actions, 1), vec![]);
    assert!(actions.contains(&Action::SetTimer {
        timer: TimerId::CommitFlush,
        at_ms: 6
    }));
    let actions = flush_commits(&mut c, 6);
    assert_eq!(sends_to(&actions, 1), vec![PeerMessage::Commit { seq: 1 }]);
    assert_eq!(sends_to(&actions, 2), vec![PeerMessage::Commit { seq: 1 }]);
    assert!(matches!(c.txn_state(1), Some(TxnState::Committed { .. })));
    c.handle(5, msg(1, PeerMessage::Ack { seq: 1 }));
    c.handle(5, msg(2, PeerMessage::Ack { seq: 1 }));
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn decisions_are_taken_and_released_in_sequence_order() {
    let mut c = with_slaves(&[1]);
    c.handle(1, writes(10, &["a"]));
    c.handle(1, writes(20, &["b"]));
    drain(&mut c);
    // Transaction 2 is fully voted first but must wait for 1.
    c.handle(2, yes(1, 2));
    assert!(persist_lsns(&drain(&mut c)).is_empty());
    c.handle(3, yes(1, 1));
    let actions = drain(&mut c);
    assert_eq!(persist_lsns(&actions), vec![1, 2]);
    // Group completion: one durability report releases both, in order.
    c.handle(4, Event::Persisted { lsn: 2 });
    let applied: Vec<u64> = drain(&mut c)
        .iter()
        .filter_map(|a| match a {
            Action::Apply { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(applied, vec![1, 2]);
}

#[test]
fn a_silent_voter_is_evicted_at_the_timeout_and_the_txn_commits_without_it() {
    let mut c = with_slaves(&[1, 2]);
    c.handle(0, writes(10, &["a"]));
    drain(&mut c);
    c.handle(10, yes(1, 1));
    c.handle(
        100,
        Event::TimerFired {
            timer: TimerId::Txn(1),
        },
    );
    let actions = drain(&mut c);
    assert!(actions.contains(&Action::Disconnect { peer: PeerId(2) }));
    assert_eq!(persist_lsns(&actions), vec![1]);
    assert_eq!(
        c.members().get(PeerId(2)).map(|s| s.state),
        Some(SlaveState::Evicted)
    );
    c.handle(101, Event::Persisted { lsn: 1 });
    let actions = drain(&mut c);
    assert_eq!(
        sends_to(&actions, 2),
        vec![],
        "nothing more for an evicted slave"
    );
    let actions = flush_commits(&mut c, 103);
    assert_eq!(sends_to(&actions, 2), vec![]);
    assert_eq!(sends_to(&actions, 1), vec![PeerMessage::Commit { seq: 1 }]);
    // Its late vote and link loss change nothing.
    c.handle(102, yes(2, 1));
    c.handle(103, Event::PeerLost { peer: PeerId(2) });
    assert!(c.members().get(PeerId(2)).is_none());
}

#[test]
fn stale_timer_firings_are_ignored() {
    let mut c = with_slaves(&[1]);
    c.handle(0, writes(10, &["a"]));
    drain(&mut c);
    c.handle(
        50,
        Event::TimerFired {
            timer: TimerId::Txn(1),
        },
    );
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.members().in_sync_count(), 1);
}

#[test]
fn a_missing_ack_evicts_the_slave() {
    let mut c = with_slaves(&[1]);
    c.handle(0, writes(10, &["a"]));
    c.handle(1, yes(1, 1));
    c.handle(2, Event::Persisted { lsn: 1 });
    drain(&mut c);
    c.handle(
        102,
        Event::TimerFired {
            timer: TimerId::Txn(1),
        },
    );
    assert!(drain(&mut c).contains(&Action::Disconnect { peer: PeerId(1) }));
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn a_no_vote_aborts_replies_and_evicts_the_voter() {
    let mut c = with_slaves(&[1, 2]);
    c.handle(0, writes(10, &["a"]));
    drain(&mut c);
    c.handle(
        1,
        msg(
            1,
            PeerMessage::Vote {
                seq: 1,
                vote: Vote::No("confused".into()),
                ack_through: 0,
            },
        ),
    );
    let actions = drain(&mut c);
    assert!(actions.contains(&Action::Disconnect { peer: PeerId(1) }));
    c.handle(2, yes(2, 1));
    assert_eq!(persist_lsns(&drain(&mut c)), vec![1]);
    c.handle(3, Event::Persisted { lsn: 1 });
    let actions = drain(&mut c);
    assert!(
        matches!(
            &actions[..],
            [
                Action::Send {
                    peer: PeerId(2),
                    msg: PeerMessage::Abort { seq: 1 }
                },
                Action::SetTimer { .. }
            ]
        ),
        "the clients wait for the participants to have the abort: {actions:?}"
    );
    c.handle(4, writes(11, &["b"]));
    c.handle(5, yes(2, 2));
    c.handle(6, Event::Persisted { lsn: 2 });
    let actions = drain(&mut c);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Apply { .. })),
        "nothing later is released before the abort is acked: {actions:?}"
    );
    c.handle(7, msg(2, PeerMessage::Ack { seq: 1 }));
    let actions = drain(&mut c);
    assert!(
        matches!(
            &actions[..],
            [
                Action::Reply {
                    client: ClientRef(10),
                    error: WriteError::Aborted(_)
                },
                Action::CancelTimer { .. },
                Action::Apply { seq: 2, .. },
                ..
            ]
        ),
        "{actions:?}"
    );
}

#[test]
fn min_slaves_refuses_writes_and_aborts_when_participants_drop_below_it() {
    let mut c = Coordinator::new(
        CoordinatorConfig {
            min_slaves: 1,
            ..config()
        },
        0,
    );
    drain(&mut c);
    c.handle(0, writes(10, &["a"]));
    assert!(matches!(
        &drain(&mut c)[..],
        [Action::Reply {
            client: ClientRef(10),
            error: WriteError::Unavailable(_)
        }]
    ));
    c.handle(0, register(1, 0));
    c.handle(0, msg(1, PeerMessage::CaughtUp { seq: 0 }));
    c.handle(0, writes(20, &["b"]));
    drain(&mut c);
    c.handle(5, Event::PeerLost { peer: PeerId(1) });
    assert_eq!(persist_lsns(&drain(&mut c)), vec![1]);
    c.handle(6, Event::Persisted { lsn: 1 });
    assert!(matches!(
        &drain(&mut c)[..],
        [Action::Reply {
            client: ClientRef(20),
            error: WriteError::Aborted(_)
        }]
    ));
}

/// A master that has had a slave in this life (now gone), so it keeps its log.
fn keeping_log() -> Coordinator {
    let mut c = with_slaves(&[]);
    c.handle(0, register(99, 0));
    c.handle(0, Event::PeerLost { peer: PeerId(99) });
    drain(&mut c);
    c
}

#[test]
fn no_log_is_kept_before_any_slave_registers() {
    let mut c = with_slaves(&[]);
    for i in 0..3 {
        c.handle(0, writes(10 + i, &["a"]));
    }
    c.handle(0, Event::Persisted { lsn: 3 });
    drain(&mut c);
    // Nobody can hold a position in this history yet: a newcomer gets a snapshot.
    assert_eq!(
        catch_up_for(&mut c, 1, 0, 0),
        CatchUp::Snapshot { at_seq: 3 }
    );
}

#[test]
fn log_catch_up_then_in_sync_and_commits_before_join_arrive_as_log_entries() {
    let mut c = keeping_log();
    for i in 0..3 {
        c.handle(0, writes(10 + i, &["a"]));
    }
    c.handle(0, Event::Persisted { lsn: 3 });
    // Transaction 4 is in flight (not yet durable) when the slave registers.
    c.handle(0, writes(20, &["b"]));
    drain(&mut c);
    c.handle(1, register(7, 1));
    let actions = drain(&mut c);
    let sent = sends_to(&actions, 7);
    assert!(matches!(
        sent[0],
        PeerMessage::Registered {
            master_seq: 3,
            history_id: H,
            catch_up: CatchUp::Log { from_seq: 1 },
            epoch: 0,
        }
    ));
    assert!(matches!(sent[1], PeerMessage::LogEntry { seq: 2, .. }));
    assert!(matches!(sent[2], PeerMessage::LogEntry { seq: 3, .. }));
    assert_eq!(sent[3], PeerMessage::CaughtUp { seq: 3 });
    // Transaction 4 is released while the slave is tailing: forwarded as a log entry.
    c.handle(2, Event::Persisted { lsn: 4 });
    assert!(matches!(
        sends_to(&drain(&mut c), 7)[..],
        [PeerMessage::LogEntry { seq: 4, .. }]
    ));
    // The echo makes it a participant from the next transaction on.
    c.handle(3, msg(7, PeerMessage::CaughtUp { seq: 3 }));
    assert_eq!(
        c.members().get(PeerId(7)).map(|s| s.state),
        Some(SlaveState::InSync { join_seq: 5 })
    );
    c.handle(4, writes(30, &["c"]));
    assert!(matches!(
        sends_to(&drain(&mut c), 7)[..],
        [PeerMessage::Prepare { seq: 5, .. }]
    ));
}

#[test]
fn a_participant_joining_with_older_txns_in_flight_gets_them_as_log_entries_in_order() {
    let mut c = with_slaves(&[1]);
    c.handle(0, writes(10, &["a"])); // seq 1, slave 1 only
    drain(&mut c);
    c.handle(0, register(2, 0));
    c.handle(0, msg(2, PeerMessage::CaughtUp { seq: 0 }));
    drain(&mut c);
    c.handle(0, writes(20, &["b"])); // seq 2, both
    let actions = drain(&mut c);
    assert!(matches!(
        sends_to(&actions, 2)[..],
        [PeerMessage::Prepare { seq: 2, .. }]
    ));
    c.handle(1, yes(1, 1));
    c.handle(1, yes(1, 2));
    c.handle(1, yes(2, 2));
    c.handle(2, Event::Persisted { lsn: 2 });
    let mut sent = sends_to(&drain(&mut c), 2);
    sent.extend(sends_to(&flush_commits(&mut c, 4), 2));
    assert!(
        matches!(
            sent[..],
            [
                PeerMessage::LogEntry { seq: 1, .. },
                PeerMessage::Commit { seq: 2 }
            ]
        ),
        "{sent:?}"
    );
}

/// A lone master that committed six writes, whose log holds only 3..=6, and a
/// slave (link 1) that registered at 0: it needs a snapshot.
fn with_a_slave_the_log_does_not_cover() -> Coordinator {
    let mut c = with_slaves(&[]);
    for i in 0..6 {
        c.handle(0, writes(10 + i, &["a"]));
    }
    c.handle(0, Event::Persisted { lsn: 6 });
    drain(&mut c);
    c.handle(1, register(7, 0)); // log holds 3..=6 only
    c
}

#[test]
fn an_uncovered_slave_gets_a_snapshot_and_nothing_overtakes_it() {
    let mut c = with_a_slave_the_log_does_not_cover();
    let actions = drain(&mut c);
    assert!(actions.contains(&Action::StartSnapshot {
        peer: PeerId(7),
        at_seq: 6
    }));
    c.handle(2, writes(20, &["b"]));
    c.handle(2, Event::Persisted { lsn: 7 });
    assert_eq!(
        sends_to(&drain(&mut c), 7),
        vec![],
        "no log entry may overtake the chunks"
    );
    c.handle(
        3,
        Event::SnapshotSent {
            peer: PeerId(7),
            at_seq: 6,
        },
    );
    let sent = sends_to(&drain(&mut c), 7);
    assert!(matches!(
        sent[..],
        [
            PeerMessage::LogEntry { seq: 7, .. },
            PeerMessage::CaughtUp { seq: 7 }
        ]
    ));
}

/// The retry timer of `peer`'s snapshot, if `actions` arm it.
fn retry_timer(actions: &[Action], peer: u64) -> Option<u64> {
    actions.iter().find_map(|a| match a {
        Action::SetTimer {
            timer: TimerId::SnapshotRetry(p),
            at_ms,
        } if *p == PeerId(peer) => Some(*at_ms),
        _ => None,
    })
}

fn starts_snapshot(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|a| match a {
        Action::StartSnapshot { at_seq, .. } => Some(*at_seq),
        _ => None,
    })
}

/// Commit `n` one-write transactions at `now` (no slave votes on them).
fn commit_writes(c: &mut Coordinator, now: u64, n: u64) {
    for i in 0..n {
        c.handle(now, writes(1000 + i, &["a"]));
    }
    let lsn = c.last_lsn;
    c.handle(now, Event::Persisted { lsn });
    drain(c);
}

#[test]
fn a_snapshot_outrun_by_the_log_is_restarted_after_a_backoff() {
    let mut c = with_slaves(&[]);
    c.handle(0, writes(1, &["a"]));
    c.handle(0, Event::Persisted { lsn: 1 });
    c.handle(0, register(7, 5)); // ahead of the master: snapshot
    assert_eq!(starts_snapshot(&drain(&mut c)), Some(1));
    // More commits than even the pinned log keeps (4 x its capacity of 4).
    commit_writes(&mut c, 1, 20);
    assert_eq!(c.commit_seq(), 21);
    c.handle(
        2,
        Event::SnapshotSent {
            peer: PeerId(7),
            at_seq: 1,
        },
    );
    let actions = drain(&mut c);
    assert_eq!(starts_snapshot(&actions), None, "not at once: {actions:?}");
    assert_eq!(c.snapshot_restarts(), 1);
    // The slave hears heartbeats while it waits (it would give up on a silent master).
    assert_eq!(sends_to(&actions, 7), vec![PeerMessage::poll(21)]);
    assert_eq!(retry_timer(&actions, 7), Some(102), "next heartbeat");
    // Commits meanwhile are not pinned for the waiting slave.
    commit_writes(&mut c, 50, 20);
    c.handle(
        102,
        Event::TimerFired {
            timer: TimerId::SnapshotRetry(PeerId(7)),
        },
    );
    let actions = drain(&mut c);
    assert_eq!(starts_snapshot(&actions), None);
    assert_eq!(sends_to(&actions, 7), vec![PeerMessage::poll(41)]);
    assert_eq!(retry_timer(&actions, 7), Some(202));
    // The backoff (500 ms) is over: a snapshot of the present.
    c.handle(
        502,
        Event::TimerFired {
            timer: TimerId::SnapshotRetry(PeerId(7)),
        },
    );
    assert_eq!(starts_snapshot(&drain(&mut c)), Some(41));
    // Outrun again: the backoff doubles.
    commit_writes(&mut c, 503, 20);
    c.handle(
        600,
        Event::SnapshotSent {
            peer: PeerId(7),
            at_seq: 41,
        },
    );
    let actions = drain(&mut c);
    assert_eq!(starts_snapshot(&actions), None);
    assert_eq!(c.snapshot_restarts(), 2);
    c.handle(
        1_599,
        Event::TimerFired {
            timer: TimerId::SnapshotRetry(PeerId(7)),
        },
    );
    assert_eq!(starts_snapshot(&drain(&mut c)), None, "1000 ms backoff");
    c.handle(
        1_600,
        Event::TimerFired {
            timer: TimerId::SnapshotRetry(PeerId(7)),
        },
    );
    assert_eq!(starts_snapshot(&drain(&mut c)), Some(61));
    // A third snapshot the log covers finishes the catch-up.
    commit_writes(&mut c, 1_601, 3);
    c.handle(
        1_700,
        Event::SnapshotSent {
            peer: PeerId(7),
            at_seq: 61,
        },
    );
    let sent = sends_to(&drain(&mut c), 7);
    assert_eq!(sent.last(), Some(&PeerMessage::CaughtUp { seq: 64 }));
    assert_eq!(c.snapshot_restarts(), 2);
}

#[test]
fn a_slave_that_leaves_during_the_backoff_gets_no_snapshot() {
    let mut c = with_slaves(&[]);
    c.handle(0, writes(1, &["a"]));
    c.handle(0, Event::Persisted { lsn: 1 });
    c.handle(0, register(7, 5));
    drain(&mut c);
    commit_writes(&mut c, 1, 20);
    c.handle(
        2,
        Event::SnapshotSent {
            peer: PeerId(7),
            at_seq: 1,
        },
    );
    drain(&mut c);
    c.handle(3, Event::PeerLost { peer: PeerId(7) });
    drain(&mut c);
    c.handle(
        600,
        Event::TimerFired {
            timer: TimerId::SnapshotRetry(PeerId(7)),
        },
    );
    let actions = drain(&mut c);
    assert!(actions.is_empty(), "{actions:?}");
}

#[test]
fn a_sent_snapshot_gives_the_slave_time_to_read_the_backlog() {
    let mut c = with_slaves(&[]);
    c.handle(0, writes(1, &["a"]));
    c.handle(0, Event::Persisted { lsn: 1 });
    c.handle(0, register(7, 5));
    drain(&mut c);
    commit_writes(&mut c, 1, 3);
    c.handle(
        10,
        Event::SnapshotSent {
            peer: PeerId(7),
            at_seq: 1,
        },
    );
    drain(&mut c);
    // Up to 1 MiB of chunks and a tiny backlog ahead of its answer: 2 x 250 ms.
    assert_eq!(
        c.members().get(PeerId(7)).map(|s| s.last_heard_ms),
        Some(510)
    );
}

/// A coordinator streaming a snapshot at seq 1 to slave 7, with a log of
/// capacity 4 (pinned: 16 transactions; 4 of them are a quarter).
fn snapshotting() -> Coordinator {
    let mut c = with_slaves(&[]);
    c.handle(0, writes(1, &["a"]));
    c.handle(0, Event::Persisted { lsn: 1 });
    c.handle(0, register(7, 5));
    assert_eq!(starts_snapshot(&drain(&mut c)), Some(1));
    c
}

fn progress(done_per_mille: u64) -> Event {
    Event::SnapshotProgress {
        peer: PeerId(7),
        at_seq: 1,
        done_per_mille,
    }
}

#[test]
fn writes_are_held_back_for_a_snapshot_past_a_quarter_of_the_pinned_log() {
    let mut c = snapshotting();
    assert_eq!(c.write_hold(1), None, "an empty log holds nothing back");
    commit_writes(&mut c, 1, 3);
    assert_eq!(c.write_hold(1), None, "3 of 16: below a quarter");
    commit_writes(&mut c, 1, 1);
    assert_eq!(
        c.write_hold(2),
        Some(52),
        "a quarter: held for 50 ms at most"
    );
    assert_eq!(c.write_hold(30), Some(52), "the hold keeps its start");
    assert_eq!(c.write_throttle_ms(30), 28);
    assert_eq!(c.write_hold(52), None, "the hold bound lets the batch go");
    assert_eq!(c.write_throttle_ms(60), 50);
    // Progress raises the allowance: half streamed, half the pinned log.
    c.handle(60, progress(500));
    assert_eq!(c.write_hold(60), None, "4 of 8 allowed");
    commit_writes(&mut c, 60, 4);
    assert_eq!(c.write_hold(61), Some(111), "8 of 8 allowed");
    c.handle(70, progress(750));
    assert_eq!(c.write_hold(70), None, "8 of 10 allowed");
    assert_eq!(c.write_throttle_ms(70), 59);
    // Progress never moves back, and a report for another snapshot is ignored.
    c.handle(71, progress(100));
    c.handle(
        71,
        Event::SnapshotProgress {
            peer: PeerId(7),
            at_seq: 99,
            done_per_mille: 0,
        },
    );
    assert_eq!(c.write_hold(71), None);
}

#[test]
fn a_stalled_snapshot_or_a_broken_pin_holds_no_writes() {
    let mut c = snapshotting();
    commit_writes(&mut c, 1, 6);
    assert!(c.write_hold(10).is_some());
    assert_eq!(c.write_hold(60), None);
    assert!(
        c.write_hold(2_999).is_some(),
        "started at 0: not stalled yet"
    );
    assert_eq!(c.write_hold(3_049), None);
    // No progress for 3 s: the slave is not reading; writes go on.
    assert_eq!(c.write_hold(3_050), None);
    c.handle(3_100, progress(10));
    assert!(c.write_hold(3_100).is_some(), "streaming again");
    // Past the pinned bounds the log wrapped: the snapshot is lost anyway.
    commit_writes(&mut c, 3_101, 11);
    assert!(!c.log.pin_holds());
    assert_eq!(c.write_hold(3_102), None);
}

#[test]
fn the_hold_bound_doubles_with_each_restart_up_to_four_times() {
    let mut c = snapshotting();
    let mut now = 1;
    let mut at_seq = 1;
    for (restart, hold_ms) in [(0, 50), (1, 100), (2, 200), (3, 200)] {
        assert_eq!(c.snapshot_restarts(), restart);
        commit_writes(&mut c, now, 4);
        assert_eq!(c.write_hold(now), Some(now + hold_ms), "restart {restart}");
        assert_eq!(c.write_hold(now + hold_ms), None);
        // Outrun the snapshot, then let the backoff run out.
        commit_writes(&mut c, now, 20);
        c.handle(
            now,
            Event::SnapshotSent {
                peer: PeerId(7),
                at_seq,
            },
        );
        drain(&mut c);
        now += 10_000;
        c.handle(
            now,
            Event::TimerFired {
                timer: TimerId::SnapshotRetry(PeerId(7)),
            },
        );
        at_seq = starts_snapshot(&drain(&mut c)).expect("a new snapshot");
    }
}

#[test]
fn the_log_is_pinned_while_a_snapshot_streams() {
    let mut c = with_slaves(&[]);
    c.handle(0, writes(1, &["a"]));
    c.handle(0, Event::Persisted { lsn: 1 });
    c.handle(0, register(7, 5)); // ahead of the master: snapshot at 1
    drain(&mut c);
    // More commits than the log's capacity of 4, but within its slack.
    for i in 0..6 {
        c.handle(1, writes(10 + i, &["a"]));
    }
    c.handle(1, Event::Persisted { lsn: 7 });
    drain(&mut c);
    c.handle(
        2,
        Event::SnapshotSent {
            peer: PeerId(7),
            at_seq: 1,
        },
    );
    let actions = drain(&mut c);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::StartSnapshot { .. })),
        "no second snapshot: {actions:?}"
    );
    let sent = sends_to(&actions, 7);
    let replayed: Vec<u64> = sent
        .iter()
        .filter_map(|m| match m {
            PeerMessage::LogEntry { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(replayed, (2..=7).collect::<Vec<_>>());
    assert!(matches!(
        sent.last(),
        Some(PeerMessage::CaughtUp { seq: 7 })
    ));
}

#[test]
fn re_registration_evicts_the_old_link_of_the_same_slave() {
    let mut c = with_slaves(&[1]);
    c.handle(0, writes(10, &["a"]));
    drain(&mut c);
    c.handle(
        1,
        msg(
            2,
            PeerMessage::Register {
                client_addr: "slave1".into(),
                last_applied_seq: 0,
                history_id: 0,
                protocol_version: PEER_PROTOCOL_VERSION,
                node_id: 0,
                may_discard_data: false,
                epoch: 0,
            },
        ),
    );
    let actions = drain(&mut c);
    assert!(actions.contains(&Action::Disconnect { peer: PeerId(1) }));
    // Transaction 1 no longer waits for the old link.
    assert_eq!(persist_lsns(&actions), vec![1]);
}

#[test]
fn heartbeats_go_out_and_silent_slaves_are_evicted() {
    let mut c = with_slaves(&[1, 2]);
    c.handle(
        900,
        msg(
            1,
            PeerMessage::Heartbeat {
                seq: 0,
                stamp: 0,
                lease_ms: 0,
                poll: false,
            },
        ),
    );
    c.handle(
        1_500,
        Event::TimerFired {
            timer: TimerId::Heartbeat,
        },
    );
    let actions = drain(&mut c);
    assert_eq!(sends_to(&actions, 1), vec![PeerMessage::poll(0)]);
    assert!(actions.contains(&Action::Disconnect { peer: PeerId(2) }));
    assert!(actions.contains(&Action::SetTimer {
        timer: TimerId::Heartbeat,
        at_ms: 1_600
    }));
}

#[test]
fn outcome_queries_and_presumed_abort_after_restart() {
    let mut log = CommitLog::new(4, 5);
    log.push(7, vec![put("a")].into());
    let mut c = Coordinator::recover(config(), 0, 8, log);
    c.handle(0, register(1, 8));
    c.handle(0, msg(1, PeerMessage::CaughtUp { seq: 8 }));
    drain(&mut c);
    for (seq, want) in [
        (5, Outcome::Unknown),
        (6, Outcome::Aborted),
        (7, Outcome::Committed),
        (8, Outcome::Aborted),
        (9, Outcome::Aborted), // prepared by the previous life, never decided
    ] {
        c.handle(1, msg(1, PeerMessage::OutcomeQuery { seq }));
        assert_eq!(
            sends_to(&drain(&mut c), 1),
            vec![PeerMessage::Outcome { seq, outcome: want }]
        );
    }
    c.handle(2, writes(10, &["x"]));
    assert!(matches!(
        sends_to(&drain(&mut c), 1)[..],
        [PeerMessage::Prepare { seq: 9, .. }]
    ));
    c.handle(2, msg(1, PeerMessage::OutcomeQuery { seq: 9 }));
    assert_eq!(
        sends_to(&drain(&mut c), 1),
        vec![PeerMessage::Outcome {
            seq: 9,
            outcome: Outcome::Pending
        }]
    );
}

#[test]
fn unregistered_and_misbehaving_peers_are_disconnected() {
    let mut c = with_slaves(&[1]);
    c.handle(0, msg(9, PeerMessage::Ack { seq: 1 }));
    assert_eq!(drain(&mut c), vec![Action::Disconnect { peer: PeerId(9) }]);
    c.handle(0, msg(1, PeerMessage::Commit { seq: 1 }));
    assert!(drain(&mut c).contains(&Action::Disconnect { peer: PeerId(1) }));
    c.handle(0, register(3, 0));
    c.handle(0, register(3, 0));
    assert!(drain(&mut c).contains(&Action::Disconnect { peer: PeerId(3) }));
}

/// The catch-up a registration gets: what REGISTERED says and whether a snapshot starts.
fn catch_up_for(c: &mut Coordinator, peer: u64, last: u64, history_id: u64) -> CatchUp {
    catch_up_for_with(c, peer, last, history_id, true)
}

fn catch_up_for_with(
    c: &mut Coordinator,
    peer: u64,
    last: u64,
    history_id: u64,
    may_discard_data: bool,
) -> CatchUp {
    c.handle(1, register_with(peer, last, history_id, may_discard_data));
    let actions = drain(c);
    let sent = sends_to(&actions, peer);
    let PeerMessage::Registered {
        history_id: announced,
        catch_up,
        ..
    } = sent[0]
    else {
        panic!("first reply is not REGISTERED: {sent:?}");
    };
    assert_eq!(announced, H, "REGISTERED carries the master's history id");
    let snapshot = actions
        .iter()
        .any(|a| matches!(a, Action::StartSnapshot { peer: p, .. } if *p == PeerId(peer)));
    assert_eq!(snapshot, matches!(catch_up, CatchUp::Snapshot { .. }));
    catch_up
}

#[test]
fn log_replay_only_within_the_masters_history() {
    let mut c = keeping_log();
    for i in 0..3 {
        c.handle(0, writes(10 + i, &["a"]));
    }
    c.handle(0, Event::Persisted { lsn: 3 });
    drain(&mut c);
    // The log holds 1..=3 and covers every position 0..=3.
    assert_eq!(catch_up_for(&mut c, 1, 1, H), CatchUp::Log { from_seq: 1 });
    assert_eq!(catch_up_for(&mut c, 2, 3, H), CatchUp::Log { from_seq: 3 });
    // A fresh slave: position 0, no history.
    assert_eq!(catch_up_for(&mut c, 3, 0, 0), CatchUp::Log { from_seq: 0 });
    // Position 1 of another history (an earlier life of this master, or another
    // master) names another transaction: snapshot, although the log covers 1.
    assert_eq!(
        catch_up_for(&mut c, 4, 1, H + 1),
        CatchUp::Snapshot { at_seq: 3 }
    );
    assert_eq!(
        catch_up_for(&mut c, 5, 3, H + 1),
        CatchUp::Snapshot { at_seq: 3 }
    );
    assert_eq!(
        catch_up_for(&mut c, 6, 0, H + 1),
        CatchUp::Snapshot { at_seq: 3 }
    );
    // A position without a history (a slave that recovered its store but not the
    // id) cannot be trusted either.
    assert_eq!(
        catch_up_for(&mut c, 7, 2, 0),
        CatchUp::Snapshot { at_seq: 3 }
    );
    // Same history but ahead of the master: snapshot, as before.
    assert_eq!(
        catch_up_for(&mut c, 8, 4, H),
        CatchUp::Snapshot { at_seq: 3 }
    );
}

/// The integration scenario in miniature: a slave of the first life at 2 meets the
/// second life at 3, whose log covers 2. Log replay would send only entry 3 and
/// leave the first life's writes in place.
#[test]
fn a_slave_of_an_earlier_life_of_the_master_gets_a_snapshot() {
    let first = CoordinatorConfig {
        history_id: 0x1111,
        ..config()
    };
    let mut old = Coordinator::new(first, 0);
    old.handle(0, register_from(1, 0, 0));
    let sent = sends_to(&drain(&mut old), 1);
    assert!(matches!(
        sent[0],
        PeerMessage::Registered {
            history_id: 0x1111,
            ..
        }
    ));

    let mut c = Coordinator::new(config(), 0); // restarted without its data
    for i in 0..3 {
        c.handle(0, writes(10 + i, &["b"]));
    }
    c.handle(0, Event::Persisted { lsn: 3 });
    drain(&mut c);
    c.handle(1, register_from(1, 2, 0x1111));
    let actions = drain(&mut c);
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::Send {
                msg: PeerMessage::LogEntry { .. },
                ..
            }
        )),
        "no log entry of the new history may reach the old one: {actions:?}"
    );
    assert!(actions.contains(&Action::StartSnapshot {
        peer: PeerId(1),
        at_seq: 3
    }));
}

/// Issue 10 item 12: a master restarted without its data showed a slave of
/// its earlier life with that life's position as `applied` (and lag 0) until
/// the new history passed it.
#[test]
fn a_slave_of_another_history_shows_no_applied_position_in_ours() {
    let mut c = Coordinator::new(config(), 0);
    for i in 0..3 {
        c.handle(0, writes(10 + i, &["b"]));
    }
    c.handle(0, Event::Persisted { lsn: 3 });
    drain(&mut c);
    let applied = |c: &Coordinator, peer: u64| c.members().get(PeerId(peer)).map(|s| s.applied_seq);
    // Replaced by a snapshot, and kept (diverged): neither has applied ours.
    c.handle(1, register_with(1, 500, 0x1111, true));
    c.handle(1, register_with(2, 500, 0x1111, false));
    drain(&mut c);
    assert_eq!(applied(&c, 1), Some(0));
    assert_eq!(applied(&c, 2), Some(0));
    assert_eq!(c.members().get(PeerId(1)).map(|s| s.lag(3)), Some(3));
    // Once loaded, its heartbeat answers report our positions.
    c.handle(
        2,
        msg(
            1,
            PeerMessage::Heartbeat {
                seq: 3,
                stamp: 0,
                lease_ms: 0,
                poll: false,
            },
        ),
    );
    assert_eq!(applied(&c, 1), Some(3));
    // Within our history the slave's own position stands, even ahead of us.
    c.handle(1, register_with(3, 2, H, false));
    c.handle(1, register_with(4, 9, H, false));
    drain(&mut c);
    assert_eq!(applied(&c, 3), Some(2));
    assert_eq!(applied(&c, 4), Some(9));
}

#[test]
fn a_slave_whose_data_a_snapshot_would_replace_is_diverged_unless_allowed() {
    let mut c = keeping_log();
    for i in 0..3 {
        c.handle(0, writes(10 + i, &["a"]));
    }
    c.handle(0, Event::Persisted { lsn: 3 });
    drain(&mut c);
    // Data of another history, and data ahead of ours: kept, nothing sent but REGISTERED.
    for (peer, last, history) in [(1, 2, H + 1), (2, 9, H), (3, 2, 0)] {
        c.handle(1, register_with(peer, last, history, false));
        let actions = drain(&mut c);
        assert_eq!(
            sends_to(&actions, peer),
            vec![PeerMessage::Registered {
                master_seq: 3,
                history_id: H,
                catch_up: CatchUp::Diverged,
                epoch: 0,
            }],
            "slave {peer}"
        );
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::StartSnapshot { .. })),
            "no snapshot for slave {peer}"
        );
        assert_eq!(
            c.members().get(PeerId(peer)).map(|s| s.state),
            Some(SlaveState::Diverged)
        );
    }
    // Diverged slaves are heartbeated (the link stays up) but take no part in writes.
    c.handle(
        200,
        Event::TimerFired {
            timer: TimerId::Heartbeat,
        },
    );
    let beats = drain(&mut c);
    assert!(beats.iter().any(|a| matches!(
        a,
        Action::Send {
            peer: PeerId(1),
            msg: PeerMessage::Heartbeat { .. }
        }
    )));
    c.handle(200, writes(20, &["b"]));
    let prepares: Vec<_> = drain(&mut c)
        .into_iter()
        .filter(|a| {
            matches!(
                a,
                Action::Send {
                    msg: PeerMessage::Prepare { .. },
                    ..
                }
            )
        })
        .collect();
    assert!(prepares.is_empty(), "{prepares:?}");
    assert_eq!(c.members().in_sync_count(), 0);
    // An empty slave, or one behind us in our history, loses nothing: no question asked.
    assert_eq!(
        catch_up_for_with(&mut c, 4, 0, H + 1, false),
        CatchUp::Snapshot { at_seq: 3 }
    );
    // With the operator's consent the snapshot replaces the data.
    assert_eq!(
        catch_up_for_with(&mut c, 5, 2, H + 1, true),
        CatchUp::Snapshot { at_seq: 3 }
    );
}

#[test]
fn a_re_registering_node_replaces_its_old_link_by_node_id() {
    let mut c = keeping_log();
    let reg = |peer: u64, addr: &str| {
        msg(
            peer,
            PeerMessage::Register {
                client_addr: addr.into(),
                last_applied_seq: 0,
                history_id: 0,
                protocol_version: PEER_PROTOCOL_VERSION,
                node_id: 0xAB,
                may_discard_data: false,
                epoch: 0,
            },
        )
    };
    c.handle(0, reg(1, "0.0.0.0:9100"));
    drain(&mut c);
    c.handle(1, reg(2, "10.0.0.2:9100"));
    let actions = drain(&mut c);
    assert!(actions.contains(&Action::Disconnect { peer: PeerId(1) }));
    // Two nodes announcing the same address do not evict each other.
    c.handle(
        2,
        msg(
            3,
            PeerMessage::Register {
                client_addr: "10.0.0.2:9100".into(),
                last_applied_seq: 0,
                history_id: 0,
                protocol_version: PEER_PROTOCOL_VERSION,
                node_id: 0xCD,
                may_discard_data: false,
                epoch: 0,
            },
        ),
    );
    assert!(!drain(&mut c).contains(&Action::Disconnect { peer: PeerId(2) }));
}

/// A coordinator that records its in-sync set, with slaves `peers` (node id =
/// 100 + peer) in sync and recorded.
fn recording(peers: &[u64]) -> Coordinator {
    let mut c = Coordinator::new(
        CoordinatorConfig {
            record_sync_set: true,
            epoch: 3,
            ..config()
        },
        0,
    );
    for &p in peers {
        c.handle(
            0,
            msg(
                p,
                PeerMessage::Register {
                    client_addr: format!("slave{p}"),
                    last_applied_seq: 0,
                    history_id: H,
                    protocol_version: PEER_PROTOCOL_VERSION,
                    node_id: 100 + p,
                    may_discard_data: false,
                    epoch: 3,
                },
            ),
        );
        c.handle(0, msg(p, PeerMessage::CaughtUp { seq: 0 }));
    }
    drain(&mut c);
    // Recorded only once each has durably acked a transaction it took part in.
    c.handle(1, writes(1, &["warm"]));
    for &p in peers {
        c.handle(1, yes(p, 1));
    }
    c.handle(1, Event::Persisted { lsn: 1 });
    drain(&mut c);
    let mut requests = Vec::new();
    for &p in peers {
        c.handle(2, msg(p, PeerMessage::Ack { seq: 1 }));
        requests.extend(drain(&mut c));
    }
    assert!(
        c.recorded_sync_set().is_empty(),
        "not before the store says so"
    );
    // Complete each write as the store would; each completion may ask for the next.
    while let Some(Action::RecordSyncSet { version, .. }) = requests
        .iter()
        .rev()
        .find(|a| matches!(a, Action::RecordSyncSet { .. }))
        .cloned()
    {
        c.handle(3, Event::SyncSetRecorded { version });
        requests = drain(&mut c);
    }
    let want: Vec<u64> = peers.iter().map(|p| 100 + p).collect();
    assert_eq!(
        c.recorded_sync_set().iter().copied().collect::<Vec<_>>(),
        want
    );
    c
}

#[test]
fn a_slave_is_recorded_once_it_durably_acked_and_a_removal_is_recorded_before_deciding_without_it()
{
    let mut c = recording(&[1, 2]);
    assert_eq!(
        c.recorded_sync_set().iter().copied().collect::<Vec<_>>(),
        vec![101, 102]
    );
    // Slave 2 vanishes with a transaction in flight: nothing is decided
    // until the store holds a set without it.
    c.handle(10, writes(20, &["a"]));
    c.handle(10, yes(1, 2));
    drain(&mut c);
    c.handle(11, Event::PeerLost { peer: PeerId(2) });
    let actions = drain(&mut c);
    let [Action::RecordSyncSet { version, members }] = &actions[..] else {
        panic!("{actions:?}");
    };
    assert_eq!(members, &vec![101]);
    let version = *version;
    c.handle(12, writes(30, &["b"]));
    c.handle(12, yes(1, 3));
    assert!(
        persist_lsns(&drain(&mut c)).is_empty(),
        "no decision while the removal is unrecorded"
    );
    c.handle(20, Event::SyncSetRecorded { version });
    assert_eq!(persist_lsns(&drain(&mut c)), vec![2, 3]);
    assert_eq!(
        c.recorded_sync_set().iter().copied().collect::<Vec<_>>(),
        vec![101]
    );
}

#[test]
fn a_slave_that_never_was_recorded_leaves_without_waiting() {
    let mut c = recording(&[1]);
    // Slave 2 joins but has acked nothing it took part in: not recorded.
    c.handle(
        5,
        msg(
            2,
            PeerMessage::Register {
                client_addr: "slave2".into(),
                last_applied_seq: 1,
                history_id: H,
                protocol_version: PEER_PROTOCOL_VERSION,
                node_id: 102,
                may_discard_data: false,
                epoch: 3,
            },
        ),
    );
    c.handle(5, msg(2, PeerMessage::CaughtUp { seq: 1 }));
    drain(&mut c);
    c.handle(6, writes(40, &["c"]));
    c.handle(6, yes(1, 2));
    c.handle(7, Event::PeerLost { peer: PeerId(2) });
    let actions = drain(&mut c);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::RecordSyncSet { .. })),
        "{actions:?}"
    );
    assert_eq!(persist_lsns(&actions), vec![2], "decided at once");
}

/// Failover sim seed 28117 (before clock drift): a promoted slave's in-doubt
/// commits reached a slave by log before they were durable; the promoted node
/// crashed, lost the last of them, and the slave was left ahead of it.
#[test]
fn registrations_wait_until_a_promotions_commits_are_durable() {
    let mut log = CommitLog::new(100, 0);
    log.push(1, vec![put("a")].into());
    let mut c = Coordinator::recover(config(), 0, 1, log);
    c.start_lsns_after(5, 3);
    c.hold_registrations_until(5);
    drain(&mut c);
    c.handle(1, register(7, 0));
    c.handle(1, register(8, 0));
    c.handle(1, Event::PeerLost { peer: PeerId(8) });
    assert!(drain(&mut c).is_empty(), "held until lsn 5 is durable");
    c.handle(2, Event::Persisted { lsn: 4 });
    assert!(drain(&mut c).is_empty());
    c.handle(3, Event::Persisted { lsn: 5 });
    let sent: Vec<(PeerId, PeerMessage)> = drain(&mut c)
        .into_iter()
        .filter_map(|a| match a {
            Action::Send { peer, msg } => Some((peer, msg)),
            _ => None,
        })
        .collect();
    assert!(
        matches!(
            &sent[..],
            [
                (PeerId(7), PeerMessage::Registered { .. }),
                (PeerId(7), PeerMessage::LogEntry { seq: 1, .. }),
                (PeerId(7), PeerMessage::CaughtUp { seq: 1 })
            ]
        ),
        "{sent:?}"
    );
}

#[test]
fn a_master_of_an_older_epoch_is_refused_and_without_its_lease_acknowledges_nothing() {
    let mut c = recording(&[1]);
    c.handle(
        5,
        msg(
            7,
            PeerMessage::Register {
                client_addr: "newer".into(),
                last_applied_seq: 0,
                history_id: H,
                protocol_version: PEER_PROTOCOL_VERSION,
                node_id: 107,
                may_discard_data: false,
                epoch: 4,
            },
        ),
    );
    assert_eq!(drain(&mut c), vec![Action::Disconnect { peer: PeerId(7) }]);

    c.handle(6, writes(50, &["d"]));
    c.handle(6, yes(1, 2));
    c.set_lease_valid(6, false);
    c.handle(7, Event::Persisted { lsn: 2 });
    let actions = drain(&mut c);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Apply { .. })),
        "nothing released without the lease: {actions:?}"
    );
    c.handle(8, writes(60, &["e"]));
    assert!(matches!(
        &drain(&mut c)[..],
        [Action::Reply {
            client: ClientRef(60),
            error: WriteError::Unavailable(_)
        }]
    ));
    assert_eq!(
        c.decided_commits().into_keys().collect::<Vec<_>>(),
        vec![2],
        "decided and logged, held back by the lease"
    );
    c.set_lease_valid(9, true);
    assert!(
        drain(&mut c)
            .iter()
            .any(|a| matches!(a, Action::Apply { seq: 2, .. }))
    );
    assert!(c.decided_commits().is_empty(), "released");
    assert_eq!(c.used_seq(), 2);
    c.handle(10, writes(70, &["f"]));
    c.handle(10, yes(1, 3));
    c.handle(11, writes(80, &["g"]));
    drain(&mut c);
    // 3 is decided (its record appended, not yet durable); 4 waits for its vote.
    assert_eq!(
        c.decided_commits().keys().copied().collect::<Vec<_>>(),
        vec![3],
        "a decided commit is in the log: a re-election must commit it too"
    );
    assert_eq!(c.used_seq(), 4);
    assert_eq!(c.abandon(), vec![ClientRef(70), ClientRef(80)]);
    assert_eq!(c.in_flight(), 0);
}

/// A slave's heartbeat answering a poll: stamped `stamp`, asking `lease_ms`.
fn stamped(peer: u64, stamp: u64, lease_ms: u32) -> Event {
    msg(
        peer,
        PeerMessage::Heartbeat {
            seq: 0,
            stamp,
            lease_ms,
            poll: false,
        },
    )
}

/// The lease granted in `actions` to `peer`: (stamp, lease).
fn grants(actions: &[Action], peer: u64) -> Vec<(u64, u32)> {
    sends_to(actions, peer)
        .into_iter()
        .filter_map(|m| match m {
            PeerMessage::Heartbeat {
                stamp,
                lease_ms,
                poll: false,
                ..
            } => Some((stamp, lease_ms)),
            _ => None,
        })
        .collect()
}

fn applied_seqs(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Apply { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

#[test]
fn an_in_sync_slave_gets_its_lease_capped_at_the_2pc_timeout() {
    let mut c = with_slaves(&[1]);
    c.handle(10, stamped(1, 7, 50));
    assert_eq!(grants(&drain(&mut c), 1), vec![(7, 50)]);
    // More than the 2PC timeout (100 ms here) is not granted.
    c.handle(20, stamped(1, 17, 5_000));
    assert_eq!(grants(&drain(&mut c), 1), vec![(17, 100)]);
    // A slave that asks none gets none.
    c.handle(30, stamped(1, 27, 0));
    assert!(grants(&drain(&mut c), 1).is_empty());
}

#[test]
fn a_slave_still_catching_up_gets_no_lease() {
    let mut c = Coordinator::new(config(), 0);
    c.handle(0, register(1, 0));
    let mut snap = Coordinator::new(config(), 0);
    drain(&mut c);
    c.handle(1, stamped(1, 1, 50));
    // Registered and sent the backlog: tailing, so it receives every commit.
    assert_eq!(grants(&drain(&mut c), 1), vec![(1, 50)]);
    // A slave receiving a snapshot does not: the commits since are not sent to it yet.
    snap.handle(0, writes(1, &["a"]));
    snap.handle(0, Event::Persisted { lsn: 1 });
    snap.handle(1, register_from(1, 0, 0xDEAD));
    drain(&mut snap);
    snap.handle(2, stamped(1, 2, 50));
    assert!(grants(&drain(&mut snap), 1).is_empty());
}

#[test]
fn no_lease_outlives_a_deadline_the_slave_is_about_to_miss() {
    let mut c = with_slaves(&[1]);
    // Transaction 1 awaits slave 1's vote until 100.
    c.handle(0, writes(10, &["a"]));
    drain(&mut c);
    // A lease from 40 for 50 ms ends at 90: before the deadline.
    c.handle(40, stamped(1, 40, 50));
    assert_eq!(grants(&drain(&mut c), 1), vec![(40, 50)]);
    // One from 60 would end at 110, after it: withheld.
    c.handle(60, stamped(1, 60, 50));
    assert!(grants(&drain(&mut c), 1).is_empty());
    // Evicted at the deadline, it has stopped serving already: no fence.
    c.handle(
        100,
        Event::TimerFired {
            timer: TimerId::Txn(1),
        },
    );
    c.handle(101, Event::Persisted { lsn: 1 });
    assert_eq!(applied_seqs(&drain(&mut c)), vec![1]);
}

#[test]
fn releases_wait_for_the_lease_of_a_slave_that_left() {
    let mut c = with_slaves(&[1, 2]);
    c.handle(10, stamped(1, 10, 80));
    drain(&mut c);
    // Slave 1 votes no at 20 and is evicted with its lease running to 90.
    c.handle(20, writes(10, &["a"]));
    c.handle(
        20,
        msg(
            1,
            PeerMessage::Vote {
                seq: 1,
                vote: Vote::No("disk full".into()),
                ack_through: 0,
            },
        ),
    );
    let actions = drain(&mut c);
    assert!(actions.contains(&Action::Disconnect { peer: PeerId(1) }));
    assert!(actions.contains(&Action::SetTimer {
        timer: TimerId::ReadFence,
        at_ms: 90
    }));
    // The next transaction commits without it, but is not released before 90.
    c.handle(30, writes(20, &["b"]));
    c.handle(31, yes(2, 1));
    c.handle(31, yes(2, 2));
    c.handle(32, Event::Persisted { lsn: 1 });
    c.handle(32, Event::Persisted { lsn: 2 });
    let held = drain(&mut c);
    assert!(applied_seqs(&held).is_empty(), "{held:?}");
    c.handle(
        90,
        Event::TimerFired {
            timer: TimerId::ReadFence,
        },
    );
    // Transaction 1 aborted (the NO vote): ABORT goes out now, and once
    // slave 2 has it (clients hear ABORTED only then) 2 commits.
    assert_eq!(
        sends_to(&drain(&mut c), 2),
        vec![PeerMessage::Abort { seq: 1 }]
    );
    c.handle(91, msg(2, PeerMessage::Ack { seq: 1 }));
    assert_eq!(applied_seqs(&drain(&mut c)), vec![2]);
}

#[test]
fn a_lost_slave_fences_releases_too_and_a_restarted_master_waits_out_old_leases() {
    let mut c = with_slaves(&[1]);
    c.handle(10, stamped(1, 10, 60));
    drain(&mut c);
    c.handle(20, Event::PeerLost { peer: PeerId(1) });
    assert!(drain(&mut c).contains(&Action::SetTimer {
        timer: TimerId::ReadFence,
        at_ms: 70
    }));
    // A master restarted from its log may have granted leases in its last life.
    recovered_master_releases_only_after_the_fence(9, CommitLog::new(4, 9));
}

/// Recovers a master at 500 ms (fence 100 ms) after `last_seq`, and checks
/// that its first commit is held until the fence fires at 600.
fn recovered_master_releases_only_after_the_fence(last_seq: u64, log: CommitLog) {
    let mut r = Coordinator::recover(config(), 500, last_seq, log);
    assert!(drain(&mut r).contains(&Action::SetTimer {
        timer: TimerId::ReadFence,
        at_ms: 600
    }));
    r.handle(510, writes(1, &["a"]));
    r.handle(511, Event::Persisted { lsn: 1 });
    assert!(applied_seqs(&drain(&mut r)).is_empty());
    r.handle(
        600,
        Event::TimerFired {
            timer: TimerId::ReadFence,
        },
    );
    assert_eq!(applied_seqs(&drain(&mut r)), vec![last_seq + 1]);
}

#[test]
fn a_master_restarted_before_its_first_commit_still_waits_out_old_leases() {
    // An idle master's heartbeats grant leases at seq 0: a restart with
    // nothing committed must fence reads as well (simulation seed 11648).
    recovered_master_releases_only_after_the_fence(0, CommitLog::new(4, 0));
    // A new history has no earlier life: nothing to wait for.
    let mut n = Coordinator::new(config(), 500);
    assert!(!drain(&mut n).iter().any(|a| matches!(
        a,
        Action::SetTimer {
            timer: TimerId::ReadFence,
            ..
        }
    )));
    n.handle(510, writes(1, &["a"]));
    n.handle(511, Event::Persisted { lsn: 1 });
    assert_eq!(applied_seqs(&drain(&mut n)), vec![1]);
}

#[test]
fn a_master_recovered_after_an_abort_numbers_after_it() {
    // Recovery passes the last decision, abort included (the server takes it
    // from the log's highest number): slaves were told positions through
    // that abort, so a new commit must not reuse its number (seed 19622).
    let mut r = Coordinator::recover(config(), 0, 12, CommitLog::new(4, 9));
    drain(&mut r);
    r.handle(
        100,
        Event::TimerFired {
            timer: TimerId::ReadFence,
        },
    );
    r.handle(101, writes(1, &["a"]));
    r.handle(102, Event::Persisted { lsn: 1 });
    assert_eq!(applied_seqs(&drain(&mut r)), vec![13]);
    assert_eq!(r.commit_seq(), 13);
}

fn lag_config() -> CoordinatorConfig {
    CoordinatorConfig {
        tpc_timeout_ms: 1_000,
        max_slave_lag_ms: 50,
        first_probation_ms: 400,
        max_probation_ms: 1_000,
        ..config()
    }
}

/// Round `round` at `t`: transaction `round + 1` (client 10 + 10 × round)
/// waits 50 ms on slave link `link` after slave 2 voted, and that lagging
/// link is evicted and closed before the transaction is durable.
fn lag_out(c: &mut Coordinator, t: u64, round: u64, link: u64) {
    let seq = round + 1;
    c.handle(t, writes(10 + round * 10, &["a"]));
    c.handle(t + 1, yes(2, seq));
    c.handle(
        t + 51,
        Event::TimerFired {
            timer: TimerId::Txn(seq),
        },
    );
    c.handle(t + 52, Event::PeerLost { peer: PeerId(link) });
    c.handle(t + 53, Event::Persisted { lsn: seq });
}

/// Slave `as_peer` registering again on link `peer` (the same address).
fn reregister(peer: u64, as_peer: u64) -> Event {
    let Event::Message {
        msg: PeerMessage::Register { client_addr, .. },
        ..
    } = register(as_peer, 0)
    else {
        unreachable!("register makes a REGISTER");
    };
    msg(
        peer,
        PeerMessage::Register {
            client_addr,
            last_applied_seq: 0,
            history_id: H,
            protocol_version: PEER_PROTOCOL_VERSION,
            node_id: 0,
            may_discard_data: true,
            epoch: 0,
        },
    )
}

fn with_slaves_config(config: CoordinatorConfig, peers: &[u64]) -> Coordinator {
    let mut c = Coordinator::new(config, 0);
    for &p in peers {
        c.handle(0, register(p, 0));
        c.handle(0, msg(p, PeerMessage::CaughtUp { seq: 0 }));
    }
    drain(&mut c);
    c
}

#[test]
fn a_slave_that_lags_the_others_is_evicted_and_rejoins_on_probation() {
    let mut c = with_slaves_config(lag_config(), &[1, 2]);
    c.handle(0, writes(10, &["a"]));
    drain(&mut c);
    // Slave 2 votes at 5: from then on slave 1 alone holds transaction 1.
    c.handle(5, yes(2, 1));
    assert!(drain(&mut c).contains(&Action::SetTimer {
        timer: TimerId::Txn(1),
        at_ms: 55
    }));
    // Still waiting at 55: evicted as lagging, long before the 2PC timeout.
    c.handle(
        55,
        Event::TimerFired {
            timer: TimerId::Txn(1),
        },
    );
    assert!(drain(&mut c).contains(&Action::Disconnect { peer: PeerId(1) }));
    let evicted = c
        .members()
        .get(PeerId(1))
        .expect("listed until its link closes");
    assert!(
        evicted
            .evicted_because
            .as_deref()
            .is_some_and(|r| r.starts_with("lagging")),
        "{evicted:?}"
    );
    c.handle(56, Event::PeerLost { peer: PeerId(1) });
    // It comes back on a new link and catches up: on probation, not in sync.
    c.handle(100, reregister(3, 1));
    c.handle(100, msg(3, PeerMessage::CaughtUp { seq: 0 }));
    drain(&mut c);
    assert_eq!(
        c.members().get(PeerId(3)).map(|s| s.state),
        Some(SlaveState::Probation { until_ms: 455 })
    );
    assert_eq!(c.members().in_sync_count(), 1);
    // A probation slave still receives every commit.
    c.handle(101, Event::Persisted { lsn: 1 });
    c.handle(102, writes(20, &["b"]));
    c.handle(103, yes(2, 2));
    c.handle(104, Event::Persisted { lsn: 2 });
    let to_probation = sends_to(&drain(&mut c), 3);
    assert!(
        to_probation
            .iter()
            .any(|m| matches!(m, PeerMessage::LogEntry { seq: 2, .. })),
        "{to_probation:?}"
    );
    // The heartbeat after the probation makes it a participant again.
    c.handle(
        460,
        Event::TimerFired {
            timer: TimerId::Heartbeat,
        },
    );
    drain(&mut c);
    assert!(matches!(
        c.members().get(PeerId(3)).map(|s| s.state),
        Some(SlaveState::InSync { join_seq: 3 })
    ));
}

#[test]
fn a_second_lag_eviction_doubles_the_probation() {
    let mut c = with_slaves_config(lag_config(), &[1, 2]);
    for (round, link) in [(0u64, 1u64), (1, 3)] {
        let t = round * 1_000;
        let seq = round + 1;
        lag_out(&mut c, t, round, link);
        c.handle(t + 60, reregister(link + 2, 1));
        c.handle(t + 60, msg(link + 2, PeerMessage::CaughtUp { seq }));
        drain(&mut c);
        let probation = match c.members().get(PeerId(link + 2)).map(|s| s.state) {
            Some(SlaveState::Probation { until_ms }) => until_ms - (t + 51),
            other => panic!("round {round}: {other:?}"),
        };
        assert_eq!(probation, 400 << round, "round {round}");
        c.handle(
            t + 999,
            Event::TimerFired {
                timer: TimerId::Heartbeat,
            },
        );
        drain(&mut c);
    }
}

#[test]
fn a_lone_slave_is_bound_by_the_2pc_timeout_not_the_lag() {
    let mut c = with_slaves_config(lag_config(), &[1]);
    c.handle(0, writes(10, &["a"]));
    let actions = drain(&mut c);
    // No other participant to lag behind: only the vote deadline is armed.
    assert!(actions.contains(&Action::SetTimer {
        timer: TimerId::Txn(1),
        at_ms: 1_000
    }));
    c.handle(
        60,
        Event::TimerFired {
            timer: TimerId::Txn(1),
        },
    );
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.members().in_sync_count(), 1);
}

#[test]
fn a_slave_back_after_its_probation_would_have_ended_rejoins_in_sync_and_is_forgiven() {
    let mut c = with_slaves_config(lag_config(), &[1, 2]);
    for (round, link) in [(0u64, 1u64), (1, 3)] {
        let t = round * 5_000;
        let seq = round + 1;
        lag_out(&mut c, t, round, link);
        // Cut off for 2 s, longer than the 400 ms probation: back in sync at once.
        c.handle(t + 2_051, reregister(link + 2, 1));
        c.handle(t + 2_051, msg(link + 2, PeerMessage::CaughtUp { seq }));
        drain(&mut c);
        assert!(
            matches!(
                c.members().get(PeerId(link + 2)).map(|s| s.state),
                Some(SlaveState::InSync { .. })
            ),
            "round {round}"
        );
    }
    assert_eq!(c.lag_evictions(), 2);
}

/// A coordinator streaming a snapshot at seq 1 to slave 7, registered at time 0,
/// with two more commits released after it began.
fn streaming_to_7() -> Coordinator {
    let mut c = with_slaves(&[]);
    c.handle(0, writes(1, &["a"]));
    c.handle(0, Event::Persisted { lsn: 1 });
    c.handle(0, register(7, 5)); // ahead of the master: snapshot at 1
    assert!(drain(&mut c).contains(&Action::StartSnapshot {
        peer: PeerId(7),
        at_seq: 1
    }));
    c.handle(0, writes(2, &["b"]));
    c.handle(0, writes(3, &["c"]));
    c.handle(0, Event::Persisted { lsn: 3 });
    drain(&mut c);
    c
}

fn heartbeat_timer(c: &mut Coordinator, now_ms: u64) -> Vec<Action> {
    c.handle(
        now_ms,
        Event::TimerFired {
            timer: TimerId::Heartbeat,
        },
    );
    drain(c)
}

#[test]
fn a_snapshot_receiver_that_drains_is_kept_however_long_it_takes() {
    let mut c = streaming_to_7();
    let timeout = config().peer_timeout_ms;
    // The link reports progress now and then; the slave itself says nothing.
    for t in (1..=10).map(|i| i * timeout / 2) {
        c.handle(
            t,
            Event::SnapshotProgress {
                peer: PeerId(7),
                at_seq: 1,
                done_per_mille: 500,
            },
        );
        let actions = heartbeat_timer(&mut c, t + timeout / 4);
        assert!(
            !actions.contains(&Action::Disconnect { peer: PeerId(7) }),
            "{actions:?}"
        );
        assert!(
            sends_to(&actions, 7).is_empty(),
            "nothing may overtake the chunks: {actions:?}"
        );
    }
    assert_eq!(
        c.members().get(PeerId(7)).map(|s| s.state),
        Some(SlaveState::Snapshotting { at_seq: 1 })
    );
}

#[test]
fn a_snapshot_receiver_that_drains_nothing_for_the_peer_timeout_is_evicted() {
    let mut c = streaming_to_7();
    let timeout = config().peer_timeout_ms;
    c.handle(
        100,
        Event::SnapshotProgress {
            peer: PeerId(7),
            at_seq: 1,
            done_per_mille: 500,
        },
    );
    // Exactly the timeout since the last progress: not yet.
    let actions = heartbeat_timer(&mut c, 100 + timeout);
    assert!(!actions.contains(&Action::Disconnect { peer: PeerId(7) }));
    let actions = heartbeat_timer(&mut c, 100 + timeout + 1);
    assert!(
        actions.contains(&Action::Disconnect { peer: PeerId(7) }),
        "{actions:?}"
    );
    let info = c
        .members()
        .get(PeerId(7))
        .expect("listed until its link is gone");
    assert_eq!(info.state, SlaveState::Evicted);
    let reason = info.evicted_because.clone().unwrap_or_default();
    assert!(
        reason.contains("snapshot at seq 1")
            && reason.contains(&format!("{} ms", timeout + 1))
            && reason.contains("2 transactions behind"),
        "{reason}"
    );
    // The log is no longer pinned for it, and the heartbeat timer goes on.
    assert!(actions.contains(&Action::SetTimer {
        timer: TimerId::Heartbeat,
        at_ms: 100 + timeout + 1 + config().heartbeat_interval_ms
    }));
    c.handle(1_200, Event::PeerLost { peer: PeerId(7) });
    assert!(c.members().get(PeerId(7)).is_none());
    // Progress reported late for the link that is gone changes nothing.
    c.handle(
        1_201,
        Event::SnapshotProgress {
            peer: PeerId(7),
            at_seq: 1,
            done_per_mille: 500,
        },
    );
    assert!(drain(&mut c).is_empty());
}

#[test]
fn snapshot_progress_counts_only_while_the_snapshot_streams() {
    let mut c = streaming_to_7();
    c.handle(
        10,
        Event::SnapshotSent {
            peer: PeerId(7),
            at_seq: 1,
        },
    );
    drain(&mut c);
    assert_eq!(
        c.members().get(PeerId(7)).map(|s| s.state),
        Some(SlaveState::Tailing { marker: 3 })
    );
    // Bytes of the last chunks still draining are not the tailing slave's
    // answer: only its own messages keep it, as for any tailing slave.
    // (It is granted time to read the backlog queued behind the snapshot,
    // well under a second here, before its silence counts.)
    c.handle(
        1_510,
        Event::SnapshotProgress {
            peer: PeerId(7),
            at_seq: 1,
            done_per_mille: 500,
        },
    );
    let actions = heartbeat_timer(&mut c, 2_010);
    assert!(
        actions.contains(&Action::Disconnect { peer: PeerId(7) }),
        "{actions:?}"
    );
}

#[test]
fn a_slave_away_longer_than_a_first_probation_skips_an_escalated_one() {
    let mut c = with_slaves_config(lag_config(), &[1, 2]);
    // Two lag evictions, each followed by a quick return: the second probation is 800 ms.
    for (round, link) in [(0u64, 1u64), (1, 3)] {
        let t = round * 1_000;
        let seq = round + 1;
        lag_out(&mut c, t, round, link);
        c.handle(t + 60, reregister(link + 2, 1));
        c.handle(t + 60, msg(link + 2, PeerMessage::CaughtUp { seq }));
        c.handle(
            t + 999,
            Event::TimerFired {
                timer: TimerId::Heartbeat,
            },
        );
        drain(&mut c);
    }
    // A third lag eviction (a partition begins), then back 500 ms later: more
    // than the first probation (400 ms), so in sync at once, not 1.6 s later.
    c.handle(2_000, writes(30, &["a"]));
    c.handle(2_001, yes(2, 3));
    c.handle(
        2_051,
        Event::TimerFired {
            timer: TimerId::Txn(3),
        },
    );
    c.handle(2_052, Event::PeerLost { peer: PeerId(5) });
    c.handle(2_053, Event::Persisted { lsn: 3 });
    c.handle(2_551, reregister(7, 1));
    c.handle(2_551, msg(7, PeerMessage::CaughtUp { seq: 3 }));
    drain(&mut c);
    assert!(matches!(
        c.members().get(PeerId(7)).map(|s| s.state),
        Some(SlaveState::InSync { .. })
    ));
    assert_eq!(c.lag_evictions(), 3);
}

#[test]
fn the_inflight_bound_is_reached_and_left_as_transactions_end() {
    let mut c = Coordinator::new(
        CoordinatorConfig {
            max_inflight_txns: 2,
            ..config()
        },
        0,
    );
    c.handle(0, register(1, 0));
    c.handle(0, msg(1, PeerMessage::CaughtUp { seq: 0 }));
    drain(&mut c);
    assert!(!c.at_inflight_bound());
    c.handle(1, writes(10, &["a"]));
    assert!(!c.at_inflight_bound(), "one of two in flight");
    c.handle(1, writes(20, &["b"]));
    assert!(
        c.at_inflight_bound(),
        "the reactor must hold the next batch now"
    );
    drain(&mut c);
    // The first ends: voted, durable, acknowledged.
    c.handle(2, yes(1, 1));
    drain(&mut c);
    c.handle(3, Event::Persisted { lsn: 1 });
    drain(&mut c);
    c.handle(4, msg(1, PeerMessage::Ack { seq: 1 }));
    assert_eq!(c.in_flight(), 1);
    assert!(
        !c.at_inflight_bound(),
        "below the bound again: writes resume"
    );
}

#[test]
fn a_slave_that_joined_a_shared_snapshot_catches_up_from_its_seq() {
    let mut c = with_a_slave_the_log_does_not_cover();
    assert_eq!(starts_snapshot(&drain(&mut c)), Some(6));
    // Two commits later a second slave needs one; the reactor gives it the
    // snapshot at 6 already streaming to the first.
    c.handle(2, writes(20, &["b"]));
    c.handle(2, writes(21, &["c"]));
    c.handle(2, Event::Persisted { lsn: 8 });
    drain(&mut c);
    c.handle(3, register(8, 0));
    assert_eq!(starts_snapshot(&drain(&mut c)), Some(8));
    assert!(c.log_floor() <= 6, "the pin keeps the log from 6");
    c.handle(
        3,
        Event::SnapshotJoined {
            peer: PeerId(8),
            at_seq: 6,
        },
    );
    assert_eq!(
        c.members().get(PeerId(8)).map(|s| s.state),
        Some(SlaveState::Snapshotting { at_seq: 6 })
    );
    c.handle(
        4,
        Event::SnapshotSent {
            peer: PeerId(8),
            at_seq: 6,
        },
    );
    let sent = sends_to(&drain(&mut c), 8);
    assert!(
        matches!(
            sent[..],
            [
                PeerMessage::LogEntry { seq: 7, .. },
                PeerMessage::LogEntry { seq: 8, .. },
                PeerMessage::CaughtUp { seq: 8 }
            ]
        ),
        "{sent:?}"
    );
}

/// Two slaves in sync and transaction 1 committed and released at time 4,
/// its COMMIT not sent yet.
fn with_a_commit_unsent() -> Coordinator {
    let mut c = with_slaves(&[1, 2]);
    c.handle(1, writes(10, &["a"]));
    c.handle(2, yes(1, 1));
    c.handle(3, yes(2, 1));
    drain(&mut c);
    c.handle(4, Event::Persisted { lsn: 1 });
    let actions = drain(&mut c);
    assert!(matches!(actions[0], Action::Apply { seq: 1, .. }));
    assert_eq!(sends_to(&actions, 1), vec![]);
    c
}

#[test]
fn the_next_prepare_carries_the_commit_and_the_flush_then_sends_nothing() {
    let mut c = with_a_commit_unsent();
    c.handle(5, writes(20, &["b"]));
    let actions = drain(&mut c);
    for peer in [1, 2] {
        assert_eq!(
            sends_to(&actions, peer),
            vec![PeerMessage::Prepare {
                seq: 2,
                commit_through: 1,
                ops: vec![put("b")].into(),
            }]
        );
    }
    assert_eq!(sends_to(&flush_commits(&mut c, 6), 1), vec![]);
    // The next PREPARE carries no commit: it was delivered.
    c.handle(7, writes(30, &["c"]));
    assert!(matches!(
        sends_to(&drain(&mut c), 1)[..],
        [PeerMessage::Prepare {
            seq: 3,
            commit_through: 0,
            ..
        }]
    ));
}

#[test]
fn any_other_message_to_the_slave_takes_the_unsent_commit_ahead_of_it() {
    // A heartbeat poll.
    let mut c = with_a_commit_unsent();
    c.handle(
        5,
        Event::TimerFired {
            timer: TimerId::Heartbeat,
        },
    );
    assert_eq!(
        sends_to(&drain(&mut c), 1),
        vec![PeerMessage::Commit { seq: 1 }, PeerMessage::poll(1)]
    );
    // A read lease grant: the slave must hold every commit released before it.
    let mut c = with_a_commit_unsent();
    c.handle(
        5,
        msg(
            1,
            PeerMessage::Heartbeat {
                seq: 0,
                stamp: 5,
                lease_ms: 50,
                poll: false,
            },
        ),
    );
    assert_eq!(
        sends_to(&drain(&mut c), 1),
        vec![
            PeerMessage::Commit { seq: 1 },
            PeerMessage::Heartbeat {
                seq: 1,
                stamp: 5,
                lease_ms: 50,
                poll: false,
            }
        ]
    );
    // Slave 2's commit still waits for its own PREPARE or the flush.
    assert_eq!(
        sends_to(&flush_commits(&mut c, 6), 2),
        vec![PeerMessage::Commit { seq: 1 }]
    );
}

#[test]
fn the_flush_sends_only_commits_that_waited_their_delay_and_comes_back_for_the_rest() {
    let mut c = with_a_commit_unsent(); // commit 1 unsent since 4: due at 6
    c.handle(5, writes(20, &["b"])); // carries it
    c.handle(5, yes(1, 2));
    c.handle(5, yes(2, 2));
    c.handle(5, Event::Persisted { lsn: 2 }); // commit 2 unsent since 5: due at 7
    drain(&mut c);
    let actions = flush_commits(&mut c, 6);
    assert_eq!(sends_to(&actions, 1), vec![]);
    assert!(actions.contains(&Action::SetTimer {
        timer: TimerId::CommitFlush,
        at_ms: 7
    }));
    assert_eq!(
        sends_to(&flush_commits(&mut c, 7), 1),
        vec![PeerMessage::Commit { seq: 2 }]
    );
}

#[test]
fn unsent_commits_are_cumulative_and_the_oldest_sets_the_deadline() {
    let mut c = with_slaves(&[1]);
    c.handle(1, writes(10, &["a"]));
    c.handle(1, writes(20, &["b"]));
    c.handle(2, yes(1, 1));
    c.handle(2, Event::Persisted { lsn: 1 }); // commit 1 released at 2
    c.handle(3, yes(1, 2));
    c.handle(3, Event::Persisted { lsn: 2 }); // commit 2 released at 3
    let actions = drain(&mut c);
    assert_eq!(sends_to(&actions, 1).len(), 2, "the two PREPAREs only");
    assert_eq!(
        sends_to(&flush_commits(&mut c, 4), 1),
        vec![PeerMessage::Commit { seq: 2 }],
        "one COMMIT for both, due 2 ms after the first"
    );
    // One ACK covers both.
    c.handle(5, msg(1, PeerMessage::Ack { seq: 2 }));
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn an_ack_carried_by_a_vote_counts_before_the_vote() {
    let mut c = with_a_commit_unsent();
    c.handle(5, writes(20, &["b"]));
    drain(&mut c);
    c.handle(
        6,
        msg(
            1,
            PeerMessage::Vote {
                seq: 2,
                vote: Vote::Yes,
                ack_through: 1,
            },
        ),
    );
    assert!(
        matches!(c.txn_state(1), Some(TxnState::Committed { awaiting_acks }) if *awaiting_acks == [PeerId(2)].into())
    );
    c.handle(
        6,
        msg(
            2,
            PeerMessage::Vote {
                seq: 2,
                vote: Vote::Yes,
                ack_through: 1,
            },
        ),
    );
    assert!(c.txn_state(1).is_none(), "forgotten once both acked");
    assert_eq!(persist_lsns(&drain(&mut c)), vec![2], "and 2 is decided");
}

#[test]
fn an_evicted_slave_is_sent_no_unsent_commit() {
    let mut c = with_a_commit_unsent();
    c.handle(5, Event::PeerLost { peer: PeerId(1) });
    let actions = flush_commits(&mut c, 6);
    assert_eq!(sends_to(&actions, 1), vec![]);
    assert_eq!(sends_to(&actions, 2), vec![PeerMessage::Commit { seq: 1 }]);
}

#[test]
fn without_a_commit_delay_the_commit_goes_at_its_release() {
    let mut c = Coordinator::new(
        CoordinatorConfig {
            commit_delay_ms: 0,
            ..config()
        },
        0,
    );
    c.handle(0, register(1, 0));
    c.handle(0, msg(1, PeerMessage::CaughtUp { seq: 0 }));
    c.handle(1, writes(10, &["a"]));
    c.handle(2, yes(1, 1));
    c.handle(3, Event::Persisted { lsn: 1 });
    let actions = drain(&mut c);
    assert_eq!(
        sends_to(&actions, 1).last(),
        Some(&PeerMessage::Commit { seq: 1 })
    );
    assert!(!actions.iter().any(|a| matches!(
        a,
        Action::SetTimer {
            timer: TimerId::CommitFlush,
            ..
        }
    )));
}

#[test]
fn a_slave_of_another_peer_protocol_version_is_refused_at_register() {
    let mut c = with_slaves(&[]);
    for version in [PEER_PROTOCOL_VERSION - 1, PEER_PROTOCOL_VERSION + 1] {
        c.handle(
            0,
            msg(
                3,
                PeerMessage::Register {
                    client_addr: "old".into(),
                    last_applied_seq: 0,
                    history_id: H,
                    protocol_version: version,
                    node_id: 0,
                    may_discard_data: false,
                    epoch: 0,
                },
            ),
        );
        let actions = drain(&mut c);
        assert_eq!(actions, vec![Action::Disconnect { peer: PeerId(3) }]);
        assert!(c.members().get(PeerId(3)).is_none());
    }
}

#[test]
fn after_abandon_a_new_commit_arms_the_flush_again() {
    let mut c = with_a_commit_unsent();
    c.abandon();
    c.handle(5, writes(20, &["b"]));
    let actions = drain(&mut c);
    assert!(
        matches!(
            sends_to(&actions, 1)[..],
            [PeerMessage::Prepare {
                seq: 2,
                commit_through: 0,
                ..
            }]
        ),
        "the abandoned commit is not carried: {actions:?}"
    );
    c.handle(6, yes(1, 2));
    c.handle(6, yes(2, 2));
    c.handle(6, Event::Persisted { lsn: 2 });
    assert!(drain(&mut c).contains(&Action::SetTimer {
        timer: TimerId::CommitFlush,
        at_ms: 8
    }));
}

// ---- a backlog sent a bounded step per drain of the link ------------------

/// Two of the tests' one-write commits (66 bytes each as the log counts
/// them) make a step.
const TWO_COMMITS: usize = 100;

/// A master whose log holds commits 1..=7 (capacity 4: pinned, 16), with
/// backlog steps of two commits, and slave 7 registered at 1: its backlog
/// is 2..=7, of which the first step sent 2 and 3.
fn sending_backlog() -> (Coordinator, Vec<Action>) {
    let mut c = backlog_master(16, 7, 1);
    let actions = drain(&mut c);
    (c, actions)
}

/// A master with a log of `log_capacity`, backlog steps of two commits and
/// commits 1..=`commits` made while its only slave was away, and slave 7
/// registering at `from`.
fn backlog_master(log_capacity: usize, commits: u64, from: u64) -> Coordinator {
    let mut c = Coordinator::new(
        CoordinatorConfig {
            log_capacity,
            backlog_step_bytes: TWO_COMMITS,
            ..config()
        },
        0,
    );
    c.handle(0, register(99, 0));
    c.handle(0, Event::PeerLost { peer: PeerId(99) });
    commit_writes(&mut c, 0, commits);
    c.handle(1, register(7, from));
    c
}

fn drained(c: &mut Coordinator, now: u64, peer: u64) -> Vec<PeerMessage> {
    c.handle(now, Event::PeerDrained { peer: PeerId(peer) });
    sends_to(&drain(c), peer)
}

fn entry_seqs(sent: &[PeerMessage]) -> Vec<u64> {
    sent.iter()
        .filter_map(|m| match m {
            PeerMessage::LogEntry { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

fn state_of(c: &Coordinator, peer: u64) -> Option<SlaveState> {
    c.members().get(PeerId(peer)).map(|s| s.state)
}

#[test]
fn a_backlog_goes_a_bounded_step_per_drain_then_the_marker() {
    let (mut c, actions) = sending_backlog();
    let sent = sends_to(&actions, 7);
    assert!(matches!(
        sent[0],
        PeerMessage::Registered {
            catch_up: CatchUp::Log { from_seq: 1 },
            ..
        }
    ));
    assert_eq!(entry_seqs(&sent), vec![2, 3], "the first step at once");
    assert_eq!(sent.len(), 3, "no marker yet: {sent:?}");
    assert_eq!(state_of(&c, 7), Some(SlaveState::Backlog { sent: 3 }));
    assert_eq!(c.backlog_peers().collect::<Vec<_>>(), vec![PeerId(7)]);
    assert_eq!(entry_seqs(&drained(&mut c, 2, 7)), vec![4, 5]);
    assert_eq!(state_of(&c, 7), Some(SlaveState::Backlog { sent: 5 }));
    // The last step ends with the marker: the slave is tailing.
    let sent = drained(&mut c, 3, 7);
    assert_eq!(entry_seqs(&sent), vec![6, 7]);
    assert_eq!(sent.last(), Some(&PeerMessage::CaughtUp { seq: 7 }));
    assert_eq!(state_of(&c, 7), Some(SlaveState::Tailing { marker: 7 }));
    assert_eq!(c.backlog_peers().count(), 0);
    // A drain reported once it is over sends nothing (nor for an in-sync slave).
    assert!(drained(&mut c, 4, 7).is_empty());
    c.handle(5, msg(7, PeerMessage::CaughtUp { seq: 7 }));
    assert_eq!(state_of(&c, 7), Some(SlaveState::InSync { join_seq: 8 }));
    assert!(drained(&mut c, 6, 7).is_empty());
}

#[test]
fn a_step_sends_at_least_one_commit_however_small_its_budget() {
    let mut c = Coordinator::new(
        CoordinatorConfig {
            log_capacity: 16,
            backlog_step_bytes: 0,
            ..config()
        },
        0,
    );
    c.handle(0, register(99, 0));
    c.handle(0, Event::PeerLost { peer: PeerId(99) });
    commit_writes(&mut c, 0, 3);
    c.handle(1, register(7, 0));
    assert_eq!(entry_seqs(&sends_to(&drain(&mut c), 7)), vec![1]);
    assert_eq!(entry_seqs(&drained(&mut c, 2, 7)), vec![2]);
    let sent = drained(&mut c, 3, 7);
    assert_eq!(entry_seqs(&sent), vec![3]);
    assert_eq!(sent.last(), Some(&PeerMessage::CaughtUp { seq: 3 }));
}

#[test]
fn releases_during_a_backlog_are_sent_by_its_cursor_once_and_in_order() {
    let (mut c, _) = sending_backlog();
    // Released while the cursor is at 3: not forwarded live.
    commit_writes(&mut c, 2, 2);
    assert_eq!(c.commit_seq(), 9);
    assert_eq!(state_of(&c, 7), Some(SlaveState::Backlog { sent: 3 }));
    let mut seqs = Vec::new();
    let mut last = Vec::new();
    for t in 3..10 {
        last = drained(&mut c, t, 7);
        seqs.extend(entry_seqs(&last));
        // One more release while the cursor runs.
        if t == 3 {
            commit_writes(&mut c, t, 1);
        }
    }
    assert_eq!(
        seqs,
        (4..=10).collect::<Vec<_>>(),
        "none twice, none skipped"
    );
    assert_eq!(last, vec![], "over after the marker");
    assert_eq!(state_of(&c, 7), Some(SlaveState::Tailing { marker: 10 }));
    // Tailing: from now on releases are forwarded at once.
    c.handle(20, writes(50, &["z"]));
    let lsn = c.last_lsn;
    c.handle(20, Event::Persisted { lsn });
    assert_eq!(entry_seqs(&sends_to(&drain(&mut c), 7)), vec![11]);
}

#[test]
fn the_log_stays_pinned_at_the_cursor_and_a_wrap_evicts_the_slave() {
    let mut c = backlog_master(4, 4, 0);
    assert_eq!(entry_seqs(&sends_to(&drain(&mut c), 7)), vec![1, 2]);
    // Past the log's capacity of 4, within its pinned slack of 16.
    commit_writes(&mut c, 2, 10);
    assert_eq!(
        c.log_floor(),
        2,
        "pinned at the cursor: only what was sent goes"
    );
    assert_eq!(entry_seqs(&drained(&mut c, 3, 7)), vec![3, 4]);
    // The pin moved with the cursor.
    commit_writes(&mut c, 4, 1);
    assert_eq!(c.log_floor(), 4);
    // Past the slack the pin gives way, and the next drain finds the gap.
    commit_writes(&mut c, 5, 20);
    assert!(c.log_floor() > 4);
    c.handle(6, Event::PeerDrained { peer: PeerId(7) });
    let actions = drain(&mut c);
    assert!(sends_to(&actions, 7).is_empty(), "{actions:?}");
    assert!(actions.contains(&Action::Disconnect { peer: PeerId(7) }));
    let info = c
        .members()
        .get(PeerId(7))
        .expect("listed until its link is gone");
    assert_eq!(info.state, SlaveState::Evicted);
    assert!(
        info.evicted_because
            .as_deref()
            .is_some_and(|r| r.contains("no longer holds its backlog after seq 4")),
        "{:?}",
        info.evicted_because
    );
    // It registers again at 4 on a new link: a snapshot.
    c.handle(7, Event::PeerLost { peer: PeerId(7) });
    c.handle(8, register(8, 4));
    assert!(starts_snapshot(&drain(&mut c)).is_some());
}

#[test]
fn a_slave_lost_mid_backlog_unpins_the_log_and_its_drains_do_nothing() {
    let (mut c, _) = sending_backlog();
    c.handle(2, Event::PeerLost { peer: PeerId(7) });
    drain(&mut c);
    assert!(c.members().get(PeerId(7)).is_none());
    assert_eq!(c.backlog_peers().count(), 0);
    assert!(drained(&mut c, 3, 7).is_empty());
    // Unpinned: the log keeps its capacity of 16, no more.
    commit_writes(&mut c, 4, 30);
    assert_eq!(c.log_floor(), 37 - 16);
}

#[test]
fn a_backlog_receiver_that_drains_nothing_for_the_peer_timeout_is_evicted() {
    let (mut c, _) = sending_backlog();
    let timeout = config().peer_timeout_ms;
    // Each step allows for what is queued ahead of the slave's next answer:
    // a drained window (1 MiB) and the step: 2 x 250 ms.
    let grace = 500;
    assert_eq!(
        c.members().get(PeerId(7)).map(|s| s.last_heard_ms),
        Some(1 + grace)
    );
    drained(&mut c, 100, 7);
    let actions = heartbeat_timer(&mut c, 100 + grace + timeout);
    assert!(!actions.contains(&Action::Disconnect { peer: PeerId(7) }));
    assert!(
        sends_to(&actions, 7).is_empty(),
        "no heartbeat amid the backlog"
    );
    let actions = heartbeat_timer(&mut c, 100 + grace + timeout + 1);
    assert!(actions.contains(&Action::Disconnect { peer: PeerId(7) }));
    let reason = c
        .members()
        .get(PeerId(7))
        .and_then(|s| s.evicted_because.clone())
        .unwrap_or_default();
    assert!(reason.contains("the backlog at seq 5"), "{reason}");
}

#[test]
fn after_a_snapshot_the_backlog_goes_in_steps_too() {
    let mut c = Coordinator::new(
        CoordinatorConfig {
            backlog_step_bytes: TWO_COMMITS,
            ..config()
        },
        0,
    );
    c.handle(0, writes(1, &["a"]));
    c.handle(0, Event::Persisted { lsn: 1 });
    c.handle(0, register(7, 5)); // ahead of the master: snapshot at 1
    assert_eq!(starts_snapshot(&drain(&mut c)), Some(1));
    commit_writes(&mut c, 1, 5);
    assert!(
        drained(&mut c, 2, 7).is_empty(),
        "nothing overtakes the chunks"
    );
    c.handle(
        3,
        Event::SnapshotSent {
            peer: PeerId(7),
            at_seq: 1,
        },
    );
    assert_eq!(entry_seqs(&sends_to(&drain(&mut c), 7)), vec![2, 3]);
    assert_eq!(state_of(&c, 7), Some(SlaveState::Backlog { sent: 3 }));
    assert_eq!(entry_seqs(&drained(&mut c, 4, 7)), vec![4, 5]);
    let sent = drained(&mut c, 5, 7);
    assert_eq!(entry_seqs(&sent), vec![6]);
    assert_eq!(sent.last(), Some(&PeerMessage::CaughtUp { seq: 6 }));
}
