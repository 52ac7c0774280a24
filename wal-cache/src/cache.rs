//! Hybrid cache: a foyer memory tier that spills to a disk tier.
//!
//! Entries evicted from memory are written to the disk tier (foyer's
//! write-on-eviction policy), so the disk only sees data that memory could
//! not keep. The disk tier lives in files under `CacheOptions::dir` and is
//! recovered on the next open; keys must therefore name immutable content
//! (an object key and row group, a shard and offset), which Shoal's are.

use std::{
    fmt,
    fs::{File, TryLockError},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use foyer::{
    BlockEngineConfig, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCacheProperties, Location,
};

use crate::error::{Error, Result};

const MIB: usize = 1024 * 1024;

/// Where and how large the cache is.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Directory for the disk tier (created if missing).
    pub dir: PathBuf,
    /// Memory tier capacity in bytes of keys plus values (default 64 MiB).
    pub memory_bytes: usize,
    /// Disk tier capacity in bytes (default 256 MiB); 0 disables the disk tier.
    pub disk_bytes: usize,
}

impl CacheOptions {
    /// Options with default sizes.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            memory_bytes: 64 * MIB,
            disk_bytes: 256 * MIB,
        }
    }
}

/// Counters since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// `get` calls that found the key in either tier.
    pub hits: u64,
    /// `get` calls that did not (including disk-tier errors).
    pub misses: u64,
    /// `insert` calls.
    pub inserts: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
}

/// A cheap-to-clone handle on the hybrid cache.
#[derive(Clone)]
pub struct Cache {
    inner: HybridCache<String, Bytes>,
    counters: Arc<Counters>,
    // Held for the cache's lifetime: foyer does not lock its files, and two
    // caches writing one directory would corrupt each other.
    _dir_lock: Option<Arc<File>>,
}

impl Cache {
    /// Build the cache; needs a tokio runtime (foyer spawns its disk I/O
    /// tasks on the current one).
    pub async fn open(opts: CacheOptions) -> Result<Cache> {
        let memory = HybridCacheBuilder::new()
            .with_name("shoal-cache")
            .memory(opts.memory_bytes)
            // foyer splits capacity evenly across shards and an entry must
            // fit its shard; keep shards large enough for multi-MiB row
            // groups while still spreading lock contention on big caches.
            .with_shards((opts.memory_bytes / (32 * MIB)).clamp(1, 8))
            .with_weighter(|key: &String, value: &Bytes| key.len() + value.len());

        let storage = memory.storage();
        let (inner, dir_lock) = if opts.disk_bytes == 0 {
            // No engine configured: foyer runs memory-only behind the same API.
            (storage.build().await?, None)
        } else {
            std::fs::create_dir_all(&opts.dir).map_err(|source| Error::Io {
                path: opts.dir.clone(),
                source,
            })?;
            let lock = lock_dir(&opts.dir)?;
            let device = FsDeviceBuilder::new(&opts.dir)
                .with_capacity(opts.disk_bytes)
                .build()?;
            // foyer evicts whole blocks and an entry must fit in one; 16
            // blocks keeps eviction fine-grained, 16 MiB is foyer's default
            // and a generous cap for one row group.
            let block_size = (opts.disk_bytes / 16).clamp(MIB, 16 * MIB);
            let cache = storage
                .with_engine_config(BlockEngineConfig::new(device).with_block_size(block_size))
                .build()
                .await?;
            (cache, Some(Arc::new(lock)))
        };

        Ok(Cache {
            inner,
            counters: Arc::default(),
            _dir_lock: dir_lock,
        })
    }

    /// Insert or replace `key`. Never blocks on I/O: spilling to disk
    /// happens in the background.
    pub fn insert(&self, key: &str, value: Bytes) {
        self.inner.insert(key.to_owned(), value);
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
    }

    /// Insert `key` into the memory tier only: once evicted it is gone
    /// rather than written to disk (for values another copy of which is
    /// cheap to read again).
    pub fn insert_in_memory(&self, key: &str, value: Bytes) {
        self.inner.insert_with_properties(
            key.to_owned(),
            value,
            HybridCacheProperties::default().with_location(Location::InMem),
        );
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
    }

    /// Is `key` in either tier (without reading it)? May say yes for a key
    /// just evicted or sharing a hash with another.
    pub fn contains(&self, key: &str) -> bool {
        self.inner.contains(key)
    }

    /// Look `key` up in memory, then on disk. A disk-tier error counts as a
    /// miss: the caller can always refetch from object storage.
    pub async fn get(&self, key: &str) -> Option<Bytes> {
        let found = match self.inner.get(key).await {
            Ok(entry) => entry.map(|e| e.value().clone()),
            Err(error) => {
                tracing::warn!(key, %error, "cache disk tier read failed; treating as a miss");
                None
            }
        };
        let counter = if found.is_some() {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Counters since open.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            inserts: self.counters.inserts.load(Ordering::Relaxed),
        }
    }

    /// Flush the memory tier to disk and stop background work. Errors are
    /// logged: a cache that fails to close loses nothing that matters.
    pub async fn close(&self) {
        if let Err(error) = self.inner.close().await {
            tracing::warn!(%error, "cache close failed");
        }
    }
}

/// Take an exclusive advisory lock on `<dir>/lock`; released when the file
/// is closed (last `Cache` clone dropped, or the process exits).
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::CacheDirLocked {
            path: dir.to_path_buf(),
        }),
        Err(TryLockError::Error(source)) => Err(Error::Io { path, source }),
    }
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
