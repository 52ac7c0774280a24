//! The crate's single error type.

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `shoal-storage`.
///
/// Variants that concern one object carry its key (relative to the store's
/// prefix) so a log line alone says which object was involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage URL could not be parsed or names an unsupported backend.
    #[error("invalid object store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },

    /// A key is not a valid object path (empty segment, `..`, illegal character).
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },

    /// The object does not exist.
    #[error("object {key:?} not found")]
    NotFound { key: String },

    /// A create-only PUT found an object already at the key.
    #[error("object {key:?} already exists")]
    AlreadyExists { key: String },

    /// A conditional replace found a different version than expected.
    #[error("object {key:?} changed since it was read")]
    Changed { key: String },

    /// Any other failure reported by the object store backend.
    #[error("object store {op} of {key:?} failed: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },

    /// The backend returned fewer bytes than the requested range
    /// (the object is shorter than its metadata claims).
    #[error("short read of {key:?}: wanted bytes {start}..{end}, got {got} bytes")]
    ShortRead {
        key: String,
        start: u64,
        end: u64,
        got: u64,
    },

    /// The object is not a readable Shoal segment.
    #[error("object {key:?} is not a readable Shoal segment: {reason}")]
    CorruptSegment { key: String, reason: String },

    /// Footer bytes are not a Shoal segment footer. The caller of
    /// `decode_footer` knows the key; the bytes alone do not.
    #[error("invalid Shoal segment footer: {reason}")]
    InvalidFooter { reason: String },

    /// A row group index past the end of the segment.
    #[error("object {key:?} has {count} row groups, row group {row_group} requested")]
    RowGroupOutOfRange {
        key: String,
        row_group: usize,
        count: usize,
    },

    /// The input to `encode_segment` cannot be written (bad options,
    /// duplicate offsets, a record too large for one row group).
    #[error("cannot encode segment: {reason}")]
    Encode { reason: String },

    /// Parquet encoder or decoder failure; `context` names the object or step.
    #[error("parquet error in {context}: {source}")]
    Parquet {
        context: String,
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// Arrow failure while building or reading record batches.
    #[error("arrow error in {context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow::error::ArrowError,
    },

    /// Local filesystem failure (creating the root of a `file://` store).
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Worth another attempt: a request to a remote store failed on the
    /// way (connection reset, timeout, 5xx after the client's own retries).
    /// Local backends (memory, file) fail for what was asked, never
    /// transiently.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Store {
                source: object_store::Error::Generic { store, .. },
                ..
            } if matches!(*store, "S3" | "GCS" | "MicrosoftAzure" | "HTTP")
        )
    }
}
