//! The Parquet segment codec: the data-lake contract described in
//! `docs/segment-format.md`.
//!
//! A segment holds the records of one or more shards. Each shard's rows
//! occupy their own row group(s), so a reader fetches one shard's range
//! with range reads of that row group only, and the footer statistics
//! (`offset`, `timestamp`) let SQL engines skip the others.

mod key;
mod reader;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::record::Record;

pub use key::{compacted_key, segment_key};
pub use reader::{decode_footer, decode_row_group_in, fetch_footer, footer_in, read_row_group};
pub use writer::{SegmentWriter, encode_segment};

/// Version of the segment schema, stored under the Parquet key-value
/// metadata key `shoal.format_version`. Readers reject other versions.
pub const FORMAT_VERSION: &str = "1";

/// All records of one shard going into a segment, sorted by offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRows {
    pub stream: String,
    pub shard: i32,
    pub records: Vec<Record>,
}

/// Where one shard's offset range sits in a segment (one entry per row group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    pub stream: String,
    pub shard: i32,
    pub row_group: u32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub record_count: u64,
    pub min_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    /// Compressed size of the row group's column chunks.
    pub bytes: u64,
}

/// An encoded segment, ready for `put_create`, and what it holds.
#[derive(Debug, Clone)]
pub struct EncodedSegment {
    pub bytes: Bytes,
    /// In row-group order, hence sorted by (stream, shard, first_offset).
    pub ranges: Vec<ShardRange>,
}

/// Knobs of the encoder.
#[derive(Debug, Clone)]
pub struct SegmentOptions {
    /// A shard with more records is split over several row groups.
    pub max_rows_per_row_group: usize,
    /// A shard whose records take more bytes (payload plus a per-record
    /// overhead) is split over several row groups too.
    pub max_row_group_bytes: usize,
    /// zstd level for every column.
    pub zstd_level: i32,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        Self {
            max_rows_per_row_group: 65_536,
            max_row_group_bytes: usize::MAX,
            zstd_level: 3,
        }
    }
}
