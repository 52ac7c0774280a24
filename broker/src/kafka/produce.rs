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
use crate::broker::Broker;
use crate::config::Durability;
use crate::error::{Error, Result};
use crate::shard::{Appended, ShardLog};

/// What is left to wait for after the ordered part of a partition produce.
enum Outcome {
    Done(std::result::Result<i64, i16>),
    Wait {
        shard: Arc<ShardLog>,
        base_offset: i64,
        last_offset: i64,
        durable: Durable,
        durability: Durability,
    },
}

struct PartitionWork {
    index: i32,
    outcome: Outcome,
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
            let outcome = match &stream {
                Err(e) => Outcome::Done(Err(e.code())),
                Ok(s) => match s.shard(p.index) {
                    None => Outcome::Done(Err(s.not_here(p.index).code())),
                    // A cluster broker out of touch with placement may have
                    // lost its shards already: clients go and ask again.
                    Some(_) if !b.lease_valid() => Outcome::Done(Err(Error::NotLeader {
                        stream: s.name.clone(),
                        shard: p.index,
                    }
                    .code())),
                    Some(shard) => {
                        let durability = b.durability(s);
                        match append(&b, shard, p.records.unwrap_or_default()) {
                            Ok(o) => match o {
                                Appended2::Dup(off) => Outcome::Done(Ok(off)),
                                Appended2::Pending {
                                    base_offset,
                                    last_offset,
                                    durable,
                                } => Outcome::Wait {
                                    shard: shard.clone(),
                                    base_offset,
                                    last_offset,
                                    durable,
                                    durability,
                                },
                            },
                            Err(e) => {
                                tracing::debug!(stream = %s.name, shard = p.index, "produce refused: {e}");
                                Outcome::Done(Err(e.code()))
                            }
                        }
                    }
                },
            };
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
                        base_offset,
                        last_offset,
                        durable,
                        durability,
                    } => wait(
                        &shard,
                        base_offset,
                        last_offset,
                        durable,
                        durability,
                        timeout,
                    )
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

enum Appended2 {
    Dup(i64),
    Pending {
        base_offset: i64,
        last_offset: i64,
        durable: Durable,
    },
}

/// The ordered part: validate every batch first, so a bad one writes nothing.
/// Resolves when the WAL has fsynced a partition's batches (and they are
/// visible); `Err` carries the WAL failure.
type Durable = tokio::sync::oneshot::Receiver<std::result::Result<(), String>>;

fn append(b: &Broker, shard: &Arc<ShardLog>, records: Bytes) -> Result<Appended2> {
    let pending = b.unflushed_bytes();
    if pending >= b.config.max_unflushed_bytes {
        return Err(Error::Backpressure {
            pending,
            limit: b.config.max_unflushed_bytes,
        });
    }
    let batches = batch::split(records)?;
    if batches.is_empty() {
        return Err(Error::Corrupt("empty produce".into()));
    }
    let mut infos = Vec::with_capacity(batches.len());
    for bt in &batches {
        let info = batch::info(bt);
        if info.transactional || info.control {
            return Err(Error::Unsupported);
        }
        batch::validate(bt)?;
        infos.push(info);
    }
    let mut first = None;
    let mut last = -1;
    let mut tickets = Vec::new();
    let mut dup = None;
    for (bt, info) in batches.iter().zip(infos) {
        match shard.append(bt, info, &b.wal)? {
            Appended::Duplicate { base_offset } => {
                dup.get_or_insert(base_offset);
            }
            Appended::Pending {
                base_offset,
                last_offset,
                ticket,
            } => {
                first.get_or_insert(base_offset);
                last = last_offset;
                tickets.push(ticket);
                b.metrics
                    .produce_records
                    .inc_by(u64::from(info.record_count.unsigned_abs()));
                b.metrics.produce_bytes.inc_by(bt.len() as u64);
                b.note_appended(bt.len() as u64);
            }
        }
    }
    b.metrics.produce_requests.inc();
    match first {
        Some(base_offset) => {
            // Make the batches visible (high watermark, flusher) as soon as
            // the fsync is done, not when this connection's writer gets to
            // the response: responses are sent in order, and an earlier one
            // may be waiting for an object commit that needs these batches.
            let (tx, durable) = tokio::sync::oneshot::channel();
            let shard = shard.clone();
            tokio::spawn(async move {
                let mut result = Ok(());
                for t in tickets {
                    if let Err(e) = t.durable().await {
                        tracing::error!(stream = %shard.stream, shard = shard.shard, "WAL fsync failed: {e}");
                        result = Err(e.to_string());
                        break;
                    }
                }
                if result.is_ok() {
                    shard.durable_through(last);
                }
                let _ = tx.send(result);
            });
            Ok(Appended2::Pending {
                base_offset,
                last_offset: last,
                durable,
            })
        }
        None => Ok(Appended2::Dup(dup.unwrap_or(-1))),
    }
}

async fn wait(
    shard: &ShardLog,
    base_offset: i64,
    last_offset: i64,
    durable: Durable,
    durability: Durability,
    timeout: Duration,
) -> Result<i64> {
    match durable.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Internal(format!("WAL fsync failed: {e}"))),
        Err(_) => return Err(Error::Internal("WAL append abandoned".into())),
    }
    let not_leader = || Error::NotLeader {
        stream: shard.stream.clone(),
        shard: shard.shard,
    };
    if durability == Durability::Object {
        let mut rx = shard.watch_committed();
        let mut fenced = shard.watch_fenced();
        let reached = tokio::time::timeout(timeout, async {
            tokio::select! {
                biased;
                r = rx.wait_for(|c| *c > last_offset) => r.is_ok(),
                // The lease moved before the commit: the new owner may not
                // have these records, so they are not acknowledged.
                _ = fenced.wait_for(|f| *f) => false,
            }
        })
        .await;
        match reached {
            Ok(true) => {}
            Ok(false) => return Err(not_leader()),
            Err(_) => return Err(Error::Timeout),
        }
    } else if shard.is_fenced() && shard.committed_offset() <= last_offset {
        return Err(not_leader());
    }
    Ok(base_offset)
}
