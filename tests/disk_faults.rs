//! Disk faults injected at the write-ahead log's fault points (the
//! `fault-injection` feature; `.ci/run` runs this file with it): a failed
//! fsync, a short write (disk full), a crash between write and fsync. The
//! server must stop acknowledging what it cannot keep, keep serving reads,
//! and lose nothing it acknowledged.
#![cfg(feature = "fault-injection")]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::ServerProcess;
use dkvs::client::{Client, ClientConfig, ClientError, Transport};

fn quick_client(server: &ServerProcess) -> Client {
    let config = ClientConfig {
        transport: Transport::Tcp,
        timeout: Duration::from_millis(800),
        ..ClientConfig::default()
    };
    Client::connect("127.0.0.1", server.port, config).expect("connect")
}

/// Write until a write fails; returns what was acknowledged and the first error.
fn write_until_refused(server: &ServerProcess) -> (HashMap<Vec<u8>, u64>, ClientError) {
    let mut acked = HashMap::new();
    let mut c = quick_client(server);
    for i in 0..200 {
        let key = format!("k{i}").into_bytes();
        match c.put(&key, b"v") {
            Ok(v) => {
                acked.insert(key, v);
            }
            Err(e) => return (acked, e),
        }
    }
    panic!("the injected fault never fired");
}

fn refused_after(server: &ServerProcess) -> String {
    // The write in flight when the log failed lost its connection; later ones are refused.
    let mut c = quick_client(server);
    match c.put(b"later", b"v") {
        Err(e) => e.to_string(),
        Ok(v) => panic!("a write was acknowledged after the log failed (version {v})"),
    }
}

fn recovered(dir: &std::path::Path, acked: &HashMap<Vec<u8>, u64>) {
    let dir = dir.display().to_string();
    let server = ServerProcess::start(&["-d", &dir]);
    let mut c = server.client(Transport::Tcp);
    for (key, version) in acked {
        let got = c.get(key).expect("get").expect("acknowledged write kept");
        assert_eq!(got.version, *version);
    }
    c.put(b"after", b"restart")
        .expect("writes work again after a restart");
}

#[test]
fn a_failed_fsync_stops_acknowledging_and_is_never_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let server = ServerProcess::start_env(&["-d", &d], &[("DKVS_FAULT", "fsync@20")]);
    // A patient client: the write in flight when the sync failed must end
    // promptly with a closed connection (its outcome is unknown), not time out.
    let mut c = Client::connect(
        "127.0.0.1",
        server.port,
        ClientConfig {
            transport: Transport::Tcp,
            timeout: Duration::from_secs(20),
            ..ClientConfig::default()
        },
    )
    .expect("connect");
    let mut acked = HashMap::new();
    let mut failed = None;
    for i in 0..200 {
        let key = format!("k{i}").into_bytes();
        let started = std::time::Instant::now();
        match c.put(&key, b"v") {
            Ok(v) => {
                acked.insert(key, v);
            }
            Err(e) => {
                failed = Some((e, started.elapsed()));
                break;
            }
        }
    }
    let (error, took) = failed.expect("the injected fault never fired");
    assert!(
        matches!(error, ClientError::Closed | ClientError::Io(_)),
        "the write in flight ends with its connection closed: {error}"
    );
    assert!(took < Duration::from_secs(10), "it ended after {took:?}");
    assert!(acked.len() >= 15, "{} writes before the fault", acked.len());
    let why = refused_after(&server);
    assert!(why.contains("write-ahead log failed"), "{why}");
    assert!(why.contains("Input/output error"), "named: {why}");
    let mut c = server.client(Transport::Tcp);
    let (key, version) = acked.iter().next().expect("one");
    assert_eq!(
        c.get(key).expect("reads go on").map(|g| g.version),
        Some(*version)
    );
    let stats = server.stats();
    assert!(stats.text.contains("wal_error"), "{}", stats.text);
    drop(server);
    recovered(dir.path(), &acked);
}

#[test]
fn a_short_write_on_a_full_disk_is_reported_and_the_torn_record_cut_on_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let server = ServerProcess::start_env(&["-d", &d], &[("DKVS_FAULT", "short-write@30")]);
    let (acked, _) = write_until_refused(&server);
    let why = refused_after(&server);
    assert!(why.contains("No space left on device"), "named: {why}");
    drop(server);
    recovered(dir.path(), &acked);
    let torn = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".torn-"));
    assert!(torn, "the half-written record was cut and kept aside");
}

#[test]
fn a_crash_between_write_and_fsync_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let mut server =
        ServerProcess::start_env(&["-d", &d], &[("DKVS_FAULT", "crash-before-fsync@25")]);
    let (acked, _) = write_until_refused(&server);
    common::wait_until("the server aborted", Duration::from_secs(10), || {
        !server.is_running()
    });
    drop(server);
    recovered(dir.path(), &acked);
}
