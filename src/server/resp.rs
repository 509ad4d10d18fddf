//! The Redis commands dkvs answers on a RESP connection, executed against the
//! same [`Core`] as the binary protocol: reads from the store, writes through
//! the batch (one 2PC transaction per reactor turn), so replication, group
//! commit and the limits are shared.
//!
//! Replies follow Redis 7 byte for byte where the command exists there. A
//! command made of several writes (MSET, DEL k1 k2, ...) submits them together,
//! so they land in one transaction. Read-modify-write commands (INCR, APPEND,
//! SETNX, ...) compute on the master against the store plus the writes not yet
//! applied, and replicate the result as a plain PUT.

use std::fmt::Write as _;
use std::time::Instant;

use log::info;

use crate::protocol::MAX_KEY_BYTES;
use crate::protocol::peer::{OpKind, WriteOp};
use crate::protocol::resp::{
    Encoder, NameKey, RespFront, RespVersion, decode_command_into, glob_match, parse_i64,
    recycle_args,
};
use crate::store::SHARDS;

use super::auth;
use super::connection::{Connection, MAX_PENDING_WRITES, OUTPUT_HIGH_WATER_BYTES, Stop};
use super::exec_view::ExecView;
use super::forward::Origin;
use super::handler::{Core, Latest, Mode, ReplyTarget, RespPending, RespWriteReply, Settled};
use super::multi::{Conn, Intercept, MultiState, intercept};

/// The Redis version dkvs reports (HELLO, INFO): the one whose replies it follows.
const REDIS_VERSION: &str = "7.0.15";
/// Smallest input buffer an incomplete command may ask for (the buffer's resting size).
const MIN_GROW_BYTES: usize = 16 * 1024;
/// Default COUNT of SCAN, as Redis.
const SCAN_DEFAULT_COUNT: u64 = 10;
/// CONFIG GET requirepass when a password is set: Redis replies the password,
/// which dkvs does not have (it keeps a keyed hash). Not empty, since empty
/// means "no password"; with spaces, so no one mistakes it for the password.
pub(super) const REQUIREPASS_HIDDEN: &str = "<set: dkvs keeps only a keyed hash of it>";

/// The RESP state of one connection.
#[derive(Debug)]
pub struct RespConnection {
    /// Replies in the connection's protocol version.
    encoder: Encoder,
    /// CLIENT SETNAME.
    name: Option<Vec<u8>>,
    /// Unquoted inline arguments.
    scratch: Vec<u8>,
    /// The argument vector each command is parsed into, empty between
    /// commands (see [`recycle_args`]): one allocation per connection, not per command.
    spare_args: Vec<&'static [u8]>,
    /// CLIENT ID.
    id: u64,
    /// WATCH and MULTI.
    multi: MultiState,
}

/// RESP errors are `-` + text + CRLF in RESP2 and RESP3 alike.
fn error_line(out: &mut Vec<u8>, text: &str) {
    out.push(b'-');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

impl RespConnection {
    /// A connection that starts in RESP2, as Redis's do.
    pub fn new(id: u64) -> RespConnection {
        RespConnection {
            encoder: Encoder(RespVersion::Two),
            name: None,
            scratch: Vec::new(),
            spare_args: Vec::new(),
            id,
            multi: MultiState::default(),
        }
    }
}

/// When a command may run relative to the connection's writes still pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Reads data: must see this connection's earlier writes, so waits for them.
    Read,
    /// Writes: may queue behind earlier writes (answers stay in order).
    Write,
    /// Touches no data: answered at once (parked behind pending replies).
    Free,
}

impl Spec {
    /// Whether the command writes (a slave answers it `READONLY`, or forwards it).
    pub(super) fn is_write(&self) -> bool {
        self.class == Class::Write
    }

    /// Whether the command only reads or writes data (or echoes): one that
    /// may run inside a transaction forwarded to the master without touching
    /// the state of the connection it runs on there (HELLO, AUTH, CLIENT, ...).
    pub(super) fn forwardable_in_exec(&self) -> bool {
        self.class != Class::Free || matches!(self.name, "ping" | "echo")
    }
}

/// One supported command, as COMMAND describes it.
pub(super) struct Spec {
    /// Lower-case name, as Redis prints it in errors.
    pub(super) name: &'static str,
    /// `name` packed for [`lookup`].
    key: NameKey,
    /// Redis arity: N exactly N arguments (with the name), -N at least N.
    pub(super) arity: i64,
    class: Class,
    /// COMMAND's flags.
    flags: &'static [&'static str],
    /// First key, last key (-1: the last argument), step; 0 0 0 without keys.
    pub(super) keys: (i64, i64, i64),
}

const RO: &[&str] = &["readonly", "fast"];
const WR: &[&str] = &["write", "denyoom"];
const ADMIN: &[&str] = &["fast", "stale"];

/// Every command answered; the hot ones first (the lookup is a linear scan).
const COMMANDS: &[Spec] = &[
    spec("get", 2, Class::Read, RO, (1, 1, 1)),
    spec("set", -3, Class::Write, WR, (1, 1, 1)),
    spec("ping", -1, Class::Free, ADMIN, (0, 0, 0)),
    spec("incr", 2, Class::Write, WR, (1, 1, 1)),
    spec("mset", -3, Class::Write, WR, (1, -1, 2)),
    spec("mget", -2, Class::Read, RO, (1, -1, 1)),
    spec("del", -2, Class::Write, WR, (1, -1, 1)),
    spec("exists", -2, Class::Read, RO, (1, -1, 1)),
    spec("decr", 2, Class::Write, WR, (1, 1, 1)),
    spec("incrby", 3, Class::Write, WR, (1, 1, 1)),
    spec("decrby", 3, Class::Write, WR, (1, 1, 1)),
    spec("getset", 3, Class::Write, WR, (1, 1, 1)),
    spec("setnx", 3, Class::Write, WR, (1, 1, 1)),
    spec("msetnx", -3, Class::Write, WR, (1, -1, 2)),
    spec("append", 3, Class::Write, WR, (1, 1, 1)),
    spec("strlen", 2, Class::Read, RO, (1, 1, 1)),
    spec("type", 2, Class::Read, RO, (1, 1, 1)),
    spec("dbsize", 1, Class::Read, RO, (0, 0, 0)),
    spec("keys", 2, Class::Read, &["readonly"], (0, 0, 0)),
    spec("scan", -2, Class::Read, &["readonly"], (0, 0, 0)),
    spec("flushdb", -1, Class::Write, &["write"], (0, 0, 0)),
    spec("flushall", -1, Class::Write, &["write"], (0, 0, 0)),
    spec("echo", 2, Class::Free, ADMIN, (0, 0, 0)),
    spec("info", -1, Class::Read, &["stale"], (0, 0, 0)),
    spec("config", -2, Class::Free, &["admin", "stale"], (0, 0, 0)),
    spec("command", -1, Class::Free, &["stale"], (0, 0, 0)),
    spec("client", -2, Class::Free, ADMIN, (0, 0, 0)),
    spec("hello", -1, Class::Free, ADMIN, (0, 0, 0)),
    spec("select", 2, Class::Free, ADMIN, (0, 0, 0)),
    spec("quit", -1, Class::Free, ADMIN, (0, 0, 0)),
    spec("auth", -2, Class::Free, ADMIN, (0, 0, 0)),
    spec("wait", 3, Class::Read, &[], (0, 0, 0)),
    spec("role", 1, Class::Read, ADMIN, (0, 0, 0)),
    spec("dkvs.version", 2, Class::Read, RO, (1, 1, 1)),
    spec("getdel", 2, Class::Write, &["write", "fast"], (1, 1, 1)),
    // Answered by `multi.rs` before `Session::run`; listed for COMMAND and the classes.
    spec("multi", 1, Class::Free, &["fast", "allow_busy"], (0, 0, 0)),
    spec("exec", 1, Class::Write, &["skip_slowlog"], (0, 0, 0)),
    spec(
        "discard",
        1,
        Class::Free,
        &["fast", "allow_busy"],
        (0, 0, 0),
    ),
    spec(
        "watch",
        -2,
        Class::Read,
        &["fast", "allow_busy"],
        (1, -1, 1),
    ),
    spec(
        "unwatch",
        1,
        Class::Free,
        &["fast", "allow_busy"],
        (0, 0, 0),
    ),
    spec("expire", -3, Class::Write, &["write", "fast"], (1, 1, 1)),
    spec("pexpire", -3, Class::Write, &["write", "fast"], (1, 1, 1)),
    spec("expireat", -3, Class::Write, &["write", "fast"], (1, 1, 1)),
    spec("pexpireat", -3, Class::Write, &["write", "fast"], (1, 1, 1)),
    spec("persist", 2, Class::Write, &["write", "fast"], (1, 1, 1)),
    spec("getex", -2, Class::Write, &["write", "fast"], (1, 1, 1)),
    spec("ttl", 2, Class::Read, RO, (1, 1, 1)),
    spec("pttl", 2, Class::Read, RO, (1, 1, 1)),
    spec("expiretime", 2, Class::Read, RO, (1, 1, 1)),
    spec("pexpiretime", 2, Class::Read, RO, (1, 1, 1)),
];

const fn spec(
    name: &'static str,
    arity: i64,
    class: Class,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
) -> Spec {
    Spec {
        name,
        key: NameKey::of_lower(name),
        arity,
        class,
        flags,
        keys,
    }
}

/// The command `name` (any case) names.
pub(super) fn lookup(name: &[u8]) -> Option<&'static Spec> {
    // Every name fits a key (`NameKey::of_lower` fails the build otherwise),
    // so a name without one names no command.
    let key = NameKey::of(name)?;
    COMMANDS.iter().find(|s| s.key == key)
}

/// What executing a command did.
pub(super) enum Exec {
    /// The reply is written.
    Done,
    /// The writes joined the batch; the reply comes with their outcome.
    Pending(crate::replication::ClientRef),
    /// A key it must read is being written by a transaction in flight: run it
    /// again once that is decided. Nothing was written.
    WaitKey,
    /// Answered; close the connection once the reply is sent (QUIT).
    Close,
}

impl<S: std::io::Read + std::io::Write> Connection<S> {
    /// Answer complete RESP commands in order until the input runs out,
    /// replies back up, or a command must wait; say which.
    pub(super) fn answer_resp(&mut self, core: &mut Core) -> Stop {
        let max_bulk = core.max_value_bytes.max(MAX_KEY_BYTES);
        if self.denied {
            // Redis writes this on accept; dkvs on the first bytes, once it
            // knows the client speaks RESP.
            error_line(&mut self.io.output, auth::RESP_DENIED);
            self.closing = true;
            return Stop::Closing;
        }
        while self.io.pending_output() < OUTPUT_HIGH_WATER_BYTES {
            let Some(state) = self.resp.as_deref_mut() else {
                return Stop::Closing;
            };
            let (buffered, output) = self.io.split();
            let buffered_len = buffered.len();
            let RespConnection {
                encoder,
                name,
                scratch,
                spare_args,
                id,
                multi,
            } = state;
            let mut args = recycle_args(std::mem::take(spare_args));
            let used = match decode_command_into(buffered, max_bulk, scratch, &mut args) {
                Ok(RespFront::Command { used }) => used,
                Ok(RespFront::Incomplete { need }) => {
                    *spare_args = recycle_args(args);
                    // Grow with what arrived (at most doubling), never to a declared length.
                    let grow = buffered_len.saturating_mul(2).max(MIN_GROW_BYTES);
                    self.io.need(Some(need.min(grow).max(buffered_len + 1)));
                    return Stop::NeedBytes;
                }
                // The error reply must follow the replies still owed.
                Err(_) if !self.pending.is_empty() => return Stop::Waiting,
                Err(e) => {
                    core.stats.protocol_errors += 1;
                    encoder.error(output, &format!("ERR {e}"));
                    self.closing = true;
                    return Stop::Closing;
                }
            };
            if args.is_empty() {
                *spare_args = recycle_args(args);
                self.io.consume(used);
                continue;
            }
            if args[0].eq_ignore_ascii_case(b"host:") || args[0].eq_ignore_ascii_case(b"post") {
                // An HTTP request (a browser, or a cross-protocol attack): close
                // without a reply, as Redis does.
                info!("{}: HTTP request on the RESP port; closing", self.peer());
                self.closing = true;
                return Stop::Closing;
            }
            let spec = lookup(args[0]);
            if let Some(spec) = spec
                && core.password.is_some()
                && !self.authenticated
                && !auth::resp_allowed_before_auth(spec.name)
            {
                // Before AUTH nothing is pending: the reply goes out in order.
                if !self.pending.is_empty() {
                    return Stop::Waiting;
                }
                core.stats.auth_required += 1;
                encoder.error(output, auth::RESP_NOAUTH);
                *spare_args = recycle_args(args);
                self.io.consume(used);
                continue;
            }
            let class = spec.map_or(Class::Free, |s| s.class);
            let may_wait = !self.pending.is_empty();
            match class {
                Class::Read if may_wait => return Stop::Waiting,
                Class::Write if self.pending.len() >= MAX_PENDING_WRITES => {
                    return Stop::Waiting;
                }
                Class::Write if core.batch_full() => {
                    core.batch_waiters.push(self.key);
                    return Stop::Waiting;
                }
                Class::Write if core.forwards_writes() && core.forward.at_cap(self.conn_id) => {
                    // Backpressure: read no more of this client until replies come.
                    if !core.forward.waiters.contains(&self.key) {
                        core.forward.waiters.push(self.key);
                    }
                    return Stop::Waiting;
                }
                _ => {}
            }
            let target = ReplyTarget::Tcp {
                key: self.key,
                conn_id: self.conn_id,
            };
            let mut conn = Conn {
                core: &mut *core,
                enc: &mut *encoder,
                name: &mut *name,
                id: *id,
                target,
                pending: &mut self.pending,
                output: &mut *output,
            };
            match intercept(multi, &mut conn, &args, spec) {
                Intercept::Run => {}
                Intercept::Answered => {
                    core.resp_commands += 1;
                    *spare_args = recycle_args(args);
                    self.io.consume(used);
                    continue;
                }
                Intercept::WaitKey => {
                    core.key_waiters.push(self.key);
                    return Stop::Waiting;
                }
            }
            // Replies that are ready while earlier writes are pending wait in line behind them.
            let mut parked = Vec::new();
            let out = if may_wait { &mut parked } else { output };
            let mut session = Session {
                core,
                enc: encoder,
                name,
                id: *id,
                target,
                out,
                exec: None,
                authenticated: &mut self.authenticated,
            };
            let exec = match spec {
                Some(spec) => session.run(spec, &args),
                None => {
                    session.unknown_command(&args);
                    Exec::Done
                }
            };
            core.resp_commands += 1;
            match exec {
                Exec::Done => {
                    if may_wait {
                        self.pending
                            .push_back((crate::replication::ClientRef(0), Some(parked)));
                    }
                }
                Exec::Pending(client) => self.pending.push_back((client, None)),
                Exec::WaitKey => {
                    core.key_waiters.push(self.key);
                    return Stop::Waiting;
                }
                Exec::Close => {
                    if may_wait {
                        self.pending
                            .push_back((crate::replication::ClientRef(0), Some(parked)));
                    }
                    self.io.consume(used);
                    self.closing = true;
                    return Stop::Closing;
                }
            }
            *spare_args = recycle_args(args);
            self.io.consume(used);
        }
        Stop::OutputFull
    }
}

/// What a command runs with.
pub(super) struct Session<'a> {
    pub(super) core: &'a mut Core,
    pub(super) enc: &'a mut Encoder,
    pub(super) name: &'a mut Option<Vec<u8>>,
    pub(super) id: u64,
    pub(super) target: ReplyTarget,
    pub(super) out: &'a mut Vec<u8>,
    /// Running a queued command of EXEC: every key it names was settled when
    /// EXEC started, so it sees the store plus this EXEC's earlier writes.
    pub(super) exec: Option<&'a ExecView>,
    /// The connection has sent a successful AUTH (or HELLO … AUTH).
    pub(super) authenticated: &'a mut bool,
}

/// [`Session::read`], borrowing only the core (so the output stays writable).
fn read_in<'c>(core: &'c Core, key: &[u8], exec: Option<&ExecView>) -> Option<&'c [u8]> {
    match exec {
        Some(view) => view.get(core, key).map(|(v, _)| v),
        None => core.store.get(key).map(|(v, _)| v),
    }
}

fn upper(arg: &[u8]) -> Vec<u8> {
    arg.to_ascii_uppercase()
}

fn text(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).into_owned()
}

const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";
const READONLY: &str = "READONLY You can't write against a read only replica.";
const TOO_BIG: &str = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";

impl Session<'_> {
    fn error(&mut self, text: &str) -> Exec {
        self.enc.error(self.out, text);
        Exec::Done
    }

    fn ok(&mut self) -> Exec {
        self.enc.ok(self.out);
        Exec::Done
    }

    fn int(&mut self, n: i64) -> Exec {
        self.enc.int(self.out, n);
        Exec::Done
    }

    fn unknown_command(&mut self, args: &[&[u8]]) {
        // Redis's text: the first arguments quoted, each followed by a space, up to ~128 bytes.
        let mut shown = String::new();
        for arg in &args[1..] {
            if shown.len() >= 128 {
                break;
            }
            let room = 128 - shown.len();
            let arg = text(&arg[..arg.len().min(room)]);
            let _ = write!(shown, "'{arg}' ");
        }
        let name = text(&args[0][..args[0].len().min(128)]);
        self.error(&format!(
            "ERR unknown command '{name}', with args beginning with: {shown}"
        ));
    }

    fn unknown_subcommand(&mut self, command: &str, sub: &[u8]) -> Exec {
        self.error(&format!(
            "ERR unknown subcommand '{}'. Try {} HELP.",
            text(&sub[..sub.len().min(128)]),
            command.to_ascii_uppercase()
        ))
    }

    fn wrong_arity(&mut self, name: &str) -> Exec {
        self.error(&format!(
            "ERR wrong number of arguments for '{name}' command"
        ))
    }

    /// A key dkvs can store (1..=65535 bytes), else the error to answer.
    fn key_error(&self, key: &[u8]) -> Option<&'static str> {
        if key.is_empty() {
            Some("ERR empty keys are not supported by dkvs (keys are 1 to 65535 bytes)")
        } else if key.len() > MAX_KEY_BYTES {
            Some("ERR key too long for dkvs (keys are 1 to 65535 bytes)")
        } else {
            None
        }
    }

    fn value_ok(&self, value: &[u8]) -> bool {
        value.len() <= self.core.max_value_bytes
    }

    /// Submit `ops` as one transaction's worth of this command.
    fn submit<I>(&mut self, ops: I, reply: RespWriteReply) -> Exec
    where
        I: IntoIterator<Item = WriteOp>,
        I::IntoIter: ExactSizeIterator,
    {
        let ops = ops.into_iter();
        let pending = RespPending {
            reply,
            encoder: *self.enc,
            remaining: ops.len() as u32,
            changed: 0,
        };
        let client = self.core.submit(ops, self.target, 0, 0, Some(pending));
        Exec::Pending(client)
    }

    /// A PUT that leaves the key with `deadline` (unix ms; `None`: none).
    fn put_until(key: &[u8], value: &[u8], deadline: Option<u64>) -> WriteOp {
        match deadline {
            Some(at) => WriteOp::put_expiring(key, value, at),
            None => Session::put(key, value),
        }
    }

    fn put(key: &[u8], value: &[u8]) -> WriteOp {
        WriteOp::new(OpKind::Put, key, value)
    }

    /// Send a write to the master (`--forward-writes`): its reply comes in
    /// this connection's order once the master answered (§11.8).
    fn forward(&mut self, args: &[&[u8]]) -> Exec {
        let ReplyTarget::Tcp { key, conn_id } = self.target else {
            return self.error(READONLY);
        };
        let client = self.core.new_client_ref();
        let origin = Origin {
            key,
            conn_id,
            client,
            encoder: *self.enc,
        };
        match self.core.forward.enqueue(origin, args, Instant::now()) {
            Ok(()) => Exec::Pending(client),
            Err(text) => self.error(&text),
        }
    }

    pub(super) fn run(&mut self, spec: &Spec, args: &[&[u8]]) -> Exec {
        let n = args.len() as i64;
        if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
            return self.wrong_arity(spec.name);
        }
        if spec.name == "wait" && self.core.forwards_writes() && self.exec.is_none() {
            // The writes this slave forwarded were acknowledged by the master:
            // its count of in-sync slaves is the one that means something.
            return self.forward(args);
        }
        if spec.class == Class::Write && matches!(self.core.mode, Mode::Slave { .. }) {
            if self.core.forwards_writes() && self.exec.is_none() {
                return self.forward(args);
            }
            return self.error(READONLY);
        }
        if spec.class == Class::Write
            && let Some(why) = &self.core.write_refusal
        {
            // Redis's answer when its AOF cannot be written.
            let message = format!("MISCONF Errors writing to the AOF file: {why}");
            return self.error(&message);
        }
        if spec.class == Class::Read
            && !matches!(spec.name, "info" | "wait")
            && let Some(why) = &self.core.read_refusal
        {
            let message = format!("MASTERDOWN {why}");
            return self.error(&message);
        }
        if spec.class == Class::Read
            && !matches!(spec.name, "info" | "wait")
            && !self.core.read_gate.is_open()
        {
            // Redis's answer from a replica with replica-serve-stale-data no.
            self.core.stats.reads_refused += 1;
            return self.error(
                "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            );
        }
        match spec.name {
            "get" => self.get(args[1]),
            "set" => self.set(args),
            "ping" => match args.len() {
                1 => {
                    self.enc.simple(self.out, "PONG");
                    Exec::Done
                }
                2 => {
                    self.enc.bulk(self.out, args[1]);
                    Exec::Done
                }
                _ => self.wrong_arity("ping"),
            },
            "echo" => {
                self.enc.bulk(self.out, args[1]);
                Exec::Done
            }
            "incr" => self.incr_by(args[1], 1),
            "decr" => self.incr_by(args[1], -1),
            "incrby" | "decrby" => {
                let Some(by) = parse_i64(args[2]) else {
                    return self.error(NOT_AN_INTEGER);
                };
                if spec.name == "incrby" {
                    self.incr_by(args[1], by)
                } else if by == i64::MIN {
                    self.error("ERR decrement would overflow")
                } else {
                    self.incr_by(args[1], -by)
                }
            }
            "mset" | "msetnx" => self.mset(args, spec.name == "msetnx"),
            "mget" => {
                self.enc.array(self.out, args.len() - 1);
                for key in &args[1..] {
                    let value = read_in(self.core, key, self.exec);
                    self.enc.opt_bulk(self.out, value);
                }
                Exec::Done
            }
            "del" => {
                // An expired key still held is already absent: DEL does not count it
                // (the master's expiry deletes it).
                // Inside EXEC the view decides (a key SET earlier in it exists).
                let ops: Vec<WriteOp> = args[1..]
                    .iter()
                    .filter(|k| self.key_error(k).is_none())
                    .filter(|k| match self.exec {
                        Some(view) => view.get(self.core, k).is_some(),
                        None => !self.core.expired_but_held(k),
                    })
                    .map(|k| WriteOp::new(OpKind::Delete, k, b""))
                    .collect();
                if ops.is_empty() {
                    return self.int(0);
                }
                self.submit(ops, RespWriteReply::Changed)
            }
            "exists" => {
                let found = args[1..].iter().filter(|k| self.read(k).is_some()).count();
                self.int(found as i64)
            }
            "getset" => self.set_with(
                args[1],
                args[2],
                SetMode::Always,
                SetReply::Old,
                Expiry::None,
            ),
            "setnx" => self.set_with(
                args[1],
                args[2],
                SetMode::IfAbsent,
                SetReply::OneZero,
                Expiry::None,
            ),
            "append" => self.append(args[1], args[2]),
            "strlen" => {
                let len = self.read(args[1]).map_or(0, <[u8]>::len);
                self.int(len as i64)
            }
            "type" => {
                let kind = if self.read(args[1]).is_some() {
                    "string"
                } else {
                    "none"
                };
                self.enc.simple(self.out, kind);
                Exec::Done
            }
            "dbsize" => {
                // Keys past their deadline do not count, deleted or not yet.
                let len = match self.exec {
                    Some(view) => view.len(self.core),
                    None => self.core.store.live_len(),
                };
                self.int(len as i64)
            }
            "keys" => {
                let store = &self.core.store;
                let exec = self.exec;
                let held = store
                    .iter()
                    .filter(|b| !store.is_expired(b))
                    .map(|b| b.key())
                    .filter(|k| exec.is_none_or(|view| !view.overrides(k)));
                let written = exec
                    .into_iter()
                    .flat_map(|view| view.present_keys(self.core));
                let keys: Vec<&[u8]> = held
                    .chain(written)
                    .filter(|k| glob_match(args[1], k))
                    .collect();
                self.enc.array(self.out, keys.len());
                for key in keys {
                    self.enc.bulk(self.out, key);
                }
                Exec::Done
            }
            "scan" => self.scan(args),
            "flushdb" | "flushall" => {
                if args.len() > 2
                    || (args.len() == 2
                        && !args[1].eq_ignore_ascii_case(b"async")
                        && !args[1].eq_ignore_ascii_case(b"sync"))
                {
                    return self.error(SYNTAX);
                }
                let clear = WriteOp::new(OpKind::Clear, b"", b"");
                self.submit(std::iter::once(clear), RespWriteReply::Ok)
            }
            "info" => {
                let text = self.info(&args[1..]);
                self.enc.verbatim(self.out, &text);
                Exec::Done
            }
            "config" => self.config(args),
            "command" => self.command(args),
            "client" => self.client(args),
            "hello" => self.hello(args),
            "select" => match parse_i64(args[1]) {
                Some(0) => self.ok(),
                Some(_) => self.error("ERR DB index is out of range"),
                None => self.error(NOT_AN_INTEGER),
            },
            "quit" => {
                self.enc.ok(self.out);
                Exec::Close
            }
            "auth" => self.auth(&args[1..]),
            "wait" => self.wait(args),
            "role" => self.role(),
            "getdel" => self.getdel(args[1]),
            "expire" => self.expire(args, 1000, false),
            "pexpire" => self.expire(args, 1, false),
            "expireat" => self.expire(args, 1000, true),
            "pexpireat" => self.expire(args, 1, true),
            "persist" => self.persist(args[1]),
            "getex" => self.getex(args),
            "ttl" | "pttl" | "expiretime" | "pexpiretime" => {
                let n = self.ttl_reply(args[1], spec.name);
                self.int(n)
            }
            "dkvs.version" => {
                // Inside EXEC a key written earlier in it has no version until
                // the commit gives it one: this answers the settled version.
                match self.core.store.get(args[1]) {
                    Some((_, version)) => self.enc.int(self.out, version as i64),
                    None => self.enc.null(self.out),
                }
                Exec::Done
            }
            _ => {
                self.unknown_command(args);
                Exec::Done
            }
        }
    }

    fn get(&mut self, key: &[u8]) -> Exec {
        let value = read_in(self.core, key, self.exec);
        self.enc.opt_bulk(self.out, value);
        Exec::Done
    }

    /// The latest value of `key` for a read-modify-write command; inside EXEC,
    /// counting the writes of the commands before it.
    fn latest(&self, key: &[u8]) -> Latest<'_> {
        match self.exec {
            Some(view) => Latest::Known(view.get(self.core, key)),
            None => self.core.latest(key),
        }
    }

    /// The value and deadline of `key` for a command that reads or changes its
    /// deadline: inside EXEC as the view has it; elsewhere its settled state
    /// (`None`: a write of it is undecided, wait for it).
    fn current(&self, key: &[u8]) -> Option<Option<(&[u8], Option<u64>)>> {
        if let Some(view) = self.exec {
            return Some(view.get(self.core, key));
        }
        match self.core.settled_version(key) {
            Settled::Undecided => None,
            Settled::Version(None) => Some(None),
            Settled::Version(Some(_)) => Some(
                self.core
                    .store
                    .get(key)
                    .map(|(v, _)| (v, self.core.store.deadline(key))),
            ),
        }
    }

    /// The value a read sees: the store's, or inside EXEC also the writes of
    /// the commands before it (all in the current batch, none undecided
    /// elsewhere: EXEC checked).
    fn read(&self, key: &[u8]) -> Option<&[u8]> {
        read_in(self.core, key, self.exec)
    }

    fn set(&mut self, args: &[&[u8]]) -> Exec {
        let mut mode = SetMode::Always;
        let mut style = SetReply::OkOrNull;
        let mut expiry = Expiry::None;
        let mut options = args[3..].iter();
        while let Some(option) = options.next() {
            let option = upper(option);
            match option.as_slice() {
                b"NX" if mode == SetMode::Always => mode = SetMode::IfAbsent,
                b"XX" if mode == SetMode::Always => mode = SetMode::IfPresent,
                b"GET" => style = SetReply::Old,
                b"KEEPTTL" if expiry == Expiry::None => expiry = Expiry::Keep,
                b"EX" | b"PX" | b"EXAT" | b"PXAT" if expiry == Expiry::None => {
                    let Some(n) = options.next() else {
                        return self.error(SYNTAX);
                    };
                    let Some(n) = parse_i64(n) else {
                        return self.error(NOT_AN_INTEGER);
                    };
                    let (unit, absolute) = match option.as_slice() {
                        b"EX" => (1000, false),
                        b"PX" => (1, false),
                        b"EXAT" => (1000, true),
                        _ => (1, true),
                    };
                    match self.deadline_of(n, unit, absolute) {
                        Some(at) if n > 0 => expiry = Expiry::At(at),
                        _ => return self.error("ERR invalid expire time in 'set' command"),
                    }
                }
                _ => return self.error(SYNTAX),
            }
        }
        self.set_with(args[1], args[2], mode, style, expiry)
    }

    /// The deadline (unix ms) `n` units from now, or at `n` units since the
    /// epoch; `None` if it overflows. Computed on the master's clock.
    fn deadline_of(&self, n: i64, unit_ms: i64, absolute: bool) -> Option<u64> {
        let ms = n.checked_mul(unit_ms)?;
        let base = if absolute {
            0
        } else {
            i64::try_from(self.core.store.now_ms()).ok()?
        };
        // A deadline at or before the epoch is simply in the past: 1 ms.
        Some(u64::try_from(base.checked_add(ms)?).unwrap_or(0).max(1))
    }

    /// SET and its relatives: write `value` under the condition and answer in
    /// `style`, leaving the key with `expiry`.
    fn set_with(
        &mut self,
        key: &[u8],
        value: &[u8],
        mode: SetMode,
        style: SetReply,
        expiry: Expiry,
    ) -> Exec {
        if let Some(e) = self.key_error(key) {
            return self.error(e);
        }
        if !self.value_ok(value) {
            return self.error(TOO_BIG);
        }
        let deadline = match expiry {
            Expiry::None => None,
            Expiry::At(at) => Some(at),
            // The deadline the key has now, read from settled state.
            Expiry::Keep => match self.current(key) {
                None => return Exec::WaitKey,
                Some(current) => current.and_then(|(_, deadline)| deadline),
            },
        };
        match (mode, style) {
            (SetMode::Always, SetReply::OkOrNull) => {
                return self.submit(
                    std::iter::once(Session::put_until(key, value, deadline)),
                    RespWriteReply::Ok,
                );
            }
            // An expired key the master still holds is absent to SET XX: the
            // read-modify-write path below sees it so; an UPDATE would revive it.
            (SetMode::IfPresent, SetReply::OkOrNull)
                if deadline.is_none()
                    && self.exec.is_none()
                    && !self.core.expired_but_held(key) =>
            {
                // UPDATE is conditional on every replica alike: no read needed.
                let update = WriteOp::new(OpKind::Update, key, value);
                return self.submit(std::iter::once(update), RespWriteReply::OkOrNull);
            }
            _ => {}
        }
        let old = match self.latest(key) {
            Latest::Known(old) => old.map(|(v, _)| v.to_vec()),
            Latest::InFlight => return Exec::WaitKey,
        };
        let write = match mode {
            SetMode::Always => true,
            SetMode::IfAbsent => old.is_none(),
            SetMode::IfPresent => old.is_some(),
        };
        if !write {
            match style {
                SetReply::Old => self.enc.opt_bulk(self.out, old.as_deref()),
                SetReply::OneZero => self.enc.int(self.out, 0),
                SetReply::OkOrNull => self.enc.null(self.out),
            }
            return Exec::Done;
        }
        let reply = match style {
            SetReply::Old => RespWriteReply::Bulk(old),
            SetReply::OneZero => RespWriteReply::Int(1),
            SetReply::OkOrNull => RespWriteReply::Ok,
        };
        self.submit(
            std::iter::once(Session::put_until(key, value, deadline)),
            reply,
        )
    }

    /// GETDEL: the value, and the key deleted.
    fn getdel(&mut self, key: &[u8]) -> Exec {
        let old = match self.latest(key) {
            Latest::Known(old) => old.map(|(v, _)| v.to_vec()),
            Latest::InFlight => return Exec::WaitKey,
        };
        let Some(old) = old else {
            self.enc.null(self.out);
            return Exec::Done;
        };
        let delete = WriteOp::new(OpKind::Delete, key, b"");
        self.submit(std::iter::once(delete), RespWriteReply::Bulk(Some(old)))
    }

    /// TTL, PTTL, EXPIRETIME, PEXPIRETIME: -2 absent, -1 no deadline, else the
    /// time left (TTL rounds to the nearest second, as Redis) or the deadline.
    fn ttl_reply(&self, key: &[u8], name: &str) -> i64 {
        let current = match self.exec {
            Some(view) => view.get(self.core, key),
            None => self
                .core
                .store
                .get(key)
                .map(|(v, _)| (v, self.core.store.deadline(key))),
        };
        let Some((_, deadline)) = current else {
            return -2;
        };
        let Some(at) = deadline else {
            return -1;
        };
        let left = at.saturating_sub(self.core.store.now_ms());
        let n = match name {
            "ttl" => (left + 500) / 1000,
            "pttl" => left,
            "expiretime" => at / 1000,
            _ => at,
        };
        i64::try_from(n).unwrap_or(i64::MAX)
    }

    /// EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT key n [NX|XX|GT|LT]: 1 if the deadline was set.
    fn expire(&mut self, args: &[&[u8]], unit_ms: i64, absolute: bool) -> Exec {
        let key = args[1];
        if let Some(e) = self.key_error(key) {
            return self.error(e);
        }
        let Some(n) = parse_i64(args[2]) else {
            return self.error(NOT_AN_INTEGER);
        };
        let mut condition = None;
        for option in &args[3..] {
            let option = upper(option);
            match (option.as_slice(), condition) {
                (b"NX" | b"XX" | b"GT" | b"LT", None) => condition = Some(option),
                (b"NX" | b"XX" | b"GT" | b"LT", Some(_)) => {
                    return self.error(
                        "ERR NX and XX, GT or LT options at the same time are not compatible",
                    );
                }
                _ => {
                    let option = text(&option);
                    return self.error(&format!("ERR Unsupported option {option}"));
                }
            }
        }
        let Some(at) = self.deadline_of(n, unit_ms, absolute) else {
            let name = args[0].to_ascii_lowercase();
            let name = text(&name);
            return self.error(&format!("ERR invalid expire time in '{name}' command"));
        };
        let current = match self.current(key) {
            None => return Exec::WaitKey,
            Some(None) => return self.int(0),
            Some(Some((_, deadline))) => deadline,
        };
        // No deadline counts as infinite for GT and LT, as in Redis.
        let allowed = match condition.as_deref() {
            Some(b"NX") => current.is_none(),
            Some(b"XX") => current.is_some(),
            Some(b"GT") => current.is_some_and(|c| at > c),
            Some(b"LT") => current.is_none_or(|c| at < c),
            _ => true,
        };
        if !allowed {
            return self.int(0);
        }
        let op = if at <= self.core.store.now_ms() {
            // A deadline in the past deletes the key, as Redis does.
            WriteOp::new(OpKind::Delete, key, b"")
        } else {
            WriteOp::expire(key, Some(at))
        };
        self.submit(std::iter::once(op), RespWriteReply::Int(1))
    }

    /// PERSIST: 1 if a deadline was removed.
    fn persist(&mut self, key: &[u8]) -> Exec {
        match self.current(key) {
            None => return Exec::WaitKey,
            Some(None | Some((_, None))) => return self.int(0),
            Some(Some((_, Some(_)))) => {}
        }
        self.submit(
            std::iter::once(WriteOp::expire(key, None)),
            RespWriteReply::Int(1),
        )
    }

    /// GETEX key [EX s|PX ms|EXAT t|PXAT t|PERSIST]: the value, the deadline changed.
    fn getex(&mut self, args: &[&[u8]]) -> Exec {
        let key = args[1];
        let change = match args.len() {
            2 => None,
            3 if args[2].eq_ignore_ascii_case(b"persist") => Some(None),
            4 => {
                let option = upper(args[2]);
                let (unit, absolute) = match option.as_slice() {
                    b"EX" => (1000, false),
                    b"PX" => (1, false),
                    b"EXAT" => (1000, true),
                    b"PXAT" => (1, true),
                    _ => return self.error(SYNTAX),
                };
                let Some(n) = parse_i64(args[3]) else {
                    return self.error(NOT_AN_INTEGER);
                };
                match self.deadline_of(n, unit, absolute) {
                    Some(at) if n > 0 => Some(Some(at)),
                    _ => return self.error("ERR invalid expire time in 'getex' command"),
                }
            }
            _ => return self.error(SYNTAX),
        };
        let (value, current) = match self.current(key) {
            None => return Exec::WaitKey,
            Some(None) => (None, None),
            Some(Some((value, deadline))) => (Some(value.to_vec()), deadline),
        };
        let (Some(value), Some(deadline)) = (value.as_deref(), change) else {
            self.enc.opt_bulk(self.out, value.as_deref());
            return Exec::Done;
        };
        if deadline.is_none() && current.is_none() {
            self.enc.bulk(self.out, value);
            return Exec::Done;
        }
        let op = WriteOp::expire(key, deadline);
        self.submit(
            std::iter::once(op),
            RespWriteReply::Bulk(Some(value.to_vec())),
        )
    }

    /// INCR and friends keep the key's time to live, as Redis does.
    fn incr_by(&mut self, key: &[u8], by: i64) -> Exec {
        if let Some(e) = self.key_error(key) {
            return self.error(e);
        }
        let (current, deadline) = match self.latest(key) {
            Latest::Known(None) => (0, None),
            Latest::Known(Some((value, deadline))) => match parse_i64(value) {
                Some(n) => (n, deadline),
                None => return self.error(NOT_AN_INTEGER),
            },
            Latest::InFlight => return Exec::WaitKey,
        };
        let Some(next) = current.checked_add(by) else {
            return self.error("ERR increment or decrement would overflow");
        };
        // Formatted on the stack: INCR allocates nothing but its write's buffer.
        let mut digits = itoa::Buffer::new();
        let value = digits.format(next);
        self.submit(
            std::iter::once(Session::put_until(key, value.as_bytes(), deadline)),
            RespWriteReply::Int(next),
        )
    }

    /// APPEND keeps the key's time to live, as Redis does.
    fn append(&mut self, key: &[u8], suffix: &[u8]) -> Exec {
        if let Some(e) = self.key_error(key) {
            return self.error(e);
        }
        let (mut value, deadline) = match self.latest(key) {
            Latest::Known(old) => old.map_or((Vec::new(), None), |(v, d)| (v.to_vec(), d)),
            Latest::InFlight => return Exec::WaitKey,
        };
        if value.len() + suffix.len() > self.core.max_value_bytes {
            return self.error(TOO_BIG);
        }
        value.extend_from_slice(suffix);
        let len = value.len() as i64;
        let put = match deadline {
            Some(at) => WriteOp::put_expiring(key, &value, at),
            None => WriteOp::new(OpKind::Put, key, &value),
        };
        self.submit(std::iter::once(put), RespWriteReply::Int(len))
    }

    fn mset(&mut self, args: &[&[u8]], only_if_none: bool) -> Exec {
        let name = if only_if_none { "msetnx" } else { "mset" };
        if args.len().is_multiple_of(2) {
            return self.wrong_arity(name);
        }
        let pairs: Vec<(&[u8], &[u8])> = args[1..].chunks(2).map(|p| (p[0], p[1])).collect();
        for (key, value) in &pairs {
            if let Some(e) = self.key_error(key) {
                return self.error(e);
            }
            if !self.value_ok(value) {
                return self.error(TOO_BIG);
            }
        }
        if only_if_none {
            for (key, _) in &pairs {
                match self.latest(key) {
                    Latest::Known(None) => {}
                    Latest::Known(Some(_)) => return self.int(0),
                    Latest::InFlight => return Exec::WaitKey,
                }
            }
        }
        let ops: Vec<WriteOp> = pairs.iter().map(|(k, v)| Session::put(k, v)).collect();
        let reply = if only_if_none {
            RespWriteReply::Int(1)
        } else {
            RespWriteReply::Ok
        };
        self.submit(ops, reply)
    }

    fn scan(&mut self, args: &[&[u8]]) -> Exec {
        let Some(cursor) = std::str::from_utf8(args[1])
            .ok()
            .and_then(|c| c.parse::<u64>().ok())
        else {
            return self.error("ERR invalid cursor");
        };
        let mut pattern: Option<&[u8]> = None;
        let mut count = SCAN_DEFAULT_COUNT;
        let mut strings = true;
        let mut i = 2;
        while i < args.len() {
            let option = upper(args[i]);
            let Some(&value) = args.get(i + 1) else {
                return self.error(SYNTAX);
            };
            match option.as_slice() {
                b"MATCH" => pattern = Some(value),
                b"COUNT" => match parse_i64(value) {
                    Some(c) if c >= 1 => count = c as u64,
                    Some(_) => return self.error(SYNTAX),
                    None => return self.error(NOT_AN_INTEGER),
                },
                b"TYPE" => strings = value.eq_ignore_ascii_case(b"string"),
                _ => return self.error(SYNTAX),
            }
            i += 2;
        }
        // The cursor is a shard index: whole shards are visited until COUNT keys
        // were examined, so the work per call is bounded by COUNT plus one shard.
        let first = cursor.min(SHARDS as u64) as usize;
        let mut shard = first;
        let mut examined = 0u64;
        let mut keys: Vec<&[u8]> = Vec::new();
        let store = &self.core.store;
        let exec = self.exec;
        let wanted = |k: &[u8]| strings && pattern.is_none_or(|p| glob_match(p, k));
        while shard < SHARDS && examined < count {
            for block in store.iter_shard(shard) {
                examined += 1;
                // Past its deadline a key is absent, deleted or not yet; inside
                // EXEC the view decides the keys its writes named.
                let shown = !store.is_expired(block)
                    && exec.is_none_or(|view| !view.overrides(block.key()));
                if shown && wanted(block.key()) {
                    keys.push(block.key());
                }
            }
            shard += 1;
        }
        if let Some(view) = exec {
            // Keys this EXEC wrote, in the shards this call visited.
            let visited = first..shard;
            keys.extend(
                view.present_keys(self.core)
                    .filter(|k| visited.contains(&store.shard_of(k)) && wanted(k)),
            );
        }
        let next = if shard >= SHARDS { 0 } else { shard };
        self.enc.array(self.out, 2);
        self.enc.bulk(self.out, next.to_string().as_bytes());
        self.enc.array(self.out, keys.len());
        for key in keys {
            self.enc.bulk(self.out, key);
        }
        Exec::Done
    }

    fn auth(&mut self, args: &[&[u8]]) -> Exec {
        match args {
            [_] if self.core.password.is_none() => self.error(auth::RESP_NO_PASSWORD),
            [password] => self.check_password(b"default", password),
            [user, password] => self.check_password(user, password),
            _ => self.error(SYNTAX),
        }
    }

    /// AUTH as `user` (only `default` exists): OK, or WRONGPASS. Without a
    /// password configured, `default` takes any password, as in Redis. A
    /// failure leaves an authenticated connection authenticated, as Redis.
    fn check_password(&mut self, user: &[u8], password: &[u8]) -> Exec {
        if self.password_ok(user, password) {
            *self.authenticated = true;
            self.ok()
        } else {
            self.error(auth::RESP_WRONGPASS)
        }
    }

    /// Whether `user`/`password` authenticate (counting failures).
    fn password_ok(&mut self, user: &[u8], password: &[u8]) -> bool {
        let ok = user == b"default"
            && self
                .core
                .password
                .as_ref()
                .is_none_or(|p| p.matches(password));
        if !ok {
            self.core.stats.auth_failures += 1;
        }
        ok
    }

    fn wait(&mut self, args: &[&[u8]]) -> Exec {
        if parse_i64(args[1]).is_none() {
            return self.error(NOT_AN_INTEGER);
        }
        match parse_i64(args[2]) {
            None => return self.error("ERR timeout is not an integer or out of range"),
            Some(t) if t < 0 => return self.error("ERR timeout is negative"),
            Some(_) => {}
        }
        if matches!(self.core.mode, Mode::Slave { .. }) {
            return self.error(
                "ERR WAIT cannot be used with replica instances. Please also note that since \
                 Redis 4.0 if a replica is configured to be writable (which is not the default) \
                 writes to replicas are just local and are not propagated.",
            );
        }
        // Every acknowledged write is already on every in-sync slave (2PC).
        self.int(self.core.replication.in_sync as i64)
    }

    fn role(&mut self) -> Exec {
        match &self.core.mode {
            Mode::Master => {
                let info = &self.core.replication;
                self.enc.array(self.out, 3);
                self.enc.bulk(self.out, b"master");
                self.enc.int(self.out, self.core.commit_seq as i64);
                self.enc.array(self.out, info.slaves.len());
                for slave in &info.slaves {
                    let (host, port) = split_addr(&slave.addr);
                    self.enc.array(self.out, 3);
                    self.enc.bulk(self.out, host.as_bytes());
                    self.enc.bulk(self.out, port.as_bytes());
                    self.enc
                        .bulk(self.out, slave.applied_seq.to_string().as_bytes());
                }
            }
            Mode::Slave { master } => {
                let (host, port) = split_addr(master.as_deref().unwrap_or(""));
                let port: i64 = port.parse().unwrap_or(0);
                let state = if self.core.replication.master_link_up {
                    "connected"
                } else {
                    "connect"
                };
                self.enc.array(self.out, 5);
                self.enc.bulk(self.out, b"slave");
                self.enc.bulk(self.out, host.as_bytes());
                self.enc.int(self.out, port);
                self.enc.bulk(self.out, state.as_bytes());
                self.enc.int(self.out, self.core.commit_seq as i64);
            }
        }
        Exec::Done
    }

    fn config(&mut self, args: &[&[u8]]) -> Exec {
        let sub = upper(args[1]);
        match sub.as_slice() {
            b"GET" if args.len() >= 3 => {
                let table = self.config_table();
                // (name as replied, index in the table)
                let mut found: Vec<(&[u8], usize)> = Vec::new();
                for &pattern in &args[2..] {
                    let lower = pattern.to_ascii_lowercase();
                    let is_glob = pattern
                        .iter()
                        .any(|b| matches!(b, b'*' | b'?' | b'[' | b'\\'));
                    for (i, entry) in table.iter().enumerate() {
                        if glob_match(&lower, entry.0.as_bytes())
                            && !found.iter().any(|&(_, j)| j == i)
                        {
                            // Redis 7 replies an exact name as the client spelt
                            // it (`CONFIG GET REQUIREPASS` -> `REQUIREPASS`).
                            let name = if is_glob { entry.0.as_bytes() } else { pattern };
                            found.push((name, i));
                        }
                    }
                }
                self.enc.map(self.out, found.len());
                for (name, i) in found {
                    self.enc.bulk(self.out, name);
                    self.enc.bulk(self.out, table[i].1.as_bytes());
                }
                Exec::Done
            }
            b"GET" => self.wrong_arity("config|get"),
            b"SET" => {
                self.error("ERR CONFIG SET is not supported by dkvs: use its command-line flags")
            }
            b"RESETSTAT" => {
                // The one statistic a measurement needs to start afresh (bench-expiry.py).
                self.core.stats.longest_turn_us = 0;
                self.core.stats.longest_sweep_us = 0;
                self.ok()
            }
            _ => self.unknown_subcommand("config", args[1]),
        }
    }

    /// The configuration CONFIG GET reports: what redis-benchmark and client
    /// libraries ask for, with dkvs's real values where it has them.
    fn config_table(&self) -> Vec<(String, String)> {
        [
            ("save", String::new()),
            // The write-ahead log is dkvs's append-only file; Redis spells "never" "no".
            ("appendonly", "yes".into()),
            (
                "appendfsync",
                match self.core.fsync_policy {
                    "batch" => "everysec",
                    "never" => "no",
                    _ => "always",
                }
                .into(),
            ),
            ("databases", "1".into()),
            ("maxmemory", "0".into()),
            ("maxmemory-policy", "noeviction".into()),
            ("maxclients", self.core.reported.max_connections.to_string()),
            ("timeout", self.core.reported.idle_timeout_s.to_string()),
            // Redis replies the password itself. dkvs cannot: it keeps only a
            // keyed hash of it (auth.rs). Empty means none, as in Redis; a
            // password that is set shows as a fixed text that is not it.
            (
                "requirepass",
                if self.core.password.is_some() {
                    REQUIREPASS_HIDDEN.into()
                } else {
                    String::new()
                },
            ),
            (
                "protected-mode",
                if self.core.reported.protected_mode {
                    "yes"
                } else {
                    "no"
                }
                .into(),
            ),
            ("port", self.core.tcp_port.to_string()),
            ("proto-max-bulk-len", self.core.max_value_bytes.to_string()),
            ("replica-read-only", "yes".into()),
            ("slave-read-only", "yes".into()),
            ("cluster-enabled", "no".into()),
            ("notify-keyspace-events", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn command(&mut self, args: &[&[u8]]) -> Exec {
        let Some(sub) = args.get(1) else {
            self.enc.array(self.out, COMMANDS.len());
            for spec in COMMANDS {
                self.command_entry(spec);
            }
            return Exec::Done;
        };
        match upper(sub).as_slice() {
            b"COUNT" => self.int(COMMANDS.len() as i64),
            b"DOCS" => {
                // No documentation to give: redis-cli then uses its built-in help.
                self.enc.map(self.out, 0);
                Exec::Done
            }
            b"INFO" => {
                self.enc.array(self.out, args.len() - 2);
                for name in &args[2..] {
                    match lookup(name) {
                        Some(spec) => self.command_entry(spec),
                        None => self.enc.null(self.out),
                    }
                }
                Exec::Done
            }
            b"LIST" => {
                self.enc.array(self.out, COMMANDS.len());
                for spec in COMMANDS {
                    self.enc.bulk(self.out, spec.name.as_bytes());
                }
                Exec::Done
            }
            _ => self.unknown_subcommand("command", sub),
        }
    }

    /// One COMMAND entry, Redis 7's ten fields.
    fn command_entry(&mut self, spec: &Spec) {
        let enc = *self.enc;
        enc.array(self.out, 10);
        enc.bulk(self.out, spec.name.as_bytes());
        enc.int(self.out, spec.arity);
        enc.array(self.out, spec.flags.len());
        for flag in spec.flags {
            enc.simple(self.out, flag);
        }
        enc.int(self.out, spec.keys.0);
        enc.int(self.out, spec.keys.1);
        enc.int(self.out, spec.keys.2);
        for _ in 0..4 {
            // ACL categories, tips, key specs, subcommands.
            enc.array(self.out, 0);
        }
    }

    fn client(&mut self, args: &[&[u8]]) -> Exec {
        let sub = upper(args[1]);
        match sub.as_slice() {
            b"ID" if args.len() == 2 => self.int(self.id as i64),
            b"GETNAME" if args.len() == 2 => {
                let name = self.name.clone();
                self.enc.opt_bulk(self.out, name.as_deref());
                Exec::Done
            }
            b"SETNAME" if args.len() == 3 => match self.set_name(args[2]) {
                Ok(()) => self.ok(),
                Err(e) => self.error(e),
            },
            b"SETINFO" if args.len() == 4 => {
                let attr = upper(args[2]);
                if attr != b"LIB-NAME" && attr != b"LIB-VER" {
                    return self.error(&format!("ERR Unrecognized option '{}'", text(args[2])));
                }
                self.ok()
            }
            b"ID" | b"GETNAME" | b"SETNAME" | b"SETINFO" => {
                let name = format!("client|{}", text(&sub).to_ascii_lowercase());
                self.wrong_arity(&name)
            }
            _ => self.unknown_subcommand("client", args[1]),
        }
    }

    fn set_name(&mut self, name: &[u8]) -> Result<(), &'static str> {
        if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
            return Err("ERR Client names cannot contain spaces, newlines or special characters.");
        }
        *self.name = (!name.is_empty()).then(|| name.to_vec());
        Ok(())
    }

    fn hello(&mut self, args: &[&[u8]]) -> Exec {
        let mut version = *self.enc;
        if let Some(proto) = args.get(1) {
            version = match parse_i64(proto) {
                Some(2) => Encoder(RespVersion::Two),
                Some(3) => Encoder(RespVersion::Three),
                Some(_) => return self.error("NOPROTO unsupported protocol version"),
                None => {
                    return self.error("ERR Protocol version is not an integer or out of range");
                }
            };
        }
        let mut i = 2;
        let mut new_name = None;
        let mut authenticates = false;
        while i < args.len() {
            let option = upper(args[i]);
            match option.as_slice() {
                b"AUTH" if i + 2 < args.len() => {
                    if !self.password_ok(args[i + 1], args[i + 2]) {
                        return self.error(auth::RESP_WRONGPASS);
                    }
                    authenticates = true;
                    i += 3;
                }
                b"SETNAME" if i + 1 < args.len() => {
                    new_name = Some(args[i + 1]);
                    i += 2;
                }
                _ => {
                    return self.error(&format!(
                        "ERR Syntax error in HELLO option '{}'",
                        text(args[i])
                    ));
                }
            }
        }
        if self.core.password.is_some() && !*self.authenticated && !authenticates {
            self.core.stats.auth_required += 1;
            return self.error(auth::RESP_NOAUTH_HELLO);
        }
        *self.authenticated |= authenticates;
        if let Some(name) = new_name
            && let Err(e) = self.set_name(name)
        {
            return self.error(e);
        }
        *self.enc = version;
        let enc = version;
        let role = match self.core.mode {
            Mode::Master => "master",
            Mode::Slave { .. } => "replica",
        };
        enc.map(self.out, 7);
        enc.bulk(self.out, b"server");
        enc.bulk(self.out, b"redis");
        enc.bulk(self.out, b"version");
        enc.bulk(self.out, REDIS_VERSION.as_bytes());
        enc.bulk(self.out, b"proto");
        enc.int(
            self.out,
            if version.0 == RespVersion::Three {
                3
            } else {
                2
            },
        );
        enc.bulk(self.out, b"id");
        enc.int(self.out, self.id as i64);
        enc.bulk(self.out, b"mode");
        enc.bulk(self.out, b"standalone");
        enc.bulk(self.out, b"role");
        enc.bulk(self.out, role.as_bytes());
        enc.bulk(self.out, b"modules");
        enc.array(self.out, 0);
        Exec::Done
    }

    /// INFO's text, Redis's layout: `# Section` then `field:value` lines, CRLF.
    fn info(&self, sections: &[&[u8]]) -> String {
        const ALL: [&str; 7] = [
            "server",
            "clients",
            "memory",
            "persistence",
            "stats",
            "replication",
            "keyspace",
        ];
        let wanted: Vec<String> = sections
            .iter()
            .map(|s| String::from_utf8_lossy(s).to_ascii_lowercase())
            .collect();
        let everything = wanted.is_empty()
            || wanted
                .iter()
                .any(|w| w == "all" || w == "everything" || w == "default");
        let core = &*self.core;
        let mut text = String::new();
        for section in ALL {
            if !everything && !wanted.iter().any(|w| w == section) {
                continue;
            }
            if !text.is_empty() {
                text.push_str("\r\n");
            }
            let mut title = section.to_string();
            title[..1].make_ascii_uppercase();
            let _ = write!(text, "# {title}\r\n");
            let mut line = |name: &str, value: &dyn std::fmt::Display| {
                let _ = write!(text, "{name}:{value}\r\n");
            };
            match section {
                "server" => {
                    line("redis_version", &REDIS_VERSION);
                    line("dkvs_version", &env!("CARGO_PKG_VERSION"));
                    line("redis_mode", &"standalone");
                    line("os", &std::env::consts::OS);
                    line("arch_bits", &(usize::BITS));
                    line("multiplexing_api", &"epoll");
                    line("process_id", &std::process::id());
                    line("tcp_port", &core.tcp_port);
                    line("uptime_in_seconds", &core.stats.uptime_secs());
                    line("uptime_in_days", &(core.stats.uptime_secs() / 86_400));
                }
                "clients" => {
                    line("connected_clients", &core.stats.connections_open);
                    line("blocked_clients", &0);
                }
                "memory" => {
                    // Entries plus an estimate of the table and allocation overhead per key.
                    let used = core.store.data_bytes() + 48 * core.store.len();
                    line("used_memory", &used);
                    line("used_memory_human", &human_bytes(used));
                    if let Some(rss) = rss_bytes() {
                        line("used_memory_rss", &rss);
                    }
                    line("maxmemory", &0);
                    line("maxmemory_policy", &"noeviction");
                }
                "persistence" => {
                    line("loading", &0);
                    line("rdb_changes_since_last_save", &0);
                    line("rdb_bgsave_in_progress", &0);
                    line("rdb_last_bgsave_status", &"ok");
                    line("aof_enabled", &1);
                    line("aof_rewrite_in_progress", &0);
                }
                "stats" => {
                    line(
                        "total_connections_received",
                        &core.stats.connections_accepted,
                    );
                    line(
                        "total_commands_processed",
                        &(core.resp_commands + core.stats.requests()),
                    );
                    line("rejected_connections", &0);
                    line("expired_keys", &0);
                    line("evicted_keys", &0);
                    if core.forward.enabled {
                        let f = &core.forward.stats;
                        line("forwarded_writes", &f.forwarded);
                        line("forwarded_writes_in_flight", &core.forward.in_flight());
                        line("forwarded_writes_refused", &f.refused);
                        line("forwarded_writes_outcome_unknown", &f.outcome_unknown);
                        line("forwarded_writes_ryw_timeouts", &f.ryw_timeouts);
                    }
                }
                "replication" => {
                    if let Some((epoch, leader, sync_set)) = &core.replication.failover {
                        line("failover_epoch", epoch);
                        line("failover_leader", leader);
                        line("failover_sync_set", sync_set);
                    }
                    match &core.mode {
                        Mode::Master => {
                            let slaves: Vec<_> = core
                                .replication
                                .slaves
                                .iter()
                                .filter(|s| s.state != "evicted")
                                .collect();
                            line("role", &"master");
                            line("connected_slaves", &slaves.len());
                            for (i, slave) in slaves.iter().enumerate() {
                                let (ip, port) = split_addr(&slave.addr);
                                let state = match slave.state {
                                    "in-sync" => "online",
                                    _ => "send_bulk",
                                };
                                line(
                                    &format!("slave{i}"),
                                    &format!(
                                        "ip={ip},port={port},state={state},offset={},lag={}",
                                        slave.applied_seq, slave.lag
                                    ),
                                );
                            }
                            line("master_repl_offset", &core.commit_seq);
                        }
                        Mode::Slave { master } => {
                            let (host, port) = split_addr(master.as_deref().unwrap_or(""));
                            let up = core.replication.master_link_up;
                            line("role", &"slave");
                            line("master_host", &host);
                            line("master_port", &port);
                            line("master_link_status", &if up { "up" } else { "down" });
                            line("slave_repl_offset", &core.commit_seq);
                            line("slave_read_only", &1);
                            line("connected_slaves", &0);
                            line("master_repl_offset", &core.commit_seq);
                        }
                    }
                }
                // As DBSIZE: keys past their deadline do not count.
                "keyspace" if core.store.live_len() > 0 => {
                    line(
                        "db0",
                        &format!(
                            "keys={},expires={},avg_ttl=0",
                            core.store.live_len(),
                            core.store.expiring()
                        ),
                    );
                }
                _ => {}
            }
        }
        text
    }
}

/// How SET-like commands condition their write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetMode {
    Always,
    IfAbsent,
    IfPresent,
}

/// The deadline a SET leaves its key with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// None: a SET clears any deadline (as in Redis).
    None,
    /// This deadline, unix ms (EX, PX, EXAT, PXAT).
    At(u64),
    /// The key's current one (KEEPTTL).
    Keep,
}

/// How SET-like commands answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetReply {
    /// OK, or null when the condition failed (SET).
    OkOrNull,
    /// The old value or null (SET ... GET, GETSET).
    Old,
    /// 1 if written, else 0 (SETNX).
    OneZero,
}

/// `host:port` split at the last colon.
fn split_addr(addr: &str) -> (&str, &str) {
    addr.rsplit_once(':').unwrap_or((addr, ""))
}

fn human_bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2}G", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2}M", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.2}K", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}

/// Resident memory from /proc (Linux); `None` elsewhere.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_is_found_in_any_case_and_nothing_else_is() {
        for spec in COMMANDS {
            let upper = spec.name.to_ascii_uppercase();
            let mixed: String = spec
                .name
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            for name in [spec.name, upper.as_str(), mixed.as_str()] {
                assert_eq!(lookup(name.as_bytes()).map(|s| s.name), Some(spec.name));
            }
            // One byte more, one less, or one changed names nothing (or another command).
            let longer = format!("{}x", spec.name);
            assert_ne!(lookup(longer.as_bytes()).map(|s| s.name), Some(spec.name));
            let shorter = &spec.name[..spec.name.len() - 1];
            assert_ne!(lookup(shorter.as_bytes()).map(|s| s.name), Some(spec.name));
        }
        assert!(lookup(b"").is_none());
        assert!(lookup(b"g\x05t").is_none());
        assert!(lookup(b"nosuchcommandatall").is_none());
    }
}
