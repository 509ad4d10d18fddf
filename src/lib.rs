//! dkvs: a replicated key-value store served by a single-threaded mio reactor.

pub mod client;
pub mod etcd;
pub mod failover;
pub mod logging;
pub mod protocol;
pub mod replication;
pub mod server;
pub mod store;
pub mod wal;

#[cfg(test)]
mod sim_support;
