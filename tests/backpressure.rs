//! Backpressure for transactions in flight (issue 10, resource control): a
//! master at `--max-inflight-txns` stops reading writes from its clients until
//! a transaction ends, instead of refusing them. With a bound of 1 and a slave
//! to vote on every transaction, many pipelining writers keep the master at
//! its bound: every write is acknowledged, none refused, and each is readable
//! at the master and at the slave.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{ServerProcess, read_response, wait_until};
use dkvs::client::Transport;
use dkvs::protocol::{Opcode, Status, encode_request};

const WRITERS: u64 = 24;
const WRITES_PER_WRITER: u64 = 400;

/// Requests a writer sends at once; the pieces follow each other ten
/// milliseconds apart, so that they arrive over many reactor turns, most of
/// them while a transaction is in flight.
const PIECE: u64 = 50;

/// PUT `w{writer}-{i}` = `v{i}` for every `i`, all written before any reply is
/// read; returns how many replies were OK (panics on any other status).
fn pipelined_writer(port: u16, writer: u64) -> u64 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut bytes = Vec::new();
    for i in 0..WRITES_PER_WRITER {
        let key = format!("w{writer}-{i}");
        let value = format!("v{i}");
        encode_request(
            &mut bytes,
            Opcode::Put,
            i as u32 + 1,
            key.as_bytes(),
            value.as_bytes(),
        );
    }
    let piece_bytes = bytes.len() / (WRITES_PER_WRITER / PIECE) as usize;
    for piece in bytes.chunks(piece_bytes) {
        stream.write_all(piece).expect("write the pipeline");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut ok = 0;
    for i in 0..WRITES_PER_WRITER {
        let reply = read_response(&mut stream);
        assert_eq!(reply.request_id, i as u32 + 1, "replies in request order");
        assert_eq!(
            reply.status,
            Ok(Status::Ok),
            "writer {writer} write {i}: {}",
            reply.message()
        );
        ok += 1;
    }
    ok
}

#[test]
fn pipelined_writers_at_the_inflight_bound_wait_and_are_never_refused() {
    let master = ServerProcess::start(&["--max-inflight-txns", "1"]);
    // Stale reads: the test reads the slave once it has applied everything,
    // and a loaded machine may delay the heartbeat that renews its read lease.
    let slave = ServerProcess::start_slave(&master, &["--serve-stale-reads"]);
    let addr = slave.addr();
    wait_until("the slave is in sync", Duration::from_secs(20), || {
        master.stats().slave(&addr).map(|s| s.state).as_deref() == Some("in-sync")
    });
    let port = master.port;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| std::thread::spawn(move || pipelined_writer(port, w)))
        .collect();
    let acknowledged: u64 = writers
        .into_iter()
        .map(|t| t.join().expect("writer thread"))
        .sum();
    assert_eq!(acknowledged, WRITERS * WRITES_PER_WRITER);
    let stats = master.stats();
    eprintln!(
        "{acknowledged} writes acknowledged; txn_backpressure_pauses {}, commit_seq {}, \
         writes_failed {}",
        stats.num("txn_backpressure_pauses"),
        stats.num("commit_seq"),
        stats.num("writes_failed")
    );
    assert_eq!(stats.num("writes_failed"), 0, "no write refused");
    assert!(
        stats.num("commit_seq") >= 2 && stats.num("txn_backpressure_pauses") >= 2,
        "the writes arrived over several transactions, each at the bound of 1:\n{}",
        stats.text
    );
    assert_eq!(
        stats.slave(&addr).map(|s| s.state).as_deref(),
        Some("in-sync"),
        "the slave voted on every transaction"
    );
    let target = stats.num("commit_seq");
    wait_until(
        "the slave applied everything",
        Duration::from_secs(20),
        || slave.stats().num("commit_seq") >= target,
    );
    let mut at_master = master.client(Transport::Tcp);
    let mut at_slave = slave.own_reads_client(Transport::Tcp);
    for w in 0..WRITERS {
        for i in 0..WRITES_PER_WRITER {
            let key = format!("w{w}-{i}");
            let want = format!("v{i}").into_bytes();
            for (name, client) in [("master", &mut at_master), ("slave", &mut at_slave)] {
                let got = client
                    .get(key.as_bytes())
                    .unwrap_or_else(|e| panic!("get {key} at the {name}: {e}"));
                assert_eq!(
                    got.map(|g| g.value),
                    Some(want.clone()),
                    "{key} at the {name}"
                );
            }
        }
    }
}
