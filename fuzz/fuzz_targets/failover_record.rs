//! Fuzz the etcd values a failover reads (`LeaderRecord::parse`,
//! `SyncRecord::parse`): anyone with write access to etcd chooses these bytes.
//!
//! Properties: no panic; a parsed record prints (Display) to text that parses
//! to the same record, and that text is the record's canonical form (printing
//! it again gives the same bytes); the parser's bounds hold (address length,
//! member count).

#![no_main]

use dkvs::failover::record::{LeaderRecord, SyncRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(leader) = LeaderRecord::parse(data) {
        assert!(!leader.addr.is_empty() && leader.addr.len() <= 255);
        // Fields are separated by spaces, so a parsed address holds none.
        assert!(!leader.addr.contains(' '));
        let text = leader.to_string();
        let back = LeaderRecord::parse(text.as_bytes()).expect("printed leader parses");
        assert_eq!(back, leader);
        assert_eq!(back.to_string(), text);
    }
    if let Ok(sync) = SyncRecord::parse(data) {
        assert!(sync.members.len() <= 1024);
        let text = sync.to_string();
        let back = SyncRecord::parse(text.as_bytes()).expect("printed sync set parses");
        assert_eq!(back, sync);
        assert_eq!(back.to_string(), text);
        assert!(sync.may_promote(sync.leader));
    }
});
