//! Shoal's storage adapter.
//!
//! This crate owns:
//! - **object-store backends chosen by URL** ([`ObjectStorage`]:
//!   `memory://`, `file:///dir`, `s3://bucket/prefix`), with create-only
//!   writes (multipart above a size), range reads, per-kind request
//!   counters ([`StoreStats`]) and latencies ([`LatencySnapshot`]);
//! - **the Parquet segment codec**: [`encode_segment`] turns per-shard
//!   [`ShardRows`] into one Parquet object plus the [`ShardRange`]s that
//!   say which row group holds which offsets; [`fetch_footer`],
//!   [`decode_footer`] and [`read_row_group`] read one shard's rows back
//!   with range requests; [`footer_in`] and [`decode_row_group_in`] do the
//!   same from a whole object already in memory. The format is the data-lake contract
//!   documented in `docs/segment-format.md` ([`FORMAT_VERSION`]);
//! - **object key layouts** ([`segment_key`], [`compacted_key`]);
//! - **the record model** ([`Record`], [`Header`]).
//!
//! It does not know about Kafka or MQTT, does not assign offsets or decide
//! durability, and does not decide placement: which objects are live is
//! placement's index, not a listing of this store.

#![forbid(unsafe_code)]

mod error;
mod latency;
mod local;
mod record;
mod segment;
mod store;

pub use error::{Error, Result};
pub use latency::{LATENCY_BUCKETS, LatencySnapshot, RequestKind};
pub use record::{Header, Record};
pub use segment::{
    EncodedSegment, FORMAT_VERSION, SegmentOptions, SegmentWriter, ShardRange, ShardRows,
    compacted_key, decode_footer, decode_row_group_in, encode_segment, fetch_footer, footer_in,
    read_row_group, segment_key,
};
pub use store::{ListedObject, ObjectStorage, StoreStats};

/// A segment's decoded footer, as [`decode_footer`] returns it.
pub type SegmentMeta = parquet::file::metadata::ParquetMetaData;
