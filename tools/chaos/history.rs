//! What the clients did and saw: one [`Op`] per request, with invoke and
//! complete times on one monotonic clock shared by every thread.

use std::time::Instant;

/// Nanoseconds since the run's origin [`Instant`].
pub type Nanos = u64;

/// The client id of the reads made after the last round (checks 2 and 4).
pub const FINAL_CLIENT: u32 = u32::MAX;

/// The shared clock: every thread measures from the same origin, so invoke and
/// complete times of different clients compare.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Nanoseconds since the origin.
    pub fn now(&self) -> Nanos {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Which server a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Node {
    /// The master.
    Master,
    /// Slave number `n` (0 or 1).
    Slave(u8),
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Master => write!(f, "master"),
            Node::Slave(n) => write!(f, "slave{n}"),
        }
    }
}

/// What was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// GET.
    Get,
    /// PUT of a value unique to this write (so a read names the write it saw).
    Put(Vec<u8>),
    /// UPDATE (replace only if present) of a unique value.
    Update(Vec<u8>),
    /// DELETE.
    Delete,
}

impl Request {
    /// Whether the request changes the store.
    pub fn is_write(&self) -> bool {
        !matches!(self, Request::Get)
    }

    /// The value written, for PUT and UPDATE.
    pub fn value(&self) -> Option<&[u8]> {
        match self {
            Request::Put(v) | Request::Update(v) => Some(v),
            Request::Get | Request::Delete => None,
        }
    }
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A write applied at this version (the commit sequence number).
    Written(u64),
    /// A GET found the key.
    Found {
        /// The value read.
        value: Vec<u8>,
        /// Its version.
        version: u64,
    },
    /// GET, UPDATE or DELETE found no key (an UPDATE or DELETE then changed nothing).
    NotFound,
    /// A slave would not serve the read (REDIRECT or UNAVAILABLE): not a failure.
    Refused(String),
    /// The server said the write was not applied (ABORTED, UNAVAILABLE).
    Failed(String),
    /// No answer (timeout, connection refused or lost) or an answer that does
    /// not say: a write may or may not have been applied.
    Unknown(String),
}

/// One recorded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Which client thread (or [`FINAL_CLIENT`]).
    pub client: u32,
    /// Where it was sent.
    pub node: Node,
    /// Index in the key space.
    pub key: u32,
    /// What was asked.
    pub request: Request,
    /// When the request was about to be sent.
    pub invoke: Nanos,
    /// When the answer (or the error) came back.
    pub complete: Nanos,
    /// What came back.
    pub outcome: Outcome,
}

/// Read one line of a history file written by `--history` (the format of
/// `report::write_history`), to check a history again (`--check-history`).
pub fn parse_op(line: &str) -> Result<Op, String> {
    let bad = |what: &str| format!("{what} in history line {line:?}");
    let (left, outcome) = line.split_once(" -> ").ok_or_else(|| bad("no ' -> '"))?;
    let mut parts = left.splitn(6, ' ');
    let mut time = || -> Result<Nanos, String> {
        let ms: f64 = parts
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| bad("bad time"))?;
        Ok((ms * 1e6).round() as Nanos)
    };
    let invoke = time()?;
    let complete = time()?;
    let node = match parts.next() {
        Some("master") => Node::Master,
        Some(n) => Node::Slave(
            n.strip_prefix("slave")
                .and_then(|i| i.parse().ok())
                .ok_or_else(|| bad("bad node"))?,
        ),
        None => return Err(bad("no node")),
    };
    let client = parts
        .next()
        .and_then(|c| c.strip_prefix('c')?.parse().ok())
        .ok_or_else(|| bad("bad client"))?;
    let key = parts
        .next()
        .and_then(|k| k.strip_prefix('k')?.parse().ok())
        .ok_or_else(|| bad("bad key"))?;
    let request = match parts.next().ok_or_else(|| bad("no request"))? {
        "GET" => Request::Get,
        "DELETE" => Request::Delete,
        r => match r.split_once(' ') {
            Some(("PUT", v)) => Request::Put(v.as_bytes().to_vec()),
            Some(("UPDATE", v)) => Request::Update(v.as_bytes().to_vec()),
            _ => return Err(bad("bad request")),
        },
    };
    let version = |v: &str| -> Result<u64, String> {
        v.strip_prefix('v')
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("bad version"))
    };
    let outcome = match outcome.split_once(' ') {
        None if outcome == "not-found" => Outcome::NotFound,
        Some(("written", v)) => Outcome::Written(version(v)?),
        Some(("found", rest)) => {
            let (value, v) = rest.rsplit_once(' ').ok_or_else(|| bad("bad found"))?;
            Outcome::Found {
                value: value.as_bytes().to_vec(),
                version: version(v)?,
            }
        }
        Some(("refused", why)) => Outcome::Refused(why.to_string()),
        Some(("failed", why)) => Outcome::Failed(why.to_string()),
        Some(("unknown", why)) => Outcome::Unknown(why.to_string()),
        _ => return Err(bad("bad outcome")),
    };
    Ok(Op {
        client,
        node,
        key,
        request,
        invoke,
        complete,
        outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_lines_parse_back() {
        let op = parse_op("785651.021 785652.709 master c3 k18 PUT c3-170007 -> written v371999")
            .expect("parses");
        assert_eq!(op.node, Node::Master);
        assert_eq!((op.client, op.key), (3, 18));
        assert_eq!(op.request, Request::Put(b"c3-170007".to_vec()));
        assert_eq!(op.outcome, Outcome::Written(371_999));
        assert_eq!(op.invoke, 785_651_021_000);
        let op = parse_op("1.5 2.5 slave1 c5 k07 GET -> found c0-1 v9").expect("parses");
        assert_eq!(op.node, Node::Slave(1));
        assert_eq!(
            op.outcome,
            Outcome::Found {
                value: b"c0-1".to_vec(),
                version: 9
            }
        );
        let op = parse_op("3 4 master c1 k00 DELETE -> unknown closed").expect("parses");
        assert_eq!(op.outcome, Outcome::Unknown("closed".into()));
        assert!(parse_op("3 4 master c1 k00 FROB -> not-found").is_err());
    }
}
