//! Produce: validate, assign offsets and enqueue in the WAL in request
//! order, then answer once the stream's durability is reached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse, ResponseKind};

use super::Pending;
use super::conn::Ctx;
use crate::batch;
use crate::config::Durability;
use crate::error::Error;
use crate::log::{append, wait};
use crate::shard::ShardLog;

/// What is left to wait for after the ordered part of a partition produce.
enum Outcome {
    Done(std::result::Result<i64, i16>),
    Wait {
        shard: Arc<ShardLog>,
        accepted: crate::log::Accepted,
        durability: Durability,
    },
}

struct PartitionWork {
    index: i32,
    outcome: Outcome,
}

/// The first sequence of each idempotent producer's batch that this
/// connection refused before writing it, per partition: `(topic, partition,
/// producer id) -> (producer epoch, sequence, error code)`.
///
/// A producer with no state on a shard is accepted at any sequence (Kafka's
/// rule, for state that expired). So if its batch N was refused (the shard
/// not served here yet, a full disk) while batch N+1 was already in
/// flight, accepting N+1 would leave a gap that the retry of N can never
/// fill: the broker would answer it OUT_OF_ORDER_SEQUENCE, which clients
/// take for "written before". Until batch N comes again, the later ones
/// get N's (retriable) error too, as they would have if they had arrived
/// together.
///
/// With state for the producer the shard would answer N+1 with
/// OUT_OF_ORDER_SEQUENCE_NUMBER, which librdkafka takes as a reason to bump
/// its epoch and number every unacknowledged record anew, including
/// records of other partitions that may have been written already: those
/// would then be written twice. So while the shard, under the lease that
/// refused N, still expects N, N+1 gets N's error too. Once the shard
/// expects something else (the retry of N was written here), or serves
/// under another lease (its state came from another owner, which may have
/// taken N), the ordinary sequence checks apply and the entry is dropped,
/// so a producer whose N went to another broker is not refused when the
/// shard comes back.
#[derive(Default)]
pub(crate) struct Gaps(parking_lot::Mutex<std::collections::HashMap<GapKey, Gap>>);

/// Topic, partition, producer id.
type GapKey = (String, i32, i64);
/// Producer epoch, first missing sequence, the error it got, and the lease
/// epoch of the shard that refused it (if one was served here).
type Gap = (i16, i32, i16, Option<u64>);

/// Is sequence `a` after `b`? Kafka sequences wrap at `i32::MAX`.
fn later(a: i32, b: i32) -> bool {
    let d = (i64::from(a) - i64::from(b)).rem_euclid(1 << 31);
    d > 0 && d < 1 << 30
}

impl Gaps {
    /// The error to answer `id`'s batch with, if an earlier one is missing.
    fn check(
        &self,
        topic: &str,
        partition: i32,
        id: Option<BatchId>,
        shard: Option<&ShardLog>,
    ) -> Option<i16> {
        let id = id?;
        let mut gaps = self.0.lock();
        let key = (topic.to_string(), partition, id.producer_id);
        let &(epoch, seq, code, lease) = gaps.get(&key)?;
        // Only the lease that refused N still missing N says N is still to
        // come; under another lease the shard's state came from elsewhere.
        let moved_on = shard.is_some_and(|s| {
            s.next_sequence(id.producer_id, id.epoch)
                .is_some_and(|next| next != seq || lease != Some(s.epoch()))
        });
        if id.epoch != epoch || id.sequence == seq || moved_on {
            // A new epoch starts over; the missing batch itself goes ahead;
            // a shard that no longer waits for it checks sequences itself.
            gaps.remove(&key);
            return None;
        }
        later(id.sequence, seq).then_some(code)
    }

    /// `id`'s batch was refused with `code` before it was written.
    fn refused(
        &self,
        topic: &str,
        partition: i32,
        id: Option<BatchId>,
        code: i16,
        lease: Option<u64>,
    ) {
        let Some(id) = id else { return };
        if !RETRIED.contains(&code) {
            return;
        }
        let mut gaps = self.0.lock();
        if gaps.len() >= MAX_GAPS {
            // A connection cycling through producer ids must not grow this
            // without bound; forgetting fails open to Kafka's rule.
            gaps.clear();
        }
        let e = gaps
            .entry((topic.to_string(), partition, id.producer_id))
            .or_insert((id.epoch, id.sequence, code, lease));
        if e.0 != id.epoch || later(e.1, id.sequence) {
            *e = (id.epoch, id.sequence, code, lease);
        }
    }
}

/// Refused batches remembered per connection at most.
const MAX_GAPS: usize = 4096;

/// Errors clients retry with the same sequence.
const RETRIED: [i16; 4] = [
    6,  // NOT_LEADER_OR_FOLLOWER
    3,  // UNKNOWN_TOPIC_OR_PARTITION
    56, // KAFKA_STORAGE_ERROR
    5,  // LEADER_NOT_AVAILABLE
];

/// An idempotent batch's producer id, epoch and first sequence.
#[derive(Debug, Clone, Copy)]
struct BatchId {
    producer_id: i64,
    epoch: i16,
    sequence: i32,
}

fn batch_id(records: &Bytes) -> Option<BatchId> {
    if records.len() < batch::HEADER_LEN {
        return None;
    }
    let info = batch::info(records);
    info.is_idempotent().then_some(BatchId {
        producer_id: info.producer_id,
        epoch: info.producer_epoch,
        sequence: info.base_sequence,
    })
}

pub async fn produce(ctx: &Ctx, req: ProduceRequest, _version: i16) -> Pending {
    let started = Instant::now();
    let b = ctx.broker.clone();
    let acks = req.acks;
    let timeout = Duration::from_millis(req.timeout_ms.clamp(0, 300_000) as u64);
    let mut topics = Vec::with_capacity(req.topic_data.len());
    for t in req.topic_data {
        let stream = b.stream_or_create(t.name.as_str(), true).await;
        let mut parts = Vec::with_capacity(t.partition_data.len());
        for p in t.partition_data {
            let records = p.records.unwrap_or_default();
            let id = batch_id(&records);
            let topic = t.name.as_str();
            let here = stream.as_ref().ok().and_then(|s| s.shard(p.index));
            let gap = ctx.gaps.check(topic, p.index, id, here.map(|s| &**s));
            let outcome = match (&stream, gap) {
                (_, Some(code)) => Outcome::Done(Err(code)),
                (Err(e), None) => Outcome::Done(Err(e.code())),
                (Ok(s), None) => match s.shard(p.index) {
                    None => Outcome::Done(Err(s.not_here(p.index).code())),
                    // A cluster broker out of touch with placement may have
                    // lost its shards already: clients go and ask again.
                    Some(_) if !b.lease_valid() => Outcome::Done(Err(Error::NotLeader {
                        stream: s.name.clone(),
                        shard: p.index,
                    }
                    .code())),
                    Some(shard) => match append(
                        &b,
                        shard,
                        records,
                        crate::topic_config::is_compacted(&s.config),
                    ) {
                        Ok(accepted) => Outcome::Wait {
                            shard: shard.clone(),
                            accepted,
                            durability: b.durability(s),
                        },
                        Err(e) => {
                            tracing::debug!(stream = %s.name, shard = p.index, "produce refused: {e}");
                            Outcome::Done(Err(e.code()))
                        }
                    },
                },
            };
            if let Outcome::Done(Err(code)) = outcome {
                ctx.gaps
                    .refused(topic, p.index, id, code, here.map(|s| s.epoch()));
            }
            parts.push(PartitionWork {
                index: p.index,
                outcome,
            });
        }
        topics.push((t.name, parts));
    }
    Box::pin(async move {
        let mut responses = Vec::with_capacity(topics.len());
        for (name, parts) in topics {
            let mut prs = Vec::with_capacity(parts.len());
            for p in parts {
                let result = match p.outcome {
                    Outcome::Done(r) => r,
                    Outcome::Wait {
                        shard,
                        accepted,
                        durability,
                    } => wait(&shard, accepted, durability, timeout)
                        .await
                        .map_err(|e| e.code()),
                };
                let mut pr = PartitionProduceResponse::default()
                    .with_index(p.index)
                    .with_log_append_time_ms(-1);
                match result {
                    Ok(base) => pr = pr.with_base_offset(base),
                    Err(code) => {
                        pr = pr.with_error_code(code).with_base_offset(-1);
                    }
                }
                prs.push(pr);
            }
            responses.push(
                TopicProduceResponse::default()
                    .with_name(name)
                    .with_partition_responses(prs),
            );
        }
        b.metrics
            .produce_latency
            .observe(started.elapsed().as_secs_f64());
        if acks == 0 {
            return None;
        }
        Some(ResponseKind::Produce(
            ProduceResponse::default().with_responses(responses),
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use shoal_placement::{ProducerBatch, ProducerState};

    use super::*;
    use crate::producer::Producers;
    use crate::shard::{ShardEnv, ShardInit};

    fn id(sequence: i32) -> Option<BatchId> {
        Some(BatchId {
            producer_id: 7,
            epoch: 0,
            sequence,
        })
    }

    fn shard_with(producers: Producers) -> ShardLog {
        let init = ShardInit {
            epoch: 1,
            replay_epoch: 0,
            log_start_offset: 0,
            committed_offset: 0,
            segments: vec![],
            index_version: 0,
            producers,
            stopped: None,
        };
        let env = ShardEnv {
            tail_keep_bytes: 0,
            producer_expiration_ms: 86_400_000,
            unflushed_bytes: Arc::new(AtomicU64::new(0)),
            cluster: false,
        };
        ShardLog::new("t", 0, init, env)
    }

    #[test]
    fn later_batches_wait_for_a_refused_one_while_the_shard_knows_nothing() {
        let gaps = Gaps::default();
        gaps.refused("t", 0, id(5), 6, None);
        let fresh = shard_with(Producers::new());
        assert_eq!(gaps.check("t", 0, id(6), None), Some(6));
        assert_eq!(gaps.check("t", 0, id(6), Some(&fresh)), Some(6));
        // The refused batch itself goes ahead and clears the guard.
        assert_eq!(gaps.check("t", 0, id(5), Some(&fresh)), None);
        assert_eq!(gaps.check("t", 0, id(6), Some(&fresh)), None);
    }

    #[test]
    fn a_shard_that_knows_the_producer_lifts_the_guard() {
        // Batch 5 was refused here and then written by another broker; the
        // shard came back with that state, so batch 6 is checked by it.
        let gaps = Gaps::default();
        gaps.refused("t", 0, id(5), 6, None);
        let mut producers = Producers::new();
        producers.insert(
            7,
            ProducerState {
                producer_epoch: 0,
                batches: vec![ProducerBatch {
                    first_sequence: 5,
                    last_sequence: 5,
                    base_offset: 0,
                    last_offset: 0,
                }],
                last_write_ms: 0,
            },
        );
        let known = shard_with(producers);
        assert_eq!(gaps.check("t", 0, id(6), Some(&known)), None);
        assert_eq!(gaps.check("t", 0, id(7), None), None);
    }

    #[test]
    fn a_shard_still_expecting_the_refused_batch_keeps_the_guard() {
        // Batch 5 was refused and this shard still expects it: batch 6 gets
        // batch 5's retriable error, not OUT_OF_ORDER_SEQUENCE_NUMBER.
        let gaps = Gaps::default();
        gaps.refused("t", 0, id(5), 56, Some(1));
        let mut producers = Producers::new();
        producers.insert(
            7,
            ProducerState {
                producer_epoch: 0,
                batches: vec![ProducerBatch {
                    first_sequence: 4,
                    last_sequence: 4,
                    base_offset: 0,
                    last_offset: 0,
                }],
                last_write_ms: 0,
            },
        );
        let waiting = shard_with(producers.clone());
        assert_eq!(gaps.check("t", 0, id(6), Some(&waiting)), Some(56));
        assert_eq!(gaps.check("t", 0, id(5), Some(&waiting)), None);
        // Under another lease (the shard moved away and back) its state came
        // from elsewhere: batch 5 may have been written there, so the shard
        // checks sequences itself.
        gaps.refused("t", 0, id(5), 56, Some(0));
        assert_eq!(gaps.check("t", 0, id(6), Some(&waiting)), None);
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let gaps = Gaps::default();
        gaps.refused("t", 0, id(i32::MAX), 56, None);
        assert_eq!(gaps.check("t", 0, id(0), None), Some(56));
        // An earlier batch refused later replaces the entry, across the wrap.
        gaps.refused("t", 0, id(i32::MAX - 1), 56, None);
        assert_eq!(gaps.check("t", 0, id(i32::MAX), None), Some(56));
        assert!(later(0, i32::MAX) && !later(i32::MAX, 0) && later(3, 2) && !later(2, 2));
    }

    #[test]
    fn errors_clients_do_not_retry_leave_no_guard() {
        let gaps = Gaps::default();
        gaps.refused("t", 0, id(5), 87, None);
        assert_eq!(gaps.check("t", 0, id(6), None), None);
    }
}
