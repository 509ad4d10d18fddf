//! The write-ahead log: segment files of checksummed records, snapshots of
//! the store, recovery, and group commit through a sync thread.
//!
//! The data directory holds:
//!
//! ```text
//! LOCK                 held (flock) while a server runs on the directory
//! node_id              this node's id, created once (16 hex digits)
//! wal-<id>.log         segments in id order, preallocated and overwritten (segment.rs)
//! wal-<id>.log.tmp     the next segment, preallocated; in use until the sync thread renames it
//! snap-<id>.dat        snapshots; the newest names the first segment after it (snapshot.rs)
//! *.torn-<t>, *.discarded-<t>, *.corrupt-<t>   bytes recovery cut off, kept for the operator
//! ```
//!
//! What is durable when: a record is handed to [`Wal::append`] by the state
//! machines' `Persist` action; [`Wal::flush`] writes everything appended in a
//! turn with one `write`; under `--fsync always` the sync thread then syncs it
//! and the reactor reports `Persisted` only after that; under `batch` and
//! `never` `Persisted` follows the `write` (a process crash loses nothing, a
//! machine crash loses up to about a second, or whatever the kernel had not
//! written back).

pub mod fault;
pub mod record;
pub mod replay;
pub mod segment;
pub mod snapshot;
mod sync;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use log::{error, info, warn};
use mio::Waker;

use crate::replication::Record;
use crate::store::Store;
use crate::store::snapshot::ShardCopy;

use record::{SEGMENT_END_BYTES, encode_record, encode_segment_end, record_seq};
use replay::{Replay, Step};
use segment::{SEGMENT_BYTES, Tail, parse_segment_name, scan, segment_header, segment_name};
use snapshot::{SnapshotHeader, parse_snapshot_name, snapshot_name};
use sync::{Done, Helpers, SnapshotJob, SyncRequest, preallocate, prepared_path, sync_dir};

/// When a record counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After an fsync that covers it (every acknowledged write survives a power cut).
    Always,
    /// After its `write`; an fsync runs about once a second.
    Batch,
    /// After its `write`; never synced by dkvs.
    Never,
}

impl FsyncPolicy {
    /// Parse `always`, `batch` or `never`.
    pub fn parse(text: &str) -> Result<FsyncPolicy, String> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "batch" => Ok(FsyncPolicy::Batch),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(format!(
                "unknown fsync policy '{other}' (use always, batch or never)"
            )),
        }
    }

    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Batch => "batch",
            FsyncPolicy::Never => "never",
        }
    }
}

/// How the log is set up.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// The data directory.
    pub dir: PathBuf,
    /// When records count as durable.
    pub fsync: FsyncPolicy,
    /// Take a snapshot once the log has grown by this many bytes since the last.
    pub snapshot_log_bytes: u64,
    /// Cut a log at its first damaged record instead of refusing to start.
    pub repair: bool,
}

/// Why the log cannot be opened or written.
#[derive(Debug)]
pub enum WalError {
    /// A file operation failed.
    Io {
        /// What was being done.
        what: String,
        /// The file.
        path: PathBuf,
        /// The system's error (ENOSPC, EIO, EACCES… by name).
        source: io::Error,
    },
    /// Another server holds the directory.
    Locked(PathBuf),
    /// A damaged record in the middle of the log.
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Offset of the damaged record.
        offset: usize,
        /// What is wrong.
        why: String,
    },
    /// A snapshot that does not load, or records that do not replay.
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Io { what, path, source } => {
                write!(f, "cannot {what} {}: {source}", path.display())
            }
            WalError::Locked(path) => write!(
                f,
                "data directory {} is in use by another dkvs-server (its LOCK is held); \
                 give each server its own -d DIR",
                path.display()
            ),
            WalError::Corrupt { path, offset, why } => write!(
                f,
                "write-ahead log {} is damaged at byte {offset} ({why}) and valid records \
                 follow; refusing to start. Run `dkvs-server --repair -d DIR` to cut the log \
                 there (the cut bytes are kept beside it)",
                path.display()
            ),
            WalError::Invalid { path, why } => {
                write!(f, "{} is not usable: {why}", path.display())
            }
        }
    }
}

impl std::error::Error for WalError {}

fn io_err(what: &str, path: &Path) -> impl FnOnce(io::Error) -> WalError {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |source| WalError::Io { what, path, source }
}

/// A preallocated segment waiting to become the active one.
#[derive(Debug)]
struct Prepared {
    id: u64,
    file: File,
    tmp: PathBuf,
}

/// A segment on disk.
#[derive(Debug)]
struct Segment {
    id: u64,
    /// Highest commit sequence number of a record in it.
    max_seq: u64,
    bytes: u64,
}

/// A snapshot being written.
#[derive(Debug)]
struct DiskSnapshot {
    id: u64,
    header: SnapshotHeader,
    copy: ShardCopy,
    /// The resync checkpoint this snapshot makes durable, if it is one.
    checkpoint_lsn: Option<u64>,
    started: Instant,
    finishing: bool,
}

/// Snapshot blocks are cut at about this size, one block per reactor turn.
/// Copying and encoding a block holds the loop: 1 MiB took 1.7-2.7 ms of CPU
/// per turn (1M keys, 100-byte values), 256 KiB 0.3-0.6 ms, beside an expiry
/// sweep's step of up to 0.35 ms in the same turn; 128 KiB keeps the two
/// under the 1 ms a turn may take while keys expire.
const SNAPSHOT_BLOCK_BYTES: usize = 128 << 10;

/// What the last completed snapshot was.
#[derive(Debug, Clone, Copy)]
struct LastSnapshot {
    seq: u64,
    bytes: u64,
    millis: u64,
    at: Instant,
}

/// The open write-ahead log of one server.
pub struct Wal {
    config: WalConfig,
    node_id: u64,
    /// Held for the life of the server: the directory's lock.
    _lock: File,
    helpers: Helpers,
    segments: Vec<Segment>,
    active: Arc<File>,
    /// Bytes written to the active segment, header included: where the next write goes.
    active_len: u64,
    /// Size the active segment was preallocated to (0: it was not, and grows
    /// as it is written).
    active_capacity: u64,
    /// The next segment, preallocated and synced, under its temporary name.
    next: Option<Prepared>,
    /// The thread preallocating the next segment, and that segment's id.
    preparing: Option<(u64, JoinHandle<()>)>,
    /// A segment whose preallocation failed: not retried for it (a full disk
    /// would fail every attempt), and it grows as it is written.
    unprepared: Option<u64>,
    /// Rotated segments (cut to their records) not yet covered by a sync.
    unsynced: Vec<Arc<File>>,
    /// Prepared segments in use whose rename the sync thread has not been asked for.
    renames: Vec<(PathBuf, PathBuf)>,
    dir_dirty: bool,
    buffer: Vec<u8>,
    appended_lsn: u64,
    written_lsn: u64,
    synced_lsn: u64,
    reported_lsn: u64,
    /// Highest lsn a requested sync covers.
    requested_lsn: u64,
    /// Bytes written to the segments since the log was opened.
    written_bytes: u64,
    /// When the last bytes were written (see `sync::Gather`).
    written_at: Instant,
    /// `written_bytes` covered by the last completed sync.
    synced_bytes: u64,
    /// Records covered by completed syncs (STATS: records per fsync).
    synced_records: u64,
    /// Client writes (ops) in the records appended, and in those covered by completed syncs.
    appended_writes: u64,
    synced_writes: u64,
    /// The group-commit window's measured return time of the writers, µs.
    gather_back_us: Option<u64>,
    /// Syncs completed.
    syncs_seen: u64,
    /// The group-commit target after the last completed sync (see `sync::sync_loop`).
    start_at_bytes: u64,
    /// Whether syncs wait for the writers just answered (see [`Wal::set_group_window`]).
    group_window: bool,
    /// A record appended since the last sync request waits on that sync.
    urgent_pending: bool,
    failed: Option<String>,
    snapshot: Option<DiskSnapshot>,
    /// Snapshot jobs sent and not yet consumed.
    snapshot_queued: usize,
    last_snapshot: Option<LastSnapshot>,
    snapshots_written: u64,
    bytes_since_snapshot: u64,
    fsync_us: Histogram<u64>,
}

impl Drop for Wal {
    fn drop(&mut self) {
        // A preallocation still writing must not outlive the directory's lock:
        // the next server on the directory deletes and recreates the same file.
        if let Some((_, thread)) = self.preparing.take() {
            let _ = thread.join();
        }
        // Nor may a rename of a segment the log moved on to (see `rotate`).
        self.helpers.stop_sync();
    }
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.config.dir)
            .field("appended_lsn", &self.appended_lsn)
            .field("reported_lsn", &self.reported_lsn)
            .finish()
    }
}

/// What recovery found and did, for the start-up log.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// The snapshot loaded, if any.
    pub snapshot: Option<(PathBuf, u64)>,
    /// Segments replayed.
    pub segments: usize,
    /// Records read.
    pub records: u64,
    /// Repairs made (each a sentence).
    pub repairs: Vec<String>,
}

fn now_tag() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Write `bytes` to `dir/name` atomically: temp file, fsync, rename, fsync of the directory.
/// The file naming the epoch this node last led in (failover through etcd).
const LED_EPOCH_FILE: &str = "leader_epoch";

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), WalError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir).map_err(io_err("fsync the directory", dir))
}

fn list_dir(dir: &Path) -> Result<Vec<String>, WalError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

fn read_node_id(dir: &Path) -> Result<u64, WalError> {
    let path = dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(text) => u64::from_str_radix(text.trim(), 16).map_err(|_| WalError::Invalid {
            path: path.clone(),
            why: format!("'{}' is not a node id (16 hex digits)", text.trim()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = rand::random::<u64>().max(1);
            write_atomically(dir, "node_id", format!("{id:016x}\n").as_bytes())?;
            info!("created node id {id:016x} in {}", dir.display());
            Ok(id)
        }
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Move a file aside under a name that says why, so no byte is lost silently.
fn move_aside(path: &Path, why: &str) -> Result<PathBuf, WalError> {
    let aside = PathBuf::from(format!("{}.{why}-{}", path.display(), now_tag()));
    std::fs::rename(path, &aside).map_err(io_err("move aside", path))?;
    Ok(aside)
}

impl Wal {
    /// Open (creating if needed) and lock the data directory, recover the store
    /// from the newest snapshot and the log, and start the helper threads.
    pub fn open(
        config: WalConfig,
        waker: Arc<Waker>,
    ) -> Result<(Wal, Replay, RecoveryReport), WalError> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io_err("create the data directory", &dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(WalError::Locked(dir)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        let node_id = read_node_id(&dir)?;
        let (replay, segments, report) = recover(&dir, config.repair)?;
        let next_id = segments
            .iter()
            .map(|s| s.id)
            .chain(report.snapshot.as_ref().map(|(p, _)| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(parse_snapshot_name)
                    .unwrap_or(0)
            }))
            .max()
            .unwrap_or(0)
            + 1;
        // Preallocated here, before the reactor runs; later segments are
        // prepared ahead of time off the reactor thread.
        let (active, active_capacity) = match preallocate(&prepared_path(&dir, next_id), next_id) {
            Ok(file) => {
                let tmp = prepared_path(&dir, next_id);
                let path = dir.join(segment_name(next_id));
                std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
                (file, SEGMENT_BYTES)
            }
            Err(e) => {
                warn!(
                    "cannot preallocate the log segment in {} ({e}); it grows as it is written",
                    dir.display()
                );
                let _ = std::fs::remove_file(prepared_path(&dir, next_id));
                (create_segment(&dir, next_id)?, 0)
            }
        };
        sync_dir(&dir).map_err(io_err("fsync the directory", &dir))?;
        let helpers = Helpers::start(waker, config.fsync == FsyncPolicy::Batch)
            .map_err(io_err("start the log threads for", &dir))?;
        let bytes_since_snapshot = segments.iter().map(|s| s.bytes).sum();
        let mut segments = segments;
        segments.push(Segment {
            id: next_id,
            max_seq: 0,
            bytes: segment::SEGMENT_HEADER_BYTES as u64,
        });
        let wal = Wal {
            config,
            node_id,
            _lock: lock,
            helpers,
            segments,
            active: Arc::new(active),
            active_len: segment::SEGMENT_HEADER_BYTES as u64,
            active_capacity,
            next: None,
            preparing: None,
            unprepared: None,
            unsynced: Vec::new(),
            renames: Vec::new(),
            dir_dirty: false,
            buffer: Vec::new(),
            appended_lsn: 0,
            written_lsn: 0,
            synced_lsn: 0,
            reported_lsn: 0,
            requested_lsn: 0,
            written_bytes: 0,
            written_at: Instant::now(),
            synced_records: 0,
            appended_writes: 0,
            synced_writes: 0,
            gather_back_us: None,
            synced_bytes: 0,
            syncs_seen: 0,
            start_at_bytes: 0,
            group_window: false,
            urgent_pending: false,
            failed: None,
            snapshot: None,
            snapshot_queued: 0,
            last_snapshot: None,
            snapshots_written: 0,
            bytes_since_snapshot,
            fsync_us: Histogram::new_with_bounds(1, 60_000_000, 2)
                .expect("static histogram bounds are valid"),
        };
        Ok((wal, replay, report))
    }

    /// This node's id (created once in the data directory).
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The highest lsn appended so far: a state machine that takes over the
    /// log (a failover changes the role) numbers its records after it.
    pub fn appended_lsn(&self) -> u64 {
        self.appended_lsn
    }

    /// The highest lsn reported durable so far.
    pub fn reported_lsn(&self) -> u64 {
        self.reported_lsn
    }

    /// The epoch this node last led in (failover), from the `leader_epoch`
    /// file: a node that led and was deposed must not trust the decisions it
    /// took alone (docs/FAILOVER.md).
    pub fn led_epoch(&self) -> Option<u64> {
        let path = self.config.dir.join(LED_EPOCH_FILE);
        let text = std::fs::read_to_string(&path).ok()?;
        match text.trim().parse() {
            Ok(epoch) => Some(epoch),
            Err(_) => {
                warn!(
                    "{}: not an epoch: {:?}; ignored",
                    path.display(),
                    text.trim()
                );
                None
            }
        }
    }

    /// Record durably that this node leads `epoch` (`None`: it no longer has
    /// decisions of its own to distrust). Written once per promotion, and
    /// fsynced on the reactor thread: it must be on disk before the first
    /// write is acknowledged in the epoch.
    pub fn set_led_epoch(&self, epoch: Option<u64>) -> Result<(), WalError> {
        match epoch {
            Some(e) => write_atomically(
                &self.config.dir,
                LED_EPOCH_FILE,
                format!("{e}\n").as_bytes(),
            ),
            None => {
                let path = self.config.dir.join(LED_EPOCH_FILE);
                match std::fs::remove_file(&path) {
                    Ok(()) => sync_dir(&self.config.dir)
                        .map_err(io_err("fsync the directory", &self.config.dir)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io_err("remove", &path)(e)),
                }
            }
        }
    }

    /// Why the log stopped accepting records, if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Let syncs wait for the writers the last one answered (the group-commit
    /// window of `sync::sync_loop`). Right only where those writers come back
    /// within a round trip: a master without slaves in sync. A slave's next
    /// record waits on its own vote, and a master with slaves waits on theirs,
    /// so there a window would only add its length to every write.
    pub fn set_group_window(&mut self, enabled: bool) {
        self.group_window = enabled;
        if !enabled {
            self.start_at_bytes = 0;
        }
    }

    /// Record a history id before serving (a master's first start): written and synced at once.
    pub fn start_history(&mut self, history_id: u64) -> Result<(), WalError> {
        let mut bytes = Vec::new();
        encode_record(&mut bytes, &Record::History { history_id });
        let path = self.segment_path(self.active_id());
        self.active
            .write_all_at(&bytes, self.active_len)
            .map_err(io_err("write", &path))?;
        self.active.sync_data().map_err(io_err("fsync", &path))?;
        self.active_len += bytes.len() as u64;
        if let Some(s) = self.segments.last_mut() {
            s.bytes += bytes.len() as u64;
        }
        Ok(())
    }

    fn active_id(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.id)
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.config.dir.join(segment_name(id))
    }

    /// Append a record with the state machine's log sequence number `lsn`.
    /// A resync checkpoint starts a snapshot of the store as it is now (call
    /// [`Wal::before_write`] before every later write).
    pub fn append(&mut self, lsn: u64, record: &Record) {
        debug_assert!(lsn > self.appended_lsn, "lsns increase");
        self.appended_lsn = lsn;
        if self.failed.is_some() {
            return;
        }
        if let Record::Checkpoint { seq, history_id } = record {
            // A resync replaced the store: everything before it is obsolete, so
            // the checkpoint opens a segment of its own and its snapshot names it.
            if let Some(old) = self.snapshot.take() {
                info!(
                    "resync checkpoint supersedes the snapshot at seq {}",
                    old.header.seq
                );
                self.send_snapshot_job(SnapshotJob::Abort);
            }
            self.rotate();
            let id = self.active_id();
            self.begin_snapshot(
                SnapshotHeader {
                    seq: *seq,
                    history_id: *history_id,
                    first_segment: id,
                },
                Some(lsn),
            );
        }
        // A slave's commit records only gate its ACK, which the master does not
        // wait on to answer anyone: their sync may wait for the next PREPARE's.
        self.urgent_pending |= !matches!(
            record,
            Record::Committed { .. } | Record::CommittedTxn { .. } | Record::History { .. }
        );
        if let Record::CommitDecision { ops, .. }
        | Record::Prepared { ops, .. }
        | Record::CommittedTxn { ops, .. } = record
        {
            self.appended_writes += ops.len() as u64;
        }
        let before = self.buffer.len();
        encode_record(&mut self.buffer, record);
        let added = (self.buffer.len() - before) as u64;
        if self.rotation_due(added) {
            // The record goes to the next segment, whole: the bytes before it
            // fill this one (rotate writes them), and no write passes the
            // preallocated end.
            let encoded = self.buffer.split_off(before);
            self.rotate();
            if self.failed.is_some() {
                return;
            }
            self.buffer.extend_from_slice(&encoded);
        }
        self.bytes_since_snapshot += added;
        if let Some(s) = self.segments.last_mut() {
            s.max_seq = s.max_seq.max(record_seq(record));
            s.bytes += added;
        }
        self.prepare_next();
    }

    /// Whether a record of `added` bytes should start the next segment: one
    /// is ready, and this one was not preallocated or has no room left.
    fn rotation_due(&self, added: u64) -> bool {
        let Some(s) = self.segments.last() else {
            return false;
        };
        // Room is kept for the marker that closes the segment.
        self.next.is_some()
            && (self.active_capacity == 0
                || (s.bytes > segment::SEGMENT_HEADER_BYTES as u64
                    && s.bytes + added + SEGMENT_END_BYTES as u64 > self.active_capacity))
    }

    /// Start preallocating the next segment once the active one is half full
    /// (most servers in tests never get there) or was not preallocated.
    fn prepare_next(&mut self) {
        if self.next.is_some() || self.preparing.is_some() || self.failed.is_some() {
            return;
        }
        let used = self.segments.last().map_or(0, |s| s.bytes);
        if self.active_capacity != 0 && used < self.active_capacity / 2 {
            return;
        }
        let id = self.active_id() + 1;
        if self.unprepared == Some(id) {
            return;
        }
        match self.helpers.prepare(self.config.dir.clone(), id) {
            Ok(thread) => self.preparing = Some((id, thread)),
            // Not fatal: the active segment grows past its preallocated end.
            Err(e) => {
                warn!("cannot start preallocating the next log segment: {e}");
                self.unprepared = Some(id);
            }
        }
    }

    /// A preallocation finished: keep it for the next rotation if it is still
    /// the next segment's, else delete it.
    fn prepared(&mut self, id: u64, result: Result<(File, PathBuf), String>) {
        if let Some((_, thread)) = self.preparing.take_if(|(pid, _)| *pid == id) {
            let _ = thread.join(); // it has sent its report: ends at once
        }
        match result {
            Ok((file, tmp)) if id == self.active_id() + 1 && self.failed.is_none() => {
                self.next = Some(Prepared { id, file, tmp });
            }
            Ok((_, tmp)) => {
                // A rotation could not wait for it and created the segment itself.
                if let Err(e) = std::fs::remove_file(&tmp) {
                    warn!("cannot delete {}: {e}", tmp.display());
                }
            }
            Err(why) => {
                warn!("{why}; the log segment after this one grows as it is written");
                self.unprepared = Some(id);
            }
        }
    }

    /// Close the active segment and open the next one.
    fn rotate(&mut self) {
        self.write_buffer();
        if self.failed.is_some() {
            return;
        }
        let id = self.active_id() + 1;
        // Close the segment with its end marker first: recovery reads zeros
        // in a segment that is not the newest as a torn tail and discards what
        // follows, unless a marker says they are unused space, and takes a
        // prepared segment still under its temporary name only after a closed
        // one (see `adopt_prepared`). The marker must precede any record of the
        // next segment even if the process dies right after (a crash of the
        // process, not the machine, loses nothing under every policy), and the
        // sync thread fsyncs it before it covers any record after it. A marker
        // is a write into the page cache; cutting the zeros off instead
        // (ftruncate) held the reactor 0.3–12 ms beside the sync thread's
        // fsync of the same file.
        let mut marker = Vec::with_capacity(SEGMENT_END_BYTES);
        encode_segment_end(&mut marker, id - 1);
        if let Err(e) = self.active.write_all_at(&marker, self.active_len) {
            let path = self.segment_path(id - 1);
            self.fail(format!("cannot write {}: {e}", path.display()));
            return;
        }
        self.active_len += marker.len() as u64;
        if let Some(s) = self.segments.last_mut() {
            s.bytes += marker.len() as u64;
        }
        let opened = match self.next.take() {
            Some(p) if p.id == id => {
                // Renamed by the sync thread, before anything in it is synced.
                self.renames.push((p.tmp, self.segment_path(id)));
                Ok((p.file, SEGMENT_BYTES))
            }
            // None ready (a snapshot or a resync rotates whenever it starts):
            // a segment that grows as it is written, left once the next is ready.
            other => {
                if let Some(p) = other {
                    let _ = std::fs::remove_file(&p.tmp);
                }
                create_segment(&self.config.dir, id)
                    .map(|file| (file, 0))
                    .map_err(|e| e.to_string())
            }
        };
        match opened {
            Ok((file, capacity)) => {
                let old = std::mem::replace(&mut self.active, Arc::new(file));
                self.unsynced.push(old);
                self.active_len = segment::SEGMENT_HEADER_BYTES as u64;
                self.active_capacity = capacity;
                self.dir_dirty = true;
                self.segments.push(Segment {
                    id,
                    max_seq: 0,
                    bytes: segment::SEGMENT_HEADER_BYTES as u64,
                });
            }
            Err(why) => self.fail(why),
        }
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            error!("write-ahead log failed: {why}; refusing writes from now on (reads go on)");
            self.failed = Some(why);
        }
    }

    /// Write what was appended with one `write`.
    fn write_buffer(&mut self) {
        if self.buffer.is_empty() || self.failed.is_some() {
            return;
        }
        let path = self.segment_path(self.active_id());
        let at = self.active_len;
        let result = match fault::write_fault() {
            None => self.active.write_all_at(&self.buffer, at),
            Some((fault::WriteFault::Fail, e)) => Err(e),
            Some((fault::WriteFault::Short, e)) => {
                let half = self.buffer.len() / 2;
                let _ = self.active.write_all_at(&self.buffer[..half], at);
                Err(e)
            }
        };
        match result {
            Ok(()) => {
                self.active_len += self.buffer.len() as u64;
                self.written_bytes += self.buffer.len() as u64;
                self.written_at = Instant::now();
                self.buffer.clear();
                self.written_lsn = self.appended_lsn;
            }
            Err(e) => self.fail(format!("cannot write {}: {e}", path.display())),
        }
    }

    /// The durable lsn to report now, if it moved.
    fn durable(&mut self) -> Option<u64> {
        let mut durable = match self.config.fsync {
            FsyncPolicy::Always => self.synced_lsn,
            FsyncPolicy::Batch | FsyncPolicy::Never => self.written_lsn,
        };
        if let Some(lsn) = self.snapshot.as_ref().and_then(|s| s.checkpoint_lsn) {
            durable = durable.min(lsn - 1);
        }
        if durable > self.reported_lsn && self.failed.is_none() {
            self.reported_lsn = durable;
            Some(durable)
        } else {
            None
        }
    }

    /// End of a turn: write what was appended, start a sync if none is in
    /// flight, and return the lsn that became durable, if any.
    pub fn flush(&mut self) -> Option<u64> {
        self.write_buffer();
        self.request_sync();
        self.durable()
    }

    fn request_sync(&mut self) {
        self.send_sync(false);
    }

    /// Hand the sync thread what was written since the last request (with
    /// `update`, also when nothing new was written: a new target to gather to).
    fn send_sync(&mut self, update: bool) {
        if self.failed.is_some() {
            return;
        }
        // Batch syncs too (the thread spaces them out), so a crash loses at most about a second.
        let needed = match self.config.fsync {
            FsyncPolicy::Never => false,
            FsyncPolicy::Always | FsyncPolicy::Batch => {
                self.written_lsn > self.requested_lsn
                    || (update && self.written_lsn > self.synced_lsn)
            }
        };
        if !needed && !self.dir_dirty {
            return;
        }
        let rotated = std::mem::take(&mut self.unsynced);
        let renames = std::mem::take(&mut self.renames);
        let files = vec![self.active.clone()];
        let dir = std::mem::take(&mut self.dir_dirty).then(|| self.config.dir.clone());
        let request = SyncRequest {
            renames,
            rotated,
            lsn: self.written_lsn,
            written_bytes: self.written_bytes,
            written_at: self.written_at,
            // Everything appended is written by now (`write_buffer` ran first).
            written_writes: self.appended_writes,
            seen_syncs: self.syncs_seen,
            start_at_bytes: self.start_at_bytes,
            urgent: std::mem::take(&mut self.urgent_pending),
            files,
            dir,
        };
        if self.helpers.sync.send(request).is_err() {
            self.fail("the log's sync thread is gone".into());
            return;
        }
        self.requested_lsn = self.written_lsn;
    }

    /// The helpers woke the reactor: take their reports. Returns the lsn that
    /// became durable, if any, and whether a snapshot finished or failed.
    pub fn on_wake(&mut self) -> Option<u64> {
        let mut synced = false;
        while let Ok(done) = self.helpers.done.try_recv() {
            match done {
                Done::Synced {
                    lsn,
                    micros,
                    written_bytes,
                    written_writes,
                    gather_back_us,
                } => {
                    self.synced_writes = self.synced_writes.max(written_writes);
                    // lsns number records one by one.
                    self.synced_records += lsn.saturating_sub(self.synced_lsn);
                    self.synced_lsn = self.synced_lsn.max(lsn);
                    self.gather_back_us = gather_back_us;
                    let _ = self.fsync_us.record(micros.max(1));
                    // The writers this sync covered are answered now and will be
                    // back: gather them with those already waiting into one sync.
                    let covered = written_bytes.saturating_sub(self.synced_bytes);
                    self.synced_bytes = self.synced_bytes.max(written_bytes);
                    self.syncs_seen += 1;
                    self.start_at_bytes = if self.group_window {
                        self.written_bytes + covered * 9 / 10
                    } else {
                        0
                    };
                    synced = true;
                }
                Done::SyncFailed(why) => self.fail(why),
                Done::Prepared { id, result } => self.prepared(id, result),
                Done::BlockWritten => self.snapshot_queued = self.snapshot_queued.saturating_sub(1),
                Done::SnapshotWritten { id, bytes } => self.snapshot_done(id, bytes),
                Done::SnapshotFailed { id, why } => self.snapshot_failed(id, why),
            }
        }
        self.send_sync(synced);
        self.durable()
    }

    /// Whether the log has grown enough since the last snapshot to take one.
    pub fn snapshot_due(&self) -> bool {
        self.snapshot.is_none()
            && self.failed.is_none()
            && self.bytes_since_snapshot >= self.config.snapshot_log_bytes
    }

    /// Start a snapshot of the store as it is now, at `seq` of `history_id`.
    pub fn start_snapshot(&mut self, seq: u64, history_id: u64) {
        if self.snapshot.is_some() || self.failed.is_some() {
            return;
        }
        self.rotate();
        // Records above `seq` (decided or prepared, not yet applied) may sit in
        // older segments: replay must start at the oldest segment holding one.
        let active = self.active_id();
        let first_segment = self
            .segments
            .iter()
            .filter(|s| s.max_seq > seq || s.id == active)
            .map(|s| s.id)
            .min()
            .unwrap_or(active);
        self.begin_snapshot(
            SnapshotHeader {
                seq,
                history_id,
                first_segment,
            },
            None,
        );
    }

    fn begin_snapshot(&mut self, header: SnapshotHeader, checkpoint_lsn: Option<u64>) {
        let id = self.active_id();
        info!(
            "writing a snapshot at seq {} to {}{}",
            header.seq,
            snapshot_name(id),
            if checkpoint_lsn.is_some() {
                " (resync checkpoint)"
            } else {
                ""
            }
        );
        self.bytes_since_snapshot = 0;
        self.snapshot = Some(DiskSnapshot {
            id,
            header,
            copy: ShardCopy::new(),
            checkpoint_lsn,
            started: Instant::now(),
            finishing: false,
        });
        let tmp = self.config.dir.join(format!("{}.tmp", snapshot_name(id)));
        self.send_snapshot_job(SnapshotJob::Begin {
            id,
            tmp,
            header: header.encode().to_vec(),
        });
    }

    fn send_snapshot_job(&mut self, job: SnapshotJob) {
        // Blocks only if the queue is full, which `snapshot_step` never lets happen.
        if self.helpers.snapshot.send(job).is_err() {
            self.fail("the log's snapshot thread is gone".into());
        }
    }

    /// `key` is about to change in `store`: a snapshot in progress keeps its shard as it was.
    pub fn before_write(&mut self, store: &Store, key: &[u8]) {
        if let Some(s) = self.snapshot.as_mut() {
            s.copy.before_write(store, key);
        }
    }

    /// `key`, whose [`Store::key_hash`] is `hash`, is about to change:
    /// [`Wal::before_write`] for a caller that has the hash already.
    pub fn before_key_write(&mut self, store: &Store, key: &[u8], hash: u64) {
        if let Some(s) = self.snapshot.as_mut() {
            s.copy.before_key_write(store, key, hash);
        }
    }

    /// The store is about to be cleared: a snapshot in progress copies every shard it still needs.
    pub fn before_clear(&mut self, store: &Store) {
        if let Some(s) = self.snapshot.as_mut() {
            s.copy.before_clear(store);
        }
    }

    /// Bytes the copy of a disk snapshot in progress holds (0 without one):
    /// shards copied before a write and not yet handed to the writer thread.
    pub fn snapshot_held_bytes(&self) -> usize {
        self.snapshot.as_ref().map_or(0, |s| s.copy.held_bytes())
    }

    /// Copy and hand over one bounded step of a snapshot in progress.
    /// Returns whether more steps can be taken at once.
    pub fn snapshot_step(&mut self, store: &Store) -> bool {
        let Some(s) = self.snapshot.as_mut() else {
            return false;
        };
        if s.finishing || self.snapshot_queued + 1 >= sync::SNAPSHOT_QUEUE {
            return false; // wait for the thread (it wakes the reactor)
        }
        s.copy.fill(store, SNAPSHOT_BLOCK_BYTES);
        let block = s.copy.take(SNAPSHOT_BLOCK_BYTES).to_vec();
        s.copy.compact();
        if !block.is_empty() {
            self.snapshot_queued += 1;
            self.send_snapshot_job(SnapshotJob::Block(block));
            return true;
        }
        // Every shard copied and handed over.
        s.finishing = true;
        let entries = s.copy.entries();
        let id = s.id;
        let first_segment = s.header.first_segment;
        let path = self.config.dir.join(snapshot_name(id));
        let mut obsolete: Vec<PathBuf> = self
            .segments
            .iter()
            .filter(|seg| seg.id < first_segment)
            .map(|seg| self.segment_path(seg.id))
            .collect();
        if let Ok(names) = list_dir(&self.config.dir) {
            obsolete.extend(
                names
                    .iter()
                    .filter(|n| parse_snapshot_name(n).is_some_and(|old| old < id))
                    .map(|n| self.config.dir.join(n)),
            );
        }
        let dir = self.config.dir.clone();
        self.send_snapshot_job(SnapshotJob::Finish {
            entries,
            path,
            dir,
            obsolete,
        });
        false
    }

    /// Whether a snapshot has work the reactor should do without waiting for an event.
    pub fn snapshot_pending(&self) -> bool {
        self.snapshot
            .as_ref()
            .is_some_and(|s| !s.finishing && self.snapshot_queued + 1 < sync::SNAPSHOT_QUEUE)
    }

    fn snapshot_done(&mut self, id: u64, bytes: u64) {
        let Some(s) = self.snapshot.take_if(|s| s.id == id) else {
            return;
        };
        let millis = s.started.elapsed().as_millis() as u64;
        info!(
            "snapshot at seq {} complete: {} keys, {bytes} bytes in {millis} ms",
            s.header.seq,
            s.copy.entries()
        );
        self.segments.retain(|seg| seg.id >= s.header.first_segment);
        self.snapshots_written += 1;
        self.last_snapshot = Some(LastSnapshot {
            seq: s.header.seq,
            bytes,
            millis,
            at: Instant::now(),
        });
    }

    fn snapshot_failed(&mut self, id: u64, why: String) {
        let Some(s) = self.snapshot.take_if(|s| s.id == id) else {
            return;
        };
        if s.checkpoint_lsn.is_some() {
            // The resync cannot be made durable: stop acknowledging.
            self.fail(format!("resync checkpoint failed: {why}"));
        } else {
            warn!("snapshot failed: {why}; the log keeps growing until the next attempt");
        }
    }

    /// The log's lines of STATS.
    pub fn stats(&self) -> String {
        let log_bytes: u64 = self.segments.iter().map(|s| s.bytes).sum();
        let mut text = format!(
            "wal_dir {}\nwal_fsync {}\nwal_log_bytes {log_bytes}\nwal_segments {}\n\
             wal_fsyncs {}\nwal_fsync_records {}\nwal_fsync_writes {}\nwal_fsync_p50_us {}\nwal_fsync_p99_us {}\n\
             wal_fsync_max_us {}\nwal_gather_back_us {}\nsnapshots_written {}\n",
            self.config.dir.display(),
            self.config.fsync.name(),
            self.segments.len(),
            self.fsync_us.len(),
            self.synced_records,
            self.synced_writes,
            self.fsync_us.value_at_quantile(0.5),
            self.fsync_us.value_at_quantile(0.99),
            self.fsync_us.max(),
            self.gather_back_us.unwrap_or(0),
            self.snapshots_written,
        );
        if let Some(last) = &self.last_snapshot {
            text.push_str(&format!(
                "last_snapshot_seq {}\nlast_snapshot_bytes {}\nlast_snapshot_ms {}\nlast_snapshot_age_s {}\n",
                last.seq,
                last.bytes,
                last.millis,
                last.at.elapsed().as_secs()
            ));
        }
        text.push_str(&format!(
            "snapshot_in_progress {}\n",
            u8::from(self.snapshot.is_some())
        ));
        if let Some(why) = &self.failed {
            text.push_str(&format!("wal_error {}\n", why.replace('\n', " ")));
        }
        text
    }
}

fn create_segment(dir: &Path, id: u64) -> Result<File, WalError> {
    let path = dir.join(segment_name(id));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io_err("create", &path))?;
    file.write_all(&segment_header(id))
        .map_err(io_err("write", &path))?;
    Ok(file)
}

/// Give their names to prepared segments the log had moved on to before the
/// sync thread renamed them (the process stopped in between): the segment after
/// the newest named one, when that one was closed by its end marker or this one
/// holds a record; with no named segment left (a snapshot deleted the ones it
/// covers first), the oldest one that holds a record. A prepared segment never
/// written to is left to be deleted as before.
fn adopt_prepared(
    dir: &Path,
    names: &[String],
    report: &mut RecoveryReport,
) -> Result<(), WalError> {
    let prepared: Vec<u64> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".tmp").and_then(parse_segment_name))
        .collect();
    if prepared.is_empty() {
        return Ok(());
    }
    let mut newest = names.iter().filter_map(|n| parse_segment_name(n)).max();
    let mut adopted = false;
    loop {
        let candidate = match newest {
            Some(id) => id + 1,
            None => match prepared.iter().min() {
                Some(&id) => id,
                None => break,
            },
        };
        if !prepared.contains(&candidate) {
            break;
        }
        let tmp = prepared_path(dir, candidate);
        let bytes = std::fs::read(&tmp).map_err(io_err("read", &tmp))?;
        let holds_records = !segment::scan(&bytes, candidate).records.is_empty();
        let after_closed = match newest {
            Some(id) => {
                let path = dir.join(segment_name(id));
                let prev = std::fs::read(&path).map_err(io_err("read", &path))?;
                matches!(segment::scan(&prev, id).tail, Tail::Closed { .. })
            }
            None => false,
        };
        if !(holds_records || after_closed) {
            break;
        }
        let path = dir.join(segment_name(candidate));
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
        info!(
            "{} was in use under its temporary name; renamed to {}",
            tmp.display(),
            path.display()
        );
        report.repairs.push(format!(
            "renamed {} to {} (in use, not yet renamed when the server stopped)",
            tmp.display(),
            path.display()
        ));
        newest = Some(candidate);
        adopted = true;
    }
    if adopted {
        sync_dir(dir).map_err(io_err("fsync", dir))?;
    }
    Ok(())
}

/// Rebuild the store from the newest snapshot and the segments after it.
fn recover(dir: &Path, repair: bool) -> Result<(Replay, Vec<Segment>, RecoveryReport), WalError> {
    let mut report = RecoveryReport::default();
    adopt_prepared(dir, &list_dir(dir)?, &mut report)?;
    let names = list_dir(dir)?;
    for name in names.iter().filter(|n| n.ends_with(".tmp")) {
        // An unfinished snapshot or node id, or a prepared segment the log
        // never moved on to (`adopt_prepared` took those it did): unused.
        let path = dir.join(name);
        std::fs::remove_file(&path).map_err(io_err("delete", &path))?;
    }
    let mut snapshots: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_snapshot_name(n))
        .collect();
    snapshots.sort_unstable();
    let mut replay = Replay::new(Store::new(), 0, 0);
    let mut first_segment = 0;
    while let Some(id) = snapshots.pop() {
        let path = dir.join(snapshot_name(id));
        match snapshot::load(&path) {
            Ok((header, store)) => {
                info!(
                    "loaded snapshot {} at seq {} ({} keys)",
                    path.display(),
                    header.seq,
                    store.len()
                );
                replay = Replay::new(store, header.seq, header.history_id);
                first_segment = header.first_segment;
                report.snapshot = Some((path, header.seq));
                break;
            }
            Err(e) if repair => {
                let aside = move_aside(&path, "corrupt")?;
                report.repairs.push(format!(
                    "snapshot {} does not load ({e}); moved to {}",
                    path.display(),
                    aside.display()
                ));
            }
            Err(e) => {
                return Err(WalError::Invalid {
                    path,
                    why: format!(
                        "{e}; run `dkvs-server --repair -d DIR` to fall back to an older snapshot and the log"
                    ),
                });
            }
        }
    }
    let mut ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    ids.sort_unstable();
    let mut segments = Vec::new();
    let mut stop = false;
    let newest = ids.last().copied();
    for id in ids {
        let path = dir.join(segment_name(id));
        if id < first_segment {
            // Covered by the snapshot; its deletion was interrupted.
            std::fs::remove_file(&path).map_err(io_err("delete", &path))?;
            continue;
        }
        if stop {
            let aside = move_aside(&path, "discarded")?;
            let msg = format!(
                "segment {} follows a cut and was never acknowledged; moved to {}",
                path.display(),
                aside.display()
            );
            warn!("{msg}");
            report.repairs.push(msg);
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        let scanned = scan(&bytes, id);
        let mut max_seq = 0;
        let mut valid_end = bytes.len();
        for (record, end) in &scanned.records {
            report.records += 1;
            match replay.apply(record) {
                Ok(Step::Continue) => max_seq = max_seq.max(record_seq(record)),
                Ok(Step::UncoveredCheckpoint) => {
                    let msg = format!(
                        "{} holds a resync checkpoint whose snapshot never completed; \
                         it and what follows were never acknowledged",
                        path.display()
                    );
                    warn!("{msg}");
                    report.repairs.push(msg);
                    stop = true;
                    break;
                }
                Err(why) => {
                    return Err(WalError::Invalid {
                        path,
                        why: format!("record ending at byte {end}: {why}"),
                    });
                }
            }
        }
        if stop {
            let aside = move_aside(&path, "discarded")?;
            report
                .repairs
                .push(format!("moved {} to {}", path.display(), aside.display()));
            continue;
        }
        report.segments += 1;
        match scanned.tail {
            Tail::Clean => {}
            // Closed by rotation; the zeros after the marker are unused space.
            Tail::Closed { offset } => valid_end = offset,
            Tail::Zeros { offset } if Some(id) == newest => {
                // The unused preallocated space of the segment written last:
                // cut, so that it reads as a finished segment once the next
                // one is created.
                truncate(&path, offset)?;
                valid_end = offset;
            }
            Tail::Zeros { offset } => {
                // Rotation cuts a segment before the next one is created, and
                // fsyncs the cut before anything after it is reported durable:
                // zeros here are a crash before that (or written bytes the
                // crash lost), and nothing after them was acknowledged.
                cut_tail(&path, &bytes, offset, "torn", &mut report)?;
                warn!(
                    "{}: {} zero bytes at byte {offset} in a segment that is not the newest; \
                     cut and kept beside it",
                    path.display(),
                    bytes.len() - offset
                );
                valid_end = offset;
                stop = true;
            }
            Tail::Torn { offset, why } => {
                cut_tail(&path, &bytes, offset, "torn", &mut report)?;
                warn!(
                    "{}: torn tail at byte {offset} ({why}); {} bytes cut and kept beside it",
                    path.display(),
                    bytes.len() - offset
                );
                valid_end = offset;
                stop = true;
            }
            Tail::Corrupt { offset, why } if repair => {
                cut_tail(&path, &bytes, offset, "corrupt", &mut report)?;
                warn!(
                    "{}: damaged record at byte {offset} ({why}); repaired by cutting {} bytes",
                    path.display(),
                    bytes.len() - offset
                );
                valid_end = offset;
                stop = true;
            }
            Tail::Corrupt { offset, why } => {
                return Err(WalError::Corrupt { path, offset, why });
            }
        }
        segments.push(Segment {
            id,
            max_seq,
            bytes: valid_end as u64,
        });
    }
    Ok((replay, segments, report))
}

/// Truncate the segment at `path` to `len` bytes, durably.
fn truncate(path: &Path, len: usize) -> Result<(), WalError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    file.set_len(len as u64).map_err(io_err("truncate", path))?;
    file.sync_all().map_err(io_err("fsync", path))
}

/// Keep `bytes[offset..]` in a side file and truncate the segment to `offset`.
fn cut_tail(
    path: &Path,
    bytes: &[u8],
    offset: usize,
    why: &str,
    report: &mut RecoveryReport,
) -> Result<(), WalError> {
    let side = PathBuf::from(format!("{}.{why}-{}", path.display(), now_tag()));
    // The zeros after the last non-zero byte are the segment's unused
    // preallocated space (up to SEGMENT_BYTES of it), not data: not kept.
    let kept_end = bytes[offset..]
        .iter()
        .rposition(|&b| b != 0)
        .map_or(offset, |last| offset + last + 1);
    std::fs::write(&side, &bytes[offset..kept_end]).map_err(io_err("write", &side))?;
    truncate(path, offset)?;
    report.repairs.push(format!(
        "cut {} bytes off {} at byte {offset} ({why}); kept in {}{}",
        bytes.len() - offset,
        path.display(),
        side.display(),
        match bytes.len() - kept_end {
            0 => String::new(),
            zeros => format!(" but for the {zeros} zero bytes at the end"),
        }
    ));
    Ok(())
}

#[cfg(test)]
mod tests;
