//! Encoding shards into one Parquet segment.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, DictionaryArray, Int16Array, Int32Array, Int64Array, ListArray,
    StringArray, StructArray, TimestampMillisecondArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{Int32Type, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

use super::schema::{self, FORMAT_VERSION_KEY, segment_schema};
use super::{EncodedSegment, FORMAT_VERSION, SegmentOptions, ShardRange, ShardRows};
use crate::error::{Error, Result};
use crate::record::Record;

/// A row group is also closed before its variable-length data passes this
/// size: Arrow's Binary/Utf8 arrays use i32 offsets (2 GiB), and a smaller
/// cap keeps a reader's memory for one row group bounded.
const ROW_GROUP_BYTE_LIMIT: usize = 1 << 30;
/// Size charged per record and per header on top of their payload, so that
/// many empty headers also count towards the limit (list offsets are i32 too).
const RECORD_OVERHEAD: usize = 64;
const HEADER_OVERHEAD: usize = 16;

/// Encode shards into one Parquet segment.
///
/// Rows are sorted by (stream, shard, offset). Each shard's rows go in
/// their own row group(s): never two shards in one row group, and a shard
/// is split past `max_rows_per_row_group`. Empty shards are skipped;
/// entries naming the same (stream, shard) are merged. Returns the bytes
/// and one [`ShardRange`] per row group, in row-group order.
///
/// CPU-bound: call it from a blocking context for large inputs.
pub fn encode_segment(shards: Vec<ShardRows>, opts: &SegmentOptions) -> Result<EncodedSegment> {
    let shards = normalize(shards)?;
    let mut writer = SegmentWriter::new(opts)?;
    for ((stream, shard), records) in &shards {
        writer.write(stream, *shard, records)?;
    }
    writer.finish()
}

/// A segment written piece by piece, so a large one (a compacted file) is
/// never held as rows all at once: each [`write`](Self::write) encodes its
/// records into closed row groups; [`finish`](Self::finish) returns the
/// file's bytes and ranges as [`encode_segment`] does.
///
/// CPU-bound: call it from a blocking context for large inputs.
pub struct SegmentWriter {
    writer: ArrowWriter<Vec<u8>>,
    schema: SchemaRef,
    ranges: Vec<ShardRange>,
    max_rows: usize,
    max_bytes: usize,
    /// (stream, shard, offset) of the last record written.
    last: Option<(String, i32, i64)>,
}

impl SegmentWriter {
    pub fn new(opts: &SegmentOptions) -> Result<Self> {
        if opts.max_rows_per_row_group == 0 {
            return Err(encode_err("max_rows_per_row_group must be at least 1"));
        }
        let props = writer_properties(opts)?;
        let schema = segment_schema();
        let writer = ArrowWriter::try_new(Vec::new(), Arc::clone(&schema), Some(props))
            .map_err(parquet_err)?;
        Ok(Self {
            writer,
            schema,
            ranges: Vec::new(),
            max_rows: opts.max_rows_per_row_group,
            max_bytes: opts.max_row_group_bytes.min(ROW_GROUP_BYTE_LIMIT),
            last: None,
        })
    }

    /// Append records of one shard, in increasing offset order, after
    /// everything written so far: the same shard at higher offsets, or a
    /// shard that sorts after the previous one. Their row groups are
    /// closed here, so no row group spans two calls or two shards.
    pub fn write(&mut self, stream: &str, shard: i32, records: &[Record]) -> Result<()> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let in_order = match &self.last {
            None => true,
            Some((s, sh, off)) => {
                (s.as_str(), *sh) < (stream, shard)
                    || ((s.as_str(), *sh) == (stream, shard) && *off < first.offset)
            }
        };
        if !in_order || records.windows(2).any(|w| w[0].offset >= w[1].offset) {
            return Err(encode_err(format!(
                "records of stream {stream:?} shard {shard} out of order or duplicated"
            )));
        }
        for chunk in row_group_chunks(records, self.max_rows, self.max_bytes)? {
            let row_group = u32::try_from(self.ranges.len())
                .map_err(|_| encode_err("more than u32::MAX row groups"))?;
            let batch = build_batch(&self.schema, stream, shard, chunk).map_err(arrow_err)?;
            self.writer.write(&batch).map_err(parquet_err)?;
            self.writer.flush().map_err(parquet_err)?;
            self.ranges
                .push(shard_range(stream, shard, row_group, chunk));
        }
        self.last = Some((stream.to_owned(), shard, last.offset));
        Ok(())
    }

    pub fn finish(mut self) -> Result<EncodedSegment> {
        let mut ranges = self.ranges;
        let meta = self.writer.finish().map_err(parquet_err)?;
        let buf = std::mem::take(self.writer.inner_mut());
        // The ranges are what placement will index; make sure they
        // describe the file that was actually written.
        let written: Vec<i64> = meta.row_groups().iter().map(|rg| rg.num_rows()).collect();
        let expected: Vec<i64> = ranges
            .iter()
            .map(|r| i64::try_from(r.record_count).unwrap_or(i64::MAX))
            .collect();
        if written != expected {
            return Err(encode_err(format!(
                "row groups written {written:?} differ from planned {expected:?}"
            )));
        }
        for (range, rg) in ranges.iter_mut().zip(meta.row_groups()) {
            range.bytes = u64::try_from(rg.compressed_size()).unwrap_or(0);
        }
        Ok(EncodedSegment {
            bytes: Bytes::from(buf),
            ranges,
        })
    }
}

/// Writer settings chosen for plain, widely readable Parquet (DuckDB,
/// Spark, Trino): format v1 data pages, PLAIN/RLE/dictionary encodings only.
fn writer_properties(opts: &SegmentOptions) -> Result<WriterProperties> {
    let level = ZstdLevel::try_new(opts.zstd_level)
        .map_err(|e| encode_err(format!("zstd level {}: {e}", opts.zstd_level)))?;
    let col = |name: &str| ColumnPath::from(name);
    let sorted = |column_idx| SortingColumn {
        column_idx,
        descending: false,
        nulls_first: false,
    };
    Ok(WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::ZSTD(level))
        // We flush per shard chunk ourselves; the writer must not split
        // differently or the returned ranges would be wrong.
        .set_max_row_group_size(opts.max_rows_per_row_group)
        // Page statistics give chunk min/max plus the column and offset
        // indexes, which engines use to skip row groups and pages.
        .set_statistics_enabled(EnabledStatistics::Page)
        // Min/max of opaque payloads never prune anything and bloat the footer.
        .set_column_statistics_enabled(col(schema::VALUE), EnabledStatistics::None)
        // Unique per row: a dictionary would only be built to be abandoned.
        .set_column_dictionary_enabled(col(schema::OFFSET), false)
        .set_column_dictionary_enabled(col(schema::TIMESTAMP), false)
        .set_column_dictionary_enabled(col(schema::VALUE), false)
        .set_sorting_columns(Some(vec![sorted(0), sorted(1), sorted(2)]))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            FORMAT_VERSION_KEY.to_owned(),
            FORMAT_VERSION.to_owned(),
        )]))
        .build())
}

/// Group by (stream, shard) in sort order, sort each shard by offset and
/// reject duplicate offsets (offsets are unique per shard, and a duplicate
/// would make the index ambiguous).
fn normalize(shards: Vec<ShardRows>) -> Result<BTreeMap<(String, i32), Vec<Record>>> {
    let mut by_shard: BTreeMap<(String, i32), Vec<Record>> = BTreeMap::new();
    for s in shards {
        if !s.records.is_empty() {
            by_shard
                .entry((s.stream, s.shard))
                .or_default()
                .extend(s.records);
        }
    }
    for ((stream, shard), records) in &mut by_shard {
        // Stable and linear on already-sorted input, the normal case.
        records.sort_by_key(|r| r.offset);
        if let Some(w) = records.windows(2).find(|w| w[0].offset == w[1].offset) {
            return Err(encode_err(format!(
                "duplicate offset {} in stream {stream:?} shard {shard}",
                w[0].offset
            )));
        }
    }
    Ok(by_shard)
}

/// Split one shard's records into slices of at most `max_rows` records
/// and `max_bytes` of estimated variable-length data.
fn row_group_chunks(
    records: &[Record],
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<&[Record]>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (i, r) in records.iter().enumerate() {
        let size = record_size(r);
        // A record over `max_bytes` gets a row group of its own; only the
        // hard limit (Arrow's offsets) refuses it.
        if size > ROW_GROUP_BYTE_LIMIT {
            return Err(encode_err(format!(
                "record at offset {} is {size} bytes, over the {ROW_GROUP_BYTE_LIMIT}-byte row group limit",
                r.offset
            )));
        }
        if i > start && (i - start == max_rows || bytes + size > max_bytes) {
            chunks.push(&records[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < records.len() {
        chunks.push(&records[start..]);
    }
    Ok(chunks)
}

fn record_size(r: &Record) -> usize {
    let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
    let headers: usize = r
        .headers
        .iter()
        .map(|h| HEADER_OVERHEAD + h.key.len() + len(&h.value))
        .sum();
    RECORD_OVERHEAD + len(&r.key) + len(&r.value) + headers
}

fn shard_range(stream: &str, shard: i32, row_group: u32, chunk: &[Record]) -> ShardRange {
    let first = chunk.first().map_or(0, |r| r.offset);
    let last = chunk.last().map_or(0, |r| r.offset);
    let min_ts = chunk.iter().map(|r| r.timestamp_ms).min().unwrap_or(0);
    let max_ts = chunk.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
    ShardRange {
        stream: stream.to_owned(),
        shard,
        row_group,
        first_offset: first,
        last_offset: last,
        record_count: chunk.len() as u64,
        min_timestamp_ms: min_ts,
        bytes: 0,
        max_timestamp_ms: max_ts,
    }
}

fn build_batch(
    schema: &SchemaRef,
    stream: &str,
    shard: i32,
    records: &[Record],
) -> Result<RecordBatch, ArrowError> {
    let n = records.len();
    // One distinct stream per row group: a one-entry dictionary.
    let stream_col = DictionaryArray::<Int32Type>::try_new(
        Int32Array::from(vec![0; n]),
        Arc::new(StringArray::from(vec![stream])),
    )?;
    let shard_col = Int32Array::from(vec![shard; n]);
    let offset_col = Int64Array::from_iter_values(records.iter().map(|r| r.offset));
    let ts_col =
        TimestampMillisecondArray::from_iter_values(records.iter().map(|r| r.timestamp_ms))
            .with_timezone(schema::TIMEZONE);
    let key_col: BinaryArray = records.iter().map(|r| r.key.as_deref()).collect();
    let value_col: BinaryArray = records.iter().map(|r| r.value.as_deref()).collect();

    let header_keys: StringArray = records
        .iter()
        .flat_map(|r| &r.headers)
        .map(|h| Some(h.key.as_str()))
        .collect();
    let header_values: BinaryArray = records
        .iter()
        .flat_map(|r| &r.headers)
        .map(|h| h.value.as_deref())
        .collect();
    let entries = StructArray::try_new(
        schema::header_fields(),
        vec![Arc::new(header_keys), Arc::new(header_values)],
        None,
    )?;
    let headers_col = ListArray::try_new(
        schema::header_item_field(),
        OffsetBuffer::from_lengths(records.iter().map(|r| r.headers.len())),
        Arc::new(entries),
        None,
    )?;

    let producer_id: Int64Array = records.iter().map(|r| r.producer_id).collect();
    let producer_epoch: Int16Array = records.iter().map(|r| r.producer_epoch).collect();
    let sequence: Int32Array = records.iter().map(|r| r.sequence).collect();

    let columns: Vec<ArrayRef> = vec![
        Arc::new(stream_col),
        Arc::new(shard_col),
        Arc::new(offset_col),
        Arc::new(ts_col),
        Arc::new(key_col),
        Arc::new(value_col),
        Arc::new(headers_col),
        Arc::new(producer_id),
        Arc::new(producer_epoch),
        Arc::new(sequence),
    ];
    RecordBatch::try_new(Arc::clone(schema), columns)
}

fn encode_err(reason: impl Into<String>) -> Error {
    Error::Encode {
        reason: reason.into(),
    }
}

fn parquet_err(source: ParquetError) -> Error {
    Error::Parquet {
        context: "encoding segment".to_owned(),
        source,
    }
}

fn arrow_err(source: ArrowError) -> Error {
    Error::Arrow {
        context: "encoding segment".to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn rec(offset: i64, value_len: usize) -> Record {
        Record {
            offset,
            timestamp_ms: 0,
            key: None,
            value: Some(Bytes::from(vec![0; value_len])),
            headers: vec![],
            producer_id: None,
            producer_epoch: None,
            sequence: None,
        }
    }

    fn lens(chunks: &[&[Record]]) -> Vec<usize> {
        chunks.iter().map(|c| c.len()).collect()
    }

    #[test]
    fn a_segment_written_in_pieces_equals_one_written_at_once() {
        let records: Vec<Record> = (0..20).map(|o| rec(o, 100)).collect();
        let opts = SegmentOptions {
            max_rows_per_row_group: 8,
            ..SegmentOptions::default()
        };
        let whole = encode_segment(
            vec![ShardRows {
                stream: "s".into(),
                shard: 0,
                records: records.clone(),
            }],
            &opts,
        )
        .unwrap();
        let mut w = SegmentWriter::new(&opts).unwrap();
        w.write("s", 0, &records[..8]).unwrap();
        w.write("s", 0, &records[8..16]).unwrap();
        // Going back, or repeating an offset, is refused.
        assert!(w.write("s", 0, &records[15..17]).is_err());
        w.write("s", 0, &records[16..]).unwrap();
        let pieces = w.finish().unwrap();
        assert_eq!(pieces.ranges, whole.ranges);
    }

    #[test]
    fn chunks_split_on_rows_and_bytes() {
        let records: Vec<Record> = (0..7).map(|o| rec(o, 100)).collect();
        let per = RECORD_OVERHEAD + 100;
        assert_eq!(
            lens(&row_group_chunks(&records, 3, usize::MAX).unwrap()),
            [3, 3, 1]
        );
        assert_eq!(
            lens(&row_group_chunks(&records, 100, 2 * per).unwrap()),
            [2, 2, 2, 1]
        );
        assert_eq!(lens(&row_group_chunks(&records, 1, per).unwrap()), [1; 7]);
        // A record over the byte limit gets a row group of its own.
        assert_eq!(
            lens(&row_group_chunks(&records, 10, per - 1).unwrap()),
            [1; 7]
        );
        assert!(row_group_chunks(&[], 10, per).unwrap().is_empty());
    }
}
