//! The record model shared by the broker's protocols and the segment codec.

use bytes::Bytes;

/// One record header (a Kafka header or an MQTT user property).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    /// Kafka allows a header without a value, which differs from an empty one.
    pub value: Option<Bytes>,
}

/// One record of a shard, as stored in a segment.
///
/// The stream and shard are not repeated here: a caller always reads or
/// writes records per shard (see `ShardRows` and `read_row_group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Dense, gap-free position in the shard.
    pub offset: i64,
    /// Create or log-append time, unix milliseconds.
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    /// Idempotent-producer metadata, where the protocol has it.
    pub producer_id: Option<i64>,
    pub producer_epoch: Option<i16>,
    pub sequence: Option<i32>,
}
