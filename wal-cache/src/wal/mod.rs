//! The write-ahead log: segment files, group commit, replay, truncation and
//! recovery from a failed write.
//!
//! Layout: `WalOptions::dir` holds fixed-size segment files
//! (`<id>.wal`, see [`format`] for what is inside), the truncation mark
//! (`TRUNCATED`, see [`mark`]) and a `LOCK` file. One committer thread
//! makes every write: it turns everything queued into one write and one
//! `fdatasync` (group commit), so the fsync rate is bounded by the disk,
//! not by the request rate. Segments whose entries are all truncated are
//! recycled rather than deleted.
//!
//! A failed write or fsync (a full disk, an I/O error) fails its group and
//! everything queued behind it, and the log then refuses appends: what it
//! was asked to hold after the failure point is not durable, and the
//! caller must first take back what it built on those entries (the broker
//! rolls back its shards' tails), then call [`Wal::resume`]. The log then
//! continues in a new segment whose header marks where the durable log
//! ended, so from then on the failed group's bytes are never replayed, and
//! appends are accepted again as soon as a segment can be written. (A crash
//! before that segment exists replays whatever of the failed group reached
//! the disk: its callers were told it failed, not that it was not written.)
//!
//! Seqs strictly increase for the life of the directory: those of a failed
//! or torn group are never handed out again.

mod committer;
mod faults;
mod format;
mod mark;
mod recovery;
mod segments;

use std::{
    collections::VecDeque,
    fmt,
    fs::{File, TryLockError},
    io::Read,
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use committer::Committer;
#[cfg(feature = "testing")]
pub use faults::WalFaults;
pub use recovery::Damage;
use segments::{Pool, SegmentFile};

/// Default cap on the payload bytes of one commit group.
pub const DEFAULT_MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;
/// Default size of a segment file.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Record lengths are `u32`.
const MAX_ENTRY_BYTES: usize = u32::MAX as usize - 64;

/// Where and how to open the WAL.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Directory of the segment files (created if missing). Use a directory
    /// of its own: the WAL owns everything inside it.
    pub dir: PathBuf,
    /// Cap on one group's payload bytes (default 16 MiB). A group always
    /// takes at least one entry, so a larger single entry is still written.
    pub max_group_bytes: usize,
    /// Size of a segment file (default 64 MiB). An entry larger than a
    /// segment gets a segment of its own that grows to fit it.
    pub segment_bytes: u64,
    /// Pre-written segments kept ready beyond the one the log writes next
    /// (default 1).
    pub spare_segments: usize,
    /// Injected write failures (tests only).
    #[cfg(feature = "testing")]
    pub faults: Option<Arc<WalFaults>>,
}

impl WalOptions {
    /// Options with defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_group_bytes: DEFAULT_MAX_GROUP_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            spare_segments: 1,
            #[cfg(feature = "testing")]
            faults: None,
        }
    }
}

/// One entry read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalEntry {
    pub seq: u64,
    pub payload: Bytes,
}

/// Counters since this `Wal` was opened.
#[derive(Debug, Clone, Default)]
pub struct WalStats {
    /// Successful `append` calls.
    pub appends: u64,
    /// fsyncs done by the committer (one per group, plus one per
    /// truncation-only round).
    pub fsyncs: u64,
    /// Payload bytes appended.
    pub bytes: u64,
    /// Time spent in fsync, summed.
    pub fsync_nanos_total: u64,
    /// Duration of the latest fsync.
    pub last_fsync_nanos: u64,
    /// Entries in the latest commit group.
    pub last_group_size: u64,
    /// Most entries seen in one commit group.
    pub max_group_size: u64,
    /// Writes or fsyncs that failed.
    pub write_errors: u64,
    /// Segment files holding live entries, and spares ready.
    pub segments: u64,
    pub spare_segments: u64,
}

/// A failed write, and whether the caller has taken back what it built on
/// the failed entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalFailure {
    /// Counts failures since open.
    pub generation: u64,
    /// Every entry with a seq at or above this one that was not durable
    /// before the failure failed (their tickets got the error).
    pub first_failed_seq: u64,
    pub error: String,
    /// [`Wal::resume`] was called; appends come back once a segment can be
    /// written.
    pub resumed: bool,
}

/// Whether the log takes appends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalHealth {
    Ok,
    Failed(WalFailure),
}

/// Handle on one queued append.
pub struct AppendTicket {
    seq: u64,
    done: oneshot::Receiver<Result<()>>,
}

impl AppendTicket {
    /// Sequence number of the entry, assigned when `append` was called.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Resolves once the entry is fsynced.
    pub async fn durable(self) -> Result<()> {
        // A dropped sender means the committer went away without an answer.
        self.done.await.unwrap_or(Err(Error::Closed))
    }
}

impl fmt::Debug for AppendTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppendTicket")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// The write-ahead log. Share it behind an `Arc`; dropping it lets the
/// committer finish every queued append and truncation, then closes it.
pub struct Wal {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    dir: PathBuf,
    damage: Vec<Damage>,
    committer: Option<JoinHandle<()>>,
    keeper: Option<JoinHandle<()>>,
    _lock: File,
}

/// State shared between callers and the committer thread.
struct Shared {
    state: Mutex<State>,
    /// Signalled when there is work for the committer or it should stop.
    wake: Condvar,
    counters: Counters,
    /// Mirror of `State::pending_bytes` so reading it takes no lock.
    pending_bytes: AtomicU64,
    max_group_bytes: usize,
    health: watch::Sender<WalHealth>,
}

struct State {
    next_seq: u64,
    /// Appends not yet taken by the committer, in seq order.
    queue: VecDeque<Pending>,
    /// `(seq, payload length)` of every entry appended and not truncated,
    /// oldest first: lets truncation account bytes without reading files.
    live: VecDeque<(u64, u64)>,
    pending_bytes: u64,
    /// Highest seq the caller asked to truncate through. The committer
    /// records it in the mark file.
    truncated_through: u64,
    /// Set after a failed write until the committer writes again.
    failure: Option<WalFailure>,
    failures: u64,
    /// The WAL is being dropped: drain and stop.
    closing: bool,
    /// The committer thread has exited (after `closing` or a panic).
    stopped: bool,
}

struct Pending {
    seq: u64,
    payload: Bytes,
    done: oneshot::Sender<Result<()>>,
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    fsyncs: AtomicU64,
    bytes: AtomicU64,
    fsync_nanos_total: AtomicU64,
    last_fsync_nanos: AtomicU64,
    last_group_size: AtomicU64,
    max_group_size: AtomicU64,
    write_errors: AtomicU64,
    segments: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (every update is a few
        // plain assignments), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_health(&self, st: &State) {
        let h = match &st.failure {
            Some(f) => WalHealth::Failed(f.clone()),
            None => WalHealth::Ok,
        };
        self.health.send_if_modified(|cur| {
            let changed = *cur != h;
            *cur = h;
            changed
        });
    }
}

impl State {
    /// The error an append gets when the log cannot take it, if any.
    fn refusal(&self) -> Option<Error> {
        if let Some(f) = &self.failure {
            return Some(Error::Unavailable {
                reason: f.error.clone(),
            });
        }
        self.stopped.then_some(Error::Closed)
    }
}

fn io_err(path: &std::path::Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Wal {
    /// Open (creating) the WAL in dir and read it back. A torn last group
    /// (a crash mid-write, never acknowledged) is dropped; damage to
    /// records that were durable is kept for [`Wal::damage`].
    pub fn open(opts: WalOptions) -> Result<Wal> {
        let dir = opts.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(Error::WalDirLocked { path: dir }),
            Err(TryLockError::Error(e)) => return Err(io_err(&lock_path, e)),
        }
        if dir.join("keyspaces").exists() || dir.join("version").exists() {
            return Err(Error::ForeignWal { path: dir });
        }

        let mark = mark::Mark::open(&dir).map_err(|e| io_err(&dir, e))?;
        let found = read_segments(&dir, opts.segment_bytes, true)?;
        let (scanned, spares, max_id) = (found.scanned, found.spares, found.max_id);
        let live_files: Vec<u64> = scanned.iter().map(|s| s.id).collect();
        let mut recovered = recovery::recover(scanned, mark.through());
        if !found.broken.is_empty() {
            // A segment whose header is damaged may have been the newest:
            // nothing after it would show its entries missing. They are
            // reported (the file is left alone, never recycled), and their
            // seqs are unknown, so new ones start well above anything seen.
            for id in &found.broken {
                tracing::error!(
                    path = %segments::path_of(&dir, *id).display(),
                    "wal: a segment's header is unreadable; its entries are lost"
                );
            }
            recovered.damage.push(Damage::Unreadable {
                after: recovered.last_seq,
                before: None,
            });
            recovered.max_seq = recovered.max_seq.saturating_add(BROKEN_SEQ_SKIP);
        }
        // What was read must be on disk before a new segment's header
        // says it is durable (a process crash leaves it in the page cache).
        for id in &live_files {
            let path = segments::path_of(&dir, *id);
            File::open(&path)
                .and_then(|f| f.sync_data())
                .map_err(|e| io_err(&path, e))?;
        }
        for d in &recovered.damage {
            tracing::error!(dir = %dir.display(), damage = ?ShortDamage(d), "wal: durable records are unreadable");
        }

        let mut live = VecDeque::new();
        let mut pending_bytes = 0u64;
        for (seq, payload) in &recovered.entries {
            live.push_back((*seq, payload.len() as u64));
            pending_bytes += payload.len() as u64;
        }
        let sealed: Vec<(SegmentFile, u64, u64)> = recovered
            .live
            .iter()
            .filter_map(|&(id, first, last)| {
                let path = segments::path_of(&dir, id);
                let file = File::options().read(true).write(true).open(&path).ok()?;
                Some((SegmentFile { id, file }, first, last))
            })
            .collect();
        tracing::info!(
            dir = %dir.display(),
            entries = recovered.entries.len(),
            pending_bytes,
            segments = sealed.len(),
            spares = spares.len(),
            next_seq = recovered.max_seq + 1,
            "wal opened"
        );

        let pool = Pool::new(
            dir.clone(),
            opts.segment_bytes.max(4096),
            opts.spare_segments,
            max_id + 1,
            spares,
        );
        let (health, _) = watch::channel(WalHealth::Ok);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_seq: recovered.max_seq + 1,
                queue: VecDeque::new(),
                live,
                pending_bytes,
                truncated_through: mark.through(),
                failure: None,
                failures: 0,
                closing: false,
                stopped: false,
            }),
            wake: Condvar::new(),
            counters: Counters::default(),
            pending_bytes: AtomicU64::new(pending_bytes),
            max_group_bytes: opts.max_group_bytes.max(1),
            health,
        });
        let keeper = pool.spawn_keeper().map_err(|e| io_err(&dir, e))?;
        let committer = Committer::new(
            shared.clone(),
            pool.clone(),
            sealed,
            recovered.last_seq,
            mark,
            recovered.max_number,
            faults_of(&opts),
        );
        let handle = std::thread::Builder::new()
            .name("shoal-wal-commit".into())
            .spawn(move || committer.run())
            .map_err(|e| io_err(&dir, e))?;

        Ok(Wal {
            shared,
            pool,
            dir,
            damage: recovered.damage,
            committer: Some(handle),
            keeper: Some(keeper),
            _lock: lock,
        })
    }

    /// All entries still in the log, in seq order (for replay at start-up).
    ///
    /// Reads the segment files: entries handed to `append` show up once the
    /// committer has written them; call this before appending.
    pub fn replay(&self) -> Result<Vec<WalEntry>> {
        let floor = self.shared.lock().truncated_through;
        let found = read_segments(&self.dir, self.pool.segment_bytes(), false)?;
        Ok(recovery::recover(found.scanned, floor)
            .entries
            .into_iter()
            .filter(|(seq, _)| *seq > floor)
            .map(|(seq, payload)| WalEntry { seq, payload })
            .collect())
    }

    /// Durable records found unreadable at open (damaged disk or files).
    /// A caller that cannot tell what they held must not pretend nothing
    /// was lost.
    pub fn damage(&self) -> &[Damage] {
        &self.damage
    }

    /// Enqueue an append. The seq is assigned synchronously, strictly
    /// increasing in call order (callers rely on this: they hold a per-shard
    /// lock while calling append so that WAL order equals offset order).
    /// Non-async, cheap, never blocks on I/O. Refused while the log is
    /// failed ([`WalHealth::Failed`]).
    pub fn append(&self, payload: Bytes) -> Result<AppendTicket> {
        if payload.len() > MAX_ENTRY_BYTES {
            return Err(Error::EntryTooLarge {
                len: payload.len(),
                max: MAX_ENTRY_BYTES,
            });
        }
        let len = payload.len() as u64;
        let (tx, rx) = oneshot::channel();
        let seq = {
            let mut st = self.shared.lock();
            if let Some(err) = st.refusal() {
                return Err(err);
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            st.queue.push_back(Pending {
                seq,
                payload,
                done: tx,
            });
            st.live.push_back((seq, len));
            st.pending_bytes += len;
            self.shared
                .pending_bytes
                .store(st.pending_bytes, Ordering::Relaxed);
            seq
        };
        self.shared.wake.notify_one();
        let counters = &self.shared.counters;
        counters.appends.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(AppendTicket { seq, done: rx })
    }

    /// Remove every entry with seq <= seq (after those records were
    /// committed to object storage).
    ///
    /// Takes effect at once for `replay` and `pending_bytes`; the committer
    /// records it in the mark file soon after, so this never blocks on I/O.
    /// Entries still queued are then simply never written. If the mark is
    /// lost in a crash the entries replay again, which the caller must
    /// tolerate anyway (a crash can fall between its object commit and this
    /// call).
    pub fn truncate_through(&self, seq: u64) -> Result<()> {
        {
            let mut st = self.shared.lock();
            if st.stopped {
                return Err(Error::Closed);
            }
            // Never past the last assigned seq: a later append must not be
            // born truncated.
            let through = seq.min(st.next_seq.saturating_sub(1));
            if through <= st.truncated_through {
                return Ok(());
            }
            st.truncated_through = through;
            while let Some(&(live_seq, len)) = st.live.front() {
                if live_seq > through {
                    break;
                }
                st.live.pop_front();
                st.pending_bytes -= len;
            }
            self.shared
                .pending_bytes
                .store(st.pending_bytes, Ordering::Relaxed);
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Whether the log takes appends, and the failure if not.
    pub fn health(&self) -> WalHealth {
        self.shared.health.borrow().clone()
    }

    /// Follow [`Wal::health`] as it changes.
    pub fn watch_health(&self) -> watch::Receiver<WalHealth> {
        self.shared.health.subscribe()
    }

    /// After a failure: the caller has taken back everything it built on
    /// entries at or above `first_failed_seq` of failure `generation`. The
    /// committer then starts a new segment and appends come back as soon
    /// as it can write one (at once with a spare segment ready, otherwise
    /// once the disk takes a new file).
    pub fn resume(&self, generation: u64) {
        {
            let mut st = self.shared.lock();
            match &mut st.failure {
                Some(f) if f.generation == generation && !f.resumed => f.resumed = true,
                _ => return,
            }
            self.shared.publish_health(&st);
        }
        self.shared.wake.notify_one();
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        let c = &self.shared.counters;
        WalStats {
            appends: c.appends.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            fsync_nanos_total: c.fsync_nanos_total.load(Ordering::Relaxed),
            last_fsync_nanos: c.last_fsync_nanos.load(Ordering::Relaxed),
            last_group_size: c.last_group_size.load(Ordering::Relaxed),
            max_group_size: c.max_group_size.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            segments: c.segments.load(Ordering::Relaxed),
            spare_segments: self.pool.spares() as u64,
        }
    }

    /// Bytes of payload appended and not yet truncated (for bounding the WAL).
    pub fn pending_bytes(&self) -> u64 {
        self.shared.pending_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(feature = "testing")]
fn faults_of(opts: &WalOptions) -> faults::Faults {
    faults::Faults(opts.faults.clone())
}

#[cfg(not(feature = "testing"))]
fn faults_of(_opts: &WalOptions) -> faults::Faults {
    faults::Faults
}

/// Damage without the payload bytes, for logs.
struct ShortDamage<'a>(&'a Damage);

impl fmt::Debug for ShortDamage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Damage::Entry { seq, payload } => {
                write!(
                    f,
                    "entry {seq} ({} bytes) fails its checksum",
                    payload.len()
                )
            }
            Damage::Unreadable { after, before } => match before {
                Some(b) => write!(f, "entries after {after} and before {b} unreadable"),
                None => write!(f, "entries after {after} unreadable"),
            },
        }
    }
}

/// Seqs skipped after a segment with a damaged header: more than one
/// segment can hold, so none of its records can look newer than new ones.
const BROKEN_SEQ_SKIP: u64 = 1 << 32;

/// The segment files of a WAL directory.
struct Found {
    /// Segments with a readable header.
    scanned: Vec<recovery::ScannedSegment>,
    /// Files of the right size with a zeroed header.
    spares: Vec<SegmentFile>,
    /// Ids of files whose header is neither valid nor zeroed.
    broken: Vec<u64>,
    /// The highest segment id seen.
    max_id: u64,
}

/// Read every segment file of `dir`: readable ones scanned, spares kept
/// (files of the right size whose header was zeroed). With `cleanup` (at
/// open, when nothing else writes) half-prepared spares are removed.
fn read_segments(dir: &std::path::Path, segment_bytes: u64, cleanup: bool) -> Result<Found> {
    let mut scanned = Vec::new();
    let mut spares = Vec::new();
    let mut broken = Vec::new();
    let mut max_id = 0;
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| io_err(dir, e))?.path();
        let Some(id) = segments::id_of(&path) else {
            continue;
        };
        max_id = max_id.max(id);
        let read = (|| -> std::io::Result<(u64, Vec<u8>)> {
            let mut f = File::open(&path)?;
            let len = f.metadata()?.len();
            // The header first: a spare's data is of no interest.
            let mut head = [0u8; format::SEGMENT_HEADER_LEN];
            let n = f.read(&mut head)?;
            let mut bytes = head[..n].to_vec();
            if format::SegmentHeader::decode(&bytes).is_some() {
                f.read_to_end(&mut bytes)?;
            }
            Ok((len, bytes))
        })();
        let (len, bytes) = match read {
            Ok(r) => r,
            // Recycled and deleted meanwhile (a replay while the log runs).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path, e)),
        };
        // Recycling and preparing zero a segment's whole header.
        let zeroed = bytes
            .iter()
            .take(format::SEGMENT_HEADER_LEN)
            .all(|b| *b == 0);
        match recovery::scan(id, Bytes::from(bytes)) {
            Some(s) => scanned.push(s),
            None if !zeroed => broken.push(id),
            None if len == segment_bytes => {
                let file = File::options()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?;
                spares.push(SegmentFile { id, file });
            }
            // Half-prepared when the process stopped: nothing in it.
            None if cleanup => {
                let _ = std::fs::remove_file(&path);
            }
            None => {}
        }
    }
    Ok(Found {
        scanned,
        spares,
        broken,
        max_id,
    })
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("pending_bytes", &self.pending_bytes())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.committer.take()
            && handle.join().is_err()
        {
            tracing::error!("wal committer thread panicked");
        }
        self.pool.close();
        if let Some(handle) = self.keeper.take()
            && handle.join().is_err()
        {
            tracing::error!("wal segment keeper thread panicked");
        }
    }
}
