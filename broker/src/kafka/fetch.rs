//! Fetch: serve from the tail, the cache or Parquet segments, long-polling
//! on the shards' high-watermark notifications until min_bytes or max_wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse, ResponseKind, TopicName};
use shoal_security::acl::Operation;
use std::collections::HashSet;

use super::Pending;
use super::conn::Ctx;
use super::fetch_session::Wanted;
use crate::broker::Broker;
use crate::config::Durability;
use crate::shard::{Read, ShardLog};

/// Cap on how long a client may make us hold a fetch.
const MAX_WAIT_CAP: Duration = Duration::from_secs(30);
/// Cap on one response, whatever the client asks (Kafka's broker-side
/// `fetch.max.bytes`, 55 MiB by default, is the same kind of bound).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

pub fn fetch(ctx: &Ctx, req: FetchRequest, version: i16) -> Pending {
    let b = ctx.broker.clone();
    let started = Instant::now();
    b.metrics.fetch_requests.inc();
    let plan = match b.fetch_sessions.begin(&req, version, started) {
        Ok(plan) => plan,
        Err(e) => {
            b.metrics.fetch_session_errors.inc();
            return super::ready(ResponseKind::Fetch(
                FetchResponse::default().with_error_code(e.code()),
            ));
        }
    };
    // The request's own topics were authorized before it got here; a
    // session's other partitions are checked again on every fetch, so a
    // revoked ACL takes effect at once.
    let denied: HashSet<TopicName> = plan
        .wanted
        .iter()
        .map(|w| &w.topic)
        .filter(|t| !ctx.allowed_topic(Operation::Read, t.as_str()))
        .cloned()
        .collect();
    Box::pin(async move {
        let max_wait = Duration::from_millis(req.max_wait_ms.max(0) as u64).min(MAX_WAIT_CAP);
        let deadline = started + max_wait;
        let min_bytes = req.min_bytes.max(0) as usize;
        let max_bytes = usize::try_from(req.max_bytes)
            .ok()
            .filter(|m| *m > 0)
            .map_or(MAX_RESPONSE_BYTES, |m| m.min(MAX_RESPONSE_BYTES));
        // Subscribe before reading so no append slips between read and wait.
        let mut watches = Vec::new();
        for w in plan.wanted.iter().filter(|w| !denied.contains(&w.topic)) {
            if let Some(s) = b.stream(w.topic.as_str()) {
                let committed_only = b.durability(&s) == Durability::Object;
                if let Some(sh) = s.shard(w.partition) {
                    watches.push(if committed_only {
                        sh.watch_committed()
                    } else {
                        sh.watch_high_watermark()
                    });
                }
            }
        }
        loop {
            // A slow object store does not hold the answer past max.wait.ms:
            // then the partitions are answered without records (their loads
            // go on, so the next fetch finds them in the cache).
            let left = deadline.saturating_duration_since(Instant::now());
            let read = read_all(&b, &plan.wanted, &denied, max_bytes, true);
            let (topics, bytes, errors) = match tokio::time::timeout(left, read).await {
                Ok(r) => r,
                Err(_) => read_all(&b, &plan.wanted, &denied, max_bytes, false).await,
            };
            let now = Instant::now();
            if bytes >= min_bytes || errors || now >= deadline || watches.is_empty() {
                b.metrics.fetch_bytes.inc_by(bytes as u64);
                b.metrics
                    .fetch_latency
                    .observe(started.elapsed().as_secs_f64());
                let topics = b.fetch_sessions.finish(&plan, topics);
                return Some(ResponseKind::Fetch(
                    FetchResponse::default()
                        .with_session_id(plan.session_id)
                        .with_responses(topics),
                ));
            }
            let changed: Vec<_> = watches.iter_mut().map(|w| w.changed().boxed()).collect();
            let _ =
                tokio::time::timeout(deadline - now, futures::future::select_all(changed)).await;
        }
    })
}

/// One pass over every partition the fetch covers, in order; consecutive
/// partitions of a topic share its response entry. Without `with_records`
/// only the offsets are answered (no I/O).
async fn read_all(
    b: &Arc<Broker>,
    wanted: &[Wanted],
    denied: &HashSet<TopicName>,
    max_bytes: usize,
    with_records: bool,
) -> (Vec<FetchableTopicResponse>, usize, bool) {
    let mut total = 0usize;
    let mut errors = false;
    let mut topics: Vec<FetchableTopicResponse> = Vec::new();
    // The partitions are answered in order, but their cold segments load
    // side by side.
    for w in wanted.iter().filter(|_| with_records) {
        if let Some(s) = b.stream(w.topic.as_str())
            && let Some(shard) = s.shard(w.partition)
            && let Read::Segment(seg) =
                shard.read_visible(w.fetch_offset, 1, b.durability(&s) == Durability::Object)
        {
            b.start_load(&seg);
        }
    }
    for w in wanted {
        let stream = b.stream(w.topic.as_str());
        // `object` streams show only committed records: an acknowledged
        // record is always committed, and nothing a failover could lose
        // is ever read.
        let committed_only = stream
            .as_ref()
            .is_some_and(|s| b.durability(s) == Durability::Object);
        let mut pd = PartitionData::default()
            .with_partition_index(w.partition)
            .with_preferred_read_replica(BrokerId(-1))
            .with_aborted_transactions(Some(Vec::new()));
        let shard = stream.as_ref().and_then(|s| s.shard(w.partition));
        match shard {
            _ if denied.contains(&w.topic) => {
                errors = true;
                pd = pd
                    .with_error_code(ResponseError::TopicAuthorizationFailed.code())
                    .with_high_watermark(-1)
                    .with_last_stable_offset(-1)
                    .with_log_start_offset(-1);
            }
            None => {
                errors = true;
                let code = stream
                    .as_ref()
                    .map_or(ResponseError::UnknownTopicOrPartition.code(), |s| {
                        s.not_here(w.partition).code()
                    });
                pd = pd
                    .with_error_code(code)
                    .with_high_watermark(-1)
                    .with_last_stable_offset(-1)
                    .with_log_start_offset(-1);
            }
            Some(shard) => {
                let hw = shard.visible_end(committed_only);
                pd = pd
                    .with_high_watermark(hw)
                    .with_last_stable_offset(hw)
                    .with_log_start_offset(shard.log_start_offset());
                // KIP-74: the first batch is returned even past the limits.
                let budget =
                    (w.partition_max_bytes.max(0) as usize).min(max_bytes.saturating_sub(total));
                let budget = if total == 0 { budget.max(1) } else { budget };
                if budget > 0 && with_records {
                    let force_first = total == 0;
                    match read_partition(
                        b,
                        shard,
                        w.fetch_offset,
                        budget,
                        committed_only,
                        force_first,
                    )
                    .await
                    {
                        Ok(Some(d)) => {
                            total += d.len();
                            pd = pd.with_records(Some(d));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            errors = true;
                            pd = pd.with_error_code(e.code());
                        }
                    }
                }
            }
        }
        match topics.last_mut() {
            Some(t) if t.topic == w.topic => t.partitions.push(pd),
            _ => topics.push(
                FetchableTopicResponse::default()
                    .with_topic(w.topic.clone())
                    .with_topic_id(w.topic_id)
                    .with_partitions(vec![pd]),
            ),
        }
    }
    (topics, total, errors)
}

/// Up to `budget` bytes of whole batches from `offset` on: from the tail,
/// then from as many committed segments as it takes, so a catch-up read
/// fills the client's partition limit instead of stopping at a row group.
/// With `force_first` (the first partition with data in the response) the
/// first batch is taken even when larger than `budget` (KIP-74).
async fn read_partition(
    b: &Arc<Broker>,
    shard: &Arc<ShardLog>,
    offset: i64,
    budget: usize,
    committed_only: bool,
    force_first: bool,
) -> Result<Option<Bytes>, ResponseError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    let mut next = offset;
    loop {
        let left = budget.saturating_sub(size);
        if left == 0 {
            break;
        }
        match shard.read_visible(next, left, committed_only) {
            Read::Tail(batches) => {
                let take: Vec<Bytes> = if chunks.is_empty() && force_first {
                    batches
                } else {
                    // Past a forced first batch, only whole batches within the budget.
                    let mut room = left;
                    batches
                        .into_iter()
                        .take_while(|x| {
                            let fits = x.len() <= room;
                            room = room.saturating_sub(x.len());
                            fits
                        })
                        .collect()
                };
                chunks.extend(take);
                break;
            }
            Read::Segment(seg) => {
                let bytes = match b.read_segment(&seg).await {
                    Ok(bytes) => bytes,
                    Err(e) if chunks.is_empty() => {
                        tracing::warn!(object = %seg.object, "cold read failed: {e}");
                        return Err(ResponseError::KafkaStorageError);
                    }
                    // What was read so far is answered; the client asks again.
                    Err(_) => break,
                };
                b.read_ahead(shard, &seg);
                let slice = if chunks.is_empty() && force_first {
                    crate::batch::slice_for_fetch(&bytes, next, left)
                } else {
                    crate::batch::slice_within(&bytes, next, left)
                };
                if slice.is_empty() {
                    break;
                }
                size += slice.len();
                let end = crate::batch::last_offset_in(&slice);
                chunks.push(slice);
                match end {
                    // The segment was used up: go on with what follows it.
                    Some(last) if last >= seg.last_offset => next = seg.last_offset + 1,
                    _ => break,
                }
            }
            Read::AtEnd => break,
            Read::OutOfRange if chunks.is_empty() => {
                return Err(ResponseError::OffsetOutOfRange);
            }
            Read::OutOfRange => break,
        }
    }
    Ok((!chunks.is_empty()).then(|| concat(chunks)))
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
