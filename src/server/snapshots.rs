//! Snapshots streamed to slaves, shared between receivers and capped in memory.
//!
//! A snapshot is the store as of one commit sequence number, `at_seq`, owned
//! here; each replication link receiving it is a reader holding a cursor (the
//! next shard to send). A shard is sent from the copy kept of it if there is
//! one, or else encoded from the store itself, which is unchanged since
//! `at_seq` but for the keys written since, whose entries as of `at_seq`
//! (before-images) are kept: every write first calls
//! [`SnapshotSet::before_key_write`], which keeps the key's image for every
//! snapshot whose readers still need its shard. Once more than a quarter of
//! a shard's keys were written it is copied whole instead (copy-on-write at
//! shard granularity, as `store::snapshot::ShardCopy` does for one reader),
//! so images never hold much more than copies would, and a write costs a
//! key's image, plus at most a few entries' share of a copy: one batch of
//! writes spread over the store no longer copies a shard per key in one turn
//! (354 shards, 20 ms of CPU, at a million keys with 50 clients pipelining 16).
//!
//! Sharing. A receiver that needs a snapshot while one is streaming joins it,
//! from the first shard, if that snapshot is still *open* and the commit log
//! still holds every commit after its `at_seq` (the joiner catches up from
//! there, as the first receiver does). An open snapshot keeps a copy of every
//! shard written since it began, those its readers have already passed
//! included, so that a joiner finds the whole store as of `at_seq`. It closes
//! when its first reader has been sent all of it (a later joiner would need a
//! whole stream's worth more of the log, which the log pin is not sized for),
//! when the log no longer covers it, or at the memory cap; from then on a
//! shard every reader has passed is freed and no longer copied, and a new
//! receiver starts a new snapshot at the current seq (which later receivers
//! join in turn). This was chosen over making late receivers wait for the
//! next snapshot: waiting needs a state in the coordinator in which a slave
//! is neither streamed to nor stalled, and delays it by a whole stream; the
//! price is that an open snapshot keeps passed shards, which costs about what
//! one receiver's copy costs under writes spread over the store (nearly every
//! shard is written, and so copied, early in a long stream either way).
//!
//! The cap. The bytes held (shard copies and each reader's staged chunk) are
//! counted; when copying a shard takes them past the cap, open snapshots are
//! closed first (freeing the shards every reader passed), and then the
//! slowest reader of the snapshot holding the most is dropped, until they fit.
//! The reactor closes the dropped readers' links (logged); their slaves
//! register again after their reconnect backoff and get a new snapshot. A
//! write is never refused or delayed by the cap: the copy its shard needs is
//! made first, and the memory comes back by dropping a receiver at once (its
//! link is closed by the reactor right after). Chunks are staged unchecked
//! (each at most `max` bytes and a shard), so the bytes held pass the cap by
//! at most one shard's copy and one staged chunk.
//!
//! Release. Copies no snapshot needs any more (a snapshot sent or dropped, a
//! shard every reader passed) are not freed where they are let go: they join
//! a queue, and the reactor frees [`SnapshotSet::release_some`]'s budget of
//! it per turn. Each is handed back to the system as it is freed (its whole
//! pages are `madvise`d away first, see [`give_back`]), so the master's RSS
//! falls by what the copies held without `malloc_trim`, whose walk of the
//! whole heap took 8 to 11 ms of one turn at a million keys. The cost is the pages
//! released, about 0.3 µs each: the budget bounds the turn. A shard's key
//! images (at most about a quarter of its copy) go the same way; those under
//! a page only back to the allocator.

use crate::store::snapshot::{KeyImages, decode_entry, encode_shard, encoded_shard_len};
use crate::store::{SHARDS, Store};

/// A reader's name: the replication link's `PeerId` number.
pub type ReaderId = u64;

/// What STATS shows of the snapshots being streamed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotCounters {
    /// Bytes held now: shard copies plus readers' staged chunks.
    pub held_bytes: usize,
    /// The cap on `held_bytes` (`--max-snapshot-memory-mb`).
    pub max_bytes: usize,
    /// Snapshots streaming now.
    pub streaming: usize,
    /// Links receiving one now.
    pub readers: usize,
    /// Receivers that joined a snapshot already streaming, since start.
    pub joins: u64,
    /// Receivers dropped at the cap, since start.
    pub cap_evictions: u64,
}

/// A reader dropped at the memory cap, for the reactor to close its link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    /// The link.
    pub reader: ReaderId,
    /// The log line's detail: what was held, and where the reader stood.
    pub reason: String,
}

/// Every snapshot being streamed, and the cap on what they hold.
#[derive(Debug)]
pub struct SnapshotSet {
    snapshots: Vec<Shared>,
    max_bytes: usize,
    evicted: Vec<Evicted>,
    joins: u64,
    cap_evictions: u64,
    /// Copies let go and not yet freed.
    releasing: Releasing,
}

/// Buffers no snapshot needs any more, freed a budget at a time.
#[derive(Debug, Default)]
struct Releasing {
    buffers: Vec<Vec<u8>>,
    /// Their capacity, in bytes.
    bytes: usize,
}

impl Releasing {
    fn push(&mut self, buffer: Vec<u8>) {
        if buffer.capacity() > 0 {
            self.bytes += buffer.capacity();
            self.buffers.push(buffer);
        }
    }

    /// Free buffers until about `budget` bytes were (at least one if any is
    /// queued); returns the bytes freed.
    fn free(&mut self, budget: usize) -> usize {
        let mut freed = 0;
        while freed < budget.max(1) {
            let Some(mut buffer) = self.buffers.pop() else {
                break;
            };
            freed += buffer.capacity();
            give_back(&mut buffer);
        }
        self.bytes -= freed;
        freed
    }
}

/// Free `buffer`, first releasing the whole pages inside it to the system.
///
/// glibc's malloc keeps a freed chunk of tens of KiB (a shard's copy at a
/// million keys) in its heap, its pages resident, until `malloc_trim`; telling
/// the kernel the pages are not needed before the free returns them at a cost
/// in proportion to them alone. The allocator writes its bookkeeping at the
/// chunk's edges, outside the whole pages, or faults a page back in if not.
fn give_back(buffer: &mut Vec<u8>) {
    release_pages(buffer);
    drop(std::mem::take(buffer));
}

/// Hand the whole pages inside `buffer`'s allocation (its capacity) back to
/// the system: they read as zeros afterwards, and are resident again only
/// once written.
fn release_pages(buffer: &mut Vec<u8>) {
    #[cfg(target_os = "linux")]
    {
        let page = page_size();
        let start = buffer.as_mut_ptr() as usize;
        let end = start + buffer.capacity();
        if page.is_power_of_two() {
            let first = start.next_multiple_of(page);
            let last = end & !(page - 1);
            if last > first {
                // SAFETY: [first, last) lies inside the allocation `buffer`
                // owns, borrowed mutably; MADV_DONTNEED on private anonymous
                // memory (what the heap is) only makes those bytes read as
                // zero, as if written, initialised or not.
                unsafe {
                    libc::madvise(
                        first as *mut libc::c_void,
                        last - first,
                        libc::MADV_DONTNEED,
                    );
                }
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buffer;
}

/// The system's page size, or 0 if it cannot tell (then nothing is released).
#[cfg(target_os = "linux")]
fn page_size() -> usize {
    // SAFETY: sysconf has no precondition.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0)
}

/// What a snapshot keeps of one shard, so that it can send it as of `at_seq`.
#[derive(Debug, Default)]
enum Kept {
    /// Unchanged since `at_seq`: encoded from the store when sent.
    #[default]
    Nothing,
    /// The keys written since `at_seq` and what they were then; the rest
    /// of the shard is unchanged in the store.
    Keys(KeyImages),
    /// The whole shard as of `at_seq`, encoded, with its entry count.
    Copy(Vec<u8>, u64),
}

impl Kept {
    /// Append `shard`, which this is kept of, as of `at_seq` to `out`;
    /// returns its entries.
    fn encode(&self, store: &Store, shard: usize, out: &mut Vec<u8>) -> u64 {
        match self {
            Kept::Nothing => encode_shard(store, shard, out),
            Kept::Keys(images) => images.encode(store, shard, out),
            Kept::Copy(bytes, entries) => {
                out.extend_from_slice(bytes);
                *entries
            }
        }
    }

    fn held_bytes(&self) -> usize {
        match self {
            Kept::Nothing => 0,
            Kept::Keys(images) => images.held_bytes(),
            Kept::Copy(bytes, _) => bytes.capacity(),
        }
    }

    fn let_go(self, releasing: &mut Releasing) {
        match self {
            Kept::Nothing => {}
            Kept::Keys(images) => {
                for buffer in images.into_buffers() {
                    releasing.push(buffer);
                }
            }
            Kept::Copy(bytes, _) => releasing.push(bytes),
        }
    }
}

/// One snapshot and its readers.
#[derive(Debug)]
struct Shared {
    at_seq: u64,
    /// What is kept of each shard written since `at_seq`.
    kept: Vec<Kept>,
    /// Bytes `kept` holds (capacities).
    copied_bytes: usize,
    readers: Vec<Reader>,
    /// Takes joiners, and so keeps every shard written since `at_seq`.
    open: bool,
    /// The smallest reader cursor: shards below it are needed by no reader.
    low: usize,
}

/// A link's place in a snapshot.
#[derive(Debug)]
struct Reader {
    id: ReaderId,
    /// The next shard to stage.
    cursor: usize,
    /// Staged entries not yet taken, encoded with `encode_entry`.
    staged: Vec<u8>,
    taken: usize,
    /// Entries staged so far.
    entries: u64,
}

impl Reader {
    fn pending(&self) -> usize {
        self.staged.len() - self.taken
    }
}

impl Shared {
    fn new(at_seq: u64) -> Shared {
        Shared {
            at_seq,
            kept: (0..SHARDS).map(|_| Kept::Nothing).collect(),
            copied_bytes: 0,
            readers: Vec::new(),
            open: true,
            low: 0,
        }
    }

    fn held_bytes(&self) -> usize {
        self.copied_bytes
            + self
                .readers
                .iter()
                .map(|r| r.staged.capacity())
                .sum::<usize>()
    }

    /// Whether a write to `shard` must be preceded by keeping what it changes.
    fn needs_keeping(&self, shard: usize) -> bool {
        !matches!(self.kept[shard], Kept::Copy(..)) && (self.open || shard >= self.low)
    }

    /// `key` is about to change: keep its before-image, or the whole shard
    /// once a quarter of its keys were written ([`KeyImages::too_many`]).
    fn keep_key(&mut self, store: &Store, key: &[u8], hash: u64, releasing: &mut Releasing) {
        let shard = store.shard_of_hash(hash);
        let before = self.kept[shard].held_bytes();
        let images = match &mut self.kept[shard] {
            Kept::Copy(..) => return,
            Kept::Keys(images) => images,
            slot @ Kept::Nothing => {
                *slot = Kept::Keys(KeyImages::default());
                let Kept::Keys(images) = slot else {
                    unreachable!("just set")
                };
                images
            }
        };
        images.record(store, key, hash);
        let after = images.held_bytes();
        self.copied_bytes = self.copied_bytes - before + after;
        if images.too_many(store, shard) {
            self.copy(store, shard, releasing);
        }
    }

    /// Keep the whole of `shard` as of `at_seq` (before a clear, or once
    /// many of its keys were written).
    fn copy(&mut self, store: &Store, shard: usize, releasing: &mut Releasing) {
        if matches!(self.kept[shard], Kept::Copy(..)) {
            return;
        }
        let old = std::mem::take(&mut self.kept[shard]);
        self.copied_bytes -= old.held_bytes();
        // Allocated at its size: counted exactly (what dropping it gives
        // back), and encoded without growing.
        let (bytes, entries) = match &old {
            Kept::Copy(..) => unreachable!("returned above"),
            Kept::Nothing => {
                let mut bytes = Vec::with_capacity(encoded_shard_len(store, shard));
                let entries = encode_shard(store, shard, &mut bytes);
                (bytes, entries)
            }
            Kept::Keys(images) => {
                let mut bytes = Vec::with_capacity(images.encoded_len(store, shard));
                let entries = images.encode(store, shard, &mut bytes);
                (bytes, entries)
            }
        };
        debug_assert_eq!(bytes.len(), bytes.capacity());
        old.let_go(releasing);
        self.copied_bytes += bytes.capacity();
        self.kept[shard] = Kept::Copy(bytes, entries);
    }

    /// Let go of what is kept of the shards in `range`.
    fn let_go(&mut self, range: std::ops::Range<usize>, releasing: &mut Releasing) {
        for slot in &mut self.kept[range] {
            let old = std::mem::take(slot);
            self.copied_bytes -= old.held_bytes();
            old.let_go(releasing);
        }
    }

    /// Recompute the lowest cursor and free the copies no reader needs any
    /// more (an open snapshot keeps them for joiners).
    fn release(&mut self, releasing: &mut Releasing) {
        let low = self
            .readers
            .iter()
            .map(|r| r.cursor)
            .min()
            .unwrap_or(SHARDS);
        debug_assert!(self.open || low >= self.low, "cursors only move on");
        if self.open {
            self.low = low;
            return;
        }
        self.let_go(self.low.min(low)..low, releasing);
        self.low = low;
    }

    /// Let go of every copy and staged chunk (the snapshot is dropped).
    fn release_all(self, releasing: &mut Releasing) {
        for kept in self.kept {
            kept.let_go(releasing);
        }
        for r in self.readers {
            releasing.push(r.staged);
        }
    }

    fn close(&mut self, releasing: &mut Releasing) {
        self.open = false;
        // Everything below `low` was kept for joiners only.
        self.let_go(0..self.low, releasing);
    }
}

impl SnapshotSet {
    /// No snapshot yet; the copies may hold `max_bytes` together.
    pub fn new(max_bytes: usize) -> SnapshotSet {
        SnapshotSet {
            snapshots: Vec::new(),
            max_bytes,
            evicted: Vec::new(),
            joins: 0,
            cap_evictions: 0,
            releasing: Releasing::default(),
        }
    }

    /// Start streaming to `reader` a snapshot of the store as it is now, at
    /// `at_seq`, or join it to an open one at an older seq that the commit log
    /// still covers (`log_floor`: the log holds every commit after it).
    /// Returns the snapshot's seq, which the link's chunks carry.
    pub fn start(&mut self, reader: ReaderId, at_seq: u64, log_floor: u64) -> u64 {
        self.remove(reader);
        for s in &mut self.snapshots {
            if s.open && s.at_seq < log_floor {
                // Nobody can join it any more: stop keeping what only joiners need.
                s.close(&mut self.releasing);
            }
        }
        let fresh = Reader {
            id: reader,
            cursor: 0,
            staged: Vec::new(),
            taken: 0,
            entries: 0,
        };
        let joinable = self
            .snapshots
            .iter_mut()
            .filter(|s| s.open && s.at_seq <= at_seq)
            .max_by_key(|s| s.at_seq);
        if let Some(s) = joinable {
            s.readers.push(fresh);
            s.release(&mut self.releasing);
            self.joins += 1;
            return s.at_seq;
        }
        let mut s = Shared::new(at_seq);
        s.readers.push(fresh);
        self.snapshots.push(s);
        at_seq
    }

    /// Forget `reader` (its snapshot was sent, or its link is gone); a
    /// snapshot without readers is dropped with its copies.
    pub fn remove(&mut self, reader: ReaderId) {
        for s in &mut self.snapshots {
            if let Some(i) = s.readers.iter().position(|r| r.id == reader) {
                let gone = s.readers.remove(i);
                self.releasing.push(gone.staged);
                s.release(&mut self.releasing);
            }
        }
        let (kept, dropped) = std::mem::take(&mut self.snapshots)
            .into_iter()
            .partition(|s| !s.readers.is_empty());
        self.snapshots = kept;
        for s in dropped {
            s.release_all(&mut self.releasing);
        }
    }

    /// Free about `budget` bytes of the copies let go (at least one copy if
    /// any is waiting), giving their pages back to the system; returns the
    /// bytes freed. The reactor calls it once per turn, so that freeing a
    /// whole snapshot's copies is spread over turns.
    pub fn release_some(&mut self, budget: usize) -> usize {
        self.releasing.free(budget)
    }

    /// Bytes of copies let go and not yet freed (not counted in
    /// [`SnapshotSet::held_bytes`] or against the cap: they are on their way out).
    pub fn releasing_bytes(&self) -> usize {
        self.releasing.bytes
    }

    /// `key` is about to change in `store`: keep it as it is for every
    /// snapshot that still needs it (the reactor, which has the key's hash,
    /// calls [`SnapshotSet::before_key_write`]).
    #[cfg(test)]
    pub fn before_write(&mut self, store: &Store, key: &[u8]) {
        self.before_key_write(store, key, store.key_hash(key));
    }

    /// `key`, whose [`Store::key_hash`] is `hash`, is about to change: keep
    /// its entry as it is now for every snapshot that still needs its shard
    /// as of the snapshot's start (a before-image of the key, or a copy of
    /// the whole shard once a quarter of its keys were written). The cost is
    /// the key's, not its shard's: a batch spread over the store copies few
    /// shards in one turn.
    pub fn before_key_write(&mut self, store: &Store, key: &[u8], hash: u64) {
        if self.snapshots.is_empty() {
            return;
        }
        let shard = store.shard_of_hash(hash);
        let mut kept = false;
        for s in &mut self.snapshots {
            if s.needs_keeping(shard) {
                s.keep_key(store, key, hash, &mut self.releasing);
                kept = true;
            }
        }
        if kept {
            self.enforce_cap();
        }
    }

    /// The whole store is about to be cleared: copy every shard still needed.
    pub fn before_clear(&mut self, store: &Store) {
        for s in &mut self.snapshots {
            for shard in 0..SHARDS {
                if s.needs_keeping(shard) {
                    s.copy(store, shard, &mut self.releasing);
                }
            }
        }
        self.enforce_cap();
    }

    /// The next chunk for `reader`: whole entries, about `max` bytes of them
    /// (at least one if any is left), handed to `emit` as (snapshot seq, last,
    /// entry count, the entries in `store::snapshot`'s encoding), `last` set on
    /// the final one, after which the reader is forgotten. Returns `emit`'s
    /// result, or `None` if it is not reading a snapshot (never started, or
    /// dropped at the cap).
    pub fn next_chunk_with<T>(
        &mut self,
        reader: ReaderId,
        store: &Store,
        max: usize,
        emit: impl FnOnce(u64, bool, u32, &[u8]) -> T,
    ) -> Option<T> {
        let index = self
            .snapshots
            .iter()
            .position(|s| s.readers.iter().any(|r| r.id == reader))?;
        let s = &mut self.snapshots[index];
        let at_seq = s.at_seq;
        let r = s.readers.iter_mut().find(|r| r.id == reader)?;
        let moved = r.pending() < max && r.cursor < SHARDS;
        while r.pending() < max && r.cursor < SHARDS {
            r.entries += s.kept[r.cursor].encode(store, r.cursor, &mut r.staged);
            r.cursor += 1;
        }
        // Whole entries up to about `max` bytes: only their lengths are read.
        let start = r.taken;
        let mut end = start;
        let mut count = 0u32;
        while let Some((_, used)) = decode_entry(&r.staged[end..]) {
            if end > start && end - start >= max {
                break;
            }
            end += used;
            count += 1;
        }
        r.taken = end;
        let last = r.cursor == SHARDS && r.pending() == 0;
        let result = emit(at_seq, last, count, &r.staged[start..end]);
        // Forget taken bytes once they are the larger part (amortised O(1) moves).
        if 2 * r.taken >= r.staged.len() {
            r.staged.drain(..r.taken);
            r.taken = 0;
        }
        if last {
            // The first reader done closes the snapshot to joiners.
            s.close(&mut self.releasing);
            self.remove(reader);
        } else if moved {
            s.release(&mut self.releasing);
        }
        Some(result)
    }

    /// [`SnapshotSet::next_chunk_with`] as a decoded message, for tests.
    #[cfg(test)]
    pub fn next_chunk(
        &mut self,
        reader: ReaderId,
        store: &Store,
        max: usize,
    ) -> Option<crate::protocol::peer::PeerMessage> {
        use crate::protocol::peer::{PeerMessage, SnapshotEntry};
        self.next_chunk_with(reader, store, max, |snapshot_seq, last, _, bytes| {
            let mut entries = Vec::new();
            let mut at = 0;
            while let Some((e, used)) = decode_entry(&bytes[at..]) {
                entries.push(SnapshotEntry {
                    key: e.key.to_vec(),
                    value: e.value.to_vec(),
                    version: e.version,
                    deadline_ms: e.deadline_ms,
                });
                at += used;
            }
            PeerMessage::SnapshotChunk {
                snapshot_seq,
                entries,
                last,
            }
        })
    }

    /// The snapshot `reader` receives: its seq and the thousandths of its
    /// shards staged so far (shards hold about equal parts of the keys).
    pub fn progress(&self, reader: ReaderId) -> Option<(u64, u64)> {
        self.snapshots.iter().find_map(|s| {
            let r = s.readers.iter().find(|r| r.id == reader)?;
            Some((s.at_seq, (r.cursor * 1000 / SHARDS) as u64))
        })
    }

    /// Entries staged for `reader` so far and the bytes its snapshot holds,
    /// for the log line of a link dropped while receiving.
    pub fn summary(&self, reader: ReaderId) -> Option<(u64, usize)> {
        self.snapshots.iter().find_map(|s| {
            let r = s.readers.iter().find(|r| r.id == reader)?;
            Some((r.entries, s.held_bytes()))
        })
    }

    /// Readers dropped at the cap since the last call.
    pub fn take_evicted(&mut self) -> Vec<Evicted> {
        std::mem::take(&mut self.evicted)
    }

    /// Bytes held by every snapshot together.
    pub fn held_bytes(&self) -> usize {
        self.snapshots.iter().map(Shared::held_bytes).sum()
    }

    /// What STATS shows.
    pub fn counters(&self) -> SnapshotCounters {
        SnapshotCounters {
            held_bytes: self.held_bytes(),
            max_bytes: self.max_bytes,
            streaming: self.snapshots.len(),
            readers: self.snapshots.iter().map(|s| s.readers.len()).sum(),
            joins: self.joins,
            cap_evictions: self.cap_evictions,
        }
    }

    /// Bring the bytes held under the cap: close open snapshots, then drop
    /// the slowest reader of the snapshot holding the most, until they fit.
    fn enforce_cap(&mut self) {
        loop {
            let held = self.held_bytes();
            if held <= self.max_bytes {
                return;
            }
            let biggest = |open_only: bool| {
                self.snapshots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.open || !open_only)
                    .max_by_key(|(_, s)| s.held_bytes())
                    .map(|(i, _)| i)
            };
            if let Some(i) = biggest(true) {
                self.snapshots[i].close(&mut self.releasing);
                continue;
            }
            let Some(i) = biggest(false) else {
                return;
            };
            let s = &self.snapshots[i];
            let Some(slowest) = s.readers.iter().min_by_key(|r| r.cursor) else {
                return;
            };
            let reason = format!(
                "snapshots hold {held} bytes, over the {} of --max-snapshot-memory-mb; this \
                 receiver of the snapshot at seq {} was its slowest ({} of {SHARDS} shards sent, \
                 {} receivers)",
                self.max_bytes,
                s.at_seq,
                slowest.cursor,
                s.readers.len()
            );
            let reader = slowest.id;
            self.remove(reader);
            self.cap_evictions += 1;
            self.evicted.push(Evicted { reader, reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::peer::PeerMessage;
    use crate::store::Write;

    const CHUNK: usize = 64 * 1024;

    fn loaded(keys: u64) -> Store {
        let mut store = Store::new();
        for i in 0..keys {
            store.set(format!("key{i}").as_bytes(), &[b'a'; 100], 1);
        }
        store
    }

    /// A store's entries (key, value, version), sorted.
    type Contents = Vec<(Vec<u8>, Vec<u8>, u64)>;

    fn contents(store: &Store) -> Contents {
        let mut all: Vec<_> = store
            .iter()
            .map(|b| (b.key().to_vec(), b.value().to_vec(), b.version()))
            .collect();
        all.sort();
        all
    }

    /// What a receiver has got so far, and whether its last chunk came.
    #[derive(Default)]
    struct Receiver {
        seen: Store,
        at_seq: Option<u64>,
        done: bool,
    }

    impl Receiver {
        fn pull(&mut self, set: &mut SnapshotSet, id: ReaderId, store: &Store) {
            if self.done {
                return;
            }
            let Some(PeerMessage::SnapshotChunk {
                snapshot_seq,
                entries,
                last,
            }) = set.next_chunk(id, store, CHUNK)
            else {
                panic!("reader {id} is not reading");
            };
            assert_eq!(*self.at_seq.get_or_insert(snapshot_seq), snapshot_seq);
            for e in entries {
                assert!(self.seen.get(&e.key).is_none(), "entry sent twice");
                self.seen.set(&e.key, &e.value, e.version);
            }
            self.done = last;
        }
    }

    /// Overwrite, delete and add keys all over the store, as the reactor
    /// applies commits: `before_write` first.
    fn write_round(set: &mut SnapshotSet, store: &mut Store, round: u64, keys: u64) {
        for j in 0..200u64 {
            let key = format!("key{}", (round * 997 + j * 31) % keys);
            set.before_write(store, key.as_bytes());
            if j % 3 == 0 {
                store.apply(
                    Write::Delete {
                        key: key.as_bytes(),
                    },
                    round + 1,
                );
            } else {
                store.set(key.as_bytes(), b"changed", round + 1);
            }
            let new_key = format!("new{round}-{j}");
            set.before_write(store, new_key.as_bytes());
            store.set(new_key.as_bytes(), b"new", round + 1);
        }
    }

    #[test]
    fn readers_that_join_while_it_streams_share_one_copy_and_get_the_store_as_it_was() {
        let mut store = loaded(20_000);
        let expected = contents(&store);
        let mut set = SnapshotSet::new(usize::MAX);
        assert_eq!(set.start(1, 1, 0), 1);
        let mut receivers: Vec<Receiver> = (0..3).map(|_| Receiver::default()).collect();
        let mut round = 0;
        while !receivers.iter().all(|r| r.done) {
            round += 1;
            if round == 3 {
                // Joins at seq 1, not the seq the store is at now.
                assert_eq!(set.start(2, round, 0), 1, "joins the open snapshot");
                assert_eq!(set.counters().streaming, 1);
            }
            if round == 5 {
                assert_eq!(set.start(3, round, 1), 1, "the log still covers seq 1");
            }
            for (i, r) in receivers.iter_mut().enumerate() {
                let id = i as u64 + 1;
                if id == 1 || (id == 2 && round >= 3) || (id == 3 && round >= 5) {
                    r.pull(&mut set, id, &store);
                }
            }
            write_round(&mut set, &mut store, round, 20_000);
            assert!(round < 10_000);
        }
        assert_eq!(set.counters().joins, 2);
        for r in &receivers {
            assert_eq!(r.at_seq, Some(1));
            assert_eq!(contents(&r.seen), expected);
        }
        assert_eq!(set.held_bytes(), 0, "freed with its last reader");
        assert_eq!(set.counters().streaming, 0);
    }

    /// Every entry of the snapshot `reader` is sent, with deadlines, sorted.
    fn drain_with_deadlines(
        set: &mut SnapshotSet,
        reader: ReaderId,
        store: &Store,
    ) -> Vec<(Vec<u8>, Vec<u8>, u64, u64)> {
        let mut all = Vec::new();
        loop {
            let Some(PeerMessage::SnapshotChunk { entries, last, .. }) =
                set.next_chunk(reader, store, CHUNK)
            else {
                panic!("reader {reader} is not reading");
            };
            all.extend(
                entries
                    .into_iter()
                    .map(|e| (e.key, e.value, e.version, e.deadline_ms)),
            );
            if last {
                all.sort();
                return all;
            }
        }
    }

    #[test]
    fn one_batch_over_every_shard_keeps_key_images_not_shard_copies() {
        let mut store = loaded(200_000);
        for i in (0..200_000u64).step_by(7) {
            store.set_deadline(format!("key{i}").as_bytes(), Some(5_000_000 + i));
        }
        let mut expected: Vec<_> = store
            .iter()
            .map(|b| {
                let deadline = b.deadline().unwrap_or(0);
                (b.key().to_vec(), b.value().to_vec(), b.version(), deadline)
            })
            .collect();
        expected.sort();
        let mut set = SnapshotSet::new(usize::MAX);
        set.start(1, 1, 0);
        set.start(2, 1, 0);
        let shard_bytes: usize = (0..SHARDS).map(|i| encoded_shard_len(&store, i)).sum();
        // One batch: a key of every shard overwritten, deleted, given a
        // deadline or created, as the reactor applies a commit.
        let mut first_of = vec![None; SHARDS];
        for i in 0..200_000u64 {
            let key = format!("key{i}");
            first_of[store.shard_of(key.as_bytes())].get_or_insert(key);
        }
        for (shard, key) in first_of.iter().enumerate() {
            let key = key
                .as_ref()
                .expect("200,000 keys fill every shard")
                .as_bytes();
            set.before_write(&store, key);
            match shard % 4 {
                0 => store.set(key, b"changed", 2),
                1 => {
                    store.apply(Write::Delete { key }, 2);
                }
                2 => store.set_deadline(key, Some(9_000_000)),
                _ => {
                    let new_key = [key, b"-new"].concat();
                    set.before_write(&store, &new_key);
                    store.set(&new_key, b"new", 2);
                }
            }
            // Written twice: the image kept is the first.
            set.before_write(&store, key);
            store.set(key, b"again", 3);
        }
        let copies = |set: &SnapshotSet| {
            set.snapshots[0]
                .kept
                .iter()
                .filter(|k| matches!(k, Kept::Copy(..)))
                .count()
        };
        assert_eq!(copies(&set), 0, "no shard copied for one key each");
        assert!(
            set.held_bytes() < shard_bytes / 4,
            "{} held for a store of {shard_bytes}",
            set.held_bytes()
        );
        // Many keys of one shard: that shard is copied whole, once.
        // 40 keys: more than a quarter of the shard's ~50.
        for key in store.keys_in_shard(store.shard_of(b"key0"), 40) {
            set.before_write(&store, key.as_bytes());
            store.set(key.as_bytes(), b"busy", 4);
        }
        assert_eq!(copies(&set), 1, "the busy shard is copied");
        assert_eq!(drain_with_deadlines(&mut set, 1, &store), expected);
        // More writes everywhere while the second reader is sent it.
        write_round(&mut set, &mut store, 5, 200_000);
        assert_eq!(drain_with_deadlines(&mut set, 2, &store), expected);
        assert_eq!(set.held_bytes(), 0);
    }

    #[test]
    fn copies_let_go_are_freed_a_budget_at_a_time() {
        let mut store = loaded(20_000);
        let mut set = SnapshotSet::new(usize::MAX);
        set.start(1, 1, 0);
        let mut first = Receiver::default();
        first.pull(&mut set, 1, &store);
        // Writes all over the store: nearly every shard is copied.
        for round in 1..=40 {
            write_round(&mut set, &mut store, round, 20_000);
        }
        let held = set.held_bytes();
        assert!(held > 1 << 20, "copies held: {held}");
        set.remove(1);
        assert_eq!(
            set.held_bytes(),
            0,
            "no longer held, nor counted at the cap"
        );
        let releasing = set.releasing_bytes();
        // All but the key images' indexes, freed at once.
        assert!(releasing > held / 2, "{releasing} queued of {held}");
        let budget = 256 << 10;
        // The largest buffer (a staged chunk, or a shard's copy), far below the budget.
        let largest = set.releasing.buffers.iter().map(Vec::capacity).max();
        let largest = largest.expect("buffers queued");
        assert!(largest < budget);
        let mut turns = 0;
        while set.releasing_bytes() > 0 {
            let before = set.releasing_bytes();
            let freed = set.release_some(budget);
            assert_eq!(set.releasing_bytes(), before - freed);
            assert!(freed > 0 && freed < budget + largest, "{freed} in one turn");
            turns += 1;
        }
        assert!(turns >= releasing / (budget + largest), "{turns} turns");
        assert_eq!(set.release_some(budget), 0, "nothing left");
    }

    #[test]
    fn a_released_buffer_gives_its_whole_pages_back() {
        let mut buffer = vec![7u8; 1 << 20];
        release_pages(&mut buffer);
        #[cfg(target_os = "linux")]
        {
            let page = page_size();
            let start = buffer.as_ptr() as usize;
            let first = start.next_multiple_of(page) - start;
            let last = (start + buffer.len()) / page * page - start;
            assert!(
                buffer[..first].iter().all(|&b| b == 7),
                "the head is the allocator's"
            );
            assert!(
                buffer[first..last].iter().all(|&b| b == 0),
                "the pages went back"
            );
            assert!(buffer[last..].iter().all(|&b| b == 7), "so is the tail");
        }
        give_back(&mut buffer);
        assert_eq!(buffer.capacity(), 0);
    }

    #[test]
    fn a_receiver_after_the_first_finished_gets_a_new_snapshot() {
        let mut store = loaded(5_000);
        let mut set = SnapshotSet::new(usize::MAX);
        set.start(1, 1, 0);
        set.start(2, 1, 0);
        let mut first = Receiver::default();
        while !first.done {
            first.pull(&mut set, 1, &store);
        }
        write_round(&mut set, &mut store, 1, 5_000);
        assert_eq!(set.start(3, 2, 0), 2, "closed: a snapshot of its own");
        assert_eq!(set.counters().streaming, 2);
        let expected = contents(&store);
        let mut late = Receiver::default();
        while !late.done {
            late.pull(&mut set, 3, &store);
            write_round(&mut set, &mut store, 2, 5_000);
        }
        assert_eq!(contents(&late.seen), expected);
    }

    #[test]
    fn a_snapshot_the_log_no_longer_covers_takes_no_joiner() {
        let store = loaded(100);
        let mut set = SnapshotSet::new(usize::MAX);
        set.start(1, 4, 0);
        assert_eq!(set.start(2, 9, 5), 9, "the log holds nothing before 5");
        assert_eq!(set.counters().streaming, 2);
        let mut r = Receiver::default();
        while !r.done {
            r.pull(&mut set, 2, &store);
        }
        assert_eq!(r.seen.len(), 100);
    }

    #[test]
    fn a_closed_snapshot_frees_the_shards_every_reader_passed() {
        let store = loaded(20_000);
        let mut set = SnapshotSet::new(usize::MAX);
        set.start(1, 1, 0);
        // Copy every shard: the whole store is held, once.
        set.before_clear(&store);
        let full = set.held_bytes();
        assert!(full > 20_000 * 100, "{full}");
        set.start(2, 1, 0);
        assert_eq!(set.held_bytes(), full, "the joiner shares the copy");
        let mut a = Receiver::default();
        while !a.done {
            a.pull(&mut set, 1, &store);
        }
        // Closed; reader 2 has not moved: everything is still needed.
        assert!(set.held_bytes() >= full);
        let mut b = Receiver::default();
        let mut last_held = set.held_bytes();
        let mut shrank = 0;
        while !b.done {
            b.pull(&mut set, 2, &store);
            let held = set.held_bytes();
            shrank += usize::from(held < last_held);
            last_held = held;
        }
        assert!(shrank > 3, "freed as the last reader moves on");
        assert_eq!(set.held_bytes(), 0);
        assert_eq!(contents(&b.seen), contents(&a.seen));
        assert_eq!(contents(&b.seen), contents(&store));
    }

    #[test]
    fn at_the_cap_the_open_snapshot_closes_then_the_slowest_reader_is_dropped() {
        let mut store = loaded(20_000);
        let mut set = SnapshotSet::new(usize::MAX);
        set.start(1, 1, 0);
        set.start(2, 1, 0);
        let (mut fast, mut slow) = (Receiver::default(), Receiver::default());
        for _ in 0..20 {
            fast.pull(&mut set, 1, &store);
        }
        slow.pull(&mut set, 2, &store);
        // Reader 1 passed shards reader 2 has not: writes to them are copied
        // for reader 2; writes to shards both passed only while open.
        set.max_bytes = 400 * 1024;
        let mut round = 0;
        while set.take_evicted().is_empty() {
            round += 1;
            write_round(&mut set, &mut store, round, 20_000);
            assert!(
                set.held_bytes() <= set.max_bytes + 64 * 1024,
                "within a shard"
            );
            assert!(round < 1_000, "the cap is reached");
        }
        let c = set.counters();
        assert_eq!(c.cap_evictions, 1);
        assert_eq!(c.readers, 1);
        assert!(
            set.next_chunk(2, &store, CHUNK).is_none(),
            "the slowest went"
        );
        assert!(
            set.next_chunk(1, &store, CHUNK).is_some(),
            "the fastest stays"
        );
        assert!(c.held_bytes <= c.max_bytes);
        assert!(!set.snapshots[0].open, "closed before anyone was dropped");
    }

    /// A small deterministic generator (xorshift64*): the test replays from its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
        }
    }

    /// Readers start, join, read, leave and are dropped at a cap in random
    /// order while writes (and now and then a clear) go on: every reader that
    /// finishes has exactly the store as of the seq its chunks carry.
    #[test]
    fn random_interleavings_give_every_reader_the_store_as_of_its_seq() {
        let mut evictions = 0;
        for seed in 1..=12u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut store = Store::new();
            for i in 0..3_000u64 {
                store.set(format!("k{i}").as_bytes(), &[b'a'; 40], 1);
            }
            let mut seq = 1u64;
            let cap = if seed % 3 == 0 {
                120 * 1024
            } else {
                usize::MAX
            };
            let mut set = SnapshotSet::new(cap);
            // The store as of each snapshot's seq, recorded when it began.
            let mut as_of: std::collections::BTreeMap<u64, Contents> = Default::default();
            let mut active: std::collections::BTreeMap<u64, Receiver> = Default::default();
            let mut finished = 0;
            for step in 0..2_000 {
                match rng.below(10) {
                    0 if active.len() < 5 => {
                        let id = 100 + step;
                        let floor = if rng.below(4) == 0 { seq } else { 1 };
                        let at = set.start(id, seq, floor);
                        if at == seq {
                            as_of.entry(seq).or_insert_with(|| contents(&store));
                        } else {
                            assert!(at < seq && at >= floor, "seed {seed}: joined {at}");
                            assert!(as_of.contains_key(&at), "seed {seed}: joined a known seq");
                        }
                        active.insert(id, Receiver::default());
                    }
                    1 if !active.is_empty() => {
                        let nth = rng.below(active.len() as u64) as usize;
                        let id = *active.keys().nth(nth).unwrap_or(&0);
                        set.remove(id);
                        active.remove(&id);
                    }
                    2..=5 => {
                        for _ in 0..1 + rng.below(20) {
                            seq += 1;
                            let key = format!("k{}", rng.below(4_000));
                            if rng.below(200) == 0 {
                                set.before_clear(&store);
                                store.clear();
                                continue;
                            }
                            set.before_write(&store, key.as_bytes());
                            if rng.below(3) == 0 {
                                store.apply(
                                    Write::Delete {
                                        key: key.as_bytes(),
                                    },
                                    seq,
                                );
                            } else {
                                store.set(key.as_bytes(), b"w", seq);
                            }
                        }
                    }
                    _ if !active.is_empty() => {
                        let nth = rng.below(active.len() as u64) as usize;
                        let id = *active.keys().nth(nth).unwrap_or(&0);
                        let Some(r) = active.get_mut(&id) else {
                            continue;
                        };
                        let Some(PeerMessage::SnapshotChunk {
                            snapshot_seq,
                            entries,
                            last,
                        }) = set.next_chunk(id, &store, 4 * 1024)
                        else {
                            panic!("seed {seed}: reader {id} lost without an eviction");
                        };
                        assert_eq!(*r.at_seq.get_or_insert(snapshot_seq), snapshot_seq);
                        for e in entries {
                            assert!(r.seen.get(&e.key).is_none(), "seed {seed}: sent twice");
                            r.seen.set(&e.key, &e.value, e.version);
                        }
                        if last {
                            let want = &as_of[&snapshot_seq];
                            assert_eq!(&contents(&r.seen), want, "seed {seed}: reader {id}");
                            active.remove(&id);
                            finished += 1;
                        }
                    }
                    _ => {}
                }
                for e in set.take_evicted() {
                    assert!(
                        active.remove(&e.reader).is_some(),
                        "seed {seed}: evicted twice"
                    );
                    evictions += 1;
                }
                if cap != usize::MAX {
                    assert!(
                        set.held_bytes() <= cap + 64 * 1024,
                        "seed {seed}: {} held",
                        set.held_bytes()
                    );
                }
                assert_eq!(set.counters().readers, active.len(), "seed {seed}");
            }
            for id in active.keys() {
                set.remove(*id);
            }
            assert_eq!(set.held_bytes(), 0, "seed {seed}");
            assert!(finished > 0, "seed {seed}: some reader finished");
        }
        assert!(evictions > 0, "the capped seeds reached the cap");
    }

    #[test]
    fn an_empty_store_is_one_last_chunk() {
        let store = Store::new();
        let mut set = SnapshotSet::new(1 << 20);
        set.start(7, 3, 0);
        assert_eq!(
            set.next_chunk(7, &store, CHUNK),
            Some(PeerMessage::SnapshotChunk {
                snapshot_seq: 3,
                entries: Vec::new(),
                last: true
            })
        );
        assert_eq!(set.next_chunk(7, &store, CHUNK), None);
    }
}
