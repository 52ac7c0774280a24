//! Cold reads: one committed segment range re-encoded from its Parquet
//! object into Kafka batches, for the cache.
//!
//! A flush object holds a range of every shard flushed together, so a
//! catch-up read of many partitions wants most of each object. Objects up
//! to [`WHOLE_OBJECT_MAX`] (and an eighth of the memory tier) are therefore fetched whole, by one request
//! shared by every range load that needs the object meanwhile, and kept in
//! the memory tier while their other row groups are wanted: one request
//! per object instead of a footer and a row group per partition, which is
//! what request latency (S3's tens of milliseconds) charges for. Larger
//! objects (compacted ones) are read by ranges: the footer (cached), then
//! the row group.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use std::future::Future;

use futures::future::{BoxFuture, Shared};
use shoal_placement::SegmentRef;
use shoal_storage::ObjectStorage;
use shoal_wal_cache::Cache;

use crate::batch;
use crate::error::Error;

/// Size of the batches cold reads are re-encoded into (Kafka's default
/// max.partition.fetch.bytes).
pub(crate) const COLD_BATCH_BYTES: usize = 1 << 20;
/// Objects up to this size are fetched whole by a cold read: flush objects
/// are at most about four `--flush-bytes` (32 MiB by default), plus a row
/// group's overshoot.
const WHOLE_OBJECT_MAX: u64 = 64 << 20;
/// Whole-object GETs in flight hold at most this many bytes together (and
/// at most a quarter of the memory tier); the rest wait their turn.
const WHOLE_OBJECT_BYTES_IN_FLIGHT: u64 = 256 << 20;
/// ... and up to this share of the memory tier, which must keep an object
/// while its ranges are decoded (else each range would fetch it again).
const WHOLE_OBJECT_MEMORY_SHARE: u64 = 8;

/// The cache key of a segment range's re-encoded batches.
pub(crate) fn range_key(seg: &SegmentRef) -> String {
    format!("rg/{}/{}", seg.object, seg.row_group)
}

fn object_key(object: &str) -> String {
    format!("obj/{object}")
}

fn footer_key(object: &str) -> String {
    format!("footer/{object}")
}

type SharedResult = Shared<BoxFuture<'static, Result<Bytes, String>>>;

/// Work in flight by key, shared by every caller that asks for the same
/// key meanwhile. Each piece runs as a task of its own: it finishes (and
/// caches what it got) even when every caller gave up, and a panic in it
/// reaches the callers as an error.
#[derive(Default)]
pub(crate) struct InFlight {
    running: parking_lot::Mutex<HashMap<String, SharedResult>>,
}

impl InFlight {
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.running.lock().contains_key(key)
    }

    /// The result of the work under `key`: joined if running, else
    /// started with `start` (which `started` is told of first).
    pub(crate) async fn run<F>(
        &self,
        key: &str,
        started: impl FnOnce(),
        start: impl FnOnce() -> F,
    ) -> Result<Bytes, String>
    where
        F: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        let work = {
            let mut running = self.running.lock();
            match running.get(key) {
                Some(w) => w.clone(),
                None => {
                    started();
                    let task = tokio::spawn(start());
                    let w = async move {
                        task.await
                            .unwrap_or_else(|e| Err(format!("task failed: {e}")))
                    }
                    .boxed()
                    .shared();
                    running.insert(key.to_owned(), w.clone());
                    w
                }
            }
        };
        let done = work.clone().await;
        // Done: the next caller goes to the cache (or, after an error,
        // tries again). Work whose callers all gave up is cleared by the
        // next caller of its key.
        let mut running = self.running.lock();
        if running.get(key).is_some_and(|w| w.ptr_eq(&work)) {
            running.remove(key);
        }
        done
    }
}

/// Reads segment ranges from the object store into the cache.
pub(crate) struct ColdReader {
    store: ObjectStorage,
    cache: Cache,
    /// Objects up to this size are fetched whole.
    whole_max: u64,
    /// Whole-object GETs in flight, by object key.
    fetching: InFlight,
    /// The bytes whole-object GETs in flight may hold, in KiB.
    in_flight_kib: Arc<tokio::sync::Semaphore>,
    /// All of that budget.
    budget_kib: u32,
}

impl ColdReader {
    /// `memory_bytes`: the cache's memory tier.
    pub(crate) fn new(store: ObjectStorage, cache: Cache, memory_bytes: u64) -> Arc<Self> {
        let budget_kib = u32::try_from(WHOLE_OBJECT_BYTES_IN_FLIGHT.min(memory_bytes / 4) >> 10)
            .unwrap_or(u32::MAX)
            .max(1);
        Arc::new(Self {
            store,
            cache,
            whole_max: WHOLE_OBJECT_MAX.min(memory_bytes / WHOLE_OBJECT_MEMORY_SHARE),
            fetching: Default::default(),
            in_flight_kib: Arc::new(tokio::sync::Semaphore::new(budget_kib as usize)),
            budget_kib,
        })
    }

    /// `seg`'s records as consecutive Kafka batches, also cached under
    /// [`range_key`].
    pub(crate) async fn load(self: Arc<Self>, seg: SegmentRef) -> Result<Bytes, String> {
        let loaded = async {
            let rows = if seg.object_size > 0 && seg.object_size <= self.whole_max {
                let object = self.whole_object(&seg.object, seg.object_size).await?;
                let footer = shoal_storage::footer_in(&seg.object, &object)?;
                let meta = shoal_storage::decode_footer(&footer)?;
                shoal_storage::decode_row_group_in(
                    &seg.object,
                    meta,
                    seg.row_group as usize,
                    &object,
                )
                .await?
            } else {
                let meta = shoal_storage::decode_footer(&self.footer(&seg.object).await?)?;
                shoal_storage::read_row_group(
                    &self.store,
                    &seg.object,
                    meta,
                    seg.row_group as usize,
                )
                .await?
            };
            // Batches of about a fetch's partition size, so a fetch takes a
            // slice of a large row group instead of all of it.
            let encoded = batch::from_rows_chunked(&rows, COLD_BATCH_BYTES)?;
            self.cache.insert(&range_key(&seg), encoded.clone());
            Ok::<_, Error>(encoded)
        }
        .await;
        loaded.map_err(|e| e.to_string())
    }

    async fn footer(&self, object: &str) -> Result<Bytes, Error> {
        let key = footer_key(object);
        if let Some(f) = self.cache.get(&key).await {
            return Ok(f);
        }
        let (f, _size) = shoal_storage::fetch_footer(&self.store, object).await?;
        self.cache.insert(&key, f.clone());
        Ok(f)
    }

    /// The object's bytes: from memory, or by one GET that every caller
    /// meanwhile shares. Kept in the memory tier only: re-reading it from
    /// the store costs no more than from the disk tier, and its ranges are
    /// cached on their own once decoded.
    async fn whole_object(&self, object: &str, size: u64) -> Result<Bytes, Error> {
        let key = object_key(object);
        if let Some(b) = self.cache.get(&key).await {
            return Ok(b);
        }
        let store = self.store.clone();
        let cache = self.cache.clone();
        let name = object.to_owned();
        let budget = self.in_flight_kib.clone();
        // Never more than the whole budget, so any object can go.
        let kib = u32::try_from((size >> 10).max(1))
            .unwrap_or(u32::MAX)
            .min(self.budget_kib);
        let fetched = self
            .fetching
            .run(
                object,
                || {},
                move || async move {
                    let _held = budget
                        .acquire_many_owned(kib)
                        .await
                        .map_err(|e| e.to_string())?;
                    tracing::debug!(object = %name, "reading a whole object");
                    let bytes = store.get(&name).await.map_err(|e| e.to_string())?;
                    tracing::debug!(object = %name, bytes = bytes.len(), "read a whole object");
                    cache.insert_in_memory(&object_key(&name), bytes.clone());
                    Ok(bytes)
                },
            )
            .await;
        fetched.map_err(|reason| Error::ColdRead {
            object: object.to_owned(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use shoal_storage::{Record, SegmentOptions, ShardRows};
    use shoal_wal_cache::CacheOptions;

    use super::*;

    fn rows(first: i64, n: i64) -> Vec<Record> {
        (first..first + n)
            .map(|o| Record {
                offset: o,
                timestamp_ms: 1_000 + o,
                key: None,
                value: Some(Bytes::from(format!("v{o}"))),
                headers: Vec::new(),
                producer_id: None,
                producer_epoch: None,
                sequence: None,
            })
            .collect()
    }

    /// An object of three shards' ranges in a memory store, a cold reader
    /// over a memory tier sized by `memory_for(object size)`, and the
    /// object's ranges.
    async fn setup(
        memory_for: impl Fn(u64) -> u64,
    ) -> (Arc<ColdReader>, ObjectStorage, Vec<SegmentRef>) {
        let shards: Vec<ShardRows> = (0..3)
            .map(|s| ShardRows {
                stream: "t".into(),
                shard: s,
                records: rows(10 * i64::from(s), 5),
            })
            .collect();
        let seg = shoal_storage::encode_segment(shards, &SegmentOptions::default()).unwrap();
        let store = ObjectStorage::from_url("memory://").unwrap();
        store.put_create("obj", seg.bytes.clone()).await.unwrap();
        let memory_bytes = memory_for(seg.bytes.len() as u64);
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(CacheOptions {
            dir: dir.keep(),
            memory_bytes: usize::try_from(memory_bytes).unwrap(),
            disk_bytes: 0,
        })
        .await
        .unwrap();
        let refs = seg
            .ranges
            .iter()
            .map(|r| SegmentRef {
                object: "obj".into(),
                row_group: r.row_group,
                first_offset: r.first_offset,
                last_offset: r.last_offset,
                epoch: 1,
                record_count: r.record_count,
                min_timestamp_ms: r.min_timestamp_ms,
                max_timestamp_ms: r.max_timestamp_ms,
                object_size: seg.bytes.len() as u64,
                committed_ms: 0,
                bytes: r.bytes,
            })
            .collect();
        let reader = ColdReader::new(store.clone(), cache, memory_bytes);
        (reader, store, refs)
    }

    fn offsets(batches: &Bytes) -> Vec<i64> {
        batch::rows_of_all(batches.clone())
            .unwrap()
            .iter()
            .map(|r| r.offset)
            .collect()
    }

    #[tokio::test]
    async fn ranges_loaded_together_share_one_whole_object_read() {
        let (reader, store, refs) = setup(|_| 64 << 20).await;
        let loads = refs.iter().map(|r| reader.clone().load(r.clone()));
        let loaded = futures::future::try_join_all(loads).await.unwrap();
        for (r, b) in refs.iter().zip(&loaded) {
            let want: Vec<i64> = (r.first_offset..=r.last_offset).collect();
            assert_eq!(offsets(b), want);
        }
        assert_eq!(store.stats().gets, 1, "one GET for the whole object");
        // Loaded again later: from the object kept in memory.
        reader.clone().load(refs[1].clone()).await.unwrap();
        assert_eq!(store.stats().gets, 1);
    }

    #[tokio::test]
    async fn objects_too_large_for_the_memory_tier_are_read_by_ranges() {
        // An eighth of the memory tier is just short of the object (which
        // leaves room for the footer): footer, then row groups.
        let (reader, store, refs) = setup(|size| 8 * (size - 1)).await;
        for r in &refs {
            let b = reader.clone().load(r.clone()).await.unwrap();
            assert_eq!(offsets(&b).len() as u64, r.record_count);
        }
        let stats = store.stats();
        assert_eq!(
            stats.gets,
            1 + refs.len() as u64,
            "a footer, then one GET per range"
        );
    }
}
