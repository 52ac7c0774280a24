//! WAL behaviour: group commit, ordering, replay, truncation, torn tails.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use shoal_wal_cache::{Wal, WalEntry, WalOptions};

fn open(dir: &Path) -> Wal {
    Wal::open(WalOptions::new(dir)).unwrap()
}

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("entry-{i}-{}", "x".repeat((i % 7) as usize)))
}

/// Append `n` entries one at a time, each awaited, so each is its own group
/// (and its own journal batch).
async fn append_each_durable(wal: &Wal, range: std::ops::Range<u64>) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in range {
        let ticket = wal.append(payload(i)).unwrap();
        seqs.push(ticket.seq());
        ticket.durable().await.unwrap();
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(open(dir.path()));

    let mut tasks = Vec::new();
    for task in 0..64u64 {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..32u64 {
                let ticket = wal.append(payload(task * 1000 + i)).unwrap();
                seqs.push(ticket.seq());
                ticket.durable().await.unwrap();
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=64 * 32).collect::<Vec<_>>());

    let stats = wal.stats();
    assert_eq!(stats.appends, 64 * 32);
    assert!(
        stats.fsyncs < stats.appends,
        "expected grouping, got {stats:?}"
    );
    assert!(stats.max_group_size > 1, "{stats:?}");
    assert!(stats.fsync_nanos_total > 0 && stats.last_fsync_nanos > 0);
    assert_eq!(wal.replay().unwrap().len(), 64 * 32);
}

#[tokio::test]
async fn burst_of_appends_shares_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    let tickets: Vec<_> = (0..500).map(|i| wal.append(payload(i)).unwrap()).collect();
    for ticket in tickets {
        ticket.durable().await.unwrap();
    }
    let stats = wal.stats();
    assert_eq!(stats.appends, 500);
    assert!(stats.fsyncs < 500, "{stats:?}");
    assert_eq!(
        stats.bytes,
        (0..500).map(|i| payload(i).len() as u64).sum::<u64>()
    );
}

#[tokio::test]
async fn max_group_bytes_splits_groups() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(WalOptions {
        max_group_bytes: 100,
        ..WalOptions::new(dir.path())
    })
    .unwrap();
    let tickets: Vec<_> = (0..20)
        .map(|_| wal.append(Bytes::from(vec![7u8; 60])).unwrap())
        .collect();
    for ticket in tickets {
        ticket.durable().await.unwrap();
    }
    // 60-byte entries under a 100-byte cap: one entry per group.
    assert_eq!(wal.stats().max_group_size, 1);
    assert_eq!(wal.stats().fsyncs, 20);
}

#[test]
fn seq_order_equals_call_order() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(open(dir.path()));
    // Stand-in for the broker's per-shard lock: the order seqs are handed
    // out under it must be strictly increasing.
    let shard_lock = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let wal = wal.clone();
            let shard_lock = shard_lock.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let mut order = shard_lock.lock().unwrap();
                    let ticket = wal.append(payload(t * 1000 + i)).unwrap();
                    order.push(ticket.seq());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let order = shard_lock.lock().unwrap().clone();
    assert_eq!(order, (1..=1600).collect::<Vec<_>>());
}

#[tokio::test]
async fn replay_after_reopen_returns_entries_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let expected: Vec<WalEntry> = {
        let wal = open(dir.path());
        assert!(wal.replay().unwrap().is_empty());
        let tickets: Vec<_> = (0..100).map(|i| wal.append(payload(i)).unwrap()).collect();
        let mut expected = Vec::new();
        for (i, ticket) in (0..).zip(tickets) {
            expected.push(WalEntry {
                seq: ticket.seq(),
                payload: payload(i),
            });
            ticket.durable().await.unwrap();
        }
        expected
    };
    let wal = open(dir.path());
    assert_eq!(wal.replay().unwrap(), expected);
    assert_eq!(
        wal.pending_bytes(),
        expected.iter().map(|e| e.payload.len() as u64).sum::<u64>()
    );
    // Numbering continues after the last entry.
    assert_eq!(wal.append(payload(0)).unwrap().seq(), 101);
}

#[tokio::test]
async fn truncate_then_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = open(dir.path());
        append_each_durable(&wal, 0..10).await;
        let before = wal.pending_bytes();
        wal.truncate_through(4).unwrap();
        let removed: u64 = (0..4).map(|i| payload(i).len() as u64).sum();
        assert_eq!(wal.pending_bytes(), before - removed);
        // Visible at once, before the committer wrote the tombstones.
        let seqs: Vec<u64> = wal.replay().unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (5..=10).collect::<Vec<_>>());
        // Truncating backwards is a no-op.
        wal.truncate_through(2).unwrap();
        assert_eq!(wal.replay().unwrap().len(), 6);
    }
    let wal = open(dir.path());
    let entries = wal.replay().unwrap();
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (5..=10).collect::<Vec<_>>());
    assert_eq!(entries[0].payload, payload(4));
    assert_eq!(
        wal.pending_bytes(),
        (4..10).map(|i| payload(i).len() as u64).sum::<u64>()
    );
}

#[tokio::test]
async fn seqs_keep_increasing_after_full_truncation() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = open(dir.path());
        append_each_durable(&wal, 0..5).await;
        wal.truncate_through(5).unwrap();
        assert_eq!(wal.pending_bytes(), 0);
    }
    {
        let wal = open(dir.path());
        assert!(wal.replay().unwrap().is_empty());
        let seqs = append_each_durable(&wal, 0..3).await;
        assert_eq!(seqs, vec![6, 7, 8]);
        // Truncating past the last assigned seq must not swallow later appends.
        wal.truncate_through(u64::MAX).unwrap();
        let ticket = wal.append(payload(9)).unwrap();
        assert_eq!(ticket.seq(), 9);
        ticket.durable().await.unwrap();
        assert_eq!(wal.replay().unwrap().len(), 1);
    }
    let wal = open(dir.path());
    let seqs: Vec<u64> = wal.replay().unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![9]);
    assert_eq!(wal.append(payload(0)).unwrap().seq(), 10);
}

#[tokio::test]
async fn truncating_queued_entries_still_resolves_them() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = open(dir.path());
        let tickets: Vec<_> = (0..50).map(|i| wal.append(payload(i)).unwrap()).collect();
        // Some of these are probably still queued: they must never be
        // written after their tombstones, and their tickets still resolve.
        wal.truncate_through(50).unwrap();
        for ticket in tickets {
            ticket.durable().await.unwrap();
        }
        assert!(wal.replay().unwrap().is_empty());
    }
    let wal = open(dir.path());
    assert!(wal.replay().unwrap().is_empty());
    assert_eq!(wal.append(payload(0)).unwrap().seq(), 51);
}

/// fjall keeps its journals as `<id>.jnl` in the database directory.
fn newest_journal(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
        .max_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
        })
        .expect("a journal file")
}

/// End of the written data: journals are pre-allocated with zeros, and
/// every batch ends with fjall's magic trailer.
fn data_end(journal: &[u8]) -> usize {
    const MAGIC: &[u8] = b"FJL\x03";
    journal
        .windows(MAGIC.len())
        .rposition(|w| w == MAGIC)
        .expect("a batch trailer")
        + MAGIC.len()
}

async fn write_then_damage(damage: impl FnOnce(&Path)) -> (tempfile::TempDir, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let seqs = {
        let wal = open(dir.path());
        append_each_durable(&wal, 0..10).await
    };
    damage(&newest_journal(dir.path()));
    (dir, seqs)
}

async fn assert_recovered_without_last(dir: &Path, seqs: &[u64]) {
    let wal = Wal::open(WalOptions::new(dir)).expect("open must survive a torn tail");
    let entries = wal.replay().unwrap();
    let kept = &seqs[..seqs.len() - 1];
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), kept);
    for (i, entry) in (0..).zip(&entries) {
        assert_eq!(entry.payload, payload(i));
    }
    // The dropped group never became durable, so its seq is handed out again.
    let ticket = wal.append(payload(99)).unwrap();
    assert_eq!(ticket.seq(), seqs[seqs.len() - 1]);
    ticket.durable().await.unwrap();
    drop(wal);
    let wal = open(dir);
    assert_eq!(wal.replay().unwrap().len(), seqs.len());
}

#[tokio::test]
async fn torn_tail_cut_short_is_dropped() {
    let (dir, seqs) = write_then_damage(|journal| {
        let bytes = std::fs::read(journal).unwrap();
        let end = data_end(&bytes);
        // Cut inside the last batch's end marker.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(journal)
            .unwrap();
        file.set_len((end - 6) as u64).unwrap();
    })
    .await;
    assert_recovered_without_last(dir.path(), &seqs).await;
}

#[tokio::test]
async fn torn_tail_with_bad_checksum_is_dropped() {
    let (dir, seqs) = write_then_damage(|journal| {
        let mut bytes = std::fs::read(journal).unwrap();
        let end = data_end(&bytes);
        // Flip a byte of the last item's value (the high-water mark, just
        // before the end marker: tag 1 + checksum 8 + magic 4). The batch
        // stays complete in length, so only its checksum can tell, and
        // fjall on its own refuses to open.
        bytes[end - 13 - 3] ^= 0xff;
        std::fs::write(journal, bytes).unwrap();
    })
    .await;
    assert_recovered_without_last(dir.path(), &seqs).await;
}

#[tokio::test]
async fn torn_tail_with_garbage_is_dropped() {
    let (dir, seqs) = write_then_damage(|journal| {
        let mut bytes = std::fs::read(journal).unwrap();
        let end = data_end(&bytes);
        // Overwrite the end marker and a little beyond with noise.
        for (i, b) in bytes[end - 10..end + 20].iter_mut().enumerate() {
            *b = 0xA5 ^ (i as u8);
        }
        std::fs::write(journal, bytes).unwrap();
    })
    .await;
    assert_recovered_without_last(dir.path(), &seqs).await;
}

#[test]
fn wal_and_tickets_are_send_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>(_: &T) {}
    assert_send_sync::<Wal>();
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path());
    let ticket = wal.append(Bytes::from_static(b"x")).unwrap();
    assert_send(&ticket.durable());
}

#[tokio::test]
async fn dropping_the_wal_commits_what_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let tickets: Vec<_> = {
        let wal = open(dir.path());
        (0..20).map(|i| wal.append(payload(i)).unwrap()).collect()
    };
    for ticket in tickets {
        ticket.durable().await.unwrap();
    }
    let wal = open(dir.path());
    assert_eq!(wal.replay().unwrap().len(), 20);
}

#[test]
fn a_directory_serves_one_wal_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let _wal = open(dir.path());
    assert!(Wal::open(WalOptions::new(dir.path())).is_err());
}
