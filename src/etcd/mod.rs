//! A blocking etcd v3 client over etcd's HTTP/JSON gRPC gateway (`/v3/...`, etcd 3.4+).
//!
//! Blocking on purpose: it runs on a helper thread next to the reactor, never on it. Unary calls
//! go through `ureq`; the watch stream is read from a plain `TcpStream` (see [`watch`]) because it
//! needs a read deadline per call that can be resumed, and a close from `Drop`.
//!
//! Endpoints are tried round-robin, starting from the one that last worked. A call moves on to
//! the next endpoint when the request cannot have reached etcd (connection refused, connect
//! timeout) and, for reads and keepalives, also when it timed out or the connection broke. A
//! put, transaction, grant or revoke that timed out after being sent is not sent again: etcd may
//! have applied it, and re-running a compare-and-swap would report a failure for a swap that
//! happened. The caller gets [`EtcdError::Timeout`] / [`EtcdError::ConnectionLost`]
//! ([`EtcdError::outcome_unknown`]) and the next call starts at the next endpoint.

pub mod json;
pub mod watch;

use std::fmt;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use json::*;
pub use watch::{Watch, WatchEvent, WatchNext};

/// Largest response body read from etcd; etcd's own request limit is 1.5 MiB by default.
pub const MAX_RESPONSE_BYTES: u64 = 16 << 20;

/// gRPC metadata `hasleader: true`, passed through by the gateway (`Grpc-Metadata-` headers):
/// a member without a raft leader refuses the call at once (503 "etcdserver: no leader") instead
/// of letting it hang, and cancels a watch after losing its leader instead of leaving the watch
/// silently open on a member cut off from the cluster.
pub const REQUIRE_LEADER: (&str, &str) = ("Grpc-Metadata-Hasleader", "true");

/// One key as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the put that created the key since its last delete.
    pub create_revision: i64,
    /// Revision of the last put to the key.
    pub mod_revision: i64,
    /// Number of puts since the key was created (1 after the first).
    pub version: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

impl From<KeyValueJson> for KeyValue {
    fn from(kv: KeyValueJson) -> KeyValue {
        KeyValue {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// One comparison of a transaction; all are "equal" comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's value equals this (false when the key is absent).
    Value(Vec<u8>, Vec<u8>),
    /// The key's version equals this; version 0 means the key is absent.
    Version(Vec<u8>, i64),
    /// The key's create_revision equals this (0 when absent).
    CreateRevision(Vec<u8>, i64),
    /// The key's mod_revision equals this (0 when absent).
    ModRevision(Vec<u8>, i64),
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Put `value` at `key`, attached to `lease` if given.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease to attach.
        lease: Option<i64>,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Read `key`; its result is in [`TxnResponse::responses`].
    Range {
        /// The key.
        key: Vec<u8>,
    },
}

/// The result of one [`TxnOp`], in the order of the branch taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResponse {
    /// A put was done.
    Put,
    /// A delete removed this many keys (0 or 1).
    Delete(i64),
    /// A range found the key, or not.
    Range(Option<KeyValue>),
}

/// The answer to [`EtcdClient::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Every comparison held, so the success branch ran.
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// One per operation of the branch that ran.
    pub responses: Vec<TxnOpResponse>,
}

/// The answer to [`EtcdClient::lease_time_to_live`] for a live lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimeToLive {
    /// Seconds until the lease expires unless kept alive.
    pub remaining_secs: i64,
    /// The TTL it was granted with.
    pub granted_secs: i64,
}

/// Everything that can go wrong talking to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    /// No endpoint could be connected to; one line per attempt.
    Unreachable(Vec<String>),
    /// The request was sent (or may have been) and no answer came in time.
    Timeout {
        /// The endpoint that did not answer.
        endpoint: String,
    },
    /// The connection failed after the request may have been sent.
    ConnectionLost {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        cause: String,
    },
    /// etcd answered with an HTTP error status; `body` is its JSON error.
    Http {
        /// The HTTP status (404 for an unknown lease, 503 without a raft leader, ...).
        status: u16,
        /// The body, at most a few KiB of it.
        body: String,
    },
    /// etcd's answer could not be understood.
    BadResponse(String),
    /// An endpoint is not an `http://host:port` URL.
    BadEndpoint(String),
}

impl EtcdError {
    /// Whether a mutation that failed this way may nevertheless have been applied. HTTP 503 is
    /// gRPC Unavailable, which etcd also answers for a proposal that timed out in raft
    /// ("etcdserver: request timed out") or whose leader changed.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            EtcdError::Timeout { .. }
                | EtcdError::ConnectionLost { .. }
                | EtcdError::Http { status: 503, .. }
        )
    }

    /// Whether etcd said the lease named in the request does not exist.
    pub fn is_lease_not_found(&self) -> bool {
        matches!(self, EtcdError::Http { status: 404, body } if body.contains("lease not found"))
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdError::Unreachable(attempts) => {
                write!(f, "no etcd endpoint reachable: {}", attempts.join("; "))
            }
            EtcdError::Timeout { endpoint } => write!(f, "etcd {endpoint} did not answer in time"),
            EtcdError::ConnectionLost { endpoint, cause } => {
                write!(f, "connection to etcd {endpoint} lost: {cause}")
            }
            EtcdError::Http { status, body } => write!(f, "etcd answered HTTP {status}: {body}"),
            EtcdError::BadResponse(why) => write!(f, "bad answer from etcd: {why}"),
            EtcdError::BadEndpoint(url) => {
                write!(f, "bad etcd endpoint {url:?} (want http://host:port)")
            }
        }
    }
}

impl std::error::Error for EtcdError {}

/// Which calls may be sent again to another endpoint after a timeout or a broken connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads and keepalives: re-running them has no effect that matters.
    Idempotent,
    /// Mutations: only when the request cannot have been delivered.
    OnlyUndelivered,
}

/// How one attempt at one endpoint failed.
enum AttemptError {
    /// The request never reached etcd.
    NotDelivered(String),
    /// It may have.
    Unknown(EtcdError),
    /// etcd answered, or the answer was malformed: final.
    Final(EtcdError),
}

/// A blocking etcd v3 client over the JSON gateway, failing over between endpoints.
pub struct EtcdClient {
    /// Base URLs without a trailing slash, e.g. `http://127.0.0.1:2379`.
    endpoints: Vec<String>,
    /// Index of the endpoint the next call starts with.
    current: AtomicUsize,
    /// Bound on each call: connect, send, and read the whole answer.
    request_timeout: Duration,
    agent: ureq::Agent,
}

impl fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.endpoints)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl EtcdClient {
    /// A client for `endpoints` (`http://host:port`), each call bounded by `request_timeout`.
    pub fn new(endpoints: Vec<String>, request_timeout: Duration) -> EtcdClient {
        let endpoints = endpoints
            .into_iter()
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .collect();
        let config = ureq::Agent::config_builder()
            // etcd's error statuses carry a JSON body worth reporting.
            .http_status_as_error(false)
            .timeout_global(Some(request_timeout))
            // Below the whole budget, so that a connect that hangs is reported as one (and
            // the next endpoint tried) rather than as a timeout of a request maybe delivered.
            .timeout_connect(Some(request_timeout / 2))
            // No pooled connections: a connection kept across an etcd restart fails on its
            // next use, and for a mutation that failure would look like an unknown outcome.
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .build();
        EtcdClient {
            endpoints,
            current: AtomicUsize::new(0),
            request_timeout,
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// The endpoints, in order.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoint the next call starts with: the last one that answered, or the one after
    /// the last that failed.
    pub fn current_endpoint(&self) -> Option<&str> {
        self.rotation().next()
    }

    /// The per-call timeout.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Read one key: the key if present, and the store's revision.
    pub fn range(&self, key: &[u8]) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let request = RangeRequestJson {
            key,
            range_end: &[],
        };
        let r: RangeResponseJson = self.call("/v3/kv/range", &request, Retry::Idempotent)?;
        Ok((
            r.kvs.into_iter().next().map(KeyValue::from),
            r.header.revision,
        ))
    }

    /// Read every key that starts with `prefix`, in key order, and the store's revision.
    pub fn range_prefix(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let range_end = prefix_range_end(prefix);
        let request = RangeRequestJson {
            key: prefix,
            range_end: &range_end,
        };
        let r: RangeResponseJson = self.call("/v3/kv/range", &request, Retry::Idempotent)?;
        Ok((
            r.kvs.into_iter().map(KeyValue::from).collect(),
            r.header.revision,
        ))
    }

    /// Put `value` at `key`, attached to `lease` if given; returns the new revision.
    pub fn put(&self, key: &[u8], value: &[u8], lease: Option<i64>) -> Result<i64, EtcdError> {
        let request = PutRequestJson {
            key,
            value,
            lease: lease.unwrap_or(0),
        };
        let r: HeaderOnlyJson = self.call("/v3/kv/put", &request, Retry::OnlyUndelivered)?;
        Ok(r.header.revision)
    }

    /// Delete `key`; returns how many keys were deleted (0 or 1) and the revision.
    pub fn delete(&self, key: &[u8]) -> Result<(i64, i64), EtcdError> {
        let request = DeleteRangeRequestJson { key };
        let r: DeleteRangeResponseJson =
            self.call("/v3/kv/deleterange", &request, Retry::OnlyUndelivered)?;
        Ok((r.deleted, r.header.revision))
    }

    /// Compact the history up to `revision`: older revisions can no longer be read or watched.
    pub fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let request = CompactionRequestJson { revision };
        let _: HeaderOnlyJson = self.call("/v3/kv/compaction", &request, Retry::Idempotent)?;
        Ok(())
    }

    /// Run `success` if every comparison holds, `failure` otherwise, atomically.
    pub fn txn(
        &self,
        compares: &[Compare],
        success: &[TxnOp],
        failure: &[TxnOp],
    ) -> Result<TxnResponse, EtcdError> {
        let request = TxnRequestJson {
            compare: compares.iter().map(compare_json).collect(),
            success: success.iter().map(op_json).collect(),
            failure: failure.iter().map(op_json).collect(),
        };
        let r: TxnResponseJson = self.call("/v3/kv/txn", &request, Retry::OnlyUndelivered)?;
        let branch = if r.succeeded { success } else { failure };
        if r.responses.len() != branch.len() {
            return Err(EtcdError::BadResponse(format!(
                "transaction ran {} operations, {} answered",
                branch.len(),
                r.responses.len()
            )));
        }
        let responses = branch
            .iter()
            .zip(r.responses)
            .map(|(op, resp)| match (op, resp) {
                (
                    TxnOp::Put { .. },
                    ResponseOpJson {
                        response_put: Some(_),
                        ..
                    },
                ) => Ok(TxnOpResponse::Put),
                (
                    TxnOp::Delete { .. },
                    ResponseOpJson {
                        response_delete_range: Some(d),
                        ..
                    },
                ) => Ok(TxnOpResponse::Delete(d.deleted)),
                (
                    TxnOp::Range { .. },
                    ResponseOpJson {
                        response_range: Some(range),
                        ..
                    },
                ) => Ok(TxnOpResponse::Range(
                    range.kvs.into_iter().next().map(KeyValue::from),
                )),
                (op, resp) => Err(EtcdError::BadResponse(format!(
                    "answer {resp:?} does not match operation {op:?}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TxnResponse {
            succeeded: r.succeeded,
            revision: r.header.revision,
            responses,
        })
    }

    /// Grant a lease of `ttl` (rounded up to whole seconds, at least 1): its id and the TTL in
    /// seconds etcd granted (etcd raises TTLs below its minimum, 2 s with default timing).
    pub fn lease_grant(&self, ttl: Duration) -> Result<(i64, i64), EtcdError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let request = LeaseGrantRequestJson {
            ttl: i64::try_from(secs.max(1)).unwrap_or(i64::MAX),
        };
        let r: LeaseGrantResponseJson =
            self.call("/v3/lease/grant", &request, Retry::OnlyUndelivered)?;
        if !r.error.is_empty() {
            return Err(EtcdError::BadResponse(format!("lease grant: {}", r.error)));
        }
        if r.id == 0 {
            return Err(EtcdError::BadResponse("lease grant without an ID".into()));
        }
        Ok((r.id, r.ttl))
    }

    /// Renew lease `id` once: the seconds it now has left, 0 when the lease no longer exists.
    pub fn lease_keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        // The gateway's keepalive is a bidirectional stream: one request in the body, the
        // answers streamed back. Read the first and close (etcd-io/etcd#8237).
        let request = LeaseIdJson { id };
        let message: StreamMessage<LeaseKeepAliveResponseJson> =
            self.call("/v3/lease/keepalive", &request, Retry::Idempotent)?;
        match (message.result, message.error) {
            (Some(r), _) => Ok(r.ttl.max(0)),
            (None, Some(e)) => Err(EtcdError::BadResponse(format!(
                "keepalive failed: {} (code {})",
                if e.message.is_empty() {
                    e.error
                } else {
                    e.message
                },
                e.code.max(e.grpc_code)
            ))),
            (None, None) => Err(EtcdError::BadResponse("empty keepalive answer".into())),
        }
    }

    /// Revoke lease `id`, deleting its keys: false if the lease did not exist (any more).
    pub fn lease_revoke(&self, id: i64) -> Result<bool, EtcdError> {
        let request = LeaseIdJson { id };
        match self.call::<_, HeaderOnlyJson>("/v3/lease/revoke", &request, Retry::OnlyUndelivered) {
            Ok(_) => Ok(true),
            Err(e) if e.is_lease_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// How long lease `id` has left, `None` when it has expired or never existed.
    pub fn lease_time_to_live(&self, id: i64) -> Result<Option<LeaseTimeToLive>, EtcdError> {
        let request = LeaseIdJson { id };
        let r: LeaseTimeToLiveResponseJson =
            self.call("/v3/lease/timetolive", &request, Retry::Idempotent)?;
        if r.ttl < 0 {
            return Ok(None);
        }
        Ok(Some(LeaseTimeToLive {
            remaining_secs: r.ttl,
            granted_secs: r.granted_ttl,
        }))
    }

    /// Watch `key` from `start_revision` (0: from now on); returns once etcd confirmed the watch.
    /// A start revision already compacted away still opens: the first [`Watch::next`] says
    /// [`WatchNext::Compacted`].
    pub fn watch(&self, key: &[u8], start_revision: i64) -> Result<Watch, EtcdError> {
        self.watch_range(key, &[], start_revision)
    }

    /// Watch every key that starts with `prefix`, from `start_revision`.
    pub fn watch_prefix(&self, prefix: &[u8], start_revision: i64) -> Result<Watch, EtcdError> {
        self.watch_range(prefix, &prefix_range_end(prefix), start_revision)
    }

    fn watch_range(
        &self,
        key: &[u8],
        range_end: &[u8],
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        let request = WatchRequestJson {
            create_request: WatchCreateJson {
                key,
                range_end,
                start_revision,
                progress_notify: false,
            },
        };
        let body = serde_json::to_vec(&request)
            .map_err(|e| EtcdError::BadResponse(format!("encoding the request: {e}")))?;
        // Creating a watch changes nothing in etcd: every failure may try the next endpoint.
        let mut attempts = Vec::new();
        let mut last_unknown = None;
        for endpoint in self.rotation() {
            match Watch::open(endpoint, &body, self.request_timeout, start_revision) {
                Ok(watch) => {
                    self.settle_on(endpoint);
                    return Ok(watch);
                }
                Err(watch::OpenError::NotConnected(why)) => {
                    attempts.push(format!("{endpoint}: {why}"));
                }
                Err(watch::OpenError::Failed(e)) if e.outcome_unknown() => {
                    last_unknown = Some(e);
                }
                Err(watch::OpenError::Failed(e)) => return Err(e),
            }
            self.advance_from(endpoint);
        }
        Err(last_unknown.unwrap_or(EtcdError::Unreachable(attempts)))
    }

    /// The endpoints in the order this call tries them: the current one first.
    fn rotation(&self) -> impl Iterator<Item = &str> {
        let n = self.endpoints.len();
        let start = if n == 0 {
            0
        } else {
            self.current.load(Ordering::Relaxed) % n
        };
        (0..n).map(move |i| self.endpoints[(start + i) % n].as_str())
    }

    /// After `endpoint` failed, the next call starts at the one after it.
    fn advance_from(&self, endpoint: &str) {
        if let Some(i) = self.endpoints.iter().position(|e| e == endpoint) {
            self.current
                .store((i + 1) % self.endpoints.len(), Ordering::Relaxed);
        }
    }

    /// After `endpoint` worked, calls keep starting there.
    fn settle_on(&self, endpoint: &str) {
        if let Some(i) = self.endpoints.iter().position(|e| e == endpoint) {
            self.current.store(i, Ordering::Relaxed);
        }
    }

    /// POST `request` to `path` on each endpoint in turn, as `retry` allows; decode the answer.
    fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        request: &Q,
        retry: Retry,
    ) -> Result<R, EtcdError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| EtcdError::BadResponse(format!("encoding the request: {e}")))?;
        let mut attempts = Vec::new();
        let mut last_unknown = None;
        for endpoint in self.rotation() {
            match self.attempt::<R>(endpoint, path, &body) {
                Ok(r) => {
                    self.settle_on(endpoint);
                    return Ok(r);
                }
                Err(AttemptError::Final(e)) => return Err(e),
                Err(AttemptError::NotDelivered(why)) => {
                    attempts.push(format!("{endpoint}: {why}"));
                    self.advance_from(endpoint);
                }
                Err(AttemptError::Unknown(e)) => {
                    self.advance_from(endpoint);
                    if retry == Retry::OnlyUndelivered {
                        return Err(e);
                    }
                    last_unknown = Some(e);
                }
            }
        }
        if self.endpoints.is_empty() {
            attempts.push("no endpoints configured".into());
        }
        Err(last_unknown.unwrap_or(EtcdError::Unreachable(attempts)))
    }

    fn attempt<R: DeserializeOwned>(
        &self,
        endpoint: &str,
        path: &str,
        body: &[u8],
    ) -> Result<R, AttemptError> {
        let url = format!("{endpoint}{path}");
        let response = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header(REQUIRE_LEADER.0, REQUIRE_LEADER.1)
            .send(body)
            .map_err(|e| classify(endpoint, e))?;
        let status = response.status().as_u16();
        let reader = response
            .into_body()
            .into_with_config()
            .limit(MAX_RESPONSE_BYTES)
            .reader();
        if !(200..300).contains(&status) {
            let mut text = Vec::new();
            // The error body is only for the message: a short, best-effort read.
            let _ = reader.take(4096).read_to_end(&mut text);
            let body = String::from_utf8_lossy(&text).trim().to_string();
            if status == 503 {
                // No raft leader at this member, or it is shutting down: another may serve.
                return Err(AttemptError::Unknown(EtcdError::Http { status, body }));
            }
            return Err(AttemptError::Final(EtcdError::Http { status, body }));
        }
        // The first JSON value only: stream answers (keepalive) may carry more after it.
        let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<R>();
        match values.next() {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) if e.io_error_kind() == Some(std::io::ErrorKind::TimedOut) => {
                Err(AttemptError::Unknown(EtcdError::Timeout {
                    endpoint: endpoint.to_string(),
                }))
            }
            Some(Err(e)) if e.is_io() => Err(AttemptError::Unknown(EtcdError::ConnectionLost {
                endpoint: endpoint.to_string(),
                cause: e.to_string(),
            })),
            Some(Err(e)) => Err(AttemptError::Final(EtcdError::BadResponse(format!(
                "{path}: {e}"
            )))),
            None => Err(AttemptError::Unknown(EtcdError::ConnectionLost {
                endpoint: endpoint.to_string(),
                cause: format!("{path}: empty answer"),
            })),
        }
    }
}

/// Sort a ureq failure into "never reached etcd" and "may have".
fn classify(endpoint: &str, e: ureq::Error) -> AttemptError {
    use std::io::ErrorKind;
    match e {
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
            AttemptError::NotDelivered("connect timed out".into())
        }
        ureq::Error::Timeout(_) => AttemptError::Unknown(EtcdError::Timeout {
            endpoint: endpoint.to_string(),
        }),
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            AttemptError::NotDelivered(e.to_string())
        }
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::HostUnreachable
            ) =>
        {
            AttemptError::NotDelivered(io.to_string())
        }
        ureq::Error::Io(io) if io.kind() == ErrorKind::TimedOut => {
            AttemptError::Unknown(EtcdError::Timeout {
                endpoint: endpoint.to_string(),
            })
        }
        ureq::Error::Io(io) => AttemptError::Unknown(EtcdError::ConnectionLost {
            endpoint: endpoint.to_string(),
            cause: io.to_string(),
        }),
        ureq::Error::BadUri(_) => AttemptError::Final(EtcdError::BadEndpoint(endpoint.to_string())),
        other => AttemptError::Unknown(EtcdError::ConnectionLost {
            endpoint: endpoint.to_string(),
            cause: other.to_string(),
        }),
    }
}

fn compare_json(c: &Compare) -> CompareJson<'_> {
    fn base<'a>(key: &'a [u8], target: &'static str) -> CompareJson<'a> {
        CompareJson {
            key,
            result: "EQUAL",
            target,
            version: None,
            create_revision: None,
            mod_revision: None,
            value: None,
        }
    }
    match c {
        Compare::Value(key, value) => CompareJson {
            value: Some(value),
            ..base(key, "VALUE")
        },
        Compare::Version(key, v) => CompareJson {
            version: Some(*v),
            ..base(key, "VERSION")
        },
        Compare::CreateRevision(key, r) => CompareJson {
            create_revision: Some(*r),
            ..base(key, "CREATE")
        },
        Compare::ModRevision(key, r) => CompareJson {
            mod_revision: Some(*r),
            ..base(key, "MOD")
        },
    }
}

fn op_json(op: &TxnOp) -> RequestOpJson<'_> {
    match op {
        TxnOp::Put { key, value, lease } => RequestOpJson {
            request_put: Some(PutRequestJson {
                key,
                value,
                lease: lease.unwrap_or(0),
            }),
            ..RequestOpJson::default()
        },
        TxnOp::Delete { key } => RequestOpJson {
            request_delete_range: Some(DeleteRangeRequestJson { key }),
            ..RequestOpJson::default()
        },
        TxnOp::Range { key } => RequestOpJson {
            request_range: Some(RangeRequestJson {
                key,
                range_end: &[],
            }),
            ..RequestOpJson::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_encode_their_target_field() {
        let text = |c: &Compare| serde_json::to_string(&compare_json(c)).expect("encode");
        assert_eq!(
            text(&Compare::Value(b"k".to_vec(), b"v".to_vec())),
            r#"{"key":"aw==","result":"EQUAL","target":"VALUE","value":"dg=="}"#
        );
        assert_eq!(
            text(&Compare::CreateRevision(b"k".to_vec(), 0)),
            r#"{"key":"aw==","result":"EQUAL","target":"CREATE","create_revision":"0"}"#
        );
        assert_eq!(
            text(&Compare::ModRevision(b"k".to_vec(), 42)),
            r#"{"key":"aw==","result":"EQUAL","target":"MOD","mod_revision":"42"}"#
        );
    }

    #[test]
    fn ops_encode_one_field_each() {
        let text = |o: &TxnOp| serde_json::to_string(&op_json(o)).expect("encode");
        assert_eq!(
            text(&TxnOp::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                lease: Some(7)
            }),
            r#"{"request_put":{"key":"aw==","value":"dg==","lease":"7"}}"#
        );
        assert_eq!(
            text(&TxnOp::Range { key: b"k".to_vec() }),
            r#"{"request_range":{"key":"aw=="}}"#
        );
    }

    #[test]
    fn errors_display_and_classify() {
        let e = EtcdError::Http {
            status: 404,
            body: r#"{"error":"etcdserver: requested lease not found","code":5}"#.into(),
        };
        assert!(e.is_lease_not_found());
        assert!(!e.outcome_unknown());
        assert!(e.to_string().contains("HTTP 404"));
        let t = EtcdError::Timeout {
            endpoint: "http://127.0.0.1:1".into(),
        };
        assert!(t.outcome_unknown());
        assert!(
            EtcdError::Unreachable(vec!["a: refused".into()])
                .to_string()
                .contains("a: refused")
        );
    }

    #[test]
    fn rotation_starts_at_the_current_endpoint() {
        let c = EtcdClient::new(
            vec!["http://a:1/".into(), "http://b:2".into(), "".into()],
            Duration::from_secs(1),
        );
        assert_eq!(c.endpoints(), ["http://a:1", "http://b:2"]);
        assert_eq!(
            c.rotation().collect::<Vec<_>>(),
            ["http://a:1", "http://b:2"]
        );
        c.advance_from("http://a:1");
        assert_eq!(
            c.rotation().collect::<Vec<_>>(),
            ["http://b:2", "http://a:1"]
        );
        c.advance_from("http://b:2");
        assert_eq!(c.rotation().next(), Some("http://a:1"));
    }

    #[test]
    fn no_endpoints_is_unreachable() {
        let c = EtcdClient::new(Vec::new(), Duration::from_millis(100));
        assert!(matches!(c.range(b"k"), Err(EtcdError::Unreachable(_))));
    }
}
