use super::*;
use crate::replication::{OpKind, SnapshotEntry, WriteOp};

const M: PeerId = PeerId(5);

fn ops(key: &str) -> Ops {
    vec![WriteOp {
        kind: OpKind::Put,
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
    }]
    .into()
}

fn drain(p: &mut Participant) -> Vec<Action> {
    std::iter::from_fn(|| p.poll_action()).collect()
}

fn from_master(msg: PeerMessage) -> Event {
    Event::Message { peer: M, msg }
}

fn sends(actions: &[Action]) -> Vec<PeerMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { msg, .. } => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

fn config() -> ParticipantConfig {
    ParticipantConfig {
        client_addr: "s:1".into(),
        ..ParticipantConfig::default()
    }
}

/// A slave at `seq`, registered, caught up and following.
fn following(seq: u64) -> Participant {
    let mut p = Participant::new(config(), seq);
    p.handle(0, Event::Connected { peer: M });
    p.handle(
        0,
        from_master(PeerMessage::Registered {
            master_seq: seq,
            catch_up: CatchUp::Log { from_seq: seq },
        }),
    );
    p.handle(0, from_master(PeerMessage::CaughtUp { seq }));
    drain(&mut p);
    assert_eq!(p.link(), LinkState::Following(M));
    p
}

#[test]
fn registers_with_its_position_on_connect() {
    let mut p = Participant::new(config(), 9);
    assert_eq!(drain(&mut p), vec![Action::Connect]);
    p.handle(0, Event::Connected { peer: M });
    assert_eq!(
        sends(&drain(&mut p)),
        vec![PeerMessage::Register {
            client_addr: "s:1".into(),
            last_applied_seq: 9,
            protocol_version: PEER_PROTOCOL_VERSION,
        }]
    );
    assert_eq!(p.link(), LinkState::CatchingUp(M));
}

#[test]
fn votes_only_after_the_prepare_is_durable_then_commits_and_acks() {
    let mut p = following(0);
    p.handle(
        1,
        from_master(PeerMessage::Prepare {
            seq: 1,
            ops: ops("a"),
        }),
    );
    let actions = drain(&mut p);
    assert_eq!(
        actions,
        vec![Action::Persist {
            lsn: 1,
            record: Record::Prepared {
                seq: 1,
                ops: ops("a")
            }
        }]
    );
    p.handle(2, Event::Persisted { lsn: 1 });
    let actions = drain(&mut p);
    assert_eq!(
        sends(&actions),
        vec![PeerMessage::Vote {
            seq: 1,
            vote: Vote::Yes
        }]
    );
    assert_eq!(p.in_doubt(), 1);
    p.handle(3, from_master(PeerMessage::Commit { seq: 1 }));
    let actions = drain(&mut p);
    assert!(matches!(
        &actions[..],
        [
            Action::Apply { seq: 1, .. },
            Action::Persist {
                lsn: 2,
                record: Record::Committed { seq: 1 }
            }
        ]
    ));
    assert_eq!(p.position(), 1);
    p.handle(4, Event::Persisted { lsn: 2 });
    assert_eq!(sends(&drain(&mut p)), vec![PeerMessage::Ack { seq: 1 }]);
}

#[test]
fn acks_are_batched_per_durability_report() {
    let mut p = following(0);
    for seq in 1..=3 {
        p.handle(0, from_master(PeerMessage::Prepare { seq, ops: ops("a") }));
    }
    p.handle(0, Event::Persisted { lsn: 3 });
    for seq in 1..=3 {
        p.handle(0, from_master(PeerMessage::Commit { seq }));
    }
    drain(&mut p);
    p.handle(0, Event::Persisted { lsn: 6 });
    assert_eq!(sends(&drain(&mut p)), vec![PeerMessage::Ack { seq: 3 }]);
}

#[test]
fn abort_drops_the_prepared_txn_and_advances_the_position() {
    let mut p = following(0);
    p.handle(
        0,
        from_master(PeerMessage::Prepare {
            seq: 1,
            ops: ops("a"),
        }),
    );
    p.handle(0, Event::Persisted { lsn: 1 });
    drain(&mut p);
    p.handle(0, from_master(PeerMessage::Abort { seq: 1 }));
    assert!(drain(&mut p).is_empty(), "nothing applied");
    assert_eq!((p.in_doubt(), p.position()), (0, 1));
}

#[test]
fn out_of_order_prepare_gets_a_no_vote() {
    let mut p = following(5);
    p.handle(
        0,
        from_master(PeerMessage::Prepare {
            seq: 5,
            ops: ops("a"),
        }),
    );
    assert!(matches!(
        sends(&drain(&mut p))[..],
        [PeerMessage::Vote {
            seq: 5,
            vote: Vote::No(_)
        }]
    ));
}

#[test]
fn commit_of_an_unknown_txn_forces_a_resync() {
    let mut p = following(0);
    p.handle(0, from_master(PeerMessage::Commit { seq: 1 }));
    let actions = drain(&mut p);
    assert!(actions.contains(&Action::Disconnect { peer: M }));
    assert_eq!(p.link(), LinkState::Down);
    assert_eq!(p.protocol_violations(), 1);
}

#[test]
fn log_catch_up_applies_in_order_and_echoes_the_marker_when_durable() {
    let mut p = Participant::new(config(), 1);
    p.handle(0, Event::Connected { peer: M });
    p.handle(
        0,
        from_master(PeerMessage::Registered {
            master_seq: 4,
            catch_up: CatchUp::Log { from_seq: 1 },
        }),
    );
    p.handle(
        0,
        from_master(PeerMessage::LogEntry {
            seq: 2,
            ops: ops("a"),
        }),
    );
    p.handle(
        0,
        from_master(PeerMessage::LogEntry {
            seq: 4,
            ops: ops("b"),
        }),
    );
    p.handle(0, from_master(PeerMessage::CaughtUp { seq: 5 }));
    let actions = drain(&mut p);
    let applied: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Apply { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(applied, vec![2, 4]);
    assert!(
        !sends(&actions).contains(&PeerMessage::CaughtUp { seq: 5 }),
        "echo waits for durability"
    );
    assert_eq!(p.position(), 5, "5 was aborted: the marker says so");
    p.handle(1, Event::Persisted { lsn: 2 });
    assert_eq!(
        sends(&drain(&mut p)),
        vec![PeerMessage::CaughtUp { seq: 5 }]
    );
    // A stale entry now is a protocol violation.
    p.handle(
        2,
        from_master(PeerMessage::LogEntry {
            seq: 3,
            ops: ops("c"),
        }),
    );
    assert_eq!(p.protocol_violations(), 1);
}

#[test]
fn snapshot_chunks_install_atomically_and_checkpoint() {
    let mut p = Participant::new(config(), 0);
    p.handle(0, Event::Connected { peer: M });
    let entry = SnapshotEntry {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        version: 3,
    };
    p.handle(
        0,
        from_master(PeerMessage::SnapshotChunk {
            snapshot_seq: 9,
            entries: vec![entry.clone()],
            last: false,
        }),
    );
    p.handle(
        0,
        from_master(PeerMessage::SnapshotChunk {
            snapshot_seq: 9,
            entries: vec![],
            last: true,
        }),
    );
    let actions = drain(&mut p);
    assert_eq!(
        actions[2..],
        [
            Action::InstallSnapshot {
                at_seq: 9,
                entries: vec![entry],
                begin: true,
                end: false
            },
            Action::InstallSnapshot {
                at_seq: 9,
                entries: vec![],
                begin: false,
                end: true
            },
            Action::Persist {
                lsn: 1,
                record: Record::Checkpoint { seq: 9 }
            },
        ]
    );
    assert_eq!(p.position(), 9);
}

#[test]
fn losing_the_master_reconnects_with_backoff_and_drops_in_doubt_txns_on_register() {
    let mut p = following(0);
    p.handle(
        0,
        from_master(PeerMessage::Prepare {
            seq: 1,
            ops: ops("a"),
        }),
    );
    p.handle(0, Event::PeerLost { peer: M });
    let actions = drain(&mut p);
    assert!(actions.contains(&Action::SetTimer {
        timer: TimerId::Reconnect,
        at_ms: 50
    }));
    // The vote of the dead link is never sent.
    p.handle(1, Event::Persisted { lsn: 1 });
    assert!(sends(&drain(&mut p)).is_empty());
    p.handle(
        50,
        Event::TimerFired {
            timer: TimerId::Reconnect,
        },
    );
    assert_eq!(drain(&mut p), vec![Action::Connect]);
    p.handle(51, Event::ConnectFailed);
    assert!(drain(&mut p).contains(&Action::SetTimer {
        timer: TimerId::Reconnect,
        at_ms: 151
    }));
    p.handle(
        151,
        Event::TimerFired {
            timer: TimerId::Reconnect,
        },
    );
    p.handle(152, Event::Connected { peer: PeerId(6) });
    assert_eq!(p.in_doubt(), 0);
    assert!(matches!(
        sends(&drain(&mut p))[..],
        [PeerMessage::Register {
            last_applied_seq: 0,
            ..
        }]
    ));
    // Messages from the old link are ignored.
    p.handle(153, from_master(PeerMessage::Commit { seq: 1 }));
    assert!(drain(&mut p).is_empty());
}

#[test]
fn a_long_doubt_triggers_an_outcome_query() {
    let mut p = following(0);
    p.handle(
        0,
        from_master(PeerMessage::Prepare {
            seq: 1,
            ops: ops("a"),
        }),
    );
    p.handle(0, Event::Persisted { lsn: 1 });
    assert!(drain(&mut p).contains(&Action::SetTimer {
        timer: TimerId::OutcomeCheck,
        at_ms: 1_000
    }));
    p.handle(
        1_000,
        Event::TimerFired {
            timer: TimerId::OutcomeCheck,
        },
    );
    assert!(sends(&drain(&mut p)).contains(&PeerMessage::OutcomeQuery { seq: 1 }));
    p.handle(
        1_001,
        from_master(PeerMessage::Outcome {
            seq: 1,
            outcome: Outcome::Aborted,
        }),
    );
    assert_eq!(p.in_doubt(), 0);
}

#[test]
fn heartbeats_are_answered_with_the_position() {
    let mut p = following(4);
    p.handle(0, from_master(PeerMessage::Heartbeat { seq: 9 }));
    assert_eq!(
        sends(&drain(&mut p)),
        vec![PeerMessage::Heartbeat { seq: 4 }]
    );
}
