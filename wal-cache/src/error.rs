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

    /// fjall failed to open the WAL or to read from it.
    #[error("wal storage error: {0}")]
    Storage(#[from] fjall::Error),

    /// Writing or fsyncing a commit group failed. Every ticket of that group,
    /// and every later append, gets this error: the log cannot promise
    /// durability any more, so the caller should treat it as fatal. The fjall
    /// error is shared because one failure fans out to many tickets.
    #[error("wal commit failed: {0}")]
    Commit(#[source] Arc<fjall::Error>),

    /// The payload is too large for one log entry (fjall values are
    /// limited to `u32::MAX` bytes).
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
