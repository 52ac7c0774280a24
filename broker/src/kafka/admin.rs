//! Topic administration, configs, ListOffsets and InitProducerId.

use std::collections::BTreeMap;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{
    CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse, InitProducerIdRequest,
    InitProducerIdResponse, ListOffsetsRequest, ListOffsetsResponse, ProducerId, ResponseKind,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;
use shoal_placement::{Command, Reply};

use super::conn::Ctx;
use super::metadata::uuid;
use super::{Pending, ready};
use crate::batch;
use crate::broker::{Broker, StreamHandle, valid_topic_name};
use crate::config::Durability;
use crate::error::{Error, Result};
use crate::shard::ShardLog;

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_DYNAMIC_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

/// Topic configs Kafka tools expect, with Shoal's defaults.
fn topic_defaults(b: &Broker) -> Vec<(&'static str, String)> {
    let mut v = vec![(
        Durability::CONFIG_KEY,
        b.config.default_durability.as_str().to_string(),
    )];
    v.extend(crate::topic_config::implemented_defaults(
        b.config.max_request_bytes,
    ));
    v
}

/// Effective configs of a topic: (name, value, source).
fn topic_configs(b: &Broker, stream: &StreamHandle) -> Vec<(String, String, i8)> {
    let mut out: Vec<(String, String, i8)> = topic_defaults(b)
        .into_iter()
        .map(|(k, v)| match stream.config.get(k) {
            Some(set) => (k.to_string(), set.clone(), SOURCE_DYNAMIC_TOPIC),
            None if k == "retention.ms" && stream.retention_default => (
                k.to_string(),
                b.default_retention_ms().to_string(),
                SOURCE_DEFAULT,
            ),
            None => (k.to_string(), v, SOURCE_DEFAULT),
        })
        .collect();
    for (k, v) in &stream.config {
        if !out.iter().any(|(n, _, _)| n == k) {
            out.push((k.clone(), v.clone(), SOURCE_DYNAMIC_TOPIC));
        }
    }
    out
}

pub async fn create_topics(ctx: &Ctx, req: CreateTopicsRequest, version: i16) -> Pending {
    let b = &ctx.broker;
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let partitions = if t.num_partitions < 0 {
            b.config.default_partitions
        } else {
            t.num_partitions
        };
        let config: BTreeMap<String, String> = t
            .configs
            .iter()
            .filter_map(|c| {
                c.value
                    .as_ref()
                    .map(|v| (c.name.to_string(), v.to_string()))
            })
            .collect();
        let name = t.name.to_string();
        let outcome = if req.validate_only {
            validate_new_topic(b, &name, partitions, &config).map(|_| None)
        } else {
            b.create_stream(&name, partitions, config, false)
                .await
                .map(Some)
        };
        let mut r = CreatableTopicResult::default()
            .with_name(t.name)
            .with_num_partitions(partitions)
            .with_replication_factor(1);
        match outcome {
            Ok(Some(stream)) => {
                r = r.with_topic_id(uuid(stream.id));
                if version >= 5 {
                    r = r.with_configs(Some(
                        topic_configs(b, &stream)
                            .into_iter()
                            .map(|(k, v, src)| {
                                CreatableTopicConfigs::default()
                                    .with_name(s(k))
                                    .with_value(Some(s(v)))
                                    .with_config_source(src)
                            })
                            .collect(),
                    ));
                }
            }
            Ok(None) => {}
            Err(e) => {
                r = r
                    .with_error_code(e.code())
                    .with_error_message(Some(s(e.to_string())))
                    .with_num_partitions(-1)
                    .with_replication_factor(-1);
            }
        }
        results.push(r);
    }
    ready(ResponseKind::CreateTopics(
        CreateTopicsResponse::default().with_topics(results),
    ))
}

fn validate_new_topic(
    b: &Broker,
    name: &str,
    partitions: i32,
    config: &BTreeMap<String, String>,
) -> Result<()> {
    if !valid_topic_name(name) {
        return Err(Error::InvalidTopic(name.to_string()));
    }
    if b.stream(name).is_some() {
        return Err(Error::StreamExists(name.to_string()));
    }
    if !(1..=shoal_placement::state::MAX_PARTITIONS).contains(&partitions) {
        return Err(Error::InvalidPartitions(format!("{partitions}")));
    }
    for (k, v) in config {
        crate::topic_config::check(k, v, b.config.max_request_bytes)?;
    }
    Ok(())
}

pub async fn delete_topics(ctx: &Ctx, req: DeleteTopicsRequest, _version: i16) -> Pending {
    let b = &ctx.broker;
    let mut names: Vec<TopicName> = req.topic_names;
    names.extend(req.topics.into_iter().filter_map(|t| t.name));
    let mut responses = Vec::with_capacity(names.len());
    for name in names {
        let code = if b.stream(name.as_str()).is_none() {
            ResponseError::UnknownTopicOrPartition.code()
        } else {
            match b.delete_stream(name.as_str()).await {
                Ok(()) => 0,
                Err(e) => e.code(),
            }
        };
        responses.push(
            DeletableTopicResult::default()
                .with_name(Some(name))
                .with_error_code(code),
        );
    }
    ready(ResponseKind::DeleteTopics(
        DeleteTopicsResponse::default().with_responses(responses),
    ))
}

pub async fn create_partitions(ctx: &Ctx, req: CreatePartitionsRequest) -> Pending {
    let b = &ctx.broker;
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let outcome = match b.stream(t.name.as_str()) {
            None => Err(Error::UnknownStream(t.name.to_string())),
            Some(stream) if t.count <= stream.partition_count() => {
                Err(Error::InvalidPartitions(format!(
                    "topic has {} partitions, cannot go to {}",
                    stream.partition_count(),
                    t.count
                )))
            }
            Some(_) if req.validate_only => Ok(()),
            Some(_) => b.create_partitions(t.name.as_str(), t.count).await,
        };
        let mut r = CreatePartitionsTopicResult::default().with_name(t.name);
        if let Err(e) = outcome {
            r = r
                .with_error_code(e.code())
                .with_error_message(Some(s(e.to_string())));
        }
        results.push(r);
    }
    ready(ResponseKind::CreatePartitions(
        CreatePartitionsResponse::default().with_results(results),
    ))
}

pub fn describe_configs(ctx: &Ctx, req: DescribeConfigsRequest) -> Pending {
    let b = &ctx.broker;
    let mut results = Vec::with_capacity(req.resources.len());
    for r in req.resources {
        let wanted = |k: &str| {
            r.configuration_keys
                .as_ref()
                .is_none_or(|keys| keys.iter().any(|w| w.as_str() == k))
        };
        let mut res = DescribeConfigsResult::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name.clone());
        let entries: Option<Vec<(String, String, i8)>> = match r.resource_type {
            RESOURCE_TOPIC => b
                .stream(r.resource_name.as_str())
                .map(|stream| topic_configs(b, &stream)),
            RESOURCE_BROKER => Some(vec![
                (
                    "num.partitions".into(),
                    b.config.default_partitions.to_string(),
                    SOURCE_STATIC_BROKER,
                ),
                (
                    "auto.create.topics.enable".into(),
                    b.config.auto_create_topics.to_string(),
                    SOURCE_STATIC_BROKER,
                ),
                (
                    "shoal.default.durability".into(),
                    b.config.default_durability.as_str().into(),
                    SOURCE_STATIC_BROKER,
                ),
            ]),
            _ => None,
        };
        match entries {
            Some(entries) => {
                res = res.with_configs(
                    entries
                        .into_iter()
                        .filter(|(k, _, _)| wanted(k))
                        .map(|(k, v, src)| {
                            DescribeConfigsResourceResult::default()
                                .with_name(s(k))
                                .with_value(Some(s(v)))
                                .with_config_source(src)
                                .with_read_only(src == SOURCE_STATIC_BROKER)
                        })
                        .collect(),
                )
            }
            None => {
                let code = if r.resource_type == RESOURCE_TOPIC {
                    ResponseError::UnknownTopicOrPartition
                } else {
                    ResponseError::InvalidRequest
                };
                res = res
                    .with_error_code(code.code())
                    .with_error_message(Some(s(format!(
                        "unknown resource {}",
                        r.resource_name.as_str()
                    ))));
            }
        }
        results.push(res);
    }
    ready(ResponseKind::DescribeConfigs(
        DescribeConfigsResponse::default().with_results(results),
    ))
}

pub async fn incremental_alter_configs(ctx: &Ctx, req: IncrementalAlterConfigsRequest) -> Pending {
    let b = &ctx.broker;
    let mut responses = Vec::with_capacity(req.resources.len());
    for r in req.resources {
        let outcome: Result<()> = async {
            if r.resource_type != RESOURCE_TOPIC {
                return Err(Error::InvalidConfig(
                    "only topic configs can be altered".into(),
                ));
            }
            if b.stream(r.resource_name.as_str()).is_none() {
                return Err(Error::UnknownStream(r.resource_name.to_string()));
            }
            let mut set = BTreeMap::new();
            let mut remove = Vec::new();
            for c in &r.configs {
                match (c.config_operation, &c.value) {
                    (0, Some(v)) => {
                        set.insert(c.name.to_string(), v.to_string());
                    }
                    (1, _) => remove.push(c.name.to_string()),
                    _ => {
                        return Err(Error::InvalidConfig(format!(
                            "operation {} on {} is not supported",
                            c.config_operation,
                            c.name.as_str()
                        )));
                    }
                }
            }
            for (k, v) in &set {
                crate::topic_config::check(k, v, b.config.max_request_bytes)?;
            }
            for k in &remove {
                crate::topic_config::check_removal(k)?;
            }
            if req.validate_only {
                return Ok(());
            }
            b.alter_config(r.resource_name.as_str(), set, remove).await
        }
        .await;
        let mut resp = AlterConfigsResourceResponse::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name);
        if let Err(e) = outcome {
            resp = resp
                .with_error_code(e.code())
                .with_error_message(Some(s(e.to_string())));
        }
        responses.push(resp);
    }
    ready(ResponseKind::IncrementalAlterConfigs(
        IncrementalAlterConfigsResponse::default().with_responses(responses),
    ))
}

pub async fn init_producer_id(ctx: &Ctx, req: InitProducerIdRequest) -> Pending {
    let b = &ctx.broker;
    let mut resp = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if req.transactional_id.is_some() {
        // Transactions come later; say so instead of pretending.
        resp = resp.with_error_code(ResponseError::TransactionalIdAuthorizationFailed.code());
        return ready(ResponseKind::InitProducerId(resp));
    }
    match b.placement.write(Command::AllocateProducerId).await {
        Ok(Reply::ProducerId { id }) => {
            resp = resp.with_producer_id(ProducerId(id)).with_producer_epoch(0);
        }
        Ok(other) => {
            tracing::error!("unexpected placement reply {other:?}");
            resp = resp.with_error_code(ResponseError::UnknownServerError.code());
        }
        Err(e) => {
            tracing::warn!("allocating a producer id: {e}");
            resp = resp.with_error_code(ResponseError::CoordinatorNotAvailable.code());
        }
    }
    ready(ResponseKind::InitProducerId(resp))
}

/// ListOffsets' special timestamps (Kafka's `ListOffsetsRequest`).
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
/// v7+: the record with the largest timestamp.
const MAX_TIMESTAMP: i64 = -3;
/// v8+: the start of the local log; Shoal keeps no separate tier, so it is
/// the log start.
const EARLIEST_LOCAL: i64 = -4;
/// v9+: the last offset in remote (tiered) storage; Shoal has no tiering,
/// so, as Kafka without tiered storage, no offset.
const LATEST_TIERED: i64 = -5;

pub async fn list_offsets(ctx: &Ctx, req: ListOffsetsRequest, version: i16) -> Pending {
    let b = &ctx.broker;
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let stream = b.stream(t.name.as_str());
        // `object` streams show only committed records, here as in Fetch.
        let committed_only = stream
            .as_ref()
            .is_some_and(|s| b.durability(s) == crate::config::Durability::Object);
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            let mut r = ListOffsetsPartitionResponse::default()
                .with_partition_index(p.partition_index)
                .with_timestamp(-1)
                .with_offset(-1);
            match stream.as_ref().and_then(|s| s.shard(p.partition_index)) {
                None => {
                    let code = stream
                        .as_ref()
                        .map_or(ResponseError::UnknownTopicOrPartition.code(), |s| {
                            s.not_here(p.partition_index).code()
                        });
                    r = r.with_error_code(code)
                }
                Some(shard) => match p.timestamp {
                    EARLIEST => r = r.with_offset(shard.log_start_offset()),
                    LATEST => r = r.with_offset(shard.visible_end(committed_only)),
                    EARLIEST_LOCAL if version >= 8 => r = r.with_offset(shard.log_start_offset()),
                    LATEST_TIERED if version >= 9 => {}
                    MAX_TIMESTAMP if version >= 7 => {
                        match max_timestamp(b, shard, committed_only).await {
                            Ok(Some((offset, ts))) => r = r.with_offset(offset).with_timestamp(ts),
                            Ok(None) => {}
                            Err(e) => r = r.with_error_code(e.code()),
                        }
                    }
                    ts if ts >= 0 => match offset_for_timestamp(b, shard, ts, committed_only).await
                    {
                        Ok(Some((offset, found_ts))) => {
                            r = r.with_offset(offset).with_timestamp(found_ts)
                        }
                        Ok(None) => {}
                        Err(e) => r = r.with_error_code(e.code()),
                    },
                    MAX_TIMESTAMP | EARLIEST_LOCAL | LATEST_TIERED => {
                        r = r.with_error_code(ResponseError::UnsupportedVersion.code())
                    }
                    _ => r = r.with_error_code(ResponseError::InvalidRequest.code()),
                },
            }
            parts.push(r);
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(parts),
        );
    }
    ready(ResponseKind::ListOffsets(
        ListOffsetsResponse::default().with_topics(topics),
    ))
}

/// The earliest visible record with timestamp >= ts: (offset, its timestamp).
async fn offset_for_timestamp(
    b: &Broker,
    shard: &ShardLog,
    ts: i64,
    committed_only: bool,
) -> Result<Option<(i64, i64)>> {
    let start = shard.log_start_offset();
    for seg in shard.segments() {
        if seg.max_timestamp_ms < ts || seg.last_offset < start {
            continue;
        }
        let rows = batch::rows_of_all(b.read_segment(&seg).await?)?;
        if let Some(r) = rows
            .iter()
            .find(|r| r.offset >= start && r.timestamp_ms >= ts)
        {
            return Ok(Some((r.offset, r.timestamp_ms)));
        }
    }
    for tb in shard
        .visible_uncommitted(committed_only)
        .iter()
        .filter(|tb| tb.max_timestamp >= ts)
    {
        if let Some(r) = batch::to_rows(&tb.bytes)?
            .iter()
            .find(|r| r.timestamp_ms >= ts)
        {
            return Ok(Some((r.offset, r.timestamp_ms)));
        }
    }
    Ok(None)
}

/// The first visible record carrying the largest timestamp.
async fn max_timestamp(
    b: &Broker,
    shard: &ShardLog,
    committed_only: bool,
) -> Result<Option<(i64, i64)>> {
    let start = shard.log_start_offset();
    let mut best: Option<(i64, i64)> = None;
    let better = |best: Option<(i64, i64)>, ts: i64| best.is_none_or(|(_, t)| ts > t);
    // The index knows each range's largest timestamp. Ranges are read
    // from the largest down until the best row found is at least the next
    // range's largest: usually one read. (A range that starts below the
    // log start may owe its largest timestamp to rows no longer in the log.)
    let mut ranges: Vec<shoal_placement::SegmentRef> = shard
        .segments()
        .into_iter()
        .filter(|s| s.last_offset >= start)
        .collect();
    // Earliest first among equal timestamps: Kafka answers the first offset.
    ranges.sort_by_key(|s| (std::cmp::Reverse(s.max_timestamp_ms), s.first_offset));
    for seg in ranges {
        if best.is_some_and(|(_, t)| t >= seg.max_timestamp_ms) {
            break;
        }
        for r in batch::rows_of_all(b.read_segment(&seg).await?)? {
            if r.offset >= start && better(best, r.timestamp_ms) {
                best = Some((r.offset, r.timestamp_ms));
            }
        }
    }
    for tb in shard.visible_uncommitted(committed_only) {
        if !better(best, tb.max_timestamp) {
            continue;
        }
        for r in batch::to_rows(&tb.bytes)? {
            if better(best, r.timestamp_ms) {
                best = Some((r.offset, r.timestamp_ms));
            }
        }
    }
    Ok(best)
}
