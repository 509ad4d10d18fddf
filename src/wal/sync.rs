//! The two helper threads of the write-ahead log.
//!
//! Why threads at all: `fsync` blocks for as long as the disk takes (about
//! 120 µs here, milliseconds to seconds on a busy or failing disk). Redis with
//! `appendfsync always` calls it inside its event loop, so every reader waits
//! behind the disk. dkvs's reactor only appends (a `write` into the page
//! cache) and hands the sync to the sync thread; it keeps reading sockets,
//! serving GETs and gathering the next batch meanwhile, and learns of the
//! completion through its `mio::Waker`. One fsync covers every record written
//! before it started, so the next group commit grows while one is in flight.
//!
//! Snapshot files get a thread of their own so that writing and syncing
//! hundreds of megabytes never delays a log sync queued behind it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::Waker;

use super::fault::{self, Point};
use super::snapshot::{write_block, write_end};

/// Longest the group-commit window lasts by the fsync's time alone (see [`Gather`]).
pub const GATHER_MAX: Duration = Duration::from_micros(500);

/// Longest the group-commit window waits for writers measured to come back
/// in time: writers slower than this are not waited for (see [`Gather`]).
pub const GATHER_BACK_MAX: Duration = Duration::from_millis(2);

/// Longest a sync with no urgent record waits for one.
pub const LAZY_DELAY: Duration = Duration::from_millis(2);

/// Batch policy: at most one fsync per this interval.
pub const BATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Work for the sync thread.
#[derive(Debug)]
pub struct SyncRequest {
    /// Every record through this log sequence number is in these files.
    pub lsn: u64,
    /// Bytes written to the log since it was opened, these records included.
    pub written_bytes: u64,
    /// Client writes (ops) in the records written since the log was opened.
    pub written_writes: u64,
    /// When the last of those bytes were written (the group-commit window
    /// measures from it how long answered writers take to come back).
    pub written_at: Instant,
    /// Syncs the reactor had seen completed when it sent this request.
    pub seen_syncs: u64,
    /// Group-commit target: wait (within the window) until this many bytes are written.
    pub start_at_bytes: u64,
    /// Some record waits on this sync (a vote, a client's reply). Without one
    /// (a slave's commit records, whose acks can wait) the sync waits up to
    /// [`LAZY_DELAY`] for one that has, and covers both.
    pub urgent: bool,
    /// Prepared segments the log moved on to since the last request, in
    /// order: each renamed from its temporary name to its own before anything
    /// is synced. Here and not on the reactor, where a rename waited 3–8 ms
    /// for the file system's journal beside a running fsync.
    pub renames: Vec<(PathBuf, PathBuf)>,
    /// Segments rotated out and closed by their end marker since the last
    /// request: synced before `files`.
    pub rotated: Vec<Arc<File>>,
    /// Files to sync (the active segment).
    pub files: Vec<Arc<File>>,
    /// Also sync the directory (a segment was created since the last sync).
    pub dir: Option<PathBuf>,
}

/// Work for the snapshot thread.
#[derive(Debug)]
pub enum SnapshotJob {
    /// Create `tmp` and write the header.
    Begin {
        /// Segment id naming the snapshot.
        id: u64,
        /// Temporary path.
        tmp: PathBuf,
        /// Encoded header.
        header: Vec<u8>,
    },
    /// Append one block of entries.
    Block(Vec<u8>),
    /// Write the end marker, sync, rename to `path`, sync `dir`, then delete `obsolete`.
    Finish {
        /// Entries written.
        entries: u64,
        /// Final path.
        path: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// Segments and snapshots the new snapshot makes unnecessary.
        obsolete: Vec<PathBuf>,
    },
    /// Give up the snapshot in progress and delete its temporary file.
    Abort,
}

/// What a helper thread reports back.
#[derive(Debug)]
pub enum Done {
    /// Every record through `lsn` is durable; the fsync took `micros`.
    Synced {
        /// The request's lsn.
        lsn: u64,
        /// Duration of the fsync calls.
        micros: u64,
        /// The request's `written_bytes`: what the sync covered.
        written_bytes: u64,
        /// The request's `written_writes`.
        written_writes: u64,
        /// The group-commit window's measured return time of the writers, µs.
        gather_back_us: Option<u64>,
    },
    /// A sync failed: nothing after the last success may be reported durable.
    SyncFailed(String),
    /// The next segment is preallocated and synced under its temporary name.
    Prepared {
        /// Its segment id.
        id: u64,
        /// The file and its temporary path, or why it could not be made.
        result: Result<(File, PathBuf), String>,
    },
    /// The snapshot thread took a block (room for another).
    BlockWritten,
    /// Snapshot `id` is durable under its final name (`bytes` long).
    SnapshotWritten {
        /// Its id.
        id: u64,
        /// File size.
        bytes: u64,
    },
    /// Snapshot `id` failed.
    SnapshotFailed {
        /// Its id.
        id: u64,
        /// Why.
        why: String,
    },
}

/// Handles to both helper threads.
#[derive(Debug)]
pub struct Helpers {
    /// Requests to the sync thread.
    pub sync: Sender<SyncRequest>,
    /// Jobs for the snapshot thread (bounded: the reactor waits for room).
    pub snapshot: SyncSender<SnapshotJob>,
    /// Completions from both (and from segment preparations).
    pub done: Receiver<Done>,
    done_tx: Sender<Done>,
    waker: Arc<Waker>,
    /// The sync thread, joined by [`Helpers::stop_sync`].
    sync_thread: Option<JoinHandle<()>>,
    /// The snapshot thread (detached: it ends when its queue closes).
    _snapshot_thread: JoinHandle<()>,
}

/// Snapshot jobs queued at most: bounds the snapshot bytes held in memory.
pub const SNAPSHOT_QUEUE: usize = 4;

impl Helpers {
    /// Start both threads; they wake the reactor through `waker`.
    pub fn start(waker: Arc<Waker>, batch: bool) -> io::Result<Helpers> {
        let (sync_tx, sync_rx) = std::sync::mpsc::channel();
        let (snap_tx, snap_rx) = std::sync::mpsc::sync_channel(SNAPSHOT_QUEUE);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (done, sync_waker) = (done_tx.clone(), waker.clone());
        let (prepare_tx, prepare_waker) = (done_tx.clone(), waker.clone());
        let sync_thread = std::thread::Builder::new()
            .name("dkvs-wal-sync".into())
            .spawn(move || sync_loop(&sync_rx, &done, &sync_waker, batch))?;
        let snapshot_thread = std::thread::Builder::new()
            .name("dkvs-wal-snapshot".into())
            .spawn(move || snapshot_loop(snap_rx, done_tx, waker))?;
        Ok(Helpers {
            sync: sync_tx,
            snapshot: snap_tx,
            done: done_rx,
            done_tx: prepare_tx,
            waker: prepare_waker,
            sync_thread: Some(sync_thread),
            _snapshot_thread: snapshot_thread,
        })
    }

    /// Let the sync thread finish the requests it has and wait for it: it
    /// renames segments in the directory, which it must not do once the
    /// directory's lock is let go. Requests sent after this are dropped.
    pub fn stop_sync(&mut self) {
        drop(std::mem::replace(
            &mut self.sync,
            std::sync::mpsc::channel().0,
        ));
        if let Some(thread) = self.sync_thread.take() {
            let _ = thread.join();
        }
    }

    /// Preallocate segment `id` of `dir` on a thread of its own, reported as
    /// [`Done::Prepared`]. Neither helper thread does it: zeroing and syncing
    /// megabytes would hold a log sync (a client's reply) or a snapshot
    /// block queued behind it for tens of milliseconds. One runs at a time,
    /// about once per segment, so a short-lived thread costs nothing.
    pub fn prepare(&self, dir: PathBuf, id: u64) -> io::Result<JoinHandle<()>> {
        let (done, waker) = (self.done_tx.clone(), self.waker.clone());
        std::thread::Builder::new()
            .name("dkvs-wal-prealloc".into())
            .spawn(move || {
                let tmp = prepared_path(&dir, id);
                let result = preallocate(&tmp, id)
                    .map(|file| (file, tmp.clone()))
                    .map_err(|e| format!("cannot preallocate {}: {e}", tmp.display()));
                if done.send(Done::Prepared { id, result }).is_ok() {
                    let _ = waker.wake();
                }
            })
    }
}

/// Where segment `id` is prepared before it is renamed to its name: recovery
/// deletes one a crash left behind unless the log had moved on to it
/// (`adopt_prepared`).
pub fn prepared_path(dir: &std::path::Path, id: u64) -> PathBuf {
    dir.join(format!("{}.tmp", super::segment::segment_name(id)))
}

/// Create `path` as segment `id`: its header, zeros up to
/// [`SEGMENT_BYTES`](super::segment::SEGMENT_BYTES), synced. Zeros and not
/// `fallocate`: ext4 and XFS keep fallocated space as unwritten extents, and
/// the first write into each block converts it, a metadata change that
/// fdatasync must commit, the cost preallocating is meant to remove.
pub fn preallocate(path: &std::path::Path, id: u64) -> io::Result<File> {
    use super::segment::{SEGMENT_BYTES, segment_header};
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let chunk = vec![0u8; 1 << 20];
    file.write_all(&segment_header(id))?;
    let mut left = SEGMENT_BYTES - super::segment::SEGMENT_HEADER_BYTES as u64;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

/// The group-commit window (`always`): how long the next sync waits for the
/// writers the last one answered.
///
/// The reactor sets a target after each completed sync (the bytes already
/// waiting plus about what that sync covered: every writer it answered), and
/// the sync waits until the log reaches it or the window ends. The window
/// used to be half an fsync's time (at most [`GATHER_MAX`]), but here the
/// answered writers need longer than that to come back: the reactor sends
/// every reply of the batch, and each client answers, before the last of them
/// writes again (traced at 50 connections: first new write 60–650 µs after
/// the completion, the window 65–90 µs). So the window closed first, added
/// its length and the timer's slack between two syncs, and the writers still
/// split into groups taking turns, each an fsync of its own.
///
/// So the time they take is measured: from a sync's completion until a write
/// reaches that window's target (known from the time each request's bytes
/// were written, even when the target was reached only after the next sync
/// had started), smoothed over syncs. The window lasts 5/4 of that when it
/// is at most [`GATHER_BACK_MAX`], and never less than the old half fsync;
/// writers slower than that (think time, open-loop clients) are not waited
/// for. A lone writer still never waits: its next write alone is the target.
#[derive(Debug, Default)]
pub struct Gather {
    /// Smoothed time from a completion until its writers were back, µs.
    back_us: Option<u64>,
    /// The window being measured: its completion, and its target once the
    /// reactor sent it.
    current: Option<(Instant, Option<u64>)>,
    /// The window before, if its target was not reached when the next sync completed.
    previous: Option<(Instant, u64)>,
}

impl Gather {
    /// A sync completed at `at`: a new window starts.
    pub fn completed(&mut self, at: Instant) {
        if let Some((then, Some(target))) = self.current.take() {
            // Not reached yet: the requests queued meanwhile may still reach it.
            if let Some((older, _)) = self.previous.replace((then, target)) {
                // Two windows without a return: at least that long.
                self.record(at.saturating_duration_since(older));
            }
        }
        self.current = Some((at, None));
    }

    /// Take note of a request from the reactor; `completed` syncs so far.
    pub fn observe(&mut self, request: &SyncRequest, completed: u64) {
        if let Some((then, target)) = self.previous
            && request.written_bytes >= target
        {
            self.previous = None;
            self.record(request.written_at.saturating_duration_since(then));
        }
        match &mut self.current {
            Some((_, target @ None)) if request.seen_syncs >= completed => {
                *target = Some(request.start_at_bytes);
            }
            _ => {}
        }
        if let Some((then, Some(target))) = self.current
            && request.written_bytes >= target
        {
            self.current = None;
            self.record(request.written_at.saturating_duration_since(then));
        }
    }

    fn record(&mut self, took: Duration) {
        let us = took.as_micros().min(u128::from(u32::MAX)) as u64;
        self.back_us = Some(match self.back_us {
            Some(old) => (3 * old + us) / 4,
            None => us,
        });
    }

    /// The window after a sync whose fsync took `fsync_us`.
    pub fn window(&self, fsync_us: u64) -> Duration {
        let base = Duration::from_micros(fsync_us / 2).min(GATHER_MAX);
        match self.back_us {
            Some(back) => {
                let wait = Duration::from_micros(back * 5 / 4);
                if wait <= GATHER_BACK_MAX {
                    wait.max(base)
                } else {
                    base
                }
            }
            None => base,
        }
    }

    /// The smoothed return time, µs (for STATS).
    pub fn back_us(&self) -> Option<u64> {
        self.back_us
    }
}

/// Merge `newer` into `request`: one fsync covers both.
fn merge(request: &mut SyncRequest, newer: SyncRequest) {
    request.renames.extend(newer.renames);
    for file in newer.rotated {
        if !request.rotated.iter().any(|f| Arc::ptr_eq(f, &file)) {
            request.rotated.push(file);
        }
    }
    // Every request names the active segment: keep each file once, so a second
    // of batch-mode requests (one per reactor turn) stays a list of one or two.
    for file in newer.files {
        if !request.files.iter().any(|f| Arc::ptr_eq(f, &file)) {
            request.files.push(file);
        }
    }
    request.lsn = newer.lsn;
    request.written_bytes = newer.written_bytes;
    request.written_at = newer.written_at;
    request.written_writes = newer.written_writes;
    request.seen_syncs = newer.seen_syncs;
    request.start_at_bytes = newer.start_at_bytes;
    request.urgent |= newer.urgent;
    if newer.dir.is_some() {
        request.dir = newer.dir;
    }
}

/// The sync thread: one fsync at a time, each covering every request that
/// queued up meanwhile.
///
/// Group-commit window (`always`): when a sync completes, the writers it
/// covered get their replies and most send their next write within a round
/// trip. Starting the next sync at once would cover only the writes that
/// arrived during the last one, so the writers would split into groups
/// taking turns, each waiting through the other's sync. Instead, after a
/// sync the reactor sets a target (the bytes already waiting plus about what
/// the last sync covered: every writer), and the next sync waits until the
/// log reaches it, for as long as [`Gather`] measured those writers to take.
fn sync_loop(requests: &Receiver<SyncRequest>, done: &Sender<Done>, waker: &Waker, batch: bool) {
    let mut last_sync = Instant::now() - BATCH_INTERVAL;
    let mut completed = 0u64;
    let mut window_end: Option<Instant> = None;
    let mut gather = Gather::default();
    // Every request is seen by the window's measurement before it is merged.
    let take = |request: &mut SyncRequest, newer: SyncRequest, gather: &mut Gather, completed| {
        gather.observe(&newer, completed);
        merge(request, newer);
    };
    while let Ok(mut request) = requests.recv() {
        gather.observe(&request, completed);
        if batch {
            // Batch: one fsync per interval covers whatever was written meanwhile.
            let next = last_sync + BATCH_INTERVAL;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
        // Whatever queued up while the last sync ran is covered by one more.
        while let Ok(newer) = requests.try_recv() {
            take(&mut request, newer, &mut gather, completed);
        }
        if let Some(until) = window_end.take() {
            // Wait for the reactor's target after our last completion, then for the log to reach it.
            while request.seen_syncs < completed || request.written_bytes < request.start_at_bytes {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                match requests.recv_timeout(until - now) {
                    Ok(newer) => take(&mut request, newer, &mut gather, completed),
                    Err(_) => break,
                }
            }
        }
        if !request.urgent && !batch {
            // Only records whose acknowledgement can wait: let the next urgent
            // sync (a slave's next PREPARE) carry them instead of queueing ahead of it.
            let until = Instant::now() + LAZY_DELAY;
            while !request.urgent {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                match requests.recv_timeout(until - now) {
                    Ok(newer) => take(&mut request, newer, &mut gather, completed),
                    Err(_) => break,
                }
            }
        }
        last_sync = Instant::now();
        let started = Instant::now();
        let result = sync_files(&request);
        let finished = Instant::now();
        let micros = finished.duration_since(started).as_micros() as u64;
        if !batch {
            gather.completed(finished);
        }
        let report = match result {
            Ok(()) => Done::Synced {
                lsn: request.lsn,
                micros,
                written_bytes: request.written_bytes,
                written_writes: request.written_writes,
                gather_back_us: gather.back_us(),
            },
            Err(e) => Done::SyncFailed(e),
        };
        let failed = matches!(report, Done::SyncFailed(_));
        if done.send(report).is_err() {
            return;
        }
        let _ = waker.wake();
        if failed {
            // Never retried: after a failed fsync the kernel may have dropped the
            // dirty pages, so a later success would prove nothing (fsyncgate).
            // The reactor stops the log on this report and requests no more syncs.
            return;
        }
        completed += 1;
        if !batch {
            window_end = Some(finished + gather.window(micros));
        }
    }
}

fn sync_files(request: &SyncRequest) -> Result<(), String> {
    // Recovery finds a segment still under its temporary name too (see
    // `adopt_prepared`); the rename, and the directory's fsync below, only
    // make it findable the ordinary way before anything in it counts as durable.
    for (tmp, path) in &request.renames {
        std::fs::rename(tmp, path)
            .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))?;
    }
    // A rotated segment was closed by its end marker, or cut to its records
    // (see `Wal::rotate`): fsync, so that is durable before any record of the
    // next segment is reported durable.
    for file in &request.rotated {
        if let Some(e) = fault::inject(Point::Fsync) {
            return Err(format!("fsync of the log failed: {e}"));
        }
        file.sync_all()
            .map_err(|e| format!("fsync of the log failed: {e}"))?;
    }
    // `merge` keeps each file once.
    for file in &request.files {
        if request.rotated.iter().any(|r| Arc::ptr_eq(r, file)) {
            continue; // synced above
        }
        if let Some(e) = fault::inject(Point::Fsync) {
            return Err(format!("fsync of the log failed: {e}"));
        }
        file.sync_data()
            .map_err(|e| format!("fsync of the log failed: {e}"))?;
    }
    if let Some(dir) = &request.dir {
        sync_dir(dir).map_err(|e| format!("fsync of {} failed: {e}", dir.display()))?;
    }
    Ok(())
}

/// Sync a directory, so that entries created or renamed in it are durable.
pub fn sync_dir(dir: &std::path::Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct InProgress {
    id: u64,
    tmp: PathBuf,
    out: BufWriter<File>,
    bytes: u64,
}

fn snapshot_loop(jobs: Receiver<SnapshotJob>, done: Sender<Done>, waker: Arc<Waker>) {
    let mut current: Option<InProgress> = None;
    let mut failed: Option<(u64, String)> = None;
    while let Ok(job) = jobs.recv() {
        let report = match job {
            SnapshotJob::Begin { id, tmp, header } => {
                failed = None;
                match begin(&tmp, &header) {
                    Ok(out) => {
                        current = Some(InProgress {
                            id,
                            tmp,
                            out,
                            bytes: header.len() as u64,
                        });
                        None
                    }
                    Err(e) => {
                        failed = Some((id, format!("cannot create {}: {e}", tmp.display())));
                        None
                    }
                }
            }
            SnapshotJob::Block(block) => {
                if let Some(s) = current.as_mut() {
                    match write_block(&mut s.out, &block) {
                        Ok(()) => s.bytes += 8 + block.len() as u64,
                        Err(e) => {
                            failed = Some((s.id, format!("cannot write {}: {e}", s.tmp.display())));
                            let _ = std::fs::remove_file(&s.tmp);
                            current = None;
                        }
                    }
                }
                Some(Done::BlockWritten)
            }
            SnapshotJob::Finish {
                entries,
                path,
                dir,
                obsolete,
            } => match (current.take(), failed.take()) {
                (_, Some((id, why))) => Some(Done::SnapshotFailed { id, why }),
                (Some(s), None) => Some(finish(s, entries, &path, &dir, &obsolete)),
                (None, None) => None,
            },
            SnapshotJob::Abort => {
                if let Some(s) = current.take() {
                    let _ = std::fs::remove_file(&s.tmp);
                }
                failed = None;
                None
            }
        };
        if let Some(report) = report {
            if done.send(report).is_err() {
                return;
            }
            let _ = waker.wake();
        }
    }
}

fn begin(tmp: &PathBuf, header: &[u8]) -> io::Result<BufWriter<File>> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(header)?;
    Ok(out)
}

fn finish(
    mut s: InProgress,
    entries: u64,
    path: &PathBuf,
    dir: &std::path::Path,
    obsolete: &[PathBuf],
) -> Done {
    let id = s.id;
    let result = (|| -> io::Result<()> {
        write_end(&mut s.out, entries)?;
        s.bytes += 16;
        let file = s.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&s.tmp, path)?;
        sync_dir(dir)
    })();
    match result {
        Ok(()) => {
            for old in obsolete {
                if let Err(e) = std::fs::remove_file(old)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    log::warn!("cannot delete {}: {e}", old.display());
                }
            }
            Done::SnapshotWritten { id, bytes: s.bytes }
        }
        Err(e) => {
            let _ = std::fs::remove_file(&s.tmp);
            Done::SnapshotFailed {
                id,
                why: format!("cannot complete {}: {e}", path.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        written_bytes: u64,
        written_at: Instant,
        seen_syncs: u64,
        start_at: u64,
    ) -> SyncRequest {
        SyncRequest {
            lsn: 1,
            written_bytes,
            written_writes: 0,
            written_at,
            seen_syncs,
            start_at_bytes: start_at,
            urgent: true,
            renames: Vec::new(),
            rotated: Vec::new(),
            files: Vec::new(),
            dir: None,
        }
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn without_a_measure_the_window_is_half_an_fsync_and_at_most_gather_max() {
        let g = Gather::default();
        assert_eq!(g.window(150), us(75));
        assert_eq!(g.window(5_000), GATHER_MAX);
    }

    #[test]
    fn the_window_lasts_as_long_as_the_answered_writers_took_to_come_back() {
        let mut g = Gather::default();
        let t0 = Instant::now();
        g.completed(t0);
        // The reactor's update after the completion names the target...
        g.observe(&request(1_000, t0, 1, 4_000), 1);
        // ...a write short of it is no measure...
        g.observe(&request(2_000, t0 + us(100), 1, 4_000), 1);
        assert_eq!(g.back_us(), None);
        // ...the one that reaches it, 400 µs after the completion, is.
        g.observe(&request(4_100, t0 + us(400), 1, 4_000), 1);
        assert_eq!(g.back_us(), Some(400));
        assert_eq!(g.window(150), us(500));
        // Never shorter than half the fsync: 400 µs, not 5/4 of 100 µs.
        let mut quick = Gather::default();
        quick.completed(t0);
        quick.observe(&request(4_000, t0 + us(100), 1, 4_000), 1);
        assert_eq!(quick.back_us(), Some(100));
        assert_eq!(quick.window(800), us(400));
    }

    #[test]
    fn a_request_sent_before_the_reactor_saw_the_completion_sets_no_target() {
        let mut g = Gather::default();
        let t0 = Instant::now();
        g.completed(t0);
        // Queued during the sync: its target belongs to the window before.
        g.observe(&request(9_000, t0, 0, 1_000), 1);
        assert_eq!(g.back_us(), None);
        g.observe(&request(9_000, t0 + us(10), 1, 12_000), 1);
        g.observe(&request(12_000, t0 + us(300), 1, 12_000), 1);
        assert_eq!(g.back_us(), Some(300));
    }

    #[test]
    fn a_target_reached_only_after_the_next_sync_started_is_still_measured() {
        let mut g = Gather::default();
        let t0 = Instant::now();
        g.completed(t0);
        g.observe(&request(1_000, t0, 1, 4_000), 1);
        // The window ended; the next sync ran and completed before the
        // writes that reach the target were seen (they queued meanwhile).
        g.completed(t0 + us(300));
        g.observe(&request(4_500, t0 + us(250), 1, 4_000), 2);
        assert_eq!(g.back_us(), Some(250));
    }

    #[test]
    fn writers_slower_than_gather_back_max_are_not_waited_for() {
        let mut g = Gather::default();
        let t0 = Instant::now();
        g.completed(t0);
        g.observe(&request(1_000, t0, 1, 4_000), 1);
        g.observe(&request(4_000, t0 + us(3_000), 1, 4_000), 1);
        assert_eq!(g.back_us(), Some(3_000));
        assert_eq!(g.window(150), us(75));
    }

    #[test]
    fn writers_that_never_come_back_count_as_slow() {
        let mut g = Gather::default();
        let t0 = Instant::now();
        g.completed(t0);
        g.observe(&request(1_000, t0, 1, 4_000), 1);
        g.completed(t0 + us(1_000));
        g.observe(&request(1_000, t0 + us(1_000), 2, 1_000), 2);
        // The second window's target was reached at once (nothing covered):
        // 0 µs; the first is still open.
        assert_eq!(g.back_us(), Some(0));
        g.completed(t0 + us(2_000));
        g.observe(&request(1_000, t0 + us(2_000), 3, 5_000), 3);
        g.completed(t0 + us(5_000));
        // Two completions without its target: at least 5 ms, smoothed in.
        assert_eq!(g.back_us(), Some(5_000 / 4));
    }

    #[test]
    fn the_measure_is_smoothed_over_syncs() {
        let mut g = Gather::default();
        let mut t = Instant::now();
        for back in [400, 800] {
            g.completed(t);
            g.observe(&request(0, t, 1, 100), 1);
            g.observe(&request(100, t + us(back), 1, 100), 1);
            t += us(1_000);
        }
        assert_eq!(g.back_us(), Some((3 * 400 + 800) / 4));
    }
}
