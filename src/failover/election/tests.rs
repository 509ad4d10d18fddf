use super::*;

const ME: u64 = 0xA;

fn config() -> ElectionConfig {
    ElectionConfig {
        node_id: ME,
        addr: "127.0.0.1:9000".into(),
        lease_ttl_ms: 2_000,
    }
}

fn drain(e: &mut Election) -> Vec<Action> {
    std::iter::from_fn(|| e.poll_action()).collect()
}

fn other(epoch: u64) -> LeaderRecord {
    LeaderRecord {
        epoch,
        node_id: 0xB,
        addr: "127.0.0.1:9001".into(),
    }
}

fn sync(epoch: u64, leader: u64, members: &[u64]) -> SyncRecord {
    SyncRecord {
        epoch,
        leader,
        members: members.iter().copied().collect(),
    }
}

/// An election that has won epoch 1 of a fresh cluster at time 0.
fn leading() -> Election {
    let mut e = Election::new(config(), 0);
    drain(&mut e);
    e.on_reply(0, Reply::Read(Observation::default()));
    drain(&mut e);
    e.on_reply(
        0,
        Reply::LeaseGranted {
            lease: 77,
            ttl_ms: 2_000,
            sent_ms: 0,
        },
    );
    drain(&mut e);
    e.on_reply(1, Reply::Campaigned { won: true });
    drain(&mut e);
    e
}

#[test]
fn a_fresh_cluster_is_led_by_whoever_takes_the_key_first() {
    let mut e = Election::new(config(), 0);
    assert_eq!(drain(&mut e), vec![Action::Etcd(Request::Read)]);
    e.on_reply(0, Reply::Read(Observation::default()));
    assert_eq!(
        drain(&mut e),
        vec![Action::Etcd(Request::GrantLease {
            ttl_ms: 2_000,
            sent_ms: 0
        })]
    );
    e.on_reply(
        5,
        Reply::LeaseGranted {
            lease: 77,
            ttl_ms: 2_000,
            sent_ms: 0,
        },
    );
    assert_eq!(
        drain(&mut e),
        vec![Action::Etcd(Request::Campaign {
            lease: 77,
            leader: LeaderRecord {
                epoch: 1,
                node_id: ME,
                addr: "127.0.0.1:9000".into()
            },
            sync_mod_revision: 0,
            sync: sync(1, ME, &[]),
        })]
    );
    e.on_reply(6, Reply::Campaigned { won: true });
    assert_eq!(
        drain(&mut e),
        vec![Action::Lead { epoch: 1 }, Action::LeaseValid(true)]
    );
    assert_eq!(
        e.state(),
        &State::Leading {
            epoch: 1,
            lease: 77
        }
    );
    // Counted on until the TTL less the margin, from when the grant was asked.
    assert_eq!(e.lease_left_ms(6), Some(2_000 - 500 - 6));
}

#[test]
fn a_node_follows_the_leader_it_reads_once() {
    let mut e = Election::new(config(), 0);
    drain(&mut e);
    let obs = Observation {
        leader: Some((other(4), 9)),
        sync: Some((sync(4, 0xB, &[ME]), 30)),
    };
    e.on_reply(0, Reply::Read(obs.clone()));
    assert_eq!(drain(&mut e), vec![Action::Follow(other(4))]);
    e.on_reply(10, Reply::Changed);
    assert_eq!(drain(&mut e), vec![Action::Etcd(Request::Read)]);
    e.on_reply(11, Reply::Read(obs));
    assert!(
        drain(&mut e).is_empty(),
        "the same leader again changes nothing"
    );
    // Without a watch event, the keys are read again after a while.
    e.tick(11 + config().reread_interval_ms());
    assert_eq!(drain(&mut e), vec![Action::Etcd(Request::Read)]);
}

#[test]
fn only_a_recorded_node_campaigns_and_it_bumps_the_epoch() {
    let mut e = Election::new(config(), 0);
    drain(&mut e);
    e.on_reply(
        0,
        Reply::Read(Observation {
            leader: None,
            sync: Some((sync(4, 0xB, &[0xC]), 30)),
        }),
    );
    assert!(drain(&mut e).is_empty(), "not recorded: no campaign");
    assert_eq!(e.state(), &State::Vacant);
    e.on_reply(1, Reply::Changed);
    drain(&mut e);
    e.on_reply(
        2,
        Reply::Read(Observation {
            leader: None,
            sync: Some((sync(4, 0xB, &[0xC, ME]), 31)),
        }),
    );
    assert!(matches!(
        &drain(&mut e)[..],
        [Action::Etcd(Request::GrantLease { .. })]
    ));
    e.on_reply(
        3,
        Reply::LeaseGranted {
            lease: 5,
            ttl_ms: 2_000,
            sent_ms: 2,
        },
    );
    let actions = drain(&mut e);
    let [
        Action::Etcd(Request::Campaign {
            leader,
            sync_mod_revision,
            sync: new_sync,
            ..
        }),
    ] = &actions[..]
    else {
        panic!("{actions:?}");
    };
    assert_eq!((leader.epoch, *sync_mod_revision), (5, 31));
    assert_eq!(
        new_sync,
        &sync(5, ME, &[]),
        "the new epoch starts with no slave recorded"
    );
    e.on_reply(4, Reply::Campaigned { won: false });
    assert_eq!(
        drain(&mut e),
        vec![
            Action::Etcd(Request::Revoke { lease: 5 }),
            Action::Etcd(Request::Read)
        ]
    );
}

#[test]
fn its_own_key_from_before_a_restart_is_waited_out() {
    let mut e = Election::new(config(), 0);
    drain(&mut e);
    let mine = LeaderRecord {
        epoch: 3,
        node_id: ME,
        addr: "127.0.0.1:9000".into(),
    };
    e.on_reply(
        0,
        Reply::Read(Observation {
            leader: Some((mine, 1)),
            sync: Some((sync(3, ME, &[]), 2)),
        }),
    );
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.state(), &State::Vacant);
}

#[test]
fn the_leader_renews_its_lease_and_stops_acknowledging_when_it_cannot() {
    let mut e = leading();
    let interval = config().keepalive_interval_ms();
    e.tick(1 + interval);
    let sent = 1 + interval;
    assert_eq!(
        drain(&mut e),
        vec![Action::Etcd(Request::Keepalive {
            lease: 77,
            sent_ms: sent
        })]
    );
    e.tick(sent + 1);
    assert!(drain(&mut e).is_empty(), "one keepalive in flight");
    e.on_reply(
        sent + 3,
        Reply::KeptAlive {
            sent_ms: sent,
            ttl_ms: 2_000,
        },
    );
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.lease_left_ms(sent), Some(1_500));
    // etcd goes quiet: keepalives fail, and the lease runs out locally.
    e.on_reply(
        sent + 10,
        Reply::Failed {
            what: "keepalive",
            error: "unreachable".into(),
        },
    );
    e.tick(sent + 1_500);
    let actions = drain(&mut e);
    assert_eq!(actions[0], Action::LeaseValid(false), "{actions:?}");
    // etcd answers again and the lease still lives: acknowledge again.
    e.on_reply(
        sent + 1_600,
        Reply::KeptAlive {
            sent_ms: sent + 1_500,
            ttl_ms: 900,
        },
    );
    assert_eq!(drain(&mut e), vec![Action::LeaseValid(true)]);
    // The lease is gone in etcd: step down.
    e.on_reply(
        sent + 1_700,
        Reply::KeptAlive {
            sent_ms: sent + 1_650,
            ttl_ms: 0,
        },
    );
    assert_eq!(
        drain(&mut e),
        vec![
            Action::LeaseValid(false),
            Action::StepDown,
            Action::Etcd(Request::Read)
        ]
    );
    assert_eq!(e.state(), &State::Observing);
}

#[test]
fn the_in_sync_set_is_written_under_the_leader_key_one_at_a_time() {
    let mut e = leading();
    e.record_sync_set(1, vec![0xB]);
    let write = |version: u64, members: &[u64]| {
        Action::Etcd(Request::WriteSync {
            version,
            leader: LeaderRecord {
                epoch: 1,
                node_id: ME,
                addr: "127.0.0.1:9000".into(),
            },
            sync: sync(1, ME, members),
        })
    };
    assert_eq!(drain(&mut e), vec![write(1, &[0xB])]);
    e.record_sync_set(2, vec![]);
    assert!(drain(&mut e).is_empty(), "one write in flight");
    e.on_reply(
        5,
        Reply::SyncWritten {
            version: 1,
            ok: true,
        },
    );
    assert_eq!(
        drain(&mut e),
        vec![Action::SyncRecorded { version: 1 }, write(2, &[])]
    );
    // etcd fails: retried later, never reported recorded meanwhile.
    e.on_reply(
        6,
        Reply::Failed {
            what: "write sync",
            error: "timeout".into(),
        },
    );
    assert!(drain(&mut e).is_empty());
    e.tick(6 + config().keepalive_interval_ms());
    assert!(drain(&mut e).contains(&write(2, &[])));
    // The key is no longer ours: step down, record nothing.
    e.on_reply(
        9,
        Reply::SyncWritten {
            version: 2,
            ok: false,
        },
    );
    let actions = drain(&mut e);
    assert!(actions.contains(&Action::StepDown), "{actions:?}");
    assert!(!actions.contains(&Action::SyncRecorded { version: 2 }));
}

#[test]
fn a_leader_that_reads_another_leader_steps_down_and_follows_it() {
    let mut e = leading();
    e.on_reply(10, Reply::Changed);
    assert_eq!(drain(&mut e), vec![Action::Etcd(Request::Read)]);
    e.on_reply(
        20,
        Reply::Read(Observation {
            leader: Some((other(2), 4)),
            sync: Some((sync(2, 0xB, &[]), 5)),
        }),
    );
    let actions = drain(&mut e);
    assert_eq!(
        actions,
        vec![
            Action::LeaseValid(false),
            Action::StepDown,
            Action::Etcd(Request::Read),
            Action::Follow(other(2)),
        ]
    );
}

#[test]
fn a_campaign_whose_answer_was_lost_is_settled_by_the_next_read() {
    let mut e = Election::new(config(), 0);
    drain(&mut e);
    e.on_reply(0, Reply::Read(Observation::default()));
    drain(&mut e);
    e.on_reply(
        1,
        Reply::LeaseGranted {
            lease: 9,
            ttl_ms: 2_000,
            sent_ms: 0,
        },
    );
    drain(&mut e);
    e.on_reply(
        2,
        Reply::Failed {
            what: "campaign",
            error: "timeout".into(),
        },
    );
    e.tick(2 + config().keepalive_interval_ms());
    assert_eq!(drain(&mut e), vec![Action::Etcd(Request::Read)]);
    // etcd holds our key under that lease: the campaign won.
    let mine = LeaderRecord {
        epoch: 1,
        node_id: ME,
        addr: "127.0.0.1:9000".into(),
    };
    e.on_reply(
        300,
        Reply::Read(Observation {
            leader: Some((mine, 9)),
            sync: Some((sync(1, ME, &[]), 2)),
        }),
    );
    assert_eq!(
        drain(&mut e),
        vec![Action::Lead { epoch: 1 }, Action::LeaseValid(true)]
    );

    // Lost the other way: the key is someone else's, so the lease goes back.
    let mut e = Election::new(config(), 0);
    drain(&mut e);
    e.on_reply(0, Reply::Read(Observation::default()));
    e.on_reply(
        1,
        Reply::LeaseGranted {
            lease: 10,
            ttl_ms: 2_000,
            sent_ms: 0,
        },
    );
    e.on_reply(
        2,
        Reply::Failed {
            what: "campaign",
            error: "timeout".into(),
        },
    );
    drain(&mut e);
    e.on_reply(
        3,
        Reply::Read(Observation {
            leader: Some((other(1), 4)),
            sync: Some((sync(1, 0xB, &[]), 5)),
        }),
    );
    assert_eq!(
        drain(&mut e),
        vec![
            Action::Etcd(Request::Revoke { lease: 10 }),
            Action::Follow(other(1))
        ]
    );
}

#[test]
fn a_win_reported_after_the_lease_margin_acknowledges_only_after_a_keepalive() {
    let mut e = Election::new(config(), 0);
    drain(&mut e);
    e.on_reply(0, Reply::Read(Observation::default()));
    e.on_reply(
        10,
        Reply::LeaseGranted {
            lease: 7,
            ttl_ms: 2_000,
            sent_ms: 0,
        },
    );
    drain(&mut e);
    // The answer took longer than the lease less its margin.
    e.on_reply(1_600, Reply::Campaigned { won: true });
    assert_eq!(drain(&mut e), vec![Action::Lead { epoch: 1 }]);
    e.tick(1_600 + config().keepalive_interval_ms());
    let sent = 1_600 + config().keepalive_interval_ms();
    assert!(drain(&mut e).contains(&Action::Etcd(Request::Keepalive {
        lease: 7,
        sent_ms: sent
    })));
    e.on_reply(
        sent + 5,
        Reply::KeptAlive {
            sent_ms: sent,
            ttl_ms: 2_000,
        },
    );
    assert_eq!(drain(&mut e), vec![Action::LeaseValid(true)]);
}
