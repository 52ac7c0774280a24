//! Kafka v2 record batches as the broker keeps them: split a produce
//! payload into batches, read their headers without decompressing, rewrite
//! the base offset, and convert between Kafka records and segment rows.
//!
//! Offsets inside a batch are relative to the base offset, and the base
//! offset is outside the CRC, so assigning offsets is a rewrite of 8 bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use shoal_storage::{Header, Record as Row};

use crate::error::{Error, Result};

/// Size of the fixed v2 batch header, up to and including the record count.
pub const HEADER_LEN: usize = 61;
const MAGIC_AT: usize = 16;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORD_COUNT_AT: usize = 57;

/// The header fields of one v2 batch the broker needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    pub record_count: i32,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
    pub control: bool,
}

impl BatchInfo {
    pub fn last_sequence(&self) -> i32 {
        // Kafka sequences wrap at i32::MAX.
        let last = i64::from(self.base_sequence) + i64::from(self.record_count) - 1;
        (last % (i64::from(i32::MAX) + 1)) as i32
    }

    pub fn is_idempotent(&self) -> bool {
        self.producer_id >= 0
    }
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut s = &b[at..at + 8];
    s.get_i64()
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut s = &b[at..at + 4];
    s.get_i32()
}
fn be_i16(b: &[u8], at: usize) -> i16 {
    let mut s = &b[at..at + 2];
    s.get_i16()
}

/// Read the header of a complete batch (caller guarantees `batch.len() >= HEADER_LEN`).
pub fn info(batch: &[u8]) -> BatchInfo {
    let attributes = be_i16(batch, ATTRIBUTES_AT);
    BatchInfo {
        record_count: be_i32(batch, RECORD_COUNT_AT),
        max_timestamp: be_i64(batch, MAX_TIMESTAMP_AT),
        producer_id: be_i64(batch, PRODUCER_ID_AT),
        producer_epoch: be_i16(batch, PRODUCER_EPOCH_AT),
        base_sequence: be_i32(batch, BASE_SEQUENCE_AT),
        transactional: attributes & (1 << 4) != 0,
        control: attributes & (1 << 5) != 0,
    }
}

/// Split a produce payload into whole batches, checking every length
/// against what is actually there.
pub fn split(mut records: Bytes) -> Result<Vec<Bytes>> {
    let mut out = Vec::new();
    while !records.is_empty() {
        if records.len() < HEADER_LEN {
            return Err(Error::Corrupt("truncated record batch header".into()));
        }
        let len = be_i32(&records, 8);
        let total = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(12))
            .filter(|t| *t >= HEADER_LEN && *t <= records.len())
            .ok_or_else(|| Error::Corrupt(format!("invalid batch length {len}")))?;
        let batch = records.split_to(total);
        if batch[MAGIC_AT] != 2 {
            return Err(Error::Corrupt(format!(
                "unsupported record batch magic {}",
                batch[MAGIC_AT]
            )));
        }
        out.push(batch);
    }
    Ok(out)
}

/// Most records one batch may declare: the decoder reserves room for the
/// declared count, so it must not come straight from the wire.
pub const MAX_RECORDS_PER_BATCH: i32 = 1 << 20;
/// A v2 record is at least 7 bytes (length, attributes, two deltas, key and
/// value lengths, header count).
const MIN_RECORD_LEN: usize = 7;

/// Decode every record of a batch: CRC check, bounded decompression.
fn decode(batch: &Bytes) -> Result<Vec<kafka_protocol::records::Record>> {
    let header = info(batch);
    let attributes = be_i16(batch, ATTRIBUTES_AT);
    let compressed = attributes & 0x7 != 0;
    let count = header.record_count;
    let body = batch.len() - HEADER_LEN;
    // Compressed records may be smaller than 7 bytes each on the wire, but
    // not by more than a generous ratio.
    let plausible = if compressed {
        (body.saturating_mul(64)).max(16_384)
    } else {
        body / MIN_RECORD_LEN
    };
    if count <= 0 || count > MAX_RECORDS_PER_BATCH || count as usize > plausible {
        return Err(Error::Corrupt(format!(
            "batch declares an impossible record count {count}"
        )));
    }
    let mut buf = batch.clone();
    let set = RecordBatchDecoder::decode_with_custom_compression(
        &mut buf,
        Some(crate::decompress::decompress),
    )
    .map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok(set.records)
}

/// Fully decode (CRC check, decompression) and sanity-check a batch.
pub fn validate(batch: &Bytes) -> Result<Vec<kafka_protocol::records::Record>> {
    let header = info(batch);
    let records = decode(batch)?;
    let base = be_i64(batch, 0);
    let last_delta = be_i32(batch, LAST_OFFSET_DELTA_AT);
    if records.len() != header.record_count as usize
        || last_delta != header.record_count - 1
        || records
            .iter()
            .enumerate()
            .any(|(i, r)| r.offset != base + i as i64)
    {
        return Err(Error::Corrupt(
            "record offsets are not sequential within the batch".into(),
        ));
    }
    Ok(records)
}

/// A copy of the batch with its base offset set.
pub fn with_base_offset(batch: &[u8], base_offset: i64) -> Bytes {
    let mut out = BytesMut::with_capacity(batch.len());
    out.put_i64(base_offset);
    out.extend_from_slice(&batch[8..]);
    out.freeze()
}

pub fn base_offset(batch: &[u8]) -> i64 {
    be_i64(batch, 0)
}

/// Decode a stored batch (already carrying its real base offset) into rows.
pub fn to_rows(batch: &Bytes) -> Result<Vec<Row>> {
    Ok(decode(batch)?
        .into_iter()
        .map(|r| Row {
            offset: r.offset,
            timestamp_ms: r.timestamp,
            key: r.key,
            value: r.value,
            headers: r
                .headers
                .into_iter()
                .map(|(k, v)| Header {
                    key: k.as_str().to_string(),
                    value: v,
                })
                .collect(),
            producer_id: (r.producer_id >= 0).then_some(r.producer_id),
            producer_epoch: (r.producer_id >= 0).then_some(r.producer_epoch),
            sequence: (r.producer_id >= 0).then_some(r.sequence),
        })
        .collect())
}

/// The rows of consecutive batches (a segment range as read or cached).
pub fn rows_of_all(batches: Bytes) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for b in split(batches)? {
        rows.extend(to_rows(&b)?);
    }
    Ok(rows)
}

/// Encode segment rows back into one uncompressed Kafka batch (with a
/// valid CRC) for serving cold reads.
pub fn from_rows(rows: &[Row]) -> Result<Bytes> {
    let Some(first) = rows.first() else {
        return Ok(Bytes::new());
    };
    let records: Vec<kafka_protocol::records::Record> = rows
        .iter()
        .map(|r| {
            let mut headers = IndexMap::new();
            for h in &r.headers {
                headers.insert(StrBytes::from_string(h.key.clone()), h.value.clone());
            }
            kafka_protocol::records::Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: r.offset,
                // The encoder keeps one batch while offset - sequence is
                // constant; this yields a single batch with base sequence -1.
                sequence: (r.offset - first.offset - 1) as i32,
                timestamp: r.timestamp_ms,
                key: r.key.clone(),
                value: r.value.clone(),
                headers,
            }
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| Error::Internal(format!("encoding batch: {e}")))?;
    Ok(buf.freeze())
}

/// Encode rows as consecutive batches of at most about `max_batch_bytes`
/// each, so a reader can hand out a fetch-sized slice of a large row group
/// without decoding it again.
pub fn from_rows_chunked(rows: &[Row], max_batch_bytes: usize) -> Result<Bytes> {
    let mut out = BytesMut::new();
    let mut start = 0;
    while start < rows.len() {
        let mut end = start;
        let mut size = 0usize;
        while end < rows.len() && (end == start || size < max_batch_bytes) {
            let r = &rows[end];
            size += 32
                + r.key.as_ref().map_or(0, |k| k.len())
                + r.value.as_ref().map_or(0, |v| v.len())
                + r.headers
                    .iter()
                    .map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len()) + 8)
                    .sum::<usize>();
            end += 1;
        }
        out.extend_from_slice(&from_rows(&rows[start..end])?);
        start = end;
    }
    Ok(out.freeze())
}

/// The batches of `batches` from the one holding `offset` on, up to
/// `budget` bytes; the first is taken even when larger (KIP-74), so a
/// consumer always makes progress.
pub fn slice_for_fetch(batches: &Bytes, offset: i64, budget: usize) -> Bytes {
    slice_batches(batches, offset, budget, true)
}

/// As [`slice_for_fetch`], but every batch must fit in `budget`: for
/// filling the rest of a response behind what it already holds.
pub fn slice_within(batches: &Bytes, offset: i64, budget: usize) -> Bytes {
    slice_batches(batches, offset, budget, false)
}

/// (start, length, last offset) of each whole batch in `batches`, in order;
/// stops at the first one cut short.
fn whole_batches(batches: &Bytes) -> impl Iterator<Item = (usize, usize, i64)> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos + HEADER_LEN > batches.len() {
            return None;
        }
        let len = be_i32(batches, pos + 8).max(0) as usize + 12;
        if pos + len > batches.len() {
            return None;
        }
        let last = be_i64(batches, pos) + i64::from(be_i32(batches, pos + LAST_OFFSET_DELTA_AT));
        let at = pos;
        pos += len;
        Some((at, len, last))
    })
}

fn slice_batches(batches: &Bytes, offset: i64, budget: usize, first_always: bool) -> Bytes {
    let mut range: Option<(usize, usize)> = None;
    for (pos, len, last) in whole_batches(batches) {
        match range {
            None if last >= offset => {
                if !first_always && len > budget {
                    return Bytes::new();
                }
                range = Some((pos, pos + len));
            }
            Some((s, _)) if pos + len - s > budget => break,
            Some((s, _)) => range = Some((s, pos + len)),
            None => {}
        }
    }
    range.map_or_else(Bytes::new, |(s, e)| batches.slice(s..e))
}

/// The last offset of the last whole batch in `batches`.
pub fn last_offset_in(batches: &Bytes) -> Option<i64> {
    whole_batches(batches).last().map(|(_, _, last)| last)
}

/// A WAL entry: which shard, under which lease, and the batch as stored
/// (its base offset written in).
///
/// ```text
/// version u8 (2) | epoch u64 | shard i32 | base_offset i64 |
/// last_offset i64 | stream length u16 | stream | crc32c u32 | batch
/// ```
///
/// The header has its own checksum, so an entry whose batch bytes are
/// damaged still names the shard and offsets it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    pub stream: String,
    pub shard: i32,
    pub epoch: u64,
    pub batch: Bytes,
}

/// The header of a [`WalRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecordHeader {
    pub stream: String,
    pub shard: i32,
    pub epoch: u64,
    pub base_offset: i64,
    pub last_offset: i64,
}

const WAL_RECORD_VERSION: u8 = 2;
/// Fixed part of the header before the stream name.
const WAL_FIXED: usize = 1 + 8 + 4 + 8 + 8 + 2;

impl WalRecord {
    pub fn encode(&self) -> Bytes {
        let base = base_offset(&self.batch);
        let last = base + i64::from(info(&self.batch).record_count) - 1;
        let name = &self.stream.as_bytes()[..self.stream.len().min(u16::MAX as usize)];
        let mut b = BytesMut::with_capacity(WAL_FIXED + name.len() + 4 + self.batch.len());
        b.put_u8(WAL_RECORD_VERSION);
        b.put_u64(self.epoch);
        b.put_i32(self.shard);
        b.put_i64(base);
        b.put_i64(last);
        b.put_u16(name.len() as u16);
        b.extend_from_slice(name);
        let crc = crc32c::crc32c(&b);
        b.put_u32(crc);
        b.extend_from_slice(&self.batch);
        b.freeze()
    }

    /// The header alone, if its checksum holds (the batch may be damaged).
    pub fn decode_header(b: &[u8]) -> Option<(WalRecordHeader, usize)> {
        let fixed = b.get(..WAL_FIXED)?;
        if fixed[0] != WAL_RECORD_VERSION {
            return None;
        }
        let mut f = &fixed[1..];
        let epoch = f.get_u64();
        let shard = f.get_i32();
        let base_offset = f.get_i64();
        let last_offset = f.get_i64();
        let n = f.get_u16() as usize;
        let end = WAL_FIXED + n;
        let crc = b.get(end..end + 4)?;
        if crc32c::crc32c(&b[..end]).to_be_bytes() != crc {
            return None;
        }
        let stream = String::from_utf8(b[WAL_FIXED..end].to_vec()).ok()?;
        let header = WalRecordHeader {
            stream,
            shard,
            epoch,
            base_offset,
            last_offset,
        };
        Some((header, end + 4))
    }

    pub fn decode(b: Bytes) -> Result<Self> {
        let bad = |what: &str| Error::Corrupt(format!("WAL entry: {what}"));
        let (h, at) = Self::decode_header(&b).ok_or_else(|| bad("unreadable header"))?;
        let batch = b.slice(at..);
        if batch.len() < HEADER_LEN
            || base_offset(&batch) != h.base_offset
            || base_offset(&batch) + i64::from(info(&batch).record_count) - 1 != h.last_offset
        {
            return Err(bad("batch does not match its header"));
        }
        Ok(WalRecord {
            stream: h.stream,
            shard: h.shard,
            epoch: h.epoch,
            batch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(first: i64, n: i64) -> Vec<Row> {
        (first..first + n)
            .map(|o| Row {
                offset: o,
                timestamp_ms: 1_700_000_000_000 + o,
                key: (o % 2 == 0).then(|| Bytes::from(format!("k{o}"))),
                value: Some(Bytes::from(format!("v{o}"))),
                headers: vec![Header {
                    key: "h".into(),
                    value: None,
                }],
                producer_id: None,
                producer_epoch: None,
                sequence: None,
            })
            .collect()
    }

    #[test]
    fn rows_round_trip_through_one_batch() {
        let input = rows(10, 5);
        let encoded = from_rows(&input).unwrap();
        let batches = split(encoded.clone()).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(info(&batches[0]).record_count, 5);
        assert_eq!(base_offset(&batches[0]), 10);
        assert_eq!(to_rows(&encoded).unwrap(), input);
    }

    #[test]
    fn rebasing_keeps_crc_valid() {
        let encoded = from_rows(&rows(0, 3)).unwrap();
        let moved = with_base_offset(&encoded, 100);
        let decoded = to_rows(&moved).unwrap();
        assert_eq!(decoded[0].offset, 100);
        assert_eq!(decoded[2].offset, 102);
    }

    #[test]
    fn corrupt_crc_and_lengths_are_errors() {
        let encoded = from_rows(&rows(0, 3)).unwrap();
        let mut bad = encoded.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(validate(&Bytes::from(bad)).is_err());
        let mut huge = encoded.to_vec();
        huge[8..12].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(split(Bytes::from(huge)).is_err());
        assert!(split(encoded.slice(0..20)).is_err());
        assert!(WalRecord::decode(Bytes::from_static(&[0, 9, 1])).is_err());
    }

    #[test]
    fn wal_records_round_trip_and_name_their_shard_when_damaged() {
        let batch = with_base_offset(&from_rows(&rows(0, 3)).unwrap(), 40);
        let rec = WalRecord {
            stream: "orders".into(),
            shard: 3,
            epoch: 9,
            batch,
        };
        let bytes = rec.encode();
        assert_eq!(WalRecord::decode(bytes.clone()).unwrap(), rec);
        let mut damaged = bytes.to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        let (h, _) = WalRecord::decode_header(&damaged).unwrap();
        assert_eq!((h.stream.as_str(), h.shard, h.epoch), ("orders", 3, 9));
        assert_eq!((h.base_offset, h.last_offset), (40, 42));
        damaged[5] ^= 0xff;
        assert!(WalRecord::decode_header(&damaged).is_none());
        assert!(WalRecord::decode(Bytes::from(damaged)).is_err());
    }

    #[test]
    fn chunked_rows_are_sliced_by_offset_and_budget() {
        let input = rows(100, 50);
        let all = from_rows_chunked(&input, 64).unwrap();
        let batches = split(all.clone()).unwrap();
        assert!(batches.len() > 5);
        // Everything decodes back in order.
        let mut back = Vec::new();
        for b in &batches {
            back.extend(to_rows(b).unwrap());
        }
        assert_eq!(back, input);
        // From offset 120 with a small budget: starts at the batch holding 120.
        let part = slice_for_fetch(&all, 120, 1);
        let got = to_rows(&part).unwrap();
        assert!(got[0].offset <= 120 && got.last().unwrap().offset >= 120);
        assert_eq!(split(part.clone()).unwrap().len(), 1);
        // A large budget takes the rest; past the end nothing.
        let rest = slice_for_fetch(&all, 120, usize::MAX);
        assert_eq!(
            split(rest.clone())
                .unwrap()
                .iter()
                .map(|b| to_rows(b).unwrap().len())
                .sum::<usize>() as i64,
            150 - got[0].offset
        );
        assert!(slice_for_fetch(&all, 1000, usize::MAX).is_empty());
        assert_eq!(last_offset_in(&all), Some(149));
        assert_eq!(rows_of_all(rest).unwrap().len() as i64, 150 - got[0].offset);
        // Behind other data nothing larger than the budget is taken.
        assert!(slice_within(&all, 120, 1).is_empty());
        let first = split(part.clone()).unwrap()[0].len();
        let within = slice_within(&all, 120, 2 * first);
        assert!(!within.is_empty() && within.len() <= 2 * first);
        assert_eq!(last_offset_in(&Bytes::new()), None);
    }
}
