//! WAL behaviour: group commit, ordering, replay, truncation, torn tails.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use shoal_wal_cache::{Damage, Error, Wal, WalEntry, WalFaults, WalHealth, WalOptions};

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

/// The segment files of a WAL directory, newest (highest id) last.
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// Where in `file` the record with `payload` starts (its header is the
/// 32 bytes before the payload).
fn find(file: &[u8], payload: &[u8]) -> usize {
    file.windows(payload.len())
        .position(|w| w == payload)
        .expect("payload in the segment")
        - 32
}

/// The segment holding `payload`, its bytes and the record's position.
fn locate(dir: &Path, payload: &[u8]) -> (PathBuf, Vec<u8>, usize) {
    for path in segment_files(dir) {
        let bytes = std::fs::read(&path).unwrap();
        if bytes.windows(payload.len()).any(|w| w == payload) {
            let at = find(&bytes, payload);
            return (path, bytes, at);
        }
    }
    panic!("no segment holds the payload")
}

/// Ten entries, each in a group of its own, then damage to the file.
async fn write_then_damage(damage: impl FnOnce(&Path)) -> (tempfile::TempDir, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let seqs = {
        let wal = open(dir.path());
        append_each_durable(&wal, 0..10).await
    };
    damage(dir.path());
    (dir, seqs)
}

async fn assert_recovered_without_last(dir: &Path, seqs: &[u64]) {
    let wal = Wal::open(WalOptions::new(dir)).expect("open must survive a torn tail");
    assert!(wal.damage().is_empty(), "{:?}", wal.damage());
    let entries = wal.replay().unwrap();
    let kept = &seqs[..seqs.len() - 1];
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), kept);
    for (i, entry) in (0..).zip(&entries) {
        assert_eq!(entry.payload, payload(i));
    }
    // The dropped group never became durable; numbering goes on after the
    // readable log (and after the torn record, where its header still reads).
    let ticket = wal.append(payload(99)).unwrap();
    assert!(
        ticket.seq() >= seqs[seqs.len() - 1],
        "{} reused",
        ticket.seq()
    );
    ticket.durable().await.unwrap();
    drop(wal);
    let wal = open(dir);
    assert_eq!(wal.replay().unwrap().len(), seqs.len());
    assert!(wal.damage().is_empty());
}

#[tokio::test]
async fn torn_tail_cut_short_is_dropped() {
    let (dir, seqs) = write_then_damage(|dir| {
        // The last write never completed: its end is still zeros.
        let (path, mut bytes, at) = locate(dir, &payload(9));
        let end = at + 32 + payload(9).len();
        bytes[end - 4..end].fill(0);
        std::fs::write(path, bytes).unwrap();
    })
    .await;
    assert_recovered_without_last(dir.path(), &seqs).await;
}

#[tokio::test]
async fn torn_tail_with_a_bad_header_is_dropped() {
    let (dir, seqs) = write_then_damage(|dir| {
        let (path, mut bytes, at) = locate(dir, &payload(9));
        bytes[at + 9] ^= 0xff;
        std::fs::write(path, bytes).unwrap();
    })
    .await;
    assert_recovered_without_last(dir.path(), &seqs).await;
}

#[tokio::test]
async fn torn_tail_with_garbage_is_dropped() {
    let (dir, seqs) = write_then_damage(|dir| {
        let (path, mut bytes, at) = locate(dir, &payload(9));
        for (i, b) in bytes[at..at + 60].iter_mut().enumerate() {
            *b = 0xA5 ^ (i as u8);
        }
        std::fs::write(path, bytes).unwrap();
    })
    .await;
    assert_recovered_without_last(dir.path(), &seqs).await;
}

#[tokio::test]
async fn damage_to_a_durable_entry_is_reported_not_dropped_silently() {
    let (dir, seqs) = write_then_damage(|dir| {
        // Entry 4 was fsynced long before the last write: a bit flip there
        // is lost data, not a torn write.
        let (path, mut bytes, at) = locate(dir, &payload(4));
        bytes[at + 32 + 2] ^= 0x01;
        std::fs::write(path, bytes).unwrap();
    })
    .await;
    let wal = open(dir.path());
    let replayed: Vec<u64> = wal.replay().unwrap().iter().map(|e| e.seq).collect();
    let mut expected = seqs.clone();
    expected.remove(4);
    assert_eq!(replayed, expected);
    match wal.damage() {
        [Damage::Entry { seq, payload: p }] => {
            assert_eq!(*seq, seqs[4]);
            assert_eq!(p.len(), payload(4).len());
        }
        other => panic!("expected one damaged entry, got {other:?}"),
    }
}

#[tokio::test]
async fn a_damaged_header_in_the_middle_is_reported_as_unreadable() {
    let (dir, seqs) = write_then_damage(|dir| {
        let (path, mut bytes, at) = locate(dir, &payload(4));
        bytes[at + 9] ^= 0xff;
        std::fs::write(path, bytes).unwrap();
    })
    .await;
    let wal = open(dir.path());
    let replayed: Vec<u64> = wal.replay().unwrap().iter().map(|e| e.seq).collect();
    let mut expected = seqs.clone();
    expected.remove(4);
    assert_eq!(replayed, expected);
    assert_eq!(
        wal.damage(),
        &[Damage::Unreadable {
            after: seqs[3],
            before: Some(seqs[5])
        }]
    );
}

#[tokio::test]
async fn segments_rotate_and_are_recycled_after_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_bytes: 4096,
        spare_segments: 1,
        ..WalOptions::new(dir.path())
    };
    let big = |i: u64| Bytes::from(vec![(i % 251) as u8; 1000]);
    {
        let wal = Wal::open(opts.clone()).unwrap();
        for i in 0..40u64 {
            wal.append(big(i)).unwrap().durable().await.unwrap();
        }
        assert!(wal.stats().segments > 5, "{:?}", wal.stats());
        wal.truncate_through(35).unwrap();
        // One more write carries the truncation record and lets the old
        // segments go.
        wal.append(big(40)).unwrap().durable().await.unwrap();
        wait_until(|| wal.stats().segments <= 3).await;
        assert_eq!(wal.replay().unwrap().len(), 6);
    }
    // Fewer files than segments written: recycled or deleted, never kept.
    assert!(
        segment_files(dir.path()).len() <= 5,
        "{:?}",
        segment_files(dir.path())
    );
    let wal = Wal::open(opts).unwrap();
    let entries = wal.replay().unwrap();
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (36..=41).collect::<Vec<_>>()
    );
    assert_eq!(entries[0].payload, big(35));
    assert!(wal.damage().is_empty(), "{:?}", wal.damage());
}

async fn wait_until(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 5 s");
}

#[tokio::test]
async fn an_entry_larger_than_a_segment_gets_one_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_bytes: 4096,
        ..WalOptions::new(dir.path())
    };
    let huge = Bytes::from(vec![7u8; 10_000]);
    {
        let wal = Wal::open(opts.clone()).unwrap();
        wal.append(payload(0)).unwrap().durable().await.unwrap();
        wal.append(huge.clone()).unwrap().durable().await.unwrap();
        wal.append(payload(2)).unwrap().durable().await.unwrap();
    }
    let wal = Wal::open(opts).unwrap();
    let entries = wal.replay().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[1].payload, huge);
}

/// A full disk fails the group and everything queued behind it; the log
/// refuses appends until the caller resumes it, then continues where the
/// durable log ended, and a reopen never replays what failed.
async fn failed_write_recovers(fail_after_write: bool) {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(WalFaults::default());
    let opts = WalOptions {
        faults: Some(faults.clone()),
        ..WalOptions::new(dir.path())
    };
    let wal = Wal::open(opts.clone()).unwrap();
    let durable = append_each_durable(&wal, 0..3).await;
    let flag = if fail_after_write {
        &faults.fail_syncs
    } else {
        &faults.fail_writes
    };
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    // The writer may fail the first entry before the later appends reach
    // it; those are then refused outright. Either way none is acknowledged.
    let mut failed = vec![wal.append(payload(3)).unwrap()];
    for i in 4..6 {
        match wal.append(payload(i)) {
            Ok(t) => failed.push(t),
            Err(e) => assert!(matches!(e, Error::Unavailable { .. }), "{e:?}"),
        }
    }
    let first_failed = failed[0].seq();
    let handed_out = failed.len() as u64;
    for t in failed {
        assert!(matches!(t.durable().await, Err(Error::Commit(_))));
    }
    let WalHealth::Failed(f) = wal.health() else {
        panic!("not failed: {:?}", wal.health())
    };
    assert_eq!(f.first_failed_seq, first_failed);
    assert!(!f.resumed);
    assert!(matches!(
        wal.append(payload(9)),
        Err(Error::Unavailable { .. })
    ));
    // Resumed while the disk is still full: still refused.
    let errors = wal.stats().write_errors;
    wal.resume(f.generation);
    // The log tried to write again and failed.
    wait_until(|| wal.stats().write_errors > errors).await;
    assert!(matches!(wal.health(), WalHealth::Failed(ref g) if g.resumed));
    assert!(wal.append(payload(9)).is_err());
    flag.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_until(|| wal.health() == WalHealth::Ok).await;
    let again = append_each_durable(&wal, 6..8).await;
    assert_eq!(
        again[0],
        first_failed + handed_out,
        "failed seqs are never handed out again"
    );
    drop(wal);

    let wal = Wal::open(opts).unwrap();
    assert!(wal.damage().is_empty(), "{:?}", wal.damage());
    let entries = wal.replay().unwrap();
    let payloads: Vec<Bytes> = entries.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![payload(0), payload(1), payload(2), payload(6), payload(7)]
    );
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [durable, again].concat()
    );
}

#[tokio::test]
async fn a_segment_whose_header_is_damaged_is_reported_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = {
        let wal = open(dir.path());
        append_each_durable(&wal, 0..5).await
    };
    let (path, mut bytes, _) = locate(dir.path(), &payload(0));
    bytes[20] ^= 0xff; // inside the header, under its checksum
    std::fs::write(&path, &bytes).unwrap();

    let wal = open(dir.path());
    // Nothing after it would show its entries missing: the open says so.
    assert!(
        wal.damage()
            .iter()
            .any(|d| matches!(d, Damage::Unreadable { before: None, .. })),
        "{:?}",
        wal.damage()
    );
    assert!(wal.replay().unwrap().is_empty());
    // New seqs cannot be mistaken for anything the damaged file holds, and
    // the file is never reused.
    let ticket = wal.append(payload(9)).unwrap();
    assert!(ticket.seq() > seqs[seqs.len() - 1] + (1 << 31));
    ticket.durable().await.unwrap();
    drop(wal);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let wal = open(dir.path());
    assert_eq!(wal.replay().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_write_is_rolled_back_and_the_log_recovers() {
    failed_write_recovers(false).await;
}

#[tokio::test]
async fn a_failed_fsync_is_rolled_back_and_never_replayed() {
    failed_write_recovers(true).await;
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
