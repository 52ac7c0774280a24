//! DeleteRecords: move partitions' log start offsets forward (Kafka's
//! `AdminClient.deleteRecords`). Records below the new start are no longer
//! served; the compactor deletes the objects that held only them.

use std::time::Duration;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse, ResponseKind};

use super::Pending;
use super::conn::Ctx;
use crate::config::Durability;

/// `offset = -1` in a request means the high watermark.
const HIGH_WATERMARK: i64 = -1;

pub fn delete_records(ctx: &Ctx, req: DeleteRecordsRequest) -> Pending {
    let b = ctx.broker.clone();
    Box::pin(async move {
        let timeout = Duration::from_millis(u64::try_from(req.timeout_ms).unwrap_or(0))
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut topics = Vec::with_capacity(req.topics.len());
        for t in req.topics {
            let stream = b.stream(t.name.as_str());
            let mut parts = Vec::with_capacity(t.partitions.len());
            for p in t.partitions {
                let r = DeleteRecordsPartitionResult::default()
                    .with_partition_index(p.partition_index)
                    .with_low_watermark(-1);
                let Some(s) = stream.as_ref() else {
                    parts.push(r.with_error_code(ResponseError::UnknownTopicOrPartition.code()));
                    continue;
                };
                let Some(shard) = s.shard(p.partition_index) else {
                    parts.push(r.with_error_code(s.not_here(p.partition_index).code()));
                    continue;
                };
                let committed_only = b.durability(s) == Durability::Object;
                let end = shard.visible_end(committed_only);
                let offset = if p.offset == HIGH_WATERMARK {
                    end
                } else {
                    p.offset
                };
                if !(0..=end).contains(&offset) {
                    parts.push(r.with_error_code(ResponseError::OffsetOutOfRange.code()));
                    continue;
                }
                parts.push(match b.delete_records(shard, offset, timeout).await {
                    Ok(low) => r.with_low_watermark(low),
                    Err(e) => r.with_error_code(e.code()),
                });
            }
            topics.push(
                DeleteRecordsTopicResult::default()
                    .with_name(t.name)
                    .with_partitions(parts),
            );
        }
        Some(ResponseKind::DeleteRecords(
            DeleteRecordsResponse::default().with_topics(topics),
        ))
    })
}
