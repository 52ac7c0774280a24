//! Hybrid cache behaviour: hits, misses, stats, spilling to disk.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use shoal_wal_cache::{Cache, CacheOptions, CacheStats};

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn insert_get_hit_miss_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(CacheOptions::new(dir.path())).await.unwrap();

    cache.insert("footer/a", Bytes::from_static(b"alpha"));
    cache.insert("footer/b", Bytes::from_static(b"beta"));
    assert_eq!(cache.get("footer/a").await.unwrap(), "alpha");
    assert_eq!(cache.get("footer/b").await.unwrap(), "beta");
    assert_eq!(cache.get("footer/c").await, None);

    // Replacing a key keeps the newest value.
    cache.insert("footer/a", Bytes::from_static(b"alpha2"));
    assert_eq!(cache.get("footer/a").await.unwrap(), "alpha2");

    assert_eq!(
        cache.stats(),
        CacheStats {
            hits: 3,
            misses: 1,
            inserts: 3
        }
    );
    // Clones share the same cache and counters.
    let clone = cache.clone();
    assert!(clone.get("footer/b").await.is_some());
    assert_eq!(cache.stats().hits, 4);
    cache.close().await;
}

#[tokio::test]
async fn memory_only_when_disk_is_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(CacheOptions {
        disk_bytes: 0,
        ..CacheOptions::new(dir.path())
    })
    .await
    .unwrap();
    cache.insert("k", Bytes::from_static(b"v"));
    assert_eq!(cache.get("k").await.unwrap(), "v");
    cache.close().await;
}

/// Poll until the disk tier has the entry: spilling happens in background
/// tasks, so the entry may be briefly in flight.
async fn eventually_get(cache: &Cache, key: &str) -> Option<Bytes> {
    for _ in 0..100 {
        if let Some(value) = cache.get(key).await {
            return Some(value);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_larger_than_memory_tier_spills_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(CacheOptions {
        dir: dir.path().to_path_buf(),
        memory_bytes: MIB,
        disk_bytes: 64 * MIB,
    })
    .await
    .unwrap();

    let big = Bytes::from((0..2 * MIB).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    cache.insert("rowgroup/big", big.clone());
    // Push it out of the memory tier with other entries.
    for i in 0..8 {
        cache.insert(
            &format!("filler/{i}"),
            Bytes::from(vec![i as u8; 256 * 1024]),
        );
    }
    assert_eq!(eventually_get(&cache, "rowgroup/big").await, Some(big));
    cache.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_entries_beyond_memory_stay_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(CacheOptions {
        dir: dir.path().to_path_buf(),
        memory_bytes: MIB,
        disk_bytes: 64 * MIB,
    })
    .await
    .unwrap();
    // 8 MiB through a 1 MiB memory tier.
    for i in 0..64u32 {
        cache.insert(
            &format!("batch/{i}"),
            Bytes::from(vec![i as u8; 128 * 1024]),
        );
    }
    for i in 0..64u32 {
        let value = eventually_get(&cache, &format!("batch/{i}"))
            .await
            .unwrap_or_else(|| panic!("batch/{i} lost"));
        assert_eq!(value.len(), 128 * 1024);
        assert!(value.iter().all(|b| *b == i as u8));
    }
    cache.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_tier_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CacheOptions {
        dir: dir.path().to_path_buf(),
        memory_bytes: MIB,
        disk_bytes: 16 * MIB,
    };
    {
        let cache = Cache::open(opts.clone()).await.unwrap();
        cache.insert("footer/x", Bytes::from_static(b"persisted"));
        // close flushes the memory tier to disk.
        cache.close().await;
    }
    let cache = Cache::open(opts).await.unwrap();
    assert_eq!(cache.get("footer/x").await.unwrap(), "persisted");
    assert_eq!(cache.stats().hits, 1);
    cache.close().await;
}

#[tokio::test]
async fn a_directory_serves_one_cache_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = Cache::open(CacheOptions::new(dir.path())).await.unwrap();
    let second = Cache::open(CacheOptions::new(dir.path())).await;
    assert!(matches!(
        second,
        Err(shoal_wal_cache::Error::CacheDirLocked { .. })
    ));
    first.close().await;
    drop(first);
    let again = Cache::open(CacheOptions::new(dir.path())).await.unwrap();
    again.close().await;
}
