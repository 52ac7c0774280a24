//! The flusher: everything un-flushed of every shard this broker owns goes
//! into ONE Parquet object and ONE placement commit, then the WAL is
//! truncated behind it.

use std::sync::Arc;
use std::time::Instant;

use shoal_placement::{Command, Reply, SegmentCommit, SegmentRef, ShardCommit};

use crate::broker::{Broker, now_ms};
use crate::error::{Error, Result};
use crate::shard::{ProducerDelta, ShardLog, TailBatch};

/// Run until the broker is dropped: flush on the interval when there is
/// data, or at once when `flush_bytes` have accumulated.
pub async fn run(broker: Arc<Broker>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    // Unique across restarts of the same broker id: start from the clock.
    let mut next_id = (now_ms().max(0) as u64) * 1000;
    // Ticks at a fixed cadence (not a sleep after each flush), so a record
    // waits at most one interval plus one flush for its object.
    let mut tick = tokio::time::interval(broker.config.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = broker.flush_now.notified() => {}
            _ = shutdown.changed() => {
                // One last flush so a clean stop leaves nothing in the WAL.
                let _ = flush_once(&broker, &mut next_id).await;
                return;
            }
        }
        match flush_once(&broker, &mut next_id).await {
            Ok(_) => *broker.flush_failing.lock() = None,
            Err(e) => {
                broker.metrics.flush_errors.inc();
                tracing::warn!("flush failed, will retry: {e}");
                broker
                    .flush_failing
                    .lock()
                    .get_or_insert_with(|| (Instant::now(), String::new()))
                    .1 = e.to_string();
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

struct Taken {
    shard: Arc<ShardLog>,
    epoch: u64,
    batches: Vec<TailBatch>,
}

/// One flush. Returns the number of records flushed.
pub async fn flush_once(broker: &Broker, next_id: &mut u64) -> Result<u64> {
    let started = Instant::now();
    // One object holds at most a few flush_bytes: after an outage the
    // backlog goes up in several objects instead of one huge encode.
    let budget = broker.config.flush_bytes.saturating_mul(4).max(1 << 20);
    let mut used = 0u64;
    let mut more = false;
    let mut taken = Vec::new();
    for stream in broker.streams() {
        for shard in stream.owned() {
            let Some(mut slice) = shard.flush_slice() else {
                continue;
            };
            if used >= budget {
                more = true;
                continue;
            }
            let mut keep = 0;
            for b in &slice.batches {
                if keep > 0 && used >= budget {
                    more = true;
                    break;
                }
                used += b.bytes.len() as u64;
                keep += 1;
            }
            slice.batches.truncate(keep);
            taken.push(Taken {
                shard: shard.clone(),
                epoch: slice.epoch,
                batches: slice.batches,
            });
        }
    }
    if taken.is_empty() {
        return Ok(0);
    }
    if more {
        broker.flush_now.notify_one();
    }
    let max_seq = taken
        .iter()
        .flat_map(|t| t.batches.iter().map(|b| b.wal_seq))
        .max()
        .unwrap_or(0);
    let inputs: Vec<crate::encoder::ShardInput> = taken
        .iter()
        .map(|t| {
            let batches = t.batches.iter().map(|b| b.bytes.clone()).collect();
            (t.shard.stream.clone(), t.shard.shard, batches)
        })
        .collect();
    let encoded = broker.encoder.encode(inputs).await?;
    let size = encoded.bytes.len() as u64;
    let key = loop {
        *next_id += 1;
        let key = shoal_storage::segment_key(broker.config.broker_id, *next_id, now_ms());
        match broker.store.put_create(&key, encoded.bytes.clone()).await {
            Ok(()) => break key,
            // Either a retry of this very PUT landed (same bytes: use it) or
            // the key is taken (try the next id).
            Err(shoal_storage::Error::AlreadyExists { .. }) => {
                if broker.store.get(&key).await.ok().as_ref() == Some(&encoded.bytes) {
                    break key;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut shard_commits = Vec::new();
    let mut after: Vec<(usize, ProducerDelta, SegmentRef)> = Vec::new();
    let now = now_ms();
    for range in &encoded.ranges {
        let Some(i) = taken
            .iter()
            .position(|t| t.shard.stream == range.stream && t.shard.shard == range.shard)
        else {
            continue;
        };
        let t = &taken[i];
        let delta = t.shard.producer_delta(&t.batches, now);
        shard_commits.push(ShardCommit {
            stream: range.stream.clone(),
            shard: range.shard,
            epoch: t.epoch,
            row_group: range.row_group,
            first_offset: range.first_offset,
            last_offset: range.last_offset,
            record_count: range.record_count,
            min_timestamp_ms: range.min_timestamp_ms,
            max_timestamp_ms: range.max_timestamp_ms,
            producers: delta.changed.clone(),
            expired_producers: delta.expired.clone(),
            bytes: range.bytes,
        });
        after.push((
            i,
            delta,
            SegmentRef {
                object: key.clone(),
                row_group: range.row_group,
                first_offset: range.first_offset,
                last_offset: range.last_offset,
                epoch: t.epoch,
                record_count: range.record_count,
                min_timestamp_ms: range.min_timestamp_ms,
                max_timestamp_ms: range.max_timestamp_ms,
                object_size: size,
                committed_ms: now,
                bytes: range.bytes,
            },
        ));
    }
    let commit = Command::CommitSegment(SegmentCommit {
        broker: broker.config.broker_id,
        object: key.clone(),
        object_size: size,
        shards: shard_commits,
        now_ms: now,
    });
    // The same commit again is recognised by placement, so an answer lost
    // on the way (a leader change, a timeout) is retried with this object
    // rather than with a new one that would look like a conflict.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let mut backoff = std::time::Duration::from_millis(100);
    let reply = loop {
        match broker.placement.write(commit.clone()).await {
            Ok(r) => break r,
            Err(e) if Instant::now() + backoff < deadline => {
                tracing::warn!(object = %key, "segment commit failed, retrying: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let rejected = match reply {
        Reply::SegmentCommitted { rejected } => rejected,
        other => return Err(Error::Internal(format!("unexpected reply {other:?}"))),
    };
    for r in &rejected {
        broker.metrics.commits_refused.inc();
        tracing::error!(stream = %r.stream, shard = r.shard, "segment commit refused: {}", r.rejection);
        // In a cluster a refused commit means placement moved on without
        // this copy of the shard (a new owner, or a commit it has not seen):
        // stop serving it; the assignment brings it back from the index.
        let Some(t) = taken
            .iter()
            .find(|t| t.shard.stream == r.stream && t.shard.shard == r.shard)
        else {
            continue;
        };
        if broker.cluster.is_some() {
            if t.shard.fence() {
                broker.metrics.shards_fenced.inc();
            }
        } else {
            // Standalone, nothing else can own the shard: placement and
            // this broker disagree about it. Stop it and keep its records
            // (the WAL holds them) until an operator looks.
            let reason = format!("segment commit refused: {}", r.rejection);
            t.shard.refuse_flushes(&reason);
            quarantine_refused(broker, &t.shard);
            if let Err(e) = broker.stop_shard(&r.stream, r.shard, &reason).await {
                tracing::warn!(stream = %r.stream, shard = r.shard, "recording the stop in placement: {e}");
            }
        }
    }
    let mut records = 0;
    for (i, delta, seg) in after {
        let t = &taken[i];
        if rejected
            .iter()
            .any(|r| r.stream == t.shard.stream && r.shard == t.shard.shard)
        {
            continue;
        }
        records += seg.record_count;
        broker.keep_flushed(&seg, &t.batches);
        t.shard.committed(seg, delta);
    }
    // Everything at or below max_seq is committed unless a shard still
    // holds an older un-flushed entry.
    let mut safe = max_seq;
    for stream in broker.streams() {
        for shard in stream.owned() {
            if let Some(seq) = shard.min_unflushed_seq() {
                safe = safe.min(seq.saturating_sub(1));
            }
        }
    }
    if safe > 0 {
        broker.wal.truncate_through(safe)?;
    }
    broker.metrics.flushes.inc();
    broker.metrics.flush_bytes.inc_by(size);
    broker
        .metrics
        .flush_duration
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(object = %key, bytes = size, records, "flushed segment");
    Ok(records)
}

/// Copy a flush-refused shard's un-committed WAL entries to the quarantine
/// directory so that the WAL may truncate past them. If that fails the
/// WAL keeps them (and keeps growing) until an operator resumes the shard.
fn quarantine_refused(broker: &Broker, shard: &ShardLog) {
    let entries = shard.uncommitted_wal_entries();
    if entries.is_empty() {
        return;
    }
    let dir = broker.config.data_dir.join("quarantine");
    match crate::quarantine::keep(&dir, &shard.stream, shard.shard, &entries) {
        Ok(path) => {
            shard.quarantined();
            tracing::warn!(
                stream = %shard.stream,
                shard = shard.shard,
                entries = entries.len(),
                file = %path.display(),
                "kept the flush-refused shard's write-ahead log entries"
            );
        }
        Err(e) => tracing::error!(
            stream = %shard.stream,
            shard = shard.shard,
            "keeping the flush-refused shard's entries in {}: {e}; the write-ahead log holds them",
            dir.display()
        ),
    }
}
