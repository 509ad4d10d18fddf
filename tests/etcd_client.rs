//! The etcd client against a real etcd (started by tests/common/etcd.rs on free loopback ports).

mod common;

use std::time::{Duration, Instant};

use common::etcd::{EtcdProcess, free_port};
use dkvs::etcd::{
    Compare, EtcdClient, EtcdError, KeyValue, TxnOp, TxnOpResponse, WatchEvent, WatchNext,
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// The next event within a couple of seconds; panics on anything else.
fn next_event(watch: &mut dkvs::etcd::Watch) -> WatchEvent {
    match watch.next(Duration::from_secs(3)) {
        Ok(WatchNext::Event(event)) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[test]
fn put_range_prefix_and_delete() {
    let etcd = EtcdProcess::start();
    let client = etcd.client(TIMEOUT);
    let (absent, rev0) = client.range(b"/t/a").expect("range");
    assert_eq!(absent, None);
    assert!(rev0 >= 1);

    let rev1 = client.put(b"/t/a", b"one", None).expect("put");
    assert!(rev1 > rev0);
    let rev2 = client.put(b"/t/b", b"\x00\xff binary", None).expect("put");
    client.put(b"/u/c", b"elsewhere", None).expect("put");
    let rev3 = client.put(b"/t/a", b"two", None).expect("put");
    let (a, rev) = client.range(b"/t/a").expect("range");
    assert_eq!(
        a,
        Some(KeyValue {
            key: b"/t/a".to_vec(),
            value: b"two".to_vec(),
            create_revision: rev1,
            mod_revision: rev3,
            version: 2,
            lease: 0,
        })
    );
    assert!(rev1 < rev2 && rev2 < rev3 && rev3 <= rev);

    let (under_t, _) = client.range_prefix(b"/t/").expect("range prefix");
    let keys: Vec<&[u8]> = under_t.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [&b"/t/a"[..], &b"/t/b"[..]]);
    assert_eq!(under_t[1].value, b"\x00\xff binary");

    let (deleted, _) = client.delete(b"/t/a").expect("delete");
    assert_eq!(deleted, 1);
    let (deleted, _) = client.delete(b"/t/a").expect("delete again");
    assert_eq!(deleted, 0);
    assert_eq!(client.range(b"/t/a").expect("range").0, None);
}

#[test]
fn txn_compare_and_swap() {
    let etcd = EtcdProcess::start();
    let client = etcd.client(TIMEOUT);
    let key = b"/t/leader".to_vec();
    let create = |value: &[u8]| {
        client.txn(
            &[Compare::Version(key.clone(), 0)],
            &[TxnOp::Put {
                key: key.clone(),
                value: value.to_vec(),
                lease: None,
            }],
            &[TxnOp::Range { key: key.clone() }],
        )
    };
    // Create-if-absent succeeds once...
    let first = create(b"node-1").expect("txn");
    assert!(first.succeeded);
    assert_eq!(first.responses, [TxnOpResponse::Put]);
    // ...and then fails, reading the holder in the failure branch.
    let second = create(b"node-2").expect("txn");
    assert!(!second.succeeded);
    assert_eq!(second.revision, first.revision);
    let holder = match &second.responses[..] {
        [TxnOpResponse::Range(Some(kv))] => kv.clone(),
        other => panic!("expected the holder, got {other:?}"),
    };
    assert_eq!(holder.value, b"node-1");
    assert_eq!(holder.create_revision, first.revision);
    assert_eq!(holder.mod_revision, first.revision);

    // Swap on mod_revision: the current one wins, a stale one loses.
    let swap = |mod_revision: i64, value: &[u8]| {
        client.txn(
            &[Compare::ModRevision(key.clone(), mod_revision)],
            &[
                TxnOp::Put {
                    key: key.clone(),
                    value: value.to_vec(),
                    lease: None,
                },
                TxnOp::Range { key: key.clone() },
            ],
            &[],
        )
    };
    let swapped = swap(holder.mod_revision, b"node-1 epoch 2").expect("txn");
    assert!(swapped.succeeded);
    match &swapped.responses[..] {
        [TxnOpResponse::Put, TxnOpResponse::Range(Some(kv))] => {
            assert_eq!(kv.value, b"node-1 epoch 2");
            assert_eq!(kv.version, 2);
        }
        other => panic!("unexpected responses {other:?}"),
    }
    let stale = swap(holder.mod_revision, b"stale").expect("txn");
    assert!(!stale.succeeded);
    assert!(stale.responses.is_empty());

    // Value and create_revision comparisons, and a delete in a branch.
    let by_value = client
        .txn(
            &[
                Compare::Value(key.clone(), b"node-1 epoch 2".to_vec()),
                Compare::CreateRevision(key.clone(), first.revision),
            ],
            &[TxnOp::Delete { key: key.clone() }],
            &[],
        )
        .expect("txn");
    assert!(by_value.succeeded);
    assert_eq!(by_value.responses, [TxnOpResponse::Delete(1)]);
    let wrong_value = client
        .txn(
            &[Compare::Value(key.clone(), b"anything".to_vec())],
            &[],
            &[TxnOp::Range { key: key.clone() }],
        )
        .expect("txn");
    assert!(!wrong_value.succeeded);
    assert_eq!(wrong_value.responses, [TxnOpResponse::Range(None)]);
}

#[test]
fn lease_keepalive_and_expiry() {
    let etcd = EtcdProcess::start();
    let client = etcd.client(TIMEOUT);
    // 2 s rather than etcd's 1 s floor (with the harness's timing), so that keepalives every
    // 200 ms keep it alive on a busy machine.
    let (lease, granted) = client.lease_grant(Duration::from_secs(2)).expect("grant");
    assert_eq!(granted, 2);
    client.put(b"/t/owned", b"x", Some(lease)).expect("put");
    let (kv, _) = client.range(b"/t/owned").expect("range");
    assert_eq!(kv.map(|kv| kv.lease), Some(lease));

    // Kept alive past its TTL, the key stays.
    let kept_until =
        Instant::now() + Duration::from_secs(granted as u64) + Duration::from_millis(500);
    while Instant::now() < kept_until {
        let left = client.lease_keepalive(lease).expect("keepalive");
        assert!(left >= 1, "keepalive left {left}s");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(client.range(b"/t/owned").expect("range").0.is_some());
    let ttl = client
        .lease_time_to_live(lease)
        .expect("ttl")
        .expect("lease alive");
    assert_eq!(ttl.granted_secs, granted);
    assert!(ttl.remaining_secs <= granted);

    // Left alone, it expires and takes the key with it.
    let start = Instant::now();
    common::wait_until("the leased key vanishes", Duration::from_secs(6), || {
        client.range(b"/t/owned").expect("range").0.is_none()
    });
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert_eq!(client.lease_keepalive(lease).expect("keepalive"), 0);
    assert_eq!(client.lease_time_to_live(lease).expect("ttl"), None);
    assert!(!client.lease_revoke(lease).expect("revoke"));

    // A put on a lease that is gone is refused, and says so.
    let err = client.put(b"/t/owned", b"y", Some(lease)).expect_err("put");
    assert!(err.is_lease_not_found(), "{err}");

    // Revoking deletes at once.
    let (lease2, _) = client.lease_grant(Duration::from_secs(30)).expect("grant");
    client.put(b"/t/owned2", b"z", Some(lease2)).expect("put");
    assert!(client.lease_revoke(lease2).expect("revoke"));
    assert_eq!(client.range(b"/t/owned2").expect("range").0, None);
}

#[test]
fn watch_sees_puts_and_lease_expiry() {
    let etcd = EtcdProcess::start();
    let client = etcd.client(TIMEOUT);
    let key = b"/t/watched";
    let (_, rev) = client.range(key).expect("range");
    let mut watch = client.watch(key, rev + 1).expect("watch");
    assert!(watch.created_revision() >= rev);
    assert_eq!(
        watch.next(Duration::from_millis(100)).expect("next"),
        WatchNext::Timeout
    );

    let put1 = client.put(key, b"a", None).expect("put");
    client.put(b"/t/other", b"not watched", None).expect("put");
    let (lease, _) = client.lease_grant(Duration::from_secs(1)).expect("grant");
    let put2 = client.put(key, b"b", Some(lease)).expect("put");
    match next_event(&mut watch) {
        WatchEvent::Put(kv) => {
            assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"a"[..], put1));
        }
        other => panic!("expected a put, got {other:?}"),
    }
    match next_event(&mut watch) {
        WatchEvent::Put(kv) => {
            assert_eq!(kv.value, b"b");
            assert_eq!((kv.mod_revision, kv.lease), (put2, lease));
        }
        other => panic!("expected a put, got {other:?}"),
    }
    assert_eq!(watch.next_revision(), put2 + 1);
    // The lease expires: the key's deletion is an event like any other.
    match watch.next(Duration::from_secs(6)).expect("next") {
        WatchNext::Event(WatchEvent::Delete {
            key: k,
            mod_revision,
        }) => {
            assert_eq!(k, key);
            assert!(mod_revision > put2);
        }
        other => panic!("expected the lease-expiry delete, got {other:?}"),
    }

    // A watch from the start sees the history; after compaction it is told so.
    let mut replay = client.watch(key, 1).expect("watch");
    match next_event(&mut replay) {
        WatchEvent::Put(kv) => assert_eq!(kv.mod_revision, put1),
        other => panic!("expected the first put, got {other:?}"),
    }
    client.compact(put2).expect("compact");
    let mut compacted = client.watch(key, put1).expect("watch");
    assert_eq!(
        compacted.next(Duration::from_secs(3)).expect("next"),
        WatchNext::Compacted {
            compact_revision: put2
        }
    );
    // The end is sticky.
    assert!(matches!(
        compacted.next(Duration::from_millis(10)),
        Ok(WatchNext::Compacted { .. })
    ));
}

#[test]
fn watch_prefix_and_stream_end_when_etcd_dies() {
    let mut etcd = EtcdProcess::start();
    let client = etcd.client(TIMEOUT);
    let mut watch = client.watch_prefix(b"/p/", 0).expect("watch");
    assert_eq!(watch.next_revision(), watch.created_revision() + 1);
    client.put(b"/p/1", b"x", None).expect("put");
    client
        .put(b"/q/1", b"not under the prefix", None)
        .expect("put");
    client.put(b"/p/2", b"y", None).expect("put");
    let keys: Vec<Vec<u8>> = (0..2)
        .map(|_| match next_event(&mut watch) {
            WatchEvent::Put(kv) => kv.key,
            other => panic!("expected a put, got {other:?}"),
        })
        .collect();
    assert_eq!(keys, [b"/p/1".to_vec(), b"/p/2".to_vec()]);

    etcd.kill9();
    assert_eq!(
        watch.next(Duration::from_secs(3)).expect("next"),
        WatchNext::Ended
    );
    // Restarted on the same data directory, the data is there and the same client works.
    etcd.restart();
    let (kv, _) = client.range(b"/p/2").expect("range after restart");
    assert_eq!(kv.map(|kv| kv.value), Some(b"y".to_vec()));
    // Continuing from where the dead watch stopped misses nothing and repeats nothing.
    let mut again = client
        .watch_prefix(b"/p/", watch.next_revision())
        .expect("watch");
    client.put(b"/p/3", b"z", None).expect("put");
    match next_event(&mut again) {
        WatchEvent::Put(kv) => assert_eq!(kv.key, b"/p/3"),
        other => panic!("expected /p/3, got {other:?}"),
    }
}

#[test]
fn failover_past_a_dead_endpoint() {
    let etcd = EtcdProcess::start();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let client = EtcdClient::new(vec![dead.clone(), etcd.client_url.clone()], TIMEOUT);
    // Mutations move on too: a refused connection cannot have delivered anything.
    client
        .put(b"/t/f", b"v", None)
        .expect("put through the live endpoint");
    let (kv, _) = client.range(b"/t/f").expect("range");
    assert_eq!(kv.map(|kv| kv.value), Some(b"v".to_vec()));
    let mut watch = client.watch(b"/t/f", 0).expect("watch");
    assert_eq!(watch.endpoint(), etcd.client_url);
    assert_eq!(
        watch.next(Duration::from_millis(50)).expect("next"),
        WatchNext::Timeout
    );

    let nobody = EtcdClient::new(
        vec![dead, format!("http://127.0.0.1:{}", free_port())],
        TIMEOUT,
    );
    match nobody.range(b"/t/f") {
        Err(EtcdError::Unreachable(attempts)) => assert_eq!(attempts.len(), 2, "{attempts:?}"),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(matches!(
        nobody.watch(b"/t/f", 0),
        Err(EtcdError::Unreachable(_))
    ));
}

#[test]
fn three_members_one_frozen() {
    let mut members = EtcdProcess::cluster(3);
    let urls = EtcdProcess::urls(&members);
    let timeout = Duration::from_secs(1);
    EtcdClient::new(urls.clone(), timeout)
        .put(b"/t/c", b"before", None)
        .expect("put");
    members[0].stop();
    // If the frozen member led, the other two elect a leader first (its
    // election timeout is 500 ms); until then they answer 503 "no leader".
    let others = EtcdClient::new(urls[1..].to_vec(), timeout);
    let deadline = Instant::now() + Duration::from_secs(15);
    while others.range(b"/t/c").is_err() {
        assert!(
            Instant::now() < deadline,
            "the two live members elect no leader"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A read times out at the frozen member and is answered by the next.
    let reader = EtcdClient::new(urls.clone(), timeout);
    let (kv, _) = reader.range(b"/t/c").expect("range past a frozen member");
    assert_eq!(kv.map(|kv| kv.value), Some(b"before".to_vec()));
    // The client now starts at the member that answered.
    assert_eq!(reader.current_endpoint(), Some(urls[1].as_str()));
    reader.put(b"/t/c", b"after", None).expect("put");
    assert_eq!(reader.current_endpoint(), Some(urls[1].as_str()));

    // A transaction is not re-sent after a timeout: it may have been applied.
    let writer = EtcdClient::new(urls.clone(), timeout);
    let err = writer
        .txn(&[Compare::Version(b"/t/c".to_vec(), 0)], &[], &[])
        .expect_err("txn to the frozen member");
    assert!(err.outcome_unknown(), "{err}");
    assert!(matches!(err, EtcdError::Timeout { .. }), "{err}");
    // The next call starts at the next member.
    assert_eq!(writer.current_endpoint(), Some(urls[1].as_str()));
    let txn = writer
        .txn(
            &[Compare::Value(b"/t/c".to_vec(), b"after".to_vec())],
            &[],
            &[],
        )
        .expect("txn");
    assert!(txn.succeeded);

    members[0].resume();
    members[0]
        .wait_healthy(Duration::from_secs(10))
        .expect("healthy again");
    let (kv, _) = members[0].client(TIMEOUT).range(b"/t/c").expect("range");
    assert_eq!(kv.map(|kv| kv.value), Some(b"after".to_vec()));
}

#[test]
fn a_member_cut_off_from_its_leader_cancels_watches_and_refuses_calls() {
    let mut members = EtcdProcess::cluster(3);
    let lone = members[0].client(TIMEOUT);
    let mut watch = lone.watch(b"/t/w", 0).expect("watch");
    // Freeze the other two: the first member loses its leader within an election timeout.
    members[1].stop();
    members[2].stop();
    let start = Instant::now();
    let outcome = watch.next(Duration::from_secs(8)).expect("next");
    eprintln!(
        "watch on a leaderless member: {outcome:?} after {:?}",
        start.elapsed()
    );
    match outcome {
        WatchNext::Canceled { reason } => assert!(reason.contains("no leader"), "{reason}"),
        other => panic!("expected the watch to be canceled, got {other:?}"),
    }
    let start = Instant::now();
    let err = lone.range(b"/t/w").expect_err("range without a leader");
    eprintln!(
        "range on a leaderless member: {err} after {:?}",
        start.elapsed()
    );
    assert!(matches!(err, EtcdError::Http { status: 503, .. }), "{err}");
    members[1].resume();
    members[2].resume();
}
