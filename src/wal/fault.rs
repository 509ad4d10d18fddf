//! Fault-injection points of the write-ahead log, as FoundationDB's BUGGIFY
//! marks them: compiled in only with the `fault-injection` cargo feature, so
//! a release build has none of it.
//!
//! With the feature, `DKVS_FAULT=POINT@N[,POINT@N…]` makes the N-th call
//! (counting from one) at POINT fail: `write` (the append fails with EIO),
//! `short-write` (half the bytes are written, then ENOSPC), `fsync` (the sync
//! fails with EIO) and `crash-before-fsync` (the process aborts just before an
//! fsync, leaving written but unsynced bytes).

use std::io;

/// A place where the log may fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Appending to a segment.
    Write,
    /// Appending, cut short.
    ShortWrite,
    /// Syncing a segment.
    Fsync,
}

/// What an injected fault at an append does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// The write fails before any byte is written.
    Fail,
    /// Half the bytes are written, then it fails.
    Short,
}

#[cfg(feature = "fault-injection")]
mod enabled {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    static CALLS: [AtomicU64; 4] = [
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ];
    static PLAN: Mutex<Option<Vec<(String, u64)>>> = Mutex::new(None);

    fn plan() -> Vec<(String, u64)> {
        let mut guard = PLAN.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .get_or_insert_with(|| {
                std::env::var("DKVS_FAULT")
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|spec| {
                        let (point, n) = spec.split_once('@')?;
                        Some((point.trim().to_string(), n.trim().parse().ok()?))
                    })
                    .collect()
            })
            .clone()
    }

    /// Count a call at `name` (slot `slot`); whether this call is the planned one.
    pub fn hit(name: &str, slot: usize) -> bool {
        let n = CALLS[slot].fetch_add(1, Ordering::SeqCst) + 1;
        plan().iter().any(|(p, at)| p == name && *at == n)
    }
}

/// A fault planned for this call at `point`, if any.
pub fn inject(point: Point) -> Option<io::Error> {
    #[cfg(feature = "fault-injection")]
    {
        match point {
            Point::Fsync => {
                if enabled::hit("crash-before-fsync", 3) {
                    log::error!("fault injection: crash before fsync");
                    std::process::abort();
                }
                if enabled::hit("fsync", 2) {
                    return Some(io::Error::from_raw_os_error(5)); // EIO
                }
            }
            Point::Write => {
                if enabled::hit("write", 0) {
                    return Some(io::Error::from_raw_os_error(5)); // EIO
                }
            }
            Point::ShortWrite => {
                if enabled::hit("short-write", 1) {
                    return Some(io::Error::from_raw_os_error(28)); // ENOSPC
                }
            }
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
    None
}

/// The fault planned for this append, if any.
pub fn write_fault() -> Option<(WriteFault, io::Error)> {
    if let Some(e) = inject(Point::Write) {
        return Some((WriteFault::Fail, e));
    }
    inject(Point::ShortWrite).map(|e| (WriteFault::Short, e))
}
