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

use shoal_security::acl::Operation;

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

fn topic_metadata(s: &StreamHandle) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(StrBytes::from_string(s.name.clone()))))
        .with_topic_id(uuid(s.id))
        .with_partitions(
            (0..s.partition_count())
                .filter_map(|i| s.partition(i).map(|p| (i, p)))
                .map(|(i, p)| {
                    let part = MetadataResponsePartition::default()
                        .with_partition_index(i)
                        .with_leader_epoch(i32::try_from(p.epoch).unwrap_or(i32::MAX));
                    match p.leader {
                        Some(l) => {
                            let id = BrokerId(l as i32);
                            part.with_leader_id(id)
                                .with_replica_nodes(vec![id])
                                .with_isr_nodes(vec![id])
                        }
                        // Being moved to a live broker: clients retry.
                        None => part
                            .with_leader_id(BrokerId(-1))
                            .with_error_code(ResponseError::LeaderNotAvailable.code()),
                    }
                })
                .collect(),
        )
}

fn host_port(addr: &str) -> (StrBytes, i32) {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "9092"));
    (
        StrBytes::from_string(host.to_string()),
        port.parse().unwrap_or(9092),
    )
}

/// The controller id clients are told: the lowest live broker.
fn controller_id(b: &Broker) -> BrokerId {
    b.live_brokers()
        .iter()
        .map(|x| BrokerId(x.id as i32))
        .min_by_key(|x| x.0)
        .unwrap_or(broker_id(b))
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
        // Topics the principal may not describe are not shown at all.
        None => topics.extend(
            b.streams()
                .iter()
                .filter(|s| ctx.allowed_topic(Operation::Describe, &s.name))
                .map(|s| topic_metadata(s)),
        ),
        Some(list) => {
            // Kafka v4+ lets the client forbid auto-creation; before, it is on.
            let auto_create = version < 4 || req.allow_auto_topic_creation;
            let create_any = ctx.allowed_cluster(Operation::Create);
            for t in list {
                let Some(name) = t.name else {
                    topics.push(
                        MetadataResponseTopic::default()
                            .with_topic_id(t.topic_id)
                            .with_error_code(ResponseError::UnknownTopicId.code()),
                    );
                    continue;
                };
                if !ctx.allowed_topic(Operation::Describe, &name) {
                    topics.push(
                        MetadataResponseTopic::default()
                            .with_name(Some(name))
                            .with_error_code(ResponseError::TopicAuthorizationFailed.code()),
                    );
                    continue;
                }
                let allow =
                    auto_create && (create_any || ctx.allowed_topic(Operation::Create, &name));
                match b.stream_or_create(name.as_str(), allow).await {
                    Ok(s) => topics.push(topic_metadata(&s)),
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
    let brokers = b
        .live_brokers()
        .iter()
        .filter_map(|x| {
            let (host, port) = host_port(x.kafka_addr_for(ctx.listener.name())?);
            Some(
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(x.id as i32))
                    .with_host(host)
                    .with_port(port),
            )
        })
        .collect();
    let resp = MetadataResponse::default()
        .with_brokers(brokers)
        .with_cluster_id(Some(StrBytes::from_string(b.config.cluster_id.clone())))
        .with_controller_id(controller_id(b))
        .with_topics(topics);
    ready(ResponseKind::Metadata(resp))
}

pub fn describe_cluster(ctx: &Ctx, _req: DescribeClusterRequest) -> Pending {
    let b = &ctx.broker;
    ready(ResponseKind::DescribeCluster(
        DescribeClusterResponse::default()
            .with_cluster_id(StrBytes::from_string(b.config.cluster_id.clone()))
            .with_controller_id(controller_id(b))
            .with_brokers(
                b.live_brokers()
                    .iter()
                    .filter_map(|x| {
                        let (host, port) = host_port(x.kafka_addr_for(ctx.listener.name())?);
                        Some(
                            DescribeClusterBroker::default()
                                .with_broker_id(BrokerId(x.id as i32))
                                .with_host(host)
                                .with_port(port),
                        )
                    })
                    .collect(),
            ),
    ))
}

pub fn find_coordinator(ctx: &Ctx, req: FindCoordinatorRequest, version: i16) -> Pending {
    let b = &ctx.broker;
    // key_type 0 = group, 1 = transaction; transactions are not served.
    let answer = |key: &str| -> (i16, BrokerId, StrBytes, i32) {
        if req.key_type != 0 {
            let code = ResponseError::CoordinatorNotAvailable.code();
            return (code, BrokerId(-1), StrBytes::default(), -1);
        }
        let coordinator = b.coordinator(key);
        let addr = coordinator
            .as_ref()
            .and_then(|c| Some((c.id, c.kafka_addr_for(ctx.listener.name())?)));
        match addr {
            Some((id, addr)) => {
                let (host, port) = host_port(addr);
                (0, BrokerId(id as i32), host, port)
            }
            None => (
                ResponseError::CoordinatorNotAvailable.code(),
                BrokerId(-1),
                StrBytes::default(),
                -1,
            ),
        }
    };
    let resp = if version >= 4 {
        FindCoordinatorResponse::default().with_coordinators(
            req.coordinator_keys
                .iter()
                .map(|key| {
                    let (code, id, host, port) = answer(key.as_str());
                    Coordinator::default()
                        .with_key(key.clone())
                        .with_node_id(id)
                        .with_host(host)
                        .with_port(port)
                        .with_error_code(code)
                })
                .collect(),
        )
    } else {
        let (code, id, host, port) = answer(req.key.as_str());
        FindCoordinatorResponse::default()
            .with_error_code(code)
            .with_node_id(id)
            .with_host(host)
            .with_port(port)
    };
    ready(ResponseKind::FindCoordinator(resp))
}
