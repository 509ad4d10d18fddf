//! Automatic failover through etcd (`--etcd`, `--cluster`): who leads, and
//! which slaves may be promoted. docs/FAILOVER.md gives the rules and why
//! they lose no acknowledged write.

pub mod agent;
pub mod election;
pub mod record;

pub use election::{Action, Election, ElectionConfig, Observation, Reply, Request, State};
pub use record::{LeaderRecord, SyncRecord};

#[cfg(test)]
mod sim;
