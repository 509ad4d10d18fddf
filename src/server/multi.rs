//! RESP `WATCH`, `MULTI`, `EXEC`, `DISCARD`, `UNWATCH`, mapped onto dkvs's
//! multi-key transaction: the watched keys are version conditions the master
//! checks at EXEC against settled state, and the queued commands' writes all
//! join one batch, so they commit as one replicated 2PC transaction, on every
//! in-sync slave, or not at all.
//!
//! EXEC first checks that no key a queued command names (nor a watched key)
//! has a write still undecided, and waits until none has. Nothing else runs
//! between that check and the queued commands (one thread), so each command
//! computes against the store plus the writes of the commands before it in
//! the same EXEC ([`ExecView`]), exactly as Redis runs them back to back:
//! reads (GET, STRLEN, TYPE, TTL, KEYS, SCAN, DBSIZE, ...) see those writes,
//! and EXPIRE, PERSIST, GETEX or SET KEEPTTL of a key SET before them work.

use std::collections::VecDeque;
use std::time::Instant;

use crate::protocol::resp::Encoder;
use crate::replication::ClientRef;

use super::exec_view::ExecView;
use super::forward::Origin;
use super::handler::{Core, ReplyTarget, Settled};
use super::resp::{Exec, Session, Spec, lookup};

/// Commands one MULTI may queue; more fail the EXEC (as an error reply would).
pub const MAX_QUEUED_COMMANDS: usize = 1024;
/// Bytes of arguments one MULTI may queue.
pub const MAX_QUEUED_BYTES: usize = 16 << 20;

/// A connection's WATCH and MULTI state.
#[derive(Debug, Default)]
pub struct MultiState {
    /// Watched keys with the version they had (`None`: absent).
    watched: Vec<(Vec<u8>, Option<u64>)>,
    /// Commands queued since MULTI (`None`: not in MULTI).
    queued: Option<Vec<Vec<Vec<u8>>>>,
    queued_bytes: usize,
    /// A queued command was refused: EXEC answers EXECABORT.
    refused: bool,
}

/// What the connection does with a command after [`intercept`].
pub enum Intercept {
    /// Not a transaction command, and no MULTI is open: run it as usual.
    Run,
    /// Answered (queued, or a transaction command answered).
    Answered,
    /// A key it needs has a write undecided: run it again later.
    WaitKey,
}

/// One reply of EXEC's array, in order.
enum Slot {
    Ready(Vec<u8>),
    Pending(ClientRef),
}

/// Everything a transaction command runs with: the connection's parts.
pub struct Conn<'a> {
    /// The shared state.
    pub core: &'a mut Core,
    /// The connection's RESP version.
    pub enc: &'a mut Encoder,
    /// CLIENT SETNAME.
    pub name: &'a mut Option<Vec<u8>>,
    /// CLIENT ID.
    pub id: u64,
    /// Where the writes' replies go.
    pub target: ReplyTarget,
    /// The connection's replies still owed, in order.
    pub pending: &'a mut VecDeque<(ClientRef, Option<Vec<u8>>)>,
    /// The connection's output.
    pub output: &'a mut Vec<u8>,
}

impl Conn<'_> {
    /// Send a reply in order: at once if nothing is owed before it, else queued.
    fn reply(&mut self, slot: Slot) {
        match slot {
            Slot::Ready(bytes) if self.pending.is_empty() => self.output.extend_from_slice(&bytes),
            Slot::Ready(bytes) => self.pending.push_back((ClientRef(0), Some(bytes))),
            Slot::Pending(client) => self.pending.push_back((client, None)),
        }
    }

    fn answer(&mut self, write: impl FnOnce(&Encoder, &mut Vec<u8>)) {
        let mut bytes = Vec::new();
        write(self.enc, &mut bytes);
        self.reply(Slot::Ready(bytes));
    }

    fn error(&mut self, text: &str) {
        self.answer(|enc, out| enc.error(out, text));
    }
}

/// Handle `args` if it is a transaction command or MULTI is open.
pub fn intercept(
    state: &mut MultiState,
    conn: &mut Conn<'_>,
    args: &[&[u8]],
    spec: Option<&'static Spec>,
) -> Intercept {
    let in_multi = state.queued.is_some();
    // Every command passes here. The lookup already matched its name without
    // regard to case, and MULTI's own commands all have a spec: the spec's
    // lower-case name is all there is to match (an unknown command is none).
    let name = spec.map_or("", |s| s.name);
    match name {
        "multi" if args.len() != 1 => {
            conn.error("ERR wrong number of arguments for 'multi' command")
        }
        "multi" if in_multi => conn.error("ERR MULTI calls can not be nested"),
        "multi" => {
            state.queued = Some(Vec::new());
            state.queued_bytes = 0;
            state.refused = false;
            conn.answer(|enc, out| enc.ok(out));
        }
        "discard" if !in_multi => conn.error("ERR DISCARD without MULTI"),
        "discard" => {
            *state = MultiState::default();
            conn.answer(|enc, out| enc.ok(out));
        }
        "exec" if !in_multi => conn.error("ERR EXEC without MULTI"),
        "exec" => return exec(state, conn),
        "watch" if in_multi => conn.error("ERR WATCH inside MULTI is not allowed"),
        "watch" if args.len() < 2 => {
            conn.error("ERR wrong number of arguments for 'watch' command")
        }
        "watch" => {
            // A version read while a write of the key is undecided would be stale.
            if args[1..]
                .iter()
                .any(|k| conn.core.settled_version(k) == Settled::Undecided)
            {
                return Intercept::WaitKey;
            }
            for key in &args[1..] {
                if let Settled::Version(version) = conn.core.settled_version(key) {
                    state.watched.push((key.to_vec(), version));
                }
            }
            conn.answer(|enc, out| enc.ok(out));
        }
        "unwatch" => {
            state.watched.clear();
            conn.answer(|enc, out| enc.ok(out));
        }
        _ if in_multi => queue(state, conn, args, spec),
        _ => return Intercept::Run,
    }
    Intercept::Answered
}

/// Queue a command inside MULTI, or refuse it (and so the EXEC) as Redis does.
fn queue(state: &mut MultiState, conn: &mut Conn<'_>, args: &[&[u8]], spec: Option<&Spec>) {
    let Some(spec) = spec else {
        state.refused = true;
        let name = String::from_utf8_lossy(&args[0][..args[0].len().min(128)]).into_owned();
        conn.error(&format!(
            "ERR unknown command '{name}', with args beginning with: "
        ));
        return;
    };
    let n = args.len() as i64;
    if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
        state.refused = true;
        conn.error(&format!(
            "ERR wrong number of arguments for '{}' command",
            spec.name
        ));
        return;
    }
    let bytes: usize = args.iter().map(|a| a.len()).sum();
    let Some(queued) = state.queued.as_mut() else {
        return;
    };
    if queued.len() >= MAX_QUEUED_COMMANDS || state.queued_bytes + bytes > MAX_QUEUED_BYTES {
        state.refused = true;
        conn.error(&format!(
            "ERR dkvs: a MULTI holds at most {MAX_QUEUED_COMMANDS} commands and \
             {MAX_QUEUED_BYTES} bytes of arguments"
        ));
        return;
    }
    state.queued_bytes += bytes;
    queued.push(args.iter().map(|a| a.to_vec()).collect());
    conn.answer(|enc, out| enc.simple(out, "QUEUED"));
}

/// The keys a command names, by its COMMAND key specification.
fn keys_of<'a>(spec: &Spec, args: &'a [Vec<u8>]) -> impl Iterator<Item = &'a [u8]> {
    let (first, last, step) = spec.keys;
    let n = args.len() as i64;
    let last = if last < 0 { n + last } else { last };
    let step = step.max(1) as usize;
    // No keys (0 0 0) or a count the arguments do not reach: an empty range.
    let (from, to) = if first > 0 && first <= last && last < n {
        (first as usize, last as usize + 1)
    } else {
        (0, 0)
    };
    (from..to).step_by(step).map(move |i| args[i].as_slice())
}

/// EXEC: check the watched versions, then run the queued commands into one batch.
fn exec(state: &mut MultiState, conn: &mut Conn<'_>) -> Intercept {
    if state.refused {
        *state = MultiState::default();
        conn.error("EXECABORT Transaction discarded because of previous errors.");
        return Intercept::Answered;
    }
    if conn.core.forwards_writes()
        && state
            .queued
            .iter()
            .flatten()
            .any(|args| lookup(&args[0]).is_some_and(|spec| spec.is_write()))
    {
        return forward_exec(state, conn);
    }
    let queued = state.queued.as_deref().unwrap_or_default();
    // Everything the transaction reads must be settled first (then nothing can
    // change it before the commands below have run).
    let touched = queued.iter().flat_map(|args| {
        let spec = lookup(&args[0]);
        spec.into_iter().flat_map(move |spec| keys_of(spec, args))
    });
    let watched = state.watched.iter().map(|(k, _)| k.as_slice());
    for key in touched.chain(watched) {
        if conn.core.settled_version(key) == Settled::Undecided {
            return Intercept::WaitKey;
        }
    }
    let changed = state
        .watched
        .iter()
        .any(|(key, version)| conn.core.settled_version(key) != Settled::Version(*version));
    let queued = std::mem::take(state).queued.unwrap_or_default();
    if changed {
        conn.answer(|enc, out| enc.null_array(out));
        return Intercept::Answered;
    }
    let mark = conn.core.batch_mark();
    let mut view = ExecView::new(conn.core.batch.len());
    let mut slots = Vec::with_capacity(queued.len());
    for args in &queued {
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        let exec = match lookup(args[0]) {
            Some(spec) => {
                let mut session = Session {
                    core: conn.core,
                    enc: conn.enc,
                    name: conn.name,
                    id: conn.id,
                    target: conn.target,
                    out: &mut out,
                    exec: Some(&view),
                    // Queued commands passed the AUTH check: the connection is authenticated.
                    authenticated: &mut true,
                };
                session.run(spec, &args)
            }
            None => Exec::Done,
        };
        conn.core.resp_commands += 1;
        // The next command sees this one's writes.
        view.fold(conn.core);
        match exec {
            Exec::Done | Exec::Close => slots.push(Slot::Ready(out)),
            Exec::Pending(client) => slots.push(Slot::Pending(client)),
            Exec::WaitKey => {
                // A command needs a key an earlier one of this EXEC changed in a
                // way only its commit decides (e.g. EXPIRE, then GETEX): undo the
                // writes queued so far rather than commit part of the transaction.
                conn.core.rollback(mark);
                conn.error(
                    "ERR dkvs: this transaction cannot run atomically: a command \
                     depends on an undecided change an earlier command of it made; \
                     nothing was written",
                );
                return Intercept::Answered;
            }
        }
    }
    conn.answer(|enc, out| enc.array(out, slots.len()));
    for slot in slots {
        conn.reply(slot);
    }
    Intercept::Answered
}

/// EXEC at a slave with `--forward-writes` whose queue holds a write: the
/// whole transaction (MULTI, the queued commands, EXEC) goes to the master as
/// one forwarded command, and the client gets the master's EXEC reply.
fn forward_exec(state: &mut MultiState, conn: &mut Conn<'_>) -> Intercept {
    let watched = !state.watched.is_empty();
    let queued = std::mem::take(state).queued.unwrap_or_default();
    if watched {
        // The versions WATCH read here may trail the master's: the master could
        // not check them, and a WATCH sent with the EXEC would guard nothing.
        conn.error(
            "ERR dkvs: a slave cannot forward a WATCHed transaction to its master \
             (it would not be guarded); send WATCH ... EXEC to the master",
        );
        return Intercept::Answered;
    }
    // HELLO, AUTH, CLIENT, SELECT, ... would run on the master against the
    // link every client's writes share (HELLO 3 would change its protocol).
    let stateful = queued.iter().find_map(|args| {
        lookup(&args[0])
            .filter(|spec| !spec.forwardable_in_exec())
            .map(|spec| spec.name)
    });
    if let Some(name) = stateful {
        conn.error(&format!(
            "ERR dkvs: a slave forwards a transaction with writes to its master only if \
             every queued command reads or writes data ('{name}' does not); nothing was written"
        ));
        return Intercept::Answered;
    }
    let ReplyTarget::Tcp { key, conn_id } = conn.target else {
        conn.error("ERR dkvs: only a TCP connection forwards writes");
        return Intercept::Answered;
    };
    let client = conn.core.new_client_ref();
    let origin = Origin {
        key,
        conn_id,
        client,
        encoder: *conn.enc,
    };
    match conn
        .core
        .forward
        .enqueue_block(origin, &queued, Instant::now())
    {
        Ok(()) => conn.reply(Slot::Pending(client)),
        Err(text) => conn.error(&text),
    }
    Intercept::Answered
}
