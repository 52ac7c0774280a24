//! The crate's single error type.

use std::{path::PathBuf, sync::Arc};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `shoal-wal-cache`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation on the WAL or cache directory failed.
    #[error("i/o error on {path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Writing or fsyncing a commit group failed. Every ticket of that
    /// group, and of everything queued behind it, gets this error; the log
    /// refuses appends until the caller resumes it (see `Wal::resume`).
    /// The I/O error is shared because one failure fans out to many tickets.
    #[error("wal write failed: {0}")]
    Commit(#[source] Arc<std::io::Error>),

    /// The log is not taking appends: a write failed and the log has not
    /// written again since.
    #[error("wal is not taking writes: {reason}")]
    Unavailable { reason: String },

    /// Another `Wal` in this or another process holds the directory.
    #[error("wal directory {path:?} is in use by another process")]
    WalDirLocked { path: PathBuf },

    /// The directory holds a write-ahead log of another format (an earlier
    /// Shoal version's fjall-based log).
    #[error(
        "wal directory {path:?} holds a log of an earlier Shoal version; \
         stop that version cleanly (it flushes everything) and remove the directory"
    )]
    ForeignWal { path: PathBuf },

    /// The payload is too large for one log entry (record lengths are
    /// `u32`).
    #[error("wal entry of {len} bytes exceeds the {max}-byte limit")]
    EntryTooLarge { len: usize, max: usize },

    /// The committer stopped before it could resolve this ticket (the WAL
    /// was dropped or its thread died).
    #[error("wal is closed")]
    Closed,

    /// Another `Cache` in this or another process holds the directory.
    #[error("cache directory {path:?} is in use by another cache")]
    CacheDirLocked { path: PathBuf },

    /// The hybrid cache could not be built.
    #[error("cache error: {0}")]
    Cache(#[from] foyer::Error),
}
