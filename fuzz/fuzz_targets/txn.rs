//! Fuzz the TXN payload decoder (`protocol::txn::decode_txn`, opcode 0x07).
//!
//! Properties: it never panics and allocates only for counts the bytes can
//! hold; what decodes is within the limits a sender must respect, re-encodes
//! to the same length and decodes again to the same transaction (the encoding
//! is canonical but for the version field of absent/exists conditions, which
//! is ignored); every strict prefix of a valid payload is truncated; one byte
//! more is a trailing byte; an error's message names the txn.

#![no_main]

use dkvs::protocol::txn::{
    Check, MAX_TXN_CONDITIONS, MAX_TXN_WRITES, Txn, TxnError, TxnWrite, decode_txn,
};
use libfuzzer_sys::fuzz_target;

/// Cuts checked per valid input (evenly spread), so the work stays linear.
const MAX_CUTS: usize = 64;

fn check(data: &[u8], max_value_bytes: usize) {
    let txn = match decode_txn(data, max_value_bytes) {
        Ok(txn) => txn,
        Err(e) => {
            assert!(e.to_string().contains("txn"), "{e}");
            return;
        }
    };
    assert!(txn.conditions.len() <= MAX_TXN_CONDITIONS);
    assert!(txn.writes.len() <= MAX_TXN_WRITES);
    assert_eq!(txn.check_limits(), Ok(()));
    for w in &txn.writes {
        let stored = match w {
            TxnWrite::Put { value, .. }
            | TxnWrite::Update { value, .. }
            | TxnWrite::PutExpiring { value, .. } => value.len(),
            TxnWrite::Delete { .. } | TxnWrite::Expire { .. } => 0,
        };
        assert!(stored <= max_value_bytes);
        assert!(!matches!(
            w,
            TxnWrite::PutExpiring { deadline_ms: 0, .. }
                | TxnWrite::Expire {
                    deadline_ms: Some(0),
                    ..
                }
        ));
    }
    let mut again = Vec::new();
    txn.encode(&mut again);
    assert_eq!(again.len(), data.len());
    assert_eq!(decode_txn(&again, max_value_bytes).as_ref(), Ok(&txn));
    // Byte for byte unless an ignored version field was not 0.
    let ignored = txn
        .conditions
        .iter()
        .any(|c| matches!(c.check, Check::Absent | Check::Exists));
    if !ignored {
        assert_eq!(again, data);
    }
    let step = (data.len() / MAX_CUTS).max(1);
    for cut in (0..data.len()).step_by(step) {
        assert!(
            matches!(
                decode_txn(&data[..cut], max_value_bytes),
                Err(TxnError::Truncated(_))
            ),
            "cut at {cut} of {}",
            data.len()
        );
    }
    let mut longer = data.to_vec();
    longer.push(0);
    assert_eq!(
        decode_txn(&longer, max_value_bytes),
        Err(TxnError::TrailingBytes(1))
    );
    let rebuilt = Txn {
        conditions: txn.conditions.clone(),
        writes: txn.writes.clone(),
    };
    assert_eq!(rebuilt, txn);
}

fuzz_target!(|data: &[u8]| {
    // The last byte picks the value limit, so the fuzzer explores both sides of it.
    let max_value_bytes = match data.last() {
        Some(b) if b & 1 == 1 => (*b as usize) >> 2,
        _ => dkvs::protocol::DEFAULT_MAX_VALUE_BYTES,
    };
    check(data, max_value_bytes);
});
