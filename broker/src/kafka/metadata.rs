//! ApiVersions, Metadata, DescribeCluster and FindCoordinator.

use kafka_protocol::ResponseError;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    ApiVersionsResponse, BrokerId, DescribeClusterRequest, DescribeClusterResponse,
    FindCoordinatorRequest, FindCoordinatorResponse, MetadataRequest, MetadataResponse,
    ResponseKind, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::conn::Ctx;
use super::{Pending, ready, supported_versions};
use crate::broker::{Broker, StreamHandle};
use crate::error::Error;

pub fn api_versions_response() -> ApiVersionsResponse {
    ApiVersionsResponse::default().with_api_keys(
        supported_versions()
            .into_iter()
            .map(|(k, min, max)| {
                ApiVersion::default()
                    .with_api_key(k as i16)
                    .with_min_version(min)
                    .with_max_version(max)
            })
            .collect(),
    )
}

pub fn broker_id(b: &Broker) -> BrokerId {
    BrokerId(b.config.broker_id as i32)
}

pub fn uuid(id: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(id)
}

fn topic_metadata(b: &Broker, s: &StreamHandle) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(StrBytes::from_string(s.name.clone()))))
        .with_topic_id(uuid(s.id))
        .with_partitions(
            s.shards
                .iter()
                .map(|sh| {
                    MetadataResponsePartition::default()
                        .with_partition_index(sh.shard)
                        .with_leader_id(broker_id(b))
                        .with_leader_epoch(sh.epoch() as i32)
                        .with_replica_nodes(vec![broker_id(b)])
                        .with_isr_nodes(vec![broker_id(b)])
                })
                .collect(),
        )
}

pub async fn metadata(ctx: &Ctx, req: MetadataRequest, version: i16) -> Pending {
    let b = &ctx.broker;
    let mut topics = Vec::new();
    // v0: an empty list means all topics; v1+: null means all.
    let requested = match req.topics {
        Some(t) if !(version == 0 && t.is_empty()) => Some(t),
        _ => None,
    };
    match requested {
        None => topics.extend(b.streams().iter().map(|s| topic_metadata(b, s))),
        Some(list) => {
            // Kafka v4+ lets the client forbid auto-creation; before, it is on.
            let allow = version < 4 || req.allow_auto_topic_creation;
            for t in list {
                let Some(name) = t.name else {
                    topics.push(
                        MetadataResponseTopic::default()
                            .with_topic_id(t.topic_id)
                            .with_error_code(ResponseError::UnknownTopicId.code()),
                    );
                    continue;
                };
                match b.stream_or_create(name.as_str(), allow).await {
                    Ok(s) => topics.push(topic_metadata(b, &s)),
                    Err(e) => {
                        let code = match e {
                            Error::StreamExists(_) => 0,
                            e => e.code(),
                        };
                        topics.push(
                            MetadataResponseTopic::default()
                                .with_name(Some(name))
                                .with_error_code(code),
                        )
                    }
                }
            }
        }
    }
    let resp = MetadataResponse::default()
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(broker_id(b))
                .with_host(StrBytes::from_string(b.config.advertised_host.clone()))
                .with_port(b.config.advertised_port),
        ])
        .with_cluster_id(Some(StrBytes::from_string(b.config.cluster_id.clone())))
        .with_controller_id(broker_id(b))
        .with_topics(topics);
    ready(ResponseKind::Metadata(resp))
}

pub fn describe_cluster(ctx: &Ctx, _req: DescribeClusterRequest) -> Pending {
    let b = &ctx.broker;
    ready(ResponseKind::DescribeCluster(
        DescribeClusterResponse::default()
            .with_cluster_id(StrBytes::from_string(b.config.cluster_id.clone()))
            .with_controller_id(broker_id(b))
            .with_brokers(vec![
                DescribeClusterBroker::default()
                    .with_broker_id(broker_id(b))
                    .with_host(StrBytes::from_string(b.config.advertised_host.clone()))
                    .with_port(b.config.advertised_port),
            ]),
    ))
}

pub fn find_coordinator(ctx: &Ctx, req: FindCoordinatorRequest, version: i16) -> Pending {
    let b = &ctx.broker;
    let host = StrBytes::from_string(b.config.advertised_host.clone());
    let port = b.config.advertised_port;
    // key_type 0 = group, 1 = transaction; transactions are not served.
    let code = if req.key_type == 0 {
        0
    } else {
        ResponseError::CoordinatorNotAvailable.code()
    };
    let resp = if version >= 4 {
        FindCoordinatorResponse::default().with_coordinators(
            req.coordinator_keys
                .into_iter()
                .map(|key| {
                    Coordinator::default()
                        .with_key(key)
                        .with_node_id(broker_id(b))
                        .with_host(host.clone())
                        .with_port(port)
                        .with_error_code(code)
                })
                .collect(),
        )
    } else {
        FindCoordinatorResponse::default()
            .with_error_code(code)
            .with_node_id(broker_id(b))
            .with_host(host)
            .with_port(port)
    };
    ready(ResponseKind::FindCoordinator(resp))
}
