//! Rewriting one run of a shard's index into compacted files, and the
//! atomic index swap that makes them live.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use shoal_placement::{Command, PlacementClient, RangeId, Reply, SegmentRef, SegmentReplacement};
use shoal_storage::{
    EncodedSegment, ObjectStorage, Record, SegmentOptions, SegmentWriter, ShardRows,
};

use crate::error::{Error, Result};

/// Log compaction of a run: keep the newest record of every key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepLatest {
    /// Tombstones (no value) with a timestamp before this go entirely.
    pub tombstones_before_ms: i64,
}

/// One run to rewrite.
#[derive(Debug)]
pub(crate) struct Job {
    pub stream: String,
    pub shard: i32,
    pub run: Vec<SegmentRef>,
    pub keep_latest: Option<KeepLatest>,
}

#[derive(Debug, Default)]
pub(crate) struct Rewritten {
    pub objects_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Where the rewrite writes and commits, and under which lease.
pub(crate) struct Target<'a> {
    pub store: &'a ObjectStorage,
    pub placement: &'a PlacementClient,
    pub epoch: u64,
    /// Counter of files written under `epoch`, for unique keys.
    pub written: &'a mut u64,
    pub target_size: u64,
    pub row_group_bytes: usize,
    pub now_ms: i64,
    /// Footers read in this run: a flush object holds many shards, each
    /// rewritten by its own job.
    pub footers: &'a mut HashMap<String, Arc<shoal_storage::SegmentMeta>>,
}

pub(crate) async fn rewrite(t: Target<'_>, job: Job) -> Result<Rewritten> {
    let (Some(first), Some(last)) = (job.run.first(), job.run.last()) else {
        return Ok(Rewritten::default());
    };
    let (run_first, run_last) = (first.first_offset, last.last_offset);
    let fail = |reason: String| Error::Rewrite {
        stream: job.stream.clone(),
        shard: job.shard,
        reason,
    };
    let mut done = Rewritten {
        bytes_in: crate::plan::run_bytes(&job.run),
        ..Rewritten::default()
    };
    let opts = SegmentOptions {
        max_rows_per_row_group: 1 << 20,
        max_row_group_bytes: t.row_group_bytes,
        ..SegmentOptions::default()
    };
    // Each file to write, with the last offset of the run it covers.
    let files: Vec<(EncodedSegment, i64)> = match job.keep_latest {
        Some(k) => {
            // Which record of a key is newest is known only once every
            // record was seen: the run is read whole.
            let rows = keep_latest(read_rows(t.store, t.footers, &job.run).await?, k);
            encode_split(&job, rows, t.target_size, &opts, run_last).await?
        }
        // A plain run (planned within the target size) is streamed into
        // one file, a row group at a time.
        None => vec![(
            stream_file(t.store, t.footers, &job, &opts).await?,
            run_last,
        )],
    };
    if files.iter().all(|(f, _)| f.ranges.is_empty()) {
        return Err(fail("no rows found in the run".into()));
    }
    let epoch_max = job.run.iter().map(|r| r.epoch).max().unwrap_or(0);
    let committed_ms = job.run.iter().map(|r| r.committed_ms).max().unwrap_or(0);
    let mut with: Vec<SegmentRef> = Vec::new();
    let mut keys = Vec::new();
    let mut covered_to = run_first - 1;
    for (encoded, cover_last) in files {
        let cover_first = covered_to + 1;
        let size = encoded.bytes.len() as u64;
        let key = put_new(
            t.store,
            &job,
            (cover_first, cover_last),
            t.epoch,
            t.written,
            encoded.bytes,
        )
        .await?;
        keys.push(key.clone());
        done.objects_out += 1;
        done.bytes_out += size;
        let n = encoded.ranges.len();
        for (j, range) in encoded.ranges.iter().enumerate() {
            // Dense over the run: gaps left by log compaction belong to
            // the range after them, and the last range ends the cover.
            let first_offset = covered_to + 1;
            let last_offset = if j + 1 == n {
                cover_last
            } else {
                range.last_offset
            };
            with.push(SegmentRef {
                object: key.clone(),
                row_group: range.row_group,
                first_offset,
                last_offset,
                epoch: epoch_max,
                record_count: range.record_count,
                min_timestamp_ms: range.min_timestamp_ms,
                max_timestamp_ms: range.max_timestamp_ms,
                object_size: size,
                committed_ms,
                bytes: range.bytes,
            });
            covered_to = last_offset;
        }
    }
    let cmd = Command::ReplaceSegments(SegmentReplacement {
        compaction_epoch: t.epoch,
        stream: job.stream.clone(),
        shard: job.shard,
        replaced: job.run.iter().map(RangeId::of).collect(),
        with,
        now_ms: t.now_ms,
    });
    match t.placement.write(cmd).await {
        Ok(Reply::Done) => Ok(done),
        // Not deleted here even when refused: a retried swap may have been
        // applied by a new leader before the refusal, and then these files
        // are live. Garbage collection takes them if they are not.
        Ok(Reply::Rejected { rejection }) => {
            tracing::info!(files = ?keys, "index swap refused; the files are left to garbage collection");
            Err(Error::Rejected {
                what: format!("the rewrite of {}/{}", job.stream, job.shard),
                rejection,
            })
        }
        Ok(other) => Err(Error::Unexpected {
            what: "ReplaceSegments".into(),
            reply: format!("{other:?}"),
        }),
        // Unknown whether it applied: garbage collection takes the files
        // after the orphan grace if it did not.
        Err(e) => Err(e.into()),
    }
}

/// A plain run streamed into one file: each range is read, and its rows
/// are encoded whenever about a row group's worth is pending, so memory
/// holds one row group of rows plus the encoded file, not the whole run.
async fn stream_file(
    store: &ObjectStorage,
    footers: &mut HashMap<String, Arc<shoal_storage::SegmentMeta>>,
    job: &Job,
    opts: &SegmentOptions,
) -> Result<EncodedSegment> {
    let mut writer = SegmentWriter::new(opts)?;
    let mut pending: Vec<Record> = Vec::new();
    let mut pending_bytes = 0u64;
    let limit = u64::try_from(opts.max_row_group_bytes).unwrap_or(u64::MAX);
    for r in &job.run {
        for row in read_range(store, footers, r).await? {
            pending_bytes += record_bytes(&row);
            pending.push(row);
            if pending_bytes >= limit {
                writer = write_blocking(job, writer, std::mem::take(&mut pending)).await?;
                pending_bytes = 0;
            }
        }
    }
    if !pending.is_empty() {
        writer = write_blocking(job, writer, pending).await?;
    }
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .map_err(|e| encoder_failed(job, &e))?
        .map_err(Error::from)
}

async fn write_blocking(
    job: &Job,
    mut writer: SegmentWriter,
    rows: Vec<Record>,
) -> Result<SegmentWriter> {
    let (stream, shard) = (job.stream.clone(), job.shard);
    tokio::task::spawn_blocking(move || {
        writer.write(&stream, shard, &rows)?;
        Ok::<_, shoal_storage::Error>(writer)
    })
    .await
    .map_err(|e| encoder_failed(job, &e))?
    .map_err(Error::from)
}

fn encoder_failed(job: &Job, e: &tokio::task::JoinError) -> Error {
    Error::Rewrite {
        stream: job.stream.clone(),
        shard: job.shard,
        reason: format!("encoder failed: {e}"),
    }
}

/// Kept rows (log compaction) split into files of about the target size,
/// each with the last offset of the run it covers (the run's end for the
/// last file).
async fn encode_split(
    job: &Job,
    rows: Vec<Record>,
    target_size: u64,
    opts: &SegmentOptions,
    run_last: i64,
) -> Result<Vec<(EncodedSegment, i64)>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let kept_bytes: u64 = rows.iter().map(record_bytes).sum();
    let files = usize::try_from(kept_bytes.div_ceil(target_size.max(1)))
        .unwrap_or(1)
        .clamp(1, rows.len());
    let per_file = rows.len().div_ceil(files);
    let chunks: Vec<Vec<Record>> = rows.chunks(per_file).map(<[Record]>::to_vec).collect();
    let count = chunks.len();
    let mut out = Vec::with_capacity(count);
    for (i, chunk) in chunks.into_iter().enumerate() {
        let cover_last = if i + 1 == count {
            run_last
        } else {
            chunk.last().map_or(run_last, |r| r.offset)
        };
        let shard_rows = ShardRows {
            stream: job.stream.clone(),
            shard: job.shard,
            records: chunk,
        };
        let opts = opts.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            shoal_storage::encode_segment(vec![shard_rows], &opts)
        })
        .await
        .map_err(|e| encoder_failed(job, &e))??;
        out.push((encoded, cover_last));
    }
    Ok(out)
}

/// Create-only PUT under a fresh key of this lease epoch.
async fn put_new(
    store: &ObjectStorage,
    job: &Job,
    span: (i64, i64),
    epoch: u64,
    written: &mut u64,
    bytes: Bytes,
) -> Result<String> {
    loop {
        *written += 1;
        let key = shoal_storage::compacted_key(&job.stream, job.shard, span, (epoch, *written));
        match store.put_create(&key, bytes.clone()).await {
            Ok(()) => return Ok(key),
            Err(shoal_storage::Error::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Every record of the run's ranges, in offset order.
async fn read_rows(
    store: &ObjectStorage,
    footers: &mut HashMap<String, Arc<shoal_storage::SegmentMeta>>,
    run: &[SegmentRef],
) -> Result<Vec<Record>> {
    let mut rows = Vec::new();
    for r in run {
        rows.extend(read_range(store, footers, r).await?);
    }
    Ok(rows)
}

/// The records of one index range (its row group, within its offsets).
async fn read_range(
    store: &ObjectStorage,
    footers: &mut HashMap<String, Arc<shoal_storage::SegmentMeta>>,
    r: &SegmentRef,
) -> Result<Vec<Record>> {
    let meta = match footers.get(&r.object) {
        Some(m) => m.clone(),
        None => {
            let (footer, _) = shoal_storage::fetch_footer(store, &r.object).await?;
            let m = shoal_storage::decode_footer(&footer)?;
            footers.insert(r.object.clone(), m.clone());
            m
        }
    };
    let mut records =
        shoal_storage::read_row_group(store, &r.object, meta, r.row_group as usize).await?;
    records.retain(|x| (r.first_offset..=r.last_offset).contains(&x.offset));
    Ok(records)
}

/// Keep the newest record of every key (records without a key stay), drop
/// tombstones older than the cut-off, and always keep the run's last
/// record so the run still ends on a record.
pub(crate) fn keep_latest(rows: Vec<Record>, k: KeepLatest) -> Vec<Record> {
    let mut newest: HashMap<Bytes, usize> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        if let Some(key) = &r.key {
            newest.insert(key.clone(), i);
        }
    }
    let last = rows.len().saturating_sub(1);
    rows.into_iter()
        .enumerate()
        .filter(|(i, r)| {
            *i == last
                || match &r.key {
                    None => true,
                    Some(key) => {
                        newest.get(key) == Some(i)
                            && !(r.value.is_none() && r.timestamp_ms < k.tombstones_before_ms)
                    }
                }
        })
        .map(|(_, r)| r)
        .collect()
}

fn record_bytes(r: &Record) -> u64 {
    let len = |b: &Option<Bytes>| b.as_ref().map_or(0, |b| b.len() as u64);
    32 + len(&r.key)
        + len(&r.value)
        + r.headers
            .iter()
            .map(|h| h.key.len() as u64 + len(&h.value))
            .sum::<u64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64, key: &str, value: Option<&str>, ts: i64) -> Record {
        Record {
            offset,
            timestamp_ms: ts,
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            headers: Vec::new(),
            producer_id: None,
            producer_epoch: None,
            sequence: None,
        }
    }

    #[test]
    fn the_newest_value_of_each_key_survives() {
        let rows = vec![
            rec(0, "a", Some("1"), 0),
            rec(1, "b", Some("1"), 0),
            rec(2, "a", Some("2"), 0),
            rec(3, "b", None, 10),
            rec(4, "c", None, 100),
            rec(5, "c", Some("3"), 100),
        ];
        let kept: Vec<i64> = keep_latest(
            rows.clone(),
            KeepLatest {
                tombstones_before_ms: 50,
            },
        )
        .iter()
        .map(|r| r.offset)
        .collect();
        // b's tombstone is old enough to go; c's newest value stays.
        assert_eq!(kept, [2, 5]);
        let kept: Vec<i64> = keep_latest(
            rows,
            KeepLatest {
                tombstones_before_ms: 0,
            },
        )
        .iter()
        .map(|r| r.offset)
        .collect();
        assert_eq!(kept, [2, 3, 5]);
    }

    #[test]
    fn the_last_record_always_stays() {
        let rows = vec![rec(0, "a", Some("1"), 0), rec(1, "a", None, 0)];
        let kept = keep_latest(
            rows,
            KeepLatest {
                tombstones_before_ms: 100,
            },
        );
        assert_eq!(kept.iter().map(|r| r.offset).collect::<Vec<_>>(), [1]);
    }
}
