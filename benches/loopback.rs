//! End to end on loopback: the real `dkvs-server` process answering one blocking client.
//!
//! This measures a full round trip (client syscalls, kernel loopback, reactor,
//! store); `dkvs-load` measures throughput under many connections.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use dkvs::client::{Client, ClientConfig, Transport};

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dkvs-server"))
        .args(["-p", "0", "-l", "error"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start dkvs-server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in ready line");
    Server(child, port)
}

fn loopback(c: &mut Criterion) {
    let server = start_server();
    let value = [b'v'; 100];
    let mut group = c.benchmark_group("loopback_round_trip");
    group.measurement_time(Duration::from_secs(3));
    for (name, transport) in [("tcp", Transport::Tcp), ("udp", Transport::Udp)] {
        let config = ClientConfig {
            transport,
            ..ClientConfig::default()
        };
        let mut client = Client::connect("127.0.0.1", server.1, config).expect("connect");
        client.put(b"bench-key-000001", &value).expect("put");
        group.bench_function(format!("{name}_get_100b"), |b| {
            b.iter(|| client.get(b"bench-key-000001").expect("get"))
        });
        group.bench_function(format!("{name}_put_100b"), |b| {
            b.iter(|| client.put(b"bench-key-000001", &value).expect("put"))
        });
    }
    group.finish();
}

criterion_group!(benches, loopback);
criterion_main!(benches);
