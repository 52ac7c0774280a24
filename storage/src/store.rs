//! Object-store backends selected by URL, with request counters.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::TryStreamExt;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut, S3CopyIfNotExists};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientConfigKey, RetryConfig};
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions};
use object_store::{MultipartUpload, WriteMultipart};

use crate::error::{Error, Result};
use crate::latency::{Latencies, LatencySnapshot, RequestKind};

/// How long one operation keeps retrying transient failures.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// A handle on one bucket (or directory) under an optional key prefix.
///
/// Cheap to clone; clones share the backend and the request counters.
/// Keys given to and returned by its methods are relative to the prefix.
#[derive(Clone)]
pub struct ObjectStorage {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The directory of a `file://` store: what a write made is fsynced
    /// there (object_store's local backend leaves it in the page cache).
    local_root: Option<Arc<std::path::Path>>,
    url: Arc<str>,
    counters: Arc<Counters>,
    latencies: Arc<Latencies>,
    multipart: Multipart,
}

/// When a create-only PUT becomes a multipart upload, and in what parts.
#[derive(Debug, Clone, Copy)]
struct Multipart {
    threshold: usize,
    part_size: usize,
}

/// Objects from this size go up as multipart uploads. Above the flusher's
/// largest object (4 × an 8 MiB flush) so that ingest costs one PUT per
/// object; the compactor's large files use it.
pub const DEFAULT_MULTIPART_THRESHOLD: usize = 64 << 20;
/// S3 needs parts of at least 5 MiB (but the last).
pub const DEFAULT_PART_SIZE: usize = 16 << 20;
/// Parts of one upload in flight at once.
const PART_CONCURRENCY: usize = 4;
/// Where multipart uploads are assembled before the create-only copy to
/// their key. A crash can leave objects here; nothing ever references them
/// (a lifecycle rule on this prefix may expire them).
pub const STAGING_PREFIX: &str = "staging";

/// One object found by [`ObjectStorage::list_objects`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    /// Last modification as the store reports it, unix ms.
    pub modified_ms: i64,
}

/// Request counters since the store was opened (shared by all clones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// PUT requests (`put_create`).
    pub puts: u64,
    /// GET requests, whole or ranged (`get`, `get_range`, footer reads).
    pub gets: u64,
    pub heads: u64,
    pub deletes: u64,
    /// LIST calls (one per `list`, however many pages the backend needed).
    pub lists: u64,
    /// Failed requests. `NotFound` and `AlreadyExists` are answers, not
    /// failures, so they are not counted here.
    pub errors: u64,
    /// Payload bytes received by successful GETs.
    pub bytes_read: u64,
    /// Payload bytes sent by successful PUTs.
    pub bytes_written: u64,
    /// Attempts repeated after a transient failure.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    puts: AtomicU64,
    gets: AtomicU64,
    heads: AtomicU64,
    deletes: AtomicU64,
    lists: AtomicU64,
    errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    retries: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    // Counters are independent statistics; no ordering with other memory is needed.
    counter.fetch_add(n, Ordering::Relaxed);
}

impl fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStorage")
            .field("url", &self.url)
            .field("prefix", &self.prefix.as_ref())
            .finish_non_exhaustive()
    }
}

impl ObjectStorage {
    /// Open a store from a URL:
    ///
    /// - `memory://` — a fresh in-process store (clones share it, a second
    ///   `from_url` does not); anything after `//` becomes the key prefix.
    /// - `file:///abs/dir` — a directory, created if missing.
    /// - `s3://bucket/optional/prefix` — configured from the `AWS_*`
    ///   environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    ///   `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
    ///   `AWS_ALLOW_HTTP`, ...), with conditional PUT enabled so that
    ///   create-only writes are atomic.
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let mut local_root = None;
        let (inner, prefix): (Arc<dyn ObjectStore>, Path) = match parsed.scheme() {
            "memory" => {
                let raw = format!("{}{}", parsed.host_str().unwrap_or(""), parsed.path());
                let prefix = Path::parse(&raw).map_err(|e| invalid(e.to_string()))?;
                (Arc::new(InMemory::new()), prefix)
            }
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| invalid("expected file:///absolute/path".to_owned()))?;
                std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
                    path: dir.display().to_string(),
                    source,
                })?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| invalid(e.to_string()))?
                    // Deleting the last object of a directory removes the
                    // directory, like a prefix disappearing in a bucket.
                    .with_automatic_cleanup(true);
                local_root = Some(Arc::from(dir.as_path()));
                (Arc::new(fs), Path::default())
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| invalid("missing bucket name".to_owned()))?;
                let prefix = Path::parse(parsed.path()).map_err(|e| invalid(e.to_string()))?;
                // Every request has a deadline, and 5xx / 503 SlowDown / 429 /
                // connection errors are retried with jittered exponential
                // backoff (object_store's RetryConfig) before an error
                // reaches the caller. A timeout set in the environment
                // (AWS_TIMEOUT, ...) is read by from_env and wins below.
                let mut builder = AmazonS3Builder::from_env().with_retry(RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(50),
                        max_backoff: Duration::from_secs(5),
                        base: 2.0,
                    },
                    max_retries: 10,
                    retry_timeout: Duration::from_secs(60),
                });
                if std::env::var_os("AWS_TIMEOUT").is_none() {
                    builder = builder
                        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "30s");
                }
                if std::env::var_os("AWS_CONNECT_TIMEOUT").is_none() {
                    builder = builder.with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                        "5s",
                    );
                }
                let s3 = builder
                    .with_bucket_name(bucket)
                    // If-None-Match / If-Match on PUT: needed for PutMode::Create.
                    .with_conditional_put(S3ConditionalPut::ETagMatch)
                    // Create-only copy as a multipart copy whose completion
                    // carries If-None-Match: how multipart uploads stay
                    // write-once (see put_create_multipart_once).
                    .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                (Arc::new(s3), prefix)
            }
            other => return Err(invalid(format!("unsupported scheme {other:?}"))),
        };
        Ok(Self {
            inner,
            prefix,
            local_root,
            url: Arc::from(url),
            counters: Arc::default(),
            latencies: Arc::default(),
            multipart: Multipart {
                threshold: DEFAULT_MULTIPART_THRESHOLD,
                part_size: DEFAULT_PART_SIZE,
            },
        })
    }

    /// Upload create-only writes of `threshold` bytes or more as multipart
    /// uploads in parts of `part_size` (at least 5 MiB on S3).
    pub fn with_multipart(mut self, threshold: usize, part_size: usize) -> Self {
        self.multipart = Multipart {
            threshold: threshold.max(1),
            part_size: part_size.max(1),
        };
        self
    }

    // Public operations: each attempt goes through `retry`, so a transient
    // failure (connection reset, a 5xx that object_store's own retries gave
    // up on, or a conditional PUT it would not retry) is tried again with
    // jittered backoff. Callers of the conditional writes handle the
    // "my own earlier attempt landed" case (AlreadyExists / Changed).

    /// Create-only PUT (`If-None-Match: *`). [`Error::AlreadyExists`] if the
    /// key exists, which after a retry may be this call's own first attempt.
    ///
    /// From the multipart threshold on, the object goes up in parts.
    pub async fn put_create(&self, key: &str, bytes: Bytes) -> Result<()> {
        if bytes.len() >= self.multipart.threshold {
            self.retry(RequestKind::Put, || {
                self.put_create_multipart_once(key, bytes.clone())
            })
            .await?;
            return self.sync_local(key).await;
        }
        // On a file:// store this write is durable already (see local.rs).
        self.retry(RequestKind::Put, || {
            self.put_create_once(key, bytes.clone())
        })
        .await
    }

    /// On a `file://` store, make an object written through object_store
    /// durable (its local backend syncs nothing): fsync the file and every
    /// directory up to the store's root.
    async fn sync_local(&self, key: &str) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        // A file:// store has no key prefix: the key is the relative path.
        let path = root.join(self.path(key)?.as_ref());
        let synced =
            tokio::task::spawn_blocking(move || crate::local::sync_file_and_dirs(&root, &path))
                .await;
        match synced {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(Error::Io {
                path: key.to_owned(),
                source,
            }),
            Err(e) => Err(Error::Io {
                path: key.to_owned(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// Read a whole object with its version tag (ETag), for a later
    /// [`put_replace`](Self::put_replace).
    pub async fn get_versioned(&self, key: &str) -> Result<(Bytes, Option<String>)> {
        self.retry(RequestKind::Get, || self.get_versioned_once(key))
            .await
    }

    /// Replace an object only if it still has version `etag` (If-Match).
    /// Returns the new version. [`Error::Changed`] if another writer got
    /// there first (or a retried attempt of this call did).
    pub async fn put_replace(&self, key: &str, bytes: Bytes, etag: &str) -> Result<Option<String>> {
        let version = self
            .retry(RequestKind::Put, || {
                self.put_replace_once(key, bytes.clone(), etag)
            })
            .await?;
        self.sync_local(key).await?;
        Ok(version)
    }

    /// Read a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        self.retry(RequestKind::Get, || self.get_once(key)).await
    }

    /// Read `range` of an object ([`Error::ShortRead`] past its end).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.retry(RequestKind::Get, || self.get_range_once(key, range.clone()))
            .await
    }

    /// Size of an object.
    pub async fn head(&self, key: &str) -> Result<u64> {
        self.retry(RequestKind::Head, || self.head_once(key)).await
    }

    /// Delete an object; deleting a missing one succeeds.
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.retry(RequestKind::Delete, || self.delete_once(key))
            .await
    }

    /// Keys under `prefix` (whole path segments), with sizes, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let listed = self
            .retry(RequestKind::List, || self.list_once(prefix))
            .await?;
        Ok(listed.into_iter().map(|o| (o.key, o.size)).collect())
    }

    /// Objects under `prefix` with size and last-modified time, sorted by key.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<ListedObject>> {
        self.retry(RequestKind::List, || self.list_once(prefix))
            .await
    }

    /// Run `attempt` until it succeeds, fails for good, or transient
    /// failures have gone on for [`RETRY_FOR`]; every attempt's latency is
    /// recorded under `kind`.
    async fn retry<T, F, Fut>(&self, kind: RequestKind, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = tokio::time::Instant::now();
            let result = attempt().await;
            self.latencies.of(kind).record(started.elapsed());
            match result {
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    bump(&self.counters.retries, 1);
                    // Full jitter: spread retries of many callers apart.
                    let wait = backoff
                        .mul_f64(rand::random::<f64>())
                        .max(Duration::from_millis(5));
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    /// Are objects on this machine (a `file://` directory or `memory://`)?
    /// Reading one again then costs no request to a remote service.
    pub fn is_local(&self) -> bool {
        self.local_root.is_some() || self.url.starts_with("memory:")
    }

    /// The URL this store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Latency of every attempt by request kind, failed ones included.
    pub fn latencies(&self) -> Vec<(RequestKind, LatencySnapshot)> {
        RequestKind::ALL
            .iter()
            .map(|k| (*k, self.latencies.of(*k).snapshot()))
            .collect()
    }

    /// A snapshot of the request counters.
    pub fn stats(&self) -> StoreStats {
        let c = &*self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            puts: load(&c.puts),
            gets: load(&c.gets),
            heads: load(&c.heads),
            deletes: load(&c.deletes),
            lists: load(&c.lists),
            errors: load(&c.errors),
            bytes_read: load(&c.bytes_read),
            bytes_written: load(&c.bytes_written),
            retries: load(&c.retries),
        }
    }

    /// Write an object only if no object exists at `key`.
    /// Objects are immutable, so this is the only kind of write offered.
    async fn put_create_once(&self, key: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(key)?;
        bump(&self.counters.puts, 1);
        let len = bytes.len() as u64;
        if let Some(root) = self.local_root.clone() {
            let rel = path.to_string();
            let written =
                tokio::task::spawn_blocking(move || crate::local::create(&root, &rel, &bytes))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()));
            return match written.and_then(|r| r) {
                Ok(crate::local::Created::Done) => {
                    bump(&self.counters.bytes_written, len);
                    Ok(())
                }
                Ok(crate::local::Created::AlreadyExists) => Err(Error::AlreadyExists {
                    key: key.to_owned(),
                }),
                Err(source) => {
                    bump(&self.counters.errors, 1);
                    Err(Error::Io {
                        path: key.to_owned(),
                        source,
                    })
                }
            };
        }
        let res = self
            .inner
            .put_opts(&path, bytes.into(), PutOptions::from(PutMode::Create))
            .await;
        match res {
            Ok(_) => {
                bump(&self.counters.bytes_written, len);
                Ok(())
            }
            Err(e) => Err(self.create_failed(key, e)),
        }
    }

    /// A create-only write that failed: S3 reports a lost create race as
    /// a failed precondition, the other stores as AlreadyExists.
    fn create_failed(&self, key: &str, err: object_store::Error) -> Error {
        match err {
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => Error::AlreadyExists {
                key: key.to_owned(),
            },
            e => self.fail("put", key, e),
        }
    }

    /// Create-only multipart upload. object_store's multipart completion
    /// cannot carry If-None-Match, so the parts are assembled under a unique
    /// staging key and then copied to `key` with a create-only copy (on S3 a
    /// multipart copy completed with If-None-Match: server-side, no second
    /// transfer of the bytes). The staging object is deleted either way.
    async fn put_create_multipart_once(&self, key: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(key)?;
        let staging_key = format!("{STAGING_PREFIX}/{key}.{:016x}", rand::random::<u64>());
        let staging = self.path(&staging_key)?;
        let len = bytes.len();
        let parts = len.div_ceil(self.multipart.part_size) as u64;
        // Create, the parts and complete, then the copy: create, one part
        // copy and complete. All PUT-class requests in S3's price list.
        bump(&self.counters.puts, parts + 5);
        let uploaded = async {
            let upload: Box<dyn MultipartUpload> = self.inner.put_multipart(&staging).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, self.multipart.part_size);
            let mut rest = bytes;
            while !rest.is_empty() {
                writer.wait_for_capacity(PART_CONCURRENCY).await?;
                let part = rest.split_to(rest.len().min(self.multipart.part_size));
                writer.put(part);
            }
            writer.finish().await
        }
        .await;
        if let Err(e) = uploaded {
            // An incomplete upload was aborted by `finish`; a completed
            // staging object (a failure after completion) is removed below.
            let _ = self.delete_once(&staging_key).await;
            return Err(self.fail("put", key, e));
        }
        let copied = self.inner.copy_if_not_exists(&staging, &path).await;
        let _ = self.delete_once(&staging_key).await;
        match copied {
            Ok(()) => {
                bump(&self.counters.bytes_written, len as u64);
                Ok(())
            }
            Err(e) => Err(self.create_failed(key, e)),
        }
    }

    /// Read a whole object with its version tag (ETag), for a later
    /// [`put_replace`](Self::put_replace).
    async fn get_versioned_once(&self, key: &str) -> Result<(Bytes, Option<String>)> {
        let path = self.path(key)?;
        bump(&self.counters.gets, 1);
        let res = async {
            let r = self.inner.get(&path).await?;
            let etag = r.meta.e_tag.clone();
            Ok::<_, object_store::Error>((r.bytes().await?, etag))
        }
        .await;
        let (bytes, etag) = res.map_err(|e| self.fail("get", key, e))?;
        bump(&self.counters.bytes_read, bytes.len() as u64);
        Ok((bytes, etag))
    }

    /// Replace an object only if it still has version `etag` (If-Match).
    /// Returns the new version. [`Error::Changed`] if another writer got
    /// there first. Backends without conditional updates (`file://`) error.
    async fn put_replace_once(
        &self,
        key: &str,
        bytes: Bytes,
        etag: &str,
    ) -> Result<Option<String>> {
        let path = self.path(key)?;
        bump(&self.counters.puts, 1);
        let len = bytes.len() as u64;
        let mode = PutMode::Update(object_store::UpdateVersion {
            e_tag: Some(etag.to_owned()),
            version: None,
        });
        match self
            .inner
            .put_opts(&path, bytes.into(), PutOptions::from(mode))
            .await
        {
            Ok(r) => {
                bump(&self.counters.bytes_written, len);
                Ok(r.e_tag)
            }
            Err(object_store::Error::Precondition { .. }) => Err(Error::Changed {
                key: key.to_owned(),
            }),
            Err(e) => Err(self.fail("put", key, e)),
        }
    }

    /// Read a whole object.
    async fn get_once(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        bump(&self.counters.gets, 1);
        let res = async { self.inner.get(&path).await?.bytes().await }.await;
        let bytes = res.map_err(|e| self.fail("get", key, e))?;
        bump(&self.counters.bytes_read, bytes.len() as u64);
        Ok(bytes)
    }

    /// Read `range` of an object. Unlike HTTP, a range that runs past the
    /// end of the object is an error ([`Error::ShortRead`]) rather than a
    /// shorter answer: callers take ranges from metadata, so a short
    /// object is a corrupt one.
    async fn get_range_once(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path(key)?;
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        bump(&self.counters.gets, 1);
        let bytes = self
            .inner
            .get_range(&path, range.clone())
            .await
            .map_err(|e| self.fail("get_range", key, e))?;
        bump(&self.counters.bytes_read, bytes.len() as u64);
        if bytes.len() as u64 != range.end - range.start {
            bump(&self.counters.errors, 1);
            return Err(Error::ShortRead {
                key: key.to_owned(),
                start: range.start,
                end: range.end,
                got: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// Read the last `len` bytes of an object (all of it if it is shorter)
    /// in one request, returning them with the object's size.
    pub(crate) async fn get_suffix(&self, key: &str, len: u64) -> Result<(Bytes, u64)> {
        self.retry(RequestKind::Get, || self.get_suffix_once(key, len))
            .await
    }

    async fn get_suffix_once(&self, key: &str, len: u64) -> Result<(Bytes, u64)> {
        let path = self.path(key)?;
        bump(&self.counters.gets, 1);
        let res = async {
            let opts = GetOptions::new().with_range(Some(GetRange::Suffix(len)));
            let got = self.inner.get_opts(&path, opts).await?;
            let size = got.meta.size;
            Ok((got.bytes().await?, size))
        }
        .await;
        let (bytes, size) = res.map_err(|e| self.fail("get_range", key, e))?;
        bump(&self.counters.bytes_read, bytes.len() as u64);
        if bytes.len() as u64 != len.min(size) {
            bump(&self.counters.errors, 1);
            return Err(Error::ShortRead {
                key: key.to_owned(),
                start: size.saturating_sub(len),
                end: size,
                got: bytes.len() as u64,
            });
        }
        Ok((bytes, size))
    }

    /// Size of an object in bytes.
    async fn head_once(&self, key: &str) -> Result<u64> {
        let path = self.path(key)?;
        bump(&self.counters.heads, 1);
        let meta = self
            .inner
            .head(&path)
            .await
            .map_err(|e| self.fail("head", key, e))?;
        Ok(meta.size)
    }

    /// Delete an object. Deleting a missing object succeeds on every
    /// backend (S3 already behaves so), so garbage collection can retry.
    async fn delete_once(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        bump(&self.counters.deletes, 1);
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail("delete", key, e)),
        }
    }

    /// All objects under `prefix` (recursively), sorted by key, with sizes.
    ///
    /// The prefix matches whole path segments: `segments/2024` lists
    /// `segments/2024/...` but not `segments/2024x/...`. An empty prefix
    /// lists the whole store.
    async fn list_once(&self, prefix: &str) -> Result<Vec<ListedObject>> {
        let full = if prefix.is_empty() {
            self.prefix.clone()
        } else {
            self.path(prefix)?
        };
        bump(&self.counters.lists, 1);
        let metas: Vec<_> = self
            .inner
            .list(Some(&full))
            .try_collect()
            .await
            .map_err(|e| self.fail("list", prefix, e))?;
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            // Every listed path is under our prefix; skip anything else
            // rather than return a key that would not round-trip.
            if let Some(parts) = meta.location.prefix_match(&self.prefix) {
                let key = parts
                    .map(|p| p.as_ref().to_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push(ListedObject {
                    key,
                    size: meta.size,
                    modified_ms: meta.last_modified.timestamp_millis(),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Full backend path for a relative key. Keys are parsed strictly so a
    /// key read back from `list` is byte-for-byte the key that was written.
    fn path(&self, key: &str) -> Result<Path> {
        let invalid = |reason: String| Error::InvalidKey {
            key: key.to_owned(),
            reason,
        };
        let rel = Path::parse(key).map_err(|e| invalid(e.to_string()))?;
        if rel.parts().next().is_none() {
            return Err(invalid("empty key".to_owned()));
        }
        Ok(Path::from_iter(self.prefix.parts().chain(rel.parts())))
    }

    /// Map a backend error, counting it unless it is an expected answer.
    fn fail(&self, op: &'static str, key: &str, err: object_store::Error) -> Error {
        match err {
            object_store::Error::NotFound { .. } => Error::NotFound {
                key: key.to_owned(),
            },
            source => {
                bump(&self.counters.errors, 1);
                tracing::debug!(op, key, error = %source, "object store request failed");
                Error::Store {
                    op,
                    key: key.to_owned(),
                    source,
                }
            }
        }
    }
}
