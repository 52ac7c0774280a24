//! The one way protocols write to the log: append a record batch to a
//! shard (validated, offsets assigned, queued for the WAL in call order),
//! then wait for the stream's durability point. Kafka Produce and MQTT
//! publishes to persisted topics both come through here.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::batch;
use crate::broker::Broker;
use crate::config::Durability;
use crate::error::{Error, Result};
use crate::shard::{Appended, Fate, ShardLog};

/// A batch the shard took (or recognised as a retry): its offsets and
/// how to learn when it is durable.
pub(crate) struct Accepted {
    pub(crate) base_offset: i64,
    pub(crate) last_offset: i64,
    /// `None`: a retry of a batch committed long ago.
    pub(crate) fate: Option<watch::Receiver<Fate>>,
}

/// The ordered part: validate the batch, assign its offsets and enqueue it
/// in the WAL. A partition carries one batch per request (Kafka's rule
/// for Produce v3 and later), so a request never half-applies.
pub(crate) fn append(
    b: &Broker,
    shard: &Arc<ShardLog>,
    records: Bytes,
    compacted: bool,
) -> Result<Accepted> {
    let mut batches = batch::split(records)?;
    let bt = match batches.len() {
        0 => return Err(Error::Corrupt("empty produce".into())),
        1 => batches.remove(0),
        n => {
            return Err(Error::InvalidRecord(format!(
                "{n} record batches for one partition; a produce request carries one"
            )));
        }
    };
    let info = batch::info(&bt);
    if info.transactional || info.control {
        return Err(Error::Unsupported);
    }
    let records = batch::validate(&bt)?;
    // Log compaction keeps the newest record per key: as in Kafka, a
    // compacted topic refuses records without one.
    if compacted && records.iter().any(|r| r.key.is_none()) {
        return Err(Error::InvalidRecord(
            "Compacted topic cannot accept message without key".into(),
        ));
    }
    b.metrics.produce_requests.inc();
    let pending = b.unflushed_bytes();
    let appended = if pending < b.config.max_unflushed_bytes {
        shard.append(&bt, info, &b.wal)?
    } else if let Some(retry) = shard.duplicate_of(&info) {
        // Its original is written: answer as it, as backpressure only
        // holds back new bytes.
        retry
    } else {
        return Err(Error::Backpressure {
            pending,
            limit: b.config.max_unflushed_bytes,
        });
    };
    match appended {
        Appended::Duplicate {
            base_offset,
            last_offset,
            fate,
        } => Ok(Accepted {
            base_offset,
            last_offset,
            fate,
        }),
        Appended::Pending {
            base_offset,
            last_offset,
            ticket,
            fate,
        } => {
            b.metrics
                .produce_records
                .inc_by(u64::from(info.record_count.unsigned_abs()));
            b.metrics.produce_bytes.inc_by(bt.len() as u64);
            b.note_appended();
            // Make the batch visible (high watermark, flusher) as soon as
            // the fsync is done, not when this connection's writer gets to
            // the response: responses are sent in order, and an earlier one
            // may be waiting for an object commit that needs this batch. A
            // failed write is rolled back by the broker's WAL watcher.
            let shard = shard.clone();
            tokio::spawn(async move {
                match ticket.durable().await {
                    Ok(()) => shard.durable_through(last_offset),
                    Err(e) => {
                        tracing::warn!(stream = %shard.stream, shard = shard.shard, "WAL write failed: {e}")
                    }
                }
            });
            Ok(Accepted {
                base_offset,
                last_offset,
                fate: Some(fate),
            })
        }
    }
}

/// Answer once the stream's durability point is reached: the WAL fsync for
/// `local`, the committed object for `object`. A retried batch waits for
/// the same point as its original and gets the same answer.
pub(crate) async fn wait(
    shard: &ShardLog,
    accepted: Accepted,
    durability: Durability,
    timeout: Duration,
) -> Result<i64> {
    let last_offset = accepted.last_offset;
    let not_leader = || Error::NotLeader {
        stream: shard.stream.clone(),
        shard: shard.shard,
    };
    let mut fenced = shard.watch_fenced();
    let reached = tokio::time::timeout(timeout, async {
        if let Some(mut fate) = accepted.fate {
            tokio::select! {
                biased;
                f = fate.wait_for(|f| *f != Fate::Pending) => match f.map(|f| *f) {
                    Ok(Fate::Durable) => {}
                    // The batch left the tail with its WAL write.
                    Ok(_) | Err(_) => {
                        return Err(Error::Wal(shoal_wal_cache::Error::Unavailable {
                            reason: "the write-ahead log write failed".into(),
                        }));
                    }
                },
                _ = fenced.wait_for(|f| *f) => return Err(not_leader()),
            }
        }
        if durability == Durability::Object {
            let mut committed = shard.watch_committed();
            tokio::select! {
                biased;
                r = committed.wait_for(|c| *c > last_offset) => {
                    if r.is_err() {
                        return Err(not_leader());
                    }
                }
                // The lease moved before the commit: the new owner may not
                // have these records, so they are not acknowledged.
                _ = fenced.wait_for(|f| *f) => return Err(not_leader()),
            }
        } else if shard.is_fenced() && shard.committed_offset() <= last_offset {
            return Err(not_leader());
        }
        Ok(())
    })
    .await;
    let r = match reached {
        Ok(Ok(())) => Ok(accepted.base_offset),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Timeout),
    };
    if let Err(e) = &r {
        tracing::debug!(stream = %shard.stream, shard = shard.shard, base = accepted.base_offset, last = last_offset, "an appended batch is answered with an error: {e}");
    }
    r
}
