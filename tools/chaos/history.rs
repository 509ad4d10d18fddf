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
