//! The recorded clients: threads that write and read at the master and read
//! at the slaves over a small key space, recording every request as an
//! [`Op`](crate::history::Op).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use dkvs::client::{Client, ClientConfig, ClientError};
use dkvs::protocol::{Opcode, Response, Status};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::history::{Clock, Node, Op, Outcome, Request};

/// Most ops one client records, so a long run cannot exhaust memory.
const MAX_OPS_PER_CLIENT: usize = 2_000_000;

/// How the clients behave.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Keys `k00`.. in the key space.
    pub keys: u32,
    /// Client threads at the master (each writes and reads).
    pub master_clients: u32,
    /// Reader threads per slave.
    pub slave_readers: u32,
    /// Timeout of each request (and connect).
    pub op_timeout: Duration,
    /// Pause between two requests of one client, to leave CPU to the servers.
    pub think: Duration,
    /// Seeds the clients' choices.
    pub seed: u64,
}

/// Where a client sends its requests.
#[derive(Debug, Clone, Copy)]
struct Target {
    node: Node,
    port: u16,
}

/// The running clients.
pub struct Clients {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Vec<Op>>>,
}

impl Clients {
    /// Start the clients against the master on `master_port` and the slaves on `slave_ports`.
    pub fn start(
        workload: &Workload,
        clock: Clock,
        master_port: u16,
        slave_ports: &[u16],
    ) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let mut targets = Vec::new();
        for _ in 0..workload.master_clients {
            targets.push(Target {
                node: Node::Master,
                port: master_port,
            });
        }
        for (n, &port) in slave_ports.iter().enumerate() {
            for _ in 0..workload.slave_readers {
                targets.push(Target {
                    node: Node::Slave(n as u8),
                    port,
                });
            }
        }
        let handles = targets
            .into_iter()
            .enumerate()
            .map(|(id, target)| {
                let stop = stop.clone();
                let workload = workload.clone();
                std::thread::Builder::new()
                    .name(format!("client{id}"))
                    .spawn(move || run_client(id as u32, target, &workload, clock, &stop))
                    .expect("spawn a client thread")
            })
            .collect();
        Clients { stop, handles }
    }

    /// Stop the clients and collect what they recorded.
    pub fn finish(mut self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        let mut ops = Vec::new();
        for handle in self.handles.drain(..) {
            match handle.join() {
                Ok(recorded) => ops.extend(recorded),
                Err(_) => eprintln!("dkvs-chaos: a client thread panicked; its ops are lost"),
            }
        }
        ops
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        // Unwinding: let the threads end; their ops no longer matter.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The key name of index `key`.
pub fn key_name(key: u32) -> Vec<u8> {
    format!("k{key:02}").into_bytes()
}

/// A client config for the chaos clients: no redirect is followed (a slave's
/// REDIRECT is an answer to record, not a detour to the master).
pub fn client_config(timeout: Duration) -> ClientConfig {
    ClientConfig {
        timeout,
        max_redirects: 0,
        ..ClientConfig::default()
    }
}

fn run_client(
    id: u32,
    target: Target,
    workload: &Workload,
    clock: Clock,
    stop: &AtomicBool,
) -> Vec<Op> {
    let mut rng = SmallRng::seed_from_u64(
        workload.seed ^ (u64::from(id) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let config = client_config(workload.op_timeout);
    let mut client: Option<Client> = None;
    let mut ops = Vec::new();
    let mut written = 0u64;
    while !stop.load(Ordering::Relaxed) && ops.len() < MAX_OPS_PER_CLIENT {
        let Some(c) = client.as_mut() else {
            // A request that cannot connect was never sent: nothing to record.
            match Client::connect("127.0.0.1", target.port, config.clone()) {
                Ok(c) => client = Some(c),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
            continue;
        };
        let key = rng.random_range(0..workload.keys);
        let request = if target.node == Node::Master {
            written += 1;
            // Unique per write, so that a read names the write it saw.
            let value = format!("c{id}-{written}").into_bytes();
            match rng.random_range(0..100) {
                0..40 => Request::Get,
                40..80 => Request::Put(value),
                80..88 => Request::Update(value),
                _ => Request::Delete,
            }
        } else {
            Request::Get
        };
        let op = execute(c, id, target.node, key, request, clock);
        if matches!(op.outcome, Outcome::Unknown(_)) {
            // The stream may carry a late reply: start on a new connection.
            client = None;
        }
        ops.push(op);
        if !workload.think.is_zero() {
            std::thread::sleep(workload.think);
        }
    }
    ops
}

/// Send one request and record it.
pub fn execute(
    client: &mut Client,
    id: u32,
    node: Node,
    key: u32,
    request: Request,
    clock: Clock,
) -> Op {
    let name = key_name(key);
    let (opcode, value): (Opcode, &[u8]) = match &request {
        Request::Get => (Opcode::Get, &[]),
        Request::Put(v) => (Opcode::Put, v),
        Request::Update(v) => (Opcode::Update, v),
        Request::Delete => (Opcode::Delete, &[]),
    };
    let invoke = clock.now();
    let reply = client.request(opcode, &name, value);
    let complete = clock.now();
    let outcome = classify(&request, node, reply);
    Op {
        client: id,
        node,
        key,
        request,
        invoke,
        complete,
        outcome,
    }
}

/// What an answer (or its absence) means for the history.
fn classify(request: &Request, node: Node, reply: Result<Response, ClientError>) -> Outcome {
    let reply = match reply {
        Ok(reply) => reply,
        // No answer: a write may or may not have been applied.
        Err(e) => return Outcome::Unknown(error_kind(&e)),
    };
    let name = |status: Result<Status, u8>| match status {
        Ok(s) => s.name().to_string(),
        Err(byte) => format!("status {byte}"),
    };
    match reply.status {
        Ok(Status::Ok) if request.is_write() => Outcome::Written(reply.version),
        Ok(Status::Ok) => Outcome::Found {
            value: reply.value,
            version: reply.version,
        },
        Ok(Status::NotFound) => Outcome::NotFound,
        // A slave that will not serve the read (not following a master within
        // its read lease, or still syncing): refused, not failed.
        Ok(Status::Redirect | Status::Unavailable)
            if !request.is_write() && node != Node::Master =>
        {
            Outcome::Refused(name(reply.status))
        }
        // The server says the write was not applied.
        Ok(Status::Aborted | Status::Unavailable | Status::Redirect) if request.is_write() => {
            Outcome::Failed(format!(
                "{}: {}",
                name(reply.status),
                String::from_utf8_lossy(&reply.value)
            ))
        }
        // Anything else (a server error, an unexpected status) does not say
        // whether a write was applied.
        status => Outcome::Unknown(format!(
            "{}: {}",
            name(status),
            String::from_utf8_lossy(&reply.value)
        )),
    }
}

/// A short name for an error, for the figures.
fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Timeout(_) => "timeout".into(),
        ClientError::Closed => "closed".into(),
        ClientError::Io(e) => format!("io {:?}", e.kind()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: Status, version: u64, value: &[u8]) -> Result<Response, ClientError> {
        Ok(Response {
            opcode: 0,
            status: Ok(status),
            request_id: 0,
            version,
            value: value.to_vec(),
        })
    }

    #[test]
    fn answers_are_classified_by_what_they_say_about_the_write() {
        let put = Request::Put(b"v".to_vec());
        assert_eq!(
            classify(&put, Node::Master, reply(Status::Ok, 7, b"")),
            Outcome::Written(7)
        );
        assert!(matches!(
            classify(&put, Node::Master, reply(Status::Aborted, 0, b"x")),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            classify(&put, Node::Master, reply(Status::ServerError, 0, b"x")),
            Outcome::Unknown(_)
        ));
        assert!(matches!(
            classify(
                &put,
                Node::Master,
                Err(ClientError::Timeout(Duration::ZERO))
            ),
            Outcome::Unknown(_)
        ));
        let get = Request::Get;
        assert!(matches!(
            classify(
                &get,
                Node::Slave(0),
                reply(Status::Redirect, 0, b"127.0.0.1:1")
            ),
            Outcome::Refused(_)
        ));
        assert!(matches!(
            classify(&get, Node::Slave(1), reply(Status::Unavailable, 0, b"")),
            Outcome::Refused(_)
        ));
        assert_eq!(
            classify(&get, Node::Master, reply(Status::Ok, 3, b"v")),
            Outcome::Found {
                value: b"v".to_vec(),
                version: 3
            }
        );
        assert_eq!(
            classify(
                &Request::Delete,
                Node::Master,
                reply(Status::NotFound, 0, b"")
            ),
            Outcome::NotFound
        );
    }
}
