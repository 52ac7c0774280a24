//! The Arrow schema of a segment and the names the reader looks up.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// Parquet key-value metadata key holding [`super::FORMAT_VERSION`].
pub(crate) const FORMAT_VERSION_KEY: &str = "shoal.format_version";

pub(crate) const STREAM: &str = "stream";
pub(crate) const SHARD: &str = "shard";
pub(crate) const OFFSET: &str = "offset";
pub(crate) const TIMESTAMP: &str = "timestamp";
pub(crate) const KEY: &str = "key";
pub(crate) const VALUE: &str = "value";
pub(crate) const HEADERS: &str = "headers";
pub(crate) const PRODUCER_ID: &str = "producer_id";
pub(crate) const PRODUCER_EPOCH: &str = "producer_epoch";
pub(crate) const SEQUENCE: &str = "sequence";

/// Field names inside a `headers` list entry.
pub(crate) const HEADER_KEY: &str = "key";
pub(crate) const HEADER_VALUE: &str = "value";

/// The columns `read_row_group` decodes; `stream` and `shard` are constant
/// within a row group and already known to the caller.
pub(crate) const RECORD_COLUMNS: [&str; 8] = [
    OFFSET,
    TIMESTAMP,
    KEY,
    VALUE,
    HEADERS,
    PRODUCER_ID,
    PRODUCER_EPOCH,
    SEQUENCE,
];

pub(crate) const TIMEZONE: &str = "UTC";

/// The struct fields of one header.
pub(crate) fn header_fields() -> Fields {
    Fields::from(vec![
        Field::new(HEADER_KEY, DataType::Utf8, false),
        Field::new(HEADER_VALUE, DataType::Binary, true),
    ])
}

/// The list item field of `headers`. Named `element` as the Parquet
/// LIST spec recommends, rather than Arrow's default `item`.
pub(crate) fn header_item_field() -> Arc<Field> {
    Arc::new(Field::new(
        "element",
        DataType::Struct(header_fields()),
        false,
    ))
}

/// The segment schema (see docs/segment-format.md; change both together
/// and bump `FORMAT_VERSION` on any incompatible change).
pub(crate) fn segment_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new(
                STREAM,
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                false,
            ),
            Field::new(SHARD, DataType::Int32, false),
            Field::new(OFFSET, DataType::Int64, false),
            Field::new(
                TIMESTAMP,
                DataType::Timestamp(TimeUnit::Millisecond, Some(TIMEZONE.into())),
                false,
            ),
            Field::new(KEY, DataType::Binary, true),
            Field::new(VALUE, DataType::Binary, true),
            Field::new(HEADERS, DataType::List(header_item_field()), false),
            Field::new(PRODUCER_ID, DataType::Int64, true),
            Field::new(PRODUCER_EPOCH, DataType::Int16, true),
            Field::new(SEQUENCE, DataType::Int32, true),
        ]))
    });
    Arc::clone(&SCHEMA)
}
