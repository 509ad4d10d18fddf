//! The two values dkvs keeps in etcd, as text: the leader key and the in-sync set.
//!
//! Both are one line of `name=value` fields separated by spaces, so that
//! `etcdctl get` shows them readably. Parsing is strict: anyone who can write
//! to etcd can write anything there, and a value we cannot read is treated
//! as absent (and logged), never guessed at.

use std::collections::BTreeSet;
use std::fmt;

/// `/dkvs/NAME/leader`: who leads, in which epoch, and where clients reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderRecord {
    /// The leadership epoch (increases with every promotion).
    pub epoch: u64,
    /// The leader's node id.
    pub node_id: u64,
    /// Address the leader serves clients and slaves on (`host:port`).
    pub addr: String,
}

/// `/dkvs/NAME/sync`: the slaves that hold every acknowledged write, recorded
/// by the leader of `epoch` (who may itself be promoted again, as `leader`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRecord {
    /// The epoch of the leader that wrote it.
    pub epoch: u64,
    /// That leader's node id.
    pub leader: u64,
    /// Node ids of the slaves in sync.
    pub members: BTreeSet<u64>,
}

impl SyncRecord {
    /// Whether `node` may take the leader key: it holds every acknowledged write.
    pub fn may_promote(&self, node: u64) -> bool {
        node == self.leader || self.members.contains(&node)
    }
}

impl fmt::Display for LeaderRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch={} node={:016x} addr={}",
            self.epoch, self.node_id, self.addr
        )
    }
}

impl fmt::Display for SyncRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch={} leader={:016x} members=",
            self.epoch, self.leader
        )?;
        for (i, m) in self.members.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{m:016x}")?;
        }
        Ok(())
    }
}

/// Split `text` into exactly the fields `names`, in order.
fn fields<'a, const N: usize>(text: &'a str, names: [&str; N]) -> Result<[&'a str; N], String> {
    let mut out = [""; N];
    let mut parts = text.split(' ');
    for (slot, name) in out.iter_mut().zip(names) {
        let part = parts.next().ok_or(format!("missing field {name}"))?;
        let value = part
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
            .ok_or(format!("expected field {name}, found {part:?}"))?;
        *slot = value;
    }
    if parts.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(out)
}

fn node(text: &str) -> Result<u64, String> {
    if text.len() != 16 {
        return Err(format!("node id {text:?} is not 16 hex digits"));
    }
    u64::from_str_radix(text, 16).map_err(|e| format!("node id {text:?}: {e}"))
}

fn epoch(text: &str) -> Result<u64, String> {
    text.parse().map_err(|e| format!("epoch {text:?}: {e}"))
}

impl LeaderRecord {
    /// Parse a leader key's value.
    pub fn parse(bytes: &[u8]) -> Result<LeaderRecord, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let [e, n, addr] = fields(text, ["epoch", "node", "addr"])?;
        if addr.is_empty() || addr.len() > 255 {
            return Err("bad address length".into());
        }
        Ok(LeaderRecord {
            epoch: epoch(e)?,
            node_id: node(n)?,
            addr: addr.to_string(),
        })
    }
}

impl SyncRecord {
    /// Parse an in-sync set's value.
    pub fn parse(bytes: &[u8]) -> Result<SyncRecord, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let [e, l, m] = fields(text, ["epoch", "leader", "members"])?;
        let mut members = BTreeSet::new();
        if !m.is_empty() {
            for id in m.split(',') {
                if members.len() >= 1024 {
                    return Err("too many members".into());
                }
                members.insert(node(id)?);
            }
        }
        Ok(SyncRecord {
            epoch: epoch(e)?,
            leader: node(l)?,
            members,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_text() {
        let leader = LeaderRecord {
            epoch: 7,
            node_id: 0xAB,
            addr: "127.0.0.1:9000".into(),
        };
        assert_eq!(
            leader.to_string(),
            "epoch=7 node=00000000000000ab addr=127.0.0.1:9000"
        );
        assert_eq!(
            LeaderRecord::parse(leader.to_string().as_bytes()),
            Ok(leader)
        );
        let sync = SyncRecord {
            epoch: 7,
            leader: 1,
            members: [2, 3].into(),
        };
        assert_eq!(
            sync.to_string(),
            "epoch=7 leader=0000000000000001 members=0000000000000002,0000000000000003"
        );
        assert_eq!(SyncRecord::parse(sync.to_string().as_bytes()), Ok(sync));
        let empty = SyncRecord {
            epoch: 1,
            leader: 9,
            members: BTreeSet::new(),
        };
        assert_eq!(SyncRecord::parse(empty.to_string().as_bytes()), Ok(empty));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            &b""[..],
            b"epoch=1",
            b"epoch=x node=0000000000000001 addr=a:1",
            b"epoch=1 node=1 addr=a:1",
            b"epoch=1 node=0000000000000001 addr=",
            b"epoch=1 node=0000000000000001 addr=a:1 extra=1",
            b"node=0000000000000001 epoch=1 addr=a:1",
            b"\xff\xfe",
        ] {
            assert!(LeaderRecord::parse(bad).is_err(), "{bad:?}");
        }
        assert!(SyncRecord::parse(b"epoch=1 leader=0000000000000001 members=12").is_err());
        assert!(SyncRecord::parse(b"epoch=1 leader=0000000000000001").is_err());
    }

    #[test]
    fn the_last_leader_and_the_members_may_be_promoted() {
        let sync = SyncRecord {
            epoch: 3,
            leader: 1,
            members: [2].into(),
        };
        assert!(sync.may_promote(1) && sync.may_promote(2));
        assert!(!sync.may_promote(3));
    }
}
