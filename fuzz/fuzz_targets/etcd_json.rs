//! Fuzz the JSON answers of etcd's gateway (`etcd::json` response types),
//! as a hostile or broken etcd would send them, and the watch stream's way of
//! taking messages one at a time off a body (as `Watch::parse_message` does).
//!
//! Properties: no panic; a stream of messages consumes the bytes in order,
//! each message's offset within the input; decoding the bytes a message took
//! gives that message again; every event converts to a `KeyValue`.

#![no_main]

use dkvs::etcd::KeyValue;
use dkvs::etcd::json::{
    DeleteRangeResponseJson, HeaderOnlyJson, LeaseGrantResponseJson, LeaseKeepAliveResponseJson,
    LeaseTimeToLiveResponseJson, RangeResponseJson, StreamMessage, TxnResponseJson,
    WatchResponseJson,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<RangeResponseJson>(data);
    let _ = serde_json::from_slice::<HeaderOnlyJson>(data);
    let _ = serde_json::from_slice::<DeleteRangeResponseJson>(data);
    let _ = serde_json::from_slice::<TxnResponseJson>(data);
    let _ = serde_json::from_slice::<LeaseGrantResponseJson>(data);
    let _ = serde_json::from_slice::<StreamMessage<LeaseKeepAliveResponseJson>>(data);
    let _ = serde_json::from_slice::<LeaseTimeToLiveResponseJson>(data);

    let mut values =
        serde_json::Deserializer::from_slice(data).into_iter::<StreamMessage<WatchResponseJson>>();
    let mut at = 0;
    // Each message takes at least one byte, so this ends within data.len() rounds.
    while let Some(Ok(message)) = values.next() {
        let end = values.byte_offset();
        assert!(end > at && end <= data.len());
        let again: StreamMessage<WatchResponseJson> =
            serde_json::from_slice(&data[at..end]).expect("a message's own bytes decode");
        assert_eq!(again, message);
        if let Some(result) = message.result {
            for event in result.events {
                let kv = KeyValue::from(event.kv.clone());
                assert_eq!(kv.key, event.kv.key);
            }
        }
        at = end;
    }
});
