//! Segment files: naming, the pool of spare (pre-written) segments and the
//! keeper thread that fills and recycles it.
//!
//! A segment is written in place; it only grows when one group is larger
//! than a segment. Fully truncated segments go back to the pool with their
//! header zeroed instead of being deleted, and the keeper thread fills a new
//! spare with zeros (blocks allocated and written once) only when none is
//! left. On a busy WAL the file system therefore allocates, frees and
//! discards almost nothing, and an `fdatasync` after a group rarely has file
//! metadata to commit. A segment taken when no spare was ready is reserved
//! but not zero-filled.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use super::format::SEGMENT_HEADER_LEN;

const SUFFIX: &str = ".wal";

/// `<dir>/<id:020>.wal`
pub(super) fn path_of(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SUFFIX}"))
}

/// The id of a segment file name, if it is one.
pub(super) fn id_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(SUFFIX)?.parse().ok()
}

/// An open segment file.
#[derive(Debug)]
pub(super) struct SegmentFile {
    pub id: u64,
    pub file: File,
}

pub(super) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Allocate `len` bytes of `file`'s blocks.
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len)
        .map_err(std::io::Error::from)
}

/// The pool and the keeper thread's work, shared with the committer.
pub(super) struct Pool {
    dir: PathBuf,
    segment_bytes: u64,
    /// Spares kept at most (recycled segments beyond it are deleted).
    target_spares: usize,
    state: Mutex<PoolState>,
    wake: Condvar,
}

struct PoolState {
    next_id: u64,
    spares: Vec<SegmentFile>,
    /// The keeper is preparing a spare right now.
    preparing: bool,
    /// The pool has been filled once (at open, up to the target); from then
    /// on recycled segments refill it, and a new one is prepared only when
    /// none is left.
    filled: bool,
    /// Fully truncated segments to zero and return to the pool.
    retired: VecDeque<SegmentFile>,
    /// Set when preparing a spare failed (disk full); cleared on success.
    last_error: Option<String>,
    closing: bool,
}

impl Pool {
    pub fn new(
        dir: PathBuf,
        segment_bytes: u64,
        target_spares: usize,
        next_id: u64,
        spares: Vec<SegmentFile>,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            dir,
            segment_bytes,
            // One more than asked: the log's next segment comes from here.
            target_spares: target_spares + 1,
            state: Mutex::new(PoolState {
                next_id,
                spares,
                preparing: false,
                filled: false,
                retired: VecDeque::new(),
                last_error: None,
                closing: false,
            }),
            wake: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    pub fn spares(&self) -> usize {
        self.lock().spares.len()
    }

    /// A segment to write next: a spare if one is ready, else a new file
    /// with its blocks reserved (a full disk refuses it here, before any
    /// write).
    pub fn take(&self) -> std::io::Result<SegmentFile> {
        let (spare, id) = {
            let mut st = self.lock();
            // A spare on its way is worth waiting for: making another beside
            // it would take the room of two on a nearly full disk.
            while st.spares.is_empty() && st.preparing {
                st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            match st.spares.pop() {
                Some(s) => (Some(s), 0),
                None => {
                    let id = st.next_id;
                    st.next_id += 1;
                    (None, id)
                }
            }
        };
        self.wake.notify_all();
        if let Some(s) = spare {
            tracing::debug!(id = s.id, "wal: segment from the spares");
            return Ok(s);
        }
        tracing::debug!(id, "wal: no spare segment ready, making one");
        let path = path_of(&self.dir, id);
        let made = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            reserve(&file, self.segment_bytes)?;
            file.sync_all()?;
            fsync_dir(&self.dir)?;
            Ok(SegmentFile { id, file })
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        made
    }

    /// Hand a segment whose entries are all truncated back to the pool.
    pub fn retire(&self, seg: SegmentFile) {
        self.lock().retired.push_back(seg);
        self.wake.notify_all();
    }

    pub fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_all();
    }

    /// Start the keeper thread.
    pub fn spawn_keeper(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let pool = self.clone();
        std::thread::Builder::new()
            .name("shoal-wal-segments".into())
            .spawn(move || pool.keep())
    }

    fn keep(&self) {
        let mut backoff: Option<Duration> = None;
        loop {
            enum Work {
                Retire(SegmentFile),
                Prepare(u64),
            }
            let work = {
                let mut st = self.lock();
                loop {
                    // Retired segments are finished even when closing: a
                    // header left valid would read as a live segment.
                    if let Some(seg) = st.retired.pop_front() {
                        break Work::Retire(seg);
                    }
                    if st.closing {
                        return;
                    }
                    if st.spares.len() >= self.target_spares {
                        st.filled = true;
                    }
                    // Writing a new segment (zeros, then an fsync) competes
                    // with the log's own fsyncs: after the first fill it is
                    // done only when no spare is left, since segments the
                    // flusher truncates come back as spares. The first fill
                    // counts the segment the log starts writing in.
                    let low = if st.filled { 1 } else { self.target_spares };
                    if st.spares.len() < low && backoff.is_none() {
                        let id = st.next_id;
                        st.next_id += 1;
                        st.preparing = true;
                        break Work::Prepare(id);
                    }
                    st = match backoff.take() {
                        // After a failure, try again a little later.
                        Some(d) => {
                            self.wake
                                .wait_timeout(st, d)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0
                        }
                        None => self.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
                    };
                }
            };
            match work {
                Work::Retire(seg) => self.recycle(seg),
                Work::Prepare(id) => {
                    tracing::debug!(id, "wal: preparing a spare segment");
                    let made = self.prepare(id);
                    let mut st = self.lock();
                    st.preparing = false;
                    match made {
                        Ok(seg) => {
                            st.spares.push(seg);
                            st.filled |= st.spares.len() >= self.target_spares;
                            st.last_error = None;
                        }
                        Err(e) => {
                            if st.last_error.is_none() {
                                tracing::warn!(id, "wal: cannot prepare a spare segment: {e}");
                            }
                            st.last_error = Some(e.to_string());
                            backoff = Some(Duration::from_secs(1));
                        }
                    }
                    drop(st);
                    self.wake.notify_all();
                }
            }
        }
    }

    /// Zero the header so the file reads as a spare, and keep it; or
    /// delete it when the pool is full or its size is off.
    fn recycle(&self, seg: SegmentFile) {
        // Only a fully written file of the right size is worth keeping: a
        // sparse one (made when no spare was ready) would allocate again,
        // and deleting it gives its blocks back to a full disk.
        let whole = seg.file.metadata().is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.len() == self.segment_bytes && m.blocks().saturating_mul(512) >= m.len()
        });
        let keep = whole && self.lock().spares.len() < self.target_spares;
        tracing::debug!(id = seg.id, keep, "wal: recycling a segment");
        let path = path_of(&self.dir, seg.id);
        if keep {
            let zeroed = seg
                .file
                .write_all_at(&[0u8; SEGMENT_HEADER_LEN], 0)
                .and_then(|()| seg.file.sync_data());
            match zeroed {
                Ok(()) => {
                    self.lock().spares.push(seg);
                    return;
                }
                Err(e) => tracing::warn!(id = seg.id, "wal: cannot recycle a segment: {e}"),
            }
        }
        drop(seg);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), "wal: cannot delete a segment: {e}");
        }
    }

    /// A new spare: every block written (zeros), so writing it later needs
    /// no allocation and its fdatasyncs no metadata.
    fn prepare(&self, id: u64) -> std::io::Result<SegmentFile> {
        let path = path_of(&self.dir, id);
        let made = (|| {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            // Reserve first: on a nearly full disk this fails at once
            // instead of filling it and starving the active segment.
            reserve(&file, self.segment_bytes)?;
            let chunk = vec![0u8; 1 << 20];
            let mut left = self.segment_bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                file.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            file.sync_all()?;
            fsync_dir(&self.dir)?;
            Ok(SegmentFile { id, file })
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        made
    }
}
