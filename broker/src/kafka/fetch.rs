//! Fetch: serve from the tail, the cache or Parquet segments, long-polling
//! on the shards' high-watermark notifications until min_bytes or max_wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse, ResponseKind};

use super::Pending;
use super::conn::Ctx;
use crate::broker::Broker;
use crate::config::Durability;
use crate::shard::Read;

/// Cap on how long a client may make us hold a fetch.
const MAX_WAIT_CAP: Duration = Duration::from_secs(30);

pub fn fetch(ctx: &Ctx, req: FetchRequest, _version: i16) -> Pending {
    let b = ctx.broker.clone();
    Box::pin(async move {
        let started = Instant::now();
        b.metrics.fetch_requests.inc();
        let max_wait = Duration::from_millis(req.max_wait_ms.max(0) as u64).min(MAX_WAIT_CAP);
        let deadline = started + max_wait;
        let min_bytes = req.min_bytes.max(0) as usize;
        let max_bytes = if req.max_bytes <= 0 {
            usize::MAX
        } else {
            req.max_bytes as usize
        };
        // Subscribe before reading so no append slips between read and wait.
        let mut watches = Vec::new();
        for t in &req.topics {
            if let Some(s) = b.stream(t.topic.as_str()) {
                let committed_only = b.durability(&s) == Durability::Object;
                for p in &t.partitions {
                    if let Some(sh) = s.shard(p.partition) {
                        watches.push(if committed_only {
                            sh.watch_committed()
                        } else {
                            sh.watch_high_watermark()
                        });
                    }
                }
            }
        }
        loop {
            let (topics, bytes, errors) = read_all(&b, &req, max_bytes).await;
            let now = Instant::now();
            if bytes >= min_bytes.max(1) || errors || now >= deadline || watches.is_empty() {
                b.metrics.fetch_bytes.inc_by(bytes as u64);
                b.metrics
                    .fetch_latency
                    .observe(started.elapsed().as_secs_f64());
                return Some(ResponseKind::Fetch(
                    FetchResponse::default().with_responses(topics),
                ));
            }
            let changed: Vec<_> = watches.iter_mut().map(|w| w.changed().boxed()).collect();
            let _ =
                tokio::time::timeout(deadline - now, futures::future::select_all(changed)).await;
        }
    })
}

/// One pass over every requested partition.
async fn read_all(
    b: &Arc<Broker>,
    req: &FetchRequest,
    max_bytes: usize,
) -> (Vec<FetchableTopicResponse>, usize, bool) {
    let mut total = 0usize;
    let mut errors = false;
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in &req.topics {
        let stream = b.stream(t.topic.as_str());
        // `object` streams show only committed records: an acknowledged
        // record is always committed, and nothing a failover could lose
        // is ever read.
        let committed_only = stream
            .as_ref()
            .is_some_and(|s| b.durability(s) == Durability::Object);
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let mut pd = PartitionData::default()
                .with_partition_index(p.partition)
                .with_preferred_read_replica(BrokerId(-1))
                .with_aborted_transactions(Some(Vec::new()));
            let Some(shard) = stream.as_ref().and_then(|s| s.shard(p.partition)) else {
                errors = true;
                let code = stream
                    .as_ref()
                    .map_or(ResponseError::UnknownTopicOrPartition.code(), |s| {
                        s.not_here(p.partition).code()
                    });
                parts.push(
                    pd.with_error_code(code)
                        .with_high_watermark(-1)
                        .with_last_stable_offset(-1)
                        .with_log_start_offset(-1),
                );
                continue;
            };
            let hw = shard.visible_end(committed_only);
            pd = pd
                .with_high_watermark(hw)
                .with_last_stable_offset(hw)
                .with_log_start_offset(shard.log_start_offset());
            // KIP-74: the first batch is returned even past the limits.
            let budget =
                (p.partition_max_bytes.max(0) as usize).min(max_bytes.saturating_sub(total));
            let budget = if total == 0 { budget.max(1) } else { budget };
            if budget == 0 {
                parts.push(pd);
                continue;
            }
            let data: Option<Bytes> =
                match shard.read_visible(p.fetch_offset, budget, committed_only) {
                    Read::Tail(batches) => Some(concat(batches)),
                    Read::Segment(seg) => match b.read_segment(&seg).await {
                        Ok(bytes) => {
                            b.read_ahead(shard, &seg);
                            Some(crate::batch::slice_for_fetch(
                                &bytes,
                                p.fetch_offset,
                                budget,
                            ))
                        }
                        Err(e) => {
                            tracing::warn!(object = %seg.object, "cold read failed: {e}");
                            errors = true;
                            pd = pd.with_error_code(ResponseError::KafkaStorageError.code());
                            None
                        }
                    },
                    Read::AtEnd => None,
                    Read::OutOfRange => {
                        errors = true;
                        pd = pd.with_error_code(ResponseError::OffsetOutOfRange.code());
                        None
                    }
                };
            if let Some(d) = data {
                total += d.len();
                pd = pd.with_records(Some(d));
            }
            parts.push(pd);
        }
        topics.push(
            FetchableTopicResponse::default()
                .with_topic(t.topic.clone())
                .with_topic_id(t.topic_id)
                .with_partitions(parts),
        );
    }
    (topics, total, errors)
}

fn concat(batches: Vec<Bytes>) -> Bytes {
    if batches.len() == 1 {
        return batches.into_iter().next().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(batches.iter().map(|b| b.len()).sum());
    for b in batches {
        out.extend_from_slice(&b);
    }
    out.freeze()
}
