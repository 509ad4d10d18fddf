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

/// Longest a sync waits for the writers it just answered to come back (the
/// group-commit window; see `sync_loop`).
pub const GATHER_MAX: Duration = Duration::from_micros(500);

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
    threads: Vec<JoinHandle<()>>,
}

/// Snapshot jobs queued at most: bounds the snapshot bytes held in memory.
pub const SNAPSHOT_QUEUE: usize = 4;

impl Helpers {
    /// Start both threads; they wake the reactor through `waker`.
    pub fn start(waker: Arc<Waker>, batch: bool) -> io::Result<Helpers> {
        let (sync_tx, sync_rx) = std::sync::mpsc::channel();
        let (snap_tx, snap_rx) = std::sync::mpsc::sync_channel(SNAPSHOT_QUEUE);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        let (done, sync_waker) = (done_tx.clone(), waker.clone());
        let (prepare_tx, prepare_waker) = (done_tx.clone(), waker.clone());
        threads.push(
            std::thread::Builder::new()
                .name("dkvs-wal-sync".into())
                .spawn(move || sync_loop(&sync_rx, &done, &sync_waker, batch))?,
        );
        threads.push(
            std::thread::Builder::new()
                .name("dkvs-wal-snapshot".into())
                .spawn(move || snapshot_loop(snap_rx, done_tx, waker))?,
        );
        Ok(Helpers {
            sync: sync_tx,
            snapshot: snap_tx,
            done: done_rx,
            done_tx: prepare_tx,
            waker: prepare_waker,
            threads,
        })
    }

    /// Let the sync thread finish the requests it has and wait for it: it
    /// renames segments in the directory, which it must not do once the
    /// directory's lock is let go. Requests sent after this are dropped.
    pub fn stop_sync(&mut self) {
        drop(std::mem::replace(&mut self.sync, std::sync::mpsc::channel().0));
        if !self.threads.is_empty() {
            let _ = self.threads.remove(0).join();
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

    /// Number of threads started (for tests).
    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

/// Where segment `id` is prepared before it is renamed to its name: recovery
/// deletes `*.tmp` files, so one a crash left behind is never taken for a segment.
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
/// arrived during the last one, so the writers would split into two groups
/// taking turns, each waiting through the other's sync. Instead, after a
/// sync the reactor sets a target (the bytes already waiting plus about what
/// the last sync covered: every writer), and the next sync waits until the
/// log reaches it, for at most half an fsync's time and [`GATHER_MAX`]. A
/// lone writer never waits: its next write alone reaches the target.
fn sync_loop(requests: &Receiver<SyncRequest>, done: &Sender<Done>, waker: &Waker, batch: bool) {
    let mut last_sync = Instant::now() - BATCH_INTERVAL;
    let mut completed = 0u64;
    let mut window_end: Option<Instant> = None;
    while let Ok(mut request) = requests.recv() {
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
            merge(&mut request, newer);
        }
        if let Some(until) = window_end.take() {
            // Wait for the reactor's target after our last completion, then for the log to reach it.
            while request.seen_syncs < completed || request.written_bytes < request.start_at_bytes {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                match requests.recv_timeout(until - now) {
                    Ok(newer) => merge(&mut request, newer),
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
                    Ok(newer) => merge(&mut request, newer),
                    Err(_) => break,
                }
            }
        }
        last_sync = Instant::now();
        let started = Instant::now();
        let result = sync_files(&request);
        let micros = started.elapsed().as_micros() as u64;
        let report = match result {
            Ok(()) => Done::Synced {
                lsn: request.lsn,
                micros,
                written_bytes: request.written_bytes,
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
            let window = Duration::from_micros(micros / 2).min(GATHER_MAX);
            window_end = Some(Instant::now() + window);
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
