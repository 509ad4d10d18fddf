use super::*;
use crate::replication::{OpKind, SnapshotEntry, WriteOp};

const M: PeerId = PeerId(5);

fn ops(key: &str) -> Ops {
    vec![WriteOp::new(OpKind::Put, key.as_bytes(), b"v")].into()
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
        may_discard_data: true,
        epoch: 0,
        ..ParticipantConfig::default()
    }
}

/// The master's history id.
const H: u64 = 0xAAAA_0000_0000_0001;
/// Another master history (a restart of the master without its data).
const H2: u64 = 0xBBBB_0000_0000_0002;

fn registered(history_id: u64, catch_up: CatchUp) -> Event {
    from_master(PeerMessage::Registered {
        master_seq: 0,
        history_id,
        catch_up,
        epoch: 0,
    })
}

fn last_chunk(seq: u64) -> Event {
    from_master(PeerMessage::SnapshotChunk {
        snapshot_seq: seq,
        entries: Vec::new(),
        last: true,
    })
}

/// A slave at `seq` of history `H`, registered, caught up and following. A slave
/// at 0 (already in `H`, so nothing is persisted) replays the log from 0; one at
/// `seq` > 0 gets there by a snapshot.
fn following(seq: u64) -> Participant {
    let mut p = Participant::recover(config(), 0, H);
    p.handle(0, Event::Connected { peer: M });
    if seq == 0 {
        p.handle(0, registered(H, CatchUp::Log { from_seq: 0 }));
    } else {
        p.handle(0, registered(H, CatchUp::Snapshot { at_seq: seq }));
        p.handle(0, last_chunk(seq));
        p.handle(0, from_master(PeerMessage::CaughtUp { seq }));
        assert!(!p.caught_up_durably(), "the checkpoint is not durable yet");
        p.handle(0, Event::Persisted { lsn: 1 });
    }
    if seq == 0 {
        p.handle(0, from_master(PeerMessage::CaughtUp { seq }));
    }
    assert!(p.caught_up_durably());
    drain(&mut p);
    assert_eq!(p.link(), LinkState::Following(M));
    assert_eq!((p.position(), p.history_id()), (seq, H));
    p
}

/// The deadline of the reconnect timer among `actions`, if one is set.
fn reconnect_at(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|a| match a {
        Action::SetTimer {
            timer: TimerId::Reconnect,
            at_ms,
        } => Some(*at_ms),
        _ => None,
    })
}

/// The delays a slave whose dials all fail waits before each of its first `n`
/// redials, starting with the loss of its link at time 0.
fn failing_redial_delays(config: ParticipantConfig, n: usize) -> Vec<u64> {
    let mut p = Participant::new(config, 0);
    drain(&mut p);
    let mut now = 0;
    p.handle(now, Event::ConnectFailed);
    let mut delays = Vec::new();
    for _ in 0..n {
        let at = reconnect_at(&drain(&mut p)).expect("a reconnect timer after each failure");
        delays.push(at - now);
        now = at;
        p.handle(
            now,
            Event::TimerFired {
                timer: TimerId::Reconnect,
            },
        );
        assert_eq!(drain(&mut p), vec![Action::Connect]);
        assert_eq!(p.link(), LinkState::Connecting);
        p.handle(now, Event::ConnectFailed);
    }
    delays
}

/// What the slave registers with on its next link.
fn reregister(p: &mut Participant, now_ms: u64, peer: PeerId) -> PeerMessage {
    p.handle(now_ms, Event::PeerLost { peer: M });
    p.handle(
        now_ms + 10_000,
        Event::TimerFired {
            timer: TimerId::Reconnect,
        },
    );
    p.handle(now_ms + 10_000, Event::Connected { peer });
    let sent = sends(&drain(p));
    assert_eq!(sent.len(), 1, "{sent:?}");
    sent[0].clone()
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
            history_id: 0,
            protocol_version: PEER_PROTOCOL_VERSION,
            node_id: 0,
            may_discard_data: true,
            epoch: 0,
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
            commit_through: 0,
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
            vote: Vote::Yes,
            ack_through: 0,
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
        p.handle(
            0,
            from_master(PeerMessage::Prepare {
                seq,
                commit_through: 0,
                ops: ops("a"),
            }),
        );
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
fn abort_drops_the_prepared_txn_durably_acks_it_and_keeps_the_position() {
    let mut p = following(0);
    p.handle(
        0,
        from_master(PeerMessage::Prepare {
            seq: 1,
            commit_through: 0,
            ops: ops("a"),
        }),
    );
    p.handle(0, Event::Persisted { lsn: 1 });
    drain(&mut p);
    p.handle(0, from_master(PeerMessage::Abort { seq: 1 }));
    assert_eq!(
        drain(&mut p),
        vec![Action::Persist {
            lsn: 2,
            record: Record::AbortDecision { seq: 1 }
        }],
        "nothing applied; the abort is recorded"
    );
    assert_eq!((p.in_doubt(), p.position()), (0, 0));
    p.handle(0, Event::Persisted { lsn: 2 });
    assert_eq!(
        drain(&mut p),
        vec![Action::Send {
            peer: PeerId(5),
            msg: PeerMessage::Ack { seq: 1 }
        }]
    );
}

/// Failover sim seed 4: a recorded slave reconnected (to its master's
/// restarted process, which never answered) and was promoted; what it had
/// prepared must still be committed by the promotion.
#[test]
fn prepares_of_an_earlier_link_stay_in_doubt_for_a_promotion_until_decided() {
    let mut p = following(0);
    for (seq, key) in [(1, "a"), (2, "b")] {
        p.handle(
            0,
            from_master(PeerMessage::Prepare {
                seq,
                commit_through: 0,
                ops: ops(key),
            }),
        );
    }
    p.handle(0, Event::Persisted { lsn: 2 });
    drain(&mut p);
    let register = reregister(&mut p, 0, PeerId(6));
    assert!(
        matches!(
            register,
            PeerMessage::Register {
                last_applied_seq: 0,
                ..
            }
        ),
        "the catch-up does without them: {register:?}"
    );
    let mut again = Participant::recover(config(), 0, H);
    again.keep_in_doubt(p.take_prepared());
    assert_eq!(
        again.take_prepared().into_keys().collect::<Vec<_>>(),
        vec![1, 2],
        "a promotion commits both"
    );

    // Decided once a later commit arrives (decisions are in sequence order)...
    let mut p = following(0);
    p.handle(
        0,
        from_master(PeerMessage::Prepare {
            seq: 1,
            commit_through: 0,
            ops: ops("a"),
        }),
    );
    p.handle(0, Event::Persisted { lsn: 1 });
    drain(&mut p);
    reregister(&mut p, 0, PeerId(6));
    let peer = PeerId(6);
    p.handle(
        1,
        Event::Message {
            peer,
            msg: PeerMessage::Registered {
                master_seq: 2,
                history_id: H,
                catch_up: CatchUp::Log { from_seq: 0 },
                epoch: 0,
            },
        },
    );
    p.handle(
        1,
        Event::Message {
            peer,
            msg: PeerMessage::LogEntry {
                seq: 2,
                ops: ops("c"),
            },
        },
    );
    assert!(p.take_prepared().is_empty(), "1 was aborted, 2 committed");

    // ...and a PREPARE on the current link replaces an older one of its number.
    let mut p = following(0);
    p.handle(
        0,
        from_master(PeerMessage::Prepare {
            seq: 1,
            commit_through: 0,
            ops: ops("old"),
        }),
    );
    p.handle(0, Event::Persisted { lsn: 1 });
    drain(&mut p);
    reregister(&mut p, 0, PeerId(6));
    p.handle(
        1,
        Event::Message {
            peer,
            msg: PeerMessage::Registered {
                master_seq: 0,
                history_id: H,
                catch_up: CatchUp::Log { from_seq: 0 },
                epoch: 0,
            },
        },
    );
    for msg in [
        PeerMessage::CaughtUp { seq: 0 },
        PeerMessage::Prepare {
            seq: 1,
            commit_through: 0,
            ops: ops("new"),
        },
    ] {
        p.handle(1, Event::Message { peer, msg });
    }
    assert_eq!(p.take_prepared().get(&1), Some(&ops("new")));
}

#[test]
fn out_of_order_prepare_gets_a_no_vote() {
    let mut p = following(5);
    p.handle(
        0,
        from_master(PeerMessage::Prepare {
            seq: 5,
            commit_through: 0,
            ops: ops("a"),
        }),
    );
    assert!(matches!(
        sends(&drain(&mut p))[..],
        [PeerMessage::Vote {
            seq: 5,
            vote: Vote::No(_),
            ack_through: 0,
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
    let mut p = Participant::new(config(), 0);
    p.handle(0, Event::Connected { peer: M });
    p.handle(0, registered(H, CatchUp::Log { from_seq: 0 }));
    assert!(
        drain(&mut p).contains(&Action::Persist {
            lsn: 1,
            record: Record::History { history_id: H }
        }),
        "adopting the master's history is made durable"
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
    assert_eq!(
        p.history_id(),
        H,
        "a log catch-up puts the slave in the master's history"
    );
    assert!(
        !sends(&actions).contains(&PeerMessage::CaughtUp { seq: 5 }),
        "echo waits for durability"
    );
    assert_eq!(p.position(), 5, "5 was aborted: the marker says so");
    p.handle(1, Event::Persisted { lsn: 2 });
    assert!(sends(&drain(&mut p)).is_empty(), "lsn 3 is not durable yet");
    p.handle(1, Event::Persisted { lsn: 3 });
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
    p.handle(0, registered(H, CatchUp::Snapshot { at_seq: 9 }));
    let entry = SnapshotEntry {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        version: 3,
        deadline_ms: 0,
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
    // After Connect, REGISTER and the silence timer:
    assert_eq!(
        actions[3..],
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
                record: Record::Checkpoint {
                    seq: 9,
                    history_id: H,
                }
            },
        ]
    );
    assert_eq!((p.position(), p.history_id()), (9, H));
}

#[test]
fn losing_the_master_reconnects_with_backoff_and_drops_in_doubt_txns_on_register() {
    let mut p = following(0);
    p.handle(
        0,
        from_master(PeerMessage::Prepare {
            seq: 1,
            commit_through: 0,
            ops: ops("a"),
        }),
    );
    p.handle(0, Event::PeerLost { peer: M });
    // The first delay is 50 ms, jittered down to no less than half of it.
    let first = reconnect_at(&drain(&mut p)).expect("a reconnect timer");
    assert!((25..=50).contains(&first), "{first}");
    // The vote of the dead link is never sent.
    p.handle(1, Event::Persisted { lsn: 1 });
    assert!(sends(&drain(&mut p)).is_empty());
    p.handle(
        first,
        Event::TimerFired {
            timer: TimerId::Reconnect,
        },
    );
    assert_eq!(drain(&mut p), vec![Action::Connect]);
    p.handle(51, Event::ConnectFailed);
    // Then 100 ms, jittered.
    let second = reconnect_at(&drain(&mut p)).expect("a reconnect timer");
    assert!((51 + 50..=51 + 100).contains(&second), "{second}");
    p.handle(
        second,
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
            commit_through: 0,
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
    p.handle(0, from_master(PeerMessage::poll(9)));
    assert_eq!(
        sends(&drain(&mut p)),
        vec![PeerMessage::Heartbeat {
            seq: 4,
            stamp: 0,
            lease_ms: config().read_lease_ms,
            poll: false,
        }]
    );
}

#[test]
fn registers_with_the_history_of_the_master_it_last_caught_up_from() {
    let mut p = following(7);
    p.handle(
        1,
        from_master(PeerMessage::Prepare {
            seq: 8,
            commit_through: 0,
            ops: ops("a"),
        }),
    );
    p.handle(1, Event::Persisted { lsn: 2 });
    p.handle(1, from_master(PeerMessage::Commit { seq: 8 }));
    drain(&mut p);
    assert_eq!(
        reregister(&mut p, 2, PeerId(6)),
        PeerMessage::Register {
            client_addr: "s:1".into(),
            last_applied_seq: 8,
            history_id: H,
            protocol_version: PEER_PROTOCOL_VERSION,
            node_id: 0,
            may_discard_data: true,
            epoch: 0,
        }
    );
}

/// A slave at seq 7 of history H, re-registered with `new_master` (history H2),
/// told to take a snapshot at 3 and given its first, not last, chunk.
fn amid_a_snapshot_of_another_history(new_master: PeerId) -> Participant {
    let mut p = following(7);
    assert!(matches!(
        reregister(&mut p, 1, new_master),
        PeerMessage::Register {
            last_applied_seq: 7,
            history_id: H,
            ..
        }
    ));
    for msg in [
        PeerMessage::Registered {
            master_seq: 3,
            history_id: H2,
            catch_up: CatchUp::Snapshot { at_seq: 3 },
            epoch: 0,
        },
        PeerMessage::SnapshotChunk {
            snapshot_seq: 3,
            entries: Vec::new(),
            last: false,
        },
    ] {
        p.handle(
            20_000,
            Event::Message {
                peer: new_master,
                msg,
            },
        );
    }
    p
}

#[test]
fn a_snapshot_from_a_master_of_another_history_adopts_its_id_once_installed() {
    let new_master = PeerId(6);
    let mut p = amid_a_snapshot_of_another_history(new_master);
    assert_eq!(
        (p.position(), p.history_id()),
        (7, H),
        "nothing changes until the snapshot is installed"
    );
    p.handle(
        20_000,
        Event::Message {
            peer: new_master,
            msg: PeerMessage::SnapshotChunk {
                snapshot_seq: 3,
                entries: Vec::new(),
                last: true,
            },
        },
    );
    assert_eq!((p.position(), p.history_id()), (3, H2));
    assert_eq!(p.protocol_violations(), 0);
    // A link lost before the snapshot completes leaves the old history in place.
    let mut p = amid_a_snapshot_of_another_history(new_master);
    p.handle(20_001, Event::PeerLost { peer: new_master });
    assert_eq!((p.position(), p.history_id()), (7, H));
}

#[test]
fn a_log_catch_up_across_histories_is_a_violation() {
    let mut p = following(7);
    reregister(&mut p, 1, M);
    p.handle(20_000, registered(H2, CatchUp::Log { from_seq: 7 }));
    assert_eq!(p.protocol_violations(), 1);
    assert_eq!(p.link(), LinkState::Down);
    assert_eq!(p.history_id(), H);
}

#[test]
fn catch_up_before_registered_is_a_violation() {
    for msg in [
        PeerMessage::SnapshotChunk {
            snapshot_seq: 3,
            entries: Vec::new(),
            last: true,
        },
        PeerMessage::LogEntry {
            seq: 1,
            ops: ops("a"),
        },
        PeerMessage::CaughtUp { seq: 0 },
    ] {
        let mut p = Participant::new(config(), 0);
        p.handle(0, Event::Connected { peer: M });
        p.handle(0, from_master(msg.clone()));
        assert_eq!(p.protocol_violations(), 1, "{msg:?}");
        assert_eq!((p.position(), p.history_id()), (0, 0), "{msg:?}");
    }
    let mut p = Participant::new(config(), 0);
    p.handle(0, Event::Connected { peer: M });
    p.handle(0, registered(H, CatchUp::Log { from_seq: 0 }));
    p.handle(0, registered(H, CatchUp::Log { from_seq: 0 }));
    assert_eq!(p.protocol_violations(), 1, "REGISTERED twice");
}

#[test]
fn a_silent_master_is_dropped_and_redialed() {
    let mut p = following(0);
    let silence = config().master_silence_ms;
    // A heartbeat halfway keeps the link: the timer moves to the new deadline.
    p.handle(silence / 2, from_master(PeerMessage::poll(0)));
    drain(&mut p);
    p.handle(
        silence,
        Event::TimerFired {
            timer: TimerId::MasterSilence,
        },
    );
    assert_eq!(
        drain(&mut p),
        vec![Action::SetTimer {
            timer: TimerId::MasterSilence,
            at_ms: silence / 2 + silence,
        }]
    );
    assert_eq!(p.link(), LinkState::Following(M));
    // Then nothing for a whole period: drop the link and schedule a reconnect.
    p.handle(
        silence / 2 + silence,
        Event::TimerFired {
            timer: TimerId::MasterSilence,
        },
    );
    let actions = drain(&mut p);
    assert!(
        actions.contains(&Action::Disconnect { peer: M }),
        "{actions:?}"
    );
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::SetTimer {
                timer: TimerId::Reconnect,
                ..
            }
        )),
        "{actions:?}"
    );
    assert_eq!(p.link(), LinkState::Down);
    // A late firing with no link does nothing.
    p.handle(
        10 * silence,
        Event::TimerFired {
            timer: TimerId::MasterSilence,
        },
    );
    assert!(drain(&mut p).is_empty());
}

#[test]
fn connecting_arms_the_silence_check() {
    let mut p = Participant::new(config(), 0);
    drain(&mut p);
    p.handle(7, Event::Connected { peer: M });
    assert!(drain(&mut p).contains(&Action::SetTimer {
        timer: TimerId::MasterSilence,
        at_ms: 7 + config().master_silence_ms,
    }));
}

#[test]
fn without_consent_a_slave_keeps_its_data_against_another_history() {
    let strict = ParticipantConfig {
        may_discard_data: false,
        epoch: 0,
        ..config()
    };
    // The master says diverged: registered, heartbeating, applying nothing.
    let mut p = Participant::recover(strict.clone(), 7, H);
    p.handle(0, Event::Connected { peer: M });
    p.handle(0, registered(H2, CatchUp::Diverged));
    assert_eq!(p.link(), LinkState::Diverged(M));
    p.handle(1, from_master(PeerMessage::poll(3)));
    assert_eq!(
        sends(&drain(&mut p)),
        vec![
            PeerMessage::Register {
                client_addr: "s:1".into(),
                last_applied_seq: 7,
                history_id: H,
                protocol_version: PEER_PROTOCOL_VERSION,
                node_id: 0,
                may_discard_data: false,
                epoch: 0,
            },
            PeerMessage::Heartbeat {
                seq: 7,
                stamp: 1,
                lease_ms: strict.read_lease_ms,
                poll: false,
            }
        ]
    );
    p.handle(2, last_chunk(3));
    assert!(
        !drain(&mut p)
            .iter()
            .any(|a| matches!(a, Action::InstallSnapshot { .. }))
    );
    assert_eq!((p.position(), p.history_id()), (7, H));
    // A master that offers a snapshot anyway is refused on this side.
    let mut p = Participant::recover(strict, 7, H);
    p.handle(0, Event::Connected { peer: M });
    p.handle(0, registered(H2, CatchUp::Snapshot { at_seq: 3 }));
    assert!(drain(&mut p).contains(&Action::Disconnect { peer: M }));
    p.handle(0, last_chunk(3));
    assert!(
        !drain(&mut p)
            .iter()
            .any(|a| matches!(a, Action::InstallSnapshot { .. }))
    );
    assert_eq!((p.position(), p.history_id()), (7, H));
}

/// The master's answer to a slave heartbeat stamped `stamp`: a lease of `lease_ms`.
fn grant(stamp: u64, lease_ms: u32) -> Event {
    from_master(PeerMessage::Heartbeat {
        seq: 0,
        stamp,
        lease_ms,
        poll: false,
    })
}

#[test]
fn a_lease_runs_from_the_stamp_it_answers_not_from_its_arrival() {
    let mut p = following(0);
    assert_eq!(p.read_lease_until(), None, "no lease before a grant");
    p.handle(100, from_master(PeerMessage::poll(0)));
    let answer = sends(&drain(&mut p));
    assert_eq!(
        answer,
        vec![PeerMessage::Heartbeat {
            seq: 0,
            stamp: 100,
            lease_ms: 200,
            poll: false,
        }]
    );
    // The grant arrives late (a stalled link): the lease still ends 200 ms after 100.
    p.handle(250, grant(100, 200));
    assert_eq!(p.read_lease_until(), Some(300));
    // A grant answers no message: nothing is sent back (no ping-pong).
    assert!(drain(&mut p).is_empty());
    // An older grant does not shorten it; more than was asked is not taken.
    p.handle(260, grant(90, 200));
    assert_eq!(p.read_lease_until(), Some(300));
    p.handle(270, grant(200, 10_000));
    assert_eq!(p.read_lease_until(), Some(400));
    // A stamp from the future is no stamp of ours.
    p.handle(280, grant(5_000, 200));
    assert_eq!(p.read_lease_until(), Some(400));
}

#[test]
fn a_lease_is_lost_with_the_link_and_never_held_while_catching_up() {
    let mut p = following(0);
    p.handle(10, grant(10, 200));
    assert_eq!(p.read_lease_until(), Some(210));
    p.handle(20, Event::PeerLost { peer: M });
    assert_eq!(p.read_lease_until(), None);
    // On the next link, a grant before the catch-up ended gives nothing.
    p.handle(
        80,
        Event::TimerFired {
            timer: TimerId::Reconnect,
        },
    );
    p.handle(81, Event::Connected { peer: PeerId(6) });
    p.handle(
        82,
        Event::Message {
            peer: PeerId(6),
            msg: PeerMessage::Heartbeat {
                seq: 0,
                stamp: 82,
                lease_ms: 200,
                poll: false,
            },
        },
    );
    assert_eq!(p.read_lease_until(), None);
}

#[test]
fn a_slave_serving_stale_reads_asks_for_no_lease() {
    let cfg = ParticipantConfig {
        read_lease_ms: 0,
        ..config()
    };
    let mut p = Participant::recover(cfg, 0, H);
    p.handle(0, Event::Connected { peer: M });
    p.handle(0, registered(H, CatchUp::Log { from_seq: 0 }));
    p.handle(0, from_master(PeerMessage::CaughtUp { seq: 0 }));
    drain(&mut p);
    p.handle(5, from_master(PeerMessage::poll(0)));
    assert!(matches!(
        sends(&drain(&mut p))[..],
        [PeerMessage::Heartbeat { lease_ms: 0, .. }]
    ));
    p.handle(6, grant(5, 200));
    assert_eq!(p.read_lease_until(), None);
}

#[test]
fn redial_delays_double_with_jitter_up_to_the_cap() {
    let config = config();
    let (min, max) = (config.reconnect_min_ms, config.reconnect_max_ms);
    let delays = failing_redial_delays(config, 40);
    let mut base = min;
    for (i, &delay) in delays.iter().enumerate() {
        // Between half the nominal delay and all of it: never past the cap.
        assert!(
            (base - base / 2..=base).contains(&delay),
            "delay {i} is {delay} ms, nominal {base} ms: {delays:?}"
        );
        base = (base * 2).min(max);
    }
    // Once at the cap, the delays still vary (jitter), within [max/2, max].
    let capped: std::collections::BTreeSet<u64> = delays[10..].iter().copied().collect();
    assert!(capped.len() > 5, "no jitter at the cap: {capped:?}");
}

#[test]
fn redial_jitter_replays_from_its_seed() {
    let seeded = |jitter_seed| ParticipantConfig {
        jitter_seed,
        ..config()
    };
    let a = failing_redial_delays(seeded(1), 20);
    assert_eq!(
        a,
        failing_redial_delays(seeded(1), 20),
        "same seed, same delays"
    );
    assert_ne!(
        a,
        failing_redial_delays(seeded(2), 20),
        "another seed, others"
    );
}

#[test]
fn a_catch_up_resets_the_redial_delay() {
    let mut p = following(0);
    // Lose the link and fail to redial until the delay is at its cap.
    let mut now = 0;
    p.handle(now, Event::PeerLost { peer: M });
    for _ in 0..10 {
        now = reconnect_at(&drain(&mut p)).expect("a reconnect timer");
        p.handle(
            now,
            Event::TimerFired {
                timer: TimerId::Reconnect,
            },
        );
        p.handle(now, Event::ConnectFailed);
    }
    let capped = reconnect_at(&drain(&mut p)).expect("a reconnect timer") - now;
    assert!(capped >= config().reconnect_max_ms / 2, "{capped}");
    // A link that registers and catches up puts the next loss back at the minimum.
    p.handle(
        now + capped,
        Event::TimerFired {
            timer: TimerId::Reconnect,
        },
    );
    let peer = PeerId(6);
    now += capped;
    p.handle(now, Event::Connected { peer });
    p.handle(
        now,
        Event::Message {
            peer,
            msg: PeerMessage::Registered {
                master_seq: 0,
                history_id: H,
                catch_up: CatchUp::Log { from_seq: 0 },
                epoch: 0,
            },
        },
    );
    p.handle(
        now,
        Event::Message {
            peer,
            msg: PeerMessage::CaughtUp { seq: 0 },
        },
    );
    assert_eq!(p.link(), LinkState::Following(peer));
    drain(&mut p);
    p.handle(now, Event::PeerLost { peer });
    let delay = reconnect_at(&drain(&mut p)).expect("a reconnect timer") - now;
    assert!(delay <= config().reconnect_min_ms, "{delay}");
}

/// A slave following at 0 that voted YES on transactions `1..=n`.
fn voted_through(n: u64) -> Participant {
    let mut p = following(0);
    for seq in 1..=n {
        p.handle(
            0,
            from_master(PeerMessage::Prepare {
                seq,
                commit_through: 0,
                ops: ops(&format!("k{seq}")),
            }),
        );
    }
    p.handle(0, Event::Persisted { lsn: n });
    drain(&mut p);
    p
}

#[test]
fn a_prepare_carrying_a_commit_commits_first_and_its_vote_carries_the_ack() {
    let mut p = voted_through(1);
    p.handle(
        1,
        from_master(PeerMessage::Prepare {
            seq: 2,
            commit_through: 1,
            ops: ops("b"),
        }),
    );
    let actions = drain(&mut p);
    assert!(
        matches!(
            &actions[..],
            [
                Action::Apply { seq: 1, .. },
                Action::Persist {
                    lsn: 2,
                    record: Record::Committed { seq: 1 }
                },
                Action::Persist {
                    lsn: 3,
                    record: Record::Prepared { seq: 2, .. }
                }
            ]
        ),
        "{actions:?}"
    );
    assert_eq!((p.position(), p.in_doubt()), (1, 1));
    // Both records durable at once: one message answers both.
    p.handle(2, Event::Persisted { lsn: 3 });
    assert_eq!(
        sends(&drain(&mut p)),
        vec![PeerMessage::Vote {
            seq: 2,
            vote: Vote::Yes,
            ack_through: 1,
        }]
    );
}

#[test]
fn a_commit_durable_before_the_next_vote_is_acked_alone() {
    let mut p = voted_through(1);
    p.handle(
        1,
        from_master(PeerMessage::Prepare {
            seq: 2,
            commit_through: 1,
            ops: ops("b"),
        }),
    );
    drain(&mut p);
    p.handle(2, Event::Persisted { lsn: 2 });
    assert_eq!(sends(&drain(&mut p)), vec![PeerMessage::Ack { seq: 1 }]);
    p.handle(3, Event::Persisted { lsn: 3 });
    assert_eq!(
        sends(&drain(&mut p)),
        vec![PeerMessage::Vote {
            seq: 2,
            vote: Vote::Yes,
            ack_through: 0,
        }]
    );
}

#[test]
fn a_commit_covers_every_transaction_held_prepared_through_its_seq() {
    let mut p = voted_through(3);
    p.handle(1, from_master(PeerMessage::Commit { seq: 2 }));
    let actions = drain(&mut p);
    assert!(
        matches!(
            &actions[..],
            [
                Action::Apply { seq: 1, .. },
                Action::Persist {
                    lsn: 4,
                    record: Record::Committed { seq: 1 }
                },
                Action::Apply { seq: 2, .. },
                Action::Persist {
                    lsn: 5,
                    record: Record::Committed { seq: 2 }
                }
            ]
        ),
        "{actions:?}"
    );
    assert_eq!((p.position(), p.in_doubt()), (2, 1));
    p.handle(2, Event::Persisted { lsn: 5 });
    assert_eq!(sends(&drain(&mut p)), vec![PeerMessage::Ack { seq: 2 }]);
}

#[test]
fn a_commit_of_a_transaction_not_held_prepared_is_a_violation() {
    // Alone: nothing prepared at 4.
    let mut p = voted_through(2);
    p.handle(1, from_master(PeerMessage::Commit { seq: 4 }));
    assert!(drain(&mut p).contains(&Action::Disconnect { peer: M }));
    assert_eq!((p.position(), p.protocol_violations()), (0, 1));
    // Carried by a PREPARE: neither is taken.
    let mut p = voted_through(2);
    p.handle(
        1,
        from_master(PeerMessage::Prepare {
            seq: 3,
            commit_through: 4,
            ops: ops("c"),
        }),
    );
    let actions = drain(&mut p);
    assert!(actions.contains(&Action::Disconnect { peer: M }));
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Persist { .. } | Action::Apply { .. })),
        "{actions:?}"
    );
    assert_eq!(p.protocol_violations(), 1);
}
