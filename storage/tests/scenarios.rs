//! Backend scenarios, written once and run against every backend:
//! `memory://`, `file://<tempdir>`, and `s3://` on the bucket that
//! `SHOAL_TEST_S3_URL` names (the `s3` ones are `#[ignore]`d so a plain
//! `cargo test` shows them as not run; tests/run.sh runs them against an
//! S3 emulator with `--include-ignored`).

#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use shoal_storage::{
    Error, Header, ObjectStorage, Record, SegmentOptions, ShardRows, decode_footer, encode_segment,
    fetch_footer, read_row_group, segment_key,
};

// ---------------------------------------------------------------- scenarios

async fn put_create_then_get(store: &ObjectStorage) {
    let data = Bytes::from_static(b"hello shoal");
    store.put_create("a/b/c.bin", data.clone()).await.unwrap();
    assert_eq!(store.get("a/b/c.bin").await.unwrap(), data);
    // Empty objects are objects too.
    store.put_create("empty", Bytes::new()).await.unwrap();
    assert_eq!(store.get("empty").await.unwrap(), Bytes::new());
}

async fn put_create_twice_is_rejected(store: &ObjectStorage) {
    store
        .put_create("once", Bytes::from_static(b"first"))
        .await
        .unwrap();
    let err = store
        .put_create("once", Bytes::from_static(b"second"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::AlreadyExists { ref key } if key == "once"),
        "{err}"
    );
    assert_eq!(
        store.get("once").await.unwrap(),
        Bytes::from_static(b"first")
    );
}

async fn multipart_upload_is_write_once(store: &ObjectStorage) {
    // 11 MiB in 5 MiB parts (S3's smallest): three parts.
    let store = store.clone().with_multipart(6 << 20, 5 << 20);
    let first: Bytes = (0..11u32 << 20).map(|i| (i % 251) as u8).collect();
    let before = store.stats().puts;
    store.put_create("big/object", first.clone()).await.unwrap();
    assert_eq!(store.stats().puts - before, 3 + 5);
    assert_eq!(store.get("big/object").await.unwrap(), first);
    let second = Bytes::from(vec![7u8; 7 << 20]);
    let err = store.put_create("big/object", second).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert_eq!(store.get("big/object").await.unwrap(), first);
    // Small objects still go up in one PUT; no staging object is left.
    store
        .put_create("small", Bytes::from_static(b"x"))
        .await
        .unwrap();
    let keys: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["big/object", "small"]);
    let put = &store.latencies()[0];
    assert_eq!(put.0.as_str(), "put");
    assert!(put.1.count >= 3);
}

async fn get_missing_is_not_found(store: &ObjectStorage) {
    let err = store.get("nope/missing").await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound { ref key } if key == "nope/missing"),
        "{err}"
    );
    assert!(matches!(
        store.head("nope/missing").await,
        Err(Error::NotFound { .. })
    ));
    // Expected answers are not counted as failures.
    assert_eq!(store.stats().errors, 0);
}

async fn get_range(store: &ObjectStorage) {
    let data: Bytes = (0..=255u8).collect::<Vec<_>>().into();
    store.put_create("range", data.clone()).await.unwrap();
    assert_eq!(
        store.get_range("range", 0..1).await.unwrap(),
        data.slice(0..1)
    );
    assert_eq!(
        store.get_range("range", 100..200).await.unwrap(),
        data.slice(100..200)
    );
    assert_eq!(
        store.get_range("range", 250..256).await.unwrap(),
        data.slice(250..)
    );
    assert!(store.get_range("range", 5..5).await.unwrap().is_empty());
    // Past the end is an error, not a silently shorter answer.
    let err = store.get_range("range", 200..300).await.unwrap_err();
    assert!(matches!(err, Error::ShortRead { got: 56, .. }), "{err}");
    assert!(matches!(
        store.get_range("absent", 0..10).await,
        Err(Error::NotFound { .. })
    ));
}

async fn head(store: &ObjectStorage) {
    store
        .put_create("sized", Bytes::from(vec![7u8; 1234]))
        .await
        .unwrap();
    assert_eq!(store.head("sized").await.unwrap(), 1234);
}

async fn list_with_prefix(store: &ObjectStorage) {
    for (key, len) in [
        ("segments/2024/01/a.parquet", 1),
        ("segments/2024/02/b.parquet", 2),
        ("segments/2025/01/c.parquet", 3),
        ("segments/2024x/d.parquet", 4),
        ("streams/s/shard=0/e.parquet", 5),
    ] {
        store
            .put_create(key, Bytes::from(vec![0u8; len]))
            .await
            .unwrap();
    }
    assert_eq!(
        store.list("segments/2024").await.unwrap(),
        vec![
            ("segments/2024/01/a.parquet".to_owned(), 1),
            ("segments/2024/02/b.parquet".to_owned(), 2),
        ]
    );
    // A trailing slash means the same prefix.
    assert_eq!(store.list("segments/2024/").await.unwrap().len(), 2);
    assert_eq!(store.list("segments").await.unwrap().len(), 4);
    assert_eq!(
        store.list("streams/s/shard=0").await.unwrap(),
        vec![("streams/s/shard=0/e.parquet".to_owned(), 5)]
    );
    assert_eq!(store.list("").await.unwrap().len(), 5);
    assert!(store.list("nothing/here").await.unwrap().is_empty());
    // Listed keys are the keys that were written: they round-trip.
    for (key, len) in store.list("").await.unwrap() {
        assert_eq!(store.head(&key).await.unwrap(), len);
    }
}

async fn delete(store: &ObjectStorage) {
    store
        .put_create("dir/doomed", Bytes::from_static(b"x"))
        .await
        .unwrap();
    store
        .put_create("dir/kept", Bytes::from_static(b"y"))
        .await
        .unwrap();
    store.delete("dir/doomed").await.unwrap();
    assert!(matches!(
        store.get("dir/doomed").await,
        Err(Error::NotFound { .. })
    ));
    // Idempotent, so garbage collection can retry.
    store.delete("dir/doomed").await.unwrap();
    assert_eq!(
        store.list("dir").await.unwrap(),
        vec![("dir/kept".to_owned(), 1)]
    );
    // A deleted key can be created again.
    store
        .put_create("dir/doomed", Bytes::from_static(b"z"))
        .await
        .unwrap();
}

async fn counts_requests(store: &ObjectStorage) {
    let before = store.stats();
    store
        .put_create("counted", Bytes::from_static(b"12345"))
        .await
        .unwrap();
    store.get("counted").await.unwrap();
    store.get_range("counted", 1..3).await.unwrap();
    store.head("counted").await.unwrap();
    store.list("").await.unwrap();
    store.delete("counted").await.unwrap();
    let after = store.stats();
    assert_eq!(after.puts - before.puts, 1);
    assert_eq!(after.gets - before.gets, 2);
    assert_eq!(after.heads - before.heads, 1);
    assert_eq!(after.lists - before.lists, 1);
    assert_eq!(after.deletes - before.deletes, 1);
    assert_eq!(after.bytes_written - before.bytes_written, 5);
    assert_eq!(after.bytes_read - before.bytes_read, 7);
    assert_eq!(after.errors, before.errors);
    // Clones share counters.
    store.clone().head("empty-or-not").await.ok();
    assert_eq!(store.stats().heads - after.heads, 1);
}

/// Incompressible bytes, so the segment is much larger than its footer.
fn noise(seed: i64, len: usize) -> Bytes {
    let mut x = seed as u64 ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<_>>()
        .into()
}

fn records(first: i64, n: i64) -> Vec<Record> {
    (first..first + n)
        .map(|o| Record {
            offset: o,
            timestamp_ms: 1_735_689_600_000 + o,
            key: (o % 3 != 0).then(|| Bytes::from(format!("key-{o}"))),
            value: Some(noise(o, 200)),
            headers: if o % 2 == 0 {
                vec![Header {
                    key: "trace".into(),
                    value: (o % 4 == 0).then(|| Bytes::from_static(b"id")),
                }]
            } else {
                vec![]
            },
            producer_id: Some(42),
            producer_epoch: Some(0),
            sequence: i32::try_from(o).ok(),
        })
        .collect()
}

async fn segment_read_one_shard(store: &ObjectStorage) {
    let shards = vec![
        ShardRows {
            stream: "orders".into(),
            shard: 0,
            records: records(0, 1500),
        },
        ShardRows {
            stream: "orders".into(),
            shard: 1,
            records: records(1000, 300),
        },
        ShardRows {
            stream: "sensors".into(),
            shard: 0,
            records: records(7, 1500),
        },
    ];
    let seg = encode_segment(shards, &SegmentOptions::default()).unwrap();
    let key = segment_key(1, 9, 1_735_689_600_000);
    store.put_create(&key, seg.bytes.clone()).await.unwrap();

    let before = store.stats();
    let (footer, size) = fetch_footer(store, &key).await.unwrap();
    assert_eq!(size, seg.bytes.len() as u64);
    let meta = decode_footer(&footer).unwrap();
    let range = seg
        .ranges
        .iter()
        .find(|r| r.stream == "orders" && r.shard == 1)
        .unwrap();
    let rows = read_row_group(store, &key, meta.clone(), range.row_group as usize)
        .await
        .unwrap();
    assert_eq!(rows, records(1000, 300));
    assert_eq!(rows.len() as u64, range.record_count);

    // One suffix read for the footer (at most 64 KiB), one range read for
    // the row group: together well under the object.
    let after = store.stats();
    assert_eq!(after.gets - before.gets, 2);
    let read = after.bytes_read - before.bytes_read;
    let rg = meta.row_group(range.row_group as usize);
    let rg_bytes = u64::try_from(rg.compressed_size()).unwrap();
    assert!(
        read <= 64 * 1024 + rg_bytes,
        "read {read} bytes of a {size}-byte object"
    );
    assert!(read < size / 2, "read {read} bytes of a {size}-byte object");

    // An object smaller than the footer prefetch is read in one request.
    let small = encode_segment(
        vec![ShardRows {
            stream: "tiny".into(),
            shard: 0,
            records: records(0, 1),
        }],
        &SegmentOptions::default(),
    )
    .unwrap();
    store
        .put_create("small.parquet", small.bytes)
        .await
        .unwrap();
    let (footer, _) = fetch_footer(store, "small.parquet").await.unwrap();
    let meta = decode_footer(&footer).unwrap();
    let rows = read_row_group(store, "small.parquet", meta, 0)
        .await
        .unwrap();
    assert_eq!(rows, records(0, 1));
}

// ----------------------------------------------------------------- backends

macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let store = shoal_storage::ObjectStorage::from_url("memory://").unwrap();
                    super::$scenario(&store).await;
                }
            )*
        }

        mod file {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let dir = tempfile::tempdir().unwrap();
                    let root = dir.path().join("store");
                    let url = format!("file://{}", root.display());
                    let store = shoal_storage::ObjectStorage::from_url(&url).unwrap();
                    assert!(root.is_dir());
                    super::$scenario(&store).await;
                }
            )*
        }

        // Shown as "ignored" in a plain `cargo test`; tests/run.sh starts
        // an S3 emulator and runs them with `--include-ignored`.
        mod s3 {
            $(
                #[tokio::test]
                #[ignore = "needs SHOAL_TEST_S3_URL (tests/run.sh runs it on an S3 emulator)"]
                async fn $scenario() {
                    let store = super::s3_store(stringify!($scenario));
                    super::$scenario(&store).await;
                }
            )*
        }
    };
}

on_every_backend!(
    put_create_then_get,
    put_create_twice_is_rejected,
    multipart_upload_is_write_once,
    get_missing_is_not_found,
    get_range,
    head,
    list_with_prefix,
    delete,
    counts_requests,
    segment_read_one_shard,
);

/// The store of one S3 scenario. Each scenario gets its own prefix under a
/// per-process run id, so runs never collide in a reused bucket. Run
/// without a bucket, the scenario fails: being asked to run it and not
/// having the emulator is an error, never a silent pass.
fn s3_store(scenario: &str) -> ObjectStorage {
    let base = std::env::var("SHOAL_TEST_S3_URL").unwrap_or_else(|_| {
        panic!(
            "s3::{scenario}: SHOAL_TEST_S3_URL is not set; run the S3 scenarios \
             through tests/run.sh, which starts an S3 emulator"
        )
    });
    static RUN: OnceLock<String> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("test-{nanos}-{}", std::process::id())
    });
    let url = format!("{}/{run}/{scenario}", base.trim_end_matches('/'));
    ObjectStorage::from_url(&url).unwrap()
}

#[test]
fn bad_urls_are_rejected() {
    for url in [
        "",
        "not a url",
        "ftp://host/dir",
        "gs://bucket",
        "file://relative/dir",
        "s3:///no-bucket",
    ] {
        let err = ObjectStorage::from_url(url).unwrap_err();
        assert!(
            matches!(err, Error::InvalidUrl { url: ref u, .. } if u == url),
            "{url}: {err}"
        );
    }
    let store = ObjectStorage::from_url("memory://").unwrap();
    assert_eq!(store.url(), "memory://");
}

#[tokio::test]
async fn invalid_keys_are_rejected() {
    let store = ObjectStorage::from_url("memory://").unwrap();
    for key in ["", "a//b", "../up", "a/./b"] {
        assert!(
            matches!(
                store.put_create(key, Bytes::new()).await,
                Err(Error::InvalidKey { .. })
            ),
            "{key:?}"
        );
    }
}

#[tokio::test]
async fn memory_prefix_scopes_keys() {
    let store = ObjectStorage::from_url("memory://tenant/a").unwrap();
    store
        .put_create("k", Bytes::from_static(b"v"))
        .await
        .unwrap();
    assert_eq!(store.list("").await.unwrap(), vec![("k".to_owned(), 1)]);
}
