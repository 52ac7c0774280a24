//! Reading segments with range requests: the footer, then one row group.

use std::ops::Range;
use std::panic::catch_unwind;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int16Type, Int32Type, Int64Type, TimestampMillisecondType};
use bytes::{Buf, Bytes, BytesMut};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader, RowGroupMetaData};
use parquet::file::reader::{ChunkReader, Length};
use parquet::schema::types::SchemaDescriptor;

use super::FORMAT_VERSION;
use super::schema::{self, FORMAT_VERSION_KEY, RECORD_COLUMNS};
use crate::error::{Error, Result};
use crate::record::{Header, Record};
use crate::store::ObjectStorage;

/// Parquet's trailer: 4-byte little-endian metadata length, then `PAR1`.
const TRAILER_LEN: usize = 8;
const MAGIC: &[u8; 4] = b"PAR1";
/// The first read takes this much of the object's tail. Footers of flush
/// files are a few KiB per shard, so one request is the common case.
const FOOTER_PREFETCH: u64 = 64 * 1024;
/// Rows per decoded Arrow batch.
const BATCH_ROWS: usize = 8192;

/// Fetch the raw footer (Parquet metadata followed by the 8-byte trailer)
/// with a suffix read, plus one range read when the metadata is larger
/// than the prefetch. Never reads the whole object. Returns the footer
/// bytes (what [`decode_footer`] takes and what a cache should keep) and
/// the object size.
pub async fn fetch_footer(store: &ObjectStorage, key: &str) -> Result<(Bytes, u64)> {
    let corrupt = |reason: String| Error::CorruptSegment {
        key: key.to_owned(),
        reason,
    };
    let (tail, size) = store.get_suffix(key, FOOTER_PREFETCH).await?;
    // Header magic + trailer is the smallest possible Parquet file.
    let min_size = (MAGIC.len() + TRAILER_LEN) as u64;
    if size < min_size {
        return Err(corrupt(format!(
            "object is {size} bytes, too small for Parquet"
        )));
    }
    let metadata_len = parse_trailer(&tail).map_err(corrupt)?;
    let footer_len = metadata_len as u64 + TRAILER_LEN as u64;
    if footer_len + MAGIC.len() as u64 > size {
        return Err(corrupt(format!(
            "footer claims {metadata_len} metadata bytes in a {size}-byte object"
        )));
    }
    let have = tail.len() as u64;
    if footer_len <= have {
        let start = usize::try_from(have - footer_len).map_err(|e| corrupt(e.to_string()))?;
        return Ok((tail.slice(start..), size));
    }
    let head = store.get_range(key, size - footer_len..size - have).await?;
    let mut footer = BytesMut::with_capacity(head.len() + tail.len());
    footer.extend_from_slice(&head);
    footer.extend_from_slice(&tail);
    Ok((footer.freeze(), size))
}

/// Decode footer bytes from [`fetch_footer`] into Parquet metadata.
///
/// Rejects anything that is not a Shoal segment of this
/// [`FORMAT_VERSION`] (missing or different `shoal.format_version`
/// key-value entry), and encrypted footers.
pub fn decode_footer(footer: &Bytes) -> Result<Arc<ParquetMetaData>> {
    let invalid = |reason: String| Error::InvalidFooter { reason };
    let metadata_len = parse_trailer(footer).map_err(invalid)?;
    let end = footer.len() - TRAILER_LEN;
    let start = end.checked_sub(metadata_len).ok_or_else(|| {
        invalid(format!(
            "trailer claims {metadata_len} metadata bytes, only {end} given"
        ))
    })?;
    let bytes = &footer[start..end];
    // The metadata decoder is fed bytes from storage; contain a decoder
    // bug on corrupt input to this call instead of taking the broker down.
    let meta = catch_unwind(|| ParquetMetaDataReader::decode_metadata(bytes))
        .map_err(|_| invalid("metadata decoder panicked".to_owned()))?
        .map_err(|e| invalid(e.to_string()))?;

    let version = meta
        .file_metadata()
        .key_value_metadata()
        .and_then(|kvs| kvs.iter().find(|kv| kv.key == FORMAT_VERSION_KEY))
        .ok_or_else(|| {
            invalid(format!(
                "no {FORMAT_VERSION_KEY} entry: not a Shoal segment"
            ))
        })?;
    match version.value.as_deref() {
        Some(FORMAT_VERSION) => Ok(Arc::new(meta)),
        other => Err(invalid(format!(
            "unsupported {FORMAT_VERSION_KEY} {other:?} (this reader knows {FORMAT_VERSION:?})"
        ))),
    }
}

/// Validate the 8-byte trailer at the end of `tail`; returns the metadata length.
fn parse_trailer(tail: &[u8]) -> Result<usize, String> {
    let Some(trailer) = tail.len().checked_sub(TRAILER_LEN).map(|at| &tail[at..]) else {
        return Err(format!(
            "{} bytes cannot hold a Parquet trailer",
            tail.len()
        ));
    };
    let (len, magic) = trailer.split_at(4);
    if magic != MAGIC {
        return Err(format!(
            "bad trailer magic {magic:?} (encrypted or not Parquet)"
        ));
    }
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(len);
    usize::try_from(u32::from_le_bytes(len_bytes)).map_err(|e| e.to_string())
}

/// Read all rows of one row group, fetching only the byte span of the
/// column chunks it needs (one range request), then decoding off the
/// async runtime.
pub async fn read_row_group(
    store: &ObjectStorage,
    key: &str,
    meta: Arc<ParquetMetaData>,
    row_group: usize,
) -> Result<Vec<Record>> {
    let plan = RowGroupPlan::new(key, &meta, row_group)?;
    let data = store.get_range(key, plan.span.clone()).await?;
    plan.decode(key, meta, row_group, data).await
}

/// The footer of a whole object held in memory: the bytes
/// [`fetch_footer`] would return for it.
pub fn footer_in(key: &str, object: &Bytes) -> Result<Bytes> {
    let corrupt = |reason: String| Error::CorruptSegment {
        key: key.to_owned(),
        reason,
    };
    let metadata_len = parse_trailer(object).map_err(corrupt)?;
    let footer_len = metadata_len.saturating_add(TRAILER_LEN);
    if footer_len.saturating_add(MAGIC.len()) > object.len() {
        return Err(corrupt(format!(
            "footer claims {metadata_len} metadata bytes in a {}-byte object",
            object.len()
        )));
    }
    Ok(object.slice(object.len() - footer_len..))
}

/// Like [`read_row_group`], from the whole object already in memory (no
/// request).
pub async fn decode_row_group_in(
    key: &str,
    meta: Arc<ParquetMetaData>,
    row_group: usize,
    object: &Bytes,
) -> Result<Vec<Record>> {
    let plan = RowGroupPlan::new(key, &meta, row_group)?;
    let span = usize::try_from(plan.span.start)
        .ok()
        .zip(usize::try_from(plan.span.end).ok())
        .filter(|(_, end)| *end <= object.len())
        .ok_or_else(|| Error::CorruptSegment {
            key: key.to_owned(),
            reason: format!(
                "row group {row_group} spans {:?}, past the {}-byte object",
                plan.span,
                object.len()
            ),
        })?;
    let data = object.slice(span.0..span.1);
    plan.decode(key, meta, row_group, data).await
}

/// What reading one row group takes: its columns, their byte span in the
/// object and the rows the metadata promises.
struct RowGroupPlan {
    roots: Vec<usize>,
    span: Range<u64>,
    expected_rows: usize,
}

impl RowGroupPlan {
    fn new(key: &str, meta: &ParquetMetaData, row_group: usize) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptSegment {
            key: key.to_owned(),
            reason,
        };
        let rg = meta
            .row_groups()
            .get(row_group)
            .ok_or_else(|| Error::RowGroupOutOfRange {
                key: key.to_owned(),
                row_group,
                count: meta.num_row_groups(),
            })?;
        let schema_descr = meta.file_metadata().schema_descr();
        let roots = record_roots(schema_descr).map_err(corrupt)?;
        let span = leaf_span(schema_descr, rg, &roots).map_err(corrupt)?;
        let expected_rows = usize::try_from(rg.num_rows())
            .map_err(|_| corrupt(format!("row group {row_group} has {} rows", rg.num_rows())))?;
        Ok(Self {
            roots,
            span,
            expected_rows,
        })
    }

    /// Decode the span's bytes off the async runtime.
    async fn decode(
        self,
        key: &str,
        meta: Arc<ParquetMetaData>,
        row_group: usize,
        data: Bytes,
    ) -> Result<Vec<Record>> {
        let owned_key = key.to_owned();
        let chunk = SpanReader {
            start: self.span.start,
            data,
        };
        tokio::task::spawn_blocking(move || {
            decode_row_group(
                &owned_key,
                meta,
                row_group,
                self.roots,
                chunk,
                self.expected_rows,
            )
        })
        .await
        // A panic inside the Parquet decoder means the bytes are bad; report
        // it as such rather than propagate it into the caller's task.
        .map_err(|e| Error::CorruptSegment {
            key: key.to_owned(),
            reason: format!("decoder failed: {e}"),
        })?
    }
}

/// Indices of the top-level columns a `Record` is built from.
fn record_roots(schema_descr: &SchemaDescriptor) -> Result<Vec<usize>, String> {
    let root = schema_descr.root_schema();
    if !root.is_group() {
        return Err("schema root is not a group".to_owned());
    }
    let fields = root.get_fields();
    RECORD_COLUMNS
        .iter()
        .map(|name| {
            fields
                .iter()
                .position(|f| f.name() == *name)
                .ok_or_else(|| format!("missing column {name:?}"))
        })
        .collect()
}

/// The byte range covering every column chunk under `roots` in `rg`.
/// Chunks of one row group are written back to back, so this is one read.
fn leaf_span(
    schema_descr: &SchemaDescriptor,
    rg: &RowGroupMetaData,
    roots: &[usize],
) -> Result<Range<u64>, String> {
    if rg.columns().len() != schema_descr.num_columns() {
        return Err(format!(
            "row group has {} column chunks, schema has {} columns",
            rg.columns().len(),
            schema_descr.num_columns()
        ));
    }
    let mut span: Option<Range<u64>> = None;
    for (leaf, column) in rg.columns().iter().enumerate() {
        if !roots.contains(&schema_descr.get_column_root_idx(leaf)) {
            continue;
        }
        let start = column
            .dictionary_page_offset()
            .unwrap_or(column.data_page_offset());
        let bad = || format!("column chunk {leaf} has invalid byte range");
        let start = u64::try_from(start).map_err(|_| bad())?;
        let len = u64::try_from(column.compressed_size()).map_err(|_| bad())?;
        let end = start.checked_add(len).ok_or_else(bad)?;
        span = Some(match span {
            None => start..end,
            Some(s) => s.start.min(start)..s.end.max(end),
        });
    }
    span.ok_or_else(|| "no column chunks to read".to_owned())
}

fn decode_row_group(
    key: &str,
    meta: Arc<ParquetMetaData>,
    row_group: usize,
    roots: Vec<usize>,
    chunk: SpanReader,
    expected_rows: usize,
) -> Result<Vec<Record>> {
    let parquet_err = |source| Error::Parquet {
        context: format!("object {key:?} row group {row_group}"),
        source,
    };
    let mask = ProjectionMask::roots(meta.file_metadata().schema_descr(), roots);
    let arrow_meta =
        ArrowReaderMetadata::try_new(meta, ArrowReaderOptions::new()).map_err(parquet_err)?;
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(chunk, arrow_meta)
        .with_row_groups(vec![row_group])
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(parquet_err)?;

    // Capacity is a hint from file metadata; bound it so a corrupt count
    // cannot trigger a huge allocation.
    let mut records = Vec::with_capacity(expected_rows.min(BATCH_ROWS * 8));
    for batch in reader {
        let batch = batch.map_err(|source| Error::Arrow {
            context: format!("object {key:?} row group {row_group}"),
            source,
        })?;
        batch_to_records(&batch, &mut records).map_err(|reason| Error::CorruptSegment {
            key: key.to_owned(),
            reason: format!("row group {row_group}: {reason}"),
        })?;
    }
    if records.len() != expected_rows {
        return Err(Error::CorruptSegment {
            key: key.to_owned(),
            reason: format!(
                "row group {row_group} decoded {} rows, metadata says {expected_rows}",
                records.len()
            ),
        });
    }
    Ok(records)
}

/// Convert one decoded batch, checking types and required columns
/// instead of trusting the file.
fn batch_to_records(batch: &RecordBatch, out: &mut Vec<Record>) -> Result<(), String> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| format!("missing column {name:?}"))
    };
    let wrong = |name: &str| format!("column {name:?} has an unexpected type");
    let required = |name: &str, a: &dyn Array| {
        if a.null_count() == 0 {
            Ok(())
        } else {
            Err(format!("required column {name:?} has nulls"))
        }
    };

    let offset = col(schema::OFFSET)?
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| wrong(schema::OFFSET))?;
    required(schema::OFFSET, offset)?;
    let timestamp = col(schema::TIMESTAMP)?
        .as_primitive_opt::<TimestampMillisecondType>()
        .ok_or_else(|| wrong(schema::TIMESTAMP))?;
    required(schema::TIMESTAMP, timestamp)?;
    let key = col(schema::KEY)?
        .as_binary_opt::<i32>()
        .ok_or_else(|| wrong(schema::KEY))?;
    let value = col(schema::VALUE)?
        .as_binary_opt::<i32>()
        .ok_or_else(|| wrong(schema::VALUE))?;
    let headers = col(schema::HEADERS)?
        .as_list_opt::<i32>()
        .ok_or_else(|| wrong(schema::HEADERS))?;
    let entries = headers
        .values()
        .as_struct_opt()
        .ok_or_else(|| wrong(schema::HEADERS))?;
    required(schema::HEADERS, entries)?;
    let header_key = entries
        .column_by_name(schema::HEADER_KEY)
        .and_then(|a| a.as_string_opt::<i32>())
        .ok_or_else(|| wrong("headers.key"))?;
    required("headers.key", header_key)?;
    let header_value = entries
        .column_by_name(schema::HEADER_VALUE)
        .and_then(|a| a.as_binary_opt::<i32>())
        .ok_or_else(|| wrong("headers.value"))?;
    let producer_id = col(schema::PRODUCER_ID)?
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| wrong(schema::PRODUCER_ID))?;
    let producer_epoch = col(schema::PRODUCER_EPOCH)?
        .as_primitive_opt::<Int16Type>()
        .ok_or_else(|| wrong(schema::PRODUCER_EPOCH))?;
    let sequence = col(schema::SEQUENCE)?
        .as_primitive_opt::<Int32Type>()
        .ok_or_else(|| wrong(schema::SEQUENCE))?;

    let bytes_at = |a: &arrow::array::BinaryArray, i: usize| {
        a.is_valid(i).then(|| Bytes::copy_from_slice(a.value(i)))
    };
    let offsets = headers.value_offsets();
    for i in 0..batch.num_rows() {
        // A null list is read as no headers, as the writer never writes one.
        let hs = if headers.is_valid(i) {
            let (Ok(lo), Ok(hi)) = (usize::try_from(offsets[i]), usize::try_from(offsets[i + 1]))
            else {
                return Err("negative header list offset".to_owned());
            };
            if lo > hi || hi > entries.len() {
                return Err("header list offsets out of range".to_owned());
            }
            (lo..hi)
                .map(|j| Header {
                    key: header_key.value(j).to_owned(),
                    value: bytes_at(header_value, j),
                })
                .collect()
        } else {
            Vec::new()
        };
        out.push(Record {
            offset: offset.value(i),
            timestamp_ms: timestamp.value(i),
            key: bytes_at(key, i),
            value: bytes_at(value, i),
            headers: hs,
            producer_id: producer_id.is_valid(i).then(|| producer_id.value(i)),
            producer_epoch: producer_epoch.is_valid(i).then(|| producer_epoch.value(i)),
            sequence: sequence.is_valid(i).then(|| sequence.value(i)),
        });
    }
    Ok(())
}

/// The bytes of one span of a segment, addressed by file offsets, so the
/// synchronous Parquet reader can decode a row group fetched by one range
/// read. Reads outside the span are errors, never panics.
struct SpanReader {
    start: u64,
    data: Bytes,
}

impl SpanReader {
    fn slice(&self, start: u64, len: Option<usize>) -> parquet::errors::Result<Bytes> {
        let outside = || {
            ParquetError::EOF(format!(
                "read at {start} (+{len:?}) outside fetched span {}..{}",
                self.start,
                self.start + self.data.len() as u64
            ))
        };
        let from = start
            .checked_sub(self.start)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o <= self.data.len())
            .ok_or_else(outside)?;
        let to = match len {
            None => self.data.len(),
            Some(len) => from
                .checked_add(len)
                .filter(|&to| to <= self.data.len())
                .ok_or_else(outside)?,
        };
        Ok(self.data.slice(from..to))
    }
}

impl Length for SpanReader {
    fn len(&self) -> u64 {
        // Nothing past the span is readable; present it as the file end.
        self.start + self.data.len() as u64
    }
}

impl ChunkReader for SpanReader {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(self.slice(start, None)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.slice(start, Some(length))
    }
}
