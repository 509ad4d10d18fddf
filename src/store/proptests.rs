//! The store against a `BTreeMap` model (proptest): any sequence of writes,
//! clock moves and reads leaves the two agreeing on every key, its value,
//! version and deadline, and on the counters STATS shows.

use std::collections::BTreeMap;

use proptest::collection::vec;
use proptest::prelude::*;

use super::{Applied, Store, Write};

/// A step of the sequence.
#[derive(Debug, Clone)]
enum Step {
    Put(Vec<u8>, Vec<u8>),
    PutExpiring(Vec<u8>, Vec<u8>, u64),
    Update(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Expire(Vec<u8>, Option<u64>),
    /// Move the clock reads compare deadlines with.
    Now(u64),
    Clear,
}

/// What the model holds for a key: value, version, deadline.
type Entry = (Vec<u8>, u64, Option<u64>);

/// Few distinct keys, so writes meet the keys earlier ones made.
fn key() -> impl Strategy<Value = Vec<u8>> {
    vec(0..4u8, 1..3)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..24)
}

/// Deadlines and clock values in a small range, so that keys do expire.
fn instant() -> impl Strategy<Value = u64> {
    1..40u64
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (key(), value()).prop_map(|(k, v)| Step::Put(k, v)),
        2 => (key(), value(), instant()).prop_map(|(k, v, d)| Step::PutExpiring(k, v, d)),
        2 => (key(), value()).prop_map(|(k, v)| Step::Update(k, v)),
        2 => key().prop_map(Step::Delete),
        2 => (key(), proptest::option::of(instant())).prop_map(|(k, d)| Step::Expire(k, d)),
        2 => instant().prop_map(Step::Now),
        1 => Just(Step::Clear),
    ]
}

/// Apply `step` at `version` to the model; what the store must answer.
fn model_apply(model: &mut BTreeMap<Vec<u8>, Entry>, step: &Step, version: u64) -> Option<Applied> {
    // Writes see every held key, expired or not: only the master's
    // replicated delete removes an expired key.
    let changed = Some(Applied::Changed(version));
    match step {
        Step::Put(k, v) => {
            model.insert(k.clone(), (v.clone(), version, None));
            changed
        }
        Step::PutExpiring(k, v, d) => {
            model.insert(k.clone(), (v.clone(), version, Some(*d)));
            changed
        }
        Step::Update(k, v) => match model.get_mut(k) {
            // An UPDATE leaves no deadline (as Redis's SET XX).
            Some(entry) => {
                *entry = (v.clone(), version, None);
                changed
            }
            None => Some(Applied::NotFound),
        },
        Step::Delete(k) => match model.remove(k) {
            Some(_) => changed,
            None => Some(Applied::NotFound),
        },
        Step::Expire(k, d) => match model.get_mut(k) {
            Some(entry) => {
                entry.1 = version;
                entry.2 = *d;
                changed
            }
            None => Some(Applied::NotFound),
        },
        Step::Now(_) => None,
        Step::Clear => {
            model.clear();
            None
        }
    }
}

fn store_apply(store: &mut Store, step: &Step, version: u64) -> Option<Applied> {
    let write = match step {
        Step::Put(key, value) => Write::Put { key, value },
        Step::PutExpiring(key, value, d) => Write::PutExpiring {
            key,
            value,
            deadline_ms: *d,
        },
        Step::Update(key, value) => Write::Update { key, value },
        Step::Delete(key) => Write::Delete { key },
        Step::Expire(key, d) => Write::Expire {
            key,
            deadline_ms: *d,
        },
        Step::Now(now) => {
            store.set_now_ms(*now);
            return None;
        }
        Step::Clear => {
            store.clear();
            return None;
        }
    };
    Some(store.apply(write, version))
}

/// Every key of the model (and some that are not) reads the same from the
/// store; the counters agree.
fn check(store: &Store, model: &BTreeMap<Vec<u8>, Entry>) -> Result<(), TestCaseError> {
    let now = store.now_ms();
    for k in
        (0..4u8).flat_map(|a| std::iter::once(vec![a]).chain((0..4u8).map(move |b| vec![a, b])))
    {
        let want = model.get(&k);
        prop_assert_eq!(
            store.get_held(&k),
            want.map(|(v, ver, _)| (v.as_slice(), *ver)),
            "key {:?}",
            k
        );
        let live = want.filter(|(_, _, d)| d.is_none_or(|d| d > now));
        prop_assert_eq!(
            store.get(&k),
            live.map(|(v, ver, _)| (v.as_slice(), *ver)),
            "key {:?} at {}",
            k,
            now
        );
        prop_assert_eq!(store.deadline(&k), want.and_then(|e| e.2), "key {:?}", k);
    }
    prop_assert_eq!(store.len(), model.len());
    prop_assert_eq!(
        store.data_bytes(),
        model
            .iter()
            .map(|(k, (v, _, _))| k.len() + v.len())
            .sum::<usize>()
    );
    prop_assert_eq!(
        store.expiring(),
        model.values().filter(|e| e.2.is_some()).count()
    );
    let mut held: Vec<Vec<u8>> = store.iter().map(|b| b.key().to_vec()).collect();
    held.sort();
    prop_assert_eq!(held, model.keys().cloned().collect::<Vec<_>>());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_store_agrees_with_a_btreemap(steps in vec(step(), 1..40)) {
        let mut store = Store::new();
        let mut model = BTreeMap::new();
        for (i, step) in steps.iter().enumerate() {
            let version = i as u64 + 1;
            let want = model_apply(&mut model, step, version);
            prop_assert_eq!(store_apply(&mut store, step, version), want, "step {} {:?}", i, step);
            check(&store, &model)?;
        }
        // The sweep finds exactly the expired keys, each in its own shard.
        let now = store.now_ms();
        let mut expired: Vec<Vec<u8>> = (0..super::SHARDS)
            .flat_map(|s| store.expired_in_shard(s, now).map(<[u8]>::to_vec).collect::<Vec<_>>())
            .collect();
        expired.sort();
        let want: Vec<Vec<u8>> = model
            .iter()
            .filter(|(_, e)| e.2.is_some_and(|d| d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        prop_assert_eq!(expired, want);
        for k in model.keys() {
            let shard = store.shard_of(k);
            prop_assert!(store.iter_shard(shard).any(|b| b.key() == k.as_slice()));
        }
    }
}
