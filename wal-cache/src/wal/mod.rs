//! The write-ahead log: fjall storage, group commit, replay and truncation.
//!
//! Layout: one fjall database in `WalOptions::dir` with two keyspaces.
//! `wal` maps the sequence number (big-endian `u64`, so key order is seq
//! order) to the opaque payload. `wal_meta` holds the last sequence number
//! ever committed, so numbering survives a restart even when truncation has
//! emptied `wal`.
//!
//! Every write (appends, the high-water mark and truncation tombstones) is
//! made by one committer thread, see [`committer`]. That keeps the on-disk
//! order equal to the seq order and lets one fsync cover everything that
//! queued up while the previous one ran.

mod committer;
mod repair;

use std::{
    collections::VecDeque,
    fmt,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use bytes::Bytes;
use fjall::{CompressionType, Database, Keyspace, KeyspaceCreateOptions};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use committer::Committer;

/// Default cap on the payload bytes of one commit group.
pub const DEFAULT_MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;

const ENTRIES_KEYSPACE: &str = "wal";
const META_KEYSPACE: &str = "wal_meta";
const LAST_SEQ_KEY: &[u8] = b"last_seq";

/// fjall's journal stores value lengths as `u32`; a longer value would be
/// silently cut, so refuse it up front.
const MAX_ENTRY_BYTES: usize = u32::MAX as usize;

/// Where and how to open the WAL.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Directory of the fjall database (created if missing). Use a directory
    /// of its own: fjall owns everything inside it.
    pub dir: PathBuf,
    /// Cap on one group's payload bytes (default 16 MiB). A group always
    /// takes at least one entry, so a larger single entry is still written.
    pub max_group_bytes: usize,
}

impl WalOptions {
    /// Options with defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_group_bytes: DEFAULT_MAX_GROUP_BYTES,
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
/// committer finish every queued append and truncation, then closes fjall.
pub struct Wal {
    shared: Arc<Shared>,
    entries: Keyspace,
    committer: Option<JoinHandle<()>>,
    // Held so the database outlives the keyspace handles regardless of
    // field drop order.
    _db: Database,
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
}

struct State {
    next_seq: u64,
    /// Appends not yet taken by the committer, in seq order.
    queue: VecDeque<Pending>,
    /// `(seq, payload length)` of every entry appended and not truncated,
    /// oldest first: lets truncation account bytes without reading fjall.
    live: VecDeque<(u64, u64)>,
    pending_bytes: u64,
    /// Highest seq the caller asked to truncate through. The committer
    /// turns it into tombstones; until then `replay` filters by it.
    truncated_through: u64,
    /// Set after a failed commit: nothing written afterwards could be
    /// promised durable.
    failed: Option<Arc<fjall::Error>>,
    /// The WAL is being dropped: drain and stop.
    closing: bool,
    /// The committer thread has exited (after `closing`, a failure or a panic).
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
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (every update is a few
        // plain assignments), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The error an append or truncation gets when the log can no longer
    /// accept work, if any.
    fn refusal(&self) -> Option<Error> {
        match &self.failed {
            Some(e) => Some(Error::Commit(e.clone())),
            None if self.stopped => Some(Error::Closed),
            None => None,
        }
    }
}

impl Wal {
    /// Open (creating) the WAL in dir. Recovers from a torn tail (a crash
    /// mid-write): entries whose fsync completed are all there; a partial
    /// last write is dropped, never an error that prevents start-up.
    pub fn open(opts: WalOptions) -> Result<Wal> {
        std::fs::create_dir_all(&opts.dir).map_err(|source| Error::Io {
            path: opts.dir.clone(),
            source,
        })?;
        let db = open_database(&opts.dir)?;
        let entries = db.keyspace(ENTRIES_KEYSPACE, KeyspaceCreateOptions::default)?;
        let meta = db.keyspace(META_KEYSPACE, KeyspaceCreateOptions::default)?;

        let recorded_last = match meta.get(LAST_SEQ_KEY)? {
            Some(value) => decode_seq(&value).unwrap_or_else(|| {
                tracing::warn!(len = value.len(), "wal: ignoring malformed high-water mark");
                0
            }),
            None => 0,
        };

        let mut live = VecDeque::new();
        let mut pending_bytes = 0u64;
        for item in entries.iter() {
            let (key, value) = item.into_inner()?;
            let Some(seq) = decode_seq(&key) else {
                tracing::warn!(?key, "wal: skipping entry with malformed key");
                continue;
            };
            let len = value.len() as u64;
            live.push_back((seq, len));
            pending_bytes += len;
        }

        let last_seq = recorded_last.max(live.back().map_or(0, |&(seq, _)| seq));
        // Everything below the oldest surviving entry is gone already.
        let truncated_through = live
            .front()
            .map_or(last_seq, |&(seq, _)| seq.saturating_sub(1));
        tracing::info!(
            dir = %opts.dir.display(),
            entries = live.len(),
            pending_bytes,
            next_seq = last_seq + 1,
            "wal opened"
        );

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_seq: last_seq + 1,
                queue: VecDeque::new(),
                live,
                pending_bytes,
                truncated_through,
                failed: None,
                closing: false,
                stopped: false,
            }),
            wake: Condvar::new(),
            counters: Counters::default(),
            pending_bytes: AtomicU64::new(pending_bytes),
            max_group_bytes: opts.max_group_bytes.max(1),
        });

        let committer = Committer {
            shared: shared.clone(),
            db: db.clone(),
            entries: entries.clone(),
            meta,
            written_through: last_seq,
            tombstoned_through: truncated_through,
        };
        let handle = std::thread::Builder::new()
            .name("shoal-wal-commit".into())
            .spawn(move || committer.run())
            .map_err(|source| Error::Io {
                path: opts.dir.clone(),
                source,
            })?;

        Ok(Wal {
            shared,
            entries,
            committer: Some(handle),
            _db: db,
        })
    }

    /// All entries still in the log, in seq order (for replay at start-up).
    ///
    /// Entries handed to `append` show up once the committer has written
    /// them, possibly before their fsync; call this before appending.
    pub fn replay(&self) -> Result<Vec<WalEntry>> {
        let floor = self.shared.lock().truncated_through;
        let Some(start) = floor.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self.entries.range(start.to_be_bytes()..) {
            let (key, value) = item.into_inner()?;
            let Some(seq) = decode_seq(&key) else {
                tracing::warn!(?key, "wal: skipping entry with malformed key");
                continue;
            };
            out.push(WalEntry {
                seq,
                payload: Bytes::copy_from_slice(&value),
            });
        }
        Ok(out)
    }

    /// Enqueue an append. The seq is assigned synchronously, strictly
    /// increasing in call order (callers rely on this: they hold a per-shard
    /// lock while calling append so that WAL order equals offset order).
    /// Non-async, cheap, never blocks on I/O.
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
    /// writes the tombstones with its next fsync, so this never blocks on
    /// I/O. Entries still queued are then simply never written. If the
    /// tombstones are lost in a crash the entries replay again, which the
    /// caller must tolerate anyway (a crash can fall between its object
    /// commit and this call).
    pub fn truncate_through(&self, seq: u64) -> Result<()> {
        {
            let mut st = self.shared.lock();
            if let Some(err) = st.refusal() {
                return Err(err);
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
        }
    }

    /// Bytes of payload appended and not yet truncated (for bounding the WAL).
    pub fn pending_bytes(&self) -> u64 {
        self.shared.pending_bytes.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal")
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
    }
}

/// Open the fjall database, repairing a torn journal tail that fjall's own
/// recovery refuses.
///
/// fjall drops a journal tail that is cut short or ends in garbage, but a
/// last batch that is complete in length with a bad checksum (a torn write
/// whose later pages reached the disk before an earlier one) makes `open`
/// fail. Such a batch was never fsynced, so cutting the journal there loses
/// nothing that was promised.
fn open_database(dir: &Path) -> Result<Database> {
    match database_builder(dir).open() {
        Ok(db) => Ok(db),
        Err(err @ fjall::Error::JournalRecovery(_)) => {
            let Some(torn) = repair::find_torn_tail(dir)? else {
                return Err(err.into());
            };
            tracing::warn!(
                journal = %torn.journal.display(),
                offset = torn.offset,
                error = %err,
                "wal: dropping torn journal tail"
            );
            repair::cut(&torn)?;
            Ok(database_builder(dir).open()?)
        }
        Err(err) => Err(err.into()),
    }
}

fn database_builder(dir: &Path) -> fjall::DatabaseBuilder<Database> {
    Database::builder(dir)
        // Payloads are usually compressed record batches already; lz4 on the
        // commit path would cost CPU for nothing.
        .journal_compression(CompressionType::None)
        // The committer persists explicitly; single writes never happen.
        .manual_journal_persist(true)
        // Reads happen only at start-up, so a small block cache suffices.
        .cache_size(8 * 1024 * 1024)
}

fn decode_seq(bytes: &[u8]) -> Option<u64> {
    let array: [u8; 8] = bytes.try_into().ok()?;
    Some(u64::from_be_bytes(array))
}
